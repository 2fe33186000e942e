//! Element-type conversions and small helpers.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::{check_len, Result};
use crate::simd::{dispatch, ensure_available, simd_level, Kern, SimdLevel};

/// Converts `f16` to `f32` (exact), using F16C when the CPU has it (via `half`).
///
/// # Panics
/// If `src.len() != dst.len()` (like `copy_from_slice`).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

/// Converts `bf16` to `f32` (exact: a 16-bit shift), vectorised for the current SIMD level.
///
/// # Panics
/// If `src.len() != dst.len()` (like `copy_from_slice`).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16_to_f32: length mismatch");
    bf16_to_f32_level(simd_level(), src, dst);
}

/// [`bf16_to_f32`] at an explicit SIMD level; errors on a length mismatch or a level the
/// CPU lacks.
pub fn bf16_to_f32_with_level(level: SimdLevel, src: &[bf16], dst: &mut [f32]) -> Result<()> {
    ensure_available("bf16_to_f32", level)?;
    check_len("bf16_to_f32", "dst", dst.len(), src.len())?;
    bf16_to_f32_level(level, src, dst);
    Ok(())
}

fn bf16_to_f32_level(level: SimdLevel, src: &[bf16], dst: &mut [f32]) {
    // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`.
    dispatch!(level, K => unsafe { K::bf16_to_f32(src, dst) })
}

/// Converts `f32` to `f16`, rounding to nearest (ties to even).
///
/// # Panics
/// If `src.len() != dst.len()`.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

/// Converts `f32` to `bf16`, rounding to nearest (ties to even); NaN stays NaN.
///
/// # Panics
/// If `src.len() != dst.len()`.
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    dst.convert_from_f32_slice(src);
}

/// Index of the first maximum of `x`, ignoring NaN; `None` if `x` is empty or all NaN.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available_levels;
    use proptest::prelude::*;

    #[test]
    fn argmax_cases() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, 0.5]), Some(3));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
        assert_eq!(argmax(&[0.0, f32::INFINITY, 1.0]), Some(1));
    }

    #[test]
    fn conversion_errors_and_specials() {
        let src = [bf16::from_f32(1.5), bf16::NAN, bf16::NEG_INFINITY];
        let mut dst = [0.0; 3];
        for level in available_levels() {
            bf16_to_f32_with_level(level, &src, &mut dst).unwrap();
            assert_eq!(dst[0], 1.5);
            assert!(dst[1].is_nan());
            assert_eq!(dst[2], f32::NEG_INFINITY);
            assert!(bf16_to_f32_with_level(level, &src, &mut [0.0; 2]).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn bf16_and_f16_match_half(v in proptest::collection::vec(-1e4f32..1e4, 0..100)) {
            let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let mut out = vec![0.0; v.len()];
            for level in available_levels() {
                bf16_to_f32_with_level(level, &b, &mut out).unwrap();
                for (o, x) in out.iter().zip(&b) {
                    prop_assert_eq!(o.to_bits(), x.to_f32().to_bits());
                }
            }
            bf16_to_f32(&b, &mut out);
            for (o, x) in out.iter().zip(&b) {
                prop_assert_eq!(o.to_bits(), x.to_f32().to_bits());
            }
            f16_to_f32(&h, &mut out);
            for (o, x) in out.iter().zip(&h) {
                prop_assert_eq!(o.to_bits(), x.to_f32().to_bits());
            }
            let mut back = vec![bf16::ZERO; v.len()];
            f32_to_bf16(&v, &mut back);
            prop_assert_eq!(&back, &b);
            let mut back = vec![f16::ZERO; v.len()];
            f32_to_f16(&v, &mut back);
            prop_assert_eq!(&back, &h);
        }
    }
}
