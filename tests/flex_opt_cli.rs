//! The `flex_opt` example end to end: policy flags, metrics, policy errors, and the disk tier's
//! files removed on exit and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

fn flex_opt(offload: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(example("flex_opt"))
        .arg("--model")
        .arg(fixture("tiny-preln-f16"))
        .arg("--offload-dir")
        .arg(offload)
        .args(["--prompt-len", "6", "--gen-len", "5", "--json"])
        .args(extra)
        .output()
        .unwrap()
}

fn json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

#[test]
fn policies_report_tiers_io_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let ram = json(&flex_opt(
        dir.path(),
        &["--gpu-batch-size", "2", "--num-gpu-batches", "2"],
    ));
    assert_eq!(ram["batch_size"], 4);
    assert_eq!(ram["io_read_bytes"], 0);
    assert!(ram["total_throughput_tok_s"].as_f64().unwrap() > 0.0);
    assert!(ram["compute_s"].as_f64().unwrap() > 0.0);
    let disk = json(&flex_opt(
        dir.path(),
        &[
            "--gpu-batch-size",
            "2",
            "--num-gpu-batches",
            "2",
            "--percent",
            "0",
            "0",
            "0",
            "50",
            "100",
            "0",
            "--overlap",
            "false",
            "--sep-layer",
            "0",
        ],
    ));
    let w = disk["weight_bytes"].as_array().unwrap();
    // Only 1-D weights stay on the compute tier; every 2-D weight is on disk.
    assert!(w[2].as_u64().unwrap() > 20 * w[0].as_u64().unwrap());
    // Each token reads the disk-homed weights once for the whole block, plus the cache.
    assert!(disk["io_read_bytes"].as_u64().unwrap() >= 5 * w[2].as_u64().unwrap());
    assert!(disk["io_read_s"].as_f64().unwrap() > 0.0);
    let peak = disk["peak_tier_bytes"].as_array().unwrap();
    assert!(peak[1].as_u64().unwrap() > 0 && peak[2].as_u64().unwrap() > 0);
    assert_eq!(disk["overlap"], false);
    // Nothing is left in the offload directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn impossible_policies_are_rejected_naming_the_number() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expect) in [
        (
            vec!["--percent", "60", "50", "100", "0", "100", "0"],
            "--percent wg+wc",
        ),
        (
            vec!["--percent", "100", "0", "100", "0", "50", "50"],
            "--percent hg hc",
        ),
        (
            vec!["--percent", "-1", "0", "100", "0", "100", "0"],
            "--percent wg = -1",
        ),
        (vec!["--gpu-batch-size", "0"], "--gpu-batch-size = 0"),
        (vec!["--attn-sparsity", "1.5"], "--attn-sparsity = 1.5"),
        (vec!["--overlap", "maybe"], "expected a boolean"),
        (vec!["--int8-activations"], "add --compress-weight"),
        (
            vec!["--comp-weight-bits", "8"],
            "apply to --compress-weight",
        ),
        (
            vec!["--compress-weight", "--comp-weight-bits", "3"],
            "num_bits",
        ),
        (
            vec!["--compress-weight", "--comp-weight-group-size", "0"],
            "group_size",
        ),
    ] {
        let out = flex_opt(dir.path(), &args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// 8-bit weights in groups of 256 with int8 activations (32 rows, so the int8 path runs where
/// the CPU has AVX-512 VNNI) generate and are reported as such.
#[test]
fn eight_bit_weights_with_int8_activations_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = json(&flex_opt(
        dir.path(),
        &[
            "--compress-weight",
            "--comp-weight-bits",
            "8",
            "--comp-weight-group-size",
            "256",
            "--int8-activations",
            "--gpu-batch-size",
            "32",
        ],
    ));
    assert_eq!(m["dtype"], "8-bit/g256");
    assert_eq!(m["batch_size"], 32);
    assert!(m["total_throughput_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn ctrl_c_removes_the_offload_files() {
    let dir = tempfile::tempdir().unwrap();
    // Large enough to still be generating when interrupted: weights on disk, many tokens.
    let mut child = Command::new(example("flex_opt"))
        .args([
            "--model",
            "facebook/opt-125m",
            "--path",
            "_DUMMY_",
            "--offload-dir",
        ])
        .arg(dir.path())
        .args([
            "--percent",
            "0",
            "0",
            "100",
            "0",
            "100",
            "0",
            "--prompt-len",
            "8",
            "--gen-len",
            "1500",
        ])
        .args(["--gpu-batch-size", "1", "--warmup", "0", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let weights = loop {
        let found = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("weights.bin"))
            .find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no offload files appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let it place the weights and start generating.
    std::thread::sleep(Duration::from_millis(1500));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(130), "exit status {code:?}");
    assert!(!weights.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
