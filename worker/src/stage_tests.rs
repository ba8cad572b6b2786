use std::cell::Cell;

use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{GgufModel, LayerRange, WeightMode};

use super::*;

thread_local! {
    /// Set to make the next forward that runs on this thread panic. Per thread, so tests that
    /// run at the same time cannot take each other's fault: each `current_thread` test runs
    /// its engine, and its small forwards, on its own thread.
    static PANIC_NEXT_FORWARD: Cell<bool> = const { Cell::new(false) };
    /// Set to turn the next logits sampled on this thread to NaN (as a forward on absurd
    /// activations would give them): the first session sampled in the next batch.
    static POISON_NEXT_LOGITS: Cell<bool> = const { Cell::new(false) };
}

pub(super) fn poison_logits_if_asked(logits: &mut [f32]) {
    if POISON_NEXT_LOGITS.with(|p| p.replace(false)) {
        logits.fill(f32::NAN);
    }
}

pub(super) fn panic_if_asked() {
    if PANIC_NEXT_FORWARD.with(|p| p.replace(false)) {
        panic!("injected fault");
    }
}

fn order(session: u64) -> SessionOrder {
    let me = Peer {
        worker_id: "w".into(),
        addr: "127.0.0.1:1".into(),
    };
    SessionOrder {
        session,
        me: me.worker_id.clone(),
        head: me.clone(),
        tail: me,
        prompt: "hello".into(),
        stop: StopConditions {
            max_tokens: 4,
            stop: Vec::new(),
            ignore_eos: true,
        },
        ..Default::default()
    }
}

async fn open(inputs: &mpsc::UnboundedSender<EngineInput>, session: u64) {
    let (reply, opened) = oneshot::channel();
    inputs
        .send(EngineInput::Open(Box::new(order(session)), reply))
        .unwrap();
    opened.await.unwrap().unwrap();
}

async fn next_output(outputs: &mut mpsc::UnboundedReceiver<EngineOutput>) -> EngineOutput {
    tokio::time::timeout(Duration::from_secs(30), outputs.recv())
        .await
        .expect("the engine went quiet")
        .expect("the engine stopped")
}

type Engine = (
    mpsc::UnboundedSender<EngineInput>,
    mpsc::UnboundedReceiver<EngineOutput>,
    tokio::task::JoinHandle<()>,
    Arc<EngineStats>,
    tempfile::TempDir,
);

/// The engine of a whole tiny model (head and tail), running as a task.
fn engine() -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    SyntheticLlama::tiny().write_file(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    let tokenizer = ModelTokenizer::from_gguf(model.metadata()).unwrap();
    let slice =
        LlamaSlice::load(&model, LayerRange::new(0, 6), WeightMode::F32, &Device::Cpu).unwrap();
    let stats = Arc::new(EngineStats::default());
    let (out, outputs) = mpsc::unbounded_channel();
    let (inputs, rx) = mpsc::unbounded_channel();
    let engine = StageEngine::new(Arc::new(slice), Arc::new(tokenizer), out, stats.clone());
    let task = tokio::spawn(engine.run(rx));
    (inputs, outputs, task, stats, dir)
}

/// Sends `frame` from `from` to the engine, holding its share of `budget`.
async fn send_held(
    inputs: &mpsc::UnboundedSender<EngineInput>,
    budget: &InputBudget,
    from: &str,
    frame: Frame,
) {
    let held = budget.hold(crate::frame::body_len(&frame)).await;
    inputs
        .send(EngineInput::Frame {
            from: from.into(),
            frame,
            held,
        })
        .unwrap();
}

/// Runs the open sessions of a one-stage engine (its token frames fed back to it) until `done`
/// of them have ended; returns those that failed (with why) and those that finished (with
/// their token counts).
async fn run_sessions(
    inputs: &mpsc::UnboundedSender<EngineInput>,
    outputs: &mut mpsc::UnboundedReceiver<EngineOutput>,
    done: usize,
) -> (Vec<(u64, String)>, Vec<(u64, u32)>) {
    let (mut failed, mut finished) = (Vec::new(), Vec::new());
    let mut tokens: HashMap<u64, u32> = HashMap::new();
    while failed.len() + finished.len() < done {
        match next_output(outputs).await {
            EngineOutput::Send { to, frame } => inputs
                .send(EngineInput::Frame {
                    from: to.worker_id,
                    frame,
                    held: None,
                })
                .unwrap(),
            EngineOutput::Token {
                session, finish, ..
            } => {
                *tokens.entry(session).or_default() += 1;
                if finish.is_some() {
                    finished.push((session, tokens[&session]));
                }
            }
            EngineOutput::Failed { session, error } => failed.push((session, error)),
            EngineOutput::Prefilled { .. } => {}
        }
    }
    (failed, finished)
}

#[tokio::test(flavor = "current_thread")]
async fn a_frame_holds_its_share_of_the_input_budget_until_it_has_been_run() {
    let (inputs, mut outputs, task, _stats, _dir) = engine();
    let total = 1 << 20;
    let budget = InputBudget::new(total);
    let token = |position| Frame::Token {
        session: 1,
        position,
        token: 65,
    };
    let share = crate::frame::body_len(&token(0));

    // A frame for a session not open here is dropped, and its share comes back.
    send_held(
        &inputs,
        &budget,
        "w",
        Frame::Token {
            session: 99,
            position: 0,
            token: 1,
        },
    )
    .await;
    assert_eq!(budget.available(), total as usize - share);
    open(&inputs, 1).await;
    assert_eq!(budget.available(), total as usize);

    // Two frames of one session: one forward runs the first; the second waits in the session's
    // queue, still holding its share, until the next forward has run it.
    send_held(&inputs, &budget, "w", token(0)).await;
    send_held(&inputs, &budget, "w", token(1)).await;
    assert_eq!(budget.available(), total as usize - 2 * share);
    match next_output(&mut outputs).await {
        EngineOutput::Token { session: 1, .. } => {}
        other => panic!("expected session 1's token, got {other:?}"),
    }
    assert_eq!(budget.available(), total as usize - share);
    match next_output(&mut outputs).await {
        EngineOutput::Token { session: 1, .. } => {}
        other => panic!("expected session 1's token, got {other:?}"),
    }
    assert_eq!(budget.available(), total as usize);
    drop(inputs);
    task.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_forward_fails_its_sessions_and_the_engine_serves_on() {
    let (inputs, mut outputs, task, stats, _dir) = engine();

    // Two sessions started together run as one batch, whose forward panics.
    open(&inputs, 1).await;
    open(&inputs, 2).await;
    PANIC_NEXT_FORWARD.with(|p| p.set(true));
    inputs.send(EngineInput::Start(1)).unwrap();
    inputs.send(EngineInput::Start(2)).unwrap();
    let mut failed = Vec::new();
    while failed.len() < 2 {
        match next_output(&mut outputs).await {
            EngineOutput::Failed { session, error } => {
                assert_eq!(error, "forward panicked: injected fault");
                failed.push(session);
            }
            other => panic!("expected the batch to fail, got {other:?}"),
        }
    }
    failed.sort();
    assert_eq!(failed, [1, 2]);
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 0);

    // The engine goes on: a new session runs to its last token (one stage: head and tail,
    // so the token frames come back to this same engine).
    open(&inputs, 3).await;
    inputs.send(EngineInput::Start(3)).unwrap();
    let mut tokens = 0;
    loop {
        match next_output(&mut outputs).await {
            EngineOutput::Send { to, frame } => {
                assert_eq!(to.worker_id, "w");
                inputs
                    .send(EngineInput::Frame {
                        from: to.worker_id,
                        frame,
                        held: None,
                    })
                    .unwrap();
            }
            EngineOutput::Token {
                session, finish, ..
            } => {
                assert_eq!(session, 3);
                tokens += 1;
                if finish.is_some() {
                    break;
                }
            }
            EngineOutput::Failed { error, .. } => panic!("session 3 failed: {error}"),
            EngineOutput::Prefilled { .. } => {}
        }
    }
    assert_eq!(tokens, 4);
    drop(inputs);
    task.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_session_that_cannot_be_sampled_fails_alone_and_its_batch_goes_on() {
    let (inputs, mut outputs, task, stats, _dir) = engine();
    // Three sessions started together run as one batch; the logits of the first one sampled
    // are NaN.
    for session in 1..=3 {
        open(&inputs, session).await;
    }
    POISON_NEXT_LOGITS.with(|p| p.set(true));
    for session in 1..=3 {
        inputs.send(EngineInput::Start(session)).unwrap();
    }
    let (failed, finished) = run_sessions(&inputs, &mut outputs, 3).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].1, "logits hold no finite value");
    assert!(
        finished.iter().all(|&(_, tokens)| tokens == 4),
        "{finished:?}"
    );
    let mut all: Vec<u64> = finished
        .iter()
        .map(|f| f.0)
        .chain(failed.iter().map(|f| f.0))
        .collect();
    all.sort();
    assert_eq!(all, [1, 2, 3]);
    // The failed session is gone; the finished ones stay until they are closed.
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 2);
    drop(inputs);
    task.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn kv_caches_beyond_the_workers_memory_fail_the_session_that_does_not_fit() {
    let (_, _, _, _, dir) = engine();
    let model = GgufModel::open(dir.path().join("m.gguf")).unwrap();
    let per_position = model.spec().kv_bytes_per_token_per_layer() * 6;
    // Room for 12 positions: two sessions of 5 prompt tokens and 3 decode steps each (16
    // positions together) do not both fit; one alone (8) does.
    let ledger = Arc::new(MemoryLedger::new(12 * per_position));
    let tokenizer = ModelTokenizer::from_gguf(model.metadata()).unwrap();
    let slice =
        LlamaSlice::load(&model, LayerRange::new(0, 6), WeightMode::F32, &Device::Cpu).unwrap();
    let (out, mut outputs) = mpsc::unbounded_channel();
    let (inputs, rx) = mpsc::unbounded_channel();
    let engine = StageEngine::new(
        Arc::new(slice),
        Arc::new(tokenizer),
        out,
        Arc::new(EngineStats::default()),
    )
    .with_ledger(ledger.clone());
    let task = tokio::spawn(engine.run(rx));

    for session in [1, 2] {
        open(&inputs, session).await;
        inputs.send(EngineInput::Start(session)).unwrap();
    }
    let (failed, finished) = run_sessions(&inputs, &mut outputs, 2).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]
            .1
            .starts_with("out of memory for KV caches on this worker"),
        "{}",
        failed[0].1
    );
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].1, 4, "the other session ran to its last token");
    assert_eq!(ledger.kv_bytes(), 8 * per_position);

    // Closing the finished session gives its positions back: a new one fits again.
    inputs.send(EngineInput::Close(finished[0].0)).unwrap();
    open(&inputs, 3).await;
    inputs.send(EngineInput::Start(3)).unwrap();
    let (failed, finished) = run_sessions(&inputs, &mut outputs, 1).await;
    assert_eq!((failed, finished), (vec![], vec![(3, 4)]));
    inputs.send(EngineInput::Close(3)).unwrap();
    drop(inputs);
    task.await.unwrap();
    assert_eq!(ledger.kv_bytes(), 0);
}
