//! Replaying a sequence from any point yields the same tokens, greedy and at temperature > 0.

use sovra_model::{ChatPrompt, LayerRange, SamplingParams, StopConditions, WeightMode};
use sovra_tests::*;
use sovra_worker::{GenerateRequest, generate};

#[test]
fn replay_from_any_point_continues_identically_at_temperature() {
    let (model, tokenizer) = smollm2();
    let pipeline = pipeline(&model, &[LayerRange::new(0, 30)], WeightMode::DEFAULT);
    let prompt = tokenizer
        .encode(
            &ChatPrompt {
                user: "Tell me about the sea.".into(),
                system: None,
            }
            .render(),
        )
        .unwrap();
    let request = |prompt: Vec<u32>, max_tokens| GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            top_p: Some(0.95),
            seed: 1234,
        },
        stop: StopConditions {
            max_tokens,
            stop: vec![],
            ignore_eos: true,
        },
    };
    let full = generate(&pipeline, &tokenizer, &request(prompt.clone(), 20), |_| {})
        .unwrap()
        .sampled;
    assert_eq!(full.len(), 20);
    for cut in [1, 7, 13] {
        let history: Vec<u32> = prompt.iter().chain(&full[..cut]).copied().collect();
        let rest = generate(&pipeline, &tokenizer, &request(history, 20 - cut), |_| {})
            .unwrap()
            .sampled;
        assert_eq!(rest, full[cut..], "replay from token {cut}");
    }
    let greedy_run = generate(
        &pipeline,
        &tokenizer,
        &GenerateRequest {
            sampling: SamplingParams::default(),
            ..request(prompt, 20)
        },
        |_| {},
    )
    .unwrap()
    .sampled;
    assert_ne!(greedy_run, full, "temperature sampling differs from greedy");
}

#[test]
fn incremental_text_equals_whole_decoding() {
    let (model, tokenizer) = smollm2();
    let pipeline = pipeline(&model, &[LayerRange::new(0, 30)], WeightMode::DEFAULT);
    let prompt = tokenizer.encode("Emoji and accents: 🚀 café ").unwrap();
    let request = GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 1.2,
            top_k: None,
            top_p: None,
            seed: 5,
        },
        stop: StopConditions {
            max_tokens: 40,
            stop: vec![],
            ignore_eos: true,
        },
    };
    let mut streamed = String::new();
    let summary = generate(&pipeline, &tokenizer, &request, |e| {
        streamed.push_str(&e.text)
    })
    .unwrap();
    assert_eq!(streamed, tokenizer.decode(&summary.sampled));
    // Every token's bytes decode the same whether streamed or whole.
    let ids = tokenizer.encode("東京 🚀").unwrap();
    let mut decoder = sovra_model::IncrementalDecoder::new();
    let pieces: Vec<String> = ids.iter().map(|&id| decoder.push(&tokenizer, id)).collect();
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), "東京 🚀");
}
