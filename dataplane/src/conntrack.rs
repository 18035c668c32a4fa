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
//! free list through the entry itself). Two `hashbrown::HashTable<u32>` indexes point into
//! it: one keyed by the original tuple (client → service frontend), one by the reply tuple
//! (backend → SNAT address, or → client when there is no SNAT). Both use the same seeded
//! splitmix64-style hash of the 5-tuple, so a packet's tuple is hashed once and probed in
//! both indexes.
//!
//! IPv4 and IPv6 flows live in two separate tables generic over the address type (`u32` vs
//! `[u8; 16]`), so IPv4 entries don't pay for IPv6 addresses. Each family has its own hard
//! capacity ([`ConntrackConfig::capacity`] for IPv4, [`ConntrackConfig::capacity_v6`] for
//! IPv6), pre-allocated at construction.
//!
//! Memory per flow (x86_64), measured by the tests `entry_sizes` and
//! `memory_per_flow_at_full_capacity` with a full table of 200 000 flows:
//!
//! | family | entry | indexes (2 × 262 144 buckets × 5 B) | total per flow |
//! |--------|-------|-------------------------------------|----------------|
//! | IPv4   | 36 B  | 13.1 B                              | 49.1 B         |
//! | IPv6   | 84 B  | 13.1 B                              | 97.1 B         |
//!
//! The index share depends on how the capacity falls against hashbrown's power-of-two
//! bucket counts: it ranges from about 11 B (capacity just under a power-of-two bucket
//! count's load limit) to about 26 B per flow, so IPv4 stays at or under 62 B per flow at
//! any capacity (default 1 Mi IPv4 flows: 36 + 20 = 56 B).
//!
//! # Index maintenance
//!
//! hashbrown leaves tombstones behind some removals; when a table runs out of never-used
//! buckets it would rehash or *grow* (allocate) inside an insert. To keep memory fixed,
//! each index is sized for `capacity + capacity / 8 + 1` entries, and when an index has no
//! growth left before an insert it is cleared and rebuilt in place from the slab (no
//! allocation; counted in [`ConntrackStats::index_rebuilds`]). The slack bounds rebuilds to
//! at most one per `capacity / 8` inserts; each is O(capacity), a rare latency spike in
//! exchange for memory that never grows.
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

use hashbrown::HashTable;

use crate::flow::{mix, FlowKey, L4Proto};
use crate::tables::ServicePortId;

/// TCP flag bits as they appear in the TCP header's flag byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 20,
            capacity_v6: 1 << 18,
            timeouts: Timeouts::default(),
            eviction_scan: 16,
            hash_seed: 0x6b78_705f_6374_0001,
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
    /// In-place index rebuilds (see "Index maintenance" in the module doc).
    pub index_rebuilds: u64,
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
trait Addr: Copy + Eq + Default + fmt::Debug {
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

/// A 5-tuple in compact form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple<A> {
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
    proto: u8,
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

    #[inline]
    fn hash(&self, seed: u64) -> u64 {
        let h = mix(seed
            ^ (u64::from(self.proto) << 32)
            ^ (u64::from(self.sport) << 16)
            ^ u64::from(self.dport));
        A::mix_pair(h, self.src, self.dst)
    }
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

    fn to_match(&self, id: FlowId, dir: Direction) -> Option<FlowMatch> {
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

/// One address family's flows: slab, free list and the two indexes.
struct Table<A> {
    slab: Vec<Entry<A>>,
    free_head: u32,
    len: usize,
    /// Original tuple → slot.
    orig: HashTable<u32>,
    /// Reply tuple → slot.
    reply: HashTable<u32>,
    /// Clock hand of the eviction scan.
    evict_hand: usize,
    /// [`FlowId`] tag of this family.
    id_bit: u32,
    seed: u64,
}

impl<A: Addr> Table<A> {
    fn new(capacity: usize, id_bit: u32, seed: u64) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let mut slab = Vec::with_capacity(capacity);
        for i in 0..capacity {
            let next = if i + 1 < capacity { i as u32 + 1 } else { NIL };
            slab.push(Entry::free(next));
        }
        let index_capacity = if capacity == 0 {
            0
        } else {
            capacity + capacity / 8 + 1
        };
        Self {
            slab,
            free_head: if capacity == 0 { NIL } else { 0 },
            len: 0,
            orig: HashTable::with_capacity(index_capacity),
            reply: HashTable::with_capacity(index_capacity),
            evict_hand: 0,
            id_bit,
            seed,
        }
    }

    fn capacity(&self) -> usize {
        self.slab.len()
    }

    fn memory_bytes(&self) -> usize {
        self.slab.capacity() * core::mem::size_of::<Entry<A>>()
            + self.orig.allocation_size()
            + self.reply.allocation_size()
    }

    fn index(&self, side: Direction) -> &HashTable<u32> {
        match side {
            Direction::Original => &self.orig,
            Direction::Reply => &self.reply,
        }
    }

    /// The slot whose `side` tuple is `t` (live or expired).
    #[inline]
    fn find(&self, side: Direction, hash: u64, t: &Tuple<A>) -> Option<u32> {
        let slab = &self.slab;
        self.index(side)
            .find(hash, |&i| {
                slab.get(i as usize)
                    .is_some_and(|e| !e.is_free() && e.tuple(side) == *t)
            })
            .copied()
    }

    /// The live slot whose `side` tuple is `t`; an expired one is removed on the way.
    #[inline]
    fn find_live(
        &mut self,
        side: Direction,
        hash: u64,
        t: &Tuple<A>,
        now_s: u32,
        stats: &mut ConntrackStats,
    ) -> Option<u32> {
        let slot = self.find(side, hash, t)?;
        if self.slab.get(slot as usize)?.is_expired(now_s) {
            self.remove(slot);
            stats.expired += 1;
            return None;
        }
        Some(slot)
    }

    /// Whether a live flow has `t` as its original or reply tuple.
    fn tuple_in_use(&self, t: &Tuple<A>, now_s: u32) -> bool {
        let hash = t.hash(self.seed);
        [Direction::Original, Direction::Reply]
            .into_iter()
            .any(|side| {
                self.find(side, hash, t)
                    .and_then(|i| self.slab.get(i as usize))
                    .is_some_and(|e| !e.is_expired(now_s))
            })
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
        for dir in [Direction::Original, Direction::Reply] {
            if let Some(slot) = self.find_live(dir, hash, t, now_s, stats) {
                return self.slab.get(slot as usize)?.to_match(self.id(slot), dir);
            }
        }
        None
    }

    /// Frees an occupied slot and unlinks it from both indexes.
    fn remove(&mut self, slot: u32) {
        let Some(e) = self.slab.get(slot as usize).copied() else {
            return;
        };
        if e.is_free() {
            return;
        }
        for side in [Direction::Original, Direction::Reply] {
            let hash = e.tuple(side).hash(self.seed);
            let index = match side {
                Direction::Original => &mut self.orig,
                Direction::Reply => &mut self.reply,
            };
            if let Ok(entry) = index.find_entry(hash, |&i| i == slot) {
                entry.remove();
            }
        }
        if let Some(e) = self.slab.get_mut(slot as usize) {
            *e = Entry::free(self.free_head);
            self.free_head = slot;
            self.len -= 1;
        }
    }

    /// Makes sure inserting into `side`'s index cannot make hashbrown rehash or grow: if
    /// the index has no growth left, rebuilds it in place from the slab.
    fn ensure_index_room(&mut self, side: Direction, stats: &mut ConntrackStats) {
        let index = match side {
            Direction::Original => &mut self.orig,
            Direction::Reply => &mut self.reply,
        };
        if index.len() < index.capacity() {
            return;
        }
        stats.index_rebuilds += 1;
        index.clear();
        let seed = self.seed;
        let slab = &self.slab;
        let hasher = |&i: &u32| {
            slab.get(i as usize)
                .map_or(0, |e: &Entry<A>| e.tuple(side).hash(seed))
        };
        for (i, e) in slab.iter().enumerate() {
            if !e.is_free() {
                index.insert_unique(e.tuple(side).hash(seed), i as u32, hasher);
            }
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
        let mut candidate = None;
        for k in 0..scan {
            let slot = (start + k) % cap;
            let Some(e) = self.slab.get(slot) else {
                continue;
            };
            if e.is_free() {
                continue;
            }
            if e.is_expired(now_s) {
                self.remove(slot as u32);
                stats.expired += 1;
                self.evict_hand = (slot + 1) % cap;
                return true;
            }
            if candidate.is_none() && e.is_unestablished() {
                candidate = Some(slot);
            }
        }
        match candidate {
            Some(slot) => {
                self.remove(slot as u32);
                stats.evicted_early += 1;
                self.evict_hand = (slot + 1) % cap;
                true
            }
            None => {
                self.evict_hand = (start + scan) % cap;
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
        // Neither tuple may be taken by a live flow, in either direction.
        for t in [e.orig_tuple(), e.reply_tuple()] {
            let hash = t.hash(self.seed);
            for side in [Direction::Original, Direction::Reply] {
                if self.find_live(side, hash, &t, now_s, stats).is_some() {
                    stats.exists += 1;
                    return Err(InsertError::Exists);
                }
            }
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
        self.ensure_index_room(Direction::Original, stats);
        self.ensure_index_room(Direction::Reply, stats);

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

        let (ho, hr) = (
            e.orig_tuple().hash(self.seed),
            e.reply_tuple().hash(self.seed),
        );
        self.free_head = next;
        if let Some(s) = self.slab.get_mut(slot as usize) {
            *s = e;
        }
        self.len += 1;
        let seed = self.seed;
        let slab = &self.slab;
        let hasher = |side: Direction| {
            move |&i: &u32| {
                slab.get(i as usize)
                    .map_or(0, |e: &Entry<A>| e.tuple(side).hash(seed))
            }
        };
        self.orig
            .insert_unique(ho, slot, hasher(Direction::Original));
        self.reply.insert_unique(hr, slot, hasher(Direction::Reply));
        stats.inserted += 1;
        Ok(self.id(slot))
    }

    /// Removes expired flows in slots `start..end`.
    fn reap(&mut self, start: usize, end: usize, now_s: u32) -> usize {
        let mut removed = 0;
        for slot in start..end.min(self.capacity()) {
            if self.slab.get(slot).is_some_and(|e| e.is_expired(now_s)) {
                self.remove(slot as u32);
                removed += 1;
            }
        }
        removed
    }

    fn purge(
        &mut self,
        keep: &mut impl FnMut(&FlowMatch) -> bool,
        stats: &mut ConntrackStats,
    ) -> usize {
        let mut removed = 0;
        for slot in 0..self.capacity() {
            let id = self.id(slot as u32);
            let m = self
                .slab
                .get(slot)
                .filter(|e| !e.is_free())
                .and_then(|e| e.to_match(id, Direction::Original));
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
        self.slab.iter().enumerate().filter_map(|(slot, e)| {
            if e.is_free() {
                None
            } else {
                e.to_match(self.id(slot as u32), Direction::Original)
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
            v4: Table::new(cfg.capacity, 0, cfg.hash_seed),
            v6: Table::new(cfg.capacity_v6, V6_ID_BIT, cfg.hash_seed),
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
        self.v4.purge(&mut keep, &mut self.stats) + self.v6.purge(&mut keep, &mut self.stats)
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
