//! FlexGen's cost model (`experimental/cost_model.py`) adapted to the CPU backend.
//!
//! For one block shape (`gpu_batch_size`, `num_gpu_batches`) every time and memory term is an
//! affine function ([`Lin`]) of where the bytes are ([`Placement`]): the fraction of the
//! decoder layers' 2-D weights on disk, the same for the embedding layers, the largest
//! per-layer disk fetch, and the fraction of the KV cache on disk. The LP ([`super::lp`])
//! optimizes over those fractions; [`CostModel::evaluate`] computes the same terms for given
//! fractions or for a policy's actual placement ([`CostModel::placement_of`]).
//!
//! Per decoder layer and token (prefill: the prompt; decode: the average step, whose cache
//! holds `s + n/2` tokens), with `bls = gbs · ngb` sequences:
//! - I/O (on the I/O threads): disk-homed weights read once per block
//!   (`bytes / disk_read_bw`), the disk share of the cache written at prefill and read (plus
//!   the new token written) at each decode step, activations if they live on disk, and, when
//!   the cache is gathered into a workspace, copying its RAM share (`bytes / copy_bw`).
//! - Compute (main thread), per micro-batch: linear layers
//!   `max(FLOPs / rate(kind, rows), FLOPs / rate(kind, 1))` with the calibrated rate of the
//!   weight format at the micro-batch's row count (`gbs · s` at prefill, `gbs` at decode; the
//!   second term is the time to stream the weights from RAM once, which the CPU pays for every
//!   micro-batch), prefill attention `4·gbs·s²·h / rate(s)`, decode attention
//!   `cache bytes / calibrated attention bandwidth`.
//! - Layer time: `max(I/O, compute + (1 − ρ)·I/O)` with overlap, `I/O + compute` without.
//!   `ρ` is the calibrated [`HardwareProfile::io_compute_ratio`]: while the I/O threads work,
//!   compute runs at `ρ` times its speed alone (they share the cores), so a layer whose
//!   compute outlasts its I/O loses `(1 − ρ)·I/O` to them.
//! - The embedding and output layers add one more such layer per token (the logits of the
//!   last position of each sequence against the tied token table).
//!
//! Total `T = l · T_prefill + T_emb + (n − 1) · (l · T_decode + T_emb)`; throughput
//! `bls · n / T` (FlexGen's generation throughput).
//!
//! Peak memory (the cache is allocated for the whole block up front, so prefill and decode
//! share one peak): RAM holds the RAM-homed weights, every 1-D weight, two layers of fetch
//! buffers for disk-homed weights, the RAM share of the cache, cache workspaces (one per
//! in-flight cache transfer: three with overlap, one without) when the cache is not used in
//! place, the activations of the block and one micro-batch's scratch; disk holds the rest.

use flexgen_core::DType;
use serde::Serialize;

use super::error::{Result, SearchError};
use super::hardware::{HardwareProfile, LinearKind};
use super::shape::ModelShape;
use crate::model::LayerSpec;
use crate::placement::split_cache;
use crate::policy::Policy;
use crate::store::WeightPlan;
use crate::tier::Tier;

/// Prompt and generation lengths of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per sequence (the prefill produces the first).
    pub gen_len: usize,
}

/// How a policy stores things, beyond placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Formats {
    /// Dtype of 2-D weights when not compressed.
    #[serde(serialize_with = "serialize_dtype")]
    pub dtype: DType,
    /// 4-bit weights.
    pub compress_weight: bool,
    /// 4-bit KV cache.
    pub compress_cache: bool,
    /// Overlap I/O with compute.
    pub overlap: bool,
    /// Attention and MLP as separate schedule layers.
    pub sep_layer: bool,
}

impl Formats {
    /// The formats of `policy` with weights in `dtype`.
    pub fn of(policy: &Policy, dtype: DType) -> Self {
        Formats {
            dtype,
            compress_weight: policy.compress_weight,
            compress_cache: policy.compress_cache,
            overlap: policy.overlap,
            sep_layer: policy.sep_layer,
        }
    }
}

/// Serializes a dtype by its name (`f16`, ...).
pub(crate) fn serialize_dtype<S: serde::Serializer>(
    d: &DType,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// Whether the KV cache is used where it lives or gathered into a workspace first (the
/// runtime gathers whenever a micro-batch's cache is not whole on one RAM tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CacheMode {
    /// Whole on one RAM tier: attention reads it in place.
    InPlace,
    /// On disk, or split: copied into a workspace before attention, new rows written back.
    Gathered,
}

/// Where the bytes are, as the fractions the costs are affine in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Placement {
    /// Fraction of the decoder layers' 2-D weight bytes homed on disk.
    pub weights_disk: f64,
    /// Fraction of the embedding and output layers' 2-D weight bytes homed on disk.
    pub embed_disk: f64,
    /// The largest disk bytes of one schedule layer, as a fraction of the largest 2-D weight
    /// bytes of one schedule layer (sizes the fetch buffers).
    pub fetch: f64,
    /// Fraction of the KV cache homed on disk.
    pub cache_disk: f64,
    /// In place or gathered.
    pub cache_mode: CacheMode,
    /// Activations homed on disk (FlexGen allows it; never chosen by the search).
    pub activations_disk: bool,
}

impl Placement {
    /// The LP's view: one weight fraction for every layer, activations in RAM.
    pub fn fractions(weights_disk: f64, cache_disk: f64, cache_mode: CacheMode) -> Self {
        Placement {
            weights_disk,
            embed_disk: weights_disk,
            fetch: weights_disk,
            cache_disk,
            cache_mode,
            activations_disk: false,
        }
    }
}

/// `c + w·weights_disk + e·embed_disk + f·fetch + k·cache_disk`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Lin {
    /// Constant.
    pub c: f64,
    /// Coefficient of [`Placement::weights_disk`].
    pub w: f64,
    /// Coefficient of [`Placement::embed_disk`].
    pub e: f64,
    /// Coefficient of [`Placement::fetch`].
    pub f: f64,
    /// Coefficient of [`Placement::cache_disk`].
    pub k: f64,
}

impl Lin {
    /// A constant.
    pub fn constant(c: f64) -> Self {
        Lin {
            c,
            ..Lin::default()
        }
    }

    /// Every coefficient times `f`.
    pub fn scale(self, f: f64) -> Lin {
        Lin {
            c: self.c * f,
            w: self.w * f,
            e: self.e * f,
            f: self.f * f,
            k: self.k * f,
        }
    }

    /// The value at `p`.
    pub fn eval(&self, p: &Placement) -> f64 {
        self.c
            + self.w * p.weights_disk
            + self.e * p.embed_disk
            + self.f * p.fetch
            + self.k * p.cache_disk
    }
}

impl std::ops::Add for Lin {
    type Output = Lin;
    fn add(self, o: Lin) -> Lin {
        Lin {
            c: self.c + o.c,
            w: self.w + o.w,
            e: self.e + o.e,
            f: self.f + o.f,
            k: self.k + o.k,
        }
    }
}

/// Every term of one block shape for one cache mode: times in seconds, memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Terms {
    /// Disk I/O of one decoder layer at prefill.
    pub prefill_io: Lin,
    /// Compute of one decoder layer at prefill (all micro-batches).
    pub prefill_compute: Lin,
    /// Disk I/O of one decoder layer at an average decode step.
    pub decode_io: Lin,
    /// Compute of one decoder layer at an average decode step.
    pub decode_compute: Lin,
    /// Disk I/O of the embedding and output layers per token.
    pub embed_io: Lin,
    /// Compute of the embedding and output layers at prefill.
    pub embed_prefill_compute: Lin,
    /// Compute of the embedding and output layers at a decode step.
    pub embed_decode_compute: Lin,
    /// Peak RAM (compute and host tiers).
    pub ram: Lin,
    /// Peak disk.
    pub disk: Lin,
}

/// Predicted times, throughputs and memory of one block.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    /// Sequences in the block.
    pub block_size: usize,
    /// Seconds of the prefill (first token).
    pub prefill_s: f64,
    /// Seconds of the remaining `gen_len − 1` tokens.
    pub decode_s: f64,
    /// `prefill_s + decode_s`.
    pub total_s: f64,
    /// Prompt tokens per second of the prefill.
    pub prefill_throughput: f64,
    /// Generated tokens per second of the decode (0 when `gen_len` is 1).
    pub decode_throughput: f64,
    /// Generated tokens per second overall, `bls · gen_len / total_s` (FlexGen's headline).
    pub total_throughput: f64,
    /// Peak bytes per tier, `[compute, host, disk]` (a placement given as fractions counts
    /// all RAM as compute).
    pub peak_bytes: [f64; 3],
    /// Per decoder layer: prefill I/O and compute seconds, decode I/O and compute seconds.
    pub layer_s: [f64; 4],
}

impl Prediction {
    /// Peak RAM (compute plus host).
    pub fn ram_bytes(&self) -> f64 {
        self.peak_bytes[0] + self.peak_bytes[1]
    }
}

/// The weight side of a policy's actual placement (FlexGen's midpoint rule via the runtime's
/// [`WeightPlan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RealizedWeights {
    /// [`Placement::weights_disk`].
    pub weights_disk: f64,
    /// [`Placement::embed_disk`].
    pub embed_disk: f64,
    /// [`Placement::fetch`].
    pub fetch: f64,
    /// Bytes homed per tier, `[compute, host, disk]`.
    pub home_bytes: [u64; 3],
}

/// The cost model of one model, block shape and format on one machine.
#[derive(Debug, Clone)]
pub struct CostModel {
    shape: ModelShape,
    workload: Workload,
    formats: Formats,
    gbs: usize,
    ngb: usize,
    specs: Vec<LayerSpec>,
    /// 2-D weight bytes of one decoder layer, of the embedding + output layers, and the
    /// largest of one schedule layer.
    layer_matrix: f64,
    embed_matrix: f64,
    max_layer_matrix: f64,
    /// 1-D weight bytes of the whole model (always in RAM).
    vectors: f64,
    /// Cache bytes per token per sequence per decoder layer.
    token_bytes: f64,
    /// Seconds per micro-batch: linear layers and attention of one decoder layer at prefill
    /// and decode, output layer at prefill and decode.
    lin_prefill: f64,
    attn_prefill: f64,
    lin_decode: f64,
    attn_decode: f64,
    out_prefill: f64,
    out_decode: f64,
    disk_read_bw: f64,
    disk_write_bw: f64,
    copy_bw: f64,
    io_compute_ratio: f64,
}

impl CostModel {
    /// The model of `shape` run in blocks of `gbs × ngb` sequences with `formats`, timed with
    /// `profile`. Errors name the option at fault (zero sizes, a prompt plus generation longer
    /// than the model's positions).
    pub fn new(
        shape: &ModelShape,
        profile: &HardwareProfile,
        workload: Workload,
        formats: Formats,
        gbs: usize,
        ngb: usize,
    ) -> Result<Self> {
        shape.validate()?;
        check_workload(shape, workload)?;
        if gbs == 0 {
            return Err(SearchError::option(
                "--gpu-batch-size",
                0,
                "must be positive",
            ));
        }
        if ngb == 0 {
            return Err(SearchError::option(
                "--num-gpu-batches",
                0,
                "must be positive",
            ));
        }
        let weight_cfg = formats
            .compress_weight
            .then_some(flexgen_quant::CompressionConfig::WEIGHT_4BIT);
        let cache_cfg = formats
            .compress_cache
            .then_some(flexgen_quant::CompressionConfig::FLEXGEN_CACHE);
        let cache = shape.cache_spec(cache_cfg.as_ref());
        let specs = shape.layer_specs(formats.dtype, formats.sep_layer, &cache);
        let n_sched = specs.len();
        let (mut layer_matrix, mut embed_matrix, mut max_layer_matrix, mut vectors) =
            (0u64, 0u64, 0u64, 0u64);
        for (i, layer) in specs.iter().enumerate() {
            let mut this = 0u64;
            for w in layer.weights() {
                let b = w.stored_bytes(weight_cfg.as_ref());
                if w.is_vector() {
                    vectors += b;
                } else {
                    this += b;
                }
            }
            max_layer_matrix = max_layer_matrix.max(this);
            if shape.is_decoder_layer(i, n_sched) {
                layer_matrix += this;
            } else {
                embed_matrix += this;
            }
        }
        let layer_matrix = layer_matrix as f64 / shape.num_layers as f64;
        let kind = LinearKind::of(formats.dtype, formats.compress_weight);
        let lin = |flops_per_row: f64, rows: usize| {
            let rate = profile.linear_flops(kind, rows);
            let stream = profile.linear_flops(kind, 1);
            (flops_per_row * rows as f64 / rate).max(flops_per_row / stream)
        };
        let (s, h) = (workload.prompt_len as f64, shape.hidden as f64);
        let avg_len = s + workload.gen_len as f64 / 2.0;
        let token_bytes = cache.token_bytes() as f64;
        let attn_bw = if formats.compress_cache {
            profile.attention_decode_packed_bw
        } else {
            profile.attention_decode_bw
        };
        let f_layer = shape.layer_linear_flops_per_token();
        let f_out = shape.output_flops_per_token();
        Ok(CostModel {
            shape: shape.clone(),
            workload,
            formats,
            gbs,
            ngb,
            specs,
            layer_matrix,
            embed_matrix: embed_matrix as f64,
            max_layer_matrix: max_layer_matrix as f64,
            vectors: vectors as f64,
            token_bytes,
            lin_prefill: lin(f_layer, gbs * workload.prompt_len),
            attn_prefill: 4.0 * gbs as f64 * s * s * h
                / profile.attention_prefill_flops(workload.prompt_len),
            lin_decode: lin(f_layer, gbs),
            attn_decode: gbs as f64 * avg_len * token_bytes / attn_bw,
            out_prefill: lin(f_out, gbs),
            out_decode: lin(f_out, gbs),
            disk_read_bw: profile.disk_read_bw,
            disk_write_bw: profile.disk_write_bw,
            copy_bw: profile.copy_bw,
            io_compute_ratio: profile.io_compute_ratio,
        })
    }

    /// The model shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// The workload.
    pub fn workload(&self) -> Workload {
        self.workload
    }

    /// The formats.
    pub fn formats(&self) -> Formats {
        self.formats
    }

    /// `(gpu_batch_size, num_gpu_batches)`.
    pub fn block(&self) -> (usize, usize) {
        (self.gbs, self.ngb)
    }

    /// The schedule's layers as the runtime would place them.
    pub fn layer_specs(&self) -> &[LayerSpec] {
        &self.specs
    }

    /// Whether I/O overlaps compute.
    pub fn overlap(&self) -> bool {
        self.formats.overlap
    }

    /// Bytes of the whole KV cache of a block.
    pub fn cache_bytes(&self) -> f64 {
        let cap = (self.workload.prompt_len + self.workload.gen_len - 1) as f64;
        self.shape.num_layers as f64 * self.bls() * cap * self.token_bytes
    }

    /// Bytes of the activations of a block at prefill (`f32` hidden states).
    pub fn activation_bytes(&self) -> f64 {
        self.bls() * self.workload.prompt_len as f64 * self.shape.hidden as f64 * 4.0
    }

    /// Scratch of one micro-batch in flight (q, k, v, attention output, MLP hidden, logits).
    pub fn scratch_bytes(&self) -> f64 {
        let (g, s, h, f, v) = (
            self.gbs as f64,
            self.workload.prompt_len as f64,
            self.shape.hidden as f64,
            self.shape.ffn as f64,
            self.shape.vocab as f64,
        );
        4.0 * g * (s * (6.0 * h + f) + v)
    }

    /// Bytes of the cache workspaces when the cache is gathered.
    pub fn workspace_bytes(&self) -> f64 {
        let cap = (self.workload.prompt_len + self.workload.gen_len - 1) as f64;
        let in_flight = if self.formats.overlap { 3.0 } else { 1.0 };
        in_flight * self.gbs as f64 * cap * self.token_bytes
    }

    fn bls(&self) -> f64 {
        (self.gbs * self.ngb) as f64
    }

    /// With overlap, the time a layer's compute takes when its I/O (`io`) runs beside it:
    /// `compute + (1 − ρ)·io` (see the module doc). The layer takes the larger of this and
    /// `io`.
    pub fn overlapped_compute(&self, io: &Lin, compute: &Lin) -> Lin {
        *compute + io.scale(1.0 - self.io_compute_ratio)
    }

    /// Every term for `mode` (activations in RAM, or on disk when `activations_disk`).
    pub fn terms(&self, mode: CacheMode, activations_disk: bool) -> Terms {
        let (bls, ngb) = (self.bls(), self.ngb as f64);
        let (s, n) = (
            self.workload.prompt_len as f64,
            self.workload.gen_len as f64,
        );
        let avg_len = s + n / 2.0;
        let (r, w, cp) = (self.disk_read_bw, self.disk_write_bw, self.copy_bw);
        let tb = self.token_bytes;
        let l = self.shape.num_layers as f64;
        let h = self.shape.hidden as f64;
        let gathered = mode == CacheMode::Gathered;
        // Activations on disk: each layer writes its output and the next reads it back.
        let act_io = |tokens: f64| {
            if activations_disk {
                bls * tokens * h * 4.0 * (1.0 / r + 1.0 / w)
            } else {
                0.0
            }
        };
        // Gathering copies the RAM share of the cache through a workspace (on the I/O
        // threads, like the disk share).
        let copy = |bytes: f64| {
            if gathered {
                Lin {
                    c: bytes / cp,
                    k: -bytes / cp,
                    ..Lin::default()
                }
            } else {
                Lin::default()
            }
        };
        let prefill_io = Lin {
            c: act_io(s),
            w: self.layer_matrix / r,
            k: bls * s * tb / w,
            ..Lin::default()
        } + copy(bls * s * tb);
        let decode_io = Lin {
            c: act_io(1.0),
            w: self.layer_matrix / r,
            k: bls * avg_len * tb / r + bls * tb / w,
            ..Lin::default()
        } + copy(bls * (avg_len + 1.0) * tb);
        let prefill_compute = Lin::constant(ngb * (self.lin_prefill + self.attn_prefill));
        let decode_compute = Lin::constant(ngb * (self.lin_decode + self.attn_decode));
        let embed_io = Lin {
            e: self.embed_matrix / r,
            ..Lin::default()
        };
        let cache = self.cache_bytes();
        let act = self.activation_bytes();
        let ram = Lin {
            c: l * self.layer_matrix
                + self.embed_matrix
                + self.vectors
                + cache
                + if activations_disk { 0.0 } else { act }
                + self.scratch_bytes()
                + if gathered {
                    self.workspace_bytes()
                } else {
                    0.0
                },
            w: -l * self.layer_matrix,
            e: -self.embed_matrix,
            f: 2.0 * self.max_layer_matrix,
            k: -cache,
        };
        let disk = Lin {
            c: if activations_disk { act } else { 0.0 },
            w: l * self.layer_matrix,
            e: self.embed_matrix,
            k: cache,
            ..Lin::default()
        };
        Terms {
            prefill_io,
            prefill_compute,
            decode_io,
            decode_compute,
            embed_io,
            embed_prefill_compute: Lin::constant(ngb * self.out_prefill),
            embed_decode_compute: Lin::constant(ngb * self.out_decode),
            ram,
            disk,
        }
    }

    /// Times and memory at placement `p` (RAM counted as the compute tier).
    pub fn evaluate(&self, p: &Placement) -> Prediction {
        let t = self.terms(p.cache_mode, p.activations_disk);
        let comb = |io: &Lin, comp: &Lin| {
            let a = io.eval(p);
            if self.formats.overlap {
                a.max(self.overlapped_compute(io, comp).eval(p))
            } else {
                a + comp.eval(p)
            }
        };
        let l = self.shape.num_layers as f64;
        let (s, n) = (
            self.workload.prompt_len as f64,
            self.workload.gen_len as f64,
        );
        let prefill = l * comb(&t.prefill_io, &t.prefill_compute)
            + comb(&t.embed_io, &t.embed_prefill_compute);
        let decode = (n - 1.0)
            * (l * comb(&t.decode_io, &t.decode_compute)
                + comb(&t.embed_io, &t.embed_decode_compute));
        let total = prefill + decode;
        let bls = self.bls();
        Prediction {
            block_size: self.gbs * self.ngb,
            prefill_s: prefill,
            decode_s: decode,
            total_s: total,
            prefill_throughput: bls * s / prefill,
            decode_throughput: if n > 1.0 {
                bls * (n - 1.0) / decode
            } else {
                0.0
            },
            total_throughput: bls * n / total,
            peak_bytes: [t.ram.eval(p), 0.0, t.disk.eval(p)],
            layer_s: [
                t.prefill_io.eval(p),
                t.prefill_compute.eval(p),
                t.decode_io.eval(p),
                t.decode_compute.eval(p),
            ],
        }
    }

    /// Where the runtime would put the weights under `weights` (FlexGen's midpoint rule per
    /// placement group).
    pub fn realize_weights(&self, policy: &Policy) -> RealizedWeights {
        let plan = WeightPlan::new(&self.specs, policy);
        let compress = policy.compress_weight.then_some(&policy.comp_weight_config);
        let n_sched = self.specs.len();
        let (mut layer_disk, mut embed_disk) = (0u64, 0u64);
        for (i, (layer, tiers)) in self.specs.iter().zip(&plan.tiers).enumerate() {
            let disk: u64 = layer
                .weights()
                .zip(tiers)
                .filter(|(w, t)| **t == Tier::Disk && !w.is_vector())
                .map(|(w, _)| w.stored_bytes(compress))
                .sum();
            if self.shape.is_decoder_layer(i, n_sched) {
                layer_disk += disk;
            } else {
                embed_disk += disk;
            }
        }
        let frac = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        RealizedWeights {
            weights_disk: frac(
                layer_disk as f64,
                self.layer_matrix * self.shape.num_layers as f64,
            ),
            embed_disk: frac(embed_disk as f64, self.embed_matrix),
            fetch: frac(plan.max_layer_fetch_bytes as f64, self.max_layer_matrix),
            home_bytes: plan.home_bytes,
        }
    }

    /// The actual placement of `policy` (whose block shape and formats must be this model's).
    pub fn placement_of(&self, policy: &Policy) -> Result<(Placement, RealizedWeights)> {
        let weights = self.realize_weights(policy);
        Ok((self.placement_with(policy, &weights)?, weights))
    }

    /// The placement of `policy` given its weights' placement `weights` (from
    /// [`CostModel::realize_weights`] of a policy with the same weight split).
    pub fn placement_with(&self, policy: &Policy, weights: &RealizedWeights) -> Result<Placement> {
        self.check_policy(policy)?;
        let [c, h, d] = split_cache(self.gbs, &policy.cache);
        Ok(Placement {
            weights_disk: weights.weights_disk,
            embed_disk: weights.embed_disk,
            fetch: weights.fetch,
            cache_disk: d as f64 / self.gbs as f64,
            cache_mode: if d == 0 && (c == 0 || h == 0) {
                CacheMode::InPlace
            } else {
                CacheMode::Gathered
            },
            activations_disk: policy.activation_tier() == Tier::Disk,
        })
    }

    /// Predicts `policy` (validated first) with its actual placement, peak bytes split over the
    /// compute and host tiers as the runtime would charge them.
    pub fn predict(&self, policy: &Policy) -> Result<Prediction> {
        self.predict_with(policy, &self.realize_weights(policy))
    }

    /// [`CostModel::predict`] with the weights' placement already computed.
    pub fn predict_with(&self, policy: &Policy, weights: &RealizedWeights) -> Result<Prediction> {
        policy.validate()?;
        let p = self.placement_with(policy, weights)?;
        let mut pred = self.evaluate(&p);
        let [_, host_seqs, _] = split_cache(self.gbs, &policy.cache);
        let mut host =
            weights.home_bytes[1] as f64 + self.cache_bytes() * host_seqs as f64 / self.gbs as f64;
        if policy.activation_tier() == Tier::Host {
            host += self.activation_bytes();
        }
        pred.peak_bytes[1] = host;
        pred.peak_bytes[0] -= host;
        Ok(pred)
    }

    fn check_policy(&self, policy: &Policy) -> Result<()> {
        if (policy.gpu_batch_size, policy.num_gpu_batches) != (self.gbs, self.ngb)
            || policy.compress_weight != self.formats.compress_weight
            || policy.compress_cache != self.formats.compress_cache
            || policy.overlap != self.formats.overlap
            || policy.sep_layer != self.formats.sep_layer
        {
            return Err(SearchError::option(
                "policy",
                format!(
                    "gbs {} x {}, compress {}/{}",
                    policy.gpu_batch_size,
                    policy.num_gpu_batches,
                    policy.compress_weight,
                    policy.compress_cache
                ),
                "does not match the block shape and formats of this cost model",
            ));
        }
        Ok(())
    }
}

/// Checks the prompt and generation lengths against the model.
pub fn check_workload(shape: &ModelShape, w: Workload) -> Result<()> {
    if w.prompt_len == 0 {
        return Err(SearchError::option("--prompt-len", 0, "must be positive"));
    }
    if w.gen_len == 0 {
        return Err(SearchError::option("--gen-len", 0, "must be positive"));
    }
    if w.prompt_len + w.gen_len - 1 > shape.max_positions {
        return Err(SearchError::option(
            "--prompt-len + --gen-len",
            format!("{} + {}", w.prompt_len, w.gen_len),
            format!(
                "{} has {} positions; a block needs prompt_len + gen_len - 1 of them",
                shape.name, shape.max_positions
            ),
        ));
    }
    Ok(())
}

/// Predicts a fixed `policy` for `shape` with weights in `dtype` (FlexGen's cost model with
/// every fraction pinned).
pub fn predict(
    shape: &ModelShape,
    profile: &HardwareProfile,
    workload: Workload,
    dtype: DType,
    policy: &Policy,
) -> Result<Prediction> {
    let model = CostModel::new(
        shape,
        profile,
        workload,
        Formats::of(policy, dtype),
        policy.gpu_batch_size,
        policy.num_gpu_batches,
    )?;
    model.predict(policy)
}
