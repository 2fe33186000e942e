//! A KV cache compressed along `head_dim`, and attention that reads it without decompressing.
//!
//! [`PackedKvCache`] holds the keys and values of one layer for `batch` sequences, each
//! `(sequence, position, head)` vector of `head_dim` values quantized on its own (FlexGen's
//! cache `group_dim = 2` of a `(seq, batch·heads, head_dim)` cache). Storing a new token writes
//! only that token's groups, so appending one token per decode step never re-quantizes older
//! tokens.
//!
//! [`attention_packed`] has the contract of [`flexgen_core::kernels::attention`] with the
//! dense K/V buffers replaced by the cache. Decode steps (`q_len < 8`) compute `q · k` and
//! `Σ p · v` from the codes with the fused SIMD kernels; longer queries (prefill, chunked
//! prompts) dequantize the used positions into an `f32` scratch and run the dense kernel (FlexGen's
//! CPU path does the same with its decompression workspace).
//!
//! # Wiring it into a model (one cache per layer)
//! ```
//! use flexgen_core::kernels::AttentionShape;
//! use flexgen_quant::{attention_packed, CompressionConfig, PackedKvCache};
//!
//! let (batch, heads, head_dim, capacity) = (2, 4, 64, 16);
//! let hidden = heads * head_dim;
//! let mut cache = PackedKvCache::new(CompressionConfig::FLEXGEN_CACHE, batch, heads, head_dim, capacity)?;
//! let mut kv_len = 0;
//! for step in 0..3 {
//!     let q_len = if step == 0 { 5 } else { 1 }; // prefill 5 tokens, then decode
//!     let k: Vec<f32> = (0..batch * q_len * hidden).map(|i| (i as f32 * 0.01).sin()).collect();
//!     let v = k.iter().map(|x| x * 0.5).collect::<Vec<_>>();
//!     let q = k.clone();
//!     cache.store(kv_len, &k, &v, q_len)?; // new tokens' K/V at positions kv_len..
//!     kv_len += q_len;
//!     let key_valid = vec![true; batch * kv_len];
//!     let shape = AttentionShape { batch, n_heads: heads, head_dim, q_len, kv_len, kv_capacity: capacity };
//!     let mut out = vec![0.0; batch * q_len * hidden];
//!     attention_packed(&q, &cache, &key_valid, &shape, 0.125, &mut out)?;
//! }
//! assert!(cache.nbytes() * 6 < 2 * batch * capacity * hidden * 4); // vs the f32 cache
//! # Ok::<(), flexgen_quant::Error>(())
//! ```

use flexgen_core::kernels::{self, AttentionShape};
use flexgen_core::{simd_level, SimdLevel};
use half::f16;
use rayon::prelude::*;

use crate::codec;
use crate::config::CompressionConfig;
use crate::error::{check_len, checked_product, Error, Result};
use crate::simd::{dispatch, ensure_available, QKern, Rows};

/// From this many queries per sequence on, [`attention_packed`] dequantizes and uses the dense
/// kernel.
const DENSE_MIN_Q: usize = 8;

/// Packed codes and parameters of one of K or V.
#[derive(Debug, Clone)]
struct Packed {
    codes: Vec<u8>,
    params: Vec<f16>,
}

/// One packed plane of a [`PackedKvCache`] (keys or values): its codes and its per-group
/// `(step, min)` parameters in `f16`.
pub type PackedPlane = (Vec<u8>, Vec<f16>);

/// Keys and values of one layer for a batch, each `head_dim` vector quantized group-wise.
///
/// Layout: vector `(b, t, h)` (sequence, position, head) is number `(b · capacity + t) ·
/// n_heads + h`; its codes are `groups · group_bytes` bytes at that index times the same, its
/// parameters `2 · groups` `f16` likewise (`groups = ceil(head_dim / group_size)`).
#[derive(Debug, Clone)]
pub struct PackedKvCache {
    config: CompressionConfig,
    batch: usize,
    n_heads: usize,
    head_dim: usize,
    capacity: usize,
    k: Packed,
    v: Packed,
}

impl PackedKvCache {
    /// An empty (all-zero) cache for `batch` sequences of up to `capacity` tokens.
    ///
    /// `config.group_dim` must be 2 (head_dim of FlexGen's `(seq, batch·heads, head_dim)`
    /// cache view), e.g. [`CompressionConfig::FLEXGEN_CACHE`]. Errors: [`Error::Config`] for
    /// an invalid config, [`Error::InvalidArgument`] for sizes that overflow.
    pub fn new(
        config: CompressionConfig,
        batch: usize,
        n_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self> {
        const OP: &str = "PackedKvCache::new";
        config.validate_for_rank(3)?;
        if config.group_dim != 2 {
            return Err(Error::Config {
                config: config.to_string(),
                msg: "a KV cache is grouped along head_dim: group_dim must be 2".into(),
            });
        }
        let vectors = checked_product(OP, &[batch, capacity, n_heads])?;
        let groups = head_dim.div_ceil(config.group_size);
        let bytes = checked_product(OP, &[vectors, groups, config.group_bytes()])?;
        let params = checked_product(OP, &[vectors, groups, 2])?;
        let empty = || Packed {
            codes: vec![0; bytes],
            params: vec![f16::ZERO; params],
        };
        Ok(PackedKvCache {
            config,
            batch,
            n_heads,
            head_dim,
            capacity,
            k: empty(),
            v: empty(),
        })
    }

    /// Bytes of codes and `f16` parameters one position of one sequence takes in each of K
    /// and V: `(n_heads · groups · group_bytes, n_heads · groups · 2)`. A sequence's positions
    /// are contiguous, so a cache splits along the batch in whole sequences.
    pub fn token_layout(
        config: &CompressionConfig,
        n_heads: usize,
        head_dim: usize,
    ) -> (usize, usize) {
        let groups = head_dim.div_ceil(config.group_size);
        (
            n_heads * groups * config.group_bytes(),
            n_heads * groups * 2,
        )
    }

    /// Rebuilds a cache from the parts [`PackedKvCache::into_parts`] gave (e.g. moved between
    /// memory tiers by the offload runtime): K codes, K parameters, V codes, V parameters.
    /// Checks the config and every length against the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        config: CompressionConfig,
        batch: usize,
        n_heads: usize,
        head_dim: usize,
        capacity: usize,
        k: (Vec<u8>, Vec<f16>),
        v: (Vec<u8>, Vec<f16>),
    ) -> Result<Self> {
        const OP: &str = "PackedKvCache::from_parts";
        let empty = Self::new(config, 0, n_heads, head_dim, capacity)?;
        let (cb, pb) = Self::token_layout(&config, n_heads, head_dim);
        let tokens = checked_product(OP, &[batch, capacity])?;
        for (what, codes, params) in [("K", &k.0, &k.1), ("V", &v.0, &v.1)] {
            check_len(OP, &format!("{what} codes"), codes.len(), tokens * cb)?;
            check_len(OP, &format!("{what} params"), params.len(), tokens * pb)?;
        }
        Ok(PackedKvCache {
            batch,
            k: Packed {
                codes: k.0,
                params: k.1,
            },
            v: Packed {
                codes: v.0,
                params: v.1,
            },
            ..empty
        })
    }

    /// Splits the cache into `((K codes, K params), (V codes, V params))`.
    pub fn into_parts(self) -> (PackedPlane, PackedPlane) {
        ((self.k.codes, self.k.params), (self.v.codes, self.v.params))
    }

    /// The compression settings.
    pub fn config(&self) -> &CompressionConfig {
        &self.config
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Attention heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of codes and parameters held (K and V).
    pub fn nbytes(&self) -> usize {
        2 * (self.k.codes.len() + self.k.params.len() * 2)
    }

    fn groups(&self) -> usize {
        self.head_dim.div_ceil(self.config.group_size)
    }

    fn vector_bytes(&self) -> usize {
        self.groups() * self.config.group_bytes()
    }

    /// Quantizes the keys and values of `q_len` new tokens per sequence (`k`, `v`:
    /// `[batch, q_len, n_heads · head_dim]`) into positions `pos .. pos + q_len`. Other
    /// positions are untouched.
    ///
    /// Errors: [`Error::ShapeMismatch`] for wrong lengths, [`Error::InvalidArgument`] when
    /// `pos + q_len > capacity`, [`Error::Value`] for a NaN/infinite value (the cache is then
    /// partly written at those positions).
    pub fn store(&mut self, pos: usize, k: &[f32], v: &[f32], q_len: usize) -> Result<()> {
        const OP: &str = "PackedKvCache::store";
        let hidden = checked_product(OP, &[self.n_heads, self.head_dim])?;
        let n = checked_product(OP, &[self.batch, q_len, hidden])?;
        check_len(OP, "k [batch, q_len, hidden]", k.len(), n)?;
        check_len(OP, "v [batch, q_len, hidden]", v.len(), n)?;
        if pos.checked_add(q_len).is_none_or(|end| end > self.capacity) {
            return Err(Error::invalid(
                OP,
                format!(
                    "positions {pos}..{} exceed the capacity {}",
                    pos.saturating_add(q_len),
                    self.capacity
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (cfg, hd, cap, heads) = (self.config, self.head_dim, self.capacity, self.n_heads);
        let (vb, vp) = (self.vector_bytes(), 2 * self.groups());
        let (gs, gb) = (cfg.group_size, cfg.group_bytes());
        let seq_bytes = cap * heads * vb;
        let seq_params = cap * heads * vp;
        for (src, dst) in [(k, &mut self.k), (v, &mut self.v)] {
            dst.codes
                .par_chunks_mut(seq_bytes)
                .zip(dst.params.par_chunks_mut(seq_params))
                .enumerate()
                .try_for_each(|(b, (codes, params))| {
                    for t in 0..q_len {
                        for h in 0..heads {
                            let x0 = (b * q_len + t) * hidden + h * hd;
                            let slot = (pos + t) * heads + h;
                            for g in 0..hd.div_ceil(gs) {
                                let vals = &src[x0 + g * gs..x0 + hd.min((g + 1) * gs)];
                                let p = codec::group_params(vals, &cfg).map_err(|msg| {
                                    Error::Value {
                                        what: format!(
                                            "KV vector of sequence {b}, position {}, head {h}",
                                            pos + t
                                        ),
                                        msg,
                                    }
                                })?;
                                let c0 = slot * vb + g * gb;
                                codec::encode_group(vals, p, &cfg, &mut codes[c0..c0 + gb]);
                                params[slot * vp + 2 * g] = p.step;
                                params[slot * vp + 2 * g + 1] = p.min;
                            }
                        }
                    }
                    Ok::<(), Error>(())
                })?;
        }
        Ok(())
    }

    /// Keeps only the sequences with `keep[b]` true, in order (moving their first `len`
    /// positions down), e.g. when finished rows leave a batch. Capacity is unchanged.
    pub fn retain_rows(&mut self, keep: &[bool], len: usize) -> Result<()> {
        const OP: &str = "PackedKvCache::retain_rows";
        if keep.len() != self.batch {
            return Err(Error::invalid(
                OP,
                format!("{} flags for {} rows", keep.len(), self.batch),
            ));
        }
        let len = len.min(self.capacity);
        let (vb, vp) = (self.vector_bytes(), 2 * self.groups());
        let per_seq = self.capacity * self.n_heads;
        let used = len * self.n_heads;
        let mut dst = 0;
        for src in (0..self.batch).filter(|&b| keep[b]) {
            if src != dst {
                for p in [&mut self.k, &mut self.v] {
                    p.codes.copy_within(
                        src * per_seq * vb..(src * per_seq + used) * vb,
                        dst * per_seq * vb,
                    );
                    p.params.copy_within(
                        src * per_seq * vp..(src * per_seq + used) * vp,
                        dst * per_seq * vp,
                    );
                }
            }
            dst += 1;
        }
        self.batch = dst;
        let (bytes, params) = (dst * per_seq * vb, dst * per_seq * vp);
        for p in [&mut self.k, &mut self.v] {
            p.codes.truncate(bytes);
            p.params.truncate(params);
        }
        Ok(())
    }

    /// Dequantizes positions `0..len` into `k_out`, `v_out` (`[batch, len, hidden]`).
    pub fn dequantize_into(&self, len: usize, k_out: &mut [f32], v_out: &mut [f32]) -> Result<()> {
        self.dequantize_with_level(simd_level(), len, k_out, v_out)
    }

    fn dequantize_with_level(
        &self,
        level: SimdLevel,
        len: usize,
        k_out: &mut [f32],
        v_out: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "PackedKvCache::dequantize_into";
        ensure_available(OP, level)?;
        if len > self.capacity {
            return Err(Error::invalid(
                OP,
                format!("len {len} > capacity {}", self.capacity),
            ));
        }
        let hidden = self.n_heads * self.head_dim;
        let n = checked_product(OP, &[self.batch, len, hidden])?;
        check_len(OP, "k_out [batch, len, hidden]", k_out.len(), n)?;
        check_len(OP, "v_out [batch, len, hidden]", v_out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        for (which, out) in [(false, k_out), (true, v_out)] {
            out.par_chunks_mut(len * hidden)
                .enumerate()
                .for_each(|(b, o)| {
                    // Positions 0..len of sequence b, all heads: equally spaced vectors.
                    let rows = self.rows(which, b, 0, 0, len * self.n_heads, 1);
                    // SAFETY: `level` was checked with `ensure_available`.
                    dispatch!(level, K => unsafe { K::dequant(rows, o) });
                });
        }
        Ok(())
    }

    /// `n` vectors of K (`values == false`) or V of sequence `b`, head `h`, from position
    /// `t0`, spaced `step` heads apart (`n_heads` for one head's positions, 1 for consecutive
    /// heads).
    fn rows(&self, values: bool, b: usize, t0: usize, h: usize, n: usize, step: usize) -> Rows<'_> {
        let p = if values { &self.v } else { &self.k };
        let (vb, vp) = (self.vector_bytes(), 2 * self.groups());
        let first = (b * self.capacity + t0) * self.n_heads + h;
        Rows {
            codes: &p.codes[first * vb..],
            params: &p.params[first * vp..],
            rows: n,
            cols: self.head_dim,
            code_stride: step * vb,
            param_stride: step * vp,
            bits: self.config.num_bits,
            gs: self.config.group_size,
        }
    }

    fn check_shape(&self, op: &'static str, s: &AttentionShape) -> Result<()> {
        let mine = (self.batch, self.n_heads, self.head_dim, self.capacity);
        let theirs = (s.batch, s.n_heads, s.head_dim, s.kv_capacity);
        if mine != theirs {
            return Err(Error::shape(
                op,
                format!("(batch, n_heads, head_dim, kv_capacity) = {mine:?} of the cache"),
                format!("{theirs:?}"),
            ));
        }
        if s.q_len > s.kv_len || s.kv_len > s.kv_capacity {
            return Err(Error::invalid(
                op,
                format!(
                    "need q_len ({}) <= kv_len ({}) <= kv_capacity ({})",
                    s.q_len, s.kv_len, s.kv_capacity
                ),
            ));
        }
        Ok(())
    }
}

/// Causal multi-head attention of `q_len` new tokens per sequence against positions
/// `0..kv_len` of `cache` (whose last `q_len` positions already hold the new tokens), with the
/// semantics of [`flexgen_core::kernels::attention`]: `q` and `out` are
/// `[batch, q_len, hidden]`, `key_valid` is `[batch, kv_len]`, `shape.kv_capacity` must equal
/// the cache's capacity.
///
/// Errors: [`Error::ShapeMismatch`] when a buffer or the shape disagrees with the cache,
/// [`Error::InvalidArgument`] for `q_len > kv_len`.
pub fn attention_packed(
    q: &[f32],
    cache: &PackedKvCache,
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    attention_packed_with_level(simd_level(), q, cache, key_valid, shape, scale, out)
}

/// [`attention_packed`] at an explicit SIMD level (an error if the CPU lacks it).
pub fn attention_packed_with_level(
    level: SimdLevel,
    q: &[f32],
    cache: &PackedKvCache,
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "attention_packed";
    ensure_available(OP, level)?;
    cache.check_shape(OP, shape)?;
    let s = *shape;
    let hidden = s.n_heads * s.head_dim;
    let qn = checked_product(OP, &[s.batch, s.q_len, hidden])?;
    check_len(OP, "q [batch, q_len, hidden]", q.len(), qn)?;
    check_len(OP, "out [batch, q_len, hidden]", out.len(), qn)?;
    check_len(
        OP,
        "key_valid [batch, kv_len]",
        key_valid.len(),
        s.batch * s.kv_len,
    )?;
    if qn == 0 {
        return Ok(());
    }
    if s.q_len >= DENSE_MIN_Q {
        let n = s.batch * s.kv_len * hidden;
        let (mut k, mut v) = (vec![0f32; n], vec![0f32; n]);
        cache.dequantize_with_level(level, s.kv_len, &mut k, &mut v)?;
        let dense = AttentionShape {
            kv_capacity: s.kv_len,
            ..s
        };
        kernels::attention_with_level(level, q, &k, &v, key_valid, &dense, scale, out)?;
        return Ok(());
    }
    let hd = s.head_dim;
    let block = s.q_len * hd;
    let mut tmp = vec![0f32; s.batch * s.n_heads * block];
    let task = |scores: &mut Vec<f32>, (t, dst): (usize, &mut [f32])| -> Result<()> {
        let (b, h) = (t / s.n_heads, t % s.n_heads);
        let valid = &key_valid[b * s.kv_len..(b + 1) * s.kv_len];
        scores.resize(s.kv_len, 0.0);
        for (i, o) in dst.chunks_exact_mut(hd).enumerate() {
            let p = s.kv_len - s.q_len + i;
            let qoff = (b * s.q_len + i) * hidden + h * hd;
            let sc = &mut scores[..=p];
            let keys = cache.rows(false, b, 0, h, p + 1, s.n_heads);
            // SAFETY: `level` was checked with `ensure_available`.
            dispatch!(level, K => unsafe { K::gemv(keys, &q[qoff..qoff + hd], 1, sc) });
            for x in sc.iter_mut() {
                *x *= scale;
            }
            kernels::masked_softmax_with_level(level, sc, p + 1, &valid[..=p])?;
            o.fill(0.0);
            let vals = cache.rows(true, b, 0, h, p + 1, s.n_heads);
            // SAFETY: as above.
            dispatch!(level, K => unsafe { K::axpy(sc, vals, o) });
        }
        Ok(())
    };
    if s.batch * s.n_heads == 1 || s.q_len * s.kv_len * hd < 1 << 12 {
        let mut scores = Vec::new();
        tmp.chunks_mut(block)
            .enumerate()
            .try_for_each(|t| task(&mut scores, t))?;
    } else {
        tmp.par_chunks_mut(block)
            .enumerate()
            .try_for_each_init(Vec::new, task)?;
    }
    for (t, src) in tmp.chunks_exact(block).enumerate() {
        let (b, h) = (t / s.n_heads, t % s.n_heads);
        for (i, row) in src.chunks_exact(hd).enumerate() {
            let o = (b * s.q_len + i) * hidden + h * hd;
            out[o..o + hd].copy_from_slice(row);
        }
    }
    Ok(())
}

/// Reference for [`attention_packed`]: dequantize the whole cache with the reference decoder,
/// then [`flexgen_core::kernels::attention_ref`]. Same arguments and errors.
pub fn attention_packed_ref(
    q: &[f32],
    cache: &PackedKvCache,
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    cache.check_shape("attention_packed_ref", shape)?;
    let hidden = cache.n_heads * cache.head_dim;
    let n = cache.batch * cache.capacity * hidden;
    let (mut k, mut v) = (vec![0f32; n], vec![0f32; n]);
    for (which, dst) in [(false, &mut k), (true, &mut v)] {
        let all = cache.rows(
            which,
            0,
            0,
            0,
            cache.batch * cache.capacity * cache.n_heads,
            1,
        );
        crate::simd::scalar::dequant(all, dst);
    }
    kernels::attention_ref(q, &k, &v, key_valid, shape, scale, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexgen_core::simd::available_levels;
    use proptest::prelude::*;

    fn fill(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 * 1e-3 - 1.0
            })
            .collect()
    }

    #[test]
    fn errors() {
        let c = CompressionConfig::FLEXGEN_CACHE;
        assert!(PackedKvCache::new(CompressionConfig::WEIGHT_4BIT, 1, 1, 4, 4).is_err());
        assert!(PackedKvCache::new(c, usize::MAX, 2, 4, 4).is_err());
        let mut cache = PackedKvCache::new(c, 2, 2, 4, 3).unwrap();
        let kv = vec![0.5; 2 * 8];
        assert!(cache.store(3, &kv, &kv, 1).is_err());
        assert!(cache.store(0, &kv[..15], &kv, 1).is_err());
        let mut bad = kv.clone();
        bad[9] = f32::NAN;
        let e = cache.store(0, &kv, &bad, 1).unwrap_err();
        assert!(
            e.to_string().contains("sequence 1, position 0, head 0"),
            "{e}"
        );
        cache.store(2, &kv, &kv, 1).unwrap();
        let shape = AttentionShape {
            batch: 2,
            n_heads: 2,
            head_dim: 4,
            q_len: 1,
            kv_len: 3,
            kv_capacity: 4,
        };
        let mut out = vec![0.0; 16];
        let e = attention_packed(&kv, &cache, &[true; 6], &shape, 1.0, &mut out).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        let shape = AttentionShape {
            kv_capacity: 3,
            q_len: 2,
            kv_len: 1,
            ..shape
        };
        assert!(attention_packed(&kv, &cache, &[true; 2], &shape, 1.0, &mut out).is_err());
        assert!(cache.retain_rows(&[true], 3).is_err());
    }

    fn check(
        batch: usize,
        heads: usize,
        hd: usize,
        cap: usize,
        steps: &[usize],
        cfg: CompressionConfig,
    ) {
        let hidden = heads * hd;
        let mut cache = PackedKvCache::new(cfg, batch, heads, hd, cap).unwrap();
        let mut kv_len = 0;
        for (si, &q_len) in steps.iter().enumerate() {
            let k = fill(batch * q_len * hidden, 7 + si as u32);
            let v = fill(batch * q_len * hidden, 1000 + si as u32);
            let before = cache.clone();
            cache.store(kv_len, &k, &v, q_len).unwrap();
            // Older positions are byte-identical: nothing was re-quantized.
            let vb = cache.vector_bytes();
            for b in 0..batch {
                let r = (b * cap) * heads * vb..(b * cap + kv_len) * heads * vb;
                assert_eq!(before.k.codes[r.clone()], cache.k.codes[r.clone()]);
                assert_eq!(before.v.codes[r.clone()], cache.v.codes[r]);
            }
            kv_len += q_len;
            let q = fill(batch * q_len * hidden, 99 + si as u32);
            let key_valid: Vec<bool> = (0..batch * kv_len)
                .map(|i| (i % kv_len) != 0 || i % 3 == 0)
                .collect();
            let shape = AttentionShape {
                batch,
                n_heads: heads,
                head_dim: hd,
                q_len,
                kv_len,
                kv_capacity: cap,
            };
            let mut want = vec![0.0; q.len()];
            attention_packed_ref(&q, &cache, &key_valid, &shape, 0.3, &mut want).unwrap();
            for level in available_levels() {
                let mut got = vec![f32::NAN; q.len()];
                attention_packed_with_level(level, &q, &cache, &key_valid, &shape, 0.3, &mut got)
                    .unwrap();
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5,
                        "{level} {cfg} step {si} idx {i}: {a} vs {b}"
                    );
                }
            }
        }
        // The packed cache decodes to the stored K/V within half a step (plus f16 rounding).
        let n = batch * kv_len * hidden;
        let (mut dk, mut dv) = (vec![0.0; n], vec![0.0; n]);
        cache.dequantize_into(kv_len, &mut dk, &mut dv).unwrap();
        assert!(dk.iter().chain(&dv).all(|x| x.abs() <= 1.01));
    }

    #[test]
    fn decode_steps_match_reference() {
        check(
            2,
            3,
            64,
            12,
            &[5, 1, 1, 1],
            CompressionConfig::FLEXGEN_CACHE,
        );
        check(1, 2, 128, 40, &[9, 1, 1], CompressionConfig::FLEXGEN_CACHE);
        check(3, 2, 16, 10, &[4, 1, 2], CompressionConfig::FLEXGEN_CACHE);
        check(
            2,
            2,
            64,
            8,
            &[3, 1],
            CompressionConfig {
                num_bits: 8,
                ..CompressionConfig::FLEXGEN_CACHE
            },
        );
        check(
            2,
            2,
            40,
            8,
            &[3, 1],
            CompressionConfig {
                group_size: 32,
                symmetric: true,
                ..CompressionConfig::FLEXGEN_CACHE
            },
        );
    }

    #[test]
    fn retain_rows_moves_sequences() {
        let (batch, heads, hd, cap) = (3, 2, 64, 4);
        let hidden = heads * hd;
        let mut cache =
            PackedKvCache::new(CompressionConfig::FLEXGEN_CACHE, batch, heads, hd, cap).unwrap();
        let k = fill(batch * 2 * hidden, 3);
        cache.store(0, &k, &k, 2).unwrap();
        let (mut all_k, mut all_v) = (vec![0.0; batch * 2 * hidden], vec![0.0; batch * 2 * hidden]);
        cache.dequantize_into(2, &mut all_k, &mut all_v).unwrap();
        cache.retain_rows(&[false, true, true], 2).unwrap();
        assert_eq!(cache.batch(), 2);
        let (mut rk, mut rv) = (vec![0.0; 2 * 2 * hidden], vec![0.0; 2 * 2 * hidden]);
        cache.dequantize_into(2, &mut rk, &mut rv).unwrap();
        assert_eq!(rk, all_k[2 * hidden..]);
        assert_eq!(rv, all_v[2 * hidden..]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn fused_decode_matches_dequantize_then_reference(
            batch in 1usize..3, heads in 1usize..4, hd_groups in 1usize..4, prefill in 1usize..9,
            decode in 1usize..4, eight in any::<bool>(),
        ) {
            let cfg = CompressionConfig { num_bits: if eight { 8 } else { 4 }, group_size: 32, ..CompressionConfig::FLEXGEN_CACHE };
            let steps: Vec<usize> = std::iter::once(prefill).chain(std::iter::repeat_n(1, decode)).collect();
            check(batch, heads, hd_groups * 24, prefill + decode + 1, &steps, cfg);
        }
    }

    #[test]
    fn parts_round_trip_and_are_checked() {
        let cfg = CompressionConfig::FLEXGEN_CACHE;
        let (batch, heads, hd, cap) = (2, 3, 40, 5);
        let mut c = PackedKvCache::new(cfg, batch, heads, hd, cap).unwrap();
        let k: Vec<f32> = (0..batch * 2 * heads * hd)
            .map(|i| (i as f32 * 0.13).sin())
            .collect();
        let v: Vec<f32> = k.iter().map(|x| x * 0.5 - 0.1).collect();
        c.store(1, &k, &v, 2).unwrap();
        let (cb, pb) = PackedKvCache::token_layout(&cfg, heads, hd);
        let (kp, vp) = c.clone().into_parts();
        assert_eq!(
            (kp.0.len(), kp.1.len()),
            (batch * cap * cb, batch * cap * pb)
        );
        let back =
            PackedKvCache::from_parts(cfg, batch, heads, hd, cap, kp.clone(), vp.clone()).unwrap();
        let (mut a, mut b) = (
            vec![0.0; batch * 3 * heads * hd],
            vec![0.0; batch * 3 * heads * hd],
        );
        let (mut a2, mut b2) = (a.clone(), b.clone());
        c.dequantize_into(3, &mut a, &mut b).unwrap();
        back.dequantize_into(3, &mut a2, &mut b2).unwrap();
        assert_eq!((a, b), (a2, b2));
        let short = (kp.0[1..].to_vec(), kp.1.clone());
        assert!(matches!(
            PackedKvCache::from_parts(cfg, batch, heads, hd, cap, short, vp),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
