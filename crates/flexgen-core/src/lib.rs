//! Tensors, dtypes and CPU kernels for flexgen.
//!
//! Activations are plain row-major `f32` slices; weights are [`Matrix`] values stored in
//! `f32`, `f16` or `bf16` and converted to `f32` inside the kernels. Every kernel checks its
//! shapes and returns [`Error`] rather than panicking, picks its SIMD code path once at run
//! time ([`simd_level`]: AVX-512, AVX2+FMA or scalar; override with `FLEXGEN_SIMD`), uses
//! rayon across cores, and has a scalar `*_ref` twin used as the reference in tests.
//!
//! | item | purpose |
//! |------|---------|
//! | [`Matrix`], [`Storage`], [`DType`] | row-major weights in `f32`/`f16`/`bf16` |
//! | [`PanelMatrix`] ([`Matrix::prepack`]) | weights prepacked once for [`kernels::linear_prepacked`] |
//! | [`kernels::linear()`] | `y = x · Wᵀ + b` (GEMV kernel for decode, packed-panel AVX-512 GEMM for larger batches) |
//! | [`kernels::layer_norm()`], [`kernels::relu_inplace`] | normalisation and activation |
//! | [`kernels::masked_softmax`], [`kernels::attention()`] | masked softmax and multi-head attention over a KV cache |
//! | [`kernels::embedding()`], [`kernels::argmax`] | token embedding gather and greedy pick |
//! | [`SimdLevel`], [`simd_level`] | run-time SIMD selection |
//! | [`HugePageAlloc`] | global allocator putting large buffers on transparent huge pages |
//!
//! # Example
//!
//! ```
//! use flexgen_core::{kernels, DType, Matrix};
//!
//! // A 3 x 4 linear layer (out_features = 3, in_features = 4), stored in f16.
//! let w = Matrix::from_f32(3, 4, (0..12).map(|i| i as f32).collect())?.to_dtype(DType::F16);
//! let x = [1.0, 0.0, -1.0, 0.5]; // one input row (m = 1)
//! let mut y = [0.0; 3];
//! kernels::linear(&x, 1, &w, Some(&[0.0, 1.0, 2.0]), &mut y)?;
//! assert_eq!(y, [-0.5, 2.5, 5.5]);
//! # Ok::<(), flexgen_core::Error>(())
//! ```

pub mod dtype;
pub mod env_switch;
pub mod error;
pub mod huge_pages;
pub mod kernels;
pub mod matrix;
pub mod panel_matrix;
pub mod simd;

pub use dtype::DType;
pub use env_switch::EnvSwitch;
pub use error::{Error, Result};
pub use huge_pages::HugePageAlloc;
pub use matrix::{Matrix, Storage};
pub use panel_matrix::PanelMatrix;
pub use simd::{simd_level, SimdLevel};
