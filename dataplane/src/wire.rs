//! Typed views over the header bytes kxp rewrites in place: MACs, IP addresses, TTL/hop
//! limit, transport ports, and every checksum those touch (updated incrementally, RFC 1624,
//! pseudo-header included).
//!
//! Parsing and validation happen once, in [`crate::parse`]; it yields a [`Layout`] whose
//! offsets are in bounds by construction, so the accessors here index without re-checking
//! and cannot panic on a frame that [`crate::parse`] accepted.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::checksum;

/// Ethernet header offsets.
pub mod eth {
    pub const DST: core::ops::Range<usize> = 0..6;
    pub const SRC: core::ops::Range<usize> = 6..12;
    pub const ETHERTYPE: core::ops::Range<usize> = 12..14;
    pub const HEADER_LEN: usize = 14;
    pub const VLAN_TAG_LEN: usize = 4;
    pub const TYPE_IPV4: u16 = 0x0800;
    pub const TYPE_IPV6: u16 = 0x86dd;
    pub const TYPE_VLAN: u16 = 0x8100;
    pub const TYPE_QINQ: u16 = 0x88a8;
}

/// IPv4 header offsets (RFC 791).
pub mod ipv4 {
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: core::ops::Range<usize> = 12..16;
    pub const DST: core::ops::Range<usize> = 16..20;
    pub const MIN_HEADER_LEN: usize = 20;
}

/// IPv6 header offsets (RFC 8200).
pub mod ipv6 {
    pub const PAYLOAD_LEN: core::ops::Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: core::ops::Range<usize> = 8..24;
    pub const DST: core::ops::Range<usize> = 24..40;
    pub const HEADER_LEN: usize = 40;
}

/// IP protocol numbers.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Where the headers of a validated frame sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the IP header (14, or 18 behind one 802.1Q tag).
    pub l3: usize,
    /// Offset of the transport header.
    pub l4: usize,
    /// End of the IP packet (Ethernet padding beyond it is not ours).
    pub end: usize,
    /// 4 or 6.
    pub ip_version: u8,
    /// Transport protocol number (after IPv6 extension headers).
    pub proto: u8,
}

impl Layout {
    pub fn is_ipv4(&self) -> bool {
        self.ip_version == 4
    }

    /// Length of the transport segment (header and payload).
    pub fn l4_len(&self) -> usize {
        self.end - self.l4
    }

    fn addr_range(&self, src: bool) -> core::ops::Range<usize> {
        let r = match (self.ip_version, src) {
            (4, true) => ipv4::SRC,
            (4, false) => ipv4::DST,
            (_, true) => ipv6::SRC,
            (_, false) => ipv6::DST,
        };
        self.l3 + r.start..self.l3 + r.end
    }

    /// Offset of the transport checksum, if the protocol has one kxp maintains
    /// incrementally (SCTP's CRC32c is recomputed instead).
    fn l4_checksum_offset(&self) -> Option<usize> {
        match self.proto {
            proto::TCP => Some(self.l4 + 16),
            proto::UDP => Some(self.l4 + 6),
            proto::ICMPV6 => Some(self.l4 + 2),
            _ => None,
        }
    }
}

/// A mutable view of a validated frame.
#[derive(Debug)]
pub struct FrameMut<'a> {
    pub buf: &'a mut [u8],
    pub layout: Layout,
}

impl<'a> FrameMut<'a> {
    /// `layout` must come from [`crate::parse`] for this very buffer.
    pub fn new(buf: &'a mut [u8], layout: Layout) -> Self {
        Self { buf, layout }
    }

    #[inline]
    pub fn set_macs(&mut self, src: [u8; 6], dst: [u8; 6]) {
        self.buf[eth::SRC].copy_from_slice(&src);
        self.buf[eth::DST].copy_from_slice(&dst);
    }

    #[inline]
    pub fn src_addr(&self) -> IpAddr {
        read_addr(self.buf, self.layout.addr_range(true))
    }

    #[inline]
    pub fn dst_addr(&self) -> IpAddr {
        read_addr(self.buf, self.layout.addr_range(false))
    }

    fn read_u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.buf[at], self.buf[at + 1]])
    }

    fn write_u16(&mut self, at: usize, v: u16) {
        self.buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// Rewrites the source (`src = true`) or destination address, fixing the IPv4 header
    /// checksum and the transport checksum's pseudo-header. `new` must be of the frame's
    /// family (NAT never crosses families).
    #[inline]
    pub fn set_addr(&mut self, src: bool, new: IpAddr) {
        let range = self.layout.addr_range(src);
        let mut old = [0u8; 16];
        let n = range.len();
        old[..n].copy_from_slice(&self.buf[range.clone()]);
        let new_bytes = addr_bytes(&new);
        if new_bytes.len() != n || old[..n] == *new_bytes.as_slice() {
            return;
        }
        self.buf[range].copy_from_slice(new_bytes.as_slice());
        if self.layout.is_ipv4() {
            let at = self.layout.l3 + ipv4::CHECKSUM;
            let c = checksum::update(self.read_u16(at), &old[..n], new_bytes.as_slice());
            self.write_u16(at, c);
        }
        self.update_l4_checksum(&old[..n], new_bytes.as_slice());
    }

    /// Transport source or destination port (TCP, UDP, SCTP: the first four bytes).
    #[inline]
    pub fn port(&self, src: bool) -> u16 {
        self.read_u16(self.layout.l4 + if src { 0 } else { 2 })
    }

    #[inline]
    pub fn set_port(&mut self, src: bool, new: u16) {
        let at = self.layout.l4 + if src { 0 } else { 2 };
        let old = self.read_u16(at);
        if old == new {
            return;
        }
        self.write_u16(at, new);
        self.update_l4_checksum(&old.to_be_bytes(), &new.to_be_bytes());
    }

    fn update_l4_checksum(&mut self, old: &[u8], new: &[u8]) {
        let Some(at) = self.layout.l4_checksum_offset() else {
            return;
        };
        if at + 2 > self.layout.end {
            return;
        }
        let cur = self.read_u16(at);
        // An IPv4 UDP checksum of zero means "none": leave it so (RFC 768).
        if self.layout.proto == proto::UDP && self.layout.is_ipv4() && cur == 0 {
            return;
        }
        let mut c = checksum::update(cur, old, new);
        if self.layout.proto == proto::UDP && c == 0 {
            c = 0xffff;
        }
        self.write_u16(at, c);
    }

    /// Recomputes SCTP's CRC32c after its ports changed.
    pub fn fix_sctp_checksum(&mut self) {
        if self.layout.proto != proto::SCTP || self.layout.l4 + 12 > self.layout.end {
            return;
        }
        let (l4, end) = (self.layout.l4, self.layout.end);
        self.buf[l4 + 8..l4 + 12].fill(0);
        let crc = checksum::crc32c(&self.buf[l4..end]);
        // SCTP stores its CRC32c little-endian (RFC 9260 appendix A).
        self.buf[l4 + 8..l4 + 12].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decrements the IPv4 TTL or IPv6 hop limit as a router does. Returns false, leaving
    /// the frame untouched, if it would reach zero.
    #[inline]
    pub fn decrement_ttl(&mut self) -> bool {
        let l3 = self.layout.l3;
        if self.layout.is_ipv4() {
            let ttl = self.buf[l3 + ipv4::TTL];
            if ttl <= 1 {
                return false;
            }
            let old = u16::from_be_bytes([ttl, self.buf[l3 + ipv4::PROTO]]);
            self.buf[l3 + ipv4::TTL] = ttl - 1;
            let at = l3 + ipv4::CHECKSUM;
            let c = checksum::update_u16(self.read_u16(at), old, old - 0x100);
            self.write_u16(at, c);
        } else {
            let hl = self.buf[l3 + ipv6::HOP_LIMIT];
            if hl <= 1 {
                return false;
            }
            self.buf[l3 + ipv6::HOP_LIMIT] = hl - 1;
        }
        true
    }
}

/// Address bytes without allocation.
#[derive(Debug, Clone, Copy)]
pub struct AddrBytes {
    bytes: [u8; 16],
    len: u8,
}

impl AddrBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[inline]
pub fn addr_bytes(addr: &IpAddr) -> AddrBytes {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            AddrBytes { bytes, len: 4 }
        }
        IpAddr::V6(a) => AddrBytes {
            bytes: a.octets(),
            len: 16,
        },
    }
}

#[inline]
pub fn read_addr(buf: &[u8], range: core::ops::Range<usize>) -> IpAddr {
    let b = &buf[range];
    if b.len() == 4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        IpAddr::V6(Ipv6Addr::from(a))
    }
}
