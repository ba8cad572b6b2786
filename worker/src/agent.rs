//! The worker agent: joins the federation once (a one-time token, a CSR for a key that never
//! leaves the worker, the coordinator verified by the CA fingerprint in the token), then keeps
//! an agent stream open with its certificate: hello, heartbeats, and loading the slices the
//! coordinator assigns. It reconnects by itself when the stream breaks.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sovra_model::fetch::sha256_file;
use std::sync::atomic::Ordering;

use sovra_model::{
    GgufModel, LayerRange, LlamaSlice, ModelTokenizer, SamplingParams, StopConditions, WeightMode,
};
use sovra_proto::ca;
use sovra_proto::channel::{self, AuthChannel};
use sovra_proto::pb;
use sovra_proto::token::JoinToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tracing::{info, warn};

use crate::dataplane::{DataPlane, Route};
use crate::probe::Prober;
use crate::quic::TlsIdentity;
use crate::speed::{DeviceInfo, cpu_device, measure_speed_gflops};
use crate::stage::{
    EngineInput, EngineOutput, EngineStats, INPUT_BUDGET_BYTES, InputBudget, MemoryLedger, Peer,
    Refusal, SessionOrder, StageEngine,
};

/// Forwards a worker times at start; its speed is the best of them.
const SPEED_RUNS: usize = 12;

/// Settings of a worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `https://host:port` of the coordinator.
    pub coordinator: String,
    /// One-time join token (needed only for the first start).
    pub join_token: Option<String>,
    /// Folder of the worker's key, certificate and identity.
    pub data_dir: PathBuf,
    /// Data-plane listen address.
    pub listen: std::net::SocketAddr,
    /// Data-plane address peers dial (default: the listen address).
    pub advertise: Option<String>,
    /// Most memory the planner may give this worker, bytes.
    pub max_memory: Option<u64>,
    /// Folder to look for model files in.
    pub models_dir: Option<PathBuf>,
    /// How long a head stage waits for the next tokens of all its sessions to batch them
    /// (see [`StageEngine::with_batch_wait`]); zero runs whatever is ready.
    pub batch_wait: Duration,
    /// Cores to pin the compute threads to, one thread per core (None: the scheduler places
    /// them); see [`crate::cpus`].
    pub cpus: Option<Vec<usize>>,
    /// How often the round trips to the other workers' data planes are measured again (new
    /// workers are measured as soon as the coordinator names them); see [`crate::probe`].
    pub probe_interval: Duration,
}

impl WorkerConfig {
    /// The address peers dial.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The data dir could not be read or written.
    #[error("{0}")]
    Io(String),
    /// Joining failed (bad token, unreachable coordinator, CA mismatch).
    #[error("joining the federation failed: {0}")]
    Join(String),
    /// The coordinator refused this worker for good (revoked provider, replaced certificate).
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    /// Measuring the device failed.
    #[error("measuring speed: {0}")]
    Speed(String),
}

/// What the worker is, as stored in its data dir after joining.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerIdentity {
    /// Id given by the coordinator.
    pub worker_id: String,
    /// Its provider.
    pub provider: String,
    /// Coordinator URL it joined.
    pub coordinator: String,
    /// Data-plane address it joined with.
    pub advertise_addr: String,
}

/// The worker's credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Identity.
    pub identity: WorkerIdentity,
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
    /// Federation CA PEM.
    pub ca_pem: String,
}

/// A slice this worker holds, with the engine that runs it.
#[derive(Debug, Clone)]
pub struct LoadedSlice {
    /// Placement version it belongs to.
    pub version: u64,
    /// Its layers.
    pub range: LayerRange,
    /// The slice.
    pub slice: Arc<LlamaSlice>,
    /// The sha256 of the model file its weights were read from.
    pub file_sha256: String,
    /// Orders for its engine.
    pub engine: mpsc::UnboundedSender<EngineInput>,
    /// Its engine's number, unique in this process (see `watch_engine`).
    pub engine_id: u64,
    /// The bytes of frames its engine's input channel may hold.
    pub budget: InputBudget,
}

impl LoadedSlice {
    /// Whether it holds what `a` orders: the same weights (file, weight mode) of the same
    /// layers, so they need not be read again.
    fn holds(&self, a: &pb::Assignment) -> bool {
        self.file_sha256 == a.file_sha256
            && a.dtype.parse::<WeightMode>().ok() == Some(self.slice.mode())
            && (self.range.start, self.range.end) == (a.start_layer as usize, a.end_layer as usize)
    }
}

/// Slices held, by model name.
pub type SliceTable = Arc<Mutex<HashMap<String, LoadedSlice>>>;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> WorkerError {
    WorkerError::Io(format!("{what} {}: {e}", path.display()))
}

/// Loads the credentials from `data_dir`, or joins with the token to get them, advertising
/// `advertise_addr` as the data-plane address.
pub async fn credentials(
    config: &WorkerConfig,
    advertise_addr: &str,
) -> Result<Credentials, WorkerError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    let identity_path = dir.join("identity.json");
    if identity_path.exists() {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| io_err("reading", &dir.join(name), e))
        };
        let identity: WorkerIdentity = serde_json::from_str(&read("identity.json")?)
            .map_err(|e| WorkerError::Io(format!("corrupt {}: {e}", identity_path.display())))?;
        if config.join_token.is_some() {
            // Not silently: a token meant for another worker (or provider) is not used here.
            warn!(
                worker = %identity.worker_id,
                data_dir = %dir.display(),
                "--join-token ignored: this data dir already holds a worker's identity (a new worker needs a data dir of its own)"
            );
        }
        return Ok(Credentials {
            identity,
            cert_pem: read("worker.pem")?,
            key_pem: read("worker-key.pem")?,
            ca_pem: read("ca.pem")?,
        });
    }
    let token_text = config.join_token.as_deref().ok_or_else(|| {
        WorkerError::Join(format!(
            "{} holds no identity yet: pass --join-token",
            dir.display()
        ))
    })?;
    let creds = join(config, token_text, advertise_addr).await?;
    save_credentials(dir, &creds)?;
    Ok(creds)
}

async fn join(
    config: &WorkerConfig,
    token_text: &str,
    advertise_addr: &str,
) -> Result<Credentials, WorkerError> {
    let token = JoinToken::parse(token_text).map_err(|e| WorkerError::Join(e.to_string()))?;
    let authority = channel::url_authority(&config.coordinator)
        .map_err(|e| WorkerError::Join(e.to_string()))?;
    let host =
        channel::url_host(&config.coordinator).map_err(|e| WorkerError::Join(e.to_string()))?;
    let ca_pem = ca::discover_ca(
        &authority,
        &host,
        &token.ca_fingerprint,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| WorkerError::Join(e.to_string()))?;
    let (key_pem, csr_pem) =
        ca::generate_worker_key_and_csr(&token.id).map_err(|e| WorkerError::Join(e.to_string()))?;
    let channel = channel::connect(&config.coordinator, &ca_pem, None, None)
        .await
        .map_err(|e| WorkerError::Join(e.to_string()))?;
    let advertise_addr = advertise_addr.to_string();
    let response = pb::workers_client::WorkersClient::new(channel)
        .join(pb::JoinRequest {
            token: token_text.trim().to_string(),
            csr_pem,
            advertise_addr: advertise_addr.clone(),
        })
        .await
        .map_err(|s| WorkerError::Join(s.message().to_string()))?
        .into_inner();
    info!(worker = %response.worker_id, provider = %response.provider, "joined the federation");
    Ok(Credentials {
        identity: WorkerIdentity {
            worker_id: response.worker_id,
            provider: response.provider,
            coordinator: config.coordinator.clone(),
            advertise_addr,
        },
        cert_pem: response.certificate_pem,
        key_pem,
        ca_pem,
    })
}

fn save_credentials(dir: &Path, creds: &Credentials) -> Result<(), WorkerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| io_err("writing", &path, e))
    };
    write("worker-key.pem", &creds.key_pem, 0o600)?;
    write("worker.pem", &creds.cert_pem, 0o644)?;
    write("ca.pem", &creds.ca_pem, 0o644)?;
    let identity = serde_json::to_string_pretty(&creds.identity)
        .map_err(|e| WorkerError::Io(e.to_string()))?;
    // Written last: its presence means the identity is complete.
    write("identity.json", &identity, 0o644)
}

/// Takes the data dir for this process alone: a lock on its `worker.lock`, held as long as the
/// returned file is open (the system lets it go when the process ends, however it ends). A
/// second worker on the same identity is refused at start instead of taking the first one's
/// place at the coordinator, turn and turn about.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, WorkerError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    let path = dir.join("worker.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err("opening", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(WorkerError::Io(format!(
            "{} is in use by another running worker",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("locking", &path, e)),
    }
}

/// The outermost folder on the way to `dir` (itself included) that does not exist yet.
fn first_missing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .last()
        .map(Path::to_path_buf)
}

/// Binds the data-plane socket and loads or obtains the credentials: the socket, its address,
/// the address peers are to dial and the credentials.
async fn bind_and_join(
    config: &WorkerConfig,
) -> Result<
    (
        std::net::UdpSocket,
        std::net::SocketAddr,
        String,
        Credentials,
    ),
    WorkerError,
> {
    let socket = std::net::UdpSocket::bind(config.listen).map_err(|e| {
        WorkerError::Io(format!("binding the data plane on {}: {e}", config.listen))
    })?;
    let bound = socket
        .local_addr()
        .map_err(|e| WorkerError::Io(e.to_string()))?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let creds = credentials(config, &advertise).await?;
    Ok((socket, bound, advertise, creds))
}

/// Runs the worker until `shutdown` resolves or the coordinator refuses it for good.
/// The memory a worker offers: the least of its device's and `--max-memory` (0: unknown).
fn offered_memory(device: &DeviceInfo, max_memory: Option<u64>) -> u64 {
    match max_memory {
        Some(cap) if device.memory_bytes > 0 => cap.min(device.memory_bytes),
        Some(cap) => cap,
        None => device.memory_bytes,
    }
}

pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let created = first_missing(&config.data_dir);
    let dir_lock = lock_data_dir(&config.data_dir)?;
    let (socket, bound, advertise, mut creds) = match bind_and_join(&config).await {
        Ok(started) => started,
        Err(e) => {
            // A failed start leaves no folder behind that it created (it holds the lock file
            // only: the credentials are written once the coordinator has answered), removed
            // while the lock is still held.
            if let Some(root) = created {
                let _ = std::fs::remove_dir_all(root);
            }
            drop(dir_lock);
            return Err(e);
        }
    };
    creds.identity.advertise_addr = advertise;
    let device = cpu_device();
    let ledger = Arc::new(MemoryLedger::new(offered_memory(
        &device,
        config.max_memory,
    )));
    let scratch = config.data_dir.clone();
    // The best of SPEED_RUNS forwards (~0.4 s at 200 GFLOP/s): with 3, workers sharing one noisy machine measured
    // 149–198 GFLOP/s in one start and the planner split the layers 15/10/5 by that noise;
    // with 12, 190–200 over four starts.
    let speed = tokio::task::spawn_blocking(move || measure_speed_gflops(&scratch, SPEED_RUNS))
        .await
        .map_err(|e| WorkerError::Speed(e.to_string()))?
        .map_err(WorkerError::Speed)?;
    let (outputs_tx, outputs) = mpsc::unbounded_channel();
    let identity = TlsIdentity {
        cert_pem: creds.cert_pem.clone(),
        key_pem: creds.key_pem.clone(),
        ca_pem: creds.ca_pem.clone(),
    };
    let net = PlaneThread::start()
        .map_err(|e| WorkerError::Io(format!("starting the data-plane thread: {e}")))?;
    if let Some(cores) = config.cpus.clone() {
        // The data-plane thread runs the forwards: it and candle's pool threads get the cores.
        let (tx, rx) = tokio::sync::oneshot::channel();
        net.handle.spawn(async move {
            let _ = tx.send(crate::cpus::pin_compute_threads(&cores));
        });
        rx.await
            .map_err(|_| WorkerError::Io("the data-plane thread stopped".into()))?
            .map_err(WorkerError::Io)?;
    }
    let plane = {
        let _runtime = net.handle.enter();
        DataPlane::start(socket, &identity, outputs_tx.clone())
            .map_err(|e| WorkerError::Io(e.to_string()))?
    };
    let prober = Prober::new(
        &identity,
        &creds.identity.worker_id,
        bound.ip(),
        config.probe_interval,
    )
    .map_err(|e| WorkerError::Io(format!("the round-trip prober: {e}")))?;
    info!(worker = %creds.identity.worker_id, speed_gflops = speed, addr = %bound, "worker starting");
    let session = AgentSession {
        config: &config,
        creds: &creds,
        device,
        speed,
        slices: Arc::default(),
        wanted: Arc::default(),
        sessions: Arc::default(),
        engines: Arc::default(),
        ledger,
        plane: plane.clone(),
        outputs: outputs_tx,
        uplink: Arc::default(),
        net: net.handle.clone(),
        prober,
    };
    net.handle.spawn(pump_outputs(
        outputs,
        plane,
        session.uplink.clone(),
        session.sessions.clone(),
        session.slices.clone(),
    ));
    let result = serve(&session, shutdown).await;
    // Stop everything: the coordinator sees the stream end, peers see the endpoint close, and
    // the stage engines exit once their senders are gone.
    *lock_any(&session.uplink) = None;
    session.plane.close(Duration::from_secs(1)).await;
    lock_any(&session.sessions).clear();
    lock(&session.slices).clear();
    drop(net);
    result
}

/// The thread that runs the data plane, its output pump and the stage engines, on one
/// current-thread runtime: a frame read from the network runs through its engine, and what the
/// forward produces goes back to the network, on this one thread. Handing a frame to another
/// thread costs a wake-up of that thread (tens of microseconds, more on a virtual machine),
/// twice per hop. Small forwards (decode steps) run inline, so the network waits during them
/// and the frames that arrive meanwhile form the next batch; large ones (prompt chunks, many
/// sessions) go to a blocking thread (see [`StageEngine::run`]). Measured on the demo
/// (3 stages, q8_0, debug hop logs): 130–185 µs per hop instead of 365–395 µs.
struct PlaneThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl PlaneThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("data-plane".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for PlaneThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn serve(
    session: &AgentSession<'_>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(200);
    loop {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let began = tokio::time::Instant::now();
        let serving = session.connect_and_serve(stopping);
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut shutdown => {
                // Leave the coordinator first: once it has taken this worker out of service
                // (it ends the stream then), the data plane closes. Closing it first, the
                // peers' reports of the lost link could reach the coordinator before the end
                // of this stream, and a job be moved onto this worker again.
                let _ = stop.send(true);
                let _ = tokio::time::timeout(LEAVE_TIMEOUT, &mut serving).await;
                return Ok(());
            }
            result = &mut serving => match result {
                Err(e @ WorkerError::Refused(_)) => return Err(e),
                Err(e) => warn!(cause = %e, "agent stream lost; reconnecting"),
                Ok(()) => warn!("agent stream closed by the coordinator; reconnecting"),
            },
        }
        // Its sessions are over: a coordinator that lost this stream moves their jobs
        // elsewhere, and one that crashed ended them. Computing on would only take the cores.
        session.close_all_sessions();
        if began.elapsed() > Duration::from_secs(10) {
            // It was connected: this is a new loss, retried soon.
            backoff = Duration::from_millis(200);
        }
        *lock_any(&session.uplink) = None;
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

/// How long a stopping worker waits for the coordinator to take it out of service.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The current agent stream's sender, for events produced between reconnections.
type Uplink = Arc<Mutex<Option<mpsc::Sender<pb::AgentMessage>>>>;
/// Open sessions: session id → (model name, number of the engine it was opened on).
type SessionTable = Arc<Mutex<HashMap<u64, (String, u64)>>>;
/// The counters of every running engine, by number: those of slices replaced while sessions
/// still ran on them included, until they end.
type Engines = Arc<Mutex<HashMap<u64, Arc<EngineStats>>>>;
/// The slices the coordinator wants loaded: model name → placement version of its newest
/// order. A load that finishes after its order was replaced or withdrawn is dropped.
type Wanted = Arc<Mutex<HashMap<String, u64>>>;

/// Moves engine outputs to the network: frames to peers, token events to the coordinator.
async fn pump_outputs(
    mut outputs: mpsc::UnboundedReceiver<EngineOutput>,
    plane: Arc<DataPlane>,
    uplink: Uplink,
    sessions: SessionTable,
    slices: SliceTable,
) {
    while let Some(output) = outputs.recv().await {
        let event = match output {
            EngineOutput::Send { to, frame } => {
                tracing::debug!(
                    target: crate::dataplane::HOP,
                    session = frame.session(),
                    "frame to network"
                );
                plane.send(&to, frame);
                // The frame goes out (its write task and the connection's driver run on this
                // thread) before a token event wakes the agent's threads, which would otherwise
                // take this core first: the tail's ring hop took 415 µs (219 from pump to
                // written) without this and 190 µs with it (pinned demo, hop logs).
                tokio::task::yield_now().await;
                continue;
            }
            EngineOutput::Token {
                session,
                index,
                token_id,
                text,
                finish,
                emitted,
            } => pb::SessionEvent {
                session,
                token: (emitted || !text.is_empty()).then_some(pb::TokenEvent {
                    index,
                    token_id,
                    text,
                }),
                finish_reason: finish.map(|f| f.as_str().to_string()).unwrap_or_default(),
                error: String::new(),
                prefilled: 0,
            },
            EngineOutput::Failed { session, error } => {
                close_session(&sessions, &slices, &plane, session);
                pb::SessionEvent {
                    session,
                    token: None,
                    finish_reason: String::new(),
                    error,
                    prefilled: 0,
                }
            }
            EngineOutput::Prefilled { session, positions } => pb::SessionEvent {
                session,
                prefilled: positions,
                ..Default::default()
            },
        };
        let sender = lock_any(&uplink).clone();
        if let Some(tx) = sender {
            let _ = tx
                .send(pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::SessionEvent(event)),
                })
                .await;
        }
    }
}

fn lock_any<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Frees a session on the engine it was opened on (which, once the model's slice was replaced,
/// is no longer the slice table's).
fn close_session(sessions: &SessionTable, slices: &SliceTable, plane: &DataPlane, session: u64) {
    let route = plane.remove_route(session);
    let model = lock_any(sessions).remove(&session);
    let engine = match (route, model) {
        (Some(route), _) => Some(route.engine),
        (None, Some((model, _))) => lock(slices).get(&model).map(|l| l.engine.clone()),
        (None, None) => None,
    };
    if let Some(engine) = engine {
        let _ = engine.send(EngineInput::Close(session));
    }
}

struct AgentSession<'a> {
    config: &'a WorkerConfig,
    creds: &'a Credentials,
    device: DeviceInfo,
    speed: f64,
    slices: SliceTable,
    wanted: Wanted,
    sessions: SessionTable,
    engines: Engines,
    ledger: Arc<MemoryLedger>,
    plane: Arc<DataPlane>,
    outputs: mpsc::UnboundedSender<EngineOutput>,
    uplink: Uplink,
    net: tokio::runtime::Handle,
    prober: Arc<Prober>,
}

impl AgentSession<'_> {
    /// Frees every open session on this worker's stages.
    fn close_all_sessions(&self) {
        let open: Vec<u64> = lock_any(&self.sessions).keys().copied().collect();
        for session in open {
            close_session(&self.sessions, &self.slices, &self.plane, session);
        }
    }

    /// Connects the agent stream and serves it until it ends; once `stopping` turns true, ends
    /// the stream and waits for the coordinator to end its side (it has marked the worker down
    /// by then).
    async fn connect_and_serve(
        &self,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), WorkerError> {
        let c = self.creds;
        let channel: AuthChannel = channel::connect(
            &self.config.coordinator,
            &c.ca_pem,
            Some((&c.cert_pem, &c.key_pem)),
            None,
        )
        .await
        .map_err(|e| WorkerError::Io(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        let offered = offered_memory(&self.device, self.config.max_memory);
        let hello = pb::WorkerHello {
            device: Some(pb::Device {
                kind: self.device.kind.clone(),
                name: self.device.name.clone(),
                memory_bytes: self.device.memory_bytes,
            }),
            offered_memory_bytes: offered,
            speed_gflops: self.speed,
            advertise_addr: c.identity.advertise_addr.clone(),
            threads: candle_core::utils::get_num_threads() as u32,
        };
        let _ = tx
            .send(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Hello(hello)),
            })
            .await;
        let mut inbound = pb::workers_client::WorkersClient::new(channel)
            .agent(ReceiverStream::new(rx))
            .await
            .map_err(refusal)?
            .into_inner();
        *lock_any(&self.uplink) = Some(tx.clone());
        // Probes for as long as this stream lasts (a new stream gets a new list).
        self.prober.reset();
        let _probing = AbortOnDrop(tokio::spawn(self.prober.clone().run(tx.clone())));
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    seq += 1;
                    let (open_sessions, kv_cache_bytes) = self.load();
                    let beat = pb::AgentMessage { kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat { seq, open_sessions, kv_cache_bytes })) };
                    match tx.try_send(beat) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            return Err(WorkerError::Io("the coordinator stopped reading the agent stream".into()));
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
                message = inbound.message() => match message.map_err(refusal)? {
                    None => return Ok(()),
                    Some(m) => self.handle(m, &tx, &mut heartbeat),
                },
                Ok(()) = stopping.changed() => {
                    *lock_any(&self.uplink) = None;
                    let leaving = pb::AgentMessage {
                        kind: Some(pb::agent_message::Kind::Leaving(pb::Leaving {})),
                    };
                    if tx.send(leaving).await.is_err() {
                        return Ok(());
                    }
                    drop(tx);
                    // Whatever else comes until the coordinator ends its side is moot now.
                    while let Ok(Some(_)) = inbound.message().await {}
                    return Ok(());
                }
            }
        }
    }

    fn handle(
        &self,
        message: pb::CoordinatorMessage,
        tx: &mpsc::Sender<pb::AgentMessage>,
        heartbeat: &mut tokio::time::Interval,
    ) {
        use pb::coordinator_message::Kind;
        match message.kind {
            Some(Kind::Welcome(w)) => {
                let period = Duration::from_millis(w.heartbeat_interval_ms.clamp(50, 60_000));
                *heartbeat = tokio::time::interval(period);
                info!(worker = %w.worker_id, heartbeat_ms = w.heartbeat_interval_ms, "connected to the coordinator");
                // A new stream means the coordinator already gave up (or lost) the sessions of
                // the old one: free them.
                self.close_all_sessions();
                // Revocations made while it was away or before it started.
                self.plane.revoke(&w.revoked_peers);
                // Slices of models this worker was unassigned from while it was away.
                lock_any(&self.wanted).retain(|model, _| w.models.contains(model));
                lock(&self.slices).retain(|model, _| {
                    let keep = w.models.contains(model);
                    if !keep {
                        info!(%model, "slice dropped: no longer assigned");
                    }
                    keep
                });
            }
            Some(Kind::Assign(a)) => {
                lock_any(&self.wanted).insert(a.model.clone(), a.placement_version);
                let loader = Loader {
                    models_dir: self.config.models_dir.clone(),
                    batch_wait: self.config.batch_wait,
                    slices: self.slices.clone(),
                    wanted: self.wanted.clone(),
                    sessions: self.sessions.clone(),
                    engines: self.engines.clone(),
                    ledger: self.ledger.clone(),
                    outputs: self.outputs.clone(),
                    uplink: self.uplink.clone(),
                    net: self.net.clone(),
                };
                tokio::spawn(load_assignment(a, loader, tx.clone()));
            }
            Some(Kind::Unassign(u)) => {
                // A load still running for it is dropped when it finishes.
                lock_any(&self.wanted).remove(&u.model);
                lock(&self.slices).remove(&u.model);
                info!(model = %u.model, "slice dropped");
            }
            Some(Kind::OpenSession(o)) => self.open_session(o, tx.clone()),
            Some(Kind::StartSession(s)) => {
                if let Some(engine) = self.plane.engine_of(s.session) {
                    let _ = engine.send(EngineInput::Start(s.session));
                }
            }
            Some(Kind::CloseSession(c)) => {
                close_session(&self.sessions, &self.slices, &self.plane, c.session)
            }
            Some(Kind::PeersRevoked(r)) => self.plane.revoke(&r.worker_ids),
            Some(Kind::ProbePeers(p)) => self.prober.set_peers(p.peers),
            None => {}
        }
    }
}

impl AgentSession<'_> {
    /// Open sessions and the bytes of their KV caches, over every running engine.
    fn load(&self) -> (u32, u64) {
        lock_any(&self.engines)
            .values()
            .fold((0, 0), |(s, kv), stats| {
                (
                    s + stats.sessions.load(Ordering::Relaxed) as u32,
                    kv + stats.kv_bytes.load(Ordering::Relaxed),
                )
            })
    }

    /// Prepares this worker's stage of a session and answers the coordinator.
    fn open_session(&self, o: pb::OpenSession, tx: mpsc::Sender<pb::AgentMessage>) {
        let session_id = o.session;
        let answer = move |refusal: Refusal, prompt_ids: Vec<u32>| pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::SessionOpened(pb::SessionOpened {
                session: session_id,
                error: refusal.message,
                bad_request: refusal.bad_request,
                prompt_tokens: prompt_ids.len() as u32,
                prompt_ids,
            })),
        };
        let loaded = lock(&self.slices).get(&o.model).cloned();
        let Some(loaded) = loaded else {
            let msg = answer(
                format!("model {} is not loaded on this worker", o.model).into(),
                vec![],
            );
            tokio::spawn(async move { tx.send(msg).await });
            return;
        };
        let peer = |p: &Option<pb::Peer>| {
            p.as_ref()
                .filter(|p| !p.worker_id.is_empty())
                .map(|p| Peer {
                    worker_id: p.worker_id.clone(),
                    addr: p.addr.clone(),
                })
        };
        let sampling = o.sampling.clone().unwrap_or_default();
        let order = SessionOrder {
            session: o.session,
            me: self.creds.identity.worker_id.clone(),
            prev: peer(&o.prev),
            next: peer(&o.next),
            head: peer(&o.head).unwrap_or_default(),
            tail: peer(&o.tail).unwrap_or_default(),
            prompt: o.prompt.clone(),
            chat: o.chat,
            system: (!o.system.is_empty()).then(|| o.system.clone()),
            prompt_ids: o.prompt_ids.clone(),
            turns: o
                .turns
                .iter()
                .map(|t| sovra_model::ChatTurn::new(&t.role, &t.text))
                .collect(),
            sampling: SamplingParams {
                temperature: sampling.temperature,
                top_k: (sampling.top_k > 0).then_some(sampling.top_k as usize),
                top_p: (sampling.top_p != 0.0).then_some(sampling.top_p),
                seed: sampling.seed,
            },
            stop: StopConditions {
                max_tokens: sampling.max_tokens as usize,
                stop: sampling.stop.clone(),
                ignore_eos: sampling.ignore_eos,
            },
            replay_generated: o.replay_generated.clone(),
            prompt_tokens: o.prompt_tokens as usize,
        };
        let route = Route {
            model: Arc::from(o.model.as_str()),
            engine: loaded.engine.clone(),
            budget: loaded.budget.clone(),
            prev: order.prev.as_ref().map(|p| p.worker_id.clone()),
            tail: loaded
                .slice
                .is_head_stage()
                .then(|| order.tail.worker_id.clone()),
        };
        self.plane.add_route(o.session, route);
        lock_any(&self.sessions).insert(o.session, (o.model.clone(), loaded.engine_id));
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let _ = loaded
            .engine
            .send(EngineInput::Open(Box::new(order), reply_tx));
        let (sessions, slices, plane, session) = (
            self.sessions.clone(),
            self.slices.clone(),
            self.plane.clone(),
            o.session,
        );
        tokio::spawn(async move {
            let msg = match reply_rx.await {
                Ok(Ok(ids)) => answer(String::new().into(), ids),
                Ok(Err(e)) => {
                    close_session(&sessions, &slices, &plane, session);
                    answer(e, vec![])
                }
                Err(_) => answer("the stage engine stopped".to_string().into(), vec![]),
            };
            let _ = tx.send(msg).await;
        });
    }
}

fn lock(slices: &SliceTable) -> std::sync::MutexGuard<'_, HashMap<String, LoadedSlice>> {
    slices.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns a stream error into a permanent refusal where retrying cannot help.
fn refusal(status: tonic::Status) -> WorkerError {
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => {
            WorkerError::Refused(status.message().to_string())
        }
        _ => WorkerError::Io(format!("{}: {}", status.code(), status.message())),
    }
}

/// What loading a slice needs.
#[derive(Clone)]
struct Loader {
    models_dir: Option<PathBuf>,
    batch_wait: Duration,
    slices: SliceTable,
    wanted: Wanted,
    sessions: SessionTable,
    engines: Engines,
    /// The worker's memory: each engine's weights from its start to its end, and the KV
    /// caches of its sessions.
    ledger: Arc<MemoryLedger>,
    outputs: mpsc::UnboundedSender<EngineOutput>,
    /// The agent stream to report an engine's failure on (the one current then).
    uplink: Uplink,
    net: tokio::runtime::Handle,
}

async fn load_assignment(a: pb::Assignment, loader: Loader, tx: mpsc::Sender<pb::AgentMessage>) {
    let report = |state: pb::AssignmentState, message: String| pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Status(pb::AssignmentStatus {
            model: a.model.clone(),
            placement_version: a.placement_version,
            state: state as i32,
            message,
        })),
    };
    let _ = tx
        .send(report(pb::AssignmentState::Loading, String::new()))
        .await;
    // The same layers of the same weights, held for an earlier order (a placement set again,
    // or planned again with this stage unchanged): kept as they are, with their engine and its
    // sessions, under the new version; nothing is read again.
    let kept = {
        let mut slices = lock(&loader.slices);
        match slices.get_mut(&a.model) {
            Some(held) if held.holds(&a) => {
                if lock_any(&loader.wanted).get(&a.model) != Some(&a.placement_version) {
                    return; // replaced or withdrawn meanwhile: the newer order decides
                }
                let from = held.version;
                held.version = a.placement_version;
                Some((from, held.range))
            }
            _ => None,
        }
    };
    if let Some((from, range)) = kept {
        info!(model = %a.model, layers = %range, version = a.placement_version, kept_from = from, "slice kept");
        // The same version again: its order was sent again as this worker or the coordinator
        // reconnected.
        let message = if from == a.placement_version {
            format!("layers {range} loaded (kept over the reconnection)")
        } else {
            format!("layers {range} kept from placement version {from}")
        };
        let _ = tx.send(report(pb::AssignmentState::Ready, message)).await;
        return;
    }
    if lock_any(&loader.wanted).get(&a.model) != Some(&a.placement_version) {
        return; // replaced or withdrawn before it started: nothing to read
    }
    let order = a.clone();
    let models_dir = loader.models_dir.clone();
    let loaded =
        tokio::task::spawn_blocking(move || load_slice(&order, models_dir.as_deref())).await;
    let outcome = match loaded {
        Ok(Ok((slice, tokenizer))) => {
            let slice = Arc::new(slice);
            let range = slice.range();
            let stats = Arc::new(EngineStats::default());
            let (engine, inputs) = mpsc::unbounded_channel();
            let engine_core = StageEngine::new(
                slice.clone(),
                Arc::new(tokenizer),
                loader.outputs.clone(),
                stats.clone(),
            )
            .with_batch_wait(loader.batch_wait)
            .with_ledger(loader.ledger.clone());
            let weights = slice.spec().slice_bytes(range, slice.mode());
            loader.ledger.add_weights(weights);
            let task = loader.net.spawn(engine_core.run(inputs));
            static ENGINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let engine_id = ENGINES.fetch_add(1, Ordering::Relaxed);
            let mut slices = lock(&loader.slices);
            // Only the newest order is kept: loads of several placement versions may finish
            // out of order, and the model may have been unassigned meanwhile.
            if lock_any(&loader.wanted).get(&a.model) != Some(&a.placement_version) {
                info!(model = %a.model, version = a.placement_version, "slice loaded after its order was replaced or withdrawn: dropped");
                // Its engine ends as its sender goes: no watcher will give its weights back.
                loader.ledger.remove_weights(weights);
                return;
            }
            slices.insert(
                a.model.clone(),
                LoadedSlice {
                    version: a.placement_version,
                    range,
                    slice,
                    file_sha256: a.file_sha256.clone(),
                    engine,
                    engine_id,
                    budget: InputBudget::new(INPUT_BUDGET_BYTES),
                },
            );
            drop(slices);
            lock_any(&loader.engines).insert(engine_id, stats);
            let model = a.model.clone();
            let version = a.placement_version;
            tokio::spawn(watch_engine(
                task,
                model,
                Started {
                    engine_id,
                    version,
                    weights,
                },
                loader.clone(),
            ));
            info!(model = %a.model, layers = %range, version = a.placement_version, "slice ready");
            report(pb::AssignmentState::Ready, format!("layers {range} loaded"))
        }
        Ok(Err(reason)) => {
            warn!(model = %a.model, %reason, "assignment failed");
            report(pb::AssignmentState::Failed, reason)
        }
        Err(e) => report(pb::AssignmentState::Failed, format!("loader crashed: {e}")),
    };
    let _ = tx.send(outcome).await;
}

/// An engine as its watcher knows it: its number and the placement version it was started for.
#[derive(Debug, Clone, Copy)]
struct Started {
    engine_id: u64,
    version: u64,
    /// Bytes of its slice's weights, counted in the ledger until it ends.
    weights: u64,
}

/// Waits for a slice's engine task. If it ended by a panic (a bug in the engine itself: a
/// forward's panic only fails its batch), its sessions are gone: the slice is forgotten, so a new
/// session on it is refused, its open sessions fail at once (the coordinator moves their jobs to
/// another chain, as for any stage failure, without waiting for its stall watchdog), and its
/// assignment is reported failed (under the version the slice holds now: it may have been kept
/// for newer orders), so the coordinator stops choosing chains through it. An engine that ends
/// because its slice was replaced says nothing; one already replaced only reports, under the
/// version it was started for.
async fn watch_engine(
    task: tokio::task::JoinHandle<()>,
    model: String,
    Started {
        engine_id,
        version,
        weights,
    }: Started,
    loader: Loader,
) {
    let ended = task.await;
    lock_any(&loader.engines).remove(&engine_id);
    loader.ledger.remove_weights(weights);
    let Err(error) = ended else { return };
    if !error.is_panic() {
        return;
    }
    let payload = error.into_panic();
    let reason = format!(
        "the stage engine stopped: {}",
        crate::stage::panic_message(&*payload)
    );
    let current = {
        let mut slices = lock(&loader.slices);
        match slices.get(&model) {
            Some(l) if l.engine_id == engine_id => slices.remove(&model).map(|l| l.version),
            _ => None,
        }
    };
    let version = current.unwrap_or(version);
    warn!(%model, version, %reason, "slice failed");
    // Its own sessions, not those of another engine of the model (a newer slice's, or an
    // older one's still serving the sessions opened on it).
    let lost: Vec<u64> = lock_any(&loader.sessions)
        .iter()
        .filter(|(_, (_, engine))| *engine == engine_id)
        .map(|(id, _)| *id)
        .collect();
    for session in lost {
        let _ = loader.outputs.send(EngineOutput::Failed {
            session,
            error: reason.clone(),
        });
    }
    let status = pb::AssignmentStatus {
        model,
        placement_version: version,
        state: pb::AssignmentState::Failed as i32,
        message: reason,
    };
    // On the agent stream current now: the slice may have been kept over a reconnection.
    let uplink = lock_any(&loader.uplink).clone();
    if let Some(tx) = uplink {
        let _ = tx
            .send(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Status(status)),
            })
            .await;
    }
}

/// Finds the model file (registered path, then the models dir), checks its hash, loads the slice.
fn load_slice(
    a: &pb::Assignment,
    models_dir: Option<&Path>,
) -> Result<(LlamaSlice, ModelTokenizer), String> {
    let mode: WeightMode = a.dtype.parse()?;
    let mut candidates = vec![PathBuf::from(&a.file_path)];
    if let Some(dir) = models_dir {
        let name = Path::new(&a.file_name)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        candidates.push(dir.join(name));
    }
    let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "model file {} not found (looked at {candidates:?})",
            a.file_name
        )
    })?;
    let hash = sha256_file(path).map_err(|e| e.to_string())?;
    if hash != a.file_sha256 {
        return Err(format!(
            "{} has sha256 {hash}, the federation registered {}",
            path.display(),
            a.file_sha256
        ));
    }
    let model = GgufModel::open(path).map_err(|e| e.to_string())?;
    let range = LayerRange::new(a.start_layer as usize, a.end_layer as usize);
    let tokenizer = ModelTokenizer::from_gguf(model.metadata()).map_err(|e| e.to_string())?;
    let slice = LlamaSlice::load(&model, range, mode, &candle_core::Device::Cpu)
        .map_err(|e| e.to_string())?;
    Ok((slice, tokenizer))
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
