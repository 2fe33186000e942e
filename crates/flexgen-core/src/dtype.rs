//! Element types of stored weights.

use crate::error::Error;

/// The element type of a [`Matrix`](crate::Matrix)'s storage.
///
/// Activations are always `f32`; weights may be stored in any of these types and are
/// converted to `f32` on the fly by the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`): the upper 16 bits of an `f32`.
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Canonical lower-case name: `"f32"`, `"f16"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;

    /// Parses `f32`/`float32`/`fp32`, `f16`/`float16`/`fp16`/`half` and `bf16`/`bfloat16`
    /// (case-insensitive, surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::ParseDType(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        for (s, d) in [
            ("f32", DType::F32),
            ("float32", DType::F32),
            ("F16", DType::F16),
            ("float16", DType::F16),
            ("half", DType::F16),
            ("bf16", DType::BF16),
            (" bfloat16 ", DType::BF16),
        ] {
            assert_eq!(s.parse::<DType>().unwrap(), d);
        }
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
        }
        assert!(matches!("int8".parse::<DType>(), Err(Error::ParseDType(s)) if s == "int8"));
        assert_eq!(DType::F32.size_in_bytes(), 4);
        assert_eq!(DType::F16.size_in_bytes(), 2);
        assert_eq!(DType::BF16.size_in_bytes(), 2);
    }
}
