//! IPv6 end to end through `kxp run` (root; skipped otherwise): a dual-stack namespace
//! node, IPv6 HTTP and UDP servers in the pods, an IPv6 LoadBalancer service (`web6`),
//! clients in the client and pod namespaces. Then the same with two workers on two
//! queues.

mod afxdp_util;

use std::collections::BTreeSet;

use afxdp_util::{can_run, counter, Node, CLUSTER_IP, CLUSTER_IP6, LB_IP6, NODE_IP6};

fn pods() -> BTreeSet<String> {
    ["pod-a", "pod-b", "pod-c"].map(String::from).into()
}

/// TCP (HTTP over many connections, 8 MiB transfers with verified bytes) and UDP through
/// the IPv6 ClusterIP, NodePort and LoadBalancer IP; IPv4 keeps working beside it.
fn exercise(node: &Node) {
    for (from, url) in [
        ("cli", format!("http://[{CLUSTER_IP6}]/")),
        ("cli", format!("http://[{NODE_IP6}]:30081/")),
        ("cli", format!("http://[{LB_IP6}]/")),
        ("pod-b", format!("http://[{CLUSTER_IP6}]/")),
        // Pod a reaches itself through the service now and then: hairpin.
        ("pod-a", format!("http://[{CLUSTER_IP6}]/")),
    ] {
        let (ok, failed) = node.http_parallel(from, &url, 48);
        assert!(failed.is_empty(), "{url} from {from}: {failed:?}");
        let seen: BTreeSet<String> = ok.into_iter().collect();
        assert_eq!(seen, pods(), "{url} from {from}: every pod answers");
    }
    for (from, host, port) in [
        ("cli", CLUSTER_IP6, 53),
        ("cli", NODE_IP6, 30054),
        ("cli", LB_IP6, 53),
        ("pod-c", CLUSTER_IP6, 53),
    ] {
        let answers = node
            .udp_many(from, host, port, 24)
            .unwrap_or_else(|e| panic!("{e}"));
        let seen: BTreeSet<String> = answers
            .iter()
            .map(|a| a.split(':').next().unwrap_or("").to_string())
            .collect();
        assert_eq!(seen, pods(), "UDP [{host}]:{port} from {from}: {answers:?}");
    }
    let want = node.big_sha256();
    for (from, url) in [
        ("cli", format!("http://[{LB_IP6}]/big")),
        ("pod-b", format!("http://[{CLUSTER_IP6}]/big")),
    ] {
        let (sha, bytes) = node
            .http_sha256(from, &url)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bytes, 8 * 1024 * 1024, "{url} from {from}");
        assert_eq!(sha, want, "{url} from {from}: bytes differ");
    }
    // IPv4 beside it.
    let (ok, failed) = node.http_parallel("cli", &format!("http://{CLUSTER_IP}/"), 16);
    assert!(failed.is_empty() && ok.len() == 16, "IPv4: {failed:?}");
}

fn check_counters(log: &str) {
    assert_eq!(counter(log, "driver.pass_not_reinjected"), 0, "{log}");
    assert_eq!(counter(log, "driver.tx_ring_full"), 0, "{log}");
    assert_eq!(counter(log, "xdp.pass_no_socket"), 0, "{log}");
    assert_eq!(counter(log, "xdp.drop_snat_unowned"), 0, "{log}");
    assert!(counter(log, "xdp.redirect_snat_reply") > 0, "{log}");
    assert!(counter(log, "xdp.redirect_reply") > 0, "{log}");
}

#[test]
fn ipv6_services_one_worker() {
    if !can_run("ipv6_services_one_worker") {
        return;
    }
    let mut node = Node::up_with(true, 1, true);
    node.start_kxp(&[]);
    exercise(&node);
    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exit: {status}\n{log}");
    check_counters(&log);
}

#[test]
fn ipv6_services_two_workers_two_queues() {
    if !can_run("ipv6_services_two_workers_two_queues") {
        return;
    }
    let mut node = Node::up_with(true, 2, true);
    node.start_kxp(&["--workers", "2", "--cores", "0,1"]);
    exercise(&node);
    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exit: {status}\n{log}");
    check_counters(&log);
    let sent = counter(&log, "driver.handoff_frames");
    assert!(sent > 0, "{log}");
    assert_eq!(counter(&log, "driver.handoff_received"), sent, "{log}");
    assert_eq!(counter(&log, "driver.meta_missing"), 0, "{log}");
}
