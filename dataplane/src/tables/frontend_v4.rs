//! The IPv4 frontends of a [`ServiceTable`](super::ServiceTable) again, in a flat
//! open-addressing array the fast path can prefetch: a frontend's slot address is known
//! from its hash before the slot is read, so `Worker::process_batch` can start loading
//! the slots of a whole batch of new flows at once (hashbrown keeps its bucket addresses
//! to itself). The table's `HashMap` stays the authority; this mirrors its IPv4 entries,
//! kept in step by the table's mutators and checked against it by the tests below.
//!
//! Linear probing over a power-of-two array at most half full, deletion by backward
//! shift (no tombstones, so probe lengths never degrade).

use super::{Frontend, FrontendKey};
use crate::flow::mix;
use core::net::IpAddr;

/// One slot: 16 bytes, four to a cache line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    addr: u32,
    port: u16,
    proto: u8,
    used: bool,
    frontend: Frontend,
}

const EMPTY: Slot = Slot {
    addr: 0,
    port: 0,
    proto: 0,
    used: false,
    frontend: Frontend {
        kind: super::FrontendKind::ClusterIp,
        service_port: super::ServicePortId(0),
    },
};

const MIN_SLOTS: usize = 16;

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub(crate) struct FrontendIndexV4 {
    slots: Vec<Slot>,
    len: usize,
}

/// The probe start of a frontend (`hash & mask`).
#[inline]
pub(crate) fn hash_v4(addr: u32, proto: u8, port: u16) -> u64 {
    mix(u64::from(addr) << 24 ^ u64::from(port) << 8 ^ u64::from(proto))
}

impl FrontendIndexV4 {
    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Address of the slot a lookup of `hash` reads first (for prefetching); `None` when
    /// the index is empty.
    #[inline]
    pub(crate) fn home_ptr(&self, hash: u64) -> Option<*const u8> {
        if self.slots.is_empty() {
            return None;
        }
        Some(
            self.slots
                .as_ptr()
                .wrapping_add(hash as usize & self.mask())
                .cast(),
        )
    }

    /// The frontend at (addr, proto, port); `hash` is [`hash_v4`] of them.
    #[inline]
    pub(crate) fn get(&self, hash: u64, addr: u32, proto: u8, port: u16) -> Option<Frontend> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        for _ in 0..self.slots.len() {
            let s = self.slots.get(i)?;
            if !s.used {
                return None;
            }
            if s.addr == addr && s.port == port && s.proto == proto {
                return Some(s.frontend);
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Mirrors an insert or replace of the table's map (other families are ignored).
    pub(crate) fn set(&mut self, key: &FrontendKey, frontend: Frontend) {
        let IpAddr::V4(a) = key.addr else {
            return;
        };
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let (addr, proto, port) = (u32::from(a), key.proto as u8, key.port);
        let mask = self.mask();
        let mut i = hash_v4(addr, proto, port) as usize & mask;
        loop {
            let s = &mut self.slots[i];
            if !s.used {
                *s = Slot {
                    addr,
                    port,
                    proto,
                    used: true,
                    frontend,
                };
                self.len += 1;
                return;
            }
            if s.addr == addr && s.port == port && s.proto == proto {
                s.frontend = frontend;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Mirrors a removal from the table's map.
    pub(crate) fn remove(&mut self, key: &FrontendKey) {
        let IpAddr::V4(a) = key.addr else {
            return;
        };
        if self.slots.is_empty() {
            return;
        }
        let (addr, proto, port) = (u32::from(a), key.proto as u8, key.port);
        let mask = self.mask();
        let mut i = hash_v4(addr, proto, port) as usize & mask;
        loop {
            let s = self.slots[i];
            if !s.used {
                return;
            }
            if s.addr == addr && s.port == port && s.proto == proto {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward shift: pull later members of the cluster into the hole when their
        // home is not after it (cyclically), so every probe still reaches its entry.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        loop {
            let s = self.slots[j];
            if !s.used {
                break;
            }
            let home = hash_v4(s.addr, s.proto, s.port) as usize & mask;
            let dist_home = j.wrapping_sub(home) & mask;
            let dist_hole = j.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                self.slots[hole] = s;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = core::mem::replace(&mut self.slots, vec![EMPTY; n]);
        self.len = 0;
        for s in old.into_iter().filter(|s| s.used) {
            let key = FrontendKey {
                addr: IpAddr::V4(s.addr.into()),
                proto: crate::flow::L4Proto::from_ip_number(s.proto)
                    .unwrap_or(crate::flow::L4Proto::Tcp),
                port: s.port,
            };
            self.set(&key, s.frontend);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::L4Proto;
    use crate::tables::{FrontendKind, ServicePortId};
    use hashbrown::HashMap;
    use proptest::prelude::*;

    fn key(a: u8, port: u8, tcp: bool) -> FrontendKey {
        FrontendKey {
            addr: IpAddr::V4([10, 96, 0, a].into()),
            proto: if tcp { L4Proto::Tcp } else { L4Proto::Udp },
            port: u16::from(port),
        }
    }

    proptest! {
        /// Random inserts, replaces and removes over a small key space (long clusters,
        /// wrap-around, growth): the index answers every key as a HashMap does.
        #[test]
        fn agrees_with_a_hash_map(ops in proptest::collection::vec(
            (any::<bool>(), 0..24u8, 0..3u8, any::<bool>(), 0..1000u32), 0..400)) {
            let mut idx = FrontendIndexV4::default();
            let mut map: HashMap<FrontendKey, Frontend> = HashMap::new();
            for (insert, a, port, tcp, sp) in ops {
                let k = key(a, port, tcp);
                if insert {
                    let f = Frontend { kind: FrontendKind::NodePort, service_port: ServicePortId(sp) };
                    idx.set(&k, f);
                    map.insert(k, f);
                } else {
                    idx.remove(&k);
                    map.remove(&k);
                }
                prop_assert_eq!(idx.len(), map.len());
                for a in 0..24u8 {
                    for port in 0..3u8 {
                        for tcp in [false, true] {
                            let k = key(a, port, tcp);
                            let IpAddr::V4(v4) = k.addr else { unreachable!() };
                            let (addr, proto) = (u32::from(v4), k.proto as u8);
                            let got = idx.get(hash_v4(addr, proto, k.port), addr, proto, k.port);
                            prop_assert_eq!(got, map.get(&k).copied());
                        }
                    }
                }
            }
        }
    }
}
