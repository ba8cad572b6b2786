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
    /// Compute threads of each worker process (default: all of this machine's cores). Where
    /// the machine has cores for three workers of that many threads, each worker gets cores
    /// of its own; otherwise the workers take turns on the same cores.
    #[arg(long, value_parser = crate::parse_threads)]
    pub worker_threads: Option<usize>,
    /// Put the workers on the same cores even where each could have cores of its own.
    #[arg(long)]
    pub share_cores: bool,
    /// The question (sent with the chat template).
    #[arg(default_value = "What is the capital of France?")]
    pub prompt: String,
}

/// The demo's three workers share this machine's cores, so their head stage gathers all
/// sessions into one batch (measured with `demo --bench`, f32: 16 concurrent jobs 2.6x one
/// job without, 3.7x with).
const DEMO_BATCH_WAIT: &str = "60ms";

struct Processes(Vec<Child>);

/// Where the demo's workers compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WorkerCores {
    /// All on the same cores, taking turns (the stages of one job compute one after another);
    /// `Some` pins each worker's quantized compute threads one per core on those cores.
    Shared(Option<Vec<usize>>),
    /// Each worker alone on its cores, as on a machine of its own.
    Own([Vec<usize>; 3]),
}

impl WorkerCores {
    /// How the workers of `threads` compute threads each are laid out over `cores` (the
    /// cores this process may use).
    pub(crate) fn plan(threads: usize, cores: &[usize], dtype: WeightMode, share: bool) -> Self {
        if !share && threads > 0 && threads.checked_mul(3).is_some_and(|n| n <= cores.len()) {
            return Self::Own(std::array::from_fn(|i| {
                cores[i * threads..(i + 1) * threads].to_vec()
            }));
        }
        Self::Shared(
            (dtype != WeightMode::F32 && threads <= cores.len()).then(|| cores[..threads].to_vec()),
        )
    }

    /// The layout in words, for the demo's output and the benchmark's heading.
    pub(crate) fn describe(&self) -> String {
        use sovra_worker::cpus::format_core_list as list;
        match self {
            Self::Shared(Some(cores)) => format!("all on cores {}, taking turns", list(cores)),
            Self::Shared(None) => "all on the same cores, unpinned".into(),
            Self::Own(cores) => format!(
                "each on cores of its own ({})",
                cores
                    .iter()
                    .map(|c| list(c))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
        }
    }
}

/// Confines the child to `cores` (all its threads) from before it runs. Linux only.
fn confine(cmd: &mut Command, cores: &[usize]) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // Safety: a zeroed cpu_set_t is a valid empty set; the cores come from this process's
        // own affinity, so they are within its bounds.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &core in cores {
            unsafe { libc::CPU_SET(core, &mut set) };
        }
        // Safety: the closure runs in the forked child before exec and calls only
        // sched_setaffinity, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (cmd, cores);
}

/// The name of every demo folder starts so.
const DEMO_PREFIX: &str = "sovra-demo-";
/// The file in a demo's folder that names the process owning it: "PID STARTTIME". Only
/// folders to be removed at the end have it (not those of `--keep`).
const OWNER_FILE: &str = "demo.owner";

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it runs. Linux only.
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which ends at the last ')': state is field 3.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// This process's PID namespace (`pid:[N]`): a pid means a process only within one.
fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Marks `dir` as this process's demo folder (written whole, then renamed into place).
fn claim(dir: &Path) {
    if let (Some(start), Some(ns)) = (process_start(std::process::id()), pid_namespace()) {
        let partial = dir.join(format!("{OWNER_FILE}.partial"));
        if std::fs::write(&partial, format!("{} {start} {ns}\n", std::process::id())).is_ok() {
            let _ = std::fs::rename(&partial, dir.join(OWNER_FILE));
        }
    }
}

/// Removes the folders that demos killed outright (SIGKILL, a crash) left in `tmp`: those
/// whose owner file names a process that no longer runs. Folders without that file (kept with
/// `--keep`, or not a demo's) are left alone.
fn sweep_dead_demos(tmp: &Path) {
    let Some(ns) = pid_namespace().filter(|_| process_start(std::process::id()).is_some()) else {
        return; // no /proc: nothing tells a dead demo from a running one
    };
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DEMO_PREFIX)
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let mut fields = owner.split_whitespace();
        let (Some(pid), Some(start), Some(owner_ns)) = (
            fields.next().and_then(|p| p.parse().ok()),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        // A demo of another PID namespace (another container sharing this folder) cannot be
        // seen from here: left alone.
        if owner_ns == ns && process_start(pid).as_deref() != Some(start) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

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

/// Compute threads per worker and where the workers compute.
pub(crate) fn worker_cores(args: &DemoArgs) -> (usize, WorkerCores) {
    let threads = args
        .worker_threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let cores = sovra_worker::cpus::allowed_cores().unwrap_or_default();
    let layout = WorkerCores::plan(threads, &cores, args.dtype, args.share_cores);
    (threads, layout)
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

/// Ctrl-C ended the demo (after it tore its processes down): the process exits with 130, as
/// one killed by SIGINT does.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

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
    args.sampling.sampling()?;
    if let Some(t) = args.worker_threads {
        crate::within_cores(t, "--worker-threads").map_err(|e| anyhow!(e))?;
    }
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let model_path = resolve_model(&args.model, &sovra_home(), &mut crate::progress)?;
    let model_path = std::fs::canonicalize(&model_path)?;
    sweep_dead_demos(&std::env::temp_dir());
    let dir = tempfile::Builder::new().prefix(DEMO_PREFIX).tempdir()?;
    let root = if args.keep {
        dir.keep()
    } else {
        // A demo killed outright cannot remove its folder: the next demo does, by this file.
        claim(dir.path());
        dir.path().to_path_buf()
    };
    let mut procs = Processes(Vec::new());
    let exe = std::env::current_exe().context("locating the sovra binary")?;
    let result = tokio::select! {
        r = demo(&args, &exe, &root, &model_path, &mut procs) => r,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
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

    let cores = worker_cores(args);
    onboard(args, &cores, exe, root, &url, &operator, procs).await?;
    let placement = place(args, model_path, &operator).await?;
    if !args.json {
        print_placement_to_stderr(&placement);
    }
    let tenant = pb::tenants_client::TenantsClient::new(operator.clone())
        .add_tenant(pb::AddTenantRequest {
            name: "demo".into(),
            // `--bench` runs 100 jobs at once.
            max_running_jobs: 200,
        })
        .await
        .map_err(status)?
        .into_inner();
    let as_tenant = connect(&url, &ca, None, Some(&tenant.token)).await?;
    if args.bench {
        return crate::fedbench::run(args, &cores, exe, model_path, &operator, &as_tenant).await;
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
    crate::jobs_cmd::stream_job(as_tenant, run.request()?, args.json).await
}

async fn onboard(
    args: &DemoArgs,
    (threads, layout): &(usize, WorkerCores),
    exe: &Path,
    root: &Path,
    url: &str,
    operator: &AuthChannel,
    procs: &mut Processes,
) -> Result<()> {
    let mut providers = pb::providers_client::ProvidersClient::new(operator.clone());
    let mut workers = pb::workers_client::WorkersClient::new(operator.clone());
    say(args.json, &format!("workers      {}", layout.describe()));
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
        let mut worker = Command::new(exe);
        dies_with_this_process(&mut worker)
            .args(["--threads", &threads.to_string()])
            .args(["worker", "start", "--batch-wait", DEMO_BATCH_WAIT])
            .args(["--coordinator", url, "--listen", "127.0.0.1:0"])
            .args(["--join-token", &token, "--data-dir"])
            .arg(root.join(name));
        place_worker(&mut worker, layout, index, args.dtype);
        let log = std::fs::File::create(root.join(format!("{name}.log")))?;
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
        wait_for_workers(&workers, index + 1, name).await?;
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

/// Puts the `index`-th worker's command on its cores. Where the machine has too few cores
/// for each worker to have its own, every worker gets all of them: the stages of one job
/// compute one after another, and an idle worker's threads sleep (measured: 3-stage q8_0
/// decode 0.63x with one thread per worker, 0.76x with two, against `generate --local`). With
/// quantized weights each worker pins its compute threads one per core, the same cores for
/// all (they take turns on them): 3-stage q8_0 decode 1.18x unpinned (10 alternating runs).
/// f32 forwards run on candle's rayon pool, whose threads are not pinned: 0.98x there, so f32
/// workers are left to the scheduler. A worker alone on its cores spins for the next op as
/// long as a local process does (candle's default), since no other stage waits for them.
fn place_worker(worker: &mut Command, layout: &WorkerCores, index: usize, dtype: WeightMode) {
    let pinned = match layout {
        WorkerCores::Shared(pinned) => pinned.as_deref(),
        WorkerCores::Own(cores) => {
            confine(worker, &cores[index]);
            if std::env::var_os(crate::SPIN_LIMIT_VAR).is_none() {
                worker.env(crate::SPIN_LIMIT_VAR, crate::CANDLE_SPIN_LIMIT.to_string());
            }
            (dtype != WeightMode::F32).then_some(&cores[index][..])
        }
    };
    if let Some(cores) = pinned {
        worker.args(["--cpus", &sovra_worker::cpus::format_core_list(cores)]);
    }
}

/// Waits until `count` workers are up; `name` is the provider whose worker is joining.
async fn wait_for_workers(
    workers: &pb::workers_client::WorkersClient<AuthChannel>,
    count: usize,
    name: &str,
) -> Result<()> {
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
                (list.iter().filter(|w| w.state == "up").count() >= count).then_some(())
            }
        },
    )
    .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_cores_of_their_own_only_where_there_are_enough() {
        let two: Vec<usize> = (0..2).collect();
        let sixteen: Vec<usize> = (0..16).collect();
        assert_eq!(
            WorkerCores::plan(2, &two, WeightMode::Q8_0, false),
            WorkerCores::Shared(Some(vec![0, 1]))
        );
        assert_eq!(
            WorkerCores::plan(2, &two, WeightMode::F32, false),
            WorkerCores::Shared(None)
        );
        let own = WorkerCores::plan(2, &sixteen, WeightMode::Q8_0, false);
        assert_eq!(own, WorkerCores::Own([vec![0, 1], vec![2, 3], vec![4, 5]]));
        assert_eq!(own.describe(), "each on cores of its own (0-1 | 2-3 | 4-5)");
        assert_eq!(
            WorkerCores::plan(2, &sixteen, WeightMode::F32, false),
            WorkerCores::Own([vec![0, 1], vec![2, 3], vec![4, 5]])
        );
        assert_eq!(
            WorkerCores::plan(2, &sixteen, WeightMode::Q8_0, true),
            WorkerCores::Shared(Some(vec![0, 1]))
        );
        // Six threads each need 18 cores.
        assert_eq!(
            WorkerCores::plan(6, &sixteen, WeightMode::Q8_0, false),
            WorkerCores::Shared(Some((0..6).collect()))
        );
        // The cores this process may use, not 0..n.
        assert_eq!(
            WorkerCores::plan(1, &[3, 5, 9], WeightMode::Q8_0, false),
            WorkerCores::Own([vec![3], vec![5], vec![9]])
        );
        assert_eq!(
            WorkerCores::plan(2, &[], WeightMode::Q8_0, false),
            WorkerCores::Shared(None)
        );
        assert_eq!(
            WorkerCores::plan(usize::MAX, &sixteen, WeightMode::Q8_0, false),
            WorkerCores::Shared(None)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_confined_child_runs_on_its_cores_only() {
        let cores = sovra_worker::cpus::allowed_cores().unwrap();
        let last = *cores.last().unwrap();
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        confine(&mut cmd, &[last]);
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let line = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            line.split_whitespace().last(),
            Some(&*last.to_string()),
            "{line}"
        );
    }
}
