//! The `serve` example end to end: the real binary on a fixture checkpoint, driven over
//! loopback HTTP by a real client (reqwest). Expected texts come from the library itself.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flexgen::opt::chat::{render, ChatMessage, Role};
use flexgen::opt::{generate, GenerationConfig, OptModel, OptTokenizer};
use serde_json::{json, Value};

const MODEL: &str = "tiny-preln-f32";

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<test-binary> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// Starts `serve` on a free loopback port with `args`.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(example("serve"))
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the serve example (cargo test builds it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(at) = line.find("http://") else {
            let _ = child.kill();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("serve did not start: {line}{err}");
        };
        let base = line[at..].split_whitespace().next().unwrap().to_string();
        Server { child, base }
    }

    fn model() -> Server {
        Server::start(&["--model", fixture(MODEL).to_str().unwrap()])
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut req = c.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

/// Posts a streaming request; returns the JSON chunks, checking that the stream is
/// `text/event-stream` and ends with `data: [DONE]`.
async fn stream(c: &reqwest::Client, url: &str, body: &Value, key: Option<&str>) -> Vec<Value> {
    let mut req = c.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let text = resp.text().await.unwrap();
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

async fn metrics(c: &reqwest::Client, s: &Server) -> String {
    c.get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of an unlabelled (or exactly labelled) metric line.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// What the library generates greedily for `prompt` (the server must say the same).
struct Reference {
    model: OptModel,
    tok: OptTokenizer,
}

impl Reference {
    fn new() -> Self {
        Reference {
            model: OptModel::from_pretrained(fixture(MODEL)).unwrap(),
            tok: OptTokenizer::from_dir(flexgen::cli::bundled_tokenizer_dir()).unwrap(),
        }
    }

    fn greedy(&self, prompt: &str, cfg: &GenerationConfig) -> (String, usize, usize) {
        let ids = self.tok.encode(prompt).unwrap();
        let out = generate(&self.model, &[ids], cfg, Some(&self.tok), |_| {
            flexgen::opt::Flow::Continue
        })
        .unwrap()
        .remove(0);
        (out.text, out.prompt_tokens, out.token_ids.len())
    }
}

#[tokio::test]
async fn completions_plain_and_streaming_match_the_library() {
    let s = Server::model();
    let c = client();
    let r = Reference::new();
    let prompts = ["Paris is the capital city of", "Hello, my name is"];
    let body = json!({"model": MODEL, "prompt": prompts, "max_tokens": 9, "temperature": 0});
    let (status, v) = post(&c, &s.url("/v1/completions"), &body, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let (mut prompt_total, mut completion_total) = (0, 0);
    for (i, p) in prompts.iter().enumerate() {
        let (text, pt, ct) = r.greedy(p, &GenerationConfig::greedy(9));
        let choice = &v["choices"][i];
        assert_eq!(choice["index"], i);
        assert_eq!(choice["text"], text, "prompt {i}");
        let reason = if ct == 9 { "length" } else { "stop" };
        assert_eq!(choice["finish_reason"], reason);
        prompt_total += pt;
        completion_total += ct;
    }
    assert_eq!(v["usage"]["prompt_tokens"], prompt_total);
    assert_eq!(v["usage"]["completion_tokens"], completion_total);
    assert_eq!(v["usage"]["total_tokens"], prompt_total + completion_total);

    // The same request streamed: the chunks add up to the same texts and reasons.
    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&c, &s.url("/v1/completions"), &body, None).await;
    let mut texts = [String::new(), String::new()];
    let mut reasons = [Value::Null, Value::Null];
    let (usage, deltas) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], v["usage"]);
    assert!(deltas.len() > 2, "{deltas:?}");
    for ch in deltas {
        assert_eq!(ch["object"], "text_completion");
        let choice = &ch["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["text"].as_str().unwrap());
        if !choice["finish_reason"].is_null() {
            reasons[i] = choice["finish_reason"].clone();
        }
    }
    for i in 0..2 {
        assert_eq!(texts[i], v["choices"][i]["text"].as_str().unwrap());
        assert_eq!(reasons[i], v["choices"][i]["finish_reason"]);
    }

    // Token-id prompts work too (BOS is added when missing).
    let ids = r.tok.encode(prompts[1]).unwrap();
    let body = json!({"model": MODEL, "prompt": ids[1..], "max_tokens": 9, "temperature": 0});
    let (status, w) = post(&c, &s.url("/v1/completions"), &body, None).await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["choices"][0]["text"], v["choices"][1]["text"]);
}

#[tokio::test]
async fn chat_plain_and_streaming_match_the_library() {
    let s = Server::model();
    let c = client();
    let r = Reference::new();
    // The fixture has 64 positions: a short system message replaces the long preamble.
    let messages = [
        ChatMessage::new(Role::System, "Be terse."),
        ChatMessage::new(Role::User, "Hi"),
        ChatMessage::new(Role::Assistant, "Hello."),
        ChatMessage::new(Role::User, "Name a city"),
    ];
    let cfg = GenerationConfig::greedy(12).with_stop_string("\n");
    let (text, pt, ct) = r.greedy(&render(&messages), &cfg);
    let expected = text.trim_start();
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0});
    let (status, v) = post(&c, &s.url("/v1/chat/completions"), &body, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected);
    assert!(!expected.is_empty());
    assert_eq!(v["usage"]["prompt_tokens"], pt);
    assert_eq!(v["usage"]["completion_tokens"], ct);

    let mut body = body;
    body["stream"] = json!(true);
    let chunks = stream(&c, &s.url("/v1/chat/completions"), &body, None).await;
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, expected);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], choice["finish_reason"]);
    assert_eq!(last["choices"][0]["delta"], json!({}));
}

#[tokio::test]
async fn models_health_metrics_and_page() {
    let s = Server::model();
    let c = client();
    let get = |p: &str| c.get(s.url(p)).send();
    let v: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    let v: Value = get(&format!("/v1/models/{MODEL}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], MODEL);
    let v: Value = get("/health").await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "ok");
    let page = get("/").await.unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>flexgen chat</title>") && html.contains("/v1/chat/completions"));
    let m = metrics(&c, &s).await;
    assert!(m.contains("# TYPE flexgen_batch_size histogram"), "{m}");
    assert_eq!(metric(&m, "flexgen_queue_length"), 0.0);
    assert!(m.contains("flexgen_http_responses_total{route=\"/health\",status=\"200\"} 1"));
}

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";
const KEY: &str = "sk-test";

/// A bad request and the error it must get.
struct Case {
    what: &'static str,
    path: &'static str,
    /// JSON, or a JSON string holding raw body text.
    body: Value,
    key: Option<&'static str>,
    status: u16,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

/// A request with the right key that must get a 400 naming `param`.
fn bad(what: &'static str, path: &'static str, body: Value, param: Option<&'static str>) -> Case {
    Case {
        what,
        path,
        body,
        key: Some(KEY),
        status: 400,
        param,
        code: None,
    }
}

impl Case {
    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn key(mut self, key: Option<&'static str>) -> Self {
        self.key = key;
        self
    }
}

#[tokio::test]
async fn every_bad_input_gets_its_4xx_and_the_server_keeps_serving() {
    let key = KEY;
    let s = Server::start(&[
        "--model",
        fixture(MODEL).to_str().unwrap(),
        "--api-key",
        key,
        "--max-body-bytes",
        "4096",
    ]);
    let c = client();
    let good = json!({"model": MODEL, "prompt": "ok", "max_tokens": 2, "temperature": 0});
    let cmpl = s.url(C);
    let user_hi = json!([{"role": "user", "content": "hi"}]);
    let sys_hi = json!([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]);
    let cases = vec![
        bad("malformed JSON", C, json!("{\"model\": "), None),
        bad("not an object", C, json!("[1, 2]"), None),
        bad(
            "max_tokens type",
            C,
            json!({"model": MODEL, "prompt": "x", "max_tokens": "ten"}),
            Some("max_tokens"),
        ),
        bad(
            "negative max_tokens",
            C,
            json!({"model": MODEL, "prompt": "x", "max_tokens": -3}),
            Some("max_tokens"),
        ),
        bad(
            "temperature type",
            C,
            json!({"model": MODEL, "prompt": "x", "temperature": "hot"}),
            Some("temperature"),
        ),
        bad(
            "temperature range",
            C,
            json!({"model": MODEL, "prompt": "x", "temperature": 2.5}),
            Some("temperature"),
        ),
        bad(
            "top_p range",
            C,
            json!({"model": MODEL, "prompt": "x", "top_p": 1.5}),
            Some("top_p"),
        ),
        bad(
            "prompt type",
            C,
            json!({"model": MODEL, "prompt": {"text": "x"}}),
            Some("prompt"),
        ),
        bad("no prompt", C, json!({"model": MODEL}), Some("prompt")),
        bad("no model", C, json!({"prompt": "x"}), Some("model")),
        bad(
            "unknown field",
            C,
            json!({"model": MODEL, "prompt": "x", "frobnicate": true}),
            Some("frobnicate"),
        ),
        bad(
            "n > 1",
            C,
            json!({"model": MODEL, "prompt": "x", "n": 2}),
            Some("n"),
        ),
        bad(
            "echo",
            C,
            json!({"model": MODEL, "prompt": "x", "echo": true}),
            Some("echo"),
        ),
        bad(
            "stream type",
            C,
            json!({"model": MODEL, "prompt": "x", "stream": "yes"}),
            Some("stream"),
        ),
        bad(
            "stream_options without stream",
            C,
            json!({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": true}}),
            Some("stream_options"),
        ),
        bad(
            "five stops",
            C,
            json!({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            Some("stop"),
        ),
        bad(
            "max_tokens beyond positions",
            C,
            json!({"model": MODEL, "prompt": "x", "max_tokens": 65}),
            Some("max_tokens"),
        ),
        bad(
            "prompt too long",
            C,
            json!({"model": MODEL, "prompt": "word ".repeat(80), "max_tokens": 1}),
            Some("prompt"),
        )
        .code("context_length_exceeded"),
        bad(
            "prompt + max_tokens too long",
            C,
            json!({"model": MODEL, "prompt": "word ".repeat(40), "max_tokens": 30}),
            Some("prompt"),
        )
        .code("context_length_exceeded"),
        bad(
            "token id outside vocabulary",
            C,
            json!({"model": MODEL, "prompt": [2, 99999]}),
            Some("prompt"),
        ),
        bad(
            "unknown model",
            C,
            json!({"model": "gpt-4", "prompt": "x"}),
            Some("model"),
        )
        .status(404)
        .code("model_not_found"),
        bad(
            "body over the limit",
            C,
            json!({"model": MODEL, "prompt": "a".repeat(5000)}),
            None,
        )
        .status(413)
        .code("request_too_large"),
        bad("no API key", C, good.clone(), None)
            .key(None)
            .status(401)
            .code("invalid_api_key"),
        bad("wrong API key", C, good.clone(), None)
            .key(Some("sk-wrong"))
            .status(401)
            .code("invalid_api_key"),
        bad(
            "messages type",
            CHAT,
            json!({"model": MODEL, "messages": "hi"}),
            Some("messages"),
        ),
        bad(
            "no messages",
            CHAT,
            json!({"model": MODEL, "messages": []}),
            Some("messages"),
        ),
        bad(
            "bad role",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            Some("messages[0].role"),
        ),
        bad(
            "content type",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "user", "content": 7}]}),
            Some("messages[0].content"),
        ),
        bad(
            "image part",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            Some("messages[0].content[0]"),
        ),
        bad(
            "tools",
            CHAT,
            json!({"model": MODEL, "messages": user_hi, "tools": [{"type": "function"}]}),
            Some("tools"),
        ),
        // The default preamble alone is longer than the fixture's 64 positions.
        bad(
            "chat too long",
            CHAT,
            json!({"model": MODEL, "messages": user_hi}),
            Some("messages"),
        )
        .code("context_length_exceeded"),
        bad(
            "chat max_tokens beyond positions",
            CHAT,
            json!({"model": MODEL, "messages": sys_hi, "max_completion_tokens": 100}),
            Some("max_tokens"),
        ),
    ];
    for Case {
        what,
        path,
        body,
        key: k,
        status,
        param,
        code,
    } in cases
    {
        let url = s.url(path);
        let mut req = c.post(&url);
        req = match &body {
            Value::String(raw) => req
                .header("content-type", "application/json")
                .body(raw.clone()),
            _ => req.json(&body),
        };
        if let Some(k) = k {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let v: Value = resp.json().await.unwrap();
        let err = &v["error"];
        assert!(!err["message"].as_str().unwrap().is_empty(), "{what}: {v}");
        assert!(err["type"].is_string(), "{what}: {v}");
        assert_eq!(err["param"].as_str(), param, "{what}: {v}");
        if code.is_some() {
            assert_eq!(err["code"].as_str(), code, "{what}: {v}");
        }
        // The next good request still succeeds.
        let (st, ok) = post(&c, &cmpl, &good, Some(key)).await;
        assert_eq!(st, 200, "after {what}: {ok}");
        assert!(
            ok["choices"][0]["finish_reason"].is_string(),
            "after {what}: {ok}"
        );
    }
    // Unknown routes and wrong methods are JSON errors too.
    let resp = c
        .get(s.url("/v1/nope"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let resp = c.get(&cmpl).bearer_auth(key).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let resp = c
        .get(s.url("/v1/models/gpt-4"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Health and metrics need no key.
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
    let m = metrics(&c, &s).await;
    assert!(
        m.contains("flexgen_http_responses_total{route=\"/v1/completions\",status=\"413\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_all_answered() {
    // A long batch window lets the 32 requests, sent at once, meet in the queue.
    let s = Server::start(&[
        "--model",
        fixture(MODEL).to_str().unwrap(),
        "--max-batch",
        "32",
        "--batch-window-ms",
        "300",
    ]);
    let c = client();
    let r = Reference::new();
    let n = 32;
    let words = [
        "Paris",
        "Hello",
        "The",
        "A cat",
        "Rust is",
        "Once upon a time",
        "Why",
        "I",
    ];
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = c.clone();
        let prompt = format!("{} {i}", words[i % words.len()]);
        // Different lengths, and every fourth request sampled with its own seed.
        let max_tokens = 4 + i % 9;
        let temperature = if i % 4 == 3 { 0.8 } else { 0.0 };
        let chat = i % 2 == 1;
        let url = s.url(if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        });
        let mut body = json!({"model": MODEL, "max_tokens": max_tokens, "temperature": temperature,
                              "seed": i, "stream": true});
        if chat {
            body["messages"] =
                json!([{"role": "system", "content": "Hi."}, {"role": "user", "content": prompt}]);
        } else {
            body["prompt"] = json!(prompt);
        }
        tasks.push(tokio::spawn(async move {
            let chunks = stream(&c, &url, &body, None).await;
            let text: String = chunks
                .iter()
                .filter_map(|ch| {
                    let choice = &ch["choices"][0];
                    choice["text"]
                        .as_str()
                        .or(choice["delta"]["content"].as_str())
                })
                .collect();
            let reason = chunks.last().unwrap()["choices"][0]["finish_reason"].clone();
            (i, prompt, max_tokens, temperature, chat, text, reason)
        }));
    }
    let mut answered = 0;
    for t in tasks {
        let (i, prompt, max_tokens, temperature, chat, text, reason) = t.await.unwrap();
        assert!(
            reason == "stop" || reason == "length",
            "request {i}: {reason}"
        );
        answered += 1;
        if temperature == 0.0 {
            // Greedy rows must say exactly what they say alone: nothing mixed up between rows.
            let (p, cfg) = if chat {
                let msgs = [
                    ChatMessage::new(Role::System, "Hi."),
                    ChatMessage::new(Role::User, prompt.clone()),
                ];
                (
                    render(&msgs),
                    GenerationConfig::greedy(max_tokens).with_stop_string("\n"),
                )
            } else {
                (prompt.clone(), GenerationConfig::greedy(max_tokens))
            };
            let (expected, _, _) = r.greedy(&p, &cfg);
            let expected = if chat {
                expected.trim_start()
            } else {
                &expected
            };
            assert_eq!(text, expected, "request {i} ({prompt:?})");
        }
    }
    assert_eq!(answered, n);
    let m = metrics(&c, &s).await;
    let batches = metric(&m, "flexgen_batch_size_count");
    let rows = metric(&m, "flexgen_batch_size_sum");
    let largest = metric(&m, "flexgen_batch_size_max");
    assert_eq!(rows, n as f64, "{m}");
    assert!(largest > 1.0 && batches < n as f64, "no batching:\n{m}");
    assert!(
        m.contains("flexgen_requests_total{endpoint=\"completions\"} 16"),
        "{m}"
    );
    assert!(
        m.contains("flexgen_requests_total{endpoint=\"chat_completions\"} 16"),
        "{m}"
    );
    assert_eq!(metric(&m, "flexgen_queue_length"), 0.0);
    assert_eq!(metric(&m, "flexgen_cancelled_rows_total"), 0.0);
}

/// Waits until `cond` holds for the metrics text (or fails after `secs`).
async fn wait_metrics(
    c: &reqwest::Client,
    s: &Server,
    secs: u64,
    what: &str,
    cond: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let m = metrics(c, s).await;
        if cond(&m) {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn disconnected_clients_stop_costing_compute() {
    // Dummy OPT-125m is slow enough on CPU to disconnect mid-reply: 1500 tokens would take
    // a minute. One row per batch, so the second request waits in the queue.
    let s = Server::start(&["--dummy", "facebook/opt-125m", "--max-batch", "1"]);
    let c = client();
    let model = "facebook/opt-125m";
    let long = |stream: bool| json!({"model": model, "prompt": "Hello", "max_tokens": 1500, "stream": stream});

    // A streaming reply, dropped after its first chunk.
    let mut resp = c
        .post(s.url("/v1/completions"))
        .json(&long(true))
        .send()
        .await
        .unwrap();
    assert!(resp.chunk().await.unwrap().is_some());
    // A plain request queued behind it, whose client gives up while it waits.
    let c2 = c.clone();
    let url = s.url("/v1/completions");
    let body = long(false);
    let queued = tokio::spawn(async move { c2.post(url).json(&body).send().await });
    wait_metrics(&c, &s, 20, "a queued row", |m| {
        metric(m, "flexgen_queue_length") == 1.0
    })
    .await;
    queued.abort();
    drop(resp);
    let m = wait_metrics(&c, &s, 20, "both rows cancelled", |m| {
        metric(m, "flexgen_cancelled_rows_total") == 2.0 && metric(m, "flexgen_running_rows") == 0.0
    })
    .await;
    // The queued request never ran.
    assert_eq!(metric(&m, "flexgen_batch_size_count"), 1.0, "{m}");

    // A plain request dropped while it runs stops too.
    let c3 = c.clone();
    let url = s.url("/v1/completions");
    let body = long(false);
    let running = tokio::spawn(async move { c3.post(url).json(&body).send().await });
    wait_metrics(&c, &s, 20, "a running row", |m| {
        metric(m, "flexgen_running_rows") == 1.0
    })
    .await;
    running.abort();
    wait_metrics(&c, &s, 20, "the running row cancelled", |m| {
        metric(m, "flexgen_cancelled_rows_total") == 3.0 && metric(m, "flexgen_running_rows") == 0.0
    })
    .await;

    // And the server goes on serving.
    let body = json!({"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0});
    let (st, v) = post(&c, &s.url("/v1/completions"), &body, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn batches_stay_within_the_kv_cache_budget() {
    // The fixture's cache costs 2 layers x K,V x 16 x 4 bytes = 256 bytes per token and row:
    // a 2-token prompt with 10 new tokens needs 3072 bytes, so 7000 bytes hold two rows.
    let s = Server::start(&[
        "--model",
        fixture(MODEL).to_str().unwrap(),
        "--batch-window-ms",
        "300",
        "--max-kv-cache-bytes",
        "7000",
    ]);
    let c = client();
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 10, "temperature": 0});
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (c, url, body) = (c.clone(), s.url(C), body.clone());
            tokio::spawn(async move { post(&c, &url, &body, None).await })
        })
        .collect();
    let mut texts = Vec::new();
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    let m = metrics(&c, &s).await;
    assert_eq!(metric(&m, "flexgen_batch_size_max"), 2.0, "{m}");
    assert_eq!(metric(&m, "flexgen_batch_size_sum"), 6.0, "{m}");
}

#[tokio::test]
async fn an_offloaded_server_answers_like_the_library() {
    // Weights streamed from disk, KV cache in RAM; concurrent requests still share blocks.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&[
        "--model",
        fixture(MODEL).to_str().unwrap(),
        "--percent",
        "0",
        "0",
        "100",
        "0",
        "100",
        "0",
        "--offload-dir",
        dir.path().to_str().unwrap(),
        "--batch-window-ms",
        "300",
    ]);
    let c = client();
    let r = Reference::new();
    let prompts = [
        "Paris is the capital city of",
        "Hello, my name is",
        "The",
        "Why",
    ];
    let mut tasks = Vec::new();
    for p in prompts {
        let (c, url) = (c.clone(), s.url("/v1/completions"));
        let body = json!({"model": MODEL, "prompt": p, "max_tokens": 7, "temperature": 0});
        tasks.push(tokio::spawn(
            async move { post(&c, &url, &body, None).await },
        ));
    }
    for (p, t) in prompts.iter().zip(tasks) {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        let (text, _, _) = r.greedy(p, &GenerationConfig::greedy(7));
        assert_eq!(v["choices"][0]["text"], text, "{p}");
    }
    let m = metrics(&c, &s).await;
    assert!(metric(&m, "flexgen_completion_tokens_total") >= 4.0, "{m}");
}
