//! Decode speed and resident weight memory of an OPT model with dense and group-wise
//! compressed weights (dummy weights from FlexGen's model zoo), all measured in one process.
//!
//! ```text
//! cargo run --release --example quant_speed -- --model facebook/opt-1.3b --batch 1 --batch 32
//! ```
//!
//! For each format, one model at a time: the resident set size (RSS, from `/proc/self/statm`)
//! grown by building the model is its measured weight memory; then a prefill of
//! `--prompt-len` tokens per row and `--steps` timed decode steps (one token per row each, the
//! median step reported) per batch size.
//!
//! With `--interleave` all formats are built first (their memory together) and the timed
//! steps alternate between them, one step each in turn, so that a slow phase of a shared
//! machine slows every format alike; the ratios between formats are then the figure to read.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use flexgen::opt::{BatchState, LogitsFor, OptConfig, OptModel};
use flexgen::quant::CompressionConfig;
use flexgen_core::DType;

/// Measure decode speed and weight memory per weight format.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A model name from FlexGen's zoo (dummy weights).
    #[arg(long, default_value = "facebook/opt-1.3b")]
    model: String,
    /// Weight formats to compare: f32, f16, bf16, q4 (4-bit g64), q8 (8-bit g64).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16,q4,q8")]
    formats: Vec<String>,
    /// Batch sizes (rows decoded together); repeatable.
    #[arg(long, default_values_t = [1usize])]
    batch: Vec<usize>,
    /// Prompt tokens per row before the timed decode steps.
    #[arg(long, default_value_t = 4)]
    prompt_len: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Keep every format's model and alternate their decode steps (see the module docs).
    #[arg(long)]
    interleave: bool,
}

/// Resident set size of this process in bytes.
fn rss_bytes() -> Result<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/statm: {statm}"))?
        .parse()?;
    Ok(pages * 4096)
}

fn build(cfg: &OptConfig, format: &str) -> Result<OptModel> {
    let seed = 1;
    Ok(match format {
        "f32" => OptModel::dummy(cfg.clone(), DType::F32, seed)?,
        "f16" => OptModel::dummy(cfg.clone(), DType::F16, seed)?,
        "bf16" => OptModel::dummy(cfg.clone(), DType::BF16, seed)?,
        // Quantized from f16 weights, as from an f16 checkpoint.
        "q4" => OptModel::dummy_with(
            cfg.clone(),
            DType::F16,
            seed,
            Some(CompressionConfig::WEIGHT_4BIT),
        )?,
        "q8" => OptModel::dummy_with(
            cfg.clone(),
            DType::F16,
            seed,
            Some(CompressionConfig::WEIGHT_8BIT),
        )?,
        other => bail!("unknown format {other:?} (expected f32, f16, bf16, q4 or q8)"),
    })
}

/// One batch being decoded by one model: its cache, next tokens and logits.
struct Decoder {
    state: BatchState,
    next: Vec<u32>,
    logits: Vec<f32>,
    times: Vec<f64>,
}

impl Decoder {
    /// Prefills `batch` rows of `prompt_len` tokens, room for `steps` more.
    fn new(model: &OptModel, batch: usize, prompt_len: usize, steps: usize) -> Result<Decoder> {
        let mut state = BatchState::new(model.config(), batch, prompt_len + steps + 1);
        let tokens: Vec<u32> = (0..batch * prompt_len)
            .map(|i| 100 + (i as u32 * 7919) % 40000)
            .collect();
        let mut logits = Vec::new();
        model.forward(
            &mut state,
            &tokens,
            &vec![true; tokens.len()],
            prompt_len,
            LogitsFor::Last,
            &mut logits,
        )?;
        Ok(Decoder {
            state,
            next: (0..batch).map(|b| 200 + b as u32).collect(),
            logits,
            times: Vec::with_capacity(steps),
        })
    }

    /// Times one decode step (one token per row) and picks the next tokens greedily.
    fn step(&mut self, model: &OptModel) -> Result<()> {
        let batch = self.next.len();
        let t = Instant::now();
        model.forward(
            &mut self.state,
            &self.next,
            &vec![true; batch],
            1,
            LogitsFor::Last,
            &mut self.logits,
        )?;
        self.times.push(t.elapsed().as_secs_f64());
        let vocab = model.config().vocab_size;
        for (b, n) in self.next.iter_mut().enumerate() {
            let row = &self.logits[b * vocab..(b + 1) * vocab];
            *n = flexgen_core::kernels::argmax(row).unwrap_or(0) as u32;
        }
        Ok(())
    }

    /// Median seconds of the timed steps.
    fn median(&self) -> f64 {
        let mut t = self.times.clone();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }
}

/// Median seconds per decode step of each model at `batch` rows; the models' steps alternate.
fn interleaved_step_seconds(
    models: &[&OptModel],
    batch: usize,
    prompt_len: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let mut decoders = models
        .iter()
        .map(|m| Decoder::new(m, batch, prompt_len, steps))
        .collect::<Result<Vec<_>>>()?;
    for _ in 0..steps {
        for (d, m) in decoders.iter_mut().zip(models) {
            d.step(m)?;
        }
    }
    Ok(decoders.iter().map(Decoder::median).collect())
}

/// One table row: format, measured memory, model bytes, then `ms/step | tok/s` per batch.
fn print_row(format: &str, resident: usize, model: &OptModel, seconds: &[(usize, f64)]) {
    let cols: Vec<String> = seconds
        .iter()
        .map(|&(b, s)| format!("{:.1} | {:.1}", s * 1e3, b as f64 / s))
        .collect();
    println!(
        "| {format} | {resident} | {} | {} |",
        model.weights().nbytes(),
        cols.join(" | ")
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = OptConfig::from_name(&args.model)?;
    println!(
        "model {} (dummy weights), {} threads, prompt {} tokens, median of {} decode steps",
        args.model,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.prompt_len,
        args.steps
    );
    println!(
        "| weights | resident weight bytes (RSS growth) | OptWeights::nbytes | {} |",
        args.batch
            .iter()
            .map(|b| format!("B={b} ms/step | B={b} tok/s"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|---|{}", "---|---|".repeat(args.batch.len()));
    if args.interleave {
        let mut built = Vec::new();
        for format in &args.formats {
            let before = rss_bytes()?;
            let model = build(&cfg, format)?;
            built.push((format, rss_bytes()?.saturating_sub(before), model));
        }
        let models: Vec<&OptModel> = built.iter().map(|(_, _, m)| m).collect();
        let mut per_format = vec![Vec::new(); built.len()];
        for &b in &args.batch {
            let secs = interleaved_step_seconds(&models, b, args.prompt_len, args.steps)?;
            for (cols, s) in per_format.iter_mut().zip(secs) {
                cols.push((b, s));
            }
        }
        for ((format, resident, model), cols) in built.iter().zip(&per_format) {
            print_row(format, *resident, model, cols);
        }
        return Ok(());
    }
    for format in &args.formats {
        let before = rss_bytes()?;
        let model = build(&cfg, format)?;
        let resident = rss_bytes()?.saturating_sub(before);
        let mut cols = Vec::new();
        for &b in &args.batch {
            let mut d = Decoder::new(&model, b, args.prompt_len, args.steps)?;
            for _ in 0..args.steps {
                d.step(&model)?;
            }
            cols.push((b, d.median()));
        }
        print_row(format, resident, &model, &cols);
        drop(model);
    }
    Ok(())
}
