//! The four layer kinds of OPT as free functions over explicit weights, so that a runtime that
//! fetches each layer's weights itself (the offload runtime) runs exactly the same math as
//! [`OptModel::forward`](crate::OptModel::forward):
//!
//! - [`input_embedding`]: token embedding (+ `project_in`) + learned positions;
//! - [`self_attention`]: (LN) → q, k, v → append k, v to the cache → attention → out_proj →
//!   residual (→ LN for post-LN models);
//! - [`mlp`]: (LN) → fc1 → ReLU → fc2 → residual (→ LN);
//! - [`output_logits`]: final LN, `project_out`, logits against the tied token embedding.

use flexgen_core::kernels::{self, AttentionShape};

use crate::config::OptConfig;
use crate::error::Result;
use crate::model::{layer_norm, linear};
use crate::weight::Weight;
use crate::weights::{LayerNormWeights, Linear};

/// Borrowed weights of one self-attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    /// `q_proj`.
    pub q_proj: &'a Linear,
    /// `k_proj`.
    pub k_proj: &'a Linear,
    /// `v_proj`.
    pub v_proj: &'a Linear,
    /// `out_proj`.
    pub out_proj: &'a Linear,
    /// `self_attn_layer_norm`.
    pub layer_norm: &'a LayerNormWeights,
}

/// Borrowed weights of one MLP layer.
#[derive(Debug, Clone, Copy)]
pub struct MlpParams<'a> {
    /// `fc1`.
    pub fc1: &'a Linear,
    /// `fc2`.
    pub fc2: &'a Linear,
    /// The layer's `final_layer_norm`.
    pub layer_norm: &'a LayerNormWeights,
}

/// Borrowed weights of the input embedding.
#[derive(Debug, Clone, Copy)]
pub struct InputParams<'a> {
    /// Token embedding, vocab × word_embed_dim.
    pub embed_tokens: &'a Weight,
    /// Position embedding, (max_positions + 2) × hidden.
    pub embed_positions: &'a Weight,
    /// `project_in` when present.
    pub project_in: Option<&'a Weight>,
}

/// Borrowed weights of the output head.
#[derive(Debug, Clone, Copy)]
pub struct OutputParams<'a> {
    /// Final layer norm (pre-LN models).
    pub final_layer_norm: Option<&'a LayerNormWeights>,
    /// `project_out` when present.
    pub project_out: Option<&'a Weight>,
    /// Token embedding (tied lm_head).
    pub embed_tokens: &'a Weight,
}

/// The KV cache of one layer for the rows of a (micro-)batch: K and V are
/// `[batch, capacity, hidden]`; `kv_len` tokens are already stored per row.
#[derive(Debug)]
pub struct KvSlot<'a> {
    /// Keys.
    pub keys: &'a mut [f32],
    /// Values.
    pub values: &'a mut [f32],
    /// Tokens each row can hold.
    pub capacity: usize,
    /// Tokens stored per row before this step.
    pub kv_len: usize,
}

/// Reusable buffers of the layer functions.
#[derive(Debug, Default)]
pub struct LayerScratch {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    ff: Vec<f32>,
    emb: Vec<f32>,
}

pub(crate) fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// Positions of new tokens, `cumsum(mask) · mask + 1` continued from `seen[b]` real tokens per
/// row (pads get 1, the first real token 2); updates `seen`. Returns the largest count seen.
pub fn positions(valid: &[bool], q_len: usize, seen: &mut [usize], out: &mut Vec<u32>) -> usize {
    out.clear();
    let mut max = 0;
    for (b, count) in seen.iter_mut().enumerate() {
        for &v in &valid[b * q_len..(b + 1) * q_len] {
            if v {
                *count += 1;
                out.push(*count as u32 + 1);
            } else {
                out.push(1);
            }
        }
        max = max.max(*count);
    }
    max
}

/// `x[rows, hidden] = embed_tokens[tokens] (· project_inᵀ) + embed_positions[pos_ids]`.
pub fn input_embedding(
    cfg: &OptConfig,
    w: InputParams<'_>,
    tokens: &[u32],
    pos_ids: &[u32],
    x: &mut [f32],
    s: &mut LayerScratch,
) -> Result<()> {
    let rows = tokens.len();
    let hd = cfg.hidden_size;
    if let Some(proj) = w.project_in {
        let emb = sized(&mut s.emb, rows * cfg.word_embed_dim());
        w.embed_tokens.embedding(tokens, emb)?;
        proj.linear(emb, rows, None, x)?;
    } else {
        w.embed_tokens.embedding(tokens, x)?;
    }
    let pos = sized(&mut s.h, rows * hd);
    w.embed_positions.embedding(pos_ids, pos)?;
    add_assign(x, pos);
    Ok(())
}

/// Where an attention layer keeps its keys and values: [`KvSlot`] (dense `f32`, attended with
/// [`kernels::attention`]), or another store (a compressed cache, sparse attention) the
/// offload runtime plugs in.
pub trait KvStore {
    /// Tokens stored per sequence before this step.
    fn kv_len(&self) -> usize;
    /// Tokens each sequence can hold.
    fn capacity(&self) -> usize;
    /// Stores the new tokens' keys and values (`k`, `v`: `[batch, q_len, hidden]`) at
    /// positions `kv_len()..kv_len() + q_len` of every sequence.
    fn append(&mut self, k: &[f32], v: &[f32], batch: usize, q_len: usize) -> Result<()>;
    /// Attention of `q` (`[batch, q_len, hidden]`) over positions `0..shape.kv_len` (the new
    /// tokens included), with [`kernels::attention`]'s semantics, into `out`.
    fn attend(
        &self,
        q: &[f32],
        key_valid: &[bool],
        shape: &AttentionShape,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()>;
}

impl KvStore for KvSlot<'_> {
    fn kv_len(&self) -> usize {
        self.kv_len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn append(&mut self, k: &[f32], v: &[f32], batch: usize, q_len: usize) -> Result<()> {
        let n = (q_len * batch).max(1);
        let hd = k.len() / n;
        for b in 0..batch {
            let src = b * q_len * hd..(b + 1) * q_len * hd;
            let dst = (b * self.capacity + self.kv_len) * hd;
            self.keys[dst..dst + q_len * hd].copy_from_slice(&k[src.clone()]);
            self.values[dst..dst + q_len * hd].copy_from_slice(&v[src]);
        }
        Ok(())
    }

    fn attend(
        &self,
        q: &[f32],
        key_valid: &[bool],
        shape: &AttentionShape,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        kernels::attention(q, self.keys, self.values, key_valid, shape, scale, out)?;
        Ok(())
    }
}

/// One self-attention layer over `x` (`[batch, q_len, hidden]`, updated in place): the new
/// tokens' K/V are written to `kv` at `kv.kv_len()..kv.kv_len() + q_len`; `key_valid` is
/// `[batch, kv.kv_len() + q_len]`.
pub fn self_attention<K: KvStore>(
    cfg: &OptConfig,
    w: AttentionParams<'_>,
    x: &mut [f32],
    q_len: usize,
    mut kv: K,
    key_valid: &[bool],
    s: &mut LayerScratch,
) -> Result<()> {
    let hd = cfg.hidden_size;
    let rows = x.len() / hd;
    let batch = rows / q_len;
    let h = sized(&mut s.h, rows * hd);
    if cfg.do_layer_norm_before {
        layer_norm(x, hd, w.layer_norm, h)?;
    } else {
        h.copy_from_slice(x);
    }
    let q = sized(&mut s.q, rows * hd);
    let k = sized(&mut s.k, rows * hd);
    let v = sized(&mut s.v, rows * hd);
    linear(h, rows, w.q_proj, q)?;
    linear(h, rows, w.k_proj, k)?;
    linear(h, rows, w.v_proj, v)?;
    kv.append(k, v, batch, q_len)?;
    let shape = AttentionShape {
        batch,
        n_heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        q_len,
        kv_len: kv.kv_len() + q_len,
        kv_capacity: kv.capacity(),
    };
    let scale = (cfg.head_dim() as f32).powf(-0.5);
    let attn = sized(&mut s.attn, rows * hd);
    kv.attend(q, key_valid, &shape, scale, attn)?;
    let o = sized(&mut s.o, rows * hd);
    linear(attn, rows, w.out_proj, o)?;
    add_assign(x, o);
    if !cfg.do_layer_norm_before {
        h.copy_from_slice(x);
        layer_norm(h, hd, w.layer_norm, x)?;
    }
    Ok(())
}

/// One MLP layer over `x` (`[rows, hidden]`, updated in place).
pub fn mlp(cfg: &OptConfig, w: MlpParams<'_>, x: &mut [f32], s: &mut LayerScratch) -> Result<()> {
    let hd = cfg.hidden_size;
    let rows = x.len() / hd;
    let h = sized(&mut s.h, rows * hd);
    if cfg.do_layer_norm_before {
        layer_norm(x, hd, w.layer_norm, h)?;
    } else {
        h.copy_from_slice(x);
    }
    let ff = sized(&mut s.ff, rows * cfg.ffn_dim);
    linear(h, rows, w.fc1, ff)?;
    kernels::relu_inplace(ff);
    let o = sized(&mut s.o, rows * hd);
    linear(ff, rows, w.fc2, o)?;
    add_assign(x, o);
    if !cfg.do_layer_norm_before {
        h.copy_from_slice(x);
        layer_norm(h, hd, w.layer_norm, x)?;
    }
    Ok(())
}

/// Logits `[rows, vocab]` of hidden states `x` (`[rows, hidden]`, used as scratch).
pub fn output_logits(
    cfg: &OptConfig,
    w: OutputParams<'_>,
    x: &mut [f32],
    logits: &mut Vec<f32>,
    s: &mut LayerScratch,
) -> Result<()> {
    let hd = cfg.hidden_size;
    let rows = x.len() / hd;
    if let Some(ln) = w.final_layer_norm {
        let tmp = sized(&mut s.h, rows * hd);
        layer_norm(x, hd, ln, tmp)?;
        x.copy_from_slice(tmp);
    }
    let last: &[f32] = if let Some(proj) = w.project_out {
        let tmp = sized(&mut s.o, rows * cfg.word_embed_dim());
        proj.linear(x, rows, None, tmp)?;
        tmp
    } else {
        x
    };
    logits.resize(rows * cfg.vocab_size, 0.0);
    w.embed_tokens.linear(last, rows, None, logits)?;
    Ok(())
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}
