//! The crate's error type.

/// Errors returned by `flexgen-quant`.
///
/// Every public function validates its inputs (configs, shapes, values) and reports problems
/// through this type instead of panicking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`CompressionConfig`](crate::CompressionConfig) that this crate cannot use.
    #[error("invalid compression config {config}: {msg}")]
    Config {
        /// The config, as `Display` prints it.
        config: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A buffer or tensor did not have the shape an operation required.
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation that detected the mismatch.
        op: &'static str,
        /// What the operation expected (human readable).
        expected: String,
        /// What it received (human readable).
        got: String,
    },
    /// A value cannot be compressed: NaN, infinite, or a group whose minimum or step does not
    /// fit in `f16` (magnitudes above 65504).
    #[error("cannot compress {what}: {msg}")]
    Value {
        /// What was being compressed (e.g. "group 3 of tensor [4, 64]").
        what: String,
        /// Why it was rejected.
        msg: String,
    },
    /// Some other argument was invalid (position past the cache's capacity, unsupported SIMD
    /// level, ...).
    #[error("invalid argument to {op}: {msg}")]
    InvalidArgument {
        /// The operation that rejected the argument.
        op: &'static str,
        /// Why the argument was rejected.
        msg: String,
    },
    /// A dense kernel of `flexgen-core` rejected its inputs.
    #[error(transparent)]
    Core(#[from] flexgen_core::Error),
}

/// `Result` specialised to this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::ShapeMismatch`] from anything printable.
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

    /// Builds an [`Error::InvalidArgument`].
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
        let e = Error::shape("linear_packed", "x of length 6", "length 5");
        assert_eq!(
            e.to_string(),
            "shape mismatch in linear_packed: expected x of length 6, got length 5"
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
