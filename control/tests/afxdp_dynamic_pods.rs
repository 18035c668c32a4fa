//! Pods appearing and going while `kxp run` runs (root; skipped otherwise): a veth that
//! matches `--pod-interfaces` and is created after start gets a socket per worker, its
//! steering slot and the XDP program; when it is deleted its sockets are closed and the
//! rest of the node is unharmed; when it comes back (a new interface index) it is served
//! again.

mod afxdp_util;

use std::time::{Duration, Instant};

use afxdp_util::{can_run, counter, Node, CLUSTER_IP, LB_IP};

/// Retries `f` every 200 ms for up to `secs`; the last error if it never succeeds.
fn eventually(secs: u64, mut f: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn answers(node: &Node, from: &str, url: &str, want: &str) -> Result<(), String> {
    let got = node.http(from, url, 1)?;
    (got == want)
        .then_some(())
        .ok_or(format!("{url} from {from}: {got}"))
}

#[test]
fn pods_appearing_and_going_at_run_time() {
    if !can_run("pods_appearing_and_going_at_run_time") {
        return;
    }
    let mut node = Node::up(true);
    let ifname = format!("kd{}", node.id);
    node.start_kxp(&["--pod-interfaces", "kd*"]);
    let cip = format!("http://{CLUSTER_IP}/");

    for round in 0..2 {
        // Pod d appears (in round 1 with a new interface index) and becomes web's only
        // endpoint: reached from the client (masqueraded), through the LB IP over UDP,
        // and from pod d itself (hairpin: frames in and out of the new interface).
        node.add_pod("d", &ifname);
        node.set_web_endpoints(&["d"]);
        eventually(20, || answers(&node, "cli", &cip, "pod-d"))
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", node.kxp_log()));
        for _ in 0..5 {
            answers(&node, "cli", &cip, "pod-d").unwrap();
            answers(&node, "pod-d", &cip, "pod-d").unwrap();
            answers(&node, "pod-b", &cip, "pod-d").unwrap();
        }
        assert_eq!(node.udp("cli", LB_IP, 53, 3).unwrap(), "pod-d:ping");
        let want = node.big_sha256();
        let (sha, _) = node
            .http_sha256("cli", &format!("http://{LB_IP}/big"))
            .unwrap();
        assert_eq!(sha, want, "round {round}: 8 MiB from pod d");

        // Pod d goes: its sockets close, everything else keeps working.
        node.set_web_endpoints(&["a", "b"]);
        node.del_pod("d", &ifname);
        let gone = "pod interface gone";
        eventually(10, || {
            let n = node.kxp_log().matches(gone).count();
            (n > round)
                .then_some(())
                .ok_or(format!("{n} removals logged"))
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", node.kxp_log()));
        for _ in 0..10 {
            let got = node.http("cli", &cip, 3).unwrap();
            assert!(got == "pod-a" || got == "pod-b", "round {round}: {got}");
        }
        assert_eq!(
            node.xdp_programs(),
            4,
            "round {round}: the node file's four veths keep their program"
        );
    }

    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "kxp run exit: {status}\n{log}");
    assert_eq!(node.xdp_programs(), 0, "{log}");
    assert_eq!(log.matches("pod interface added").count(), 2, "{log}");
    assert_eq!(counter(&log, "driver.ports_removed"), 2, "{log}");
    // Frames the pipeline passed could not go back to the kernel; the only ones expected
    // are late frames (FIN, ACK) of flows purged when their pod went away, whose reply
    // tuples were still steered: no service, no flow. Under load a few arrive.
    let passed = counter(&log, "driver.pass_not_reinjected");
    assert_eq!(passed, counter(&log, "pipeline.pass_not_service"), "{log}");
    assert!(
        passed <= counter(&log, "pipeline.purged_flows"),
        "more passed frames than purged flows:\n{log}"
    );
}
