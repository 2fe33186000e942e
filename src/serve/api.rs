//! Parsing OpenAI request bodies: every field is type-checked by name (so an error names the
//! field), fields OpenAI defines but this server cannot honour are accepted only at their
//! neutral value, and fields nobody defines are rejected as OpenAI does ("Unrecognized request
//! argument supplied").

use flexgen_opt::{ChatMessage, Role};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;

/// The fields of a JSON request body, taken one by one.
pub struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    /// Parses a body that must be a JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(
                None,
                format!("We could not parse the JSON body of your request: {e}"),
            )
        })?;
        match value {
            Value::Object(map) => Ok(Fields { map }),
            other => Err(ApiError::invalid(
                None,
                format!(
                    "The request body must be a JSON object, got {}",
                    json_kind(&other)
                ),
            )),
        }
    }

    /// Removes field `name`; `null` counts as absent. A value of the wrong type is a 400
    /// naming the field.
    pub fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(|e| {
                ApiError::invalid(Some(name), format!("Invalid type for '{name}': {e}"))
            }),
        }
    }

    /// Removes a raw field (`null` counts as absent).
    pub fn take_raw(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    /// Removes a field that must be present.
    pub fn require<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, ApiError> {
        self.take(name)?.ok_or_else(|| {
            ApiError::invalid(Some(name), format!("Missing required parameter: '{name}'"))
        })
    }

    /// Removes a field OpenAI defines that this server supports only at its neutral value
    /// (`is_neutral`); any other value is a 400 saying so.
    pub fn neutral<T: DeserializeOwned>(
        &mut self,
        name: &str,
        is_neutral: impl Fn(&T) -> bool,
        neutral: &str,
    ) -> Result<(), ApiError> {
        match self.take::<T>(name)? {
            Some(v) if !is_neutral(&v) => Err(ApiError::invalid(
                Some(name),
                format!("'{name}' is not supported by this server (only {neutral})"),
            )),
            _ => Ok(()),
        }
    }

    /// Removes fields that change nothing here (`user`, `metadata`, ...).
    pub fn ignore(&mut self, names: &[&str]) {
        for n in names {
            self.map.remove(*n);
        }
    }

    /// Fails on the first field nobody took.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            Some(k) => Err(ApiError::invalid(
                Some(k),
                format!("Unrecognized request argument supplied: {k}"),
            )),
            None => Ok(()),
        }
    }
}

/// JSON type name for messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `stop`: one string or up to four.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling and streaming options shared by both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `max_tokens` (or chat's `max_completion_tokens`); `None`: the endpoint's default.
    pub max_tokens: Option<usize>,
    /// In [0, 2]; OpenAI's default is 1.
    pub temperature: f32,
    /// In (0, 1].
    pub top_p: Option<f32>,
    /// Extension (vLLM and others): sample among the k most likely tokens (0: all).
    pub top_k: Option<usize>,
    /// Seed of the sampler; `None` picks one.
    pub seed: Option<u64>,
    /// Up to 4 stop strings.
    pub stop: Vec<String>,
    /// Answer with server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// Most stop strings OpenAI accepts.
pub const MAX_STOP: usize = 4;

/// Takes the options common to completions and chat completions.
fn take_options(f: &mut Fields, max_token_names: &[&str]) -> Result<Options, ApiError> {
    let mut max_tokens = None;
    for name in max_token_names {
        if let Some(v) = f.take::<usize>(name)? {
            max_tokens = Some(v);
        }
    }
    let temperature = f.take::<f32>("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("'temperature' must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.take::<f32>("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("'top_p' must be greater than 0 and at most 1, got {p}"),
            ));
        }
    }
    let top_k = f.take::<usize>("top_k")?.filter(|&k| k > 0);
    let seed = f.take::<i64>("seed")?.map(|s| s as u64);
    let stop = match f.take::<Stop>("stop")? {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            Some("stop"),
            format!(
                "'stop' has {} sequences; at most {MAX_STOP} are allowed",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            "'stop' sequences must not be empty",
        ));
    }
    let stream = f.take::<bool>("stream")?.unwrap_or(false);
    let include_usage = match f.take::<StreamOptions>("stream_options")? {
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "'stream_options' is only allowed when 'stream' is true",
            ))
        }
        Some(o) => o.include_usage,
        None => false,
    };
    f.neutral::<u32>("n", |&n| n == 1, "n = 1")?;
    f.neutral::<f32>("presence_penalty", |&p| p == 0.0, "0")?;
    f.neutral::<f32>("frequency_penalty", |&p| p == 0.0, "0")?;
    f.neutral::<Map<String, Value>>("logit_bias", Map::is_empty, "an empty map")?;
    f.ignore(&["user", "metadata", "store", "service_tier"]);
    Ok(Options {
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
        stream,
        include_usage,
    })
}

/// One prompt of a completion request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to tokenize (BOS is prepended).
    Text(String),
    /// Token ids as given (BOS prepended when missing).
    Ids(Vec<u32>),
}

/// `prompt` in any of OpenAI's four shapes.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// A `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// One choice per prompt.
    pub prompts: Vec<Prompt>,
    /// Sampling and streaming.
    pub options: Options,
}

impl CompletionRequest {
    /// Parses and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut f = Fields::parse(body)?;
        let model = f.require::<String>("model")?;
        let raw = f.take_raw("prompt").ok_or_else(|| {
            ApiError::invalid(Some("prompt"), "Missing required parameter: 'prompt'")
        })?;
        let prompts = match serde_json::from_value::<PromptField>(raw) {
            Ok(PromptField::Text(s)) => vec![Prompt::Text(s)],
            Ok(PromptField::Texts(v)) => v.into_iter().map(Prompt::Text).collect(),
            Ok(PromptField::Ids(v)) => vec![Prompt::Ids(v)],
            Ok(PromptField::IdLists(v)) => v.into_iter().map(Prompt::Ids).collect(),
            Err(_) => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "'prompt' must be a string, an array of strings, an array of token ids \
                     or an array of arrays of token ids",
                ))
            }
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid(
                Some("prompt"),
                "'prompt' is an empty array",
            ));
        }
        let options = take_options(&mut f, &["max_tokens"])?;
        f.neutral::<u32>("best_of", |&n| n == 1, "best_of = 1")?;
        f.neutral::<bool>("echo", |&e| !e, "false")?;
        f.neutral::<u32>("logprobs", |&n| n == 0, "null")?;
        f.neutral::<String>("suffix", String::is_empty, "null")?;
        f.finish()?;
        Ok(CompletionRequest {
            model,
            prompts,
            options,
        })
    }
}

/// A `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Sampling and streaming.
    pub options: Options,
}

impl ChatRequest {
    /// Parses and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut f = Fields::parse(body)?;
        let model = f.require::<String>("model")?;
        let raw: Vec<Value> = f.require("messages")?;
        if raw.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "'messages' must hold at least one message",
            ));
        }
        let messages = raw
            .into_iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let options = take_options(&mut f, &["max_tokens", "max_completion_tokens"])?;
        f.neutral::<bool>("logprobs", |&l| !l, "false")?;
        f.neutral::<u32>("top_logprobs", |&n| n == 0, "null")?;
        f.neutral::<Vec<Value>>("tools", Vec::is_empty, "no tools")?;
        f.neutral::<Vec<Value>>("functions", Vec::is_empty, "no functions")?;
        f.neutral::<Value>("tool_choice", |v| v == "none" || v == "auto", "\"none\"")?;
        f.neutral::<Value>(
            "response_format",
            |v| v.get("type").and_then(Value::as_str) == Some("text"),
            "{\"type\": \"text\"}",
        )?;
        f.ignore(&["parallel_tool_calls"]);
        f.finish()?;
        Ok(ChatRequest {
            model,
            messages,
            options,
        })
    }
}

/// One entry of `messages`: `role` and `content` (a string or text parts).
fn parse_message(i: usize, m: Value) -> Result<ChatMessage, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(mut obj) = m else {
        return Err(ApiError::invalid(
            Some(&param),
            format!("{param} must be an object, got {}", json_kind(&m)),
        ));
    };
    let role = match obj.remove("role") {
        Some(Value::String(r)) => r,
        Some(other) => {
            return Err(ApiError::invalid(
                Some(&format!("{param}.role")),
                format!("{param}.role must be a string, got {}", json_kind(&other)),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                Some(&format!("{param}.role")),
                format!("Missing required parameter: '{param}.role'"),
            ))
        }
    };
    let role = match role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(ApiError::invalid(
                Some(&format!("{param}.role")),
                format!(
                    "{param}.role '{other}' is not supported (system, developer, user, assistant)"
                ),
            ))
        }
    };
    let content = match obj.remove("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(&param, parts)?,
        Some(Value::Null) | None if role == Role::Assistant => String::new(),
        Some(other) => {
            return Err(ApiError::invalid(
                Some(&format!("{param}.content")),
                format!(
                    "{param}.content must be a string or an array of text parts, got {}",
                    json_kind(&other)
                ),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                Some(&format!("{param}.content")),
                format!("Missing required parameter: '{param}.content'"),
            ))
        }
    };
    obj.remove("name");
    if let Some(k) = obj.keys().next() {
        return Err(ApiError::invalid(
            Some(&format!("{param}.{k}")),
            format!("Unrecognized request argument supplied: {param}.{k}"),
        ));
    }
    Ok(ChatMessage::new(role, content))
}

/// Joins `[{"type": "text", "text": ...}, ...]`; other part types are not supported.
fn text_parts(param: &str, parts: Vec<Value>) -> Result<String, ApiError> {
    let mut out = String::new();
    for (j, part) in parts.iter().enumerate() {
        let ty = part.get("type").and_then(Value::as_str);
        match (ty, part.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => out.push_str(t),
            _ => {
                return Err(ApiError::invalid(
                    Some(&format!("{param}.content[{j}]")),
                    format!(
                        "{param}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}}; \
                         this model reads text only"
                    ),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: &str) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(body.as_bytes())
    }

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(body.as_bytes())
    }

    #[test]
    fn completion_fields_and_defaults() {
        let r = completion(
            r#"{"model": "m", "prompt": ["a", "b"], "max_tokens": 5, "stop": "\n", "seed": 3,
                "stream": true, "stream_options": {"include_usage": true}, "user": "u", "n": 1}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompts,
            vec![Prompt::Text("a".into()), Prompt::Text("b".into())]
        );
        let o = &r.options;
        assert_eq!(
            (
                o.max_tokens,
                o.temperature,
                o.seed,
                o.stream,
                o.include_usage
            ),
            (Some(5), 1.0, Some(3), true, true)
        );
        assert_eq!(o.stop, vec!["\n".to_string()]);
        let r = completion(r#"{"model": "m", "prompt": [[2, 100], [5]]}"#).unwrap();
        assert_eq!(
            r.prompts,
            vec![Prompt::Ids(vec![2, 100]), Prompt::Ids(vec![5])]
        );
    }

    #[test]
    fn bad_completion_bodies_name_the_field() {
        for (body, param) in [
            (r#"{"prompt": "x"}"#, Some("model")),
            (r#"{"model": "m"}"#, Some("prompt")),
            (r#"{"model": "m", "prompt": 5}"#, Some("prompt")),
            (
                r#"{"model": "m", "prompt": "x", "max_tokens": "ten"}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "max_tokens": -1}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "temperature": 3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "top_p": 0}"#,
                Some("top_p"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]}"#,
                Some("stop"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "stop": [""]}"#,
                Some("stop"),
            ),
            (r#"{"model": "m", "prompt": "x", "n": 2}"#, Some("n")),
            (
                r#"{"model": "m", "prompt": "x", "echo": true}"#,
                Some("echo"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "stream_options": {}}"#,
                Some("stream_options"),
            ),
            (
                r#"{"model": "m", "prompt": "x", "frobnicate": 1}"#,
                Some("frobnicate"),
            ),
            (r#"{"model": "m", "prompt": "x""#, None),
            (r#"[1, 2]"#, None),
        ] {
            let err = completion(body).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), param, "{body}: {}", err.message);
        }
    }

    #[test]
    fn chat_messages() {
        let r = chat(
            r#"{"model": "m", "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "bob"},
                {"role": "assistant", "content": null},
                {"role": "user", "content": "Again"}], "max_completion_tokens": 7}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages,
            vec![
                ChatMessage::new(Role::System, "Be brief."),
                ChatMessage::new(Role::User, "Hi"),
                ChatMessage::new(Role::Assistant, ""),
                ChatMessage::new(Role::User, "Again"),
            ]
        );
        assert_eq!(r.options.max_tokens, Some(7));
        for (body, param) in [
            (r#"{"model": "m", "messages": []}"#, "messages"),
            (r#"{"model": "m", "messages": "hi"}"#, "messages"),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model": "m", "messages": [{"content": "x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user"}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": 3}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x", "x": 1}]}"#,
                "messages[0].x",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}"#,
                "tools",
            ),
        ] {
            let err = chat(body).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
    }
}
