//! The data plane on real QUIC connections with federation certificates.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sovra_proto::ca::FederationCa;

use super::*;
use crate::quic::tests::identity;

/// Rows of 256 Ki values: one frame is a little over 1 MiB.
const HIDDEN: u32 = 256 << 10;
const FRAMES: u32 = 40;
const BUDGET: u32 = 4 << 20;

fn activations(start_pos: u32) -> Frame {
    Frame::Activations {
        session: 7,
        start_pos,
        rows: 1,
        hidden: HIDDEN,
        sample: false,
        data: vec![0.5; HIDDEN as usize],
    }
}

/// Polls `progress` until it stops moving for a second; returns its last value.
async fn settled(progress: &AtomicUsize) -> usize {
    let (mut last, mut since) = (usize::MAX, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = progress.load(Ordering::SeqCst);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(1) || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_busy_in_a_forward_holds_its_sender_back_and_loses_nothing() {
    let ca = FederationCa::generate("test federation").unwrap();
    let (failures, _failed) = mpsc::unbounded_channel();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let plane = DataPlane::start(socket, &identity(&ca, "w-b", "prov-b"), failures).unwrap();
    let (engine, mut inputs) = mpsc::unbounded_channel();
    let budget = InputBudget::new(BUDGET);
    plane.add_route(
        7,
        Route {
            engine,
            budget: budget.clone(),
            prev: Some("w-a".into()),
            tail: None,
        },
    );

    // The previous stage streams 40 MiB of frames while this stage's engine takes none (as
    // during a long forward on a blocking thread).
    let sender = quic::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "w-a", "prov-a"),
    )
    .unwrap();
    let conn = quic::connect(
        &sender,
        plane.local_addr().unwrap(),
        "w-b",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = written.clone();
        async move {
            let mut stream = conn.open_uni().await.unwrap();
            for pos in 0..FRAMES {
                write_frame(&mut stream, &activations(pos)).await.unwrap();
                written.fetch_add(1, Ordering::SeqCst);
            }
            stream.finish().unwrap();
            conn
        }
    });

    // The engine's channel holds no more than its budget, and the sender is held back by
    // QUIC's flow control (stream window 16 MiB) instead of the frames piling up here.
    let stalled_at = settled(&written).await;
    let frame_bytes = body_len(&activations(0));
    assert!(
        inputs.len() * frame_bytes <= BUDGET as usize,
        "{} frames of {frame_bytes} bytes wait in the engine's channel, over its {BUDGET}-byte budget",
        inputs.len()
    );
    assert!(!inputs.is_empty(), "no frame reached the engine");
    assert!(
        (stalled_at as u32) < FRAMES,
        "the sender wrote all {FRAMES} frames while the engine took none"
    );

    // Once the engine takes frames again, every frame arrives, in order.
    for pos in 0..FRAMES {
        let input = tokio::time::timeout(Duration::from_secs(10), inputs.recv())
            .await
            .unwrap_or_else(|_| panic!("frame {pos} did not arrive"))
            .expect("the route's engine sender is alive");
        match input {
            EngineInput::Frame { from, frame, held } => {
                assert_eq!(from, "w-a");
                assert!(
                    held.is_some(),
                    "a routed frame holds its share of the budget"
                );
                assert!(
                    matches!(frame, Frame::Activations { start_pos, .. } if start_pos == pos),
                    "frame {pos} out of order"
                );
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    let conn = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the sender finished once the engine took its frames")
        .unwrap();
    assert_eq!(written.load(Ordering::SeqCst) as u32, FRAMES);
    assert_eq!(
        budget.available(),
        BUDGET as usize,
        "every frame gave its share back"
    );
    assert!(conn.close_reason().is_none(), "the connection stayed open");
}
