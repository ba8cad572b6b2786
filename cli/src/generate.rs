//! `sovra generate --local`: run a model in this process and stream its answer.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use sovra_model::fetch::{resolve_model, sovra_home};
use sovra_model::stream::MAX_TOKENS;
use sovra_model::{
    ChatPrompt, GgufModel, LayerRange, ModelTokenizer, SamplingError, SamplingParams,
    StopConditions, WeightMode,
};
use sovra_worker::{GenerateRequest, GenerationSummary, LocalPipeline, TokenEvent, generate};

/// Sampling and stopping flags shared by every command that generates.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate (1 to 1048576).
    #[arg(
        long,
        default_value_t = 256,
        env = "SOVRA_MAX_TOKENS",
        allow_negative_numbers = true
    )]
    pub max_tokens: i64,
    /// Softmax temperature; 0 is greedy.
    // Negative values reach the checks below (which answer in JSON under --json) instead of
    // being taken for flags.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (K >= 1).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// Sample only among the most likely tokens whose probabilities add up to P, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Seed of the random draws (the draw at each position depends only on seed and position).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string appears (repeatable); the text ends before it.
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    /// The sampling settings, checked (the token budget too).
    pub fn sampling(&self) -> Result<SamplingParams> {
        self.max_tokens()?;
        sovra_model::stream::check_stop_strings(&self.stop).map_err(|e| anyhow::anyhow!(e))?;
        let top_k = match self.top_k {
            Some(k) => Some(
                usize::try_from(k)
                    .ok()
                    .filter(|&k| k >= 1)
                    .ok_or(SamplingError::TopK)?,
            ),
            None => None,
        };
        let params = SamplingParams {
            temperature: self.temperature,
            top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        params.validate()?;
        Ok(params)
    }

    /// The token budget, checked.
    pub fn max_tokens(&self) -> Result<usize> {
        usize::try_from(self.max_tokens)
            .ok()
            .filter(|n| (1..=MAX_TOKENS).contains(n))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "max tokens must be between 1 and {MAX_TOKENS}, got {}",
                    self.max_tokens
                )
            })
    }

    /// The stop conditions, checked.
    pub fn stop(&self) -> Result<StopConditions> {
        Ok(StopConditions {
            max_tokens: self.max_tokens()?,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        })
    }
}

/// Arguments of `sovra generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Run in this process (generate always runs locally; federated jobs use `sovra run`).
    #[arg(long)]
    pub local: bool,
    /// Model: a known name (smollm2, fetched on first use) or a path to a .gguf file.
    #[arg(short, long, env = "SOVRA_MODEL")]
    pub model: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System turn for the chat template (implies --chat).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// How the weights are held: gguf (the file's types), q8_0 or f32.
    #[arg(long, default_value_t = WeightMode::DEFAULT, env = "SOVRA_DTYPE")]
    pub dtype: WeightMode,
    /// Split the model into this many slices chained in this process.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print JSON lines on stdout: one per token, then a summary (or an error).
    #[arg(long)]
    pub json: bool,
    /// The prompt.
    pub prompt: String,
}

/// Prints a failure as the JSON line that ends `--json` output (`generate`, `run`, `demo`).
pub fn print_error_line(err: &anyhow::Error) {
    let line = match err.downcast_ref::<crate::jobs_cmd::JobFailed>() {
        Some(failed) => {
            json!({"type": "error", "message": failed.message, "job_id": failed.job_id})
        }
        None => json!({"type": "error", "message": format!("{err:#}")}),
    };
    println!("{line}");
}

/// Runs `sovra generate`.
pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let json = args.json;
    match run_inner(args) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // As `run` and `demo`: the JSON line on stdout, the one-line error on stderr.
        Err(err) if json => {
            print_error_line(&err);
            Err(err)
        }
        Err(err) => Err(err),
    }
}

fn run_inner(args: GenerateArgs) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    if args.stages == 0 {
        bail!("--stages must be at least 1");
    }
    let path = resolve_model(&args.model, &sovra_home(), &mut crate::progress)?;
    let model = GgufModel::open(&path)?;
    let layers = model.spec().layers;
    if args.stages > layers {
        bail!(
            "--stages {} exceeds the model's {layers} layers",
            args.stages
        );
    }
    let tokenizer = ModelTokenizer::from_gguf(model.metadata())?;
    let prompt = if args.chat || args.system.is_some() {
        let turns = ChatPrompt {
            user: args.prompt.clone(),
            system: args.system.clone(),
        }
        .turns();
        tokenizer.encode_chat(&turns)?
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let ranges = LayerRange::split_even(layers, args.stages);
    let pipeline = LocalPipeline::load(&model, &ranges, args.dtype, &candle_core::Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))?;
    let request = GenerateRequest {
        prompt,
        sampling: args.sampling.sampling()?,
        stop: args.sampling.stop()?,
    };
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let on_token = |event: &TokenEvent| {
        let _ = if json {
            writeln!(
                stdout,
                "{}",
                json!({"type": "token", "index": event.index, "token_id": event.token_id, "text": event.text})
            )
        } else {
            write!(stdout, "{}", event.text)
        };
        let _ = stdout.flush();
    };
    let summary = generate(&pipeline, &tokenizer, &request, on_token)?;
    print_summary(&summary, json);
    Ok(())
}

/// Prints the summary: a JSON line on stdout, or a stats line on stderr.
pub fn print_summary(summary: &GenerationSummary, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "type": "summary",
                "prompt_tokens": summary.prompt_tokens,
                "generated_tokens": summary.generated_tokens,
                "finish_reason": summary.finish_reason.as_str(),
                "ttft_ms": summary.ttft_ms,
                "prompt_tok_s": summary.prompt_tok_s,
                "decode_tok_s": summary.decode_tok_s,
            })
        );
    } else {
        println!();
        eprintln!(
            "[prompt {} tokens at {:.1} tok/s | {} generated at {:.1} tok/s | first token {:.0} ms | finish: {}]",
            summary.prompt_tokens,
            summary.prompt_tok_s,
            summary.generated_tokens,
            summary.decode_tok_s,
            summary.ttft_ms,
            summary.finish_reason.as_str()
        );
    }
}
