//! The placement LP of one block shape (FlexGen's `solve_lp`), solved with `good_lp` on the
//! pure-Rust `microlp` simplex; an exact vertex enumeration of the same LP, which decides the
//! cases where the simplex fails numerically; and a brute-force grid over the same cost model
//! that cross-checks both.
//!
//! Variables: `wd` (fraction of weights on disk) and `cd` (fraction of the KV cache on disk),
//! plus one epigraph variable per layer time (prefill and decode, decoder and embedding
//! layers). On the CPU the compute and host tiers are the same RAM, so the RAM fraction of
//! each class is `1 − disk`; activations stay in RAM (FlexGen's code pins them off disk too).
//! Minimize `l·t_pre + t_emb_pre + (n−1)·(l·t_dec + t_emb_dec)` subject to
//! `t ≥ I/O`, `t ≥ compute + (1 − ρ)·I/O` (overlap) or `t ≥ I/O + compute`, `RAM ≤ α·ram` and
//! `disk ≤ α·disk`. Rows are scaled to seconds and GiB. A cache whole in RAM (used in
//! place) and a cache partly or wholly on disk (gathered through workspaces) have different
//! terms, so each is its own LP; a compressed cache cannot be split (the runtime refuses it),
//! so it is either in RAM or on disk.

use good_lp::{
    constraint, microlp, variable, Expression, ProblemVariables, ResolutionError, Solution,
    SolverModel, Variable,
};
use serde::Serialize;

use super::cost_model::{CacheMode, CostModel, Lin, Placement, Prediction, Terms};
use super::error::{Result, SearchError};

const GIB: f64 = (1u64 << 30) as f64;

/// Memory the placement may use: the limits times the relaxation factor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Capacity {
    /// RAM bytes.
    pub ram: f64,
    /// Disk bytes.
    pub disk: f64,
}

impl Capacity {
    /// Whether `p` fits.
    pub fn fits(&self, p: &Prediction) -> bool {
        p.ram_bytes() <= self.ram * (1.0 + 1e-9) && p.peak_bytes[2] <= self.disk * (1.0 + 1e-9)
    }
}

/// An optimal placement of one block shape, as fractions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LpSolution {
    /// Fraction of the weights on disk.
    pub weights_disk: f64,
    /// Fraction of the KV cache on disk.
    pub cache_disk: f64,
    /// Cache in place or gathered.
    pub cache_mode: CacheMode,
    /// The cost model at this placement.
    pub prediction: Prediction,
}

/// Finds the best placement fractions of one block shape.
pub trait PlacementSolver {
    /// The best placement of `model` within `cap`, or `None` when nothing fits.
    fn solve(&self, model: &CostModel, cap: &Capacity) -> Result<Option<LpSolution>>;
}

/// The cache modes and `cd` ranges worth solving for.
fn cache_options(model: &CostModel) -> Vec<(CacheMode, f64, f64)> {
    let on_disk = if model.formats().compress_cache {
        (CacheMode::Gathered, 1.0, 1.0)
    } else {
        (CacheMode::Gathered, 0.0, 1.0)
    };
    vec![(CacheMode::InPlace, 0.0, 0.0), on_disk]
}

/// Keeps the faster of two solutions.
fn better(a: Option<LpSolution>, b: Option<LpSolution>) -> Option<LpSolution> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.prediction.total_s < x.prediction.total_s {
            y
        } else {
            x
        }),
        (x, y) => x.or(y),
    }
}

/// The LP, one per cache mode, best kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lp;

/// The best of `solve_one(mode, lo, hi)` over [`cache_options`].
fn best_over_modes(
    model: &CostModel,
    mut solve_one: impl FnMut(CacheMode, f64, f64) -> Result<Option<LpSolution>>,
) -> Result<Option<LpSolution>> {
    let mut best = None;
    for (mode, lo, hi) in cache_options(model) {
        best = better(best, solve_one(mode, lo, hi)?);
    }
    Ok(best)
}

/// The layer times of one block shape, each as its `(I/O, compute)` terms: decoder layer at
/// prefill and at decode, embedding and output layers at prefill and at decode.
fn layer_times(t: &Terms) -> [(&Lin, &Lin); 4] {
    [
        (&t.prefill_io, &t.prefill_compute),
        (&t.decode_io, &t.decode_compute),
        (&t.embed_io, &t.embed_prefill_compute),
        (&t.embed_io, &t.embed_decode_compute),
    ]
}

/// The coefficient of `wd` in `lin` when every weight fraction is `wd` (the LP's view).
fn weight_coefficient(lin: &Lin) -> f64 {
    lin.w + lin.e + lin.f
}

impl PlacementSolver for Lp {
    fn solve(&self, model: &CostModel, cap: &Capacity) -> Result<Option<LpSolution>> {
        best_over_modes(model, |mode, lo, hi| solve_mode(model, cap, mode, lo, hi))
    }
}

/// Brute force: every `(wd, cd)` on a grid of `1/steps`, for tests.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    /// Grid points per unit (20 = steps of 5%).
    pub steps: usize,
}

impl PlacementSolver for Grid {
    fn solve(&self, model: &CostModel, cap: &Capacity) -> Result<Option<LpSolution>> {
        let n = self.steps.max(1);
        let mut best = None;
        for (mode, lo, hi) in cache_options(model) {
            for i in 0..=n {
                let wd = i as f64 / n as f64;
                for j in 0..=n {
                    let cd = j as f64 / n as f64;
                    if cd < lo || cd > hi {
                        continue;
                    }
                    let p = model.evaluate(&Placement::fractions(wd, cd, mode));
                    if cap.fits(&p) {
                        best = better(
                            best,
                            Some(LpSolution {
                                weights_disk: wd,
                                cache_disk: cd,
                                cache_mode: mode,
                                prediction: p,
                            }),
                        );
                    }
                }
            }
        }
        Ok(best)
    }
}

/// `lin` with every weight fraction set to `wd` and the cache fraction to `cd`, scaled.
fn expr(lin: &Lin, wd: Variable, cd: Variable, scale: f64) -> Expression {
    let mut e = Expression::from(lin.c / scale);
    e += (weight_coefficient(lin) / scale) * wd;
    e += (lin.k / scale) * cd;
    e
}

/// One LP: cache `mode` with `cd` in `[lo, hi]`.
pub fn solve_mode(
    model: &CostModel,
    cap: &Capacity,
    mode: CacheMode,
    lo: f64,
    hi: f64,
) -> Result<Option<LpSolution>> {
    let t = model.terms(mode, false);
    let l = model.shape().num_layers as f64;
    let n = model.workload().gen_len as f64;
    let mut vars = ProblemVariables::new();
    let wd = vars.add(variable().min(0.0).max(1.0));
    let cd = vars.add(variable().min(lo).max(hi));
    let tp = vars.add(variable().min(0.0));
    let tg = vars.add(variable().min(0.0));
    let tep = vars.add(variable().min(0.0));
    let teg = vars.add(variable().min(0.0));
    // A tiny preference for RAM breaks ties when I/O hides under compute.
    let tie = 1e-9 * (1.0 + t.prefill_compute.c + n * t.decode_compute.c);
    let objective: Expression =
        l * tp + tep + (n - 1.0) * (l * tg) + (n - 1.0) * teg + tie * wd + tie * cd;
    let mut problem = vars.minimise(objective).using(microlp);
    for (tv, (io, comp)) in [tp, tg, tep, teg].into_iter().zip(layer_times(&t)) {
        if model.overlap() {
            problem = problem
                .with(constraint!(tv >= expr(io, wd, cd, 1.0)))
                .with(constraint!(
                    tv >= expr(&model.overlapped_compute(io, comp), wd, cd, 1.0)
                ));
        } else {
            problem = problem.with(constraint!(tv >= expr(&(*io + *comp), wd, cd, 1.0)));
        }
    }
    problem = problem
        .with(constraint!(expr(&t.ram, wd, cd, GIB) <= cap.ram / GIB))
        .with(constraint!(expr(&t.disk, wd, cd, GIB) <= cap.disk / GIB));
    match problem.solve() {
        Ok(sol) => {
            let w = sol.value(wd).clamp(0.0, 1.0);
            let c = sol.value(cd).clamp(lo, hi);
            let prediction = model.evaluate(&Placement::fractions(w, c, mode));
            Ok(Some(LpSolution {
                weights_disk: w,
                cache_disk: c,
                cache_mode: mode,
                prediction,
            }))
        }
        Err(ResolutionError::Infeasible) => Ok(None),
        // microlp can stop on a singular basis, on infeasible and on feasible problems alike
        // (upstream Specy/microlp#48). The LP has only two placement variables, so its
        // vertices are few enough to enumerate exactly instead.
        Err(ResolutionError::Other(_)) | Err(ResolutionError::Str(_)) => {
            Ok(solve_mode_at_vertices(model, cap, mode, lo, hi))
        }
        Err(e) => Err(SearchError::Solver(e.to_string())),
    }
}

/// Exact solution by enumerating vertices, for tests and for the simplex's numerical failures.
///
/// The objective is a sum of maxima of functions affine in `(wd, cd)`, so it is convex and
/// piecewise affine, and the feasible set is a polygon. Its minimum is therefore attained at a
/// vertex of the arrangement of the polygon's edges (the `[0, 1] × [lo, hi]` box, the RAM and
/// disk limits) and the lines where a layer's time switches from I/O-bound to compute-bound.
/// Every pairwise intersection of those lines that fits is evaluated; the fastest wins, and of
/// equally fast ones the one with the least on disk (the LP's tie-break).
#[derive(Debug, Clone, Copy, Default)]
pub struct Vertices;

impl PlacementSolver for Vertices {
    fn solve(&self, model: &CostModel, cap: &Capacity) -> Result<Option<LpSolution>> {
        best_over_modes(model, |mode, lo, hi| {
            Ok(solve_mode_at_vertices(model, cap, mode, lo, hi))
        })
    }
}

/// The line `a·wd + b·cd = r` in the placement plane.
#[derive(Debug, Clone, Copy)]
struct PlaneLine {
    a: f64,
    b: f64,
    r: f64,
}

impl PlaneLine {
    /// Where `lin` (with every weight fraction at `wd`) equals `value`.
    fn level(lin: &Lin, value: f64) -> Self {
        PlaneLine {
            a: weight_coefficient(lin),
            b: lin.k,
            r: value - lin.c,
        }
    }

    /// The point on both lines, if they cross at one point.
    fn meet(&self, o: &PlaneLine) -> Option<(f64, f64)> {
        let det = self.a * o.b - self.b * o.a;
        let size = (self.a.abs() + self.b.abs()) * (o.a.abs() + o.b.abs());
        if det.abs() <= 1e-12 * size || size == 0.0 {
            return None;
        }
        Some((
            (self.r * o.b - self.b * o.r) / det,
            (self.a * o.r - self.r * o.a) / det,
        ))
    }
}

/// [`Vertices`] for one cache mode with `cd` in `[lo, hi]`.
fn solve_mode_at_vertices(
    model: &CostModel,
    cap: &Capacity,
    mode: CacheMode,
    lo: f64,
    hi: f64,
) -> Option<LpSolution> {
    let t = model.terms(mode, false);
    let mut lines = vec![
        PlaneLine {
            a: 1.0,
            b: 0.0,
            r: 0.0,
        },
        PlaneLine {
            a: 1.0,
            b: 0.0,
            r: 1.0,
        },
        PlaneLine {
            a: 0.0,
            b: 1.0,
            r: lo,
        },
        PlaneLine {
            a: 0.0,
            b: 1.0,
            r: hi,
        },
        PlaneLine::level(&t.ram, cap.ram),
        PlaneLine::level(&t.disk, cap.disk),
    ];
    if model.overlap() {
        for (io, comp) in layer_times(&t) {
            let gap = *io + model.overlapped_compute(io, comp).scale(-1.0);
            lines.push(PlaneLine::level(&gap, 0.0));
        }
    }
    const SLACK: f64 = 1e-9;
    let mut best: Option<LpSolution> = None;
    for (i, first) in lines.iter().enumerate() {
        for second in &lines[i + 1..] {
            let Some((w, c)) = first.meet(second) else {
                continue;
            };
            if !(-SLACK..=1.0 + SLACK).contains(&w) || !(lo - SLACK..=hi + SLACK).contains(&c) {
                continue;
            }
            let (w, c) = (w.clamp(0.0, 1.0), c.clamp(lo, hi));
            let prediction = model.evaluate(&Placement::fractions(w, c, mode));
            if !cap.fits(&prediction) {
                continue;
            }
            let candidate = LpSolution {
                weights_disk: w,
                cache_disk: c,
                cache_mode: mode,
                prediction,
            };
            best = Some(match best {
                Some(b) if !faster_or_tied_with_less_disk(&candidate, &b) => b,
                _ => candidate,
            });
        }
    }
    best
}

/// Whether `a` beats `b`: faster, or as fast (to 1e-12) with less on disk.
fn faster_or_tied_with_less_disk(a: &LpSolution, b: &LpSolution) -> bool {
    let (ta, tb) = (a.prediction.total_s, b.prediction.total_s);
    let tol = 1e-12 * ta.abs().max(tb.abs());
    if (ta - tb).abs() > tol {
        ta < tb
    } else {
        a.weights_disk + a.cache_disk < b.weights_disk + b.cache_disk
    }
}
