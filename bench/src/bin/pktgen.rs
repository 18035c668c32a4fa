//! `pktgen`: a packet generator for the dataplane benchmarks, run inside network
//! namespaces (`ip netns exec`).
//!
//! * `pktgen tx`: AF_XDP transmit of UDP, TCP SYN (new flows) or TCP ACK (established
//!   style) frames, IPv4 or IPv6, to N frontends, over a fixed set of flows or a new
//!   5-tuple per packet, at a fixed rate (token bucket over batches against the monotonic
//!   clock) or as fast as completions allow, for a duration or a count.
//! * `pktgen rx`: an XDP program on the interface counts every arriving frame (per-CPU
//!   counters, per destination address) and drops it; the first frames are sampled to
//!   check their checksums (and written to a pcap with `--pcap`).
//!
//! Both print a progress line on stderr every `--progress-interval` and a JSON report at
//! the end (stdout, or `--json FILE`). SIGINT/SIGTERM end a run early, report included.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use serde_json::{json, Value};
use xsk_rs::FrameDesc;

use kxp_bench::pktgen::bpf::{self, Bpf};
use kxp_bench::pktgen::flows::{FlowSpace, Odometer};
use kxp_bench::pktgen::frame::{Proto, Templates};
use kxp_bench::pktgen::xsk::{Xsk, XskConfig, KERNEL_STAT_NAMES};
use kxp_bench::pktgen::{
    iface_stat, median, parse_duration, parse_frontends, parse_mac, pin, stop_flag, write_ready,
    write_report, PerSecond, Progress,
};

#[derive(Debug, Parser)]
#[command(
    name = "pktgen",
    about = "AF_XDP packet generator and XDP receive counter"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Transmit frames from an AF_XDP socket.
    Tx(TxArgs),
    /// Count (and drop) every frame arriving on an interface.
    Rx(RxArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtoArg {
    Udp,
    TcpSyn,
    TcpAck,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("bound").required(true).multiple(true).args(["duration", "count"])))]
struct TxArgs {
    #[arg(long)]
    iface: String,
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Pin the generator to this core.
    #[arg(long)]
    core: Option<usize>,
    #[arg(long, value_parser = parse_mac)]
    src_mac: [u8; 6],
    #[arg(long, value_parser = parse_mac)]
    dst_mac: [u8; 6],
    /// Client addresses are drawn from this network (IPv4 or IPv6).
    #[arg(long)]
    src_net: IpNet,
    /// Frontends: "ip:port,ip:port" ([v6]:port) or @FILE with one per line.
    #[arg(long)]
    dst: String,
    #[arg(long, value_enum)]
    proto: ProtoArg,
    /// Assert IPv6 (the family follows the addresses either way).
    #[arg(long)]
    ipv6: bool,
    /// Distinct 5-tuples, cycled through.
    #[arg(long)]
    flows: Option<u64>,
    /// Every packet a new 5-tuple (source address and port advance).
    #[arg(long)]
    new_flows: bool,
    /// Frame size in bytes, without FCS (at least 64 and the headers).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Packets per second, or "max".
    #[arg(long, default_value = "max")]
    rate: String,
    /// Seconds to transmit.
    #[arg(long)]
    duration: Option<f64>,
    /// Frames to transmit.
    #[arg(long)]
    count: Option<u64>,
    /// Frames per ring operation (1 to 256).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    progress_interval: Duration,
    #[arg(long)]
    quiet: bool,
    /// Bind in copy mode explicitly (the default lets the kernel choose, as kxp does).
    #[arg(long)]
    copy: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("bound").required(true).args(["duration", "until_idle"])))]
struct RxArgs {
    #[arg(long)]
    iface: String,
    /// Accepted for symmetry with tx; the XDP counter sees every queue.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Pin the polling thread (the counting happens in XDP, wherever the kernel runs it).
    #[arg(long)]
    core: Option<usize>,
    /// Seconds to count.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop this many seconds after the last frame (once frames arrived).
    #[arg(long)]
    until_idle: Option<f64>,
    /// With --until-idle: give up if no frame arrives within this many seconds.
    #[arg(long, default_value_t = 60.0)]
    max_wait: f64,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Frames to other destinations count as unexpected.
    #[arg(long)]
    expect_dst_net: Option<IpNet>,
    /// Destinations listed in the report (most frames first).
    #[arg(long, default_value_t = 32)]
    top: usize,
    /// Frames sampled for checksum checks (at most 256).
    #[arg(long, default_value_t = 16)]
    sample: u32,
    /// Write the sampled frames to this pcap file.
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// Written (with the pid) once the counter is attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    progress_interval: Duration,
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Tx(a) => tx(a),
        Cmd::Rx(a) => rx(a),
    };
    if let Err(e) = r {
        eprintln!("pktgen: {e}");
        std::process::exit(1);
    }
}

fn secs(d: Option<f64>, what: &str) -> Result<Option<Duration>, String> {
    match d {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e7 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(format!(
            "--{what} {s}: must be a positive number of seconds"
        )),
    }
}

/// Token bucket over batches: credit grows at `rate` per second of monotonic time, up to
/// `depth` (no long catch-up bursts after a stall).
#[derive(Debug)]
struct Bucket {
    rate: u64,
    depth: u64,
    used: u64,
}

impl Bucket {
    #[inline]
    fn credit(&mut self, elapsed: Duration) -> u64 {
        let earned = (elapsed.as_nanos() * self.rate as u128 / 1_000_000_000) as u64;
        if earned > self.used + self.depth {
            self.used = earned - self.depth;
        }
        earned - self.used
    }

    /// Time until `n` more tokens.
    fn wait_for(&self, elapsed: Duration, n: u64) -> Duration {
        let due_ns = ((self.used + n) as u128 * 1_000_000_000).div_ceil(self.rate as u128);
        Duration::from_nanos(due_ns as u64).saturating_sub(elapsed)
    }
}

fn tx(a: TxArgs) -> Result<(), String> {
    let stop = stop_flag().map_err(|e| format!("signal handlers: {e}"))?;
    let proto = match a.proto {
        ProtoArg::Udp => Proto::Udp,
        ProtoArg::TcpSyn => Proto::TcpSyn,
        ProtoArg::TcpAck => Proto::TcpAck,
    };
    let v6 = matches!(a.src_net, IpNet::V6(_));
    if a.ipv6 && !v6 {
        return Err("--ipv6 given but --src-net is IPv4".into());
    }
    let frontends = parse_frontends(&a.dst)?;
    let templates = Templates::new(proto, v6, a.size, a.src_mac, a.dst_mac, &frontends)
        .map_err(|e| e.to_string())?;
    let rate = match a.rate.as_str() {
        "max" => None,
        r => match r.parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(format!(
                    "--rate {r}: a positive number of packets per second, or max"
                ))
            }
        },
    };
    if !(1..=256).contains(&a.batch) {
        return Err("--batch must be 1 to 256".into());
    }
    let cycle = match (a.new_flows, a.flows) {
        (true, _) => 0,
        (false, Some(n)) if n > 0 => n,
        (false, _) => return Err("give --flows N (N > 0) or --new-flows".into()),
    };
    let duration = secs(a.duration, "duration")?;
    let space = FlowSpace::new(a.src_net, frontends.len());
    if cycle as u128 > space.tuples() {
        return Err(format!(
            "--flows {cycle} exceeds the distinct tuples of {} x {} frontends ({})",
            a.src_net,
            frontends.len(),
            space.tuples()
        ));
    }
    let mut odo = Odometer::new(space, cycle);
    pin(a.core)?;

    let cfg = XskConfig {
        copy: a.copy,
        ..XskConfig::default()
    };
    let mut xsk = Xsk::open(&[&a.iface], a.queue, cfg)?;
    let frame_len = templates.frame_len();
    {
        let Xsk { umem, free, .. } = &mut xsk;
        for d in free.iter_mut() {
            // SAFETY: every descriptor of the free list names a frame of this UMEM that
            // nobody else holds (nothing was produced yet).
            let mut data = unsafe { umem.data_mut(d) };
            data.cursor().set_pos(frame_len);
            templates.init_frame(data.contents_mut());
        }
    }
    let tx_dropped_before = iface_stat(&a.iface, "tx_dropped");
    let ring = cfg.ring_size as usize;
    let mut comp_scratch = vec![FrameDesc::default(); ring];
    let mut staged = vec![FrameDesc::default(); a.batch];
    let limit = a.count.unwrap_or(u64::MAX);
    // Depth: 2 ms of credit (at least a batch, at most a ring), so that a sleep that
    // overshoots is made up for, but a long stall does not turn into a burst.
    let mut bucket = rate.map(|r| Bucket {
        rate: r,
        depth: (r / 500).clamp(a.batch as u64, ring as u64),
        used: 0,
    });
    let (mut produced, mut completed, mut stalls, mut kicks, mut kick_errors) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let cpu_start = kxp_bench::thread_cpu_time();
    let mut per_sec = PerSecond::new(start);
    let mut progress = Progress::new(a.progress_interval, a.quiet, start);
    let stopped_by;
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        if stop.load(Ordering::Relaxed) {
            stopped_by = "signal";
            break;
        }
        if produced >= limit {
            stopped_by = "count";
            break;
        }
        if duration.is_some_and(|d| elapsed >= d) {
            stopped_by = "duration";
            break;
        }
        completed += xsk.complete(0, &mut comp_scratch) as u64;
        let mut want = (a.batch as u64).min(limit - produced);
        if let Some(b) = bucket.as_mut() {
            want = want.min(b.credit(elapsed));
        }
        let mut sent = 0;
        if want > 0 {
            let Xsk { umem, ports, free } = &mut xsk;
            let port = &mut ports[0];
            let room = port.tx.nb_free(want as u32) as u64;
            let n = want.min(room).min(free.len() as u64) as usize;
            if n < want as usize {
                stalls += 1;
            }
            if n > 0 {
                let from = free.len() - n;
                for (slot, d) in staged.iter_mut().zip(&free[from..]) {
                    *slot = *d;
                    // SAFETY: the descriptor came off the free list: a frame of this UMEM
                    // that neither the kernel nor another descriptor holds.
                    let mut data = unsafe { umem.data_mut(slot) };
                    data.cursor().set_pos(frame_len);
                    let frame = data.contents_mut();
                    odo.next(|f, src, sport| templates.write(frame, f, src, sport));
                }
                // SAFETY: the staged descriptors name frames of this UMEM that we own,
                // lengths set; they are the kernel's until they complete.
                let done = unsafe { port.tx.produce(&staged[..n]) };
                // nb_free said there was room for n; anything else would be a ring bug,
                // but keep the frames and count it rather than lose them.
                if done < n {
                    stalls += 1;
                }
                free.truncate(from);
                free.extend_from_slice(&staged[done..n]);
                port.outstanding += done as u64;
                produced += done as u64;
                sent = done as u64;
                if let Some(b) = bucket.as_mut() {
                    b.used += sent;
                }
            }
        }
        let (k, e) = xsk.kick(0);
        kicks += k as u64;
        kick_errors += e as u64;
        per_sec.observe(now, completed);
        progress.tick(now, "tx", completed, || format!("{stalls} ring full"));
        if sent == 0 {
            if let Some(b) = &bucket {
                let next = (a.batch as u64).min(limit - produced).max(1);
                let wait = b.wait_for(elapsed, next);
                if xsk.ports[0].outstanding == 0 && wait > Duration::from_micros(100) {
                    std::thread::sleep(wait.min(Duration::from_millis(1)));
                    continue;
                }
            }
            std::hint::spin_loop();
        }
    }
    let tx_time = start.elapsed();
    let cpu = (kxp_bench::thread_cpu_time() - cpu_start).as_secs_f64();
    per_sec.observe(Instant::now(), completed);
    // Drain: completions for everything produced (bounded: 2 s).
    let drain_until = Instant::now() + Duration::from_secs(2);
    while xsk.ports[0].outstanding > 0 && Instant::now() < drain_until {
        completed += xsk.complete(0, &mut comp_scratch) as u64;
        let (k, e) = xsk.kick(0);
        kicks += k as u64;
        kick_errors += e as u64;
        if xsk.ports[0].outstanding > 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let kernel = xsk.ports[0].kernel_stats().unwrap_or_default();
    let tx_dropped = match (tx_dropped_before, iface_stat(&a.iface, "tx_dropped")) {
        (Some(b), Some(e)) => json!(e.saturating_sub(b)),
        _ => Value::Null,
    };
    let d = tx_time.as_secs_f64();
    let pps = if d > 0.0 { completed as f64 / d } else { 0.0 };
    let mut report = json!({
        "mode": "tx",
        "iface": a.iface,
        "queue": a.queue,
        "core": a.core,
        "proto": proto.as_str(),
        "family": if v6 { "ipv6" } else { "ipv4" },
        "frame_len": frame_len,
        "frontends": frontends.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
        "src_net": a.src_net.to_string(),
        "flows": if cycle == 0 { Value::Null } else { json!(cycle) },
        "new_flows": a.new_flows,
        "tuple_space": space.tuples().to_string(),
        "tuple_wraps": odo.wraps,
        "batch": a.batch,
        "requested_rate": rate.map_or(json!("max"), |r| json!(r)),
        "duration_secs": d,
        "frames": completed,
        "bytes": completed * frame_len as u64,
        "pps": pps,
        "achieved_pps": pps,
        "pps_samples": per_sec.samples,
        "pps_median": median(&per_sec.samples),
        "produced": produced,
        "completions": completed,
        "unfinished": xsk.ports[0].outstanding,
        "ring_full_stalls": stalls,
        // This thread's CPU time while transmitting (user and system: in copy mode the
        // kernel's transmit path runs in the kick's sendto).
        "cpu_secs": cpu,
        "cpu_ns_per_frame": if completed > 0 { cpu * 1e9 / completed as f64 } else { 0.0 },
        "tx_kicks": kicks,
        "tx_kick_errors": kick_errors,
        "iface_tx_dropped": tx_dropped,
        "stopped_by": stopped_by,
    });
    for (n, v) in KERNEL_STAT_NAMES.iter().zip(kernel) {
        report[*n] = json!(v);
    }
    if !a.quiet {
        eprintln!(
            "tx done: {completed} frames in {d:.3} s ({pps:.0} pps), {stalls} ring full, {} unfinished",
            xsk.ports[0].outstanding
        );
    }
    write_report(a.json.as_deref(), &report).map_err(|e| format!("report: {e}"))
}

/// Checksum verdict of one sampled frame, checked with etherparse (independent of the
/// generator's own arithmetic).
#[derive(Debug, PartialEq, Eq)]
enum SampleCheck {
    Ok,
    Bad,
    NotChecked,
}

fn check_sample(frame: &[u8]) -> SampleCheck {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return SampleCheck::NotChecked;
    };
    let good = match (&p.net, &p.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(t)) => {
            let h = ip.header().to_header();
            h.header_checksum == h.calc_header_checksum()
                && match t {
                    TransportSlice::Udp(u) => {
                        u.to_header().calc_checksum_ipv4(&h, u.payload()).ok()
                            == Some(u.to_header().checksum)
                    }
                    TransportSlice::Tcp(s) => {
                        s.to_header().calc_checksum_ipv4(&h, s.payload()).ok()
                            == Some(s.to_header().checksum)
                    }
                    _ => return SampleCheck::NotChecked,
                }
        }
        (Some(NetSlice::Ipv6(ip)), Some(t)) => {
            let h = ip.header().to_header();
            match t {
                TransportSlice::Udp(u) => {
                    u.to_header().calc_checksum_ipv6(&h, u.payload()).ok()
                        == Some(u.to_header().checksum)
                }
                TransportSlice::Tcp(s) => {
                    s.to_header().calc_checksum_ipv6(&h, s.payload()).ok()
                        == Some(s.to_header().checksum)
                }
                _ => return SampleCheck::NotChecked,
            }
        }
        _ => return SampleCheck::NotChecked,
    };
    if good {
        SampleCheck::Ok
    } else {
        SampleCheck::Bad
    }
}

/// A classic pcap file (microsecond timestamps, Ethernet) of the samples.
fn write_pcap(path: &Path, frames: &[Vec<u8>]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(24 + frames.iter().map(|f| 16 + f.len()).sum::<usize>());
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(i as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    std::fs::write(path, out)
}

fn addr_of(k: &[u8; 16]) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(*k);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.into(),
        None => v6.into(),
    }
}

fn rx(a: RxArgs) -> Result<(), String> {
    let stop = stop_flag().map_err(|e| format!("signal handlers: {e}"))?;
    let duration = secs(a.duration, "duration")?;
    let until_idle = secs(a.until_idle, "until-idle")?;
    let max_wait = secs(Some(a.max_wait), "max-wait")?.unwrap_or_default();
    pin(a.core)?;
    let ifindex = bpf::ifindex(&a.iface).map_err(|e| e.to_string())?;
    let mut prog = Bpf::load().map_err(|e| e.to_string())?;
    // The expected destination network, if IPv4, is counted by index (see pktgen.c).
    let window = match a.expect_dst_net {
        Some(IpNet::V4(n)) => Some((
            u32::from(n.network()),
            u32::try_from(1u64 << (32 - n.prefix_len())).unwrap_or(u32::MAX),
        )),
        _ => None,
    };
    prog.configure_sink(a.sample, window)
        .map_err(|e| e.to_string())?;
    let mut samples = prog.sample_reader().map_err(|e| e.to_string())?;
    prog.attach(c"kxpg_sink", &a.iface, ifindex)
        .map_err(|e| e.to_string())?;
    let result = count_frames(&a, &prog, &stop, duration, until_idle, max_wait);
    let captured = samples.drain();
    drop(samples);
    let (run_secs, active, per_sec) = result?;
    let stats = prog.stats().map_err(|e| e.to_string())?;
    let dsts = prog.destinations().map_err(|e| e.to_string())?;
    drop(prog); // detaches
    rx_report(&a, stats, dsts, captured, run_secs, active, per_sec)
}

type CountResult = (f64, Option<(f64, u64)>, Vec<u64>);

/// Polls the frame counter until the run ends. Returns the run time, the active window
/// (first to last frame seen, and the frames in it) and per-second counts from the first
/// frame.
fn count_frames(
    a: &RxArgs,
    prog: &Bpf,
    stop: &AtomicBool,
    duration: Option<Duration>,
    until_idle: Option<Duration>,
    max_wait: Duration,
) -> Result<CountResult, String> {
    write_ready(a.ready_file.as_deref()).map_err(|e| format!("ready file: {e}"))?;
    let start = Instant::now();
    let mut progress = Progress::new(a.progress_interval, a.quiet, start);
    let mut per_sec: Option<PerSecond> = None;
    let mut last = 0u64;
    let mut first_at: Option<Instant> = None;
    let mut last_change = start;
    let poll = Duration::from_millis(2);
    loop {
        let now = Instant::now();
        let s = prog.stats().map_err(|e| e.to_string())?;
        let frames = s[bpf::STAT_FRAMES];
        if frames != last {
            if first_at.is_none() {
                first_at = Some(now);
                per_sec = Some(PerSecond::new(now));
            }
            last = frames;
            last_change = now;
        }
        if let Some(p) = per_sec.as_mut() {
            p.observe(now, frames);
        }
        let unexpected = s[bpf::STAT_NON_IP] + s[bpf::STAT_OTHER_L4] + s[bpf::STAT_MALFORMED];
        progress.tick(now, "rx", frames, || format!("{unexpected} unexpected"));
        if stop.load(Ordering::Relaxed) || duration.is_some_and(|d| now - start >= d) {
            break;
        }
        if let Some(idle) = until_idle {
            if first_at.is_some() && now - last_change >= idle {
                break;
            }
            if first_at.is_none() && now - start >= max_wait {
                break;
            }
        }
        std::thread::sleep(poll);
    }
    let run = start.elapsed().as_secs_f64();
    let active = first_at.map(|f| ((last_change - f).as_secs_f64(), last));
    Ok((run, active, per_sec.map(|p| p.samples).unwrap_or_default()))
}

fn rx_report(
    a: &RxArgs,
    stats: bpf::Stats,
    mut dsts: Vec<([u8; 16], u64)>,
    captured: Vec<Vec<u8>>,
    run_secs: f64,
    active: Option<(f64, u64)>,
    per_sec: Vec<u64>,
) -> Result<(), String> {
    let frames = stats[bpf::STAT_FRAMES];
    dsts.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let counts: Vec<u64> = dsts.iter().map(|d| d.1).collect();
    let outside: u64 = match &a.expect_dst_net {
        Some(net) => dsts
            .iter()
            .filter(|(k, _)| !net.contains(&addr_of(k)))
            .map(|d| d.1)
            .sum(),
        None => 0,
    };
    let (mut ok, mut bad, mut unchecked) = (0u64, 0u64, 0u64);
    for f in &captured {
        match check_sample(f) {
            SampleCheck::Ok => ok += 1,
            SampleCheck::Bad => bad += 1,
            SampleCheck::NotChecked => unchecked += 1,
        }
    }
    if let Some(p) = &a.pcap {
        write_pcap(p, &captured).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // The rate over the window frames arrived in (with --duration, the whole run).
    let window = match (a.until_idle, active) {
        (Some(_), Some((w, _))) if w > 0.0 => w,
        _ => run_secs,
    };
    let pps = if window > 0.0 {
        frames as f64 / window
    } else {
        0.0
    };
    let unexpected =
        stats[bpf::STAT_NON_IP] + stats[bpf::STAT_OTHER_L4] + stats[bpf::STAT_MALFORMED] + outside;
    let mut xdp = serde_json::Map::new();
    for (n, v) in bpf::STAT_NAMES.iter().zip(stats) {
        if !n.starts_with("redirect") && *n != "no_socket" {
            xdp.insert(n.to_string(), json!(v));
        }
    }
    let report = json!({
        "mode": "rx",
        "iface": a.iface,
        "duration_secs": run_secs,
        "active_secs": active.map(|w| w.0),
        "frames": frames,
        "bytes": stats[bpf::STAT_BYTES],
        "pps": pps,
        "pps_samples": per_sec,
        "pps_median": median(&per_sec),
        "per_dst": {
            "distinct": dsts.len(),
            "min": counts.last().copied().unwrap_or(0),
            "max": counts.first().copied().unwrap_or(0),
            "median": median(&counts),
            "top": dsts.iter().take(a.top).map(|(k, n)| json!({"dst": addr_of(k).to_string(), "frames": n})).collect::<Vec<_>>(),
            "table_full": stats[bpf::STAT_DST_TABLE_FULL],
        },
        "expect_dst_net": a.expect_dst_net.map(|n| n.to_string()),
        "unexpected": {
            "total": unexpected,
            "non_ip": stats[bpf::STAT_NON_IP],
            "other_l4": stats[bpf::STAT_OTHER_L4],
            "malformed": stats[bpf::STAT_MALFORMED],
            "outside_expected_net": outside,
        },
        "samples": {
            "captured": captured.len(),
            "checksum_ok": ok,
            "checksum_bad": bad,
            "not_checked": unchecked,
            "ring_full": stats[bpf::STAT_SAMPLE_RING_FULL],
        },
        "xdp": xdp,
    });
    if !a.quiet {
        eprintln!(
            "rx done: {frames} frames ({pps:.0} pps), {} destinations, {unexpected} unexpected, \
             samples {ok} ok / {bad} bad checksums",
            dsts.len()
        );
    }
    write_report(a.json.as_deref(), &report).map_err(|e| format!("report: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_and_caps_bursts() {
        let mut b = Bucket {
            rate: 1_000_000,
            depth: 64,
            used: 0,
        };
        assert_eq!(b.credit(Duration::from_micros(10)), 10);
        b.used += 10;
        assert_eq!(b.credit(Duration::from_micros(10)), 0);
        assert_eq!(
            b.wait_for(Duration::from_micros(10), 64),
            Duration::from_micros(64)
        );
        // A long stall earns at most one batch.
        assert_eq!(b.credit(Duration::from_secs(1)), 64);
        b.used += 64;
        assert_eq!(b.credit(Duration::from_secs(1)), 0);
    }

    #[test]
    fn samples_are_checked_independently() {
        let t = Templates::new(
            Proto::Udp,
            false,
            64,
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            &["10.96.0.1:53".parse().unwrap()],
        )
        .unwrap();
        let mut f = vec![0u8; 64];
        t.init_frame(&mut f);
        t.write(&mut f, 0, &[10, 0, 0, 9], 4000);
        assert_eq!(check_sample(&f), SampleCheck::Ok);
        f[40] ^= 1;
        assert_eq!(check_sample(&f), SampleCheck::Bad);
        assert_eq!(check_sample(&[0u8; 10]), SampleCheck::NotChecked);
    }
}
