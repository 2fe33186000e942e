//! Policy search (FlexGen's `experimental/cost_model.py`, measured instead of hand-fitted):
//! calibrate this machine once, then find the offloading policy with the highest predicted
//! throughput for a model within the memory limits, and print it as a ready `flex_opt`
//! command line.
//!
//! ```text
//! # OPT-6.7B under a 6 GiB RAM limit
//! cargo run --release --example policy_search -- --model facebook/opt-6.7b --ram-limit 6G
//! # predict a fixed policy instead of searching
//! cargo run --release --example policy_search -- --model facebook/opt-1.3b \
//!     --gpu-batch-size 8 --num-gpu-batches 1 --percent 100 0 100 0 100 0
//! ```
//!
//! The hardware profile is saved as JSON (path printed; `--profile` to choose it) and reused
//! until it is stale (another machine, CPU count, offload filesystem, or 30 days);
//! `--recalibrate` measures again.

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use flexgen::cli::str2bool;
use flexgen::core::DType;
use flexgen::offload::search::{
    default_profile_path, load_or_calibrate, predict, search, CalibrationSettings, Choice,
    HardwareProfile, LinearKind, MemoryLimits, ModelShape, Prediction, ProfileOrigin,
    SearchOptions, SearchResult, Workload,
};
use flexgen::offload::Policy;
use flexgen::opt::OptConfig;

/// FlexGen's path value meaning "deterministic dummy weights, no files".
const DUMMY_WEIGHT: &str = "_DUMMY_";

/// Bytes from `6G`, `512M`, `1.5GiB`, `10GB` (powers of 1024) or a plain number of GiB.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("expected a size like 6G or 512M, got {s:?}"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" | "G" => 30,
        "K" => 10,
        "M" => 20,
        "T" => 40,
        _ => return Err(format!("unknown unit in {s:?} (use K, M, G or T)")),
    };
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("a size must be positive, got {s:?}"));
    }
    Ok((v * (1u64 << shift) as f64) as u64)
}

/// Find the fastest offloading policy for an OPT model on this machine.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A zoo name (facebook/opt-125m ... opt-175b, galactica-30b, opt-iml-*) or a model folder.
    #[arg(long, default_value = "facebook/opt-6.7b")]
    model: String,
    /// Weights folder, or `_DUMMY_` (passed on to the printed flex_opt command; a zoo name
    /// without it means dummy weights there).
    #[arg(long)]
    path: Option<String>,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    gen_len: usize,
    /// Dtype of the 2-D weights (default: the checkpoint's `torch_dtype`, else f16).
    #[arg(long)]
    dtype: Option<String>,
    /// 4-bit weights: off, on, or auto (try both).
    #[arg(long, default_value = "off")]
    compress_weight: String,
    /// 4-bit KV cache: off, on, or auto (the offloaded OPT does not run it yet).
    #[arg(long, default_value = "off")]
    compress_cache: String,
    /// RAM the policy may use (e.g. 6G; default: MemAvailable, capped by this process's
    /// cgroup limit). The printed command runs flex_opt under tools/memcap.sh with this limit.
    #[arg(long, value_parser = parse_size)]
    ram_limit: Option<u64>,
    /// Disk space the policy may use (default: free space of the offload directory).
    #[arg(long, value_parser = parse_size)]
    disk_limit: Option<u64>,
    /// Share of the limits the predicted peak may reach (FlexGen's alpha).
    #[arg(long, default_value_t = 0.8)]
    alpha: f64,
    /// Only this micro-batch size.
    #[arg(long)]
    gpu_batch_size: Option<usize>,
    /// Only this many micro-batches per block.
    #[arg(long)]
    num_gpu_batches: Option<usize>,
    /// Largest micro-batch size to try.
    #[arg(long, default_value_t = 512)]
    max_gpu_batch_size: usize,
    /// Most micro-batches per block to try.
    #[arg(long, default_value_t = 64)]
    max_num_gpu_batches: usize,
    /// Predict this fixed placement `wg wc cg cc hg hc` (with --gpu-batch-size and
    /// --num-gpu-batches) instead of searching.
    #[arg(long, num_args = 6, value_names = ["WG", "WC", "CG", "CC", "HG", "HC"])]
    percent: Option<Vec<f64>>,
    /// Overlap I/O with compute.
    #[arg(long, default_value = "true", value_parser = str2bool, action = clap::ArgAction::Set)]
    overlap: bool,
    /// Attention and MLP as separate layers.
    #[arg(long, default_value = "true", value_parser = str2bool, action = clap::ArgAction::Set)]
    sep_layer: bool,
    /// The disk tier's directory (calibrated for, and passed on to flex_opt).
    #[arg(long)]
    offload_dir: Option<PathBuf>,
    /// The hardware profile file (default: $FLEXGEN_PROFILE, else
    /// ~/.cache/flexgen-rs/hardware-profile.json).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Measure the machine again even if the saved profile is fresh.
    #[arg(long)]
    recalibrate: bool,
    /// Also list every block shape solved.
    #[arg(long)]
    candidates: bool,
    /// Print the result as JSON (policy, prediction, LP fractions, candidates).
    #[arg(long)]
    json: bool,
}

/// The model's shape from its config (a folder's config.json or the zoo).
fn model_shape(args: &Args) -> Result<(ModelShape, Option<String>)> {
    let model_path = Path::new(&args.model);
    let weights = args
        .path
        .as_deref()
        .filter(|p| !p.contains(DUMMY_WEIGHT))
        .map(PathBuf::from);
    let config_dir = if model_path.is_dir() {
        Some(model_path.to_path_buf())
    } else {
        weights.filter(|p| p.join("config.json").exists())
    };
    let cfg = match &config_dir {
        Some(dir) => OptConfig::from_file(dir.join("config.json"))?,
        None => OptConfig::from_name(&args.model)?,
    };
    Ok((
        ModelShape {
            name: args.model.clone(),
            num_layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            ffn: cfg.ffn_dim,
            heads: cfg.num_attention_heads,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            embed_dim: cfg.word_embed_dim(),
        },
        config_dir.and(cfg.torch_dtype.clone()),
    ))
}

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

fn print_profile(path: &Path, origin: &ProfileOrigin, p: &HardwareProfile) {
    match origin {
        ProfileOrigin::Loaded => eprintln!("hardware profile: {} (reused)", path.display()),
        ProfileOrigin::Calibrated(why) => eprintln!(
            "hardware profile: {} (calibrated in {:.1} s: {why})",
            path.display(),
            p.calibration_s
        ),
    }
    for kind in LinearKind::ALL {
        let pts: Vec<String> = [1usize, 8, 64, 512, 2048]
            .iter()
            .map(|&m| format!("m={m} {:.0}", p.linear_flops(kind, m) / 1e9))
            .collect();
        eprintln!("  linear {kind:>4} GFLOP/s: {}", pts.join(", "));
    }
    eprintln!(
        "  attention: prefill {:.0} GFLOP/s at s=512, decode {:.1} GB/s (f32 cache), {:.1} GB/s (4-bit); copy {:.1} GB/s",
        p.attention_prefill_flops(512) / 1e9,
        p.attention_decode_bw / 1e9,
        p.attention_decode_packed_bw / 1e9,
        p.copy_bw / 1e9
    );
    eprintln!(
        "  disk ({}): read {:.2} GB/s, write {:.2} GB/s; compute while reading {:.0}% of its speed alone{}",
        p.offload_dir.display(),
        p.disk_read_bw / 1e9,
        p.disk_write_bw / 1e9,
        p.io_compute_ratio * 100.0,
        if p.disk_direct {
            ""
        } else {
            " (O_DIRECT refused: may include the page cache)"
        }
    );
}

fn print_prediction(pred: &Prediction, gen_len: usize) {
    println!(
        "predicted: prefill {:.2} s ({:.1} tok/s), decode {:.2} s ({:.2} tok/s), total {:.2} s, \
         throughput {:.2} tok/s ({} sequences x {gen_len} tokens)",
        pred.prefill_s,
        pred.prefill_throughput,
        pred.decode_s,
        pred.decode_throughput,
        pred.total_s,
        pred.total_throughput,
        pred.block_size,
    );
    println!(
        "peak memory: compute {:.2} GiB, host {:.2} GiB, disk {:.2} GiB",
        gib(pred.peak_bytes[0]),
        gib(pred.peak_bytes[1]),
        gib(pred.peak_bytes[2])
    );
    println!(
        "per decoder layer: prefill I/O {:.3} s, compute {:.3} s; decode step I/O {:.4} s, compute {:.4} s",
        pred.layer_s[0], pred.layer_s[1], pred.layer_s[2], pred.layer_s[3]
    );
}

/// The flex_opt command line running `policy`.
fn flex_opt_command(args: &Args, policy: &Policy, dtype: DType) -> String {
    let num = |v: f64| format!("{}", v.round() as i64);
    let mut cmd = String::new();
    if let Some(limit) = args.ram_limit {
        cmd += &format!("tools/memcap.sh {}M -- ", limit >> 20);
    }
    cmd += &format!(
        "cargo run --release --example flex_opt -- --model {}{} --prompt-len {} \
         --gen-len {} --gpu-batch-size {} --num-gpu-batches {} --percent {} --dtype {dtype}",
        args.model,
        args.path
            .as_deref()
            .map_or(String::new(), |p| format!(" --path {p}")),
        args.prompt_len,
        args.gen_len,
        policy.gpu_batch_size,
        policy.num_gpu_batches,
        policy
            .percent()
            .iter()
            .map(|&v| num(v))
            .collect::<Vec<_>>()
            .join(" "),
    );
    if policy.compress_weight {
        cmd += " --compress-weight";
    }
    if policy.compress_cache {
        cmd += " --compress-cache";
    }
    if !policy.overlap {
        cmd += " --overlap false";
    }
    if !policy.sep_layer {
        cmd += " --sep-layer false";
    }
    if let Some(d) = &args.offload_dir {
        cmd += &format!(" --offload-dir {}", d.display());
    }
    cmd
}

fn print_search(args: &Args, r: &SearchResult, dtype: DType, took_ms: f64) {
    let p = &r.policy;
    println!(
        "searched {} block shapes ({} LPs) in {took_ms:.0} ms, planning with {:.2} GiB RAM and \
         {:.2} GiB disk",
        r.candidates.len(),
        r.lps_solved,
        gib(r.capacity.ram),
        gib(r.capacity.disk)
    );
    if args.candidates {
        println!("  gbs  ngb  cw cc  LP wRAM%  LP cRAM%  LP tok/s  rounded tok/s");
        for c in &r.candidates {
            println!(
                "  {:>3}  {:>3}  {:>2} {:>2}  {:>8.1}  {:>8.1}  {:>8.2}  {}",
                c.gpu_batch_size,
                c.num_gpu_batches,
                u8::from(c.compress_weight),
                u8::from(c.compress_cache),
                100.0 * (1.0 - c.lp.weights_disk),
                100.0 * (1.0 - c.lp.cache_disk),
                c.lp.prediction.total_throughput,
                c.rounded_throughput
                    .map_or("does not fit".into(), |t| format!("{t:.2}"))
            );
        }
    }
    println!(
        "policy: gpu_batch_size {}, num_gpu_batches {} (block {}), percent {:?}, compress \
         weight {}, cache {}",
        p.gpu_batch_size,
        p.num_gpu_batches,
        p.block_size(),
        p.percent(),
        p.compress_weight,
        p.compress_cache
    );
    println!(
        "LP optimum: weights {:.1}% RAM, cache {:.1}% RAM ({:?}), {:.2} tok/s before rounding",
        100.0 * (1.0 - r.lp.weights_disk),
        100.0 * (1.0 - r.lp.cache_disk),
        r.lp.cache_mode,
        r.lp.prediction.total_throughput
    );
    print_prediction(&r.prediction, args.gen_len);
    println!("run it:\n{}", flex_opt_command(args, p, dtype));
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (shape, checkpoint_dtype) = model_shape(&args)?;
    let dtype = match args.dtype.as_deref().or(checkpoint_dtype.as_deref()) {
        Some(d) => d.parse::<DType>().context("--dtype")?,
        None => DType::F16,
    };
    let offload_dir = args
        .offload_dir
        .clone()
        .unwrap_or_else(flexgen::offload::default_offload_dir);
    let profile_path = args.profile.clone().unwrap_or_else(default_profile_path);
    let (profile, origin) = load_or_calibrate(
        &profile_path,
        &offload_dir,
        args.recalibrate,
        &CalibrationSettings::default(),
        &mut |step| eprintln!("calibrating: {step}"),
    )?;
    print_profile(&profile_path, &origin, &profile);
    let workload = Workload {
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
    };
    let mut limits = MemoryLimits::measure(&offload_dir);
    eprintln!(
        "measured: {:.2} GiB RAM available, {:.2} GiB free in {}",
        gib(limits.ram_bytes as f64),
        gib(limits.disk_bytes as f64),
        offload_dir.display()
    );
    if let Some(r) = args.ram_limit {
        limits.ram_bytes = r;
    }
    if let Some(d) = args.disk_limit {
        limits.disk_bytes = d;
    }
    if let Some(percent) = &args.percent {
        let policy = Policy {
            gpu_batch_size: args.gpu_batch_size.unwrap_or(4),
            num_gpu_batches: args.num_gpu_batches.unwrap_or(1),
            overlap: args.overlap,
            sep_layer: args.sep_layer,
            compress_weight: args.compress_weight.parse::<Choice>()? == Choice::On,
            compress_cache: args.compress_cache.parse::<Choice>()? == Choice::On,
            ..Policy::default()
        }
        .with_percent([
            percent[0], percent[1], percent[2], percent[3], percent[4], percent[5],
        ]);
        let pred = predict(&shape, &profile, workload, dtype, &policy)?;
        if args.json {
            println!("{}", serde_json::to_string(&pred)?);
            return Ok(());
        }
        let cap = [limits.ram_bytes as f64, limits.disk_bytes as f64].map(|b| b * args.alpha);
        print_prediction(&pred, args.gen_len);
        if pred.ram_bytes() > cap[0] || pred.peak_bytes[2] > cap[1] {
            println!(
                "warning: exceeds the planned memory ({:.2} GiB RAM, {:.2} GiB disk)",
                gib(cap[0]),
                gib(cap[1])
            );
        }
        return Ok(());
    }
    let mut opts = SearchOptions::new(workload, limits);
    opts.dtype = dtype;
    opts.compress_weight = args.compress_weight.parse()?;
    opts.compress_cache = args.compress_cache.parse()?;
    opts.relaxation = args.alpha;
    opts.overlap = args.overlap;
    opts.sep_layer = args.sep_layer;
    opts.gpu_batch_size = args.gpu_batch_size;
    opts.num_gpu_batches = args.num_gpu_batches;
    opts.max_gpu_batch_size = args.max_gpu_batch_size;
    opts.max_num_gpu_batches = args.max_num_gpu_batches;
    let t = Instant::now();
    let found = search(&shape, &profile, &opts)?;
    let took_ms = t.elapsed().as_secs_f64() * 1e3;
    if args.json {
        println!("{}", serde_json::to_string(&found)?);
    } else {
        print_search(&args, &found, dtype, took_ms);
    }
    Ok(())
}
