//! The job list over gRPC stays usable however many jobs the federation ran: pages of at most
//! 1000 jobs, newest first, without their tokens and text, each page starting after the last
//! job of the one before; a tenant pages through its own jobs only.

use sovra_coordinator::jobs::{JOBS, JobRecord, JobState};
use sovra_coordinator::records::{PolicyRecord, encode};
use sovra_coordinator::store::Batch;
use sovra_proto::pb;
use sovra_tests::federation::TestFederation;
use tonic::Code;

const TOKENS: usize = 1500;

/// A finished job of `tenant` created at `ns`, with `TOKENS` generated tokens.
fn record(i: usize, tenant: &str, ns: u64) -> JobRecord {
    JobRecord {
        id: format!("job-{i:016x}"),
        tenant: tenant.into(),
        model: "smollm2".into(),
        state: JobState::Done,
        policy: PolicyRecord::default(),
        prompt_tokens: 12,
        prompt_ids: vec![1; 12],
        token_ids: (0..TOKENS as u32).map(|t| 1000 + t).collect(),
        text: "word ".repeat(TOKENS),
        finish_reason: Some("length".into()),
        error: None,
        audit: vec![],
        created_unix: ns / 1_000_000_000,
        created_ns: ns,
        finished_unix: ns / 1_000_000_000 + 1,
    }
}

async fn page(
    client: &mut pb::jobs_client::JobsClient<sovra_proto::channel::AuthChannel>,
    limit: u32,
    before: &str,
) -> Result<pb::ListJobsResponse, tonic::Status> {
    client
        .list_jobs(pb::ListJobsRequest {
            limit,
            before: before.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_jobs_list_in_pages_newest_first() {
    let fed = TestFederation::start().await;
    let acme = pb::tenants_client::TenantsClient::new(fed.operator().await)
        .add_tenant(pb::AddTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // 1,200 finished jobs (every fifth of another tenant), ~20 MB of records: far past what
    // one gRPC message may carry. Ids do not follow creation order.
    let base = 1_800_000_000_000_000_000u64;
    let mut batch = Batch::new();
    for i in 0..1200usize {
        let tenant = if i % 5 == 0 { "globex" } else { "acme" };
        let id_order = (i * 7919) % 1200;
        let job = record(id_order, tenant, base + i as u64 * 1_000_000);
        batch = batch.put(JOBS, &job.id, encode(&job));
    }
    fed.fed.store().apply(batch).unwrap();
    fed.fed.store().flush().unwrap();
    let newest_first = |tenant: Option<&str>| -> Vec<String> {
        (0..1200usize)
            .rev()
            .filter(|i| tenant.is_none_or(|t| (if i % 5 == 0 { "globex" } else { "acme" }) == t))
            .map(|i| format!("job-{:016x}", (i * 7919) % 1200))
            .collect()
    };

    // The operator's first page: the 50 newest, without tokens or text.
    let mut operator = pb::jobs_client::JobsClient::new(fed.operator().await);
    let first = page(&mut operator, 0, "").await.unwrap();
    let ids: Vec<String> = first.jobs.iter().map(|j| j.job_id.clone()).collect();
    assert_eq!(ids, newest_first(None)[..50]);
    assert!(first.more);
    for j in &first.jobs {
        assert_eq!(j.generated_tokens as usize, TOKENS);
        assert!(j.token_ids.is_empty() && j.text.is_empty());
        assert_eq!(j.state, "done");
    }

    // A tenant pages through exactly its own jobs, in order, 1000 at a time.
    let mut tenant = pb::jobs_client::JobsClient::new(fed.channel(Some(&acme)).await);
    let mut seen = Vec::new();
    let mut before = String::new();
    loop {
        let p = page(&mut tenant, 1000, &before).await.unwrap();
        seen.extend(p.jobs.iter().map(|j| j.job_id.clone()));
        assert!(p.jobs.iter().all(|j| j.tenant == "acme"));
        if !p.more {
            break;
        }
        before = seen.last().unwrap().clone();
    }
    assert_eq!(seen, newest_first(Some("acme")));

    // One job in full still carries its tokens.
    let full = operator
        .get_job(pb::JobRef {
            job_id: seen[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.token_ids.len(), TOKENS);
    assert_eq!(full.generated_tokens as usize, TOKENS);

    // Bad pages are refused with reasons.
    let too_many = page(&mut operator, 1001, "").await.unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument, "{too_many:?}");
    assert!(too_many.message().contains("1000"), "{too_many:?}");
    let unknown = page(&mut operator, 10, "job-nothing").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let others = newest_first(Some("globex"))[0].clone();
    let hidden = page(&mut tenant, 10, &others).await.unwrap_err();
    assert_eq!(
        hidden.code(),
        Code::NotFound,
        "another tenant's job is not a cursor"
    );
}
