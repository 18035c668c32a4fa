//! Services + EndpointSlices + the node -> a [`ServiceTable`], with kube-proxy's semantics.
//!
//! What is compiled, and how (the references are to kube-proxy's `pkg/proxy`):
//!
//! * Services of type ClusterIP, NodePort and LoadBalancer are compiled; ExternalName and
//!   headless (`clusterIP: None`) services are skipped, as are services labelled
//!   `service.kubernetes.io/headless`, and services labelled
//!   `service.kubernetes.io/service-proxy-name` with a value other than
//!   [`CompileOptions::proxy_name`].
//! * One [`ServicePort`] per service port per IP family of the service's ClusterIPs
//!   (dual-stack: `spec.clusterIPs`). Its frontends are: the ClusterIP of that family on
//!   `port`; the `spec.externalIPs` of that family; the `status.loadBalancer.ingress[].ip`s
//!   of that family (except `ipMode: Proxy`); and, when the service is NodePort or
//!   LoadBalancer with a `nodePort`, every [`NodeTable::node_port_addresses`] of that family.
//! * Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name: <name>` in
//!   the service's namespace whose `addressType` is the family (FQDN slices are ignored).
//!   The port is that of the slice port with the service port's name and protocol (which
//!   is how a `targetPort` by name or by number resolves: the EndpointSlice controller did
//!   it). Endpoints are deduplicated by (address, port), preferring a local one, and sorted
//!   by (address, port). Conditions: `ready` nil = true, `serving` nil = true, `terminating`
//!   nil = false (as the API documents them and kube-proxy's EndpointSliceCache reads
//!   them); `local` = `nodeName` is this node.
//! * [`ServicePort::endpoints`] lists every endpoint, usable or not. The Maglev tables
//!   index into it: they are built over the whole list with weight 0 for the endpoints not
//!   in the set (see [`lb_members_with_hints`] for which are). [`Backend::weight`] is 1 for
//!   the members of the cluster-wide set and 0 for the others, so that the dataplane (e.g.
//!   ClientIP affinity) can tell them apart, and so that a change of that set (conditions,
//!   hints, the node's zone) is a change of the endpoint list. Maglev ids are
//!   [`backend_id`]s.
//! * Topology (kube-proxy's `CategorizeEndpoints` / `topologyModeFromHints`): the
//!   cluster-wide set is narrowed to the endpoints hinted for this node (`hints.forNodes`,
//!   trafficDistribution PreferSameNode) when every ready endpoint has a node hint and one
//!   names this node; else to the endpoints hinted for the node's zone
//!   ([`NodeTable::zone`]; `hints.forZones`, written for PreferClose / PreferSameZone and
//!   topology-mode Auto) when every ready endpoint has a zone hint and one names the
//!   zone; else it is every ready endpoint. The node-local set ignores topology. The
//!   Service's `trafficDistribution` itself is not read: as in kube-proxy, the hints the
//!   EndpointSlice controller wrote are what counts.
//! * Health checks: a LoadBalancer service with `externalTrafficPolicy: Local` and a
//!   `healthCheckNodePort` gets a [`HealthCheckNodePort`] in [`Compiled::health_checks`]
//!   with its count of node-local ready endpoints, for
//!   [`HealthCheckServers`](crate::healthcheck::HealthCheckServers).
//! * Policies: `externalTrafficPolicy: Local` for externally accessible services (NodePort,
//!   LoadBalancer, or ClusterIP with externalIPs, as Kubernetes defines it);
//!   `internalTrafficPolicy: Local`; `sessionAffinity: ClientIP` with its timeout (default
//!   10800 s); `loadBalancerSourceRanges` of the port's family (kube-proxy filters them by
//!   family too).
//! * A bad value is reported as a [`ConfigError`] naming `namespace/name` and the field, and
//!   only what it concerns is left out (a port, a family, an address): other ports and
//!   other services still compile. A frontend another service already holds is a clash;
//!   the first holder, in namespace/name order, keeps it.
//! * Deterministic: services are compiled in namespace/name order, slices are read in
//!   namespace/name order.
//! * Reuse: given the previous table, a service port whose endpoint list is identical to
//!   that of the previous service port of the same name and protocol keeps its Maglev
//!   tables (the same `Arc`s), and the whole `Arc<ServicePort>` when its policy did not
//!   change either (the weights make a change of membership by topology a change of the
//!   list). `previous` must have been compiled with the same
//!   [`CompileOptions::maglev`]; pass `None` after changing it.

use core::net::{IpAddr, SocketAddr};
use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kxp_dataplane::flow::{mix, L4Proto};
use kxp_dataplane::maglev::{MaglevBackend, MaglevConfig, MaglevTable, MAX_BACKENDS};
use kxp_dataplane::tables::{
    Backend, Frontend, FrontendKey, FrontendKind, NodeTable, ServicePolicy, ServicePort,
    ServicePortId, ServicePortName, ServiceTable,
};

use crate::error::ConfigError;
use crate::manifest::{ManifestSet, DEFAULT_NAMESPACE};

mod incremental;
pub use incremental::CompileState;

/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking a headless Service (and its slices).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The largest timeout the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// How to compile.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    pub maglev: MaglevConfig,
    /// The `service.kubernetes.io/service-proxy-name` value this proxy answers to. Services
    /// without the label are always compiled; with it, only when it equals this.
    pub proxy_name: Option<String>,
}

/// A compiled table and what was wrong with the input.
#[derive(Debug, Default)]
pub struct Compiled {
    pub table: ServiceTable,
    /// Objects (or parts of them) left out because they are invalid or clash.
    pub errors: Vec<ConfigError>,
    /// Services skipped on purpose (headless, ExternalName, another proxy's), one line each.
    pub notices: Vec<String>,
    /// The health check node ports to serve, in namespace/name order.
    pub health_checks: Vec<HealthCheckNodePort>,
}

/// A service's `healthCheckNodePort` and what it reports: kube-proxy serves one for every
/// LoadBalancer service with `externalTrafficPolicy: Local`, telling load balancers whether
/// this node has endpoints for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HealthCheckNodePort {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// Distinct addresses of the ready endpoints on this node, over all the service's
    /// ports (kube-proxy's `LocalReadyEndpoints`: terminating endpoints do not count). For
    /// a dual-stack service, the larger of the two families' counts.
    pub local_endpoints: usize,
}

/// Compiles a manifest set (its errors and notices are not copied: they are the loader's).
pub fn compile(
    set: &ManifestSet,
    node: &NodeTable,
    opts: &CompileOptions,
    previous: Option<&ServiceTable>,
) -> Compiled {
    compile_objects(&set.services, &set.slices, node, opts, previous)
}

/// Compiles services and slices. Objects without a namespace are in `default`.
///
/// The services are compiled in parallel (they are independent until their frontends
/// meet), then assembled in namespace/name order, so the result does not depend on the
/// number of threads.
pub fn compile_objects<S, E>(
    services: &[S],
    slices: &[E],
    node: &NodeTable,
    opts: &CompileOptions,
    previous: Option<&ServiceTable>,
) -> Compiled
where
    S: Borrow<Service> + Sync,
    E: Borrow<EndpointSlice> + Sync,
{
    let mut out = Compiled::default();
    let checked = check_slices(slices.iter().map(Borrow::borrow), node);
    let mut by_service: HashMap<(&str, &str), Vec<&SliceInfo>> = HashMap::new();
    for c in &checked {
        out.errors.extend(c.errors.iter().cloned());
        out.notices.extend(c.notices.iter().cloned());
        if let (Some((ns, svc)), Some(info)) = (&c.service, &c.info) {
            by_service
                .entry((ns.as_str(), svc.as_str()))
                .or_default()
                .push(info);
        }
    }
    let groups: Vec<(&S, usize)> = service_groups(services.iter());
    let previous = PreviousPorts::index(previous);
    let outputs = compile_services_parallel(&groups, |svc: &S| {
        let svc = svc.borrow();
        let slices = by_service
            .get(&object_key(&svc.metadata))
            .map_or(&[][..], Vec::as_slice);
        compile_service(svc, slices, node, opts, &previous)
    });
    for ((_, duplicates), output) in groups.iter().zip(outputs) {
        let object = output.object.clone();
        assemble(&mut out, output);
        push_duplicates(&mut out.errors, &object, *duplicates);
    }
    out
}

/// Services in namespace/name order, each with the number of further definitions of the
/// same namespace/name (the first one, in input order, is used).
fn service_groups<'s, T: Borrow<Service>>(
    services: impl Iterator<Item = &'s T>,
) -> Vec<(&'s T, usize)> {
    let key = |s: &'s T| object_key(&s.borrow().metadata);
    let mut sorted: Vec<&T> = services.collect();
    sorted.sort_by(|a, b| key(a).cmp(&key(b)));
    let mut groups: Vec<(&T, usize)> = Vec::with_capacity(sorted.len());
    for svc in sorted {
        match groups.last_mut() {
            Some((first, dups)) if key(first) == key(svc) => *dups += 1,
            _ => groups.push((svc, 0)),
        }
    }
    groups
}

fn push_duplicates(errors: &mut Vec<ConfigError>, object: &str, duplicates: usize) {
    for _ in 0..duplicates {
        errors.push(ConfigError::invalid(
            object,
            "",
            "defined more than once; the first definition is used",
        ));
    }
}

/// The most threads a compile may use; 0: one per available CPU (at most
/// [`MAX_COMPILE_THREADS`]). Process-wide.
static COMPILE_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Caps the threads a full compile uses (0, the default: one per available CPU, at most
/// 8; 1: the calling thread only), for a node whose cores are pinned to packet workers,
/// and for benchmarks. The output does not depend on it.
pub fn set_compile_threads(threads: usize) {
    COMPILE_THREADS.store(threads, AtomicOrdering::Relaxed);
}

/// Below this many services, one thread compiles them all (spawning costs more).
const PARALLEL_MIN_SERVICES: usize = 256;
/// At most this many threads compile services.
const MAX_COMPILE_THREADS: usize = 8;

/// Runs `compile` over every group, on up to [`MAX_COMPILE_THREADS`] threads, and
/// returns the outputs in the groups' order.
fn compile_services_parallel<'s, T, F>(groups: &[(&'s T, usize)], compile: F) -> Vec<ServiceOutput>
where
    T: Sync,
    F: Fn(&'s T) -> ServiceOutput + Sync,
{
    parallel_map(groups, |(svc, _)| compile(svc))
}

/// `items.iter().map(f).collect()`, on up to [`MAX_COMPILE_THREADS`] threads (one
/// contiguous chunk each) when there are at least [`PARALLEL_MIN_SERVICES`] items.
fn parallel_map<T, R, F>(items: &[T], f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    let threads = match COMPILE_THREADS.load(AtomicOrdering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(MAX_COMPILE_THREADS);
    if threads < 2 || items.len() < PARALLEL_MIN_SERVICES {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .skip(1)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // This thread takes the first chunk.
        let mut out: Vec<R> = items[..chunk.min(items.len())].iter().map(f).collect();
        out.reserve(items.len() - out.len());
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Adds one service's output to a table being compiled from scratch: its ports, then
/// its frontends in order (a frontend already held is a clash: the holder keeps it),
/// its errors and its health check.
fn assemble(out: &mut Compiled, o: ServiceOutput) {
    let ids: Vec<ServicePortId> = o
        .ports
        .iter()
        .map(|p| out.table.add_service_port(Arc::clone(p)))
        .collect();
    for item in o.items {
        match item {
            Item::Error(e) => out.errors.push(e),
            Item::Frontend(i) => {
                let c = &o.claims[i as usize];
                let frontend = Frontend {
                    kind: c.kind,
                    service_port: ids[c.port as usize],
                };
                if let Err(existing) = out.table.add_frontend(c.key, frontend) {
                    let holder = &out.table.service_port(existing.service_port).name;
                    out.errors
                        .push(clash_error(&o.object, c, existing.kind, holder));
                }
            }
            Item::HealthCheck => {
                let Some(hc) = &o.health_check else { continue };
                match out.health_checks.iter().find(|h| h.port == hc.port) {
                    Some(holder) => out.errors.push(health_check_clash(
                        &o.object,
                        hc.port,
                        &holder.namespace,
                        &holder.name,
                    )),
                    None => out.health_checks.push(hc.clone()),
                }
            }
        }
    }
    out.notices.extend(o.notices);
}

fn clash_error(
    object: &str,
    c: &Claim,
    holder_kind: FrontendKind,
    holder: &ServicePortName,
) -> ConfigError {
    let message = format!(
        "{} {}/{} is already taken by {} {holder}",
        c.kind.as_str(),
        SocketAddr::new(c.key.addr, c.key.port),
        c.key.proto.as_str(),
        holder_kind.as_str(),
    );
    ConfigError::clash(object, c.field.to_string(), message)
}

fn health_check_clash(object: &str, port: u16, namespace: &str, name: &str) -> ConfigError {
    let message = format!("health check node port {port} is already taken by {namespace}/{name}");
    ConfigError::clash(object, "spec.healthCheckNodePort", message)
}

/// Which endpoints a service port's Maglev tables include, as kube-proxy's
/// `CategorizeEndpoints` picks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbMembers {
    /// Cluster-wide: the ready endpoints (narrowed by topology, see [`TopologyMode`]); if
    /// none is ready, the serving and terminating ones (so that connections drain instead
    /// of being dropped).
    pub cluster: Vec<bool>,
    /// Node-local (traffic policy Local): the ready local endpoints; if none is, the
    /// serving and terminating local ones. Topology does not apply.
    pub local: Vec<bool>,
}

/// An endpoint's topology hints, from its EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointHints {
    /// `hints.forZones[].name`.
    pub zones: Vec<String>,
    /// `hints.forNodes[].name`.
    pub nodes: Vec<String>,
}

impl EndpointHints {
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty() && self.nodes.is_empty()
    }
}

/// How topology narrows the cluster-wide endpoints (kube-proxy's `topologyModeFromHints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// Every ready endpoint.
    None,
    /// The ready endpoints hinted for the node's zone.
    SameZone,
    /// The ready endpoints hinted for this node.
    SameNode,
}

/// The topology mode of an endpoint list: same-node when every ready endpoint has a node
/// hint and one is hinted for `node`; else same-zone when every ready endpoint has a zone
/// hint and one is hinted for `zone`; else none. Missing `hints` entries count as no
/// hints.
pub fn topology_mode(
    endpoints: &[Backend],
    hints: &[EndpointHints],
    node: &str,
    zone: Option<&str>,
) -> TopologyMode {
    let no_hints = EndpointHints::default();
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for (i, b) in endpoints.iter().enumerate() {
        if !b.ready {
            continue;
        }
        any_ready = true;
        let h = hints.get(i).unwrap_or(&no_hints);
        if h.nodes.is_empty() {
            all_node_hints = false;
        } else if h.nodes.iter().any(|n| n == node) {
            for_node = true;
        }
        if h.zones.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| h.zones.iter().any(|x| x == z)) {
            for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && for_node {
        TopologyMode::SameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::SameZone
    } else {
        TopologyMode::None
    }
}

/// Computes [`LbMembers`] for an endpoint list (same indexes), without topology.
pub fn lb_members(endpoints: &[Backend]) -> LbMembers {
    lb_members_with_hints(endpoints, &[], "", None)
}

/// Computes [`LbMembers`] for an endpoint list and its hints (same indexes) on node `node`
/// in zone `zone`.
pub fn lb_members_with_hints(
    endpoints: &[Backend],
    hints: &[EndpointHints],
    node: &str,
    zone: Option<&str>,
) -> LbMembers {
    let mode = topology_mode(endpoints, hints, node, zone);
    let no_hints = EndpointHints::default();
    let in_topology = |i: usize| {
        let h = hints.get(i).unwrap_or(&no_hints);
        match mode {
            TopologyMode::None => true,
            TopologyMode::SameNode => h.nodes.iter().any(|n| n == node),
            TopologyMode::SameZone => zone.is_some_and(|z| h.zones.iter().any(|x| x == z)),
        }
    };
    let serving_terminating = |b: &Backend| b.serving && b.terminating;

    let mut cluster: Vec<bool> = endpoints
        .iter()
        .enumerate()
        .map(|(i, b)| b.ready && in_topology(i))
        .collect();
    // A topology mode is only chosen when it leaves a ready endpoint, so an empty set here
    // means that none is ready anywhere.
    if !cluster.iter().any(|m| *m) {
        cluster = endpoints.iter().map(serving_terminating).collect();
    }
    let any_local_ready = endpoints.iter().any(|b| b.local && b.ready);
    let local = endpoints
        .iter()
        .map(|b| {
            b.local
                && if any_local_ready {
                    b.ready
                } else {
                    serving_terminating(b)
                }
        })
        .collect();
    LbMembers { cluster, local }
}

/// A backend's Maglev identity: a hash of its address and port, stable across runs, so
/// that it keeps its slots when other backends change.
pub fn backend_id(addr: IpAddr, port: u16) -> u64 {
    let (hi, lo) = match addr {
        IpAddr::V4(a) => (0x0000_0004_0000_0000, u64::from(u32::from(a))),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            ((v >> 64) as u64, v as u64)
        }
    };
    let h = mix(0x6b78_705f_6265_6b64 ^ hi);
    let h = mix(h ^ lo);
    mix(h ^ u64::from(port))
}

/// Builds a Maglev table over all of `endpoints` (so its indexes are `endpoints`
/// indexes), giving slots (weight 1 each) only to the members.
fn build_table(endpoints: &[Backend], members: &[bool], cfg: &MaglevConfig) -> MaglevTable {
    if !members.iter().any(|m| *m) {
        return MaglevTable::empty();
    }
    let backends: Vec<MaglevBackend> = endpoints
        .iter()
        .zip(members)
        .map(|(b, &member)| MaglevBackend {
            id: backend_id(b.addr, b.port),
            weight: u32::from(member),
        })
        .collect();
    MaglevTable::build(&backends, cfg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: &IpAddr) -> Self {
        if addr.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }

    fn of_net(net: &IpNet) -> Self {
        Self::of(&net.addr())
    }

    fn api_name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// An object's namespace and name (the namespace defaulted).
pub type ObjectKey = (String, String);

/// The namespace/name key compile uses for an object (`default` when the namespace is
/// not set).
pub fn object_key_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    let (ns, name) = object_key(meta);
    (ns.to_string(), name.to_string())
}

fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or(""),
    )
}

fn parse_proto(p: Option<&str>) -> Result<L4Proto, String> {
    match p {
        None | Some("TCP") => Ok(L4Proto::Tcp),
        Some("UDP") => Ok(L4Proto::Udp),
        Some("SCTP") => Ok(L4Proto::Sctp),
        Some(other) => Err(format!("{other:?} is not one of TCP, UDP, SCTP")),
    }
}

fn parse_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// One EndpointSlice, checked.
#[derive(Debug, Clone)]
struct SliceInfo {
    family: Family,
    ports: Vec<SlicePort>,
    endpoints: Vec<EndpointInfo>,
}

#[derive(Debug, Clone)]
struct SlicePort {
    name: String,
    proto: L4Proto,
    port: u16,
}

#[derive(Debug, Clone)]
struct EndpointInfo {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    hints: EndpointHints,
}

/// An EndpointSlice object as checked against the node: what it contributes and what was
/// wrong with it.
#[derive(Debug, Clone)]
struct CheckedSlice {
    /// (namespace, service name) it belongs to; `None` when it is skipped.
    service: Option<ObjectKey>,
    /// `None` when skipped (no label, FQDN, a bad address type).
    info: Option<SliceInfo>,
    errors: Vec<ConfigError>,
    notices: Vec<String>,
}

/// Checks slices in namespace/name order (input order among equal names).
fn check_slices<'s>(
    slices: impl Iterator<Item = &'s EndpointSlice>,
    node: &NodeTable,
) -> Vec<CheckedSlice> {
    let mut sorted: Vec<&EndpointSlice> = slices.collect();
    sorted.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    parallel_map(&sorted, |s| check_slice(s, node))
}

/// Checks one slice. The error context (`EndpointSlice ns/name`, field paths) is only
/// formatted when there is an error.
fn check_slice(slice: &EndpointSlice, node: &NodeTable) -> CheckedSlice {
    let (ns, name) = object_key(&slice.metadata);
    let object = || format!("EndpointSlice {ns}/{name}");
    let mut out = CheckedSlice {
        service: None,
        info: None,
        errors: Vec::new(),
        notices: Vec::new(),
    };
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME));
    let Some(service) = service else {
        out.notices.push(format!(
            "{}: skipped: no {LABEL_SERVICE_NAME} label",
            object()
        ));
        return out;
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => return out,
        other => {
            out.errors.push(ConfigError::invalid(
                object(),
                "addressType",
                format!("{other:?} is not one of IPv4, IPv6, FQDN"),
            ));
            return out;
        }
    };
    let mut info = SliceInfo {
        family,
        ports: Vec::with_capacity(slice.ports.as_ref().map_or(0, Vec::len)),
        endpoints: Vec::with_capacity(slice.endpoints.len()),
    };
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let proto = match parse_proto(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(m) => {
                out.errors.push(ConfigError::invalid(
                    object(),
                    format!("ports[{i}].protocol"),
                    m,
                ));
                continue;
            }
        };
        let port = match p.port {
            Some(n) => match parse_port(n) {
                Some(port) => port,
                None => {
                    out.errors.push(ConfigError::invalid(
                        object(),
                        format!("ports[{i}].port"),
                        format!("{n} is out of range"),
                    ));
                    continue;
                }
            },
            None => {
                out.errors.push(ConfigError::invalid(
                    object(),
                    format!("ports[{i}].port"),
                    "missing",
                ));
                continue;
            }
        };
        info.ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            proto,
            port,
        });
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // Like kube-proxy, only the first address counts (the API allows one).
        let Some(first) = ep.addresses.first() else {
            out.errors.push(ConfigError::invalid(
                object(),
                format!("endpoints[{i}].addresses"),
                "empty",
            ));
            continue;
        };
        let field = || format!("endpoints[{i}].addresses[0]");
        let Ok(addr) = first.trim().parse::<IpAddr>() else {
            out.errors.push(ConfigError::invalid(
                object(),
                field(),
                format!("{first:?} is not an IP address"),
            ));
            continue;
        };
        if Family::of(&addr) != family {
            out.errors.push(ConfigError::invalid(
                object(),
                field(),
                format!("{addr} is not an {} address", family.api_name()),
            ));
            continue;
        }
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        // nil = true, as the API documents it and kube-proxy reads it (not "= ready").
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let local = ep.node_name.as_deref() == Some(node.name.as_str());
        let hints = ep
            .hints
            .as_ref()
            .map(|h| EndpointHints {
                zones: h
                    .for_zones
                    .iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                nodes: h
                    .for_nodes
                    .iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            })
            .unwrap_or_default();
        info.endpoints.push(EndpointInfo {
            addr,
            ready,
            serving,
            terminating,
            local,
            hints,
        });
    }
    out.service = Some((ns.to_string(), service.clone()));
    out.info = Some(info);
    out
}

/// Previous service ports by (name, protocol), for reuse.
#[derive(Default)]
struct PreviousPorts<'a> {
    ports: HashMap<(&'a ServicePortName, L4Proto), Vec<&'a Arc<ServicePort>>>,
}

impl<'a> PreviousPorts<'a> {
    fn index(previous: Option<&'a ServiceTable>) -> Self {
        Self::of(
            previous
                .into_iter()
                .flat_map(|t| t.service_ports().map(|(_, sp)| sp)),
        )
    }

    fn of(ports: impl Iterator<Item = &'a Arc<ServicePort>>) -> Self {
        let mut map: HashMap<_, Vec<_>> = HashMap::new();
        for sp in ports {
            map.entry((&sp.name, sp.proto)).or_default().push(sp);
        }
        Self { ports: map }
    }

    /// A previous service port of this name and protocol with exactly these endpoints.
    fn find(
        &self,
        name: &ServicePortName,
        proto: L4Proto,
        endpoints: &[Backend],
    ) -> Option<&'a Arc<ServicePort>> {
        self.ports
            .get(&(name, proto))?
            .iter()
            .find(|sp| sp.endpoints == endpoints)
            .copied()
    }
}

/// The field a frontend comes from, rendered only for an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldRef {
    ClusterIp,
    ClusterIps(u32),
    ExternalIps(u32),
    LbIngress(u32),
    NodePort(u32),
}

impl core::fmt::Display for FieldRef {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::ClusterIp => f.write_str("spec.clusterIP"),
            Self::ClusterIps(i) => write!(f, "spec.clusterIPs[{i}]"),
            Self::ExternalIps(i) => write!(f, "spec.externalIPs[{i}]"),
            Self::LbIngress(i) => write!(f, "status.loadBalancer.ingress[{i}].ip"),
            Self::NodePort(i) => write!(f, "spec.ports[{i}].nodePort"),
        }
    }
}

/// A frontend a service port wants; whether it gets it depends on the other services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    key: FrontendKey,
    kind: FrontendKind,
    /// Index in [`ServiceOutput::ports`].
    port: u32,
    field: FieldRef,
}

/// What one Service compiles to before it meets the other services.
#[derive(Debug, Clone)]
enum Item {
    Error(ConfigError),
    /// [`ServiceOutput::claims`] index: a clash error goes here if another service holds it.
    Frontend(u32),
    /// The [`ServiceOutput::health_check`]: a clash error goes here if another has the port.
    HealthCheck,
}

/// One Service compiled on its own: its service ports and the frontends they want, in
/// compile order, with its errors in between (so that the assembled error list reads as
/// if the services had been compiled one after the other).
#[derive(Debug, Clone, Default)]
struct ServiceOutput {
    /// `namespace/name`.
    object: String,
    items: Vec<Item>,
    notices: Vec<String>,
    ports: Vec<Arc<ServicePort>>,
    claims: Vec<Claim>,
    health_check: Option<HealthCheckNodePort>,
}

/// Compiles one Service with its slices (in slice namespace/name order).
fn compile_service(
    svc: &Service,
    slices: &[&SliceInfo],
    node: &NodeTable,
    opts: &CompileOptions,
    previous: &PreviousPorts<'_>,
) -> ServiceOutput {
    let (namespace, name) = object_key(&svc.metadata);
    let mut c = ServiceCompiler {
        node,
        opts,
        previous,
        out: ServiceOutput {
            object: format!("{namespace}/{name}"),
            ..ServiceOutput::default()
        },
    };
    c.service(svc, slices);
    c.out
}

struct ServiceCompiler<'a, 'p> {
    node: &'a NodeTable,
    opts: &'a CompileOptions,
    previous: &'a PreviousPorts<'p>,
    out: ServiceOutput,
}

/// Everything about a service that does not depend on the port.
struct ServiceInfo {
    namespace: String,
    name: String,
    /// (family, ClusterIP, field naming it), primary family first.
    cluster_ips: Vec<(Family, IpAddr, FieldRef)>,
    external_ips: Vec<(IpAddr, FieldRef)>,
    lb_ips: Vec<(IpAddr, FieldRef)>,
    node_ports_allowed: bool,
    policy: ServicePolicy,
}

impl ServiceCompiler<'_, '_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let e = ConfigError::invalid(&self.out.object, field, message);
        self.out.items.push(Item::Error(e));
    }

    fn notice(&mut self, message: impl core::fmt::Display) {
        let n = format!("{}: {message}", self.out.object);
        self.out.notices.push(n);
    }

    fn service(&mut self, svc: &Service, slices: &[&SliceInfo]) {
        let Some(info) = self.service_info(svc) else {
            return;
        };
        let spec = svc.spec.as_ref().expect("service_info checked the spec");
        // Distinct local ready endpoint addresses per family, for the health check.
        let mut local_ready: [BTreeSet<IpAddr>; 2] = Default::default();
        let mut compiled_ports = 0usize;
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = || format!("spec.ports[{i}]");
            let proto = match parse_proto(p.protocol.as_deref()) {
                Ok(proto) => proto,
                Err(m) => {
                    self.error(format!("{}.protocol", field()), m);
                    continue;
                }
            };
            let Some(port) = parse_port(p.port) else {
                self.error(
                    format!("{}.port", field()),
                    format!("{} is out of range", p.port),
                );
                continue;
            };
            let node_port = match p.node_port {
                None | Some(0) => None,
                Some(n) => match parse_port(n) {
                    Some(np) if info.node_ports_allowed => Some(np),
                    Some(_) => {
                        self.error(
                            format!("{}.nodePort", field()),
                            "may only be used when type is NodePort or LoadBalancer",
                        );
                        None
                    }
                    None => {
                        self.error(
                            format!("{}.nodePort", field()),
                            format!("{n} is out of range"),
                        );
                        None
                    }
                },
            };
            let name = ServicePortName {
                namespace: info.namespace.clone(),
                name: info.name.clone(),
                port_name: p.name.clone().unwrap_or_default(),
            };
            for &(family, cluster_ip, cluster_ip_field) in &info.cluster_ips {
                let (endpoints, hints) = self.endpoints(slices, family, &name, proto);
                local_ready[family as usize].extend(
                    endpoints
                        .iter()
                        .filter(|b| b.local && b.ready)
                        .map(|b| b.addr),
                );
                let mut policy = info.policy.clone();
                policy.source_ranges.retain(|r| Family::of_net(r) == family);
                let sp = self.service_port(name.clone(), proto, endpoints, &hints, policy);
                let port_index = self.out.ports.len() as u32;
                self.out.ports.push(sp);
                compiled_ports += 1;

                let mut claim = |kind, addr, port, field| {
                    let index = self.out.claims.len() as u32;
                    self.out.claims.push(Claim {
                        key: FrontendKey { addr, proto, port },
                        kind,
                        port: port_index,
                        field,
                    });
                    self.out.items.push(Item::Frontend(index));
                };
                claim(FrontendKind::ClusterIp, cluster_ip, port, cluster_ip_field);
                for &(ip, f) in &info.external_ips {
                    if Family::of(&ip) == family {
                        claim(FrontendKind::ExternalIp, ip, port, f);
                    }
                }
                for &(ip, f) in &info.lb_ips {
                    if Family::of(&ip) == family {
                        claim(FrontendKind::LoadBalancer, ip, port, f);
                    }
                }
                if let Some(np) = node_port {
                    for ip in self.node.node_port_addresses() {
                        if Family::of(ip) == family {
                            claim(
                                FrontendKind::NodePort,
                                *ip,
                                np,
                                FieldRef::NodePort(i as u32),
                            );
                        }
                    }
                }
            }
        }
        if compiled_ports > 0 {
            let local_endpoints = local_ready.iter().map(BTreeSet::len).max().unwrap_or(0);
            self.health_check(svc, &info, local_endpoints);
        }
    }

    /// Records the service's health check node port, when kube-proxy would serve one: type
    /// LoadBalancer, `externalTrafficPolicy: Local` (its `NeedsHealthCheck`), and a port
    /// set. Two services on one port: the first, in namespace/name order, keeps it (that
    /// is decided when the services are assembled).
    fn health_check(&mut self, svc: &Service, info: &ServiceInfo, local_endpoints: usize) {
        let spec = svc.spec.as_ref().expect("service_info checked the spec");
        if spec.type_.as_deref() != Some("LoadBalancer") || !info.policy.external_local {
            return;
        }
        let field = "spec.healthCheckNodePort";
        let port = match spec.health_check_node_port {
            None | Some(0) => {
                // The API server allocates one; hand-written manifests may leave it out.
                // kube-proxy logs it and goes on: a notice, not an error.
                self.notice(format_args!(
                    "no {field} (externalTrafficPolicy Local); no health check served"
                ));
                return;
            }
            Some(n) => match parse_port(n) {
                Some(p) => p,
                None => {
                    self.error(field, format!("{n} is out of range"));
                    return;
                }
            },
        };
        self.out.health_check = Some(HealthCheckNodePort {
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            port,
            local_endpoints,
        });
        self.out.items.push(Item::HealthCheck);
    }

    /// Checks the port-independent parts of a service; `None` when it is skipped or
    /// unusable (reported).
    fn service_info(&mut self, svc: &Service) -> Option<ServiceInfo> {
        let (namespace, name) = object_key(&svc.metadata);
        let labels = svc.metadata.labels.as_ref();
        if let Some(proxy) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)) {
            if self.opts.proxy_name.as_deref() != Some(proxy.as_str()) {
                self.notice(format_args!(
                    "skipped: {LABEL_SERVICE_PROXY_NAME} is {proxy:?}"
                ));
                return None;
            }
        }
        if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            self.notice(format_args!("skipped: labelled {LABEL_HEADLESS}"));
            return None;
        }
        let Some(spec) = svc.spec.as_ref() else {
            self.error("spec", "missing");
            return None;
        };
        let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
        let node_ports_allowed = match ty {
            "ClusterIP" => false,
            "NodePort" | "LoadBalancer" => true,
            "ExternalName" => {
                self.notice("skipped: type ExternalName");
                return None;
            }
            other => {
                self.error(
                    "spec.type",
                    format!(
                        "{other:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
                    ),
                );
                return None;
            }
        };

        // ClusterIPs: spec.clusterIPs, or spec.clusterIP for objects written without it.
        let listed: Vec<(&str, FieldRef)> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (ip.as_str(), FieldRef::ClusterIps(i as u32)))
                .collect(),
            (_, Some(ip)) if !ip.is_empty() => vec![(ip.as_str(), FieldRef::ClusterIp)],
            _ => Vec::new(),
        };
        match listed.first() {
            Some(("None", _)) => {
                self.notice("skipped: headless (clusterIP None)");
                return None;
            }
            None => {
                self.error(
                    "spec.clusterIP",
                    "not set (kxp does not allocate ClusterIPs)",
                );
                return None;
            }
            Some(_) => {}
        }
        let mut cluster_ips: Vec<(Family, IpAddr, FieldRef)> = Vec::with_capacity(listed.len());
        for (i, (ip, field)) in listed.into_iter().enumerate() {
            let Ok(addr) = ip.trim().parse::<IpAddr>() else {
                self.error(field.to_string(), format!("{ip:?} is not an IP address"));
                continue;
            };
            let family = Family::of(&addr);
            if cluster_ips.iter().any(|(f, _, _)| *f == family) {
                self.error(
                    field.to_string(),
                    format!("a second {} ClusterIP ({addr})", family.api_name()),
                );
                continue;
            }
            if let Some(declared) = spec.ip_families.as_ref().and_then(|f| f.get(i)) {
                if declared != family.api_name() {
                    self.error(
                        format!("spec.ipFamilies[{i}]"),
                        format!("{declared} does not match the ClusterIP {addr}"),
                    );
                }
            }
            cluster_ips.push((family, addr, field));
        }
        if cluster_ips.is_empty() {
            return None;
        }

        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            let field = FieldRef::ExternalIps(i as u32);
            match ip.trim().parse::<IpAddr>() {
                Ok(addr) => external_ips.push((addr, field)),
                Err(_) => self.error(field.to_string(), format!("{ip:?} is not an IP address")),
            }
        }
        let mut lb_ips = Vec::new();
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // Proxy-mode load balancers deliver to the node, not to the VIP.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue;
            };
            let field = FieldRef::LbIngress(i as u32);
            match ip.trim().parse::<IpAddr>() {
                Ok(addr) => lb_ips.push((addr, field)),
                Err(_) => self.error(field.to_string(), format!("{ip:?} is not an IP address")),
            }
        }

        let externally_accessible =
            node_ports_allowed || spec.external_ips.as_ref().is_some_and(|e| !e.is_empty());
        let external_local = match spec.external_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => externally_accessible,
            Some(other) => {
                self.error(
                    "spec.externalTrafficPolicy",
                    format!("{other:?} is not one of Cluster, Local"),
                );
                false
            }
        };
        let internal_local = match spec.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                self.error(
                    "spec.internalTrafficPolicy",
                    format!("{other:?} is not one of Cluster, Local"),
                );
                false
            }
        };
        let affinity_timeout_secs = match spec.session_affinity.as_deref() {
            None | Some("None") => 0,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT_SECS,
                    Some(t) if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT_SECS => t as u32,
                    Some(t) => {
                        self.error(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!(
                                "{t} is out of range (1..={MAX_AFFINITY_TIMEOUT_SECS}); using {DEFAULT_AFFINITY_TIMEOUT_SECS}"
                            ),
                        );
                        DEFAULT_AFFINITY_TIMEOUT_SECS
                    }
                }
            }
            Some(other) => {
                self.error(
                    "spec.sessionAffinity",
                    format!("{other:?} is not one of None, ClientIP"),
                );
                0
            }
        };
        let mut source_ranges = Vec::new();
        for (i, r) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            match r.trim().parse::<IpNet>() {
                Ok(net) => source_ranges.push(net.trunc()),
                Err(_) => self.error(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{r:?} is not a CIDR"),
                ),
            }
        }

        Some(ServiceInfo {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ips,
            external_ips,
            lb_ips,
            node_ports_allowed,
            policy: ServicePolicy {
                external_local,
                internal_local,
                affinity_timeout_secs,
                source_ranges,
            },
        })
    }

    /// The endpoints of one service port in one family, deduplicated and sorted, with their
    /// topology hints (same indexes). Weights are left at 1: [`Self::service_port`] sets
    /// them.
    fn endpoints(
        &mut self,
        slices: &[&SliceInfo],
        family: Family,
        name: &ServicePortName,
        proto: L4Proto,
    ) -> (Vec<Backend>, Vec<EndpointHints>) {
        // Every (backend, its hints) of the port, sorted and deduplicated below.
        let mut found: Vec<(Backend, &EndpointHints)> = Vec::new();
        for slice in slices.iter().filter(|s| s.family == family) {
            let Some(sp) = slice
                .ports
                .iter()
                .find(|p| p.name == name.port_name && p.proto == proto)
            else {
                continue;
            };
            found.reserve(slice.endpoints.len());
            for ep in &slice.endpoints {
                found.push((
                    Backend {
                        addr: ep.addr,
                        port: sp.port,
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        local: ep.local,
                        weight: 1,
                    },
                    &ep.hints,
                ));
            }
        }
        // As kube-proxy: of several with the same (address, port), the first one wins,
        // unless a later one is local (the last local one then). A stable sort keeps the
        // slices' order among equal keys.
        found.sort_by_key(|(b, _)| (b.addr, b.port));
        let mut endpoints: Vec<Backend> = Vec::with_capacity(found.len());
        let mut hints: Vec<EndpointHints> = Vec::with_capacity(found.len());
        for (b, h) in found {
            match endpoints.last_mut() {
                Some(last) if (last.addr, last.port) == (b.addr, b.port) => {
                    if b.local {
                        *last = b;
                        *hints.last_mut().expect("same length") = h.clone();
                    }
                }
                _ => {
                    endpoints.push(b);
                    hints.push(h.clone());
                }
            }
        }
        if endpoints.len() > MAX_BACKENDS {
            self.error(
                "",
                format!(
                    "{name}: {} endpoints, only the first {MAX_BACKENDS} are used",
                    endpoints.len()
                ),
            );
            endpoints.truncate(MAX_BACKENDS);
            hints.truncate(MAX_BACKENDS);
        }
        (endpoints, hints)
    }

    /// A service port, reusing the previous one (or its Maglev tables) when its endpoints
    /// (weights included) did not change.
    fn service_port(
        &mut self,
        name: ServicePortName,
        proto: L4Proto,
        mut endpoints: Vec<Backend>,
        hints: &[EndpointHints],
        policy: ServicePolicy,
    ) -> Arc<ServicePort> {
        let members = lb_members_with_hints(
            &endpoints,
            hints,
            &self.node.name,
            self.node.zone.as_deref(),
        );
        for (b, member) in endpoints.iter_mut().zip(&members.cluster) {
            b.weight = u16::from(*member);
        }
        // The weights carry the cluster-wide membership and the flags the local one, so an
        // equal endpoint list means equal tables, whatever the hints.
        if let Some(old) = self.previous.find(&name, proto, &endpoints) {
            if old.policy == policy {
                return Arc::clone(old);
            }
            return Arc::new(ServicePort {
                name,
                proto,
                endpoints,
                cluster_lb: Arc::clone(&old.cluster_lb),
                local_lb: Arc::clone(&old.local_lb),
                policy,
            });
        }
        let cfg = &self.opts.maglev;
        let cluster_lb = Arc::new(build_table(&endpoints, &members.cluster, cfg));
        let local_lb = if members.local == members.cluster {
            Arc::clone(&cluster_lb)
        } else {
            Arc::new(build_table(&endpoints, &members.local, cfg))
        };
        Arc::new(ServicePort {
            name,
            proto,
            endpoints,
            cluster_lb,
            local_lb,
            policy,
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifests;
    use crate::node::parse_node;

    const NODE: &str = r#"
name: node-a
addresses: [192.168.50.2, "fd00:50::2"]
clusterCIDRs: [10.244.0.0/16, "fd00:244::/56"]
serviceCIDRs: [10.96.0.0/16, "fd00:96::/112"]
"#;

    fn node() -> NodeTable {
        parse_node(NODE, "node.yaml").unwrap()
    }

    fn run(yaml: &str) -> Compiled {
        run_with(yaml, &CompileOptions::default(), None)
    }

    fn run_with(yaml: &str, opts: &CompileOptions, previous: Option<&ServiceTable>) -> Compiled {
        let set = parse_manifests(yaml, "test.yaml");
        assert!(set.errors.is_empty(), "manifest errors: {:?}", set.errors);
        compile(&set, &node(), opts, previous)
    }

    fn fe(t: &ServiceTable, addr: &str, proto: L4Proto, port: u16) -> Option<Frontend> {
        t.frontend(&FrontendKey {
            addr: addr.parse().unwrap(),
            proto,
            port,
        })
    }

    /// The service port a frontend leads to.
    fn sp_at<'t>(t: &'t ServiceTable, addr: &str, port: u16) -> &'t ServicePort {
        let f =
            fe(t, addr, L4Proto::Tcp, port).unwrap_or_else(|| panic!("no frontend {addr}:{port}"));
        t.service_port(f.service_port)
    }

    fn addrs(sp: &ServicePort) -> Vec<String> {
        sp.endpoints
            .iter()
            .map(|b| SocketAddr::new(b.addr, b.port).to_string())
            .collect()
    }

    fn members_of(sp: &ServicePort, m: &[bool]) -> Vec<String> {
        sp.endpoints
            .iter()
            .zip(m)
            .filter(|(_, m)| **m)
            .map(|(b, _)| SocketAddr::new(b.addr, b.port).to_string())
            .collect()
    }

    /// Whatever the Maglev table picks is a member (vacuous while Maglev is unbuilt), and
    /// a table with members is not empty once Maglev is built.
    fn check_table(sp: &ServicePort, table: &MaglevTable, members: &[bool]) {
        let mut seen = vec![false; members.len()];
        for i in 0..4096u64 {
            if let Some(idx) = table.lookup(mix(i)) {
                assert!(
                    members[idx as usize],
                    "{}: slot -> non-member {idx}",
                    sp.name
                );
                seen[idx as usize] = true;
            }
        }
        if !members.iter().any(|m| *m) {
            assert!(table.is_empty());
        } else if !table.is_empty() {
            assert_eq!(seen, members, "{}: every member gets slots", sp.name);
        }
    }

    fn check_tables(t: &ServiceTable) {
        for (_, sp) in t.service_ports() {
            let m = lb_members(&sp.endpoints);
            check_table(sp, &sp.cluster_lb, &m.cluster);
            check_table(sp, &sp.local_lb, &m.local);
        }
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, targetPort: web}
    - {name: metrics, port: 9100, targetPort: 9100}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 8080}
  - {name: metrics, port: 9100}
  - {name: dns, port: 5353, protocol: UDP}
  - {name: dns, port: 9999, protocol: TCP}
endpoints:
  - {addresses: [10.244.1.2], nodeName: node-a}
  - {addresses: [10.244.2.3], nodeName: node-b, conditions: {ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 8080}
endpoints:
  - {addresses: [10.244.2.3], nodeName: node-b}
  - {addresses: [10.244.3.4], nodeName: node-c, conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-1
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.9]}]
"#;

    #[test]
    fn target_port_by_name_and_number() {
        let c = run(WEB);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let t = &c.table;
        let http = sp_at(t, "10.96.0.10", 80);
        assert_eq!(http.name.to_string(), "default/web:http");
        assert_eq!(http.proto, L4Proto::Tcp);
        // Deduplicated across slices, sorted, other services' slices not joined.
        assert_eq!(
            addrs(http),
            ["10.244.1.2:8080", "10.244.2.3:8080", "10.244.3.4:8080"]
        );
        assert_eq!(
            http.endpoints.iter().map(|b| b.local).collect::<Vec<_>>(),
            [true, false, false]
        );
        let m = lb_members(&http.endpoints);
        assert_eq!(
            members_of(http, &m.cluster),
            ["10.244.1.2:8080", "10.244.2.3:8080"]
        );
        assert_eq!(members_of(http, &m.local), ["10.244.1.2:8080"]);
        assert_eq!(
            addrs(sp_at(t, "10.96.0.10", 9100)),
            ["10.244.1.2:9100", "10.244.2.3:9100"]
        );
        // The slice port of the same name but another protocol is not used.
        let dns = t.service_port(fe(t, "10.96.0.10", L4Proto::Udp, 53).unwrap().service_port);
        assert_eq!(addrs(dns), ["10.244.1.2:5353", "10.244.2.3:5353"]);
        assert!(fe(t, "10.96.0.10", L4Proto::Tcp, 53).is_none());
        assert_eq!(t.frontend_count(), 3);
        assert!(t.is_cluster_ip(&"10.96.0.10".parse().unwrap()));
        check_tables(t);
    }

    #[test]
    fn dual_stack_gives_a_port_per_family() {
        let c = run(r#"
apiVersion: v1
kind: Service
metadata: {name: ds}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00:244::5"]}, {addresses: ["fd00:244::6"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-fqdn, labels: {kubernetes.io/service-name: ds}}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [web.example.com]}]
"#);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let t = &c.table;
        assert_eq!(t.service_ports().count(), 2);
        let v4 = sp_at(t, "10.96.0.20", 80);
        let v6 = sp_at(t, "fd00:96::20", 80);
        assert_eq!(addrs(v4), ["10.244.1.5:8080"]);
        assert_eq!(addrs(v6), ["[fd00:244::5]:8080", "[fd00:244::6]:8080"]);
        assert_eq!(v4.name, v6.name);
        check_tables(t);
    }

    #[test]
    fn node_port_frontends_on_node_addresses_of_the_family() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{port: 80, nodePort: 30080}]
"#;
        let c = run(yaml);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let t = &c.table;
        let f = fe(t, "192.168.50.2", L4Proto::Tcp, 30080).unwrap();
        assert_eq!(f.kind, FrontendKind::NodePort);
        assert_eq!(
            f.service_port,
            fe(t, "10.96.0.30", L4Proto::Tcp, 80).unwrap().service_port
        );
        // Single-stack v4 service: not on the node's v6 address.
        assert!(fe(t, "fd00:50::2", L4Proto::Tcp, 30080).is_none());
        assert_eq!(t.frontend_count(), 2);
        assert!(!t.is_cluster_ip(&"192.168.50.2".parse().unwrap()));

        // nodePortAddresses restricts them.
        let mut n = node();
        n.addresses.push("192.168.60.2".parse().unwrap());
        n.node_port_addresses = vec!["192.168.60.2".parse().unwrap()];
        let c = compile(
            &parse_manifests(yaml, "t"),
            &n,
            &CompileOptions::default(),
            None,
        );
        assert!(fe(&c.table, "192.168.50.2", L4Proto::Tcp, 30080).is_none());
        assert!(fe(&c.table, "192.168.60.2", L4Proto::Tcp, 30080).is_some());

        // nodePort on a ClusterIP service is an error; the port still compiles.
        let c = run(&yaml.replace("type: NodePort", "type: ClusterIP"));
        assert_eq!(
            c.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["default/np: spec.ports[0].nodePort: may only be used when type is NodePort or LoadBalancer"]
        );
        assert!(fe(&c.table, "10.96.0.30", L4Proto::Tcp, 80).is_some());
        assert!(fe(&c.table, "192.168.50.2", L4Proto::Tcp, 30080).is_none());
    }

    #[test]
    fn load_balancer_ingress_and_external_ips() {
        let c = run(r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: edge}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  externalIPs: [198.51.100.7, "2001:db8::7"]
  loadBalancerSourceRanges: [203.0.113.0/24, " 10.0.0.0/8", "2001:db8::/32"]
  ports: [{name: https, port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress:
      - ip: 203.0.113.10
      - {ip: 203.0.113.11, ipMode: Proxy}
      - hostname: lb.example.com
      - {ip: 203.0.113.12, ipMode: VIP}
"#);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let t = &c.table;
        let kind = |a: &str, p| fe(t, a, L4Proto::Tcp, p).map(|f| f.kind);
        assert_eq!(kind("10.96.0.40", 443), Some(FrontendKind::ClusterIp));
        assert_eq!(kind("198.51.100.7", 443), Some(FrontendKind::ExternalIp));
        assert_eq!(kind("203.0.113.10", 443), Some(FrontendKind::LoadBalancer));
        assert_eq!(kind("203.0.113.12", 443), Some(FrontendKind::LoadBalancer));
        assert_eq!(kind("203.0.113.11", 443), None);
        assert_eq!(kind("2001:db8::7", 443), None);
        assert_eq!(kind("192.168.50.2", 30443), Some(FrontendKind::NodePort));
        assert_eq!(t.frontend_count(), 5);
        let sp = sp_at(t, "203.0.113.10", 443);
        assert_eq!(
            sp.policy.source_ranges,
            vec![
                "203.0.113.0/24".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        assert_eq!(sp.policy.affinity_timeout_secs, 0);
        assert!(sp.endpoints.is_empty());
        assert!(sp.cluster_lb.is_empty());
    }

    #[test]
    fn headless_external_name_and_proxy_name_are_skipped() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: labelled, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.51, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.52, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ours, labels: {service.kubernetes.io/service-proxy-name: kxp}}
spec: {clusterIP: 10.96.0.53, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec: {clusterIP: 10.96.0.54, ports: [{port: 80}]}
"#;
        let c = run(yaml);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(c.table.frontend_count(), 1);
        assert!(fe(&c.table, "10.96.0.54", L4Proto::Tcp, 80).is_some());
        assert_eq!(c.notices.len(), 5, "{:?}", c.notices);
        assert!(c
            .notices
            .iter()
            .any(|n| n.starts_with("default/headless: ")));
        assert!(c.notices.iter().any(|n| n.starts_with("default/ext: ")));

        let opts = CompileOptions {
            proxy_name: Some("kxp".into()),
            ..Default::default()
        };
        let c = run_with(yaml, &opts, None);
        assert_eq!(c.table.frontend_count(), 2);
        assert!(fe(&c.table, "10.96.0.53", L4Proto::Tcp, 80).is_some());
        assert!(fe(&c.table, "10.96.0.52", L4Proto::Tcp, 80).is_none());
    }

    const TERMINATING: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: t}
spec: {clusterIP: 10.96.0.60, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: t-1, labels: {kubernetes.io/service-name: t}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.1.2], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}
  - {addresses: [10.244.1.3], nodeName: node-b, conditions: {ready: false, terminating: true}}
  - {addresses: [10.244.1.4], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.1.5], nodeName: node-b, conditions: {ready: false}}
"#;

    #[test]
    fn falls_back_to_serving_terminating_endpoints() {
        let c = run(TERMINATING);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let sp = sp_at(&c.table, "10.96.0.60", 80);
        // All of them stay known.
        assert_eq!(sp.endpoints.len(), 5);
        assert!(
            sp.endpoints[2].serving,
            "serving nil = true, as kube-proxy reads it"
        );
        let m = lb_members(&sp.endpoints);
        assert_eq!(
            members_of(sp, &m.cluster),
            ["10.244.1.1:8080", "10.244.1.3:8080", "10.244.1.4:8080"]
        );
        assert_eq!(
            sp.endpoints.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [1, 0, 1, 1, 0]
        );
        assert_eq!(members_of(sp, &m.local), ["10.244.1.1:8080"]);
        check_tables(&c.table);

        // One ready endpoint anywhere: only it, cluster-wide. Locally, the terminating
        // local one still serves (kube-proxy computes the local fallback on its own).
        let c = run(&format!(
            "{TERMINATING}  - {{addresses: [10.244.1.6], nodeName: node-c}}\n"
        ));
        let sp = sp_at(&c.table, "10.96.0.60", 80);
        let m = lb_members(&sp.endpoints);
        assert_eq!(members_of(sp, &m.cluster), ["10.244.1.6:8080"]);
        assert_eq!(members_of(sp, &m.local), ["10.244.1.1:8080"]);
        check_tables(&c.table);
    }

    #[test]
    fn zone_and_node_hints_narrow_the_cluster_set() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: z}
spec: {clusterIP: 10.96.0.61, trafficDistribution: PreferClose, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: z-1, labels: {kubernetes.io/service-name: z}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.1], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.2.1], nodeName: node-b, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
  - {addresses: [10.244.3.1], nodeName: node-c, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
"#;
        let with_zone = |zone: Option<&str>| {
            let mut n = node();
            n.zone = zone.map(String::from);
            compile(
                &parse_manifests(yaml, "t"),
                &n,
                &CompileOptions::default(),
                None,
            )
        };
        let a = with_zone(Some("zone-a"));
        assert!(a.errors.is_empty(), "{:?}", a.errors);
        let sp = sp_at(&a.table, "10.96.0.61", 80);
        assert_eq!(
            sp.endpoints.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [1, 0, 1]
        );
        let b = with_zone(Some("zone-b"));
        let sp_b = sp_at(&b.table, "10.96.0.61", 80);
        assert_eq!(
            sp_b.endpoints.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        // No zone, or a zone nobody is hinted for: every ready endpoint.
        for n in [with_zone(None), with_zone(Some("zone-z"))] {
            let sp = sp_at(&n.table, "10.96.0.61", 80);
            assert!(sp.endpoints.iter().all(|b| b.weight == 1));
        }
        // A zone change is a membership change: no reuse of the previous tables.
        let mut nb = node();
        nb.zone = Some("zone-b".into());
        let again = compile(
            &parse_manifests(yaml, "t"),
            &nb,
            &CompileOptions::default(),
            Some(&a.table),
        );
        let sp2 = sp_at(&again.table, "10.96.0.61", 80);
        assert!(!Arc::ptr_eq(&sp.cluster_lb, &sp2.cluster_lb));
        assert_eq!(*sp2.cluster_lb, *sp_b.cluster_lb);

        // Node hints win over zone hints when every ready endpoint has one.
        let hints = [
            EndpointHints {
                zones: vec!["zone-a".into()],
                nodes: vec!["node-a".into()],
            },
            EndpointHints {
                zones: vec!["zone-a".into()],
                nodes: vec!["node-b".into()],
            },
        ];
        let eps: Vec<Backend> = ["10.244.1.1", "10.244.2.1"]
            .iter()
            .map(|a| Backend {
                addr: a.parse().unwrap(),
                port: 80,
                ready: true,
                serving: true,
                terminating: false,
                local: false,
                weight: 1,
            })
            .collect();
        assert_eq!(
            topology_mode(&eps, &hints, "node-a", Some("zone-a")),
            TopologyMode::SameNode
        );
        assert_eq!(
            lb_members_with_hints(&eps, &hints, "node-a", Some("zone-a")).cluster,
            [true, false]
        );
        assert_eq!(
            topology_mode(&eps, &hints, "node-c", Some("zone-a")),
            TopologyMode::SameZone
        );
        assert_eq!(
            topology_mode(&eps, &hints[..1], "node-a", Some("zone-a")),
            TopologyMode::None,
            "an endpoint without hints disables topology"
        );
    }

    #[test]
    fn health_check_node_ports() {
        let c = run(r#"
apiVersion: v1
kind: Service
metadata: {name: a-lb, namespace: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.62
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30062}, {name: https, port: 443, nodePort: 30063}]
---
apiVersion: v1
kind: Service
metadata: {name: b-lb, namespace: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.63
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{port: 80, nodePort: 30064}]
---
apiVersion: v1
kind: Service
metadata: {name: c-np, namespace: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.64
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ports: [{port: 80, nodePort: 30065}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-lb-1, namespace: web, labels: {kubernetes.io/service-name: a-lb}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints:
  - {addresses: [10.244.1.1], nodeName: node-a}
  - {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.1.3], nodeName: node-a}
  - {addresses: [10.244.2.1], nodeName: node-b}
"#);
        assert_eq!(
            c.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["web/b-lb: spec.healthCheckNodePort: health check node port 32000 is already taken by web/a-lb"]
        );
        // Two ports, two local ready addresses: 2 (by address, not address:port).
        assert_eq!(
            c.health_checks,
            [HealthCheckNodePort {
                namespace: "web".into(),
                name: "a-lb".into(),
                port: 32000,
                local_endpoints: 2,
            }]
        );
    }

    #[test]
    fn traffic_policies_and_affinity() {
        let c = run(r#"
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.70
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  ports: [{port: 80, nodePort: 30070}]
---
apiVersion: v1
kind: Service
metadata: {name: internal}
spec:
  clusterIP: 10.96.0.71
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  clusterIP: 10.96.0.72
  externalIPs: [198.51.100.72]
  externalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.1], nodeName: node-a}
  - {addresses: [10.244.2.1], nodeName: node-b}
  - {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: false}}
"#);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let t = &c.table;
        let local = sp_at(t, "10.96.0.70", 80);
        assert!(local.policy.external_local);
        assert!(!local.policy.internal_local);
        assert_eq!(
            local.policy.affinity_timeout_secs,
            DEFAULT_AFFINITY_TIMEOUT_SECS
        );
        let m = lb_members(&local.endpoints);
        assert_eq!(
            members_of(local, &m.cluster),
            ["10.244.1.1:8080", "10.244.2.1:8080"]
        );
        assert_eq!(members_of(local, &m.local), ["10.244.1.1:8080"]);
        assert!(!Arc::ptr_eq(&local.cluster_lb, &local.local_lb));
        check_tables(t);

        // eTP does not apply to a ClusterIP service without externalIPs (Kubernetes).
        let internal = sp_at(t, "10.96.0.71", 80);
        assert!(!internal.policy.external_local);
        assert!(internal.policy.internal_local);
        assert_eq!(internal.policy.affinity_timeout_secs, 60);
        // ... but does to one with externalIPs.
        assert!(sp_at(t, "10.96.0.72", 80).policy.external_local);
    }

    #[test]
    fn clash_names_the_object_and_the_rest_compiles() {
        let c = run(r#"
apiVersion: v1
kind: Service
metadata: {name: b-second}
spec: {clusterIP: 10.96.0.80, ports: [{name: x, port: 80}, {name: y, port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: a-first}
spec: {clusterIP: 10.96.0.80, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: 10.96.0.81, ports: [{port: 80}]}
"#);
        assert_eq!(
            c.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["default/b-second: spec.clusterIP: ClusterIP 10.96.0.80:80/tcp is already taken by ClusterIP default/a-first:http"]
        );
        assert!(matches!(c.errors[0], ConfigError::Clash { .. }));
        let t = &c.table;
        assert_eq!(sp_at(t, "10.96.0.80", 80).name.name, "a-first");
        assert_eq!(sp_at(t, "10.96.0.80", 81).name.name, "b-second");
        assert_eq!(sp_at(t, "10.96.0.81", 80).name.name, "c");
    }

    #[test]
    fn bad_values_are_reported_and_the_rest_compiles() {
        let c = run(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.90
  externalIPs: [not-an-ip, 198.51.100.90]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 100000}}
  ports:
    - {name: ok, port: 80}
    - {name: big, port: 70000}
    - {name: np, port: 82, nodePort: 70000}
    - {name: proto, port: 83, protocol: ICMP}
---
apiVersion: v1
kind: Service
metadata: {name: noip}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badip}
spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: ok, port: 8080}]
endpoints:
  - {addresses: ["fd00::1"]}
  - {addresses: [10.244.0.1]}
"#);
        let errors: Vec<String> = c.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                r#"EndpointSlice default/web-1: endpoints[0].addresses[0]: fd00::1 is not an IPv4 address"#,
                r#"default/badip: spec.clusterIP: "10.96.0.999" is not an IP address"#,
                "default/noip: spec.clusterIP: not set (kxp does not allocate ClusterIPs)",
                r#"default/web: spec.externalIPs[0]: "not-an-ip" is not an IP address"#,
                "default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 100000 is out of range (1..=86400); using 10800",
                "default/web: spec.ports[1].port: 70000 is out of range",
                "default/web: spec.ports[2].nodePort: 70000 is out of range",
                r#"default/web: spec.ports[3].protocol: "ICMP" is not one of TCP, UDP, SCTP"#,
            ]
        );
        let t = &c.table;
        assert_eq!(addrs(sp_at(t, "10.96.0.90", 80)), ["10.244.0.1:8080"]);
        assert!(fe(t, "198.51.100.90", L4Proto::Tcp, 80).is_some());
        assert!(fe(t, "10.96.0.90", L4Proto::Tcp, 82).is_some());
        assert!(fe(t, "198.51.100.90", L4Proto::Tcp, 82).is_some());
        assert_eq!(t.frontend_count(), 4);
    }

    fn snapshot(t: &ServiceTable) -> Vec<String> {
        let mut v: Vec<String> = t
            .frontends()
            .map(|(k, f)| {
                let sp = t.service_port(f.service_port);
                format!(
                    "{} {}/{} -> #{} {} {:?}",
                    f.kind.as_str(),
                    SocketAddr::new(k.addr, k.port),
                    k.proto.as_str(),
                    f.service_port.0,
                    sp.name,
                    sp.endpoints
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn deterministic_whatever_the_input_order() {
        let set = parse_manifests(WEB, "a");
        let mut rev = set.clone();
        rev.services.reverse();
        rev.slices.reverse();
        let opts = CompileOptions::default();
        let a = compile(&set, &node(), &opts, None);
        let b = compile(&rev, &node(), &opts, None);
        assert_eq!(snapshot(&a.table), snapshot(&b.table));
        for ((_, x), (_, y)) in a.table.service_ports().zip(b.table.service_ports()) {
            assert_eq!(x.endpoints, y.endpoints);
            assert_eq!(*x.cluster_lb, *y.cluster_lb);
            assert_eq!(*x.local_lb, *y.local_lb);
        }
    }

    #[test]
    fn unchanged_service_ports_and_tables_are_reused() {
        let base = format!(
            "{WEB}---\n{}",
            r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {clusterIP: 10.96.0.100, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.5.1]}, {addresses: [10.244.5.2]}]
"#
        );
        let opts = CompileOptions::default();
        let first = run_with(&base, &opts, None);

        // Same input: every service port is the same Arc.
        let again = run_with(&base, &opts, Some(&first.table));
        assert_eq!(
            first.table.service_ports().count(),
            again.table.service_ports().count()
        );
        for ((_, a), (_, b)) in first.table.service_ports().zip(again.table.service_ports()) {
            assert!(Arc::ptr_eq(a, b), "{} not reused", a.name);
        }

        // One more api endpoint: api is rebuilt, web untouched.
        let grown = base.replace(
            "{addresses: [10.244.5.2]}]",
            "{addresses: [10.244.5.2]}, {addresses: [10.244.5.3]}]",
        );
        let next = run_with(&grown, &opts, Some(&again.table));
        let old_api = again.table.service_port_arc(
            fe(&again.table, "10.96.0.100", L4Proto::Tcp, 80)
                .unwrap()
                .service_port,
        );
        let new_api = next.table.service_port_arc(
            fe(&next.table, "10.96.0.100", L4Proto::Tcp, 80)
                .unwrap()
                .service_port,
        );
        assert!(!Arc::ptr_eq(old_api, new_api));
        assert!(!Arc::ptr_eq(&old_api.cluster_lb, &new_api.cluster_lb));
        assert_eq!(new_api.endpoints.len(), 3);
        let web = |t: &ServiceTable| {
            Arc::clone(
                t.service_port_arc(fe(t, "10.96.0.10", L4Proto::Tcp, 80).unwrap().service_port),
            )
        };
        assert!(Arc::ptr_eq(&web(&again.table), &web(&next.table)));

        // Only the policy changes: a new ServicePort, the same Maglev tables.
        let sticky = grown.replace(
            "spec: {clusterIP: 10.96.0.100,",
            "spec: {sessionAffinity: ClientIP, clusterIP: 10.96.0.100,",
        );
        let last = run_with(&sticky, &opts, Some(&next.table));
        let api = last.table.service_port_arc(
            fe(&last.table, "10.96.0.100", L4Proto::Tcp, 80)
                .unwrap()
                .service_port,
        );
        assert!(!Arc::ptr_eq(api, new_api));
        assert_eq!(
            api.policy.affinity_timeout_secs,
            DEFAULT_AFFINITY_TIMEOUT_SECS
        );
        assert!(Arc::ptr_eq(&api.cluster_lb, &new_api.cluster_lb));
        assert!(Arc::ptr_eq(&api.local_lb, &new_api.local_lb));
        assert!(Arc::ptr_eq(&web(&next.table), &web(&last.table)));

        // A condition change is a change.
        let unready = sticky.replace(
            "{addresses: [10.244.5.3]}",
            "{addresses: [10.244.5.3], conditions: {ready: false}}",
        );
        let after = run_with(&unready, &opts, Some(&last.table));
        let api2 = after.table.service_port_arc(
            fe(&after.table, "10.96.0.100", L4Proto::Tcp, 80)
                .unwrap()
                .service_port,
        );
        assert!(!Arc::ptr_eq(&api.cluster_lb, &api2.cluster_lb));
        check_tables(&after.table);
    }

    #[test]
    fn backend_ids_are_stable_and_distinct() {
        let a: IpAddr = "10.244.1.2".parse().unwrap();
        let b: IpAddr = "10.244.1.3".parse().unwrap();
        assert_eq!(backend_id(a, 80), backend_id(a, 80));
        assert_ne!(backend_id(a, 80), backend_id(a, 81));
        assert_ne!(backend_id(a, 80), backend_id(b, 80));
        assert_ne!(
            backend_id(a, 80),
            backend_id("::ffff:10.244.1.2".parse().unwrap(), 80)
        );
    }
}
