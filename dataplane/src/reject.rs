//! ICMP errors kxp answers frames with, written into a caller-owned scratch buffer (no
//! allocation):
//!
//! * destination unreachable / port unreachable (ICMPv6 type 1 code 4), which is what
//!   kube-proxy's REJECT rules send for a service with no endpoints or a ClusterIP on an
//!   unknown port ([`port_unreachable`], from the address the frame was sent to);
//! * time exceeded in transit (ICMPv6 type 3 code 0), which the kernel's forwarding path
//!   sends when a TTL or hop limit would expire on the node ([`time_exceeded`], from a
//!   node address).

use crate::checksum;
use crate::wire::{addr_bytes, eth, proto, FrameMut};

/// A scratch buffer of this many bytes always fits a reject.
pub const REJECT_SCRATCH_LEN: usize = 1536;
/// IPv4 errors quote at most this much so that the answer fits in 576 bytes (RFC 1812).
const IPV4_QUOTE_MAX: usize = 576 - 20 - 8;
/// IPv6 errors fit the minimum MTU (RFC 4443 §2.4 (c)).
const IPV6_QUOTE_MAX: usize = 1280 - 40 - 8;

/// Writes a port-unreachable answer to `frame` into `out`, from the address the frame was
/// sent to, back to its sender, out of the interface whose MAC is `our_mac`. Returns the
/// answer's length, or `None` if `out` is too small or the sender is not a single host
/// (no ICMP error may go to it: RFC 1122 §3.2.2, RFC 1812 §4.3.2.7).
pub fn port_unreachable(frame: &FrameMut<'_>, our_mac: [u8; 6], out: &mut [u8]) -> Option<usize> {
    icmp_error(
        frame,
        our_mac,
        frame.dst_addr(),
        IcmpError::PortUnreachable,
        out,
    )
}

/// Writes a time-exceeded-in-transit answer to `frame` into `out`, from `from` (a node
/// address of the frame's family) back to its sender; as [`port_unreachable`] otherwise.
pub fn time_exceeded(
    frame: &FrameMut<'_>,
    our_mac: [u8; 6],
    from: core::net::IpAddr,
    out: &mut [u8],
) -> Option<usize> {
    if from.is_ipv4() != frame.layout.is_ipv4() {
        return None;
    }
    icmp_error(frame, our_mac, from, IcmpError::TimeExceeded, out)
}

#[derive(Debug, Clone, Copy)]
enum IcmpError {
    PortUnreachable,
    TimeExceeded,
}

impl IcmpError {
    /// (type, code) for ICMPv4 and for ICMPv6.
    fn type_code(self, v4: bool) -> (u8, u8) {
        match (self, v4) {
            (Self::PortUnreachable, true) => (3, 3),
            (Self::PortUnreachable, false) => (1, 4),
            (Self::TimeExceeded, true) => (11, 0),
            (Self::TimeExceeded, false) => (3, 0),
        }
    }
}

fn icmp_error(
    frame: &FrameMut<'_>,
    our_mac: [u8; 6],
    src: core::net::IpAddr,
    kind: IcmpError,
    out: &mut [u8],
) -> Option<usize> {
    if !is_single_host(&frame.src_addr()) {
        return None;
    }
    let l = frame.layout;
    let buf = &*frame.buf;
    let l2 = l.l3;
    let original = &buf[l.l3..l.end];
    let (ip_len, quote_max) = if l.is_ipv4() {
        (20, IPV4_QUOTE_MAX)
    } else {
        (40, IPV6_QUOTE_MAX)
    };
    let quote = &original[..original.len().min(quote_max)];
    let icmp_len = 8 + quote.len();
    let total = l2 + ip_len + icmp_len;
    if out.len() < total {
        return None;
    }
    // Ethernet (and the VLAN tag, if any): back to the sender.
    out[eth::DST].copy_from_slice(&buf[eth::SRC]);
    out[eth::SRC].copy_from_slice(&our_mac);
    out[12..l2].copy_from_slice(&buf[12..l2]);
    let dst = frame.src_addr();
    let (icmp_type, icmp_code) = kind.type_code(l.is_ipv4());
    let (sa, da) = (addr_bytes(&src), addr_bytes(&dst));
    let ip = l2;
    let icmp = ip + ip_len;
    if l.is_ipv4() {
        let h = &mut out[ip..icmp];
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&((ip_len + icmp_len) as u16).to_be_bytes());
        h[4..8].fill(0);
        h[8] = 64;
        h[9] = proto::ICMP;
        h[10..12].fill(0);
        h[12..16].copy_from_slice(sa.as_slice());
        h[16..20].copy_from_slice(da.as_slice());
        let c = checksum::checksum(0, h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        let h = &mut out[ip..icmp];
        h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        h[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
        h[6] = proto::ICMPV6;
        h[7] = 64;
        h[8..24].copy_from_slice(sa.as_slice());
        h[24..40].copy_from_slice(da.as_slice());
    }
    out[icmp] = icmp_type;
    out[icmp + 1] = icmp_code;
    out[icmp + 2..icmp + 8].fill(0);
    out[icmp + 8..icmp + 8 + quote.len()].copy_from_slice(quote);
    let pseudo = if l.is_ipv4() {
        0
    } else {
        checksum::pseudo_header_sum(sa.as_slice(), da.as_slice(), proto::ICMPV6, icmp_len as u32)
    };
    let c = checksum::checksum(pseudo, &out[icmp..icmp + icmp_len]);
    out[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// Whether `addr` names one host: not unspecified, loopback, multicast, limited broadcast or
/// (IPv4) class E.
fn is_single_host(addr: &core::net::IpAddr) -> bool {
    match addr {
        core::net::IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.octets()[0] >= 240)
        }
        core::net::IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
    }
}
