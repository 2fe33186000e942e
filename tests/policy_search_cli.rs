//! The policy search end to end: `policy_search` prints a flex_opt command line that runs, and
//! `flex_opt --policy auto` searches, runs and reports predicted next to measured. A quick
//! calibration (tiny sizes) stands in for the real one, so the test stays fast.

use std::path::{Path, PathBuf};
use std::process::Command;

use flexgen::offload::search::{calibrate, CalibrationSettings};
use serde_json::Value;

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

/// A quickly calibrated profile for `offload`, saved at `dir/profile.json`.
fn quick_profile(dir: &Path, offload: &Path) -> PathBuf {
    let p = calibrate(offload, &CalibrationSettings::quick(), &mut |_| {}).unwrap();
    let path = dir.join("profile.json");
    p.save(&path).unwrap();
    path
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_printed_command_runs_the_searched_policy() {
    let dir = tempfile::tempdir().unwrap();
    let offload = dir.path().join("offload");
    let profile = quick_profile(dir.path(), &offload);
    let model = fixture("tiny-preln-f16");
    let out = stdout(
        &Command::new(example("policy_search"))
            .arg("--model")
            .arg(&model)
            .arg("--offload-dir")
            .arg(&offload)
            .arg("--profile")
            .arg(&profile)
            .args(["--prompt-len", "6", "--gen-len", "5", "--ram-limit", "256M"])
            .args(["--max-gpu-batch-size", "4", "--max-num-gpu-batches", "2"])
            .output()
            .unwrap(),
    );
    assert!(
        out.contains("predicted:") && out.contains("peak memory:"),
        "{out}"
    );
    let cmd = out
        .lines()
        .find(|l| l.contains("--example flex_opt -- "))
        .unwrap_or_else(|| panic!("no flex_opt command in {out}"));
    assert!(cmd.starts_with("tools/memcap.sh 256M -- "), "{cmd}");
    let args: Vec<&str> = cmd
        .split_once("--example flex_opt -- ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let value = |flag: &str| {
        let i = args.iter().position(|a| *a == flag).unwrap();
        args[i + 1].parse::<usize>().unwrap()
    };
    let (gbs, ngb) = (value("--gpu-batch-size"), value("--num-gpu-batches"));
    assert!((1..=4).contains(&gbs) && (1..=2).contains(&ngb), "{cmd}");
    let run = stdout(
        &Command::new(example("flex_opt"))
            .args(&args)
            .arg("--json")
            .output()
            .unwrap(),
    );
    let m: Value = serde_json::from_str(run.trim()).unwrap();
    assert_eq!(m["batch_size"], gbs * ngb);
    assert!(m["total_throughput_tok_s"].as_f64().unwrap() > 0.0);
    assert_eq!(m["predicted"], Value::Null);
    // A memory limit nothing fits in is an error naming the memory.
    let out = Command::new(example("policy_search"))
        .arg("--model")
        .arg(&model)
        .arg("--offload-dir")
        .arg(&offload)
        .arg("--profile")
        .arg(&profile)
        .args(["--prompt-len", "6", "--gen-len", "5", "--ram-limit", "1M"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no policy fits"),
        "{err}"
    );
}

#[test]
fn flex_opt_policy_auto_reports_predicted_and_measured() {
    let dir = tempfile::tempdir().unwrap();
    let offload = dir.path().join("offload");
    let profile = quick_profile(dir.path(), &offload);
    let out = Command::new(example("flex_opt"))
        .env("FLEXGEN_PROFILE", &profile)
        .arg("--model")
        .arg(fixture("tiny-preln-f32"))
        .arg("--offload-dir")
        .arg(&offload)
        .args([
            "--prompt-len",
            "6",
            "--gen-len",
            "5",
            "--policy",
            "auto",
            "--json",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("policy auto"), "{err}");
    // The saved profile was fresh, so nothing was calibrated.
    assert!(!err.contains("calibrating"), "{err}");
    let m: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let p = &m["predicted"];
    assert!(p["total_throughput"].as_f64().unwrap() > 0.0, "{m}");
    assert_eq!(p["block_size"], m["batch_size"]);
    assert!(m["total_throughput_tok_s"].as_f64().unwrap() > 0.0);
}
