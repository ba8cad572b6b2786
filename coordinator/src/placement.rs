//! Placement glue: turns records into planner inputs, planner output into stored stages, and
//! stored placements into the assignment orders each worker receives.

use serde::{Deserialize, Serialize};
use sovra_model::{LayerRange, ModelSpec, WeightMode};

use crate::error::CoordinatorError;
use crate::federation::AssignmentOrder;
use crate::planner::{self, ModelCost, PlanError, PlannerConfig, Policy, WorkerCandidate};
use crate::records::{
    ModelRecord, PlacementRecord, PolicyRecord, ProviderRecord, StageRecord, WorkerRecord,
};

/// How the operator asks for a model to be placed (kept with the placement, so a placement
/// made around failed workers can be made as asked again once they are back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementRequest {
    /// The planner decides.
    #[default]
    Auto,
    /// One chain of exactly this many stages.
    Stages(usize),
    /// Exactly these (worker, layers) stages, in layer order.
    Explicit(Vec<(String, LayerRange)>),
}

impl PlacementRequest {
    /// How it reads in `placement show`: "auto", "3 stages", "explicit: W 0..10, W 10..30".
    pub fn describe(&self) -> String {
        match self {
            Self::Auto => "auto".into(),
            Self::Stages(1) => "1 stage".into(),
            Self::Stages(n) => format!("{n} stages"),
            Self::Explicit(stages) => format!(
                "explicit: {}",
                stages
                    .iter()
                    .map(|(w, r)| format!("{w} {}..{}", r.start, r.end))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// A worker as the planner sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its record.
    pub worker: WorkerRecord,
    /// Its provider.
    pub provider: ProviderRecord,
    /// Up, with a live stream, and its provider not revoked.
    pub available: bool,
    /// Memory its stages of other models' placements take: not free for this one.
    pub committed_bytes: u64,
}

/// Refuses specs that cannot describe a real model.
pub fn validate_spec(spec: &ModelSpec) -> Result<(), CoordinatorError> {
    let bad = |why: &str| {
        Err(CoordinatorError::InvalidArgument(format!(
            "invalid model spec: {why}"
        )))
    };
    if spec.layers == 0 || spec.layers > 4096 || spec.layer_bytes.len() != spec.layers {
        return bad("layer count and per-layer sizes disagree");
    }
    if spec.hidden_size == 0 || spec.heads == 0 || spec.kv_heads == 0 || spec.vocab_size == 0 {
        return bad("zero width");
    }
    // Bounds well past any real model (a trillion parameters in one layer), so that sums
    // over the layers cannot overflow.
    const MAX_WIDTH: usize = 1 << 20;
    const MAX_PARAMS: u64 = 1 << 40;
    if [
        spec.hidden_size,
        spec.heads,
        spec.kv_heads,
        spec.head_dim,
        spec.ffn_size,
    ]
    .iter()
    .any(|&w| w > MAX_WIDTH)
        || spec.vocab_size > 4 * MAX_WIDTH
        || spec.context_length > 1 << 22
    {
        return bad("a width, the vocabulary or the context is beyond any model");
    }
    if [
        spec.layer_params,
        spec.embedding_params,
        spec.embedding_bytes,
        spec.head_bytes,
    ]
    .iter()
    .chain(&spec.layer_bytes)
    .any(|&n| n > MAX_PARAMS)
    {
        return bad("a parameter count or a size is beyond any model");
    }
    if spec.heads * spec.head_dim != spec.hidden_size || !spec.heads.is_multiple_of(spec.kv_heads) {
        return bad("heads do not divide the hidden size");
    }
    if spec.context_length == 0 || spec.architecture != "llama" {
        return bad("unsupported architecture or zero context");
    }
    Ok(())
}

/// The planner's view of a model in its weight mode.
pub fn model_cost(model: &ModelRecord, kv_reserve_tokens: u64) -> ModelCost {
    let spec = &model.spec;
    let mode = model.dtype;
    let layer_bytes = match mode {
        WeightMode::Gguf => spec.layer_bytes.clone(),
        m => vec![m.bytes_for(spec.layer_params); spec.layers],
    };
    let (embedding_bytes, head_bytes) = match mode {
        WeightMode::Gguf => (spec.embedding_bytes, spec.head_bytes),
        m => (
            m.bytes_for(spec.embedding_params),
            m.bytes_for(spec.embedding_params) + (spec.hidden_size * 4) as u64,
        ),
    };
    ModelCost {
        layers: spec.layers,
        layer_bytes,
        embedding_bytes,
        head_bytes,
        tied_embeddings: spec.tied_embeddings,
        layer_flops: 2.0 * spec.layer_params as f64,
        head_flops: 2.0 * spec.embedding_params as f64,
        kv_reserve_per_layer: spec.kv_bytes_per_token_per_layer()
            * kv_reserve_tokens.min(spec.context_length as u64),
    }
}

fn policy(p: &PolicyRecord) -> Policy {
    Policy {
        allowed_countries: p.countries.clone(),
        required_certifications: p.required_certifications.clone(),
        excluded_providers: p.excluded_providers.clone(),
    }
}

fn candidate(c: &Candidate) -> WorkerCandidate {
    WorkerCandidate {
        worker_id: c.worker.id.clone(),
        provider: c.provider.name.clone(),
        country: c.provider.country.clone(),
        certifications: c.provider.certifications.clone(),
        memory_bytes: c
            .worker
            .offered_memory_bytes
            .saturating_sub(c.committed_bytes),
        speed_gflops: c.worker.speed_gflops,
        available: c.available,
    }
}

/// Whether `model`'s policy lets worker `w` of provider `p` hold a stage of it.
pub(crate) fn allows(model: &ModelRecord, w: &WorkerRecord, p: &ProviderRecord) -> bool {
    let c = Candidate {
        worker: w.clone(),
        provider: p.clone(),
        available: true,
        committed_bytes: 0,
    };
    policy(&model.policy).violation(&candidate(&c)).is_none()
}

/// Plans `model` over `candidates` as `how` asks, under the model's policy.
pub fn plan(
    model: &ModelRecord,
    candidates: &[Candidate],
    how: &PlacementRequest,
    kv_reserve_tokens: u64,
    links: planner::Links,
) -> Result<Vec<Vec<StageRecord>>, CoordinatorError> {
    let workers: Vec<WorkerCandidate> = candidates.iter().map(candidate).collect();
    let cost = model_cost(model, kv_reserve_tokens);
    let policy = policy(&model.policy);
    let config = PlannerConfig {
        links,
        ..PlannerConfig::default()
    };
    let scope = match policy.describe() {
        d if d.is_empty() => String::new(),
        d if matches!(how, PlacementRequest::Auto) => format!(" under policy {d}"),
        d => format!(" (policy {d})"),
    };
    let committed: u64 = candidates
        .iter()
        .filter(|c| c.available)
        .map(|c| c.committed_bytes)
        .sum();
    let others = if committed > 0 {
        format!(
            " (memory free for it: the stages already placed there hold {} on the available workers)",
            planner::gib(committed)
        )
    } else {
        String::new()
    };
    let failed = |e: PlanError| {
        // The other models' share only where memory is what stands in the way.
        let text = e.to_string();
        let others = if text.contains("MiB") || text.contains("GiB") || text.contains("memory") {
            others.as_str()
        } else {
            ""
        };
        match e {
            PlanError::InsufficientMemory { .. } => CoordinatorError::FailedPrecondition(format!(
                "cannot place `{}`: {text}{others}",
                model.name
            )),
            _ => CoordinatorError::FailedPrecondition(format!(
                "cannot place `{}`{scope}: {text}{others}",
                model.name
            )),
        }
    };
    let chains = match how {
        PlacementRequest::Auto => {
            planner::plan(&workers, &cost, &policy, &config)
                .map_err(failed)?
                .chains
        }
        PlacementRequest::Stages(n) => {
            replicas_of(&workers, &cost, &policy, &config, *n).map_err(failed)?
        }
        PlacementRequest::Explicit(stages) => {
            let assignment: Vec<(String, planner::LayerRange)> = stages.clone();
            vec![planner::check_chain(&workers, &cost, &policy, &assignment).map_err(failed)?]
        }
    };
    Ok(chains
        .into_iter()
        .map(|chain| {
            chain
                .stages
                .into_iter()
                .map(|s| StageRecord {
                    worker_id: s.worker_id,
                    range: s.range,
                    memory_bytes: s.memory_bytes,
                    time_s: s.time_s,
                    loaded_in: 0,
                })
                .collect()
        })
        .collect())
}

/// Chains of exactly `stages` stages: the best one, then replicas from the workers left while
/// capacity allows (up to the planner's chain limit).
fn replicas_of(
    workers: &[WorkerCandidate],
    cost: &ModelCost,
    policy: &Policy,
    config: &PlannerConfig,
    stages: usize,
) -> Result<Vec<planner::Chain>, PlanError> {
    let mut pool = workers.to_vec();
    let mut chains: Vec<planner::Chain> = Vec::new();
    while chains.len() < config.max_chains.max(1) {
        match planner::plan_with_stages(&pool, cost, policy, config, stages) {
            Ok(plan) => {
                let Some(chain) = plan.chains.into_iter().next() else {
                    break;
                };
                pool.retain(|w| !chain.stages.iter().any(|s| s.worker_id == w.worker_id));
                chains.push(chain);
            }
            Err(e) if chains.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(chains)
}

/// The order each worker of `placement` receives, as (worker id, order).
pub fn orders(model: &ModelRecord, placement: &PlacementRecord) -> Vec<(String, AssignmentOrder)> {
    let mut out = Vec::new();
    for (chain_index, chain) in placement.chains.iter().enumerate() {
        for (stage_index, stage) in chain.iter().enumerate() {
            out.push((
                stage.worker_id.clone(),
                AssignmentOrder {
                    model: model.name.clone(),
                    version: placement.version,
                    file_sha256: model.file_sha256.clone(),
                    file_name: model.file_name.clone(),
                    file_path: model.file_path.clone(),
                    dtype: model.dtype,
                    range: stage.range,
                    chain: chain_index,
                    stage: stage_index,
                },
            ));
        }
    }
    out
}
