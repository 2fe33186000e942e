//! Turning engine events into OpenAI responses: the whole JSON object, or the stream of
//! `text_completion` / `chat.completion.chunk` chunks.

use flexgen_opt::FinishReason;
use serde_json::{json, Value};

use super::error::ApiError;

/// What the engine tells a request's handler about its rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of choice `index` (the deltas concatenate to the whole completion).
    Delta {
        /// Choice index.
        index: usize,
        /// Text to append.
        text: String,
    },
    /// Choice `index` ended.
    Finished {
        /// Choice index.
        index: usize,
        /// Why.
        reason: FinishReason,
        /// Prompt tokens (BOS included).
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// Generation failed; no more events follow for this request.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

/// OpenAI's `finish_reason`.
fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::StopToken | FinishReason::StopString | FinishReason::Cancelled => "stop",
    }
}

/// The response to one request, filled in as events arrive.
#[derive(Debug)]
pub struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    texts: Vec<String>,
    reasons: Vec<Option<&'static str>>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Reply {
    /// A reply with `choices` choices.
    pub fn new(kind: Kind, id: String, created: u64, model: String, choices: usize) -> Self {
        Reply {
            kind,
            id,
            created,
            model,
            texts: vec![String::new(); choices],
            reasons: vec![None; choices],
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }

    /// Whether every choice has finished.
    pub fn done(&self) -> bool {
        self.reasons.iter().all(Option::is_some)
    }

    /// Applies an event; returns the stream chunk it makes, if any.
    pub fn apply(&mut self, ev: Event) -> Result<Option<Value>, ApiError> {
        match ev {
            Event::Delta { index, mut text } => {
                if self.kind == Kind::Chat && self.texts[index].is_empty() {
                    // The template ends with "Assistant:"; the reply's first token starts with
                    // a space that is no part of the answer.
                    text = text.trim_start().to_string();
                }
                if text.is_empty() {
                    return Ok(None);
                }
                self.texts[index].push_str(&text);
                Ok(Some(self.chunk(index, Some(&text), None)))
            }
            Event::Finished {
                index,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let reason = finish_reason(reason);
                self.reasons[index] = Some(reason);
                self.prompt_tokens += prompt_tokens;
                self.completion_tokens += completion_tokens;
                Ok(Some(self.chunk(index, None, Some(reason))))
            }
            Event::Failed { message } => Err(ApiError::internal(message)),
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.kind, streaming) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, streaming: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streaming),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// A stream chunk for choice `index` with new text and/or its finish reason.
    fn chunk(&self, index: usize, text: Option<&str>, reason: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": reason,
            }),
            Kind::Chat => json!({
                "index": index,
                "delta": text.map_or(json!({}), |t| json!({"content": t})),
                "logprobs": null,
                "finish_reason": reason,
            }),
        };
        self.envelope(true, json!([choice]))
    }

    /// The chunks a stream starts with: chat announces the assistant role of each choice.
    pub fn opening_chunks(&self) -> Vec<Value> {
        match self.kind {
            Kind::Completion => Vec::new(),
            Kind::Chat => (0..self.texts.len())
                .map(|index| {
                    self.envelope(
                        true,
                        json!([{
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": null,
                            "finish_reason": null,
                        }]),
                    )
                })
                .collect(),
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    /// The last chunk of a stream with `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = self.usage();
        v
    }

    /// The whole response of a request without `stream`.
    pub fn response(&self) -> Value {
        let choices: Vec<Value> = self
            .texts
            .iter()
            .zip(&self.reasons)
            .enumerate()
            .map(|(index, (text, reason))| match self.kind {
                Kind::Completion => json!({
                    "index": index,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": reason,
                }),
                Kind::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            })
            .collect();
        let mut v = self.envelope(false, json!(choices));
        v["usage"] = self.usage();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(index: usize, text: &str) -> Event {
        Event::Delta {
            index,
            text: text.into(),
        }
    }

    fn finished(index: usize, reason: FinishReason) -> Event {
        Event::Finished {
            index,
            reason,
            prompt_tokens: 5,
            completion_tokens: 3,
        }
    }

    #[test]
    fn chat_trims_the_leading_space_and_streams_deltas() {
        let mut r = Reply::new(Kind::Chat, "chatcmpl-1".into(), 7, "m".into(), 1);
        assert_eq!(
            r.opening_chunks()[0]["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert_eq!(r.apply(delta(0, " ")).unwrap(), None);
        let c = r.apply(delta(0, " Hi")).unwrap().unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["choices"][0]["delta"]["content"], "Hi");
        r.apply(delta(0, " there")).unwrap();
        assert!(!r.done());
        let c = r
            .apply(finished(0, FinishReason::StopString))
            .unwrap()
            .unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert_eq!(c["choices"][0]["delta"], json!({}));
        assert!(r.done());
        let full = r.response();
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["choices"][0]["message"]["content"], "Hi there");
        assert_eq!(full["usage"]["total_tokens"], 8);
        assert_eq!(r.usage_chunk()["choices"], json!([]));
    }

    #[test]
    fn completion_choices_keep_their_text_and_reasons() {
        let mut r = Reply::new(Kind::Completion, "cmpl-1".into(), 7, "m".into(), 2);
        r.apply(delta(1, " b")).unwrap();
        r.apply(delta(0, " a")).unwrap();
        r.apply(finished(1, FinishReason::Length)).unwrap();
        r.apply(finished(0, FinishReason::StopToken)).unwrap();
        let full = r.response();
        assert_eq!(full["object"], "text_completion");
        assert_eq!(full["choices"][0]["text"], " a");
        assert_eq!(full["choices"][0]["finish_reason"], "stop");
        assert_eq!(full["choices"][1]["text"], " b");
        assert_eq!(full["choices"][1]["finish_reason"], "length");
        assert_eq!(full["usage"]["prompt_tokens"], 10);
        let err = r
            .apply(Event::Failed {
                message: "boom".into(),
            })
            .unwrap_err();
        assert_eq!(err.status, 500);
    }
}
