//! The OPT decoder (Hugging Face `OPTForCausalLM` numerics) over a batch with a KV cache.
//!
//! Pre-LN layers (every OPT but opt-350m): `x += attn(LN(x)); x += mlp(LN(x))`; post-LN layers:
//! `x = LN(x + attn(x)); x = LN(x + mlp(x))`. Positions are learned with an offset of 2:
//! `pos = cumsum(mask) · mask + 1`, so pads sit at 1 and the first real token at 2.

use std::path::Path;

use flexgen_core::kernels;
use flexgen_core::DType;

use crate::checkpoint::Checkpoint;
use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::kv_cache::BatchState;
use crate::layers::{self, InputParams, LayerScratch, OutputParams};
use crate::weights::{LayerNormWeights, Linear, OptWeights};
use flexgen_quant::CompressionConfig;

/// LayerNorm epsilon of every OPT model.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Store 2-D weights in this dtype (converting at load); `None` keeps the checkpoint's.
    pub dtype: Option<DType>,
    /// Quantize every 2-D weight (linear layers, embeddings, projections) group-wise as it is
    /// loaded, e.g. [`CompressionConfig::WEIGHT_4BIT`] (FlexGen's `--compress-weight`); `None`
    /// keeps them dense. Biases and layer norms stay `f32`.
    pub compress_weight: Option<CompressionConfig>,
}

/// Which positions [`OptModel::forward`] returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last new position of each sequence (generation).
    Last,
    /// Every new position (scoring, tests).
    All,
}

/// An OPT model: its config and weights.
#[derive(Debug, Clone)]
pub struct OptModel {
    config: OptConfig,
    weights: OptWeights,
}

/// Scratch buffers of one forward pass, reused across steps so the decode loop does not allocate.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    pos_ids: Vec<u32>,
    key_valid: Vec<bool>,
    sel: Vec<f32>,
    layer: LayerScratch,
}

impl OptModel {
    /// Loads a Hugging Face OPT folder (`config.json` plus safetensors weights), keeping the
    /// checkpoint's dtype.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load(dir, &LoadOptions::default())
    }

    /// Loads a Hugging Face OPT folder with options.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                what: "model folder",
                path: dir.to_path_buf(),
            });
        }
        let config = OptConfig::from_file(dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let weights =
            OptWeights::load_with(&config, &ckpt, options.dtype, options.compress_weight)?;
        Ok(OptModel { config, weights })
    }

    /// A model with deterministic dummy weights (benchmarks; outputs are meaningless).
    pub fn dummy(config: OptConfig, dtype: DType, seed: u64) -> Result<Self> {
        Self::dummy_with(config, dtype, seed, None)
    }

    /// [`OptModel::dummy`] with every 2-D weight quantized by `compress_weight` as it is
    /// generated (see [`LoadOptions::compress_weight`]).
    pub fn dummy_with(
        config: OptConfig,
        dtype: DType,
        seed: u64,
        compress_weight: Option<CompressionConfig>,
    ) -> Result<Self> {
        config.validate()?;
        let weights = OptWeights::dummy_with(&config, dtype, seed, compress_weight)?;
        Ok(OptModel { config, weights })
    }

    /// Builds a model from parts (e.g. weights changed by the caller).
    pub fn from_parts(config: OptConfig, weights: OptWeights) -> Self {
        OptModel { config, weights }
    }

    /// The architecture.
    pub fn config(&self) -> &OptConfig {
        &self.config
    }

    /// The weights.
    pub fn weights(&self) -> &OptWeights {
        &self.weights
    }

    /// Runs the decoder on `q_len` new tokens per sequence of `state` and writes logits to
    /// `logits` (resized): `[batch, vocab]` for [`LogitsFor::Last`], `[batch * q_len, vocab]`
    /// for [`LogitsFor::All`].
    ///
    /// `tokens` is `[batch, q_len]` row-major; `valid[i]` is false for padding. The new tokens'
    /// keys and values are appended to `state`'s cache.
    pub fn forward(
        &self,
        state: &mut BatchState,
        tokens: &[u32],
        valid: &[bool],
        q_len: usize,
        which: LogitsFor,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let batch = state.batch();
        let rows = batch * q_len;
        if tokens.len() != rows || valid.len() != rows || q_len == 0 {
            return Err(Error::InvalidRequest(format!(
                "forward: {} tokens and {} mask entries for batch {batch} x {q_len} new tokens",
                tokens.len(),
                valid.len()
            )));
        }
        if state.kv_len() + q_len > state.capacity() {
            return Err(Error::InvalidRequest(format!(
                "forward: KV cache of capacity {} cannot take {} more tokens after {}",
                state.capacity(),
                q_len,
                state.kv_len()
            )));
        }
        for (i, &id) in tokens.iter().enumerate() {
            if id as usize >= cfg.vocab_size {
                return Err(Error::TokenOutOfRange {
                    row: i / q_len,
                    id,
                    vocab_size: cfg.vocab_size,
                });
            }
        }
        let mut s = std::mem::take(&mut state.scratch);
        let result = self.forward_with(state, &mut s, tokens, valid, q_len, which, logits);
        state.scratch = s;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_with(
        &self,
        state: &mut BatchState,
        s: &mut Scratch,
        tokens: &[u32],
        valid: &[bool],
        q_len: usize,
        which: LogitsFor,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let w = &self.weights;
        let batch = state.batch();
        let hd = cfg.hidden_size;
        let rows = batch * q_len;

        let mut seen: Vec<usize> = (0..batch).map(|b| state.valid_count(b)).collect();
        let max_seen = layers::positions(valid, q_len, &mut seen, &mut s.pos_ids);
        if max_seen > cfg.max_position_embeddings {
            let row = seen.iter().position(|&c| c == max_seen).unwrap_or(0);
            return Err(Error::PromptTooLong {
                row,
                prompt_tokens: max_seen,
                new_tokens: 0,
                max_positions: cfg.max_position_embeddings,
            });
        }
        let x = layers::sized(&mut s.x, rows * hd);
        let input = InputParams {
            embed_tokens: &w.embed_tokens,
            embed_positions: &w.embed_positions,
            project_in: w.project_in.as_ref(),
        };
        layers::input_embedding(cfg, input, tokens, &s.pos_ids, x, &mut s.layer)?;

        state.append_mask(valid, q_len);
        let kv_len = state.kv_len();
        state.key_valid_into(kv_len + q_len, &mut s.key_valid);
        for (l, layer) in w.layers.iter().enumerate() {
            let kv = state.layer_slot(l);
            layers::self_attention(
                cfg,
                layer.attention(),
                x,
                q_len,
                kv,
                &s.key_valid,
                &mut s.layer,
            )?;
            layers::mlp(cfg, layer.mlp(), x, &mut s.layer)?;
        }
        state.commit(q_len);

        // Output: the last new position of each row, or all of them.
        let sel = match which {
            LogitsFor::Last => {
                let sel = layers::sized(&mut s.sel, batch * hd);
                for b in 0..batch {
                    let src = (b * q_len + q_len - 1) * hd;
                    sel[b * hd..(b + 1) * hd].copy_from_slice(&x[src..src + hd]);
                }
                sel
            }
            LogitsFor::All => x,
        };
        let output = OutputParams {
            final_layer_norm: w.final_layer_norm.as_ref(),
            project_out: w.project_out.as_ref(),
            embed_tokens: &w.embed_tokens,
        };
        layers::output_logits(cfg, output, sel, logits, &mut s.layer)
    }
}

/// `out = x · Wᵀ + b` for a model linear layer.
pub(crate) fn linear(x: &[f32], rows: usize, l: &Linear, out: &mut [f32]) -> Result<()> {
    l.weight.linear(x, rows, l.bias.as_deref(), out)
}

/// OPT's layer norm (eps 1e-5) with optional affine parameters.
pub(crate) fn layer_norm(
    x: &[f32],
    dim: usize,
    ln: &LayerNormWeights,
    out: &mut [f32],
) -> Result<()> {
    kernels::layer_norm(
        x,
        dim,
        ln.weight.as_deref(),
        ln.bias.as_deref(),
        LAYER_NORM_EPS,
        out,
    )?;
    Ok(())
}
