//! Multi-head scaled-dot-product attention over a key/value cache.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::softmax::softmax_row;
use super::SharedOut;
use crate::error::{check_len, checked_product, Error, Result};
use crate::simd::{dispatch, ensure_available, simd_level, Kern, SimdLevel};

const OP: &str = "attention";

/// From this many queries per sequence on, [`head_gemm`] is used (below: [`decode`]).
const GEMM_MIN_Q: usize = 8;
/// Queries per GEMM block in [`head_gemm`] (bounds the scores buffer to `Q_BLOCK * kv_len`).
const Q_BLOCK: usize = 64;

/// Shape of an [`attention`] call.
///
/// Buffers are row-major with `hidden = n_heads * head_dim` columns: `q` and `out` are
/// `[batch, q_len, hidden]`, the caches `k` and `v` are `[batch, kv_capacity, hidden]` of
/// which rows `0..kv_len` are used, and `key_valid` is `[batch, kv_len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Number of sequences.
    pub batch: usize,
    /// Number of attention heads.
    pub n_heads: usize,
    /// Size of each head.
    pub head_dim: usize,
    /// New query tokens per sequence.
    pub q_len: usize,
    /// Cached positions attended to (including the new tokens); `q_len <= kv_len`.
    pub kv_len: usize,
    /// Allocated rows per sequence in `k`/`v`; `kv_len <= kv_capacity`.
    pub kv_capacity: usize,
}

impl AttentionShape {
    /// `n_heads * head_dim` (no overflow check; [`attention`] validates shapes).
    pub fn hidden(&self) -> usize {
        self.n_heads.wrapping_mul(self.head_dim)
    }
}

/// Causal multi-head attention of `q_len` new tokens per sequence against cache positions
/// `0..kv_len`, whose last `q_len` rows already hold the new tokens' keys and values.
///
/// Query `i` of sequence `b` sits at position `p = kv_len - q_len + i` and attends to keys
/// `j <= p` with `key_valid[b * kv_len + j]` (false marks padding). Per head:
/// `scores = (q · k) * scale`, masked softmax, `out = probs · v`. A query with no valid key
/// gets zeros. Work is spread over rayon tasks per (sequence, head); the caches are read in
/// place, so they can grow without being copied.
///
/// Returns [`Error::ShapeMismatch`] for a buffer of the wrong length and
/// [`Error::InvalidArgument`] for inconsistent sizes (`q_len > kv_len`,
/// `kv_len > kv_capacity`, overflow).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    attention_with_level(simd_level(), q, k, v, key_valid, shape, scale, out)
}

/// [`attention`] for a prompt: requires `kv_len == q_len` (every key is a new token).
pub fn attention_prefill(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    if shape.kv_len != shape.q_len {
        return Err(Error::invalid(
            "attention_prefill",
            format!(
                "kv_len ({}) must equal q_len ({})",
                shape.kv_len, shape.q_len
            ),
        ));
    }
    attention(q, k, v, key_valid, shape, scale, out)
}

/// [`attention`] for generation steps: `q_len >= 1` new tokens against a cache of
/// `kv_len >= q_len` positions.
pub fn attention_decode(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    if shape.q_len == 0 || shape.q_len > shape.kv_len {
        return Err(Error::invalid(
            "attention_decode",
            format!(
                "need 1 <= q_len ({}) <= kv_len ({})",
                shape.q_len, shape.kv_len
            ),
        ));
    }
    attention(q, k, v, key_valid, shape, scale, out)
}

/// [`attention`] at an explicit SIMD level (an error if the CPU lacks it).
#[allow(clippy::too_many_arguments)]
pub fn attention_with_level(
    level: SimdLevel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    ensure_available(OP, level)?;
    check_args(q, k, v, key_valid, shape, out)?;
    let s = *shape;
    let (hd, hidden) = (s.head_dim, s.hidden());
    if s.batch == 0 || s.q_len == 0 || hidden == 0 {
        return Ok(());
    }
    if s.q_len < GEMM_MIN_Q {
        decode(level, q, k, v, key_valid, &s, scale, out);
        return Ok(());
    }
    // Task `t` = (sequence `t / n_heads`, head `t % n_heads`) writes its head's columns of
    // the sequence's `q_len` rows of `out`, disjoint from every other task's.
    let outp = SharedOut::new(out);
    let task = |t: usize| {
        let (b, h) = (t / s.n_heads, t % s.n_heads);
        with_scores(0, |scores| {
            // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`;
            // `out` is `[batch, q_len, hidden]` (checked) and this task alone writes the
            // columns `h * hd..(h + 1) * hd` of rows `b * q_len..(b + 1) * q_len`.
            dispatch!(level, K => unsafe {
                head_gemm::<K>(q, k, v, key_valid, &s, scale, b, h, scores, outp)
            })
        })
    };
    if s.batch * s.n_heads == 1 || s.q_len * s.kv_len * hd < 1 << 12 {
        (0..s.batch * s.n_heads).for_each(task);
    } else {
        (0..s.batch * s.n_heads).into_par_iter().for_each(task);
    }
    Ok(())
}

thread_local! {
    /// Per-thread attention scores, reused across calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scores buffer, at least `len` long (a fresh one if it is
/// already in use).
fn with_scores<R>(len: usize, f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCORES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf)
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

thread_local! {
    /// Partial results of [`decode`]'s split rows (of the calling thread).
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Position ranges per query row in [`decode`]: one when there are enough rows to keep every
/// thread busy, else enough ranges of at least `MIN_SPLIT` positions for about two per
/// thread.
fn decode_splits(rows: usize, n_pos: usize, threads: usize) -> usize {
    const MIN_SPLIT: usize = 64;
    if rows >= 2 * threads {
        1
    } else {
        (2 * threads).div_ceil(rows).min(n_pos / MIN_SPLIT).max(1)
    }
}

/// Few new queries per sequence (decode). A task takes one query row, all heads, and a range
/// of cache positions, and streams the rows of that range in order — K, then V, each row's
/// `hidden` contiguous values once — rather than one head at a time (which jumps `hidden`
/// floats per position and defeats the hardware prefetchers). Rows are split into position
/// ranges only when there are too few rows for the threads; their partial softmax sums are
/// merged as in flash-decoding. Scores and partials live in per-thread buffers. Shapes must
/// have passed [`check_args`], and `q_len >= 1`.
#[allow(clippy::too_many_arguments)]
fn decode(
    level: SimdLevel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    s: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) {
    let (hd, hidden, heads) = (s.head_dim, s.hidden(), s.n_heads);
    let rows = s.batch * s.q_len;
    let splits = decode_splits(rows, s.kv_len, rayon::current_num_threads());
    // One slot per (row, split): the unnormalized output, then per head the running max and
    // the sum of exponentials.
    let slot = hidden + 2 * heads;
    // Computes row `row`'s split `c` into `dst` (`hidden` outputs) and `stats` (`2 * heads`).
    let partial = |row: usize, c: usize, dst: &mut [f32], stats: &mut [f32]| {
        let (b, i) = (row / s.q_len, row % s.q_len);
        // This query's position; it sees keys `0..=p`.
        let n_pos = s.kv_len - s.q_len + i + 1;
        let per = n_pos.div_ceil(splits);
        let (j0, j1) = ((c * per).min(n_pos), ((c + 1) * per).min(n_pos));
        let n = j1 - j0;
        let (maxes, sums) = stats.split_at_mut(heads);
        if n == 0 {
            dst.fill(0.0);
            maxes.fill(f32::NEG_INFINITY);
            sums.fill(0.0);
            return;
        }
        let valid = &key_valid[b * s.kv_len + j0..b * s.kv_len + j1];
        let qv = &q[row * hidden..(row + 1) * hidden];
        let first = (b * s.kv_capacity + j0) * hidden;
        let keys = &k[first..first + (n - 1) * hidden + hidden];
        let vals = &v[first..first + (n - 1) * hidden + hidden];
        with_scores(heads * n, |scores| {
            let scores = &mut scores[..heads * n];
            // SAFETY: `level` is `simd_level()` or was checked with `ensure_available`;
            // `keys`/`vals` hold `n` rows of `hidden` values at stride `hidden`, `scores`
            // holds `heads` rows of `n`.
            dispatch!(level, K => unsafe {
                K::head_scores(qv, hd, keys, hidden, n, scores, n);
                for ((row, mx), sum) in scores.chunks_exact_mut(n).zip(maxes.iter_mut()).zip(sums.iter_mut()) {
                    for (x, &ok) in row.iter_mut().zip(valid) {
                        *x = if ok { *x * scale } else { f32::NEG_INFINITY };
                    }
                    *mx = K::max(row);
                    if *mx == f32::NEG_INFINITY || mx.is_nan() {
                        row.fill(0.0);
                        *sum = 0.0;
                    } else {
                        *sum = K::exp_shift_sum(row, *mx);
                    }
                }
                K::head_mix(scores, n, vals, hidden, n, hd, dst);
            })
        });
    };
    let par = rows * splits > 1 && rows * s.kv_len * hidden >= 1 << 15;
    if splits == 1 {
        // Normalize in place: `out` row = sum_j e_j v_j / sum_j e_j per head.
        let task = |(row, dst): (usize, &mut [f32])| {
            let mut stats = [0.0f32; 2 * MAX_STACK_HEADS];
            let mut heap = Vec::new();
            let stats: &mut [f32] = if heads <= MAX_STACK_HEADS {
                &mut stats[..2 * heads]
            } else {
                heap.resize(2 * heads, 0.0);
                &mut heap
            };
            partial(row, 0, dst, stats);
            for (o, &sum) in dst.chunks_exact_mut(hd).zip(&stats[heads..]) {
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                o.iter_mut().for_each(|x| *x *= inv);
            }
        };
        if par {
            out.par_chunks_mut(hidden).enumerate().for_each(task);
        } else {
            out.chunks_mut(hidden).enumerate().for_each(task);
        }
        return;
    }
    let run = |parts: &mut [f32]| {
        let task = |(t, buf): (usize, &mut [f32])| {
            let (dst, stats) = buf.split_at_mut(hidden);
            partial(t / splits, t % splits, dst, stats);
        };
        if par {
            parts.par_chunks_mut(slot).enumerate().for_each(task);
        } else {
            parts.chunks_mut(slot).enumerate().for_each(task);
        }
        // Merge: out = sum_c w_c o_c / sum_c w_c l_c with w_c = exp(m_c - max_c m_c).
        for (o, row_parts) in out
            .chunks_exact_mut(hidden)
            .zip(parts.chunks_exact(splits * slot))
        {
            for h in 0..heads {
                let stat =
                    |c: usize, which: usize| row_parts[c * slot + hidden + which * heads + h];
                let m = (0..splits)
                    .map(|c| stat(c, 0))
                    .fold(f32::NEG_INFINITY, f32::max);
                let oh = &mut o[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let mut total = 0.0;
                for c in 0..splits {
                    let mc = stat(c, 0);
                    if mc == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (mc - m).exp();
                    total += w * stat(c, 1);
                    let part = &row_parts[c * slot + h * hd..c * slot + (h + 1) * hd];
                    for (x, &p) in oh.iter_mut().zip(part) {
                        *x += w * p;
                    }
                }
                let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
                oh.iter_mut().for_each(|x| *x *= inv);
            }
        }
    };
    let len = rows * splits * slot;
    super::with_buf(&PARTIALS, len, run);
}

/// Heads whose softmax statistics [`decode`] keeps on the stack (more use the heap).
const MAX_STACK_HEADS: usize = 128;

/// Attention of one (sequence `b`, head `h`) pair for many queries (prefill), written to
/// the head's columns of the sequence's rows of `out` (`[batch, q_len, hidden]`): blocks of
/// `Q_BLOCK` queries use two small GEMMs (`scores = scale * Q Kᵀ`, then `out = P V`)
/// instead of per-key dot products. `scores` is scratch.
///
/// # Safety
/// The CPU must support `K`'s SIMD level. Shapes must have passed [`check_args`], `out`
/// points to that `out` buffer, and nothing else accesses the elements this call writes
/// while it runs.
#[allow(clippy::too_many_arguments)]
unsafe fn head_gemm<K: Kern>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    s: &AttentionShape,
    scale: f32,
    b: usize,
    h: usize,
    scores: &mut Vec<f32>,
    out: SharedOut,
) {
    let (hd, hidden) = (s.head_dim, s.hidden());
    let valid = &key_valid[b * s.kv_len..(b + 1) * s.kv_len];
    let cache_off = b * s.kv_capacity * hidden + h * hd;
    let past = s.kv_len - s.q_len;
    let mut i0 = 0;
    while i0 < s.q_len {
        let i1 = (i0 + Q_BLOCK).min(s.q_len);
        let qb = i1 - i0;
        // Keys 0..nk cover every position these queries may attend to.
        let nk = past + i1;
        scores.resize(qb * nk, 0.0);
        let sc = &mut scores[..qb * nk];
        // Exact extents of the strided operands (slicing panics rather than overreads).
        let qoff = (b * s.q_len + i0) * hidden + h * hd;
        let qs = &q[qoff..qoff + (qb - 1) * hidden + hd];
        let ks = &k[cache_off..cache_off + (nk - 1) * hidden + hd];
        let vs = &v[cache_off..cache_off + (nk - 1) * hidden + hd];
        // Row `i0` of this sequence, this head's first column; rows at stride `hidden`.
        let dst = out.get().wrapping_add((b * s.q_len + i0) * hidden + h * hd);
        // SAFETY: lhs (i, l) = qs[i * hidden + l] with i < qb, l < hd; rhs (l, j) =
        // ks[j * hidden + l] with j < nk; dst (i, j) = sc[i * nk + j]: all inside the slices
        // above. With `read_dst == false` the old contents are ignored.
        unsafe {
            gemm::gemm(
                qb,
                nk,
                hd,
                sc.as_mut_ptr(),
                1,
                nk as isize,
                false,
                qs.as_ptr(),
                1,
                hidden as isize,
                ks.as_ptr(),
                hidden as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            )
        };
        for (ii, row) in sc.chunks_exact_mut(nk).enumerate() {
            let p = past + i0 + ii;
            for (x, &ok) in row[..=p].iter_mut().zip(valid) {
                if !ok {
                    *x = f32::NEG_INFINITY;
                }
            }
            row[p + 1..].fill(f32::NEG_INFINITY);
            // SAFETY: forwarded from the caller.
            unsafe { softmax_row::<K>(row) };
        }
        // SAFETY: lhs (i, j) = sc[i * nk + j]; rhs (j, l) = vs[j * hidden + l] with j < nk,
        // l < hd: inside the slices above; dst (i, l) = out[(b * q_len + i0 + i) * hidden +
        // h * hd + l] with i < qb, l < hd: inside `out` and owned by this task (caller).
        unsafe {
            gemm::gemm(
                qb,
                hd,
                nk,
                dst,
                1,
                hidden as isize,
                false,
                sc.as_ptr(),
                1,
                nk as isize,
                vs.as_ptr(),
                1,
                hidden as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        };
        i0 = i1;
    }
}

fn check_args(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    s: &AttentionShape,
    out: &[f32],
) -> Result<()> {
    if s.q_len > s.kv_len {
        return Err(Error::invalid(
            OP,
            format!("q_len ({}) > kv_len ({})", s.q_len, s.kv_len),
        ));
    }
    if s.kv_len > s.kv_capacity {
        return Err(Error::invalid(
            OP,
            format!("kv_len ({}) > kv_capacity ({})", s.kv_len, s.kv_capacity),
        ));
    }
    let hidden = checked_product(OP, &[s.n_heads, s.head_dim])?;
    let q_elems = checked_product(OP, &[s.batch, s.q_len, hidden])?;
    let kv_elems = checked_product(OP, &[s.batch, s.kv_capacity, hidden])?;
    check_len(OP, "q [batch, q_len, hidden]", q.len(), q_elems)?;
    check_len(OP, "k [batch, kv_capacity, hidden]", k.len(), kv_elems)?;
    check_len(OP, "v [batch, kv_capacity, hidden]", v.len(), kv_elems)?;
    check_len(
        OP,
        "key_valid [batch, kv_len]",
        key_valid.len(),
        checked_product(OP, &[s.batch, s.kv_len])?,
    )?;
    check_len(OP, "out [batch, q_len, hidden]", out.len(), q_elems)
}

/// Scalar reference for [`attention`] (same arguments and errors).
pub fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_valid: &[bool],
    shape: &AttentionShape,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check_args(q, k, v, key_valid, shape, out)?;
    let s = *shape;
    let (hd, hidden) = (s.head_dim, s.hidden());
    let mut scores = vec![0.0f32; s.kv_len];
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            for i in 0..s.q_len {
                let p = s.kv_len - s.q_len + i;
                let qoff = (b * s.q_len + i) * hidden + h * hd;
                let mut mx = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate().take(p + 1) {
                    *sc = f32::NEG_INFINITY;
                    if key_valid[b * s.kv_len + j] {
                        let koff = (b * s.kv_capacity + j) * hidden + h * hd;
                        let d: f32 = (0..hd).map(|d| q[qoff + d] * k[koff + d]).sum();
                        *sc = d * scale;
                        mx = mx.max(*sc);
                    }
                }
                let o = &mut out[qoff..qoff + hd];
                o.fill(0.0);
                if mx == f32::NEG_INFINITY {
                    continue;
                }
                let mut sum = 0.0;
                for sc in &mut scores[..=p] {
                    *sc = (*sc - mx).exp();
                    sum += *sc;
                }
                for (j, sc) in scores[..=p].iter().enumerate() {
                    let pj = sc / sum;
                    let voff = (b * s.kv_capacity + j) * hidden + h * hd;
                    for d in 0..hd {
                        o[d] += pj * v[voff + d];
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, vec_f32};
    use crate::simd::available_levels;
    use proptest::prelude::*;

    fn shape(
        batch: usize,
        n_heads: usize,
        head_dim: usize,
        q_len: usize,
        kv_len: usize,
        kv_capacity: usize,
    ) -> AttentionShape {
        AttentionShape {
            batch,
            n_heads,
            head_dim,
            q_len,
            kv_len,
            kv_capacity,
        }
    }

    #[test]
    fn errors() {
        let s = shape(1, 2, 4, 2, 3, 4);
        let (q, kv, valid) = (vec![0.0; 16], vec![0.0; 32], vec![true; 3]);
        let mut out = vec![0.0; 16];
        assert!(attention(&q, &kv, &kv, &valid, &s, 1.0, &mut out).is_ok());
        assert!(matches!(
            attention(&q[..15], &kv, &kv, &valid, &s, 1.0, &mut out),
            Err(Error::ShapeMismatch { op: OP, .. })
        ));
        assert!(matches!(
            attention(&q, &kv[..24], &kv, &valid, &s, 1.0, &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            attention(&q, &kv, &kv, &valid[..2], &s, 1.0, &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            attention(&q, &kv, &kv, &valid, &s, 1.0, &mut out[..8]),
            Err(Error::ShapeMismatch { .. })
        ));
        let bad = shape(1, 2, 4, 4, 3, 4);
        assert!(matches!(
            attention(&[0.0; 32], &kv, &kv, &valid, &bad, 1.0, &mut [0.0; 32]),
            Err(Error::InvalidArgument { .. })
        ));
        let bad = shape(1, 2, 4, 2, 5, 4);
        assert!(matches!(
            attention(&q, &kv, &kv, &[true; 5], &bad, 1.0, &mut out),
            Err(Error::InvalidArgument { .. })
        ));
        let huge = shape(usize::MAX, 2, 4, 1, 1, 1);
        assert!(matches!(
            attention(&q, &kv, &kv, &valid, &huge, 1.0, &mut out),
            Err(Error::InvalidArgument { .. })
        ));
        // Wrapper preconditions.
        assert!(matches!(
            attention_prefill(&q, &kv, &kv, &valid, &s, 1.0, &mut out),
            Err(Error::InvalidArgument {
                op: "attention_prefill",
                ..
            })
        ));
        let empty = shape(1, 2, 4, 0, 3, 4);
        assert!(matches!(
            attention_decode(&[], &kv, &kv, &valid, &empty, 1.0, &mut []),
            Err(Error::InvalidArgument {
                op: "attention_decode",
                ..
            })
        ));
        assert!(attention(&[], &kv, &kv, &valid, &empty, 1.0, &mut []).is_ok());
    }

    #[test]
    fn single_key_and_padding() {
        // One head, head_dim 3; query 0 of a prefill sees only key 0 -> out = v0.
        // Sequence 1 has key 0 padded: query 0 has no valid key -> zeros.
        let s = shape(2, 1, 3, 2, 2, 2);
        let q = vec_of(12, 0.3);
        let k = vec_of(12, -0.2);
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let valid = [true, true, false, true];
        for level in available_levels() {
            let mut out = vec![f32::NAN; 12];
            attention_with_level(level, &q, &k, &v, &valid, &s, 0.5, &mut out).unwrap();
            assert_eq!(&out[0..3], &v[0..3], "{level}");
            assert_eq!(&out[6..9], &[0.0; 3], "{level}");
            // Sequence 1, query 1 sees only key 1.
            assert_eq!(&out[9..12], &v[9..12], "{level}");
        }
        let mut out = vec![f32::NAN; 12];
        attention_prefill(&q, &k, &v, &valid, &s, 0.5, &mut out).unwrap();
        assert_eq!(&out[0..3], &v[0..3]);
    }

    fn vec_of(n: usize, step: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * step).sin()).collect()
    }

    /// Sizes that take the parallel path, with a cache larger than kv_len.
    #[test]
    fn parallel_decode_matches_ref() {
        let s = shape(3, 4, 40, 2, 37, 50);
        let hidden = 160;
        let q = vec_of(3 * 2 * hidden, 0.37);
        let k = vec_of(3 * 50 * hidden, 0.11);
        let v = vec_of(3 * 50 * hidden, 0.23);
        let valid: Vec<bool> = (0..3 * 37).map(|i| i % 7 != 3).collect();
        let mut want = vec![0.0; q.len()];
        attention_ref(&q, &k, &v, &valid, &s, 0.2, &mut want).unwrap();
        let mut got = vec![0.0; q.len()];
        attention_decode(&q, &k, &v, &valid, &s, 0.2, &mut got).unwrap();
        assert_close(&got, &want, 1e-5, "decode");
    }

    /// One sequence with a long cache: rows are split into position ranges (merged
    /// flash-decoding style), including ranges that are all padding.
    #[test]
    fn split_decode_matches_ref() {
        for (q_len, pad) in [(1, 0), (1, 150), (3, 70)] {
            let kv_len = 300;
            let s = shape(1, 4, 24, q_len, kv_len, kv_len + 3);
            assert!(decode_splits(q_len, kv_len, rayon::current_num_threads().max(2)) > 1);
            let hidden = 96;
            let q = vec_of(q_len * hidden, 0.37);
            let k = vec_of(s.kv_capacity * hidden, 0.011);
            let v = vec_of(s.kv_capacity * hidden, 0.23);
            let valid: Vec<bool> = (0..kv_len).map(|j| j >= pad).collect();
            let mut want = vec![0.0; q.len()];
            attention_ref(&q, &k, &v, &valid, &s, 0.2, &mut want).unwrap();
            for level in available_levels() {
                let mut got = vec![f32::NAN; q.len()];
                attention_with_level(level, &q, &k, &v, &valid, &s, 0.2, &mut got).unwrap();
                assert_close(
                    &got,
                    &want,
                    1e-5,
                    &format!("{level} q_len {q_len} pad {pad}"),
                );
            }
        }
    }

    /// A long prompt (several query blocks of the GEMM path) with left padding.
    #[test]
    fn long_prefill_matches_ref() {
        let (batch, q_len) = (2, 150);
        let s = shape(batch, 3, 20, q_len, q_len, q_len + 5);
        let hidden = 60;
        let q = vec_of(batch * q_len * hidden, 0.37);
        let k = vec_of(batch * s.kv_capacity * hidden, 0.11);
        let v = vec_of(batch * s.kv_capacity * hidden, 0.23);
        // Sequence 1 is left-padded by 7 tokens.
        let valid: Vec<bool> = (0..batch * q_len)
            .map(|i| i < q_len || i - q_len >= 7)
            .collect();
        let mut want = vec![0.0; q.len()];
        attention_ref(&q, &k, &v, &valid, &s, 0.3, &mut want).unwrap();
        for level in available_levels() {
            let mut got = vec![f32::NAN; q.len()];
            attention_with_level(level, &q, &k, &v, &valid, &s, 0.3, &mut got).unwrap();
            assert_close(&got, &want, 1e-5, &format!("{level}"));
        }
        // Padded queries attend to nothing and give zeros.
        let mut got = vec![f32::NAN; q.len()];
        attention_prefill(&q, &k, &v, &valid, &s, 0.3, &mut got).unwrap();
        let pad_out = &got[q_len * hidden..(q_len + 7) * hidden];
        assert!(pad_out.iter().all(|&x| x == 0.0));
    }

    /// Per output, a bound on the `f32` rounding error of any summation order, from the
    /// forward error analysis of the three steps. A score `scale·Σ_d q_d·k_d` is off by at
    /// most `δ = (head_dim + 2)·ε·S`, where `S` is the largest `scale·Σ_d |q_d·k_d|` over
    /// the row's valid keys (the dot product, plus the multiplication by `scale`). A softmax
    /// weight `exp(s_j - max) / Σ exp` then has relative error at most `4δ` from the scores
    /// plus `(kv_len + 16)·ε` from `exp` (a few ulp in the SIMD kernels), the sum of up to
    /// `kv_len` terms, online rescaling and the division. The weighted sum of values adds
    /// `kv_len·ε` of `Σ_j p_j·|v_j|`, which is at most the largest `|v_j|` of the column:
    /// in all, `(4δ + (2·kv_len + 16)·ε) · max_j |v_j|`. A wrong mask or index moves an
    /// output by `O(|v|)`, far above this bound.
    fn rounding_bounds(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        valid: &[bool],
        s: &AttentionShape,
        scale: f32,
    ) -> Vec<f32> {
        let (hd, hidden) = (s.head_dim, s.hidden());
        let eps = f32::EPSILON;
        let mut bounds = vec![0.0f32; q.len()];
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                for i in 0..s.q_len {
                    let p = s.kv_len - s.q_len + i;
                    let qoff = (b * s.q_len + i) * hidden + h * hd;
                    let keys: Vec<usize> = (0..=p).filter(|&j| valid[b * s.kv_len + j]).collect();
                    let row = |j: usize| (b * s.kv_capacity + j) * hidden + h * hd;
                    let s_max = keys
                        .iter()
                        .map(|&j| {
                            let d: f32 = (0..hd).map(|d| (q[qoff + d] * k[row(j) + d]).abs()).sum();
                            scale * d
                        })
                        .fold(0.0f32, f32::max);
                    let delta = (hd + 2) as f32 * eps * s_max;
                    let rel = 4.0 * delta + (2 * s.kv_len + 16) as f32 * eps;
                    for d in 0..hd {
                        let v_max = keys
                            .iter()
                            .map(|&j| v[row(j) + d].abs())
                            .fold(0.0f32, f32::max);
                        bounds[qoff + d] = rel * v_max;
                    }
                }
            }
        }
        bounds
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_ref(
            (s, q, k, v, valid) in (1usize..4, 1usize..4, 1usize..40, 1usize..14, 0usize..12, 0usize..3)
                .prop_flat_map(|(batch, n_heads, head_dim, q_len, past, extra)| {
                    let kv_len = q_len + past;
                    let s = shape(batch, n_heads, head_dim, q_len, kv_len, kv_len + extra);
                    let hidden = n_heads * head_dim;
                    (
                        Just(s),
                        vec_f32(batch * q_len * hidden),
                        vec_f32(batch * s.kv_capacity * hidden),
                        vec_f32(batch * s.kv_capacity * hidden),
                        proptest::collection::vec(proptest::bool::weighted(0.85), batch * kv_len),
                    )
                }),
            scale in 0.05f32..2.0,
        ) {
            let mut want = vec![0.0; q.len()];
            attention_ref(&q, &k, &v, &valid, &s, scale, &mut want).unwrap();
            let bounds = rounding_bounds(&q, &k, &v, &valid, &s, scale);
            for level in available_levels() {
                let mut got = vec![f32::NAN; q.len()];
                attention_with_level(level, &q, &k, &v, &valid, &s, scale, &mut got).unwrap();
                for (i, ((&a, &b), &bound)) in got.iter().zip(&want).zip(&bounds).enumerate() {
                    // Both results carry at most `bound` of rounding error.
                    prop_assert!(
                        (a - b).abs() <= 2.0 * bound,
                        "{level} {s:?}: index {i}: got {a}, want {b}, bound {bound}"
                    );
                }
            }
        }
    }
}
