//! The records the coordinator keeps in its [`Store`](crate::store::Store), one tree each, as
//! JSON values, with typed helpers to read and write them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sovra_model::{LayerRange, ModelSpec, WeightMode};

use crate::store::{Store, StoreError};

/// Tree of providers, keyed by name.
pub const PROVIDERS: &str = "providers";
/// Tree of tenants, keyed by name.
pub const TENANTS: &str = "tenants";
/// Tree mapping tenant token hashes to tenant names.
pub const TENANT_TOKENS: &str = "tenant_tokens";
/// Tree of join tokens, keyed by token id.
pub const JOIN_TOKENS: &str = "join_tokens";
/// Tree of workers, keyed by id.
pub const WORKERS: &str = "workers";
/// Tree of models, keyed by name.
pub const MODELS: &str = "models";
/// Tree of placements, keyed by model name.
pub const PLACEMENTS: &str = "placements";
/// Tree of revoked workers: worker id → revocation time, Unix seconds.
pub const REVOKED_WORKERS: &str = "revoked_workers";
/// Tree of coordinator settings (operator token hash).
pub const META: &str = "meta";

/// A provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderRecord {
    /// Unique name.
    pub name: String,
    /// ISO country code.
    pub country: String,
    /// Certifications held.
    pub certifications: Vec<String>,
    /// Revoked providers' workers are refused.
    pub revoked: bool,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
}

/// A tenant; its token is stored only as a hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Unique name.
    pub name: String,
    /// sha256 of its API token.
    pub token_hash: String,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
    /// Revoked: its token no longer authenticates (until a new one is issued).
    #[serde(default)]
    pub revoked: bool,
    /// Most jobs it may run at once; 0: the coordinator's default.
    #[serde(default)]
    pub max_running_jobs: u32,
}

/// A one-time join token; its secret is stored only as a hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Public id.
    pub id: String,
    /// sha256 of the secret.
    pub secret_hash: String,
    /// Provider the joining worker belongs to.
    pub provider: String,
    /// Expiry, Unix seconds.
    pub expires_unix: u64,
    /// The worker that used it, once used.
    pub used_by: Option<String>,
}

/// Liveness of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Joined, never connected its agent stream.
    Joined,
    /// Agent stream open and heartbeats within the lease.
    Up,
    /// Lease expired or stream closed.
    Down,
}

impl WorkerState {
    /// The name shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Joined => "joined",
            WorkerState::Up => "up",
            WorkerState::Down => "down",
        }
    }
}

/// What a worker computes on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// "cpu" or "cuda".
    pub kind: String,
    /// Description.
    pub name: String,
    /// Device memory, bytes.
    pub memory_bytes: u64,
}

/// A worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique id (also its certificate's CN).
    pub id: String,
    /// Its provider.
    pub provider: String,
    /// sha256 of its certificate (DER); only this certificate authenticates it.
    pub cert_fingerprint: String,
    /// Data-plane address.
    pub advertise_addr: String,
    /// Join time, Unix seconds.
    pub joined_unix: u64,
    /// Device, as last reported.
    pub device: DeviceRecord,
    /// Memory offered to the planner, bytes.
    pub offered_memory_bytes: u64,
    /// Measured speed, GFLOP/s.
    pub speed_gflops: f64,
    /// Compute threads.
    pub threads: u32,
    /// Liveness.
    pub state: WorkerState,
    /// Last heartbeat, Unix seconds.
    pub last_seen_unix: u64,
}

/// A sovereignty policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Allowed countries (empty: any).
    pub countries: Vec<String>,
    /// Certifications every provider must hold.
    pub required_certifications: Vec<String>,
    /// Providers never used.
    pub excluded_providers: Vec<String>,
}

/// A registered model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Unique name.
    pub name: String,
    /// Spec read from the GGUF.
    pub spec: ModelSpec,
    /// sha256 of the file.
    pub file_sha256: String,
    /// File name.
    pub file_name: String,
    /// Registration path.
    pub file_path: String,
    /// Weight mode workers load it in.
    pub dtype: WeightMode,
    /// Default policy.
    pub policy: PolicyRecord,
    /// Registration time, Unix seconds.
    pub created_unix: u64,
}

/// One stage of a stored placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Worker id.
    pub worker_id: String,
    /// Layers it runs.
    pub range: LayerRange,
    /// Memory the stage needs, bytes.
    pub memory_bytes: u64,
    /// Estimated per-token time, seconds.
    pub time_s: f64,
    /// The placement version since which its worker holds these layers (kept over later
    /// placements that give it the same layers; 0: not recorded).
    #[serde(default)]
    pub loaded_in: u64,
}

impl StageRecord {
    /// Whether `other` stands for the same slice: same worker, same layers, loaded in the
    /// same placement version.
    pub fn same_slice(&self, other: &StageRecord) -> bool {
        self.worker_id == other.worker_id
            && self.range == other.range
            && self.loaded_in == other.loaded_in
    }
}

/// A model's placement, versioned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// Model name.
    pub model: String,
    /// Version, increased by every replan.
    pub version: u64,
    /// Chains of stages.
    pub chains: Vec<Vec<StageRecord>>,
    /// Why there is no chain, when there is none.
    pub unplaced_reason: Option<String>,
    /// What the operator (or the model's registration) asked for.
    #[serde(default)]
    pub requested: crate::placement::PlacementRequest,
    /// Not what was asked for: planned around workers that failed or were revoked. Planned as
    /// asked again once the available workers change and no job of the model runs (as is a
    /// model that could not be placed at all).
    #[serde(default)]
    pub degraded: bool,
    /// While degraded: what keeps it from being placed as asked, as of the coordinator's last
    /// look (none before its first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_as_asked: Option<String>,
}

impl PlacementRecord {
    /// Whether the coordinator should try to place the model as asked again: the placement
    /// was made around failures, or none could be made.
    pub fn wants_replanning(&self) -> bool {
        self.degraded || (self.chains.is_empty() && self.unplaced_reason.is_some())
    }

    /// The (worker, layers) of every stage, chain by chain: what two placements are compared by.
    pub fn layout(&self) -> Vec<Vec<(&str, LayerRange)>> {
        layout_of(&self.chains)
    }
}

/// The memory the stages of `placements` hold on each worker, by worker id.
pub fn memory_held<'a>(
    placements: impl IntoIterator<Item = &'a PlacementRecord>,
) -> std::collections::HashMap<String, u64> {
    let mut held = std::collections::HashMap::new();
    for stage in placements
        .into_iter()
        .flat_map(|p| p.chains.iter().flatten())
    {
        *held.entry(stage.worker_id.clone()).or_default() += stage.memory_bytes;
    }
    held
}

/// The (worker, layers) of every stage of `chains`, chain by chain.
pub fn layout_of(chains: &[Vec<StageRecord>]) -> Vec<Vec<(&str, LayerRange)>> {
    chains
        .iter()
        .map(|c| c.iter().map(|s| (s.worker_id.as_str(), s.range)).collect())
        .collect()
}

/// Reads the JSON record at `tree/key`.
pub fn read<T: DeserializeOwned>(
    store: &dyn Store,
    tree: &str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    store
        .get(tree, key.as_bytes())?
        .map(|bytes| decode(tree, key.as_bytes(), &bytes))
        .transpose()
}

/// Reads every record of `tree`.
pub fn read_all<T: DeserializeOwned>(store: &dyn Store, tree: &str) -> Result<Vec<T>, StoreError> {
    store
        .scan(tree, b"")?
        .into_iter()
        .map(|(k, v)| decode(tree, &k, &v))
        .collect()
}

/// Encodes a record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

fn decode<T: DeserializeOwned>(tree: &str, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree: tree.to_string(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
