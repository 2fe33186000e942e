//! `OptConfig`: the architecture of an OPT model, read from a Hugging Face `config.json` or
//! taken from FlexGen's model zoo by name.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The architecture of an OPT model, field for field as Hugging Face's `OPTConfig` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    /// Rows of the token embedding (50272 for every OPT; the tokenizer has 50265).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Inner width of the MLP.
    pub ffn_dim: usize,
    /// Number of attention heads; `hidden_size` must be a multiple of it.
    pub num_attention_heads: usize,
    /// Longest sequence (prompt plus generated tokens) the learned positions cover.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Pre-LN (`true`, every OPT but opt-350m) or post-LN (`false`).
    #[serde(default = "default_true")]
    pub do_layer_norm_before: bool,
    /// Drops the final layer norm even for pre-LN models (some converted checkpoints).
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Width of the token embedding; when it differs from `hidden_size` the model has
    /// `project_in` / `project_out` (opt-350m: 512 vs 1024). Defaults to `hidden_size`.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    /// Whether the linear layers have biases.
    #[serde(default = "default_true")]
    pub enable_bias: bool,
    /// Whether the layer norms have a weight and a bias.
    #[serde(default = "default_true")]
    pub layer_norm_elementwise_affine: bool,
    /// Activation of the MLP; OPT uses `"relu"`, the only one supported.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Padding token id (1).
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    /// Beginning-of-sequence token id (2, `</s>`).
    #[serde(default = "default_bos_eos")]
    pub bos_token_id: u32,
    /// End-of-sequence token id (2, `</s>`).
    #[serde(default = "default_bos_eos")]
    pub eos_token_id: u32,
    /// Whether `lm_head` shares the token embedding (always so for OPT).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in (`float16`, `float32`, `bfloat16`), if recorded.
    /// Transformers 5 writes this as `dtype`, older versions as `torch_dtype`.
    #[serde(default, alias = "dtype")]
    pub torch_dtype: Option<String>,
    /// `model_type`, `"opt"` for OPT checkpoints.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_vocab_size() -> usize {
    50272
}
fn default_max_positions() -> usize {
    2048
}
fn default_true() -> bool {
    true
}
fn default_activation() -> String {
    "relu".to_string()
}
fn default_pad() -> u32 {
    1
}
fn default_bos_eos() -> u32 {
    2
}

/// One entry of FlexGen's model zoo.
struct ZooEntry {
    name: &'static str,
    layers: usize,
    heads: usize,
    hidden: usize,
    ffn: usize,
    vocab: usize,
    word_embed_dim: usize,
    pre_ln: bool,
}

const fn zoo(
    name: &'static str,
    (layers, heads, hidden, ffn): (usize, usize, usize, usize),
    vocab: usize,
    word_embed_dim: usize,
    pre_ln: bool,
) -> ZooEntry {
    ZooEntry {
        name,
        layers,
        heads,
        hidden,
        ffn,
        vocab,
        word_embed_dim,
        pre_ln,
    }
}

/// FlexGen's model zoo (`opt_config.py`), plus opt-350m's post-LN layout.
const ZOO: &[ZooEntry] = &[
    zoo("opt-125m", (12, 12, 768, 3072), 50272, 768, true),
    zoo("opt-350m", (24, 16, 1024, 4096), 50272, 512, false),
    zoo("opt-1.3b", (24, 32, 2048, 8192), 50272, 2048, true),
    zoo("opt-2.7b", (32, 32, 2560, 10240), 50272, 2560, true),
    zoo("opt-6.7b", (32, 32, 4096, 16384), 50272, 4096, true),
    zoo("opt-13b", (40, 40, 5120, 20480), 50272, 5120, true),
    zoo("opt-30b", (48, 56, 7168, 28672), 50272, 7168, true),
    zoo("galactica-30b", (48, 56, 7168, 28672), 50000, 7168, true),
    zoo("opt-66b", (64, 72, 9216, 36864), 50272, 9216, true),
    zoo("opt-175b", (96, 96, 12288, 49152), 50272, 12288, true),
    zoo("opt-175b-stage", (24, 96, 12288, 49152), 50272, 12288, true),
    zoo("opt-iml-1.3b", (24, 32, 2048, 8192), 50272, 2048, true),
    zoo("opt-iml-max-1.3b", (24, 32, 2048, 8192), 50272, 2048, true),
    zoo("opt-iml-30b", (48, 56, 7168, 28672), 50272, 7168, true),
    zoo("opt-iml-max-30b", (48, 56, 7168, 28672), 50272, 7168, true),
];

impl OptConfig {
    /// Reads and validates `config.json` (a file, or a folder that holds one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("config.json");
        }
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "config.json",
                path,
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config { msg, .. } => Error::config(&path, msg),
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: OptConfig =
            serde_json::from_str(text).map_err(|e| Error::config("config.json", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config of a FlexGen model-zoo name such as `facebook/opt-1.3b` or `opt-6.7b`
    /// (the `facebook/` prefix is optional). These configs need no files: they serve dummy
    /// weights for benchmarks and the cost model.
    pub fn from_name(name: &str) -> Result<Self> {
        let short = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
        let z = ZOO
            .iter()
            .find(|z| z.name == short)
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                known: Self::zoo_names().join(", "),
            })?;
        let cfg = OptConfig {
            vocab_size: z.vocab,
            hidden_size: z.hidden,
            num_hidden_layers: z.layers,
            ffn_dim: z.ffn,
            num_attention_heads: z.heads,
            max_position_embeddings: 2048,
            do_layer_norm_before: z.pre_ln,
            remove_final_layer_norm: false,
            word_embed_proj_dim: Some(z.word_embed_dim),
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            activation_function: "relu".into(),
            pad_token_id: 1,
            bos_token_id: 2,
            eos_token_id: 2,
            tie_word_embeddings: true,
            torch_dtype: Some("float16".into()),
            model_type: Some("opt".into()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The model-zoo names [`OptConfig::from_name`] knows (without the `facebook/` prefix).
    pub fn zoo_names() -> Vec<&'static str> {
        ZOO.iter().map(|z| z.name).collect()
    }

    /// Checks that the numbers describe a model this crate can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config("config.json", msg));
        if let Some(t) = &self.model_type {
            if t != "opt" {
                return bad(format!("model_type is {t:?}, only \"opt\" is supported"));
            }
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("ffn_dim", self.ffn_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("word_embed_proj_dim", self.word_embed_dim()),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.activation_function != "relu" {
            return bad(format!(
                "activation_function {:?} is not supported (OPT uses \"relu\")",
                self.activation_function
            ));
        }
        if !self.tie_word_embeddings {
            return bad("tie_word_embeddings = false is not supported (OPT ties lm_head to the token embedding)".into());
        }
        if let Some(d) = &self.torch_dtype {
            if !matches!(d.as_str(), "float32" | "float16" | "bfloat16") {
                return bad(format!(
                    "torch_dtype {d:?} is not supported (float32, float16, bfloat16)"
                ));
            }
        }
        Ok(())
    }

    /// Width of the token embedding (`word_embed_proj_dim`, or `hidden_size` when absent).
    pub fn word_embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    /// Whether the model has `project_in` / `project_out` (opt-350m's layout).
    pub fn has_projections(&self) -> bool {
        self.word_embed_dim() != self.hidden_size
    }

    /// Whether the decoder ends with a final layer norm (pre-LN models unless removed).
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of parameters (tied `lm_head` counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let f = self.ffn_dim;
        let b = usize::from(self.enable_bias);
        let ln = if self.layer_norm_elementwise_affine {
            2 * h
        } else {
            0
        };
        let attn = 4 * (h * h + b * h) + ln;
        let mlp = h * f + b * f + f * h + b * h + ln;
        let mut total = self.num_hidden_layers * (attn + mlp);
        total += self.vocab_size * self.word_embed_dim();
        total += (self.max_position_embeddings + 2) * h;
        if self.has_projections() {
            total += 2 * h * self.word_embed_dim();
        }
        if self.has_final_layer_norm() {
            total += ln;
        }
        total
    }

    /// Bytes of KV cache per token per sequence, over all layers, at `bytes_per_value`.
    pub fn kv_cache_bytes_per_token(&self, bytes_per_value: usize) -> usize {
        2 * self.num_hidden_layers * self.hidden_size * bytes_per_value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoo_sizes_match_flexgen() {
        // FlexGen's model_bytes() for opt-30b: 55.803 GiB at 2 bytes per parameter (it counts
        // biases for the 4h-wide fc1 and both position/token tables).
        let cfg = OptConfig::from_name("facebook/opt-30b").unwrap();
        let gib = (cfg.num_parameters() * 2) as f64 / (1u64 << 30) as f64;
        assert!((gib - 55.80).abs() < 0.05, "opt-30b size {gib}");
        let cfg = OptConfig::from_name("opt-1.3b").unwrap();
        assert_eq!(cfg.head_dim(), 64);
        assert_eq!(cfg.kv_cache_bytes_per_token(2), 192 * 1024);
    }

    #[test]
    fn opt_350m_is_post_ln_with_projections() {
        let cfg = OptConfig::from_name("facebook/opt-350m").unwrap();
        assert!(!cfg.do_layer_norm_before);
        assert!(cfg.has_projections());
        assert!(!cfg.has_final_layer_norm());
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = OptConfig::from_name("facebook/opt-7b")
            .unwrap_err()
            .to_string();
        assert!(err.contains("opt-7b") && err.contains("opt-6.7b"), "{err}");
    }

    #[test]
    fn reads_hf_fields() {
        let json = r#"{"model_type":"opt","vocab_size":50272,"hidden_size":16,"num_hidden_layers":2,
            "ffn_dim":32,"num_attention_heads":2,"max_position_embeddings":64,
            "do_layer_norm_before":false,"word_embed_proj_dim":8,"enable_bias":true,
            "_remove_final_layer_norm":false,"torch_dtype":"float16","activation_function":"relu",
            "layer_norm_elementwise_affine":true}"#;
        let cfg = OptConfig::from_json(json).unwrap();
        assert_eq!(cfg.word_embed_dim(), 8);
        assert!(cfg.has_projections());
        assert_eq!(cfg.torch_dtype.as_deref(), Some("float16"));
        let v5 = json.replace("torch_dtype", "dtype");
        assert_eq!(
            OptConfig::from_json(&v5).unwrap().torch_dtype.as_deref(),
            Some("float16")
        );
    }

    #[test]
    fn rejects_bad_configs() {
        for (json, needle) in [
            ("{", "EOF"),
            (r#"{"hidden_size":16}"#, "num_hidden_layers"),
            (
                r#"{"hidden_size":15,"num_hidden_layers":1,"ffn_dim":4,"num_attention_heads":2}"#,
                "multiple",
            ),
            (
                r#"{"hidden_size":16,"num_hidden_layers":1,"ffn_dim":4,"num_attention_heads":2,"activation_function":"gelu"}"#,
                "gelu",
            ),
            (
                r#"{"model_type":"llama","hidden_size":16,"num_hidden_layers":1,"ffn_dim":4,"num_attention_heads":2}"#,
                "llama",
            ),
        ] {
            let err = OptConfig::from_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
