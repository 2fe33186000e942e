//! Policy search: measure this machine, predict a policy with FlexGen's cost model, and find
//! the fastest policy that fits the memory with one LP per block shape.
//!
//! | step | item |
//! |---|---|
//! | calibrate (≈15 s, saved as JSON, reused until stale) | [`load_or_calibrate`], [`calibrate`], [`HardwareProfile`] |
//! | describe the model | [`ModelShape`] (built by `flexgen-opt` from an `OptConfig`) |
//! | predict one policy | [`predict`], [`CostModel`] |
//! | search | [`search`] with [`SearchOptions`] → [`SearchResult`] |
//!
//! ```no_run
//! use flexgen_offload::search::*;
//! # fn main() -> Result<()> {
//! let dir = flexgen_offload::default_offload_dir();
//! let (profile, _) = load_or_calibrate(
//!     &default_profile_path(), &dir, false, &CalibrationSettings::default(), &mut |_| {})?;
//! let shape = ModelShape {
//!     name: "facebook/opt-6.7b".into(), num_layers: 32, hidden: 4096, ffn: 16384,
//!     heads: 32, vocab: 50272, max_positions: 2048, embed_dim: 4096,
//! };
//! let mut limits = MemoryLimits::measure(&dir);
//! limits.ram_bytes = 6 << 30;
//! let opts = SearchOptions::new(Workload { prompt_len: 512, gen_len: 32 }, limits);
//! let found = search(&shape, &profile, &opts)?;
//! println!("{:?} -> {:.2} tok/s", found.policy.percent(), found.prediction.total_throughput);
//! # Ok(()) }
//! ```
//!
//! # Adapting FlexGen's model to the CPU backend
//! - **One RAM.** FlexGen's GPU and CPU memories are both RAM here, so the model has one RAM
//!   constraint and no RAM-to-RAM transfer terms. Each class (weights, cache) has one free
//!   fraction, its disk share; the search returns the RAM share as the *compute* percentage
//!   (`wg = RAM%`, `wc = 0`, `cg = RAM%`, `cc = 0`): weights on either RAM tier are used in
//!   place, and a cache whole on one RAM tier is attended in place, while a cache split over
//!   the two RAM tiers would be copied into a workspace for nothing. Activations stay in RAM
//!   (`hg = 100`), as FlexGen's own search pins them off disk.
//! - **Compute terms use calibrated rates** ([`calibrate`]): linear layers at the
//!   micro-batch's row count for the weight format in use (`f32`, `f16`, `bf16`, 4-bit), and
//!   never faster than streaming the weights from RAM once *per micro-batch* (a GPU keeps a
//!   layer's weights in its memory for all micro-batches; the CPU re-reads them from RAM
//!   each time); attention at prefill in FLOP/s at the prompt length, and at decode as bytes
//!   of cache read per second (dense or packed).
//! - **Disk terms** use the measured `O_DIRECT` bandwidths of the offload directory: weights
//!   homed on disk are read once per layer per token per block; the disk share of the cache is
//!   written at prefill and read at every decode step; a cache not whole in RAM also costs
//!   copying its RAM share through a workspace and the workspaces' memory.
//! - **Overlap**: a layer costs `max(I/O, compute)`, without overlap `I/O + compute`.
//! - **Memory**: the cache is allocated for the whole block at its start, so one peak covers
//!   prefill and decode: weights in RAM (1-D weights always), two layers of fetch buffers for
//!   disk-homed weights, the cache's RAM share, cache workspaces, activations and one
//!   micro-batch's scratch, all within `α` (0.8) times the limits; the limits default to the
//!   measured `MemAvailable` and the offload directory's free disk.
//! - **Rounding**: fractions become integer percentages that the runtime's placement rule
//!   ([`crate::place_weights`], whole tensors by their midpoint; [`crate::split_cache`], whole
//!   sequences) turns into the actual bytes on each tier; the search keeps the largest RAM
//!   share whose *actual* placement fits, so the returned policy passes
//!   [`crate::Policy::validate`] and every memory constraint, and predicts it as placed.

pub mod calibrate;
pub mod cost_model;
pub mod error;
pub mod hardware;
pub mod lp;
pub mod procedure;
pub mod shape;

pub use calibrate::{calibrate, load_or_calibrate, CalibrationSettings, ProfileOrigin};
pub use cost_model::{
    predict, CacheMode, CostModel, Formats, Lin, Placement, Prediction, RealizedWeights, Terms,
    Workload,
};
pub use error::{Result, SearchError};
pub use hardware::{
    default_profile_path, Fingerprint, HardwareProfile, LinearKind, MemoryLimits, RateCurve,
};
pub use lp::{Capacity, Grid, Lp, LpSolution, PlacementSolver, Vertices};
pub use procedure::{
    cpu_policy, gpu_batch_sizes, search, Candidate, Choice, SearchOptions, SearchResult,
};
pub use shape::ModelShape;
