//! Chaining slices gives the whole model's output, in every weight mode.

use sovra_model::{ChatPrompt, LayerRange, WeightMode};
use sovra_tests::*;

fn composition_case(mode: WeightMode) {
    let (model, tokenizer) = smollm2();
    let layers = model.spec().layers;
    let whole = pipeline(&model, &[LayerRange::new(0, layers)], mode);
    let split = pipeline(
        &model,
        &[
            LayerRange::new(0, 7),
            LayerRange::new(7, 19),
            LayerRange::new(19, layers),
        ],
        mode,
    );
    let text = ChatPrompt {
        user: "Name three rivers of Europe.".into(),
        system: None,
    }
    .render();
    let prompt = tokenizer.encode(&text).unwrap();
    let (whole_tokens, whole_logits) = greedy(&whole, &prompt, 33);
    let (split_tokens, split_logits) = greedy(&split, &prompt, 33);
    assert_eq!(whole_tokens, split_tokens, "{mode}: tokens differ");
    // Step 0 is the prefill's last position, steps 1..=32 are decode steps.
    for (step, (a, b)) in whole_logits.iter().zip(&split_logits).enumerate() {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= 1e-5,
            "{mode}: step {step} logits differ by {worst}"
        );
    }
}

#[test]
fn three_slices_equal_the_whole_model_f32() {
    composition_case(WeightMode::F32);
}

#[test]
fn three_slices_equal_the_whole_model_q8_0() {
    composition_case(WeightMode::Q8_0);
}

#[test]
fn three_slices_equal_the_whole_model_gguf() {
    composition_case(WeightMode::Gguf);
}
