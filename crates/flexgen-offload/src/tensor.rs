//! What a model declares about its weights and KV cache, and the tensors the runtime hands its
//! forward pass.

use flexgen_core::{DType, Matrix, Storage};
use flexgen_quant::{CompressionConfig, QuantizedTensor};
use half::f16;

use crate::error::{Error, Result};

/// The shape and storage type of a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// A 2-D weight (a linear layer's `(out, in)` or an embedding table), stored in `dtype`.
    Matrix {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Storage type when not compressed.
        dtype: DType,
    },
    /// A 1-D tensor (bias, layer-norm parameter), kept in `f32` on the compute tier.
    Vector {
        /// Length.
        len: usize,
    },
}

/// One weight of a layer: a name the model's [`WeightSource`](crate::WeightSource) knows, and its
/// kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpec {
    /// Name in the checkpoint (e.g. `decoder.layers.0.fc1.weight`).
    pub name: String,
    /// Shape and dtype.
    pub kind: TensorKind,
}

impl WeightSpec {
    /// A 2-D weight.
    pub fn matrix(name: impl Into<String>, rows: usize, cols: usize, dtype: DType) -> Self {
        WeightSpec {
            name: name.into(),
            kind: TensorKind::Matrix { rows, cols, dtype },
        }
    }

    /// A 1-D weight.
    pub fn vector(name: impl Into<String>, len: usize) -> Self {
        WeightSpec {
            name: name.into(),
            kind: TensorKind::Vector { len },
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        match self.kind {
            TensorKind::Matrix { rows, cols, .. } => rows as u64 * cols as u64,
            TensorKind::Vector { len } => len as u64,
        }
    }

    /// Whether it is 1-D.
    pub fn is_vector(&self) -> bool {
        matches!(self.kind, TensorKind::Vector { .. })
    }

    /// Bytes it occupies when stored as the runtime stores it: compressed with `compress` if
    /// given and 2-D, else in its dtype (`f32` for vectors).
    pub fn stored_bytes(&self, compress: Option<&CompressionConfig>) -> u64 {
        match (self.kind, compress) {
            (TensorKind::Vector { len }, _) => len as u64 * 4,
            (TensorKind::Matrix { rows, cols, .. }, Some(c)) => {
                packed_layout(&[rows, cols], c).total()
            }
            (TensorKind::Matrix { rows, cols, dtype }, None) => {
                rows as u64 * cols as u64 * dtype.size_in_bytes() as u64
            }
        }
    }
}

/// Byte sizes of a compressed tensor's codes and parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayout {
    /// Bytes of packed codes.
    pub codes: u64,
    /// Bytes of `(step, min)` parameters (`f16` pairs).
    pub params: u64,
}

impl PackedLayout {
    /// Codes plus parameters.
    pub fn total(&self) -> u64 {
        self.codes + self.params
    }
}

/// The layout [`QuantizedTensor::compress`] produces for `shape` under `config`.
pub fn packed_layout(shape: &[usize], config: &CompressionConfig) -> PackedLayout {
    let dim = config.group_dim.min(shape.len().saturating_sub(1));
    let n = shape.get(dim).copied().unwrap_or(0) as u64;
    let lines: u64 = shape
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != dim)
        .map(|(_, &s)| s as u64)
        .product();
    let groups = lines * n.div_ceil(config.group_size as u64);
    PackedLayout {
        codes: groups * config.group_bytes() as u64,
        params: groups * 4,
    }
}

/// A weight as a forward pass sees it.
#[derive(Debug, Clone, Default)]
pub enum Tensor {
    /// A 2-D weight in `f32`, `f16` or `bf16`.
    Dense(Matrix),
    /// A group-wise quantized 2-D weight.
    Packed(QuantizedTensor),
    /// A 1-D weight in `f32`.
    Vector(Vec<f32>),
    /// Nothing: the tensor is lent out (a forward pass takes weights out to build its own
    /// parameter structs and must put them back).
    #[default]
    Empty,
}

impl Tensor {
    /// Moves the tensor out, leaving [`Tensor::Empty`].
    pub fn take(&mut self) -> Tensor {
        std::mem::take(self)
    }

    /// Bytes held.
    pub fn nbytes(&self) -> u64 {
        match self {
            Tensor::Dense(m) => m.nbytes() as u64,
            Tensor::Packed(q) => q.nbytes() as u64,
            Tensor::Vector(v) => v.len() as u64 * 4,
            Tensor::Empty => 0,
        }
    }

    /// Whether it is lent out.
    pub fn is_empty(&self) -> bool {
        matches!(self, Tensor::Empty)
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Tensor::Dense(m) => format!("{}x{} {} matrix", m.rows(), m.cols(), m.dtype()),
            Tensor::Packed(q) => format!("{:?} compressed ({})", q.shape(), q.config()),
            Tensor::Vector(v) => format!("vector of {}", v.len()),
            Tensor::Empty => "nothing (lent out)".into(),
        }
    }

    /// A zeroed dense matrix of `rows x cols` in `dtype`.
    pub fn zeros(rows: usize, cols: usize, dtype: DType) -> Result<Tensor> {
        let n = rows * cols;
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
            DType::BF16 => Storage::BF16(vec![half::bf16::ZERO; n]),
        };
        Ok(Tensor::Dense(Matrix::new(rows, cols, storage)?))
    }
}

/// The little-endian bytes of a storage, for I/O.
pub(crate) fn storage_bytes(s: &Storage) -> &[u8] {
    match s {
        Storage::F32(v) => bytemuck::cast_slice(v),
        Storage::F16(v) => bytemuck::cast_slice(v),
        Storage::BF16(v) => bytemuck::cast_slice(v),
    }
}

/// Mutable bytes of a storage, for I/O.
pub(crate) fn storage_bytes_mut(s: &mut Storage) -> &mut [u8] {
    match s {
        Storage::F32(v) => bytemuck::cast_slice_mut(v),
        Storage::F16(v) => bytemuck::cast_slice_mut(v),
        Storage::BF16(v) => bytemuck::cast_slice_mut(v),
    }
}

/// Element type of a KV-cache plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// `f32` values.
    F32,
    /// `f16` values (quantization parameters).
    F16,
    /// Bytes (packed codes).
    U8,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 => 2,
            Elem::U8 => 1,
        }
    }
}

/// One array of a layer's KV cache, laid out `[sequence, capacity, per_token]`: each sequence's
/// tokens are contiguous, so the cache splits along the batch in whole sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneSpec {
    /// Element type.
    pub elem: Elem,
    /// Elements per token per sequence.
    pub per_token: usize,
}

impl PlaneSpec {
    /// Bytes per token per sequence.
    pub fn token_bytes(&self) -> usize {
        self.elem.size() * self.per_token
    }
}

/// The KV cache a layer keeps per sequence: one or more planes (e.g. keys and values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// The planes.
    pub planes: Vec<PlaneSpec>,
}

impl CacheSpec {
    /// Bytes per token per sequence over all planes.
    pub fn token_bytes(&self) -> usize {
        self.planes.iter().map(PlaneSpec::token_bytes).sum()
    }
}

/// A cache plane's buffer.
#[derive(Debug, Clone)]
pub enum PlaneBuf {
    /// `f32` values.
    F32(Vec<f32>),
    /// `f16` values.
    F16(Vec<f16>),
    /// Bytes.
    U8(Vec<u8>),
}

impl PlaneBuf {
    /// A zeroed buffer of `len` elements of `elem`.
    pub fn zeros(elem: Elem, len: usize) -> Self {
        match elem {
            Elem::F32 => PlaneBuf::F32(vec![0.0; len]),
            Elem::F16 => PlaneBuf::F16(vec![f16::ZERO; len]),
            Elem::U8 => PlaneBuf::U8(vec![0; len]),
        }
    }

    /// The element type.
    pub fn elem(&self) -> Elem {
        match self {
            PlaneBuf::F32(_) => Elem::F32,
            PlaneBuf::F16(_) => Elem::F16,
            PlaneBuf::U8(_) => Elem::U8,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            PlaneBuf::F32(v) => v.len(),
            PlaneBuf::F16(v) => v.len(),
            PlaneBuf::U8(v) => v.len(),
        }
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`PlaneBuf::zeros`]`(elem, len)`, reusing (and zeroing) a buffer of that type and
    /// length from `spares` when one is there: its pages are already mapped, so writing the
    /// cache does not fault them in again.
    pub fn zeros_reusing(spares: &mut Vec<PlaneBuf>, elem: Elem, len: usize) -> Self {
        match spares
            .iter()
            .position(|b| b.elem() == elem && b.len() == len)
        {
            Some(i) => {
                let mut b = spares.swap_remove(i);
                b.bytes_mut().fill(0);
                b
            }
            None => PlaneBuf::zeros(elem, len),
        }
    }

    /// Bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            PlaneBuf::F32(v) => bytemuck::cast_slice(v),
            PlaneBuf::F16(v) => bytemuck::cast_slice(v),
            PlaneBuf::U8(v) => v,
        }
    }

    /// Mutable bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            PlaneBuf::F32(v) => bytemuck::cast_slice_mut(v),
            PlaneBuf::F16(v) => bytemuck::cast_slice_mut(v),
            PlaneBuf::U8(v) => v,
        }
    }

    /// The `f32` values, or an error naming the plane's actual type.
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            PlaneBuf::F32(v) => Ok(v),
            other => Err(Error::Model(format!(
                "cache plane is {other:?}-typed, not f32"
            ))),
        }
    }

    /// The `f16` values.
    pub fn as_f16_mut(&mut self) -> Result<&mut [f16]> {
        match self {
            PlaneBuf::F16(v) => Ok(v),
            _ => Err(Error::Model("cache plane is not f16".into())),
        }
    }

    /// The bytes of a `U8` plane.
    pub fn as_u8_mut(&mut self) -> Result<&mut [u8]> {
        self.as_u8_vec().map(Vec::as_mut_slice)
    }

    /// The buffer of a `U8` plane (e.g. to move it into a compressed cache for a step).
    pub fn as_u8_vec(&mut self) -> Result<&mut Vec<u8>> {
        match self {
            PlaneBuf::U8(v) => Ok(v),
            _ => Err(Error::Model("cache plane is not u8".into())),
        }
    }

    /// The buffer of an `F16` plane.
    pub fn as_f16_vec(&mut self) -> Result<&mut Vec<f16>> {
        match self {
            PlaneBuf::F16(v) => Ok(v),
            _ => Err(Error::Model("cache plane is not f16".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_layout_matches_the_quantizer() {
        for (shape, cfg) in [
            (vec![16usize, 100], CompressionConfig::WEIGHT_4BIT),
            (vec![100, 16], CompressionConfig::FLEXGEN_WEIGHT),
            (vec![3, 130], CompressionConfig::WEIGHT_8BIT),
        ] {
            let data: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|i| (i as f32).sin())
                .collect();
            let q = QuantizedTensor::compress(&data, &shape, cfg).unwrap();
            let l = packed_layout(&shape, &cfg);
            assert_eq!(l.codes as usize, q.codes().len(), "{shape:?} {cfg}");
            assert_eq!(l.params as usize, q.params().len() * 2);
            let spec = WeightSpec::matrix("w", shape[0], shape[1], DType::F16);
            assert_eq!(spec.stored_bytes(Some(&cfg)), q.nbytes() as u64);
            assert_eq!(spec.stored_bytes(None), (shape[0] * shape[1] * 2) as u64);
        }
        assert_eq!(WeightSpec::vector("b", 5).stored_bytes(None), 20);
    }

    #[test]
    fn tensors_and_planes() {
        let mut t = Tensor::zeros(2, 3, DType::BF16).unwrap();
        assert_eq!(t.nbytes(), 12);
        let taken = t.take();
        assert!(t.is_empty() && !taken.is_empty());
        assert!(taken.describe().contains("2x3 bf16"));
        let mut p = PlaneBuf::zeros(Elem::F16, 4);
        assert_eq!(p.bytes().len(), 8);
        assert!(p.as_f32_mut().is_err() && p.as_f16_mut().is_ok() && p.as_u8_mut().is_err());
        assert_eq!(
            CacheSpec {
                planes: vec![
                    PlaneSpec {
                        elem: Elem::F32,
                        per_token: 3
                    },
                    PlaneSpec {
                        elem: Elem::U8,
                        per_token: 5
                    }
                ]
            }
            .token_bytes(),
            17
        );
    }
}
