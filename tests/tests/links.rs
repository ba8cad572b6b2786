//! Round trips between workers: measured over real QUIC connections (one worker behind a relay
//! that delays its datagrams, as a far datacenter would), reported to the coordinator, shown
//! to the operator, and weighed by the planner.

use std::net::SocketAddr;
use std::time::Duration;

use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{TestFederation, eventually, run_job, smollm2_model};
use sovra_tests::relay::DelayRelay;

/// Each way through the relay.
const DELAY: Duration = Duration::from_millis(100);

/// A free UDP port of the loopback interface.
fn free_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_far_worker_is_measured_and_left_out_of_the_first_chain() {
    let fed = TestFederation::start().await;
    let mut workers = Vec::new();
    for name in ["near-a", "near-b", "near-c"] {
        fed.add_provider(name, "FR", &["ISO27001"]).await;
        workers.push(fed.start_worker(Some(fed.join_token(name, 600).await), None));
    }
    // The far worker's peers reach its data plane through the relay only.
    fed.add_provider("far-d", "FR", &["ISO27001"]).await;
    let listen = free_port();
    let relay = DelayRelay::start(listen, DELAY).await;
    let token = fed.join_token("far-d", 600).await;
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let advertise = Some(relay.addr.to_string());
    workers.push(fed.start_worker_at(dir, Some(token), None, listen, advertise));
    fed.wait_for_workers_up(4).await;
    let all = fed.workers().await;
    let far = all
        .iter()
        .find(|w| w.provider == "far-d")
        .expect("far worker");
    assert_eq!(far.advertise_addr, relay.addr.to_string());

    // Every worker measures every other one as soon as it is named to it.
    let measured = eventually("every link measured", Duration::from_secs(60), || async {
        let l = fed.links().await;
        (l.len() == 12).then_some(l)
    })
    .await;
    for link in &measured {
        assert!(link.error.is_empty(), "{link:?}");
        let rtt = Duration::from_micros(link.rtt_us);
        if link.to_worker == far.id {
            // Through the relay: its delay both ways, and not seconds more.
            assert!(rtt >= 2 * DELAY, "{link:?}");
            assert!(rtt < 2 * DELAY + Duration::from_secs(2), "{link:?}");
        } else {
            // Loopback (the far worker dials the others directly).
            assert!(rtt < DELAY, "{link:?}");
        }
    }

    // Two stages a chain: the first chain (the one a lone job gets) keeps clear of the far
    // worker (every link into it costs 100 ms, far beyond what the workers' speeds differ
    // by), which serves in the replica.
    pb::models_client::ModelsClient::new(fed.operator().await)
        .add_model(smollm2_model("q8_0"))
        .await
        .expect("add model");
    let placement = fed.place("smollm2", How::Stages(2)).await;
    assert_eq!(placement.chains.len(), 2, "{placement:?}");
    let ids = |c: &pb::PlacementChain| -> Vec<String> {
        c.stages.iter().map(|s| s.worker_id.clone()).collect()
    };
    assert!(
        !ids(&placement.chains[0]).contains(&far.id),
        "{placement:?}"
    );
    assert!(ids(&placement.chains[1]).contains(&far.id), "{placement:?}");
    // The placement shows what each chain's links take: the far worker's ring its delay.
    let (near_ring, far_ring) = (&placement.chains[0], &placement.chains[1]);
    assert!(
        near_ring.ring_measured && far_ring.ring_measured,
        "{placement:?}"
    );
    assert!(
        near_ring.ring_ms < DELAY.as_secs_f64() * 1e3,
        "{placement:?}"
    );
    assert!(
        far_ring.ring_ms >= DELAY.as_secs_f64() * 1e3,
        "{placement:?}"
    );

    let tenant = fed.add_tenant("acme").await;
    let job = run_job(
        fed.channel(Some(&tenant)).await,
        pb::RunJobRequest {
            model: "smollm2".into(),
            prompt: "Name a lighthouse.".into(),
            sampling: Some(pb::Sampling {
                max_tokens: 4,
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .expect("job");
    assert_eq!(job.tokens.len(), 4);
    assert!(
        job.stages.iter().all(|s| s.worker_id != far.id),
        "{:?}",
        job.stages
    );
    drop(relay);
}
