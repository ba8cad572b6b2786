//! The control plane end to end over real TLS with a real sled database: onboarding, token
//! abuse, revocation, tenant permissions, placement.

use std::time::Duration;

use sovra_proto::pb;
use sovra_proto::token::JoinToken;
use sovra_tests::federation::{JobOutput, TestFederation, chat_request, eventually, run_job};
use sovra_worker::agent::WorkerError;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

async fn worker_up(fed: &TestFederation, provider: &str) -> pb::Worker {
    eventually("a worker to be up", WAIT, || async {
        fed.workers()
            .await
            .into_iter()
            .find(|w| w.provider == provider && w.state == "up")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_end_to_end_and_restart_reuses_the_certificate() {
    let fed = TestFederation::start().await;
    fed.add_provider("ovh-fr", "fr", &["ISO27001", "SecNumCloud"])
        .await;
    let providers = fed.providers().await;
    assert_eq!(providers.len(), 1);
    assert_eq!(providers[0].country, "FR", "country codes are normalised");
    assert_eq!(providers[0].certifications, vec!["ISO27001", "SecNumCloud"]);
    for (country, named) in [("ZZ", "`ZZ`"), ("uk", "GB")] {
        let refused = pb::providers_client::ProvidersClient::new(fed.operator().await)
            .add_provider(pb::AddProviderRequest {
                name: "typo-dc".into(),
                country: country.into(),
                certifications: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains(named), "{refused:?}");
    }

    let token = fed.join_token("ovh-fr", 600).await;
    assert!(
        token.contains(&fed.fed.ca().fingerprint()),
        "the token carries the CA fingerprint"
    );
    let worker = fed.start_worker(Some(token), Some(1 << 30));
    let listed = worker_up(&fed, "ovh-fr").await;
    assert_eq!(listed.country, "FR");
    assert!(listed.id.starts_with("ovh-fr-"));
    assert!(
        listed.speed_gflops > 0.0,
        "speed is measured: {}",
        listed.speed_gflops
    );
    assert_eq!(listed.offered_memory_bytes, 1 << 30);
    assert_eq!(listed.device.as_ref().unwrap().kind, "cpu");
    assert!(
        std::fs::read_to_string(worker.data_dir.join("worker.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(worker.data_dir.join("worker-key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o077, 0, "the worker key is private");

    // Restarting on the same data dir needs no token and keeps the identity.
    let dir = worker.data_dir.clone();
    worker.stop().await.unwrap();
    eventually("the worker to be down", WAIT, || async {
        fed.workers()
            .await
            .into_iter()
            .find(|w| w.id == listed.id && w.state == "down")
    })
    .await;
    let again = fed.start_worker_in(dir, None, Some(1 << 30));
    let relisted = worker_up(&fed, "ovh-fr").await;
    assert_eq!(relisted.id, listed.id);
    assert_eq!(fed.workers().await.len(), 1);
    again.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_expired_and_forged_join_tokens_are_refused() {
    let fed = TestFederation::start().await;
    fed.add_provider("ionos-de", "DE", &[]).await;
    let token = fed.join_token("ionos-de", 600).await;
    let first = fed.start_worker(Some(token.clone()), None);
    worker_up(&fed, "ionos-de").await;

    let join_error = |mut w: sovra_tests::federation::TestWorker| async move {
        match w.finished(WAIT).await {
            Some(Err(WorkerError::Join(reason))) => reason,
            other => panic!("expected a join error, got {other:?}"),
        }
    };
    let reused = join_error(fed.start_worker(Some(token), None)).await;
    assert!(reused.contains("already been used"), "{reused}");

    let short = fed.join_token("ionos-de", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = join_error(fed.start_worker(Some(short), None)).await;
    assert!(expired.contains("expired"), "{expired}");

    let forged = JoinToken::generate(&fed.fed.ca().fingerprint()).to_string();
    let refused = join_error(fed.start_worker(Some(forged), None)).await;
    assert!(refused.contains("unknown token"), "{refused}");

    // A real token whose secret was altered.
    let real = JoinToken::parse(&fed.join_token("ionos-de", 600).await).unwrap();
    let altered = JoinToken {
        secret: "0".repeat(48),
        ..real
    }
    .to_string();
    let wrong = join_error(fed.start_worker(Some(altered), None)).await;
    assert!(wrong.contains("wrong secret"), "{wrong}");

    // A token naming another CA: the worker refuses to talk to this coordinator.
    let other_ca = JoinToken::generate(&"ab".repeat(32)).to_string();
    let mismatch = join_error(fed.start_worker(Some(other_ca), None)).await;
    assert!(
        mismatch.contains("fingerprint") || mismatch.contains("not issued by this coordinator"),
        "{mismatch}"
    );

    assert_eq!(
        fed.workers().await.len(),
        1,
        "no refused join created a worker"
    );
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_providers_workers_are_cut_off_and_refused() {
    let fed = TestFederation::start().await;
    fed.add_provider("scw-nl", "NL", &[]).await;
    let mut worker = fed.start_worker(Some(fed.join_token("scw-nl", 600).await), None);
    let listed = worker_up(&fed, "scw-nl").await;
    pb::providers_client::ProvidersClient::new(fed.operator().await)
        .revoke_provider(pb::RevokeProviderRequest {
            name: "scw-nl".into(),
        })
        .await
        .unwrap();
    // The worker's stream is cut; its reconnection is refused for good.
    match worker.finished(WAIT).await {
        Some(Err(WorkerError::Refused(reason))) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("expected the worker to be refused, got {other:?}"),
    }
    let after = fed.workers().await;
    assert_eq!(
        after.iter().find(|w| w.id == listed.id).unwrap().state,
        "revoked"
    );
    let err = pb::providers_client::ProvidersClient::new(fed.operator().await)
        .create_join_token(pb::CreateJoinTokenRequest {
            provider: "scw-nl".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_tokens_cannot_run_operator_commands() {
    let fed = TestFederation::start().await;
    let tenant = pb::tenants_client::TenantsClient::new(fed.operator().await)
        .add_tenant(pb::AddTenantRequest {
            name: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tenant.token.starts_with("sovra-tn-"));
    let as_tenant = fed.channel(Some(&tenant.token)).await;
    let err = pb::providers_client::ProvidersClient::new(as_tenant.clone())
        .add_provider(pb::AddProviderRequest {
            name: "x".into(),
            country: "FR".into(),
            certifications: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("acme"));
    let err = pb::tenants_client::TenantsClient::new(as_tenant.clone())
        .add_tenant(pb::AddTenantRequest {
            name: "evil".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A tenant may read the model catalogue.
    pb::models_client::ModelsClient::new(as_tenant)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap();
    // No token, or a made-up one, is unauthenticated.
    for token in [None, Some("sovra-op-0000"), Some("garbage")] {
        let err = pb::providers_client::ProvidersClient::new(fed.channel(token).await)
            .list_providers(pb::ListProvidersRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
    // Names are validated; duplicates refused.
    let mut tenants = pb::tenants_client::TenantsClient::new(fed.operator().await);
    assert_eq!(
        tenants
            .add_tenant(pb::AddTenantRequest {
                name: "acme".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        tenants
            .add_tenant(pb::AddTenantRequest {
                name: "Bad Name".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_agent_stream_is_refused() {
    let fed = TestFederation::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let err = pb::workers_client::WorkersClient::new(fed.operator().await)
        .agent(tokio_stream_from(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<pb::AgentMessage>,
) -> impl tokio_stream::Stream<Item = pb::AgentMessage> {
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A worker of the federation that speaks the agent protocol by hand, breaking it on purpose.
struct RogueWorker {
    id: String,
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    _dir: tempfile::TempDir,
}

impl RogueWorker {
    async fn join(fed: &TestFederation, provider: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = sovra_worker::agent::WorkerConfig {
            coordinator: fed.url.clone(),
            join_token: Some(fed.join_token(provider, 600).await),
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:9".parse().unwrap(),
            advertise: None,
            max_memory: None,
            models_dir: None,
            batch_wait: Duration::ZERO,
            cpus: None,
            probe_interval: Duration::from_secs(60),
        };
        let creds = sovra_worker::agent::credentials(&config, "127.0.0.1:9")
            .await
            .unwrap();
        let channel = sovra_proto::channel::connect(
            &fed.url,
            &creds.ca_pem,
            Some((&creds.cert_pem, &creds.key_pem)),
            None,
        )
        .await
        .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::WorkerHello {
                device: Some(pb::Device {
                    kind: "cpu".into(),
                    name: "rogue".into(),
                    memory_bytes: 8 << 30,
                }),
                offered_memory_bytes: 8 << 30,
                speed_gflops: 10.0,
                advertise_addr: "127.0.0.1:9".into(),
                threads: 1,
            })),
        })
        .await
        .unwrap();
        let inbound = pb::workers_client::WorkersClient::new(channel)
            .agent(tokio_stream_from(rx))
            .await
            .unwrap()
            .into_inner();
        // Heartbeats keep it up for as long as the test holds it.
        let beats = tx.clone();
        tokio::spawn(async move {
            for seq in 1.. {
                let beat = pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
                        seq,
                        ..Default::default()
                    })),
                };
                if beats.send(beat).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Self {
            id: creds.identity.worker_id,
            tx,
            inbound,
            _dir: dir,
        }
    }

    /// The next order of the kind `pick` takes (the others are skipped).
    async fn next<T>(&mut self, pick: impl Fn(pb::coordinator_message::Kind) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let m = self
                    .inbound
                    .message()
                    .await
                    .unwrap()
                    .expect("the stream ended");
                if let Some(t) = m.kind.and_then(&pick) {
                    return t;
                }
            }
        })
        .await
        .expect("no such order came")
    }

    async fn send(&self, kind: pb::agent_message::Kind) {
        self.tx
            .send(pb::AgentMessage { kind: Some(kind) })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_breaks_the_session_protocol_fails_its_job_with_a_reason() {
    use pb::agent_message::Kind as Up;
    use pb::coordinator_message::Kind as Down;
    let fed = TestFederation::start().await;
    fed.add_provider("rogue", "FR", &[]).await;
    let mut rogue = RogueWorker::join(&fed, "rogue").await;
    worker_up(&fed, "rogue").await;
    let model = sovra_tests::federation::smollm2_model("q8_0");
    let context = model.spec.as_ref().unwrap().context_length as usize;
    pb::models_client::ModelsClient::new(fed.operator().await)
        .add_model(model)
        .await
        .unwrap();
    let placed = pb::placements_client::PlacementsClient::new(fed.operator().await)
        .set_placement(pb::SetPlacementRequest {
            model: "smollm2".into(),
            how: Some(pb::set_placement_request::How::Explicit(
                pb::ExplicitChain {
                    stages: vec![pb::StageAssignment {
                        worker_id: rogue.id.clone(),
                        start_layer: 0,
                        end_layer: 30,
                    }],
                },
            )),
        })
        .await
        .unwrap()
        .into_inner();
    let assign = rogue
        .next(|k| match k {
            Down::Assign(a) if a.placement_version == placed.version => Some(a),
            _ => None,
        })
        .await;
    rogue
        .send(Up::Status(pb::AssignmentStatus {
            model: assign.model,
            placement_version: assign.placement_version,
            state: pb::AssignmentState::Ready as i32,
            message: String::new(),
        }))
        .await;
    let tenant = fed.add_tenant("acme").await;
    // Submits a job, takes its session's opening and answers it with `prompt_ids`.
    async fn submit(
        fed: &TestFederation,
        tenant: &str,
        rogue: &mut RogueWorker,
        prompt_ids: Vec<u32>,
    ) -> (
        u64,
        tokio::task::JoinHandle<Result<JobOutput, tonic::Status>>,
    ) {
        let channel = fed.channel(Some(tenant)).await;
        let job = tokio::spawn(run_job(channel, chat_request("Hello", 4, 0.0, 0)));
        let session = rogue
            .next(|k| match k {
                Down::OpenSession(o) => Some(o.session),
                _ => None,
            })
            .await;
        rogue
            .send(Up::SessionOpened(pb::SessionOpened {
                session,
                error: String::new(),
                prompt_tokens: prompt_ids.len() as u32,
                prompt_ids,
                bad_request: false,
            }))
            .await;
        (session, job)
    }

    // The head answers with more prompt tokens than the model's context.
    let (_, job) = submit(&fed, &tenant, &mut rogue, vec![1; context + 1]).await;
    let err = job.await.unwrap().unwrap_err();
    assert!(
        err.message().contains(&rogue.id)
            && err.message().contains("more than the model's context"),
        "{}",
        err.message()
    );

    // The tail sends 20 KiB of text for one token.
    let (session, job) = submit(&fed, &tenant, &mut rogue, vec![1, 2, 3]).await;
    rogue
        .next(|k| match k {
            Down::StartSession(s) if s.session == session => Some(()),
            _ => None,
        })
        .await;
    rogue
        .send(Up::SessionEvent(pb::SessionEvent {
            session,
            token: Some(pb::TokenEvent {
                index: 0,
                token_id: 1,
                text: "x".repeat(20 << 10),
            }),
            ..Default::default()
        }))
        .await;
    let err = job.await.unwrap().unwrap_err();
    assert!(
        err.message().contains(&rogue.id) && err.message().contains("bytes of text for one token"),
        "{}",
        err.message()
    );
    // Neither went to the job's record as text.
    let jobs = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter()
            .all(|j| j.state == "failed" && j.text.is_empty()),
        "{jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_told_whom_to_probe_and_their_reports_are_checked() {
    use pb::agent_message::Kind as Up;
    use pb::coordinator_message::Kind as Down;
    let fed = TestFederation::start().await;
    let mut rogues = Vec::new();
    for (provider, country) in [("one", "FR"), ("two", "DE"), ("three", "NL")] {
        fed.add_provider(provider, country, &[]).await;
        rogues.push(RogueWorker::join(&fed, provider).await);
        worker_up(&fed, provider).await;
    }
    // Each is sent the workers up, itself included, with their data-plane addresses and the
    // number of their agent streams.
    for w in &mut rogues {
        let list = w
            .next(|k| match k {
                Down::ProbePeers(p) if p.peers.len() == 3 => Some(p),
                _ => None,
            })
            .await;
        for p in &list.peers {
            assert_eq!(p.addr, "127.0.0.1:9");
            assert!(p.epoch > 0, "{p:?}");
        }
    }
    let (a, b, c) = (&rogues[0], &rogues[1], &rogues[2]);
    let latency = |id: &str, rtt_us: u64, error: &str| pb::PeerLatency {
        worker_id: id.into(),
        rtt_us,
        error: error.into(),
    };
    // More entries than any federation has workers: those past the first 4,096 are not read.
    let mut flood: Vec<pb::PeerLatency> = (0..10_000)
        .map(|i| latency(&format!("ghost-{i}"), 1_000, ""))
        .collect();
    flood.push(latency(&c.id, 1_000, ""));
    a.send(Up::Latencies(pb::PeerLatencies { peers: flood }))
        .await;
    // About itself, about a worker that does not exist, and a zero round trip.
    a.send(Up::Latencies(pb::PeerLatencies {
        peers: vec![
            latency(&a.id, 5, ""),
            latency("ghost", 5, ""),
            latency(&b.id, 0, ""),
        ],
    }))
    .await;
    // A stream's messages are handled in order: once a's second report shows, its flood was
    // read before it.
    let seen = eventually("a's report", WAIT, || async {
        let l = fed.links().await;
        l.iter().any(|x| x.from_worker == a.id).then_some(l)
    })
    .await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].to_worker, b.id);
    assert_eq!(seen[0].rtt_us, 0);
    assert!(seen[0].error.contains("outside"), "{:?}", seen[0]);
    // Sane reports are kept as they came, the last one of a link winning; a round trip past a
    // minute is unreachable.
    b.send(Up::Latencies(pb::PeerLatencies {
        peers: vec![latency(&a.id, 61_000_000, "")],
    }))
    .await;
    a.send(Up::Latencies(pb::PeerLatencies {
        peers: vec![latency(&b.id, 1_500, ""), latency(&b.id, 2_500, "")],
    }))
    .await;
    let seen = eventually("both reports", WAIT, || async {
        let l = fed.links().await;
        let fresh = l.iter().any(|x| x.from_worker == a.id && x.rtt_us == 2_500);
        (fresh && l.len() == 2).then_some(l)
    })
    .await;
    let from_b = seen.iter().find(|l| l.from_worker == b.id).unwrap();
    assert_eq!(from_b.rtt_us, 0, "{from_b:?}");
    assert!(from_b.error.contains("outside"), "{from_b:?}");
    // The coordinator still serves all three.
    assert_eq!(
        fed.workers()
            .await
            .iter()
            .filter(|w| w.state == "up")
            .count(),
        3
    );
}
