//! The offloaded model against the all-in-memory one: for any valid policy (placement
//! percentages, block shape, overlap, sep_layer, weight compression), generated tokens are the
//! same on every fixture checkpoint, greedy and sampled, over several blocks.

mod common;

use flexgen_core::DType;
use flexgen_offload::{BlockShape, Budgets, OffloadOptions, Policy};
use flexgen_opt::offloaded::OffloadedOpt;
use flexgen_opt::{
    generate, generate_rows, Error, Flow, GenerationConfig, LoadOptions, OptConfig, OptModel,
};
use proptest::prelude::*;

fn options(dir: &tempfile::TempDir) -> OffloadOptions {
    OffloadOptions {
        offload_dir: dir.path().to_path_buf(),
        direct_io: true,
        io_threads: 2,
        budgets: Budgets::unlimited(),
        planned_block: None,
    }
}

fn prompts(n: usize, seed: u64, max_len: usize) -> Vec<Vec<u32>> {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = 1 + next() % max_len;
            std::iter::once(2)
                .chain((1..len).map(|_| 4 + (next() % 50000) as u32))
                .collect()
        })
        .collect()
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

// With bf16 weights on AVX512_BF16, `linear` used to round `x` to bf16 only for products of
// 16 rows or more. The offloaded block pads every micro-batch to the block's longest prompt,
// the in-memory reference each micro-batch to its own, so a layer could see 12 rows in one
// and 18 in the other, and a sampled token of the bf16 fixture differed (a drawn case, kept
// in offload_equivalence.proptest-regressions). Every row count now rounds alike (see
// `flexgen_core::kernels::bf16_dot_enabled`), so these tests run the default arithmetic.

fn ids(outs: &[flexgen_opt::GenerationOutput]) -> Vec<Vec<u32>> {
    outs.iter().map(|o| o.token_ids.clone()).collect()
}

/// The all-in-memory run of the offloaded schedule's micro-batches: rows `gbs` at a time, in
/// order, row `i` sampling with seed `cfg.seed + i` ([`GenerationConfig::per_row`]) as
/// [`generate`] seeds it.
///
/// A float result depends on how many rows a linear layer multiplies at once (one row takes
/// the GEMV path, which sums along the input in SIMD lanes; more take the tiled GEMM, which sums
/// in input order), so one row's logits can differ in the last bits between a batch of six and
/// a micro-batch of one. Greedy decoding rarely notices; sampling from the tiny fixtures'
/// near-flat distributions can. Same micro-batches, same sums: then the tokens must be equal.
fn in_memory_micro_batches(
    model: &OptModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    gbs: usize,
) -> Vec<flexgen_opt::GenerationOutput> {
    let cfgs = cfg.per_row(prompts.len());
    prompts
        .chunks(gbs)
        .zip(cfgs.chunks(gbs))
        .flat_map(|(p, c)| generate_rows(model, p, c, None, |_| Flow::Continue).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn offloaded_tokens_equal_in_memory_tokens(
        fixture in 0usize..4,
        percent in percent(),
        gbs in 1usize..4,
        ngb in 1usize..3,
        n in 1usize..9,
        overlap in any::<bool>(),
        sep_layer in any::<bool>(),
        compress in any::<bool>(),
        sampled in any::<bool>(),
        gen in 1usize..6,
        seed in any::<u64>(),
    ) {
        let dir = common::fixture(common::FIXTURES[fixture]);
        let policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            overlap,
            sep_layer,
            compress_weight: compress,
            ..Policy::default()
        }
        .with_percent(percent);
        let load = LoadOptions {
            compress_weight: compress.then_some(policy.comp_weight_config),
            ..LoadOptions::default()
        };
        let reference = OptModel::load(&dir, &load).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let model = OffloadedOpt::load(&dir, None, &policy, &options(&tmp), &mut |_, _| {}).unwrap();
        let ps = prompts(n, seed, 6);
        let mut cfg = GenerationConfig::greedy(gen).with_seed(seed);
        if sampled {
            cfg = cfg.with_temperature(0.9).with_top_k(50);
        }
        let expect = in_memory_micro_batches(&reference, &ps, &cfg, gbs);
        let mut streamed = 0;
        let got = model
            .generate(&ps, &cfg, None, |_| {
                streamed += 1;
                Flow::Continue
            })
            .unwrap();
        prop_assert_eq!(ids(&got), ids(&expect));
        prop_assert_eq!(
            got.iter().map(|o| o.finish_reason).collect::<Vec<_>>(),
            expect.iter().map(|o| o.finish_reason).collect::<Vec<_>>()
        );
        prop_assert_eq!(streamed, got.iter().map(|o| o.token_ids.len()).sum::<usize>());
        // One block per gbs x ngb prompts.
        let blocks = model.take_stats();
        prop_assert_eq!(blocks.len(), n.div_ceil(gbs * ngb));
    }
}

#[test]
fn dummy_weights_match_the_in_memory_dummy_model() {
    let cfg =
        OptConfig::from_file(common::fixture("tiny-postln-proj").join("config.json")).unwrap();
    let reference = OptModel::dummy(cfg.clone(), DType::F16, 3).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        ..Policy::default()
    }
    .with_percent([0.0, 30.0, 0.0, 50.0, 0.0, 0.0]);
    let model =
        OffloadedOpt::dummy(cfg, DType::F16, 3, &policy, &options(&tmp), &mut |_, _| {}).unwrap();
    let ps = prompts(4, 9, 5);
    let cfg = GenerationConfig::greedy(4);
    let expect = generate(&reference, &ps, &cfg, None, |_| Flow::Continue).unwrap();
    let got = model.generate(&ps, &cfg, None, |_| Flow::Continue).unwrap();
    assert_eq!(ids(&got), ids(&expect));
    let stats = model.take_stats();
    assert_eq!(stats.len(), 1);
    assert!(stats[0].io.read_bytes > 0 && stats[0].io.write_bytes > 0);
}

#[test]
fn bad_policies_and_requests_are_typed_errors() {
    let dir = common::fixture("tiny-preln-f32");
    let tmp = tempfile::tempdir().unwrap();
    let bad = Policy::default().with_percent([70.0, 40.0, 100.0, 0.0, 100.0, 0.0]);
    let e = OffloadedOpt::load(&dir, None, &bad, &options(&tmp), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Offload(_)), "{e}");
    assert!(e.to_string().contains("--percent wg+wc"), "{e}");
    let tight = OffloadOptions {
        budgets: Budgets {
            compute: 1 << 20,
            host: u64::MAX,
            ram: u64::MAX,
            disk: u64::MAX,
        },
        ..options(&tmp)
    };
    let e = OffloadedOpt::load(&dir, None, &Policy::default(), &tight, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("compute tier"), "{e}");
    // A planned block whose KV cache cannot fit is refused before any weight is read (the
    // weights alone fit this budget); the same budget takes a block of one short sequence.
    let weights_fit = OffloadOptions {
        budgets: Budgets {
            compute: 8 << 20,
            ..Budgets::unlimited()
        },
        ..options(&tmp)
    };
    let big_block = Policy {
        gpu_batch_size: 64,
        num_gpu_batches: 4,
        ..Policy::default()
    };
    let planned = |prompt_len, gen_len| OffloadOptions {
        planned_block: Some(BlockShape {
            sequences: 256,
            prompt_len,
            gen_len,
        }),
        ..weights_fit.clone()
    };
    let mut weights_read = 0;
    let e = OffloadedOpt::load(&dir, None, &big_block, &planned(512, 512), &mut |_, _| {
        weights_read += 1
    })
    .unwrap_err();
    assert_eq!(weights_read, 0, "refused only after reading weights: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains("compute tier") && msg.contains("256 sequences x 1023 tokens"),
        "{msg}"
    );
    let small = Policy {
        gpu_batch_size: 1,
        num_gpu_batches: 1,
        ..Policy::default()
    };
    OffloadedOpt::load(&dir, None, &small, &planned(4, 4), &mut |_, _| {
        weights_read += 1
    })
    .unwrap();
    assert!(weights_read > 0);
    let model = OffloadedOpt::load(
        &dir,
        None,
        &Policy::default(),
        &options(&tmp),
        &mut |_, _| {},
    )
    .unwrap();
    let e = model
        .generate(
            &[vec![2, 60000]],
            &GenerationConfig::greedy(2),
            None,
            |_| Flow::Continue,
        )
        .unwrap_err();
    assert!(matches!(e, Error::TokenOutOfRange { id: 60000, .. }), "{e}");
    assert!(model
        .generate(&[], &GenerationConfig::greedy(2), None, |_| Flow::Continue)
        .is_err());
    // Stopping every row ends the block early.
    let mut seen = 0;
    let outs = model
        .generate(
            &prompts(3, 1, 4),
            &GenerationConfig::greedy(8),
            None,
            |_| {
                seen += 1;
                Flow::StopAll
            },
        )
        .unwrap();
    assert_eq!(seen, 1);
    assert!(outs
        .iter()
        .all(|o| o.finish_reason == flexgen_opt::FinishReason::Cancelled));
    let stats = model.take_stats();
    assert_eq!(stats.last().unwrap().tokens, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Policies that change the numerics (compressed cache, sparse attention) have no
    /// in-memory twin; their tokens must not depend on placement, the number of micro-batches
    /// per block, `sep_layer` or overlap. The reference runs micro-batches of the same size,
    /// all in memory: a row's last bits depend on how many rows a linear layer multiplies at
    /// once (see [`in_memory_micro_batches`]), which greedy decoding through sparse attention's
    /// top-k can turn into another token.
    #[test]
    fn compressed_cache_and_sparse_attention_do_not_depend_on_placement(
        fixture in 0usize..4,
        weights in (0u32..=100, 0u32..=100),
        cache_tier in 0usize..3,
        act_tier in 0usize..3,
        gbs in 1usize..4,
        ngb in 1usize..3,
        n in 1usize..7,
        overlap in any::<bool>(),
        sep_layer in any::<bool>(),
        sparse in any::<bool>(),
        gen in 2usize..6,
        seed in any::<u64>(),
    ) {
        let dir = common::fixture(common::FIXTURES[fixture]);
        let tier = |t: usize| [(100.0, 0.0), (0.0, 100.0), (0.0, 0.0)][t];
        let (cg, cc) = tier(cache_tier);
        let (hg, hc) = tier(act_tier);
        let (wg, wc) = (weights.0 as f64, weights.1.min(100 - weights.0) as f64);
        let numerics = Policy {
            compress_cache: !sparse,
            attn_sparsity: if sparse { 0.5 } else { 1.0 },
            ..Policy::default()
        };
        let policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            overlap,
            sep_layer,
            ..numerics.clone()
        }
        .with_percent([wg, wc, cg, cc, hg, hc]);
        let simple = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: 1,
            overlap: false,
            ..numerics
        };
        let tmp = tempfile::tempdir().unwrap();
        let a = OffloadedOpt::load(&dir, None, &simple, &options(&tmp), &mut |_, _| {}).unwrap();
        let b = OffloadedOpt::load(&dir, None, &policy, &options(&tmp), &mut |_, _| {}).unwrap();
        let ps = prompts(n, seed, 6);
        let cfg = GenerationConfig::greedy(gen);
        let expect = a.generate(&ps, &cfg, None, |_| Flow::Continue).unwrap();
        let got = b.generate(&ps, &cfg, None, |_| Flow::Continue).unwrap();
        prop_assert_eq!(ids(&got), ids(&expect));
    }
}

#[test]
fn compressed_cache_is_smaller_and_sparse_attention_changes_decoding() {
    let dir = common::fixture("tiny-preln-f32");
    let tmp = tempfile::tempdir().unwrap();
    let run = |policy: Policy| {
        let m = OffloadedOpt::load(&dir, None, &policy, &options(&tmp), &mut |_, _| {}).unwrap();
        let outs = m
            .generate(
                &prompts(4, 5, 6),
                &GenerationConfig::greedy(12),
                None,
                |_| Flow::Continue,
            )
            .unwrap();
        (ids(&outs), m.take_stats().pop().unwrap())
    };
    let base = Policy {
        gpu_batch_size: 4,
        ..Policy::default()
    }
    .with_percent([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]);
    let (dense, sd) = run(base.clone());
    let (_, sc) = run(Policy {
        compress_cache: true,
        comp_cache_config: flexgen_opt::CompressionConfig {
            group_size: 8,
            ..flexgen_opt::CompressionConfig::FLEXGEN_CACHE
        },
        ..base.clone()
    });
    // The host tier holds only the cache here: 4-bit codes plus two f16 per group of 8 (the
    // fixture's head_dim) instead of f32.
    assert!(
        sc.peak_bytes[1] * 2 < sd.peak_bytes[1],
        "{} vs {}",
        sc.peak_bytes[1],
        sd.peak_bytes[1]
    );
    let (sparse, _) = run(Policy {
        attn_sparsity: 0.1,
        ..base
    });
    assert_eq!(sparse.len(), dense.len());
    assert_ne!(
        sparse, dense,
        "keeping 10% of the value rows changed nothing"
    );
}
