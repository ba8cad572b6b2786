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
use sovra_model::{GgufModel, LayerRange, LlamaSlice, WeightMode};
use sovra_proto::ca;
use sovra_proto::channel::{self, AuthChannel};
use sovra_proto::pb;
use sovra_proto::token::JoinToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tracing::{info, warn};

use crate::speed::{DeviceInfo, cpu_device, measure_speed_gflops};

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

/// A slice this worker holds.
#[derive(Debug, Clone)]
pub struct LoadedSlice {
    /// Placement version it belongs to.
    pub version: u64,
    /// Its layers.
    pub range: LayerRange,
    /// The slice.
    pub slice: Arc<LlamaSlice>,
}

/// Slices held, by model name.
pub type SliceTable = Arc<Mutex<HashMap<String, LoadedSlice>>>;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> WorkerError {
    WorkerError::Io(format!("{what} {}: {e}", path.display()))
}

/// Loads the credentials from `data_dir`, or joins with the token to get them.
pub async fn credentials(config: &WorkerConfig) -> Result<Credentials, WorkerError> {
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
    let creds = join(config, token_text).await?;
    save_credentials(dir, &creds)?;
    Ok(creds)
}

async fn join(config: &WorkerConfig, token_text: &str) -> Result<Credentials, WorkerError> {
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
    let advertise_addr = config.advertise_addr();
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

/// Runs the worker until `shutdown` resolves or the coordinator refuses it for good.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let creds = credentials(&config).await?;
    let device = cpu_device();
    let scratch = config.data_dir.clone();
    let speed = tokio::task::spawn_blocking(move || measure_speed_gflops(&scratch, 3))
        .await
        .map_err(|e| WorkerError::Speed(e.to_string()))?
        .map_err(WorkerError::Speed)?;
    info!(worker = %creds.identity.worker_id, speed_gflops = speed, "worker starting");
    let slices: SliceTable = Arc::default();
    let session = AgentSession {
        config: &config,
        creds: &creds,
        device,
        speed,
        slices,
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            result = session.connect_and_serve() => match result {
                Err(e @ WorkerError::Refused(_)) => return Err(e),
                Err(e) => warn!(cause = %e, "agent stream lost; reconnecting"),
                Ok(()) => warn!("agent stream closed by the coordinator; reconnecting"),
            },
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

struct AgentSession<'a> {
    config: &'a WorkerConfig,
    creds: &'a Credentials,
    device: DeviceInfo,
    speed: f64,
    slices: SliceTable,
}

impl AgentSession<'_> {
    async fn connect_and_serve(&self) -> Result<(), WorkerError> {
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
        let device_memory = self.device.memory_bytes;
        let offered = match self.config.max_memory {
            Some(cap) if device_memory > 0 => cap.min(device_memory),
            Some(cap) => cap,
            None => device_memory,
        };
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
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    seq += 1;
                    let beat = pb::AgentMessage { kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat { seq })) };
                    if tx.send(beat).await.is_err() {
                        return Ok(());
                    }
                }
                message = inbound.message() => match message.map_err(refusal)? {
                    None => return Ok(()),
                    Some(m) => self.handle(m, &tx, &mut heartbeat),
                },
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
            }
            Some(Kind::Assign(a)) => {
                tokio::spawn(load_assignment(
                    a,
                    self.config.models_dir.clone(),
                    self.slices.clone(),
                    tx.clone(),
                ));
            }
            Some(Kind::Unassign(u)) => {
                lock(&self.slices).remove(&u.model);
                info!(model = %u.model, "slice dropped");
            }
            None => {}
        }
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

async fn load_assignment(
    a: pb::Assignment,
    models_dir: Option<PathBuf>,
    slices: SliceTable,
    tx: mpsc::Sender<pb::AgentMessage>,
) {
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
    let order = a.clone();
    let loaded =
        tokio::task::spawn_blocking(move || load_slice(&order, models_dir.as_deref())).await;
    let outcome = match loaded {
        Ok(Ok(slice)) => {
            let range = slice.range();
            lock(&slices).insert(
                a.model.clone(),
                LoadedSlice {
                    version: a.placement_version,
                    range,
                    slice: Arc::new(slice),
                },
            );
            info!(model = %a.model, layers = %range, "slice ready");
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

/// Finds the model file (registered path, then the models dir), checks its hash, loads the slice.
fn load_slice(a: &pb::Assignment, models_dir: Option<&Path>) -> Result<LlamaSlice, String> {
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
    LlamaSlice::load(&model, range, mode, &candle_core::Device::Cpu).map_err(|e| e.to_string())
}
