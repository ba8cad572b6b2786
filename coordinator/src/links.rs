//! Round-trip times between workers: every worker measures them to the data planes of the
//! others (the coordinator sends it the list of the workers up whenever one comes up) and
//! reports them on its agent stream; the planner charges each chain's ring with them, and
//! `sovra worker links` shows them. They are kept in memory only: after a restart of the
//! coordinator the workers, reconnecting, measure them again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sovra_proto::pb;

use crate::federation::{AgentCommand, Federation};
use crate::planner::Links;

/// Most entries of one report that are read (a federation has fewer workers).
pub const MAX_REPORTED: usize = 4096;
/// A round trip reported beyond this is taken as the peer being unreachable.
pub const MAX_RTT: Duration = Duration::from_secs(60);

/// The last measurement of one link.
#[derive(Debug, Clone)]
pub struct LinkSample {
    /// Round-trip time; None when the peer could not be reached.
    pub rtt: Option<Duration>,
    /// Why the peer could not be reached (empty when it was).
    pub error: String,
    /// When the report came.
    pub at: Instant,
}

/// A link between two workers that are up, as `ListLinks` shows it.
#[derive(Debug, Clone)]
pub struct LinkView {
    /// The worker that measured it (and sends frames over it).
    pub from: String,
    /// The worker it reached.
    pub to: String,
    /// The sample.
    pub sample: LinkSample,
}

impl Federation {
    /// Forgets what was measured to and from `worker` (it has just connected anew: its peers
    /// measure it again at once), then sends the lists (see [`Self::send_probe_lists`]).
    pub(crate) fn worker_came_up(&self, worker: &str) {
        self.live()
            .links
            .retain(|(from, to), _| from != worker && to != worker);
        self.send_probe_lists();
    }

    /// Sends every worker up the list of the workers up (each with the number of its current
    /// agent stream as its epoch), to measure its round trips to, and forgets the links of
    /// workers that are no longer up.
    pub(crate) fn send_probe_lists(&self) {
        let mut live = self.live();
        let peers: Vec<(String, String, u64)> = live
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), w.addr.clone(), w.stream))
            .collect();
        for w in live.workers.values() {
            let _ = w.commands.send(AgentCommand::ProbePeers(peers.clone()));
        }
        let up = |id: &String| peers.iter().any(|(p, ..)| p == id);
        live.links.retain(|(from, to), _| up(from) && up(to));
    }

    /// Records what `worker` measured. Entries about itself or about workers that are not up
    /// are dropped; a round trip of zero or beyond [`MAX_RTT`] counts as unreachable.
    pub fn record_latencies(&self, worker: &str, report: pb::PeerLatencies) {
        let at = Instant::now();
        let mut live = self.live();
        for peer in report.peers.into_iter().take(MAX_REPORTED) {
            if peer.worker_id == worker || !live.workers.contains_key(&peer.worker_id) {
                continue;
            }
            let rtt = Duration::from_micros(peer.rtt_us);
            let sample = if !peer.error.is_empty() {
                LinkSample {
                    rtt: None,
                    error: peer.error.chars().take(500).collect(),
                    at,
                }
            } else if peer.rtt_us == 0 || rtt > MAX_RTT {
                let error = format!(
                    "reported a round trip of {} µs, outside 1 µs..{} s",
                    peer.rtt_us,
                    MAX_RTT.as_secs()
                );
                LinkSample {
                    rtt: None,
                    error,
                    at,
                }
            } else {
                LinkSample {
                    rtt: Some(rtt),
                    error: String::new(),
                    at,
                }
            };
            live.links
                .insert((worker.to_string(), peer.worker_id), sample);
        }
    }

    /// The links between workers that are up, ordered by (from, to).
    pub fn links(&self) -> Vec<LinkView> {
        let live = self.live();
        let mut out: Vec<LinkView> = live
            .links
            .iter()
            .filter(|((from, to), _)| {
                live.workers.contains_key(from) && live.workers.contains_key(to)
            })
            .map(|((from, to), sample)| LinkView {
                from: from.clone(),
                to: to.clone(),
                sample: sample.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        out
    }

    /// The measured links, as the planner takes them: a pair's round trip is the larger of
    /// what its two workers measured (where both did), so no worker can make itself look
    /// closer than its peers find it by what it reports.
    pub(crate) fn planner_links(&self) -> Links {
        planner_links(&self.links())
    }
}

/// The planner's links from `views`: see [`Federation::planner_links`].
fn planner_links(views: &[LinkView]) -> Links {
    let rtt: HashMap<(&str, &str), Option<f64>> = views
        .iter()
        .map(|v| {
            let rtt = v.sample.rtt.map(|r| r.as_secs_f64());
            ((v.from.as_str(), v.to.as_str()), rtt)
        })
        .collect();
    let mut links = Links::default();
    for (&(from, to), &there) in &rtt {
        let worst = match rtt.get(&(to, from)) {
            Some(&back) => there.zip(back).map(|(a, b)| a.max(b)),
            None => there,
        };
        links.insert(from, to, worst);
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(from: &str, to: &str, rtt_ms: Option<u64>) -> LinkView {
        LinkView {
            from: from.into(),
            to: to.into(),
            sample: LinkSample {
                rtt: rtt_ms.map(Duration::from_millis),
                error: if rtt_ms.is_some() { "" } else { "timed out" }.into(),
                at: Instant::now(),
            },
        }
    }

    #[test]
    fn a_pair_costs_the_larger_of_its_two_measurements() {
        let links = planner_links(&[
            view("a", "b", Some(2)),
            view("b", "a", Some(80)),
            view("a", "c", Some(10)),
            view("c", "b", None),
            view("b", "c", Some(4)),
        ]);
        // a reports a round trip of 2 ms to b, b finds a 80 ms away: 40 ms one way, both ways.
        assert_eq!(links.one_way_s("a", "b"), Some(0.040));
        assert_eq!(links.one_way_s("b", "a"), Some(0.040));
        // Measured one way only: that measurement.
        assert_eq!(links.one_way_s("a", "c"), Some(0.005));
        assert_eq!(links.one_way_s("c", "a"), None);
        // Unreachable one way: unreachable both ways.
        let unreachable = Some(crate::planner::UNREACHABLE_S);
        assert_eq!(links.one_way_s("b", "c"), unreachable);
        assert_eq!(links.one_way_s("c", "b"), unreachable);
    }
}
