//! Sources of truth. Each source runs on its own thread (or task) and sends the
//! controller its whole current view whenever it changes (level-triggered, as kube-proxy's
//! change trackers end up doing): the controller never has to replay a history of deltas,
//! and a source that reconnects simply sends its fresh view.
//!
//! The objects are shared (`Arc`): a view costs one pointer copy per object, and an
//! object that did not change since the previous view is the same `Arc`, so that the
//! controller finds what changed by comparing pointers (the kube source hands on its
//! reflector stores' `Arc`s; the manifests source keeps each unchanged object's `Arc`).

pub mod kube;
pub mod manifest_watch;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::error::ConfigError;

/// A source's complete current view.
#[derive(Debug, Clone, Default)]
pub struct SourceView {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Problems reading the source (a file that stopped parsing, a watch error); the
    /// objects above are still the last good ones.
    pub errors: Vec<ConfigError>,
    pub notices: Vec<String>,
}

/// What this node looks like according to the source (the Kubernetes Node object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// InternalIP/ExternalIP addresses, in the Node's order.
    pub addresses: Vec<std::net::IpAddr>,
    /// `topology.kubernetes.io/zone` label, if set.
    pub zone: Option<String>,
}

/// A message from a source to the controller.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// The source's whole view, replacing the previous one.
    View(SourceView),
    /// This node's Node object changed.
    Node(NodeInfo),
    /// The source lost its connection; the controller keeps the last good tables.
    Disconnected(String),
}
