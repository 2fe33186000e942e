//! The tensors of an OPT model, loaded from a [`Checkpoint`] or generated as dummy weights.

use flexgen_core::{DType, Matrix, Storage};
use half::{bf16, f16};

use crate::checkpoint::Checkpoint;
use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::layers::{AttentionParams, MlpParams};
use crate::weight::Weight;
use flexgen_quant::CompressionConfig;

/// A linear layer `y = x·Wᵀ + b` with W in HF's (out, in) layout.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight, `out` rows × `in` columns, dense or group-wise quantized.
    pub weight: Weight,
    /// Bias of length `out`, absent when the config has `enable_bias = false`.
    pub bias: Option<Vec<f32>>,
}

/// A layer norm's affine parameters (both absent when `layer_norm_elementwise_affine = false`).
#[derive(Debug, Clone)]
pub struct LayerNormWeights {
    /// Scale (gamma).
    pub weight: Option<Vec<f32>>,
    /// Shift (beta).
    pub bias: Option<Vec<f32>>,
}

/// The weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayerWeights {
    /// `self_attn.q_proj`.
    pub q_proj: Linear,
    /// `self_attn.k_proj`.
    pub k_proj: Linear,
    /// `self_attn.v_proj`.
    pub v_proj: Linear,
    /// `self_attn.out_proj`.
    pub out_proj: Linear,
    /// `self_attn_layer_norm`.
    pub self_attn_layer_norm: LayerNormWeights,
    /// `fc1` (hidden -> ffn).
    pub fc1: Linear,
    /// `fc2` (ffn -> hidden).
    pub fc2: Linear,
    /// `final_layer_norm` of the layer (before the MLP in pre-LN models).
    pub final_layer_norm: LayerNormWeights,
}

impl DecoderLayerWeights {
    /// The attention half of the layer.
    pub fn attention(&self) -> AttentionParams<'_> {
        AttentionParams {
            q_proj: &self.q_proj,
            k_proj: &self.k_proj,
            v_proj: &self.v_proj,
            out_proj: &self.out_proj,
            layer_norm: &self.self_attn_layer_norm,
        }
    }

    /// The MLP half of the layer.
    pub fn mlp(&self) -> MlpParams<'_> {
        MlpParams {
            fc1: &self.fc1,
            fc2: &self.fc2,
            layer_norm: &self.final_layer_norm,
        }
    }
}

/// Every tensor of an OPT decoder. `lm_head` is the token embedding (tied).
#[derive(Debug, Clone)]
pub struct OptWeights {
    /// `decoder.embed_tokens`, vocab × word_embed_dim.
    pub embed_tokens: Weight,
    /// `decoder.embed_positions`, (max_positions + 2) × hidden.
    pub embed_positions: Weight,
    /// `decoder.project_in` (word_embed_dim -> hidden), opt-350m layout only.
    pub project_in: Option<Weight>,
    /// `decoder.project_out` (hidden -> word_embed_dim), opt-350m layout only.
    pub project_out: Option<Weight>,
    /// `decoder.final_layer_norm`, pre-LN models only.
    pub final_layer_norm: Option<LayerNormWeights>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayerWeights>,
}

impl OptWeights {
    /// Loads every tensor the config implies from `ckpt`, checking names and shapes. 2-D
    /// weights keep their stored dtype unless `dtype` asks for another; 1-D tensors become f32.
    pub fn load(cfg: &OptConfig, ckpt: &Checkpoint, dtype: Option<DType>) -> Result<Self> {
        Self::load_from(cfg, ckpt, dtype)
    }

    /// [`OptWeights::load`] from any [`TensorSource`].
    pub fn load_from(
        cfg: &OptConfig,
        ckpt: &dyn TensorSource,
        dtype: Option<DType>,
    ) -> Result<Self> {
        Self::load_with(cfg, ckpt, dtype, None)
    }

    /// [`OptWeights::load_from`], quantizing every 2-D weight (linear layers, embeddings,
    /// projections) with `compress` as it is read, so the dense copy of only one tensor exists
    /// at a time. Biases and layer norms stay `f32`.
    pub fn load_with(
        cfg: &OptConfig,
        ckpt: &dyn TensorSource,
        dtype: Option<DType>,
        compress: Option<CompressionConfig>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let e = cfg.word_embed_dim();
        let f = cfg.ffn_dim;
        let convert = |m: Matrix| match dtype {
            Some(d) if d != m.dtype() => m.to_dtype(d),
            _ => m,
        };
        let matrix = |name: &str, rows, cols| -> Result<Weight> {
            Weight::new(convert(ckpt.matrix(name, rows, cols)?), compress)
        };
        let linear = |prefix: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear {
                weight: matrix(&format!("{prefix}.weight"), out, inp)?,
                bias: if cfg.enable_bias {
                    Some(ckpt.vector(&format!("{prefix}.bias"), out)?)
                } else {
                    None
                },
            })
        };
        let layer_norm = |prefix: &str| -> Result<LayerNormWeights> {
            if cfg.layer_norm_elementwise_affine {
                Ok(LayerNormWeights {
                    weight: Some(ckpt.vector(&format!("{prefix}.weight"), h)?),
                    bias: Some(ckpt.vector(&format!("{prefix}.bias"), h)?),
                })
            } else {
                Ok(LayerNormWeights {
                    weight: None,
                    bias: None,
                })
            }
        };
        let embed_tokens = matrix("decoder.embed_tokens.weight", cfg.vocab_size, e)?;
        let embed_positions = matrix(
            "decoder.embed_positions.weight",
            cfg.max_position_embeddings + 2,
            h,
        )?;
        let (project_in, project_out) = if cfg.has_projections() {
            (
                Some(matrix("decoder.project_in.weight", h, e)?),
                Some(matrix("decoder.project_out.weight", e, h)?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if cfg.has_final_layer_norm() {
            Some(layer_norm("decoder.final_layer_norm")?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("decoder.layers.{l}");
                Ok(DecoderLayerWeights {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), h, h)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), h, h)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), h, h)?,
                    out_proj: linear(&format!("{p}.self_attn.out_proj"), h, h)?,
                    self_attn_layer_norm: layer_norm(&format!("{p}.self_attn_layer_norm"))?,
                    fc1: linear(&format!("{p}.fc1"), f, h)?,
                    fc2: linear(&format!("{p}.fc2"), h, f)?,
                    final_layer_norm: layer_norm(&format!("{p}.final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(OptWeights {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_layer_norm,
            layers,
        })
    }

    /// Deterministic pseudo-random weights for benchmarks (FlexGen's `_DUMMY_` path), generated
    /// in memory in parallel (see [`DummySource`]).
    pub fn dummy(cfg: &OptConfig, dtype: DType, seed: u64) -> Result<Self> {
        Self::dummy_with(cfg, dtype, seed, None)
    }

    /// [`OptWeights::dummy`] with every 2-D weight quantized by `compress` as it is generated
    /// (from the `dtype` values, as a checkpoint in that dtype would be).
    pub fn dummy_with(
        cfg: &OptConfig,
        dtype: DType,
        seed: u64,
        compress: Option<CompressionConfig>,
    ) -> Result<Self> {
        Self::load_with(cfg, &DummySource::new(cfg, dtype, seed), None, compress)
    }

    /// Bytes held by all tensors as stored.
    pub fn nbytes(&self) -> usize {
        let lin = |l: &Linear| l.weight.nbytes() + l.bias.as_ref().map_or(0, |b| b.len() * 4);
        let ln = |n: &LayerNormWeights| {
            n.weight.as_ref().map_or(0, |w| w.len() * 4)
                + n.bias.as_ref().map_or(0, |b| b.len() * 4)
        };
        let mut total = self.embed_tokens.nbytes() + self.embed_positions.nbytes();
        total += self.project_in.as_ref().map_or(0, Weight::nbytes);
        total += self.project_out.as_ref().map_or(0, Weight::nbytes);
        total += self.final_layer_norm.as_ref().map_or(0, ln);
        for l in &self.layers {
            total += lin(&l.q_proj) + lin(&l.k_proj) + lin(&l.v_proj) + lin(&l.out_proj);
            total += lin(&l.fc1) + lin(&l.fc2);
            total += ln(&l.self_attn_layer_norm) + ln(&l.final_layer_norm);
        }
        total
    }
}

/// Where OPT weights come from, tensor by tensor (by their checkpoint names without the
/// `model.` prefix): a [`Checkpoint`] or [`DummySource`].
pub trait TensorSource: Sync {
    /// The 2-D tensor `name` of shape `[rows, cols]` in its stored dtype.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix>;
    /// The 1-D tensor `name` of length `len` as f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>>;
    /// The dtype [`TensorSource::matrix`] returns for `name`.
    fn dtype(&self, name: &str) -> Result<DType>;
}

impl TensorSource for Checkpoint {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Checkpoint::matrix(self, name, rows, cols)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Checkpoint::vector(self, name, len)
    }

    fn dtype(&self, name: &str) -> Result<DType> {
        self.locate(name).map(|l| l.dtype)
    }
}

/// Deterministic pseudo-random weights for benchmarks (FlexGen's `_DUMMY_` path), any tensor
/// on its own, so an offloaded model can generate and place one tensor at a time. Linear
/// weights are uniform in ±1/√fan-in and embeddings in ±0.1, so activations stay finite
/// through any depth; layer norms are near identity; biases small. Never all-equal.
#[derive(Debug, Clone)]
pub struct DummySource {
    dtype: DType,
    seed: u64,
    /// Matrices before the first layer's (embeddings, plus projections when present).
    head: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl DummySource {
    /// Dummy weights of `cfg` in `dtype` (2-D weights) from `seed`.
    pub fn new(cfg: &OptConfig, dtype: DType, seed: u64) -> Self {
        DummySource {
            dtype,
            seed,
            head: if cfg.has_projections() { 4 } else { 2 },
        }
    }

    /// Matrix number `n` (1-based, in checkpoint order) gets seed `seed + n·φ`.
    fn matrix_seed(&self, n: u64) -> u64 {
        self.seed.wrapping_add(n.wrapping_mul(GOLDEN))
    }

    fn layer_seed(&self, layer: u64) -> u64 {
        self.seed ^ ((layer + 1) << 32)
    }

    fn unknown(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.to_string(),
            location: "dummy weights".into(),
        }
    }
}

/// Splits `decoder.layers.{l}.{rest}` into `(l, rest)`.
fn layer_tensor(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("decoder.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

const LINEARS: [&str; 6] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
];

impl TensorSource for DummySource {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (n, scale) = match name {
            "decoder.embed_tokens.weight" => (1, 0.1),
            "decoder.embed_positions.weight" => (2, 0.1),
            "decoder.project_in.weight" => (3, 1.0 / (cols as f32).sqrt()),
            "decoder.project_out.weight" => (4, 1.0 / (cols as f32).sqrt()),
            _ => {
                let (l, rest) = layer_tensor(name).ok_or_else(|| self.unknown(name))?;
                let t = LINEARS
                    .iter()
                    .position(|p| rest.strip_suffix(".weight") == Some(p))
                    .ok_or_else(|| self.unknown(name))? as u64;
                (self.head + 6 * l + t + 1, 1.0 / (cols as f32).sqrt())
            }
        };
        let storage = dummy_storage(rows * cols, self.dtype, scale, self.matrix_seed(n));
        Ok(Matrix::new(rows, cols, storage)?)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (center, scale, seed) = match name {
            "decoder.final_layer_norm.weight" => (1.0, 0.05, self.seed.wrapping_add(11)),
            "decoder.final_layer_norm.bias" => (0.0, 0.05, self.seed.wrapping_add(12)),
            _ => {
                let (l, rest) = layer_tensor(name).ok_or_else(|| self.unknown(name))?;
                let s = self.layer_seed(l);
                let ln = |k: u64| match rest.rsplit_once('.') {
                    Some((_, "weight")) => (1.0, 0.05, s.wrapping_add(k)),
                    _ => (0.0, 0.05, s.wrapping_add(k + 100)),
                };
                if rest.starts_with("self_attn_layer_norm.") {
                    ln(7)
                } else if rest.starts_with("final_layer_norm.") {
                    ln(8)
                } else {
                    let t = LINEARS
                        .iter()
                        .position(|p| rest.strip_suffix(".bias") == Some(p))
                        .ok_or_else(|| self.unknown(name))? as u64;
                    (0.0, 0.01, s.wrapping_add(t + 1))
                }
            }
        };
        let mut v = vec![0f32; len];
        fill_uniform(&mut v, seed, scale);
        v.iter_mut().for_each(|x| *x += center);
        Ok(v)
    }

    fn dtype(&self, _name: &str) -> Result<DType> {
        Ok(self.dtype)
    }
}

/// SplitMix64: a tiny, fast, well-mixed generator for dummy weights.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` with values uniform in [-scale, scale), deterministic in `seed`, in parallel.
fn fill_uniform(out: &mut [f32], seed: u64, scale: f32) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut state = seed ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            for pair in chunk.chunks_mut(2) {
                let r = splitmix64(&mut state);
                for (i, x) in pair.iter_mut().enumerate() {
                    let bits = (r >> (32 * i)) as u32;
                    *x = ((bits >> 8) as f32 * (1.0 / (1u32 << 24) as f32) * 2.0 - 1.0) * scale;
                }
            }
        });
}

fn dummy_storage(len: usize, dtype: DType, scale: f32, seed: u64) -> Storage {
    use rayon::prelude::*;
    let mut v = vec![0f32; len];
    fill_uniform(&mut v, seed, scale);
    match dtype {
        DType::F32 => Storage::F32(v),
        DType::F16 => Storage::F16(v.par_iter().map(|&x| f16::from_f32(x)).collect()),
        DType::BF16 => Storage::BF16(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_source_names_and_determinism() {
        let cfg = OptConfig::from_name("facebook/opt-125m").unwrap();
        let d = DummySource::new(&cfg, DType::F16, 7);
        let a = d.matrix("decoder.layers.3.fc2.weight", 4, 8).unwrap();
        let b = d.matrix("decoder.layers.3.fc2.weight", 4, 8).unwrap();
        assert_eq!(a.to_f32_vec(), b.to_f32_vec());
        assert_ne!(
            a.to_f32_vec(),
            d.matrix("decoder.layers.3.fc1.weight", 4, 8)
                .unwrap()
                .to_f32_vec()
        );
        let ln = d
            .vector("decoder.layers.0.final_layer_norm.weight", 16)
            .unwrap();
        assert!(ln.iter().all(|&x| (x - 1.0).abs() <= 0.05));
        assert_eq!(d.dtype("anything").unwrap(), DType::F16);
        for bad in [
            "decoder.layers.x.fc1.weight",
            "decoder.layers.0.fc3.weight",
            "lm_head.weight",
        ] {
            assert!(
                matches!(d.matrix(bad, 2, 2), Err(Error::MissingTensor { .. })),
                "{bad}"
            );
        }
        assert!(d.vector("decoder.layers.0.fc9.bias", 2).is_err());
    }
}
