//! sovra's wire contract and transport identity: the gRPC types and services generated from
//! `proto/sovra/v1` ([`pb`]), the federation CA and worker certificates ([`ca`]), the token
//! formats ([`token`]), and TLS channels to the coordinator ([`channel`]).

pub mod ca;
pub mod channel;
pub mod token;

/// Generated protobuf types and gRPC clients and servers of `sovra.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sovra.v1");
}
