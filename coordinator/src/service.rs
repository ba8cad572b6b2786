//! The gRPC services of `sovra.v1`: authentication of each call, conversion between protobuf
//! and domain types, and delegation to [`Federation`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sovra_model::{LayerRange, ModelSpec, WeightMode};
use sovra_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::error::CoordinatorError;
use crate::federation::{AgentCommand, AssignmentState, Federation, WorkerHello};
use crate::placement::PlacementRequest;
use crate::records::*;

/// How long a new agent stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Every service, sharing one [`Federation`].
#[derive(Clone)]
pub struct ControlPlane {
    fed: Arc<Federation>,
}

impl ControlPlane {
    /// Services over `fed`.
    pub fn new(fed: Arc<Federation>) -> Self {
        Self { fed }
    }

    /// The federation served.
    pub fn federation(&self) -> &Arc<Federation> {
        &self.fed
    }
}

pub(crate) fn bearer<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn operator<T>(fed: &Federation, request: &Request<T>) -> Result<(), Status> {
    Ok(fed.require_operator(bearer(request).as_deref())?)
}

fn provider_pb(p: ProviderRecord, workers: usize) -> pb::Provider {
    pb::Provider {
        name: p.name,
        country: p.country,
        certifications: p.certifications,
        revoked: p.revoked,
        created_unix: p.created_unix,
        worker_count: workers as u32,
    }
}

#[tonic::async_trait]
impl pb::providers_server::Providers for ControlPlane {
    async fn add_provider(
        &self,
        request: Request<pb::AddProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        operator(&self.fed, &request)?;
        let r = request.into_inner();
        let p = self
            .fed
            .add_provider(&r.name, &r.country, &r.certifications)?;
        Ok(Response::new(provider_pb(p, 0)))
    }

    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        operator(&self.fed, &request)?;
        let providers = self
            .fed
            .list_providers()?
            .into_iter()
            .map(|(p, n)| provider_pb(p, n))
            .collect();
        Ok(Response::new(pb::ListProvidersResponse { providers }))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        operator(&self.fed, &request)?;
        let r = request.into_inner();
        let ttl = if r.ttl_seconds == 0 {
            3600
        } else {
            r.ttl_seconds
        };
        let (token, expires_unix) = self
            .fed
            .create_join_token(&r.provider, Duration::from_secs(ttl))?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: token.to_string(),
            expires_unix,
        }))
    }

    async fn revoke_provider(
        &self,
        request: Request<pb::RevokeProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        operator(&self.fed, &request)?;
        let p = self.fed.revoke_provider(&request.into_inner().name)?;
        tokio::spawn(self.fed.clone().replan_after_revocation());
        Ok(Response::new(provider_pb(p, 0)))
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for ControlPlane {
    async fn rotate_operator_token(
        &self,
        request: Request<pb::RotateOperatorTokenRequest>,
    ) -> Result<Response<pb::RotateOperatorTokenResponse>, Status> {
        operator(&self.fed, &request)?;
        let (token, unwritten) = self.fed.rotate_operator_token()?;
        Ok(Response::new(pb::RotateOperatorTokenResponse {
            token,
            token_file: self.fed.admin_token_path().display().to_string(),
            write_error: unwritten.unwrap_or_default(),
        }))
    }
}

#[tonic::async_trait]
impl pb::tenants_server::Tenants for ControlPlane {
    async fn add_tenant(
        &self,
        request: Request<pb::AddTenantRequest>,
    ) -> Result<Response<pb::AddTenantResponse>, Status> {
        operator(&self.fed, &request)?;
        let r = request.into_inner();
        let (t, token) = self.fed.add_tenant(&r.name, r.max_running_jobs)?;
        Ok(Response::new(pb::AddTenantResponse {
            name: t.name,
            token,
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        operator(&self.fed, &request)?;
        let tenants = self
            .fed
            .list_tenants()?
            .into_iter()
            .map(|t| tenant_pb(&self.fed, t))
            .collect();
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }

    async fn revoke_tenant(
        &self,
        request: Request<pb::TenantRef>,
    ) -> Result<Response<pb::Tenant>, Status> {
        operator(&self.fed, &request)?;
        let t = self.fed.revoke_tenant(&request.into_inner().name)?;
        Ok(Response::new(tenant_pb(&self.fed, t)))
    }

    async fn set_tenant_limit(
        &self,
        request: Request<pb::SetTenantLimitRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        operator(&self.fed, &request)?;
        let r = request.into_inner();
        let t = self.fed.set_tenant_limit(&r.name, r.max_running_jobs)?;
        Ok(Response::new(tenant_pb(&self.fed, t)))
    }

    async fn rotate_tenant_token(
        &self,
        request: Request<pb::TenantRef>,
    ) -> Result<Response<pb::AddTenantResponse>, Status> {
        operator(&self.fed, &request)?;
        let (t, token) = self.fed.rotate_tenant_token(&request.into_inner().name)?;
        Ok(Response::new(pb::AddTenantResponse {
            name: t.name,
            token,
        }))
    }
}

fn tenant_pb(fed: &Federation, t: TenantRecord) -> pb::Tenant {
    pb::Tenant {
        max_running_jobs: fed.job_limit_of(&t),
        own_max_running_jobs: t.max_running_jobs,
        name: t.name,
        created_unix: t.created_unix,
        revoked: t.revoked,
    }
}

type AgentStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::workers_server::Workers for ControlPlane {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = request.into_inner();
        let (worker, certificate_pem) = self.fed.join(&r.token, &r.csr_pem, &r.advertise_addr)?;
        Ok(Response::new(pb::JoinResponse {
            worker_id: worker.id,
            provider: worker.provider,
            certificate_pem,
            ca_pem: self.fed.ca().cert_pem().to_string(),
        }))
    }

    type AgentStream = AgentStream;

    async fn agent(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<AgentStream>, Status> {
        let cert = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .ok_or_else(|| {
                Status::unauthenticated("the agent stream needs a worker certificate")
            })?;
        let worker = self.fed.authenticate_worker(&cert)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Hello(h)),
            }))) => hello_from_pb(h),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10 s")),
            _ => {
                return Err(Status::invalid_argument(
                    "the first agent message must be a hello",
                ));
            }
        };
        let crate::fleet::Connected {
            stream,
            commands,
            models,
        } = self.fed.worker_connected(&worker, hello)?;
        let (tx, rx) = mpsc::channel(64);
        let welcome = pb::coordinator_message::Kind::Welcome(pb::Welcome {
            worker_id: worker.id.clone(),
            heartbeat_interval_ms: self.fed.config().heartbeat_interval.as_millis() as u64,
            lease_ms: self.fed.config().lease.as_millis() as u64,
            models,
            revoked_peers: self.fed.revoked_workers()?,
        });
        let _ = tx
            .send(Ok(pb::CoordinatorMessage {
                kind: Some(welcome),
            }))
            .await;
        tokio::spawn(serve_agent(
            self.fed.clone(),
            worker.id,
            stream,
            inbound,
            commands,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        operator(&self.fed, &request)?;
        let held = self.fed.memory_in_use()?;
        let workers = self
            .fed
            .list_workers()?
            .into_iter()
            .map(|(w, p)| pb::Worker {
                held_memory_bytes: held.get(&w.id).copied().unwrap_or(0),
                ..worker_pb(&self.fed, w, &p)
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn list_links(
        &self,
        request: Request<pb::ListLinksRequest>,
    ) -> Result<Response<pb::ListLinksResponse>, Status> {
        operator(&self.fed, &request)?;
        let links = self
            .fed
            .links()
            .into_iter()
            .map(|l| pb::Link {
                from_worker: l.from,
                to_worker: l.to,
                rtt_us: l.sample.rtt.map_or(0, |r| r.as_micros() as u64),
                error: l.sample.error,
                age_s: l.sample.at.elapsed().as_secs(),
            })
            .collect();
        Ok(Response::new(pb::ListLinksResponse { links }))
    }

    async fn revoke_worker(
        &self,
        request: Request<pb::RevokeWorkerRequest>,
    ) -> Result<Response<pb::Worker>, Status> {
        operator(&self.fed, &request)?;
        let id = request.into_inner().worker_id;
        let worker = self.fed.revoke_worker(&id)?;
        tokio::spawn(self.fed.clone().replan_after_revocation());
        let provider = self.fed.provider(&worker.provider)?;
        Ok(Response::new(worker_pb(&self.fed, worker, &provider)))
    }
}

/// Relays one worker's agent stream until it ends, is replaced, or its worker is cut off.
async fn serve_agent(
    fed: Arc<Federation>,
    worker: String,
    stream: u64,
    mut inbound: Streaming<pb::AgentMessage>,
    mut commands: mpsc::UnboundedReceiver<AgentCommand>,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
) {
    // Whether the worker ended the stream itself (it is stopping).
    let mut left = false;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => {
                    if !send_bounded(&tx, Ok(command_pb(command)), fed.config().lease).await {
                        break;
                    }
                }
                None => {
                    let why = if fed.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                        "the coordinator is stopping"
                    } else {
                        "lease expired, worker or provider revoked, or stream replaced"
                    };
                    let _ = send_bounded(&tx, Err(Status::unavailable(why)), fed.config().lease).await;
                    break;
                }
            },
            message = inbound.message() => match message {
                Ok(Some(pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::Leaving(_)),
                })) => {
                    left = true;
                    break;
                }
                Ok(Some(m)) => {
                    if !handle_agent_message(&fed, &worker, stream, m) {
                        let _ = send_bounded(&tx, Err(Status::unavailable("this agent stream is no longer current")), fed.config().lease).await;
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    if let Err(e) = fed.worker_disconnected(&worker, stream, left) {
        tracing::error!(cause = %e, worker, "marking worker down");
    }
}

/// Sends on an agent stream, giving up (false) when the worker does not read within `limit`.
async fn send_bounded(
    tx: &mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    message: Result<pb::CoordinatorMessage, Status>,
    limit: Duration,
) -> bool {
    matches!(
        tokio::time::timeout(limit, tx.send(message)).await,
        Ok(Ok(()))
    )
}

fn handle_agent_message(
    fed: &Federation,
    worker: &str,
    stream: u64,
    message: pb::AgentMessage,
) -> bool {
    use pb::agent_message::Kind;
    let load = match &message.kind {
        Some(Kind::Heartbeat(h)) => {
            debug!(worker, seq = h.seq, "heartbeat");
            Some((h.open_sessions, h.kv_cache_bytes))
        }
        _ => None,
    };
    // Every message counts as a heartbeat. A stream that was replaced, timed out or revoked
    // speaks for no one any more: nothing it sends (a token, a session's end) reaches a job.
    if !fed.heartbeat(worker, stream, load) {
        return false;
    }
    match message.kind {
        Some(Kind::SessionOpened(o)) => {
            let result = if o.error.is_empty() {
                Ok(o.prompt_ids)
            } else {
                Err((clip(&o.error), o.bad_request))
            };
            fed.session_opened(worker, o.session, result);
        }
        Some(Kind::SessionEvent(e)) => {
            let token = e.token.map(|t| (t.index, t.token_id, t.text));
            let finish = (!e.finish_reason.is_empty()).then(|| clip(&e.finish_reason));
            let error = (!e.error.is_empty()).then(|| clip(&e.error));
            if e.prefilled > 0 && token.is_none() && finish.is_none() && error.is_none() {
                fed.session_progress(worker, e.session);
            } else {
                fed.session_event(worker, e.session, token, finish, error);
            }
        }
        Some(Kind::Status(s)) => {
            let state = match pb::AssignmentState::try_from(s.state) {
                Ok(pb::AssignmentState::Ready) => AssignmentState::Ready,
                Ok(pb::AssignmentState::Failed) => AssignmentState::Failed,
                _ => AssignmentState::Loading,
            };
            let message: String = s.message.chars().take(1000).collect();
            fed.assignment_status(worker, &s.model, s.placement_version, state, message);
        }
        Some(Kind::Latencies(report)) => fed.record_latencies(worker, report),
        Some(Kind::Heartbeat(_)) | Some(Kind::Hello(_)) | Some(Kind::Leaving(_)) | None => {}
    }
    true
}

/// A peer-supplied string cut to a sane length.
fn clip(text: &str) -> String {
    text.chars().take(2000).collect()
}

fn hello_from_pb(h: pb::WorkerHello) -> WorkerHello {
    let device = h.device.unwrap_or_default();
    WorkerHello {
        device: DeviceRecord {
            kind: device.kind.chars().take(16).collect(),
            name: device.name.chars().take(200).collect(),
            memory_bytes: device.memory_bytes,
        },
        offered_memory_bytes: h.offered_memory_bytes,
        speed_gflops: if h.speed_gflops.is_finite() {
            h.speed_gflops.clamp(0.0, 1e7)
        } else {
            0.0
        },
        advertise_addr: h.advertise_addr,
        threads: h.threads,
    }
}

fn command_pb(command: AgentCommand) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Kind;
    let kind = match command {
        AgentCommand::Assign(o) => Kind::Assign(pb::Assignment {
            model: o.model,
            placement_version: o.version,
            file_sha256: o.file_sha256,
            file_name: o.file_name,
            file_path: o.file_path,
            dtype: o.dtype.to_string(),
            start_layer: o.range.start as u32,
            end_layer: o.range.end as u32,
            chain: o.chain as u32,
            stage: o.stage as u32,
        }),
        AgentCommand::Unassign { model } => Kind::Unassign(pb::Unassignment { model }),
        AgentCommand::OpenSession(o) => Kind::OpenSession(open_pb(*o)),
        AgentCommand::StartSession(session) => Kind::StartSession(pb::StartSession { session }),
        AgentCommand::CloseSession(session) => Kind::CloseSession(pb::CloseSession { session }),
        AgentCommand::PeersRevoked(worker_ids) => {
            Kind::PeersRevoked(pb::PeersRevoked { worker_ids })
        }
        AgentCommand::ProbePeers(peers) => Kind::ProbePeers(pb::ProbePeers {
            peers: peers
                .into_iter()
                .map(|(worker_id, addr, epoch)| pb::ProbeTarget {
                    worker_id,
                    addr,
                    epoch,
                })
                .collect(),
        }),
    };
    pb::CoordinatorMessage { kind: Some(kind) }
}

fn open_pb(o: crate::jobs::SessionOpen) -> pb::OpenSession {
    let peer =
        |p: Option<(String, String)>| p.map(|(worker_id, addr)| pb::Peer { worker_id, addr });
    pb::OpenSession {
        session: o.session,
        model: o.model,
        placement_version: o.version,
        stage: o.stage as u32,
        stages: o.stages as u32,
        prev: peer(o.prev),
        next: peer(o.next),
        head: peer(Some(o.head)),
        tail: peer(Some(o.tail)),
        prompt: o.prompt,
        chat: o.chat,
        system: o.system.unwrap_or_default(),
        sampling: Some(crate::job_service::sampling_pb(&o.sampling, &o.stop)),
        prompt_ids: o.prompt_ids,
        turns: o
            .turns
            .into_iter()
            .map(|t| pb::ChatTurn {
                role: t.role,
                text: t.text,
            })
            .collect(),
        replay_generated: o.replay_generated,
        prompt_tokens: o.prompt_tokens as u32,
    }
}

fn worker_pb(fed: &Federation, w: WorkerRecord, p: &ProviderRecord) -> pb::Worker {
    let state = if p.revoked || fed.worker_revoked(&w.id).unwrap_or(false) {
        "revoked"
    } else if fed.is_live(&w.id) {
        "up"
    } else if w.state == WorkerState::Joined {
        "joined"
    } else {
        "down"
    };
    let (open_sessions, kv_cache_bytes) = fed.worker_load(&w.id).unwrap_or_default();
    // A live worker was last seen at its last heartbeat (the record has its connection).
    let last_seen_unix = fed.last_heartbeat_unix(&w.id).unwrap_or(w.last_seen_unix);
    pb::Worker {
        open_sessions,
        kv_cache_bytes,
        id: w.id,
        provider: w.provider,
        country: p.country.clone(),
        state: state.to_string(),
        device: Some(pb::Device {
            kind: w.device.kind,
            name: w.device.name,
            memory_bytes: w.device.memory_bytes,
        }),
        offered_memory_bytes: w.offered_memory_bytes,
        speed_gflops: w.speed_gflops,
        advertise_addr: w.advertise_addr,
        last_seen_unix,
        joined_unix: w.joined_unix,
        held_memory_bytes: 0,
    }
}

/// Protobuf form of a model spec.
pub fn spec_pb(s: &ModelSpec) -> pb::ModelSpec {
    pb::ModelSpec {
        architecture: s.architecture.clone(),
        layers: s.layers as u32,
        hidden_size: s.hidden_size as u32,
        heads: s.heads as u32,
        kv_heads: s.kv_heads as u32,
        head_dim: s.head_dim as u32,
        ffn_size: s.ffn_size as u32,
        rope_base: s.rope_base,
        rms_eps: s.rms_eps,
        vocab_size: s.vocab_size as u32,
        context_length: s.context_length as u32,
        tied_embeddings: s.tied_embeddings,
        layer_bytes: s.layer_bytes.clone(),
        layer_params: s.layer_params,
        embedding_bytes: s.embedding_bytes,
        head_bytes: s.head_bytes,
        embedding_params: s.embedding_params,
    }
}

/// Domain form of a protobuf model spec.
pub fn spec_from_pb(s: pb::ModelSpec) -> ModelSpec {
    ModelSpec {
        architecture: s.architecture,
        layers: s.layers as usize,
        hidden_size: s.hidden_size as usize,
        heads: s.heads as usize,
        kv_heads: s.kv_heads as usize,
        head_dim: s.head_dim as usize,
        ffn_size: s.ffn_size as usize,
        rope_base: s.rope_base,
        rms_eps: s.rms_eps,
        vocab_size: s.vocab_size as usize,
        context_length: s.context_length as usize,
        tied_embeddings: s.tied_embeddings,
        layer_bytes: s.layer_bytes,
        layer_params: s.layer_params,
        embedding_bytes: s.embedding_bytes,
        head_bytes: s.head_bytes,
        embedding_params: s.embedding_params,
    }
}

fn policy_pb(p: &PolicyRecord) -> pb::Policy {
    pb::Policy {
        countries: p.countries.clone(),
        required_certifications: p.required_certifications.clone(),
        excluded_providers: p.excluded_providers.clone(),
    }
}

fn model_pb(m: ModelRecord) -> pb::Model {
    let full = LayerRange::new(0, m.spec.layers);
    pb::Model {
        weight_bytes: m.spec.slice_bytes(full, m.dtype),
        spec: Some(spec_pb(&m.spec)),
        policy: Some(policy_pb(&m.policy)),
        name: m.name,
        file_sha256: m.file_sha256,
        file_name: m.file_name,
        file_path: m.file_path,
        dtype: m.dtype.to_string(),
    }
}

#[tonic::async_trait]
impl pb::models_server::Models for ControlPlane {
    async fn add_model(
        &self,
        request: Request<pb::AddModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        operator(&self.fed, &request)?;
        let r = request.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("the model spec is missing"))?;
        let dtype: WeightMode = r.dtype.parse().map_err(Status::invalid_argument)?;
        let policy = r.policy.unwrap_or_default();
        let record = ModelRecord {
            name: r.name,
            spec: spec_from_pb(spec),
            file_sha256: r.file_sha256.to_ascii_lowercase(),
            file_name: r.file_name,
            file_path: r.file_path,
            dtype,
            policy: PolicyRecord {
                countries: policy.countries,
                required_certifications: policy.required_certifications,
                excluded_providers: policy.excluded_providers,
            },
            created_unix: 0,
        };
        let (model, _) = self.fed.add_model(record)?;
        Ok(Response::new(model_pb(model)))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.fed.authenticate(bearer(&request).as_deref())?;
        let models = self.fed.list_models()?.into_iter().map(model_pb).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn remove_model(
        &self,
        request: Request<pb::RemoveModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        operator(&self.fed, &request)?;
        let name = request.into_inner().name;
        Ok(Response::new(model_pb(self.fed.remove_model(&name).await?)))
    }
}

/// Protobuf form of a placement with each stage's reported state.
pub fn placement_pb(
    fed: &Federation,
    p: PlacementRecord,
) -> Result<pb::Placement, CoordinatorError> {
    let workers: std::collections::HashMap<String, (WorkerRecord, ProviderRecord)> = fed
        .list_workers()?
        .into_iter()
        .map(|(w, p)| (w.id.clone(), (w, p)))
        .collect();
    let links = fed.planner_links();
    let chains = p
        .chains
        .iter()
        .map(|chain| {
            let ids: Vec<&str> = chain.iter().map(|s| s.worker_id.as_str()).collect();
            (chain, links.ring_s(&ids))
        })
        .map(|(chain, ring)| pb::PlacementChain {
            bottleneck_ms: chain.iter().map(|s| s.time_s).fold(0.0, f64::max) * 1e3,
            ring_ms: ring.map_or(0.0, |r| r * 1e3),
            ring_measured: ring.is_some(),
            stages: chain
                .iter()
                .map(|s| {
                    let (provider, country) = workers
                        .get(&s.worker_id)
                        .map(|(_, p)| (p.name.clone(), p.country.clone()))
                        .unwrap_or_default();
                    let state = fed.stage_state(&p.model, &s.worker_id, p.version);
                    let revoked = workers.get(&s.worker_id).is_some_and(|(_, p)| p.revoked)
                        || fed.worker_revoked(&s.worker_id).unwrap_or(false);
                    let (state, message) = match state {
                        _ if revoked => (
                            pb::AssignmentState::Down,
                            "the worker is revoked".to_string(),
                        ),
                        _ if !fed.is_live(&s.worker_id) => {
                            (pb::AssignmentState::Down, "the worker is down".to_string())
                        }
                        Some((AssignmentState::Loading, m)) => (pb::AssignmentState::Loading, m),
                        Some((AssignmentState::Ready, m)) => (pb::AssignmentState::Ready, m),
                        Some((AssignmentState::Failed, m)) => (pb::AssignmentState::Failed, m),
                        None => (pb::AssignmentState::Unspecified, String::new()),
                    };
                    pb::PlacementStage {
                        worker_id: s.worker_id.clone(),
                        provider,
                        country,
                        start_layer: s.range.start as u32,
                        end_layer: s.range.end as u32,
                        memory_bytes: s.memory_bytes,
                        state: state as i32,
                        message,
                    }
                })
                .collect(),
        })
        .collect();
    Ok(pb::Placement {
        model: p.model,
        version: p.version,
        chains,
        unplaced_reason: p.unplaced_reason.unwrap_or_default(),
        requested: p.requested.describe(),
        degraded: p.degraded,
        not_as_asked: p.not_as_asked.unwrap_or_default(),
    })
}

/// How long `placement set` waits for a job of the model that is starting (choosing its chain,
/// maybe waiting for its stages to load).
const GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[tonic::async_trait]
impl pb::placements_server::Placements for ControlPlane {
    async fn show_placement(
        &self,
        request: Request<pb::ShowPlacementRequest>,
    ) -> Result<Response<pb::Placement>, Status> {
        self.fed.authenticate(bearer(&request).as_deref())?;
        let p = self.fed.placement(&request.into_inner().model)?;
        Ok(Response::new(placement_pb(&self.fed, p)?))
    }

    async fn set_placement(
        &self,
        request: Request<pb::SetPlacementRequest>,
    ) -> Result<Response<pb::Placement>, Status> {
        operator(&self.fed, &request)?;
        let r = request.into_inner();
        let how = match r.how {
            None | Some(pb::set_placement_request::How::Auto(_)) => PlacementRequest::Auto,
            Some(pb::set_placement_request::How::Stages(0)) => {
                return Err(Status::invalid_argument("--stages must be at least 1"));
            }
            Some(pb::set_placement_request::How::Stages(n)) => PlacementRequest::Stages(n as usize),
            Some(pb::set_placement_request::How::Explicit(chain)) => PlacementRequest::Explicit(
                chain
                    .stages
                    .into_iter()
                    .map(|s| {
                        (
                            s.worker_id,
                            LayerRange::new(s.start_layer as usize, s.end_layer as usize),
                        )
                    })
                    .collect(),
            ),
        };
        // Not while a job of it is starting (see `placement_gate`); a gate only for a model
        // that exists.
        self.fed.model(&r.model)?;
        let gate = self.fed.placement_gate(&r.model);
        let Ok(_no_job_starting) = tokio::time::timeout(GATE_WAIT, gate.write()).await else {
            return Err(Status::unavailable(format!(
                "a job of model `{}` has been starting for {} s (waiting for its stages to load); try again",
                crate::error::shown(&r.model, 80),
                GATE_WAIT.as_secs()
            )));
        };
        let p = self.fed.set_placement(&r.model, how)?;
        Ok(Response::new(placement_pb(&self.fed, p)?))
    }
}
