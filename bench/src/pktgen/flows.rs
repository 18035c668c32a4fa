//! The generator's flow sequence: packet `i` goes from (source address, source port) to a
//! frontend, chosen by an odometer over (frontend, source host, source port), frontend
//! fastest. Distinct positions are distinct 5-tuples, so with `--new-flows` no tuple
//! repeats until the odometer wraps after [`FlowSpace::tuples`] packets (reported); with
//! `--flows N` the odometer restarts every `N` packets. Advancing costs a few compares
//! per packet, no division.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// First source port; ports run from here to 65535.
pub const FIRST_SPORT: u16 = 1024;
/// Source ports per host.
pub const SPORTS: u64 = 65536 - FIRST_SPORT as u64;
/// Most source hosts used from one network (an IPv6 /64 has far more).
pub const MAX_HOSTS: u64 = 1 << 32;

/// Source addresses drawn from a network: hosts `0..hosts` are `first + k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSpace {
    first: u128,
    v6: bool,
    hosts: u64,
    frontends: usize,
}

impl FlowSpace {
    /// `net`'s usable hosts (IPv4: without network and broadcast addresses below /31;
    /// IPv6: from network + 1), capped at [`MAX_HOSTS`].
    pub fn new(net: IpNet, frontends: usize) -> Self {
        let frontends = frontends.max(1);
        match net {
            IpNet::V4(n) => {
                let base = u32::from(n.network()) as u128;
                let (first, hosts) = match n.prefix_len() {
                    32 => (base, 1),
                    31 => (base, 2),
                    p => (base + 1, (1u64 << (32 - p)) - 2),
                };
                Self {
                    first,
                    v6: false,
                    hosts,
                    frontends,
                }
            }
            IpNet::V6(n) => {
                let base = u128::from(n.network());
                let span = 128 - n.prefix_len() as u32;
                let (first, hosts) = if span == 0 {
                    (base, 1)
                } else if span >= 33 {
                    (base + 1, MAX_HOSTS)
                } else {
                    (base + 1, (1u64 << span) - 1)
                };
                Self {
                    first,
                    v6: true,
                    hosts,
                    frontends,
                }
            }
        }
    }

    pub fn is_v6(&self) -> bool {
        self.v6
    }

    pub fn hosts(&self) -> u64 {
        self.hosts
    }

    /// Distinct 5-tuples before the odometer wraps.
    pub fn tuples(&self) -> u128 {
        self.frontends as u128 * self.hosts as u128 * SPORTS as u128
    }

    /// Source host `h` as an address.
    pub fn host(&self, h: u64) -> IpAddr {
        let a = self.first + h as u128;
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(a))
        } else {
            IpAddr::V4(Ipv4Addr::from(a as u32))
        }
    }
}

/// The odometer. [`Odometer::next`] gives the current (frontend, source bytes, source
/// port) and advances.
#[derive(Debug, Clone)]
pub struct Odometer {
    space: FlowSpace,
    /// Restart after this many packets (`--flows N`); 0: never (`--new-flows`).
    cycle: u64,
    frontend: usize,
    host: u64,
    port: u64,
    in_cycle: u64,
    /// Source address bytes of `host` (4 or 16 used).
    src: [u8; 16],
    /// Times the whole tuple space was used up (`--new-flows` only).
    pub wraps: u64,
}

impl Odometer {
    pub fn new(space: FlowSpace, cycle: u64) -> Self {
        let mut o = Self {
            space,
            cycle,
            frontend: 0,
            host: 0,
            port: 0,
            in_cycle: 0,
            src: [0; 16],
            wraps: 0,
        };
        o.set_src();
        o
    }

    fn set_src(&mut self) {
        match self.space.host(self.host) {
            IpAddr::V4(a) => self.src[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => self.src = a.octets(),
        }
    }

    fn restart(&mut self) {
        self.frontend = 0;
        self.host = 0;
        self.port = 0;
        self.in_cycle = 0;
        self.set_src();
    }

    /// Calls `f(frontend, source address bytes, source port)` for the current packet,
    /// then advances.
    #[inline]
    pub fn next<R>(&mut self, f: impl FnOnce(usize, &[u8], u16) -> R) -> R {
        let len = if self.space.v6 { 16 } else { 4 };
        let r = f(
            self.frontend,
            &self.src[..len],
            FIRST_SPORT + self.port as u16,
        );
        self.in_cycle += 1;
        if self.cycle != 0 && self.in_cycle == self.cycle {
            self.restart();
            return r;
        }
        self.frontend += 1;
        if self.frontend == self.space.frontends {
            self.frontend = 0;
            self.host += 1;
            if self.host == self.space.hosts {
                self.host = 0;
                self.port += 1;
                if self.port == SPORTS {
                    self.port = 0;
                    self.wraps += 1;
                }
            }
            self.set_src();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn collect(o: &mut Odometer, n: usize) -> Vec<(usize, IpAddr, u16)> {
        (0..n)
            .map(|_| {
                o.next(|f, s, p| {
                    let a = if s.len() == 4 {
                        IpAddr::from(<[u8; 4]>::try_from(s).unwrap())
                    } else {
                        IpAddr::from(<[u8; 16]>::try_from(s).unwrap())
                    };
                    (f, a, p)
                })
            })
            .collect()
    }

    #[test]
    fn hosts_per_prefix() {
        let s = |n: &str| FlowSpace::new(n.parse().unwrap(), 1);
        assert_eq!(s("10.0.0.0/24").hosts(), 254);
        assert_eq!(
            s("10.0.0.0/24").host(0),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(s("10.0.0.7/32").hosts(), 1);
        assert_eq!(s("10.0.0.6/31").hosts(), 2);
        assert_eq!(s("fd00::/64").hosts(), MAX_HOSTS);
        assert_eq!(s("fd00::/120").hosts(), 255);
        assert_eq!(s("fd00::/64").host(1), "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(s("10.0.0.0/24").tuples(), 254 * 64512);
    }

    #[test]
    fn new_flows_never_repeat_and_cover_frontends_first() {
        let space = FlowSpace::new("10.1.0.0/30".parse().unwrap(), 3);
        let mut o = Odometer::new(space, 0);
        let n = space.tuples() as usize;
        let all = collect(&mut o, n);
        assert_eq!(all[..3].iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(
            all.iter().collect::<HashSet<_>>().len(),
            n,
            "a tuple repeated"
        );
        assert_eq!(o.wraps, 1);
        assert_eq!(collect(&mut o, 1)[0], all[0]);
    }

    #[test]
    fn fixed_flows_cycle() {
        let space = FlowSpace::new("fd00:1::/64".parse().unwrap(), 4);
        let mut o = Odometer::new(space, 10);
        let a = collect(&mut o, 10);
        let b = collect(&mut o, 10);
        assert_eq!(a, b);
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 10);
        assert_eq!(a[4].1, "fd00:1::2".parse::<IpAddr>().unwrap());
        assert_eq!(o.wraps, 0);
    }
}
