//! [`CompressionConfig`]: how a tensor is split into groups and how many bits each value gets.

use crate::error::{Error, Result};

/// Group-wise quantization settings (FlexGen's `CompressionConfig`).
///
/// The tensor is split along `group_dim` into groups of `group_size` consecutive values (the
/// last group of each line is padded when the dimension is not a multiple of `group_size`).
/// Each group stores `num_bits`-bit codes plus two `f16` numbers, its step and its minimum:
/// `x ≈ code · step + min`.
///
/// - Asymmetric (`symmetric: false`, FlexGen's default): `min = min(x)`,
///   `step = (max(x) − min(x)) / (2^b − 1)`.
/// - Symmetric: `step = max|x| / (2^(b−1) − 1)` and `min = −(2^(b−1) − 1) · step`, so codes
///   `0 ..= 2^b − 2` cover `[−max|x|, max|x|]` (FlexGen's symmetric mode, stored the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressionConfig {
    /// Bits per value: 1, 2, 4 or 8 (whole codes per byte). The fused kernels cover 4 and 8.
    pub num_bits: u8,
    /// Values per group; a multiple of `8 / num_bits` (for 4 bits: any even size).
    pub group_size: usize,
    /// The dimension the groups run along (`0..rank`).
    pub group_dim: usize,
    /// Symmetric (zero-centred) instead of min/max quantization.
    pub symmetric: bool,
}

impl CompressionConfig {
    /// The weight config of this crate's model integration: 4 bits, groups of 64 along the
    /// input dimension (dim 1 of a `(out, in)` weight), asymmetric. FlexGen groups weights along
    /// dim 0; see the crate docs for why we group along the reduction dimension.
    pub const WEIGHT_4BIT: CompressionConfig = CompressionConfig {
        num_bits: 4,
        group_size: 64,
        group_dim: 1,
        symmetric: false,
    };

    /// [`CompressionConfig::WEIGHT_4BIT`] with 8 bits.
    pub const WEIGHT_8BIT: CompressionConfig = CompressionConfig {
        num_bits: 8,
        group_size: 64,
        group_dim: 1,
        symmetric: false,
    };

    /// FlexGen's weight config: 4 bits, groups of 64 along dim 0 (output channels), asymmetric.
    pub const FLEXGEN_WEIGHT: CompressionConfig = CompressionConfig {
        num_bits: 4,
        group_size: 64,
        group_dim: 0,
        symmetric: false,
    };

    /// FlexGen's KV-cache config: 4 bits, groups of 64 along dim 2 (head_dim of a
    /// `(seq, batch·heads, head_dim)` cache), asymmetric.
    pub const FLEXGEN_CACHE: CompressionConfig = CompressionConfig {
        num_bits: 4,
        group_size: 64,
        group_dim: 2,
        symmetric: false,
    };

    /// The largest code, `2^b − 1`.
    pub fn max_code(&self) -> u8 {
        ((1u16 << self.num_bits) - 1) as u8
    }

    /// Codes stored per byte, `8 / num_bits`.
    pub fn codes_per_byte(&self) -> usize {
        8 / usize::from(self.num_bits)
    }

    /// Bytes of codes per group, `group_size · num_bits / 8`.
    pub fn group_bytes(&self) -> usize {
        self.group_size / self.codes_per_byte()
    }

    /// Average storage bits per value of a full group (codes plus the two `f16` parameters).
    pub fn bits_per_value(&self) -> f64 {
        f64::from(self.num_bits) + 32.0 / self.group_size as f64
    }

    /// Checks the bit width and group size (rank-independent parts).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Error::Config {
            config: self.to_string(),
            msg,
        };
        if ![1, 2, 4, 8].contains(&self.num_bits) {
            return Err(bad(format!(
                "num_bits must be 1, 2, 4 or 8, got {}",
                self.num_bits
            )));
        }
        if self.symmetric && self.num_bits < 2 {
            return Err(bad("symmetric quantization needs at least 2 bits".into()));
        }
        let cpb = self.codes_per_byte();
        if self.group_size == 0 || !self.group_size.is_multiple_of(cpb) {
            return Err(bad(format!(
                "group_size must be a positive multiple of {cpb} for {}-bit codes, got {}",
                self.num_bits, self.group_size
            )));
        }
        Ok(())
    }

    /// [`CompressionConfig::validate`] plus `group_dim < rank`.
    pub fn validate_for_rank(&self, rank: usize) -> Result<()> {
        self.validate()?;
        if self.group_dim >= rank {
            return Err(Error::Config {
                config: self.to_string(),
                msg: format!(
                    "group_dim {} is out of range for a rank-{rank} tensor",
                    self.group_dim
                ),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for CompressionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-bit/g{}/dim{}/{}",
            self.num_bits,
            self.group_size,
            self.group_dim,
            if self.symmetric { "sym" } else { "asym" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_sizes() {
        let c = CompressionConfig::WEIGHT_4BIT;
        assert!(c.validate_for_rank(2).is_ok());
        assert_eq!(
            (c.max_code(), c.codes_per_byte(), c.group_bytes()),
            (15, 2, 32)
        );
        assert_eq!(c.bits_per_value(), 4.5);
        assert_eq!(c.to_string(), "4-bit/g64/dim1/asym");
        assert!(c.validate_for_rank(1).is_err());
        let e = CompressionConfig { num_bits: 3, ..c }
            .validate()
            .unwrap_err();
        assert!(
            e.to_string().contains("num_bits must be 1, 2, 4 or 8"),
            "{e}"
        );
        let e = CompressionConfig { group_size: 7, ..c }
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("multiple of 2"), "{e}");
        assert!(CompressionConfig { group_size: 0, ..c }.validate().is_err());
        let e = CompressionConfig {
            num_bits: 1,
            group_size: 8,
            symmetric: true,
            ..c
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at least 2 bits"));
        let c8 = CompressionConfig::WEIGHT_8BIT;
        assert_eq!((c8.max_code(), c8.group_bytes()), (255, 64));
        assert!(CompressionConfig {
            group_size: 7,
            ..c8
        }
        .validate()
        .is_ok());
        assert!(CompressionConfig {
            num_bits: 2,
            group_size: 6,
            ..c
        }
        .validate()
        .is_err());
        assert!(CompressionConfig::FLEXGEN_CACHE
            .validate_for_rank(3)
            .is_ok());
        assert!(CompressionConfig::FLEXGEN_WEIGHT
            .validate_for_rank(2)
            .is_ok());
    }
}
