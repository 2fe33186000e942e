//! Criterion benches of the packed (group-wise quantized) kernels against dense weights.
//!
//! `cargo bench --bench quant` runs 4-bit and 8-bit packed linear layers against `bf16` and
//! `f32` at the OPT-1.3B shapes for m = 1, 8, 32, 256 (`FLEXGEN_BENCH_LARGE=1` adds OPT-6.7B
//! shapes), plus decode attention over a 4-bit KV cache against the dense `f32` cache.
//! Throughput is counted as 2·m·n·k "elements" per call, so Gelem/s reads as GFLOP/s. Memory per
//! parameter of each format is printed once at start.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flexgen::core::kernels::{self, AttentionShape};
use flexgen::core::{DType, Matrix};
use flexgen::quant::{
    attention_packed, fixed_point_supported, int8_supported, linear_packed, linear_packed_path,
    CompressionConfig, PackedKvCache, PackedPath, QuantizedTensor, BLOCKS_MIN_M, FUSED_MAX_M,
};

fn shapes() -> Vec<(&'static str, usize, usize)> {
    // (name, out = n, in = k) of the OPT-1.3B (and optionally 6.7B) linear layers.
    let mut s = vec![
        ("1.3b-qkvo", 2048, 2048),
        ("1.3b-fc1", 8192, 2048),
        ("1.3b-fc2", 2048, 8192),
    ];
    if std::env::var_os("FLEXGEN_BENCH_LARGE").is_some() {
        s.extend([("6.7b-qkvo", 4096, 4096), ("6.7b-fc1", 16384, 4096)]);
    }
    s
}

fn weights(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect()
}

fn print_memory_per_parameter() {
    let (n, k) = (2048, 2048);
    let base = Matrix::from_f32(n, k, weights(n, k)).unwrap();
    let params = (n * k) as f64;
    for dt in [DType::F32, DType::F16, DType::BF16] {
        eprintln!(
            "memory per parameter: {dt}: {:.3} bytes",
            base.to_dtype(dt).nbytes() as f64 / params
        );
    }
    for cfg in [
        CompressionConfig::WEIGHT_4BIT,
        CompressionConfig::WEIGHT_8BIT,
    ] {
        let q = QuantizedTensor::from_matrix(&base, cfg).unwrap();
        eprintln!(
            "memory per parameter: {cfg}: {:.4} bytes ({:.3}x f16)",
            q.nbytes() as f64 / params,
            q.nbytes() as f64 / (2.0 * params)
        );
    }
}

fn bench_linear(c: &mut Criterion) {
    print_memory_per_parameter();
    let mut group = c.benchmark_group("quant_linear");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(300));
    group.measurement_time(std::time::Duration::from_secs(1));
    for (name, n, k) in shapes() {
        let base = Matrix::from_f32(n, k, weights(n, k)).unwrap();
        let q4 = QuantizedTensor::from_matrix(&base, CompressionConfig::WEIGHT_4BIT).unwrap();
        let q8 = QuantizedTensor::from_matrix(&base, CompressionConfig::WEIGHT_8BIT).unwrap();
        let f32w = base.to_dtype(DType::F32);
        let bf16w = base.to_dtype(DType::BF16);
        for m in [1usize, 8, 16, 32, 64, 256] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 97) as f32 * 1e-2).collect();
            let mut y = vec![0f32; m * n];
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            for (label, q) in [("q4", &q4), ("q8", &q8)] {
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{label}"), m),
                    &m,
                    |b, &m| b.iter(|| linear_packed(&x, m, q, None, &mut y).unwrap()),
                );
            }
            let level = flexgen::core::simd_level();
            // The float kernel where the default is the fixed-point one (AVX-512 VNNI, below
            // the block path) or the block path (the crossover).
            let fixed_default = m < BLOCKS_MIN_M && fixed_point_supported(level, &q4);
            if fixed_default || (BLOCKS_MIN_M..=FUSED_MAX_M).contains(&m) {
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/q4-fused"), m),
                    &m,
                    |b, &m| {
                        b.iter(|| {
                            linear_packed_path(level, PackedPath::Fused, &x, m, &q4, None, &mut y)
                                .unwrap()
                        })
                    },
                );
            }
            // The int8 path (opt-in: `--int8-activations`) where the default is the block path.
            if m >= BLOCKS_MIN_M && int8_supported(level, &q4) {
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/q4-int8"), m),
                    &m,
                    |b, &m| {
                        b.iter(|| {
                            linear_packed_path(level, PackedPath::Int8, &x, m, &q4, None, &mut y)
                                .unwrap()
                        })
                    },
                );
            }
            for (label, w) in [("bf16", &bf16w), ("f32", &f32w)] {
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{label}"), m),
                    &m,
                    |b, &m| b.iter(|| kernels::linear(&x, m, w, None, &mut y).unwrap()),
                );
            }
        }
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("quant_attention_decode");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(300));
    group.measurement_time(std::time::Duration::from_secs(1));
    // OPT-1.3B: 32 heads of 64; one decode step at 512 cached tokens.
    let (heads, hd, kv_len) = (32usize, 64usize, 512usize);
    let hidden = heads * hd;
    for batch in [1usize, 8] {
        let kv: Vec<f32> = (0..batch * kv_len * hidden)
            .map(|i| ((i * 7919) % 1000) as f32 * 2e-3 - 1.0)
            .collect();
        let mut cache =
            PackedKvCache::new(CompressionConfig::FLEXGEN_CACHE, batch, heads, hd, kv_len).unwrap();
        // Stored one position at a time, as decoding does.
        for t in 0..kv_len {
            let rows: Vec<f32> = (0..batch)
                .flat_map(|b| {
                    kv[(b * kv_len + t) * hidden..(b * kv_len + t + 1) * hidden]
                        .iter()
                        .copied()
                })
                .collect();
            cache.store(t, &rows, &rows, 1).unwrap();
        }
        let q: Vec<f32> = (0..batch * hidden)
            .map(|i| (i as f32 * 0.01).sin())
            .collect();
        let valid = vec![true; batch * kv_len];
        let shape = AttentionShape {
            batch,
            n_heads: heads,
            head_dim: hd,
            q_len: 1,
            kv_len,
            kv_capacity: kv_len,
        };
        let mut out = vec![0f32; batch * hidden];
        group.bench_with_input(BenchmarkId::new("packed-4bit", batch), &batch, |b, _| {
            b.iter(|| attention_packed(&q, &cache, &valid, &shape, 0.125, &mut out).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("dense-f32", batch), &batch, |b, _| {
            b.iter(|| kernels::attention(&q, &kv, &kv, &valid, &shape, 0.125, &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_linear, bench_attention);
criterion_main!(benches);
