//! Binding AF_XDP sockets: a queue whose previous socket just closed is bound once the
//! kernel lets go of it, and a queue a live socket holds is refused after a bounded wait.
//!
//! Each test runs in a thread of its own in an anonymous network namespace (`unshare`),
//! with one veth pair: nothing is named, and nothing outlives the thread, whatever way
//! the test ends. Needs root.

#![cfg(feature = "afxdp")]

use std::num::NonZeroU32;
use std::process::Command;
use std::time::{Duration, Instant};

use kxp_dataplane::driver::afxdp::{bind_socket, BIND_BUSY_WAIT};
use xsk_rs::config::{BindFlags, Interface, LibxdpFlags, SocketConfig, UmemConfig};
use xsk_rs::Umem;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` on a thread moved into a new network namespace holding the veth pair
/// `xa`/`xb`, both up. The namespace goes away with the thread.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            for args in [
                "link add xa type veth peer name xb",
                "link set xa up",
                "link set xb up",
            ] {
                // A child forked from this thread starts in its namespace.
                let st = Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .expect("ip runs");
                assert!(st.success(), "ip {args}");
            }
            f()
        })
        .join()
        .expect("test thread")
    })
}

fn umem() -> Umem {
    let (umem, _frames) =
        Umem::new(UmemConfig::default(), NonZeroU32::new(4096).unwrap(), false).expect("UMEM");
    umem
}

fn sock_cfg() -> SocketConfig {
    SocketConfig::builder()
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP)
        .build()
}

fn skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("skipped {test}: needs root (network namespace, veth, AF_XDP)");
        return true;
    }
    false
}

/// Closing a socket and binding its queue again at once: the kernel answers EBUSY for
/// most such binds (135 of 200 here, measured with `Socket::new` alone) until its
/// deferred release of the old buffer pool has run. `bind_socket` waits that out: every
/// cycle binds.
#[test]
fn rebinding_a_queue_right_after_its_socket_closed_succeeds() {
    if skip("rebinding_a_queue_right_after_its_socket_closed_succeeds") {
        return;
    }
    in_fresh_netns(|| {
        let iface: Interface = "xa".parse().unwrap();
        let started = Instant::now();
        for cycle in 0..100 {
            let u = umem();
            // SAFETY: the program-load inhibit flag is set; one socket on the queue.
            let rings = unsafe { bind_socket(sock_cfg(), &u, &iface, 0) };
            let (tx, rx, fill_comp) =
                rings.unwrap_or_else(|e| panic!("cycle {cycle}: {e}: {:?}", source(&e)));
            assert!(
                fill_comp.is_some(),
                "the first socket of a UMEM gets its rings"
            );
            drop((tx, rx, fill_comp, u));
        }
        eprintln!("100 close-and-rebind cycles in {:?}", started.elapsed());
    });
}

/// A queue a live socket holds stays busy: the second bind gives up with EBUSY once
/// `BIND_BUSY_WAIT` is over, not sooner and not much later, and the first socket is
/// untouched.
#[test]
fn a_queue_held_by_a_live_socket_is_refused_after_the_wait() {
    if skip("a_queue_held_by_a_live_socket_is_refused_after_the_wait") {
        return;
    }
    in_fresh_netns(|| {
        let iface: Interface = "xa".parse().unwrap();
        let first = umem();
        // SAFETY: the program-load inhibit flag is set; one socket on the queue.
        let held = unsafe { bind_socket(sock_cfg(), &first, &iface, 0) }.expect("first bind");
        let second = umem();
        let started = Instant::now();
        // SAFETY: as above; the kernel refuses the second binding of the queue.
        let refused = unsafe { bind_socket(sock_cfg(), &second, &iface, 0) };
        let waited = started.elapsed();
        let Err(err) = refused else {
            panic!("a held queue was bound twice")
        };
        let os = source(&err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error);
        assert_eq!(os, Some(libc::EBUSY), "{err}");
        assert!(
            waited >= BIND_BUSY_WAIT - Duration::from_millis(250),
            "gave up after {waited:?}"
        );
        assert!(
            waited <= BIND_BUSY_WAIT + Duration::from_secs(2),
            "waited {waited:?}"
        );
        // The holder still works: its statistics are readable and its rings are there.
        assert!(held.1.fd().xdp_statistics().is_ok());
        // A free queue (the peer's) binds at once, sharing the first UMEM.
        let peer: Interface = "xb".parse().unwrap();
        // SAFETY: as above; a different device.
        let other = unsafe { bind_socket(sock_cfg(), &first, &peer, 0) };
        assert!(other.is_ok(), "a free queue binds at once");
    });
}

fn source(e: &dyn std::error::Error) -> Option<&(dyn std::error::Error + 'static)> {
    e.source()
}
