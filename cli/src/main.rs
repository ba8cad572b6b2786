//! `sovra`: the command line of the sovra federation.

mod bench;
mod daemon;
mod demo;
mod fed;
mod fedbench;
mod generate;
mod jobs_cmd;
mod model_cmd;
mod units;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// sovra pools GPUs of independent providers to serve models too large for any one of them.
#[derive(Debug, Parser)]
#[command(name = "sovra", version, about)]
struct Cli {
    /// Compute threads per process (default: all cores).
    #[arg(long, global = true, env = "SOVRA_THREADS", value_parser = parse_threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Most compute threads a process may be given.
const MAX_THREADS: usize = 1024;

/// Refuses more compute threads than the cores this process may run on: candle's threads
/// meet at every op, so two on one core make each op wait for a time slice (8 threads on 2
/// cores decoded at 0.9 tok/s instead of ~100).
pub(crate) fn within_cores(threads: usize, flag: &str) -> Result<(), String> {
    // The cores it may run on and its CPU quota (a container's), whichever is fewer.
    match std::thread::available_parallelism() {
        Ok(cores) if threads > cores.get() => Err(format!(
            "{flag} {threads} is more than the {cores} core{} this process may run on",
            if cores.get() == 1 { "" } else { "s" }
        )),
        _ => Ok(()),
    }
}

/// A count of compute threads: 1 to [`MAX_THREADS`].
fn parse_threads(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n @ 1..=MAX_THREADS) => Ok(n),
        _ => Err(format!(
            "expected a number of threads from 1 to {MAX_THREADS}"
        )),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a model in this process.
    Generate(generate::GenerateArgs),
    /// Fetch, inspect and register models.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Measure the local runtime's speed.
    Bench(bench::BenchArgs),
    /// Run the coordinator.
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// Admit, list and revoke providers; issue join tokens.
    Provider {
        #[command(subcommand)]
        command: fed::ProviderCommand,
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// Create and list tenants.
    Tenant {
        #[command(subcommand)]
        command: fed::TenantCommand,
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// Start a worker or list the fleet.
    Worker {
        #[command(subcommand)]
        command: WorkerCommand,
    },
    /// Run a job on the federation and stream its answer.
    Run {
        #[command(flatten)]
        args: jobs_cmd::RunArgs,
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// List, show, cancel and audit jobs.
    Job {
        #[command(subcommand)]
        command: jobs_cmd::JobCommand,
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// Run a whole federation on this machine and stream an answer through it.
    Demo(demo::DemoArgs),
    /// Show or set which worker runs which layers.
    Placement {
        #[command(subcommand)]
        command: fed::PlacementCommand,
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
enum CoordinatorCommand {
    /// Start the coordinator (creates its CA and operator token on first start).
    Start(daemon::CoordinatorStartArgs),
    /// Replace the operator token (the old one stops working at once); the coordinator writes
    /// the new one to its admin.token, and it is printed here.
    RotateToken {
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// Issue a new operator token for a stopped coordinator's data dir, written to its
    /// admin.token (the way back in when that file was lost or emptied).
    ResetToken {
        /// The coordinator's data dir.
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum WorkerCommand {
    /// Join the federation (first start) and serve assigned slices until stopped.
    Start(Box<daemon::WorkerStartArgs>),
    /// List the fleet's workers.
    List {
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// The round-trip times the workers measured to each other's data planes (the planner
    /// prefers chains whose ring of links takes least).
    Links {
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
    /// Revoke one worker (a machine decommissioned or compromised): it is refused from then
    /// on, its peers refuse its connections and its jobs move to other chains.
    Revoke {
        /// Worker id (as `worker list` shows it).
        id: String,
        #[command(flatten)]
        conn: fed::ConnectArgs,
    },
}

/// How long candle's compute threads spin for the next op before they sleep, in spin-loop
/// iterations (candle's default is 25,000).
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
/// A worker's compute threads spin about 7 µs (300 iterations here) instead of candle's
/// ~0.6 ms: a stage is idle while the other stages of its chain compute, and on a host shared
/// with other stages the spin takes the cores from the stage that has work. Measured with
/// `sovra demo --bench --dtype q8_0` (3-stage decode, tok/s, runs interleaved): 25,000 →
/// 0.56–0.60x `generate --local`; 6,000 → 70–77 tok/s; 1,500 → 76–92; 300 → 84–104; f32
/// unchanged. Set `CANDLE_BARRIER_POOL_SPIN_LIMIT` to override.
const WORKER_SPIN_LIMIT: u32 = 300;
/// candle's own spin limit, which a worker alone on its cores keeps (`sovra demo` sets it for
/// workers it gives cores of their own).
const CANDLE_SPIN_LIMIT: u32 = 25_000;

/// mimalloc backs its large regions with transparent huge pages (`madvise`), so the weights a
/// forward streams through take 2 MiB pages instead of 4 KiB ones. Against the system allocator,
/// alternating runs on the two-core reference host (docs/benchmarks.md): `generate --local`
/// q8_0 +5 %, f32 +12 %; the 3-stage demo q8_0 +13 %, f32 +7 %.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commands that hold model weights, or start the processes that do (which inherit the
/// setting): the others keep 4 KiB pages, so a coordinator or a client does not round its
/// memory up to 2 MiB pages for nothing.
fn holds_weights(command: &Command) -> bool {
    matches!(
        command,
        Command::Generate(_)
            | Command::Model(_)
            | Command::Bench(_)
            | Command::Demo(_)
            | Command::Worker {
                command: WorkerCommand::Start(_),
                ..
            }
    )
}

/// Turns transparent huge pages off for this process (and the processes it starts).
fn keep_small_pages() {
    #[cfg(target_os = "linux")]
    // Safety: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    fed::note_env_sources(&matches);
    // The thread count always goes through RAYON_NUM_THREADS, even when it is the default:
    // without it candle looks the machine's cores up again on every parallel op (measured:
    // 18 % slower q8_0 decode with 2 threads).
    let pinned = match &cli.command {
        Command::Worker {
            command: WorkerCommand::Start(args),
            ..
        } => args.cpus.as_ref().map(|c| c.0.len()),
        _ => None,
    };
    let threads = match (cli.threads, pinned) {
        (Some(t), Some(n)) if t != n => {
            eprintln!("error: --threads {t} disagrees with --cpus, which lists {n} cores");
            return ExitCode::from(2);
        }
        (t, n) => n
            .or(t)
            .unwrap_or_else(candle_core::utils::get_num_threads)
            .max(1),
    };
    // Only where it computes (a client command ignores it, from SOVRA_THREADS say).
    if let Some(t) = cli.threads.filter(|_| holds_weights(&cli.command))
        && let Err(e) = within_cores(t, "--threads")
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Safety: no other thread exists yet; the compute pools read these when they start.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Errors are one line: with RUST_BACKTRACE set, candle would attach a backtrace to each
        // of its errors and print it as part of the message. Panics keep theirs.
        // Safety: as above.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    if !holds_weights(&cli.command) {
        keep_small_pages();
    }
    let daemon = matches!(
        cli.command,
        Command::Coordinator(CoordinatorCommand::Start(_))
            | Command::Worker {
                command: WorkerCommand::Start(_),
                ..
            }
    );
    #[cfg(unix)]
    if !daemon {
        // A command whose output goes to a pipe that closes (`| head`) ends quietly, as other
        // Unix tools do, instead of panicking on the failed write. Sockets are unaffected:
        // their writes do not raise SIGPIPE.
        // Safety: no other thread exists yet.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let worker_start = matches!(
        cli.command,
        Command::Worker {
            command: WorkerCommand::Start(_),
            ..
        }
    );
    if worker_start && std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        // Safety: as above.
        unsafe { std::env::set_var(SPIN_LIMIT_VAR, WORKER_SPIN_LIMIT.to_string()) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOVRA_LOG").unwrap_or_else(|_| {
                // A worker says when it joined, connected, loaded or dropped a slice.
                tracing_subscriber::EnvFilter::new(if worker_start {
                    "warn,sovra_worker::agent=info"
                } else {
                    "warn"
                })
            }),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Bench(args) => bench::run(args),
        Command::Coordinator(CoordinatorCommand::ResetToken { data_dir }) => {
            daemon::coordinator_reset_token(&data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Coordinator(CoordinatorCommand::RotateToken { conn }) => {
            block_on(fed::rotate_operator_token(&conn))
        }
        Command::Coordinator(CoordinatorCommand::Start(args)) => {
            let io_threads = args.io_threads.map(usize::from);
            block_on_threads(io_threads, daemon::coordinator_start(args))
        }
        Command::Provider { command, conn } => block_on(fed::provider(command, &conn)),
        Command::Tenant { command, conn } => block_on(fed::tenant(command, &conn)),
        Command::Worker {
            command: WorkerCommand::Start(args),
        } => block_on(daemon::worker_start(*args)),
        Command::Worker {
            command: WorkerCommand::List { conn },
        } => block_on(fed::worker_list(&conn)),
        Command::Worker {
            command: WorkerCommand::Links { conn },
        } => block_on(fed::worker_links(&conn)),
        Command::Worker {
            command: WorkerCommand::Revoke { id, conn },
        } => block_on(fed::worker_revoke(id, &conn)),
        Command::Placement { command, conn } => block_on(fed::placement(command, &conn)),
        Command::Run { args, conn } => block_on(jobs_cmd::run(args, &conn)),
        Command::Job { command, conn } => block_on(jobs_cmd::job(command, &conn)),
        // The demo's own process only streams jobs' events; one runtime thread leaves the
        // cores to the workers.
        Command::Demo(args) => block_on_threads(Some(1), demo::run(args)),
    };
    match result {
        Ok(code) => code,
        // On a line of its own: it may cut an answer mid-line.
        Err(err) if err.is::<demo::Interrupted>() => {
            eprintln!("\ninterrupted");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an async command on a fresh runtime.
fn block_on(
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    block_on_threads(None, fut)
}

/// As [`block_on`], with `threads` runtime threads (default: one per core).
fn block_on_threads(
    threads: Option<usize>,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(fut)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints fetch progress on stderr.
pub(crate) fn progress(line: &str) {
    eprintln!("sovra: {line}");
}
