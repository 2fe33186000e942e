//! The policy and compression flags the applications share (completion, chatbot, batch,
//! serve), FlexGen's names and meanings: with none of them the model runs all in memory on the
//! plain forward pass; with a placement, batch shape or a compressed cache it runs under the
//! offloading runtime (`flexgen_opt::OffloadedOpt`) with that policy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use flexgen::cli::str2bool;
use flexgen::core::DType;
use flexgen::offload::{OffloadOptions, Policy};
use flexgen::opt::EngineOptions;
use flexgen::quant::CompressionConfig;

/// Where weights and KV cache live, and their compression.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EngineFlags {
    /// Weight dtype: f32, f16 or bf16 (default: the checkpoint's). bf16 is the fast path on
    /// CPUs with avx512_bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize every 2-D weight to 4 bits (groups of 64) as it is loaded (FlexGen's
    /// --compress-weight): about 0.28x the memory of f16, faster decoding, some accuracy cost.
    #[arg(long)]
    pub compress_weight: bool,
    /// With --compress-weight: bits per weight, 4 (default) or 8 (1 and 2 are accepted,
    /// without fast kernels).
    #[arg(long)]
    pub comp_weight_bits: Option<u8>,
    /// With --compress-weight: weights per group (default 64).
    #[arg(long)]
    pub comp_weight_group_size: Option<usize>,
    /// Keep the KV cache 4-bit group-wise quantized (FlexGen's --compress-cache); runs the
    /// model under the offloading runtime (all in memory unless --percent says otherwise).
    #[arg(long)]
    pub compress_cache: bool,
    /// Offloading placement `wg wc cg cc hg hc`: percent of weights, KV cache and activations
    /// on the compute and host tiers (both RAM on the CPU); disk gets the rest. Example:
    /// `--percent 0 0 100 0 100 0` streams every weight from disk.
    #[arg(long, num_args = 6, value_names = ["WG", "WC", "CG", "CC", "HG", "HC"],
          allow_negative_numbers = true)]
    pub percent: Option<Vec<f64>>,
    /// Sequences per micro-batch of the offloading schedule (default 4).
    #[arg(long)]
    pub gpu_batch_size: Option<usize>,
    /// Micro-batches per block of the offloading schedule (default 1).
    #[arg(long)]
    pub num_gpu_batches: Option<usize>,
    /// Overlap disk I/O with compute (default true).
    #[arg(long, value_parser = str2bool)]
    pub overlap: Option<bool>,
    /// Where the disk tier's files go (a private subfolder, removed on exit).
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
}

impl EngineFlags {
    /// True when a flag asks for the offloading runtime.
    fn wants_policy(&self) -> bool {
        self.percent.is_some()
            || self.gpu_batch_size.is_some()
            || self.num_gpu_batches.is_some()
            || self.overlap.is_some()
            || self.offload_dir.is_some()
            || self.compress_cache
    }

    /// The weight dtype asked for.
    pub fn dtype(&self) -> Result<Option<DType>> {
        self.dtype
            .as_deref()
            .map(|d| {
                d.parse::<DType>()
                    .map_err(|e| anyhow::anyhow!("--dtype {d:?}: {e}"))
            })
            .transpose()
    }

    /// The weight compression asked for (`None` without --compress-weight; an error for
    /// --comp-weight-* without it).
    pub fn weight_compression(&self) -> Result<Option<CompressionConfig>> {
        if !self.compress_weight {
            if self.comp_weight_bits.is_some() || self.comp_weight_group_size.is_some() {
                anyhow::bail!(
                    "--comp-weight-bits and --comp-weight-group-size apply to --compress-weight"
                );
            }
            return Ok(None);
        }
        let default = CompressionConfig::WEIGHT_4BIT;
        let config = CompressionConfig {
            num_bits: self.comp_weight_bits.unwrap_or(default.num_bits),
            group_size: self.comp_weight_group_size.unwrap_or(default.group_size),
            ..default
        };
        config
            .validate_for_rank(2)
            .map_err(|e| anyhow::anyhow!("--compress-weight {config}: {e}"))?;
        Ok(Some(config))
    }

    /// The offloading policy the flags describe (validated), or `None` for the in-memory path.
    pub fn policy(&self) -> Result<Option<Policy>> {
        if !self.wants_policy() {
            return Ok(None);
        }
        let defaults = Policy::default();
        let mut policy = Policy {
            gpu_batch_size: self.gpu_batch_size.unwrap_or(defaults.gpu_batch_size),
            num_gpu_batches: self.num_gpu_batches.unwrap_or(defaults.num_gpu_batches),
            overlap: self.overlap.unwrap_or(defaults.overlap),
            compress_weight: self.compress_weight,
            compress_cache: self.compress_cache,
            comp_weight_config: self
                .weight_compression()?
                .unwrap_or(defaults.comp_weight_config),
            ..defaults
        };
        if let Some(p) = &self.percent {
            let p: [f64; 6] = p
                .as_slice()
                .try_into()
                .context("--percent takes six numbers: wg wc cg cc hg hc")?;
            policy = policy.with_percent(p);
        }
        policy.validate()?;
        Ok(Some(policy))
    }

    /// Everything `OptEngine::load` / `OptEngine::dummy` need.
    pub fn engine_options(&self) -> Result<EngineOptions> {
        let mut offload = OffloadOptions::default();
        if let Some(dir) = &self.offload_dir {
            offload.offload_dir = dir.clone();
        }
        Ok(EngineOptions {
            dtype: self.dtype()?,
            compress_weight: self.weight_compression()?,
            policy: self.policy()?,
            offload,
        })
    }

    /// One line for stderr saying how the model runs.
    pub fn describe(options: &EngineOptions) -> String {
        match &options.policy {
            None => format!(
                "all in memory{}",
                match options.compress_weight {
                    Some(c) =>
                        format!(", {}-bit weights in groups of {}", c.num_bits, c.group_size),
                    None => String::new(),
                }
            ),
            Some(p) => format!(
                "offloaded: --percent {} --gpu-batch-size {} --num-gpu-batches {}{}{}",
                p.percent().map(|v| v.to_string()).join(" "),
                p.gpu_batch_size,
                p.num_gpu_batches,
                if p.compress_weight {
                    format!(
                        " --compress-weight ({}-bit, groups of {})",
                        p.comp_weight_config.num_bits, p.comp_weight_config.group_size
                    )
                } else {
                    String::new()
                },
                if p.compress_cache {
                    " --compress-cache"
                } else {
                    ""
                },
            ),
        }
    }
}
