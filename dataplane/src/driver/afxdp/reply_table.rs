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
//! So the tuples live in an array map created `BPF_F_MMAPABLE`, which every worker maps
//! into its address space and writes like memory. The map is a hash table of buckets of
//! [`WAYS`] slots; a tuple lives in one of two buckets picked by a seeded hash
//! ([`tuple_hash`], the same function as `tuple_hash` in `steer.c`), in the emptier one.
//! A bucket's first cache line holds its slots' states and 32-bit fingerprints of their
//! tuples, so finding a tuple, or room for one, reads one line per bucket, plus the
//! slot's line when a fingerprint matches. A slot's state is `generation << 2 | tag`:
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

/// Slots per bucket (`REPLY_WAYS` in steer.c).
pub const WAYS: usize = 8;

const TAG_MASK: u32 = 3;
const TAG_FREE: u32 = 0;
const TAG_BUSY: u32 = 1;
const TAG_VALID: u32 = 2;

/// Bit of `reply_cfg.flags`: several workers, so the program looks up the owners of
/// original tuples too (`REPLY_CFG_OWNERS`).
pub const CFG_OWNERS: u32 = 1;

/// `struct reply_slot`: 48 bytes.
#[repr(C)]
#[derive(Debug)]
struct Slot {
    owner: AtomicU32,
    pad: u32,
    /// `struct tuple_key` as ten native-endian words.
    key: [AtomicU32; 10],
}

/// `struct reply_bucket`: 448 bytes, the states and fingerprints in the first line.
#[repr(C)]
#[derive(Debug)]
struct Bucket {
    state: [AtomicU32; WAYS],
    fp: [AtomicU32; WAYS],
    slots: [Slot; WAYS],
}

/// Bytes of one bucket (the array map's value size).
pub const BUCKET_BYTES: usize = size_of::<Bucket>();

/// `struct reply_cfg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyCfg {
    pub buckets: u32,
    pub flags: u32,
    pub seed: u64,
}

fn words(k: &TupleKey) -> [u32; 10] {
    let b = k.as_bytes();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

/// The program's `tuple_hash`: ten native-endian words taken two at a time, a
/// multiply-xorshift round per pair, then a finaliser.
pub fn tuple_hash(k: &TupleKey, seed: u64) -> u64 {
    let w = words(k);
    let mut h = seed;
    for i in (0..10).step_by(2) {
        let v = u64::from(w[i]) | (u64::from(w[i + 1]) << 32);
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

/// A tuple, hashed: its words, its two buckets and its fingerprint.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loc {
    w: [u32; 10],
    homes: [u32; 2],
    fp: u32,
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
/// rewritten since has another).
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

/// A shared, writable mapping of the `reply_table` array map (see the module docs).
#[derive(Debug)]
pub struct ReplyTable {
    base: NonNull<Bucket>,
    len: usize,
    buckets: u32,
    seed: u64,
}

// SAFETY: every access to the mapping goes through atomics (the buckets are only ever
// viewed as `&Bucket`, whose fields are all atomic), so sharing it between threads is
// sound; the mapping lives until the last `ReplyTable` (held in an `Arc`) is dropped.
unsafe impl Send for ReplyTable {}
// SAFETY: as above.
unsafe impl Sync for ReplyTable {}

impl ReplyTable {
    /// Maps `buckets` buckets of the array map `fd` read-write.
    pub fn map(fd: RawFd, buckets: u32, seed: u64) -> io::Result<Self> {
        Self::mapped(Some(fd), buckets, seed)
    }

    /// A table in anonymous shared memory, for tests that need no kernel map.
    #[cfg(test)]
    fn anonymous(buckets: u32, seed: u64) -> Self {
        Self::mapped(None, buckets, seed).expect("anonymous mapping")
    }

    /// A shared read-write mapping of `buckets` buckets: of the map `fd`, or anonymous
    /// (zero-filled) memory.
    fn mapped(fd: Option<RawFd>, buckets: u32, seed: u64) -> io::Result<Self> {
        if buckets == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no buckets"));
        }
        let len = buckets as usize * BUCKET_BYTES;
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
        let base = NonNull::new(p.cast::<Bucket>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            base,
            len,
            buckets,
            seed,
        })
    }

    pub fn slots(&self) -> usize {
        self.buckets as usize * WAYS
    }

    fn bucket(&self, b: u32) -> &Bucket {
        debug_assert!(b < self.buckets);
        // SAFETY: b < buckets, so the bucket lies inside the mapping, which is page
        // aligned (so 8-byte aligned, as Bucket needs) and lives as long as self; the
        // kernel zeroes array maps, and all-zero atomics are valid values.
        unsafe { &*self.base.as_ptr().add(b as usize) }
    }

    /// Bucket and way of slot number `s`.
    fn at(&self, s: u32) -> (&Bucket, usize) {
        (self.bucket(s / WAYS as u32), s as usize % WAYS)
    }

    /// The two buckets `k` may live in, and its fingerprint.
    fn homes(&self, k: &TupleKey) -> ([u32; 2], u32) {
        let h = tuple_hash(k, self.seed);
        (
            [bucket_of(h, 0, self.buckets), bucket_of(h, 1, self.buckets)],
            fingerprint(h),
        )
    }

    /// Where `k` may live: hashed once for the prefetch passes and the operation.
    pub fn locate(&self, k: &TupleKey) -> Loc {
        let (homes, fp) = self.homes(k);
        Loc {
            w: words(k),
            homes,
            fp,
        }
    }

    /// First prefetch pass: the first line (states, fingerprints) of both buckets.
    #[inline]
    pub fn prefetch_buckets(&self, l: &Loc) {
        for b in l.homes {
            prefetch(self.bucket(b) as *const Bucket as *const u8);
        }
    }

    /// Second prefetch pass (after the first has landed): the lines of the slots whose
    /// fingerprint matches, and of the first free slot of the emptier bucket (where an
    /// insert would write).
    #[inline]
    pub fn prefetch_slots(&self, l: &Loc) {
        let mut best: Option<(usize, u32, usize)> = None;
        for b in l.homes {
            let bk = self.bucket(b);
            let mut free = 0;
            let mut first_free = None;
            for j in 0..WAYS {
                let s = bk.state[j].load(Ordering::Relaxed) & TAG_MASK;
                if s == TAG_FREE {
                    free += 1;
                    first_free.get_or_insert(j);
                } else if s == TAG_VALID && bk.fp[j].load(Ordering::Relaxed) == l.fp {
                    prefetch(&bk.slots[j] as *const Slot as *const u8);
                }
            }
            if let Some(j) = first_free {
                if best.is_none_or(|(f, _, _)| free > f) {
                    best = Some((free, b, j));
                }
            }
        }
        if let Some((_, b, j)) = best {
            prefetch(&self.bucket(b).slots[j] as *const Slot as *const u8);
        }
    }

    fn holds(slot: &Slot, w: &[u32; 10]) -> bool {
        slot.key
            .iter()
            .zip(w)
            .all(|(a, b)| a.load(Ordering::Relaxed) == *b)
    }

    /// The slot of bucket `b` holding `w` (fingerprint `fp`), valid, and its state.
    fn find_in(&self, b: u32, fp: u32, w: &[u32; 10]) -> Option<(usize, u32)> {
        let bk = self.bucket(b);
        (0..WAYS).find_map(|j| {
            let s = bk.state[j].load(Ordering::Acquire);
            (s & TAG_MASK == TAG_VALID
                && bk.fp[j].load(Ordering::Relaxed) == fp
                && Self::holds(&bk.slots[j], w))
            .then_some((j, s))
        })
    }

    /// Writes `k` owned by `owner`: over the slot that already holds it, else into a free
    /// slot of the emptier of its two buckets.
    pub fn insert(&self, k: &TupleKey, owner: u32) -> Inserted {
        self.insert_at(&self.locate(k), owner)
    }

    /// [`ReplyTable::insert`] of a located tuple.
    pub fn insert_at(&self, l: &Loc, owner: u32) -> Inserted {
        let (w, homes, fp) = (l.w, l.homes, l.fp);
        for &b in &homes {
            if let Some((j, s)) = self.find_in(b, fp, &w) {
                let at = b * WAYS as u32 + j as u32;
                if self.bucket(b).slots[j].owner.load(Ordering::Relaxed) == owner {
                    return Inserted::Existing(SlotRef { slot: at, state: s });
                }
                // Another worker's: it is ours now (that worker finds out when it next
                // looks at the slot).
                if let Some(r) = self.rewrite(at, s, |_, sl| {
                    sl.owner.store(owner, Ordering::Relaxed);
                    TAG_VALID
                }) {
                    return Inserted::New(r);
                }
            }
        }
        let free = |b: u32| {
            let bk = self.bucket(b);
            bk.state
                .iter()
                .filter(|s| s.load(Ordering::Relaxed) & TAG_MASK == TAG_FREE)
                .count()
        };
        let order = if free(homes[1]) > free(homes[0]) {
            [homes[1], homes[0]]
        } else {
            homes
        };
        for b in order {
            let bk = self.bucket(b);
            for j in 0..WAYS {
                let s = bk.state[j].load(Ordering::Relaxed);
                if s & TAG_MASK != TAG_FREE {
                    continue;
                }
                let at = b * WAYS as u32 + j as u32;
                if let Some(r) = self.rewrite(at, s, |bk, sl| {
                    sl.owner.store(owner, Ordering::Relaxed);
                    for (a, v) in sl.key.iter().zip(w) {
                        a.store(v, Ordering::Relaxed);
                    }
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
    /// the tag `write` returns with the next generation. The new reference, or `None` if
    /// another writer got there first.
    fn rewrite(
        &self,
        at: u32,
        seen: u32,
        write: impl FnOnce(&Bucket, &Slot) -> u32,
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

    /// The tuple in `r`'s slot if the slot is still as `r` saw it (valid, same
    /// generation) and `owner` owns it.
    pub fn tuple_at(&self, r: SlotRef, owner: u32) -> Option<TupleKey> {
        let (bk, j) = self.at(r.slot);
        if bk.state[j].load(Ordering::Acquire) != r.state
            || bk.slots[j].owner.load(Ordering::Relaxed) != owner
        {
            return None;
        }
        let mut b = [0u8; 40];
        for (i, a) in bk.slots[j].key.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&a.load(Ordering::Relaxed).to_ne_bytes());
        }
        let k = TupleKey::from_bytes(b);
        // Read again: a writer may have claimed the slot while the tuple was read.
        (bk.state[j].load(Ordering::Acquire) == r.state).then_some(k)
    }

    /// Frees `r`'s slot if it is still as `r` saw it. Whether it did.
    pub fn remove(&self, r: SlotRef) -> bool {
        self.rewrite(r.slot, r.state, |_, _| TAG_FREE).is_some()
    }

    /// Frees the slot holding `k` if `owner` owns it. Whether it did.
    pub fn remove_key(&self, k: &TupleKey, owner: u32) -> bool {
        self.remove_at(&self.locate(k), owner)
    }

    /// [`ReplyTable::remove_key`] of a located tuple.
    pub fn remove_at(&self, l: &Loc, owner: u32) -> bool {
        for b in l.homes {
            let Some((j, s)) = self.find_in(b, l.fp, &l.w) else {
                continue;
            };
            if self.bucket(b).slots[j].owner.load(Ordering::Relaxed) != owner {
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

    /// The valid slot at index `slot` (`0..slots()`), as a reference, with its tuple, if
    /// `owner` owns it: what a sweep walking the whole table looks at.
    pub fn owned_at(&self, slot: u32, owner: u32) -> Option<(SlotRef, TupleKey)> {
        let (bk, j) = self.at(slot);
        let state = bk.state[j].load(Ordering::Acquire);
        if state & TAG_MASK != TAG_VALID {
            return None;
        }
        let r = SlotRef { slot, state };
        self.tuple_at(r, owner).map(|k| (r, k))
    }

    /// The owner of `k`, read the way the steering program reads it.
    pub fn owner_of(&self, k: &TupleKey) -> Option<u32> {
        let w = words(k);
        let (homes, fp) = self.homes(k);
        for b in homes {
            if let Some((j, s)) = self.find_in(b, fp, &w) {
                let bk = self.bucket(b);
                let o = bk.slots[j].owner.load(Ordering::Relaxed);
                if bk.state[j].load(Ordering::Acquire) == s {
                    return Some(o);
                }
            }
        }
        None
    }

    /// Valid slots (a full walk: tests and reports).
    pub fn len(&self) -> usize {
        (0..self.slots() as u32)
            .filter(|&s| {
                let (bk, j) = self.at(s);
                bk.state[j].load(Ordering::Relaxed) & TAG_MASK == TAG_VALID
            })
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ReplyTable {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `map`, unmapped exactly once here; no
        // reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn layouts_match_steer_c() {
        assert_eq!(size_of::<Slot>(), 48);
        assert_eq!(BUCKET_BYTES, 448);
        assert_eq!(
            core::mem::offset_of!(Bucket, slots),
            64,
            "one line of states"
        );
        assert_eq!(size_of::<ReplyCfg>(), 16);
    }

    fn key(n: u32, owner: u32) -> TupleKey {
        TupleKey::of(&crate::flow::FlowKey {
            src: core::net::Ipv4Addr::from(0x0af4_0000 | n).into(),
            dst: core::net::Ipv4Addr::from(0x0af4_1000 | owner).into(),
            sport: (n % 60000) as u16 + 1024,
            dport: 8080,
            proto: crate::flow::L4Proto::Tcp,
        })
    }

    #[test]
    fn insert_find_take_over_and_remove() {
        let t = ReplyTable::anonymous(16, 7);
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

    /// Sized as `reply_buckets_for` sizes it (three quarters full at capacity), a
    /// table refuses almost nothing (2 in 196,608 measured at 2^15 buckets; the first
    /// refusal comes past 70% full), and every tuple it took is found under its owner.
    #[test]
    fn three_quarters_full_refuses_almost_nothing_and_finds_every_tuple() {
        for seed in 0..4u64 {
            let t = ReplyTable::anonymous(2048, seed);
            let mut placed = Vec::new();
            let mut refused = 0;
            let mut first_refusal = None;
            for n in 0..(t.slots() * 3 / 4) as u32 {
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
                assert!(f * 10 >= t.slots() * 7, "seed {seed}: first refusal at {f}");
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
        let t = ReplyTable::anonymous(32, 99);
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
                        let own = key(1000 + (round % 40), w);
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
                            if let Some(o) = t.owner_of(&key(1000 + n, w)) {
                                assert_eq!(o, w);
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
