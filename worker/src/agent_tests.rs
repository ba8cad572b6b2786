use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{GgufModel, WeightMode};

use super::*;

/// A slice table holding version `version` of model `m`, run by engine number 7.
fn table(slice: &Arc<LlamaSlice>, version: u64) -> SliceTable {
    let (engine, _) = mpsc::unbounded_channel();
    let slices: SliceTable = Arc::default();
    lock(&slices).insert(
        "m".into(),
        LoadedSlice {
            version,
            range: slice.range(),
            slice: slice.clone(),
            file_sha256: String::new(),
            engine,
            engine_id: 7,
            budget: InputBudget::new(INPUT_BUDGET_BYTES),
        },
    );
    slices
}

#[tokio::test]
async fn an_engine_that_panics_is_forgotten_its_sessions_fail_and_its_assignment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    SyntheticLlama::tiny().write_file(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    let slice = Arc::new(
        LlamaSlice::load(
            &model,
            LayerRange::new(0, 6),
            WeightMode::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    // Reports go on the agent stream current when the engine fails.
    let (tx, mut reports) = mpsc::channel(4);
    let uplink: Uplink = Arc::new(Mutex::new(Some(tx)));
    let (outputs, mut failed) = mpsc::unbounded_channel();
    // Sessions 1 and 2 run on engine 7, 3 on engine 6 (of "m" too, an older slice), 4 on
    // engine 9 of another model.
    let sessions: SessionTable = Arc::default();
    lock_any(&sessions).extend([
        (1, ("m".to_string(), 7)),
        (2, ("m".into(), 7)),
        (3, ("m".into(), 6)),
        (4, ("other".into(), 9)),
    ]);
    let engines: Engines = Arc::default();
    let watch = |task, engine_id, version, slices: &SliceTable| {
        lock_any(&engines).insert(engine_id, Arc::default());
        let loader = Loader {
            slices: slices.clone(),
            sessions: sessions.clone(),
            engines: engines.clone(),
            outputs: outputs.clone(),
            uplink: uplink.clone(),
            ..loader(slices, &Arc::default(), &outputs)
        };
        let started = Started {
            engine_id,
            version,
            weights: 0,
        };
        watch_engine(task, "m".into(), started, loader)
    };
    let mut failures = || {
        let mut lost: Vec<(u64, String)> = std::iter::from_fn(|| failed.try_recv().ok())
            .map(|output| match output {
                EngineOutput::Failed { session, error } => (session, error),
                other => panic!("expected failures, got {other:?}"),
            })
            .collect();
        lost.sort();
        lost
    };
    let mut version = || match reports.try_recv().map(|m| m.kind) {
        Ok(Some(pb::agent_message::Kind::Status(s))) => {
            assert_eq!(s.state, pb::AssignmentState::Failed as i32);
            Some((s.placement_version, s.message))
        }
        Ok(other) => panic!("expected a status, got {other:?}"),
        Err(_) => None,
    };

    // The engine of version 3 panics: the slice goes, its sessions fail, the coordinator hears
    // why, and the engine's counters no longer count.
    let slices = table(&slice, 3);
    watch(tokio::spawn(async { panic!("engine bug") }), 7, 3, &slices).await;
    let why = "the stage engine stopped: engine bug".to_string();
    assert_eq!(version(), Some((3, why.clone())));
    assert!(lock(&slices).get("m").is_none());
    assert_eq!(failures(), [(1, why.clone()), (2, why)]);
    assert!(lock_any(&engines).is_empty());

    // An engine that ends because its slice was replaced says nothing and leaves the table alone.
    let slices = table(&slice, 3);
    watch(tokio::spawn(async {}), 7, 3, &slices).await;
    assert_eq!(version(), None);
    assert!(lock(&slices).get("m").is_some());
    assert!(lock_any(&engines).is_empty());

    // A panicked engine already replaced (number 6, of version 3) fails its own sessions and
    // reports under its own version, but leaves the newer slice and its sessions in place.
    let slices = table(&slice, 4);
    watch(
        tokio::spawn(async { panic!("old engine bug") }),
        6,
        3,
        &slices,
    )
    .await;
    assert_eq!(version().map(|(v, _)| v), Some(3));
    assert_eq!(lock(&slices).get("m").map(|l| l.version), Some(4));
    assert_eq!(
        failures(),
        [(3, "the stage engine stopped: old engine bug".to_string())]
    );

    // The engine started for version 3 and kept for version 4 panics: its slice goes, its
    // sessions fail, and the failure is reported under the version it holds now.
    watch(
        tokio::spawn(async { panic!("kept engine bug") }),
        7,
        3,
        &slices,
    )
    .await;
    assert_eq!(version().map(|(v, _)| v), Some(4));
    assert!(lock(&slices).get("m").is_none());
    assert_eq!(failures().len(), 2);

    // With no agent stream at the time, the report is not sent anywhere stale.
    *lock_any(&uplink) = None;
    let slices = table(&slice, 5);
    watch(tokio::spawn(async { panic!("offline bug") }), 7, 5, &slices).await;
    assert!(lock(&slices).get("m").is_none());
}

/// A tiny model written to `dir`, and an order for layers `0..end_layer` of it.
fn tiny_model(dir: &Path) -> impl Fn(u64, &str, u32) -> pb::Assignment {
    let path = dir.join("m.gguf");
    SyntheticLlama::tiny().write_file(&path).unwrap();
    let hash = sha256_file(&path).unwrap();
    move |version, dtype, end_layer| pb::Assignment {
        model: "m".into(),
        placement_version: version,
        file_sha256: hash.clone(),
        file_name: "m.gguf".into(),
        file_path: path.display().to_string(),
        dtype: dtype.into(),
        start_layer: 0,
        end_layer,
        chain: 0,
        stage: 0,
    }
}

/// A loader into `slices`, under the orders of `wanted`.
fn loader(
    slices: &SliceTable,
    wanted: &Wanted,
    outputs: &mpsc::UnboundedSender<EngineOutput>,
) -> Loader {
    Loader {
        models_dir: None,
        batch_wait: Duration::ZERO,
        slices: slices.clone(),
        wanted: wanted.clone(),
        sessions: Arc::default(),
        engines: Arc::default(),
        ledger: Arc::new(MemoryLedger::new(0)),
        outputs: outputs.clone(),
        uplink: Arc::default(),
        net: tokio::runtime::Handle::current(),
    }
}

#[tokio::test]
async fn a_load_whose_order_was_withdrawn_or_replaced_meanwhile_is_dropped() {
    use pb::AssignmentState::{Loading, Ready};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let order = |version| model(version, "f32", 2);
    let slices: SliceTable = Arc::default();
    let wanted: Wanted = Arc::default();
    let (outputs, _engine_outputs) = mpsc::unbounded_channel();
    let loader = || loader(&slices, &wanted, &outputs);
    let (tx, mut reports) = mpsc::channel(16);

    // Unassigned while it loaded: nothing stays.
    load_assignment(order(3), loader(), tx.clone()).await;
    assert!(lock(&slices).is_empty());
    // Replaced by a newer order while it loaded: dropped; the newer one stays.
    lock_any(&wanted).insert("m".into(), 5);
    load_assignment(order(4), loader(), tx.clone()).await;
    assert!(lock(&slices).is_empty());
    load_assignment(order(5), loader(), tx.clone()).await;
    assert_eq!(lock(&slices).get("m").map(|l| l.version), Some(5));
    let states: Vec<(u64, i32)> = std::iter::from_fn(|| reports.try_recv().ok())
        .filter_map(|m| match m.kind {
            Some(pb::agent_message::Kind::Status(s)) => Some((s.placement_version, s.state)),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            (3, Loading as i32),
            (4, Loading as i32),
            (5, Loading as i32),
            (5, Ready as i32)
        ]
    );
}

#[tokio::test]
async fn an_order_for_layers_already_held_keeps_them_without_reading_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let order = tiny_model(dir.path());
    let slices: SliceTable = Arc::default();
    let wanted: Wanted = Arc::default();
    let (outputs, _engine_outputs) = mpsc::unbounded_channel();
    let (tx, mut reports) = mpsc::channel(16);
    let load = |a: pb::Assignment| {
        lock_any(&wanted).insert("m".into(), a.placement_version);
        load_assignment(a, loader(&slices, &wanted, &outputs), tx.clone())
    };
    let mut ready = || -> String {
        std::iter::from_fn(|| reports.try_recv().ok())
            .filter_map(|m| match m.kind {
                Some(pb::agent_message::Kind::Status(s))
                    if s.state == pb::AssignmentState::Ready as i32 =>
                {
                    Some(s.message)
                }
                _ => None,
            })
            .last()
            .expect("a ready report")
    };
    let held = || {
        lock(&slices)
            .get("m")
            .map(|l| (l.version, l.slice.clone(), l.engine.clone()))
            .unwrap()
    };

    load(order(1, "f32", 2)).await;
    assert_eq!(ready(), "layers 0..2 loaded");
    let (_, first, first_engine) = held();

    // The file is gone, yet an order for the same layers in the same mode is met at once:
    // the weights and the engine (with its sessions) are kept, under the new version.
    std::fs::remove_file(dir.path().join("m.gguf")).unwrap();
    load(order(2, "f32", 2)).await;
    assert_eq!(ready(), "layers 0..2 kept from placement version 1");
    let (version, second, second_engine) = held();
    assert_eq!(version, 2);
    assert!(Arc::ptr_eq(&first, &second));
    assert!(first_engine.same_channel(&second_engine));

    // Other layers or another weight mode are read from the file: now missing, so they fail
    // and what is held stays.
    for (dtype, end) in [("f32", 3), ("q8_0", 2)] {
        load(order(3, dtype, end)).await;
        let failure = std::iter::from_fn(|| reports.try_recv().ok())
            .find_map(|m| match m.kind {
                Some(pb::agent_message::Kind::Status(s))
                    if s.state == pb::AssignmentState::Failed as i32 =>
                {
                    Some(s.message)
                }
                _ => None,
            })
            .expect("a failure report");
        assert!(failure.contains("not found"), "{failure}");
        assert_eq!(held().0, 2);
    }
}

#[test]
fn a_data_dir_serves_one_worker_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("w1");
    let first = lock_data_dir(&data).unwrap();
    match lock_data_dir(&data) {
        Err(WorkerError::Io(message)) => {
            assert!(
                message.contains("in use by another running worker"),
                "{message}"
            )
        }
        other => panic!("a second worker took the data dir: {other:?}"),
    }
    drop(first);
    lock_data_dir(&data).expect("the data dir is free once the first worker is gone");
}

#[tokio::test]
async fn a_session_is_started_and_freed_on_the_engine_it_was_opened_on() {
    let ca = sovra_proto::ca::FederationCa::generate("test federation").unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (failures, _failed) = mpsc::unbounded_channel();
    let plane = DataPlane::start(
        socket,
        &crate::quic::tests::identity(&ca, "w-a", "prov-a"),
        failures,
    )
    .unwrap();
    // Session 1 was opened on the engine of an earlier slice of "m"; the table now holds a
    // newer one.
    let (old_engine, mut old_inputs) = mpsc::unbounded_channel();
    let (new_engine, mut new_inputs) = mpsc::unbounded_channel();
    plane.add_route(
        1,
        Route {
            model: Arc::from("m"),
            engine: old_engine,
            budget: InputBudget::new(INPUT_BUDGET_BYTES),
            prev: None,
            tail: None,
        },
    );
    let sessions: SessionTable = Arc::default();
    lock_any(&sessions).insert(1, ("m".into(), 1));
    let slices: SliceTable = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    SyntheticLlama::tiny().write_file(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    lock(&slices).insert(
        "m".into(),
        LoadedSlice {
            version: 2,
            range: LayerRange::new(0, 2),
            slice: Arc::new(
                LlamaSlice::load(
                    &model,
                    LayerRange::new(0, 2),
                    WeightMode::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap(),
            ),
            file_sha256: String::new(),
            engine: new_engine,
            engine_id: 2,
            budget: InputBudget::new(INPUT_BUDGET_BYTES),
        },
    );

    plane
        .engine_of(1)
        .unwrap()
        .send(EngineInput::Start(1))
        .unwrap();
    close_session(&sessions, &slices, &plane, 1);
    let old: Vec<String> = std::iter::from_fn(|| old_inputs.try_recv().ok())
        .map(|input| match input {
            EngineInput::Start(s) => format!("start {s}"),
            EngineInput::Close(s) => format!("close {s}"),
            _ => "other".into(),
        })
        .collect();
    assert_eq!(old, ["start 1", "close 1"]);
    assert!(
        new_inputs.try_recv().is_err(),
        "the newer engine got orders"
    );
    assert!(plane.engine_of(1).is_none());
    assert!(lock_any(&sessions).is_empty());
}

#[tokio::test]
async fn a_slices_weights_count_in_the_ledger_from_its_engines_start_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let order = tiny_model(dir.path());
    let slices: SliceTable = Arc::default();
    let wanted: Wanted = Arc::default();
    let (outputs, _engine_outputs) = mpsc::unbounded_channel();
    let (tx, _reports) = mpsc::channel(16);
    let ledger = Arc::new(MemoryLedger::new(0));
    let loader = || Loader {
        ledger: ledger.clone(),
        ..loader(&slices, &wanted, &outputs)
    };
    let spec = GgufModel::open(dir.path().join("m.gguf"))
        .unwrap()
        .spec()
        .clone();

    // A load whose order was replaced meanwhile counts nothing.
    lock_any(&wanted).insert("m".into(), 2);
    load_assignment(order(1, "f32", 2), loader(), tx.clone()).await;
    assert_eq!(ledger.weights_bytes(), 0);
    load_assignment(order(2, "f32", 2), loader(), tx.clone()).await;
    let two_layers = spec.slice_bytes(LayerRange::new(0, 2), WeightMode::F32);
    assert!(two_layers > 0);
    assert_eq!(ledger.weights_bytes(), two_layers);

    // Replaced by other layers: both count until the first engine has ended.
    lock_any(&wanted).insert("m".into(), 3);
    load_assignment(order(3, "f32", 4), loader(), tx.clone()).await;
    let four_layers = spec.slice_bytes(LayerRange::new(0, 4), WeightMode::F32);
    eventually_true(|| ledger.weights_bytes() == four_layers).await;

    // Unassigned: its engine ends and its weights go.
    lock(&slices).remove("m");
    eventually_true(|| ledger.weights_bytes() == 0).await;
}

async fn eventually_true(check: impl Fn() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 2 s");
}
