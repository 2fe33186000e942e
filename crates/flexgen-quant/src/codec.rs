//! Quantization of one group: its parameters, its codes, and the byte layout of the codes.
//!
//! A group of `group_size` codes of `b` bits occupies `nb = group_size · b / 8` bytes. Byte
//! `j` holds the codes `j + s·nb` for `s = 0 .. 8/b`, code `s` in bits `s·b .. (s+1)·b`
//! ("split" packing). For 4-bit groups of 64 this puts code `j` in the low nibble and code
//! `j + 32` in the high nibble of byte `j`, so a SIMD kernel expands 16 bytes into the codes of
//! two runs of 16 consecutive values with one widening load and one shift.
//!
//! Decoding is `code as f32 * step + min` in `f32` (a multiply then an add, never fused), in
//! every kernel, so all code paths produce bit-identical dequantized values.

use half::f16;

use crate::config::CompressionConfig;

/// The two `f16` parameters of one group: `x ≈ code · step + min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    /// Distance between consecutive code values (FlexGen stores its reciprocal, `scale`).
    pub step: f16,
    /// Value of code 0.
    pub min: f16,
}

/// The value of `code` in a group with parameters `step`, `min` (already in `f32`).
#[inline(always)]
pub(crate) fn decode_value(code: u8, step: f32, min: f32) -> f32 {
    f32::from(code) * step + min
}

/// Parameters of the group holding `vals` (its real values only: padding is excluded).
///
/// Errors (as a message) when a value is NaN or infinite, or when the minimum or step does not
/// fit in `f16`.
pub(crate) fn group_params(vals: &[f32], cfg: &CompressionConfig) -> Result<GroupParams, String> {
    let (lo, hi, finite) = min_max_finite(vals);
    if !finite {
        let v = vals
            .iter()
            .find(|v| !v.is_finite())
            .copied()
            .unwrap_or(f32::NAN);
        return Err(format!("value {v} is not finite"));
    }
    if vals.is_empty() {
        return Ok(GroupParams {
            step: f16::ZERO,
            min: f16::ZERO,
        });
    }
    let (step, min) = if cfg.symmetric {
        let half_levels = f32::from((cfg.max_code() >> 1).max(1));
        let amax = lo.abs().max(hi.abs());
        let step = f16::from_f32(amax / half_levels);
        (step, f16::from_f32(-half_levels * step.to_f32()))
    } else {
        let min = f16::from_f32(lo);
        let range = (hi - min.to_f32()).max(0.0);
        (f16::from_f32(range / f32::from(cfg.max_code())), min)
    };
    if !step.is_finite() || !min.is_finite() {
        return Err(format!(
            "its range [{lo}, {hi}] does not fit the f16 group parameters (|x| must stay below ~65504)"
        ));
    }
    Ok(GroupParams { step, min })
}

/// `(min, max, all finite)` of `vals` (`(inf, -inf, true)` when empty). Eight independent
/// lanes and compare-select (NaN handling is moot: any NaN makes `all finite` false), so the
/// compiler turns the loop into SIMD min/max instead of scalar IEEE `minNum` chains.
fn min_max_finite(vals: &[f32]) -> (f32, f32, bool) {
    const LANES: usize = 8;
    const EXP: u32 = 0x7f80_0000;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut bad = [0u32; LANES];
    let chunks = vals.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let v = c[i];
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
            bad[i] |= u32::from(v.to_bits() & EXP == EXP);
        }
    }
    for (i, &v) in tail.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        bad[i] |= u32::from(v.to_bits() & EXP == EXP);
    }
    let lo = lo
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let hi = hi
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (lo, hi, bad.iter().all(|&b| b == 0))
}

/// The largest code a group may use (`2^b − 2` in symmetric mode, else `2^b − 1`).
#[inline]
pub(crate) fn top_code(cfg: &CompressionConfig) -> u8 {
    if cfg.symmetric && cfg.num_bits > 1 {
        cfg.max_code() - 1
    } else {
        cfg.max_code()
    }
}

/// `x` rounded to the nearest integer, ties to even, for `0 <= x < 2^23`: adding `2^23` leaves
/// no fraction bits, so the addition itself rounds (in the default rounding mode); unlike
/// `f32::round_ties_even` on the baseline x86-64 target, no library call, and it vectorizes.
/// Clamping before rounding gives the same code as after, since the bounds are integers.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    (x + TWO_23) - TWO_23
}

/// Writes the codes of `vals` (at most `group_size`; the rest are padding with code 0) into
/// `bytes` (`group_bytes` long) with the split packing. The code of `v` is
/// `round((v − min) / step)` (ties to even), clamped to `0..=top`; 0 when `step` is 0 (a
/// constant group).
pub(crate) fn encode_group(
    vals: &[f32],
    p: GroupParams,
    cfg: &CompressionConfig,
    bytes: &mut [u8],
) {
    debug_assert!(vals.len() <= cfg.group_size && bytes.len() == cfg.group_bytes());
    bytes.fill(0);
    let (step, min) = (p.step.to_f32(), p.min.to_f32());
    if step <= 0.0 {
        return; // a constant group: every code is 0
    }
    let top = f32::from(top_code(cfg));
    let bits = u32::from(cfg.num_bits);
    // Value `s * nb + j` goes to byte `j`, bits `s * b ..` (split packing).
    for (s, run) in vals.chunks(bytes.len()).enumerate() {
        let shift = s as u32 * bits;
        for (b, &v) in bytes.iter_mut().zip(run) {
            *b |= (round_small(((v - min) / step).clamp(0.0, top)) as u8) << shift;
        }
    }
}

/// The code of value `i` of a group stored in `bytes`.
#[inline(always)]
pub(crate) fn code_at(bytes: &[u8], num_bits: u8, i: usize) -> u8 {
    let nb = bytes.len();
    let mask = ((1u16 << num_bits) - 1) as u8;
    (bytes[i % nb] >> ((i / nb) as u32 * u32::from(num_bits))) & mask
}

/// Decodes the first `out.len()` values of a group (scalar reference decoder).
pub(crate) fn decode_group(bytes: &[u8], num_bits: u8, p: GroupParams, out: &mut [f32]) {
    let (step, min) = (p.step.to_f32(), p.min.to_f32());
    for (i, o) in out.iter_mut().enumerate() {
        *o = decode_value(code_at(bytes, num_bits, i), step, min);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fast rounding gives the codes of the plain formula (`round_ties_even` after
        /// the division, then the clamp), ties and out-of-range values included.
        #[test]
        fn codes_match_the_plain_formula(
            v in -3.0f32..3.0,
            min in -2.0f32..0.0,
            step in prop_oneof![Just(0.25f32), Just(0.1f32), 1e-6f32..0.5],
            tie in -20i32..300,
        ) {
            let plain = |v: f32, step: f32, min: f32, top: u8| {
                ((v - min) / step).round_ties_even().clamp(0.0, f32::from(top)) as u8
            };
            for bits in [4u8, 8] {
                let c = cfg(bits, 2, false);
                let top = top_code(&c);
                let p = GroupParams { step: f16::from_f32(step), min: f16::from_f32(min) };
                let (st, mn) = (p.step.to_f32(), p.min.to_f32());
                // A value exactly half-way between two codes, where ties-to-even matters.
                let half = mn + (tie as f32 + 0.5) * st;
                for x in [v, half] {
                    let mut bytes = vec![0u8; c.group_bytes()];
                    encode_group(&[x], p, &c, &mut bytes);
                    prop_assert_eq!(code_at(&bytes, bits, 0), plain(x, st, mn, top), "x {}", x);
                }
            }
        }
    }

    fn cfg(bits: u8, gs: usize, sym: bool) -> CompressionConfig {
        CompressionConfig {
            num_bits: bits,
            group_size: gs,
            group_dim: 0,
            symmetric: sym,
        }
    }

    #[test]
    fn flexgen_formula_and_layout() {
        let c = cfg(4, 8, false);
        let vals = [0.0, 1.5, 3.0, 7.5, 15.0, 0.75, 14.9, 8.0];
        let p = group_params(&vals, &c).unwrap();
        assert_eq!((p.step.to_f32(), p.min.to_f32()), (1.0, 0.0));
        let mut bytes = [0u8; 4];
        encode_group(&vals, p, &c, &mut bytes);
        // Codes: 0, 2 (1.5 ties to even), 3, 8 (7.5 -> even), 15, 1 (0.75), 15, 8.
        let codes: Vec<u8> = (0..8).map(|i| code_at(&bytes, 4, i)).collect();
        assert_eq!(codes, [0, 2, 3, 8, 15, 1, 15, 8]);
        // Split packing: byte j = code j | code (j + 4) << 4.
        assert_eq!(bytes, [15 << 4, 2 | 1 << 4, 3 | 15 << 4, 8 | 8 << 4]);
        let mut out = [0.0; 8];
        decode_group(&bytes, 4, p, &mut out);
        assert_eq!(out, [0.0, 2.0, 3.0, 8.0, 15.0, 1.0, 15.0, 8.0]);
    }

    #[test]
    fn constant_groups_and_bad_values() {
        for sym in [false, true] {
            for v in [0.0f32, 3.25, -1e-9] {
                let c = cfg(4, 4, sym);
                let p = group_params(&[v; 3], &c).unwrap();
                let mut bytes = [0u8; 2];
                encode_group(&[v; 3], p, &c, &mut bytes);
                let mut out = [f32::NAN; 3];
                decode_group(&bytes, 4, p, &mut out);
                for o in out {
                    assert!(
                        o.is_finite() && (o - v).abs() <= 1e-3 * v.abs().max(1e-6),
                        "{o} vs {v}"
                    );
                }
            }
        }
        let c = cfg(4, 4, false);
        assert!(group_params(&[1.0, f32::NAN], &c)
            .unwrap_err()
            .contains("not finite"));
        assert!(group_params(&[f32::INFINITY], &c).is_err());
        assert!(group_params(&[-1e6, 1e6], &c).unwrap_err().contains("f16"));
        assert_eq!(group_params(&[], &c).unwrap().step, f16::ZERO);
    }

    #[test]
    fn symmetric_codes_are_centred() {
        let c = cfg(4, 4, true);
        let p = group_params(&[-7.0, 7.0, 0.0, 3.0], &c).unwrap();
        assert_eq!((p.step.to_f32(), p.min.to_f32()), (1.0, -7.0));
        let mut bytes = [0u8; 2];
        encode_group(&[-7.0, 7.0, 0.0, 3.0], p, &c, &mut bytes);
        let codes: Vec<u8> = (0..4).map(|i| code_at(&bytes, 4, i)).collect();
        assert_eq!(codes, [0, 14, 7, 10]);
    }

    #[test]
    fn other_widths_pack() {
        for (bits, gs) in [(1u8, 16usize), (2, 8), (8, 3)] {
            let c = cfg(bits, gs, false);
            // Integers from 0 to 2^b - 1 (step 1): exact in every width.
            let top = f32::from(c.max_code());
            let vals: Vec<f32> = (0..gs)
                .map(|i| {
                    if i == 1 {
                        top
                    } else {
                        (i % (1 << bits)) as f32
                    }
                })
                .collect();
            let p = group_params(&vals, &c).unwrap();
            let mut bytes = vec![0u8; c.group_bytes()];
            encode_group(&vals, p, &c, &mut bytes);
            let mut out = vec![0.0; gs];
            decode_group(&bytes, bits, p, &mut out);
            assert_eq!(out, vals, "{bits} bits");
        }
    }
}
