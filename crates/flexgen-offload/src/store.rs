//! Weight homes: every weight placed on its tier once at load (RAM tiers hold the tensor, the
//! disk tier a region of the offload file or of the checkpoint itself), and the I/O that fetches
//! a disk-homed weight into a reusable buffer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use flexgen_core::{DType, Matrix};
use flexgen_quant::{CompressionConfig, QuantizedTensor};

use crate::disk::{phase_aligned, DiskFile, IoStats};
use crate::error::{Error, Result};
use crate::model::{LayerSpec, WeightSource};
use crate::offload_dir::OffloadDir;
use crate::placement::place_weights;
use crate::policy::Policy;
use crate::tensor::{
    packed_layout, storage_bytes, storage_bytes_mut, Tensor, TensorKind, WeightSpec,
};
use crate::tier::{Charge, MemoryTracker, Tier};

/// Where each weight goes and what that costs per tier, computed from the specs alone (before
/// any weight is read), so budgets can be checked before any work.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightPlan {
    /// Home tier per layer per weight (flattened group order).
    pub tiers: Vec<Vec<Tier>>,
    /// Bytes homed on `[compute, host, disk]`.
    pub home_bytes: [u64; 3],
    /// The most disk-homed bytes of one layer: a fetch buffer holds this much.
    pub max_layer_fetch_bytes: u64,
}

impl WeightPlan {
    /// Places every weight of `layers` by `policy` (FlexGen's midpoint rule per group).
    pub fn new(layers: &[LayerSpec], policy: &Policy) -> Self {
        let compress = policy.compress_weight.then_some(&policy.comp_weight_config);
        let mut home_bytes = [0u64; 3];
        let mut max_fetch = 0u64;
        let tiers = layers
            .iter()
            .map(|layer| {
                let mut tiers = Vec::with_capacity(layer.num_weights());
                let mut fetch = 0u64;
                for group in &layer.groups {
                    let sizes: Vec<u64> = group.iter().map(WeightSpec::numel).collect();
                    let vec: Vec<bool> = group.iter().map(WeightSpec::is_vector).collect();
                    for (spec, tier) in
                        group
                            .iter()
                            .zip(place_weights(&sizes, &vec, &policy.weights))
                    {
                        let bytes = spec.stored_bytes(compress);
                        home_bytes[tier as usize] += bytes;
                        if tier == Tier::Disk {
                            fetch += bytes;
                        }
                        tiers.push(tier);
                    }
                }
                max_fetch = max_fetch.max(fetch);
                tiers
            })
            .collect();
        WeightPlan {
            tiers,
            home_bytes,
            max_layer_fetch_bytes: max_fetch,
        }
    }
}

/// How a disk-homed weight is laid out in its file.
#[derive(Debug, Clone, PartialEq)]
enum DiskLayout {
    Dense {
        rows: usize,
        cols: usize,
        dtype: DType,
    },
    Packed {
        shape: [usize; 2],
        config: CompressionConfig,
        codes: u64,
        params: u64,
    },
}

/// A weight on the disk tier: a region of a file.
#[derive(Debug, Clone)]
pub(crate) struct DiskTensor {
    file: Arc<DiskFile>,
    offset: u64,
    layout: DiskLayout,
}

impl DiskTensor {
    /// Whether `t` can be refilled with this tensor's data without reallocating.
    fn fits(&self, t: &Tensor) -> bool {
        match (&self.layout, t) {
            (DiskLayout::Dense { rows, cols, dtype }, Tensor::Dense(m)) => {
                m.rows() == *rows && m.cols() == *cols && m.dtype() == *dtype
            }
            (DiskLayout::Packed { shape, config, .. }, Tensor::Packed(q)) => {
                q.shape() == shape && q.config() == config
            }
            _ => false,
        }
    }

    /// Bytes read by a fetch.
    pub(crate) fn bytes(&self) -> u64 {
        match &self.layout {
            DiskLayout::Dense { rows, cols, dtype } => (rows * cols * dtype.size_in_bytes()) as u64,
            DiskLayout::Packed { codes, params, .. } => codes + params,
        }
    }

    /// Reads the tensor, reusing `reuse`'s buffers when they fit.
    pub(crate) fn read(&self, reuse: Option<Tensor>) -> Result<Tensor> {
        match &self.layout {
            DiskLayout::Dense { rows, cols, dtype } => {
                let mut storage = match reuse {
                    Some(Tensor::Dense(m))
                        if m.dtype() == *dtype && m.rows() * m.cols() == rows * cols =>
                    {
                        m.into_storage()
                    }
                    _ => match Tensor::zeros(*rows, *cols, *dtype)? {
                        Tensor::Dense(m) => m.into_storage(),
                        _ => unreachable!("zeros builds a dense tensor"),
                    },
                };
                self.file
                    .read_at(self.offset, storage_bytes_mut(&mut storage))?;
                Ok(Tensor::Dense(Matrix::new(*rows, *cols, storage)?))
            }
            DiskLayout::Packed {
                shape,
                config,
                codes,
                params,
            } => {
                let (mut c, mut p) = match reuse {
                    Some(Tensor::Packed(q)) => {
                        let (_, _, c, p) = q.into_parts();
                        (c, p)
                    }
                    _ => (Vec::new(), Vec::new()),
                };
                c.resize(*codes as usize, 0);
                p.resize(*params as usize / 2, half::f16::ZERO);
                self.file.read_at(self.offset, &mut c)?;
                self.file
                    .read_at(self.offset + codes, bytemuck::cast_slice_mut(&mut p))?;
                Ok(Tensor::Packed(QuantizedTensor::from_parts(
                    shape.to_vec(),
                    *config,
                    c,
                    p,
                )?))
            }
        }
    }
}

/// Where one weight lives.
#[derive(Debug)]
pub(crate) enum Home {
    /// On a RAM tier (compute or host), used in place.
    Ram(Tensor),
    /// On disk, fetched per token.
    Disk(DiskTensor),
}

/// Every weight of a model in its home.
#[derive(Debug)]
pub struct WeightStore {
    pub(crate) homes: Vec<Vec<Home>>,
    plan: WeightPlan,
    _charges: Vec<Charge>,
    _files: Vec<Arc<DiskFile>>,
}

/// Appends tensors to one offload file at phase-aligned offsets.
struct Appender {
    file: Arc<DiskFile>,
    end: u64,
}

impl Appender {
    fn append(&mut self, parts: &[&[u8]]) -> Result<u64> {
        let start = phase_aligned(self.end);
        let mut off = start;
        for p in parts {
            self.file.write_at(off, p)?;
            off += p.len() as u64;
        }
        self.end = off;
        Ok(start)
    }
}

fn source_error(spec: &WeightSpec, e: impl std::fmt::Display) -> Error {
    Error::Source {
        name: spec.name.clone(),
        source: e.to_string().into(),
    }
}

impl WeightStore {
    /// Loads every weight into its home per `plan`: RAM-homed weights are read from `source`
    /// (and compressed if the policy says so); disk-homed ones are read in place from the
    /// checkpoint when `source` has them on disk uncompressed in the right dtype, else written
    /// once to `weights.bin` in `dir`. `progress(done, total)` is called after each weight.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        layers: &[LayerSpec],
        plan: WeightPlan,
        source: &dyn WeightSource,
        policy: &Policy,
        dir: &OffloadDir,
        direct_io: bool,
        tracker: &Arc<MemoryTracker>,
        stats: &Arc<IoStats>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let compress = policy.compress_weight.then_some(policy.comp_weight_config);
        let total: usize = layers.iter().map(LayerSpec::num_weights).sum();
        let mut done = 0;
        let mut appender: Option<Appender> = None;
        let mut in_place: HashMap<PathBuf, Arc<DiskFile>> = HashMap::new();
        // A weight two layers share (a tied embedding) is written to disk once.
        let mut written: HashMap<String, DiskTensor> = HashMap::new();
        let mut charges = Vec::new();
        let mut homes = Vec::with_capacity(layers.len());
        for (layer, tiers) in layers.iter().zip(&plan.tiers) {
            let mut lh = Vec::with_capacity(tiers.len());
            for (spec, &tier) in layer.weights().zip(tiers) {
                let home = if tier == Tier::Disk {
                    let loc = if compress.is_none() {
                        source.file_location(spec)
                    } else {
                        None
                    };
                    match (loc, spec.kind) {
                        (Some(loc), TensorKind::Matrix { rows, cols, dtype })
                            if loc.len == (rows * cols * dtype.size_in_bytes()) as u64 =>
                        {
                            let file = match in_place.get(&loc.path) {
                                Some(f) => Arc::clone(f),
                                None => {
                                    let f = Arc::new(DiskFile::open_read(
                                        &loc.path,
                                        direct_io,
                                        Arc::clone(stats),
                                    )?);
                                    in_place.insert(loc.path.clone(), Arc::clone(&f));
                                    f
                                }
                            };
                            Home::Disk(DiskTensor {
                                file,
                                offset: loc.offset,
                                layout: DiskLayout::Dense { rows, cols, dtype },
                            })
                        }
                        _ if written.contains_key(&spec.name) => {
                            Home::Disk(written[&spec.name].clone())
                        }
                        _ => {
                            let t = Self::load_one(source, spec, compress.as_ref())?;
                            let app = match &mut appender {
                                Some(a) => a,
                                None => appender.insert(Appender {
                                    file: Arc::new(DiskFile::create(
                                        dir.path().join("weights.bin"),
                                        direct_io,
                                        Arc::clone(stats),
                                    )?),
                                    end: 0,
                                }),
                            };
                            let (offset, layout) = match &t {
                                Tensor::Dense(m) => (
                                    app.append(&[storage_bytes(m.storage())])?,
                                    DiskLayout::Dense {
                                        rows: m.rows(),
                                        cols: m.cols(),
                                        dtype: m.dtype(),
                                    },
                                ),
                                Tensor::Packed(q) => {
                                    let l = packed_layout(q.shape(), q.config());
                                    (
                                        app.append(&[q.codes(), bytemuck::cast_slice(q.params())])?,
                                        DiskLayout::Packed {
                                            shape: [q.shape()[0], q.shape()[1]],
                                            config: *q.config(),
                                            codes: l.codes,
                                            params: l.params,
                                        },
                                    )
                                }
                                other => {
                                    return Err(Error::Model(format!(
                                        "weight {} on the disk tier is a {}",
                                        spec.name,
                                        other.describe()
                                    )))
                                }
                            };
                            let d = DiskTensor {
                                file: Arc::clone(&app.file),
                                offset,
                                layout,
                            };
                            written.insert(spec.name.clone(), d.clone());
                            Home::Disk(d)
                        }
                    }
                } else {
                    Home::Ram(Self::load_one(source, spec, compress.as_ref())?)
                };
                let bytes = match &home {
                    Home::Ram(t) => t.nbytes(),
                    Home::Disk(d) => d.bytes(),
                };
                charges.push(tracker.charge(tier, bytes));
                lh.push(home);
                done += 1;
                progress(done, total);
            }
            homes.push(lh);
        }
        let mut files: Vec<Arc<DiskFile>> = in_place.into_values().collect();
        files.extend(appender.map(|a| a.file));
        Ok(WeightStore {
            homes,
            plan,
            _charges: charges,
            _files: files,
        })
    }

    /// Reads one weight from the source, checks it against its spec, compresses 2-D weights
    /// when asked.
    fn load_one(
        source: &dyn WeightSource,
        spec: &WeightSpec,
        compress: Option<&CompressionConfig>,
    ) -> Result<Tensor> {
        let t = source.load(spec).map_err(|e| source_error(spec, e))?;
        match (spec.kind, t) {
            (TensorKind::Vector { len }, Tensor::Vector(v)) if v.len() == len => {
                Ok(Tensor::Vector(v))
            }
            (TensorKind::Matrix { rows, cols, dtype }, Tensor::Dense(m))
                if m.rows() == rows && m.cols() == cols =>
            {
                let m = if m.dtype() == dtype {
                    m
                } else {
                    m.to_dtype(dtype)
                };
                match compress {
                    Some(c) => Ok(Tensor::Packed(QuantizedTensor::from_matrix(&m, *c)?)),
                    None => Ok(Tensor::Dense(m)),
                }
            }
            (_, t) => Err(source_error(
                spec,
                format!(
                    "the source gave a {}, the spec says {:?}",
                    t.describe(),
                    spec.kind
                ),
            )),
        }
    }

    /// The placement this store was built from.
    pub fn plan(&self) -> &WeightPlan {
        &self.plan
    }

    /// The disk-homed weights of `layer` with their index.
    pub(crate) fn disk_tensors(&self, layer: usize) -> Vec<(usize, DiskTensor)> {
        self.homes[layer]
            .iter()
            .enumerate()
            .filter_map(|(i, h)| match h {
                Home::Disk(d) => Some((i, d.clone())),
                Home::Ram(_) => None,
            })
            .collect()
    }

    /// Takes the first tensor of `spare` that `d` can be read into.
    pub(crate) fn take_fitting(spare: &mut Vec<Tensor>, d: &DiskTensor) -> Option<Tensor> {
        let i = spare.iter().position(|t| d.fits(t))?;
        Some(spare.swap_remove(i))
    }
}
