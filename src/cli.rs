//! Small helpers the example binaries share.

use std::path::{Path, PathBuf};

/// The repository's copy of the real OPT tokenizer (`../shared/data/opt-tokenizer` beside the
/// checkout), used when neither the model folder nor `--tokenizer` provides one.
pub fn bundled_tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/opt-tokenizer")
}

fn has_tokenizer(dir: &Path) -> bool {
    dir.join("tokenizer.json").exists()
        || (dir.join("vocab.json").exists() && dir.join("merges.txt").exists())
}

/// Where to read the tokenizer from: `explicit` if given, else the model folder, else
/// `$FLEXGEN_TOKENIZER`, else the bundled copy. Returns the folder and whether it was a fallback.
pub fn resolve_tokenizer_dir(model_dir: &Path, explicit: Option<&Path>) -> (PathBuf, bool) {
    if let Some(dir) = explicit {
        return (dir.to_path_buf(), false);
    }
    if has_tokenizer(model_dir) {
        return (model_dir.to_path_buf(), false);
    }
    if let Some(env) = std::env::var_os("FLEXGEN_TOKENIZER") {
        return (PathBuf::from(env), true);
    }
    (bundled_tokenizer_dir(), true)
}
