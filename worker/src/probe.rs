//! Round trips to the data planes of the other workers, for the coordinator's planner: the
//! coordinator sends the list of the workers up; each is dialed over QUIC with the worker's
//! own certificate (mutual TLS, as a data link is) from an endpoint of its own, so the
//! measurement never waits for a forward running on this worker's data-plane thread. A probe opens a few
//! connections one after the other and keeps the smallest round-trip time QUIC measured
//! during their handshakes; nothing is sent on them. The peer answers a handshake on its
//! data-plane thread, between forwards, so a round trip can include the rest of a forward the
//! peer was running: the smallest of the tries, spaced apart, is kept. New peers are probed at
//! once, the others again every interval.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sovra_proto::pb;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tracing::debug;

use crate::quic::{self, QuicError, TlsIdentity};

/// Connections opened per probe of a peer (the smallest round trip is kept).
pub const PROBE_TRIES: usize = 3;
/// How long one connection of a probe may take to be established.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a peer is probed again.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// Pause between the connections of one probe, so that they do not all meet the same
/// forward on the peer (its data-plane thread answers handshakes between forwards).
const TRY_GAP: Duration = Duration::from_millis(25);
/// Most peers of a list that are taken (a federation has fewer workers).
const MAX_PEERS: usize = 4096;
/// Peers probed at once.
const CONCURRENCY: usize = 16;

/// A peer: worker id, data-plane address and epoch (a worker that connected to the
/// coordinator anew, at any address, is a new one).
type PeerKey = (String, String, u64);

/// Measures round trips to the peers the coordinator names.
pub struct Prober {
    endpoint: quinn::Endpoint,
    me: String,
    interval: Duration,
    peers: Mutex<Vec<PeerKey>>,
    last: Mutex<HashMap<PeerKey, Instant>>,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Prober {
    /// A prober for worker `me`, dialing from an ephemeral port of `bind` (the data plane's
    /// address family). Must be called inside a tokio runtime.
    pub fn new(
        identity: &TlsIdentity,
        me: &str,
        bind: IpAddr,
        interval: Duration,
    ) -> Result<Arc<Self>, QuicError> {
        let endpoint = quic::endpoint(SocketAddr::new(bind, 0), identity)?;
        // It only dials: nobody may open a connection to it.
        endpoint.set_server_config(None);
        Ok(Arc::new(Self {
            endpoint,
            me: me.to_string(),
            interval,
            peers: Mutex::default(),
            last: Mutex::default(),
            wake: Notify::new(),
        }))
    }

    /// Replaces the list of peers (this worker is left out) and probes the new ones at once.
    pub fn set_peers(&self, peers: Vec<pb::ProbeTarget>) {
        let peers: Vec<PeerKey> = peers
            .into_iter()
            .filter(|p| p.worker_id != self.me)
            .take(MAX_PEERS)
            .map(|p| (p.worker_id, p.addr, p.epoch))
            .collect();
        let listed: HashSet<&PeerKey> = peers.iter().collect();
        lock(&self.last).retain(|key, _| listed.contains(key));
        *lock(&self.peers) = peers;
        self.wake.notify_one();
    }

    /// Forgets the peers and what was measured: called as an agent stream opens (its
    /// coordinator may have restarted and forgotten the measurements), before its list comes.
    pub fn reset(&self) {
        lock(&self.peers).clear();
        lock(&self.last).clear();
    }

    /// Probes the peers that are due (new, or last probed an interval ago) and sends their
    /// round trips on `tx`, until `tx` closes.
    pub async fn run(self: Arc<Self>, tx: mpsc::Sender<pb::AgentMessage>) {
        loop {
            let now = Instant::now();
            let due: Vec<PeerKey> = {
                let last = lock(&self.last);
                lock(&self.peers)
                    .iter()
                    .filter(|key| last.get(*key).is_none_or(|t| now - *t >= self.interval))
                    .cloned()
                    .collect()
            };
            if !due.is_empty() {
                let measured = self.measure_all(due).await;
                let (keys, peers): (Vec<PeerKey>, Vec<pb::PeerLatency>) =
                    measured.into_iter().unzip();
                let message = pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::Latencies(pb::PeerLatencies {
                        peers,
                    })),
                };
                if tx.send(message).await.is_err() {
                    return;
                }
                // Done once reported; a peer dropped from the list meanwhile stays dropped.
                let peers = lock(&self.peers);
                let listed: HashSet<&PeerKey> = peers.iter().collect();
                let mut last = lock(&self.last);
                for key in keys.into_iter().filter(|k| listed.contains(k)) {
                    last.insert(key, Instant::now());
                }
            }
            let next = {
                let last = lock(&self.last);
                let now = Instant::now();
                lock(&self.peers)
                    .iter()
                    .filter_map(|key| last.get(key))
                    .map(|t| (*t + self.interval).saturating_duration_since(now))
                    .min()
                    .unwrap_or(self.interval)
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(next) => {}
            }
        }
    }

    /// Probes `due`, [`CONCURRENCY`] peers at a time.
    async fn measure_all(&self, due: Vec<PeerKey>) -> Vec<(PeerKey, pb::PeerLatency)> {
        let mut out = Vec::with_capacity(due.len());
        for batch in due.chunks(CONCURRENCY) {
            let mut running = JoinSet::new();
            for key in batch.iter().cloned() {
                let endpoint = self.endpoint.clone();
                running.spawn(async move {
                    let result = measure(&endpoint, &key.0, &key.1).await;
                    (key, result)
                });
            }
            while let Some(done) = running.join_next().await {
                let Ok((key, result)) = done else { continue };
                let (worker_id, addr) = (key.0.clone(), &key.1);
                let latency = match result {
                    Ok(rtt) => {
                        debug!(peer = %worker_id, %addr, rtt_us = rtt.as_micros() as u64, "round trip measured");
                        pb::PeerLatency {
                            worker_id,
                            rtt_us: (rtt.as_micros() as u64).max(1),
                            error: String::new(),
                        }
                    }
                    Err(error) => {
                        debug!(peer = %worker_id, %addr, %error, "peer unreachable");
                        pb::PeerLatency {
                            worker_id,
                            rtt_us: 0,
                            error,
                        }
                    }
                };
                out.push((key, latency));
            }
        }
        out
    }
}

/// The smallest round trip QUIC measured over [`PROBE_TRIES`] handshakes with `worker_id`
/// at `addr`.
pub async fn measure(
    endpoint: &quinn::Endpoint,
    worker_id: &str,
    addr: &str,
) -> Result<Duration, String> {
    let resolved = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| format!("resolving {addr} took over {PROBE_TIMEOUT:?}"))?
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    let mut best: Option<Duration> = None;
    for i in 0..PROBE_TRIES {
        if i > 0 {
            tokio::time::sleep(TRY_GAP).await;
        }
        let conn = quic::connect(endpoint, resolved, worker_id, PROBE_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let rtt = conn.rtt();
        conn.close(quic::CODE_NO_ERROR.into(), b"round-trip probe");
        best = Some(best.map_or(rtt, |b| b.min(rtt)));
    }
    best.ok_or_else(|| "no probe ran".to_string())
}
