//! Criterion benches of the kernels at OPT layer shapes.
//!
//! `cargo bench --bench kernels` runs:
//! - `linear/<layer>/<dtype>/<m>`: `linear` at the OPT-1.3B shapes (`FLEXGEN_BENCH_LARGE=1`
//!   adds OPT-6.7B) for m = 1, 8, 32, 256 rows. Throughput is counted in "elements" of
//!   2·m·n·k per call, so criterion's Gelem/s reads as GFLOP/s; the weights' read rate is
//!   GFLOP/s × (bytes per weight) / (2 m) GB/s (printed per case at start).
//! - `linear-prepacked/<layer>/<dtype>/<m>`: the same with the weights prepacked once
//!   (`Matrix::prepack`, `kernels::linear_prepacked`).
//! - `linear-gemm-crate/<layer>/f32/256`: the `gemm` crate path on the same shapes, for
//!   reference.
//! - `attention-decode/b<B>/kv<L>`: one new token per sequence against `L` cached positions,
//!   OPT-1.3B heads (32 x 64); throughput in bytes of K and V read (GB/s).
//! - `attention-prefill/b<B>/len<L>`: a prompt of `L` tokens; throughput in FLOPs
//!   (4·B·heads·L²·head_dim / 2 for the causal half).
//!
//! Filter with criterion's usual argument, e.g. `cargo bench --bench kernels -- linear/1.3b-fc1`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flexgen::core::kernels::{self, AttentionShape, LinearPath};
use flexgen::core::{simd_level, DType, Matrix};

fn shapes() -> Vec<(&'static str, usize, usize)> {
    // (name, out = n, in = k) of the OPT-1.3B (and optionally 6.7B) linear layers.
    let mut s = vec![
        ("1.3b-qkvo", 2048, 2048),
        ("1.3b-fc1", 8192, 2048),
        ("1.3b-fc2", 2048, 8192),
    ];
    if std::env::var_os("FLEXGEN_BENCH_LARGE").is_some() {
        s.extend([
            ("6.7b-qkvo", 4096, 4096),
            ("6.7b-fc1", 16384, 4096),
            ("6.7b-fc2", 4096, 16384),
        ]);
    }
    s
}

/// Deterministic pseudo-random values in [-0.5, 0.5).
fn values(len: usize, mul: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * mul) % 1000) as f32 * 1e-3 - 0.5)
        .collect()
}

fn bench_linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (name, n, k) in shapes() {
        let base = Matrix::from_f32(n, k, values(n * k, 7919)).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = base.to_dtype(dtype);
            for m in [1usize, 8, 32, 256] {
                let x = values(m * k, 31);
                let mut y = vec![0f32; m * n];
                eprintln!(
                    "linear/{name}/{dtype}/{m}: {:.1} MB of weights, {:.3} GFLOP per call",
                    w.nbytes() as f64 / 1e6,
                    (2 * m * n * k) as f64 / 1e9
                );
                group.throughput(Throughput::Elements((2 * m * n * k) as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{dtype}"), m),
                    &m,
                    |b, &m| b.iter(|| kernels::linear(&x, m, &w, None, &mut y).unwrap()),
                );
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("linear-prepacked");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (name, n, k) in shapes() {
        let base = Matrix::from_f32(n, k, values(n * k, 7919)).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = base.to_dtype(dtype).prepack();
            for m in [1usize, 8, 32, 256] {
                let x = values(m * k, 31);
                let mut y = vec![0f32; m * n];
                group.throughput(Throughput::Elements((2 * m * n * k) as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{dtype}"), m),
                    &m,
                    |b, &m| b.iter(|| kernels::linear_prepacked(&x, m, &w, None, &mut y).unwrap()),
                );
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("linear-gemm-crate");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    let m = 256;
    for (name, n, k) in shapes() {
        let w = Matrix::from_f32(n, k, values(n * k, 7919)).unwrap();
        let x = values(m * k, 31);
        let mut y = vec![0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_with_input(BenchmarkId::new(format!("{name}/f32"), m), &m, |b, &m| {
            b.iter(|| {
                kernels::linear_with_path(simd_level(), LinearPath::Gemm, &x, m, &w, None, &mut y)
                    .unwrap()
            })
        });
    }
    group.finish();
}

/// OPT-1.3B attention: 32 heads of 64.
fn attention_shape(batch: usize, q_len: usize, kv_len: usize) -> AttentionShape {
    AttentionShape {
        batch,
        n_heads: 32,
        head_dim: 64,
        q_len,
        kv_len,
        kv_capacity: kv_len,
    }
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention-decode");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(300));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (batch, kv_len) in [(1usize, 160usize), (1, 1024), (32, 160), (32, 1024)] {
        let s = attention_shape(batch, 1, kv_len);
        let hidden = s.hidden();
        let q = values(batch * hidden, 37);
        let k = values(batch * kv_len * hidden, 11);
        let v = values(batch * kv_len * hidden, 23);
        let valid = vec![true; batch * kv_len];
        let mut out = vec![0f32; batch * hidden];
        group.throughput(Throughput::Bytes((2 * k.len() * 4) as u64));
        group.bench_function(format!("b{batch}/kv{kv_len}"), |b| {
            b.iter(|| kernels::attention_decode(&q, &k, &v, &valid, &s, 0.125, &mut out).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("attention-prefill");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(300));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (batch, len) in [(1usize, 128usize), (1, 512), (8, 128)] {
        let s = attention_shape(batch, len, len);
        let hidden = s.hidden();
        let q = values(batch * len * hidden, 37);
        let k = values(batch * len * hidden, 11);
        let v = values(batch * len * hidden, 23);
        let valid = vec![true; batch * len];
        let mut out = vec![0f32; q.len()];
        // Two products (QKᵀ and PV) of 2·len²·head_dim FLOPs per head, causal half.
        let flops = 2 * batch * s.n_heads * len * len * s.head_dim;
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(format!("b{batch}/len{len}"), |b| {
            b.iter(|| kernels::attention_prefill(&q, &k, &v, &valid, &s, 0.125, &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_linear, bench_attention);
criterion_main!(benches);
