//! Validation and classification of a raw frame: Ethernet (and one 802.1Q tag) -> IPv4 /
//! IPv6 (IPv4: version, IHL, lengths, header checksum and fragments checked here;
//! etherparse walks IPv6 extension headers and an IPv4 authentication header) ->
//! TCP/UDP/SCTP ports, or an ICMP/ICMPv6 error and the packet it quotes.
//!
//! The output's offsets are in bounds for the frame, so the rewrite code in [`crate::wire`]
//! never re-checks them. Nothing here allocates or panics, whatever the bytes.

use core::net::IpAddr;

use etherparse::{Ipv4Slice, Ipv6Slice};

use crate::flow::{FlowKey, L4Proto};
use crate::verdict::DropReason;
use crate::wire::{eth, ipv4, ipv6, proto, read_addr, Layout};

/// A frame, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP (ARP, LLDP, ...).
    NotIp,
    /// More than one VLAN tag; not looked into.
    StackedVlan,
    /// A TCP, UDP or SCTP packet with its 5-tuple.
    Transport {
        layout: Layout,
        key: FlowKey,
        /// TCP flag byte; 0 for UDP and SCTP.
        tcp_flags: u8,
    },
    /// An ICMP or ICMPv6 error quoting a TCP/UDP/SCTP packet.
    IcmpError { layout: Layout, inner: Quoted },
    /// A fragment (no transport header to classify by).
    Fragment { src: IpAddr, dst: IpAddr },
    /// Any other IP packet (ICMP echo, errors quoting other protocols, GRE, ...).
    OtherIp {
        layout: Layout,
        src: IpAddr,
        dst: IpAddr,
    },
}

/// The packet quoted inside an ICMP error (possibly cut short after 8 transport bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// Layout of the quoted packet within the same buffer; `end` is where the quote ends.
    pub layout: Layout,
    /// Its 5-tuple as written (source first).
    pub key: FlowKey,
}

/// Classifies `frame`. `Err` carries the reason for a malformed frame.
pub fn parse(frame: &[u8]) -> Result<Parsed, DropReason> {
    if frame.len() < eth::HEADER_LEN {
        return Err(DropReason::Truncated);
    }
    let mut l3 = eth::HEADER_LEN;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == eth::TYPE_VLAN || ethertype == eth::TYPE_QINQ {
        if frame.len() < eth::HEADER_LEN + eth::VLAN_TAG_LEN {
            return Err(DropReason::Truncated);
        }
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 += eth::VLAN_TAG_LEN;
        if ethertype == eth::TYPE_VLAN || ethertype == eth::TYPE_QINQ {
            return Ok(Parsed::StackedVlan);
        }
    }
    let ip = &frame[l3..];
    let (layout, fragmented, src, dst) = match ethertype {
        eth::TYPE_IPV4 => parse_ipv4(ip, l3)?,
        eth::TYPE_IPV6 => parse_ipv6(ip, l3)?,
        _ => return Ok(Parsed::NotIp),
    };
    if fragmented {
        return Ok(Parsed::Fragment { src, dst });
    }
    let l4 = &frame[layout.l4..layout.end];
    match layout.proto {
        proto::TCP | proto::UDP | proto::SCTP => {
            let (sport, dport, tcp_flags) = parse_ports(layout.proto, l4)?;
            let key = FlowKey {
                src,
                dst,
                sport,
                dport,
                proto: L4Proto::from_ip_number(layout.proto).unwrap_or(L4Proto::Tcp),
            };
            Ok(Parsed::Transport {
                layout,
                key,
                tcp_flags,
            })
        }
        proto::ICMP | proto::ICMPV6 => match parse_icmp_error(frame, &layout) {
            Some(inner) => Ok(Parsed::IcmpError { layout, inner }),
            None => Ok(Parsed::OtherIp { layout, src, dst }),
        },
        _ => Ok(Parsed::OtherIp { layout, src, dst }),
    }
}

/// The 5-tuple [`parse`] would most likely find in `frame`, read without validating
/// anything (lengths, checksums, IHL sanity): a cheap guess for prefetching the flow's
/// conntrack state ahead of [`parse`], never a substitute for it. `None` for anything but
/// TCP, UDP or SCTP directly behind IPv4 (not a fragment) or IPv6, with at most one VLAN
/// tag. Never panics.
#[inline]
pub fn peek_key(frame: &[u8]) -> Option<FlowKey> {
    let mut l3 = eth::HEADER_LEN;
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype == eth::TYPE_VLAN || ethertype == eth::TYPE_QINQ {
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        l3 += eth::VLAN_TAG_LEN;
    }
    let ip = frame.get(l3..)?;
    let (l4, p, src, dst) = match ethertype {
        eth::TYPE_IPV4 => {
            let h = ip.get(..ipv4::MIN_HEADER_LEN)?;
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return None;
            }
            let a = |r: core::ops::Range<usize>| {
                IpAddr::V4(core::net::Ipv4Addr::new(
                    h[r.start],
                    h[r.start + 1],
                    h[r.start + 2],
                    h[r.start + 3],
                ))
            };
            (
                usize::from(h[0] & 0x0f) * 4,
                h[ipv4::PROTO],
                a(ipv4::SRC),
                a(ipv4::DST),
            )
        }
        eth::TYPE_IPV6 => {
            let h = ip.get(..ipv6::HEADER_LEN)?;
            (
                ipv6::HEADER_LEN,
                h[ipv6::NEXT_HEADER],
                read_addr(h, ipv6::SRC),
                read_addr(h, ipv6::DST),
            )
        }
        _ => return None,
    };
    let proto = L4Proto::from_ip_number(p)?;
    let ports = ip.get(l4..l4 + 4)?;
    Some(FlowKey {
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
    })
}

fn parse_ipv4(ip: &[u8], l3: usize) -> Result<(Layout, bool, IpAddr, IpAddr), DropReason> {
    if ip.len() < ipv4::MIN_HEADER_LEN {
        return Err(DropReason::Truncated);
    }
    if ip[0] >> 4 != 4 {
        return Err(DropReason::BadIpVersion);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ihl < ipv4::MIN_HEADER_LEN {
        return Err(DropReason::BadIhl);
    }
    if ihl > ip.len() {
        return Err(DropReason::Truncated);
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total < ihl || total > ip.len() {
        return Err(DropReason::BadIpLength);
    }
    // The checks above leave etherparse nothing to object to in the header itself; only
    // an IPsec authentication header behind it (which etherparse parses, and whose next
    // header becomes the protocol) needs it.
    let (ip_number, fragmented) = if ip[ipv4::PROTO] == IP_AUTH_HEADER {
        let slice = Ipv4Slice::from_slice(&ip[..total]).map_err(|e| {
            use etherparse::err::ipv4::SliceError as E;
            match e {
                E::Len(_) => DropReason::BadIpLength,
                E::Header(_) => DropReason::BadIhl,
                E::Exts(_) => DropReason::BadIhl,
            }
        })?;
        let payload = slice.payload();
        (payload.ip_number.0, payload.fragmented)
    } else {
        // More fragments, or a fragment offset.
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        (ip[ipv4::PROTO], frag & 0x3fff != 0)
    };
    if !crate::checksum::header_checksum_ok(&ip[..ihl]) {
        return Err(DropReason::BadIpChecksum);
    }
    let layout = Layout {
        l3,
        l4: l3 + ihl,
        end: l3 + total,
        ip_version: 4,
        proto: ip_number,
    };
    let src = read_addr(ip, ipv4::SRC);
    let dst = read_addr(ip, ipv4::DST);
    Ok((layout, fragmented, src, dst))
}

/// IP protocol number of the IPsec authentication header (RFC 4302).
const IP_AUTH_HEADER: u8 = 51;

fn parse_ipv6(ip: &[u8], l3: usize) -> Result<(Layout, bool, IpAddr, IpAddr), DropReason> {
    if ip.len() < ipv6::HEADER_LEN {
        return Err(DropReason::Truncated);
    }
    if ip[0] >> 4 != 6 {
        return Err(DropReason::BadIpVersion);
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let total = ipv6::HEADER_LEN + payload_len;
    if total > ip.len() {
        return Err(DropReason::BadIpLength);
    }
    let slice = Ipv6Slice::from_slice(&ip[..total]).map_err(|e| {
        use etherparse::err::ipv6::SliceError as E;
        match e {
            E::Len(_) => DropReason::BadIpLength,
            E::Header(_) => DropReason::BadIpVersion,
            E::Exts(_) => DropReason::BadIpv6Extension,
        }
    })?;
    let payload = slice.payload();
    let l4_off = total - payload.payload.len();
    let layout = Layout {
        l3,
        l4: l3 + l4_off,
        end: l3 + total,
        ip_version: 6,
        proto: payload.ip_number.0,
    };
    let src = read_addr(ip, ipv6::SRC);
    let dst = read_addr(ip, ipv6::DST);
    Ok((layout, payload.fragmented, src, dst))
}

/// Ports and TCP flags, with the transport header's own length checks.
fn parse_ports(p: u8, l4: &[u8]) -> Result<(u16, u16, u8), DropReason> {
    let min = match p {
        proto::TCP => 20,
        proto::UDP => 8,
        _ => 12, // SCTP common header
    };
    if l4.len() < min {
        return Err(DropReason::Truncated);
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let mut flags = 0;
    match p {
        proto::TCP => {
            let data_offset = (l4[12] >> 4) as usize * 4;
            if data_offset < 20 || data_offset > l4.len() {
                return Err(DropReason::BadL4Header);
            }
            flags = l4[13];
        }
        proto::UDP => {
            let len = u16::from_be_bytes([l4[4], l4[5]]) as usize;
            if len < 8 || len > l4.len() {
                return Err(DropReason::BadL4Header);
            }
        }
        _ => {}
    }
    Ok((sport, dport, flags))
}

/// An ICMP(v6) error and the TCP/UDP/SCTP packet it quotes, if that is what this is.
fn parse_icmp_error(frame: &[u8], layout: &Layout) -> Option<Quoted> {
    let icmp = &frame[layout.l4..layout.end];
    if icmp.len() < 8 {
        return None;
    }
    let is_error = if layout.is_ipv4() {
        // destination unreachable, source quench, redirect, time exceeded, parameter problem
        matches!(icmp[0], 3 | 4 | 5 | 11 | 12)
    } else {
        // destination unreachable, packet too big, time exceeded, parameter problem
        matches!(icmp[0], 1..=4)
    };
    if !is_error {
        return None;
    }
    let q3 = layout.l4 + 8;
    let q = &frame[q3..layout.end];
    let (q4, version, p, src, dst) = if layout.is_ipv4() {
        if q.len() < ipv4::MIN_HEADER_LEN || q[0] >> 4 != 4 {
            return None;
        }
        let ihl = (q[0] & 0x0f) as usize * 4;
        if ihl < ipv4::MIN_HEADER_LEN || q.len() < ihl {
            return None;
        }
        // A quoted non-first fragment has no transport header.
        if u16::from_be_bytes([q[6], q[7]]) & 0x1fff != 0 {
            return None;
        }
        (
            q3 + ihl,
            4,
            q[ipv4::PROTO],
            read_addr(q, ipv4::SRC),
            read_addr(q, ipv4::DST),
        )
    } else {
        if q.len() < ipv6::HEADER_LEN || q[0] >> 4 != 6 {
            return None;
        }
        // Quoted extension headers are not followed; transports directly behind only.
        (
            q3 + ipv6::HEADER_LEN,
            6,
            q[ipv6::NEXT_HEADER],
            read_addr(q, ipv6::SRC),
            read_addr(q, ipv6::DST),
        )
    };
    let proto = L4Proto::from_ip_number(p)?;
    // RFC 792 guarantees the first 8 transport bytes: both ports.
    if layout.end < q4 + 8 {
        return None;
    }
    let l4 = &frame[q4..];
    Some(Quoted {
        layout: Layout {
            l3: q3,
            l4: q4,
            end: layout.end,
            ip_version: version,
            proto: p,
        },
        key: FlowKey {
            src,
            dst,
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            proto,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    proptest! {
        /// On frames `parse` takes as transport, `peek_key` guesses the same tuple; on any
        /// bytes it does not panic.
        #[test]
        fn peek_key_agrees_with_parse(
            v6 in any::<bool>(),
            vlan in any::<bool>(),
            kind in 0..3u8,
            a in any::<[u8; 16]>(),
            b in any::<[u8; 16]>(),
            ports in any::<(u16, u16)>(),
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            noise in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        ) {
            let base = PacketBuilder::ethernet2([1; 6], [2; 6]);
            let ip = if v6 {
                base.ipv6(a, b, 64)
            } else {
                base.ipv4([a[0], a[1], a[2], a[3]], [b[0], b[1], b[2], b[3]], 64)
            };
            let mut frame = Vec::new();
            match kind {
                0 => ip.tcp(ports.0, ports.1, 1, 100).write(&mut frame, &payload).unwrap(),
                1 => ip.udp(ports.0, ports.1).write(&mut frame, &payload).unwrap(),
                _ => ip.icmpv4_echo_request(1, 2).write(&mut frame, &payload).unwrap(),
            }
            if vlan {
                frame.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
            }
            match parse(&frame) {
                Ok(Parsed::Transport { key, .. }) => prop_assert_eq!(peek_key(&frame), Some(key)),
                _ => prop_assert!(kind == 2),
            }
            for (at, byte) in noise {
                let n = frame.len();
                frame[at % n] = byte;
                let _ = peek_key(&frame);
                let _ = peek_key(&frame[..at % n]);
            }
        }
    }
}
