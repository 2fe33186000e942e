//! AVX-512 micro-kernels and packing routines of the packed-panel GEMM
//! ([`crate::kernels::panel_gemm`]).
//!
//! Layouts (all in 32-bit words, `NR` = 32 output columns per panel, `MR` = 12 rows of `x`):
//! - weight panel, `f32`: `[k][NR]` — 32 consecutive output features per `k`;
//! - weight panel, bf16 pairs: `[k / 2][NR]` words, each word holding the two bf16 weights
//!   `(w[j][2p], w[j][2p + 1])` (low half first) — the operand layout of `vdpbf16ps`;
//! - weight panel, `f16`: `[k][NR]` halves (converted to `f32` in registers);
//! - `x` panel of `M <= MR` rows, `f32`: `[k][M]`; bf16 pairs: `[k / 2][M]` words.
//!
//! A micro-kernel computes one `M x NR` tile (`M <= MR`) of the output over one block of
//! `k`, with `2 M` accumulators in registers: per `k` it loads two weight vectors and
//! broadcasts `M` values of `x`.
//!
//! Every function needs AVX-512 F/BW/VL (plus FMA/F16C); [`ukr_dot_native`] also needs
//! AVX512_BF16. Callers check the CPU (see [`crate::simd::SimdLevel`] and
//! [`has_avx512_bf16`]).

use std::arch::x86_64::*;

use half::{bf16, f16};

/// Output columns per weight panel (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Rows of `x` per micro-tile (24 accumulators).
pub(crate) const MR: usize = 12;
/// Weight-panel words prefetched ahead of the micro-kernel's loads (in `k` steps).
const PREFETCH_STEPS: usize = 16;

/// Whether the CPU has AVX512_BF16 (`vdpbf16ps`), detected once.
pub(crate) fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    })
}

/// What a micro-kernel does with the output tile it computed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// `c = acc`.
    Zero,
    /// `c = acc + bias[col]`; the pointer addresses the bias of the tile's first column.
    Bias(*const f32),
    /// `c += acc`.
    Acc,
}

/// Lane mask with the low `n` lanes set (all 16 for `n >= 16`).
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Writes the `M x NR` accumulator tile to `c` (row stride `ldc`), columns `< nvalid` only.
///
/// # Safety
/// `c.add(r * ldc + j)` must be valid for reading and writing for `r < M`, `j < nvalid`;
/// with `Init::Bias(b)`, `b.add(j)` valid for reading for `j < nvalid`. AVX-512 F.
#[inline(always)]
unsafe fn store_tile<const M: usize>(
    acc: &[[__m512; 2]; M],
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    let k0 = mask16(nvalid);
    let k1 = mask16(nvalid.saturating_sub(16));
    for (r, a) in acc.iter().enumerate() {
        let cp = c.wrapping_add(r * ldc);
        let (mut a0, mut a1) = (a[0], a[1]);
        // SAFETY (all masked accesses): enabled lanes are columns `< nvalid` (caller).
        unsafe {
            match init {
                Init::Zero => {}
                Init::Bias(b) => {
                    a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(k0, b));
                    a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(k1, b.wrapping_add(16)));
                }
                Init::Acc => {
                    a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(k0, cp));
                    a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(k1, cp.wrapping_add(16)));
                }
            }
            _mm512_mask_storeu_ps(cp, k0, a0);
            _mm512_mask_storeu_ps(cp.wrapping_add(16), k1, a1);
        }
    }
}

/// Prefetches the output tile (it is read or written at the end of the micro-kernel).
#[inline(always)]
fn prefetch_tile<const M: usize>(c: *mut f32, ldc: usize) {
    for r in 0..M {
        // SAFETY: prefetching never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + 16).cast());
        }
    }
}

/// Prefetches the weight-panel words of step `p + PREFETCH_STEPS`.
#[inline(always)]
fn prefetch_panel(wp: *const u32, p: usize) {
    let ahead = wp.wrapping_add((p + PREFETCH_STEPS) * NR);
    // SAFETY: prefetching never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
    }
}

/// `f32` micro-kernel: `kc` steps over an `f32` weight panel and an `f32` `x` panel.
///
/// # Safety
/// `xp` valid for reading `kc * M` floats, `wp` for `kc * NR` words; the [`store_tile`]
/// contract for `c`, `ldc`, `init`, `nvalid`; AVX-512 F/BW/VL, FMA.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn ukr_f32<const M: usize>(
    kc: usize,
    xp: *const f32,
    wp: *const u32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    prefetch_tile::<M>(c, ldc);
    for p in 0..kc {
        prefetch_panel(wp, p);
        // SAFETY: step `p < kc` reads words `p * NR .. p * NR + 32` of `wp` and floats
        // `p * M + r` (`r < M`) of `xp`, inside the caller's bounds.
        unsafe {
            let w0 = _mm512_loadu_ps(wp.add(p * NR).cast());
            let w1 = _mm512_loadu_ps(wp.add(p * NR + 16).cast());
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*xp.add(p * M + r));
                a[0] = _mm512_fmadd_ps(w0, xb, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xb, a[1]);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile::<M>(&acc, c, ldc, init, nvalid) };
}

/// `f16`-panel micro-kernel: like [`ukr_f32`], converting 32 weights per step with
/// `vcvtph2ps` (exact).
///
/// # Safety
/// `xp` valid for reading `kc * M` floats, `wp` for `kc * NR` halves; the [`store_tile`]
/// contract for `c`, `ldc`, `init`, `nvalid`; AVX-512 F/BW/VL, FMA, F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn ukr_f16<const M: usize>(
    kc: usize,
    xp: *const f32,
    wp: *const f16,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    prefetch_tile::<M>(c, ldc);
    for p in 0..kc {
        // Prefetching never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((p + PREFETCH_STEPS) * NR).cast());
        // SAFETY: step `p < kc` reads halves `p * NR .. p * NR + 32` of `wp` and floats
        // `p * M + r` (`r < M`) of `xp`, inside the caller's bounds.
        unsafe {
            let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(p * NR).cast()));
            let w1 = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(p * NR + 16).cast()));
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*xp.add(p * M + r));
                a[0] = _mm512_fmadd_ps(w0, xb, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xb, a[1]);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile::<M>(&acc, c, ldc, init, nvalid) };
}

/// Splits a vector of bf16 pairs into the `f32` values of the low (even `k`) and high
/// (odd `k`) halves. Exact.
#[inline(always)]
fn split_pairs(v: __m512i) -> (__m512, __m512) {
    // SAFETY: register-only operations; AVX-512 F is enabled in every caller.
    unsafe {
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
            _mm512_castsi512_ps(_mm512_and_si512(
                v,
                _mm512_set1_epi32(0xFFFF_0000u32 as i32),
            )),
        )
    }
}

/// bf16-pair weights with `f32` activations (exact products, `f32` accumulation):
/// `kcp` pair steps over a pair panel and an `f32` `x` panel of `2 kcp` steps.
///
/// # Safety
/// `xp` valid for reading `2 * kcp * M` floats, `wp` for `kcp * NR` words; the
/// [`store_tile`] contract; AVX-512 F/BW/VL, FMA.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn ukr_pairs_f32x<const M: usize>(
    kcp: usize,
    xp: *const f32,
    wp: *const u32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    prefetch_tile::<M>(c, ldc);
    for p in 0..kcp {
        prefetch_panel(wp, p);
        // SAFETY: pair step `p < kcp` reads words `p * NR .. + 32` of `wp` and floats
        // `(2p or 2p + 1) * M + r` (`r < M`) of `xp`, inside the caller's bounds.
        unsafe {
            let (e0, o0) = split_pairs(_mm512_loadu_si512(wp.add(p * NR).cast()));
            let (e1, o1) = split_pairs(_mm512_loadu_si512(wp.add(p * NR + 16).cast()));
            for (r, a) in acc.iter_mut().enumerate() {
                let xe = _mm512_set1_ps(*xp.add(2 * p * M + r));
                let xo = _mm512_set1_ps(*xp.add((2 * p + 1) * M + r));
                a[0] = _mm512_fmadd_ps(e0, xe, a[0]);
                a[1] = _mm512_fmadd_ps(e1, xe, a[1]);
                a[0] = _mm512_fmadd_ps(o0, xo, a[0]);
                a[1] = _mm512_fmadd_ps(o1, xo, a[1]);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile::<M>(&acc, c, ldc, init, nvalid) };
}

/// bf16 dot products with `vdpbf16ps`: `kcp` pair steps over a pair panel and a bf16-pair
/// `x` panel. Per lane and step: `acc += w_odd * x_odd`, then `acc += w_even * x_even`.
///
/// # Safety
/// `xp` valid for reading `kcp * M` words, `wp` for `kcp * NR` words; the [`store_tile`]
/// contract; AVX-512 F/BW/VL and AVX512_BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
pub(crate) unsafe fn ukr_dot_native<const M: usize>(
    kcp: usize,
    xp: *const u32,
    wp: *const u32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    prefetch_tile::<M>(c, ldc);
    for p in 0..kcp {
        prefetch_panel(wp, p);
        // SAFETY: pair step `p < kcp` reads words `p * NR .. + 32` of `wp` and word
        // `p * M + r` (`r < M`) of `xp`, inside the caller's bounds. `__m512bh` and
        // `__m512i` are both 512-bit vectors (the transmutes reinterpret bits).
        unsafe {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NR).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NR + 16).cast()));
            for (r, a) in acc.iter_mut().enumerate() {
                let xb: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xp.add(p * M + r) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], w0, xb);
                a[1] = _mm512_dpbf16_ps(a[1], w1, xb);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile::<M>(&acc, c, ldc, init, nvalid) };
}

/// [`gemv_rows_dot_native`] at `m == 1` (decode): `out[r] = dot(w row r, x)`. Each row is
/// finished before the next starts, with two accumulators, so the weights are read as one
/// sequential stream, which the hardware prefetchers follow at the full read bandwidth (8
/// rows side by side, as the `f32` GEMV reads them, reach about 70% of it: 44 against 62
/// GB/s on the development VM with huge pages).
///
/// # Safety
/// `xb.len() >= k`, `w.len() >= out.len() * k`; AVX-512 F/BW/VL and AVX512_BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
unsafe fn dot_rows_one_x(w: &[bf16], k: usize, xb: &[bf16], out: &mut [f32]) {
    let (xp, wp) = (xb.as_ptr().cast::<i16>(), w.as_ptr().cast::<i16>());
    let dot = |a: __m512, w: __m512i, x: __m512i| {
        // SAFETY: `__m512bh` and `__m512i` are both 512-bit vectors (the transmutes
        // reinterpret bits); AVX512_BF16 is enabled on this function.
        unsafe {
            let (w, x) = (
                std::mem::transmute::<__m512i, __m512bh>(w),
                std::mem::transmute::<__m512i, __m512bh>(x),
            );
            _mm512_dpbf16_ps(a, w, x)
        }
    };
    for (r, o) in out.iter_mut().enumerate() {
        let row = wp.wrapping_add(r * k);
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut p = 0;
        // SAFETY (all loads): element offsets `p .. p + 32` (or the masked lanes) are below
        // `k`, inside row `r < out.len()` of `w` and inside `xb` (the caller's contract).
        unsafe {
            while p + 64 <= k {
                let (w0, w1) = (
                    _mm512_loadu_si512(row.add(p).cast()),
                    _mm512_loadu_si512(row.add(p + 32).cast()),
                );
                a0 = dot(a0, w0, _mm512_loadu_si512(xp.add(p).cast()));
                a1 = dot(a1, w1, _mm512_loadu_si512(xp.add(p + 32).cast()));
                p += 64;
            }
            if p + 32 <= k {
                let w0 = _mm512_loadu_si512(row.add(p).cast());
                a0 = dot(a0, w0, _mm512_loadu_si512(xp.add(p).cast()));
                p += 32;
            }
            if p < k {
                let lanes: __mmask32 = (1u32 << (k - p)) - 1;
                let w0 = _mm512_maskz_loadu_epi16(lanes, row.add(p));
                a1 = dot(a1, w0, _mm512_maskz_loadu_epi16(lanes, xp.add(p)));
            }
        }
        *o = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/// Above this many rows of `x`, [`gemv_rows_dot_native`] takes four weight rows at a
/// time (16 independent accumulators, each x vector used four times); at or below it one,
/// which streams faster. 32768 x 2048 bf16, GB/s of weights, same runs: m = 2, one row at a
/// time 32-34 (exact `f32` GEMV 21-25); two rows at a time gave 27 at m = 2 and 24, 18, 12
/// at m = 4, 8, 15, four rows 24-26, 18, 11-12 (exact 20-22, 13-15, 7-8).
const ROW_BLOCK_MIN_M: usize = 2;
/// Weight rows per block above [`ROW_BLOCK_MIN_M`].
const ROW_BLOCK: usize = 4;

/// The bf16 GEMV with `vdpbf16ps`, for row-major bf16 weights `w` (rows of length `k`) and
/// `m` rows of `x` already rounded to bf16 (`xb`, `m x k`): the transposed output
/// `out_t[r * m + i] = dot(w row r, x row i)` for `out_t.len() / m` weight rows. Each weight
/// row (for `m` above [`ROW_BLOCK_MIN_M`], each block of [`ROW_BLOCK`] adjacent rows) is
/// finished against every row of `x`, four at a time, while it stays in L1, before the next
/// starts, so the weights stream sequentially. Arithmetic per lane as [`ukr_dot_native`]:
/// `acc += w_odd * x_odd`, then `acc += w_even * x_even`.
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL and AVX512_BF16. Slice lengths are checked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
pub(crate) unsafe fn gemv_rows_dot_native(
    w: &[bf16],
    k: usize,
    xb: &[bf16],
    m: usize,
    out_t: &mut [f32],
) {
    let rows = out_t.len() / m.max(1);
    assert!(
        m > 0 && out_t.len() == rows * m && xb.len() >= m * k && w.len() >= rows * k,
        "gemv_rows_dot_native: inputs too short"
    );
    if m == 1 {
        // SAFETY: lengths asserted above; the CPU features are the caller's contract.
        return unsafe { dot_rows_one_x(w, k, xb, out_t) };
    }
    let (xp, wp, op) = (
        xb.as_ptr().cast::<i16>(),
        w.as_ptr().cast::<i16>(),
        out_t.as_mut_ptr(),
    );
    let mut r = 0;
    while r < rows {
        let block = m > ROW_BLOCK_MIN_M && rows - r >= ROW_BLOCK;
        let mut i = 0;
        while i < m {
            let (row, x, out) = (
                wp.wrapping_add(r * k),
                xp.wrapping_add(i * k),
                op.wrapping_add(r * m + i),
            );
            // SAFETY: weight rows `r .. r + R <= rows` (`R` is 1 or `ROW_BLOCK`), x rows
            // `i .. i + G <= m` and outputs `(r .. r + R) * m + (i .. i + G)` are inside the
            // slices checked above; the CPU features are the caller's contract.
            unsafe {
                match (block, m - i) {
                    (true, 1) => dot_tile::<ROW_BLOCK, 1>(row, x, k, out, m),
                    (true, 2) => dot_tile::<ROW_BLOCK, 2>(row, x, k, out, m),
                    (true, 3) => dot_tile::<ROW_BLOCK, 3>(row, x, k, out, m),
                    (true, _) => dot_tile::<ROW_BLOCK, 4>(row, x, k, out, m),
                    (false, 1) => dot_tile::<1, 1>(row, x, k, out, m),
                    (false, 2) => dot_tile::<1, 2>(row, x, k, out, m),
                    (false, 3) => dot_tile::<1, 3>(row, x, k, out, m),
                    (false, _) => dot_tile::<1, 4>(row, x, k, out, m),
                }
            }
            i += 4;
        }
        r += if block { ROW_BLOCK } else { 1 };
    }
}

/// `out[q * ldo + g] = dot(weight row q, x row g)` for `q < R`, `g < G` (rows of `k` bf16,
/// weight rows and x rows each `k` apart).
///
/// # Safety
/// `row` valid for `R * k` elements, `x` for `G * k`, `out` for the `R x G` writes; AVX-512
/// F/BW/VL and AVX512_BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
unsafe fn dot_tile<const R: usize, const G: usize>(
    row: *const i16,
    x: *const i16,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    let mut p = 0;
    while p + 32 <= k {
        // SAFETY: elements `p .. p + 32 <= k` of every weight and x row (the caller's bounds).
        unsafe { dot_step::<R, G>(&mut acc, row, x, k, p, !0) };
        p += 32;
    }
    if p < k {
        // SAFETY: the lanes below `k - p` only.
        unsafe { dot_step::<R, G>(&mut acc, row, x, k, p, (1u32 << (k - p)) - 1) };
    }
    for (q, a) in acc.iter().enumerate() {
        for (g, v) in a.iter().enumerate() {
            // SAFETY: `q < R`, `g < G`, within the caller's bounds.
            unsafe { *out.add(q * ldo + g) = _mm512_reduce_add_ps(*v) };
        }
    }
}

/// One step of [`dot_tile`]: the `lanes` of elements `p .. p + 32` of every row.
///
/// # Safety
/// Those lanes of the `R` weight rows and `G` x rows (each `k` apart) are readable; AVX-512
/// F/BW/VL and AVX512_BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
unsafe fn dot_step<const R: usize, const G: usize>(
    acc: &mut [[__m512; G]; R],
    row: *const i16,
    x: *const i16,
    k: usize,
    p: usize,
    lanes: __mmask32,
) {
    // SAFETY: the caller's contract; `__m512bh` and `__m512i` are both 512-bit vectors.
    unsafe {
        let mut wv = [_mm512_setzero_si512(); R];
        for (q, v) in wv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_epi16(lanes, row.add(q * k + p));
        }
        for g in 0..G {
            let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                lanes,
                x.add(g * k + p),
            ));
            for (a, v) in acc.iter_mut().zip(&wv) {
                a[g] = _mm512_dpbf16_ps(a[g], std::mem::transmute::<__m512i, __m512bh>(*v), xv);
            }
        }
    }
}

/// [`ukr_dot_native`] computed with AVX-512 F only (same operands, same order of the two
/// products per step; differs from `vdpbf16ps` only for subnormals, which it does not
/// flush). Lets CPUs without AVX512_BF16 test the bf16-activation path.
///
/// # Safety
/// As [`ukr_dot_native`], without the AVX512_BF16 requirement.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn ukr_dot_emulated<const M: usize>(
    kcp: usize,
    xp: *const u32,
    wp: *const u32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    for p in 0..kcp {
        // SAFETY: as in `ukr_dot_native`.
        unsafe {
            let (e0, o0) = split_pairs(_mm512_loadu_si512(wp.add(p * NR).cast()));
            let (e1, o1) = split_pairs(_mm512_loadu_si512(wp.add(p * NR + 16).cast()));
            for (r, a) in acc.iter_mut().enumerate() {
                let (xe, xo) = split_pairs(_mm512_set1_epi32(*xp.add(p * M + r) as i32));
                a[0] = _mm512_fmadd_ps(o0, xo, a[0]);
                a[0] = _mm512_fmadd_ps(e0, xe, a[0]);
                a[1] = _mm512_fmadd_ps(o1, xo, a[1]);
                a[1] = _mm512_fmadd_ps(e1, xe, a[1]);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile::<M>(&acc, c, ldc, init, nvalid) };
}

/// Transposes a 16 x 16 block of 32-bit elements held in 16 registers (row `i` in `r[i]`
/// becomes column `i`).
#[inline(always)]
pub(crate) fn transpose16(r: &mut [__m512; 16]) {
    // SAFETY: register-only shuffles; AVX-512 F is enabled in every caller.
    unsafe {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
        }
        for i in 0..2 {
            for c in 0..4 {
                t[8 * i + c] = _mm512_shuffle_f32x4::<0x88>(u[8 * i + c], u[8 * i + 4 + c]);
                t[8 * i + 4 + c] = _mm512_shuffle_f32x4::<0xDD>(u[8 * i + c], u[8 * i + 4 + c]);
            }
        }
        for c in 0..8 {
            r[c] = _mm512_shuffle_f32x4::<0x88>(t[c], t[8 + c]);
            r[8 + c] = _mm512_shuffle_f32x4::<0xDD>(t[c], t[8 + c]);
        }
    }
}

/// A row-major weight matrix (`n` rows of `k` elements) as a source of 32-bit panel words.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WeightWords<'a> {
    /// `f32` weights; one word per element.
    F32(&'a [f32]),
    /// `f16` weights converted (exactly) to `f32`; one word per element.
    F16(&'a [f16]),
    /// `bf16` weights converted (exactly) to `f32`; one word per element.
    Bf16AsF32(&'a [bf16]),
    /// `bf16` weights as pairs; one word per two elements (an odd `k` gets a zero high half
    /// in its last word).
    Bf16Pairs(&'a [bf16]),
}

impl WeightWords<'_> {
    /// Words per row for rows of `k` elements.
    pub(crate) fn words_per_row(&self, k: usize) -> usize {
        match self {
            WeightWords::Bf16Pairs(_) => k.div_ceil(2),
            _ => k,
        }
    }

    /// Loads `valid <= 16` words of row `j` from word `w` (other lanes zero).
    ///
    /// # Safety
    /// `j < n`, `w + valid <= words_per_row(k)`, the slice holds `n * k` elements;
    /// AVX-512 F/BW/VL, F16C.
    #[inline(always)]
    unsafe fn load(&self, k: usize, j: usize, w: usize, valid: usize) -> __m512 {
        let km = mask16(valid);
        // SAFETY (each arm): enabled lanes address elements `j * k + w .. j * k + w +
        // valid` (or twice that for pairs, clamped to the row end), inside the slice.
        unsafe {
            match *self {
                WeightWords::F32(s) => _mm512_maskz_loadu_ps(km, s.as_ptr().add(j * k + w)),
                WeightWords::F16(s) => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    km,
                    s.as_ptr().add(j * k + w).cast(),
                )),
                WeightWords::Bf16AsF32(s) => {
                    let h = _mm256_maskz_loadu_epi16(km, s.as_ptr().add(j * k + w).cast());
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                WeightWords::Bf16Pairs(s) => {
                    let elems = (k - 2 * w).min(2 * valid);
                    let km32: __mmask32 = if elems >= 32 { !0 } else { (1u32 << elems) - 1 };
                    _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(
                        km32,
                        s.as_ptr().add(j * k + 2 * w).cast(),
                    ))
                }
            }
        }
    }
}

/// Packs weight rows `j0 .. j0 + np * NR` (rows `>= n` become zeros), words
/// `w0 .. w0 + kw` (words past the row end become zeros), into `dst` as `np` panels of
/// `[kw][NR]` words.
///
/// # Safety
/// `src` holds `n * k` elements; `dst.len() >= np * kw * NR`; AVX-512 F/BW/VL, F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_weights(
    src: WeightWords<'_>,
    n: usize,
    k: usize,
    j0: usize,
    np: usize,
    w0: usize,
    kw: usize,
    dst: &mut [u32],
) {
    assert!(dst.len() >= np * kw * NR, "pack_weights: dst too short");
    let words = src.words_per_row(k);
    let d = dst.as_mut_ptr();
    for pi in 0..np {
        for half in 0..2 {
            let jb = j0 + pi * NR + half * 16;
            let mut wi = 0;
            while wi < kw {
                let valid = words.saturating_sub(w0 + wi).min(16).min(kw - wi);
                let mut r = [_mm512_setzero_ps(); 16];
                if valid > 0 {
                    for (i, reg) in r.iter_mut().enumerate() {
                        if jb + i < n {
                            // SAFETY: row `jb + i < n`, words `w0 + wi .. + valid` are
                            // within the row (`valid <= words - w0 - wi`).
                            *reg = unsafe { src.load(k, jb + i, w0 + wi, valid) };
                        }
                    }
                }
                transpose16(&mut r);
                for (c, reg) in r.iter().enumerate().take((kw - wi).min(16)) {
                    // SAFETY: word `(pi * kw + wi + c) * NR + half * 16 + 0..16` with
                    // `wi + c < kw`, `pi < np`: inside `dst` (asserted above).
                    unsafe {
                        _mm512_storeu_ps(d.add((pi * kw + wi + c) * NR + half * 16).cast(), *reg)
                    };
                }
                wi += 16;
            }
        }
    }
}

/// Converts `src` (`f32`, exact for values that came from `f16`) to `f16` in `dst`
/// (rounding to nearest even).
///
/// # Safety
/// `dst.len() >= src.len()`; AVX-512 F, F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn f32_to_f16_words(src: &[u32], dst: &mut [f16]) {
    assert!(dst.len() >= src.len(), "f32_to_f16_words: dst too short");
    let mut i = 0;
    while i < src.len() {
        let km = mask16(src.len() - i);
        // SAFETY: enabled lanes are `i .. min(i + 16, src.len())`, inside both slices.
        unsafe {
            let v = _mm512_maskz_loadu_ps(km, src.as_ptr().add(i).cast());
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i).cast(), km, h);
        }
        i += 16;
    }
}
