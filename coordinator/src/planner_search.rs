//! Search machinery of the layer planner: per-limit reach tables, the exact
//! (subset) and greedy/beam searches for worker orders, and the latency-optimal
//! split of the layers over an order.

use super::{Chain, LayerRange, Links, ModelCost, Stage, WorkerCandidate};
use std::cmp::Reverse;

/// Fraction above the minimal bottleneck that a chain may accept to use fewer
/// stages; within that many stages, the fraction of the bottleneck's compute
/// time that it may accept to lower its latency (see [`slack_limit`]).
pub(super) const SLACK: f64 = 0.03;
/// Largest pool of workers searched exactly (over all its subsets); larger pools
/// are searched greedily.
const EXACT_MAX_WORKERS: usize = 12;
/// Most candidate worker orders whose layer split is optimised for latency.
const MAX_ORDERS: usize = 64;
/// Partial chains kept at each step of the beam search.
const BEAM_WIDTH: usize = 32;
/// Best (head, tail) pairs also tried with the beam search.
const BEAM_PAIRS: usize = 8;

/// Ordered stage assignment: (index into `Ctx::workers`, layers).
pub(super) type Assignment = Vec<(usize, LayerRange)>;

/// The model's costs together with the workers being planned over.
pub(super) struct Ctx<'a> {
    pub(super) model: &'a ModelCost,
    pub(super) workers: Vec<&'a WorkerCandidate>,
    /// `prefix[i]`: bytes of layers `0..i`, KV reserve included.
    pub(super) prefix: Vec<u64>,
    hop: f64,
    /// `delay[a * n + b]`: what a frame from worker `a` to worker `b` is charged, seconds: the
    /// measured one-way delay, at least `hop` (a hop costs more than the wire: the frame is
    /// written, read and handed to the next forward).
    delay: Vec<Option<f64>>,
    /// What each worker's stage is charged for receiving its input from another worker: the
    /// least delay from any other worker (a link not measured costs `hop`); `hop` for all when
    /// nothing is measured. A stage holding the whole model has no such input: it pays `hop`.
    hop_in: Vec<f64>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(
        model: &'a ModelCost,
        workers: Vec<&'a WorkerCandidate>,
        hop: f64,
        links: &Links,
    ) -> Self {
        let mut prefix = Vec::with_capacity(model.layers + 1);
        let mut acc = 0u64;
        prefix.push(acc);
        for bytes in &model.layer_bytes {
            acc = acc.saturating_add(bytes.saturating_add(model.kv_reserve_per_layer));
            prefix.push(acc);
        }
        let delay = if links.is_empty() {
            Vec::new()
        } else {
            let ids = || workers.iter().map(|w| w.worker_id.as_str());
            ids()
                .flat_map(|a| ids().map(move |b| links.one_way_s(a, b).map(|d| d.max(hop))))
                .collect()
        };
        let n = workers.len();
        let hop_in = (0..n)
            .map(|b| {
                let from = (0..n).filter(|&a| a != b);
                let cost = |a: usize| delay.get(a * n + b).copied().flatten().unwrap_or(hop);
                from.map(cost).reduce(f64::min).unwrap_or(hop)
            })
            .collect();
        Self {
            model,
            workers,
            prefix,
            hop,
            delay,
            hop_in,
        }
    }

    /// What the ring `order` (each stage to the next, the tail back to the head) adds per token
    /// to the latency its stages were charged: each stage pays the delay of the link it gets its
    /// input on (the fixed hop when not measured) instead of its least incoming delay. A chain
    /// of one stage has no link.
    pub(super) fn ring_extra(&self, order: &[usize]) -> f64 {
        let n = self.workers.len();
        if self.delay.is_empty() {
            return 0.0;
        }
        super::ring(order)
            .map(|(&a, &b)| self.delay[a * n + b].unwrap_or(self.hop) - self.hop_in[b])
            .sum()
    }

    pub(super) fn layers(&self) -> usize {
        self.model.layers
    }

    /// Memory a stage holding layers `start..end` needs.
    pub(super) fn memory(&self, start: usize, end: usize) -> u64 {
        let (head, tail) = (start == 0, end == self.layers());
        let mut bytes = self.prefix[end] - self.prefix[start];
        if head {
            bytes = bytes.saturating_add(self.model.embedding_bytes);
        }
        if tail && !(head && self.model.tied_embeddings) {
            bytes = bytes.saturating_add(self.model.head_bytes);
        }
        bytes
    }

    /// Per-token compute time of worker `w` running `count` layers (plus the head if `tail`).
    fn compute(&self, w: usize, count: usize, tail: bool) -> f64 {
        let head = if tail { self.model.head_flops } else { 0.0 };
        let flops = count as f64 * self.model.layer_flops + head;
        flops / (self.workers[w].speed_gflops * 1e9)
    }

    /// Per-token time of worker `w` running `count` layers (plus the head if `tail`) as one
    /// stage of several: its compute and its input's delay.
    pub(super) fn time(&self, w: usize, count: usize, tail: bool) -> f64 {
        self.compute(w, count, tail) + self.hop_in[w]
    }

    /// Per-token time of worker `w` holding the whole model: no link, the fixed hop.
    fn whole_time(&self, w: usize) -> f64 {
        self.compute(w, self.layers(), true) + self.hop
    }

    /// Per-token time of worker `w` running layers `start..end`.
    fn stage_time(&self, w: usize, start: usize, end: usize) -> f64 {
        if start == 0 && end == self.layers() {
            self.whole_time(w)
        } else {
            self.time(w, end - start, end == self.layers())
        }
    }

    /// Least memory any chain needs in total.
    pub(super) fn minimal_need(&self) -> u64 {
        let head = if self.model.tied_embeddings {
            0
        } else {
            self.model.head_bytes
        };
        self.prefix[self.layers()]
            .saturating_add(self.model.embedding_bytes)
            .saturating_add(head)
    }

    /// The chain of an assignment, with each stage's memory and time.
    pub(super) fn chain(&self, assignment: &[(usize, LayerRange)]) -> Chain {
        let stage = |&(w, range): &(usize, LayerRange)| Stage {
            worker_id: self.workers[w].worker_id.clone(),
            range,
            memory_bytes: self.memory(range.start, range.end),
            time_s: self.stage_time(w, range.start, range.end),
        };
        Chain {
            stages: assignment.iter().map(stage).collect(),
        }
    }
}

/// For a bottleneck limit: how far each worker can carry the chain from each layer.
struct Reach {
    width: usize,
    /// `table[w * width + p]`: the largest `q` such that worker `w` can hold
    /// `p..q` within the limit (`q == p` when it cannot hold layer `p`).
    table: Vec<usize>,
    /// Most layers each worker can hold anywhere past layer 0.
    span: Vec<usize>,
    /// Most layers each worker can hold as the last stage (head included).
    tail: Vec<usize>,
    /// Memory of each worker, to break ties in favour of the smaller one.
    memory: Vec<u64>,
}

impl Reach {
    fn new(ctx: &Ctx, limit: f64) -> Self {
        let width = ctx.layers() + 1;
        let mut table = Vec::with_capacity(ctx.workers.len() * width);
        let mut span = Vec::with_capacity(ctx.workers.len());
        let mut tail = Vec::with_capacity(ctx.workers.len());
        for w in 0..ctx.workers.len() {
            let mid_cap = time_cap(ctx, w, limit, false);
            let tail_cap = time_cap(ctx, w, limit, true);
            let whole = ctx.whole_time(w) <= limit;
            let row = (0..width).map(|p| reach_from(ctx, w, p, mid_cap, tail_cap, whole));
            let start = table.len();
            table.extend(row);
            let row = &table[start..];
            span.push((1..width).map(|p| row[p] - p).max().unwrap_or(0));
            let last = width - 1;
            tail.push(last - (0..last).find(|&p| row[p] == last).unwrap_or(last));
        }
        let memory = ctx.workers.iter().map(|w| w.memory_bytes).collect();
        Self {
            width,
            table,
            span,
            tail,
            memory,
        }
    }

    fn layers(&self) -> usize {
        self.width - 1
    }

    fn get(&self, w: usize, p: usize) -> usize {
        self.table[w * self.width + p]
    }
}

/// Most layers worker `w` can run within `limit` seconds (0 if none).
fn time_cap(ctx: &Ctx, w: usize, limit: f64, tail: bool) -> usize {
    let (mut lo, mut hi) = (0, ctx.layers());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if ctx.time(w, mid, tail) <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The largest `q` such that worker `w` can hold layers `p..q` (see [`Reach`]); `whole`: it
/// may hold the whole model within the limit.
fn reach_from(
    ctx: &Ctx,
    w: usize,
    p: usize,
    mid_cap: usize,
    tail_cap: usize,
    whole: bool,
) -> usize {
    let (layers, memory) = (ctx.layers(), ctx.workers[w].memory_bytes);
    if p >= layers || (layers - p <= tail_cap && ctx.memory(p, layers) <= memory) {
        return layers;
    }
    if p == 0 && whole && ctx.memory(0, layers) <= memory {
        return layers;
    }
    let (mut lo, mut hi) = (p, (p + mid_cap).min(layers - 1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if ctx.memory(p, mid) <= memory {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Every stage time any worker of `pool` could have, ascending (the optimal bottleneck is
/// one of them), each with what such a stage is charged for its input (the largest, where
/// stages of several workers take the same time).
struct Candidates {
    times: Vec<f64>,
    inputs: Vec<f64>,
}

fn candidates(ctx: &Ctx, pool: &[usize]) -> Candidates {
    let layers = ctx.layers();
    let times = pool.iter().flat_map(|&w| {
        let input = ctx.hop_in[w];
        let parts = (1..=layers).flat_map(move |c| {
            [
                (ctx.time(w, c, false), input),
                (ctx.time(w, c, true), input),
            ]
        });
        parts.chain([(ctx.whole_time(w), ctx.hop)])
    });
    let mut all: Vec<(f64, f64)> = times.filter(|(t, _)| t.is_finite()).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    all.dedup_by(|next, kept| next.0 == kept.0);
    let (times, inputs) = all.into_iter().unzip();
    Candidates { times, inputs }
}

impl Candidates {
    /// What the stage whose time is `limit` is charged for its input (`hop` if none is).
    fn input(&self, limit: f64, hop: f64) -> f64 {
        match self.times.binary_search_by(|t| t.total_cmp(&limit)) {
            Ok(i) => self.inputs[i],
            Err(_) => hop,
        }
    }
}

/// The smallest candidate for which `ok` holds, assuming `ok` is monotone.
fn lowest_feasible(cands: &[f64], mut ok: impl FnMut(f64) -> bool) -> Option<f64> {
    let last = *cands.last()?;
    if !ok(last) {
        return None;
    }
    let (mut lo, mut hi) = (0, cands.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if ok(cands[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(cands[hi])
}

/// How worker orders are searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Search {
    /// Over all subsets of the pool: exact, for small pools.
    Exact,
    /// Farthest-reach greedy runs (each worker tried as head and as tail, and the
    /// most promising head/tail pairs), then beam searches: for large pools.
    Greedy,
}

/// The search for a pool: exact when small enough, heuristic otherwise.
pub(super) fn search_for(pool: &[usize]) -> Search {
    if pool.len() <= EXACT_MAX_WORKERS {
        Search::Exact
    } else {
        Search::Greedy
    }
}

/// Up to `limit` orders of workers from `pool` that can cover every layer within
/// `reach`: with exactly `stages` workers when given, else with the fewest found.
fn covering_orders(
    reach: &Reach,
    pool: &[usize],
    stages: Option<usize>,
    search: Search,
    limit: usize,
) -> Vec<Vec<usize>> {
    match (search, stages) {
        (Search::Exact, None) => exact_fewest(reach, pool, limit),
        (Search::Exact, Some(n)) => exact_stages(reach, pool, n, limit),
        (Search::Greedy, None) => greedy_fewest(reach, pool, limit),
        (Search::Greedy, Some(n)) => greedy_stages(reach, pool, n, limit),
    }
}

/// Indices of the bits set in `set` among its lowest `k`.
fn members(set: usize, k: usize) -> impl Iterator<Item = usize> {
    (0..k).filter(move |i| (set >> i) & 1 == 1)
}

/// Exact fewest-worker orders: `best[S]` is the farthest layer the workers of `S`
/// reach in some order (reach is monotone, so extending the farthest is optimal).
fn exact_fewest(reach: &Reach, pool: &[usize], limit: usize) -> Vec<Vec<usize>> {
    let (layers, k) = (reach.layers(), pool.len());
    let full = 1usize << k;
    let mut best = vec![0usize; full];
    for set in 1..full {
        let via = |i: usize| reach.get(pool[i], best[set & !(1 << i)]);
        best[set] = members(set, k).map(via).max().unwrap_or(0);
    }
    let covering = |s: &usize| best[*s] == layers;
    let Some(fewest) = (1..full).filter(covering).map(usize::count_ones).min() else {
        return Vec::new();
    };
    let chosen = (1..full).filter(|s| covering(s) && s.count_ones() == fewest);
    chosen
        .take(limit)
        .map(|s| unwind_best(reach, pool, &best, s))
        .collect()
}

/// The order in which the workers of `set` reach `best[set]`.
fn unwind_best(reach: &Reach, pool: &[usize], best: &[usize], set: usize) -> Vec<usize> {
    let mut order = Vec::new();
    let mut set = set;
    while set != 0 {
        let prev = |i: usize| best[set & !(1 << i)];
        let hits = |i: &usize| reach.get(pool[*i], prev(*i)) == best[set];
        let strict = members(set, pool.len()).find(|i| hits(i) && prev(*i) < best[set]);
        let Some(i) = strict.or_else(|| members(set, pool.len()).find(hits)) else {
            break;
        };
        order.push(pool[i]);
        set &= !(1 << i);
    }
    order.reverse();
    order
}

/// Marks in `into` every position reachable from a position of `from` by one
/// non-empty stage on worker `w`.
fn sweep_into(reach: &Reach, w: usize, from: &[bool], into: &mut [bool]) {
    let mut far = 0;
    for q in 1..from.len() {
        if from[q - 1] {
            far = far.max(reach.get(w, q - 1));
        }
        if far >= q {
            into[q] = true;
        }
    }
}

/// Exact orders of exactly `stages` workers: `sets[S]` marks the positions the
/// workers of `S` reach, each holding at least one layer.
fn exact_stages(reach: &Reach, pool: &[usize], stages: usize, limit: usize) -> Vec<Vec<usize>> {
    let (width, k) = (reach.width, pool.len());
    let full = 1usize << k;
    let mut sets = vec![false; full * width];
    sets[0] = true;
    for set in 1..full {
        if set.count_ones() as usize > stages {
            continue;
        }
        for i in members(set, k) {
            let prev = set & !(1 << i);
            let (done, rest) = sets.split_at_mut(set * width);
            let from = &done[prev * width..(prev + 1) * width];
            sweep_into(reach, pool[i], from, &mut rest[..width]);
        }
    }
    let covering = |s: &usize| s.count_ones() as usize == stages && sets[s * width + width - 1];
    let chosen = (1..full).filter(covering).take(limit);
    chosen.map(|s| unwind_sets(reach, pool, &sets, s)).collect()
}

/// The order in which the workers of `set` reach the last layer (see [`exact_stages`]).
fn unwind_sets(reach: &Reach, pool: &[usize], sets: &[bool], set: usize) -> Vec<usize> {
    let width = reach.width;
    let (mut order, mut set, mut q) = (Vec::new(), set, width - 1);
    while set != 0 {
        let step = members(set, pool.len()).find_map(|i| {
            let prev = set & !(1 << i);
            let from = |p: &usize| sets[prev * width + p] && reach.get(pool[i], *p) >= q;
            (0..q).find(from).map(|p| (i, p))
        });
        let Some((i, p)) = step else { break };
        order.push(pool[i]);
        set &= !(1 << i);
        q = p;
    }
    order.reverse();
    order
}

/// Greedy runs to try: plain, each worker reserved as tail, each as head, and the
/// (head, tail) pairs that lose the least capacity to the embedding and the head.
fn variants(reach: &Reach, pool: &[usize]) -> Vec<(Option<usize>, Option<usize>)> {
    let mut out = vec![(None, None)];
    out.extend(pool.iter().map(|&w| (None, Some(w))));
    out.extend(pool.iter().map(|&w| (Some(w), None)));
    let head = |w: usize| reach.get(w, 0);
    let loss = |h: usize, t: usize| {
        let lost =
            reach.span[h].saturating_sub(head(h)) + reach.span[t].saturating_sub(reach.tail[t]);
        (lost, Reverse(head(h) + reach.tail[t]), h, t)
    };
    let heads: Vec<usize> = pool.iter().copied().filter(|&h| head(h) > 0).collect();
    let tails: Vec<usize> = pool
        .iter()
        .copied()
        .filter(|&t| reach.tail[t] > 0)
        .collect();
    let pairs = heads.iter().flat_map(|&h| {
        let others = tails.iter().filter(move |&&t| t != h);
        others.map(move |&t| loss(h, t))
    });
    let mut pairs: Vec<_> = pairs.collect();
    pairs.sort_unstable();
    let best = pairs.into_iter().take(2 * pool.len());
    out.extend(best.map(|(_, _, h, t)| (Some(h), Some(t))));
    out
}

/// Farthest-reach greedy order, starting with `first` if given and keeping `last`
/// for the end if given; `None` if it cannot cover every layer.
fn greedy_order(
    reach: &Reach,
    pool: &[usize],
    first: Option<usize>,
    last: Option<usize>,
) -> Option<Vec<usize>> {
    let layers = reach.layers();
    let mut taken = vec![false; reach.memory.len()];
    let (mut order, mut pos) = (Vec::new(), 0);
    if let Some(head) = first {
        pos = reach.get(head, 0);
        if pos == 0 {
            return None;
        }
        taken[head] = true;
        order.push(head);
    }
    if let Some(tail) = last {
        taken[tail] = true;
    }
    while pos < layers {
        if let Some(tail) = last.filter(|&t| reach.get(t, pos) == layers) {
            order.push(tail);
            return Some(order);
        }
        let free = pool.iter().copied().filter(|&w| !taken[w]);
        let next = free.max_by_key(|&w| (reach.get(w, pos), Reverse(reach.memory[w])))?;
        let to = reach.get(next, pos);
        if to <= pos {
            return None;
        }
        taken[next] = true;
        order.push(next);
        pos = to;
    }
    Some(order)
}

/// A run of the heuristic search: first worker, last worker, beam (else greedy).
type Run = (Option<usize>, Option<usize>, bool);

/// Heuristic runs, cheapest first: greedy over all [`variants`], then beam
/// searches without constraint and for the best (head, tail) pairs.
fn runs(reach: &Reach, pool: &[usize]) -> Vec<Run> {
    let variants = variants(reach, pool);
    let pairs = variants.iter().filter(|(h, t)| h.is_some() && t.is_some());
    let beams = std::iter::once(&(None, None)).chain(pairs.take(BEAM_PAIRS));
    let beams: Vec<Run> = beams.map(|&(h, t)| (h, t, true)).collect();
    let mut out: Vec<Run> = variants.iter().map(|&(h, t)| (h, t, false)).collect();
    out.extend(beams);
    out
}

/// The order one heuristic run finds, if any.
fn run_order(reach: &Reach, pool: &[usize], (first, last, beam): Run) -> Option<Vec<usize>> {
    if beam {
        beam_order(reach, pool, first, last)
    } else {
        greedy_order(reach, pool, first, last)
    }
}

/// A partial chain of the beam search.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Partial {
    /// Layers reached plus the span of every worker still free: higher is better.
    projected: usize,
    pos: usize,
    taken: Vec<u64>,
    /// Index of its last step in the beam's arena of (parent, worker) steps.
    step: usize,
}

/// Beam search over partial chains ranked by projected reach, which favours
/// orders that waste little memory when layer sizes vary; `first`/`last` as in
/// [`greedy_order`]. Returns the first chain that covers every layer.
fn beam_order(
    reach: &Reach,
    pool: &[usize],
    first: Option<usize>,
    last: Option<usize>,
) -> Option<Vec<usize>> {
    let layers = reach.layers();
    let free = pool.iter().filter(|&&w| Some(w) != last);
    let base = free.map(|&w| reach.span[w]).sum::<usize>() + last.map_or(0, |t| reach.tail[t]);
    let mut arena: Vec<(usize, usize)> = Vec::new();
    let root = Partial {
        projected: base,
        pos: 0,
        taken: vec![0; reach.memory.len().div_ceil(64)],
        step: usize::MAX,
    };
    let mut beam = vec![root];
    loop {
        let mut next = Vec::new();
        for state in &beam {
            let heads_only = state.step == usize::MAX && first.is_some();
            let options = if heads_only { first.as_slice() } else { pool };
            for &w in options.iter().chain(last.as_slice()) {
                let to = reach.get(w, state.pos);
                let is_last = Some(w) == last;
                if is_taken(&state.taken, w) || to <= state.pos || (is_last && to < layers) {
                    continue;
                }
                if to == layers {
                    return Some(unwind_arena(&arena, state.step, w));
                }
                let projected = (state.projected + to - state.pos).saturating_sub(reach.span[w]);
                let mut taken = state.taken.clone();
                taken[w / 64] |= 1 << (w % 64);
                arena.push((state.step, w));
                let step = arena.len() - 1;
                next.push(Partial {
                    projected,
                    pos: to,
                    taken,
                    step,
                });
            }
        }
        next.sort_unstable_by(|a, b| b.cmp(a));
        next.dedup_by(|a, b| a.pos == b.pos && a.taken == b.taken);
        next.truncate(BEAM_WIDTH);
        if next.is_empty() {
            return None;
        }
        beam = next;
    }
}

/// Whether worker `w` is set in the bitset `taken`.
fn is_taken(taken: &[u64], w: usize) -> bool {
    (taken[w / 64] >> (w % 64)) & 1 == 1
}

/// The workers on the path ending at arena `step`, then `last`.
fn unwind_arena(arena: &[(usize, usize)], step: usize, last: usize) -> Vec<usize> {
    let mut order = vec![last];
    let mut step = step;
    while let Some(&(parent, w)) = arena.get(step) {
        order.push(w);
        step = parent;
    }
    order.reverse();
    order
}

/// Heuristic fewest-worker orders over all [`runs`].
fn greedy_fewest(reach: &Reach, pool: &[usize], limit: usize) -> Vec<Vec<usize>> {
    let mut found: Vec<Vec<usize>> = Vec::new();
    for run in runs(reach, pool) {
        let Some(order) = run_order(reach, pool, run) else {
            continue;
        };
        if limit == 1 {
            return vec![order];
        }
        if !found.contains(&order) {
            found.push(order);
        }
    }
    let fewest = found.iter().map(Vec::len).min().unwrap_or(0);
    found.retain(|o| o.len() == fewest);
    found.truncate(limit);
    found
}

/// Heuristic orders of exactly `stages` workers: orders of [`runs`] padded with
/// the roomiest unused workers.
fn greedy_stages(reach: &Reach, pool: &[usize], stages: usize, limit: usize) -> Vec<Vec<usize>> {
    let mut found: Vec<Vec<usize>> = Vec::new();
    for run in runs(reach, pool) {
        let order = run_order(reach, pool, run);
        let Some(order) = order.and_then(|o| pad_order(reach, pool, o, stages)) else {
            continue;
        };
        if !found.contains(&order) {
            found.push(order);
            if found.len() >= limit {
                break;
            }
        }
    }
    found
}

/// `order` grown to exactly `stages` workers so that each still holds a layer.
fn pad_order(
    reach: &Reach,
    pool: &[usize],
    order: Vec<usize>,
    stages: usize,
) -> Option<Vec<usize>> {
    let missing = stages.checked_sub(order.len())?;
    if missing == 0 {
        return Some(order);
    }
    let mut extras: Vec<usize> = pool
        .iter()
        .copied()
        .filter(|w| !order.contains(w))
        .collect();
    extras.sort_by_key(|&w| Reverse(reach.span[w]));
    extras.truncate(missing);
    if extras.len() < missing {
        return None;
    }
    for at in [1.min(order.len()), 0, order.len()] {
        let mut padded = order.clone();
        padded.splice(at..at, extras.iter().copied());
        if reaches_exactly(reach, &padded) {
            return Some(padded);
        }
    }
    None
}

/// Whether `order`, each worker holding at least one layer, can cover every layer.
fn reaches_exactly(reach: &Reach, order: &[usize]) -> bool {
    let mut at = vec![false; reach.width];
    at[0] = true;
    for &w in order {
        let mut next = vec![false; reach.width];
        sweep_into(reach, w, &at, &mut next);
        at = next;
    }
    at[reach.width - 1]
}

/// Quality of a chain: (latency, bottleneck) in seconds.
type Score = (f64, f64);
/// Stage boundaries: `cuts[i]..cuts[i + 1]` is the range of the i-th stage.
type Cuts = Vec<usize>;

/// Whether score `a` (latency, bottleneck) beats `b`: lower latency, then lower
/// bottleneck when latencies tie (within rounding).
fn better(a: Score, b: Score) -> bool {
    if (a.0 - b.0).abs() <= 1e-9 * a.0.abs().max(b.0.abs()) {
        a.1 < b.1
    } else {
        a.0 < b.0
    }
}

/// The lowest-latency split of the layers over `order` (each worker in turn, each
/// holding at least one layer, within `reach`): its score and cut positions.
fn distribute(ctx: &Ctx, reach: &Reach, order: &[usize]) -> Option<(Score, Cuts)> {
    let (layers, width) = (ctx.layers(), reach.width);
    let mut score = vec![(f64::INFINITY, f64::INFINITY); (order.len() + 1) * width];
    let mut from = vec![0usize; score.len()];
    score[0] = (0.0, 0.0);
    for (i, &w) in order.iter().enumerate() {
        for p in 0..layers {
            let (sum, worst) = score[i * width + p];
            if !sum.is_finite() {
                continue;
            }
            for q in p + 1..=reach.get(w, p) {
                let t = ctx.stage_time(w, p, q);
                let slot = (i + 1) * width + q;
                if better((sum + t, worst.max(t)), score[slot]) {
                    score[slot] = (sum + t, worst.max(t));
                    from[slot] = p;
                }
            }
        }
    }
    let total = score[order.len() * width + layers];
    if !total.0.is_finite() {
        return None;
    }
    let mut cuts = vec![layers];
    for i in (1..=order.len()).rev() {
        let q = cuts[cuts.len() - 1];
        cuts.push(from[i * width + q]);
    }
    cuts.reverse();
    Some((total, cuts))
}

/// The largest bottleneck a split may reach to lower its latency when the
/// smallest possible is `lowest` and every stage pays `hop`: [`SLACK`] of the
/// compute part. A slack on the hop as well would let a small model's stages,
/// where the hop outweighs the compute, take several layers more than their
/// share for a latency gain within the workers' measurement noise.
pub(super) fn slack_limit(lowest: f64, hop: f64) -> f64 {
    lowest + (lowest - hop).max(0.0) * SLACK
}

/// The best chain over `pool` (with exactly `stages` stages when given).
pub(super) fn best_chain(
    ctx: &Ctx,
    pool: &[usize],
    stages: Option<usize>,
    search: Search,
) -> Option<Assignment> {
    let cands = candidates(ctx, pool);
    let feasible = |limit: f64| {
        let reach = Reach::new(ctx, limit);
        !covering_orders(&reach, pool, stages, search, 1).is_empty()
    };
    let lowest = lowest_feasible(&cands.times, feasible)?;
    // The slack is a share of the time without what the slowest stage's input costs beyond
    // the fixed hop (a far link needed for memory does not widen it).
    let excess = cands.input(lowest, ctx.hop) - ctx.hop;
    let loose = if excess > 0.0 {
        lowest + (lowest - excess) * SLACK
    } else {
        lowest * (1.0 + SLACK)
    };
    let chosen = [loose, lowest].into_iter().find_map(|limit| {
        let reach = Reach::new(ctx, limit);
        choose(ctx, &reach, pool, stages, search)
    })?;
    // The loose limit picks how many stages; their split keeps to the compute's slack of the
    // smallest bottleneck that many stages reach.
    let n = chosen.len();
    let floor = match stages {
        Some(_) => lowest,
        None => lowest_feasible(&cands.times, |limit| {
            let reach = Reach::new(ctx, limit);
            !covering_orders(&reach, pool, Some(n), search, 1).is_empty()
        })
        .unwrap_or(lowest),
    };
    let tight = slack_limit(floor, cands.input(floor, ctx.hop));
    if tight < loose {
        let reach = Reach::new(ctx, tight);
        if let Some(split) = choose(ctx, &reach, pool, Some(n), search) {
            return Some(split);
        }
    }
    Some(chosen)
}

/// Among the covering orders within `reach`, the split with the best score.
fn choose(
    ctx: &Ctx,
    reach: &Reach,
    pool: &[usize],
    stages: Option<usize>,
    search: Search,
) -> Option<Assignment> {
    let mut best: Option<(Score, Vec<usize>, Cuts)> = None;
    for order in covering_orders(reach, pool, stages, search, MAX_ORDERS) {
        let Some(((latency, bottleneck), cuts)) = distribute(ctx, reach, &order) else {
            continue;
        };
        let score = (latency + ctx.ring_extra(&order), bottleneck);
        if best.as_ref().is_none_or(|(s, ..)| better(score, *s)) {
            best = Some((score, order, cuts));
        }
    }
    let (_, order, cuts) = best?;
    let ranges = cuts.windows(2).map(|c| LayerRange::new(c[0], c[1]));
    Some(order.into_iter().zip(ranges).collect())
}
