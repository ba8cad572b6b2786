//! The data plane on real QUIC connections with federation certificates.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sovra_proto::ca::FederationCa;

use super::*;
use crate::frame::body_len;
use crate::quic::tests::identity;
use crate::stage::INPUT_BUDGET_BYTES;

/// Rows of 256 Ki values: one frame is a little over 1 MiB.
const HIDDEN: u32 = 256 << 10;
const FRAMES: u32 = 40;
const BUDGET: u32 = 4 << 20;

fn activations(session: u64, start_pos: u32) -> Frame {
    Frame::Activations {
        session,
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
    let plane = worker(&ca, "w-b");
    (ca, plane)
}

/// The data plane of worker `id` of `ca`'s federation (its failures are not watched).
fn worker(ca: &FederationCa, id: &str) -> Arc<DataPlane> {
    watched_worker(ca, id).0
}

/// The data plane of worker `id` of `ca`'s federation, and the sessions it reports failed.
fn watched_worker(
    ca: &FederationCa,
    id: &str,
) -> (Arc<DataPlane>, mpsc::UnboundedReceiver<EngineOutput>) {
    let (failures, failed) = mpsc::unbounded_channel();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let plane =
        DataPlane::start(socket, &identity(ca, id, &format!("prov-{id}")), failures).unwrap();
    (plane, failed)
}

/// Worker w-b with session 7 (model "m", from w-a) routed to an engine that takes nothing
/// until the test reads it, with a `BUDGET`-byte budget, and a connection from w-a to it.
struct Budgeted {
    _plane: Arc<DataPlane>,
    inputs: mpsc::UnboundedReceiver<EngineInput>,
    budget: InputBudget,
    conn: quinn::Connection,
    _sender: quinn::Endpoint,
}

async fn budgeted() -> Budgeted {
    let (ca, plane) = worker_b();
    let (engine, inputs) = mpsc::unbounded_channel();
    let budget = InputBudget::new(BUDGET);
    plane.add_route(
        7,
        Route {
            model: Arc::from("m"),
            engine,
            budget: budget.clone(),
            prev: Some("w-a".into()),
            tail: None,
        },
    );
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
    Budgeted {
        _plane: plane,
        inputs,
        budget,
        conn,
        _sender: sender,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_busy_in_a_forward_holds_its_sender_back_and_loses_nothing() {
    // The previous stage streams 40 MiB of frames while this stage's engine takes none (as
    // during a long forward on a blocking thread).
    // `setup` keeps the worker and the sender alive to the end of the test.
    let setup = budgeted().await;
    let (mut inputs, budget, conn) = (setup.inputs, setup.budget, setup.conn);
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = written.clone();
        async move {
            let mut stream = conn.open_uni().await.unwrap();
            for pos in 0..FRAMES {
                write_frame(&mut stream, &activations(7, pos))
                    .await
                    .unwrap();
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
    let frame_bytes = body_len(&activations(7, 0));
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
    // The stream's end closes the connection cleanly, never as an error.
    match conn.close_reason() {
        None => {}
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == quic::CODE_NO_ERROR.into() => {}
        Some(other) => panic!("the connection ended with an error: {other}"),
    }
}

/// `values` activations of one row for session 7 at `start_pos`.
fn row(start_pos: u32, values: usize) -> Frame {
    row_of(7, start_pos, values)
}

/// `values` activations of one row for `session` at `start_pos`.
fn row_of(session: u64, start_pos: u32, values: usize) -> Frame {
    Frame::Activations {
        session,
        start_pos,
        rows: 1,
        hidden: values as u32,
        sample: false,
        data: (0..values).map(|i| (i % 1000) as f32).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_does_not_fit_the_budget_is_not_read_off_the_connection() {
    // `setup` keeps the worker and the sender alive to the end of the test.
    let setup = budgeted().await;
    let (mut inputs, conn) = (setup.inputs, setup.conn);
    // A 3 MiB frame that fits the 4 MiB budget, then a 24 MiB one (more than the stream's
    // 16 MiB window) that waits for the whole budget.
    let (small, large) = (row(0, 768 << 10), row(1, 6 << 20));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let (written, small, large) = (written.clone(), small.clone(), large.clone());
        async move {
            let mut stream = conn.open_uni().await.unwrap();
            for frame in [small, large] {
                write_frame(&mut stream, &frame).await.unwrap();
                written.fetch_add(1, Ordering::SeqCst);
            }
            stream.finish().unwrap();
            conn
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(30), inputs.recv())
        .await
        .expect("the frame that fits arrives")
        .unwrap();

    // While the first frame holds its share, the second's body stays on the wire: the sender
    // cannot finish writing it, since the receiver reads no more than the frame's start.
    assert_eq!(
        settled(|| written.load(Ordering::SeqCst)).await,
        1,
        "the receiver read a frame its budget has no room for"
    );
    assert!(inputs.is_empty());

    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(30), inputs.recv())
        .await
        .expect("the second frame arrives once the first has been run")
        .unwrap();
    match second {
        EngineInput::Frame { frame, held, .. } => {
            assert_eq!(frame, large, "the second frame arrived whole");
            assert!(held.is_some());
        }
        other => panic!("expected a frame, got {other:?}"),
    }
    let conn = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the sender finished")
        .unwrap();
    assert_eq!(written.load(Ordering::SeqCst), 2);
    drop(conn);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_stage_holds_its_sender_back_does_not_hold_back_another_model() {
    let (ca, receiver) = worker_b();
    let sender = worker(&ca, "w-a");
    let to = Peer {
        worker_id: "w-b".into(),
        addr: receiver.local_addr().unwrap().to_string(),
    };
    // Session 1 of model "big" goes to an engine that takes nothing (a long forward), with a
    // small budget; session 2 of model "small" to an engine that takes everything.
    let (big, mut big_inputs) = mpsc::unbounded_channel();
    let (small, mut small_inputs) = mpsc::unbounded_channel();
    let big_budget = InputBudget::new(BUDGET);
    for (session, model, engine, budget) in [
        (1, "big", big, big_budget.clone()),
        (2, "small", small, InputBudget::new(INPUT_BUDGET_BYTES)),
    ] {
        let route = |engine| Route {
            model: Arc::from(model),
            engine,
            budget: budget.clone(),
            prev: Some("w-a".into()),
            tail: None,
        };
        receiver.add_route(session, route(engine));
        // The sender knows each session's model from its own route.
        sender.add_route(session, route(mpsc::unbounded_channel().0));
    }

    for pos in 0..FRAMES {
        sender.send(&to, activations(1, pos));
    }
    let frame_bytes = body_len(&activations(1, 0));
    let deadline = Instant::now() + Duration::from_secs(60);
    while big_budget.available() >= frame_bytes {
        assert!(Instant::now() < deadline, "model big's budget never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stalled = settled(|| big_inputs.len()).await;
    assert!(stalled >= 1, "no frame of model big arrived");
    assert!(
        stalled * body_len(&activations(1, 0)) <= BUDGET as usize,
        "{stalled} frames of model big wait, over its budget"
    );
    let small_frame = |pos| Frame::Activations {
        session: 2,
        start_pos: pos,
        rows: 1,
        hidden: 4,
        sample: false,
        data: vec![1.0; 4],
    };
    for pos in 0..5 {
        sender.send(&to, small_frame(pos));
    }
    for pos in 0..5 {
        match tokio::time::timeout(Duration::from_secs(10), small_inputs.recv()).await {
            Ok(Some(EngineInput::Frame { frame, .. })) => assert_eq!(frame, small_frame(pos)),
            other => panic!(
                "frame {pos} of model small did not arrive while model big was held back: {other:?}"
            ),
        }
    }
    assert_eq!(big_inputs.len(), stalled, "model big stayed held back");

    // Once model big's engine takes its frames, they all arrive, in order.
    for pos in 0..FRAMES {
        match tokio::time::timeout(Duration::from_secs(10), big_inputs.recv()).await {
            Ok(Some(EngineInput::Frame { frame, .. })) => assert_eq!(frame, activations(1, pos)),
            other => panic!("frame {pos} of model big did not arrive: {other:?}"),
        }
    }
}

/// Waits until `done` holds (at most a minute).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Session 1 of model "m" from w-a (`sender`) to w-b (`receiver`); returns where w-b's engine
/// gets its frames, and the peer w-a sends them to.
fn one_session(
    sender: &DataPlane,
    receiver: &DataPlane,
) -> (mpsc::UnboundedReceiver<EngineInput>, Peer) {
    let (engine, inputs) = mpsc::unbounded_channel();
    let route = Route {
        model: Arc::from("m"),
        engine,
        budget: InputBudget::new(INPUT_BUDGET_BYTES),
        prev: Some("w-a".into()),
        tail: None,
    };
    receiver.add_route(1, route.clone());
    sender.add_route(
        1,
        Route {
            engine: mpsc::unbounded_channel().0,
            ..route
        },
    );
    let to = Peer {
        worker_id: "w-b".into(),
        addr: receiver.local_addr().unwrap().to_string(),
    };
    (inputs, to)
}

fn small_frame(pos: u32) -> Frame {
    Frame::Activations {
        session: 1,
        start_pos: pos,
        rows: 1,
        hidden: 4,
        sample: false,
        data: vec![1.0; 4],
    }
}

async fn arrives(inputs: &mut mpsc::UnboundedReceiver<EngineInput>, pos: u32) {
    match tokio::time::timeout(Duration::from_secs(10), inputs.recv()).await {
        Ok(Some(EngineInput::Frame { frame, .. })) => assert_eq!(frame, small_frame(pos)),
        other => panic!("frame {pos} did not arrive: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_closes_its_connection_and_the_next_frame_opens_another() {
    let (ca, receiver) = worker_b();
    let sender = worker(&ca, "w-a");
    sender.set_link_idle(Duration::from_secs(1));
    let (mut inputs, to) = one_session(&sender, &receiver);
    let connections = || lock(&receiver.incoming).get("w-a").map_or(0, Vec::len);

    sender.send(&to, small_frame(0));
    assert_eq!(lock(&sender.links).len(), 1);
    arrives(&mut inputs, 0).await;
    // Idle, the link goes, and its connection with it (the receiver closes it once it has
    // read the end of the stream).
    until("the idle link's connection closes", || connections() == 0).await;
    assert!(lock(&sender.links).is_empty());
    // The next frame opens a new link.
    sender.send(&to, small_frame(1));
    assert_eq!(lock(&sender.links).len(), 1);
    arrives(&mut inputs, 1).await;

    // A frame of a session not open on the sender is not sent.
    sender.remove_route(1);
    sender.send(&to, small_frame(2));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), inputs.recv())
            .await
            .is_err(),
        "a frame of a closed session went out"
    );
}

/// w-a with a link to w-b that has carried frame 0 of session 1.
struct Linked {
    receiver: Arc<DataPlane>,
    sender: Arc<DataPlane>,
    failed: mpsc::UnboundedReceiver<EngineOutput>,
    inputs: mpsc::UnboundedReceiver<EngineInput>,
    to: Peer,
}

async fn linked() -> Linked {
    let (ca, receiver) = worker_b();
    let (sender, failed) = watched_worker(&ca, "w-a");
    let (mut inputs, to) = one_session(&sender, &receiver);
    sender.send(&to, small_frame(0));
    arrives(&mut inputs, 0).await;
    Linked {
        receiver,
        sender,
        failed,
        inputs,
        to,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_connection_the_receiver_closes_fails_the_sessions_it_carried() {
    let Linked {
        receiver,
        sender,
        mut failed,
        ..
    } = linked().await;

    // The receiver cuts the sender off (its provider revoked): the session whose frame went
    // over that connection fails at once instead of waiting for a token that never comes.
    receiver.revoke(&["w-a".to_string()]);
    match tokio::time::timeout(Duration::from_secs(10), failed.recv()).await {
        Ok(Some(EngineOutput::Failed { session, error })) => {
            assert_eq!(session, 1);
            assert!(error.contains("lost the link to w-b"), "{error}");
        }
        other => panic!("the session was not failed: {other:?}"),
    }
    assert_eq!(
        settled(|| lock(&sender.links).len()).await,
        0,
        "the lost link is forgotten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_frame_fails_its_own_session_and_the_link_goes_on() {
    let Linked {
        receiver: _receiver,
        sender,
        mut failed,
        mut inputs,
        to,
    } = linked().await;

    let Frame::Activations { mut data, .. } = small_frame(1) else {
        unreachable!()
    };
    data[2] = f32::NAN;
    sender.send(
        &to,
        Frame::Activations {
            session: 1,
            start_pos: 1,
            rows: 1,
            hidden: 4,
            sample: false,
            data,
        },
    );
    match tokio::time::timeout(Duration::from_secs(10), failed.recv()).await {
        Ok(Some(EngineOutput::Failed { session, error })) => {
            assert_eq!(session, 1);
            assert!(error.contains("invalid frame"), "{error}");
        }
        other => panic!("the invalid frame's session was not failed: {other:?}"),
    }
    // The link is still up: the next frame goes out on it.
    sender.send(&to, small_frame(1));
    arrives(&mut inputs, 1).await;
    assert_eq!(lock(&sender.links).len(), 1);
    assert!(failed.try_recv().is_err(), "nothing else failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_opens_no_stream_is_let_go() {
    let (ca, receiver) = worker_b();
    let peer = quic::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "w-a", "prov-a"),
    )
    .unwrap();
    let addr = receiver.local_addr().unwrap();
    let conn = quic::connect(&peer, addr, "w-b", Duration::from_secs(10))
        .await
        .unwrap();
    match tokio::time::timeout(STREAM_WAIT * 2, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, quic::CODE_UNEXPECTED_FRAME.into());
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("no stream"), "{reason}");
        }
        other => panic!("a connection without a stream was kept: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_whose_rest_never_comes_is_let_go_with_its_share_of_the_budget() {
    // `setup` keeps the worker and the sender alive to the end of the test.
    let setup = budgeted().await;
    let (inputs, budget, conn) = (setup.inputs, setup.budget, setup.conn);
    // The named sender starts a 1 MiB frame and stops after 1,000 bytes of it.
    let bytes = crate::frame::encode(&row(0, 256 << 10));
    let mut stream = conn.open_uni().await.unwrap();
    stream.write_all(&bytes[..1000]).await.unwrap();
    until("the frame holds its share of the budget", || {
        budget.available() < BUDGET as usize
    })
    .await;

    match tokio::time::timeout(BODY_WAIT * 3, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, quic::CODE_MALFORMED_FRAME.into());
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("did not arrive"), "{reason}");
        }
        other => panic!("a stalled frame kept its connection: {other:?}"),
    }
    until("the stalled frame gives its share back", || {
        budget.available() == BUDGET as usize
    })
    .await;
    assert!(
        inputs.is_empty(),
        "nothing of the stalled frame reached the engine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_a_closed_session_is_read_through_and_the_next_one_arrives() {
    // `setup` keeps the worker and the sender alive to the end of the test.
    let setup = budgeted().await;
    let (mut inputs, conn) = (setup.inputs, setup.conn);
    // Session 9 is not open on w-b, but w-a is the sender session 7 names: the end of a
    // session the coordinator just closed. Its 2 MiB frame is dropped; session 7's follows.
    let closed = row_of(9, 0, 512 << 10);
    let mut stream = conn.open_uni().await.unwrap();
    write_frame(&mut stream, &closed).await.unwrap();
    write_frame(&mut stream, &row(3, 16)).await.unwrap();
    let input = tokio::time::timeout(Duration::from_secs(30), inputs.recv())
        .await
        .expect("the frame after the dropped one arrives")
        .unwrap();
    match input {
        EngineInput::Frame { frame, .. } => assert_eq!(frame, row(3, 16)),
        other => panic!("expected a frame, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        inputs.is_empty(),
        "the closed session's frame reached the engine"
    );
    assert!(conn.close_reason().is_none(), "the connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_a_new_address_gets_a_new_link() {
    let (ca, old) = worker_b();
    let sender = worker(&ca, "w-a");
    let (mut old_inputs, to_old) = one_session(&sender, &old);
    sender.send(&to_old, small_frame(0));
    arrives(&mut old_inputs, 0).await;
    // w-b restarted on another address, and the session placed there: its next frame goes
    // to the new address, not into the link to the old one.
    let new = worker(&ca, "w-b");
    let (mut new_inputs, to_new) = one_session(&sender, &new);
    sender.send(&to_new, small_frame(1));
    arrives(&mut new_inputs, 1).await;
    assert!(
        old_inputs.try_recv().is_err(),
        "the frame went to the old address"
    );
}
