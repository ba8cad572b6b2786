//! Reading GGUF files: the header and metadata into a [`ModelSpec`], and single tensors on
//! demand, each checked against the shape the spec implies.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};

use crate::spec::ModelSpec;

/// Architectures whose blocks [`crate::LlamaSlice`] can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Upper bounds on metadata values, so a hostile file cannot make us allocate absurd tables.
const MAX_LAYERS: usize = 4096;
const MAX_CONTEXT: usize = 1 << 22;
const MAX_WIDTH: usize = 1 << 20;
/// Most positions times head width: the RoPE tables every slice computes at load hold this
/// many floats twice (Llama 3.1's 131,072 positions of 128 take half of it).
const MAX_ROPE_ENTRIES: usize = 1 << 25;

/// Why a model file or a slice of it could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF file (bad magic, truncated or corrupt header).
    #[error("{path} is not a valid GGUF file: {reason}")]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What the reader found wrong.
        reason: String,
    },
    /// A metadata key the model needs is absent or of the wrong type.
    #[error("GGUF metadata `{key}` is missing or is not {expected}")]
    Metadata {
        /// The key.
        key: String,
        /// What was expected there.
        expected: &'static str,
    },
    /// The metadata describes a model that cannot exist or that sovra refuses to allocate.
    #[error("GGUF metadata is inconsistent: {0}")]
    InconsistentSpec(String),
    /// The file holds an architecture sovra cannot run.
    #[error("unsupported architecture `{found}` (sovra runs: {supported})")]
    UnsupportedArchitecture {
        /// The architecture named in the file.
        found: String,
        /// The architectures sovra runs.
        supported: String,
    },
    /// A tensor the slice needs is not in the file.
    #[error("tensor `{0}` is missing from the GGUF file")]
    MissingTensor(String),
    /// A tensor has another shape than the metadata implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the spec implies.
        expected: Vec<usize>,
    },
    /// A tensor's data could not be read (a truncated file, an unsupported type).
    #[error("cannot load tensor `{name}` from {path}: {reason}")]
    TensorData {
        /// The tensor.
        name: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The requested layer range does not fit the model.
    #[error("layer range {start}..{end} is out of bounds for a model of {layers} layers")]
    LayerRange {
        /// First layer asked for.
        start: usize,
        /// One past the last layer asked for.
        end: usize,
        /// Layers in the model.
        layers: usize,
    },
    /// Converting a tensor to the requested weight mode failed.
    #[error("cannot convert tensor `{name}` to {mode}: {reason}")]
    Convert {
        /// The tensor.
        name: String,
        /// The weight mode asked for.
        mode: crate::WeightMode,
        /// What went wrong.
        reason: String,
    },
}

/// An opened GGUF file: its metadata, tensor directory and the [`ModelSpec`] read from them.
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    spec: ModelSpec,
}

impl GgufModel {
    /// Opens `path`, reads its header and derives the model spec; no tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let invalid = |reason: String| LoadError::InvalidGguf {
            path: path.clone(),
            reason,
        };
        // candle divides by the alignment the file declares: check it before candle reads.
        check_alignment(&mut reader, file_len).map_err(invalid)?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
        let content = Content::read(&mut reader).map_err(|e| invalid(e.to_string()))?;
        check_tensor_extents(&content, file_len).map_err(|reason| LoadError::InvalidGguf {
            path: path.clone(),
            reason,
        })?;
        let spec = spec_from_content(&content)?;
        Ok(Self {
            path,
            content,
            spec,
        })
    }

    /// The model spec read from the metadata.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The file this model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw metadata (for the tokenizer).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// True when the file holds a tensor of that name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Opens a reader on the file for [`GgufModel::tensor`].
    pub fn reader(&self) -> Result<BufReader<File>, LoadError> {
        File::open(&self.path)
            .map(BufReader::new)
            .map_err(|source| LoadError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads tensor `name`, checking that its shape (rows, columns… as candle orders them) is
    /// `expected`.
    pub fn tensor(
        &self,
        reader: &mut BufReader<File>,
        name: &str,
        expected: &[usize],
        device: &Device,
    ) -> Result<QTensor, LoadError> {
        let info = self.info(name, expected)?;
        info.read(reader, self.content.tensor_data_offset, device)
            .map_err(|e| LoadError::TensorData {
                name: name.to_string(),
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    fn info(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo, LoadError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        if info.shape.dims() != expected {
            return Err(LoadError::TensorShape {
                name: name.to_string(),
                found: info.shape.dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(info)
    }
}

/// Reads the metadata of a GGUF header far enough to check `general.alignment`: where present
/// it must be a power of two (as llama.cpp requires). Anything else malformed is left for
/// candle's reader to report; this scan only stops at the end of the file, never allocates
/// more than a key, and never reads past `file_len`.
fn check_alignment(reader: &mut BufReader<File>, file_len: u64) -> Result<(), String> {
    fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Bytes of a fixed-size value type, None for strings and arrays (and unknown types).
    fn fixed_size(value_type: u32) -> Option<i64> {
        match value_type {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    struct Scan<'a> {
        reader: &'a mut BufReader<File>,
        wide: bool,
        file_len: u64,
    }
    impl Scan<'_> {
        fn length(&mut self) -> std::io::Result<u64> {
            if self.wide {
                u64_of(self.reader)
            } else {
                u32_of(self.reader).map(u64::from)
            }
        }
        fn skip(&mut self, bytes: u64) -> Result<(), String> {
            let at = self.reader.stream_position().map_err(|e| e.to_string())?;
            if bytes > self.file_len.saturating_sub(at) {
                return Err(format!(
                    "a value of {bytes} bytes runs past the end of the file"
                ));
            }
            self.reader
                .seek_relative(bytes as i64)
                .map_err(|e| e.to_string())
        }
        fn skip_value(&mut self, value_type: u32, depth: usize) -> Result<(), String> {
            if let Some(n) = fixed_size(value_type) {
                return self.skip(n as u64);
            }
            match value_type {
                8 => {
                    let len = self.length().map_err(|e| e.to_string())?;
                    self.skip(len)
                }
                9 if depth < 4 => {
                    let inner = u32_of(self.reader).map_err(|e| e.to_string())?;
                    let count = self.length().map_err(|e| e.to_string())?;
                    match fixed_size(inner) {
                        Some(n) => self.skip(count.saturating_mul(n as u64)),
                        None => (0..count).try_for_each(|_| self.skip_value(inner, depth + 1)),
                    }
                }
                // Unknown types and deep nesting: candle's reader says what is wrong.
                _ => Err(String::new()),
            }
        }
    }
    let mut head = [0u8; 8];
    if reader.read_exact(&mut head).is_err() || &head[..4] != b"GGUF" {
        return Ok(());
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let mut scan = Scan {
        reader,
        wide: version >= 2,
        file_len,
    };
    let Ok(_tensors) = scan.length() else {
        return Ok(());
    };
    let Ok(entries) = scan.length() else {
        return Ok(());
    };
    for _ in 0..entries {
        let Ok(key_len) = scan.length() else {
            return Ok(());
        };
        if key_len > 65_536 || key_len > file_len {
            return Ok(());
        }
        let mut key = vec![0u8; key_len as usize];
        let Ok(value_type) = scan
            .reader
            .read_exact(&mut key)
            .and_then(|()| u32_of(scan.reader))
        else {
            return Ok(());
        };
        if key != b"general.alignment" {
            if scan.skip_value(value_type, 0).is_err() {
                return Ok(());
            }
            continue;
        }
        // The integer types candle takes the alignment from (a negative one it ignores).
        let width = match value_type {
            0 | 1 => 1,
            2 | 3 => 2,
            4 | 5 => 4,
            _ => return Ok(()),
        };
        let mut b = [0u8; 4];
        if scan.reader.read_exact(&mut b[..width]).is_err() {
            return Ok(());
        }
        let raw = u32::from_le_bytes(b);
        let negative = value_type % 2 == 1 && raw >> (width * 8 - 1) & 1 == 1;
        if !negative && !raw.is_power_of_two() {
            return Err(format!(
                "general.alignment is {raw}; it must be a power of two"
            ));
        }
        return Ok(());
    }
    Ok(())
}

/// Checks that every tensor's data lies within the file (`file_len` bytes), so a truncated
/// file is refused when it is opened, not when a worker loads its slice.
fn check_tensor_extents(content: &Content, file_len: u64) -> Result<(), String> {
    let mut tensors: Vec<(&String, &candle_core::quantized::gguf_file::TensorInfo)> =
        content.tensor_infos.iter().collect();
    tensors.sort_by_key(|(name, info)| (info.offset, name.as_str()));
    for (name, info) in tensors {
        let block = info.ggml_dtype.block_size() as u128;
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
            .ok_or_else(|| format!("tensor {name} has too many elements"))?;
        if block == 0 || elements % block != 0 {
            return Err(format!(
                "tensor {name} has {elements} elements, not whole blocks of {block} ({:?})",
                info.ggml_dtype
            ));
        }
        let bytes = elements / block * info.ggml_dtype.type_size() as u128;
        let end = content.tensor_data_offset as u128 + info.offset as u128 + bytes;
        if end > file_len as u128 {
            return Err(format!(
                "tensor {name} ends at byte {end} but the file has {file_len} bytes (truncated?)"
            ));
        }
    }
    Ok(())
}

/// Names of the tensors of block `layer`, in the order the slice loads them.
pub fn block_tensor_names(layer: usize) -> [String; 9] {
    [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    .map(|t| format!("blk.{layer}.{t}.weight"))
}

fn spec_from_content(content: &Content) -> Result<ModelSpec, LoadError> {
    let md = &content.metadata;
    let arch = get_string(md, "general.architecture")?;
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(LoadError::UnsupportedArchitecture {
            found: arch,
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let layers = get_usize(md, &key("block_count"))?;
    let hidden_size = get_usize(md, &key("embedding_length"))?;
    let heads = get_usize(md, &key("attention.head_count"))?;
    let kv_heads = match md.get(&key("attention.head_count_kv")) {
        Some(_) => get_usize(md, &key("attention.head_count_kv"))?,
        None => heads,
    };
    let ffn_size = get_usize(md, &key("feed_forward_length"))?;
    let context_length = get_usize(md, &key("context_length"))?;
    let rope_base = match md.get(&key("rope.freq_base")) {
        Some(v) => v
            .to_f32()
            .map_err(|_| metadata_err(&key("rope.freq_base"), "a float"))?,
        None => 10_000.0,
    };
    let rms_eps = get_f32(md, &key("attention.layer_norm_rms_epsilon"))?;
    if let Some(Value::String(kind)) = md.get(&key("rope.scaling.type"))
        && kind != "none"
    {
        return Err(LoadError::InconsistentSpec(format!(
            "RoPE scaling `{kind}` is not supported yet"
        )));
    }
    check_dims(
        layers,
        hidden_size,
        heads,
        kv_heads,
        ffn_size,
        context_length,
    )?;
    let head_dim = hidden_size / heads;
    let (rope_base, rms_eps) = check_floats(rope_base, rms_eps)?;

    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| LoadError::MissingTensor("token_embd.weight".into()))?;
    let &[vocab_size, embd_width] = embd.shape.dims() else {
        return Err(LoadError::InconsistentSpec(
            "token_embd.weight is not a matrix".into(),
        ));
    };
    if embd_width != hidden_size || vocab_size == 0 || vocab_size > MAX_WIDTH * 4 {
        return Err(LoadError::InconsistentSpec(format!(
            "token_embd.weight is {vocab_size}x{embd_width} for hidden size {hidden_size}"
        )));
    }
    let tied_embeddings = !content.tensor_infos.contains_key("output.weight");
    let bytes = |name: &str| -> Result<u64, LoadError> {
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let elems = info.shape.elem_count() as u64;
        let block = info.ggml_dtype.block_size() as u64;
        Ok(elems / block * info.ggml_dtype.type_size() as u64)
    };
    let mut layer_bytes = Vec::with_capacity(layers);
    for layer in 0..layers {
        let mut total = 0;
        for name in block_tensor_names(layer) {
            total += bytes(&name)?;
        }
        layer_bytes.push(total);
    }
    let kv_width = kv_heads * head_dim;
    let layer_params = (2 * hidden_size * hidden_size
        + 2 * kv_width * hidden_size
        + 3 * hidden_size * ffn_size
        + 2 * hidden_size) as u64;
    let embedding_bytes = bytes("token_embd.weight")?;
    let head_name = if tied_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    let head_bytes = bytes(head_name)? + bytes("output_norm.weight")?;
    Ok(ModelSpec {
        architecture: arch,
        layers,
        hidden_size,
        heads,
        kv_heads,
        head_dim,
        ffn_size,
        rope_base,
        rms_eps,
        vocab_size,
        context_length,
        tied_embeddings,
        layer_bytes,
        layer_params,
        embedding_bytes,
        head_bytes,
        embedding_params: (vocab_size * hidden_size) as u64,
    })
}

fn check_dims(
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    context: usize,
) -> Result<(), LoadError> {
    let bad = |why: String| Err(LoadError::InconsistentSpec(why));
    if layers == 0 || layers > MAX_LAYERS {
        return bad(format!("{layers} layers (expected 1..={MAX_LAYERS})"));
    }
    if [hidden, heads, kv_heads, ffn]
        .iter()
        .any(|&v| v == 0 || v > MAX_WIDTH)
    {
        return bad(format!(
            "hidden {hidden}, heads {heads}, kv heads {kv_heads}, ffn {ffn} out of range"
        ));
    }
    if !hidden.is_multiple_of(heads) || !(hidden / heads).is_multiple_of(2) {
        return bad(format!(
            "hidden size {hidden} is not an even head width times {heads} heads"
        ));
    }
    if !heads.is_multiple_of(kv_heads) {
        return bad(format!(
            "{heads} heads is not a multiple of {kv_heads} KV heads"
        ));
    }
    if context == 0 || context > MAX_CONTEXT {
        return bad(format!(
            "context length {context} (expected 1..={MAX_CONTEXT})"
        ));
    }
    let head_dim = hidden / heads;
    if context.saturating_mul(head_dim) > MAX_ROPE_ENTRIES {
        return bad(format!(
            "context length {context} times head width {head_dim} is over {MAX_ROPE_ENTRIES} (the RoPE tables alone would take {} MiB)",
            context.saturating_mul(head_dim).saturating_mul(4) >> 20
        ));
    }
    Ok(())
}

fn check_floats(rope_base: f32, rms_eps: f32) -> Result<(f32, f32), LoadError> {
    if !(rope_base.is_finite() && rope_base > 1.0) {
        return Err(LoadError::InconsistentSpec(format!(
            "RoPE base {rope_base}"
        )));
    }
    if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
        return Err(LoadError::InconsistentSpec(format!(
            "RMS epsilon {rms_eps}"
        )));
    }
    Ok((rope_base, rms_eps))
}

fn metadata_err(key: &str, expected: &'static str) -> LoadError {
    LoadError::Metadata {
        key: key.to_string(),
        expected,
    }
}

/// Reads an unsigned integer of any width.
pub(crate) fn get_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize, LoadError> {
    let value = md.get(key).ok_or_else(|| metadata_err(key, "an integer"))?;
    let v: Option<u64> = match value {
        Value::U8(v) => Some(u64::from(*v)),
        Value::U16(v) => Some(u64::from(*v)),
        Value::U32(v) => Some(u64::from(*v)),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    };
    v.and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| metadata_err(key, "a non-negative integer"))
}

fn get_f32(md: &HashMap<String, Value>, key: &str) -> Result<f32, LoadError> {
    md.get(key)
        .and_then(|v| {
            v.to_f32()
                .ok()
                .or_else(|| v.to_f64().ok().map(|f| f as f32))
        })
        .ok_or_else(|| metadata_err(key, "a float"))
}

pub(crate) fn get_string(md: &HashMap<String, Value>, key: &str) -> Result<String, LoadError> {
    match md.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(metadata_err(key, "a string")),
    }
}
