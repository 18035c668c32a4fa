//! `kxp run`'s lifecycle in network namespaces (root; skipped otherwise): what a crash
//! leaves behind, cleaning up after one, and refusing to clobber someone else's XDP.

mod afxdp_util;

use std::process::Command;

use afxdp_util::{can_run, repo, Node, CLUSTER_IP};

/// Compiles a BPF C file to `out` (clang is a build dependency of kxp anyway).
fn compile_bpf(src: &std::path::Path, out: &std::path::Path) {
    let s = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .expect("clang runs");
    assert!(s.success(), "clang failed on {}", src.display());
}

/// Attaches `obj` to `iface` in the node namespace the legacy way (netlink, as
/// `ip link set xdp` does), which outlives the process that did it.
fn attach_legacy(node: &Node, iface: &str, obj: &std::path::Path) {
    let out = node
        .cmd("node", "ip")
        .args(["link", "set", "dev", iface, "xdp", "obj"])
        .arg(obj)
        .args(["sec", "xdp"])
        .output()
        .expect("ip runs");
    assert!(
        out.status.success(),
        "ip link set xdp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pod_iface(node: &Node, pod: char) -> String {
    format!("kp{}{pod}", node.id)
}

#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_works() {
    if !can_run("sigkill_leaves_nothing_attached_and_a_restart_works") {
        return;
    }
    let mut node = Node::up(true);
    node.start_kxp(&[]);
    assert!(node
        .http("cli", &format!("http://{CLUSTER_IP}/"), 3)
        .is_ok());
    assert_eq!(node.xdp_programs(), 4);
    let (status, _) = node.stop_kxp(9);
    assert!(!status.success());
    // BPF links die with their process: no program stays attached.
    assert_eq!(node.xdp_programs(), 0, "XDP left attached after SIGKILL");
    // With kxp gone the kernel has the interfaces back.
    assert_eq!(
        node.http("pod-a", "http://10.244.1.3:8080/", 3).unwrap(),
        "pod-b"
    );
    node.start_kxp(&[]);
    assert!(node
        .http("cli", &format!("http://{CLUSTER_IP}/"), 3)
        .is_ok());
}

#[test]
fn stale_program_of_a_crashed_run_is_detached_at_start() {
    if !can_run("stale_program_of_a_crashed_run_is_detached_at_start") {
        return;
    }
    let mut node = Node::up(true);
    let obj = node.dir.join("steer.o");
    compile_bpf(&repo().join("dataplane/bpf/steer.c"), &obj);
    // What an older run (or one attached the legacy way) leaves: kxp_steer attached by
    // netlink, with no process holding it.
    attach_legacy(&node, &pod_iface(&node, 'b'), &obj);
    assert_eq!(node.xdp_programs(), 1);
    node.start_kxp(&[]);
    assert!(
        node.kxp_log().contains("detached a stale kxp XDP program"),
        "{}",
        node.kxp_log()
    );
    for _ in 0..10 {
        node.http("cli", &format!("http://{CLUSTER_IP}/"), 3)
            .unwrap();
    }
    let (status, log) = node.stop_kxp(15);
    assert!(status.success(), "{log}");
    assert_eq!(node.xdp_programs(), 0);
}

#[test]
fn foreign_xdp_program_and_a_second_kxp_are_refused() {
    if !can_run("foreign_xdp_program_and_a_second_kxp_are_refused") {
        return;
    }
    let mut node = Node::up(true);
    let src = node.dir.join("other.c");
    std::fs::write(
        &src,
        "__attribute__((section(\"xdp\"), used)) int other_prog(void *ctx) { return 2; }\n\
         char _license[] __attribute__((section(\"license\"), used)) = \"GPL\";\n",
    )
    .unwrap();
    let obj = node.dir.join("other.o");
    compile_bpf(&src, &obj);
    let iface = pod_iface(&node, 'c');
    attach_legacy(&node, &iface, &obj);

    let out = node
        .cmd("node", &afxdp_util::kxp_bin())
        .arg("run")
        .arg("--node")
        .arg(node.dir.join("node.yaml"))
        .arg("--manifests")
        .arg(node.manifests())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("other_prog") && err.contains(&iface), "{err}");
    assert_eq!(
        node.xdp_programs(),
        1,
        "someone else's program is left alone"
    );
    let d = node
        .cmd("node", "ip")
        .args(["link", "set", "dev", &iface, "xdp", "off"])
        .status()
        .unwrap();
    assert!(d.success());

    // A second kxp while one runs: refused, and the first keeps working.
    node.start_kxp(&[]);
    let out = node
        .cmd("node", &afxdp_util::kxp_bin())
        .arg("run")
        .arg("--node")
        .arg(node.dir.join("node.yaml"))
        .arg("--manifests")
        .arg(node.manifests())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another kxp run"), "{err}");
    assert!(node
        .http("cli", &format!("http://{CLUSTER_IP}/"), 3)
        .is_ok());
    assert_eq!(node.xdp_programs(), 4);
}
