//! The 4-bit linear layer's algorithms side by side, in one process: the fused kernel, the
//! fixed-point kernel (AVX-512 VNNI; the fused kernel where the CPU lacks it), the block path
//! (decoded blocks through the packed-panel GEMM), the int8 path (`x` rounded to bytes,
//! AVX-512 VNNI; the block path where the CPU lacks it), the int8 path on 8-bit weights
//! (groups of `--q8-group-size`) and, for reference, prepacked bf16
//! weights (what the model uses), best of `--reps` calls each, interleaved so that a slow
//! phase of a shared machine hits all of them alike.
//!
//! ```text
//! cargo run --release --example quant_paths -- --n 8192 --k 2048 --rows 16,24,32 --reps 21
//! ```

/// Large buffers (weights, KV cache) on transparent huge pages where Linux allows it.
#[global_allocator]
static ALLOC: flexgen::core::HugePageAlloc = flexgen::core::HugePageAlloc;

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use flexgen::core::{kernels, simd_level, DType, Matrix};
use flexgen::quant::{linear_packed_path, CompressionConfig, PackedPath, QuantizedTensor};

/// Time the 4-bit linear algorithms against prepacked bf16.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Output features.
    #[arg(long, default_value_t = 8192)]
    n: usize,
    /// Input features.
    #[arg(long, default_value_t = 2048)]
    k: usize,
    /// Rows of `x` to time.
    #[arg(long, value_delimiter = ',', default_value = "1,16,24,32,64,256")]
    rows: Vec<usize>,
    /// Group size of the 8-bit weights (the int8 q8 column).
    #[arg(long, default_value_t = 64)]
    q8_group_size: usize,
    /// Calls per algorithm (the best is reported).
    #[arg(long, default_value_t = 15)]
    reps: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (n, k) = (args.n, args.k);
    let values: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32) * 1e-3 - 0.5)
        .collect();
    let dense = Matrix::from_f32(n, k, values)?;
    let q4 = QuantizedTensor::from_matrix(&dense, CompressionConfig::WEIGHT_4BIT)?;
    let q8 = QuantizedTensor::from_matrix(
        &dense,
        CompressionConfig {
            group_size: args.q8_group_size,
            ..CompressionConfig::WEIGHT_8BIT
        },
    )?;
    let bf16 = dense.to_dtype(DType::BF16).prepack();
    let level = simd_level();
    println!(
        "| n x k | m | fused q4 | fixed-point q4 | block path q4 | int8 q4 | int8 q8 | bf16 prepacked |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &m in &args.rows {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 97) as f32 * 1e-2).collect();
        let mut y = vec![0f32; m * n];
        let mut best = [f64::MAX; 6];
        for _ in 0..args.reps {
            for (which, slot) in best.iter_mut().enumerate() {
                let t = Instant::now();
                match which {
                    0 => linear_packed_path(level, PackedPath::Fused, &x, m, &q4, None, &mut y)?,
                    1 => {
                        linear_packed_path(level, PackedPath::FixedPoint, &x, m, &q4, None, &mut y)?
                    }
                    2 => linear_packed_path(level, PackedPath::Blocks, &x, m, &q4, None, &mut y)?,
                    3 => linear_packed_path(level, PackedPath::Int8, &x, m, &q4, None, &mut y)?,
                    4 => linear_packed_path(level, PackedPath::Int8, &x, m, &q8, None, &mut y)?,
                    _ => kernels::linear_prepacked(&x, m, &bf16, None, &mut y)?,
                }
                *slot = slot.min(t.elapsed().as_secs_f64());
            }
        }
        let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "| {n} x {k} | {m} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            gflops(best[0]),
            gflops(best[1]),
            gflops(best[2]),
            gflops(best[3]),
            gflops(best[4]),
            gflops(best[5])
        );
    }
    println!("(GFLOP/s, best of {} calls each, {level})", args.reps);
    Ok(())
}
