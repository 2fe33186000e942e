//! Row-major 2-D weight matrices in `f32`, `f16` or `bf16`.

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{check_len, checked_product, Error, Result};
use crate::kernels::convert;

/// Element storage of a [`Matrix`], one variant per [`DType`].
#[derive(Debug, Clone)]
pub enum Storage {
    /// `f32` elements.
    F32(Vec<f32>),
    /// IEEE half-precision elements.
    F16(Vec<f16>),
    /// bfloat16 elements.
    BF16(Vec<bf16>),
}

impl Storage {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }
}

/// A row-major `rows x cols` matrix, used for weights.
///
/// Linear weights follow the Hugging Face `nn.Linear` layout `(out_features, in_features)`:
/// `rows` = output features, `cols` = input features. Embedding tables are
/// `(vocab, hidden)`.
#[derive(Debug, Clone)]
pub struct Matrix {
    storage: Storage,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// Wraps `storage` as a `rows x cols` matrix.
    ///
    /// Returns [`Error::ShapeMismatch`] unless `storage.len() == rows * cols`.
    pub fn new(rows: usize, cols: usize, storage: Storage) -> Result<Matrix> {
        let expected = checked_product("Matrix::new", &[rows, cols])?;
        if storage.len() != expected {
            return Err(Error::shape(
                "Matrix::new",
                format!("{rows}x{cols} = {expected} elements"),
                format!("{} elements", storage.len()),
            ));
        }
        Ok(Matrix {
            storage,
            rows,
            cols,
        })
    }

    /// Wraps `f32` data as a `rows x cols` matrix (see [`Matrix::new`]).
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Result<Matrix> {
        Matrix::new(rows, cols, Storage::F32(data))
    }

    /// Number of rows (output features for a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features for a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element type of the storage.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The underlying storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Takes the storage back, e.g. to refill a reused buffer and wrap it again with
    /// [`Matrix::new`].
    pub fn into_storage(self) -> Storage {
        self.storage
    }

    /// Size of the elements in bytes.
    pub fn nbytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size_in_bytes()
    }

    /// Converts row `r` to `f32` into `out` (length `cols`), e.g. for an embedding lookup.
    ///
    /// Errors: [`Error::IndexOutOfRange`] if `r >= rows`, [`Error::ShapeMismatch`] if
    /// `out.len() != cols`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        const OP: &str = "Matrix::row_to_f32";
        if r >= self.rows {
            return Err(Error::IndexOutOfRange {
                op: OP,
                index: r,
                len: self.rows,
            });
        }
        check_len(OP, "out", out.len(), self.cols)?;
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[span]),
            Storage::F16(v) => convert::f16_to_f32(&v[span], out),
            Storage::BF16(v) => convert::bf16_to_f32(&v[span], out),
        }
        Ok(())
    }

    /// All elements converted to `f32` (row-major).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::F16(v) => {
                let mut out = vec![0.0; v.len()];
                convert::f16_to_f32(v, &mut out);
                out
            }
            Storage::BF16(v) => {
                let mut out = vec![0.0; v.len()];
                convert::bf16_to_f32(v, &mut out);
                out
            }
        }
    }

    /// A copy converted to `dtype` (rounding to nearest, ties to even; a no-op copy when the
    /// type already matches).
    pub fn to_dtype(&self, dtype: DType) -> Matrix {
        if dtype == self.dtype() {
            return self.clone();
        }
        let f = self.to_f32_vec();
        let storage = match dtype {
            DType::F32 => Storage::F32(f),
            DType::F16 => {
                let mut v = vec![f16::ZERO; f.len()];
                convert::f32_to_f16(&f, &mut v);
                Storage::F16(v)
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; f.len()];
                convert::f32_to_bf16(&f, &mut v);
                Storage::BF16(v)
            }
        };
        Matrix {
            storage,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construct_and_convert() {
        assert!(matches!(
            Matrix::from_f32(2, 3, vec![0.0; 5]),
            Err(Error::ShapeMismatch {
                op: "Matrix::new",
                ..
            })
        ));
        assert!(Matrix::new(usize::MAX, 2, Storage::F32(vec![])).is_err());
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let m = Matrix::from_f32(2, 3, data.clone()).unwrap();
        assert_eq!(
            (m.rows(), m.cols(), m.dtype(), m.nbytes()),
            (2, 3, DType::F32, 24)
        );
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let c = m.to_dtype(dt);
            assert_eq!(c.dtype(), dt);
            assert_eq!(c.storage().dtype(), dt);
            assert_eq!(c.nbytes(), 6 * dt.size_in_bytes());
            // These values are exact in every type.
            assert_eq!(c.to_f32_vec(), data);
            let mut row = [0.0; 3];
            c.row_to_f32(1, &mut row).unwrap();
            assert_eq!(row, data[3..]);
            assert!(matches!(
                c.row_to_f32(2, &mut row),
                Err(Error::IndexOutOfRange {
                    index: 2,
                    len: 2,
                    ..
                })
            ));
            assert!(matches!(
                c.row_to_f32(0, &mut [0.0; 2]),
                Err(Error::ShapeMismatch { .. })
            ));
            assert_eq!(c.to_dtype(DType::F32).to_f32_vec(), data);
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even -> 1.0.
        let x = 1.0 + 2f32.powi(-8);
        let m = Matrix::from_f32(1, 2, vec![x, 1.0 + 3.0 * 2f32.powi(-8)]).unwrap();
        let b = m.to_dtype(DType::BF16).to_f32_vec();
        assert_eq!(b, vec![1.0, 1.0 + 2f32.powi(-6)]);
        // 1 + 2^-11 is halfway between f16 neighbours: ties to even -> 1.0.
        let m = Matrix::from_f32(1, 1, vec![1.0 + 2f32.powi(-11)]).unwrap();
        assert_eq!(m.to_dtype(DType::F16).to_f32_vec(), vec![1.0]);
    }
}
