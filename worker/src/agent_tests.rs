use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{GgufModel, WeightMode};

use super::*;

/// A slice table holding version `version` of model `m`.
fn table(slice: &Arc<LlamaSlice>, version: u64) -> SliceTable {
    let (engine, _) = mpsc::unbounded_channel();
    let slices: SliceTable = Arc::default();
    lock(&slices).insert(
        "m".into(),
        LoadedSlice {
            version,
            range: slice.range(),
            slice: slice.clone(),
            engine,
            stats: Arc::default(),
        },
    );
    slices
}

#[tokio::test]
async fn an_engine_that_panics_is_forgotten_and_its_assignment_reported_failed() {
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
    let (tx, mut reports) = mpsc::channel(4);

    // The engine of version 3 panics: the slice goes, the coordinator hears why.
    let slices = table(&slice, 3);
    let task = tokio::spawn(async { panic!("engine bug") });
    watch_engine(task, "m".into(), 3, slices.clone(), tx.clone()).await;
    match reports.try_recv().unwrap().kind {
        Some(pb::agent_message::Kind::Status(s)) => {
            assert_eq!((s.model.as_str(), s.placement_version), ("m", 3));
            assert_eq!(s.state, pb::AssignmentState::Failed as i32);
            assert_eq!(s.message, "the stage engine stopped: engine bug");
        }
        other => panic!("expected a status, got {other:?}"),
    }
    assert!(lock(&slices).get("m").is_none());

    // An engine that ends because its slice was replaced says nothing and leaves the table alone.
    let slices = table(&slice, 3);
    watch_engine(
        tokio::spawn(async {}),
        "m".into(),
        3,
        slices.clone(),
        tx.clone(),
    )
    .await;
    assert!(reports.try_recv().is_err());
    assert!(lock(&slices).get("m").is_some());

    // A panicked engine of an older version reports, but leaves the newer slice in place.
    let slices = table(&slice, 4);
    let task = tokio::spawn(async { panic!("old engine bug") });
    watch_engine(task, "m".into(), 3, slices.clone(), tx).await;
    assert!(reports.try_recv().is_ok());
    assert_eq!(lock(&slices).get("m").map(|l| l.version), Some(4));
}
