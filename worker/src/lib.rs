//! The worker side of sovra: the agent that joins the federation and keeps its assigned model
//! slices loaded ([`agent`]), the device and speed it reports ([`speed`]), the in-process
//! pipeline ([`LocalPipeline`]) that is both `sovra generate --local` and the baseline every
//! distributed run is compared against, and the generation loop ([`generate`]).

pub mod agent;
pub mod cpus;
pub mod dataplane;
pub mod frame;
pub mod generate;
pub mod pipeline;
pub mod probe;
pub mod quic;
pub mod speed;
pub mod stage;

pub use generate::{GenerateError, GenerateRequest, GenerationSummary, TokenEvent, generate};
pub use pipeline::{LocalPipeline, PipelineError, PipelineSession};
