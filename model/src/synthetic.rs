//! Llama-shaped GGUF files with random weights and a byte-level tokenizer, of any size, for
//! tests and benchmarks that need a model other than the real one (scale, speed, bad input).

use std::io::{Seek, Write};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::gguf::block_tensor_names;
use crate::sampling::splitmix64;

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticLlama {
    /// Architecture name written to the file (`llama`, or anything else to test refusal).
    pub architecture: String,
    /// Number of blocks.
    pub layers: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub ffn_size: usize,
    /// Vocabulary size (at least 258: 256 bytes and two chat tokens).
    pub vocab_size: usize,
    /// Context length.
    pub context_length: usize,
    /// Type of the block matrices.
    pub dtype: GgmlDType,
    /// Write a separate `output.weight` instead of tying the head to the embedding.
    pub separate_head: bool,
    /// Seed of the weights.
    pub seed: u64,
}

impl SyntheticLlama {
    /// A small model that runs in milliseconds.
    pub fn tiny() -> Self {
        Self {
            architecture: "llama".into(),
            layers: 6,
            hidden_size: 64,
            heads: 4,
            kv_heads: 2,
            ffn_size: 128,
            vocab_size: 320,
            context_length: 256,
            dtype: GgmlDType::Q8_0,
            separate_head: false,
            seed: 7,
        }
    }

    /// Writes the model as GGUF.
    pub fn write<W: Write + Seek>(&self, w: &mut W) -> candle_core::Result<()> {
        let arch = self.architecture.as_str();
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (
                format!("{arch}.block_count"),
                Value::U32(self.layers as u32),
            ),
            (
                format!("{arch}.embedding_length"),
                Value::U32(self.hidden_size as u32),
            ),
            (
                format!("{arch}.feed_forward_length"),
                Value::U32(self.ffn_size as u32),
            ),
            (
                format!("{arch}.attention.head_count"),
                Value::U32(self.heads as u32),
            ),
            (
                format!("{arch}.attention.head_count_kv"),
                Value::U32(self.kv_heads as u32),
            ),
            (
                format!("{arch}.context_length"),
                Value::U32(self.context_length as u32),
            ),
            (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
        ];
        metadata.extend(self.tokenizer_metadata());
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let (h, kv, f, v) = (
            self.hidden_size,
            self.kv_heads * (self.hidden_size / self.heads),
            self.ffn_size,
            self.vocab_size,
        );
        let mut salt = self.seed;
        let mut matrix = |rows: usize, cols: usize, dtype: GgmlDType| {
            salt = splitmix64(salt);
            random_matrix(rows, cols, dtype, salt)
        };
        tensors.push(("token_embd.weight".into(), matrix(v, h, GgmlDType::Q8_0)?));
        for layer in 0..self.layers {
            let [attn_norm, q, k, vv, o, ffn_norm, gate, up, down] = block_tensor_names(layer);
            tensors.push((attn_norm, ones(h)?));
            tensors.push((q, matrix(h, h, self.dtype)?));
            tensors.push((k, matrix(kv, h, self.dtype)?));
            tensors.push((vv, matrix(kv, h, self.dtype)?));
            tensors.push((o, matrix(h, h, self.dtype)?));
            tensors.push((ffn_norm, ones(h)?));
            tensors.push((gate, matrix(f, h, self.dtype)?));
            tensors.push((up, matrix(f, h, self.dtype)?));
            tensors.push((down, matrix(h, f, self.dtype)?));
        }
        tensors.push(("output_norm.weight".into(), ones(h)?));
        if self.separate_head {
            tensors.push(("output.weight".into(), matrix(v, h, GgmlDType::Q8_0)?));
        }
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(w, &md, &ts)
    }

    /// Writes the model to a file at `path`.
    pub fn write_file(&self, path: &std::path::Path) -> candle_core::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        self.write(&mut file)?;
        file.flush()?;
        Ok(())
    }

    /// A byte-level vocabulary: the 256 byte characters, `<|im_start|>`, `<|im_end|>`, fillers.
    fn tokenizer_metadata(&self) -> Vec<(String, Value)> {
        let mut tokens: Vec<Value> = byte_chars()
            .into_iter()
            .map(|c| Value::String(c.to_string()))
            .collect();
        tokens.push(Value::String("<|im_start|>".into()));
        tokens.push(Value::String("<|im_end|>".into()));
        while tokens.len() < self.vocab_size {
            tokens.push(Value::String(format!("<filler{}>", tokens.len())));
        }
        let types: Vec<Value> = (0..tokens.len())
            .map(|i| Value::I32(if (256..258).contains(&i) { 3 } else { 1 }))
            .collect();
        vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
        ]
    }
}

/// The printable characters GPT-2 byte-level BPE uses for bytes 0..=255, in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("valid char")
        })
        .collect()
}

fn ones(len: usize) -> candle_core::Result<QTensor> {
    let t = Tensor::ones(len, candle_core::DType::F32, &Device::Cpu)?;
    QTensor::quantize(&t, GgmlDType::F32)
}

fn random_matrix(
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    seed: u64,
) -> candle_core::Result<QTensor> {
    let scale = 1.0 / (cols as f32).sqrt();
    let mut state = seed;
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = splitmix64(state);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale * 1.7
        })
        .collect();
    QTensor::quantize(
        &Tensor::from_vec(values, (rows, cols), &Device::Cpu)?,
        dtype,
    )
}
