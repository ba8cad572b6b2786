//! The live fleet: worker authentication, agent streams and their heartbeats, leases, and the
//! assignment states workers report.

use std::collections::HashMap;
use std::time::Instant;

use sovra_proto::ca;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::error::CoordinatorError;
use crate::federation::{AgentCommand, AssignmentState, Federation, LiveWorker, WorkerHello};
use crate::jobs::JobState;
use crate::records::*;
use crate::store::Batch;
use crate::validate::host_of;

/// A worker's new agent stream.
pub struct Connected {
    /// Its number (a heartbeat of an older stream is ignored).
    pub stream: u64,
    /// Commands for the worker: first its assignments.
    pub commands: mpsc::UnboundedReceiver<AgentCommand>,
    /// The models it holds assignments for: it drops slices of any other.
    pub models: Vec<String>,
}

impl Federation {
    /// Finds the worker a verified client certificate belongs to, refusing revoked providers and
    /// superseded certificates.
    pub fn authenticate_worker(&self, cert_der: &[u8]) -> Result<WorkerRecord, CoordinatorError> {
        let identity = ca::worker_identity(cert_der)
            .map_err(|e| CoordinatorError::Unauthenticated(e.to_string()))?;
        let worker: WorkerRecord =
            read(self.store(), WORKERS, &identity.worker_id)?.ok_or_else(|| {
                CoordinatorError::Unauthenticated(format!(
                    "unknown worker `{}`",
                    identity.worker_id
                ))
            })?;
        if worker.cert_fingerprint != ca::fingerprint_der(cert_der)
            || worker.provider != identity.provider
        {
            return Err(CoordinatorError::Unauthenticated(
                "this certificate is not the worker's current one".into(),
            ));
        }
        if self.provider(&worker.provider)?.revoked {
            return Err(CoordinatorError::PermissionDenied(format!(
                "provider `{}` is revoked",
                worker.provider
            )));
        }
        if self.worker_revoked(&worker.id)? {
            return Err(revoked_worker(&worker.id));
        }
        Ok(worker)
    }

    /// Every worker revoked, by itself or with its provider.
    pub fn revoked_workers(&self) -> Result<Vec<String>, CoordinatorError> {
        let mut ids: Vec<String> = self
            .list_workers()?
            .into_iter()
            .filter(|(_, p)| p.revoked)
            .map(|(w, _)| w.id)
            .collect();
        for (key, _) in self.store().scan(REVOKED_WORKERS, b"")? {
            ids.push(String::from_utf8_lossy(&key).into_owned());
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Ends every agent stream and every running job (which fails, saying the coordinator
    /// stopped), so a graceful stop does not wait for them. Workers reconnect to the next
    /// coordinator process by themselves.
    pub fn shut_down(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let sessions: Vec<u64> = self.jobs().live.keys().copied().collect();
        for session in sessions {
            let why = "the coordinator stopped while the job ran".to_string();
            self.finish_job(session, JobState::Failed, None, Some(why));
        }
        // Dropping the command senders ends the agent streams.
        self.live().workers.clear();
        info!("agent streams and jobs ended for the stop");
    }

    /// True once the operator revoked this worker.
    pub fn worker_revoked(&self, id: &str) -> Result<bool, CoordinatorError> {
        Ok(self.store().get(REVOKED_WORKERS, id.as_bytes())?.is_some())
    }

    /// Revokes one worker (a machine decommissioned or compromised): its agent stream ends, it
    /// is refused from then on, its peers refuse its data-plane connections, and the jobs it
    /// ran move to other chains. Its provider's other workers are not affected.
    pub fn revoke_worker(&self, id: &str) -> Result<WorkerRecord, CoordinatorError> {
        let worker: WorkerRecord = read(self.store(), WORKERS, id)?
            .ok_or_else(|| CoordinatorError::not_found("worker", id))?;
        if self.worker_revoked(id)? {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "worker `{id}` is already revoked"
            )));
        }
        self.store()
            .apply(Batch::new().put(REVOKED_WORKERS, id, encode(&now_unix())))?;
        self.store().flush()?;
        {
            // Under the lock `worker_connected` checks the revocation in: a stream opening
            // now is either removed here or refused there.
            let mut live = self.live();
            // Dropping the command sender ends the worker's stream.
            live.workers.remove(id);
            for other in live.workers.values() {
                let _ = other
                    .commands
                    .send(AgentCommand::PeersRevoked(vec![id.to_string()]));
            }
        }
        self.send_probe_lists();
        self.set_worker_state(id, WorkerState::Down)?;
        self.fail_jobs_on(id, "was revoked");
        // A placement waiting for it to come back no longer does.
        self.replan_tries().clear();
        warn!(worker = id, "worker revoked");
        Ok(worker)
    }

    /// Every worker, with its state.
    pub fn list_workers(&self) -> Result<Vec<(WorkerRecord, ProviderRecord)>, CoordinatorError> {
        let providers: HashMap<String, ProviderRecord> =
            read_all::<ProviderRecord>(self.store(), PROVIDERS)?
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect();
        Ok(read_all::<WorkerRecord>(self.store(), WORKERS)?
            .into_iter()
            .filter_map(|w| providers.get(&w.provider).cloned().map(|p| (w, p)))
            .collect())
    }

    pub(crate) fn set_worker_state(
        &self,
        id: &str,
        state: WorkerState,
    ) -> Result<(), CoordinatorError> {
        if let Some(mut w) = read::<WorkerRecord>(self.store(), WORKERS, id)? {
            w.state = state;
            w.last_seen_unix = now_unix();
            self.store()
                .apply(Batch::new().put(WORKERS, id, encode(&w)))?;
        }
        Ok(())
    }

    /// Registers an opened agent stream; returns its stream number, the command receiver and the
    /// assignments the worker should load now.
    pub fn worker_connected(
        &self,
        worker: &WorkerRecord,
        hello: WorkerHello,
    ) -> Result<Connected, CoordinatorError> {
        if self.worker_revoked(&worker.id)? {
            return Err(revoked_worker(&worker.id));
        }
        if host_of(&hello.advertise_addr) != host_of(&worker.advertise_addr) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "worker `{}` joined with data-plane address {} and now claims {}: the host must stay the one in its certificate",
                worker.id, worker.advertise_addr, hello.advertise_addr
            )));
        }
        let mut record = worker.clone();
        record.advertise_addr = hello.advertise_addr.clone();
        record.device = hello.device;
        record.offered_memory_bytes = hello.offered_memory_bytes;
        record.speed_gflops = hello.speed_gflops;
        record.threads = hello.threads;
        record.state = WorkerState::Up;
        record.last_seen_unix = now_unix();
        self.store()
            .apply(Batch::new().put(WORKERS, &record.id, encode(&record)))?;
        self.check_memory_held(&record)?;
        let (tx, rx) = mpsc::unbounded_channel();
        // Its orders are read under the lock `dispatch` sends in: a placement written
        // meanwhile is either read here or sent to the stream inserted below.
        let mut live = self.live();
        let orders = self.orders_for(&record.id)?;
        let models = orders.iter().map(|o| o.model.clone()).collect();
        for order in orders {
            let _ = tx.send(AgentCommand::Assign(order));
        }
        if self.worker_revoked(&record.id)? {
            return Err(revoked_worker(&record.id));
        }
        live.next_stream += 1;
        let replaced = live.workers.contains_key(&record.id);
        let stream = live.next_stream;
        live.workers.insert(
            record.id.clone(),
            LiveWorker {
                stream,
                commands: tx,
                last_heartbeat: Instant::now(),
                sessions: 0,
                kv_bytes: 0,
                addr: record.advertise_addr.clone(),
            },
        );
        drop(live);
        self.worker_came_up(&record.id);
        if replaced {
            // The worker resets its sessions on a new stream: move the jobs it ran.
            self.fail_jobs_on(&record.id, "reconnected and reset its sessions");
        }
        info!(worker = %record.id, speed_gflops = record.speed_gflops, "worker up");
        Ok(Connected {
            stream,
            commands: rx,
            models,
        })
    }

    /// A worker that now offers less memory than its stages hold (restarted with a lower
    /// `--max-memory`): its models' placements are marked degraded, so they are planned as
    /// asked again, within the memory it offers (see `replan_degraded`).
    fn check_memory_held(&self, worker: &WorkerRecord) -> Result<(), CoordinatorError> {
        let _placing = self.placing();
        let placements = read_all::<PlacementRecord>(self.store(), PLACEMENTS)?;
        let held = memory_held(&placements)
            .get(&worker.id)
            .copied()
            .unwrap_or(0);
        if held <= worker.offered_memory_bytes {
            return Ok(());
        }
        warn!(
            worker = %worker.id,
            held = %crate::planner::gib(held),
            offered = %crate::planner::gib(worker.offered_memory_bytes),
            "the worker offers less memory than its stages hold: their models will be placed again"
        );
        for p in placements {
            if !p.degraded && p.chains.iter().flatten().any(|s| s.worker_id == worker.id) {
                self.update_placement_in_place(&PlacementRecord {
                    degraded: true,
                    ..p
                })?;
            }
        }
        Ok(())
    }

    /// Records a heartbeat; false when the stream is no longer the worker's live one.
    pub fn heartbeat(&self, worker_id: &str, stream: u64, load: Option<(u32, u64)>) -> bool {
        let mut live = self.live();
        match live.workers.get_mut(worker_id) {
            Some(w) if w.stream == stream => {
                w.last_heartbeat = Instant::now();
                if let Some((sessions, kv_bytes)) = load {
                    w.sessions = sessions;
                    w.kv_bytes = kv_bytes;
                }
                true
            }
            _ => false,
        }
    }

    /// When a live worker's last heartbeat came, seconds since the Unix epoch.
    pub fn last_heartbeat_unix(&self, worker_id: &str) -> Option<u64> {
        let ago = self.live().workers.get(worker_id)?.last_heartbeat.elapsed();
        Some(now_unix().saturating_sub(ago.as_secs()))
    }

    /// Sessions and KV cache bytes of a live worker, as its last heartbeat said.
    pub fn worker_load(&self, worker_id: &str) -> Option<(u32, u64)> {
        self.live()
            .workers
            .get(worker_id)
            .map(|w| (w.sessions, w.kv_bytes))
    }

    /// Sends a command to a live worker; false when it has no stream.
    pub fn send_to(&self, worker_id: &str, command: AgentCommand) -> bool {
        self.live()
            .workers
            .get(worker_id)
            .is_some_and(|w| w.commands.send(command).is_ok())
    }

    /// Marks a worker down when its (current) stream ends.
    pub fn worker_disconnected(
        &self,
        worker_id: &str,
        stream: u64,
        left: bool,
    ) -> Result<(), CoordinatorError> {
        let removed = {
            let mut live = self.live();
            match live.workers.get(worker_id) {
                Some(w) if w.stream == stream => live.workers.remove(worker_id).is_some(),
                _ => false,
            }
        };
        if removed {
            self.send_probe_lists();
            self.set_worker_state(worker_id, WorkerState::Down)?;
            let why = if left {
                "is stopping"
            } else {
                "lost its connection to the coordinator"
            };
            self.fail_jobs_on(worker_id, why);
            info!(
                worker = worker_id,
                left, "worker stream closed, marked down"
            );
        }
        Ok(())
    }

    /// Marks down every worker whose last heartbeat is older than the lease.
    pub fn expire_leases(&self, now: Instant) -> Result<Vec<String>, CoordinatorError> {
        let expired: Vec<String> = {
            let mut live = self.live();
            let ids: Vec<String> = live
                .workers
                .iter()
                .filter(|(_, w)| now.duration_since(w.last_heartbeat) > self.config().lease)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                live.workers.remove(id);
            }
            ids
        };
        if !expired.is_empty() {
            self.send_probe_lists();
        }
        for id in &expired {
            warn!(worker = %id, "lease expired, marked down");
            self.set_worker_state(id, WorkerState::Down)?;
            self.fail_jobs_on(id, "stopped heartbeating");
        }
        Ok(expired)
    }

    /// True while the worker has a live agent stream.
    pub fn is_live(&self, worker_id: &str) -> bool {
        self.live().workers.contains_key(worker_id)
    }

    /// Records an assignment's progress (reports of older placement versions are ignored).
    pub fn assignment_status(
        &self,
        worker_id: &str,
        model: &str,
        version: u64,
        state: AssignmentState,
        message: String,
    ) {
        // Only assignments this worker actually holds are recorded (a peer cannot grow the map).
        let assigned = self
            .placement(model)
            .is_ok_and(|p| p.chains.iter().flatten().any(|s| s.worker_id == worker_id));
        if !assigned {
            return;
        }
        let mut live = self.live();
        let key = (model.to_string(), worker_id.to_string());
        if live
            .statuses
            .get(&key)
            .is_some_and(|(v, _, _)| *v > version)
        {
            return;
        }
        live.statuses.insert(key, (version, state, message));
    }

    /// The reported state of `worker`'s assignment for `model` at `version`.
    pub fn stage_state(
        &self,
        model: &str,
        worker: &str,
        version: u64,
    ) -> Option<(AssignmentState, String)> {
        self.live()
            .statuses
            .get(&(model.to_string(), worker.to_string()))
            .filter(|(v, _, _)| *v == version)
            .map(|(_, s, m)| (*s, m.clone()))
    }
}

fn revoked_worker(id: &str) -> CoordinatorError {
    CoordinatorError::PermissionDenied(format!("worker `{id}` is revoked"))
}
