//! The sovra coordinator: the federation's source of truth (providers, workers, models,
//! placements, tenants), its CA, and the gRPC control plane over TLS.

pub mod error;
pub mod federation;
pub mod job_service;
pub mod jobs;
pub mod placement;
pub mod planner;
pub mod records;
pub mod server;
pub mod service;
pub mod store;
