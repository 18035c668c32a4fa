//! The node's own traffic to services through the host veth (`kxp run --host-veth`):
//! beyond ClusterIPs, to the LoadBalancer IP (a host route kept in step with the tables)
//! and to the node's own NodePorts (a policy rule in front of the moved `local` rule),
//! TCP and UDP; the node's other local traffic untouched; everything undone at stop.

mod afxdp_util;

use std::collections::BTreeSet;

use afxdp_util::*;

fn ip_out(node: &Node, args: &[&str]) -> String {
    let out = node.cmd("node", "ip").args(args).output().expect("ip runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spread(node: &Node, url: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| {
            node.http("node", url, 3)
                .unwrap_or_else(|e| panic!("{e}\nkxp log:\n{}", node.kxp_log()))
        })
        .collect()
}

#[test]
fn node_reaches_load_balancer_ip_and_its_own_node_ports() {
    if !can_run("node_reaches_load_balancer_ip_and_its_own_node_ports") {
        return;
    }
    let mut node = Node::up(true);
    node.start_node_server();
    let rules_before = ip_out(&node, &["rule", "list"]);
    node.start_kxp(&["--host-veth", "kxph"]);

    let pods: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();
    for url in [
        format!("http://{LB_IP}/"),
        format!("http://{NODE_IP}:30080/"),
        format!("http://{CLUSTER_IP}/"),
    ] {
        assert_eq!(spread(&node, &url, 40), pods, "{url} from the node");
    }
    for (host, port) in [(LB_IP, 53), (NODE_IP, 30053)] {
        let answer = node
            .udp("node", host, port, 3)
            .unwrap_or_else(|e| panic!("UDP {host}:{port} from the node: {e}"));
        assert!(answer.ends_with(":ping"), "UDP {host}:{port}: {answer}");
    }
    // A large transfer through the NodePort, bytes verified.
    let (sha, _) = node
        .http_sha256("node", &format!("http://{NODE_IP}:30080/big"))
        .unwrap();
    assert_eq!(sha, node.big_sha256());
    // The node's own services on its own address (not NodePorts) stay local, and the
    // client still reaches them.
    assert_eq!(
        node.http("node", &format!("http://{NODE_IP}:9000/"), 3)
            .unwrap(),
        "node"
    );
    assert_eq!(
        node.http("cli", &format!("http://{NODE_IP}:9000/"), 3)
            .unwrap(),
        "node"
    );
    let rules = ip_out(&node, &["rule", "list"]);
    assert!(
        rules.contains("dport 30080") && rules.contains("lookup 7877"),
        "NodePort rule missing:\n{rules}"
    );

    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "{log}");
    // Everything undone: the rules as they were, no routes left behind.
    assert_eq!(ip_out(&node, &["rule", "list"]), rules_before);
    assert!(!ip_out(&node, &["route"]).contains(LB_IP));
    assert!(ip_out(&node, &["route", "show", "table", "7877"])
        .trim()
        .is_empty());
    // And the node's own traffic still works.
    assert_eq!(
        node.http("node", &format!("http://{NODE_IP}:9000/"), 3)
            .unwrap(),
        "node"
    );
}
