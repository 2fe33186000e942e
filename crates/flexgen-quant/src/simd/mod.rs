//! Kernels over packed rows, implemented once per SIMD level.
//!
//! [`Rows`] describes a set of equally spaced rows, each `cols` values compressed along the
//! row in consecutive groups (a `(rows, cols)` weight with `group_dim = 1`, or the per-head
//! vectors of a KV cache). The [`QKern`] implementations compute straight from the codes: the
//! 4-bit AVX-512 kernel turns each group's `(step, min)` into a 16-entry table of dequantized
//! values and looks codes up with `vpermps`; the AVX2 kernel converts codes with
//! `vcvtdq2ps` and applies `code · step + min`. Formats without a fused path (1/2-bit codes,
//! groups that are not a multiple of 32 (4-bit) or 16 (8-bit) values) use the portable
//! decode-a-group-then-multiply code of [`scalar`] at every level.

use half::f16;

use crate::error::{Error, Result};
use flexgen_core::SimdLevel;

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_fixed;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_int8;

/// Equally spaced packed rows: row `r`'s codes start at `codes[r * code_stride]` and its
/// `[step, min]` pairs at `params[r * param_stride]`; each row has `groups()` groups of
/// `gs` values (the last one padded when `cols % gs != 0`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    /// Codes, starting at row 0.
    pub codes: &'a [u8],
    /// Group parameters, starting at row 0.
    pub params: &'a [f16],
    /// Number of rows.
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    /// Bytes from one row's codes to the next.
    pub code_stride: usize,
    /// `f16` elements from one row's parameters to the next.
    pub param_stride: usize,
    /// Bits per code.
    pub bits: u8,
    /// Values per group.
    pub gs: usize,
}

impl<'a> Rows<'a> {
    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.gs)
    }

    /// Bytes of codes per group.
    pub fn group_bytes(&self) -> usize {
        self.gs * usize::from(self.bits) / 8
    }

    /// Whether the SIMD levels have a fused kernel for this format.
    pub fn fused(&self) -> bool {
        (self.bits == 4 && self.gs.is_multiple_of(32))
            || (self.bits == 8 && self.gs.is_multiple_of(16))
    }

    /// Rows `r0 .. r0 + n` (panics if out of range, like slicing).
    pub fn sub(&self, r0: usize, n: usize) -> Rows<'a> {
        assert!(r0 + n <= self.rows, "Rows::sub out of range");
        Rows {
            codes: &self.codes[(r0 * self.code_stride).min(self.codes.len())..],
            params: &self.params[(r0 * self.param_stride).min(self.params.len())..],
            rows: n,
            ..*self
        }
    }

    /// Panics unless every byte and parameter of every row lies inside the slices.
    pub fn assert_in_bounds(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let g = self.groups();
        assert!(
            self.codes.len() >= (self.rows - 1) * self.code_stride + g * self.group_bytes()
                && self.params.len() >= (self.rows - 1) * self.param_stride + 2 * g,
            "packed rows out of bounds"
        );
    }
}

/// Primitive operations on packed rows, implemented once per SIMD level.
///
/// All methods are `unsafe` only because an implementation may use CPU features the caller
/// must have verified (see [`ensure_available`]); they check (with a panic) that every access
/// stays inside the slices they are given.
pub(crate) trait QKern {
    /// `out_t[r * m + i] = Σ_l W[r, l] · x[i * cols + l]` for `r < w.rows`, `i < m`.
    /// Requires `x.len() >= m * cols`, `out_t.len() >= w.rows * m`.
    unsafe fn gemv(w: Rows<'_>, x: &[f32], m: usize, out_t: &mut [f32]);
    /// `out[r * cols + l] = W[r, l]` (dequantized); requires `out.len() >= w.rows * cols`.
    unsafe fn dequant(w: Rows<'_>, out: &mut [f32]);
    /// `out[l] += Σ_r p[r] · W[r, l]` for `r < min(p.len(), w.rows)`, skipping `p[r] == 0`;
    /// requires `out.len() >= cols`.
    unsafe fn axpy(p: &[f32], w: Rows<'_>, out: &mut [f32]);
}

/// Expands `$body` with `$K` bound to the [`QKern`] implementation for `$level`.
///
/// Callers must have checked (with [`ensure_available`]) that `$level` is supported.
macro_rules! dispatch {
    ($level:expr, $K:ident => $body:expr) => {{
        match $level {
            #[cfg(target_arch = "x86_64")]
            flexgen_core::SimdLevel::Avx512 => {
                type $K = $crate::simd::avx512::Avx512;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            flexgen_core::SimdLevel::Avx2Fma => {
                type $K = $crate::simd::avx2::Avx2;
                $body
            }
            _ => {
                type $K = $crate::simd::scalar::Scalar;
                $body
            }
        }
    }};
}
pub(crate) use dispatch;

/// Returns an error unless `level` can run on this CPU.
pub(crate) fn ensure_available(op: &'static str, level: SimdLevel) -> Result<()> {
    if level.is_available() {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("SIMD level {level} is not supported by this CPU"),
        ))
    }
}

/// Copies the ragged tail (`cols % gs` values) of each of the `m` rows of `x` into
/// zero-padded rows of `gs` values (empty when `cols % gs == 0`).
pub(crate) fn padded_tails(x: &[f32], m: usize, cols: usize, gs: usize) -> Vec<f32> {
    let rem = cols % gs;
    if rem == 0 {
        return Vec::new();
    }
    let mut t = vec![0f32; m * gs];
    for i in 0..m {
        t[i * gs..i * gs + rem].copy_from_slice(&x[i * cols + cols - rem..(i + 1) * cols]);
    }
    t
}
