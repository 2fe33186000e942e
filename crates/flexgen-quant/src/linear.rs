//! `y = x · Wᵀ + b` with a packed weight, computed from the codes.
//!
//! - Fused path (`m <= FUSED_MAX_M`, `group_dim = 1`, 4-bit groups of a multiple of 32 or
//!   8-bit groups of a multiple of 16): the SIMD kernels of [`crate::simd`] read each row's
//!   codes once per block of `x` rows and never materialise the dequantized matrix; rayon splits
//!   the output rows.
//! - Fixed-point path (AVX-512 VNNI, `m < BLOCKS_MIN_M`, 4-bit groups of a multiple of 64
//!   along the rows): like the fused path, but each group of `x` is rounded to `i16` with its
//!   own scale and the codes are multiplied as integers (`vpdpbusd` on the two bytes of each
//!   16-bit value); differs from dequantize-then-linear by at most the effect of that rounding
//!   (2^-16 of the group's largest `|x|` per value; see `simd::avx512_fixed`). About 1.5x the
//!   fused path at `m = 1`.
//! - Block path (AVX-512, `m >= BLOCKS_MIN_M`, `group_dim = 1`, groups that divide
//!   [`ROW_BLOCK_COLS`]): flexgen-core's packed-panel GEMM asks for one block of `f32`
//!   weights at a time ([`RowBlocks`]: 256 outputs x 256 inputs, in L2), which the SIMD
//!   dequantizer writes straight from the codes; each weight is decoded once per call.
//! - Int8 path (AVX-512 VNNI, `m >= BLOCKS_MIN_M`, 4-bit or 8-bit groups of a multiple of 32
//!   along the rows; opt-in, see [`int8_activations_enabled`]): each group of `x` is rounded to
//!   bytes with its own scale and `vpdpbusd` multiplies them with the packed codes, 16 rows of
//!   `x` per vector; no weight is decoded. About twice the block path's speed; its error (1/254
//!   of a group's largest `|x|` per value, times `|code − c| · step`, `c` the middle code) is a
//!   small part of what the weights' own rounding already causes (see `simd::avx512_int8`).
//!   Each group's integer sums are scaled into `f32` once, so larger groups (8-bit codes in
//!   groups of 256) run faster than FlexGen's 64.
//! - Panel path (other levels or layouts, larger `m`): panels of rows are dequantized into an
//!   `f32` buffer (tens of MiB, never the whole matrix) and multiplied with flexgen-core's
//!   `linear`, FlexGen's "decompress then compute" per panel.

use std::cell::RefCell;
use std::thread::LocalKey;

use flexgen_core::kernels::{self, row_blocks_supported, RowBlocks, ROW_BLOCK_COLS};
use flexgen_core::{simd_level, EnvSwitch, Matrix, SimdLevel, Storage};
use rayon::prelude::*;

use crate::codec;
use crate::error::{check_len, checked_product, Error, Result};
use crate::simd::{dispatch, ensure_available, QKern, Rows};
use crate::tensor::QuantizedTensor;

const OP: &str = "linear_packed";

/// Largest `m` (rows of `x`) served by the fused kernels where the block path is not
/// available; above it, dequantized panels + flexgen-core's `linear`.
pub const FUSED_MAX_M: usize = 64;

/// Smallest `m` served by the block path (where available): from here the GEMM on decoded
/// blocks beats the fused kernels (measured crossover 20-28 rows on OPT-1.3B/6.7B shapes).
pub const BLOCKS_MIN_M: usize = 24;

/// Weight values dequantized per panel on the panel path (32 MiB of `f32`, kept per thread).
const PANEL_ELEMS: usize = 1 << 23;

/// Fewest rows of W per panel (more when `PANEL_ELEMS / k` allows).
const MIN_PANEL_ROWS: usize = 512;

/// Which algorithm [`linear_packed_path`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedPath {
    /// SIMD kernels reading the codes directly (falls back to the panel path for layouts
    /// without a fused kernel).
    Fused,
    /// Dequantize panels of rows to `f32`, then flexgen-core's `linear`.
    Panels,
    /// The fused kernel with `x` rounded to 16-bit fixed point per group and integer
    /// products (AVX-512 VNNI); falls back to [`PackedPath::Fused`] where
    /// [`fixed_point_supported`] is false or `x` holds a value that is not finite.
    FixedPoint,
    /// flexgen-core's packed-panel GEMM on blocks decoded on demand (falls back to the panel
    /// path where [`blocks_supported`] is false).
    Blocks,
    /// `x` rounded to 8 bits per group and byte products straight from the 4-bit or 8-bit
    /// codes (AVX-512 VNNI); falls back to [`PackedPath::Blocks`] (or the panel path) where
    /// [`int8_supported`] is false or `x` holds a value that is not finite. See
    /// [`int8_activations_enabled`].
    Int8,
}

/// Whether [`PackedPath::Blocks`] runs for `w` at `level`: AVX-512, rows grouped along their
/// columns (`group_dim = 1`), groups that divide [`ROW_BLOCK_COLS`].
pub fn blocks_supported(level: SimdLevel, w: &QuantizedTensor) -> bool {
    level == SimdLevel::Avx512
        && row_blocks_supported()
        && row_view(w).is_some_and(|r| ROW_BLOCK_COLS.is_multiple_of(r.gs))
}

/// Whether [`PackedPath::FixedPoint`] runs for `w` at `level`: AVX-512 with VNNI, 4-bit codes
/// grouped along the rows in groups of a multiple of 64.
pub fn fixed_point_supported(level: SimdLevel, w: &QuantizedTensor) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == SimdLevel::Avx512
            && crate::simd::avx512_fixed::available()
            && row_view(w).is_some_and(|r| crate::simd::avx512_fixed::supports(&r))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, w);
        false
    }
}

/// Whether [`PackedPath::Int8`] runs for `w` at `level`: AVX-512 with VNNI, 4-bit or 8-bit
/// codes grouped along the rows in groups of a multiple of 32.
pub fn int8_supported(level: SimdLevel, w: &QuantizedTensor) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == SimdLevel::Avx512
            && crate::simd::avx512_int8::available()
            && row_view(w).is_some_and(|r| crate::simd::avx512_int8::supports(&r))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, w);
        false
    }
}

/// Process-wide choice of [`int8_activations_enabled`].
static INT8_ACTIVATIONS: EnvSwitch = EnvSwitch::new("FLEXGEN_INT8_ACTIVATIONS", false);

/// Whether [`linear_packed`] runs [`PackedPath::Int8`] (where supported) from
/// [`BLOCKS_MIN_M`] rows. Off by default; on when the environment variable
/// `FLEXGEN_INT8_ACTIVATIONS` is `1`, `on`, `true` or `yes` at the first call, or after
/// [`set_int8_activations`]`(true)`.
///
/// On, each group of an `x` row is rounded to 8 bits with its own scale: an error of at most
/// `|step| · c · |x − x̂|` per weight with `|x − x̂| <= ` 1/254 of the group's largest `|x|`
/// and `c` the middle code (8 for 4-bit weights, 128 for 8-bit ones; the weights' own
/// rounding is up to `step / 2` per weight). About twice the multiply-add rate of the `f32`
/// block path on CPUs with AVX-512 VNNI.
pub fn int8_activations_enabled() -> bool {
    INT8_ACTIVATIONS.get()
}

/// Turns the choice of [`PackedPath::Int8`] by [`linear_packed`] on or off for the whole
/// process (overrides `FLEXGEN_INT8_ACTIVATIONS`).
pub fn set_int8_activations(on: bool) {
    INT8_ACTIVATIONS.set(on);
}

/// Process-wide choice of [`fixed_point_enabled`].
static FIXED_POINT: EnvSwitch = EnvSwitch::new("FLEXGEN_FIXED_POINT", true);

/// Whether [`linear_packed`] may choose [`PackedPath::FixedPoint`] (where supported). On by
/// default; off when the environment variable `FLEXGEN_FIXED_POINT` is `0`, `off`, `false` or `no`
/// at the first call, or after [`set_fixed_point_enabled`]`(false)`. Off, every `m` below
/// [`BLOCKS_MIN_M`] runs the float kernels, equal to dequantize-then-linear up to float
/// rounding.
pub fn fixed_point_enabled() -> bool {
    FIXED_POINT.get()
}

/// Turns the choice of [`PackedPath::FixedPoint`] by [`linear_packed`] on or off for the
/// whole process (overrides `FLEXGEN_FIXED_POINT`).
pub fn set_fixed_point_enabled(on: bool) {
    FIXED_POINT.set(on);
}

/// `out[m, n] = x[m, k] · Wᵀ + bias` for a packed `(n, k)` weight `w` (rank 2).
///
/// Equal to dequantizing `w` and running a dense linear layer, up to float summation order
/// and, below [`BLOCKS_MIN_M`] rows on CPUs with AVX-512 VNNI, the rounding of `x` to 16-bit
/// fixed point per group ([`PackedPath::FixedPoint`]; see [`fixed_point_enabled`] to turn it
/// off).
/// Errors: [`Error::ShapeMismatch`] when a length disagrees or `w` is not rank 2.
///
/// ```
/// use flexgen_quant::{linear_packed, CompressionConfig, QuantizedTensor};
///
/// let w: Vec<f32> = (0..8 * 64).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
/// let q = QuantizedTensor::compress(&w, &[8, 64], CompressionConfig::WEIGHT_4BIT)?;
/// let x = vec![0.5f32; 64];
/// let mut y = vec![0.0; 8];
/// linear_packed(&x, 1, &q, None, &mut y)?;
/// let dense = q.decompress();
/// let want: f32 = dense[..64].iter().map(|v| v * 0.5).sum();
/// assert!((y[0] - want).abs() < 1e-4);
/// # Ok::<(), flexgen_quant::Error>(())
/// ```
pub fn linear_packed(
    x: &[f32],
    m: usize,
    w: &QuantizedTensor,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    linear_packed_with_level(simd_level(), x, m, w, bias, out)
}

/// [`linear_packed`] at an explicit SIMD level (an error if the CPU lacks it).
pub fn linear_packed_with_level(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    w: &QuantizedTensor,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let path = if m >= BLOCKS_MIN_M && int8_activations_enabled() && int8_supported(level, w) {
        PackedPath::Int8
    } else if blocks_supported(level, w) {
        if m >= BLOCKS_MIN_M {
            PackedPath::Blocks
        } else if fixed_point_enabled() && fixed_point_supported(level, w) {
            PackedPath::FixedPoint
        } else {
            PackedPath::Fused
        }
    } else if m <= FUSED_MAX_M {
        PackedPath::Fused
    } else {
        PackedPath::Panels
    };
    linear_packed_path(level, path, x, m, w, bias, out)
}

/// [`linear_packed`] with an explicit level and algorithm (benchmarks and tests).
pub fn linear_packed_path(
    level: SimdLevel,
    path: PackedPath,
    x: &[f32],
    m: usize,
    w: &QuantizedTensor,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    ensure_available(OP, level)?;
    let (n, k) = check_args(x, m, w, bias, out)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return Ok(());
    }
    let rows = row_view(w);
    match rows {
        Some(r) if path == PackedPath::Int8 && int8_supported(level, w) => {
            if !int8(r, x, m, bias, out) {
                let fallback = PackedPath::Blocks;
                return linear_packed_path(level, fallback, x, m, w, bias, out);
            }
        }
        Some(r) if path == PackedPath::FixedPoint && fixed_point_supported(level, w) => {
            fixed_point(level, r, x, m, bias, out)
        }
        Some(r) if matches!(path, PackedPath::Fused | PackedPath::FixedPoint) && r.fused() => {
            fused(level, r, x, m, bias, out)
        }
        Some(rows) if path == PackedPath::Blocks && blocks_supported(level, w) => {
            kernels::linear_row_blocks(x, m, &DecodedBlocks { rows, level }, bias, out)?;
        }
        _ => panels(level, w, x, m, bias, out)?,
    }
    Ok(())
}

/// Validates shapes; returns `(n, k)`.
fn check_args(
    x: &[f32],
    m: usize,
    w: &QuantizedTensor,
    bias: Option<&[f32]>,
    out: &[f32],
) -> Result<(usize, usize)> {
    let &[n, k] = w.shape() else {
        return Err(Error::shape(
            OP,
            "a rank-2 (out_features, in_features) weight",
            format!("shape {:?}", w.shape()),
        ));
    };
    check_len(
        OP,
        "x (m * in_features)",
        x.len(),
        checked_product(OP, &[m, k])?,
    )?;
    check_len(
        OP,
        "out (m * out_features)",
        out.len(),
        checked_product(OP, &[m, n])?,
    )?;
    if let Some(b) = bias {
        check_len(OP, "bias (out_features)", b.len(), n)?;
    }
    Ok((n, k))
}

/// The rows of a rank-2 tensor grouped along its columns (`group_dim = 1`), else `None`.
pub(crate) fn row_view(w: &QuantizedTensor) -> Option<Rows<'_>> {
    let &[n, k] = w.shape() else { return None };
    let c = w.config();
    if c.group_dim != 1 {
        return None;
    }
    let gpl = w.groups_per_line();
    Some(Rows {
        codes: w.codes(),
        params: w.params(),
        rows: n,
        cols: k,
        code_stride: gpl * c.group_bytes(),
        param_stride: 2 * gpl,
        bits: c.num_bits,
        gs: c.group_size,
    })
}

/// Fixed-point path: shapes valid, `m, n, k > 0`, `fixed_point_supported` (so never reached
/// off x86-64, where it is the fused path).
fn fixed_point(
    level: SimdLevel,
    w: Rows<'_>,
    x: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    #[cfg(not(target_arch = "x86_64"))]
    return fused(level, w, x, m, bias, out);
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::avx512_fixed::{gemv, FixedX};
        // This thread's rounded `x`, reused across calls (a fresh one if it is in use, as
        // when rayon runs another layer's call on this thread inside the parallel loop).
        with_reused(&FIXED_X, |xq: &mut FixedX| {
            if !xq.requantize(x, m, w.cols, w.gs) {
                return fused(level, w, x, m, bias, out);
            }
            let xq = &*xq;
            w.assert_in_bounds();
            with_transposed_out(m, w.rows, out, |out_t| {
                kernels::par_output_rows(out_t, w.cols, m, bias, |r0, ot| {
                    // SAFETY: `fixed_point_supported` checked AVX-512 + VNNI and the format;
                    // the rows lie inside the slices (asserted above).
                    unsafe { gemv(w.sub(r0, ot.len() / m), xq, m, ot) };
                });
            });
        })
    }
}

/// Int8 path: shapes valid, `m, n, k > 0`, `int8_supported` (so never reached off x86-64).
/// `false` (nothing written) when `x` holds a value that is not finite.
fn int8(w: Rows<'_>, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) -> bool {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x, m, bias, out);
        false
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::avx512_int8::{gemm, Int8X};
        // This thread's rounded `x`, reused across calls.
        with_reused(&INT8_X, |xq: &mut Int8X| {
            if !xq.requantize(x, m, w.cols, w.gs, w.bits) {
                return false;
            }
            // SAFETY: `int8_supported` checked AVX-512 + VNNI and the format.
            unsafe { gemm(&w, xq, bias, out) };
            true
        })
    }
}

/// Runs `run` on the transposed output (`n x m`) and writes it into `out` (`m x n`); for
/// `m == 1` both layouts are the same and `run` writes `out` directly, else it writes this
/// thread's reused scratch.
fn with_transposed_out(m: usize, n: usize, out: &mut [f32], run: impl FnOnce(&mut [f32])) {
    if m == 1 {
        run(out);
        return;
    }
    with_scratch(m * n, |tmp| {
        run(tmp);
        for (j, col) in tmp.chunks_exact(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * n + j] = v;
            }
        }
    });
}

/// Fused path: shapes valid, `m, n, k > 0`.
fn fused(
    level: SimdLevel,
    w: Rows<'_>,
    x: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, k) = (w.rows, w.cols);
    // The kernels write out transposed (`n x m`) so each task owns a contiguous block
    // (every element is written by the kernel).
    with_transposed_out(m, n, out, |out_t| {
        kernels::par_output_rows(out_t, k, m, bias, |r0, ot| {
            let rows = ot.len() / m;
            // SAFETY: `level` was checked with `ensure_available`.
            dispatch!(level, K => unsafe { K::gemv(w.sub(r0, rows), x, m, ot) });
        });
    });
}

/// Dequantizes rows `r0 .. r0 + out.len() / k` of a rank-2 `w` into `out` (row-major), in
/// parallel, for any `group_dim`.
pub(crate) fn dequant_rows(level: SimdLevel, w: &QuantizedTensor, r0: usize, out: &mut [f32]) {
    let k = w.shape()[1];
    if k == 0 {
        return;
    }
    let per = ((1 << 15) / k).max(1) * k;
    if let Some(rows) = row_view(w) {
        out.par_chunks_mut(per).enumerate().for_each(|(c, o)| {
            let first = r0 + c * (per / k);
            // SAFETY: `level` was checked with `ensure_available` by every caller.
            dispatch!(level, K => unsafe { K::dequant(rows.sub(first, o.len() / k), o) });
        });
        return;
    }
    // group_dim == 0: lines are columns; decode the groups that cover the requested rows.
    let c = *w.config();
    let (gs, gb, gpl) = (c.group_size, c.group_bytes(), w.groups_per_line());
    let n_rows = out.len() / k;
    let mut buf = vec![0f32; gs];
    for j in 0..k {
        let mut r = r0;
        while r < r0 + n_rows {
            let g = r / gs;
            let gi = j * gpl + g;
            let len = gs.min(w.shape()[0] - g * gs);
            codec::decode_group(
                &w.codes()[gi * gb..(gi + 1) * gb],
                c.num_bits,
                w.group_params(gi),
                &mut buf[..len],
            );
            let end = ((g + 1) * gs).min(r0 + n_rows);
            for rr in r..end {
                out[(rr - r0) * k + j] = buf[rr - g * gs];
            }
            r = end;
        }
    }
}

/// A row-grouped packed weight as flexgen-core's [`RowBlocks`]: each block is dequantized
/// from the codes by the SIMD decoder of `level`.
struct DecodedBlocks<'a> {
    rows: Rows<'a>,
    level: SimdLevel,
}

impl DecodedBlocks<'_> {
    /// Rows `r0 .. r0 + rows`, columns `c0 .. c0 + cols` (`c0` a multiple of `gs`, which
    /// `blocks_supported` guarantees for multiples of ROW_BLOCK_COLS).
    fn block(&self, r0: usize, rows: usize, c0: usize, cols: usize) -> Rows<'_> {
        let w = self.rows;
        debug_assert_eq!(c0 % w.gs, 0);
        let g0 = c0 / w.gs;
        Rows {
            codes: &w.codes[r0 * w.code_stride + g0 * w.group_bytes()..],
            params: &w.params[r0 * w.param_stride + 2 * g0..],
            rows,
            cols,
            ..w
        }
    }
}

impl RowBlocks for DecodedBlocks<'_> {
    fn rows(&self) -> usize {
        self.rows.rows
    }

    fn cols(&self) -> usize {
        self.rows.cols
    }

    fn write_block(&self, r0: usize, rows: usize, c0: usize, cols: usize, dst: &mut [f32]) {
        let block = self.block(r0, rows, c0, cols);
        // SAFETY: `level` was checked with `ensure_available` by `linear_packed_path`; the
        // kernel checks that the block's rows lie inside the slices.
        dispatch!(self.level, K => unsafe { K::dequant(block, dst) });
    }

    fn write_panels(
        &self,
        r0: usize,
        rows: usize,
        c0: usize,
        cols: usize,
        dst: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.level == SimdLevel::Avx512 {
            let block = self.block(r0, rows, c0, cols);
            // SAFETY: the level was checked with `ensure_available` by `linear_packed_path`.
            return unsafe { crate::simd::avx512::write_panels(block, dst) };
        }
        let _ = (r0, rows, c0, cols, dst);
        false
    }
}

/// Panel path: shapes valid, `m, n, k > 0`.
fn panels(
    level: SimdLevel,
    w: &QuantizedTensor,
    x: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    // At least MIN_PANEL_ROWS rows: every panel re-packs x in the GEMM, a cost of 1/p of its
    // work.
    let panel_rows = (PANEL_ELEMS / k).max(MIN_PANEL_ROWS).min(n);
    // A panel of W dequantized to f32 goes through flexgen-core's own linear (its packed-panel
    // GEMM), into `tmp` (`m x p`), then into columns `j0..j0 + p` of `out`. The panel buffer
    // is this thread's, kept across calls: a fresh one of tens of MiB per call costs its page
    // faults every time.
    let mut tmp = vec![0.0f32; m * panel_rows];
    with_reused(&PANEL, |panel: &mut Vec<f32>| -> Result<()> {
        let mut j0 = 0;
        while j0 < n {
            let p = panel_rows.min(n - j0);
            panel.resize(p * k, 0.0);
            dequant_rows(level, w, j0, panel);
            let mat = Matrix::from_f32(p, k, std::mem::take(panel))?;
            let b = bias.map(|b| &b[j0..j0 + p]);
            let result = kernels::linear_with_level(level, x, m, &mat, b, &mut tmp[..m * p]);
            if let Storage::F32(v) = mat.into_storage() {
                *panel = v;
            }
            result?;
            for (dst, src) in out.chunks_exact_mut(n).zip(tmp.chunks_exact(p)) {
                dst[j0..j0 + p].copy_from_slice(src);
            }
            j0 += p;
        }
        Ok(())
    })
}

thread_local! {
    /// Per-thread scratch of the fused kernels, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread dequantized panel of W for the panel path, reused across calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread `x` rounded to fixed point for the fixed-point path, reused across calls.
    #[cfg(target_arch = "x86_64")]
    static FIXED_X: RefCell<crate::simd::avx512_fixed::FixedX> =
        const { RefCell::new(crate::simd::avx512_fixed::FixedX::new()) };
    /// Per-thread `x` rounded to bytes for the int8 path, reused across calls.
    #[cfg(target_arch = "x86_64")]
    static INT8_X: RefCell<crate::simd::avx512_int8::Int8X> =
        const { RefCell::new(crate::simd::avx512_int8::Int8X::new()) };
}

/// Runs `f` on this thread's value in `key`, kept across calls, or on a fresh default value
/// when it is in use (as when rayon runs another layer's call on this thread inside a
/// parallel loop).
fn with_reused<T: Default + 'static, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut T::default()),
    })
}

/// Runs `f` with a scratch slice of `len` floats (fresh if this thread's is in use).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_reused(&SCRATCH, |v: &mut Vec<f32>| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// Scalar reference for [`linear_packed`]: dequantize the whole weight with the reference
/// decoder, then accumulate in `f64`. Same arguments and errors.
pub fn linear_packed_ref(
    x: &[f32],
    m: usize,
    w: &QuantizedTensor,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = check_args(x, m, w, bias, out)?;
    let wf = w.decompress();
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| f64::from(b[j]));
            for l in 0..k {
                s += f64::from(x[i * k + l]) * f64::from(wf[j * k + l]);
            }
            out[i * n + j] = s as f32;
        }
    }
    Ok(())
}

/// Gathers rows `ids` of a packed `(vocab, dim)` table (an embedding) into `out`
/// (`ids.len() * dim`), dequantized.
///
/// Errors: [`Error::ShapeMismatch`] for a wrong `out` length or a tensor that is not rank 2,
/// [`Error::InvalidArgument`] for an id `>= vocab`.
pub fn embedding_packed(w: &QuantizedTensor, ids: &[u32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "embedding_packed";
    let &[vocab, dim] = w.shape() else {
        return Err(Error::shape(
            OP,
            "a rank-2 (vocab, dim) table",
            format!("shape {:?}", w.shape()),
        ));
    };
    check_len(
        OP,
        "out (ids * dim)",
        out.len(),
        checked_product(OP, &[ids.len(), dim])?,
    )?;
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::invalid(
            OP,
            format!("id {id} at index {i} is not below the table's {vocab} rows"),
        ));
    }
    if dim == 0 {
        return Ok(());
    }
    let level = simd_level();
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim)) {
        dequant_rows(level, w, id as usize, row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionConfig;
    use flexgen_core::simd::available_levels;
    use proptest::prelude::*;

    /// Σ |x| |w| per output: bounds the summation rounding.
    fn magnitudes(x: &[f32], m: usize, w: &QuantizedTensor, bias: Option<&[f32]>) -> Vec<f32> {
        let (n, k) = (w.shape()[0], w.shape()[1]);
        let wf = w.decompress();
        let mut s = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                s[i * n + j] = bias.map_or(0.0, |b| b[j].abs())
                    + (0..k)
                        .map(|l| (x[i * k + l] * wf[j * k + l]).abs())
                        .sum::<f32>();
            }
        }
        s
    }

    fn check_all(x: &[f32], m: usize, w: &QuantizedTensor, bias: Option<&[f32]>) {
        let n = w.shape()[0];
        let mut want = vec![0.0; m * n];
        linear_packed_ref(x, m, w, bias, &mut want).unwrap();
        let scale = magnitudes(x, m, w, bias);
        let mut got = vec![f32::NAN; m * n];
        linear_packed(x, m, w, bias, &mut got).unwrap();
        let fixed_default =
            m < BLOCKS_MIN_M && fixed_point_enabled() && fixed_point_supported(simd_level(), w);
        let int8_default =
            m >= BLOCKS_MIN_M && int8_activations_enabled() && int8_supported(simd_level(), w);
        let bound = if fixed_default {
            Some(fixed_point_bound(x, m, w))
        } else if int8_default {
            Some(int8_bound(x, m, w))
        } else {
            None
        };
        assert_within(&got, &want, &scale, bound.as_deref(), "default");
        for level in available_levels() {
            for path in [
                PackedPath::Fused,
                PackedPath::Panels,
                PackedPath::Blocks,
                PackedPath::FixedPoint,
                PackedPath::Int8,
            ] {
                let mut got = vec![f32::NAN; m * n];
                linear_packed_path(level, path, x, m, w, bias, &mut got).unwrap();
                let what = format!("{level} {path:?} {}", w.config());
                let bound = match path {
                    PackedPath::FixedPoint if fixed_point_supported(level, w) => {
                        Some(fixed_point_bound(x, m, w))
                    }
                    PackedPath::Int8 if int8_supported(level, w) => Some(int8_bound(x, m, w)),
                    _ => None,
                };
                assert_within(&got, &want, &scale, bound.as_deref(), &what);
            }
        }
    }

    /// `|got - want| <= tol` with `tol` from the magnitudes summed (float rounding), widened per
    /// output by `bound` (row-major, `m x n`) where given.
    fn assert_within(got: &[f32], want: &[f32], scale: &[f32], bound: Option<&[f32]>, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, ((&a, &b), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let tol = 1e-5 * s.max(1.0) + bound.map_or(0.0, |t| t[i]);
            assert!(
                (a - b).abs() <= tol,
                "{what}: index {i}: got {a}, want {b} (tol {tol})"
            );
        }
    }

    /// The most the fixed-point kernel's rounding of `x` can move each output (`m x n`).
    #[cfg(target_arch = "x86_64")]
    fn fixed_point_bound(x: &[f32], m: usize, w: &QuantizedTensor) -> Vec<f32> {
        let n = w.shape()[0];
        let bound_t = crate::simd::avx512_fixed::error_bound(&row_view(w).unwrap(), x, m);
        (0..m * n).map(|p| bound_t[(p % n) * m + p / n]).collect()
    }

    /// The most the int8 kernel's rounding of `x` can move each output (`m x n`).
    #[cfg(target_arch = "x86_64")]
    fn int8_bound(x: &[f32], m: usize, w: &QuantizedTensor) -> Vec<f32> {
        crate::simd::avx512_int8::error_bound(&row_view(w).unwrap(), x, m)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn fixed_point_bound(_: &[f32], _: usize, _: &QuantizedTensor) -> Vec<f32> {
        unreachable!("no fixed-point kernel on this architecture")
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn int8_bound(_: &[f32], _: usize, _: &QuantizedTensor) -> Vec<f32> {
        unreachable!("no int8 kernel on this architecture")
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 1000) as f32) * 2e-3 - 1.0)
            .collect()
    }

    #[test]
    fn errors() {
        let w =
            QuantizedTensor::compress(&[0.5; 6], &[3, 2], CompressionConfig::WEIGHT_4BIT).unwrap();
        let mut out = [0.0; 6];
        assert!(matches!(
            linear_packed(&[0.0; 3], 2, &w, None, &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            linear_packed(&[0.0; 4], 2, &w, None, &mut out[..5]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            linear_packed(&[0.0; 4], 2, &w, Some(&[0.0; 2]), &mut out),
            Err(Error::ShapeMismatch { .. })
        ));
        let w3 = QuantizedTensor::compress(&[0.5; 6], &[1, 3, 2], CompressionConfig::WEIGHT_4BIT)
            .unwrap();
        let e = linear_packed(&[0.0; 2], 1, &w3, None, &mut [0.0; 3]).unwrap_err();
        assert!(e.to_string().contains("rank-2"), "{e}");
        assert!(linear_packed(&[], 0, &w, None, &mut []).is_ok());
        linear_packed(&[1.0, 2.0], 1, &w, Some(&[1.0, 2.0, 3.0]), &mut out[..3]).unwrap();
        assert_eq!(out[..3], [2.5, 3.5, 4.5]);
        let w0 = QuantizedTensor::compress(&[], &[3, 0], CompressionConfig::WEIGHT_4BIT).unwrap();
        let mut out = [9.0; 6];
        linear_packed(&[], 2, &w0, Some(&[1.0, 2.0, 3.0]), &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        let mut e = [0.0; 2];
        assert!(matches!(
            embedding_packed(&w, &[3], &mut e),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            embedding_packed(&w, &[0], &mut e[..1]),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    /// Shapes large enough for the parallel split, several panels and x blocks, ragged tails.
    #[test]
    fn large_shapes_all_paths_and_formats() {
        for cfg in [
            CompressionConfig::WEIGHT_4BIT,
            CompressionConfig::WEIGHT_8BIT,
            CompressionConfig {
                group_size: 32,
                symmetric: true,
                ..CompressionConfig::WEIGHT_4BIT
            },
            CompressionConfig {
                group_size: 48,
                ..CompressionConfig::WEIGHT_4BIT
            },
            CompressionConfig {
                group_size: 128,
                ..CompressionConfig::WEIGHT_4BIT
            },
            // 8-bit codes in groups that the block path does not take (not dividing 256).
            CompressionConfig {
                group_size: 320,
                ..CompressionConfig::WEIGHT_8BIT
            },
            CompressionConfig {
                group_size: 256,
                ..CompressionConfig::WEIGHT_8BIT
            },
            CompressionConfig::FLEXGEN_WEIGHT,
        ] {
            let (n, k) = (300, 1000);
            let w = QuantizedTensor::compress(&data(n * k, 3), &[n, k], cfg).unwrap();
            let bias = data(n, 5);
            for m in [1, 5, 20, 70] {
                check_all(&data(m * k, 11), m, &w, Some(&bias));
            }
        }
    }

    /// A row of `x` with a NaN or an infinity cannot be rounded to fixed point: the
    /// fixed-point path hands the call to the float kernel, whose outputs are not finite.
    #[test]
    fn fixed_point_path_propagates_non_finite_x() {
        let (n, k) = (8, 192);
        let w = QuantizedTensor::compress(&data(n * k, 1), &[n, k], CompressionConfig::WEIGHT_4BIT)
            .unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = data(2 * k, 2);
            x[k + 70] = bad;
            for level in available_levels() {
                let mut got = vec![0.0; 2 * n];
                linear_packed_path(level, PackedPath::FixedPoint, &x, 2, &w, None, &mut got)
                    .unwrap();
                assert!(
                    got[..n].iter().all(|v| v.is_finite()),
                    "{level} {bad}: {got:?}"
                );
                assert!(
                    got[n..].iter().all(|v| !v.is_finite()),
                    "{level} {bad}: {got:?}"
                );
            }
        }
    }

    /// The AVX-512 panel decoder writes exactly the transposed `write_block` values, and
    /// zeros for the rows past the weight's end, as [`RowBlocks::write_panels`] promises.
    #[test]
    fn panels_are_the_transposed_block_with_zero_padding() {
        if !row_blocks_supported() {
            return;
        }
        const PW: usize = flexgen_core::kernels::PANEL_WIDTH;
        for cfg in [
            CompressionConfig::WEIGHT_4BIT,
            CompressionConfig::WEIGHT_8BIT,
        ] {
            let (n, k) = (45, 512);
            let w = QuantizedTensor::compress(&data(n * k, 7), &[n, k], cfg).unwrap();
            let blocks = DecodedBlocks {
                rows: row_view(&w).unwrap(),
                level: SimdLevel::Avx512,
            };
            let (r0, rows, c0, cols) = (5, 40, 256, 256);
            let mut block = vec![0.0; rows * cols];
            blocks.write_block(r0, rows, c0, cols, &mut block);
            let np = rows.div_ceil(PW);
            let mut panels = vec![f32::NAN; np * cols * PW];
            assert!(
                blocks.write_panels(r0, rows, c0, cols, &mut panels),
                "{cfg}"
            );
            for p in 0..np {
                for c in 0..cols {
                    for j in 0..PW {
                        let r = p * PW + j;
                        let want = if r < rows { block[r * cols + c] } else { 0.0 };
                        let got = panels[(p * cols + c) * PW + j];
                        assert_eq!(got.to_bits(), want.to_bits(), "{cfg} row {r} col {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn embedding_rows_match_decompress() {
        for cfg in [
            CompressionConfig::WEIGHT_4BIT,
            CompressionConfig::FLEXGEN_WEIGHT,
            CompressionConfig::WEIGHT_8BIT,
        ] {
            let (v, d) = (130, 100);
            let w = QuantizedTensor::compress(&data(v * d, 1), &[v, d], cfg).unwrap();
            let full = w.decompress();
            let ids = [0u32, 129, 64, 7, 7];
            let mut out = vec![0.0; ids.len() * d];
            embedding_packed(&w, &ids, &mut out).unwrap();
            for (row, &id) in out.chunks_exact(d).zip(&ids) {
                assert_eq!(row, &full[id as usize * d..(id as usize + 1) * d], "{cfg}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn fused_matches_dequantize_then_linear(
            (m, n, k, x, wd, b) in (1usize..10, 1usize..20, 1usize..200).prop_flat_map(|(m, n, k)| {
                (Just(m), Just(n), Just(k),
                 proptest::collection::vec(-2.0f32..2.0, m * k),
                 proptest::collection::vec(-1.0f32..1.0, n * k),
                 proptest::collection::vec(-1.0f32..1.0, n))
            }),
            fmt in 0usize..6,
            with_bias in any::<bool>(),
        ) {
            let cfg = [
                CompressionConfig::WEIGHT_4BIT,
                CompressionConfig::WEIGHT_8BIT,
                CompressionConfig { group_size: 32, ..CompressionConfig::WEIGHT_4BIT },
                CompressionConfig { group_size: 16, symmetric: true, ..CompressionConfig::WEIGHT_8BIT },
                CompressionConfig { group_size: 96, ..CompressionConfig::WEIGHT_8BIT },
                CompressionConfig { num_bits: 2, group_size: 12, ..CompressionConfig::WEIGHT_4BIT },
            ][fmt];
            let w = QuantizedTensor::compress(&wd, &[n, k], cfg).unwrap();
            check_all(&x, m, &w, with_bias.then_some(&b[..]));
        }
    }
}
