use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{GgufModel, WeightMode};

use super::*;

/// A slice table holding version `version` of model `m`, run by engine number 7.
fn table(slice: &Arc<LlamaSlice>, tokenizer: &Arc<ModelTokenizer>, version: u64) -> SliceTable {
    let (engine, _) = mpsc::unbounded_channel();
    let slices: SliceTable = Arc::default();
    lock(&slices).insert(
        "m".into(),
        LoadedSlice {
            version,
            range: slice.range(),
            slice: slice.clone(),
            tokenizer: tokenizer.clone(),
            file_sha256: String::new(),
            engine,
            engine_id: 7,
            budget: InputBudget::new(INPUT_BUDGET_BYTES),
            stats: Arc::default(),
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
    let tokenizer = Arc::new(ModelTokenizer::from_gguf(model.metadata()).unwrap());
    let (tx, mut reports) = mpsc::channel(4);
    let (outputs, mut failed) = mpsc::unbounded_channel();
    let sessions: SessionTable = Arc::default();
    lock_any(&sessions).extend([(1, "m".to_string()), (2, "m".into()), (3, "other".into())]);
    let watch = |task, engine_id, version, slices: &SliceTable| {
        watch_engine(
            task,
            "m".into(),
            Started { engine_id, version },
            slices.clone(),
            sessions.clone(),
            outputs.clone(),
            tx.clone(),
        )
    };

    // The engine of version 3 panics: the slice goes, its sessions fail, the coordinator hears
    // why.
    let slices = table(&slice, &tokenizer, 3);
    watch(tokio::spawn(async { panic!("engine bug") }), 7, 3, &slices).await;
    match reports.try_recv().unwrap().kind {
        Some(pb::agent_message::Kind::Status(s)) => {
            assert_eq!((s.model.as_str(), s.placement_version), ("m", 3));
            assert_eq!(s.state, pb::AssignmentState::Failed as i32);
            assert_eq!(s.message, "the stage engine stopped: engine bug");
        }
        other => panic!("expected a status, got {other:?}"),
    }
    assert!(lock(&slices).get("m").is_none());
    let mut lost: Vec<(u64, String)> = std::iter::from_fn(|| failed.try_recv().ok())
        .map(|output| match output {
            EngineOutput::Failed { session, error } => (session, error),
            other => panic!("expected failures, got {other:?}"),
        })
        .collect();
    lost.sort();
    let why = "the stage engine stopped: engine bug".to_string();
    assert_eq!(lost, [(1, why.clone()), (2, why)]);

    // An engine that ends because its slice was replaced says nothing and leaves the table alone.
    let slices = table(&slice, &tokenizer, 3);
    watch(tokio::spawn(async {}), 7, 3, &slices).await;
    assert!(reports.try_recv().is_err());
    assert!(lock(&slices).get("m").is_some());

    // A panicked engine already replaced (number 6, of version 3) reports under its own
    // version, but leaves the newer slice and the sessions (which may run on the newer engine)
    // in place.
    let slices = table(&slice, &tokenizer, 4);
    watch(
        tokio::spawn(async { panic!("old engine bug") }),
        6,
        3,
        &slices,
    )
    .await;
    let version = |m: pb::AgentMessage| match m.kind {
        Some(pb::agent_message::Kind::Status(s)) => s.placement_version,
        other => panic!("expected a status, got {other:?}"),
    };
    assert_eq!(version(reports.try_recv().unwrap()), 3);
    assert_eq!(lock(&slices).get("m").map(|l| l.version), Some(4));
    assert!(failed.try_recv().is_err());

    // The engine started for version 3 and kept for version 4 panics: its slice goes, its
    // sessions fail, and the failure is reported under the version it holds now.
    watch(
        tokio::spawn(async { panic!("kept engine bug") }),
        7,
        3,
        &slices,
    )
    .await;
    assert_eq!(version(reports.try_recv().unwrap()), 4);
    assert!(lock(&slices).get("m").is_none());
    assert_eq!(std::iter::from_fn(|| failed.try_recv().ok()).count(), 2);
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
        outputs: outputs.clone(),
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
    lock_any(&sessions).insert(1, "m".into());
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
            tokenizer: Arc::new(ModelTokenizer::from_gguf(model.metadata()).unwrap()),
            file_sha256: String::new(),
            engine: new_engine,
            engine_id: 2,
            budget: InputBudget::new(INPUT_BUDGET_BYTES),
            stats: Arc::default(),
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
