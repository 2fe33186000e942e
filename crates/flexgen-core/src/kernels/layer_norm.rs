//! Layer normalisation.

use rayon::prelude::*;

use super::PAR_MIN_ELEMS;
use crate::error::{check_len, Error, Result};
use crate::simd::{dispatch, ensure_available, simd_level, Kern, SimdLevel};

const OP: &str = "layer_norm";

/// LayerNorm over consecutive rows of length `dim`: `out = (x - mean) / sqrt(var + eps) *
/// gamma + beta`, with the biased variance computed in two passes in `f32` (as PyTorch does).
///
/// `x.len()` must be a multiple of `dim` (and `dim > 0` unless `x` is empty); `gamma` and
/// `beta`, when given, have length `dim` (`None` means `elementwise_affine = false`, i.e.
/// gamma = 1 and beta = 0); `out` has the length of `x`. Rows are spread over rayon threads
/// when there are many.
pub fn layer_norm(
    x: &[f32],
    dim: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    layer_norm_with_level(simd_level(), x, dim, gamma, beta, eps, out)
}

/// [`layer_norm`] at an explicit SIMD level (an error if the CPU lacks it).
pub fn layer_norm_with_level(
    level: SimdLevel,
    x: &[f32],
    dim: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    ensure_available(OP, level)?;
    check_args(x, dim, gamma, beta, out)?;
    if x.is_empty() {
        return Ok(());
    }
    let run = |xs: &[f32], os: &mut [f32]| {
        for (xr, or) in xs.chunks_exact(dim).zip(os.chunks_exact_mut(dim)) {
            // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`.
            dispatch!(level, K => unsafe { row::<K>(xr, gamma, beta, eps, or) })
        }
    };
    let rows = x.len() / dim;
    if x.len() >= PAR_MIN_ELEMS && rows > 1 {
        let per = (PAR_MIN_ELEMS / 4 / dim).max(1) * dim;
        x.par_chunks(per)
            .zip(out.par_chunks_mut(per))
            .for_each(|(xs, os)| run(xs, os));
    } else {
        run(x, out);
    }
    Ok(())
}

/// One row with the primitives of `K`.
///
/// # Safety
/// The CPU must support `K`'s SIMD level.
#[inline]
unsafe fn row<K: Kern>(
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    let n = x.len() as f32;
    // SAFETY: forwarded from the caller.
    unsafe {
        let mean = K::sum(x) / n;
        let var = K::sq_dev_sum(x, mean) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        K::ln_apply(x, mean, rstd, gamma, beta, out);
    }
}

fn check_args(
    x: &[f32],
    dim: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    out: &[f32],
) -> Result<()> {
    if dim == 0 && !x.is_empty() {
        return Err(Error::invalid(OP, "dim must be > 0"));
    }
    if dim > 0 && !x.len().is_multiple_of(dim) {
        return Err(Error::shape(
            OP,
            format!("x length a multiple of dim {dim}"),
            format!("length {}", x.len()),
        ));
    }
    if let Some(g) = gamma {
        check_len(OP, "gamma", g.len(), dim)?;
    }
    if let Some(b) = beta {
        check_len(OP, "beta", b.len(), dim)?;
    }
    check_len(OP, "out", out.len(), x.len())
}

/// Scalar reference for [`layer_norm`] (same arguments and errors).
pub fn layer_norm_ref(
    x: &[f32],
    dim: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    check_args(x, dim, gamma, beta, out)?;
    if x.is_empty() {
        return Ok(());
    }
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = xr.iter().sum::<f32>() / dim as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (j, (o, v)) in or.iter_mut().zip(xr).enumerate() {
            let g = gamma.map_or(1.0, |g| g[j]);
            let b = beta.map_or(0.0, |b| b[j]);
            *o = (v - mean) * rstd * g + b;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, vec_f32};
    use crate::simd::available_levels;
    use proptest::prelude::*;

    #[test]
    fn errors() {
        let x = [0.0; 6];
        let mut out = [0.0; 6];
        assert!(matches!(
            layer_norm(&x, 4, None, None, 1e-5, &mut out),
            Err(Error::ShapeMismatch { op: OP, .. })
        ));
        assert!(matches!(
            layer_norm(&x, 3, Some(&[1.0; 2]), None, 1e-5, &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            layer_norm(&x, 3, None, Some(&[1.0; 4]), 1e-5, &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            layer_norm(&x, 3, None, None, 1e-5, &mut out[..5]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            layer_norm(&x, 0, None, None, 1e-5, &mut out),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(layer_norm(&[], 0, None, None, 1e-5, &mut []).is_ok());
    }

    #[test]
    fn known_values() {
        // Row [1, 2, 3, 4]: mean 2.5, biased var 1.25.
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        layer_norm(&x, 4, Some(&[2.0; 4]), Some(&[1.0; 4]), 0.0, &mut out).unwrap();
        let s = 1.25f32.sqrt();
        let want: Vec<f32> = x.iter().map(|v| (v - 2.5) / s * 2.0 + 1.0).collect();
        assert_close(&out, &want, 1e-6, "known");
    }

    #[test]
    fn large_parallel() {
        let dim = 1000;
        let x: Vec<f32> = (0..dim * 70)
            .map(|i| ((i * 37 % 101) as f32) * 0.1 - 5.0)
            .collect();
        let g: Vec<f32> = (0..dim).map(|i| 1.0 + i as f32 * 1e-3).collect();
        let mut want = vec![0.0; x.len()];
        layer_norm_ref(&x, dim, Some(&g), Some(&g), 1e-5, &mut want).unwrap();
        let mut got = vec![0.0; x.len()];
        layer_norm(&x, dim, Some(&g), Some(&g), 1e-5, &mut got).unwrap();
        assert_close(&got, &want, 1e-4, "large");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_ref(
            (dim, rows, x, g, b) in (1usize..80, 1usize..5).prop_flat_map(|(dim, rows)| {
                (Just(dim), Just(rows), vec_f32(dim * rows), vec_f32(dim), vec_f32(dim))
            }),
            affine in 0usize..4,
            offset in -100.0f32..100.0,
        ) {
            // A shared offset checks the two-pass variance (no cancellation).
            let x: Vec<f32> = x.iter().map(|v| v + offset).collect();
            let gamma = (affine & 1 == 1).then_some(&g[..]);
            let beta = (affine & 2 == 2).then_some(&b[..]);
            let mut want = vec![0.0; x.len()];
            layer_norm_ref(&x, dim, gamma, beta, 1e-5, &mut want).unwrap();
            // A row whose spread is tiny next to its offset is ill-conditioned: summing it in
            // another order moves `x - mean` by ~sqrt(dim) ulps of |x| (rounding errors add
            // up like a random walk), which the output scales by 1/std. Both sides are f32, so
            // the tolerance grows with that condition (found by proptest: dim 3, offset -70).
            let g_max = gamma.map_or(1.0, |g| g.iter().fold(1f32, |a, v| a.max(v.abs())));
            let conditioning = x
                .chunks_exact(dim)
                .map(|r| {
                    let mean = r.iter().sum::<f32>() / dim as f32;
                    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                    let max = r.iter().fold(0f32, |a, v| a.max(v.abs()));
                    4.0 * (dim as f32).sqrt() * max * f32::EPSILON / (var + 1e-5).sqrt() * g_max
                })
                .fold(0f32, f32::max);
            for level in available_levels() {
                let mut got = vec![0.0; x.len()];
                layer_norm_with_level(level, &x, dim, gamma, beta, 1e-5, &mut got).unwrap();
                assert_close(
                    &got,
                    &want,
                    1e-4 + conditioning,
                    &format!("{level} dim {dim} rows {rows}"),
                );
            }
        }
    }
}
