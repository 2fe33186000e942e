//! Linear layer `y = x · Wᵀ + b` with `f32`, `f16` or `bf16` weights.
//!
//! Three algorithms ([`LinearPath`]), chosen by [`linear`] from the number of rows `m`:
//! - **GEMV** (`m < 16` on AVX-512; up to 128/384 rows at lower levels): a SIMD kernel that
//!   streams `W` from memory once per block of `x` rows, converting `f16`/`bf16` to `f32` in
//!   registers, with rayon splitting the output rows. Memory-bound; used for decode. With
//!   bf16 weights on AVX512_BF16 it rounds `x` to bf16 and uses `vdpbf16ps` one weight row
//!   at a time, so the weights stream sequentially (see [`bf16_dot_enabled`]).
//! - **Packed** (AVX-512, `m >= 16`): the packed-panel GEMM of [`super::panel_gemm`]
//!   (register-tiled micro-kernels; bf16 weights use `vdpbf16ps` with `x` rounded to bf16 on
//!   CPUs with AVX512_BF16, see there for the tolerance; everything else is exact `f32`
//!   arithmetic).
//! - **Gemm** (levels below AVX-512, larger `m`): the `gemm` crate on `f32`; half-precision
//!   weights are first converted, in panels of output rows, into a reused `f32` buffer.
//!
//! No path allocates per call once its per-thread buffers have grown to the largest shape.

use std::cell::RefCell;

use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

use super::with_buf;
use crate::dtype::DType;
use crate::error::{check_len, checked_product, Result};
use crate::matrix::{Matrix, Storage};
use crate::panel_matrix::{PanelData, PanelMatrix};
use crate::simd::scalar::WeightElem;
use crate::simd::{dispatch, ensure_available, simd_level, Kern, SimdLevel};
use crate::EnvSwitch;

const OP: &str = "linear";

/// Process-wide choice of [`bf16_dot_enabled`].
static BF16_DOT: EnvSwitch = EnvSwitch::new("FLEXGEN_BF16_DOT", true);

/// Whether products of bf16 weights round `x` to bf16 for `vdpbf16ps` on CPUs with
/// AVX512_BF16 (see [`linear`]), at every `m`. On unless the environment variable
/// `FLEXGEN_BF16_DOT` is `0`, `off`, `false` or `no` at the first call, or after
/// [`set_bf16_dot_enabled`]`(false)`. Off, bf16 weights are converted exactly to `f32` and
/// multiplied with `f32` `x`. Either way a row's result does not depend on how many rows are
/// multiplied with it (up to summation order).
pub fn bf16_dot_enabled() -> bool {
    BF16_DOT.get()
}

/// Turns [`bf16_dot_enabled`] on or off for the whole process (overrides
/// `FLEXGEN_BF16_DOT`).
pub fn set_bf16_dot_enabled(on: bool) {
    BF16_DOT.set(on);
}

/// Largest `m` handled by the GEMV kernel for `f32` weights (above it: `gemm`).
const GEMV_MAX_M_F32: usize = 128;
/// Largest `m` handled by the GEMV kernel for `f16`/`bf16` weights (above it: converted
/// panels + `gemm`).
const GEMV_MAX_M_HALF: usize = 384;

/// Smallest `m` for which the AVX-512 level uses the packed-panel GEMM.
const PACKED_MIN_M: usize = 16;

/// Weight elements converted per GEMM panel for `f16`/`bf16` weights (4 MiB of `f32`).
const PANEL_ELEMS: usize = 1 << 20;

/// `out[m, n] = x[m, k] · Wᵀ + bias`, where `w` is `n x k` (`(out_features, in_features)`),
/// `x` is row-major `m x k`, `out` row-major `m x n`, and `bias` (if any) has length `n`.
///
/// Accumulation is in `f32`; half-precision weights are converted exactly to `f32`. One
/// exception: with `bf16` weights on a CPU with AVX512_BF16 (AVX-512 level), `x` is rounded
/// to bf16 for `vdpbf16ps` (error per output at most about `2^-8 · Σ|x_l w_l|`; set
/// `FLEXGEN_BF16_DOT=0` to keep `x` in `f32`). Returns [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) when a length disagrees.
///
/// ```
/// use flexgen_core::{kernels::linear, Matrix};
/// let w = Matrix::from_f32(2, 3, vec![1., 0., 0., 0., 1., 1.])?;
/// let mut y = [0.0; 2];
/// linear(&[1., 2., 3.], 1, &w, Some(&[0.5, 0.5]), &mut y)?;
/// assert_eq!(y, [1.5, 5.5]);
/// # Ok::<(), flexgen_core::Error>(())
/// ```
pub fn linear(
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    linear_with_level(simd_level(), x, m, w, bias, out)
}

/// [`linear`] at an explicit SIMD level (an error if the CPU lacks it). The level applies
/// to the GEMV path and conversions; the `gemm` crate dispatches on its own.
pub fn linear_with_level(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    linear_with_path(level, choose_path(level, m, w.dtype()), x, m, w, bias, out)
}

/// The algorithm [`linear_with_level`] runs for `m` rows of `x` and weights of `dtype`.
fn choose_path(level: SimdLevel, m: usize, dtype: DType) -> LinearPath {
    if level == SimdLevel::Avx512 && m >= PACKED_MIN_M {
        return LinearPath::Packed;
    }
    let max_gemv = match dtype {
        DType::F32 => GEMV_MAX_M_F32,
        DType::F16 | DType::BF16 => GEMV_MAX_M_HALF,
    };
    if m <= max_gemv {
        LinearPath::Gemv
    } else {
        LinearPath::Gemm
    }
}

/// The algorithms behind [`linear`], for [`linear_with_path`] (benchmarks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearPath {
    /// SIMD GEMV, parallel over output rows.
    Gemv,
    /// The `gemm` crate (with panel conversion for half-precision weights).
    Gemm,
    /// The packed-panel GEMM of [`super::panel_gemm`] (AVX-512 only; at other levels this
    /// runs [`LinearPath::Gemm`]).
    Packed,
}

/// [`linear`] with an explicit SIMD level and algorithm (an error if the CPU lacks the
/// level). Meant for benchmarks and tests; [`linear`] picks the algorithm by `m`.
pub fn linear_with_path(
    level: SimdLevel,
    path: LinearPath,
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    ensure_available(OP, level)?;
    check_args(x, m, w, bias, out)?;
    let (n, k) = (w.rows(), w.cols());
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        fill_bias(out, n, bias);
        return Ok(());
    }
    match path {
        LinearPath::Gemv => gemv(level, x, m, w, bias, out),
        #[cfg(target_arch = "x86_64")]
        LinearPath::Packed if level == SimdLevel::Avx512 => {
            let micro = super::panel_gemm::Micro::for_matrix(w);
            super::panel_gemm::gemm(x, m, w, bias, out, micro)
        }
        LinearPath::Gemm | LinearPath::Packed => gemm_path(level, x, m, w, bias, out),
    }
    Ok(())
}

fn check_args(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &[f32]) -> Result<()> {
    check_dims_of(OP, x, m, w.rows(), w.cols(), bias, out)
}

/// `out` (rows of `n`) set to `bias` (or zero): a product with `k = 0` inputs.
pub(crate) fn fill_bias(out: &mut [f32], n: usize, bias: Option<&[f32]>) {
    for row in out.chunks_exact_mut(n) {
        match bias {
            Some(b) => row.copy_from_slice(b),
            None => row.fill(0.0),
        }
    }
}

/// Argument checks of the linear layer `op` with an `n x k` weight.
pub(crate) fn check_dims_of(
    op: &'static str,
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &[f32],
) -> Result<()> {
    check_len(
        op,
        "x (m * in_features)",
        x.len(),
        checked_product(op, &[m, k])?,
    )?;
    check_len(
        op,
        "out (m * out_features)",
        out.len(),
        checked_product(op, &[m, n])?,
    )?;
    if let Some(b) = bias {
        check_len(op, "bias (out_features)", b.len(), n)?;
    }
    Ok(())
}

/// [`linear`] with prepacked weights ([`PanelMatrix`], see [`Matrix::prepack`]): the same
/// result (the same arithmetic as [`linear`] for the weights' dtype, including the bf16
/// rounding of `x` where `vdpbf16ps` is used — here for every `m`), without repacking the
/// weights per call. Decode (`m` of 1 to 8) streams each 32-feature panel sequentially.
pub fn linear_prepacked(
    x: &[f32],
    m: usize,
    w: &PanelMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    linear_prepacked_with_level(simd_level(), x, m, w, bias, out)
}

/// [`linear_prepacked`] at an explicit SIMD level (an error if the CPU lacks it). Packed
/// weights need AVX-512; at a lower level they are unpacked on every call (slow, meant for
/// tests).
pub fn linear_prepacked_with_level(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    w: &PanelMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    ensure_available(OP, level)?;
    check_dims_of(OP, x, m, w.rows(), w.cols(), bias, out)?;
    if let PanelData::RowMajor(mat) = w.data() {
        return linear_with_level(level, x, m, mat, bias, out);
    }
    #[cfg(target_arch = "x86_64")]
    if level == SimdLevel::Avx512 && m > 0 {
        // Packed implies `rows, cols > 0` (see `PanelMatrix::from_matrix`).
        let micro = super::panel_gemm::Micro::for_panels(w).expect("packed panels");
        super::panel_gemm::gemm_prepacked(x, m, w, bias, out, micro);
        return Ok(());
    }
    linear_with_level(level, x, m, &w.to_matrix(), bias, out)
}

/// GEMV path. Shapes are valid and `m, n, k > 0`.
fn gemv(level: SimdLevel, x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let fill = |out_t: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if let (true, Storage::BF16(d)) = (gemv_rounds_x_to_bf16(level, w), w.storage()) {
            return gemv_bf16_dot_t(x, m, d, w.cols(), bias, out_t);
        }
        gemv_t(level, x, m, w, bias, out_t);
    };
    if m == 1 {
        fill(out);
    } else {
        // The kernels write out transposed (`n x m`) so each task owns a contiguous block.
        let n = w.rows();
        with_scratch(m * n, |out_t| {
            fill(out_t);
            for (j, col) in out_t.chunks_exact(m).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    out[i * n + j] = v;
                }
            }
        });
    }
}

/// Whether the GEMV path rounds `x` to bf16 and uses `vdpbf16ps` (bf16 weights, AVX-512 with
/// AVX512_BF16, [`bf16_dot_enabled`]): the same arithmetic as the packed GEMM uses from 16
/// rows, so with the switch on a row's result does not depend on how many rows are
/// multiplied with it (up to summation order).
#[cfg(target_arch = "x86_64")]
fn gemv_rounds_x_to_bf16(level: SimdLevel, w: &Matrix) -> bool {
    use super::panel_gemm::Micro;
    level == SimdLevel::Avx512 && Micro::for_matrix(w) == Micro::DotNative
}

thread_local! {
    /// `x` rounded to bf16 for [`gemv_bf16_dot_t`], per calling thread.
    static X_BF16: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// [`gemv_t`] for bf16 weights `w` (`n x k`) with `vdpbf16ps`: `x` is rounded to bf16 once,
/// then each thread streams its output features' weight rows one row (or block of rows) at a
/// time.
#[cfg(target_arch = "x86_64")]
fn gemv_bf16_dot_t(
    x: &[f32],
    m: usize,
    w: &[bf16],
    k: usize,
    bias: Option<&[f32]>,
    out_t: &mut [f32],
) {
    with_buf(&X_BF16, m * k, |xb| {
        super::convert::f32_to_bf16(&x[..m * k], xb);
        let xb: &[bf16] = xb;
        par_output_rows(out_t, k, m, bias, |r0, ot| {
            let rows = &w[r0 * k..(r0 + ot.len() / m) * k];
            // SAFETY: `gemv_rounds_x_to_bf16` checked AVX-512 and AVX512_BF16; the kernel
            // checks the lengths.
            unsafe { crate::simd::avx512_gemm::gemv_rows_dot_native(rows, k, xb, m, ot) };
        });
    });
}

/// [`gemv`] into the transposed output `out_t` (`n x m`).
fn gemv_t(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out_t: &mut [f32],
) {
    let k = w.cols();
    par_output_rows(out_t, k, m, bias, |r0, ot| {
        let rows = ot.len() / m;
        let span = r0 * k..(r0 + rows) * k;
        // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`.
        dispatch!(level, K => unsafe {
            match w.storage() {
                Storage::F32(d) => K::gemv_f32(&d[span], k, x, m, ot),
                Storage::F16(d) => K::gemv_f16(&d[span], k, x, m, ot),
                Storage::BF16(d) => K::gemv_bf16(&d[span], k, x, m, ot),
            }
        });
    });
}

/// Runs a row-parallel matrix-vector kernel over the transposed output `out_t` (`n x m`, `n`
/// output features of `k` inputs, `m` rows of `x`): `kernel(r0, block)` fills the block of
/// output features `r0 .. r0 + block.len() / m`; blocks are spread over rayon threads (about
/// four per thread, none under `2^14` weights) unless the product is tiny, and `bias` (one
/// value per output feature) is added to each block afterwards.
pub fn par_output_rows(
    out_t: &mut [f32],
    k: usize,
    m: usize,
    bias: Option<&[f32]>,
    kernel: impl Fn(usize, &mut [f32]) + Sync,
) {
    let n = out_t.len() / m.max(1);
    let task = |(c, ot): (usize, &mut [f32]), chunk_rows: usize| {
        let r0 = c * chunk_rows;
        kernel(r0, ot);
        if let Some(b) = bias {
            for (row, &bj) in ot.chunks_exact_mut(m).zip(&b[r0..]) {
                for v in row {
                    *v += bj;
                }
            }
        }
    };
    if n * k * m < 1 << 16 {
        task((0, out_t), n);
    } else {
        let threads = rayon::current_num_threads().max(1);
        let chunk_rows = n
            .div_ceil(threads * 4)
            .max((1 << 14) / k.max(1))
            .next_multiple_of(8)
            .min(n);
        out_t
            .par_chunks_mut(chunk_rows * m)
            .enumerate()
            .for_each(|c| task(c, chunk_rows));
    }
}

/// GEMM path. Shapes are valid and `m, n, k > 0`.
fn gemm_path(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, k) = (w.rows(), w.cols());
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    match w.storage() {
        // SAFETY: `x` is `m x k`, `d` is `n x k` and `out` is `m x n` (checked), and `out`
        // does not alias the inputs.
        Storage::F32(d) => unsafe { gemm_xwt(m, n, k, x, d, out, n, bias.is_some()) },
        Storage::F16(d) => panels(d, x, m, n, k, bias.is_some(), out, |s, o| {
            f16::convert_slice(s, o)
        }),
        Storage::BF16(d) => panels(d, x, m, n, k, bias.is_some(), out, |s, o| {
            // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`.
            dispatch!(level, K => unsafe { K::bf16_to_f32(s, o) })
        }),
    }
}

/// Converts `w` (`n x k`) in panels of output rows to `f32` and multiplies each panel.
#[allow(clippy::too_many_arguments)]
fn panels<T: WeightElem>(
    w: &[T],
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    out: &mut [f32],
    convert: impl Fn(&[T], &mut [f32]) + Sync,
) {
    let panel_rows = (PANEL_ELEMS / k).clamp(16, n.max(16)).min(n);
    with_scratch(panel_rows * k, |scratch| {
        let mut j0 = 0;
        while j0 < n {
            let p = panel_rows.min(n - j0);
            let dst = &mut scratch[..p * k];
            let src = &w[j0 * k..(j0 + p) * k];
            let per = (1 << 15) / k * k + k;
            dst.par_chunks_mut(per)
                .zip(src.par_chunks(per))
                .for_each(|(d, s)| convert(s, d));
            // SAFETY: `dst` holds rows `j0..j0 + p` of `W` (`p x k`); `out[.., j0..j0 + p]`
            // with row stride `n` lies inside the `m x n` output; no aliasing.
            unsafe { gemm_xwt(m, p, k, x, dst, &mut out[j0..], n, accumulate) };
            j0 += p;
        }
    });
}

/// `out[i * out_rs + j] (+)= sum_l x[i * k + l] * w[j * k + l]` for `i < m`, `j < n`.
///
/// # Safety
/// `x.len() >= m * k`, `w.len() >= n * k`, `out.len() >= (m - 1) * out_rs + n`,
/// `out_rs >= n`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_xwt(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k);
    debug_assert!(out_rs >= n && out.len() >= (m - 1) * out_rs + n);
    // SAFETY: the caller guarantees every accessed element is in bounds: dst (i, j) at
    // `i * out_rs + j`, lhs (i, l) at `i * k + l`, rhs (l, j) = W[j, l] at `j * k + l`.
    // With `read_dst == false` gemm ignores the destination's old contents (alpha).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        )
    }
}

thread_local! {
    /// Per-thread scratch for converted weight panels, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch slice of `len` floats (fresh if this thread's is in use).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buf(&SCRATCH, len, f)
}

/// Whether `linear_with_path(level, path, ..)` rounds `x` to bf16 for the weights `w` (the
/// packed GEMM's `vdpbf16ps` micro-kernel, see [`super::panel_gemm`], and the GEMV).
#[cfg(test)]
pub(crate) fn rounds_x_to_bf16(level: SimdLevel, path: LinearPath, w: &Matrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        gemv_rounds_x_to_bf16(level, w) && matches!(path, LinearPath::Packed | LinearPath::Gemv)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, path, w);
        false
    }
}

/// Scalar reference for [`linear`] (same arguments and errors), accumulating in `f64`.
pub fn linear_ref(
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_args(x, m, w, bias, out)?;
    let (n, k) = (w.rows(), w.cols());
    let wf: Vec<f32> = match w.storage() {
        Storage::F32(d) => d.clone(),
        Storage::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
        Storage::BF16(d) => d.iter().map(|v| bf16::to_f32(*v)).collect(),
    };
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| f64::from(b[j]));
            for l in 0..k {
                s += f64::from(x[i * k + l]) * f64::from(wf[j * k + l]);
            }
            out[i * n + j] = s as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::kernels::testutil::{
        assert_close, assert_within_bf16_rounding, vec_f32, weight_pattern, x_pattern,
    };
    use crate::simd::available_levels;
    use proptest::prelude::*;

    fn tol(k: usize) -> f32 {
        1e-6 * (k as f32).max(10.0)
    }

    const PATHS: [LinearPath; 3] = [LinearPath::Gemv, LinearPath::Gemm, LinearPath::Packed];

    /// [`linear_prepacked`] at every level against `want` (bf16 weights on a CPU with
    /// AVX512_BF16 round `x` at every `m`).
    fn check_prepacked(
        x: &[f32],
        m: usize,
        w: &Matrix,
        bias: Option<&[f32]>,
        want: &[f32],
        what: &str,
    ) {
        let p = w.clone().prepack();
        for level in available_levels() {
            let mut got = vec![f32::NAN; want.len()];
            linear_prepacked_with_level(level, x, m, &p, bias, &mut got).unwrap();
            let what = format!("{what} prepacked {level}");
            if rounds_x_to_bf16(level, LinearPath::Packed, w) && p.is_packed() {
                assert_within_bf16_rounding(&got, want, x, m, w, &what);
            } else {
                assert_close(&got, want, tol(w.cols()), &what);
            }
        }
    }

    /// Runs `path` at `level` (or `linear` itself for `None`) and checks the result against
    /// `want`: within `f32` rounding, or within the documented bound of rounding `x` to
    /// bf16 where that path does so.
    #[allow(clippy::too_many_arguments)]
    fn check(
        run: Option<(SimdLevel, LinearPath)>,
        x: &[f32],
        m: usize,
        w: &Matrix,
        bias: Option<&[f32]>,
        want: &[f32],
        what: &str,
    ) {
        let mut got = vec![f32::NAN; want.len()];
        let (level, path) = run.unwrap_or((simd_level(), choose_path(simd_level(), m, w.dtype())));
        match run {
            Some((level, path)) => linear_with_path(level, path, x, m, w, bias, &mut got).unwrap(),
            None => linear(x, m, w, bias, &mut got).unwrap(),
        }
        if rounds_x_to_bf16(level, path, w) {
            assert_within_bf16_rounding(&got, want, x, m, w, what);
        } else {
            assert_close(&got, want, tol(w.cols()), what);
        }
    }

    #[test]
    fn errors() {
        let w = Matrix::from_f32(3, 2, vec![0.0; 6]).unwrap();
        let mut out = [0.0; 6];
        let p = w.clone().prepack();
        assert!(matches!(
            linear_prepacked(&[0.0; 3], 2, &p, None, &mut out),
            Err(Error::ShapeMismatch { op: OP, .. })
        ));
        assert!(matches!(
            linear_prepacked(&[0.0; 4], 2, &p, Some(&[0.0; 2]), &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(linear_prepacked(&[], 0, &p, None, &mut []).is_ok());
        assert!(matches!(
            linear(&[0.0; 3], 2, &w, None, &mut out),
            Err(Error::ShapeMismatch { op: OP, .. })
        ));
        assert!(matches!(
            linear(&[0.0; 4], 2, &w, None, &mut out[..5]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            linear(&[0.0; 4], 2, &w, Some(&[0.0; 2]), &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            linear(&[], usize::MAX, &w, None, &mut out),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(linear(&[], 0, &w, None, &mut []).is_ok());
        // k == 0: output is the bias.
        let w0 = Matrix::from_f32(3, 0, vec![]).unwrap();
        let mut out = [9.0; 6];
        linear(&[], 2, &w0, Some(&[1.0, 2.0, 3.0]), &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        linear(&[], 2, &w0, None, &mut out).unwrap();
        assert_eq!(out, [0.0; 6]);
    }

    /// Shapes large enough for the parallel GEMV split and several GEMM panels.
    #[test]
    fn large_shapes_all_paths() {
        let (n, k) = (1100, 1001);
        let wdata = weight_pattern(n * k);
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let w = Matrix::from_f32(n, k, wdata.clone()).unwrap().to_dtype(dt);
            for m in [1, 3, 9] {
                let x = x_pattern(m * k);
                let mut want = vec![0.0; m * n];
                linear_ref(&x, m, &w, Some(&bias), &mut want).unwrap();
                for path in PATHS {
                    let run = Some((simd_level(), path));
                    check(
                        run,
                        &x,
                        m,
                        &w,
                        Some(&bias),
                        &want,
                        &format!("{dt} m {m} {path:?}"),
                    );
                }
            }
        }
    }

    /// Enough `x` rows for several row blocks in the GEMV kernels, on every level.
    #[test]
    fn many_rows_all_levels() {
        let (m, n, k) = (300, 13, 1001);
        let wdata = weight_pattern(n * k);
        let x = x_pattern(m * k);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let w = Matrix::from_f32(n, k, wdata.clone()).unwrap().to_dtype(dt);
            let mut want = vec![0.0; m * n];
            linear_ref(&x, m, &w, None, &mut want).unwrap();
            check(None, &x, m, &w, None, &want, &format!("{dt} default"));
            for level in available_levels() {
                for path in PATHS {
                    let what = format!("{level} {dt} {path:?}");
                    check(Some((level, path)), &x, m, &w, None, &want, &what);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_ref(
            (m, n, k, x, wd, b) in (1usize..14, 1usize..40, 1usize..80).prop_flat_map(|(m, n, k)| {
                (Just(m), Just(n), Just(k), vec_f32(m * k), vec_f32(n * k), vec_f32(n))
            }),
            dt in 0usize..3,
            with_bias in any::<bool>(),
        ) {
            let dtype = [DType::F32, DType::F16, DType::BF16][dt];
            let w = Matrix::from_f32(n, k, wd).unwrap().to_dtype(dtype);
            let bias = with_bias.then_some(&b[..]);
            let mut want = vec![0.0; m * n];
            linear_ref(&x, m, &w, bias, &mut want).unwrap();
            check(None, &x, m, &w, bias, &want, "linear");
            check_prepacked(&x, m, &w, bias, &want, "linear");
            for level in available_levels() {
                for path in PATHS {
                    let what = format!("{level} {path:?} {dtype} {m}x{k}x{n}");
                    check(Some((level, path)), &x, m, &w, bias, &want, &what);
                }
            }
        }
    }
}
