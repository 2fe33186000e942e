//! Packed-panel GEMM behind [`linear`](super::linear()) and
//! [`linear_prepacked`](super::linear_prepacked) (AVX-512 only).
//!
//! `out[m, n] = x[m, k] · Wᵀ + bias` with `W` `n x k`, blocked GotoBLAS-style: `x` is packed
//! once per call into panels of up to `MR` rows (`f32`, or bf16 pairs), the weights come in
//! panels of `NR` output features — either packed block by block of `k` into a per-thread
//! buffer (row-major [`Matrix`]) or read in place ([`PanelMatrix`]) — and register-tiled
//! micro-kernels ([`crate::simd::avx512_gemm`]) compute `M x NR` tiles. Tasks own disjoint
//! tiles of the output and are spread over rayon threads. No heap allocation once the
//! per-thread buffers have grown.
//!
//! Arithmetic per weight type ([`Micro`]):
//! - `f32` and `f16` weights: `f32` FMA on exact `f32` weights — the same products as the
//!   reference, summed in a different order.
//! - `bf16` weights on a CPU with AVX512_BF16: `x` rounded to bf16 (nearest-even) and
//!   `vdpbf16ps` (`f32` accumulation), twice the FMA rate. The error is that of rounding `x`:
//!   per output at most about `2^-8 · Σ|x_l w_l|` (tested against the `f32` reference). Set
//!   `FLEXGEN_BF16_DOT=0` to keep `x` in `f32` instead.
//! - `bf16` weights otherwise: pairs split exactly into `f32`, `f32` FMA (exact products).

use std::cell::RefCell;

use bytemuck::{cast_slice, cast_slice_mut};
use half::{bf16, f16};
use rayon::prelude::*;

use super::row_blocks::RowBlocks;
use super::{with_buf, SharedOut};
use crate::dtype::DType;
use crate::matrix::{Matrix, Storage};
use crate::panel_matrix::{PanelData, PanelMatrix};
use crate::simd::avx512_gemm::{
    has_avx512_bf16, pack_weights, ukr_dot_emulated, ukr_dot_native, ukr_f16, ukr_f32,
    ukr_pairs_f32x, Init, WeightWords, MR, NR,
};

/// `k` steps (words of a weight panel) per block: a panel block is at most `KW * NR * 4` =
/// 32 KiB, a task's weight block `NB` times that.
const KW: usize = 256;
/// Weight panels per task (`NB * NR` = 256 output features).
const NB: usize = 8;
/// `x` panels per task when the weights are prepacked (`MB * MR` = 192 rows, whose `KW`
/// steps of `x` take 192 KiB).
const MB: usize = 16;

/// Which micro-kernel (and `x` packing) the GEMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Micro {
    /// `f32` weight panels (from `f32`, `f16` or `bf16` weights), `f32` `x`.
    F32,
    /// `f16` weight panels (prepacked `f16` weights), `f32` `x`.
    F16,
    /// bf16-pair weight panels, `f32` `x` (exact products).
    PairsF32x,
    /// bf16-pair weight panels, bf16-pair `x`, `vdpbf16ps` (needs AVX512_BF16).
    DotNative,
    /// [`Micro::DotNative`]'s arithmetic with AVX-512 F only (tests run it on CPUs without
    /// AVX512_BF16).
    #[cfg_attr(not(test), allow(dead_code))]
    DotEmulated,
}

impl Micro {
    /// The micro-kernel for bf16 weights on this CPU.
    fn for_bf16() -> Micro {
        if has_avx512_bf16() && super::linear::bf16_dot_enabled() {
            Micro::DotNative
        } else {
            Micro::PairsF32x
        }
    }

    /// The micro-kernel [`linear`](super::linear()) uses for a row-major `w`.
    pub(crate) fn for_matrix(w: &Matrix) -> Micro {
        match w.dtype() {
            DType::BF16 => Micro::for_bf16(),
            DType::F32 | DType::F16 => Micro::F32,
        }
    }

    /// The micro-kernel [`linear_prepacked`](super::linear_prepacked) uses for `w`'s
    /// panels (`None` when `w` is row-major).
    pub(crate) fn for_panels(w: &PanelMatrix) -> Option<Micro> {
        match w.data() {
            PanelData::RowMajor(_) => None,
            PanelData::F32(_) => Some(Micro::F32),
            PanelData::F16(_) => Some(Micro::F16),
            PanelData::Bf16Pairs(_) => Some(Micro::for_bf16()),
        }
    }

    /// Whether this micro-kernel can run on the current CPU (AVX-512 is assumed).
    pub(crate) fn is_available(self) -> bool {
        self != Micro::DotNative || has_avx512_bf16()
    }

    /// Whether `x` is packed as bf16 pairs.
    fn pairs_x(self) -> bool {
        matches!(self, Micro::DotNative | Micro::DotEmulated)
    }

    /// Whether the weight panels hold bf16 pairs (one word per two `k`).
    fn pairs_w(self) -> bool {
        matches!(
            self,
            Micro::PairsF32x | Micro::DotNative | Micro::DotEmulated
        )
    }
}

thread_local! {
    /// Packed `x` of the calling thread.
    static X_PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Packed weight block of a worker thread.
    static W_PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// A [`RowBlocks`] weight's `f32` block, before packing, of a worker thread.
    static W_BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packed `x`: panel `ip` holds rows `ip * MR ..` (`M = min(MR, m - ip * MR)` of them) as
/// `[steps][M]` words from word `ip * MR * steps`, where a step is one `k` (`f32`) or one pair
/// of `k` (bf16 pairs); steps past `k` are zero.
struct XPanels {
    /// Steps per panel.
    steps: usize,
}

impl XPanels {
    /// Packs `x` (`m x k`) into `dst` (`m * steps` words) with `steps >= k` (`f32`) or
    /// `steps == ceil(k / 2)` (pairs).
    fn pack(x: &[f32], m: usize, k: usize, steps: usize, pairs: bool, dst: &mut [u32]) -> XPanels {
        debug_assert!(if pairs {
            steps == k.div_ceil(2)
        } else {
            steps >= k
        });
        dst.par_chunks_mut(MR * steps)
            .enumerate()
            .for_each(|(ip, panel)| {
                let r0 = ip * MR;
                let rows = MR.min(m - r0);
                for r in 0..rows {
                    let row = &x[(r0 + r) * k..(r0 + r + 1) * k];
                    if pairs {
                        for (p, pair) in row.chunks(2).enumerate() {
                            let lo = u32::from(bf16::from_f32(pair[0]).to_bits());
                            let hi = pair
                                .get(1)
                                .map_or(0, |&v| u32::from(bf16::from_f32(v).to_bits()));
                            panel[p * rows + r] = lo | (hi << 16);
                        }
                    } else {
                        let panel: &mut [f32] = cast_slice_mut(panel);
                        for (l, &v) in row.iter().enumerate() {
                            panel[l * rows + r] = v;
                        }
                        panel[k * rows..].fill(0.0);
                    }
                }
            });
        XPanels { steps }
    }

    /// Words of panel `ip` for steps `s0 .. s0 + count`.
    fn block<'a>(&self, buf: &'a [u32], m: usize, ip: usize, s0: usize, count: usize) -> &'a [u32] {
        let rows = MR.min(m - ip * MR);
        let base = ip * MR * self.steps;
        &buf[base + s0 * rows..base + (s0 + count) * rows]
    }
}

/// Where the weight panels come from.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// A row-major matrix, packed per task and block of `k` into a per-thread buffer.
    RowMajor(WeightWords<'a>),
    /// Prepacked words (`f32` or bf16 pairs): panel `p`, step `s` at `(p * steps + s) * NR`.
    Words(&'a [u32], usize),
    /// Prepacked `f16` halves, indexed like [`Weights::Words`].
    Halves(&'a [f16], usize),
    /// A weight that writes `f32` blocks of its rows on request, packed per task and block
    /// of `k` like [`Weights::RowMajor`].
    Blocks(&'a dyn RowBlocks),
}

/// `out = x · Wᵀ (+ bias)` for a row-major `w` with the packed-panel GEMM.
///
/// Requirements (checked by [`linear`](super::linear())'s argument validation): `x` is
/// `m x k`, `w` is `n x k`, `out` is `m x n`, `bias` has `n` elements, and `m, n, k > 0`.
/// Panics unless the CPU supports AVX-512 (F/BW/VL, FMA, F16C) and `micro`
/// ([`Micro::is_available`]), and `micro` suits `w`'s dtype.
pub(crate) fn gemm(
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
    micro: Micro,
) {
    let src = match (w.storage(), micro.pairs_w()) {
        (Storage::F32(d), false) => WeightWords::F32(d),
        (Storage::F16(d), false) => WeightWords::F16(d),
        (Storage::BF16(d), false) => WeightWords::Bf16AsF32(d),
        (Storage::BF16(d), true) => WeightWords::Bf16Pairs(d),
        (s, true) => panic!(
            "panel_gemm: {micro:?} needs bf16 weights, got {}",
            s.dtype()
        ),
    };
    assert!(
        micro != Micro::F16,
        "panel_gemm: F16 needs prepacked f16 panels"
    );
    run(
        x,
        m,
        w.rows(),
        w.cols(),
        Weights::RowMajor(src),
        bias,
        out,
        micro,
    );
}

/// `out = x · Wᵀ (+ bias)` for a weight decoded block by block ([`RowBlocks`]), with the
/// `f32` micro-kernel. Requirements as [`gemm`].
pub(crate) fn gemm_row_blocks(
    x: &[f32],
    m: usize,
    w: &dyn RowBlocks,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert_eq!(KW, super::row_blocks::ROW_BLOCK_COLS);
    debug_assert_eq!(NR, super::row_blocks::PANEL_WIDTH);
    run(
        x,
        m,
        w.rows(),
        w.cols(),
        Weights::Blocks(w),
        bias,
        out,
        Micro::F32,
    );
}

/// `out = x · Wᵀ (+ bias)` for prepacked panels, with `micro` suiting their type (see
/// [`Micro::for_panels`]; for bf16 pairs any of the pair micro-kernels). Requirements as
/// [`gemm`]; panics for a row-major `w`.
pub(crate) fn gemm_prepacked(
    x: &[f32],
    m: usize,
    w: &PanelMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
    micro: Micro,
) {
    let k = w.cols();
    let weights = match (w.data(), micro) {
        (PanelData::F32(d), Micro::F32) => Weights::Words(cast_slice(d), k),
        (PanelData::F16(d), Micro::F16) => Weights::Halves(d, k),
        (PanelData::Bf16Pairs(d), u) if u.pairs_w() => Weights::Words(d, k.div_ceil(2)),
        _ => panic!("panel_gemm: {micro:?} does not suit these panels"),
    };
    debug_assert_eq!(w.panels(), w.rows().div_ceil(NR));
    run(x, m, w.rows(), k, weights, bias, out, micro);
}

/// The blocked loops shared by [`gemm`] and [`gemm_prepacked`].
#[allow(clippy::too_many_arguments)]
fn run(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    weights: Weights<'_>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    micro: Micro,
) {
    assert!(
        crate::SimdLevel::Avx512.is_available() && micro.is_available(),
        "panel_gemm: CPU lacks the instructions of {micro:?}"
    );
    assert!(x.len() == m * k && out.len() == m * n && m > 0 && n > 0 && k > 0);
    if let Some(b) = bias {
        assert_eq!(b.len(), n);
    }
    // Weight steps per row (words, or halves for f16 panels).
    let wsteps = if micro.pairs_w() { k.div_ceil(2) } else { k };
    // x steps per weight step (f32 x against pair panels reads two k per step).
    let xper = if micro.pairs_w() && !micro.pairs_x() {
        2
    } else {
        1
    };
    let m_panels = m.div_ceil(MR);
    let n_panels = n.div_ceil(NR);
    let col_tasks = n_panels.div_ceil(NB);
    // Row blocks only when the weights need no packing (else each block would repack them).
    let mb = match weights {
        Weights::RowMajor(_) | Weights::Blocks(_) => m_panels,
        _ => MB,
    };
    let row_tasks = m_panels.div_ceil(mb);
    // Prepacked weights against one row of `x` (decode): each weight panel in one pass, so a
    // task reads its panels as one sequential stream instead of switching panels every
    // `KW` steps (m = 1, 65536 x 2048 bf16: 32-37 against 27-29 GB/s, and 54 when the host
    // allowed 56-62; measured against the read probe).
    let kw_max = match weights {
        Weights::Words(..) | Weights::Halves(..) if m == 1 => wsteps,
        _ => KW,
    };
    let tasks = col_tasks * row_tasks;
    let outp = SharedOut::new(out);
    let x_steps = if micro.pairs_x() {
        k.div_ceil(2)
    } else {
        wsteps * xper
    };
    with_buf(&X_PACK, m * x_steps, |xbuf| {
        let xp = XPanels::pack(x, m, k, x_steps, micro.pairs_x(), xbuf);
        let xbuf: &[u32] = xbuf;
        let task = |t: usize| {
            let (ct, rt) = (t % col_tasks, t / col_tasks);
            let p0 = ct * NB;
            let np = NB.min(n_panels - p0);
            let (ip0, ip1) = (rt * mb, m_panels.min((rt + 1) * mb));
            let pack_len = match weights {
                Weights::RowMajor(_) | Weights::Blocks(_) => np * KW.min(wsteps) * NR,
                _ => 0,
            };
            with_buf(&W_PACK, pack_len, |wbuf| {
                let mut s0 = 0;
                while s0 < wsteps {
                    let kw = kw_max.min(wsteps - s0);
                    match weights {
                        Weights::RowMajor(src) => {
                            // SAFETY: AVX-512 checked above; `src` holds `n * k` elements (a
                            // `Matrix` invariant); `wbuf` has `np * kw * NR` words or more.
                            unsafe { pack_weights(src, n, k, p0 * NR, np, s0, kw, wbuf) };
                        }
                        Weights::Blocks(src) => {
                            let rows = (np * NR).min(n - p0 * NR);
                            let panels: &mut [f32] = cast_slice_mut(&mut wbuf[..np * kw * NR]);
                            if !src.write_panels(p0 * NR, rows, s0, kw, panels) {
                                with_buf(&W_BLOCK, rows * kw, |block| {
                                    src.write_block(p0 * NR, rows, s0, kw, block);
                                    let words = WeightWords::F32(block);
                                    // SAFETY: AVX-512 checked above; `block` holds
                                    // `rows * kw` elements; `wbuf` has `np * kw * NR` words.
                                    unsafe { pack_weights(words, rows, kw, 0, np, 0, kw, wbuf) };
                                });
                            }
                        }
                        _ => {}
                    }
                    let tile_at = |ip: usize, pi: usize| {
                        let col = (p0 + pi) * NR;
                        let nvalid = NR.min(n - col);
                        let init = match (s0, bias) {
                            (0, Some(b)) => Init::Bias(b[col..].as_ptr()),
                            (0, None) => Init::Zero,
                            _ => Init::Acc,
                        };
                        // The weight words (or halves) of panel `p0 + pi`, steps `s0..s0+kw`.
                        let wpanel = match weights {
                            Weights::RowMajor(_) | Weights::Blocks(_) => {
                                WPanel::Words(&wbuf[pi * kw * NR..(pi + 1) * kw * NR])
                            }
                            Weights::Words(d, steps) => {
                                let at = ((p0 + pi) * steps + s0) * NR;
                                WPanel::Words(&d[at..at + kw * NR])
                            }
                            Weights::Halves(d, steps) => {
                                let at = ((p0 + pi) * steps + s0) * NR;
                                WPanel::Halves(&d[at..at + kw * NR])
                            }
                        };
                        let i0 = ip * MR;
                        let xs = xp.block(xbuf, m, ip, s0 * xper, kw * xper);
                        let c = outp.get().wrapping_add(i0 * n + col);
                        // SAFETY: the tile covers rows `i0 .. i0 + min(MR, m - i0)` and
                        // columns `col .. col + nvalid` of `out` (`m x n`), owned by this
                        // task; `xs` and `wpanel` hold exactly the `kw` steps the
                        // micro-kernel reads; AVX-512 (and AVX512_BF16 for `DotNative`)
                        // checked above.
                        unsafe { tile(micro, m - i0, kw, xs, wpanel, c, n, init, nvalid) };
                    };
                    // x panel outermost: its `kw` steps (12 KiB of f32) stay in L1
                    // while the task's weight panels (at most NB * 32 KiB, in L2) stream
                    // past it; weights outermost would stream all of x past each weight
                    // panel (from L3 or memory once x outgrows L2: 1.25-1.3x slower at
                    // 2048 x 4096 x 4096, measured).
                    for ip in ip0..ip1 {
                        for pi in 0..np {
                            tile_at(ip, pi);
                        }
                    }
                    s0 += kw;
                }
            });
        };
        if tasks == 1 || m * n * k < 1 << 16 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    });
}

/// One weight panel block: `kw * NR` words or halves.
#[derive(Clone, Copy)]
enum WPanel<'a> {
    Words(&'a [u32]),
    Halves(&'a [f16]),
}

/// Runs the micro-kernel `micro` for one tile of `M = min(rows, MR)` rows.
///
/// # Safety
/// `xs` holds the `M x (kw steps)` words of `x` the micro-kernel reads, `wp` the `kw * NR`
/// weight words (halves for `F16`); the tile contract of the micro-kernels' `store_tile`
/// for `c`, `ldc`, `init`, `nvalid`; the CPU supports the micro-kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    micro: Micro,
    rows: usize,
    kw: usize,
    xs: &[u32],
    wp: WPanel<'_>,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    macro_rules! by_rows {
        ($f:ident, $xp:expr, $wp:expr) => {
            match rows {
                1 => $f::<1>(kw, $xp, $wp, c, ldc, init, nvalid),
                2 => $f::<2>(kw, $xp, $wp, c, ldc, init, nvalid),
                3 => $f::<3>(kw, $xp, $wp, c, ldc, init, nvalid),
                4 => $f::<4>(kw, $xp, $wp, c, ldc, init, nvalid),
                5 => $f::<5>(kw, $xp, $wp, c, ldc, init, nvalid),
                6 => $f::<6>(kw, $xp, $wp, c, ldc, init, nvalid),
                7 => $f::<7>(kw, $xp, $wp, c, ldc, init, nvalid),
                8 => $f::<8>(kw, $xp, $wp, c, ldc, init, nvalid),
                9 => $f::<9>(kw, $xp, $wp, c, ldc, init, nvalid),
                10 => $f::<10>(kw, $xp, $wp, c, ldc, init, nvalid),
                11 => $f::<11>(kw, $xp, $wp, c, ldc, init, nvalid),
                _ => $f::<12>(kw, $xp, $wp, c, ldc, init, nvalid),
            }
        };
    }
    let rows = rows.min(MR);
    let xsteps = if micro.pairs_w() && !micro.pairs_x() {
        2 * kw
    } else {
        kw
    };
    assert_eq!(xs.len(), rows * xsteps, "panel_gemm: x block");
    let xf: *const f32 = cast_slice::<u32, f32>(xs).as_ptr();
    // SAFETY: forwarded from the caller; lengths asserted above and below.
    unsafe {
        match (micro, wp) {
            (Micro::F32, WPanel::Words(w)) => {
                assert_eq!(w.len(), kw * NR);
                by_rows!(ukr_f32, xf, w.as_ptr())
            }
            (Micro::F16, WPanel::Halves(w)) => {
                assert_eq!(w.len(), kw * NR);
                by_rows!(ukr_f16, xf, w.as_ptr())
            }
            (Micro::PairsF32x, WPanel::Words(w)) => {
                assert_eq!(w.len(), kw * NR);
                by_rows!(ukr_pairs_f32x, xf, w.as_ptr())
            }
            (Micro::DotNative, WPanel::Words(w)) => {
                assert_eq!(w.len(), kw * NR);
                by_rows!(ukr_dot_native, xs.as_ptr(), w.as_ptr())
            }
            (Micro::DotEmulated, WPanel::Words(w)) => {
                assert_eq!(w.len(), kw * NR);
                by_rows!(ukr_dot_emulated, xs.as_ptr(), w.as_ptr())
            }
            _ => panic!("panel_gemm: {micro:?} does not suit the weight panel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::linear::linear_ref;
    use crate::kernels::testutil::{
        assert_close, assert_within_bf16_rounding, vec_f32, weight_pattern, x_pattern,
    };
    use proptest::prelude::*;

    /// Runs every available micro-kernel on `w` and checks it against the reference.
    fn check_all(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, what: &str) {
        if !crate::SimdLevel::Avx512.is_available() {
            return;
        }
        let (n, k) = (w.rows(), w.cols());
        let mut want = vec![0.0; m * n];
        linear_ref(x, m, w, bias, &mut want).unwrap();
        let mut micros = vec![Micro::F32];
        if w.dtype() == DType::BF16 {
            micros.extend([Micro::PairsF32x, Micro::DotEmulated, Micro::DotNative]);
        }
        let packed = w.clone().prepack();
        let panel_micros = match w.dtype() {
            DType::F32 => vec![Micro::F32],
            DType::F16 => vec![Micro::F16],
            DType::BF16 => micros[1..].to_vec(),
        };
        let check = |got: &[f32], micro: Micro, what: String| {
            if micro.pairs_x() {
                assert_within_bf16_rounding(got, &want, x, m, w, &what);
            } else {
                assert_close(got, &want, 1e-6 * (k as f32).max(10.0), &what);
            }
        };
        for micro in micros.into_iter().filter(|u| u.is_available()) {
            let mut got = vec![f32::NAN; m * n];
            gemm(x, m, w, bias, &mut got, micro);
            check(&got, micro, format!("{what} {micro:?} {m}x{k}x{n}"));
        }
        for micro in panel_micros.into_iter().filter(|u| u.is_available()) {
            let mut got = vec![f32::NAN; m * n];
            gemm_prepacked(x, m, &packed, bias, &mut got, micro);
            check(
                &got,
                micro,
                format!("{what} prepacked {micro:?} {m}x{k}x{n}"),
            );
        }
    }

    /// Several weight blocks of `k`, several tasks, odd `k`, partial panels and tiles.
    #[test]
    fn block_and_tail_shapes() {
        for &(m, k, n) in &[
            (25, 1001, 300),
            (12, 600, 32),
            (13, 37, 45),
            (1, 1, 1),
            (30, 513, 257),
            (200, 70, 40),
        ] {
            let wd = weight_pattern(n * k);
            let x = x_pattern(m * k);
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let w = Matrix::from_f32(n, k, wd.clone()).unwrap().to_dtype(dt);
                check_all(&x, m, &w, Some(&bias), &format!("{dt} bias"));
                check_all(&x, m, &w, None, &format!("{dt}"));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_ref(
            (m, n, k, x, wd, b) in (1usize..40, 1usize..80, 1usize..90).prop_flat_map(|(m, n, k)| {
                (Just(m), Just(n), Just(k), vec_f32(m * k), vec_f32(n * k), vec_f32(n))
            }),
            dt in 0usize..3,
            with_bias in any::<bool>(),
        ) {
            let dtype = [DType::F32, DType::F16, DType::BF16][dt];
            let w = Matrix::from_f32(n, k, wd).unwrap().to_dtype(dtype);
            check_all(&x, m, &w, with_bias.then_some(&b[..]), "proptest");
        }
    }
}
