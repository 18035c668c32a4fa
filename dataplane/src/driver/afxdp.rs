//! AF_XDP driver: moves frames between AF_XDP sockets and a [`Worker`], in batches, with
//! no copy in userspace on the forwarding path.
//!
//! # Shape
//!
//! One [`AfxdpWorker`] per worker thread, bound to one receive queue of every interface
//! it serves (the uplink and the pods' veths). It owns one UMEM shared by all its sockets
//! (xsk-rs: the same `Umem` passed to each `Socket::new`; each socket is on a different
//! device, so each gets its own fill and completion rings). A frame received on one socket
//! is rewritten in place and transmitted on another by handing its descriptor to that
//! socket's TX ring: frames never leave the UMEM and are never copied, except in two
//! cases, both counted: a VLAN tag was removed (the verdict's `start` is 4 and xsk-rs does
//! not let a descriptor's address move, so the frame is shifted down by 4 bytes), and a
//! reject (the ICMP answer the pipeline wrote to scratch is copied into the frame that
//! carried the rejected packet, and sent back out of the ingress socket).
//!
//! # The loop ([`AfxdpWorker::run`])
//!
//! Each round, for every socket: reclaim TX completions into the free list, top up the
//! fill ring from the free list, take up to [`BATCH_SIZE`] received frames through the
//! pipeline, and stage the forwarded ones on their egress socket. After each batch the
//! staged frames are produced to their TX rings, the reply tuples of new untranslated
//! flows are written to the steering map (one system call), and only then is any TX
//! kicked, so a reply can never overtake its steering entry. Every round kicks every
//! socket whose produced-minus-completed count is above zero: copy-mode TX sends a bounded
//! number of frames per `sendto`, and frames left in the ring would otherwise wait forever
//! (AFXDP-NOTES trap 2). Between rounds: table refresh (one atomic load), conntrack
//! housekeeping, revalidation after a table change, reply-map sweeping. With nothing to do
//! for [`IdlePolicy::busy_poll`], the worker sleeps in `ppoll` on its sockets for at most
//! [`IdlePolicy::max_sleep`].
//!
//! # Checksums (AFXDP-NOTES trap 1)
//!
//! A veth whose peer has TX checksum offload on (every pod's `eth0` by default) delivers
//! TCP/UDP frames whose checksum field holds only the pseudo-header sum
//! (CHECKSUM_PARTIAL); AF_XDP sees those raw bytes. The pipeline's incremental update is
//! only right for a complete checksum, so for interfaces marked
//! [`PortSpec::recompute_l4_checksum`] (`kxp run` marks veths) the driver recomputes the
//! full TCP/UDP checksum of every frame it forwards from them. That is correct whether
//! the sender's offload is on or off, so pods need no changes; turning offload off on the
//! pod side (`ethtool -K eth0 tx off`) and unmarking the interface saves the recompute.
//!
//! # Passed frames
//!
//! A frame that reached the socket belongs to kxp by the steering program's rules (see
//! [`steer`]), so the pipeline rarely passes one (a late packet of a purged flow, a table
//! generation the steering maps are ahead of). AF_XDP has no way to give a frame back to
//! the kernel's receive path, so such frames are dropped and counted
//! ([`DriverCounters::pass_not_reinjected`]), next to the pipeline's pass reason.

pub mod steer;

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::checksum::{checksum, pseudo_header_sum};
use crate::flow::FlowKey;
use crate::parse::{parse, Parsed};
use crate::pipeline::{Tables, Worker, BATCH_SIZE};
use crate::publish::TableSubscriber;
use crate::reject::REJECT_SCRATCH_LEN;
use crate::tables::IfaceId;
use crate::verdict::{ForwardReason, Verdict};
use crate::wire::{ipv4, ipv6, proto};

use steer::{ReplyMap, TupleKey};

/// How a socket binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// Let the kernel pick (zero-copy where the driver has it, else copy).
    Auto,
    /// Copy mode (what veth offers).
    Copy,
    /// Zero-copy; binding fails where the driver lacks it.
    ZeroCopy,
}

/// When a worker with nothing to do stops spinning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdlePolicy {
    /// Keep polling the rings this long after the last frame before sleeping.
    pub busy_poll: Duration,
    /// Longest sleep in `ppoll` (also bounds how late a table change or a stop request is
    /// noticed on an idle worker).
    pub max_sleep: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        Self {
            busy_poll: Duration::from_micros(200),
            max_sleep: Duration::from_millis(2),
        }
    }
}

/// Sizing of a worker's UMEM and rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfxdpConfig {
    /// UMEM frame size: a power of two, at least 2048 (256 bytes of it are XDP headroom).
    pub frame_size: u32,
    /// UMEM frames per socket (the UMEM holds this times the number of sockets).
    pub frames_per_socket: u32,
    /// Size of every RX, TX, fill and completion ring (a power of two).
    pub ring_size: u32,
    pub bind_mode: BindMode,
    pub idle: IdlePolicy,
    /// Reply tuples one worker tracks for sweeping out of the steering map.
    pub reply_capacity: usize,
}

impl Default for AfxdpConfig {
    fn default() -> Self {
        Self {
            frame_size: 2048,
            frames_per_socket: 4096,
            ring_size: 2048,
            bind_mode: BindMode::Auto,
            idle: IdlePolicy::default(),
            reply_capacity: 1 << 16,
        }
    }
}

/// One interface a worker opens a socket on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Its id in the node table (what verdicts name).
    pub iface: IfaceId,
    /// Kernel interface name.
    pub name: String,
    /// Recompute full TCP/UDP checksums of frames forwarded from this interface (see the
    /// module docs: veths whose peers offload checksums).
    pub recompute_l4_checksum: bool,
}

/// Setting up a worker's sockets failed.
#[derive(Debug)]
pub enum AfxdpError {
    Config(String),
    Umem(String),
    Socket { iface: String, err: String },
}

impl core::fmt::Display for AfxdpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Config(m) => write!(f, "AF_XDP configuration: {m}"),
            Self::Umem(m) => write!(f, "AF_XDP UMEM: {m}"),
            Self::Socket { iface, err } => write!(f, "AF_XDP socket on {iface}: {err}"),
        }
    }
}

impl std::error::Error for AfxdpError {}

fn describe(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

/// The driver's own counters (the pipeline's are in [`Worker::counters`]). Every frame
/// taken from a ring that does not go out again is counted under one of them or under a
/// pipeline drop reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverCounters {
    /// Frames taken from RX rings.
    pub rx_frames: u64,
    /// Frames produced to TX rings (forwards and rejects).
    pub tx_frames: u64,
    /// TX descriptors the kernel completed.
    pub tx_completed: u64,
    /// Frames dropped because the egress TX ring was full.
    pub tx_ring_full: u64,
    /// Forwards to an interface this worker has no socket on (a host interface).
    pub no_egress_socket: u64,
    /// Frames the pipeline passed to the kernel, dropped (AF_XDP cannot re-inject).
    pub pass_not_reinjected: u64,
    /// Frames shifted by 4 bytes after a VLAN tag was removed.
    pub vlan_shift_copies: u64,
    /// Full TCP/UDP checksums recomputed (frames from veths).
    pub l4_checksums_recomputed: u64,
    /// Reject answers larger than a UMEM frame (dropped).
    pub reject_too_large: u64,
    /// Multi-buffer frames (not bound for, dropped).
    pub multi_buffer: u64,
    /// TX wakeups (`sendto`) issued.
    pub tx_kicks: u64,
    /// TX wakeups that failed with an unexpected error.
    pub tx_kick_errors: u64,
    /// Fill-ring wakeups issued.
    pub fill_wakeups: u64,
    /// Sleeps in `ppoll` after the busy-poll period.
    pub idle_sleeps: u64,
    /// Reply tuples written to the steering map / removed from it.
    pub reply_tuples_added: u64,
    pub reply_tuples_removed: u64,
    /// Reply tuples that could not be written (map error) or tracked (shadow full: the
    /// map's LRU eviction then cleans them up).
    pub reply_map_errors: u64,
    pub reply_shadow_full: u64,
    /// The kernel's own counts for this worker's sockets (`XDP_STATISTICS`, summed):
    /// frames dropped for want of RX ring or fill ring space, invalid descriptors.
    pub kernel_rx_dropped: u64,
    pub kernel_rx_ring_full: u64,
    pub kernel_fill_ring_empty: u64,
    pub kernel_rx_invalid: u64,
    pub kernel_tx_invalid: u64,
}

impl DriverCounters {
    pub fn merge(&mut self, o: &Self) {
        for ((_, a), (_, b)) in self.fields_mut().into_iter().zip(o.named()) {
            *a += b;
        }
    }

    fn fields_mut(&mut self) -> [(&'static str, &mut u64); 23] {
        [
            ("rx_frames", &mut self.rx_frames),
            ("tx_frames", &mut self.tx_frames),
            ("tx_completed", &mut self.tx_completed),
            ("tx_ring_full", &mut self.tx_ring_full),
            ("no_egress_socket", &mut self.no_egress_socket),
            ("pass_not_reinjected", &mut self.pass_not_reinjected),
            ("vlan_shift_copies", &mut self.vlan_shift_copies),
            ("l4_checksums_recomputed", &mut self.l4_checksums_recomputed),
            ("reject_too_large", &mut self.reject_too_large),
            ("multi_buffer", &mut self.multi_buffer),
            ("tx_kicks", &mut self.tx_kicks),
            ("tx_kick_errors", &mut self.tx_kick_errors),
            ("fill_wakeups", &mut self.fill_wakeups),
            ("idle_sleeps", &mut self.idle_sleeps),
            ("reply_tuples_added", &mut self.reply_tuples_added),
            ("reply_tuples_removed", &mut self.reply_tuples_removed),
            ("reply_map_errors", &mut self.reply_map_errors),
            ("reply_shadow_full", &mut self.reply_shadow_full),
            ("kernel_rx_dropped", &mut self.kernel_rx_dropped),
            ("kernel_rx_ring_full", &mut self.kernel_rx_ring_full),
            ("kernel_fill_ring_empty", &mut self.kernel_fill_ring_empty),
            ("kernel_rx_invalid", &mut self.kernel_rx_invalid),
            ("kernel_tx_invalid", &mut self.kernel_tx_invalid),
        ]
    }

    /// (name, value) of every counter.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let mut c = self.clone();
        c.fields_mut().into_iter().map(|(n, v)| (n, *v)).collect()
    }
}

/// One socket: its rings and how many of its TX frames the kernel still holds.
#[derive(Debug)]
struct Port {
    iface: IfaceId,
    name: String,
    tx: TxQueue,
    rx: RxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// Produced to TX minus completed.
    outstanding: u64,
    recompute_l4: bool,
    /// Frames to transmit on this socket after the current batch.
    staged: [FrameDesc; BATCH_SIZE],
    staged_len: usize,
}

/// Reply tuples of new flows kxp did not masquerade, on their way to the steering map,
/// and the ones already there (to remove them when their flow goes).
#[derive(Debug)]
struct ReplySteer {
    map: ReplyMap,
    snat: (u16, u16),
    pending: [TupleKey; BATCH_SIZE],
    pending_flows: [FlowKey; BATCH_SIZE],
    pending_len: usize,
    values: [u32; BATCH_SIZE],
    /// Reply tuples in the map, swept against conntrack.
    shadow: Vec<FlowKey>,
    cursor: usize,
    dead: [TupleKey; SWEEP_BUDGET],
}

const SWEEP_BUDGET: usize = 64;

impl ReplySteer {
    /// Notes the reply tuple of a new flow whose first frame (rewritten) is `frame`,
    /// unless replies reach the worker by its SNAT port range anyway.
    fn note(&mut self, frame: &[u8], t: &Tables) {
        let Ok(Parsed::Transport { key, .. }) = parse(frame) else {
            return;
        };
        let reply = key.reversed();
        if t.node.is_node_address(&reply.dst) && (self.snat.0..=self.snat.1).contains(&reply.dport)
        {
            return;
        }
        if self.pending_len < BATCH_SIZE {
            self.pending[self.pending_len] = TupleKey::of(&reply);
            self.pending_flows[self.pending_len] = reply;
            self.pending_len += 1;
        }
    }

    /// Writes the pending tuples in one system call.
    fn flush(&mut self, c: &mut DriverCounters) {
        let n = self.pending_len;
        if n == 0 {
            return;
        }
        self.pending_len = 0;
        match self.map.insert_batch(&self.pending[..n], &self.values[..n]) {
            Ok(done) => {
                c.reply_tuples_added += done as u64;
                c.reply_map_errors += (n - done) as u64;
            }
            Err(_) => c.reply_map_errors += n as u64,
        }
        for f in &self.pending_flows[..n] {
            if self.shadow.len() < self.shadow.capacity() {
                self.shadow.push(*f);
            } else {
                c.reply_shadow_full += 1;
            }
        }
    }

    /// Removes up to [`SWEEP_BUDGET`] tuples whose flow conntrack no longer holds.
    fn sweep(&mut self, worker: &Worker, now_ns: u64, c: &mut DriverCounters) {
        let mut dead = 0;
        for _ in 0..SWEEP_BUDGET.min(self.shadow.len()) {
            if self.cursor >= self.shadow.len() {
                self.cursor = 0;
            }
            let f = self.shadow[self.cursor];
            if worker.conntrack.reply_tuple_in_use(&f, now_ns) {
                self.cursor += 1;
            } else {
                self.dead[dead] = TupleKey::of(&f);
                dead += 1;
                self.shadow.swap_remove(self.cursor);
            }
        }
        if dead > 0 {
            match self.map.delete_batch(&self.dead[..dead]) {
                Ok(n) => c.reply_tuples_removed += n as u64,
                Err(_) => c.reply_map_errors += dead as u64,
            }
        }
    }
}

/// A worker's AF_XDP side: one UMEM, one socket per interface on one queue.
#[derive(Debug)]
pub struct AfxdpWorker {
    queue: u32,
    umem: Umem,
    ports: Vec<Port>,
    /// Index into `ports` by interface id.
    by_iface: Vec<Option<usize>>,
    /// Frames in userspace's hands, ready for fill rings or rejects.
    free: Vec<FrameDesc>,
    descs: [FrameDesc; BATCH_SIZE],
    scratch: Vec<u8>,
    replies: Option<ReplySteer>,
    idle: IdlePolicy,
    pollfds: Vec<libc::pollfd>,
    pub counters: DriverCounters,
}

impl AfxdpWorker {
    /// Creates the UMEM and binds one socket per port to `queue`. No XDP program is
    /// loaded or attached (the steering program is the runtime's); register
    /// [`socket_fds`](Self::socket_fds) in its socket map.
    pub fn new(queue: u32, ports: &[PortSpec], cfg: &AfxdpConfig) -> Result<Self, AfxdpError> {
        if ports.is_empty() {
            return Err(AfxdpError::Config("no interfaces".into()));
        }
        let ring = QueueSize::new(cfg.ring_size).map_err(|e| AfxdpError::Config(e.to_string()))?;
        let frame_size =
            FrameSize::new(cfg.frame_size).map_err(|e| AfxdpError::Config(e.to_string()))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| AfxdpError::Config(e.to_string()))?;
        let frames = cfg
            .frames_per_socket
            .checked_mul(ports.len() as u32)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| AfxdpError::Config("frames_per_socket must be > 0".into()))?;
        if frames.get() / (ports.len() as u32) < 2 * cfg.ring_size {
            return Err(AfxdpError::Config(format!(
                "frames_per_socket ({}) must be at least twice ring_size ({})",
                cfg.frames_per_socket, cfg.ring_size
            )));
        }
        let (umem, free) =
            Umem::new(umem_cfg, frames, false).map_err(|e| AfxdpError::Umem(describe(&e)))?;
        let mut bind = BindFlags::XDP_USE_NEED_WAKEUP;
        match cfg.bind_mode {
            BindMode::Auto => {}
            BindMode::Copy => bind |= BindFlags::XDP_COPY,
            BindMode::ZeroCopy => bind |= BindFlags::XDP_ZEROCOPY,
        }
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind)
            .build();
        let mut built = Vec::with_capacity(ports.len());
        let max_iface = ports.iter().map(|p| p.iface.0 as usize).max().unwrap_or(0);
        let mut by_iface = vec![None; max_iface + 1];
        for spec in ports {
            let name: Interface = spec.name.parse().map_err(|_| AfxdpError::Socket {
                iface: spec.name.clone(),
                err: "interface name contains NUL".into(),
            })?;
            if by_iface[spec.iface.0 as usize].is_some() {
                return Err(AfxdpError::Config(format!(
                    "interface {} listed twice",
                    spec.name
                )));
            }
            // SAFETY: the program-load inhibit flag is set, which is what the contract asks
            // of sockets sharing a UMEM; every (interface, queue) pair is bound once here.
            let (tx, rx, rings) =
                unsafe { Socket::new(sock_cfg, &umem, &name, queue) }.map_err(|e| {
                    AfxdpError::Socket {
                        iface: spec.name.clone(),
                        err: describe(&e),
                    }
                })?;
            let (fill, comp) = rings.ok_or_else(|| AfxdpError::Socket {
                iface: spec.name.clone(),
                err: "no fill/completion rings (interface and queue already bound?)".into(),
            })?;
            by_iface[spec.iface.0 as usize] = Some(built.len());
            built.push(Port {
                iface: spec.iface,
                name: spec.name.clone(),
                tx,
                rx,
                fill,
                comp,
                outstanding: 0,
                recompute_l4: spec.recompute_l4_checksum,
                staged: [FrameDesc::default(); BATCH_SIZE],
                staged_len: 0,
            });
        }
        let pollfds = built
            .iter()
            .map(|p| libc::pollfd {
                fd: p.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut me = Self {
            queue,
            umem,
            ports: built,
            by_iface,
            free,
            descs: [FrameDesc::default(); BATCH_SIZE],
            scratch: vec![0u8; REJECT_SCRATCH_LEN],
            replies: None,
            idle: cfg.idle,
            pollfds,
            counters: DriverCounters::default(),
        };
        // Give every fill ring its share up front so the first frames have somewhere to go.
        for i in 0..me.ports.len() {
            for _ in 0..(cfg.ring_size as usize / BATCH_SIZE) {
                me.refill(i);
            }
        }
        Ok(me)
    }

    /// The queue this worker's sockets are bound to.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// (interface id, interface name, socket fd) of every socket, for the steering map.
    pub fn socket_fds(&self) -> Vec<(IfaceId, String, RawFd)> {
        self.ports
            .iter()
            .map(|p| (p.iface, p.name.clone(), p.rx.fd().as_raw_fd()))
            .collect()
    }

    /// Lets the worker keep reply tuples of untranslated flows in the steering map.
    /// `snat` is the worker's masquerade port range (those replies are steered by range).
    pub fn set_reply_map(&mut self, map: ReplyMap, snat: (u16, u16), capacity: usize) {
        self.replies = Some(ReplySteer {
            map,
            snat,
            pending: [TupleKey::default(); BATCH_SIZE],
            pending_flows: [FlowKey {
                src: core::net::Ipv4Addr::UNSPECIFIED.into(),
                dst: core::net::Ipv4Addr::UNSPECIFIED.into(),
                sport: 0,
                dport: 0,
                proto: crate::flow::L4Proto::Tcp,
            }; BATCH_SIZE],
            pending_len: 0,
            values: [self.queue; BATCH_SIZE],
            shadow: Vec::with_capacity(capacity),
            cursor: 0,
            dead: [TupleKey::default(); SWEEP_BUDGET],
        });
    }

    /// Runs until `stop` is set: the busy-poll loop described in the module docs.
    /// `report` is called about every `report_every` with the worker and these counters
    /// (between batches; it must not block).
    pub fn run(
        &mut self,
        worker: &mut Worker,
        tables: &mut TableSubscriber,
        stop: &AtomicBool,
        report_every: Duration,
        report: &mut dyn FnMut(&Worker, &DriverCounters),
    ) {
        let start = Instant::now();
        let mut last_work = start;
        let mut last_report = start;
        let mut last_housekeeping = start;
        let mut revalidating = false;
        while !stop.load(Ordering::Relaxed) {
            if tables.refresh() {
                worker.tables_changed();
                revalidating = true;
            }
            let now = Instant::now();
            let now_ns = (now - start).as_nanos() as u64;
            let work = self.poll_once(worker, tables.tables(), now_ns);
            if work > 0 || now - last_housekeeping >= Duration::from_millis(1) {
                last_housekeeping = now;
                worker.housekeeping(now_ns);
                if revalidating {
                    revalidating = worker.revalidate_step(tables.tables());
                }
                if let Some(r) = &mut self.replies {
                    r.sweep(worker, now_ns, &mut self.counters);
                }
            }
            if now - last_report >= report_every {
                last_report = now;
                self.read_kernel_stats();
                report(worker, &self.counters);
            }
            if work > 0 || self.ports.iter().any(|p| p.outstanding > 0) {
                last_work = now;
            } else if now - last_work >= self.idle.busy_poll {
                self.sleep();
                last_work = Instant::now();
            }
        }
        self.read_kernel_stats();
        report(worker, &self.counters);
    }

    /// Copies the kernel's per-socket statistics (one `getsockopt` per socket) into the
    /// counters.
    fn read_kernel_stats(&mut self) {
        let c = &mut self.counters;
        (
            c.kernel_rx_dropped,
            c.kernel_rx_ring_full,
            c.kernel_fill_ring_empty,
            c.kernel_rx_invalid,
            c.kernel_tx_invalid,
        ) = (0, 0, 0, 0, 0);
        for p in &self.ports {
            if let Ok(st) = p.rx.fd().xdp_statistics() {
                c.kernel_rx_dropped += st.rx_dropped();
                c.kernel_rx_ring_full += st.rx_ring_full();
                c.kernel_fill_ring_empty += st.rx_fill_ring_empty_descs();
                c.kernel_rx_invalid += st.rx_invalid_descs();
                c.kernel_tx_invalid += st.tx_invalid_descs();
            }
        }
    }

    /// One round over every socket (completions, fill, receive, transmit, kicks). Returns
    /// the number of frames received. `now_ns` is the pipeline's clock.
    pub fn poll_once(&mut self, worker: &mut Worker, t: &Tables, now_ns: u64) -> usize {
        let mut received = 0;
        for i in 0..self.ports.len() {
            self.complete(i);
            self.refill(i);
            let n = self.receive(i, worker, t, now_ns);
            if n > 0 {
                received += n;
                self.transmit_staged();
            }
        }
        self.kick();
        received
    }

    /// Moves TX completions of port `i` to the free list.
    fn complete(&mut self, i: usize) {
        let p = &mut self.ports[i];
        if p.outstanding == 0 {
            return;
        }
        // SAFETY: the descriptors are overwritten with addresses of frames of this UMEM
        // that the kernel has finished sending; they become ours again.
        let n = unsafe { p.comp.consume(&mut self.descs) };
        p.outstanding -= n as u64;
        self.counters.tx_completed += n as u64;
        self.free.extend_from_slice(&self.descs[..n]);
    }

    /// Tops up port `i`'s fill ring with up to a batch of free frames.
    fn refill(&mut self, i: usize) {
        let p = &mut self.ports[i];
        let room = p.fill.nb_free(BATCH_SIZE as u32) as usize;
        let n = room.min(BATCH_SIZE).min(self.free.len());
        if n == 0 {
            return;
        }
        let from = self.free.len() - n;
        // SAFETY: the frames in the free list belong to this UMEM and nobody holds them;
        // once produced they are the kernel's until they come back on an RX ring.
        let done = unsafe { p.fill.produce(&self.free[from..]) };
        self.free.drain(from..from + done);
        if done > 0 && p.fill.needs_wakeup() {
            self.counters.fill_wakeups += 1;
            let _ = p.fill.wakeup(p.rx.fd_mut(), 0);
        }
    }

    /// Takes a batch from port `i`'s RX ring through the pipeline.
    fn receive(&mut self, i: usize, worker: &mut Worker, t: &Tables, now_ns: u64) -> usize {
        let Self {
            umem,
            ports,
            by_iface,
            free,
            descs,
            scratch,
            replies,
            counters,
            ..
        } = self;
        let (ingress, recompute) = (ports[i].iface, ports[i].recompute_l4);
        // SAFETY: `descs` is ours to overwrite; it receives frames of this UMEM that the
        // kernel hands back to us.
        let n = unsafe { ports[i].rx.consume(descs) };
        counters.rx_frames += n as u64;
        for d in descs[..n].iter_mut() {
            if d.has_more_frames() {
                counters.multi_buffer += 1;
                free.push(*d);
                continue;
            }
            // SAFETY: `d` was just consumed from an RX ring of this UMEM, so the kernel is
            // done with the frame, and no other descriptor in our hands names it.
            let mut data = unsafe { umem.data_mut(d) };
            let v = worker.process(t, data.contents_mut(), ingress, now_ns, scratch);
            let egress = match v {
                Verdict::Forward {
                    iface,
                    start,
                    len,
                    reason,
                } => {
                    let frame = data.contents_mut();
                    if start != 0 {
                        frame.copy_within(start..start + len, 0);
                        counters.vlan_shift_copies += 1;
                    }
                    let frame = &mut frame[..len];
                    if recompute && fill_l4_checksum(frame) {
                        counters.l4_checksums_recomputed += 1;
                    }
                    if reason == ForwardReason::NewFlow {
                        if let Some(r) = replies.as_mut() {
                            r.note(frame, t);
                        }
                    }
                    data.cursor().set_pos(len);
                    Some(iface)
                }
                Verdict::Reject { iface, len, .. } => {
                    let mut c = data.cursor();
                    if len > c.buf_len() {
                        counters.reject_too_large += 1;
                        None
                    } else {
                        c.set_pos(len);
                        data.contents_mut().copy_from_slice(&scratch[..len]);
                        Some(iface)
                    }
                }
                Verdict::Pass(_) => {
                    counters.pass_not_reinjected += 1;
                    None
                }
                Verdict::Drop(_) => None,
            };
            let out = egress.map(|e| by_iface.get(e.0 as usize).copied().flatten());
            match out {
                Some(Some(o)) => {
                    let p = &mut ports[o];
                    p.staged[p.staged_len] = *d;
                    p.staged_len += 1;
                }
                Some(None) => {
                    counters.no_egress_socket += 1;
                    free.push(*d);
                }
                None => free.push(*d),
            }
        }
        n
    }

    /// Produces staged frames to their TX rings and writes pending reply tuples (before
    /// any kick, so no reply can overtake its steering entry).
    fn transmit_staged(&mut self) {
        for p in &mut self.ports {
            let n = p.staged_len;
            if n == 0 {
                continue;
            }
            p.staged_len = 0;
            // SAFETY: every staged descriptor names a frame of this UMEM that we own, with
            // its length set; produced frames are the kernel's until they complete.
            let sent = unsafe { p.tx.produce(&p.staged[..n]) };
            p.outstanding += sent as u64;
            self.counters.tx_frames += sent as u64;
            self.counters.tx_ring_full += (n - sent) as u64;
            self.free.extend_from_slice(&p.staged[sent..n]);
        }
        if let Some(r) = &mut self.replies {
            r.flush(&mut self.counters);
        }
    }

    /// Kicks every socket the kernel still holds TX frames for (trap 2: copy-mode TX
    /// sends a bounded batch per kick).
    fn kick(&mut self) {
        for p in &mut self.ports {
            if p.outstanding > 0 && p.tx.needs_wakeup() {
                self.counters.tx_kicks += 1;
                if p.tx.wakeup().is_err() {
                    self.counters.tx_kick_errors += 1;
                }
            }
        }
    }

    /// Sleeps until a socket has frames or `max_sleep` passes.
    fn sleep(&mut self) {
        self.counters.idle_sleeps += 1;
        let t = self.idle.max_sleep;
        let ts = libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        };
        // SAFETY: pollfds is a live array of `len` pollfd structs; the timeout points to a
        // timespec on the stack; a null sigmask leaves the mask unchanged.
        let _ = unsafe {
            libc::ppoll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                &ts,
                core::ptr::null(),
            )
        };
    }

    /// Frames currently in the free list (tests: nothing leaks).
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }
}

/// Recomputes the TCP or UDP checksum of a frame from scratch (pseudo-header included).
/// Returns false (and leaves the frame alone) for anything else. For frames from
/// interfaces whose sender may have left a partial (offload) checksum.
pub fn fill_l4_checksum(frame: &mut [u8]) -> bool {
    let Ok(Parsed::Transport { layout: l, .. }) = parse(frame) else {
        return false;
    };
    let at = match l.proto {
        proto::TCP => l.l4 + 16,
        proto::UDP => l.l4 + 6,
        _ => return false,
    };
    if at + 2 > l.end {
        return false;
    }
    let (src, dst) = if l.is_ipv4() {
        (
            l.l3 + ipv4::SRC.start..l.l3 + ipv4::SRC.end,
            l.l3 + ipv4::DST.start..l.l3 + ipv4::DST.end,
        )
    } else {
        (
            l.l3 + ipv6::SRC.start..l.l3 + ipv6::SRC.end,
            l.l3 + ipv6::DST.start..l.l3 + ipv6::DST.end,
        )
    };
    frame[at..at + 2].fill(0);
    let pseudo = pseudo_header_sum(&frame[src], &frame[dst], l.proto, l.l4_len() as u32);
    let mut c = checksum(pseudo, &frame[l.l4..l.end]);
    if l.proto == proto::UDP && c == 0 {
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP frame 10.0.0.1:1234 -> 10.0.0.2:80 with a correct checksum.
    fn tcp_frame() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1234, 80, 1, 65535)
            .syn();
        let payload = b"hello, kxp";
        let mut v = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut v, payload).unwrap();
        v
    }

    #[test]
    fn partial_checksum_is_completed() {
        let good = tcp_frame();
        let mut partial = good.clone();
        // What a sender with TX offload leaves: the pseudo-header sum, not complemented.
        let l4 = 14 + 20;
        let pseudo = crate::checksum::fold(pseudo_header_sum(
            &good[26..30],
            &good[30..34],
            6,
            (good.len() - l4) as u32,
        ));
        partial[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        assert_ne!(partial, good);
        assert!(fill_l4_checksum(&mut partial));
        assert_eq!(partial, good);
        let mut again = good.clone();
        assert!(fill_l4_checksum(&mut again));
        assert_eq!(again, good, "a complete checksum stays as it is");
    }

    #[test]
    fn non_transport_frames_are_left_alone() {
        let mut arp = vec![0xffu8; 42];
        arp[12] = 0x08;
        arp[13] = 0x06;
        let before = arp.clone();
        assert!(!fill_l4_checksum(&mut arp));
        assert_eq!(arp, before);
    }

    #[test]
    fn driver_counter_names_are_unique() {
        let names: Vec<_> = DriverCounters::default()
            .named()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let set: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len());
    }
}
