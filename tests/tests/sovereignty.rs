//! Sovereignty: jobs under mixed policies run only on workers their policy allows, and every
//! job's audit record says where each layer ran.

use std::collections::HashMap;

use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, fleet, run_job};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_jobs_under_mixed_policies_never_leave_their_countries() {
    let providers = [
        ("fr-a", "FR"),
        ("fr-b", "FR"),
        ("de-a", "DE"),
        ("nl-a", "NL"),
    ];
    let (fed, _workers, tenant) = fleet(&providers, "q8_0").await;
    // One-stage chains: every worker holds a replica of the whole model.
    let placement = fed.place("smollm2", How::Stages(1)).await;
    assert_eq!(placement.chains.len(), 4, "{placement:?}");
    let country_of: HashMap<String, String> = fed
        .workers()
        .await
        .into_iter()
        .map(|w| (w.id, w.country))
        .collect();
    let policies: [&[&str]; 5] = [&["FR"], &["DE"], &["FR", "DE"], &["NL", "DE"], &[]];
    let mut handles = Vec::new();
    for i in 0..50 {
        let countries: Vec<String> = policies[i % policies.len()]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let mut request = chat_request(&format!("Name a city, number {i}."), 4, 0.0, 0);
        request.policy = Some(pb::Policy {
            countries: countries.clone(),
            ..Default::default()
        });
        let channel = fed.channel(Some(&tenant)).await;
        handles.push(tokio::spawn(async move {
            (countries, run_job(channel, request).await)
        }));
    }
    let mut jobs = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await);
    for handle in handles {
        let (countries, result) = handle.await.unwrap();
        let out = result.unwrap();
        assert_eq!(out.tokens.len(), 4);
        let record = jobs
            .get_job(pb::JobRef {
                job_id: out.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(record.state, "done");
        assert!(!record.audit.is_empty());
        let mut covered = 0;
        for stage in &record.audit {
            assert_eq!(
                country_of[&stage.worker_id], stage.country,
                "the audit names the worker's real country"
            );
            assert!(
                countries.is_empty() || countries.contains(&stage.country),
                "{} ran in {} under {countries:?}",
                out.job_id,
                stage.country
            );
            assert_eq!(stage.start_layer, covered);
            covered = stage.end_layer;
        }
        assert_eq!(covered, 30, "the audit covers every layer");
    }
    // A policy no chain can meet is refused, naming what is missing.
    let mut request = chat_request("Hello", 4, 0.0, 0);
    request.policy = Some(pb::Policy {
        countries: vec!["IT".into()],
        ..Default::default()
    });
    let err = run_job(fed.channel(Some(&tenant)).await, request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("outside IT"), "{}", err.message());
    let mut request = chat_request("Hello", 4, 0.0, 0);
    request.policy = Some(pb::Policy {
        required_certifications: vec!["SecNumCloud".into()],
        ..Default::default()
    });
    let err = run_job(fed.channel(Some(&tenant)).await, request)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("lacks certification SecNumCloud"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_stays_inside_the_jobs_policy() {
    let providers = [
        ("fr-a", "FR"),
        ("nl-a", "NL"),
        ("fr-b", "FR"),
        ("de-a", "DE"),
    ];
    let (fed, workers, tenant) = fleet(&providers, "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let mut request = chat_request("Write a long story about the sea.", 60, 0.0, 0);
    request.policy = Some(pb::Policy {
        countries: vec!["FR".into()],
        ..Default::default()
    });
    let reference = run_job(fed.channel(Some(&tenant)).await, request.clone())
        .await
        .unwrap();
    let mut stream = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .run_job(request)
        .await
        .unwrap()
        .into_inner();
    let mut first_worker = String::new();
    let mut tokens = Vec::new();
    let mut workers: Vec<Option<sovra_tests::federation::TestWorker>> =
        workers.into_iter().map(Some).collect();
    while let Some(event) = stream.message().await.unwrap() {
        match event.kind {
            Some(pb::job_event::Kind::Started(s)) => first_worker = s.stages[0].worker_id.clone(),
            Some(pb::job_event::Kind::Token(t)) => {
                tokens.push(t.token_id);
                if tokens.len() == 10 {
                    // Stop the worker the job runs on: the job must move to the other FR worker.
                    let index = workers
                        .iter()
                        .position(|w| {
                            w.as_ref().is_some_and(|w| {
                                std::fs::read_to_string(w.data_dir.join("identity.json"))
                                    .unwrap()
                                    .contains(&first_worker)
                            })
                        })
                        .unwrap();
                    let victim = workers[index].take().unwrap();
                    victim.stop().await.unwrap();
                }
            }
            Some(pb::job_event::Kind::Summary(_)) => break,
            None => {}
        }
    }
    assert_eq!(tokens, reference.tokens, "the stream continued exactly");
    let record = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .get_job(pb::JobRef {
            job_id: reference.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, "done");
    let jobs = pb::jobs_client::JobsClient::new(fed.operator().await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let moved = jobs.iter().find(|j| j.job_id != reference.job_id).unwrap();
    assert_eq!(moved.state, "done");
    assert!(
        moved.audit.len() >= 2,
        "the audit lists both chains: {:?}",
        moved.audit
    );
    assert!(
        moved.audit.iter().all(|a| a.country == "FR"),
        "{:?}",
        moved.audit
    );
    assert_ne!(
        moved.audit[0].worker_id,
        moved.audit.last().unwrap().worker_id
    );
    // Each line says which chain it was and from which token that chain ran the job.
    let (first, last) = (&moved.audit[0], moved.audit.last().unwrap());
    assert_eq!(
        (first.attempt, first.from_token),
        (1, 0),
        "{:?}",
        moved.audit
    );
    assert!(last.attempt >= 2, "{:?}", moved.audit);
    assert!(
        (10..60).contains(&last.from_token),
        "the second chain took over after the 10th token: {:?}",
        moved.audit
    );
    assert!(
        moved
            .audit
            .windows(2)
            .all(|w| (w[0].attempt, w[0].from_token) <= (w[1].attempt, w[1].from_token)),
        "{:?}",
        moved.audit
    );
}
