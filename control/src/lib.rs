//! kxp's control plane: reads the sources of truth (the node file, Kubernetes manifests)
//! and compiles them, with Kubernetes' semantics, into the tables the dataplane reads.
//!
//! * [`node`]: the node file -> `NodeTable`.
//! * [`manifest`]: YAML/JSON manifests -> typed Services and EndpointSlices.
//! * [`compile`]: Services + EndpointSlices + node -> `ServiceTable`.
//! * [`error`]: the errors all of them report.

pub mod compile;
pub mod controller;
pub mod error;
pub mod healthcheck;
pub mod http;
pub mod manifest;
pub mod node;
pub mod ops;

pub use error::ConfigError;
pub mod replay;
pub mod runtime;
pub mod source;
