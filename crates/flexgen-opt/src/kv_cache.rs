//! The state of a batch of sequences between forward passes: the KV cache of every layer,
//! preallocated to its final length so it is never copied as it grows, and the padding mask.

use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::layers::KvSlot;
use crate::model::Scratch;

/// KV cache, padding mask and scratch buffers of a batch of sequences.
///
/// Layout per layer: K and V are `[batch, capacity, hidden]` f32; row `b`'s token `t` lives at
/// `(b * capacity + t) * hidden`. `kv_len` tokens are filled for every row (left padding keeps
/// the rows aligned).
#[derive(Debug)]
pub struct BatchState {
    batch: usize,
    capacity: usize,
    hidden: usize,
    kv_len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// `[batch, capacity]`: false for padding.
    mask: Vec<bool>,
    /// Real (non-padding) tokens per row, for positions.
    valid_counts: Vec<usize>,
    pub(crate) scratch: Scratch,
}

impl BatchState {
    /// An empty cache for `batch` sequences of up to `capacity` tokens each.
    pub fn new(config: &OptConfig, batch: usize, capacity: usize) -> Self {
        let hidden = config.hidden_size;
        let per_layer = batch * capacity * hidden;
        BatchState {
            batch,
            capacity,
            hidden,
            kv_len: 0,
            keys: (0..config.num_hidden_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
            values: (0..config.num_hidden_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
            mask: vec![false; batch * capacity],
            valid_counts: vec![0; batch],
            scratch: Scratch::default(),
        }
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens each sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens held per sequence (padding included).
    pub fn kv_len(&self) -> usize {
        self.kv_len
    }

    /// Real (non-padding) tokens held by sequence `row`.
    pub fn valid_count(&self, row: usize) -> usize {
        self.valid_counts[row]
    }

    /// Bytes held by the KV cache.
    pub fn cache_bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * self.batch * self.capacity * self.hidden * 4
    }

    pub(crate) fn append_mask(&mut self, valid: &[bool], q_len: usize) {
        for b in 0..self.batch {
            let dst = b * self.capacity + self.kv_len;
            self.mask[dst..dst + q_len].copy_from_slice(&valid[b * q_len..(b + 1) * q_len]);
        }
    }

    /// Copies the mask of the first `kv_len` tokens of every row into `out` as `[batch, kv_len]`.
    pub(crate) fn key_valid_into(&self, kv_len: usize, out: &mut Vec<bool>) {
        out.clear();
        for b in 0..self.batch {
            let src = b * self.capacity;
            out.extend_from_slice(&self.mask[src..src + kv_len]);
        }
    }

    /// The cache of layer `layer` as a [`KvSlot`] positioned after the stored tokens.
    pub(crate) fn layer_slot(&mut self, layer: usize) -> KvSlot<'_> {
        // Rows dropped by `retain_rows` leave unused space at the end of the buffers.
        let len = self.batch * self.capacity * self.hidden;
        KvSlot {
            keys: &mut self.keys[layer][..len],
            values: &mut self.values[layer][..len],
            capacity: self.capacity,
            kv_len: self.kv_len,
        }
    }

    /// Marks `q_len` more tokens as held after a forward pass wrote them.
    pub(crate) fn commit(&mut self, q_len: usize) {
        for b in 0..self.batch {
            let start = b * self.capacity + self.kv_len;
            self.valid_counts[b] += self.mask[start..start + q_len]
                .iter()
                .filter(|&&m| m)
                .count();
        }
        self.kv_len += q_len;
    }

    /// Keeps only the rows with `keep[b]` true, in order, so finished sequences stop costing
    /// compute. Moves each kept row's filled cache down; capacity is unchanged.
    pub fn retain_rows(&mut self, keep: &[bool]) -> Result<()> {
        if keep.len() != self.batch {
            return Err(Error::InvalidRequest(format!(
                "retain_rows: {} flags for {} rows",
                keep.len(),
                self.batch
            )));
        }
        let cap = self.capacity;
        let h = self.hidden;
        let filled = self.kv_len * h;
        let mut dst_row = 0;
        for (src_row, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
            if src_row != dst_row {
                for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
                    buf.copy_within(
                        src_row * cap * h..src_row * cap * h + filled,
                        dst_row * cap * h,
                    );
                }
                self.mask
                    .copy_within(src_row * cap..src_row * cap + self.kv_len, dst_row * cap);
                self.valid_counts[dst_row] = self.valid_counts[src_row];
            }
            dst_row += 1;
        }
        self.batch = dst_row;
        self.valid_counts.truncate(dst_row);
        Ok(())
    }

    /// Forgets every token after the first `len` (e.g. to re-run a turn); `len <= kv_len`.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.kv_len);
        for b in 0..self.batch {
            let start = b * self.capacity;
            self.valid_counts[b] = self.mask[start..start + len].iter().filter(|&&m| m).count();
        }
        self.kv_len = len;
    }
}
