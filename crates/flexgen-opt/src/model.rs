//! The OPT decoder (Hugging Face `OPTForCausalLM` numerics) over a batch with a KV cache.
//!
//! Pre-LN layers (every OPT but opt-350m): `x += attn(LN(x)); x += mlp(LN(x))`; post-LN layers:
//! `x = LN(x + attn(x)); x = LN(x + mlp(x))`. Positions are learned with an offset of 2:
//! `pos = cumsum(mask) · mask + 1`, so pads sit at 1 and the first real token at 2.

use std::path::Path;

use flexgen_core::kernels::{self, AttentionShape};
use flexgen_core::DType;

use crate::checkpoint::Checkpoint;
use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::kv_cache::BatchState;
use crate::weights::{LayerNormWeights, Linear, OptWeights};

/// LayerNorm epsilon of every OPT model.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Store 2-D weights in this dtype (converting at load); `None` keeps the checkpoint's.
    pub dtype: Option<DType>,
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
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    ff: Vec<f32>,
    emb: Vec<f32>,
    pos_ids: Vec<u32>,
    key_valid: Vec<bool>,
    sel: Vec<f32>,
    sel2: Vec<f32>,
}

fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
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
        let weights = OptWeights::load(&config, &ckpt, options.dtype)?;
        Ok(OptModel { config, weights })
    }

    /// A model with deterministic dummy weights (benchmarks; outputs are meaningless).
    pub fn dummy(config: OptConfig, dtype: DType, seed: u64) -> Result<Self> {
        config.validate()?;
        let weights = OptWeights::dummy(&config, dtype, seed)?;
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
        let w = &self.weights;
        let batch = state.batch();
        let hd = cfg.hidden_size;
        let ed = cfg.word_embed_dim();
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

        // Positions: cumsum(mask) * mask + 1 over the whole sequence (offset 2 built in).
        s.pos_ids.clear();
        for b in 0..batch {
            let mut seen = state.valid_count(b);
            for t in 0..q_len {
                if valid[b * q_len + t] {
                    seen += 1;
                    s.pos_ids.push(seen as u32 + 1);
                } else {
                    s.pos_ids.push(1);
                }
            }
            if seen > cfg.max_position_embeddings {
                state.scratch = s;
                return Err(Error::PromptTooLong {
                    row: b,
                    prompt_tokens: seen,
                    new_tokens: 0,
                    max_positions: cfg.max_position_embeddings,
                });
            }
        }

        // Embeddings.
        let x = sized(&mut s.x, rows * hd);
        if let Some(proj) = &w.project_in {
            let emb = sized(&mut s.emb, rows * ed);
            kernels::embedding(&w.embed_tokens, tokens, emb)?;
            kernels::linear(emb, rows, proj, None, x)?;
        } else {
            kernels::embedding(&w.embed_tokens, tokens, x)?;
        }
        let pos = sized(&mut s.h, rows * hd);
        kernels::embedding(&w.embed_positions, &s.pos_ids, pos)?;
        for (a, p) in x.iter_mut().zip(pos.iter()) {
            *a += *p;
        }

        state.append_mask(valid, q_len);
        let kv_len = state.kv_len() + q_len;
        state.key_valid_into(kv_len, &mut s.key_valid);
        let shape = AttentionShape {
            batch,
            n_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            q_len,
            kv_len,
            kv_capacity: state.capacity(),
        };
        let scale = (cfg.head_dim() as f32).powf(-0.5);
        let pre_ln = cfg.do_layer_norm_before;

        for (l, layer) in w.layers.iter().enumerate() {
            // Self-attention block.
            let x = &mut s.x[..rows * hd];
            let h = sized(&mut s.h, rows * hd);
            if pre_ln {
                layer_norm(x, hd, &layer.self_attn_layer_norm, h)?;
            } else {
                h.copy_from_slice(x);
            }
            let q = sized(&mut s.q, rows * hd);
            let k = sized(&mut s.k, rows * hd);
            let v = sized(&mut s.v, rows * hd);
            linear(h, rows, &layer.q_proj, q)?;
            linear(h, rows, &layer.k_proj, k)?;
            linear(h, rows, &layer.v_proj, v)?;
            state.write_kv(l, k, v, q_len);
            let attn = sized(&mut s.attn, rows * hd);
            let (kc, vc) = state.layer_cache(l);
            kernels::attention(q, kc, vc, &s.key_valid, &shape, scale, attn)?;
            let o = sized(&mut s.o, rows * hd);
            linear(attn, rows, &layer.out_proj, o)?;
            add_assign(x, o);
            if !pre_ln {
                h.copy_from_slice(x);
                layer_norm(h, hd, &layer.self_attn_layer_norm, x)?;
            }

            // MLP block.
            if pre_ln {
                layer_norm(x, hd, &layer.final_layer_norm, h)?;
            } else {
                h.copy_from_slice(x);
            }
            let ff = sized(&mut s.ff, rows * cfg.ffn_dim);
            linear(h, rows, &layer.fc1, ff)?;
            kernels::relu_inplace(ff);
            linear(ff, rows, &layer.fc2, o)?;
            add_assign(x, o);
            if !pre_ln {
                h.copy_from_slice(x);
                layer_norm(h, hd, &layer.final_layer_norm, x)?;
            }
        }
        state.commit(q_len);

        // Output: pick rows, final LN, project_out, tied lm_head.
        let out_rows = match which {
            LogitsFor::Last => batch,
            LogitsFor::All => rows,
        };
        let sel = sized(&mut s.sel, out_rows * hd);
        match which {
            LogitsFor::Last => {
                for b in 0..batch {
                    let src = (b * q_len + q_len - 1) * hd;
                    sel[b * hd..(b + 1) * hd].copy_from_slice(&s.x[src..src + hd]);
                }
            }
            LogitsFor::All => sel.copy_from_slice(&s.x[..rows * hd]),
        }
        if let Some(ln) = &w.final_layer_norm {
            let tmp = sized(&mut s.sel2, out_rows * hd);
            layer_norm(sel, hd, ln, tmp)?;
            sel.copy_from_slice(tmp);
        }
        let last: &[f32] = if let Some(proj) = &w.project_out {
            let tmp = sized(&mut s.sel2, out_rows * ed);
            kernels::linear(sel, out_rows, proj, None, tmp)?;
            tmp
        } else {
            sel
        };
        logits.resize(out_rows * cfg.vocab_size, 0.0);
        kernels::linear(last, out_rows, &w.embed_tokens, None, logits)?;
        state.scratch = s;
        Ok(())
    }
}

fn linear(x: &[f32], rows: usize, l: &Linear, out: &mut [f32]) -> Result<()> {
    kernels::linear(x, rows, &l.weight, l.bias.as_deref(), out)?;
    Ok(())
}

fn layer_norm(x: &[f32], dim: usize, ln: &LayerNormWeights, out: &mut [f32]) -> Result<()> {
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

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}
