//! The worker's data plane: a QUIC endpoint (mutual TLS with federation certificates) that
//! receives frames from the peers the coordinator named and hands them to the right stage
//! engine, and one outgoing link per neighbour and model: its own connection with one ordered
//! stream, so a stage that holds back its sender (its input budget full) holds back only that
//! model's frames. A frame is accepted only from the worker its session names as sender,
//! identified by the certificate of the connection; a malformed frame or a frame from a worker
//! no session names closes that connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::frame::{Frame, FrameError, read_head_within, read_rest, skip_rest, write_frame};
use crate::quic::{self, QuicError, TlsIdentity};
use crate::stage::{EngineInput, EngineOutput, InputBudget, Peer};

/// Log target of one line per frame at each step of a hop (debug level), for latency analysis
/// (`scripts/hop_timeline.py`).
pub const HOP: &str = "sovra_worker::hop";

/// A link that carried no frame for this long closes (its model may be gone from the pair). Far
/// longer than the coordinator lets a job stall (60 s), so a link never closes while the
/// receiver still holds frames of a session that goes on: a new link cannot overtake them.
const LINK_IDLE: Duration = Duration::from_secs(600);
/// A link's record of the sessions it carried is pruned of closed sessions past this size.
const CARRIED_PRUNE: usize = 4096;
/// How long a closing link waits for the receiver to have read its last frame.
const LINK_CLOSE: Duration = Duration::from_secs(10);
/// How long an accepted connection may go without opening its stream.
const STREAM_WAIT: Duration = Duration::from_secs(30);
/// How long a frame's head may take to arrive once its first byte has, and its body once the
/// head has been read (and, for a frame of an open session, the receiving stage's budget holds
/// room for it): the sender's own limit on a frame (shorter in tests).
const BODY_WAIT: Duration = if cfg!(test) {
    Duration::from_secs(10)
} else {
    WRITE_TIMEOUT
};
/// How long dialing a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one frame may take to be accepted by a peer. A peer whose engine runs a long
/// forward stops reading once that engine's input budget is full, so this is as long as the
/// coordinator lets a job make no progress before moving it; a peer that is gone is noticed
/// sooner, by QUIC's idle timeout.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the frames of one session go, and who may send them.
#[derive(Debug, Clone)]
pub struct Route {
    /// The session's model: its frames to a neighbour go on that model's link.
    pub model: Arc<str>,
    /// The engine of the session's model.
    pub engine: mpsc::UnboundedSender<EngineInput>,
    /// The bytes of frames that engine's input channel may hold.
    pub budget: InputBudget,
    /// Worker allowed to send activations (None on the head).
    pub prev: Option<String>,
    /// Worker allowed to send tokens (the tail; only the head takes tokens).
    pub tail: Option<String>,
}

/// An outgoing link: the peer's worker id, the address it is dialed at (a worker restarted on
/// another address gets a new link at once, not frames sent into its old process's
/// connection) and the model whose frames it carries.
type LinkKey = (String, String, Arc<str>);

/// The frames queued for a link's task, and which task (a retired link's key may be reused).
struct Link {
    id: u64,
    frames: mpsc::UnboundedSender<Frame>,
}

/// An engine that takes a frame, and the budget of its input channel.
type Destination = (mpsc::UnboundedSender<EngineInput>, InputBudget);

/// The data plane of one worker.
pub struct DataPlane {
    endpoint: quinn::Endpoint,
    routes: Mutex<HashMap<u64, Route>>,
    revoked: Mutex<HashSet<String>>,
    incoming: Mutex<HashMap<String, Vec<quinn::Connection>>>,
    links: Mutex<HashMap<LinkKey, Link>>,
    next_link: std::sync::atomic::AtomicU64,
    link_idle: Mutex<Duration>,
    failures: mpsc::UnboundedSender<EngineOutput>,
    runtime: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forgets link `id` of `key` if it is still the registered one (a newer link may have taken
/// the key); returns whether it did.
fn forget_link(links: &mut HashMap<LinkKey, Link>, key: &LinkKey, id: u64) -> bool {
    let current = links.get(key).is_some_and(|l| l.id == id);
    if current {
        links.remove(key);
    }
    current
}

/// Closes `conn` over a frame whose rest did not arrive within [`BODY_WAIT`].
fn refuse_stalled(peer: &str, conn: &quinn::Connection) {
    warn!(peer = %peer, "frame body stalled; closing the connection");
    let reason = format!("the rest of a frame did not arrive within {BODY_WAIT:?}");
    conn.close(quic::CODE_MALFORMED_FRAME.into(), reason.as_bytes());
}

/// Closes `conn` over a frame that did not read or decode, unless the connection ended under
/// the read (the sender closed it or is gone).
fn refuse_malformed(peer: &str, conn: &quinn::Connection, e: &FrameError) {
    if conn.close_reason().is_some() {
        return;
    }
    warn!(peer = %peer, cause = %e, "malformed frame; closing the connection");
    let reason = format!("malformed frame: {e}");
    conn.close(quic::CODE_MALFORMED_FRAME.into(), reason.as_bytes());
}

impl DataPlane {
    /// Binds `listen` and starts accepting peers. Frames that cannot be delivered are reported
    /// as session failures on `failures`.
    pub fn start(
        socket: std::net::UdpSocket,
        identity: &TlsIdentity,
        failures: mpsc::UnboundedSender<EngineOutput>,
    ) -> Result<Arc<Self>, QuicError> {
        let endpoint = quic::endpoint_from_socket(socket, identity)?;
        let plane = Arc::new(Self {
            endpoint,
            routes: Mutex::default(),
            revoked: Mutex::default(),
            incoming: Mutex::default(),
            links: Mutex::default(),
            next_link: Default::default(),
            link_idle: Mutex::new(LINK_IDLE),
            failures,
            runtime: tokio::runtime::Handle::current(),
        });
        plane.runtime.spawn(plane.clone().accept_loop());
        Ok(plane)
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Routes a session's frames.
    pub fn add_route(&self, session: u64, route: Route) {
        lock(&self.routes).insert(session, route);
    }

    /// Stops routing a session's frames; returns its route, if it had one.
    pub fn remove_route(&self, session: u64) -> Option<Route> {
        lock(&self.routes).remove(&session)
    }

    /// The engine a session was opened on.
    pub fn engine_of(&self, session: u64) -> Option<mpsc::UnboundedSender<EngineInput>> {
        lock(&self.routes).get(&session).map(|r| r.engine.clone())
    }

    /// Closes the endpoint and forgets every route and link (the worker is stopping), then
    /// waits up to `limit` for the peers to have been told, so they drop their links to this
    /// process at once instead of at their idle timeout.
    pub async fn close(&self, limit: Duration) {
        self.endpoint
            .close(quic::CODE_NO_ERROR.into(), b"the worker is stopping");
        lock(&self.routes).clear();
        lock(&self.links).clear();
        let _ = tokio::time::timeout(limit, self.endpoint.wait_idle()).await;
    }

    /// Refuses these workers from now on and closes their connections.
    pub fn revoke(&self, workers: &[String]) {
        lock(&self.revoked).extend(workers.iter().cloned());
        let mut incoming = lock(&self.incoming);
        for w in workers {
            for conn in incoming.remove(w).unwrap_or_default() {
                conn.close(
                    quic::CODE_REVOKED.into(),
                    b"this worker or its provider is revoked",
                );
            }
            lock(&self.links).retain(|(peer, _, _), _| peer != w);
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            self.runtime.spawn(self.clone().serve_connection(incoming));
        }
    }

    async fn serve_connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => return debug!(cause = %e, "data-plane handshake failed"),
        };
        let peer = match quic::peer_identity(&conn) {
            Ok(p) => p.worker_id,
            Err(e) => {
                return conn.close(quic::CODE_UNEXPECTED_FRAME.into(), e.to_string().as_bytes());
            }
        };
        if lock(&self.revoked).contains(&peer) {
            return conn.close(
                quic::CODE_REVOKED.into(),
                b"this worker or its provider is revoked",
            );
        }
        {
            let mut incoming = lock(&self.incoming);
            let conns = incoming.entry(peer.clone()).or_default();
            conns.retain(|c| c.close_reason().is_none());
            if conns.len() >= quic::MAX_CONNECTIONS_PER_PEER {
                drop(incoming);
                let reason = format!(
                    "worker {peer} already has {} connections open to this worker",
                    quic::MAX_CONNECTIONS_PER_PEER
                );
                warn!(peer = %peer, "connection refused: too many from this peer");
                return conn.close(quic::CODE_TOO_MANY_CONNECTIONS.into(), reason.as_bytes());
            }
            conns.push(conn.clone());
        }
        self.read_connection(&peer, &conn).await;
        let id = conn.stable_id();
        let mut incoming = lock(&self.incoming);
        if let Some(conns) = incoming.get_mut(&peer) {
            conns.retain(|c| c.stable_id() != id);
            if conns.is_empty() {
                incoming.remove(&peer);
            }
        }
    }

    /// Reads every frame of a connection's stream (a link carries one) until it ends or
    /// misbehaves.
    async fn read_connection(&self, peer: &str, conn: &quinn::Connection) {
        // A link opens its stream as soon as it connects; a peer that holds a connection open
        // without one is let go.
        let mut stream = match tokio::time::timeout(STREAM_WAIT, conn.accept_uni()).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => return,
            Err(_) => {
                let reason = format!("no stream opened within {STREAM_WAIT:?}");
                return conn.close(quic::CODE_UNEXPECTED_FRAME.into(), reason.as_bytes());
            }
        };
        loop {
            let head = match read_head_within(&mut stream, BODY_WAIT).await {
                // The sender's link closed after its last frame: nothing more comes on
                // this connection (a link carries one stream).
                Ok(None) => {
                    conn.close(quic::CODE_NO_ERROR.into(), b"link finished");
                    return;
                }
                Ok(Some(head)) => head,
                Err(FrameError::Stalled(_)) => return refuse_stalled(peer, conn),
                Err(e) => return refuse_malformed(peer, conn, &e),
            };
            let (engine, budget) = match self.route(peer, head.session(), head.is_token()) {
                Ok(Some(to)) => to,
                Ok(None) => {
                    match tokio::time::timeout(BODY_WAIT, skip_rest(&mut stream, &head)).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return refuse_malformed(peer, conn, &e),
                        Err(_) => return refuse_stalled(peer, conn),
                    }
                }
                Err(reason) => {
                    warn!(peer = %peer, %reason, "frame refused; closing the connection");
                    conn.close(quic::CODE_UNEXPECTED_FRAME.into(), reason.as_bytes());
                    return;
                }
            };
            // Back-pressure: the frame's body is not read (and this connection not read
            // further) until the engine's inputs have room for it, so the bytes a peer can
            // make this worker hold are the budget's and the QUIC windows'.
            let held = budget.hold(head.body_len()).await;
            if lock(&self.revoked).contains(peer) {
                let reason = b"this worker or its provider is revoked";
                return conn.close(quic::CODE_REVOKED.into(), reason);
            }
            let frame = match tokio::time::timeout(BODY_WAIT, read_rest(&mut stream, &head)).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(e)) => return refuse_malformed(peer, conn, &e),
                Err(_) => return refuse_stalled(peer, conn),
            };
            debug!(target: HOP, session = frame.session(), "frame read");
            let _ = engine.send(EngineInput::Frame {
                from: peer.to_string(),
                frame,
                held,
            });
        }
    }

    /// Where a frame from `peer` goes: its session's engine if `peer` is the sender the session
    /// names; nowhere (dropped) if the session is closed but `peer` is named by another one.
    fn route(
        &self,
        peer: &str,
        session: u64,
        is_token: bool,
    ) -> Result<Option<Destination>, String> {
        let routes = lock(&self.routes);
        match routes.get(&session) {
            Some(route) => {
                let expected = if is_token {
                    route.tail.as_deref()
                } else {
                    route.prev.as_deref()
                };
                if expected != Some(peer) {
                    return Err(format!(
                        "frame refused: worker {peer} is not the sender the placement names for session {session}"
                    ));
                }
                Ok(Some((route.engine.clone(), route.budget.clone())))
            }
            None if routes
                .values()
                .any(|r| r.prev.as_deref() == Some(peer) || r.tail.as_deref() == Some(peer)) =>
            {
                debug!(session, peer, "frame for a closed session dropped");
                Ok(None)
            }
            None => Err(format!(
                "frame refused: no open session on this worker names worker {peer}"
            )),
        }
    }

    /// How long a link may carry nothing before it closes (tests shorten it).
    pub fn set_link_idle(&self, idle: Duration) {
        *lock(&self.link_idle) = idle;
    }

    /// Queues a frame for `to` on the link of the frame's model, dialing it on first use.
    /// Frames to one peer for one model keep their order. A frame whose session is not open
    /// here (closed while its frames were on their way out) is dropped.
    pub fn send(self: &Arc<Self>, to: &Peer, frame: Frame) {
        let Some(model) = lock(&self.routes)
            .get(&frame.session())
            .map(|r| r.model.clone())
        else {
            return debug!(
                session = frame.session(),
                "frame of a closed session not sent"
            );
        };
        let mut links = lock(&self.links);
        let link = links
            .entry((to.worker_id.clone(), to.addr.clone(), model))
            .or_insert_with_key(|(_, _, model)| {
                let (frames, rx) = mpsc::unbounded_channel();
                let id = self
                    .next_link
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.runtime
                    .spawn(self.clone().write_loop(to.clone(), model.clone(), id, rx));
                Link { id, frames }
            });
        if let Err(mpsc::error::SendError(frame)) = link.frames.send(frame) {
            // The link's task has ended: forget it and queue the frame on a new one.
            let dead = link.id;
            links.retain(|_, l| l.id != dead);
            drop(links);
            self.send(to, frame);
        }
    }

    /// Forgets link `id` of `key` if it is still the registered one and nothing is queued for
    /// it (checked under the lock `send` queues under, so no frame can slip in); returns
    /// whether it did.
    fn retire(&self, key: &LinkKey, id: u64, rx: &mpsc::UnboundedReceiver<Frame>) -> bool {
        let mut links = lock(&self.links);
        rx.is_empty() && forget_link(&mut links, key, id)
    }

    async fn write_loop(
        self: Arc<Self>,
        to: Peer,
        model: Arc<str>,
        id: u64,
        mut rx: mpsc::UnboundedReceiver<Frame>,
    ) {
        let key = (to.worker_id.clone(), to.addr.clone(), model.clone());
        let idle = *lock(&self.link_idle);
        let result = async {
            let addr = tokio::net::lookup_host(&to.addr)
                .await
                .map_err(|e| format!("resolving {}: {e}", to.addr))?
                .next()
                .ok_or_else(|| format!("{} resolves to no address", to.addr))?;
            let conn = quic::connect(&self.endpoint, addr, &to.worker_id, CONNECT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, conn.open_uni())
                .await
                .map_err(|_| {
                    format!(
                        "{} granted no stream within {CONNECT_TIMEOUT:?}",
                        to.worker_id
                    )
                })?
                .map_err(|e| format!("opening a stream to {}: {e}", to.worker_id))?;
            info!(peer = %to.worker_id, model = %model, addr = %addr, "data-plane link up");
            let mut carried = HashSet::new();
            let closed = conn.closed();
            tokio::pin!(closed);
            // Checked on a coarse tick rather than a timer reset per frame (a frame's path is
            // the hop's critical path).
            let first = tokio::time::Instant::now() + idle / 4;
            let mut tick = tokio::time::interval_at(first, idle / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_frame = std::time::Instant::now();
            loop {
                let frame = tokio::select! {
                    biased;
                    frame = rx.recv() => match frame {
                        Some(frame) => {
                            last_frame = std::time::Instant::now();
                            frame
                        }
                        // The link was removed: the worker stops, or the peer is revoked.
                        None => {
                            if lock(&self.revoked).contains(&to.worker_id) {
                                let reason = "its provider is revoked";
                                self.report_carried(&carried, &to, reason);
                            }
                            return Ok(());
                        }
                    },
                    // The receiver closed the connection (or it was lost): whatever this link
                    // wrote that the receiver had not taken is gone.
                    why = &mut closed => {
                        let reason = format!("the connection ended: {why}");
                        self.report_carried(&carried, &to, &reason);
                        return Err(reason);
                    }
                    _ = tick.tick() => {
                        if last_frame.elapsed() >= idle && self.retire(&key, id, &rx) {
                            let peer = &to.worker_id;
                            debug!(%peer, %model, "idle data-plane link closed");
                            // The receiver closes the connection once it has read the end of
                            // the stream, so nothing written is thrown away.
                            let _ = stream.finish();
                            if tokio::time::timeout(LINK_CLOSE, &mut closed).await.is_err() {
                                conn.close(quic::CODE_NO_ERROR.into(), b"idle link");
                            }
                            return Ok(());
                        }
                        continue;
                    }
                };
                if lock(&self.revoked).contains(&to.worker_id) {
                    let reason = "its provider is revoked".to_string();
                    self.report_undelivered(&frame, &to, &reason);
                    self.report_carried(&carried, &to, &reason);
                    conn.close(quic::CODE_REVOKED.into(), b"your provider is revoked");
                    return Err(reason);
                }
                let session = frame.session();
                let written =
                    tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut stream, &frame)).await;
                let error = match written {
                    Ok(Ok(())) => {
                        debug!(target: HOP, session, "frame written");
                        if carried.insert(session) && carried.len() > CARRIED_PRUNE {
                            let routes = lock(&self.routes);
                            carried.retain(|s| routes.contains_key(s));
                        }
                        continue;
                    }
                    Ok(Err(FrameError::Io(e))) => e,
                    // `write_frame` checks a frame before writing any of it: one the engine
                    // made invalid (a non-finite value, say) fails its own session, and the
                    // link and the other sessions on it go on.
                    Ok(Err(e)) => {
                        let _ = self.failures.send(EngineOutput::Failed {
                            session,
                            error: format!("this stage produced an invalid frame: {e}"),
                        });
                        continue;
                    }
                    Err(_) => format!("the peer read nothing for {WRITE_TIMEOUT:?}"),
                };
                self.report_undelivered(&frame, &to, &error);
                carried.remove(&session);
                let reason = format!("writing to {}: {error}", to.worker_id);
                self.report_carried(&carried, &to, &reason);
                return Err(reason);
            }
        }
        .await;
        if let Err(reason) = result {
            warn!(peer = %to.worker_id, model = %model, %reason, "data-plane link lost");
            forget_link(&mut lock(&self.links), &key, id);
            rx.close();
            while let Some(frame) = rx.recv().await {
                self.report_undelivered(&frame, &to, &reason);
            }
        }
    }

    /// Fails the sessions still open here that this link carried frames of: the connection
    /// they went on is gone, and the receiver may not have taken them.
    fn report_carried(&self, carried: &HashSet<u64>, to: &Peer, reason: &str) {
        let open: Vec<u64> = {
            let routes = lock(&self.routes);
            carried
                .iter()
                .copied()
                .filter(|s| routes.contains_key(s))
                .collect()
        };
        for session in open {
            let _ = self.failures.send(EngineOutput::Failed {
                session,
                error: format!("lost the link to {}: {reason}", to.worker_id),
            });
        }
    }

    fn report_undelivered(&self, frame: &Frame, to: &Peer, reason: &str) {
        let _ = self.failures.send(EngineOutput::Failed {
            session: frame.session(),
            error: format!("cannot reach {}: {reason}", to.worker_id),
        });
    }
}

#[cfg(test)]
#[path = "dataplane_tests.rs"]
mod tests;
