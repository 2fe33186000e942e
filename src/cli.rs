//! Small helpers the example binaries share.

use std::path::{Path, PathBuf};

/// The repository's copy of the real OPT tokenizer (`../shared/data/opt-tokenizer` beside the
/// checkout), used when neither the model folder nor `--tokenizer` provides one.
pub fn bundled_tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/opt-tokenizer")
}

/// FlexGen's `str2bool` for boolean flags that take a value (`--overlap false`): yes/no,
/// true/false, t/f, y/n, 1/0, any case.
pub fn str2bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" | "t" | "y" | "1" => Ok(true),
        "no" | "false" | "f" | "n" | "0" => Ok(false),
        _ => Err(format!(
            "expected a boolean (true/false, yes/no, 1/0), got {s:?}"
        )),
    }
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
