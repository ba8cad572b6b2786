//! Revoking a tenant stops its token at once and cancels its running jobs; a new token lets
//! it back in with its job history; its old token stays dead.

use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{chat_request, fleet, run_job, start_job};
use tonic::Code;

fn named(name: &str) -> pb::TenantRef {
    pb::TenantRef { name: name.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_tenant_is_locked_out_and_a_new_token_lets_it_back() {
    let (fed, _workers, acme) = fleet(&[("ovh-fr", "FR")], "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let mut tenants = pb::tenants_client::TenantsClient::new(fed.operator().await);
    let done = run_job(
        fed.channel(Some(&acme)).await,
        chat_request("Say hello.", 3, 0.0, 0),
    )
    .await
    .unwrap();

    // Only the operator may revoke.
    let refused = pb::tenants_client::TenantsClient::new(fed.channel(Some(&acme)).await)
        .revoke_tenant(named("acme"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A job of the tenant is running when it is revoked: it is cancelled, saying why.
    let (running, mut stream) = start_job(
        fed.channel(Some(&acme)).await,
        chat_request("Write a long story about the sea.", 2000, 0.0, 0),
    )
    .await;
    let revoked = tenants
        .revoke_tenant(named("acme"))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert!(ended.message().contains("revoked"), "{ended:?}");
    assert_eq!(ended.code(), Code::Cancelled, "{ended:?}");
    let mut jobs = pb::jobs_client::JobsClient::new(fed.operator().await);
    let cut = jobs
        .get_job(pb::JobRef {
            job_id: running.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cut.state, "cancelled");
    assert!(cut.error.contains("revoked"), "{cut:?}");

    // Its token no longer works, with a reason.
    let locked = pb::jobs_client::JobsClient::new(fed.channel(Some(&acme)).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(locked.code(), Code::Unauthenticated, "{locked:?}");
    assert!(locked.message().contains("revoked"), "{locked:?}");
    let listed = tenants
        .list_tenants(pb::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert!(listed.iter().any(|t| t.name == "acme" && t.revoked));

    // A new token lets it back in, with its jobs; the old one stays dead.
    let fresh = tenants
        .rotate_tenant_token(named("acme"))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_ne!(fresh, acme);
    let mine: Vec<String> = pb::jobs_client::JobsClient::new(fed.channel(Some(&fresh)).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(mine, [running, done.job_id]);
    let old = pb::jobs_client::JobsClient::new(fed.channel(Some(&acme)).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated, "{old:?}");

    let unknown = tenants.revoke_tenant(named("nobody")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    tenants.revoke_tenant(named("acme")).await.unwrap();
    let twice = tenants.revoke_tenant(named("acme")).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition, "{twice:?}");
    assert!(twice.message().contains("already revoked"), "{twice:?}");
    let operator = tenants.revoke_tenant(named("operator")).await.unwrap_err();
    assert_eq!(operator.code(), Code::InvalidArgument, "{operator:?}");
    assert!(operator.message().contains("rotate-token"), "{operator:?}");
    // The name the operator's jobs are recorded under is not a tenant's to take.
    let reserved = tenants
        .add_tenant(pb::AddTenantRequest {
            name: "operator".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reserved.code(), Code::InvalidArgument, "{reserved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_runs_at_most_its_limit_of_jobs_at_once() {
    let (fed, _workers, acme) = fleet(&[("ovh-fr", "FR")], "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let mut tenants = pb::tenants_client::TenantsClient::new(fed.operator().await);
    let solo = tenants
        .add_tenant(pb::AddTenantRequest {
            name: "solo".into(),
            max_running_jobs: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let limit = |name: &str, max_running_jobs| pb::SetTenantLimitRequest {
        name: name.into(),
        max_running_jobs,
    };
    let short = || chat_request("Say hello.", 3, 0.0, 0);
    let refusal = |err: tonic::Status, limit: u32| {
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("its limit at once is {limit}")),
            "{}",
            err.message()
        );
    };

    // One long job: a second is refused, not queued; other tenants are not held to it.
    let (long_id, _long) = start_job(
        fed.channel(Some(&solo)).await,
        chat_request("Tell me a long story.", 100_000, 0.0, 0),
    )
    .await;
    refusal(
        run_job(fed.channel(Some(&solo)).await, short())
            .await
            .unwrap_err(),
        1,
    );
    let other = run_job(fed.channel(Some(&acme)).await, short())
        .await
        .unwrap();
    assert_eq!(other.tokens.len(), 3);

    // Raised, the second runs beside the first; lowered again, the first goes on and a new
    // one is refused.
    let raised = tenants
        .set_tenant_limit(limit("solo", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (raised.max_running_jobs, raised.own_max_running_jobs),
        (2, 2)
    );
    let second = run_job(fed.channel(Some(&solo)).await, short())
        .await
        .unwrap();
    assert_eq!(second.tokens.len(), 3);
    tenants.set_tenant_limit(limit("solo", 1)).await.unwrap();
    refusal(
        run_job(fed.channel(Some(&solo)).await, short())
            .await
            .unwrap_err(),
        1,
    );
    // Once the long job ends, the next one runs.
    pb::jobs_client::JobsClient::new(fed.channel(Some(&solo)).await)
        .cancel_job(pb::JobRef { job_id: long_id })
        .await
        .unwrap();
    let third = run_job(fed.channel(Some(&solo)).await, short())
        .await
        .unwrap();
    assert_eq!(third.tokens.len(), 3);

    // 0 gives it the coordinator's default back; only the operator sets limits, within reason.
    let back = tenants
        .set_tenant_limit(limit("solo", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((back.max_running_jobs, back.own_max_running_jobs), (64, 0));
    let denied = pb::tenants_client::TenantsClient::new(fed.channel(Some(&solo)).await)
        .set_tenant_limit(limit("solo", 1000))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let absurd = tenants
        .set_tenant_limit(limit("solo", 10_000_000))
        .await
        .unwrap_err();
    assert_eq!(absurd.code(), Code::InvalidArgument, "{absurd:?}");
    let missing = tenants
        .set_tenant_limit(limit("nobody", 1))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}
