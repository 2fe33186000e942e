//! FlexGen's benchmark (`flex_opt`): generate `gen_len` tokens for a block of
//! `gpu_batch_size × num_gpu_batches` prompts of `prompt_len` tokens and report FlexGen's metrics.
//!
//! ```text
//! cargo run --release --example flex_opt -- --model facebook/opt-1.3b --path _DUMMY_ \
//!     --prompt-len 128 --gen-len 32 --gpu-batch-size 8 --dtype bf16
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use flexgen::core::DType;
use flexgen::opt::{generate, Flow, GenerationConfig, LoadOptions, OptConfig, OptModel};

/// FlexGen's path value meaning "deterministic dummy weights, no files".
const DUMMY_WEIGHT: &str = "_DUMMY_";

/// Benchmark OPT generation throughput (FlexGen's flex_opt).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A zoo name (facebook/opt-125m ... opt-175b, galactica-30b, opt-iml-*) or a model folder.
    #[arg(long, default_value = "facebook/opt-1.3b")]
    model: String,
    /// Weights folder, or `_DUMMY_` for dummy weights generated in memory (default when
    /// --model is a zoo name).
    #[arg(long)]
    path: Option<String>,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    gen_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    gpu_batch_size: usize,
    /// Micro-batches per block (block = gpu_batch_size × num_gpu_batches sequences).
    #[arg(long, default_value_t = 1)]
    num_gpu_batches: usize,
    /// Placement percentages `wg wc cg cc hg hc` (weights, cache, activations on compute /
    /// host memory; disk gets the rest). Until offloading lands only `100 0 100 0 100 0`.
    #[arg(long, num_args = 6, default_values_t = [100u32, 0, 100, 0, 100, 0])]
    percent: Vec<u32>,
    /// Weight dtype: f32, f16 or bf16 (default: the checkpoint's, f16 for dummy weights).
    #[arg(long)]
    dtype: Option<String>,
    /// Untimed warm-up runs (with gen_len 2) before the measured one.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the dummy weights and prompt tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the metrics as one JSON object.
    #[arg(long)]
    json: bool,
}

/// FlexGen's metrics of one run.
#[derive(serde::Serialize, Debug)]
struct Metrics {
    model: String,
    dtype: String,
    prompt_len: usize,
    gen_len: usize,
    batch_size: usize,
    gpu_batch_size: usize,
    num_gpu_batches: usize,
    percent: Vec<u32>,
    threads: usize,
    model_size_bytes: usize,
    cache_size_bytes: usize,
    load_s: f64,
    prefill_latency_s: f64,
    prefill_throughput_tok_s: f64,
    decode_latency_s: f64,
    decode_throughput_tok_s: f64,
    total_latency_s: f64,
    total_throughput_tok_s: f64,
    peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process (VmHWM), Linux only.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn load_model(args: &Args, dtype: Option<DType>) -> Result<OptModel> {
    let model_path = Path::new(&args.model);
    let weights_dir: Option<PathBuf> = match args.path.as_deref() {
        Some(p) if p.contains(DUMMY_WEIGHT) => None,
        Some(p) => Some(PathBuf::from(p)),
        None if model_path.is_dir() => Some(model_path.to_path_buf()),
        None => None,
    };
    match weights_dir {
        Some(dir) => Ok(OptModel::load(&dir, &LoadOptions { dtype })?),
        None => {
            let config = if model_path.is_dir() {
                OptConfig::from_file(model_path.join("config.json"))?
            } else {
                OptConfig::from_name(&args.model)?
            };
            Ok(OptModel::dummy(
                config,
                dtype.unwrap_or(DType::F16),
                args.seed,
            )?)
        }
    }
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

/// One timed generation: (prefill seconds, total seconds).
fn run_block(model: &OptModel, prompts: &[Vec<u32>], gen_len: usize) -> Result<(f64, f64)> {
    let cfg = GenerationConfig {
        max_new_tokens: gen_len,
        stop_token_ids: Vec::new(),
        ..GenerationConfig::default()
    };
    let n = prompts.len();
    let start = Instant::now();
    let mut prefill = None;
    let mut first_tokens = 0;
    generate(model, prompts, &cfg, None, |ev| {
        if ev.index == 0 {
            first_tokens += 1;
            if first_tokens == n {
                prefill = Some(start.elapsed().as_secs_f64());
            }
        }
        Flow::Continue
    })?;
    let total = start.elapsed().as_secs_f64();
    Ok((prefill.unwrap_or(total), total))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.percent != [100, 0, 100, 0, 100, 0] {
        bail!(
            "--percent {:?}: offloading is not implemented yet; only `100 0 100 0 100 0` \
             (everything in compute memory) is accepted",
            args.percent
        );
    }
    if args.prompt_len == 0
        || args.gen_len == 0
        || args.gpu_batch_size == 0
        || args.num_gpu_batches == 0
    {
        bail!("--prompt-len, --gen-len, --gpu-batch-size and --num-gpu-batches must be positive");
    }
    let dtype = args
        .dtype
        .as_deref()
        .map(str::parse::<DType>)
        .transpose()
        .context("--dtype")?;
    let t_load = Instant::now();
    let model = load_model(&args, dtype)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let cfg = model.config();
    if args.prompt_len + args.gen_len - 1 > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {} + --gen-len {} exceeds the model's {} positions",
            args.prompt_len,
            args.gen_len,
            cfg.max_position_embeddings
        );
    }
    let batch = args.gpu_batch_size * args.num_gpu_batches;
    let prompts = make_prompts(batch, args.prompt_len, args.seed);
    for _ in 0..args.warmup {
        run_block(&model, &prompts, args.gen_len.min(2))?;
    }
    let (prefill, total) = run_block(&model, &prompts, args.gen_len)?;
    let decode = (total - prefill).max(1e-9);
    let weight_dtype = model.weights().layers.first().map(|l| l.fc1.weight.dtype());
    let m = Metrics {
        model: args.model.clone(),
        dtype: weight_dtype.map_or("?".into(), |d| d.to_string()),
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        batch_size: batch,
        gpu_batch_size: args.gpu_batch_size,
        num_gpu_batches: args.num_gpu_batches,
        percent: args.percent.clone(),
        threads: rayon::current_num_threads(),
        model_size_bytes: model.weights().nbytes(),
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
        peak_rss_bytes: peak_rss_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        let gb = |b: usize| b as f64 / (1u64 << 30) as f64;
        println!(
            "model size: {:.3} GB\tcache size: {:.3} GB\tpeak rss: {}",
            gb(m.model_size_bytes),
            gb(m.cache_size_bytes),
            m.peak_rss_bytes
                .map_or("n/a".into(), |b| format!("{:.3} GB", gb(b as usize)))
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
    }
    Ok(())
}
