//! Frames built from scratch: a small declarative description of a packet (Ethernet, VLAN
//! tags, IPv4/IPv6, TCP/UDP/SCTP/ICMP) serialised with etherparse's header types, every
//! length and checksum computed in full (IPv4 header checksum, TCP/UDP/ICMPv6 with their
//! pseudo-headers, ICMPv4 over the whole message, SCTP's CRC32c by the bitwise algorithm
//! below).
//!
//! Nothing here calls kxp's rewrite, NAT or checksum code: the expected output of a
//! scenario is a second description of the packet as it must leave the node, serialised
//! the same independent way. That is what makes the golden comparison a proof rather than
//! a tautology.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpFragOffset, IpNumber, Ipv4Header,
    Ipv4Options, Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
};

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// TCP flag bits (RFC 9293 §3.1).
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// EtherTypes used by the fixtures.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88a8;
}

/// A 802.1Q / 802.1ad tag: tag protocol identifier and tag control information.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    pub tpid: u16,
    /// PCP (3 bits), DEI (1 bit), VID (12 bits).
    pub tci: u16,
}

impl VlanTag {
    /// An 802.1Q customer tag with this VLAN id.
    pub fn dot1q(vid: u16) -> Self {
        Self {
            tpid: ethertype::VLAN,
            tci: vid & 0x0fff,
        }
    }

    /// An 802.1ad service (outer) tag with this VLAN id.
    pub fn dot1ad(vid: u16) -> Self {
        Self {
            tpid: ethertype::QINQ,
            tci: vid & 0x0fff,
        }
    }
}

/// The IP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ip {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        id: u16,
        /// Don't Fragment.
        df: bool,
        /// More Fragments.
        mf: bool,
        /// Fragment offset in 8-byte units.
        frag_offset: u16,
        /// Options, a multiple of 4 bytes, at most 40.
        options: Vec<u8>,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        flow_label: u32,
        /// Extension headers in order: (header type, body after the next-header and
        /// length bytes; 6 + 8k bytes).
        exts: Vec<(u8, Vec<u8>)>,
    },
}

impl Ip {
    /// An IPv4 or IPv6 header between two addresses of the same family, TTL/hop limit
    /// `ttl`, IPv4 identification `id` with DF set (as Linux sends TCP and most UDP).
    pub fn new(src: IpAddr, dst: IpAddr, ttl: u8, id: u16) -> Self {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Ip::V4 {
                src,
                dst,
                ttl,
                id,
                df: true,
                mf: false,
                frag_offset: 0,
                options: Vec::new(),
            },
            (IpAddr::V6(src), IpAddr::V6(dst)) => Ip::V6 {
                src,
                dst,
                hop_limit: ttl,
                flow_label: 0,
                exts: Vec::new(),
            },
            _ => panic!("fixture bug: {src} and {dst} are of different families"),
        }
    }

    pub fn src(&self) -> IpAddr {
        match self {
            Ip::V4 { src, .. } => IpAddr::V4(*src),
            Ip::V6 { src, .. } => IpAddr::V6(*src),
        }
    }

    pub fn dst(&self) -> IpAddr {
        match self {
            Ip::V4 { dst, .. } => IpAddr::V4(*dst),
            Ip::V6 { dst, .. } => IpAddr::V6(*dst),
        }
    }

    pub fn ttl(&self) -> u8 {
        match self {
            Ip::V4 { ttl, .. } => *ttl,
            Ip::V6 { hop_limit, .. } => *hop_limit,
        }
    }

    pub fn is_v4(&self) -> bool {
        matches!(self, Ip::V4 { .. })
    }

    /// Sets source and destination (same family as before).
    pub fn set_addrs(&mut self, new_src: IpAddr, new_dst: IpAddr) {
        match (self, new_src, new_dst) {
            (Ip::V4 { src, dst, .. }, IpAddr::V4(s), IpAddr::V4(d)) => {
                *src = s;
                *dst = d;
            }
            (Ip::V6 { src, dst, .. }, IpAddr::V6(s), IpAddr::V6(d)) => {
                *src = s;
                *dst = d;
            }
            _ => panic!("fixture bug: address family change"),
        }
    }

    pub fn set_ttl(&mut self, v: u8) {
        match self {
            Ip::V4 { ttl, .. } => *ttl = v,
            Ip::V6 { hop_limit, .. } => *hop_limit = v,
        }
    }
}

/// A TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Flag byte: [`tcp`] constants or'ed.
    pub flags: u8,
    pub window: u16,
    /// Raw options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

/// The transport layer (or what stands in for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        /// Send checksum 0 ("none", allowed over IPv4 only, RFC 768).
        no_checksum: bool,
    },
    /// SCTP common header and raw chunks (RFC 9260 §3).
    Sctp {
        sport: u16,
        dport: u16,
        vtag: u32,
        chunks: Vec<u8>,
    },
    /// ICMPv4 message of this type, with this body (for errors: the quoted packet).
    Icmp4(Icmpv4Type, Vec<u8>),
    /// ICMPv6 message of this type, with this body.
    Icmp6(Icmpv6Type, Vec<u8>),
    /// Any other protocol, its payload verbatim (also used for fragments' payloads).
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

impl L4 {
    /// Source and destination port, for TCP, UDP and SCTP.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self {
            L4::Tcp(t) => Some((t.sport, t.dport)),
            L4::Udp { sport, dport, .. } | L4::Sctp { sport, dport, .. } => Some((*sport, *dport)),
            _ => None,
        }
    }

    /// Sets both ports (TCP, UDP, SCTP).
    pub fn set_ports(&mut self, s: u16, d: u16) {
        match self {
            L4::Tcp(t) => {
                t.sport = s;
                t.dport = d;
            }
            L4::Udp { sport, dport, .. } | L4::Sctp { sport, dport, .. } => {
                *sport = s;
                *dport = d;
            }
            _ => panic!("fixture bug: no ports on {self:?}"),
        }
    }

    /// The IP protocol number.
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp(_) => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Icmp4(..) => 1,
            L4::Icmp6(..) => 58,
            L4::Raw { proto, .. } => *proto,
        }
    }
}

/// A whole frame, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    /// Tags, outermost first.
    pub vlans: Vec<VlanTag>,
    pub ip: Ip,
    pub l4: L4,
    /// Ethernet padding: the frame is zero-padded to at least this many bytes (60 is the
    /// 802.3 minimum without FCS, what a capture on the receiving side shows; 0 = none).
    pub pad_to: usize,
}

impl Packet {
    /// The IP packet: header(s) and payload, all checksums computed.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut out = Vec::with_capacity(60 + l4.len());
        match &self.ip {
            Ip::V4 {
                src,
                dst,
                ttl,
                id,
                df,
                mf,
                frag_offset,
                options,
            } => {
                let mut h = Ipv4Header::new(
                    0,
                    *ttl,
                    IpNumber(self.l4.proto()),
                    src.octets(),
                    dst.octets(),
                )
                .expect("empty payload fits");
                h.identification = *id;
                h.dont_fragment = *df;
                h.more_fragments = *mf;
                h.fragment_offset = IpFragOffset::try_new(*frag_offset).expect("13-bit offset");
                h.options =
                    Ipv4Options::try_from(options.as_slice()).expect("valid options length");
                h.set_payload_len(l4.len()).expect("payload fits");
                // `write` computes the header checksum.
                h.write(&mut out).expect("write to Vec");
            }
            Ip::V6 {
                src,
                dst,
                hop_limit,
                flow_label,
                exts,
            } => {
                let mut chain = Vec::new();
                for (i, (_, body)) in exts.iter().enumerate() {
                    assert!(body.len() % 8 == 6, "fixture bug: extension header length");
                    let next = exts.get(i + 1).map_or(self.l4.proto(), |e| e.0);
                    chain.push(next);
                    chain.push(((body.len() + 2) / 8 - 1) as u8);
                    chain.extend_from_slice(body);
                }
                let mut h = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::try_new(*flow_label).expect("20-bit label"),
                    payload_length: 0,
                    next_header: IpNumber(exts.first().map_or(self.l4.proto(), |e| e.0)),
                    hop_limit: *hop_limit,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                h.set_payload_length(chain.len() + l4.len())
                    .expect("payload fits");
                h.write(&mut out).expect("write to Vec");
                out.extend_from_slice(&chain);
            }
        }
        out.extend_from_slice(&l4);
        out
    }

    /// The transport segment with its checksum computed over the pseudo-header of
    /// `self.ip` (a fragment's payload is written verbatim).
    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp(t) => {
                let mut h = TcpHeader::new(t.sport, t.dport, t.seq, t.window);
                h.acknowledgment_number = t.ack;
                h.fin = t.flags & tcp::FIN != 0;
                h.syn = t.flags & tcp::SYN != 0;
                h.rst = t.flags & tcp::RST != 0;
                h.psh = t.flags & tcp::PSH != 0;
                h.ack = t.flags & tcp::ACK != 0;
                h.set_options_raw(&t.options)
                    .expect("options of a valid length");
                h.checksum = match &self.ip {
                    Ip::V4 { src, dst, .. } => h
                        .calc_checksum_ipv4_raw(src.octets(), dst.octets(), &t.payload)
                        .expect("fits"),
                    Ip::V6 { src, dst, .. } => h
                        .calc_checksum_ipv6_raw(src.octets(), dst.octets(), &t.payload)
                        .expect("fits"),
                };
                h.write(&mut out).expect("write to Vec");
                out.extend_from_slice(&t.payload);
            }
            L4::Udp {
                sport,
                dport,
                payload,
                no_checksum,
            } => {
                let mut h = UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: (8 + payload.len()) as u16,
                    checksum: 0,
                };
                // Both compute the RFC 768 checksum and send 0 as 0xffff.
                h.checksum = match &self.ip {
                    Ip::V4 { .. } if *no_checksum => 0,
                    Ip::V4 { src, dst, .. } => h
                        .calc_checksum_ipv4_raw(src.octets(), dst.octets(), payload)
                        .expect("fits"),
                    Ip::V6 { src, dst, .. } => h
                        .calc_checksum_ipv6_raw(src.octets(), dst.octets(), payload)
                        .expect("fits"),
                };
                h.write(&mut out).expect("write to Vec");
                out.extend_from_slice(payload);
            }
            L4::Sctp {
                sport,
                dport,
                vtag,
                chunks,
            } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&vtag.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(chunks);
                let crc = crc32c_bitwise(&out);
                // RFC 9260 appendix A: the CRC goes on the wire least significant byte first.
                out[8..12].copy_from_slice(&crc.to_le_bytes());
            }
            L4::Icmp4(ty, body) => {
                let h = Icmpv4Header::with_checksum(ty.clone(), body);
                h.write(&mut out).expect("write to Vec");
                out.extend_from_slice(body);
            }
            L4::Icmp6(ty, body) => {
                let Ip::V6 { src, dst, .. } = &self.ip else {
                    panic!("fixture bug: ICMPv6 over IPv4");
                };
                let h = Icmpv6Header::with_checksum(*ty, src.octets(), dst.octets(), body)
                    .expect("fits");
                h.write(&mut out).expect("write to Vec");
                out.extend_from_slice(body);
            }
            L4::Raw { payload, .. } => out.extend_from_slice(payload),
        }
        out
    }

    /// The whole frame: Ethernet, tags, IP packet, padding.
    pub fn bytes(&self) -> Vec<u8> {
        let ethertype = if self.ip.is_v4() {
            ethertype::IPV4
        } else {
            ethertype::IPV6
        };
        let mut out = l2_header(self.eth_dst, self.eth_src, &self.vlans, ethertype);
        out.extend_from_slice(&self.ip_bytes());
        if out.len() < self.pad_to {
            out.resize(self.pad_to, 0);
        }
        out
    }
}

/// Ethernet header (destination, source), the tags, and the inner EtherType.
pub fn l2_header(dst: Mac, src: Mac, vlans: &[VlanTag], ethertype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 4 * vlans.len());
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    for v in vlans {
        out.extend_from_slice(&v.tpid.to_be_bytes());
        out.extend_from_slice(&v.tci.to_be_bytes());
    }
    out.extend_from_slice(&ethertype.to_be_bytes());
    out
}

/// An ARP request (RFC 826) for `target` from `sender` (MAC `src`), broadcast, padded to 60.
pub fn arp_request(src: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = l2_header([0xff; 6], src, &[], ethertype::ARP);
    out.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&sender.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out.resize(60, 0);
    out
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: deliberately not the
/// table-driven code kxp uses, so that the two check each other.
pub fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb != 0 {
                crc ^= 0x82f6_3b78;
            }
        }
    }
    !crc
}

/// RFC 1071 Internet checksum of `data` (for the fixtures' own sanity checks).
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // RFC 3720 B.4.
        assert_eq!(crc32c_bitwise(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c_bitwise(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = Packet {
            eth_src: [2, 0, 0, 0, 0, 1],
            eth_dst: [2, 0, 0, 0, 0, 2],
            vlans: vec![],
            ip: Ip::new(
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                64,
                7,
            ),
            l4: L4::Udp {
                sport: 1,
                dport: 2,
                payload: b"x".to_vec(),
                no_checksum: false,
            },
            pad_to: 60,
        };
        let b = p.bytes();
        assert_eq!(b.len(), 60);
        assert_eq!(internet_checksum(&b[14..34]), 0);
        // UDP checksum over the pseudo-header verifies too.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&b[26..34]);
        pseudo.extend_from_slice(&[0, 17, 0, 9]);
        pseudo.extend_from_slice(&b[34..43]);
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}
