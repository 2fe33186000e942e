//! The crate's error type.

/// Errors returned by `flexgen-core` operations.
///
/// Every kernel validates the shapes its caller passes and reports problems through this
/// type instead of panicking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer or matrix did not have the shape an operation required.
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation that detected the mismatch.
        op: &'static str,
        /// What the operation expected (human readable).
        expected: String,
        /// What it received (human readable).
        got: String,
    },
    /// An index (a row or token id) was outside its valid range.
    #[error("index {index} out of range for length {len} in {op}")]
    IndexOutOfRange {
        /// The operation that detected the bad index.
        op: &'static str,
        /// The offending index.
        index: usize,
        /// The exclusive upper bound for valid indices.
        len: usize,
    },
    /// Some other argument was invalid (zero dimension, overflowing size, unsupported SIMD level, ...).
    #[error("invalid argument to {op}: {msg}")]
    InvalidArgument {
        /// The operation that rejected the argument.
        op: &'static str,
        /// Why the argument was rejected.
        msg: String,
    },
    /// A string could not be parsed as a [`DType`](crate::DType).
    #[error("unknown dtype {0:?} (expected f32, f16 or bf16)")]
    ParseDType(String),
}

/// `Result` specialised to this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds a [`Error::ShapeMismatch`] from anything printable.
    pub(crate) fn shape(
        op: &'static str,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        Error::ShapeMismatch {
            op,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// Builds a [`Error::InvalidArgument`].
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}

/// Checks that a buffer has exactly `expected` elements.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} of length {expected}"),
            format!("length {got}"),
        ))
    }
}

/// Multiplies sizes, reporting overflow as [`Error::InvalidArgument`].
pub(crate) fn checked_product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| Error::invalid(op, format!("size {dims:?} overflows usize")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = Error::shape("linear", "x of length 6", "length 5");
        assert_eq!(
            e.to_string(),
            "shape mismatch in linear: expected x of length 6, got length 5"
        );
        let e = Error::IndexOutOfRange {
            op: "embedding",
            index: 7,
            len: 3,
        };
        assert_eq!(
            e.to_string(),
            "index 7 out of range for length 3 in embedding"
        );
        assert!(checked_product("t", &[usize::MAX, 2]).is_err());
        assert_eq!(checked_product("t", &[3, 4, 5]).unwrap(), 60);
        assert!(check_len("t", "x", 3, 3).is_ok());
        assert!(matches!(
            check_len("t", "x", 2, 3),
            Err(Error::ShapeMismatch { op: "t", .. })
        ));
    }
}
