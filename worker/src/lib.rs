//! The worker side of sovra. Today it owns the in-process pipeline ([`LocalPipeline`]): a chain
//! of model slices run in one process, which is both `sovra generate --local` and the baseline
//! every distributed run is compared against, and the generation loop ([`generate`]) that drives
//! a pipeline from prompt to finished text.

pub mod generate;
pub mod pipeline;

pub use generate::{GenerateError, GenerateRequest, GenerationSummary, TokenEvent, generate};
pub use pipeline::{LocalPipeline, PipelineError, PipelineSession};
