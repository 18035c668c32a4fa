//! Flow identity: the 5-tuple as it appears on the wire, and the deterministic hash the
//! load balancer uses. No state lives here.

use core::net::IpAddr;

/// IP protocol numbers kxp load-balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum L4Proto {
    Tcp = 6,
    Udp = 17,
    Sctp = 132,
}

impl L4Proto {
    /// The protocol for an IP protocol number, if kxp handles it.
    pub fn from_ip_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            132 => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Lower-case name as Kubernetes and reports spell it ("tcp", "udp", "sctp").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// A transport 5-tuple exactly as seen in one packet (source first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: L4Proto,
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }

    /// Deterministic 64-bit hash of the tuple (same value on every run and every worker),
    /// used to pick a Maglev slot. Not used for hash tables, which have their own hasher.
    pub fn lb_hash(&self) -> u64 {
        lb_hash_folded(
            self.proto as u8,
            addr_fold(self.src),
            addr_fold(self.dst),
            self.sport,
            self.dport,
        )
    }
}

/// [`FlowKey::lb_hash`] of an IPv4 tuple given as `u32` addresses (the fast path's form).
#[inline]
pub fn lb_hash_v4(proto: u8, src: u32, dst: u32, sport: u16, dport: u16) -> u64 {
    lb_hash_folded(proto, u64::from(src), u64::from(dst), sport, dport)
}

#[inline]
fn lb_hash_folded(proto: u8, src: u64, dst: u64, sport: u16, dport: u16) -> u64 {
    let mut h = mix(0x9e37_79b9_7f4a_7c15 ^ proto as u64);
    h = mix(h ^ src);
    h = mix(h ^ dst);
    mix(h ^ ((sport as u64) << 16 | dport as u64))
}

/// Hash of a client address alone (ClientIP session affinity and tests).
pub fn addr_hash(addr: IpAddr) -> u64 {
    mix(0x2545_f491_4f6c_dd1d ^ addr_fold(addr))
}

fn addr_fold(addr: IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => u32::from_be_bytes(a.octets()) as u64,
        IpAddr::V6(a) => {
            let v = u128::from_be_bytes(a.octets());
            mix((v >> 64) as u64) ^ (v as u64)
        }
    }
}

/// splitmix64 finaliser: cheap, well distributed, no state.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_twice_is_identity_and_hash_is_stable() {
        let k = FlowKey {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            sport: 40000,
            dport: 80,
            proto: L4Proto::Tcp,
        };
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.lb_hash(), k.lb_hash());
        assert_ne!(k.lb_hash(), k.reversed().lb_hash());
        assert_eq!(
            k.lb_hash(),
            lb_hash_v4(6, 0x0a00_0001, 0x0a60_000a, 40000, 80),
            "the IPv4 form is the same hash"
        );
    }
}
