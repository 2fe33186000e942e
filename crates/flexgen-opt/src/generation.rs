//! Batched generation: left-padded prompts, a KV cache, greedy or seeded sampling, stop tokens
//! and stop strings, rows that finish early dropped from the batch, and a per-token callback.

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv_cache::BatchState;
use crate::model::{LogitsFor, OptModel};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, OptTokenizer, PAD_TOKEN_ID};

/// What to generate and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// New tokens per prompt at most.
    pub max_new_tokens: usize,
    /// 0 = greedy (the default); otherwise the softmax temperature.
    pub temperature: f32,
    /// Sample among the k most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f32>,
    /// Seed of the sampler (row `i` uses `seed + i`), so runs are repeatable.
    pub seed: u64,
    /// Token ids that end a row (kept as its last id). Default: `</s>` (2).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a row; the text is cut before the first match.
    pub stop_strings: Vec<String>,
    /// Never produce ids at or above this. `None`: the tokenizer's size when one is given
    /// (OPT's embedding has 50272 rows but only 50265 tokens), else the model's vocabulary.
    pub vocab_limit: Option<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_token_ids: vec![2],
            stop_strings: Vec::new(),
            vocab_limit: None,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens, stopping at `</s>`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig {
            max_new_tokens,
            ..Default::default()
        }
    }

    /// Sets the temperature (0 = greedy).
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    /// Sets top-k.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }

    /// Sets top-p.
    pub fn with_top_p(mut self, p: f32) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Adds a stop string.
    pub fn with_stop_string(mut self, s: impl Into<String>) -> Self {
        self.stop_strings.push(s.into());
        self
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It produced `max_new_tokens` tokens.
    Length,
    /// It produced a stop token id.
    StopToken,
    /// Its text reached a stop string.
    StopString,
    /// The caller stopped it.
    Cancelled,
}

/// The result for one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationOutput {
    /// New token ids (a final stop token included).
    pub token_ids: Vec<u32>,
    /// Their text (empty without a tokenizer), cut before a stop string.
    pub text: String,
    /// Why the row stopped.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt (BOS included, padding not).
    pub prompt_tokens: usize,
}

/// One new token of one row, handed to the streaming callback.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    /// Index of the prompt in the batch.
    pub row: usize,
    /// The token id.
    pub token_id: u32,
    /// Index of this token among the row's new tokens.
    pub index: usize,
    /// New text that can be shown now (may be empty: part of a character, a stop token, or text
    /// held back because it may begin a stop string).
    pub text: &'a str,
    /// `Some` when this token ended the row.
    pub finished: Option<FinishReason>,
}

/// What the streaming callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Stop this row (finish reason `Cancelled`); the others go on.
    StopRow,
    /// Stop every row.
    StopAll,
}

struct RowState {
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    decoder: IncrementalDecoder,
    rng: StdRng,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
}

/// Checks prompts against the model before any work.
fn validate(
    model: &OptModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&OptTokenizer>,
) -> Result<()> {
    let mc = model.config();
    cfg.sampling().validate()?;
    if prompts.is_empty() {
        return Err(Error::InvalidRequest("no prompts given".into()));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(Error::InvalidRequest(
            "stop strings need a tokenizer to decode text".into(),
        ));
    }
    if cfg.stop_strings.iter().any(String::is_empty) {
        return Err(Error::InvalidRequest("a stop string is empty".into()));
    }
    if cfg.vocab_limit == Some(0) {
        return Err(Error::InvalidRequest("vocab_limit is 0".into()));
    }
    for (row, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "prompt {row} has no tokens (OPT prompts start with </s>)"
            )));
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= mc.vocab_size) {
            return Err(Error::TokenOutOfRange {
                row,
                id,
                vocab_size: mc.vocab_size,
            });
        }
        // The last new token is sampled, never fed back: it needs no position.
        if p.len() + cfg.max_new_tokens.saturating_sub(1) > mc.max_position_embeddings {
            return Err(Error::PromptTooLong {
                row,
                prompt_tokens: p.len(),
                new_tokens: cfg.max_new_tokens,
                max_positions: mc.max_position_embeddings,
            });
        }
    }
    Ok(())
}

/// Length of the longest proper prefix of any stop string that `text` ends with.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for stop in stops {
        for (k, _) in stop.char_indices().skip(1) {
            if k > best && text.ends_with(&stop[..k]) {
                best = k;
            }
        }
    }
    best
}

/// Generates continuations of token-id prompts (BOS included) as one left-padded batch.
///
/// `on_token` sees every new token of every row as soon as it is sampled. With a tokenizer the
/// outputs carry text and stop strings work.
pub fn generate(
    model: &OptModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&OptTokenizer>,
    mut on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
) -> Result<Vec<GenerationOutput>> {
    validate(model, prompts, cfg, tokenizer)?;
    let mc = model.config();
    let n = prompts.len();
    let vocab_limit = cfg
        .vocab_limit
        .or(tokenizer.map(OptTokenizer::vocab_size))
        .unwrap_or(mc.vocab_size)
        .min(mc.vocab_size);
    let sampling = cfg.sampling();
    let mut rows: Vec<RowState> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| RowState {
            ids: Vec::with_capacity(cfg.max_new_tokens),
            text: String::new(),
            emitted: 0,
            decoder: IncrementalDecoder::default(),
            rng: StdRng::seed_from_u64(cfg.seed.wrapping_add(i as u64)),
            finish: None,
            prompt_tokens: p.len(),
        })
        .collect();
    if cfg.max_new_tokens == 0 {
        return Ok(finish_outputs(rows, FinishReason::Length));
    }

    // Left-pad to a common length.
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut tokens = vec![PAD_TOKEN_ID; n * t0];
    let mut valid = vec![false; n * t0];
    for (b, p) in prompts.iter().enumerate() {
        let start = b * t0 + t0 - p.len();
        tokens[start..start + p.len()].copy_from_slice(p);
        valid[start..start + p.len()]
            .iter_mut()
            .for_each(|v| *v = true);
    }
    let mut state = BatchState::new(mc, n, t0 + cfg.max_new_tokens - 1);
    let mut logits = Vec::new();
    model.forward(
        &mut state,
        &tokens,
        &valid,
        t0,
        LogitsFor::Last,
        &mut logits,
    )?;

    let vocab = mc.vocab_size;
    let mut sampler = Sampler::default();
    let mut active: Vec<usize> = (0..n).collect();
    let mut next = Vec::with_capacity(n);
    let mut keep = Vec::with_capacity(n);
    let mut all_valid = Vec::with_capacity(n);
    let mut stop_all = false;
    for step in 0..cfg.max_new_tokens {
        next.clear();
        keep.clear();
        for (ci, &r) in active.iter().enumerate() {
            let row = &mut rows[r];
            let id = if stop_all {
                row.finish = Some(FinishReason::Cancelled);
                keep.push(false);
                continue;
            } else {
                sampler.sample(
                    &logits[ci * vocab..(ci + 1) * vocab],
                    vocab_limit,
                    &sampling,
                    &mut row.rng,
                )
            };
            row.ids.push(id);
            if cfg.stop_token_ids.contains(&id) {
                row.finish = Some(FinishReason::StopToken);
            } else if let Some(tok) = tokenizer {
                let delta = row.decoder.step(tok, id)?;
                let search_from = row
                    .text
                    .len()
                    .saturating_sub(cfg.stop_strings.iter().map(String::len).max().unwrap_or(0));
                row.text.push_str(&delta);
                let hit = cfg
                    .stop_strings
                    .iter()
                    .filter_map(|s| {
                        let from = floor_char_boundary(&row.text, search_from);
                        row.text[from..].find(s.as_str()).map(|p| p + from)
                    })
                    .min();
                if let Some(p) = hit {
                    row.text.truncate(p);
                    row.finish = Some(FinishReason::StopString);
                }
            }
            if row.finish.is_none() && step + 1 == cfg.max_new_tokens {
                if let Some(tok) = tokenizer {
                    let rest = row.decoder.flush(tok)?;
                    row.text.push_str(&rest);
                }
                row.finish = Some(FinishReason::Length);
            }
            let safe = if row.finish.is_some() {
                row.text.len()
            } else {
                row.text.len() - held_back(&row.text, &cfg.stop_strings)
            };
            let start = row.emitted.min(safe);
            let event = TokenEvent {
                row: r,
                token_id: id,
                index: row.ids.len() - 1,
                text: &row.text[start..safe],
                finished: row.finish,
            };
            let flow = on_token(&event);
            row.emitted = safe.max(row.emitted);
            match flow {
                Flow::Continue => {}
                Flow::StopRow => {
                    row.finish.get_or_insert(FinishReason::Cancelled);
                }
                Flow::StopAll => {
                    row.finish.get_or_insert(FinishReason::Cancelled);
                    stop_all = true;
                }
            }
            keep.push(row.finish.is_none());
            if row.finish.is_none() {
                next.push(id);
            }
        }
        if next.is_empty() {
            break;
        }
        if keep.iter().any(|k| !k) {
            state.retain_rows(&keep)?;
            let mut i = 0;
            active.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        all_valid.clear();
        all_valid.resize(next.len(), true);
        model.forward(
            &mut state,
            &next,
            &all_valid,
            1,
            LogitsFor::Last,
            &mut logits,
        )?;
    }
    Ok(finish_outputs(rows, FinishReason::Length))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn finish_outputs(rows: Vec<RowState>, default: FinishReason) -> Vec<GenerationOutput> {
    rows.into_iter()
        .map(|r| GenerationOutput {
            token_ids: r.ids,
            text: r.text,
            finish_reason: r.finish.unwrap_or(default),
            prompt_tokens: r.prompt_tokens,
        })
        .collect()
}
