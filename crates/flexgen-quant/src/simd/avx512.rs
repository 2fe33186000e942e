//! AVX-512 (F/BW/VL, plus AVX2/FMA/F16C) fused kernels over packed rows.
//!
//! 4-bit groups: the group's `(step, min)` become a 16-lane table `t[q] = q · step + min`;
//! 16 code bytes are widened to 16 dwords, and `vpermps` with the dword (low nibble) and with
//! the dword shifted right by 4 (high nibble) yields the dequantized weights of two runs of 16
//! values (the split packing of [`crate::codec`] puts them at offsets `t` and `t + gs/2`).
//! 8-bit groups: widen, convert, `q · step + min`. Both compute exactly the values of the
//! reference decoder, then accumulate with FMA.

use std::arch::x86_64::*;

use half::f16;

use super::{padded_tails, scalar, QKern, Rows};

/// The AVX-512 kernel set.
pub(crate) struct Avx512;

/// Rows of `W` per tile when `m == 1`.
const ROWS_M1: usize = 4;
/// Rows of `W` per tile when `m > 1`.
const ROWS: usize = 4;
/// Bytes of codes per block of W rows (`m > 1`).
const W_BLOCK_BYTES: usize = 64 << 10;
/// `f32` elements of `x` per block of rows (512 KiB, about a quarter of L2).
const X_BLOCK_ELEMS: usize = 1 << 17;

/// `(step, min)` of the group whose parameters start at `p`, broadcast to all lanes.
///
/// # Safety
/// `p` must be valid for reading two `f16`; the CPU must support AVX-512 F and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn params(p: *const f16) -> (__m512, __m512) {
    // SAFETY: the caller guarantees two readable `f16` (4 bytes) at `p`.
    let raw = unsafe { p.cast::<u32>().read_unaligned() };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(raw as i32));
    (
        _mm512_broadcastss_ps(v),
        _mm512_broadcastss_ps(_mm_movehdup_ps(v)),
    )
}

/// Groups whose parameters [`tile`] converts at once.
const PARAM_RUN: usize = 8;

/// Converts the `(step, min)` pairs of `count <= PARAM_RUN` consecutive groups at `p` to
/// `f32` in `out` (`[step0, min0, step1, min1, ..]`).
///
/// # Safety
/// `p` must be valid for reading `2 * count` `f16`; AVX-512 as above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn convert_params(p: *const f16, count: usize, out: &mut [f32; 2 * PARAM_RUN]) {
    let mask: __mmask16 = if count >= PARAM_RUN {
        !0
    } else {
        (1u16 << (2 * count)) - 1
    };
    // SAFETY: the masked lanes address exactly the `2 * count` readable halves.
    let h = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast()) };
    // SAFETY: `out` holds 16 `f32`.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_cvtph_ps(h)) };
}

/// `t[q] = q · step + min` for `q < 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn table(step: __m512, min: __m512) -> __m512 {
    let iota = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    _mm512_add_ps(_mm512_mul_ps(iota, step), min)
}

/// 16 code bytes at `p` widened to dwords.
///
/// # Safety
/// `p` must be valid for reading 16 bytes; AVX-512 as above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn widen16(p: *const u8) -> __m512i {
    // SAFETY: forwarded from the caller.
    _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) })
}

/// The dequantized values of 16 widened 8-bit codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn decode8(v: __m512i, step: __m512, min: __m512) -> __m512 {
    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), step), min)
}

/// An `R x M` tile of [`QKern::gemv`] for a fused format with `BITS` bits.
///
/// `wc`/`wp`: codes/params of the tile's first row; `x` rows of `w.cols` values (stride
/// `w.cols`); `xt` the zero-padded ragged tails of the same `M` rows (stride `w.gs`), used
/// for the last group when `w.cols % w.gs != 0`; `out[r * m + i]`.
///
/// # Safety
/// Rows `0..R` from `wc`/`wp` (at the strides of `w`) and `M` rows of `x` and `xt` must be
/// readable, and `out[r * m + i]` writable for `r < R`, `i < M`; AVX-512 as above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile<const BITS: u8, const R: usize, const M: usize>(
    w: &Rows<'_>,
    wc: *const u8,
    wp: *const f16,
    x: *const f32,
    xt: *const f32,
    out: *mut f32,
    m: usize,
) {
    let (k, gs) = (w.cols, w.gs);
    let full = k / gs;
    let gb = w.group_bytes();
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let groups = w.groups();
    // The `(step, min)` pairs of the next PARAM_RUN groups of each row, converted to `f32`
    // once per run: then each group's table costs two broadcast loads and one FMA.
    let mut run = [[0f32; 2 * PARAM_RUN]; R];
    for g in 0..groups {
        let (xg, xs) = if g < full {
            (x.wrapping_add(g * gs), k)
        } else {
            (xt, gs)
        };
        let gi = g % PARAM_RUN;
        if gi == 0 {
            let count = (groups - g).min(PARAM_RUN);
            for (r, pr) in run.iter_mut().enumerate() {
                // SAFETY: row r < R, groups `g .. g + count <= groups`: inside the caller's
                // rows (2 `f16` per group).
                unsafe { convert_params(wp.add(r * w.param_stride + 2 * g), count, pr) };
            }
        }
        let mut step = [_mm512_setzero_ps(); R];
        let mut min = [_mm512_setzero_ps(); R];
        for r in 0..R {
            step[r] = _mm512_set1_ps(run[r][2 * gi]);
            min[r] = _mm512_set1_ps(run[r][2 * gi + 1]);
        }
        let cg = g * gb;
        // Fetch the same group of the next tile's rows (the rows after these R) while this
        // tile computes, so its loads find the lines in cache. Prefetches never fault, so
        // addresses past the last row are harmless.
        for r in R..2 * R {
            let ahead = wc.wrapping_add(r * w.code_stride + cg);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            if g % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(r * w.param_stride + 2 * g).cast());
            }
        }
        if BITS == 4 {
            let mut tab = [_mm512_setzero_ps(); R];
            for r in 0..R {
                tab[r] = table(step[r], min[r]);
            }
            let mut t = 0;
            while t < gb {
                let mut lo = [_mm512_setzero_ps(); R];
                let mut hi = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    // SAFETY: bytes `cg + t .. cg + t + 16 <= (g + 1) * gb` of row r.
                    let v = unsafe { widen16(wc.add(r * w.code_stride + cg + t)) };
                    lo[r] = _mm512_permutexvar_ps(v, tab[r]);
                    hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), tab[r]);
                }
                for i in 0..M {
                    // SAFETY: values `t .. t + 16` and `gb + t .. gb + t + 16` of this group
                    // (gb = gs / 2) lie in the group's `gs` values of x row i (full group) or
                    // of the padded tail row i.
                    let (xl, xh) = unsafe {
                        (
                            _mm512_loadu_ps(xg.add(i * xs + t)),
                            _mm512_loadu_ps(xg.add(i * xs + gb + t)),
                        )
                    };
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(lo[r], xl, acc[r][i]);
                        acc[r][i] = _mm512_fmadd_ps(hi[r], xh, acc[r][i]);
                    }
                }
                t += 16;
            }
        } else {
            let mut t = 0;
            while t < gs {
                let mut wv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    // SAFETY: bytes `cg + t .. cg + t + 16 <= (g + 1) * gs` of row r.
                    let v = unsafe { widen16(wc.add(r * w.code_stride + cg + t)) };
                    wv[r] = decode8(v, step[r], min[r]);
                }
                for i in 0..M {
                    // SAFETY: values `t .. t + 16` of the group, as above.
                    let xv = unsafe { _mm512_loadu_ps(xg.add(i * xs + t)) };
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
                    }
                }
                t += 16;
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (i, a) in accr.iter().enumerate() {
            // SAFETY: `r < R`, `i < M`: covered by the caller's contract.
            unsafe { *out.add(r * m + i) = _mm512_reduce_add_ps(*a) };
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn gemv_bits<const BITS: u8>(w: Rows<'_>, x: &[f32], m: usize, out_t: &mut [f32]) {
    let (rows, k) = (w.rows, w.cols);
    let xt = padded_tails(x, m, k, w.gs);
    let (wc, wp, xp, tp, op) = (
        w.codes.as_ptr(),
        w.params.as_ptr(),
        x.as_ptr(),
        xt.as_ptr(),
        out_t.as_mut_ptr(),
    );
    let row = |r: usize| {
        (
            wc.wrapping_add(r * w.code_stride),
            wp.wrapping_add(r * w.param_stride),
        )
    };
    if m == 1 {
        let mut r = 0;
        while r < rows {
            let (c, p) = row(r);
            // SAFETY (all tiles): rows `r .. r + R <= rows` are in bounds (checked by the
            // caller via `assert_in_bounds`), x/xt hold `m` rows, out_t holds `rows * m`.
            unsafe {
                if rows - r >= ROWS_M1 {
                    tile::<BITS, ROWS_M1, 1>(&w, c, p, xp, tp, op.add(r), 1);
                    r += ROWS_M1;
                } else {
                    tile::<BITS, 1, 1>(&w, c, p, xp, tp, op.add(r), 1);
                    r += 1;
                }
            }
        }
        return;
    }
    let mb = (X_BLOCK_ELEMS / k.max(1)).max(4).next_multiple_of(4);
    // Rows of W per block: their codes (about W_BLOCK_BYTES) stay in L2 while every group of
    // four x rows runs over them, and those x rows stay in L1 across the block's tiles.
    let rb = (W_BLOCK_BYTES / w.code_stride.max(1))
        .max(ROWS)
        .next_multiple_of(ROWS);
    let mut i0 = 0;
    while i0 < m {
        let i1 = m.min(i0 + mb);
        let mut b0 = 0;
        while b0 < rows {
            let b1 = rows.min(b0 + rb);
            let mut i = i0;
            while i < i1 {
                let mm = (i1 - i).min(4);
                let mut r = b0;
                while r < b1 {
                    let rr = if b1 - r >= ROWS { ROWS } else { 1 };
                    let (c, p) = row(r);
                    let (xi, ti, oi) = (
                        xp.wrapping_add(i * k),
                        tp.wrapping_add(i * w.gs),
                        op.wrapping_add(r * m + i),
                    );
                    // SAFETY: see the `m == 1` branch; x rows `i .. i + mm <= m`.
                    unsafe {
                        match (rr, mm) {
                            (ROWS, 4) => tile::<BITS, ROWS, 4>(&w, c, p, xi, ti, oi, m),
                            (ROWS, 3) => tile::<BITS, ROWS, 3>(&w, c, p, xi, ti, oi, m),
                            (ROWS, 2) => tile::<BITS, ROWS, 2>(&w, c, p, xi, ti, oi, m),
                            (ROWS, _) => tile::<BITS, ROWS, 1>(&w, c, p, xi, ti, oi, m),
                            (_, 4) => tile::<BITS, 1, 4>(&w, c, p, xi, ti, oi, m),
                            (_, 3) => tile::<BITS, 1, 3>(&w, c, p, xi, ti, oi, m),
                            (_, 2) => tile::<BITS, 1, 2>(&w, c, p, xi, ti, oi, m),
                            _ => tile::<BITS, 1, 1>(&w, c, p, xi, ti, oi, m),
                        }
                    }
                    r += rr;
                }
                i += mm;
            }
            b0 = b1;
        }
        i0 = i1;
    }
}

/// Dequantizes the full groups of every row with SIMD and the ragged tail with the reference
/// decoder.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn dequant(w: Rows<'_>, out: &mut [f32]) {
    let (k, gs, gb) = (w.cols, w.gs, w.group_bytes());
    let full = k / gs;
    for r in 0..w.rows {
        let orow = &mut out[r * k..(r + 1) * k];
        let op = orow.as_mut_ptr();
        for g in 0..full {
            let c = w.codes[r * w.code_stride + g * gb..][..gb].as_ptr();
            let p = w.params[r * w.param_stride + 2 * g..][..2].as_ptr();
            // SAFETY: `c` has `gb` bytes and `p` two `f16` (sliced above); the stores write
            // values `g * gs .. (g + 1) * gs <= k` of `orow`.
            unsafe {
                let (step, min) = params(p);
                let o = op.add(g * gs);
                if w.bits == 4 {
                    let tab = table(step, min);
                    let mut t = 0;
                    while t < gb {
                        let v = widen16(c.add(t));
                        _mm512_storeu_ps(o.add(t), _mm512_permutexvar_ps(v, tab));
                        _mm512_storeu_ps(
                            o.add(gb + t),
                            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), tab),
                        );
                        t += 16;
                    }
                } else {
                    let mut t = 0;
                    while t < gs {
                        _mm512_storeu_ps(o.add(t), decode8(widen16(c.add(t)), step, min));
                        t += 16;
                    }
                }
            }
        }
        if full * gs < k {
            scalar::dequant(
                Rows {
                    codes: &w.codes[r * w.code_stride + full * gb..],
                    params: &w.params[r * w.param_stride + 2 * full..],
                    rows: 1,
                    cols: k - full * gs,
                    ..w
                },
                &mut orow[full * gs..],
            );
        }
    }
}

/// `out += Σ_r p[r] · W[r]` with SIMD over full groups; ragged tails use the reference decoder.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]) {
    let (k, gs, gb) = (w.cols, w.gs, w.group_bytes());
    let full = k / gs;
    assert!(out.len() >= k, "axpy: out too short");
    let op = out.as_mut_ptr();
    for (r, &pr) in p.iter().enumerate().take(w.rows) {
        if pr == 0.0 {
            continue;
        }
        let pv = _mm512_set1_ps(pr);
        for g in 0..full {
            let c = w.codes[r * w.code_stride + g * gb..][..gb].as_ptr();
            let pp = w.params[r * w.param_stride + 2 * g..][..2].as_ptr();
            // SAFETY: as in `dequant`; `out` holds at least `k` values.
            unsafe {
                let (step, min) = params(pp);
                let o = op.add(g * gs);
                if w.bits == 4 {
                    let tab = table(step, min);
                    let mut t = 0;
                    while t < gb {
                        let v = widen16(c.add(t));
                        let lo = _mm512_permutexvar_ps(v, tab);
                        let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), tab);
                        let (ol, oh) = (o.add(t), o.add(gb + t));
                        _mm512_storeu_ps(ol, _mm512_fmadd_ps(pv, lo, _mm512_loadu_ps(ol)));
                        _mm512_storeu_ps(oh, _mm512_fmadd_ps(pv, hi, _mm512_loadu_ps(oh)));
                        t += 16;
                    }
                } else {
                    let mut t = 0;
                    while t < gs {
                        let wv = decode8(widen16(c.add(t)), step, min);
                        let ot = o.add(t);
                        _mm512_storeu_ps(ot, _mm512_fmadd_ps(pv, wv, _mm512_loadu_ps(ot)));
                        t += 16;
                    }
                }
            }
        }
        if full * gs < k {
            scalar::axpy(
                &[pr],
                Rows {
                    codes: &w.codes[r * w.code_stride + full * gb..],
                    params: &w.params[r * w.param_stride + 2 * full..],
                    rows: 1,
                    cols: k - full * gs,
                    ..w
                },
                &mut out[full * gs..k],
            );
        }
    }
}

/// Output features per GEMM panel (flexgen-core's layout).
const PW: usize = flexgen_core::kernels::PANEL_WIDTH;

/// Writes the block `w` (rows of one column block, `w.cols % w.gs == 0`, a fused format)
/// straight in flexgen-core's GEMM panel layout: `dst[(p * cols + s) * PW + j] =
/// W[p * PW + j, s]`, zero for rows past `w.rows`. Each 16 rows x 16 columns are decoded
/// into registers (the `vpermps` table lookup of [`tile`] for 4-bit, `q · step + min` for
/// 8-bit) and transposed there, so the block is never written row-major.
///
/// # Safety
/// AVX-512 F/BW/VL, FMA, F16C; `w.assert_in_bounds()` holds.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn decode_panels(w: Rows<'_>, dst: &mut [f32]) {
    let (cols, gs, gb) = (w.cols, w.gs, w.group_bytes());
    let np = w.rows.div_ceil(PW);
    assert!(
        w.fused() && cols.is_multiple_of(gs) && dst.len() == np * cols * PW,
        "decode_panels: unsupported block"
    );
    let d = dst.as_mut_ptr();
    for p in 0..np {
        for half in 0..2 {
            let r0 = p * PW + half * 16;
            let nr = w.rows.saturating_sub(r0).min(16);
            if nr == 0 {
                for s in 0..cols {
                    // SAFETY: step `s < cols` of panel `p < np`, lanes `half * 16 ..` of 32.
                    unsafe {
                        _mm512_storeu_ps(
                            d.add((p * cols + s) * PW + half * 16),
                            _mm512_setzero_ps(),
                        )
                    };
                }
                continue;
            }
            // Writes the 16 columns `c0 ..` held (transposed) in `v`.
            let store = |v: &mut [__m512; 16], c0: usize| {
                // SAFETY: AVX-512 F is enabled in this function.
                unsafe { flexgen_core::simd::transpose16x16(v) };
                for (c, reg) in v.iter().enumerate() {
                    // SAFETY: column `c0 + c < cols` (groups are whole, 16 | gs), panel `p`.
                    unsafe { _mm512_storeu_ps(d.add((p * cols + c0 + c) * PW + half * 16), *reg) };
                }
            };
            for g in 0..cols / gs {
                let mut tabs = [_mm512_setzero_ps(); 16];
                let mut steps = [_mm512_setzero_ps(); 16];
                let mut mins = [_mm512_setzero_ps(); 16];
                for r in 0..nr {
                    // SAFETY: row `r0 + r < w.rows`, group `g` in bounds (asserted by caller).
                    let (st, mn) =
                        unsafe { params(w.params.as_ptr().add((r0 + r) * w.param_stride + 2 * g)) };
                    (steps[r], mins[r]) = (st, mn);
                    tabs[r] = table(st, mn);
                }
                // Rows past `nr` read row `nr - 1` and are zeroed below: the loops over all 16
                // rows keep `v` in registers.
                let code = |r: usize, t: usize| {
                    let r = r.min(nr - 1);
                    // SAFETY: bytes `g * gb + t .. + 16 <= (g + 1) * gb` of row `r0 + r`.
                    unsafe { widen16(w.codes.as_ptr().add((r0 + r) * w.code_stride + g * gb + t)) }
                };
                let live = |r: usize, v: __m512| if r < nr { v } else { _mm512_setzero_ps() };
                let mut v = [_mm512_setzero_ps(); 16];
                if w.bits == 4 {
                    let mut t = 0;
                    while t < gb {
                        for r in 0..16 {
                            v[r] = live(r, _mm512_permutexvar_ps(code(r, t), tabs[r]));
                        }
                        store(&mut v, g * gs + t);
                        for r in 0..16 {
                            let hi = _mm512_srli_epi32::<4>(code(r, t));
                            v[r] = live(r, _mm512_permutexvar_ps(hi, tabs[r]));
                        }
                        store(&mut v, g * gs + gb + t);
                        t += 16;
                    }
                } else {
                    let mut t = 0;
                    while t < gs {
                        for r in 0..16 {
                            v[r] = live(r, decode8(code(r, t), steps[r], mins[r]));
                        }
                        store(&mut v, g * gs + t);
                        t += 16;
                    }
                }
            }
        }
    }
}

/// [`decode_panels`] behind a check of what it supports: `false` (nothing written) for a
/// format without a fused kernel or a block with a ragged last group.
///
/// # Safety
/// AVX-512 F/BW/VL, FMA, F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn write_panels(w: Rows<'_>, dst: &mut [f32]) -> bool {
    if !w.fused() || !w.cols.is_multiple_of(w.gs) || w.rows == 0 || w.cols == 0 {
        return false;
    }
    w.assert_in_bounds();
    // SAFETY: forwarded from the caller; bounds asserted above.
    unsafe { decode_panels(w, dst) };
    true
}

impl QKern for Avx512 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn gemv(w: Rows<'_>, x: &[f32], m: usize, out_t: &mut [f32]) {
        if !w.fused() || w.rows == 0 || m == 0 {
            return scalar::gemv(w, x, m, out_t);
        }
        w.assert_in_bounds();
        assert!(
            x.len() >= m * w.cols && out_t.len() >= w.rows * m,
            "gemv: buffers too short"
        );
        if w.bits == 4 {
            gemv_bits::<4>(w, x, m, out_t)
        } else {
            gemv_bits::<8>(w, x, m, out_t)
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn dequant(w: Rows<'_>, out: &mut [f32]) {
        if !w.fused() {
            return scalar::dequant(w, out);
        }
        w.assert_in_bounds();
        dequant(w, out)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]) {
        if !w.fused() {
            return scalar::axpy(p, w, out);
        }
        w.assert_in_bounds();
        axpy(p, w, out)
    }
}
