//! The sovra coordinator: the federation's source of truth (providers, workers, models,
//! placements, tenants), its CA, and the gRPC control plane over TLS.

pub mod datadir;
pub mod error;
pub mod federation;
pub mod fleet;
pub mod job_service;
pub mod jobs;
pub mod links;
pub mod openai;
pub mod placement;
pub mod planner;
pub mod records;
pub mod recovery;
pub mod server;
pub mod service;
pub mod store;
pub mod validate;
