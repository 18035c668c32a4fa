//! `kxp run`: the node agent. Manifests in, AF_XDP workers forwarding service traffic
//! out, the kernel keeping everything else.
//!
//! ```text
//!  manifests ─► ManifestWatch ─► Controller ──► control publisher ─┐
//!                                                                  ├─► merge ─► worker publisher ─► workers
//!  kernel neighbour table (ip -j neigh, every --neighbour-refresh) ┘      └──► steering maps (XDP)
//! ```
//!
//! * **Interfaces** come from the node file (kinds uplink and pod; host entries only when
//!   they are real devices), plus every interface whose name matches a `--pod-interfaces`
//!   pattern, plus the host veth (`--host-veth`, see [`HostVeth`]) through which the
//!   node's own processes reach ClusterIPs. Index, MAC, driver and queue count are read
//!   from the kernel (`ip -j -d link`, `/sys/class/net`); the kernel's MAC wins over the
//!   node file's.
//! * **Neighbours** are learned from the kernel's neighbour table, at start and then
//!   periodically (and at once when a worker counts `no_route` drops), and merged over the
//!   node file's static ones; the merge is published only when it changes. Endpoints the
//!   kernel has no neighbour entry for are probed with an empty UDP datagram to their
//!   discard port, rate-limited, so that the kernel resolves them.
//! * **Workers**: one per receive queue (`--queues`, default `0..--workers`), each on a
//!   thread pinned to a core of its own (core_affinity), each with one UMEM and one socket
//!   per interface on its queue, each owning a slice of the SNAT port range. With several
//!   workers, frames that arrive at a worker not owning their flow are handed to the owner
//!   through rings between every pair (`kxp_dataplane::driver::afxdp::handoff`).
//! * **Pod interfaces** matching `--pod-interfaces` that appear or go while running are
//!   picked up or dropped at each neighbour refresh ([`Runtime::wait`]).
//! * **Steering**: the XDP program is loaded, its maps filled from the first tables, the
//!   workers' sockets registered, and only then attached (through BPF links, which the
//!   kernel removes if the process dies). A kxp program a crashed run left attached the
//!   legacy way is detached first; anyone else's program is left alone and reported.
//! * **Stop** (SIGINT/SIGTERM, or [`Runtime`] dropped, e.g. on a panic): the XDP programs
//!   are detached first (the kernel handles the interfaces again), then the workers stop
//!   and their sockets close, then the control plane stops.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kxp_dataplane::driver::afxdp::handoff::{mesh, HandoffEnds};
use kxp_dataplane::driver::afxdp::reply_table::{ReplyBuckets, WAYS as REPLY_WAYS};
use kxp_dataplane::driver::afxdp::steer::{reply_buckets_for, Steering, STAT_NAMES};
use kxp_dataplane::driver::afxdp::{
    AfxdpConfig, AfxdpWorker, DriverCounters, PortChange, PortChangeResult, PortSpec,
};
use kxp_dataplane::flow::L4Proto;
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig};
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::tables::{
    FrontendKind, IfaceId, IfaceKind, Interface, Neighbour, NodeTable, ServiceTable,
};
use kxp_dataplane::verdict::{Counters, DropReason, ForwardReason};

use crate::controller::{Controller, ControllerConfig, ControllerHandle};
use crate::ops::{Metrics, OpsServer};
use crate::source::kube::{ClusterAccess, KubeSource, KubeSourceConfig};
use crate::source::manifest_watch::{ManifestWatch, ManifestWatchConfig};

/// When to recompute full TCP/UDP checksums of frames from an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    /// For veths (their peers may hand over partial, offloaded checksums).
    Auto,
    Always,
    /// Never: every sender must fill in complete checksums (`ethtool -K <peer> tx off`).
    Never,
}

impl std::str::FromStr for ChecksumMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("{s:?}: expected auto, always or never")),
        }
    }
}

/// What `kxp run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub node: PathBuf,
    /// The manifests watched for Services and EndpointSlices (unless [`RunConfig::kube`]).
    pub manifests: PathBuf,
    /// Watch the Kubernetes API (Services, EndpointSlices, this node's Node) instead of
    /// the manifests.
    pub kube: Option<ClusterAccess>,
    /// Receive queues, one worker each.
    pub queues: Vec<u32>,
    /// Cores to pin the workers to, in worker order; empty: every core but the first,
    /// round robin (the first is left to the control plane).
    pub cores: Vec<usize>,
    /// Name patterns (`*` wildcards) of extra pod interfaces.
    pub pod_interfaces: Vec<String>,
    pub checksum: ChecksumMode,
    /// Masquerade source ports, inclusive, shared out among the workers. Keep it outside
    /// the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
    pub snat_ports: (u16, u16),
    pub masquerade_all: bool,
    /// Tracked flows per worker (IPv4; IPv6 gets a quarter).
    pub conntrack_capacity: usize,
    /// Slots of each of the XDP reply tables, IPv4 and IPv6 (`None`: sized for every
    /// tuple conntrack can hold).
    pub reply_table_slots: Option<usize>,
    pub afxdp: AfxdpConfig,
    pub neighbour_refresh: Duration,
    /// Print counters this often (none: only at exit).
    pub stats_interval: Option<Duration>,
    /// Serve /metrics, /healthz and /livez here.
    pub metrics_addr: Option<SocketAddr>,
    /// Written (with the pid) once traffic is steered; removed at exit.
    pub ready_file: Option<PathBuf>,
    /// Create a veth pair `NAME` / `NAME-k` and route the service CIDRs into it, so that
    /// the node's own processes reach ClusterIPs through kxp (see [`HostVeth`]).
    pub host_veth: Option<String>,
    /// Frames each hand-off ring between two workers holds.
    pub handoff_capacity: usize,
}

impl RunConfig {
    pub fn new(node: impl Into<PathBuf>, manifests: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            manifests: manifests.into(),
            kube: None,
            queues: vec![0],
            cores: Vec::new(),
            pod_interfaces: Vec::new(),
            checksum: ChecksumMode::Auto,
            snat_ports: (61000, 65535),
            masquerade_all: false,
            conntrack_capacity: 1 << 18,
            reply_table_slots: None,
            afxdp: AfxdpConfig::default(),
            neighbour_refresh: Duration::from_millis(500),
            stats_interval: None,
            metrics_addr: None,
            ready_file: None,
            host_veth: None,
            handoff_capacity: 1024,
        }
    }
}

/// Why `kxp run` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] crate::ConfigError),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Steering(#[from] kxp_dataplane::driver::afxdp::steer::SteerError),
    #[error("worker {0}: {1}")]
    Worker(usize, String),
}

/// A kernel interface as `ip -j -d link` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLink {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// `veth`, `bridge`, ...; empty for physical devices.
    pub kind: String,
    pub rx_queues: u32,
}

fn run_ip(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).map_err(|e| format!("ip {}: bad JSON: {e}", args.join(" ")))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// Parses `ip -j -d link show`.
pub fn parse_links(v: &serde_json::Value) -> Vec<KernelLink> {
    let Some(arr) = v.as_array() else {
        return Vec::new();
    };
    arr.iter()
        .filter_map(|l| {
            Some(KernelLink {
                name: l.get("ifname")?.as_str()?.to_string(),
                ifindex: l.get("ifindex")?.as_u64()? as u32,
                mac: l
                    .get("address")
                    .and_then(|a| a.as_str())
                    .and_then(parse_mac)
                    .unwrap_or_default(),
                kind: l
                    .get("linkinfo")
                    .and_then(|i| i.get("info_kind"))
                    .and_then(|k| k.as_str())
                    .unwrap_or("")
                    .to_string(),
                rx_queues: l.get("num_rx_queues").and_then(|q| q.as_u64()).unwrap_or(1) as u32,
            })
        })
        .collect()
}

/// The kernel's interfaces (in this network namespace), with the receive queues in use
/// (`/sys/class/net/*/queues/rx-*`, which `ethtool -L` changes; `ip` reports the
/// allocated number).
pub fn kernel_links() -> Result<Vec<KernelLink>, String> {
    let mut links = run_ip(&["-j", "-d", "link", "show"]).map(|v| parse_links(&v))?;
    for l in &mut links {
        let dir = format!("/sys/class/net/{}/queues", l.name);
        if let Ok(entries) = std::fs::read_dir(dir) {
            let rx = entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count();
            if rx > 0 {
                l.rx_queues = rx as u32;
            }
        }
    }
    Ok(links)
}

/// A resolved entry of the kernel's neighbour table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelNeighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    pub dev: String,
}

/// Parses `ip -j neigh show`: entries with a link-layer address in a usable state.
pub fn parse_neighbours(v: &serde_json::Value) -> Vec<KernelNeighbour> {
    let Some(arr) = v.as_array() else {
        return Vec::new();
    };
    let mut out: Vec<KernelNeighbour> = arr
        .iter()
        .filter_map(|n| {
            let states: Vec<&str> = n
                .get("state")
                .and_then(|s| s.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            if states.iter().any(|s| matches!(*s, "FAILED" | "INCOMPLETE")) {
                return None;
            }
            Some(KernelNeighbour {
                ip: n.get("dst")?.as_str()?.parse().ok()?,
                mac: parse_mac(n.get("lladdr")?.as_str()?)?,
                dev: n.get("dev")?.as_str()?.to_string(),
            })
        })
        .collect();
    out.sort();
    out
}

/// The kernel's resolved neighbours (in this network namespace).
pub fn kernel_neighbours() -> Result<Vec<KernelNeighbour>, String> {
    run_ip(&["-j", "neigh", "show"]).map(|v| parse_neighbours(&v))
}

/// `pattern` with `*` matching any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// An interface kxp opens sockets on.
#[derive(Debug, Clone)]
pub struct ManagedInterface {
    pub id: IfaceId,
    pub link: KernelLink,
    pub recompute_l4_checksum: bool,
}

/// Resolves the node file's interfaces (and pattern matches) against the kernel's: MACs
/// from the kernel, pod interfaces added. Returns the node table to publish and the
/// interfaces to open sockets on.
pub fn resolve_interfaces(
    mut node: NodeTable,
    links: &[KernelLink],
    pod_patterns: &[String],
    checksum: ChecksumMode,
) -> Result<(NodeTable, Vec<ManagedInterface>), RunError> {
    for l in links {
        if l.name != "lo"
            && node.interface_by_name(&l.name).is_none()
            && pod_patterns.iter().any(|p| glob_match(p, &l.name))
        {
            node.add_interface(Interface {
                name: l.name.clone(),
                kind: IfaceKind::Pod,
                mac: l.mac,
            });
        }
    }
    let mut managed = Vec::new();
    for (i, iface) in node.interfaces.iter_mut().enumerate() {
        let found = links.iter().find(|l| l.name == iface.name);
        // A host interface is often a name only (replays use one); it gets a socket
        // only when it is a real device (the host veth).
        if iface.kind == IfaceKind::Host && found.is_none() {
            continue;
        }
        let Some(link) = found else {
            return Err(RunError::Setup(format!(
                "interface {} (from the node file) does not exist in this network namespace",
                iface.name
            )));
        };
        if iface.mac != link.mac {
            tracing::warn!(
                interface = %iface.name,
                node_file = %fmt_mac(&iface.mac),
                kernel = %fmt_mac(&link.mac),
                "the node file's MAC differs from the kernel's; using the kernel's"
            );
            iface.mac = link.mac;
        }
        let recompute = match checksum {
            ChecksumMode::Always => true,
            ChecksumMode::Never => false,
            ChecksumMode::Auto => link.kind == "veth",
        };
        managed.push(ManagedInterface {
            id: IfaceId(i as u8),
            link: link.clone(),
            recompute_l4_checksum: recompute,
        });
    }
    if managed.is_empty() {
        return Err(RunError::Setup(
            "no interfaces to serve: the node file lists none of kind uplink or pod".into(),
        ));
    }
    Ok((node, managed))
}

fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `base` with the kernel's neighbours on managed interfaces added (the kernel's entry
/// wins over the node file's for the same address).
pub fn with_neighbours(base: &NodeTable, learned: &[KernelNeighbour]) -> NodeTable {
    let mut node = base.clone();
    for n in learned {
        if let Some(iface) = node.interface_by_name(&n.dev) {
            if node.interface(iface).kind != IfaceKind::Host {
                node.add_neighbour(n.ip, Neighbour { mac: n.mac, iface });
            }
        }
    }
    node
}

/// The node's own way into kxp: a veth pair whose stack side (`NAME`) carries routes for
/// the service CIDRs (source: the node address of the family), and whose kxp side
/// (`NAME-k`) is a host interface with a socket per worker. A node process connecting to
/// a ClusterIP sends through `NAME`, kxp receives on `NAME-k` (ingress kind host: the
/// source is the node, so the flow is masqueraded), and replies come back out of `NAME-k`
/// to the node address. Created at start (replacing a stale pair a crashed run left),
/// deleted (with its routes) at stop.
///
/// Beyond ClusterIPs, the node's own traffic to LoadBalancer ingress IPs and ExternalIPs
/// (a /32 or /128 route each, kept in step with the tables) and to its own NodePorts
/// takes the same way. A NodePort is on a local address, which the kernel's `local`
/// routing table would deliver before any route is looked at; so the `local` rule is
/// moved behind a rule that sends locally originated TCP/UDP/SCTP to the node's NodePort
/// addresses and ports (the span of the NodePorts in use) to a table of its own routing
/// into the stack side, as kube-proxy's OUTPUT chain would DNAT it. Replies then come
/// from a local address on `NAME`, hence `accept_local` there. Everything is undone at
/// stop; a start after a crash removes what the crashed run left.
#[derive(Debug)]
pub struct HostVeth {
    name: String,
    /// LoadBalancer and ExternalIP addresses routed into the stack side.
    routed: std::collections::BTreeSet<IpAddr>,
    /// The NodePort policy rules installed.
    node_port_rules: Vec<NodePortRule>,
}

/// One policy rule sending the node's own traffic for its NodePorts to [`HOST_TABLE`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodePortRule {
    addr: IpAddr,
    proto: &'static str,
    ports: (u16, u16),
}

impl NodePortRule {
    fn args(&self, op: &'static str) -> Vec<String> {
        let family = if self.addr.is_ipv4() { "-4" } else { "-6" };
        let prefix = if self.addr.is_ipv4() { 32 } else { 128 };
        [
            family,
            "rule",
            op,
            "pref",
            HOST_RULE_PREF,
            "to",
            &format!("{}/{prefix}", self.addr),
            "iif",
            "lo",
            "ipproto",
            self.proto,
            "dport",
            &format!("{}-{}", self.ports.0, self.ports.1),
            "lookup",
            HOST_TABLE,
        ]
        .map(String::from)
        .to_vec()
    }
}

/// Policy rule preference of the NodePort rules, and where the `local` rule moves to
/// (behind them; the kernel's default is 0).
const HOST_RULE_PREF: &str = "100";
const LOCAL_RULE_PREF: &str = "200";
/// The routing table holding the default routes into the host veth.
const HOST_TABLE: &str = "7877";

/// Next hop of the host veth's routes: a neighbour entry pointing at the kxp side.
const HOST_GW_V4: &str = "169.254.77.1";
const HOST_GW_V6: &str = "fe80::77:1";

fn ip_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl HostVeth {
    /// The kxp side's name.
    pub fn kxp_side(name: &str) -> String {
        format!("{name}-k")
    }

    /// Creates the pair (deleting a stale one of the same name first).
    pub fn create(name: &str) -> Result<Self, RunError> {
        if name.is_empty() || name.len() > 13 {
            return Err(RunError::Setup(format!(
                "--host-veth {name:?}: 1 to 13 characters (the kxp side is NAME-k)"
            )));
        }
        let k = Self::kxp_side(name);
        if ip_cmd(&["link", "show", "dev", name]).is_ok() {
            tracing::warn!(interface = name, "deleting a stale host veth");
            let _ = ip_cmd(&["link", "del", "dev", name]);
        }
        ip_cmd(&[
            "link",
            "add",
            name,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            &k,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
        ])
        .map_err(RunError::Setup)?;
        let me = Self {
            name: name.into(),
            routed: Default::default(),
            node_port_rules: Vec::new(),
        };
        // A crashed run's NodePort rules (the `local` rule is put back in front first).
        Self::restore_local_rule();
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0");
        // Replies to the node's own NodePort connections come from a local address; and
        // node traffic to a port in the NodePort span that no service uses comes back to
        // the stack on the kxp side (the steering program passes it).
        for dev in [name, k.as_str()] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/accept_local"), "1");
            let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), "0");
        }
        ip_cmd(&["link", "set", "dev", name, "up"]).map_err(RunError::Setup)?;
        ip_cmd(&["link", "set", "dev", &k, "up"]).map_err(RunError::Setup)?;
        Ok(me)
    }

    /// Adds the kxp side to `node` as a host interface, with the node's addresses as its
    /// neighbours (replies to the node leave through it).
    pub fn add_to(&self, node: &mut NodeTable, links: &[KernelLink]) -> Result<(), RunError> {
        let mac = |n: &str| {
            links
                .iter()
                .find(|l| l.name == n)
                .map(|l| l.mac)
                .ok_or_else(|| RunError::Setup(format!("host veth {n} vanished")))
        };
        let stack_mac = mac(&self.name)?;
        let k = Self::kxp_side(&self.name);
        let id = node.add_interface(Interface {
            name: k.clone(),
            kind: IfaceKind::Host,
            mac: mac(&k)?,
        });
        for a in node.addresses.clone() {
            node.add_neighbour(
                a,
                Neighbour {
                    mac: stack_mac,
                    iface: id,
                },
            );
        }
        Ok(())
    }

    /// Routes the service CIDRs into the stack side.
    pub fn route(&mut self, node: &NodeTable, links: &[KernelLink]) -> Result<(), RunError> {
        let k = Self::kxp_side(&self.name);
        let kmac = links
            .iter()
            .find(|l| l.name == k)
            .map(|l| fmt_mac(&l.mac))
            .ok_or_else(|| RunError::Setup(format!("host veth {k} vanished")))?;
        for (family, gw) in [("-4", HOST_GW_V4), ("-6", HOST_GW_V6)] {
            let has_address = node
                .addresses
                .iter()
                .any(|a| a.is_ipv4() == (family == "-4"));
            if !has_address {
                continue;
            }
            ip_cmd(&[
                "neigh",
                "replace",
                gw,
                "lladdr",
                &kmac,
                "dev",
                &self.name,
                "nud",
                "permanent",
            ])
            .map_err(RunError::Setup)?;
            ip_cmd(&[
                family, "route", "replace", "default", "via", gw, "dev", &self.name, "onlink",
                "table", HOST_TABLE,
            ])
            .map_err(RunError::Setup)?;
        }
        for cidr in &node.service_cidrs {
            let Some((_, src)) = node.masquerade_address(&cidr.addr()) else {
                continue;
            };
            // The gateway's neighbour entry is in place: a family with a masquerade
            // address has a node address, and the loop above served it.
            let gw = if cidr.addr().is_ipv4() {
                HOST_GW_V4
            } else {
                HOST_GW_V6
            };
            ip_cmd(&[
                "route",
                "replace",
                &cidr.to_string(),
                "via",
                gw,
                "dev",
                &self.name,
                "src",
                &src.to_string(),
                "onlink",
            ])
            .map_err(RunError::Setup)?;
        }
        Ok(())
    }
}

impl HostVeth {
    /// Brings the node's own routes to LoadBalancer IPs, ExternalIPs and NodePorts in step
    /// with `tables` (see the type's docs). Failures are logged; the data path is not
    /// affected by them.
    pub fn sync_services(&mut self, tables: &Tables) {
        let node = &tables.node;
        let mut want = std::collections::BTreeSet::new();
        let mut node_ports: HashMap<(IpAddr, &'static str), (u16, u16)> = HashMap::new();
        for (key, fe) in tables.services.frontends() {
            match fe.kind {
                FrontendKind::LoadBalancer | FrontendKind::ExternalIp => {
                    // An address of the node's own is reached by the NodePort way or not
                    // at all (kube-proxy does not DNAT local traffic to it either).
                    if !node.is_node_address(&key.addr) {
                        want.insert(key.addr);
                    }
                }
                FrontendKind::NodePort => {
                    let proto = match key.proto {
                        L4Proto::Tcp => "tcp",
                        L4Proto::Udp => "udp",
                        L4Proto::Sctp => "sctp",
                    };
                    let span = node_ports
                        .entry((key.addr, proto))
                        .or_insert((key.port, key.port));
                    span.0 = span.0.min(key.port);
                    span.1 = span.1.max(key.port);
                }
                FrontendKind::ClusterIp => {}
            }
        }
        for addr in self.routed.difference(&want).copied().collect::<Vec<_>>() {
            let family = if addr.is_ipv4() { "-4" } else { "-6" };
            let _ = ip_cmd(&[family, "route", "del", &addr.to_string(), "dev", &self.name]);
            self.routed.remove(&addr);
        }
        for addr in want {
            if self.routed.contains(&addr) {
                continue;
            }
            let Some((_, src)) = node.masquerade_address(&addr) else {
                continue;
            };
            let (family, gw) = if addr.is_ipv4() {
                ("-4", HOST_GW_V4)
            } else {
                ("-6", HOST_GW_V6)
            };
            match ip_cmd(&[
                family,
                "route",
                "replace",
                &addr.to_string(),
                "via",
                gw,
                "dev",
                &self.name,
                "src",
                &src.to_string(),
                "onlink",
            ]) {
                Ok(()) => {
                    self.routed.insert(addr);
                }
                Err(e) => tracing::warn!(error = %e, %addr, "no host route to a service address"),
            }
        }
        let mut rules: Vec<NodePortRule> = node_ports
            .into_iter()
            .map(|((addr, proto), ports)| NodePortRule { addr, proto, ports })
            .collect();
        rules.sort_by_key(|r| (r.addr, r.proto, r.ports));
        if rules == self.node_port_rules {
            return;
        }
        for r in std::mem::take(&mut self.node_port_rules) {
            let _ = ip_args(&r.args("del"));
        }
        if rules.is_empty() {
            Self::restore_local_rule();
            return;
        }
        for family in ["-4", "-6"] {
            let wanted = rules.iter().any(|r| r.addr.is_ipv4() == (family == "-4"));
            if wanted && !rule_exists(family, LOCAL_RULE_PREF) {
                // Behind ours: add the moved copy first, then drop the one in front.
                if let Err(e) = ip_cmd(&[
                    family,
                    "rule",
                    "add",
                    "pref",
                    LOCAL_RULE_PREF,
                    "lookup",
                    "local",
                ]) {
                    tracing::warn!(error = %e, "cannot move the local routing rule: the node's own NodePort traffic stays local");
                    continue;
                }
                let _ = ip_cmd(&[family, "rule", "del", "pref", "0", "lookup", "local"]);
            }
        }
        for r in rules {
            match ip_args(&r.args("add")) {
                Ok(()) => self.node_port_rules.push(r),
                Err(e) => tracing::warn!(error = %e, "no NodePort rule for the node's own traffic"),
            }
        }
    }

    /// Puts the `local` rule back at preference 0 and removes the NodePort rules (ours,
    /// possibly a crashed run's).
    fn restore_local_rule() {
        for family in ["-4", "-6"] {
            // Bounded: one rule goes per successful delete.
            for _ in 0..4096 {
                if ip_cmd(&[family, "rule", "del", "pref", HOST_RULE_PREF]).is_err() {
                    break;
                }
            }
            if rule_exists(family, LOCAL_RULE_PREF) {
                if !rule_exists(family, "0") {
                    let _ = ip_cmd(&[family, "rule", "add", "pref", "0", "lookup", "local"]);
                }
                let _ = ip_cmd(&[
                    family,
                    "rule",
                    "del",
                    "pref",
                    LOCAL_RULE_PREF,
                    "lookup",
                    "local",
                ]);
            }
        }
    }
}

/// Whether a `local` lookup rule exists at preference `pref`.
fn rule_exists(family: &str, pref: &str) -> bool {
    Command::new("ip")
        .args([family, "rule", "list", "pref", pref])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("lookup local"))
}

fn ip_args(args: &[String]) -> Result<(), String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ip_cmd(&args)
}

impl Drop for HostVeth {
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.node_port_rules) {
            let _ = ip_args(&r.args("del"));
        }
        Self::restore_local_rule();
        let _ = ip_cmd(&["-4", "route", "flush", "table", HOST_TABLE]);
        let _ = ip_cmd(&["-6", "route", "flush", "table", HOST_TABLE]);
        if let Err(e) = ip_cmd(&["link", "del", "dev", &self.name]) {
            tracing::warn!(error = %e, "host veth not deleted");
        }
    }
}

/// One worker's counters as last reported.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    pub queue: u32,
    pub pipeline: Counters,
    pub driver: DriverCounters,
    pub flows: usize,
}

struct WorkerThread {
    queue: u32,
    handle: Option<JoinHandle<()>>,
}

/// A running `kxp run`. Dropping it tears everything down in the safe order (see the
/// module docs), also when unwinding from a panic.
pub struct Runtime {
    cfg: RunConfig,
    steering: Option<Steering>,
    worker_stop: Arc<AtomicBool>,
    workers: Vec<WorkerThread>,
    stats: Arc<Vec<Mutex<WorkerStats>>>,
    controller: Option<ControllerHandle>,
    watch: Option<ManifestWatch>,
    kube: Option<KubeSource>,
    ops: Option<OpsServer>,
    control: Arc<TablePublisher>,
    publisher: Arc<TablePublisher>,
    base_node: NodeTable,
    managed: Vec<ManagedInterface>,
    learned: Vec<KernelNeighbour>,
    /// What the published node table was merged from.
    merged_from: Option<Arc<NodeTable>>,
    merged_learned: Vec<KernelNeighbour>,
    probed: HashMap<IpAddr, Instant>,
    ready_written: bool,
    /// The steering program's counters as they were when it was unloaded.
    final_xdp: Vec<(&'static str, u64)>,
    host_veth: Option<HostVeth>,
    /// Pod interfaces that appeared after start (`--pod-interfaces`), in the order they
    /// got their ids (after the controller's node table's interfaces). One that goes away
    /// keeps its entry (and id) for when it comes back.
    dynamic: Vec<Interface>,
    /// Interface changes to each worker, and their answers.
    port_changes: Vec<mpsc::Sender<PortChange>>,
    port_results: Option<mpsc::Receiver<(u32, PortChangeResult)>>,
}

impl core::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Runtime")
            .field("interfaces", &self.managed.len())
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Runtime {
    /// Starts everything: control plane, workers, steering. Returns once traffic is being
    /// steered.
    pub fn start(cfg: RunConfig) -> Result<Self, RunError> {
        if cfg.queues.is_empty() {
            return Err(RunError::Setup(
                "at least one queue (worker) is needed".into(),
            ));
        }
        let mut node = crate::node::load_node_file(&cfg.node)?;
        let mut host_veth = match &cfg.host_veth {
            Some(name) => Some(HostVeth::create(name)?),
            None => None,
        };
        let links = kernel_links().map_err(RunError::Setup)?;
        if let Some(h) = &mut host_veth {
            h.add_to(&mut node, &links)?;
            h.route(&node, &links)?;
        }
        let (node, managed) = resolve_interfaces(node, &links, &cfg.pod_interfaces, cfg.checksum)?;
        let max_queue = *cfg.queues.iter().max().unwrap_or(&0);
        for m in &managed {
            if m.link.rx_queues <= max_queue {
                return Err(RunError::Setup(format!(
                    "{} has {} receive queue(s); queue {max_queue} does not exist",
                    m.link.name, m.link.rx_queues
                )));
            }
            if m.link.rx_queues as usize > cfg.queues.len() {
                tracing::warn!(
                    interface = %m.link.name,
                    rx_queues = m.link.rx_queues,
                    workers = cfg.queues.len(),
                    "more receive queues than workers: service traffic arriving on a queue \
                     without a worker reaches the kernel unhandled (counted as \
                     pass_no_socket); run a worker per receive queue (--workers/--queues) \
                     or give veths one queue (numrxqueues 1 numtxqueues 1)"
                );
            }
        }
        check_snat_range(cfg.snat_ports);
        for m in &managed {
            if Steering::clear_stale(&m.link.name, m.link.ifindex)? {
                tracing::warn!(interface = %m.link.name, "detached a stale kxp XDP program");
            }
        }

        // Control plane: the controller publishes to `control`; the merge republishes to
        // the workers' publisher with the kernel's neighbours.
        let empty = Tables {
            services: Arc::new(ServiceTable::new()),
            node: Arc::new(node.clone()),
        };
        let control = TablePublisher::new(empty.clone());
        let metrics = Metrics::new(Duration::from_secs(60));
        let controller = Controller::new(
            node.clone(),
            Arc::clone(&control),
            Arc::clone(&metrics),
            ControllerConfig::default(),
        );
        let (tx, rx) = mpsc::channel();
        // One source of truth: the Kubernetes API, or the manifests (the default).
        let (watch, kube) = match &cfg.kube {
            Some(access) => {
                let source =
                    KubeSource::start(KubeSourceConfig::new(access.clone()), node.name.clone(), tx)
                        .map_err(|e| RunError::Setup(format!("kubernetes source: {e}")))?;
                tracing::info!(node = %node.name, "watching the Kubernetes API");
                (None, Some(source))
            }
            None => {
                let watch = ManifestWatch::spawn(ManifestWatchConfig::new(&cfg.manifests), tx)
                    .map_err(|e| RunError::Setup(format!("manifests watch: {e}")))?;
                (Some(watch), None)
            }
        };
        let controller = controller
            .spawn(rx)
            .map_err(|e| RunError::Setup(format!("controller: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.current().services.generation == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if control.current().services.generation == 0 {
            tracing::warn!("no tables compiled within 10 s; starting with no services");
        }

        let publisher = TablePublisher::new(empty);
        let stats: Arc<Vec<Mutex<WorkerStats>>> = Arc::new(
            cfg.queues
                .iter()
                .map(|q| {
                    Mutex::new(WorkerStats {
                        queue: *q,
                        ..WorkerStats::default()
                    })
                })
                .collect(),
        );
        let ops = match cfg.metrics_addr {
            Some(addr) => {
                let s = Arc::clone(&stats);
                metrics.set_dataplane_counters(move || {
                    s.iter()
                        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).pipeline.clone())
                        .collect()
                });
                let s = Arc::clone(&stats);
                metrics.set_driver_counters(move || {
                    s.iter()
                        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).driver.named())
                        .collect()
                });
                let server = OpsServer::bind(addr, Arc::clone(&metrics))
                    .map_err(|e| RunError::Setup(format!("cannot listen on {addr}: {e}")))?;
                tracing::info!(addr = %server.local_addr(), "serving /healthz, /livez, /metrics");
                Some(server)
            }
            None => None,
        };

        let mut rt = Self {
            cfg,
            steering: None,
            worker_stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
            stats,
            controller: Some(controller),
            watch,
            kube,
            ops,
            control,
            publisher,
            base_node: node,
            managed,
            learned: Vec::new(),
            merged_from: None,
            merged_learned: Vec::new(),
            probed: HashMap::new(),
            ready_written: false,
            final_xdp: Vec::new(),
            host_veth,
            dynamic: Vec::new(),
            port_changes: Vec::new(),
            port_results: None,
        };
        rt.refresh_neighbours();
        rt.merge(true)?;
        rt.steering = Some(Steering::load(rt.reply_buckets())?);
        let several = rt.cfg.queues.len() > 1;
        rt.steering
            .as_mut()
            .expect("loaded above")
            .set_several_workers(several)?;
        rt.start_steering()?;
        rt.start_workers()?;
        let steering = rt.steering.as_mut().expect("loaded above");
        for m in &rt.managed {
            steering.attach(&m.link.name, m.link.ifindex)?;
        }
        tracing::info!(
            interfaces = ?rt.managed.iter().map(|m| m.link.name.as_str()).collect::<Vec<_>>(),
            workers = rt.workers.len(),
            "kxp running: service traffic is steered to the workers"
        );
        if let Some(path) = &rt.cfg.ready_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .map_err(|e| RunError::Setup(format!("{}: {e}", path.display())))?;
            rt.ready_written = true;
        }
        Ok(rt)
    }

    /// Reply-table buckets for every tuple the workers can track at once, per family:
    /// each flow conntrack can hold (its IPv4 or its IPv6 table), on every worker, once
    /// (its reply tuple) or, with several workers, twice (its original tuple too).
    fn reply_buckets(&self) -> ReplyBuckets {
        if let Some(slots) = self.cfg.reply_table_slots {
            let b = u32::try_from(slots.div_ceil(REPLY_WAYS).max(1)).unwrap_or(u32::MAX);
            return ReplyBuckets { v4: b, v6: b };
        }
        let wc = self.worker_config(0);
        let tuples_per_flow = if self.cfg.queues.len() > 1 { 2 } else { 1 };
        let tuples = |per_worker: usize| {
            reply_buckets_for(per_worker * self.cfg.queues.len().max(1) * tuples_per_flow)
        };
        ReplyBuckets {
            v4: tuples(wc.conntrack.capacity),
            v6: tuples(wc.conntrack.capacity_v6),
        }
    }

    fn worker_config(&self, index: usize) -> WorkerConfig {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut wc = WorkerConfig {
            index: index as u16,
            worker_count: self.cfg.queues.len() as u16,
            snat_ports: self.cfg.snat_ports,
            masquerade_all: self.cfg.masquerade_all,
            ..WorkerConfig::default()
        };
        wc.conntrack.capacity = self.cfg.conntrack_capacity;
        // The reply table follows conntrack through its removal log, drained after every
        // batch and housekeeping pass: room for a batch's evictions plus a pass's GC and
        // purge with plenty to spare.
        wc.conntrack.removal_log = 4096;
        wc.conntrack.capacity_v6 = (self.cfg.conntrack_capacity / 4).max(1024);
        wc.conntrack.hash_seed = seed;
        wc.affinity_capacity = (self.cfg.conntrack_capacity / 4).max(1024);
        wc
    }

    fn start_steering(&mut self) -> Result<(), RunError> {
        let ranges: Vec<(u32, (u16, u16))> = self
            .cfg
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| (*q, Worker::new(self.worker_config(i)).snat_port_range()))
            .collect();
        let steering = self.steering.as_mut().expect("loaded");
        for m in &self.managed {
            steering.set_interface_slot(m.link.ifindex, m.id.0 as u32)?;
        }
        steering.set_workers(&ranges, self.cfg.snat_ports)?;
        steering.sync(&self.publisher.current())?;
        Ok(())
    }

    fn start_workers(&mut self) -> Result<(), RunError> {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let ports: Vec<PortSpec> = self
            .managed
            .iter()
            .map(|m| PortSpec {
                iface: m.id,
                name: m.link.name.clone(),
                recompute_l4_checksum: m.recompute_l4_checksum,
            })
            .collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (results_tx, results_rx) = mpsc::channel();
        self.port_results = Some(results_rx);
        // Several workers: rings between every pair, for frames one receives and another
        // owns (see kxp_dataplane::driver::afxdp::handoff).
        let mut handoff: Vec<Option<HandoffEnds>> = if self.cfg.queues.len() > 1 {
            mesh(self.cfg.queues.len(), self.cfg.handoff_capacity)
                .map_err(|e| RunError::Setup(format!("hand-off rings: {e}")))?
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        for (i, &queue) in self.cfg.queues.clone().iter().enumerate() {
            let ends = handoff[i].take();
            let (changes_tx, changes_rx) = mpsc::channel();
            self.port_changes.push(changes_tx);
            let results = results_tx.clone();
            let core = if !self.cfg.cores.is_empty() {
                let want = self.cfg.cores[i % self.cfg.cores.len()];
                cores.iter().copied().find(|c| c.id == want)
            } else if cores.len() > 1 {
                Some(cores[1 + i % (cores.len() - 1)])
            } else {
                cores.first().copied()
            };
            let wc = self.worker_config(i);
            let afxdp = self.cfg.afxdp.clone();
            let ports = ports.clone();
            let mut subscriber = self.publisher.subscribe();
            let stop = Arc::clone(&self.worker_stop);
            let stats = Arc::clone(&self.stats);
            let reply_map = self.steering.as_ref().expect("loaded").reply_map()?;
            let reply_table = self.steering.as_ref().expect("loaded").reply_table();
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("kxp-worker-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        if !core_affinity::set_for_current(c) {
                            tracing::warn!(worker = i, core = c.id, "could not pin");
                        }
                    }
                    let mut worker = Worker::new(wc);
                    let snat = worker.snat_port_range();
                    let mut io = match AfxdpWorker::new(queue, &ports, &afxdp) {
                        Ok(io) => io,
                        Err(e) => {
                            let _ = ready.send((i, Err(e.to_string())));
                            return;
                        }
                    };
                    io.set_reply_map(reply_table, reply_map, snat, afxdp.reply_capacity, i as u32);
                    if let Some(ends) = ends {
                        io.set_handoff(i as u32, ends);
                    }
                    io.set_port_changes(changes_rx, results);
                    let _ = ready.send((i, Ok(io.socket_fds())));
                    drop(ready);
                    let mut report = |w: &Worker, d: &DriverCounters| {
                        if let Ok(mut s) = stats[i].try_lock() {
                            s.pipeline.clone_from(&w.counters);
                            s.driver.clone_from(d);
                            s.flows = w.conntrack.len();
                        }
                    };
                    io.run(
                        &mut worker,
                        &mut subscriber,
                        &stop,
                        Duration::from_millis(100),
                        &mut report,
                    );
                })
                .map_err(|e| RunError::Setup(format!("cannot start worker {i}: {e}")))?;
            self.workers.push(WorkerThread {
                queue,
                handle: Some(handle),
            });
        }
        drop(ready_tx);
        for _ in 0..self.workers.len() {
            let (i, res) = ready_rx
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| RunError::Setup("workers did not start within 30 s".into()))?;
            let fds = res.map_err(|e| RunError::Worker(i, e))?;
            let queue = self.workers[i].queue;
            let steering = self.steering.as_mut().expect("loaded");
            for (iface, name, fd) in fds {
                steering.set_socket(iface.0 as u32, queue, fd)?;
                tracing::debug!(worker = i, interface = %name, queue, "socket registered");
            }
        }
        Ok(())
    }

    /// Publishes the controller's latest tables with the learned neighbours, and brings
    /// the steering maps in step, if either changed (or `force`).
    fn merge(&mut self, force: bool) -> Result<bool, RunError> {
        let ctrl = self.control.current();
        let cur = self.publisher.current();
        let services_changed = !Arc::ptr_eq(&ctrl.services, &cur.services);
        let node_changed = self
            .merged_from
            .as_ref()
            .is_none_or(|b| !Arc::ptr_eq(b, &ctrl.node))
            || self.learned != self.merged_learned;
        if !(force || services_changed || node_changed) {
            return Ok(false);
        }
        let node = if force || node_changed {
            Arc::new(with_neighbours(
                &self.with_dynamic(&ctrl.node),
                &self.learned,
            ))
        } else {
            Arc::clone(&cur.node)
        };
        self.merged_from = Some(Arc::clone(&ctrl.node));
        self.merged_learned.clone_from(&self.learned);
        let tables = Tables {
            services: Arc::clone(&ctrl.services),
            node,
        };
        self.publisher.publish(tables.clone());
        if let Some(s) = &mut self.steering {
            s.sync(&tables)?;
        }
        if let Some(h) = &mut self.host_veth {
            if force || services_changed || node_changed {
                h.sync_services(&tables);
            }
        }
        Ok(true)
    }

    /// `base` with the interfaces that appeared after start.
    fn with_dynamic(&self, base: &NodeTable) -> NodeTable {
        let mut node = base.clone();
        for i in &self.dynamic {
            if node.interface_by_name(&i.name).is_none() {
                node.add_interface(i.clone());
            }
        }
        node
    }

    /// Follows `--pod-interfaces` at run time: a matching interface that appeared gets a
    /// socket per worker, its steering slot and the program; a served one that matches
    /// and went away (or was replaced: new index) is dropped from the workers and the
    /// steering maps. Interfaces that do not match a pattern, and host and uplink ones,
    /// are fixed.
    fn refresh_interfaces(&mut self) {
        if self.cfg.pod_interfaces.is_empty() || self.port_changes.is_empty() {
            return;
        }
        let links = match kernel_links() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list interfaces");
                return;
            }
        };
        let matches = |name: &str| {
            name != "lo"
                && self.cfg.pod_interfaces.iter().any(|p| glob_match(p, name))
                && self
                    .base_node
                    .interface_by_name(name)
                    .is_none_or(|id| self.base_node.interface(id).kind == IfaceKind::Pod)
        };
        let gone: Vec<usize> = self
            .managed
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                matches(&m.link.name)
                    && !links
                        .iter()
                        .any(|l| l.name == m.link.name && l.ifindex == m.link.ifindex)
            })
            .map(|(i, _)| i)
            .collect();
        let new: Vec<KernelLink> = links
            .iter()
            .filter(|l| {
                matches(&l.name)
                    && !self
                        .managed
                        .iter()
                        .any(|m| m.link.name == l.name && m.link.ifindex == l.ifindex)
            })
            .cloned()
            .collect();
        for i in gone.into_iter().rev() {
            let m = self.managed.remove(i);
            self.remove_interface(&m);
        }
        for link in new {
            if let Err(e) = self.add_interface(&link) {
                tracing::warn!(interface = %link.name, error = %e, "new pod interface not served");
            }
        }
    }

    /// Sends `change` to every worker and waits (bounded) for their answers.
    fn change_ports(&mut self, change: PortChange) -> Vec<(u32, PortChangeResult)> {
        let Some(results) = &self.port_results else {
            return Vec::new();
        };
        let mut sent = 0;
        for tx in &self.port_changes {
            if tx.send(change.clone()).is_ok() {
                sent += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.len() < sent {
            let left = deadline.saturating_duration_since(Instant::now());
            match results.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        out
    }

    fn remove_interface(&mut self, m: &ManagedInterface) {
        if let Some(s) = &mut self.steering {
            s.detach(&m.link.name);
            if let Err(e) = s.remove_interface_slot(m.link.ifindex) {
                tracing::warn!(interface = %m.link.name, error = %e, "steering slot not removed");
            }
        }
        let answers = self.change_ports(PortChange::Remove(m.id));
        tracing::info!(
            interface = %m.link.name,
            workers = answers.len(),
            "pod interface gone: its sockets are closed"
        );
        self.refresh_neighbours();
        if let Err(e) = self.merge(true) {
            tracing::warn!(error = %e, "steering maps not updated");
        }
    }

    fn add_interface(&mut self, link: &KernelLink) -> Result<(), String> {
        let max_queue = *self.cfg.queues.iter().max().unwrap_or(&0);
        if link.rx_queues <= max_queue {
            return Err(format!(
                "{} receive queue(s); queue {max_queue} does not exist",
                link.rx_queues
            ));
        }
        let ctrl = self.control.current();
        // Back after going away: the same id, with the MAC it has now.
        if let Some(i) = self.dynamic.iter_mut().find(|i| i.name == link.name) {
            i.mac = link.mac;
        }
        let id = match self.with_dynamic(&ctrl.node).interface_by_name(&link.name) {
            Some(id) => id,
            None => {
                let n = ctrl.node.interfaces.len() + self.dynamic.len();
                if n >= kxp_dataplane::driver::afxdp::steer::MAX_IFACE_SLOTS as usize {
                    return Err("too many interfaces".into());
                }
                self.dynamic.push(Interface {
                    name: link.name.clone(),
                    kind: IfaceKind::Pod,
                    mac: link.mac,
                });
                IfaceId(n as u8)
            }
        };
        if Steering::clear_stale(&link.name, link.ifindex).map_err(|e| e.to_string())? {
            tracing::warn!(interface = %link.name, "detached a stale kxp XDP program");
        }
        let recompute = match self.cfg.checksum {
            ChecksumMode::Always => true,
            ChecksumMode::Never => false,
            ChecksumMode::Auto => link.kind == "veth",
        };
        let spec = PortSpec {
            iface: id,
            name: link.name.clone(),
            recompute_l4_checksum: recompute,
        };
        let answers = self.change_ports(PortChange::Add(spec));
        let mut sockets = Vec::new();
        let mut failed = None;
        for (queue, res) in answers {
            match res {
                Ok(Some((_, _, fd))) => sockets.push((queue, fd)),
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        let managed = ManagedInterface {
            id,
            link: link.clone(),
            recompute_l4_checksum: recompute,
        };
        if failed.is_some() || sockets.len() != self.port_changes.len() {
            let _ = self.change_ports(PortChange::Remove(id));
            return Err(failed.unwrap_or_else(|| "not every worker answered".into()));
        }
        let steering = self.steering.as_mut().ok_or("steering not loaded")?;
        steering
            .set_interface_slot(link.ifindex, id.0 as u32)
            .map_err(|e| e.to_string())?;
        for (queue, fd) in sockets {
            steering
                .set_socket(id.0 as u32, queue, fd)
                .map_err(|e| e.to_string())?;
        }
        self.managed.push(managed);
        // The workers learn the interface (and its neighbours) before frames arrive on it.
        self.refresh_neighbours();
        self.merge(true).map_err(|e| e.to_string())?;
        let steering = self.steering.as_mut().ok_or("steering not loaded")?;
        if let Err(e) = steering.attach(&link.name, link.ifindex) {
            self.managed.retain(|m| m.id != id);
            let _ = self.change_ports(PortChange::Remove(id));
            return Err(e.to_string());
        }
        tracing::info!(interface = %link.name, id = id.0, "pod interface added: steered to the workers");
        Ok(())
    }

    /// Re-reads the kernel's neighbour table; probes endpoints it cannot reach yet.
    fn refresh_neighbours(&mut self) {
        let names: HashSet<&str> = self.managed.iter().map(|m| m.link.name.as_str()).collect();
        match kernel_neighbours() {
            Ok(all) => {
                let mut mine: Vec<KernelNeighbour> = all
                    .into_iter()
                    .filter(|n| names.contains(n.dev.as_str()))
                    .collect();
                mine.sort();
                if mine != self.learned {
                    tracing::debug!(count = mine.len(), "neighbours changed");
                    self.learned = mine;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the neighbour table"),
        }
        // Endpoints without a next hop: make the kernel resolve them.
        let tables = self.control.current();
        let node = with_neighbours(&self.with_dynamic(&tables.node), &self.learned);
        let now = Instant::now();
        let mut targets: Vec<IpAddr> = tables
            .services
            .service_ports()
            .flat_map(|(_, sp)| sp.endpoints.iter().map(|b| b.addr))
            .filter(|a| node.next_hop(a).is_none() && !node.is_node_address(a))
            .collect();
        targets.sort();
        targets.dedup();
        for ip in targets.into_iter().take(256) {
            let due = self
                .probed
                .get(&ip)
                .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(1));
            if due {
                self.probed.insert(ip, now);
                probe(ip);
            }
        }
        self.probed
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
    }

    /// Runs until `stop` is set or a worker dies; then tears down (also done on drop).
    pub fn wait(&mut self, stop: &AtomicBool) -> Result<(), RunError> {
        let mut last_neigh = Instant::now();
        let mut last_stats = Instant::now();
        let mut no_route_seen = self.no_route_drops();
        let mut result = Ok(());
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
            if let Some(i) = self
                .workers
                .iter()
                .position(|w| w.handle.as_ref().is_none_or(|h| h.is_finished()))
            {
                result = Err(RunError::Worker(i, "stopped unexpectedly".into()));
                break;
            }
            let no_route = self.no_route_drops();
            if last_neigh.elapsed() >= self.cfg.neighbour_refresh || no_route != no_route_seen {
                no_route_seen = no_route;
                last_neigh = Instant::now();
                self.refresh_interfaces();
                self.refresh_neighbours();
            }
            if let Err(e) = self.merge(false) {
                tracing::warn!(error = %e, "steering maps not updated");
            }
            if let Some(every) = self.cfg.stats_interval {
                if last_stats.elapsed() >= every {
                    last_stats = Instant::now();
                    eprint!("{}", self.report());
                }
            }
        }
        self.shutdown();
        result
    }

    fn no_route_drops(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pipeline
                    .dropped(DropReason::NoRoute)
            })
            .sum()
    }

    /// Pipeline and driver counters summed over workers, plus the steering program's.
    pub fn totals(&self) -> (Counters, DriverCounters, Vec<(&'static str, u64)>) {
        let mut c = Counters::default();
        let mut d = DriverCounters::default();
        for s in self.stats.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            c.merge(&s.pipeline);
            d.merge(&s.driver);
        }
        let steer = match &self.steering {
            Some(s) => s
                .stats()
                .map(|v| STAT_NAMES.iter().copied().zip(v).collect())
                .unwrap_or_default(),
            None => self.final_xdp.clone(),
        };
        (c, d, steer)
    }

    /// Non-zero counters, one per line, for logs and the exit summary.
    pub fn report(&self) -> String {
        let (c, d, steer) = self.totals();
        let mut out = String::new();
        let line = |out: &mut String, group: &str, name: &str, v: u64| {
            if v != 0 {
                out.push_str(&format!("  {group}.{name} {v}\n"));
            }
        };
        for (n, v) in c.named() {
            line(&mut out, "pipeline", &n, v);
        }
        for (n, v) in d.named() {
            line(&mut out, "driver", n, v);
        }
        for (n, v) in steer {
            line(&mut out, "xdp", n, v);
        }
        let flows: usize = self
            .stats
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).flows)
            .sum();
        if self.stats.len() > 1 {
            // Per worker, the counters that show how traffic spread and moved between them.
            for (i, s) in self.stats.iter().enumerate() {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                let d = &s.driver;
                for (n, v) in [
                    ("rx_frames", d.rx_frames),
                    ("tx_frames", d.tx_frames),
                    ("handoff_frames", d.handoff_frames),
                    ("handoff_queue_full", d.handoff_queue_full),
                    ("handoff_received", d.handoff_received),
                    ("new_flows", s.pipeline.forwarded(ForwardReason::NewFlow)),
                    ("flows", s.flows as u64),
                ] {
                    out.push_str(&format!("  worker{i}.{n} {v}\n"));
                }
            }
        }
        format!("kxp counters (flows tracked: {flows}):\n{out}")
    }

    /// Detaches XDP, stops the workers (closing their sockets), stops the control plane.
    /// Idempotent.
    pub fn shutdown(&mut self) {
        if let Some(s) = &mut self.steering {
            s.detach_all();
        }
        self.worker_stop.store(true, Ordering::SeqCst);
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
        if let Some(s) = self.steering.take() {
            if let Ok(v) = s.stats() {
                self.final_xdp = STAT_NAMES.iter().copied().zip(v).collect();
            }
        }
        self.host_veth = None;
        if let Some(c) = self.controller.take() {
            let _ = c.stop();
        }
        if let Some(w) = self.watch.take() {
            w.stop();
        }
        if let Some(k) = self.kube.take() {
            k.stop();
        }
        if let Some(o) = self.ops.take() {
            o.stop();
        }
        if self.ready_written {
            if let Some(p) = &self.cfg.ready_file {
                let _ = std::fs::remove_file(p);
            }
            self.ready_written = false;
        }
    }

    /// The interfaces being served.
    pub fn interfaces(&self) -> &[ManagedInterface] {
        &self.managed
    }

    /// The node table without learned neighbours.
    pub fn base_node(&self) -> &NodeTable {
        &self.base_node
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sends an empty UDP datagram to `ip`'s discard port so that the kernel resolves its
/// link-layer address (the datagram itself is answered with a port-unreachable at most).
fn probe(ip: IpAddr) {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    if let Ok(s) = UdpSocket::bind(bind) {
        let _ = s.send_to(&[], SocketAddr::new(ip, 9));
    }
}

/// Warns when the SNAT range overlaps the kernel's ephemeral port range: replies to the
/// node's own connections on those ports would be steered to kxp.
fn check_snat_range(range: (u16, u16)) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if range.0 <= hi && lo <= range.1 {
            tracing::warn!(
                snat = ?range, ephemeral = ?(lo, hi),
                "the SNAT port range overlaps net.ipv4.ip_local_port_range: replies to the \
                 node's own connections on those ports would be steered to kxp and dropped; \
                 choose --snat-ports outside it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth12ab"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("p*-a", "p123-a"));
        assert!(!glob_match("p*-a", "p123-b"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxc"));
    }

    #[test]
    fn neighbours_parse_and_skip_unresolved() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"dst":"10.244.1.2","dev":"p1","lladdr":"0a:58:0a:f4:01:02","state":["STALE"]},
                {"dst":"10.244.1.3","dev":"p2","state":["FAILED"]},
                {"dst":"10.244.1.4","dev":"p2","lladdr":"0a:58:0a:f4:01:04","state":["INCOMPLETE"]},
                {"dst":"fe80::1","dev":"up","lladdr":"02:00:00:00:00:01","router":null,"state":["REACHABLE"]}]"#,
        )
        .unwrap();
        let n = parse_neighbours(&v);
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].ip, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(n[0].mac, [0x0a, 0x58, 0x0a, 0xf4, 1, 2]);
    }

    #[test]
    fn links_parse() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"ifindex":3,"ifname":"up0","address":"02:00:00:00:00:01","num_rx_queues":1,
                 "linkinfo":{"info_kind":"veth"}},
                {"ifindex":1,"ifname":"lo","address":"00:00:00:00:00:00"}]"#,
        )
        .unwrap();
        let l = parse_links(&v);
        assert_eq!(l[0].kind, "veth");
        assert_eq!(l[0].ifindex, 3);
        assert_eq!(l[1].kind, "");
    }

    #[test]
    fn interfaces_resolve_against_the_kernel() {
        let node = crate::node::parse_node(
            "name: n\naddresses: [192.168.50.2]\ninterfaces:\n  - {name: up0, kind: uplink, mac: \"02:00:00:00:00:09\"}\n",
            "node.yaml",
        )
        .unwrap();
        let link = |name: &str, idx, kind: &str| KernelLink {
            name: name.into(),
            ifindex: idx,
            mac: [2, 0, 0, 0, 0, idx as u8],
            kind: kind.into(),
            rx_queues: 1,
        };
        let links = [
            link("up0", 3, "veth"),
            link("pod7", 4, "veth"),
            link("eth9", 5, ""),
        ];
        let (node, managed) =
            resolve_interfaces(node, &links, &["pod*".into()], ChecksumMode::Auto).unwrap();
        assert_eq!(node.interfaces.len(), 2);
        assert_eq!(
            node.interfaces[0].mac,
            [2, 0, 0, 0, 0, 3],
            "kernel MAC wins"
        );
        assert_eq!(node.interfaces[1].kind, IfaceKind::Pod);
        assert!(managed.iter().all(|m| m.recompute_l4_checksum));
        let learned = [KernelNeighbour {
            ip: "10.244.1.7".parse().unwrap(),
            mac: [0xa, 0, 0, 0, 0, 7],
            dev: "pod7".into(),
        }];
        let merged = with_neighbours(&node, &learned);
        let hop = merged.next_hop(&"10.244.1.7".parse().unwrap()).unwrap();
        assert_eq!(hop.iface, IfaceId(1));
        assert_eq!(hop.dst_mac, [0xa, 0, 0, 0, 0, 7]);
    }
}
