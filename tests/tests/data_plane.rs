//! Peer identity on the data plane: only the workers a session names may send it frames,
//! certificates from another CA cannot connect, revoked providers' workers are cut off.

use std::net::SocketAddr;
use std::time::Duration;

use sovra_proto::ca::{FederationCa, generate_worker_key_and_csr};
use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, eventually, fleet, run_job};
use sovra_worker::frame::{Frame, write_frame};
use sovra_worker::quic::{self, TlsIdentity};

fn identity_of(dir: &std::path::Path) -> TlsIdentity {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    TlsIdentity {
        cert_pem: read("worker.pem"),
        key_pem: read("worker-key.pem"),
        ca_pem: read("ca.pem"),
    }
}

fn frame() -> Frame {
    Frame::Activations {
        session: 12345,
        start_pos: 0,
        rows: 1,
        hidden: 576,
        sample: false,
        data: vec![0.0; 576],
    }
}

/// Sends one frame to `target` as `identity` and returns how the connection ended.
async fn send_one(
    identity: &TlsIdentity,
    target: &pb::Worker,
) -> Result<quinn::ConnectionError, String> {
    let endpoint =
        quic::endpoint("127.0.0.1:0".parse().unwrap(), identity).map_err(|e| e.to_string())?;
    let addr: SocketAddr = target.advertise_addr.parse().unwrap();
    let conn = quic::connect(&endpoint, addr, &target.id, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    if let Ok(mut stream) = conn.open_uni().await {
        let _ = write_frame(&mut stream, &frame()).await;
        let _ = stream.finish();
    }
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .map_err(|_| "the connection stayed open".to_string())
}

/// Waits until `target` closes connections from `identity` as revoked; returns the close.
async fn refused_as_revoked(
    identity: &TlsIdentity,
    target: &pb::Worker,
    what: &str,
) -> quinn::ApplicationClose {
    eventually(what, Duration::from_secs(10), || {
        let identity = identity.clone();
        let target = target.clone();
        async move {
            match send_one(&identity, &target).await {
                Ok(quinn::ConnectionError::ApplicationClosed(close))
                    if close.error_code == quic::CODE_REVOKED.into() =>
                {
                    Some(close)
                }
                _ => None,
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_named_peers_with_federation_certificates_reach_a_stage() {
    let (fed, workers, tenant) = fleet(
        &[
            ("ovh-fr", "FR"),
            ("ionos-de", "DE"),
            ("scw-nl", "NL"),
            ("rogue-it", "IT"),
        ],
        "q8_0",
    )
    .await;
    let all = fed.workers().await;
    let id = |p: &str| all.iter().find(|w| w.provider == p).unwrap().clone();
    let (fr, de, nl, rogue) = (id("ovh-fr"), id("ionos-de"), id("scw-nl"), id("rogue-it"));
    let stages = [
        (fr.id.clone(), 0, 10),
        (de.id.clone(), 10, 20),
        (nl.id.clone(), 20, 30),
    ];
    fed.place(
        "smollm2",
        How::Explicit(pb::ExplicitChain {
            stages: stages
                .iter()
                .map(|(w, a, b)| pb::StageAssignment {
                    worker_id: w.clone(),
                    start_layer: *a,
                    end_layer: *b,
                })
                .collect(),
        }),
    )
    .await;
    let rogue_dir = workers
        .iter()
        .find(|w| {
            std::fs::read_to_string(w.data_dir.join("identity.json"))
                .unwrap()
                .contains(&rogue.id)
        })
        .unwrap()
        .data_dir
        .clone();
    let rogue_identity = identity_of(&rogue_dir);

    // A certified worker that no session names: its frame is refused and its connection closed.
    let closed = send_one(&rogue_identity, &de).await.unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quic::CODE_UNEXPECTED_FRAME.into());
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(
                reason.contains("refused") && reason.contains(&rogue.id),
                "{reason}"
            );
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    // A certificate from another CA cannot connect at all.
    let other_ca = FederationCa::generate("elsewhere").unwrap();
    let (key_pem, csr_pem) = generate_worker_key_and_csr("imposter").unwrap();
    let cert_pem = other_ca
        .sign_worker_csr(&csr_pem, &rogue.id, "rogue-it", &["127.0.0.1".into()], 1)
        .unwrap();
    let foreign = TlsIdentity {
        cert_pem,
        key_pem,
        ca_pem: fed.ca_pem.clone(),
    };
    match send_one(&foreign, &de).await {
        Err(_) => {}
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            panic!("a foreign certificate reached the application: {close:?}")
        }
        Ok(_) => {}
    }

    // The stage keeps serving the federation.
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Hello!", 8, 0.0, 0),
    )
    .await
    .unwrap();
    assert_eq!(out.tokens.len(), 8);

    // Once its provider is revoked, the worker is refused at the connection.
    pb::providers_client::ProvidersClient::new(fed.operator().await)
        .revoke_provider(pb::RevokeProviderRequest {
            name: "rogue-it".into(),
        })
        .await
        .unwrap();
    let revoked =
        refused_as_revoked(&rogue_identity, &de, "the revocation to reach the stage").await;
    assert!(String::from_utf8_lossy(&revoked.reason).contains("revoked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_frames_close_the_connection_and_the_stage_keeps_serving() {
    let (fed, workers, tenant) = fleet(&[("ovh-fr", "FR"), ("ionos-de", "DE")], "q8_0").await;
    fed.place("smollm2", How::Stages(2)).await;
    let all = fed.workers().await;
    let (fr, de) = (
        all.iter().find(|w| w.provider == "ovh-fr").unwrap(),
        all.iter().find(|w| w.provider == "ionos-de").unwrap(),
    );
    let fr_dir = workers
        .iter()
        .find(|w| {
            std::fs::read_to_string(w.data_dir.join("identity.json"))
                .unwrap()
                .contains(&fr.id)
        })
        .unwrap()
        .data_dir
        .clone();
    let identity = identity_of(&fr_dir);
    // Garbage, an oversized declaration, a wrong dtype: each closes the connection with the
    // malformed-frame code, from a peer that is otherwise legitimate.
    let mut oversized = 0x7fff_ffffu32.to_le_bytes().to_vec();
    oversized.extend_from_slice(b"SVF1");
    let mut wrong_dtype = sovra_worker::frame::encode(&frame());
    let dtype_at = 4 + 4 + 1 + 8 + 4 + 4 + 4 + 1;
    wrong_dtype[dtype_at] = 7;
    for bytes in [
        b"\x10\x00\x00\x00not a frame at all".to_vec(),
        oversized,
        wrong_dtype,
    ] {
        let endpoint = quic::endpoint("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
        let conn = quic::connect(
            &endpoint,
            de.advertise_addr.parse().unwrap(),
            &de.id,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        let _ = stream.write_all(&bytes).await;
        let _ = stream.finish();
        match tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .unwrap()
        {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, quic::CODE_MALFORMED_FRAME.into());
            }
            other => panic!("expected a malformed-frame close, got {other:?}"),
        }
    }
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Hello!", 8, 0.0, 0),
    )
    .await
    .unwrap();
    assert_eq!(out.tokens.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_worker_is_cut_off_and_its_job_moves_on() {
    let (fed, mut workers, tenant) = fleet(
        &[("ovh-fr", "FR"), ("ionos-de", "DE"), ("scw-nl", "NL")],
        "q8_0",
    )
    .await;
    fed.place("smollm2", How::Stages(2)).await;
    let request = chat_request("Write a long story about the sea.", 40, 0.0, 0);
    let reference = run_job(fed.channel(Some(&tenant)).await, request.clone())
        .await
        .unwrap();

    // A tenant may not revoke a worker.
    let mut operator = pb::workers_client::WorkersClient::new(fed.operator().await);
    let refused = pb::workers_client::WorkersClient::new(fed.channel(Some(&tenant)).await)
        .revoke_worker(pb::RevokeWorkerRequest {
            worker_id: reference.stages[1].worker_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // The tail of a running job is revoked after its 5th token: the job goes on elsewhere and
    // gives the same tokens.
    let (job_id, mut stream) =
        sovra_tests::federation::start_job(fed.channel(Some(&tenant)).await, request).await;
    let victim = reference.stages[1].worker_id.clone();
    let mut tokens = Vec::new();
    let mut moved = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.kind {
            Some(pb::job_event::Kind::Started(s)) => moved = Some(s.stages),
            Some(pb::job_event::Kind::Token(t)) => {
                tokens.push(t.token_id);
                if tokens.len() == 5 {
                    let shown = operator
                        .revoke_worker(pb::RevokeWorkerRequest {
                            worker_id: victim.clone(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(shown.state, "revoked");
                }
            }
            Some(pb::job_event::Kind::Summary(_)) => break,
            _ => {}
        }
    }
    assert_eq!(tokens, reference.tokens, "the stream went on exactly");
    // Its provider no longer counts it.
    let providers = fed.providers().await;
    let of_victim = providers
        .iter()
        .find(|p| p.name == reference.stages[1].provider)
        .unwrap();
    assert_eq!(of_victim.worker_count, 0, "{of_victim:?}");
    // The client was told where its job went.
    let moved = moved.expect("a second start event");
    assert!(
        moved
            .iter()
            .all(|st| st.attempt >= 2 && st.worker_id != victim && st.from_token >= 5),
        "{moved:?}"
    );
    let audit = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .get_job(pb::JobRef { job_id })
        .await
        .unwrap()
        .into_inner()
        .audit;
    let last = audit.iter().map(|a| a.attempt).max().unwrap();
    assert!(last >= 2, "the job moved to another chain: {audit:?}");
    assert!(
        audit
            .iter()
            .filter(|a| a.attempt == last)
            .all(|a| a.worker_id != victim && a.from_token >= 5),
        "{audit:?}"
    );
    let listed = fed.workers().await;
    let state = |id: &str| listed.iter().find(|w| w.id == id).unwrap().state.clone();
    assert_eq!(state(&victim), "revoked");
    assert!(
        listed.iter().filter(|w| w.state == "up").count() == 2,
        "its provider's standing and the other workers are untouched: {listed:?}"
    );

    // The revoked worker stops, refused, and its certificate opens no stage any more.
    let index = workers
        .iter()
        .position(|w| {
            std::fs::read_to_string(w.data_dir.join("identity.json"))
                .unwrap()
                .contains(&victim)
        })
        .unwrap();
    let identity = identity_of(&workers[index].data_dir);
    let ended = workers[index]
        .finished(Duration::from_secs(30))
        .await
        .expect("the revoked worker stops");
    let message = ended.unwrap_err().to_string();
    assert!(message.contains("revoked"), "{message}");
    let target = listed.iter().find(|w| w.state == "up").unwrap().clone();
    let closed = refused_as_revoked(&identity, &target, "the stage to refuse it").await;
    assert!(String::from_utf8_lossy(&closed.reason).contains("revoked"));
    // A worker that starts after the revocation refuses it too (the coordinator tells it).
    fed.add_provider("newcomer-be", "BE", &["ISO27001"]).await;
    let _newcomer = fed.start_worker(Some(fed.join_token("newcomer-be", 600).await), None);
    let newcomer = eventually("the newcomer to be up", Duration::from_secs(60), || async {
        fed.workers()
            .await
            .into_iter()
            .find(|w| w.provider == "newcomer-be" && w.state == "up")
    })
    .await;
    // (Within moments: the worker is listed up before it has read its welcome.)
    refused_as_revoked(&identity, &newcomer, "the newcomer to refuse it").await;
    let again = operator
        .revoke_worker(pb::RevokeWorkerRequest {
            worker_id: "no-such-worker".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    let twice = operator
        .revoke_worker(pb::RevokeWorkerRequest {
            worker_id: victim.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition, "{twice:?}");
}
