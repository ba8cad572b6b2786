//! `sovra bench`: prompt and decode speed of the local runtime, per weight mode and batch size,
//! with where the time of a decode step goes. Prints a markdown table.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use sovra_model::fetch::{resolve_model, sovra_home};
use sovra_model::llama::argmax;
use sovra_model::{GgufModel, LayerRange, SliceProfile, WeightMode};
use sovra_worker::{LocalPipeline, PipelineSession};

/// Most sessions one measured batch may hold.
const MAX_BATCH: usize = 1024;

/// Arguments of `sovra bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model: a known name or a path to a .gguf file.
    #[arg(short, long, default_value = "smollm2", env = "SOVRA_MODEL")]
    pub model: String,
    /// Weight modes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = WeightMode::ALL)]
    pub dtype: Vec<WeightMode>,
    /// Batch sizes (concurrent sessions decoded in one forward), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    pub batch: Vec<usize>,
    /// Prompt length for the prompt-processing measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps measured per configuration.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// Runs `sovra bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if args.tokens == 0 || args.prompt_tokens == 0 || args.repeat == 0 || args.batch.contains(&0) {
        bail!("--tokens, --prompt-tokens, --repeat and every --batch must be at least 1");
    }
    if args.batch.iter().any(|&b| b > MAX_BATCH) {
        bail!("a --batch of more than {MAX_BATCH} sessions is not measured");
    }
    let path = resolve_model(&args.model, &sovra_home(), &mut crate::progress)?;
    let model = GgufModel::open(&path)?;
    let spec = model.spec().clone();
    if args
        .prompt_tokens
        .saturating_add(args.tokens)
        .saturating_add(8)
        > spec.context_length
    {
        bail!(
            "--prompt-tokens plus --tokens exceed the context of {}",
            spec.context_length
        );
    }
    let threads = candle_core::utils::get_num_threads();
    println!(
        "model {} · {} layers · {threads} threads",
        path.display(),
        spec.layers
    );
    println!();
    println!(
        "| mode | prompt tok/s | batch | decode tok/s (aggregate) | per session tok/s | ms/step | per layer ms | LM head ms | sampling ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &mode in &args.dtype {
        let pipeline = LocalPipeline::load(
            &model,
            &[LayerRange::new(0, spec.layers)],
            mode,
            &candle_core::Device::Cpu,
        )?;
        let prompt: Vec<u32> = (0..args.prompt_tokens)
            .map(|i| token(i, spec.vocab_size))
            .collect();
        let pp = median(args.repeat, || {
            let mut s = pipeline.new_session();
            let t = Instant::now();
            pipeline.forward(&mut [&mut s], &[&prompt])?;
            Ok(t.elapsed())
        })?;
        let prompt_tok_s = args.prompt_tokens as f64 / pp.as_secs_f64();
        for &batch in &args.batch {
            let mut runs = Vec::new();
            for _ in 0..args.repeat {
                runs.push(decode_run(&pipeline, batch, args.tokens, spec.vocab_size)?);
            }
            runs.sort_by_key(|a| a.total);
            let r = &runs[runs.len() / 2];
            let steps = args.tokens as f64;
            let secs = r.total.as_secs_f64();
            let per_step_ms = secs * 1e3 / steps;
            let p = &r.profile;
            println!(
                "| {mode} | {prompt_tok_s:.1} | {batch} | {:.1} | {:.1} | {per_step_ms:.2} | {:.3} | {:.2} | {:.3} |",
                batch as f64 * steps / secs,
                steps / secs,
                p.blocks.as_secs_f64() * 1e3 / steps / spec.layers as f64,
                p.head.as_secs_f64() * 1e3 / steps,
                r.sampling.as_secs_f64() * 1e3 / steps,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct DecodeRun {
    total: Duration,
    sampling: Duration,
    profile: SliceProfile,
}

/// Prefills `batch` sessions with prompts of different lengths, then times `steps` batched
/// greedy decode steps.
fn decode_run(
    pipeline: &LocalPipeline,
    batch: usize,
    steps: usize,
    vocab: usize,
) -> Result<DecodeRun> {
    let mut sessions: Vec<PipelineSession> = (0..batch).map(|_| pipeline.new_session()).collect();
    let mut next = Vec::with_capacity(batch);
    for (i, session) in sessions.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..8 + i % 5).map(|j| token(i * 31 + j, vocab)).collect();
        let logits = pipeline.forward(&mut [session], &[&prompt])?;
        next.push(argmax(&logits[0]));
    }
    let mut profiles = vec![SliceProfile::default()];
    let mut sampling = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..steps {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let token_refs: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
        let mut refs: Vec<&mut PipelineSession> = sessions.iter_mut().collect();
        let logits = pipeline.forward_profiled(&mut refs, &token_refs, &mut profiles)?;
        let t = Instant::now();
        let rows = logits.to_vec2::<f32>()?;
        next = rows.iter().map(|row| argmax(row)).collect();
        sampling += t.elapsed();
    }
    Ok(DecodeRun {
        total: start.elapsed(),
        sampling,
        profile: profiles.remove(0),
    })
}

fn token(i: usize, vocab: usize) -> u32 {
    (sovra_model::sampling::splitmix64(i as u64) % (vocab as u64).max(1)) as u32
}

fn median(repeat: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut times = (0..repeat).map(|_| f()).collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[times.len() / 2])
}
