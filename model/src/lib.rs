//! Model code shared by every sovra component: reading a GGUF file into a [`ModelSpec`], loading
//! and running a contiguous layer range of a Llama model ([`LlamaSlice`]) with per-session KV
//! caches kept outside the weights ([`SessionCache`]), the tokenizer built from GGUF metadata,
//! deterministic sampling, and fetching the known models into the local cache.

pub mod fetch;
pub mod gguf;
pub mod llama;
pub mod sampling;
pub mod spec;
pub mod stream;
pub mod synthetic;
pub mod tokenizer;

pub use gguf::{GgufModel, LoadError};
pub use llama::{
    ForwardError, LlamaSlice, SegmentInput, SessionCache, SliceInput, SliceOutput, SliceProfile,
};
pub use sampling::{Sampler, SamplingError, SamplingParams};
pub use spec::{LayerRange, ModelSpec, WeightMode};
pub use stream::{FinishReason, StopConditions, TextStream};
pub use tokenizer::{ChatPrompt, ChatTurn, IncrementalDecoder, ModelTokenizer, TokenizerError};
