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
//! fill ring from the free list, take up to [`BATCH_SIZE`] received frames, hand those
//! another worker owns to it (below), run the rest through the pipeline as one batch
//! ([`Worker::process_batch`]), and stage the forwarded ones on their egress socket; then
//! the same for frames other workers handed over. After each batch the reply tuples of
//! new untranslated flows are written to the steering map (one system call) and only then
//! are the staged frames produced to their TX rings (and any TX kicked), so a reply can
//! never overtake its steering entry. Every round kicks every socket whose
//! produced-minus-completed count is above zero: copy-mode TX sends a bounded number of
//! frames (32) per `sendto`, and frames left in the ring would otherwise wait forever
//! (AFXDP-NOTES trap 2).
//!
//! # TX back-pressure
//!
//! A frame the pipeline has processed is not thrown away because its TX ring is
//! momentarily full: the round kicks again, reaping completions in between, while the
//! ring still holds frames the kernel has not taken and each kick makes progress (at most
//! `MAX_TX_KICKS`); staged frames that find their ring full kick and retry the same way
//! before they are dropped (`tx_ring_full`). A ring still backed up after the round's kicks
//! makes the next receive take fewer frames (`rx_throttled_rounds`), so that excess load is
//! lost in the RX ring (`kernel_rx_ring_full`), before any work is spent on it, rather
//! than after the pipeline. Between rounds: table refresh (one atomic load), conntrack
//! housekeeping, revalidation after a table change, reply-map sweeping. With nothing to do
//! for [`IdlePolicy::busy_poll`], the worker sleeps in `ppoll` on its sockets for at most
//! [`IdlePolicy::max_sleep`].
//!
//! # Several workers: ownership and hand-off
//!
//! Conntrack is per worker, and a frame can only be received on the queue it arrived on.
//! With several workers (one per receive queue) the steering program writes the owning
//! worker of each redirected frame's flow into XDP metadata in front of the frame (see
//! `steer.c`); a worker that receives a frame another worker owns copies it into the
//! bounded lock-free ring towards that worker ([`handoff`]) and frees its own frame; the
//! owner copies it into a frame of its UMEM and processes it like its own. New flows'
//! original tuples go into the steering map with their reply tuples, so later frames of
//! the flow find their owner too. Counted: `handoff_frames`, `handoff_queue_full`
//! (dropped), `handoff_received`, `meta_missing`.
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

pub mod handoff;
pub mod reply_table;
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
use crate::parse::{parse, peek_key, Parsed};
use crate::pipeline::{Tables, Worker, BATCH_SIZE};
use crate::publish::TableSubscriber;
use crate::reject::REJECT_SCRATCH_LEN;
use crate::tables::IfaceId;
use crate::verdict::{ForwardReason, Verdict};
use crate::wire::{ipv4, ipv6, proto};

use handoff::{HandoffEnds, HandoffRx, HandoffTx};
use reply_table::{Inserted, Loc, ReplyTable};
use std::sync::Arc;
use steer::{ReplyMap, TupleKey, META_LEN, META_MAGIC, NO_OWNER};

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
    /// Extra TX wakeups in a round (included in `tx_kicks`): the ring still held frames the
    /// kernel had not taken after the first one (copy mode sends a bounded batch per kick).
    pub tx_extra_kicks: u64,
    /// TX wakeups (included in `tx_kicks`) issued because staged frames found their TX ring
    /// full; the frames are produced again after each (back-pressure before a drop).
    pub tx_full_kicks: u64,
    /// Rounds in which a TX ring was still backed up after the round's kicks, so the next
    /// receive took fewer frames (the excess waits in, or is dropped by, the RX ring before
    /// any work is spent on it: `kernel_rx_ring_full`).
    pub rx_throttled_rounds: u64,
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
    /// Tuples written to the shared reply table (`reply_tuples_removed` counts both
    /// the table's and the LRU map's removals; `reply_tuples_added`, the LRU map's).
    pub reply_table_inserts: u64,
    /// Tuples that found both their reply-table buckets full and went to the LRU map.
    pub reply_table_full: u64,
    /// Reply-table slots the safety sweep freed (their flow's removal was not logged:
    /// conntrack's removal log overflowed). Normally 0.
    pub reply_table_swept: u64,
    /// The kernel's own counts for this worker's sockets (`XDP_STATISTICS`, summed):
    /// frames dropped for want of RX ring or fill ring space, invalid descriptors.
    pub kernel_rx_dropped: u64,
    pub kernel_rx_ring_full: u64,
    pub kernel_fill_ring_empty: u64,
    pub kernel_rx_invalid: u64,
    pub kernel_tx_invalid: u64,
    /// Frames another worker owns (by the steering program's metadata), copied into the
    /// hand-off ring towards it.
    pub handoff_frames: u64,
    /// Frames for another worker dropped because the ring towards it was full.
    pub handoff_queue_full: u64,
    /// Frames other workers handed to this one (copied into its UMEM and processed).
    pub handoff_received: u64,
    /// Handed-over frames larger than a UMEM frame (dropped).
    pub handoff_too_large: u64,
    /// Eventfd wakeups of a sleeping owner.
    pub handoff_wakeups: u64,
    /// Frames received without the steering program's metadata (taken as this worker's).
    pub meta_missing: u64,
    /// Sockets closed because their interface went away, and the UMEM frames the kernel
    /// held in their rings (gone with them).
    pub ports_removed: u64,
    pub frames_lost_with_socket: u64,
}

impl DriverCounters {
    pub fn merge(&mut self, o: &Self) {
        for ((_, a), (_, b)) in self.fields_mut().into_iter().zip(o.named()) {
            *a += b;
        }
    }

    fn fields_mut(&mut self) -> [(&'static str, &mut u64); 37] {
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
            ("tx_extra_kicks", &mut self.tx_extra_kicks),
            ("tx_full_kicks", &mut self.tx_full_kicks),
            ("rx_throttled_rounds", &mut self.rx_throttled_rounds),
            ("fill_wakeups", &mut self.fill_wakeups),
            ("idle_sleeps", &mut self.idle_sleeps),
            ("reply_tuples_added", &mut self.reply_tuples_added),
            ("reply_tuples_removed", &mut self.reply_tuples_removed),
            ("reply_map_errors", &mut self.reply_map_errors),
            ("reply_shadow_full", &mut self.reply_shadow_full),
            ("reply_table_inserts", &mut self.reply_table_inserts),
            ("reply_table_full", &mut self.reply_table_full),
            ("reply_table_swept", &mut self.reply_table_swept),
            ("kernel_rx_dropped", &mut self.kernel_rx_dropped),
            ("kernel_rx_ring_full", &mut self.kernel_rx_ring_full),
            ("kernel_fill_ring_empty", &mut self.kernel_fill_ring_empty),
            ("kernel_rx_invalid", &mut self.kernel_rx_invalid),
            ("kernel_tx_invalid", &mut self.kernel_tx_invalid),
            ("handoff_frames", &mut self.handoff_frames),
            ("handoff_queue_full", &mut self.handoff_queue_full),
            ("handoff_received", &mut self.handoff_received),
            ("handoff_too_large", &mut self.handoff_too_large),
            ("handoff_wakeups", &mut self.handoff_wakeups),
            ("meta_missing", &mut self.meta_missing),
            ("ports_removed", &mut self.ports_removed),
            ("frames_lost_with_socket", &mut self.frames_lost_with_socket),
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
    /// Frames produced to the fill ring minus frames received: the kernel's share, lost
    /// with the socket if the interface goes away.
    in_fill: u64,
    recompute_l4: bool,
    /// Frames to transmit on this socket after the current batch.
    staged: [FrameDesc; BATCH_SIZE],
    staged_len: usize,
}

/// A new flow's tuples for the reply table: its reply tuple (unless replies are steered
/// by SNAT port) and, with several workers, its original tuple.
#[derive(Debug, Clone, Copy)]
struct NewFlow {
    reply: FlowKey,
    /// Whether the reply tuple goes in the table (not when replies come back by SNAT port).
    reply_steered: bool,
    orig: Option<FlowKey>,
}

impl Default for NewFlow {
    fn default() -> Self {
        Self {
            reply: FlowKey {
                src: core::net::IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
                dst: core::net::IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
                sport: 0,
                dport: 0,
                proto: crate::flow::L4Proto::Udp,
            },
            reply_steered: false,
            orig: None,
        }
    }
}

/// A flow whose tuples this worker put in the steering map.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    /// The flow's reply tuple (what conntrack is asked about).
    reply: FlowKey,
    /// Whether the reply tuple itself is in the map (not for masqueraded flows, whose
    /// replies are steered by SNAT port).
    reply_in_map: bool,
    /// The original tuple, in the map when there are several workers (so that later
    /// frames of the flow find their owner).
    orig: Option<TupleKey>,
}

/// The tuples of new flows the steering program must know (reply tuples of flows kxp
/// did not masquerade; with several workers, original tuples of every flow): written to
/// the shared reply table at once, or, when both their buckets are full, queued for the
/// LRU map; and the ones this worker wrote (to remove them when their flow goes).
#[derive(Debug)]
struct ReplySteer {
    table: Arc<ReplyTable>,
    /// The batch's new flows, written to the table after the batch.
    new_flows: [NewFlow; BATCH_SIZE],
    new_len: usize,
    /// Tuples of removed flows, freed in groups (buckets prefetched first).
    gone: [Loc; BATCH_SIZE],
    /// Where the safety sweep of the whole table goes on.
    walk: u32,
    /// When the last safety sweep ran.
    last_walk_ns: u64,
    owner: u32,
    map: ReplyMap,
    snat: (u16, u16),
    pending: [TupleKey; 2 * BATCH_SIZE],
    pending_len: usize,
    pending_flows: [Option<Tracked>; BATCH_SIZE],
    pending_flows_len: usize,
    /// This worker's index, the value of every tuple it inserts.
    values: [u32; 2 * BATCH_SIZE],
    /// Flows with tuples in the map, swept against conntrack.
    shadow: Vec<Tracked>,
    cursor: usize,
    dead: [TupleKey; 2 * SWEEP_BUDGET],
}

const SWEEP_BUDGET: usize = 64;

/// TX wakeups per socket per round at most (and per staged batch that finds its ring
/// full). Copy-mode AF_XDP transmits up to 32 frames per `sendto`; a round receives up to
/// [`BATCH_SIZE`] frames per socket, so a few kicks keep up and eight bound the round.
const MAX_TX_KICKS: u32 = 8;

/// Frames a fill-ring top-up hands the kernel at most: more than a batch, so that a fill
/// ring a stall left empty (the worker off the CPU while frames kept arriving) is back to
/// depth within a round or two, not one batch per round while the kernel drops
/// (`kernel_fill_ring_empty`).
const REFILL_MAX: usize = 4 * BATCH_SIZE;

/// The fewest frames a receive takes while a TX ring is backed up: one stuck interface
/// (down, or a peer that does not drain) slows the others' intake, never stops it.
const MIN_RX_TAKE: usize = BATCH_SIZE / 4;

impl ReplySteer {
    /// Notes the tuples of a new flow whose first frame (rewritten) is `frame` and whose
    /// original tuple was `orig` (given only when there are several workers): its reply
    /// tuple unless replies reach the worker by its SNAT port range anyway, and `orig`.
    /// They are written by [`ReplySteer::commit`] after the batch, before any TX.
    fn note(&mut self, frame: &[u8], orig: Option<FlowKey>, t: &Tables) {
        // The pipeline just wrote this frame: the fixed-offset read is enough unless
        // extension headers sit in front of the transport header.
        let key = match peek_key(frame) {
            Some(k) => k,
            None => match parse(frame) {
                Ok(Parsed::Transport { key, .. }) => key,
                _ => return,
            },
        };
        let reply = key.reversed();
        let by_port = t.node.is_node_address(&reply.dst)
            && (self.snat.0..=self.snat.1).contains(&reply.dport);
        let flow = NewFlow {
            reply,
            reply_steered: !by_port,
            orig,
        };
        if (flow.reply_steered || flow.orig.is_some()) && self.new_len < BATCH_SIZE {
            self.new_flows[self.new_len] = flow;
            self.new_len += 1;
        }
    }

    /// After a batch: frees the table slots of the flows conntrack removed (its removal
    /// log), then writes the batch's new tuples; each group of tuples is hashed once and
    /// its buckets, then its slots, prefetched before the group is touched, so that the
    /// cache misses overlap. A tuple that finds both its buckets full goes to the LRU map
    /// (queued for [`ReplySteer::flush`], before TX). Removals go first, so a flow that
    /// ended and began again within the batch keeps its slot; one that began and ended
    /// within it leaves a slot the table walk frees ([`ReplySteer::sweep_table`]).
    fn commit(&mut self, worker: &mut Worker, t: &Tables, c: &mut DriverCounters) {
        let Self {
            table,
            snat,
            owner,
            gone,
            ..
        } = self;
        let mut gone_len = 0;
        let free = |gone: &[Loc], c: &mut DriverCounters| {
            for l in gone {
                table.prefetch_buckets(l);
            }
            for l in gone {
                table.prefetch_slots(l);
            }
            for l in gone {
                if table.remove_at(l, *owner) {
                    c.reply_tuples_removed += 1;
                }
            }
        };
        worker.conntrack.drain_removed(|orig, reply| {
            let by_port =
                t.node.is_node_address(&reply.dst) && (snat.0..=snat.1).contains(&reply.dport);
            let keys = [(!by_port).then_some(reply), Some(orig)];
            for k in keys.into_iter().flatten() {
                gone[gone_len] = table.locate_flow(k);
                gone_len += 1;
                if gone_len == gone.len() {
                    free(&gone[..], c);
                    gone_len = 0;
                }
            }
        });
        free(&gone[..gone_len], c);
        let n = self.new_len;
        self.new_len = 0;
        let mut locs = [[None::<Loc>; 2]; BATCH_SIZE];
        for (l, f) in locs.iter_mut().zip(&self.new_flows[..n]) {
            *l = [f.reply_steered.then_some(f.reply), f.orig]
                .map(|k| k.map(|k| self.table.locate_flow(&k)));
        }
        for l in locs[..n].iter().flatten().flatten() {
            self.table.prefetch_buckets(l);
        }
        for l in locs[..n].iter().flatten().flatten() {
            self.table.prefetch_slots(l);
        }
        for (i, [reply_loc, orig_loc]) in locs[..n].iter().enumerate() {
            let f = self.new_flows[i];
            let reply_left = reply_loc.filter(|l| !self.put(l, c)).is_some();
            let orig_left = orig_loc
                .filter(|l| !self.put(l, c))
                .and(f.orig)
                .map(|o| TupleKey::of(&o));
            if reply_left || orig_left.is_some() {
                self.queue_for_lru(Tracked {
                    reply: f.reply,
                    reply_in_map: reply_left,
                    orig: orig_left,
                });
            }
        }
    }

    /// Writes the located tuple to the reply table; false if both its buckets are full.
    fn put(&mut self, l: &Loc, c: &mut DriverCounters) -> bool {
        match self.table.insert_at(l, self.owner) {
            Inserted::New(_) | Inserted::Existing(_) => {
                c.reply_table_inserts += 1;
                true
            }
            Inserted::Full => {
                c.reply_table_full += 1;
                false
            }
        }
    }

    /// Queues a flow's tuples the table had no room for, for the LRU map.
    fn queue_for_lru(&mut self, tr: Tracked) {
        if self.pending_flows_len >= BATCH_SIZE {
            return;
        }
        if tr.reply_in_map {
            self.pending[self.pending_len] = TupleKey::of(&tr.reply);
            self.pending_len += 1;
        }
        if let Some(o) = tr.orig {
            self.pending[self.pending_len] = o;
            self.pending_len += 1;
        }
        self.pending_flows[self.pending_flows_len] = Some(tr);
        self.pending_flows_len += 1;
    }

    /// The safety net behind the removal log (should it ever overflow): walks the whole
    /// table, 64 slots a millisecond, and frees this worker's slots whose flow conntrack no
    /// longer holds.
    fn sweep_table(&mut self, worker: &Worker, now_ns: u64, c: &mut DriverCounters) {
        if now_ns.saturating_sub(self.last_walk_ns) < 1_000_000 {
            return;
        }
        self.last_walk_ns = now_ns;
        let slots = self.table.slots() as u32;
        for _ in 0..SWEEP_BUDGET {
            self.walk = if self.walk + 1 >= slots {
                0
            } else {
                self.walk + 1
            };
            let Some((r, k)) = self.table.owned_at(self.walk, self.owner) else {
                continue;
            };
            let live = k
                .flow_key()
                .is_some_and(|f| worker.conntrack.reply_tuple_in_use(&f, now_ns));
            if !live && self.table.remove(r) {
                c.reply_tuples_removed += 1;
                c.reply_table_swept += 1;
            }
        }
    }

    /// Writes the pending tuples in one system call.
    fn flush(&mut self, c: &mut DriverCounters) {
        let n = self.pending_len;
        let flows = self.pending_flows_len;
        self.pending_len = 0;
        self.pending_flows_len = 0;
        if n > 0 {
            match self.map.insert_batch(&self.pending[..n], &self.values[..n]) {
                Ok(done) => {
                    c.reply_tuples_added += done as u64;
                    c.reply_map_errors += (n - done) as u64;
                }
                Err(_) => c.reply_map_errors += n as u64,
            }
        }
        for f in self.pending_flows[..flows].iter().flatten() {
            if self.shadow.len() < self.shadow.capacity() {
                self.shadow.push(*f);
            } else {
                c.reply_shadow_full += 1;
            }
        }
    }

    /// Removes the tuples of up to [`SWEEP_BUDGET`] flows conntrack no longer holds.
    fn sweep(&mut self, worker: &Worker, now_ns: u64, c: &mut DriverCounters) {
        self.sweep_table(worker, now_ns, c);
        let mut dead = 0;
        for _ in 0..SWEEP_BUDGET.min(self.shadow.len()) {
            if self.cursor >= self.shadow.len() {
                self.cursor = 0;
            }
            let f = self.shadow[self.cursor];
            if worker.conntrack.reply_tuple_in_use(&f.reply, now_ns) {
                self.cursor += 1;
            } else {
                if f.reply_in_map {
                    self.dead[dead] = TupleKey::of(&f.reply);
                    dead += 1;
                }
                if let Some(o) = f.orig {
                    self.dead[dead] = o;
                    dead += 1;
                }
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

/// A worker's ends of the hand-off rings (several workers only).
#[derive(Debug)]
struct Handoff {
    /// This worker's index (what the steering metadata names).
    index: u32,
    bell: std::sync::Arc<handoff::Doorbell>,
    /// Towards each worker by index (`None` at our own).
    to: Vec<Option<HandoffTx>>,
    from: Vec<HandoffRx>,
}

/// What happens to a frame of a batch once the pipeline is done with it.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// Back to the free list (dropped, passed, or nowhere to send it).
    Free,
    /// Transmit `len` bytes on `iface`.
    Send { iface: IfaceId, len: usize },
    /// The reject answer in the stash, `len` bytes, to `iface`.
    Reject { iface: IfaceId, len: usize },
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
    /// The batch the pipeline is about to see: frames, their ingress, whether to
    /// recompute their L4 checksum, their original tuples (several workers only), and
    /// what becomes of them.
    batch: [FrameDesc; BATCH_SIZE],
    batch_ingress: [IfaceId; BATCH_SIZE],
    batch_recompute: [bool; BATCH_SIZE],
    batch_keys: [Option<FlowKey>; BATCH_SIZE],
    outs: [Out; BATCH_SIZE],
    /// Reject answers of the batch (`REJECT_SCRATCH_LEN` bytes per frame).
    reject_stash: Vec<u8>,
    scratch: Vec<u8>,
    replies: Option<ReplySteer>,
    handoff: Option<Handoff>,
    idle: IdlePolicy,
    pollfds: Vec<libc::pollfd>,
    /// How sockets bind (for interfaces added at run time).
    sock_cfg: SocketConfig,
    /// Fill-ring top-ups a new socket gets at once.
    fill_batches: usize,
    port_changes: Option<PortChanges>,
    /// Size of every TX ring (frames the kernel has not taken = size - free slots).
    tx_ring_size: u32,
    /// Frames the next receive takes from one RX ring: [`BATCH_SIZE`], less while a TX
    /// ring is backed up (see [`AfxdpWorker::kick`]).
    rx_take: usize,
    pub counters: DriverCounters,
}

/// A change to a running worker's interfaces (pods appearing and going).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortChange {
    /// Open a socket on this interface (on the worker's queue).
    Add(PortSpec),
    /// Close the socket on this interface.
    Remove(IfaceId),
}

/// A worker's answer to a [`PortChange`]: for an add, the new socket (interface id,
/// name, fd) to register in the steering map.
pub type PortChangeResult = Result<Option<(IfaceId, String, RawFd)>, String>;

#[derive(Debug)]
struct PortChanges {
    rx: std::sync::mpsc::Receiver<PortChange>,
    tx: std::sync::mpsc::Sender<(u32, PortChangeResult)>,
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
            if by_iface[spec.iface.0 as usize].is_some() {
                return Err(AfxdpError::Config(format!(
                    "interface {} listed twice",
                    spec.name
                )));
            }
            by_iface[spec.iface.0 as usize] = Some(built.len());
            built.push(open_port(spec, &umem, sock_cfg, queue)?);
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
            batch: [FrameDesc::default(); BATCH_SIZE],
            batch_ingress: [IfaceId(0); BATCH_SIZE],
            batch_recompute: [false; BATCH_SIZE],
            batch_keys: [None; BATCH_SIZE],
            outs: [Out::Free; BATCH_SIZE],
            reject_stash: vec![0u8; REJECT_SCRATCH_LEN * BATCH_SIZE],
            scratch: vec![0u8; REJECT_SCRATCH_LEN],
            replies: None,
            handoff: None,
            idle: cfg.idle,
            pollfds,
            sock_cfg,
            fill_batches: cfg.ring_size as usize / BATCH_SIZE,
            port_changes: None,
            tx_ring_size: cfg.ring_size,
            rx_take: BATCH_SIZE,
            counters: DriverCounters::default(),
        };
        // Give every fill ring its share up front so the first frames have somewhere to go.
        for i in 0..me.ports.len() {
            for _ in 0..me.fill_batches {
                me.refill(i);
            }
        }
        Ok(me)
    }

    /// Lets the runtime add and remove interfaces while the worker runs: changes arrive
    /// on `rx` (looked at between rounds, at most every millisecond), answers go to `tx`
    /// with the worker's queue.
    pub fn set_port_changes(
        &mut self,
        rx: std::sync::mpsc::Receiver<PortChange>,
        tx: std::sync::mpsc::Sender<(u32, PortChangeResult)>,
    ) {
        self.port_changes = Some(PortChanges { rx, tx });
    }

    /// Applies pending [`PortChange`]s.
    fn apply_port_changes(&mut self) {
        let Some(pc) = self.port_changes.take() else {
            return;
        };
        while let Ok(change) = pc.rx.try_recv() {
            let res = match change {
                PortChange::Add(spec) => self.add_port(&spec).map(Some),
                PortChange::Remove(iface) => {
                    self.remove_port(iface);
                    Ok(None)
                }
            };
            let _ = pc.tx.send((self.queue, res));
        }
        self.port_changes = Some(pc);
    }

    /// Opens a socket on one more interface, sharing the UMEM; its fill ring gets what
    /// the free list can spare. Returns what the steering map needs.
    pub fn add_port(&mut self, spec: &PortSpec) -> Result<(IfaceId, String, RawFd), String> {
        let at = spec.iface.0 as usize;
        if self.by_iface.get(at).copied().flatten().is_some() {
            return Err(format!("interface {} already has a socket", spec.name));
        }
        let port =
            open_port(spec, &self.umem, self.sock_cfg, self.queue).map_err(|e| e.to_string())?;
        let fd = port.rx.fd().as_raw_fd();
        if self.by_iface.len() <= at {
            self.by_iface.resize(at + 1, None);
        }
        self.by_iface[at] = Some(self.ports.len());
        self.ports.push(port);
        self.pollfds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let i = self.ports.len() - 1;
        for _ in 0..self.fill_batches {
            self.refill(i);
        }
        Ok((spec.iface, spec.name.clone(), fd))
    }

    /// Closes the socket on `iface` (its interface is gone). Frames the kernel held in its
    /// rings are lost to the UMEM and counted (`frames_lost_with_socket`).
    pub fn remove_port(&mut self, iface: IfaceId) {
        let Some(i) = self.by_iface.get(iface.0 as usize).copied().flatten() else {
            return;
        };
        self.complete(i);
        let p = self.ports.remove(i);
        self.counters.frames_lost_with_socket += p.in_fill + p.outstanding;
        self.counters.ports_removed += 1;
        let fd = p.rx.fd().as_raw_fd();
        self.pollfds.retain(|f| f.fd != fd);
        drop(p);
        for slot in self.by_iface.iter_mut() {
            *slot = match *slot {
                Some(j) if j == i => None,
                Some(j) if j > i => Some(j - 1),
                other => other,
            };
        }
    }

    /// Interfaces this worker has sockets on.
    pub fn port_ifaces(&self) -> Vec<IfaceId> {
        self.ports.iter().map(|p| p.iface).collect()
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

    /// Lets the worker keep reply tuples of untranslated flows (and, with several
    /// workers, original tuples) in the steering map, valued `owner` (its index). `snat`
    /// is the worker's masquerade port range (those replies are steered by range).
    pub fn set_reply_map(
        &mut self,
        table: Arc<ReplyTable>,
        map: ReplyMap,
        snat: (u16, u16),
        capacity: usize,
        owner: u32,
    ) {
        self.replies = Some(ReplySteer {
            table,
            new_flows: [NewFlow::default(); BATCH_SIZE],
            new_len: 0,
            gone: [Loc::default(); BATCH_SIZE],
            walk: 0,
            last_walk_ns: 0,
            owner,
            map,
            snat,
            pending: [TupleKey::default(); 2 * BATCH_SIZE],
            pending_len: 0,
            pending_flows: [None; BATCH_SIZE],
            pending_flows_len: 0,
            values: [owner; 2 * BATCH_SIZE],
            shadow: Vec::with_capacity(capacity),
            cursor: 0,
            dead: [TupleKey::default(); 2 * SWEEP_BUDGET],
        });
    }

    /// Connects the worker to the others (see [`handoff`]): it is worker `index`, frames
    /// the steering metadata says another worker owns go to that worker's ring, and
    /// frames in its own rings are processed as if received.
    pub fn set_handoff(&mut self, index: u32, ends: HandoffEnds) {
        self.pollfds.push(libc::pollfd {
            fd: ends.bell.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        self.handoff = Some(Handoff {
            index,
            bell: ends.bell,
            to: ends.to,
            from: ends.from,
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
                    r.commit(worker, tables.tables(), &mut self.counters);
                    r.sweep(worker, now_ns, &mut self.counters);
                }
                self.apply_port_changes();
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
        if self.handoff.is_some() {
            let n = self.receive_handoff(worker, t, now_ns);
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

    /// Tops up port `i`'s fill ring with up to [`REFILL_MAX`] free frames.
    fn refill(&mut self, i: usize) {
        let p = &mut self.ports[i];
        let room = p.fill.nb_free(REFILL_MAX as u32) as usize;
        let n = room.min(REFILL_MAX).min(self.free.len());
        if n == 0 {
            return;
        }
        let from = self.free.len() - n;
        // SAFETY: the frames in the free list belong to this UMEM and nobody holds them;
        // once produced they are the kernel's until they come back on an RX ring.
        let done = unsafe { p.fill.produce(&self.free[from..]) };
        p.in_fill += done as u64;
        self.free.drain(from..from + done);
        if done > 0 && p.fill.needs_wakeup() {
            self.counters.fill_wakeups += 1;
            let _ = p.fill.wakeup(p.rx.fd_mut(), 0);
        }
    }

    /// Takes a batch from port `i`'s RX ring: frames another worker owns go to its
    /// hand-off ring, the rest through the pipeline.
    fn receive(&mut self, i: usize, worker: &mut Worker, t: &Tables, now_ns: u64) -> usize {
        let Self {
            umem,
            ports,
            free,
            descs,
            batch,
            batch_ingress,
            batch_recompute,
            handoff,
            counters,
            rx_take,
            ..
        } = self;
        let (ingress, recompute) = (ports[i].iface, ports[i].recompute_l4);
        // SAFETY: `descs` is ours to overwrite; it receives frames of this UMEM that the
        // kernel hands back to us.
        let n = unsafe { ports[i].rx.consume(&mut descs[..*rx_take]) };
        ports[i].in_fill = ports[i].in_fill.saturating_sub(n as u64);
        counters.rx_frames += n as u64;
        let mut k = 0;
        for d in descs[..n].iter_mut() {
            if d.has_more_frames() {
                counters.multi_buffer += 1;
                free.push(*d);
                continue;
            }
            if let Some(h) = handoff.as_mut() {
                // SAFETY: `d` was just consumed from an RX ring of this UMEM: the kernel is
                // done with the frame and nothing else in our hands names it.
                match unsafe { take_meta(umem, d) } {
                    None => counters.meta_missing += 1,
                    Some(owner) if owner != NO_OWNER && owner != h.index => {
                        if let Some(Some(tx)) = h.to.get_mut(owner as usize) {
                            // SAFETY: as above; read-only view of the received bytes.
                            let data = unsafe { umem.data(d) };
                            if tx.push(ingress, data.contents()) {
                                counters.handoff_frames += 1;
                            } else {
                                counters.handoff_queue_full += 1;
                            }
                            free.push(*d);
                            continue;
                        }
                    }
                    Some(_) => {}
                }
            }
            batch[k] = *d;
            batch_ingress[k] = ingress;
            batch_recompute[k] = recompute;
            k += 1;
        }
        if let Some(h) = handoff.as_mut() {
            for tx in h.to.iter_mut().flatten() {
                if tx.flush() {
                    counters.handoff_wakeups += 1;
                }
            }
        }
        self.run_batch(k, worker, t, now_ns);
        n
    }

    /// Takes up to a batch of frames other workers handed over, copies them into free
    /// frames of this UMEM and runs them through the pipeline. Frames stay in their ring
    /// while no UMEM frame is free.
    fn receive_handoff(&mut self, worker: &mut Worker, t: &Tables, now_ns: u64) -> usize {
        let Self {
            umem,
            ports,
            by_iface,
            free,
            batch,
            batch_ingress,
            batch_recompute,
            handoff,
            counters,
            rx_take,
            ..
        } = self;
        let Some(h) = handoff.as_mut() else {
            return 0;
        };
        let mut k = 0;
        'rings: for rx in h.from.iter_mut() {
            while k < *rx_take {
                let Some(mut d) = free.pop() else {
                    break 'rings;
                };
                let got = rx.pop(|ingress, bytes| {
                    // SAFETY: `d` comes from the free list: a frame of this UMEM that
                    // neither the kernel nor any other descriptor in our hands holds.
                    let mut data = unsafe { umem.data_mut(&mut d) };
                    let mut c = data.cursor();
                    if bytes.len() > c.buf_len() {
                        return None;
                    }
                    c.set_pos(bytes.len());
                    data.contents_mut().copy_from_slice(bytes);
                    Some(ingress)
                });
                match got {
                    None => {
                        free.push(d);
                        break;
                    }
                    Some(None) => {
                        counters.handoff_too_large += 1;
                        free.push(d);
                    }
                    Some(Some(ingress)) => {
                        counters.handoff_received += 1;
                        batch[k] = d;
                        batch_ingress[k] = ingress;
                        batch_recompute[k] = by_iface
                            .get(ingress.0 as usize)
                            .copied()
                            .flatten()
                            .is_some_and(|p| ports[p].recompute_l4);
                        k += 1;
                    }
                }
            }
        }
        self.run_batch(k, worker, t, now_ns);
        k
    }

    /// Runs the first `k` frames of the batch through the pipeline
    /// ([`Worker::process_batch`]) and stages the forwarded ones on their egress sockets.
    fn run_batch(&mut self, k: usize, worker: &mut Worker, t: &Tables, now_ns: u64) {
        if k == 0 {
            return;
        }
        let Self {
            umem,
            ports,
            by_iface,
            free,
            batch,
            batch_ingress,
            batch_recompute,
            batch_keys,
            outs,
            reject_stash,
            scratch,
            replies,
            handoff,
            counters,
            ..
        } = self;
        let note_orig = handoff.is_some();
        let mut frames: [&mut [u8]; BATCH_SIZE] = core::array::from_fn(|_| <&mut [u8]>::default());
        for (j, d) in batch[..k].iter_mut().enumerate() {
            // SAFETY: every descriptor of the batch names a distinct frame of this UMEM
            // that is ours (just received, or filled from a hand-off ring); the slice
            // covers its received bytes and is dropped before this function returns, and
            // nothing else touches the frame meanwhile.
            let frame = unsafe {
                let mut data = umem.data_mut(d);
                let c = data.contents_mut();
                core::slice::from_raw_parts_mut(c.as_mut_ptr(), c.len())
            };
            batch_keys[j] = if note_orig { peek_key(frame) } else { None };
            frames[j] = frame;
        }
        worker.process_batch(
            t,
            &mut frames[..k],
            &batch_ingress[..k],
            now_ns,
            scratch,
            |j, frame, v, scratch| {
                outs[j] = match v {
                    Verdict::Forward {
                        iface,
                        start,
                        len,
                        reason,
                    } => {
                        if start != 0 {
                            frame.copy_within(start..start + len, 0);
                            counters.vlan_shift_copies += 1;
                        }
                        let frame = &mut frame[..len];
                        if batch_recompute[j] && fill_l4_checksum(frame) {
                            counters.l4_checksums_recomputed += 1;
                        }
                        if reason == ForwardReason::NewFlow {
                            if let Some(r) = replies.as_mut() {
                                r.note(frame, batch_keys[j], t);
                            }
                        }
                        Out::Send { iface, len }
                    }
                    Verdict::Reject { iface, len, .. } if len <= REJECT_SCRATCH_LEN => {
                        let at = j * REJECT_SCRATCH_LEN;
                        reject_stash[at..at + len].copy_from_slice(&scratch[..len]);
                        Out::Reject { iface, len }
                    }
                    Verdict::Reject { .. } => {
                        counters.reject_too_large += 1;
                        Out::Free
                    }
                    Verdict::Pass(_) => {
                        counters.pass_not_reinjected += 1;
                        Out::Free
                    }
                    Verdict::Drop(_) => Out::Free,
                };
            },
        );
        if let Some(r) = replies.as_mut() {
            r.commit(worker, t, counters);
        }
        for (j, d) in batch[..k].iter_mut().enumerate() {
            let egress = match outs[j] {
                Out::Free => None,
                Out::Send { iface, len } => {
                    // SAFETY: as above; the batch's slices are no longer used.
                    unsafe { umem.data_mut(d) }.cursor().set_pos(len);
                    Some(iface)
                }
                Out::Reject { iface, len } => {
                    // SAFETY: as above.
                    let mut data = unsafe { umem.data_mut(d) };
                    let mut c = data.cursor();
                    if len > c.buf_len() {
                        counters.reject_too_large += 1;
                        None
                    } else {
                        c.set_pos(len);
                        let at = j * REJECT_SCRATCH_LEN;
                        data.contents_mut()
                            .copy_from_slice(&reject_stash[at..at + len]);
                        Some(iface)
                    }
                }
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
    }

    /// Writes pending reply tuples, then produces staged frames to their TX rings. The
    /// tuples go first because a full TX ring is kicked here (below), and no reply may
    /// overtake its steering entry.
    ///
    /// Back-pressure: a frame the pipeline forwarded is not dropped because its TX ring is
    /// momentarily full. The socket is kicked (the kernel takes a bounded batch per kick in
    /// copy mode), completions are reaped, and the rest is produced again, up to
    /// [`MAX_TX_KICKS`] times; only what still finds no room is dropped
    /// (`tx_ring_full`).
    fn transmit_staged(&mut self) {
        if let Some(r) = &mut self.replies {
            r.flush(&mut self.counters);
        }
        for i in 0..self.ports.len() {
            let p = &mut self.ports[i];
            let n = p.staged_len;
            if n == 0 {
                continue;
            }
            p.staged_len = 0;
            let mut sent = 0;
            for attempt in 0..=MAX_TX_KICKS {
                let p = &mut self.ports[i];
                if attempt > 0 {
                    if !p.tx.needs_wakeup() {
                        break;
                    }
                    self.counters.tx_full_kicks += 1;
                    if !self.kick_port(i) {
                        break;
                    }
                }
                let p = &mut self.ports[i];
                // SAFETY: every staged descriptor names a frame of this UMEM that we own,
                // with its length set; produced frames are the kernel's until they
                // complete.
                let done = unsafe { p.tx.produce(&p.staged[sent..n]) };
                p.outstanding += done as u64;
                sent += done;
                if sent == n {
                    break;
                }
            }
            let p = &self.ports[i];
            self.counters.tx_frames += sent as u64;
            self.counters.tx_ring_full += (n - sent) as u64;
            self.free.extend_from_slice(&p.staged[sent..n]);
        }
    }

    /// One kick of port `i`'s TX (`sendto`), then its completions reaped; false if the
    /// kick failed (counted), which ends the caller's kicking.
    fn kick_port(&mut self, i: usize) -> bool {
        self.counters.tx_kicks += 1;
        if self.ports[i].tx.wakeup().is_err() {
            self.counters.tx_kick_errors += 1;
            return false;
        }
        self.complete(i);
        true
    }

    /// Kicks every socket the kernel still holds TX frames for (trap 2: copy-mode TX
    /// sends a bounded batch per kick), and keeps kicking, reaping completions in between,
    /// while its TX ring still holds frames the kernel has not taken and the last kick
    /// made progress, up to [`MAX_TX_KICKS`] times. A ring still backed up after that
    /// makes the next receive take fewer frames ([`AfxdpWorker::rx_take`]), so that the
    /// excess waits in the RX ring instead of being processed and then dropped.
    fn kick(&mut self) {
        let mut take = BATCH_SIZE;
        for i in 0..self.ports.len() {
            let mut unsent = u32::MAX;
            for round in 0..MAX_TX_KICKS {
                let p = &mut self.ports[i];
                if p.outstanding == 0 || !p.tx.needs_wakeup() {
                    break;
                }
                if round > 0 {
                    self.counters.tx_extra_kicks += 1;
                }
                if !self.kick_port(i) {
                    break;
                }
                let p = &mut self.ports[i];
                let left = self.tx_ring_size - p.tx.nb_free_exact().min(self.tx_ring_size);
                if left == 0 || left >= unsent {
                    unsent = left;
                    break;
                }
                unsent = left;
            }
            if unsent != u32::MAX && unsent > 0 {
                let room = (self.tx_ring_size - unsent) as usize;
                take = take.min(room.max(MIN_RX_TAKE));
            }
        }
        if take < BATCH_SIZE {
            self.counters.rx_throttled_rounds += 1;
        }
        self.rx_take = take;
    }

    /// Sleeps until a socket has frames or `max_sleep` passes.
    fn sleep(&mut self) {
        if let Some(h) = &self.handoff {
            h.bell.arm();
            // A frame handed over between the last round and arming: do not sleep on it.
            if h.from.iter().any(|r| !r.is_empty()) {
                h.bell.disarm();
                return;
            }
        }
        self.sleep_poll();
        if let Some(h) = &self.handoff {
            h.bell.disarm();
        }
    }

    fn sleep_poll(&mut self) {
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

/// How long [`bind_socket`] keeps retrying a queue the kernel reports busy.
pub const BIND_BUSY_WAIT: Duration = Duration::from_secs(3);

/// The rings [`Socket::new`] returns.
pub type SocketRings = (TxQueue, RxQueue, Option<(FillQueue, CompQueue)>);

/// Creates an AF_XDP socket on `iface`'s `queue`, sharing `umem`, and retries while the
/// kernel answers EBUSY, for at most [`BIND_BUSY_WAIT`].
///
/// The kernel releases a closed socket's buffer pool from a queue in deferred work, so
/// a socket bound right after the queue's previous owner exited (kxp restarted, a bench
/// tool run twice on the same topology) can find the queue still taken for a few
/// milliseconds. A queue held by a live socket stays busy and the error is returned once
/// the wait is over. xsk-rs keeps the UMEM's saved fill and completion rings across a
/// failed attempt, so a retry hands libxdp the same rings.
///
/// # Safety
///
/// The contract of [`Socket::new`]: sockets sharing a UMEM set the program-load inhibit
/// flag or share one program, and each (interface, queue) pair is bound once per UMEM.
pub unsafe fn bind_socket(
    cfg: SocketConfig,
    umem: &Umem,
    iface: &Interface,
    queue: u32,
) -> Result<SocketRings, xsk_rs::socket::SocketCreateError> {
    let until = Instant::now() + BIND_BUSY_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        // SAFETY: the caller upholds `Socket::new`'s contract.
        match unsafe { Socket::new(cfg, umem, iface, queue) } {
            Err(e) if is_busy(&e) && Instant::now() + pause < until => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn is_busy(e: &xsk_rs::socket::SocketCreateError) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
        == Some(libc::EBUSY)
}

/// Binds a socket on `spec`'s interface and `queue`, sharing `umem`.
fn open_port(
    spec: &PortSpec,
    umem: &Umem,
    sock_cfg: SocketConfig,
    queue: u32,
) -> Result<Port, AfxdpError> {
    let name: Interface = spec.name.parse().map_err(|_| AfxdpError::Socket {
        iface: spec.name.clone(),
        err: "interface name contains NUL".into(),
    })?;
    // SAFETY: the program-load inhibit flag is set, which is what the contract asks of
    // sockets sharing a UMEM; every (interface, queue) pair is bound once per worker (the
    // callers refuse an interface that already has a socket).
    let (tx, rx, rings) =
        unsafe { bind_socket(sock_cfg, umem, &name, queue) }.map_err(|e| AfxdpError::Socket {
            iface: spec.name.clone(),
            err: describe(&e),
        })?;
    let (fill, comp) = rings.ok_or_else(|| AfxdpError::Socket {
        iface: spec.name.clone(),
        err: "no fill/completion rings (interface and queue already bound?)".into(),
    })?;
    Ok(Port {
        iface: spec.iface,
        name: spec.name.clone(),
        tx,
        rx,
        fill,
        comp,
        outstanding: 0,
        in_fill: 0,
        recompute_l4: spec.recompute_l4_checksum,
        staged: [FrameDesc::default(); BATCH_SIZE],
        staged_len: 0,
    })
}

/// Reads and clears the steering program's metadata in front of a received frame: the
/// owning worker (or [`NO_OWNER`]), `None` if the frame carries none.
///
/// # Safety
///
/// `d` must name a frame of `umem` that is ours (received, not yet handed back), with
/// nothing else accessing it.
unsafe fn take_meta(umem: &Umem, d: &mut FrameDesc) -> Option<u32> {
    // SAFETY: the caller guarantees the frame is ours.
    let mut data = unsafe { umem.data_mut(d) };
    let at = data.contents_mut().as_mut_ptr();
    // SAFETY: in an aligned UMEM the kernel puts a received packet XDP_PACKET_HEADROOM
    // (256) bytes (plus the user headroom) after the start of its frame, and copy-mode
    // AF_XDP copies the XDP metadata into the bytes right before it; those META_LEN
    // bytes lie inside the same frame, which the caller guarantees is ours. Unaligned
    // reads and writes: the area has no alignment promise.
    unsafe {
        let m = at.sub(META_LEN);
        let magic = core::ptr::read_unaligned(m.cast::<u32>());
        let owner = core::ptr::read_unaligned(m.add(4).cast::<u32>());
        // Cleared, so that a later frame in this buffer without metadata is not taken
        // for one with.
        core::ptr::write_unaligned(m.cast::<u32>(), 0);
        (magic == META_MAGIC).then_some(owner)
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
