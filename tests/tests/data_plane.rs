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
    let revoked = eventually(
        "the revocation to reach the stage",
        Duration::from_secs(10),
        || {
            let identity = rogue_identity.clone();
            let target = de.clone();
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
        },
    )
    .await;
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
