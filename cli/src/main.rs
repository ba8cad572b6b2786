//! `sovra`: the command line of the sovra federation.

mod bench;
mod generate;
mod model_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// sovra pools GPUs of independent providers to serve models too large for any one of them.
#[derive(Debug, Parser)]
#[command(name = "sovra", version, about)]
struct Cli {
    /// Compute threads per process (default: all cores).
    #[arg(long, global = true, env = "SOVRA_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a model in this process.
    Generate(generate::GenerateArgs),
    /// Fetch and inspect models.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Measure the local runtime's speed.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        // Safety: no other thread exists yet; the compute pools read this when they start.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOVRA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints fetch progress on stderr.
pub(crate) fn progress(line: &str) {
    eprintln!("sovra: {line}");
}
