//! [`Policy`]: FlexGen's offloading policy (block shape, placement percentages, overlap, layer
//! granularity, attention options, compression), validated before any work.

use flexgen_quant::CompressionConfig;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::tier::Tier;

/// Placement of one class of tensors (weights, KV cache or activations): percentages on the
/// compute and host tiers; the disk tier gets the rest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Split {
    /// Percent on the compute tier (FlexGen's "gpu" percent).
    pub compute: f64,
    /// Percent on the host tier (FlexGen's "cpu" percent).
    pub host: f64,
}

impl Split {
    /// Everything on one tier.
    pub fn all(tier: Tier) -> Self {
        match tier {
            Tier::Compute => Split {
                compute: 100.0,
                host: 0.0,
            },
            Tier::Host => Split {
                compute: 0.0,
                host: 100.0,
            },
            Tier::Disk => Split {
                compute: 0.0,
                host: 0.0,
            },
        }
    }

    /// The disk tier's share, `100 - compute - host`.
    pub fn disk(&self) -> f64 {
        100.0 - self.compute - self.host
    }

    /// The percentage on `tier`.
    pub fn percent(&self, tier: Tier) -> f64 {
        match tier {
            Tier::Compute => self.compute,
            Tier::Host => self.host,
            Tier::Disk => self.disk(),
        }
    }

    /// The one tier holding 100%, if the split is not mixed.
    pub fn single_tier(&self) -> Option<Tier> {
        Tier::ALL.into_iter().find(|&t| self.percent(t) >= 100.0)
    }

    /// Checks both numbers are in `0..=100` and sum to at most 100; `class` names the tensors
    /// and `flags` the two `--percent` positions (e.g. `"wg", "wc"`).
    fn validate(&self, class: &str, flags: [&'static str; 2]) -> Result<()> {
        for (flag, v) in flags.into_iter().zip([self.compute, self.host]) {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                return Err(Error::policy(
                    flag,
                    v,
                    format!("{class} percentages must be between 0 and 100"),
                ));
            }
        }
        let sum = self.compute + self.host;
        if sum > 100.0 + 1e-9 {
            return Err(Error::policy(
                match class {
                    "weight" => "--percent wg+wc",
                    "cache" => "--percent cg+cc",
                    _ => "--percent hg+hc",
                },
                format!("{}+{} = {sum}", self.compute, self.host),
                format!(
                    "{class} percentages on the compute and host tiers sum to more than 100 \
                     (the disk tier gets 100 minus their sum)"
                ),
            ));
        }
        Ok(())
    }
}

/// FlexGen's `Policy`: how one block of sequences is run.
///
/// On the CPU backend the compute and host tiers are both RAM: a policy may still split them
/// (each has its own budget and accounting), weights on either are used in place, and
/// [`Policy::cpu_cache_compute`] and [`Policy::pin_weight`] change nothing (see their docs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Sequences per micro-batch (FlexGen's GPU batch).
    pub gpu_batch_size: usize,
    /// Micro-batches per block; a block is `gpu_batch_size × num_gpu_batches` sequences, and
    /// each layer's weights are fetched once per token per block.
    pub num_gpu_batches: usize,
    /// Weight placement (`--percent wg wc`).
    pub weights: Split,
    /// KV-cache placement (`--percent cg cc`), split along the batch in whole sequences.
    pub cache: Split,
    /// Activation placement (`--percent hg hc`): must be 100% on one tier.
    pub activations: Split,
    /// Fetch the next layer's weights and the next micro-batch's cache on I/O threads while
    /// the current one computes; `false` runs the same order serially.
    pub overlap: bool,
    /// Schedule attention and MLP as separate layers (finer weight placement and prefetch).
    pub sep_layer: bool,
    /// FlexGen: allocate host-tier weights in pinned (page-locked) memory for fast GPU copies.
    /// The CPU backend copies nothing from the host tier to compute (both are RAM), so the
    /// flag is accepted for compatibility and has no effect.
    pub pin_weight: bool,
    /// FlexGen: run decode attention on the CPU where the cache lives. On the CPU backend all
    /// attention runs on the CPU already, so this has no effect.
    pub cpu_cache_compute: bool,
    /// Fraction of the old tokens' value rows attention keeps at decode (top-k by attention
    /// weight, FlexGen's sparse attention, not renormalized); `1.0` is dense.
    pub attn_sparsity: f64,
    /// Store 2-D weights group-wise quantized with [`Policy::comp_weight_config`].
    pub compress_weight: bool,
    /// Weight compression settings.
    #[serde(skip)]
    pub comp_weight_config: CompressionConfig,
    /// Store the KV cache group-wise quantized with [`Policy::comp_cache_config`].
    pub compress_cache: bool,
    /// KV-cache compression settings (grouped along head_dim: `group_dim = 2`).
    #[serde(skip)]
    pub comp_cache_config: CompressionConfig,
}

impl Default for Policy {
    /// FlexGen's defaults: `gpu_batch_size 4`, one micro-batch, everything on the compute
    /// tier, overlap, separate layers, dense attention, no compression.
    fn default() -> Self {
        Policy {
            gpu_batch_size: 4,
            num_gpu_batches: 1,
            weights: Split::all(Tier::Compute),
            cache: Split::all(Tier::Compute),
            activations: Split::all(Tier::Compute),
            overlap: true,
            sep_layer: true,
            pin_weight: true,
            cpu_cache_compute: false,
            attn_sparsity: 1.0,
            compress_weight: false,
            comp_weight_config: CompressionConfig::WEIGHT_4BIT,
            compress_cache: false,
            comp_cache_config: CompressionConfig::FLEXGEN_CACHE,
        }
    }
}

impl Policy {
    /// Sets the six `--percent` numbers `wg wc cg cc hg hc` (compute and host percent of
    /// weights, cache and activations; disk gets the rest of each).
    pub fn with_percent(mut self, p: [f64; 6]) -> Self {
        self.weights = Split {
            compute: p[0],
            host: p[1],
        };
        self.cache = Split {
            compute: p[2],
            host: p[3],
        };
        self.activations = Split {
            compute: p[4],
            host: p[5],
        };
        self
    }

    /// The six `--percent` numbers.
    pub fn percent(&self) -> [f64; 6] {
        [
            self.weights.compute,
            self.weights.host,
            self.cache.compute,
            self.cache.host,
            self.activations.compute,
            self.activations.host,
        ]
    }

    /// Sequences per block, `gpu_batch_size × num_gpu_batches`.
    pub fn block_size(&self) -> usize {
        self.gpu_batch_size * self.num_gpu_batches
    }

    /// The tier holding the activations (valid policies have exactly one).
    pub fn activation_tier(&self) -> Tier {
        self.activations.single_tier().unwrap_or(Tier::Compute)
    }

    /// Rejects policies the runtime cannot run, naming the number at fault: sizes of zero,
    /// percentages outside `0..=100` or summing over 100, activations split over tiers, a
    /// sparsity outside `(0, 1]`, and FlexGen's unsupported combinations (a compressed or
    /// sparse cache split over tiers, compression together with sparse attention). Memory
    /// budgets are checked separately when the model's sizes are known.
    pub fn validate(&self) -> Result<()> {
        if self.gpu_batch_size == 0 {
            return Err(Error::policy(
                "--gpu-batch-size",
                0,
                "a micro-batch needs at least one sequence",
            ));
        }
        if self.num_gpu_batches == 0 {
            return Err(Error::policy(
                "--num-gpu-batches",
                0,
                "a block needs at least one micro-batch",
            ));
        }
        self.gpu_batch_size
            .checked_mul(self.num_gpu_batches)
            .ok_or_else(|| {
                Error::policy(
                    "--gpu-batch-size x --num-gpu-batches",
                    format!("{} x {}", self.gpu_batch_size, self.num_gpu_batches),
                    "the block size overflows",
                )
            })?;
        self.weights
            .validate("weight", ["--percent wg", "--percent wc"])?;
        self.cache
            .validate("cache", ["--percent cg", "--percent cc"])?;
        self.activations
            .validate("activation", ["--percent hg", "--percent hc"])?;
        if self.activations.single_tier().is_none() {
            return Err(Error::policy(
                "--percent hg hc",
                format!("{} {}", self.activations.compute, self.activations.host),
                format!(
                    "activations must be 100% on one tier (compute, host or disk), got \
                     {}% compute, {}% host, {}% disk",
                    self.activations.compute,
                    self.activations.host,
                    self.activations.disk()
                ),
            ));
        }
        if !self.attn_sparsity.is_finite() || self.attn_sparsity <= 0.0 || self.attn_sparsity > 1.0
        {
            return Err(Error::policy(
                "--attn-sparsity",
                self.attn_sparsity,
                "the fraction of value rows kept must be in (0, 1]",
            ));
        }
        let cache_mixed = self.cache.single_tier().is_none();
        if self.compress_cache && cache_mixed {
            return Err(Error::policy(
                "--percent cg cc",
                format!("{} {}", self.cache.compute, self.cache.host),
                "a compressed KV cache must be 100% on one tier (FlexGen cannot split it)",
            ));
        }
        if self.attn_sparsity < 1.0 && cache_mixed {
            return Err(Error::policy(
                "--percent cg cc",
                format!("{} {}", self.cache.compute, self.cache.host),
                "sparse attention (--attn-sparsity < 1) needs the KV cache 100% on one tier",
            ));
        }
        if self.compress_cache && self.attn_sparsity < 1.0 {
            return Err(Error::policy(
                "--attn-sparsity",
                self.attn_sparsity,
                "sparse attention with a compressed cache is not supported (as in FlexGen)",
            ));
        }
        if self.compress_weight {
            self.comp_weight_config.validate_for_rank(2).map_err(|e| {
                Error::policy("comp_weight_config", self.comp_weight_config, e.to_string())
            })?;
        }
        if self.compress_cache {
            self.comp_cache_config.validate_for_rank(3).map_err(|e| {
                Error::policy("comp_cache_config", self.comp_cache_config, e.to_string())
            })?;
            if self.comp_cache_config.group_dim != 2 {
                return Err(Error::policy(
                    "comp_cache_config",
                    self.comp_cache_config,
                    "the KV cache is grouped along head_dim: group_dim must be 2",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: &Policy) -> String {
        p.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_flexgens_and_valid() {
        let p = Policy::default();
        p.validate().unwrap();
        assert_eq!(p.percent(), [100.0, 0.0, 100.0, 0.0, 100.0, 0.0]);
        assert_eq!(
            (p.gpu_batch_size, p.num_gpu_batches, p.block_size()),
            (4, 1, 4)
        );
        assert!(p.overlap && p.sep_layer && p.pin_weight && !p.cpu_cache_compute);
        let d = Policy::default().with_percent([0.0, 0.0, 100.0, 0.0, 100.0, 0.0]);
        d.validate().unwrap();
        assert_eq!(d.weights.disk(), 100.0);
        assert_eq!(d.weights.single_tier(), Some(Tier::Disk));
        assert_eq!(d.activation_tier(), Tier::Compute);
    }

    #[test]
    fn each_wrong_number_is_named() {
        let base = Policy::default();
        let e = err(&base
            .clone()
            .with_percent([60.0, 50.0, 100.0, 0.0, 100.0, 0.0]));
        assert!(
            e.contains("--percent wg+wc") && e.contains("60+50 = 110"),
            "{e}"
        );
        let e = err(&base
            .clone()
            .with_percent([100.0, 0.0, 20.0, 90.0, 100.0, 0.0]));
        assert!(e.contains("--percent cg+cc"), "{e}");
        let e = err(&base
            .clone()
            .with_percent([-5.0, 0.0, 100.0, 0.0, 100.0, 0.0]));
        assert!(
            e.contains("--percent wg = -5") && e.contains("between 0 and 100"),
            "{e}"
        );
        let e = err(&base
            .clone()
            .with_percent([100.0, 0.0, 100.0, 0.0, 50.0, 50.0]));
        assert!(
            e.contains("--percent hg hc") && e.contains("one tier"),
            "{e}"
        );
        let e = err(&base
            .clone()
            .with_percent([100.0, 0.0, 100.0, f64::NAN, 100.0, 0.0]));
        assert!(e.contains("--percent cc"), "{e}");
        let e = err(&Policy {
            gpu_batch_size: 0,
            ..base.clone()
        });
        assert!(e.contains("--gpu-batch-size = 0"), "{e}");
        let e = err(&Policy {
            num_gpu_batches: 0,
            ..base.clone()
        });
        assert!(e.contains("--num-gpu-batches = 0"), "{e}");
        let e = err(&Policy {
            gpu_batch_size: usize::MAX,
            num_gpu_batches: 2,
            ..base.clone()
        });
        assert!(e.contains("overflows"), "{e}");
        for s in [0.0, -0.1, 1.5, f64::INFINITY] {
            let e = err(&Policy {
                attn_sparsity: s,
                ..base.clone()
            });
            assert!(e.contains("--attn-sparsity"), "{e}");
        }
    }

    #[test]
    fn flexgens_unsupported_combinations() {
        let mixed = Policy::default().with_percent([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]);
        mixed.validate().unwrap();
        let e = err(&Policy {
            compress_cache: true,
            ..mixed.clone()
        });
        assert!(
            e.contains("compressed KV cache must be 100% on one tier"),
            "{e}"
        );
        let e = err(&Policy {
            attn_sparsity: 0.5,
            ..mixed
        });
        assert!(e.contains("sparse attention"), "{e}");
        let e = err(&Policy {
            attn_sparsity: 0.5,
            compress_cache: true,
            ..Policy::default()
        });
        assert!(e.contains("compressed cache is not supported"), "{e}");
        let e = err(&Policy {
            compress_cache: true,
            comp_cache_config: CompressionConfig::WEIGHT_4BIT,
            ..Policy::default()
        });
        assert!(e.contains("comp_cache_config"), "{e}");
        let e = err(&Policy {
            compress_weight: true,
            comp_weight_config: CompressionConfig {
                num_bits: 3,
                ..CompressionConfig::WEIGHT_4BIT
            },
            ..Policy::default()
        });
        assert!(
            e.contains("comp_weight_config") && e.contains("num_bits"),
            "{e}"
        );
    }
}
