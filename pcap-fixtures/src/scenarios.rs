//! The scenario table. Each function builds one scenario: its manifests, and frame by frame
//! what a peer sends and what must come out of node-a (see [`crate::net`] for the
//! topology). Expected frames come from [`crate::forwarded`] / [`crate::rejected`] /
//! hand-built packets, never from kxp's pipeline.

use core::net::IpAddr;
use std::collections::HashMap;
use std::time::Duration;

use etherparse::{icmpv4, IcmpEchoHeader, Icmpv4Type, Icmpv6Type};
use kxp_dataplane::flow::L4Proto;

use crate::net::{self, ip, Peer, CLIENT, EXTERNAL, NODE_IP, WEB};
use crate::packet::{arp_request, tcp::*, Ip, Packet, VlanTag, L4};
use crate::policy::{key, maglev_pick, SnatAllocator};
use crate::{
    expect_drop, expect_forward, expect_pass, expect_reject, forwarded, rejected, send, tcp,
    time_exceeded, udp, Expect, Frame, Ingress, Scenario, EPOCH, FRAME_SPACING,
};

/// Every scenario, in the order the README lists them.
pub fn all() -> Vec<Scenario> {
    vec![
        clusterip_tcp(),
        nodeport_udp(),
        loadbalancer_ip(),
        external_ip(),
        hairpin(),
        no_endpoints(),
        unknown_port(),
        ipv6_clusterip(),
        icmp_frag_needed(),
        icmp_unreachable_udp(),
        malformed(),
        non_service(),
        affinity(),
        sctp(),
        traffic_policy_local(),
        lb_source_ranges(),
        conntrack_timeout(),
    ]
}

/// A scenario under construction.
struct Builder {
    s: Scenario,
    snat: SnatAllocator,
    ids: HashMap<IpAddr, u16>,
    /// Timestamp of the next frame.
    now: Duration,
}

impl Builder {
    fn new(name: &'static str, description: &str, manifests: String) -> Self {
        Self {
            s: Scenario {
                name,
                description: description.trim().to_string(),
                manifests,
                node: net::NODE_YAML.to_string(),
                frames: Vec::new(),
            },
            snat: SnatAllocator::new(),
            ids: HashMap::new(),
            now: EPOCH,
        }
    }

    /// Lets `d` pass before the next frame (on top of the usual spacing).
    fn wait(&mut self, d: Duration) {
        self.now += d;
    }

    /// The next IPv4 identification `from` uses (each sender counts up from its own base).
    fn id(&mut self, from: &Peer) -> u16 {
        let n = self.ids.len() as u16;
        let id = self.ids.entry(from.ip).or_insert(0x1000 * (n + 1));
        *id += 1;
        *id
    }

    /// What `from` sends from `sport` to `dst`.
    fn send(&mut self, from: &Peer, sport: u16, dst: (IpAddr, u16), l4: L4) -> Packet {
        let id = self.id(from);
        send(from, sport, dst, id, l4)
    }

    fn frame(&mut self, description: impl Into<String>, input: Vec<u8>, expect: Expect) {
        self.s.frames.push(Frame {
            description: description.into(),
            timestamp: self.now,
            input,
            ingress: Ingress::Auto,
            expect,
        });
        self.now += FRAME_SPACING;
    }

    /// `from` sends `l4` from `sport` to `dst`; kxp must forward it to `to` as
    /// `new_src` -> `new_dst`. Returns (what was sent, what must leave).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        description: impl Into<String>,
        from: &Peer,
        sport: u16,
        dst: (IpAddr, u16),
        l4: L4,
        reason: &'static str,
        to: &Peer,
        new_src: (IpAddr, u16),
        new_dst: (IpAddr, u16),
    ) -> (Packet, Packet) {
        let p = self.send(from, sport, dst, l4);
        let out = forwarded(&p, to, new_src, new_dst);
        self.frame(
            description,
            p.bytes(),
            expect_forward(reason, &from.iface, &out, to),
        );
        (p, out)
    }

    /// A masquerade port for the flow `client` -> `frontend` to `backend`, masqueraded to
    /// `addr`.
    fn snat(
        &mut self,
        client: (IpAddr, u16),
        frontend: (IpAddr, u16),
        proto: L4Proto,
        addr: IpAddr,
        backend: (IpAddr, u16),
    ) -> u16 {
        self.snat
            .allocate(&key(client, frontend, proto), addr, backend)
    }

    fn done(self) -> Scenario {
        assert!(!self.s.frames.is_empty());
        self.s
    }
}

// ---------------------------------------------------------------------------------------
// Manifests.

/// A Service. `spec` is the YAML of everything under `spec:` after `ports`, indented by 2.
fn service(name: &str, spec: &str, status: &str) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{}",
        spec.trim_end()
    );
    s.push('\n');
    if !status.is_empty() {
        s.push_str("status:\n");
        s.push_str(status.trim_end());
        s.push('\n');
    }
    s
}

/// An EndpointSlice of `service`: ports (name, protocol, port) and endpoints (address,
/// nodeName), all ready.
fn slice(
    name: &str,
    service: &str,
    family: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n"
    );
    for (n, proto, port) in ports {
        s.push_str(&format!(
            "  - {{name: {n}, protocol: {proto}, port: {port}}}\n"
        ));
    }
    s.push_str("endpoints:\n");
    for (addr, node) in endpoints {
        s.push_str(&format!(
            "  - addresses: [\"{addr}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: {node}\n"
        ));
    }
    s
}

fn docs(parts: &[String]) -> String {
    let mut out = String::new();
    for p in parts {
        out.push_str("---\n");
        out.push_str(p);
    }
    out
}

/// `web`: ClusterIP 10.96.0.10:80/TCP -> pod web 10.244.1.10:8080 on this node.
fn web_service() -> Vec<String> {
    vec![
        service(
            "web",
            "  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "",
        ),
        slice(
            "web-abcde",
            "web",
            "IPv4",
            &[("http", "TCP", 8080)],
            &[("10.244.1.10", "node-a")],
        ),
    ]
}

const WEB_VIP: (IpAddr, u16) = (IpAddr::V4(core::net::Ipv4Addr::new(10, 96, 0, 10)), 80);
const WEB_BE: (IpAddr, u16) = (WEB.ip, 8080);

// ---------------------------------------------------------------------------------------
// a. clusterip-tcp

fn clusterip_tcp() -> Scenario {
    let mut b = Builder::new(
        "clusterip-tcp",
        "A pod opens a TCP connection to a ClusterIP, exchanges data both ways and closes it.
Proves: DNAT of the original direction to the only endpoint (10.96.0.10:80 ->
10.244.1.10:8080), reverse NAT of every reply (source back to 10.96.0.10:80), no
masquerade (the client is in the cluster CIDR), MACs from the neighbour table (egress
veth's MAC as source, the pod's MAC as destination), TTL 64 -> 63 with the IPv4 header
checksum and TCP checksum (pseudo-header) recomputed, Ethernet padding of short input
frames not carried over, and conntrack through the whole handshake and both FINs. A RST to the service from a port
with no flow is DNATed without creating state (`untracked`).",
        docs(&web_service()),
    );
    let c = CLIENT;
    let cs = (c.ip, 40000);
    let fwd = |b: &mut Builder, d: &str, flags, seq, ack, data: &[u8], reason| {
        b.forward(
            d,
            &c,
            40000,
            WEB_VIP,
            tcp(flags, seq, ack, data),
            reason,
            &WEB,
            cs,
            WEB_BE,
        );
    };
    let rev = |b: &mut Builder, d: &str, flags, seq, ack, data: &[u8]| {
        b.forward(
            d,
            &WEB,
            8080,
            cs,
            tcp(flags, seq, ack, data),
            "reply",
            &c,
            WEB_VIP,
            cs,
        );
    };
    let req = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    fwd(
        &mut b,
        "client SYN to ClusterIP 10.96.0.10:80: DNAT to 10.244.1.10:8080",
        SYN,
        1000,
        0,
        b"",
        "new_flow",
    );
    rev(
        &mut b,
        "backend SYN-ACK: source rewritten back to 10.96.0.10:80",
        SYN | ACK,
        9000,
        1001,
        b"",
    );
    fwd(
        &mut b,
        "client ACK (padded 60-byte frame)",
        ACK,
        1001,
        9001,
        b"",
        "established",
    );
    fwd(
        &mut b,
        "client request",
        PSH | ACK,
        1001,
        9001,
        req,
        "established",
    );
    rev(
        &mut b,
        "backend response",
        PSH | ACK,
        9001,
        1001 + req.len() as u32,
        resp,
    );
    fwd(
        &mut b,
        "client ACK of the response",
        ACK,
        1001 + req.len() as u32,
        9001 + resp.len() as u32,
        b"",
        "established",
    );
    fwd(
        &mut b,
        "client FIN",
        FIN | ACK,
        1001 + req.len() as u32,
        9001 + resp.len() as u32,
        b"",
        "established",
    );
    rev(
        &mut b,
        "backend FIN",
        FIN | ACK,
        9001 + resp.len() as u32,
        1002 + req.len() as u32,
        b"",
    );
    fwd(
        &mut b,
        "client last ACK",
        ACK,
        1002 + req.len() as u32,
        9002 + resp.len() as u32,
        b"",
        "established",
    );
    let cs2 = (c.ip, 40001);
    b.forward(
        "client RST from a port with no flow (a connection kxp never saw): DNATed, not tracked",
        &c,
        40001,
        WEB_VIP,
        tcp(RST | ACK, 77, 88, b""),
        "untracked",
        &WEB,
        cs2,
        WEB_BE,
    );
    let cs3 = (c.ip, 40002);
    b.forward(
        "a SYN from that port afterwards is a new flow (the RST left no state)",
        &c,
        40002,
        WEB_VIP,
        tcp(SYN, 500, 0, b""),
        "new_flow",
        &WEB,
        cs3,
        WEB_BE,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// b. nodeport-udp

fn nodeport_udp() -> Scenario {
    let manifests = docs(&[
        service(
            "dns",
            "  type: NodePort
  clusterIP: 10.96.0.53
  clusterIPs: [10.96.0.53]
  ipFamilies: [IPv4]
  externalTrafficPolicy: Cluster
  ports:
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}",
            "",
        ),
        slice(
            "dns-abcde",
            "dns",
            "IPv4",
            &[("dns", "UDP", 5353)],
            &[("10.244.1.10", "node-a")],
        ),
    ]);
    let mut b = Builder::new(
        "nodeport-udp",
        "An external client (off-cluster, through the router on the uplink) queries a UDP
NodePort (192.168.50.2:30053, externalTrafficPolicy Cluster). Proves: the NodePort
frontend on the node address, masquerade (source rewritten to the node address and a port
chosen by kxp's rule: `32768 + (lb_hash >> 20) % 28232` for worker 0 of 1), the reply
reverse-translated to the client (source 192.168.50.2:30053) and sent to the router's MAC,
later datagrams of the same flow reusing the binding, and a second client port getting its
own masquerade port. UDP checksums recomputed over the new pseudo-header; a datagram
without a checksum (0) keeps none; a datagram whose checksum after translation computes to
0 carries 0xffff (RFC 768). A flow whose first-choice masquerade port is already taken for
the same backend gets the next port, and its answer finds its way back.",
        manifests,
    );
    let np = (NODE_IP, 30053);
    let be = (WEB.ip, 5353);
    for (n, sport) in [(1, 5555u16), (2, 5556)] {
        let xs = (EXTERNAL.ip, sport);
        let p = b.snat(xs, np, L4Proto::Udp, NODE_IP, be);
        let ms = (NODE_IP, p);
        let q = format!("query {n} for example.com").into_bytes();
        let a = format!("answer {n}: example.com A 93.184.216.34").into_bytes();
        b.forward(
            format!("client {sport} query to NodePort 192.168.50.2:30053: masqueraded to 192.168.50.2:{p}"),
            &EXTERNAL, sport, np, udp(&q), "new_flow", &WEB, ms, be,
        );
        b.forward(
            format!(
                "backend answer to 192.168.50.2:{p}: back to the client from 192.168.50.2:30053"
            ),
            &WEB,
            5353,
            ms,
            udp(&a),
            "reply",
            &EXTERNAL,
            np,
            xs,
        );
        b.forward(
            format!("client {sport} second query (same flow)"),
            &EXTERNAL,
            sport,
            np,
            udp(&q),
            "established",
            &WEB,
            ms,
            be,
        );
        b.forward(
            "second answer",
            &WEB,
            5353,
            ms,
            udp(&a),
            "reply",
            &EXTERNAL,
            np,
            xs,
        );
    }

    // IPv4 UDP without a checksum: zero stays zero through NAT (RFC 768).
    let sport = 5557;
    let xs = (EXTERNAL.ip, sport);
    let p = b.snat(xs, np, L4Proto::Udp, NODE_IP, be);
    b.forward(
        "query without a UDP checksum (0): still 0 after NAT",
        &EXTERNAL,
        sport,
        np,
        L4::Udp {
            sport: 0,
            dport: 0,
            payload: b"no checksum".to_vec(),
            no_checksum: true,
        },
        "new_flow",
        &WEB,
        (NODE_IP, p),
        be,
    );

    // A datagram whose checksum after NAT computes to 0: sent as 0xffff (RFC 768).
    let sport = 5558;
    let xs = (EXTERNAL.ip, sport);
    let p = b.snat(xs, np, L4Proto::Udp, NODE_IP, be);
    let payload = zero_udp_checksum_payload((NODE_IP, p), be, b"checksum 0xffff:");
    let (_, out) = b.forward(
        "query whose translated UDP checksum computes to 0: transmitted as 0xffff",
        &EXTERNAL,
        sport,
        np,
        udp(&payload),
        "new_flow",
        &WEB,
        (NODE_IP, p),
        be,
    );
    let ob = out.bytes();
    assert_eq!(
        &ob[14 + 20 + 6..14 + 20 + 8],
        &[0xff, 0xff],
        "fixture: checksum crafting"
    );

    // Two flows whose first-choice masquerade port is the same: the second takes the next.
    let first = crate::policy::first_probe(&key((EXTERNAL.ip, 5555), np, L4Proto::Udp));
    let sport = (6000u16..65000)
        .find(|sp| crate::policy::first_probe(&key((EXTERNAL.ip, *sp), np, L4Proto::Udp)) == first)
        .expect("fixture: a colliding source port");
    let xs = (EXTERNAL.ip, sport);
    let p = b.snat(xs, np, L4Proto::Udp, NODE_IP, be);
    assert_eq!(
        p,
        first + 1,
        "fixture: the collision must move to the next port"
    );
    b.forward(
        format!("client port {sport} hashes to masquerade port {first}, taken by port 5555's flow: gets {p}"),
        &EXTERNAL, sport, np, udp(b"collide"), "new_flow", &WEB, (NODE_IP, p), be,
    );
    b.forward(
        format!("its answer to 192.168.50.2:{p}: back to port {sport}"),
        &WEB,
        5353,
        (NODE_IP, p),
        udp(b"collided"),
        "reply",
        &EXTERNAL,
        np,
        xs,
    );
    b.done()
}

/// `prefix` plus two bytes chosen so that a UDP datagram with this payload from `src` to
/// `dst` has a computed checksum of 0 (RFC 1071 arithmetic done here, by hand).
fn zero_udp_checksum_payload(src: (IpAddr, u16), dst: (IpAddr, u16), prefix: &[u8]) -> Vec<u8> {
    assert!(prefix.len().is_multiple_of(2));
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.0, dst.0) else {
        panic!("IPv4 only");
    };
    let len = (8 + prefix.len() + 2) as u16;
    let mut words = Vec::new();
    words.extend_from_slice(&s.octets());
    words.extend_from_slice(&d.octets());
    words.extend_from_slice(&[0, 17]);
    words.extend_from_slice(&len.to_be_bytes());
    words.extend_from_slice(&src.1.to_be_bytes());
    words.extend_from_slice(&dst.1.to_be_bytes());
    words.extend_from_slice(&len.to_be_bytes());
    words.extend_from_slice(&[0, 0]);
    words.extend_from_slice(prefix);
    // The checksum is !fold(sum); it is 0 when fold(sum) == 0xffff. With the last word w,
    // fold(sum0 + w) == 0xffff for w = 0xffff - fold(sum0) (ones' complement).
    let sum0 = !crate::packet::internet_checksum(&words);
    let w = 0xffff - sum0;
    let mut p = prefix.to_vec();
    p.extend_from_slice(&w.to_be_bytes());
    p
}

// ---------------------------------------------------------------------------------------
// c. loadbalancer-ip

fn loadbalancer_ip() -> Scenario {
    let manifests = docs(&[
        service(
            "shop",
            "  type: LoadBalancer
  clusterIP: 10.96.0.40
  clusterIPs: [10.96.0.40]
  ipFamilies: [IPv4]
  ports:
    - {name: https, protocol: TCP, port: 443, targetPort: 8443, nodePort: 30443}",
            "  loadBalancer:
    ingress:
      - ip: 198.51.100.10",
        ),
        slice(
            "shop-abcde",
            "shop",
            "IPv4",
            &[("https", "TCP", 8443)],
            &[("10.244.1.10", "node-a")],
        ),
    ]);
    let mut b = Builder::new(
        "loadbalancer-ip",
        "An external client connects to a LoadBalancer service's `status.loadBalancer.ingress`
IP (198.51.100.10:443), then to the same service's NodePort. Proves: the LoadBalancer
frontend, masquerade of external traffic under externalTrafficPolicy Cluster, the reply
leaving from the LoadBalancer IP, and the NodePort of the same service port reaching the
same backend as a separate flow.",
        manifests,
    );
    let lb = (ip("198.51.100.10"), 443);
    let be = (WEB.ip, 8443);
    let xs = (EXTERNAL.ip, 41000);
    let p = b.snat(xs, lb, L4Proto::Tcp, NODE_IP, be);
    let ms = (NODE_IP, p);
    b.forward(
        "client SYN to 198.51.100.10:443",
        &EXTERNAL,
        41000,
        lb,
        tcp(SYN, 100, 0, b""),
        "new_flow",
        &WEB,
        ms,
        be,
    );
    b.forward(
        "backend SYN-ACK: from 198.51.100.10:443 to the client",
        &WEB,
        8443,
        ms,
        tcp(SYN | ACK, 700, 101, b""),
        "reply",
        &EXTERNAL,
        lb,
        xs,
    );
    b.forward(
        "client ACK",
        &EXTERNAL,
        41000,
        lb,
        tcp(ACK, 101, 701, b""),
        "established",
        &WEB,
        ms,
        be,
    );
    b.forward(
        "client data",
        &EXTERNAL,
        41000,
        lb,
        tcp(PSH | ACK, 101, 701, b"\x16\x03\x01\x00\x05hello"),
        "established",
        &WEB,
        ms,
        be,
    );
    let np = (NODE_IP, 30443);
    let xs2 = (EXTERNAL.ip, 41001);
    let p2 = b.snat(xs2, np, L4Proto::Tcp, NODE_IP, be);
    b.forward(
        format!("client SYN to the NodePort 192.168.50.2:30443: masqueraded to port {p2}"),
        &EXTERNAL,
        41001,
        np,
        tcp(SYN, 200, 0, b""),
        "new_flow",
        &WEB,
        (NODE_IP, p2),
        be,
    );
    b.forward(
        "backend SYN-ACK: from 192.168.50.2:30443",
        &WEB,
        8443,
        (NODE_IP, p2),
        tcp(SYN | ACK, 800, 201, b""),
        "reply",
        &EXTERNAL,
        np,
        xs2,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// d. external-ip

fn external_ip_service() -> Vec<String> {
    vec![
        service(
            "web-ext",
            "  type: ClusterIP
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50]
  ipFamilies: [IPv4]
  externalIPs: [198.51.100.20]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "",
        ),
        slice(
            "web-ext-abcde",
            "web-ext",
            "IPv4",
            &[("http", "TCP", 8080)],
            &[("10.244.1.10", "node-a")],
        ),
    ]
}

fn external_ip() -> Scenario {
    let mut b = Builder::new(
        "external-ip",
        "Traffic to a service's `spec.externalIPs` address (198.51.100.20:80). Proves: the
ExternalIP frontend, masquerade for an external client and the reply from the external IP;
and that a pod reaching the external IP is masqueraded too (externalTrafficPolicy Cluster:
kube-proxy marks all traffic to external IPs for masquerade), while its ClusterIP stays
reachable without masquerade; an off-cluster client reaching the ClusterIP itself is
masqueraded (kube-proxy's cluster-CIDR rule).",
        docs(&external_ip_service()),
    );
    let eip = (ip("198.51.100.20"), 80);
    let xs = (EXTERNAL.ip, 42000);
    let p = b.snat(xs, eip, L4Proto::Tcp, NODE_IP, WEB_BE);
    let ms = (NODE_IP, p);
    b.forward(
        "external client SYN to 198.51.100.20:80",
        &EXTERNAL,
        42000,
        eip,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        ms,
        WEB_BE,
    );
    b.forward(
        "backend SYN-ACK: from 198.51.100.20:80",
        &WEB,
        8080,
        ms,
        tcp(SYN | ACK, 50, 2, b""),
        "reply",
        &EXTERNAL,
        eip,
        xs,
    );
    b.forward(
        "client ACK",
        &EXTERNAL,
        42000,
        eip,
        tcp(ACK, 2, 51, b""),
        "established",
        &WEB,
        ms,
        WEB_BE,
    );
    let cs = (CLIENT.ip, 42001);
    let p = b.snat(cs, eip, L4Proto::Tcp, NODE_IP, WEB_BE);
    let ms = (NODE_IP, p);
    b.forward(
        "pod SYN to the external IP: masqueraded too",
        &CLIENT,
        42001,
        eip,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        ms,
        WEB_BE,
    );
    b.forward(
        "backend SYN-ACK to the pod: from 198.51.100.20:80",
        &WEB,
        8080,
        ms,
        tcp(SYN | ACK, 60, 2, b""),
        "reply",
        &CLIENT,
        eip,
        cs,
    );
    let vip = (ip("10.96.0.50"), 80);
    let cs2 = (CLIENT.ip, 42002);
    b.forward(
        "pod SYN to the ClusterIP 10.96.0.50:80: not masqueraded",
        &CLIENT,
        42002,
        vip,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        cs2,
        WEB_BE,
    );
    let xs3 = (EXTERNAL.ip, 42003);
    let p = b.snat(xs3, vip, L4Proto::Tcp, NODE_IP, WEB_BE);
    b.forward(
        "external client SYN to the ClusterIP (routed to the node): masqueraded, the source is outside the cluster CIDR",
        &EXTERNAL, 42003, vip, tcp(SYN, 1, 0, b""), "new_flow", &WEB, (NODE_IP, p), WEB_BE,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// e. hairpin

fn hairpin() -> Scenario {
    let mut b = Builder::new(
        "hairpin",
        "The backend pod reaches itself through its own ClusterIP (10.244.1.10 ->
10.96.0.10:80 -> 10.244.1.10:8080). Proves: hairpin masquerade (without it the pod would
see a packet from itself and answer itself directly), the translated packet going back out
of the veth it came in on, and the reply reverse-translated (source 10.96.0.10:80,
destination the pod's own original port).",
        docs(&web_service()),
    );
    let ws = (WEB.ip, 40100);
    let p = b.snat(ws, WEB_VIP, L4Proto::Tcp, NODE_IP, WEB_BE);
    let ms = (NODE_IP, p);
    b.forward(
        format!("pod SYN to its own ClusterIP: masqueraded to 192.168.50.2:{p}"),
        &WEB,
        40100,
        WEB_VIP,
        tcp(SYN, 10, 0, b""),
        "new_flow",
        &WEB,
        ms,
        WEB_BE,
    );
    b.forward(
        "pod (as server) SYN-ACK to the masquerade address",
        &WEB,
        8080,
        ms,
        tcp(SYN | ACK, 20, 11, b""),
        "reply",
        &WEB,
        WEB_VIP,
        ws,
    );
    b.forward(
        "pod (as client) ACK",
        &WEB,
        40100,
        WEB_VIP,
        tcp(ACK, 11, 21, b""),
        "established",
        &WEB,
        ms,
        WEB_BE,
    );
    b.forward(
        "pod (as client) request",
        &WEB,
        40100,
        WEB_VIP,
        tcp(PSH | ACK, 11, 21, b"ping"),
        "established",
        &WEB,
        ms,
        WEB_BE,
    );
    b.forward(
        "pod (as server) response",
        &WEB,
        8080,
        ms,
        tcp(PSH | ACK, 21, 15, b"pong"),
        "reply",
        &WEB,
        WEB_VIP,
        ws,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// f. no-endpoints

fn no_endpoints() -> Scenario {
    let manifests = docs(&[service(
        "empty",
        "  type: NodePort
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ipFamilies: [IPv4]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30020}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}",
        "",
    )]);
    let mut b = Builder::new(
        "no-endpoints",
        "A service with no endpoints (no EndpointSlice at all). Proves kxp answers as
kube-proxy's REJECT rules do, with an ICMP destination unreachable / port unreachable
(type 3 code 3): from the address the client used (ClusterIP or node address) to the
client, out of the interface the frame came in on, to the sender's MAC, TTL 64, quoting
the offending IP packet unchanged (TTL not decremented). Covered: TCP SYN and UDP to the
ClusterIP, UDP to the NodePort from an external client with a 1000-byte datagram (the quote
is cut at 548 bytes so the answer is 576 bytes, RFC 1812 §4.3.2.3), the same on VLAN 100
(the answer goes back on the same VLAN), and a retransmitted SYN rejected again (a reject
creates no state). A datagram whose source is not a single host (0.0.0.0, multicast) gets no
ICMP error (RFC 1122 §3.2.2, RFC 1812 §4.3.2.7): dropped as `reject_not_possible`.",
        manifests,
    );
    let vip80 = (ip("10.96.0.20"), 80);
    let vip53 = (ip("10.96.0.20"), 53);
    let syn = b.send(&CLIENT, 40200, vip80, tcp(SYN, 77, 0, b""));
    b.frame(
        "pod SYN to 10.96.0.20:80: port unreachable from 10.96.0.20",
        syn.bytes(),
        expect_reject(
            "no_endpoints",
            &CLIENT.iface,
            &rejected(&syn, &CLIENT.iface),
        ),
    );
    let p = b.send(
        &CLIENT,
        40201,
        vip53,
        udp(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01"),
    );
    b.frame(
        "pod UDP query to 10.96.0.20:53",
        p.bytes(),
        expect_reject("no_endpoints", &CLIENT.iface, &rejected(&p, &CLIENT.iface)),
    );
    let big = vec![0x5a; 1000];
    let p = b.send(&EXTERNAL, 5600, (NODE_IP, 30053), udp(&big));
    b.frame(
        "external 1000-byte UDP datagram to NodePort 192.168.50.2:30053: quote cut to 548 bytes",
        p.bytes(),
        expect_reject(
            "no_endpoints",
            &EXTERNAL.iface,
            &rejected(&p, &EXTERNAL.iface),
        ),
    );
    let mut p = b.send(&EXTERNAL, 5601, (NODE_IP, 30053), udp(b"tagged"));
    p.vlans = vec![VlanTag::dot1q(100)];
    b.frame(
        "the same on VLAN 100: answered on VLAN 100",
        p.bytes(),
        expect_reject(
            "no_endpoints",
            &EXTERNAL.iface,
            &rejected(&p, &EXTERNAL.iface),
        ),
    );
    b.frame(
        "the pod's SYN retransmitted: rejected again",
        syn.bytes(),
        expect_reject(
            "no_endpoints",
            &CLIENT.iface,
            &rejected(&syn, &CLIENT.iface),
        ),
    );
    for (src, what) in [
        ("0.0.0.0", "the unspecified address"),
        ("224.0.0.9", "a multicast address"),
    ] {
        let forged = Peer {
            ip: ip(src),
            ..EXTERNAL
        };
        let p = b.send(&forged, 520, (NODE_IP, 30053), udp(b"no single host"));
        b.frame(
            format!("UDP to the NodePort from {src} ({what}): no ICMP error may go there (RFC 1122 3.2.2)"),
            p.bytes(),
            expect_drop("reject_not_possible", &EXTERNAL.iface),
        );
    }
    b.done()
}

// ---------------------------------------------------------------------------------------
// g. unknown-port

fn unknown_port() -> Scenario {
    let mut b = Builder::new(
        "unknown-port",
        "Addresses in the service CIDR that do not lead to a service port, as kube-proxy's
nftables mode treats them. Proves: a ClusterIP on a port (or protocol) the service does not
expose is rejected (`unknown_port`, ICMP port unreachable from the ClusterIP); an address
in the service CIDR that no service owns is dropped (`unallocated_service_ip`) whatever
the protocol; ICMP echo to a ClusterIP is left to the kernel; and the service's real port
still works.",
        docs(&web_service()),
    );
    let vip = ip("10.96.0.10");
    let p = b.send(&CLIENT, 40300, (vip, 81), tcp(SYN, 5, 0, b""));
    b.frame(
        "pod SYN to 10.96.0.10:81 (the service exposes 80 only)",
        p.bytes(),
        expect_reject("unknown_port", &CLIENT.iface, &rejected(&p, &CLIENT.iface)),
    );
    let p = b.send(&CLIENT, 40301, (vip, 80), udp(b"udp to a TCP port"));
    b.frame(
        "pod UDP to 10.96.0.10:80 (the service's port 80 is TCP)",
        p.bytes(),
        expect_reject("unknown_port", &CLIENT.iface, &rejected(&p, &CLIENT.iface)),
    );
    let p = b.send(&CLIENT, 40302, (ip("10.96.0.99"), 80), tcp(SYN, 5, 0, b""));
    b.frame(
        "pod SYN to 10.96.0.99:80, in the service CIDR but no service's",
        p.bytes(),
        expect_drop("unallocated_service_ip", &CLIENT.iface),
    );
    let p = b.send(&CLIENT, 40303, (ip("10.96.0.99"), 53), udp(b"q"));
    b.frame(
        "pod UDP to 10.96.0.99:53",
        p.bytes(),
        expect_drop("unallocated_service_ip", &CLIENT.iface),
    );
    let p = b.send(
        &CLIENT,
        0,
        (vip, 0),
        L4::Icmp4(
            Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 1 }),
            b"ping ClusterIP".to_vec(),
        ),
    );
    b.frame(
        "pod ICMP echo to 10.96.0.10: not kxp's to answer",
        p.bytes(),
        expect_pass("icmp_not_tracked", &CLIENT.iface),
    );
    let cs = (CLIENT.ip, 40304);
    b.forward(
        "pod SYN to 10.96.0.10:80: the real port",
        &CLIENT,
        40304,
        WEB_VIP,
        tcp(SYN, 5, 0, b""),
        "new_flow",
        &WEB,
        cs,
        WEB_BE,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// h. ipv6-clusterip

fn ipv6_clusterip() -> Scenario {
    let manifests = docs(&[
        service(
            "web6",
            "  type: ClusterIP
  clusterIP: fd00:96::10
  clusterIPs: [fd00:96::10]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "",
        ),
        slice(
            "web6-abcde",
            "web6",
            "IPv6",
            &[("http", "TCP", 8080)],
            &[("fd00:244::1:a", "node-a")],
        ),
    ]);
    let mut b = Builder::new(
        "ipv6-clusterip",
        "An IPv6 pod (fd00:244::1:2) talks TCP to an IPv6 ClusterIP ([fd00:96::10]:80 ->
[fd00:244::1:a]:8080). Proves: IPv6 DNAT and reverse NAT, hop limit 64 -> 63, TCP
checksum recomputed over the IPv6 pseudo-header, MACs from the IPv6 neighbour entries; an
unknown port on the IPv6 ClusterIP answered with ICMPv6 destination unreachable / port
unreachable (type 1 code 4) from the ClusterIP; an unallocated address in the IPv6 service
CIDR dropped; a SYN behind a Destination Options extension header is found and forwarded
with the header intact; an atomic fragment (RFC 6946) is a whole packet and forwarded, a
real fragment to the ClusterIP is dropped.",
        manifests,
    );
    let c6 = net::client6();
    let w6 = net::web6();
    let vip = (ip("fd00:96::10"), 80);
    let cs = (c6.ip, 40000);
    let be = (w6.ip, 8080);
    b.forward(
        "pod SYN to [fd00:96::10]:80",
        &c6,
        40000,
        vip,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &w6,
        cs,
        be,
    );
    b.forward(
        "backend SYN-ACK: from [fd00:96::10]:80",
        &w6,
        8080,
        cs,
        tcp(SYN | ACK, 100, 2, b""),
        "reply",
        &c6,
        vip,
        cs,
    );
    b.forward(
        "pod ACK",
        &c6,
        40000,
        vip,
        tcp(ACK, 2, 101, b""),
        "established",
        &w6,
        cs,
        be,
    );
    b.forward(
        "pod request",
        &c6,
        40000,
        vip,
        tcp(PSH | ACK, 2, 101, b"GET /v6 HTTP/1.1\r\n\r\n"),
        "established",
        &w6,
        cs,
        be,
    );
    b.forward(
        "backend response",
        &w6,
        8080,
        cs,
        tcp(PSH | ACK, 101, 22, b"HTTP/1.1 204 No Content\r\n\r\n"),
        "reply",
        &c6,
        vip,
        cs,
    );
    let cs2 = (c6.ip, 40003);
    let mut p = b.send(&c6, 40003, vip, tcp(SYN, 1, 0, b""));
    if let Ip::V6 { exts, .. } = &mut p.ip {
        // Destination Options header carrying a PadN option (RFC 8200 §4.2, §4.6).
        *exts = vec![(60, vec![1, 4, 0, 0, 0, 0])];
    }
    let out = crate::forwarded(&p, &w6, cs2, be);
    b.frame(
        "pod SYN behind a Destination Options header: forwarded, header kept",
        p.bytes(),
        expect_forward("new_flow", &c6.iface, &out, &w6),
    );
    let cs3 = (c6.ip, 40004);
    let mut p = b.send(&c6, 40004, vip, tcp(SYN, 1, 0, b""));
    if let Ip::V6 { exts, .. } = &mut p.ip {
        // An atomic fragment: Fragment header, offset 0, M clear (RFC 6946: not a fragment).
        *exts = vec![(44, vec![0, 0, 0x12, 0x34, 0x56, 0x78])];
    }
    let out = crate::forwarded(&p, &w6, cs3, be);
    b.frame(
        "pod SYN in an atomic fragment (offset 0, M clear): a whole packet, forwarded",
        p.bytes(),
        expect_forward("new_flow", &c6.iface, &out, &w6),
    );
    let mut p = b.send(&c6, 40005, vip, tcp(SYN, 1, 0, b""));
    if let Ip::V6 { exts, .. } = &mut p.ip {
        // First fragment: offset 0, M set.
        *exts = vec![(44, vec![0, 0x01, 0x12, 0x34, 0x56, 0x79])];
    }
    b.frame(
        "first fragment (M set) of a packet to [fd00:96::10]: dropped, kxp does not reassemble",
        p.bytes(),
        expect_drop("fragment_to_service", &c6.iface),
    );
    let p = b.send(&c6, 40001, (vip.0, 81), tcp(SYN, 1, 0, b""));
    b.frame(
        "pod SYN to [fd00:96::10]:81: ICMPv6 port unreachable",
        p.bytes(),
        expect_reject("unknown_port", &c6.iface, &rejected(&p, &c6.iface)),
    );
    let p = b.send(&c6, 40002, (ip("fd00:96::99"), 80), tcp(SYN, 1, 0, b""));
    b.frame(
        "pod SYN to [fd00:96::99]:80, unallocated",
        p.bytes(),
        expect_drop("unallocated_service_ip", &c6.iface),
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// i. icmp-frag-needed

/// An ICMP error as `from` sends it: DF clear (as Linux sends ICMP errors).
fn icmp_error(b: &mut Builder, from: &Peer, dst: IpAddr, l4: L4) -> Packet {
    let mut p = b.send(from, 0, (dst, 0), l4);
    if let Ip::V4 { df, .. } = &mut p.ip {
        *df = false;
    }
    p
}

/// The first `max` bytes of `p`'s IP packet with its TTL / hop limit set to `ttl`.
fn quote(p: &Packet, ttl: u8, max: usize) -> Vec<u8> {
    let mut q = p.clone();
    q.ip.set_ttl(ttl);
    let mut bytes = q.ip_bytes();
    bytes.truncate(max);
    bytes
}

fn icmp_frag_needed() -> Scenario {
    let manifests = docs(&[
        service(
            "upload",
            "  type: NodePort
  clusterIP: 10.96.0.60
  clusterIPs: [10.96.0.60, \"fd00:96::60\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}",
            "",
        ),
        slice(
            "upload-v4",
            "upload",
            "IPv4",
            &[("http", "TCP", 8080)],
            &[("10.244.1.10", "node-a")],
        ),
        slice(
            "upload-v6",
            "upload",
            "IPv6",
            &[("http", "TCP", 8080)],
            &[("fd00:244::1:a", "node-a")],
        ),
    ]);
    let mut b = Builder::new(
        "icmp-frag-needed",
        "Path MTU discovery through a masqueraded NodePort flow (dual-stack service, both
families). Proves ICMP errors about a NATed flow are translated like the flow itself:
* the backend sends fragmentation needed (type 3 code 4, MTU 1400) quoting the
  masqueraded packet it got (192.168.50.2:P -> 10.244.1.10:8080); kxp sends it to the
  client from the node address, the quote rewritten to what the client sent
  (203.0.113.7:43000 -> 192.168.50.2:30080: inner addresses, ports, inner IPv4 header
  checksum, inner TCP checksum), the ICMP checksum recomputed, outer TTL decremented;
* a router beyond the uplink sends fragmentation needed (MTU 1280) about a reply kxp
  sent to the client (192.168.50.2:30080 -> 203.0.113.7:43000); kxp sends it to the
  backend, the quote rewritten to what the backend sent (10.244.1.10:8080 ->
  192.168.50.2:P), the outer source (the router) kept;
* IPv6: the backend sends Packet Too Big (type 2, MTU 1280) quoting the masqueraded
  packet (cut at 1232 bytes so that the error fits 1280); kxp sends it to the client from
  the node's IPv6 address with the quote translated and the ICMPv6 checksum (pseudo-header
  included) recomputed.",
        manifests,
    );
    // IPv4.
    let np = (NODE_IP, 30080);
    let xs = (EXTERNAL.ip, 43000);
    let p = b.snat(xs, np, L4Proto::Tcp, NODE_IP, WEB_BE);
    let ms = (NODE_IP, p);
    b.forward(
        format!("client SYN to NodePort 192.168.50.2:30080: masqueraded to 192.168.50.2:{p}"),
        &EXTERNAL,
        43000,
        np,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        ms,
        WEB_BE,
    );
    b.forward(
        "backend SYN-ACK",
        &WEB,
        8080,
        ms,
        tcp(SYN | ACK, 500, 2, b""),
        "reply",
        &EXTERNAL,
        np,
        xs,
    );
    b.forward(
        "client ACK",
        &EXTERNAL,
        43000,
        np,
        tcp(ACK, 2, 501, b""),
        "established",
        &WEB,
        ms,
        WEB_BE,
    );
    let (big_in, big_out) = b.forward(
        "client sends 1400 bytes",
        &EXTERNAL,
        43000,
        np,
        tcp(PSH | ACK, 2, 501, &[0x42; 1400]),
        "established",
        &WEB,
        ms,
        WEB_BE,
    );
    let frag_needed = |mtu| {
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        })
    };
    // The backend quotes what it received: the masqueraded packet (TTL 56 after kxp).
    let err = icmp_error(
        &mut b,
        &WEB,
        NODE_IP,
        L4::Icmp4(frag_needed(1400), quote(&big_out, big_out.ip.ttl(), 548)),
    );
    let mut out = err.clone();
    out.ip.set_addrs(NODE_IP, EXTERNAL.ip);
    out.ip.set_ttl(err.ip.ttl() - 1);
    out.l4 = L4::Icmp4(frag_needed(1400), quote(&big_in, big_in.ip.ttl() - 1, 548));
    out.eth_src = EXTERNAL.iface.mac;
    out.eth_dst = EXTERNAL.mac;
    out.pad_to = 0;
    b.frame(
        "backend: fragmentation needed (MTU 1400) quoting 192.168.50.2:P > 10.244.1.10:8080; to the client, quoting 203.0.113.7:43000 > 192.168.50.2:30080",
        err.bytes(),
        expect_forward("icmp_related", &WEB.iface, &out, &EXTERNAL),
    );
    let (reply_in, reply_out) = b.forward(
        "backend sends 1400 bytes back",
        &WEB,
        8080,
        ms,
        tcp(PSH | ACK, 501, 1402, &[0x24; 1400]),
        "reply",
        &EXTERNAL,
        np,
        xs,
    );
    // A router two hops out quotes our reply as it got it (TTL 63 - 1 = 62).
    let far = net::FAR_ROUTER;
    let err = icmp_error(
        &mut b,
        &far,
        NODE_IP,
        L4::Icmp4(frag_needed(1280), quote(&reply_out, 62, 548)),
    );
    let mut out = err.clone();
    out.ip.set_addrs(far.ip, WEB.ip);
    out.ip.set_ttl(err.ip.ttl() - 1);
    out.l4 = L4::Icmp4(frag_needed(1280), quote(&reply_in, 62, 548));
    out.eth_src = WEB.iface.mac;
    out.eth_dst = WEB.mac;
    out.pad_to = 0;
    b.frame(
        "router 198.18.0.1: fragmentation needed (MTU 1280) quoting 192.168.50.2:30080 > 203.0.113.7:43000; to the backend, quoting 10.244.1.10:8080 > 192.168.50.2:P",
        err.bytes(),
        expect_forward("icmp_related", &far.iface, &out, &WEB),
    );

    // IPv6.
    let x6 = net::external6();
    let w6 = net::web6();
    let np6 = (net::node_ip6(), 30080);
    let xs6 = (x6.ip, 43001);
    let be6 = (w6.ip, 8080);
    let p6 = b.snat(xs6, np6, L4Proto::Tcp, net::node_ip6(), be6);
    let ms6 = (net::node_ip6(), p6);
    b.forward(
        format!("IPv6 client SYN to NodePort [fd00:50::2]:30080: masqueraded to [fd00:50::2]:{p6}"),
        &x6,
        43001,
        np6,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &w6,
        ms6,
        be6,
    );
    b.forward(
        "backend SYN-ACK",
        &w6,
        8080,
        ms6,
        tcp(SYN | ACK, 900, 2, b""),
        "reply",
        &x6,
        np6,
        xs6,
    );
    let (big_in, big_out) = b.forward(
        "IPv6 client sends 1400 bytes",
        &x6,
        43001,
        np6,
        tcp(PSH | ACK, 2, 901, &[0x66; 1400]),
        "established",
        &w6,
        ms6,
        be6,
    );
    let ptb = Icmpv6Type::PacketTooBig { mtu: 1280 };
    let err = icmp_error(
        &mut b,
        &w6,
        net::node_ip6(),
        L4::Icmp6(ptb, quote(&big_out, big_out.ip.ttl(), 1232)),
    );
    let mut out = err.clone();
    out.ip.set_addrs(net::node_ip6(), x6.ip);
    out.ip.set_ttl(err.ip.ttl() - 1);
    out.l4 = L4::Icmp6(ptb, quote(&big_in, big_in.ip.ttl() - 1, 1232));
    out.eth_src = x6.iface.mac;
    out.eth_dst = x6.mac;
    out.pad_to = 0;
    b.frame(
        "backend: ICMPv6 packet too big (MTU 1280) quoting the masqueraded packet; to the client, quote translated",
        err.bytes(),
        expect_forward("icmp_related", &w6.iface, &out, &x6),
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// icmp-unreachable-udp

fn dns_service() -> Vec<String> {
    vec![
        service(
            "dns",
            "  type: NodePort
  clusterIP: 10.96.0.53
  clusterIPs: [10.96.0.53]
  ipFamilies: [IPv4]
  ports:
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}",
            "",
        ),
        slice(
            "dns-abcde",
            "dns",
            "IPv4",
            &[("dns", "UDP", 5353)],
            &[("10.244.1.10", "node-a")],
        ),
    ]
}

/// `err` (an ICMP error as it arrived) as it must leave towards `to`: outer addresses
/// `src` -> `to.ip`, TTL one less, the ICMP message replaced by `l4`, MACs of the hop.
fn translated_error(err: &Packet, src: IpAddr, to: &Peer, l4: L4) -> Packet {
    let mut out = err.clone();
    out.ip.set_addrs(src, to.ip);
    out.ip.set_ttl(err.ip.ttl() - 1);
    out.l4 = l4;
    out.eth_src = to.iface.mac;
    out.eth_dst = to.mac;
    out.vlans.clear();
    out.pad_to = 0;
    out
}

fn icmp_unreachable_udp() -> Scenario {
    let mut b = Builder::new(
        "icmp-unreachable-udp",
        "ICMP errors about UDP flows, in both directions, with and without masquerade:
* a pod queries the DNS ClusterIP, the backend's port is closed and it answers port
  unreachable quoting 10.244.1.2:P -> 10.244.1.10:5353; kxp sends it to the pod from the
  ClusterIP, quoting the pod's own query (10.244.1.2:P -> 10.96.0.53:53), inner UDP
  checksum and inner IPv4 header checksum fixed: the resolver sees the error it expects;
* an external client's port closes after its query was answered through the NodePort: its
  port unreachable (quoting 192.168.50.2:30053 -> 203.0.113.7:5600) goes to the backend
  with the outer source masqueraded like the flow (192.168.50.2) and the quote turned into
  the backend's own answer (10.244.1.10:5353 -> 192.168.50.2:M);
* a router that quotes only the IP header and 8 bytes (RFC 792) sends time exceeded about
  an answer: the ports are rewritten, the inner UDP checksum is already in the 8 bytes and
  is fixed too; the router's own address stays the outer source.",
        docs(&dns_service()),
    );
    let vip = (ip("10.96.0.53"), 53);
    let be = (WEB.ip, 5353);
    let cs = (CLIENT.ip, 33000);
    let query =
        b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x07default\x00\x00\x01\x00\x01";
    let (q_in, q_out) = b.forward(
        "pod DNS query to 10.96.0.53:53",
        &CLIENT,
        33000,
        vip,
        udp(query),
        "new_flow",
        &WEB,
        cs,
        be,
    );
    let unreach = || Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
    let err = icmp_error(
        &mut b,
        &WEB,
        CLIENT.ip,
        L4::Icmp4(unreach(), q_out.ip_bytes()),
    );
    let out = translated_error(
        &err,
        vip.0,
        &CLIENT,
        L4::Icmp4(unreach(), quote(&q_in, q_in.ip.ttl() - 1, 548)),
    );
    b.frame(
        "backend: port unreachable quoting 10.244.1.2:33000 > 10.244.1.10:5353; to the pod from 10.96.0.53, quoting 10.244.1.2:33000 > 10.96.0.53:53",
        err.bytes(),
        expect_forward("icmp_related", &WEB.iface, &out, &CLIENT),
    );

    let np = (NODE_IP, 30053);
    let xs = (EXTERNAL.ip, 5600);
    let m = b.snat(xs, np, L4Proto::Udp, NODE_IP, be);
    let ms = (NODE_IP, m);
    b.forward(
        format!("external query to NodePort 30053: masqueraded to port {m}"),
        &EXTERNAL,
        5600,
        np,
        udp(b"query"),
        "new_flow",
        &WEB,
        ms,
        be,
    );
    let (a_in, a_out) = b.forward(
        "backend answer",
        &WEB,
        5353,
        ms,
        udp(b"answer"),
        "reply",
        &EXTERNAL,
        np,
        xs,
    );
    let mut ext_host = EXTERNAL;
    ext_host.ttl = 57;
    // The client quotes the answer as it arrived (TTL 63 - 6 routers = 57).
    let err = icmp_error(
        &mut b,
        &ext_host,
        NODE_IP,
        L4::Icmp4(unreach(), quote(&a_out, 57, 548)),
    );
    let out = translated_error(
        &err,
        NODE_IP,
        &WEB,
        L4::Icmp4(unreach(), quote(&a_in, 57, 548)),
    );
    b.frame(
        "client: port unreachable quoting 192.168.50.2:30053 > 203.0.113.7:5600; to the backend from 192.168.50.2, quoting 10.244.1.10:5353 > 192.168.50.2:M",
        err.bytes(),
        expect_forward("icmp_related", &EXTERNAL.iface, &out, &WEB),
    );
    let (a_in, a_out) = b.forward(
        "another answer",
        &WEB,
        5353,
        ms,
        udp(b"answer 2"),
        "reply",
        &EXTERNAL,
        np,
        xs,
    );
    let far = net::FAR_ROUTER;
    let exceeded = || Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
    let err = icmp_error(
        &mut b,
        &far,
        NODE_IP,
        L4::Icmp4(exceeded(), quote(&a_out, 1, 28)),
    );
    let out = translated_error(
        &err,
        far.ip,
        &WEB,
        L4::Icmp4(exceeded(), quote(&a_in, 1, 28)),
    );
    b.frame(
        "router 198.18.0.1: time exceeded quoting 20 + 8 bytes of the answer; to the backend, quote translated",
        err.bytes(),
        expect_forward("icmp_related", &far.iface, &out, &WEB),
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// conntrack-timeout

fn conntrack_timeout() -> Scenario {
    let mut parts = dns_service();
    parts.extend(web_service());
    let mut b = Builder::new(
        "conntrack-timeout",
        "Conntrack timeouts with the capture's clock (kxp's defaults: UDP 30 s until a reply is
seen, 120 s after; TCP established 86 400 s; expiry at 1 s granularity, a flow lives
between its timeout and one second more). Proves: an unanswered UDP flow through the
NodePort is forgotten 32 s later, so a late answer to the masquerade port is not
translated (it reaches the kernel as `not_service`) and the client's next datagram is a new
flow (which gets the same masquerade port again, its old reply tuple being free); an
established TCP connection is still tracked after 100 s of silence.",
        docs(&parts),
    );
    let np = (NODE_IP, 30053);
    let be = (WEB.ip, 5353);
    let xs = (EXTERNAL.ip, 7000);
    let key0 = key(xs, np, L4Proto::Udp);
    let m = crate::policy::first_probe(&key0);
    b.forward(
        format!("external query to NodePort 30053: masqueraded to port {m}"),
        &EXTERNAL,
        7000,
        np,
        udp(b"q1"),
        "new_flow",
        &WEB,
        (NODE_IP, m),
        be,
    );
    let cs = (CLIENT.ip, 47000);
    b.forward(
        "pod SYN to 10.96.0.10:80",
        &CLIENT,
        47000,
        WEB_VIP,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        cs,
        WEB_BE,
    );
    b.forward(
        "backend SYN-ACK",
        &WEB,
        8080,
        cs,
        tcp(SYN | ACK, 9, 2, b""),
        "reply",
        &CLIENT,
        WEB_VIP,
        cs,
    );
    b.forward(
        "pod ACK",
        &CLIENT,
        47000,
        WEB_VIP,
        tcp(ACK, 2, 10, b""),
        "established",
        &WEB,
        cs,
        WEB_BE,
    );
    b.wait(Duration::from_secs(32));
    let p = b.send(&WEB, 5353, (NODE_IP, m), udp(b"late answer"));
    b.frame(
        format!("32 s later: the backend's late answer to 192.168.50.2:{m}: the flow is gone"),
        p.bytes(),
        expect_pass("not_service", &WEB.iface),
    );
    b.forward(
        format!("the client's next query: a new flow, masquerade port {m} again"),
        &EXTERNAL,
        7000,
        np,
        udp(b"q2"),
        "new_flow",
        &WEB,
        (NODE_IP, m),
        be,
    );
    b.wait(Duration::from_secs(68));
    b.forward(
        "100 s after the handshake: the pod's data still rides its connection",
        &CLIENT,
        47000,
        WEB_VIP,
        tcp(PSH | ACK, 2, 10, b"still here"),
        "established",
        &WEB,
        cs,
        WEB_BE,
    );
    b.forward(
        "and the answer is still reverse-translated",
        &WEB,
        8080,
        cs,
        tcp(PSH | ACK, 10, 12, b"ok"),
        "reply",
        &CLIENT,
        WEB_VIP,
        cs,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// j. malformed

/// Sets the IPv4 total length at `l3` and fixes the header checksum.
fn set_total_len(frame: &mut [u8], l3: usize, len: u16) {
    frame[l3 + 2..l3 + 4].copy_from_slice(&len.to_be_bytes());
    fix_ipv4_checksum(frame, l3);
}

fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    frame[l3 + 10..l3 + 12].fill(0);
    let c = crate::packet::internet_checksum(&frame[l3..l3 + ihl.max(20)]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

fn malformed() -> Scenario {
    let mut parts = web_service();
    parts.extend(external_ip_service());
    parts.push(service(
        "remote",
        "  type: ClusterIP
  clusterIP: 10.96.0.70
  clusterIPs: [10.96.0.70]
  ipFamilies: [IPv4]
  externalIPs: [198.51.100.70]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
        "",
    ));
    parts.push(slice(
        "remote-abcde",
        "remote",
        "IPv4",
        &[("http", "TCP", 8080)],
        &[("10.244.2.20", "node-b")],
    ));
    let mut b = Builder::new(
        "malformed",
        "Broken, unusual and edge-case frames. Proves every one gets a verdict with a named
reason and none panics: truncated Ethernet, truncated IPv4 header, IHL < 5, total length
beyond the frame and below the header, bad IPv4 header checksum, wrong IP version for the
EtherType, IPv6 payload length beyond the frame, TCP data offset beyond the segment, a
truncated TCP header, UDP length beyond the datagram (all dropped); TTL 1 to a service
(answered with ICMP time exceeded from the node's address, as the kernel's forwarding path
does: reject `ttl_exceeded`); fragments to a service address (dropped: kxp does not
reassemble) and to a non-service address (passed). Frames that do not parse are taken to
arrive on the first uplink (`--ingress auto` needs a source address). Also what must work:
IPv4 options (Router Alert) to a ClusterIP, forwarded with the options intact and ports
found behind them; an 802.1Q-tagged frame (VLAN 100) from the uplink to an external IP,
forwarded to the pod veth with the tag removed; the same to an external IP whose backend is
on node-b, forwarded out of the uplink with the tag kept; a QinQ (802.1ad + 802.1Q) frame,
passed to the kernel (`stacked_vlan`) without being looked into.",
        docs(&parts),
    );
    let good = b.send(&CLIENT, 40400, WEB_VIP, tcp(SYN, 1, 0, b""));
    let gb = good.bytes();
    let eth0 = &net::ETH0;
    b.frame(
        "10 bytes: truncated Ethernet header",
        gb[..10].to_vec(),
        expect_drop("truncated", eth0),
    );
    b.frame(
        "Ethernet + 12 bytes of IPv4 header",
        gb[..26].to_vec(),
        expect_drop("truncated", eth0),
    );
    let mut f = gb.clone();
    f[14] = 0x44;
    fix_ipv4_checksum(&mut f, 14);
    b.frame(
        "IPv4 IHL 4 (16-byte header)",
        f,
        expect_drop("bad_ihl", eth0),
    );
    let mut f = gb.clone();
    let total = u16::from_be_bytes([f[16], f[17]]);
    set_total_len(&mut f, 14, total + 100);
    b.frame(
        "IPv4 total length 100 bytes beyond the frame",
        f,
        expect_drop("bad_ip_length", eth0),
    );
    let mut f = gb.clone();
    set_total_len(&mut f, 14, 16);
    b.frame(
        "IPv4 total length 16, shorter than the header",
        f,
        expect_drop("bad_ip_length", eth0),
    );
    let mut f = gb.clone();
    f[24] ^= 0xff;
    b.frame(
        "IPv4 header checksum wrong",
        f,
        expect_drop("bad_ip_checksum", eth0),
    );
    let mut f = gb.clone();
    f[14] = 0x65;
    b.frame(
        "EtherType IPv4, version field 6",
        f,
        expect_drop("bad_ip_version", eth0),
    );
    let c6 = net::client6();
    let mut f = b
        .send(&c6, 40401, (ip("fd00:96::10"), 80), tcp(SYN, 1, 0, b""))
        .bytes();
    let plen = u16::from_be_bytes([f[18], f[19]]);
    f[18..20].copy_from_slice(&(plen + 8).to_be_bytes());
    b.frame(
        "IPv6 payload length 8 bytes beyond the frame",
        f,
        expect_drop("bad_ip_length", eth0),
    );
    let mut f = b.send(&CLIENT, 40402, WEB_VIP, tcp(ACK, 1, 1, b"")).bytes();
    f[14 + 20 + 12] = 0xf0;
    b.frame(
        "TCP data offset 15 (60 bytes) in a 20-byte segment",
        f,
        expect_drop("bad_l4_header", eth0),
    );
    let mut f = b.send(&CLIENT, 40403, WEB_VIP, tcp(ACK, 1, 1, b"")).bytes();
    f.truncate(14 + 20 + 10);
    set_total_len(&mut f, 14, 30);
    b.frame(
        "TCP header cut after 10 bytes",
        f,
        expect_drop("truncated", eth0),
    );
    let mut f = b
        .send(&CLIENT, 40404, (ip("10.96.0.10"), 53), udp(b"12345678"))
        .bytes();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    b.frame(
        "UDP length 200 in a 16-byte datagram",
        f,
        expect_drop("bad_l4_header", eth0),
    );
    let p = b.send(&CLIENT, 40405, WEB_VIP, tcp(SYN, 1, 0, b""));
    let mut p1 = p.clone();
    p1.ip.set_ttl(1);
    b.frame(
        "TTL 1 to the ClusterIP: time exceeded from the node",
        p1.bytes(),
        expect_reject(
            "ttl_exceeded",
            &CLIENT.iface,
            &time_exceeded(&p1, &CLIENT.iface, NODE_IP),
        ),
    );

    // Fragments.
    let frag = |b: &mut Builder, dst: IpAddr, mf: bool, offset: u16, payload: &[u8]| {
        let mut p = b.send(
            &CLIENT,
            0,
            (dst, 0),
            L4::Raw {
                proto: 17,
                payload: payload.to_vec(),
            },
        );
        if let Ip::V4 {
            df,
            mf: m,
            frag_offset,
            ..
        } = &mut p.ip
        {
            *df = false;
            *m = mf;
            *frag_offset = offset;
        }
        p
    };
    let mut first = vec![0u8; 64];
    first[..8].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50, 0x05, 0xdc, 0x00, 0x00]);
    let p = frag(&mut b, ip("10.96.0.10"), true, 0, &first);
    b.frame(
        "first fragment (MF, offset 0) to ClusterIP 10.96.0.10",
        p.bytes(),
        expect_drop("fragment_to_service", &CLIENT.iface),
    );
    let p = frag(&mut b, ip("10.96.0.10"), false, 185, &[0x33; 40]);
    b.frame(
        "last fragment (offset 1480) to ClusterIP 10.96.0.10",
        p.bytes(),
        expect_drop("fragment_to_service", &CLIENT.iface),
    );
    let p = frag(&mut b, WEB.ip, true, 0, &first);
    b.frame(
        "first fragment to pod 10.244.1.10 (not a service)",
        p.bytes(),
        expect_pass("fragment", &CLIENT.iface),
    );

    // Well-formed but unusual: must work.
    let mut p = b.send(&CLIENT, 40406, WEB_VIP, tcp(SYN, 1, 0, b""));
    if let Ip::V4 { options, .. } = &mut p.ip {
        *options = vec![0x94, 0x04, 0x00, 0x00]; // Router Alert (RFC 2113)
    }
    let out = forwarded(&p, &WEB, (CLIENT.ip, 40406), WEB_BE);
    b.frame(
        "IPv4 with a Router Alert option (IHL 6) to 10.96.0.10:80: forwarded, option kept",
        p.bytes(),
        expect_forward("new_flow", &CLIENT.iface, &out, &WEB),
    );
    let eip = (ip("198.51.100.20"), 80);
    let mut p = b.send(&EXTERNAL, 42100, eip, tcp(SYN, 1, 0, b""));
    p.vlans = vec![VlanTag::dot1q(100)];
    let port = b.snat((EXTERNAL.ip, 42100), eip, L4Proto::Tcp, NODE_IP, WEB_BE);
    let out = forwarded(&p, &WEB, (NODE_IP, port), WEB_BE);
    b.frame(
        "VLAN 100 SYN to external IP 198.51.100.20:80: to the pod veth untagged",
        p.bytes(),
        expect_forward("new_flow", eth0, &out, &WEB),
    );
    let rip = (ip("198.51.100.70"), 80);
    let rbe = (net::REMOTE_POD.ip, 8080);
    let mut p = b.send(&EXTERNAL, 42101, rip, tcp(SYN, 1, 0, b""));
    p.vlans = vec![VlanTag::dot1q(100)];
    let port = b.snat((EXTERNAL.ip, 42101), rip, L4Proto::Tcp, NODE_IP, rbe);
    let out = forwarded(&p, &net::REMOTE_POD, (NODE_IP, port), rbe);
    b.frame(
        "VLAN 100 SYN to external IP 198.51.100.70:80 (backend on node-b): out of the uplink, tag kept",
        p.bytes(),
        expect_forward("new_flow", eth0, &out, &net::REMOTE_POD),
    );
    let mut p = b.send(&EXTERNAL, 42102, eip, tcp(SYN, 1, 0, b""));
    p.vlans = vec![VlanTag::dot1ad(200), VlanTag::dot1q(100)];
    b.frame(
        "QinQ (802.1ad 200, 802.1Q 100) SYN to 198.51.100.20:80",
        p.bytes(),
        expect_pass("stacked_vlan", eth0),
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// k. non-service

fn non_service() -> Scenario {
    let mut b = Builder::new(
        "non-service",
        "Traffic that is not kxp's: it must reach the kernel untouched and nothing may be
emitted. Pod-to-pod TCP, ARP (`not_ip`; a frame without an IP source is taken to arrive on
the first uplink), ICMP echo to an external address, UDP to an external DNS server, GRE
between nodes (`other_protocol`), ICMPv6 echo, an ICMP error about a flow kxp does not
track, traffic from the node itself, and a pod connecting to a node port no service uses.",
        docs(&web_service()),
    );
    let p = b.send(&CLIENT, 40500, WEB_BE, tcp(SYN, 1, 0, b""));
    b.frame(
        "pod to pod 10.244.1.10:8080 directly",
        p.bytes(),
        expect_pass("not_service", &CLIENT.iface),
    );
    let arp = arp_request(
        CLIENT.mac,
        core::net::Ipv4Addr::new(10, 244, 1, 2),
        core::net::Ipv4Addr::new(10, 244, 1, 1),
    );
    b.frame(
        "ARP who-has 10.244.1.1",
        arp,
        expect_pass("not_ip", &net::ETH0),
    );
    let echo = L4::Icmp4(
        Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 1 }),
        b"abcdefgh".to_vec(),
    );
    let p = b.send(&CLIENT, 0, (ip("8.8.8.8"), 0), echo);
    b.frame(
        "pod ICMP echo to 8.8.8.8",
        p.bytes(),
        expect_pass("icmp_not_tracked", &CLIENT.iface),
    );
    let p = b.send(&CLIENT, 40501, (ip("8.8.8.8"), 53), udp(b"dns"));
    b.frame(
        "pod UDP to 8.8.8.8:53",
        p.bytes(),
        expect_pass("not_service", &CLIENT.iface),
    );
    let p = b.send(
        &net::NODE_B,
        0,
        (NODE_IP, 0),
        L4::Raw {
            proto: 47,
            payload: vec![0, 0, 0x08, 0, 0x45, 0, 0, 20],
        },
    );
    b.frame(
        "GRE from node-b to node-a",
        p.bytes(),
        expect_pass("other_protocol", &net::ETH0),
    );
    let c6 = net::client6();
    let echo6 = L4::Icmp6(
        Icmpv6Type::EchoRequest(IcmpEchoHeader { id: 2, seq: 1 }),
        b"v6 ping".to_vec(),
    );
    let p = b.send(&c6, 0, (ip("2001:db8::1"), 0), echo6);
    b.frame(
        "pod ICMPv6 echo to 2001:db8::1",
        p.bytes(),
        expect_pass("icmp_not_tracked", &c6.iface),
    );
    let untracked = send(&CLIENT, 40502, (ip("8.8.8.8"), 53), 0x4242, udp(b"q"));
    let google = Peer {
        ip: ip("8.8.8.8"),
        ..EXTERNAL
    };
    let err = icmp_error(
        &mut b,
        &google,
        CLIENT.ip,
        L4::Icmp4(
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
            untracked.ip_bytes(),
        ),
    );
    b.frame(
        "ICMP port unreachable from 8.8.8.8 about an untracked UDP flow",
        err.bytes(),
        expect_pass("icmp_not_tracked", &net::ETH0),
    );
    let p = b.send(
        &net::NODE_SELF,
        50000,
        (ip("8.8.8.8"), 443),
        tcp(SYN, 1, 0, b""),
    );
    b.frame(
        "node-a's own SYN to 8.8.8.8:443",
        p.bytes(),
        expect_pass("not_service", &net::HOST),
    );
    let p = b.send(&CLIENT, 40503, (NODE_IP, 22), tcp(SYN, 1, 0, b""));
    b.frame(
        "pod SYN to 192.168.50.2:22 (no NodePort there)",
        p.bytes(),
        expect_pass("not_service", &CLIENT.iface),
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// l. affinity

fn affinity() -> Scenario {
    let eps = [
        ("10.244.1.10", "node-a"),
        ("10.244.1.11", "node-a"),
        ("10.244.1.12", "node-a"),
    ];
    let manifests = docs(&[
        service(
            "sticky",
            "  type: ClusterIP
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30]
  ipFamilies: [IPv4]
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP: {timeoutSeconds: 600}
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "",
        ),
        slice(
            "sticky-abcde",
            "sticky",
            "IPv4",
            &[("http", "TCP", 8080)],
            &eps,
        ),
        service(
            "spread",
            "  type: ClusterIP
  clusterIP: 10.96.0.31
  clusterIPs: [10.96.0.31]
  ipFamilies: [IPv4]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "",
        ),
        slice(
            "spread-abcde",
            "spread",
            "IPv4",
            &[("http", "TCP", 8080)],
            &eps,
        ),
    ]);
    let backends = [WEB, net::WEB2, net::WEB3];
    let bes: Vec<(IpAddr, u16)> = backends.iter().map(|p| (p.ip, 8080)).collect();
    let peer_of = |a: (IpAddr, u16)| *backends.iter().find(|p| p.ip == a.0).expect("a backend");
    let sticky = (ip("10.96.0.30"), 80);
    let spread = (ip("10.96.0.31"), 80);
    let pick = |vip, sport| maglev_pick(&bes, &key((CLIENT.ip, sport), vip, L4Proto::Tcp));

    // The first connection's backend is Maglev's choice; the next ones use source ports
    // Maglev alone would send elsewhere, covering both other backends.
    let first_port = 41000u16;
    let chosen = pick(sticky, first_port);
    let mut others: Vec<u16> = Vec::new();
    let mut covered: Vec<(IpAddr, u16)> = Vec::new();
    for sport in first_port + 1..first_port + 200 {
        let m = pick(sticky, sport);
        if m != chosen {
            others.push(sport);
            if !covered.contains(&m) {
                covered.push(m);
            }
        }
        if others.len() >= 3 && covered.len() == 2 {
            break;
        }
    }
    assert_eq!(
        covered.len(),
        2,
        "fixture: could not find ports Maglev spreads"
    );
    // And ports that send the same client to each backend of the service without affinity.
    let mut spread_ports: Vec<(u16, (IpAddr, u16))> = Vec::new();
    for sport in 42000u16..42200 {
        let m = pick(spread, sport);
        if !spread_ports.iter().any(|(_, b)| *b == m) {
            spread_ports.push((sport, m));
        }
    }
    assert_eq!(spread_ports.len(), 3);
    spread_ports.sort_by_key(|(_, b)| *b);

    let description = format!(
        "ClientIP session affinity over three endpoints (10.244.1.10, .11, .12, each on its own
veth). The backend of the first connection is Maglev's choice, computed for the fixture
with the public `kxp_dataplane::maglev` API and kxp-control's backend-id rule (endpoints
sorted by address and port, weight 1, ids from `control/src/compile.rs` `backend_id`,
copied in `pcap-fixtures/src/policy.rs` and checked against the original by the golden
test): {chosen_ip}. The next connections use source ports that Maglev alone would send to
the other two backends ({others:?}); with affinity they all land on {chosen_ip}. A second
service with the same endpoints and no affinity shows, with three source ports, that the
same client is spread over all three backends there. Affinity lasts `timeoutSeconds` (600)
from the client's last new connection: a connection 598 s later still lands on {chosen_ip}
and renews it, so one 300 s after that (898 s after the first ones) does too; one 601 s
after the last goes where Maglev sends it.",
        chosen_ip = chosen.0,
    );
    let mut b = Builder::new("affinity", &description, manifests);
    let to = peer_of(chosen);
    b.forward(
        format!(
            "connection 1 (port {first_port}) SYN to 10.96.0.30:80: Maglev picks {}",
            chosen.0
        ),
        &CLIENT,
        first_port,
        sticky,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &to,
        (CLIENT.ip, first_port),
        chosen,
    );
    b.forward(
        "its SYN-ACK from the chosen backend",
        &to,
        8080,
        (CLIENT.ip, first_port),
        tcp(SYN | ACK, 10, 2, b""),
        "reply",
        &CLIENT,
        sticky,
        (CLIENT.ip, first_port),
    );
    b.forward(
        "its ACK",
        &CLIENT,
        first_port,
        sticky,
        tcp(ACK, 2, 11, b""),
        "established",
        &to,
        (CLIENT.ip, first_port),
        chosen,
    );
    for sport in &others {
        let m = pick(sticky, *sport);
        b.forward(
            format!(
                "new connection from port {sport} (Maglev alone: {}): affinity keeps {}",
                m.0, chosen.0
            ),
            &CLIENT,
            *sport,
            sticky,
            tcp(SYN, 1, 0, b""),
            "new_flow",
            &to,
            (CLIENT.ip, *sport),
            chosen,
        );
    }
    for (sport, m) in &spread_ports {
        b.forward(
            format!("no affinity: port {sport} to 10.96.0.31:80 goes to {}", m.0),
            &CLIENT,
            *sport,
            spread,
            tcp(SYN, 1, 0, b""),
            "new_flow",
            &peer_of(*m),
            (CLIENT.ip, *sport),
            *m,
        );
    }
    // The affinity timeout (600 s) runs from the client's last new connection.
    let mut late = (41500u16..42000).filter(|sp| pick(sticky, *sp) != chosen);
    let (late1, late2, late3) = (
        late.next().unwrap(),
        late.next().unwrap(),
        late.next().unwrap(),
    );
    b.wait(Duration::from_secs(598));
    b.forward(
        format!(
            "598 s later, port {late1} (Maglev alone: {}): still {}",
            pick(sticky, late1).0,
            chosen.0
        ),
        &CLIENT,
        late1,
        sticky,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &to,
        (CLIENT.ip, late1),
        chosen,
    );
    b.wait(Duration::from_secs(300));
    b.forward(
        format!("300 s later (898 s after the first connections), port {late3} (Maglev alone: {}): still {}, the last connection renewed it", pick(sticky, late3).0, chosen.0),
        &CLIENT, late3, sticky, tcp(SYN, 1, 0, b""), "new_flow", &to, (CLIENT.ip, late3), chosen,
    );
    b.wait(Duration::from_secs(601));
    let m = pick(sticky, late2);
    b.forward(
        format!(
            "601 s after that, port {late2}: affinity expired, Maglev's {}",
            m.0
        ),
        &CLIENT,
        late2,
        sticky,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &peer_of(m),
        (CLIENT.ip, late2),
        m,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// m. sctp

fn chunk(ty: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let mut c = vec![ty, flags];
    c.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    c.extend_from_slice(value);
    while c.len() % 4 != 0 {
        c.push(0);
    }
    c
}

fn init_value(tag: u32, tsn: u32, params: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&106_496u32.to_be_bytes()); // a_rwnd
    v.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    v.extend_from_slice(&10u16.to_be_bytes()); // max inbound streams
    v.extend_from_slice(&tsn.to_be_bytes());
    v.extend_from_slice(params);
    v
}

fn sctp() -> Scenario {
    let manifests = docs(&[
        service(
            "diameter",
            "  type: ClusterIP
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80]
  ipFamilies: [IPv4]
  ports:
    - {name: diameter, protocol: SCTP, port: 3868, targetPort: 3869}",
            "",
        ),
        slice(
            "diameter-abcde",
            "diameter",
            "IPv4",
            &[("diameter", "SCTP", 3869)],
            &[("10.244.1.10", "node-a")],
        ),
    ]);
    let mut b = Builder::new(
        "sctp",
        "An SCTP association to a ClusterIP (10.96.0.80:3868 -> 10.244.1.10:3869): INIT,
INIT-ACK, COOKIE-ECHO, COOKIE-ACK, DATA. Proves SCTP is balanced and reverse-translated
like TCP and UDP, and that the CRC32c (which covers the ports but not the addresses) is
recomputed after the port rewrite (the fixture computes it bit by bit, kxp by table).",
        manifests,
    );
    let vip = (ip("10.96.0.80"), 3868);
    let be = (WEB.ip, 3869);
    let cs = (CLIENT.ip, 36000);
    let sctp = |vtag, chunks: Vec<u8>| L4::Sctp {
        sport: 0,
        dport: 0,
        vtag,
        chunks,
    };
    let (ctag, stag) = (0x1122_3344u32, 0x5566_7788u32);
    let cookie = [0xc0, 0x0c, 0x1e, 0x00, 1, 2, 3, 4];
    let mut state_cookie = vec![0x00, 0x07, 0x00, 12];
    state_cookie.extend_from_slice(&cookie);
    b.forward(
        "INIT to 10.96.0.80:3868",
        &CLIENT,
        36000,
        vip,
        sctp(0, chunk(1, 0, &init_value(ctag, 1000, &[]))),
        "new_flow",
        &WEB,
        cs,
        be,
    );
    b.forward(
        "INIT-ACK from the backend",
        &WEB,
        3869,
        cs,
        sctp(ctag, chunk(2, 0, &init_value(stag, 5000, &state_cookie))),
        "reply",
        &CLIENT,
        vip,
        cs,
    );
    b.forward(
        "COOKIE-ECHO",
        &CLIENT,
        36000,
        vip,
        sctp(stag, chunk(10, 0, &cookie)),
        "established",
        &WEB,
        cs,
        be,
    );
    b.forward(
        "COOKIE-ACK",
        &WEB,
        3869,
        cs,
        sctp(ctag, chunk(11, 0, &[])),
        "reply",
        &CLIENT,
        vip,
        cs,
    );
    let mut data = Vec::new();
    data.extend_from_slice(&1000u32.to_be_bytes()); // TSN
    data.extend_from_slice(&[0, 0, 0, 0]); // stream 0, sequence 0
    data.extend_from_slice(&46u32.to_be_bytes()); // PPID: Diameter
    data.extend_from_slice(b"CER from client");
    b.forward(
        "DATA",
        &CLIENT,
        36000,
        vip,
        sctp(stag, chunk(0, 0x03, &data)),
        "established",
        &WEB,
        cs,
        be,
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// n. etp-local

fn traffic_policy_local() -> Scenario {
    let manifests = docs(&[
        service(
            "local-np",
            "  type: NodePort
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90]
  ipFamilies: [IPv4]
  externalTrafficPolicy: Local
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}",
            "",
        ),
        slice(
            "local-np-abcde",
            "local-np",
            "IPv4",
            &[("http", "TCP", 8080)],
            &[("10.244.1.10", "node-a")],
        ),
        service(
            "remote-np",
            "  type: NodePort
  clusterIP: 10.96.0.91
  clusterIPs: [10.96.0.91]
  ipFamilies: [IPv4]
  externalTrafficPolicy: Local
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30091}",
            "",
        ),
        slice(
            "remote-np-abcde",
            "remote-np",
            "IPv4",
            &[("http", "TCP", 8080)],
            &[("10.244.2.20", "node-b")],
        ),
        service(
            "itp-local",
            "  type: ClusterIP
  clusterIP: 10.96.0.92
  clusterIPs: [10.96.0.92]
  ipFamilies: [IPv4]
  internalTrafficPolicy: Local
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}",
            "",
        ),
        slice(
            "itp-local-abcde",
            "itp-local",
            "IPv4",
            &[("http", "TCP", 8080)],
            &[("10.244.2.20", "node-b")],
        ),
    ]);
    let mut b = Builder::new(
        "traffic-policy-local",
        "externalTrafficPolicy: Local. Proves: an external client reaching a NodePort with a
local endpoint keeps its source address (no masquerade) and the reply leaves from the
NodePort; an external client reaching a NodePort whose only endpoint is on another node is
dropped (`no_local_endpoints`); a pod reaching that NodePort uses the cluster-wide
endpoints without masquerade (kube-proxy short-circuits pod traffic to the cluster chain),
out of the uplink to node-b; node-a itself reaching it uses the cluster-wide endpoints and
is masqueraded (kube-proxy masquerades LOCAL-source traffic). internalTrafficPolicy: Local
on a ClusterIP whose only endpoint is on node-b: a pod's SYN is dropped
(`no_local_endpoints`), as kube-proxy drops it.",
        manifests,
    );
    let np = (NODE_IP, 30090);
    let xs = (EXTERNAL.ip, 44000);
    b.forward(
        "external SYN to NodePort 30090: client address kept",
        &EXTERNAL,
        44000,
        np,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        xs,
        WEB_BE,
    );
    b.forward(
        "backend SYN-ACK straight to the client: from 192.168.50.2:30090",
        &WEB,
        8080,
        xs,
        tcp(SYN | ACK, 9, 2, b""),
        "reply",
        &EXTERNAL,
        np,
        xs,
    );
    let np2 = (NODE_IP, 30091);
    let p = b.send(&EXTERNAL, 44001, np2, tcp(SYN, 1, 0, b""));
    b.frame(
        "external SYN to NodePort 30091 (endpoint on node-b only)",
        p.bytes(),
        expect_drop("no_local_endpoints", &net::ETH0),
    );
    let rbe = (net::REMOTE_POD.ip, 8080);
    b.forward(
        "pod SYN to NodePort 30091: cluster-wide endpoint, not masqueraded, out of the uplink",
        &CLIENT,
        44002,
        np2,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &net::REMOTE_POD,
        (CLIENT.ip, 44002),
        rbe,
    );
    let hs = (NODE_IP, 44003);
    let port = b.snat(hs, np2, L4Proto::Tcp, NODE_IP, rbe);
    b.forward(
        format!("node-a's own SYN to its NodePort 30091: masqueraded to port {port}"),
        &net::NODE_SELF,
        44003,
        np2,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &net::REMOTE_POD,
        (NODE_IP, port),
        rbe,
    );
    let p = b.send(&CLIENT, 44004, (ip("10.96.0.92"), 80), tcp(SYN, 1, 0, b""));
    b.frame(
        "pod SYN to ClusterIP 10.96.0.92:80 (internalTrafficPolicy Local, endpoint on node-b only)",
        p.bytes(),
        expect_drop("no_local_endpoints", &CLIENT.iface),
    );
    b.done()
}

// ---------------------------------------------------------------------------------------
// o. lb-source-ranges

fn lb_source_ranges() -> Scenario {
    let manifests = docs(&[
        service(
            "guarded",
            "  type: LoadBalancer
  clusterIP: 10.96.0.45
  clusterIPs: [10.96.0.45]
  ipFamilies: [IPv4]
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports:
    - {name: https, protocol: TCP, port: 443, targetPort: 8443, nodePort: 30445}",
            "  loadBalancer:
    ingress:
      - ip: 198.51.100.45",
        ),
        slice(
            "guarded-abcde",
            "guarded",
            "IPv4",
            &[("https", "TCP", 8443)],
            &[("10.244.1.10", "node-a")],
        ),
    ]);
    let mut b = Builder::new(
        "lb-source-ranges",
        "loadBalancerSourceRanges [203.0.113.0/24] on a LoadBalancer service. Proves: a
client inside the range reaches the LoadBalancer IP; a client outside it is dropped
(`source_range_denied`); the ranges guard the LoadBalancer IP only, so the same outsider
still reaches the service's NodePort (as with kube-proxy).",
        manifests,
    );
    let lb = (ip("198.51.100.45"), 443);
    let be = (WEB.ip, 8443);
    let xs = (EXTERNAL.ip, 45000);
    let port = b.snat(xs, lb, L4Proto::Tcp, NODE_IP, be);
    b.forward(
        "203.0.113.7 SYN to 198.51.100.45:443: allowed",
        &EXTERNAL,
        45000,
        lb,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        (NODE_IP, port),
        be,
    );
    let out = net::OUTSIDER;
    let p = b.send(&out, 45001, lb, tcp(SYN, 1, 0, b""));
    b.frame(
        "198.18.0.5 SYN to 198.51.100.45:443: outside the ranges",
        p.bytes(),
        expect_drop("source_range_denied", &out.iface),
    );
    let np = (NODE_IP, 30445);
    let os = (out.ip, 45002);
    let port = b.snat(os, np, L4Proto::Tcp, NODE_IP, be);
    b.forward(
        "198.18.0.5 SYN to the NodePort 30445: not guarded",
        &out,
        45002,
        np,
        tcp(SYN, 1, 0, b""),
        "new_flow",
        &WEB,
        (NODE_IP, port),
        be,
    );
    b.done()
}
