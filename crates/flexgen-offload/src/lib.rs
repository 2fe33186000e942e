//! FlexGen's offloading runtime, model-agnostic: run a model whose weights and KV cache do not
//! fit in memory, at high throughput, by reading each layer's weights once per token for a whole
//! block of sequences while the next layer streams in.
//!
//! A model describes itself as a list of layers ([`LayerSpec`]: weights in placement groups, an
//! optional KV cache) and implements [`BlockModel::forward`] for one layer and one micro-batch;
//! [`Runtime`] does the rest:
//!
//! | item | job |
//! |---|---|
//! | [`Policy`] | FlexGen's policy: block shape, `--percent`, overlap, sep_layer, compression, ... |
//! | [`Tier`], [`Budgets`], [`MemoryTracker`] | compute / host / disk tiers, byte budgets, current and peak bytes |
//! | [`place_weights`], [`split_cache`] | FlexGen's per-layer midpoint rule; cache split in whole sequences |
//! | [`DiskFile`], [`OffloadDir`] | positioned `O_DIRECT` I/O into reusable buffers; files removed on exit, error, Ctrl-C, and after a kill by the next run in the same directory |
//! | [`Runtime`] | weights placed once at load; the zig-zag block schedule with I/O threads |
//!
//! # The CPU backend
//! Compute and host tiers are both RAM: weights homed on either are used in place, and a KV
//! cache living whole on one of them is attended in place. Disk-homed weights are read per
//! token into two layers' worth of reusable buffers; a KV cache split over tiers or on disk is
//! gathered into a workspace before attention and its new rows written back after.

pub mod disk;
pub mod error;
pub mod io;
pub mod model;
pub mod offload_dir;
pub mod placement;
pub mod policy;
pub mod schedule;
pub mod search;
pub mod store;
pub mod tensor;
pub mod tier;

pub use disk::{DiskFile, IoStats, IoTotals};
pub use error::{Error, Result};
pub use flexgen_quant::CompressionConfig;
pub use model::{BlockModel, CacheView, DynError, FileLocation, LayerSpec, Step, WeightSource};
pub use offload_dir::{
    default_offload_dir, install_interrupt_cleanup, remove_stale_offload_dirs, OffloadDir,
};
pub use placement::{place_weights, split_cache};
pub use policy::{Policy, Split};
pub use schedule::{check_block, BlockShape, BlockStats, OffloadOptions, Runtime};
pub use store::WeightPlan;
pub use tensor::{CacheSpec, Elem, PlaneBuf, PlaneSpec, Tensor, TensorKind, WeightSpec};
pub use tier::{ram_limit_bytes, Budgets, Charge, MemoryTracker, Tier};
