//! Per-worker connection tracking for the NAT dataplane.
//!
//! One [`Conntrack`] per worker: no locks, no atomics, every method takes `&mut self` (or
//! `&self`). Everything the fast path calls ([`Conntrack::lookup`], [`Conntrack::insert`],
//! [`Conntrack::on_packet`], [`Conntrack::reply_tuple_in_use`], [`Conntrack::gc`]) does no
//! allocation, no syscall and no clock read: all memory is allocated by [`Conntrack::new`]
//! and time comes in as `now_ns` (monotonic nanoseconds from the caller).
//!
//! # Layout
//!
//! Flows live in a slab (a `Vec` of fixed-size entries, free slots chained into a LIFO
//! free list through the entry itself). One tuple index points into it, holding two
//! entries per flow: its original tuple (client → service frontend) and its reply tuple
//! (backend → SNAT address, or → client when there is no SNAT), each marked with its
//! direction. A packet's tuple is hashed once (a seeded splitmix64-style hash of the
//! 5-tuple) and looked up once, whichever direction it travels.
//!
//! The index is a fixed array of 64-byte buckets (one cache line each) of 10 ways; a way
//! holds a 16-bit fingerprint of the tuple hash and the slab slot (31 bits, plus the
//! direction bit). A tuple's home bucket comes from the low 32 bits of its hash (scaled
//! to the bucket count, so any count works), its fingerprint from the top 16 bits. A
//! lookup reads the home bucket, compares the ten fingerprints at once (four per 64-bit
//! word), and reads the slab entry of each match to confirm the tuple (in a full table a
//! false match costs an extra entry read about once per 10,000 lookups). So a lookup is two
//! dependent cache misses at most (bucket, entry), and a batch can compute every home
//! bucket's address up front and prefetch them ([`Conntrack::prefetch_bucket`], then
//! [`Conntrack::prefetch_flow`] for the entries).
//!
//! IPv4 and IPv6 flows live in two separate tables generic over the address type (`u32` vs
//! `[u8; 16]`), so IPv4 entries don't pay for IPv6 addresses. Each family has its own hard
//! capacity ([`ConntrackConfig::capacity`] for IPv4, [`ConntrackConfig::capacity_v6`] for
//! IPv6), pre-allocated at construction.
//!
//! Memory per flow (x86_64), measured by the tests `entry_sizes` and
//! `memory_per_flow_at_full_capacity` with a full table of 200 000 flows:
//!
//! | family | entry | index (62 500 buckets × 64 B) | total per flow |
//! |--------|-------|-------------------------------|----------------|
//! | IPv4   | 36 B  | 20 B                          | 56 B           |
//! | IPv6   | 84 B  | 20 B                          | 104 B          |
//!
//! The index has 5/16 of a bucket per flow of capacity (rounded up), so this holds at any
//! capacity: IPv4 56 B and IPv6 104 B per flow of capacity. With the default capacities
//! (1 Mi IPv4, 256 Ki IPv6 flows) that is about 86 MB (82 MiB) per worker in all.
//!
//! # Index maintenance
//!
//! Buckets are probed linearly: an entry whose home bucket is full goes to the next
//! bucket with a free way (wrapping around), and every bucket it passed counts it in its
//! overflow count. A lookup stops at the first bucket without overflow, so it reads one
//! bucket unless its home bucket overflowed. Removal clears the way and decrements the
//! counts the insert incremented: no tombstones, so the index never degrades and never
//! needs a rebuild or any allocation ([`ConntrackStats::index_rebuilds`] stays 0). A full
//! table uses 64% of the ways (two entries per flow); the test
//! `probe_lengths_in_a_full_table` measures 1.02 buckets read per hit and 1.10 per miss
//! there, with 7.5% of the buckets overflowing.
//!
//! A lookup that finds nothing remembers the tuple until the table next changes, so the
//! [`Conntrack::insert`] that usually follows does not probe for the original tuple
//! again. Scans of the slab (GC, purge, iteration) stop at the highest slot ever used, and
//! GC skips a family that holds no flow at all.
//!
//! # Time
//!
//! Time is stored as `u32` seconds since the first `now_ns` the table saw (1 s
//! granularity; `now_ns` earlier than that counts as that instant; 136 years of range).
//! A flow refreshed at second `s` with timeout `t` stays live through second `s + t`, so it
//! lives between `t` and `t + 1` seconds after its last packet: never less than its
//! timeout.
//!
//! # TCP state machine
//!
//! A simplified version of Linux's `nf_conntrack_proto_tcp`, driven by flags only (no
//! sequence-number window tracking):
//!
//! * RST from either side → `Close`.
//! * SYN (no ACK) from the original side in `None`/`SynSent`/`TimeWait`/`Close` →
//!   `SynSent` (a new connection reusing the tuple reopens the flow).
//! * SYN+ACK from the reply side in `SynSent`/`SynRecv` → `SynRecv`.
//! * ACK from the original side in `SynRecv` → `Established`.
//! * The first FIN (either side) in `SynRecv`/`Established` → `FinWait`.
//! * ACK from the other side in `FinWait` (the first FIN acknowledged; that side may keep
//!   sending, half-closed) → `CloseWait`.
//! * FIN from the other side in `FinWait`/`CloseWait` (both FINs seen) → `LastAck`.
//! * ACK from the first closer in `LastAck` (acknowledging the second FIN) → `TimeWait`.
//! * Anything else keeps the state (and refreshes the expiry).
//!
//! A flow's first packet (see [`Conntrack::insert`]) picks the initial state: SYN →
//! `SynSent`; RST → `Close`; otherwise "loose pickup" as Linux does mid-stream:
//! `Established`, or `FinWait` if it carries a FIN. Every packet sets the expiry to now
//! plus the new state's timeout from [`Timeouts`].
//!
//! UDP uses the unreplied timeout until a reply-direction packet is seen, then the replied
//! (stream) timeout. SCTP has one timeout.
//!
//! # Full table: eviction policy
//!
//! Capacity is hard. When a family's table is full, [`Conntrack::insert`] scans at most
//! [`ConntrackConfig::eviction_scan`] slots from a clock-hand cursor (kept per family, it
//! persists between calls) and:
//!
//! 1. evicts the first *expired* entry in the window (counted in
//!    [`ConntrackStats::expired`]); else
//! 2. evicts the first entry that is not established: TCP in `SynSent`, `SynRecv`,
//!    `TimeWait` or `Close`, or UDP/SCTP that never saw a reply (counted in
//!    [`ConntrackStats::evicted_early`]); else
//! 3. refuses the insert with [`InsertError::Full`] (counted in [`ConntrackStats::full`]).
//!
//! Established TCP flows (including the half-closed `FinWait`/`CloseWait`/`LastAck`) and
//! replied UDP/SCTP flows are never evicted, so a SYN flood that fills the table churns only
//! half-open flows and cannot push out established connections. The hand moves past the
//! evicted slot, or past the whole window when nothing qualified.
//!
//! # Flow ids
//!
//! A [`FlowId`] names a slab slot. It is valid until its flow is removed (expiry, GC,
//! eviction, purge); after that the slot may hold another flow. Use an id only while
//! handling the packet that looked it up. Stale or forged ids never panic.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::{mix, FlowKey, L4Proto};
use crate::hugemem::HugeTable;
use crate::tables::ServicePortId;

pub use crate::wire::tcp_flags;
use tcp_flags::{ACK, FIN, RST, SYN};

/// Per-state idle timeouts in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_close_wait: u32,
    pub tcp_last_ack: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    /// UDP flow that has not seen a reply-direction packet yet.
    pub udp_unreplied: u32,
    /// UDP flow that has seen a reply ("stream").
    pub udp_replied: u32,
    /// SCTP, any state.
    pub sctp: u32,
}

impl Default for Timeouts {
    /// Linux's `nf_conntrack` defaults with kube-proxy's overrides (established 86400 s,
    /// close_wait 3600 s).
    fn default() -> Self {
        Self {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 86_400,
            tcp_fin_wait: 120,
            tcp_close_wait: 3_600,
            tcp_last_ack: 30,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp_unreplied: 30,
            udp_replied: 120,
            sctp: 210,
        }
    }
}

impl Timeouts {
    /// The timeout of a TCP state.
    pub fn tcp(&self, state: TcpState) -> u32 {
        match state {
            TcpState::None | TcpState::SynSent => self.tcp_syn_sent,
            TcpState::SynRecv => self.tcp_syn_recv,
            TcpState::Established => self.tcp_established,
            TcpState::FinWait => self.tcp_fin_wait,
            TcpState::CloseWait => self.tcp_close_wait,
            TcpState::LastAck => self.tcp_last_ack,
            TcpState::TimeWait => self.tcp_time_wait,
            TcpState::Close => self.tcp_close,
        }
    }
}

/// Sizing and policy of a [`Conntrack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Hard limit on tracked IPv4 flows; the IPv4 table is pre-allocated to it.
    pub capacity: usize,
    /// Hard limit on tracked IPv6 flows, in a separate pre-allocated table (IPv6 entries
    /// are larger, so the two families are sized separately). 0 disables IPv6 tracking
    /// (every IPv6 insert is refused as [`InsertError::Full`]).
    pub capacity_v6: usize,
    pub timeouts: Timeouts,
    /// Slots a full table scans for a victim before refusing an insert.
    pub eviction_scan: usize,
    /// Seed of the tuple hash. Deterministic by default; a driver may pass a random seed
    /// so that remote peers cannot aim collisions at the indexes.
    pub hash_seed: u64,
    /// Removed flows each family remembers until [`Conntrack::drain_removed`] (0: none).
    /// A driver that mirrors flows elsewhere (the AF_XDP reply table) drains it after
    /// every batch; removals beyond it are counted in
    /// [`ConntrackStats::removal_log_overflow`] and not remembered.
    pub removal_log: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 20,
            capacity_v6: 1 << 18,
            timeouts: Timeouts::default(),
            eviction_scan: 16,
            hash_seed: 0x6b78_705f_6374_0001,
            removal_log: 0,
        }
    }
}

/// Which way a packet travels relative to the flow's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → service frontend.
    Original,
    /// Backend → client (or → SNAT address).
    Reply,
}

/// Source NAT applied to a flow on its way to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatBinding {
    pub addr: IpAddr,
    pub port: u16,
}

/// The translation a flow got when it was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatBinding {
    pub backend: IpAddr,
    pub backend_port: u16,
    pub snat: Option<SnatBinding>,
    pub service_port: ServicePortId,
}

/// TCP connection state; `None` for UDP and SCTP flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

impl TcpState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SynSent,
            2 => Self::SynRecv,
            3 => Self::Established,
            4 => Self::FinWait,
            5 => Self::CloseWait,
            6 => Self::LastAck,
            7 => Self::TimeWait,
            8 => Self::Close,
            _ => Self::None,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::None => 0,
            Self::SynSent => 1,
            Self::SynRecv => 2,
            Self::Established => 3,
            Self::FinWait => 4,
            Self::CloseWait => 5,
            Self::LastAck => 6,
            Self::TimeWait => 7,
            Self::Close => 8,
        }
    }
}

/// A tracked flow's slot. Opaque; see the module doc for how long it stays valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId(u32);

/// A flow as found by [`Conntrack::lookup`] (or listed by [`Conntrack::iter`]).
#[derive(Clone, Copy, Debug)]
pub struct FlowMatch {
    pub id: FlowId,
    /// Which direction the looked-up packet travels ([`Direction::Original`] in
    /// [`Conntrack::iter`] and [`Conntrack::purge`]).
    pub dir: Direction,
    /// The flow's original tuple (client → frontend).
    pub orig: FlowKey,
    pub nat: NatBinding,
    pub tcp_state: TcpState,
}

/// A tuple's hash, from [`Conntrack::prefetch_bucket`] for [`Conntrack::prefetch_flow`].
#[derive(Clone, Copy, Debug)]
pub struct FlowHash {
    hash: u64,
    v6: bool,
}

/// Why [`Conntrack::insert`] refused a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The family's table is full and no slot could be freed (see the eviction policy).
    Full,
    /// The original or the reply tuple already belongs to a live flow (in either
    /// direction).
    Exists,
    /// The tuple and the NAT binding mix IPv4 and IPv6 addresses.
    AddressFamily,
}

impl fmt::Display for InsertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "connection tracking table full",
            Self::Exists => "flow tuple already tracked",
            Self::AddressFamily => "flow mixes IPv4 and IPv6 addresses",
        })
    }
}

impl std::error::Error for InsertError {}

/// Counters since construction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Flows inserted.
    pub inserted: u64,
    /// Live, not-yet-established flows evicted to make room for an insert.
    pub evicted_early: u64,
    /// Expired flows removed (by GC, lazily by lookups and inserts, or to make room).
    pub expired: u64,
    /// Inserts refused because the table was full.
    pub full: u64,
    /// Inserts refused because a tuple was taken.
    pub exists: u64,
    /// Flows removed by [`Conntrack::purge`].
    pub purged: u64,
    /// In-place index rebuilds. Always 0: the index never needs one (see "Index
    /// maintenance" in the module doc); kept for the counters' consumers.
    pub index_rebuilds: u64,
    /// Removals the removal log had no room for (see [`ConntrackConfig::removal_log`]).
    pub removal_log_overflow: u64,
}

// ---------------------------------------------------------------------------------------
// Internals
// ---------------------------------------------------------------------------------------

/// Most slots one family's table may have: slot numbers must fit in 31 bits (the top bit
/// of a [`FlowId`] names the family) and leave `u32::MAX` free as the list terminator.
const MAX_CAPACITY: usize = (1 << 31) - 1;
/// High bit of a [`FlowId`]: the flow is IPv6.
const V6_ID_BIT: u32 = 1 << 31;
/// End of the free list.
const NIL: u32 = u32::MAX;

/// `Entry::flags` bits.
const F_SNAT: u8 = 1 << 0;
/// A reply-direction packet was seen.
const F_REPLIED: u8 = 1 << 1;
/// A FIN was seen from the original side.
const F_FIN_ORIG: u8 = 1 << 2;
/// A FIN was seen from the reply side.
const F_FIN_REPLY: u8 = 1 << 3;
/// The first FIN came from the reply side.
const F_FIRST_FIN_REPLY: u8 = 1 << 4;

const PROTO_FREE: u8 = 0;

/// An address family's compact address type.
pub(crate) trait Addr: Copy + Eq + Default + fmt::Debug {
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
    /// Folds two addresses into a running hash.
    fn mix_pair(h: u64, a: Self, b: Self) -> u64;
}

impl Addr for u32 {
    #[inline]
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(u32::from_be_bytes(a.octets())),
            IpAddr::V6(_) => None,
        }
    }
    #[inline]
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self.to_be_bytes()))
    }
    #[inline]
    fn mix_pair(h: u64, a: Self, b: Self) -> u64 {
        mix(h ^ ((a as u64) << 32 | b as u64))
    }
}

impl Addr for [u8; 16] {
    #[inline]
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        }
    }
    #[inline]
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
    #[inline]
    fn mix_pair(h: u64, a: Self, b: Self) -> u64 {
        let a = u128::from_le_bytes(a);
        let b = u128::from_le_bytes(b);
        let h = mix(h ^ a as u64);
        let h = mix(h ^ (a >> 64) as u64);
        let h = mix(h ^ b as u64);
        mix(h ^ (b >> 64) as u64)
    }
}

/// A 5-tuple in compact form (an IPv4 one is what the established fast path reads off
/// the wire: see [`Conntrack::lookup_v4`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tuple<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
}

impl<A: Addr> Tuple<A> {
    #[inline]
    fn from_key(k: &FlowKey) -> Option<Self> {
        Some(Self {
            src: A::from_ip(k.src)?,
            dst: A::from_ip(k.dst)?,
            sport: k.sport,
            dport: k.dport,
            proto: k.proto as u8,
        })
    }

    /// The flow key again (`None` for a protocol number kxp does not track).
    fn flow_key(&self) -> Option<FlowKey> {
        Some(FlowKey {
            src: self.src.to_ip(),
            dst: self.dst.to_ip(),
            sport: self.sport,
            dport: self.dport,
            proto: L4Proto::from_ip_number(self.proto)?,
        })
    }

    #[inline]
    fn hash(&self, seed: u64) -> u64 {
        let h = mix(seed
            ^ (u64::from(self.proto) << 32)
            ^ (u64::from(self.sport) << 16)
            ^ u64::from(self.dport));
        A::mix_pair(h, self.src, self.dst)
    }
}

/// An IPv4 flow [`Conntrack::lookup_v4`] found: where it is, which way the packet goes,
/// the tuple the packet leaves with, and the table's clock at the lookup (for
/// [`Conntrack::on_packet_v4`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HitV4 {
    /// Slot in the IPv4 slab.
    slot: u32,
    pub(crate) dir: Direction,
    /// The packet's tuple after NAT.
    pub(crate) out: Tuple<u32>,
    /// Seconds since the table's epoch at the lookup.
    now_s: u32,
}

/// One slab slot: a flow, or a link of the free list (`proto == PROTO_FREE`, `expires`
/// holds the next free slot).
#[derive(Clone, Copy, Debug, Default)]
struct Entry<A> {
    /// Original source (client).
    src: A,
    /// Original destination (service frontend).
    dst: A,
    backend: A,
    /// Meaningful only with `F_SNAT`.
    snat_addr: A,
    sport: u16,
    dport: u16,
    backend_port: u16,
    snat_port: u16,
    service_port: u32,
    /// Last second (relative to the table's epoch) the flow is live; next free slot when
    /// free.
    expires: u32,
    proto: u8,
    /// [`TcpState`] as `u8`.
    state: u8,
    flags: u8,
}

impl<A: Addr> Entry<A> {
    fn free(next: u32) -> Self {
        Self {
            expires: next,
            ..Self::default()
        }
    }

    #[inline]
    fn is_free(&self) -> bool {
        self.proto == PROTO_FREE
    }

    /// Occupied and expired at `now_s`.
    #[inline]
    fn is_expired(&self, now_s: u32) -> bool {
        !self.is_free() && self.expires < now_s
    }

    #[inline]
    fn orig_tuple(&self) -> Tuple<A> {
        Tuple {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
        }
    }

    #[inline]
    fn reply_tuple(&self) -> Tuple<A> {
        let (dst, dport) = if self.flags & F_SNAT != 0 {
            (self.snat_addr, self.snat_port)
        } else {
            (self.src, self.sport)
        };
        Tuple {
            src: self.backend,
            dst,
            sport: self.backend_port,
            dport,
            proto: self.proto,
        }
    }

    #[inline]
    fn tuple(&self, side: Direction) -> Tuple<A> {
        match side {
            Direction::Original => self.orig_tuple(),
            Direction::Reply => self.reply_tuple(),
        }
    }

    fn tcp_state(&self) -> TcpState {
        TcpState::from_u8(self.state)
    }

    /// The tuple a packet travelling `dir` leaves with: towards the backend (source
    /// masqueraded if the flow is), or back to the client from the frontend.
    #[inline]
    fn translated(&self, dir: Direction) -> Tuple<A> {
        match dir {
            Direction::Original => {
                let (src, sport) = if self.flags & F_SNAT != 0 {
                    (self.snat_addr, self.snat_port)
                } else {
                    (self.src, self.sport)
                };
                Tuple {
                    src,
                    dst: self.backend,
                    sport,
                    dport: self.backend_port,
                    proto: self.proto,
                }
            }
            Direction::Reply => Tuple {
                src: self.dst,
                dst: self.src,
                sport: self.dport,
                dport: self.sport,
                proto: self.proto,
            },
        }
    }

    /// May be evicted to make room (see the module doc).
    fn is_unestablished(&self) -> bool {
        if self.proto == L4Proto::Tcp as u8 {
            matches!(
                self.tcp_state(),
                TcpState::None
                    | TcpState::SynSent
                    | TcpState::SynRecv
                    | TcpState::TimeWait
                    | TcpState::Close
            )
        } else {
            self.flags & F_REPLIED == 0
        }
    }

    fn flow_match(&self, id: FlowId, dir: Direction) -> Option<FlowMatch> {
        let proto = L4Proto::from_ip_number(self.proto)?;
        let snat = (self.flags & F_SNAT != 0).then(|| SnatBinding {
            addr: self.snat_addr.to_ip(),
            port: self.snat_port,
        });
        Some(FlowMatch {
            id,
            dir,
            orig: FlowKey {
                src: self.src.to_ip(),
                dst: self.dst.to_ip(),
                sport: self.sport,
                dport: self.dport,
                proto,
            },
            nat: NatBinding {
                backend: self.backend.to_ip(),
                backend_port: self.backend_port,
                snat,
                service_port: ServicePortId(self.service_port),
            },
            tcp_state: self.tcp_state(),
        })
    }

    /// Applies a packet: advances the state and refreshes the expiry.
    fn on_packet(&mut self, dir: Direction, flags: u8, now_s: u32, t: &Timeouts) -> TcpState {
        if dir == Direction::Reply {
            self.flags |= F_REPLIED;
        }
        let (state, timeout) = if self.proto == L4Proto::Tcp as u8 {
            if self.state == TcpState::Established.as_u8() && flags & (RST | SYN | FIN) == 0 {
                // What `tcp_next` answers for an established flow's data and ACKs (no
                // state change, no FIN bookkeeping), without the call.
                self.expires = now_s.saturating_add(t.tcp_established);
                return TcpState::Established;
            }
            let s = tcp_next(self.tcp_state(), dir, flags, &mut self.flags);
            (s, t.tcp(s))
        } else if self.proto == L4Proto::Udp as u8 {
            let timeout = if self.flags & F_REPLIED != 0 {
                t.udp_replied
            } else {
                t.udp_unreplied
            };
            (TcpState::None, timeout)
        } else {
            (TcpState::None, t.sctp)
        };
        self.state = state.as_u8();
        self.expires = now_s.saturating_add(timeout);
        state
    }
}

/// The TCP transition function (see the module doc). `fl` is the entry's flag byte (FIN
/// bookkeeping lives there).
fn tcp_next(state: TcpState, dir: Direction, flags: u8, fl: &mut u8) -> TcpState {
    use TcpState as S;
    let fin_bit = |d: Direction| match d {
        Direction::Original => F_FIN_ORIG,
        Direction::Reply => F_FIN_REPLY,
    };
    if flags & RST != 0 {
        return S::Close;
    }
    if flags & SYN != 0 {
        return if flags & ACK != 0 {
            match (state, dir) {
                (S::SynSent | S::SynRecv, Direction::Reply) => S::SynRecv,
                _ => state,
            }
        } else {
            match (state, dir) {
                (S::None | S::SynSent | S::TimeWait | S::Close, Direction::Original) => {
                    *fl &= !(F_FIN_ORIG | F_FIN_REPLY | F_FIRST_FIN_REPLY);
                    S::SynSent
                }
                _ => state,
            }
        };
    }
    if flags & FIN != 0 {
        return match state {
            S::SynRecv | S::Established | S::FinWait | S::CloseWait => {
                if *fl & (F_FIN_ORIG | F_FIN_REPLY) == 0 && dir == Direction::Reply {
                    *fl |= F_FIRST_FIN_REPLY;
                }
                *fl |= fin_bit(dir);
                if *fl & (F_FIN_ORIG | F_FIN_REPLY) == F_FIN_ORIG | F_FIN_REPLY {
                    S::LastAck
                } else if matches!(state, S::SynRecv | S::Established) {
                    S::FinWait
                } else {
                    state
                }
            }
            _ => state,
        };
    }
    if flags & ACK != 0 {
        let first_closer = if *fl & F_FIRST_FIN_REPLY != 0 {
            Direction::Reply
        } else {
            Direction::Original
        };
        return match state {
            S::SynRecv if dir == Direction::Original => S::Established,
            S::FinWait if *fl & fin_bit(dir) == 0 => S::CloseWait,
            S::LastAck if dir == first_closer => S::TimeWait,
            _ => state,
        };
    }
    state
}

/// The state a flow's first packet gives it (see the module doc).
fn tcp_initial(flags: u8, fl: &mut u8) -> TcpState {
    if flags & RST != 0 {
        TcpState::Close
    } else if flags & SYN != 0 {
        TcpState::SynSent
    } else {
        tcp_next(TcpState::Established, Direction::Original, flags, fl)
    }
}

/// Ways (tuple entries) per index bucket.
const WAYS: usize = 10;
/// Index buckets per flow of capacity, as a fraction `NUM / DEN`: 5/16 of a 64-byte
/// bucket (20 B) per flow. Each flow has two entries (original and reply tuple), so a
/// full table fills `2 / (WAYS * 5 / 16)` = 64% of the ways.
const BUCKETS_PER_FLOW_NUM: u64 = 5;
const BUCKETS_PER_FLOW_DEN: u64 = 16;
/// Bit of an index value: the entry stands for the flow's reply tuple (clear: original).
const REPLY_BIT: u32 = 1 << 31;

/// One cache line of the tuple index: up to [`WAYS`] entries, each a 16-bit fingerprint
/// of the tuple hash and the slab slot (plus [`REPLY_BIT`]) of the flow it names.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Bucket {
    /// Fingerprint per way; 0 marks an empty way (fingerprints are never 0).
    tags: [u16; WAYS],
    /// Slot (with [`REPLY_BIT`] for reply tuples) per way; meaningful when the tag is set.
    vals: [u32; WAYS],
    /// Entries stored after this bucket whose probe passed through it: they hash to this
    /// bucket or an earlier one and found it full. A lookup that misses in a bucket with
    /// no overflow stops there.
    overflow: u32,
}

impl Bucket {
    /// Ways whose fingerprint is `tag`, as a sparse bit mask (decode a set bit with
    /// [`way_of`]): the fingerprints are compared four at a time as 64-bit words (SWAR).
    #[inline]
    fn matches(&self, tag: u16) -> u64 {
        const LO15: u64 = 0x7fff_7fff_7fff_7fff;
        // High bit of each 16-bit lane of `x` that is zero, exactly (no carries cross
        // lanes: 0x7fff + 0x7fff < 0x10000).
        let zero_lanes = |x: u64| !((x & LO15).wrapping_add(LO15) | x | LO15);
        let t = &self.tags;
        let word =
            |g: usize, n: usize| (0..n).fold(0u64, |w, i| w | u64::from(t[g + i]) << (16 * i));
        let pat = u64::from(tag) * 0x0001_0001_0001_0001;
        // Lanes 10 and 11 of the last word are 0 and compare against `tag`, never 0.
        zero_lanes(word(0, 4) ^ pat) >> 15
            | zero_lanes(word(4, 4) ^ pat) >> 14
            | zero_lanes(word(8, WAYS - 8) ^ pat) >> 13
    }
}

impl Bucket {
    /// Empty ways (fingerprint 0), as a sparse bit mask like [`Bucket::matches`].
    #[inline]
    fn empty_ways(&self) -> u64 {
        // `matches(0)` also reports the two lanes past the last way (always 0).
        self.matches(0) & !(1 << 34 | 1 << 50)
    }
}

/// The way a set bit of [`Bucket::matches`] stands for: bit `16 k + g` is way `4 g + k`.
#[inline]
fn way_of(bit: u32) -> usize {
    ((bit & 15) * 4 + (bit >> 4)) as usize
}

/// The tuple index of one family: both tuples of every flow, in a fixed array of
/// cache-line buckets with linear probing (bucket by bucket) and per-bucket overflow
/// counts instead of tombstones (as in folly's F14). Never allocates after
/// construction and never needs a rebuild: it has room for two entries per slab slot.
struct Index {
    /// On transparent huge pages where the kernel allows (see `hugemem.rs`): lookups
    /// land anywhere in it, and on 4 KiB pages nearly every one would also miss the TLB.
    table: HugeTable<Bucket>,
}

impl Index {
    fn new(capacity: usize) -> Self {
        let n = (capacity as u64 * BUCKETS_PER_FLOW_NUM).div_ceil(BUCKETS_PER_FLOW_DEN);
        Self {
            table: HugeTable::zeroed(n as usize),
        }
    }

    #[inline]
    fn buckets(&self) -> &[Bucket] {
        self.table.as_slice()
    }

    #[inline]
    fn buckets_mut(&mut self) -> &mut [Bucket] {
        self.table.as_mut_slice()
    }

    fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
    }

    /// Home bucket of a hash: its low 32 bits scaled to the bucket count (no power of
    /// two needed). Only meaningful with at least one bucket.
    #[inline]
    fn home(&self, hash: u64) -> usize {
        (((hash & 0xffff_ffff) * self.buckets().len() as u64) >> 32) as usize
    }

    /// Fingerprint of a hash: its top 16 bits, never 0.
    #[inline]
    fn tag(hash: u64) -> u16 {
        ((hash >> 48) as u16).max(1)
    }

    #[inline]
    fn next(&self, b: usize) -> usize {
        if b + 1 >= self.buckets().len() {
            0
        } else {
            b + 1
        }
    }

    /// Address of the home bucket, for prefetching.
    #[inline]
    fn home_ptr(&self, hash: u64) -> Option<*const Bucket> {
        if self.buckets().is_empty() {
            return None;
        }
        Some(self.buckets().as_ptr().wrapping_add(self.home(hash)))
    }

    /// The first value stored under `hash` for which `is_it` holds.
    #[inline]
    fn find(&self, hash: u64, mut is_it: impl FnMut(u32) -> bool) -> Option<u32> {
        let tag = Self::tag(hash);
        let mut b = self.home(hash);
        for _ in 0..self.buckets().len() {
            let bucket = self.buckets().get(b)?;
            let mut m = bucket.matches(tag);
            while m != 0 {
                let w = way_of(m.trailing_zeros());
                m &= m - 1;
                let v = bucket.vals.get(w).copied()?;
                if is_it(v) {
                    return Some(v);
                }
            }
            if bucket.overflow == 0 {
                return None;
            }
            b = self.next(b);
        }
        None
    }

    /// Stores `val` under `hash`; false only if every way is taken (cannot happen: the
    /// index has more ways than twice the slab).
    fn insert(&mut self, hash: u64, val: u32) -> bool {
        let n = self.buckets().len();
        if n == 0 {
            return false;
        }
        let tag = Self::tag(hash);
        let home = self.home(hash);
        let mut b = home;
        for _ in 0..n {
            let Some(bucket) = self.buckets_mut().get_mut(b) else {
                return false;
            };
            let empty = bucket.empty_ways();
            if empty != 0 {
                let w = way_of(empty.trailing_zeros());
                let (Some(t), Some(v)) = (bucket.tags.get_mut(w), bucket.vals.get_mut(w)) else {
                    return false;
                };
                *t = tag;
                *v = val;
                let mut c = home;
                while c != b {
                    if let Some(p) = self.buckets_mut().get_mut(c) {
                        p.overflow += 1;
                    }
                    c = self.next(c);
                }
                return true;
            }
            b = self.next(b);
        }
        false
    }

    /// Removes the entry `val` stored under `hash`, if there is one.
    fn remove(&mut self, hash: u64, val: u32) {
        let tag = Self::tag(hash);
        let home = self.home(hash);
        let mut b = home;
        for _ in 0..self.buckets().len() {
            let Some(bucket) = self.buckets_mut().get_mut(b) else {
                return;
            };
            // The tag match is one word-parallel compare (as in `find`): a loop comparing
            // way by way mispredicted at the match, wherever it was.
            let mut m = bucket.matches(tag);
            let mut hit = None;
            while m != 0 {
                let w = way_of(m.trailing_zeros());
                m &= m - 1;
                if bucket.vals.get(w) == Some(&val) {
                    hit = Some(w);
                    break;
                }
            }
            if let Some(w) = hit {
                bucket.tags[w] = 0;
                let mut c = home;
                while c != b {
                    if let Some(p) = self.buckets_mut().get_mut(c) {
                        p.overflow -= 1;
                    }
                    c = self.next(c);
                }
                return;
            }
            if bucket.overflow == 0 {
                return;
            }
            b = self.next(b);
        }
    }

    /// Entries stored (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets()
            .iter()
            .map(|b| b.tags.iter().filter(|&&t| t != 0).count())
            .sum()
    }
}

/// Prefetches the cache line at `p` (a hint: never faults, changes nothing).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint with no architectural effect; it does not fault on
    // any address, valid or not, so any pointer value is fine.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Which side of its flow a tuple index value names.
#[inline]
fn side_of(val: u32) -> Direction {
    if val & REPLY_BIT != 0 {
        Direction::Reply
    } else {
        Direction::Original
    }
}

/// One address family's flows: slab, free list and the tuple index.
struct Table<A> {
    slab: Vec<Entry<A>>,
    free_head: u32,
    len: usize,
    /// Original and reply tuples → slot.
    index: Index,
    /// Slots at or above this were never used (the free list hands out slots in order at
    /// first), so scans of the slab (GC, purge, iter) stop here.
    high_water: usize,
    /// Bumped by every insert and removal.
    epoch: u64,
    /// The last tuple a lookup found no flow for, its hash, and the `epoch` then: while
    /// the epoch is unchanged, no flow holds that tuple, so an insert of it need not
    /// probe for it again.
    absent: Option<(Tuple<A>, u64, u64)>,
    /// Clock hand of the eviction scan.
    evict_hand: usize,
    /// [`FlowId`] tag of this family.
    id_bit: u32,
    seed: u64,
    /// (original, reply) tuples of removed flows, up to its capacity (fixed at
    /// construction), until drained.
    removed: Vec<(Tuple<A>, Tuple<A>)>,
    removal_overflow: u64,
}

impl<A: Addr> Table<A> {
    fn new(capacity: usize, id_bit: u32, seed: u64, removal_log: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let mut slab = Vec::with_capacity(capacity);
        for i in 0..capacity {
            let next = if i + 1 < capacity { i as u32 + 1 } else { NIL };
            slab.push(Entry::free(next));
        }
        Self {
            slab,
            free_head: if capacity == 0 { NIL } else { 0 },
            len: 0,
            index: Index::new(capacity),
            high_water: 0,
            epoch: 0,
            absent: None,
            evict_hand: 0,
            id_bit,
            seed,
            removed: Vec::with_capacity(removal_log),
            removal_overflow: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.slab.len()
    }

    fn memory_bytes(&self) -> usize {
        self.slab.capacity() * core::mem::size_of::<Entry<A>>() + self.index.memory_bytes()
    }

    /// The slot holding `t` as its original or reply tuple (live or expired), and which
    /// side `t` is. A flow whose two tuples are equal matches as [`Direction::Original`].
    #[inline]
    fn find(&self, hash: u64, t: &Tuple<A>) -> Option<(u32, Direction)> {
        self.find_hinted(hash, t, None)
    }

    /// [`Table::find`], trying first the index value `candidate` (from
    /// [`Table::prefetch_entry`]) without reading the index: a slot holds a given tuple in
    /// at most one flow (inserts refuse a tuple any flow, live or expired, holds), so if
    /// the candidate's flow has the tuple, it is the one the index search finds.
    #[inline]
    fn find_hinted(
        &self,
        hash: u64,
        t: &Tuple<A>,
        candidate: Option<u32>,
    ) -> Option<(u32, Direction)> {
        let slab = &self.slab;
        let is_it = |v: u32| {
            slab.get((v & !REPLY_BIT) as usize)
                .is_some_and(|e| !e.is_free() && e.tuple(side_of(v)) == *t)
        };
        let v = match candidate {
            Some(v) if is_it(v) => v,
            _ => self.index.find(hash, is_it)?,
        };
        let slot = v & !REPLY_BIT;
        let dir = match side_of(v) {
            Direction::Reply
                if slab
                    .get(slot as usize)
                    .is_some_and(|e| e.orig_tuple() != *t) =>
            {
                Direction::Reply
            }
            _ => Direction::Original,
        };
        Some((slot, dir))
    }

    /// The live slot holding `t`; an expired one is removed on the way.
    #[inline]
    fn find_live(
        &mut self,
        hash: u64,
        t: &Tuple<A>,
        now_s: u32,
        stats: &mut ConntrackStats,
    ) -> Option<(u32, Direction)> {
        self.find_live_hinted(hash, t, None, now_s, stats)
    }

    /// [`Table::find_live`] with a [`Table::find_hinted`] candidate.
    #[inline]
    fn find_live_hinted(
        &mut self,
        hash: u64,
        t: &Tuple<A>,
        candidate: Option<u32>,
        now_s: u32,
        stats: &mut ConntrackStats,
    ) -> Option<(u32, Direction)> {
        let (slot, dir) = self.find_hinted(hash, t, candidate)?;
        if self.slab.get(slot as usize)?.is_expired(now_s) {
            self.remove(slot);
            stats.expired += 1;
            return None;
        }
        Some((slot, dir))
    }

    /// [`Table::find_live_hinted`] that reads the slab entry once (one bounds check, one
    /// reference kept for the match, the direction, the expiry and the NAT): the live slot
    /// holding `t`, the side `t` is, and the tuple a packet of that side leaves with
    /// ([`Entry::translated`]). An expired flow met is removed, as there.
    #[inline]
    fn find_translated(
        &mut self,
        hash: u64,
        t: &Tuple<A>,
        candidate: Option<u32>,
        now_s: u32,
        stats: &mut ConntrackStats,
    ) -> Option<(u32, Direction, Tuple<A>)> {
        let slab = &self.slab;
        let holder = |v: u32| {
            slab.get((v & !REPLY_BIT) as usize)
                .filter(|e| !e.is_free() && e.tuple(side_of(v)) == *t)
        };
        let (v, e) = match candidate.and_then(|v| Some((v, holder(v)?))) {
            Some(hit) => hit,
            None => {
                let v = self.index.find(hash, |v| holder(v).is_some())?;
                (v, holder(v)?)
            }
        };
        let slot = v & !REPLY_BIT;
        // As `find_hinted`: a flow whose two tuples are equal matches as the original.
        let dir = match side_of(v) {
            Direction::Reply if e.orig_tuple() != *t => Direction::Reply,
            _ => Direction::Original,
        };
        if e.expires < now_s {
            self.remove(slot);
            stats.expired += 1;
            return None;
        }
        Some((slot, dir, e.translated(dir)))
    }

    /// Whether a live flow has `t` as its original or reply tuple.
    fn tuple_in_use(&self, t: &Tuple<A>, now_s: u32) -> bool {
        self.find(t.hash(self.seed), t)
            .and_then(|(i, _)| self.slab.get(i as usize))
            .is_some_and(|e| !e.is_expired(now_s))
    }

    fn id(&self, slot: u32) -> FlowId {
        FlowId(self.id_bit | slot)
    }

    fn lookup(
        &mut self,
        t: &Tuple<A>,
        now_s: u32,
        stats: &mut ConntrackStats,
    ) -> Option<FlowMatch> {
        let hash = t.hash(self.seed);
        match self.find_live(hash, t, now_s, stats) {
            Some((slot, dir)) => self.slab.get(slot as usize)?.flow_match(self.id(slot), dir),
            None => {
                self.absent = Some((*t, hash, self.epoch));
                None
            }
        }
    }

    /// Prefetches the home bucket of `hash`.
    #[inline]
    fn prefetch_bucket(&self, hash: u64) {
        if let Some(p) = self.index.home_ptr(hash) {
            prefetch(p);
        }
    }

    /// Prefetches the slab entry of the first way of `hash`'s home bucket whose
    /// fingerprint matches (both cache lines it may straddle).
    /// Returns whether the tuple may be in the index, and the index value prefetched (a
    /// candidate for [`Table::find_hinted`]).
    #[inline]
    fn prefetch_entry(&self, hash: u64) -> (bool, Option<u32>) {
        if self.index.buckets().is_empty() {
            return (false, None);
        }
        let Some(b) = self.index.buckets().get(self.index.home(hash)) else {
            return (false, None);
        };
        let m = b.matches(Index::tag(hash));
        if m == 0 {
            // Not in its home bucket; elsewhere only if the bucket overflowed.
            return (b.overflow != 0, None);
        }
        let Some(v) = b.vals.get(way_of(m.trailing_zeros())).copied() else {
            return (true, None);
        };
        let slot = (v & !REPLY_BIT) as usize;
        if slot < self.slab.len() {
            let p = self.slab.as_ptr().wrapping_add(slot);
            prefetch(p);
            prefetch(
                p.cast::<u8>()
                    .wrapping_add(core::mem::size_of::<Entry<A>>() - 1),
            );
        }
        (true, Some(v))
    }

    /// Frees an occupied slot and unlinks both its tuples from the index.
    fn remove(&mut self, slot: u32) {
        let Some(e) = self.slab.get(slot as usize).copied() else {
            return;
        };
        if e.is_free() {
            return;
        }
        self.index.remove(e.orig_tuple().hash(self.seed), slot);
        self.index
            .remove(e.reply_tuple().hash(self.seed), slot | REPLY_BIT);
        if self.removed.capacity() > 0 {
            if self.removed.len() < self.removed.capacity() {
                self.removed.push((e.orig_tuple(), e.reply_tuple()));
            } else {
                self.removal_overflow += 1;
            }
        }
        if let Some(e) = self.slab.get_mut(slot as usize) {
            *e = Entry::free(self.free_head);
            self.free_head = slot;
            self.len -= 1;
            self.epoch += 1;
        }
    }

    /// Prefetch pass for a full table (hints only): the slab entries the eviction clock
    /// hand looks at next, as many as `n` evictions take when every one qualifies (a
    /// new-flow flood: each is the next unestablished flow).
    #[inline]
    fn prefetch_victims(&self, n: usize) {
        let cap = self.capacity();
        if n == 0 || self.len < cap {
            return;
        }
        let start = self.evict_hand % cap;
        for k in 0..n.min(cap) {
            prefetch(self.slab.as_ptr().wrapping_add((start + k) % cap));
        }
    }

    /// The pass after [`Table::prefetch_victims`]: the home index buckets of both tuples
    /// of the next `n` flows [`Table::make_room`] would pick (expired or not established,
    /// from the hand on, looking at most `2 n` slots), which their removal unlinks.
    #[inline]
    fn prefetch_victim_buckets(&self, n: usize, now_s: u32) {
        let cap = self.capacity();
        if n == 0 || self.len < cap {
            return;
        }
        let start = self.evict_hand % cap;
        let mut found = 0;
        for k in 0..(2 * n).min(cap) {
            if found == n {
                break;
            }
            let Some(e) = self.slab.get((start + k) % cap) else {
                break;
            };
            if e.is_free() || !(e.is_expired(now_s) || e.is_unestablished()) {
                continue;
            }
            for h in [
                e.orig_tuple().hash(self.seed),
                e.reply_tuple().hash(self.seed),
            ] {
                if let Some(p) = self.index.home_ptr(h) {
                    prefetch(p);
                }
            }
            found += 1;
        }
    }

    /// Frees one slot by the eviction policy; false if nothing qualifies.
    fn make_room(&mut self, scan: usize, now_s: u32, stats: &mut ConntrackStats) -> bool {
        let cap = self.capacity();
        if cap == 0 {
            return false;
        }
        let scan = scan.min(cap);
        let start = self.evict_hand % cap;
        let next = |slot: usize| if slot + 1 == cap { 0 } else { slot + 1 };
        // Slots are stepped, not computed with `%` per slot: under a new-flow flood every
        // insert evicts, and a division per scanned slot was a fifth of the eviction.
        let mut candidate = None;
        let mut slot = start;
        for _ in 0..scan {
            if let Some(e) = self.slab.get(slot) {
                if e.is_expired(now_s) {
                    self.remove(slot as u32);
                    stats.expired += 1;
                    self.evict_hand = next(slot);
                    return true;
                }
                if candidate.is_none() && !e.is_free() && e.is_unestablished() {
                    candidate = Some(slot);
                }
            }
            slot = next(slot);
        }
        match candidate {
            Some(victim) => {
                self.remove(victim as u32);
                stats.evicted_early += 1;
                self.evict_hand = next(victim);
                true
            }
            None => {
                self.evict_hand = slot;
                false
            }
        }
    }

    fn insert(
        &mut self,
        mut e: Entry<A>,
        first_tcp_flags: u8,
        now_s: u32,
        cfg: &ConntrackConfig,
        stats: &mut ConntrackStats,
    ) -> Result<FlowId, InsertError> {
        // Neither tuple may be taken by a live flow, in either direction. The original
        // tuple needs no probe if a lookup just found nothing for it and nothing changed
        // since.
        let orig = e.orig_tuple();
        let ho = match self.absent {
            Some((t, h, epoch)) if epoch == self.epoch && t == orig => h,
            _ => {
                let h = orig.hash(self.seed);
                if self.find_live(h, &orig, now_s, stats).is_some() {
                    stats.exists += 1;
                    return Err(InsertError::Exists);
                }
                h
            }
        };
        let reply = e.reply_tuple();
        let hr = reply.hash(self.seed);
        if self.find_live(hr, &reply, now_s, stats).is_some() {
            stats.exists += 1;
            return Err(InsertError::Exists);
        }
        if self.len >= self.capacity() && !self.make_room(cfg.eviction_scan, now_s, stats) {
            stats.full += 1;
            return Err(InsertError::Full);
        }
        let slot = self.free_head;
        let Some(next) = self.slab.get(slot as usize).map(|f| f.expires) else {
            // Free list empty though len < capacity: cannot happen; refuse rather than panic.
            stats.full += 1;
            return Err(InsertError::Full);
        };

        let t = &cfg.timeouts;
        let (state, timeout) = if e.proto == L4Proto::Tcp as u8 {
            let s = tcp_initial(first_tcp_flags, &mut e.flags);
            (s, t.tcp(s))
        } else if e.proto == L4Proto::Udp as u8 {
            (TcpState::None, t.udp_unreplied)
        } else {
            (TcpState::None, t.sctp)
        };
        e.state = state.as_u8();
        e.expires = now_s.saturating_add(timeout);

        self.free_head = next;
        // The next insert reads the new head's link: start loading it now (once flows
        // have come and gone the free list is in no particular order).
        if (next as usize) < self.slab.len() {
            prefetch(self.slab.as_ptr().wrapping_add(next as usize));
        }
        if let Some(s) = self.slab.get_mut(slot as usize) {
            *s = e;
        }
        self.len += 1;
        self.epoch += 1;
        self.high_water = self.high_water.max(slot as usize + 1);
        let ok = self.index.insert(ho, slot) && self.index.insert(hr, slot | REPLY_BIT);
        debug_assert!(ok, "the index has room for two entries per slot");
        stats.inserted += 1;
        Ok(self.id(slot))
    }

    /// Removes expired flows in slots `start..end`.
    fn reap(&mut self, start: usize, end: usize, now_s: u32) -> usize {
        if self.len == 0 {
            return 0;
        }
        let mut removed = 0;
        for slot in start..end.min(self.high_water) {
            if self.slab.get(slot).is_some_and(|e| e.is_expired(now_s)) {
                self.remove(slot as u32);
                removed += 1;
            }
        }
        removed
    }

    fn purge(
        &mut self,
        slots: core::ops::Range<usize>,
        keep: &mut impl FnMut(&FlowMatch) -> bool,
        stats: &mut ConntrackStats,
    ) -> usize {
        let mut removed = 0;
        for slot in slots.start..slots.end.min(self.high_water) {
            let id = self.id(slot as u32);
            let m = self
                .slab
                .get(slot)
                .filter(|e| !e.is_free())
                .and_then(|e| e.flow_match(id, Direction::Original));
            if let Some(m) = m {
                if !keep(&m) {
                    self.remove(slot as u32);
                    removed += 1;
                }
            }
        }
        stats.purged += removed as u64;
        removed
    }

    fn iter(&self) -> impl Iterator<Item = FlowMatch> + '_ {
        self.slab
            .get(..self.high_water)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| {
                if e.is_free() {
                    None
                } else {
                    e.flow_match(self.id(slot as u32), Direction::Original)
                }
            })
    }
}

/// A worker's connection tracking table. See the module doc.
pub struct Conntrack {
    cfg: ConntrackConfig,
    v4: Table<u32>,
    v6: Table<[u8; 16]>,
    /// The first `now_ns` seen: second 0 of the table's clock.
    epoch_ns: Option<u64>,
    /// GC cursor over the IPv4 slots followed by the IPv6 slots.
    gc_cursor: usize,
    stats: ConntrackStats,
}

impl fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conntrack")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Which family a key belongs to, with its compact tuple.
enum FamilyTuple {
    V4(Tuple<u32>),
    V6(Tuple<[u8; 16]>),
}

impl FamilyTuple {
    #[inline]
    fn of(k: &FlowKey) -> Option<Self> {
        match k.src {
            IpAddr::V4(_) => Tuple::from_key(k).map(Self::V4),
            IpAddr::V6(_) => Tuple::from_key(k).map(Self::V6),
        }
    }
}

fn build_entry<A: Addr>(orig: &FlowKey, nat: &NatBinding) -> Option<Entry<A>> {
    let mut e = Entry {
        src: A::from_ip(orig.src)?,
        dst: A::from_ip(orig.dst)?,
        backend: A::from_ip(nat.backend)?,
        sport: orig.sport,
        dport: orig.dport,
        backend_port: nat.backend_port,
        service_port: nat.service_port.0,
        proto: orig.proto as u8,
        ..Entry::default()
    };
    if let Some(snat) = nat.snat {
        e.snat_addr = A::from_ip(snat.addr)?;
        e.snat_port = snat.port;
        e.flags |= F_SNAT;
    }
    Some(e)
}

impl Conntrack {
    /// Allocates both families' tables to capacity. The only allocation a `Conntrack`
    /// makes.
    pub fn new(cfg: ConntrackConfig) -> Self {
        Self {
            v4: Table::new(cfg.capacity, 0, cfg.hash_seed, cfg.removal_log),
            v6: Table::new(cfg.capacity_v6, V6_ID_BIT, cfg.hash_seed, cfg.removal_log),
            cfg,
            epoch_ns: None,
            gc_cursor: 0,
            stats: ConntrackStats::default(),
        }
    }

    /// The configuration the table was built with.
    pub fn config(&self) -> &ConntrackConfig {
        &self.cfg
    }

    /// Hands `f` the (original, reply) tuples of every flow removed since the last call
    /// (expired, evicted, purged or removed), oldest first, and forgets them. Nothing is
    /// remembered unless [`ConntrackConfig::removal_log`] is set.
    pub fn drain_removed(&mut self, mut f: impl FnMut(&FlowKey, &FlowKey)) {
        fn each<A: Addr>(t: &mut Table<A>, f: &mut impl FnMut(&FlowKey, &FlowKey)) {
            for (o, r) in t.removed.drain(..) {
                if let (Some(o), Some(r)) = (o.flow_key(), r.flow_key()) {
                    f(&o, &r);
                }
            }
        }
        each(&mut self.v4, &mut f);
        each(&mut self.v6, &mut f);
        self.stats.removal_log_overflow = self.v4.removal_overflow + self.v6.removal_overflow;
    }

    /// `now_ns` as whole seconds of the table's clock, starting the clock if needed.
    #[inline]
    fn now_s(&mut self, now_ns: u64) -> u32 {
        let epoch = *self.epoch_ns.get_or_insert(now_ns);
        secs_since(epoch, now_ns)
    }

    /// Same without starting the clock (an unstarted clock means an empty table).
    fn peek_now_s(&self, now_ns: u64) -> u32 {
        secs_since(self.epoch_ns.unwrap_or(now_ns), now_ns)
    }

    /// Finds the flow a packet belongs to, from either direction: `key` is the packet's
    /// tuple as seen on the wire. The original direction matches the flow's original
    /// tuple (client → service frontend); the reply direction matches the reply tuple
    /// (backend:backend_port → snat.addr:snat.port with SNAT, else → client addr:port).
    /// Expired flows never match (they are removed here when met).
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now_ns: u64) -> Option<FlowMatch> {
        let now_s = self.now_s(now_ns);
        match FamilyTuple::of(key)? {
            FamilyTuple::V4(t) => self.v4.lookup(&t, now_s, &mut self.stats),
            FamilyTuple::V6(t) => self.v6.lookup(&t, now_s, &mut self.stats),
        }
    }

    /// Batch support (see `Worker::process_batch`): prefetches the index bucket that
    /// holds `key`'s tuple, if tracked, and returns what [`Conntrack::prefetch_flow`] needs.
    /// A hint only: nothing changes, and a later [`Conntrack::lookup`] finds the same.
    #[inline]
    pub fn prefetch_bucket(&self, key: &FlowKey) -> Option<FlowHash> {
        match FamilyTuple::of(key)? {
            FamilyTuple::V4(t) => {
                let hash = t.hash(self.v4.seed);
                self.v4.prefetch_bucket(hash);
                Some(FlowHash { hash, v6: false })
            }
            FamilyTuple::V6(t) => {
                let hash = t.hash(self.v6.seed);
                self.v6.prefetch_bucket(hash);
                Some(FlowHash { hash, v6: true })
            }
        }
    }

    /// Batch support, after [`Conntrack::prefetch_bucket`] (ideally for a whole batch, so
    /// the bucket is in cache by now): prefetches the slab entry of the flow the tuple
    /// most likely belongs to. A hint only. Returns false if the tuple is certainly not
    /// in the index (no fingerprint match in a home bucket that never overflowed): its
    /// packet will take the new-flow path, unless a flow is created for it first.
    #[inline]
    pub fn prefetch_flow(&self, h: FlowHash) -> bool {
        if h.v6 {
            self.v6.prefetch_entry(h.hash).0
        } else {
            self.v4.prefetch_entry(h.hash).0
        }
    }

    /// [`Conntrack::prefetch_flow`] of an IPv4 tuple, also returning the flow candidate
    /// [`Conntrack::lookup_v4`] can try before reading the index again.
    #[inline]
    pub(crate) fn prefetch_flow_v4(&self, hash: u64) -> (bool, Option<u32>) {
        self.v4.prefetch_entry(hash)
    }

    /// Prefetch pass of a batch with `n` new IPv4 flows: if the IPv4 table is full, the
    /// slab entries its eviction will look at (hints only).
    #[inline]
    pub(crate) fn prefetch_victims_v4(&self, n: usize) {
        self.v4.prefetch_victims(n);
    }

    /// The pass after [`Conntrack::prefetch_victims_v4`]: the index buckets the evictions
    /// will unlink (hints only).
    #[inline]
    pub(crate) fn prefetch_victim_buckets_v4(&self, n: usize, now_ns: u64) {
        self.v4.prefetch_victim_buckets(n, self.peek_now_s(now_ns));
    }

    /// The index hash of an IPv4 tuple (what [`Conntrack::lookup_v4`] and
    /// [`Conntrack::prefetch_v4`] take).
    #[inline]
    pub(crate) fn hash_v4(&self, t: &Tuple<u32>) -> u64 {
        t.hash(self.v4.seed)
    }

    /// [`Conntrack::prefetch_bucket`] for an IPv4 tuple already hashed.
    #[inline]
    pub(crate) fn prefetch_v4(&self, hash: u64) -> FlowHash {
        self.v4.prefetch_bucket(hash);
        FlowHash { hash, v6: false }
    }

    /// [`Conntrack::lookup`] for an IPv4 tuple, without building a [`FlowMatch`]: the
    /// flow's slot, the packet's direction, and the tuple the packet leaves with (NAT
    /// applied), as a [`HitV4`] for [`Conntrack::on_packet_v4`]. Same effects as `lookup` (the clock starts, an expired flow met is
    /// removed, a miss is remembered for the insert that usually follows). `hash` is
    /// [`Conntrack::hash_v4`] of `t`; `candidate` what [`Conntrack::prefetch_flow_v4`]
    /// returned for it, if anything.
    #[inline]
    pub(crate) fn lookup_v4(
        &mut self,
        t: &Tuple<u32>,
        hash: u64,
        candidate: Option<u32>,
        now_ns: u64,
    ) -> Option<HitV4> {
        let now_s = self.now_s(now_ns);
        let table = &mut self.v4;
        match table.find_translated(hash, t, candidate, now_s, &mut self.stats) {
            Some((slot, dir, out)) => Some(HitV4 {
                slot,
                dir,
                out,
                now_s,
            }),
            None => {
                table.absent = Some((*t, hash, table.epoch));
                None
            }
        }
    }

    /// [`Conntrack::on_packet`] for the flow a [`Conntrack::lookup_v4`] just found, with
    /// nothing changed in the table since: the slot is known to be an IPv4 flow, and the
    /// clock was read by the lookup.
    #[inline]
    pub(crate) fn on_packet_v4(&mut self, hit: &HitV4, tcp_flags: u8) {
        let t = &self.cfg.timeouts;
        if let Some(e) = self.v4.slab.get_mut(hit.slot as usize) {
            e.on_packet(hit.dir, tcp_flags, hit.now_s, t);
        }
    }

    /// Records a new flow; `orig` is the first packet's tuple. `first_tcp_flags` (0 for
    /// non-TCP) sets the initial state (SYN → `SynSent`; a TCP packet without SYN →
    /// `Established`, loose pickup as Linux does mid-stream; see the module doc).
    ///
    /// Fails with [`InsertError::Exists`] if the original or the reply tuple is already
    /// either tuple of a live flow, [`InsertError::Full`] if the family's table is full
    /// and the eviction policy frees nothing, [`InsertError::AddressFamily`] if the
    /// addresses mix IPv4 and IPv6.
    pub fn insert(
        &mut self,
        orig: &FlowKey,
        nat: NatBinding,
        first_tcp_flags: u8,
        now_ns: u64,
    ) -> Result<FlowId, InsertError> {
        let now_s = self.now_s(now_ns);
        match orig.src {
            IpAddr::V4(_) => {
                let e = build_entry(orig, &nat).ok_or(InsertError::AddressFamily)?;
                self.v4
                    .insert(e, first_tcp_flags, now_s, &self.cfg, &mut self.stats)
            }
            IpAddr::V6(_) => {
                let e = build_entry(orig, &nat).ok_or(InsertError::AddressFamily)?;
                self.v6
                    .insert(e, first_tcp_flags, now_s, &self.cfg, &mut self.stats)
            }
        }
    }

    /// Advances state and refreshes the expiry for a packet of a tracked flow.
    /// `tcp_flags` is the raw TCP flag byte ([`tcp_flags`]); 0 for UDP/SCTP. Returns the
    /// new [`TcpState`] (`None` for UDP/SCTP, and for an id that names no flow).
    #[inline]
    pub fn on_packet(
        &mut self,
        id: FlowId,
        dir: Direction,
        tcp_flags: u8,
        now_ns: u64,
    ) -> TcpState {
        let now_s = self.now_s(now_ns);
        let slot = (id.0 & !V6_ID_BIT) as usize;
        let t = &self.cfg.timeouts;
        let entry = if id.0 & V6_ID_BIT == 0 {
            self.v4
                .slab
                .get_mut(slot)
                .filter(|e| !e.is_free())
                .map(|e| e.on_packet(dir, tcp_flags, now_s, t))
        } else {
            self.v6
                .slab
                .get_mut(slot)
                .filter(|e| !e.is_free())
                .map(|e| e.on_packet(dir, tcp_flags, now_s, t))
        };
        entry.unwrap_or(TcpState::None)
    }

    /// Whether `reply` is already taken by a live flow, as its reply tuple or its
    /// original tuple (either would make a packet with this tuple ambiguous, and
    /// [`Conntrack::insert`] refuse a flow with this reply tuple). SNAT port allocation
    /// uses this to stay collision-free.
    pub fn reply_tuple_in_use(&self, reply: &FlowKey, now_ns: u64) -> bool {
        let now_s = self.peek_now_s(now_ns);
        match FamilyTuple::of(reply) {
            Some(FamilyTuple::V4(t)) => self.v4.tuple_in_use(&t, now_s),
            Some(FamilyTuple::V6(t)) => self.v6.tuple_in_use(&t, now_s),
            None => false,
        }
    }

    /// Removes expired flows, looking at no more than `budget` slots from a cursor that
    /// persists between calls (it walks the IPv4 slots, then the IPv6 slots, and wraps).
    /// Returns the number removed.
    pub fn gc(&mut self, now_ns: u64, budget: usize) -> usize {
        let now_s = self.now_s(now_ns);
        let (cap4, cap6) = (self.v4.capacity(), self.v6.capacity());
        let total = cap4 + cap6;
        if total == 0 {
            return 0;
        }
        let mut left = budget.min(total);
        let mut removed = 0;
        while left > 0 {
            let c = self.gc_cursor % total;
            let n = if c < cap4 {
                let n = left.min(cap4 - c);
                removed += self.v4.reap(c, c + n, now_s);
                n
            } else {
                let s = c - cap4;
                let n = left.min(cap6 - s);
                removed += self.v6.reap(s, s + n, now_s);
                n
            };
            left -= n;
            self.gc_cursor = (c + n) % total;
        }
        self.stats.expired += removed as u64;
        removed
    }

    /// Off the fast path: removes every flow for which `keep` returns false (used when a
    /// table publish removes endpoints). `keep` sees original-direction views of every
    /// stored flow, including expired ones GC has not collected yet. Returns the count.
    pub fn purge(&mut self, mut keep: impl FnMut(&FlowMatch) -> bool) -> usize {
        let (c4, c6) = (self.v4.capacity(), self.v6.capacity());
        self.v4.purge(0..c4, &mut keep, &mut self.stats)
            + self.v6.purge(0..c6, &mut keep, &mut self.stats)
    }

    /// [`Conntrack::purge`] in bounded steps, for the fast path's housekeeping: examines at
    /// most `budget` slots from `cursor` (IPv4 slots, then IPv6 slots) and returns the
    /// number removed and the cursor to continue from, `None` once every slot was seen.
    pub fn purge_step(
        &mut self,
        cursor: usize,
        budget: usize,
        mut keep: impl FnMut(&FlowMatch) -> bool,
    ) -> (usize, Option<usize>) {
        let (c4, c6) = (self.v4.capacity(), self.v6.capacity());
        let total = c4 + c6;
        let end = cursor.saturating_add(budget).min(total);
        let mut removed = 0;
        if cursor < c4 {
            removed += self
                .v4
                .purge(cursor..end.min(c4), &mut keep, &mut self.stats);
        }
        if end > c4 {
            removed += self
                .v6
                .purge(cursor.max(c4) - c4..end - c4, &mut keep, &mut self.stats);
        }
        (removed, (end < total).then_some(end))
    }

    /// Flows stored, including expired ones not collected yet.
    pub fn len(&self) -> usize {
        self.v4.len + self.v6.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total hard capacity: IPv4 plus IPv6 flows.
    pub fn capacity(&self) -> usize {
        self.v4.capacity() + self.v6.capacity()
    }

    /// Whether the kernel accepted the huge-page advice for both families' indexes (see
    /// `hugemem.rs`; with THP `never` it refuses, and the tables work on 4 KiB pages).
    pub fn index_on_huge_pages(&self) -> bool {
        [&self.v4.index, &self.v6.index]
            .iter()
            .all(|i| i.buckets().is_empty() || i.table.huge_pages_advised())
    }

    pub fn stats(&self) -> ConntrackStats {
        self.stats
    }

    /// Bytes of heap held by the table (both families' slabs and indexes), for the
    /// per-flow memory report. Fixed at construction.
    pub fn memory_bytes(&self) -> usize {
        self.v4.memory_bytes() + self.v6.memory_bytes()
    }

    /// Original-direction views of every stored flow (including expired ones not collected
    /// yet), IPv4 first, in slot order. For dumps and tests.
    pub fn iter(&self) -> impl Iterator<Item = FlowMatch> + '_ {
        self.v4.iter().chain(self.v6.iter())
    }
}

fn secs_since(epoch_ns: u64, now_ns: u64) -> u32 {
    let s = now_ns.saturating_sub(epoch_ns) / 1_000_000_000;
    u32::try_from(s).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;
    /// An arbitrary epoch with a sub-second part.
    const T0: u64 = 7 * S + 250_000_000;
    const TCP: L4Proto = L4Proto::Tcp;
    const UDP: L4Proto = L4Proto::Udp;

    fn at(secs: u64) -> u64 {
        T0 + secs * S
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(src: &str, sport: u16, dst: &str, dport: u16, proto: L4Proto) -> FlowKey {
        FlowKey {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            proto,
        }
    }

    fn nat(backend: &str, backend_port: u16, snat: Option<(&str, u16)>) -> NatBinding {
        NatBinding {
            backend: ip(backend),
            backend_port,
            snat: snat.map(|(a, p)| SnatBinding {
                addr: ip(a),
                port: p,
            }),
            service_port: ServicePortId(7),
        }
    }

    /// The reply tuple, computed independently of the implementation.
    fn reply_of(orig: &FlowKey, nat: &NatBinding) -> FlowKey {
        let (dst, dport) = match nat.snat {
            Some(s) => (s.addr, s.port),
            None => (orig.src, orig.sport),
        };
        FlowKey {
            src: nat.backend,
            dst,
            sport: nat.backend_port,
            dport,
            proto: orig.proto,
        }
    }

    fn cfg(capacity: usize) -> ConntrackConfig {
        ConntrackConfig {
            capacity,
            capacity_v6: capacity,
            ..ConntrackConfig::default()
        }
    }

    fn new_ct(capacity: usize) -> Conntrack {
        let mut ct = Conntrack::new(cfg(capacity));
        ct.gc(at(0), 0); // start the clock at T0
        ct
    }

    fn check_both_directions(orig: FlowKey, n: NatBinding) {
        let mut ct = new_ct(16);
        let id = ct.insert(&orig, n, tcp_flags::SYN, at(0)).unwrap();
        let reply = reply_of(&orig, &n);

        let m = ct.lookup(&orig, at(1)).expect("original direction");
        assert_eq!(
            (m.id, m.dir, m.orig, m.nat),
            (id, Direction::Original, orig, n)
        );
        assert_eq!(m.tcp_state, TcpState::SynSent);

        let m = ct.lookup(&reply, at(1)).expect("reply direction");
        assert_eq!(
            (m.id, m.dir, m.orig, m.nat),
            (id, Direction::Reply, orig, n)
        );

        // Neither the reversed original tuple nor a reply to the frontend is the flow.
        assert!(ct.lookup(&orig.reversed(), at(1)).is_none());
        let to_frontend = FlowKey {
            dst: orig.dst,
            dport: orig.dport,
            ..reply
        };
        assert!(ct.lookup(&to_frontend, at(1)).is_none());
        if n.snat.is_some() {
            // With SNAT, a reply straight to the client is not the flow's reply.
            assert!(ct.lookup(&orig.reversed(), at(1)).is_none());
            let to_client = FlowKey {
                dst: orig.src,
                dport: orig.sport,
                ..reply
            };
            assert!(ct.lookup(&to_client, at(1)).is_none());
        }
        // Other protocol, other port: no match.
        assert!(ct.lookup(&FlowKey { proto: UDP, ..orig }, at(1)).is_none());
        assert!(ct
            .lookup(
                &FlowKey {
                    sport: orig.sport + 1,
                    ..orig
                },
                at(1)
            )
            .is_none());
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn lookup_from_both_directions_v4() {
        let orig = key("10.0.0.1", 40000, "10.96.0.10", 80, TCP);
        check_both_directions(orig, nat("10.1.0.5", 8080, None));
        check_both_directions(orig, nat("10.1.0.5", 8080, Some(("192.168.0.1", 61000))));
    }

    #[test]
    fn lookup_from_both_directions_v6() {
        let orig = key("fd00::1", 40000, "fd00:96::10", 80, TCP);
        check_both_directions(orig, nat("fd00:1::5", 8080, None));
        check_both_directions(orig, nat("fd00:1::5", 8080, Some(("fd00:ff::1", 61000))));
    }

    #[test]
    fn families_are_separate_and_never_mixed() {
        let mut ct = new_ct(16);
        let v4 = key("10.0.0.1", 1, "10.96.0.10", 80, UDP);
        let v6 = key("fd00::1", 1, "fd00:96::10", 80, UDP);
        let a = ct.insert(&v4, nat("10.1.0.5", 80, None), 0, at(0)).unwrap();
        let b = ct
            .insert(&v6, nat("fd00:1::5", 80, None), 0, at(0))
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(ct.lookup(&v4, at(0)).unwrap().id, a);
        assert_eq!(ct.lookup(&v6, at(0)).unwrap().id, b);
        assert_eq!(
            ct.insert(&v4, nat("fd00:1::5", 80, None), 0, at(0)),
            Err(InsertError::AddressFamily)
        );
        let mixed = key("10.0.0.2", 1, "fd00:96::10", 80, UDP);
        assert_eq!(
            ct.insert(&mixed, nat("10.1.0.5", 80, None), 0, at(0)),
            Err(InsertError::AddressFamily)
        );
        assert_eq!(
            ct.insert(
                &key("10.0.0.3", 1, "10.96.0.10", 80, UDP),
                nat("10.1.0.5", 80, Some(("fd00::9", 5))),
                0,
                at(0)
            ),
            Err(InsertError::AddressFamily)
        );
        assert!(ct.lookup(&mixed, at(0)).is_none());
        assert!(!ct.reply_tuple_in_use(&mixed, at(0)));
        assert_eq!(ct.len(), 2);
        assert_eq!(ct.capacity(), 32);
    }

    /// Drives a fresh flow through `packets` (one a second from second 10), then checks it lives
    /// exactly its `timeout` (1 s granularity) and returns the final state.
    fn drive(first: u8, packets: &[(Direction, u8)], ct_cfg: &ConntrackConfig) -> TcpState {
        let mut ct = Conntrack::new(ct_cfg.clone());
        let orig = key("10.0.0.1", 40000, "10.96.0.10", 80, TCP);
        let id = ct
            .insert(&orig, nat("10.1.0.5", 8080, None), first, at(0))
            .unwrap();
        let mut state = ct.lookup(&orig, at(0)).unwrap().tcp_state;
        let mut last = 0;
        for (i, &(dir, flags)) in packets.iter().enumerate() {
            last = 10 + i as u64;
            state = ct.on_packet(id, dir, flags, at(last));
            assert_eq!(ct.lookup(&orig, at(last)).unwrap().tcp_state, state);
        }
        let timeout = u64::from(ct_cfg.timeouts.tcp(state));
        assert!(
            ct.lookup(&orig, at(last + timeout)).is_some(),
            "{state:?} must live {timeout} s"
        );
        assert!(
            ct.lookup(&orig, at(last + timeout + 1)).is_none(),
            "{state:?} must expire after {timeout} s"
        );
        state
    }

    #[test]
    fn tcp_states_and_their_timeouts() {
        use tcp_flags::*;
        use Direction::{Original as O, Reply as R};
        use TcpState as T;
        let c = cfg(8);
        let hs = [(R, SYN | ACK), (O, ACK)];
        assert_eq!(drive(SYN, &[], &c), T::SynSent);
        assert_eq!(drive(SYN, &hs[..1], &c), T::SynRecv);
        assert_eq!(drive(SYN, &hs, &c), T::Established);
        // Out-of-order/unexpected packets keep the state.
        assert_eq!(drive(SYN, &[(O, ACK)], &c), T::SynSent);
        assert_eq!(drive(SYN, &[(O, SYN | ACK)], &c), T::SynSent);
        assert_eq!(drive(SYN, &[hs[0], hs[1], (O, SYN)], &c), T::Established);
        assert_eq!(drive(SYN, &[hs[0], hs[1], (R, SYN)], &c), T::Established);
        assert_eq!(
            drive(SYN, &[hs[0], hs[1], (R, SYN | ACK)], &c),
            T::Established
        );
        // Original side closes first.
        let close = [
            hs[0],
            hs[1],
            (O, FIN | ACK),
            (R, ACK),
            (R, FIN | ACK),
            (O, ACK),
        ];
        let expect = [T::FinWait, T::CloseWait, T::LastAck, T::TimeWait];
        for (n, want) in expect.iter().enumerate() {
            assert_eq!(drive(SYN, &close[..3 + n], &c), *want, "step {n}");
        }
        // Reply side closes first; the closer's own ACKs don't advance.
        let close = [
            (R, FIN | ACK),
            (R, ACK),
            (O, ACK),
            (O, FIN | ACK),
            (O, ACK),
            (R, ACK),
        ];
        let expect = [
            T::FinWait,
            T::FinWait,
            T::CloseWait,
            T::LastAck,
            T::LastAck,
            T::TimeWait,
        ];
        for (n, want) in expect.iter().enumerate() {
            assert_eq!(drive(ACK, &close[..=n], &c), *want, "step {n}");
        }
        // Simultaneous-ish close: FIN, then FIN+ACK from the other side.
        assert_eq!(drive(ACK, &[(O, FIN), (R, FIN | ACK)], &c), T::LastAck);
        assert_eq!(
            drive(ACK, &[(O, FIN), (R, FIN | ACK), (R, ACK)], &c),
            T::LastAck
        );
        assert_eq!(
            drive(ACK, &[(O, FIN), (R, FIN | ACK), (O, ACK)], &c),
            T::TimeWait
        );
        // A retransmitted FIN stays where it is.
        assert_eq!(drive(ACK, &[(O, FIN), (O, FIN | ACK)], &c), T::FinWait);
        assert_eq!(
            drive(ACK, &[(O, FIN), (R, ACK), (O, FIN)], &c),
            T::CloseWait
        );
        // RST from anywhere closes.
        assert_eq!(drive(SYN, &[(R, RST)], &c), T::Close);
        assert_eq!(drive(ACK, &[(O, RST | ACK)], &c), T::Close);
        assert_eq!(drive(ACK, &[(O, FIN), (R, RST)], &c), T::Close);
        // A new SYN reopens a closed or time-waiting tuple, and FIN history is forgotten.
        let tw = [(O, FIN), (R, FIN | ACK), (O, ACK)];
        let mut reopen = tw.to_vec();
        reopen.push((O, SYN));
        assert_eq!(drive(ACK, &reopen, &c), T::SynSent);
        reopen.extend([hs[0], hs[1], (O, FIN)]);
        assert_eq!(drive(ACK, &reopen, &c), T::FinWait);
        assert_eq!(drive(ACK, &[(R, RST), (O, SYN)], &c), T::SynSent);
        // Loose pickup.
        assert_eq!(drive(ACK, &[], &c), T::Established);
        assert_eq!(drive(0, &[], &c), T::Established);
        assert_eq!(drive(FIN | ACK, &[], &c), T::FinWait);
        assert_eq!(
            drive(FIN | ACK, &[(R, FIN | ACK), (O, ACK)], &c),
            T::TimeWait
        );
        assert_eq!(drive(RST, &[], &c), T::Close);
        assert_eq!(drive(SYN | ACK, &[], &c), T::SynSent);
    }

    #[test]
    fn custom_timeouts_are_used() {
        let mut c = cfg(8);
        c.timeouts = Timeouts {
            tcp_syn_sent: 3,
            tcp_syn_recv: 4,
            tcp_established: 5,
            tcp_fin_wait: 6,
            tcp_close_wait: 7,
            tcp_last_ack: 8,
            tcp_time_wait: 9,
            tcp_close: 2,
            udp_unreplied: 1,
            udp_replied: 11,
            sctp: 12,
        };
        use tcp_flags::*;
        use Direction::{Original as O, Reply as R};
        assert_eq!(drive(SYN, &[], &c), TcpState::SynSent);
        assert_eq!(
            drive(SYN, &[(R, SYN | ACK), (O, ACK)], &c),
            TcpState::Established
        );
        assert_eq!(drive(ACK, &[(O, FIN), (R, ACK)], &c), TcpState::CloseWait);
        assert_eq!(drive(ACK, &[(O, RST)], &c), TcpState::Close);
    }

    #[test]
    fn udp_and_sctp_timeouts() {
        let mut ct = new_ct(8);
        let n = nat("10.1.0.5", 53, None);
        let a = key("10.0.0.1", 1000, "10.96.0.10", 53, UDP);
        let b = key("10.0.0.1", 1001, "10.96.0.10", 53, UDP);
        let c = key("10.0.0.1", 1002, "10.96.0.10", 53, L4Proto::Sctp);
        ct.insert(&a, n, 0, at(0)).unwrap();
        let ib = ct.insert(&b, n, 0, at(0)).unwrap();
        let ic = ct.insert(&c, n, 0, at(0)).unwrap();
        // Unreplied: 30 s, refreshed by original-direction packets without becoming
        // replied.
        assert_eq!(
            ct.on_packet(ib, Direction::Original, 0, at(20)),
            TcpState::None
        );
        assert!(ct.lookup(&a, at(30)).is_some());
        assert!(ct.lookup(&a, at(31)).is_none());
        assert!(ct.lookup(&b, at(50)).is_some());
        // A reply switches to the replied timeout.
        assert_eq!(
            ct.on_packet(ib, Direction::Reply, 0, at(50)),
            TcpState::None
        );
        assert!(ct.lookup(&b, at(170)).is_some());
        assert!(ct.lookup(&reply_of(&b, &n), at(170)).is_some());
        assert!(ct.lookup(&b, at(171)).is_none());
        // SCTP: one timeout, refreshed by packets.
        ct.on_packet(ic, Direction::Reply, 0, at(100));
        assert!(ct.lookup(&c, at(310)).is_some());
        assert!(ct.lookup(&c, at(311)).is_none());
        assert!(ct.is_empty());
        assert_eq!(ct.stats().expired, 3);
    }

    #[test]
    fn time_has_one_second_granularity_and_never_expires_early() {
        let mut ct = Conntrack::new(cfg(8));
        let k = key("10.0.0.1", 1000, "10.96.0.10", 53, UDP);
        // The clock starts at T0; the flow starts 0.9 s later, in second 0.
        ct.gc(T0, 0);
        ct.insert(&k, nat("10.1.0.5", 53, None), 0, T0 + 900_000_000)
            .unwrap();
        // 30.1 s after the packet: still live (lifetime is in [30, 31) s).
        assert!(ct.lookup(&k, T0 + 30 * S + 999_999_999).is_some());
        assert!(ct.lookup(&k, T0 + 31 * S).is_none());
        // A clock earlier than the epoch counts as the epoch; huge clocks saturate.
        ct.insert(&k, nat("10.1.0.5", 53, None), 0, 0).unwrap();
        assert!(ct.lookup(&k, 1).is_some());
        assert!(ct.lookup(&k, u64::MAX).is_some() || ct.is_empty());
    }

    #[test]
    fn expired_flows_do_not_match_and_are_removed_lazily() {
        let mut ct = new_ct(8);
        let k = key("10.0.0.1", 1000, "10.96.0.10", 80, TCP);
        let n = nat("10.1.0.5", 8080, Some(("192.168.0.1", 7000)));
        ct.insert(&k, n, tcp_flags::SYN, at(0)).unwrap();
        assert_eq!(ct.len(), 1);
        assert!(ct.lookup(&reply_of(&k, &n), at(121)).is_none());
        assert_eq!(ct.len(), 0);
        assert_eq!(ct.stats().expired, 1);
        assert!(ct.lookup(&k, at(121)).is_none());
        assert_eq!(ct.iter().count(), 0);
    }

    #[test]
    fn reply_tuple_in_use_sees_live_flows_only() {
        let mut ct = new_ct(8);
        let k = key("10.0.0.1", 1000, "10.96.0.10", 80, UDP);
        let n = nat("10.1.0.5", 8080, Some(("192.168.0.1", 7000)));
        let reply = reply_of(&k, &n);
        assert!(!ct.reply_tuple_in_use(&reply, at(0)));
        ct.insert(&k, n, 0, at(0)).unwrap();
        assert!(ct.reply_tuple_in_use(&reply, at(0)));
        assert!(
            ct.reply_tuple_in_use(&k, at(0)),
            "original tuples are taken too"
        );
        let other = FlowKey {
            dport: 7001,
            ..reply
        };
        assert!(!ct.reply_tuple_in_use(&other, at(0)));
        assert!(!ct.reply_tuple_in_use(&reply.reversed(), at(0)));
        assert!(ct.reply_tuple_in_use(&reply, at(30)));
        assert!(!ct.reply_tuple_in_use(&reply, at(31)));
        // The v6 table answers for v6 tuples.
        let k6 = key("fd00::1", 1000, "fd00:96::10", 80, UDP);
        let n6 = nat("fd00:1::5", 8080, None);
        ct.insert(&k6, n6, 0, at(40)).unwrap();
        assert!(ct.reply_tuple_in_use(&reply_of(&k6, &n6), at(40)));
        assert!(!ct.reply_tuple_in_use(&reply_of(&k6, &n6), at(71)));
    }

    #[test]
    fn insert_refuses_taken_tuples() {
        let mut ct = new_ct(8);
        let snat = Some(("192.168.0.1", 7000));
        let k = key("10.0.0.1", 1000, "10.96.0.10", 80, UDP);
        let n = nat("10.1.0.5", 8080, snat);
        let id = ct.insert(&k, n, 0, at(0)).unwrap();
        // Same original tuple.
        let n2 = nat("10.1.0.6", 8080, None);
        assert_eq!(ct.insert(&k, n2, 0, at(1)), Err(InsertError::Exists));
        // Other original tuple, same reply tuple (same SNAT port to the same backend).
        let k2 = key("10.0.0.2", 1000, "10.96.0.10", 80, UDP);
        assert_eq!(ct.insert(&k2, n, 0, at(1)), Err(InsertError::Exists));
        // A new flow whose original tuple is the existing reply tuple.
        let k3 = reply_of(&k, &n);
        assert_eq!(
            ct.insert(&k3, nat("10.1.0.9", 1, None), 0, at(1)),
            Err(InsertError::Exists)
        );
        // A new flow whose reply tuple is the existing original tuple.
        let k4 = key("10.0.0.1", 80, "10.0.0.9", 80, UDP);
        let n4 = nat("10.0.0.1", 1000, Some(("10.96.0.10", 80)));
        assert_eq!(reply_of(&k4, &n4), k);
        assert_eq!(ct.insert(&k4, n4, 0, at(1)), Err(InsertError::Exists));
        assert_eq!(ct.stats().exists, 4);
        assert_eq!(ct.len(), 1);
        // Once the first flow expires, its tuples are free again.
        let id2 = ct.insert(&k2, n, 0, at(31)).unwrap();
        assert_eq!(id2, id, "the expired flow's slot is reused");
        assert_eq!(ct.stats().expired, 1);
        assert_eq!(ct.lookup(&reply_of(&k2, &n), at(31)).unwrap().orig, k2);
    }

    #[test]
    fn purge_step_covers_every_slot_in_bounded_steps() {
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 100,
            capacity_v6: 50,
            ..ConntrackConfig::default()
        });
        for i in 0..60u16 {
            let k = key("10.0.0.1", 1000 + i, "10.96.0.1", 80, L4Proto::Tcp);
            ct.insert(&k, nat("10.244.0.2", 8080, None), tcp_flags::SYN, 0)
                .unwrap();
        }
        for i in 0..20u16 {
            let k = key("fd00::1", 1000 + i, "fd00:96::1", 80, L4Proto::Tcp);
            ct.insert(&k, nat("fd00:244::2", 8080, None), tcp_flags::SYN, 0)
                .unwrap();
        }
        let (mut cursor, mut removed, mut steps) = (Some(0), 0, 0);
        while let Some(c) = cursor {
            let (r, next) = ct.purge_step(c, 7, |m| m.orig.sport % 2 == 0);
            removed += r;
            cursor = next;
            steps += 1;
            assert!(steps < 1000);
        }
        assert_eq!(removed, 40);
        assert_eq!(ct.len(), 40);
        assert!(ct.iter().all(|m| m.orig.sport % 2 == 0));
        assert!(steps >= ct.capacity() / 7);
    }

    #[test]
    fn purge_removes_what_keep_rejects() {
        let mut ct = new_ct(64);
        let mut flows = Vec::new();
        for i in 0..10u16 {
            let k = key("10.0.0.1", 1000 + i, "10.96.0.10", 80, TCP);
            let b = if i % 2 == 0 { "10.1.0.5" } else { "10.1.0.6" };
            let n = nat(b, 8080, None);
            ct.insert(&k, n, tcp_flags::ACK, at(0)).unwrap();
            flows.push((k, n));
        }
        let gone = ip("10.1.0.5");
        let mut seen = 0;
        let purged = ct.purge(|m| {
            seen += 1;
            assert_eq!(m.dir, Direction::Original);
            m.nat.backend != gone
        });
        assert_eq!((purged, seen), (5, 10));
        assert_eq!(ct.len(), 5);
        assert_eq!(ct.stats().purged, 5);
        for (k, n) in flows {
            let live = n.backend != gone;
            assert_eq!(ct.lookup(&k, at(1)).is_some(), live);
            assert_eq!(ct.lookup(&reply_of(&k, &n), at(1)).is_some(), live);
        }
        assert!(ct.iter().all(|m| m.nat.backend != gone));
    }

    #[test]
    fn slab_slots_are_reused_and_memory_is_fixed() {
        let mut ct = new_ct(4);
        let mem = ct.memory_bytes();
        let n = nat("10.1.0.5", 80, None);
        let ks: Vec<_> = (0..5)
            .map(|i| key("10.0.0.1", 1000 + i, "10.96.0.10", 80, UDP))
            .collect();
        let a = ct.insert(&ks[0], n, 0, at(0)).unwrap();
        let b = ct.insert(&ks[1], n, 0, at(0)).unwrap();
        assert_ne!(a, b);
        assert_eq!(ct.purge(|m| m.id != a), 1);
        let c = ct.insert(&ks[2], n, 0, at(0)).unwrap();
        assert_eq!(c, a, "the freed slot is reused first");
        assert_eq!(ct.lookup(&ks[2], at(0)).unwrap().id, a);
        assert!(ct.lookup(&ks[0], at(0)).is_none());
        ct.insert(&ks[3], n, 0, at(0)).unwrap();
        ct.insert(&ks[4], n, 0, at(0)).unwrap();
        assert_eq!(ct.len(), 4);
        // Expiry frees slots too.
        assert_eq!(ct.gc(at(31), 100), 4);
        assert!(ct.is_empty());
        for k in &ks {
            ct.insert(k, n, 0, at(31)).unwrap_or_else(|e| panic!("{e}"));
            ct.purge(|_| false);
        }
        assert_eq!(ct.memory_bytes(), mem);
        // Ids of free or impossible slots are harmless.
        assert_eq!(ct.on_packet(a, Direction::Reply, 0, at(32)), TcpState::None);
        for raw in [3, 4, 1 << 30, V6_ID_BIT | 3, V6_ID_BIT | 99, u32::MAX] {
            let id = FlowId(raw);
            assert_eq!(
                ct.on_packet(id, Direction::Reply, tcp_flags::RST, at(32)),
                TcpState::None
            );
        }
        assert!(ct.is_empty());
    }

    fn est(i: u32) -> (FlowKey, NatBinding) {
        let c = Ipv4Addr::from(0x0a00_0000 | (i >> 16)).to_string();
        (
            key(&c, i as u16, "10.96.0.10", 80, TCP),
            nat("10.1.0.5", 8080, None),
        )
    }

    #[test]
    fn syn_flood_cannot_evict_established_flows() {
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 64,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        for i in 0..64 {
            let (k, n) = est(i);
            ct.insert(&k, n, tcp_flags::ACK, at(0)).unwrap();
        }
        for i in 1000..3000 {
            let (k, n) = est(i);
            assert_eq!(
                ct.insert(&k, n, tcp_flags::SYN, at(1)),
                Err(InsertError::Full)
            );
        }
        let s = ct.stats();
        assert_eq!((s.full, s.evicted_early, s.expired), (2000, 0, 0));
        for i in 0..64 {
            let (k, n) = est(i);
            assert_eq!(
                ct.lookup(&k, at(2)).unwrap().tcp_state,
                TcpState::Established
            );
            assert!(ct.lookup(&reply_of(&k, &n), at(2)).is_some());
        }
        // IPv6 has no room at all here.
        let k6 = key("fd00::1", 1, "fd00::2", 80, TCP);
        assert_eq!(
            ct.insert(&k6, nat("fd00::3", 80, None), tcp_flags::SYN, at(2)),
            Err(InsertError::Full)
        );
    }

    #[test]
    fn full_table_evicts_unestablished_flows_first() {
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 64,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        // Even slots established, odd slots half-open.
        for i in 0..64 {
            let (k, n) = est(i);
            let flags = if i % 2 == 0 {
                tcp_flags::ACK
            } else {
                tcp_flags::SYN
            };
            ct.insert(&k, n, flags, at(0)).unwrap();
        }
        for i in 1000..1200 {
            let (k, n) = est(i);
            ct.insert(&k, n, tcp_flags::SYN, at(1)).unwrap();
        }
        let s = ct.stats();
        assert_eq!((s.full, s.evicted_early, s.expired), (0, 200, 0));
        assert_eq!(ct.len(), 64);
        for i in (0..64).step_by(2) {
            assert!(
                ct.lookup(&est(i).0, at(2)).is_some(),
                "established {i} evicted"
            );
        }
        assert_eq!(
            ct.iter()
                .filter(|m| m.tcp_state == TcpState::Established)
                .count(),
            32
        );
    }

    /// Every way a flow leaves (eviction, GC expiry, lazy expiry, purge) is logged once
    /// with both tuples, oldest first, in both families; a full log counts the rest; an
    /// unset log remembers nothing.
    #[test]
    fn removal_log_reports_every_removed_flow_once() {
        let c = ConntrackConfig {
            capacity: 4,
            capacity_v6: 4,
            eviction_scan: 4,
            removal_log: 3,
            ..ConntrackConfig::default()
        };
        let mut ct = Conntrack::new(c);
        let n = nat("10.1.0.5", 53, None);
        let u = |p| key("10.0.0.1", p, "10.96.0.10", 53, UDP);
        for p in 0..4 {
            ct.insert(&u(p), n, 0, at(0)).unwrap();
        }
        // Full: the fifth evicts the first unreplied flow (u(0)).
        ct.insert(&u(4), n, 0, at(1)).unwrap();
        let mut seen = Vec::new();
        ct.drain_removed(|o, r| seen.push((*o, *r)));
        assert_eq!(seen, vec![(u(0), reply_of(&u(0), &n))]);
        ct.drain_removed(|_, _| panic!("drained already"));
        // An IPv6 flow purged, then everything expired by GC (in slot order: u(4) took
        // u(0)'s slot). Each family's log holds 3.
        let n6 = nat("fd00::5", 53, None);
        let v6 = key("fd00::1", 9, "fd00:96::a", 53, UDP);
        ct.insert(&v6, n6, 0, at(1)).unwrap();
        assert_eq!(ct.purge(|m| m.orig.src.is_ipv4()), 1);
        let late = at(1000);
        ct.gc(late, 1000);
        let mut seen = Vec::new();
        ct.drain_removed(|o, _| seen.push(*o));
        assert_eq!(seen, vec![u(4), u(1), u(2), v6], "IPv4 first, then IPv6");
        // u(3) did not fit.
        assert_eq!(ct.stats().removal_log_overflow, 1);
        assert!(ct.is_empty());
        // Lazily expired by a lookup.
        ct.insert(&u(7), n, 0, late).unwrap();
        assert!(ct.lookup(&u(7), late + at(1000)).is_none());
        let mut seen = Vec::new();
        ct.drain_removed(|o, _| seen.push(*o));
        assert_eq!(seen, vec![u(7)]);
        // No log: nothing remembered.
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 4,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        ct.insert(&u(1), n, 0, at(0)).unwrap();
        ct.gc(at(1000), 100);
        ct.drain_removed(|_, _| panic!("no log"));
        assert_eq!(ct.stats().removal_log_overflow, 0);
    }

    #[test]
    fn eviction_prefers_expired_then_unestablished_and_spares_replied_udp() {
        let mut c = ConntrackConfig {
            capacity: 4,
            capacity_v6: 0,
            eviction_scan: 4,
            ..ConntrackConfig::default()
        };
        c.timeouts.tcp_established = 50;
        let mut ct = Conntrack::new(c);
        // Slot 0 half-open (live until 120), slots 1..3 established (expire after 50).
        ct.insert(&est(0).0, est(0).1, tcp_flags::SYN, at(0))
            .unwrap();
        for i in 1..4 {
            ct.insert(&est(i).0, est(i).1, tcp_flags::ACK, at(0))
                .unwrap();
        }
        ct.insert(&est(10).0, est(10).1, tcp_flags::SYN, at(60))
            .unwrap();
        let s = ct.stats();
        assert_eq!((s.expired, s.evicted_early), (1, 0));
        assert!(
            ct.lookup(&est(0).0, at(60)).is_some(),
            "half-open outlived expired"
        );

        // UDP: replied flows are protected, unreplied ones are not.
        let c = ConntrackConfig {
            capacity: 4,
            capacity_v6: 0,
            eviction_scan: 4,
            ..ConntrackConfig::default()
        };
        let mut ct = Conntrack::new(c);
        let n = nat("10.1.0.5", 53, None);
        let u = |p| key("10.0.0.1", p, "10.96.0.10", 53, UDP);
        for p in 0..4 {
            let id = ct.insert(&u(p), n, 0, at(0)).unwrap();
            if p != 2 {
                ct.on_packet(id, Direction::Reply, 0, at(0));
            }
        }
        ct.insert(&u(10), n, 0, at(1)).unwrap();
        assert!(ct.lookup(&u(2), at(1)).is_none(), "unreplied evicted");
        for p in [0, 1, 3, 10] {
            assert!(ct.lookup(&u(p), at(1)).is_some());
        }
        // Now every flow but the newest is replied; the newest (unreplied) goes next.
        ct.insert(&u(11), n, 0, at(1)).unwrap();
        assert!(ct.lookup(&u(10), at(1)).is_none());
        let id = ct.lookup(&u(11), at(1)).unwrap().id;
        ct.on_packet(id, Direction::Reply, 0, at(1));
        assert_eq!(ct.insert(&u(12), n, 0, at(1)), Err(InsertError::Full));
        assert_eq!(ct.stats().evicted_early, 2);
        assert_eq!(ct.stats().full, 1);

        // A scan of 0 never evicts.
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 1,
            capacity_v6: 0,
            eviction_scan: 0,
            ..ConntrackConfig::default()
        });
        ct.insert(&u(0), n, 0, at(0)).unwrap();
        assert_eq!(ct.insert(&u(1), n, 0, at(0)), Err(InsertError::Full));
    }

    #[test]
    fn gc_is_bounded_persistent_and_spares_live_flows() {
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 1000,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        let n = nat("10.1.0.5", 80, None);
        let k = |i: u32, p| {
            let c = Ipv4Addr::from(0x0a00_0000 | i).to_string();
            key(&c, 1, "10.96.0.10", 80, p)
        };
        for i in 0..1000 {
            // Even: UDP (30 s); odd: established TCP.
            let (proto, flags) = if i % 2 == 0 {
                (UDP, 0)
            } else {
                (TCP, tcp_flags::ACK)
            };
            ct.insert(&k(i, proto), n, flags, at(0)).unwrap();
        }
        assert_eq!(ct.gc(at(30), 5000), 0, "nothing expired yet");
        assert_eq!(ct.gc(at(100), 0), 0);
        for round in 0..10 {
            assert_eq!(ct.gc(at(100), 100), 50, "round {round}");
        }
        assert_eq!(ct.gc(at(100), 1000), 0);
        assert_eq!(ct.len(), 500);
        assert_eq!(ct.stats().expired, 500);
        for i in (1..1000).step_by(2) {
            assert!(ct.lookup(&k(i, TCP), at(100)).is_some());
        }
    }

    #[test]
    fn gc_cursor_walks_both_families() {
        let mut ct = new_ct(10);
        let n4 = nat("10.1.0.5", 80, None);
        let n6 = nat("fd00:1::5", 80, None);
        for p in 0..10 {
            ct.insert(&key("10.0.0.1", p, "10.96.0.10", 80, UDP), n4, 0, at(0))
                .unwrap();
            ct.insert(&key("fd00::1", p, "fd00:96::10", 80, UDP), n6, 0, at(0))
                .unwrap();
        }
        assert_eq!(ct.gc(at(40), 15), 15);
        assert_eq!(ct.iter().filter(|m| m.orig.src.is_ipv6()).count(), 5);
        assert_eq!(ct.gc(at(40), 15), 5);
        assert!(ct.is_empty());
        assert_eq!(ct.gc(at(40), usize::MAX), 0);
    }

    #[test]
    fn churn_keeps_indexes_consistent_and_memory_fixed() {
        // A full table under churn: every insert evicts, so entries come and go through
        // buckets that overflow into their neighbours (the overflow counts must stay
        // exact for lookups to keep finding displaced entries).
        let cap = 1590;
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: cap,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        let mem = ct.memory_bytes();
        for i in 0..100_000u32 {
            let (k, n) = est(i);
            let n = NatBinding {
                snat: Some(SnatBinding {
                    addr: ip("192.168.0.1"),
                    port: i as u16,
                }),
                ..n
            };
            ct.insert(&k, n, tcp_flags::SYN, at(0)).unwrap();
        }
        let s = ct.stats();
        println!("churn stats: {s:?}");
        assert_eq!(ct.len(), cap);
        assert_eq!(ct.memory_bytes(), mem, "indexes must never grow");
        assert_eq!(s.evicted_early, 100_000 - cap as u64);
        assert_eq!(s.index_rebuilds, 0, "the index never needs a rebuild");
        assert_eq!(ct.v4.index.len(), 2 * cap);
        let overflow: u64 = ct
            .v4
            .index
            .buckets()
            .iter()
            .map(|b| u64::from(b.overflow))
            .sum();
        assert!(overflow > 0, "some buckets should have overflowed");
        check_index(&ct.v4);
        let flows: Vec<_> = ct.iter().collect();
        for m in flows {
            let l = ct.lookup(&m.orig, at(1)).unwrap();
            assert_eq!((l.id, l.dir), (m.id, Direction::Original));
            let l = ct.lookup(&reply_of(&m.orig, &m.nat), at(1)).unwrap();
            assert_eq!((l.id, l.dir), (m.id, Direction::Reply));
        }
    }

    /// The index holds exactly both tuples of every stored flow, and every bucket's
    /// overflow count is exactly the number of entries whose probe passed it.
    fn check_index<A: Addr>(t: &Table<A>) {
        let ix = &t.index;
        let n = ix.buckets().len();
        let mut want_overflow = vec![0u32; n];
        let mut seen = 0;
        for (b, bucket) in ix.buckets().iter().enumerate() {
            for w in 0..WAYS {
                if bucket.tags[w] == 0 {
                    continue;
                }
                seen += 1;
                let v = bucket.vals[w];
                let e = &t.slab[(v & !REPLY_BIT) as usize];
                assert!(!e.is_free(), "index entry for a free slot");
                let h = e.tuple(side_of(v)).hash(t.seed);
                assert_eq!(bucket.tags[w], Index::tag(h));
                let mut c = ix.home(h);
                while c != b {
                    want_overflow[c] += 1;
                    c = ix.next(c);
                }
            }
        }
        assert_eq!(seen, 2 * t.len);
        let got: Vec<u32> = ix.buckets().iter().map(|b| b.overflow).collect();
        assert_eq!(got, want_overflow);
        for (slot, e) in t.slab.iter().enumerate() {
            if !e.is_free() {
                assert!(slot < t.high_water);
                for side in [Direction::Original, Direction::Reply] {
                    let tu = e.tuple(side);
                    assert!(t
                        .find(tu.hash(t.seed), &tu)
                        .is_some_and(|(s, _)| s == slot as u32));
                }
            }
        }
    }

    #[test]
    fn index_overflow_counts_stay_exact_under_churn() {
        // A tiny table (3 buckets for 8 flows): most buckets overflow, lookups probe
        // past them and removals must undo exactly what inserts counted.
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 8,
            capacity_v6: 8,
            eviction_scan: 8,
            ..ConntrackConfig::default()
        });
        assert_eq!(ct.v4.index.buckets().len(), 3);
        let mut live = Vec::new();
        for i in 0..5000u32 {
            let (k, n) = est(i.wrapping_mul(2_654_435_761) >> 8);
            let k6 = FlowKey {
                src: IpAddr::V6(Ipv6Addr::from(u128::from(i) | 0xfd00 << 112)),
                dst: ip("fd00:96::10"),
                ..k
            };
            let n6 = nat("fd00:1::5", 8080, None);
            let flags = if i % 3 == 0 {
                tcp_flags::ACK
            } else {
                tcp_flags::SYN
            };
            if ct.insert(&k, n, flags, at(u64::from(i / 50))).is_ok() {
                live.push(k);
            }
            let _ = ct.insert(&k6, n6, flags, at(u64::from(i / 50)));
            if i % 7 == 0 {
                ct.gc(at(u64::from(i / 50)), 5);
            }
            if i % 97 == 0 {
                ct.purge(|m| m.orig.sport % 2 == 0);
            }
            check_index(&ct.v4);
            check_index(&ct.v6);
        }
        assert!(ct.stats().evicted_early > 0 && ct.stats().purged > 0);
    }

    #[test]
    fn a_flow_whose_tuples_are_equal_matches_as_original() {
        // Client 10.0.0.1:1000 -> 10.0.0.1:1000, backend itself, no SNAT: the reply tuple
        // is the original tuple.
        let mut ct = new_ct(8);
        let k = key("10.0.0.1", 1000, "10.0.0.1", 1000, UDP);
        let n = nat("10.0.0.1", 1000, None);
        assert_eq!(reply_of(&k, &n), k);
        let id = ct.insert(&k, n, 0, at(0)).unwrap();
        for _ in 0..2 {
            let m = ct.lookup(&k, at(0)).unwrap();
            assert_eq!((m.id, m.dir), (id, Direction::Original));
        }
        assert!(ct.reply_tuple_in_use(&k, at(0)));
        check_index(&ct.v4);
        assert!(ct.lookup(&k, at(31)).is_none());
        assert_eq!(ct.stats().expired, 1);
        check_index(&ct.v4);
        assert_eq!(ct.v4.index.len(), 0);
    }

    #[test]
    fn bucket_matches_every_way() {
        let mut b = Bucket::default();
        for (i, t) in [5u16, 0x8000, 0xffff, 1, 5, 0x0101, 7, 5, 0xffff, 5]
            .into_iter()
            .enumerate()
        {
            b.tags[i] = t;
        }
        let ways = |tag: u16| {
            let mut m = b.matches(tag);
            let mut w = Vec::new();
            while m != 0 {
                w.push(way_of(m.trailing_zeros()));
                m &= m - 1;
            }
            w.sort();
            w
        };
        assert_eq!(ways(5), [0, 4, 7, 9]);
        assert_eq!(ways(0xffff), [2, 8]);
        assert_eq!(ways(0x8000), [1]);
        assert!(ways(0x0100).is_empty());
        assert!(ways(0x7fff).is_empty());
        for tag in 1..=u16::MAX {
            let want: Vec<usize> = (0..WAYS).filter(|&i| b.tags[i] == tag).collect();
            assert_eq!(ways(tag), want, "tag {tag:#x}");
        }
        // Empty ways.
        let mut e = b.empty_ways();
        assert_eq!(e, 0, "all ways taken");
        b.tags[3] = 0;
        b.tags[9] = 0;
        e = b.empty_ways();
        assert_eq!(e.count_ones(), 2);
        let mut w = [
            way_of(e.trailing_zeros()),
            way_of((e & (e - 1)).trailing_zeros()),
        ];
        w.sort();
        assert_eq!(w, [3, 9]);
        assert_eq!(Bucket::default().empty_ways().count_ones(), WAYS as u32);
        // Every way, every position of a lone match.
        for w in 0..WAYS {
            let mut b = Bucket::default();
            b.tags[w] = 0x1234;
            assert_eq!(way_of(b.matches(0x1234).trailing_zeros()), w);
            assert_eq!(b.matches(0x1234).count_ones(), 1);
            assert_eq!(b.matches(0x1235), 0);
        }
    }

    /// How many buckets a lookup reads in a full table: a hit reads its home bucket up to
    /// the entry's; a miss reads up to the first bucket without overflow.
    #[test]
    fn probe_lengths_in_a_full_table() {
        const N: u32 = 200_000;
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: N as usize,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        for i in 0..N {
            let (k, n) = est(i);
            ct.insert(&k, n, tcp_flags::ACK, at(0)).unwrap();
        }
        let ix = &ct.v4.index;
        let n = ix.buckets().len();
        let (mut hits, mut hit_reads) = (0usize, 0usize);
        for (b, bucket) in ix.buckets().iter().enumerate() {
            for w in 0..WAYS {
                if bucket.tags[w] != 0 {
                    let v = bucket.vals[w];
                    let e = &ct.v4.slab[(v & !REPLY_BIT) as usize];
                    let home = ix.home(e.tuple(side_of(v)).hash(ct.v4.seed));
                    hits += 1;
                    hit_reads += (b + n - home) % n + 1;
                }
            }
        }
        let mut miss_reads = 0;
        for home in 0..n {
            let mut b = home;
            miss_reads += 1;
            while ix.buckets()[b].overflow != 0 {
                b = ix.next(b);
                miss_reads += 1;
            }
        }
        let (hit, miss) = (hit_reads as f64 / hits as f64, miss_reads as f64 / n as f64);
        let overflowing = ix.buckets().iter().filter(|b| b.overflow != 0).count();
        println!(
            "full table ({} of {} ways used): buckets read per hit {hit:.3}, per miss \
             {miss:.3}; {:.1}% of buckets overflow",
            hits,
            n * WAYS,
            100.0 * overflowing as f64 / n as f64
        );
        assert!(hit < 1.1 && miss < 1.3, "hit {hit} miss {miss}");
    }

    #[test]
    fn entry_sizes() {
        let v4 = core::mem::size_of::<Entry<u32>>();
        let v6 = core::mem::size_of::<Entry<[u8; 16]>>();
        println!("entry size: IPv4 {v4} B, IPv6 {v6} B");
        assert_eq!(v4, 36);
        assert_eq!(v6, 84);
    }

    #[test]
    fn memory_per_flow_at_full_capacity() {
        const N: u32 = 200_000;
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: N as usize,
            capacity_v6: 0,
            ..ConntrackConfig::default()
        });
        let n = nat("10.1.0.5", 8080, None);
        for i in 0..N {
            let c = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i));
            let k = FlowKey {
                src: c,
                dst: ip("10.96.0.10"),
                sport: 40000,
                dport: 80,
                proto: TCP,
            };
            ct.insert(&k, n, tcp_flags::ACK, at(0)).unwrap();
        }
        assert_eq!(ct.len(), N as usize);
        let v4 = ct.memory_bytes() as f64 / ct.len() as f64;

        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: 0,
            capacity_v6: N as usize,
            ..ConntrackConfig::default()
        });
        let n = nat("fd00:1::5", 8080, None);
        for i in 0..N {
            let c = IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i)));
            let k = FlowKey {
                src: c,
                dst: ip("fd00:96::10"),
                sport: 40000,
                dport: 80,
                proto: TCP,
            };
            ct.insert(&k, n, tcp_flags::ACK, at(0)).unwrap();
        }
        assert_eq!(ct.len(), N as usize);
        let v6 = ct.memory_bytes() as f64 / ct.len() as f64;
        println!("memory per flow at {N} flows: IPv4 {v4:.1} B, IPv6 {v6:.1} B");
        assert!(v4 <= 64.0, "IPv4 {v4} B/flow");
        assert!(v6 <= 112.0, "IPv6 {v6} B/flow");
    }

    // ---- model check -------------------------------------------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        Insert {
            v6: bool,
            client: u8,
            cport: u8,
            frontend: u8,
            kind: u8,
            backend: u8,
            bport: u8,
            snat: Option<u8>,
        },
        /// A packet of the `idx`-th live model flow, as a lookup plus `on_packet`.
        Packet {
            idx: usize,
            reply: bool,
        },
        /// A lookup of an arbitrary tuple from the same small address pool.
        Probe {
            v6: bool,
            src: u8,
            sport: u8,
            dst: u8,
            dport: u8,
            udp: bool,
        },
        Advance(u8),
        Gc(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (
                any::<bool>(),
                0..3u8,
                0..3u8,
                0..2u8,
                0..4u8,
                0..2u8,
                0..2u8,
                proptest::option::of(0..3u8),
            )
                .prop_map(|(v6, client, cport, frontend, kind, backend, bport, snat)| Op::Insert {
                    v6, client, cport, frontend, kind, backend, bport, snat
                }),
            3 => (0..64usize, any::<bool>()).prop_map(|(idx, reply)| Op::Packet { idx, reply }),
            2 => (any::<bool>(), 0..8u8, 0..5u8, 0..8u8, 0..5u8, any::<bool>())
                .prop_map(|(v6, src, sport, dst, dport, udp)| Op::Probe {
                    v6,
                    src,
                    sport,
                    dst,
                    dport,
                    udp,
                }),
            1 => (0..100u8).prop_map(Op::Advance),
            1 => (0..300u16).prop_map(Op::Gc),
        ]
    }

    /// Address `i` of the small pool: 0..3 clients, 3..5 frontends, 5..7 backends,
    /// 7 the SNAT address.
    fn pool(v6: bool, i: u8) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i) + 1))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, i + 1))
        }
    }

    fn pool_port(i: u8) -> u16 {
        [80, 8080, 1000, 1001, 1002][usize::from(i) % 5]
    }

    #[derive(Clone, Debug)]
    struct ModelFlow {
        id: FlowId,
        orig: FlowKey,
        reply: FlowKey,
        nat: NatBinding,
        /// Last live second.
        expires: u64,
        replied: bool,
    }

    fn model_timeout(t: &Timeouts, f: &ModelFlow) -> u64 {
        u64::from(match f.orig.proto {
            L4Proto::Tcp => t.tcp_established,
            L4Proto::Udp if f.replied => t.udp_replied,
            L4Proto::Udp => t.udp_unreplied,
            L4Proto::Sctp => t.sctp,
        })
    }

    fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
        const CAP: usize = 512;
        let mut ct = Conntrack::new(ConntrackConfig {
            capacity: CAP,
            capacity_v6: CAP,
            ..ConntrackConfig::default()
        });
        let t = ct.config().timeouts;
        let mut model: Vec<ModelFlow> = Vec::new();
        let mut now = 0u64;
        ct.gc(at(now), 0);
        for op in ops {
            model.retain(|f| now <= f.expires);
            match op {
                Op::Insert {
                    v6,
                    client,
                    cport,
                    frontend,
                    kind,
                    backend,
                    bport,
                    snat,
                } => {
                    let (proto, flags) = match kind {
                        0 => (L4Proto::Udp, 0),
                        1 => (L4Proto::Sctp, 0),
                        // Loose pickup: established, so the model needs no TCP states.
                        _ => (L4Proto::Tcp, tcp_flags::ACK),
                    };
                    let orig = FlowKey {
                        src: pool(v6, client),
                        dst: pool(v6, 3 + frontend),
                        sport: pool_port(2 + cport),
                        dport: pool_port(0),
                        proto,
                    };
                    let n = NatBinding {
                        backend: pool(v6, 5 + backend),
                        backend_port: pool_port(bport),
                        snat: snat.map(|p| SnatBinding {
                            addr: pool(v6, 7),
                            port: pool_port(2 + p),
                        }),
                        service_port: ServicePortId(u32::from(kind)),
                    };
                    let reply = reply_of(&orig, &n);
                    let taken = model.iter().any(|f| {
                        [f.orig, f.reply].contains(&orig) || [f.orig, f.reply].contains(&reply)
                    });
                    let in_use = ct.reply_tuple_in_use(&reply, at(now))
                        || ct.reply_tuple_in_use(&orig, at(now));
                    prop_assert_eq!(in_use, taken);
                    match ct.insert(&orig, n, flags, at(now)) {
                        Ok(id) => {
                            prop_assert!(!taken, "inserted over a taken tuple: {:?}", orig);
                            let mut f = ModelFlow {
                                id,
                                orig,
                                reply,
                                nat: n,
                                expires: 0,
                                replied: false,
                            };
                            f.expires = now + model_timeout(&t, &f);
                            model.push(f);
                        }
                        Err(e) => prop_assert!(taken && e == InsertError::Exists, "{:?}", e),
                    }
                }
                Op::Packet { idx, reply } => {
                    if model.is_empty() {
                        continue;
                    }
                    let i = idx % model.len();
                    let f = &mut model[i];
                    let k = if reply { f.reply } else { f.orig };
                    let m = ct.lookup(&k, at(now));
                    prop_assert!(m.is_some(), "live flow missed: {:?}", f);
                    let m = m.unwrap();
                    let dir = if reply {
                        Direction::Reply
                    } else {
                        Direction::Original
                    };
                    prop_assert_eq!((m.id, m.dir, m.orig, m.nat), (f.id, dir, f.orig, f.nat));
                    let state = ct.on_packet(m.id, dir, tcp_flags::ACK, at(now));
                    let want = if f.orig.proto == L4Proto::Tcp {
                        TcpState::Established
                    } else {
                        TcpState::None
                    };
                    prop_assert_eq!(state, want);
                    f.replied |= reply;
                    f.expires = now + model_timeout(&t, f);
                }
                Op::Probe {
                    v6,
                    src,
                    sport,
                    dst,
                    dport,
                    udp,
                } => {
                    let k = FlowKey {
                        src: pool(v6, src),
                        dst: pool(v6, dst),
                        sport: pool_port(sport),
                        dport: pool_port(dport),
                        proto: if udp { L4Proto::Udp } else { L4Proto::Tcp },
                    };
                    let want = model.iter().find_map(|f| {
                        if f.orig == k {
                            Some((f.id, Direction::Original))
                        } else if f.reply == k {
                            Some((f.id, Direction::Reply))
                        } else {
                            None
                        }
                    });
                    let got = ct.lookup(&k, at(now)).map(|m| (m.id, m.dir));
                    prop_assert_eq!(got, want, "probe {:?}", k);
                }
                Op::Advance(s) => now += u64::from(s),
                Op::Gc(budget) => {
                    ct.gc(at(now), usize::from(budget));
                }
            }
            prop_assert!(ct.len() >= model.len());
        }
        check_index(&ct.v4);
        check_index(&ct.v6);
        // A full sweep leaves exactly the live flows.
        model.retain(|f| now <= f.expires);
        ct.gc(at(now), ct.capacity());
        prop_assert_eq!(ct.len(), model.len());
        let mut got: Vec<_> = ct.iter().map(|m| (m.orig, m.nat)).collect();
        let mut want: Vec<_> = model.iter().map(|f| (f.orig, f.nat)).collect();
        let order = |a: &(FlowKey, NatBinding), b: &(FlowKey, NatBinding)| {
            format!("{a:?}").cmp(&format!("{b:?}"))
        };
        got.sort_by(order);
        want.sort_by(order);
        prop_assert_eq!(got, want);
        Ok(())
    }

    proptest! {
        #[test]
        fn agrees_with_a_simple_model(ops in proptest::collection::vec(op(), 1..200)) {
            run_model(ops)?;
        }
    }
}
