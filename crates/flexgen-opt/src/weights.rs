//! The tensors of an OPT model, loaded from a [`Checkpoint`] or generated as dummy weights.

use flexgen_core::{DType, Matrix, Storage};
use half::{bf16, f16};

use crate::checkpoint::Checkpoint;
use crate::config::OptConfig;
use crate::error::Result;
use crate::layers::{AttentionParams, MlpParams};

/// A linear layer `y = x·Wᵀ + b` with W in HF's (out, in) layout.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight, `out` rows × `in` columns.
    pub weight: Matrix,
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
    pub embed_tokens: Matrix,
    /// `decoder.embed_positions`, (max_positions + 2) × hidden.
    pub embed_positions: Matrix,
    /// `decoder.project_in` (word_embed_dim -> hidden), opt-350m layout only.
    pub project_in: Option<Matrix>,
    /// `decoder.project_out` (hidden -> word_embed_dim), opt-350m layout only.
    pub project_out: Option<Matrix>,
    /// `decoder.final_layer_norm`, pre-LN models only.
    pub final_layer_norm: Option<LayerNormWeights>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayerWeights>,
}

impl OptWeights {
    /// Loads every tensor the config implies from `ckpt`, checking names and shapes. 2-D
    /// weights keep their stored dtype unless `dtype` asks for another; 1-D tensors become f32.
    pub fn load(cfg: &OptConfig, ckpt: &Checkpoint, dtype: Option<DType>) -> Result<Self> {
        let h = cfg.hidden_size;
        let e = cfg.word_embed_dim();
        let f = cfg.ffn_dim;
        let convert = |m: Matrix| match dtype {
            Some(d) if d != m.dtype() => m.to_dtype(d),
            _ => m,
        };
        let matrix = |name: &str, rows, cols| -> Result<Matrix> {
            Ok(convert(ckpt.matrix(name, rows, cols)?))
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
    /// in memory in parallel. Linear weights are uniform in ±1/√fan-in and embeddings in ±0.1,
    /// so activations stay finite through any depth; layer norms are near identity; biases small.
    /// Never all-equal.
    pub fn dummy(cfg: &OptConfig, dtype: DType, seed: u64) -> Result<Self> {
        let h = cfg.hidden_size;
        let e = cfg.word_embed_dim();
        let f = cfg.ffn_dim;
        let mut stream = seed;
        let mut next_seed = || {
            stream = stream.wrapping_add(0x9E37_79B9_7F4A_7C15);
            stream
        };
        let mut matrix = |rows: usize, cols: usize, scale: f32| -> Result<Matrix> {
            let s = next_seed();
            Ok(Matrix::new(
                rows,
                cols,
                dummy_storage(rows * cols, dtype, scale, s),
            )?)
        };
        let vector = |len: usize, center: f32, scale: f32, s: u64| -> Vec<f32> {
            let mut v = vec![0f32; len];
            fill_uniform(&mut v, s, scale);
            v.iter_mut().for_each(|x| *x += center);
            v
        };
        let w_scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let embed_tokens = matrix(cfg.vocab_size, e, 0.1)?;
        let embed_positions = matrix(cfg.max_position_embeddings + 2, h, 0.1)?;
        let (project_in, project_out) = if cfg.has_projections() {
            (
                Some(matrix(h, e, w_scale(e))?),
                Some(matrix(e, h, w_scale(h))?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let s = seed ^ ((l as u64 + 1) << 32);
            let mut lin = |out: usize, inp: usize, k: u64| -> Result<Linear> {
                Ok(Linear {
                    weight: matrix(out, inp, w_scale(inp))?,
                    bias: cfg.enable_bias.then(|| vector(out, 0.0, 0.01, s + k)),
                })
            };
            let q_proj = lin(h, h, 1)?;
            let k_proj = lin(h, h, 2)?;
            let v_proj = lin(h, h, 3)?;
            let out_proj = lin(h, h, 4)?;
            let fc1 = lin(f, h, 5)?;
            let fc2 = lin(h, f, 6)?;
            let ln = |k: u64| LayerNormWeights {
                weight: cfg
                    .layer_norm_elementwise_affine
                    .then(|| vector(h, 1.0, 0.05, s + k)),
                bias: cfg
                    .layer_norm_elementwise_affine
                    .then(|| vector(h, 0.0, 0.05, s + k + 100)),
            };
            layers.push(DecoderLayerWeights {
                q_proj,
                k_proj,
                v_proj,
                out_proj,
                self_attn_layer_norm: ln(7),
                fc1,
                fc2,
                final_layer_norm: ln(8),
            });
        }
        let final_layer_norm = cfg.has_final_layer_norm().then(|| LayerNormWeights {
            weight: cfg
                .layer_norm_elementwise_affine
                .then(|| vector(h, 1.0, 0.05, seed + 11)),
            bias: cfg
                .layer_norm_elementwise_affine
                .then(|| vector(h, 0.0, 0.05, seed + 12)),
        });
        Ok(OptWeights {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_layer_norm,
            layers,
        })
    }

    /// Bytes held by all tensors as stored.
    pub fn nbytes(&self) -> usize {
        let lin = |l: &Linear| l.weight.nbytes() + l.bias.as_ref().map_or(0, |b| b.len() * 4);
        let ln = |n: &LayerNormWeights| {
            n.weight.as_ref().map_or(0, |w| w.len() * 4)
                + n.bias.as_ref().map_or(0, |b| b.len() * 4)
        };
        let mut total = self.embed_tokens.nbytes() + self.embed_positions.nbytes();
        total += self.project_in.as_ref().map_or(0, Matrix::nbytes);
        total += self.project_out.as_ref().map_or(0, Matrix::nbytes);
        total += self.final_layer_norm.as_ref().map_or(0, ln);
        for l in &self.layers {
            total += lin(&l.q_proj) + lin(&l.k_proj) + lin(&l.v_proj) + lin(&l.out_proj);
            total += lin(&l.fc1) + lin(&l.fc2);
            total += ln(&l.self_attn_layer_norm) + ln(&l.final_layer_norm);
        }
        total
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
