//! AVX2 + FMA + F16C implementations of the [`Kern`] primitives.
//!
//! Every function here is compiled with `#[target_feature(enable = "avx2,fma,f16c")]`;
//! callers must have checked that the CPU supports
//! [`SimdLevel::Avx2Fma`](crate::SimdLevel::Avx2Fma). `f32` tails use `vmaskmovps`, which
//! does not touch memory in masked-off lanes; `f16`/`bf16` tails use scalar code.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::scalar::{self, WeightElem};
use super::Kern;

/// The AVX2 kernel set.
pub(crate) struct Avx2;

/// Lane mask with the low `n` (clamped to 0..=8) lanes set, for `vmaskmovps`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mask(n: usize) -> __m256i {
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// `exp(x)` per lane; relative error ~1e-7, exactly 0 for `x < -87.3` (true results there
/// are subnormal), accurate up to `x ~ 88.3`, NaN propagates. (Cephes polynomial.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp8(x: __m256) -> __m256 {
    const LO: f32 = -87.33;
    // `min/max(c, x)` return `x` when it is NaN.
    let xc = _mm256_min_ps(_mm256_set1_ps(88.3), x);
    let xc = _mm256_max_ps(_mm256_set1_ps(LO), xc);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let y = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n for n in -126..=127 built directly in the exponent field.
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    let y = _mm256_mul_ps(y, pow2n);
    // Zero where x < LO (including -inf); NaN compares false and is kept.
    _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO)), y)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads): `i + 16 <= n`, `i + 8 <= n`, or masked to lanes `i..n`, with
    // `n <= a.len(), b.len()`.
    while i + 16 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
        }
        i += 16;
    }
    if i + 8 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        }
        i += 8;
    }
    if i < n {
        let k = mask(n - i);
        unsafe {
            acc1 = _mm256_fmadd_ps(
                _mm256_maskload_ps(pa.add(i), k),
                _mm256_maskload_ps(pb.add(i), k),
                acc1,
            );
        }
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn max(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= x.len()`.
        acc = _mm256_max_ps(acc, unsafe { _mm256_loadu_ps(p.add(i)) });
        i += 8;
    }
    let mut m = hmax(acc);
    for &v in &x[i..] {
        if v > m {
            m = v;
        }
    }
    m
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let sh = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= x.len()`.
        unsafe {
            let v = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh));
            _mm256_storeu_ps(p.add(i), v);
            acc = _mm256_add_ps(acc, v);
        }
        i += 8;
    }
    if i < n {
        let k = mask(n - i);
        // SAFETY: the mask enables lanes `i..n` only.
        unsafe {
            let v = exp8(_mm256_sub_ps(_mm256_maskload_ps(p.add(i), k), sh));
            let v = _mm256_and_ps(v, _mm256_castsi256_ps(k));
            _mm256_maskstore_ps(p.add(i), k, v);
            acc = _mm256_add_ps(acc, v);
        }
    }
    hsum(acc)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sum(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (loads): `i + 16 <= n`, `i + 8 <= n`, or masked to lanes `i..n`.
    while i + 16 <= n {
        unsafe {
            acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(p.add(i)));
            acc1 = _mm256_add_ps(acc1, _mm256_loadu_ps(p.add(i + 8)));
        }
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_add_ps(acc0, unsafe { _mm256_loadu_ps(p.add(i)) });
        i += 8;
    }
    if i < n {
        acc1 = _mm256_add_ps(acc1, unsafe { _mm256_maskload_ps(p.add(i), mask(n - i)) });
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sq_dev_sum(x: &[f32], mean: f32) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mv = _mm256_set1_ps(mean);
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (loads): `i + 16 <= n` or `i + 8 <= n`.
    while i + 16 <= n {
        unsafe {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv);
            let d1 = _mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), mv);
            acc0 = _mm256_fmadd_ps(d0, d0, acc0);
            acc1 = _mm256_fmadd_ps(d1, d1, acc1);
        }
        i += 16;
    }
    if i + 8 <= n {
        let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, mv);
        acc0 = _mm256_fmadd_ps(d, d, acc0);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(acc0, acc1));
    for &v in &x[i..] {
        s += (v - mean) * (v - mean);
    }
    s
}

/// Loads 8 weights of one storage type as `f32` lanes.
trait Load8: WeightElem {
    /// Loads 8 elements.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements; the CPU must support AVX2, FMA and F16C.
    unsafe fn load(p: *const Self) -> __m256;
}

impl Load8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: guaranteed by the caller (trait contract).
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Load8 for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const f16) -> __m256 {
        // SAFETY: guaranteed by the caller; 8 `f16` are 16 bytes.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
    }
}

impl Load8 for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const bf16) -> __m256 {
        // SAFETY: guaranteed by the caller; 8 `bf16` are 16 bytes.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Computes an `R x M` tile: `out[r * m + i] = dot(w row r, x row i)` (rows of length `k`).
///
/// # Safety
/// `w` must be valid for reading `R * k` elements, `x` for `M * k`, and `out` for writing
/// `out[r * m + i]` for `r < R`, `i < M`; the CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_tile<T: Load8, const R: usize, const M: usize>(
    w: *const T,
    x: *const f32,
    k: usize,
    out: *mut f32,
    m: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    let mut p = 0;
    while p + 8 <= k {
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            // SAFETY: `r * k + p + 8 <= R * k`.
            *wr = unsafe { T::load(w.add(r * k + p)) };
        }
        let mut xv = [_mm256_setzero_ps(); M];
        for (i, xi) in xv.iter_mut().enumerate() {
            // SAFETY: `i * k + p + 8 <= M * k`.
            *xi = unsafe { _mm256_loadu_ps(x.add(i * k + p)) };
        }
        for (accr, wr) in acc.iter_mut().zip(&wv) {
            for (a, xi) in accr.iter_mut().zip(&xv) {
                *a = _mm256_fmadd_ps(*wr, *xi, *a);
            }
        }
        p += 8;
    }
    for (r, accr) in acc.iter().enumerate() {
        for (i, a) in accr.iter().enumerate() {
            let mut s = hsum(*a);
            for q in p..k {
                // SAFETY: `q < k`, so both reads are inside row `r` / row `i`.
                s += unsafe { (*w.add(r * k + q)).to_f32() * *x.add(i * k + q) };
            }
            // SAFETY: `r < R`, `i < M`, covered by the caller's contract.
            unsafe { *out.add(r * m + i) = s };
        }
    }
}

/// Rows of `w` handled together when `m == 1`.
const ROWS_M1: usize = 8;
/// Rows of `w` handled together when `m > 1`.
const ROWS: usize = 4;
/// `f32` elements of `x` per block of rows (512 KiB, about a quarter of L2).
const X_BLOCK_ELEMS: usize = 1 << 17;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn gemv<T: Load8>(w: &[T], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
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
                let mm = (i1 - i).min(2);
                let (wt, xt, ot) = (
                    wp.wrapping_add(r * k),
                    xp.wrapping_add(i * k),
                    op.wrapping_add(r * m + i),
                );
                // SAFETY: see the comment on the `m == 1` branch.
                unsafe {
                    match (rr, mm) {
                        (ROWS, 2) => gemv_tile::<T, ROWS, 2>(wt, xt, k, ot, m),
                        (ROWS, _) => gemv_tile::<T, ROWS, 1>(wt, xt, k, ot, m),
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

impl Kern for Avx2 {
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn max(x: &[f32]) -> f32 {
        max(x)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        exp_shift_sum(x, shift)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(x: &mut [f32], s: f32) {
        scalar::scale(x, s)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum(x: &[f32]) -> f32 {
        sum(x)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sq_dev_sum(x: &[f32], mean: f32) -> f32 {
        sq_dev_sum(x, mean)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn relu(x: &mut [f32]) {
        scalar::relu(x)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        scalar::bf16_to_f32(src, dst)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemv_f32(w: &[f32], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemv_f16(w: &[f16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemv_bf16(w: &[bf16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
}
