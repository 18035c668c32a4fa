//! The reply table: where the workers tell the XDP steering program which flows' tuples
//! are theirs, without a system call per flow.
//!
//! Replies of flows kxp translated without masquerading (a pod's connection to a
//! ClusterIP, external traffic under `externalTrafficPolicy: Local`) look like any other
//! pod traffic; only their exact tuple tells the steering program to redirect them to
//! kxp instead of letting the kernel have them. Writing each new flow's tuple into a BPF
//! hash map costs a `bpf()` system call's worth of kernel work per tuple (0.4 µs per
//! tuple cache-resident, 1.1 µs in a full 262,144-entry LRU map, measured here), which
//! was over a quarter of a worker's time under a new-flow flood.
//!
//! So the tuples live in array maps created `BPF_F_MMAPABLE`, which every worker maps
//! into its address space and writes like memory: one for IPv4 tuples, whose slots hold
//! the 13 bytes of the tuple and the owner in 16 bytes (`reply_table_v4`), and one for
//! IPv6 tuples, whose slots hold the 40-byte `struct tuple_key` and the owner in 48
//! (`reply_table`). Each map is a hash table of buckets of [`WAYS`] slots; a tuple lives in
//! one of two buckets picked by a seeded hash ([`tuple_hash`], the same function as
//! `tuple_hash` in `steer.c`), in the emptier one. A bucket's first cache line holds its
//! slots' states and 32-bit fingerprints of their tuples, so finding a tuple, or room for
//! one, reads one line per bucket, plus the slot's line when a fingerprint matches (an
//! IPv4 bucket is three lines, an IPv6 bucket seven). A slot's state is
//! `generation << 2 | tag`:
//!
//! - tag 0: free; tag 1: being written; tag 2: valid.
//! - A writer claims a slot by compare-and-swap from the state it read to tag 1, writes
//!   the owner and the tuple, and publishes tag 2 with the next generation (release).
//!   Removing is the same with tag 0. Several workers write one table safely.
//! - The program reads the state, the tuple and the owner, then the state again, and
//!   takes the slot only if it was valid and unchanged: a slot rewritten under it is never
//!   mistaken for a match. (x86 keeps loads in order; on a weakly ordered CPU the
//!   program's reads would need acquire semantics.)
//!
//! A worker frees the slots of the flows its conntrack removes (conntrack's removal log),
//! so the table holds what conntrack holds; a slow walk over the table catches anything a
//! full log missed. A tuple that finds both its buckets full goes to the LRU map as
//! before (counted).

use core::sync::atomic::{AtomicU32, Ordering};
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use super::steer::TupleKey;
use crate::flow::FlowKey;
use core::net::IpAddr;

/// Slots per bucket (`REPLY_WAYS` in steer.c).
pub const WAYS: usize = 8;

const TAG_MASK: u32 = 3;
const TAG_FREE: u32 = 0;
const TAG_BUSY: u32 = 1;
const TAG_VALID: u32 = 2;

/// Bit of `reply_cfg.flags`: several workers, so the program looks up the owners of
/// original tuples too (`REPLY_CFG_OWNERS`).
pub const CFG_OWNERS: u32 = 1;

/// Owners must fit the 24 bits an IPv4 slot keeps them in.
const MAX_OWNER: u32 = (1 << 24) - 1;

/// A tuple as words: for IPv4, `[source, destination, ports, protocol]`; otherwise the
/// ten native-endian words of `struct tuple_key`.
type Words = [u32; 10];

/// How one family's slots hold a tuple and its owner.
trait Layout {
    /// What a slot is.
    type Slot;
    /// Leading words of [`Words`] that make the tuple (what the hash covers).
    const KEY_WORDS: usize;
    /// Whether the slot holds the tuple `w`.
    fn holds(slot: &Self::Slot, w: &Words) -> bool;
    /// Writes the tuple `w` and its owner into a claimed slot.
    fn write(slot: &Self::Slot, w: &Words, owner: u32);
    /// Gives the slot holding `w` another owner (the slot is claimed).
    fn set_owner(slot: &Self::Slot, w: &Words, owner: u32);
    fn owner(slot: &Self::Slot) -> u32;
    /// The tuple the slot holds, as a key.
    fn key(slot: &Self::Slot) -> TupleKey;
}

/// `struct reply_slot_v4`: 16 bytes, the IPv4 tuple and the owner.
#[repr(C)]
#[derive(Debug)]
struct SlotV4 {
    /// Source and destination address, the two ports: as they lie in the frame.
    key: [AtomicU32; 3],
    /// `protocol | owner << 8`.
    meta: AtomicU32,
}

/// The IPv4 layout (`reply_table_v4`).
#[derive(Debug)]
enum V4 {}

impl Layout for V4 {
    type Slot = SlotV4;
    const KEY_WORDS: usize = 4;

    #[inline]
    fn holds(slot: &SlotV4, w: &Words) -> bool {
        slot.key[0].load(Ordering::Relaxed) == w[0]
            && slot.key[1].load(Ordering::Relaxed) == w[1]
            && slot.key[2].load(Ordering::Relaxed) == w[2]
            && slot.meta.load(Ordering::Relaxed) & 0xff == w[3]
    }

    #[inline]
    fn write(slot: &SlotV4, w: &Words, owner: u32) {
        for (a, v) in slot.key.iter().zip(w) {
            a.store(*v, Ordering::Relaxed);
        }
        Self::set_owner(slot, w, owner);
    }

    #[inline]
    fn set_owner(slot: &SlotV4, w: &Words, owner: u32) {
        slot.meta.store(w[3] | owner << 8, Ordering::Relaxed);
    }

    #[inline]
    fn owner(slot: &SlotV4) -> u32 {
        slot.meta.load(Ordering::Relaxed) >> 8
    }

    fn key(slot: &SlotV4) -> TupleKey {
        let mut b = [0u8; 40];
        for (at, i) in [(0, 0), (16, 1)] {
            b[at + 10] = 0xff;
            b[at + 11] = 0xff;
            b[at + 12..at + 16].copy_from_slice(&slot.key[i].load(Ordering::Relaxed).to_ne_bytes());
        }
        b[32..36].copy_from_slice(&slot.key[2].load(Ordering::Relaxed).to_ne_bytes());
        b[36] = slot.meta.load(Ordering::Relaxed) as u8;
        TupleKey::from_bytes(b)
    }
}

/// `struct reply_slot`: 48 bytes, the whole `struct tuple_key` and the owner.
#[repr(C)]
#[derive(Debug)]
struct SlotV6 {
    owner: AtomicU32,
    pad: u32,
    /// `struct tuple_key` as ten native-endian words.
    key: [AtomicU32; 10],
}

/// The general layout (`reply_table`), for IPv6 tuples.
#[derive(Debug)]
enum V6 {}

impl Layout for V6 {
    type Slot = SlotV6;
    const KEY_WORDS: usize = 10;

    #[inline]
    fn holds(slot: &SlotV6, w: &Words) -> bool {
        slot.key
            .iter()
            .zip(w)
            .all(|(a, b)| a.load(Ordering::Relaxed) == *b)
    }

    #[inline]
    fn write(slot: &SlotV6, w: &Words, owner: u32) {
        for (a, v) in slot.key.iter().zip(w) {
            a.store(*v, Ordering::Relaxed);
        }
        Self::set_owner(slot, w, owner);
    }

    #[inline]
    fn set_owner(slot: &SlotV6, _: &Words, owner: u32) {
        slot.owner.store(owner, Ordering::Relaxed);
    }

    #[inline]
    fn owner(slot: &SlotV6) -> u32 {
        slot.owner.load(Ordering::Relaxed)
    }

    fn key(slot: &SlotV6) -> TupleKey {
        let mut b = [0u8; 40];
        for (i, a) in slot.key.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&a.load(Ordering::Relaxed).to_ne_bytes());
        }
        TupleKey::from_bytes(b)
    }
}

/// `struct reply_bucket_v4` (192 bytes) and `struct reply_bucket` (448 bytes): the
/// states and fingerprints in the first line.
#[repr(C)]
#[derive(Debug)]
struct Bucket<L: Layout> {
    state: [AtomicU32; WAYS],
    fp: [AtomicU32; WAYS],
    slots: [L::Slot; WAYS],
}

/// Bytes of one IPv4 bucket (the value size of `reply_table_v4`).
pub const BUCKET_BYTES_V4: usize = size_of::<Bucket<V4>>();
/// Bytes of one IPv6 bucket (the value size of `reply_table`).
pub const BUCKET_BYTES_V6: usize = size_of::<Bucket<V6>>();

/// `struct reply_cfg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyCfg {
    pub buckets_v4: u32,
    pub buckets_v6: u32,
    pub flags: u32,
    pub pad: u32,
    pub seed: u64,
}

/// Buckets of each family's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyBuckets {
    pub v4: u32,
    pub v6: u32,
}

/// The tuple's words and whether it is IPv4 (both addresses IPv4-mapped), the way the
/// program decides it (`is_v4_tuple`).
fn words(k: &TupleKey) -> (Words, bool) {
    let b = k.as_bytes();
    let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mapped =
        |at: usize| b[at..at + 10].iter().all(|&x| x == 0) && b[at + 10..at + 12] == [0xff; 2];
    if mapped(0) && mapped(16) {
        let mut w = [0; 10];
        w[..4].copy_from_slice(&[word(12), word(28), word(32), u32::from(b[36])]);
        (w, true)
    } else {
        (core::array::from_fn(|i| word(4 * i)), false)
    }
}

/// The program's `tuple_hash`: the tuple's words taken two at a time, a
/// multiply-xorshift round per pair, then a finaliser.
pub fn tuple_hash(w: &[u32], seed: u64) -> u64 {
    let mut h = seed;
    for p in w.chunks_exact(2) {
        let v = u64::from(p[0]) | (u64::from(p[1]) << 32);
        h = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    h ^= h >> 32;
    h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^ (h >> 32)
}

/// The program's `fingerprint`: bits of the hash the bucket choice does not use up.
pub fn fingerprint(h: u64) -> u32 {
    ((h ^ (h >> 23)).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
}

/// The program's `bucket_of`: half `i` of the hash scaled to `buckets`.
pub fn bucket_of(h: u64, i: usize, buckets: u32) -> u32 {
    let x = if i == 0 { h & 0xffff_ffff } else { h >> 32 };
    ((x * u64::from(buckets)) >> 32) as u32
}

/// A tuple, hashed: its words and family, its two buckets and its fingerprint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loc {
    w: Words,
    v4: bool,
    homes: [u32; 2],
    fp: u32,
}

/// One bucket's first line as [`Part::scan`] read it.
#[derive(Debug, Clone, Copy)]
struct Scan {
    states: [u32; WAYS],
    /// Bit `j`: way `j` is free.
    free: u32,
    /// Bit `j`: way `j` is valid and its fingerprint matched.
    matches: u32,
}

#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching has no observable effect and never faults.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Where a worker's tuple sits, and the generation it was written with (a slot removed or
/// rewritten since has another). Slots are numbered across both tables, IPv4 first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRef {
    pub slot: u32,
    pub state: u32,
}

/// What [`ReplyTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Written to a free slot, or taken over from another owner: the caller tracks it.
    New(SlotRef),
    /// The tuple was there already under this owner (who tracks it already).
    Existing(SlotRef),
    /// Both buckets are full.
    Full,
}

/// One family's table: a shared, writable mapping of its array map.
#[derive(Debug)]
struct Part<L: Layout> {
    base: NonNull<Bucket<L>>,
    len: usize,
    buckets: u32,
}

impl<L: Layout> Part<L> {
    /// A shared read-write mapping of `buckets` buckets: of the map `fd`, or anonymous
    /// (zero-filled) memory.
    fn mapped(fd: Option<RawFd>, buckets: u32) -> io::Result<Self> {
        if buckets == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no buckets"));
        }
        let len = buckets as usize * size_of::<Bucket<L>>();
        let flags = match fd {
            Some(_) => libc::MAP_SHARED,
            None => libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        };
        // SAFETY: a fresh shared mapping, of the map's memory (whose size the kernel
        // checks against the map: value size times entries, rounded to pages) or anonymous;
        // nothing else is mapped at the address the kernel picks. Drop unmaps it.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.unwrap_or(-1),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<Bucket<L>>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { base, len, buckets })
    }

    fn slots(&self) -> u32 {
        self.buckets * WAYS as u32
    }

    #[inline]
    fn bucket(&self, b: u32) -> &Bucket<L> {
        debug_assert!(b < self.buckets);
        // SAFETY: b < buckets, so the bucket lies inside the mapping, which is page
        // aligned (so 4-byte aligned, as Bucket needs) and lives as long as self; the
        // kernel zeroes array maps, and all-zero atomics are valid values.
        unsafe { &*self.base.as_ptr().add(b as usize) }
    }

    /// Bucket and way of this table's slot number `s`.
    #[inline]
    fn at(&self, s: u32) -> (&Bucket<L>, usize) {
        (self.bucket(s / WAYS as u32), s as usize % WAYS)
    }

    /// The two buckets `w` may live in, and its fingerprint.
    #[inline]
    fn homes(&self, w: &Words, seed: u64) -> ([u32; 2], u32) {
        let h = tuple_hash(&w[..L::KEY_WORDS], seed);
        (
            [bucket_of(h, 0, self.buckets), bucket_of(h, 1, self.buckets)],
            fingerprint(h),
        )
    }

    #[inline]
    fn prefetch_buckets(&self, l: &Loc) {
        for b in l.homes {
            prefetch(self.bucket(b) as *const Bucket<L> as *const u8);
        }
    }

    /// Reads bucket `b`'s first line once, without a branch per way: the states, which
    /// ways are free, and which are valid with fingerprint `fp`. (Branching on every way,
    /// as the first version did, mispredicted several times per bucket: half the cost of
    /// an insert and a removal, cache-resident.)
    #[inline]
    fn scan(&self, b: u32, fp: u32) -> Scan {
        let bk = self.bucket(b);
        let mut sc = Scan {
            states: [0; WAYS],
            free: 0,
            matches: 0,
        };
        for j in 0..WAYS {
            let s = bk.state[j].load(Ordering::Acquire);
            let f = bk.fp[j].load(Ordering::Relaxed);
            sc.states[j] = s;
            sc.free |= u32::from(s & TAG_MASK == TAG_FREE) << j;
            sc.matches |= u32::from((s & TAG_MASK == TAG_VALID) & (f == fp)) << j;
        }
        sc
    }

    #[inline]
    fn prefetch_slots(&self, l: &Loc) {
        let scans = l.homes.map(|b| self.scan(b, l.fp));
        for (sc, &b) in scans.iter().zip(&l.homes) {
            let bk = self.bucket(b);
            let mut m = sc.matches;
            while m != 0 {
                prefetch(&bk.slots[m.trailing_zeros() as usize] as *const L::Slot as *const u8);
                m &= m - 1;
            }
        }
        // Where an insert would write: the first free way of the emptier bucket.
        let i = usize::from(scans[1].free.count_ones() > scans[0].free.count_ones());
        let (sc, b) = (&scans[i], l.homes[i]);
        if sc.free != 0 {
            let j = sc.free.trailing_zeros() as usize;
            prefetch(&self.bucket(b).slots[j] as *const L::Slot as *const u8);
        }
    }

    /// The slot of bucket `b` holding `w` (fingerprint `fp`), valid, and its state.
    #[inline]
    fn find_in(&self, b: u32, fp: u32, w: &Words) -> Option<(usize, u32)> {
        self.find_scanned(b, &self.scan(b, fp), w)
    }

    /// [`Part::find_in`] of a bucket already scanned.
    #[inline]
    fn find_scanned(&self, b: u32, sc: &Scan, w: &Words) -> Option<(usize, u32)> {
        let bk = self.bucket(b);
        let mut m = sc.matches;
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            if L::holds(&bk.slots[j], w) {
                return Some((j, sc.states[j]));
            }
            m &= m - 1;
        }
        None
    }

    fn insert_at(&self, l: &Loc, owner: u32) -> Inserted {
        let (w, homes, fp) = (&l.w, l.homes, l.fp);
        let scans = homes.map(|b| self.scan(b, fp));
        for (sc, &b) in scans.iter().zip(&homes) {
            if let Some((j, s)) = self.find_scanned(b, sc, w) {
                let at = b * WAYS as u32 + j as u32;
                if L::owner(&self.bucket(b).slots[j]) == owner {
                    return Inserted::Existing(SlotRef { slot: at, state: s });
                }
                // Another worker's: it is ours now (that worker finds out when it next
                // looks at the slot).
                if let Some(r) = self.rewrite(at, s, |_, sl| {
                    L::set_owner(sl, w, owner);
                    TAG_VALID
                }) {
                    return Inserted::New(r);
                }
            }
        }
        // The emptier bucket first; a way another writer claimed since the scan fails its
        // compare-and-swap and the next free one is tried.
        let first = usize::from(scans[1].free.count_ones() > scans[0].free.count_ones());
        for i in [first, 1 - first] {
            let (sc, b) = (&scans[i], homes[i]);
            let mut m = sc.free;
            while m != 0 {
                let j = m.trailing_zeros() as usize;
                m &= m - 1;
                let at = b * WAYS as u32 + j as u32;
                if let Some(r) = self.rewrite(at, sc.states[j], |bk, sl| {
                    L::write(sl, w, owner);
                    bk.fp[j].store(fp, Ordering::Relaxed);
                    TAG_VALID
                }) {
                    return Inserted::New(r);
                }
            }
        }
        Inserted::Full
    }

    /// Claims slot `at` if its state is still `seen`, lets `write` fill it, and publishes
    /// the tag `write` returns with the next generation. The new reference (numbered in
    /// this table), or `None` if another writer got there first.
    fn rewrite(
        &self,
        at: u32,
        seen: u32,
        write: impl FnOnce(&Bucket<L>, &L::Slot) -> u32,
    ) -> Option<SlotRef> {
        let (bk, j) = self.at(at);
        let busy = (seen & !TAG_MASK) | TAG_BUSY;
        bk.state[j]
            .compare_exchange(seen, busy, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let tag = write(bk, &bk.slots[j]);
        let next = (seen & !TAG_MASK).wrapping_add(1 << 2) | tag;
        bk.state[j].store(next, Ordering::Release);
        Some(SlotRef {
            slot: at,
            state: next,
        })
    }

    fn tuple_at(&self, r: SlotRef, owner: u32) -> Option<TupleKey> {
        let (bk, j) = self.at(r.slot);
        if bk.state[j].load(Ordering::Acquire) != r.state || L::owner(&bk.slots[j]) != owner {
            return None;
        }
        let k = L::key(&bk.slots[j]);
        // Read again: a writer may have claimed the slot while the tuple was read.
        (bk.state[j].load(Ordering::Acquire) == r.state).then_some(k)
    }

    fn remove(&self, r: SlotRef) -> bool {
        self.rewrite(r.slot, r.state, |_, _| TAG_FREE).is_some()
    }

    fn remove_at(&self, l: &Loc, owner: u32) -> bool {
        for b in l.homes {
            let Some((j, s)) = self.find_in(b, l.fp, &l.w) else {
                continue;
            };
            if L::owner(&self.bucket(b).slots[j]) != owner {
                return false;
            }
            // The claim checks the state again: a slot rewritten since it was read
            // (another owner took it over) is left alone.
            return self.remove(SlotRef {
                slot: b * WAYS as u32 + j as u32,
                state: s,
            });
        }
        false
    }

    fn owned_at(&self, slot: u32, owner: u32) -> Option<(SlotRef, TupleKey)> {
        let (bk, j) = self.at(slot);
        let state = bk.state[j].load(Ordering::Acquire);
        if state & TAG_MASK != TAG_VALID {
            return None;
        }
        let r = SlotRef { slot, state };
        self.tuple_at(r, owner).map(|k| (r, k))
    }

    fn owner_of(&self, l: &Loc) -> Option<u32> {
        for b in l.homes {
            if let Some((j, s)) = self.find_in(b, l.fp, &l.w) {
                let bk = self.bucket(b);
                let o = L::owner(&bk.slots[j]);
                if bk.state[j].load(Ordering::Acquire) == s {
                    return Some(o);
                }
            }
        }
        None
    }

    fn len(&self) -> usize {
        (0..self.slots())
            .filter(|&s| {
                let (bk, j) = self.at(s);
                bk.state[j].load(Ordering::Relaxed) & TAG_MASK == TAG_VALID
            })
            .count()
    }
}

impl<L: Layout> Drop for Part<L> {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `mapped`, unmapped exactly once here;
        // no reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Both families' tables, shared by the workers and the program (see the module docs).
#[derive(Debug)]
pub struct ReplyTable {
    v4: Part<V4>,
    v6: Part<V6>,
    seed: u64,
}

// SAFETY: every access to the mappings goes through atomics (the buckets are only ever
// viewed as `&Bucket`, whose fields are all atomic but the padding, never read), so
// sharing them between threads is sound; the mappings live until the last `ReplyTable`
// (held in an `Arc`) is dropped.
unsafe impl Send for ReplyTable {}
// SAFETY: as above.
unsafe impl Sync for ReplyTable {}

/// Runs `$body` with `$p` bound to the table of `$l`'s family.
macro_rules! part_of {
    ($self:ident, $l:expr, |$p:ident| $body:expr) => {
        if $l.v4 {
            let $p = &$self.v4;
            $body
        } else {
            let $p = &$self.v6;
            $body
        }
    };
}

impl ReplyTable {
    /// Maps the array maps `v4` (`reply_table_v4`) and `v6` (`reply_table`) read-write,
    /// with the bucket counts they were created with.
    pub fn map(v4: RawFd, v6: RawFd, buckets: ReplyBuckets, seed: u64) -> io::Result<Self> {
        Ok(Self {
            v4: Part::mapped(Some(v4), buckets.v4)?,
            v6: Part::mapped(Some(v6), buckets.v6)?,
            seed,
        })
    }

    /// A table in anonymous shared memory, for tests that need no kernel map.
    #[cfg(test)]
    fn anonymous(buckets: ReplyBuckets, seed: u64) -> Self {
        Self {
            v4: Part::mapped(None, buckets.v4).expect("anonymous mapping"),
            v6: Part::mapped(None, buckets.v6).expect("anonymous mapping"),
            seed,
        }
    }

    /// Slots of both tables (what [`ReplyTable::owned_at`] numbers).
    pub fn slots(&self) -> usize {
        (self.v4.slots() + self.v6.slots()) as usize
    }

    /// Bytes of both tables' mappings.
    pub fn bytes(&self) -> usize {
        self.v4.len + self.v6.len
    }

    /// Where `k` may live: hashed once for the prefetch passes and the operation.
    pub fn locate(&self, k: &TupleKey) -> Loc {
        let (w, v4) = words(k);
        let (homes, fp) = if v4 {
            self.v4.homes(&w, self.seed)
        } else {
            self.v6.homes(&w, self.seed)
        };
        Loc { w, v4, homes, fp }
    }

    /// [`ReplyTable::locate`] of `TupleKey::of(k)`, without building the 40-byte key when
    /// both addresses are IPv4 (what every new IPv4 flow's commit and removal asks).
    #[inline]
    pub fn locate_flow(&self, k: &FlowKey) -> Loc {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (k.src, k.dst) else {
            return self.locate(&TupleKey::of(k));
        };
        let (s, d) = (k.sport.to_be_bytes(), k.dport.to_be_bytes());
        let mut w = [0; 10];
        w[..4].copy_from_slice(&[
            u32::from_ne_bytes(src.octets()),
            u32::from_ne_bytes(dst.octets()),
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
            u32::from(k.proto as u8),
        ]);
        let (homes, fp) = self.v4.homes(&w, self.seed);
        Loc {
            w,
            v4: true,
            homes,
            fp,
        }
    }

    /// First prefetch pass: the first line (states, fingerprints) of both buckets.
    #[inline]
    pub fn prefetch_buckets(&self, l: &Loc) {
        part_of!(self, l, |p| p.prefetch_buckets(l))
    }

    /// Second prefetch pass (after the first has landed): the lines of the slots whose
    /// fingerprint matches, and of the first free slot of the emptier bucket (where an
    /// insert would write).
    #[inline]
    pub fn prefetch_slots(&self, l: &Loc) {
        part_of!(self, l, |p| p.prefetch_slots(l))
    }

    /// Writes `k` owned by `owner`: over the slot that already holds it, else into a free
    /// slot of the emptier of its two buckets.
    pub fn insert(&self, k: &TupleKey, owner: u32) -> Inserted {
        self.insert_at(&self.locate(k), owner)
    }

    /// [`ReplyTable::insert`] of a located tuple.
    pub fn insert_at(&self, l: &Loc, owner: u32) -> Inserted {
        debug_assert!(owner <= MAX_OWNER);
        if l.v4 {
            self.v4.insert_at(l, owner)
        } else {
            match self.v6.insert_at(l, owner) {
                Inserted::New(r) => Inserted::New(self.global(r)),
                Inserted::Existing(r) => Inserted::Existing(self.global(r)),
                Inserted::Full => Inserted::Full,
            }
        }
    }

    /// An IPv6 table reference numbered across both tables.
    fn global(&self, r: SlotRef) -> SlotRef {
        SlotRef {
            slot: r.slot + self.v4.slots(),
            ..r
        }
    }

    /// Which table slot `r` (numbered across both) is in, and its number there.
    fn split(&self, r: SlotRef) -> (bool, SlotRef) {
        let n = self.v4.slots();
        if r.slot < n {
            (true, r)
        } else {
            (
                false,
                SlotRef {
                    slot: r.slot - n,
                    ..r
                },
            )
        }
    }

    /// The tuple in `r`'s slot if the slot is still as `r` saw it (valid, same
    /// generation) and `owner` owns it.
    pub fn tuple_at(&self, r: SlotRef, owner: u32) -> Option<TupleKey> {
        match self.split(r) {
            (true, r) => self.v4.tuple_at(r, owner),
            (false, r) => self.v6.tuple_at(r, owner),
        }
    }

    /// Frees `r`'s slot if it is still as `r` saw it. Whether it did.
    pub fn remove(&self, r: SlotRef) -> bool {
        match self.split(r) {
            (true, r) => self.v4.remove(r),
            (false, r) => self.v6.remove(r),
        }
    }

    /// Frees the slot holding `k` if `owner` owns it. Whether it did.
    pub fn remove_key(&self, k: &TupleKey, owner: u32) -> bool {
        self.remove_at(&self.locate(k), owner)
    }

    /// [`ReplyTable::remove_key`] of a located tuple.
    pub fn remove_at(&self, l: &Loc, owner: u32) -> bool {
        part_of!(self, l, |p| p.remove_at(l, owner))
    }

    /// The valid slot at index `slot` (`0..slots()`), as a reference, with its tuple, if
    /// `owner` owns it: what a sweep walking the whole table looks at.
    pub fn owned_at(&self, slot: u32, owner: u32) -> Option<(SlotRef, TupleKey)> {
        match self.split(SlotRef { slot, state: 0 }) {
            (true, r) => self.v4.owned_at(r.slot, owner),
            (false, r) => self
                .v6
                .owned_at(r.slot, owner)
                .map(|(r, k)| (self.global(r), k)),
        }
    }

    /// The owner of `k`, read the way the steering program reads it.
    pub fn owner_of(&self, k: &TupleKey) -> Option<u32> {
        let l = self.locate(k);
        part_of!(self, l, |p| p.owner_of(&l))
    }

    /// Valid slots (a full walk: tests and reports).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{FlowKey, L4Proto};
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::collections::VecDeque;

    const B: ReplyBuckets = ReplyBuckets { v4: 16, v6: 16 };

    #[test]
    fn locate_flow_is_locate_of_the_tuple_key() {
        let t = ReplyTable::anonymous(B, 0x1234_5678);
        let v4 = |a: u32| IpAddr::from(Ipv4Addr::from(a));
        let v6 = |a: u128| IpAddr::from(Ipv6Addr::from(a));
        let mapped = |a: u32| v6(0xffff_0000_0000 | u128::from(a));
        let cases = [
            (v4(0x0af4_0001), v4(0x0a60_0001)),
            (v4(0xffff_ffff), v4(0)),
            (v6(0xfd00 << 112 | 1), v6(0xfd00 << 112 | 2)),
            (mapped(0x0af4_0001), mapped(0x0a60_0001)),
            (v4(0x0af4_0001), mapped(0x0a60_0001)),
            (v4(0x0af4_0001), v6(0xfd00 << 112 | 2)),
        ];
        for (n, (src, dst)) in cases.into_iter().enumerate() {
            for proto in [L4Proto::Tcp, L4Proto::Udp] {
                let k = FlowKey {
                    src,
                    dst,
                    sport: 40_000 + n as u16,
                    dport: 0x1f90 ^ n as u16,
                    proto,
                };
                assert_eq!(t.locate_flow(&k), t.locate(&TupleKey::of(&k)), "{k:?}");
            }
        }
    }

    #[test]
    fn layouts_match_steer_c() {
        assert_eq!(size_of::<SlotV4>(), 16);
        assert_eq!(size_of::<SlotV6>(), 48);
        assert_eq!(BUCKET_BYTES_V4, 192, "three lines");
        assert_eq!(BUCKET_BYTES_V6, 448, "seven lines");
        assert_eq!(
            core::mem::offset_of!(Bucket<V4>, slots),
            64,
            "one line of states"
        );
        assert_eq!(core::mem::offset_of!(Bucket<V6>, slots), 64);
        assert_eq!(size_of::<ReplyCfg>(), 24);
    }

    fn flow(src: IpAddr, dst: IpAddr, n: u32) -> TupleKey {
        TupleKey::of(&FlowKey {
            src,
            dst,
            sport: (n % 60000) as u16 + 1024,
            dport: 8080,
            proto: L4Proto::Tcp,
        })
    }

    fn key(n: u32, owner: u32) -> TupleKey {
        flow(
            Ipv4Addr::from(0x0af4_0000 | n).into(),
            Ipv4Addr::from(0x0af4_1000 | owner).into(),
            n,
        )
    }

    fn key6(n: u32, owner: u32) -> TupleKey {
        flow(
            Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000 | u128::from(n)).into(),
            Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0001_0000 | u128::from(owner)).into(),
            n,
        )
    }

    #[test]
    fn insert_find_take_over_and_remove() {
        for key in [key, key6] {
            let t = ReplyTable::anonymous(B, 7);
            let k = key(1, 0);
            let Inserted::New(r) = t.insert(&k, 0) else {
                panic!("empty table")
            };
            assert_eq!(t.owner_of(&k), Some(0));
            assert_eq!(t.tuple_at(r, 0), Some(k));
            assert_eq!(t.tuple_at(r, 1), None, "not worker 1's");
            // Again by the same worker: nothing changes.
            assert_eq!(t.insert(&k, 0), Inserted::Existing(r));
            // By another worker: taken over in place, the old reference is stale.
            let Inserted::New(r1) = t.insert(&k, 1) else {
                panic!("take-over")
            };
            assert_eq!(r1.slot, r.slot);
            assert_eq!(t.owner_of(&k), Some(1));
            assert_eq!(t.tuple_at(r, 0), None);
            assert!(!t.remove(r), "a stale reference frees nothing");
            assert_eq!(t.len(), 1);
            assert!(t.remove(r1));
            assert_eq!(t.owner_of(&k), None);
            assert!(t.is_empty());
            assert!(!t.remove(r1), "removed once");
            // By key: only the owner's.
            t.insert(&k, 1);
            assert!(!t.remove_key(&k, 0));
            assert_eq!(t.owned_at(r1.slot, 0), None);
            assert_eq!(t.owned_at(r1.slot, 1).map(|(_, k)| k), Some(k));
            assert!(t.remove_key(&k, 1));
            assert!(!t.remove_key(&k, 1));
            assert_eq!(t.owned_at(r1.slot, 1), None);
            // The freed slot is reused with a new generation.
            let Inserted::New(r2) = t.insert(&key(2, 0), 0) else {
                panic!()
            };
            assert_ne!(r2, r1);
            assert_eq!(t.tuple_at(r1, 1), None);
        }
    }

    /// IPv4 tuples go to the compact table and come back whole (ports, protocol, owner
    /// up to 24 bits); IPv6 tuples to the other; the walk numbers both.
    #[test]
    fn families_have_their_own_tables_and_tuples_come_back_whole() {
        let t = ReplyTable::anonymous(ReplyBuckets { v4: 4, v6: 2 }, 3);
        assert_eq!(t.slots(), 48);
        assert_eq!(t.bytes(), 4 * 192 + 2 * 448);
        let udp = TupleKey::of(&FlowKey {
            src: "10.244.1.3".parse().unwrap(),
            dst: "192.168.7.9".parse().unwrap(),
            sport: 65535,
            dport: 53,
            proto: L4Proto::Udp,
        });
        let v6 = key6(5, 0);
        let Inserted::New(a) = t.insert(&udp, MAX_OWNER) else {
            panic!()
        };
        let Inserted::New(b) = t.insert(&v6, 2) else {
            panic!()
        };
        assert!(a.slot < 32 && b.slot >= 32, "{a:?} {b:?}");
        assert_eq!(t.tuple_at(a, MAX_OWNER), Some(udp));
        assert_eq!(t.owner_of(&udp), Some(MAX_OWNER));
        assert_eq!(t.tuple_at(b, 2), Some(v6));
        assert_eq!(t.owned_at(b.slot, 2), Some((b, v6)));
        assert_eq!(t.v4.len(), 1);
        assert_eq!(t.v6.len(), 1);
        // Same addresses and ports, another protocol: another tuple.
        let mut tcp = udp.as_bytes();
        tcp[36] = 6;
        assert_eq!(t.owner_of(&TupleKey::from_bytes(tcp)), None);
        let walked: Vec<_> = (0..t.slots() as u32)
            .filter_map(|s| t.owned_at(s, 2).or_else(|| t.owned_at(s, MAX_OWNER)))
            .map(|(_, k)| k)
            .collect();
        assert_eq!(walked, vec![udp, v6]);
    }

    /// Sized as `reply_buckets_for` sizes it (three quarters full at capacity), a
    /// table refuses almost nothing (2 in 196,608 measured at 2^15 buckets; the first
    /// refusal comes past 70% full), and every tuple it took is found under its owner.
    #[test]
    fn three_quarters_full_refuses_almost_nothing_and_finds_every_tuple() {
        for (seed, key) in [(0u64, key as fn(u32, u32) -> TupleKey), (1, key6), (2, key)] {
            let t = ReplyTable::anonymous(ReplyBuckets { v4: 2048, v6: 2048 }, seed);
            let slots = t.slots() / 2;
            let mut placed = Vec::new();
            let mut refused = 0;
            let mut first_refusal = None;
            for n in 0..(slots * 3 / 4) as u32 {
                let k = key(n, n % 3);
                match t.insert(&k, n % 3) {
                    Inserted::New(_) => placed.push((k, n % 3)),
                    Inserted::Existing(_) => panic!("distinct tuples"),
                    Inserted::Full => {
                        refused += 1;
                        first_refusal.get_or_insert(n as usize);
                    }
                }
            }
            assert!(
                refused * 1000 <= placed.len(),
                "seed {seed}: {refused} refused"
            );
            if let Some(f) = first_refusal {
                assert!(f * 10 >= slots * 7, "seed {seed}: first refusal at {f}");
            }
            assert_eq!(t.len(), placed.len());
            for (k, o) in &placed {
                assert_eq!(t.owner_of(k), Some(*o));
            }
            assert_eq!(t.owner_of(&key(u32::MAX, 0)), None);
        }
    }

    /// Two workers writing (their own tuples, and a shared set both take over from each
    /// other) while a reader looks up: the reader never sees an owner a tuple did not
    /// have, nor a tuple nobody wrote.
    #[test]
    fn concurrent_writers_and_a_reader_agree() {
        let t = ReplyTable::anonymous(ReplyBuckets { v4: 32, v6: 32 }, 99);
        let writing = AtomicU32::new(2);
        let reading = AtomicU32::new(0);
        std::thread::scope(|s| {
            for w in 0..2u32 {
                let t = &t;
                let writing = &writing;
                let reading = &reading;
                s.spawn(move || {
                    // Start together with the reader (bounded wait).
                    for _ in 0..1_000_000 {
                        if reading.load(Ordering::Acquire) > 0 {
                            break;
                        }
                        std::thread::yield_now();
                    }
                    let mut mine = VecDeque::new();
                    for round in 0..20_000u32 {
                        let own = if round % 2 == 0 {
                            key(1000 + (round % 40), w)
                        } else {
                            key6(1000 + (round % 40), w)
                        };
                        if let Inserted::New(r) = t.insert(&own, w) {
                            mine.push_back(r);
                        }
                        let _ = t.insert(&key(round % 8, 9), w);
                        if mine.len() > 30 {
                            let r = mine.pop_front().unwrap();
                            t.remove(r);
                        }
                    }
                    writing.fetch_sub(1, Ordering::Release);
                });
            }
            let t = &t;
            let writing = &writing;
            let reading = &reading;
            s.spawn(move || {
                reading.store(1, Ordering::Release);
                let mut passes = 0u64;
                while writing.load(Ordering::Acquire) > 0 {
                    passes += 1;
                    for n in 0..40 {
                        for w in 0..2 {
                            // key(n, w) belongs to w alone.
                            for k in [key(1000 + n, w), key6(1000 + n, w)] {
                                if let Some(o) = t.owner_of(&k) {
                                    assert_eq!(o, w);
                                }
                            }
                        }
                    }
                    for n in 0..8 {
                        if let Some(o) = t.owner_of(&key(n, 9)) {
                            assert!(o < 2, "owner {o}");
                        }
                    }
                    assert_eq!(t.owner_of(&key(500, 0)), None);
                }
                assert!(passes > 0, "the reader ran alongside the writers");
            });
        });
    }

    #[test]
    fn buckets_cover_the_range() {
        for n in [1u32, 7, 1000, 1 << 20] {
            assert_eq!(bucket_of(0, 0, n), 0);
            assert_eq!(bucket_of(u64::MAX, 0, n), n - 1);
            assert_eq!(bucket_of(u64::MAX, 1, n), n - 1);
        }
    }
}
