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
#[cfg(target_arch = "x86_64")]
pub(crate) mod panel_gemm;
pub mod row_blocks;
pub mod softmax;

pub use activation::{relu_inplace, relu_inplace_with_level, relu_ref};
pub use attention::{
    attention, attention_decode, attention_prefill, attention_ref, attention_with_level,
    AttentionShape,
};
pub use convert::{
    argmax, bf16_to_f32, bf16_to_f32_with_level, f16_to_f32, f32_to_bf16, f32_to_f16,
};
pub use embedding::{embedding, embedding_prepacked, embedding_ref};
pub use layer_norm::{layer_norm, layer_norm_ref, layer_norm_with_level};
pub use linear::{
    bf16_dot_enabled, linear, linear_prepacked, linear_prepacked_with_level, linear_ref,
    linear_with_level, linear_with_path, par_output_rows, set_bf16_dot_enabled, LinearPath,
};
pub use row_blocks::{
    linear_row_blocks, row_blocks_supported, RowBlocks, PANEL_WIDTH, ROW_BLOCK_COLS,
};
pub use softmax::{masked_softmax, masked_softmax_ref, masked_softmax_with_level};

/// Runs `f` with `len` elements of this thread's buffer `cell`, grown as needed and reused
/// across calls (a fresh one if it is already borrowed, e.g. by a caller up the stack).
pub(crate) fn with_buf<T: Copy + Default, R>(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, T::default());
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// Number of elements above which row-wise kernels split their rows across rayon threads.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// An output buffer's pointer shared by parallel tasks that write disjoint elements (tiles
/// or column ranges that `chunks_mut` cannot express).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);

// SAFETY: users write disjoint elements from different tasks (each use site says which),
// and the buffer outlives the parallel loop that uses the pointer.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Wraps `out`'s pointer.
    pub(crate) fn new(out: &mut [f32]) -> Self {
        SharedOut(out.as_mut_ptr())
    }

    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Shared test helpers.
#[cfg(test)]
pub(crate) mod testutil {
    use proptest::prelude::*;

    /// `len` deterministic weights in [-0.5, 0.5), spread without a short period.
    pub(crate) fn weight_pattern(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 % 1000) as f32) * 1e-3 - 0.5)
            .collect()
    }

    /// `len` deterministic activations in [-1, 0.94].
    pub(crate) fn x_pattern(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 31 % 97) as f32) * 0.02 - 1.0)
            .collect()
    }

    /// `len` uniform values in [-2, 2).
    pub(crate) fn vec_f32(len: usize) -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-2.0f32..2.0, len)
    }

    /// Asserts that `got` (`m x n`) is within the error of rounding `x` (`m x k`) to bf16
    /// before multiplying by `w` (`n x k`): per output `2^-8 · Σ_l |x_l w_l|`, plus `f32`
    /// summation error, around the `f32` reference `want`.
    pub(crate) fn assert_within_bf16_rounding(
        got: &[f32],
        want: &[f32],
        x: &[f32],
        m: usize,
        w: &crate::Matrix,
        what: &str,
    ) {
        let (n, k) = (w.rows(), w.cols());
        let wf = w.to_f32_vec();
        assert_eq!(got.len(), m * n, "{what}: length");
        for i in 0..m {
            for j in 0..n {
                let abs: f32 = (0..k).map(|l| (x[i * k + l] * wf[j * k + l]).abs()).sum();
                let bound = abs * 2f32.powi(-8) + 1e-6 * (k as f32).max(10.0) * abs.max(1.0);
                let (g, e) = (got[i * n + j], want[i * n + j]);
                assert!(
                    (g - e).abs() <= bound,
                    "{what}: ({i}, {j}): got {g}, want {e}, bound {bound}"
                );
            }
        }
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
