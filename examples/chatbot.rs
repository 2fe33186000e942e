//! FlexGen's chatbot: a preamble with two example exchanges, then `Human: ` / `Assistant: `
//! turns. The reply streams as it is generated, ends at the end of its line, and the KV cache
//! is kept across turns so each turn prefills only the new text. An empty line exits; `/reset`
//! starts over; Ctrl-C stops the current reply (not the program).
//!
//! ```text
//! cargo run --release --example chatbot -- --model ~/models/opt-1.3b
//! printf 'Hi!\nWhat is 2+2?\n' | cargo run --release --example chatbot -- \
//!     --model tests/fixtures/tiny-preln-f32 --system "A short chat." --max-new-tokens 8
//! ```
//!
//! The policy and compression flags run the chat offloaded (e.g. `--percent 0 0 100 0 100 0`
//! streams every weight from disk, `--compress-cache` keeps a 4-bit cache). The offloading
//! runtime holds a cache only while it generates, so offloaded each turn recomputes the kept
//! conversation; the replies are the same.
//!
//! On a terminal the input line has editing and history; when stdin is a pipe lines are read
//! plainly and echoed after the `Human: ` prompt, so stdout is the transcript.

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use flexgen::cli::resolve_tokenizer_dir;
use flexgen_opt::{ChatSession, Flow, GenerationConfig, OptConfig, OptEngine, OptTokenizer};

#[path = "common/engine_flags.rs"]
mod engine_flags;
use engine_flags::EngineFlags;

/// Chat with an OPT model, FlexGen style (`Human:` / `Assistant:` turns).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Model folder: config.json plus model.safetensors or sharded safetensors.
    #[arg(long, required_unless_present = "dummy")]
    model: Option<PathBuf>,
    /// Tokenizer folder (tokenizer.json, or vocab.json + merges.txt). Default: the model
    /// folder, else $FLEXGEN_TOKENIZER, else the repository's ../shared/data/opt-tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    top_p: Option<f32>,
    /// New tokens per reply at most (a reply also ends at the end of its line).
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// Seed of the sampler (turn n uses seed + n).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Text that replaces FlexGen's preamble (the context line and two example exchanges).
    #[arg(long)]
    system: Option<String>,
    /// Print per-turn token counts and timings on stderr.
    #[arg(long)]
    stats: bool,
    /// Recompute the whole conversation every turn (FlexGen's behaviour) instead of keeping
    /// the KV cache; for comparisons.
    #[arg(long)]
    no_kv_reuse: bool,
    /// Placement and compression (all in memory unless a flag says otherwise; offloaded, each
    /// turn recomputes the conversation instead of reusing the KV cache).
    #[command(flatten)]
    engine: EngineFlags,
    /// Run a model of this zoo name with dummy weights (f16) instead of --model; for timing.
    #[arg(long, hide = true, conflicts_with = "model")]
    dummy: Option<String>,
}

/// Where input lines come from: an editor with history on a terminal, plain lines otherwise.
enum Input {
    Editor(rustyline::DefaultEditor),
    Plain(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    fn new() -> Result<Self> {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            Ok(Input::Editor(
                rustyline::DefaultEditor::new().context("cannot set up line editing")?,
            ))
        } else {
            Ok(Input::Plain(stdin.lock().lines()))
        }
    }

    /// The next line after printing `prompt`; `None` at end of input.
    fn read(&mut self, prompt: &str) -> Result<Option<String>> {
        use rustyline::error::ReadlineError;
        match self {
            Input::Editor(ed) => loop {
                match ed.readline(prompt) {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            // History is a convenience; failing to record a line is harmless.
                            let _ = ed.add_history_entry(line.as_str());
                        }
                        return Ok(Some(line));
                    }
                    // Ctrl-C at the prompt discards the line, as in a shell.
                    Err(ReadlineError::Interrupted) => continue,
                    Err(ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(e).context("cannot read input"),
                }
            },
            Input::Plain(lines) => {
                let mut out = std::io::stdout().lock();
                write!(out, "{prompt}")?;
                match lines.next() {
                    Some(line) => {
                        let line = line.context("cannot read stdin")?;
                        writeln!(out, "{line}")?;
                        Ok(Some(line))
                    }
                    None => {
                        writeln!(out)?;
                        Ok(None)
                    }
                }
            }
        }
    }
}

fn load(args: &Args) -> Result<(OptEngine, OptTokenizer)> {
    let model_dir = args.model.clone().unwrap_or_default();
    let (tok_dir, fallback) = resolve_tokenizer_dir(&model_dir, args.tokenizer.as_deref());
    let options = args.engine.engine_options()?;
    let engine = match &args.dummy {
        Some(name) => OptEngine::dummy(OptConfig::from_name(name)?, 0, &options)?,
        None => {
            if fallback {
                eprintln!(
                    "note: {} has no tokenizer; using {}",
                    model_dir.display(),
                    tok_dir.display()
                );
            }
            OptEngine::load(&model_dir, &options)?
        }
    };
    if options.policy.is_some() {
        eprintln!(
            "note: {}; each turn recomputes the conversation (KV reuse needs the in-memory path)",
            EngineFlags::describe(&options)
        );
    }
    let tokenizer = OptTokenizer::from_dir(&tok_dir)?;
    Ok((engine, tokenizer))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (engine, tokenizer) = load(&args)?;
    let base = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        ..GenerationConfig::default()
    };
    // Fail on bad sampling flags now rather than at the first turn.
    flexgen_opt::generation::validate_config(&base, Some(&tokenizer))?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupted);
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C handler")?;
    }

    let mut chat = ChatSession::for_engine(&engine, args.system.clone());
    if args.no_kv_reuse {
        chat.set_reuse_cache(false);
    }
    let mut input = Input::new()?;
    if std::io::stdin().is_terminal() {
        eprintln!("Type a message; an empty line exits, /reset starts over, Ctrl-C stops a reply.");
    }
    let mut turn = 0u64;
    while let Some(line) = input.read("Human: ")? {
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if line == "/reset" {
            chat.reset();
            eprintln!("(conversation reset)");
            continue;
        }
        let cfg = GenerationConfig {
            seed: args.seed.wrapping_add(turn),
            ..base.clone()
        };
        turn += 1;
        interrupted.store(false, Ordering::SeqCst);
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "Assistant: ")?;
        stdout.flush()?;
        let start = Instant::now();
        let mut first_token = None;
        let mut started = false;
        let mut write_err = None;
        let result = chat.send_engine(&engine, &tokenizer, line, &cfg, |ev| {
            first_token.get_or_insert_with(|| start.elapsed());
            // The reply starts after "Assistant:"; its leading space is already printed.
            let text = if started {
                ev.text
            } else {
                ev.text.trim_start()
            };
            started |= !text.is_empty();
            if let Err(e) = stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err = Some(e);
                return Flow::StopAll;
            }
            if interrupted.load(Ordering::SeqCst) {
                Flow::StopAll
            } else {
                Flow::Continue
            }
        });
        writeln!(stdout)?;
        drop(stdout);
        if let Some(e) = write_err {
            return Err(e).context("cannot write to stdout");
        }
        let reply = match result {
            Ok(reply) => reply,
            Err(e) => {
                // A message that cannot fit is the user's to fix; keep chatting.
                eprintln!("error: {e}");
                continue;
            }
        };
        if interrupted.load(Ordering::SeqCst) {
            eprintln!("(reply stopped)");
        }
        if reply.dropped_turns > 0 {
            eprintln!(
                "note: the conversation outgrew the model's {} positions: dropped the oldest {} \
                 exchange(s), kept the preamble and rebuilt the cache",
                chat.capacity(),
                reply.dropped_turns
            );
        }
        if reply.max_new_tokens < args.max_new_tokens {
            eprintln!(
                "note: room for only {} new tokens after the preamble and this message",
                reply.max_new_tokens
            );
        }
        if args.stats {
            let total = start.elapsed();
            let ttft = first_token.unwrap_or(total);
            let n = reply.output.token_ids.len();
            eprintln!(
                "[turn {turn}: prompt {} tokens ({} reused, {} prefilled), first token {:.2} ms, \
                 {n} new tokens in {:.2} ms]",
                reply.reused_tokens + reply.prefilled_tokens,
                reply.reused_tokens,
                reply.prefilled_tokens,
                ttft.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3,
            );
        }
    }
    Ok(())
}
