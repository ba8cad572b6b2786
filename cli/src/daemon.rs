//! The long-running commands: `sovra coordinator start` and `sovra worker start`. Both stop
//! gracefully on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sovra_coordinator::federation::FederationConfig;
use sovra_coordinator::server::{self, CoordinatorConfig};
use sovra_worker::agent::{self, WorkerConfig};

use crate::units::{parse_bytes, parse_duration, parse_path};

/// Arguments of `sovra coordinator start`.
#[derive(Debug, Args)]
pub struct CoordinatorStartArgs {
    /// Folder of the CA, the operator token (admin.token) and the database.
    #[arg(long, env = "SOVRA_DATA_DIR", value_parser = parse_path)]
    pub data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, env = "SOVRA_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Names clients reach the coordinator by, comma-separated (go into its certificate).
    #[arg(
        long,
        env = "SOVRA_ADVERTISE",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub advertise: Vec<String>,
    /// Interval at which workers heartbeat.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Silence after which a worker is marked down.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Tokens of KV cache reserved per layer when planning placements.
    #[arg(long, default_value_t = 4096)]
    pub kv_reserve_tokens: u64,
    /// Jobs a tenant may run at once unless its own limit (`sovra tenant limit`) says otherwise.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tenant_max_jobs: u32,
    /// Threads of the coordinator's runtime (default: one per core). One suits a coordinator
    /// that shares a host's cores with workers, as in the demo: each token event is then
    /// handled on one thread instead of waking a second one.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: Option<u16>,
    /// Also serve the OpenAI-compatible HTTP API (over TLS, with the coordinator's
    /// certificate) on this address, e.g. 0.0.0.0:8443.
    #[arg(long, env = "SOVRA_HTTP")]
    pub http: Option<SocketAddr>,
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs `sovra coordinator start`.
pub async fn coordinator_start(args: CoordinatorStartArgs) -> Result<()> {
    let config = CoordinatorConfig {
        data_dir: args.data_dir.clone(),
        federation: FederationConfig {
            advertise: args
                .advertise
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            heartbeat_interval: args.heartbeat,
            lease: args.lease,
            kv_reserve_tokens: args.kv_reserve_tokens,
            tenant_max_running_jobs: args.tenant_max_jobs,
            ..FederationConfig::default()
        },
    };
    // The port first: a coordinator that cannot serve leaves no fresh CA or token behind.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let http = match args.http {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a} for the HTTP API"))?,
        ),
        None => None,
    };
    let fed = server::open(&config)?;
    let addr = listener.local_addr()?;
    eprintln!(
        "sovra coordinator listening on https://{addr} (CA {}, operator token {})",
        args.data_dir.join("ca.pem").display(),
        args.data_dir.join("admin.token").display()
    );
    if !fed.admin_token_file_holds_the_token()? {
        eprintln!(
            "warning: {} does not hold the operator token (emptied, edited or removed); to issue a new one, stop the coordinator and run `sovra coordinator reset-token --data-dir {}`",
            fed.admin_token_path().display(),
            args.data_dir.display()
        );
    }
    println!("https://{addr}");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let api = match http {
        Some(l) => {
            let acceptor = sovra_coordinator::openai::tls_acceptor(&fed)?;
            eprintln!(
                "OpenAI-compatible API on https://{}/v1 (a tenant's token is its API key)",
                l.local_addr()?
            );
            let fed = fed.clone();
            let mut stopped = stopped.clone();
            Some(tokio::spawn(sovra_coordinator::openai::serve(
                fed,
                acceptor,
                l,
                async move {
                    let _ = stopped.changed().await;
                },
            )))
        }
        None => None,
    };
    server::run(fed, listener, async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    })
    .await?;
    if let Some(api) = api {
        api.await??;
    }
    eprintln!("sovra coordinator stopped");
    Ok(())
}

/// Arguments of `sovra worker start`.
#[derive(Debug, Args)]
pub struct WorkerStartArgs {
    /// Coordinator URL, https://host:port.
    #[arg(long, env = "SOVRA_COORDINATOR")]
    pub coordinator: String,
    /// One-time join token from `sovra provider join-token` (first start only).
    #[arg(long, env = "SOVRA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Folder of the worker's key, certificate and identity.
    #[arg(long, env = "SOVRA_DATA_DIR", value_parser = parse_path)]
    pub data_dir: PathBuf,
    /// Data-plane listen address.
    #[arg(long, env = "SOVRA_LISTEN", default_value = "127.0.0.1:7080")]
    pub listen: SocketAddr,
    /// Data-plane address peers dial (default: the listen address).
    #[arg(long, env = "SOVRA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Most memory this worker's slices and KV caches may take (e.g. 2GiB): the planner gives
    /// it no more, and a session whose KV cache would grow beyond it fails with a message.
    #[arg(long, env = "SOVRA_MAX_MEMORY", value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Folder holding model files (looked up by file name).
    #[arg(long, env = "SOVRA_MODELS_DIR", value_parser = parse_path)]
    pub models_dir: Option<PathBuf>,
    /// On a head stage, wait up to this long (e.g. 60ms) for the next tokens of all open
    /// sessions so they run as one batch. Pays where stages share cores (several workers on one
    /// host); leave it unset where each worker has its own machine.
    #[arg(long, env = "SOVRA_BATCH_WAIT", value_parser = parse_batch_wait)]
    pub batch_wait: Option<Duration>,
    /// Pin the compute threads one per core to these cores (e.g. 0-7 or 0,2,4,6); the worker
    /// then runs one compute thread per listed core (`--threads`, if given, must agree).
    /// Pays with quantized weights (q8_0 decode 1.18x on the two-core demo host); f32 forwards
    /// run on threads it does not pin (0.98x). Default: no pinning.
    #[arg(long, env = "SOVRA_CPUS", value_parser = parse_cpus)]
    pub cpus: Option<CoreList>,
    /// How often to measure again the round trips to the other workers' data planes, which
    /// the coordinator's planner weighs (a worker that comes up is measured at once).
    #[arg(long, env = "SOVRA_PROBE_INTERVAL", default_value = "60s", value_parser = parse_probe_interval)]
    pub probe_interval: Duration,
}

/// Cores given to `--cpus`.
#[derive(Debug, Clone)]
pub struct CoreList(pub Vec<usize>);

fn parse_cpus(text: &str) -> Result<CoreList, String> {
    let cores = sovra_worker::cpus::parse_core_list(text)?;
    sovra_worker::cpus::check_available(&cores)?;
    Ok(CoreList(cores))
}

/// Shortest `--probe-interval`: each probe costs its peers three TLS handshakes.
const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);

fn parse_probe_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < MIN_PROBE_INTERVAL {
        return Err(format!(
            "probe interval `{text}` is shorter than {MIN_PROBE_INTERVAL:?}"
        ));
    }
    Ok(interval)
}

/// Longest `--batch-wait`: a head waits this long on every step where a session lags, so a
/// larger value would stall every job behind one slow session.
const MAX_BATCH_WAIT: Duration = Duration::from_secs(1);

fn parse_batch_wait(text: &str) -> Result<Duration, String> {
    let wait = parse_duration(text)?;
    if wait > MAX_BATCH_WAIT {
        return Err(format!(
            "batch wait `{text}` is longer than {MAX_BATCH_WAIT:?}"
        ));
    }
    Ok(wait)
}

/// Runs `sovra worker start`.
pub async fn worker_start(args: WorkerStartArgs) -> Result<()> {
    let config = WorkerConfig {
        coordinator: args.coordinator,
        join_token: args.join_token,
        data_dir: args.data_dir,
        listen: args.listen,
        advertise: args.advertise,
        max_memory: args.max_memory,
        models_dir: args.models_dir,
        batch_wait: args.batch_wait.unwrap_or_default(),
        cpus: args.cpus.map(|c| c.0),
        probe_interval: args.probe_interval,
    };
    agent::run(config, shutdown_signal()).await?;
    eprintln!("sovra worker stopped");
    Ok(())
}

/// Runs `sovra coordinator reset-token`: a new operator token for a stopped coordinator's data
/// dir (the way back in when its admin.token was lost).
pub fn coordinator_reset_token(data_dir: &std::path::Path) -> Result<()> {
    // A coordinator's folder has its CA's key and its database (a worker's has neither).
    if !data_dir.join("ca-key.pem").is_file() || !data_dir.join("db").is_dir() {
        anyhow::bail!(
            "{} holds no coordinator (no ca-key.pem and db in it)",
            data_dir.display()
        );
    }
    let config = CoordinatorConfig {
        data_dir: data_dir.to_path_buf(),
        federation: FederationConfig::default(),
    };
    let fed = server::open(&config).map_err(|e| {
        let text = e.to_string();
        if text.contains("in use by another running coordinator") {
            anyhow::anyhow!(
                "{text}: stop it first, or use `sovra coordinator rotate-token` while it runs"
            )
        } else {
            anyhow::anyhow!(text)
        }
    })?;
    let (token, unwritten) = fed.rotate_operator_token()?;
    fed.store().flush()?;
    if let Some(why) = unwritten {
        eprintln!("warning: {why}; the new token is only here:");
        println!("{token}");
    } else {
        eprintln!(
            "new operator token written to {} (the old one no longer works)",
            fed.admin_token_path().display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_wait_is_bounded() {
        assert_eq!(parse_batch_wait("60ms"), Ok(Duration::from_millis(60)));
        assert!(parse_batch_wait("5s").unwrap_err().contains("longer than"));
        assert!(parse_batch_wait("0").is_err());
    }
}
