//! `kxp run` on a node in network namespaces (root; skipped otherwise): real TCP and UDP
//! clients and servers in a client namespace and three pod namespaces, service traffic
//! through AF_XDP, everything else through the node's kernel.

mod afxdp_util;

use std::collections::BTreeSet;

use afxdp_util::{can_run, counter, Node, CLUSTER_IP, LB_IP, NODE_IP, SELF_IP};

/// Pods answering `url` from `from` over `n` fresh connections.
fn spread(node: &Node, from: &str, url: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| node.http(from, url, 3).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Service traffic of every kind, with TX checksum offload on everywhere (as a CNI
/// leaves it): kxp must complete the partial checksums of frames from veths.
#[test]
fn services_tcp_udp_hairpin_and_node_traffic() {
    if !can_run("services_tcp_udp_hairpin_and_node_traffic") {
        return;
    }
    let mut node = Node::up(true);
    node.start_node_server();
    node.start_kxp(&[]);
    let pods: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();

    // TCP (HTTP) through the ClusterIP, the NodePort and the LoadBalancer IP, from
    // outside the cluster (masqueraded); over enough connections every pod answers.
    for url in [
        format!("http://{CLUSTER_IP}/"),
        format!("http://{NODE_IP}:30080/"),
        format!("http://{LB_IP}/"),
    ] {
        let seen = spread(&node, "cli", &url, 40);
        assert_eq!(seen, pods, "{url} from the client");
    }
    // From a pod to the ClusterIP (DNAT only: the reply tuple is steered by the map).
    assert_eq!(
        spread(&node, "pod-b", &format!("http://{CLUSTER_IP}/"), 40),
        pods,
        "ClusterIP from pod b"
    );
    // Hairpin: pod a to a service whose only endpoint is pod a.
    for _ in 0..5 {
        assert_eq!(
            node.http("pod-a", &format!("http://{SELF_IP}/"), 3)
                .unwrap(),
            "pod-a"
        );
    }

    // UDP through the ClusterIP, the NodePort and the LoadBalancer IP, and from a pod.
    for (from, host, port) in [
        ("cli", CLUSTER_IP, 53),
        ("cli", NODE_IP, 30053),
        ("cli", LB_IP, 53),
        ("pod-c", CLUSTER_IP, 53),
    ] {
        let answer = node.udp(from, host, port, 3).unwrap();
        assert!(
            answer.starts_with("pod-") && answer.ends_with(":ping"),
            "UDP {host}:{port} from {from}: {answer:?}"
        );
    }

    // Large transfers, bytes verified: 8 MiB from the LB IP to the client, and through
    // the ClusterIP to a pod.
    let want = node.big_sha256();
    for (from, url) in [
        ("cli", format!("http://{LB_IP}/big")),
        ("pod-b", format!("http://{CLUSTER_IP}/big")),
    ] {
        let (sha, bytes) = node.http_sha256(from, &url).unwrap();
        assert_eq!(bytes, 8 * 1024 * 1024, "{url} from {from}");
        assert_eq!(sha, want, "{url} from {from}: bytes differ");
    }

    // Node networking that is not service traffic keeps working: the node's own
    // servers, pod to pod, client to pod, ICMP, ARP (all of the above needs it).
    assert_eq!(
        node.http("cli", &format!("http://{NODE_IP}:9000/"), 3)
            .unwrap(),
        "node"
    );
    assert_eq!(node.udp("cli", NODE_IP, 9053, 3).unwrap(), "node:ping");
    assert_eq!(
        node.http("pod-a", "http://10.244.1.3:8080/", 3).unwrap(),
        "pod-b"
    );
    assert_eq!(
        node.http("cli", "http://10.244.1.4:8080/", 3).unwrap(),
        "pod-c"
    );
    assert_eq!(
        node.udp("pod-c", "10.244.1.2", 5353, 3).unwrap(),
        "pod-a:ping"
    );
    node.ping("cli", NODE_IP).unwrap();
    node.ping("pod-a", "10.244.1.4").unwrap();
    let (sha, _) = node
        .http_sha256("pod-c", "http://10.244.1.2:8080/big")
        .unwrap();
    assert_eq!(sha, want, "pod-to-pod transfer");

    assert_eq!(
        node.xdp_programs(),
        4,
        "steering attached to all four veths"
    );
    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exit: {status}\n{log}");
    assert_eq!(node.xdp_programs(), 0, "XDP detached on SIGTERM:\n{log}");
    // Frames from veths had their checksums completed; nothing kxp was steered had to
    // go back to the kernel; no frame was lost for want of ring space.
    assert!(counter(&log, "driver.l4_checksums_recomputed") > 0, "{log}");
    assert_eq!(counter(&log, "driver.pass_not_reinjected"), 0, "{log}");
    assert_eq!(counter(&log, "driver.tx_ring_full"), 0, "{log}");
    assert_eq!(counter(&log, "xdp.drop_snat_unowned"), 0, "{log}");
    // Reply tuples went to the shared reply table; none needed the LRU map.
    assert!(counter(&log, "driver.reply_table_inserts") > 0, "{log}");
    assert_eq!(counter(&log, "driver.reply_table_full"), 0, "{log}");
    assert_eq!(counter(&log, "driver.reply_tuples_added"), 0, "{log}");
    assert!(counter(&log, "xdp.redirect_snat_reply") > 0, "{log}");

    // Without kxp the kernel has everything back: the node's own traffic still works.
    assert_eq!(
        node.http("pod-a", "http://10.244.1.3:8080/", 3).unwrap(),
        "pod-b"
    );
}

/// Trap 1, the other way: with TX checksum offload off on every sender, incremental
/// updates alone are right (`--l4-checksum never`).
#[test]
fn offload_off_needs_no_checksum_recompute() {
    if !can_run("offload_off_needs_no_checksum_recompute") {
        return;
    }
    let mut node = Node::up(false);
    node.start_kxp(&["--l4-checksum", "never"]);
    assert_eq!(
        spread(&node, "cli", &format!("http://{LB_IP}/"), 30).len(),
        3
    );
    assert!(node
        .udp("pod-a", CLUSTER_IP, 53, 3)
        .unwrap()
        .ends_with(":ping"));
    let (sha, _) = node
        .http_sha256("pod-a", &format!("http://{CLUSTER_IP}/big"))
        .unwrap();
    assert_eq!(sha, node.big_sha256());
    let (status, log) = node.stop_kxp(2);
    assert!(status.success(), "kxp run exit on SIGINT: {status}\n{log}");
    assert_eq!(counter(&log, "driver.l4_checksums_recomputed"), 0, "{log}");
    assert_eq!(node.xdp_programs(), 0);
}

/// Trap 1 shown: offload on and no recompute corrupts forwarded segments, which the
/// receiver drops (this is why `--l4-checksum auto` recomputes for veths).
#[test]
fn partial_checksums_without_recompute_are_dropped_by_receivers() {
    if !can_run("partial_checksums_without_recompute_are_dropped_by_receivers") {
        return;
    }
    let mut node = Node::up(true);
    node.start_kxp(&["--l4-checksum", "never"]);
    assert!(
        node.udp("cli", CLUSTER_IP, 53, 2).is_err(),
        "a datagram with a partial checksum, rewritten incrementally, should not be accepted"
    );
    // The same datagram straight to the pod (kernel-forwarded) is fine.
    assert!(node.udp("cli", "10.244.1.2", 5353, 3).is_ok());
}

/// Endpoints scaled live by editing the manifests: traffic follows within seconds.
#[test]
fn traffic_follows_endpoint_changes() {
    if !can_run("traffic_follows_endpoint_changes") {
        return;
    }
    let mut node = Node::up(true);
    node.set_web_endpoints(&["a"]);
    node.start_kxp(&[]);
    let url = format!("http://{CLUSTER_IP}/");
    assert_eq!(spread(&node, "cli", &url, 10), ["pod-a".to_string()].into());

    node.set_web_endpoints(&["b", "c"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let seen = spread(&node, "cli", &url, 20);
        if seen == ["pod-b".to_string(), "pod-c".to_string()].into() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "traffic did not follow the new endpoints: {seen:?}"
        );
    }
    // Scaled to zero: the ClusterIP rejects (ICMP port unreachable), curl fails fast.
    node.set_web_endpoints(&[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let started = std::time::Instant::now();
        let r = node.http("cli", &url, 1);
        if r.is_err() && started.elapsed() < std::time::Duration::from_secs(3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no endpoints should be rejected at once: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (_, log) = node.stop_kxp(15);
    assert!(counter(&log, "pipeline.reject_no_endpoints") > 0, "{log}");
}

/// The node's own processes reach ClusterIPs through the host veth (`--host-veth`):
/// TCP, UDP and a verified transfer from the node namespace; the veth and its routes are
/// gone after kxp stops.
#[test]
fn node_to_cluster_ip_through_the_host_veth() {
    if !can_run("node_to_cluster_ip_through_the_host_veth") {
        return;
    }
    let mut node = Node::up(true);
    node.start_kxp(&["--host-veth", "kxph"]);
    let pods: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();
    assert_eq!(
        spread(&node, "node", &format!("http://{CLUSTER_IP}/"), 40),
        pods
    );
    assert!(node
        .udp("node", CLUSTER_IP, 53, 3)
        .unwrap()
        .ends_with(":ping"));
    let (sha, _) = node
        .http_sha256("node", &format!("http://{CLUSTER_IP}/big"))
        .unwrap();
    assert_eq!(sha, node.big_sha256());
    // The rest of the node's traffic is untouched.
    assert_eq!(
        node.http("node", "http://10.244.1.3:8080/", 3).unwrap(),
        "pod-b"
    );
    assert_eq!(node.xdp_programs(), 5, "uplink, three pods, host veth");
    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "{log}");
    let gone = node
        .cmd("node", "ip")
        .args(["link", "show", "dev", "kxph"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "host veth left behind");
    let routes = node.cmd("node", "ip").args(["route"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("10.96.0.0/16"));
}

/// A reply table too small for the traffic (one bucket): the tuples that find no slot go
/// to the kernel's LRU map instead, counted, and every connection still works.
#[test]
fn reply_table_overflow_falls_back_to_the_lru_map() {
    if !can_run("reply_table_overflow_falls_back_to_the_lru_map") {
        return;
    }
    let mut node = Node::up(false);
    node.start_kxp(&["--reply-table-slots", "4"]);
    let pods: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();
    let (ok, failed) = node.http_parallel("pod-b", &format!("http://{CLUSTER_IP}/"), 32);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(ok.into_iter().collect::<BTreeSet<_>>(), pods);
    let answers = node
        .udp_many("pod-c", CLUSTER_IP, 53, 24)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answers.len(), 24);
    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exit: {status}\n{log}");
    assert!(counter(&log, "driver.reply_table_inserts") > 0, "{log}");
    assert!(counter(&log, "driver.reply_table_full") > 0, "{log}");
    assert!(counter(&log, "driver.reply_tuples_added") > 0, "{log}");
    assert_eq!(counter(&log, "driver.reply_map_errors"), 0, "{log}");
    assert_eq!(counter(&log, "driver.pass_not_reinjected"), 0, "{log}");
}
