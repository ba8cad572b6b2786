//! `sovra demo`: a whole federation on this machine. A coordinator and three workers of three
//! providers (FR, DE, NL) run as separate processes (the same binaries a provider runs) in a
//! temporary folder, talking gRPC and QUIC over loopback; the demo onboards them, registers
//! and places the model across them, and streams an answer. Ctrl-C or the end tears it down.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use sovra_coordinator::service::spec_pb;
use sovra_model::fetch::{resolve_model, sha256_file, sovra_home};
use sovra_model::{GgufModel, WeightMode};
use sovra_proto::channel::{AuthChannel, connect};
use sovra_proto::pb;

use crate::fed::status;
use crate::generate::SamplingArgs;

/// The providers of the demo federation.
const PROVIDERS: [(&str, &str, &str); 3] = [
    ("paris-dc", "FR", "ISO27001,SecNumCloud"),
    ("frankfurt-dc", "DE", "ISO27001,C5"),
    ("amsterdam-dc", "NL", "ISO27001"),
];

/// Arguments of `sovra demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stages the model is split into (one per worker, at most 3).
    #[arg(long, default_value_t = 3)]
    pub stages: u32,
    /// Model: a known name or a path to a .gguf file.
    #[arg(short, long, default_value = "smollm2", env = "SOVRA_MODEL")]
    pub model: String,
    /// How the workers hold the weights: gguf, q8_0 or f32.
    #[arg(long, default_value_t = WeightMode::DEFAULT)]
    pub dtype: WeightMode,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print JSON lines on stdout, as `sovra run --json`.
    #[arg(long)]
    pub json: bool,
    /// Keep the demo's folder (logs, data dirs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Instead of one answer, benchmark the federation against `generate --local` (markdown).
    #[arg(long)]
    pub bench: bool,
    /// Compute threads of each worker process (default: all of this machine's cores).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// The question (sent with the chat template).
    #[arg(default_value = "What is the capital of France?")]
    pub prompt: String,
}

/// The demo's three workers share this machine's cores, so their head stage gathers all
/// sessions into one batch (measured with `demo --bench`, f32: 16 concurrent jobs 2.6x one
/// job without, 3.7x with).
const DEMO_BATCH_WAIT: &str = "60ms";

struct Processes(Vec<Child>);

/// Makes the child get SIGTERM when this process dies, however it dies (a SIGKILL included),
/// so the demo's coordinator and workers never outlive it. The signal follows the thread that
/// spawned the child: the demo spawns from the thread that runs its main future, which lives
/// as long as the process. Linux only; elsewhere a demo killed outright leaves them running.
fn dies_with_this_process(cmd: &mut Command) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // Safety: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between the fork and the prctl.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the demo process is gone"));
                }
                Ok(())
            });
        }
    }
    cmd
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SIGTERM first so each process shuts down gracefully.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.0 {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn say(json: bool, line: &str) {
    if !json {
        eprintln!("{line}");
    }
}

/// Runs `sovra demo`; with `--json` (and no `--bench`), a failure is also printed as a JSON
/// error line on stdout, as `sovra run --json` does.
pub async fn run(args: DemoArgs) -> Result<()> {
    let json = args.json && !args.bench;
    let result = run_demo(args).await;
    if let Err(err) = &result
        && json
    {
        crate::generate::print_error_line(err);
    }
    result
}

async fn run_demo(args: DemoArgs) -> Result<()> {
    if args.stages == 0 || args.stages > 3 {
        bail!("--stages must be 1, 2 or 3 (the demo has three workers)");
    }
    let model_path = resolve_model(&args.model, &sovra_home(), &mut crate::progress)?;
    let model_path = std::fs::canonicalize(&model_path)?;
    let dir = tempfile::Builder::new().prefix("sovra-demo-").tempdir()?;
    let root = if args.keep {
        dir.keep()
    } else {
        dir.path().to_path_buf()
    };
    let mut procs = Processes(Vec::new());
    let exe = std::env::current_exe().context("locating the sovra binary")?;
    let result = tokio::select! {
        r = demo(&args, &exe, &root, &model_path, &mut procs) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    drop(procs);
    if args.keep {
        // On stderr even with --json: the folder is what --keep is asked for.
        eprintln!("demo files kept in {}", root.display());
    }
    result
}

async fn demo(
    args: &DemoArgs,
    exe: &Path,
    root: &Path,
    model_path: &Path,
    procs: &mut Processes,
) -> Result<()> {
    let coord_dir = root.join("coordinator");
    let log = std::fs::File::create(root.join("coordinator.log"))?;
    let mut coordinator = dies_with_this_process(&mut Command::new(exe))
        .args([
            "coordinator",
            "start",
            "--io-threads",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&coord_dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = coordinator
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no coordinator stdout"))?;
    procs.0.push(coordinator);
    let url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line.trim().to_string())
    })
    .await??;
    if !url.starts_with("https://") {
        bail!(
            "the coordinator did not start (see {})",
            root.join("coordinator.log").display()
        );
    }
    say(
        args.json,
        &format!("coordinator  {url}  (data in {})", coord_dir.display()),
    );
    let ca = std::fs::read_to_string(coord_dir.join("ca.pem"))?;
    let admin = std::fs::read_to_string(coord_dir.join("admin.token"))?
        .trim()
        .to_string();
    let operator = connect(&url, &ca, None, Some(&admin)).await?;

    onboard(args, exe, root, &url, &operator, procs).await?;
    let placement = place(args, model_path, &operator).await?;
    if !args.json {
        print_placement_to_stderr(&placement);
    }
    let tenant = pb::tenants_client::TenantsClient::new(operator.clone())
        .add_tenant(pb::AddTenantRequest {
            name: "demo".into(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let as_tenant = connect(&url, &ca, None, Some(&tenant.token)).await?;
    if args.bench {
        return crate::fedbench::run(args, exe, model_path, &operator, &as_tenant).await;
    }
    let run = crate::jobs_cmd::RunArgs {
        model: "demo-model".into(),
        chat: true,
        system: None,
        sampling: args.sampling.clone(),
        policy: Default::default(),
        prompt: args.prompt.clone(),
    };
    say(args.json, &format!("\n> {}\n", args.prompt));
    crate::jobs_cmd::stream_job(as_tenant, run.request(), args.json).await
}

async fn onboard(
    args: &DemoArgs,
    exe: &Path,
    root: &Path,
    url: &str,
    operator: &AuthChannel,
    procs: &mut Processes,
) -> Result<()> {
    let mut providers = pb::providers_client::ProvidersClient::new(operator.clone());
    let mut workers = pb::workers_client::WorkersClient::new(operator.clone());
    // Every worker gets all the cores: the stages of one job compute one after another,
    // and an idle worker's threads sleep (measured: 3-stage q8_0 decode 0.63x with one
    // thread per worker, 0.76x with two, against `generate --local`). With quantized
    // weights each worker pins its compute threads one per core, the same cores for all
    // (they take turns on them): 3-stage q8_0 decode 1.18x unpinned (10 alternating runs).
    // f32 forwards run on candle's rayon pool, whose threads are not pinned: 0.98x there,
    // so f32 workers are left to the scheduler.
    let threads = args
        .worker_threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let cores = sovra_worker::cpus::allowed_cores().unwrap_or_default();
    let pinned = (args.dtype != WeightMode::F32 && threads <= cores.len())
        .then(|| sovra_worker::cpus::format_core_list(&cores[..threads]));
    for (index, &(name, country, certs)) in PROVIDERS.iter().enumerate() {
        providers
            .add_provider(pb::AddProviderRequest {
                name: name.into(),
                country: country.into(),
                certifications: certs.split(',').map(String::from).collect(),
            })
            .await
            .map_err(status)?;
        let token = providers
            .create_join_token(pb::CreateJoinTokenRequest {
                provider: name.into(),
                ttl_seconds: 600,
            })
            .await
            .map_err(status)?
            .into_inner()
            .token;
        let log = std::fs::File::create(root.join(format!("{name}.log")))?;
        let mut worker = Command::new(exe);
        dies_with_this_process(&mut worker)
            .args(["--threads", &threads.to_string()])
            .args([
                "worker",
                "start",
                "--batch-wait",
                DEMO_BATCH_WAIT,
                "--coordinator",
                url,
                "--listen",
                "127.0.0.1:0",
                "--join-token",
                &token,
                "--data-dir",
            ])
            .arg(root.join(name));
        if let Some(cores) = &pinned {
            worker.args(["--cpus", cores]);
        }
        let worker = worker
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the worker of {name}"))?;
        procs.0.push(worker);
        say(
            args.json,
            &format!("provider     {name} ({country}) admitted; its worker is joining"),
        );
        // One worker at a time: each measures its speed while the others idle, so workers
        // sharing this machine measure the same speed and get even shares of the layers.
        let joined = index + 1;
        wait(
            &format!("the worker of {name} to join"),
            Duration::from_secs(120),
            || {
                let mut workers = workers.clone();
                async move {
                    let list = workers
                        .list_workers(pb::ListWorkersRequest {})
                        .await
                        .ok()?
                        .into_inner()
                        .workers;
                    (list.iter().filter(|w| w.state == "up").count() >= joined).then_some(())
                }
            },
        )
        .await?;
    }
    for w in workers
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .workers
    {
        say(
            args.json,
            &format!(
                "worker       {} of {} ({}) up at {}, {:.1} GFLOP/s",
                w.id, w.provider, w.country, w.advertise_addr, w.speed_gflops
            ),
        );
    }
    Ok(())
}

pub(crate) async fn place(
    args: &DemoArgs,
    model_path: &Path,
    operator: &AuthChannel,
) -> Result<pb::Placement> {
    let gguf = GgufModel::open(model_path)?;
    let request = pb::AddModelRequest {
        name: "demo-model".into(),
        spec: Some(spec_pb(gguf.spec())),
        file_sha256: sha256_file(model_path)?,
        file_name: model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file_path: model_path.display().to_string(),
        dtype: args.dtype.to_string(),
        policy: Some(pb::Policy::default()),
    };
    pb::models_client::ModelsClient::new(operator.clone())
        .add_model(request)
        .await
        .map_err(status)?;
    let mut placements = pb::placements_client::PlacementsClient::new(operator.clone());
    placements
        .set_placement(pb::SetPlacementRequest {
            model: "demo-model".into(),
            how: Some(pb::set_placement_request::How::Stages(args.stages)),
        })
        .await
        .map_err(status)?;
    wait(
        "every stage to load its layers",
        Duration::from_secs(180),
        || {
            let mut placements = placements.clone();
            async move {
                let p = placements
                    .show_placement(pb::ShowPlacementRequest {
                        model: "demo-model".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let stages: Vec<&pb::PlacementStage> =
                    p.chains.iter().flat_map(|c| &c.stages).collect();
                if let Some(failed) = stages
                    .iter()
                    .find(|s| s.state == pb::AssignmentState::Failed as i32)
                {
                    return Some(Err(anyhow!(
                        "worker {} could not load layers {}..{}: {}",
                        failed.worker_id,
                        failed.start_layer,
                        failed.end_layer,
                        failed.message
                    )));
                }
                (!stages.is_empty()
                    && stages
                        .iter()
                        .all(|s| s.state == pb::AssignmentState::Ready as i32))
                .then_some(Ok(p))
            }
        },
    )
    .await?
}

fn print_placement_to_stderr(p: &pb::Placement) {
    eprintln!();
    for (i, chain) in p.chains.iter().enumerate() {
        for s in &chain.stages {
            eprintln!(
                "chain {i}  layers {:>2}..{:<2} → {} ({}, {})",
                s.start_layer, s.end_layer, s.worker_id, s.provider, s.country
            );
        }
    }
}

async fn wait<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
