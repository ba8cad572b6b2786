//! `sovra model …`: fetch known models and inspect GGUF files.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use sovra_model::fetch::{KNOWN_MODELS, fetch, known_model, resolve_model, sovra_home};
use sovra_model::{GgufModel, LayerRange, LlamaSlice, WeightMode};

/// `sovra model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a known model into $SOVRA_HOME/models (does nothing when it is already there).
    Fetch {
        /// The model's name (smollm2).
        name: String,
    },
    /// Print a model's spec; with --layers, load that slice and report its memory.
    Inspect(InspectArgs),
    /// Register a model with the federation (reads its spec and hash here).
    Add {
        #[command(flatten)]
        args: crate::fed::ModelAddArgs,
        #[command(flatten)]
        conn: crate::fed::ConnectArgs,
    },
    /// List the federation's models.
    List {
        #[command(flatten)]
        conn: crate::fed::ConnectArgs,
    },
    /// Remove a model from the federation: its placement goes and its workers drop their
    /// slices (refused while a job of it runs; its past jobs' records stay).
    Remove {
        /// Model name.
        name: String,
        #[command(flatten)]
        conn: crate::fed::ConnectArgs,
    },
}

/// Arguments of `sovra model inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model: a known name or a path to a .gguf file.
    #[arg(short, long, env = "SOVRA_MODEL")]
    pub model: String,
    /// Load this half-open layer range (e.g. 0..10) and report resident memory.
    #[arg(long)]
    pub layers: Option<LayerRange>,
    /// Weight mode for --layers: gguf, q8_0 or f32.
    #[arg(long, default_value_t = WeightMode::DEFAULT)]
    pub dtype: WeightMode,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `sovra model …`.
pub fn run(cmd: ModelCommand) -> Result<ExitCode> {
    match cmd {
        ModelCommand::Fetch { name } => {
            let Some(model) = known_model(&name) else {
                let known: Vec<_> = KNOWN_MODELS.iter().map(|m| m.name).collect();
                bail!("unknown model `{name}` (known: {})", known.join(", "));
            };
            let path = fetch(&sovra_home(), model, &mut crate::progress)?;
            println!("{}", path.display());
        }
        ModelCommand::Inspect(args) => inspect(args)?,
        ModelCommand::Add { args, conn } => {
            return crate::block_on(crate::fed::model_add(args, &conn));
        }
        ModelCommand::List { conn } => return crate::block_on(crate::fed::model_list(&conn)),
        ModelCommand::Remove { name, conn } => {
            return crate::block_on(crate::fed::model_remove(name, &conn));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: InspectArgs) -> Result<()> {
    let path = resolve_model(&args.model, &sovra_home(), &mut crate::progress)?;
    let model = GgufModel::open(&path)?;
    let spec = model.spec();
    let mut doc = json!({ "path": path, "spec": spec });
    if let Some(range) = args.layers {
        let before = resident_bytes();
        let start = Instant::now();
        let slice = LlamaSlice::load(&model, range, args.dtype, &candle_core::Device::Cpu)?;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let after = resident_bytes();
        doc["slice"] = json!({
            "layers": range.to_string(),
            "dtype": args.dtype,
            "tensor_bytes": spec.slice_bytes(range, args.dtype),
            "resident_bytes_added": after.saturating_sub(before),
            "load_ms": load_ms,
            "holds_embedding": slice.is_head_stage(),
            "holds_head": slice.is_tail_stage(),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("model         {}", path.display());
    println!("architecture  {}", spec.architecture);
    println!("layers        {}", spec.layers);
    println!("hidden        {}", spec.hidden_size);
    println!(
        "heads         {} ({} KV heads, head dim {})",
        spec.heads, spec.kv_heads, spec.head_dim
    );
    println!("ffn           {}", spec.ffn_size);
    println!("rope base     {}", spec.rope_base);
    println!("rms eps       {}", spec.rms_eps);
    println!("vocab         {}", spec.vocab_size);
    println!("context       {}", spec.context_length);
    println!(
        "lm head       {}",
        if spec.tied_embeddings {
            "tied to the embedding"
        } else {
            "separate"
        }
    );
    println!(
        "layer bytes   {} (layer 0, file types)",
        spec.layer_bytes[0]
    );
    println!("embedding     {} bytes", spec.embedding_bytes);
    println!("head          {} bytes", spec.head_bytes);
    if let Some(slice) = doc.get("slice") {
        println!(
            "slice {} ({}): {} tensor bytes, {} resident bytes added, loaded in {:.0} ms",
            slice["layers"].as_str().unwrap_or_default(),
            slice["dtype"].as_str().unwrap_or_default(),
            slice["tensor_bytes"],
            slice["resident_bytes_added"],
            slice["load_ms"].as_f64().unwrap_or_default()
        );
    }
    Ok(())
}

/// Resident set size of this process, from /proc (0 where unavailable).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
