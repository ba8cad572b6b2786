//! The shape of a model as sovra needs it for planning and loading: [`ModelSpec`], the
//! half-open [`LayerRange`] a stage runs, and the [`WeightMode`] its weights are held in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Everything the planner and a worker need to know about a model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture name as the GGUF states it (`llama`).
    pub architecture: String,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of query heads.
    pub heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `heads`).
    pub kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Inner width of the SwiGLU MLP.
    pub ffn_size: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f32,
    /// Number of tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Longest sequence the model was trained for; sessions may not exceed it.
    pub context_length: usize,
    /// True when the LM head reuses the token embedding (no `output.weight` tensor).
    pub tied_embeddings: bool,
    /// Bytes each block's tensors take in the file, indexed by layer.
    pub layer_bytes: Vec<u64>,
    /// Number of weight elements in each block (the same for every layer of a Llama model).
    pub layer_params: u64,
    /// Bytes of the token embedding in the file.
    pub embedding_bytes: u64,
    /// Bytes of the final norm plus the LM head in the file (the embedding again when tied).
    pub head_bytes: u64,
    /// Number of elements of the token embedding (and of a tied or separate LM head).
    pub embedding_params: u64,
}

impl ModelSpec {
    /// Bytes one session's KV cache takes per token per layer, in f32.
    pub fn kv_bytes_per_token_per_layer(&self) -> u64 {
        (2 * self.kv_heads * self.head_dim * 4) as u64
    }

    /// Bytes of the weights of `range` (plus embedding and head where the range holds them) when
    /// held in `mode`.
    pub fn slice_bytes(&self, range: LayerRange, mode: WeightMode) -> u64 {
        let per_layer = |layer: usize| match mode {
            WeightMode::Gguf => self.layer_bytes[layer],
            mode => mode.bytes_for(self.layer_params),
        };
        let mut bytes: u64 = (range.start..range.end).map(per_layer).sum();
        let embedding = match mode {
            WeightMode::Gguf => self.embedding_bytes,
            mode => mode.bytes_for(self.embedding_params),
        };
        if range.start == 0 {
            bytes += embedding;
        }
        if range.end == self.layers {
            let head = match mode {
                WeightMode::Gguf => self.head_bytes,
                mode => mode.bytes_for(self.embedding_params) + (self.hidden_size * 4) as u64,
            };
            // A tied head held by the stage that also embeds shares the same tensor.
            if !(self.tied_embeddings && range.start == 0) {
                bytes += head;
            }
        }
        bytes
    }
}

/// A half-open range of transformer blocks `[start, end)`, the unit of work of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    /// First block of the range.
    pub start: usize,
    /// One past the last block of the range.
    pub end: usize,
}

impl LayerRange {
    /// The range `[start, end)`.
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// Number of blocks in the range.
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits `[0, layers)` into `parts` contiguous ranges whose sizes differ by at most one.
    pub fn split_even(layers: usize, parts: usize) -> Vec<LayerRange> {
        let parts = parts.clamp(1, layers.max(1));
        let (base, extra) = (layers / parts, layers % parts);
        let mut start = 0;
        (0..parts)
            .map(|i| {
                let end = start + base + usize::from(i < extra);
                let range = LayerRange::new(start, end);
                start = end;
                range
            })
            .collect()
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once("..")
            .ok_or_else(|| format!("layer range `{s}` is not of the form START..END"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("layer range `{s}`: `{v}` is not a layer number"))
        };
        let (start, end) = (parse(a)?, parse(b)?);
        if start >= end {
            return Err(format!("layer range `{s}` is empty (ranges are half-open)"));
        }
        Ok(LayerRange::new(start, end))
    }
}

/// How a stage holds its weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightMode {
    /// The file's own quantized types, multiplied with candle's quantized matmul.
    Gguf,
    /// Every matrix requantized to Q8_0 at load.
    Q8_0,
    /// Every matrix dequantized to f32 at load (exact comparison with references).
    F32,
}

impl WeightMode {
    /// The mode used when none is asked for: the fastest here (see docs/benchmarks.md).
    pub const DEFAULT: WeightMode = WeightMode::Q8_0;

    /// Every mode, in the order the CLI lists them.
    pub const ALL: [WeightMode; 3] = [WeightMode::Gguf, WeightMode::Q8_0, WeightMode::F32];

    /// Bytes that `params` weight elements take in this mode (for `Gguf` the file's own size must
    /// be used instead; this returns the Q8_0 size as an estimate).
    pub fn bytes_for(self, params: u64) -> u64 {
        match self {
            WeightMode::Gguf | WeightMode::Q8_0 => params / 32 * 34,
            WeightMode::F32 => params * 4,
        }
    }

    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightMode::Gguf => "gguf",
            WeightMode::Q8_0 => "q8_0",
            WeightMode::F32 => "f32",
        }
    }
}

impl fmt::Display for WeightMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WeightMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WeightMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown weight mode `{s}` (expected gguf, q8_0 or f32)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_covers_every_layer_once() {
        for layers in 1..40 {
            for parts in 1..8 {
                let ranges = LayerRange::split_even(layers, parts);
                assert_eq!(ranges.first().unwrap().start, 0);
                assert_eq!(ranges.last().unwrap().end, layers);
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let sizes: Vec<_> = ranges.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
                assert!(sizes.iter().all(|&s| s > 0));
            }
        }
    }

    #[test]
    fn layer_range_parses_half_open() {
        assert_eq!(
            "7..19".parse::<LayerRange>().unwrap(),
            LayerRange::new(7, 19)
        );
        assert!("7..7".parse::<LayerRange>().is_err());
        assert!("9..3".parse::<LayerRange>().is_err());
        assert!("a..3".parse::<LayerRange>().is_err());
        assert!("3".parse::<LayerRange>().is_err());
    }

    #[test]
    fn weight_mode_round_trips() {
        for mode in WeightMode::ALL {
            assert_eq!(mode.as_str().parse::<WeightMode>().unwrap(), mode);
        }
        assert!("q4".parse::<WeightMode>().is_err());
    }
}
