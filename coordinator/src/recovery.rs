//! Moving jobs off failed chains: when a stage dies (its stream drops, its lease expires, it
//! reports a failure) or a job stalls, the job goes to another ready chain within its policy —
//! replanning over the live workers when none is ready — and replays its history there.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::error::CoordinatorError;
use crate::federation::{AgentCommand, Federation};
use crate::jobs::{JobState, LiveJob, new_session_id};
use crate::placement::PlacementRequest;
use crate::records::{ModelRecord, PlacementRecord, StageRecord, layout_of, memory_held};

/// How many times one job may be moved to another chain.
const MAX_RECOVERIES: u32 = 5;
/// How long a job may wait for a replacement chain.
pub(crate) const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

impl Federation {
    /// Moves a job whose chain failed to another ready chain (replanning around the failed
    /// workers if none is ready), replaying its history there; ends it with a clear error when
    /// no capacity is left or the recovery takes too long. While it waits, the job stays
    /// registered (with no stages), so its tenant can still cancel it.
    pub async fn recover(self: std::sync::Arc<Self>, session: u64, reason: String) {
        let Some(mut job) = self.take_job(session) else {
            return;
        };
        for worker in &job.stages {
            self.send_to(worker, AgentCommand::CloseSession(session));
        }
        job.attempts += 1;
        warn!(job = %job.record.id, attempt = job.attempts, %reason, "recovering the job on another chain");
        let model = job.record.model.clone();
        let policy = job.record.policy.clone();
        let mut parked = self.park(job);
        let fail =
            |parked: u64, why: String| self.finish_job(parked, JobState::Failed, None, Some(why));
        if self
            .jobs()
            .live
            .get(&parked)
            .is_some_and(|j| j.attempts > MAX_RECOVERIES)
        {
            return fail(
                parked,
                format!("{reason}; gave up after {MAX_RECOVERIES} recoveries"),
            );
        }
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        let mut replanned = false;
        let gate = self.placement_gate(&model);
        loop {
            // Until the job is back in the job table on its new chain.
            let starting = gate.read().await;
            let placement = match self.placement(&model) {
                Ok(p) => p,
                Err(e) => return fail(parked, e.to_string()),
            };
            if let Ok(chain) = self.pick_chain(&placement, &policy) {
                // Gone from the table: it was cancelled (and finished) meanwhile.
                let Some(job) = self.take_job(parked) else {
                    return;
                };
                match self.launch(job, chain, &placement).await {
                    Ok(()) => return,
                    Err(crate::jobs::LaunchFailed {
                        session: new_session,
                        error,
                        ..
                    }) => {
                        let Some(mut again) = self.take_job(new_session) else {
                            return;
                        };
                        for w in &again.stages {
                            self.send_to(w, AgentCommand::CloseSession(new_session));
                        }
                        again.attempts += 1;
                        let exhausted = again.attempts > MAX_RECOVERIES;
                        parked = self.park(again);
                        if exhausted {
                            return fail(parked, error);
                        }
                        continue;
                    }
                }
            }
            drop(starting);
            if !replanned {
                replanned = true;
                if let Err(e) = self.replan_around_failures(&model).await {
                    return fail(
                        parked,
                        format!("{reason}, and no capacity is left to continue: {e}"),
                    );
                }
            }
            if Instant::now() > deadline {
                let why = format!(
                    "{reason}, and no replacement chain was ready within {RECOVERY_TIMEOUT:?}"
                );
                return fail(parked, why);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replans every model left without a chain of live workers (after a revocation), so
    /// `placement show` and the next job do not wait on revoked workers.
    pub async fn replan_after_revocation(self: std::sync::Arc<Self>) {
        let models = match self.list_models() {
            Ok(models) => models,
            Err(e) => return warn!(cause = %e, "listing models to replan"),
        };
        for model in models {
            if let Err(e) = self.replan_around_failures(&model.name).await {
                warn!(model = %model.name, cause = %e, "replanning after a revocation");
            }
        }
    }

    /// Replans `model` over the live workers unless a ready chain appeared meanwhile: as the
    /// placement was asked for if the live workers allow it, otherwise as the planner sees
    /// fit (the placement is then degraded, and placed as asked again once they allow it).
    pub(crate) async fn replan_around_failures(&self, model: &str) -> Result<(), CoordinatorError> {
        let _one_at_a_time = self.replan_lock.lock().await;
        let _placing = self.placing();
        let placement = self.placement(model)?;
        let all_live = placement
            .chains
            .iter()
            .any(|c| c.iter().all(|s| self.is_live(&s.worker_id)));
        if all_live && !placement.chains.is_empty() {
            return Ok(());
        }
        let record = self.model(model)?;
        let requested = placement.requested.clone();
        // A worker left out that may change the plan once it is back (an explicit chain
        // names its workers).
        let down = match requested {
            PlacementRequest::Explicit(_) => None,
            _ => self.a_worker_down(&record).map(|w| down_reason(&w)),
        };
        let as_asked = match requested {
            PlacementRequest::Auto => None,
            _ => Some(self.plan(&record, &requested)),
        };
        let not_as_asked = match as_asked {
            Some(Ok(chains)) => {
                return self
                    .write_placement(&record, chains, requested, down.is_some(), down)
                    .map(|_| ());
            }
            Some(Err(e)) => Some(e.to_string()),
            None => None,
        };
        let chains = self.plan(&record, &PlacementRequest::Auto)?;
        let mut around: Vec<String> = placement
            .chains
            .iter()
            .flatten()
            .filter(|s| !self.is_live(&s.worker_id))
            .map(|s| {
                let revoked = self.worker_revoked(&s.worker_id).unwrap_or(false);
                format!(
                    "{} ({})",
                    s.worker_id,
                    if revoked { "revoked" } else { "down" }
                )
            })
            .collect();
        around.sort();
        around.dedup();
        let why = (!around.is_empty())
            .then(|| format!("planned around worker {}", around.join(", worker ")))
            .or(down)
            .or(not_as_asked);
        // Not as asked unless asked for the planner's choice, made with every worker.
        let degraded = requested != PlacementRequest::Auto || why.is_some();
        self.write_placement(&record, chains, requested, degraded, why)
            .map(|_| ())
    }

    /// Places again, as they were asked for, the models whose placement was made around
    /// failed or revoked workers (or could not be made at all), once the available workers
    /// have changed and stayed the same for a lease, and no job of the model is starting:
    /// beside its running jobs if the plan fits beside the stages they run on, else once
    /// they end; a placement the planner would make the same is left as it is. Called from
    /// the coordinator's periodic tick.
    pub async fn replan_degraded(&self) {
        let now = std::time::Instant::now();
        if now < self.opened_at + self.reconnect_grace() {
            return; // its workers are still reconnecting: a plan now would leave them out
        }
        let Ok(_one_at_a_time) = self.replan_lock.try_lock() else {
            return; // a failure is being replanned around: next tick
        };
        let placements: Vec<PlacementRecord> = match crate::records::read_all::<PlacementRecord>(
            self.store(),
            crate::records::PLACEMENTS,
        ) {
            Ok(p) => p.into_iter().filter(|p| p.wants_replanning()).collect(),
            Err(e) => return warn!(cause = %e, "reading placements to replan"),
        };
        if placements.is_empty() {
            return;
        }
        let available: Vec<String> = match self.candidates() {
            Ok(c) => {
                let mut ids: Vec<String> = c
                    .into_iter()
                    .filter(|c| c.available)
                    .map(|c| c.worker.id)
                    .collect();
                ids.sort();
                ids
            }
            Err(e) => return warn!(cause = %e, "listing workers to replan"),
        };
        // Only once the available workers have stayed the same for a lease: a worker whose
        // connection flaps would otherwise have its models moved on and off it each time.
        {
            let mut seen = self.fleet_seen.lock().unwrap_or_else(|p| p.into_inner());
            match &*seen {
                Some((ids, since)) if *ids == available => {
                    if now.duration_since(*since) < self.config().lease {
                        return;
                    }
                }
                _ => {
                    *seen = Some((available, now));
                    return;
                }
            }
        }
        for placement in placements {
            // A stage on a worker that is down: the model's next job replans around it (a
            // plan now would move it onto fewer workers while none of its jobs needs it).
            if let Some(down) = placement
                .chains
                .iter()
                .flatten()
                .find(|s| !self.is_live(&s.worker_id))
            {
                let why = format!(
                    "worker {} holds a stage and is down: placed as asked once it is back, or around it when a job finds no ready chain",
                    down.worker_id
                );
                self.explain_not_as_asked(&placement, &why);
                continue;
            }
            let model = placement.model.clone();
            let gate = self.placement_gate(&model);
            let Ok(_no_job_starting) = gate.try_write() else {
                continue;
            };
            let (running, jobs) = {
                let jobs = self.jobs();
                let running = jobs.live.values().any(|j| j.record.model == model);
                // Which jobs run: the sum of their sessions' random 64-bit ids.
                let which = jobs.live.keys().fold(0u64, |sum, s| sum.wrapping_add(*s));
                (running, if running { which.max(1) } else { 0 })
            };
            let attempt = (placement.version, available.clone(), jobs);
            if self.replan_tries().get(&model) == Some(&attempt) {
                continue;
            }
            let _placing = self.placing();
            let Ok(record) = self.model(&model) else {
                continue; // removed meanwhile
            };
            // Replanned meanwhile (by the operator, say): next tick, from what it is now.
            if self.placement(&model).map(|p| p.version).ok() != Some(placement.version) {
                continue;
            }
            let requested = placement.requested.clone();
            self.replan_tries().insert(model.clone(), attempt);
            if running {
                self.place_beside_running_jobs(&record, &placement);
                continue; // once they end, it is tried again as below
            }
            match self.plan(&record, &requested) {
                Ok(chains) => self.adopt_as_asked(&record, &placement, chains, ""),
                // A worker holds more of it than it offers now: planned as the planner sees
                // fit meanwhile (still degraded), within the memory offered.
                Err(e) if self.overcommitted(&placement) => {
                    let moved = self
                        .plan(&record, &PlacementRequest::Auto)
                        .and_then(|chains| {
                            let why =
                                format!("planned within the memory its workers offer now: {e}");
                            self.write_placement(&record, chains, requested, true, Some(why))
                        });
                    match moved {
                        Ok(p) => {
                            info!(model = %model, version = p.version, cause = %e, "placed within the memory its workers offer")
                        }
                        Err(e) => {
                            warn!(model = %model, cause = %e, "a worker holds more than it offers, and the model cannot be placed elsewhere")
                        }
                    }
                }
                Err(e) => {
                    debug!(model = %model, cause = %e, "still cannot place as asked");
                    // A model not placed at all shows why as of now, not as of its last try;
                    // a degraded one, what keeps it from being placed as asked.
                    let noted = if placement.degraded {
                        self.note_not_as_asked(&model, placement.version, &e.to_string())
                    } else {
                        self.note_unplaced(&placement, &e.to_string())
                    };
                    if let Err(e) = noted {
                        warn!(model = %model, cause = %e, "recording why the model is not placed as asked");
                    }
                }
            }
        }
    }

    /// Places the degraded `placement` of `record` as asked while jobs of it run, if the plan
    /// fits in what the workers have besides what its current stages hold: the running jobs go
    /// on on the stages they hold (a worker keeps a replaced slice until its last session ends,
    /// and a stage given the same layers keeps its slice), and the next jobs run on the new
    /// placement. Otherwise it waits for them to end. Callers hold the model's gate and
    /// `placing`.
    fn place_beside_running_jobs(&self, record: &ModelRecord, placement: &PlacementRecord) {
        let model = &record.name;
        let requested = placement.requested.clone();
        // The plan as if the current stages were free: where it fits beside them (a stage it
        // leaves as it is counted once), it is the one; else the best plan that fits beside
        // them all.
        let chains = match self.plan(record, &requested) {
            Err(e) => {
                // Not the running jobs: it cannot be placed as asked at all now.
                debug!(model = %model, cause = %e, "still cannot place as asked");
                return self.record_not_as_asked(placement, &e.to_string());
            }
            Ok(chains) if self.check_beside_running_jobs(placement, &chains).is_ok() => Ok(chains),
            Ok(_) => self.plan_holding(record, &requested, true),
        };
        match chains {
            Ok(chains) => {
                self.adopt_as_asked(record, placement, chains, ", beside its running jobs")
            }
            Err(e) => {
                debug!(model = %model, cause = %e, "cannot place as asked beside its running jobs");
                self.record_not_as_asked(
                    placement,
                    "waiting for its running jobs to end: as asked, it does not fit beside the stages they run on",
                );
            }
        }
    }

    /// `note_not_as_asked` for `placement`, a failure only logged. Callers hold `placing`.
    fn record_not_as_asked(&self, placement: &PlacementRecord, why: &str) {
        if let Err(e) = self.note_not_as_asked(&placement.model, placement.version, why) {
            warn!(model = %placement.model, cause = %e, "recording why the model is not placed as asked");
        }
    }

    /// Makes `chains`, planned as `placement` asks, the model's placement: a new version,
    /// unless they are its layout already (then it is only no longer degraded: nothing moves).
    /// Callers hold `placing`.
    fn adopt_as_asked(
        &self,
        record: &ModelRecord,
        placement: &PlacementRecord,
        chains: Vec<Vec<StageRecord>>,
        how: &str,
    ) {
        let model = &record.name;
        // What the planner makes of the workers up now; one that is down may change it once
        // it is back (an explicit chain names its workers): still degraded until then.
        let down = match placement.requested {
            PlacementRequest::Explicit(_) => None,
            _ => self.a_worker_down(record),
        };
        let why = down.map(|down| down_reason(&down));
        if layout_of(&chains) == placement.layout() {
            if let Some(why) = why {
                return self.record_not_as_asked(placement, &why);
            }
            if let Err(e) = self.mark_as_asked(placement) {
                warn!(model = %model, cause = %e, "recording the placement as asked");
            }
            return;
        }
        let degraded = why.is_some();
        match self.write_placement(record, chains, placement.requested.clone(), degraded, why) {
            Ok(p) => info!(
                model = %model,
                version = p.version,
                requested = %p.requested.describe(),
                "placed as asked again{how}"
            ),
            Err(e) => warn!(model = %model, cause = %e, "placing as asked again"),
        }
    }

    /// Records what keeps the degraded `placement` from being placed as asked (see
    /// `note_not_as_asked`); a model that is not degraded has nothing to explain.
    fn explain_not_as_asked(&self, placement: &PlacementRecord, why: &str) {
        if !placement.degraded {
            return;
        }
        let _placing = self.placing();
        self.record_not_as_asked(placement, why);
    }

    /// Whether a worker of `placement` holds more, over all placements, than it offers.
    fn overcommitted(&self, placement: &PlacementRecord) -> bool {
        let Ok(all) =
            crate::records::read_all::<PlacementRecord>(self.store(), crate::records::PLACEMENTS)
        else {
            return false;
        };
        let Ok(workers) = self.list_workers() else {
            return false;
        };
        let held = memory_held(&all);
        placement.chains.iter().flatten().any(|stage| {
            workers.iter().any(|(w, _)| {
                w.id == stage.worker_id
                    && held.get(&w.id).copied().unwrap_or(0) > w.offered_memory_bytes
            })
        })
    }

    /// Moves jobs that made no progress for `stall` to another chain (a stage that hangs
    /// without dropping its connection), and cancels jobs whose client has gone (noticed here
    /// as well as at the next token, which may be a long prompt away).
    pub fn check_stalled_jobs(&self, now: Instant, stall: Duration) {
        let abandoned: Vec<u64> = self
            .jobs()
            .live
            .iter()
            .filter(|(_, j)| j.events.is_closed())
            .map(|(s, _)| *s)
            .collect();
        for session in abandoned {
            let reason = "the client went away".to_string();
            self.finish_job(session, JobState::Cancelled, None, Some(reason));
        }
        let stalled: Vec<u64> = self
            .jobs()
            .live
            .iter()
            .filter(|(_, j)| !j.stages.is_empty() && now.duration_since(j.progress) > stall)
            .map(|(s, _)| *s)
            .collect();
        for session in stalled {
            let _ = self
                .recoveries
                .send((session, format!("no progress for {stall:?}")));
        }
    }

    fn take_job(&self, session: u64) -> Option<LiveJob> {
        let mut jobs = self.jobs();
        let job = jobs.live.remove(&session)?;
        jobs.by_id.remove(&job.record.id);
        Some(job)
    }

    /// Registers a job under a fresh session (to end it through [`Self::finish_job`]).
    fn park(&self, job: LiveJob) -> u64 {
        let session = new_session_id();
        let mut jobs = self.jobs();
        jobs.by_id.insert(job.record.id.clone(), session);
        jobs.live.insert(
            session,
            LiveJob {
                stages: vec![],
                held: vec![],
                ..job
            },
        );
        session
    }

    /// Fails every job running on `worker` (its stream ended).
    pub(crate) fn fail_jobs_on(&self, worker: &str, why: &str) {
        let sessions: Vec<u64> = self
            .jobs()
            .live
            .iter()
            .filter(|(_, j)| j.stages.iter().any(|s| s == worker))
            .map(|(s, _)| *s)
            .collect();
        for session in sessions {
            let _ = self
                .recoveries
                .send((session, format!("worker {worker} {why}")));
        }
    }
}

/// Why a placement planned over the workers up now is not yet as asked: `worker` is down.
fn down_reason(worker: &str) -> String {
    format!(
        "as asked over the workers up now; worker {worker} is down: placed as asked again once it is back (or revoked)"
    )
}
