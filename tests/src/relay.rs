//! A user-space UDP relay that delays every datagram, both ways: a stand-in for a wide-area
//! link in front of a worker's data plane (this host has no `tc netem`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// A running relay; stops when dropped.
pub struct DelayRelay {
    /// Where peers send to.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
    /// The tasks relaying answers back, one per sender.
    back: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
        for task in self
            .back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl DelayRelay {
    /// Relays datagrams sent to its address to `target`, and `target`'s answers back, each
    /// held `delay` on the way (so a round trip through it takes at least twice `delay`).
    pub async fn start(target: SocketAddr, delay: Duration) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay socket"));
        let addr = front.local_addr().expect("relay address");
        let back = Arc::new(Mutex::new(Vec::new()));
        let tasks = back.clone();
        let task = tokio::spawn(async move {
            // One upstream socket per sender, so the target's answers find their way back.
            let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    break;
                };
                let up = match upstream.get(&from) {
                    Some(up) => up.clone(),
                    None => {
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("upstream"));
                        up.connect(target).await.expect("connect upstream");
                        let (back, front) = (up.clone(), front.clone());
                        let relay_back = tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = back.recv(&mut buf).await {
                                let datagram = buf[..n].to_vec();
                                let front = front.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = front.send_to(&datagram, from).await;
                                });
                            }
                        });
                        tasks
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(relay_back);
                        upstream.insert(from, up.clone());
                        up
                    }
                };
                let datagram = buf[..n].to_vec();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = up.send(&datagram).await;
                });
            }
        });
        Self { addr, task, back }
    }
}
