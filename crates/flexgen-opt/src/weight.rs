//! [`Weight`]: a 2-D model weight stored dense (`f32`/`f16`/`bf16`) or group-wise quantized,
//! with the two operations the model needs from it (a linear layer and a row lookup).

use flexgen_core::{kernels, DType, Matrix};
use flexgen_quant::{CompressionConfig, QuantizedTensor};

use crate::error::Result;

/// A 2-D weight in Hugging Face's `(out, in)` layout (embedding tables: `(vocab, dim)`).
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense storage, converted to `f32` inside the kernels.
    Dense(Matrix),
    /// Group-wise quantized (see [`flexgen_quant`]); the kernels compute from the codes.
    Packed(QuantizedTensor),
}

/// How a [`Weight`] is stored; prints as `f16`, `q4/g64`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dense, in this dtype.
    Dense(DType),
    /// Quantized with this config.
    Packed(CompressionConfig),
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightFormat::Dense(d) => write!(f, "{d}"),
            WeightFormat::Packed(c) => {
                write!(f, "q{}/g{}", c.num_bits, c.group_size)?;
                if c.symmetric {
                    f.write_str("/sym")?;
                }
                Ok(())
            }
        }
    }
}

impl From<Matrix> for Weight {
    fn from(m: Matrix) -> Self {
        Weight::Dense(m)
    }
}

impl Weight {
    /// Quantizes `m` with `config` (dropping the dense copy), or keeps it dense for `None`.
    pub fn new(m: Matrix, config: Option<CompressionConfig>) -> Result<Self> {
        Ok(match config {
            Some(c) => Weight::Packed(QuantizedTensor::from_matrix(&m, c)?),
            None => Weight::Dense(m),
        })
    }

    /// Rows (`out` features, or vocabulary entries).
    pub fn rows(&self) -> usize {
        match self {
            Weight::Dense(m) => m.rows(),
            Weight::Packed(q) => q.shape()[0],
        }
    }

    /// Columns (`in` features, or embedding size).
    pub fn cols(&self) -> usize {
        match self {
            Weight::Dense(m) => m.cols(),
            Weight::Packed(q) => q.shape()[1],
        }
    }

    /// The storage format (dense dtype or quantization config).
    pub fn dtype(&self) -> WeightFormat {
        match self {
            Weight::Dense(m) => WeightFormat::Dense(m.dtype()),
            Weight::Packed(q) => WeightFormat::Packed(*q.config()),
        }
    }

    /// Bytes held by the weight's storage.
    pub fn nbytes(&self) -> usize {
        match self {
            Weight::Dense(m) => m.nbytes(),
            Weight::Packed(q) => q.nbytes(),
        }
    }

    /// The dense matrix, if the weight is not quantized.
    pub fn as_dense(&self) -> Option<&Matrix> {
        match self {
            Weight::Dense(m) => Some(m),
            Weight::Packed(_) => None,
        }
    }

    /// `out[rows, self.rows()] = x[rows, self.cols()] · Wᵀ + bias`.
    pub fn linear(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            Weight::Dense(m) => kernels::linear(x, rows, m, bias, out)?,
            Weight::Packed(q) => flexgen_quant::linear_packed(x, rows, q, bias, out)?,
        }
        Ok(())
    }

    /// Rows `ids` of the table into `out` (`ids.len() * cols`), as `f32`.
    pub fn embedding(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        match self {
            Weight::Dense(m) => kernels::embedding(m, ids, out)?,
            Weight::Packed(q) => flexgen_quant::embedding_packed(q, ids, out)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_and_packed_agree() {
        let (n, k) = (40, 96);
        let data: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let m = Matrix::from_f32(n, k, data).unwrap();
        let dense = Weight::new(m.clone(), None).unwrap();
        let packed = Weight::new(m, Some(CompressionConfig::WEIGHT_4BIT)).unwrap();
        assert_eq!((packed.rows(), packed.cols()), (n, k));
        assert_eq!(dense.dtype().to_string(), "f32");
        assert_eq!(packed.dtype().to_string(), "q4/g64");
        assert!(packed.nbytes() * 5 < dense.nbytes());
        assert!(dense.as_dense().is_some() && packed.as_dense().is_none());
        let x: Vec<f32> = (0..2 * k).map(|i| (i as f32 * 0.3).sin()).collect();
        let (mut yd, mut yp) = (vec![0.0; 2 * n], vec![0.0; 2 * n]);
        dense.linear(&x, 2, None, &mut yd).unwrap();
        packed.linear(&x, 2, None, &mut yp).unwrap();
        // Each weight is off by at most half a step (range 1 / 15 levels / 2, plus f16
        // rounding), so output i is off by at most that times sum |x_i|.
        for (i, (rd, rp)) in yd.chunks(n).zip(yp.chunks(n)).enumerate() {
            let bound = x[i * k..(i + 1) * k].iter().map(|v| v.abs()).sum::<f32>() * 0.034;
            for (a, b) in rd.iter().zip(rp) {
                assert!((a - b).abs() <= bound, "{a} vs {b} (bound {bound})");
            }
        }
        let (mut ed, mut ep) = (vec![0.0; 2 * k], vec![0.0; 2 * k]);
        dense.embedding(&[3, 39], &mut ed).unwrap();
        packed.embedding(&[3, 39], &mut ep).unwrap();
        for (a, b) in ed.iter().zip(&ep) {
            assert!((a - b).abs() <= 0.5 / 15.0 + 1e-3, "{a} vs {b}");
        }
        assert!(packed.embedding(&[40], &mut ep[..k]).is_err());
    }
}
