//! The error type of `flexgen-opt`: every message names the file, tensor, shape or dtype at fault.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running an OPT model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A model folder lacks a file it needs.
    #[error("{what} not found: {path}")]
    MissingFile {
        /// What was looked for (e.g. "model folder", "config.json").
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// `config.json` is malformed or describes a model this crate cannot run.
    #[error("invalid config {path}: {msg}")]
    Config {
        /// The config file (or the model name for zoo configs).
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A model name that is neither a known zoo name nor a folder.
    #[error("unknown model {name:?}: not a folder and not a known OPT name (known: {known})")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// A safetensors file is truncated, corrupt or otherwise unreadable.
    #[error("bad safetensors file {path}: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        msg: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name} not found in {location}")]
    MissingTensor {
        /// The tensor name (without the optional `model.` prefix).
        name: String,
        /// The checkpoint folder or file searched.
        location: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name} in {path} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The file it came from.
        path: PathBuf,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        got: Vec<usize>,
    },
    /// A tensor is stored in a dtype this crate does not read.
    #[error("tensor {name} in {path} has unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The file it came from.
        path: PathBuf,
        /// The dtype as safetensors names it.
        dtype: String,
    },
    /// A prompt (plus the tokens to generate) does not fit the model's positions.
    #[error(
        "prompt {row} has {prompt_tokens} tokens and asks for {new_tokens} new ones, \
         but the model has {max_positions} positions"
    )]
    PromptTooLong {
        /// The index of the prompt in its batch.
        row: usize,
        /// Tokens in the prompt (BOS included).
        prompt_tokens: usize,
        /// New tokens requested.
        new_tokens: usize,
        /// `max_position_embeddings` of the model.
        max_positions: usize,
    },
    /// A token id outside the model's vocabulary was given.
    #[error("token id {id} in prompt {row} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The index of the prompt in its batch.
        row: usize,
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A request that cannot be carried out as given (empty batch, bad sampling parameter, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer error ({context}): {msg}")]
    Tokenizer {
        /// What was being done (usually the file path).
        context: String,
        /// The tokenizer's message.
        msg: String,
    },
    /// A kernel rejected its inputs.
    #[error(transparent)]
    Core(#[from] flexgen_core::Error),
    /// The offloading runtime (policy, budgets, disk tier) failed.
    #[error(transparent)]
    Offload(#[from] flexgen_offload::Error),
    /// Compressing a weight, or a packed kernel, failed.
    #[error(transparent)]
    Quant(#[from] flexgen_quant::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A config error for `path` with message `msg`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
