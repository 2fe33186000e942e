//! The runtime against a direct in-memory run of a small model-agnostic toy: an input table, a
//! few layers with a KV cache (causal running mean of projected values), and an output table
//! whose argmax feeds the next step. Every policy (placement, block shape, overlap,
//! compression) must give bit-identical tokens, since each row's arithmetic is the same.

use flexgen_core::{kernels, DType, Matrix};
use flexgen_offload::{
    check_block, BlockModel, BlockShape, Budgets, CacheSpec, CacheView, DynError, Elem, LayerSpec,
    OffloadOptions, PlaneSpec, Policy, Runtime, Step, Tensor, Tier, WeightSource, WeightSpec,
};
use flexgen_quant::{linear_packed, QuantizedTensor};
use proptest::prelude::*;

const H: usize = 64;
const VOCAB: usize = 32;

struct Toy {
    layers: Vec<LayerSpec>,
}

impl Toy {
    fn new(mix_layers: usize, dtype: DType) -> Self {
        let mut layers = vec![LayerSpec {
            name: "input".into(),
            groups: vec![vec![
                WeightSpec::matrix("embed", VOCAB, H, dtype),
                WeightSpec::vector("embed_bias", H),
            ]],
            cache: None,
        }];
        for l in 0..mix_layers {
            layers.push(LayerSpec {
                name: format!("mix {l}"),
                groups: vec![
                    vec![
                        WeightSpec::matrix(format!("w{l}"), H, H, dtype),
                        WeightSpec::vector(format!("b{l}"), H),
                    ],
                    vec![WeightSpec::matrix(format!("u{l}"), H, H, dtype)],
                ],
                cache: Some(CacheSpec {
                    planes: vec![PlaneSpec {
                        elem: Elem::F32,
                        per_token: H,
                    }],
                }),
            });
        }
        layers.push(LayerSpec {
            name: "output".into(),
            groups: vec![vec![WeightSpec::matrix("out", VOCAB, H, dtype)]],
            cache: None,
        });
        Toy { layers }
    }
}

struct Source;

fn value(name: &str, i: usize) -> f32 {
    let seed = name
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    let x = (seed.wrapping_add(i as u64 * 2654435761)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
}

impl WeightSource for Source {
    fn load(&self, spec: &WeightSpec) -> Result<Tensor, DynError> {
        Ok(match spec.kind {
            flexgen_offload::TensorKind::Matrix { rows, cols, dtype } => {
                let v: Vec<f32> = (0..rows * cols).map(|i| value(&spec.name, i)).collect();
                Tensor::Dense(Matrix::from_f32(rows, cols, v)?.to_dtype(dtype))
            }
            flexgen_offload::TensorKind::Vector { len } => {
                Tensor::Vector((0..len).map(|i| value(&spec.name, i)).collect())
            }
        })
    }
}

struct Batch {
    /// Input tokens of the current step, `[rows, q_len]`.
    tokens: Vec<u32>,
    x: Vec<f32>,
    next: Vec<u32>,
    out: Vec<Vec<u32>>,
}

fn apply(w: &Tensor, x: &[f32], rows: usize, out: &mut [f32]) -> Result<(), DynError> {
    match w {
        Tensor::Dense(m) => kernels::linear(x, rows, m, None, out)?,
        Tensor::Packed(q) => linear_packed(x, rows, q, None, out)?,
        other => return Err(format!("expected a matrix, got {}", other.describe()).into()),
    }
    Ok(())
}

impl BlockModel for Toy {
    type Batch = Batch;

    fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    fn rows(&self, b: &Batch) -> usize {
        b.next.len()
    }

    fn forward(
        &self,
        step: &Step,
        w: &mut [Tensor],
        cache: Option<CacheView<'_>>,
        b: &mut Batch,
    ) -> Result<(), DynError> {
        let rows = b.next.len();
        let n = rows * step.q_len;
        if step.layer == 0 {
            let Tensor::Vector(bias) = &w[1] else {
                return Err("bias".into());
            };
            b.x.resize(n * H, 0.0);
            if let Some(t) = b.tokens.iter().find(|&&t| t as usize >= VOCAB) {
                return Err(format!("token {t} out of range").into());
            }
            let embed = match &w[0] {
                Tensor::Dense(m) => m.to_f32_vec(),
                Tensor::Packed(q) => q.decompress(),
                _ => return Err("embed".into()),
            };
            for r in 0..n {
                let t = b.tokens[r] as usize;
                for c in 0..H {
                    b.x[r * H + c] = embed[t * H + c] + bias[c];
                }
            }
            return Ok(());
        }
        if step.layer + 1 == self.layers.len() {
            let mut last = vec![0.0f32; rows * H];
            for r in 0..rows {
                let src = (r * step.q_len + step.q_len - 1) * H;
                last[r * H..(r + 1) * H].copy_from_slice(&b.x[src..src + H]);
            }
            let mut logits = vec![0.0f32; rows * VOCAB];
            apply(&w[0], &last, rows, &mut logits)?;
            for r in 0..rows {
                b.next[r] = kernels::argmax(&logits[r * VOCAB..(r + 1) * VOCAB])
                    .ok_or("empty logits")? as u32;
            }
            return Ok(());
        }
        let cache = cache.ok_or("mix layer without cache")?;
        let Tensor::Vector(bias) = &w[1] else {
            return Err("bias".into());
        };
        let mut y = vec![0.0f32; n * H];
        apply(&w[0], &b.x, n, &mut y)?;
        let kv = cache.planes[0].as_f32_mut()?;
        for r in 0..rows {
            for t in 0..step.q_len {
                let pos = step.kv_len + t;
                let dst = (r * cache.capacity + pos) * H;
                for c in 0..H {
                    kv[dst + c] = y[(r * step.q_len + t) * H + c] + bias[c];
                }
                for c in 0..H {
                    let mut s = 0.0f32;
                    for p in 0..=pos {
                        s += kv[(r * cache.capacity + p) * H + c];
                    }
                    b.x[(r * step.q_len + t) * H + c] += s / (pos + 1) as f32;
                }
            }
        }
        let mut z = vec![0.0f32; n * H];
        apply(&w[2], &b.x, n, &mut z)?;
        for (x, z) in b.x.iter_mut().zip(&z) {
            *x = (*x + z.tanh()) * 0.5;
        }
        Ok(())
    }

    fn activation<'a>(&self, b: &'a mut Batch) -> &'a mut Vec<f32> {
        &mut b.x
    }

    fn activation_bytes(&self, rows: usize, q_len: usize) -> u64 {
        (rows * q_len * H * 4) as u64
    }
}

fn prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|r| {
            (0..len)
                .map(|t| ((r * 7 + t * 3 + 1) % VOCAB) as u32)
                .collect()
        })
        .collect()
}

fn new_batch(rows: &[Vec<u32>]) -> Batch {
    Batch {
        tokens: rows.iter().flatten().copied().collect(),
        x: Vec::new(),
        next: vec![0; rows.len()],
        out: vec![Vec::new(); rows.len()],
    }
}

fn between(batches: &mut [Batch]) {
    for b in batches {
        for (r, &t) in b.next.iter().enumerate() {
            b.out[r].push(t);
        }
        b.tokens = b.next.clone();
    }
}

/// Direct run: every weight in memory (compressed the same way when asked), one batch, a
/// plain cache.
fn reference(toy: &Toy, prompts: &[Vec<u32>], gen: usize, compress: bool) -> Vec<Vec<u32>> {
    let policy = Policy::default();
    let mut weights: Vec<Vec<Tensor>> = toy
        .layers
        .iter()
        .map(|l| {
            l.weights()
                .map(|s| match Source.load(s).unwrap() {
                    Tensor::Dense(m) if compress => Tensor::Packed(
                        QuantizedTensor::from_matrix(&m, policy.comp_weight_config).unwrap(),
                    ),
                    t => t,
                })
                .collect()
        })
        .collect();
    let p = prompts[0].len();
    let cap = p + gen - 1;
    let mut caches: Vec<Vec<flexgen_offload::PlaneBuf>> = toy
        .layers
        .iter()
        .map(|_| {
            vec![flexgen_offload::PlaneBuf::zeros(
                Elem::F32,
                prompts.len() * cap * H,
            )]
        })
        .collect();
    let mut b = [new_batch(prompts)];
    for i in 0..gen {
        for (j, l) in toy.layers.iter().enumerate() {
            let step = Step {
                token: i,
                layer: j,
                micro_batch: 0,
                q_len: if i == 0 { p } else { 1 },
                kv_len: if i == 0 { 0 } else { p + i - 1 },
                capacity: cap,
            };
            let view = l.cache.as_ref().map(|_| CacheView {
                planes: &mut caches[j],
                seqs: prompts.len(),
                capacity: cap,
                kv_len: step.kv_len,
            });
            toy.forward(&step, &mut weights[j], view, &mut b[0])
                .unwrap();
        }
        between(&mut b);
    }
    b[0].out.clone()
}

type RunResult = (
    Vec<Vec<u32>>,
    Runtime,
    flexgen_offload::BlockStats,
    tempfile::TempDir,
);

fn run(toy: &Toy, policy: &Policy, prompts: &[Vec<u32>], gen: usize) -> RunResult {
    let dir = tempfile::tempdir().unwrap();
    let options = OffloadOptions {
        offload_dir: dir.path().to_path_buf(),
        direct_io: true,
        io_threads: 3,
        budgets: Budgets::unlimited(),
        planned_block: None,
    };
    let mut rt = Runtime::new(&toy.layers, &Source, policy, &options, &mut |_, _| {}).unwrap();
    let mut batches: Vec<Batch> = prompts
        .chunks(policy.gpu_batch_size)
        .map(new_batch)
        .collect();
    let stats = rt
        .run_block(toy, &mut batches, prompts[0].len(), gen, |_, b| {
            between(b);
            Ok(true)
        })
        .unwrap();
    let out = batches.into_iter().flat_map(|b| b.out).collect();
    (out, rt, stats, dir)
}

fn percent() -> impl Strategy<Value = [f64; 6]> {
    let pair = || {
        (0u32..=100, 0u32..=100).prop_map(|(a, b)| {
            let b = b.min(100 - a);
            (a as f64, b as f64)
        })
    };
    (pair(), pair(), 0usize..3).prop_map(|((wg, wc), (cg, cc), act)| {
        let (hg, hc) = [(100.0, 0.0), (0.0, 100.0), (0.0, 0.0)][act];
        [wg, wc, cg, cc, hg, hc]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_policy_matches_the_direct_run(
        percent in percent(),
        gbs in 1usize..4,
        ngb in 1usize..4,
        overlap in any::<bool>(),
        compress in any::<bool>(),
        f16 in any::<bool>(),
        mix in 1usize..4,
        prompt_len in 1usize..5,
        gen in 1usize..5,
    ) {
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        let toy = Toy::new(mix, dtype);
        let n = gbs * ngb;
        let ps = prompts(n, prompt_len);
        let policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            overlap,
            compress_weight: compress,
            ..Policy::default()
        }
        .with_percent(percent);
        let expect = reference(&toy, &ps, gen, compress);
        let (got, rt, stats, _dir) = run(&toy, &policy, &ps, gen);
        prop_assert_eq!(&got, &expect);
        prop_assert_eq!(stats.tokens, gen);
        // Disk-homed weights are read once per token per block.
        let disk_bytes = rt.weight_plan().home_bytes[Tier::Disk as usize];
        prop_assert!(stats.io.read_bytes >= disk_bytes * gen as u64);
    }
}

#[test]
fn weights_on_disk_stay_off_the_ram_tiers_and_files_go_away() {
    let toy = Toy::new(3, DType::F16);
    let ps = prompts(4, 3);
    let all_ram = Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        ..Policy::default()
    };
    let disk = all_ram.clone().with_percent([0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let (a, rt_a, sa, _da) = run(&toy, &all_ram, &ps, 4);
    let (b, rt_b, sb, _db) = run(&toy, &disk, &ps, 4);
    assert_eq!(a, b);
    assert_eq!(sa.io.read_bytes, 0);
    assert!(sb.io.read_bytes > 0 && sb.io.write_bytes > 0);
    // Vectors stay on compute; the three matrices of a mix layer are fetched into buffers for
    // at most two layers at a time.
    let plan = rt_b.weight_plan();
    assert!(plan.home_bytes[Tier::Compute as usize] < plan.home_bytes[Tier::Disk as usize] / 10);
    assert!(sb.peak_bytes[Tier::Compute as usize] < sa.peak_bytes[Tier::Compute as usize]);
    assert!(sb.peak_bytes[Tier::Disk as usize] > 0);
    let dir = rt_b.offload_dir().to_path_buf();
    assert!(dir.join("weights.bin").exists());
    // The block's cache and activation files are gone after the block (the directory's
    // ownership lock stays with it).
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("weights.bin")]);
    drop(rt_b);
    assert!(!dir.exists());
    drop(rt_a);
}

/// A block's RAM-homed KV cache is kept for the next block of the same shape and reused
/// (zeroed): an early-stopped block, then full ones, give the reference's tokens each time; a
/// block of another shape frees what it cannot use. Also with part of the cache on disk.
#[test]
fn repeated_blocks_reuse_the_cache_and_match_the_reference() {
    let toy = Toy::new(3, DType::F32);
    let ps = prompts(4, 3);
    let want = reference(&toy, &ps, 4, false);
    let want_short = reference(&toy, &ps, 2, false);
    for percent in [
        [100.0, 0.0, 100.0, 0.0, 100.0, 0.0],
        [100.0, 0.0, 0.0, 50.0, 100.0, 0.0],
    ] {
        let policy = Policy {
            gpu_batch_size: 2,
            num_gpu_batches: 2,
            ..Policy::default()
        }
        .with_percent(percent);
        let (out, mut rt, _, _dir) = run(&toy, &policy, &ps, 4);
        assert_eq!(out, want, "{percent:?}");
        let kept = rt.spare_cache_bytes();
        assert!(kept > 0, "{percent:?}: nothing kept");
        let block = |rt: &mut Runtime, gen: usize, stop_after: usize| {
            let mut batches: Vec<Batch> = ps.chunks(2).map(new_batch).collect();
            rt.run_block(&toy, &mut batches, 3, gen, |i, b| {
                between(b);
                Ok(i + 1 < stop_after)
            })
            .unwrap();
            batches.into_iter().flat_map(|b| b.out).collect::<Vec<_>>()
        };
        let first = block(&mut rt, 4, 1);
        assert!(first.iter().zip(&want).all(|(a, b)| a[..] == b[..1]));
        assert_eq!(rt.spare_cache_bytes(), kept);
        for _ in 0..2 {
            assert_eq!(block(&mut rt, 4, 4), want, "{percent:?}: repeated block");
            assert_eq!(rt.spare_cache_bytes(), kept);
        }
        // Another shape (capacity 4 instead of 6): correct, and only its own cache is kept.
        assert_eq!(
            block(&mut rt, 2, 2),
            want_short,
            "{percent:?}: shorter block"
        );
        assert_eq!(rt.spare_cache_bytes(), kept / 6 * 4);
    }
}

#[test]
fn early_stop_and_bad_blocks() {
    let toy = Toy::new(2, DType::F32);
    let ps = prompts(2, 2);
    let dir = tempfile::tempdir().unwrap();
    let options = OffloadOptions {
        offload_dir: dir.path().to_path_buf(),
        budgets: Budgets::unlimited(),
        ..OffloadOptions::default()
    };
    let policy = Policy {
        gpu_batch_size: 2,
        ..Policy::default()
    }
    .with_percent([0.0, 50.0, 0.0, 0.0, 0.0, 100.0]);
    let mut rt = Runtime::new(&toy.layers, &Source, &policy, &options, &mut |_, _| {}).unwrap();
    let mut batches = vec![new_batch(&ps)];
    let stats = rt
        .run_block(&toy, &mut batches, 2, 10, |i, b| {
            between(b);
            Ok(i < 2)
        })
        .unwrap();
    assert_eq!(stats.tokens, 3);
    assert_eq!(batches[0].out[0].len(), 3);
    // Too many micro-batches, too large a micro-batch, an empty block.
    let mut two = vec![new_batch(&ps[..1]), new_batch(&ps[1..])];
    let e = rt
        .run_block(&toy, &mut two, 2, 2, |_, _| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--num-gpu-batches"), "{e}");
    let mut big = vec![new_batch(&prompts(3, 2))];
    let e = rt
        .run_block(&toy, &mut big, 2, 2, |_, _| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--gpu-batch-size"), "{e}");
    let e = rt
        .run_block(&toy, &mut [], 2, 2, |_, _| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("micro-batches"), "{e}");
    // A model error names the layer.
    let mut bad = vec![new_batch(&ps)];
    bad[0].tokens[0] = VOCAB as u32 + 5;
    let e = rt
        .run_block(&toy, &mut bad, 2, 2, |_, _| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 0 (input)") && e.contains("token 37 out of range"),
        "{e}"
    );
    // The runtime still works after an error.
    let mut again = vec![new_batch(&ps)];
    rt.run_block(&toy, &mut again, 2, 3, |_, b| {
        between(b);
        Ok(true)
    })
    .unwrap();
    assert_eq!(again[0].out[0].len(), 3);
}

#[test]
fn budgets_reject_before_any_work() {
    let toy = Toy::new(2, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let tight = Budgets {
        compute: 10_000,
        host: u64::MAX,
        ram: u64::MAX,
        disk: u64::MAX,
    };
    let options = OffloadOptions {
        offload_dir: dir.path().to_path_buf(),
        budgets: tight,
        ..OffloadOptions::default()
    };
    let e = Runtime::new(
        &toy.layers,
        &Source,
        &Policy::default(),
        &options,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("compute tier") && e.contains("budget"), "{e}");
    // Nothing was created in the offload dir.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Weights on disk fit; a large block's cache on compute does not.
    let policy = Policy {
        gpu_batch_size: 64,
        ..Policy::default()
    }
    .with_percent([0.0, 0.0, 100.0, 0.0, 100.0, 0.0]);
    let options = OffloadOptions {
        budgets: Budgets {
            compute: 200_000,
            ..tight
        },
        ..options
    };
    let mut rt = Runtime::new(&toy.layers, &Source, &policy, &options, &mut |_, _| {}).unwrap();
    let mut batches = vec![new_batch(&prompts(64, 8))];
    let e = rt
        .run_block(&toy, &mut batches, 8, 64, |_, _| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("a block of 64 sequences"), "{e}");
    assert!(batches[0].out[0].is_empty());
    // The same check without a runtime, as a loader runs it before reading any weight.
    let shape = BlockShape {
        sequences: 64,
        prompt_len: 8,
        gen_len: 64,
    };
    let planned = check_block(&toy, &policy, &options.budgets, shape)
        .unwrap_err()
        .to_string();
    assert_eq!(planned, e);
    let one = Policy {
        gpu_batch_size: 1,
        ..policy.clone()
    };
    check_block(&toy, &one, &options.budgets, shape).unwrap();
    // The same policy takes a block of only the sequences a caller has.
    let few = BlockShape {
        sequences: 1,
        ..shape
    };
    check_block(&toy, &policy, &options.budgets, few).unwrap();
}
