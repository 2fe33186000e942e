//! Element-wise activations.

use rayon::prelude::*;

use super::PAR_MIN_ELEMS;
use crate::error::Result;
use crate::simd::{dispatch, ensure_available, simd_level, Kern, SimdLevel};

/// `x = max(x, 0)` in place (NaN and `-0.0` are kept, like `torch.relu`).
pub fn relu_inplace(x: &mut [f32]) {
    relu_level(simd_level(), x);
}

/// [`relu_inplace`] at an explicit SIMD level (an error if the CPU lacks it).
pub fn relu_inplace_with_level(level: SimdLevel, x: &mut [f32]) -> Result<()> {
    ensure_available("relu_inplace", level)?;
    relu_level(level, x);
    Ok(())
}

fn relu_level(level: SimdLevel, x: &mut [f32]) {
    let run = |c: &mut [f32]| {
        // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`.
        dispatch!(level, K => unsafe { K::relu(c) })
    };
    if x.len() >= 4 * PAR_MIN_ELEMS {
        x.par_chunks_mut(PAR_MIN_ELEMS).for_each(run);
    } else {
        run(x);
    }
}

/// Scalar reference for [`relu_inplace`].
pub fn relu_ref(x: &mut [f32]) {
    for v in x {
        if *v < 0.0 {
            *v = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available_levels;
    use proptest::prelude::*;

    #[test]
    fn specials() {
        let src = [-1.0, -0.0, 0.0, f32::NAN, f32::NEG_INFINITY, 2.5];
        for level in available_levels() {
            let mut x = src;
            relu_inplace_with_level(level, &mut x).unwrap();
            assert_eq!(x[0].to_bits(), 0.0f32.to_bits());
            assert_eq!(x[1].to_bits(), (-0.0f32).to_bits());
            assert!(x[3].is_nan());
            assert_eq!(x[4], 0.0);
            assert_eq!(x[5], 2.5);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_ref(v in proptest::collection::vec(-10.0f32..10.0, 0..300)) {
            let mut want = v.clone();
            relu_ref(&mut want);
            for level in available_levels() {
                let mut got = v.clone();
                relu_inplace_with_level(level, &mut got).unwrap();
                prop_assert_eq!(&got, &want);
            }
            let mut got = v.clone();
            relu_inplace(&mut got);
            prop_assert_eq!(&got, &want);
        }
    }
}
