//! Portable implementations of the [`Kern`] primitives.
//!
//! The element-wise helpers here are `#[inline(always)]` so that the AVX2 and AVX-512
//! modules can instantiate them inside `#[target_feature]` functions, where the compiler
//! auto-vectorises them for the wider registers.

use half::{bf16, f16};

use super::Kern;

/// Number of independent accumulators in the portable reductions (lets LLVM vectorise them).
const LANES: usize = 8;

/// Portable kernels (no CPU feature requirements).
pub(crate) struct Scalar;

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Body of [`Kern::head_scores`] given the level's dot product.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_scores_with(
    dot: impl Fn(&[f32], &[f32]) -> f32,
    q: &[f32],
    hd: usize,
    keys: &[f32],
    stride: usize,
    n_pos: usize,
    scores: &mut [f32],
    ss: usize,
) {
    let width = q.len();
    if hd == 0 || n_pos == 0 {
        return;
    }
    for j in 0..n_pos {
        let row = &keys[j * stride..j * stride + width];
        for (h, (qh, kh)) in q.chunks_exact(hd).zip(row.chunks_exact(hd)).enumerate() {
            scores[h * ss + j] = dot(qh, kh);
        }
    }
}

/// Body of [`Kern::head_mix`] given the level's `y += alpha * x`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_mix_with(
    axpy: impl Fn(f32, &[f32], &mut [f32]),
    p: &[f32],
    ss: usize,
    vals: &[f32],
    stride: usize,
    n_pos: usize,
    hd: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    let width = out.len();
    if hd == 0 || n_pos == 0 {
        return;
    }
    for j in 0..n_pos {
        let row = &vals[j * stride..j * stride + width];
        for (h, (oh, vh)) in out
            .chunks_exact_mut(hd)
            .zip(row.chunks_exact(hd))
            .enumerate()
        {
            axpy(p[h * ss + j], vh, oh);
        }
    }
}

#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut c = x.chunks_exact(LANES);
    for v in &mut c {
        for l in 0..LANES {
            acc[l] += v[l];
        }
    }
    acc.iter().sum::<f32>() + c.remainder().iter().sum::<f32>()
}

#[inline(always)]
pub(crate) fn sq_dev_sum(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut c = x.chunks_exact(LANES);
    for v in &mut c {
        for l in 0..LANES {
            let d = v[l] - mean;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>()
        + c.remainder()
            .iter()
            .map(|&v| (v - mean) * (v - mean))
            .sum::<f32>()
}

#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    x.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
pub(crate) fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

#[inline(always)]
pub(crate) fn ln_apply(
    x: &[f32],
    mean: f32,
    rstd: f32,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    out: &mut [f32],
) {
    let n = out.len();
    let x = &x[..n];
    match (gamma, beta) {
        (Some(g), Some(b)) => {
            let (g, b) = (&g[..n], &b[..n]);
            for i in 0..n {
                out[i] = (x[i] - mean) * rstd * g[i] + b[i];
            }
        }
        (Some(g), None) => {
            let g = &g[..n];
            for i in 0..n {
                out[i] = (x[i] - mean) * rstd * g[i];
            }
        }
        (None, Some(b)) => {
            let b = &b[..n];
            for i in 0..n {
                out[i] = (x[i] - mean) * rstd + b[i];
            }
        }
        (None, None) => {
            for i in 0..n {
                out[i] = (x[i] - mean) * rstd;
            }
        }
    }
}

#[inline(always)]
pub(crate) fn relu(x: &mut [f32]) {
    for v in x {
        // `<` keeps NaN and -0.0 unchanged, like `torch.relu`.
        if *v < 0.0 {
            *v = 0.0;
        }
    }
}

#[inline(always)]
pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// Weight element types the GEMV kernels accept.
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    /// Converts a slice to `f32` (lengths must match).
    fn convert_slice(src: &[Self], dst: &mut [f32]);
    /// Converts one element (used for the AVX2 kernels' tails).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn to_f32(self) -> f32;
    /// The slice itself when `Self` is `f32` (no conversion needed).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
}

impl WeightElem for f32 {
    fn convert_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
}

impl WeightElem for f16 {
    fn convert_slice(src: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
}

impl WeightElem for bf16 {
    fn convert_slice(src: &[bf16], dst: &mut [f32]) {
        bf16_to_f32(src, dst);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
}

/// Portable GEMV: converts one weight row at a time into a small buffer, then dots it with
/// every `x` row.
fn gemv<T: WeightElem>(w: &[T], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
    if m == 0 {
        return;
    }
    if k == 0 {
        out_t.fill(0.0);
        return;
    }
    let rows = out_t.len() / m;
    let x = &x[..m * k];
    let mut buf = vec![0.0f32; if T::as_f32(&[]).is_some() { 0 } else { k }];
    for (r, out_row) in out_t.chunks_exact_mut(m).take(rows).enumerate() {
        let src = &w[r * k..(r + 1) * k];
        let row = match T::as_f32(src) {
            Some(row) => row,
            None => {
                T::convert_slice(src, &mut buf);
                &buf
            }
        };
        for (o, xi) in out_row.iter_mut().zip(x.chunks_exact(k)) {
            *o = dot(row, xi);
        }
    }
}

impl Kern for Scalar {
    unsafe fn head_scores(
        q: &[f32],
        hd: usize,
        keys: &[f32],
        stride: usize,
        n_pos: usize,
        scores: &mut [f32],
        ss: usize,
    ) {
        head_scores_with(dot, q, hd, keys, stride, n_pos, scores, ss)
    }
    unsafe fn head_mix(
        p: &[f32],
        ss: usize,
        vals: &[f32],
        stride: usize,
        n_pos: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        head_mix_with(axpy, p, ss, vals, stride, n_pos, hd, out)
    }
    unsafe fn max(x: &[f32]) -> f32 {
        max(x)
    }
    unsafe fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        let mut s = 0.0;
        for v in x {
            *v = (*v - shift).exp();
            s += *v;
        }
        s
    }
    unsafe fn scale(x: &mut [f32], s: f32) {
        scale(x, s)
    }
    unsafe fn sum(x: &[f32]) -> f32 {
        sum(x)
    }
    unsafe fn sq_dev_sum(x: &[f32], mean: f32) -> f32 {
        sq_dev_sum(x, mean)
    }
    unsafe fn ln_apply(
        x: &[f32],
        mean: f32,
        rstd: f32,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        out: &mut [f32],
    ) {
        ln_apply(x, mean, rstd, gamma, beta, out)
    }
    unsafe fn relu(x: &mut [f32]) {
        relu(x)
    }
    unsafe fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        bf16_to_f32(src, dst)
    }
    unsafe fn gemv_f32(w: &[f32], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
    unsafe fn gemv_f16(w: &[f16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
    unsafe fn gemv_bf16(w: &[bf16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
        gemv(w, k, x, m, out_t)
    }
}
