//! The [`Runtime`]: weights placed once at load, then FlexGen's zig-zag block schedule.
//!
//! One [`Runtime::run_block`] call runs a block of micro-batches through
//! `for token i { for layer j { for micro-batch k { ... } } }`, so each layer's disk-homed
//! weights are read once per token per block. With overlap on, each step `(i, j, k)`:
//! 1. at `k = 0`, starts fetching the next layer's weights (they have the whole layer, all
//!    micro-batches, to arrive);
//! 2. starts loading the cache (and nothing else) of the next step, and storing the cache of
//!    the previous step;
//! 3. computes `(i, j, k)`;
//! 4. synchronizes once: waits for the loads and stores it started, and at the last
//!    micro-batch of a layer for the next layer's weights.
//!
//! With overlap off the same jobs run inline, in the same order, around each compute.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::disk::{phase_aligned, DiskFile, IoStats, IoTotals};
use crate::error::{Error, Result};
use crate::io::{IoPool, Ticket};
use crate::model::{BlockModel, CacheView, DynError, LayerSpec, Step, WeightSource};
use crate::offload_dir::{default_offload_dir, OffloadDir};
use crate::placement::split_cache;
use crate::policy::Policy;
use crate::store::{DiskTensor, Home, WeightPlan, WeightStore};
use crate::tensor::{CacheSpec, PlaneBuf, Tensor};
use crate::tier::{Budgets, Charge, MemoryTracker, Tier};

/// Runtime settings that are not part of FlexGen's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct OffloadOptions {
    /// Parent of the private offload directory (FlexGen's `--offload-dir`).
    pub offload_dir: std::path::PathBuf,
    /// Use `O_DIRECT` for disk-tier files where the filesystem allows (without it, "disk"
    /// reads may come from the page cache, i.e. RAM).
    pub direct_io: bool,
    /// I/O threads.
    pub io_threads: usize,
    /// Tier budgets.
    pub budgets: Budgets,
    /// The largest block the caller will run, when known: a block of this shape is checked
    /// against the budgets ([`check_block`]) before any weight is read, so an impossible
    /// policy fails at once instead of after the load.
    pub planned_block: Option<BlockShape>,
}

/// The size of a block: how many sequences, their prompt tokens and tokens to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    /// Sequences in the block (capped at `gpu_batch_size x num_gpu_batches`; a full block
    /// when the caller does not know fewer).
    pub sequences: usize,
    /// Prompt tokens per sequence (left-padded to the longest).
    pub prompt_len: usize,
    /// Tokens to generate per sequence (the first comes from the prefill step).
    pub gen_len: usize,
}

impl BlockShape {
    /// Tokens a sequence's KV cache must hold: the prompt plus every generated token but the
    /// last, which is never fed back.
    pub fn capacity(&self) -> usize {
        self.prompt_len + self.gen_len.max(1) - 1
    }
}

impl Default for OffloadOptions {
    /// The system temp dir, direct I/O, 4 I/O threads, budgets from the machine's memory limit.
    fn default() -> Self {
        OffloadOptions {
            offload_dir: default_offload_dir(),
            direct_io: true,
            io_threads: 4,
            budgets: Budgets::detect(),
            planned_block: None,
        }
    }
}

/// What one block cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BlockStats {
    /// Token steps run (prefill included; fewer than asked when every row stopped early).
    pub tokens: usize,
    /// Seconds of the whole block.
    pub wall_s: f64,
    /// Seconds of forward passes (main thread).
    pub compute_s: f64,
    /// Seconds the main thread waited for I/O (at synchronizations and inline jobs).
    pub stall_s: f64,
    /// Seconds of the prefill step (token 0), all layers.
    pub prefill_s: f64,
    /// Disk traffic of the block.
    pub io: IoTotals,
    /// Peak bytes held per tier during the block, `[compute, host, disk]`.
    pub peak_bytes: [u64; 3],
}

/// The offloading runtime of one model: its policy, its weights in their homes, the tiers'
/// accounting and the I/O threads.
pub struct Runtime {
    pool: IoPool,
    policy: Policy,
    layers: Vec<LayerSpec>,
    store: WeightStore,
    budgets: Budgets,
    direct_io: bool,
    tracker: Arc<MemoryTracker>,
    stats: Arc<IoStats>,
    /// Fetch buffers released by the previous layer, reused by the next fetch, and their
    /// charge on the compute tier.
    spare: Vec<Tensor>,
    spare_charge: Option<Charge>,
    /// The RAM-homed KV cache planes of the block run last, reused (zeroed) by the next
    /// block if it has the same micro-batch rows and capacity (so exactly these planes): a
    /// repeated block (a benchmark after its warm-up, a server's next request of the same
    /// shape) does not fault its cache's pages in again. A block of another shape frees them
    /// before it allocates.
    spare_cache: Vec<PlaneBuf>,
    /// The `(rows, capacity)` of the block that left `spare_cache`.
    spare_cache_shape: (Vec<usize>, usize),
    blocks_run: usize,
    dir: OffloadDir,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("policy", &self.policy)
            .field("layers", &self.layers.len())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Bytes of two fetched layers (the current one and the one arriving).
fn fetch_buffer_bytes(plan: &WeightPlan) -> u64 {
    2 * plan.max_layer_fetch_bytes
}

impl Runtime {
    /// Validates `policy`, places every weight of `layers` (checking the tier budgets before
    /// reading any weight), and loads the weights into their homes, writing disk-homed ones to
    /// the offload directory unless `source` has them on disk already. `progress(done, total)`
    /// is called per weight.
    pub fn new(
        layers: &[LayerSpec],
        source: &dyn WeightSource,
        policy: &Policy,
        options: &OffloadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        policy.validate()?;
        if layers.is_empty() {
            return Err(Error::Model("a model needs at least one layer".into()));
        }
        let plan = WeightPlan::new(layers, policy);
        let [c, h, d] = plan.home_bytes;
        options.budgets.check(
            [c + fetch_buffer_bytes(&plan), h, d],
            "the weights (homes plus two layers of fetch buffers)",
        )?;
        let dir = OffloadDir::create(&options.offload_dir)?;
        let tracker = MemoryTracker::new();
        let stats = IoStats::new();
        let store = WeightStore::build(
            layers,
            plan,
            source,
            policy,
            &dir,
            options.direct_io,
            &tracker,
            &stats,
            progress,
        )?;
        Ok(Runtime {
            pool: IoPool::new(options.io_threads),
            policy: policy.clone(),
            layers: layers.to_vec(),
            store,
            budgets: options.budgets,
            direct_io: options.direct_io,
            tracker,
            stats,
            spare: Vec::new(),
            spare_charge: None,
            spare_cache: Vec::new(),
            spare_cache_shape: (Vec::new(), 0),
            blocks_run: 0,
            dir,
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Bytes of KV cache buffers kept from the last block for the next block of the same
    /// shape (not charged to a tier between blocks; freed by a block of another shape).
    pub fn spare_cache_bytes(&self) -> u64 {
        self.spare_cache
            .iter()
            .map(|b| b.bytes().len() as u64)
            .sum()
    }

    /// Where the weights went.
    pub fn weight_plan(&self) -> &WeightPlan {
        self.store.plan()
    }

    /// Memory accounting of the tiers.
    pub fn tracker(&self) -> &MemoryTracker {
        &self.tracker
    }

    /// Disk traffic since the runtime was created (weights written at load included).
    pub fn io_totals(&self) -> IoTotals {
        self.stats.totals()
    }

    /// The private offload directory (removed when the runtime is dropped).
    pub fn offload_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Runs one block: `batches` (at most `num_gpu_batches` micro-batches of at most
    /// `gpu_batch_size` sequences each) through `gen_len` token steps, the first with
    /// `prompt_len` new tokens per sequence. After each token step, `between(i, batches)` runs
    /// on this thread (sampling, streaming); returning `false` stops the block early.
    pub fn run_block<M: BlockModel>(
        &mut self,
        model: &M,
        batches: &mut [M::Batch],
        prompt_len: usize,
        gen_len: usize,
        between: impl FnMut(usize, &mut [M::Batch]) -> std::result::Result<bool, DynError>,
    ) -> Result<BlockStats> {
        let ml = model.layers();
        if ml.len() != self.layers.len()
            || ml
                .iter()
                .zip(&self.layers)
                .any(|(a, b)| a.num_weights() != b.num_weights() || a.cache != b.cache)
        {
            return Err(Error::Model(
                "the model's layers differ from the ones the runtime was built for".into(),
            ));
        }
        let p = &self.policy;
        if batches.is_empty() || batches.len() > p.num_gpu_batches {
            return Err(Error::policy(
                "--num-gpu-batches",
                p.num_gpu_batches,
                format!("a block of {} micro-batches does not fit", batches.len()),
            ));
        }
        let rows: Vec<usize> = batches.iter().map(|b| model.rows(b)).collect();
        if let Some(&r) = rows.iter().find(|&&r| r == 0 || r > p.gpu_batch_size) {
            return Err(Error::policy(
                "--gpu-batch-size",
                p.gpu_batch_size,
                format!("a micro-batch of {r} sequences does not fit"),
            ));
        }
        if prompt_len == 0 || gen_len == 0 {
            return Err(Error::Model(format!(
                "a block needs a prompt and at least one token to generate (prompt_len {prompt_len}, gen_len {gen_len})"
            )));
        }
        let shape = BlockShape {
            sequences: rows.iter().sum(),
            prompt_len,
            gen_len,
        };
        check_block_bytes(model, self.store.plan(), p, &self.budgets, &rows, shape)?;
        self.tracker.reset_peaks();
        let io_start = self.stats.totals();
        let t0 = Instant::now();
        self.blocks_run += 1;
        let mut run = BlockRun::new(self, model, &rows, prompt_len, shape.capacity())?;
        let result = run.run(model, batches, gen_len, between);
        let stats = run.finish(result)?;
        Ok(BlockStats {
            wall_s: t0.elapsed().as_secs_f64(),
            io: self.stats.totals() - io_start,
            peak_bytes: Tier::ALL.map(|t| self.tracker.peak(t)),
            ..stats
        })
    }
}

/// Checks, before any weight is read, that a block of `shape` (its sequences in micro-batches
/// of `gpu_batch_size`, at most `num_gpu_batches` of them) fits `budgets` under `policy`:
/// weight homes, fetch buffers, KV cache homes and workspaces, activations.
///
/// # Errors
/// A budget error naming the tier, the bytes needed and the budget;
/// a policy error for an invalid policy.
pub fn check_block<M: BlockModel>(
    model: &M,
    policy: &Policy,
    budgets: &Budgets,
    shape: BlockShape,
) -> Result<()> {
    policy.validate()?;
    let plan = WeightPlan::new(model.layers(), policy);
    let block = policy.gpu_batch_size * policy.num_gpu_batches;
    let sequences = shape.sequences.clamp(1, block);
    let rows: Vec<usize> = (0..sequences)
        .step_by(policy.gpu_batch_size)
        .map(|first| policy.gpu_batch_size.min(sequences - first))
        .collect();
    check_block_bytes(model, &plan, policy, budgets, &rows, shape)
}

/// Checks [`block_bytes`] of micro-batches of `rows` sequences against `budgets`.
fn check_block_bytes<M: BlockModel>(
    model: &M,
    plan: &WeightPlan,
    policy: &Policy,
    budgets: &Budgets,
    rows: &[usize],
    shape: BlockShape,
) -> Result<()> {
    let capacity = shape.capacity();
    let bytes = block_bytes(model, plan, policy, rows, shape.prompt_len, capacity);
    budgets.check(
        bytes,
        &format!(
            "a block of {} sequences x {capacity} tokens (weights, KV cache, workspaces, activations)",
            rows.iter().sum::<usize>()
        ),
    )
}

/// Per-tier bytes of a block of `rows` sequences per micro-batch: weight homes, fetch buffers,
/// cache homes, cache workspaces and activations.
fn block_bytes<M: BlockModel>(
    model: &M,
    plan: &WeightPlan,
    policy: &Policy,
    rows: &[usize],
    prompt_len: usize,
    capacity: usize,
) -> [u64; 3] {
    let mut bytes = [0u64; 3];
    let [c, h, d] = plan.home_bytes;
    bytes[0] += c + fetch_buffer_bytes(plan);
    bytes[1] += h;
    bytes[2] += d;
    let mut workspace = 0u64;
    for spec in model.layers().iter().filter_map(|l| l.cache.as_ref()) {
        let per_seq = (capacity * spec.token_bytes()) as u64;
        for &r in rows {
            let split = split_cache(r, &policy.cache);
            for (t, n) in split.iter().enumerate() {
                bytes[t] += *n as u64 * per_seq;
            }
            if !in_place(&split) {
                workspace = workspace.max(r as u64 * per_seq);
            }
        }
    }
    let in_flight = if policy.overlap { 3 } else { 1 };
    bytes[0] += in_flight * workspace;
    let act: u64 = rows
        .iter()
        .map(|&r| model.activation_bytes(r, prompt_len))
        .sum();
    bytes[policy.activation_tier() as usize] += act;
    bytes
}

/// Whether a micro-batch's cache split lives on one RAM tier, so attention runs on it in place.
fn in_place(split: &[usize; 3]) -> bool {
    split[2] == 0 && (split[0] == 0 || split[1] == 0)
}

/// Where a run of sequences of a cache home lives.
enum SegData {
    Ram(Vec<PlaneBuf>),
    Disk {
        file: Arc<DiskFile>,
        offsets: Vec<u64>,
    },
}

/// Sequences `first..first + n` of a cache home on one tier.
struct Segment {
    first: usize,
    n: usize,
    data: SegData,
    _charge: Charge,
}

/// The KV cache of one layer for one micro-batch, in its homes.
struct CacheHome {
    seqs: usize,
    segments: Vec<Segment>,
}

impl CacheHome {
    /// The RAM planes when the whole micro-batch lives on one RAM tier.
    fn in_place_planes(&mut self) -> Option<&mut Vec<PlaneBuf>> {
        match self.segments.as_mut_slice() {
            [Segment {
                data: SegData::Ram(p),
                ..
            }] => Some(p),
            _ => None,
        }
    }

    /// Copies rows `rows` of every sequence between the homes and the workspace `ws`
    /// (`to_ws`: home -> workspace).
    fn transfer(
        &mut self,
        spec: &CacheSpec,
        ws: &mut [PlaneBuf],
        capacity: usize,
        rows: std::ops::Range<usize>,
        to_ws: bool,
    ) -> Result<()> {
        for seg in &mut self.segments {
            for (p, plane) in spec.planes.iter().enumerate() {
                let tb = plane.token_bytes();
                let ws_bytes = ws[p].bytes_mut();
                for s in 0..seg.n {
                    let local = (s * capacity + rows.start) * tb..(s * capacity + rows.end) * tb;
                    let global = ((seg.first + s) * capacity + rows.start) * tb
                        ..((seg.first + s) * capacity + rows.end) * tb;
                    let w = &mut ws_bytes[global];
                    match &mut seg.data {
                        SegData::Ram(planes) => {
                            let h = &mut planes[p].bytes_mut()[local];
                            if to_ws {
                                w.copy_from_slice(h);
                            } else {
                                h.copy_from_slice(w);
                            }
                        }
                        SegData::Disk { file, offsets } => {
                            let off = offsets[p] + local.start as u64;
                            if to_ws {
                                file.read_at(off, w)?;
                            } else {
                                file.write_at(off, w)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

type CachePair = (CacheHome, Vec<PlaneBuf>);

/// The state of one (layer, micro-batch) cache during a block.
enum CacheState {
    /// At rest in its home.
    Home(CacheHome),
    /// Being copied into a workspace.
    Loading(Ticket<CachePair>),
    /// In a workspace, ready for (or after) compute.
    Loaded(CacheHome, Vec<PlaneBuf>),
    /// New rows being written back home.
    Storing(Ticket<CachePair>),
    /// Transiently moved.
    Moving,
}

/// A layer's weights fetched from disk (`Empty` where the weight lives in RAM).
struct Fetched {
    layer: usize,
    tensors: Vec<Tensor>,
    _charge: Charge,
}

/// A fetch in flight.
struct Fetching {
    layer: usize,
    tickets: Vec<(usize, Ticket<Tensor>)>,
    n: usize,
    charge: Charge,
}

/// The per-block state of the schedule.
struct BlockRun<'r> {
    rt: &'r mut Runtime,
    prompt_len: usize,
    capacity: usize,
    ngb: usize,
    /// `[layer][micro-batch]`; empty for layers without cache.
    cache: Vec<Vec<CacheState>>,
    /// Workspaces not in use, with their charge: (sequences, planes, charge).
    free_ws: Vec<(usize, Vec<PlaneBuf>, Charge)>,
    /// Charges of workspaces in use, by sequences.
    ws_in_use: Vec<(usize, Charge)>,
    current: Option<Fetched>,
    next: Option<Fetching>,
    ready: Option<Fetched>,
    /// Loads and stores to wait for at the next synchronization: (layer, micro-batch).
    pending: Vec<(usize, usize)>,
    /// The cache computed last, whose store starts at the next step: (layer, mb, kv_len, q_len).
    to_store: Option<(usize, usize, usize, usize)>,
    act: Option<ActStore>,
    act_charges: Vec<Option<Charge>>,
    cache_file: Option<std::path::PathBuf>,
    stats: BlockStats,
}

/// Activations on the disk tier: one region per micro-batch.
struct ActStore {
    file: DiskFile,
    region: u64,
    lens: Vec<usize>,
}

fn next_step(i: usize, j: usize, k: usize, nl: usize, ngb: usize) -> (usize, usize, usize) {
    if k + 1 < ngb {
        (i, j, k + 1)
    } else if j + 1 < nl {
        (i, j + 1, 0)
    } else {
        (i + 1, 0, 0)
    }
}

fn layer_error(layers: &[LayerSpec], layer: usize, source: DynError) -> Error {
    Error::Layer {
        layer,
        name: layers[layer].name.clone(),
        source,
    }
}

impl<'r> BlockRun<'r> {
    fn new<M: BlockModel>(
        rt: &'r mut Runtime,
        model: &M,
        rows: &[usize],
        prompt_len: usize,
        capacity: usize,
    ) -> Result<Self> {
        let needs_disk = rt.layers.iter().any(|l| l.cache.is_some())
            && rows
                .iter()
                .any(|&r| split_cache(r, &rt.policy.cache)[2] > 0);
        let mut cache_file = None;
        let file = if needs_disk {
            let path = rt.dir.path().join(format!("cache-{}.bin", rt.blocks_run));
            let f = Arc::new(DiskFile::create(
                &path,
                rt.direct_io,
                Arc::clone(&rt.stats),
            )?);
            cache_file = Some(path);
            Some(f)
        } else {
            None
        };
        let mut end = 0u64;
        let mut cache = Vec::with_capacity(rt.layers.len());
        let mut spares = std::mem::take(&mut rt.spare_cache);
        if rt.spare_cache_shape.0 != rows || rt.spare_cache_shape.1 != capacity {
            spares.clear();
            rt.spare_cache_shape = (rows.to_vec(), capacity);
        }
        for layer in &rt.layers {
            let Some(spec) = &layer.cache else {
                cache.push(Vec::new());
                continue;
            };
            let mut per_k = Vec::with_capacity(rows.len());
            for &r in rows {
                let split = split_cache(r, &rt.policy.cache);
                let mut first = 0;
                let mut segments = Vec::new();
                for (tier, &n) in Tier::ALL.iter().zip(&split) {
                    if n == 0 {
                        continue;
                    }
                    let bytes = (n * capacity * spec.token_bytes()) as u64;
                    let data = match &file {
                        Some(f) if *tier == Tier::Disk => {
                            let offsets = spec
                                .planes
                                .iter()
                                .map(|p| {
                                    let off = phase_aligned(end);
                                    end = off + (n * capacity * p.token_bytes()) as u64;
                                    off
                                })
                                .collect();
                            SegData::Disk {
                                file: Arc::clone(f),
                                offsets,
                            }
                        }
                        _ => SegData::Ram(
                            spec.planes
                                .iter()
                                .map(|p| {
                                    let len = n * capacity * p.per_token;
                                    PlaneBuf::zeros_reusing(&mut spares, p.elem, len)
                                })
                                .collect(),
                        ),
                    };
                    segments.push(Segment {
                        first,
                        n,
                        data,
                        _charge: rt.tracker.charge(*tier, bytes),
                    });
                    first += n;
                }
                per_k.push(CacheState::Home(CacheHome { seqs: r, segments }));
            }
            cache.push(per_k);
        }
        drop(spares);
        if let Some(f) = &file {
            f.set_len(end)?;
        }
        let act = if rt.policy.activation_tier() == Tier::Disk {
            let path = rt.dir.path().join(format!("act-{}.bin", rt.blocks_run));
            let region = rows
                .iter()
                .map(|&r| model.activation_bytes(r, prompt_len))
                .max()
                .unwrap_or(0);
            Some(ActStore {
                file: DiskFile::create(path, rt.direct_io, Arc::clone(&rt.stats))?,
                region: phase_aligned(region),
                lens: vec![0; rows.len()],
            })
        } else {
            None
        };
        Ok(BlockRun {
            prompt_len,
            capacity,
            ngb: rows.len(),
            cache,
            free_ws: Vec::new(),
            ws_in_use: Vec::new(),
            current: None,
            next: None,
            ready: None,
            pending: Vec::new(),
            to_store: None,
            act,
            act_charges: (0..rows.len()).map(|_| None).collect(),
            cache_file,
            stats: BlockStats::default(),
            rt,
        })
    }

    fn step_of(&self, i: usize, j: usize, k: usize) -> Step {
        Step {
            token: i,
            layer: j,
            micro_batch: k,
            q_len: if i == 0 { self.prompt_len } else { 1 },
            kv_len: if i == 0 { 0 } else { self.prompt_len + i - 1 },
            capacity: self.capacity,
        }
    }

    fn run<M: BlockModel>(
        &mut self,
        model: &M,
        batches: &mut [M::Batch],
        gen_len: usize,
        mut between: impl FnMut(usize, &mut [M::Batch]) -> std::result::Result<bool, DynError>,
    ) -> Result<()> {
        let nl = self.rt.layers.len();
        let overlap = self.rt.policy.overlap;
        let ngb = self.ngb;
        let total_layer_steps = gen_len * nl;
        if overlap {
            // Prologue: the first layer's weights and the first step's cache.
            self.start_fetch(0, true);
            self.start_load(0, 0, 0, true)?;
        }
        for i in 0..gen_len {
            let t_token = Instant::now();
            for j in 0..nl {
                let ls = i * nl + j;
                for (k, batch) in batches.iter_mut().enumerate() {
                    let step = self.step_of(i, j, k);
                    if k == 0 {
                        let t = Instant::now();
                        if !overlap {
                            self.start_fetch(j, true);
                        }
                        self.switch_weights(j)?;
                        if overlap && ls + 1 < total_layer_steps {
                            self.start_fetch((ls + 1) % nl, false);
                        }
                        self.stats.stall_s += t.elapsed().as_secs_f64();
                    }
                    let t = Instant::now();
                    if overlap {
                        if let Some((sj, sk, kv, q)) = self.to_store.take() {
                            self.start_store(sj, sk, kv, q, false)?;
                        }
                        let (ni, nj, nk) = next_step(i, j, k, nl, ngb);
                        if ni < gen_len {
                            let kv = self.step_of(ni, nj, nk).kv_len;
                            self.start_load(nj, nk, kv, false)?;
                        }
                    } else {
                        self.start_load(j, k, step.kv_len, true)?;
                    }
                    self.stats.stall_s += t.elapsed().as_secs_f64();
                    self.compute(model, &step, batch)?;
                    let t = Instant::now();
                    if self.has_cache(j) {
                        if overlap {
                            self.to_store = Some((j, k, step.kv_len, step.q_len));
                        } else {
                            self.start_store(j, k, step.kv_len, step.q_len, true)?;
                        }
                    }
                    // The one synchronization of the step.
                    self.sync()?;
                    if overlap && k + 1 == ngb && ls + 1 < total_layer_steps {
                        self.finish_fetch()?;
                    }
                    self.stats.stall_s += t.elapsed().as_secs_f64();
                }
            }
            self.stats.tokens = i + 1;
            if i == 0 {
                self.stats.prefill_s = t_token.elapsed().as_secs_f64();
            }
            let go_on =
                between(i, batches).map_err(|e| Error::Worker(format!("after token {i}: {e}")))?;
            if !go_on {
                break;
            }
        }
        let t = Instant::now();
        if let Some((sj, sk, kv, q)) = self.to_store.take() {
            self.start_store(sj, sk, kv, q, true)?;
        }
        self.sync()?;
        self.stats.stall_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Waits for everything in flight, removes the block's files, keeps the fetch buffers for
    /// the next block.
    fn finish(mut self, result: Result<()>) -> Result<BlockStats> {
        if let Some(f) = self.next.take() {
            for (_, t) in f.tickets {
                let _ = t.wait();
            }
        }
        for (j, k) in std::mem::take(&mut self.pending) {
            if let CacheState::Loading(t) | CacheState::Storing(t) =
                std::mem::replace(&mut self.cache[j][k], CacheState::Moving)
            {
                let _ = t.wait();
            }
        }
        for f in [self.current.take(), self.ready.take()]
            .into_iter()
            .flatten()
        {
            self.rt
                .spare
                .extend(f.tensors.into_iter().filter(|t| !t.is_empty()));
        }
        self.charge_spare();
        for state in self.cache.drain(..).flatten() {
            if let CacheState::Home(home) | CacheState::Loaded(home, _) = state {
                for segment in home.segments {
                    if let SegData::Ram(planes) = segment.data {
                        self.rt.spare_cache.extend(planes);
                    }
                }
            }
        }
        if let Some(p) = &self.cache_file {
            let _ = std::fs::remove_file(p);
        }
        if let Some(a) = self.act.take() {
            let _ = std::fs::remove_file(a.file.path());
        }
        result?;
        Ok(std::mem::take(&mut self.stats))
    }

    fn has_cache(&self, j: usize) -> bool {
        !self.cache[j].is_empty()
    }

    /// Starts (or, inline, performs) fetching layer `layer`'s disk-homed weights into buffers
    /// left by the layer before.
    fn start_fetch(&mut self, layer: usize, inline: bool) {
        let disk = self.rt.store.disk_tensors(layer);
        let n = self.rt.store.homes[layer].len();
        let bytes: u64 = disk.iter().map(|(_, d)| d.bytes()).sum();
        let charge = self.rt.tracker.charge(Tier::Compute, bytes);
        let tickets = disk
            .into_iter()
            .map(|(i, d): (usize, DiskTensor)| {
                let reuse = WeightStore::take_fitting(&mut self.rt.spare, &d);
                (i, self.rt.pool.submit(inline, move || d.read(reuse)))
            })
            .collect();
        // Buffers the fetch could not reuse are freed now, not kept for later.
        self.rt.spare.clear();
        self.rt.spare_charge = None;
        self.next = Some(Fetching {
            layer,
            tickets,
            n,
            charge,
        });
    }

    /// Waits for the fetch in flight and keeps its tensors ready.
    fn finish_fetch(&mut self) -> Result<()> {
        if let Some(f) = self.next.take() {
            let mut tensors: Vec<Tensor> = (0..f.n).map(|_| Tensor::Empty).collect();
            for (i, t) in f.tickets {
                tensors[i] = t.wait()?;
            }
            self.ready = Some(Fetched {
                layer: f.layer,
                tensors,
                _charge: f.charge,
            });
        }
        Ok(())
    }

    /// Makes layer `j`'s fetched weights current; the previous layer's buffers become spares.
    fn switch_weights(&mut self, j: usize) -> Result<()> {
        if self.ready.is_none() {
            self.finish_fetch()?;
        }
        let ready = self
            .ready
            .take()
            .ok_or_else(|| Error::Worker(format!("weights of layer {j} were never fetched")))?;
        if ready.layer != j {
            return Err(Error::Worker(format!(
                "fetched layer {} while layer {j} runs",
                ready.layer
            )));
        }
        if let Some(old) = self.current.replace(ready) {
            self.rt.spare = old.tensors.into_iter().filter(|t| !t.is_empty()).collect();
            self.charge_spare();
        }
        Ok(())
    }

    /// Charges the spare fetch buffers to the compute tier (they stay allocated for reuse).
    fn charge_spare(&mut self) {
        let bytes = self.rt.spare.iter().map(Tensor::nbytes).sum();
        self.rt.spare_charge = None;
        self.rt.spare_charge = Some(self.rt.tracker.charge(Tier::Compute, bytes));
    }

    fn take_ws(&mut self, seqs: usize, spec: &CacheSpec) -> Vec<PlaneBuf> {
        let (planes, charge) = match self.free_ws.iter().position(|(s, _, _)| *s == seqs) {
            Some(i) => {
                let (_, p, c) = self.free_ws.swap_remove(i);
                (p, c)
            }
            None => {
                let planes: Vec<PlaneBuf> = spec
                    .planes
                    .iter()
                    .map(|p| PlaneBuf::zeros(p.elem, seqs * self.capacity * p.per_token))
                    .collect();
                let bytes = planes.iter().map(|p| p.bytes().len() as u64).sum();
                (planes, self.rt.tracker.charge(Tier::Compute, bytes))
            }
        };
        self.ws_in_use.push((seqs, charge));
        planes
    }

    fn give_ws(&mut self, planes: Vec<PlaneBuf>, seqs: usize) {
        if let Some(i) = self.ws_in_use.iter().position(|(s, _)| *s == seqs) {
            let (_, charge) = self.ws_in_use.swap_remove(i);
            self.free_ws.push((seqs, planes, charge));
        }
    }

    fn cache_spec(&self, j: usize) -> CacheSpec {
        self.rt.layers[j]
            .cache
            .clone()
            .unwrap_or(CacheSpec { planes: Vec::new() })
    }

    /// Starts (or performs) moving the first `kv_len` rows of cache `(j, k)` into a workspace;
    /// a cache living whole on one RAM tier stays home and is used in place.
    fn start_load(&mut self, j: usize, k: usize, kv_len: usize, inline: bool) -> Result<()> {
        if !self.has_cache(j) {
            return Ok(());
        }
        if let CacheState::Storing(_) = &self.cache[j][k] {
            self.wait_one(j, k)?;
        }
        let CacheState::Home(mut home) =
            std::mem::replace(&mut self.cache[j][k], CacheState::Moving)
        else {
            return Err(Error::Worker(format!(
                "cache of layer {j}, micro-batch {k} is not home"
            )));
        };
        if home.in_place_planes().is_some() {
            self.cache[j][k] = CacheState::Home(home);
            return Ok(());
        }
        let spec = self.cache_spec(j);
        let mut ws = self.take_ws(home.seqs, &spec);
        if kv_len == 0 {
            self.cache[j][k] = CacheState::Loaded(home, ws);
            return Ok(());
        }
        let cap = self.capacity;
        let ticket = self.rt.pool.submit(inline, move || {
            home.transfer(&spec, &mut ws, cap, 0..kv_len, true)?;
            Ok((home, ws))
        });
        self.cache[j][k] = CacheState::Loading(ticket);
        self.pending.push((j, k));
        Ok(())
    }

    /// Starts (or performs) writing rows `kv_len..kv_len + q_len` of cache `(j, k)` home.
    fn start_store(
        &mut self,
        j: usize,
        k: usize,
        kv_len: usize,
        q_len: usize,
        inline: bool,
    ) -> Result<()> {
        match std::mem::replace(&mut self.cache[j][k], CacheState::Moving) {
            CacheState::Loaded(mut home, mut ws) => {
                let spec = self.cache_spec(j);
                let cap = self.capacity;
                let ticket = self.rt.pool.submit(inline, move || {
                    home.transfer(&spec, &mut ws, cap, kv_len..kv_len + q_len, false)?;
                    Ok((home, ws))
                });
                self.cache[j][k] = CacheState::Storing(ticket);
                self.pending.push((j, k));
                if inline {
                    self.wait_one(j, k)?;
                }
                Ok(())
            }
            other => {
                self.cache[j][k] = other;
                Ok(())
            }
        }
    }

    /// Waits for the job of cache `(j, k)`.
    fn wait_one(&mut self, j: usize, k: usize) -> Result<()> {
        self.pending.retain(|&p| p != (j, k));
        match std::mem::replace(&mut self.cache[j][k], CacheState::Moving) {
            CacheState::Loading(t) => {
                let (home, ws) = t.wait()?;
                self.cache[j][k] = CacheState::Loaded(home, ws);
            }
            CacheState::Storing(t) => {
                let (home, ws) = t.wait()?;
                let seqs = home.seqs;
                self.give_ws(ws, seqs);
                self.cache[j][k] = CacheState::Home(home);
            }
            other => self.cache[j][k] = other,
        }
        Ok(())
    }

    /// The synchronization: waits for every load and store in flight.
    fn sync(&mut self) -> Result<()> {
        while let Some(&(j, k)) = self.pending.first() {
            self.wait_one(j, k)?;
        }
        Ok(())
    }

    /// Runs step `step` on `batch`.
    fn compute<M: BlockModel>(
        &mut self,
        model: &M,
        step: &Step,
        batch: &mut M::Batch,
    ) -> Result<()> {
        let (j, k) = (step.layer, step.micro_batch);
        if let Some(act) = &self.act {
            if j > 0 {
                let h = model.activation(batch);
                h.resize(act.lens[k], 0.0);
                act.file
                    .read_at(act.region * k as u64, bytemuck::cast_slice_mut(h))?;
            }
        }
        if self.has_cache(j) && matches!(self.cache[j][k], CacheState::Loading(_)) {
            let t = Instant::now();
            self.wait_one(j, k)?;
            self.stats.stall_s += t.elapsed().as_secs_f64();
        }
        let current = self
            .current
            .as_mut()
            .ok_or_else(|| Error::Worker("no weights fetched".into()))?;
        let homes = &mut self.rt.store.homes[j];
        let mut weights: Vec<Tensor> = homes
            .iter_mut()
            .zip(current.tensors.iter_mut())
            .map(|(h, f)| match h {
                Home::Ram(t) => t.take(),
                Home::Disk(_) => f.take(),
            })
            .collect();
        let view = match self.cache.get_mut(j).and_then(|c| c.get_mut(k)) {
            Some(CacheState::Home(home)) => {
                let seqs = home.seqs;
                home.in_place_planes().map(|planes| CacheView {
                    planes,
                    seqs,
                    capacity: self.capacity,
                    kv_len: step.kv_len,
                })
            }
            Some(CacheState::Loaded(home, ws)) => Some(CacheView {
                planes: ws,
                seqs: home.seqs,
                capacity: self.capacity,
                kv_len: step.kv_len,
            }),
            Some(_) => {
                return Err(Error::Worker(format!(
                    "cache of layer {j}, micro-batch {k} is not ready"
                )))
            }
            None => None,
        };
        let t = Instant::now();
        let result = model.forward(step, &mut weights, view, batch);
        self.stats.compute_s += t.elapsed().as_secs_f64();
        let mut missing = None;
        for (i, ((h, f), w)) in homes
            .iter_mut()
            .zip(current.tensors.iter_mut())
            .zip(weights)
            .enumerate()
        {
            if w.is_empty() {
                missing = Some(i);
            }
            match h {
                Home::Ram(t) => *t = w,
                Home::Disk(_) => *f = w,
            }
        }
        result.map_err(|e| layer_error(&self.rt.layers, j, e))?;
        if let Some(i) = missing {
            return Err(layer_error(
                &self.rt.layers,
                j,
                format!("the forward pass did not put weight {i} back").into(),
            ));
        }
        let h = model.activation(batch);
        let bytes = (h.len() * 4) as u64;
        let last = j + 1 == self.rt.layers.len();
        let tier = self.rt.policy.activation_tier();
        match &mut self.act {
            Some(act) if !last => {
                if bytes > act.region {
                    return Err(Error::Model(format!(
                        "layer {j} produced {bytes} bytes of activations, more than the {} declared",
                        act.region
                    )));
                }
                act.file
                    .write_at(act.region * k as u64, bytemuck::cast_slice(h))?;
                act.lens[k] = h.len();
                *h = Vec::new();
                self.act_charges[k] = Some(self.rt.tracker.charge(Tier::Disk, bytes));
            }
            _ => {
                self.act_charges[k] = Some(self.rt.tracker.charge(tier, (h.capacity() * 4) as u64))
            }
        }
        Ok(())
    }
}
