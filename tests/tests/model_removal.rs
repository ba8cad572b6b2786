//! Removing a model: refused to tenants and while a job of it runs; afterwards its placement
//! is gone, jobs for it are refused, its past jobs' records stay, and it can be added again.

use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, fleet, run_job, smollm2_model, start_job};

fn remove(name: &str) -> pb::RemoveModelRequest {
    pb::RemoveModelRequest { name: name.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_removed_only_when_idle_and_can_come_back() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR"), ("ionos-de", "DE")], "q8_0").await;
    let first = fed.place("smollm2", How::Stages(2)).await;
    let request = chat_request("Name three rivers of Europe.", 6, 0.0, 0);
    let before = run_job(fed.channel(Some(&tenant)).await, request.clone())
        .await
        .unwrap();

    // A tenant may not remove a model.
    let refused = pb::models_client::ModelsClient::new(fed.channel(Some(&tenant)).await)
        .remove_model(remove("smollm2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // Not while a job of it runs: the refusal names the job.
    let mut long = chat_request("Write a long story about the sea.", 2000, 0.0, 0);
    long.sampling.as_mut().unwrap().ignore_eos = true;
    let (running, stream) = start_job(fed.channel(Some(&tenant)).await, long).await;
    let mut models = pb::models_client::ModelsClient::new(fed.operator().await);
    let busy = models.remove_model(remove("smollm2")).await.unwrap_err();
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains(&running), "{busy:?}");
    pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .cancel_job(pb::JobRef {
            job_id: running.clone(),
        })
        .await
        .unwrap();
    drop(stream);

    // Once idle, it goes, with its placement; its past jobs stay readable.
    let removed = models
        .remove_model(remove("smollm2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.name, "smollm2");
    let listed = models
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(listed.is_empty(), "{listed:?}");
    let shown = pb::placements_client::PlacementsClient::new(fed.operator().await)
        .show_placement(pb::ShowPlacementRequest {
            model: "smollm2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(shown.code(), tonic::Code::NotFound, "{shown:?}");
    let refused = run_job(fed.channel(Some(&tenant)).await, request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("smollm2"), "{refused:?}");
    let old = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .get_job(pb::JobRef {
            job_id: before.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.token_ids, before.tokens);
    let again = models.remove_model(remove("smollm2")).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");

    // Added again under the same name, it is placed and answers as before.
    models.add_model(smollm2_model("q8_0")).await.unwrap();
    let second = fed.place("smollm2", How::Stages(2)).await;
    // Its placements go on counting from the removed one's (a late report of an old slice
    // cannot pass for the new one).
    assert!(
        second.version > first.version + 1,
        "{} after {}",
        second.version,
        first.version
    );
    let after = run_job(fed.channel(Some(&tenant)).await, request)
        .await
        .unwrap();
    assert_eq!(after.tokens, before.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_left_without_its_model_does_not_keep_workers_out() {
    use sovra_coordinator::records::{PLACEMENTS, PlacementRecord, encode};
    use sovra_coordinator::store::Batch;
    let fed = sovra_tests::federation::TestFederation::start().await;
    // As a crash between writes could leave it: a placement naming a model that is gone.
    let orphan = PlacementRecord {
        model: "gone".into(),
        version: 3,
        ..Default::default()
    };
    fed.fed
        .store()
        .apply(Batch::new().put(PLACEMENTS, "gone", encode(&orphan)))
        .unwrap();
    fed.add_provider("ovh-fr", "FR", &[]).await;
    let _worker = fed.start_worker(Some(fed.join_token("ovh-fr", 600).await), None);
    sovra_tests::federation::eventually(
        "the worker to be up",
        std::time::Duration::from_secs(60),
        || async { fed.workers().await.into_iter().find(|w| w.state == "up") },
    )
    .await;
}
