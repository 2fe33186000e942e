//! Group-wise compression of weights and KV cache (FlexGen's scheme), with CPU kernels that
//! compute straight from the packed codes.
//!
//! | item | purpose |
//! |------|---------|
//! | [`CompressionConfig`] | bits (1/2/4/8), group size, group dimension, symmetric or min/max |
//! | [`QuantizedTensor`] | packed codes + per-group `(step, min)` in `f16`, any rank and group dim |
//! | [`linear_packed`] | `y = x · Wᵀ + b` from a packed weight, no dequantized copy (fused SIMD kernels up to 23 rows of `x`, with `x` in 16-bit fixed point on AVX-512 VNNI; from 24 rows flexgen-core's GEMM on 256 x 256 blocks decoded on demand) |
//! | [`embedding_packed`] | rows of a packed table (token embeddings) |
//! | [`PackedKvCache`], [`attention_packed`] | KV cache compressed along `head_dim`, attention that reads it directly |
//!
//! # The scheme
//! A group of `g` values `x` stores `b`-bit codes `q = round((x − min) / step)` clamped to
//! `0 ..= 2^b − 1`, with `step = (max − min) / (2^b − 1)`, and the pair `(step, min)` in `f16`.
//! 4 bits with groups of 64 cost 4.5 bits per value (0.28x of `f16`). Differences from
//! FlexGen's `compression.py`, all deliberate:
//! - We store `step`, FlexGen stores its reciprocal `scale = (2^b − 1) / (max − min)`. In `f16`
//!   that overflows to `inf` for any group narrower than ~2.3e-4 (and divides by zero for a
//!   constant group), which then decodes to NaN; `step` only underflows towards 0, which decodes
//!   to `min`, within the group's (tiny) range.
//! - Codes are computed from the `f16`-rounded `(step, min)`, so the round-trip error is at most
//!   half a step plus the rounding of the parameters.
//! - The padding of a ragged last group is excluded from its min/max (FlexGen pads with zeros
//!   and includes them, which widens that group's range).
//! - Codes are packed "split" inside a group (byte `j` holds codes `j` and `j + g/2`), so SIMD
//!   kernels unpack 32 codes with one widening load and one shift; see [`codec`].
//!
//! # Weight grouping: along the input dimension
//! FlexGen groups a `(out, in)` weight along dim 0 (64 output channels per group within one
//! input column); we group along dim 1 (64 consecutive inputs of one output row, as GPTQ and
//! llama.cpp do): [`CompressionConfig::WEIGHT_4BIT`].
//! - Error, measured on the real trained weights of all-MiniLM-L6-v2 (40 matrices, 4-bit,
//!   groups of 64; `tools/quant_accuracy.py`, table in `BENCHMARKS.md`): relative Frobenius
//!   error over all weights together 0.0919 along the input vs 0.0922 along the output
//!   dimension; averaged per tensor 0.0952 vs 0.0910 (the gap comes mostly from tiny tensors).
//!   Halving the group to 32 values (0.080) matters far more than the grouping direction.
//! - Speed: with groups along the input, each group's 16 possible values form one register
//!   table, a row's codes and parameters are contiguous, and the dequantized weights are exactly
//!   the reference decoder's, so the fused kernel is a table lookup plus an FMA per value;
//!   and a group's codes multiply a group of `x` as integers with one scale, which the
//!   fixed-point kernel (AVX-512 VNNI, `vpdpbusd` on 128 codes at once) uses at small `m`,
//!   and the opt-in int8 path (`x` in bytes, [`int8_activations_enabled`]) at large `m`.
//!   With groups along the output every SIMD lane needs its own `(step, min)`, and the
//!   embedding lookup and the KV cache (grouped along `head_dim`, the reduction dimension of
//!   `q · k`) would need a second kernel family. We did not write or time a fused kernel for
//!   output grouping; [`QuantizedTensor`] supports FlexGen's `group_dim = 0`, which
//!   [`linear_packed`] runs through its dequantize-a-panel-then-`gemm` path.
//!
//! With equal error and the simpler kernel family, the model integration compresses every 2-D
//! weight with [`CompressionConfig::WEIGHT_4BIT`].
//!
//! # Example
//! ```
//! use flexgen_quant::{linear_packed, linear_packed_ref, CompressionConfig, QuantizedTensor};
//!
//! let (n, k) = (16, 128);
//! let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
//! let q = QuantizedTensor::compress(&w, &[n, k], CompressionConfig::WEIGHT_4BIT)?;
//! let x: Vec<f32> = (0..2 * k).map(|i| (i as f32 * 0.1).cos()).collect();
//! let (mut fast, mut reference) = (vec![0.0; 2 * n], vec![0.0; 2 * n]);
//! linear_packed(&x, 2, &q, None, &mut fast)?;
//! linear_packed_ref(&x, 2, &q, None, &mut reference)?;
//! assert!(fast.iter().zip(&reference).all(|(a, b)| (a - b).abs() < 1e-4));
//! # Ok::<(), flexgen_quant::Error>(())
//! ```

pub mod codec;
pub mod config;
pub mod error;
pub mod kv;
pub mod linear;
pub(crate) mod simd;
pub mod tensor;

pub use codec::GroupParams;
pub use config::CompressionConfig;
pub use error::{Error, Result};
pub use kv::{attention_packed, attention_packed_ref, attention_packed_with_level, PackedKvCache};
pub use linear::{
    blocks_supported, embedding_packed, fixed_point_enabled, fixed_point_supported,
    int8_activations_enabled, int8_supported, linear_packed, linear_packed_path, linear_packed_ref,
    linear_packed_with_level, set_fixed_point_enabled, set_int8_activations, PackedPath,
    BLOCKS_MIN_M, FUSED_MAX_M,
};
pub use tensor::QuantizedTensor;
