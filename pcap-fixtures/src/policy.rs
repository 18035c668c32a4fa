//! The few *policy* rules a fixture must know to write down an expected frame, stated here
//! once, each with where kxp defines it. These are choices (which port, which backend),
//! not packet mechanics: the frames themselves are built in [`crate::packet`].
//!
//! * Masquerade source port: `dataplane/src/pipeline.rs` `allocate_snat_port` for worker 0
//!   of 1 with the default range 32768..=60999: the first port probed is
//!   `32768 + (lb_hash(original tuple) >> 20) % 28232`; a port whose reply tuple (backend,
//!   masquerade address, backend port, port, protocol) is already taken is skipped for the
//!   next one. The hash is [`kxp_dataplane::flow::FlowKey::lb_hash`].
//! * Backend choice among several endpoints: the Maglev table kxp-control builds
//!   (`control/src/compile.rs`): endpoints sorted by (address, port), every one of weight
//!   1, Maglev ids from `backend_id` (copied below as [`backend_id`]; the golden test
//!   checks the copy against `kxp_control::compile::backend_id`), built with the public
//!   [`kxp_dataplane::maglev::MaglevTable::build`] and the default
//!   [`kxp_dataplane::maglev::MaglevConfig`], looked up with the flow's `lb_hash`.

use core::net::IpAddr;
use std::collections::HashSet;

use kxp_dataplane::flow::{mix, FlowKey, L4Proto};
use kxp_dataplane::maglev::{MaglevBackend, MaglevConfig, MaglevTable};

/// Masquerade ports of worker 0 of 1 (kxp's `WorkerConfig::default`).
pub const SNAT_PORTS: (u16, u16) = (32768, 60999);

/// A transport protocol number for [`FlowKey`].
pub fn l4proto(p: u8) -> L4Proto {
    L4Proto::from_ip_number(p).expect("TCP, UDP or SCTP")
}

/// The flow key of a packet as it arrives (source first).
pub fn key(src: (IpAddr, u16), dst: (IpAddr, u16), proto: L4Proto) -> FlowKey {
    FlowKey {
        src: src.0,
        dst: dst.0,
        sport: src.1,
        dport: dst.1,
        proto,
    }
}

/// The first masquerade port kxp tries for the flow `original`.
pub fn first_probe(original: &FlowKey) -> u16 {
    let (lo, hi) = SNAT_PORTS;
    let span = (hi - lo) as u64 + 1;
    lo + ((original.lb_hash() >> 20) % span) as u16
}

/// The masquerade ports a scenario has handed out so far, per reply tuple, so that a
/// second flow to the same backend never gets a port whose reply tuple is taken.
#[derive(Debug, Default)]
pub struct SnatAllocator {
    taken: HashSet<FlowKey>,
}

impl SnatAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The masquerade port for the flow `original` (as the client sent it), masqueraded to
    /// `addr` towards `backend`.
    pub fn allocate(&mut self, original: &FlowKey, addr: IpAddr, backend: (IpAddr, u16)) -> u16 {
        let (lo, hi) = SNAT_PORTS;
        let span = (hi - lo) as u64 + 1;
        let start = (original.lb_hash() >> 20) % span;
        for i in 0..64u64.min(span) {
            let port = lo + ((start + i) % span) as u16;
            let reply = FlowKey {
                src: backend.0,
                dst: addr,
                sport: backend.1,
                dport: port,
                proto: original.proto,
            };
            if self.taken.insert(reply) {
                return port;
            }
        }
        panic!("fixture bug: 64 masquerade ports taken for one backend");
    }
}

/// kxp-control's Maglev identity of a backend (`control/src/compile.rs` `backend_id`).
pub fn backend_id(addr: IpAddr, port: u16) -> u64 {
    let (hi, lo) = match addr {
        IpAddr::V4(a) => (0x0000_0004_0000_0000, u64::from(u32::from(a))),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            ((v >> 64) as u64, v as u64)
        }
    };
    let h = mix(0x6b78_705f_6265_6b64 ^ hi);
    let h = mix(h ^ lo);
    mix(h ^ u64::from(port))
}

/// The endpoint (of `endpoints`, all ready, weight 1) kxp's Maglev table sends `flow` to.
pub fn maglev_pick(endpoints: &[(IpAddr, u16)], flow: &FlowKey) -> (IpAddr, u16) {
    let mut sorted = endpoints.to_vec();
    sorted.sort();
    let backends: Vec<MaglevBackend> = sorted
        .iter()
        .map(|(a, p)| MaglevBackend {
            id: backend_id(*a, *p),
            weight: 1,
        })
        .collect();
    let table = MaglevTable::build(&backends, &MaglevConfig::default());
    let i = table.lookup(flow.lb_hash()).expect("non-empty table");
    sorted[i as usize]
}
