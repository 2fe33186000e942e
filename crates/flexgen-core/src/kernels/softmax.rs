//! Masked, numerically stable softmax.

use rayon::prelude::*;

use super::PAR_MIN_ELEMS;
use crate::error::{check_len, Error, Result};
use crate::simd::{dispatch, ensure_available, simd_level, Kern, SimdLevel};

const OP: &str = "masked_softmax";

/// In-place softmax over each row of length `cols` of `scores`, where entries with
/// `mask[i] == false` are excluded and set to 0.
///
/// The maximum valid entry is subtracted before exponentiating. A row with no valid entry
/// (or whose valid entries are all `-inf`) becomes all zeros. `mask` has the length of
/// `scores`, which must be a multiple of `cols`.
pub fn masked_softmax(scores: &mut [f32], cols: usize, mask: &[bool]) -> Result<()> {
    masked_softmax_with_level(simd_level(), scores, cols, mask)
}

/// [`masked_softmax`] at an explicit SIMD level (an error if the CPU lacks it).
pub fn masked_softmax_with_level(
    level: SimdLevel,
    scores: &mut [f32],
    cols: usize,
    mask: &[bool],
) -> Result<()> {
    ensure_available(OP, level)?;
    check_args(scores, cols, mask)?;
    if scores.is_empty() {
        return Ok(());
    }
    let run = |s: &mut [f32], m: &[bool]| {
        for (row, mrow) in s.chunks_exact_mut(cols).zip(m.chunks_exact(cols)) {
            for (v, &keep) in row.iter_mut().zip(mrow) {
                if !keep {
                    *v = f32::NEG_INFINITY;
                }
            }
            // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`.
            dispatch!(level, K => unsafe { softmax_row::<K>(row) })
        }
    };
    if scores.len() >= PAR_MIN_ELEMS && scores.len() > cols {
        let per = (PAR_MIN_ELEMS / 4 / cols).max(1) * cols;
        scores
            .par_chunks_mut(per)
            .zip(mask.par_chunks(per))
            .for_each(|(s, m)| run(s, m));
    } else {
        run(scores, mask);
    }
    Ok(())
}

/// Softmax of one row in place; entries equal to `-inf` become exactly 0, and a row whose
/// maximum is `-inf` (or NaN) becomes all zeros.
///
/// # Safety
/// The CPU must support `K`'s SIMD level.
#[inline]
pub(crate) unsafe fn softmax_row<K: Kern>(row: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mx = K::max(row);
        if mx == f32::NEG_INFINITY || mx.is_nan() {
            row.fill(0.0);
            return;
        }
        let sum = K::exp_shift_sum(row, mx);
        K::scale(row, 1.0 / sum);
    }
}

fn check_args(scores: &[f32], cols: usize, mask: &[bool]) -> Result<()> {
    if cols == 0 {
        return if scores.is_empty() {
            check_len(OP, "mask", mask.len(), 0)
        } else {
            Err(Error::invalid(OP, "cols must be > 0"))
        };
    }
    if !scores.len().is_multiple_of(cols) {
        return Err(Error::shape(
            OP,
            format!("scores length a multiple of cols {cols}"),
            format!("length {}", scores.len()),
        ));
    }
    check_len(OP, "mask", mask.len(), scores.len())
}

/// Scalar reference for [`masked_softmax`] (same arguments and errors).
pub fn masked_softmax_ref(scores: &mut [f32], cols: usize, mask: &[bool]) -> Result<()> {
    check_args(scores, cols, mask)?;
    if scores.is_empty() {
        return Ok(());
    }
    for (row, mrow) in scores.chunks_exact_mut(cols).zip(mask.chunks_exact(cols)) {
        let mx = row
            .iter()
            .zip(mrow)
            .filter(|(_, &k)| k)
            .fold(f32::NEG_INFINITY, |a, (&v, _)| a.max(v));
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut sum = 0.0;
        for (v, &k) in row.iter_mut().zip(mrow) {
            *v = if k { (*v - mx).exp() } else { 0.0 };
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::assert_close;
    use crate::simd::available_levels;
    use proptest::prelude::*;

    #[test]
    fn errors_and_edge_rows() {
        let mut s = [0.0; 6];
        assert!(matches!(
            masked_softmax(&mut s, 4, &[true; 6]),
            Err(Error::ShapeMismatch { op: OP, .. })
        ));
        assert!(matches!(
            masked_softmax(&mut s, 3, &[true; 5]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            masked_softmax(&mut s, 0, &[]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(masked_softmax(&mut [], 0, &[]).is_ok());

        for level in available_levels() {
            // Row 0: nothing valid -> zeros. Row 1: one valid -> one-hot. Row 2: -inf only.
            let mut s = [1.0, 2.0, 3.0, 5.0, -7.0, 9.0, f32::NEG_INFINITY, 0.0, 0.0];
            let mask = [false, false, false, false, true, false, true, false, false];
            masked_softmax_with_level(level, &mut s, 3, &mask).unwrap();
            assert_eq!(s, [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], "{level}");
            // Huge spread: tiny probabilities underflow to exactly 0, masked stay 0.
            let mut s = [0.0, -1000.0, 1e30, 3.0];
            masked_softmax_with_level(level, &mut s, 4, &[true, true, false, true]).unwrap();
            assert_eq!(s[1], 0.0);
            assert_eq!(s[2], 0.0);
            assert_close(
                &s,
                &[
                    1.0 / (1.0 + 3f32.exp()),
                    0.0,
                    0.0,
                    3f32.exp() / (1.0 + 3f32.exp()),
                ],
                1e-6,
                "spread",
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_ref(
            (cols, s, m) in (1usize..70, 1usize..5).prop_flat_map(|(cols, rows)| {
                (
                    Just(cols),
                    proptest::collection::vec(-30.0f32..30.0, cols * rows),
                    proptest::collection::vec(proptest::bool::weighted(0.8), cols * rows),
                )
            }),
        ) {
            let mut want = s.clone();
            masked_softmax_ref(&mut want, cols, &m).unwrap();
            for level in available_levels() {
                let mut got = s.clone();
                masked_softmax_with_level(level, &mut got, cols, &m).unwrap();
                assert_close(&got, &want, 1e-5, &format!("{level} cols {cols}"));
                for (g, &keep) in got.iter().zip(&m) {
                    prop_assert!(keep || *g == 0.0);
                }
            }
        }
    }
}
