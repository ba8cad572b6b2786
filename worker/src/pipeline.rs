//! A chain of [`LlamaSlice`]s run in one process: the first embeds, each passes its hidden states
//! to the next, the last produces logits. Several sessions run through it as one batch.

use std::path::Path;

use candle_core::{Device, Tensor};
use sovra_model::llama::logits_row;
use sovra_model::{
    ForwardError, GgufModel, LayerRange, LlamaSlice, LoadError, ModelSpec, SegmentInput,
    SessionCache, SliceInput, SliceOutput, SliceProfile, WeightMode,
};

/// Why a pipeline could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The model or a slice could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The ranges do not cover the model's layers exactly once, in order.
    #[error("layer ranges {ranges} do not cover layers 0..{layers} contiguously")]
    Coverage {
        /// The ranges given.
        ranges: String,
        /// Layers in the model.
        layers: usize,
    },
    /// A forward pass failed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// A session was made by another pipeline.
    #[error("session does not belong to this pipeline")]
    ForeignSession,
    /// Reading logits back failed.
    #[error("reading logits: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// One session's state across every slice of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSession {
    caches: Vec<SessionCache>,
}

impl PipelineSession {
    /// Tokens the session has run so far.
    pub fn len(&self) -> usize {
        self.caches.first().map(SessionCache::len).unwrap_or(0)
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every token from position `len` on, in every stage (for replay).
    pub fn truncate(&mut self, len: usize) -> Result<(), PipelineError> {
        for cache in &mut self.caches {
            cache.truncate(len)?;
        }
        Ok(())
    }

    /// Bytes of KV cache the session holds.
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(SessionCache::bytes).sum()
    }
}

/// Slices covering a whole model, run one after another in this process.
#[derive(Debug)]
pub struct LocalPipeline {
    slices: Vec<LlamaSlice>,
}

impl LocalPipeline {
    /// Loads `model` split into `ranges` (which must cover every layer once, in order).
    pub fn load(
        model: &GgufModel,
        ranges: &[LayerRange],
        mode: WeightMode,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let layers = model.spec().layers;
        let contiguous = !ranges.is_empty()
            && ranges[0].start == 0
            && ranges.last().map(|r| r.end) == Some(layers)
            && ranges.windows(2).all(|w| w[0].end == w[1].start);
        if !contiguous {
            let shown: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            return Err(PipelineError::Coverage {
                ranges: shown.join(", "),
                layers,
            });
        }
        let slices = ranges
            .iter()
            .map(|&r| LlamaSlice::load(model, r, mode, device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { slices })
    }

    /// Opens `path` and loads it split into `stages` even parts.
    pub fn open(path: &Path, stages: usize, mode: WeightMode) -> Result<Self, PipelineError> {
        let model = GgufModel::open(path)?;
        let ranges = LayerRange::split_even(model.spec().layers, stages);
        Self::load(&model, &ranges, mode, &Device::Cpu)
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        self.slices[0].spec()
    }

    /// The layer range of each stage.
    pub fn ranges(&self) -> Vec<LayerRange> {
        self.slices.iter().map(LlamaSlice::range).collect()
    }

    /// A new, empty session.
    pub fn new_session(&self) -> PipelineSession {
        PipelineSession {
            caches: self.slices.iter().map(LlamaSlice::new_cache).collect(),
        }
    }

    /// Runs `tokens[i]` through session `sessions[i]` for every i as one batch, returning the
    /// logits at each session's last new token.
    pub fn forward(
        &self,
        sessions: &mut [&mut PipelineSession],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, PipelineError> {
        let logits = self.forward_tensor(sessions, tokens)?;
        (0..sessions.len())
            .map(|i| Ok(logits_row(&logits, i)?))
            .collect()
    }

    /// As [`LocalPipeline::forward`], returning the `[sessions, vocab]` logits tensor.
    pub fn forward_tensor(
        &self,
        sessions: &mut [&mut PipelineSession],
        tokens: &[&[u32]],
    ) -> Result<Tensor, PipelineError> {
        let mut profiles = vec![SliceProfile::default(); self.slices.len()];
        self.forward_profiled(sessions, tokens, &mut profiles)
    }

    /// As [`LocalPipeline::forward_tensor`], adding each stage's time to `profiles[stage]`.
    pub fn forward_profiled(
        &self,
        sessions: &mut [&mut PipelineSession],
        tokens: &[&[u32]],
        profiles: &mut [SliceProfile],
    ) -> Result<Tensor, PipelineError> {
        if sessions.iter().any(|s| s.caches.len() != self.slices.len()) {
            return Err(PipelineError::ForeignSession);
        }
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let mut input = SliceInput::Tokens(ids);
        for (stage, slice) in self.slices.iter().enumerate() {
            let mut segments: Vec<SegmentInput<'_>> = sessions
                .iter_mut()
                .zip(tokens)
                .map(|(s, t)| SegmentInput {
                    cache: &mut s.caches[stage],
                    rows: t.len(),
                })
                .collect();
            match slice.forward_profiled(input, &mut segments, &mut profiles[stage])? {
                SliceOutput::Hidden(h) => input = SliceInput::Hidden(h),
                SliceOutput::Logits(logits) => return Ok(logits),
            }
        }
        unreachable!("the last slice of a covering pipeline produces logits")
    }
}
