//! The versioned protobuf contract of sovra's control plane (`proto/sovra/v1`). It is built out
//! with the control plane; today the crate only reserves its place in the workspace.
