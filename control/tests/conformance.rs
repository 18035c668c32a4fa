//! Kubernetes Service conformance: kube-proxy's behaviour, case by case, proven through the
//! real replay path (node file -> manifests -> `compile` -> one pipeline `Worker`, frames
//! built with etherparse, ingress picked as `kxp replay --ingress auto` picks it).
//!
//! Each case states the objects (Services and EndpointSlices as YAML), the node (the base
//! node of `conformance/harness.rs`, or it with some lines changed), options, and one or
//! more probes: a packet (source, destination, protocol, port, ingress), sent as one or
//! many new flows, and what kube-proxy does with it: the verdict and reason, the endpoints
//! (`addr:port`) it may pick, and whether the source is masqueraded to the node or kept.
//! Multi-endpoint probes send many flows and require every choice to be allowed and, where
//! it matters, every allowed endpoint to be chosen. The oracle is kube-proxy's
//! `pkg/proxy` (iptables and nftables proxiers, `CategorizeEndpoints`,
//! `topologyModeFromHints`, the EndpointSlice cache); `docs/conformance.md` maps every
//! behaviour to its case.

#[path = "conformance/harness.rs"]
mod harness;

use harness::*;

// The cast: pods on this node (node-a, zone-a), pods elsewhere, clients outside.
const POD: &str = "10.244.1.2";
const POD6: &str = "fd00:244:0:1::2";
const L1: &str = "10.244.1.10";
const L2: &str = "10.244.1.11";
const R1: &str = "10.244.2.10"; // node-b, zone-b
const R2: &str = "10.244.3.10"; // node-c, zone-a
const R3: &str = "10.244.2.11"; // node-b
const REMOTE_POD: &str = "10.244.2.20";
const L1_6: &str = "fd00:244:0:1::a";
const R1_6: &str = "fd00:244:0:2::10";
const EXT: &str = "203.0.113.7";
const EXT6: &str = "2001:db8::7";
const OUTSIDER: &str = "198.51.100.9";
const NODE_IP: &str = "192.168.50.2";
const NODE_IP6: &str = "fd00:50::2";
const NODE_B: &str = "192.168.50.3";

const CIP: &str = "10.96.0.10";
const CIP6: &str = "fd00:96::10";
const WEB: &str = "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}";
const HTTP: &str = "[{name: http, port: 8080}]";

fn web(spec: &str, endpoints: &[String]) -> String {
    svc("web", spec) + &slice("web-1", "web", "IPv4", HTTP, endpoints)
}

fn np(extra: &str) -> String {
    format!(
        "{{type: NodePort, clusterIP: 10.96.0.10{extra}, \
         ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]}}"
    )
}

fn lb(extra: &str) -> String {
    format!(
        "{{type: LoadBalancer, clusterIP: 10.96.0.10{extra}, \
         ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]}}"
    )
}

const LB_STATUS: &str = "{loadBalancer: {ingress: [{ip: 198.51.100.30}]}}";
const LB_IP: &str = "198.51.100.30";

fn lb_web(extra: &str, endpoints: &[String]) -> String {
    svc_status("web", &lb(extra), LB_STATUS) + &slice("web-1", "web", "IPv4", HTTP, endpoints)
}

fn e(addr: &str, node: &str) -> String {
    ep(addr, node)
}

fn a(addr: &str) -> String {
    format!("{addr}:8080")
}

const NOT_READY: &str = "conditions: {ready: false, serving: false}";
const TERMINATING: &str = "conditions: {ready: false, serving: true, terminating: true}";

fn three() -> Vec<String> {
    vec![e(L1, "node-a"), e(R1, "node-b"), e(R2, "node-c")]
}

fn cases() -> Vec<Case> {
    let all3 = [a(L1), a(R1), a(R2)];
    let all3: Vec<&str> = all3.iter().map(String::as_str).collect();
    let (l1, l2, r1, r2) = (a(L1), a(L2), a(R1), a(R2));
    let (l1, l2, r1, r2) = (l1.as_str(), l2.as_str(), r1.as_str(), r2.as_str());

    let dual = "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, \"fd00:96::10\"], \
                ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, \
                ports: [{name: http, port: 80, targetPort: 8080}]}";
    let dual_slices = slice("web-v4", "web", "IPv4", HTTP, &[e(R1, "node-b")])
        + &slice("web-v6", "web", "IPv6", HTTP, &[e(R1_6, "node-b")]);

    vec![
        // ---- Service types, ports, protocols ----------------------------------------------
        case("ClusterIP/TCP: a pod reaches a ready endpoint and keeps its source address")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("ClusterIP/TCP: new connections are spread over every ready endpoint")
            .objects(web(WEB, &three()))
            .send(tcp(POD, CIP, 80).flows(64), to(&all3).spread()),
        case("ClusterIP/UDP: datagrams go to the endpoints of the UDP port")
            .objects(
                svc("dns", "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]}")
                    + &slice("dns-1", "dns", "IPv4", "[{name: dns, port: 5353, protocol: UDP}]", &[e(R1, "node-b"), e(R2, "node-c")]),
            )
            .send(udp(POD, "10.96.0.53", 53).flows(32), to(&["10.244.2.10:5353", "10.244.3.10:5353"]).spread()),
        case("ClusterIP/SCTP: associations go to the endpoints of the SCTP port")
            .objects(
                svc("sig", "{clusterIP: 10.96.0.54, ports: [{name: sig, port: 3868, protocol: SCTP}]}")
                    + &slice("sig-1", "sig", "IPv4", "[{name: sig, port: 3868, protocol: SCTP}]", &[e(R1, "node-b")]),
            )
            .send(sctp(POD, "10.96.0.54", 3868), to(&["10.244.2.10:3868"])),
        case("ClusterIP: a port the service does not expose is rejected with port unreachable")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 81), reject("unknown_port")),
        case("ClusterIP: a TCP probe to a port exposed only for UDP is rejected")
            .objects(
                svc("dns", "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}]}")
                    + &slice("dns-1", "dns", "IPv4", "[{name: dns, port: 53, protocol: UDP}]", &[e(R1, "node-b")]),
            )
            .send(tcp(POD, "10.96.0.53", 53), reject("unknown_port")),
        case("Several ports: each service port leads to its own target port")
            .objects(
                svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: https, port: 443, targetPort: 8443}]}")
                    + &slice("web-1", "web", "IPv4", "[{name: http, port: 8080}, {name: https, port: 8443}]", &[e(R1, "node-b")]),
            )
            .send(tcp(POD, CIP, 80), to(&[r1]))
            .send(tcp(POD, CIP, 443), to(&["10.244.2.10:8443"])),
        case("targetPort by number: traffic goes to the port the slice lists for the service port")
            .objects(
                svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 9376}]}")
                    + &slice("web-1", "web", "IPv4", "[{name: \"\", port: 9376}]", &[e(R1, "node-b")]),
            )
            .send(tcp(POD, CIP, 80), to(&["10.244.2.10:9376"])),
        case("targetPort by name: pods whose container port differs get traffic on their own port")
            .objects(
                svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: web}]}")
                    + &slice("web-v1", "web", "IPv4", "[{name: http, port: 8080}]", &[e(R1, "node-b")])
                    + &slice("web-v2", "web", "IPv4", "[{name: http, port: 9090}]", &[e(R2, "node-c")]),
            )
            .send(tcp(POD, CIP, 80).flows(32), to(&[r1, "10.244.3.10:9090"]).spread()),
        case("targetPort: a slice port of the same name but another protocol is not used")
            .objects(
                svc("dns", "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}]}")
                    + &slice("dns-1", "dns", "IPv4", "[{name: dns, port: 9999, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]", &[e(R1, "node-b")]),
            )
            .send(udp(POD, "10.96.0.53", 53), to(&["10.244.2.10:5353"])),
        case("Slices join their Service by namespace: a same-named service elsewhere keeps its own endpoints")
            .objects(
                svc("{name: web, namespace: blue}", "{clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}")
                    + &slice("blue/web-1", "web", "IPv4", HTTP, &[e(R1, "node-b")])
                    + &svc("{name: web, namespace: green}", "{clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}")
                    + &slice("green/web-1", "web", "IPv4", HTTP, &[e(R2, "node-c")]),
            )
            .send(tcp(POD, "10.96.0.11", 80).flows(16), to(&[r1]))
            .send(tcp(POD, "10.96.0.12", 80).flows(16), to(&[r2])),
        case("NodePort: an external client reaches the service on the node address, masqueraded")
            .objects(web(&np(""), &three()))
            .send(tcp(EXT, NODE_IP, 30080).flows(48), to(&all3).masqueraded().spread()),
        case("NodePort: the ClusterIP of a NodePort service still serves pods unmasqueraded")
            .objects(web(&np(""), &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("NodePort/UDP: an external client is masqueraded to the node")
            .objects(
                svc("dns", "{type: NodePort, clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]}")
                    + &slice("dns-1", "dns", "IPv4", "[{name: dns, port: 53, protocol: UDP}]", &[e(R1, "node-b")]),
            )
            .send(udp(EXT, NODE_IP, 30053), to(&["10.244.2.10:53"]).masqueraded()),
        case("LoadBalancer: an external client reaches the ingress IP, masqueraded")
            .objects(lb_web("", &three()))
            .send(tcp(EXT, LB_IP, 80).flows(48), to(&all3).masqueraded().spread()),
        case("LoadBalancer: the NodePort of a LoadBalancer service serves too")
            .objects(lb_web("", &[e(R1, "node-b")]))
            .send(tcp(EXT, NODE_IP, 30080), to(&[r1]).masqueraded()),
        case("LoadBalancer: an ingress IP with ipMode Proxy is not captured (the LB proxies to nodes)")
            .objects(
                svc_status("web", &lb(""), "{loadBalancer: {ingress: [{ip: 198.51.100.30, ipMode: Proxy}]}}")
                    + &slice("web-1", "web", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .send(tcp(EXT, LB_IP, 80), pass("not_service")),
        case("LoadBalancer without node ports (allocateLoadBalancerNodePorts false): the LB IP serves, no NodePort")
            .objects(
                svc_status("web", "{type: LoadBalancer, clusterIP: 10.96.0.10, allocateLoadBalancerNodePorts: false, ports: [{name: http, port: 80, targetPort: 8080}]}", LB_STATUS)
                    + &slice("web-1", "web", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .send(tcp(EXT, LB_IP, 80), to(&[r1]).masqueraded())
            .send(tcp(EXT, NODE_IP, 30080), pass("not_service")),
        case("ExternalIPs: an external client reaches spec.externalIPs, masqueraded")
            .objects(web("{clusterIP: 10.96.0.10, externalIPs: [198.51.100.40], ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b")]))
            .send(tcp(EXT, "198.51.100.40", 80), to(&[r1]).masqueraded()),
        case("ExternalName services are ignored: nothing of theirs is captured")
            .objects(svc("ext", "{type: ExternalName, externalName: db.example.com, externalIPs: [198.51.100.50], ports: [{port: 5432}]}"))
            .send(tcp(EXT, "198.51.100.50", 5432), pass("not_service")),
        case("Headless services (clusterIP None) are ignored: pod traffic to their endpoints passes untouched")
            .objects(web("{clusterIP: None, ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b")]))
            .send(tcp(POD, R1, 8080), pass("not_service")),
        case("An unallocated address inside the service CIDR is dropped")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(POD, "10.96.7.7", 80), drop("unallocated_service_ip")),
        case("An unallocated address inside the IPv6 service CIDR is dropped")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(POD6, "fd00:96::7", 80), drop("unallocated_service_ip")),
        case("An address outside the service CIDRs that no service owns passes untouched")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(POD, "93.184.216.34", 443), pass("not_service")),
        // ---- IPv6 and dual-stack ------------------------------------------------------------
        case("IPv6 ClusterIP: an IPv6 pod reaches an IPv6 endpoint and keeps its source")
            .objects(
                svc("web", "{clusterIP: \"fd00:96::10\", ipFamilies: [IPv6], ports: [{name: http, port: 80, targetPort: 8080}]}")
                    + &slice("web-v6", "web", "IPv6", HTTP, &[e(R1_6, "node-b")]),
            )
            .send(tcp(POD6, CIP6, 80), to(&["[fd00:244:0:2::10]:8080"])),
        case("Dual-stack: each ClusterIP leads to the endpoints of its own family")
            .objects(svc("web", dual) + &dual_slices)
            .send(tcp(POD, CIP, 80), to(&[r1]))
            .send(tcp(POD6, CIP6, 80), to(&["[fd00:244:0:2::10]:8080"])),
        case("Dual-stack with IPv6 first (ipFamilies [IPv6, IPv4]): both ClusterIPs serve")
            .objects(
                svc("web", "{clusterIP: \"fd00:96::10\", clusterIPs: [\"fd00:96::10\", 10.96.0.10], ipFamilies: [IPv6, IPv4], ports: [{name: http, port: 80, targetPort: 8080}]}")
                    + &dual_slices,
            )
            .send(tcp(POD6, CIP6, 80), to(&["[fd00:244:0:2::10]:8080"]))
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("Dual-stack: a family without endpoints rejects while the other serves")
            .objects(svc("web", dual) + &slice("web-v4", "web", "IPv4", HTTP, &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80), to(&[r1]))
            .send(tcp(POD6, CIP6, 80), reject("no_endpoints")),
        case("Dual-stack NodePort: the node's IPv6 address answers, masqueraded to it")
            .objects(
                svc("web", "{type: NodePort, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, \"fd00:96::10\"], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]}")
                    + &dual_slices,
            )
            .send(tcp(EXT6, NODE_IP6, 30080), to(&["[fd00:244:0:2::10]:8080"]).masqueraded())
            .send(tcp(EXT, NODE_IP, 30080), to(&[r1]).masqueraded()),
        case("IPv6 eTP Local: an external IPv6 client reaches this node's IPv6 endpoint with its source kept")
            .objects(
                svc("web", "{type: NodePort, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, \"fd00:96::10\"], ipFamilies: [IPv4, IPv6], externalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]}")
                    + &slice("web-v6", "web", "IPv6", HTTP, &[e(L1_6, "node-a"), e(R1_6, "node-b")]),
            )
            .send(tcp(EXT6, NODE_IP6, 30080).flows(16), to(&["[fd00:244:0:1::a]:8080"]))
            .send(tcp(EXT, NODE_IP, 30080), reject("no_endpoints")),
        case("Single-stack IPv4 NodePort: the node's IPv6 address does not answer")
            .objects(web(&np(""), &[e(R1, "node-b")]))
            .send(tcp(EXT6, NODE_IP6, 30080), pass("not_service")),
        // ---- externalTrafficPolicy ----------------------------------------------------------
        case("eTP Local: an external client reaches only this node's endpoints and keeps its source")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(L1, "node-a"), e(L2, "node-a"), e(R1, "node-b"), e(R2, "node-c")]))
            .send(tcp(EXT, NODE_IP, 30080).flows(32), to(&[l1, l2]).spread()),
        case("eTP Local: external traffic is dropped when this node has no endpoint")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(R1, "node-b"), e(R2, "node-c")]))
            .send(tcp(EXT, NODE_IP, 30080), drop("no_local_endpoints")),
        case("eTP Local: a pod reaching the NodePort uses every endpoint and is not masqueraded")
            .objects(web(&np(", externalTrafficPolicy: Local"), &three()))
            .send(tcp(POD, NODE_IP, 30080).flows(48), to(&all3).spread()),
        case("eTP Local: a pod still reaches the NodePort when this node has no endpoint")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(R1, "node-b")]))
            .send(tcp(POD, NODE_IP, 30080), to(&[r1])),
        case("eTP Local: the node itself reaching its NodePort uses every endpoint, masqueraded")
            .objects(web(&np(", externalTrafficPolicy: Local"), &three()))
            .send(tcp(NODE_IP, NODE_IP, 30080).flows(48), to(&all3).masqueraded().spread()),
        case("eTP Local: a host-network source on the host interface counts as the node")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(R1, "node-b")]))
            .send(tcp("169.254.20.10", NODE_IP, 30080).via("host"), to(&[r1]).masqueraded()),
        case("eTP Local: a LoadBalancer IP from outside goes to local endpoints with the source kept")
            .objects(lb_web(", externalTrafficPolicy: Local, healthCheckNodePort: 32000", &[e(L1, "node-a"), e(R1, "node-b")]))
            .send(tcp(EXT, LB_IP, 80).flows(16), to(&[l1])),
        case("eTP Local: externalIPs of a ClusterIP service follow the policy")
            .objects(web("{clusterIP: 10.96.0.10, externalIPs: [198.51.100.40], externalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(L1, "node-a"), e(R1, "node-b")]))
            .send(tcp(EXT, "198.51.100.40", 80).flows(16), to(&[l1])),
        case("eTP Local does not govern the ClusterIP: an off-cluster client there uses every endpoint, masqueraded")
            .objects(web(&np(", externalTrafficPolicy: Local"), &three()))
            .send(tcp(EXT, CIP, 80).flows(48), to(&all3).masqueraded().spread()),
        case("eTP Local with no endpoint anywhere: external traffic is rejected, not dropped")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[]))
            .send(tcp(EXT, NODE_IP, 30080), reject("no_endpoints")),
        case("eTP Cluster: a pod reaching a NodePort is masqueraded")
            .objects(web(&np(""), &[e(R1, "node-b")]))
            .send(tcp(POD, NODE_IP, 30080), to(&[r1]).masqueraded()),
        case("eTP Cluster: a pod reaching an external IP is masqueraded")
            .objects(web("{clusterIP: 10.96.0.10, externalIPs: [198.51.100.40], ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b")]))
            .send(tcp(POD, "198.51.100.40", 80), to(&[r1]).masqueraded()),
        case("eTP Local without cluster CIDRs: pods are not recognised, so a pod is served like an external client")
            .node(node_with(&[("clusterCIDRs: [10.244.0.0/16, \"fd00:244::/56\"]", "")]))
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(L1, "node-a"), e(R1, "node-b")]))
            .send(tcp(POD, NODE_IP, 30080).flows(16), to(&[l1])),
        // ---- internalTrafficPolicy ----------------------------------------------------------
        case("iTP Local: ClusterIP traffic goes to this node's endpoints only")
            .objects(web("{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(L1, "node-a"), e(L2, "node-a"), e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80).flows(32), to(&[l1, l2]).spread()),
        case("iTP Local: ClusterIP traffic is dropped when this node has no endpoint")
            .objects(web("{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80), drop("no_local_endpoints")),
        case("iTP Local with eTP Cluster: external NodePort traffic still uses every endpoint")
            .objects(web(&np(", internalTrafficPolicy: Local"), &[e(R1, "node-b")]))
            .send(tcp(EXT, NODE_IP, 30080), to(&[r1]).masqueraded())
            .send(tcp(POD, CIP, 80), drop("no_local_endpoints")),
        case("iTP Local with no endpoint anywhere: rejected")
            .objects(web("{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080}]}", &[]))
            .send(tcp(POD, CIP, 80), reject("no_endpoints")),
        // ---- session affinity ---------------------------------------------------------------
        case("ClientIP affinity: every new connection of a client goes to the same endpoint")
            .objects(web("{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: 8080}]}", &three()))
            .send(tcp(POD, CIP, 80).flows(32), to(&all3).sticky()),
        case("No affinity: the connections of one client are spread")
            .objects(web(WEB, &three()))
            .send(tcp(POD, CIP, 80).flows(48), to(&all3).spread()),
        case("ClientIP affinity: each new connection renews the timeout; after timeoutSeconds idle the client may move")
            .objects(web("{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}, ports: [{name: http, port: 80, targetPort: 8080}]}", &three()))
            .send(tcp(POD, CIP, 80).flows(8), to(&all3).sticky())
            .after(8)
            .send(tcp(POD, CIP, 80).flows(8).source_port(21000), to(&all3).sticky())
            .after(8)
            .send(tcp(POD, CIP, 80).flows(8).source_port(22000), to(&all3).sticky())
            .after(11)
            .send(tcp(POD, CIP, 80).source_port(23000), released(&all3)),
        case("ClientIP affinity holds for masqueraded external clients of a NodePort")
            .objects(web(&np(", sessionAffinity: ClientIP"), &three()))
            .send(tcp(EXT, NODE_IP, 30080).flows(32), to(&all3).sticky().masqueraded()),
        case("ClientIP affinity: a pinned endpoint that starts terminating is left for the ready ones")
            .objects(web("{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b"), ep_with(R2, "node-c", NOT_READY)]))
            .send(tcp(POD, CIP, 80).flows(4), to(&[r1]).sticky())
            .update(web("{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b"), e(R2, "node-c")]))
            .send(tcp(POD, CIP, 80).flows(32).source_port(21000), to(&[r1, r2]).sticky())
            .update(web("{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: 8080}]}", &[ep_with(R1, "node-b", TERMINATING), e(R2, "node-c")]))
            .send(tcp(POD, CIP, 80).flows(16).source_port(22000), to(&[r2])),
        case("ClientIP affinity under eTP Local: a client stays on its local endpoint while the local ones drain")
            .objects(web(&np(", externalTrafficPolicy: Local, sessionAffinity: ClientIP"), &[e(L1, "node-a"), ep_with(L2, "node-a", NOT_READY), e(R1, "node-b")]))
            .send(tcp(EXT, NODE_IP, 30080).flows(4), to(&[l1]).sticky())
            .update(web(&np(", externalTrafficPolicy: Local, sessionAffinity: ClientIP"), &[ep_with(L1, "node-a", TERMINATING), ep_with(L2, "node-a", TERMINATING), e(R1, "node-b")]))
            .send(tcp(EXT, NODE_IP, 30080).flows(32).source_port(21000), to(&[l1, l2]).sticky()),
        // ---- loadBalancerSourceRanges -------------------------------------------------------
        case("loadBalancerSourceRanges: a client inside a range reaches the LoadBalancer IP")
            .objects(lb_web(", loadBalancerSourceRanges: [203.0.113.0/24]", &[e(R1, "node-b")]))
            .send(tcp(EXT, LB_IP, 80), to(&[r1]).masqueraded()),
        case("loadBalancerSourceRanges: a client outside every range is dropped")
            .objects(lb_web(", loadBalancerSourceRanges: [203.0.113.0/24]", &[e(R1, "node-b")]))
            .send(tcp(OUTSIDER, LB_IP, 80), drop("source_range_denied")),
        case("loadBalancerSourceRanges guard neither the NodePort nor the ClusterIP")
            .objects(lb_web(", loadBalancerSourceRanges: [203.0.113.0/24]", &[e(R1, "node-b")]))
            .send(tcp(OUTSIDER, NODE_IP, 30080), to(&[r1]).masqueraded())
            .send(tcp(OUTSIDER, CIP, 80), to(&[r1]).masqueraded()),
        case("loadBalancerSourceRanges: an outside client is dropped even when there are no endpoints (as nftables kube-proxy)")
            .objects(lb_web(", loadBalancerSourceRanges: [203.0.113.0/24]", &[]))
            .send(tcp(OUTSIDER, LB_IP, 80), drop("source_range_denied"))
            .send(tcp(EXT, LB_IP, 80), reject("no_endpoints")),
        case("loadBalancerSourceRanges of the other family only leave this family's LoadBalancer IP open")
            .objects(lb_web(", loadBalancerSourceRanges: [\"2001:db8::/32\"]", &[e(R1, "node-b")]))
            .send(tcp(OUTSIDER, LB_IP, 80), to(&[r1]).masqueraded()),
        // ---- endpoint conditions ------------------------------------------------------------
        case("Not-ready endpoints get no new connections while ready ones exist")
            .objects(web(WEB, &[e(L1, "node-a"), ep_with(R1, "node-b", NOT_READY), e(R2, "node-c")]))
            .send(tcp(POD, CIP, 80).flows(48), to(&[l1, r2]).spread()),
        case("Terminating endpoints get no new connections while ready ones exist")
            .objects(web(WEB, &[e(L1, "node-a"), ep_with(R1, "node-b", TERMINATING), e(R2, "node-c")]))
            .send(tcp(POD, CIP, 80).flows(48), to(&[l1, r2]).spread()),
        case("No ready endpoint: the serving terminating ones take new connections (graceful drain)")
            .objects(web(WEB, &[ep_with(L1, "node-a", NOT_READY), ep_with(R1, "node-b", TERMINATING), ep_with(R2, "node-c", TERMINATING)]))
            .send(tcp(POD, CIP, 80).flows(48), to(&[r1, r2]).spread()),
        case("A terminating endpoint without a serving condition counts as serving (nil = true)")
            .objects(web(WEB, &[ep_with(L1, "node-a", NOT_READY), ep_with(R1, "node-b", "conditions: {ready: false, terminating: true}")]))
            .send(tcp(POD, CIP, 80).flows(8), to(&[r1])),
        case("Endpoints neither ready nor serving: the service has no endpoints and rejects")
            .objects(web(WEB, &[ep_with(L1, "node-a", NOT_READY), ep_with(R1, "node-b", "conditions: {ready: false, serving: false, terminating: true}")]))
            .send(tcp(POD, CIP, 80), reject("no_endpoints")),
        case("eTP Local: with no ready local endpoint, local serving terminating ones serve external clients")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[ep_with(L1, "node-a", TERMINATING), e(R1, "node-b")]))
            .send(tcp(EXT, NODE_IP, 30080).flows(8), to(&[l1]))
            .send(tcp(POD, CIP, 80).flows(8), to(&[r1])),
        case("iTP Local: with no ready local endpoint, local serving terminating ones take ClusterIP traffic")
            .objects(web("{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080}]}", &[ep_with(L1, "node-a", TERMINATING), e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80).flows(8), to(&[l1])),
        // ---- topology -----------------------------------------------------------------------
        case("PreferClose zone hints: pods use only the endpoints hinted for this node's zone")
            .objects(web(
                "{clusterIP: 10.96.0.10, trafficDistribution: PreferClose, ports: [{name: http, port: 80, targetPort: 8080}]}",
                &[
                    ep_with(L1, "node-a", "zone: zone-a, hints: {forZones: [{name: zone-a}]}"),
                    ep_with(R1, "node-b", "zone: zone-b, hints: {forZones: [{name: zone-b}]}"),
                    ep_with(R2, "node-c", "zone: zone-a, hints: {forZones: [{name: zone-a}]}"),
                ],
            ))
            .send(tcp(POD, CIP, 80).flows(48), to(&[l1, r2]).spread()),
        case("Zone hints: a ready endpoint without hints disables topology (every endpoint used)")
            .objects(web(WEB, &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-a}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-b}]}"),
                e(R2, "node-c"),
            ]))
            .send(tcp(POD, CIP, 80).flows(48), to(&all3).spread()),
        case("Zone hints: none for this node's zone, so every endpoint is used")
            .objects(web(WEB, &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-b}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-b}]}"),
                ep_with(R2, "node-c", "hints: {forZones: [{name: zone-c}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(48), to(&all3).spread()),
        case("Zone hints: a node without a zone uses every endpoint")
            .node(node_with(&[("zone: zone-a", "")]))
            .objects(web(WEB, &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-a}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-b}]}"),
                ep_with(R2, "node-c", "hints: {forZones: [{name: zone-a}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(48), to(&all3).spread()),
        case("Zone hints: only ready endpoints count; an unhinted not-ready one leaves topology on")
            .objects(web(WEB, &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-a}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-b}]}"),
                ep_with(R2, "node-c", NOT_READY),
                ep_with(R3, "node-b", "hints: {forZones: [{name: zone-a}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(48), to(&[l1, "10.244.2.11:8080"]).spread()),
        case("Zone hints: with no ready endpoint, the serving terminating ones serve, hints aside")
            .objects(web(WEB, &[
                ep_with(L1, "node-a", "conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}"),
                ep_with(R1, "node-b", "conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-b}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(32), to(&[l1, r1]).spread()),
        case("PreferSameNode node hints: pods use the endpoints hinted for this node")
            .objects(web(
                "{clusterIP: 10.96.0.10, trafficDistribution: PreferSameNode, ports: [{name: http, port: 80, targetPort: 8080}]}",
                &[
                    ep_with(L1, "node-a", "hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}"),
                    ep_with(R1, "node-b", "hints: {forNodes: [{name: node-b}], forZones: [{name: zone-b}]}"),
                    ep_with(R2, "node-c", "hints: {forNodes: [{name: node-c}], forZones: [{name: zone-a}]}"),
                ],
            ))
            .send(tcp(POD, CIP, 80).flows(32), to(&[l1])),
        case("Node hints naming other nodes only: zone hints decide")
            .objects(web(WEB, &[
                ep_with(L2, "node-a", "hints: {forNodes: [{name: node-x}], forZones: [{name: zone-b}]}"),
                ep_with(R1, "node-b", "hints: {forNodes: [{name: node-b}], forZones: [{name: zone-b}]}"),
                ep_with(R2, "node-c", "hints: {forNodes: [{name: node-c}], forZones: [{name: zone-a}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(32), to(&[r2])),
        case("Topology does not narrow eTP Local: external clients use every local endpoint, whatever its hints")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-b}]}"),
                ep_with(L2, "node-a", "hints: {forZones: [{name: zone-a}]}"),
                ep_with(R2, "node-c", "hints: {forZones: [{name: zone-a}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-b}]}"),
            ]))
            .send(tcp(EXT, NODE_IP, 30080).flows(32), to(&[l1, l2]).spread())
            .send(tcp(POD, NODE_IP, 30080).flows(48).source_port(21000), to(&[l2, r2]).spread()),
        case("A change of hints moves new connections with it")
            .objects(web(WEB, &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-a}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-b}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(16), to(&[l1]))
            .update(web(WEB, &[
                ep_with(L1, "node-a", "hints: {forZones: [{name: zone-b}]}"),
                ep_with(R1, "node-b", "hints: {forZones: [{name: zone-a}]}"),
            ]))
            .send(tcp(POD, CIP, 80).flows(16).source_port(21000), to(&[r1])),
        // ---- masquerade and local-traffic detection -----------------------------------------
        case("An off-cluster client reaching a ClusterIP is masqueraded (cluster CIDRs known)")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(EXT, CIP, 80), to(&[r1]).masqueraded()),
        case("Without cluster CIDRs, off-cluster traffic to a ClusterIP is not masqueraded")
            .node(node_with(&[("clusterCIDRs: [10.244.0.0/16, \"fd00:244::/56\"]", "")]))
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(EXT, CIP, 80), to(&[r1]))
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("Local-traffic detection is per family: with no IPv6 cluster CIDR, IPv6 pods are not masqueraded")
            .node(node_with(&[("clusterCIDRs: [10.244.0.0/16, \"fd00:244::/56\"]", "clusterCIDRs: [10.244.0.0/16]")]))
            .objects(svc("web", dual) + &dual_slices)
            .send(tcp(POD6, CIP6, 80), to(&["[fd00:244:0:2::10]:8080"]))
            .send(tcp(EXT6, CIP6, 80), to(&["[fd00:244:0:2::10]:8080"]))
            .send(tcp(EXT, CIP, 80), to(&[r1]).masqueraded())
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("A pod on another node reaching a ClusterIP through this node is not masqueraded")
            .objects(web(WEB, &[e(R2, "node-c")]))
            .send(tcp(REMOTE_POD, CIP, 80), to(&[r2])),
        case("The node itself reaching a ClusterIP is masqueraded (its address is off-cluster)")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(NODE_IP, CIP, 80), to(&[r1]).masqueraded()),
        case("Another node's host reaching a ClusterIP through this node is masqueraded")
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(NODE_B, CIP, 80), to(&[r1]).masqueraded()),
        case("masqueradeAll: a pod reaching a ClusterIP is masqueraded")
            .masquerade_all()
            .objects(web(WEB, &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80), to(&[r1]).masqueraded()),
        case("masqueradeAll applies to ClusterIPs only: eTP Local external clients keep their source")
            .masquerade_all()
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(L1, "node-a")]))
            .send(tcp(EXT, NODE_IP, 30080), to(&[l1]))
            .send(tcp(POD, NODE_IP, 30080), to(&[l1])),
        case("Hairpin: a pod reaching itself through its ClusterIP is masqueraded")
            .objects(web(WEB, &[e(L1, "node-a")]))
            .send(tcp(L1, CIP, 80), to(&[l1]).masqueraded()),
        case("Hairpin through a NodePort under eTP Local is masqueraded")
            .objects(web(&np(", externalTrafficPolicy: Local"), &[e(L1, "node-a")]))
            .send(tcp(L1, NODE_IP, 30080), to(&[l1]).masqueraded()),
        // ---- nodePortAddresses, proxy name, headless label ----------------------------------
        case("nodePortAddresses: the NodePort answers on the selected address only")
            .node(node_with(&[
                ("addresses: [192.168.50.2, \"fd00:50::2\"]", "addresses: [192.168.50.2, 192.168.60.2, \"fd00:50::2\"]"),
                ("", "nodePortAddresses: [192.168.60.0/24]"),
            ]))
            .objects(web(&np(""), &[e(R1, "node-b")]))
            .send(tcp(EXT, "192.168.60.2", 30080), to(&[r1]).masqueraded())
            .send(tcp(EXT, NODE_IP, 30080), pass("not_service")),
        case("service-proxy-name of another proxy: the service is left alone (its ClusterIP is unallocated to kxp)")
            .objects(
                svc("{name: other, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}", "{clusterIP: 10.96.0.52, ports: [{name: http, port: 80}]}")
                    + &slice("other-1", "other", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .send(tcp(POD, "10.96.0.52", 80), drop("unallocated_service_ip")),
        case("service-proxy-name naming this proxy: the service is served")
            .proxy_name("kxp")
            .objects(
                svc("{name: ours, labels: {service.kubernetes.io/service-proxy-name: kxp}}", "{clusterIP: 10.96.0.52, ports: [{name: http, port: 80, targetPort: 8080}]}")
                    + &slice("ours-1", "ours", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .send(tcp(POD, "10.96.0.52", 80), to(&[r1])),
        case("The service.kubernetes.io/headless label makes a service headless")
            .objects(
                svc("{name: hl, labels: {service.kubernetes.io/headless: \"\"}}", "{clusterIP: 10.96.0.55, ports: [{name: http, port: 80}]}")
                    + &slice("hl-1", "hl", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .send(tcp(POD, "10.96.0.55", 80), drop("unallocated_service_ip")),
        // ---- no endpoints -------------------------------------------------------------------
        case("No endpoints: TCP to the ClusterIP is answered with ICMP port unreachable")
            .objects(web(WEB, &[]))
            .send(tcp(POD, CIP, 80), reject("no_endpoints")),
        case("No endpoints: UDP to the NodePort is answered with port unreachable")
            .objects(
                svc("dns", "{type: NodePort, clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]}"),
            )
            .send(udp(EXT, NODE_IP, 30053), reject("no_endpoints")),
        case("No endpoints: SCTP to the ClusterIP is answered with port unreachable")
            .objects(svc("sig", "{clusterIP: 10.96.0.54, ports: [{name: sig, port: 3868, protocol: SCTP}]}"))
            .send(sctp(POD, "10.96.0.54", 3868), reject("no_endpoints")),
        case("No endpoints: IPv6 is answered with ICMPv6 port unreachable")
            .objects(svc("web", "{clusterIP: \"fd00:96::10\", ipFamilies: [IPv6], ports: [{name: http, port: 80}]}"))
            .send(tcp(POD6, CIP6, 80), reject("no_endpoints")),
        case("No endpoints: the LoadBalancer IP rejects too")
            .objects(svc_status("web", &lb(""), LB_STATUS))
            .send(tcp(EXT, LB_IP, 80), reject("no_endpoints")),
        case("Slices of another service do not count: a service with none of its own rejects")
            .objects(svc("web", WEB) + &slice("api-1", "api", "IPv4", HTTP, &[e(R1, "node-b")]))
            .send(tcp(POD, CIP, 80), reject("no_endpoints")),
        // ---- bad input ----------------------------------------------------------------------
        case("A bad ClusterIP is reported by namespace/name and field; other services keep working")
            .objects(svc("bad", "{clusterIP: 10.96.0.300, ports: [{port: 80}]}") + &web(WEB, &[e(R1, "node-b")]))
            .errors(&["default/bad: spec.clusterIP: \"10.96.0.300\" is not an IP address"])
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("A service port out of range is reported; the service's other ports keep working")
            .objects(
                svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: big, port: 70000}]}")
                    + &slice("web-1", "web", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .errors(&["default/web: spec.ports[1].port: 70000 is out of range"])
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("A nodePort out of range is reported; the ClusterIP of that port keeps working")
            .objects(web("{type: NodePort, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080, nodePort: 99999}]}", &[e(R1, "node-b")]))
            .errors(&["default/web: spec.ports[0].nodePort: 99999 is out of range"])
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("A clashing ClusterIP:port: the first service by namespace/name keeps it, the second is reported")
            .objects(
                svc("a-first", WEB)
                    + &slice("a-first-1", "a-first", "IPv4", HTTP, &[e(R1, "node-b")])
                    + &svc("b-second", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: alt, port: 81}]}")
                    + &slice("b-second-1", "b-second", "IPv4", "[{name: http, port: 8080}, {name: alt, port: 8081}]", &[e(R2, "node-c")]),
            )
            .errors(&["default/b-second: spec.clusterIP: ClusterIP 10.96.0.10:80/tcp is already taken by ClusterIP default/a-first:http"])
            .send(tcp(POD, CIP, 80).flows(16), to(&[r1]))
            .send(tcp(POD, CIP, 81), to(&["10.244.3.10:8081"])),
        case("A clashing nodePort: reported on the second service, whose ClusterIP keeps working")
            .objects(
                svc("a-first", &np(""))
                    + &slice("a-first-1", "a-first", "IPv4", HTTP, &[e(R1, "node-b")])
                    + &svc("b-second", "{type: NodePort, clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]}")
                    + &slice("b-second-1", "b-second", "IPv4", HTTP, &[e(R2, "node-c")]),
            )
            .errors(&["default/b-second: spec.ports[0].nodePort: NodePort 192.168.50.2:30080/tcp is already taken by NodePort default/a-first:http"])
            .send(tcp(EXT, NODE_IP, 30080).flows(8), to(&[r1]).masqueraded())
            .send(tcp(POD, "10.96.0.11", 80), to(&[r2])),
        case("A bad endpoint address is reported by slice and field; the other endpoints serve")
            .objects(web(WEB, &[e("10.244.2.300", "node-b"), e(R2, "node-c")]))
            .errors(&["EndpointSlice default/web-1: endpoints[0].addresses[0]: \"10.244.2.300\" is not an IP address"])
            .send(tcp(POD, CIP, 80).flows(8), to(&[r2])),
        case("An unknown protocol is reported; the service's other ports keep working")
            .objects(
                svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: ping, port: 7, protocol: ICMP}]}")
                    + &slice("web-1", "web", "IPv4", HTTP, &[e(R1, "node-b")]),
            )
            .errors(&["default/web: spec.ports[1].protocol: \"ICMP\" is not one of TCP, UDP, SCTP"])
            .send(tcp(POD, CIP, 80), to(&[r1])),
        case("A bad externalIP is reported; the good ones serve")
            .objects(web("{clusterIP: 10.96.0.10, externalIPs: [not-an-ip, 198.51.100.40], ports: [{name: http, port: 80, targetPort: 8080}]}", &[e(R1, "node-b")]))
            .errors(&["default/web: spec.externalIPs[0]: \"not-an-ip\" is not an IP address"])
            .send(tcp(EXT, "198.51.100.40", 80), to(&[r1]).masqueraded()),
        case("A bad loadBalancerSourceRange is reported; the valid ranges still guard the LoadBalancer IP")
            .objects(lb_web(", loadBalancerSourceRanges: [203.0.113.0/33, 203.0.113.0/24]", &[e(R1, "node-b")]))
            .errors(&["default/web: spec.loadBalancerSourceRanges[0]: \"203.0.113.0/33\" is not a CIDR"])
            .send(tcp(EXT, LB_IP, 80), to(&[r1]).masqueraded())
            .send(tcp(OUTSIDER, LB_IP, 80), drop("source_range_denied")),
    ]
}

#[test]
fn kube_proxy_conformance() {
    let cases = cases();
    let mut failures = Vec::new();
    for c in &cases {
        match run_case(c) {
            Ok(()) => eprintln!("ok    {}", c.spec),
            Err(e) => {
                eprintln!("FAIL  {}", c.spec);
                failures.push(format!("{}\n    {e}", c.spec));
            }
        }
    }
    eprintln!(
        "conformance: {} cases, {} passed, {} failed",
        cases.len(),
        cases.len() - failures.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} conformance cases differ from kube-proxy:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The health check node port of a LoadBalancer service with eTP Local, served from what
/// `compile` says, over loopback: 200 with the local ready endpoint count, 503 when there
/// is none, closed when the service stops needing it.
#[test]
fn health_check_node_ports_follow_the_compiled_services() {
    use kxp_control::compile::{compile, CompileOptions};
    use kxp_control::healthcheck::{HealthCheckConfig, HealthCheckServers};
    use kxp_control::manifest::parse_manifests;
    use kxp_control::node::parse_node;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = parse_node(harness::NODE, "node.yaml").unwrap();
    let servers = HealthCheckServers::new(HealthCheckConfig {
        addresses: vec![Ipv4Addr::LOCALHOST.into()],
    });
    let sync = |yaml: &str| {
        let c = compile(
            &parse_manifests(yaml, "t"),
            &node,
            &CompileOptions::default(),
            None,
        );
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let s = servers.sync(&c.health_checks);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    };
    let get = |port: u16| -> Option<(u16, serde_json::Value)> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n")
            .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, serde_json::from_str(body).ok()?))
    };
    let service = |policy: &str, endpoints: &[String]| {
        svc_status(
            "{name: web, namespace: shop}",
            &format!(
                "{{type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: {policy}, \
                 healthCheckNodePort: {port}, ports: [{{name: http, port: 80, nodePort: 30080}}]}}"
            ),
            LB_STATUS,
        ) + &slice("shop/web-1", "web", "IPv4", HTTP, endpoints)
    };

    // One ready local endpoint (the terminating local one and the remote one do not count).
    sync(&service(
        "Local",
        &[
            e(L1, "node-a"),
            ep_with(L2, "node-a", TERMINATING),
            e(R1, "node-b"),
        ],
    ));
    let (status, body) = get(port).expect("health check answers");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                           "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    // None ready here any more: 503, same shape.
    sync(&service(
        "Local",
        &[ep_with(L1, "node-a", NOT_READY), e(R1, "node-b")],
    ));
    let (status, body) = get(port).expect("health check answers");
    assert_eq!(status, 503);
    assert_eq!(body["localEndpoints"], 0);
    assert_eq!(body["service"]["name"], "web");
    // eTP Cluster needs no health check: the server closes.
    sync(&service("Cluster", &[e(L1, "node-a")]));
    assert!(get(port).is_none(), "health check still open");
    assert!(servers.served().is_empty());
}

#[test]
fn the_suite_is_large_and_every_case_is_distinct() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases, want at least 60", cases.len());
    let mut specs: Vec<&str> = cases.iter().map(|c| c.spec).collect();
    specs.sort_unstable();
    let before = specs.len();
    specs.dedup();
    assert_eq!(before, specs.len(), "two cases share a description");
    assert!(cases.iter().all(|c| !c.steps.is_empty()));
}
