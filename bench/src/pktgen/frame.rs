//! Frame templates for the generator: built once per frontend, then per packet only the
//! source address and port are written and both checksums are finished from sums
//! precomputed over everything else. No allocation and no pass over the payload per
//! packet.
//!
//! Frames are Ethernet + IPv4 (20 bytes, TTL 64, DF) or IPv6 (40 bytes, hop limit 64) +
//! UDP (8) or TCP (20, no options) + a payload that fills the frame to the requested size
//! (a TCP SYN thus carries data, as a TFO SYN does; IP and L4 lengths always cover the
//! whole frame, there is no Ethernet padding). Checksums are complete (not the partial
//! sums a sender with checksum offload leaves), so every receiver can verify them.

use core::net::{IpAddr, SocketAddr};

use kxp_dataplane::checksum::{fold, sum_words};

/// What each packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    /// TCP with only SYN set: the first packet of a connection.
    TcpSyn,
    /// TCP with only ACK set: a packet of an established connection.
    TcpAck,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::TcpSyn => "tcp-syn",
            Proto::TcpAck => "tcp-ack",
        }
    }

    fn l4_header_len(self) -> usize {
        match self {
            Proto::Udp => 8,
            Proto::TcpSyn | Proto::TcpAck => 20,
        }
    }

    fn ip_proto(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::TcpSyn | Proto::TcpAck => 6,
        }
    }
}

const ETH_LEN: usize = 14;
/// Longest header stack: Ethernet + IPv6 + TCP.
pub const MAX_HEADER_LEN: usize = ETH_LEN + 40 + 20;
/// Largest frame the generator builds (a UMEM frame holds 2048 bytes minus headroom).
pub const MAX_FRAME_LEN: usize = 1792;
/// The TCP sequence and acknowledgement numbers of every segment.
const TCP_SEQ: u32 = 0x6b78_7000;
const TCP_ACK: u32 = 0x6b78_7001;

/// Where the per-packet fields are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    v6: bool,
    l3: usize,
    l4: usize,
    /// Start of the L4 checksum field.
    l4_csum: usize,
    header_len: usize,
}

impl Layout {
    fn new(v6: bool, proto: Proto) -> Self {
        let l3 = ETH_LEN;
        let l4 = l3 + if v6 { 40 } else { 20 };
        let l4_csum = l4 + if proto == Proto::Udp { 6 } else { 16 };
        Self {
            v6,
            l3,
            l4,
            l4_csum,
            header_len: l4 + proto.l4_header_len(),
        }
    }

    fn src(&self) -> core::ops::Range<usize> {
        if self.v6 {
            self.l3 + 8..self.l3 + 24
        } else {
            self.l3 + 12..self.l3 + 16
        }
    }
}

/// One frontend's header bytes and the checksum sums that do not depend on the source.
#[derive(Debug, Clone)]
struct Template {
    header: [u8; MAX_HEADER_LEN],
    /// Ones'-complement sum of the IPv4 header with source and checksum zeroed.
    ip_sum: u32,
    /// Ones'-complement sum of the pseudo-header and L4 segment with source address,
    /// source port and checksum zeroed.
    l4_sum: u32,
}

/// Why a template set cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    NoFrontends,
    MixedFamilies(String),
    TooSmall { size: usize, min: usize },
    TooLarge { size: usize, max: usize },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoFrontends => write!(f, "no destination frontends"),
            Self::MixedFamilies(m) => write!(f, "address families differ: {m}"),
            Self::TooSmall { size, min } => write!(
                f,
                "--size {size} is below the headers of this protocol and family ({min} bytes)"
            ),
            Self::TooLarge { size, max } => write!(f, "--size {size} is above {max}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The frames of one run: the same protocol, family and size, one template per frontend.
#[derive(Debug, Clone)]
pub struct Templates {
    layout: Layout,
    proto: Proto,
    size: usize,
    templates: Vec<Template>,
    /// The payload every frame carries (written into every UMEM frame once).
    payload: Vec<u8>,
}

/// Ones'-complement reduction to at most 0xffff (kept as u32 so that per packet a few
/// 16-bit words can be added without overflow).
fn fold16(mut s: u64) -> u32 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u32
}

/// Ones'-complement sum of the 16-bit words of an address.
#[inline]
fn addr_sum(a: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < a.len() {
        s += u16::from_be_bytes([a[i], a[i + 1]]) as u32;
        i += 2;
    }
    s
}

impl Templates {
    /// Builds the templates. `v6` is the family of the sources; every frontend must have it.
    pub fn new(
        proto: Proto,
        v6: bool,
        size: usize,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        frontends: &[SocketAddr],
    ) -> Result<Self, FrameError> {
        if frontends.is_empty() {
            return Err(FrameError::NoFrontends);
        }
        if let Some(f) = frontends.iter().find(|f| f.is_ipv6() != v6) {
            return Err(FrameError::MixedFamilies(format!(
                "frontend {f} vs {} sources",
                if v6 { "IPv6" } else { "IPv4" }
            )));
        }
        let layout = Layout::new(v6, proto);
        let min = layout.header_len.max(64);
        if size < min {
            return Err(FrameError::TooSmall { size, min });
        }
        if size > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                size,
                max: MAX_FRAME_LEN,
            });
        }
        let payload: Vec<u8> = (0..size - layout.header_len)
            .map(|i| 0xa0 ^ (i as u8))
            .collect();
        let templates = frontends
            .iter()
            .map(|f| Self::template(layout, proto, size, src_mac, dst_mac, f, &payload))
            .collect();
        Ok(Self {
            layout,
            proto,
            size,
            templates,
            payload,
        })
    }

    fn template(
        l: Layout,
        proto: Proto,
        size: usize,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        frontend: &SocketAddr,
        payload: &[u8],
    ) -> Template {
        let mut h = [0u8; MAX_HEADER_LEN];
        h[0..6].copy_from_slice(&dst_mac);
        h[6..12].copy_from_slice(&src_mac);
        let l4_len = size - l.l4;
        let ip_sum;
        match frontend.ip() {
            IpAddr::V4(d) => {
                h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let ip = &mut h[l.l3..l.l3 + 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((size - l.l3) as u16).to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = 64;
                ip[9] = proto.ip_proto();
                ip[16..20].copy_from_slice(&d.octets());
                ip_sum = fold16(sum_words(ip) as u64);
            }
            IpAddr::V6(d) => {
                h[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                let ip = &mut h[l.l3..l.l3 + 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                ip[6] = proto.ip_proto();
                ip[7] = 64;
                ip[24..40].copy_from_slice(&d.octets());
                ip_sum = 0;
            }
        }
        let l4 = &mut h[l.l4..l.header_len];
        l4[2..4].copy_from_slice(&frontend.port().to_be_bytes());
        match proto {
            Proto::Udp => l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes()),
            Proto::TcpSyn | Proto::TcpAck => {
                l4[4..8].copy_from_slice(&TCP_SEQ.to_be_bytes());
                if proto == Proto::TcpAck {
                    l4[8..12].copy_from_slice(&TCP_ACK.to_be_bytes());
                }
                l4[12] = 5 << 4;
                l4[13] = if proto == Proto::TcpSyn { 0x02 } else { 0x10 };
                l4[14..16].copy_from_slice(&65535u16.to_be_bytes());
            }
        }
        let dst = match frontend.ip() {
            IpAddr::V4(d) => addr_sum(&d.octets()),
            IpAddr::V6(d) => addr_sum(&d.octets()),
        };
        // Pseudo-header without the source: destination, protocol, L4 length.
        let pseudo = dst as u64 + proto.ip_proto() as u64 + l4_len as u64;
        let l4_sum =
            fold16(pseudo + sum_words(&h[l.l4..l.header_len]) as u64 + sum_words(payload) as u64);
        Template {
            header: h,
            ip_sum,
            l4_sum,
        }
    }

    /// Frame length in bytes (without FCS).
    pub fn frame_len(&self) -> usize {
        self.size
    }

    pub fn frontends(&self) -> usize {
        self.templates.len()
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    pub fn is_v6(&self) -> bool {
        self.layout.v6
    }

    /// Writes a whole frame (headers of frontend 0 and the payload): what every UMEM
    /// frame gets once, so that per packet only the headers need writing.
    pub fn init_frame(&self, frame: &mut [u8]) {
        let l = &self.layout;
        frame[..l.header_len].copy_from_slice(&self.templates[0].header[..l.header_len]);
        frame[l.header_len..self.size].copy_from_slice(&self.payload);
    }

    /// Writes the headers of a packet to `frontend` from `src`:`sport` into `frame`, whose
    /// payload [`init_frame`](Self::init_frame) wrote. `src` holds 4 (IPv4) or 16 (IPv6)
    /// bytes. Both checksums are complete.
    #[inline]
    pub fn write(&self, frame: &mut [u8], frontend: usize, src: &[u8], sport: u16) {
        let l = &self.layout;
        let t = &self.templates[frontend];
        let frame = &mut frame[..l.header_len];
        frame.copy_from_slice(&t.header[..l.header_len]);
        frame[l.src()].copy_from_slice(src);
        frame[l.l4..l.l4 + 2].copy_from_slice(&sport.to_be_bytes());
        let s = addr_sum(src);
        if !l.v6 {
            let c = !fold(t.ip_sum + s);
            frame[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let mut c = !fold(t.l4_sum + s + sport as u32);
        if self.proto == Proto::Udp && c == 0 {
            c = 0xffff;
        }
        frame[l.l4_csum..l.l4_csum + 2].copy_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn check(frame: &[u8], want_src: IpAddr, want_sport: u16, want_dst: SocketAddr) {
        let p = SlicedPacket::from_ethernet(frame).expect("parses");
        let (src, dst, payload_ok) = match p.net.as_ref().expect("ip") {
            NetSlice::Ipv4(ip) => {
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum(), "ipv4 checksum");
                assert_eq!(h.time_to_live, 64);
                assert_eq!(h.total_len as usize, frame.len() - 14);
                let ok = match p.transport.as_ref().expect("l4") {
                    TransportSlice::Udp(u) => {
                        u.to_header().checksum
                            == u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap()
                    }
                    TransportSlice::Tcp(t) => {
                        t.to_header().checksum
                            == t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
                    }
                    other => panic!("{other:?}"),
                };
                (
                    IpAddr::V4(h.source.into()),
                    IpAddr::V4(h.destination.into()),
                    ok,
                )
            }
            NetSlice::Ipv6(ip) => {
                let h = ip.header().to_header();
                assert_eq!(h.hop_limit, 64);
                let ok = match p.transport.as_ref().expect("l4") {
                    TransportSlice::Udp(u) => {
                        u.to_header().checksum
                            == u.to_header().calc_checksum_ipv6(&h, u.payload()).unwrap()
                    }
                    TransportSlice::Tcp(t) => {
                        t.to_header().checksum
                            == t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap()
                    }
                    other => panic!("{other:?}"),
                };
                (
                    IpAddr::V6(h.source.into()),
                    IpAddr::V6(h.destination.into()),
                    ok,
                )
            }
            other => panic!("{other:?}"),
        };
        assert!(payload_ok, "l4 checksum");
        assert_eq!(src, want_src);
        assert_eq!(dst, want_dst.ip());
        let (sport, dport) = match p.transport.unwrap() {
            TransportSlice::Udp(u) => (u.source_port(), u.destination_port()),
            TransportSlice::Tcp(t) => (t.source_port(), t.destination_port()),
            other => panic!("{other:?}"),
        };
        assert_eq!((sport, dport), (want_sport, want_dst.port()));
    }

    #[test]
    fn every_protocol_family_and_size_checksums() {
        let v4: Vec<SocketAddr> = vec![
            "10.96.0.10:53".parse().unwrap(),
            "10.96.7.1:80".parse().unwrap(),
        ];
        let v6: Vec<SocketAddr> = vec![
            "[fd00:96::a]:53".parse().unwrap(),
            "[fd00:96::1:1]:8080".parse().unwrap(),
        ];
        for proto in [Proto::Udp, Proto::TcpSyn, Proto::TcpAck] {
            for (is6, fronts) in [(false, &v4), (true, &v6)] {
                for size in [74usize, 75, 128, 1500] {
                    let t = Templates::new(
                        proto,
                        is6,
                        size,
                        [2, 0, 0, 0, 0, 1],
                        [2, 0, 0, 0, 0, 2],
                        fronts,
                    )
                    .unwrap();
                    let mut frame = vec![0u8; size];
                    t.init_frame(&mut frame);
                    // Several sources over the same buffer: each write fully replaces the
                    // previous packet's fields.
                    for (k, sport) in [(0u32, 1024u16), (1, 65535), (77, 40000), (u32::MAX, 1)] {
                        let f = k as usize % fronts.len();
                        let src: IpAddr = if is6 {
                            let mut a = [0xfdu8, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                            a[12..].copy_from_slice(&k.to_be_bytes());
                            IpAddr::from(a)
                        } else {
                            IpAddr::from(k.to_be_bytes())
                        };
                        match src {
                            IpAddr::V4(a) => t.write(&mut frame, f, &a.octets(), sport),
                            IpAddr::V6(a) => t.write(&mut frame, f, &a.octets(), sport),
                        }
                        check(&frame, src, sport, fronts[f]);
                    }
                }
            }
        }
    }

    #[test]
    fn sizes_and_families_are_validated() {
        let v4: Vec<SocketAddr> = vec!["10.96.0.10:53".parse().unwrap()];
        let m = [0u8; 6];
        assert!(Templates::new(Proto::Udp, false, 64, m, m, &v4).is_ok());
        assert_eq!(
            Templates::new(Proto::TcpSyn, true, 64, m, m, &["[::1]:1".parse().unwrap()])
                .unwrap_err(),
            FrameError::TooSmall { size: 64, min: 74 }
        );
        assert!(matches!(
            Templates::new(Proto::Udp, true, 64, m, m, &v4),
            Err(FrameError::MixedFamilies(_))
        ));
        assert_eq!(
            Templates::new(Proto::Udp, false, 64, m, m, &[]).unwrap_err(),
            FrameError::NoFrontends
        );
        assert!(Templates::new(Proto::Udp, false, 63, m, m, &v4).is_err());
        assert!(Templates::new(Proto::Udp, false, 4000, m, m, &v4).is_err());
    }
}
