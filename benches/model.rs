//! Criterion benches of the OPT model on dummy OPT-1.3B weights (bf16 unless
//! `FLEXGEN_BENCH_DTYPE` says `f32` or `f16`).
//!
//! - `decoder-layer/<case>`: one decoder layer (`flexgen_opt::layers::self_attention` then
//!   `mlp`) for decode at B = 1 and B = 32 against a 128-token cache, and a 128-token prefill
//!   at B = 1. Throughput in tokens.
//! - `decode-step/b<B>`: one generation step of the whole model (24 layers, logits of the
//!   last position) at B = 1 and B = 32 after a prefill of `FLEXGEN_BENCH_CONTEXT` tokens per
//!   sequence (default 128; the B = 32 prefill takes a minute on two cores). The cache is cut
//!   back after every step, so each step sees the same context. Throughput in tokens.
//!
//! `cargo bench --bench model` (filter as usual, e.g. `-- decode-step`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flexgen::core::DType;
use flexgen::opt::layers::{self, KvSlot, LayerScratch};
use flexgen::opt::{BatchState, LogitsFor, OptConfig, OptModel};

fn dtype() -> DType {
    std::env::var("FLEXGEN_BENCH_DTYPE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DType::BF16)
}

fn context() -> usize {
    std::env::var("FLEXGEN_BENCH_CONTEXT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128)
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(len: usize, mul: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * mul) % 2000) as f32 * 1e-3 - 1.0)
        .collect()
}

fn bench_layer(c: &mut Criterion) {
    let mut cfg = OptConfig::from_name("facebook/opt-1.3b").unwrap();
    cfg.num_hidden_layers = 1;
    let model = OptModel::dummy(cfg.clone(), dtype(), 7).unwrap();
    let lw = &model.weights().layers[0];
    let (attn, mlp) = (lw.attention(), lw.mlp());
    let hidden = cfg.hidden_size;
    let mut group = c.benchmark_group("decoder-layer");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(3));
    let ctx = 128;
    for (name, batch, q_len, kv_len) in [
        ("decode-b1-ctx128", 1usize, 1usize, ctx),
        ("decode-b32-ctx128", 32, 1, ctx),
        ("prefill-b1-len128", 1, ctx, 0),
    ] {
        let capacity = kv_len + q_len;
        let mut keys = values(batch * capacity * hidden, 11);
        let mut vals = values(batch * capacity * hidden, 23);
        let key_valid = vec![true; batch * capacity];
        let x0 = values(batch * q_len * hidden, 37);
        let mut x = x0.clone();
        let mut scratch = LayerScratch::default();
        group.throughput(Throughput::Elements((batch * q_len) as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                x.copy_from_slice(&x0);
                let kv = KvSlot {
                    keys: &mut keys,
                    values: &mut vals,
                    capacity,
                    kv_len,
                };
                layers::self_attention(&cfg, attn, &mut x, q_len, kv, &key_valid, &mut scratch)
                    .unwrap();
                layers::mlp(&cfg, mlp, &mut x, &mut scratch).unwrap();
            })
        });
    }
    group.finish();
}

fn bench_decode_step(c: &mut Criterion) {
    let cfg = OptConfig::from_name("facebook/opt-1.3b").unwrap();
    let model = OptModel::dummy(cfg.clone(), dtype(), 7).unwrap();
    let ctx = context();
    let mut group = c.benchmark_group("decode-step");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(5));
    for batch in [1usize, 32] {
        let mut state = BatchState::new(&cfg, batch, ctx + 1);
        let prompt: Vec<u32> = (0..batch * ctx)
            .map(|i| 3 + (i * 7919 % 50000) as u32)
            .collect();
        let mut logits = Vec::new();
        model
            .forward(
                &mut state,
                &prompt,
                &vec![true; prompt.len()],
                ctx,
                LogitsFor::Last,
                &mut logits,
            )
            .unwrap();
        let next: Vec<u32> = (0..batch).map(|b| 10 + b as u32).collect();
        let valid = vec![true; batch];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("b{batch}"), |b| {
            b.iter(|| {
                model
                    .forward(&mut state, &next, &valid, 1, LogitsFor::Last, &mut logits)
                    .unwrap();
                state.truncate(ctx);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_layer, bench_decode_step);
criterion_main!(benches);
