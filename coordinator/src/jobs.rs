//! Jobs: a tenant's prompt run on one ready chain of a model's placement. The coordinator
//! opens the session on every stage, starts the head, relays the tail's token events to the
//! client and records the job and its audit trail (which worker of which provider in which
//! country ran which layers). It is not on the per-token path between stages.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sovra_model::{ChatTurn, LayerRange, Sampler, SamplingParams, StopConditions};
use sovra_proto::token;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::error::CoordinatorError;
use crate::federation::{AgentCommand, AssignmentState, Caller, Federation};
use crate::records::*;
use crate::store::Batch;

/// Tree of job records, keyed by job id.
pub const JOBS: &str = "jobs";
/// Index of the job list, newest first: `all/` + key for the operator's list, `t/TENANT/` +
/// key for a tenant's, where key is (u64::MAX - creation ns) in 16 hex digits then the job
/// id; values are empty. A list page reads only its own jobs' records.
pub const JOB_ORDER: &str = "job_order";
/// Meta key set once the job-order index holds every job (records written before it existed
/// are indexed at the first start that has it).
const JOB_ORDER_BUILT: &str = "job_order_built";
/// How long every stage has to acknowledge a new session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest prompt text accepted, bytes.
const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Largest token budget accepted.
const MAX_TOKENS_LIMIT: usize = sovra_model::stream::MAX_TOKENS;

/// Most turns a conversation may hold.
const MAX_TURNS: usize = 4096;

/// Most text one token event may carry: a token's bytes plus the text held back while it could
/// still begin a stop string. A stage that sends more is not following the protocol.
const MAX_EVENT_TEXT: usize = 16 << 10;

/// Most text a job's record keeps (a million tokens of 64 bytes each).
const MAX_JOB_TEXT: usize = 64 << 20;

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Model name.
    pub model: String,
    /// Prompt text.
    pub prompt: String,
    /// Chat template.
    pub chat: bool,
    /// System turn.
    pub system: Option<String>,
    /// A conversation in the chat layout, instead of the prompt and system turn.
    pub turns: Vec<ChatTurn>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stopping.
    pub stop: StopConditions,
    /// Narrows the model's policy.
    pub policy: PolicyRecord,
}

/// Where one stage of a job ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditStage {
    /// Worker id.
    pub worker_id: String,
    /// Provider.
    pub provider: String,
    /// Country.
    pub country: String,
    /// Layers.
    pub range: LayerRange,
    /// Which chain of the job this is: 1 for the first, one more for each move to another
    /// (0 in records written before it was kept: unknown).
    #[serde(default)]
    pub attempt: u32,
    /// Tokens the job had generated when this chain took it over (with `attempt` 0: unknown).
    #[serde(default)]
    pub from_token: usize,
}

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Generating.
    Running,
    /// Finished normally.
    Done,
    /// Ended with an error.
    Failed,
    /// Cancelled by its tenant or the operator.
    Cancelled,
}

impl JobState {
    /// Name shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job's durable record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// Tenant name, or "operator".
    pub tenant: String,
    /// Model name.
    pub model: String,
    /// State.
    pub state: JobState,
    /// Effective policy.
    pub policy: PolicyRecord,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt token ids (for replay).
    pub prompt_ids: Vec<u32>,
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// eos, length or stop.
    pub finish_reason: Option<String>,
    /// Error of a failed job.
    pub error: Option<String>,
    /// Where each layer ran.
    pub audit: Vec<AuditStage>,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
    /// Creation time, Unix nanoseconds (0 in records written before it existed): orders the
    /// job list.
    #[serde(default)]
    pub created_ns: u64,
    /// End time, Unix seconds.
    pub finished_unix: u64,
    /// When its progress was last written while it ran, Unix seconds (0: never).
    #[serde(default)]
    pub progress_unix: u64,
}

impl JobRecord {
    /// The job's key in the job-order index under `prefix` (`all/` or `t/TENANT/`).
    fn order_key(&self, prefix: &str) -> String {
        let ns = if self.created_ns > 0 {
            self.created_ns
        } else {
            self.created_unix.saturating_mul(1_000_000_000)
        };
        format!("{prefix}{:016x}{}", u64::MAX - ns, self.id)
    }

    /// Adds the job's entries in the job-order index to `batch` (written with the job's first
    /// record; they never change).
    pub fn index(&self, batch: Batch) -> Batch {
        batch
            .put(JOB_ORDER, self.order_key(ALL_JOBS), Vec::new())
            .put(
                JOB_ORDER,
                self.order_key(&tenant_jobs(&self.tenant)),
                Vec::new(),
            )
    }
}

/// Prefix of the operator's list in the job-order index.
const ALL_JOBS: &str = "all/";

/// Prefix of a tenant's list in the job-order index.
fn tenant_jobs(tenant: &str) -> String {
    format!("t/{tenant}/")
}

/// Jobs in a list page when the client names no number.
pub const DEFAULT_LIST_LIMIT: usize = 50;
/// Most jobs in a list page.
pub const MAX_LIST_LIMIT: usize = 1000;

/// One page of the job list.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<JobRecord>,
    /// Older jobs follow the last one.
    pub more: bool,
}

/// Events streamed to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The job runs on these stages.
    Started {
        /// Job id.
        job_id: String,
        /// Its stages.
        stages: Vec<AuditStage>,
    },
    /// A generated token.
    Token {
        /// Index.
        index: u32,
        /// Id.
        token_id: u32,
        /// Text.
        text: String,
    },
    /// The job ended normally.
    Summary(JobSummary),
    /// The job ended with an error.
    Failed(String),
    /// The job was cancelled (by its tenant, the operator, or a revocation): why.
    Cancelled(String),
}

/// Statistics of a finished job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSummary {
    /// Job id.
    pub job_id: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// eos, length or stop.
    pub finish_reason: String,
    /// Time to first token, ms.
    pub ttft_ms: f64,
    /// Prompt tokens per second.
    pub prompt_tok_s: f64,
    /// Decode tokens per second.
    pub decode_tok_s: f64,
}

/// Orders to prepare one stage of a session (sent over the agent stream).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOpen {
    /// Session id.
    pub session: u64,
    /// Model.
    pub model: String,
    /// Placement version.
    pub version: u64,
    /// Stage index.
    pub stage: usize,
    /// Number of stages.
    pub stages: usize,
    /// (worker id, address) of the previous stage.
    pub prev: Option<(String, String)>,
    /// Of the next stage.
    pub next: Option<(String, String)>,
    /// Of the head.
    pub head: (String, String),
    /// Of the tail.
    pub tail: (String, String),
    /// Prompt text.
    pub prompt: String,
    /// Chat template.
    pub chat: bool,
    /// System turn.
    pub system: Option<String>,
    /// Prompt ids replacing the text (replays).
    pub prompt_ids: Vec<u32>,
    /// A conversation replacing the text (head).
    pub turns: Vec<ChatTurn>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stopping.
    pub stop: StopConditions,
    /// Tokens already generated elsewhere, replayed into the tail's text state (tail).
    pub replay_generated: Vec<u32>,
    /// The original prompt's length when replaying (tail).
    pub prompt_tokens: usize,
}

/// A running job's live state.
pub(crate) struct LiveJob {
    pub(crate) record: JobRecord,
    pub(crate) stages: Vec<String>,
    /// The stages it runs on, as its placement recorded them (their memory stays held until
    /// it ends, whatever placement comes after).
    pub(crate) held: Vec<StageRecord>,
    pub(crate) events: mpsc::Sender<JobEvent>,
    pub(crate) started: Option<Instant>,
    pub(crate) first_token: Option<Instant>,
    pub(crate) last_token: Option<Instant>,
    pub(crate) spec: JobSpec,
    pub(crate) attempts: u32,
    /// Last sign of progress (launch or token), for the stall watchdog.
    pub(crate) progress: Instant,
    /// When its record was last written with the tokens so far.
    pub(crate) persisted: Instant,
}

/// How often a running job's tokens so far are written to its record, so a coordinator crash
/// loses at most this much of what its client already received.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The audit lines of `chain` as the job's `attempt`-th chain, taking over after `from_token`
/// generated tokens.
fn audit_of(chain: &ChainStages, attempt: u32, from_token: usize) -> Vec<AuditStage> {
    chain
        .iter()
        .map(|(w, p, r)| AuditStage {
            worker_id: w.id.clone(),
            provider: p.name.clone(),
            country: p.country.clone(),
            range: *r,
            attempt,
            from_token,
        })
        .collect()
}

/// A stage's answer to an opening: the prompt ids (head) or the refusal, and whether the
/// request itself is at fault.
type OpenReply = oneshot::Sender<Result<Vec<u32>, (String, bool)>>;

/// Why a job could not be started on a chain: the session it was registered under (to end it
/// through `finish_job`), why, and whether the request itself is at fault (no chain would run
/// it).
pub(crate) struct LaunchFailed {
    pub(crate) session: u64,
    pub(crate) error: String,
    pub(crate) bad_request: bool,
}

impl From<(u64, String)> for LaunchFailed {
    fn from((session, error): (u64, String)) -> Self {
        Self {
            session,
            error,
            bad_request: false,
        }
    }
}
/// The stages of a chain a job runs on.
pub(crate) type ChainStages = Vec<(WorkerRecord, ProviderRecord, LayerRange)>;

/// Live jobs and pending session openings.
#[derive(Default)]
pub(crate) struct JobTable {
    pub(crate) live: HashMap<u64, LiveJob>,
    pub(crate) by_id: HashMap<String, u64>,
    pub(crate) opens: HashMap<(u64, String), OpenReply>,
    /// Per tenant, the ids of its jobs between their admission and their start (or refusal):
    /// they count against its limit before they are in `live`.
    pub(crate) starting: HashMap<String, HashSet<String>>,
}

/// A tenant's job counted against its limit while it starts; uncounted when dropped (by then
/// it is in the job table, or it never started).
struct StartingJob<'a> {
    fed: &'a Federation,
    tenant: String,
    job_id: String,
}

impl Drop for StartingJob<'_> {
    fn drop(&mut self) {
        let mut jobs = self.fed.jobs();
        if let Some(ids) = jobs.starting.get_mut(&self.tenant) {
            ids.remove(&self.job_id);
            if ids.is_empty() {
                jobs.starting.remove(&self.tenant);
            }
        }
    }
}

/// Narrows a model's policy with a job's: countries intersect, requirements and exclusions add up.
pub fn narrow_policy(
    model: &PolicyRecord,
    job: &PolicyRecord,
) -> Result<PolicyRecord, CoordinatorError> {
    let countries = match (model.countries.is_empty(), job.countries.is_empty()) {
        (true, _) => job.countries.clone(),
        (false, true) => model.countries.clone(),
        (false, false) => {
            let both: Vec<String> = job
                .countries
                .iter()
                .filter(|c| model.countries.contains(c))
                .cloned()
                .collect();
            if both.is_empty() {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "the job allows countries {} but the model only {}: no country is left",
                    job.countries.join(","),
                    model.countries.join(",")
                )));
            }
            both
        }
    };
    let union = |a: &[String], b: &[String]| {
        let mut out = a.to_vec();
        out.extend(b.iter().filter(|x| !a.contains(x)).cloned());
        out
    };
    Ok(PolicyRecord {
        countries,
        required_certifications: union(
            &model.required_certifications,
            &job.required_certifications,
        ),
        excluded_providers: union(&model.excluded_providers, &job.excluded_providers),
    })
}

/// Why `provider` may not run a job under `policy`, if it may not.
pub fn policy_violation(policy: &PolicyRecord, provider: &ProviderRecord) -> Option<String> {
    if !policy.countries.is_empty() && !policy.countries.contains(&provider.country) {
        return Some(format!(
            "{} is in {}, outside {}",
            provider.name,
            provider.country,
            policy.countries.join(",")
        ));
    }
    if let Some(c) = policy
        .required_certifications
        .iter()
        .find(|c| !provider.certifications.contains(c))
    {
        return Some(format!("{} lacks certification {c}", provider.name));
    }
    if policy.excluded_providers.contains(&provider.name) {
        return Some(format!("{} is excluded", provider.name));
    }
    None
}

impl Federation {
    pub(crate) fn jobs(&self) -> std::sync::MutexGuard<'_, JobTable> {
        self.job_table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a job and returns its id and its event stream.
    pub async fn run_job(
        &self,
        caller: &Caller,
        spec: JobSpec,
    ) -> Result<(String, mpsc::Receiver<JobEvent>), CoordinatorError> {
        validate_spec(&spec)?;
        let model = self.model(&spec.model)?;
        let policy = narrow_policy(&model.policy, &crate::validate::clean_policy(&spec.policy)?)?;
        let job_id = format!("job-{}", token::random_hex(8));
        let _counted = match caller {
            Caller::Tenant(t) => Some(self.count_against_limit(t, &job_id)?),
            Caller::Operator => None,
        };
        // Until the job is in the job table on its chain (see `placement_gates`).
        let gate = self.placement_gate(&model.name);
        let _starting = gate.read().await;
        let (chain, placement) = self.ready_chain(&model.name, &policy).await?;
        let record = JobRecord {
            id: job_id.clone(),
            tenant: caller.name().to_string(),
            model: model.name.clone(),
            state: JobState::Running,
            policy,
            prompt_tokens: 0,
            prompt_ids: vec![],
            token_ids: vec![],
            text: String::new(),
            finish_reason: None,
            error: None,
            audit: vec![],
            created_unix: now_unix(),
            created_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            finished_unix: 0,
            progress_unix: 0,
        };
        self.store()
            .apply(record.index(Batch::new().put(JOBS, &job_id, encode(&record))))?;
        // Durable before the job starts: a coordinator crash must not forget it.
        self.store().flush()?;
        let (tx, rx) = mpsc::channel(4096);
        let _ = tx
            .send(JobEvent::Started {
                job_id: job_id.clone(),
                stages: audit_of(&chain, 1, 0),
            })
            .await;
        let job = LiveJob {
            record,
            stages: vec![],
            held: vec![],
            events: tx,
            started: None,
            first_token: None,
            last_token: None,
            spec,
            attempts: 0,
            progress: Instant::now(),
            persisted: Instant::now(),
        };
        if let Err(failed) = self.launch(job, chain, &placement).await {
            self.finish_job(
                failed.session,
                JobState::Failed,
                None,
                Some(failed.error.clone()),
            );
            // A prompt no stage would take is the request's fault: said as such (its record
            // shows it failed, with why).
            if failed.bad_request {
                return Err(CoordinatorError::InvalidArgument(failed.error));
            }
        }
        Ok((job_id, rx))
    }

    /// Counts job `job_id` of tenant `tenant` against its limit of jobs at once, or refuses it
    /// when the tenant runs (or starts) that many already.
    fn count_against_limit(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<StartingJob<'_>, CoordinatorError> {
        let limit = self.job_limit_of(&self.tenant(tenant)?) as usize;
        let mut jobs = self.jobs();
        // A job that has just entered the table is still starting: counted once.
        let mut ids: HashSet<&str> = jobs
            .live
            .values()
            .filter(|j| j.record.tenant == tenant)
            .map(|j| j.record.id.as_str())
            .collect();
        ids.extend(
            jobs.starting
                .get(tenant)
                .into_iter()
                .flatten()
                .map(String::as_str),
        );
        if ids.len() >= limit {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "tenant `{tenant}` runs {} jobs already, its limit at once is {limit}: wait for one to end (the operator sets the limit with `sovra tenant limit`)",
                ids.len()
            )));
        }
        jobs.starting
            .entry(tenant.to_string())
            .or_default()
            .insert(job_id.to_string());
        Ok(StartingJob {
            fed: self,
            tenant: tenant.to_string(),
            job_id: job_id.to_string(),
        })
    }

    /// A ready chain of `model` within `policy`, and the placement version it belongs to. When
    /// every chain names a worker that is down (no job was running to notice), the model is
    /// replanned over the live workers first, as for a job in flight; a chain that is still
    /// loading (so replanned, or just placed) is awaited.
    async fn ready_chain(
        &self,
        model: &str,
        policy: &PolicyRecord,
    ) -> Result<(ChainStages, PlacementRecord), CoordinatorError> {
        let mut placement = self.placement(model)?;
        // Just after the coordinator started, its workers are still reconnecting: a stage
        // that is not connected yet is awaited (see `reconnect_grace`), not replanned around.
        let reconnecting = self.opened_at + self.reconnect_grace();
        while Instant::now() < reconnecting
            && self.pick_chain(&placement, policy).is_err()
            && placement
                .chains
                .iter()
                .flatten()
                .any(|s| !self.is_live(&s.worker_id))
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            placement = self.placement(model)?;
        }
        let refused = match self.pick_chain(&placement, policy) {
            Ok(chain) => return Ok((chain, placement)),
            Err(e) => e,
        };
        let broken = |p: &PlacementRecord| {
            !p.chains.is_empty()
                && p.chains
                    .iter()
                    .all(|c| c.iter().any(|s| !self.is_live(&s.worker_id)))
        };
        // A chain of live workers whose slices are still loading: it may yet serve the job.
        let loading = |p: &PlacementRecord| {
            p.chains.iter().any(|c| {
                c.iter().all(|s| self.is_live(&s.worker_id))
                    && c.iter().any(|s| {
                        !matches!(
                            self.stage_state(model, &s.worker_id, p.version),
                            Some((AssignmentState::Ready | AssignmentState::Failed, _))
                        )
                    })
            })
        };
        if broken(&placement) {
            self.replan_around_failures(model).await.map_err(|e| {
                CoordinatorError::FailedPrecondition(format!(
                    "{refused}; replanning over the live workers failed: {e}"
                ))
            })?;
        } else if !loading(&placement) {
            return Err(refused);
        }
        let deadline = Instant::now() + crate::recovery::RECOVERY_TIMEOUT;
        loop {
            let placement = self.placement(model)?;
            match self.pick_chain(&placement, policy) {
                Ok(chain) => return Ok((chain, placement)),
                // Nothing more is coming (loaded, failed or down), or it takes too long.
                Err(e) if !loading(&placement) || Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// Opens `job` on `chain` and starts it, replaying its history (prompt and tokens so far)
    /// when it already ran elsewhere. On failure returns the session and the reason; the job
    /// is then registered under that session.
    pub(crate) async fn launch(
        &self,
        mut job: LiveJob,
        chain: ChainStages,
        placement: &PlacementRecord,
    ) -> Result<(), LaunchFailed> {
        let session = new_session_id();
        let worker_ids: Vec<String> = chain.iter().map(|(w, _, _)| w.id.clone()).collect();
        job.stages = worker_ids.clone();
        let context = self
            .model(&job.record.model)
            .map_or(usize::MAX, |m| m.spec.context_length);
        // The stages of the placement the chain was picked from (the one stored may be newer).
        job.held = chain
            .iter()
            .filter_map(|(w, _, r)| {
                placement
                    .chains
                    .iter()
                    .flatten()
                    .find(|s| s.worker_id == w.id && s.range == *r)
                    .cloned()
            })
            .collect();
        let attempt = job
            .record
            .audit
            .iter()
            .map(|a| a.attempt)
            .max()
            .unwrap_or(0)
            + 1;
        let from_token = job.record.token_ids.len();
        let stages = audit_of(&chain, attempt, from_token);
        job.record.audit.extend(stages.iter().cloned());
        let replay = !job.record.prompt_ids.is_empty();
        let mut opens = self.session_orders(
            session,
            &job.record.model,
            placement.version,
            &chain,
            &job.spec,
        );
        if replay {
            let history: Vec<u32> = job
                .record
                .prompt_ids
                .iter()
                .chain(&job.record.token_ids)
                .copied()
                .collect();
            opens[0].prompt_ids = history;
            opens[0].prompt_tokens = job.record.prompt_ids.len();
            let tail = opens.len() - 1;
            opens[tail].replay_generated = job.record.token_ids.clone();
            opens[tail].prompt_tokens = job.record.prompt_ids.len();
        }
        let job_id = job.record.id.clone();
        job.progress = Instant::now();
        {
            let mut jobs = self.jobs();
            // Checked under the table's lock, which `remove_model` holds while it looks for
            // running jobs and removes the model: the job either shows there or sees it gone.
            let model = job.record.model.clone();
            let tenant = job.record.tenant.clone();
            jobs.by_id.insert(job_id.clone(), session);
            jobs.live.insert(session, job);
            if self.model(&model).is_err() {
                return Err((session, format!("model `{model}` was removed")).into());
            }
            // Likewise for `revoke_tenant`, which writes the revocation before it looks for
            // the tenant's jobs.
            if self.tenant_revoked(&tenant) {
                return Err((session, format!("tenant `{tenant}` was revoked")).into());
            }
        }
        let prompt_ids = self
            .open_everywhere(session, &worker_ids, opens)
            .await
            .map_err(|(error, bad_request)| LaunchFailed {
                session,
                error,
                bad_request,
            })?;
        if prompt_ids.len() > context {
            return Err((
                session,
                format!(
                    "the head stage {} answered with {} prompt tokens, more than the model's context of {context}",
                    worker_ids[0],
                    prompt_ids.len()
                ),
            )
                .into());
        }
        {
            let mut jobs = self.jobs();
            let Some(job) = jobs.live.get_mut(&session) else {
                return Err((session, "the job ended while it was being opened".into()).into());
            };
            if !replay {
                job.record.prompt_tokens = prompt_ids.len();
                job.record.prompt_ids = prompt_ids;
            }
            job.started.get_or_insert_with(Instant::now);
            if replay {
                // The client hears where its job went.
                let _ = job.events.try_send(JobEvent::Started {
                    job_id: job_id.clone(),
                    stages,
                });
            }
            // Where the job runs is on disk before it runs there (a coordinator that crashes
            // meanwhile leaves the job failed, with its audit). Written under the table's
            // lock, so the final record of a job that ends now cannot come first.
            self.store()
                .apply(Batch::new().put(JOBS, &job_id, encode(&job.record)))
                .map_err(|e| LaunchFailed::from((session, format!("recording the job: {e}"))))?;
        }
        self.store()
            .flush()
            .map_err(|e| LaunchFailed::from((session, format!("recording the job: {e}"))))?;
        self.send_to(&worker_ids[0], AgentCommand::StartSession(session));
        info!(job = %job_id, session, stages = worker_ids.len(), replay, "job running");
        Ok(())
    }

    fn session_orders(
        &self,
        session: u64,
        model: &str,
        version: u64,
        stages: &ChainStages,
        spec: &JobSpec,
    ) -> Vec<SessionOpen> {
        let peer = |i: usize| (stages[i].0.id.clone(), stages[i].0.advertise_addr.clone());
        let n = stages.len();
        (0..n)
            .map(|i| SessionOpen {
                session,
                model: model.to_string(),
                version,
                stage: i,
                stages: n,
                prev: (i > 0).then(|| peer(i - 1)),
                next: (i + 1 < n).then(|| peer(i + 1)),
                head: peer(0),
                tail: peer(n - 1),
                prompt: if i == 0 {
                    spec.prompt.clone()
                } else {
                    String::new()
                },
                chat: spec.chat,
                system: spec.system.clone(),
                prompt_ids: vec![],
                turns: if i == 0 {
                    spec.turns.clone()
                } else {
                    Vec::new()
                },
                sampling: spec.sampling,
                stop: spec.stop.clone(),
                replay_generated: vec![],
                prompt_tokens: 0,
            })
            .collect()
    }

    /// Sends the openings and waits for every stage's answer; returns the head's prompt ids.
    async fn open_everywhere(
        &self,
        session: u64,
        workers: &[String],
        opens: Vec<SessionOpen>,
    ) -> Result<Vec<u32>, (String, bool)> {
        let result = self.open_all(session, workers, opens).await;
        if result.is_err() {
            self.jobs().opens.retain(|(s, _), _| *s != session);
        }
        result
    }

    async fn open_all(
        &self,
        session: u64,
        workers: &[String],
        opens: Vec<SessionOpen>,
    ) -> Result<Vec<u32>, (String, bool)> {
        let mut answers = Vec::new();
        for (worker, open) in workers.iter().zip(opens) {
            let (tx, rx) = oneshot::channel();
            self.jobs().opens.insert((session, worker.clone()), tx);
            if !self.send_to(worker, AgentCommand::OpenSession(Box::new(open))) {
                return Err((format!("worker {worker} is not connected"), false));
            }
            answers.push((worker.clone(), rx));
        }
        let mut prompt = Vec::new();
        for (i, (worker, rx)) in answers.into_iter().enumerate() {
            let answer = tokio::time::timeout(OPEN_TIMEOUT, rx).await;
            self.jobs().opens.remove(&(session, worker.clone()));
            match answer {
                Ok(Ok(Ok(ids))) if i == 0 => prompt = ids,
                Ok(Ok(Ok(_))) => {}
                // Only the head looks at the prompt: the request is at fault only if it says so.
                Ok(Ok(Err((e, bad_request)))) => return Err((e, bad_request && i == 0)),
                Ok(Err(_)) => {
                    let why = format!("worker {worker} went away while opening the session");
                    return Err((why, false));
                }
                Err(_) => {
                    let why =
                        format!("worker {worker} did not open the session within {OPEN_TIMEOUT:?}");
                    return Err((why, false));
                }
            }
        }
        Ok(prompt)
    }

    /// A stage's answer to an opening.
    pub fn session_opened(
        &self,
        worker: &str,
        session: u64,
        result: Result<Vec<u32>, (String, bool)>,
    ) {
        if let Some(tx) = self.jobs().opens.remove(&(session, worker.to_string())) {
            let _ = tx.send(result);
        }
    }

    /// Chooses the least busy ready chain whose every stage obeys `policy`.
    pub(crate) fn pick_chain(
        &self,
        placement: &PlacementRecord,
        policy: &PolicyRecord,
    ) -> Result<ChainStages, CoordinatorError> {
        if placement.chains.is_empty() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "model `{}` is not placed: {}",
                placement.model,
                placement
                    .unplaced_reason
                    .clone()
                    .unwrap_or_else(|| "no placement yet".into())
            )));
        }
        let workers: HashMap<String, (WorkerRecord, ProviderRecord)> = self
            .list_workers()?
            .into_iter()
            .map(|(w, p)| (w.id.clone(), (w, p)))
            .collect();
        let busy: HashMap<String, usize> = {
            let jobs = self.jobs();
            let mut count = HashMap::new();
            for job in jobs.live.values() {
                for w in &job.stages {
                    *count.entry(w.clone()).or_insert(0) += 1;
                }
            }
            count
        };
        let mut reasons = Vec::new();
        let mut best: Option<(usize, ChainStages)> = None;
        for (index, chain) in placement.chains.iter().enumerate() {
            let mut stages = Vec::new();
            let mut why = None;
            for stage in chain {
                let Some((w, p)) = workers.get(&stage.worker_id) else {
                    why = Some(format!("worker {} is unknown", stage.worker_id));
                    break;
                };
                if let Some(v) = policy_violation(policy, p) {
                    why = Some(v);
                    break;
                }
                let state = self.stage_state(&placement.model, &w.id, placement.version);
                if !self.is_live(&w.id) {
                    why = Some(format!("worker {} is down", w.id));
                    break;
                }
                match state {
                    Some((AssignmentState::Ready, _)) => {}
                    Some((AssignmentState::Failed, message)) => {
                        why = Some(format!(
                            "worker {} could not load layers {}..{}: {message}",
                            w.id, stage.range.start, stage.range.end
                        ));
                        break;
                    }
                    _ => {
                        why = Some(format!(
                            "worker {} is still loading layers {}..{}",
                            w.id, stage.range.start, stage.range.end
                        ));
                        break;
                    }
                }
                stages.push((w.clone(), p.clone(), stage.range));
            }
            match why {
                Some(reason) => reasons.push(format!("chain {index}: {reason}")),
                None => {
                    let load: usize = stages
                        .iter()
                        .map(|(w, _, _)| busy.get(&w.id).copied().unwrap_or(0))
                        .sum();
                    if best.as_ref().is_none_or(|(l, _)| load < *l) {
                        best = Some((load, stages));
                    }
                }
            }
        }
        best.map(|(_, s)| s).ok_or_else(|| {
            CoordinatorError::FailedPrecondition(format!(
                "no ready chain of `{}` can run this job: {}",
                placement.model,
                reasons.join("; ")
            ))
        })
    }

    /// A tail's token or end, or a stage's failure.
    /// A stage of the job's chain ran another chunk of its prompt: progress for the stall
    /// watchdog, though no token has come of it yet.
    pub fn session_progress(&self, worker: &str, session: u64) {
        let mut jobs = self.jobs();
        if let Some(job) = jobs.live.get_mut(&session)
            && job.stages.iter().any(|s| s == worker)
        {
            job.progress = Instant::now();
        }
    }

    pub fn session_event(
        &self,
        worker: &str,
        session: u64,
        token: Option<(u32, u32, String)>,
        finish: Option<String>,
        error: Option<String>,
    ) {
        // How the job ends, when this event ends it otherwise than by finishing.
        let mut failed: Option<(JobState, String)> = None;
        let mut finished = None;
        {
            let mut jobs = self.jobs();
            let Some(job) = jobs.live.get_mut(&session) else {
                return;
            };
            if !job.stages.iter().any(|s| s == worker) {
                return;
            }
            if let Some(e) = error {
                // Running, to be moved to another chain.
                failed = Some((JobState::Running, format!("stage {worker} failed: {e}")));
            } else if job.stages.last().map(String::as_str) == Some(worker) {
                if finish.is_some() {
                    // The first sampling may end the job without a token to show (a stop
                    // string): the prompt took until now all the same.
                    job.first_token.get_or_insert_with(Instant::now);
                }
                if let Some((index, token_id, text)) = token {
                    // A tail that breaks the protocol fails the job: its tokens so far are
                    // in doubt.
                    if job.record.token_ids.len() >= job.spec.stop.max_tokens {
                        failed = Some((
                            JobState::Failed,
                            format!(
                                "stage {worker} sent more than the {} tokens asked for",
                                job.spec.stop.max_tokens
                            ),
                        ));
                    } else if text.len() > MAX_EVENT_TEXT
                        || job.record.text.len() + text.len() > MAX_JOB_TEXT
                    {
                        failed = Some((
                            JobState::Failed,
                            format!(
                                "stage {worker} sent {} bytes of text for one token (at most {MAX_EVENT_TEXT}, and {MAX_JOB_TEXT} for a job)",
                                text.len()
                            ),
                        ));
                    } else {
                        let now = Instant::now();
                        job.progress = now;
                        job.first_token.get_or_insert(now);
                        job.last_token = Some(now);
                        job.record.token_ids.push(token_id);
                        job.record.text.push_str(&text);
                        if now.duration_since(job.persisted) >= PERSIST_EVERY {
                            job.persisted = now;
                            job.record.progress_unix = now_unix();
                            // Durable within the store's background flush (half a second).
                            if let Err(e) = self.store().apply(Batch::new().put(
                                JOBS,
                                &job.record.id,
                                encode(&job.record),
                            )) {
                                warn!(job = %job.record.id, cause = %e, "recording the job's progress");
                            }
                        }
                        match job.events.try_send(JobEvent::Token {
                            index,
                            token_id,
                            text,
                        }) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                failed = Some((JobState::Cancelled, "the client went away".into()));
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                failed = Some((
                                    JobState::Failed,
                                    "the client did not read its stream in time".into(),
                                ));
                            }
                        }
                    }
                }
                finished = finish;
            }
        }
        if let Some((state, e)) = failed {
            if state == JobState::Running {
                let _ = self.recoveries.send((session, e));
            } else {
                self.finish_job(session, state, None, Some(e));
            }
        } else if let Some(reason) = finished {
            self.finish_job(session, JobState::Done, Some(reason), None);
        }
    }

    /// Ends a job: closes its session on every stage, records it, and tells the client.
    pub(crate) fn finish_job(
        &self,
        session: u64,
        state: JobState,
        finish: Option<String>,
        error: Option<String>,
    ) {
        let Some(mut job) = ({
            let mut jobs = self.jobs();
            let job = jobs.live.remove(&session);
            if let Some(j) = &job {
                jobs.by_id.remove(&j.record.id);
            }
            job
        }) else {
            return;
        };
        for worker in &job.stages {
            self.send_to(worker, AgentCommand::CloseSession(session));
        }
        job.record.state = state;
        job.record.finish_reason = finish.clone();
        job.record.error = error.clone();
        job.record.finished_unix = now_unix();
        let recorded = self
            .store()
            .apply(Batch::new().put(JOBS, &job.record.id, encode(&job.record)))
            .and_then(|()| self.store().flush());
        if let Err(e) = recorded {
            warn!(cause = %e, job = %job.record.id, "recording the job");
        }
        let event = match (state, finish) {
            (JobState::Done, Some(reason)) => JobEvent::Summary(summary(&job, reason)),
            (JobState::Cancelled, _) => {
                JobEvent::Cancelled(error.unwrap_or_else(|| "cancelled".into()))
            }
            _ => JobEvent::Failed(error.unwrap_or_else(|| state.as_str().to_string())),
        };
        // The last event waits for room (a slow client), within bounds.
        let events = job.events.clone();
        tokio::spawn(async move {
            let _ = events.send_timeout(event, Duration::from_secs(30)).await;
        });
        info!(job = %job.record.id, state = state.as_str(), tokens = job.record.token_ids.len(), "job ended");
    }

    /// Up to `limit` (0: [`DEFAULT_LIST_LIMIT`]) of the jobs `caller` may see, newest first,
    /// older than the job `before` when one is named (the last of the previous page).
    pub fn list_jobs(
        &self,
        caller: &Caller,
        limit: usize,
        before: Option<&str>,
    ) -> Result<JobPage, CoordinatorError> {
        let limit = match limit {
            0 => DEFAULT_LIST_LIMIT,
            n if n > MAX_LIST_LIMIT => {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "a job list page holds at most {MAX_LIST_LIMIT} jobs, not {n}"
                )));
            }
            n => n,
        };
        let prefix = match caller {
            Caller::Operator => ALL_JOBS.to_string(),
            Caller::Tenant(t) => tenant_jobs(t),
        };
        let keys: Vec<Vec<u8>> = self
            .store()
            .scan(JOB_ORDER, prefix.as_bytes())?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let start = match before {
            None => 0,
            Some(id) => {
                let cursor: JobRecord = read(self.store(), JOBS, id)?
                    .filter(|j| visible(caller, j))
                    .ok_or_else(|| CoordinatorError::not_found("job", id))?;
                let key = cursor.order_key(&prefix);
                keys.partition_point(|k| k.as_slice() <= key.as_bytes())
            }
        };
        let more = keys.len() > start + limit;
        let mut jobs = Vec::new();
        for key in keys.iter().skip(start).take(limit) {
            // The id follows the prefix and the 16 hex digits of the time.
            let Some(id) = key.get(prefix.len() + 16..) else {
                continue;
            };
            let id = String::from_utf8_lossy(id);
            if let Some(job) = read::<JobRecord>(self.store(), JOBS, &id)? {
                jobs.push(self.live_view(job));
            }
        }
        Ok(JobPage { jobs, more })
    }

    /// One job, if `caller` may see it.
    pub fn get_job(&self, caller: &Caller, id: &str) -> Result<JobRecord, CoordinatorError> {
        let job: JobRecord =
            read(self.store(), JOBS, id)?.ok_or_else(|| CoordinatorError::not_found("job", id))?;
        if !visible(caller, &job) {
            return Err(CoordinatorError::not_found("job", id));
        }
        Ok(self.live_view(job))
    }

    fn live_view(&self, job: JobRecord) -> JobRecord {
        let jobs = self.jobs();
        match jobs.by_id.get(&job.id).and_then(|s| jobs.live.get(s)) {
            Some(live) => live.record.clone(),
            None => job,
        }
    }

    /// Cancels a running job.
    pub fn cancel_job(&self, caller: &Caller, id: &str) -> Result<JobRecord, CoordinatorError> {
        let job = self.get_job(caller, id)?;
        if job.state != JobState::Running {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} is already {}",
                job.state.as_str()
            )));
        }
        let session = self.jobs().by_id.get(id).copied();
        if let Some(session) = session {
            let by = match caller {
                Caller::Operator => "cancelled by the operator".to_string(),
                Caller::Tenant(t) => format!("cancelled by tenant {t}"),
            };
            self.finish_job(session, JobState::Cancelled, None, Some(by));
        }
        self.get_job(caller, id)
    }
}

/// Marks the jobs a previous coordinator process left running as failed: their clients lost
/// their streams with it, and their sessions are gone. At the first start with the job-order
/// index, indexes every job.
pub fn abandon_running_jobs(store: &dyn crate::store::Store) -> Result<(), CoordinatorError> {
    let mut batch = Batch::new();
    let indexed = read::<bool>(store, META, JOB_ORDER_BUILT)?.unwrap_or(false);
    if !indexed {
        batch = batch.put(META, JOB_ORDER_BUILT, encode(&true));
    }
    for mut job in read_all::<JobRecord>(store, JOBS)? {
        if !indexed {
            batch = job.index(batch);
        }
        if job.state == JobState::Running {
            job.state = JobState::Failed;
            job.error =
                Some("the coordinator restarted while the job ran; its stream was cut".into());
            // It ended when that coordinator did: about when its progress was last written
            // (within a second), not now.
            job.finished_unix = job.progress_unix.max(job.created_unix);
            warn!(job = %job.id, "job abandoned by a coordinator restart");
            batch = batch.put(JOBS, &job.id, encode(&job));
        }
    }
    Ok(store.apply(batch)?)
}

/// A fresh random session id.
pub(crate) fn new_session_id() -> u64 {
    u64::from_str_radix(&token::random_hex(8), 16).unwrap_or(1)
}

fn visible(caller: &Caller, job: &JobRecord) -> bool {
    match caller {
        Caller::Operator => true,
        Caller::Tenant(t) => &job.tenant == t,
    }
}

fn summary(job: &LiveJob, reason: String) -> JobSummary {
    let start = job.started.unwrap_or_else(Instant::now);
    let first = job.first_token.unwrap_or(start);
    let last = job.last_token.unwrap_or(first);
    let ttft = (first - start).as_secs_f64();
    let n = job.record.token_ids.len();
    JobSummary {
        job_id: job.record.id.clone(),
        prompt_tokens: job.record.prompt_tokens,
        generated_tokens: n,
        finish_reason: reason,
        ttft_ms: ttft * 1e3,
        // Not measured when the job ended before its first sampling (cancelled, failed).
        prompt_tok_s: if job.first_token.is_some() && ttft > 0.0 {
            job.record.prompt_tokens as f64 / ttft
        } else {
            0.0
        },
        decode_tok_s: if n > 1 {
            (n - 1) as f64 / (last - first).as_secs_f64().max(1e-9)
        } else {
            0.0
        },
    }
}

fn validate_spec(spec: &JobSpec) -> Result<(), CoordinatorError> {
    let bad = |m: String| Err(CoordinatorError::InvalidArgument(m));
    if spec.prompt.trim().is_empty() && spec.turns.is_empty() {
        return bad("the prompt is empty".into());
    }
    if spec.turns.len() > MAX_TURNS {
        return bad(format!(
            "{} turns given; at most {MAX_TURNS}",
            spec.turns.len()
        ));
    }
    if let Some(t) = spec
        .turns
        .iter()
        .find(|t| !matches!(t.role.as_str(), "system" | "user" | "assistant"))
    {
        return bad(format!(
            "a turn of role `{}`: roles are system, user and assistant",
            crate::error::shown(&t.role, 40)
        ));
    }
    if spec.prompt.len() > MAX_PROMPT_BYTES {
        return bad(format!(
            "the prompt is {} bytes; at most {MAX_PROMPT_BYTES} are accepted",
            spec.prompt.len()
        ));
    }
    // The head tokenizes the system turn with the prompt, on the thread its stages run on.
    let together = spec.prompt.len()
        + spec.system.as_ref().map_or(0, String::len)
        + spec.turns.iter().map(|t| t.text.len()).sum::<usize>();
    if together > MAX_PROMPT_BYTES {
        return bad(format!(
            "the prompt and the system turn are {together} bytes together; at most {MAX_PROMPT_BYTES} are accepted"
        ));
    }
    if spec.stop.max_tokens == 0 || spec.stop.max_tokens > MAX_TOKENS_LIMIT {
        return bad(format!(
            "max tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {}",
            spec.stop.max_tokens
        ));
    }
    sovra_model::stream::check_stop_strings(&spec.stop.stop).or_else(bad)?;
    Sampler::new(spec.sampling).map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    Ok(())
}
