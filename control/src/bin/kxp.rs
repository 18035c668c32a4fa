//! The `kxp` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kxp_control::controller::DEFAULT_MIN_SYNC_INTERVAL;
use kxp_control::ops::{DEFAULT_HEALTHZ_ADDR, DEFAULT_HEALTHZ_TIMEOUT, DEFAULT_METRICS_ADDR};
use kxp_control::replay::{counter_summary, explain, run, ReplayArgs};
use kxp_control::source::manifest_watch::DEFAULT_RESCAN_INTERVAL;
use kxp_dataplane::pipeline::WorkerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "kxp",
    version,
    about = "Userspace Kubernetes Service dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a capture through the packet pipeline (one worker, clock from the capture).
    Replay {
        /// Kubernetes manifests: a YAML/JSON file or a directory of them.
        #[arg(long)]
        manifests: PathBuf,
        /// The node file.
        #[arg(long)]
        node: PathBuf,
        /// Input capture (pcap, Ethernet).
        #[arg(long = "in")]
        input: PathBuf,
        /// Output capture: every forwarded or generated frame, in order.
        #[arg(long = "out")]
        output: PathBuf,
        /// JSON-lines report, one line per input frame.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Ingress interface for every frame: `auto` (by source address) or a name from
        /// the node file.
        #[arg(long, default_value = "auto")]
        ingress: String,
        /// Print one readable line per frame.
        #[arg(long)]
        explain: bool,
        /// Masquerade all service traffic (kube-proxy's masqueradeAll).
        #[arg(long)]
        masquerade_all: bool,
    },
    /// Watch manifests (or the Kubernetes API), compile and publish tables on every change,
    /// serve /healthz and /metrics (no packets are processed: the control plane alone).
    Sync(SyncArgs),
    /// Run the dataplane on this node: AF_XDP workers on the node file's interfaces,
    /// an XDP program steering service traffic to them, tables from the watched
    /// manifests. Runs until SIGINT/SIGTERM, then detaches everything.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct SyncArgs {
    /// The node file.
    #[arg(long)]
    node: PathBuf,
    /// Kubernetes manifests: a YAML/JSON file or a directory of them, watched.
    #[arg(long, required_unless_present_any = ["kube", "kubeconfig"])]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API instead of manifests ($KUBECONFIG or ~/.kube/config if
    /// present, else the in-cluster service account). The node is the node file's `name`.
    #[arg(long, conflicts_with = "manifests")]
    kube: bool,
    /// Watch the Kubernetes API through this kubeconfig.
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Where /metrics (and /healthz, /livez) are served.
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    metrics_addr: std::net::SocketAddr,
    /// Where /healthz and /livez are served (only those, unless it is the metrics address);
    /// 0.0.0.0:10256 for cloud load balancers' health checks.
    #[arg(long, default_value_t = DEFAULT_HEALTHZ_ADDR)]
    healthz_addr: std::net::SocketAddr,
    /// Seconds a queued change may wait for a sync before /healthz answers 503.
    #[arg(long, default_value_t = DEFAULT_HEALTHZ_TIMEOUT.as_secs())]
    healthz_timeout: u64,
    /// Minimum interval between two syncs, in milliseconds (kube-proxy's minSyncPeriod).
    #[arg(long, default_value_t = DEFAULT_MIN_SYNC_INTERVAL.as_millis() as u64)]
    min_sync_interval_ms: u64,
    /// Seconds between rescans of the manifests (in addition to filesystem events).
    #[arg(long, default_value_t = DEFAULT_RESCAN_INTERVAL.as_secs())]
    rescan_interval: u64,
    /// Sync the manifests once, print a summary and exit (status 1 if there are
    /// configuration errors).
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Sync(args) => sync(args),
        Command::Run(args) => {
            if !args.no_huge_heap {
                exec_with_huge_heap();
            }
            run_node(args)
        }
        Command::Replay {
            manifests,
            node,
            input,
            output,
            report,
            ingress,
            explain: show,
            masquerade_all,
        } => {
            let args = ReplayArgs {
                manifests,
                node,
                input,
                output,
                report,
                ingress: Some(ingress),
                worker: WorkerConfig {
                    masquerade_all,
                    ..WorkerConfig::default()
                },
            };
            match run(&args) {
                Ok(o) => {
                    for n in &o.notices {
                        eprintln!("notice: {n}");
                    }
                    for e in &o.config_errors {
                        eprintln!("error: {e}");
                    }
                    if show {
                        print!("{}", explain(&o));
                    }
                    println!("{} frames replayed; counters:", o.frames);
                    print!("{}", counter_summary(&o.counters));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kxp replay: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// `kxp sync`: manifests watch -> controller -> publisher, with the ops servers.
fn sync(args: SyncArgs) -> ExitCode {
    use std::sync::Arc;
    use std::time::Duration;

    use kxp_control::controller::{Controller, ControllerConfig};
    use kxp_control::ops::{Metrics, OpsServer, Routes};
    use kxp_control::source::kube::{ClusterAccess, KubeSource, KubeSourceConfig};
    use kxp_control::source::manifest_watch::{ManifestFiles, ManifestWatch, ManifestWatchConfig};
    use kxp_control::source::SourceEvent;
    use kxp_dataplane::pipeline::Tables;
    use kxp_dataplane::publish::TablePublisher;
    use kxp_dataplane::tables::ServiceTable;

    if args.once && args.manifests.is_none() {
        eprintln!("kxp sync: --once needs --manifests");
        return ExitCode::from(2);
    }
    let node = match kxp_control::node::load_node_file(&args.node) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("kxp sync: {e}");
            return ExitCode::from(2);
        }
    };
    let publisher = TablePublisher::new(Tables {
        services: Arc::new(ServiceTable::new()),
        node: Arc::new(node.clone()),
    });
    let metrics = Metrics::new(Duration::from_secs(args.healthz_timeout));
    let config = ControllerConfig {
        min_sync_interval: Duration::from_millis(args.min_sync_interval_ms),
        ..ControllerConfig::default()
    };
    let node_name = node.name.clone();
    let mut controller = Controller::new(node, publisher, Arc::clone(&metrics), config);

    if let (true, Some(manifests)) = (args.once, &args.manifests) {
        let mut files = ManifestFiles::new(manifests);
        files.rescan();
        let Some(report) = controller.sync_once(SourceEvent::View(files.view())) else {
            eprintln!("kxp sync: nothing to sync");
            return ExitCode::from(2);
        };
        for n in &report.notices {
            println!("notice: {n}");
        }
        for e in &report.errors {
            println!("error: {e}");
        }
        println!("synced {}", report.summary());
        return if report.errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }

    let mut servers = Vec::new();
    let mut addrs = vec![(args.metrics_addr, Routes::All)];
    if args.healthz_addr != args.metrics_addr {
        addrs.push((args.healthz_addr, Routes::HealthOnly));
    }
    for (addr, routes) in addrs {
        match OpsServer::bind_routes(addr, Arc::clone(&metrics), routes) {
            Ok(s) => {
                let paths = match routes {
                    Routes::All => "/healthz, /livez, /metrics",
                    Routes::HealthOnly => "/healthz, /livez",
                };
                tracing::info!(addr = %s.local_addr(), paths, "ops server");
                servers.push(s);
            }
            Err(e) => {
                eprintln!("kxp sync: cannot listen on {addr}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    // Kept alive (and stopped when dropped) for as long as the controller runs.
    let mut manifest_watch = None;
    let mut kube_source = None;
    if let Some(manifests) = &args.manifests {
        let mut watch_config = ManifestWatchConfig::new(manifests);
        watch_config.rescan_interval = Duration::from_secs(args.rescan_interval.max(1));
        match ManifestWatch::spawn(watch_config, tx) {
            Ok(w) => {
                tracing::info!(
                    manifests = %manifests.display(),
                    fs_events = w.has_fs_watch(),
                    "watching manifests"
                );
                manifest_watch = Some(w);
            }
            Err(e) => {
                eprintln!("kxp sync: cannot start the manifests watch: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        let access = match &args.kubeconfig {
            Some(path) => ClusterAccess::Kubeconfig(path.clone()),
            None => ClusterAccess::Infer,
        };
        match KubeSource::start(KubeSourceConfig::new(access), &node_name, tx) {
            Ok(k) => {
                tracing::info!(node = %node_name, "watching the Kubernetes API");
                kube_source = Some(k);
            }
            Err(e) => {
                eprintln!("kxp sync: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let handle = match controller.spawn(rx) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("kxp sync: cannot start the controller: {e}");
            return ExitCode::from(2);
        }
    };
    // Runs until killed: kxp sync holds no kernel state, there is nothing to clean up.
    let _ = handle.join();
    drop(manifest_watch);
    drop(kube_source);
    drop(servers);
    ExitCode::SUCCESS
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The node file (interfaces of kind uplink and pod get AF_XDP sockets).
    #[arg(long)]
    node: PathBuf,
    /// Kubernetes manifests: a YAML/JSON file or a directory of them, watched (the
    /// embedded default source).
    #[arg(long, required_unless_present_any = ["kube", "kubeconfig"])]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API instead of manifests ($KUBECONFIG or ~/.kube/config if
    /// present, else the in-cluster service account). The node is the node file's `name`.
    #[arg(long, conflicts_with = "manifests")]
    kube: bool,
    /// Watch the Kubernetes API through this kubeconfig (its current context).
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Workers, one per receive queue 0..N (ignored when --queues is given).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Receive queues to serve, one worker each, e.g. `0,1`.
    #[arg(long, value_delimiter = ',')]
    queues: Vec<u32>,
    /// Cores to pin the workers to, in order, e.g. `1,2` (default: all but core 0).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Frames each hand-off ring between two workers holds (several workers: frames one
    /// receives and another owns are copied to it through these).
    #[arg(long, default_value_t = 1024)]
    handoff_frames: usize,
    /// Extra pod interfaces by name pattern (`*` wildcard), e.g. `veth*`; followed while
    /// running (interfaces appearing and going).
    #[arg(long, value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// Recompute full TCP/UDP checksums of frames from an interface: auto (veths),
    /// always, never (every sender has TX checksum offload off).
    #[arg(long, default_value = "auto")]
    l4_checksum: kxp_control::runtime::ChecksumMode,
    /// Masquerade source ports `LO-HI`, split among the workers; keep it outside
    /// net.ipv4.ip_local_port_range.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: (u16, u16),
    /// Masquerade all service traffic (kube-proxy's masqueradeAll).
    #[arg(long)]
    masquerade_all: bool,
    /// Tracked IPv4 flows per worker.
    #[arg(long, default_value_t = 1 << 18)]
    conntrack_capacity: usize,
    /// Slots of each of the two reply tables the workers share with the XDP program
    /// (IPv4: 24 bytes a slot, IPv6: 56; default: a third more than the tuples every
    /// worker's conntrack can hold, per family).
    /// Tuples that find no slot go to the kernel's LRU map: slower, still correct.
    #[arg(long)]
    reply_table_slots: Option<usize>,
    /// Leave glibc's malloc on 4 KiB pages. By default `kxp run` re-executes itself once
    /// with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, so that the heap (conntrack's flow
    /// slab, the service, Maglev and endpoint tables) is advised onto transparent huge
    /// pages where THP is in `madvise` mode: fewer TLB misses on the new-flow path.
    #[arg(long)]
    no_huge_heap: bool,
    /// UMEM frame size (power of two, >= 2048; 4096 for frames above ~1780 bytes).
    #[arg(long, default_value_t = 2048)]
    frame_size: u32,
    /// Size of every AF_XDP ring (power of two).
    #[arg(long, default_value_t = 2048)]
    ring_size: u32,
    /// How sockets bind: auto, copy or zerocopy.
    #[arg(long, default_value = "auto")]
    xdp_bind: String,
    /// Microseconds a worker keeps polling after its last frame before it sleeps.
    #[arg(long, default_value_t = 200)]
    busy_poll_us: u64,
    /// Longest sleep of an idle worker, in microseconds.
    #[arg(long, default_value_t = 2000)]
    idle_sleep_us: u64,
    /// How often the kernel's neighbour table is re-read, in milliseconds.
    #[arg(long, default_value_t = 500)]
    neighbour_refresh_ms: u64,
    /// Print non-zero counters every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
    /// Serve /metrics, /healthz and /livez here.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Write this file (with the pid) once traffic is steered; removed at exit.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Create a veth pair NAME / NAME-k routing the service CIDRs through kxp, so that
    /// the node's own processes reach ClusterIPs (deleted at exit).
    #[arg(long)]
    host_veth: Option<String>,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LO-HI"))?;
    let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: expected 1 <= LO <= HI"));
    }
    Ok((lo, hi))
}

/// `kxp run`: see `kxp_control::runtime`.
/// The glibc tunable that has malloc advise its heap onto transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`; glibc 2.35 and later).
const HUGE_HEAP_TUNABLE: &str = "glibc.malloc.hugetlb=1";

/// Re-executes this process (same arguments, same pid) with [`HUGE_HEAP_TUNABLE`] added
/// to `GLIBC_TUNABLES`, unless the variable already sets `glibc.malloc.hugetlb` (the
/// re-executed process, or an operator's own choice). Must run before any thread starts.
/// Returns only if it did not re-execute (the tunable was set, or exec failed: then kxp
/// runs on as it is, and says so).
fn exec_with_huge_heap() {
    use std::os::unix::process::CommandExt;
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("glibc.malloc.hugetlb") {
        return;
    }
    let tunables = if current.is_empty() {
        HUGE_HEAP_TUNABLE.to_string()
    } else {
        format!("{current}:{HUGE_HEAP_TUNABLE}")
    };
    // The binary's own path first, so that the process keeps its name (`kxp`, what
    // pgrep and ps show); /proc/self/exe if that path is gone (replaced on disk).
    let own = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let mut err = std::io::Error::other("not tried");
    for exe in [own, "/proc/self/exe".into()] {
        err = std::process::Command::new(exe)
            .arg0(std::env::args_os().next().unwrap_or_default())
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", &tunables)
            .exec();
    }
    tracing::warn!("kxp run: cannot re-execute with {HUGE_HEAP_TUNABLE} ({err}); the heap stays on 4 KiB pages");
}

fn run_node(args: RunArgs) -> ExitCode {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use kxp_control::runtime::{RunConfig, Runtime};
    use kxp_dataplane::driver::afxdp::{BindMode, IdlePolicy};

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal exits at once (XDP links die with the process, nothing stays
        // attached); the first asks for an orderly stop.
        let registered =
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)));
        if let Err(e) = registered {
            eprintln!("kxp run: cannot handle signal {sig}: {e}");
            return ExitCode::from(2);
        }
    }
    let bind_mode = match args.xdp_bind.as_str() {
        "auto" => BindMode::Auto,
        "copy" => BindMode::Copy,
        "zerocopy" => BindMode::ZeroCopy,
        other => {
            eprintln!("kxp run: --xdp-bind {other:?}: expected auto, copy or zerocopy");
            return ExitCode::from(2);
        }
    };
    let mut cfg = RunConfig::new(&args.node, args.manifests.clone().unwrap_or_default());
    if args.manifests.is_none() {
        use kxp_control::source::kube::ClusterAccess;
        cfg.kube = Some(match &args.kubeconfig {
            Some(path) => ClusterAccess::Kubeconfig(path.clone()),
            None => ClusterAccess::Infer,
        });
    }
    cfg.queues = if args.queues.is_empty() {
        (0..args.workers.max(1)).collect()
    } else {
        args.queues
    };
    cfg.cores = args.cores;
    cfg.handoff_capacity = args.handoff_frames.max(2);
    cfg.pod_interfaces = args.pod_interfaces;
    cfg.checksum = args.l4_checksum;
    cfg.snat_ports = args.snat_ports;
    cfg.masquerade_all = args.masquerade_all;
    cfg.conntrack_capacity = args.conntrack_capacity;
    cfg.reply_table_slots = args.reply_table_slots;
    cfg.afxdp.frame_size = args.frame_size;
    cfg.afxdp.ring_size = args.ring_size;
    cfg.afxdp.frames_per_socket = args.ring_size.saturating_mul(2);
    cfg.afxdp.bind_mode = bind_mode;
    cfg.afxdp.idle = IdlePolicy {
        busy_poll: Duration::from_micros(args.busy_poll_us),
        max_sleep: Duration::from_micros(args.idle_sleep_us.max(1)),
    };
    cfg.neighbour_refresh = Duration::from_millis(args.neighbour_refresh_ms.max(10));
    cfg.stats_interval =
        (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    cfg.metrics_addr = args.metrics_addr;
    cfg.ready_file = args.ready_file;
    cfg.host_veth = args.host_veth;
    let mut rt = match Runtime::start(cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kxp run: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.wait(&stop);
    eprint!("{}", rt.report());
    drop(rt);
    match result {
        Ok(()) => {
            eprintln!("kxp run: stopped; XDP detached, sockets closed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kxp run: {e}");
            ExitCode::from(1)
        }
    }
}
