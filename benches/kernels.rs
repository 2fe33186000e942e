//! Criterion benches of the kernels at OPT layer shapes.
//!
//! `cargo bench --bench kernels` runs the OPT-1.3B shapes; `FLEXGEN_BENCH_LARGE=1` adds
//! OPT-6.7B shapes. Throughput is counted in "elements" of 2·m·n·k per call, i.e. one element
//! per FLOP, so criterion's Gelem/s reads directly as GFLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flexgen::core::kernels;
use flexgen::core::{DType, Matrix};

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

fn bench_linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (name, n, k) in shapes() {
        let w32: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let base = Matrix::from_f32(n, k, w32).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = base.to_dtype(dtype);
            for m in [1usize, 8, 32, 256] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 97) as f32 * 1e-2).collect();
                let mut y = vec![0f32; m * n];
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
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);
