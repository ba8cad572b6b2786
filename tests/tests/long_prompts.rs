//! A prompt whose prefill takes longer than the coordinator's stall limit still finishes on its
//! first chain (each chunk a stage runs is progress), and a client that goes away during a
//! prefill has its job cancelled before any token exists.

use std::time::{Duration, Instant};

use sovra_coordinator::federation::FederationConfig;
use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{TestFederation, chat_request, eventually, fleet_in, run_job};

/// The stall limit of these tests: far shorter than the prefill of [`long_prompt`] on this
/// host, far longer than one 64-position chunk of it on one stage.
const STALL: Duration = Duration::from_millis(1500);

/// About 1,800 prompt tokens: ~28 chunks of 64 positions.
fn long_prompt() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(180)
}

async fn federation() -> (
    TestFederation,
    Vec<sovra_tests::federation::TestWorker>,
    String,
) {
    let fed = TestFederation::start_with(FederationConfig {
        heartbeat_interval: Duration::from_millis(200),
        lease: Duration::from_millis(1500),
        job_stall: STALL,
        ..FederationConfig::default()
    })
    .await;
    let (fed, workers, tenant) =
        fleet_in(fed, &[("ovh-fr", "FR"), ("ionos-de", "DE")], "q8_0").await;
    fed.place("smollm2", How::Stages(2)).await;
    (fed, workers, tenant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_longer_than_the_stall_limit_finishes_on_its_first_chain() {
    let (fed, _workers, tenant) = federation().await;
    let started = Instant::now();
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request(&long_prompt(), 4, 0.0, 0),
    )
    .await
    .expect("the job finishes");
    let took = started.elapsed();
    assert_eq!(out.tokens.len(), 4);
    assert!(
        took > STALL * 2,
        "the prefill took {took:?}: too short to show anything against a {STALL:?} stall limit"
    );
    let record = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .get_job(pb::JobRef {
            job_id: out.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        record.audit.len(),
        2,
        "the job was moved while its prompt ran: {:?}",
        record.audit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_the_prefill_cancels_its_job_before_any_token() {
    let (fed, _workers, tenant) = federation().await;
    let mut jobs = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await);
    let mut stream = jobs
        .run_job(chat_request(&long_prompt(), 4, 0.0, 0))
        .await
        .unwrap()
        .into_inner();
    let job_id = match stream.message().await.unwrap().and_then(|e| e.kind) {
        Some(pb::job_event::Kind::Started(s)) => s.job_id,
        other => panic!("expected the job to start, got {other:?}"),
    };
    drop(stream);
    let record = eventually("the job to be cancelled", Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        let job_id = job_id.clone();
        async move {
            let record = jobs.get_job(pb::JobRef { job_id }).await.ok()?.into_inner();
            (record.state != "running").then_some(record)
        }
    })
    .await;
    assert_eq!(record.state, "cancelled", "{record:?}");
    assert!(record.error.contains("client went away"), "{record:?}");
    assert!(
        record.token_ids.is_empty(),
        "a token came first: {record:?}"
    );
}
