//! Packed-panel GEMM behind [`linear`](super::linear()) for larger batches (AVX-512 only).
//!
//! `out[m, n] = x[m, k] · Wᵀ + bias` with `W` row-major `n x k`, blocked GotoBLAS-style:
//! `x` is packed once per call into panels of `MR` rows (`f32`, or bf16 pairs), and each
//! task (a block of `NB` panels of `NR` output features) packs its weights block by block of
//! `k` into a per-thread buffer that stays in L2, then runs the register-tiled
//! micro-kernels of [`crate::simd::avx512_gemm`]. Tasks own disjoint column ranges of the
//! output and are spread over rayon threads. No heap allocation once the per-thread
//! buffers have grown.
//!
//! Arithmetic per weight type ([`Micro`]):
//! - `f32` and `f16` weights: `f32` panels (`f16` converted exactly), `f32` FMA — the same
//!   products as the reference, summed in a different order.
//! - `bf16` weights on a CPU with AVX512_BF16: `x` rounded to bf16 (nearest-even) and
//!   `vdpbf16ps` (f32 accumulation), twice the FMA rate. The error is that of rounding `x`:
//!   per output at most about `2^-8 · Σ|x_l w_l|` (tested against the `f32` reference).
//!   Set `FLEXGEN_BF16_DOT=0` to keep `x` in `f32` instead.
//! - `bf16` weights otherwise: pairs split exactly into `f32`, `f32` FMA (exact products).

use std::cell::RefCell;

use bytemuck::{cast_slice, cast_slice_mut};
use half::bf16;
use rayon::prelude::*;

use crate::matrix::{Matrix, Storage};
use crate::simd::avx512_gemm::{
    has_avx512_bf16, pack_weights, ukr_dot_emulated, ukr_dot_native, ukr_f32, ukr_pairs_f32x, Init,
    WeightWords, MR, NR,
};

/// `k` steps (32-bit words of a weight panel) per block: a panel block is `KW * NR * 4` =
/// 32 KiB, a task's weight block `NB` times that.
const KW: usize = 256;
/// Weight panels per task (`NB * NR` = 256 output features).
const NB: usize = 8;

/// Which micro-kernel (and `x` packing) the GEMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Micro {
    /// `f32` weight panels (from `f32`, `f16` or `bf16` weights), `f32` `x`.
    F32,
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
    /// The micro-kernel [`linear`](super::linear()) uses for `w`'s dtype on this CPU.
    pub(crate) fn for_weights(w: &Matrix) -> Micro {
        match w.storage() {
            Storage::BF16(_) if has_avx512_bf16() && bf16_dot_allowed() => Micro::DotNative,
            Storage::BF16(_) => Micro::PairsF32x,
            Storage::F32(_) | Storage::F16(_) => Micro::F32,
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

    /// Whether weights are packed as bf16 pairs (one word per two `k`).
    fn pairs_w(self) -> bool {
        self != Micro::F32
    }
}

/// `FLEXGEN_BF16_DOT` is not `0`/`off`/`false` (read once).
fn bf16_dot_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        !matches!(
            std::env::var("FLEXGEN_BF16_DOT")
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
                .as_str(),
            "0" | "off" | "false" | "no"
        )
    })
}

thread_local! {
    /// Packed `x` of the calling thread.
    static X_PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Packed weight block of a worker thread.
    static W_PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` words of `cell`'s buffer (a fresh one if it is already borrowed).
fn with_buf<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0; len]),
    })
}

/// Packs `x` (`m x k`) into `ceil(m / MR)` panels of `[kpad][MR]` floats (as bits; rows
/// past `m` and steps past `k` are zero).
fn pack_x_f32(x: &[f32], m: usize, k: usize, kpad: usize, dst: &mut [u32]) {
    let dst: &mut [f32] = cast_slice_mut(dst);
    dst.par_chunks_mut(kpad * MR)
        .enumerate()
        .for_each(|(ip, panel)| {
            panel.fill(0.0);
            let r0 = ip * MR;
            for r in 0..MR.min(m - r0) {
                let row = &x[(r0 + r) * k..(r0 + r + 1) * k];
                for (l, &v) in row.iter().enumerate() {
                    panel[l * MR + r] = v;
                }
            }
        });
}

/// Packs `x` rounded to bf16 into panels of `[kpad / 2][MR]` pair words.
fn pack_x_pairs(x: &[f32], m: usize, k: usize, kpad: usize, dst: &mut [u32]) {
    let kp = kpad / 2;
    dst.par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(ip, panel)| {
            panel.fill(0);
            let r0 = ip * MR;
            for r in 0..MR.min(m - r0) {
                let row = &x[(r0 + r) * k..(r0 + r + 1) * k];
                for (p, pair) in row.chunks(2).enumerate() {
                    let lo = u32::from(bf16::from_f32(pair[0]).to_bits());
                    let hi = pair
                        .get(1)
                        .map_or(0, |&v| u32::from(bf16::from_f32(v).to_bits()));
                    panel[p * MR + r] = lo | (hi << 16);
                }
            }
        });
}

/// The output pointer shared by tasks that write disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own column range of every row), and the
// pointer outlives the parallel loop that uses it.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out = x · Wᵀ (+ bias)` with the packed-panel GEMM.
///
/// Requirements (checked by [`linear`](super::linear())'s argument validation): `x` is
/// `m x k`, `w` is `n x k`, `out` is `m x n`, `bias` has `n` elements, and `m, n, k > 0`.
/// The caller must have checked that the CPU supports AVX-512 (F/BW/VL, FMA, F16C) and
/// that `micro` is available ([`Micro::is_available`]); otherwise this panics.
pub(crate) fn gemm(
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
    micro: Micro,
) {
    let (n, k) = (w.rows(), w.cols());
    assert!(
        crate::SimdLevel::Avx512.is_available() && micro.is_available(),
        "panel_gemm: CPU lacks the instructions of {micro:?}"
    );
    assert!(x.len() == m * k && out.len() == m * n && m > 0 && n > 0 && k > 0);
    if let Some(b) = bias {
        assert_eq!(b.len(), n);
    }
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
    let kpad = k.next_multiple_of(2);
    let m_panels = m.div_ceil(MR);
    // Words of one packed x panel; words per k step of x and of the weights.
    let x_words = if micro.pairs_x() { kpad / 2 } else { kpad } * MR;
    let kwords = src.words_per_row(k);
    let n_panels = n.div_ceil(NR);
    let tasks = n_panels.div_ceil(NB);
    let outp = OutPtr(out.as_mut_ptr());
    with_buf(&X_PACK, m_panels * x_words, |xbuf| {
        if micro.pairs_x() {
            pack_x_pairs(x, m, k, kpad, xbuf);
        } else {
            pack_x_f32(x, m, k, kpad, xbuf);
        }
        let xbuf: &[u32] = xbuf;
        let task = |t: usize| {
            let p0 = t * NB;
            let np = NB.min(n_panels - p0);
            with_buf(&W_PACK, np * KW.min(kwords) * NR, |wbuf| {
                let mut w0 = 0;
                while w0 < kwords {
                    let kw = KW.min(kwords - w0);
                    // SAFETY: AVX-512 checked above; `src` holds `n * k` elements (a
                    // `Matrix` invariant); `wbuf` has `np * kw * NR` words or more.
                    unsafe { pack_weights(src, n, k, p0 * NR, np, w0, kw, wbuf) };
                    for pi in 0..np {
                        let col = (p0 + pi) * NR;
                        let nvalid = NR.min(n - col);
                        let wp = wbuf[pi * kw * NR..(pi + 1) * kw * NR].as_ptr();
                        let init = match (w0, bias) {
                            (0, Some(b)) => Init::Bias(b[col..].as_ptr()),
                            (0, None) => Init::Zero,
                            _ => Init::Acc,
                        };
                        for ip in 0..m_panels {
                            let i0 = ip * MR;
                            let c = outp.get().wrapping_add(i0 * n + col);
                            // x words of this panel from k step `w0` (in words).
                            let xs = &xbuf[ip * x_words..(ip + 1) * x_words];
                            // SAFETY: the tile covers rows `i0 .. i0 + min(MR, m - i0)` and
                            // columns `col .. col + nvalid` of `out` (`m x n`), owned by this
                            // task; `xs` and `wp` hold the words the micro-kernel reads for
                            // `kw` steps from `w0` (bounds below); AVX-512 (and AVX512_BF16
                            // for `DotNative`) checked above.
                            unsafe {
                                run_tile(micro, m - i0, kw, xs, w0, wp, c, n, init, nvalid);
                            }
                        }
                    }
                    w0 += kw;
                }
            });
        };
        if tasks == 1 || m * n * k < 1 << 18 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    });
}

/// Runs the micro-kernel `micro` for one tile of `min(rows, MR)` rows.
///
/// # Safety
/// `xs` is one packed x panel (all of its `k` steps), `w0 + kw` weight words are within
/// it (for `f32` x: steps `w0 .. w0 + kw` for `F32`, `2 w0 .. 2 (w0 + kw)` for pairs);
/// `wp` valid for `kw * NR` words; the tile contract of `store_tile` for `c`, `ldc`,
/// `init`, `nvalid`; the CPU supports the micro-kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn run_tile(
    micro: Micro,
    rows: usize,
    kw: usize,
    xs: &[u32],
    w0: usize,
    wp: *const u32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    nvalid: usize,
) {
    macro_rules! by_rows {
        ($f:ident, $xp:expr) => {
            match rows {
                1 => $f::<1>(kw, $xp, wp, c, ldc, init, nvalid),
                2 => $f::<2>(kw, $xp, wp, c, ldc, init, nvalid),
                3 => $f::<3>(kw, $xp, wp, c, ldc, init, nvalid),
                4 => $f::<4>(kw, $xp, wp, c, ldc, init, nvalid),
                5 => $f::<5>(kw, $xp, wp, c, ldc, init, nvalid),
                6 => $f::<6>(kw, $xp, wp, c, ldc, init, nvalid),
                7 => $f::<7>(kw, $xp, wp, c, ldc, init, nvalid),
                8 => $f::<8>(kw, $xp, wp, c, ldc, init, nvalid),
                9 => $f::<9>(kw, $xp, wp, c, ldc, init, nvalid),
                10 => $f::<10>(kw, $xp, wp, c, ldc, init, nvalid),
                11 => $f::<11>(kw, $xp, wp, c, ldc, init, nvalid),
                _ => $f::<12>(kw, $xp, wp, c, ldc, init, nvalid),
            }
        };
    }
    // SAFETY: forwarded from the caller; the slicing below panics rather than overreads.
    unsafe {
        match micro {
            Micro::F32 => {
                let xf: &[f32] = cast_slice(&xs[w0 * MR..(w0 + kw) * MR]);
                by_rows!(ukr_f32, xf.as_ptr())
            }
            Micro::PairsF32x => {
                let xf: &[f32] = cast_slice(&xs[2 * w0 * MR..2 * (w0 + kw) * MR]);
                by_rows!(ukr_pairs_f32x, xf.as_ptr())
            }
            Micro::DotNative => {
                let xp = xs[w0 * MR..(w0 + kw) * MR].as_ptr();
                by_rows!(ukr_dot_native, xp)
            }
            Micro::DotEmulated => {
                let xp = xs[w0 * MR..(w0 + kw) * MR].as_ptr();
                by_rows!(ukr_dot_emulated, xp)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::kernels::linear::linear_ref;
    use crate::kernels::testutil::{assert_close, assert_within_bf16_rounding, vec_f32};
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
        for micro in micros.into_iter().filter(|u| u.is_available()) {
            let mut got = vec![f32::NAN; m * n];
            gemm(x, m, w, bias, &mut got, micro);
            let what = format!("{what} {micro:?} {m}x{k}x{n}");
            if micro.pairs_x() {
                assert_within_bf16_rounding(&got, &want, x, m, w, &what);
            } else {
                assert_close(&got, &want, 1e-6 * (k as f32).max(10.0), &what);
            }
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
        ] {
            let wd: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 1000) as f32) * 1e-3 - 0.5)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 97) as f32) * 0.02 - 1.0)
                .collect();
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
