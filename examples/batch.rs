//! Offline batch jobs: JSONL prompts in, JSONL completions out, resumable.
//!
//! ```text
//! cargo run --release --example batch -- --model tests/fixtures/tiny-preln-f32 \
//!     --input prompts.jsonl --output out.jsonl --max-new-tokens 16
//! ```
//!
//! Input rows: `{"id": "a" | 7, "prompt": "...", "max_new_tokens"?: N, "temperature"?: T,
//! "stop"?: "..." | ["...", ...]}` (the optional fields override the flags for that row).
//! Output rows, in the order they finish: `{"id", "text", "token_ids", "finish_reason",
//! "prompt_tokens", "completion_tokens"}`. A bad input row is reported on stderr with its line
//! number and written as `{"id": ... | null, "line": N, "error": "..."}`; the job goes on.
//!
//! Prompts are sorted by length and run in blocks of `--block-size` rows (little padding). Each
//! finished row is appended and flushed at once, so a killed run loses at most the block in
//! flight; `--resume` skips the ids (and bad lines) already in the output. Row `n` (its line
//! number) samples with seed `--seed + n`, so results do not depend on how rows are grouped.

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use flexgen::cli::resolve_tokenizer_dir;
use flexgen_opt::generation::validate_config;
use flexgen_opt::{Error, FinishReason, Flow, GenerationConfig, OptEngine, OptTokenizer};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[path = "common/engine_flags.rs"]
mod engine_flags;
use engine_flags::EngineFlags;

/// Run a JSONL file of prompts through an OPT model, writing one JSONL line per row.
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
    /// Input JSONL: one {"id", "prompt", ...} object per line.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (appended to). Must not exist unless --resume is given.
    #[arg(long)]
    output: PathBuf,
    /// Continue an interrupted job: skip the rows already in --output.
    #[arg(long)]
    resume: bool,
    /// Rows per block (one left-padded batch).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// New tokens per row at most (a row's "max_new_tokens" overrides it).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature, 0 = greedy (a row's "temperature" overrides it).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    top_p: Option<f32>,
    /// Base seed; the row on line n uses seed + n.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop string for rows without their own "stop" (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Placement and compression (all in memory unless a flag says otherwise; offloaded, a
    /// block runs as micro-batches of --gpu-batch-size rows).
    #[command(flatten)]
    engine: EngineFlags,
    /// Abort (as if killed) after writing this many rows; for testing --resume.
    #[arg(long, hide = true)]
    abort_after: Option<usize>,
}

/// A row's "stop": one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// One input line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRow {
    id: Value,
    prompt: String,
    max_new_tokens: Option<usize>,
    temperature: Option<f32>,
    stop: Option<Stop>,
}

/// One finished row.
#[derive(Serialize)]
struct OutputRow<'a> {
    id: &'a Value,
    text: &'a str,
    token_ids: &'a [u32],
    finish_reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// One row that could not be run.
#[derive(Serialize)]
struct ErrorRow<'a> {
    id: &'a Value,
    line: usize,
    error: &'a str,
}

/// A valid row, ready to run.
struct Job {
    line: usize,
    id: Value,
    ids: Vec<u32>,
    cfg: GenerationConfig,
}

/// A row that cannot run: its line, its id when it has a usable one, and why.
struct BadRow {
    line: usize,
    id: Value,
    msg: String,
}

/// What an existing output file already holds.
#[derive(Default)]
struct Done {
    ids: HashSet<String>,
    error_lines: HashSet<usize>,
}

/// The key of an id for duplicate and resume checks (`"7"` and `7` are different ids).
fn id_key(id: &Value) -> String {
    id.to_string()
}

/// Parses and validates one input line.
fn parse_row(
    text: &str,
    line: usize,
    args: &Args,
    model: &OptEngine,
    tokenizer: &OptTokenizer,
) -> std::result::Result<Job, BadRow> {
    let bad = |id: Value, msg: String| BadRow { line, id, msg };
    let row: InputRow =
        serde_json::from_str(text).map_err(|e| bad(Value::Null, format!("bad JSON row: {e}")))?;
    if !(row.id.is_string() || row.id.is_u64() || row.id.is_i64()) {
        return Err(bad(
            Value::Null,
            format!("\"id\" must be a string or an integer, got {}", row.id),
        ));
    }
    let id = row.id;
    let stop_strings = match row.stop {
        None => args.stop.clone(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let cfg = GenerationConfig {
        max_new_tokens: row.max_new_tokens.unwrap_or(args.max_new_tokens),
        temperature: row.temperature.unwrap_or(args.temperature),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed.wrapping_add(line as u64),
        stop_strings,
        ..GenerationConfig::default()
    };
    if let Err(e) = validate_config(&cfg, Some(tokenizer)) {
        return Err(bad(id, e.to_string()));
    }
    let ids = match tokenizer.encode(&row.prompt) {
        Ok(ids) => ids,
        Err(e) => return Err(bad(id, e.to_string())),
    };
    let max_positions = model.config().max_position_embeddings;
    if ids.len() + cfg.max_new_tokens.saturating_sub(1) > max_positions {
        let e = Error::PromptTooLong {
            row: 0,
            prompt_tokens: ids.len(),
            new_tokens: cfg.max_new_tokens,
            max_positions,
        };
        return Err(bad(id, e.to_string()));
    }
    Ok(Job { line, id, ids, cfg })
}

/// Reads what an earlier run wrote, dropping a last line that a kill cut short.
fn read_done(path: &Path) -> Result<Done> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} to resume it", path.display()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let complete = text.rfind('\n').map_or(0, |p| p + 1);
    if complete < text.len() {
        eprintln!(
            "note: {}: dropping an incomplete last line left by an interrupted run",
            path.display()
        );
        file.set_len(complete as u64)
            .with_context(|| format!("cannot truncate {}", path.display()))?;
        file.seek(SeekFrom::End(0))?;
    }
    let mut done = Done::default();
    for (i, line) in text[..complete].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {} is not JSON: not an output of this tool",
                path.display(),
                i + 1
            )
        })?;
        let id = v.get("id").unwrap_or(&Value::Null);
        if !id.is_null() {
            done.ids.insert(id_key(id));
        }
        if v.get("error").is_some() {
            if let Some(n) = v.get("line").and_then(Value::as_u64) {
                done.error_lines.insert(n as usize);
            }
        }
    }
    Ok(done)
}

/// Appends rows to the output, one flushed line each, and counts them.
struct Writer {
    file: File,
    written: usize,
    abort_after: Option<usize>,
}

impl Writer {
    fn line(&mut self, row: &impl Serialize) -> Result<()> {
        let mut s = serde_json::to_string(row)?;
        s.push('\n');
        self.file
            .write_all(s.as_bytes())
            .and_then(|_| self.file.flush())
            .context("cannot write the output file")?;
        self.written += 1;
        if self.abort_after == Some(self.written) {
            std::process::abort();
        }
        Ok(())
    }

    fn error(&mut self, id: &Value, line: usize, msg: &str) -> Result<()> {
        eprintln!("line {line}: {msg}");
        self.line(&ErrorRow {
            id,
            line,
            error: msg,
        })
    }
}

/// Progress as a bar on a terminal, else as plain lines (one per block).
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    rows: usize,
    tokens: usize,
    start: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{wide_bar} {pos}/{len} rows · {msg} · ETA {eta} (elapsed {elapsed})",
                )
                .expect("a valid template"),
            );
            bar
        });
        Progress {
            bar,
            total,
            rows: 0,
            tokens: 0,
            start: Instant::now(),
        }
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    fn row_done(&mut self, tokens: usize) {
        self.rows += 1;
        self.tokens += tokens;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{:.1} tok/s", self.tokens_per_s()));
            bar.inc(1);
        }
    }

    fn block_done(&self) {
        if self.bar.is_none() {
            let elapsed = self.start.elapsed();
            let eta = if self.rows == 0 {
                Duration::ZERO
            } else {
                elapsed.mul_f64((self.total - self.rows) as f64 / self.rows as f64)
            };
            eprintln!(
                "progress: {}/{} rows, {:.1} tok/s, ETA {:.0} s",
                self.rows,
                self.total,
                self.tokens_per_s(),
                eta.as_secs_f64()
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs one block, writing each row as it finishes; a failure becomes error rows.
fn run_block(
    model: &OptEngine,
    tokenizer: &OptTokenizer,
    block: &[&Job],
    out: &mut Writer,
    progress: &mut Progress,
) -> Result<()> {
    let prompts: Vec<Vec<u32>> = block.iter().map(|j| j.ids.clone()).collect();
    let cfgs: Vec<GenerationConfig> = block.iter().map(|j| j.cfg.clone()).collect();
    let mut texts = vec![String::new(); block.len()];
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); block.len()];
    let mut written = vec![false; block.len()];
    let mut write_err = None;
    let result = model.generate_rows(&prompts, &cfgs, Some(tokenizer), |ev| {
        texts[ev.row].push_str(ev.text);
        ids[ev.row].push(ev.token_id);
        if let Some(reason) = ev.finished {
            let job = block[ev.row];
            let row = OutputRow {
                id: &job.id,
                text: &texts[ev.row],
                token_ids: &ids[ev.row],
                finish_reason: reason,
                prompt_tokens: job.ids.len(),
                completion_tokens: ids[ev.row].len(),
            };
            if let Err(e) = out.line(&row) {
                write_err = Some(e);
                return Flow::StopAll;
            }
            written[ev.row] = true;
            progress.row_done(ids[ev.row].len());
        }
        Flow::Continue
    });
    if let Some(e) = write_err {
        return Err(e);
    }
    match result {
        Ok(outputs) => {
            // Rows that finished without a token event (max_new_tokens 0).
            for ((job, o), done) in block.iter().zip(&outputs).zip(&written) {
                if !done {
                    out.line(&OutputRow {
                        id: &job.id,
                        text: &o.text,
                        token_ids: &o.token_ids,
                        finish_reason: o.finish_reason,
                        prompt_tokens: o.prompt_tokens,
                        completion_tokens: o.token_ids.len(),
                    })?;
                    progress.row_done(o.token_ids.len());
                }
            }
        }
        Err(e) => {
            let msg = format!("generation failed: {e}");
            for (job, done) in block.iter().zip(&written) {
                if !done {
                    out.error(&job.id, job.line, &msg)?;
                    progress.row_done(0);
                }
            }
        }
    }
    progress.block_done();
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let input = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read input {}", args.input.display()))?;
    let done = if args.output.exists() {
        if !args.resume {
            bail!(
                "output {} exists: pass --resume to continue that job, or remove it",
                args.output.display()
            );
        }
        read_done(&args.output)?
    } else {
        Done::default()
    };

    let (tok_dir, fallback) = resolve_tokenizer_dir(&args.model, args.tokenizer.as_deref());
    if fallback {
        eprintln!(
            "note: {} has no tokenizer; using {}",
            args.model.display(),
            tok_dir.display()
        );
    }
    let options = args.engine.engine_options()?;
    if options.policy.is_some() {
        eprintln!("note: {}", EngineFlags::describe(&options));
    }
    let model = OptEngine::load(&args.model, &options)?;
    let tokenizer = OptTokenizer::from_dir(&tok_dir)?;

    // Parse every row first: bad rows are reported up front, duplicates caught.
    let mut jobs = Vec::new();
    let mut bad = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, text) in input.lines().enumerate() {
        let line = i + 1;
        if text.trim().is_empty() {
            continue;
        }
        match parse_row(text, line, &args, &model, &tokenizer) {
            Ok(job) => match first_line.get(&id_key(&job.id)) {
                Some(&first) => bad.push(BadRow {
                    line,
                    id: Value::Null,
                    msg: format!("duplicate id {} (first on line {first})", job.id),
                }),
                None => {
                    first_line.insert(id_key(&job.id), line);
                    jobs.push(job);
                }
            },
            Err(b) => {
                if !b.id.is_null() {
                    first_line.entry(id_key(&b.id)).or_insert(line);
                }
                bad.push(b);
            }
        }
    }

    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("cannot open output {}", args.output.display()))?;
    let mut out = Writer {
        file,
        written: 0,
        abort_after: args.abort_after,
    };
    let mut n_bad = 0;
    for b in &bad {
        let seen = done.error_lines.contains(&b.line)
            || (!b.id.is_null() && done.ids.contains(&id_key(&b.id)));
        if !seen {
            out.error(&b.id, b.line, &b.msg)?;
            n_bad += 1;
        }
    }

    let mut todo: Vec<&Job> = jobs
        .iter()
        .filter(|j| !done.ids.contains(&id_key(&j.id)))
        .collect();
    let skipped = jobs.len() - todo.len();
    if skipped > 0 {
        eprintln!("resuming: {skipped} rows already done");
    }
    // Similar lengths together, so each block pads little.
    todo.sort_by_key(|j| j.ids.len());
    let mut progress = Progress::new(todo.len());
    for block in todo.chunks(args.block_size) {
        run_block(&model, &tokenizer, block, &mut out, &mut progress)?;
    }
    progress.finish();
    eprintln!(
        "done: {} rows, {} bad, {} tokens in {:.2} s ({:.1} tok/s) -> {}",
        progress.rows,
        n_bad,
        progress.tokens,
        progress.start.elapsed().as_secs_f64(),
        progress.tokens_per_s(),
        args.output.display()
    );
    Ok(())
}
