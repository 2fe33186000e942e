//! Batched generation: left-padded prompts, a KV cache, greedy or seeded sampling, stop tokens
//! and stop strings, rows that finish early dropped from the batch, and a per-token callback.

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::config::OptConfig;
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

    /// This config for each of `n` rows, row `i` seeded with `seed + i` (what [`generate`]
    /// gives [`generate_rows`], so rows of one request sample independently).
    pub fn per_row(&self, n: usize) -> Vec<GenerationConfig> {
        (0..n)
            .map(|i| GenerationConfig {
                seed: self.seed.wrapping_add(i as u64),
                ..self.clone()
            })
            .collect()
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

/// Checks a config before any work: sampling values, stop strings, vocabulary limit.
pub fn validate_config(cfg: &GenerationConfig, tokenizer: Option<&OptTokenizer>) -> Result<()> {
    cfg.sampling().validate()?;
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
    Ok(())
}

/// Checks prompt `row` (ids with BOS) against the model: not empty, ids in the vocabulary, and
/// room for it plus `cfg.max_new_tokens` new tokens in `room` positions.
pub(crate) fn validate_prompt(
    mc: &OptConfig,
    row: usize,
    prompt: &[u32],
    cfg: &GenerationConfig,
    room: usize,
) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "prompt {row} has no tokens (OPT prompts start with </s>)"
        )));
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= mc.vocab_size) {
        return Err(Error::TokenOutOfRange {
            row,
            id,
            vocab_size: mc.vocab_size,
        });
    }
    // The last new token is sampled, never fed back: it needs no position.
    if prompt.len() + cfg.max_new_tokens.saturating_sub(1) > room {
        return Err(Error::PromptTooLong {
            row,
            prompt_tokens: prompt.len(),
            new_tokens: cfg.max_new_tokens,
            max_positions: room,
        });
    }
    Ok(())
}

/// Checks prompts, each against its own config, before any work (for a model of `mc`).
pub(crate) fn validate_rows(
    mc: &OptConfig,
    prompts: &[Vec<u32>],
    cfgs: &[GenerationConfig],
    tokenizer: Option<&OptTokenizer>,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::InvalidRequest("no prompts given".into()));
    }
    if cfgs.len() != prompts.len() {
        return Err(Error::InvalidRequest(format!(
            "{} configs for {} prompts",
            cfgs.len(),
            prompts.len()
        )));
    }
    for (row, (p, cfg)) in prompts.iter().zip(cfgs).enumerate() {
        validate_config(cfg, tokenizer)?;
        validate_prompt(mc, row, p, cfg, mc.max_position_embeddings)?;
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

/// One sequence's decoding: its seeded sampler, the new ids, their text, stop ids and stop
/// strings, and how much text was already streamed (text that may begin a stop string is held
/// back). Shared by [`generate_rows`] and [`crate::Session`].
pub(crate) struct RowDecoder {
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    decoder: IncrementalDecoder,
    rng: StdRng,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    vocab_limit: usize,
    sampling: SamplingParams,
}

impl RowDecoder {
    /// A row with a `prompt_tokens`-token prompt following `cfg` (seeded with `cfg.seed`); it
    /// is finished from the start when `cfg.max_new_tokens` is 0.
    pub(crate) fn new(
        mc: &OptConfig,
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
        prompt_tokens: usize,
    ) -> Self {
        RowDecoder {
            ids: Vec::with_capacity(cfg.max_new_tokens),
            text: String::new(),
            emitted: 0,
            decoder: IncrementalDecoder::default(),
            rng: StdRng::seed_from_u64(cfg.seed),
            finish: (cfg.max_new_tokens == 0).then_some(FinishReason::Length),
            prompt_tokens,
            vocab_limit: cfg
                .vocab_limit
                .or(tokenizer.map(OptTokenizer::vocab_size))
                .unwrap_or(mc.vocab_size)
                .min(mc.vocab_size),
            sampling: cfg.sampling(),
        }
    }

    /// Why the row ended, `None` while it goes on.
    pub(crate) fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Ends the row as cancelled (unless it already ended).
    pub(crate) fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
    }

    /// Samples the next token from the row's `logits`, decodes it, checks the stops, streams
    /// the event (as row `row`) to `on_token` and applies its answer: [`Flow::StopRow`] and
    /// [`Flow::StopAll`] end the row as cancelled. Returns the token and the callback's answer.
    pub(crate) fn step<F: FnMut(&TokenEvent<'_>) -> Flow>(
        &mut self,
        row: usize,
        logits: &[f32],
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
        sampler: &mut Sampler,
        on_token: &mut F,
    ) -> Result<(u32, Flow)> {
        let id = sampler.sample(logits, self.vocab_limit, &self.sampling, &mut self.rng);
        self.ids.push(id);
        if cfg.stop_token_ids.contains(&id) {
            self.finish = Some(FinishReason::StopToken);
        } else if let Some(tok) = tokenizer {
            let delta = self.decoder.step(tok, id)?;
            let search_from = self
                .text
                .len()
                .saturating_sub(cfg.stop_strings.iter().map(String::len).max().unwrap_or(0));
            self.text.push_str(&delta);
            let from = floor_char_boundary(&self.text, search_from);
            let hit = cfg
                .stop_strings
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| p + from))
                .min();
            if let Some(p) = hit {
                self.text.truncate(p);
                self.finish = Some(FinishReason::StopString);
            }
        }
        if self.finish.is_none() && self.ids.len() == cfg.max_new_tokens {
            if let Some(tok) = tokenizer {
                let rest = self.decoder.flush(tok)?;
                self.text.push_str(&rest);
            }
            self.finish = Some(FinishReason::Length);
        }
        let safe = if self.finish.is_some() {
            self.text.len()
        } else {
            self.text.len() - held_back(&self.text, &cfg.stop_strings)
        };
        let start = self.emitted.min(safe);
        let event = TokenEvent {
            row,
            token_id: id,
            index: self.ids.len() - 1,
            text: &self.text[start..safe],
            finished: self.finish,
        };
        let flow = on_token(&event);
        self.emitted = safe.max(self.emitted);
        if flow != Flow::Continue {
            self.cancel();
        }
        Ok((id, flow))
    }

    /// The row's result; `default` when it never ended (the batch stopped first).
    pub(crate) fn into_output(self, default: FinishReason) -> GenerationOutput {
        GenerationOutput {
            token_ids: self.ids,
            text: self.text,
            finish_reason: self.finish.unwrap_or(default),
            prompt_tokens: self.prompt_tokens,
        }
    }
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
    on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
) -> Result<Vec<GenerationOutput>> {
    generate_rows(
        model,
        prompts,
        &cfg.per_row(prompts.len()),
        tokenizer,
        on_token,
    )
}

/// Like [`generate`], but row `i` follows its own config `cfgs[i]` (length, sampling, stops;
/// its sampler is seeded with `cfgs[i].seed` as given), so requests with different settings
/// share one batch, as a server batching independent requests needs.
pub fn generate_rows(
    model: &OptModel,
    prompts: &[Vec<u32>],
    cfgs: &[GenerationConfig],
    tokenizer: Option<&OptTokenizer>,
    mut on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
) -> Result<Vec<GenerationOutput>> {
    validate_rows(model.config(), prompts, cfgs, tokenizer)?;
    let mc = model.config();
    let mut rows: Vec<RowDecoder> = prompts
        .iter()
        .zip(cfgs)
        .map(|(p, cfg)| RowDecoder::new(mc, cfg, tokenizer, p.len()))
        .collect();
    // Rows asking for no tokens are done already and never enter the batch.
    let mut active: Vec<usize> = (0..rows.len())
        .filter(|&r| rows[r].finish_reason().is_none())
        .collect();
    if active.is_empty() {
        return Ok(finish_outputs(rows, FinishReason::Length));
    }
    let n = active.len();
    let max_new = active
        .iter()
        .map(|&r| cfgs[r].max_new_tokens)
        .max()
        .unwrap_or(0);

    // Left-pad to a common length.
    let t0 = active.iter().map(|&r| prompts[r].len()).max().unwrap_or(0);
    let mut tokens = vec![PAD_TOKEN_ID; n * t0];
    let mut valid = vec![false; n * t0];
    for (b, &r) in active.iter().enumerate() {
        let p = &prompts[r];
        let start = b * t0 + t0 - p.len();
        tokens[start..start + p.len()].copy_from_slice(p);
        valid[start..start + p.len()]
            .iter_mut()
            .for_each(|v| *v = true);
    }
    let mut state = BatchState::new(mc, n, t0 + max_new - 1);
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
    let mut next = Vec::with_capacity(n);
    let mut keep = Vec::with_capacity(n);
    let mut all_valid = Vec::with_capacity(n);
    let mut stop_all = false;
    for _ in 0..max_new {
        next.clear();
        keep.clear();
        for (ci, &r) in active.iter().enumerate() {
            let row = &mut rows[r];
            if stop_all {
                row.cancel();
                keep.push(false);
                continue;
            }
            let (id, flow) = row.step(
                r,
                &logits[ci * vocab..(ci + 1) * vocab],
                &cfgs[r],
                tokenizer,
                &mut sampler,
                &mut on_token,
            )?;
            stop_all |= flow == Flow::StopAll;
            let done = row.finish_reason().is_some();
            keep.push(!done);
            if !done {
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

fn finish_outputs(rows: Vec<RowDecoder>, default: FinishReason) -> Vec<GenerationOutput> {
    rows.into_iter().map(|r| r.into_output(default)).collect()
}
