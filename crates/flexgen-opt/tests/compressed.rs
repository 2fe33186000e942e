//! Models loaded with group-wise compressed weights (`LoadOptions::compress_weight`): on every
//! fixture checkpoint the logits stay close to the uncompressed f32 path (8-bit closer than
//! 4-bit), and generation still works. The measured errors are printed (`--nocapture`).

mod common;

use common::{ids, ReferenceBatch};
use flexgen_core::DType;
use flexgen_opt::{
    generate, CompressionConfig, Flow, GenerationConfig, LoadOptions, OptModel, WeightFormat,
};
use serde_json::Value;

fn load(name: &str, compress: Option<CompressionConfig>) -> OptModel {
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        compress_weight: compress,
    };
    OptModel::load(common::fixture(name), &opts).unwrap()
}

/// Relative L2 error of the logits at the real positions of the reference batch.
fn logits_error(batch: &ReferenceBatch, base: &OptModel, model: &OptModel) -> f64 {
    let mask = &batch.valid;
    let (want, got) = (batch.logits(base), batch.logits(model));
    let v = base.config().vocab_size;
    let (mut num, mut den) = (0f64, 0f64);
    for (pos, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        for (&a, &b) in got[pos * v..(pos + 1) * v]
            .iter()
            .zip(&want[pos * v..(pos + 1) * v])
        {
            assert!(a.is_finite(), "non-finite logit");
            num += f64::from(a - b).powi(2);
            den += f64::from(b).powi(2);
        }
    }
    (num / den).sqrt()
}

#[test]
fn compressed_logits_close_to_f32_and_generation_works() {
    for name in common::FIXTURES {
        let dir = common::fixture(name);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let base = load(name, None);
        let q4 = load(name, Some(CompressionConfig::WEIGHT_4BIT));
        let q8 = load(name, Some(CompressionConfig::WEIGHT_8BIT));
        for m in [&q4, &q8] {
            let w = m.weights();
            assert!(matches!(w.embed_tokens.dtype(), WeightFormat::Packed(_)));
            assert!(matches!(
                w.layers[0].fc1.weight.dtype(),
                WeightFormat::Packed(_)
            ));
            // Biases and layer norms stay f32 and identical.
            assert_eq!(w.layers[0].fc1.bias, base.weights().layers[0].fc1.bias);
        }
        let batch = ReferenceBatch::from_json(&json);
        let e4 = logits_error(&batch, &base, &q4);
        let e8 = logits_error(&batch, &base, &q8);
        eprintln!("{name}: relative L2 logits error vs f32: 4-bit {e4:.4}, 8-bit {e8:.4}");
        // 8-bit steps are 17x finer than 4-bit ones; the errors scale accordingly.
        assert!(e8 < 0.05, "{name}: 8-bit error {e8}");
        assert!(e8 * 4.0 < e4, "{name}: 8-bit {e8} vs 4-bit {e4}");
        assert!(e4 < 0.6, "{name}: 4-bit error {e4}");

        let prompts: Vec<Vec<u32>> = json["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| ids(r).into_iter().skip_while(|&t| t == 1).collect())
            .collect();
        let cfg = GenerationConfig {
            vocab_limit: Some(50265),
            ..GenerationConfig::greedy(8)
        };
        for m in [&q4, &q8] {
            let outs = generate(m, &prompts, &cfg, None, |_| Flow::Continue).unwrap();
            assert_eq!(outs.len(), prompts.len());
            for o in &outs {
                assert!(!o.token_ids.is_empty() && o.token_ids.len() <= 8);
                assert!(o.token_ids.iter().all(|&t| t < 50265));
            }
        }
    }
}

#[test]
fn compressed_dummy_model_is_smaller() {
    let cfg = flexgen_opt::OptConfig::from_name("facebook/opt-125m").unwrap();
    let dense = OptModel::dummy(cfg.clone(), DType::F16, 3).unwrap();
    let q4 =
        OptModel::dummy_with(cfg, DType::F16, 3, Some(CompressionConfig::WEIGHT_4BIT)).unwrap();
    let ratio = q4.weights().nbytes() as f64 / dense.weights().nbytes() as f64;
    eprintln!("opt-125m dummy: 4-bit weights / f16 weights = {ratio:.3}");
    // 4.5 / 16 bits for 2-D weights; f32 biases and layer norms add a little.
    assert!(ratio < 0.30, "{ratio}");
}
