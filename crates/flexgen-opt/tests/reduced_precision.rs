//! Half-width weights (bf16, f16) against the f32 path on every fixture checkpoint: the logits
//! stay within the documented tolerances of the f32 logits (which match Hugging Face, see
//! `hf_parity.rs`), at every real position of the fixtures' left-padded prompts.
//!
//! Tolerances, as a fraction of the largest |f32 logit| of the fixture (README, "Precision"):
//! - f16 weights: 0.5%. f16 keeps 11 significant bits: each weight is off by at most 2^-12
//!   relative; activations and accumulation stay f32.
//! - bf16 weights: 4%. bf16 keeps 8 bits (2^-9 relative per weight), and on CPUs with
//!   AVX512_BF16 the activations multiplied with them are rounded to bf16 too.
//!
//! (`tiny-sharded` is stored in bf16 and `tiny-preln-f16` in f16, so those dtypes reproduce
//! the f32 path there up to summation order; the other pairs are real roundings.)

mod common;

use common::ReferenceBatch;
use flexgen_core::DType;
use flexgen_opt::{LoadOptions, OptModel, WeightFormat};

/// Logits of fixture `name` at every position of `batch`, weights stored as `dtype`.
fn logits(name: &str, dtype: DType, batch: &ReferenceBatch) -> Vec<f32> {
    let load = LoadOptions {
        dtype: Some(dtype),
        ..LoadOptions::default()
    };
    let model = OptModel::load(common::fixture(name), &load).unwrap();
    assert_eq!(
        model.weights().layers[0].fc1.weight.dtype(),
        WeightFormat::Dense(dtype),
        "{name}: weights not stored as {dtype:?}"
    );
    batch.logits(&model)
}

#[test]
fn half_width_weights_stay_within_tolerance_of_f32() {
    for name in common::FIXTURES {
        let batch = ReferenceBatch::load(name);
        let reference = logits(name, DType::F32, &batch);
        let vocab = reference.len() / batch.valid.len();
        let real: Vec<usize> = (0..batch.valid.len()).filter(|&i| batch.valid[i]).collect();
        let scale = real
            .iter()
            .flat_map(|&i| &reference[i * vocab..(i + 1) * vocab])
            .fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: all-zero f32 logits");
        for (dtype, tolerance) in [(DType::F16, 0.005f32), (DType::BF16, 0.04)] {
            let got = logits(name, dtype, &batch);
            assert_eq!(got.len(), reference.len());
            let worst = real
                .iter()
                .flat_map(|&i| i * vocab..(i + 1) * vocab)
                .map(|j| (got[j] - reference[j]).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{name} {dtype:?}: max |logit - f32| = {worst:.3e} ({:.3}% of max |logit| {scale:.3})",
                100.0 * worst / scale
            );
            assert!(
                worst <= tolerance * scale,
                "{name} {dtype:?}: max |logit - f32| = {worst} exceeds {}% of {scale}",
                tolerance * 100.0
            );
        }
    }
}
