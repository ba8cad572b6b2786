//! A model whose placement names a worker that went down while no job ran is shown so, and
//! the next job replans it over the live workers instead of being refused.

use std::time::Duration;

use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, eventually, fleet, run_job};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_model_placed_on_a_dead_worker_replans_it() {
    let (fed, mut workers, tenant) = fleet(&[("ovh-fr", "FR"), ("ionos-de", "DE")], "q8_0").await;
    let placed = fed.place("smollm2", How::Stages(2)).await;
    let stages: Vec<String> = placed.chains[0]
        .stages
        .iter()
        .map(|s| s.worker_id.clone())
        .collect();
    assert_eq!(stages.len(), 2);

    // One worker stops while no job runs.
    let gone = workers.pop().unwrap();
    let gone_id = std::fs::read_to_string(gone.data_dir.join("identity.json")).unwrap();
    gone.stop().await.unwrap();
    let mut placements = pb::placements_client::PlacementsClient::new(fed.operator().await);
    let shown = eventually("its stage to show down", Duration::from_secs(20), || {
        let mut placements = placements.clone();
        let gone_id = gone_id.clone();
        async move {
            let p = placements
                .show_placement(pb::ShowPlacementRequest {
                    model: "smollm2".into(),
                })
                .await
                .ok()?
                .into_inner();
            p.chains[0]
                .stages
                .iter()
                .find(|s| {
                    gone_id.contains(&s.worker_id) && s.state == pb::AssignmentState::Down as i32
                })
                .cloned()
        }
    })
    .await;
    assert!(shown.message.contains("down"), "{shown:?}");

    // The next job replans over the live worker and runs.
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("What is the capital of France?", 4, 0.0, 0),
    )
    .await
    .expect("the job runs on the live worker");
    assert_eq!(out.tokens.len(), 4);
    assert!(out.stages.iter().all(|s| !gone_id.contains(&s.worker_id)));
    let now = placements
        .show_placement(pb::ShowPlacementRequest {
            model: "smollm2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(now.version > placed.version, "the model was replanned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_while_its_model_loads_waits_for_it() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR"), ("ionos-de", "DE")], "q8_0").await;
    pb::placements_client::PlacementsClient::new(fed.operator().await)
        .set_placement(pb::SetPlacementRequest {
            model: "smollm2".into(),
            how: Some(How::Stages(2)),
        })
        .await
        .unwrap();
    // At once, while the stages load their slices.
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("What is the capital of France?", 4, 0.0, 0),
    )
    .await
    .expect("the job waits for the stages and runs");
    assert_eq!(out.tokens.len(), 4);
    assert_eq!(out.stages.len(), 2);
}
