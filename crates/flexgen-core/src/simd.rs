//! Run-time SIMD level selection.
//!
//! The level is detected once per process with `is_x86_feature_detected!` and cached.
//! Setting the environment variable `FLEXGEN_SIMD` to `scalar`, `avx2` or `avx512` before the
//! first kernel call caps the level (a request above what the CPU supports falls back to the
//! best supported level; an unrecognised value is ignored). Every kernel also has a
//! `*_with_level` variant that takes the level explicitly, which tests use to compare each
//! available level against the scalar reference.
//!
//! The `gemm` crate, used by [`linear`](crate::kernels::linear()) for larger batches, performs
//! its own run-time dispatch and is not affected by the level.

use std::sync::OnceLock;

use crate::error::{Error, Result};

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_gemm;

/// Transposes a 16 x 16 block of 32-bit lanes held in 16 registers (row `i` in `r[i]`
/// becomes column `i`): 64 register shuffles, no memory traffic. For crates that write
/// weights straight into [`crate::kernels::PANEL_WIDTH`]-wide GEMM panels.
///
/// # Safety
/// The CPU must support AVX-512 F; call it from a function compiled with it enabled.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn transpose16x16(r: &mut [std::arch::x86_64::__m512; 16]) {
    avx512_gemm::transpose16(r)
}

/// Instruction-set level used by the crate's kernels, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust (whatever the compiler's baseline target allows).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (256-bit vectors).
    Avx2Fma,
    /// x86-64 AVX-512 F/BW/VL (512-bit vectors), plus AVX2, FMA and F16C.
    Avx512,
}

impl SimdLevel {
    /// Short name, as accepted by `FLEXGEN_SIMD`: `"scalar"`, `"avx2"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2Fma => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Whether the running CPU supports this level.
    pub fn is_available(self) -> bool {
        self <= detected_level()
    }

    /// Parses a `FLEXGEN_SIMD` value (case-insensitive).
    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" => Some(SimdLevel::Scalar),
            "avx2" | "avx2fma" | "avx2+fma" => Some(SimdLevel::Avx2Fma),
            "avx512" | "avx-512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best level the CPU supports, detected once.
fn detected_level() -> SimdLevel {
    static DETECTED: OnceLock<SimdLevel> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    if avx512 {
        SimdLevel::Avx512
    } else if avx2 {
        SimdLevel::Avx2Fma
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}

/// The SIMD level the kernels use: the best the CPU supports, capped by `FLEXGEN_SIMD`.
///
/// Computed on the first call and cached for the life of the process.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detected_level();
        match std::env::var("FLEXGEN_SIMD")
            .ok()
            .as_deref()
            .and_then(SimdLevel::parse)
        {
            Some(requested) => requested.min(best),
            None => best,
        }
    })
}

/// All levels the running CPU supports, in increasing order (always starts with `Scalar`).
pub fn available_levels() -> Vec<SimdLevel> {
    [SimdLevel::Scalar, SimdLevel::Avx2Fma, SimdLevel::Avx512]
        .into_iter()
        .filter(|l| l.is_available())
        .collect()
}

/// Returns an error unless `level` can run on this CPU.
pub(crate) fn ensure_available(op: &'static str, level: SimdLevel) -> Result<()> {
    if level.is_available() {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!(
                "SIMD level {level} is not supported by this CPU (best: {})",
                detected_level()
            ),
        ))
    }
}

/// Primitive operations implemented once per SIMD level.
///
/// All methods are `unsafe` only because an implementation may use CPU features that the
/// caller must have verified (see [`ensure_available`]); they never read or write outside
/// the slices they are given: lengths are taken from the slices (documented per method) and
/// implementations bound every access by them.
pub(crate) trait Kern {
    /// Attention scores of a group of heads against consecutive cache rows:
    /// `scores[h * ss + j] = dot(q[h * hd ..][.. hd], keys[j * stride + h * hd ..][.. hd])`
    /// for `h < q.len() / hd`, `j < n_pos`. Reads each cache row's `q.len()` values once, in
    /// order. Requires `keys.len() >= (n_pos - 1) * stride + q.len()` and
    /// `scores.len() >= (heads - 1) * ss + n_pos` when `n_pos > 0` (else panic).
    unsafe fn head_scores(
        q: &[f32],
        hd: usize,
        keys: &[f32],
        stride: usize,
        n_pos: usize,
        scores: &mut [f32],
        ss: usize,
    );
    /// Weighted sums of value rows for a group of heads: `out[h * hd ..][.. hd] =
    /// sum_j p[h * ss + j] * vals[j * stride + h * hd ..][.. hd]` for `h < out.len() / hd`,
    /// `j < n_pos` (`out` is overwritten). Reads each cache row's `out.len()` values once, in
    /// order. Length requirements as [`Kern::head_scores`] with `p`, `vals`, `out`.
    unsafe fn head_mix(
        p: &[f32],
        ss: usize,
        vals: &[f32],
        stride: usize,
        n_pos: usize,
        hd: usize,
        out: &mut [f32],
    );
    /// Maximum of `x` (`-inf` for an empty slice; NaN handling unspecified).
    unsafe fn max(x: &[f32]) -> f32;
    /// `x[i] = exp(x[i] - shift)` in place; returns the sum of the new values.
    unsafe fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32;
    /// `x[i] *= s`.
    unsafe fn scale(x: &mut [f32], s: f32);
    /// Sum of `x`.
    unsafe fn sum(x: &[f32]) -> f32;
    /// `sum((x[i] - mean)^2)`.
    unsafe fn sq_dev_sum(x: &[f32], mean: f32) -> f32;
    /// `out[i] = (x[i] - mean) * rstd * gamma[i] + beta[i]` (missing gamma = 1, beta = 0),
    /// over `i < out.len()`; `x`, `gamma` and `beta` must be at least as long (else panic).
    unsafe fn ln_apply(
        x: &[f32],
        mean: f32,
        rstd: f32,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        out: &mut [f32],
    );
    /// `x[i] = max(x[i], 0)` (NaN and `-0.0` are kept).
    unsafe fn relu(x: &mut [f32]);
    /// `dst[i] = src[i] as f32` over `i < min(len)`.
    unsafe fn bf16_to_f32(src: &[half::bf16], dst: &mut [f32]);
    /// GEMV block: `out_t[r * m + i] = dot(w[r * k ..][.. k], x[i * k ..][.. k])` for
    /// `r < out_t.len() / m`, `i < m`. Requires `w.len() >= rows * k`, `x.len() >= m * k`
    /// (else panic).
    unsafe fn gemv_f32(w: &[f32], k: usize, x: &[f32], m: usize, out_t: &mut [f32]);
    /// [`Kern::gemv_f32`] with `f16` weights.
    unsafe fn gemv_f16(w: &[half::f16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]);
    /// [`Kern::gemv_f32`] with `bf16` weights.
    unsafe fn gemv_bf16(w: &[half::bf16], k: usize, x: &[f32], m: usize, out_t: &mut [f32]);
}

/// Expands `$body` once per level with `$K` bound to that level's [`Kern`] implementation,
/// and runs the arm matching `$level`.
///
/// The body calls `$K`'s `unsafe` methods inside its own `unsafe` block; its `SAFETY`
/// comment must say why `$level` is supported (it is [`simd_level()`] or was checked with
/// [`ensure_available`]).
macro_rules! dispatch {
    ($level:expr, $K:ident => $body:expr) => {{
        match $level {
            #[cfg(target_arch = "x86_64")]
            $crate::simd::SimdLevel::Avx512 => {
                type $K = $crate::simd::avx512::Avx512;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            $crate::simd::SimdLevel::Avx2Fma => {
                type $K = $crate::simd::avx2::Avx2;
                $body
            }
            _ => {
                type $K = $crate::simd::scalar::Scalar;
                $body
            }
        }
    }};
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        let levels = available_levels();
        assert_eq!(levels[0], SimdLevel::Scalar);
        assert!(levels.windows(2).all(|w| w[0] < w[1]));
        assert!(levels.contains(&simd_level()));
        assert!(ensure_available("t", SimdLevel::Scalar).is_ok());
        assert_eq!(SimdLevel::parse("AVX512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("avx2"), Some(SimdLevel::Avx2Fma));
        assert_eq!(SimdLevel::parse("scalar"), Some(SimdLevel::Scalar));
        assert_eq!(SimdLevel::parse("sse"), None);
        for l in [SimdLevel::Scalar, SimdLevel::Avx2Fma, SimdLevel::Avx512] {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
            assert_eq!(ensure_available("t", l).is_ok(), levels.contains(&l));
        }
    }
}
