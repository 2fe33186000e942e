//! Complete prompts with an OPT model: all prompts of one call run as one left-padded batch.
//!
//! ```text
//! cargo run --release --example completion -- --model tests/fixtures/tiny-preln-f32 \
//!     --prompt "Paris is the capital city of" --max-new-tokens 16 --json
//! cargo run --release --example completion -- --model ~/models/opt-1.3b --few-shot
//! ```
//!
//! The policy and compression flags (`--percent`, `--gpu-batch-size`, `--num-gpu-batches`,
//! `--compress-weight`, `--compress-cache`, ...) run the same prompts offloaded, e.g. every
//! weight streamed from disk: `--percent 0 0 100 0 100 0`.
//!
//! `--few-shot` is FlexGen's completion app (`flexgen/apps/completion.py`): without a prompt it
//! completes FlexGen's two few-shot prompts, and it samples as that app does (temperature 0.7,
//! stop at the end of the line) unless `--temperature` / `--stop` say otherwise.

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use flexgen::cli::resolve_tokenizer_dir;
use flexgen::offload::BlockShape;
use flexgen::opt::GenerationConfig;
use flexgen_opt::{FinishReason, Flow, OptEngine, OptTokenizer};

#[path = "common/engine_flags.rs"]
mod engine_flags;
use engine_flags::EngineFlags;

/// Generate continuations of text prompts with an OPT model from a Hugging Face folder.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Model folder: config.json plus model.safetensors or sharded safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer folder (tokenizer.json, or vocab.json + merges.txt). Default: the model
    /// folder, else $FLEXGEN_TOKENIZER, else the repository's ../shared/data/opt-tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A prompt; repeat for several. All prompts run as one batch.
    #[arg(long)]
    prompt: Vec<String>,
    /// A file with one prompt per line (added after the --prompt ones).
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy. Default: 0, or 0.7 with --few-shot.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop a row when its text contains this string (repeatable); the text ends before it.
    /// Default: none, or the end of the line with --few-shot.
    #[arg(long)]
    stop: Vec<String>,
    /// FlexGen's completion app: its two few-shot prompts, sampled at temperature 0.7 and
    /// stopped at the end of the line (unless the flags say otherwise). This is also what runs
    /// when no prompt is given.
    #[arg(long)]
    few_shot: bool,
    /// Print one JSON object per prompt, in input order: {"prompt", "token_ids", "text"}.
    #[arg(long)]
    json: bool,
    /// Placement and compression (all in memory unless a flag says otherwise).
    #[command(flatten)]
    engine: EngineFlags,
}

/// The two few-shot prompts of FlexGen's completion app (`flexgen/apps/completion.py`).
const FEW_SHOT_PROMPTS: [&str; 2] = [
    "Question: Where were the 2004 Olympics held?\n\
     Answer: Athens, Greece\n\
     Question: What is the longest river on the earth?\n\
     Answer:",
    "Extract the airport codes from this text.\n\
     Text: \"I want a flight from New York to San Francisco.\"\n\
     Airport codes: JFK, SFO.\n\
     Text: \"I want you to book a flight from Phoenix to Las Vegas.\"\n\
     Airport codes:",
];

/// FlexGen's completion app samples at this temperature.
const FEW_SHOT_TEMPERATURE: f32 = 0.7;

/// One `--json` output line.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    prompt: &'a str,
    token_ids: &'a [u32],
    text: &'a str,
    finish_reason: FinishReason,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut prompts = args.prompt.clone();
    if let Some(file) = &args.prompts_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read prompts file {}", file.display()))?;
        prompts.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
    }
    let few_shot = args.few_shot || prompts.is_empty();
    if few_shot && prompts.is_empty() {
        if !args.few_shot {
            eprintln!(
                "note: no --prompt or --prompts-file given: running FlexGen's two few-shot prompts"
            );
        }
        prompts.extend(FEW_SHOT_PROMPTS.iter().map(|p| p.to_string()));
    }
    let (default_temperature, default_stop) = if few_shot {
        (FEW_SHOT_TEMPERATURE, vec!["\n".to_string()])
    } else {
        (0.0, Vec::new())
    };
    let stop_strings = if args.stop.is_empty() {
        default_stop
    } else {
        args.stop.clone()
    };
    let (tok_dir, fallback) = resolve_tokenizer_dir(&args.model, args.tokenizer.as_deref());
    if fallback {
        eprintln!(
            "note: {} has no tokenizer; using {}",
            args.model.display(),
            tok_dir.display()
        );
    }
    // Tokenize first: an offloaded run then checks its whole block (the longest prompt plus
    // --max-new-tokens) against the memory budgets before loading any weight.
    let tokenizer = OptTokenizer::from_dir(&tok_dir)?;
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<flexgen_opt::Result<Vec<_>>>()?;
    let mut options = args.engine.engine_options()?;
    if let Some(policy) = &options.policy {
        eprintln!("note: {}", EngineFlags::describe(&options));
        options.offload.planned_block = Some(BlockShape {
            sequences: ids.len().min(policy.block_size()),
            prompt_len: ids.iter().map(Vec::len).max().unwrap_or(1).max(1),
            gen_len: args.max_new_tokens.max(1),
        });
    }
    let engine = OptEngine::load(&args.model, &options)?;
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature.unwrap_or(default_temperature),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_strings,
        ..GenerationConfig::default()
    };
    let outs = engine.generate(&ids, &cfg, Some(&tokenizer), |_| Flow::Continue)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (prompt, o) in prompts.iter().zip(&outs) {
        if args.json {
            let line = JsonLine {
                prompt,
                token_ids: &o.token_ids,
                text: &o.text,
                finish_reason: o.finish_reason,
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        } else {
            writeln!(out, "{prompt}{}", o.text)?;
            writeln!(out, "---")?;
        }
    }
    Ok(())
}
