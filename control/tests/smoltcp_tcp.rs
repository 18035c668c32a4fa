//! Real TCP conversations through kxp's pipeline, unprivileged and in memory.
//!
//! smoltcp stacks (a client and three pods, each with its own MAC and IP behind its own
//! node interface) talk to a ClusterIP Service through `MemoryDriver`: every frame a stack
//! transmits enters the pipeline on that stack's interface, every frame the pipeline emits
//! on an interface is delivered to the stack behind it. The harness plays the node kernel
//! for what the pipeline passes: it answers ARP requests and IPv6 Neighbour Solicitations
//! with the MAC of the interface they came in on (proxy ARP / proxy NDP, as CNIs do on pod
//! veths), so the stacks' gateway and their on-link peers resolve to the node.
//!
//! Everything is deterministic: ChaCha-seeded streams and stack seeds, a simulated clock
//! (`smoltcp::time::Instant`, the same instant passed as `now_ns` to the pipeline), no
//! threads, no sleeps. Every loop is bounded. The wall time is measured and printed only.
//!
//! What is checked, independently of kxp's code (etherparse for the layout, our own
//! ones'-complement sums for the checksums):
//! * every frame the pipeline emits has a valid IPv4 header checksum and a valid TCP
//!   checksum, the MACs of the interface and the stack behind it, and the addresses/ports
//!   the NAT must produce (DNAT to pod:8080 one way, reverse NAT to ClusterIP:80 the other);
//! * every byte arrives intact in both directions (compared with the seeded streams);
//! * every connection ends with an orderly close on both sides (Closed / TimeWait);
//! * the connections spread over the three pods;
//! * the worker dropped nothing and rejected nothing, and passed only ARP / NDP;
//! * conntrack tracked every flow, to the pod that served it, and saw it to TIME_WAIT.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use kxp_control::compile::{compile, CompileOptions};
use kxp_control::manifest::parse_manifests;
use kxp_control::node::parse_node;
use kxp_dataplane::conntrack::{ConntrackConfig, TcpState};
use kxp_dataplane::driver::memory::MemoryDriver;
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig};
use kxp_dataplane::tables::IfaceId;
use kxp_dataplane::verdict::{ForwardReason, PassReason, Verdict};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

const NODE: &str = r#"
name: node-a
addresses: [192.168.50.2, "fd00:50::2"]
clusterCIDRs: [10.244.0.0/16, "fd00:244::/56"]
serviceCIDRs: [10.96.0.0/16, "fd00:96::/112"]
interfaces:
  - {name: eth0, kind: uplink, mac: "02:00:00:00:00:01"}
  - {name: veth-client, kind: pod, mac: "02:00:00:00:01:01"}
  - {name: veth-a, kind: pod, mac: "02:00:00:00:01:02"}
  - {name: veth-b, kind: pod, mac: "02:00:00:00:01:03"}
  - {name: veth-c, kind: pod, mac: "02:00:00:00:01:04"}
neighbours:
  - {ip: 10.244.1.10, mac: "0a:58:0a:f4:01:0a", interface: veth-client}
  - {ip: 10.244.1.11, mac: "0a:58:0a:f4:01:0b", interface: veth-a}
  - {ip: 10.244.1.12, mac: "0a:58:0a:f4:01:0c", interface: veth-b}
  - {ip: 10.244.1.13, mac: "0a:58:0a:f4:01:0d", interface: veth-c}
  - {ip: "fd00:244::10", mac: "0a:58:0a:f4:01:0a", interface: veth-client}
  - {ip: "fd00:244::11", mac: "0a:58:0a:f4:01:0b", interface: veth-a}
  - {ip: "fd00:244::12", mac: "0a:58:0a:f4:01:0c", interface: veth-b}
  - {ip: "fd00:244::13", mac: "0a:58:0a:f4:01:0d", interface: veth-c}
  - {ip: 192.168.50.1, mac: "02:00:00:00:00:fe", interface: eth0}
  - {ip: 192.168.50.5, mac: "02:00:00:00:05:05", interface: eth0}
  - {ip: "fd00:50::1", mac: "02:00:00:00:00:fe", interface: eth0}
routes:
  - {dst: 0.0.0.0/0, via: 192.168.50.1}
  - {dst: "::/0", via: "fd00:50::1"}
"#;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  type: ClusterIP
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v4
  namespace: default
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.11], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.1.12], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.1.13], nodeName: node-a, conditions: {ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v6
  namespace: default
  labels: {kubernetes.io/service-name: echo}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: ["fd00:244::11"], nodeName: node-a, conditions: {ready: true}}
  - {addresses: ["fd00:244::12"], nodeName: node-a, conditions: {ready: true}}
  - {addresses: ["fd00:244::13"], nodeName: node-a, conditions: {ready: true}}
"#;

const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const FIRST_CLIENT_PORT: u16 = 20000;
/// Ethernet MTU of every stack (smoltcp counts the 14-byte Ethernet header).
const ETH_MTU: usize = 1514;
const SOCKET_BUFFER: usize = 64 * 1024;
/// Simulated time per harness iteration while frames are moving.
const STEP: Duration = Duration::from_micros(100);
const MAX_ITERATIONS: u64 = 200_000;
const MAX_SIM_SECS: i64 = 600;

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

// ---------------------------------------------------------------------------------------
// Checksums, our own (not kxp's): ones'-complement sums of big-endian 16-bit words.

fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn addr_octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 793 / RFC 8200 §8.1).
fn pseudo_sum(src: &IpAddr, dst: &IpAddr, proto: u8, len: usize) -> u64 {
    let mut acc = sum_words(&addr_octets(src), 0);
    acc = sum_words(&addr_octets(dst), acc);
    acc + u64::from(proto) + len as u64
}

// ---------------------------------------------------------------------------------------
// Seeded byte streams.

const BLOCK: usize = 4096;

/// A deterministic byte stream: an optional prefix, then ChaCha8 output, `len` bytes in
/// all. The RNG is always drawn in whole blocks, so the bytes do not depend on how the
/// stream is cut into reads and writes.
struct Stream {
    rng: ChaCha8Rng,
    block: Box<[u8; BLOCK]>,
    at: usize,
    prefix: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Stream {
    fn new(seed: u64, prefix: &[u8], len: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            block: Box::new([0; BLOCK]),
            at: BLOCK,
            prefix: prefix.to_vec(),
            offset: 0,
            len,
        }
    }

    fn remaining(&self) -> usize {
        self.len - self.offset
    }

    /// The next up to `max` bytes of the stream (at least one while any remain).
    fn take(&mut self, max: usize) -> &[u8] {
        let max = max.min(self.remaining());
        if self.offset < self.prefix.len() {
            let start = self.offset;
            let n = max.min(self.prefix.len() - start);
            self.offset += n;
            return &self.prefix[start..start + n];
        }
        if self.at == BLOCK {
            self.rng.fill_bytes(&mut self.block[..]);
            self.at = 0;
        }
        let start = self.at;
        let n = max.min(BLOCK - start);
        self.at += n;
        self.offset += n;
        &self.block[start..start + n]
    }

    /// Fills `out` with the next bytes; returns how many.
    fn produce(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() && self.remaining() > 0 {
            let chunk = self.take(out.len() - n);
            let k = chunk.len();
            out[n..n + k].copy_from_slice(chunk);
            n += k;
        }
        n
    }

    /// Checks that `data` is what comes next.
    fn verify(&mut self, data: &[u8]) -> Result<(), String> {
        if data.len() > self.remaining() {
            return Err(format!(
                "{} bytes past the end of the {}-byte stream",
                data.len() - self.remaining(),
                self.len
            ));
        }
        let mut n = 0;
        while n < data.len() {
            let at = self.offset;
            let expected = self.take(data.len() - n);
            let k = expected.len();
            if let Some(i) = (0..k).find(|&i| expected[i] != data[n + i]) {
                return Err(format!("byte {} differs from the seeded stream", at + i));
            }
            n += k;
        }
        Ok(())
    }
}

fn stream_seed(run_seed: u64, id: u16, dir: u64) -> u64 {
    run_seed ^ (u64::from(id) << 16) ^ (dir << 40) ^ 0x5eed_0000_0000_0000
}

// ---------------------------------------------------------------------------------------
// A smoltcp stack on a queue-backed Ethernet device.

#[derive(Default)]
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ETH_MTU;
        // Default checksum capabilities: smoltcp computes and verifies in software.
        caps
    }
}

struct Host {
    name: &'static str,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    /// The node interface this stack hangs off.
    port: IfaceId,
    mac: [u8; 6],
    ip: IpAddr,
}

impl Host {
    fn new(
        name: &'static str,
        port: IfaceId,
        mac: [u8; 6],
        cidr: (IpAddr, u8),
        gateway: IpAddr,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut dev = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut dev, now);
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::from(cidr.0), cidr.1))
                .unwrap();
        });
        match gateway {
            IpAddr::V4(g) => iface.routes_mut().add_default_ipv4_route(g).unwrap(),
            IpAddr::V6(g) => iface.routes_mut().add_default_ipv6_route(g).unwrap(),
        };
        Self {
            name,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            port,
            mac,
            ip: cidr.0,
        }
    }

    /// Whether any socket may have changed state (any frame was received or sent).
    fn poll(&mut self, now: Instant) -> bool {
        self.iface.poll(now, &mut self.dev, &mut self.sockets) != PollResult::None
    }
}

fn tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    )
}

// ---------------------------------------------------------------------------------------
// Connection ends.

/// One end of a conversation: sends `tx`, checks what it receives against `rx`, closes
/// once everything is sent.
struct End {
    tx: Stream,
    rx: Stream,
    /// Close only once everything sent is acknowledged (a bare FIN) instead of as soon as
    /// the last byte is queued (FIN on the last data segment). See `Scenario::loss`.
    close_after_drain: bool,
    close_called: bool,
    eof: bool,
}

impl End {
    /// Moves data between the socket and the streams; an error is a test failure.
    fn pump(&mut self, s: &mut tcp::Socket<'_>) -> Result<(), String> {
        for _ in 0..4 {
            if !s.can_recv() {
                break;
            }
            let rx = &mut self.rx;
            match s.recv(|buf| (buf.len(), rx.verify(buf))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("received data: {e}")),
                Err(e) => return Err(format!("recv: {e:?}")),
            }
        }
        if !s.can_recv() && !s.may_recv() && !self.eof {
            match s.recv(|_| (0, ())) {
                Err(tcp::RecvError::Finished) => self.eof = true,
                _ if s.state() == tcp::State::Closed => {
                    return Err(format!(
                        "closed without a FIN from the peer ({} of {} bytes received)",
                        self.rx.offset, self.rx.len
                    ))
                }
                _ => {}
            }
        }
        for _ in 0..4 {
            if !s.can_send() || self.tx.remaining() == 0 {
                break;
            }
            let tx = &mut self.tx;
            if let Err(e) = s.send(|buf| (tx.produce(buf), ())) {
                return Err(format!("send: {e:?}"));
            }
        }
        if self.tx.remaining() == 0
            && !self.close_called
            && s.may_send()
            && (!self.close_after_drain || s.send_queue() == 0)
        {
            s.close();
            self.close_called = true;
        }
        if s.state() == tcp::State::Closed && !self.done(s) {
            return Err(format!(
                "socket closed early: sent {}/{}, received {}/{}, eof {}",
                self.tx.offset, self.tx.len, self.rx.offset, self.rx.len, self.eof
            ));
        }
        Ok(())
    }

    /// Everything sent and received, both FINs exchanged, socket in Closed or TimeWait.
    fn done(&self, s: &tcp::Socket<'_>) -> bool {
        self.close_called
            && self.eof
            && self.tx.remaining() == 0
            && self.rx.remaining() == 0
            && s.send_queue() == 0
            && matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait)
    }
}

struct ClientConn {
    handle: SocketHandle,
    port: u16,
    end: End,
}

/// A pod's side of a connection; its streams are known once the client's 2-byte id (the
/// client's port) has arrived, so that masquerade does not hide which client it is.
struct ServerConn {
    handle: SocketHandle,
    remote: IpEndpoint,
    id: [u8; 2],
    id_len: usize,
    end: Option<End>,
}

struct Pod {
    host: Host,
    /// Listening sockets, in socket-slot order. Every listener's slot is above every
    /// connection's slot (finished connections leave a tombstone in theirs), so that
    /// smoltcp, which hands a segment to the first socket that accepts it, gives a
    /// retransmitted SYN to its half-open connection and not to a fresh listener.
    listeners: VecDeque<SocketHandle>,
    conns: Vec<ServerConn>,
}

// ---------------------------------------------------------------------------------------
// Frame checks, independent of kxp (etherparse for the layout, our own checksums).

#[derive(Debug, Clone, Copy)]
struct TcpSeen {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    /// IPv4 TTL or IPv6 hop limit.
    ttl: u8,
    syn: bool,
    fin: bool,
    rst: bool,
    payload: usize,
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
}

fn inspect_tcp(frame: &[u8]) -> Result<TcpSeen, String> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| format!("etherparse: {e}"))?;
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return Err("no Ethernet II header".into());
    };
    if !p.link_exts.is_empty() {
        return Err("VLAN tag left on the frame".into());
    }
    let (src, dst, ttl, l4) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            if fold(sum_words(h.slice(), 0)) != 0xffff {
                return Err(format!(
                    "bad IPv4 header checksum {:#06x}",
                    u16::from_be_bytes([h.slice()[10], h.slice()[11]])
                ));
            }
            if usize::from(h.total_len()) + 14 != frame.len() {
                return Err(format!(
                    "IPv4 total length {} in a {}-byte frame",
                    h.total_len(),
                    frame.len()
                ));
            }
            if h.protocol() != etherparse::IpNumber::TCP {
                return Err(format!("IPv4 protocol {:?}", h.protocol()));
            }
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                h.ttl(),
                ip.payload().payload,
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            if !ip.extensions().is_empty() || h.next_header() != etherparse::IpNumber::TCP {
                return Err("IPv6 packet that is not plain TCP".into());
            }
            if usize::from(h.payload_length()) + 40 + 14 != frame.len() {
                return Err(format!(
                    "IPv6 payload length {} in a {}-byte frame",
                    h.payload_length(),
                    frame.len()
                ));
            }
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                h.hop_limit(),
                ip.payload().payload,
            )
        }
        _ => return Err("not IPv4/IPv6".into()),
    };
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        return Err("not TCP".into());
    };
    if t.slice().len() != l4.len() {
        return Err("TCP segment length differs from the IP payload length".into());
    }
    if fold(sum_words(l4, pseudo_sum(&src, &dst, 6, l4.len()))) != 0xffff {
        return Err(format!("bad TCP checksum {:#06x}", t.checksum()));
    }
    Ok(TcpSeen {
        src,
        dst,
        sport: t.source_port(),
        dport: t.destination_port(),
        seq: t.sequence_number(),
        ttl,
        syn: t.syn(),
        fin: t.fin(),
        rst: t.rst(),
        payload: t.payload().len(),
        eth_src: eth.source(),
        eth_dst: eth.destination(),
    })
}

/// The node kernel's answer to a frame the pipeline passed: an ARP reply or a Neighbour
/// Advertisement for whatever was asked (proxy ARP / proxy NDP), from `mac`.
fn kernel_answer(frame: &[u8], mac: [u8; 6]) -> Result<Vec<u8>, String> {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x0806 && frame.len() >= 42 {
        let op = u16::from_be_bytes([frame[20], frame[21]]);
        if frame[14..20] != [0, 1, 8, 0, 6, 4] || op != 1 {
            return Err(format!("unexpected ARP frame (op {op})"));
        }
        let sha = &frame[22..28];
        let spa = &frame[28..32];
        let tpa = &frame[38..42];
        if spa == tpa {
            return Err("gratuitous ARP".into());
        }
        let mut r = Vec::with_capacity(42);
        r.extend_from_slice(sha);
        r.extend_from_slice(&mac);
        r.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        r.extend_from_slice(&mac);
        r.extend_from_slice(tpa);
        r.extend_from_slice(sha);
        r.extend_from_slice(spa);
        return Ok(r);
    }
    if ethertype == 0x86dd && frame.len() >= 78 && frame[20] == 58 && frame[54] == 135 {
        let src: [u8; 16] = frame[22..38].try_into().unwrap();
        let target: [u8; 16] = frame[62..78].try_into().unwrap();
        if src == [0; 16] {
            return Err("duplicate address detection probe".into());
        }
        let mut icmp = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        icmp.extend_from_slice(&target);
        icmp.extend_from_slice(&[2, 1]);
        icmp.extend_from_slice(&mac);
        let (s, d) = (IpAddr::V6(target.into()), IpAddr::V6(src.into()));
        let c = !fold(sum_words(&icmp, pseudo_sum(&s, &d, 58, icmp.len())));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut r = Vec::with_capacity(14 + 40 + icmp.len());
        r.extend_from_slice(&frame[6..12]);
        r.extend_from_slice(&mac);
        r.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        r.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        r.extend_from_slice(&[58, 255]);
        r.extend_from_slice(&target);
        r.extend_from_slice(&src);
        r.extend_from_slice(&icmp);
        return Ok(r);
    }
    Err(format!(
        "unexpected frame passed to the kernel (ethertype {ethertype:#06x}, {} bytes)",
        frame.len()
    ))
}

// ---------------------------------------------------------------------------------------
// The scenario.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone)]
struct Scenario {
    family: Family,
    /// The client is an external host on the uplink (masqueraded) instead of a pod.
    external_client: bool,
    conns: usize,
    bytes: usize,
    concurrency: usize,
    /// Probability that a frame is lost on each hop (stack -> node, node -> stack).
    ///
    /// With loss, the ends close only once their data is acknowledged: smoltcp 0.14 drops
    /// a FIN that arrives behind a hole, and then refuses the retransmitted FIN when the
    /// segment carrying it holds data it has meanwhile received (its acceptability test
    /// leaves the FIN out of the segment length), so a FIN riding on data can be lost for
    /// good between two smoltcp stacks. A bare FIN is always accepted.
    loss: f64,
    seed: u64,
    /// Every pod must serve at least this many connections.
    min_per_pod: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    per_pod: Vec<usize>,
    sim_end_us: i64,
    iterations: u64,
    frames_in: u64,
    frames_out: u64,
    lost: u64,
    retransmissions: u64,
    /// RSTs a stack sent for a connection it had already closed in order.
    late_rsts: u64,
    kernel_answers: u64,
    counters: Vec<(String, u64)>,
}

struct Harness {
    sc: Scenario,
    driver: MemoryDriver,
    vip: IpAddr,
    masq: IpAddr,
    client: Host,
    pods: Vec<Pod>,
    rng: ChaCha8Rng,
    now: Instant,
    clients: Vec<ClientConn>,
    started: usize,
    /// Client port -> pod index, for every completed connection.
    served_by: HashMap<u16, usize>,
    /// Client (or SNAT) port -> pod the pipeline sent its frames to.
    routed_to: HashMap<u16, usize>,
    /// (src, sport, seq, payload, syn, fin) of every segment sent, to count retransmissions.
    segments: HashSet<(IpAddr, u16, u32, usize, bool, bool)>,
    /// Peers (as the pods saw them) of retired server connections.
    retired_remotes: HashMap<IpEndpoint, u16>,
    /// Client ports of the flows a stack reset after closing them in order.
    late_rst_ports: HashSet<u16>,
    errors: Vec<String>,
    out: Outcome,
}

impl Harness {
    fn new(sc: Scenario) -> Self {
        let node = parse_node(NODE, "node.yaml").expect("node file");
        let set = parse_manifests(MANIFESTS, "manifests.yaml");
        assert!(set.errors.is_empty(), "manifests: {:?}", set.errors);
        let compiled = compile(&set, &node, &CompileOptions::default(), None);
        assert!(compiled.errors.is_empty(), "compile: {:?}", compiled.errors);

        let (vip, client_ip, pod_ips, gw, prefix) = match sc.family {
            Family::V4 => (
                v4("10.96.0.10"),
                v4("10.244.1.10"),
                [v4("10.244.1.11"), v4("10.244.1.12"), v4("10.244.1.13")],
                v4("10.244.1.1"),
                24,
            ),
            Family::V6 => (
                v6("fd00:96::10"),
                v6("fd00:244::10"),
                [v6("fd00:244::11"), v6("fd00:244::12"), v6("fd00:244::13")],
                v6("fd00:244::1"),
                64,
            ),
        };
        let masq = node
            .masquerade_address(&vip)
            .expect("a node address of the family")
            .1;
        let mut rng = ChaCha8Rng::seed_from_u64(sc.seed);
        let now = Instant::from_secs(1);
        // MACs and interfaces come from the compiled node table: what the pipeline uses.
        let behind = |ip: IpAddr| {
            let n = node.neighbour(&ip).expect("neighbour entry");
            (n.iface, n.mac)
        };
        let client = if sc.external_client {
            assert_eq!(sc.family, Family::V4, "external client is IPv4 only");
            let ip = v4("192.168.50.5");
            let (port, mac) = behind(ip);
            Host::new("client", port, mac, (ip, 24), masq, rng.random(), now)
        } else {
            let (port, mac) = behind(client_ip);
            Host::new(
                "client",
                port,
                mac,
                (client_ip, prefix),
                gw,
                rng.random(),
                now,
            )
        };
        let names = ["pod-a", "pod-b", "pod-c"];
        let pods = pod_ips
            .iter()
            .zip(names)
            .map(|(&ip, name)| {
                let (port, mac) = behind(ip);
                Pod {
                    host: Host::new(name, port, mac, (ip, prefix), gw, rng.random(), now),
                    listeners: VecDeque::new(),
                    conns: Vec::new(),
                }
            })
            .collect();

        let cfg = WorkerConfig {
            conntrack: ConntrackConfig {
                capacity: 4096,
                capacity_v6: 4096,
                ..ConntrackConfig::default()
            },
            affinity_capacity: 64,
            ..WorkerConfig::default()
        };
        let tables = Tables {
            services: Arc::new(compiled.table),
            node: Arc::new(node),
        };
        let mut h = Self {
            driver: MemoryDriver::new(tables, Worker::new(cfg)),
            vip,
            masq,
            client,
            pods,
            rng,
            now,
            clients: Vec::new(),
            started: 0,
            served_by: HashMap::new(),
            routed_to: HashMap::new(),
            segments: HashSet::new(),
            retired_remotes: HashMap::new(),
            late_rst_ports: HashSet::new(),
            errors: Vec::new(),
            out: Outcome {
                per_pod: vec![0; 3],
                sim_end_us: 0,
                iterations: 0,
                frames_in: 0,
                frames_out: 0,
                lost: 0,
                retransmissions: 0,
                late_rsts: 0,
                kernel_answers: 0,
                counters: Vec::new(),
            },
            sc,
        };
        for p in 0..h.pods.len() {
            for _ in 0..h.sc.concurrency {
                h.add_listener(p);
            }
        }
        h
    }

    fn now_ns(&self) -> u64 {
        self.now.total_micros() as u64 * 1000
    }

    fn add_listener(&mut self, p: usize) {
        let mut s = tcp_socket(SOCKET_BUFFER);
        s.listen(TARGET_PORT).unwrap();
        let pod = &mut self.pods[p];
        let h = pod.host.sockets.add(s);
        assert!(
            pod.listeners.back().is_none_or(|l| *l < h) && pod.conns.iter().all(|c| c.handle < h),
            "a listener's slot must come after every connection's"
        );
        pod.listeners.push_back(h);
    }

    fn start_connections(&mut self) {
        while self.clients.len() < self.sc.concurrency && self.started < self.sc.conns {
            let port = FIRST_CLIENT_PORT + self.started as u16;
            let mut s = tcp_socket(SOCKET_BUFFER);
            s.connect(
                self.client.iface.context(),
                IpEndpoint::new(self.vip.into(), SERVICE_PORT),
                port,
            )
            .unwrap();
            let handle = self.client.sockets.add(s);
            let end = End {
                tx: Stream::new(
                    stream_seed(self.sc.seed, port, 0),
                    &port.to_be_bytes(),
                    self.sc.bytes,
                ),
                rx: Stream::new(stream_seed(self.sc.seed, port, 1), &[], self.sc.bytes),
                close_after_drain: self.sc.loss > 0.0,
                close_called: false,
                eof: false,
            };
            self.clients.push(ClientConn { handle, port, end });
            self.started += 1;
        }
    }

    /// Runs the applications on every socket, retires finished connections.
    fn applications(&mut self) {
        for c in &mut self.clients {
            let s = self.client.sockets.get_mut::<tcp::Socket>(c.handle);
            if let Err(e) = c.end.pump(s) {
                self.errors.push(format!("client port {}: {e}", c.port));
            }
        }
        for pod in &mut self.pods {
            for sc in &mut pod.conns {
                let s = pod.host.sockets.get_mut::<tcp::Socket>(sc.handle);
                if sc.end.is_none() {
                    while sc.id_len < 2 && s.can_recv() {
                        match s.recv_slice(&mut sc.id[sc.id_len..]) {
                            Ok(n) => sc.id_len += n,
                            Err(e) => {
                                self.errors
                                    .push(format!("{}: recv id: {e:?}", pod.host.name));
                                break;
                            }
                        }
                    }
                    if sc.id_len == 2 {
                        let id = u16::from_be_bytes(sc.id);
                        let mut rx = Stream::new(
                            stream_seed(self.sc.seed, id, 0),
                            &id.to_be_bytes(),
                            self.sc.bytes,
                        );
                        rx.verify(&sc.id).expect("id prefix");
                        sc.end = Some(End {
                            tx: Stream::new(stream_seed(self.sc.seed, id, 1), &[], self.sc.bytes),
                            rx,
                            close_after_drain: self.sc.loss > 0.0,
                            close_called: false,
                            eof: false,
                        });
                    } else if s.state() == tcp::State::Closed {
                        self.errors.push(format!(
                            "{}: connection from {} closed early",
                            pod.host.name, sc.remote
                        ));
                    }
                }
                if let Some(end) = &mut sc.end {
                    if let Err(e) = end.pump(s) {
                        self.errors.push(format!(
                            "{} conn from {} (id {}): {e}",
                            pod.host.name,
                            sc.remote,
                            u16::from_be_bytes(sc.id)
                        ));
                    }
                }
            }
        }
        // Retire connections finished on both ends.
        let mut i = 0;
        while i < self.clients.len() {
            let c = &self.clients[i];
            let cs = self.client.sockets.get::<tcp::Socket>(c.handle);
            let client_done = c.end.done(cs);
            let server = self.pods.iter().enumerate().find_map(|(p, pod)| {
                pod.conns
                    .iter()
                    .position(|sc| sc.end.is_some() && u16::from_be_bytes(sc.id) == c.port)
                    .map(|j| (p, j))
            });
            let server_done = server.is_some_and(|(p, j)| {
                let pod = &self.pods[p];
                let sc = &pod.conns[j];
                sc.end
                    .as_ref()
                    .unwrap()
                    .done(pod.host.sockets.get::<tcp::Socket>(sc.handle))
            });
            if client_done && server_done {
                let (p, j) = server.unwrap();
                let c = self.clients.swap_remove(i);
                self.client.sockets.remove(c.handle);
                let pod = &mut self.pods[p];
                let sc = pod.conns.swap_remove(j);
                // Check what the pod saw as its peer: the client itself, or the node's
                // masquerade address on a port of the worker's SNAT range.
                if self.sc.external_client {
                    let (lo, hi) = self.driver.worker.snat_port_range();
                    if IpAddr::from(sc.remote.addr) != self.masq
                        || !(lo..=hi).contains(&sc.remote.port)
                    {
                        self.errors.push(format!(
                            "pod saw {} instead of a masqueraded peer",
                            sc.remote
                        ));
                    }
                } else if IpAddr::from(sc.remote.addr) != self.client.ip || sc.remote.port != c.port
                {
                    self.errors
                        .push(format!("pod saw {} for client port {}", sc.remote, c.port));
                }
                // Free the buffers but keep the slot taken (see `Pod::listeners`).
                pod.host.sockets.remove(sc.handle);
                let tomb = pod.host.sockets.add(tcp_socket(0));
                assert_eq!(tomb, sc.handle, "tombstone reuses the slot");
                self.retired_remotes.insert(sc.remote, c.port);
                self.served_by.insert(c.port, p);
                self.out.per_pod[p] += 1;
            } else {
                i += 1;
            }
        }
    }

    /// Listeners that took a connection become connections; fresh listeners replace them.
    fn accept(&mut self) {
        for p in 0..self.pods.len() {
            let mut taken = 0;
            let pod = &mut self.pods[p];
            while let Some(&h) = pod.listeners.front() {
                let s = pod.host.sockets.get::<tcp::Socket>(h);
                if s.state() == tcp::State::Listen {
                    break;
                }
                let remote = s.remote_endpoint().expect("accepted socket has a peer");
                pod.conns.push(ServerConn {
                    handle: h,
                    remote,
                    id: [0; 2],
                    id_len: 0,
                    end: None,
                });
                pod.listeners.pop_front();
                taken += 1;
            }
            // A later listener than the first free one must not have been used.
            let pod = &self.pods[p];
            for &h in &pod.listeners {
                if pod.host.sockets.get::<tcp::Socket>(h).state() != tcp::State::Listen {
                    self.errors
                        .push(format!("{}: listeners used out of order", pod.host.name));
                }
            }
            for _ in 0..taken {
                self.add_listener(p);
            }
        }
    }

    fn lose(&mut self) -> bool {
        self.sc.loss > 0.0 && self.rng.random_bool(self.sc.loss)
    }

    fn host_mut(&mut self, iface: IfaceId) -> Option<&mut Host> {
        if self.client.port == iface {
            return Some(&mut self.client);
        }
        self.pods
            .iter_mut()
            .map(|p| &mut p.host)
            .find(|h| h.port == iface)
    }

    /// Frames from the stacks into the pipeline; returns how many moved.
    fn wire_in(&mut self) -> u64 {
        let mut moved = 0;
        let now_ns = self.now_ns();
        for k in 0..=self.pods.len() {
            let host = if k == 0 {
                &mut self.client
            } else {
                &mut self.pods[k - 1].host
            };
            let port = host.port;
            let frames: Vec<Vec<u8>> = host.dev.tx.drain(..).collect();
            for f in frames {
                moved += 1;
                if self.lose() {
                    self.out.lost += 1;
                    continue;
                }
                if let Ok(t) = inspect_tcp(&f) {
                    if t.payload > 0 || t.syn || t.fin {
                        let key = (t.src, t.sport, t.seq, t.payload, t.syn, t.fin);
                        if !self.segments.insert(key) {
                            self.out.retransmissions += 1;
                        }
                    }
                    if t.rst {
                        // A stack answers a stray segment (say a duplicate ACK of a lost
                        // ACK's retransmission) for a connection it already closed in
                        // order with a RST, as any TCP does. That is fine; a RST from a
                        // connection still open is a failure.
                        if let Some(client_port) = self.closed_in_order(k, &t) {
                            self.out.late_rsts += 1;
                            self.late_rst_ports.insert(client_port);
                        } else {
                            self.errors.push(format!(
                                "{} reset an open connection {}:{} -> {}:{}",
                                if k == 0 { "client" } else { "pod" },
                                t.src,
                                t.sport,
                                t.dst,
                                t.dport
                            ));
                        }
                    }
                }
                self.out.frames_in += 1;
                let v = self.driver.inject(port, f, now_ns);
                if let Verdict::Drop(r) = v {
                    self.errors
                        .push(format!("pipeline dropped a frame: {}", r.as_str()));
                }
            }
        }
        moved
    }

    /// If the end that sent `t` (host `k`: 0 the client, else pod `k - 1`) has finished
    /// its connection in order (or already retired it), the connection's client port.
    fn closed_in_order(&self, k: usize, t: &TcpSeen) -> Option<u16> {
        if k == 0 {
            let done = match self.clients.iter().find(|c| c.port == t.sport) {
                Some(c) => c.end.done(self.client.sockets.get::<tcp::Socket>(c.handle)),
                None => self.served_by.contains_key(&t.sport),
            };
            done.then_some(t.sport)
        } else {
            let pod = &self.pods[k - 1];
            let remote = IpEndpoint::new(t.dst.into(), t.dport);
            match pod.conns.iter().find(|c| c.remote == remote) {
                Some(c) => {
                    let end = c.end.as_ref()?;
                    end.done(pod.host.sockets.get::<tcp::Socket>(c.handle))
                        .then(|| u16::from_be_bytes(c.id))
                }
                None => self.retired_remotes.get(&remote).copied(),
            }
        }
    }

    /// Frames the pipeline passed (ARP, NDP): the node kernel answers.
    fn kernel(&mut self) -> u64 {
        let mut moved = 0;
        while let Some((iface, f)) = self.driver.passed.pop_front() {
            moved += 1;
            let mac = self.driver.tables.node.interface(iface).mac;
            match kernel_answer(&f, mac) {
                Ok(answer) => {
                    self.out.kernel_answers += 1;
                    if self.lose() {
                        self.out.lost += 1;
                        continue;
                    }
                    match self.host_mut(iface) {
                        Some(h) => h.dev.rx.push_back(answer),
                        None => self
                            .errors
                            .push(format!("passed frame on {iface:?} with no host")),
                    }
                }
                Err(e) => self.errors.push(e),
            }
        }
        moved
    }

    /// Frames the pipeline emitted: checked, then delivered to the stack behind the
    /// interface.
    fn wire_out(&mut self) -> u64 {
        let mut moved = 0;
        let n_ifaces = self.driver.tables.node.interfaces.len();
        for i in 0..n_ifaces {
            let iface = IfaceId(i as u8);
            while let Some(f) = self.driver.take(iface) {
                moved += 1;
                self.out.frames_out += 1;
                if let Err(e) = self.check_emitted(iface, &f) {
                    self.errors.push(format!("emitted on {iface:?}: {e}"));
                    continue;
                }
                if self.lose() {
                    self.out.lost += 1;
                    continue;
                }
                self.host_mut(iface).unwrap().dev.rx.push_back(f);
            }
        }
        moved
    }

    fn check_emitted(&mut self, iface: IfaceId, f: &[u8]) -> Result<(), String> {
        let t = inspect_tcp(f)?;
        let node_mac = self.driver.tables.node.interface(iface).mac;
        let client_ports = FIRST_CLIENT_PORT..FIRST_CLIENT_PORT + self.sc.conns as u16;
        let (vip, masq, client_ip, external) =
            (self.vip, self.masq, self.client.ip, self.sc.external_client);
        let snat = self.driver.worker.snat_port_range();
        let host = self
            .host_mut(iface)
            .ok_or_else(|| "no stack behind this interface".to_string())?;
        // smoltcp sends with TTL / hop limit 64; the node routes, so one less.
        if t.ttl != 63 {
            return Err(format!("TTL {} (64 - 1 expected)", t.ttl));
        }
        if t.eth_src != node_mac || t.eth_dst != host.mac {
            return Err(format!(
                "MACs {:02x?} -> {:02x?}, expected {:02x?} -> {:02x?}",
                t.eth_src, t.eth_dst, node_mac, host.mac
            ));
        }
        if host.name == "client" {
            if (t.src, t.sport) != (vip, SERVICE_PORT)
                || t.dst != client_ip
                || !client_ports.contains(&t.dport)
            {
                return Err(format!(
                    "to the client: {}:{} -> {}:{} (reverse NAT to {vip}:{SERVICE_PORT} expected)",
                    t.src, t.sport, t.dst, t.dport
                ));
            }
            return Ok(());
        }
        let ok_src = if external {
            t.src == masq && (snat.0..=snat.1).contains(&t.sport)
        } else {
            t.src == client_ip && client_ports.contains(&t.sport)
        };
        if (t.dst, t.dport) != (host.ip, TARGET_PORT) || !ok_src {
            return Err(format!(
                "to {}: {}:{} -> {}:{}",
                host.name, t.src, t.sport, t.dst, t.dport
            ));
        }
        let p = self.pods.iter().position(|p| p.host.port == iface).unwrap();
        if let Some(prev) = self.routed_to.insert(t.sport, p) {
            if prev != p {
                return Err(format!("flow from port {} moved between pods", t.sport));
            }
        }
        Ok(())
    }

    fn poll_all(&mut self) -> bool {
        let now = self.now;
        let mut changed = self.client.poll(now);
        for p in &mut self.pods {
            changed |= p.host.poll(now);
        }
        changed
    }

    /// The state of every connection in flight, both ends, for failure messages.
    fn in_flight(&self) -> Vec<String> {
        self.clients
            .iter()
            .map(|c| {
                let s = self.client.sockets.get::<tcp::Socket>(c.handle);
                let server = self.pods.iter().find_map(|pod| {
                    let sc = pod
                        .conns
                        .iter()
                        .find(|sc| sc.end.is_some() && u16::from_be_bytes(sc.id) == c.port)?;
                    let ss = pod.host.sockets.get::<tcp::Socket>(sc.handle);
                    let e = sc.end.as_ref().unwrap();
                    Some(format!(
                        "{} {}: sent {} received {} eof {} send queue {}",
                        pod.host.name,
                        ss.state(),
                        e.tx.offset,
                        e.rx.offset,
                        e.eof,
                        ss.send_queue()
                    ))
                });
                format!(
                    "port {} {}: sent {} received {} eof {} send queue {} | server {}",
                    c.port,
                    s.state(),
                    c.end.tx.offset,
                    c.end.rx.offset,
                    c.end.eof,
                    s.send_queue(),
                    server.unwrap_or_else(|| "not accepted or no id yet".into())
                )
            })
            .collect()
    }

    /// The earliest instant any stack wants to be polled at.
    fn next_poll(&mut self) -> Option<Instant> {
        let now = self.now;
        let mut next = self.client.iface.poll_at(now, &self.client.sockets);
        for p in &mut self.pods {
            if let Some(t) = p.host.iface.poll_at(now, &p.host.sockets) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    fn run(mut self) -> Outcome {
        let mut iterations = 0;
        let mut idle_without_timers = 0;
        while self.served_by.len() < self.sc.conns {
            iterations += 1;
            if iterations > MAX_ITERATIONS || self.now.secs() >= MAX_SIM_SECS {
                panic!(
                    "no end in sight after {iterations} iterations at {}: {} done; in flight: {:#?}",
                    self.now,
                    self.served_by.len(),
                    self.in_flight()
                );
            }
            self.start_connections();
            self.applications();
            let changed = self.poll_all();
            let mut moved = self.wire_in();
            moved += self.kernel();
            moved += self.wire_out();
            self.accept();
            if !self.errors.is_empty() {
                panic!(
                    "at {} (iteration {iterations}): {:#?}",
                    self.now,
                    &self.errors[..self.errors.len().min(10)]
                );
            }
            // Move the clock: one step while anything happens, else straight to the next
            // timer a stack has set.
            let next = self.now + STEP;
            self.now = if moved == 0 && !changed {
                match self.next_poll() {
                    Some(t) => {
                        idle_without_timers = 0;
                        t.max(next)
                    }
                    None => {
                        // Nothing moves and no stack has a timer left: nothing ever will.
                        idle_without_timers += 1;
                        if idle_without_timers > 3 {
                            panic!(
                                "deadlock at {}: no frame, no timer; {} done; in flight: {:#?}",
                                self.now,
                                self.served_by.len(),
                                self.in_flight()
                            );
                        }
                        next
                    }
                }
            } else {
                idle_without_timers = 0;
                next
            };
        }
        self.out.iterations = iterations;
        self.out.sim_end_us = self.now.total_micros();
        self.finish()
    }

    fn finish(mut self) -> Outcome {
        let sc = &self.sc;
        let counters = &self.driver.worker.counters;
        let named = counters.named();
        for (name, v) in &named {
            if name.starts_with("drop_") || name.starts_with("reject_") {
                assert_eq!(*v, 0, "{name} = {v}: {named:?}");
            }
        }
        let arp_or_ndp = match sc.family {
            Family::V4 => PassReason::NotIp,
            Family::V6 => PassReason::IcmpNotTracked,
        };
        for r in PassReason::ALL {
            if *r != arp_or_ndp {
                assert_eq!(counters.passed(*r), 0, "pass_{}: {named:?}", r.as_str());
            }
        }
        assert_eq!(counters.passed(arp_or_ndp), self.out.kernel_answers);
        assert_eq!(counters.forwarded(ForwardReason::NewFlow), sc.conns as u64);
        assert_eq!(counters.forwarded(ForwardReason::Untracked), 0);
        assert_eq!(counters.forwarded(ForwardReason::IcmpRelated), 0);
        let forwarded: u64 = ForwardReason::ALL
            .iter()
            .map(|r| counters.forwarded(*r))
            .sum();
        assert_eq!(
            forwarded, self.out.frames_out,
            "every forward was delivered"
        );
        assert_eq!(
            counters.frames, self.out.frames_in,
            "every injected frame was counted once"
        );

        // Conntrack: every flow tracked, to the pod that served it, closed in order.
        let ct = &self.driver.worker.conntrack;
        assert_eq!(ct.stats().inserted, sc.conns as u64, "{:?}", ct.stats());
        // A flow reset late (see `wire_in`) sits in CLOSE, whose timeout is 10 s: with
        // loss, the run may outlast it. Every other flow must still be there.
        let gone: Vec<u16> = self
            .served_by
            .keys()
            .copied()
            .filter(|p| !ct.iter().any(|m| m.orig.sport == *p))
            .collect();
        assert!(
            gone.iter().all(|p| self.late_rst_ports.contains(p)),
            "flows gone at {}: {gone:?} (late RSTs on {:?}): {:?}",
            self.now,
            self.late_rst_ports,
            ct.stats()
        );
        assert_eq!(ct.len() + gone.len(), sc.conns);
        assert_eq!(ct.stats().expired, gone.len() as u64, "{:?}", ct.stats());
        let mut ports = HashSet::new();
        for m in ct.iter() {
            assert_eq!((m.orig.dst, m.orig.dport), (self.vip, SERVICE_PORT));
            assert_eq!(m.orig.src, self.client.ip);
            assert!(ports.insert(m.orig.sport), "port {} twice", m.orig.sport);
            let p = self.served_by[&m.orig.sport];
            assert_eq!(
                (m.nat.backend, m.nat.backend_port),
                (self.pods[p].host.ip, TARGET_PORT),
                "flow from port {}",
                m.orig.sport
            );
            assert_eq!(m.nat.snat.is_some(), sc.external_client);
            if let Some(s) = m.nat.snat {
                assert_eq!(s.addr, self.masq);
                assert_eq!(self.routed_to.get(&s.port), Some(&p));
            } else {
                assert_eq!(self.routed_to.get(&m.orig.sport), Some(&p));
            }
            // Both FINs and the last ACK seen: TIME_WAIT; a late RST (see `wire_in`)
            // after that moves the flow to CLOSE, as it does in Linux.
            let late_rst = self.late_rst_ports.contains(&m.orig.sport);
            assert!(
                m.tcp_state == TcpState::TimeWait || (late_rst && m.tcp_state == TcpState::Close),
                "flow from port {} in {:?}, not TIME_WAIT",
                m.orig.sport,
                m.tcp_state
            );
        }

        let per_pod = &self.out.per_pod;
        assert_eq!(per_pod.iter().sum::<usize>(), sc.conns);
        assert!(
            per_pod.iter().all(|&n| n >= sc.min_per_pod),
            "connections per pod {per_pod:?}, each should have at least {}",
            sc.min_per_pod
        );
        if sc.loss > 0.0 {
            assert!(self.out.lost > 0, "the lossy link lost nothing");
            assert!(
                self.out.retransmissions > 0,
                "no retransmission went through the pipeline"
            );
        }
        self.out.counters = named;
        self.out
    }
}

fn run(sc: Scenario, label: &str) -> Outcome {
    let t0 = std::time::Instant::now();
    let total = 2 * sc.conns * sc.bytes;
    let out = Harness::new(sc).run();
    let wall = t0.elapsed();
    let nonzero: Vec<_> = out.counters.iter().filter(|(_, v)| *v > 0).collect();
    println!(
        "{label}: {} MiB through the pipeline in {:.2?} wall ({} simulated ms, {} iterations); \
         frames in {} out {}, lost {}, retransmissions {}, late RSTs {}, ARP/NDP answers {}; \
         per pod {:?}; counters {nonzero:?}",
        total >> 20,
        wall,
        out.sim_end_us / 1000,
        out.iterations,
        out.frames_in,
        out.frames_out,
        out.lost,
        out.retransmissions,
        out.late_rsts,
        out.kernel_answers,
        out.per_pod,
    );
    out
}

#[test]
fn stream_is_independent_of_read_sizes() {
    let mut a = Stream::new(7, &[1, 2], 10_000);
    let mut whole = vec![0u8; 10_000];
    assert_eq!(a.produce(&mut whole), 10_000);
    assert_eq!(&whole[..2], &[1, 2]);
    let mut b = Stream::new(7, &[1, 2], 10_000);
    let mut at = 0;
    for (i, n) in [1usize, 3, 4095, 17, 5000].iter().cycle().enumerate() {
        if at == whole.len() || i > 100 {
            break;
        }
        let n = (*n).min(whole.len() - at);
        b.verify(&whole[at..at + n]).unwrap();
        at += n;
    }
    assert_eq!(at, whole.len());
    assert!(b.verify(&[0]).is_err(), "past the end");
    let mut c = Stream::new(7, &[1, 2], 10_000);
    let mut flipped = whole.clone();
    flipped[6000] ^= 1;
    assert!(c.verify(&flipped).unwrap_err().contains("byte 6000"));
}

#[test]
fn own_checksums_agree_with_a_known_header() {
    // RFC 1071-style example: an IPv4 header with a correct checksum sums to 0xffff.
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(fold(sum_words(&h, 0)), 0xffff);
    let mut bad = h;
    bad[11] ^= 1;
    assert_ne!(fold(sum_words(&bad, 0)), 0xffff);
}

/// 300 connections from a client pod to a ClusterIP, 1 MiB each way, orderly close.
#[test]
fn tcp_300_connections_1mib_each_way_through_clusterip() {
    run(
        Scenario {
            family: Family::V4,
            external_client: false,
            conns: 300,
            bytes: 1 << 20,
            concurrency: 32,
            loss: 0.0,
            seed: 0x6b78_7001,
            min_per_pod: 50,
        },
        "ipv4 pod client",
    );
}

/// The same over IPv6 (NDP answered by the harness), smaller; run twice to show the whole
/// conversation is deterministic.
#[test]
fn tcp_ipv6_through_clusterip_is_deterministic() {
    let sc = Scenario {
        family: Family::V6,
        external_client: false,
        conns: 12,
        bytes: 256 << 10,
        concurrency: 6,
        loss: 0.0,
        seed: 0x6b78_7006,
        min_per_pod: 1,
    };
    let a = run(sc.clone(), "ipv6 pod client");
    let b = run(sc, "ipv6 pod client (again)");
    assert_eq!(a, b, "same seed, same conversation");
}

/// An external client on the uplink: kube-proxy masquerades off-cluster sources to a
/// ClusterIP, so the pods see the node address and a SNAT port; replies are un-SNATed.
#[test]
fn tcp_external_client_masqueraded() {
    run(
        Scenario {
            family: Family::V4,
            external_client: true,
            conns: 30,
            bytes: 256 << 10,
            concurrency: 10,
            loss: 0.0,
            seed: 0x6b78_700e,
            min_per_pod: 3,
        },
        "ipv4 external client, masqueraded",
    );
}

/// 1% of frames lost on each hop: retransmissions (data, SYN, FIN) go through conntrack
/// and still arrive intact.
#[test]
fn tcp_lossy_link_retransmissions_through_conntrack() {
    run(
        Scenario {
            family: Family::V4,
            external_client: false,
            conns: 40,
            bytes: 256 << 10,
            concurrency: 10,
            loss: 0.01,
            seed: 0x6b78_7010,
            min_per_pod: 4,
        },
        "ipv4 lossy (1% per hop)",
    );
}
