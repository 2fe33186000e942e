//! The `completion` example end to end, as a user runs it (`cargo test` builds examples first).

use std::path::PathBuf;
use std::process::Command;

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

/// Runs a `completion --json` command, asserts it succeeded (naming `what` and its stderr
/// otherwise) and returns its output lines parsed.
fn json_lines(cmd: &mut Command, what: &str) -> Vec<Value> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn completion_json_matches_hf_greedy_in_input_order() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-postln-proj").join("reference.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<&str> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, format!("{}\n{}\n", prompts[1], prompts[2])).unwrap();
    let lines = json_lines(
        Command::new(example("completion"))
            .arg("--model")
            .arg(fixture("tiny-postln-proj"))
            .args(["--prompt", prompts[0], "--prompts-file"])
            .arg(&file)
            .args(["--max-new-tokens", "8", "--json"]),
        "completion",
    );
    assert_eq!(lines.len(), 3);
    for (row, line) in lines.iter().enumerate() {
        assert_eq!(line["prompt"], prompts[row]);
        assert_eq!(line["token_ids"], r["greedy_new_tokens"][row], "row {row}");
        assert!(line["text"].is_string());
    }
}

#[test]
fn completion_reports_bad_input_without_panicking() {
    let run = |args: &[&str]| {
        let out = Command::new(example("completion"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let model = fixture("tiny-preln-f32");
    let model = model.to_str().unwrap();
    let (ok, err) = run(&["--model", "/no/such/model", "--prompt", "hi"]);
    assert!(
        !ok && err.contains("/no/such/model") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, err) = run(&["--model", model, "--prompts-file", "/no/such/prompts.txt"]);
    assert!(!ok && err.contains("/no/such/prompts.txt"), "{err}");
    let long = "word ".repeat(100);
    let (ok, err) = run(&["--model", model, "--prompt", &long]);
    assert!(
        !ok && err.contains("positions") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, err) = run(&["--model", model, "--prompt", "hi", "--top-p", "2"]);
    assert!(!ok && err.contains("top_p"), "{err}");
}

#[test]
fn completion_without_prompt_runs_flexgens_few_shot_prompts() {
    let out = Command::new(example("completion"))
        .arg("--model")
        .arg(fixture("tiny-preln-f32"))
        .args(["--max-new-tokens", "4", "--seed", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["prompt"]
        .as_str()
        .unwrap()
        .contains("Where were the 2004 Olympics held?"));
    assert!(lines[1]["prompt"]
        .as_str()
        .unwrap()
        .contains("Extract the airport codes"));
    for line in &lines {
        let n = line["token_ids"].as_array().unwrap().len();
        assert!((1..=4).contains(&n), "{line}");
        // Sampled replies stop at the end of the line.
        assert!(!line["text"].as_str().unwrap().contains('\n'), "{line}");
    }
}

#[test]
fn completion_under_an_offloading_policy_matches_hf_greedy() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-postln-proj").join("reference.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<String> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let run = |flags: &[&str]| {
        let mut cmd = Command::new(example("completion"));
        cmd.arg("--model").arg(fixture("tiny-postln-proj"));
        for p in &prompts {
            cmd.args(["--prompt", p]);
        }
        cmd.args(["--max-new-tokens", "8", "--json", "--offload-dir"])
            .arg(dir.path())
            .args(flags);
        let lines = json_lines(&mut cmd, &format!("{flags:?}"));
        assert_eq!(lines.len(), prompts.len(), "{flags:?}");
        lines
    };
    // Weights on disk, two blocks of micro-batches of one row: HF's greedy tokens.
    for flags in [
        &[
            "--percent",
            "0",
            "0",
            "100",
            "0",
            "100",
            "0",
            "--gpu-batch-size",
            "1",
            "--num-gpu-batches",
            "2",
        ][..],
        &[
            "--percent",
            "50",
            "20",
            "0",
            "100",
            "100",
            "0",
            "--overlap",
            "false",
        ][..],
    ] {
        for (row, line) in run(flags).iter().enumerate() {
            assert_eq!(
                line["token_ids"], r["greedy_new_tokens"][row],
                "{flags:?} row {row}"
            );
        }
    }
    // Compressed cache and weights: every row still generates (values differ from f32).
    for line in run(&["--compress-cache", "--compress-weight"]) {
        assert!(!line["token_ids"].as_array().unwrap().is_empty(), "{line}");
    }
    // The offload directory is left empty (private subfolders removed).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
