//! The stage engine: one task per loaded slice that owns the slice's sessions (KV caches,
//! prompt and sampling state) and runs every frame waiting for it as one batched forward.
//! It takes [`EngineInput`]s (control orders and frames already checked for their sender) and
//! emits [`EngineOutput`]s (frames for the next hop, token events); it does no I/O itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use sovra_model::llama::logits_row;
use sovra_model::{
    ChatPrompt, ChatTurn, FinishReason, LlamaSlice, ModelTokenizer, Sampler, SamplingParams,
    SegmentInput, SessionCache, SliceInput, SliceOutput, StopConditions, TextStream,
};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, warn};

use crate::frame::Frame;

/// Longest a stage woken with some of its sessions ready keeps taking the frames that are
/// still arriving (the rest of a batch the previous stage sent as one burst).
pub const GATHER: Duration = Duration::from_millis(2);
/// A burst is over when no frame came for this long (the runtime's timers count whole
/// milliseconds, so in effect up to the next millisecond tick).
pub const GATHER_QUIET: Duration = Duration::from_micros(300);

/// Largest batch (in rows) whose forward runs inline on the data plane's thread; larger ones
/// run on a blocking thread while the data plane goes on reading.
pub const INLINE_ROWS: usize = 32;

/// Prompt tokens run per forward of a prefill chunk, so long prompts do not stall decodes.
pub const PREFILL_CHUNK: usize = 64;

/// Bytes of peers' frames that may wait for one engine, in its input channel and in its
/// sessions' queues, until they are run. A connection whose next frame does not fit is not
/// read until the engine has run frames, and QUIC's flow control then holds its sender: a
/// neighbour that sends faster than the stage computes (or while a long forward runs) cannot
/// pile up frames in the worker's memory.
pub const INPUT_BUDGET_BYTES: u32 = crate::frame::MAX_FRAME_BYTES;

/// The bytes of peers' frames that may wait for one engine, shared by every connection that
/// feeds it.
#[derive(Debug, Clone)]
pub struct InputBudget {
    permits: Arc<Semaphore>,
    total: u32,
}

impl InputBudget {
    /// A budget of `total` bytes (at least 1).
    pub fn new(total: u32) -> Self {
        let total = total.max(1);
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `bytes` fit (a frame larger than the whole budget waits for all of it) and
    /// holds them until the returned permit is dropped. (None only if the semaphore were
    /// closed, which nothing does.)
    pub async fn hold(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let wanted = bytes.clamp(1, self.total as usize) as u32;
        self.permits.clone().acquire_many_owned(wanted).await.ok()
    }

    /// Bytes not held by any frame now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// The text a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A data-plane neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Peer {
    /// Worker id (its certificate's CN).
    pub worker_id: String,
    /// host:port of its QUIC endpoint.
    pub addr: String,
}

/// Everything a stage needs to know about a session.
#[derive(Debug, Clone, Default)]
pub struct SessionOrder {
    /// Session id.
    pub session: u64,
    /// This worker's id.
    pub me: String,
    /// Stage before this one (None for the head).
    pub prev: Option<Peer>,
    /// Stage after this one (None for the tail).
    pub next: Option<Peer>,
    /// The head stage.
    pub head: Peer,
    /// The tail stage.
    pub tail: Peer,
    /// Prompt text (head).
    pub prompt: String,
    /// Chat template (head).
    pub chat: bool,
    /// System turn (head).
    pub system: Option<String>,
    /// Prompt ids that replace the text when given (head).
    pub prompt_ids: Vec<u32>,
    /// A conversation in the chat layout that replaces the text when given (head).
    pub turns: Vec<ChatTurn>,
    /// Sampling (tail).
    pub sampling: SamplingParams,
    /// Stopping (tail).
    pub stop: StopConditions,
    /// Tokens generated on an earlier chain, replayed into the text state (tail).
    pub replay_generated: Vec<u32>,
    /// The original prompt's length when replaying (tail).
    pub prompt_tokens: usize,
}

/// Why a stage refused to open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What is wrong.
    pub message: String,
    /// The request itself is at fault (its prompt is empty or too long for the model): no
    /// stage anywhere would take it.
    pub bad_request: bool,
}

impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Self {
            message,
            bad_request: false,
        }
    }
}

/// Orders and frames for the engine.
#[derive(Debug)]
pub enum EngineInput {
    /// Prepare a session; the reply carries the prompt ids (head) or the refusal.
    Open(
        Box<SessionOrder>,
        oneshot::Sender<Result<Vec<u32>, Refusal>>,
    ),
    /// Start generating (head).
    Start(u64),
    /// Drop a session.
    Close(u64),
    /// A frame whose sender the data plane has checked.
    Frame {
        /// The sender's worker id.
        from: String,
        /// The frame.
        frame: Frame,
        /// Its share of the engine's [`InputBudget`], given back once the engine has run it.
        held: Option<OwnedSemaphorePermit>,
    },
}

/// What the engine produces.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOutput {
    /// Send a frame to a peer.
    Send {
        /// The peer.
        to: Peer,
        /// The frame.
        frame: Frame,
    },
    /// A generated token (tail), possibly the last.
    Token {
        /// Session id.
        session: u64,
        /// Index among generated tokens.
        index: u32,
        /// Token id.
        token_id: u32,
        /// Text released with it.
        text: String,
        /// Set when the generation ended with this token.
        finish: Option<FinishReason>,
        /// False for an end token that is not part of the output.
        emitted: bool,
    },
    /// The session failed on this stage.
    Failed {
        /// Session id.
        session: u64,
        /// Why.
        error: String,
    },
    /// A chunk of the session's prompt that yields no token yet has run here.
    Prefilled {
        /// Session id.
        session: u64,
        /// Prompt positions run so far.
        positions: u32,
    },
}

/// Live counters an engine publishes for heartbeats.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Open sessions.
    pub sessions: AtomicU64,
    /// KV cache bytes.
    pub kv_bytes: AtomicU64,
}

/// The memory a worker may use and what holds it: the weights of its slices (from the moment
/// an engine starts until its task has ended, so a replaced slice still serving sessions
/// counts) and the KV caches of the sessions on all its engines. A forward that would grow the
/// caches beyond the limit fails the sessions that do not fit, with a message, instead of
/// letting the process run out of memory.
#[derive(Debug)]
pub struct MemoryLedger {
    limit: u64,
    weights: AtomicU64,
    kv: AtomicU64,
}

impl MemoryLedger {
    /// A ledger of `limit` bytes (0: no limit).
    pub fn new(limit: u64) -> Self {
        Self {
            limit: if limit == 0 { u64::MAX } else { limit },
            weights: AtomicU64::new(0),
            kv: AtomicU64::new(0),
        }
    }

    /// Counts a slice's weights.
    pub fn add_weights(&self, bytes: u64) {
        self.weights.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Forgets a slice's weights (its engine has ended).
    pub fn remove_weights(&self, bytes: u64) {
        let _ = self
            .weights
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_sub(bytes))
            });
    }

    /// Bytes of the weights counted now.
    pub fn weights_bytes(&self) -> u64 {
        self.weights.load(Ordering::Relaxed)
    }

    /// Bytes the KV caches hold now, as taken.
    pub fn kv_bytes(&self) -> u64 {
        self.kv.load(Ordering::Relaxed)
    }

    /// Takes `bytes` for KV caches if they fit beside the weights and the other caches.
    fn take_kv(&self, bytes: u64) -> Result<(), String> {
        let weights = self.weights.load(Ordering::Relaxed);
        let room = self.limit.saturating_sub(weights);
        self.kv
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kv| {
                kv.checked_add(bytes).filter(|&total| total <= room)
            })
            .map(|_| ())
            .map_err(|kv| {
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                format!(
                    "out of memory for KV caches on this worker: {:.1} MiB more asked, {:.1} MiB held by the open sessions and {:.1} MiB of weights within its {:.1} MiB",
                    mib(bytes),
                    mib(kv),
                    mib(weights),
                    mib(self.limit)
                )
            })
    }

    fn give_kv(&self, bytes: u64) {
        let _ = self
            .kv
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kv| {
                Some(kv.saturating_sub(bytes))
            });
    }
}

/// One forward's worth of a session's input. Work from a peer's frame keeps the frame's share
/// of the engine's input budget until it has been run (or dropped), so frames that wait in a
/// session's queue count against the budget as well as frames still in the channel.
enum Work {
    Tokens {
        start: usize,
        ids: Vec<u32>,
        sample: bool,
        _held: Option<OwnedSemaphorePermit>,
    },
    Hidden {
        start: usize,
        rows: usize,
        sample: bool,
        data: Vec<f32>,
        _held: Option<OwnedSemaphorePermit>,
    },
}

struct TailState {
    sampler: Sampler,
    stream: Option<TextStream>,
    emitted: u32,
    finished: bool,
}

struct StageSession {
    order: SessionOrder,
    cache: SessionCache,
    started: bool,
    /// Length of the original prompt: positions before it are prefilled in chunks, positions
    /// after it (a replayed generation) one at a time, exactly as they were first computed.
    prompt_len: usize,
    pending_prompt: VecDeque<u32>,
    queue: VecDeque<Work>,
    tail: Option<TailState>,
    /// KV bytes taken from the ledger for this session's positions; given back when the
    /// session is dropped, however it ends.
    kv_taken: u64,
    ledger: Arc<MemoryLedger>,
}

impl Drop for StageSession {
    fn drop(&mut self) {
        self.ledger.give_kv(self.kv_taken);
    }
}

/// The engine of one slice.
pub struct StageEngine {
    slice: Arc<LlamaSlice>,
    tokenizer: Arc<ModelTokenizer>,
    sessions: HashMap<u64, StageSession>,
    out: mpsc::UnboundedSender<EngineOutput>,
    stats: Arc<EngineStats>,
    batch_wait: Duration,
    ledger: Arc<MemoryLedger>,
}

impl StageEngine {
    /// An engine for `slice`, sending its outputs to `out`.
    pub fn new(
        slice: Arc<LlamaSlice>,
        tokenizer: Arc<ModelTokenizer>,
        out: mpsc::UnboundedSender<EngineOutput>,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            slice,
            tokenizer,
            sessions: HashMap::new(),
            out,
            stats,
            batch_wait: Duration::ZERO,
            ledger: Arc::new(MemoryLedger::new(0)),
        }
    }

    /// Takes the KV caches of this engine's sessions from `ledger` (shared by the worker's
    /// engines); without one they are not limited.
    pub fn with_ledger(mut self, ledger: Arc<MemoryLedger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// On the head stage, how long to wait for the next tokens of all open sessions before a
    /// forward, so they run as one batch (zero: run whatever is ready). Worth it where stages
    /// share their cores, as in the one-machine demo: one batch of all sessions there beats
    /// several smaller batches passing through the stages side by side.
    pub fn with_batch_wait(mut self, wait: Duration) -> Self {
        self.batch_wait = wait;
        self
    }

    /// Runs until every input sender is gone; waits when there is nothing to do. A forward of
    /// up to [`INLINE_ROWS`] rows runs inline, on the thread that polls this future: run it on
    /// the data plane's runtime, so a frame that arrives is read and run, and the frames a
    /// forward produces are sent, without handing them to another thread. Larger forwards run
    /// on a blocking thread while the runtime goes on reading.
    pub async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<EngineInput>) {
        loop {
            if !self.has_work() {
                match inputs.recv().await {
                    Some(input) => {
                        debug!(target: crate::dataplane::HOP, "engine woke");
                        self.handle(input)
                    }
                    None => return,
                }
                if self.gather(&mut inputs).await {
                    return;
                }
            }
            loop {
                match inputs.try_recv() {
                    Ok(input) => self.handle(input),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let batch = self.take_batch();
            let rows: usize = batch.iter().map(|(_, w)| work_rows(w)).sum();
            if rows > INLINE_ROWS {
                // A long forward (prompt chunks, many sessions) runs on a blocking thread, so
                // the network goes on reading the frames that arrive meanwhile.
                let mut engine = self;
                self = match tokio::task::spawn_blocking(move || {
                    engine.run_batch(batch);
                    engine
                })
                .await
                {
                    Ok(engine) => engine,
                    // The engine's own panic goes on as this task's, so whoever watches the
                    // task (the agent's `watch_engine`) sees it.
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => return warn!(cause = %e, "the stage engine stopped"),
                };
            } else {
                self.run_batch(batch);
            }
            self.publish_stats();
            // Lets the network send what the forward produced and read what arrived meanwhile.
            tokio::task::yield_now().await;
        }
    }

    /// After waking from idle with only some of its sessions ready, takes the frames still
    /// arriving, so sessions that one forward upstream produced run as one batch here too:
    /// every stage waits while frames keep coming less than [`GATHER_QUIET`] apart, at most
    /// [`GATHER`]; the head also waits up to its batch wait for the next tokens of all its
    /// sessions, so sessions that drifted apart merge into one batch. Returns true when the
    /// inputs are gone.
    async fn gather(&mut self, inputs: &mut mpsc::UnboundedReceiver<EngineInput>) -> bool {
        let woke = Instant::now();
        let burst_end = woke + GATHER;
        let ring_end = woke + self.batch_wait;
        let head = self.slice.is_head_stage();
        loop {
            let open = self.sessions.len();
            let ready = self
                .sessions
                .values()
                .filter(|s| session_has_work(s))
                .count();
            if open < 2 || ready >= open {
                return false;
            }
            let now = Instant::now();
            let (wait, quiet_ends) = if head && now < ring_end {
                (ring_end - now, false)
            } else if now < burst_end {
                (GATHER_QUIET.min(burst_end - now), true)
            } else {
                return false;
            };
            match tokio::time::timeout(wait, inputs.recv()).await {
                Ok(Some(input)) => self.handle(input),
                Ok(None) => return true,
                Err(_) if quiet_ends => return false,
                Err(_) => {}
            }
        }
    }

    fn has_work(&self) -> bool {
        self.sessions.values().any(session_has_work)
    }

    fn publish_stats(&self) {
        self.stats
            .sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        let kv: usize = self.sessions.values().map(|s| s.cache.bytes()).sum();
        self.stats.kv_bytes.store(kv as u64, Ordering::Relaxed);
    }

    fn fail(&mut self, session: u64, error: String) {
        warn!(session, %error, "session failed on this stage");
        self.sessions.remove(&session);
        let _ = self.out.send(EngineOutput::Failed { session, error });
    }

    fn handle(&mut self, input: EngineInput) {
        match input {
            EngineInput::Open(order, reply) => {
                let result = self.open(*order);
                let _ = reply.send(result);
            }
            EngineInput::Start(session) => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.started = true;
                }
            }
            EngineInput::Close(session) => {
                self.sessions.remove(&session);
            }
            EngineInput::Frame { from, frame, held } => self.accept_frame(&from, frame, held),
        }
    }

    fn open(&mut self, order: SessionOrder) -> Result<Vec<u32>, Refusal> {
        let bad_request = |message: String| Refusal {
            message,
            bad_request: true,
        };
        if self.sessions.contains_key(&order.session) {
            return Err(format!("session {} is already open", order.session).into());
        }
        let mut prompt = Vec::new();
        if self.slice.is_head_stage() {
            prompt = if order.prompt_ids.is_empty() {
                // A conversation's turns are encoded as text between the layout's markers: a
                // turn that spells a special token does not make one.
                let encoded = if !order.turns.is_empty() {
                    self.tokenizer.encode_chat(&order.turns)
                } else if order.chat || order.system.is_some() {
                    let turns = ChatPrompt {
                        user: order.prompt.clone(),
                        system: order.system.clone(),
                    }
                    .turns();
                    self.tokenizer.encode_chat(&turns)
                } else {
                    self.tokenizer.encode(&order.prompt)
                };
                // An empty prompt, or a chat layout the model's vocabulary lacks, is the
                // request's fault; a tokenizer failure is not.
                encoded.map_err(|e| match e {
                    sovra_model::TokenizerError::EmptyPrompt
                    | sovra_model::TokenizerError::Metadata(_) => bad_request(e.to_string()),
                    other => Refusal::from(other.to_string()),
                })?
            } else {
                order.prompt_ids.clone()
            };
            let context = self.slice.spec().context_length;
            if prompt.len() >= context {
                return Err(bad_request(
                    crate::generate::GenerateError::PromptTooLong {
                        prompt: prompt.len(),
                        context,
                    }
                    .to_string(),
                ));
            }
            if let Some(&bad) = prompt
                .iter()
                .find(|&&t| t as usize >= self.slice.spec().vocab_size)
            {
                return Err(format!("prompt token {bad} is outside the vocabulary").into());
            }
        }
        let tail = if self.slice.is_tail_stage() {
            let sampler = Sampler::new(order.sampling).map_err(|e| e.to_string())?;
            if order.stop.max_tokens == 0 {
                return Err("max tokens must be at least 1".to_string().into());
            }
            Some(self.tail_state(sampler, &order))
        } else {
            None
        };
        let prompt_len = if order.prompt_tokens > 0 {
            order.prompt_tokens.min(prompt.len())
        } else {
            prompt.len()
        };
        let session = StageSession {
            prompt_len,
            cache: self.slice.new_cache(),
            started: false,
            pending_prompt: prompt.iter().copied().collect(),
            queue: VecDeque::new(),
            tail,
            order,
            kv_taken: 0,
            ledger: self.ledger.clone(),
        };
        self.sessions.insert(session.order.session, session);
        Ok(prompt)
    }

    /// The tail's state of a new session; a replayed session's generated tokens are pushed
    /// through the text state first, so its stream continues exactly where it stopped.
    fn tail_state(&self, sampler: Sampler, order: &SessionOrder) -> TailState {
        let mut tail = TailState {
            sampler,
            stream: None,
            emitted: 0,
            finished: false,
        };
        if order.replay_generated.is_empty() {
            return tail;
        }
        let context = self.slice.spec().context_length;
        let mut stop = order.stop.clone();
        stop.max_tokens = stop
            .max_tokens
            .min(context.saturating_sub(order.prompt_tokens))
            .max(1);
        let mut stream = TextStream::new(stop, self.tokenizer.eos());
        for &token in &order.replay_generated {
            let step = stream.push(&self.tokenizer, token);
            if step.emitted || !step.text.is_empty() {
                tail.emitted += 1;
            }
            tail.finished |= step.finished.is_some();
        }
        tail.stream = Some(stream);
        tail
    }

    fn accept_frame(&mut self, from: &str, frame: Frame, held: Option<OwnedSemaphorePermit>) {
        let hidden_size = self.slice.spec().hidden_size;
        let head = self.slice.is_head_stage();
        let (session, work, sender_ok) = match frame {
            Frame::Activations {
                session,
                start_pos,
                rows,
                hidden,
                sample,
                data,
            } => {
                if head || hidden as usize != hidden_size {
                    let why = if head {
                        "the head stage takes no activations".to_string()
                    } else {
                        format!("hidden size {hidden}, expected {hidden_size}")
                    };
                    return self.fail(session, format!("bad activations frame: {why}"));
                }
                let expected = self
                    .sessions
                    .get(&session)
                    .and_then(|s| s.order.prev.as_ref())
                    .map(|p| p.worker_id == from);
                (
                    session,
                    Work::Hidden {
                        start: start_pos as usize,
                        rows: rows as usize,
                        sample,
                        data,
                        _held: held,
                    },
                    expected,
                )
            }
            Frame::Token {
                session,
                position,
                token,
            } => {
                if !head {
                    return self.fail(session, "only the head stage takes tokens".into());
                }
                let expected = self
                    .sessions
                    .get(&session)
                    .map(|s| s.order.tail.worker_id == from);
                (
                    session,
                    Work::Tokens {
                        start: position as usize,
                        ids: vec![token],
                        sample: true,
                        _held: held,
                    },
                    expected,
                )
            }
        };
        match sender_ok {
            Some(true) => {
                // A session never has more rows in flight than its context holds: a sender
                // that floods a stage fails its own session.
                let context = self.slice.spec().context_length;
                let backlog: usize = self
                    .sessions
                    .get(&session)
                    .map_or(0, |s| s.queue.iter().map(work_rows).sum());
                if backlog + work_rows(&work) > context {
                    return self.fail(
                        session,
                        format!("{from} sent more rows than the context holds"),
                    );
                }
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.queue.push_back(work);
                }
            }
            Some(false) => warn!(
                session,
                from, "frame from a worker this session does not name; dropped"
            ),
            None => debug!(session, from, "frame for a session not open here; dropped"),
        }
    }

    /// Picks one piece of work per session (the next prefill chunk or the next queued frame).
    fn take_batch(&mut self) -> Vec<(u64, Work)> {
        let context = self.slice.spec().context_length;
        let per_position =
            self.slice.spec().kv_bytes_per_token_per_layer() * self.slice.range().len() as u64;
        let mut batch = Vec::new();
        let mut failed = Vec::new();
        for (&id, s) in self.sessions.iter_mut() {
            let work = match s.queue.pop_front() {
                Some(w) => w,
                None if s.started && !s.pending_prompt.is_empty() => {
                    let done = s.cache.len();
                    let chunk = if done < s.prompt_len {
                        (s.prompt_len - done).min(PREFILL_CHUNK)
                    } else {
                        1
                    };
                    let n = s.pending_prompt.len().min(chunk);
                    let ids: Vec<u32> = s.pending_prompt.drain(..n).collect();
                    Work::Tokens {
                        start: s.cache.len(),
                        ids,
                        sample: s.pending_prompt.is_empty(),
                        _held: None,
                    }
                }
                None => continue,
            };
            let (start, rows) = match &work {
                Work::Tokens { start, ids, .. } => (*start, ids.len()),
                Work::Hidden { start, rows, .. } => (*start, *rows),
            };
            if start != s.cache.len() || rows == 0 || start + rows > context {
                failed.push((id, format!("frame at position {start} with {rows} rows does not continue the session at {} (context {context})", s.cache.len())));
                continue;
            }
            // The positions this forward adds to the cache, taken before it runs (what a failed
            // forward rolled back stays taken, so it is not taken twice).
            let grow = ((start + rows) as u64 * per_position).saturating_sub(s.kv_taken);
            if let Err(why) = s.ledger.take_kv(grow) {
                failed.push((id, why));
                continue;
            }
            s.kv_taken += grow;
            batch.push((id, work));
        }
        for (id, error) in failed {
            self.fail(id, error);
        }
        batch
    }

    /// Runs one batch: its forward, then its frames for the next hop or its samples.
    fn run_batch(&mut self, batch: Vec<(u64, Work)>) {
        if batch.is_empty() {
            return;
        }
        let began = Instant::now();
        let input = match self.batch_input(&batch) {
            Ok(input) => input,
            Err(e) => {
                for (id, _) in &batch {
                    self.fail(*id, e.to_string());
                }
                return;
            }
        };
        let ids: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
        let rows: Vec<usize> = batch.iter().map(|(_, w)| work_rows(w)).collect();
        let output = {
            let mut caches: Vec<(u64, SessionCache)> = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(s) = self.sessions.get_mut(id) {
                    caches.push((*id, std::mem::replace(&mut s.cache, self.slice.new_cache())));
                }
            }
            let mut segments: Vec<SegmentInput<'_>> = caches
                .iter_mut()
                .zip(&rows)
                .map(|((_, cache), &rows)| SegmentInput { cache, rows })
                .collect();
            // A panic in a forward (a kernel's bug: peer input is checked before it gets
            // here) fails the batch's sessions at once and leaves the engine serving the rest,
            // instead of ending the engine's task with every session it holds.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                #[cfg(test)]
                tests::panic_if_asked();
                self.slice.forward(input, &mut segments)
            }));
            drop(segments);
            for (id, cache) in caches {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.cache = cache;
                }
            }
            match result {
                Ok(output) => output.map_err(|e| format!("forward failed: {e}")),
                Err(panic) => Err(format!("forward panicked: {}", panic_message(&*panic))),
            }
        };
        debug!(
            segments = batch.len(),
            rows = rows.iter().sum::<usize>(),
            open = self.sessions.len(),
            us = began.elapsed().as_micros() as u64,
            "stage forward"
        );
        match output {
            Ok(SliceOutput::Hidden(h)) => self.forward_hidden(&batch, &h),
            Ok(SliceOutput::Logits(l)) => self.sample(&batch, &l),
            Err(error) => {
                for id in ids {
                    self.fail(id, error.clone());
                }
            }
        }
        // A chunk of a long prompt is progress although no token comes of it yet: the
        // coordinator's stall watchdog hears of it.
        for (id, work) in &batch {
            let (start, sample) = work_start_sample(work);
            if !sample && self.sessions.contains_key(id) {
                let positions = (start + work_rows(work)) as u32;
                let _ = self.out.send(EngineOutput::Prefilled {
                    session: *id,
                    positions,
                });
            }
        }
    }

    fn batch_input(&self, batch: &[(u64, Work)]) -> candle_core::Result<SliceInput> {
        if self.slice.is_head_stage() {
            let ids = batch
                .iter()
                .flat_map(|(_, w)| match w {
                    Work::Tokens { ids, .. } => ids.clone(),
                    Work::Hidden { .. } => Vec::new(),
                })
                .collect();
            return Ok(SliceInput::Tokens(ids));
        }
        let hidden = self.slice.spec().hidden_size;
        let mut data = Vec::new();
        for (_, w) in batch {
            if let Work::Hidden { data: d, .. } = w {
                data.extend_from_slice(d);
            }
        }
        let rows = data.len() / hidden.max(1);
        Ok(SliceInput::Hidden(Tensor::from_vec(
            data,
            (rows, hidden),
            &Device::Cpu,
        )?))
    }

    fn forward_hidden(&mut self, batch: &[(u64, Work)], hidden: &Tensor) {
        let width = self.slice.spec().hidden_size;
        let mut offset = 0;
        for (id, work) in batch {
            let rows = work_rows(work);
            let (start, sample) = work_start_sample(work);
            let data = hidden
                .narrow(0, offset, rows)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>());
            offset += rows;
            let Some(next) = self.sessions.get(id).and_then(|s| s.order.next.clone()) else {
                continue;
            };
            match data {
                Ok(data) => {
                    let frame = Frame::Activations {
                        session: *id,
                        start_pos: start as u32,
                        rows: rows as u32,
                        hidden: width as u32,
                        sample,
                        data,
                    };
                    let _ = self.out.send(EngineOutput::Send { to: next, frame });
                }
                Err(e) => self.fail(*id, format!("reading activations: {e}")),
            }
        }
    }

    fn sample(&mut self, batch: &[(u64, Work)], logits: &Tensor) {
        let context = self.slice.spec().context_length;
        for (row, (id, work)) in batch.iter().enumerate() {
            let (start, sample) = work_start_sample(work);
            if !sample {
                continue;
            }
            let position = start + work_rows(work);
            let Some(s) = self.sessions.get_mut(id) else {
                continue;
            };
            let Some(tail) = s.tail.as_mut() else {
                continue;
            };
            if tail.finished {
                continue;
            }
            let t0 = Instant::now();
            // A session that cannot be sampled fails alone: the others of the batch go on.
            #[allow(unused_mut)]
            let mut logits = match logits_row(logits, row) {
                Ok(l) => l,
                Err(e) => {
                    self.fail(*id, format!("reading logits: {e}"));
                    continue;
                }
            };
            #[cfg(test)]
            tests::poison_logits_if_asked(&mut logits);
            let token = match tail.sampler.sample(&logits, position as u64) {
                Ok(t) => t,
                Err(e) => {
                    self.fail(*id, e.to_string());
                    continue;
                }
            };
            debug!(
                target: crate::dataplane::HOP,
                us = t0.elapsed().as_micros() as u64,
                "tail sampled"
            );
            let stream = tail.stream.get_or_insert_with(|| {
                let mut stop = s.order.stop.clone();
                stop.max_tokens = stop.max_tokens.min(context.saturating_sub(position)).max(1);
                TextStream::new(stop, self.tokenizer.eos())
            });
            let step = stream.push(&self.tokenizer, token);
            let index = tail.emitted;
            if step.emitted || !step.text.is_empty() {
                tail.emitted += 1;
            }
            tail.finished = step.finished.is_some();
            // The next token goes round the ring before its event goes to the coordinator, so
            // the head starts the next step while the event travels.
            if !tail.finished {
                if s.order.head.worker_id == s.order.me {
                    s.queue.push_back(Work::Tokens {
                        start: position,
                        ids: vec![token],
                        sample: true,
                        _held: None,
                    });
                } else {
                    let frame = Frame::Token {
                        session: *id,
                        position: position as u32,
                        token,
                    };
                    let _ = self.out.send(EngineOutput::Send {
                        to: s.order.head.clone(),
                        frame,
                    });
                }
            }
            let _ = self.out.send(EngineOutput::Token {
                session: *id,
                index,
                token_id: token,
                text: step.text,
                finish: step.finished,
                emitted: step.emitted,
            });
        }
    }
}

fn session_has_work(s: &StageSession) -> bool {
    !s.queue.is_empty() || (s.started && !s.pending_prompt.is_empty())
}

fn work_rows(work: &Work) -> usize {
    match work {
        Work::Tokens { ids, .. } => ids.len(),
        Work::Hidden { rows, .. } => *rows,
    }
}

fn work_start_sample(work: &Work) -> (usize, bool) {
    match work {
        Work::Tokens { start, sample, .. } | Work::Hidden { start, sample, .. } => {
            (*start, *sample)
        }
    }
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
