//! The `batch` example end to end on a fixture checkpoint: JSONL in and out, agreement with
//! `completion` on each row alone, kill and resume, malformed lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<test-binary> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    dir.join(name)
}

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-preln-f32")
}

fn batch(input: &Path, output: &Path, extra: &[&str]) -> Output {
    Command::new(example("batch"))
        .arg("--model")
        .arg(model())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--max-new-tokens", "6", "--block-size", "8"])
        .args(extra)
        .output()
        .unwrap()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// 50 rows of 1 to 30 words; every 7th asks for its own length, every 5th stops at "e".
fn rows() -> Vec<Value> {
    let words = [
        "the",
        "river",
        "Paris",
        "is",
        "a",
        "quick",
        "brown",
        "fox",
        "over",
        "lazy",
        "dog",
        "and",
        "capital",
        "city",
        "of",
        "mountains",
    ];
    (0..50)
        .map(|i| {
            let n = 1 + (i * 13) % 30;
            let prompt: Vec<&str> = (0..n).map(|k| words[(i + k * 3) % words.len()]).collect();
            let mut row = json!({"id": format!("row-{i}"), "prompt": prompt.join(" ")});
            if i % 7 == 0 {
                row["max_new_tokens"] = json!(2 + i % 5);
            }
            if i % 5 == 0 {
                row["stop"] = json!("e");
            }
            row
        })
        .collect()
}

fn write_rows(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn by_id(lines: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for l in lines {
        let id = l["id"].to_string();
        assert!(map.insert(id.clone(), l.clone()).is_none(), "{id} twice");
    }
    map
}

#[test]
fn fifty_rows_match_completion_on_each_row_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let rows = rows();
    write_rows(&input, &rows);
    let out = batch(&input, &output, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("progress: 50/50 rows"), "{err}");
    let got = by_id(&read_jsonl(&output));
    assert_eq!(got.len(), 50);
    // Each row alone through `completion`, four processes at a time.
    for chunk in rows.chunks(4) {
        let children: Vec<_> = chunk
            .iter()
            .map(|row| {
                let max_new = row["max_new_tokens"].as_u64().unwrap_or(6).to_string();
                let mut cmd = Command::new(example("completion"));
                cmd.arg("--model")
                    .arg(model())
                    .args(["--prompt", row["prompt"].as_str().unwrap()])
                    .args(["--max-new-tokens", &max_new, "--json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                if let Some(stop) = row["stop"].as_str() {
                    cmd.args(["--stop", stop]);
                }
                cmd.spawn().unwrap()
            })
            .collect();
        for (row, child) in chunk.iter().zip(children) {
            let alone = child.wait_with_output().unwrap();
            assert!(alone.status.success());
            let alone: Value = serde_json::from_slice(&alone.stdout).unwrap();
            let line = &got[&row["id"].to_string()];
            assert_eq!(line["text"], alone["text"], "{row}");
            assert_eq!(line["token_ids"], alone["token_ids"], "{row}");
            assert_eq!(line["finish_reason"], alone["finish_reason"], "{row}");
            let n = line["token_ids"].as_array().unwrap().len();
            assert_eq!(line["completion_tokens"], json!(n));
            assert!(line["prompt_tokens"].as_u64().unwrap() >= 2);
        }
    }
}

#[test]
fn a_killed_run_resumes_with_every_id_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut rows = rows();
    rows.truncate(30);
    // Sampled rows too: row n's seed depends on its line, not on its block.
    for row in rows.iter_mut().step_by(3) {
        row["temperature"] = json!(0.8);
    }
    write_rows(&input, &rows);
    let full = dir.path().join("full.jsonl");
    assert!(batch(&input, &full, &[]).status.success());

    let out = dir.path().join("out.jsonl");
    let killed = batch(&input, &out, &["--abort-after", "13"]);
    assert!(
        !killed.status.success(),
        "the hidden --abort-after kills the run"
    );
    assert_eq!(
        read_jsonl(&out).len(),
        13,
        "rows written before the kill stay"
    );
    // A kill in the middle of a write leaves a partial line behind.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text.push_str("{\"id\":\"row-2");
    std::fs::write(&out, text).unwrap();

    let again = batch(&input, &out, &[]);
    assert!(!again.status.success(), "an existing output needs --resume");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = batch(&input, &out, &["--resume"]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("13 rows already done") && err.contains("incomplete"),
        "{err}"
    );
    let got = by_id(&read_jsonl(&out));
    assert_eq!(got, by_id(&read_jsonl(&full)));
    // Resuming a finished job does nothing.
    assert!(batch(&input, &out, &["--resume"]).status.success());
    assert_eq!(read_jsonl(&out).len(), 30);
}

#[test]
fn malformed_lines_are_reported_with_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let long = "word ".repeat(80);
    let lines = [
        json!({"id": "ok-1", "prompt": "Hello there"}).to_string(),
        "{not json".to_string(),
        json!({"id": "no-prompt"}).to_string(),
        json!({"id": [1], "prompt": "x"}).to_string(),
        json!({"id": "ok-1", "prompt": "duplicate"}).to_string(),
        json!({"id": "too-long", "prompt": long}).to_string(),
        json!({"id": "cold", "prompt": "x", "temperature": -1}).to_string(),
        String::new(),
        json!({"id": 9, "prompt": "last one", "stop": ["a", "b"]}).to_string(),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = batch(&input, &output, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (n, what) in [
        (2, "JSON"),
        (3, "prompt"),
        (4, "id"),
        (5, "duplicate"),
        (6, "positions"),
        (7, "temperature"),
    ] {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("line {n}:")))
            .unwrap_or_else(|| panic!("no report of line {n}: {err}"));
        assert!(line.contains(what), "{line}");
    }
    let written = read_jsonl(&output);
    let errors: Vec<u64> = written
        .iter()
        .filter(|l| l.get("error").is_some())
        .map(|l| l["line"].as_u64().unwrap())
        .collect();
    assert_eq!(errors, [2, 3, 4, 5, 6, 7]);
    let done: Vec<&Value> = written.iter().filter(|l| l.get("text").is_some()).collect();
    assert_eq!(done.len(), 2);
    assert!(done.iter().any(|l| l["id"] == json!(9)));
    // The error rows count as done on --resume: nothing is written twice.
    assert!(batch(&input, &output, &["--resume"]).status.success());
    assert_eq!(read_jsonl(&output).len(), written.len());
}

#[test]
fn an_offloaded_batch_writes_the_in_memory_results() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let rows = rows();
    write_rows(&input, &rows);
    let plain = dir.path().join("plain.jsonl");
    assert!(batch(&input, &plain, &[]).status.success());
    let offloaded = dir.path().join("offloaded.jsonl");
    let offload_dir = dir.path().join("offload");
    std::fs::create_dir(&offload_dir).unwrap();
    let out = batch(
        &input,
        &offloaded,
        &[
            "--percent",
            "0",
            "0",
            "100",
            "0",
            "100",
            "0",
            "--gpu-batch-size",
            "3",
            "--num-gpu-batches",
            "2",
            "--offload-dir",
            offload_dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (want, got) = (by_id(&read_jsonl(&plain)), by_id(&read_jsonl(&offloaded)));
    assert_eq!(got.len(), 50);
    for (id, line) in &want {
        assert_eq!(&got[id], line, "row {id}");
    }
}
