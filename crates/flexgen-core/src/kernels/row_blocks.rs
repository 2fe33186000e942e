//! Linear layers over weights that decode themselves block by block ([`RowBlocks`]).
//!
//! A compressed weight (4-bit codes, say) cannot feed the packed-panel GEMM as it is, and
//! decoding the whole matrix to `f32` first costs a full-size buffer and a round trip through
//! memory. [`linear_row_blocks`] asks the weight for one block of `f32` values at a time (at
//! most 256 output features x [`ROW_BLOCK_COLS`] inputs, 256 KiB, in a per-thread buffer that
//! stays in L2), packs it into the GEMM's panels and multiplies it with every row of `x`, so
//! each weight value is decoded once per call and the GEMM runs at its `f32` rate from
//! `m` of about 16 up.

use crate::error::Result;
use crate::simd::SimdLevel;

/// Columns per block: every [`RowBlocks::write_block`] call asks for columns starting at a
/// multiple of this (and `min(ROW_BLOCK_COLS, cols - c0)` of them).
pub const ROW_BLOCK_COLS: usize = 256;

/// Output features per GEMM panel (see [`RowBlocks::write_panels`]).
pub const PANEL_WIDTH: usize = 32;

/// A `rows x cols` weight (`y = x · Wᵀ`) that writes any block of itself as `f32`.
pub trait RowBlocks: Sync {
    /// Output features (`n`).
    fn rows(&self) -> usize;
    /// Input features (`k`).
    fn cols(&self) -> usize;
    /// Writes rows `r0 .. r0 + rows`, columns `c0 .. c0 + cols` into `dst` (row-major,
    /// `cols` values per row, `dst.len() == rows * cols`). `c0` is a multiple of
    /// [`ROW_BLOCK_COLS`], `cols <= ROW_BLOCK_COLS`, and the block lies inside the matrix.
    fn write_block(&self, r0: usize, rows: usize, c0: usize, cols: usize, dst: &mut [f32]);

    /// The same block straight in the GEMM's panel layout, where the source can do it faster
    /// than [`RowBlocks::write_block`] plus a transposing copy: `rows.div_ceil(PANEL_WIDTH)`
    /// panels of `cols` steps of [`PANEL_WIDTH`] values,
    /// `dst[(p * cols + s) * PANEL_WIDTH + j] = W[r0 + p * PANEL_WIDTH + j, c0 + s]`, zero where
    /// `p * PANEL_WIDTH + j >= rows`. Arguments as for `write_block` but
    /// `dst.len() == rows.div_ceil(PANEL_WIDTH) * cols * PANEL_WIDTH`. Returns `false` (and
    /// writes nothing) where there is no such path; the default does.
    fn write_panels(
        &self,
        r0: usize,
        rows: usize,
        c0: usize,
        cols: usize,
        dst: &mut [f32],
    ) -> bool {
        let _ = (r0, rows, c0, cols, dst);
        false
    }
}

/// Whether [`linear_row_blocks`] runs on this CPU (it needs AVX-512 F/BW/VL).
pub fn row_blocks_supported() -> bool {
    cfg!(target_arch = "x86_64") && SimdLevel::Avx512.is_available()
}

/// `out[m, n] = x[m, k] · Wᵀ + bias` for a weight that decodes itself block by block, with
/// the packed-panel GEMM's `f32` micro-kernel (exact `f32` products of the decoded values,
/// summed in blocks of `k`).
///
/// # Errors
/// A shape error when a length disagrees with `w`'s shape; an invalid-argument error when
/// [`row_blocks_supported`] is false.
pub fn linear_row_blocks(
    x: &[f32],
    m: usize,
    w: &dyn RowBlocks,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "linear_row_blocks";
    crate::simd::ensure_available(OP, SimdLevel::Avx512)?;
    let (n, k) = (w.rows(), w.cols());
    super::linear::check_dims_of(OP, x, m, n, k, bias, out)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        super::linear::fill_bias(out, n, bias);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    super::panel_gemm::gemm_row_blocks(x, m, w, bias, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::linear::linear_ref;
    use crate::kernels::testutil::{assert_close, vec_f32, weight_pattern, x_pattern};
    use crate::Matrix;
    use proptest::prelude::*;

    /// A plain `f32` matrix served block by block (and, with `panels`, in panel layout),
    /// checking the calls' contract.
    struct Blocks<'a> {
        n: usize,
        k: usize,
        w: &'a [f32],
        panels: bool,
    }

    impl Blocks<'_> {
        /// The block asked for follows the contract of [`RowBlocks::write_block`].
        fn check_call(&self, r0: usize, rows: usize, c0: usize, cols: usize) {
            assert!(c0.is_multiple_of(ROW_BLOCK_COLS) && cols <= ROW_BLOCK_COLS && cols > 0);
            assert!(r0 + rows <= self.n && c0 + cols <= self.k);
        }
    }

    impl RowBlocks for Blocks<'_> {
        fn rows(&self) -> usize {
            self.n
        }
        fn cols(&self) -> usize {
            self.k
        }
        fn write_block(&self, r0: usize, rows: usize, c0: usize, cols: usize, dst: &mut [f32]) {
            self.check_call(r0, rows, c0, cols);
            assert_eq!(dst.len(), rows * cols);
            for r in 0..rows {
                let src = &self.w[(r0 + r) * self.k + c0..][..cols];
                dst[r * cols..(r + 1) * cols].copy_from_slice(src);
            }
        }
        fn write_panels(
            &self,
            r0: usize,
            rows: usize,
            c0: usize,
            cols: usize,
            dst: &mut [f32],
        ) -> bool {
            if !self.panels {
                return false;
            }
            self.check_call(r0, rows, c0, cols);
            let np = rows.div_ceil(PANEL_WIDTH);
            assert_eq!(dst.len(), np * cols * PANEL_WIDTH);
            dst.fill(f32::NAN);
            for p in 0..np {
                for s in 0..cols {
                    for j in 0..PANEL_WIDTH {
                        let r = p * PANEL_WIDTH + j;
                        dst[(p * cols + s) * PANEL_WIDTH + j] = if r < rows {
                            self.w[(r0 + r) * self.k + c0 + s]
                        } else {
                            0.0
                        };
                    }
                }
            }
            true
        }
    }

    fn check(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], bias: Option<&[f32]>) {
        let mut want = vec![0.0; m * n];
        let mat = Matrix::from_f32(n, k, w.to_vec()).unwrap();
        linear_ref(x, m, &mat, bias, &mut want).unwrap();
        for panels in [false, true] {
            let mut got = vec![f32::NAN; m * n];
            let r = linear_row_blocks(x, m, &Blocks { n, k, w, panels }, bias, &mut got);
            if !row_blocks_supported() {
                assert!(r.is_err());
                return;
            }
            r.unwrap();
            let what = format!("{m}x{k}x{n} panels {panels}");
            assert_close(&got, &want, 1e-6 * (k as f32).max(10.0), &what);
        }
    }

    /// Several blocks of `k` (a ragged last one), several tasks, partial panels and tiles.
    #[test]
    fn block_and_tail_shapes() {
        for &(m, k, n) in &[(25, 1001, 300), (16, 512, 64), (13, 37, 45), (1, 1, 1)] {
            let w = weight_pattern(n * k);
            let x = x_pattern(m * k);
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
            check(m, n, k, &x, &w, Some(&bias));
            check(m, n, k, &x, &w, None);
        }
    }

    #[test]
    fn shape_errors() {
        let w = [0.0f32; 6];
        let mut out = [0.0; 2];
        let e = linear_row_blocks(
            &[1.0; 4],
            1,
            &Blocks {
                n: 2,
                k: 3,
                w: &w,
                panels: false,
            },
            None,
            &mut out,
        );
        assert!(e.is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn matches_ref(
            (m, n, k, x, w, b) in (1usize..40, 1usize..80, 1usize..600).prop_flat_map(|(m, n, k)| {
                (Just(m), Just(n), Just(k), vec_f32(m * k), vec_f32(n * k), vec_f32(n))
            }),
            with_bias in any::<bool>(),
        ) {
            check(m, n, k, &x, &w, with_bias.then_some(&b[..]));
        }
    }
}
