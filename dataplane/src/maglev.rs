//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): lookup tables built off the
//! fast path, indexed by it; no I/O.
//!
//! The control plane turns a service port's backends into a [`MaglevTable`] with
//! [`MaglevTable::build`] (allocation and sorting are fine there). The fast path only calls
//! [`MaglevTable::lookup`] with a flow hash: one multiply, one bounds-checked load, no
//! allocation, no division, no panic.
//!
//! Nothing here depends on the process: no randomness, no `std` hasher, no addresses. The
//! same backends and [`MaglevConfig`] give the same table on every run and every machine,
//! so every node and every worker sends a flow to the same backend.
//!
//! # How a table is built
//!
//! * Size: `M` is a prime picked by [`table_size`] from the number of active backends
//!   (weight > 0).
//! * Preferences: each active backend walks its own permutation of the slots,
//!   `offset, offset + skip, offset + 2·skip, … (mod M)`, with `offset = h1(id) % M` and
//!   `skip = h2(id) % (M - 1) + 1`, where `h1` and `h2` are splitmix64 finalisers with
//!   different seeds. `M` being prime makes every such walk visit every slot once.
//! * Shares: backend `i` gets exactly `floor(M·wᵢ/W)` or `ceil(M·wᵢ/W)` slots (largest
//!   remainder apportionment, `W` the total weight).
//! * Turns: backends take turns claiming the next free slot on their walk. Claim `k` of a
//!   backend of weight `w` falls due at virtual time `(2k − 1) / 2w` (Sainte-Laguë
//!   spacing), ties broken by id, so heavier backends claim proportionally more often; a
//!   backend stops once it holds its share. With equal weights this is the paper's
//!   round-robin population, so slot counts differ by at most one.
//!
//! The table depends on backend ids, not on their order in the slice: reordering the slice
//! only relabels the indices the slots hold (as long as ids are distinct).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// The most backends a table can index. Slots hold a `u16` index into the slice given to
/// [`MaglevTable::build`], and `u16::MAX` marks a free slot while building, so indices run
/// `0..=65_534`. Backends past this many in the slice are ignored, as if their weight
/// were 0 (a service port with more endpoints than this is far outside what Kubernetes
/// EndpointSlices carry in practice).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// Marks a slot no backend has claimed yet (only while building).
const FREE_SLOT: u16 = u16::MAX;

/// Smallest table [`table_size`] returns: the permutation needs `M - 1 >= 1`.
const MIN_TABLE_SIZE: usize = 2;

/// Seed of the hash that places a backend's walk (`offset`).
const OFFSET_SEED: u64 = 0x243f_6a88_85a3_08d3;
/// Seed of the hash that spaces a backend's walk (`skip`).
const SKIP_SEED: u64 = 0x1319_8a2e_0370_7344;

/// One backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// Stable identity (e.g. a hash of address and port): decides the permutation, so a
    /// backend keeps its slots when others come and go. Ids should be distinct: two
    /// backends with the same id want the same slots.
    pub id: u64,
    /// Relative weight; 0 means no slots.
    pub weight: u32,
}

/// Sizing of Maglev tables; see [`table_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevConfig {
    /// Slots wanted per active backend. Shares are exact to one slot, so this bounds the
    /// imbalance between equal-weight backends to `1 / slots_per_backend` (1% at 100).
    pub slots_per_backend: usize,
    /// Lower bound on the table size (before rounding up to a prime).
    pub min_size: usize,
    /// Upper bound on the table size; if it is not prime, the largest prime below it is
    /// the real bound.
    pub max_size: usize,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self {
            slots_per_backend: 100,
            min_size: 251,
            max_size: 65_537,
        }
    }
}

/// The table size `M` for `active_backends` backends of weight > 0.
///
/// `M` moves along a ladder: the smallest prime at or above the power of two at or above
/// `clamp(active_backends * slots_per_backend, min_size, max_size)` (257, 521, 1031, 2053,
/// ..., 65_537), or, when there is no prime between that and `max_size`, the largest prime
/// `<= max_size`. Never below 2; a `min_size` above `max_size` is ignored (`max_size`
/// wins), and a `max_size` below 2 counts as 2.
///
/// Why a ladder: offsets and skips are taken mod `M`, so a change of `M` remaps almost
/// every slot. Sizing `M` straight from the backend count would resize (and reshuffle
/// flows without a conntrack entry) on every endpoint change; on the ladder `M` changes
/// only when the count crosses a power-of-two boundary, so a scale from 6 to 10 backends
/// (or back) keeps `M` and disrupts only the slots Maglev has to move. Set
/// `min_size == max_size` (e.g. 65_537, Katran's default) to pin `M` entirely.
pub fn table_size(active_backends: usize, cfg: &MaglevConfig) -> usize {
    let max = cfg.max_size.max(MIN_TABLE_SIZE);
    let min = cfg.min_size.min(max);
    let wanted = active_backends
        .saturating_mul(cfg.slots_per_backend)
        .clamp(min, max);
    let rung = wanted.checked_next_power_of_two().unwrap_or(max).min(max);
    (rung..=max)
        .find(|&n| is_prime(n))
        .unwrap_or_else(|| largest_prime_at_most(max))
}

/// Whether `n` is prime, by trial division (table sizes are at most a few hundred
/// thousand, so this takes microseconds).
pub fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5;
    while d <= n / d {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The largest prime `<= n`, or 2 when there is none.
fn largest_prime_at_most(n: usize) -> usize {
    (MIN_TABLE_SIZE..=n)
        .rev()
        .find(|&k| is_prime(k))
        .unwrap_or(MIN_TABLE_SIZE)
}

/// splitmix64's finaliser over `x ^ seed`: deterministic, well mixed, one seed per
/// independent hash.
fn splitmix64(x: u64, seed: u64) -> u64 {
    let mut z = (x ^ seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's walk over the slots: `offset + j·skip (mod M)` for `j = 0, 1, …`.
#[derive(Debug, Clone, Copy)]
struct SlotWalk {
    /// The slot the walk is at (`< M`).
    at: usize,
    /// Step between preferences, in `1..M`.
    skip: usize,
}

impl SlotWalk {
    /// The walk of the backend with `id` over a table of prime size `m >= 2`.
    fn new(id: u64, m: usize) -> Self {
        let m64 = m as u64;
        Self {
            at: (splitmix64(id, OFFSET_SEED) % m64) as usize,
            skip: (splitmix64(id, SKIP_SEED) % (m64 - 1)) as usize + 1,
        }
    }

    fn step(&mut self, m: usize) {
        // at < m and skip < m, so this neither overflows nor needs a modulo.
        self.at += self.skip;
        if self.at >= m {
            self.at -= m;
        }
    }

    /// Moves to the first free slot from here on (at most `m` steps; the walk visits every
    /// slot because `m` is prime). Returns `None` if the table is full.
    fn find_free(&mut self, slots: &[u16]) -> Option<usize> {
        let m = slots.len();
        for _ in 0..m {
            if slots[self.at] == FREE_SLOT {
                return Some(self.at);
            }
            self.step(m);
        }
        None
    }
}

/// An active backend while its table is being built.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Index into the slice given to [`MaglevTable::build`] (what the slots hold).
    index: u16,
    id: u64,
    weight: u32,
    /// Slots it gets in total.
    share: usize,
    /// Slots it has claimed so far.
    claimed: usize,
    walk: SlotWalk,
}

/// A member's next claim, ordered by when it falls due: claim `k` (from 1) of a member of
/// weight `w` is due at `(2k - 1) / 2w`, stored as `due_twice = 2k - 1` so that comparing
/// two claims is an exact cross-multiplication. Ties go to the smaller id, then the
/// smaller member position.
#[derive(Debug, Clone, Copy)]
struct Claim {
    due_twice: u64,
    weight: u32,
    id: u64,
    member: usize,
}

impl Ord for Claim {
    fn cmp(&self, other: &Self) -> Ordering {
        let mine = u128::from(self.due_twice) * u128::from(other.weight);
        let theirs = u128::from(other.due_twice) * u128::from(self.weight);
        mine.cmp(&theirs)
            .then(self.id.cmp(&other.id))
            .then(self.member.cmp(&other.member))
    }
}

impl PartialOrd for Claim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Claim {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Claim {}

/// Gives each member `floor(m·w/W)` slots, then one more to the members with the largest
/// remainders (ties to the smaller id, then the earlier member) until the shares sum to `m`.
fn assign_shares(members: &mut [Member], m: usize) {
    let total_weight: u128 = members.iter().map(|mb| u128::from(mb.weight)).sum();
    if total_weight == 0 {
        return;
    }
    let mut remainders = Vec::with_capacity(members.len());
    let mut assigned = 0usize;
    for (pos, mb) in members.iter_mut().enumerate() {
        let exact = m as u128 * u128::from(mb.weight);
        // exact / total_weight <= m, so the cast back is lossless.
        mb.share = (exact / total_weight) as usize;
        assigned += mb.share;
        remainders.push((Reverse(exact % total_weight), mb.id, pos));
    }
    remainders.sort_unstable();
    // Each member lost less than one slot to flooring, so fewer than members.len() remain.
    for &(_, _, pos) in remainders.iter().take(m - assigned) {
        members[pos].share += 1;
    }
}

/// Equal weights (the common case): the heap of [`Claim`]s would pop the members round
/// by round in (id, position) order, so walk them in that order directly: the same table,
/// without the heap's `log n` per slot.
fn fill_equal_weights(members: &mut [Member], slots: &mut [u16], m: usize) {
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].share > 0)
        .collect();
    order.sort_unstable_by_key(|&i| (members[i].id, i));
    loop {
        let mut progressed = false;
        for &i in &order {
            let mb = &mut members[i];
            if mb.claimed >= mb.share {
                continue;
            }
            let Some(slot) = mb.walk.find_free(slots) else {
                return;
            };
            slots[slot] = mb.index;
            mb.walk.step(m);
            mb.claimed += 1;
            progressed = true;
        }
        if !progressed {
            return;
        }
    }
}

/// A built lookup table: slot -> index into the backend slice it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MaglevTable {
    slots: Box<[u16]>,
}

impl MaglevTable {
    /// Builds the table for `backends`; slots hold indices into `backends`.
    ///
    /// Backends of weight 0 get no slots; if none has weight > 0 the table is empty.
    /// Backends past [`MAX_BACKENDS`] in the slice are ignored. Off the fast path: this
    /// allocates, and takes about `M·log M` steps.
    pub fn build(backends: &[MaglevBackend], cfg: &MaglevConfig) -> Self {
        let considered = &backends[..backends.len().min(MAX_BACKENDS)];
        let mut members: Vec<Member> = considered
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .map(|(index, b)| Member {
                // index < MAX_BACKENDS = u16::MAX, so it fits and never equals FREE_SLOT.
                index: index as u16,
                id: b.id,
                weight: b.weight,
                share: 0,
                claimed: 0,
                walk: SlotWalk { at: 0, skip: 1 },
            })
            .collect();
        if members.is_empty() {
            return Self::empty();
        }

        let m = table_size(members.len(), cfg);
        for mb in &mut members {
            mb.walk = SlotWalk::new(mb.id, m);
        }
        assign_shares(&mut members, m);

        let mut slots = vec![FREE_SLOT; m];
        if members.iter().all(|mb| mb.weight == members[0].weight) {
            fill_equal_weights(&mut members, &mut slots, m);
            return Self {
                slots: slots.into_boxed_slice(),
            };
        }
        let mut due: BinaryHeap<Reverse<Claim>> = members
            .iter()
            .enumerate()
            .filter(|(_, mb)| mb.share > 0)
            .map(|(member, mb)| {
                Reverse(Claim {
                    due_twice: 1,
                    weight: mb.weight,
                    id: mb.id,
                    member,
                })
            })
            .collect();
        // Shares sum to m and every claim fills one slot, so a free slot exists for every
        // claim and the table is full when the heap runs dry.
        while let Some(Reverse(claim)) = due.pop() {
            let mb = &mut members[claim.member];
            let Some(slot) = mb.walk.find_free(&slots) else {
                break;
            };
            slots[slot] = mb.index;
            mb.walk.step(m);
            mb.claimed += 1;
            if mb.claimed < mb.share {
                due.push(Reverse(Claim {
                    due_twice: claim.due_twice + 2,
                    ..claim
                }));
            }
        }
        debug_assert!(slots.iter().all(|&s| s != FREE_SLOT));

        Self {
            slots: slots.into_boxed_slice(),
        }
    }

    /// A table with no slots: every lookup misses.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The backend (index into the slice the table was built from) for a flow hash, or
    /// `None` if the table is empty. Uses all 64 bits of `hash` ("fastrange":
    /// `hash·M / 2⁶⁴`), so `hash` should be well mixed in its high bits.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u16> {
        self.slots.get(self.slot_of(hash)).copied()
    }

    /// Address of the slot [`MaglevTable::lookup`] of `hash` reads (for prefetching);
    /// `None` for an empty table.
    #[inline]
    pub fn slot_ptr(&self, hash: u64) -> Option<*const u16> {
        (!self.slots.is_empty()).then(|| self.slots.as_ptr().wrapping_add(self.slot_of(hash)))
    }

    /// `hash·M / 2⁶⁴`: always below `M`, so `get` never misses on a non-empty table.
    #[inline]
    fn slot_of(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    /// Whether the table has no slots (no backend had weight > 0).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Number of slots `M` (0 when empty).
    pub fn size(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Distinct, unremarkable ids for the backends of a test.
    fn backend_id(i: usize) -> u64 {
        splitmix64(i as u64, 0x5eed) | 1
    }

    fn equal_backends(n: usize) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                id: backend_id(i),
                weight: 1,
            })
            .collect()
    }

    fn slot_counts(table: &MaglevTable, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &s in table.slots.iter() {
            counts[s as usize] += 1;
        }
        counts
    }

    /// Slot -> backend id, so tables over different slices can be compared.
    fn ids_by_slot(table: &MaglevTable, backends: &[MaglevBackend]) -> Vec<u64> {
        table
            .slots
            .iter()
            .map(|&s| backends[s as usize].id)
            .collect()
    }

    fn pinned(m: usize) -> MaglevConfig {
        MaglevConfig {
            slots_per_backend: 100,
            min_size: m,
            max_size: m,
        }
    }

    /// Removes backend `gone` and returns how many slots of surviving backends changed owner.
    fn survivors_moved_on_removal(n: usize, gone: usize, cfg: &MaglevConfig) -> usize {
        let before = equal_backends(n);
        let mut after = before.clone();
        let gone_id = after.remove(gone).id;
        let t_before = MaglevTable::build(&before, cfg);
        let t_after = MaglevTable::build(&after, cfg);
        assert_eq!(t_before.size(), t_after.size());
        let old = ids_by_slot(&t_before, &before);
        let new = ids_by_slot(&t_after, &after);
        assert!(!new.contains(&gone_id));
        old.iter()
            .zip(&new)
            .filter(|(o, n)| **o != gone_id && o != n)
            .count()
    }

    /// Adds one backend to `n` and returns (slots of old backends that moved to another old
    /// backend, slots the new backend took).
    fn moved_on_addition(n: usize, cfg: &MaglevConfig) -> (usize, usize) {
        let after = equal_backends(n + 1);
        let before = &after[..n];
        let new_id = after[n].id;
        let t_before = MaglevTable::build(before, cfg);
        let t_after = MaglevTable::build(&after, cfg);
        assert_eq!(t_before.size(), t_after.size());
        let old = ids_by_slot(&t_before, before);
        let new = ids_by_slot(&t_after, &after);
        let shuffled = old
            .iter()
            .zip(&new)
            .filter(|(o, n)| **n != new_id && o != n)
            .count();
        let taken = new.iter().filter(|&&id| id == new_id).count();
        (shuffled, taken)
    }

    #[test]
    fn equal_weights_balance_to_one_slot() {
        for n in [1, 2, 3, 7, 10, 100, 1000] {
            let table = MaglevTable::build(&equal_backends(n), &MaglevConfig::default());
            let counts = slot_counts(&table, n);
            let (lo, hi) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            assert!(hi - lo <= 1, "n={n}: counts range {lo}..={hi}");
            assert!(lo >= 1, "n={n}: a backend got no slot");
            assert_eq!(counts.iter().sum::<usize>(), table.size());
        }
    }

    #[test]
    fn removing_a_backend_moves_few_surviving_slots() {
        // The table size is pinned: with the default config it would change with n, and
        // then almost everything moves (see `table_size`).
        // Measured slots of survivors that changed owner, removing backends 0, 3, 5, 9 of
        // n=10 / 0, 13, 50, 99 of n=100:
        //   n=10,  M=1009:  19, 26, 32, 23     (worst 3.2% of M)
        //   n=100, M=10007: 149, 167, 156, 158 (worst 1.67% of M)
        //   n=100, M=65537: 374, 366, 411, 382 (worst 0.63% of M)
        let worst = |n: usize, gones: &[usize], m: usize| {
            gones
                .iter()
                .map(|&g| survivors_moved_on_removal(n, g, &pinned(m)))
                .max()
                .unwrap()
        };
        let w10 = worst(10, &[0, 3, 5, 9], 1009);
        let w100 = worst(100, &[0, 13, 50, 99], 10_007);
        let w100_big = worst(100, &[0, 13, 50, 99], 65_537);
        assert!(w10 * 1000 < 45 * 1009, "n=10: {w10} survivor slots moved");
        assert!(
            w100 * 100 < 2 * 10_007,
            "n=100: {w100} survivor slots moved"
        );
        assert!(
            w100_big * 1000 < 8 * 65_537,
            "n=100, M=65537: {w100_big} survivor slots moved"
        );
    }

    #[test]
    fn adding_a_backend_moves_few_other_slots() {
        // Measured (slots moved between old backends / slots the new backend took):
        //   n=10,  M=1009:   27 / 91  (2.7% of M moved)
        //   n=100, M=10007: 153 / 99  (1.53% of M moved)
        //   n=100, M=65537: 396 / 649 (0.60% of M moved)
        for (n, m, bound_permille) in [(10, 1009, 35), (100, 10_007, 20), (100, 65_537, 8)] {
            let (shuffled, taken) = moved_on_addition(n, &pinned(m));
            assert!(
                shuffled * 1000 < bound_permille * m,
                "n={n}: {shuffled} slots moved between old backends"
            );
            let fair = m / (n + 1);
            assert!(
                taken == fair || taken == fair + 1,
                "new backend took {taken}"
            );
        }
    }

    #[test]
    fn weights_set_shares_and_zero_gets_nothing() {
        let backends = [
            MaglevBackend { id: 11, weight: 1 },
            MaglevBackend { id: 22, weight: 0 },
            MaglevBackend { id: 33, weight: 2 },
            MaglevBackend { id: 44, weight: 3 },
        ];
        for cfg in [MaglevConfig::default(), pinned(65_537)] {
            let table = MaglevTable::build(&backends, &cfg);
            let m = table.size() as f64;
            let counts = slot_counts(&table, backends.len());
            assert_eq!(counts[1], 0);
            for (i, want) in [(0, 1.0 / 6.0), (2, 2.0 / 6.0), (3, 3.0 / 6.0)] {
                let share = counts[i] as f64 / m;
                assert!(
                    (share - want).abs() < 0.01,
                    "M={m}: backend {i} has share {share}, want {want}"
                );
            }
        }
    }

    #[test]
    fn skewed_weights_still_get_exact_shares() {
        // Turn order alone would let the heavy backend claim all 307 slots before any light
        // one's first turn falls due; the shares cap it at its 236.9.
        let mut backends = vec![MaglevBackend {
            id: 7,
            weight: 1000,
        }];
        backends.extend((0..296).map(|i| MaglevBackend {
            id: backend_id(i),
            weight: 1,
        }));
        let table = MaglevTable::build(&backends, &pinned(307));
        let counts = slot_counts(&table, backends.len());
        assert_eq!(counts[0], 237);
        assert!(counts[1..].iter().all(|&c| c <= 1));
        assert_eq!(counts[1..].iter().sum::<usize>(), 70);
    }

    #[test]
    fn all_zero_or_no_backends_give_an_empty_table() {
        let zero = [MaglevBackend { id: 1, weight: 0 }; 3];
        for table in [
            MaglevTable::build(&zero, &MaglevConfig::default()),
            MaglevTable::build(&[], &MaglevConfig::default()),
            MaglevTable::empty(),
        ] {
            assert!(table.is_empty());
            assert_eq!(table.size(), 0);
            for h in [0, 1, u64::MAX, 0x8000_0000_0000_0000] {
                assert_eq!(table.lookup(h), None);
            }
        }
    }

    #[test]
    fn builds_are_deterministic_and_order_independent() {
        let backends: Vec<_> = (0..37)
            .map(|i| MaglevBackend {
                id: backend_id(i),
                weight: (i % 4) as u32,
            })
            .collect();
        let cfg = MaglevConfig::default();
        let a = MaglevTable::build(&backends, &cfg);
        let b = MaglevTable::build(&backends, &cfg);
        assert_eq!(a, b);

        // Same ids in another order: same slot -> id mapping.
        let mut reversed = backends.clone();
        reversed.reverse();
        let r = MaglevTable::build(&reversed, &cfg);
        assert_eq!(ids_by_slot(&a, &backends), ids_by_slot(&r, &reversed));

        // Pinned fingerprint: the table must be the same on every run and machine. If this
        // changes, every node running the old code disagrees with the new one.
        let fnv = a.slots.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &s| {
            (h ^ u64::from(s)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        assert_eq!((a.size(), fnv), (4099, 9021796767241012658));
    }

    #[test]
    fn lookups_follow_slot_shares() {
        let backends: Vec<_> = (0..10)
            .map(|i| MaglevBackend {
                id: backend_id(i),
                weight: 1 + (i % 3) as u32,
            })
            .collect();
        let table = MaglevTable::build(&backends, &MaglevConfig::default());
        let counts = slot_counts(&table, backends.len());
        let mut hits = vec![0usize; backends.len()];
        const SAMPLES: u64 = 100_000;
        for i in 0..SAMPLES {
            hits[table.lookup(splitmix64(i, 0)).unwrap() as usize] += 1;
        }
        for i in 0..backends.len() {
            let slot_share = counts[i] as f64 / table.size() as f64;
            let hit_share = hits[i] as f64 / SAMPLES as f64;
            // One standard deviation is about 0.0015 here.
            assert!(
                (slot_share - hit_share).abs() < 0.006,
                "backend {i}: slots {slot_share}, lookups {hit_share}"
            );
        }
    }

    #[test]
    fn table_sizes_are_prime_scaled_and_bounded() {
        let cfg = MaglevConfig::default();
        // The ladder: smallest prime at or above the next power of two.
        assert_eq!(table_size(0, &cfg), 257);
        assert_eq!(table_size(1, &cfg), 257);
        assert_eq!(table_size(2, &cfg), 257);
        assert_eq!(table_size(3, &cfg), 521);
        assert_eq!(table_size(6, &cfg), 1031);
        assert_eq!(table_size(10, &cfg), 1031);
        assert_eq!(table_size(100, &cfg), 16_411);
        assert_eq!(table_size(327, &cfg), 32_771);
        assert_eq!(table_size(328, &cfg), 65_537);
        assert_eq!(table_size(656, &cfg), 65_537);
        // Scaling within a rung keeps the size (and so the slots of survivors).
        for n in 6..=10 {
            assert_eq!(table_size(n, &cfg), 1031);
        }
        assert_eq!(table_size(1000, &cfg), 65_537);
        assert_eq!(table_size(usize::MAX, &cfg), 65_537);
        let mut last = 0;
        for n in 0..800 {
            let m = table_size(n, &cfg);
            assert!(is_prime(m), "{m}");
            assert!((251..=65_537).contains(&m));
            assert!(m >= last, "size shrank as backends grew");
            assert!(m >= (n * 100).min(65_537));
            last = m;
        }

        // A non-prime max: the largest prime below it.
        let c = |min_size, max_size| MaglevConfig {
            slots_per_backend: 100,
            min_size,
            max_size,
        };
        assert_eq!(table_size(100, &c(1, 1000)), 997);
        assert_eq!(table_size(9, &c(1, 1000)), 997);
        assert_eq!(table_size(5, &c(1, 1000)), 521);
        // min > max: max wins. Degenerate maxima: at least 2.
        assert_eq!(table_size(1, &c(5000, 1000)), 997);
        assert_eq!(table_size(1, &c(0, 0)), 2);
        assert_eq!(table_size(0, &c(0, 1)), 2);
        let one = MaglevTable::build(&equal_backends(3), &c(0, 0));
        assert_eq!(one.size(), 2);
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        const N: usize = 20_000;
        let mut composite = vec![false; N];
        for i in 2..N {
            if !composite[i] {
                for j in (i * i..N).step_by(i) {
                    composite[j] = true;
                }
            }
            assert_eq!(is_prime(i), !composite[i], "{i}");
        }
        assert!(!is_prime(0) && !is_prime(1));
        assert!(is_prime(65_537) && is_prime(2_147_483_647));
        assert!(!is_prime(65_535) && !is_prime(4_294_967_297));
    }

    #[test]
    fn backends_past_the_limit_are_ignored() {
        let mut backends = equal_backends(MAX_BACKENDS + 2);
        let table = MaglevTable::build(&backends, &MaglevConfig::default());
        assert_eq!(table.size(), 65_537);
        let counts = slot_counts(&table, backends.len());
        assert_eq!(&counts[MAX_BACKENDS..], &[0, 0]);
        assert!(counts[..MAX_BACKENDS].iter().all(|&c| c == 1 || c == 2));

        for b in &mut backends[..MAX_BACKENDS] {
            b.weight = 0;
        }
        assert!(MaglevTable::build(&backends, &MaglevConfig::default()).is_empty());
    }

    proptest! {
        #[test]
        fn random_backend_sets_land_on_weighted_backends(
            backends in prop::collection::vec(
                (any::<u64>(), 0u32..5).prop_map(|(id, weight)| MaglevBackend { id, weight }),
                1..200,
            ),
            slots_per_backend in 0usize..150,
            min_size in 0usize..400,
            max_size in 0usize..20_000,
            hashes in prop::collection::vec(any::<u64>(), 64),
        ) {
            let cfg = MaglevConfig { slots_per_backend, min_size, max_size };
            let table = MaglevTable::build(&backends, &cfg);
            let active = backends.iter().filter(|b| b.weight > 0).count();
            if active == 0 {
                prop_assert!(table.is_empty());
                for &h in &hashes {
                    prop_assert_eq!(table.lookup(h), None);
                }
                return Ok(());
            }
            let m = table.size();
            prop_assert_eq!(m, table_size(active, &cfg));
            prop_assert!(is_prime(m));
            for &h in hashes.iter().chain([0, u64::MAX].iter()) {
                let i = table.lookup(h).expect("non-empty table");
                prop_assert!(backends[i as usize].weight > 0);
            }
            // Every slot is owned by a weighted backend, and shares are exact to a slot.
            let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
            let counts = slot_counts(&table, backends.len());
            for (b, &c) in backends.iter().zip(&counts) {
                let exact = m as f64 * f64::from(b.weight) / total as f64;
                prop_assert!((c as f64 - exact).abs() < 1.0 + 1e-9, "{} slots vs {}", c, exact);
            }
        }
    }
}
