//! A contiguous range of Llama transformer blocks, loaded from a GGUF file and run on candle.
//!
//! A [`LlamaSlice`] holds only the tensors of its range (plus the embedding when it starts at
//! layer 0 and the final norm and LM head when it ends at the last layer). The KV cache of each
//! session lives in a [`SessionCache`] outside the weights, so one slice serves many sessions.
//! [`LlamaSlice::forward`] runs several sessions at once: their rows are stacked so every linear
//! layer is one matmul for the whole batch, while attention runs per session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use candle_nn::rotary_emb::rope_i;

use crate::gguf::{GgufModel, LoadError, block_tensor_names};
use crate::spec::{LayerRange, ModelSpec, WeightMode};

/// Why a forward pass was refused or failed. Caches are left as they were before the call.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The batch holds no segment, or a segment holds no row.
    #[error("empty batch: every segment needs at least one row")]
    EmptyBatch,
    /// The input's row count is not the sum of the segments' row counts.
    #[error("input has {input} rows but the segments declare {declared}")]
    RowMismatch {
        /// Rows in the input.
        input: usize,
        /// Rows the segments declare.
        declared: usize,
    },
    /// Token ids were sent to a stage that expects hidden states, or the reverse.
    #[error("this slice ({range}) expects {expected}")]
    WrongInput {
        /// The slice's layer range.
        range: LayerRange,
        /// What it expects.
        expected: &'static str,
    },
    /// A hidden state has another shape or dtype than the model's.
    #[error("hidden states must be f32 of shape [rows, {hidden}], got {found}")]
    HiddenShape {
        /// The model's hidden size.
        hidden: usize,
        /// What was received.
        found: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Size of the vocabulary.
        vocab: usize,
    },
    /// The session would grow past the model's context length.
    #[error("session would reach {needed} tokens, past the context length of {context}")]
    ContextOverflow {
        /// Tokens the session would hold.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// A cache made for another slice was passed in.
    #[error("session cache was made for layers {cache}, not {slice}")]
    CacheMismatch {
        /// The cache's range.
        cache: LayerRange,
        /// This slice's range.
        slice: LayerRange,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// The rows fed to a slice: token ids for the first stage, hidden states for the others.
#[derive(Debug, Clone)]
pub enum SliceInput {
    /// Token ids, the rows of every segment stacked in order.
    Tokens(Vec<u32>),
    /// Hidden states `[rows, hidden]` in f32, the rows of every segment stacked in order.
    Hidden(Tensor),
}

/// One session's part of a batch: its cache and how many consecutive rows it contributes. The
/// rows continue the session at position `cache.len()`.
#[derive(Debug)]
pub struct SegmentInput<'a> {
    /// The session's KV cache for this slice.
    pub cache: &'a mut SessionCache,
    /// Number of rows (tokens) of this session in the batch.
    pub rows: usize,
}

/// What a slice produces.
#[derive(Debug, Clone)]
pub enum SliceOutput {
    /// Hidden states `[rows, hidden]` for the next stage, in the input's row order.
    Hidden(Tensor),
    /// Logits `[segments, vocab]` at the last row of each segment (the last stage only).
    Logits(Tensor),
}

/// One session's KV cache for the layers of one slice.
#[derive(Debug, Clone)]
pub struct SessionCache {
    range: LayerRange,
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SessionCache {
    /// An empty cache for `range`.
    pub fn new(range: LayerRange) -> Self {
        Self {
            range,
            kv: vec![None; range.len()],
            len: 0,
        }
    }

    /// Tokens this session has run through the slice; the position of its next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.kv
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }

    /// Forgets every position from `len` on (used to roll back a failed forward or to replay).
    pub fn truncate(&mut self, len: usize) -> candle_core::Result<()> {
        for entry in &mut self.kv {
            *entry = match entry.take() {
                None => None,
                Some(_) if len == 0 => None,
                Some((k, v)) if k.dim(1)? > len => Some((
                    k.narrow(1, 0, len)?.contiguous()?,
                    v.narrow(1, 0, len)?.contiguous()?,
                )),
                kept => kept,
            };
        }
        self.len = self.len.min(len);
        Ok(())
    }
}

/// The token embedding, kept in its file type (quantized row lookup) or dense.
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Dense(t) => t.index_select(ids, 0),
        }
    }

    fn as_head(&self) -> QMatMul {
        match self {
            Embedding::Quantized(q) => QMatMul::QTensor(q.clone()),
            Embedding::Dense(t) => QMatMul::Tensor(t.clone()),
        }
    }
}

#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

#[derive(Debug)]
struct Head {
    norm: Tensor,
    lm_head: QMatMul,
}

/// Wall time a slice spent in each part of its forward passes (CPU ops are synchronous, so
/// these are the real costs).
#[derive(Debug, Clone, Default)]
pub struct SliceProfile {
    /// Forward calls profiled.
    pub calls: usize,
    /// Token embedding (or moving the input hidden states in).
    pub embed: Duration,
    /// Every transformer block together.
    pub blocks: Duration,
    /// Final norm and LM head.
    pub head: Duration,
}

fn lap(clock: &mut Instant) -> Duration {
    let now = Instant::now();
    let spent = now - *clock;
    *clock = now;
    spent
}

/// Precomputed RoPE tables `[context, head_dim / 2]`.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(spec: &ModelSpec, device: &Device) -> candle_core::Result<Self> {
        let half = spec.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / spec.rope_base.powf(2.0 * i as f32 / spec.head_dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(spec.context_length * half);
        for pos in 0..spec.context_length {
            angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (spec.context_length, half), device)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }
}

/// Largest batch (rows of all segments) that a quantized slice runs with one rayon thread.
const SMALL_BATCH: usize = 16;

/// Runs `f` with this thread as the only thread of its own rayon pool, so what rayon would
/// split runs here in turn, with no other thread woken; gives `f` back if this thread cannot
/// have such a pool (it already belongs to a rayon pool).
fn on_this_thread_alone<R: Send, F: FnOnce() -> R + Send>(f: F) -> Result<R, F> {
    thread_local! {
        static POOL: Option<rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .use_current_thread()
            .build()
            .ok();
    }
    POOL.with(|pool| match pool {
        Some(pool) => Ok(pool.install(f)),
        None => Err(f),
    })
}

/// The layers `[start, end)` of a Llama model, ready to run.
#[derive(Debug)]
pub struct LlamaSlice {
    spec: ModelSpec,
    range: LayerRange,
    mode: WeightMode,
    embedding: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<Head>,
    rope: Rope,
    device: Device,
}

impl LlamaSlice {
    /// Loads the tensors of `range` from `model` in weight mode `mode`.
    pub fn load(
        model: &GgufModel,
        range: LayerRange,
        mode: WeightMode,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let spec = model.spec().clone();
        if range.is_empty() || range.end > spec.layers {
            return Err(LoadError::LayerRange {
                start: range.start,
                end: range.end,
                layers: spec.layers,
            });
        }
        let mut loader = Loader::new(model, mode, device)?;
        let embedding = if range.start == 0 || (range.end == spec.layers && spec.tied_embeddings) {
            Some(loader.embedding()?)
        } else {
            None
        };
        let blocks = (range.start..range.end)
            .map(|layer| loader.block(layer))
            .collect::<Result<Vec<_>, _>>()?;
        let head = if range.end == spec.layers {
            let norm = loader.dense("output_norm.weight", &[spec.hidden_size])?;
            let lm_head = match &embedding {
                Some(e) if spec.tied_embeddings => e.as_head(),
                _ => loader.matrix("output.weight", &[spec.vocab_size, spec.hidden_size])?,
            };
            Some(Head { norm, lm_head })
        } else {
            None
        };
        let embedding = if range.start == 0 { embedding } else { None };
        let rope = Rope::new(&spec, device).map_err(|e| LoadError::Convert {
            name: "rope tables".into(),
            mode,
            reason: e.to_string(),
        })?;
        Ok(Self {
            spec,
            range,
            mode,
            embedding,
            blocks,
            head,
            rope,
            device: device.clone(),
        })
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The layers this slice runs.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// The weight mode the slice was loaded in.
    pub fn mode(&self) -> WeightMode {
        self.mode
    }

    /// True when the slice embeds token ids (it holds layer 0).
    pub fn is_head_stage(&self) -> bool {
        self.embedding.is_some()
    }

    /// True when the slice produces logits (it holds the last layer).
    pub fn is_tail_stage(&self) -> bool {
        self.head.is_some()
    }

    /// An empty KV cache for a new session on this slice.
    pub fn new_cache(&self) -> SessionCache {
        SessionCache::new(self.range)
    }

    /// Runs the rows of every segment through the slice. On error every cache is rolled back to
    /// its length before the call.
    pub fn forward(
        &self,
        input: SliceInput,
        segments: &mut [SegmentInput<'_>],
    ) -> Result<SliceOutput, ForwardError> {
        self.forward_profiled(input, segments, &mut SliceProfile::default())
    }

    /// As [`LlamaSlice::forward`], adding the time spent in each part to `profile`.
    pub fn forward_profiled(
        &self,
        input: SliceInput,
        segments: &mut [SegmentInput<'_>],
        profile: &mut SliceProfile,
    ) -> Result<SliceOutput, ForwardError> {
        self.check(&input, segments)?;
        let before: Vec<usize> = segments.iter().map(|s| s.cache.len()).collect();
        let rows: usize = segments.iter().map(|s| s.rows).sum();
        let small = self.device.is_cpu() && self.mode != WeightMode::F32 && rows <= SMALL_BATCH;
        // Quantized matmuls and elementwise ops run on candle's barrier pool, not on rayon;
        // what rayon would split in a small batch (rope, softmax, norms, attention of a few
        // rows) is too small to pay for waking another thread, which then competes with the
        // barrier pool's threads for the cores. So a small quantized batch runs here, rayon
        // included. Otherwise the forward runs inside candle's own rayon pool, so the f32
        // matmuls (gemm on rayon) start on warm pool threads instead of handing each op from
        // this thread to the global pool: generate --local f32 decodes ~8% faster with it.
        let forward = || self.forward_checked(input, segments, profile);
        let result = if small {
            on_this_thread_alone(forward).unwrap_or_else(|f| self.device.with_context(f))
        } else {
            self.device.with_context(forward)
        };
        for (segment, len) in segments.iter_mut().zip(&before) {
            match &result {
                Ok(_) => segment.cache.len = len + segment.rows,
                Err(_) => segment.cache.truncate(*len)?,
            }
        }
        result
    }

    fn check(&self, input: &SliceInput, segments: &[SegmentInput<'_>]) -> Result<(), ForwardError> {
        if segments.is_empty() || segments.iter().any(|s| s.rows == 0) {
            return Err(ForwardError::EmptyBatch);
        }
        let declared: usize = segments.iter().map(|s| s.rows).sum();
        let rows = match (input, self.is_head_stage()) {
            (SliceInput::Tokens(ids), true) => {
                if let Some(&token) = ids.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
                    return Err(ForwardError::TokenOutOfRange {
                        token,
                        vocab: self.spec.vocab_size,
                    });
                }
                ids.len()
            }
            (SliceInput::Hidden(h), false) => {
                let ok = h.dtype() == DType::F32
                    && h.rank() == 2
                    && h.dim(1).ok() == Some(self.spec.hidden_size);
                if !ok {
                    return Err(ForwardError::HiddenShape {
                        hidden: self.spec.hidden_size,
                        found: format!("{:?} {:?}", h.dtype(), h.dims()),
                    });
                }
                h.dim(0)?
            }
            (_, head) => {
                return Err(ForwardError::WrongInput {
                    range: self.range,
                    expected: if head { "token ids" } else { "hidden states" },
                });
            }
        };
        if rows != declared {
            return Err(ForwardError::RowMismatch {
                input: rows,
                declared,
            });
        }
        for segment in segments {
            if segment.cache.range != self.range || segment.cache.kv.len() != self.blocks.len() {
                return Err(ForwardError::CacheMismatch {
                    cache: segment.cache.range,
                    slice: self.range,
                });
            }
            let needed = segment.cache.len() + segment.rows;
            if needed > self.spec.context_length {
                return Err(ForwardError::ContextOverflow {
                    needed,
                    context: self.spec.context_length,
                });
            }
        }
        Ok(())
    }

    fn forward_checked(
        &self,
        input: SliceInput,
        segments: &mut [SegmentInput<'_>],
        profile: &mut SliceProfile,
    ) -> Result<SliceOutput, ForwardError> {
        profile.calls += 1;
        let mut clock = Instant::now();
        let mut xs = match input {
            SliceInput::Tokens(ids) => {
                let ids = Tensor::new(ids.as_slice(), &self.device)?;
                match &self.embedding {
                    Some(e) => e.lookup(&ids)?,
                    None => unreachable!("checked: token input only reaches the head stage"),
                }
            }
            SliceInput::Hidden(h) => h.to_device(&self.device)?.contiguous()?,
        };
        profile.embed += lap(&mut clock);
        for (index, block) in self.blocks.iter().enumerate() {
            xs = self.block_forward(block, index, &xs, segments)?;
        }
        profile.blocks += lap(&mut clock);
        let Some(head) = &self.head else {
            return Ok(SliceOutput::Hidden(xs));
        };
        let mut last_rows = Vec::with_capacity(segments.len());
        let mut offset = 0u32;
        for segment in segments.iter() {
            offset += segment.rows as u32;
            last_rows.push(offset - 1);
        }
        let last_rows = Tensor::new(last_rows.as_slice(), &self.device)?;
        let last = xs.index_select(&last_rows, 0)?;
        let normed = rms_norm(&last, &head.norm, self.spec.rms_eps)?;
        let logits = head.lm_head.forward(&normed)?;
        profile.head += lap(&mut clock);
        Ok(SliceOutput::Logits(logits))
    }

    fn block_forward(
        &self,
        block: &Block,
        index: usize,
        xs: &Tensor,
        segments: &mut [SegmentInput<'_>],
    ) -> Result<Tensor, ForwardError> {
        let h = rms_norm(xs, &block.attn_norm, self.spec.rms_eps)?;
        let q = block.wq.forward(&h)?;
        let k = block.wk.forward(&h)?;
        let v = block.wv.forward(&h)?;
        let mut outputs = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for segment in segments.iter_mut() {
            let n = segment.rows;
            let start = segment.cache.len();
            let kv = &mut segment.cache.kv[index];
            outputs.push(self.attention(
                &q.narrow(0, offset, n)?,
                &k.narrow(0, offset, n)?,
                &v.narrow(0, offset, n)?,
                kv,
                start,
            )?);
            offset += n;
        }
        let attn = if outputs.len() == 1 {
            outputs.pop().expect("one output")
        } else {
            Tensor::cat(&outputs, 0)?
        };
        let xs = (xs + block.wo.forward(&attn)?)?;
        let h = rms_norm(&xs, &block.ffn_norm, self.spec.rms_eps)?;
        let mlp = (silu(&block.gate.forward(&h)?)? * block.up.forward(&h)?)?;
        Ok((xs + block.down.forward(&mlp)?)?)
    }

    /// Causal grouped-query attention for one session's `n` new rows starting at `start`.
    /// Query heads are grouped by their KV head so K and V are never repeated in memory.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        start: usize,
    ) -> candle_core::Result<Tensor> {
        let s = &self.spec;
        let n = q.dim(0)?;
        let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
        let cos = self.rope.cos.narrow(0, start, n)?;
        let sin = self.rope.sin.narrow(0, start, n)?;
        let q = q.reshape((1, n, h, d))?.transpose(1, 2)?.contiguous()?;
        let q = rope_i(&q, &cos, &sin)?;
        let k = k.reshape((1, n, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let k = rope_i(&k, &cos, &sin)?.squeeze(0)?;
        let v = v.reshape((n, kvh, d))?.transpose(0, 1)?.contiguous()?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let total = k.dim(1)?;
        let rep = h / kvh;
        let q = q.reshape((kvh, rep * n, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let scores = if n > 1 {
            let mask = causal_mask(n, start, total, &self.device)?;
            scores
                .reshape((kvh, rep, n, total))?
                .broadcast_add(&mask)?
                .reshape((kvh, rep * n, total))?
        } else {
            scores
        };
        let probs = softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?;
        out.reshape((h, n, d))?.transpose(0, 1)?.reshape((n, h * d))
    }
}

/// `[n, total]` additive mask: row i (position start + i) sees columns 0..=start + i.
fn causal_mask(
    n: usize,
    start: usize,
    total: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}

/// Reads tensors of one model and converts them to the slice's weight mode.
struct Loader<'a> {
    model: &'a GgufModel,
    reader: std::io::BufReader<std::fs::File>,
    mode: WeightMode,
    device: &'a Device,
}

impl<'a> Loader<'a> {
    fn new(model: &'a GgufModel, mode: WeightMode, device: &'a Device) -> Result<Self, LoadError> {
        Ok(Self {
            reader: model.reader()?,
            model,
            mode,
            device,
        })
    }

    fn raw(&mut self, name: &str, shape: &[usize]) -> Result<QTensor, LoadError> {
        self.model
            .tensor(&mut self.reader, name, shape, self.device)
    }

    fn convert_err(&self, name: &str, e: candle_core::Error) -> LoadError {
        LoadError::Convert {
            name: name.to_string(),
            mode: self.mode,
            reason: e.to_string(),
        }
    }

    /// A vector (norm weight), always dense f32.
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let q = self.raw(name, shape)?;
        q.dequantize(self.device)
            .map_err(|e| self.convert_err(name, e))
    }

    /// A weight matrix `[out, in]`, held as the mode asks.
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul, LoadError> {
        let q = self.raw(name, shape)?;
        self.to_mode(q).map_err(|e| self.convert_err(name, e))
    }

    fn to_mode(&self, q: QTensor) -> candle_core::Result<QMatMul> {
        let dense_type = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        match self.mode {
            WeightMode::F32 => Ok(QMatMul::Tensor(q.dequantize(self.device)?)),
            WeightMode::Gguf => QMatMul::from_qtensor(q),
            WeightMode::Q8_0 if q.dtype() == GgmlDType::Q8_0 => QMatMul::from_qtensor(q),
            WeightMode::Q8_0
                if dense_type && !q.shape().dims()[q.rank() - 1].is_multiple_of(32) =>
            {
                QMatMul::from_qtensor(q)
            }
            WeightMode::Q8_0 => {
                let dense = q.dequantize(self.device)?;
                QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)
            }
        }
    }

    fn embedding(&mut self) -> Result<Embedding, LoadError> {
        let spec = self.model.spec();
        let shape = [spec.vocab_size, spec.hidden_size];
        let name = "token_embd.weight";
        let q = self.raw(name, &shape)?;
        let quantized_ok = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        match self.mode {
            WeightMode::Gguf if quantized_ok => Ok(Embedding::Quantized(Arc::new(q))),
            WeightMode::Q8_0 if q.dtype() == GgmlDType::Q8_0 => {
                Ok(Embedding::Quantized(Arc::new(q)))
            }
            WeightMode::Q8_0 if spec.hidden_size.is_multiple_of(32) => {
                let dense = q
                    .dequantize(self.device)
                    .map_err(|e| self.convert_err(name, e))?;
                let q8 = QTensor::quantize(&dense, GgmlDType::Q8_0)
                    .map_err(|e| self.convert_err(name, e))?;
                Ok(Embedding::Quantized(Arc::new(q8)))
            }
            _ => Ok(Embedding::Dense(
                q.dequantize(self.device)
                    .map_err(|e| self.convert_err(name, e))?,
            )),
        }
    }

    fn block(&mut self, layer: usize) -> Result<Block, LoadError> {
        let s = self.model.spec().clone();
        let (hd, kv, ffn) = (s.hidden_size, s.kv_heads * s.head_dim, s.ffn_size);
        let [attn_norm, q, k, v, o, ffn_norm, gate, up, down] = block_tensor_names(layer);
        Ok(Block {
            attn_norm: self.dense(&attn_norm, &[hd])?,
            wq: self.matrix(&q, &[hd, hd])?,
            wk: self.matrix(&k, &[kv, hd])?,
            wv: self.matrix(&v, &[kv, hd])?,
            wo: self.matrix(&o, &[hd, hd])?,
            ffn_norm: self.dense(&ffn_norm, &[hd])?,
            gate: self.matrix(&gate, &[ffn, hd])?,
            up: self.matrix(&up, &[ffn, hd])?,
            down: self.matrix(&down, &[hd, ffn])?,
        })
    }
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Copies row `row` of a `[rows, vocab]` logits tensor out as a vector.
pub fn logits_row(logits: &Tensor, row: usize) -> candle_core::Result<Vec<f32>> {
    logits.get(row)?.to_dtype(DType::F32)?.to_vec1::<f32>()
}
