//! `xdp_fwd`: the do-nothing AF_XDP forwarder, the ceiling of kxp's design on a box.
//!
//! Every frame received on `--in` is transmitted on `--out`, unchanged except its
//! Ethernet destination (and, with `--out-src-mac`, source) address. It uses what kxp's
//! driver uses, minus the pipeline: xsk-rs, one UMEM shared by the two sockets, batches
//! of 64, need_wakeup with the same fill-ring wakeups and the same TX policy ("kick while
//! anything is outstanding", more kicks in a round while the TX ring still holds unsent
//! frames, kick and retry before dropping a frame the TX ring has no room for, bounded by
//! `--tx-kicks`), the same loop order (per socket: completions, fill, receive,
//! transmit; then kicks) and the same idle policy (spin `--busy-poll-us`, then sleep in
//! `poll` up to `--idle-sleep-us`; `--busy-poll` never sleeps). The XDP program
//! redirects every frame to the socket of its queue (counted), where kxp's steering
//! program would first look the destination up.
//!
//! Frames arriving on `--out` are dropped and counted; so are frames the TX ring has no
//! room for. Runs for `--duration` or until SIGINT/SIGTERM, then prints a JSON report
//! (stdout or `--json`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use xsk_rs::FrameDesc;

use kxp_bench::pktgen::bpf::{self, Bpf};
use kxp_bench::pktgen::xsk::{Xsk, XskConfig, KERNEL_STAT_NAMES};
use kxp_bench::pktgen::{
    median, parse_duration, parse_mac, pin, stop_flag, write_ready, write_report, PerSecond,
    Progress,
};

/// kxp's batch size (`pipeline::BATCH_SIZE`).
const BATCH: usize = kxp_dataplane::pipeline::BATCH_SIZE;
const IN: usize = 0;
const OUT: usize = 1;

#[derive(Debug, Parser)]
#[command(
    name = "xdp_fwd",
    about = "do-nothing AF_XDP two-port forwarder (bench ceiling)"
)]
struct Args {
    #[arg(long = "in")]
    in_iface: String,
    #[arg(long = "out")]
    out_iface: String,
    #[arg(long, value_parser = parse_mac)]
    out_dst_mac: [u8; 6],
    #[arg(long, value_parser = parse_mac)]
    out_src_mac: Option<[u8; 6]>,
    #[arg(long)]
    core: Option<usize>,
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Seconds to run (default: until SIGINT/SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Never sleep: spin on the rings all the time.
    #[arg(long)]
    busy_poll: bool,
    /// Without --busy-poll: keep spinning this long after the last frame (kxp's default).
    #[arg(long, default_value_t = 200)]
    busy_poll_us: u64,
    /// Without --busy-poll: longest sleep when idle (kxp's default).
    #[arg(long, default_value_t = 2000)]
    idle_sleep_us: u64,
    /// Bind in copy mode explicitly (the default lets the kernel choose, as kxp does).
    #[arg(long)]
    copy: bool,
    /// Most TX kicks per socket per round, and per staged batch that finds the TX ring
    /// full (kxp's driver: 8). Copy-mode TX sends a bounded batch, 32 frames, per kick;
    /// after the first kick (made while anything is outstanding) more are made only while
    /// the ring still holds frames the kernel has not taken and the last kick made
    /// progress. Completions are reaped between kicks. 1 to 16; 1 is the old policy (one
    /// kick per round, staged frames that find the ring full are dropped at once).
    #[arg(long, default_value_t = 8)]
    tx_kicks: u32,
    /// Written (with the pid) once both sockets are up and XDP is attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    progress_interval: Duration,
    #[arg(long)]
    quiet: bool,
}

/// Everything the forwarder counts. Every frame taken from an RX ring is either
/// transmitted or counted under one of the drop counters.
#[derive(Debug, Default)]
struct Counters {
    rx: u64,
    tx: u64,
    tx_completed: u64,
    tx_ring_full: u64,
    /// Kicks made because staged frames found the TX ring full (then produced again).
    tx_full_kicks: u64,
    out_rx_dropped: u64,
    multi_buffer: u64,
    runt: u64,
    tx_kicks: u64,
    tx_kick_errors: u64,
    fill_wakeups: u64,
    idle_sleeps: u64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("xdp_fwd: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    let stop = stop_flag().map_err(|e| format!("signal handlers: {e}"))?;
    let duration = match a.duration {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s < 1e7 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(format!(
                "--duration {s}: must be a positive number of seconds"
            ))
        }
    };
    if !(1..=16).contains(&a.tx_kicks) {
        return Err("--tx-kicks must be 1 to 16".into());
    }
    if a.in_iface == a.out_iface {
        return Err("--in and --out must differ".into());
    }
    pin(a.core)?;
    let in_index = bpf::ifindex(&a.in_iface).map_err(|e| e.to_string())?;
    let out_index = bpf::ifindex(&a.out_iface).map_err(|e| e.to_string())?;
    let cfg = XskConfig {
        copy: a.copy,
        ..XskConfig::default()
    };
    let mut xsk = Xsk::open(&[&a.in_iface, &a.out_iface], a.queue, cfg)?;
    let mut progs = Vec::new();
    for (i, (name, index)) in [(&a.in_iface, in_index), (&a.out_iface, out_index)]
        .into_iter()
        .enumerate()
    {
        let mut p = Bpf::load().map_err(|e| e.to_string())?;
        p.set_socket(a.queue, xsk.ports[i].fd())
            .map_err(|e| e.to_string())?;
        p.attach(c"kxpg_redirect", name, index)
            .map_err(|e| e.to_string())?;
        progs.push(p);
    }
    let mut c = Counters::default();
    for i in [IN, OUT] {
        for _ in 0..cfg.ring_size as usize / BATCH {
            c.fill_wakeups += xsk.refill(i, BATCH) as u64;
        }
    }
    write_ready(a.ready_file.as_deref()).map_err(|e| format!("ready file: {e}"))?;

    let ring = cfg.ring_size;
    let mut descs = [FrameDesc::default(); BATCH];
    let mut staged = [FrameDesc::default(); BATCH];
    let busy = Duration::from_micros(a.busy_poll_us);
    let sleep_ms = a.idle_sleep_us.div_ceil(1000).max(1) as i32;
    let mut pollfds = [
        libc::pollfd {
            fd: xsk.ports[IN].fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: xsk.ports[OUT].fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let start = Instant::now();
    let cpu_start = kxp_bench::thread_cpu_time();
    let mut per_sec = PerSecond::new(start);
    let mut progress = Progress::new(a.progress_interval, a.quiet, start);
    let mut last_work = start;
    let (mut first_rx, mut last_rx) = (None, start);
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) || duration.is_some_and(|d| now - start >= d) {
            break;
        }
        let mut work = 0;
        for i in [IN, OUT] {
            c.tx_completed += xsk.complete(i, &mut descs) as u64;
            c.fill_wakeups += xsk.refill(i, BATCH) as u64;
            let Xsk { umem, ports, free } = &mut xsk;
            // SAFETY: `descs` is ours to overwrite; it receives frames of this UMEM that
            // the kernel hands back.
            let n = unsafe { ports[i].rx.consume(&mut descs) };
            if n == 0 {
                continue;
            }
            work += n;
            if i == OUT {
                c.out_rx_dropped += n as u64;
                free.extend_from_slice(&descs[..n]);
                continue;
            }
            c.rx += n as u64;
            let mut staged_len = 0;
            for d in descs[..n].iter_mut() {
                if d.has_more_frames() {
                    c.multi_buffer += 1;
                    free.push(*d);
                    continue;
                }
                // SAFETY: `d` was just consumed from an RX ring of this UMEM: the kernel
                // is done with the frame and no other descriptor names it.
                let mut data = unsafe { umem.data_mut(d) };
                let frame = data.contents_mut();
                if frame.len() < 14 {
                    c.runt += 1;
                    free.push(*d);
                    continue;
                }
                frame[0..6].copy_from_slice(&a.out_dst_mac);
                if let Some(m) = &a.out_src_mac {
                    frame[6..12].copy_from_slice(m);
                }
                staged[staged_len] = *d;
                staged_len += 1;
            }
            let mut sent = 0;
            for attempt in 0..a.tx_kicks {
                if attempt > 0 {
                    let (k, e) = xsk.kick(OUT);
                    c.tx_kicks += k as u64;
                    c.tx_full_kicks += k as u64;
                    c.tx_kick_errors += e as u64;
                    if !k || e {
                        break;
                    }
                    c.tx_completed += xsk.complete(OUT, &mut descs) as u64;
                }
                let out = &mut xsk.ports[OUT];
                // SAFETY: every staged descriptor names a frame of this UMEM we own,
                // length set by the kernel on receive; produced frames are the kernel's
                // until they complete.
                let done = unsafe { out.tx.produce(&staged[sent..staged_len]) };
                out.outstanding += done as u64;
                sent += done;
                if sent == staged_len {
                    break;
                }
            }
            c.tx += sent as u64;
            c.tx_ring_full += (staged_len - sent) as u64;
            xsk.free.extend_from_slice(&staged[sent..staged_len]);
        }
        for i in [IN, OUT] {
            let mut unsent = u32::MAX;
            for _ in 0..a.tx_kicks {
                let (k, e) = xsk.kick(i);
                c.tx_kicks += k as u64;
                c.tx_kick_errors += e as u64;
                if !k || e {
                    break;
                }
                c.tx_completed += xsk.complete(i, &mut descs) as u64;
                let left = ring - xsk.ports[i].tx.nb_free_exact().min(ring);
                if left == 0 || left >= unsent {
                    break;
                }
                unsent = left;
            }
        }
        if work > 0 {
            first_rx.get_or_insert(now);
            last_rx = now;
        }
        per_sec.observe(now, c.tx);
        progress.tick(now, "fwd", c.tx, || {
            format!(
                "rx {}, dropped {}",
                c.rx,
                c.tx_ring_full + c.out_rx_dropped + c.multi_buffer + c.runt
            )
        });
        if work > 0 || xsk.ports.iter().any(|p| p.outstanding > 0) {
            last_work = now;
        } else if !a.busy_poll && now - last_work >= busy {
            c.idle_sleeps += 1;
            // SAFETY: pollfds is a live array of two pollfd structs.
            let _ = unsafe { libc::poll(pollfds.as_mut_ptr(), 2, sleep_ms) };
            last_work = Instant::now();
        }
    }
    let run_secs = start.elapsed().as_secs_f64();
    let cpu = (kxp_bench::thread_cpu_time() - cpu_start).as_secs_f64();
    let active = first_rx.map(|f| (last_rx - f).as_secs_f64());
    let xdp: Vec<_> = progs
        .iter()
        .map(|p| p.stats().unwrap_or_default())
        .collect();
    let kernel: Vec<_> = xsk
        .ports
        .iter()
        .map(|p| p.kernel_stats().unwrap_or_default())
        .collect();
    drop(progs); // detach first, then the sockets close
    let window = active.filter(|w| *w > 0.0).unwrap_or(run_secs);
    let pps = c.tx as f64 / window;
    let port_report = |i: usize, name: &str| {
        let mut m = serde_json::Map::new();
        m.insert("iface".into(), json!(name));
        m.insert("xdp_redirected".into(), json!(xdp[i][bpf::STAT_REDIRECTED]));
        m.insert("xdp_no_socket".into(), json!(xdp[i][bpf::STAT_NO_SOCKET]));
        for (n, v) in KERNEL_STAT_NAMES.iter().zip(kernel[i]) {
            m.insert(n.to_string(), json!(v));
        }
        serde_json::Value::Object(m)
    };
    let report = json!({
        "mode": "xdp_fwd",
        "in": port_report(IN, &a.in_iface),
        "out": port_report(OUT, &a.out_iface),
        "core": a.core,
        "queue": a.queue,
        "busy_poll": a.busy_poll,
        "tx_kicks_per_round": a.tx_kicks,
        "batch": BATCH,
        "duration_secs": run_secs,
        "active_secs": active,
        "rx": c.rx,
        "tx": c.tx,
        "frames": c.tx,
        "tx_completed": c.tx_completed,
        "dropped": {
            "total": c.tx_ring_full + c.out_rx_dropped + c.multi_buffer + c.runt,
            "tx_ring_full": c.tx_ring_full,
            "out_rx": c.out_rx_dropped,
            "multi_buffer": c.multi_buffer,
            "runt": c.runt,
        },
        "pps": pps,
        "pps_samples": per_sec.samples,
        "pps_median": median(&per_sec.samples),
        // This thread's CPU time (user and system, copy-mode transmit included; idle
        // spinning included too, so compare it with --busy-poll in mind).
        "cpu_secs": cpu,
        "cpu_ns_per_frame": if c.tx > 0 { cpu * 1e9 / c.tx as f64 } else { 0.0 },
        "tx_kicks": c.tx_kicks,
        "tx_kick_errors": c.tx_kick_errors,
        "tx_full_kicks": c.tx_full_kicks,
        "fill_wakeups": c.fill_wakeups,
        "idle_sleeps": c.idle_sleeps,
    });
    if !a.quiet {
        eprintln!(
            "xdp_fwd done: rx {} tx {} ({pps:.0} pps), dropped: ring full {}, on out {}",
            c.rx, c.tx, c.tx_ring_full, c.out_rx_dropped
        );
    }
    write_report(a.json.as_deref(), &report).map_err(|e| format!("report: {e}"))
}
