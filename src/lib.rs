//! flexgen: high-throughput generative inference of OPT models on one machine, a Rust
//! re-creation of FlexGen. This crate re-exports the workspace's crates:
//!
//! - [`core`] (`flexgen-core`): dtypes, weight matrices and the CPU kernels.
//! - [`quant`] (`flexgen-quant`): group-wise 4/8-bit compression of weights and KV cache, with
//!   kernels that compute from the packed form.
//! - [`offload`] (`flexgen-offload`): FlexGen's offloading runtime: policy, memory tiers with
//!   budgets, the disk tier, and the zig-zag block schedule with overlapped I/O.
//! - [`opt`] (`flexgen-opt`): OPT config, loading, generation and tokenizer.
//!
//! ```no_run
//! use flexgen::opt::{GenerationConfig, Pipeline};
//!
//! # fn main() -> flexgen::opt::Result<()> {
//! let pipe = Pipeline::from_pretrained("path/to/opt-1.3b")?;
//! let outs = pipe.generate(&["Paris is the capital city of"], &GenerationConfig::greedy(8))?;
//! println!("{}", outs[0].text);
//! # Ok(())
//! # }
//! ```

pub use flexgen_core as core;
pub use flexgen_offload as offload;
pub use flexgen_opt as opt;
pub use flexgen_quant as quant;

/// Helpers shared by the example binaries (model and tokenizer lookup, output files).
pub mod cli;

/// OpenAI-compatible request parsing, replies, errors and metrics for the `serve` example.
pub mod serve;
