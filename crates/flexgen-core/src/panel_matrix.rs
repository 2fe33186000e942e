//! Weights prepacked once (at load) into the panel layout of the AVX-512 GEMM.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{check_len, Error, Result};
use crate::matrix::{Matrix, Storage};

/// Output features per panel (the GEMM's `NR`).
pub(crate) const PANEL: usize = 32;

/// A linear weight (`rows` = output features, `cols` = input features) stored in the panel
/// layout that [`kernels::linear_prepacked`](crate::kernels::linear_prepacked) reads
/// directly, so that no call has to repack it. Built with [`Matrix::prepack`] or
/// [`PanelMatrix::from_matrix`].
///
/// Layout: panels of 32 output features (the last one zero-padded); inside a panel, for each
/// input index `l`, the 32 weights `w[j][l]` are consecutive. `bf16` weights are stored as
/// pairs `(w[j][2p], w[j][2p + 1])` per 32-bit word, the operand layout of `vdpbf16ps`;
/// `f16` and `f32` weights keep their type. The elements are the same values (no rounding),
/// and the size grows only by the padding (none when `rows % 32 == 0` and `cols` is even).
///
/// Without AVX-512 there is nothing to gain, and the matrix stays row-major inside.
#[derive(Debug, Clone)]
pub struct PanelMatrix {
    rows: usize,
    cols: usize,
    data: PanelData,
}

/// The storage of a [`PanelMatrix`].
#[derive(Debug, Clone)]
pub(crate) enum PanelData {
    /// Not packed (the CPU lacks AVX-512).
    RowMajor(Matrix),
    /// `f32` panels `[panel][cols][32]`.
    F32(Vec<f32>),
    /// `f16` panels `[panel][cols][32]`.
    F16(Vec<f16>),
    /// bf16 pair panels `[panel][ceil(cols / 2)][32]` words.
    Bf16Pairs(Vec<u32>),
}

impl Matrix {
    /// This matrix prepacked for [`kernels::linear_prepacked`](crate::kernels::linear_prepacked)
    /// (see [`PanelMatrix`]); the row-major storage is released once packed.
    pub fn prepack(self) -> PanelMatrix {
        PanelMatrix::from_matrix(&self)
    }
}

impl PanelMatrix {
    /// Packs `m` (a copy; `m` is unchanged). Row-major when the CPU lacks AVX-512 or when
    /// `FLEXGEN_SIMD` caps the level below it.
    pub fn from_matrix(m: &Matrix) -> PanelMatrix {
        let (rows, cols) = (m.rows(), m.cols());
        #[cfg(target_arch = "x86_64")]
        if crate::simd_level() == crate::SimdLevel::Avx512 && rows > 0 && cols > 0 {
            return PanelMatrix {
                rows,
                cols,
                data: pack(m),
            };
        }
        PanelMatrix {
            rows,
            cols,
            data: PanelData::RowMajor(m.clone()),
        }
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element type of the weights.
    pub fn dtype(&self) -> DType {
        match &self.data {
            PanelData::RowMajor(m) => m.dtype(),
            PanelData::F32(_) => DType::F32,
            PanelData::F16(_) => DType::F16,
            PanelData::Bf16Pairs(_) => DType::BF16,
        }
    }

    /// Whether the weights are in the panel layout (false: row-major, no AVX-512).
    pub fn is_packed(&self) -> bool {
        !matches!(self.data, PanelData::RowMajor(_))
    }

    /// Bytes of weight storage held (including the panel padding).
    pub fn nbytes(&self) -> usize {
        match &self.data {
            PanelData::RowMajor(m) => m.nbytes(),
            PanelData::F32(v) => v.len() * 4,
            PanelData::F16(v) => v.len() * 2,
            PanelData::Bf16Pairs(v) => v.len() * 4,
        }
    }

    pub(crate) fn data(&self) -> &PanelData {
        &self.data
    }

    /// Number of panels (`ceil(rows / 32)`).
    pub(crate) fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Converts row `r` to `f32` into `out` (length `cols`), e.g. for an embedding lookup of
    /// a tied weight. Errors: [`Error::IndexOutOfRange`] if `r >= rows`,
    /// [`Error::ShapeMismatch`] if `out.len() != cols`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        const OP: &str = "PanelMatrix::row_to_f32";
        if r >= self.rows {
            return Err(Error::IndexOutOfRange {
                op: OP,
                index: r,
                len: self.rows,
            });
        }
        check_len(OP, "out", out.len(), self.cols)?;
        let (p, c, k) = (r / PANEL, r % PANEL, self.cols);
        match &self.data {
            PanelData::RowMajor(m) => m.row_to_f32(r, out)?,
            PanelData::F32(v) => {
                for (l, o) in out.iter_mut().enumerate() {
                    *o = v[(p * k + l) * PANEL + c];
                }
            }
            PanelData::F16(v) => {
                for (l, o) in out.iter_mut().enumerate() {
                    *o = v[(p * k + l) * PANEL + c].to_f32();
                }
            }
            PanelData::Bf16Pairs(v) => {
                let kp = k.div_ceil(2);
                for (l, o) in out.iter_mut().enumerate() {
                    let word = v[(p * kp + l / 2) * PANEL + c];
                    let bits = (word >> (16 * (l % 2))) as u16;
                    *o = bf16::from_bits(bits).to_f32();
                }
            }
        }
        Ok(())
    }

    /// The weights as a row-major [`Matrix`] of the same dtype (exact).
    pub fn to_matrix(&self) -> Matrix {
        if let PanelData::RowMajor(m) = &self.data {
            return m.clone();
        }
        let (n, k) = (self.rows, self.cols);
        let mut f = vec![0.0f32; n * k];
        if k > 0 {
            f.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
                // Cannot fail: `r < rows` and `row.len() == cols`.
                let _ = self.row_to_f32(r, row);
            });
        }
        let storage = match self.dtype() {
            DType::F32 => Storage::F32(f),
            DType::F16 => Storage::F16(f.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => Storage::BF16(f.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        // Cannot fail: `n * k` elements.
        Matrix::new(n, k, storage).expect("PanelMatrix::to_matrix: shape")
    }
}

/// Packs `m` (`rows, cols > 0`) into panels; the CPU supports AVX-512.
#[cfg(target_arch = "x86_64")]
fn pack(m: &Matrix) -> PanelData {
    use crate::simd::avx512_gemm::{f32_to_f16_words, pack_weights, WeightWords};
    let (n, k) = (m.rows(), m.cols());
    let panels = n.div_ceil(PANEL);
    // Packs panel `p` as words (f32 values or bf16 pairs) into `dst`.
    let pack_panel = |src: WeightWords<'_>, p: usize, dst: &mut [u32]| {
        let kw = src.words_per_row(k);
        // SAFETY: AVX-512 was checked by the caller (`simd_level()`); `src` holds `n * k`
        // elements (a `Matrix` invariant) and `dst` one panel of `kw * PANEL` words.
        unsafe { pack_weights(src, n, k, p * PANEL, 1, 0, kw, dst) }
    };
    match m.storage() {
        Storage::F32(d) => {
            let mut out = vec![0u32; panels * k * PANEL];
            out.par_chunks_mut(k * PANEL)
                .enumerate()
                .for_each(|(p, dst)| pack_panel(WeightWords::F32(d), p, dst));
            PanelData::F32(bytemuck::cast_vec(out))
        }
        Storage::BF16(d) => {
            let kp = k.div_ceil(2);
            let mut out = vec![0u32; panels * kp * PANEL];
            out.par_chunks_mut(kp * PANEL)
                .enumerate()
                .for_each(|(p, dst)| pack_panel(WeightWords::Bf16Pairs(d), p, dst));
            PanelData::Bf16Pairs(out)
        }
        Storage::F16(d) => {
            let mut out = vec![f16::ZERO; panels * k * PANEL];
            out.par_chunks_mut(k * PANEL).enumerate().for_each_init(
                || vec![0u32; k * PANEL],
                |words, (p, dst)| {
                    pack_panel(WeightWords::F16(d), p, words);
                    // SAFETY: AVX-512 checked by the caller; `dst.len() == words.len()`.
                    unsafe { f32_to_f16_words(words, dst) };
                },
            );
            PanelData::F16(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rows() {
        for &(n, k) in &[(1, 1), (33, 7), (64, 64), (70, 129)] {
            let data: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let base = Matrix::from_f32(n, k, data).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let m = base.to_dtype(dt);
                let p = m.clone().prepack();
                assert_eq!((p.rows(), p.cols(), p.dtype()), (n, k, dt));
                assert_eq!(p.to_matrix().to_f32_vec(), m.to_f32_vec(), "{dt} {n}x{k}");
                assert!(p.nbytes() >= m.nbytes());
                let mut row = vec![0.0; k];
                p.row_to_f32(n - 1, &mut row).unwrap();
                assert_eq!(row, m.to_f32_vec()[(n - 1) * k..]);
                assert!(matches!(
                    p.row_to_f32(n, &mut row),
                    Err(Error::IndexOutOfRange { .. })
                ));
                assert!(matches!(
                    p.row_to_f32(0, &mut row[..k - 1]),
                    Err(Error::ShapeMismatch { .. })
                ));
                assert_eq!(
                    p.is_packed(),
                    crate::simd_level() == crate::SimdLevel::Avx512
                );
            }
        }
        // No padding when rows % 32 == 0 and cols is even.
        let m = Matrix::from_f32(64, 8, vec![0.5; 512]).unwrap();
        assert_eq!(m.to_dtype(DType::BF16).prepack().nbytes(), 64 * 8 * 2);
    }
}
