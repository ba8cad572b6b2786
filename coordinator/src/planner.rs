//! Layer planner: decides which worker runs which contiguous range of transformer
//! blocks. This module owns that decision and nothing else: given the candidate
//! workers (memory, measured speed, country, provider certifications), the cost of
//! the model (bytes and FLOPs per layer, embedding and head) and the operator's
//! placement policy, it builds pipeline chains that cover every layer exactly once,
//! fit every worker's memory, obey the policy and minimise the slowest stage
//! (bottleneck); among plans whose bottleneck is within 3% of the minimum it prefers
//! fewer stages, then lower latency. It also validates operator overrides (a fixed
//! number of stages, or an explicit assignment). It is a pure function of its
//! inputs: no I/O, no clock, no randomness.

use std::collections::HashMap;
use std::fmt;

#[path = "planner_search.rs"]
mod search;

use search::{Assignment, Ctx, best_chain, search_for};
#[cfg(test)]
use search::{SLACK, Search, slack_limit};

/// Hop cost (seconds) that [`check_chain`] charges to each stage.
pub const DEFAULT_HOP_COST_S: f64 = 0.002;
/// Default number of replica chains of [`PlannerConfig`].
pub const DEFAULT_MAX_CHAINS: usize = 4;

pub use sovra_model::LayerRange;

/// A worker the planner may place layers on.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCandidate {
    /// Unique id of the worker.
    pub worker_id: String,
    /// Datacenter provider hosting the worker.
    pub provider: String,
    /// ISO country code of the worker, e.g. "FR".
    pub country: String,
    /// Certifications of its provider, e.g. `["ISO27001", "SecNumCloud"]`.
    pub certifications: Vec<String>,
    /// Memory the planner may use on this worker (already capped by the operator).
    pub memory_bytes: u64,
    /// Measured compute speed; a layer takes `layer_flops / (speed_gflops * 1e9)` s
    /// per token. A worker whose speed is not a positive finite number is unusable.
    pub speed_gflops: f64,
    /// Whether the worker is up and its provider not revoked.
    pub available: bool,
}

/// What the model costs to hold and to run, in the chosen weight mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCost {
    /// Number of transformer blocks.
    pub layers: usize,
    /// Bytes of each block's weights (`len == layers`).
    pub layer_bytes: Vec<u64>,
    /// Bytes of the embedding, held by the stage holding layer 0.
    pub embedding_bytes: u64,
    /// Bytes of the final norm and LM head, held by the stage holding the last layer.
    pub head_bytes: u64,
    /// Whether the head shares the embedding: a single stage holding both layer 0
    /// and the last layer then counts `embedding_bytes` once and no `head_bytes`.
    pub tied_embeddings: bool,
    /// FLOPs of one block for one token.
    pub layer_flops: f64,
    /// FLOPs of the LM head for one token (tail stage only).
    pub head_flops: f64,
    /// Bytes reserved per held block for KV caches.
    pub kv_reserve_per_layer: u64,
}

/// Where the operator allows layers to run. Matching is ASCII case-insensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Countries a worker may be in; empty means any country.
    pub allowed_countries: Vec<String>,
    /// Certifications a worker's provider must all have.
    pub required_certifications: Vec<String>,
    /// Providers whose workers may not be used.
    pub excluded_providers: Vec<String>,
}

/// Tuning of [`plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    /// Seconds added to each stage's time for receiving its input over the network.
    pub hop_cost_s: f64,
    /// Most replica chains in a plan (0 is taken as 1).
    pub max_chains: usize,
    /// Measured delays between workers. A link costs its one-way delay or `hop_cost_s`,
    /// whichever is larger (`hop_cost_s` when not measured). A stage is charged, for its input,
    /// the least cost from any other eligible worker (so a worker far from all is as slow as
    /// that); among the chains within the slack, the one whose ring (each stage to the next,
    /// the tail back to the head) costs least per token wins.
    pub links: Links,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            hop_cost_s: DEFAULT_HOP_COST_S,
            max_chains: DEFAULT_MAX_CHAINS,
            links: Links::default(),
        }
    }
}

/// One-way delay charged for a link measured unreachable: such a chain is avoided whenever
/// another exists, and still planned when none does (the link may be back by the time a job
/// runs; a job that finds it down moves on).
pub const UNREACHABLE_S: f64 = 60.0;

/// Measured delays between workers: what a token's frame takes from one worker to the next,
/// taken as half the round-trip time the sending worker measured to the other's data plane.
/// A pair not measured costs the fixed hop cost of [`PlannerConfig`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Links {
    one_way_s: HashMap<(String, String), f64>,
}

impl Links {
    /// Records the round trip `from` measured to `to` (None: unreachable).
    pub fn insert(&mut self, from: &str, to: &str, rtt_s: Option<f64>) {
        let one_way = match rtt_s {
            Some(rtt) if rtt.is_finite() && rtt >= 0.0 => (rtt / 2.0).min(UNREACHABLE_S),
            _ => UNREACHABLE_S,
        };
        self.one_way_s
            .insert((from.to_string(), to.to_string()), one_way);
    }

    /// The one-way delay from `from` to `to`, if measured.
    pub fn one_way_s(&self, from: &str, to: &str) -> Option<f64> {
        self.one_way_s
            .get(&(from.to_string(), to.to_string()))
            .copied()
    }

    /// Whether no link is known.
    pub fn is_empty(&self) -> bool {
        self.one_way_s.is_empty()
    }

    /// The measured one-way delays around a chain's ring (each stage to the next, the tail
    /// back to the head), seconds; None when a link of it was not measured. A chain of one
    /// stage has no link: zero.
    pub fn ring_s(&self, workers: &[&str]) -> Option<f64> {
        ring(workers).map(|(a, b)| self.one_way_s(a, b)).sum()
    }
}

/// The links of a chain's ring, in order: each stage to the next, then the tail back to the
/// head; none for a single stage.
pub(crate) fn ring<T>(stages: &[T]) -> impl Iterator<Item = (&T, &T)> {
    let links = if stages.len() < 2 { 0 } else { stages.len() };
    let from = stages.iter().cycle().skip(stages.len().saturating_sub(1));
    from.zip(stages).take(links)
}

/// One worker's share of a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// The worker running this stage.
    pub worker_id: String,
    /// The blocks it runs.
    pub range: LayerRange,
    /// Memory this stage needs (weights, KV reserve, embedding/head if held).
    pub memory_bytes: u64,
    /// Per-token compute time of this stage, hop cost included.
    pub time_s: f64,
}

/// A pipeline of stages covering every layer once, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chain {
    /// The stages, from the one holding layer 0 to the one holding the last layer.
    pub stages: Vec<Stage>,
}

impl Chain {
    /// Time of the slowest stage (0 for an empty chain).
    pub fn bottleneck_s(&self) -> f64 {
        self.stages.iter().map(|s| s.time_s).fold(0.0, f64::max)
    }

    /// Sum of the stage times: the per-token latency of the chain.
    pub fn latency_s(&self) -> f64 {
        self.stages.iter().map(|s| s.time_s).sum()
    }
}

/// Replica chains serving the same model, on disjoint workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The chains, best first.
    pub chains: Vec<Chain>,
}

/// Why no plan (or no valid chain) could be produced.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    /// No available worker satisfies the policy.
    NoEligibleWorker {
        /// Human description of the policy (empty when unrestricted).
        policy: String,
    },
    /// The eligible workers together have less memory than the model needs.
    InsufficientMemory {
        /// Human description of the policy (empty when unrestricted).
        policy: String,
        /// Bytes the eligible workers offer in total.
        available: u64,
        /// Bytes the model needs at least.
        needed: u64,
    },
    /// Memory may suffice in total, but no assignment fits.
    Infeasible {
        /// What stands in the way.
        reason: String,
    },
    /// An operator override is invalid.
    InvalidStages {
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEligibleWorker { policy } if policy.is_empty() => {
                write!(f, "no available worker with a valid measured speed")
            }
            Self::NoEligibleWorker { policy } => {
                write!(f, "no available worker satisfies the policy ({policy})")
            }
            Self::InsufficientMemory {
                policy,
                available,
                needed,
            } => {
                let (available, needed) = (gib(*available), gib(*needed));
                if policy.is_empty() {
                    write!(
                        f,
                        "the fleet has {available} for a model that needs {needed}"
                    )
                } else {
                    write!(
                        f,
                        "policy {policy} leaves {available} for a model that needs {needed}"
                    )
                }
            }
            Self::Infeasible { reason } => write!(f, "no feasible layer plan: {reason}"),
            Self::InvalidStages { reason } => write!(f, "invalid stages: {reason}"),
        }
    }
}

impl std::error::Error for PlanError {}

/// `bytes` in GiB with one decimal, e.g. "11.0 GiB".
pub fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

impl Policy {
    /// Human description, e.g. "countries FR,DE; certifications SecNumCloud";
    /// empty when the policy restricts nothing.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.allowed_countries.is_empty() {
            parts.push(format!("countries {}", self.allowed_countries.join(",")));
        }
        if !self.required_certifications.is_empty() {
            let certs = self.required_certifications.join(",");
            parts.push(format!("certifications {certs}"));
        }
        if !self.excluded_providers.is_empty() {
            let providers = self.excluded_providers.join(",");
            parts.push(format!("excluding providers {providers}"));
        }
        parts.join("; ")
    }

    /// Why `worker` breaks the policy, or `None` when it complies
    /// (availability is not the policy's concern).
    pub fn violation(&self, worker: &WorkerCandidate) -> Option<String> {
        let same = |a: &String, b: &String| a.eq_ignore_ascii_case(b);
        let countries = &self.allowed_countries;
        if !countries.is_empty() && !countries.iter().any(|c| same(c, &worker.country)) {
            let allowed = countries.join(",");
            return Some(format!("country {} is not in {allowed}", worker.country));
        }
        let certs = &worker.certifications;
        let mut required = self.required_certifications.iter();
        if let Some(missing) = required.find(|r| !certs.iter().any(|c| same(c, r))) {
            return Some(format!("provider {} lacks {missing}", worker.provider));
        }
        if self
            .excluded_providers
            .iter()
            .any(|p| same(p, &worker.provider))
        {
            return Some(format!("provider {} is excluded", worker.provider));
        }
        None
    }
}

/// Why `worker` cannot run anything regardless of policy, or `None`.
fn unusable(worker: &WorkerCandidate) -> Option<String> {
    if !worker.available {
        return Some("it is down or revoked (see `sovra worker list`)".to_string());
    }
    let speed = worker.speed_gflops;
    if !(speed.is_finite() && speed > 0.0) {
        return Some(format!(
            "its measured speed {speed} GFLOP/s is not positive"
        ));
    }
    None
}

/// The workers that are usable and satisfy `policy`, in input order.
fn eligible<'a>(workers: &'a [WorkerCandidate], policy: &Policy) -> Vec<&'a WorkerCandidate> {
    let ok = |w: &&WorkerCandidate| unusable(w).is_none() && policy.violation(w).is_none();
    workers.iter().filter(ok).collect()
}

/// Checks that the model and hop cost are well formed.
fn validate_model(model: &ModelCost, hop_cost_s: f64) -> Result<(), PlanError> {
    let bad = |reason: String| Err(PlanError::Infeasible { reason });
    if model.layers == 0 {
        return bad("the model has no layers".to_string());
    }
    if model.layer_bytes.len() != model.layers {
        let (given, layers) = (model.layer_bytes.len(), model.layers);
        return bad(format!("{given} layer sizes given for {layers} layers"));
    }
    let sane = |x: f64| x.is_finite() && x >= 0.0;
    if !sane(model.layer_flops) || !sane(model.head_flops) {
        return bad("layer and head FLOPs must be finite and non-negative".to_string());
    }
    if !sane(hop_cost_s) {
        return bad(format!(
            "hop cost {hop_cost_s} s must be finite and non-negative"
        ));
    }
    Ok(())
}

/// Validates the inputs, keeps the eligible workers and checks total memory.
fn prepare<'a>(
    workers: &'a [WorkerCandidate],
    model: &'a ModelCost,
    policy: &Policy,
    hop: f64,
    links: &Links,
) -> Result<Ctx<'a>, PlanError> {
    validate_model(model, hop)?;
    let chosen = eligible(workers, policy);
    if chosen.is_empty() {
        return Err(PlanError::NoEligibleWorker {
            policy: policy.describe(),
        });
    }
    let ctx = Ctx::new(model, chosen, hop, links);
    let available = ctx
        .workers
        .iter()
        .fold(0u64, |a, w| a.saturating_add(w.memory_bytes));
    let needed = ctx.minimal_need();
    if available < needed {
        let policy = policy.describe();
        return Err(PlanError::InsufficientMemory {
            policy,
            available,
            needed,
        });
    }
    Ok(ctx)
}

/// What most likely prevents any chain, for [`PlanError::Infeasible`].
fn infeasible_reason(ctx: &Ctx) -> String {
    let layers = ctx.layers();
    let largest = ctx
        .workers
        .iter()
        .map(|w| w.memory_bytes)
        .max()
        .unwrap_or(0);
    let has = gib(largest);
    let layer_need = |i: usize| ctx.prefix[i + 1] - ctx.prefix[i];
    let biggest = (0..layers).max_by_key(|&i| layer_need(i)).unwrap_or(0);
    if layer_need(biggest) > largest {
        let need = gib(layer_need(biggest));
        return format!(
            "layer {biggest} alone needs {need} but the largest eligible worker has {has}"
        );
    }
    let first = ctx.memory(0, 1);
    if first > largest {
        let need = gib(first);
        return format!(
            "layer 0 with the embedding needs {need} but the largest eligible worker has {has}"
        );
    }
    let last = ctx.memory(layers - 1, layers);
    if last > largest {
        let need = gib(last);
        return format!(
            "the last layer with the head needs {need} but the largest eligible worker has {has}"
        );
    }
    let n = ctx.workers.len();
    let total = ctx
        .workers
        .iter()
        .fold(0u64, |t, w| t.saturating_add(w.memory_bytes));
    let need = gib(ctx.memory(0, layers));
    format!(
        "no arrangement of the {n} eligible workers ({} together) fits all {layers} layers in their memory; the model needs {need} in one piece, more when split (the first and last stage each hold the embedding or head)",
        gib(total)
    )
}

/// Plans replica chains for `model` over `workers` under `policy`: the first chain
/// minimises the bottleneck (the fewest stages within 3% of the smallest; then,
/// over that many stages, the lowest latency within 3% of the compute time of
/// their smallest bottleneck); more
/// chains are planned the same way from the unused workers, up to `cfg.max_chains`.
pub fn plan(
    workers: &[WorkerCandidate],
    model: &ModelCost,
    policy: &Policy,
    cfg: &PlannerConfig,
) -> Result<Plan, PlanError> {
    let ctx = prepare(workers, model, policy, cfg.hop_cost_s, &cfg.links)?;
    let mut pool: Vec<usize> = (0..ctx.workers.len()).collect();
    let mut chains = Vec::new();
    while chains.len() < cfg.max_chains.max(1) && !pool.is_empty() {
        let Some(assignment) = best_chain(&ctx, &pool, None, search_for(&pool)) else {
            break;
        };
        pool.retain(|w| assignment.iter().all(|(used, _)| used != w));
        chains.push(ctx.chain(&assignment));
    }
    if chains.is_empty() {
        let reason = infeasible_reason(&ctx);
        return Err(PlanError::Infeasible { reason });
    }
    Ok(Plan { chains })
}

/// Plans one chain of exactly `stages` stages (operator override `--stages N`),
/// the best such chain under the objective of [`plan`].
pub fn plan_with_stages(
    workers: &[WorkerCandidate],
    model: &ModelCost,
    policy: &Policy,
    cfg: &PlannerConfig,
    stages: usize,
) -> Result<Plan, PlanError> {
    let ctx = prepare(workers, model, policy, cfg.hop_cost_s, &cfg.links)?;
    let layers = ctx.layers();
    if stages == 0 || stages > layers {
        let reason = format!("{stages} stages requested for a model of {layers} layers");
        return Err(PlanError::InvalidStages { reason });
    }
    let n = ctx.workers.len();
    if stages > n {
        let reason = format!("{stages} stages need {stages} distinct workers but {n} are eligible");
        return Err(PlanError::Infeasible { reason });
    }
    let pool: Vec<usize> = (0..n).collect();
    match best_chain(&ctx, &pool, Some(stages), search_for(&pool)) {
        Some(assignment) => Ok(Plan {
            chains: vec![ctx.chain(&assignment)],
        }),
        None => {
            let why = infeasible_reason(&ctx);
            let reason = format!("no chain of exactly {stages} stages fits: {why}");
            Err(PlanError::Infeasible { reason })
        }
    }
}

/// An [`PlanError::InvalidStages`] with `reason`.
fn invalid(reason: String) -> PlanError {
    PlanError::InvalidStages { reason }
}

/// Checks that `assignment` covers `0..layers` contiguously with non-empty ranges.
fn check_ranges(layers: usize, assignment: &[(String, LayerRange)]) -> Result<(), PlanError> {
    if assignment.is_empty() {
        return Err(invalid("no stages given".to_string()));
    }
    let mut next = 0;
    for (id, r) in assignment {
        let (start, end) = (r.start, r.end);
        if r.is_empty() {
            return Err(invalid(format!(
                "worker {id} has an empty range {start}..{end}"
            )));
        }
        if end > layers {
            let why = format!("the model has {layers} layers");
            return Err(invalid(format!(
                "range {start}..{end} of worker {id} is out of range: {why}"
            )));
        }
        if start < next {
            let why = format!("the previous stage ends at {next}");
            return Err(invalid(format!(
                "range {start}..{end} of worker {id} overlaps: {why}"
            )));
        }
        if start > next {
            return Err(invalid(format!(
                "gap: layers {next}..{start} (before worker {id}) are unassigned"
            )));
        }
        next = end;
    }
    if next < layers {
        return Err(invalid(format!(
            "gap: layers {next}..{layers} at the end are unassigned"
        )));
    }
    Ok(())
}

/// The workers named by `assignment`, each known, distinct, usable and compliant.
fn assigned_workers<'a>(
    workers: &'a [WorkerCandidate],
    policy: &Policy,
    assignment: &[(String, LayerRange)],
) -> Result<Vec<&'a WorkerCandidate>, PlanError> {
    let mut chosen: Vec<&WorkerCandidate> = Vec::new();
    for (id, _) in assignment {
        let Some(worker) = workers.iter().find(|w| w.worker_id == *id) else {
            return Err(invalid(format!("unknown worker {id}")));
        };
        if chosen.iter().any(|w| w.worker_id == *id) {
            return Err(invalid(format!("worker {id} is used twice")));
        }
        if let Some(why) = unusable(worker).or_else(|| policy.violation(worker)) {
            let (country, provider) = (&worker.country, &worker.provider);
            let who = format!("worker {id} (country {country}, provider {provider})");
            return Err(invalid(format!("{who} cannot be used: {why}")));
        }
        chosen.push(worker);
    }
    Ok(chosen)
}

/// Validates an explicit operator assignment (worker id, layers) and returns the
/// chain with memory and time filled in (hop cost [`DEFAULT_HOP_COST_S`]).
pub fn check_chain(
    workers: &[WorkerCandidate],
    model: &ModelCost,
    policy: &Policy,
    assignment: &[(String, LayerRange)],
) -> Result<Chain, PlanError> {
    validate_model(model, DEFAULT_HOP_COST_S)?;
    check_ranges(model.layers, assignment)?;
    let chosen = assigned_workers(workers, policy, assignment)?;
    let ctx = Ctx::new(model, chosen, DEFAULT_HOP_COST_S, &Links::default());
    let plan: Assignment = assignment
        .iter()
        .enumerate()
        .map(|(i, (_, r))| (i, *r))
        .collect();
    for &(w, r) in &plan {
        let (need, has) = (ctx.memory(r.start, r.end), ctx.workers[w].memory_bytes);
        if need > has {
            let id = &ctx.workers[w].worker_id;
            let (start, end) = (r.start, r.end);
            let (need, has) = (
                format!("{} ({need} B)", gib(need)),
                format!("{} ({has} B)", gib(has)),
            );
            return Err(invalid(format!(
                "worker {id} needs {need} for layers {start}..{end} but has {has} free"
            )));
        }
    }
    Ok(ctx.chain(&plan))
}

/// Brute-force reference for tests: the smallest bottleneck of any single valid
/// chain (every ordered subset of eligible workers, every split of the layers).
#[doc(hidden)]
pub fn exhaustive_best_bottleneck(
    workers: &[WorkerCandidate],
    model: &ModelCost,
    policy: &Policy,
    cfg: &PlannerConfig,
) -> Option<f64> {
    exhaustive_best(workers, model, policy, cfg, None)
}

/// Like [`exhaustive_best_bottleneck`], restricted to chains of exactly `stages`
/// stages when given.
#[doc(hidden)]
pub fn exhaustive_best(
    workers: &[WorkerCandidate],
    model: &ModelCost,
    policy: &Policy,
    cfg: &PlannerConfig,
    stages: Option<usize>,
) -> Option<f64> {
    validate_model(model, cfg.hop_cost_s).ok()?;
    let pool = eligible(workers, policy);
    let used = vec![false; pool.len()];
    let mut search = Exhaustive {
        model,
        pool,
        hop: cfg.hop_cost_s,
        stages,
        used,
        best: None,
    };
    search.explore(0, 0, 0.0);
    search.best
}

/// State of the brute-force search (independent of the planner's own arithmetic).
struct Exhaustive<'a> {
    model: &'a ModelCost,
    pool: Vec<&'a WorkerCandidate>,
    hop: f64,
    stages: Option<usize>,
    used: Vec<bool>,
    best: Option<f64>,
}

impl Exhaustive<'_> {
    /// Tries every free worker on every range starting at `pos`; `worst` is the
    /// slowest stage so far. Prunes chains already no better than the best.
    fn explore(&mut self, pos: usize, depth: usize, worst: f64) {
        if self.best.is_some_and(|b| worst >= b) {
            return;
        }
        let layers = self.model.layers;
        if pos == layers {
            if self.stages.is_none_or(|n| n == depth) {
                self.best = Some(worst);
            }
            return;
        }
        if self.stages.is_some_and(|n| depth >= n) {
            return;
        }
        for w in 0..self.pool.len() {
            if self.used[w] {
                continue;
            }
            self.used[w] = true;
            for end in pos + 1..=layers {
                if self.bytes(pos, end) <= self.pool[w].memory_bytes {
                    let time = self.time(w, pos, end);
                    self.explore(end, depth + 1, worst.max(time));
                }
            }
            self.used[w] = false;
        }
    }

    /// Memory of a stage holding `start..end`, computed directly.
    fn bytes(&self, start: usize, end: usize) -> u64 {
        let m = self.model;
        let weights: u64 = m.layer_bytes[start..end].iter().sum();
        let mut bytes = weights + m.kv_reserve_per_layer * (end - start) as u64;
        if start == 0 {
            bytes += m.embedding_bytes;
        }
        if end == m.layers && !(start == 0 && m.tied_embeddings) {
            bytes += m.head_bytes;
        }
        bytes
    }

    /// Per-token time of worker `w` on `start..end`, computed directly.
    fn time(&self, w: usize, start: usize, end: usize) -> f64 {
        let m = self.model;
        let head = if end == m.layers { m.head_flops } else { 0.0 };
        let flops = (end - start) as f64 * m.layer_flops + head;
        flops / (self.pool[w].speed_gflops * 1e9) + self.hop
    }
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
