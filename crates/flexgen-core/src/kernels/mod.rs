//! CPU kernels: every operation has a fast path (SIMD level chosen once at run time, rayon
//! across cores) and a plain scalar reference (`*_ref`) that tests compare it against.
//!
//! All kernels take `f32` activations in row-major slices and validate every caller-provided
//! shape, returning [`Error`](crate::Error) instead of panicking. The `*_with_level`
//! variants run a specific [`SimdLevel`](crate::SimdLevel) (an error if the CPU lacks it).

pub mod activation;
pub mod attention;
pub mod convert;
pub mod embedding;
pub mod layer_norm;
pub mod linear;
pub mod softmax;

pub use activation::{relu_inplace, relu_inplace_with_level, relu_ref};
pub use attention::{
    attention, attention_decode, attention_prefill, attention_ref, attention_with_level,
    AttentionShape,
};
pub use convert::{
    argmax, bf16_to_f32, bf16_to_f32_with_level, f16_to_f32, f32_to_bf16, f32_to_f16,
};
pub use embedding::{embedding, embedding_ref};
pub use layer_norm::{layer_norm, layer_norm_ref, layer_norm_with_level};
pub use linear::{linear, linear_ref, linear_with_level};
pub use softmax::{masked_softmax, masked_softmax_ref, masked_softmax_with_level};

/// Number of elements above which row-wise kernels split their rows across rayon threads.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Shared test helpers.
#[cfg(test)]
pub(crate) mod testutil {
    use proptest::prelude::*;

    /// `len` uniform values in [-2, 2).
    pub(crate) fn vec_f32(len: usize) -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-2.0f32..2.0, len)
    }

    /// Asserts `|a - b| <= tol * max(1, |b|)` elementwise.
    pub(crate) fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            let ok = (a - b).abs() <= tol * b.abs().max(1.0) || (a.is_nan() && b.is_nan());
            assert!(ok, "{what}: index {i}: got {a}, want {b} (tol {tol})");
        }
    }
}
