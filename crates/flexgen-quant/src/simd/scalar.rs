//! Portable kernels: decode one group into a buffer with the reference decoder, then multiply.
//! They serve the `Scalar` level and every format without a fused SIMD kernel.

use super::{QKern, Rows};
use crate::codec::{self, GroupParams};

/// The portable kernel set.
pub(crate) struct Scalar;

/// Decodes group `g` of row `r` (its first `out.len()` values).
#[inline]
fn decode(w: &Rows<'_>, r: usize, g: usize, out: &mut [f32]) {
    let gb = w.group_bytes();
    let c = r * w.code_stride + g * gb;
    let p = r * w.param_stride + 2 * g;
    let params = GroupParams {
        step: w.params[p],
        min: w.params[p + 1],
    };
    codec::decode_group(&w.codes[c..c + gb], w.bits, params, out);
}

/// See [`QKern::gemv`].
pub(crate) fn gemv(w: Rows<'_>, x: &[f32], m: usize, out_t: &mut [f32]) {
    w.assert_in_bounds();
    let k = w.cols;
    assert!(
        x.len() >= m * k && out_t.len() >= w.rows * m,
        "gemv: buffers too short"
    );
    let mut buf = vec![0f32; w.gs];
    for r in 0..w.rows {
        let out = &mut out_t[r * m..(r + 1) * m];
        out.fill(0.0);
        for g in 0..w.groups() {
            let l0 = g * w.gs;
            let len = w.gs.min(k - l0);
            decode(&w, r, g, &mut buf[..len]);
            for (i, o) in out.iter_mut().enumerate() {
                let xs = &x[i * k + l0..i * k + l0 + len];
                *o += buf[..len].iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    }
}

/// See [`QKern::dequant`].
pub(crate) fn dequant(w: Rows<'_>, out: &mut [f32]) {
    w.assert_in_bounds();
    let k = w.cols;
    for r in 0..w.rows {
        for (g, chunk) in out[r * k..(r + 1) * k].chunks_mut(w.gs).enumerate() {
            decode(&w, r, g, chunk);
        }
    }
}

/// See [`QKern::axpy`].
pub(crate) fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]) {
    w.assert_in_bounds();
    let k = w.cols;
    let mut buf = vec![0f32; w.gs];
    for (r, &pr) in p.iter().enumerate().take(w.rows) {
        if pr == 0.0 {
            continue;
        }
        for g in 0..w.groups() {
            let l0 = g * w.gs;
            let len = w.gs.min(k - l0);
            decode(&w, r, g, &mut buf[..len]);
            for (o, &v) in out[l0..l0 + len].iter_mut().zip(&buf[..len]) {
                *o += pr * v;
            }
        }
    }
}

impl QKern for Scalar {
    unsafe fn gemv(w: Rows<'_>, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, x, m, out_t)
    }
    unsafe fn dequant(w: Rows<'_>, out: &mut [f32]) {
        dequant(w, out)
    }
    unsafe fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]) {
        axpy(p, w, out)
    }
}
