//! OPT on the offloading runtime ([`flexgen_offload`]): the model as a list of layers that
//! declare their weights and KV cache, running FlexGen's block schedule under a [`Policy`], so
//! a model larger than RAM runs with weights (and cache) on disk.
//!
//! Layers, as in FlexGen: input embedding, then per decoder layer either attention and MLP as
//! two layers (`sep_layer`) or one layer (whose attention and MLP weights are still placed
//! separately), then the output head. Each layer's forward is the same function
//! [`OptModel::forward`](crate::OptModel::forward) runs ([`crate::layers`]), so for a policy
//! that changes no numerics (no compression or sparsity beyond what the in-memory model
//! uses) the tokens are the in-memory model's.
//!
//! ```no_run
//! use flexgen_opt::offloaded::OffloadedOpt;
//! use flexgen_opt::{GenerationConfig, OptTokenizer};
//! use flexgen_offload::Policy;
//!
//! # fn main() -> flexgen_opt::Result<()> {
//! // Weights on disk (read per token), KV cache and activations in memory.
//! let policy = Policy::default().with_percent([0.0, 0.0, 100.0, 0.0, 100.0, 0.0]);
//! let model = OffloadedOpt::from_pretrained("path/to/opt-6.7b", &policy)?;
//! let tok = OptTokenizer::from_dir("path/to/opt-6.7b")?;
//! let prompts = vec![tok.encode("Paris is the capital city of")?];
//! let outs = model.generate(&prompts, &GenerationConfig::greedy(16), Some(&tok), |_| {
//!     flexgen_opt::Flow::Continue
//! })?;
//! println!("{}", outs[0].text);
//! # Ok(())
//! # }
//! ```

use std::path::Path;
use std::sync::Mutex;

use flexgen_core::kernels::AttentionShape;
use flexgen_core::DType;
use flexgen_offload::{
    check_block, BlockModel, BlockStats, CacheSpec, CacheView, DynError, Elem, FileLocation,
    LayerSpec, OffloadOptions, PlaneSpec, Policy, Runtime, Step, Tensor, TensorKind, WeightSource,
    WeightSpec,
};
use flexgen_quant::{attention_packed, CompressionConfig, PackedKvCache};
use half::f16;

use crate::checkpoint::Checkpoint;
use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::generation::{validate_rows, RowDecoder};
use crate::generation::{FinishReason, Flow, GenerationConfig, GenerationOutput, TokenEvent};
use crate::layers::{
    self, AttentionParams, InputParams, KvSlot, KvStore, LayerScratch, MlpParams, OutputParams,
};
use crate::sampling::Sampler;
use crate::tokenizer::{OptTokenizer, PAD_TOKEN_ID};
use crate::weight::Weight;
use crate::weights::{DummySource, LayerNormWeights, Linear, TensorSource};

/// Indices of a linear layer's weight and bias among its layer's tensors.
#[derive(Debug, Clone, Copy)]
struct LinIdx {
    w: usize,
    b: Option<usize>,
}

/// Indices of a layer norm's parameters.
#[derive(Debug, Clone, Copy)]
struct LnIdx {
    w: Option<usize>,
    b: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct AttnIdx {
    q: LinIdx,
    k: LinIdx,
    v: LinIdx,
    out: LinIdx,
    ln: LnIdx,
}

#[derive(Debug, Clone, Copy)]
struct MlpIdx {
    fc1: LinIdx,
    fc2: LinIdx,
    ln: LnIdx,
}

/// What a scheduled layer computes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Input {
        tokens: usize,
        positions: usize,
        project_in: Option<usize>,
    },
    Attention(AttnIdx),
    Mlp(MlpIdx),
    Decoder(AttnIdx, MlpIdx),
    Output {
        ln: Option<LnIdx>,
        project_out: Option<usize>,
        tokens: usize,
    },
}

/// Collects a layer's weight specs (in FlexGen's order) and their indices.
struct Specs<'a> {
    cfg: &'a OptConfig,
    src: &'a dyn TensorSource,
    dtype: Option<DType>,
    groups: Vec<Vec<WeightSpec>>,
    group: Vec<WeightSpec>,
    n: usize,
}

impl<'a> Specs<'a> {
    fn new(cfg: &'a OptConfig, src: &'a dyn TensorSource, dtype: Option<DType>) -> Self {
        Specs {
            cfg,
            src,
            dtype,
            groups: Vec::new(),
            group: Vec::new(),
            n: 0,
        }
    }

    fn push(&mut self, spec: WeightSpec) -> usize {
        self.group.push(spec);
        self.n += 1;
        self.n - 1
    }

    fn matrix(&mut self, name: String, rows: usize, cols: usize) -> Result<usize> {
        let dtype = match self.dtype {
            Some(d) => d,
            None => self.src.dtype(&name)?,
        };
        Ok(self.push(WeightSpec::matrix(name, rows, cols, dtype)))
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) -> Result<LinIdx> {
        let w = self.matrix(format!("{prefix}.weight"), out, inp)?;
        let b = self
            .cfg
            .enable_bias
            .then(|| self.push(WeightSpec::vector(format!("{prefix}.bias"), out)));
        Ok(LinIdx { w, b })
    }

    fn layer_norm(&mut self, prefix: &str) -> LnIdx {
        let h = self.cfg.hidden_size;
        if self.cfg.layer_norm_elementwise_affine {
            LnIdx {
                w: Some(self.push(WeightSpec::vector(format!("{prefix}.weight"), h))),
                b: Some(self.push(WeightSpec::vector(format!("{prefix}.bias"), h))),
            }
        } else {
            LnIdx { w: None, b: None }
        }
    }

    fn attention(&mut self, l: usize) -> Result<AttnIdx> {
        let h = self.cfg.hidden_size;
        let p = format!("decoder.layers.{l}");
        let idx = AttnIdx {
            q: self.linear(&format!("{p}.self_attn.q_proj"), h, h)?,
            k: self.linear(&format!("{p}.self_attn.k_proj"), h, h)?,
            v: self.linear(&format!("{p}.self_attn.v_proj"), h, h)?,
            out: self.linear(&format!("{p}.self_attn.out_proj"), h, h)?,
            ln: self.layer_norm(&format!("{p}.self_attn_layer_norm")),
        };
        self.end_group();
        Ok(idx)
    }

    fn mlp(&mut self, l: usize) -> Result<MlpIdx> {
        let (h, f) = (self.cfg.hidden_size, self.cfg.ffn_dim);
        let p = format!("decoder.layers.{l}");
        let idx = MlpIdx {
            fc1: self.linear(&format!("{p}.fc1"), f, h)?,
            fc2: self.linear(&format!("{p}.fc2"), h, f)?,
            ln: self.layer_norm(&format!("{p}.final_layer_norm")),
        };
        self.end_group();
        Ok(idx)
    }

    fn end_group(&mut self) {
        if !self.group.is_empty() {
            self.groups.push(std::mem::take(&mut self.group));
        }
    }

    fn finish(&mut self, name: String, cache: Option<CacheSpec>) -> LayerSpec {
        self.end_group();
        self.n = 0;
        LayerSpec {
            name,
            groups: std::mem::take(&mut self.groups),
            cache,
        }
    }
}

/// How attention layers keep and read their KV cache.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KvMode {
    /// `f32` keys and values; decode attention keeps the top `sparsity` share of old value
    /// rows (1.0: dense).
    Dense { sparsity: f64 },
    /// Group-wise quantized along head_dim ([`PackedKvCache`]).
    Packed(CompressionConfig),
}

/// OPT's layers as the runtime sees them (the [`BlockModel`]).
#[derive(Debug)]
pub struct OptLayers {
    cfg: OptConfig,
    kinds: Vec<Kind>,
    specs: Vec<LayerSpec>,
    kv: KvMode,
}

impl OptLayers {
    /// The layer list of `cfg` under `policy` (`sep_layer`), with 2-D weights in `dtype` (or
    /// as `src` stores them).
    fn new(
        cfg: &OptConfig,
        src: &dyn TensorSource,
        dtype: Option<DType>,
        policy: &Policy,
    ) -> Result<Self> {
        let (h, e) = (cfg.hidden_size, cfg.word_embed_dim());
        let mut s = Specs::new(cfg, src, dtype);
        let mut kinds = Vec::new();
        let mut specs = Vec::new();
        let embed = "decoder.embed_tokens.weight".to_string();
        let input = Kind::Input {
            tokens: s.matrix(embed.clone(), cfg.vocab_size, e)?,
            positions: s.matrix(
                "decoder.embed_positions.weight".into(),
                cfg.max_position_embeddings + 2,
                h,
            )?,
            project_in: if cfg.has_projections() {
                Some(s.matrix("decoder.project_in.weight".into(), h, e)?)
            } else {
                None
            },
        };
        kinds.push(input);
        specs.push(s.finish("input embedding".into(), None));
        let kv_mode = if policy.compress_cache {
            KvMode::Packed(policy.comp_cache_config)
        } else {
            KvMode::Dense {
                sparsity: policy.attn_sparsity,
            }
        };
        let kv = Some(CacheSpec {
            planes: match kv_mode {
                KvMode::Dense { .. } => vec![
                    PlaneSpec {
                        elem: Elem::F32,
                        per_token: h,
                    };
                    2
                ],
                KvMode::Packed(c) => {
                    let (codes, params) =
                        PackedKvCache::token_layout(&c, cfg.num_attention_heads, cfg.head_dim());
                    let code_plane = PlaneSpec {
                        elem: Elem::U8,
                        per_token: codes,
                    };
                    let param_plane = PlaneSpec {
                        elem: Elem::F16,
                        per_token: params,
                    };
                    vec![code_plane, param_plane, code_plane, param_plane]
                }
            },
        });
        for l in 0..cfg.num_hidden_layers {
            if policy.sep_layer {
                kinds.push(Kind::Attention(s.attention(l)?));
                specs.push(s.finish(format!("attention {l}"), kv.clone()));
                kinds.push(Kind::Mlp(s.mlp(l)?));
                specs.push(s.finish(format!("mlp {l}"), None));
            } else {
                let a = s.attention(l)?;
                let m = s.mlp(l)?;
                kinds.push(Kind::Decoder(a, m));
                specs.push(s.finish(format!("decoder layer {l}"), kv.clone()));
            }
        }
        let ln = cfg
            .has_final_layer_norm()
            .then(|| s.layer_norm("decoder.final_layer_norm"));
        let project_out = if cfg.has_projections() {
            Some(s.matrix("decoder.project_out.weight".into(), e, h)?)
        } else {
            None
        };
        let tokens = s.matrix(embed, cfg.vocab_size, e)?;
        kinds.push(Kind::Output {
            ln,
            project_out,
            tokens,
        });
        specs.push(s.finish("output head".into(), None));
        Ok(OptLayers {
            cfg: cfg.clone(),
            kinds,
            specs,
            kv: kv_mode,
        })
    }
}

/// Checks that tensor `i` is a 2-D weight.
fn check_matrix(w: &[Tensor], i: usize) -> std::result::Result<(), DynError> {
    match &w[i] {
        Tensor::Dense(_) | Tensor::Packed(_) => Ok(()),
        other => Err(format!("weight {i} is {}, expected a matrix", other.describe()).into()),
    }
}

fn check_vector(w: &[Tensor], i: Option<usize>) -> std::result::Result<(), DynError> {
    match i.map(|i| (i, &w[i])) {
        None | Some((_, Tensor::Vector(_))) => Ok(()),
        Some((i, other)) => {
            Err(format!("weight {i} is {}, expected a vector", other.describe()).into())
        }
    }
}

fn check_linear(w: &[Tensor], l: LinIdx) -> std::result::Result<(), DynError> {
    check_matrix(w, l.w)?;
    check_vector(w, l.b)
}

fn check_ln(w: &[Tensor], l: LnIdx) -> std::result::Result<(), DynError> {
    check_vector(w, l.w)?;
    check_vector(w, l.b)
}

/// Moves a (checked) 2-D weight out of the runtime's tensors.
fn take_weight(w: &mut [Tensor], i: usize) -> Weight {
    match w[i].take() {
        Tensor::Dense(m) => Weight::Dense(m),
        Tensor::Packed(q) => Weight::Packed(q),
        _ => unreachable!("checked by check_matrix"),
    }
}

fn put_weight(w: &mut [Tensor], i: usize, weight: Weight) {
    w[i] = match weight {
        Weight::Dense(m) => Tensor::Dense(m),
        Weight::Packed(q) => Tensor::Packed(q),
    };
}

fn take_vec(w: &mut [Tensor], i: Option<usize>) -> Option<Vec<f32>> {
    i.map(|i| match w[i].take() {
        Tensor::Vector(v) => v,
        _ => unreachable!("checked by check_vector"),
    })
}

fn put_vec(w: &mut [Tensor], i: Option<usize>, v: Option<Vec<f32>>) {
    if let (Some(i), Some(v)) = (i, v) {
        w[i] = Tensor::Vector(v);
    }
}

fn take_linear(w: &mut [Tensor], l: LinIdx) -> Linear {
    Linear {
        weight: take_weight(w, l.w),
        bias: take_vec(w, l.b),
    }
}

fn put_linear(w: &mut [Tensor], l: LinIdx, lin: Linear) {
    put_weight(w, l.w, lin.weight);
    put_vec(w, l.b, lin.bias);
}

fn take_ln(w: &mut [Tensor], l: LnIdx) -> LayerNormWeights {
    LayerNormWeights {
        weight: take_vec(w, l.w),
        bias: take_vec(w, l.b),
    }
}

fn put_ln(w: &mut [Tensor], l: LnIdx, ln: LayerNormWeights) {
    put_vec(w, l.w, ln.weight);
    put_vec(w, l.b, ln.bias);
}

/// One micro-batch's state between layers.
#[derive(Debug)]
pub struct OptBatch {
    rows: usize,
    capacity: usize,
    /// Input tokens of the current step, `[rows, q_len]`.
    tokens: Vec<u32>,
    valid: Vec<bool>,
    seen: Vec<usize>,
    /// `[rows, capacity]`: false for padding.
    mask: Vec<bool>,
    key_valid: Vec<bool>,
    pos_ids: Vec<u32>,
    x: Vec<f32>,
    sel: Vec<f32>,
    logits: Vec<f32>,
    scratch: LayerScratch,
}

impl OptBatch {
    /// A micro-batch of left-padded prompts (`tokens`, `valid`: `[rows, prompt_len]`).
    fn new(rows: usize, capacity: usize, tokens: Vec<u32>, valid: Vec<bool>) -> Self {
        OptBatch {
            rows,
            capacity,
            tokens,
            valid,
            seen: vec![0; rows],
            mask: vec![false; rows * capacity],
            key_valid: Vec::new(),
            pos_ids: Vec::new(),
            x: Vec::new(),
            sel: Vec::new(),
            logits: Vec::new(),
            scratch: LayerScratch::default(),
        }
    }
}

impl OptLayers {
    fn input(
        &self,
        step: &Step,
        w: &mut [Tensor],
        idx: (usize, usize, Option<usize>),
        b: &mut OptBatch,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let q = step.q_len;
        let max_seen = layers::positions(&b.valid, q, &mut b.seen, &mut b.pos_ids);
        if max_seen > cfg.max_position_embeddings {
            return Err(Error::PromptTooLong {
                row: b.seen.iter().position(|&c| c == max_seen).unwrap_or(0),
                prompt_tokens: max_seen,
                new_tokens: 0,
                max_positions: cfg.max_position_embeddings,
            });
        }
        for row in 0..b.rows {
            let dst = row * b.capacity + step.kv_len;
            b.mask[dst..dst + q].copy_from_slice(&b.valid[row * q..(row + 1) * q]);
        }
        b.key_valid.clear();
        for row in 0..b.rows {
            let src = row * b.capacity;
            b.key_valid
                .extend_from_slice(&b.mask[src..src + step.kv_len + q]);
        }
        let (tokens, positions, project_in) = idx;
        let et = take_weight(w, tokens);
        let ep = take_weight(w, positions);
        let pi = project_in.map(|i| take_weight(w, i));
        let x = layers::sized(&mut b.x, b.rows * q * cfg.hidden_size);
        let params = InputParams {
            embed_tokens: &et,
            embed_positions: &ep,
            project_in: pi.as_ref(),
        };
        let r = layers::input_embedding(cfg, params, &b.tokens, &b.pos_ids, x, &mut b.scratch);
        put_weight(w, tokens, et);
        put_weight(w, positions, ep);
        if let (Some(i), Some(p)) = (project_in, pi) {
            put_weight(w, i, p);
        }
        r
    }

    fn attention(
        &self,
        step: &Step,
        w: &mut [Tensor],
        a: AttnIdx,
        cache: Option<CacheView<'_>>,
        b: &mut OptBatch,
    ) -> Result<()> {
        let view = cache
            .ok_or_else(|| Error::InvalidRequest("attention layer without a KV cache".into()))?;
        let (q, kk, vv, o) = (
            take_linear(w, a.q),
            take_linear(w, a.k),
            take_linear(w, a.v),
            take_linear(w, a.out),
        );
        let ln = take_ln(w, a.ln);
        let params = AttentionParams {
            q_proj: &q,
            k_proj: &kk,
            v_proj: &vv,
            out_proj: &o,
            layer_norm: &ln,
        };
        let cfg = &self.cfg;
        let r = match self.kv {
            KvMode::Dense { sparsity } => dense_store(view, sparsity).and_then(|kv| {
                layers::self_attention(
                    cfg,
                    params,
                    &mut b.x,
                    step.q_len,
                    kv,
                    &b.key_valid,
                    &mut b.scratch,
                )
            }),
            KvMode::Packed(c) => PackedStore::take(view, c, cfg).and_then(|mut kv| {
                let r = layers::self_attention(
                    cfg,
                    params,
                    &mut b.x,
                    step.q_len,
                    &mut kv,
                    &b.key_valid,
                    &mut b.scratch,
                );
                kv.put_back();
                r
            }),
        };
        put_linear(w, a.q, q);
        put_linear(w, a.k, kk);
        put_linear(w, a.v, vv);
        put_linear(w, a.out, o);
        put_ln(w, a.ln, ln);
        r
    }

    fn mlp(&self, w: &mut [Tensor], m: MlpIdx, b: &mut OptBatch) -> Result<()> {
        let (fc1, fc2, ln) = (
            take_linear(w, m.fc1),
            take_linear(w, m.fc2),
            take_ln(w, m.ln),
        );
        let params = MlpParams {
            fc1: &fc1,
            fc2: &fc2,
            layer_norm: &ln,
        };
        let r = layers::mlp(&self.cfg, params, &mut b.x, &mut b.scratch);
        put_linear(w, m.fc1, fc1);
        put_linear(w, m.fc2, fc2);
        put_ln(w, m.ln, ln);
        r
    }

    fn output(
        &self,
        step: &Step,
        w: &mut [Tensor],
        idx: (Option<LnIdx>, Option<usize>, usize),
        b: &mut OptBatch,
    ) -> Result<()> {
        let hd = self.cfg.hidden_size;
        let q = step.q_len;
        let sel = layers::sized(&mut b.sel, b.rows * hd);
        for row in 0..b.rows {
            let src = (row * q + q - 1) * hd;
            sel[row * hd..(row + 1) * hd].copy_from_slice(&b.x[src..src + hd]);
        }
        let (ln_idx, project_out, tokens) = idx;
        let ln = ln_idx.map(|l| take_ln(w, l));
        let po = project_out.map(|i| take_weight(w, i));
        let et = take_weight(w, tokens);
        let params = OutputParams {
            final_layer_norm: ln.as_ref(),
            project_out: po.as_ref(),
            embed_tokens: &et,
        };
        let r = layers::output_logits(&self.cfg, params, sel, &mut b.logits, &mut b.scratch);
        if let (Some(l), Some(ln)) = (ln_idx, ln) {
            put_ln(w, l, ln);
        }
        if let (Some(i), Some(p)) = (project_out, po) {
            put_weight(w, i, p);
        }
        put_weight(w, tokens, et);
        r
    }
}

/// A dense cache view as a [`KvStore`], with FlexGen's sparse decode attention when
/// `sparsity < 1`.
struct DenseStore<'a> {
    slot: KvSlot<'a>,
    sparsity: f64,
}

fn dense_store(view: CacheView<'_>, sparsity: f64) -> Result<DenseStore<'_>> {
    let (k, v) = view.planes.split_at_mut(1);
    Ok(DenseStore {
        slot: KvSlot {
            keys: k[0].as_f32_mut()?,
            values: v[0].as_f32_mut()?,
            capacity: view.capacity,
            kv_len: view.kv_len,
        },
        sparsity,
    })
}

impl KvStore for DenseStore<'_> {
    fn kv_len(&self) -> usize {
        self.slot.kv_len
    }

    fn capacity(&self) -> usize {
        self.slot.capacity
    }

    fn append(&mut self, k: &[f32], v: &[f32], batch: usize, q_len: usize) -> Result<()> {
        self.slot.append(k, v, batch, q_len)
    }

    fn attend(
        &self,
        q: &[f32],
        key_valid: &[bool],
        shape: &AttentionShape,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        if self.sparsity < 1.0 && shape.q_len == 1 {
            sparse_decode_attention(
                q,
                self.slot.keys,
                self.slot.values,
                key_valid,
                shape,
                scale,
                self.sparsity,
                out,
            )
        } else {
            self.slot.attend(q, key_valid, shape, scale, out)
        }
    }
}

/// FlexGen's sparse decode attention (`attn_sparsity < 1`): softmax over every valid key,
/// then only the `floor(sparsity · n_old)` old positions with the largest weights (ties to the
/// earlier position) plus the new token contribute their value rows; the kept weights are not
/// renormalized. `n_old` counts the row's valid old positions, where FlexGen uses
/// `kv_len − 1` (padding included): with left padding that would make a row's output depend on
/// the other prompts of its block. Decode only (`q_len == 1`); `k`, `v`, `key_valid` and `out`
/// are laid out as for [`flexgen_core::kernels::attention`].
#[allow(clippy::too_many_arguments)]
pub fn sparse_decode_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    sparsity: f64,
    out: &mut [f32],
) -> Result<()> {
    let s = *shape;
    let (hd, hidden) = (s.head_dim, s.n_heads * s.head_dim);
    let need = |what: &str, got: usize, want: usize| {
        if got < want {
            Err(Error::InvalidRequest(format!(
                "sparse attention: {what} has {got} values, needs {want}"
            )))
        } else {
            Ok(())
        }
    };
    if s.q_len != 1 || s.kv_len == 0 || s.kv_len > s.kv_capacity {
        return Err(Error::InvalidRequest(format!(
            "sparse attention is for one new token per sequence over 1..=capacity keys, \
             got q_len {} kv_len {} capacity {}",
            s.q_len, s.kv_len, s.kv_capacity
        )));
    }
    need("q", q.len(), s.batch * hidden)?;
    need("out", out.len(), s.batch * hidden)?;
    need("k", k.len(), s.batch * s.kv_capacity * hidden)?;
    need("v", v.len(), s.batch * s.kv_capacity * hidden)?;
    need("key_valid", key_valid.len(), s.batch * s.kv_len)?;
    let last = s.kv_len - 1;
    let mut weights = vec![0.0f32; s.kv_len];
    let mut order: Vec<usize> = Vec::with_capacity(last);
    for b in 0..s.batch {
        let valid = &key_valid[b * s.kv_len..(b + 1) * s.kv_len];
        for h in 0..s.n_heads {
            let qo = b * hidden + h * hd;
            let qv = &q[qo..qo + hd];
            let mut mx = f32::NEG_INFINITY;
            for (j, w) in weights.iter_mut().enumerate() {
                *w = f32::NEG_INFINITY;
                if valid[j] {
                    let ko = (b * s.kv_capacity + j) * hidden + h * hd;
                    let d: f32 = qv.iter().zip(&k[ko..ko + hd]).map(|(a, b)| a * b).sum();
                    *w = d * scale;
                    mx = mx.max(*w);
                }
            }
            let o = &mut out[qo..qo + hd];
            o.fill(0.0);
            if mx == f32::NEG_INFINITY {
                continue;
            }
            let mut sum = 0.0f32;
            for w in weights.iter_mut() {
                *w = (*w - mx).exp();
                sum += *w;
            }
            order.clear();
            order.extend((0..last).filter(|&j| valid[j]));
            let kept = (sparsity * order.len() as f64).floor() as usize;
            if kept < order.len() {
                let by_weight =
                    |a: &usize, b: &usize| weights[*b].total_cmp(&weights[*a]).then(a.cmp(b));
                if kept > 0 {
                    order.select_nth_unstable_by(kept - 1, by_weight);
                }
                order.truncate(kept);
            }
            order.sort_unstable();
            for &j in order.iter().chain(valid[last].then_some(&last)) {
                let p = weights[j] / sum;
                let vo = (b * s.kv_capacity + j) * hidden + h * hd;
                for (o, x) in o.iter_mut().zip(&v[vo..vo + hd]) {
                    *o += p * x;
                }
            }
        }
    }
    Ok(())
}

/// A compressed cache view as a [`KvStore`]: the planes are moved into a [`PackedKvCache`]
/// for the step and back after.
struct PackedStore<'a> {
    planes: &'a mut [flexgen_offload::PlaneBuf],
    cache: Option<PackedKvCache>,
    kv_len: usize,
}

impl<'a> PackedStore<'a> {
    fn take(view: CacheView<'a>, config: CompressionConfig, cfg: &OptConfig) -> Result<Self> {
        let kc = std::mem::take(view.planes[0].as_u8_vec()?);
        let kp: Vec<f16> = std::mem::take(view.planes[1].as_f16_vec()?);
        let vc = std::mem::take(view.planes[2].as_u8_vec()?);
        let vp: Vec<f16> = std::mem::take(view.planes[3].as_f16_vec()?);
        let cache = PackedKvCache::from_parts(
            config,
            view.seqs,
            cfg.num_attention_heads,
            cfg.head_dim(),
            view.capacity,
            (kc, kp),
            (vc, vp),
        )?;
        Ok(PackedStore {
            planes: view.planes,
            cache: Some(cache),
            kv_len: view.kv_len,
        })
    }

    /// Returns the buffers to the runtime's planes.
    fn put_back(&mut self) {
        if let Some(c) = self.cache.take() {
            let ((kc, kp), (vc, vp)) = c.into_parts();
            self.planes[0] = flexgen_offload::PlaneBuf::U8(kc);
            self.planes[1] = flexgen_offload::PlaneBuf::F16(kp);
            self.planes[2] = flexgen_offload::PlaneBuf::U8(vc);
            self.planes[3] = flexgen_offload::PlaneBuf::F16(vp);
        }
    }

    fn cache(&self) -> Result<&PackedKvCache> {
        self.cache
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("compressed cache already returned".into()))
    }
}

impl KvStore for &mut PackedStore<'_> {
    fn kv_len(&self) -> usize {
        self.kv_len
    }

    fn capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, PackedKvCache::capacity)
    }

    fn append(&mut self, k: &[f32], v: &[f32], _batch: usize, q_len: usize) -> Result<()> {
        let pos = self.kv_len;
        match self.cache.as_mut() {
            Some(c) => Ok(c.store(pos, k, v, q_len)?),
            None => Err(Error::InvalidRequest(
                "compressed cache already returned".into(),
            )),
        }
    }

    fn attend(
        &self,
        q: &[f32],
        key_valid: &[bool],
        shape: &AttentionShape,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        Ok(attention_packed(
            q,
            self.cache()?,
            key_valid,
            shape,
            scale,
            out,
        )?)
    }
}

impl BlockModel for OptLayers {
    type Batch = OptBatch;

    fn layers(&self) -> &[LayerSpec] {
        &self.specs
    }

    fn rows(&self, batch: &OptBatch) -> usize {
        batch.rows
    }

    fn forward(
        &self,
        step: &Step,
        w: &mut [Tensor],
        cache: Option<CacheView<'_>>,
        b: &mut OptBatch,
    ) -> std::result::Result<(), DynError> {
        match self.kinds[step.layer] {
            Kind::Input {
                tokens,
                positions,
                project_in,
            } => {
                check_matrix(w, tokens)?;
                check_matrix(w, positions)?;
                if let Some(i) = project_in {
                    check_matrix(w, i)?;
                }
                self.input(step, w, (tokens, positions, project_in), b)?;
            }
            Kind::Attention(a) => {
                for l in [a.q, a.k, a.v, a.out] {
                    check_linear(w, l)?;
                }
                check_ln(w, a.ln)?;
                self.attention(step, w, a, cache, b)?;
            }
            Kind::Mlp(m) => {
                check_linear(w, m.fc1)?;
                check_linear(w, m.fc2)?;
                check_ln(w, m.ln)?;
                self.mlp(w, m, b)?;
            }
            Kind::Decoder(a, m) => {
                for l in [a.q, a.k, a.v, a.out, m.fc1, m.fc2] {
                    check_linear(w, l)?;
                }
                check_ln(w, a.ln)?;
                check_ln(w, m.ln)?;
                self.attention(step, w, a, cache, b)?;
                self.mlp(w, m, b)?;
            }
            Kind::Output {
                ln,
                project_out,
                tokens,
            } => {
                if let Some(l) = ln {
                    check_ln(w, l)?;
                }
                if let Some(i) = project_out {
                    check_matrix(w, i)?;
                }
                check_matrix(w, tokens)?;
                self.output(step, w, (ln, project_out, tokens), b)?;
            }
        }
        Ok(())
    }

    fn activation<'a>(&self, batch: &'a mut OptBatch) -> &'a mut Vec<f32> {
        &mut batch.x
    }

    fn activation_bytes(&self, rows: usize, q_len: usize) -> u64 {
        (rows * q_len * self.cfg.hidden_size * 4) as u64
    }
}

/// The runtime's view of an OPT weight source: tensors by name, and where a checkpoint
/// already holds them on disk.
struct Source<'a> {
    tensors: &'a dyn TensorSource,
    ckpt: Option<&'a Checkpoint>,
}

impl WeightSource for Source<'_> {
    fn load(&self, spec: &WeightSpec) -> std::result::Result<Tensor, DynError> {
        Ok(match spec.kind {
            TensorKind::Matrix { rows, cols, .. } => {
                Tensor::Dense(self.tensors.matrix(&spec.name, rows, cols)?)
            }
            TensorKind::Vector { len } => Tensor::Vector(self.tensors.vector(&spec.name, len)?),
        })
    }

    fn file_location(&self, spec: &WeightSpec) -> Option<FileLocation> {
        let loc = self.ckpt?.locate(&spec.name).ok()?;
        match spec.kind {
            TensorKind::Matrix { rows, cols, dtype }
                if loc.dtype == dtype && loc.shape == [rows, cols] =>
            {
                Some(FileLocation {
                    path: loc.path,
                    offset: loc.offset,
                    len: loc.len,
                })
            }
            _ => None,
        }
    }
}

/// An OPT model run by the offloading runtime under a [`Policy`].
pub struct OffloadedOpt {
    layers: OptLayers,
    policy: Policy,
    runtime: Mutex<Runtime>,
    stats: Mutex<Vec<BlockStats>>,
}

impl std::fmt::Debug for OffloadedOpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadedOpt")
            .field("config", &self.layers.cfg)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl OffloadedOpt {
    /// Loads a Hugging Face OPT folder under `policy` with default [`OffloadOptions`] (offload
    /// directory under the system temp dir, direct I/O, budgets from the machine's memory).
    pub fn from_pretrained(dir: impl AsRef<Path>, policy: &Policy) -> Result<Self> {
        Self::load(
            dir,
            None,
            policy,
            &OffloadOptions::default(),
            &mut |_, _| {},
        )
    }

    /// Loads a Hugging Face OPT folder: weights placed per `policy` (2-D weights in `dtype`, or
    /// as stored); disk-homed weights of the right dtype are read in place from the checkpoint,
    /// others written once to the offload directory. `progress(done, total)` is called per
    /// weight.
    pub fn load(
        dir: impl AsRef<Path>,
        dtype: Option<DType>,
        policy: &Policy,
        options: &OffloadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                what: "model folder",
                path: dir.to_path_buf(),
            });
        }
        let config = OptConfig::from_file(dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::build(
            &config,
            &ckpt,
            Some(&ckpt),
            dtype,
            policy,
            options,
            progress,
        )
    }

    /// Dummy weights (FlexGen's `_DUMMY_`, the same values as
    /// [`OptModel::dummy`](crate::OptModel::dummy)), generated one tensor at a time, so weights
    /// homed on disk never all sit in memory.
    pub fn dummy(
        config: OptConfig,
        dtype: DType,
        seed: u64,
        policy: &Policy,
        options: &OffloadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        config.validate()?;
        let src = DummySource::new(&config, dtype, seed);
        Self::build(&config, &src, None, Some(dtype), policy, options, progress)
    }

    fn build(
        config: &OptConfig,
        tensors: &dyn TensorSource,
        ckpt: Option<&Checkpoint>,
        dtype: Option<DType>,
        policy: &Policy,
        options: &OffloadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        policy.validate()?;
        let layers = OptLayers::new(config, tensors, dtype, policy)?;
        if let Some(shape) = options.planned_block {
            check_block(&layers, policy, &options.budgets, shape)?;
        }
        let source = Source { tensors, ckpt };
        let runtime = Runtime::new(&layers.specs, &source, policy, options, progress)?;
        Ok(OffloadedOpt {
            layers,
            policy: policy.clone(),
            runtime: Mutex::new(runtime),
            stats: Mutex::new(Vec::new()),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &OptConfig {
        &self.layers.cfg
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The layers as scheduled.
    pub fn layer_specs(&self) -> &[LayerSpec] {
        &self.layers.specs
    }

    /// Runs `f` on the runtime (placement, accounting, I/O totals).
    pub fn with_runtime<R>(&self, f: impl FnOnce(&Runtime) -> R) -> R {
        f(&self.runtime.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The statistics of the blocks run since the last call.
    pub fn take_stats(&self) -> Vec<BlockStats> {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Like [`crate::generate`]: row `i` samples with seed `cfg.seed + i`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
        on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<Vec<GenerationOutput>> {
        self.generate_rows(prompts, &cfg.per_row(prompts.len()), tokenizer, on_token)
    }

    /// Like [`crate::generate_rows`], run as blocks of `gpu_batch_size × num_gpu_batches`
    /// prompts (left-padded per block). A block ends when every row in it has stopped.
    /// [`Flow::StopAll`] cancels the rows of later blocks before they start.
    pub fn generate_rows(
        &self,
        prompts: &[Vec<u32>],
        cfgs: &[GenerationConfig],
        tokenizer: Option<&OptTokenizer>,
        mut on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<Vec<GenerationOutput>> {
        let mc = &self.layers.cfg;
        validate_rows(mc, prompts, cfgs, tokenizer)?;
        let mut rows: Vec<RowDecoder> = prompts
            .iter()
            .zip(cfgs)
            .map(|(p, cfg)| RowDecoder::new(mc, cfg, tokenizer, p.len()))
            .collect();
        let active: Vec<usize> = (0..rows.len())
            .filter(|&r| rows[r].finish_reason().is_none())
            .collect();
        let gbs = self.policy.gpu_batch_size;
        let mut sampler = Sampler::default();
        let mut stop_all = false;
        let mut runtime = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        for block in active.chunks(self.policy.block_size()) {
            if stop_all {
                block.iter().for_each(|&r| rows[r].cancel());
                continue;
            }
            let prompt_len = block.iter().map(|&r| prompts[r].len()).max().unwrap_or(1);
            let gen_len = block
                .iter()
                .map(|&r| cfgs[r].max_new_tokens)
                .max()
                .unwrap_or(1);
            let capacity = prompt_len + gen_len - 1;
            let mut batches: Vec<OptBatch> = block
                .chunks(gbs)
                .map(|mb| {
                    let mut tokens = vec![PAD_TOKEN_ID; mb.len() * prompt_len];
                    let mut valid = vec![false; mb.len() * prompt_len];
                    for (b, &r) in mb.iter().enumerate() {
                        let p = &prompts[r];
                        let start = b * prompt_len + prompt_len - p.len();
                        tokens[start..start + p.len()].copy_from_slice(p);
                        valid[start..start + p.len()]
                            .iter_mut()
                            .for_each(|v| *v = true);
                    }
                    OptBatch::new(mb.len(), capacity, tokens, valid)
                })
                .collect();
            let vocab = mc.vocab_size;
            let stats = runtime.run_block(
                &self.layers,
                &mut batches,
                prompt_len,
                gen_len,
                |_, batches| {
                    let mut any = false;
                    for (mb, batch) in batches.iter_mut().enumerate() {
                        batch.tokens.clear();
                        batch.valid.clear();
                        batch.valid.resize(batch.rows, true);
                        for b in 0..batch.rows {
                            let r = block[mb * gbs + b];
                            let row = &mut rows[r];
                            if stop_all {
                                row.cancel();
                            }
                            if row.finish_reason().is_some() {
                                batch.tokens.push(PAD_TOKEN_ID);
                                continue;
                            }
                            let logits = &batch.logits[b * vocab..(b + 1) * vocab];
                            let (id, flow) = row.step(
                                r,
                                logits,
                                &cfgs[r],
                                tokenizer,
                                &mut sampler,
                                &mut on_token,
                            )?;
                            stop_all |= flow == Flow::StopAll;
                            batch.tokens.push(id);
                            any |= row.finish_reason().is_none();
                        }
                    }
                    Ok(any && !stop_all)
                },
            )?;
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(stats);
        }
        Ok(rows
            .into_iter()
            .map(|r| r.into_output(FinishReason::Length))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexgen_core::kernels::attention_ref;

    /// Straightforward reference: every weight, a full sort, the top `keep` old positions.
    fn sparse_ref(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        valid: &[bool],
        s: &AttentionShape,
        scale: f32,
        sparsity: f64,
    ) -> Vec<f32> {
        let (hd, hidden) = (s.head_dim, s.n_heads * s.head_dim);
        let mut out = vec![0.0; s.batch * hidden];
        let last = s.kv_len - 1;
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                let qo = b * hidden + h * hd;
                let score = |j: usize| {
                    let ko = (b * s.kv_capacity + j) * hidden + h * hd;
                    (0..hd).map(|d| q[qo + d] * k[ko + d]).sum::<f32>() * scale
                };
                let vj: Vec<usize> = (0..s.kv_len).filter(|&j| valid[b * s.kv_len + j]).collect();
                if vj.is_empty() {
                    continue;
                }
                let mx = vj
                    .iter()
                    .map(|&j| score(j))
                    .fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = vj.iter().map(|&j| (score(j) - mx).exp()).sum();
                let mut old: Vec<usize> = vj.iter().copied().filter(|&j| j < last).collect();
                let keep = (sparsity * old.len() as f64).floor() as usize;
                old.sort_by(|&a, &b| {
                    (score(b) - mx)
                        .exp()
                        .total_cmp(&(score(a) - mx).exp())
                        .then(a.cmp(&b))
                });
                old.truncate(keep);
                if valid[b * s.kv_len + last] {
                    old.push(last);
                }
                for j in old {
                    let p = (score(j) - mx).exp() / sum;
                    let vo = (b * s.kv_capacity + j) * hidden + h * hd;
                    for d in 0..hd {
                        out[qo + d] += p * v[vo + d];
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                    / (1 << 24) as f32
                    - 0.5
            })
            .collect()
    }

    #[test]
    fn sparse_attention_keeps_the_top_weights() {
        for (batch, heads, hd, kv_len, cap) in
            [(2, 2, 8, 9, 12), (1, 3, 4, 1, 1), (3, 1, 16, 17, 17)]
        {
            let s = AttentionShape {
                batch,
                n_heads: heads,
                head_dim: hd,
                q_len: 1,
                kv_len,
                kv_capacity: cap,
            };
            let hidden = heads * hd;
            let q = data(batch * hidden, 1);
            let k = data(batch * cap * hidden, 2);
            let v = data(batch * cap * hidden, 3);
            // Some padding at the start of row 0.
            let valid: Vec<bool> = (0..batch * kv_len)
                .map(|i| !(i < kv_len && i < 2 && kv_len > 2))
                .collect();
            let scale = 0.7;
            for sparsity in [0.05, 0.3, 0.5, 0.99] {
                let mut out = vec![0.0; batch * hidden];
                sparse_decode_attention(&q, &k, &v, &valid, &s, scale, sparsity, &mut out).unwrap();
                let want = sparse_ref(&q, &k, &v, &valid, &s, scale, sparsity);
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "sparsity {sparsity}: {a} vs {b}");
                }
            }
            // Keeping every old position is dense attention.
            let mut all = vec![0.0; batch * hidden];
            sparse_decode_attention(&q, &k, &v, &valid, &s, scale, 1.0, &mut all).unwrap();
            let mut dense = vec![0.0; batch * hidden];
            attention_ref(&q, &k, &v, &valid, &s, scale, &mut dense).unwrap();
            for (a, b) in all.iter().zip(&dense) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        // Dropping rows loses weight: the output of a tiny sparsity differs from dense.
        let s = AttentionShape {
            batch: 1,
            n_heads: 1,
            head_dim: 4,
            q_len: 1,
            kv_len: 10,
            kv_capacity: 10,
        };
        let (q, k, v) = (data(4, 7), data(40, 8), data(40, 9));
        let (mut a, mut b) = (vec![0.0; 4], vec![0.0; 4]);
        sparse_decode_attention(&q, &k, &v, &[true; 10], &s, 1.0, 0.1, &mut a).unwrap();
        attention_ref(&q, &k, &v, &[true; 10], &s, 1.0, &mut b).unwrap();
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
        let bad = AttentionShape { q_len: 2, ..s };
        assert!(sparse_decode_attention(&q, &k, &v, &[true; 10], &bad, 1.0, 0.5, &mut a).is_err());
        assert!(
            sparse_decode_attention(&q, &k[..8], &v, &[true; 10], &s, 1.0, 0.5, &mut a).is_err()
        );
    }
}
