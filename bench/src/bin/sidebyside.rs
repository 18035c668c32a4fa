//! The side-by-side dataplane benchmark (issue 5): one topology in network namespaces,
//! one generator, and the node in four modes, measured in the same run.
//!
//! ```text
//!   kxpb-<pid>-<n>-gen            kxpb-<pid>-<n>-node                 kxpb-<pid>-<n>-sink
//!   g0 192.168.60.1 ---veth--- n0 192.168.60.2   n1 192.168.61.2 ---veth--- s0 192.168.61.1
//!   pktgen tx (core 0)           xdp_fwd | kxp run | iptables | nftables     pktgen rx
//!   sources: 10.246.0.0/15       routes: 10.244.0.0/15 (backends) via sink,
//!   (pods of another node),      10.246.0.0/15 and 172.16.0.0/12 via gen,
//!   172.16.0.0/12 (external)     permanent neighbours for both peers
//! ```
//!
//! Modes: `xdp_fwd` (the do-nothing AF_XDP forwarder: the ceiling), `kxp` (`kxp run`, worker
//! pinned to core 1), `iptables` (`iptables-legacy-restore` of kube-proxy's iptables-mode
//! rules, `kernel_rules::iptables_restore`, plus its `-I` jumps), `nftables` (`nft -f` of
//! `kernel_rules::nftables_full`). Kernel modes forward with `ip_forward=1`.
//!
//! Per number of services (`kernel_rules::synthetic_services(n, 3)`: TCP and UDP
//! alternating, 3 endpoints each, routed to the sink):
//! * **new flows**: every packet a new 5-tuple (UDP 64 B; `--tcp` adds TCP SYN) to the
//!   UDP (TCP) services' ClusterIPs, offered at the generator's maximum rate;
//! * **established**: a fixed set of flows, warmed first, at maximum rate;
//! * **CPU per frame**: busy jiffies of the whole system (`/proc/stat`) over the
//!   generator's window divided by the frames the sink received; the generator + sink
//!   floor (generator straight into the sink, no node) is measured too, for subtraction;
//! * **sync**: full apply (`nft -f`, `iptables-restore`; kxp: start to ready and its
//!   `kubeproxy_sync_proxy_rules_duration_seconds`), and one endpoint change end to end:
//!   from applying it (kernel: the command; kxp: the manifest rename) until the sink's
//!   kernel delivers the first datagram to the new endpoint.
//!
//! Then masquerade (external sources, 3 backends, one UDP ClusterIP) past the kernel's SNAT
//! port space, a memory run (1M flows through kxp: RSS and counters), and one table + JSON.
//!
//! Teardown: every topology is a guard (`Drop` stops its processes and deletes its
//! namespaces); a reaper process in its own session removes `kxpb-<pid>-*` if this process
//! dies any other way (signal, SIGKILL); namespaces of dead runs are removed at start.
//! Every wait is bounded.
//!
//! `sidebyside watch-udp --bind IP:PORT --timeout-ms MS` is the helper the endpoint-change
//! measurement runs in the sink: it prints the wall-clock time (ns since the Unix epoch)
//! at which the first datagram arrived.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kxp_bench::kernel_rules::{
    chain_id, iptables_restore, nftables_endpoint_change, nftables_full, synthetic_services,
    KernelRulesConfig, KernelService, IPTABLES_JUMPS,
};
use serde_json::{json, Value};

const GEN_MAC: &str = "02:00:00:00:0a:01";
const NODE_IN_MAC: &str = "02:00:00:00:0a:02";
const NODE_OUT_MAC: &str = "02:00:00:00:0b:02";
const SINK_MAC: &str = "02:00:00:00:0b:01";
const GEN_IP: &str = "192.168.60.1";
const NODE_IN_IP: &str = "192.168.60.2";
const NODE_OUT_IP: &str = "192.168.61.2";
const SINK_IP: &str = "192.168.61.1";
const CLUSTER_CIDR: &str = "10.244.0.0/14";
const BACKEND_NET: &str = "10.244.0.0/15";
/// Sources of the in-cluster generator ("pods of another node": no masquerade), split
/// into /19 blocks so that every phase of a topology uses flows never seen before.
const POD_SRC_BASE: [u8; 4] = [10, 246, 0, 0];
const POD_SRC_BLOCKS: u32 = 16;
const EXTERNAL_SRC_NET: &str = "172.16.0.0/12";
const ENDPOINTS_PER_SERVICE: usize = 3;
const METRICS_ADDR: &str = "127.0.0.1:10249";
/// The endpoint-change measurement's new endpoint (outside the synthetic backends).
const NEW_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 245, 255, 9);
/// kube-proxy's SNAT space per backend with `--random-fully` (1024-65535).
const SNAT_PORTS_PER_BACKEND: u64 = 64_512;

// ---------------------------------------------------------------------------------------
// Options.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    XdpFwd,
    Kxp,
    Iptables,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::XdpFwd => "xdp_fwd",
            Mode::Kxp => "kxp",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "xdp_fwd" => Mode::XdpFwd,
            "kxp" => Mode::Kxp,
            "iptables" => Mode::Iptables,
            "nftables" => Mode::Nftables,
            _ => {
                return Err(format!(
                    "unknown mode {s:?} (xdp_fwd, kxp, iptables, nftables)"
                ))
            }
        })
    }
    fn is_kernel(self) -> bool {
        matches!(self, Mode::Iptables | Mode::Nftables)
    }
}

#[derive(Debug, Clone)]
struct Opts {
    services: Vec<usize>,
    modes: Vec<Mode>,
    duration_s: f64,
    reps: usize,
    tcp: bool,
    est_flows: u64,
    change: bool,
    masq: bool,
    masq_rate: u64,
    masq_duration_s: f64,
    memory: bool,
    memory_flows: u64,
    workers: Vec<u32>,
    sink_core: Option<usize>,
    /// Record a `perf` CPU profile of both cores over every traffic window, here.
    perf_dir: Option<PathBuf>,
    bin_dir: PathBuf,
    json_out: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    command_line: String,
}

const USAGE: &str = "\
sidebyside [options]                      the side-by-side dataplane benchmark (root)
  --quick                 10 services, 1 s, 1 repetition, no sync/masquerade/memory runs
  --services 10,1000,10000
  --modes xdp_fwd,kxp,iptables,nftables
  --duration SECS         per measurement (default 5)
  --reps N                repetitions of every rate measurement (default 3)
  --tcp                   also TCP SYN new flows
  --est-flows N           flows of the established measurement (default 1024)
  --no-change | --no-masq | --no-memory
  --masq-rate PPS --masq-duration SECS   (default 100000, 8)
  --memory-flows N        (default 1000000)
  --workers 1[,2]         kxp workers (default 1,2; 2: veths with 2 queues, --queues 0,1,
                          cores 1,0, at the first size only)
  --sink-core N           pin the sink's pktgen rx (default: not pinned)
  --perf DIR              record `perf record -a -g` over every traffic window into
                          DIR/<mode>-<services>-w<workers>-<label>.data (needs perf)
  --bin-dir DIR           where kxp, pktgen, xdp_fwd are (default target/release)
  --json FILE             write the results here
  --work-dir DIR          scratch files (default a new dir under /tmp)
sidebyside watch-udp --bind IP:PORT --timeout-ms MS   (helper, see the module doc)";

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        services: vec![10, 1000, 10_000],
        modes: vec![Mode::XdpFwd, Mode::Kxp, Mode::Iptables, Mode::Nftables],
        duration_s: 5.0,
        reps: 3,
        tcp: false,
        est_flows: 1024,
        change: true,
        masq: true,
        masq_rate: 100_000,
        masq_duration_s: 8.0,
        memory: true,
        memory_flows: 1_000_000,
        workers: vec![1, 2],
        sink_core: None,
        perf_dir: None,
        bin_dir: PathBuf::from("target/release"),
        json_out: None,
        work_dir: None,
        command_line: args.join(" "),
    };
    let mut i = 0;
    let value = |i: &mut usize| -> Result<String, String> {
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| format!("{} needs a value", args[*i - 1]))
    };
    let num = |s: String| -> Result<f64, String> {
        s.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("{s:?} is not a positive number"))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => {
                o.services = vec![10];
                o.workers = vec![1];
                o.duration_s = 1.0;
                o.reps = 1;
                o.change = false;
                o.masq = false;
                o.memory = false;
            }
            "--services" => {
                o.services = value(&mut i)?
                    .split(',')
                    .map(|s| {
                        s.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=40_000).contains(n))
                            .ok_or_else(|| format!("--services: {s:?} is not in 1..=40000"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--modes" => {
                o.modes = value(&mut i)?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_, _>>()?
            }
            "--duration" => o.duration_s = num(value(&mut i)?)?.min(600.0),
            "--reps" => o.reps = (num(value(&mut i)?)? as usize).clamp(1, 20),
            "--tcp" => o.tcp = true,
            "--est-flows" => o.est_flows = (num(value(&mut i)?)? as u64).clamp(1, 1 << 20),
            "--no-change" => o.change = false,
            "--no-masq" => o.masq = false,
            "--no-memory" => o.memory = false,
            "--masq-rate" => o.masq_rate = (num(value(&mut i)?)? as u64).clamp(1000, 10_000_000),
            "--masq-duration" => o.masq_duration_s = num(value(&mut i)?)?.min(120.0),
            "--memory-flows" => {
                o.memory_flows = (num(value(&mut i)?)? as u64).clamp(1000, 4_000_000)
            }
            "--workers" => {
                o.workers = value(&mut i)?
                    .split(',')
                    .map(|s| {
                        s.parse::<u32>()
                            .ok()
                            .filter(|n| (1..=2).contains(n))
                            .ok_or_else(|| format!("--workers: {s:?} is not 1 or 2"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--sink-core" => o.sink_core = Some(num(value(&mut i)?)? as usize),
            "--perf" => o.perf_dir = Some(PathBuf::from(value(&mut i)?)),
            "--bin-dir" => o.bin_dir = PathBuf::from(value(&mut i)?),
            "--json" => o.json_out = Some(PathBuf::from(value(&mut i)?)),
            "--work-dir" => o.work_dir = Some(PathBuf::from(value(&mut i)?)),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
        i += 1;
    }
    o.modes.sort();
    o.modes.dedup();
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Commands and processes.

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

fn sh_in(ns: &str, script: &str) -> Result<String, String> {
    run(&mut in_ns(ns, &["sh", "-c", script]))
}

/// Runs `script` in `ns` and returns its wall time in seconds (spawn included, as a
/// kube-proxy pays it).
fn timed_sh_in(ns: &str, script: &str) -> Result<f64, String> {
    let t = Instant::now();
    sh_in(ns, script)?;
    Ok(t.elapsed().as_secs_f64())
}

/// A child process with its output in a log file.
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self, String> {
        let f = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Self {
            child,
            name: name.to_string(),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits at most `timeout`; kills it past that.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "{} did not finish within {timeout:?}; killed (log {})",
                    self.name,
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM, up to `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        if !self.alive() {
            return;
        }
        self.signal("-TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------------------
// The topology.

/// Namespaces of this run: `kxpb-<pid>-<seq>-{gen,node,sink}`.
struct Topo {
    gen: String,
    node: String,
    sink: Option<String>,
    dir: PathBuf,
    /// Node processes (kxp, xdp_fwd), stopped before the namespaces go.
    procs: Vec<Proc>,
    next_block: u32,
}

fn ns_prefix() -> String {
    format!("kxpb-{}", std::process::id())
}

impl Topo {
    /// gen -- node -- sink, veths with `queues` queues each. `with_node` false: gen -- sink
    /// directly (the generator + sink floor), the "node" namespace is the sink.
    fn up(seq: u32, dir: &Path, queues: u32, with_node: bool) -> Result<Self, String> {
        let p = format!("{}-{seq}", ns_prefix());
        let gen = format!("{p}-gen");
        let node = format!("{p}-node");
        let sink = format!("{p}-sink");
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let t = Topo {
            gen: gen.clone(),
            node: node.clone(),
            sink: with_node.then(|| sink.clone()),
            dir: dir.to_path_buf(),
            procs: Vec::new(),
            next_block: 0,
        };
        let q = queues.to_string();
        ip(&["netns", "add", &gen])?;
        ip(&["netns", "add", &node])?;
        for ns in [&gen, &node] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // For the floor, "node" plays the sink: s0 with the sink's addresses.
        let (n_in, n_in_mac, n_in_ip) = if with_node {
            ("n0", NODE_IN_MAC, NODE_IN_IP)
        } else {
            ("s0", SINK_MAC, SINK_IP)
        };
        ip(&[
            "-n",
            &node,
            "link",
            "add",
            n_in,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "address",
            n_in_mac,
            "type",
            "veth",
            "peer",
            "name",
            "g0",
            "netns",
            &gen,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "address",
            GEN_MAC,
        ])?;
        ip(&[
            "-n",
            &gen,
            "addr",
            "add",
            &format!("{GEN_IP}/24"),
            "dev",
            "g0",
        ])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{n_in_ip}/24"),
            "dev",
            n_in,
        ])?;
        ip(&["-n", &gen, "link", "set", "g0", "up"])?;
        ip(&["-n", &node, "link", "set", n_in, "up"])?;
        if with_node {
            ip(&["netns", "add", &sink])?;
            ip(&["-n", &sink, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &node,
                "link",
                "add",
                "n1",
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "address",
                NODE_OUT_MAC,
                "type",
                "veth",
                "peer",
                "name",
                "s0",
                "netns",
                &sink,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "address",
                SINK_MAC,
            ])?;
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{NODE_OUT_IP}/24"),
                "dev",
                "n1",
            ])?;
            ip(&[
                "-n",
                &sink,
                "addr",
                "add",
                &format!("{SINK_IP}/24"),
                "dev",
                "s0",
            ])?;
            ip(&["-n", &node, "link", "set", "n1", "up"])?;
            ip(&["-n", &sink, "link", "set", "s0", "up"])?;
            sh_in(
                &node,
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
                 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.n0.rp_filter=0 \
                 net.ipv4.conf.n1.rp_filter=0",
            )?;
            sh_in(
                &sink,
                "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
                 net.ipv4.conf.s0.rp_filter=0",
            )?;
            // The static neighbours kxp's node file names too.
            ip(&[
                "-n",
                &node,
                "neigh",
                "replace",
                GEN_IP,
                "lladdr",
                GEN_MAC,
                "dev",
                "n0",
                "nud",
                "permanent",
            ])?;
            ip(&[
                "-n",
                &node,
                "neigh",
                "replace",
                SINK_IP,
                "lladdr",
                SINK_MAC,
                "dev",
                "n1",
                "nud",
                "permanent",
            ])?;
            ip(&["-n", &node, "route", "add", BACKEND_NET, "via", SINK_IP])?;
            ip(&["-n", &node, "route", "add", "10.246.0.0/15", "via", GEN_IP])?;
            ip(&["-n", &node, "route", "add", EXTERNAL_SRC_NET, "via", GEN_IP])?;
            ip(&["-n", &sink, "route", "add", "default", "via", NODE_OUT_IP])?;
        }
        Ok(t)
    }

    /// The namespace the sink counter runs in.
    fn sink_ns(&self) -> &str {
        self.sink.as_deref().unwrap_or(&self.node)
    }

    /// A /19 of in-cluster sources no phase of this topology used yet.
    fn fresh_pod_block(&mut self) -> String {
        let b = self.next_block % POD_SRC_BLOCKS;
        self.next_block += 1;
        let base = u32::from(Ipv4Addr::from(POD_SRC_BASE)) + (b << 13);
        format!("{}/19", Ipv4Addr::from(base))
    }

    fn down(&mut self) {
        for p in self.procs.iter_mut().rev() {
            p.stop(Duration::from_secs(20));
        }
        self.procs.clear();
        let namespaces: Vec<String> = [
            Some(self.gen.clone()),
            Some(self.node.clone()),
            self.sink.clone(),
        ]
        .into_iter()
        .flatten()
        .filter(|n| !n.is_empty())
        .collect();
        for ns in namespaces {
            remove_ns(&ns);
        }
        self.gen.clear();
        self.node.clear();
        self.sink = None;
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.down();
    }
}

fn remove_ns(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Namespaces left by runs whose process is gone.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("kxpb-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing namespace {name} of a run that is gone (pid {pid})");
            remove_ns(name);
        }
    }
}

/// A process in its own session that removes this run's namespaces once this process is
/// gone, however it ended (Ctrl-C to the process group does not reach it).
fn spawn_reaper() -> Result<(), String> {
    let pid = std::process::id();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         for ns in $(ip netns list | awk '{{print $1}}' | grep '^kxpb-{pid}-'); do \
           ip netns pids $ns | xargs -r kill -9; ip netns del $ns; done"
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("setsid: {e}"))
}

// ---------------------------------------------------------------------------------------
// CPU accounting.

#[derive(Debug, Clone, Copy, Default)]
struct CpuSnap {
    /// user + nice + system + irq + softirq, in ticks, summed over CPUs.
    busy: u64,
    /// busy + idle + iowait + steal.
    total: u64,
    /// irq + softirq (the kernel's packet work not charged to a process).
    irq: u64,
}

fn cpu_snap() -> CpuSnap {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return CpuSnap::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = g(0) + g(1) + g(2) + g(5) + g(6);
    CpuSnap {
        busy,
        total: busy + g(3) + g(4) + g(7),
        irq: g(5) + g(6),
    }
}

fn clk_tck() -> u64 {
    run(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of a process, in ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks of this process's children that have been waited for (cutime + cstime).
fn children_ticks() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some(i) = s.rfind(')') else { return 0 };
    let f: Vec<&str> = s[i + 2..].split_whitespace().collect();
    let g = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    g(13) + g(14)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// Services, rules, manifests.

fn rules_cfg() -> KernelRulesConfig {
    KernelRulesConfig {
        cluster_cidr: CLUSTER_CIDR.into(),
        node_ips: vec![
            NODE_OUT_IP.parse().expect("ip"),
            NODE_IN_IP.parse().expect("ip"),
        ],
    }
}

fn port_id(s: &KernelService) -> String {
    format!("{}/{}:{}", s.namespace, s.name, s.port_name)
}

/// kube-proxy's partial iptables sync for one changed service: the top-level chains
/// rewritten in full, the changed service's chains, the removed endpoint chain deleted.
fn iptables_change(
    after_all: &[KernelService],
    before: &KernelService,
    after: &KernelService,
) -> String {
    let full = iptables_restore(after_all, &rules_cfg());
    let id = port_id(after);
    let svc = format!("KUBE-SVC-{}", chain_id(&id));
    let ext = format!("KUBE-EXT-{}", chain_id(&id));
    let sep =
        |ep: &(Ipv4Addr, u16)| format!("KUBE-SEP-{}", chain_id(&format!("{id}{}:{}", ep.0, ep.1)));
    let mut keep: Vec<String> = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keep.push(svc);
    keep.push(ext);
    keep.extend(after.endpoints.iter().map(sep));
    let mut out = String::from("*nat\n");
    for line in full.lines() {
        let chain = if let Some(r) = line.strip_prefix(':') {
            r.split_whitespace().next()
        } else if let Some(r) = line.strip_prefix("-A ") {
            r.split_whitespace().next()
        } else {
            None
        };
        if chain.is_some_and(|c| keep.iter().any(|k| k == c)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    // A removed chain is declared (which flushes it) and then deleted, as kube-proxy does.
    let gone: Vec<String> = before
        .endpoints
        .iter()
        .filter(|ep| !after.endpoints.contains(ep))
        .map(sep)
        .collect();
    let mut out = out.replacen(
        "*nat\n",
        &format!(
            "*nat\n{}",
            gone.iter()
                .map(|c| format!(":{c} - [0:0]\n"))
                .collect::<String>()
        ),
        1,
    );
    for c in &gone {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}

fn manifest_yaml(s: &KernelService) -> String {
    let proto = if s.proto == "udp" { "UDP" } else { "TCP" };
    let mut y = String::with_capacity(700);
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {ns}}}\nspec:\n  type: {ty}\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ipFamilies: [IPv4]\n  ports:\n    - {{name: {pn}, protocol: {proto}, port: {port}, targetPort: {tp}{np}}}\n",
        n = s.name,
        ns = s.namespace,
        ty = if s.node_port.is_some() { "NodePort" } else { "ClusterIP" },
        ip = s.cluster_ip,
        pn = s.port_name,
        port = s.port,
        tp = s.endpoints.first().map_or(8080, |e| e.1),
        np = s.node_port.map(|p| format!(", nodePort: {p}")).unwrap_or_default(),
    );
    let _ = write!(
        y,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-abcde\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {n}}}\naddressType: IPv4\nports:\n  - {{name: {pn}, protocol: {proto}, port: {tp}}}\nendpoints:\n",
        n = s.name,
        ns = s.namespace,
        pn = s.port_name,
        tp = s.endpoints.first().map_or(8080, |e| e.1),
    );
    if s.endpoints.is_empty() {
        y.push_str("  []\n");
    }
    for ep in &s.endpoints {
        let _ = writeln!(
            y,
            "  - {{addresses: [\"{}\"], conditions: {{ready: true, serving: true, terminating: false}}, nodeName: node-remote}}",
            ep.0
        );
    }
    y
}

fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn node_yaml() -> String {
    format!(
        "# Written by sidebyside: the node namespace of the dataplane benchmark.\n\
         name: kxpb-node\n\
         addresses: [{NODE_OUT_IP}, {NODE_IN_IP}]\n\
         clusterCIDRs: [{CLUSTER_CIDR}]\n\
         serviceCIDRs: [10.96.0.0/16]\n\
         interfaces:\n\
         \x20 - {{name: n0, kind: uplink, mac: \"{NODE_IN_MAC}\"}}\n\
         \x20 - {{name: n1, kind: uplink, mac: \"{NODE_OUT_MAC}\"}}\n\
         neighbours:\n\
         \x20 - {{ip: {GEN_IP}, mac: \"{GEN_MAC}\", interface: n0}}\n\
         \x20 - {{ip: {SINK_IP}, mac: \"{SINK_MAC}\", interface: n1}}\n\
         routes:\n\
         \x20 - {{dst: {BACKEND_NET}, via: {SINK_IP}}}\n\
         \x20 - {{dst: 10.246.0.0/15, via: {GEN_IP}}}\n\
         \x20 - {{dst: 0.0.0.0/0, via: {GEN_IP}}}\n"
    )
}

/// One size's inputs, written once into `dir`.
struct Inputs {
    services: Vec<KernelService>,
    dir: PathBuf,
    /// The service whose endpoints change (a UDP one), and its state after.
    change_index: usize,
    after: KernelService,
}

impl Inputs {
    fn write(n: usize, dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir.join("manifests")).map_err(|e| e.to_string())?;
        let services = synthetic_services(n, ENDPOINTS_PER_SERVICE);
        let cfg = rules_cfg();
        // Service 1 is UDP (odd indexes are); with one service there is none.
        let change_index = services.iter().position(|s| s.proto == "udp").unwrap_or(0);
        let before = services[change_index].clone();
        let mut after = before.clone();
        if let Some(last) = after.endpoints.last_mut() {
            *last = (NEW_ENDPOINT, last.1);
        }
        let mut after_all = services.clone();
        after_all[change_index] = after.clone();
        let w = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))
        };
        w("full.nft", nftables_full(&services, &cfg))?;
        w("full.ipt", iptables_restore(&services, &cfg))?;
        w(
            "change.nft",
            nftables_endpoint_change(&before, &after, &cfg),
        )?;
        w("change.ipt", iptables_change(&after_all, &before, &after))?;
        let dsts = |proto: &str| -> String {
            services
                .iter()
                .filter(|s| s.proto == proto)
                .map(|s| format!("{}:{}", s.cluster_ip, s.port))
                .collect::<Vec<_>>()
                .join("\n")
        };
        w("dst-udp.txt", dsts("udp") + "\n")?;
        w("dst-tcp.txt", dsts("tcp") + "\n")?;
        w("node.yaml", node_yaml())?;
        let mut all = String::with_capacity(n * 900);
        for (i, s) in services.iter().enumerate() {
            if i != change_index {
                all.push_str(&manifest_yaml(s));
            }
        }
        w("manifests/services.yaml", all)?;
        w("manifests/changed.yaml", manifest_yaml(&before))?;
        Ok(Self {
            services,
            dir: dir.to_path_buf(),
            change_index,
            after,
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn changed(&self) -> &KernelService {
        &self.services[self.change_index]
    }

    /// Restores the manifests to the "before" state (a kxp run starts from it).
    fn reset_manifests(&self) -> Result<(), String> {
        write_atomic(
            &self.dir.join("manifests/changed.yaml"),
            &manifest_yaml(self.changed()),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Binaries and the node's modes.

struct Bins {
    kxp: PathBuf,
    pktgen: PathBuf,
    xdp_fwd: PathBuf,
    me: PathBuf,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Parses `name{labels} value` lines of a Prometheus text page into (name{labels}, value).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn kxp_metrics(topo: &Topo) -> BTreeMap<String, f64> {
    run(&mut in_ns(
        &topo.node,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{METRICS_ADDR}/metrics"),
        ],
    ))
    .map(|t| parse_metrics(&t))
    .unwrap_or_default()
}

/// The value of label `name` in a Prometheus label set (`a="x",b="y"}`).
fn label(labels: &str, name: &str) -> String {
    labels
        .split(',')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
        .map(|x| x.trim_end_matches(['}', '"']).to_string())
        .unwrap_or_default()
}

/// kxp's counters summed over workers: the pipeline's "verdict/reason" -> frames and
/// "worker<i>/frames", and the AF_XDP driver's "driver/<counter>" (frames received and
/// sent, TX ring full, kicks, the kernel's RX ring full / fill ring empty, ...), so that
/// every frame the generator offered and the sink did not see is attributed.
fn kxp_frame_counters(m: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, v) in m {
        if let Some(labels) = k.strip_prefix("kxp_afxdp_driver_total{") {
            *out.entry(format!("driver/{}", label(labels, "counter")))
                .or_insert(0.0) += v;
            continue;
        }
        let Some(labels) = k.strip_prefix("kxp_dataplane_frames_total{") else {
            continue;
        };
        *out.entry(format!(
            "{}/{}",
            label(labels, "verdict"),
            label(labels, "reason")
        ))
        .or_insert(0.0) += v;
        *out.entry(format!("worker{}/frames", label(labels, "worker")))
            .or_insert(0.0) += v;
    }
    out
}

fn counter_delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in b {
        let d = v - a.get(k).copied().unwrap_or(0.0);
        if d != 0.0 {
            m.insert(k.clone(), json!(d));
        }
    }
    Value::Object(m)
}

struct KxpOpts {
    workers: u32,
    snat_ports: Option<&'static str>,
    conntrack_capacity: Option<u64>,
}

/// Brings the node up in `mode`; returns what the setup measured (sync times).
fn start_mode(
    topo: &mut Topo,
    mode: Mode,
    inp: &Inputs,
    bins: &Bins,
    kx: &KxpOpts,
) -> Result<Value, String> {
    match mode {
        Mode::XdpFwd => {
            let ready = topo.dir.join("xdp_fwd.ready");
            let _ = std::fs::remove_file(&ready);
            let mut c = in_ns(&topo.node, &[]);
            c.arg(&bins.xdp_fwd).args([
                "--in",
                "n0",
                "--out",
                "n1",
                "--out-dst-mac",
                SINK_MAC,
                "--out-src-mac",
                NODE_OUT_MAC,
                "--core",
                "1",
                "--quiet",
                "--ready-file",
                &s(&ready),
                "--json",
                &s(&topo.dir.join("xdp_fwd.json")),
            ]);
            let p = Proc::spawn("xdp_fwd", c, topo.dir.join("xdp_fwd.log"))?;
            topo.procs.push(p);
            let p = topo.procs.last_mut().expect("pushed");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !ready.exists() {
                if !p.alive() || Instant::now() > deadline {
                    return Err(format!("xdp_fwd did not start: {}", p.log_text()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(json!({}))
        }
        Mode::Kxp => {
            inp.reset_manifests()?;
            let ready = topo.dir.join("kxp.ready");
            let _ = std::fs::remove_file(&ready);
            let mut c = in_ns(&topo.node, &[]);
            c.arg(&bins.kxp)
                .args([
                    "run",
                    "--node",
                    &inp.path("node.yaml"),
                    "--manifests",
                    &inp.path("manifests"),
                ])
                .args(["--ready-file", &s(&ready), "--metrics-addr", METRICS_ADDR])
                .args(["--l4-checksum", "never"]);
            if kx.workers == 2 {
                c.args(["--queues", "0,1", "--cores", "1,0"]);
            } else {
                c.args(["--cores", "1"]);
            }
            if let Some(r) = kx.snat_ports {
                c.args(["--snat-ports", r]);
            }
            if let Some(n) = kx.conntrack_capacity {
                c.args(["--conntrack-capacity", &n.to_string()]);
            }
            let t = Instant::now();
            let p = Proc::spawn("kxp run", c, topo.dir.join("kxp.log"))?;
            topo.procs.push(p);
            let p = topo.procs.last_mut().expect("pushed");
            let deadline = Instant::now() + Duration::from_secs(180);
            while !ready.exists() {
                if !p.alive() {
                    return Err(format!("kxp run exited:\n{}", p.log_text()));
                }
                if Instant::now() > deadline {
                    return Err(format!("kxp run not ready in 180 s:\n{}", p.log_text()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let start_to_ready = t.elapsed().as_secs_f64();
            let pid = p.pid();
            // Ready means steering is up; the services may still be compiling (kxp starts
            // with an empty table after 10 s). Wait, bounded, until every service port
            // is published.
            let want = inp.services.len() as f64;
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut m = kxp_metrics(topo);
            while m.get("kxp_service_ports").copied().unwrap_or(0.0) < want {
                if Instant::now() > deadline {
                    return Err(format!(
                        "kxp did not publish {want} service ports within 300 s"
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
                m = kxp_metrics(topo);
            }
            let start_to_synced = t.elapsed().as_secs_f64();
            let sum = m
                .get("kubeproxy_sync_proxy_rules_duration_seconds_sum")
                .copied();
            let cnt = m
                .get("kubeproxy_sync_proxy_rules_duration_seconds_count")
                .copied();
            Ok(json!({
                "start_to_ready_s": start_to_ready,
                "start_to_all_services_s": start_to_synced,
                "first_sync_s": match (sum, cnt) { (Some(s), Some(c)) if c > 0.0 => json!(s / c), _ => Value::Null },
                "syncs": cnt,
                "rss_kb": proc_status_kb(pid, "VmRSS:"),
            }))
        }
        Mode::Nftables => {
            let t = timed_sh_in(&topo.node, &format!("nft -f {}", inp.path("full.nft")))?;
            Ok(json!({ "full_sync_s": t, "tool": "nft -f (nftables)" }))
        }
        Mode::Iptables => {
            let t = timed_sh_in(
                &topo.node,
                &format!(
                    "iptables-legacy-restore --noflush --counters < {}",
                    inp.path("full.ipt")
                ),
            )?;
            for j in IPTABLES_JUMPS {
                sh_in(&topo.node, &format!("iptables-legacy {j}"))?;
            }
            Ok(json!({ "full_sync_s": t, "tool": "iptables-legacy-restore --noflush --counters" }))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Traffic.

#[derive(Debug, Clone)]
struct Traffic {
    proto: &'static str,
    new_flows: bool,
    flows: u64,
    src_net: String,
    dst: String,
    rate: Option<u64>,
    duration_s: f64,
    count: Option<u64>,
    /// Run the sink counter.
    rx: bool,
    /// Sample /proc/stat this often during the window (masquerade timeline).
    sample_every: Option<Duration>,
}

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn num_at(v: &Value, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_f64))
}

/// One generator run (with the sink counting): offered and received rates, CPU.
fn run_traffic(
    topo: &mut Topo,
    label: &str,
    t: &Traffic,
    bins: &Bins,
    opts: &Opts,
    node_pid: Option<u32>,
) -> Result<Value, String> {
    let dir = topo.dir.clone();
    let tx_json = dir.join(format!("{label}-tx.json"));
    let rx_json = dir.join(format!("{label}-rx.json"));
    let _ = std::fs::remove_file(&tx_json);
    let _ = std::fs::remove_file(&rx_json);
    let mut rx = None;
    let rx_ready = dir.join(format!("{label}-rx.ready"));
    let _ = std::fs::remove_file(&rx_ready);
    if t.rx {
        let mut c = in_ns(topo.sink_ns(), &[]);
        c.arg(&bins.pktgen).arg("rx");
        match t.count {
            // A run bounded by a count: stop 2 s after the last frame (or 40 s of none).
            Some(_) => c.args(["--until-idle", "2", "--max-wait", "40"]),
            None => c.args(["--duration", &format!("{}", t.duration_s + 1.5)]),
        };
        c.args([
            "--iface",
            "s0",
            "--json",
            &s(&rx_json),
            "--expect-dst-net",
            BACKEND_NET,
            "--top",
            "64",
            "--quiet",
            "--ready-file",
            &s(&rx_ready),
        ]);
        if let Some(core) = opts.sink_core {
            c.args(["--core", &core.to_string()]);
        }
        let mut p = Proc::spawn("pktgen rx", c, dir.join(format!("{label}-rx.log")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !rx_ready.exists() {
            if !p.alive() || Instant::now() > deadline {
                return Err(format!("pktgen rx did not start: {}", p.log_text()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        rx = Some(p);
    }
    let mut c = in_ns(&topo.gen, &[]);
    c.arg(&bins.pktgen).args([
        "tx",
        "--iface",
        "g0",
        "--core",
        "0",
        "--src-mac",
        GEN_MAC,
        "--dst-mac",
        if topo.sink.is_some() {
            NODE_IN_MAC
        } else {
            SINK_MAC
        },
        "--src-net",
        &t.src_net,
        "--dst",
        &t.dst,
        "--proto",
        t.proto,
        "--flows",
        &t.flows.to_string(),
        "--size",
        "64",
        "--json",
        &s(&tx_json),
        "--quiet",
    ]);
    if t.new_flows {
        c.arg("--new-flows");
    }
    c.args([
        "--rate",
        &t.rate.map_or("max".to_string(), |r| r.to_string()),
    ]);
    match t.count {
        Some(n) => c.args(["--count", &n.to_string()]),
        None => c.args(["--duration", &format!("{}", t.duration_s)]),
    };
    // The profile covers the generator's window (a count-bounded run: its first 20 s).
    let mut perf = match &opts.perf_dir {
        Some(pd) => {
            std::fs::create_dir_all(pd).map_err(|e| format!("{}: {e}", pd.display()))?;
            let topo_name = dir.file_name().map_or(String::new(), |n| s(Path::new(n)));
            let out = pd.join(format!("{topo_name}-{label}.data"));
            let secs = t.count.map_or(t.duration_s, |_| 20.0);
            let mut c = Command::new("perf");
            c.args([
                "record",
                "-a",
                "-g",
                "-e",
                "cpu-clock",
                "-o",
                &s(&out),
                "--",
            ])
            .arg("sleep")
            .arg(format!("{secs}"));
            Some(Proc::spawn(
                "perf record",
                c,
                dir.join(format!("{label}-perf.log")),
            )?)
        }
        None => None,
    };
    let node0 = node_pid.and_then(proc_cpu_ticks);
    let kids0 = children_ticks();
    let cpu0 = cpu_snap();
    let started = Instant::now();
    let mut tx = Proc::spawn("pktgen tx", c, dir.join(format!("{label}-tx.log")))?;
    let limit = Duration::from_secs_f64(if t.count.is_some() {
        90.0
    } else {
        t.duration_s + 30.0
    });
    let mut timeline = Vec::new();
    let status = match t.sample_every {
        None => tx.wait(limit)?,
        Some(every) => {
            let mut last = (Instant::now(), cpu0, 0u64, node0.unwrap_or(0));
            loop {
                if let Some(st) = tx.child.try_wait().map_err(|e| e.to_string())? {
                    break st;
                }
                if started.elapsed() > limit {
                    tx.kill();
                    return Err("pktgen tx overran its window".into());
                }
                std::thread::sleep(Duration::from_millis(10));
                if last.0.elapsed() >= every {
                    let now = (
                        Instant::now(),
                        cpu_snap(),
                        proc_cpu_ticks(tx.pid()).unwrap_or(0),
                        node_pid.and_then(proc_cpu_ticks).unwrap_or(0),
                    );
                    timeline.push(json!({
                        "t_s": started.elapsed().as_secs_f64(),
                        "busy_ticks": now.1.busy - last.1.busy,
                        "total_ticks": now.1.total - last.1.total,
                        "attributed_ticks": (now.1.irq - last.1.irq) + now.2.saturating_sub(last.2) + now.3.saturating_sub(last.3),
                        "interval_s": now.0.duration_since(last.0).as_secs_f64(),
                    }));
                    last = now;
                }
            }
        }
    };
    let window = started.elapsed().as_secs_f64();
    let cpu1 = cpu_snap();
    let kids1 = children_ticks();
    let node1 = node_pid.and_then(proc_cpu_ticks);
    if let Some(p) = perf.as_mut() {
        let st = p.wait(Duration::from_secs(60))?;
        if !st.success() {
            return Err(format!("perf record failed ({st}): {}", p.log_text()));
        }
    }
    if !status.success() {
        return Err(format!("pktgen tx failed ({status}): {}", tx.log_text()));
    }
    let mut rx_v = Value::Null;
    if let Some(mut p) = rx.take() {
        let st = p.wait(Duration::from_secs_f64(t.duration_s + 60.0))?;
        if !st.success() {
            return Err(format!("pktgen rx failed ({st}): {}", p.log_text()));
        }
        rx_v = read_json(&rx_json);
    }
    let tx_v = read_json(&tx_json);
    let tick_ns = 1e9 / clk_tck() as f64;
    let tx_frames = num_at(&tx_v, &["frames"]).unwrap_or(0.0);
    let tx_secs = num_at(&tx_v, &["duration_secs"]).unwrap_or(window);
    let rx_frames = num_at(&rx_v, &["frames"]).unwrap_or(0.0);
    let busy_ns = (cpu1.busy - cpu0.busy) as f64 * tick_ns;
    // What this benchmark's own work cost: the generator (a waited-for child), the node's
    // process, and every CPU's irq + softirq time (the kernel's packet path, including
    // the sink's XDP counter). Other processes on a shared machine are left out.
    let node_ticks = match (node0, node1) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let attributed_ns = ((kids1 - kids0) + node_ticks + (cpu1.irq - cpu0.irq)) as f64 * tick_ns;
    let total_ns = (cpu1.total - cpu0.total) as f64 * tick_ns;
    let offered = tx_frames / tx_secs.max(1e-9);
    let received = rx_frames / tx_secs.max(1e-9);
    Ok(json!({
        "label": label,
        "proto": t.proto,
        "new_flows": t.new_flows,
        "flows": t.flows,
        "src_net": t.src_net,
        "window_s": window,
        "tx_frames": tx_frames,
        "tx_s": tx_secs,
        "offered_pps": offered,
        "rx_frames": rx_frames,
        "received_pps": received,
        "loss_pps": offered - received,
        "cpu_busy_s": busy_ns / 1e9,
        "cpu_util": if total_ns > 0.0 { busy_ns / total_ns } else { 0.0 },
        "cpu_ns_per_rx_frame": if rx_frames > 0.0 { Some(busy_ns / rx_frames) } else { None },
        "cpu_ns_per_tx_frame": if tx_frames > 0.0 { Some(busy_ns / tx_frames) } else { None },
        "cpu_attributed_s": attributed_ns / 1e9,
        "cpu_attributed_ns_per_rx_frame": if rx_frames > 0.0 { Some(attributed_ns / rx_frames) } else { None },
        "cpu_attributed_ns_per_tx_frame": if tx_frames > 0.0 { Some(attributed_ns / tx_frames) } else { None },
        "generator_cpu_s": (kids1 - kids0) as f64 * tick_ns / 1e9,
        "irq_softirq_cpu_s": (cpu1.irq - cpu0.irq) as f64 * tick_ns / 1e9,
        "node_process_cpu_s": match (node0, node1) { (Some(a), Some(b)) => json!((b - a) as f64 * tick_ns / 1e9), _ => Value::Null },
        "timeline": timeline,
        "tx": tx_v,
        "rx": rx_v,
    }))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

// ---------------------------------------------------------------------------------------
// Endpoint change, end to end.

/// `watch-udp`: prints the wall-clock ns of the first datagram to `bind`.
fn watch_udp(args: &[String]) -> ExitCode {
    let mut bind = None;
    let mut timeout_ms = 10_000u64;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--bind" => bind = args.get(i + 1).cloned(),
            "--timeout-ms" => {
                timeout_ms = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(timeout_ms)
            }
            _ => {}
        }
        i += 2;
    }
    let Some(bind) = bind else {
        eprintln!("watch-udp: --bind IP:PORT is required");
        return ExitCode::from(2);
    };
    let sock = match std::net::UdpSocket::bind(&bind) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("watch-udp: bind {bind}: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
    println!("listening");
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if sock.recv_from(&mut buf).is_ok() {
            let ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            println!("received {ns}");
            return ExitCode::SUCCESS;
        }
    }
    println!("timeout");
    ExitCode::from(1)
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Traffic of new flows to the changed service at a modest rate; apply the change; time
/// until the sink's kernel receives a datagram for the new endpoint.
fn change_e2e(topo: &mut Topo, mode: Mode, inp: &Inputs, bins: &Bins) -> Result<Value, String> {
    let sink = topo.sink_ns().to_string();
    let new_ep = format!("{NEW_ENDPOINT}");
    let _ = ip(&[
        "-n",
        &sink,
        "addr",
        "add",
        &format!("{new_ep}/32"),
        "dev",
        "s0",
    ]);
    let port = inp.after.endpoints.last().map_or(8080, |e| e.1);
    let mut c = in_ns(&sink, &[]);
    c.arg(&bins.me).args([
        "watch-udp",
        "--bind",
        &format!("{new_ep}:{port}"),
        "--timeout-ms",
        "30000",
    ]);
    let mut watcher = Proc::spawn("watch-udp", c, topo.dir.join("watch.log"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !watcher.log_text().contains("listening") {
        if Instant::now() > deadline || !watcher.alive() {
            return Err(format!("watch-udp did not start: {}", watcher.log_text()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let svc = inp.changed();
    let block = topo.fresh_pod_block();
    let mut c = in_ns(&topo.gen, &[]);
    c.arg(&bins.pktgen).args([
        "tx",
        "--iface",
        "g0",
        "--core",
        "0",
        "--src-mac",
        GEN_MAC,
        "--dst-mac",
        NODE_IN_MAC,
        "--src-net",
        &block,
        "--dst",
        &format!("{}:{}", svc.cluster_ip, svc.port),
        "--proto",
        "udp",
        "--new-flows",
        "--flows",
        "1",
        "--size",
        "64",
        "--rate",
        "20000",
        "--duration",
        "40",
        "--quiet",
    ]);
    let mut tx = Proc::spawn("pktgen tx (change)", c, topo.dir.join("change-tx.log"))?;
    std::thread::sleep(Duration::from_millis(1000));
    if watcher.log_text().contains("received") {
        return Err("the new endpoint received traffic before the change".into());
    }
    let t0 = unix_ns();
    let apply_s = match mode {
        Mode::Nftables => timed_sh_in(&topo.node, &format!("nft -f {}", inp.path("change.nft")))?,
        Mode::Iptables => timed_sh_in(
            &topo.node,
            &format!(
                "iptables-legacy-restore --noflush --counters < {}",
                inp.path("change.ipt")
            ),
        )?,
        Mode::Kxp => {
            let t = Instant::now();
            write_atomic(
                &inp.dir.join("manifests/changed.yaml"),
                &manifest_yaml(&inp.after),
            )?;
            t.elapsed().as_secs_f64()
        }
        Mode::XdpFwd => return Ok(Value::Null),
    };
    let st = watcher.wait(Duration::from_secs(35))?;
    tx.stop(Duration::from_secs(5));
    let text = watcher.log_text();
    let seen: Option<u128> = text.lines().find_map(|l| {
        l.strip_prefix("received ")
            .and_then(|v| v.trim().parse().ok())
    });
    let e2e = match (st.success(), seen) {
        (true, Some(t1)) => Some((t1.saturating_sub(t0)) as f64 / 1e9),
        _ => None,
    };
    let mut v = json!({ "apply_s": apply_s, "end_to_end_s": e2e });
    if mode == Mode::Kxp {
        let m = kxp_metrics(topo);
        let sum = m
            .get("kubeproxy_sync_proxy_rules_duration_seconds_sum")
            .copied();
        let cnt = m
            .get("kubeproxy_sync_proxy_rules_duration_seconds_count")
            .copied();
        v["syncs_total"] = json!(cnt);
        v["sync_duration_sum_s"] = json!(sum);
    }
    let _ = ip(&[
        "-n",
        &sink,
        "addr",
        "del",
        &format!("{new_ep}/32"),
        "dev",
        "s0",
    ]);
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// The run.

struct Ctx {
    opts: Opts,
    bins: Bins,
    work: PathBuf,
    seq: u32,
    samples: Vec<Value>,
    setups: Vec<Value>,
    changes: Vec<Value>,
    masq: Vec<Value>,
    memory: Value,
    floor: Value,
    notes: Vec<String>,
}

impl Ctx {
    fn topo(&mut self, tag: &str, queues: u32, with_node: bool) -> Result<Topo, String> {
        self.seq += 1;
        let dir = self.work.join(format!("{:02}-{tag}", self.seq));
        Topo::up(self.seq, &dir, queues, with_node)
    }
}

fn say(msg: &str) {
    println!("{msg}");
    let _ = std::io::stdout().flush();
}

/// The generator straight into the sink: the floor every mode pays.
fn measure_floor(cx: &mut Ctx) -> Result<(), String> {
    say("== floor: generator -> sink, no node");
    let mut topo = cx.topo("floor", 1, false)?;
    let mut runs = Vec::new();
    for r in 0..cx.opts.reps {
        let t = Traffic {
            proto: "udp",
            new_flows: true,
            flows: 1,
            src_net: topo.fresh_pod_block(),
            dst: "10.244.0.2:8080".into(),
            rate: None,
            duration_s: cx.opts.duration_s,
            count: None,
            rx: true,
            sample_every: None,
        };
        let v = run_traffic(
            &mut topo,
            &format!("floor-{r}"),
            &t,
            &cx.bins,
            &cx.opts,
            None,
        )?;
        say(&format!(
            "   rep {r}: offered {:.0} pps, received {:.0} pps, {:.0} ns CPU per frame",
            v["offered_pps"].as_f64().unwrap_or(0.0),
            v["received_pps"].as_f64().unwrap_or(0.0),
            v["cpu_ns_per_rx_frame"].as_f64().unwrap_or(f64::NAN)
        ));
        runs.push(v);
    }
    let med = |k: &str| median(runs.iter().filter_map(|v| v[k].as_f64()).collect());
    cx.floor = json!({
        "offered_pps": med("offered_pps"),
        "received_pps": med("received_pps"),
        "cpu_ns_per_rx_frame": med("cpu_ns_per_rx_frame"),
        "cpu_attributed_ns_per_rx_frame": med("cpu_attributed_ns_per_rx_frame"),
        "runs": runs,
    });
    Ok(())
}

fn measure_size(cx: &mut Ctx, n: usize, mode: Mode, workers: u32) -> Result<(), String> {
    let inp_dir = cx.work.join(format!("inputs-{n}"));
    let inp = Inputs::write(n, &inp_dir)?;
    let tag = format!("{}-{n}-w{workers}", mode.name());
    say(&format!("== {tag}: topology up, node mode {}", mode.name()));
    let mut topo = cx.topo(&tag, workers, true)?;
    let kx = KxpOpts {
        workers,
        snat_ports: None,
        conntrack_capacity: None,
    };
    let setup = start_mode(&mut topo, mode, &inp, &cx.bins, &kx)?;
    say(&format!("   setup: {setup}"));
    cx.setups
        .push(json!({"mode": mode.name(), "services": n, "workers": workers, "setup": setup}));
    let node_pid = topo.procs.last().map(Proc::pid);
    let mut protos = vec!["udp"];
    if cx.opts.tcp {
        protos.push("tcp-syn");
    }
    for proto in protos {
        let dst = format!(
            "@{}",
            inp.path(if proto == "udp" {
                "dst-udp.txt"
            } else {
                "dst-tcp.txt"
            })
        );
        for r in 0..cx.opts.reps {
            let before = if mode == Mode::Kxp {
                kxp_frame_counters(&kxp_metrics(&topo))
            } else {
                BTreeMap::new()
            };
            let t = Traffic {
                proto,
                new_flows: true,
                flows: 1,
                src_net: topo.fresh_pod_block(),
                dst: dst.clone(),
                rate: None,
                duration_s: cx.opts.duration_s,
                count: None,
                rx: true,
                sample_every: None,
            };
            let mut v = run_traffic(
                &mut topo,
                &format!("new-{proto}-{r}"),
                &t,
                &cx.bins,
                &cx.opts,
                node_pid,
            )?;
            if mode == Mode::Kxp {
                v["kxp_counters"] =
                    counter_delta(&before, &kxp_frame_counters(&kxp_metrics(&topo)));
            }
            report_sample(&tag, &format!("new flows {proto}"), r, &v);
            push_sample(cx, mode, n, workers, &format!("new_{proto}"), v);
        }
    }
    // Established: one warm-up pass creates the flows, then the measured passes.
    let src = topo.fresh_pod_block();
    let est_flows = cx.opts.est_flows;
    let est = |secs: f64, rx: bool| Traffic {
        proto: "udp",
        new_flows: false,
        flows: est_flows,
        src_net: src.clone(),
        dst: format!("@{}", inp.path("dst-udp.txt")),
        rate: None,
        duration_s: secs,
        count: None,
        rx,
        sample_every: None,
    };
    run_traffic(
        &mut topo,
        "est-warm",
        &est(1.0, false),
        &cx.bins,
        &cx.opts,
        node_pid,
    )?;
    for r in 0..cx.opts.reps {
        let before = if mode == Mode::Kxp {
            kxp_frame_counters(&kxp_metrics(&topo))
        } else {
            BTreeMap::new()
        };
        let mut v = run_traffic(
            &mut topo,
            &format!("est-{r}"),
            &est(cx.opts.duration_s, true),
            &cx.bins,
            &cx.opts,
            node_pid,
        )?;
        if mode == Mode::Kxp {
            v["kxp_counters"] = counter_delta(&before, &kxp_frame_counters(&kxp_metrics(&topo)));
        }
        report_sample(&tag, "established udp", r, &v);
        push_sample(cx, mode, n, workers, "est_udp", v);
    }
    if cx.opts.change && mode != Mode::XdpFwd && workers == 1 {
        match change_e2e(&mut topo, mode, &inp, &cx.bins) {
            Ok(v) => {
                say(&format!("   one endpoint change: {v}"));
                cx.changes
                    .push(json!({"mode": mode.name(), "services": n, "change": v}));
            }
            Err(e) => {
                say(&format!("   one endpoint change FAILED: {e}"));
                cx.notes.push(format!("{tag}: endpoint change: {e}"));
            }
        }
    }
    if mode == Mode::Kxp {
        if let Some(p) = topo.procs.last_mut() {
            p.stop(Duration::from_secs(20));
            let log = p.log_text();
            let counters: String = log
                .lines()
                .skip_while(|l| !l.starts_with("kxp counters"))
                .collect::<Vec<_>>()
                .join("\n");
            cx.setups.last_mut().expect("pushed above")["exit_counters"] = json!(counters);
        }
    }
    topo.down();
    Ok(())
}

fn report_sample(tag: &str, what: &str, rep: usize, v: &Value) {
    say(&format!(
        "   {tag} {what} rep {rep}: offered {:.0} pps, received {:.0} pps, CPU {:.0} ns/frame{}",
        v["offered_pps"].as_f64().unwrap_or(0.0),
        v["received_pps"].as_f64().unwrap_or(0.0),
        v["cpu_ns_per_rx_frame"].as_f64().unwrap_or(f64::NAN),
        v.get("kxp_counters")
            .map(|c| format!(", kxp {c}"))
            .unwrap_or_default()
    ));
}

fn push_sample(cx: &mut Ctx, mode: Mode, n: usize, workers: u32, metric: &str, mut v: Value) {
    v["mode"] = json!(mode.name());
    v["services"] = json!(n);
    v["workers"] = json!(workers);
    v["metric"] = json!(metric);
    cx.samples.push(v);
}

/// Masquerade past the kernel's SNAT port space: one UDP service, 3 backends, external
/// sources, new flows at a fixed rate; CPU per offered packet over time.
fn measure_masq(cx: &mut Ctx, mode: Mode) -> Result<(), String> {
    let n = 10;
    let inp = Inputs::write(n, &cx.work.join(format!("inputs-{n}")))?;
    let tag = format!("masq-{}", mode.name());
    say(&format!("== {tag}"));
    let mut topo = cx.topo(&tag, 1, true)?;
    let kx = KxpOpts {
        workers: 1,
        // The kernel's space: 1024-65535 per backend (--random-fully).
        snat_ports: Some("1024-65535"),
        conntrack_capacity: Some(1 << 20),
    };
    if mode.is_kernel() {
        // The node's own ephemeral range does not limit NAT; conntrack must hold every
        // flow for the kernel to reach the port limit rather than the table limit.
        let max: u64 = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if max < 3 * SNAT_PORTS_PER_BACKEND {
            cx.notes.push(format!(
                "nf_conntrack_max is {max}, below the {} flows of SNAT exhaustion",
                3 * SNAT_PORTS_PER_BACKEND
            ));
        }
    }
    let setup = start_mode(&mut topo, mode, &inp, &cx.bins, &kx)?;
    let node_pid = topo.procs.last().map(Proc::pid);
    let svc = inp.changed().clone();
    let before = if mode == Mode::Kxp {
        kxp_frame_counters(&kxp_metrics(&topo))
    } else {
        BTreeMap::new()
    };
    let t = Traffic {
        proto: "udp",
        new_flows: true,
        flows: 1,
        src_net: "172.16.0.0/13".into(),
        dst: format!("{}:{}", svc.cluster_ip, svc.port),
        rate: Some(cx.opts.masq_rate),
        duration_s: cx.opts.masq_duration_s,
        // Phase 1: 1.5x the SNAT space at a fixed rate (the collapse, second by second).
        count: Some(3 * SNAT_PORTS_PER_BACKEND * 3 / 2),
        rx: true,
        sample_every: Some(Duration::from_secs(1)),
    };
    let mut v = run_traffic(&mut topo, "masq", &t, &cx.bins, &cx.opts, node_pid)?;
    // Phase 2, space used up: new flows (sources never seen) at the generator's maximum
    // rate; every one fails. CPU per offered packet is the cost of a failed packet (plus
    // the generator's own, the floor).
    let before2 = if mode == Mode::Kxp {
        kxp_frame_counters(&kxp_metrics(&topo))
    } else {
        BTreeMap::new()
    };
    let t2 = Traffic {
        src_net: "172.24.0.0/13".into(),
        rate: None,
        duration_s: cx.opts.duration_s,
        count: None,
        sample_every: None,
        ..t.clone()
    };
    let mut v2 = run_traffic(
        &mut topo,
        "masq-exhausted",
        &t2,
        &cx.bins,
        &cx.opts,
        node_pid,
    )?;
    if mode == Mode::Kxp {
        v2["kxp_counters"] = counter_delta(&before2, &kxp_frame_counters(&kxp_metrics(&topo)));
    }
    say(&format!(
        "   {tag} exhausted, max rate: offered {:.0} pps, received {:.0} pps, CPU per offered packet {:.0} ns sys, {:.0} ns attr; {}",
        v2["offered_pps"].as_f64().unwrap_or(0.0),
        v2["received_pps"].as_f64().unwrap_or(0.0),
        v2["cpu_ns_per_tx_frame"].as_f64().unwrap_or(f64::NAN),
        v2["cpu_attributed_ns_per_tx_frame"].as_f64().unwrap_or(f64::NAN),
        v2.get("kxp_counters").map(|c| c.to_string()).unwrap_or_default()
    ));
    if mode == Mode::Kxp {
        v["kxp_counters"] = counter_delta(&before, &kxp_frame_counters(&kxp_metrics(&topo)));
    }
    if mode.is_kernel() {
        v["nf_conntrack_count"] = json!(sh_in(
            &topo.node,
            "cat /proc/sys/net/netfilter/nf_conntrack_count"
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_default());
    }
    // Per second: what the generator offered (its own per-second counts), what the sink
    // received, and the CPU of that second (sampled every second from the generator's
    // start). "Before": seconds that end before 95% of the SNAT space was offered;
    // "after": seconds that start after 105% of it was.
    let tick_ns = 1e9 / clk_tck() as f64;
    let space = (3 * SNAT_PORTS_PER_BACKEND) as f64;
    let tx_ps: Vec<f64> = v["tx"]["pps_samples"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let rx_ps: Vec<f64> = v["rx"]["pps_samples"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let tl = v["timeline"].as_array().cloned().unwrap_or_default();
    let mut per_second = Vec::new();
    let (mut before, mut after) = (
        (Vec::new(), Vec::new(), Vec::new()),
        (Vec::new(), Vec::new(), Vec::new()),
    );
    let mut cum = 0.0;
    for (i, offered) in tx_ps.iter().enumerate() {
        let Some(p) = tl.get(i) else { break };
        let dt = p["interval_s"].as_f64().unwrap_or(1.0).max(1e-3);
        let busy = p["busy_ticks"].as_f64().unwrap_or(0.0) * tick_ns / dt;
        let attr = p["attributed_ticks"].as_f64().unwrap_or(0.0) * tick_ns / dt;
        let received = rx_ps.get(i).copied().unwrap_or(0.0);
        let start_cum = cum;
        cum += offered;
        if *offered <= 0.0 {
            continue;
        }
        let row = json!({
            "second": i + 1, "offered": offered, "received": received, "offered_cumulative": cum,
            "cpu_ns_per_offered": busy / offered, "cpu_attributed_ns_per_offered": attr / offered,
        });
        if cum <= space * 0.95 {
            before.0.push(busy / offered);
            before.1.push(attr / offered);
            before.2.push(received / offered);
        } else if start_cum >= space * 1.05 {
            after.0.push(busy / offered);
            after.1.push(attr / offered);
            after.2.push(received / offered);
        }
        per_second.push(row);
    }
    v["per_second"] = json!(per_second);
    v["snat_space_flows"] = json!(space);
    v["cpu_ns_per_offered_before"] = json!(median(before.0));
    v["cpu_attributed_ns_per_offered_before"] = json!(median(before.1));
    v["delivered_fraction_before"] = json!(median(before.2));
    v["cpu_ns_per_offered_after"] = json!(median(after.0));
    v["cpu_attributed_ns_per_offered_after"] = json!(median(after.1));
    v["delivered_fraction_after"] = json!(median(after.2));
    say(&format!(
        "   {tag}: offered {:.0} pps, received {:.0} pps; CPU ns per offered packet before / after exhaustion: system {} / {}, attributed {} / {}; {}",
        v["offered_pps"].as_f64().unwrap_or(0.0),
        v["received_pps"].as_f64().unwrap_or(0.0),
        v["cpu_ns_per_offered_before"],
        v["cpu_ns_per_offered_after"],
        v["cpu_attributed_ns_per_offered_before"],
        v["cpu_attributed_ns_per_offered_after"],
        v.get("kxp_counters").map(|c| c.to_string()).unwrap_or_default()
    ));
    v["mode"] = json!(mode.name());
    v["setup"] = setup;
    v["exhausted_max_rate"] = v2;
    cx.masq.push(v);
    topo.down();
    Ok(())
}

/// 1M new flows through kxp: RSS and counters.
fn measure_memory(cx: &mut Ctx) -> Result<(), String> {
    let n = 10;
    let inp = Inputs::write(n, &cx.work.join(format!("inputs-{n}")))?;
    say(&format!(
        "== memory: {} new UDP flows through kxp",
        cx.opts.memory_flows
    ));
    let mut topo = cx.topo("memory", 1, true)?;
    let cap = (cx.opts.memory_flows * 2).next_power_of_two();
    let kx = KxpOpts {
        workers: 1,
        snat_ports: None,
        conntrack_capacity: Some(cap),
    };
    start_mode(&mut topo, Mode::Kxp, &inp, &cx.bins, &kx)?;
    let pid = topo.procs.last().map(Proc::pid).ok_or("kxp not running")?;
    let rss0 = proc_status_kb(pid, "VmRSS:");
    let before = kxp_frame_counters(&kxp_metrics(&topo));
    let rate = 200_000u64;
    let t = Traffic {
        proto: "udp",
        new_flows: true,
        flows: 1,
        src_net: "10.246.0.0/15".into(),
        dst: format!("@{}", inp.path("dst-udp.txt")),
        rate: Some(rate),
        duration_s: cx.opts.memory_flows as f64 / rate as f64,
        count: Some(cx.opts.memory_flows),
        rx: true,
        sample_every: None,
    };
    let v = run_traffic(&mut topo, "memory", &t, &cx.bins, &cx.opts, Some(pid))?;
    let rss1 = proc_status_kb(pid, "VmRSS:");
    let hwm = proc_status_kb(pid, "VmHWM:");
    let counters = counter_delta(&before, &kxp_frame_counters(&kxp_metrics(&topo)));
    let tracked = counters["forward/new_flow"].as_f64().unwrap_or(0.0);
    let kernel_obj = std::fs::read_to_string("/sys/kernel/slab/nf_conntrack/object_size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    cx.memory = json!({
        "flows_offered": cx.opts.memory_flows,
        "conntrack_capacity": cap,
        "rss_before_kb": rss0,
        "rss_after_kb": rss1,
        "vm_hwm_kb": hwm,
        "tracked_new_flows": tracked,
        "rss_bytes_per_tracked_flow": match (rss0, rss1) {
            (Some(a), Some(b)) if tracked > 0.0 => json!((b.saturating_sub(a) * 1024) as f64 / tracked),
            _ => Value::Null,
        },
        "kxp_counters": counters,
        "received_frames": v["rx_frames"],
        "kernel_nf_conntrack_object_size": kernel_obj,
    });
    say(&format!("   memory: {}", cx.memory));
    topo.down();
    Ok(())
}

fn machine() -> Value {
    let sh = |c: &str| {
        run(Command::new("sh").args(["-c", c]))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "nproc": sh("nproc"),
        "cpu_model": sh("lscpu | sed -n 's/^Model name: *//p'"),
        "kernel": sh("uname -r"),
        "date_utc": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": loadavg(),
        "nft": sh("nft --version"),
        "iptables": sh("iptables-legacy --version"),
        "clk_tck": clk_tck(),
        "mem_total": sh("grep MemTotal /proc/meminfo"),
        "nf_conntrack_max": sh("cat /proc/sys/net/netfilter/nf_conntrack_max"),
    })
}

// ---------------------------------------------------------------------------------------
// The summary table.

fn summarize(cx: &Ctx) -> (String, Vec<Value>) {
    let mut rows = Vec::new();
    let mut sizes: Vec<usize> = cx.opts.services.clone();
    sizes.dedup();
    let metrics: &[(&str, &str, &str)] = &[
        ("new_udp", "received_pps", "new flows UDP, rx pps"),
        ("new_udp", "offered_pps", "new flows UDP, offered pps"),
        (
            "new_udp",
            "cpu_ns_per_rx_frame",
            "new flows UDP, CPU ns/frame sys",
        ),
        (
            "new_udp",
            "cpu_attributed_ns_per_rx_frame",
            "new flows UDP, CPU ns/frame attr",
        ),
        ("new_tcp-syn", "received_pps", "new flows TCP SYN, rx pps"),
        (
            "new_tcp-syn",
            "cpu_attributed_ns_per_rx_frame",
            "new flows TCP SYN, CPU ns/fr attr",
        ),
        ("est_udp", "received_pps", "established UDP, rx pps"),
        ("est_udp", "offered_pps", "established UDP, offered pps"),
        (
            "est_udp",
            "cpu_ns_per_rx_frame",
            "established UDP, CPU ns/frame sys",
        ),
        (
            "est_udp",
            "cpu_attributed_ns_per_rx_frame",
            "established UDP, CPU ns/frame attr",
        ),
    ];
    let modes = [Mode::XdpFwd, Mode::Kxp, Mode::Iptables, Mode::Nftables];
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<34} {:>6} {:>3} | {:>11} {:>11} {:>11} {:>11} | {:>8} {:>8} {:>8}",
        "metric (median of runs)",
        "svc",
        "wk",
        "xdp_fwd",
        "kxp",
        "iptables",
        "nftables",
        "kxp/ipt",
        "kxp/nft",
        "kxp/fwd"
    );
    let _ = writeln!(t, "{}", "-".repeat(132));
    for &workers in &cx.opts.workers {
        for (metric, field, label) in metrics {
            for &n in &sizes {
                let vals: Vec<Option<f64>> = modes
                    .iter()
                    .map(|m| {
                        median(
                            cx.samples
                                .iter()
                                .filter(|v| {
                                    v["mode"] == m.name()
                                        // xdp_fwd ran at one size only: its figures serve
                                        // every size.
                                        && (v["services"] == n || *m == Mode::XdpFwd)
                                        && v["metric"] == *metric
                                        && (v["workers"] == workers || *m == Mode::XdpFwd)
                                })
                                .filter_map(|v| v[*field].as_f64())
                                .collect(),
                        )
                    })
                    .collect();
                if vals.iter().all(Option::is_none) {
                    continue;
                }
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                };
                let r = [
                    ratio(vals[1], vals[2]),
                    ratio(vals[1], vals[3]),
                    ratio(vals[1], vals[0]),
                ];
                let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
                let fr = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}x"));
                let _ = writeln!(
                    t,
                    "{:<34} {:>6} {:>3} | {:>11} {:>11} {:>11} {:>11} | {:>8} {:>8} {:>8}",
                    label,
                    n,
                    workers,
                    f(vals[0]),
                    f(vals[1]),
                    f(vals[2]),
                    f(vals[3]),
                    fr(r[0]),
                    fr(r[1]),
                    fr(r[2])
                );
                rows.push(json!({
                    "metric": metric, "field": field, "label": label, "services": n, "workers": workers,
                    "xdp_fwd": vals[0], "kxp": vals[1], "iptables": vals[2], "nftables": vals[3],
                    "kxp_over_iptables": r[0], "kxp_over_nftables": r[1], "kxp_over_xdp_fwd": r[2],
                }));
            }
        }
    }
    // Sync rows.
    for &n in &sizes {
        let setup = |m: Mode, k: &str| {
            cx.setups
                .iter()
                .find(|v| v["mode"] == m.name() && v["services"] == n && v["workers"] == 1)
                .and_then(|v| v["setup"][k].as_f64())
        };
        let change = |m: Mode, k: &str| {
            cx.changes
                .iter()
                .find(|v| v["mode"] == m.name() && v["services"] == n)
                .and_then(|v| v["change"][k].as_f64())
        };
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1} ms", x * 1e3));
        let full = [
            None,
            setup(Mode::Kxp, "first_sync_s"),
            setup(Mode::Iptables, "full_sync_s"),
            setup(Mode::Nftables, "full_sync_s"),
        ];
        let apply = [
            None,
            change(Mode::Kxp, "apply_s"),
            change(Mode::Iptables, "apply_s"),
            change(Mode::Nftables, "apply_s"),
        ];
        let e2e = [
            None,
            change(Mode::Kxp, "end_to_end_s"),
            change(Mode::Iptables, "end_to_end_s"),
            change(Mode::Nftables, "end_to_end_s"),
        ];
        for (label, key, vals) in [
            ("full sync (kxp: compile+publish)", "full_sync", full),
            ("one endpoint change, apply", "change_apply", apply),
            ("one endpoint change, end to end", "change_e2e", e2e),
        ] {
            if vals.iter().all(Option::is_none) {
                continue;
            }
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                _ => None,
            };
            let _ = writeln!(
                t,
                "{:<34} {:>6} {:>3} | {:>11} {:>11} {:>11} {:>11} | {:>8} {:>8} {:>8}",
                label,
                n,
                1,
                "-",
                ms(vals[1]),
                ms(vals[2]),
                ms(vals[3]),
                ratio(vals[1], vals[2]).map_or("-".into(), |x| format!("{x:.1}x")),
                ratio(vals[1], vals[3]).map_or("-".into(), |x| format!("{x:.1}x")),
                "-"
            );
            rows.push(json!({
                "metric": key, "label": label, "services": n, "workers": 1, "unit": "s",
                "kxp": vals[1], "iptables": vals[2], "nftables": vals[3],
                "iptables_over_kxp": ratio(vals[1], vals[2]), "nftables_over_kxp": ratio(vals[1], vals[3]),
            }));
        }
    }
    let _ = writeln!(
        t,
        "(sync rows: ratios are kernel time / kxp time, higher is better for kxp)"
    );
    if let Some(f) = cx.floor.as_object() {
        let _ = writeln!(
            t,
            "floor, generator -> sink without a node: {:.0} pps, CPU {:.0} ns/frame sys, {:.0} ns/frame attr",
            f.get("received_pps").and_then(Value::as_f64).unwrap_or(0.0),
            f.get("cpu_ns_per_rx_frame").and_then(Value::as_f64).unwrap_or(f64::NAN),
            f.get("cpu_attributed_ns_per_rx_frame").and_then(Value::as_f64).unwrap_or(f64::NAN),
        );
    }
    if !cx.masq.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "masquerade past the SNAT space ({} flows: 3 backends x 64,512 ports), new UDP flows at {} pps offered",
            3 * SNAT_PORTS_PER_BACKEND,
            cx.opts.masq_rate
        );
        let _ = writeln!(
            t,
            "{:<10} | {:>9} {:>9} | {:>13} | {:>15} {:>15} | {:>10} {:>14} | kxp snat_ports_exhausted",
            "mode",
            "offered",
            "received",
            "delivered b/a",
            "CPU ns/off sys",
            "attr b/a",
            "full: pps",
            "attr ns/offer",
        );
        for m in &cx.masq {
            let f = |k: &str| m[k].as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
            let p = |k: &str| {
                m[k].as_f64()
                    .map_or("-".to_string(), |x| format!("{:.0}%", x * 100.0))
            };
            let _ = writeln!(
                t,
                "{:<10} | {:>9} {:>9} | {:>13} | {:>15} {:>15} | {:>10} {:>14} | {}",
                m["mode"].as_str().unwrap_or("?"),
                f("offered_pps"),
                f("received_pps"),
                format!(
                    "{} / {}",
                    p("delivered_fraction_before"),
                    p("delivered_fraction_after")
                ),
                format!(
                    "{} / {}",
                    f("cpu_ns_per_offered_before"),
                    f("cpu_ns_per_offered_after")
                ),
                format!(
                    "{} / {}",
                    f("cpu_attributed_ns_per_offered_before"),
                    f("cpu_attributed_ns_per_offered_after")
                ),
                m["exhausted_max_rate"]["offered_pps"]
                    .as_f64()
                    .map_or("-".to_string(), |x| format!("{x:.0}")),
                m["exhausted_max_rate"]["cpu_attributed_ns_per_tx_frame"]
                    .as_f64()
                    .map_or("-".to_string(), |x| format!("{x:.0}")),
                {
                    let a = m["kxp_counters"]["drop/snat_ports_exhausted"].as_f64();
                    let b = m["exhausted_max_rate"]["kxp_counters"]["drop/snat_ports_exhausted"]
                        .as_f64();
                    match (a, b) {
                        (None, None) => "-".to_string(),
                        _ => format!(
                            "{:.0} + {:.0} (phase 2)",
                            a.unwrap_or(0.0),
                            b.unwrap_or(0.0)
                        ),
                    }
                },
            );
        }
        let _ = writeln!(
            t,
            "(b/a: before / after the space is used up, phase 1 at the fixed rate; full: phase 2, space used up, max rate)"
        );
    }
    if let Some(mem) = cx.memory.as_object() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "memory: {} new UDP flows -> kxp tracked {} (conntrack capacity {}); RSS {} kB -> {} kB ({} bytes per tracked flow); kernel nf_conntrack object {} bytes",
            mem.get("flows_offered").cloned().unwrap_or_default(),
            mem.get("tracked_new_flows").cloned().unwrap_or_default(),
            mem.get("conntrack_capacity").cloned().unwrap_or_default(),
            mem.get("rss_before_kb").cloned().unwrap_or_default(),
            mem.get("rss_after_kb").cloned().unwrap_or_default(),
            mem.get("rss_bytes_per_tracked_flow").and_then(Value::as_f64).map_or("-".into(), |x| format!("{x:.1}")),
            mem.get("kernel_nf_conntrack_object_size").cloned().unwrap_or_default(),
        );
    }
    (t, rows)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("watch-udp") {
        return watch_udp(&args[1..]);
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match main_run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidebyside: {e}");
            ExitCode::from(1)
        }
    }
}

fn main_run(opts: Opts) -> Result<(), String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Err("needs root (network namespaces, XDP, AF_XDP, netfilter)".into());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let bins = Bins {
        kxp: opts.bin_dir.join("kxp"),
        pktgen: opts.bin_dir.join("pktgen"),
        xdp_fwd: opts.bin_dir.join("xdp_fwd"),
        me,
    };
    let mut need = vec![&bins.pktgen];
    if opts.modes.contains(&Mode::Kxp) || opts.memory || opts.masq {
        need.push(&bins.kxp);
    }
    if opts.modes.contains(&Mode::XdpFwd) {
        need.push(&bins.xdp_fwd);
    }
    for b in need {
        if !b.exists() {
            return Err(format!("{} is missing (build it first)", b.display()));
        }
    }
    let mut tools = vec!["ip", "curl", "setsid"];
    if opts.modes.contains(&Mode::Nftables) {
        tools.push("nft");
    }
    if opts.modes.contains(&Mode::Iptables) {
        tools.extend(["iptables-legacy-restore", "iptables-legacy"]);
    }
    for t in tools {
        if run(Command::new("sh").args(["-c", &format!("command -v {t}")])).is_err() {
            return Err(format!("{t} is not installed"));
        }
    }
    remove_stale_namespaces();
    spawn_reaper()?;
    let work = match &opts.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kxpb-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let started = Instant::now();
    let mut cx = Ctx {
        opts: opts.clone(),
        bins,
        work: work.clone(),
        seq: 0,
        samples: Vec::new(),
        setups: Vec::new(),
        changes: Vec::new(),
        masq: Vec::new(),
        memory: Value::Null,
        floor: Value::Null,
        notes: Vec::new(),
    };
    let mach = machine();
    say(&format!("== machine: {mach}"));
    measure_floor(&mut cx)?;
    let first_size = opts.services.first().copied().unwrap_or(10);
    for &n in &opts.services {
        for &mode in &opts.modes {
            // xdp_fwd does not look at services: measured once, at the first size (the
            // ceiling column of every size). Two workers: kxp only, first size only (the
            // generator has one core; see the docs).
            if mode == Mode::XdpFwd && n != first_size {
                continue;
            }
            for &w in &opts.workers {
                if w > 1 && (mode != Mode::Kxp || n != first_size) {
                    continue;
                }
                if let Err(e) = measure_size(&mut cx, n, mode, w) {
                    say(&format!(
                        "   {} at {n} services, {w} worker(s) FAILED: {e}",
                        mode.name()
                    ));
                    cx.notes.push(format!(
                        "{} at {n} services, {w} worker(s): {e}",
                        mode.name()
                    ));
                }
            }
        }
    }
    if opts.masq {
        for &mode in &opts.modes {
            if mode == Mode::XdpFwd {
                continue;
            }
            if let Err(e) = measure_masq(&mut cx, mode) {
                say(&format!("   masquerade {} FAILED: {e}", mode.name()));
                cx.notes.push(format!("masquerade {}: {e}", mode.name()));
            }
        }
    }
    if opts.memory {
        if let Err(e) = measure_memory(&mut cx) {
            say(&format!("   memory FAILED: {e}"));
            cx.notes.push(format!("memory: {e}"));
        }
    }
    let (table, rows) = summarize(&cx);
    println!();
    println!("{table}");
    for n in &cx.notes {
        println!("note: {n}");
    }
    let mut mach = mach;
    mach["loadavg_end"] = json!(loadavg());
    let result = json!({
        "command": format!("sidebyside {}", opts.command_line),
        "machine": mach,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "options": {
            "services": opts.services, "modes": opts.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "duration_s": opts.duration_s, "reps": opts.reps, "est_flows": opts.est_flows,
            "endpoints_per_service": ENDPOINTS_PER_SERVICE, "workers": opts.workers,
            "masq_rate": opts.masq_rate, "masq_duration_s": opts.masq_duration_s,
            "memory_flows": opts.memory_flows, "sink_core": opts.sink_core,
            "frame_bytes": 64,
        },
        "table": table,
        "summary": rows,
        "floor": cx.floor,
        "setups": cx.setups,
        "changes": cx.changes,
        "masquerade": cx.masq,
        "memory": cx.memory,
        "samples": cx.samples,
        "notes": cx.notes,
    });
    if let Some(path) = &opts.json_out {
        if let Some(d) = path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::write(
            path,
            serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        say(&format!("results: {}", path.display()));
    }
    if opts.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
