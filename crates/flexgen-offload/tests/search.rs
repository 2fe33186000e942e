//! Policy search: every returned policy fits every memory constraint of the model it was
//! solved for (recomputed here from the runtime's placement rules), and the LP is never worse
//! than a brute-force grid over the same cost model.

use flexgen_core::DType;
use flexgen_offload::search::{
    cpu_policy, predict, search, CacheMode, Capacity, Choice, CostModel, Formats, Grid,
    HardwareProfile, LinearKind, Lp, MemoryLimits, ModelShape, Placement, PlacementSolver,
    RateCurve, SearchError, SearchOptions, Vertices, Workload,
};
use flexgen_offload::{split_cache, Policy, Tier, WeightPlan};
use flexgen_quant::CompressionConfig;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

/// A machine like the development box (2 cores, AVX-512, a virtual disk).
fn profile() -> HardwareProfile {
    let curve = |base: f64| RateCurve {
        points: vec![
            (1.0, base),
            (4.0, 3.5 * base),
            (16.0, 10.0 * base),
            (64.0, 20.0 * base),
            (512.0, 30.0 * base),
        ],
    };
    HardwareProfile {
        version: flexgen_offload::search::hardware::PROFILE_VERSION,
        created_unix_s: 0,
        fingerprint: flexgen_offload::search::Fingerprint {
            cpu_model: "test".into(),
            cpus: 2,
            threads: 2,
            simd: "Avx512".into(),
            mem_total_bytes: 24 * GIB,
            offload_device: 1,
        },
        offload_dir: "/tmp".into(),
        linear: vec![
            (LinearKind::F32, curve(2.5e9)),
            (LinearKind::F16, curve(5e9)),
            (LinearKind::Bf16, curve(5e9)),
            (LinearKind::Q4, curve(12e9)),
        ],
        attention_prefill: RateCurve {
            points: vec![(128.0, 40e9), (512.0, 60e9)],
        },
        attention_decode_bw: 9e9,
        attention_decode_packed_bw: 4e9,
        copy_bw: 8e9,
        disk_read_bw: 1.1e9,
        disk_write_bw: 0.8e9,
        disk_direct: true,
        io_compute_ratio: 0.8,
        calibration_s: 0.0,
    }
}

fn opt(name: &str, layers: usize, hidden: usize, heads: usize) -> ModelShape {
    ModelShape {
        name: name.into(),
        num_layers: layers,
        hidden,
        ffn: 4 * hidden,
        heads,
        vocab: 50272,
        max_positions: 2048,
        embed_dim: hidden,
    }
}

/// Peak bytes `[ram, disk]` of `policy`, recomputed from the runtime's rules: weights placed by
/// `WeightPlan` (midpoint rule), two layers of fetch buffers, the cache split in whole
/// sequences, workspaces when the cache is not whole on one RAM tier, activations and one
/// micro-batch's scratch.
fn peak(shape: &ModelShape, w: Workload, dtype: DType, policy: &Policy) -> [f64; 2] {
    let cache_cfg = policy
        .compress_cache
        .then_some(CompressionConfig::FLEXGEN_CACHE);
    let cache = shape.cache_spec(cache_cfg.as_ref());
    let specs = shape.layer_specs(dtype, policy.sep_layer, &cache);
    let plan = WeightPlan::new(&specs, policy);
    let (gbs, bls) = (policy.gpu_batch_size, policy.block_size());
    let cap = w.prompt_len + w.gen_len - 1;
    let per_seq = (shape.num_layers * cap * cache.token_bytes()) as f64;
    let [c, h, d] = split_cache(gbs, &policy.cache);
    let seqs_per_tier = |n: usize| n as f64 * (bls / gbs) as f64;
    let in_place = d == 0 && (c == 0 || h == 0);
    let workspaces = if in_place {
        0.0
    } else {
        let in_flight = if policy.overlap { 3.0 } else { 1.0 };
        in_flight * (gbs * cap * cache.token_bytes()) as f64
    };
    let act = (bls * w.prompt_len * shape.hidden * 4) as f64;
    let scratch =
        4.0 * gbs as f64 * ((w.prompt_len * (6 * shape.hidden + shape.ffn)) + shape.vocab) as f64;
    let ram = (plan.home_bytes[0] + plan.home_bytes[1] + 2 * plan.max_layer_fetch_bytes) as f64
        + per_seq * seqs_per_tier(c + h)
        + workspaces
        + act
        + scratch;
    let disk = plan.home_bytes[2] as f64 + per_seq * seqs_per_tier(d);
    [ram, disk]
}

fn shapes() -> impl Strategy<Value = ModelShape> {
    (1usize..6, 1usize..5, 1usize..4, 2usize..4).prop_map(|(layers, h64, heads, vocab_k)| {
        let heads = heads * 2;
        ModelShape {
            name: "random".into(),
            num_layers: layers,
            hidden: h64 * 64 * heads,
            ffn: 4 * h64 * 64 * heads,
            heads,
            vocab: vocab_k * 1000,
            max_positions: 512,
            embed_dim: h64 * 64 * heads,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn returned_policies_fit_every_memory_constraint(
        shape in shapes(),
        prompt_len in 8usize..200,
        gen_len in 1usize..40,
        ram_mib in 1u64..400,
        disk_mib in 1u64..2000,
        cw in 0usize..3,
        cc in 0usize..3,
        overlap in any::<bool>(),
        sep_layer in any::<bool>(),
        dtype in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
    ) {
        let w = Workload { prompt_len, gen_len };
        let choice = [Choice::Off, Choice::On, Choice::Auto];
        let mut opts = SearchOptions::new(
            w,
            MemoryLimits { ram_bytes: ram_mib << 20, disk_bytes: disk_mib << 20 },
        );
        opts.dtype = dtype;
        opts.compress_weight = choice[cw];
        opts.compress_cache = choice[cc];
        opts.overlap = overlap;
        opts.sep_layer = sep_layer;
        opts.max_gpu_batch_size = 32;
        opts.max_num_gpu_batches = 8;
        let cap = opts.capacity();
        match search(&shape, &profile(), &opts) {
            Ok(found) => {
                let p = &found.policy;
                p.validate().unwrap();
                for v in p.percent() {
                    prop_assert_eq!(v, v.round());
                }
                prop_assert_eq!(p.activation_tier(), Tier::Compute);
                prop_assert_eq!((p.overlap, p.sep_layer), (overlap, sep_layer));
                let [ram, disk] = peak(&shape, w, dtype, p);
                prop_assert!(ram <= cap.ram, "RAM {} > {} for {:?}", ram, cap.ram, p);
                prop_assert!(disk <= cap.disk, "disk {} > {} for {:?}", disk, cap.disk, p);
                // The reported peaks are the ones the constraints were checked on.
                let pred = &found.prediction;
                prop_assert!((pred.ram_bytes() - ram).abs() <= 1e-6 * ram.max(1.0));
                prop_assert!((pred.peak_bytes[2] - disk).abs() <= 1e-6 * disk.max(1.0));
                prop_assert!(pred.total_throughput > 0.0 && pred.total_s.is_finite());
                // Predicting the returned policy gives the reported prediction.
                let again = predict(&shape, &profile(), w, dtype, p).unwrap();
                prop_assert_eq!(again, *pred);
            }
            Err(SearchError::Infeasible(msg)) => {
                prop_assert!(msg.contains("GiB"), "{}", msg);
                // Then not even the smallest all-disk policy fits.
                for &cw in if cw == 0 { &[false][..] } else { &[false, true][..] } {
                    for &cc in if cc == 0 { &[false][..] } else { &[false, true][..] } {
                        let f = Formats { dtype, compress_weight: cw, compress_cache: cc, overlap, sep_layer };
                        let p = cpu_policy(&f, 1, 1, 0.0, 0.0);
                        let [ram, disk] = peak(&shape, w, dtype, &p);
                        prop_assert!(ram > cap.ram || disk > cap.disk, "{:?} fits", p);
                    }
                }
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn lp_is_never_worse_than_a_grid(
        shape in shapes(),
        prompt_len in 8usize..200,
        gen_len in 1usize..40,
        gbs in 1usize..16,
        ngb in 1usize..6,
        ram_mib in 1u64..300,
        disk_mib in 1u64..1500,
        overlap in any::<bool>(),
        compress_weight in any::<bool>(),
        compress_cache in any::<bool>(),
    ) {
        let w = Workload { prompt_len, gen_len };
        let f = Formats { dtype: DType::F16, compress_weight, compress_cache, overlap, sep_layer: true };
        let model = CostModel::new(&shape, &profile(), w, f, gbs, ngb).unwrap();
        let cap = Capacity { ram: (ram_mib << 20) as f64, disk: (disk_mib << 20) as f64 };
        let lp = Lp.solve(&model, &cap).unwrap();
        let grid = Grid { steps: 20 }.solve(&model, &cap).unwrap();
        // The simplex and the exact vertex enumeration agree on feasibility and optimum.
        let exact = Vertices.solve(&model, &cap).unwrap();
        prop_assert_eq!(lp.is_some(), exact.is_some(), "LP {:?}, vertices {:?}", lp, exact);
        if let (Some(l), Some(v)) = (lp, exact) {
            let (tl, tv) = (l.prediction.total_s, v.prediction.total_s);
            prop_assert!((tl - tv).abs() <= 1e-6 * tv, "LP {} s, vertices {} s", tl, tv);
        }
        if let Some(g) = grid {
            let l = lp.expect("the LP found nothing where the grid found a placement");
            prop_assert!(
                l.prediction.total_s <= g.prediction.total_s * (1.0 + 1e-6) + 1e-12,
                "LP {} s > grid {} s", l.prediction.total_s, g.prediction.total_s
            );
        }
        if let Some(l) = lp {
            let slack = Capacity { ram: cap.ram * (1.0 + 1e-6), disk: cap.disk * (1.0 + 1e-6) };
            prop_assert!(slack.fits(&l.prediction));
        }
    }
}

#[test]
fn more_disk_is_never_faster_and_overlap_never_slower() {
    let shape = opt("opt-1.3b", 24, 2048, 32);
    let w = Workload {
        prompt_len: 512,
        gen_len: 32,
    };
    for overlap in [true, false] {
        let f = Formats {
            dtype: DType::F16,
            compress_weight: false,
            compress_cache: false,
            overlap,
            sep_layer: true,
        };
        let m = CostModel::new(&shape, &profile(), w, f, 8, 2).unwrap();
        let mut prev = 0.0;
        for i in 0..=10 {
            let p = m.evaluate(&Placement::fractions(
                i as f64 / 10.0,
                i as f64 / 10.0,
                CacheMode::Gathered,
            ));
            assert!(p.total_s >= prev, "{i}: {} < {prev}", p.total_s);
            prev = p.total_s;
        }
    }
    let run = |overlap| {
        let f = Formats {
            dtype: DType::F16,
            compress_weight: false,
            compress_cache: false,
            overlap,
            sep_layer: true,
        };
        CostModel::new(&shape, &profile(), w, f, 8, 2)
            .unwrap()
            .evaluate(&Placement::fractions(0.5, 0.5, CacheMode::Gathered))
            .total_s
    };
    assert!(run(true) < run(false));
}

#[test]
fn in_memory_prediction_is_the_compute_terms() {
    // Everything in RAM: no I/O, time = compute: linear layers at the calibrated rate (or the
    // RAM streaming floor), attention, and the output layer.
    let shape = opt("opt-1.3b", 24, 2048, 32);
    let w = Workload {
        prompt_len: 64,
        gen_len: 9,
    };
    let policy = Policy {
        gpu_batch_size: 4,
        num_gpu_batches: 1,
        ..Policy::default()
    };
    let prof = profile();
    let pred = predict(&shape, &prof, w, DType::F16, &policy).unwrap();
    let f = 2.0 * (4.0 * 2048f64.powi(2) + 2.0 * 2048.0 * 8192.0);
    let rate = |m: usize| prof.linear_flops(LinearKind::F16, m);
    let lin_pre = (f * 256.0 / rate(256)).max(f / rate(1));
    let attn_pre = 4.0 * 4.0 * 64.0 * 64.0 * 2048.0 / prof.attention_prefill_flops(64);
    let out = (2.0 * 50272.0 * 2048.0 * 4.0 / rate(4)).max(2.0 * 50272.0 * 2048.0 / rate(1));
    let prefill = 24.0 * (lin_pre + attn_pre) + out;
    assert!(
        (pred.prefill_s - prefill).abs() < 1e-9 * prefill,
        "{pred:?}"
    );
    let lin_dec = (f * 4.0 / rate(4)).max(f / rate(1));
    let attn_dec = 4.0 * (64.0 + 4.5) * (2.0 * 2048.0 * 4.0) / prof.attention_decode_bw;
    let decode = 8.0 * (24.0 * (lin_dec + attn_dec) + out);
    assert!((pred.decode_s - decode).abs() < 1e-9 * decode, "{pred:?}");
    assert!((pred.total_throughput - 4.0 * 9.0 / (prefill + decode)).abs() < 1e-9);
    assert_eq!(pred.peak_bytes[2], 0.0);
    assert_eq!(pred.peak_bytes[1], 0.0);
    // A host-tier split of the same RAM predicts the same time, with the bytes on the host.
    let host = policy
        .clone()
        .with_percent([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]);
    let ph = predict(&shape, &prof, w, DType::F16, &host).unwrap();
    assert_eq!(ph.total_s, pred.total_s);
    assert!(ph.peak_bytes[1] > 2.0 * GIB as f64 && ph.ram_bytes() == pred.ram_bytes());
}

#[test]
fn the_search_offloads_a_model_larger_than_ram() {
    // OPT-6.7B (13 GB in f16) with 6 GiB of RAM: weights must go partly to disk, and the
    // rounded policy is predicted as placed.
    let shape = opt("facebook/opt-6.7b", 32, 4096, 32);
    let w = Workload {
        prompt_len: 256,
        gen_len: 32,
    };
    let opts = SearchOptions::new(
        w,
        MemoryLimits {
            ram_bytes: 6 * GIB,
            disk_bytes: 60 * GIB,
        },
    );
    let found = search(&shape, &profile(), &opts).unwrap();
    let p = &found.policy;
    assert!(p.weights.compute > 0.0 && p.weights.compute < 60.0, "{p:?}");
    assert!(found.prediction.ram_bytes() <= 0.8 * 6.0 * GIB as f64);
    assert!(found.lps_solved >= found.candidates.len() && !found.candidates.is_empty());
    // The LP's fractional optimum is at least as fast as the rounded policy.
    assert!(found.lp.prediction.total_throughput >= found.prediction.total_throughput * 0.999);
    // Compression on shrinks the weights below the limit and is faster here.
    let mut auto = opts.clone();
    auto.compress_weight = Choice::Auto;
    let c = search(&shape, &profile(), &auto).unwrap();
    assert!(c.policy.compress_weight, "{:?}", c.policy);
    assert!(c.prediction.total_throughput > found.prediction.total_throughput);
    // Fixed micro-batch size and count are respected.
    let mut fixed = opts.clone();
    fixed.gpu_batch_size = Some(3);
    fixed.num_gpu_batches = Some(2);
    let f = search(&shape, &profile(), &fixed).unwrap();
    assert_eq!((f.policy.gpu_batch_size, f.policy.num_gpu_batches), (3, 2));
}

#[test]
fn bad_options_are_named() {
    let shape = opt("facebook/opt-1.3b", 24, 2048, 32);
    let limits = MemoryLimits {
        ram_bytes: 8 * GIB,
        disk_bytes: 8 * GIB,
    };
    let e = search(
        &shape,
        &profile(),
        &SearchOptions::new(
            Workload {
                prompt_len: 2000,
                gen_len: 100,
            },
            limits,
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--prompt-len + --gen-len") && e.contains("2048 positions"),
        "{e}"
    );
    let mut o = SearchOptions::new(
        Workload {
            prompt_len: 16,
            gen_len: 0,
        },
        limits,
    );
    assert!(search(&shape, &profile(), &o)
        .unwrap_err()
        .to_string()
        .contains("--gen-len"));
    o.workload.gen_len = 4;
    o.relaxation = 0.0;
    assert!(search(&shape, &profile(), &o)
        .unwrap_err()
        .to_string()
        .contains("--alpha"));
    o.relaxation = 0.8;
    o.limits.ram_bytes = 100 << 20;
    let e = search(&shape, &profile(), &o).unwrap_err().to_string();
    assert!(
        e.contains("no policy fits") && e.contains("GiB of RAM"),
        "{e}"
    );
    assert!("maybe".parse::<Choice>().is_err());
    assert_eq!("AUTO".parse::<Choice>().unwrap(), Choice::Auto);
    let mismatched = Policy {
        gpu_batch_size: 2,
        ..Policy::default()
    };
    let f = Formats::of(&Policy::default(), DType::F16);
    let m = CostModel::new(&shape, &profile(), o.workload, f, 4, 1).unwrap();
    assert!(m.predict(&mismatched).is_err());
}
#[test]
fn a_simplex_that_stops_on_a_singular_basis_is_decided_by_the_vertices() {
    // Drawn by CI: microlp 0.6 answered "Singular matrix" on this infeasible LP (the RAM
    // limit needs more on disk than the disk holds) instead of "infeasible".
    let shape = ModelShape {
        name: "random".into(),
        num_layers: 1,
        hidden: 384,
        ffn: 1536,
        heads: 6,
        vocab: 3000,
        max_positions: 512,
        embed_dim: 384,
    };
    let w = Workload {
        prompt_len: 156,
        gen_len: 16,
    };
    let f = Formats {
        dtype: DType::F32,
        compress_weight: true,
        compress_cache: false,
        overlap: true,
        sep_layer: true,
    };
    let model = CostModel::new(&shape, &profile(), w, f, 16, 4).unwrap();
    let cap = Capacity {
        ram: 76336332.8,
        disk: 36071014.4,
    };
    let lp = Lp.solve(&model, &cap).unwrap();
    let exact = Vertices.solve(&model, &cap).unwrap();
    assert_eq!(lp, exact);
    let grid = Grid { steps: 200 }.solve(&model, &cap).unwrap();
    assert!(grid.is_none() || lp.is_some(), "{grid:?}");
    // And the search it came from finds a policy at another block shape.
    let mut opts = SearchOptions::new(
        w,
        MemoryLimits {
            ram_bytes: 91 << 20,
            disk_bytes: 43 << 20,
        },
    );
    opts.dtype = DType::F32;
    opts.compress_weight = Choice::On;
    opts.compress_cache = Choice::Off;
    opts.max_gpu_batch_size = 32;
    opts.max_num_gpu_batches = 8;
    let found = search(&shape, &profile(), &opts).unwrap();
    let [ram, disk] = peak(&shape, w, DType::F32, &found.policy);
    assert!(ram <= opts.capacity().ram && disk <= opts.capacity().disk);
}
