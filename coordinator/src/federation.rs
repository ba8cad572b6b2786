//! The coordinator's domain logic, free of gRPC: who may do what, onboarding, the fleet's
//! liveness, models and placements. The gRPC services in [`crate::service`] translate to and
//! from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sovra_model::{LayerRange, WeightMode};
use sovra_proto::ca::{self, FederationCa};
use sovra_proto::token::{self, JoinToken};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::datadir::{DataDir, load_or_create_ca, pem_to_der, write_private};
use crate::error::CoordinatorError;
use crate::placement::{self, PlacementRequest};
use crate::records::*;
use crate::store::{Batch, Store};
use crate::validate::{clean_country, clean_list, clean_policy, host_of, validate_name};

/// A try to place a degraded model as asked: its placement version, the available workers,
/// and, while jobs of it run, which jobs ran (0 when none of it did; tried again once one of
/// them changes: a job that ends may free what the plan needs).
pub(crate) type ReplanTry = (u64, Vec<String>, u64);

/// Gives the stages of placements stored without the version their slices were loaded in
/// (before it was recorded) their placement's version, so a job started on one and a later
/// placement that keeps it agree it is one slice.
fn record_load_versions(store: &dyn Store) -> Result<(), CoordinatorError> {
    for mut placement in read_all::<PlacementRecord>(store, PLACEMENTS)? {
        let stages = placement.chains.iter_mut().flatten();
        let unrecorded: Vec<&mut StageRecord> = stages.filter(|s| s.loaded_in == 0).collect();
        if unrecorded.is_empty() {
            continue;
        }
        for stage in unrecorded {
            stage.loaded_in = placement.version;
        }
        store.apply(Batch::new().put(PLACEMENTS, &placement.model, encode(&placement)))?;
    }
    store.flush()?;
    Ok(())
}

/// Settings of a coordinator.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// Names (DNS or IP) the coordinator is reached at; they go into its certificate.
    pub advertise: Vec<String>,
    /// Interval at which workers must heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is marked down.
    pub lease: Duration,
    /// Tokens of KV cache reserved per layer a worker holds, when planning.
    pub kv_reserve_tokens: u64,
    /// Most jobs a tenant may run at once, unless its own limit says otherwise.
    pub tenant_max_running_jobs: u32,
    /// Validity of worker certificates, days.
    pub worker_cert_days: u32,
    /// A job that shows no progress (a token, or a chunk of its prompt run on a stage) for
    /// this long is moved to another chain.
    pub job_stall: Duration,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            advertise: vec!["localhost".into(), "127.0.0.1".into()],
            heartbeat_interval: Duration::from_secs(1),
            lease: Duration::from_secs(5),
            kv_reserve_tokens: 4096,
            tenant_max_running_jobs: 64,
            worker_cert_days: 365,
            job_stall: Duration::from_secs(60),
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The federation operator.
    Operator,
    /// A tenant, by name.
    Tenant(String),
}

impl Caller {
    /// The name its jobs are recorded under.
    pub fn name(&self) -> &str {
        match self {
            Caller::Operator => OPERATOR_NAME,
            Caller::Tenant(t) => t,
        }
    }
}

/// An order for a worker, sent over its agent stream.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCommand {
    /// Load a slice.
    Assign(AssignmentOrder),
    /// Drop a model's slice.
    Unassign {
        /// Model name.
        model: String,
    },
    /// Prepare a session's stage.
    OpenSession(Box<crate::jobs::SessionOpen>),
    /// Start a session (head).
    StartSession(u64),
    /// Drop a session.
    CloseSession(u64),
    /// Refuse data-plane connections from these workers.
    PeersRevoked(Vec<String>),
    /// Measure round trips to these workers: (worker id, data-plane address, epoch).
    ProbePeers(Vec<(String, String, u64)>),
}

/// A slice to load.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentOrder {
    /// Model name.
    pub model: String,
    /// Placement version.
    pub version: u64,
    /// sha256 of the file.
    pub file_sha256: String,
    /// File name.
    pub file_name: String,
    /// Registration path.
    pub file_path: String,
    /// Weight mode.
    pub dtype: WeightMode,
    /// Layers.
    pub range: LayerRange,
    /// Chain index.
    pub chain: usize,
    /// Stage index within the chain.
    pub stage: usize,
}

/// Progress of an assignment, as a worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentState {
    /// Loading.
    Loading,
    /// Ready to serve.
    Ready,
    /// Failed.
    Failed,
}

/// What a worker says about itself when its agent stream opens.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerHello {
    /// Device.
    pub device: DeviceRecord,
    /// Memory offered, bytes.
    pub offered_memory_bytes: u64,
    /// Measured speed, GFLOP/s.
    pub speed_gflops: f64,
    /// Data-plane address.
    pub advertise_addr: String,
    /// Compute threads.
    pub threads: u32,
}

pub(crate) struct LiveWorker {
    pub(crate) stream: u64,
    pub(crate) commands: mpsc::UnboundedSender<AgentCommand>,
    pub(crate) last_heartbeat: Instant,
    pub(crate) sessions: u32,
    pub(crate) kv_bytes: u64,
    /// Its data-plane address (where its peers probe it).
    pub(crate) addr: String,
}

#[derive(Default)]
pub(crate) struct Live {
    pub(crate) workers: HashMap<String, LiveWorker>,
    /// (model, worker) → (version, state, message).
    pub(crate) statuses: HashMap<(String, String), (u64, AssignmentState, String)>,
    pub(crate) next_stream: u64,
    /// (from, to) → the round trip `from` last measured to `to`'s data plane.
    pub(crate) links: HashMap<(String, String), crate::links::LinkSample>,
}

/// Most jobs a tenant's own limit may allow at once.
pub const MAX_JOB_LIMIT: u32 = 100_000;

fn check_job_limit(limit: u32) -> Result<(), CoordinatorError> {
    if limit > MAX_JOB_LIMIT {
        return Err(CoordinatorError::InvalidArgument(format!(
            "a tenant may run at most {MAX_JOB_LIMIT} jobs at once, not {limit}"
        )));
    }
    Ok(())
}

/// The tenant name the operator's jobs are recorded under (no tenant may take it).
pub const OPERATOR_NAME: &str = "operator";

/// The coordinator's state: durable records in the store, live streams in memory.
pub struct Federation {
    store: Arc<dyn Store>,
    ca: FederationCa,
    config: FederationConfig,
    live: Mutex<Live>,
    pub(crate) job_table: Mutex<crate::jobs::JobTable>,
    /// Jobs to move to another chain: (session, why).
    pub(crate) recoveries: mpsc::UnboundedSender<(u64, String)>,
    recovery_queue: Mutex<Option<mpsc::UnboundedReceiver<(u64, String)>>>,
    pub(crate) replan_lock: tokio::sync::Mutex<()>,
    /// Held from planning a placement to storing it, by every path that places a model: a
    /// plan counts the memory the other models' placements take, and stores over what it
    /// read.
    placing: Mutex<()>,
    /// The available workers as `replan_degraded` last saw them, and since when.
    pub(crate) fleet_seen: Mutex<Option<(Vec<String>, Instant)>>,
    /// Per model: held (shared) by every job from choosing its chain until it is in the job
    /// table, so a placement made as asked again (`replan_degraded`) never pulls a chain from
    /// under a job that is starting.
    placement_gates: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Per degraded model: the placement version and the available workers of the last try to
    /// place it as asked again (tried again only once either changes).
    replan_tries: Mutex<HashMap<String, ReplanTry>>,
    /// Where the operator token is kept for the operator (`admin.token`).
    admin_token_path: std::path::PathBuf,
    /// Set once the coordinator is stopping.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// When this process opened the federation (its workers reconnect from then on).
    pub(crate) opened_at: Instant,
}

/// Meta key of the operator token's hash.
const OPERATOR_TOKEN_HASH: &str = "operator_token_hash";

impl Federation {
    /// Opens the federation kept in `dir` (creating its CA and operator token on first start).
    pub fn open(
        dir: &DataDir,
        store: Arc<dyn Store>,
        config: FederationConfig,
    ) -> Result<Self, CoordinatorError> {
        let ca = load_or_create_ca(dir)?;
        if read::<String>(store.as_ref(), META, OPERATOR_TOKEN_HASH)?.is_none() {
            let token = token::new_operator_token();
            write_private(&dir.admin_token(), &format!("{token}\n")).map_err(|e| {
                CoordinatorError::Io(format!("writing {}: {e}", dir.admin_token().display()))
            })?;
            store.apply(Batch::new().put(
                META,
                OPERATOR_TOKEN_HASH,
                encode(&token::hash_secret(&token)),
            ))?;
            store.flush()?;
            info!(path = %dir.admin_token().display(), "operator token created");
        }
        crate::jobs::abandon_running_jobs(store.as_ref())?;
        record_load_versions(store.as_ref())?;
        warn_of_stale_countries(store.as_ref())?;
        let (recoveries, recovery_queue) = mpsc::unbounded_channel();
        Ok(Self {
            store,
            ca,
            config,
            live: Mutex::new(Live::default()),
            job_table: Mutex::new(Default::default()),
            recoveries,
            recovery_queue: Mutex::new(Some(recovery_queue)),
            replan_lock: tokio::sync::Mutex::new(()),
            placing: Mutex::default(),
            fleet_seen: Mutex::default(),
            placement_gates: Mutex::default(),
            replan_tries: Mutex::default(),
            admin_token_path: dir.admin_token(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            opened_at: Instant::now(),
        })
    }

    /// Replaces the operator token: the old one stops working at once. Returns the new token
    /// and, when writing it to the data dir's token file failed, why (the token is then only
    /// in the answer).
    pub fn rotate_operator_token(&self) -> Result<(String, Option<String>), CoordinatorError> {
        let token = token::new_operator_token();
        self.store.apply(Batch::new().put(
            META,
            OPERATOR_TOKEN_HASH,
            encode(&token::hash_secret(&token)),
        ))?;
        self.store.flush()?;
        warn!(path = %self.admin_token_path.display(), "operator token rotated");
        let unwritten = write_private(&self.admin_token_path, &format!("{token}\n"))
            .err()
            .map(|e| format!("writing {}: {e}", self.admin_token_path.display()));
        Ok((token, unwritten))
    }

    /// Whether the operator token file holds the operator token (it may have been emptied,
    /// edited or removed since it was written).
    pub fn admin_token_file_holds_the_token(&self) -> Result<bool, CoordinatorError> {
        let stored: Option<String> = read(self.store(), META, OPERATOR_TOKEN_HASH)?;
        let in_file = std::fs::read_to_string(&self.admin_token_path).unwrap_or_default();
        Ok(
            stored
                .is_some_and(|s| token::constant_time_eq(&s, &token::hash_secret(in_file.trim()))),
        )
    }

    /// The file the operator token is kept in.
    pub fn admin_token_path(&self) -> &std::path::Path {
        &self.admin_token_path
    }

    /// Moves failed jobs to other chains until the federation is dropped; `server::run`
    /// spawns it once.
    pub async fn run_recoveries(self: Arc<Self>) {
        let queue = self
            .recovery_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut queue) = queue else { return };
        while let Some((session, reason)) = queue.recv().await {
            tokio::spawn(self.clone().recover(session, reason));
        }
    }

    /// The federation CA.
    pub fn ca(&self) -> &FederationCa {
        &self.ca
    }

    /// The settings.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Identifies the holder of an API token.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, CoordinatorError> {
        let token = bearer.ok_or_else(|| {
            CoordinatorError::Unauthenticated("no API token: pass --token or --token-file".into())
        })?;
        let hash = token::hash_secret(token);
        if token.starts_with(token::OPERATOR_PREFIX) {
            let stored: Option<String> = read(self.store(), META, OPERATOR_TOKEN_HASH)?;
            if stored.is_some_and(|s| token::constant_time_eq(&s, &hash)) {
                return Ok(Caller::Operator);
            }
        } else if token.starts_with(token::TENANT_PREFIX)
            && let Some(name) = read::<String>(self.store(), TENANT_TOKENS, &hash)?
        {
            if read::<TenantRecord>(self.store(), TENANTS, &name)?.is_some_and(|t| t.revoked) {
                return Err(CoordinatorError::Unauthenticated(format!(
                    "tenant `{name}` is revoked"
                )));
            }
            return Ok(Caller::Tenant(name));
        }
        Err(CoordinatorError::Unauthenticated(
            "the API token is not valid for this federation".into(),
        ))
    }

    /// Requires the operator.
    pub fn require_operator(&self, bearer: Option<&str>) -> Result<(), CoordinatorError> {
        match self.authenticate(bearer)? {
            Caller::Operator => Ok(()),
            Caller::Tenant(name) => Err(CoordinatorError::PermissionDenied(format!(
                "tenant `{name}` may not run operator commands"
            ))),
        }
    }

    /// Admits a provider.
    pub fn add_provider(
        &self,
        name: &str,
        country: &str,
        certifications: &[String],
    ) -> Result<ProviderRecord, CoordinatorError> {
        validate_name("provider", name)?;
        let country = clean_country(country)?;
        let certifications = clean_list("certification", certifications)?;
        let record = ProviderRecord {
            name: name.to_string(),
            country,
            certifications,
            revoked: false,
            created_unix: now_unix(),
        };
        self.create(PROVIDERS, name, "provider", &record)?;
        info!(provider = name, "provider added");
        Ok(record)
    }

    fn create<T: serde::Serialize>(
        &self,
        tree: &str,
        key: &str,
        kind: &'static str,
        record: &T,
    ) -> Result<(), CoordinatorError> {
        let batch = Batch::new()
            .expect(tree, key, None)
            .put(tree, key, encode(record));
        match self.store.apply(batch) {
            Err(crate::store::StoreError::Conflict { .. }) => {
                Err(CoordinatorError::AlreadyExists {
                    kind,
                    name: key.to_string(),
                })
            }
            other => {
                other?;
                Ok(self.store.flush()?)
            }
        }
    }

    /// Every provider with the number of its workers that are not revoked.
    pub fn list_providers(&self) -> Result<Vec<(ProviderRecord, usize)>, CoordinatorError> {
        let mut workers: Vec<WorkerRecord> = read_all(self.store(), WORKERS)?;
        let revoked = self.revoked_workers()?;
        workers.retain(|w| !revoked.contains(&w.id));
        Ok(read_all::<ProviderRecord>(self.store(), PROVIDERS)?
            .into_iter()
            .map(|p| {
                let count = workers.iter().filter(|w| w.provider == p.name).count();
                (p, count)
            })
            .collect())
    }

    /// The provider of that name.
    pub fn provider(&self, name: &str) -> Result<ProviderRecord, CoordinatorError> {
        read(self.store(), PROVIDERS, name)?
            .ok_or_else(|| CoordinatorError::not_found("provider", name))
    }

    /// Issues a one-time join token for a worker of `provider`.
    pub fn create_join_token(
        &self,
        provider: &str,
        ttl: Duration,
    ) -> Result<(JoinToken, u64), CoordinatorError> {
        let record = self.provider(provider)?;
        if record.revoked {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "provider `{provider}` is revoked"
            )));
        }
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(CoordinatorError::InvalidArgument(
                "token lifetime must be between 1 s and 30 days".into(),
            ));
        }
        let token = JoinToken::generate(&self.ca.fingerprint());
        let expires_unix = now_unix() + ttl.as_secs().max(1);
        let record = JoinTokenRecord {
            id: token.id.clone(),
            secret_hash: token::hash_secret(&token.secret),
            provider: provider.to_string(),
            expires_unix,
            used_by: None,
        };
        self.store
            .apply(Batch::new().put(JOIN_TOKENS, &token.id, encode(&record)))?;
        self.store.flush()?;
        Ok((token, expires_unix))
    }

    /// Revokes a provider: its workers are refused from now on and their streams are cut.
    pub fn revoke_provider(&self, name: &str) -> Result<ProviderRecord, CoordinatorError> {
        let mut record = self.provider(name)?;
        if record.revoked {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "provider `{name}` is already revoked"
            )));
        }
        record.revoked = true;
        self.store
            .apply(Batch::new().put(PROVIDERS, name, encode(&record)))?;
        self.store.flush()?;
        let workers: Vec<WorkerRecord> = read_all(self.store(), WORKERS)?;
        let mut live = self.live();
        for w in workers.iter().filter(|w| w.provider == name) {
            // Dropping the command sender ends the worker's stream.
            live.workers.remove(&w.id);
        }
        let revoked: Vec<String> = workers
            .iter()
            .filter(|w| w.provider == name)
            .map(|w| w.id.clone())
            .collect();
        for other in live.workers.values() {
            let _ = other
                .commands
                .send(AgentCommand::PeersRevoked(revoked.clone()));
        }
        drop(live);
        for id in &revoked {
            self.set_worker_state(id, WorkerState::Down)?;
            self.fail_jobs_on(id, "belongs to a revoked provider");
        }
        // A placement waiting for its workers to come back no longer does.
        self.replan_tries().clear();
        warn!(provider = name, "provider revoked");
        Ok(record)
    }

    /// Creates a tenant and returns its API token.
    pub fn add_tenant(
        &self,
        name: &str,
        max_running_jobs: u32,
    ) -> Result<(TenantRecord, String), CoordinatorError> {
        validate_name("tenant", name)?;
        check_job_limit(max_running_jobs)?;
        if name == OPERATOR_NAME {
            return Err(CoordinatorError::InvalidArgument(format!(
                "`{OPERATOR_NAME}` is the name jobs of the operator are recorded under; choose another"
            )));
        }
        let token = token::new_tenant_token();
        let record = TenantRecord {
            name: name.to_string(),
            token_hash: token::hash_secret(&token),
            created_unix: now_unix(),
            revoked: false,
            max_running_jobs,
        };
        let batch = Batch::new()
            .expect(TENANTS, name, None)
            .put(TENANTS, name, encode(&record))
            .put(TENANT_TOKENS, &record.token_hash, encode(&record.name));
        match self.store.apply(batch) {
            Err(crate::store::StoreError::Conflict { .. }) => {
                return Err(CoordinatorError::AlreadyExists {
                    kind: "tenant",
                    name: name.into(),
                });
            }
            other => other?,
        }
        self.store.flush()?;
        Ok((record, token))
    }

    /// Revokes a tenant: its token stops authenticating at once and its running jobs are
    /// cancelled. Its record and its jobs' records stay; [`Self::rotate_tenant_token`] lets it
    /// back in with a new token.
    pub fn revoke_tenant(&self, name: &str) -> Result<TenantRecord, CoordinatorError> {
        let mut record = self.tenant(name)?;
        if record.revoked {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "tenant `{name}` is already revoked"
            )));
        }
        let before = encode(&record);
        record.revoked = true;
        self.update_tenant(name, before, &record, None)?;
        let sessions: Vec<u64> = {
            let jobs = self.jobs();
            jobs.live
                .iter()
                .filter(|(_, j)| j.record.tenant == name)
                .map(|(s, _)| *s)
                .collect()
        };
        for session in sessions {
            let why = format!("tenant `{name}` was revoked");
            self.finish_job(session, crate::jobs::JobState::Cancelled, None, Some(why));
        }
        info!(tenant = name, "tenant revoked");
        Ok(record)
    }

    /// Sets how many jobs tenant `name` may run at once (0: the coordinator's default). Jobs
    /// running beyond a lowered limit go on; new ones wait for the count to come down.
    pub fn set_tenant_limit(
        &self,
        name: &str,
        max_running_jobs: u32,
    ) -> Result<TenantRecord, CoordinatorError> {
        check_job_limit(max_running_jobs)?;
        let mut record = self.tenant(name)?;
        let before = encode(&record);
        record.max_running_jobs = max_running_jobs;
        self.update_tenant(name, before, &record, None)?;
        info!(tenant = name, max_running_jobs, "tenant limit set");
        Ok(record)
    }

    /// The most jobs tenant `t` may run at once.
    pub fn job_limit_of(&self, t: &TenantRecord) -> u32 {
        if t.max_running_jobs == 0 {
            self.config.tenant_max_running_jobs
        } else {
            t.max_running_jobs
        }
    }

    /// Issues a tenant a new API token (lifting a revocation); the old token stops working.
    pub fn rotate_tenant_token(
        &self,
        name: &str,
    ) -> Result<(TenantRecord, String), CoordinatorError> {
        let mut record = self.tenant(name)?;
        let before = encode(&record);
        let old_hash = record.token_hash.clone();
        let token = token::new_tenant_token();
        record.token_hash = token::hash_secret(&token);
        record.revoked = false;
        self.update_tenant(name, before, &record, Some(&old_hash))?;
        info!(tenant = name, "tenant token rotated");
        Ok((record, token))
    }

    /// True when `name` is a tenant that is revoked (or cannot be read).
    pub(crate) fn tenant_revoked(&self, name: &str) -> bool {
        match read::<TenantRecord>(self.store(), TENANTS, name) {
            Ok(Some(t)) => t.revoked,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    pub(crate) fn tenant(&self, name: &str) -> Result<TenantRecord, CoordinatorError> {
        if name == OPERATOR_NAME {
            return Err(CoordinatorError::InvalidArgument(format!(
                "`{OPERATOR_NAME}` is not a tenant: the operator's token is replaced with `sovra coordinator rotate-token`"
            )));
        }
        read(self.store(), TENANTS, name)?
            .ok_or_else(|| CoordinatorError::not_found("tenant", name))
    }

    /// Writes `record` over `before` (refused if it changed meanwhile); with `old_hash`, the
    /// token of that hash is replaced by the record's.
    fn update_tenant(
        &self,
        name: &str,
        before: Vec<u8>,
        record: &TenantRecord,
        old_hash: Option<&str>,
    ) -> Result<(), CoordinatorError> {
        let mut batch =
            Batch::new()
                .expect(TENANTS, name, Some(before))
                .put(TENANTS, name, encode(record));
        if let Some(old) = old_hash {
            batch = batch.delete(TENANT_TOKENS, old).put(
                TENANT_TOKENS,
                &record.token_hash,
                encode(&record.name),
            );
        }
        match self.store.apply(batch) {
            Err(crate::store::StoreError::Conflict { .. }) => {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "tenant `{name}` changed meanwhile; try again"
                )));
            }
            other => other?,
        }
        Ok(self.store.flush()?)
    }

    /// Every tenant.
    pub fn list_tenants(&self) -> Result<Vec<TenantRecord>, CoordinatorError> {
        Ok(read_all(self.store(), TENANTS)?)
    }

    /// Consumes a join token and signs the worker's CSR.
    pub fn join(
        &self,
        token_text: &str,
        csr_pem: &str,
        advertise_addr: &str,
    ) -> Result<(WorkerRecord, String), CoordinatorError> {
        let refused =
            |why: &str| CoordinatorError::Unauthenticated(format!("join token refused: {why}"));
        let token = JoinToken::parse(token_text).map_err(|e| refused(&e.to_string()))?;
        if token.ca_fingerprint != self.ca.fingerprint() {
            return Err(refused("it was issued by another federation CA"));
        }
        let stored_bytes = self
            .store
            .get(JOIN_TOKENS, token.id.as_bytes())?
            .ok_or_else(|| refused("unknown token"))?;
        let mut record: JoinTokenRecord = serde_json::from_slice(&stored_bytes)
            .map_err(|e| CoordinatorError::Internal(format!("corrupt join token record: {e}")))?;
        if !token::constant_time_eq(&record.secret_hash, &token::hash_secret(&token.secret)) {
            return Err(refused("wrong secret"));
        }
        if record.used_by.is_some() {
            return Err(refused("it has already been used"));
        }
        if now_unix() >= record.expires_unix {
            return Err(refused("it has expired"));
        }
        let provider = self.provider(&record.provider)?;
        if provider.revoked {
            return Err(refused(&format!("provider `{}` is revoked", provider.name)));
        }
        let addresses = self.worker_addresses(advertise_addr)?;
        let worker_id = format!("{}-{}", provider.name, token::random_hex(3));
        let cert_pem = self
            .ca
            .sign_worker_csr(
                csr_pem,
                &worker_id,
                &provider.name,
                &addresses,
                self.config.worker_cert_days,
            )
            .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
        let cert_der = pem_to_der(&cert_pem)?;
        let worker = WorkerRecord {
            id: worker_id.clone(),
            provider: provider.name.clone(),
            cert_fingerprint: ca::fingerprint_der(&cert_der),
            advertise_addr: advertise_addr.to_string(),
            joined_unix: now_unix(),
            device: DeviceRecord::default(),
            offered_memory_bytes: 0,
            speed_gflops: 0.0,
            threads: 0,
            state: WorkerState::Joined,
            last_seen_unix: 0,
        };
        record.used_by = Some(worker_id.clone());
        // Consuming the token and creating the worker are one transaction: a token races once.
        let batch = Batch::new()
            .expect(JOIN_TOKENS, &token.id, Some(stored_bytes))
            .put(JOIN_TOKENS, &token.id, encode(&record))
            .expect(WORKERS, &worker_id, None)
            .put(WORKERS, &worker_id, encode(&worker));
        self.store.apply(batch).map_err(|e| match e {
            crate::store::StoreError::Conflict { .. } => refused("it has already been used"),
            e => e.into(),
        })?;
        self.store.flush()?;
        info!(worker = %worker_id, provider = %provider.name, "worker joined");
        Ok((worker, cert_pem))
    }

    /// The names to put in a worker's certificate for its data-plane address.
    fn worker_addresses(&self, advertise_addr: &str) -> Result<Vec<String>, CoordinatorError> {
        let host = host_of(advertise_addr).ok_or_else(|| {
            CoordinatorError::InvalidArgument(format!(
                "advertise address `{advertise_addr}` is not host:port"
            ))
        })?;
        if host.parse::<std::net::IpAddr>().is_err()
            && self
                .config
                .advertise
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&host))
        {
            return Err(CoordinatorError::InvalidArgument(format!(
                "a worker may not claim the coordinator's name `{host}`"
            )));
        }
        Ok(vec![host])
    }

    /// Registers a model and places it if the fleet allows.
    pub fn add_model(
        &self,
        record: ModelRecord,
    ) -> Result<(ModelRecord, PlacementRecord), CoordinatorError> {
        validate_name("model", &record.name)?;
        placement::validate_spec(&record.spec)?;
        if record.file_sha256.len() != 64
            || !record.file_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(CoordinatorError::InvalidArgument(
                "file sha256 must be 64 hex digits".into(),
            ));
        }
        let mut record = record;
        record.policy = clean_policy(&record.policy)?;
        record.created_unix = now_unix();
        self.create(MODELS, &record.name.clone(), "model", &record)?;
        let placement = match self.set_placement(&record.name, PlacementRequest::Auto) {
            Ok(p) => p,
            Err(e) => {
                // Placed once the workers allow (see `replan_degraded`).
                let p = PlacementRecord {
                    model: record.name.clone(),
                    version: self.placement_floor(&record.name)?,
                    chains: vec![],
                    unplaced_reason: Some(e.to_string()),
                    requested: PlacementRequest::Auto,
                    degraded: false,
                    not_as_asked: None,
                };
                // Only while the model is still the one just added (not removed meanwhile).
                self.store.apply(
                    Batch::new()
                        .expect(MODELS, &record.name, Some(encode(&record)))
                        .put(PLACEMENTS, &record.name, encode(&p)),
                )?;
                p
            }
        };
        self.store.flush()?;
        Ok((record, placement))
    }

    /// Removes a model and its placement, and tells its workers to drop their slices. Refused
    /// while a job of the model runs; the records of its past jobs stay. Placement versions go
    /// on from where they were if the name is registered again, so a worker's late report of
    /// the old model is never taken for the new one.
    pub async fn remove_model(&self, name: &str) -> Result<ModelRecord, CoordinatorError> {
        // Not while a failed stage is being replanned around.
        let _one_at_a_time = self.replan_lock.lock().await;
        let record = self.model(name)?;
        let placed = self.store.get(PLACEMENTS, name.as_bytes())?;
        let placement = self.placement(name)?;
        {
            // Held until the model is gone: a job is either in the table now, or finds the
            // model gone when it is about to enter it (`launch`).
            let jobs = self.jobs();
            let mut running: Vec<&str> = jobs
                .live
                .values()
                .filter(|j| j.record.model == name)
                .map(|j| j.record.id.as_str())
                .collect();
            if !running.is_empty() {
                running.sort();
                let count = running.len();
                let more = if count > 10 {
                    format!(" and {} more", count - 10)
                } else {
                    String::new()
                };
                running.truncate(10);
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "model `{name}` has {count} running job(s) ({}{more}); cancel them or let them finish first",
                    running.join(", ")
                )));
            }
            let floor = placement.version + 1;
            let batch = Batch::new()
                .expect(MODELS, name, self.store.get(MODELS, name.as_bytes())?)
                .expect(PLACEMENTS, name, placed)
                .delete(MODELS, name)
                .delete(PLACEMENTS, name)
                .put(META, floor_key(name), encode(&floor));
            match self.store.apply(batch) {
                Err(crate::store::StoreError::Conflict { .. }) => {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "model `{name}` was replanned while it was being removed; try again"
                    )));
                }
                other => other?,
            }
            self.store.flush()?;
        }
        let empty = PlacementRecord {
            model: name.to_string(),
            version: placement.version + 1,
            ..Default::default()
        };
        self.dispatch(&record, &placement, &empty);
        self.live().statuses.retain(|(model, _), _| model != name);
        // The memory it held may let another model be placed as asked: try them all again.
        self.replan_tries().clear();
        info!(model = name, "model removed");
        Ok(record)
    }

    /// The version a model's next placement must pass: that of the last placement of a model
    /// of this name that was removed (0 if none was).
    fn placement_floor(&self, model: &str) -> Result<u64, CoordinatorError> {
        Ok(read::<u64>(self.store(), META, &floor_key(model))?.unwrap_or(0))
    }

    /// Every model.
    pub fn list_models(&self) -> Result<Vec<ModelRecord>, CoordinatorError> {
        Ok(read_all(self.store(), MODELS)?)
    }

    /// The model of that name.
    pub fn model(&self, name: &str) -> Result<ModelRecord, CoordinatorError> {
        read(self.store(), MODELS, name)?.ok_or_else(|| CoordinatorError::not_found("model", name))
    }

    /// The gate of `model`'s placement (see `placement_gates`).
    pub(crate) fn placement_gate(&self, model: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.placement_gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    /// The model's current placement.
    pub fn placement(&self, model: &str) -> Result<PlacementRecord, CoordinatorError> {
        self.model(model)?;
        Ok(
            read(self.store(), PLACEMENTS, model)?.unwrap_or_else(|| PlacementRecord {
                model: model.to_string(),
                ..Default::default()
            }),
        )
    }

    /// Replans `model` as `how` asks and sends the new assignments to the workers.
    pub fn set_placement(
        &self,
        model: &str,
        how: PlacementRequest,
    ) -> Result<PlacementRecord, CoordinatorError> {
        let _placing = self.placing();
        let record = self.model(model)?;
        let chains = self.plan(&record, &how)?;
        // Its running jobs keep the stages they run on until they end.
        self.check_beside_running_jobs(&self.placement(model)?, &chains)?;
        self.write_placement(&record, chains, how, false, None)
    }

    /// Whether `chains`, a new placement of `current`'s model, fit in what their workers offer
    /// beside every stage held now: other models', those of replaced placements that running
    /// jobs still run on, and those of `current` that jobs of it run on (each counted once
    /// where `chains` give its worker the same layers). The error names the first worker that
    /// would hold more than it offers.
    pub(crate) fn check_beside_running_jobs(
        &self,
        current: &PlacementRecord,
        chains: &[Vec<StageRecord>],
    ) -> Result<(), CoordinatorError> {
        let placements = read_all::<PlacementRecord>(self.store(), PLACEMENTS)?;
        let mut need = self.memory_committed(&placements, Some(&current.model));
        // The stages of `current` that jobs of it run on stay until those jobs end.
        let in_jobs: Vec<StageRecord> = self
            .jobs()
            .live
            .values()
            .filter(|j| j.record.model == current.model)
            .flat_map(|j| j.held.iter().cloned())
            .collect();
        let in_use: Vec<&StageRecord> = current
            .chains
            .iter()
            .flatten()
            .filter(|s| in_jobs.iter().any(|h| h.same_slice(s)))
            .collect();
        for s in &in_use {
            *need.entry(s.worker_id.clone()).or_default() += s.memory_bytes;
        }
        for stage in chains.iter().flatten() {
            // Given the same layers, its worker keeps the slice it holds.
            let kept = in_use
                .iter()
                .any(|s| s.worker_id == stage.worker_id && s.range == stage.range);
            if !kept {
                *need.entry(stage.worker_id.clone()).or_default() += stage.memory_bytes;
            }
        }
        let workers = self.list_workers()?;
        for stage in chains.iter().flatten() {
            let (id, held) = (
                &stage.worker_id,
                need.get(&stage.worker_id).copied().unwrap_or(0),
            );
            let offered = workers
                .iter()
                .find(|(w, _)| w.id == *id)
                .map_or(0, |(w, _)| w.offered_memory_bytes);
            if held > offered {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "cannot place `{}` so while jobs of it run: worker {id} would hold {} with them (the stages they run on stay until they end), more than the {} it offers; cancel them or try again once they end",
                    current.model,
                    crate::planner::gib(held),
                    crate::planner::gib(offered),
                )));
            }
        }
        Ok(())
    }

    /// A worker that `model`'s policy allows and that is neither up nor revoked (it has
    /// connected before): a plan made now leaves it out, and may differ once it is back.
    pub(crate) fn a_worker_down(&self, model: &ModelRecord) -> Option<String> {
        let revoked = self.revoked_workers().ok()?;
        self.list_workers()
            .ok()?
            .into_iter()
            .find(|(w, p)| {
                w.state != crate::records::WorkerState::Joined
                    && !revoked.contains(&w.id)
                    && !self.is_live(&w.id)
                    && placement::allows(model, w, p)
            })
            .map(|(w, _)| w.id)
    }

    /// How long after this process started its workers may still be reconnecting: a lease,
    /// and at least the longest pause between a worker's reconnection attempts (3 s) and a
    /// connection's set-up.
    pub(crate) fn reconnect_grace(&self) -> Duration {
        self.config.lease.max(Duration::from_secs(5))
    }

    /// Records `placement` (whose layout is what was asked) as no longer degraded, in place:
    /// same version, nothing sent to the workers.
    pub(crate) fn mark_as_asked(
        &self,
        placement: &PlacementRecord,
    ) -> Result<(), CoordinatorError> {
        self.update_placement_in_place(&PlacementRecord {
            degraded: false,
            not_as_asked: None,
            ..placement.clone()
        })?;
        info!(model = %placement.model, version = placement.version, "placement is as asked");
        Ok(())
    }

    /// Stores `updated` over the model's placement without a new version: nothing is sent to
    /// the workers (only its flags or reason change). Callers hold `placing`.
    pub(crate) fn update_placement_in_place(
        &self,
        updated: &PlacementRecord,
    ) -> Result<(), CoordinatorError> {
        self.store
            .apply(Batch::new().put(PLACEMENTS, &updated.model, encode(updated)))?;
        Ok(())
    }

    /// Records, in place, why a model that has no placement still cannot be placed.
    pub(crate) fn note_unplaced(
        &self,
        placement: &PlacementRecord,
        why: &str,
    ) -> Result<(), CoordinatorError> {
        if !placement.chains.is_empty() || placement.unplaced_reason.as_deref() == Some(why) {
            return Ok(());
        }
        self.update_placement_in_place(&PlacementRecord {
            unplaced_reason: Some(why.to_string()),
            ..placement.clone()
        })
    }

    /// Records, in place, what keeps the degraded placement `version` of `model` from being
    /// placed as asked (nothing when it was replanned or healed meanwhile). Callers hold
    /// `placing`.
    pub(crate) fn note_not_as_asked(
        &self,
        model: &str,
        version: u64,
        why: &str,
    ) -> Result<(), CoordinatorError> {
        let current = self.placement(model)?;
        if current.version != version
            || !current.degraded
            || current.not_as_asked.as_deref() == Some(why)
        {
            return Ok(());
        }
        self.update_placement_in_place(&PlacementRecord {
            not_as_asked: Some(why.to_string()),
            ..current
        })
    }

    /// The last tries to place degraded models as asked (see `replan_tries`).
    pub(crate) fn replan_tries(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplanTry>> {
        self.replan_tries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Held from planning a placement to storing it (see `placing`).
    pub(crate) fn placing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.placing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans `model` as `how` asks over the workers available now.
    pub(crate) fn plan(
        &self,
        model: &ModelRecord,
        how: &PlacementRequest,
    ) -> Result<Vec<Vec<StageRecord>>, CoordinatorError> {
        self.plan_holding(model, how, false)
    }

    /// As `plan`; with `beside_itself`, the memory the model's own current stages hold is not
    /// free either (a plan made while its jobs still run on them: they keep their slices until
    /// those jobs end).
    pub(crate) fn plan_holding(
        &self,
        model: &ModelRecord,
        how: &PlacementRequest,
        beside_itself: bool,
    ) -> Result<Vec<Vec<StageRecord>>, CoordinatorError> {
        let mut candidates = self.candidates()?;
        // What the other models' stages hold on each worker is not free for this one.
        let placements = read_all::<PlacementRecord>(self.store(), PLACEMENTS)?;
        let except = (!beside_itself).then_some(model.name.as_str());
        let committed = self.memory_committed(&placements, except);
        for c in &mut candidates {
            c.committed_bytes = committed.get(&c.worker.id).copied().unwrap_or(0);
        }
        let links = self.planner_links();
        placement::plan(
            model,
            &candidates,
            how,
            self.config.kv_reserve_tokens,
            links,
        )
    }

    /// Stores `chains` as the model's next placement (asked for as `requested`; `degraded`
    /// when planned otherwise, around failures) and sends the new assignments to the workers.
    pub(crate) fn write_placement(
        &self,
        record: &ModelRecord,
        chains: Vec<Vec<StageRecord>>,
        requested: PlacementRequest,
        degraded: bool,
        not_as_asked: Option<String>,
    ) -> Result<PlacementRecord, CoordinatorError> {
        let model = record.name.as_str();
        let previous = self.placement(model)?;
        let version = previous.version.max(self.placement_floor(model)?) + 1;
        // A stage given the same layers on the same worker keeps the slice it holds.
        let mut chains = chains;
        for stage in chains.iter_mut().flatten() {
            stage.loaded_in = previous
                .chains
                .iter()
                .flatten()
                .find(|s| s.worker_id == stage.worker_id && s.range == stage.range)
                .map_or(version, |s| match s.loaded_in {
                    0 => previous.version,
                    since => since,
                });
        }
        let placement = PlacementRecord {
            model: model.to_string(),
            version,
            chains,
            unplaced_reason: None,
            requested,
            degraded,
            not_as_asked: not_as_asked.filter(|_| degraded),
        };
        let batch = Batch::new()
            .expect(
                PLACEMENTS,
                model,
                self.store.get(PLACEMENTS, model.as_bytes())?,
            )
            .put(PLACEMENTS, model, encode(&placement));
        self.store.apply(batch)?;
        self.store.flush()?;
        // The memory this placement frees or takes changes what the others can get.
        self.replan_tries().clear();
        self.dispatch(record, &previous, &placement);
        info!(
            model,
            version = placement.version,
            chains = placement.chains.len(),
            requested = %placement.requested.describe(),
            degraded,
            "placed"
        );
        Ok(placement)
    }

    pub(crate) fn candidates(&self) -> Result<Vec<placement::Candidate>, CoordinatorError> {
        let live: Vec<String> = self.live().workers.keys().cloned().collect();
        Ok(self
            .list_workers()?
            .into_iter()
            .map(|(w, p)| placement::Candidate {
                available: live.contains(&w.id)
                    && !p.revoked
                    && !self.worker_revoked(&w.id).unwrap_or(true),
                worker: w,
                provider: p,
                committed_bytes: 0,
            })
            .collect())
    }

    /// Per worker, the memory of the stages running jobs run on that `placements` no longer
    /// hold (replaced while the jobs ran: their workers keep those slices until the jobs end).
    /// A stage is one slice per (model, worker, layers, version it was loaded in): a stage that
    /// later placements kept is the same slice, one loaded again is another.
    fn held_beyond_placements(&self, placements: &[PlacementRecord]) -> HashMap<String, u64> {
        let in_jobs: Vec<(String, StageRecord)> = self
            .jobs()
            .live
            .values()
            .flat_map(|j| j.held.iter().map(|h| (j.record.model.clone(), h.clone())))
            .collect();
        let mut held: HashMap<String, u64> = HashMap::new();
        let mut counted = std::collections::HashSet::new();
        for (model, h) in &in_jobs {
            let current = placements
                .iter()
                .filter(|p| p.model == *model)
                .flat_map(|p| p.chains.iter().flatten())
                .any(|s| h.same_slice(s));
            let key = (model, &h.worker_id, h.range.start, h.range.end, h.loaded_in);
            if !current && counted.insert(key) {
                *held.entry(h.worker_id.clone()).or_default() += h.memory_bytes;
            }
        }
        held
    }

    /// Per worker, the memory the stages of `placements` (but those of model `except`) take,
    /// and those of replaced placements that running jobs still run on.
    fn memory_committed(
        &self,
        placements: &[PlacementRecord],
        except: Option<&str>,
    ) -> HashMap<String, u64> {
        let mut held = memory_held(
            placements
                .iter()
                .filter(|p| Some(p.model.as_str()) != except),
        );
        for (worker, bytes) in self.held_beyond_placements(placements) {
            *held.entry(worker).or_default() += bytes;
        }
        held
    }

    /// Per worker, the memory every stage held on it takes: the current placements' and
    /// those of replaced placements that running jobs still run on.
    pub fn memory_in_use(&self) -> Result<HashMap<String, u64>, CoordinatorError> {
        let placements = read_all::<PlacementRecord>(self.store(), PLACEMENTS)?;
        Ok(self.memory_committed(&placements, None))
    }

    /// Sends assignments of `new` and unassignments for workers only in `old`.
    fn dispatch(&self, model: &ModelRecord, old: &PlacementRecord, new: &PlacementRecord) {
        let orders = placement::orders(model, new);
        let live = self.live();
        for (worker, order) in &orders {
            if let Some(w) = live.workers.get(worker) {
                let _ = w.commands.send(AgentCommand::Assign(order.clone()));
            }
        }
        for stage in old.chains.iter().flatten() {
            if !orders.iter().any(|(w, _)| *w == stage.worker_id)
                && let Some(w) = live.workers.get(&stage.worker_id)
            {
                let _ = w.commands.send(AgentCommand::Unassign {
                    model: model.name.clone(),
                });
            }
        }
    }

    /// Every assignment a worker holds in current placements.
    pub(crate) fn orders_for(
        &self,
        worker_id: &str,
    ) -> Result<Vec<AssignmentOrder>, CoordinatorError> {
        let mut out = Vec::new();
        for p in read_all::<PlacementRecord>(self.store(), PLACEMENTS)? {
            // A placement whose model is gone orders nothing (and must not keep every worker
            // from connecting).
            let Some(model) = read::<ModelRecord>(self.store(), MODELS, &p.model)? else {
                warn!(model = %p.model, "a placement of a model that no longer exists");
                continue;
            };
            out.extend(
                placement::orders(&model, &p)
                    .into_iter()
                    .filter(|(w, _)| w == worker_id)
                    .map(|(_, o)| o),
            );
        }
        Ok(out)
    }
}

/// Key in the meta tree of the placement version a model name's next placement must pass.
fn floor_key(model: &str) -> String {
    format!("placement_floor/{model}")
}

/// Names providers and model policies recorded, before countries were checked against ISO
/// 3166-1, with a code that is not one: no job policy can name such a country.
fn warn_of_stale_countries(store: &dyn Store) -> Result<(), CoordinatorError> {
    for p in read_all::<ProviderRecord>(store, PROVIDERS)? {
        if clean_country(&p.country).is_err() {
            warn!(provider = %p.name, country = %p.country, "the provider's country is not an ISO 3166-1 code: no country policy can select it; add it again under its ISO code");
        }
    }
    for m in read_all::<ModelRecord>(store, MODELS)? {
        for c in m
            .policy
            .countries
            .iter()
            .filter(|c| clean_country(c).is_err())
        {
            warn!(model = %m.name, country = %c, "the model's policy names a country that is not an ISO 3166-1 code: no worker can be there");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_stored_without_a_load_version_get_their_placements() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let stage = |loaded_in| StageRecord {
            worker_id: "w".into(),
            range: LayerRange::new(0, 30),
            memory_bytes: 1,
            time_s: 0.1,
            loaded_in,
        };
        let placement = |model: &str, version, loaded_in| PlacementRecord {
            model: model.into(),
            version,
            chains: vec![vec![stage(loaded_in)]],
            ..Default::default()
        };
        // As stored before the load version was recorded: the field is absent.
        let mut old = serde_json::to_value(placement("old", 7, 0)).unwrap();
        old["chains"][0][0]
            .as_object_mut()
            .unwrap()
            .remove("loaded_in");
        store
            .apply(
                Batch::new()
                    .put(PLACEMENTS, "old", serde_json::to_vec(&old).unwrap())
                    .put(PLACEMENTS, "new", encode(&placement("new", 9, 4))),
            )
            .unwrap();
        record_load_versions(&store).unwrap();
        let read = |model: &str| read::<PlacementRecord>(&store, PLACEMENTS, model).unwrap();
        assert_eq!(read("old"), Some(placement("old", 7, 7)));
        assert_eq!(read("new"), Some(placement("new", 9, 4)));
    }
}
