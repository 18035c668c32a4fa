//! Golden packet scenarios for kxp, in the style of Katran's `KatranBaseTestFixtures`: a
//! table of cases, each a description, the manifests and node file kxp compiles, and a
//! list of frames with, for every frame, the verdict and reason kxp must give and the exact
//! bytes it must emit (or that it emits nothing).
//!
//! Expected frames are built from scratch ([`packet`]): addresses, ports, TTL, MACs and
//! every checksum are written down as the standards say the forwarded frame must look,
//! never by running kxp's pipeline or its rewrite code. The only kxp code a scenario
//! consults is policy ([`policy`]): which masquerade port and which Maglev backend.
//!
//! [`write_all`] renders every scenario to a directory (`gen-fixtures` does that into
//! `pcap-fixtures/scenarios/`); `control/tests/golden.rs` replays each directory through
//! `kxp replay` and compares frame by frame, and checks that the files on disk are what
//! this crate renders now.

pub mod net;
pub mod packet;
pub mod policy;
mod scenarios;

use core::net::IpAddr;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};

use net::{Iface, Peer};
use packet::{Ip, Packet, L4};

pub use scenarios::all;

/// The etherparse the fixtures are built with, for tests that decode frames.
pub use etherparse;

/// Timestamp of a scenario's first frame (2023-11-14T22:13:20Z); frames follow
/// [`FRAME_SPACING`] apart unless a scenario lets time pass on purpose.
pub const EPOCH: Duration = Duration::from_secs(1_700_000_000);
/// Spacing of frames in a capture.
pub const FRAME_SPACING: Duration = Duration::from_millis(1);

/// The files of a scenario directory, in the order they are written.
pub const SCENARIO_FILES: &[&str] = &[
    "README.md",
    "manifests.yaml",
    "node.yaml",
    "ingress",
    "in.pcap",
    "expected.pcap",
    "expected.jsonl",
];

/// Which interface kxp replay is told a frame arrived on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Ingress {
    /// `--ingress auto`: by the frame's source address.
    #[default]
    Auto,
    /// `--ingress NAME`.
    Named(String),
}

/// What kxp must do with one frame: the report line's fields and the emitted bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The interface the report says the frame arrived on.
    pub ingress: String,
    /// `forward`, `pass`, `drop` or `reject`.
    pub verdict: &'static str,
    /// The verdict's reason, as kxp names it.
    pub reason: &'static str,
    /// Where the emitted frame leaves (forward and reject).
    pub out_interface: Option<String>,
    /// Emitted frame's source and destination, `addr:port` / `[addr]:port`, or the bare
    /// address for ICMP.
    pub src: Option<String>,
    pub dst: Option<String>,
    /// The emitted frame, byte for byte; `None` when nothing is emitted.
    pub output: Option<Vec<u8>>,
}

/// One frame of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub description: String,
    /// Capture timestamp (from [`EPOCH`], normally 1 ms after the previous frame).
    pub timestamp: Duration,
    pub input: Vec<u8>,
    pub ingress: Ingress,
    pub expect: Expect,
}

/// One golden scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Directory name.
    pub name: &'static str,
    /// What the scenario proves (a paragraph of Markdown).
    pub description: String,
    /// Kubernetes manifests (multi-document YAML).
    pub manifests: String,
    /// The node file.
    pub node: String,
    pub frames: Vec<Frame>,
}

impl Scenario {
    /// The `--ingress` value for the whole capture: `auto`, or the one name every frame
    /// uses (kxp replay takes one ingress mode per run).
    pub fn ingress(&self) -> String {
        let mut named = self.frames.iter().map(|f| &f.ingress);
        let first = named.next().cloned().unwrap_or_default();
        assert!(
            named.all(|i| *i == first),
            "scenario {}: frames disagree on the ingress mode",
            self.name
        );
        match first {
            Ingress::Auto => "auto".into(),
            Ingress::Named(n) => n,
        }
    }

    /// The report lines kxp replay must write, as JSON values.
    pub fn expected_report(&self) -> Vec<serde_json::Value> {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let e = &f.expect;
                serde_json::json!({
                    "index": i,
                    "ingress": e.ingress,
                    "verdict": e.verdict,
                    "reason": e.reason,
                    "out_interface": e.out_interface,
                    "src": e.src,
                    "dst": e.dst,
                })
            })
            .collect()
    }

    /// Every file of the scenario directory, rendered.
    pub fn render(&self) -> Vec<(&'static str, Vec<u8>)> {
        let input = pcap(
            self.frames
                .iter()
                .map(|f| (f.timestamp, f.input.as_slice())),
        );
        let expected = pcap(
            self.frames
                .iter()
                .filter_map(|f| f.expect.output.as_deref().map(|o| (f.timestamp, o))),
        );
        let mut jsonl = String::new();
        for line in self.expected_report() {
            jsonl.push_str(&serde_json::to_string(&line).expect("JSON"));
            jsonl.push('\n');
        }
        let files = vec![
            ("README.md", self.readme().into_bytes()),
            ("manifests.yaml", self.manifests.clone().into_bytes()),
            ("node.yaml", self.node.clone().into_bytes()),
            ("ingress", format!("{}\n", self.ingress()).into_bytes()),
            ("in.pcap", input),
            ("expected.pcap", expected),
            ("expected.jsonl", jsonl.into_bytes()),
        ];
        debug_assert!(files.iter().map(|f| f.0).eq(SCENARIO_FILES.iter().copied()));
        files
    }

    fn readme(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {}\n", self.name);
        let _ = writeln!(s, "{}\n", self.description.trim());
        let _ = writeln!(
            s,
            "Generated by `cargo run -p kxp-fixtures --bin gen-fixtures`; do not edit by hand.\n"
        );
        let _ = writeln!(s, "Replay it:\n");
        let _ = writeln!(s, "```sh");
        let _ = writeln!(
            s,
            "d=pcap-fixtures/scenarios/{n}\ncargo run -p kxp-control --bin kxp -- replay --manifests $d/manifests.yaml \\\n  --node $d/node.yaml --in $d/in.pcap --out /tmp/{n}.pcap --report /tmp/{n}.jsonl \\\n  --ingress {i} --explain",
            n = self.name,
            i = self.ingress()
        );
        let _ = writeln!(s, "```\n");
        let _ = writeln!(s, "## Frames\n");
        let _ = writeln!(
            s,
            "| # | t (s) | frame | in | verdict | reason | out | emitted |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        let start = self.frames.first().map_or(EPOCH, |f| f.timestamp);
        for (i, f) in self.frames.iter().enumerate() {
            let t = (f.timestamp - start).as_secs_f64();
            let e = &f.expect;
            let emitted = match (&e.src, &e.dst) {
                (Some(s), Some(d)) => format!("`{s}` > `{d}`"),
                _ => "nothing".into(),
            };
            let _ = writeln!(
                s,
                "| {i} | {t:.3} | {} | {} | {} | `{}` | {} | {emitted} |",
                f.description.replace('|', "\\|"),
                e.ingress,
                e.verdict,
                e.reason,
                e.out_interface.as_deref().unwrap_or("-"),
            );
        }
        s
    }
}

/// Writes a pcap (Ethernet, microsecond timestamps, little-endian) of these frames.
pub fn pcap<'a>(frames: impl IntoIterator<Item = (Duration, &'a [u8])>) -> Vec<u8> {
    let header = PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: 65535,
        datalink: DataLink::ETHERNET,
        ts_resolution: TsResolution::MicroSecond,
        endianness: Endianness::Little,
    };
    let mut w = PcapWriter::with_header(Vec::new(), header).expect("pcap header");
    for (ts, data) in frames {
        w.write_packet(&PcapPacket::new(ts, data.len() as u32, data))
            .expect("pcap packet");
    }
    w.into_writer()
}

/// Writes every scenario to `out/<name>/`, replacing the files of the same names.
pub fn write_all(out: &Path) -> std::io::Result<Vec<&'static str>> {
    let mut names = Vec::new();
    for s in all() {
        let dir = out.join(s.name);
        std::fs::create_dir_all(&dir)?;
        for (file, bytes) in s.render() {
            std::fs::write(dir.join(file), bytes)?;
        }
        names.push(s.name);
    }
    Ok(names)
}

// ---------------------------------------------------------------------------------------
// Building blocks for scenarios: packets as peers send them, and as they must leave.

/// `addr:port`, `[addr]:port`, or the bare address, as kxp's report writes them.
pub fn socket(addr: IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

/// A TCP segment (ports are set by [`send`]).
pub fn tcp(flags: u8, seq: u32, ack: u32, payload: &[u8]) -> L4 {
    let options = if flags & packet::tcp::SYN != 0 {
        // MSS 1460, SACK permitted, window scale 7, padded with NOPs: what Linux offers
        // (minus timestamps).
        vec![2, 4, 0x05, 0xb4, 1, 1, 4, 2, 1, 3, 3, 7]
    } else {
        Vec::new()
    };
    L4::Tcp(packet::Tcp {
        sport: 0,
        dport: 0,
        seq,
        ack,
        flags,
        window: 64240,
        options,
        payload: payload.to_vec(),
    })
}

/// A UDP datagram (ports are set by [`send`]).
pub fn udp(payload: &[u8]) -> L4 {
    L4::Udp {
        sport: 0,
        dport: 0,
        payload: payload.to_vec(),
        no_checksum: false,
    }
}

/// What `from` sends from its own address and `sport` to `dst`, as it arrives at node-a:
/// Ethernet from the peer's (next hop's) MAC to the node interface's, TTL as the peer
/// sends, IPv4 identification `id`, padded to the Ethernet minimum.
pub fn send(from: &Peer, sport: u16, dst: (IpAddr, u16), id: u16, mut l4: L4) -> Packet {
    if l4.ports().is_some() {
        l4.set_ports(sport, dst.1);
    }
    Packet {
        eth_src: from.mac,
        eth_dst: from.iface.mac,
        vlans: Vec::new(),
        ip: Ip::new(from.ip, dst.0, from.ttl, id),
        l4,
        pad_to: 60,
    }
}

/// `input` as a router forwards it to the next hop `to` after NAT to `src` -> `dst`:
/// addresses and ports replaced (checksums recomputed in full by serialising), TTL or hop
/// limit one less, MACs of the egress interface and the next hop, a VLAN tag kept only on
/// the uplink, no Ethernet padding.
pub fn forwarded(input: &Packet, to: &Peer, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Packet {
    let mut p = input.clone();
    p.ip.set_addrs(src.0, dst.0);
    if p.l4.ports().is_some() {
        p.l4.set_ports(src.1, dst.1);
    }
    p.ip.set_ttl(input.ip.ttl() - 1);
    p.eth_src = to.iface.mac;
    p.eth_dst = to.mac;
    if !to.iface.uplink {
        p.vlans.clear();
    }
    p.pad_to = 0;
    p
}

/// The ICMP port unreachable (ICMPv6 destination unreachable, port unreachable) answering
/// `input` that arrived on `ingress`: from the address it was sent to, back to its sender,
/// quoting as much of the offending IP packet as fits in 576 bytes (RFC 1812 §4.3.2.3) or
/// the IPv6 minimum MTU (RFC 4443 §2.4 (c)); TTL 64, IPv4 identification 0 without DF;
/// out of the ingress interface to the sender's MAC, on the same VLAN.
/// The ICMP time exceeded (in transit) the node sends from `from` for `input`, whose TTL
/// or hop limit ran out, out of the ingress interface: the whole packet quoted up to 576
/// (IPv4) or 1280 (IPv6) bytes of answer.
pub fn time_exceeded(input: &Packet, ingress: &Iface, from: IpAddr) -> Packet {
    let mut p = rejected(input, ingress);
    match (&mut p.ip, &mut p.l4, from) {
        (Ip::V4 { src, .. }, L4::Icmp4(t, _), IpAddr::V4(from)) => {
            *src = from;
            *t = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
        }
        (Ip::V6 { src, .. }, L4::Icmp6(t, _), IpAddr::V6(from)) => {
            *src = from;
            *t = Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded);
        }
        _ => panic!("time_exceeded: {from} is not of the input's family"),
    }
    p
}

pub fn rejected(input: &Packet, ingress: &Iface) -> Packet {
    let mut quote = input.ip_bytes();
    let (ip, l4) = match input.ip {
        Ip::V4 { src, dst, .. } => {
            quote.truncate(576 - 20 - 8);
            (
                Ip::V4 {
                    src: dst,
                    dst: src,
                    ttl: 64,
                    id: 0,
                    df: false,
                    mf: false,
                    frag_offset: 0,
                    options: Vec::new(),
                },
                L4::Icmp4(
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                    quote,
                ),
            )
        }
        Ip::V6 { src, dst, .. } => {
            quote.truncate(1280 - 40 - 8);
            (
                Ip::V6 {
                    src: dst,
                    dst: src,
                    hop_limit: 64,
                    flow_label: 0,
                    exts: Vec::new(),
                },
                L4::Icmp6(
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port),
                    quote,
                ),
            )
        }
    };
    Packet {
        eth_src: ingress.mac,
        eth_dst: input.eth_src,
        vlans: input.vlans.clone(),
        ip,
        l4,
        pad_to: 0,
    }
}

fn endpoints(p: &Packet) -> (String, String) {
    let ports = p.l4.ports();
    (
        socket(p.ip.src(), ports.map(|p| p.0)),
        socket(p.ip.dst(), ports.map(|p| p.1)),
    )
}

/// Forwarded out of `out.iface` as `out`.
pub fn expect_forward(reason: &'static str, ingress: &Iface, out: &Packet, to: &Peer) -> Expect {
    let (src, dst) = endpoints(out);
    Expect {
        ingress: ingress.name.into(),
        verdict: "forward",
        reason,
        out_interface: Some(to.iface.name.into()),
        src: Some(src),
        dst: Some(dst),
        output: Some(out.bytes()),
    }
}

/// Answered with `answer` out of the ingress interface.
pub fn expect_reject(reason: &'static str, ingress: &Iface, answer: &Packet) -> Expect {
    let (src, dst) = endpoints(answer);
    Expect {
        ingress: ingress.name.into(),
        verdict: "reject",
        reason,
        out_interface: Some(ingress.name.into()),
        src: Some(src),
        dst: Some(dst),
        output: Some(answer.bytes()),
    }
}

/// Handed to the kernel untouched: nothing emitted.
pub fn expect_pass(reason: &'static str, ingress: &Iface) -> Expect {
    Expect {
        ingress: ingress.name.into(),
        verdict: "pass",
        reason,
        out_interface: None,
        src: None,
        dst: None,
        output: None,
    }
}

/// Dropped: nothing emitted.
pub fn expect_drop(reason: &'static str, ingress: &Iface) -> Expect {
    Expect {
        verdict: "drop",
        ..expect_pass(reason, ingress)
    }
}

/// A readable decoding of a frame (etherparse, lax: truncated frames decode as far as they
/// go), with the packet quoted by an ICMP error decoded too. For test failure messages.
pub fn describe(frame: &[u8]) -> String {
    use etherparse::{LaxPacketHeaders, LaxPayloadSlice};
    let mut s = String::new();
    match LaxPacketHeaders::from_ethernet(frame) {
        Err(e) => {
            let _ = writeln!(s, "  not decodable: {e}");
        }
        Ok(h) => {
            let _ = writeln!(s, "  link: {:?}", h.link);
            for x in &h.link_exts {
                let _ = writeln!(s, "  tag: {x:?}");
            }
            let _ = writeln!(s, "  net: {:?}", h.net);
            let _ = writeln!(s, "  transport: {:?}", h.transport);
            if let Some((e, layer)) = &h.stop_err {
                let _ = writeln!(s, "  stopped at {layer:?}: {e}");
            }
            let quoted = match h.payload {
                LaxPayloadSlice::Icmpv4 { payload, .. }
                | LaxPayloadSlice::Icmpv6 { payload, .. } => Some(payload),
                _ => None,
            };
            match quoted.map(LaxPacketHeaders::from_ip) {
                Some(Ok(q)) => {
                    let _ = writeln!(s, "  quoted net: {:?}", q.net);
                    let _ = writeln!(s, "  quoted transport: {:?}", q.transport);
                }
                Some(Err(e)) => {
                    let _ = writeln!(s, "  quoted: not decodable: {e}");
                }
                None => {
                    let _ = writeln!(s, "  payload: {} bytes", h.payload.slice().len());
                }
            }
        }
    }
    s
}
