//! Memory-mapped safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, with tensor names found with or without the `model.` prefix.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use flexgen_core::{DType, Matrix, Storage};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// A raw tensor borrowed from a memory-mapped shard.
pub struct RawTensor<'a> {
    /// The name as stored in the file.
    pub name: String,
    /// The file it lives in.
    pub path: &'a Path,
    /// safetensors dtype.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Little-endian bytes of the tensor.
    pub data: &'a [u8],
}

/// Where a tensor's bytes sit on disk (see [`Checkpoint::locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// The shard file.
    pub path: PathBuf,
    /// Byte offset of the tensor in the file.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Stored dtype.
    pub dtype: DType,
    /// Stored shape.
    pub shape: Vec<usize>,
}

/// Where one tensor lives: its shard, dtype, shape and byte range in the mapping.
struct TensorEntry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// The weight files of one model folder, memory-mapped, with an index from tensor name to file.
pub struct Checkpoint {
    folder: PathBuf,
    shards: Vec<Shard>,
    /// tensor name as stored -> location
    index: HashMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens the weights of `folder`: `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json`. Every file's header is parsed (and its length checked
    /// against the header) up front, so a truncated file fails here, naming itself.
    pub fn open(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref().to_path_buf();
        let single = folder.join("model.safetensors");
        let index_path = folder.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            shard_files_from_index(&folder, &index_path)?
        } else {
            return Err(Error::MissingFile {
                what: "weights (model.safetensors or model.safetensors.index.json)",
                path: folder,
            });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the file is opened read-only and the mapping is only read. Another process
            // truncating the checkpoint while we run would fault, which is the same contract
            // every mmap-based loader (safetensors, candle) accepts.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = TensorEntry {
                    shard: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    range: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            shards.push(Shard { path, mmap });
        }
        Ok(Checkpoint {
            folder,
            shards,
            index,
        })
    }

    /// The folder this checkpoint was opened from.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Number of tensors across all shards.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the checkpoint holds no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether a tensor is present, under `name` or `model.{name}`.
    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn resolve(&self, name: &str) -> Option<(String, &TensorEntry)> {
        let prefixed = format!("model.{name}");
        [name.to_string(), prefixed]
            .into_iter()
            .find_map(|n| self.index.get(&n).map(|e| (n, e)))
    }

    /// Borrows tensor `name` (looked up as given and with a `model.` prefix).
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (stored, entry) = self.resolve(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.folder.display().to_string(),
        })?;
        let shard = &self.shards[entry.shard];
        Ok(RawTensor {
            name: stored,
            path: &shard.path,
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data: &shard.mmap[entry.range.clone()],
        })
    }

    /// Where tensor `name`'s bytes sit in its file (for reading it in place with positioned
    /// I/O instead of through the mapping), and its dtype (f32, f16 or bf16) and shape.
    pub fn locate(&self, name: &str) -> Result<TensorLocation> {
        let raw = self.raw(name)?;
        let (_, entry) = self.resolve(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.folder.display().to_string(),
        })?;
        let dtype = match raw.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => return Err(raw.unsupported()),
        };
        Ok(TensorLocation {
            path: raw.path.to_path_buf(),
            offset: entry.range.start as u64,
            len: entry.range.len() as u64,
            dtype,
            shape: raw.shape,
        })
    }

    /// Loads a 2-D tensor of shape `[rows, cols]`, keeping its stored dtype (f32, f16 or bf16).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let raw = self.raw(name)?;
        raw.expect_shape(&[rows, cols])?;
        let storage = match raw.dtype {
            Dtype::F32 => Storage::F32(bytemuck::pod_collect_to_vec::<u8, f32>(raw.data)),
            Dtype::F16 => Storage::F16(bytemuck::pod_collect_to_vec::<u8, f16>(raw.data)),
            Dtype::BF16 => Storage::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(raw.data)),
            _ => return Err(raw.unsupported()),
        };
        Ok(Matrix::new(rows, cols, storage)?)
    }

    /// Loads a 1-D tensor of length `len` as f32 (biases and layer norms are kept in f32).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let raw = self.raw(name)?;
        raw.expect_shape(&[len])?;
        raw.to_f32()
    }
}

impl RawTensor<'_> {
    fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::TensorShape {
                name: self.name.clone(),
                path: self.path.to_path_buf(),
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    fn unsupported(&self) -> Error {
        Error::UnsupportedDtype {
            name: self.name.clone(),
            path: self.path.to_path_buf(),
            dtype: format!("{:?}", self.dtype),
        }
    }

    /// The values converted to f32 (f32, f16 and bf16 storage).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(self.data),
            Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(self.data)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(self.data)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            _ => return Err(self.unsupported()),
        })
    }
}

/// The distinct shard files named by an index's `weight_map`, in first-seen order.
fn shard_files_from_index(folder: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(index_path, e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index_path, "no \"weight_map\" object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::config(
                index_path,
                format!("weight_map[{tensor:?}] is not a string"),
            )
        })?;
        let path = folder.join(file);
        if !files.contains(&path) {
            if !path.exists() {
                return Err(Error::MissingFile {
                    what: "weight shard named by model.safetensors.index.json",
                    path,
                });
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::config(index_path, "weight_map is empty"));
    }
    Ok(files)
}
