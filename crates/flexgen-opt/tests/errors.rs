//! Bad input gives a typed error that names the file, tensor, shape or dtype, never a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

use flexgen_opt::{generate, Error, Flow, GenerationConfig, OptModel};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Copies a fixture to a temp folder, letting `edit` rewrite its tensors.
fn edited_copy(
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let src = common::fixture("tiny-preln-f32");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: HashMap<String, TensorView<'_>> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match OptModel::from_pretrained(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_folder() {
    let err = load_err(Path::new("/nonexistent/opt-model"));
    assert!(
        err.contains("model folder") && err.contains("/nonexistent/opt-model"),
        "{err}"
    );
}

#[test]
fn missing_config_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        common::fixture("tiny-preln-f32").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn malformed_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": \"big\"").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("invalid config"),
        "{err}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let src = common::fixture("tiny-preln-f32");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    for (what, data) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header only", bytes[..6].to_vec()),
        ("garbage header", {
            let mut b = bytes.clone();
            b[8..40].fill(b'#');
            b
        }),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), data).unwrap();
        let err = load_err(dir.path());
        assert!(
            err.contains("bad safetensors file") && err.contains("model.safetensors"),
            "{what}: {err}"
        );
    }
}

#[test]
fn missing_tensor() {
    let dir = edited_copy(|t| t.retain(|(n, ..)| !n.ends_with("layers.1.fc2.weight")));
    let err = load_err(dir.path());
    assert!(
        err.contains("decoder.layers.1.fc2.weight") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn wrong_shape() {
    let dir = edited_copy(|t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n.ends_with("layers.0.fc1.weight"))
            .unwrap();
        e.2 = vec![e.2[1], e.2[0]];
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("fc1.weight") && err.contains("[16, 32]") && err.contains("[32, 16]"),
        "{err}"
    );
}

#[test]
fn unsupported_dtype() {
    let dir = edited_copy(|t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n.ends_with("layers.0.self_attn.q_proj.weight"))
            .unwrap();
        e.1 = Dtype::I32;
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("q_proj.weight") && err.contains("I32"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_positions() {
    let model = OptModel::from_pretrained(common::fixture("tiny-preln-f32")).unwrap();
    let max = model.config().max_position_embeddings;
    let prompt = vec![2u32; max - 3];
    let cfg = GenerationConfig::greedy(8);
    let err = generate(&model, &[vec![2, 3], prompt.clone()], &cfg, None, |_| {
        Flow::Continue
    })
    .unwrap_err();
    assert!(matches!(err, Error::PromptTooLong { row: 1, .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("{max} positions")),
        "{err}"
    );
    // Exactly fitting works: prompt + new - 1 == max positions.
    let cfg = GenerationConfig::greedy(4);
    assert!(generate(&model, &[prompt], &cfg, None, |_| Flow::Continue).is_ok());
}

#[test]
fn bad_requests() {
    let model = OptModel::from_pretrained(common::fixture("tiny-preln-f32")).unwrap();
    let cfg = GenerationConfig::greedy(2);
    let run =
        |p: &[Vec<u32>], c: &GenerationConfig| generate(&model, p, c, None, |_| Flow::Continue);
    assert!(matches!(run(&[], &cfg), Err(Error::InvalidRequest(_))));
    assert!(matches!(
        run(&[vec![]], &cfg),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        run(&[vec![2, 60000]], &cfg),
        Err(Error::TokenOutOfRange { id: 60000, .. })
    ));
    let stop = GenerationConfig::greedy(2).with_stop_string("x");
    assert!(matches!(
        run(&[vec![2]], &stop),
        Err(Error::InvalidRequest(_))
    ));
    let hot = GenerationConfig::greedy(2).with_temperature(-1.0);
    assert!(matches!(
        run(&[vec![2]], &hot),
        Err(Error::InvalidRequest(_))
    ));
}
