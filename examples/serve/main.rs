//! An OpenAI-compatible HTTP server with a chat page, backed by batched generation.
//!
//! ```text
//! cargo run --release --example serve -- --model ~/models/opt-1.3b --port 8000
//! cargo run --release --example serve -- --dummy facebook/opt-1.3b   # random weights (benchmarks)
//! cargo run --release --example serve -- --model ~/models/opt-6.7b --percent 0 0 100 0 100 0
//! ```
//!
//! With the policy and compression flags (`--percent`, `--gpu-batch-size`,
//! `--num-gpu-batches`, `--compress-weight`, `--compress-cache`, ...) the model runs under the
//! offloading runtime: a batch runs as blocks whose every layer's weights are read once per
//! token, which is what makes a model larger than RAM usable by many clients at once.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` for
//! server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text) and
//! `GET /` (a chat page). Requests that arrive while a batch runs wait in a queue and run
//! together in the next batch (up to `--max-batch` rows), each row with its own settings.

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

mod engine;
mod routes;

#[path = "../common/engine_flags.rs"]
mod engine_flags;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use flexgen::cli::{bundled_tokenizer_dir, resolve_tokenizer_dir};
use flexgen_opt::{OptConfig, OptEngine, OptTokenizer};

use flexgen::serve::Metrics;

use crate::engine::{Engine, EngineOptions};
use crate::engine_flags::EngineFlags;
use crate::routes::AppState;

/// Serve an OPT model over OpenAI's HTTP API, with a chat page at `/`.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Model folder (config.json plus safetensors weights).
    #[arg(long, conflicts_with = "dummy", required_unless_present = "dummy")]
    model: Option<PathBuf>,
    /// Serve dummy (random) weights of a model-zoo name instead, e.g. facebook/opt-1.3b:
    /// meaningless text, real speed.
    #[arg(long, value_name = "NAME")]
    dummy: Option<String>,
    /// Placement and compression (all in memory unless a flag says otherwise). Offloaded, a
    /// batch runs as blocks of --gpu-batch-size x --num-gpu-batches rows (default: one block
    /// of --max-batch rows).
    #[command(flatten)]
    engine: EngineFlags,
    /// Seed of the dummy weights.
    #[arg(long, default_value_t = 0)]
    dummy_seed: u64,
    /// Tokenizer folder. Default: the model folder, else $FLEXGEN_TOKENIZER, else the
    /// repository's ../shared/data/opt-tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The model id clients pass as `model` (default: the folder name or the --dummy name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long)]
    api_key: Option<String>,
    /// Rows (requests' choices) per batch at most.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// How long an idle engine waits for more requests to join the first one (ms); small
    /// next to one decode step of a real model on a CPU (hundreds of ms for OPT-1.3B).
    #[arg(long, default_value_t = 50)]
    batch_window_ms: u64,
    /// Rows allowed to wait in the queue; more get 429.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// KV cache one batch may allocate, in bytes (rows x (longest prompt + most new tokens) x
    /// per-token bytes); rows beyond it wait for the next batch.
    #[arg(long, default_value_t = 4 << 30)]
    max_kv_cache_bytes: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
}

fn load(args: &Args) -> Result<(OptEngine, String, PathBuf)> {
    let mut options = args.engine.engine_options()?;
    if let Some(policy) = &mut options.policy {
        // One block per batch unless the flags shape it.
        if args.engine.gpu_batch_size.is_none() && args.engine.num_gpu_batches.is_none() {
            policy.gpu_batch_size = args.max_batch;
            policy.num_gpu_batches = 1;
            policy.validate()?;
        }
    }
    eprintln!("model runs {}", EngineFlags::describe(&options));
    if let Some(name) = &args.dummy {
        let cfg = OptConfig::from_name(name)?;
        eprintln!("generating dummy weights for {name} ...");
        let model = OptEngine::dummy(cfg, args.dummy_seed, &options)?;
        return Ok((model, name.clone(), bundled_tokenizer_dir()));
    }
    let Some(dir) = &args.model else {
        bail!("give --model DIR or --dummy NAME");
    };
    let model = OptEngine::load(dir, &options)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok((model, name, dir.clone()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.max_batch == 0 || args.max_queue == 0 {
        bail!("--max-batch and --max-queue must be at least 1");
    }
    let (model, name, model_dir) = load(&args)?;
    let (tok_dir, fallback) = resolve_tokenizer_dir(&model_dir, args.tokenizer.as_deref());
    if fallback {
        eprintln!(
            "note: {} has no tokenizer; using {}",
            model_dir.display(),
            tok_dir.display()
        );
    }
    let tokenizer = Arc::new(OptTokenizer::from_dir(&tok_dir)?);
    let mc = model.config().clone();
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(
        model,
        tokenizer.clone(),
        EngineOptions {
            max_batch: args.max_batch,
            batch_window: Duration::from_millis(args.batch_window_ms),
            max_queue: args.max_queue,
            max_kv_cache_bytes: args.max_kv_cache_bytes,
            kv_bytes_per_token: mc.kv_cache_bytes_per_token(4),
        },
        metrics.clone(),
    )
    .context("cannot start the engine thread")?;
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        model_id: args.served_model_name.clone().unwrap_or(name),
        max_positions: mc.max_position_embeddings,
        vocab_size: mc.vocab_size,
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        metrics,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    if !args.host.is_loopback() && args.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach it can use it",
            args.host
        );
    }
    // Generation runs on the engine thread; the HTTP side needs little.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        println!(
            "serving {} on http://{local} (chat page: http://{local}/)",
            state.model_id
        );
        std::io::stdout().flush()?;
        axum::serve(listener, routes::router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("server failed")
    })
}
