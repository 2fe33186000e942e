//! The `chatbot` example driven through stdin on a fixture checkpoint, as a script would.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use flexgen_opt::chat::{render, ChatMessage, Role};
use serde_json::Value;

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<test-binary> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    dir.join(name)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

const SYSTEM: &str = "A short chat.";

/// Runs the chatbot greedily with `extra` flags, feeding `input` on stdin.
fn chat(input: &str, extra: &[&str]) -> Output {
    let mut child = Command::new(example("chatbot"))
        .arg("--model")
        .arg(fixture("tiny-preln-f32"))
        .args([
            "--system",
            SYSTEM,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chatbot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The replies in a transcript (the text after each `Assistant: ` label).
fn replies(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| {
            l.split_once("Assistant: ")
                .map(|(_, r)| r.trim().to_string())
        })
        .collect()
}

/// `(reused, prefilled)` of every turn from the `--stats` lines.
fn stats(stderr: &[u8]) -> Vec<(usize, usize)> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| {
            let inner = l.split_once(" tokens (")?.1;
            let (reused, rest) = inner.split_once(" reused, ")?;
            let prefilled = rest.split_once(" prefilled")?.0;
            Some((reused.parse().ok()?, prefilled.parse().ok()?))
        })
        .collect()
}

/// The reply `completion` gives when the whole conversation is its prompt (full recompute).
fn recomputed_reply(messages: &[ChatMessage]) -> String {
    let out = Command::new(example("completion"))
        .arg("--model")
        .arg(fixture("tiny-preln-f32"))
        .args(["--prompt", &render(messages)])
        .args(["--max-new-tokens", "8", "--stop", "\n", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    line["text"].as_str().unwrap().trim().to_string()
}

#[test]
fn several_turns_stream_and_an_empty_line_exits() {
    let mut child = Command::new(example("chatbot"))
        .arg("--model")
        .arg(fixture("tiny-preln-f32"))
        .args(["--system", SYSTEM, "--max-new-tokens", "6", "--seed", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Each reply must be on stdout before the next message is even sent.
    let mut transcript = String::new();
    for msg in ["Hello!", "How are you?", "Tell me a joke."] {
        stdin.write_all(format!("{msg}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let mut echoed = String::new();
        stdout.read_line(&mut echoed).unwrap();
        assert_eq!(echoed, format!("Human: {msg}\n"));
        let mut reply = String::new();
        stdout.read_line(&mut reply).unwrap();
        assert!(reply.starts_with("Assistant: "), "{reply:?}");
        transcript.push_str(&echoed);
        transcript.push_str(&reply);
    }
    stdin.write_all(b"\nthis line is never read\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest, "Human: \n", "the empty line ends the chat");
    assert_eq!(replies(transcript.as_bytes()).len(), 3);
}

#[test]
fn kv_reuse_gives_the_same_replies_as_full_recompute() {
    let msgs = ["Hi there!", "What is the tallest mountain?", "Thanks"];
    let input = format!("{}\n\n", msgs.join("\n"));
    let reuse = chat(&input, &["--stats"]);
    let recompute = chat(&input, &["--stats", "--no-kv-reuse"]);
    assert_eq!(
        String::from_utf8_lossy(&reuse.stdout),
        String::from_utf8_lossy(&recompute.stdout)
    );
    let got = replies(&reuse.stdout);
    assert_eq!(got.len(), 3);
    // Later turns reuse the cache and prefill only part of the prompt; recompute never does.
    let with = stats(&reuse.stderr);
    let without = stats(&recompute.stderr);
    assert_eq!(with.len(), 3);
    assert!(with[1].0 > 0 && with[2].0 > with[1].0, "{with:?}");
    assert!(
        without.iter().all(|&(reused, _)| reused == 0),
        "{without:?}"
    );
    // And the replies are what `completion` gives on the whole conversation from scratch.
    let mut conv = vec![ChatMessage::new(Role::System, SYSTEM)];
    for (msg, reply) in msgs.iter().zip(&got) {
        conv.push(ChatMessage::new(Role::User, *msg));
        assert_eq!(&recomputed_reply(&conv), reply, "turn {msg:?}");
        conv.push(ChatMessage::new(Role::Assistant, reply.clone()));
    }
}

#[test]
fn context_overflow_drops_oldest_turns_and_matches_recompute() {
    // The fixture has 64 positions: a few exchanges fill it.
    let input: String = (0..6)
        .map(|i| format!("message {i} with a few more words\n"))
        .chain(["/reset\n".to_string(), "fresh start\n".to_string()])
        .collect();
    let reuse = chat(&input, &["--stats"]);
    let recompute = chat(&input, &["--no-kv-reuse"]);
    assert_eq!(
        String::from_utf8_lossy(&reuse.stdout),
        String::from_utf8_lossy(&recompute.stdout)
    );
    assert_eq!(replies(&reuse.stdout).len(), 7);
    let err = String::from_utf8_lossy(&reuse.stderr);
    assert!(
        err.contains("dropped the oldest") && err.contains("kept the preamble"),
        "{err}"
    );
    assert!(err.contains("(conversation reset)"), "{err}");
    // The turn that dropped exchanges (its note comes before its stats line) still reuses
    // the preamble's cache.
    let after_note: String = err
        .lines()
        .skip_while(|l| !l.starts_with("note: the conversation"))
        .find(|l| l.starts_with("[turn"))
        .unwrap()
        .to_string();
    let (reused, _) = stats(after_note.as_bytes())[0];
    assert!(reused > 0, "{after_note}");
}

#[test]
fn bad_input_is_reported_and_the_chat_goes_on() {
    let long = "word ".repeat(80);
    let out = chat(&format!("{long}\nshort one\n"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error:") && err.contains("positions") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(
        replies(&out.stdout).len(),
        2,
        "both turns get an Assistant line"
    );

    let run = |args: &[&str]| {
        let out = Command::new(example("chatbot"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&["--model", "/no/such/model"]);
    assert!(
        !ok && err.contains("/no/such/model") && !err.contains("panicked"),
        "{err}"
    );
    let model = fixture("tiny-preln-f32");
    let (ok, err) = run(&["--model", model.to_str().unwrap(), "--top-p", "2"]);
    assert!(!ok && err.contains("top_p"), "{err}");
}

#[test]
fn offloaded_chat_gives_the_in_memory_replies_including_overflow() {
    // Weights streamed from disk, small micro-batches, no overlap: same greedy transcript as
    // the in-memory chat with KV reuse, through the context overflow too.
    let input: String = (0..6)
        .map(|i| format!("message {i} with a few more words\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let in_memory = chat(&input, &["--stats"]);
    for flags in [
        vec!["--percent", "0", "0", "100", "0", "100", "0"],
        vec![
            "--percent",
            "30",
            "30",
            "50",
            "0",
            "100",
            "0",
            "--overlap",
            "false",
        ],
    ] {
        let mut args = flags.clone();
        args.extend(["--offload-dir", dir.path().to_str().unwrap(), "--stats"]);
        let offloaded = chat(&input, &args);
        assert_eq!(
            String::from_utf8_lossy(&offloaded.stdout),
            String::from_utf8_lossy(&in_memory.stdout),
            "{flags:?}"
        );
        let err = String::from_utf8_lossy(&offloaded.stderr);
        assert!(err.contains("offloaded: --percent"), "{err}");
        assert!(err.contains("dropped the oldest"), "{err}");
        // Each turn prefills the whole conversation.
        assert!(
            stats(&offloaded.stderr).iter().all(|&(r, _)| r == 0),
            "{err}"
        );
    }
    // Compressed cache: runs, replies every turn (values differ from the f32 cache).
    let out = chat("hello\nhow are you\n", &["--compress-cache"]);
    assert_eq!(replies(&out.stdout).len(), 2);
    // An impossible policy is refused before the chat starts, naming the number.
    let out = Command::new(example("chatbot"))
        .arg("--model")
        .arg(fixture("tiny-preln-f32"))
        .args(["--percent", "80", "30", "100", "0", "100", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("wg+wc") && !err.contains("panicked"),
        "{err}"
    );
}
