//! The bench tools that move real frames: `pktgen` (an AF_XDP transmitter and an XDP
//! receive counter) and `xdp_fwd` (a do-nothing AF_XDP forwarder, the ceiling of kxp's
//! design on a box). This module holds what the two binaries share:
//!
//! * [`frame`]: templates, per-packet source rewrite with complete checksums;
//! * [`flows`]: the 5-tuple odometer (`--flows N` / `--new-flows`);
//! * [`bpf`]: the XDP sink and redirect programs (`bench/bpf/pktgen.c`);
//! * [`xsk`]: one UMEM, sockets on it, the kick and completion bookkeeping;
//! * run plumbing: CLI value parsers, pinning, stop on SIGINT/SIGTERM, per-second rate
//!   samples, progress lines, JSON output.
//!
//! Nothing here runs per packet except [`frame::Templates::write`],
//! [`flows::Odometer::next`] and the ring operations; they neither allocate nor lock.

pub mod bpf;
pub mod flows;
pub mod frame;
pub mod xsk;

use core::net::SocketAddr;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: bad byte {p:?}"))?;
    }
    Ok(m)
}

/// Frontends: `ip:port,ip:port` (IPv6 as `[addr]:port`), or `@FILE` with one per line
/// (blank lines and `#` comments skipped).
pub fn parse_frontends(s: &str) -> Result<Vec<SocketAddr>, String> {
    let text;
    let items: Vec<&str> = if let Some(path) = s.strip_prefix('@') {
        text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        text.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        s.split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    };
    if items.is_empty() {
        return Err("no frontends given".into());
    }
    items
        .iter()
        .map(|i| {
            i.parse::<SocketAddr>()
                .map_err(|_| format!("{i:?} is not ip:port ([v6]:port for IPv6)"))
        })
        .collect()
}

/// A duration: `1s`, `250ms`, `2.5` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (1s, 250ms, 2.5)"))?;
    if !(v.is_finite() && v > 0.0 && v * unit < 1e7) {
        return Err(format!("{s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(v * unit))
}

/// Pins this thread to `core`, if given.
pub fn pin(core: Option<usize>) -> Result<(), String> {
    let Some(id) = core else { return Ok(()) };
    let known = core_affinity::get_core_ids().unwrap_or_default();
    if !known.iter().any(|c| c.id == id) {
        return Err(format!("core {id} is not available to this process"));
    }
    if core_affinity::set_for_current(core_affinity::CoreId { id }) {
        Ok(())
    } else {
        Err(format!("pinning to core {id} failed"))
    }
}

/// A flag SIGINT and SIGTERM set: runs end cleanly (report written). A second signal of
/// either kind exits at once.
pub fn stop_flag() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// Frames per whole second since the start.
#[derive(Debug)]
pub struct PerSecond {
    start: Instant,
    next_mark: Instant,
    at_mark: u64,
    pub samples: Vec<u64>,
}

impl PerSecond {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            next_mark: start + Duration::from_secs(1),
            at_mark: 0,
            samples: Vec::with_capacity(4096),
        }
    }

    /// Records `total` at `now`; closes every whole second that has passed (a late call
    /// attributes what arrived to the first second it closes).
    #[inline]
    pub fn observe(&mut self, now: Instant, total: u64) {
        while now >= self.next_mark {
            if self.samples.len() < self.samples.capacity() {
                self.samples.push(total - self.at_mark);
            }
            self.at_mark = total;
            self.next_mark += Duration::from_secs(1);
        }
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        now - self.start
    }
}

/// Median of `v` (mean of the middle two for an even count); 0 for none.
pub fn median(v: &[u64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2] as f64
    } else {
        (s[n / 2 - 1] as f64 + s[n / 2] as f64) / 2.0
    }
}

/// A progress line on stderr every `interval` (unless quiet).
#[derive(Debug)]
pub struct Progress {
    interval: Duration,
    quiet: bool,
    last: Instant,
    last_total: u64,
}

impl Progress {
    pub fn new(interval: Duration, quiet: bool, start: Instant) -> Self {
        Self {
            interval,
            quiet,
            last: start,
            last_total: 0,
        }
    }

    /// Prints `<prefix> <pps> pps, <total> frames, <suffix>` if an interval has passed.
    #[inline]
    pub fn tick(
        &mut self,
        now: Instant,
        prefix: &str,
        total: u64,
        suffix: impl FnOnce() -> String,
    ) {
        if now - self.last < self.interval {
            return;
        }
        let dt = (now - self.last).as_secs_f64();
        let pps = (total - self.last_total) as f64 / dt;
        self.last = now;
        self.last_total = total;
        if !self.quiet {
            eprintln!("{prefix} {pps:.0} pps, {total} frames, {}", suffix());
        }
    }
}

/// Writes `report` as pretty JSON to `path`, or to stdout.
pub fn write_report(path: Option<&Path>, report: &serde_json::Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(io::Error::other)?;
    match path {
        Some(p) => std::fs::write(p, text + "\n"),
        None => {
            let mut out = io::stdout().lock();
            writeln!(out, "{text}")
        }
    }
}

/// Writes a ready file (the pid) once a tool is attached and waiting, for harnesses.
pub fn write_ready(path: Option<&Path>) -> io::Result<()> {
    match path {
        Some(p) => std::fs::write(p, format!("{}\n", std::process::id())),
        None => Ok(()),
    }
}

/// An interface's kernel counter (`/sys/class/net/IF/statistics/NAME`), if readable.
pub fn iface_stat(iface: &str, name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01").unwrap(),
            [2, 0, 0x0a, 0xff, 0, 1]
        );
        assert!(parse_mac("02:00:0a:ff:00").is_err());
        assert!(parse_mac("02:00:0a:ff:00:zz").is_err());
        let f = parse_frontends("10.96.0.1:80, [fd00::1]:53").unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[1].is_ipv6());
        assert!(parse_frontends("10.96.0.1").is_err());
        assert!(parse_frontends("").is_err());
        let dir = std::env::temp_dir().join(format!("kxpg-fe-{}", std::process::id()));
        std::fs::write(&dir, "# frontends\n10.96.0.1:80\n\n10.96.0.2:80 # b\n").unwrap();
        let f = parse_frontends(&format!("@{}", dir.display())).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2.5").unwrap(), Duration::from_millis(2500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn per_second_and_median() {
        let t0 = Instant::now();
        let mut p = PerSecond::new(t0);
        p.observe(t0 + Duration::from_millis(500), 50);
        p.observe(t0 + Duration::from_millis(1000), 100);
        p.observe(t0 + Duration::from_millis(3100), 400);
        assert_eq!(p.samples, [100, 300, 0]);
        assert_eq!(median(&[5, 1, 3]), 3.0);
        assert_eq!(median(&[4, 1, 3, 2]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
