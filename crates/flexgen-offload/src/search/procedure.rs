//! The search (FlexGen's `solve`): enumerate block shapes, solve one LP per shape, turn the
//! best fractions into a [`Policy`] with integer percentages that the runtime accepts and that
//! still fits the memory limits, and keep the fastest.

use std::collections::HashMap;

use flexgen_core::DType;
use serde::Serialize;

use super::cost_model::{CacheMode, CostModel, Formats, Prediction, RealizedWeights, Workload};
use super::error::{Result, SearchError};
use super::hardware::{HardwareProfile, MemoryLimits};
use super::lp::{Capacity, Lp, LpSolution, PlacementSolver};
use super::shape::ModelShape;
use crate::placement::split_cache;
use crate::policy::{Policy, Split};
use crate::tier::Tier;

/// Whether to use a compression: never, always, or whichever the search finds faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Choice {
    /// Never.
    Off,
    /// Always.
    On,
    /// Try both.
    Auto,
}

impl Choice {
    fn values(self) -> &'static [bool] {
        match self {
            Choice::Off => &[false],
            Choice::On => &[true],
            Choice::Auto => &[false, true],
        }
    }
}

impl std::str::FromStr for Choice {
    type Err = SearchError;
    /// `off`, `on` or `auto`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "no" | "false" => Ok(Choice::Off),
            "on" | "yes" | "true" => Ok(Choice::On),
            "auto" => Ok(Choice::Auto),
            _ => Err(SearchError::option(
                "compression",
                s,
                "expected off, on or auto",
            )),
        }
    }
}

/// What to search for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchOptions {
    /// Prompt and generation lengths.
    pub workload: Workload,
    /// Dtype of uncompressed 2-D weights.
    #[serde(serialize_with = "super::cost_model::serialize_dtype")]
    pub dtype: DType,
    /// 4-bit weights.
    pub compress_weight: Choice,
    /// 4-bit KV cache.
    pub compress_cache: Choice,
    /// RAM and disk the plan may use, before [`SearchOptions::relaxation`].
    pub limits: MemoryLimits,
    /// Share of the limits the peak may reach (FlexGen's α, 0.8).
    pub relaxation: f64,
    /// Overlap I/O with compute.
    pub overlap: bool,
    /// Attention and MLP as separate schedule layers.
    pub sep_layer: bool,
    /// Only this micro-batch size (FlexGen's `--gbs`).
    pub gpu_batch_size: Option<usize>,
    /// Only this many micro-batches (FlexGen's `--num-gb`).
    pub num_gpu_batches: Option<usize>,
    /// Largest micro-batch size enumerated.
    pub max_gpu_batch_size: usize,
    /// Most micro-batches per block considered.
    pub max_num_gpu_batches: usize,
}

impl SearchOptions {
    /// FlexGen's defaults (`f16` weights, no compression, α = 0.8, overlap, separate layers)
    /// for `workload` within `limits`.
    pub fn new(workload: Workload, limits: MemoryLimits) -> Self {
        SearchOptions {
            workload,
            dtype: DType::F16,
            compress_weight: Choice::Off,
            compress_cache: Choice::Off,
            limits,
            relaxation: 0.8,
            overlap: true,
            sep_layer: true,
            gpu_batch_size: None,
            num_gpu_batches: None,
            max_gpu_batch_size: 512,
            max_num_gpu_batches: 64,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.relaxation.is_finite() && self.relaxation > 0.0 && self.relaxation <= 4.0) {
            return Err(SearchError::option(
                "--alpha",
                self.relaxation,
                "the share of the memory limits to plan for must be in (0, 4]",
            ));
        }
        for (opt, v) in [
            ("--gpu-batch-size", self.gpu_batch_size),
            ("--num-gpu-batches", self.num_gpu_batches),
            ("--max-gpu-batch-size", Some(self.max_gpu_batch_size)),
            ("--max-num-gpu-batches", Some(self.max_num_gpu_batches)),
        ] {
            if v == Some(0) {
                return Err(SearchError::option(opt, 0, "must be positive"));
            }
        }
        Ok(())
    }

    /// The limits times the relaxation.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            ram: self.limits.ram_bytes as f64 * self.relaxation,
            disk: self.limits.disk_bytes as f64 * self.relaxation,
        }
    }
}

/// One block shape the search solved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    /// Micro-batch size.
    pub gpu_batch_size: usize,
    /// Micro-batches per block.
    pub num_gpu_batches: usize,
    /// 4-bit weights.
    pub compress_weight: bool,
    /// 4-bit cache.
    pub compress_cache: bool,
    /// The LP optimum (fractions).
    pub lp: LpSolution,
    /// Throughput of the rounded policy, if one fits.
    pub rounded_throughput: Option<f64>,
}

/// The chosen policy and what the cost model predicts for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchResult {
    /// The policy, with integer percentages; it passes [`Policy::validate`].
    pub policy: Policy,
    /// Prediction of the policy as the runtime would place it.
    pub prediction: Prediction,
    /// The LP optimum of the chosen block shape (fractions, before rounding).
    pub lp: LpSolution,
    /// The memory planned for.
    pub capacity: Capacity,
    /// Every feasible block shape solved, in search order.
    pub candidates: Vec<Candidate>,
    /// LPs solved.
    pub lps_solved: usize,
}

/// FlexGen's micro-batch sizes: 1, 2, 3, 4, then doubling, up to `max`.
pub fn gpu_batch_sizes(max: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 3, 4];
    let mut g = 8;
    while g <= max {
        v.push(g);
        g *= 2;
    }
    v.retain(|&g| g <= max);
    v
}

/// The policy of a block shape and formats with weights and cache `wg`/`cg` percent in RAM
/// (on the compute tier: on the CPU both RAM tiers are the same memory, and a cache whole on
/// one of them is used in place), activations in RAM.
pub fn cpu_policy(formats: &Formats, gbs: usize, ngb: usize, wg: f64, cg: f64) -> Policy {
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: ngb,
        weights: Split {
            compute: wg,
            host: 0.0,
        },
        cache: Split {
            compute: cg,
            host: 0.0,
        },
        activations: Split::all(Tier::Compute),
        overlap: formats.overlap,
        sep_layer: formats.sep_layer,
        compress_weight: formats.compress_weight,
        compress_cache: formats.compress_cache,
        ..Policy::default()
    }
}

/// The weight placement of every integer RAM percentage 0..=100 of one format.
struct WeightTable(Vec<RealizedWeights>);

impl WeightTable {
    fn new(model: &CostModel) -> Self {
        let f = model.formats();
        WeightTable(
            (0..=100)
                .map(|wg| model.realize_weights(&cpu_policy(&f, 1, 1, wg as f64, 100.0)))
                .collect(),
        )
    }
}

/// The smallest integer cache percentage putting exactly `ram_seqs` of `gbs` sequences in
/// RAM, if one does.
fn cache_percent_for(ram_seqs: usize, gbs: usize) -> Option<f64> {
    (0..=100).map(f64::from).find(|&p| {
        split_cache(
            gbs,
            &Split {
                compute: p,
                host: 0.0,
            },
        )[0] == ram_seqs
    })
}

/// Rounds an LP solution to integer percentages: for a few cache splits around the LP's
/// (whole sequences), the largest weight percentage whose actual placement fits; the fastest
/// fitting policy wins.
fn round(
    model: &CostModel,
    lp: &LpSolution,
    cap: &Capacity,
    table: &WeightTable,
) -> Result<Option<(Policy, Prediction)>> {
    let f = model.formats();
    let (gbs, ngb) = model.block();
    let cache_percents: Vec<f64> = match lp.cache_mode {
        CacheMode::InPlace => vec![100.0],
        CacheMode::Gathered if f.compress_cache => vec![0.0],
        CacheMode::Gathered => {
            let r = (1.0 - lp.cache_disk) * gbs as f64;
            let hi = (r.ceil() as usize).min(gbs.saturating_sub(1));
            let lo = (r.floor() as usize).saturating_sub(1);
            let mut v: Vec<f64> = (lo..=hi)
                .rev()
                .filter_map(|seqs| cache_percent_for(seqs, gbs))
                .collect();
            v.dedup();
            v
        }
    };
    let mut best: Option<(Policy, Prediction)> = None;
    for cg in cache_percents {
        for wg in (0..=100usize).rev() {
            let policy = cpu_policy(&f, gbs, ngb, wg as f64, cg);
            let pred = model.predict_with(&policy, &table.0[wg])?;
            if cap.fits(&pred) {
                if best
                    .as_ref()
                    .is_none_or(|(_, b)| pred.total_throughput > b.total_throughput)
                {
                    best = Some((policy, pred));
                }
                break;
            }
        }
    }
    Ok(best)
}

/// Solves the LP of one shape, remembering results per `ngb`.
struct ShapeSolver<'a> {
    shape: &'a ModelShape,
    profile: &'a HardwareProfile,
    opts: &'a SearchOptions,
    formats: Formats,
    cap: Capacity,
    gbs: usize,
    memo: HashMap<usize, Option<(CostModel, LpSolution)>>,
    lps: usize,
}

impl ShapeSolver<'_> {
    fn solve(&mut self, ngb: usize) -> Result<Option<(CostModel, LpSolution)>> {
        if let Some(r) = self.memo.get(&ngb) {
            return Ok(r.clone());
        }
        let model = CostModel::new(
            self.shape,
            self.profile,
            self.opts.workload,
            self.formats,
            self.gbs,
            ngb,
        )?;
        self.lps += 1;
        let r = Lp.solve(&model, &self.cap)?.map(|s| (model, s));
        self.memo.insert(ngb, r.clone());
        Ok(r)
    }

    /// The largest feasible `ngb` up to `max` (0 when even one micro-batch does not fit):
    /// doubling, then bisection, as FlexGen's `get_nb_ub`.
    fn upper_bound(&mut self, max: usize) -> Result<usize> {
        if self.solve(1)?.is_none() {
            return Ok(0);
        }
        let mut lo = 1;
        while lo * 2 <= max && self.solve(lo * 2)?.is_some() {
            lo *= 2;
        }
        let mut hi = (lo * 2 - 1).min(max);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.solve(mid)?.is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo)
    }
}

/// Searches the policy with the highest predicted throughput for `shape` on the machine of
/// `profile` (see the module docs of [`crate::search`]).
pub fn search(
    shape: &ModelShape,
    profile: &HardwareProfile,
    opts: &SearchOptions,
) -> Result<SearchResult> {
    shape.validate()?;
    opts.validate()?;
    super::cost_model::check_workload(shape, opts.workload)?;
    let cap = opts.capacity();
    let mut candidates = Vec::new();
    let mut best: Option<(Policy, Prediction, LpSolution)> = None;
    let mut lps = 0;
    let gbs_list = match opts.gpu_batch_size {
        Some(g) => vec![g],
        None => gpu_batch_sizes(opts.max_gpu_batch_size),
    };
    for &compress_weight in opts.compress_weight.values() {
        for &compress_cache in opts.compress_cache.values() {
            let formats = Formats {
                dtype: opts.dtype,
                compress_weight,
                compress_cache,
                overlap: opts.overlap,
                sep_layer: opts.sep_layer,
            };
            let mut table: Option<WeightTable> = None;
            for &gbs in &gbs_list {
                let mut solver = ShapeSolver {
                    shape,
                    profile,
                    opts,
                    formats,
                    cap,
                    gbs,
                    memo: HashMap::new(),
                    lps: 0,
                };
                let mut solved = Vec::new();
                if let Some(ngb) = opts.num_gpu_batches {
                    solved.extend(solver.solve(ngb)?);
                } else {
                    let ub = solver.upper_bound(opts.max_num_gpu_batches)?;
                    let mut prev = 0.0;
                    for ngb in 1..=ub {
                        let Some(r) = solver.solve(ngb)? else { break };
                        let thr = r.1.prediction.total_throughput;
                        solved.push(r);
                        if thr < prev {
                            break;
                        }
                        prev = thr;
                    }
                }
                lps += solver.lps;
                if solved.is_empty() {
                    if opts.gpu_batch_size.is_none() {
                        break;
                    }
                    continue;
                }
                for (model, lp) in solved {
                    let table = table.get_or_insert_with(|| WeightTable::new(&model));
                    let rounded = round(&model, &lp, &cap, table)?;
                    let (g, n) = model.block();
                    candidates.push(Candidate {
                        gpu_batch_size: g,
                        num_gpu_batches: n,
                        compress_weight,
                        compress_cache,
                        lp,
                        rounded_throughput: rounded.as_ref().map(|r| r.1.total_throughput),
                    });
                    if let Some((policy, pred)) = rounded {
                        if best
                            .as_ref()
                            .is_none_or(|b| pred.total_throughput > b.1.total_throughput)
                        {
                            best = Some((policy, pred, lp));
                        }
                    }
                }
            }
        }
    }
    match best {
        Some((policy, prediction, lp)) => Ok(SearchResult {
            policy,
            prediction,
            lp,
            capacity: cap,
            candidates,
            lps_solved: lps,
        }),
        None => Err(SearchError::Infeasible(explain_infeasible(
            shape, profile, opts, &cap,
        )?)),
    }
}

/// What the smallest block needs with everything that can go to disk on disk.
fn explain_infeasible(
    shape: &ModelShape,
    profile: &HardwareProfile,
    opts: &SearchOptions,
    cap: &Capacity,
) -> Result<String> {
    let formats = Formats {
        dtype: opts.dtype,
        compress_weight: opts.compress_weight != Choice::Off,
        compress_cache: opts.compress_cache != Choice::Off,
        overlap: opts.overlap,
        sep_layer: opts.sep_layer,
    };
    let gbs = opts.gpu_batch_size.unwrap_or(1);
    let ngb = opts.num_gpu_batches.unwrap_or(1);
    let model = CostModel::new(shape, profile, opts.workload, formats, gbs, ngb)?;
    let p = model.evaluate(&super::cost_model::Placement::fractions(
        1.0,
        1.0,
        CacheMode::Gathered,
    ));
    let gib = |b: f64| b / (1u64 << 30) as f64;
    Ok(format!(
        "{} with {} sequences of {} + {} tokens needs at least {:.2} GiB of RAM and {:.2} GiB \
         of disk even with every weight and the KV cache on disk, but the plan may use \
         {:.2} GiB of RAM and {:.2} GiB of disk ({} x the limits); raise the limits, shorten \
         the sequences or enable compression",
        shape.name,
        gbs * ngb,
        opts.workload.prompt_len,
        opts.workload.gen_len,
        gib(p.ram_bytes()),
        gib(p.peak_bytes[2]),
        gib(cap.ram),
        gib(cap.disk),
        opts.relaxation
    ))
}
