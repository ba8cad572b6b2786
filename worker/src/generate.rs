//! The generation loop: prefill the prompt, then sample and decode one token at a time until a
//! stop condition, reporting each token as it is produced.

use std::time::Instant;

use serde::Serialize;
use sovra_model::{
    FinishReason, ModelTokenizer, Sampler, SamplingError, SamplingParams, StopConditions,
    TextStream,
};

use crate::pipeline::{LocalPipeline, PipelineError};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// When to stop.
    pub stop: StopConditions,
}

/// One generated token as shown to a client.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenEvent {
    /// Index of the token among the generated ones.
    pub index: usize,
    /// Its id.
    pub token_id: u32,
    /// Text released with it.
    pub text: String,
}

/// Statistics of a finished generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationSummary {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (emitted to the client).
    pub generated_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time from start to the first generated token, in milliseconds.
    pub ttft_ms: f64,
    /// Prompt tokens per second during prefill.
    pub prompt_tok_s: f64,
    /// Generated tokens per second after the first.
    pub decode_tok_s: f64,
    /// Ids of every sampled token, the EOS or stop token included.
    #[serde(skip)]
    pub sampled: Vec<u32>,
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt holds no token.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt alone fills the context.
    #[error("the prompt fills the model's context, leaving no room to generate ({prompt} prompt token{s} for a context of {context})", s = if *prompt == 1 { "" } else { "s" })]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context length.
        context: usize,
    },
    /// A token budget of zero.
    #[error("max tokens must be at least 1")]
    ZeroMaxTokens,
    /// Unusable sampling settings.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Runs `request` through `pipeline`, calling `on_token` for each emitted token.
pub fn generate(
    pipeline: &LocalPipeline,
    tokenizer: &ModelTokenizer,
    request: &GenerateRequest,
    mut on_token: impl FnMut(&TokenEvent),
) -> Result<GenerationSummary, GenerateError> {
    let context = pipeline.spec().context_length;
    if request.prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if request.prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            prompt: request.prompt.len(),
            context,
        });
    }
    if request.stop.max_tokens == 0 {
        return Err(GenerateError::ZeroMaxTokens);
    }
    let sampler = Sampler::new(request.sampling)?;
    // The budget never runs the session past the context.
    let mut stop = request.stop.clone();
    stop.max_tokens = stop.max_tokens.min(context - request.prompt.len());
    let mut stream = TextStream::new(stop, tokenizer.eos());
    let mut session = pipeline.new_session();
    let start = Instant::now();
    // In the chunks a stage prefills a prompt in, so the arithmetic (and with it every
    // greedy token of a long prompt) is the federation's: attention over a whole prompt at
    // once sums in another order than chunk by chunk.
    let mut logits = Vec::new();
    for chunk in request.prompt.chunks(crate::stage::PREFILL_CHUNK) {
        logits = pipeline.forward(&mut [&mut session], &[chunk])?.remove(0);
    }
    let prefill_s = start.elapsed().as_secs_f64();
    let mut first_token_at = None;
    let mut sampled = Vec::new();
    let mut emitted = 0;
    let finish = loop {
        let position = (request.prompt.len() + sampled.len()) as u64;
        let token = sampler.sample(&logits, position)?;
        sampled.push(token);
        let step = stream.push(tokenizer, token);
        first_token_at.get_or_insert_with(Instant::now);
        // A token that ends the generation without output of its own (EOS, the end of a stop
        // string) is shown only if it releases held text.
        if step.emitted || !step.text.is_empty() {
            on_token(&TokenEvent {
                index: emitted,
                token_id: token,
                text: step.text,
            });
            emitted += 1;
        }
        if let Some(reason) = step.finished {
            break reason;
        }
        logits = pipeline
            .forward(&mut [&mut session], &[&[token]])?
            .remove(0);
    };
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    let decode_s = (end - first).as_secs_f64();
    Ok(GenerationSummary {
        prompt_tokens: request.prompt.len(),
        generated_tokens: emitted,
        finish_reason: finish,
        ttft_ms: (first - start).as_secs_f64() * 1e3,
        prompt_tok_s: request.prompt.len() as f64 / prefill_s.max(1e-9),
        decode_tok_s: if sampled.len() > 1 {
            (sampled.len() - 1) as f64 / decode_s.max(1e-9)
        } else {
            0.0
        },
        sampled,
    })
}
