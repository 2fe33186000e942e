//! AVX-512 VNNI GEMM for 4-bit and 8-bit rows at large `m`: `x` rounded to 8 bits per group.
//!
//! The block path decodes every weight to `f32` and runs an `f32` GEMM: 16 multiply-adds per
//! FMA, two FMAs per cycle. `vpdpbusd` does 64 byte products per instruction, one per cycle
//! here, so integer arithmetic on bytes has twice the multiply-add rate, if `x` fits in a
//! byte. This kernel rounds each group of `gs` values of an `x` row to `q` with `|q| <= 127`
//! and its own scale (`x̂ = q · s`, `s = max |x| / 127`) and computes, as the fixed-point
//! kernel of [`super::avx512_fixed`] does with 16-bit `q`,
//!
//! ```text
//! Σ_l W[r, l] · x[l] ≈ Σ_g  step_g · (s_g · Σ_{l∈g} code_l · q_l  +  c · Σ_{l∈g} (x[l] − x̂[l]))
//!                          + min_g · Σ_{l∈g} x[l]
//! ```
//!
//! with the inner sum exact in `i32` and `c` the middle code (8 for 4-bit codes, 128 for
//! 8-bit ones). The error is `step · Σ (code − c) · (x̂ − x)`, with `|x − x̂| <= s / 2`, 1/254
//! of the group's largest `|x|`: a small part of the error the weights' own rounding
//! (`step / 2` per weight) already causes. [`error_bound`] (tests) states the bound per
//! output.
//!
//! Unlike the fixed-point kernel, this one vectorises over rows of `x`, not over weights: a
//! lane holds one row of `x`, and a tile of [`OUTS`] weight rows times [`VECS`] vectors of
//! [`LANES`] `x` rows keeps `OUTS · VECS` accumulators. Each step broadcasts 4 code bytes of
//! one weight row and multiplies them with the matching values of 16 `x` rows. With 4-bit
//! codes the 4 bytes hold 8 codes (4 under the low nibbles, 4 under the high ones), masked
//! into two vectors of byte codes; 8-bit codes are bytes already, 4 values per step, and need
//! no unpacking. The codes are read in their packed form, once per tile of 32 rows of `x`;
//! nothing is decoded into a buffer. At a group's end the integer sums are scaled into `f32`
//! accumulators. Every output is summed in the same order (bias, then group by group)
//! whatever the tile, thread split or number of rows, so a row's result does not depend on
//! the other rows in the call.
//!
//! Layout of the quantized `x` ([`Int8X`]): rows in vectors of [`LANES`]; for vector `v` and
//! group `g`, `16 · gs` bytes. For 4-bit weights: for each step `d < gs / 8`, 64 bytes
//! holding, for each row `t` of the vector, bytes `4t .. 4t + 4` = values
//! `g · gs + 4d + (0..4)` (the low nibbles of code bytes `4d .. 4d + 4`), then 64 bytes with
//! the values `gb` further (the high nibbles; `gb = gs / 2`, the split packing of
//! [`crate::codec`]). For 8-bit weights: for each step `d < gs / 4`, 64 bytes holding, for
//! row `t`, values `g · gs + 4d + (0..4)`. Per vector and group, 48 `f32`: `s` of the 16
//! rows, then `c · Σ (x − x̂)`, then `Σ x`.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::avx512_fixed::{abs_max_and_sum, round_clamped};
use super::Rows;

/// Rows of `x` per vector (one `i32` lane each).
pub(crate) const LANES: usize = 16;
/// Weight rows per tile.
pub(crate) const OUTS: usize = 6;
/// Vectors of `x` rows per tile.
pub(crate) const VECS: usize = 2;
/// Largest `|q|`.
const Q_MAX: f32 = 127.0;

/// The code the rounding of `x` is measured from: the middle of `0 ..= 2^bits − 1` (8 for
/// 4-bit codes, 128 for 8-bit ones).
fn code_center(bits: u8) -> f32 {
    f32::from(1u16 << (bits - 1))
}

/// `f32` per vector and group in [`Int8X::params`]: `s`, `c · Σ (x − x̂)`, `Σ x`.
const PARAMS: usize = 3 * LANES;

/// Whether this CPU has AVX-512 VNNI (on top of the AVX-512 level), as the fixed-point kernel
/// needs.
pub(crate) use super::avx512_fixed::available;

/// Whether the kernel handles `w`'s format: 4-bit or 8-bit codes in groups of a multiple of
/// 32 values (so that a step's 4 code bytes lie in one group and, for 4-bit codes, 16 values
/// of `x` in one half).
pub(crate) fn supports(w: &Rows<'_>) -> bool {
    (w.bits == 4 || w.bits == 8) && w.gs.is_multiple_of(32)
}

/// `m` rows of `x` rounded to bytes per group, laid out for the kernel (module docs).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Int8X {
    /// Per vector and group, `16 · gs` bytes.
    parts: Vec<i8>,
    /// Per vector and group, [`PARAMS`] values.
    params: Vec<f32>,
    /// Rows of `x`.
    m: usize,
    /// Values per row.
    cols: usize,
    /// Values per group.
    gs: usize,
    /// Bits of the weight codes this layout is for (4 or 8).
    bits: u8,
}

impl Int8X {
    /// An empty value whose buffers [`Int8X::requantize`] grows (no allocation here).
    pub(crate) const fn new() -> Int8X {
        Int8X {
            parts: Vec::new(),
            params: Vec::new(),
            m: 0,
            cols: 0,
            gs: 0,
            bits: 4,
        }
    }

    /// Groups per row.
    fn groups(&self) -> usize {
        self.cols.div_ceil(self.gs)
    }

    /// Vectors of [`LANES`] rows (the last one padded with zero rows).
    fn vectors(&self) -> usize {
        self.m.div_ceil(LANES)
    }

    /// Rounds `m` rows of `cols` values (`x.len() >= m * cols`) in groups of `gs` (a positive
    /// multiple of 32) into this value's buffers, laid out for weights with `bits`-bit codes
    /// (4 or 8); the buffers keep their capacity across calls. Vectors of rows are rounded in
    /// parallel. `false` when a value is not finite (the contents are then unspecified).
    ///
    /// # Panics
    /// If `gs` is not a positive multiple of 32, `bits` is not 4 or 8, or `x` is shorter than
    /// `m * cols`.
    pub(crate) fn requantize(
        &mut self,
        x: &[f32],
        m: usize,
        cols: usize,
        gs: usize,
        bits: u8,
    ) -> bool {
        assert!(gs > 0 && gs.is_multiple_of(32) && x.len() >= m * cols);
        assert!(
            bits == 4 || bits == 8,
            "int8 x: no layout for {bits}-bit codes"
        );
        (self.m, self.cols, self.gs, self.bits) = (m, cols, gs, bits);
        let groups = self.groups();
        let vectors = self.vectors();
        if vectors == 0 || groups == 0 {
            return true;
        }
        // Zeros: the padding rows read q = 0, s = 0, Σ x = 0.
        self.parts.clear();
        self.parts.resize(vectors * groups * LANES * gs, 0);
        self.params.clear();
        self.params.resize(vectors * groups * PARAMS, 0.0);
        self.parts
            .par_chunks_mut(groups * LANES * gs)
            .zip(self.params.par_chunks_mut(groups * PARAMS))
            .enumerate()
            .all(|(v, (parts, params))| {
                let first = v * LANES;
                let rows = &x[first * cols..(first + LANES).min(m) * cols];
                // SAFETY: only reached on CPUs that passed `available` (AVX-512 F/BW/VL);
                // the slices have the sizes `quantize_vector` asks for.
                unsafe { quantize_vector(rows, cols, gs, bits, parts, params) }
            })
    }
}

/// Rounds the rows of one vector (`rows`: up to 16 rows of `cols` values) into its bytes
/// (`parts`, `groups · 16 · gs`, laid out for `bits`-bit codes) and parameters (`params`,
/// `groups ·` [`PARAMS`]); `false` if a value is not finite.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL. Sizes are checked with a panic.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_vector(
    rows: &[f32],
    cols: usize,
    gs: usize,
    bits: u8,
    parts: &mut [i8],
    params: &mut [f32],
) -> bool {
    let groups = cols.div_ceil(gs);
    let n_rows = rows.len() / cols;
    assert!(
        gs.is_multiple_of(32)
            && n_rows <= LANES
            && parts.len() == groups * LANES * gs
            && params.len() == groups * PARAMS
    );
    let rem = cols % gs;
    let mut tail = Vec::new();
    for (t, row) in rows.chunks_exact(cols).enumerate() {
        if rem != 0 {
            // The last, partial group, zero-padded to `gs` values (not on OPT's shapes).
            tail.clear();
            tail.extend_from_slice(&row[cols - rem..]);
            tail.resize(gs, 0.0);
        }
        for g in 0..groups {
            let vals = if (g + 1) * gs <= cols {
                &row[g * gs..(g + 1) * gs]
            } else {
                &tail[..]
            };
            let block = &mut parts[g * LANES * gs..(g + 1) * LANES * gs];
            // SAFETY: as this function's contract; `vals` holds `gs` values and `block`
            // `16 · gs` bytes.
            let Some((s, sum, residual)) = (unsafe { quantize_group(vals, t, bits, block) }) else {
                return false;
            };
            let p = g * PARAMS + t;
            params[p] = s;
            params[p + LANES] = code_center(bits) * residual;
            params[p + 2 * LANES] = sum;
        }
    }
    true
}

/// Rounds one group of a row (`vals`, `gs` values) to bytes and writes them for row `t` of
/// its vector into `block` (the vector's `16 · gs` bytes of this group, laid out for
/// `bits`-bit codes: split into halves for 4 bits, in order for 8); returns
/// `(s, Σ vals, Σ (vals − q · s))`, or `None` if a value is not finite.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL. `vals.len()` must be a multiple of 32,
/// `block.len() >= 16 · vals.len()` and `t < 16` (checked with a panic).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_group(
    vals: &[f32],
    t: usize,
    bits: u8,
    block: &mut [i8],
) -> Option<(f32, f32, f32)> {
    let gs = vals.len();
    assert!(gs.is_multiple_of(32) && block.len() >= LANES * gs && t < LANES);
    let v = vals.as_ptr();
    // SAFETY: AVX-512 F is this function's contract; `gs` is a multiple of 32.
    let (max, sum) = unsafe { abs_max_and_sum(vals) }?;
    let inv = _mm512_set1_ps(if max > 0.0 { Q_MAX / max } else { 0.0 });
    let s = max / Q_MAX;
    let (lo_q, hi_q) = (
        _mm512_set1_epi32(-(Q_MAX as i32)),
        _mm512_set1_epi32(Q_MAX as i32),
    );
    let gb = gs / 2;
    let mut residual = _mm512_setzero_ps();
    let b = block.as_mut_ptr();
    for j in (0..gs).step_by(16) {
        // SAFETY: `j + 16 <= gs = vals.len()`.
        let x = unsafe { _mm512_loadu_ps(v.add(j)) };
        let q = round_clamped(x, inv, lo_q, hi_q);
        residual = _mm512_add_ps(
            residual,
            _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(s), x),
        );
        let mut bytes = [0i32; 4];
        // SAFETY: 16 bytes into a 16-byte array.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q)) };
        for (k, &four) in bytes.iter().enumerate() {
            let at = if bits == 4 {
                // Values `j .. j + 16` lie in one half (gb is a multiple of 16): 4 steps of 4.
                let (half, jj) = (j / gb, j % gb);
                (jj / 4 + k) * 128 + half * 64 + 4 * t
            } else {
                (j / 4 + k) * 64 + 4 * t
            };
            // SAFETY: 4-bit: `at + 4 <= (gb / 4) * 128 = 16 · gs`; 8-bit:
            // `at + 4 <= (gs / 4) * 64 = 16 · gs`; `16 · gs <= block.len()`.
            unsafe { b.add(at).cast::<i32>().write_unaligned(four) };
        }
    }
    Some((s, sum, _mm512_reduce_add_ps(residual)))
}

/// Weight rows per parallel task (a multiple of [`OUTS`]).
const TASK_ROWS: usize = 16 * OUTS;

/// The output pointer shared by the tasks of [`gemm`], each writing its own elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks of `gemm` write disjoint elements (their own rows of `x` times their own
// weight rows) and nothing reads them until all tasks have joined.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// `out[i * n + r] = bias[r] + Σ_l W[r, l] · x̂[i, l]` for every row `i < x.m` and output
/// `r < n = w.rows`. Tasks of up to 32 rows of `x` times [`TASK_ROWS`] weight rows run on
/// rayon's threads; consecutive tasks share their rows of `x` (kept in L2 while the weights
/// stream past).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI ([`available`]); `w` must pass [`supports`].
/// Bounds and shapes are checked with a panic.
pub(crate) unsafe fn gemm(w: &Rows<'_>, x: &Int8X, bias: Option<&[f32]>, out: &mut [f32]) {
    w.assert_in_bounds();
    let n = w.rows;
    assert!(
        out.len() >= x.m * n,
        "int8 gemm: out holds {} values, not {} x {n}",
        out.len(),
        x.m
    );
    let vectors = x.vectors();
    let (x_tiles, out_chunks) = (vectors.div_ceil(VECS), n.div_ceil(TASK_ROWS));
    let shared = SharedOut(out.as_mut_ptr());
    (0..x_tiles * out_chunks).into_par_iter().for_each(|task| {
        let (v0, r0) = (task / out_chunks * VECS, task % out_chunks * TASK_ROWS);
        let out = shared;
        // SAFETY: the CPU features are the caller's contract; the rows and vectors exist;
        // this task alone writes rows `16 · v0 ..` of `x` times outputs `r0 ..` of `out`
        // (`x.m · n` values, checked above), and `out` outlives the parallel loop.
        unsafe {
            gemm_tile_range(
                w,
                x,
                bias,
                v0,
                VECS.min(vectors - v0),
                r0,
                TASK_ROWS.min(n - r0),
                out.0,
            )
        };
    });
}

/// `out[i * n + r] = bias[r] + Σ_l W[r, l] · x̂[i, l]` for rows `i` of `x` in vectors
/// `v0 .. v0 + vecs` (`i < x.m`, `vecs <= VECS`) and weight rows `r0 .. r0 + rows` of `w`
/// (`rows <= TASK_ROWS`, `n = w.rows`).
///
/// The tile's `x` rows (`16 · cols` bytes per vector) stay in L2 while the range's weight rows
/// pass. (Taking the groups in L1-sized chunks, with the sums waiting in `sums`, measured no
/// faster on OPT-6.7B shapes up to `k = 16384`.)
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI ([`available`]); `w` must pass [`supports`]
/// and [`Rows::assert_in_bounds`]; `x` must be quantized for `w` (`cols`, `gs`; checked);
/// `out` must point to `x.m · w.rows` writable `f32`, and no other thread may access the
/// elements this call writes while it runs.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_tile_range(
    w: &Rows<'_>,
    x: &Int8X,
    bias: Option<&[f32]>,
    v0: usize,
    vecs: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
) {
    assert!(
        x.cols == w.cols
            && x.gs == w.gs
            && x.bits == w.bits
            && supports(w)
            && vecs <= VECS
            && rows <= TASK_ROWS
            && v0 + vecs <= x.vectors()
            && r0 + rows <= w.rows
            && bias.is_none_or(|b| b.len() >= w.rows),
        "int8 gemm: arguments for another shape"
    );
    // Sums of row `j` of the range and vector `u` at `(j * VECS + u) * LANES`.
    let mut sums = [0f32; TASK_ROWS * VECS * LANES];
    if let Some(b) = bias {
        for (j, row) in sums.chunks_exact_mut(VECS * LANES).take(rows).enumerate() {
            row.fill(b[r0 + j]);
        }
    }
    let mut r = r0;
    while r < r0 + rows {
        let o = (r0 + rows - r).min(OUTS);
        let acc = &mut sums[(r - r0) * VECS * LANES..(r - r0 + o) * VECS * LANES];
        // SAFETY: rows `r .. r + o` of `w` and vectors `v0 .. v0 + vecs` of `x` exist
        // (asserted above); `acc` holds `o` rows of sums; `x` is laid out for `w.bits`.
        unsafe {
            if w.bits == 8 {
                tile_any::<true>(o, vecs, w, x, v0, r, acc)
            } else {
                tile_any::<false>(o, vecs, w, x, v0, r, acc)
            }
        }
        r += o;
    }
    // Each output row's `rows` values are gathered from `sums` (in L1) into `line` and
    // written contiguously: whole cache lines in order, not one value per row of `out`.
    let n = w.rows;
    let mut line = [0f32; TASK_ROWS];
    for u in 0..vecs {
        let first = (v0 + u) * LANES;
        for t in 0..LANES.min(x.m.saturating_sub(first)) {
            for (j, v) in line[..rows].iter_mut().enumerate() {
                *v = sums[(j * VECS + u) * LANES + t];
            }
            // SAFETY: row `first + t < x.m`, columns `r0 .. r0 + rows <= n`: inside the
            // caller's `x.m · n` outputs, of which this call alone writes these.
            unsafe {
                std::ptr::copy_nonoverlapping(line.as_ptr(), out.add((first + t) * n + r0), rows)
            };
        }
    }
}

/// [`tile`] for `o <= OUTS` weight rows and `vecs <= VECS` vectors, chosen at run time.
///
/// # Safety
/// As [`tile`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_any<const EIGHT: bool>(
    o: usize,
    vecs: usize,
    w: &Rows<'_>,
    x: &Int8X,
    v: usize,
    r: usize,
    acc: &mut [f32],
) {
    // SAFETY: the caller's contract, for the shape it asks for.
    unsafe {
        match (o, vecs) {
            (6, 2) => tile::<6, 2, EIGHT>(w, x, v, r, acc),
            (5, 2) => tile::<5, 2, EIGHT>(w, x, v, r, acc),
            (4, 2) => tile::<4, 2, EIGHT>(w, x, v, r, acc),
            (3, 2) => tile::<3, 2, EIGHT>(w, x, v, r, acc),
            (2, 2) => tile::<2, 2, EIGHT>(w, x, v, r, acc),
            (1, 2) => tile::<1, 2, EIGHT>(w, x, v, r, acc),
            (6, _) => tile::<6, 1, EIGHT>(w, x, v, r, acc),
            (5, _) => tile::<5, 1, EIGHT>(w, x, v, r, acc),
            (4, _) => tile::<4, 1, EIGHT>(w, x, v, r, acc),
            (3, _) => tile::<3, 1, EIGHT>(w, x, v, r, acc),
            (2, _) => tile::<2, 1, EIGHT>(w, x, v, r, acc),
            _ => tile::<1, 1, EIGHT>(w, x, v, r, acc),
        }
    }
}

/// One tile: weight rows `r .. r + O`, `x` vectors `v .. v + V`, adding to the sums in `acc`
/// (`O` rows of `VECS · LANES`, as in [`gemm_tile_range`]); `EIGHT` = 8-bit codes (else
/// 4-bit).
///
/// # Safety
/// As [`gemm_tile_range`], for these rows and vectors (which must exist);
/// `acc.len() >= O · VECS · LANES` (checked).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const O: usize, const V: usize, const EIGHT: bool>(
    w: &Rows<'_>,
    x: &Int8X,
    v: usize,
    r: usize,
    acc_buf: &mut [f32],
) {
    assert!(acc_buf.len() >= O * VECS * LANES && V <= VECS);
    let (gs, groups, gb) = (w.gs, w.groups(), w.group_bytes());
    let codes = w.codes.as_ptr().wrapping_add(r * w.code_stride);
    let wp = w.params.as_ptr().wrapping_add(r * w.param_stride);
    let xq = x.parts.as_ptr().wrapping_add(v * groups * LANES * gs);
    let xp = x.params.as_ptr().wrapping_add(v * groups * PARAMS);
    let nibble = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); V]; O];
    for o in 0..O {
        for u in 0..V {
            // SAFETY: inside `acc_buf` (asserted above).
            acc[o][u] = unsafe { _mm512_loadu_ps(acc_buf.as_ptr().add((o * VECS + u) * LANES)) };
        }
    }
    for g in 0..groups {
        let mut sums = [[_mm512_setzero_si512(); V]; O];
        if EIGHT {
            for d in 0..gs / 4 {
                let mut xv = [_mm512_setzero_si512(); V];
                for u in 0..V {
                    // SAFETY: vector `v + u`, group `g`, step `d` lies inside `parts`.
                    xv[u] = unsafe {
                        _mm512_loadu_si512(xq.add(((u * groups + g) * LANES * gs) + d * 64).cast())
                    };
                }
                for o in 0..O {
                    // SAFETY: code bytes `g · gs + 4d .. + 4` of row `r + o` lie in the row
                    // (`4d + 4 <= gs`).
                    let b = unsafe { broadcast_four(codes, w.code_stride, o, g * gb + 4 * d) };
                    for u in 0..V {
                        sums[o][u] = _mm512_dpbusd_epi32(sums[o][u], b, xv[u]);
                    }
                }
            }
        } else {
            for d in 0..gs / 8 {
                let mut lo_x = [_mm512_setzero_si512(); V];
                let mut hi_x = [_mm512_setzero_si512(); V];
                for u in 0..V {
                    // SAFETY: vector `v + u`, group `g`, step `d` lies inside `parts`.
                    unsafe {
                        let p = xq.add(((u * groups + g) * LANES * gs) + d * 128);
                        lo_x[u] = _mm512_loadu_si512(p.cast());
                        hi_x[u] = _mm512_loadu_si512(p.add(64).cast());
                    }
                }
                for o in 0..O {
                    // SAFETY: code bytes `g · gb + 4d .. + 4` of row `r + o` lie in the row
                    // (`4d + 4 <= gb`).
                    let b = unsafe { broadcast_four(codes, w.code_stride, o, g * gb + 4 * d) };
                    let lo = _mm512_and_si512(b, nibble);
                    let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(b), nibble);
                    for u in 0..V {
                        sums[o][u] = _mm512_dpbusd_epi32(
                            _mm512_dpbusd_epi32(sums[o][u], lo, lo_x[u]),
                            hi,
                            hi_x[u],
                        );
                    }
                }
            }
        }
        for u in 0..V {
            // SAFETY: vector `v + u`, group `g` has PARAMS values inside `params`.
            let (s, centre, sum_x) = unsafe {
                let p = xp.add((u * groups + g) * PARAMS);
                (
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(LANES)),
                    _mm512_loadu_ps(p.add(2 * LANES)),
                )
            };
            for o in 0..O {
                // SAFETY: row `r + o`, group `g`: its `[step, min]` pair of `f16` lies in
                // `w.params` (`Rows::assert_in_bounds`).
                let pair = unsafe {
                    let p = wp.add(o * w.param_stride + 2 * g);
                    _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()))
                };
                let step = _mm512_broadcastss_ps(pair);
                let min = _mm512_broadcastss_ps(_mm_movehdup_ps(pair));
                let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[o][u]), s, centre);
                acc[o][u] = _mm512_fmadd_ps(min, sum_x, _mm512_fmadd_ps(t, step, acc[o][u]));
            }
        }
    }
    for o in 0..O {
        for u in 0..V {
            // SAFETY: inside `acc_buf` (asserted above).
            unsafe {
                _mm512_storeu_ps(acc_buf.as_mut_ptr().add((o * VECS + u) * LANES), acc[o][u])
            };
        }
    }
}

/// The 4 code bytes at `byte` of weight row `o` (rows `stride` bytes apart from `codes`), in
/// every lane.
///
/// # Safety
/// The CPU must support AVX-512 F; `codes + o · stride + byte .. + 4` must be readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn broadcast_four(codes: *const u8, stride: usize, o: usize, byte: usize) -> __m512i {
    // SAFETY: the caller's contract.
    let four = unsafe { codes.add(o * stride + byte).cast::<i32>().read_unaligned() };
    _mm512_set1_epi32(four)
}

/// The largest difference, for `x` row `i` and output `r` (`out[i * n + r]`), between this
/// kernel and exact arithmetic on the dequantized weight that the rounding of `x` can cause:
/// `Σ_g |step_g| · c · gs · s_g / 2` (`|code − c| <= c`, `|x − x̂| <= s / 2`).
#[cfg(test)]
pub(crate) fn error_bound(w: &Rows<'_>, x: &[f32], m: usize) -> Vec<f32> {
    let mut xq = Int8X::new();
    assert!(xq.requantize(x, m, w.cols, w.gs, w.bits), "finite x");
    let groups = w.groups();
    let mut out = vec![0f32; m * w.rows];
    for i in 0..m {
        for r in 0..w.rows {
            out[i * w.rows + r] = (0..groups)
                .map(|g| {
                    let step = w.params[r * w.param_stride + 2 * g].to_f32().abs();
                    let s = xq.params[((i / LANES) * groups + g) * PARAMS + i % LANES];
                    step * code_center(w.bits) * w.gs as f32 * s / 2.0
                })
                .sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 + seed * 101) % 211) as f32 * 0.013 - 1.3)
            .collect()
    }

    /// The bytes of row `i`, group `g`, value `j` (of `gs`) in the layout of the module docs.
    fn byte_at(xq: &Int8X, i: usize, g: usize, j: usize) -> i8 {
        let (gs, gb) = (xq.gs, xq.gs / 2);
        let base = ((i / LANES) * xq.groups() + g) * LANES * gs;
        if xq.bits == 8 {
            return xq.parts[base + (j / 4) * 64 + 4 * (i % LANES) + j % 4];
        }
        let (half, jj) = (j / gb, j % gb);
        xq.parts[base + (jj / 4) * 128 + half * 64 + 4 * (i % LANES) + jj % 4]
    }

    /// The kernel computes the formula of the module docs exactly, up to
    /// float rounding: every tile shape, ragged rows and columns, bias or none.
    #[test]
    fn gemm_equals_the_formula_on_the_rounded_x() {
        use crate::config::CompressionConfig;
        use crate::linear::row_view;
        use crate::tensor::QuantizedTensor;
        if !available() {
            return;
        }
        let mut xq = Int8X::new();
        let shapes = [
            (1, 7, 64, 64),
            (17, 13, 200, 64),
            (33, 100, 256, 32),
            (70, 29, 384, 128),
        ];
        for (&(m, n, cols, gs), bits) in shapes.iter().flat_map(|s| [(s, 4), (s, 8)]) {
            let cfg = CompressionConfig {
                num_bits: bits,
                group_size: gs,
                ..CompressionConfig::WEIGHT_4BIT
            };
            let centre = f64::from(code_center(bits));
            let w = QuantizedTensor::compress(&pattern(n * cols, 3), &[n, cols], cfg).unwrap();
            let rows = row_view(&w).unwrap();
            let wf = w.decompress();
            let x = pattern(m * cols, 5);
            let bias = pattern(n, 9);
            assert!(xq.requantize(&x, m, cols, gs, bits));
            for b in [None, Some(&bias[..])] {
                let mut got = vec![f32::NAN; m * n];
                // SAFETY: `available` was checked; the format is 4- or 8-bit with
                // gs % 32 == 0.
                unsafe { gemm(&rows, &xq, b, &mut got) };
                let groups = cols.div_ceil(gs);
                for i in 0..m {
                    for r in 0..n {
                        let mut want = b.map_or(0.0, |b| f64::from(b[r]));
                        let mut mag = want.abs();
                        for g in 0..groups {
                            let p = ((i / LANES) * groups + g) * PARAMS + i % LANES;
                            let s = f64::from(xq.params[p]);
                            let pr = &w.params()[r * 2 * groups + 2 * g..];
                            let (step, min) =
                                (f64::from(pr[0].to_f32()), f64::from(pr[1].to_f32()));
                            for l in g * gs..((g + 1) * gs).min(cols) {
                                let xv = f64::from(x[i * cols + l]);
                                let xh = f64::from(byte_at(&xq, i, g, l - g * gs)) * s;
                                // `min` multiplies the exact `x`; the rest the rounded one.
                                let term = f64::from(wf[r * cols + l]) * xh
                                    + (min + centre * step) * (xv - xh);
                                want += term;
                                mag += term.abs() + (f64::from(wf[r * cols + l]) * xv).abs();
                            }
                        }
                        let got = f64::from(got[i * n + r]);
                        assert!(
                            (got - want).abs() <= 1e-5 * mag.max(1.0),
                            "{bits}-bit m {m} n {n} cols {cols} gs {gs}: row {i} out {r}: \
                             {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_x_reconstructs_within_half_a_step_and_sums_match() {
        if !available() {
            return;
        }
        let mut xq = Int8X::new();
        // Larger first, then a ragged shape on the same buffers.
        let shapes = [(37, 256, 64), (5, 200, 64), (3, 96, 32), (17, 250, 128)];
        let cases = shapes.iter().flat_map(|s| [(s, 4), (s, 8)]).enumerate();
        for (n, (&(m, cols, gs), bits)) in cases {
            let x = pattern(m * cols, n);
            assert!(xq.requantize(&x, m, cols, gs, bits));
            let groups = cols.div_ceil(gs);
            for i in 0..m {
                for g in 0..groups {
                    let p = ((i / LANES) * groups + g) * PARAMS + i % LANES;
                    let (s, centre, sum) =
                        (xq.params[p], xq.params[p + LANES], xq.params[p + 2 * LANES]);
                    let vals: Vec<f32> = (g * gs..((g + 1) * gs).min(cols))
                        .map(|l| x[i * cols + l])
                        .collect();
                    let max = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
                    assert!((s - max / 127.0).abs() <= 1e-7 * max);
                    let mut residual = 0f32;
                    for (j, &v) in vals.iter().enumerate() {
                        let xh = f32::from(byte_at(&xq, i, g, j)) * s;
                        assert!((v - xh).abs() <= s * 0.5001, "row {i} group {g} value {j}");
                        residual += v - xh;
                    }
                    for j in vals.len()..gs {
                        assert_eq!(byte_at(&xq, i, g, j), 0, "padding of row {i}");
                    }
                    assert!((sum - vals.iter().sum::<f32>()).abs() <= 1e-4);
                    let c = code_center(bits);
                    assert!((centre - c * residual).abs() <= 1e-4 * c, "{bits}-bit");
                }
            }
            // Padding rows of the last vector are zero.
            for i in m..m.next_multiple_of(LANES) {
                for g in 0..groups {
                    assert!((0..gs).all(|j| byte_at(&xq, i, g, j) == 0));
                }
            }
        }
        let mut bad = pattern(2 * 64, 1);
        bad[70] = f32::INFINITY;
        assert!(!xq.requantize(&bad, 2, 64, 64, 4));
        assert!(!xq.requantize(&bad, 2, 64, 64, 8));
    }
}
