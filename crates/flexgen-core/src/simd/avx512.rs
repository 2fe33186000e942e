//! AVX-512 (F/BW/VL, plus AVX2/FMA/F16C) implementations of the [`Kern`] primitives.
//!
//! Every function here is compiled with `#[target_feature(enable = "avx512f,avx512bw,
//! avx512vl,avx2,fma,f16c")]`; callers must have checked that the CPU supports
//! [`SimdLevel::Avx512`](crate::SimdLevel::Avx512). Tails (`len % 16 != 0`) use masked loads
//! and stores, which never touch memory in masked-off lanes.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{scalar, Kern};

/// The AVX-512 kernel set.
pub(crate) struct Avx512;

/// Mask with the low `n` (< 16) lanes set; `n >= 16` gives all lanes.
#[inline(always)]
fn mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// `exp(x)` per lane; relative error ~1e-7, exactly 0 for `x < -104`, `inf` above ~88.7,
/// NaN propagates. (Cephes polynomial; `2^n` applied with `vscalefps`.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn exp16(x: __m512) -> __m512 {
    // `min/max(c, x)` return `x` when it is NaN.
    let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
    let x = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let y = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(y, n)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): `i + 16 <= n` (or the masked tail covers `i..n`), and
    // `n <= a.len(), b.len()`.
    while i + 32 <= n {
        unsafe {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                acc1,
            );
        }
        i += 32;
    }
    if i + 16 <= n {
        unsafe {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
        }
        i += 16;
    }
    if i < n {
        let k = mask(n - i);
        unsafe {
            acc1 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(k, pa.add(i)),
                _mm512_maskz_loadu_ps(k, pb.add(i)),
                acc1,
            );
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn max(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `i + 16 <= x.len()`.
        acc = _mm512_max_ps(acc, unsafe { _mm512_loadu_ps(p.add(i)) });
        i += 16;
    }
    if i < n {
        // SAFETY: the mask enables lanes `i..n` only.
        let v = unsafe { _mm512_mask_loadu_ps(acc, mask(n - i), p.add(i)) };
        acc = _mm512_max_ps(acc, v);
    }
    _mm512_reduce_max_ps(acc)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let sh = _mm512_set1_ps(shift);
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `i + 16 <= x.len()`.
        unsafe {
            let v = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), sh));
            _mm512_storeu_ps(p.add(i), v);
            acc = _mm512_add_ps(acc, v);
        }
        i += 16;
    }
    if i < n {
        let k = mask(n - i);
        // SAFETY: the mask enables lanes `i..n` only.
        unsafe {
            let v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), sh));
            let v = _mm512_maskz_mov_ps(k, v);
            _mm512_mask_storeu_ps(p.add(i), k, v);
            acc = _mm512_add_ps(acc, v);
        }
    }
    _mm512_reduce_add_ps(acc)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn sum(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY (loads): `i + 32 <= n`, `i + 16 <= n`, or masked to lanes `i..n`.
    while i + 32 <= n {
        unsafe {
            acc0 = _mm512_add_ps(acc0, _mm512_loadu_ps(p.add(i)));
            acc1 = _mm512_add_ps(acc1, _mm512_loadu_ps(p.add(i + 16)));
        }
        i += 32;
    }
    if i + 16 <= n {
        acc0 = _mm512_add_ps(acc0, unsafe { _mm512_loadu_ps(p.add(i)) });
        i += 16;
    }
    if i < n {
        acc1 = _mm512_add_ps(acc1, unsafe {
            _mm512_maskz_loadu_ps(mask(n - i), p.add(i))
        });
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn sq_dev_sum(x: &[f32], mean: f32) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mv = _mm512_set1_ps(mean);
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY (loads): `i + 32 <= n`, `i + 16 <= n`, or masked to lanes `i..n`.
    while i + 32 <= n {
        unsafe {
            let d0 = _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv);
            let d1 = _mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16)), mv);
            acc0 = _mm512_fmadd_ps(d0, d0, acc0);
            acc1 = _mm512_fmadd_ps(d1, d1, acc1);
        }
        i += 32;
    }
    if i + 16 <= n {
        let d = _mm512_sub_ps(unsafe { _mm512_loadu_ps(p.add(i)) }, mv);
        acc0 = _mm512_fmadd_ps(d, d, acc0);
        i += 16;
    }
    if i < n {
        let k = mask(n - i);
        let d = _mm512_maskz_sub_ps(k, unsafe { _mm512_maskz_loadu_ps(k, p.add(i)) }, mv);
        acc1 = _mm512_fmadd_ps(d, d, acc1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// Loads 16 weights of one storage type as `f32` lanes.
trait Load16: Copy {
    /// Loads 16 elements.
    ///
    /// # Safety
    /// `p` must be valid for reading 16 elements; the CPU must support AVX-512 F/BW/VL.
    unsafe fn load(p: *const Self) -> __m512;
    /// Loads the lanes enabled by `k` (others are zero).
    ///
    /// # Safety
    /// `p + l` must be valid for reading for every lane `l` enabled by `k`; AVX-512 as above.
    unsafe fn load_masked(p: *const Self, k: __mmask16) -> __m512;
}

impl Load16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: guaranteed by the caller (trait contract).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load_masked(p: *const f32, k: __mmask16) -> __m512 {
        // SAFETY: guaranteed by the caller (trait contract).
        unsafe { _mm512_maskz_loadu_ps(k, p) }
    }
}

impl Load16 for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load(p: *const f16) -> __m512 {
        // SAFETY: guaranteed by the caller; `f16` is 2 bytes, so 16 of them are 32 bytes.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) })
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load_masked(p: *const f16, k: __mmask16) -> __m512 {
        // SAFETY: guaranteed by the caller; one 16-bit lane per element.
        _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(k, p.cast()) })
    }
}

impl Load16 for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load(p: *const bf16) -> __m512 {
        // SAFETY: guaranteed by the caller; `bf16` is 2 bytes, so 16 of them are 32 bytes.
        let h = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load_masked(p: *const bf16, k: __mmask16) -> __m512 {
        // SAFETY: guaranteed by the caller; one 16-bit lane per element.
        let h = unsafe { _mm256_maskz_loadu_epi16(k, p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// Computes an `R x M` tile: `out[r * m + i] = dot(w row r, x row i)` (rows of length `k`).
///
/// # Safety
/// `w` must be valid for reading `R * k` elements, `x` for `M * k`, and `out` for writing
/// `out[r * m + i]` for `r < R`, `i < M`; the CPU must support AVX-512 F/BW/VL, FMA, F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn gemv_tile<T: Load16, const R: usize, const M: usize>(
    w: *const T,
    x: *const f32,
    k: usize,
    out: *mut f32,
    m: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let mut p = 0;
    while p + 16 <= k {
        let mut wv = [_mm512_setzero_ps(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            // SAFETY: `r * k + p + 16 <= R * k`.
            *wr = unsafe { T::load(w.add(r * k + p)) };
        }
        let mut xv = [_mm512_setzero_ps(); M];
        for (i, xi) in xv.iter_mut().enumerate() {
            // SAFETY: `i * k + p + 16 <= M * k`.
            *xi = unsafe { _mm512_loadu_ps(x.add(i * k + p)) };
        }
        for (accr, wr) in acc.iter_mut().zip(&wv) {
            for (a, xi) in accr.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(*wr, *xi, *a);
            }
        }
        p += 16;
    }
    if p < k {
        let km = mask(k - p);
        let mut wv = [_mm512_setzero_ps(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            // SAFETY: enabled lanes are `r * k + p + l < (r + 1) * k`.
            *wr = unsafe { T::load_masked(w.add(r * k + p), km) };
        }
        let mut xv = [_mm512_setzero_ps(); M];
        for (i, xi) in xv.iter_mut().enumerate() {
            // SAFETY: enabled lanes are `i * k + p + l < (i + 1) * k`.
            *xi = unsafe { _mm512_maskz_loadu_ps(km, x.add(i * k + p)) };
        }
        for (accr, wr) in acc.iter_mut().zip(&wv) {
            for (a, xi) in accr.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(*wr, *xi, *a);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (i, a) in accr.iter().enumerate() {
            // SAFETY: `r < R`, `i < M`, covered by the caller's contract.
            unsafe { *out.add(r * m + i) = _mm512_reduce_add_ps(*a) };
        }
    }
}

/// Rows of `w` handled together when `m == 1` (more independent memory streams).
const ROWS_M1: usize = 8;
/// Rows of `w` handled together when `m > 1`.
const ROWS: usize = 4;
/// `f32` elements of `x` per block of rows (512 KiB, about a quarter of L2).
const X_BLOCK_ELEMS: usize = 1 << 17;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn gemv<T: Load16>(w: &[T], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
    if m == 0 {
        return;
    }
    if k == 0 {
        out_t.fill(0.0);
        return;
    }
    let rows = out_t.len() / m;
    assert!(
        w.len() >= rows * k && x.len() >= m * k,
        "gemv: inputs too short"
    );
    let (wp, xp, op) = (w.as_ptr(), x.as_ptr(), out_t.as_mut_ptr());
    if m == 1 {
        let mut r = 0;
        while r < rows {
            // SAFETY (all tiles): the tile covers weight rows `r..r + R <= rows`, x rows
            // `i..i + M <= m` and outputs `(r..r + R) * m + (i..i + M)` < `rows * m`, all
            // within the slices checked above.
            unsafe {
                if rows - r >= ROWS_M1 {
                    gemv_tile::<T, ROWS_M1, 1>(wp.add(r * k), xp, k, op.add(r), 1);
                    r += ROWS_M1;
                } else {
                    gemv_tile::<T, 1, 1>(wp.add(r * k), xp, k, op.add(r), 1);
                    r += 1;
                }
            }
        }
        return;
    }
    // Blocks of x rows small enough to stay in L2 while the weight rows stream past.
    let mb = (X_BLOCK_ELEMS / k).max(4).next_multiple_of(4);
    let mut i0 = 0;
    while i0 < m {
        let i1 = m.min(i0 + mb);
        let mut r = 0;
        while r < rows {
            let rr = if rows - r >= ROWS { ROWS } else { 1 };
            let mut i = i0;
            while i < i1 {
                let mm = (i1 - i).min(4);
                let (wt, xt, ot) = (
                    wp.wrapping_add(r * k),
                    xp.wrapping_add(i * k),
                    op.wrapping_add(r * m + i),
                );
                // SAFETY: see the comment on the `m == 1` branch.
                unsafe {
                    match (rr, mm) {
                        (ROWS, 4) => gemv_tile::<T, ROWS, 4>(wt, xt, k, ot, m),
                        (ROWS, 3) => gemv_tile::<T, ROWS, 3>(wt, xt, k, ot, m),
                        (ROWS, 2) => gemv_tile::<T, ROWS, 2>(wt, xt, k, ot, m),
                        (ROWS, _) => gemv_tile::<T, ROWS, 1>(wt, xt, k, ot, m),
                        (_, 4) => gemv_tile::<T, 1, 4>(wt, xt, k, ot, m),
                        (_, 3) => gemv_tile::<T, 1, 3>(wt, xt, k, ot, m),
                        (_, 2) => gemv_tile::<T, 1, 2>(wt, xt, k, ot, m),
                        _ => gemv_tile::<T, 1, 1>(wt, xt, k, ot, m),
                    }
                }
                i += mm;
            }
            r += rr;
        }
        i0 = i1;
    }
}

impl Kern for Avx512 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn head_scores(
        q: &[f32],
        hd: usize,
        keys: &[f32],
        stride: usize,
        n_pos: usize,
        scores: &mut [f32],
        ss: usize,
    ) {
        scalar::head_scores_with(|a, b| dot(a, b), q, hd, keys, stride, n_pos, scores, ss)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn head_mix(
        p: &[f32],
        ss: usize,
        vals: &[f32],
        stride: usize,
        n_pos: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        scalar::head_mix_with(scalar::axpy, p, ss, vals, stride, n_pos, hd, out)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn max(x: &[f32]) -> f32 {
        max(x)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        exp_shift_sum(x, shift)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn scale(x: &mut [f32], s: f32) {
        scalar::scale(x, s)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn sum(x: &[f32]) -> f32 {
        sum(x)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn sq_dev_sum(x: &[f32], mean: f32) -> f32 {
        sq_dev_sum(x, mean)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn ln_apply(
        x: &[f32],
        mean: f32,
        rstd: f32,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        out: &mut [f32],
    ) {
        scalar::ln_apply(x, mean, rstd, gamma, beta, out)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn relu(x: &mut [f32]) {
        scalar::relu(x)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        scalar::bf16_to_f32(src, dst)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn gemv_f32(w: &[f32], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn gemv_f16(w: &[f16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn gemv_bf16(w: &[bf16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
}
