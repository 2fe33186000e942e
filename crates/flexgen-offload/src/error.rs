//! The error type of `flexgen-offload`: every message names the number, tier, file or tensor at
//! fault.

use std::path::PathBuf;

/// Everything that can go wrong while planning or running an offloaded model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy field has a value the runtime cannot run; `field` uses FlexGen's flag names.
    #[error("invalid policy: {field} = {value}: {reason}")]
    Policy {
        /// The field or flag at fault (e.g. `--percent wg+wc`).
        field: &'static str,
        /// The value given.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The plan needs more memory on a tier than its budget allows.
    #[error(
        "{what} needs {needed} bytes ({needed_gib:.2} GiB) on the {tier} tier, \
         but its budget is {budget} bytes ({budget_gib:.2} GiB); {hint}"
    )]
    Budget {
        /// The tier.
        tier: crate::Tier,
        /// What is being placed there.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// `needed` in GiB.
        needed_gib: f64,
        /// The tier's budget in bytes.
        budget: u64,
        /// `budget` in GiB.
        budget_gib: f64,
        /// Which setting to change.
        hint: String,
    },
    /// A file of the disk tier could not be created, read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "create", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A model handed the runtime something inconsistent (shapes, layer indices, ...).
    #[error("invalid model description: {0}")]
    Model(String),
    /// The model's forward pass or weight source failed.
    #[error("layer {layer} ({name}): {source}")]
    Layer {
        /// Index of the layer in the schedule.
        layer: usize,
        /// The layer's name.
        name: String,
        /// The model's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Loading a weight from the model's source failed.
    #[error("weight {name}: {source}")]
    Source {
        /// The tensor.
        name: String,
        /// The source's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An I/O worker thread panicked or vanished.
    #[error("I/O worker failed: {0}")]
    Worker(String),
    /// A kernel or tensor constructor rejected its inputs.
    #[error(transparent)]
    Core(#[from] flexgen_core::Error),
    /// Compression failed.
    #[error(transparent)]
    Quant(#[from] flexgen_quant::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A policy error for `field` with the offending `value`.
    pub fn policy(
        field: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::Policy {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// An I/O error of `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
