//! The sovra coordinator: the federation's source of truth (providers, workers, models,
//! placements, tenants, jobs) behind a gRPC control plane. It is built out by the control-plane
//! work; today the crate only reserves its place in the workspace.
