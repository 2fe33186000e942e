//! Conversations that keep their KV cache between calls, so each turn prefills only new text.
//!
//! [`Session`] is the primitive: a batch-1 KV cache plus the token ids it holds. Each
//! [`Session::generate`] call gets the *whole* prompt (for a chat, the whole conversation so far);
//! the session keeps the longest prefix it already holds, forgets the rest of its cache and
//! prefills only the remaining tokens. Because the prompt is always given in full, the result is
//! the same as generating from scratch (same tokens, same positions), only faster; a caller that
//! edits, drops or replaces earlier text simply gets less reuse.
//!
//! [`ChatSession`] builds FlexGen's chatbot on it: the [`crate::chat`] template (preamble, then
//! `Human: ...` / `Assistant: ...` lines), replies cut at the end of their line, and the oldest
//! turns dropped (the preamble kept) when the conversation outgrows the model's positions.
//!
//! ```no_run
//! use flexgen_opt::{ChatSession, Flow, GenerationConfig, OptModel, OptTokenizer};
//!
//! # fn main() -> flexgen_opt::Result<()> {
//! let model = OptModel::from_pretrained("path/to/opt-1.3b")?;
//! let tok = OptTokenizer::from_dir("path/to/opt-1.3b")?;
//! let mut chat = ChatSession::new(&model, None);
//! let cfg = GenerationConfig::greedy(96).with_temperature(0.7);
//! for question in ["Hi! Who are you?", "What is the capital of France?"] {
//!     let turn = chat.send(&model, &tok, question, &cfg, |ev| {
//!         print!("{}", ev.text); // streamed as it is generated
//!         Flow::Continue
//!     })?;
//!     println!("\n({} tokens reused, {} prefilled)", turn.reused_tokens, turn.prefilled_tokens);
//! }
//! # Ok(())
//! # }
//! ```

use crate::chat::{render, ChatMessage, Role};
use crate::config::OptConfig;
use crate::engine::OptEngine;
use crate::error::{Error, Result};
use crate::generation::{
    validate_config, validate_prompt, FinishReason, Flow, GenerationConfig, GenerationOutput,
    RowDecoder, TokenEvent,
};
use crate::kv_cache::BatchState;
use crate::model::{LogitsFor, OptModel};
use crate::sampling::Sampler;
use crate::tokenizer::OptTokenizer;

/// A batch-1 KV cache that lives across [`Session::generate`] calls and reuses the longest
/// prefix of each new prompt that it already holds.
///
/// A session belongs to the model it was made for (calls with a model of another architecture
/// are rejected). It holds no reference to the model, so it can be stored anywhere (a server
/// keeps one per conversation).
#[derive(Debug)]
pub struct Session {
    config: OptConfig,
    state: BatchState,
    /// The tokens whose keys and values are in `state`, in order.
    ids: Vec<u32>,
    logits: Vec<f32>,
    sampler: Sampler,
}

/// The result of one [`Session::generate`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOutput {
    /// The new tokens and their text, as [`crate::generate`] returns them.
    pub output: GenerationOutput,
    /// Prompt tokens whose cache was kept from earlier calls.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model in this call.
    pub prefilled_tokens: usize,
}

impl Session {
    /// An empty session that can hold the model's full context (`max_position_embeddings`).
    ///
    /// The cache is allocated zeroed, so memory the conversation has not reached yet is not
    /// touched.
    pub fn new(model: &OptModel) -> Self {
        Self::with_capacity(model, model.config().max_position_embeddings)
    }

    /// An empty session holding at most `capacity` tokens (clamped to the model's positions),
    /// to bound its memory.
    pub fn with_capacity(model: &OptModel, capacity: usize) -> Self {
        Self::for_config(model.config(), capacity)
    }

    /// An empty session for a model of `config` holding at most `capacity` tokens.
    fn for_config(config: &OptConfig, capacity: usize) -> Self {
        let config = config.clone();
        let capacity = capacity.min(config.max_position_embeddings);
        Session {
            state: BatchState::new(&config, 1, capacity),
            config,
            ids: Vec::new(),
            logits: Vec::new(),
            sampler: Sampler::default(),
        }
    }

    /// Tokens the session can hold: a prompt plus all its new tokens but the last must fit.
    pub fn capacity(&self) -> usize {
        self.state.capacity()
    }

    /// The tokens whose cache the session holds (the last prompt and the new tokens fed back;
    /// the very last sampled token is never fed back, so it is not among them).
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }

    /// How many tokens of `prompt` a [`Session::generate`] call would reuse from the cache.
    pub fn reusable_prefix(&self, prompt: &[u32]) -> usize {
        let common = self
            .ids
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // The last prompt token is always run again: its logits give the first new token.
        common.min(prompt.len().saturating_sub(1))
    }

    /// Forgets everything (the cache memory is kept for reuse).
    pub fn clear(&mut self) {
        self.state.truncate(0);
        self.ids.clear();
    }

    /// Generates a continuation of `prompt` (token ids, BOS included), reusing the cache of the
    /// longest prefix the session already holds and prefilling only the rest.
    ///
    /// Streaming, sampling, stops and the callback's [`Flow`] work as in [`crate::generate`]
    /// (events have `row` 0; [`Flow::StopRow`] and [`Flow::StopAll`] both end the reply). The
    /// sampler is seeded with `cfg.seed` on every call. Afterwards the session holds `prompt`
    /// followed by the new tokens fed back. On error the session is cleared.
    pub fn generate(
        &mut self,
        model: &OptModel,
        prompt: &[u32],
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
        mut on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<SessionOutput> {
        self.check(model, prompt, cfg, tokenizer)?;
        let reused = self.reusable_prefix(prompt);
        let prefilled = prompt.len() - reused;
        let mut row = RowDecoder::new(model.config(), cfg, tokenizer, prompt.len());
        if cfg.max_new_tokens == 0 {
            return Ok(SessionOutput {
                output: row.into_output(FinishReason::Length),
                reused_tokens: 0,
                prefilled_tokens: 0,
            });
        }
        let result = self.run(
            model,
            prompt,
            reused,
            cfg,
            tokenizer,
            &mut row,
            &mut on_token,
        );
        if let Err(e) = result {
            self.clear();
            return Err(e);
        }
        Ok(SessionOutput {
            output: row.into_output(FinishReason::Length),
            reused_tokens: reused,
            prefilled_tokens: prefilled,
        })
    }

    /// Rejects a call before any work: another model, bad settings, a prompt that does not fit.
    fn check(
        &self,
        model: &OptModel,
        prompt: &[u32],
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
    ) -> Result<()> {
        if model.config() != &self.config {
            return Err(Error::InvalidRequest(
                "session used with a model other than the one it was made for".into(),
            ));
        }
        validate_config(cfg, tokenizer)?;
        validate_prompt(&self.config, 0, prompt, cfg, self.capacity())?;
        Ok(())
    }

    /// Prefills `prompt[reused..]` and decodes into `row` (the session may be left inconsistent
    /// on error; the caller clears it).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        model: &OptModel,
        prompt: &[u32],
        reused: usize,
        cfg: &GenerationConfig,
        tokenizer: Option<&OptTokenizer>,
        row: &mut RowDecoder,
        on_token: &mut impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<()> {
        self.state.truncate(reused);
        self.ids.truncate(reused);
        let new = &prompt[reused..];
        let valid = vec![true; new.len()];
        model.forward(
            &mut self.state,
            new,
            &valid,
            new.len(),
            LogitsFor::Last,
            &mut self.logits,
        )?;
        self.ids.extend_from_slice(new);
        loop {
            let (id, _) = row.step(0, &self.logits, cfg, tokenizer, &mut self.sampler, on_token)?;
            // A callback that says stop has already ended the row.
            if row.finish_reason().is_some() {
                return Ok(());
            }
            model.forward(
                &mut self.state,
                &[id],
                &[true],
                1,
                LogitsFor::Last,
                &mut self.logits,
            )?;
            self.ids.push(id);
        }
    }
}

/// The result of one [`ChatSession::send`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChatReply {
    /// The reply as recorded in the conversation: the text up to the end of its line, trimmed.
    pub text: String,
    /// The raw generation result (untrimmed text, token ids, finish reason).
    pub output: GenerationOutput,
    /// Earlier exchanges (a human turn and its reply) dropped in this call to make room.
    pub dropped_turns: usize,
    /// The new-token limit actually used: the one asked for, or less when even the preamble
    /// and this message alone leave less room.
    pub max_new_tokens: usize,
    /// Conversation tokens whose cache was kept from the previous turn.
    pub reused_tokens: usize,
    /// Conversation tokens run through the model in this turn.
    pub prefilled_tokens: usize,
}

/// FlexGen's chatbot conversation over a [`Session`]: a preamble, `Human:` / `Assistant:`
/// turns, replies that end at the end of their line, and the KV cache kept across turns.
///
/// On an offloaded engine ([`ChatSession::for_engine`], [`ChatSession::send_engine`]) the
/// offloading runtime owns the cache only for the duration of one call, so every turn prefills
/// the whole (kept) conversation, as FlexGen's chatbot does; the reply is the same.
///
/// When the next prompt plus the reply would outgrow the session, the oldest exchanges are
/// dropped (the preamble is kept) and the cache is rebuilt from the preamble on; the
/// [`ChatReply`] says how many were dropped.
#[derive(Debug)]
pub struct ChatSession {
    /// `None`: [`crate::chat::DEFAULT_PREAMBLE`].
    system: Option<String>,
    /// Completed exchanges: user, assistant, user, assistant, ...
    turns: Vec<ChatMessage>,
    session: Session,
    /// Tokens a prompt plus its reply may span.
    capacity: usize,
    reuse_cache: bool,
}

impl ChatSession {
    /// A new conversation for `model`; `system` replaces FlexGen's preamble when given.
    pub fn new(model: &OptModel, system: Option<String>) -> Self {
        Self::with_session(Session::new(model), system)
    }

    /// A new conversation over an existing (possibly smaller) session.
    pub fn with_session(session: Session, system: Option<String>) -> Self {
        ChatSession {
            system,
            turns: Vec::new(),
            capacity: session.capacity(),
            session,
            reuse_cache: true,
        }
    }

    /// A new conversation for either engine: over a [`Session`] (KV reuse) in memory; for an
    /// offloaded engine, with no cache of its own (each turn recomputes the conversation).
    pub fn for_engine(engine: &OptEngine, system: Option<String>) -> Self {
        match engine {
            OptEngine::InMemory(model) => Self::new(model, system),
            OptEngine::Offloaded(model) => {
                let config = model.config();
                let mut chat = Self::with_session(Session::for_config(config, 0), system);
                chat.capacity = config.max_position_embeddings;
                chat.reuse_cache = false;
                chat
            }
        }
    }

    /// Tokens a turn's prompt plus its reply may span (the model's positions, or the session's
    /// smaller capacity); older exchanges are dropped beyond it.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Turns KV reuse across turns on (the default) or off (every turn recomputes the whole
    /// conversation, as FlexGen's chatbot does; for comparisons).
    pub fn set_reuse_cache(&mut self, on: bool) {
        self.reuse_cache = on;
    }

    /// The conversation so far: the system message (when one replaced the preamble), then the
    /// human and assistant turns still kept.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut out: Vec<ChatMessage> = self
            .system
            .iter()
            .map(|s| ChatMessage::new(Role::System, s.clone()))
            .collect();
        out.extend(self.turns.iter().cloned());
        out
    }

    /// The session underneath (to inspect its tokens or capacity).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Starts the conversation over (the preamble's cache stays and is reused).
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    /// The conversation plus `user`'s turn as prompt ids, dropping the oldest exchanges until
    /// the prompt and `max_new_tokens` fit. Returns the ids, the exchanges dropped and the
    /// new-token limit that fits (less than asked only when no exchange is left to drop).
    fn fit(
        &self,
        tokenizer: &OptTokenizer,
        user: &str,
        max_new_tokens: usize,
    ) -> Result<(Vec<u32>, usize, usize)> {
        let capacity = self.capacity;
        let mut dropped = 0;
        loop {
            let mut msgs: Vec<ChatMessage> = self
                .system
                .iter()
                .map(|s| ChatMessage::new(Role::System, s.clone()))
                .collect();
            msgs.extend(self.turns[2 * dropped..].iter().cloned());
            msgs.push(ChatMessage::new(Role::User, user));
            let ids = tokenizer.encode(&render(&msgs))?;
            if ids.len() + max_new_tokens.saturating_sub(1) <= capacity {
                return Ok((ids, dropped, max_new_tokens));
            }
            if 2 * dropped >= self.turns.len() {
                // Only the preamble and this message are left: shorten the reply instead.
                if ids.len() <= capacity {
                    let room = capacity + 1 - ids.len();
                    return Ok((ids, dropped, room));
                }
                return Err(Error::PromptTooLong {
                    row: 0,
                    prompt_tokens: ids.len(),
                    new_tokens: max_new_tokens,
                    max_positions: capacity,
                });
            }
            dropped += 1;
        }
    }

    /// The prompt ids of the conversation plus `user` (already trimmed), the settings of the
    /// reply (new-token limit that fits, `"\n"` stop added) and the exchanges to drop.
    fn prepare(
        &self,
        tokenizer: &OptTokenizer,
        user: &str,
        cfg: &GenerationConfig,
    ) -> Result<(Vec<u32>, GenerationConfig, usize)> {
        if user.is_empty() {
            return Err(Error::InvalidRequest("empty chat message".into()));
        }
        let (ids, dropped, max_new_tokens) = self.fit(tokenizer, user, cfg.max_new_tokens)?;
        let mut cfg = cfg.clone();
        cfg.max_new_tokens = max_new_tokens;
        if !cfg.stop_strings.iter().any(|s| s == "\n") {
            cfg.stop_strings.push("\n".into());
        }
        Ok((ids, cfg, dropped))
    }

    /// Sends the human's message `user` and generates the assistant's reply, streaming it to
    /// `on_token`. A stop string `"\n"` is added to `cfg` (a reply is one line). The reply is
    /// recorded (also when the callback stopped it early); on error the conversation is
    /// unchanged.
    pub fn send(
        &mut self,
        model: &OptModel,
        tokenizer: &OptTokenizer,
        user: &str,
        cfg: &GenerationConfig,
        on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<ChatReply> {
        let user = user.trim();
        let (ids, cfg, dropped) = self.prepare(tokenizer, user, cfg)?;
        let max_new_tokens = cfg.max_new_tokens;
        if !self.reuse_cache {
            self.session.clear();
        }
        let out = self
            .session
            .generate(model, &ids, &cfg, Some(tokenizer), on_token)?;
        Ok(self.record(user, out, dropped, max_new_tokens))
    }

    /// [`ChatSession::send`] on either engine. In memory it is `send` (KV reuse); offloaded,
    /// the whole conversation is prefilled by the offloading runtime (the reply's
    /// `reused_tokens` is 0).
    pub fn send_engine(
        &mut self,
        engine: &OptEngine,
        tokenizer: &OptTokenizer,
        user: &str,
        cfg: &GenerationConfig,
        on_token: impl FnMut(&TokenEvent<'_>) -> Flow,
    ) -> Result<ChatReply> {
        let model = match engine {
            OptEngine::InMemory(model) => {
                return self.send(model, tokenizer, user, cfg, on_token);
            }
            OptEngine::Offloaded(model) => model,
        };
        if model.config() != &self.session.config {
            return Err(Error::InvalidRequest(
                "chat session used with a model other than the one it was made for".into(),
            ));
        }
        let user = user.trim();
        let (ids, cfg, dropped) = self.prepare(tokenizer, user, cfg)?;
        let max_new_tokens = cfg.max_new_tokens;
        let prefilled = ids.len();
        let mut outs = model.generate_rows(&[ids], &[cfg], Some(tokenizer), on_token)?;
        let out = SessionOutput {
            output: outs.remove(0),
            reused_tokens: 0,
            prefilled_tokens: prefilled,
        };
        Ok(self.record(user, out, dropped, max_new_tokens))
    }

    /// Records an exchange: drops the `dropped` oldest ones, appends `user` and the reply's
    /// first line.
    fn record(
        &mut self,
        user: &str,
        out: SessionOutput,
        dropped: usize,
        max_new_tokens: usize,
    ) -> ChatReply {
        self.turns.drain(..2 * dropped);
        let text = out.output.text.trim().to_string();
        self.turns.push(ChatMessage::new(Role::User, user));
        self.turns
            .push(ChatMessage::new(Role::Assistant, text.clone()));
        ChatReply {
            text,
            output: out.output,
            dropped_turns: dropped,
            max_new_tokens,
            reused_tokens: out.reused_tokens,
            prefilled_tokens: out.prefilled_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::chat::DEFAULT_PREAMBLE;
    use crate::generation::generate;

    fn setup() -> (OptModel, OptTokenizer) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let model =
            OptModel::from_pretrained(root.join("../../tests/fixtures/tiny-preln-f32")).unwrap();
        let tok = OptTokenizer::from_dir(root.join("../../../shared/data/opt-tokenizer")).unwrap();
        (model, tok)
    }

    fn from_scratch(
        model: &OptModel,
        tok: &OptTokenizer,
        prompt: &[u32],
        cfg: &GenerationConfig,
    ) -> GenerationOutput {
        let outs = generate(model, &[prompt.to_vec()], cfg, Some(tok), |_| {
            Flow::Continue
        });
        outs.unwrap().remove(0)
    }

    #[test]
    fn reuse_gives_what_recomputing_gives() {
        let (model, tok) = setup();
        let cfg = GenerationConfig::greedy(6);
        let mut s = Session::new(&model);
        let a = tok.encode("The quick brown fox").unwrap();
        let first = s.generate(&model, &a, &cfg, Some(&tok), |_| Flow::Continue);
        let first = first.unwrap();
        assert_eq!((first.reused_tokens, first.prefilled_tokens), (0, a.len()));
        assert_eq!(first.output, from_scratch(&model, &tok, &a, &cfg));
        // The cache holds the prompt and every new token but the last.
        assert_eq!(s.tokens().len(), a.len() + first.output.token_ids.len() - 1);

        // A continuation of the prompt and the reply: only the new part is prefilled.
        let mut b = s.tokens().to_vec();
        b.extend(tok.encode_continuation(" jumps over the lazy dog").unwrap());
        let second = s.generate(&model, &b, &cfg, Some(&tok), |_| Flow::Continue);
        let second = second.unwrap();
        assert_eq!(
            second.reused_tokens,
            a.len() + first.output.token_ids.len() - 1
        );
        assert_eq!(second.prefilled_tokens, b.len() - second.reused_tokens);
        assert_eq!(second.output, from_scratch(&model, &tok, &b, &cfg));

        // An edited history keeps only the common prefix; the same prompt again re-runs
        // just its last token.
        let mut c = a[..3].to_vec();
        c.extend(tok.encode_continuation(" lazy cat sleeps").unwrap());
        let third = s.generate(&model, &c, &cfg, Some(&tok), |_| Flow::Continue);
        let third = third.unwrap();
        assert_eq!(third.reused_tokens, 3);
        assert_eq!(third.output, from_scratch(&model, &tok, &c, &cfg));
        let again = s.generate(&model, &c, &cfg, Some(&tok), |_| Flow::Continue);
        let again = again.unwrap();
        assert_eq!(
            (again.reused_tokens, again.prefilled_tokens),
            (c.len() - 1, 1)
        );
        assert_eq!(again.output, third.output);
    }

    #[test]
    fn streams_like_generate_and_stops_when_asked() {
        let (model, tok) = setup();
        let cfg = GenerationConfig::greedy(10)
            .with_temperature(0.8)
            .with_seed(3);
        let p = tok.encode("Hello, my name is").unwrap();
        let mut s = Session::new(&model);
        let mut streamed = String::new();
        let out = s.generate(&model, &p, &cfg, Some(&tok), |ev| {
            assert_eq!(ev.row, 0);
            streamed.push_str(ev.text);
            Flow::Continue
        });
        let out = out.unwrap().output;
        assert_eq!(out, from_scratch(&model, &tok, &p, &cfg));
        assert_eq!(streamed, out.text);

        let mut seen = 0;
        let stopped = s.generate(&model, &p, &cfg, Some(&tok), |_| {
            seen += 1;
            if seen == 3 {
                Flow::StopAll
            } else {
                Flow::Continue
            }
        });
        let stopped = stopped.unwrap().output;
        assert_eq!(stopped.finish_reason, FinishReason::Cancelled);
        assert_eq!(stopped.token_ids, out.token_ids[..3]);
        // Still usable afterwards.
        let after = s.generate(&model, &p, &cfg, Some(&tok), |_| Flow::Continue);
        assert_eq!(after.unwrap().output, out);
    }

    #[test]
    fn bad_calls_are_rejected_and_leave_the_session_usable() {
        let (model, tok) = setup();
        let mut s = Session::with_capacity(&model, 20);
        assert_eq!(s.capacity(), 20);
        let p = tok.encode("Paris is the capital city of").unwrap();
        let too_many = GenerationConfig::greedy(20);
        let err = s.generate(&model, &p, &too_many, Some(&tok), |_| Flow::Continue);
        assert!(matches!(err, Err(Error::PromptTooLong { .. })), "{err:?}");
        let err = s.generate(&model, &[], &GenerationConfig::greedy(2), None, |_| {
            Flow::Continue
        });
        assert!(matches!(err, Err(Error::InvalidRequest(_))), "{err:?}");
        let err = s.generate(
            &model,
            &[2, 60000],
            &GenerationConfig::greedy(2),
            None,
            |_| Flow::Continue,
        );
        assert!(matches!(err, Err(Error::TokenOutOfRange { .. })), "{err:?}");
        let other = OptModel::from_pretrained(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sharded"),
        )
        .unwrap();
        let err = s.generate(&other, &p, &GenerationConfig::greedy(2), None, |_| {
            Flow::Continue
        });
        assert!(matches!(err, Err(Error::InvalidRequest(_))), "{err:?}");
        let ok = s.generate(&model, &p, &GenerationConfig::greedy(4), Some(&tok), |_| {
            Flow::Continue
        });
        assert_eq!(ok.unwrap().output.token_ids.len(), 4);
    }

    #[test]
    fn chat_turns_equal_rendering_the_whole_conversation() {
        let (model, tok) = setup();
        let cfg = GenerationConfig::greedy(5);
        let mut chat = ChatSession::new(&model, Some("A short chat.".into()));
        let mut reused = Vec::new();
        for msg in ["Hi there!", "What is the tallest mountain?", "Thanks"] {
            let before = chat.messages();
            let turn = chat
                .send(&model, &tok, msg, &cfg, |_| Flow::Continue)
                .unwrap();
            let mut msgs = before;
            msgs.push(ChatMessage::new(Role::User, msg));
            let prompt = tok.encode(&render(&msgs)).unwrap();
            let chat_cfg = cfg.clone().with_stop_string("\n");
            let expect = from_scratch(&model, &tok, &prompt, &chat_cfg);
            assert_eq!(turn.output, expect, "turn {msg:?}");
            assert_eq!(turn.text, expect.text.trim());
            assert_eq!(turn.dropped_turns, 0);
            reused.push(turn.reused_tokens);
        }
        assert_eq!(reused[0], 0);
        assert!(reused[1] > 0 && reused[2] > reused[1], "{reused:?}");
        let msgs = chat.messages();
        assert_eq!(msgs.len(), 7);
        assert_eq!(msgs[0], ChatMessage::new(Role::System, "A short chat."));
        chat.reset();
        assert_eq!(chat.messages().len(), 1);
    }

    #[test]
    fn chat_overflow_drops_oldest_turns_and_keeps_the_preamble() {
        let (model, tok) = setup();
        let cfg = GenerationConfig::greedy(8);
        let mut chat = ChatSession::new(&model, Some("A short chat.".into()));
        let preamble_tokens = tok.encode("A short chat.\nHuman:").unwrap().len() - 1;
        let mut dropped = 0;
        for i in 0..6 {
            let msg = format!("message number {i} with a few more words");
            let turn = chat
                .send(&model, &tok, &msg, &cfg, |_| Flow::Continue)
                .unwrap();
            assert_eq!(turn.max_new_tokens, 8);
            if turn.dropped_turns > 0 {
                // The preamble's cache is kept; everything after it is rebuilt.
                assert!(turn.reused_tokens >= preamble_tokens, "{turn:?}");
            }
            dropped += turn.dropped_turns;
            let prompt = tok.encode(&render(&{
                let mut m = chat.messages();
                m.truncate(m.len() - 1);
                m
            }));
            let prompt = prompt.unwrap();
            assert!(prompt.len() + 7 <= 64);
            let expect = from_scratch(&model, &tok, &prompt, &cfg.clone().with_stop_string("\n"));
            assert_eq!(turn.output, expect, "turn {i}");
        }
        assert!(dropped > 0, "six turns should not fit in 64 positions");
        assert!(chat.messages()[0].role == Role::System);
        assert_eq!(
            chat.messages().last().unwrap().role,
            Role::Assistant,
            "the last exchange is kept"
        );

        // A message that cannot fit even alone is an error and changes nothing.
        let kept = chat.messages();
        let huge = "word ".repeat(80);
        let err = chat.send(&model, &tok, &huge, &cfg, |_| Flow::Continue);
        assert!(matches!(err, Err(Error::PromptTooLong { .. })), "{err:?}");
        assert_eq!(chat.messages(), kept);

        // With FlexGen's 62-token preamble only a short reply fits: it is shortened.
        let mut flexgen = ChatSession::new(&model, None);
        assert!(tok.encode(DEFAULT_PREAMBLE).unwrap().len() > 50);
        let err = flexgen.send(&model, &tok, "Hi", &cfg, |_| Flow::Continue);
        assert!(matches!(err, Err(Error::PromptTooLong { .. })), "{err:?}");
        let long_preamble = "word ".repeat(50);
        let mut short = ChatSession::new(&model, Some(long_preamble.clone()));
        let turn = short.send(&model, &tok, "Hi", &cfg.clone(), |_| Flow::Continue);
        let turn = turn.unwrap();
        let prompt = tok.encode(&format!("{long_preamble}\nHuman: Hi\nAssistant:"));
        let prompt = prompt.unwrap();
        assert!(prompt.len() + 7 > 64 && prompt.len() < 64);
        assert_eq!(turn.max_new_tokens, 65 - prompt.len());
        assert!(turn.output.token_ids.len() <= turn.max_new_tokens);
    }
}
