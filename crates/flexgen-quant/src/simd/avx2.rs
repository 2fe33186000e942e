//! AVX2 + FMA + F16C fused kernels over packed rows (8 lanes).
//!
//! Codes are widened to dwords (8 bytes at a time), the 4-bit ones split into low and high
//! nibbles with a mask and a shift, converted with `vcvtdq2ps` and dequantized as
//! `q · step + min` (a multiply then an add, like the reference decoder), then accumulated with
//! FMA. Same tiling as the AVX-512 kernels.

use std::arch::x86_64::*;

use half::f16;

use super::{padded_tails, scalar, QKern, Rows};

/// The AVX2 kernel set.
pub(crate) struct Avx2;

/// Rows of `W` per tile.
const ROWS: usize = 4;
/// `f32` elements of `x` per block of rows.
const X_BLOCK_ELEMS: usize = 1 << 17;

/// `(step, min)` of the group whose parameters start at `p`, broadcast to all lanes.
///
/// # Safety
/// `p` must be valid for reading two `f16`; the CPU must support AVX2 and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn params(p: *const f16) -> (__m256, __m256) {
    // SAFETY: the caller guarantees two readable `f16` (4 bytes) at `p`.
    let raw = unsafe { p.cast::<u32>().read_unaligned() };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(raw as i32));
    (
        _mm256_broadcastss_ps(v),
        _mm256_broadcastss_ps(_mm_movehdup_ps(v)),
    )
}

/// 8 code bytes at `p` widened to dwords.
///
/// # Safety
/// `p` must be valid for reading 8 bytes; AVX2 as above.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen8(p: *const u8) -> __m256i {
    // SAFETY: forwarded from the caller.
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p.cast()) })
}

/// `q · step + min` for 8 dword codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode(q: __m256i, step: __m256, min: __m256) -> __m256 {
    _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), step), min)
}

/// The low and high nibbles of 8 widened 4-bit code bytes, dequantized.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode4(v: __m256i, step: __m256, min: __m256) -> (__m256, __m256) {
    let lo = _mm256_and_si256(v, _mm256_set1_epi32(15));
    let hi = _mm256_srli_epi32::<4>(v);
    (decode(lo, step, min), decode(hi, step, min))
}

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// An `R x M` tile of [`QKern::gemv`]; arguments and contract as in the AVX-512 version.
///
/// # Safety
/// As for the AVX-512 `tile`, with AVX2/FMA/F16C support.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    for g in 0..w.groups() {
        let (xg, xs) = if g < full {
            (x.wrapping_add(g * gs), k)
        } else {
            (xt, gs)
        };
        let mut step = [_mm256_setzero_ps(); R];
        let mut min = [_mm256_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: row r < R, group g < groups: inside the caller's rows.
            (step[r], min[r]) = unsafe { params(wp.add(r * w.param_stride + 2 * g)) };
        }
        let cg = g * gb;
        if BITS == 4 {
            let mut t = 0;
            while t < gb {
                let mut lo = [_mm256_setzero_ps(); R];
                let mut hi = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    // SAFETY: bytes `cg + t .. cg + t + 8 <= (g + 1) * gb` of row r.
                    let v = unsafe { widen8(wc.add(r * w.code_stride + cg + t)) };
                    (lo[r], hi[r]) = decode4(v, step[r], min[r]);
                }
                for i in 0..M {
                    // SAFETY: values `t .. t + 8` and `gb + t .. gb + t + 8` of the group.
                    let (xl, xh) = unsafe {
                        (
                            _mm256_loadu_ps(xg.add(i * xs + t)),
                            _mm256_loadu_ps(xg.add(i * xs + gb + t)),
                        )
                    };
                    for r in 0..R {
                        acc[r][i] = _mm256_fmadd_ps(lo[r], xl, acc[r][i]);
                        acc[r][i] = _mm256_fmadd_ps(hi[r], xh, acc[r][i]);
                    }
                }
                t += 8;
            }
        } else {
            let mut t = 0;
            while t < gs {
                let mut wv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    // SAFETY: bytes `cg + t .. cg + t + 8 <= (g + 1) * gs` of row r.
                    let v = unsafe { widen8(wc.add(r * w.code_stride + cg + t)) };
                    wv[r] = decode(v, step[r], min[r]);
                }
                for i in 0..M {
                    // SAFETY: values `t .. t + 8` of the group.
                    let xv = unsafe { _mm256_loadu_ps(xg.add(i * xs + t)) };
                    for r in 0..R {
                        acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
                    }
                }
                t += 8;
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (i, a) in accr.iter().enumerate() {
            // SAFETY: `r < R`, `i < M`: covered by the caller's contract.
            unsafe { *out.add(r * m + i) = hsum(*a) };
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mb = (X_BLOCK_ELEMS / k.max(1)).max(4).next_multiple_of(4);
    let mut i0 = 0;
    while i0 < m {
        let i1 = m.min(i0 + mb);
        let mut r = 0;
        while r < rows {
            let rr = if rows - r >= ROWS { ROWS } else { 1 };
            let (c, p) = (
                wc.wrapping_add(r * w.code_stride),
                wp.wrapping_add(r * w.param_stride),
            );
            let mut i = i0;
            while i < i1 {
                let mm = (i1 - i).min(2);
                let (xi, ti, oi) = (
                    xp.wrapping_add(i * k),
                    tp.wrapping_add(i * w.gs),
                    op.wrapping_add(r * m + i),
                );
                // SAFETY: rows `r .. r + rr <= rows` are in bounds (the caller ran
                // `assert_in_bounds`), x rows `i .. i + mm <= m`, out_t holds `rows * m`.
                unsafe {
                    match (rr, mm) {
                        (ROWS, 2) => tile::<BITS, ROWS, 2>(&w, c, p, xi, ti, oi, m),
                        (ROWS, _) => tile::<BITS, ROWS, 1>(&w, c, p, xi, ti, oi, m),
                        (_, 2) => tile::<BITS, 1, 2>(&w, c, p, xi, ti, oi, m),
                        _ => tile::<BITS, 1, 1>(&w, c, p, xi, ti, oi, m),
                    }
                }
                i += mm;
            }
            r += rr;
        }
        i0 = i1;
    }
}

/// Dequantizes the full groups of every row with SIMD and the ragged tail with the reference
/// decoder.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
                let mut t = 0;
                if w.bits == 4 {
                    while t < gb {
                        let (lo, hi) = decode4(widen8(c.add(t)), step, min);
                        _mm256_storeu_ps(o.add(t), lo);
                        _mm256_storeu_ps(o.add(gb + t), hi);
                        t += 8;
                    }
                } else {
                    while t < gs {
                        _mm256_storeu_ps(o.add(t), decode(widen8(c.add(t)), step, min));
                        t += 8;
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

/// `out += Σ_r p[r] · W[r]`; ragged tails use the reference decoder.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]) {
    let (k, gs, gb) = (w.cols, w.gs, w.group_bytes());
    let full = k / gs;
    assert!(out.len() >= k, "axpy: out too short");
    let op = out.as_mut_ptr();
    for (r, &pr) in p.iter().enumerate().take(w.rows) {
        if pr == 0.0 {
            continue;
        }
        let pv = _mm256_set1_ps(pr);
        for g in 0..full {
            let c = w.codes[r * w.code_stride + g * gb..][..gb].as_ptr();
            let pp = w.params[r * w.param_stride + 2 * g..][..2].as_ptr();
            // SAFETY: as in `dequant`; `out` holds at least `k` values.
            unsafe {
                let (step, min) = params(pp);
                let o = op.add(g * gs);
                let mut t = 0;
                if w.bits == 4 {
                    while t < gb {
                        let (lo, hi) = decode4(widen8(c.add(t)), step, min);
                        let (ol, oh) = (o.add(t), o.add(gb + t));
                        _mm256_storeu_ps(ol, _mm256_fmadd_ps(pv, lo, _mm256_loadu_ps(ol)));
                        _mm256_storeu_ps(oh, _mm256_fmadd_ps(pv, hi, _mm256_loadu_ps(oh)));
                        t += 8;
                    }
                } else {
                    while t < gs {
                        let wv = decode(widen8(c.add(t)), step, min);
                        let ot = o.add(t);
                        _mm256_storeu_ps(ot, _mm256_fmadd_ps(pv, wv, _mm256_loadu_ps(ot)));
                        t += 8;
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

impl QKern for Avx2 {
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequant(w: Rows<'_>, out: &mut [f32]) {
        if !w.fused() {
            return scalar::dequant(w, out);
        }
        w.assert_in_bounds();
        dequant(w, out)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]) {
        if !w.fused() {
            return scalar::axpy(p, w, out);
        }
        w.assert_in_bounds();
        axpy(p, w, out)
    }
}
