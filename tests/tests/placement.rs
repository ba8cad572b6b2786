//! Models and placements on a real fleet: workers load the slices they are assigned and report
//! ready; policies and memory limits are obeyed; operator overrides are checked.

use std::time::Duration;

use sovra_coordinator::federation::FederationConfig;
use sovra_coordinator::service::spec_pb;
use sovra_model::GgufModel;
use sovra_model::fetch::sha256_file;
use sovra_proto::pb;
use sovra_tests::federation::{TestFederation, eventually};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn add_model_request(name: &str, countries: &[&str]) -> pb::AddModelRequest {
    let path = sovra_tests::smollm2_path();
    let model = GgufModel::open(&path).unwrap();
    pb::AddModelRequest {
        name: name.into(),
        spec: Some(spec_pb(model.spec())),
        file_sha256: sha256_file(&path).unwrap(),
        file_name: path.file_name().unwrap().to_string_lossy().into_owned(),
        file_path: path.display().to_string(),
        dtype: "q8_0".into(),
        policy: Some(pb::Policy {
            countries: countries.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }),
    }
}

/// A short lease and a small KV reserve, so a slice's memory is mostly its weights.
fn small_kv_config() -> FederationConfig {
    FederationConfig {
        heartbeat_interval: Duration::from_millis(200),
        lease: Duration::from_millis(1500),
        kv_reserve_tokens: 256,
        ..FederationConfig::default()
    }
}

fn covered(chain: &pb::PlacementChain, layers: u32) -> bool {
    let mut next = 0;
    for s in &chain.stages {
        if s.start_layer != next || s.end_layer <= s.start_layer {
            return false;
        }
        next = s.end_layer;
    }
    next == layers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_placed_across_providers_within_memory_and_policy() {
    let fed = TestFederation::start_with(FederationConfig {
        heartbeat_interval: Duration::from_millis(200),
        lease: Duration::from_millis(3000),
        kv_reserve_tokens: 256,
        ..FederationConfig::default()
    })
    .await;
    let mut workers = Vec::new();
    for (name, country) in [("ovh-fr", "FR"), ("ionos-de", "DE"), ("scw-nl", "NL")] {
        fed.add_provider(name, country, &["ISO27001"]).await;
        workers.push(fed.start_worker(Some(fed.join_token(name, 600).await), Some(75 * MIB)));
    }
    eventually("three workers up", WAIT, || async {
        (fed.workers()
            .await
            .iter()
            .filter(|w| w.state == "up")
            .count()
            == 3)
            .then_some(())
    })
    .await;

    let mut models = pb::models_client::ModelsClient::new(fed.operator().await);
    models
        .add_model(add_model_request("smollm2", &[]))
        .await
        .unwrap();
    let mut placements = pb::placements_client::PlacementsClient::new(fed.operator().await);
    let show = |p: &mut pb::placements_client::PlacementsClient<_>| {
        let mut p = p.clone();
        async move {
            p.show_placement(pb::ShowPlacementRequest {
                model: "smollm2".into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let placement = show(&mut placements).await;
    assert_eq!(placement.version, 1);
    assert_eq!(placement.chains.len(), 1, "{placement:?}");
    let chain = &placement.chains[0];
    assert!(covered(chain, 30), "{chain:?}");
    assert_eq!(
        chain.stages.len(),
        3,
        "75 MiB per worker forces three stages: {chain:?}"
    );
    for stage in &chain.stages {
        assert!(stage.memory_bytes <= 75 * MIB, "{stage:?}");
    }
    // Every worker loads its slice of the real model and reports ready.
    eventually("every stage ready", WAIT, || {
        let p = placements.clone();
        async move {
            let mut p = p;
            let placement = p
                .show_placement(pb::ShowPlacementRequest {
                    model: "smollm2".into(),
                })
                .await
                .ok()?
                .into_inner();
            placement.chains[0]
                .stages
                .iter()
                .all(|s| s.state == pb::AssignmentState::Ready as i32)
                .then_some(())
        }
    })
    .await;

    // A policy limited to FR and DE leaves too little memory: a clear error naming the shortfall.
    let err = models
        .add_model(add_model_request("smollm2-eu", &["FR", "DE"]))
        .await;
    let model = err.unwrap().into_inner();
    assert_eq!(model.policy.unwrap().countries, vec!["FR", "DE"]);
    let unplaced = placements
        .show_placement(pb::ShowPlacementRequest {
            model: "smollm2-eu".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unplaced.chains.is_empty());
    assert!(
        unplaced.unplaced_reason.contains("FR,DE") && unplaced.unplaced_reason.contains("MiB"),
        "{}",
        unplaced.unplaced_reason
    );

    // Operator overrides: explicit ranges are checked like the planner's.
    let ids: Vec<String> = chain.stages.iter().map(|s| s.worker_id.clone()).collect();
    let explicit = |ranges: &[(usize, u32, u32)]| pb::SetPlacementRequest {
        model: "smollm2".into(),
        how: Some(pb::set_placement_request::How::Explicit(
            pb::ExplicitChain {
                stages: ranges
                    .iter()
                    .map(|&(w, a, b)| pb::StageAssignment {
                        worker_id: ids[w].clone(),
                        start_layer: a,
                        end_layer: b,
                    })
                    .collect(),
            },
        )),
    };
    let gap = placements
        .set_placement(explicit(&[(0, 0, 10), (1, 11, 20), (2, 20, 30)]))
        .await
        .unwrap_err();
    assert_eq!(gap.code(), Code::FailedPrecondition);
    let over = placements
        .set_placement(explicit(&[(0, 0, 2), (1, 2, 28), (2, 28, 30)]))
        .await
        .unwrap_err();
    assert!(
        over.message().contains("memory")
            || over.message().contains("GiB")
            || over.message().contains("MiB"),
        "{}",
        over.message()
    );
    let ok = placements
        .set_placement(explicit(&[(2, 0, 9), (0, 9, 21), (1, 21, 30)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.version, 2);
    assert_eq!(ok.chains[0].stages[0].worker_id, ids[2]);
    let one = placements
        .set_placement(pb::SetPlacementRequest {
            model: "smollm2".into(),
            how: Some(pb::set_placement_request::How::Stages(1)),
        })
        .await
        .unwrap_err();
    assert_eq!(
        one.code(),
        Code::FailedPrecondition,
        "one worker cannot hold the model in 75 MiB"
    );
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_memory_is_shared_by_every_model_placed_on_it() {
    let fed = TestFederation::start_with(small_kv_config()).await;
    fed.add_provider("ovh-fr", "FR", &[]).await;
    let worker = fed.start_worker(Some(fed.join_token("ovh-fr", 600).await), Some(250 * MIB));
    fed.wait_for_workers_up(1).await;
    let id = fed.workers().await[0].id.clone();
    let mut models = pb::models_client::ModelsClient::new(fed.operator().await);
    let placements = pb::placements_client::PlacementsClient::new(fed.operator().await);
    let show = |name: &'static str| {
        let placements = placements.clone();
        async move {
            placements
                .clone()
                .show_placement(pb::ShowPlacementRequest { model: name.into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    models
        .add_model(add_model_request("first", &[]))
        .await
        .unwrap();
    let first = show("first").await;
    assert_eq!(first.chains.len(), 1, "{first:?}");
    let held = first.chains[0].stages[0].memory_bytes;
    assert!(held > 125 * MIB && held < 250 * MIB, "{held}");

    // The second copy does not fit in what the first left free, planned or explicit.
    models
        .add_model(add_model_request("second", &[]))
        .await
        .unwrap();
    let second = show("second").await;
    assert!(second.chains.is_empty(), "{second:?}");
    assert!(
        second
            .unplaced_reason
            .contains("the stages already placed there hold"),
        "{}",
        second.unplaced_reason
    );
    let explicit = placements
        .clone()
        .set_placement(pb::SetPlacementRequest {
            model: "second".into(),
            how: Some(pb::set_placement_request::How::Explicit(
                pb::ExplicitChain {
                    stages: vec![pb::StageAssignment {
                        worker_id: id.clone(),
                        start_layer: 0,
                        end_layer: 30,
                    }],
                },
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(explicit.code(), Code::FailedPrecondition);
    assert!(
        explicit.message().contains("free") && explicit.message().contains("already placed there"),
        "{}",
        explicit.message()
    );

    // Once the first is removed, the second gets its memory (placed by the coordinator).
    models
        .remove_model(pb::RemoveModelRequest {
            name: "first".into(),
        })
        .await
        .unwrap();
    let placed = eventually("the second model placed", WAIT, || async {
        let p = show("second").await;
        (!p.chains.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(placed.chains[0].stages[0].worker_id, id);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_with_less_memory_gives_up_what_no_longer_fits() {
    let fed = TestFederation::start_with(small_kv_config()).await;
    fed.add_provider("ovh-fr", "FR", &[]).await;
    fed.add_provider("ionos-de", "DE", &[]).await;
    let big = fed.start_worker(Some(fed.join_token("ovh-fr", 600).await), Some(400 * MIB));
    fed.wait_for_workers_up(1).await;
    let big_id = fed.workers().await[0].id.clone();
    let small = fed.start_worker(Some(fed.join_token("ionos-de", 600).await), Some(250 * MIB));
    fed.wait_for_workers_up(2).await;
    pb::models_client::ModelsClient::new(fed.operator().await)
        .add_model(add_model_request("smollm2", &[]))
        .await
        .unwrap();
    // All of it on the big worker.
    let on_big = fed
        .place(
            "smollm2",
            pb::set_placement_request::How::Explicit(pb::ExplicitChain {
                stages: vec![pb::StageAssignment {
                    worker_id: big_id.clone(),
                    start_layer: 0,
                    end_layer: 30,
                }],
            }),
        )
        .await;
    let held = on_big.chains[0].stages[0].memory_bytes;
    assert!(held > 100 * MIB, "{held}");

    // It comes back offering 100 MiB: the model leaves it for what fits.
    let dir = big.data_dir.clone();
    big.stop().await.unwrap();
    let big = fed.start_worker_in(dir, None, Some(100 * MIB));
    let moved = eventually("the model placed within the memory offered", WAIT, || {
        let fed = &fed;
        async move {
            let p = fed.placement("smollm2").await;
            let ready = p.version > on_big.version
                && !p.chains.is_empty()
                && p.chains[0]
                    .stages
                    .iter()
                    .all(|s| s.state == pb::AssignmentState::Ready as i32);
            ready.then_some(p)
        }
    })
    .await;
    for s in &moved.chains[0].stages {
        if s.worker_id == big_id {
            assert!(s.memory_bytes <= 100 * MIB, "{moved:?}");
        }
    }
    assert!(
        moved.degraded,
        "not the explicit placement asked for: {moved:?}"
    );
    big.stop().await.unwrap();
    small.stop().await.unwrap();
}
