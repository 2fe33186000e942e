//! [`QuantizedTensor`]: a tensor of any rank compressed group-wise along one dimension.

use half::f16;
use rayon::prelude::*;

use crate::codec::{self, GroupParams};
use crate::config::CompressionConfig;
use crate::error::{check_len, checked_product, Error, Result};

/// Lines (group_dim vectors) per rayon task in [`QuantizedTensor::compress`] and
/// [`QuantizedTensor::decompress`].
const LINES_PER_TASK: usize = 256;

/// A tensor stored as packed `num_bits`-bit codes plus per-group `(step, min)` in `f16`.
///
/// Layout: view the tensor as `[outer, n, inner]` with `n = shape[group_dim]`. Each *line*
/// `(o, i)` (the `n` values at stride `inner`) is cut into `groups_per_line = ceil(n /
/// group_size)` groups, the last padded. Line `l = o · inner + i`, group `g` has its codes at
/// bytes `(l · groups_per_line + g) · group_bytes ..` (split packing, see
/// [`crate::codec`]) and its parameters at `params[2 (l · groups_per_line + g) ..][..2]` =
/// `[step, min]`. For a 2-D `(out, in)` weight with `group_dim = 1`, lines are rows, and each
/// row's groups are contiguous: that is the layout [`crate::linear_packed`] reads.
///
/// ```
/// use flexgen_quant::{CompressionConfig, QuantizedTensor};
///
/// let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
/// let q = QuantizedTensor::compress(&x, &[3, 100], CompressionConfig::WEIGHT_4BIT)?;
/// assert_eq!(q.groups_per_line(), 2); // 100 = 64 + 36 (padded)
/// let y = q.decompress();
/// assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 0.07));
/// assert_eq!(q.nbytes(), 3 * 2 * (32 + 4)); // 6 groups: 32 code bytes + two f16 each
/// # Ok::<(), flexgen_quant::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    shape: Vec<usize>,
    config: CompressionConfig,
    codes: Vec<u8>,
    params: Vec<f16>,
}

/// `[outer, n, inner]` view of a shape around `dim`.
fn split_shape(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

impl QuantizedTensor {
    /// Compresses `data`, a row-major tensor of `shape`, with `config`.
    ///
    /// Errors: [`Error::Config`] for an invalid config (or `group_dim >= shape.len()`),
    /// [`Error::ShapeMismatch`] when `data.len()` is not the product of `shape`,
    /// [`Error::Value`] for a NaN or infinite value or a group whose range does not fit `f16`.
    pub fn compress(data: &[f32], shape: &[usize], config: CompressionConfig) -> Result<Self> {
        const OP: &str = "QuantizedTensor::compress";
        config.validate_for_rank(shape.len())?;
        let total = checked_product(OP, shape)?;
        check_len(OP, "data", data.len(), total)?;
        let (outer, n, inner) = split_shape(shape, config.group_dim);
        let gpl = n.div_ceil(config.group_size);
        let lines = outer * inner;
        let gb = config.group_bytes();
        let mut codes = vec![0u8; lines * gpl * gb];
        let mut params = vec![f16::ZERO; lines * gpl * 2];
        if lines * gpl > 0 {
            codes
                .par_chunks_mut(LINES_PER_TASK * gpl * gb)
                .zip(params.par_chunks_mut(LINES_PER_TASK * gpl * 2))
                .enumerate()
                .try_for_each(|(task, (cchunk, pchunk))| {
                    let mut buf = vec![0f32; config.group_size];
                    let first = task * LINES_PER_TASK;
                    for (li, (lc, lp)) in cchunk
                        .chunks_exact_mut(gpl * gb)
                        .zip(pchunk.chunks_exact_mut(gpl * 2))
                        .enumerate()
                    {
                        let line = first + li;
                        let (o, i) = (line / inner, line % inner);
                        let base = o * n * inner + i;
                        for g in 0..gpl {
                            let start = g * config.group_size;
                            let len = config.group_size.min(n - start);
                            let vals = &mut buf[..len];
                            for (t, v) in vals.iter_mut().enumerate() {
                                *v = data[base + (start + t) * inner];
                            }
                            let p = codec::group_params(vals, &config).map_err(|msg| {
                                Error::Value {
                                    what: format!(
                                        "group {g} of line {line} (group_dim {}) of tensor {shape:?}",
                                        config.group_dim
                                    ),
                                    msg,
                                }
                            })?;
                            codec::encode_group(vals, p, &config, &mut lc[g * gb..(g + 1) * gb]);
                            lp[2 * g] = p.step;
                            lp[2 * g + 1] = p.min;
                        }
                    }
                    Ok::<(), Error>(())
                })?;
        }
        Ok(QuantizedTensor {
            shape: shape.to_vec(),
            config,
            codes,
            params,
        })
    }

    /// Compresses a [`flexgen_core::Matrix`] (any storage dtype), e.g. a `(out, in)` weight.
    pub fn from_matrix(m: &flexgen_core::Matrix, config: CompressionConfig) -> Result<Self> {
        Self::compress(&m.to_f32_vec(), &[m.rows(), m.cols()], config)
    }

    /// The dequantized tensor, row-major in the original shape.
    pub fn decompress(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.decompress_into(&mut out)
            .expect("buffer sized from the tensor's own shape");
        out
    }

    /// Dequantizes into `out` (`numel()` long), reusing a caller's buffer.
    pub fn decompress_into(&self, out: &mut [f32]) -> Result<()> {
        check_len(
            "QuantizedTensor::decompress_into",
            "out",
            out.len(),
            self.numel(),
        )?;
        let (outer, n, inner) = split_shape(&self.shape, self.config.group_dim);
        let (gpl, gb, gs) = (
            self.groups_per_line(),
            self.config.group_bytes(),
            self.config.group_size,
        );
        let bits = self.config.num_bits;
        if inner == 1 {
            // Lines are contiguous rows: decode them in parallel.
            if n == 0 {
                return Ok(());
            }
            out.par_chunks_mut(n * LINES_PER_TASK.min(outer.max(1)))
                .enumerate()
                .for_each(|(task, chunk)| {
                    let first = task * LINES_PER_TASK.min(outer.max(1));
                    for (li, row) in chunk.chunks_exact_mut(n).enumerate() {
                        self.decode_line(first + li, row);
                    }
                });
            return Ok(());
        }
        let mut buf = vec![0f32; gs];
        for line in 0..outer * inner {
            let (o, i) = (line / inner, line % inner);
            let base = o * n * inner + i;
            for g in 0..gpl {
                let start = g * gs;
                let len = gs.min(n - start);
                let gi = line * gpl + g;
                let p = self.group_params(gi);
                codec::decode_group(
                    &self.codes[gi * gb..(gi + 1) * gb],
                    bits,
                    p,
                    &mut buf[..len],
                );
                for (t, &v) in buf[..len].iter().enumerate() {
                    out[base + (start + t) * inner] = v;
                }
            }
        }
        Ok(())
    }

    /// Decodes line `line` (its `n` values) into `out` with the scalar reference decoder.
    pub(crate) fn decode_line(&self, line: usize, out: &mut [f32]) {
        let (gpl, gb, gs) = (
            self.groups_per_line(),
            self.config.group_bytes(),
            self.config.group_size,
        );
        for (g, chunk) in out.chunks_mut(gs).enumerate() {
            let gi = line * gpl + g;
            codec::decode_group(
                &self.codes[gi * gb..(gi + 1) * gb],
                self.config.num_bits,
                self.group_params(gi),
                chunk,
            );
        }
    }

    /// Parameters of group `gi` (global group index).
    pub fn group_params(&self, gi: usize) -> GroupParams {
        GroupParams {
            step: self.params[2 * gi],
            min: self.params[2 * gi + 1],
        }
    }

    /// The original shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The compression settings.
    pub fn config(&self) -> &CompressionConfig {
        &self.config
    }

    /// Number of values of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Groups per line (`ceil(shape[group_dim] / group_size)`).
    pub fn groups_per_line(&self) -> usize {
        self.shape[self.config.group_dim].div_ceil(self.config.group_size)
    }

    /// The packed codes (layout in the type docs).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The `[step, min]` pairs of every group, in group order.
    pub fn params(&self) -> &[f16] {
        &self.params
    }

    /// Bytes of codes plus parameters (the heap memory the tensor holds, up to `Vec` slack).
    pub fn nbytes(&self) -> usize {
        self.codes.len() + self.params.len() * 2
    }

    /// Rebuilds a tensor from the parts [`QuantizedTensor::into_parts`] gave (e.g. read back
    /// from a file by the offload runtime). Checks the config against the shape and the codes'
    /// and parameters' lengths against the layout; the values themselves are trusted.
    pub fn from_parts(
        shape: Vec<usize>,
        config: CompressionConfig,
        codes: Vec<u8>,
        params: Vec<f16>,
    ) -> Result<Self> {
        const OP: &str = "QuantizedTensor::from_parts";
        config.validate_for_rank(shape.len())?;
        checked_product(OP, &shape)?;
        let (outer, n, inner) = split_shape(&shape, config.group_dim);
        let groups = checked_product(OP, &[outer, inner, n.div_ceil(config.group_size)])?;
        check_len(OP, "codes", codes.len(), groups * config.group_bytes())?;
        check_len(OP, "params", params.len(), groups * 2)?;
        Ok(QuantizedTensor {
            shape,
            config,
            codes,
            params,
        })
    }

    /// Splits the tensor into `(shape, config, codes, params)`, e.g. to reuse its buffers.
    pub fn into_parts(self) -> (Vec<usize>, CompressionConfig, Vec<u8>, Vec<f16>) {
        (self.shape, self.config, self.codes, self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Per-element bound: half a step plus what rounding the parameters to f16 can add.
    fn bound(vals: &[f32], p: GroupParams, cfg: &CompressionConfig) -> f64 {
        let (lo, hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(f64::from(v)), b.max(f64::from(v)))
            });
        let (step, min) = (f64::from(p.step.to_f32()), f64::from(p.min.to_f32()));
        let (exact_step, exact_min, levels) = if cfg.symmetric {
            let b = f64::from(cfg.max_code() >> 1);
            let amax = lo.abs().max(hi.abs());
            (amax / b, -amax, 2.0 * b)
        } else {
            let l = f64::from(cfg.max_code());
            ((hi - lo) / l, lo, l)
        };
        0.5 * step
            + (min - exact_min).abs()
            + levels * (step - exact_step).abs()
            + 1e-6 * lo.abs().max(hi.abs())
    }

    fn check_roundtrip(data: &[f32], shape: &[usize], cfg: CompressionConfig) {
        let q = QuantizedTensor::compress(data, shape, cfg).unwrap();
        let y = q.decompress();
        let (outer, n, inner) = split_shape(shape, cfg.group_dim);
        let gpl = q.groups_per_line();
        assert_eq!(q.codes().len(), outer * inner * gpl * cfg.group_bytes());
        for line in 0..outer * inner {
            let (o, i) = (line / inner, line % inner);
            for g in 0..gpl {
                let idx: Vec<usize> = (g * cfg.group_size..n.min((g + 1) * cfg.group_size))
                    .map(|t| o * n * inner + t * inner + i)
                    .collect();
                let vals: Vec<f32> = idx.iter().map(|&j| data[j]).collect();
                let tol = bound(&vals, q.group_params(line * gpl + g), &cfg);
                for &j in &idx {
                    let err = f64::from((y[j] - data[j]).abs());
                    assert!(
                        err <= tol,
                        "{cfg} shape {shape:?} elem {j}: {} -> {} (err {err}, bound {tol})",
                        data[j],
                        y[j]
                    );
                }
            }
        }
    }

    #[test]
    fn errors() {
        let c = CompressionConfig::WEIGHT_4BIT;
        assert!(matches!(
            QuantizedTensor::compress(&[0.0; 5], &[2, 3], c),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            QuantizedTensor::compress(&[0.0; 6], &[6], c),
            Err(Error::Config { .. })
        ));
        let e = QuantizedTensor::compress(&[0.0, f32::NAN, 1.0, 2.0], &[2, 2], c).unwrap_err();
        assert!(e.to_string().contains("group 0 of line 0"), "{e}");
        let q = QuantizedTensor::compress(&[], &[0, 5], c).unwrap();
        assert_eq!((q.numel(), q.nbytes()), (0, 0));
        assert!(q.decompress().is_empty());
        let q = QuantizedTensor::compress(&[1.0; 6], &[2, 3], c).unwrap();
        assert!(q.decompress_into(&mut [0.0; 5]).is_err());
        assert_eq!(q.decompress(), vec![1.0; 6]);
    }

    #[test]
    fn memory_per_value() {
        let data: Vec<f32> = (0..4096 * 64).map(|i| (i % 77) as f32).collect();
        let q =
            QuantizedTensor::compress(&data, &[4096, 64], CompressionConfig::WEIGHT_4BIT).unwrap();
        assert_eq!(q.nbytes() * 8, data.len() * 9 / 2); // 4.5 bits per value
    }

    fn config_strategy(rank: usize) -> impl Strategy<Value = CompressionConfig> {
        (
            prop_oneof![Just(1u8), Just(2), Just(4), Just(4), Just(8), Just(8)],
            1usize..20,
            0..rank,
            any::<bool>(),
        )
            .prop_map(|(bits, g, dim, sym)| CompressionConfig {
                num_bits: bits,
                group_size: g * (8 / bits as usize),
                group_dim: dim,
                symmetric: sym && bits >= 2,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn roundtrip_within_half_step(
            (shape, cfg, data, scale) in (1usize..4).prop_flat_map(|rank| {
                (proptest::collection::vec(1usize..9, rank), config_strategy(rank))
            }).prop_flat_map(|(shape, cfg)| {
                let n: usize = shape.iter().product();
                (Just(shape), Just(cfg), proptest::collection::vec(-1.0f32..1.0, n),
                 prop_oneof![Just(1e-6f32), Just(1.0), Just(300.0)])
            })
        ) {
            let data: Vec<f32> = data.iter().map(|v| v * scale).collect();
            check_roundtrip(&data, &shape, cfg);
        }
    }

    #[test]
    fn ragged_and_constant() {
        for cfg in [
            CompressionConfig::WEIGHT_4BIT,
            CompressionConfig::FLEXGEN_WEIGHT,
            CompressionConfig {
                symmetric: true,
                ..CompressionConfig::WEIGHT_8BIT
            },
        ] {
            let data: Vec<f32> = (0..70 * 3)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            let shape = if cfg.group_dim == 0 { [70, 3] } else { [3, 70] };
            check_roundtrip(&data, &shape, cfg);
            let constant = vec![0.125f32; 210];
            let q = QuantizedTensor::compress(&constant, &shape, cfg).unwrap();
            if !cfg.symmetric {
                // min = 0.125 exactly in f16, step 0: lossless.
                assert_eq!(q.decompress(), constant);
            }
            check_roundtrip(&constant, &shape, cfg);
            check_roundtrip(&vec![0.0; 210], &shape, cfg);
        }
    }

    #[test]
    fn parts_round_trip_and_are_checked() {
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = QuantizedTensor::compress(&x, &[3, 100], CompressionConfig::WEIGHT_4BIT).unwrap();
        let (shape, cfg, codes, params) = q.clone().into_parts();
        let back = QuantizedTensor::from_parts(shape.clone(), cfg, codes.clone(), params.clone());
        assert_eq!(back.unwrap(), q);
        let short =
            QuantizedTensor::from_parts(shape.clone(), cfg, codes[1..].to_vec(), params.clone());
        assert!(matches!(short, Err(Error::ShapeMismatch { .. })));
        let bad = QuantizedTensor::from_parts(vec![300], cfg, codes, params);
        assert!(matches!(bad, Err(Error::Config { .. })));
    }
}
