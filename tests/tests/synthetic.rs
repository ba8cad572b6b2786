//! Slices of generated Llama-shaped models: composition with tied and separate heads, cache
//! rollback and replay.

use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{GgufModel, LayerRange, WeightMode};
use sovra_tests::greedy;
use sovra_worker::LocalPipeline;

fn load(model: &GgufModel, ranges: &[LayerRange], mode: WeightMode) -> LocalPipeline {
    LocalPipeline::load(model, ranges, mode, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn any_split_equals_the_whole_model_with_tied_and_separate_heads() {
    for separate_head in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let spec = SyntheticLlama {
            separate_head,
            ..SyntheticLlama::tiny()
        };
        spec.write_file(&path).unwrap();
        let model = GgufModel::open(&path).unwrap();
        assert_eq!(model.spec().tied_embeddings, !separate_head);
        let prompt: Vec<u32> = (40..57).collect();
        for mode in WeightMode::ALL {
            let whole = greedy(&load(&model, &[LayerRange::new(0, 6)], mode), &prompt, 12);
            for split in [vec![1, 6], vec![2, 4, 6], vec![1, 2, 3, 4, 5, 6]] {
                let mut ranges = Vec::new();
                let mut start = 0;
                for end in split {
                    ranges.push(LayerRange::new(start, end));
                    start = end;
                }
                let parts = greedy(&load(&model, &ranges, mode), &prompt, 12);
                assert_eq!(whole.0, parts.0, "{mode} {ranges:?}");
                for (a, b) in whole.1.iter().zip(&parts.1) {
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f32::max);
                    assert!(worst <= 1e-5, "{mode} {ranges:?}: {worst}");
                }
            }
        }
    }
}

#[test]
fn truncating_a_session_replays_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    SyntheticLlama::tiny().write_file(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    let pipeline = load(
        &model,
        &[LayerRange::new(0, 3), LayerRange::new(3, 6)],
        WeightMode::F32,
    );
    let prompt: Vec<u32> = (60..70).collect();
    let mut session = pipeline.new_session();
    let first = pipeline
        .forward(&mut [&mut session], &[&prompt])
        .unwrap()
        .remove(0);
    let more = pipeline
        .forward(&mut [&mut session], &[&[7, 8, 9]])
        .unwrap()
        .remove(0);
    assert_eq!(session.len(), 13);
    // A fresh session fed the same history reaches the same logits.
    let mut replay = pipeline.new_session();
    let history: Vec<u32> = prompt.iter().copied().chain([7, 8, 9]).collect();
    let again = pipeline
        .forward(&mut [&mut replay], &[&history])
        .unwrap()
        .remove(0);
    let worst = more
        .iter()
        .zip(&again)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-4, "{worst}");
    assert_ne!(first, more);
    // Truncating back to the prompt and running the same tokens again gives the same logits.
    session.truncate(prompt.len()).unwrap();
    assert_eq!(session.len(), prompt.len());
    let redo = pipeline
        .forward(&mut [&mut session], &[&[7, 8, 9]])
        .unwrap()
        .remove(0);
    assert_eq!(redo, more);
}

/// Largest difference between two logit vectors.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_session_decoded_token_by_token_to_the_context_limit_equals_one_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let spec = SyntheticLlama::tiny();
    spec.write_file(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    let pipeline = load(
        &model,
        &[LayerRange::new(0, 2), LayerRange::new(2, 6)],
        WeightMode::F32,
    );
    let context = spec.context_length;
    let tokens: Vec<u32> = (0..context as u32).map(|i| 40 + (i * 7) % 200).collect();
    // One token per forward, up to the last position the model has.
    let mut stepwise = pipeline.new_session();
    let mut logits = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        logits.push(
            pipeline
                .forward(&mut [&mut stepwise], &[&[*token]])
                .unwrap()
                .remove(0),
        );
        // Keys and values of every position in every layer, in f32.
        let per_position = 6 * 2 * spec.kv_heads * (spec.hidden_size / spec.heads) * 4;
        assert_eq!(stepwise.cache_bytes(), (i + 1) * per_position);
    }
    assert_eq!(stepwise.len(), context);
    // The same positions in one forward, and in chunks of other sizes.
    for chunk in [context, 50, 97] {
        let mut chunked = pipeline.new_session();
        let mut last = Vec::new();
        for part in tokens.chunks(chunk) {
            last = pipeline
                .forward(&mut [&mut chunked], &[part])
                .unwrap()
                .remove(0);
        }
        let w = worst(&last, logits.last().unwrap());
        assert!(w < 1e-4, "chunks of {chunk}: {w}");
    }
    // A position past the context is refused and leaves the full cache usable.
    assert!(pipeline.forward(&mut [&mut stepwise], &[&[5]]).is_err());
    assert_eq!(stepwise.len(), context);
    // Rolled back, the session recomputes the same logits.
    stepwise.truncate(100).unwrap();
    for (i, token) in tokens.iter().enumerate().skip(100).take(60) {
        let again = pipeline
            .forward(&mut [&mut stepwise], &[&[*token]])
            .unwrap()
            .remove(0);
        assert!(worst(&again, &logits[i]) < 1e-5, "position {i}");
    }
    // Truncated to nothing, the cache is freed.
    stepwise.truncate(0).unwrap();
    assert_eq!((stepwise.len(), stepwise.cache_bytes()), (0, 0));
}
