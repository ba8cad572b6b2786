//! Placements heal: a model planned around a failed worker is placed as the operator asked
//! again once the worker is back (beside its running jobs, which go on on the stages they
//! hold, or once they end where the new placement does not fit beside them), and a model
//! registered before any worker could hold it is placed once workers join.

use std::collections::HashMap;
use std::time::Duration;

use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{
    JobOutput, TestFederation, TestWorker, chat_request, eventually, fleet, fleet_in, run_job,
    smollm2_model, start_job,
};

const WAIT: Duration = Duration::from_secs(60);

/// A federation of three providers (FR, DE, NL) with a worker each, SmolLM2 registered in
/// q8_0, and a tenant's token.
async fn three_providers() -> (TestFederation, Vec<TestWorker>, String) {
    fleet(
        &[("ovh-fr", "FR"), ("ionos-de", "DE"), ("scw-nl", "NL")],
        "q8_0",
    )
    .await
}

async fn show(fed: &TestFederation) -> pb::Placement {
    fed.placement("smollm2").await
}

fn workers_of(p: &pb::Placement) -> Vec<String> {
    p.chains
        .iter()
        .flat_map(|c| &c.stages)
        .map(|s| s.worker_id.clone())
        .collect()
}

/// Reads a running job's stream until `tokens` holds `count` tokens.
async fn read_tokens(
    stream: &mut tonic::Streaming<pb::JobEvent>,
    tokens: &mut Vec<u32>,
    count: usize,
) {
    while let Some(event) = stream.message().await.expect("the job's stream") {
        match event.kind {
            Some(pb::job_event::Kind::Token(t)) => {
                tokens.push(t.token_id);
                if tokens.len() >= count {
                    return;
                }
            }
            Some(pb::job_event::Kind::Summary(s)) => panic!("the job ended: {s:?}"),
            _ => {}
        }
    }
    panic!("the job's stream ended");
}

/// An explicit chain of (worker, first layer, one past the last).
fn explicit(stages: &[(&String, u32, u32)]) -> How {
    How::Explicit(pb::ExplicitChain {
        stages: stages
            .iter()
            .map(|(w, start_layer, end_layer)| pb::StageAssignment {
                worker_id: w.to_string(),
                start_layer: *start_layer,
                end_layer: *end_layer,
            })
            .collect(),
    })
}

/// The id of the worker of data dir `dir`, which holds a stage of `placement`.
fn id_in(dir: &std::path::Path, placement: &pb::Placement) -> String {
    let identity = std::fs::read_to_string(dir.join("identity.json")).unwrap();
    workers_of(placement)
        .into_iter()
        .find(|w| identity.contains(w.as_str()))
        .expect("the worker holds a stage")
}

/// The worker `stop_one` stopped.
struct Away {
    dir: std::path::PathBuf,
    id: String,
}

/// Stops the last of `workers`, which holds a stage of `asked` (a 3-stage placement), and
/// runs a greedy job of `prompt`, which replans the model around it (two workers cannot give
/// three stages): degraded, the request kept. Returns that worker and the job's output.
async fn stop_one(
    fed: &TestFederation,
    workers: &mut Vec<TestWorker>,
    asked: &pb::Placement,
    tenant: &str,
    prompt: &str,
) -> (Away, JobOutput) {
    let away = workers.pop().unwrap();
    let dir = away.data_dir.clone();
    let id = id_in(&dir, asked);
    away.stop().await.unwrap();
    let around = run_job(
        fed.channel(Some(tenant)).await,
        chat_request(prompt, 12, 0.0, 0),
    )
    .await
    .expect("the job runs around the stopped worker");
    let degraded = show(fed).await;
    assert!(degraded.degraded, "{degraded:?}");
    assert_eq!(degraded.requested, "3 stages", "the request is kept");
    assert!(!workers_of(&degraded).contains(&id));
    assert!(!degraded.not_as_asked.is_empty(), "{degraded:?}");
    (Away { dir, id }, around)
}

/// Per worker, the memory of the stages of `placements`, a stage that several of them hold
/// (same worker, same layers) counted once.
fn stage_memory(placements: &[&pb::Placement]) -> HashMap<String, u64> {
    let mut seen = std::collections::HashSet::new();
    let mut held = HashMap::new();
    for s in placements
        .iter()
        .flat_map(|p| p.chains.iter().flat_map(|c| &c.stages))
    {
        if seen.insert((s.worker_id.clone(), s.start_layer, s.end_layer)) {
            *held.entry(s.worker_id.clone()).or_default() += s.memory_bytes;
        }
    }
    held
}

/// Per worker holding any, the memory `worker list` says its stages take.
async fn held_memory(fed: &TestFederation) -> HashMap<String, u64> {
    fed.workers()
        .await
        .into_iter()
        .filter(|w| w.held_memory_bytes > 0)
        .map(|w| (w.id, w.held_memory_bytes))
        .collect()
}

fn all_ready(p: &pb::Placement) -> bool {
    !p.chains.is_empty()
        && p.chains
            .iter()
            .flat_map(|c| &c.stages)
            .all(|s| s.state == pb::AssignmentState::Ready as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_planned_around_a_failed_worker_is_placed_as_asked_when_it_returns() {
    let (fed, mut workers, tenant) = three_providers().await;
    let asked = fed.place("smollm2", How::Stages(3)).await;
    assert_eq!(asked.requested, "3 stages");
    assert!(!asked.degraded);

    let prompt = "Name three rivers of Europe.";
    let (away, around) = stop_one(&fed, &mut workers, &asked, &tenant, prompt).await;
    let (away_dir, away_id) = (away.dir, away.id);
    let degraded = show(&fed).await;

    // A long job runs on the degraded placement while the worker comes back.
    let (long_id, mut long_stream) = start_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Tell me a long story.", 100_000, 0.0, 0),
    )
    .await;
    let back = fed.start_worker_in(away_dir, None, None);
    eventually("the worker to be up again", WAIT, || async {
        fed.workers()
            .await
            .iter()
            .any(|w| w.id == away_id && w.state == "up")
            .then_some(())
    })
    .await;
    // Once the fleet has stayed the same for a lease, the model is placed as asked again, on
    // the returned worker too, while the long job goes on on the stages it holds.
    let restored = eventually("the placement as asked, ready", WAIT, || async {
        let p = show(&fed).await;
        (!p.degraded && all_ready(&p)).then_some(p)
    })
    .await;
    assert!(restored.version > degraded.version);
    assert_eq!(restored.chains[0].stages.len(), 3, "{restored:?}");
    assert!(workers_of(&restored).contains(&away_id), "{restored:?}");
    // The long job goes on after the heal (its record, written every second, grows), and
    // the stages it runs on still count on their workers, beside the new ones.
    let mut jobs = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await);
    let generated = async |jobs: &mut pb::jobs_client::JobsClient<_>| {
        jobs.get_job(pb::JobRef {
            job_id: long_id.clone(),
        })
        .await
        .expect("get the long job")
        .into_inner()
        .generated_tokens
    };
    let at_heal = generated(&mut jobs).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(generated(&mut jobs).await > at_heal, "the long job stopped");
    let mut long_tokens = Vec::new();
    read_tokens(&mut long_stream, &mut long_tokens, 20).await;
    assert_eq!(degraded.chains.len(), 1, "{degraded:?}");
    let only_new = stage_memory(&[&restored]);
    let with_old = stage_memory(&[&restored, &degraded]);
    assert_ne!(only_new, with_old, "the heal moved no stage");
    assert_eq!(held_memory(&fed).await, with_old);
    jobs.cancel_job(pb::JobRef {
        job_id: long_id.clone(),
    })
    .await
    .expect("cancel the long job");
    while let Some(event) = long_stream.message().await.ok().flatten() {
        if let Some(pb::job_event::Kind::Token(t)) = event.kind {
            long_tokens.push(t.token_id);
        }
    }
    let audit = jobs
        .get_job(pb::JobRef { job_id: long_id })
        .await
        .expect("get the long job")
        .into_inner()
        .audit;
    assert!(!audit.is_empty());
    assert!(
        audit.iter().all(|a| a.attempt == 1),
        "the long job never moved: {audit:?}"
    );
    assert!(!audit.iter().any(|a| a.worker_id == away_id));
    // Its tokens, before and after the placement changed under it, are those the same job
    // gives on the restored placement.
    let reference = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Tell me a long story.", long_tokens.len() as u32, 0.0, 0),
    )
    .await
    .expect("the long job's reference");
    assert_eq!(reference.tokens, long_tokens);
    // Once it ended, only the new stages count.
    assert_eq!(held_memory(&fed).await, only_new);
    let again = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request(prompt, 12, 0.0, 0),
    )
    .await
    .expect("the job runs on the restored placement");
    assert_eq!(again.stages.len(), 3);
    assert!(again.stages.iter().any(|s| s.worker_id == away_id));
    assert_eq!(
        again.tokens, around.tokens,
        "the same tokens on either placement"
    );
    back.stop().await.unwrap();
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_registered_before_its_workers_is_placed_once_they_join() {
    let fed = TestFederation::start().await;
    fed.add_provider("ovh-fr", "FR", &[]).await;
    let mut models = pb::models_client::ModelsClient::new(fed.operator().await);
    models
        .add_model(smollm2_model("q8_0"))
        .await
        .expect("add model");
    let unplaced = show(&fed).await;
    assert!(unplaced.chains.is_empty());
    assert!(!unplaced.unplaced_reason.is_empty());

    let worker = fed.start_worker(Some(fed.join_token("ovh-fr", 600).await), None);
    let placed = eventually("the model placed and ready", WAIT, || async {
        let p = show(&fed).await;
        all_ready(&p).then_some(p)
    })
    .await;
    assert!(placed.version > unplaced.version);
    assert!(placed.unplaced_reason.is_empty());
    assert_eq!(placed.requested, "auto");
    let tenant = fed.add_tenant("acme").await;
    let out = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("What is the capital of France?", 4, 0.0, 0),
    )
    .await
    .expect("the job runs");
    assert_eq!(out.tokens.len(), 4);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_model_is_not_moved_onto_fewer_workers_while_idle() {
    let (fed, mut workers, tenant) = three_providers().await;
    fed.place("smollm2", How::Stages(3)).await;
    let third = workers.pop().unwrap();
    let third_dir = third.data_dir.clone();
    third.stop().await.unwrap();
    run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Hello", 2, 0.0, 0),
    )
    .await
    .expect("the job runs around the stopped worker");
    let degraded = show(&fed).await;
    assert!(degraded.degraded, "{degraded:?}");
    assert_eq!(workers_of(&degraded).len(), 2, "{degraded:?}");

    // A second worker stops while no job runs: the placement is left for the next job to
    // replan (its stage shows down), not moved onto the one worker left.
    let second = workers.pop().unwrap();
    let second_dir = second.data_dir.clone();
    second.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = show(&fed).await;
    assert_eq!(idle.version, degraded.version, "{idle:?}");
    assert!(
        idle.chains[0]
            .stages
            .iter()
            .any(|s| s.state == pb::AssignmentState::Down as i32),
        "{idle:?}"
    );

    // Both come back: the model is placed as asked.
    let back = [
        fed.start_worker_in(second_dir, None, None),
        fed.start_worker_in(third_dir, None, None),
    ];
    let restored = eventually("the placement as asked, ready", WAIT, || async {
        let p = show(&fed).await;
        (!p.degraded && all_ready(&p) && workers_of(&p).len() == 3).then_some(p)
    })
    .await;
    assert!(restored.version > degraded.version);
    for w in back.into_iter().chain(workers) {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplaced_model_says_why_as_of_now() {
    let fed = TestFederation::start().await;
    fed.add_provider("ovh-fr", "FR", &[]).await;
    pb::models_client::ModelsClient::new(fed.operator().await)
        .add_model(smollm2_model("q8_0"))
        .await
        .expect("add model");
    let before = show(&fed).await.unplaced_reason;
    assert!(!before.is_empty());
    // A worker joins that is too small to hold the model: the reason is now its memory.
    let small = fed.start_worker(
        Some(fed.join_token("ovh-fr", 600).await),
        Some(20 * (1 << 20)),
    );
    let now = eventually("the reason to change", WAIT, || async {
        let p = show(&fed).await;
        assert!(p.chains.is_empty(), "{p:?}");
        (p.unplaced_reason != before).then_some(p.unplaced_reason)
    })
    .await;
    assert!(now.contains("MiB"), "{before} → {now}");
    small.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_placed_again_on_the_same_layers_keeps_its_weights() {
    let (fed, workers, tenant) = three_providers().await;
    let first = fed.place("smollm2", How::Stages(3)).await;
    let stages: Vec<pb::PlacementStage> = first.chains[0].stages.clone();
    assert_eq!(stages.len(), 3, "{first:?}");
    for s in &stages {
        let layers = format!("{}..{}", s.start_layer, s.end_layer);
        assert_eq!(s.message, format!("layers {layers} loaded"), "{first:?}");
    }
    let prompt = "Name three rivers of Europe.";
    let before = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request(prompt, 12, 0.0, 0),
    )
    .await
    .expect("a job on the first placement");

    // The same chain asked for again, the last two stages' boundary moved by one layer: the
    // head keeps what it holds, the other two read their new layers.
    let (head, middle, tail) = (&stages[0], &stages[1], &stages[2]);
    // Into the tail, or out of it where it holds one layer (the split follows the workers'
    // measured speeds).
    let boundary = if tail.end_layer - tail.start_layer > 1 {
        middle.end_layer + 1
    } else {
        middle.end_layer - 1
    };
    let moved = explicit(&[
        (&head.worker_id, head.start_layer, head.end_layer),
        (&middle.worker_id, middle.start_layer, boundary),
        (&tail.worker_id, boundary, tail.end_layer),
    ]);
    let second = fed.place("smollm2", moved.clone()).await;
    let messages: Vec<&str> = second.chains[0]
        .stages
        .iter()
        .map(|s| s.message.as_str())
        .collect();
    assert_eq!(
        messages,
        [
            format!(
                "layers {}..{} kept from placement version {}",
                head.start_layer, head.end_layer, first.version
            ),
            format!("layers {}..{boundary} loaded", middle.start_layer),
            format!("layers {boundary}..{} loaded", tail.end_layer),
        ],
        "{second:?}"
    );

    // Set again exactly as it is: every stage keeps its weights, under the new version.
    let third = fed.place("smollm2", moved).await;
    assert!(third.version > second.version);
    for s in &third.chains[0].stages {
        assert_eq!(
            s.message,
            format!(
                "layers {}..{} kept from placement version {}",
                s.start_layer, s.end_layer, second.version
            ),
            "{third:?}"
        );
    }
    let after = run_job(
        fed.channel(Some(&tenant)).await,
        chat_request(prompt, 12, 0.0, 0),
    )
    .await
    .expect("a job on the placement set again");
    assert_eq!(after.tokens, before.tokens);
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_placement_says_what_keeps_it_from_being_as_asked() {
    let (fed, workers, tenant) = three_providers().await;
    let planned = fed.place("smollm2", How::Stages(3)).await;
    let stages = &planned.chains[0].stages;
    let asked = fed
        .place(
            "smollm2",
            explicit(
                &stages
                    .iter()
                    .map(|s| (&s.worker_id, s.start_layer, s.end_layer))
                    .collect::<Vec<_>>(),
            ),
        )
        .await;
    assert!(asked.requested.starts_with("explicit"), "{asked:?}");
    assert!(!asked.degraded && asked.not_as_asked.is_empty());

    // The operator revokes the tail's worker: the model is replanned around it, and the
    // placement, now degraded, says so; then, once the coordinator has tried to place it as
    // asked again, that the explicit chain names a worker that cannot be used.
    let victim = stages[2].worker_id.clone();
    pb::workers_client::WorkersClient::new(fed.operator().await)
        .revoke_worker(pb::RevokeWorkerRequest {
            worker_id: victim.clone(),
        })
        .await
        .expect("revoke the tail's worker");
    let around = eventually("the placement made around it", WAIT, || async {
        let p = show(&fed).await;
        p.degraded.then_some(p)
    })
    .await;
    assert!(!workers_of(&around).contains(&victim), "{around:?}");
    let first = format!("planned around worker {victim} (revoked)");
    let later = |p: &pb::Placement| {
        p.not_as_asked.contains(&victim) && p.not_as_asked.contains("down or revoked")
    };
    assert!(around.not_as_asked == first || later(&around), "{around:?}");
    run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Name three rivers of Europe.", 4, 0.0, 0),
    )
    .await
    .expect("the job runs around the revoked worker");
    eventually("the reason it is not as asked", WAIT, || async {
        let p = show(&fed).await;
        (p.degraded && later(&p)).then_some(p)
    })
    .await;
    for w in workers {
        // The revoked worker ended on its refusal.
        if let Err(e) = w.stop().await {
            assert!(e.to_string().contains("is revoked"), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_that_does_not_fit_beside_its_running_jobs_waits_for_them() {
    // Each worker offers 220 MB: SmolLM2 (q8_0) fits on two stages (211 and 151 MB) and on
    // three (161, 131 and 70 MB), but three do not fit beside two.
    let mut fed = TestFederation::start().await;
    fed.worker_max_memory = Some(220_000_000);
    let (fed, mut workers, tenant) = fleet_in(
        fed,
        &[("ovh-fr", "FR"), ("ionos-de", "DE"), ("scw-nl", "NL")],
        "q8_0",
    )
    .await;
    let asked = fed.place("smollm2", How::Stages(3)).await;
    let (away, _) = stop_one(&fed, &mut workers, &asked, &tenant, "Hello").await;
    let degraded = show(&fed).await;
    let (long_id, mut long_stream) = start_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Tell me a long story.", 100_000, 0.0, 0),
    )
    .await;
    let back = fed.start_worker_in(away.dir, None, Some(220_000_000));
    // Before the worker is back, the placement says that the workers left cannot give three
    // stages; once it is back, that it waits for the job (it would fit without it).
    let why = "waiting for its running jobs to end: as asked, it does not fit beside the stages they run on";
    let waiting = eventually("the placement to say what it waits for", WAIT, || async {
        let p = show(&fed).await;
        (p.not_as_asked == why).then_some(p)
    })
    .await;
    assert_eq!(waiting.version, degraded.version);
    assert!(waiting.degraded);
    // Nor may the operator place it so meanwhile.
    let refused = pb::placements_client::PlacementsClient::new(fed.operator().await)
        .set_placement(pb::SetPlacementRequest {
            model: "smollm2".into(),
            how: Some(How::Stages(3)),
        })
        .await
        .expect_err("a placement that does not fit beside the running job");
    assert!(
        refused.message().contains("while jobs of it run")
            && refused.message().contains("more than the"),
        "{}",
        refused.message()
    );
    assert_eq!(show(&fed).await.version, degraded.version);
    let mut tokens = Vec::new();
    read_tokens(&mut long_stream, &mut tokens, 10).await;
    pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .cancel_job(pb::JobRef { job_id: long_id })
        .await
        .expect("cancel the long job");
    while long_stream.message().await.ok().flatten().is_some() {}

    // Once it ended, the model is placed as asked.
    let restored = eventually("the placement as asked, ready", WAIT, || async {
        let p = show(&fed).await;
        (!p.degraded && all_ready(&p)).then_some(p)
    })
    .await;
    assert_eq!(restored.chains[0].stages.len(), 3, "{restored:?}");
    assert!(workers_of(&restored).contains(&away.id), "{restored:?}");
    back.stop().await.unwrap();
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_placement_made_around_a_worker_returns_to_it() {
    let (fed, mut workers, tenant) = three_providers().await;
    let auto = eventually("the automatic placement, ready", WAIT, || async {
        let p = show(&fed).await;
        all_ready(&p).then_some(p)
    })
    .await;
    assert_eq!(auto.requested, "auto");
    assert_eq!(workers_of(&auto).len(), 3, "{auto:?}");

    // A worker stops while no job runs; the next job replans around it. What the planner
    // makes of the two workers left is "auto" too, but not what it makes of three: the
    // placement stays degraded, and says so.
    let away = workers.pop().unwrap();
    let dir = away.data_dir.clone();
    let away_id = id_in(&dir, &auto);
    away.stop().await.unwrap();
    run_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Hello", 2, 0.0, 0),
    )
    .await
    .expect("the job runs around the stopped worker");
    let why = format!(
        "as asked over the workers up now; worker {away_id} is down: placed as asked again once it is back (or revoked)"
    );
    let around = eventually("the placement to say why", WAIT, || async {
        let p = show(&fed).await;
        (p.not_as_asked == why).then_some(p)
    })
    .await;
    assert!(
        around.degraded && workers_of(&around).len() == 2,
        "{around:?}"
    );

    // It comes back: the model is placed over the three again.
    let back = fed.start_worker_in(dir, None, None);
    let restored = eventually("the placement over three workers", WAIT, || async {
        let p = show(&fed).await;
        (!p.degraded && all_ready(&p) && workers_of(&p).len() == 3).then_some(p)
    })
    .await;
    assert!(workers_of(&restored).contains(&away_id));
    // Workers heartbeating are seen now, not at their connection.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for w in fed.workers().await {
        assert!(w.last_seen_unix + 5 >= now, "{w:?} at {now}");
    }
    back.stop().await.unwrap();
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stages_a_running_job_holds_count_until_it_ends_whatever_is_placed_meanwhile() {
    let (fed, workers, tenant) = three_providers().await;
    let planned = fed.place("smollm2", How::Stages(3)).await;
    let ids = workers_of(&planned);
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let first_layout = [(a, 0, 10), (b, 10, 20), (c, 20, 30)];
    let first = fed.place("smollm2", explicit(&first_layout)).await;
    let (job_id, mut stream) = start_job(
        fed.channel(Some(&tenant)).await,
        chat_request("Tell me a long story.", 100_000, 0.0, 0),
    )
    .await;
    read_tokens(&mut stream, &mut Vec::new(), 1).await;
    let mem = |p: &pb::Placement, w: &String, start: u32| {
        p.chains[0]
            .stages
            .iter()
            .find(|s| s.worker_id == *w && s.start_layer == start)
            .map(|s| s.memory_bytes)
            .unwrap()
    };

    // The job's first worker keeps its layers; the others' change: the job's stages stay.
    let second = fed
        .place("smollm2", explicit(&[(a, 0, 10), (b, 10, 30)]))
        .await;
    let expected = HashMap::from([
        (a.clone(), mem(&first, a, 0)),
        (b.clone(), mem(&second, b, 10) + mem(&first, b, 10)),
        (c.clone(), mem(&first, c, 20)),
    ]);
    assert_eq!(held_memory(&fed).await, expected);

    // The first worker is left out: it still holds the job's stage.
    let third = fed.place("smollm2", explicit(&[(b, 0, 30)])).await;
    let expected = HashMap::from([
        (a.clone(), mem(&first, a, 0)),
        (b.clone(), mem(&third, b, 0) + mem(&first, b, 10)),
        (c.clone(), mem(&first, c, 20)),
    ]);
    assert_eq!(held_memory(&fed).await, expected);

    // The first layout again: every worker loads its layers anew beside the job's copy.
    fed.place("smollm2", explicit(&first_layout)).await;
    let twice: HashMap<String, u64> = stage_memory(&[&first])
        .into_iter()
        .map(|(w, bytes)| (w, 2 * bytes))
        .collect();
    assert_eq!(held_memory(&fed).await, twice);

    // Once the job ends, only the placement counts.
    pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .cancel_job(pb::JobRef { job_id })
        .await
        .expect("cancel the job");
    while stream.message().await.ok().flatten().is_some() {}
    assert_eq!(held_memory(&fed).await, stage_memory(&[&first]));
    for w in workers {
        w.stop().await.unwrap();
    }
}
