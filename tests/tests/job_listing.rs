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
        progress_unix: 0,
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

const BASE_NS: u64 = 1_800_000_000_000_000_000;

fn tenant_of(i: usize) -> &'static str {
    if i.is_multiple_of(5) {
        "globex"
    } else {
        "acme"
    }
}

/// Job `i` of the history: ids do not follow creation order; job 0 is a record of before
/// creation times had nanoseconds (`created_ns` 0: it is the oldest), jobs 1 and 2 were created
/// in the same nanosecond.
fn job(i: usize) -> JobRecord {
    let mut job = record(
        (i * 7919) % 1200,
        tenant_of(i),
        BASE_NS + i as u64 * 1_000_000,
    );
    match i {
        0 => job.created_ns = 0,
        2 => job.created_ns = BASE_NS + 1_000_000,
        _ => {}
    }
    job
}

/// 1,200 finished jobs (every fifth of another tenant), ~20 MB of records: far past what one
/// gRPC message may carry; each with its entries in the job-order index.
fn history() -> Batch {
    (0..1200).map(job).fold(Batch::new(), |batch, job| {
        job.index(batch.put(JOBS, &job.id, encode(&job)))
    })
}

/// The history's ids, newest first (the two of one nanosecond by id).
fn newest_first(tenant: Option<&str>) -> Vec<String> {
    let mut jobs: Vec<JobRecord> = (0..1200)
        .filter(|&i| tenant.is_none_or(|t| tenant_of(i) == t))
        .map(job)
        .collect();
    let ns = |j: &JobRecord| {
        if j.created_ns > 0 {
            j.created_ns
        } else {
            j.created_unix * 1_000_000_000
        }
    };
    jobs.sort_by(|a, b| ns(b).cmp(&ns(a)).then(a.id.cmp(&b.id)));
    jobs.into_iter().map(|j| j.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_jobs_list_in_pages_newest_first() {
    let fed = TestFederation::start().await;
    let acme = pb::tenants_client::TenantsClient::new(fed.operator().await)
        .add_tenant(pb::AddTenantRequest {
            name: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    fed.fed.store().apply(history()).unwrap();
    fed.fed.store().flush().unwrap();

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
        let p = page(&mut tenant, 100, &before).await.unwrap();
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

#[test]
fn jobs_recorded_before_the_index_are_indexed_at_the_next_start() {
    use sovra_coordinator::datadir::DataDir;
    use sovra_coordinator::federation::{Caller, Federation, FederationConfig};
    use sovra_coordinator::store::{MemoryStore, Store};
    use std::sync::Arc;
    sovra_tests::federation::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    // Records only, as a coordinator without the index left them.
    let records = (0..1200).map(job).fold(Batch::new(), |batch, job| {
        batch.put(JOBS, &job.id, encode(&job))
    });
    store.apply(records).unwrap();
    let data = DataDir {
        root: dir.path().to_path_buf(),
    };
    let fed = Federation::open(&data, store, FederationConfig::default()).unwrap();
    let acme = Caller::Tenant("acme".into());
    let first = fed.list_jobs(&acme, 30, None).unwrap();
    let ids: Vec<String> = first.jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids, newest_first(Some("acme"))[..30]);
    let all = fed.list_jobs(&Caller::Operator, 1000, None).unwrap();
    assert!(all.more);
    let rest = fed
        .list_jobs(&Caller::Operator, 1000, Some(&all.jobs[999].id))
        .unwrap();
    assert!(!rest.more);
    let mut every: Vec<String> = all.jobs.iter().map(|j| j.id.clone()).collect();
    every.extend(rest.jobs.iter().map(|j| j.id.clone()));
    assert_eq!(every, newest_first(None));
}
