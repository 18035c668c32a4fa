//! Compiled tables: what the control plane builds off the fast path and the workers read.
//!
//! Everything here is immutable once published. The control plane compiles Kubernetes
//! objects into a [`ServiceTable`] and the node file into a [`NodeTable`]; workers only look
//! things up. Service ports are `Arc`ed so that a new generation can reuse the ones whose
//! inputs did not change (and with them their Maglev tables) without copying.

use core::net::IpAddr;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use ipnet::IpNet;

use crate::flow::L4Proto;
use crate::maglev::MaglevTable;

mod frontend_v4;
pub(crate) use frontend_v4::hash_v4 as frontend_hash_v4;
use frontend_v4::FrontendIndexV4;

/// Index of a [`ServicePort`] in its [`ServiceTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortId(pub u32);

/// What a frontend address is, as Kubernetes names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl FrontendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancer => "LoadBalancer",
            Self::NodePort => "NodePort",
        }
    }

    /// Whether externalTrafficPolicy governs traffic to this frontend when it comes from
    /// outside the cluster (everything but ClusterIP).
    pub fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIp)
    }
}

/// Where a frame addressed to a service lands: (address, protocol, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub proto: L4Proto,
    pub port: u16,
}

/// A frontend resolves to one service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub service_port: ServicePortId,
}

/// One endpoint of a service port, as the EndpointSlice says it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint runs on this node (its `nodeName` is ours).
    pub local: bool,
    /// Maglev weight; 0 takes the endpoint out of the rotation.
    pub weight: u16,
}

/// `namespace/name:port-name`, for reports, metrics and errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
}

impl core::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// The per-service-port flags that change how a frame is handled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePolicy {
    /// externalTrafficPolicy: Local (external traffic only to local endpoints, client
    /// source preserved, dropped when there are none).
    pub external_local: bool,
    /// internalTrafficPolicy: Local.
    pub internal_local: bool,
    /// sessionAffinity: ClientIP timeout; 0 means no affinity.
    pub affinity_timeout_secs: u32,
    /// loadBalancerSourceRanges; empty means every source is allowed.
    pub source_ranges: Vec<IpNet>,
}

/// A service port with its endpoints and the Maglev tables that pick among them.
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub proto: L4Proto,
    /// Every endpoint the slices list for this port; the Maglev tables index into it.
    pub endpoints: Vec<Backend>,
    /// Endpoints usable for cluster-wide traffic (ready, or the serving-terminating
    /// fallback when none is ready).
    pub cluster_lb: Arc<MaglevTable>,
    /// The subset of those on this node (traffic policies Local).
    pub local_lb: Arc<MaglevTable>,
    pub policy: ServicePolicy,
}

/// Every frontend of every service, compiled for lookup.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    frontends: HashMap<FrontendKey, Frontend>,
    /// The IPv4 entries of `frontends` again, prefetchable (see `tables/frontend_v4.rs`).
    frontends_v4: FrontendIndexV4,
    cluster_ips: HashSet<IpAddr>,
    /// ClusterIPs, ExternalIPs and LoadBalancer IPs (not node addresses).
    vips: HashSet<IpAddr>,
    service_ports: Vec<Arc<ServicePort>>,
    /// Monotonic generation number assigned by the publisher.
    pub generation: u64,
}

impl ServiceTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service port and returns its id.
    pub fn add_service_port(&mut self, port: Arc<ServicePort>) -> ServicePortId {
        let id = ServicePortId(self.service_ports.len() as u32);
        self.service_ports.push(port);
        id
    }

    /// Adds a frontend. Returns the frontend already there if the key is taken (the caller
    /// reports the clash; the first one stays).
    pub fn add_frontend(&mut self, key: FrontendKey, frontend: Frontend) -> Result<(), Frontend> {
        if let Some(existing) = self.frontends.get(&key) {
            return Err(*existing);
        }
        if frontend.kind == FrontendKind::ClusterIp {
            self.cluster_ips.insert(key.addr);
        }
        if frontend.kind != FrontendKind::NodePort {
            self.vips.insert(key.addr);
        }
        self.frontends.insert(key, frontend);
        self.frontends_v4.set(&key, frontend);
        Ok(())
    }

    /// Replaces the service port at `id` (which must exist).
    pub fn set_service_port(&mut self, id: ServicePortId, port: Arc<ServicePort>) {
        self.service_ports[id.0 as usize] = port;
    }

    /// Removes the service port at `id` by moving the last one into its place; returns
    /// the id the moved port had (its frontends must be pointed at `id`), if one moved.
    /// Ids are per generation: nothing outside a generation may keep them.
    pub fn swap_remove_service_port(&mut self, id: ServicePortId) -> Option<ServicePortId> {
        let last = self.service_ports.len().checked_sub(1)?;
        self.service_ports.swap_remove(id.0 as usize);
        (id.0 as usize != last).then_some(ServicePortId(last as u32))
    }

    pub fn service_port_count(&self) -> usize {
        self.service_ports.len()
    }

    /// Inserts or replaces a frontend, returning the one it replaced. Unlike
    /// [`add_frontend`](Self::add_frontend) it leaves the ClusterIP and VIP address sets
    /// alone: an incremental compiler that patches a table keeps them with
    /// [`set_cluster_ip`](Self::set_cluster_ip) and [`set_vip`](Self::set_vip).
    pub fn set_frontend(&mut self, key: FrontendKey, frontend: Frontend) -> Option<Frontend> {
        self.frontends_v4.set(&key, frontend);
        self.frontends.insert(key, frontend)
    }

    /// Removes a frontend (the address sets are the caller's, as for
    /// [`set_frontend`](Self::set_frontend)).
    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Option<Frontend> {
        self.frontends_v4.remove(key);
        self.frontends.remove(key)
    }

    /// Marks `addr` as a ClusterIP, or no longer one.
    pub fn set_cluster_ip(&mut self, addr: IpAddr, present: bool) {
        if present {
            self.cluster_ips.insert(addr);
        } else {
            self.cluster_ips.remove(&addr);
        }
    }

    /// Marks `addr` as a service address (see [`is_vip`](Self::is_vip)), or no longer one.
    pub fn set_vip(&mut self, addr: IpAddr, present: bool) {
        if present {
            self.vips.insert(addr);
        } else {
            self.vips.remove(&addr);
        }
    }

    /// The ClusterIPs and the service addresses, for comparing tables.
    pub fn addresses(&self) -> (&HashSet<IpAddr>, &HashSet<IpAddr>) {
        (&self.cluster_ips, &self.vips)
    }

    #[inline]
    pub fn frontend(&self, key: &FrontendKey) -> Option<Frontend> {
        self.frontends.get(key).copied()
    }

    /// [`ServiceTable::frontend`] of an IPv4 frontend in the fast path's form; `hash` is
    /// `frontend_hash_v4(addr, proto, port)`.
    #[inline]
    pub(crate) fn frontend_v4(
        &self,
        hash: u64,
        addr: u32,
        proto: u8,
        port: u16,
    ) -> Option<Frontend> {
        self.frontends_v4.get(hash, addr, proto, port)
    }

    /// Checks that the fast path's IPv4 frontend index holds exactly the IPv4 frontends
    /// of the map (tests of table builders call this after every change).
    pub fn check_frontend_index(&self) -> Result<(), String> {
        let mut v4 = 0;
        for (k, f) in &self.frontends {
            let IpAddr::V4(a) = k.addr else { continue };
            v4 += 1;
            let (addr, proto) = (u32::from(a), k.proto as u8);
            let got = self.frontend_v4(frontend_hash_v4(addr, proto, k.port), addr, proto, k.port);
            if got != Some(*f) {
                return Err(format!("frontend {k:?}: index has {got:?}, map has {f:?}"));
            }
        }
        if self.frontends_v4.len() != v4 {
            return Err(format!(
                "index holds {} IPv4 frontends, map {v4}",
                self.frontends_v4.len()
            ));
        }
        Ok(())
    }

    /// Where [`ServiceTable::frontend_v4`] of `hash` starts reading (for prefetching).
    #[inline]
    pub(crate) fn frontend_v4_ptr(&self, hash: u64) -> Option<*const u8> {
        self.frontends_v4.home_ptr(hash)
    }

    /// Whether `addr` is an allocated ClusterIP (on any port).
    #[inline]
    pub fn is_cluster_ip(&self, addr: &IpAddr) -> bool {
        self.cluster_ips.contains(addr)
    }

    /// Whether `addr` is a service's own address (ClusterIP, ExternalIP, LoadBalancer IP).
    #[inline]
    pub fn is_vip(&self, addr: &IpAddr) -> bool {
        self.vips.contains(addr)
    }

    #[inline]
    pub fn service_port(&self, id: ServicePortId) -> &ServicePort {
        &self.service_ports[id.0 as usize]
    }

    pub fn service_port_arc(&self, id: ServicePortId) -> &Arc<ServicePort> {
        &self.service_ports[id.0 as usize]
    }

    pub fn service_ports(&self) -> impl Iterator<Item = (ServicePortId, &Arc<ServicePort>)> {
        self.service_ports
            .iter()
            .enumerate()
            .map(|(i, p)| (ServicePortId(i as u32), p))
    }

    pub fn frontends(&self) -> impl Iterator<Item = (&FrontendKey, &Frontend)> {
        self.frontends.iter()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }
}

/// Index of an [`Interface`] in the [`NodeTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceId(pub u8);

/// What sits behind an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IfaceKind {
    /// Towards the rest of the network (other nodes, external clients).
    Uplink,
    /// A pod's veth on this node.
    Pod,
    /// The node's own stack (host processes, hostNetwork pods).
    Host,
}

impl IfaceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uplink => "uplink",
            Self::Pod => "pod",
            Self::Host => "host",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub kind: IfaceKind,
    /// The MAC this node uses as source on this interface.
    pub mac: [u8; 6],
}

/// A resolved neighbour: where to send a frame for `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: [u8; 6],
    pub iface: IfaceId,
}

/// A route for destinations that are not direct neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    /// Next hop, which must be a neighbour.
    pub via: IpAddr,
}

/// Where a frame goes next: out of `iface`, from `src_mac` to `dst_mac`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub iface: IfaceId,
    pub iface_kind: IfaceKind,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// This node: its addresses, its networks, its interfaces and its neighbours.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    pub name: String,
    /// The node's own addresses; masquerade uses the first one of the frame's family.
    pub addresses: Vec<IpAddr>,
    /// Pod networks (local-traffic detection).
    pub cluster_cidrs: Vec<IpNet>,
    /// ClusterIP ranges (unallocated addresses in them are dropped).
    pub service_cidrs: Vec<IpNet>,
    /// Addresses NodePorts answer on; empty means every node address.
    pub node_port_addresses: Vec<IpAddr>,
    /// The node's zone (`topology.kubernetes.io/zone`), for topology-aware routing: the
    /// control plane uses endpoints hinted for this zone when the hints allow it.
    pub zone: Option<String>,
    pub interfaces: Vec<Interface>,
    neighbours: HashMap<IpAddr, Neighbour>,
    /// Longest prefix first.
    routes: Vec<Route>,
    /// The IPv4 part of `neighbours` and `routes` in the form the fast path reads:
    /// neighbours by `u32` address, routes as (network, mask) with their next hop
    /// already resolved (`None` while the via address is no neighbour). Kept in step by
    /// [`NodeTable::add_neighbour`] and [`NodeTable::add_route`].
    neighbours_v4: HashMap<u32, Neighbour>,
    routes_v4: Vec<RouteV4>,
}

/// An IPv4 route with its next hop resolved (see `NodeTable::routes_v4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RouteV4 {
    net: u32,
    mask: u32,
    via: Option<Neighbour>,
}

impl NodeTable {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    pub fn add_interface(&mut self, iface: Interface) -> IfaceId {
        self.interfaces.push(iface);
        IfaceId((self.interfaces.len() - 1) as u8)
    }

    pub fn interface_by_name(&self, name: &str) -> Option<IfaceId> {
        self.interfaces
            .iter()
            .position(|i| i.name == name)
            .map(|i| IfaceId(i as u8))
    }

    pub fn interface(&self, id: IfaceId) -> &Interface {
        &self.interfaces[id.0 as usize]
    }

    pub fn add_neighbour(&mut self, addr: IpAddr, neighbour: Neighbour) {
        self.neighbours.insert(addr, neighbour);
        if let IpAddr::V4(a) = addr {
            self.neighbours_v4.insert(u32::from(a), neighbour);
            self.resolve_routes_v4();
        }
    }

    pub fn neighbour(&self, addr: &IpAddr) -> Option<Neighbour> {
        self.neighbours.get(addr).copied()
    }

    pub fn add_route(&mut self, route: Route) {
        self.routes.push(route);
        self.routes
            .sort_by_key(|r| core::cmp::Reverse(r.dst.prefix_len()));
        self.resolve_routes_v4();
    }

    /// Rebuilds `routes_v4` from `routes` and `neighbours` (same order: longest prefix
    /// first, ties as `routes` has them).
    fn resolve_routes_v4(&mut self) {
        self.routes_v4.clear();
        for r in &self.routes {
            let IpNet::V4(net) = r.dst else {
                continue;
            };
            self.routes_v4.push(RouteV4 {
                net: u32::from(net.network()),
                mask: u32::from(net.netmask()),
                via: self.neighbours.get(&r.via).copied(),
            });
        }
    }

    /// [`NodeTable::next_hop`] for an IPv4 destination given as a `u32` (the fast path's
    /// form); the same answer for every address.
    #[inline]
    pub fn next_hop_v4(&self, dst: u32) -> Option<NextHop> {
        let n = match self.neighbours_v4.get(&dst) {
            Some(n) => *n,
            None => self.routes_v4.iter().find(|r| dst & r.mask == r.net)?.via?,
        };
        self.hop_to(n)
    }

    /// The next hop through neighbour `n`: its interface's kind and MAC.
    #[inline]
    fn hop_to(&self, n: Neighbour) -> Option<NextHop> {
        let iface = self.interfaces.get(n.iface.0 as usize)?;
        Some(NextHop {
            iface: n.iface,
            iface_kind: iface.kind,
            src_mac: iface.mac,
            dst_mac: n.mac,
        })
    }

    /// Resolves where a frame for `dst` goes: an exact neighbour first, then the longest
    /// matching route whose next hop is a neighbour.
    #[inline]
    pub fn next_hop(&self, dst: &IpAddr) -> Option<NextHop> {
        if let IpAddr::V4(a) = dst {
            return self.next_hop_v4(u32::from(*a));
        }
        let n = match self.neighbours.get(dst) {
            Some(n) => *n,
            None => {
                let via = self.routes.iter().find(|r| r.dst.contains(dst))?.via;
                *self.neighbours.get(&via)?
            }
        };
        self.hop_to(n)
    }

    #[inline]
    pub fn is_node_address(&self, addr: &IpAddr) -> bool {
        self.addresses.contains(addr)
    }

    /// Whether `addr` is inside a cluster (pod) CIDR.
    #[inline]
    pub fn in_cluster(&self, addr: &IpAddr) -> bool {
        self.cluster_cidrs.iter().any(|c| c.contains(addr))
    }

    #[inline]
    pub fn in_service_cidr(&self, addr: &IpAddr) -> bool {
        self.service_cidrs.iter().any(|c| c.contains(addr))
    }

    /// The node address masquerade uses for a frame of `addr`'s family, with its index.
    #[inline]
    pub fn masquerade_address(&self, like: &IpAddr) -> Option<(u8, IpAddr)> {
        self.addresses
            .iter()
            .position(|a| a.is_ipv4() == like.is_ipv4())
            .map(|i| (i as u8, self.addresses[i]))
    }

    /// Addresses NodePorts answer on.
    pub fn node_port_addresses(&self) -> &[IpAddr] {
        if self.node_port_addresses.is_empty() {
            &self.addresses
        } else {
            &self.node_port_addresses
        }
    }
}
