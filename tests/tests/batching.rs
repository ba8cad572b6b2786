//! Sessions of different lengths decoded in one forward give what each gives alone.

use sovra_model::{ChatPrompt, LayerRange, WeightMode};
use sovra_tests::*;
use sovra_worker::PipelineSession;

fn batched_case(mode: WeightMode, ranges: &[LayerRange]) {
    let (model, tokenizer) = smollm2();
    let pipeline = pipeline(&model, ranges, mode);
    let questions = [
        "Hi",
        "What is the capital of France?",
        "Write a short poem about the sea and the wind at night, please.",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            tokenizer
                .encode(
                    &ChatPrompt {
                        user: q.to_string(),
                        system: None,
                    }
                    .render(),
                )
                .unwrap()
        })
        .collect();
    let steps = 24;
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| greedy(&pipeline, p, steps).0)
        .collect();

    // Prefill all three in one forward, then decode all three in one forward per step.
    let mut sessions: Vec<PipelineSession> =
        prompts.iter().map(|_| pipeline.new_session()).collect();
    let mut refs: Vec<&mut PipelineSession> = sessions.iter_mut().collect();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut logits = pipeline.forward(&mut refs, &inputs).unwrap();
    let mut together: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for step in 0..steps {
        let next: Vec<u32> = logits
            .iter()
            .map(|l| sovra_model::llama::argmax(l))
            .collect();
        for (out, &t) in together.iter_mut().zip(&next) {
            out.push(t);
        }
        if step + 1 == steps {
            break;
        }
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
        let mut refs: Vec<&mut PipelineSession> = sessions.iter_mut().collect();
        logits = pipeline.forward(&mut refs, &inputs).unwrap();
    }
    assert_eq!(
        together, alone,
        "{mode}: batched tokens differ from solo tokens"
    );
    let lens: Vec<usize> = sessions.iter().map(PipelineSession::len).collect();
    let expected: Vec<usize> = prompts.iter().map(|p| p.len() + steps - 1).collect();
    assert_eq!(lens, expected);
}

#[test]
fn three_sessions_in_one_forward_f32() {
    batched_case(WeightMode::F32, &[LayerRange::new(0, 30)]);
}

#[test]
fn three_sessions_in_one_forward_default_mode_two_slices() {
    batched_case(
        WeightMode::DEFAULT,
        &[LayerRange::new(0, 11), LayerRange::new(11, 30)],
    );
}
