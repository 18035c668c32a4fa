//! Two workers on two receive queues (root; skipped otherwise). Every veth of the
//! namespace node has two queues, and senders pick a TX queue (hence the node's RX queue)
//! per connection, so a flow's frames and its replies arrive on either queue, whichever
//! worker holds the flow. The steering program marks each frame with its owner and the
//! workers hand frames they do not own to the owner (`driver/afxdp/handoff.rs`).

mod afxdp_util;

use std::collections::BTreeSet;

use afxdp_util::{can_run, counter, Node, CLUSTER_IP, LB_IP, NODE_IP, SELF_IP};

/// Sum of `worker{i}.name` over the two workers.
fn per_worker(log: &str, name: &str) -> [u64; 2] {
    [0, 1].map(|i| counter(log, &format!("worker{i}.{name}")))
}

#[test]
fn two_workers_two_queues_both_directions() {
    if !can_run("two_workers_two_queues_both_directions") {
        return;
    }
    let mut node = Node::up_with(true, 2, false);
    node.start_kxp(&["--workers", "2", "--cores", "0,1"]);
    let pods: BTreeSet<String> = ["pod-a", "pod-b", "pod-c"].map(String::from).into();

    // Many concurrent TCP connections (HTTP) through every kind of frontend: from the
    // client to the ClusterIP, the NodePort and the LoadBalancer IP (masqueraded: replies
    // steered by SNAT port), from pods to the ClusterIP (DNAT only: replies steered by
    // their tuple), and hairpin.
    for (from, url, n) in [
        ("cli", format!("http://{CLUSTER_IP}/"), 64),
        ("cli", format!("http://{NODE_IP}:30080/"), 64),
        ("cli", format!("http://{LB_IP}/"), 64),
        ("pod-b", format!("http://{CLUSTER_IP}/"), 64),
        ("pod-a", format!("http://{SELF_IP}/"), 32),
    ] {
        let (ok, failed) = node.http_parallel(from, &url, n);
        assert!(failed.is_empty(), "{url} from {from}: {failed:?}");
        assert_eq!(ok.len(), n, "{url} from {from}");
        let seen: BTreeSet<String> = ok.into_iter().collect();
        if url.contains(SELF_IP) {
            assert_eq!(seen, ["pod-a".to_string()].into(), "hairpin");
        } else {
            assert_eq!(seen, pods, "{url} from {from}: every pod answers");
        }
    }

    // UDP request/response, each from a fresh source port.
    for (from, host, port) in [
        ("cli", CLUSTER_IP, 53),
        ("cli", NODE_IP, 30053),
        ("cli", LB_IP, 53),
        ("pod-c", CLUSTER_IP, 53),
    ] {
        let answers = node
            .udp_many(from, host, port, 32)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            answers.iter().all(|a| a.starts_with("pod-")),
            "UDP {host}:{port} from {from}: {answers:?}"
        );
    }

    // Large transfers with verified bytes, two at a time (their segments and ACKs cross
    // between queues all along).
    let want = node.big_sha256();
    std::thread::scope(|s| {
        let jobs: Vec<_> = [
            ("cli", format!("http://{LB_IP}/big")),
            ("cli", format!("http://{NODE_IP}:30080/big")),
            ("pod-b", format!("http://{CLUSTER_IP}/big")),
            ("pod-c", format!("http://{CLUSTER_IP}/big")),
        ]
        .into_iter()
        .map(|(from, url)| {
            let node = &node;
            s.spawn(move || (from, url.clone(), node.http_sha256(from, &url)))
        })
        .collect();
        for j in jobs {
            let (from, url, got) = j.join().expect("transfer thread");
            let (sha, bytes) = got.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(bytes, 8 * 1024 * 1024, "{url} from {from}");
            assert_eq!(sha, want, "{url} from {from}: bytes differ");
        }
    });

    // Pod to pod still goes through the kernel.
    assert_eq!(
        node.http("pod-a", "http://10.244.1.3:8080/", 3).unwrap(),
        "pod-b"
    );

    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exit: {status}\n{log}");
    assert_eq!(node.xdp_programs(), 0, "XDP detached:\n{log}");

    // Both workers carried traffic and both took new flows.
    let rx = per_worker(&log, "rx_frames");
    let new_flows = per_worker(&log, "new_flows");
    assert!(rx.iter().all(|&n| n > 0), "rx per worker {rx:?}\n{log}");
    assert!(
        new_flows.iter().all(|&n| n > 0),
        "new flows per worker {new_flows:?}\n{log}"
    );
    // Frames did reach workers that do not own their flow, and every one was handed over
    // and processed by its owner: what the steering program saw misdirected is what the
    // workers sent, nothing was lost in the rings.
    let sent: u64 = per_worker(&log, "handoff_frames").iter().sum();
    let received: u64 = per_worker(&log, "handoff_received").iter().sum();
    let full: u64 = per_worker(&log, "handoff_queue_full").iter().sum();
    assert!(sent > 0, "no frame was handed over:\n{log}");
    assert_eq!(sent, received, "{log}");
    assert_eq!(counter(&log, "driver.handoff_frames"), sent, "{log}");
    assert_eq!(
        counter(&log, "xdp.redirect_other_owner"),
        sent + full,
        "{log}"
    );
    assert_eq!(counter(&log, "driver.handoff_too_large"), 0, "{log}");
    assert_eq!(counter(&log, "driver.meta_missing"), 0, "{log}");
    assert_eq!(counter(&log, "xdp.meta_failed"), 0, "{log}");
    // Nothing arrived on a queue without a socket, no SNAT reply was unowned, nothing
    // steered had to go back to the kernel.
    assert_eq!(counter(&log, "xdp.pass_no_socket"), 0, "{log}");
    assert_eq!(counter(&log, "xdp.drop_snat_unowned"), 0, "{log}");
    assert_eq!(counter(&log, "driver.pass_not_reinjected"), 0, "{log}");
    assert_eq!(counter(&log, "driver.tx_ring_full"), 0, "{log}");
    eprintln!("{log}");
}
