//! Hand-off of frames between workers: bounded, lock-free, single-producer
//! single-consumer rings, one per ordered pair of workers.
//!
//! Conntrack is per worker, and AF_XDP delivers a frame only to the socket bound to the
//! queue it arrived on; with several queues a frame can reach a worker that does not hold
//! its flow (the steering program says who does, see `steer.c`). That worker copies the
//! frame into the ring towards the owner; the owner copies it into a frame of its own
//! UMEM and runs it through its pipeline like one it received itself. Each ring's slots
//! are allocated once, at start; a full ring drops the frame (the sender counts
//! `handoff_queue_full`), nothing blocks.
//!
//! A worker about to sleep in `ppoll` raises its [`Doorbell`]'s flag and checks its rings
//! once more; a sender that finds the flag raised after pushing writes the doorbell's
//! eventfd (one system call per batch, only towards a sleeping worker), which the
//! sleeper polls with its sockets.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::tables::IfaceId;

/// Largest frame a slot holds (a UMEM frame's data area is smaller).
pub const HANDOFF_FRAME_LEN: usize = 2048;

/// One frame in flight between two workers.
struct Slot {
    ingress: IfaceId,
    len: u16,
    data: [u8; HANDOFF_FRAME_LEN],
}

/// Keeps the producer's and the consumer's index on separate cache lines.
#[repr(align(64))]
struct Padded(AtomicUsize);

struct Ring {
    slots: Box<[UnsafeCell<Slot>]>,
    mask: usize,
    /// Next slot the consumer reads (written by the consumer only).
    head: Padded,
    /// Next slot the producer writes (written by the producer only).
    tail: Padded,
}

// SAFETY: the ring is shared by exactly one producer (`HandoffTx`) and one consumer
// (`HandoffRx`), neither of which can be cloned. A slot is written only by the producer
// while it lies outside [head, tail) and read only by the consumer while it lies inside;
// the release store of `tail` (after the write) and the acquire load of it (before the
// read), and likewise for `head` in the other direction, order those accesses.
unsafe impl Sync for Ring {}
// SAFETY: see `Sync`; the slots hold plain bytes.
unsafe impl Send for Ring {}

/// Wakes a worker sleeping in `ppoll` when frames are handed to it.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; returns a new fd we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: fd was just created and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// The eventfd to poll for `POLLIN`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The owner is about to sleep: after this, check the rings once more before sleeping.
    pub fn arm(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// The owner is awake again; clears a pending ring.
    pub fn disarm(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64; the fd is non-blocking (EAGAIN when
        // nothing is pending, which is fine).
        let _ = unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Called by a sender after pushing: wakes the owner if it sleeps. Returns whether it
    /// rang.
    pub fn ring_if_sleeping(&self) -> bool {
        if !self.sleeping.load(Ordering::SeqCst) {
            return false;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we hold open.
        let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        true
    }
}

/// The sending end of a ring (one worker to one other).
pub struct HandoffTx {
    ring: Arc<Ring>,
    bell: Arc<Doorbell>,
    /// Frames pushed since the last [`HandoffTx::flush`].
    pushed: usize,
}

/// The receiving end of a ring.
pub struct HandoffRx {
    ring: Arc<Ring>,
}

impl core::fmt::Debug for HandoffTx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HandoffTx")
            .field("capacity", &(self.ring.mask + 1))
            .finish()
    }
}

impl core::fmt::Debug for HandoffRx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HandoffRx")
            .field("capacity", &(self.ring.mask + 1))
            .finish()
    }
}

/// A ring of `capacity` (rounded up to a power of two) slots whose consumer is woken
/// through `bell`.
pub fn channel(capacity: usize, bell: Arc<Doorbell>) -> (HandoffTx, HandoffRx) {
    let cap = capacity.max(2).next_power_of_two();
    let slots = (0..cap)
        .map(|_| {
            UnsafeCell::new(Slot {
                ingress: IfaceId(0),
                len: 0,
                data: [0; HANDOFF_FRAME_LEN],
            })
        })
        .collect();
    let ring = Arc::new(Ring {
        slots,
        mask: cap - 1,
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
    });
    (
        HandoffTx {
            ring: Arc::clone(&ring),
            bell,
            pushed: 0,
        },
        HandoffRx { ring },
    )
}

/// What each worker gets from [`mesh`]: its doorbell, a sender towards every other worker
/// (`None` at its own index) and a receiver from every other worker.
#[derive(Debug)]
pub struct HandoffEnds {
    pub bell: Arc<Doorbell>,
    pub to: Vec<Option<HandoffTx>>,
    pub from: Vec<HandoffRx>,
}

/// Rings between every ordered pair of `workers` workers, `capacity` frames each.
pub fn mesh(workers: usize, capacity: usize) -> io::Result<Vec<HandoffEnds>> {
    let bells: Vec<Arc<Doorbell>> = (0..workers)
        .map(|_| Doorbell::new().map(Arc::new))
        .collect::<io::Result<_>>()?;
    let mut ends: Vec<HandoffEnds> = bells
        .iter()
        .map(|b| HandoffEnds {
            bell: Arc::clone(b),
            to: (0..workers).map(|_| None).collect(),
            from: Vec::new(),
        })
        .collect();
    for from in 0..workers {
        for to in 0..workers {
            if from != to {
                let (tx, rx) = channel(capacity, Arc::clone(&bells[to]));
                ends[from].to[to] = Some(tx);
                ends[to].from.push(rx);
            }
        }
    }
    Ok(ends)
}

impl HandoffTx {
    /// Copies `frame` (which arrived on `ingress`) into the ring. False if the ring is
    /// full or the frame does not fit a slot (the caller drops and counts it).
    pub fn push(&mut self, ingress: IfaceId, frame: &[u8]) -> bool {
        let r = &*self.ring;
        if frame.len() > HANDOFF_FRAME_LEN {
            return false;
        }
        let tail = r.tail.0.load(Ordering::Relaxed);
        let head = r.head.0.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > r.mask {
            return false;
        }
        // SAFETY: the slot at `tail` is outside [head, tail): the consumer does not read it
        // until the release store below publishes it, and we are the only producer.
        let slot = unsafe { &mut *r.slots[tail & r.mask].get() };
        slot.ingress = ingress;
        slot.len = frame.len() as u16;
        slot.data[..frame.len()].copy_from_slice(frame);
        r.tail.0.store(tail.wrapping_add(1), Ordering::Release);
        self.pushed += 1;
        true
    }

    /// After a batch of pushes: wakes the receiving worker if it sleeps.
    pub fn flush(&mut self) -> bool {
        if self.pushed == 0 {
            return false;
        }
        self.pushed = 0;
        self.bell.ring_if_sleeping()
    }
}

impl HandoffRx {
    /// Whether frames are waiting.
    pub fn is_empty(&self) -> bool {
        let r = &*self.ring;
        r.head.0.load(Ordering::Relaxed) == r.tail.0.load(Ordering::SeqCst)
    }

    /// Takes the oldest frame, if any: `f(ingress, bytes)` sees it before its slot is
    /// released.
    pub fn pop<R>(&mut self, f: impl FnOnce(IfaceId, &[u8]) -> R) -> Option<R> {
        let r = &*self.ring;
        let head = r.head.0.load(Ordering::Relaxed);
        let tail = r.tail.0.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        // SAFETY: the slot at `head` is inside [head, tail): the producer published it with
        // its release store of `tail` and does not touch it again until our release store
        // of `head` below; we are the only consumer.
        let slot = unsafe { &*r.slots[head & r.mask].get() };
        let out = f(slot.ingress, &slot.data[..slot.len as usize]);
        r.head.0.store(head.wrapping_add(1), Ordering::Release);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_arrive_in_order_and_a_full_ring_refuses() {
        let bell = Arc::new(Doorbell::new().unwrap());
        let (mut tx, mut rx) = channel(4, Arc::clone(&bell));
        for i in 0..4u8 {
            assert!(tx.push(IfaceId(i), &[i; 60]));
        }
        assert!(!tx.push(IfaceId(9), &[9; 60]), "full");
        assert!(!tx.flush(), "nobody sleeps");
        for i in 0..4u8 {
            let got = rx.pop(|iface, b| (iface, b.to_vec())).unwrap();
            assert_eq!(got, (IfaceId(i), vec![i; 60]));
        }
        assert!(rx.pop(|_, _| ()).is_none());
        assert!(!tx.push(IfaceId(0), &[0; HANDOFF_FRAME_LEN + 1]));
        bell.arm();
        assert!(tx.push(IfaceId(1), &[1; 10]));
        assert!(tx.flush(), "a sleeping owner is woken");
        bell.disarm();
        assert!(!rx.is_empty());
    }

    #[test]
    fn two_threads_move_every_frame_once() {
        let bell = Arc::new(Doorbell::new().unwrap());
        let (mut tx, mut rx) = channel(64, bell);
        const N: u32 = 200_000;
        let t = std::thread::spawn(move || {
            let mut sent = 0u32;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while sent < N && std::time::Instant::now() < deadline {
                if tx.push(IfaceId(0), &sent.to_le_bytes()) {
                    sent += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
            sent
        });
        let mut next = 0u32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while next < N && std::time::Instant::now() < deadline {
            if let Some(v) = rx.pop(|_, b| u32::from_le_bytes(b.try_into().unwrap())) {
                assert_eq!(v, next);
                next += 1;
            }
        }
        assert_eq!(t.join().unwrap(), N);
        assert_eq!(next, N);
    }

    #[test]
    fn mesh_connects_every_ordered_pair() {
        let m = mesh(3, 8).unwrap();
        for (i, e) in m.iter().enumerate() {
            assert_eq!(e.from.len(), 2);
            assert!(e.to[i].is_none());
            assert_eq!(e.to.iter().flatten().count(), 2);
        }
    }
}
