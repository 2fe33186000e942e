//! `generate_rows`: rows with different configs in one batch give what each gives alone.

mod common;

use flexgen_opt::{
    generate, generate_rows, Error, FinishReason, Flow, GenerationConfig, OptModel, OptTokenizer,
};

fn setup() -> (OptModel, OptTokenizer) {
    let model = OptModel::from_pretrained(common::fixture("tiny-preln-f32")).unwrap();
    let tok = OptTokenizer::from_dir(common::tokenizer_dir()).unwrap();
    (model, tok)
}

#[test]
fn mixed_configs_match_rows_run_alone() {
    let (model, tok) = setup();
    let prompts: Vec<Vec<u32>> = ["Hello, my name is", "The", "Paris is the capital city of"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let cfgs = vec![
        GenerationConfig::greedy(9),
        GenerationConfig::greedy(3)
            .with_temperature(0.9)
            .with_top_p(0.8)
            .with_seed(11),
        GenerationConfig::greedy(6)
            .with_temperature(1.2)
            .with_top_k(40)
            .with_seed(5),
    ];
    let mut streamed = vec![String::new(); prompts.len()];
    let batched = generate_rows(&model, &prompts, &cfgs, Some(&tok), |ev| {
        streamed[ev.row].push_str(ev.text);
        Flow::Continue
    })
    .unwrap();
    for (row, (p, cfg)) in prompts.iter().zip(&cfgs).enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), cfg, Some(&tok), |_| {
            Flow::Continue
        })
        .unwrap();
        assert_eq!(batched[row], alone[0], "row {row}");
        assert_eq!(streamed[row], batched[row].text, "row {row}");
        assert!(batched[row].token_ids.len() <= cfg.max_new_tokens);
    }
    assert_eq!(batched[1].token_ids.len(), 3);
    assert_eq!(batched[1].finish_reason, FinishReason::Length);
}

#[test]
fn generate_seeds_row_i_with_seed_plus_i() {
    let (model, tok) = setup();
    let p = tok.encode("Hello, my name is").unwrap();
    let cfg = GenerationConfig::greedy(8)
        .with_temperature(1.0)
        .with_seed(40);
    let both = generate(&model, &[p.clone(), p.clone()], &cfg, Some(&tok), |_| {
        Flow::Continue
    })
    .unwrap();
    let cfgs = [cfg.clone().with_seed(40), cfg.clone().with_seed(41)];
    let rows = generate_rows(&model, &[p.clone(), p], &cfgs, Some(&tok), |_| {
        Flow::Continue
    })
    .unwrap();
    assert_eq!(both, rows);
}

#[test]
fn per_row_stops_zero_length_rows_and_mismatched_configs() {
    let (model, tok) = setup();
    let p = tok.encode("Hello, my name is").unwrap();
    // What the row says without a stop string, then stop at its second character.
    let free = generate(
        &model,
        std::slice::from_ref(&p),
        &GenerationConfig::greedy(12),
        Some(&tok),
        |_| Flow::Continue,
    )
    .unwrap();
    let text = &free[0].text;
    let cut: String = text.chars().skip(1).take(1).collect();
    assert!(
        !cut.is_empty(),
        "fixture produced too little text: {text:?}"
    );
    let cfgs = [
        GenerationConfig::greedy(12).with_stop_string(cut.clone()),
        GenerationConfig::greedy(12),
        GenerationConfig::greedy(0),
    ];
    let outs = generate_rows(
        &model,
        &[p.clone(), p.clone(), p.clone()],
        &cfgs,
        Some(&tok),
        |ev| {
            assert_ne!(ev.row, 2, "a zero-length row produced a token");
            Flow::Continue
        },
    )
    .unwrap();
    assert_eq!(outs[0].finish_reason, FinishReason::StopString);
    assert_eq!(outs[0].text, text[..text.find(&cut).unwrap()]);
    assert_eq!(outs[1], free[0]);
    assert!(outs[2].token_ids.is_empty());
    assert_eq!(outs[2].finish_reason, FinishReason::Length);

    let err = generate_rows(&model, &[p], &cfgs, Some(&tok), |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
}
