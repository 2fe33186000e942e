//! One generation entry point over both ways of running a model: everything in memory
//! ([`OptModel`], the fastest path when the model fits) or under an offloading [`Policy`]
//! ([`OffloadedOpt`]: weights and KV cache split over RAM and disk, compressed or not).
//!
//! Applications (completion, chatbot, batch, server) take an [`OptEngine`] so that the same
//! code runs a model that fits in RAM and one that does not:
//!
//! ```no_run
//! use flexgen_opt::{EngineOptions, Flow, GenerationConfig, OptEngine, OptTokenizer};
//! use flexgen_offload::Policy;
//!
//! # fn main() -> flexgen_opt::Result<()> {
//! // Weights 100% on disk, KV cache in RAM, 4-bit cache: the model never sits in memory whole.
//! let policy = Policy { compress_cache: true, ..Policy::default() }
//!     .with_percent([0.0, 0.0, 100.0, 0.0, 100.0, 0.0]);
//! let options = EngineOptions { policy: Some(policy), ..EngineOptions::default() };
//! let engine = OptEngine::load("path/to/opt-6.7b", &options)?;
//! let tok = OptTokenizer::from_dir("path/to/opt-6.7b")?;
//! let prompt = tok.encode("Paris is the capital city of")?;
//! let outs = engine.generate(&[prompt], &GenerationConfig::greedy(16), Some(&tok), |_| {
//!     Flow::Continue
//! })?;
//! println!("{}", outs[0].text);
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use flexgen_core::DType;
use flexgen_offload::{OffloadOptions, Policy};
use flexgen_quant::CompressionConfig;

use crate::config::OptConfig;
use crate::error::Result;
use crate::generation::{self, Flow, GenerationConfig, GenerationOutput, TokenEvent};
use crate::model::{LoadOptions, OptModel};
use crate::offloaded::OffloadedOpt;
use crate::tokenizer::OptTokenizer;

/// How to load an [`OptEngine`].
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Store 2-D weights in this dtype (converting at load); `None` keeps the checkpoint's
    /// (f16 for dummy weights).
    pub dtype: Option<DType>,
    /// Quantize 2-D weights as they are loaded (in-memory engine; an offloading policy says
    /// this itself with `compress_weight`).
    pub compress_weight: Option<CompressionConfig>,
    /// Run under this offloading policy; `None` keeps everything in memory with the plain
    /// forward pass.
    pub policy: Option<Policy>,
    /// Offload directory, I/O threads and budgets of the offloading runtime.
    pub offload: OffloadOptions,
}

/// An OPT model ready to generate: all in memory or run by the offloading runtime.
// A program holds one or two engines, never collections of them: the variants' sizes (both a
// few hundred bytes of config and handles; the weights are on the heap) do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum OptEngine {
    /// Every weight and the KV cache in memory; one left-padded batch per call.
    InMemory(OptModel),
    /// Weights and cache placed by a [`Policy`]; prompts run as blocks of
    /// `gpu_batch_size × num_gpu_batches` rows.
    Offloaded(OffloadedOpt),
}

impl OptEngine {
    /// Loads a Hugging Face OPT folder: in memory when `options.policy` is `None`, else under
    /// that policy (validated before any weight is read).
    pub fn load(dir: impl AsRef<Path>, options: &EngineOptions) -> Result<Self> {
        match &options.policy {
            None => Ok(OptEngine::InMemory(OptModel::load(
                dir,
                &LoadOptions {
                    dtype: options.dtype,
                    compress_weight: options.compress_weight,
                },
            )?)),
            Some(policy) => Ok(OptEngine::Offloaded(OffloadedOpt::load(
                dir,
                options.dtype,
                policy,
                &options.offload,
                &mut |_, _| {},
            )?)),
        }
    }

    /// Dummy weights (FlexGen's `_DUMMY_`) of `config`, in `options.dtype` (default f16).
    pub fn dummy(config: OptConfig, seed: u64, options: &EngineOptions) -> Result<Self> {
        let dtype = options.dtype.unwrap_or(DType::F16);
        match &options.policy {
            None => Ok(OptEngine::InMemory(OptModel::dummy_with(
                config,
                dtype,
                seed,
                options.compress_weight,
            )?)),
            Some(policy) => Ok(OptEngine::Offloaded(OffloadedOpt::dummy(
                config,
                dtype,
                seed,
                policy,
                &options.offload,
                &mut |_, _| {},
            )?)),
        }
    }

    /// The architecture.
    pub fn config(&self) -> &OptConfig {
        match self {
            OptEngine::InMemory(m) => m.config(),
            OptEngine::Offloaded(m) => m.config(),
        }
    }

    /// The offloading policy, if the engine runs under one.
    pub fn policy(&self) -> Option<&Policy> {
        match self {
            OptEngine::InMemory(_) => None,
            OptEngine::Offloaded(m) => Some(m.policy()),
        }
    }

    /// The in-memory model, if that is how the engine runs (it alone supports
    /// [`crate::Session`]'s KV reuse across calls).
    pub fn in_memory(&self) -> Option<&OptModel> {
        match self {
            OptEngine::InMemory(m) => Some(m),
            OptEngine::Offloaded(_) => None,
        }
    }

    /// [`crate::generate`] on either engine: row `i` samples with seed `cfg.seed + i`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
        on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<Vec<GenerationOutput>> {
        match self {
            OptEngine::InMemory(m) => generation::generate(m, prompts, cfg, tokenizer, on_token),
            OptEngine::Offloaded(m) => m.generate(prompts, cfg, tokenizer, on_token),
        }
    }

    /// [`crate::generate_rows`] on either engine: row `i` follows `cfgs[i]`.
    pub fn generate_rows(
        &self,
        prompts: &[Vec<u32>],
        cfgs: &[GenerationConfig],
        tokenizer: Option<&OptTokenizer>,
        on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<Vec<GenerationOutput>> {
        match self {
            OptEngine::InMemory(m) => {
                generation::generate_rows(m, prompts, cfgs, tokenizer, on_token)
            }
            OptEngine::Offloaded(m) => m.generate_rows(prompts, cfgs, tokenizer, on_token),
        }
    }
}

impl From<OptModel> for OptEngine {
    fn from(m: OptModel) -> Self {
        OptEngine::InMemory(m)
    }
}

impl From<OffloadedOpt> for OptEngine {
    fn from(m: OffloadedOpt) -> Self {
        OptEngine::Offloaded(m)
    }
}
