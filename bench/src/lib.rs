//! Deterministic tables and traffic for benchmarking the kxp pipeline.
//!
//! * [`Cluster::build`]: `N` ClusterIP services (every [`ClusterSpec::udp_every`]-th one
//!   UDP, the rest TCP), each with 3 to 10 ready endpoints spread over the pods of a
//!   cluster of [`ClusterSpec::nodes`] nodes, written as k8s-openapi `Service` and
//!   `EndpointSlice` objects and compiled by [`kxp_control::compile::compile_objects`]
//!   (the control plane's own path, Maglev tables included), plus the [`NodeTable`] of
//!   node 0: an uplink, a host interface, one veth per local pod, the pods and the
//!   gateway as neighbours, the pod network and a default route via the gateway.
//! * [`Cluster::client_flow`]: flow `i` as a client sends it: from a local pod (on its
//!   veth) or, every [`ClusterSpec::external_every`]-th flow, from an external client (on
//!   the uplink, masqueraded), to the frontend of a service chosen by a hash of `i`.
//!   Distinct `i` give distinct client tuples, and [`Cluster::flow_index`] inverts the map.
//! * [`establish`]: runs each flow's handshake (SYN, SYN+ACK, ACK; or a UDP datagram and its
//!   reply) through [`Worker::process`], so the conntrack entries are the pipeline's own,
//!   and returns one mid-flow frame per flow (original or reply direction), shuffled.
//! * [`first_packets`]: the first packet (SYN, first datagram) of flows not seen yet.
//! * [`Runner`]: the measured loop: a batch of [`BATCH_SIZE`] frames is copied from the
//!   frame set into a receive ring (the pipeline rewrites frames in place, so each pass
//!   needs pristine bytes), processed, then [`Worker::housekeeping`] runs.
//!
//! Everything is a pure function of the [`ClusterSpec`] and the flow indexes: no clock, no
//! random source. Table building and flow set-up happen before anything is measured.

pub mod kernel_rules;
pub mod pktgen;

/// Whether this process can check rules against the kernel (root, `unshare`, `nft`,
/// `iptables-restore`); tests that need it skip with a message otherwise.
pub fn kernel_rules_tests_possible() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    root && ["unshare", "nft", "iptables-restore"].iter().all(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

use core::net::{IpAddr, Ipv4Addr};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::ops::Range;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kxp_control::compile::{compile_objects, CompileOptions};
use kxp_dataplane::checksum;
use kxp_dataplane::conntrack::ConntrackConfig;
use kxp_dataplane::flow::{mix, L4Proto};
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig, BATCH_SIZE};
use kxp_dataplane::reject::REJECT_SCRATCH_LEN;
use kxp_dataplane::tables::{
    FrontendKey, IfaceId, IfaceKind, Interface, Neighbour, NodeTable, Route,
};
use kxp_dataplane::verdict::{ForwardReason, Verdict};

/// Bytes in every generated frame: Ethernet + IPv4 + TCP (20) or UDP (8) + payload, 64 in
/// all (a minimum-size frame plus the 4 FCS bytes a NIC strips would be 64 + 4).
pub const FRAME_LEN: usize = 64;
/// Simulated time between two batches (a batch of 64 every 6.4 µs = 10 Mpps).
pub const BATCH_NS: u64 = 6_400;
/// `now` of the first packet a bench worker sees.
pub const T0_NS: u64 = 1_000_000_000;

/// Node 0's address (the node the worker runs on).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
/// The uplink's default gateway (and the next hop of remote pods).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
pub const UPLINK: IfaceId = IfaceId(0);
pub const HOST: IfaceId = IfaceId(1);
/// Interface id of local pod `j`'s veth is `FIRST_VETH + j`.
pub const FIRST_VETH: u8 = 2;
const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// External clients live in 172.16.0.0/12.
const EXTERNAL_BASE: u32 = 0xac10_0000;
const EXTERNAL_BITS: u32 = 20;
/// First client source port; client ports run from here to 65535.
const FIRST_SPORT: u32 = 1024;
const SPORTS: u64 = 65536 - FIRST_SPORT as u64;
/// ClusterIPs start at 10.96.0.16.
const CLUSTER_IP_BASE: u32 = 0x0a60_0010;

const FLOW_SEED: u64 = 0x6b78_705f_666c_6f77;
const DIR_SEED: u64 = 0x6b78_705f_6469_7231;
const EP_SEED: u64 = 0x6b78_705f_6570_7330;
const SHUFFLE_SEED: u64 = 0x6b78_705f_7368_7566;

/// The shape of the synthetic cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Services, one port each.
    pub services: usize,
    /// Nodes in the cluster; the worker runs on node 0. Node `k`'s pods are in
    /// 10.244.k.0/24. At most 256.
    pub nodes: u32,
    /// Pods per node (node 0's have a veth each). At most 250.
    pub pods_per_node: u32,
    /// Every `udp_every`-th service is UDP (DNS-like, port 53 -> 5353); 0 for none.
    pub udp_every: usize,
    /// Ready endpoints per service, inclusive range.
    pub endpoints: (u32, u32),
    /// Every `external_every`-th flow comes from an external client (uplink, masqueraded
    /// as off-cluster traffic to a ClusterIP); 0 for none.
    pub external_every: u64,
}

impl ClusterSpec {
    pub fn with_services(services: usize) -> Self {
        Self {
            services,
            nodes: 100,
            pods_per_node: 110,
            udp_every: 4,
            endpoints: (3, 10),
            external_every: 4,
        }
    }
}

/// A compiled cluster: the tables a worker reads and the frontends flows go to.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub tables: Tables,
    /// Service `i`'s frontend (its ClusterIP, protocol and port).
    pub frontends: Vec<FrontendKey>,
    /// Endpoints compiled, over all services.
    pub endpoint_count: usize,
}

/// Flow `i` as its client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlow {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub src_mac: [u8; 6],
    pub ingress: IfaceId,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub proto: L4Proto,
}

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("bench tables are IPv4 only, got {a}"),
    }
}

/// Pod `j` of node `k`.
pub fn pod_addr(k: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, (2 + j) as u8)
}

fn pod_mac(k: u32, j: u32) -> [u8; 6] {
    [0x0a, 0x58, 10, 244, k as u8, (2 + j) as u8]
}

fn veth_mac(j: u32) -> [u8; 6] {
    [2, 0, 0, 0, 1, j as u8]
}

fn meta(namespace: &str, name: &str, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        labels,
        ..ObjectMeta::default()
    }
}

impl Cluster {
    /// The node table of node 0.
    pub fn node_table(spec: &ClusterSpec) -> NodeTable {
        let mut node = NodeTable::new("node-0");
        node.addresses = vec![IpAddr::V4(NODE_ADDR)];
        node.cluster_cidrs = vec!["10.244.0.0/16".parse().expect("cidr")];
        node.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr")];
        let up = node.add_interface(Interface {
            name: "eth0".into(),
            kind: IfaceKind::Uplink,
            mac: UPLINK_MAC,
        });
        let host = node.add_interface(Interface {
            name: "host".into(),
            kind: IfaceKind::Host,
            mac: HOST_MAC,
        });
        assert_eq!((up, host), (UPLINK, HOST));
        for j in 0..spec.pods_per_node {
            let id = node.add_interface(Interface {
                name: format!("veth-{j}"),
                kind: IfaceKind::Pod,
                mac: veth_mac(j),
            });
            assert_eq!(id, IfaceId(FIRST_VETH + j as u8));
            node.add_neighbour(
                IpAddr::V4(pod_addr(0, j)),
                Neighbour {
                    mac: pod_mac(0, j),
                    iface: id,
                },
            );
        }
        node.add_neighbour(
            IpAddr::V4(GATEWAY),
            Neighbour {
                mac: GATEWAY_MAC,
                iface: up,
            },
        );
        for dst in ["10.244.0.0/16", "0.0.0.0/0"] {
            node.add_route(Route {
                dst: dst.parse().expect("cidr"),
                via: IpAddr::V4(GATEWAY),
            });
        }
        node
    }

    /// Service `i`'s endpoints: distinct pods picked by a hash of `i`.
    fn endpoints_of(spec: &ClusterSpec, i: usize) -> Vec<(u32, u32)> {
        let (lo, hi) = spec.endpoints;
        let count = lo + (mix(EP_SEED ^ i as u64) % u64::from(hi - lo + 1)) as u32;
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(count as usize);
        let mut n = 0u64;
        while out.len() < count as usize {
            let h = mix(EP_SEED.wrapping_add((i as u64) << 20 | n));
            n += 1;
            let k = (h % u64::from(spec.nodes)) as u32;
            let j = ((h >> 32) % u64::from(spec.pods_per_node)) as u32;
            if !out.contains(&(k, j)) {
                out.push((k, j));
            }
        }
        out
    }

    /// Service `i`'s frontend.
    pub fn frontend_of(spec: &ClusterSpec, i: usize) -> FrontendKey {
        let udp = spec.udp_every > 0 && i % spec.udp_every == spec.udp_every - 1;
        FrontendKey {
            addr: IpAddr::V4(Ipv4Addr::from(CLUSTER_IP_BASE + i as u32)),
            proto: if udp { L4Proto::Udp } else { L4Proto::Tcp },
            port: if udp { 53 } else { 80 },
        }
    }

    /// The Services and EndpointSlices of the cluster, as the API server would hand them
    /// over.
    pub fn objects(spec: &ClusterSpec) -> (Vec<Service>, Vec<EndpointSlice>) {
        let mut services = Vec::with_capacity(spec.services);
        let mut slices = Vec::with_capacity(spec.services);
        for i in 0..spec.services {
            let fe = Self::frontend_of(spec, i);
            let ns = format!("ns-{}", i / 100);
            let name = format!("svc-{i}");
            let (proto, port_name, target) = match fe.proto {
                L4Proto::Udp => ("UDP", "dns", 5353),
                _ => ("TCP", "http", 8080),
            };
            services.push(Service {
                metadata: meta(&ns, &name, None),
                spec: Some(ServiceSpec {
                    cluster_ip: Some(fe.addr.to_string()),
                    cluster_ips: Some(vec![fe.addr.to_string()]),
                    ports: Some(vec![K8sServicePort {
                        name: Some(port_name.into()),
                        port: i32::from(fe.port),
                        protocol: Some(proto.into()),
                        target_port: Some(IntOrString::Int(target)),
                        ..K8sServicePort::default()
                    }]),
                    ..ServiceSpec::default()
                }),
                status: None,
            });
            let labels = BTreeMap::from([(
                kxp_control::compile::LABEL_SERVICE_NAME.to_string(),
                name.clone(),
            )]);
            slices.push(EndpointSlice {
                metadata: meta(&ns, &format!("{name}-abcde"), Some(labels)),
                address_type: "IPv4".into(),
                ports: Some(vec![EndpointPort {
                    name: Some(port_name.into()),
                    port: Some(target),
                    protocol: Some(proto.into()),
                    ..EndpointPort::default()
                }]),
                endpoints: Self::endpoints_of(spec, i)
                    .into_iter()
                    .map(|(k, j)| Endpoint {
                        addresses: vec![pod_addr(k, j).to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(format!("node-{k}")),
                        ..Endpoint::default()
                    })
                    .collect(),
            });
        }
        (services, slices)
    }

    /// Builds the objects and compiles them (and the node table) into [`Tables`].
    pub fn build(spec: ClusterSpec) -> Self {
        assert!(spec.services >= 1 && spec.services < 65_000);
        assert!((1..=256).contains(&spec.nodes));
        assert!((1..=250).contains(&spec.pods_per_node));
        let node = Self::node_table(&spec);
        let (services, slices) = Self::objects(&spec);
        let compiled = compile_objects(&services, &slices, &node, &CompileOptions::default(), None);
        assert!(
            compiled.errors.is_empty(),
            "compile errors: {:?}",
            &compiled.errors[..compiled.errors.len().min(5)]
        );
        let table = compiled.table;
        let frontends: Vec<FrontendKey> = (0..spec.services)
            .map(|i| Self::frontend_of(&spec, i))
            .collect();
        for fe in &frontends {
            let f = table
                .frontend(fe)
                .expect("every service compiled a frontend");
            assert!(!table.service_port(f.service_port).cluster_lb.is_empty());
        }
        let endpoint_count = table
            .service_ports()
            .map(|(_, sp)| sp.endpoints.len())
            .sum();
        Self {
            spec,
            tables: Tables {
                services: table.into(),
                node: node.into(),
            },
            frontends,
            endpoint_count,
        }
    }

    /// Where a frame from `addr` comes in, and the sender's MAC: a local pod's veth, else
    /// the uplink (from the gateway).
    pub fn ingress_of(&self, addr: Ipv4Addr) -> (IfaceId, [u8; 6]) {
        let o = addr.octets();
        let j = u32::from(o[3]).wrapping_sub(2);
        if o[..3] == [10, 244, 0] && j < self.spec.pods_per_node {
            (IfaceId(FIRST_VETH + j as u8), pod_mac(0, j))
        } else {
            (UPLINK, GATEWAY_MAC)
        }
    }

    /// Flow `i`: client tuple, ingress and frontend. Distinct `i` (below
    /// [`Cluster::max_flows`]) give distinct client (address, port) pairs.
    pub fn client_flow(&self, i: u64) -> ClientFlow {
        let e = self.spec.external_every;
        let p = u64::from(self.spec.pods_per_node);
        let (src, sport) = if e > 0 && i % e == e - 1 {
            let x = i / e;
            let port = u64::from(FIRST_SPORT) + (x >> EXTERNAL_BITS);
            assert!(port < 65536, "flow index {i} out of range");
            let addr = EXTERNAL_BASE + (x & ((1 << EXTERNAL_BITS) - 1)) as u32;
            (Ipv4Addr::from(addr), port as u16)
        } else {
            let q = match e {
                0 => i,
                _ => i / e * (e - 1) + i % e,
            };
            let port = u64::from(FIRST_SPORT) + q / p;
            assert!(port < 65536, "flow index {i} out of range");
            (pod_addr(0, (q % p) as u32), port as u16)
        };
        let (ingress, src_mac) = self.ingress_of(src);
        let svc = (mix(FLOW_SEED ^ i) % self.frontends.len() as u64) as usize;
        let fe = self.frontends[svc];
        ClientFlow {
            src,
            sport,
            src_mac,
            ingress,
            dst: v4(fe.addr),
            dport: fe.port,
            proto: fe.proto,
        }
    }

    /// How many distinct flows [`Cluster::client_flow`] can name.
    pub fn max_flows(&self) -> u64 {
        let e = self.spec.external_every;
        let pod = u64::from(self.spec.pods_per_node) * SPORTS;
        match e {
            0 => pod,
            // Pod flows fill (e - 1) of every e indexes.
            _ => (pod / (e - 1) * e).min((SPORTS << EXTERNAL_BITS) * e),
        }
    }

    /// The flow index of a client (address, port), if [`Cluster::client_flow`] names it.
    pub fn flow_index(&self, src: IpAddr, sport: u16) -> Option<u64> {
        let src = match src {
            IpAddr::V4(a) => u32::from(a),
            IpAddr::V6(_) => return None,
        };
        let e = self.spec.external_every;
        let port = u64::from(sport).checked_sub(u64::from(FIRST_SPORT))?;
        if e > 0 && src >> EXTERNAL_BITS == EXTERNAL_BASE >> EXTERNAL_BITS {
            let x = port << EXTERNAL_BITS | u64::from(src - EXTERNAL_BASE);
            return Some(x * e + e - 1);
        }
        let o = src.to_be_bytes();
        let j = u64::from(o[3]).checked_sub(2)?;
        let p = u64::from(self.spec.pods_per_node);
        if o[..3] != [10, 244, 0] || j >= p {
            return None;
        }
        let q = port * p + j;
        match e {
            0 => Some(q),
            // Every flow is external.
            1 => None,
            _ => Some(q / (e - 1) * e + q % (e - 1)),
        }
    }
}

/// What one frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: L4Proto,
    /// TCP flag byte (ignored for UDP).
    pub tcp_flags: u8,
}

pub mod tcp_flags {
    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
}

/// One frame, cache-line aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct FrameBuf(pub [u8; FRAME_LEN]);

impl Default for FrameBuf {
    fn default() -> Self {
        Self([0; FRAME_LEN])
    }
}

/// Writes a 64-byte Ethernet/IPv4/TCP-or-UDP frame with valid IPv4 and transport
/// checksums.
pub fn write_frame(buf: &mut [u8; FRAME_LEN], s: &FrameSpec) {
    buf.fill(0);
    buf[0..6].copy_from_slice(&s.dst_mac);
    buf[6..12].copy_from_slice(&s.src_mac);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = 14;
    let l4 = ip + 20;
    let ip_len = (FRAME_LEN - ip) as u16;
    let l4_len = FRAME_LEN - l4;
    buf[ip] = 0x45;
    buf[ip + 2..ip + 4].copy_from_slice(&ip_len.to_be_bytes());
    buf[ip + 4..ip + 6].copy_from_slice(&0x1234u16.to_be_bytes());
    buf[ip + 6] = 0x40; // DF
    buf[ip + 8] = 64;
    buf[ip + 9] = s.proto as u8;
    buf[ip + 12..ip + 16].copy_from_slice(&s.src.octets());
    buf[ip + 16..ip + 20].copy_from_slice(&s.dst.octets());
    let c = checksum::checksum(0, &buf[ip..l4]);
    buf[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    buf[l4..l4 + 2].copy_from_slice(&s.sport.to_be_bytes());
    buf[l4 + 2..l4 + 4].copy_from_slice(&s.dport.to_be_bytes());
    let csum_at = match s.proto {
        L4Proto::Tcp => {
            buf[l4 + 4..l4 + 8].copy_from_slice(&0x1000_0001u32.to_be_bytes());
            if s.tcp_flags & tcp_flags::ACK != 0 {
                buf[l4 + 8..l4 + 12].copy_from_slice(&0x2000_0001u32.to_be_bytes());
            }
            buf[l4 + 12] = 5 << 4;
            buf[l4 + 13] = s.tcp_flags;
            buf[l4 + 14..l4 + 16].copy_from_slice(&65535u16.to_be_bytes());
            l4 + 16
        }
        L4Proto::Udp => {
            buf[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            l4 + 6
        }
        L4Proto::Sctp => panic!("the bench generates TCP and UDP only"),
    };
    let header = if s.proto == L4Proto::Tcp { 20 } else { 8 };
    for (n, b) in buf[l4 + header..].iter_mut().enumerate() {
        *b = 0xa0 | n as u8;
    }
    let pseudo = checksum::pseudo_header_sum(
        &s.src.octets(),
        &s.dst.octets(),
        s.proto as u8,
        l4_len as u32,
    );
    let mut c = checksum::checksum(pseudo, &buf[l4..]);
    if s.proto == L4Proto::Udp && c == 0 {
        c = 0xffff;
    }
    buf[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The (source, sport, destination, dport) of a frame [`write_frame`] wrote (or the
/// pipeline rewrote, without a VLAN tag).
pub fn frame_tuple(buf: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let a = |at: usize| Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
    let p = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
    (a(26), p(34), a(30), p(36))
}

/// Frames to cycle through, with the interface each arrives on. The length is a multiple
/// of [`BATCH_SIZE`].
#[derive(Debug, Clone, Default)]
pub struct FrameSet {
    pub frames: Vec<FrameBuf>,
    pub ingress: Vec<IfaceId>,
}

impl FrameSet {
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, frame: FrameBuf, ingress: IfaceId) {
        self.frames.push(frame);
        self.ingress.push(ingress);
    }

    /// Cuts the set to a whole number of batches.
    fn whole_batches(mut self) -> Self {
        let n = self.len() / BATCH_SIZE * BATCH_SIZE;
        assert!(n > 0, "a frame set needs at least one batch");
        self.frames.truncate(n);
        self.ingress.truncate(n);
        self
    }

    /// Deterministic Fisher-Yates shuffle.
    fn shuffle(&mut self) {
        let mut state = SHUFFLE_SEED;
        for i in (1..self.len()).rev() {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let j = (mix(state) % (i as u64 + 1)) as usize;
            self.frames.swap(i, j);
            self.ingress.swap(i, j);
        }
    }
}

/// The worker configuration the benchmarks use: defaults, with `capacity` IPv4 flows.
pub fn worker_config(capacity: usize) -> WorkerConfig {
    WorkerConfig {
        conntrack: ConntrackConfig {
            capacity,
            ..ConntrackConfig::default()
        },
        ..WorkerConfig::default()
    }
}

/// Drives a worker outside the measured loop, checking every verdict.
struct Driver<'a> {
    worker: &'a mut Worker,
    tables: &'a Tables,
    now_ns: u64,
    scratch: Vec<u8>,
    since_housekeeping: usize,
}

impl Driver<'_> {
    fn run(&mut self, frame: &mut FrameBuf, ingress: IfaceId, want: ForwardReason) {
        let v = self.worker.process(
            self.tables,
            &mut frame.0,
            ingress,
            self.now_ns,
            &mut self.scratch,
        );
        match v {
            Verdict::Forward { reason, start, .. } if reason == want && start == 0 => {}
            other => panic!(
                "set-up frame {:?}: expected forward/{}, got {other:?}",
                frame_tuple(&frame.0),
                want.as_str()
            ),
        }
        self.since_housekeeping += 1;
        if self.since_housekeeping == BATCH_SIZE {
            self.worker.housekeeping(self.now_ns);
            self.since_housekeeping = 0;
        }
    }
}

/// Which direction of flow `i` its mid-flow frame travels: original (client to
/// frontend) or reply (backend to client), half and half.
pub fn reply_direction(i: u64) -> bool {
    mix(DIR_SEED ^ i) & 1 == 1
}

/// Opens flows `range` in `worker` through [`Worker::process`] at `now_ns`: TCP SYN
/// (client), SYN+ACK (backend), ACK (client), leaving the flow established; UDP a
/// datagram and its reply. Returns one more packet of each flow (a TCP ACK or a UDP
/// datagram; original or reply direction by [`reply_direction`]), shuffled, cut to whole
/// batches. Panics if any set-up frame is not forwarded as expected.
pub fn establish(
    worker: &mut Worker,
    cluster: &Cluster,
    range: Range<u64>,
    now_ns: u64,
) -> FrameSet {
    let mut d = Driver {
        worker,
        tables: &cluster.tables,
        now_ns,
        scratch: vec![0; REJECT_SCRATCH_LEN],
        since_housekeeping: 0,
    };
    let mut set = FrameSet::default();
    set.frames
        .reserve(range.end.saturating_sub(range.start) as usize);
    set.ingress
        .reserve(range.end.saturating_sub(range.start) as usize);
    let mut buf = FrameBuf::default();
    for i in range {
        let f = cluster.client_flow(i);
        let tcp = f.proto == L4Proto::Tcp;
        let mut orig = FrameSpec {
            src_mac: f.src_mac,
            dst_mac: cluster.tables.node.interface(f.ingress).mac,
            src: f.src,
            dst: f.dst,
            sport: f.sport,
            dport: f.dport,
            proto: f.proto,
            tcp_flags: tcp_flags::SYN,
        };
        write_frame(&mut buf.0, &orig);
        d.run(&mut buf, f.ingress, ForwardReason::NewFlow);
        // What left towards the backend: (client or SNAT) -> backend.
        let (out_src, out_sport, backend, backend_port) = frame_tuple(&buf.0);
        let (b_ingress, b_mac) = cluster.ingress_of(backend);
        let mut reply = FrameSpec {
            src_mac: b_mac,
            dst_mac: cluster.tables.node.interface(b_ingress).mac,
            src: backend,
            dst: out_src,
            sport: backend_port,
            dport: out_sport,
            proto: f.proto,
            tcp_flags: tcp_flags::SYN | tcp_flags::ACK,
        };
        write_frame(&mut buf.0, &reply);
        d.run(&mut buf, b_ingress, ForwardReason::Reply);
        let back = frame_tuple(&buf.0);
        assert_eq!(
            back,
            (f.dst, f.dport, f.src, f.sport),
            "reply not reverse-NATed"
        );
        if tcp {
            orig.tcp_flags = tcp_flags::ACK;
            write_frame(&mut buf.0, &orig);
            d.run(&mut buf, f.ingress, ForwardReason::Established);
        }
        orig.tcp_flags = tcp_flags::ACK;
        reply.tcp_flags = tcp_flags::ACK;
        let (spec, ingress) = if reply_direction(i) {
            (reply, b_ingress)
        } else {
            (orig, f.ingress)
        };
        write_frame(&mut buf.0, &spec);
        set.push(buf, ingress);
    }
    let mut set = set.whole_batches();
    set.shuffle();
    set
}

/// The first packet (TCP SYN, or a UDP datagram) of each flow in `range`, in order.
pub fn first_packets(cluster: &Cluster, range: Range<u64>) -> FrameSet {
    let mut set = FrameSet::default();
    let mut buf = FrameBuf::default();
    for i in range {
        let f = cluster.client_flow(i);
        write_frame(
            &mut buf.0,
            &FrameSpec {
                src_mac: f.src_mac,
                dst_mac: cluster.tables.node.interface(f.ingress).mac,
                src: f.src,
                dst: f.dst,
                sport: f.sport,
                dport: f.dport,
                proto: f.proto,
                tcp_flags: tcp_flags::SYN,
            },
        );
        set.push(buf, f.ingress);
    }
    set.whole_batches()
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`): unlike wall time, it does
/// not grow while the thread waits for a core, which on a shared machine tells a slow
/// pipeline from a busy box.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel
    // knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The measured loop's state: a receive ring of one batch, the reject scratch buffer, a
/// simulated clock and a cursor into the frame set.
#[derive(Debug)]
pub struct Runner {
    rx: Box<[FrameBuf; BATCH_SIZE]>,
    rx_ingress: [IfaceId; BATCH_SIZE],
    scratch: Box<[u8]>,
    pub now_ns: u64,
    /// Next frame of the set to receive.
    pub cursor: usize,
}

impl Runner {
    pub fn new(now_ns: u64) -> Self {
        Self {
            rx: Box::new([FrameBuf::default(); BATCH_SIZE]),
            rx_ingress: [UPLINK; BATCH_SIZE],
            scratch: vec![0; REJECT_SCRATCH_LEN].into_boxed_slice(),
            now_ns,
            cursor: 0,
        }
    }

    /// "Receives" the next batch: copies [`BATCH_SIZE`] pristine frames (64 B each) from
    /// the set into the ring, wrapping at the end of the set.
    #[inline]
    fn receive(&mut self, set: &FrameSet) {
        let at = self.cursor;
        self.rx.copy_from_slice(&set.frames[at..at + BATCH_SIZE]);
        self.rx_ingress
            .copy_from_slice(&set.ingress[at..at + BATCH_SIZE]);
        self.cursor = if at + BATCH_SIZE == set.len() {
            0
        } else {
            at + BATCH_SIZE
        };
    }

    /// One batch: receive, [`Worker::process`] every frame, [`Worker::housekeeping`], and
    /// advance the clock by [`BATCH_NS`].
    #[inline(never)]
    pub fn batch(&mut self, worker: &mut Worker, tables: &Tables, set: &FrameSet) {
        self.receive(set);
        for (frame, &ingress) in self.rx.iter_mut().zip(&self.rx_ingress) {
            let v = worker.process(
                tables,
                &mut frame.0,
                ingress,
                self.now_ns,
                &mut self.scratch,
            );
            black_box(v);
        }
        black_box(&mut self.rx);
        worker.housekeeping(self.now_ns);
        self.now_ns += BATCH_NS;
    }

    /// [`Runner::batch`] with the whole batch handed to [`Worker::process_batch`] (which
    /// prefetches the batch's conntrack state before processing the frames in order)
    /// instead of one [`Worker::process`] call per frame.
    #[inline(never)]
    pub fn batch_prefetch(&mut self, worker: &mut Worker, tables: &Tables, set: &FrameSet) {
        self.receive(set);
        let mut frames = self.rx.each_mut().map(|f| &mut f.0[..]);
        worker.process_batch(
            tables,
            &mut frames,
            &self.rx_ingress,
            self.now_ns,
            &mut self.scratch,
            |_, _, v, _| {
                black_box(v);
            },
        );
        black_box(&mut self.rx);
        worker.housekeeping(self.now_ns);
        self.now_ns += BATCH_NS;
    }

    /// The receive step alone (the copy the measured loop pays for), for a baseline.
    #[inline(never)]
    pub fn receive_only(&mut self, set: &FrameSet) {
        self.receive(set);
        black_box(&mut self.rx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    #[test]
    fn frames_are_valid_and_checksummed() {
        for (proto, flags) in [
            (L4Proto::Tcp, tcp_flags::SYN),
            (L4Proto::Tcp, tcp_flags::ACK),
            (L4Proto::Udp, 0),
        ] {
            let s = FrameSpec {
                src_mac: [1, 2, 3, 4, 5, 6],
                dst_mac: [6, 5, 4, 3, 2, 1],
                src: Ipv4Addr::new(10, 244, 0, 7),
                dst: Ipv4Addr::new(10, 96, 3, 9),
                sport: 40_001,
                dport: 80,
                proto,
                tcp_flags: flags,
            };
            let mut buf = [0u8; FRAME_LEN];
            write_frame(&mut buf, &s);
            let p = SlicedPacket::from_ethernet(&buf).unwrap();
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("not ipv4")
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            match p.transport.unwrap() {
                TransportSlice::Tcp(t) => {
                    let th = t.to_header();
                    assert_eq!(th.checksum, th.calc_checksum_ipv4(&h, t.payload()).unwrap());
                    assert_eq!(buf[47], flags);
                }
                TransportSlice::Udp(u) => {
                    let uh = u.to_header();
                    assert_eq!(uh.checksum, uh.calc_checksum_ipv4(&h, u.payload()).unwrap());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(frame_tuple(&buf), (s.src, s.sport, s.dst, s.dport));
        }
    }

    #[test]
    fn flow_index_inverts_client_flow_and_tuples_are_distinct() {
        let c = Cluster::build(ClusterSpec::with_services(10));
        let mut seen = std::collections::HashSet::new();
        let max = c.max_flows();
        let probe = (0..5000u64)
            .chain(max - 5000..max)
            .chain([1_000_000, 1_524_287]);
        for i in probe {
            let f = c.client_flow(i);
            assert!(seen.insert((f.src, f.sport)), "flow {i} repeats a tuple");
            assert_eq!(c.flow_index(IpAddr::V4(f.src), f.sport), Some(i));
        }
        assert_eq!(c.flow_index("10.244.1.2".parse().unwrap(), 5000), None);
    }

    #[test]
    fn established_and_new_flows_go_through() {
        let c = Cluster::build(ClusterSpec::with_services(50));
        assert!(c.endpoint_count >= 150);
        let mut w = Worker::new(worker_config(1 << 14));
        let est = establish(&mut w, &c, 0..1000, T0_NS);
        assert_eq!(est.len(), 960);
        assert_eq!(w.conntrack.len(), 1000);
        let new = first_packets(&c, 1000..1640);
        let mut r = Runner::new(T0_NS);
        let before = w.counters.clone();
        for _ in 0..est.len() / BATCH_SIZE {
            r.batch(&mut w, &c.tables, &est);
        }
        for _ in 0..new.len() / BATCH_SIZE {
            r.batch(&mut w, &c.tables, &new);
        }
        let fwd = |reason| w.counters.forwarded(reason) - before.forwarded(reason);
        assert_eq!(
            fwd(ForwardReason::Established) + fwd(ForwardReason::Reply),
            960
        );
        assert_eq!(fwd(ForwardReason::NewFlow), 640);
        assert!(fwd(ForwardReason::Reply) > 300 && fwd(ForwardReason::Established) > 300);
        assert_eq!(w.counters.dropped.iter().sum::<u64>(), 0);
        assert_eq!(w.conntrack.len(), 1640);
        let purged = w
            .conntrack
            .purge(|m| c.flow_index(m.orig.src, m.orig.sport).unwrap() < 1000);
        assert_eq!(purged, 640);
    }
}
