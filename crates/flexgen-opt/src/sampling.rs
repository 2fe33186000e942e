//! Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k
//! and top-p applied in Hugging Face's order (temperature → top-k → top-p → sample).

use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{Error, Result};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below 1e-5) means greedy argmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (`None` or 1: all).
    pub top_p: Option<f32>,
}

impl SamplingParams {
    /// Whether this picks the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    /// Rejects values that have no meaning (negative or non-finite temperature, p outside (0, 1]).
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidRequest(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidRequest(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// Reusable buffers for sampling (so the decode loop does not allocate).
#[derive(Debug, Default)]
pub struct Sampler {
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// Picks a token id from `logits` restricted to ids below `vocab_limit` (tokens the
    /// tokenizer can decode).
    pub fn sample(
        &mut self,
        logits: &[f32],
        vocab_limit: usize,
        params: &SamplingParams,
        rng: &mut StdRng,
    ) -> u32 {
        let logits = &logits[..vocab_limit.min(logits.len())];
        if params.is_greedy() {
            return flexgen_core::kernels::argmax(logits).unwrap_or(0) as u32;
        }
        let inv_t = 1.0 / params.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        if c.is_empty() {
            return 0;
        }
        let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = params.top_k.filter(|&k| k > 0 && k < c.len());
        if let Some(k) = k {
            c.select_nth_unstable_by(k - 1, by_desc);
            c.truncate(k);
        }
        c.sort_unstable_by(by_desc);
        let max = c[0].0;
        let mut total = 0f64;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            total += e.0 as f64;
        }
        if let Some(p) = params.top_p.filter(|&p| p < 1.0) {
            // HF keeps tokens until the cumulative probability exceeds p (at least one).
            let mut cum = 0f64;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                cum += e.0 as f64 / total;
                if cum >= p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|e| e.0 as f64).sum();
        }
        let mut r = rng.random::<f64>() * total;
        for e in c.iter() {
            r -= e.0 as f64;
            if r < 0.0 {
                return e.1;
            }
        }
        c[c.len() - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(t: f32, k: Option<usize>, p: Option<f32>) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
        }
    }

    #[test]
    fn greedy_respects_vocab_limit() {
        let logits = [0.0, 1.0, 5.0, 9.0];
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(s.sample(&logits, 4, &params(0.0, None, None), &mut rng), 3);
        assert_eq!(s.sample(&logits, 3, &params(0.0, None, None), &mut rng), 2);
    }

    #[test]
    fn sampling_never_leaves_the_limit_and_top_k_and_top_p_restrict() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..500 {
            let id = s.sample(&logits, 50, &params(1.0, None, None), &mut rng);
            assert!(id < 50);
            let id = s.sample(&logits, 100, &params(1.0, Some(3), None), &mut rng);
            // The three largest logits (6.0) are at ids 6, 13, 20 (ties broken by lower id).
            assert!([6, 13, 20].contains(&id), "top-k gave {id}");
        }
        // top_p tiny keeps only the single most likely token.
        let logits = [0.0, 3.0, 1.0];
        for _ in 0..50 {
            assert_eq!(
                s.sample(&logits, 3, &params(1.0, None, Some(0.01)), &mut rng),
                1
            );
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let run = |seed| {
            let mut s = Sampler::default();
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| s.sample(&logits, 1000, &params(0.8, Some(50), Some(0.9)), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn temperature_shapes_frequencies() {
        // Two tokens with logits 0 and ln(3): p = 0.25 / 0.75 at T=1.
        let logits = [0.0, 3f32.ln()];
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(3);
        let n = 20000;
        let ones = (0..n)
            .filter(|_| s.sample(&logits, 2, &params(1.0, None, None), &mut rng) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.02, "freq {freq}");
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(params(-1.0, None, None).validate().is_err());
        assert!(params(f32::NAN, None, None).validate().is_err());
        assert!(params(1.0, None, Some(0.0)).validate().is_err());
        assert!(params(1.0, None, Some(1.5)).validate().is_err());
        assert!(params(0.7, Some(5), Some(0.9)).validate().is_ok());
    }
}
