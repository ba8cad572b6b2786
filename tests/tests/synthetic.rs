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
