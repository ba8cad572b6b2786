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

/// Polls `progress` until its value has not moved for two seconds; returns that value.
async fn settled<T: PartialEq + Copy>(progress: impl Fn() -> T) -> T {
    let (mut last, mut since) = (progress(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = progress();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(2) || Instant::now() > deadline {
            return now;
        }
    }
}

/// A federation CA and the data plane of its worker w-b (its failures are not watched).
fn worker_b() -> (FederationCa, Arc<DataPlane>) {
    let ca = FederationCa::generate("test federation").unwrap();
    let (failures, _) = mpsc::unbounded_channel();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let plane = DataPlane::start(socket, &identity(&ca, "w-b", "prov-b"), failures).unwrap();
    (ca, plane)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_busy_in_a_forward_holds_its_sender_back_and_loses_nothing() {
    let (ca, plane) = worker_b();
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
    // The budget fills (the data plane stops reading), then neither the sender nor the
    // engine's channel moves any more.
    let frame_bytes = body_len(&activations(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    while budget.available() >= frame_bytes {
        assert!(Instant::now() < deadline, "the budget never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (stalled_at, _) = settled(|| (written.load(Ordering::SeqCst), inputs.len())).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_keep_only_a_few_connections_open_to_a_worker() {
    let (ca, plane) = worker_b();
    let addr = plane.local_addr().unwrap();
    let peer = quic::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "w-a", "prov-a"),
    )
    .unwrap();
    let dial = || quic::connect(&peer, addr, "w-b", Duration::from_secs(10));
    let registered = || lock(&plane.incoming).get("w-a").map_or(0, Vec::len);

    let mut open = Vec::new();
    for _ in 0..quic::MAX_CONNECTIONS_PER_PEER {
        open.push(dial().await.unwrap());
    }
    assert_eq!(settled(registered).await, quic::MAX_CONNECTIONS_PER_PEER);

    let extra = dial().await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), extra.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code,
                quic::CODE_TOO_MANY_CONNECTIONS.into(),
                "{close:?}"
            );
        }
        other => panic!("one connection too many was not refused: {other:?}"),
    }
    assert!(open.iter().all(|c| c.close_reason().is_none()));

    // A connection that closes frees its place.
    open.pop()
        .unwrap()
        .close(quic::CODE_NO_ERROR.into(), b"done");
    assert_eq!(
        settled(registered).await,
        quic::MAX_CONNECTIONS_PER_PEER - 1
    );
    let again = dial().await.unwrap();
    assert_eq!(settled(registered).await, quic::MAX_CONNECTIONS_PER_PEER);
    assert!(again.close_reason().is_none());
}
