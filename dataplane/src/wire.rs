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
        if new_bytes.len() != n || old == new_bytes.bytes {
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

    /// Rewrites both addresses and both ports: the same bytes as `set_addr(true, src.0)`,
    /// `set_addr(false, dst.0)`, `set_port(true, src.1)`, `set_port(false, dst.1)`, but
    /// with one incremental update (RFC 1624) of the IPv4 header checksum and one of the
    /// transport checksum for all four fields.
    ///
    /// The result is the same to the bit, ones'-complement zero included: every field that
    /// changes adds its `~old + new` words to the sum as the separate updates would, and
    /// folding a sum once or after each addend gives the same value (both are zero only if
    /// every addend is, and otherwise they agree modulo 0xffff). UDP's "0 means no
    /// checksum" rule applies once at the end, as it applied to each step.
    #[inline]
    pub fn rewrite(&mut self, src: (IpAddr, u16), dst: (IpAddr, u16)) {
        if let (true, IpAddr::V4(s), IpAddr::V4(d)) = (self.layout.is_ipv4(), src.0, dst.0) {
            return self.rewrite_v4((u32::from(s), src.1), (u32::from(d), dst.1));
        }
        let l = self.layout;
        // Sum of the changed transport words (~old + new), and whether there are any.
        let mut l4_sum = 0u32;
        let mut l4_changed = false;
        if l.is_ipv4() {
            // Mixed families never happen (NAT does not cross them); an address of the
            // wrong family is left as it is.
            let v4 = |a: IpAddr| match a {
                IpAddr::V4(a) => Some(u32::from(a)),
                IpAddr::V6(_) => None,
            };
            (l4_sum, l4_changed) = self.swap_ipv4_addrs(v4(src.0), v4(dst.0), false);
        } else {
            for (at, addr) in [
                (l.l3 + ipv6::SRC.start, src.0),
                (l.l3 + ipv6::DST.start, dst.0),
            ] {
                let IpAddr::V6(a) = addr else {
                    continue;
                };
                let new = a.octets();
                let Some(field) = self.buf.get_mut(at..at + 16) else {
                    continue;
                };
                let mut old = [0u8; 16];
                old.copy_from_slice(field);
                if old == new {
                    continue;
                }
                field.copy_from_slice(&new);
                for i in (0..16).step_by(2) {
                    l4_sum += word_delta(old[i], old[i + 1], new[i], new[i + 1]);
                }
                l4_changed = true;
            }
        }
        let (sum, changed) = self.swap_ports(src.1, dst.1);
        if l4_changed || changed {
            self.add_to_l4_checksum(l4_sum + sum);
        }
    }

    /// [`FrameMut::rewrite`] of an IPv4 frame with both addresses given as `u32` (host
    /// order): the fast path's form, and what `rewrite` runs for IPv4.
    #[inline]
    pub fn rewrite_v4(&mut self, src: (u32, u16), dst: (u32, u16)) {
        self.rewrite_v4_ttl(src, dst, false);
    }

    /// [`FrameMut::decrement_ttl`] then [`FrameMut::rewrite_v4`] of an IPv4 frame whose
    /// TTL the caller has checked is above 1, with one header checksum update for both
    /// (the same bytes as the two in turn: RFC 1624 updates compose exactly, since the
    /// TTL's addend is never zero). The fast path's forward.
    #[inline]
    pub fn forward_v4(&mut self, src: (u32, u16), dst: (u32, u16)) {
        self.rewrite_v4_ttl(src, dst, true);
    }

    #[inline]
    fn rewrite_v4_ttl(&mut self, src: (u32, u16), dst: (u32, u16), decrement_ttl: bool) {
        let (l3_sum, l3_changed) = self.swap_ipv4_addrs(Some(src.0), Some(dst.0), decrement_ttl);
        let (sum, changed) = self.swap_ports(src.1, dst.1);
        if l3_changed || changed {
            self.add_to_l4_checksum(l3_sum + sum);
        }
    }

    /// Writes the IPv4 source and destination addresses given (where they differ), and
    /// with `decrement_ttl` the TTL less one (the caller has checked it is above 1), and
    /// updates the header checksum once for all; returns the RFC 1624 addends of the
    /// address changes (the transport checksum's pseudo-header changes by the same) and
    /// whether there were any.
    #[inline]
    fn swap_ipv4_addrs(
        &mut self,
        src: Option<u32>,
        dst: Option<u32>,
        decrement_ttl: bool,
    ) -> (u32, bool) {
        let l3 = self.layout.l3;
        let header: Option<&mut [u8; ipv4::MIN_HEADER_LEN]> = self
            .buf
            .get_mut(l3..l3 + ipv4::MIN_HEADER_LEN)
            .and_then(|h| h.try_into().ok());
        let Some(h) = header else {
            return (0, false);
        };
        let mut ip_sum = 0u32;
        let mut ip_changed = false;
        for (at, addr) in [(ipv4::SRC.start, src), (ipv4::DST.start, dst)] {
            if let Some(d) = addr.and_then(|a| swap_ipv4(h, at, a)) {
                ip_sum += d;
                ip_changed = true;
            }
        }
        let mut header_sum = ip_sum;
        if decrement_ttl {
            let ttl = h[ipv4::TTL];
            let old = u16::from_be_bytes([ttl, h[ipv4::PROTO]]);
            h[ipv4::TTL] = ttl.wrapping_sub(1);
            header_sum += u32::from(!old) + u32::from(old.wrapping_sub(0x100));
        }
        if ip_changed || decrement_ttl {
            let c = ipv4::CHECKSUM;
            let cur = u16::from_be_bytes([h[c], h[c + 1]]);
            let new = !checksum::fold(u32::from(!cur) + header_sum);
            h[c..c + 2].copy_from_slice(&new.to_be_bytes());
        }
        (ip_sum, ip_changed)
    }

    /// Writes both ports where they differ; returns the RFC 1624 addends of the changes
    /// and whether there were any.
    #[inline]
    fn swap_ports(&mut self, sport: u16, dport: u16) -> (u32, bool) {
        let l4 = self.layout.l4;
        let ports: Option<&mut [u8; 4]> =
            self.buf.get_mut(l4..l4 + 4).and_then(|p| p.try_into().ok());
        let mut sum = 0u32;
        let mut changed = false;
        if let Some(p) = ports {
            for (at, port) in [(0, sport), (2, dport)] {
                let old = u16::from_be_bytes([p[at], p[at + 1]]);
                if old != port {
                    p[at..at + 2].copy_from_slice(&port.to_be_bytes());
                    sum += u32::from(!old) + u32::from(port);
                    changed = true;
                }
            }
        }
        (sum, changed)
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

    /// [`FrameMut::update_l4_checksum`] with the `~old + new` words already summed.
    #[inline]
    fn add_to_l4_checksum(&mut self, sum: u32) {
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
        let mut c = !checksum::fold(u32::from(!cur) + sum);
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

/// Writes IPv4 address `new` at `at` unless it is there already; returns the RFC 1624
/// addends (`~old + new` for both 16-bit words) of the change.
#[inline]
fn swap_ipv4(header: &mut [u8; ipv4::MIN_HEADER_LEN], at: usize, new: u32) -> Option<u32> {
    let field: &mut [u8; 4] = header.get_mut(at..at + 4)?.try_into().ok()?;
    let old = u32::from_be_bytes(*field);
    if old == new {
        return None;
    }
    *field = new.to_be_bytes();
    Some((!old >> 16) + (!old & 0xffff) + (new >> 16) + (new & 0xffff))
}

/// `~old + new` for one big-endian 16-bit word (an RFC 1624 addend).
#[inline]
fn word_delta(o0: u8, o1: u8, n0: u8, n1: u8) -> u32 {
    u32::from(!u16::from_be_bytes([o0, o1])) + u32::from(u16::from_be_bytes([n0, n1]))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An address: often the one already in the frame (no change), sometimes of the other
    /// family (ignored), otherwise arbitrary.
    fn pick_addr(kind: u8, raw: [u8; 16], current: IpAddr) -> IpAddr {
        match kind % 4 {
            0 => current,
            1 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
            2 => IpAddr::V6(Ipv6Addr::from(raw)),
            // Differs from the current one in one 16-bit word only.
            _ => match current {
                IpAddr::V4(a) => {
                    let mut o = a.octets();
                    o[2] = raw[0];
                    o[3] = raw[1];
                    IpAddr::V4(Ipv4Addr::from(o))
                }
                IpAddr::V6(a) => {
                    let mut o = a.octets();
                    o[14] = raw[0];
                    o[15] = raw[1];
                    IpAddr::V6(Ipv6Addr::from(o))
                }
            },
        }
    }

    /// The ones'-complement corner cases (a sum of exactly 0 or 0xffff at some step)
    /// are rare with random checksums, so try every transport checksum value.
    #[test]
    fn rewrite_equals_the_four_setters_for_every_checksum() {
        let changes: [(u16, u16, [u8; 4], [u8; 4]); 4] = [
            (0, 0x1234, [0, 0, 0, 0], [0, 0, 0, 0]),
            (0xffff, 0, [255, 255, 0, 0], [0, 0, 255, 255]),
            (40000, 61000, [10, 0, 0, 1], [10, 244, 3, 9]),
            (80, 80, [0xff, 0xff, 0xff, 0xff], [0, 0, 0, 0]),
        ];
        for v6 in [false, true] {
            for p in [proto::UDP, proto::TCP] {
                for &(old_port, new_port, old_a, new_a) in &changes {
                    let l4 = if v6 { 54 } else { 34 };
                    let layout = Layout {
                        l3: 14,
                        l4,
                        end: l4 + 20,
                        ip_version: if v6 { 6 } else { 4 },
                        proto: p,
                    };
                    let mut base = [0u8; 96];
                    base[l4..l4 + 2].copy_from_slice(&old_port.to_be_bytes());
                    let (at, new_src) = if v6 {
                        let mut a = [0u8; 16];
                        a[12..].copy_from_slice(&new_a);
                        base[14 + 8 + 12..14 + 8 + 16].copy_from_slice(&old_a);
                        (
                            l4 + if p == proto::UDP { 6 } else { 16 },
                            IpAddr::V6(a.into()),
                        )
                    } else {
                        base[14 + 12..14 + 16].copy_from_slice(&old_a);
                        (
                            l4 + if p == proto::UDP { 6 } else { 16 },
                            IpAddr::V4(new_a.into()),
                        )
                    };
                    let dst = FrameMut::new(&mut base.clone(), layout).dst_addr();
                    for csum in 0..=u16::MAX {
                        base[at..at + 2].copy_from_slice(&csum.to_be_bytes());
                        base[24..26].copy_from_slice(&csum.to_be_bytes());
                        let mut a = base;
                        let mut fa = FrameMut::new(&mut a, layout);
                        fa.set_addr(true, new_src);
                        fa.set_addr(false, dst);
                        fa.set_port(true, new_port);
                        fa.set_port(false, 7);
                        let mut b = base;
                        FrameMut::new(&mut b, layout).rewrite((new_src, new_port), (dst, 7));
                        assert_eq!(a, b, "v6 {v6} proto {p} csum {csum:#x}");
                    }
                }
            }
        }
    }

    /// `forward_v4` (one header checksum update) writes what `decrement_ttl` then
    /// `rewrite_v4` write, for every IPv4 header checksum value, with and without address
    /// and port changes.
    #[test]
    fn forward_v4_equals_decrement_ttl_then_rewrite_v4() {
        let layout = Layout {
            l3: 14,
            l4: 34,
            end: 54,
            ip_version: 4,
            proto: proto::TCP,
        };
        let (old_src, old_dst) = (0x0a00_0001u32, 0x0a60_0005u32);
        let changes: [((u32, u16), (u32, u16)); 4] = [
            ((old_src, 40000), (old_dst, 80)),
            ((old_src, 40000), (0x0af4_0309, 8080)),
            ((0xffff_0000, 1), (0x0000_ffff, 0xffff)),
            ((old_src, 40001), (old_dst ^ 0xffff, 80)),
        ];
        for ttl in [2u8, 3, 64, 255] {
            for &(src, dst) in &changes {
                let mut base = [0u8; 54];
                base[14] = 0x45;
                base[14 + ipv4::TTL] = ttl;
                base[14 + ipv4::PROTO] = proto::TCP;
                base[26..30].copy_from_slice(&old_src.to_be_bytes());
                base[30..34].copy_from_slice(&old_dst.to_be_bytes());
                base[34..36].copy_from_slice(&40000u16.to_be_bytes());
                base[36..38].copy_from_slice(&80u16.to_be_bytes());
                for csum in 0..=u16::MAX {
                    let c = 14 + ipv4::CHECKSUM;
                    base[c..c + 2].copy_from_slice(&csum.to_be_bytes());
                    base[50..52].copy_from_slice(&csum.rotate_left(3).to_be_bytes());
                    let mut a = base;
                    let mut fa = FrameMut::new(&mut a, layout);
                    assert!(fa.decrement_ttl());
                    fa.rewrite_v4(src, dst);
                    let mut b = base;
                    FrameMut::new(&mut b, layout).forward_v4(src, dst);
                    assert_eq!(a, b, "ttl {ttl} csum {csum:#x} {src:?} {dst:?}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// `rewrite` writes exactly what the four separate setters write, checksums
        /// included, whatever the bytes (checksums of 0 and 0xffff, UDP's "no checksum").
        #[test]
        fn rewrite_equals_the_four_setters(
            v6 in any::<bool>(),
            vlan in any::<bool>(),
            p in 0..5usize,
            mut bytes in proptest::collection::vec(any::<u8>(), 120),
            csum in prop_oneof![Just(0u16), Just(0xffff), Just(0xfffe), Just(1), any::<u16>()],
            ip_csum in prop_oneof![Just(0u16), Just(0xffff), any::<u16>()],
            kinds in any::<[u8; 4]>(),
            raws in any::<[[u8; 16]; 2]>(),
            ports in any::<[u16; 2]>(),
        ) {
            let proto = [proto::TCP, proto::UDP, proto::SCTP, proto::ICMPV6, 47][p];
            let l3 = if vlan { 18 } else { 14 };
            let l4 = l3 + if v6 { 40 } else { 20 };
            let layout = Layout { l3, l4, end: l4 + 40, ip_version: if v6 { 6 } else { 4 }, proto };
            if let Some(at) = layout.l4_checksum_offset() {
                bytes[at..at + 2].copy_from_slice(&csum.to_be_bytes());
            }
            if !v6 {
                bytes[l3 + ipv4::CHECKSUM..l3 + ipv4::CHECKSUM + 2]
                    .copy_from_slice(&ip_csum.to_be_bytes());
            }
            let f = FrameMut::new(&mut bytes, layout);
            let (cur_src, cur_dst) = (f.src_addr(), f.dst_addr());
            let (cur_sp, cur_dp) = (f.port(true), f.port(false));
            let src = (
                pick_addr(kinds[0], raws[0], cur_src),
                if kinds[2] % 2 == 0 { cur_sp } else { ports[0] },
            );
            let dst = (
                pick_addr(kinds[1], raws[1], cur_dst),
                if kinds[3] % 2 == 0 { cur_dp } else { ports[1] },
            );
            let mut a = bytes.clone();
            let mut fa = FrameMut::new(&mut a, layout);
            fa.set_addr(true, src.0);
            fa.set_addr(false, dst.0);
            fa.set_port(true, src.1);
            fa.set_port(false, dst.1);
            let mut b = bytes.clone();
            FrameMut::new(&mut b, layout).rewrite(src, dst);
            prop_assert_eq!(a, b);
        }
    }
}
