//! The conformance harness: a [`Case`] is Kubernetes objects, a node, options and steps;
//! a [`Step`] is a probe (one or many flows of a packet) and what kube-proxy would do with
//! it. Every case runs through the real replay path: the node file parsed by
//! `kxp_control::node`, the manifests by `kxp_control::manifest`, compiled by
//! `kxp_control::compile`, and frames built with etherparse run through one
//! `kxp_dataplane::pipeline::Worker`, ingress chosen as `kxp replay --ingress auto` does.

use core::net::{IpAddr, SocketAddr};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};
use kxp_control::compile::{compile, CompileOptions};
use kxp_control::manifest::parse_manifests;
use kxp_control::node::parse_node;
use kxp_control::replay::with_host_interface;
use kxp_dataplane::driver::replay::{auto_ingress, frame_endpoints};
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig};
use kxp_dataplane::reject::REJECT_SCRATCH_LEN;
use kxp_dataplane::tables::NodeTable;
use kxp_dataplane::verdict::Verdict;

/// The node every case runs on unless it says otherwise.
///
/// ```text
///  external 203.0.113.7 / 2001:db8::7, outsider 198.51.100.9 -- router 192.168.50.1
///                                                                   |
///  node-b 192.168.50.3 (pods 10.244.2.0/24, zone-b) ------------- eth0
///  node-c 192.168.50.4 (pods 10.244.3.0/24, zone-a) -------------  |
///                     node-a 192.168.50.2 / fd00:50::2, zone-a, pods 10.244.1.0/24
///                       veth-pods: 10.244.1.2 (client), 10.244.1.10-15 (endpoints)
///                       host: the node's own stack
/// ```
pub const NODE: &str = r#"name: node-a
addresses: [192.168.50.2, "fd00:50::2"]
clusterCIDRs: [10.244.0.0/16, "fd00:244::/56"]
serviceCIDRs: [10.96.0.0/16, "fd00:96::/112"]
zone: zone-a
interfaces:
  - {name: eth0, kind: uplink, mac: "02:00:00:00:00:01"}
  - {name: veth-pods, kind: pod, mac: "02:00:00:00:01:01"}
  - {name: host, kind: host, mac: "02:00:00:00:00:ff"}
neighbours:
  - {ip: 192.168.50.1, mac: "02:00:00:00:00:fe", interface: eth0}
  - {ip: "fd00:50::1", mac: "02:00:00:00:00:fe", interface: eth0}
  - {ip: 192.168.50.3, mac: "02:00:00:00:00:b3", interface: eth0}
  - {ip: "fd00:50::3", mac: "02:00:00:00:00:b3", interface: eth0}
  - {ip: 192.168.50.4, mac: "02:00:00:00:00:b4", interface: eth0}
  - {ip: "fd00:50::4", mac: "02:00:00:00:00:b4", interface: eth0}
  - {ip: 10.244.1.2, mac: "0a:58:0a:f4:01:02", interface: veth-pods}
  - {ip: 10.244.1.10, mac: "0a:58:0a:f4:01:0a", interface: veth-pods}
  - {ip: 10.244.1.11, mac: "0a:58:0a:f4:01:0b", interface: veth-pods}
  - {ip: 10.244.1.12, mac: "0a:58:0a:f4:01:0c", interface: veth-pods}
  - {ip: 10.244.1.13, mac: "0a:58:0a:f4:01:0d", interface: veth-pods}
  - {ip: "fd00:244:0:1::2", mac: "0a:58:0a:f4:01:02", interface: veth-pods}
  - {ip: "fd00:244:0:1::a", mac: "0a:58:0a:f4:01:0a", interface: veth-pods}
  - {ip: "fd00:244:0:1::b", mac: "0a:58:0a:f4:01:0b", interface: veth-pods}
routes:
  - {dst: 10.244.2.0/24, via: 192.168.50.3}
  - {dst: 10.244.3.0/24, via: 192.168.50.4}
  - {dst: "fd00:244:0:2::/64", via: "fd00:50::3"}
  - {dst: "fd00:244:0:3::/64", via: "fd00:50::4"}
  - {dst: 0.0.0.0/0, via: 192.168.50.1}
  - {dst: "::/0", via: "fd00:50::1"}
"#;

/// [`NODE`] with whole lines replaced (`from` must be a line of it) or, for `from` = "",
/// `to` appended.
pub fn node_with(edits: &[(&str, &str)]) -> String {
    let mut node = NODE.to_string();
    for (from, to) in edits {
        if from.is_empty() {
            node.push_str(to);
            node.push('\n');
        } else {
            let line = format!("{from}\n");
            assert!(node.contains(&line), "base node has no line {from:?}");
            node = node.replace(
                &line,
                &if to.is_empty() {
                    String::new()
                } else {
                    format!("{to}\n")
                },
            );
        }
    }
    node
}

// ---- objects -----------------------------------------------------------------------------

fn meta(m: &str) -> String {
    if m.starts_with('{') {
        m.to_string()
    } else {
        format!("{{name: {m}}}")
    }
}

/// A Service: `m` is a name or a flow mapping of metadata; `spec` a flow mapping.
pub fn svc(m: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {spec}\n---\n",
        meta(m)
    )
}

/// A Service with a status (LoadBalancer ingress).
pub fn svc_status(m: &str, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {spec}\nstatus: {status}\n---\n",
        meta(m)
    )
}

/// An EndpointSlice `name` of Service `service` (same namespace: `name` may be a
/// `namespace/name`), `ports` a flow sequence, `endpoints` flow mappings.
pub fn slice(name: &str, service: &str, family: &str, ports: &str, endpoints: &[String]) -> String {
    let (ns, name) = name.split_once('/').unwrap_or(("default", name));
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: {family}\nports: {ports}\nendpoints:\n"
    );
    if endpoints.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for e in endpoints {
        let _ = writeln!(s, "  - {e}");
    }
    s.push_str("---\n");
    s
}

/// A ready endpoint on `node`.
pub fn ep(addr: &str, node: &str) -> String {
    format!("{{addresses: [\"{addr}\"], nodeName: {node}}}")
}

/// An endpoint on `node` with more fields (`conditions: {...}`, `hints: {...}`, ...).
pub fn ep_with(addr: &str, node: &str, more: &str) -> String {
    format!("{{addresses: [\"{addr}\"], nodeName: {node}, {more}}}")
}

// ---- probes and expectations ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

/// A packet to send: `flows` new flows from source ports `sport`, `sport + 1`, ...
#[derive(Debug, Clone)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub dport: u16,
    /// `None`: chosen as `kxp replay --ingress auto` does; else an interface name.
    pub ingress: Option<&'static str>,
    pub flows: u16,
    pub sport: u16,
}

fn probe(proto: Proto, src: &str, dst: &str, dport: u16) -> Probe {
    Probe {
        src: src.parse().expect("probe source"),
        dst: dst.parse().expect("probe destination"),
        proto,
        dport,
        ingress: None,
        flows: 1,
        // Below the masquerade range (32768-60999), so that a rewritten port shows.
        sport: 20000,
    }
}

pub fn tcp(src: &str, dst: &str, dport: u16) -> Probe {
    probe(Proto::Tcp, src, dst, dport)
}

pub fn udp(src: &str, dst: &str, dport: u16) -> Probe {
    probe(Proto::Udp, src, dst, dport)
}

pub fn sctp(src: &str, dst: &str, dport: u16) -> Probe {
    probe(Proto::Sctp, src, dst, dport)
}

impl Probe {
    /// Sends `n` new flows (source ports `sport..sport + n`).
    pub fn flows(mut self, n: u16) -> Self {
        self.flows = n;
        self
    }

    /// Arrives on this interface instead of the automatic choice.
    pub fn via(mut self, iface: &'static str) -> Self {
        self.ingress = Some(iface);
        self
    }

    pub fn source_port(mut self, sport: u16) -> Self {
        self.sport = sport;
        self
    }
}

#[derive(Debug, Clone)]
pub enum Expect {
    /// Forwarded as a new flow to one of `backends`; masqueraded to the node's address or
    /// with the client's source kept.
    Forward {
        backends: Vec<SocketAddr>,
        masquerade: bool,
        /// Every backend gets at least one of the flows.
        every_backend: bool,
        /// Every flow goes to one backend (and to the one of the case's previous sticky
        /// step, if any).
        sticky: bool,
    },
    /// The client is no longer held: a flow that Maglev alone sends elsewhere than where
    /// the client was pinned goes there (the case's previous sticky step pinned it).
    Released {
        backends: Vec<SocketAddr>,
    },
    Reject(&'static str),
    Drop(&'static str),
    Pass(&'static str),
}

/// Forwarded to one of these `addr:port`s, client source kept (see the modifiers).
pub fn to(backends: &[&str]) -> Expect {
    Expect::Forward {
        backends: backends
            .iter()
            .map(|b| b.parse().unwrap_or_else(|_| panic!("backend {b}")))
            .collect(),
        masquerade: false,
        every_backend: false,
        sticky: false,
    }
}

pub fn released(backends: &[&str]) -> Expect {
    match to(backends) {
        Expect::Forward { backends, .. } => Expect::Released { backends },
        _ => unreachable!(),
    }
}

pub fn reject(reason: &'static str) -> Expect {
    Expect::Reject(reason)
}

pub fn drop(reason: &'static str) -> Expect {
    Expect::Drop(reason)
}

pub fn pass(reason: &'static str) -> Expect {
    Expect::Pass(reason)
}

impl Expect {
    fn forward_mut(&mut self) -> (&mut bool, &mut bool, &mut bool) {
        match self {
            Expect::Forward {
                masquerade,
                every_backend,
                sticky,
                ..
            } => (masquerade, every_backend, sticky),
            other => panic!("not a forward expectation: {other:?}"),
        }
    }

    /// The source is rewritten to the node's address (and a masquerade port).
    pub fn masqueraded(mut self) -> Self {
        *self.forward_mut().0 = true;
        self
    }

    /// Every listed backend is used by some flow.
    pub fn spread(mut self) -> Self {
        *self.forward_mut().1 = true;
        self
    }

    /// All flows go to a single backend.
    pub fn sticky(mut self) -> Self {
        *self.forward_mut().2 = true;
        self
    }
}

/// One probe at one moment, after an optional change of the objects.
#[derive(Debug, Clone)]
pub struct Step {
    /// Recompile with these objects first (previous table as `previous`, as the controller
    /// does; the worker is told the tables changed).
    pub objects: Option<String>,
    /// Seconds since the case started.
    pub at_secs: u64,
    pub probe: Probe,
    pub expect: Expect,
}

/// A conformance case. Build with [`case`].
#[derive(Debug, Clone)]
pub struct Case {
    /// One line, as the behaviour would be written in a spec.
    pub spec: &'static str,
    pub objects: String,
    pub node: String,
    pub masquerade_all: bool,
    pub proxy_name: Option<&'static str>,
    /// Each must be part of some configuration error, and every error must contain one.
    pub errors: Vec<&'static str>,
    pub steps: Vec<Step>,
    now_secs: u64,
    pending_objects: Option<String>,
}

pub fn case(spec: &'static str) -> Case {
    Case {
        spec,
        objects: String::new(),
        node: NODE.to_string(),
        masquerade_all: false,
        proxy_name: None,
        errors: Vec::new(),
        steps: Vec::new(),
        now_secs: 0,
        pending_objects: None,
    }
}

impl Case {
    pub fn objects(mut self, yaml: impl Into<String>) -> Self {
        self.objects = yaml.into();
        self
    }

    pub fn node(mut self, yaml: impl Into<String>) -> Self {
        self.node = yaml.into();
        self
    }

    pub fn masquerade_all(mut self) -> Self {
        self.masquerade_all = true;
        self
    }

    pub fn proxy_name(mut self, name: &'static str) -> Self {
        self.proxy_name = Some(name);
        self
    }

    pub fn errors(mut self, errors: &[&'static str]) -> Self {
        self.errors = errors.to_vec();
        self
    }

    /// Lets time pass before the next step.
    pub fn after(mut self, secs: u64) -> Self {
        self.now_secs += secs;
        self
    }

    /// Replaces the objects before the next step.
    pub fn update(mut self, yaml: impl Into<String>) -> Self {
        self.pending_objects = Some(yaml.into());
        self
    }

    pub fn send(mut self, probe: Probe, expect: Expect) -> Self {
        self.steps.push(Step {
            objects: self.pending_objects.take(),
            at_secs: self.now_secs,
            probe,
            expect,
        });
        self
    }
}

// ---- running -------------------------------------------------------------------------------

const START_NS: u64 = 1_700_000_000 * 1_000_000_000;
const SNAT_RANGE: core::ops::RangeInclusive<u16> = 32768..=60999;

struct Run<'c> {
    case: &'c Case,
    node: Arc<NodeTable>,
    tables: Tables,
    worker: Worker,
    scratch: Vec<u8>,
    pinned: Option<SocketAddr>,
}

/// What became of one flow's first packet.
#[derive(Debug)]
struct Outcome {
    verdict: Verdict,
    /// Forwarded: (source, destination) as emitted.
    emitted: Option<(SocketAddr, SocketAddr)>,
}

fn compile_tables(
    case: &Case,
    objects: &str,
    node: &Arc<NodeTable>,
    previous: Option<&kxp_dataplane::tables::ServiceTable>,
) -> Result<Tables, String> {
    let set = parse_manifests(objects, "case.yaml");
    let opts = CompileOptions {
        proxy_name: case.proxy_name.map(String::from),
        ..CompileOptions::default()
    };
    let compiled = compile(&set, node, &opts, previous);
    let errors: Vec<String> = set
        .errors
        .iter()
        .chain(&compiled.errors)
        .map(|e| e.to_string())
        .collect();
    let mut problems = Vec::new();
    for want in &case.errors {
        if !errors.iter().any(|e| e.contains(want)) {
            problems.push(format!(
                "expected a configuration error containing {want:?}"
            ));
        }
    }
    for e in &errors {
        if !case.errors.iter().any(|w| e.contains(w)) {
            problems.push(format!("unexpected configuration error: {e}"));
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "{}\n    (errors were: {errors:?})",
            problems.join("\n    ")
        ));
    }
    Ok(Tables {
        services: Arc::new(compiled.table),
        node: Arc::clone(node),
    })
}

/// Runs a case; `Err` says what differed from kube-proxy's behaviour.
pub fn run_case(case: &Case) -> Result<(), String> {
    let node = parse_node(&case.node, "node.yaml").map_err(|e| format!("node file: {e}"))?;
    let node = Arc::new(with_host_interface(node));
    let tables = compile_tables(case, &case.objects, &node, None)?;
    let worker = Worker::new(WorkerConfig {
        masquerade_all: case.masquerade_all,
        ..WorkerConfig::default()
    });
    let mut run = Run {
        case,
        node,
        tables,
        worker,
        scratch: vec![0u8; REJECT_SCRATCH_LEN],
        pinned: None,
    };
    for (i, step) in case.steps.iter().enumerate() {
        run.step(step).map_err(|e| {
            format!(
                "step {} ({:?} at {}s): {e}",
                i + 1,
                step.probe,
                step.at_secs
            )
        })?;
    }
    Ok(())
}

impl Run<'_> {
    fn step(&mut self, step: &Step) -> Result<(), String> {
        if let Some(objects) = &step.objects {
            let tables =
                compile_tables(self.case, objects, &self.node, Some(&self.tables.services))?;
            self.tables = tables;
            self.worker.tables_changed();
            while self.worker.revalidate_step(&self.tables) {}
        }
        let now = START_NS + step.at_secs * 1_000_000_000;
        let p = &step.probe;
        match &step.expect {
            Expect::Released { backends } => {
                let pinned = self
                    .pinned
                    .ok_or("no earlier sticky step pinned the client")?;
                // A source port Maglev alone sends elsewhere (asked of a worker that has
                // never seen this client).
                let mut found = None;
                for sport in p.sport..p.sport.saturating_add(512) {
                    let mut fresh = Worker::new(self.worker.config().clone());
                    let o = send(
                        &mut fresh,
                        &self.tables,
                        &self.node,
                        p,
                        sport,
                        now,
                        &mut self.scratch,
                    )?;
                    if let Some((_, dst)) = o.emitted {
                        if dst != pinned {
                            found = Some((sport, dst));
                            break;
                        }
                    }
                }
                let (sport, fresh_choice) =
                    found.ok_or("Maglev never picks another backend for this client")?;
                if !backends.contains(&fresh_choice) {
                    return Err(format!(
                        "Maglev alone picks {fresh_choice}, not in {backends:?}"
                    ));
                }
                let o = send(
                    &mut self.worker,
                    &self.tables,
                    &self.node,
                    p,
                    sport,
                    now,
                    &mut self.scratch,
                )?;
                match o.emitted {
                    Some((_, dst)) if dst == fresh_choice => {
                        self.pinned = Some(dst);
                        Ok(())
                    }
                    Some((_, dst)) => Err(format!(
                        "still held: went to {dst} (pinned {pinned}); Maglev alone picks {fresh_choice}"
                    )),
                    None => Err(format!("not forwarded: {:?}", o.verdict)),
                }
            }
            expect => {
                let mut outcomes = Vec::with_capacity(p.flows as usize);
                for i in 0..p.flows {
                    let t = now + u64::from(i) * 1_000_000;
                    outcomes.push(send(
                        &mut self.worker,
                        &self.tables,
                        &self.node,
                        p,
                        p.sport + i,
                        t,
                        &mut self.scratch,
                    )?);
                }
                self.check(p, expect, &outcomes)
            }
        }
    }

    fn check(&mut self, p: &Probe, expect: &Expect, outcomes: &[Outcome]) -> Result<(), String> {
        let want_kind = |kind: &str, reason: &str| -> Result<(), String> {
            for (i, o) in outcomes.iter().enumerate() {
                if o.verdict.kind_str() != kind || o.verdict.reason_str() != reason {
                    return Err(format!(
                        "flow {i}: {} {}, expected {kind} {reason}",
                        o.verdict.kind_str(),
                        o.verdict.reason_str()
                    ));
                }
            }
            Ok(())
        };
        match expect {
            Expect::Reject(reason) => want_kind("reject", reason),
            Expect::Drop(reason) => want_kind("drop", reason),
            Expect::Pass(reason) => want_kind("pass", reason),
            Expect::Released { .. } => unreachable!(),
            Expect::Forward {
                backends,
                masquerade,
                every_backend,
                sticky,
            } => {
                want_kind("forward", "new_flow")?;
                let node_addr = self
                    .node
                    .masquerade_address(&p.src)
                    .map(|(_, a)| a)
                    .ok_or("node has no address of the family")?;
                let mut used = BTreeSet::new();
                for (i, o) in outcomes.iter().enumerate() {
                    let (src, dst) = o.emitted.ok_or("forward without an emitted frame")?;
                    if !backends.contains(&dst) {
                        return Err(format!("flow {i}: went to {dst}, allowed {backends:?}"));
                    }
                    used.insert(dst);
                    let sport = p.sport + i as u16;
                    if *masquerade {
                        if src.ip() != node_addr || !SNAT_RANGE.contains(&src.port()) {
                            return Err(format!(
                                "flow {i}: source {src}, expected masquerade to {node_addr}:<32768-60999>"
                            ));
                        }
                    } else if src != SocketAddr::new(p.src, sport) {
                        return Err(format!(
                            "flow {i}: source {src}, expected the client's {} kept",
                            SocketAddr::new(p.src, sport)
                        ));
                    }
                }
                if *every_backend && used.len() != backends.len() {
                    return Err(format!(
                        "{} flows used only {used:?} of {backends:?}",
                        outcomes.len()
                    ));
                }
                if *sticky {
                    if used.len() != 1 {
                        return Err(format!("not sticky: flows of one client went to {used:?}"));
                    }
                    let chosen = *used.iter().next().expect("one");
                    if let Some(pinned) = self.pinned {
                        if pinned != chosen {
                            return Err(format!(
                                "moved from {pinned} to {chosen} while held by affinity"
                            ));
                        }
                    }
                    self.pinned = Some(chosen);
                }
                Ok(())
            }
        }
    }
}

/// Builds the probe's frame for source port `sport`, runs it through `worker`, and checks
/// what it emits (checksums of forwarded frames, the shape of rejects).
fn send(
    worker: &mut Worker,
    tables: &Tables,
    node: &NodeTable,
    p: &Probe,
    sport: u16,
    now_ns: u64,
    scratch: &mut [u8],
) -> Result<Outcome, String> {
    let mut frame = build_frame(p, sport);
    let ingress = match p.ingress {
        Some(name) => node
            .interface_by_name(name)
            .ok_or_else(|| format!("no interface {name}"))?,
        None => auto_ingress(node, &frame).ok_or("no ingress interface")?,
    };
    let verdict = worker.process(tables, &mut frame, ingress, now_ns, scratch);
    let emitted = match verdict {
        Verdict::Forward { start, len, .. } => {
            let out = &frame[start..start + len];
            check_forwarded(out)?;
            let e = frame_endpoints(out).ok_or("emitted frame does not parse")?;
            let (sp, dp) = e.ports.ok_or("emitted frame has no ports")?;
            Some((SocketAddr::new(e.src, sp), SocketAddr::new(e.dst, dp)))
        }
        Verdict::Reject { len, .. } => {
            check_reject(&scratch[..len], p)?;
            None
        }
        _ => None,
    };
    Ok(Outcome { verdict, emitted })
}

fn build_frame(p: &Probe, sport: u16) -> Vec<u8> {
    let src_mac = [0x0a, 0x58, 0, 0, 0, 0x01];
    let dst_mac = [0x02, 0, 0, 0, 0, 0x01];
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let ip = match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("probe mixes address families"),
    };
    let mut out = Vec::new();
    match p.proto {
        Proto::Tcp => ip
            .tcp(sport, p.dport, 1000, 64240)
            .syn()
            .write(&mut out, &[])
            .expect("tcp frame"),
        Proto::Udp => ip
            .udp(sport, p.dport)
            .write(&mut out, b"conformance")
            .expect("udp frame"),
        Proto::Sctp => {
            // Common header, then an INIT chunk; CRC32c over the whole packet.
            let mut sctp = Vec::new();
            sctp.extend_from_slice(&sport.to_be_bytes());
            sctp.extend_from_slice(&p.dport.to_be_bytes());
            sctp.extend_from_slice(&[0; 8]);
            sctp.extend_from_slice(&[1, 0, 0, 20]);
            sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
            sctp.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
            sctp.extend_from_slice(&[0, 10, 0, 10]); // streams
            sctp.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
            let crc = crc32c(&sctp);
            sctp[8..12].copy_from_slice(&crc.to_le_bytes());
            ip.write(&mut out, IpNumber::SCTP, &sctp)
                .expect("sctp frame");
        }
    }
    out
}

/// CRC32c (Castagnoli, reflected), bit by bit: independent of kxp's table-driven one.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A forwarded frame must still be a valid packet: IPv4 header checksum and transport
/// checksum (TCP, UDP) or CRC32c (SCTP) over the rewritten addresses and ports.
fn check_forwarded(frame: &[u8]) -> Result<(), String> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| format!("emitted: {e}"))?;
    let (src, dst): (IpAddr, IpAddr) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            if h.calc_header_checksum() != h.header_checksum {
                return Err("emitted IPv4 header checksum is wrong".into());
            }
            (h.source.into(), h.destination.into())
        }
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return Err("emitted frame is not IP".into()),
    };
    let payload = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => ip.payload().payload,
        Some(NetSlice::Ipv6(ip)) => ip.payload().payload,
        _ => unreachable!(),
    };
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let want = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.calc_checksum_ipv4_raw(s.octets(), d.octets(), t.payload())
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.calc_checksum_ipv6_raw(s.octets(), d.octets(), t.payload())
                }
                _ => unreachable!(),
            }
            .map_err(|e| e.to_string())?;
            if want != h.checksum {
                return Err("emitted TCP checksum is wrong".into());
            }
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            let want = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.calc_checksum_ipv4_raw(s.octets(), d.octets(), u.payload())
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.calc_checksum_ipv6_raw(s.octets(), d.octets(), u.payload())
                }
                _ => unreachable!(),
            }
            .map_err(|e| e.to_string())?;
            if h.checksum != 0 && want != h.checksum {
                return Err("emitted UDP checksum is wrong".into());
            }
        }
        _ => {
            // SCTP (etherparse does not slice it): the CRC32c over the packet with the
            // checksum field zeroed.
            if payload.len() < 12 {
                return Err("emitted SCTP packet too short".into());
            }
            let mut copy = payload.to_vec();
            let got = u32::from_le_bytes([copy[8], copy[9], copy[10], copy[11]]);
            copy[8..12].fill(0);
            if crc32c(&copy) != got {
                return Err("emitted SCTP CRC32c is wrong".into());
            }
        }
    }
    Ok(())
}

/// A reject is an ICMP(v6) port unreachable from the address the probe was sent to, to the
/// probe's sender.
fn check_reject(answer: &[u8], p: &Probe) -> Result<(), String> {
    let sliced = SlicedPacket::from_ethernet(answer).map_err(|e| format!("reject: {e}"))?;
    let (src, dst): (IpAddr, IpAddr) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return Err("reject is not IP".into()),
    };
    if src != p.dst || dst != p.src {
        return Err(format!(
            "reject from {src} to {dst}, expected {} to {}",
            p.dst, p.src
        ));
    }
    let port_unreachable = match &sliced.transport {
        Some(TransportSlice::Icmpv4(i)) => matches!(
            i.icmp_type(),
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
        ),
        Some(TransportSlice::Icmpv6(i)) => matches!(
            i.icmp_type(),
            Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port)
        ),
        _ => false,
    };
    if !port_unreachable {
        return Err("reject is not an ICMP port unreachable".into());
    }
    Ok(())
}
