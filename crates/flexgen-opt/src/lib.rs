//! Meta's OPT language models (125M to 175B) for flexgen: the config and FlexGen's model zoo,
//! memory-mapped safetensors loading (single file or sharded, f32/f16/bf16), the decoder with
//! Hugging Face's exact numerics (pre-LN and opt-350m's post-LN with projections), the
//! tokenizer, and batched streaming generation.
//!
//! ```no_run
//! use flexgen_opt::{GenerationConfig, Pipeline};
//!
//! # fn main() -> flexgen_opt::Result<()> {
//! let pipe = Pipeline::from_pretrained("path/to/opt-125m")?;
//! let cfg = GenerationConfig::greedy(16).with_stop_string("\n");
//! for out in pipe.generate(&["Paris is the capital city of", "Hello, my name is"], &cfg)? {
//!     println!("{:?} -> {}", out.finish_reason, out.text);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! | type | job |
//! |---|---|
//! | [`OptConfig`] | architecture from `config.json` or a zoo name |
//! | [`Checkpoint`] | memory-mapped safetensors files and tensor lookup |
//! | [`OptModel`] | weights plus the forward pass over a [`BatchState`] |
//! | [`OptTokenizer`] | text <-> ids, with streaming decoding |
//! | [`generate`], [`GenerationConfig`] | batched generation with a per-token callback |
//! | [`Pipeline`] | model + tokenizer, text in, text out |
//! | [`OffloadedOpt`] | the model under an offloading [`flexgen_offload::Policy`] (weights and cache on disk) |
//! | [`OptEngine`] | either of the two above behind one `generate` (what the applications take) |
//! | [`Session`], [`ChatSession`] | a KV cache kept across calls; FlexGen's chatbot on it |

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod generation;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod offloaded;
pub mod pipeline;
pub mod sampling;
pub mod session;
pub mod tokenizer;
pub mod weight;
pub mod weights;

pub use chat::{ChatMessage, Role};
pub use checkpoint::Checkpoint;
pub use config::OptConfig;
pub use engine::{EngineOptions, OptEngine};
pub use error::{Error, Result};
pub use flexgen_quant::CompressionConfig;
pub use generation::{
    generate, generate_rows, FinishReason, Flow, GenerationConfig, GenerationOutput, TokenEvent,
};
pub use kv_cache::BatchState;
pub use model::{LoadOptions, LogitsFor, OptModel};
pub use offloaded::OffloadedOpt;
pub use pipeline::Pipeline;
pub use sampling::{Sampler, SamplingParams};
pub use session::{ChatReply, ChatSession, Session, SessionOutput};
pub use tokenizer::{IncrementalDecoder, OptTokenizer, BOS_TOKEN_ID, PAD_TOKEN_ID};
pub use weight::{Weight, WeightFormat};
pub use weights::OptWeights;
