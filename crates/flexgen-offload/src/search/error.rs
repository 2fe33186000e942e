//! The error type of the policy search: every message names the option, file or limit at fault.

use std::path::PathBuf;

/// Everything that can go wrong while calibrating, predicting or searching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SearchError {
    /// An option has a value the search cannot use.
    #[error("invalid option {option} = {value}: {reason}")]
    Option {
        /// The option (flag name where there is one, e.g. `--prompt-len`).
        option: &'static str,
        /// The value given.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The model shape is inconsistent.
    #[error("invalid model shape {name}: {reason}")]
    Shape {
        /// The model's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// No policy fits the memory limits.
    #[error("no policy fits: {0}")]
    Infeasible(String),
    /// A file (profile, offload directory) could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A saved hardware profile could not be parsed.
    #[error("hardware profile {path}: {reason}")]
    Profile {
        /// The profile file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The LP solver failed for a reason other than infeasibility.
    #[error("LP solver: {0}")]
    Solver(String),
    /// The runtime rejected something (policy validation, disk I/O during calibration).
    #[error(transparent)]
    Runtime(#[from] crate::Error),
    /// A kernel rejected its inputs during calibration.
    #[error(transparent)]
    Core(#[from] flexgen_core::Error),
    /// A compressed kernel rejected its inputs during calibration.
    #[error(transparent)]
    Quant(#[from] flexgen_quant::Error),
}

/// Result alias of the search.
pub type Result<T> = std::result::Result<T, SearchError>;

impl SearchError {
    /// An option error.
    pub fn option(
        option: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        SearchError::Option {
            option,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// An I/O error of `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SearchError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
