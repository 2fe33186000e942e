//! The contract between a model and the runtime: a model is a list of layers, each declaring
//! its weights (in placement groups) and its KV cache, plus a forward pass over one micro-batch.
//! The runtime knows nothing else about the architecture.

use std::path::PathBuf;

use crate::tensor::{CacheSpec, PlaneBuf, Tensor, WeightSpec};

/// A model's own error, carried through the runtime.
pub type DynError = Box<dyn std::error::Error + Send + Sync>;

/// One layer of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// A name for messages (e.g. `attention 3`).
    pub name: String,
    /// The weights in placement groups: FlexGen's midpoint rule runs per group (a decoder
    /// layer run as one layer still places its attention and MLP weights separately). The
    /// forward pass receives the weights of all groups, flattened in order.
    pub groups: Vec<Vec<WeightSpec>>,
    /// The layer's KV cache per sequence, if it keeps one.
    pub cache: Option<CacheSpec>,
}

impl LayerSpec {
    /// All weights, flattened in group order.
    pub fn weights(&self) -> impl Iterator<Item = &WeightSpec> {
        self.groups.iter().flatten()
    }

    /// Number of weights.
    pub fn num_weights(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }
}

/// Where one forward call sits in the block schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Generated-token index; 0 is the prefill.
    pub token: usize,
    /// Layer index.
    pub layer: usize,
    /// Micro-batch index.
    pub micro_batch: usize,
    /// New tokens per sequence in this step (the prompt length at prefill, then 1).
    pub q_len: usize,
    /// Tokens already in the cache per sequence.
    pub kv_len: usize,
    /// Tokens the cache holds per sequence at most.
    pub capacity: usize,
}

/// The KV cache of one layer for one micro-batch, as the forward pass sees it: each plane is
/// `[seqs, capacity, per_token]`, rows `0..kv_len` of every sequence filled; the forward pass
/// writes the new tokens at `kv_len..kv_len + q_len`.
#[derive(Debug)]
pub struct CacheView<'a> {
    /// The planes, in the order of the layer's [`CacheSpec`].
    pub planes: &'a mut [PlaneBuf],
    /// Sequences.
    pub seqs: usize,
    /// Tokens per sequence the planes hold.
    pub capacity: usize,
    /// Tokens filled per sequence.
    pub kv_len: usize,
}

/// The bytes of a weight already on disk in the layout the runtime wants (row-major, the
/// spec's dtype), e.g. inside an uncompressed checkpoint file: read in place, not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLocation {
    /// The file.
    pub path: PathBuf,
    /// Byte offset of the tensor.
    pub offset: u64,
    /// Byte length of the tensor.
    pub len: u64,
}

/// Where the runtime gets weights from when it places them.
pub trait WeightSource: Sync {
    /// The weight as a [`Tensor::Dense`] in the spec's dtype or a [`Tensor::Vector`].
    fn load(&self, spec: &WeightSpec) -> Result<Tensor, DynError>;

    /// Where the weight's bytes already sit on disk in the spec's dtype, if they do.
    fn file_location(&self, spec: &WeightSpec) -> Option<FileLocation> {
        let _ = spec;
        None
    }
}

/// A model the runtime can run with the block schedule.
pub trait BlockModel: Sync {
    /// Per-micro-batch state the model keeps between layers (inputs, hidden states, masks,
    /// outputs, scratch).
    type Batch: Send;

    /// The layers in execution order.
    fn layers(&self) -> &[LayerSpec];

    /// Sequences in a micro-batch.
    fn rows(&self, batch: &Self::Batch) -> usize;

    /// Runs layer `step.layer` on micro-batch `batch`. `weights` are the layer's weights in spec
    /// order (the forward pass may take them out but must put them back); `cache` is present for
    /// layers that declare one.
    fn forward(
        &self,
        step: &Step,
        weights: &mut [Tensor],
        cache: Option<CacheView<'_>>,
        batch: &mut Self::Batch,
    ) -> Result<(), DynError>;

    /// The hidden states passed from one layer to the next, which the runtime moves to the
    /// activation tier between layers.
    fn activation<'a>(&self, batch: &'a mut Self::Batch) -> &'a mut Vec<f32>;

    /// Bytes of the activations of `rows` sequences with `q_len` new tokens (for budgets).
    fn activation_bytes(&self, rows: usize, q_len: usize) -> u64;
}
