//! FlexGen's benchmark (`flex_opt`): generate `gen_len` tokens for a block of
//! `gpu_batch_size × num_gpu_batches` prompts of `prompt_len` tokens under an offloading policy
//! and report FlexGen's metrics, plus peak bytes per tier, disk I/O and where the time went.
//!
//! ```text
//! # everything in memory
//! cargo run --release --example flex_opt -- --model facebook/opt-1.3b --path _DUMMY_ \
//!     --prompt-len 128 --gen-len 32 --gpu-batch-size 8
//! # weights on disk (read once per token per block), cache and activations in memory
//! cargo run --release --example flex_opt -- --model facebook/opt-6.7b --path _DUMMY_ \
//!     --percent 0 0 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 4
//! # let the policy search pick the block shape and placement, then run it
//! cargo run --release --example flex_opt -- --model facebook/opt-6.7b --policy auto
//! ```
//!
//! `--percent wg wc cg cc hg hc` places weights, KV cache and activations: percent on the
//! compute tier and on the host tier (both RAM on this CPU backend), the rest on disk, in
//! `--offload-dir` (files removed on exit, error and Ctrl-C).

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use flexgen::cli::str2bool;
use flexgen::core::DType;
use flexgen::offload::search::{self as ps, Choice, ModelShape, Prediction, SearchOptions};
use flexgen::offload::{BlockShape, OffloadOptions, Policy, Tier};
use flexgen::opt::{Flow, GenerationConfig, OffloadedOpt, OptConfig};
use flexgen::quant::CompressionConfig;
use indicatif::{ProgressBar, ProgressStyle};

/// FlexGen's path value meaning "deterministic dummy weights, no files".
const DUMMY_WEIGHT: &str = "_DUMMY_";

/// Benchmark OPT generation throughput under an offloading policy (FlexGen's flex_opt).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A zoo name (facebook/opt-125m ... opt-175b, galactica-30b, opt-iml-*) or a model folder.
    #[arg(long, default_value = "facebook/opt-1.3b")]
    model: String,
    /// Weights folder, or `_DUMMY_` for dummy weights generated tensor by tensor (default when
    /// --model is a zoo name).
    #[arg(long)]
    path: Option<String>,
    /// Where the disk tier's files go (a private subfolder, removed on exit).
    #[arg(long)]
    offload_dir: Option<PathBuf>,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    gen_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    gpu_batch_size: usize,
    /// Micro-batches per block; a layer's weights are read once per token for the whole block
    /// of gpu_batch_size × num_gpu_batches sequences.
    #[arg(long, default_value_t = 1)]
    num_gpu_batches: usize,
    /// Placement `wg wc cg cc hg hc`: percent of weights, KV cache and activations on the
    /// compute and host tiers (both RAM here); disk gets the rest of each. Activations must be
    /// 100% on one tier.
    #[arg(long, num_args = 6, value_names = ["WG", "WC", "CG", "CC", "HG", "HC"], allow_negative_numbers = true,
          default_values_t = [100.0, 0.0, 100.0, 0.0, 100.0, 0.0])]
    percent: Vec<f64>,
    /// Overlap I/O with compute (prefetch the next layer's weights and the next micro-batch's
    /// cache on I/O threads); `false` runs the same schedule serially.
    #[arg(long, default_value = "true", value_parser = str2bool, action = clap::ArgAction::Set)]
    overlap: bool,
    /// Schedule attention and MLP as separate layers.
    #[arg(long, default_value = "true", value_parser = str2bool, action = clap::ArgAction::Set)]
    sep_layer: bool,
    /// FlexGen's pinned host weights; accepted, no effect on the CPU backend (no device copies).
    #[arg(long, default_value = "true", value_parser = str2bool, action = clap::ArgAction::Set)]
    pin_weight: bool,
    /// FlexGen's CPU attention; accepted, no effect on the CPU backend (attention runs on the CPU).
    #[arg(long)]
    cpu_cache_compute: bool,
    /// Fraction of value rows decode attention keeps (1.0 = dense).
    #[arg(long, default_value_t = 1.0)]
    attn_sparsity: f64,
    /// Store 2-D weights group-wise quantized along the input dimension (FlexGen's 4 bits in
    /// groups of 64 unless --comp-weight-bits / --comp-weight-group-size say otherwise).
    #[arg(long)]
    compress_weight: bool,
    /// With --compress-weight: bits per weight, 4 or 8 (1 and 2 are accepted, without fast
    /// kernels).
    #[arg(long, default_value_t = 4)]
    comp_weight_bits: u8,
    /// With --compress-weight: weights per group (one step and minimum each). Larger groups
    /// with 8 bits (e.g. 256) make --int8-activations faster: x is rounded with one scale per
    /// group too, and each group's sums are scaled once.
    #[arg(long, default_value_t = 64)]
    comp_weight_group_size: usize,
    /// Store the KV cache 4-bit group-wise quantized.
    #[arg(long)]
    compress_cache: bool,
    /// With --compress-weight: from 24 rows per call, round each group of 64 activations to
    /// 8 bits and multiply bytes (AVX-512 VNNI; elsewhere no effect). About twice the block
    /// path's speed; adds an error per weight of at most 8 steps times 1/254 of the group's
    /// largest activation (see flexgen_quant::int8_activations_enabled).
    #[arg(long)]
    int8_activations: bool,
    /// Read and write the disk tier with O_DIRECT (bypassing the page cache) where possible.
    #[arg(long, default_value = "true", value_parser = str2bool, action = clap::ArgAction::Set)]
    direct_io: bool,
    /// I/O threads.
    #[arg(long, default_value_t = 4)]
    io_threads: usize,
    /// Weight dtype: f32, f16 or bf16 (default: the checkpoint's, f16 for dummy weights).
    #[arg(long)]
    dtype: Option<String>,
    /// Untimed warm-up runs (prefill and one token, as FlexGen's) before the measured one; each
    /// is the measured block stopped after its first token, so the runtime's KV cache buffers
    /// (kept between blocks of the same shape) are in place for the measured run.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the dummy weights and prompt tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the metrics as one JSON object.
    #[arg(long)]
    json: bool,
    /// `manual` (the flags above) or `auto`: search the policy with the cost model (see
    /// examples/policy_search.rs; the hardware profile is calibrated once and reused), within
    /// the measured available RAM and disk, replacing --gpu-batch-size, --num-gpu-batches and
    /// --percent, then run it and print predicted vs measured.
    #[arg(long, default_value = "manual", value_parser = ["manual", "auto"])]
    policy: String,
}

/// FlexGen's metrics of one run, plus the offloading costs.
#[derive(serde::Serialize, Debug)]
struct Metrics {
    model: String,
    dtype: String,
    prompt_len: usize,
    gen_len: usize,
    batch_size: usize,
    gpu_batch_size: usize,
    num_gpu_batches: usize,
    percent: Vec<f64>,
    overlap: bool,
    sep_layer: bool,
    compress_weight: bool,
    int8_activations: bool,
    direct_io: bool,
    threads: usize,
    model_size_bytes: u64,
    /// Weight bytes homed per tier `[compute, host, disk]`.
    weight_bytes: [u64; 3],
    cache_size_bytes: usize,
    load_s: f64,
    prefill_latency_s: f64,
    prefill_throughput_tok_s: f64,
    decode_latency_s: f64,
    decode_throughput_tok_s: f64,
    total_latency_s: f64,
    total_throughput_tok_s: f64,
    /// Seconds of forward passes.
    compute_s: f64,
    /// Seconds the compute thread waited for I/O.
    stall_s: f64,
    io_read_bytes: u64,
    io_write_bytes: u64,
    /// Seconds spent in disk reads and writes, summed over the I/O threads.
    io_read_s: f64,
    io_write_s: f64,
    /// Peak bytes held per tier during the measured block `[compute, host, disk]`.
    peak_tier_bytes: [u64; 3],
    peak_rss_bytes: Option<u64>,
    /// The cost model's prediction (with `--policy auto`).
    predicted: Option<Prediction>,
}

/// Peak resident set size of this process (VmHWM), Linux only.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn policy(args: &Args) -> Result<Policy> {
    let p: [f64; 6] = args
        .percent
        .as_slice()
        .try_into()
        .context("--percent takes six numbers: wg wc cg cc hg hc")?;
    let policy = Policy {
        gpu_batch_size: args.gpu_batch_size,
        num_gpu_batches: args.num_gpu_batches,
        overlap: args.overlap,
        sep_layer: args.sep_layer,
        pin_weight: args.pin_weight,
        cpu_cache_compute: args.cpu_cache_compute,
        attn_sparsity: args.attn_sparsity,
        compress_weight: args.compress_weight,
        compress_cache: args.compress_cache,
        comp_weight_config: CompressionConfig {
            num_bits: args.comp_weight_bits,
            group_size: args.comp_weight_group_size,
            ..CompressionConfig::WEIGHT_4BIT
        },
        ..Policy::default()
    }
    .with_percent(p);
    let default_config = CompressionConfig::WEIGHT_4BIT;
    if !args.compress_weight
        && (args.comp_weight_bits != default_config.num_bits
            || args.comp_weight_group_size != default_config.group_size)
    {
        bail!("--comp-weight-bits and --comp-weight-group-size apply to --compress-weight");
    }
    policy.validate()?;
    Ok(policy)
}

/// `--policy auto`: the searched policy for this model and machine, its prediction, and the
/// weight dtype it was searched for.
fn auto_policy(args: &Args, dtype: Option<DType>) -> Result<(Policy, Prediction, DType)> {
    let model_path = Path::new(&args.model);
    let cfg = match args.path.as_deref() {
        Some(p) if !p.contains(DUMMY_WEIGHT) => {
            OptConfig::from_file(Path::new(p).join("config.json"))?
        }
        _ if model_path.is_dir() => OptConfig::from_file(model_path.join("config.json"))?,
        _ => OptConfig::from_name(&args.model)?,
    };
    let shape = ModelShape {
        name: args.model.clone(),
        num_layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        ffn: cfg.ffn_dim,
        heads: cfg.num_attention_heads,
        vocab: cfg.vocab_size,
        max_positions: cfg.max_position_embeddings,
        embed_dim: cfg.word_embed_dim(),
    };
    let dir = args
        .offload_dir
        .clone()
        .unwrap_or_else(flexgen::offload::default_offload_dir);
    let path = ps::default_profile_path();
    let (profile, _) = ps::load_or_calibrate(
        &path,
        &dir,
        false,
        &ps::CalibrationSettings::default(),
        &mut |step| eprintln!("calibrating: {step}"),
    )?;
    let workload = ps::Workload {
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
    };
    let mut opts = SearchOptions::new(workload, ps::MemoryLimits::measure(&dir));
    opts.dtype = dtype
        .or_else(|| cfg.torch_dtype.as_deref().and_then(|d| d.parse().ok()))
        .unwrap_or(DType::F16);
    opts.compress_weight = if args.compress_weight {
        Choice::On
    } else {
        Choice::Off
    };
    opts.overlap = args.overlap;
    opts.sep_layer = args.sep_layer;
    let found = ps::search(&shape, &profile, &opts)?;
    let policy = Policy {
        pin_weight: args.pin_weight,
        cpu_cache_compute: args.cpu_cache_compute,
        ..found.policy
    };
    eprintln!(
        "policy auto (profile {}): --gpu-batch-size {} --num-gpu-batches {} --percent {}{}",
        path.display(),
        policy.gpu_batch_size,
        policy.num_gpu_batches,
        policy.percent().map(|v| v.to_string()).join(" "),
        if policy.compress_weight {
            " --compress-weight"
        } else {
            ""
        }
    );
    Ok((policy, found.prediction, opts.dtype))
}

fn load_model(args: &Args, dtype: Option<DType>, policy: &Policy) -> Result<OffloadedOpt> {
    let model_path = Path::new(&args.model);
    let weights_dir: Option<PathBuf> = match args.path.as_deref() {
        Some(p) if p.contains(DUMMY_WEIGHT) => None,
        Some(p) => Some(PathBuf::from(p)),
        None if model_path.is_dir() => Some(model_path.to_path_buf()),
        None => None,
    };
    let options = OffloadOptions {
        offload_dir: args
            .offload_dir
            .clone()
            .unwrap_or_else(flexgen::offload::default_offload_dir),
        direct_io: args.direct_io,
        io_threads: args.io_threads,
        planned_block: Some(BlockShape {
            sequences: policy.block_size(),
            prompt_len: args.prompt_len,
            gen_len: args.gen_len,
        }),
        ..OffloadOptions::default()
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("placing weights {bar:40} {pos}/{len} [{elapsed}]")
            .expect("a valid template"),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let model = match weights_dir {
        Some(dir) => OffloadedOpt::load(&dir, dtype, policy, &options, &mut progress)?,
        None => {
            let config = if model_path.is_dir() {
                OptConfig::from_file(model_path.join("config.json"))?
            } else {
                OptConfig::from_name(&args.model)?
            };
            let dtype = dtype.unwrap_or(DType::F16);
            OffloadedOpt::dummy(config, dtype, args.seed, policy, &options, &mut progress)?
        }
    };
    bar.finish_and_clear();
    Ok(model)
}

/// Deterministic prompt tokens: BOS then ids spread over the vocabulary.
fn make_prompts(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|row| {
            let mut state = seed ^ (row as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            std::iter::once(2)
                .chain((1..len).map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    4 + ((state >> 33) % 50000) as u32
                }))
                .collect()
        })
        .collect()
}

/// `gen_len` tokens per row with no stop token.
fn block_config(gen_len: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: gen_len,
        stop_token_ids: Vec::new(),
        ..GenerationConfig::default()
    }
}

/// One generation of the block (every row runs `gen_len` tokens).
fn run_block(model: &OffloadedOpt, prompts: &[Vec<u32>], gen_len: usize) -> Result<()> {
    model.generate(prompts, &block_config(gen_len), None, |_| Flow::Continue)?;
    Ok(())
}

/// FlexGen's warm-up: the prefill and first token of the same block. It is set up for
/// `gen_len` tokens and stopped after the first, so that it has the measured run's shape and
/// the runtime's reused KV cache buffers fit the measured run (their pages are then already
/// mapped, as after a warm-up on a GPU's caching allocator).
fn warm_up(model: &OffloadedOpt, prompts: &[Vec<u32>], gen_len: usize) -> Result<()> {
    model.generate(prompts, &block_config(gen_len), None, |_| Flow::StopAll)?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.prompt_len == 0 || args.gen_len == 0 {
        bail!("--prompt-len and --gen-len must be positive");
    }
    let dtype = args
        .dtype
        .as_deref()
        .map(str::parse::<DType>)
        .transpose()
        .context("--dtype")?;
    let (policy, predicted, dtype) = if args.policy == "auto" {
        let (p, pred, d) = auto_policy(&args, dtype)?;
        (p, Some(pred), Some(d))
    } else {
        (policy(&args)?, None, dtype)
    };
    if args.int8_activations {
        if !policy.compress_weight {
            bail!("--int8-activations applies to compressed weights: add --compress-weight");
        }
        flexgen::quant::set_int8_activations(true);
    }
    flexgen::offload::install_interrupt_cleanup()?;
    let t_load = Instant::now();
    let model = load_model(&args, dtype, &policy)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    if args.prompt_len + args.gen_len - 1 > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {} + --gen-len {} exceeds the model's {} positions",
            args.prompt_len,
            args.gen_len,
            cfg.max_position_embeddings
        );
    }
    let batch = policy.block_size();
    let prompts = make_prompts(batch, args.prompt_len, args.seed);
    for _ in 0..args.warmup {
        warm_up(&model, &prompts, args.gen_len)?;
    }
    model.take_stats();
    let start = Instant::now();
    run_block(&model, &prompts, args.gen_len)?;
    let total = start.elapsed().as_secs_f64();
    let stats = model
        .take_stats()
        .pop()
        .context("the block produced no statistics")?;
    let prefill = stats.prefill_s.max(1e-9);
    let decode = (total - prefill).max(1e-9);
    let weight_bytes = model.with_runtime(|rt| rt.weight_plan().home_bytes);
    let first_2d = model
        .layer_specs()
        .iter()
        .flat_map(|l| l.weights())
        .find_map(|w| match w.kind {
            flexgen::offload::TensorKind::Matrix { dtype, .. } => Some(dtype),
            _ => None,
        });
    let m = Metrics {
        model: args.model.clone(),
        dtype: if policy.compress_weight {
            let c = policy.comp_weight_config;
            if c.group_size == CompressionConfig::WEIGHT_4BIT.group_size {
                format!("{}-bit", c.num_bits)
            } else {
                format!("{}-bit/g{}", c.num_bits, c.group_size)
            }
        } else {
            first_2d.map_or("?".into(), |d| d.to_string())
        },
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        batch_size: batch,
        gpu_batch_size: policy.gpu_batch_size,
        num_gpu_batches: policy.num_gpu_batches,
        percent: policy.percent().to_vec(),
        overlap: policy.overlap,
        sep_layer: policy.sep_layer,
        compress_weight: policy.compress_weight,
        int8_activations: flexgen::quant::int8_activations_enabled() && policy.compress_weight,
        direct_io: args.direct_io,
        threads: rayon::current_num_threads(),
        model_size_bytes: weight_bytes.iter().sum(),
        weight_bytes,
        cache_size_bytes: 2
            * cfg.num_hidden_layers
            * cfg.hidden_size
            * batch
            * (args.prompt_len + args.gen_len - 1)
            * 4,
        load_s,
        prefill_latency_s: prefill,
        prefill_throughput_tok_s: (batch * args.prompt_len) as f64 / prefill,
        decode_latency_s: decode,
        decode_throughput_tok_s: (batch * (args.gen_len - 1)) as f64 / decode,
        total_latency_s: total,
        total_throughput_tok_s: (batch * args.gen_len) as f64 / total,
        compute_s: stats.compute_s,
        stall_s: stats.stall_s,
        io_read_bytes: stats.io.read_bytes,
        io_write_bytes: stats.io.write_bytes,
        io_read_s: stats.io.read_s,
        io_write_s: stats.io.write_s,
        peak_tier_bytes: stats.peak_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        predicted,
    };
    if args.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        let gb = |b: u64| b as f64 / (1u64 << 30) as f64;
        let tiers = |b: [u64; 3]| {
            Tier::ALL
                .iter()
                .map(|t| format!("{t} {:.3} GB", gb(b[*t as usize])))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "model size: {:.3} GB ({})\tcache size: {:.3} GB\tpeak rss: {}",
            gb(m.model_size_bytes),
            tiers(m.weight_bytes),
            gb(m.cache_size_bytes as u64),
            m.peak_rss_bytes
                .map_or("n/a".into(), |b| format!("{:.3} GB", gb(b)))
        );
        println!("peak per tier: {}", tiers(m.peak_tier_bytes));
        println!(
            "compute: {:.3} s\tI/O wait: {:.3} s\tdisk read: {:.3} GB in {:.3} s\tdisk write: {:.3} GB in {:.3} s",
            m.compute_s,
            m.stall_s,
            gb(m.io_read_bytes),
            m.io_read_s,
            gb(m.io_write_bytes),
            m.io_write_s
        );
        println!(
            "prefill latency: {:.3} s\tprefill throughput: {:.3} token/s",
            m.prefill_latency_s, m.prefill_throughput_tok_s
        );
        println!(
            "decode latency: {:.3} s\tdecode throughput: {:.3} token/s",
            m.decode_latency_s, m.decode_throughput_tok_s
        );
        println!(
            "total latency: {:.3} s\ttotal throughput: {:.3} token/s",
            m.total_latency_s, m.total_throughput_tok_s
        );
        if let Some(p) = &m.predicted {
            println!(
                "predicted: prefill {:.3} s, decode {:.3} s, total throughput {:.3} token/s \
                 (measured / predicted = {:.2})",
                p.prefill_s,
                p.decode_s,
                p.total_throughput,
                m.total_throughput_tok_s / p.total_throughput
            );
        }
    }
    Ok(())
}
