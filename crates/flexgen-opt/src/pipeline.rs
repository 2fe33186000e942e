//! `Pipeline`: a model and its tokenizer, turning text prompts into text continuations.

use std::path::Path;

use crate::error::Result;
use crate::generation::{generate, Flow, GenerationConfig, GenerationOutput, TokenEvent};
use crate::model::{LoadOptions, OptModel};
use crate::tokenizer::OptTokenizer;

/// An OPT model with its tokenizer.
#[derive(Debug, Clone)]
pub struct Pipeline {
    model: OptModel,
    tokenizer: OptTokenizer,
}

impl Pipeline {
    /// Loads model and tokenizer from one Hugging Face folder.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        Self::load(dir, dir, &LoadOptions::default())
    }

    /// Loads the model from `model_dir` and the tokenizer from `tokenizer_dir`.
    pub fn load(
        model_dir: impl AsRef<Path>,
        tokenizer_dir: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let model = OptModel::load(model_dir, options)?;
        let tokenizer = OptTokenizer::from_dir(tokenizer_dir)?;
        Ok(Pipeline { model, tokenizer })
    }

    /// Pairs a model with a tokenizer.
    pub fn new(model: OptModel, tokenizer: OptTokenizer) -> Self {
        Pipeline { model, tokenizer }
    }

    /// The model.
    pub fn model(&self) -> &OptModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &OptTokenizer {
        &self.tokenizer
    }

    /// Encodes prompts (with BOS) for [`generate`].
    pub fn encode_all(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| self.tokenizer.encode(p)).collect()
    }

    /// Generates a continuation of every prompt, all in one left-padded batch.
    pub fn generate(
        &self,
        prompts: &[&str],
        cfg: &GenerationConfig,
    ) -> Result<Vec<GenerationOutput>> {
        self.generate_stream(prompts, cfg, |_| Flow::Continue)
    }

    /// Like [`Pipeline::generate`], calling `on_token` with every new token and its text as
    /// soon as it is produced.
    pub fn generate_stream(
        &self,
        prompts: &[&str],
        cfg: &GenerationConfig,
        on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<Vec<GenerationOutput>> {
        let ids = self.encode_all(prompts)?;
        generate(&self.model, &ids, cfg, Some(&self.tokenizer), on_token)
    }
}
