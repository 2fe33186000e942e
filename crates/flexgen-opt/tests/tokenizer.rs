//! The OPT tokenizer against the 57 test vectors of `../shared/data/opt-tokenizer`.

mod common;

use flexgen_opt::{GenerationConfig, OptTokenizer};
use serde_json::Value;

fn vectors() -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(common::tokenizer_dir().join("test_vectors.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

fn check_all(tok: &OptTokenizer) {
    let cases = vectors();
    assert_eq!(cases.len(), 57);
    for (text, ids) in &cases {
        assert_eq!(&tok.encode(text).unwrap(), ids, "encode {text:?}");
        // Decoding everything after BOS gives the text back, special tokens included.
        assert_eq!(
            &tok.decode_with_special(&ids[1..]).unwrap(),
            text,
            "decode {ids:?}"
        );
        // Plain decoding drops the special tokens.
        let plain = text.replace("</s>", "").replace("<pad>", "");
        assert_eq!(tok.decode(ids).unwrap(), plain, "decode {ids:?}");
    }
}

#[test]
fn tokenizer_json_encodes_and_decodes_all_vectors() {
    let tok = OptTokenizer::from_file(common::tokenizer_dir().join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 50265);
    check_all(&tok);
}

#[test]
fn vocab_and_merges_fallback_agrees() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(common::tokenizer_dir().join(f), dir.path().join(f)).unwrap();
    }
    let tok = OptTokenizer::from_dir(dir.path()).unwrap();
    check_all(&tok);
}

#[test]
fn streaming_decode_reassembles_the_text() {
    let tok = OptTokenizer::from_dir(common::tokenizer_dir()).unwrap();
    for (text, ids) in vectors() {
        let text = text.replace("</s>", "").replace("<pad>", "");
        let mut dec = tok.stream_decoder();
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.step(&tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}') || text.contains('\u{FFFD}'),
                "{text:?}"
            );
            out.push_str(&piece);
        }
        out.push_str(&dec.flush(&tok).unwrap());
        assert_eq!(out, text);
    }
}

#[test]
fn missing_tokenizer_names_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let err = OptTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer") && err.contains(&dir.path().display().to_string()));
    let _ = GenerationConfig::default();
}
