//! Shared by the `afxdp_*` tests: a node in network namespaces (built by
//! `scripts/netns.sh`), `kxp run` inside it, and clients in the client and pod namespaces.
//!
//! Everything lives in namespaces named after this process and a counter, so tests in
//! parallel (and several test binaries) never collide. [`Node`]'s `Drop` tears it all
//! down, also when a test panics; SIGINT/SIGTERM/SIGHUP tear down every live node before
//! the process exits; namespaces a killed test process left behind (its pid no longer
//! alive) are removed when the next node is built.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// Live topologies: (id, dir), for the signal handler.
static LIVE: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
static SIGNALS: Once = Once::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);
/// AF_XDP tests share two cores with everything else: one at a time per process.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn netns_sh() -> PathBuf {
    repo().join("scripts/netns.sh")
}

fn script(name: &str) -> String {
    repo().join("scripts").join(name).display().to_string()
}

/// Whether this test can run: root, and the tools the topology needs. Prints why not.
pub fn can_run(test: &str) -> bool {
    if !is_root() {
        eprintln!("skipped {test}: needs root (network namespaces, XDP, AF_XDP)");
        return false;
    }
    for tool in ["ip", "python3", "curl", "bash"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            eprintln!("skipped {test}: {tool} is not installed");
            return false;
        }
    }
    true
}

/// Effective uid 0, read from /proc (no unsafe needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn sh(cmd: &str) -> Output {
    Command::new("bash")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("bash runs")
}

fn topo_down(id: &str, dir: &Path) {
    let out = sh(&format!(
        "source {} && kxp_topo_down {id} {}",
        netns_sh().display(),
        dir.display()
    ));
    if !out.status.success() {
        eprintln!("teardown of {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn install_signal_teardown() {
    SIGNALS.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let live = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for (id, dir) in live {
                    topo_down(&id, &dir);
                    let _ = std::fs::remove_dir_all(&dir);
                }
                std::process::exit(128 + sig);
            }
        });
    });
}

/// Removes namespaces of test ids (`<hex pid>x<hex n>`) whose process is gone.
fn reap_stale() {
    let out = sh("ip netns list");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ids = std::collections::BTreeSet::new();
    for line in text.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let rest = ["kxp-node-", "kxp-cli-", "kxp-pod-"]
            .iter()
            .find_map(|p| name.strip_prefix(p));
        let Some(rest) = rest else { continue };
        let id = rest.split('-').next().unwrap_or("");
        let Some((pid, n)) = id.split_once('x') else {
            continue;
        };
        let (Ok(pid), true) = (
            u32::from_str_radix(pid, 16),
            !n.is_empty() && n.chars().all(|c| c.is_ascii_hexdigit()),
        ) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            ids.insert(id.to_string());
        }
    }
    for id in ids {
        eprintln!("removing namespaces of a dead test run: {id}");
        topo_down(&id, Path::new("/nonexistent"));
    }
}

/// A node with its client and three pods, each pod serving HTTP (:8080, its name; /big)
/// and UDP (:5353, echoes its name), and the manifests for the demo services: `web`
/// (ClusterIP 10.96.0.10, NodePort 30080/30053, LoadBalancer 203.0.113.10; TCP 80 and
/// UDP 53) and `self-a` (ClusterIP 10.96.0.20, pod a only).
pub struct Node {
    pub id: String,
    pub dir: PathBuf,
    kxp: Option<Child>,
    _serial: MutexGuard<'static, ()>,
}

pub const CLUSTER_IP: &str = "10.96.0.10";
pub const SELF_IP: &str = "10.96.0.20";
pub const NODE_IP: &str = "192.168.50.2";
pub const LB_IP: &str = "203.0.113.10";
/// The dual-stack topology's IPv6 service `web6` (TCP 80 and UDP 53; NodePorts 30081 and
/// 30054) and the node's IPv6 address.
pub const CLUSTER_IP6: &str = "fd00:96::10";
pub const LB_IP6: &str = "2001:db8::10";
pub const NODE_IP6: &str = "fd00:50::2";

impl Node {
    /// Builds the topology. `offload`: leave TX checksum offload on for the pods' and the
    /// client's veths (the default everywhere), or turn it off.
    pub fn up(offload: bool) -> Self {
        Self::up_with(offload, 1, false)
    }

    /// [`Node::up`] with `queues` receive and transmit queues on every veth (the node's,
    /// the client's and the pods' ends), and, with `ipv6`, dual-stack: IPv6 addresses
    /// everywhere, IPv6 servers in the pods and the `web6` service (see
    /// [`CLUSTER_IP6`]).
    pub fn up_with(offload: bool, queues: u32, ipv6: bool) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        install_signal_teardown();
        reap_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}x{:x}", std::process::id(), n);
        let dir = std::env::temp_dir().join(format!("kxp-test-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id.clone(), dir.clone()));
        // From here on Drop cleans up, whatever fails below.
        let node = Self {
            id,
            dir,
            kxp: None,
            _serial: serial,
        };
        let out = sh(&format!(
            "export KXP_VETH_QUEUES={queues} KXP_IPV6={v6}; source {sh} && \
             kxp_topo_up {id} {dir} {off} && kxp_manifests {dir}/manifests a b c {v6m}",
            v6 = u8::from(ipv6),
            v6m = if ipv6 {
                format!("&& kxp_manifests_v6 {}/manifests a b c", node.dir.display())
            } else {
                String::new()
            },
            sh = netns_sh().display(),
            id = node.id,
            dir = node.dir.display(),
            off = if offload { "on" } else { "off" },
        ));
        assert!(
            out.status.success(),
            "topology {} did not come up: {}",
            node.id,
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    /// The namespace `which` (`node`, `cli`, `pod-a`, ...) of this topology.
    pub fn ns(&self, which: &str) -> String {
        match which.strip_prefix("pod-") {
            Some(pod) => format!("kxp-pod-{}-{pod}", self.id),
            None => format!("kxp-{which}-{}", self.id),
        }
    }

    /// A command run in namespace `which` (`node`, `cli`, `pod-a`, ...).
    pub fn cmd(&self, which: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(which), program]);
        c.stdin(Stdio::null());
        c
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Rewrites the `web` service's endpoints (pods by letter).
    pub fn set_web_endpoints(&self, pods: &[&str]) {
        let out = sh(&format!(
            "source {} && kxp_manifests {} {}",
            netns_sh().display(),
            self.manifests().display(),
            pods.join(" ")
        ));
        assert!(out.status.success(), "manifests not written");
    }

    fn ready_file(&self) -> PathBuf {
        self.dir.join("kxp.ready")
    }

    pub fn kxp_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kxp.log")).unwrap_or_default()
    }

    /// Starts `kxp run` in the node namespace and waits (bounded) until it steers.
    pub fn start_kxp(&mut self, extra: &[&str]) {
        assert!(self.kxp.is_none(), "kxp already running");
        let _ = std::fs::remove_file(self.ready_file());
        let log = std::fs::File::create(self.dir.join("kxp.log")).expect("log file");
        let mut c = self.cmd("node", &kxp_bin());
        c.arg("run").arg("--node").arg(self.dir.join("node.yaml"));
        // The manifests are the source unless the test points kxp at an API server.
        if !extra.iter().any(|a| *a == "--kubeconfig" || *a == "--kube") {
            c.arg("--manifests").arg(self.manifests());
        }
        c.arg("--ready-file")
            .arg(self.ready_file())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let mut child = c.spawn().expect("kxp starts");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ready_file().exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kxp run exited ({status}):\n{}", self.kxp_log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kxp run not ready within 60 s:\n{}", self.kxp_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kxp = Some(child);
    }

    /// Sends `signal` to kxp and waits (bounded) for it to exit. Returns its status and
    /// its log.
    pub fn stop_kxp(&mut self, signal: i32) -> (ExitStatus, String) {
        let mut child = self.kxp.take().expect("kxp running");
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("kxp reaped");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.kxp_log())
    }

    /// The pid of `kxp run` (its `ip netns exec` wrapper execs it, so it is the child).
    pub fn kxp_pid(&self) -> Option<u32> {
        self.kxp.as_ref().map(Child::id)
    }

    /// XDP programs attached in the node namespace.
    pub fn xdp_programs(&self) -> usize {
        let out = self
            .cmd("node", "ip")
            .args(["link", "show"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("prog/xdp"))
            .count()
    }

    /// `GET url` from namespace `from`; up to `attempts` tries of 5 s each.
    pub fn http(&self, from: &str, url: &str, attempts: u32) -> Result<String, String> {
        let mut last = String::new();
        for _ in 0..attempts.max(1) {
            let out = self
                .cmd(from, "curl")
                .args(["-sS", "--max-time", "5", url])
                .output()
                .expect("curl runs");
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        Err(format!("GET {url} from {from}: {last}"))
    }

    /// SHA-256 of `GET url` from namespace `from`, and the byte count.
    pub fn http_sha256(&self, from: &str, url: &str) -> Result<(String, u64), String> {
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "set -o pipefail; ip netns exec {} curl -sS --max-time 60 {url} | \
                     tee >(wc -c >&2) | sha256sum",
                    self.ns(from)
                ),
            ])
            .output()
            .expect("bash runs");
        if !out.status.success() {
            return Err(format!(
                "GET {url} from {from}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let sha = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let bytes = String::from_utf8_lossy(&out.stderr)
            .trim()
            .parse()
            .unwrap_or(0);
        Ok((sha, bytes))
    }

    /// SHA-256 of the file the pods serve as /big.
    pub fn big_sha256(&self) -> String {
        let out = Command::new("sha256sum")
            .arg(self.dir.join("big.bin"))
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// One UDP datagram to `host:port` from namespace `from`; the answer; up to
    /// `attempts` tries of 2 s.
    pub fn udp(&self, from: &str, host: &str, port: u16, attempts: u32) -> Result<String, String> {
        let mut last = String::new();
        for _ in 0..attempts.max(1) {
            let out = self
                .cmd(from, "python3")
                .args([
                    &script("netcheck.py"),
                    "udp",
                    host,
                    &port.to_string(),
                    "ping",
                ])
                .output()
                .expect("python3 runs");
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        Err(last)
    }

    /// One ICMP echo to `host` from namespace `from`.
    pub fn ping(&self, from: &str, host: &str) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..3 {
            let out = self
                .cmd(from, "python3")
                .args([&script("netcheck.py"), "ping", host])
                .output()
                .expect("python3 runs");
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        Err(last)
    }

    /// Starts a server of the node's own (not a service) on 192.168.50.2:9000 (HTTP) and
    /// :9053 (UDP), answering "node".
    pub fn start_node_server(&self) {
        let log = self.dir.join("node-server.log");
        let out = sh(&format!(
            "ip netns exec {} python3 {} --name node --http-port 9000 --udp-port 9053 \
             >{log} 2>&1 & echo $! > {pid}; \
             for i in $(seq 1 100); do grep -q ready {log} && exit 0; sleep 0.05; done; exit 1",
            self.ns("node"),
            script("podserver.py"),
            log = log.display(),
            pid = self.dir.join("node-server.pid").display(),
        ));
        assert!(out.status.success(), "node server did not start");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.kxp.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        topo_down(&self.id, &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

impl Node {
    /// Creates pod `x` (`d`: 10.244.1.5, serving like the others) after the fact, its
    /// veth named `ifname` on the node side.
    pub fn add_pod(&self, x: &str, ifname: &str) {
        let out = sh(&format!(
            "source {} && kxp_pod_add {} {} {x} {ifname}",
            netns_sh().display(),
            self.id,
            self.dir.display()
        ));
        assert!(
            out.status.success(),
            "pod {x} not added: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes pod `x` and its veth `ifname`.
    pub fn del_pod(&self, x: &str, ifname: &str) {
        let out = sh(&format!(
            "source {} && kxp_pod_del {} {} {x} {ifname}",
            netns_sh().display(),
            self.id,
            self.dir.display()
        ));
        assert!(out.status.success(), "pod {x} not deleted");
    }

    /// `GET url` over `n` concurrent connections from namespace `from` (one curl,
    /// `--parallel`, each transfer bounded by 10 s). Returns the body of each transfer
    /// that answered 200 (the X-Pod header), and the failures.
    pub fn http_parallel(&self, from: &str, url: &str, n: usize) -> (Vec<String>, Vec<String>) {
        let mut c = self.cmd(from, "curl");
        c.args([
            "-sS",
            "--globoff",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "32",
            "--max-time",
            "10",
            "-w",
            "%{http_code} %header{x-pod}\\n",
        ]);
        for _ in 0..n {
            c.args(["-o", "/dev/null", url]);
        }
        let out = c.output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        // Bodies are discarded; the pod's name comes from its X-Pod header.
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match line.split_once(' ') {
                Some(("200", pod)) => ok.push(pod.trim().to_string()),
                _ => failed.push(line.trim().to_string()),
            }
        }
        if ok.len() + failed.len() < n {
            failed.push(format!(
                "{} transfers gave no answer: {}",
                n - ok.len() - failed.len(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        (ok, failed)
    }

    /// `n` UDP request/response exchanges with `host:port` from namespace `from`, each
    /// from a fresh socket (so a fresh source port), 16 at a time, each waiting up to 2 s
    /// and retried twice. Returns the answers.
    pub fn udp_many(
        &self,
        from: &str,
        host: &str,
        port: u16,
        n: usize,
    ) -> Result<Vec<String>, String> {
        let prog = format!(
            r#"
import socket, sys, concurrent.futures as cf
host, port, n = {host:?}, {port}, {n}
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def one(i):
    for _ in range(3):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(b"ping%d" % i, (host, port))
            return s.recvfrom(2048)[0].decode()
        except OSError:
            pass
        finally:
            s.close()
    return "TIMEOUT"
with cf.ThreadPoolExecutor(16) as ex:
    for r in ex.map(one, range(n)):
        print(r)
"#
        );
        let out = self
            .cmd(from, "python3")
            .args(["-c", &prog])
            .output()
            .expect("python3 runs");
        let answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !out.status.success() || answers.len() != n || answers.iter().any(|a| a == "TIMEOUT") {
            return Err(format!(
                "UDP {host}:{port} from {from}: {answers:?} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(answers)
    }
}

/// The `kxp` binary under test: cargo's, unless `KXP_BIN` names another (a copy taken
/// right after the build, when other checkouts share the target directory and may
/// replace cargo's between build and run).
pub fn kxp_bin() -> String {
    std::env::var("KXP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kxp").to_string())
}

/// Counter `name` (e.g. `driver.l4_checksums_recomputed`) from kxp's exit report; 0 if
/// not listed (the report lists non-zero counters only).
pub fn counter(log: &str, name: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(name)).then(|| it.next()?.parse().ok())?
        })
        .next_back()
        .unwrap_or(0)
}
