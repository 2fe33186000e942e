//! AVX-512 VNNI kernel for 4-bit rows at small `m`: `x` in 16-bit fixed point.
//!
//! The float kernel of [`super::avx512`] spends most of its instructions turning codes into
//! `f32` (widen, two table lookups, two FMAs per 32 weights). This one leaves the codes as
//! integers: each group of `gs` values of an `x` row is rounded to an integer `q` with
//! `|q| <= Q_MAX` and its own scale (`x̂ = q · s`, `s = max |x| / Q_MAX`), so that
//!
//! ```text
//! Σ_l W[r, l] · x[l] ≈ Σ_g  step_g · s_g · Σ_{l∈g} code_l · q_l  +  min_g · Σ_{l∈g} x[l]
//!                                + 8 · step_g · Σ_{l∈g} (x[l] − x̂[l])
//! ```
//!
//! where the inner sum is exact in `i32`, the `min` term uses the exact float sum of `x`, and
//! the last term makes the rounding of `x` act on `code − 8` (at most 8 in size) instead of
//! `code` (up to 15): the error is `step · Σ (code − 8) · (x̂ − x)`.
//! `q` is stored as two signed bytes, `q = 256 · h + l`, so that `vpdpbusd` (unsigned code
//! bytes times signed bytes, 64 products per instruction) multiplies a 64-byte load of codes,
//! 128 weights, without widening: `Σ code · q = 256 · Σ code · h + Σ code · l`.
//!
//! The only difference from dequantize-then-linear beyond float rounding is the rounding of
//! `x` to `x̂`: `|x - x̂| <= s / 2`, at most 2^-16 of the group's largest `|x|` (the bf16 path
//! rounds each activation to 2^-9 of itself). `error_bound` (tests) states the resulting bound
//! per output, and the tests hold every output to it.
//!
//! Layout of a quantized `x` row ([`FixedX`]): the codes of a row are read in chunks of 64
//! bytes; byte `o` of a row holds, with the split packing of [`crate::codec`], the codes of
//! values `g · gs + j` (low nibble) and `g · gs + gb + j` (high nibble), `g = o / gb`,
//! `j = o % gb`, `gb = gs / 2`. Chunk `c` of the quantized row is 256 bytes: the `h` and `l`
//! bytes of the values under the low nibbles of bytes `64c .. 64c + 64`, then those under
//! the high nibbles. A chunk's two 32-byte halves belong to one group each (gb is a multiple
//! of 32), so one `vpdpbusd` result holds two groups' sums in lanes 0-7 and 8-15.

use std::arch::x86_64::*;

use super::Rows;

/// Rows of `W` per tile.
const ROWS: usize = 4;
/// Groups whose parameters a tile converts at once.
const PARAM_RUN: usize = 8;
/// Largest `|q|`: `256 · 127 + 127`, so that both bytes of `q = 256 · h + l` fit in `i8`.
const Q_MAX: f32 = 32639.0;
/// Code bytes per chunk (one `vpdpbusd` operand).
const CHUNK: usize = 64;
/// Bytes of quantized `x` per chunk: `h` and `l` under the low nibbles, then under the high.
const X_CHUNK: usize = 4 * CHUNK;
/// The code the rounding of `x` is measured from (the middle of `0 ..= 15`).
const CODE_CENTER: f32 = 8.0;

/// Whether this CPU has AVX-512 VNNI (on top of the AVX-512 level).
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Whether the kernel handles `w`'s format: 4-bit codes in groups of a multiple of 64 (so a
/// chunk's halves lie in one group each).
pub(crate) fn supports(w: &Rows<'_>) -> bool {
    w.bits == 4 && w.gs.is_multiple_of(64)
}

/// `m` rows of `x` in 16-bit fixed point, laid out for the codes (see the module docs).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct FixedX {
    /// `m` rows of `chunks * X_CHUNK` bytes.
    parts: Vec<i8>,
    /// Per row and group: `[s_g, Σ x]`, `2 * groups` values per row, then zeros up to whole
    /// runs of PARAM_RUN groups.
    scales: Vec<f32>,
    /// Per row and group: `[8 · Σ (x − x̂), 0]`, laid out as `scales`.
    residuals: Vec<f32>,
    /// A row's last group zero-padded to `gs` values (when `gs` does not divide the row).
    tail: Vec<f32>,
    /// Bytes per row of `parts`.
    stride: usize,
    /// `f32` per row of `scales`.
    scale_stride: usize,
}

impl FixedX {
    /// An empty value whose buffers [`FixedX::requantize`] grows (no allocation here).
    pub(crate) const fn new() -> FixedX {
        FixedX {
            parts: Vec::new(),
            scales: Vec::new(),
            residuals: Vec::new(),
            tail: Vec::new(),
            stride: 0,
            scale_stride: 0,
        }
    }

    /// Rounds `m` rows of `cols` values (`x.len() >= m * cols`) in groups of `gs` (a multiple
    /// of 64); `None` when a value is not finite (the float kernel then propagates it).
    ///
    /// # Panics
    /// If `gs` is not a positive multiple of 64 or `x` is shorter than `m * cols`.
    #[cfg(test)]
    pub(crate) fn quantize(x: &[f32], m: usize, cols: usize, gs: usize) -> Option<FixedX> {
        let mut fx = FixedX::new();
        fx.requantize(x, m, cols, gs).then_some(fx)
    }

    /// Like [`FixedX::quantize`], into this value's buffers: once they have grown to a
    /// shape, later calls of that shape or smaller allocate nothing (the decode loop calls
    /// this for every layer and step). `false` when a value is not finite; the contents are
    /// then unspecified.
    ///
    /// # Panics
    /// As [`FixedX::quantize`].
    pub(crate) fn requantize(&mut self, x: &[f32], m: usize, cols: usize, gs: usize) -> bool {
        assert!(gs > 0 && gs.is_multiple_of(64) && x.len() >= m * cols);
        let groups = cols.div_ceil(gs);
        let chunks = (groups * gs / 2).div_ceil(CHUNK);
        self.stride = chunks * X_CHUNK;
        self.scale_stride = (2 * groups).next_multiple_of(2 * PARAM_RUN);
        let (stride, scale_stride) = (self.stride, self.scale_stride);
        // Cleared and refilled with zeros: the padding past the last group must read 0.
        for v in [&mut self.scales, &mut self.residuals] {
            v.clear();
            v.resize(m * scale_stride, 0.0);
        }
        self.parts.clear();
        self.parts.resize(m * stride, 0);
        let rem = cols % gs;
        for i in 0..m {
            let row = &x[i * cols..(i + 1) * cols];
            if rem != 0 {
                // The last, partial group, zero-padded to `gs` values.
                self.tail.clear();
                self.tail.extend_from_slice(&row[cols - rem..]);
                self.tail.resize(gs, 0.0);
            }
            let parts = &mut self.parts[i * stride..(i + 1) * stride];
            for g in 0..groups {
                let vals = if (g + 1) * gs <= cols {
                    &row[g * gs..(g + 1) * gs]
                } else {
                    &self.tail[..]
                };
                // SAFETY: `requantize` is only reached on CPUs that passed `available`; the
                // group's bytes lie inside the row (its chunks cover `groups * gs / 2`
                // code bytes).
                let Some((s, sum, residual)) = (unsafe { quantize_group(vals, g, parts) }) else {
                    return false;
                };
                self.scales[i * scale_stride + 2 * g] = s;
                self.scales[i * scale_stride + 2 * g + 1] = sum;
                self.residuals[i * scale_stride + 2 * g] = CODE_CENTER * residual;
            }
        }
        true
    }
}

/// The largest `|v|` and the sum of `vals` (a multiple of 16 values; checked), or `None` if a
/// value is not finite. Shared with the int8 kernel's rounding of `x`.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn abs_max_and_sum(vals: &[f32]) -> Option<(f32, f32)> {
    assert!(vals.len().is_multiple_of(16));
    let (mut max, mut sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut unordered: __mmask16 = 0;
    for chunk in vals.chunks_exact(16) {
        // SAFETY: 16 values.
        let x = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        max = _mm512_max_ps(max, _mm512_abs_ps(x));
        sum = _mm512_add_ps(sum, x);
        unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    }
    let (max, sum) = (_mm512_reduce_max_ps(max), _mm512_reduce_add_ps(sum));
    (unordered == 0 && max.is_finite()).then_some((max, sum))
}

/// `x · inv` rounded to the nearest integer (ties to even, the MXCSR default) and clamped to
/// `lo ..= hi` (the clamp keeps a product that rounds just past the range in it). Shared with
/// the int8 kernel.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn round_clamped(x: __m512, inv: __m512, lo: __m512i, hi: __m512i) -> __m512i {
    _mm512_min_epi32(
        _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x, inv)), lo),
        hi,
    )
}

/// Rounds group `g` of a row (`vals`, `gs` values, a multiple of 64) to `q = 256 · h + l`
/// (`|q| <= Q_MAX`) and writes `h` and `l` into the row's chunks (`parts`); returns
/// `(s, Σ vals, Σ (vals − q · s))`, or `None` if a value is not finite.
///
/// # Safety
/// The CPU must support AVX-512 F/BW; `parts` must hold the chunks of at least
/// `(g + 1) * gs / 2` code bytes (checked with a panic).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_group(vals: &[f32], g: usize, parts: &mut [i8]) -> Option<(f32, f32, f32)> {
    let (gs, gb) = (vals.len(), vals.len() / 2);
    assert!(parts.len() >= ((g + 1) * gb).div_ceil(CHUNK) * X_CHUNK);
    let v = vals.as_ptr();
    // SAFETY: AVX-512 F is this function's contract; `gs` is a multiple of 64.
    let (max, sum) = unsafe { abs_max_and_sum(vals) }?;
    let inv = _mm512_set1_ps(if max > 0.0 { Q_MAX / max } else { 0.0 });
    let s = max / Q_MAX;
    let mut residual = _mm512_setzero_ps();
    let (lo_q, hi_q) = (
        _mm512_set1_epi32(-(Q_MAX as i32)),
        _mm512_set1_epi32(Q_MAX as i32),
    );
    let p = parts.as_mut_ptr();
    for t in (0..gs).step_by(16) {
        // SAFETY: `t + 16 <= gs = vals.len()`.
        let x = unsafe { _mm512_loadu_ps(v.add(t)) };
        let q = round_clamped(x, inv, lo_q, hi_q);
        residual = _mm512_add_ps(
            residual,
            _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(s), x),
        );
        let h = _mm512_srai_epi32::<8>(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
        let l = _mm512_sub_epi32(q, _mm512_slli_epi32::<8>(h));
        // Value `j` of the first half sits under the low nibble of byte `g * gb + j`, value
        // `gb + j` under its high nibble; 16 values stay inside one 64-byte chunk.
        let (nibble, j) = (t / gb, t % gb);
        let o = g * gb + j;
        let at = o / CHUNK * X_CHUNK + nibble * 2 * CHUNK + o % CHUNK;
        // SAFETY: `at + CHUNK + 16 <= (o / CHUNK + 1) * X_CHUNK`, inside `parts` (asserted).
        unsafe {
            _mm_storeu_si128(p.add(at).cast(), _mm512_cvtepi32_epi8(h));
            _mm_storeu_si128(p.add(at + CHUNK).cast(), _mm512_cvtepi32_epi8(l));
        }
    }
    Some((s, sum, _mm512_reduce_add_ps(residual)))
}

/// The largest difference, for output row `r` and `x` row `i` (`out[r * m + i]`), between
/// this kernel and exact arithmetic on the dequantized weight that the rounding of `x` can
/// cause: `Σ_g |step_g| · Σ_{l∈g} |code_l − 8| · |x_l − x̂_l|`, at most
/// `Σ_g |step_g| · 8 · gs · s_g / 2`.
#[cfg(test)]
pub(crate) fn error_bound(w: &Rows<'_>, x: &[f32], m: usize) -> Vec<f32> {
    let fx = FixedX::quantize(x, m, w.cols, w.gs).expect("finite x");
    let mut out = vec![0f32; w.rows * m];
    for r in 0..w.rows {
        for i in 0..m {
            out[r * m + i] = (0..w.groups())
                .map(|g| {
                    let step = w.params[r * w.param_stride + 2 * g].to_f32().abs();
                    let s = fx.scales[i * fx.scale_stride + 2 * g];
                    step * CODE_CENTER * w.gs as f32 * s / 2.0
                })
                .sum();
        }
    }
    out
}

/// `out_t[r * m + i] = Σ_l W[r, l] · x̂[i, l]` (see the module docs) for `r < w.rows`,
/// `i < m`; `x` is `m` rows quantized for `w` ([`FixedX::quantize`] with `w.cols`, `w.gs`).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, VNNI and F16C ([`available`]); `w` must pass
/// [`supports`] and [`Rows::assert_in_bounds`]. The lengths of `out_t` and `x` are checked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn gemv(w: Rows<'_>, x: &FixedX, m: usize, out_t: &mut [f32]) {
    let chunks = (w.groups() * w.group_bytes()).div_ceil(CHUNK);
    assert!(
        out_t.len() >= w.rows * m
            && x.stride == chunks * X_CHUNK
            && x.parts.len() >= m * x.stride
            && x.scales.len() >= m * x.scale_stride
            && x.residuals.len() == x.scales.len()
            && x.scale_stride >= (2 * w.groups()).next_multiple_of(2 * PARAM_RUN)
            && supports(&w),
        "fixed-point gemv: x quantized for another shape"
    );
    let op = out_t.as_mut_ptr();
    let mut r = 0;
    while r < w.rows {
        let rr = if w.rows - r >= ROWS { ROWS } else { 1 };
        let mut i = 0;
        while i < m {
            let mm = (m - i).min(4);
            let (t, o) = (w.sub(r, rr), op.wrapping_add(r * m + i));
            // SAFETY: rows `r .. r + rr` and x rows `i .. i + mm` exist (checked above and
            // by the caller), and `out_t[(r + a) * m + i + b]` for `a < rr`, `b < mm` lies
            // inside `out_t`.
            unsafe {
                match (rr, mm) {
                    (ROWS, 4) => tile::<ROWS, 4>(&t, x, i, o, m),
                    (ROWS, 3) => tile::<ROWS, 3>(&t, x, i, o, m),
                    (ROWS, 2) => tile::<ROWS, 2>(&t, x, i, o, m),
                    (ROWS, _) => tile::<ROWS, 1>(&t, x, i, o, m),
                    (_, 4) => tile::<1, 4>(&t, x, i, o, m),
                    (_, 3) => tile::<1, 3>(&t, x, i, o, m),
                    (_, 2) => tile::<1, 2>(&t, x, i, o, m),
                    _ => tile::<1, 1>(&t, x, i, o, m),
                }
            }
            i += mm;
        }
        r += rr;
    }
}

/// An `R x M` tile: rows `0..R` of `w`, `x` rows `i0 .. i0 + M`, `out[r * m + i]`.
///
/// # Safety
/// As [`gemv`], with `R <= w.rows`, `i0 + M <= m` and `out[r * m + i]` writable for
/// `r < R`, `i < M`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize, const M: usize>(
    w: &Rows<'_>,
    x: &FixedX,
    i0: usize,
    out: *mut f32,
    m: usize,
) {
    let (gb, groups) = (w.group_bytes(), w.groups());
    let row_bytes = groups * gb;
    let chunks = row_bytes.div_ceil(CHUNK);
    let (wc, wp) = (w.codes.as_ptr(), w.params.as_ptr());
    let xq = x.parts.as_ptr().wrapping_add(i0 * x.stride);
    let xs = x.scales.as_ptr().wrapping_add(i0 * x.scale_stride);
    let xr = x.residuals.as_ptr().wrapping_add(i0 * x.scale_stride);
    let nibble = _mm512_set1_epi8(0x0F);
    // Lanes of `acc` sum `step · s · Σ code · q` of every chunk, and once per run of groups
    // `min · Σ x` (odd lanes) and `step · 8 · Σ (x − x̂)` (even lanes); the output is the sum
    // of all lanes.
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    // `[step_g · s_g, min_g · Σ x, ..]` of the current run of PARAM_RUN groups.
    let mut run = [[_mm512_setzero_ps(); M]; R];
    let mut run_start = usize::MAX;
    // Group of the next 32-byte half chunk, counted (no division in the loop): a group is
    // `gb / 32` halves.
    let halves_per_group = gb / (CHUNK / 2);
    let (mut next_group, mut half_in_group) = (0, 0);
    let mut next_half = || {
        let g = next_group;
        half_in_group += 1;
        if half_in_group == halves_per_group {
            (next_group, half_in_group) = (next_group + 1, 0);
        }
        g
    };
    for c in 0..chunks {
        let o = c * CHUNK;
        let (group_a, group_b) = (next_half(), next_half());
        let first = group_a / PARAM_RUN * PARAM_RUN;
        if first != run_start {
            run_start = first;
            let count = (groups - first).min(PARAM_RUN);
            let mask: __mmask16 = if count >= PARAM_RUN {
                !0
            } else {
                (1u16 << (2 * count)) - 1
            };
            for r in 0..R {
                // SAFETY: the masked lanes read the `2 * count` halves of groups
                // `first .. first + count` of row r (in bounds by the caller's contract).
                let p = unsafe {
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        mask,
                        wp.add(r * w.param_stride + 2 * first).cast(),
                    ))
                };
                for i in 0..M {
                    // SAFETY: `scales` and `residuals` rows are padded to whole runs of PARAM_RUN
                    // groups.
                    let (sc, res) = unsafe {
                        let at = i * x.scale_stride + 2 * first;
                        (_mm512_loadu_ps(xs.add(at)), _mm512_loadu_ps(xr.add(at)))
                    };
                    let v = _mm512_maskz_mul_ps(mask, p, sc);
                    // Odd lanes: min · Σ x; even lanes of `res`: step · 8 · Σ (x − x̂).
                    let centre = _mm512_maskz_mul_ps(mask & 0x5555, p, res);
                    acc[r][i] =
                        _mm512_add_ps(_mm512_mask_add_ps(acc[r][i], 0xAAAA, acc[r][i], v), centre);
                    run[r][i] = v;
                }
            }
        }
        // Lanes 0-7 take the first half's group scale, lanes 8-15 the second half's (a
        // second half past the row's end has zero codes, so its scale does not matter).
        let idx = _mm512_mask_blend_epi32(
            0xFF00,
            _mm512_set1_epi32((2 * (group_a - first)) as i32),
            _mm512_set1_epi32(
                (2 * (group_b.min(groups - 1) - first).min(2 * PARAM_RUN - 1)) as i32,
            ),
        );
        // The last chunk of a row may be half a chunk: zero the bytes past the row's end.
        let load_mask: __mmask64 = if o + CHUNK <= row_bytes {
            !0
        } else {
            (1u64 << (row_bytes - o)) - 1
        };
        for r in R..2 * R {
            _mm_prefetch::<_MM_HINT_T0>(wc.wrapping_add(r * w.code_stride + o).cast());
        }
        let mut lo = [_mm512_setzero_si512(); R];
        let mut hi = [_mm512_setzero_si512(); R];
        for r in 0..R {
            // SAFETY: the unmasked bytes `o .. min(o + 64, row_bytes)` lie in row r.
            let v =
                unsafe { _mm512_maskz_loadu_epi8(load_mask, wc.add(r * w.code_stride + o).cast()) };
            lo[r] = _mm512_and_si512(v, nibble);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
        }
        for i in 0..M {
            // SAFETY: chunk `c` of x row `i0 + i` holds X_CHUNK bytes.
            let (lh, ll, hh, hl) = unsafe {
                let p = xq.add(i * x.stride + c * X_CHUNK);
                (
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(CHUNK).cast()),
                    _mm512_loadu_si512(p.add(2 * CHUNK).cast()),
                    _mm512_loadu_si512(p.add(3 * CHUNK).cast()),
                )
            };
            for r in 0..R {
                let zero = _mm512_setzero_si512();
                let h = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[r], lh), hi[r], hh);
                let l = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[r], ll), hi[r], hl);
                let sum = _mm512_add_epi32(_mm512_slli_epi32::<8>(h), l);
                let scale = _mm512_permutexvar_ps(idx, run[r][i]);
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r][i]);
            }
        }
    }
    for r in 0..R {
        for i in 0..M {
            // SAFETY: `r < R`, `i < M`: covered by the caller's contract.
            unsafe { *out.add(r * m + i) = _mm512_reduce_add_ps(acc[r][i]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 + seed * 101) % 211) as f32 * 0.013 - 1.3)
            .collect()
    }

    /// The value a reused `FixedX` holds after `requantize`, minus the scratch tail.
    fn rounded(fx: &FixedX) -> FixedX {
        FixedX {
            tail: Vec::new(),
            ..fx.clone()
        }
    }

    #[test]
    fn requantize_after_other_shapes_equals_a_fresh_quantize() {
        if !available() {
            return;
        }
        let mut reused = FixedX::new();
        // Larger first (buffers hold stale values), then smaller with a ragged tail, then a
        // failure on a non-finite value, then the first shape again.
        let shapes = [(5, 640, 128), (2, 200, 64), (3, 256, 64), (5, 640, 128)];
        for (n, &(m, cols, gs)) in shapes.iter().enumerate() {
            let x = pattern(m * cols, n);
            assert!(reused.requantize(&x, m, cols, gs));
            let fresh = FixedX::quantize(&x, m, cols, gs).expect("finite x");
            assert_eq!(
                rounded(&reused),
                rounded(&fresh),
                "shape {m} x {cols}, gs {gs}"
            );
            let mut bad = x.clone();
            bad[cols + 3] = f32::NAN;
            if m > 1 {
                assert!(!reused.requantize(&bad, m, cols, gs));
                assert!(FixedX::quantize(&bad, m, cols, gs).is_none());
            }
        }
    }
}
