//! `kxp run --kubeconfig`: the node agent fed by the Kubernetes API instead of manifests.
//!
//! No API server can be installed here, so the test runs the fake one the kube source's
//! own tests use (`fake_apiserver`: real list/watch protocol, chunked watch streams,
//! resourceVersions) inside the node's network namespace, where `kxp run` reaches it on
//! 127.0.0.1. The objects it serves are the topology's own manifests, decoded. Then: real
//! HTTP and UDP clients through the ClusterIP, the NodePort and the LoadBalancer IP;
//! endpoints changed through the API and traffic following; the API server going away
//! while the data path keeps forwarding on the last good tables.

mod afxdp_util;
mod fake_apiserver;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use afxdp_util::*;
use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Node as KubeNode, NodeAddress, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Starts the fake API server with its listening socket (and its runtime's threads) in
/// network namespace `ns`: a thread enters the namespace, binds, and is done; sockets keep
/// the namespace they were created in.
fn api_server_in(ns: &str) -> FakeApiServer {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        FakeApiServer::start()
    })
    .join()
    .expect("fake API server started")
}

/// Serves the topology's manifests (Services and EndpointSlices) as API objects.
fn publish_manifests(api: &FakeApiServer, node: &Node) {
    let set = kxp_control::manifest::load_manifests(node.manifests());
    assert!(set.errors.is_empty(), "manifests: {:?}", set.errors);
    assert!(!set.services.is_empty(), "no services in the manifests");
    api.edit(|e| {
        for s in &set.services {
            e.apply(s);
        }
        for s in &set.slices {
            e.apply(s);
        }
    });
}

fn answers(node: &Node, from: &str, url: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| {
            node.http(from, url, 3)
                .unwrap_or_else(|e| panic!("{e}\nkxp log:\n{}", node.kxp_log()))
        })
        .collect()
}

/// Polls until every one of `n` requests is answered by a pod in `want` (bounded).
fn wait_for_answers(node: &Node, url: &str, want: &BTreeSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = answers(node, "cli", url, 12);
        if seen == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: answered by {seen:?}, want {want:?}\n{}",
            node.kxp_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kubeconfig_source_drives_the_dataplane() {
    if !can_run("kubeconfig_source_drives_the_dataplane") {
        return;
    }
    let mut node = Node::up(true);
    let api = api_server_in(&node.ns("node"));
    // This node's Node object, as the kubelet would register it.
    let node_name = std::fs::read_to_string(node.dir.join("node.yaml"))
        .expect("node.yaml")
        .lines()
        .find_map(|l| l.strip_prefix("name: ").map(str::to_owned))
        .expect("node name");
    api.apply(&KubeNode {
        metadata: ObjectMeta {
            name: Some(node_name),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: NODE_IP.into(),
            }]),
            ..NodeStatus::default()
        }),
        ..KubeNode::default()
    });
    publish_manifests(&api, &node);
    let kubeconfig = api.kubeconfig().to_str().expect("utf-8 path").to_owned();
    node.start_kxp(&["--kubeconfig", &kubeconfig]);

    let all: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();
    for url in [
        format!("http://{CLUSTER_IP}/"),
        format!("http://{NODE_IP}:30080/"),
        format!("http://{LB_IP}/"),
    ] {
        wait_for_answers(&node, &url, &all);
    }
    for (host, port) in [(CLUSTER_IP, 53), (NODE_IP, 30053), (LB_IP, 53)] {
        let name = node
            .udp("cli", host, port, 5)
            .unwrap_or_else(|e| panic!("UDP {host}:{port}: {e}"));
        // The pods' UDP server echoes "<pod>:<payload>".
        let pod = name.split(':').next().unwrap_or_default();
        assert!(all.contains(pod), "UDP {host}:{port} answered {name:?}");
    }
    // An endpoint change through the API: only pod b is left, and traffic follows.
    node.set_web_endpoints(&["b"]);
    publish_manifests(&api, &node);
    let only_b: BTreeSet<String> = ["pod-b".to_string()].into();
    wait_for_answers(&node, &format!("http://{LB_IP}/"), &only_b);
    // The API server goes away: the data path keeps forwarding on the last good tables.
    api.set_down(true);
    api.reset_connections();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        answers(&node, "cli", &format!("http://{CLUSTER_IP}/"), 10),
        only_b,
        "forwarding while the API server is down"
    );
    // It comes back with the endpoints scaled up again: traffic follows.
    api.set_down(false);
    node.set_web_endpoints(&["a", "b", "c"]);
    publish_manifests(&api, &node);
    wait_for_answers(&node, &format!("http://{CLUSTER_IP}/"), &all);

    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exited with {status}:\n{log}");
    assert!(
        log.contains("watching the Kubernetes API"),
        "kxp did not use the API source:\n{log}"
    );
}
