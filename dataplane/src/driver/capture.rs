//! Reading captures the way people actually have them: classic pcap (micro- or
//! nanosecond, either byte order) and pcapng, with Ethernet frames or the link types
//! `tcpdump -i any` and tunnels produce (Linux cooked SLL / SLL2, raw IP). Everything is
//! handed on as an Ethernet frame; for non-Ethernet captures a header is synthesised
//! (source MAC from the cooked header when it has one, destination MAC zero, EtherType
//! from the protocol field or the IP version).

use std::io::BufRead;
use std::time::Duration;

use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::{DataLink, PcapError};

/// A capture could not be read.
#[derive(Debug)]
pub enum CaptureError {
    Pcap(PcapError),
    Io(std::io::Error),
    /// A link type kxp cannot turn into Ethernet frames.
    LinkType(DataLink),
}

impl core::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Pcap(e) => write!(f, "{e}"),
            Self::Io(e) => write!(f, "{e}"),
            Self::LinkType(l) => write!(
                f,
                "link type {l:?} is not supported (Ethernet, Linux cooked SLL/SLL2 and raw IP are)"
            ),
        }
    }
}

impl std::error::Error for CaptureError {}

impl From<PcapError> for CaptureError {
    fn from(e: PcapError) -> Self {
        Self::Pcap(e)
    }
}

enum Format<R: BufRead> {
    Pcap(PcapReader<R>, DataLink),
    PcapNg(Box<PcapNgReader<R>>),
}

/// A capture file, yielding Ethernet frames with their timestamps.
pub struct CaptureReader<R: BufRead> {
    format: Format<R>,
    /// pcapng packet bytes, copied out of the block before its interface is looked up.
    raw: Vec<u8>,
}

impl<R: BufRead> core::fmt::Debug for CaptureReader<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self.format {
            Format::Pcap(..) => "CaptureReader(pcap)",
            Format::PcapNg(..) => "CaptureReader(pcapng)",
        })
    }
}

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

fn supported(l: DataLink) -> bool {
    matches!(
        l,
        DataLink::ETHERNET
            | DataLink::LINUX_SLL
            | DataLink::LINUX_SLL2
            | DataLink::RAW
            | DataLink::IPV4
            | DataLink::IPV6
    )
}

impl<R: BufRead> CaptureReader<R> {
    /// Opens a pcap or pcapng stream (told apart by its magic number).
    pub fn new(mut input: R) -> Result<Self, CaptureError> {
        let head = input.fill_buf().map_err(CaptureError::Io)?;
        let format = if head.len() >= 4 && head[..4] == PCAPNG_MAGIC {
            Format::PcapNg(Box::new(PcapNgReader::new(input)?))
        } else {
            let r = PcapReader::new(input)?;
            let l = r.header().datalink;
            if !supported(l) {
                return Err(CaptureError::LinkType(l));
            }
            Format::Pcap(r, l)
        };
        Ok(Self {
            format,
            raw: Vec::new(),
        })
    }

    /// Timestamp resolution of the input (pcapng and microsecond pcap: microseconds), so
    /// that an output capture can keep it.
    pub fn ts_resolution(&self) -> pcap_file::TsResolution {
        match &self.format {
            Format::Pcap(r, _) => r.header().ts_resolution,
            Format::PcapNg(_) => pcap_file::TsResolution::MicroSecond,
        }
    }

    /// The next frame as Ethernet into `frame` (cleared first), with its timestamp.
    pub fn next_frame(&mut self, frame: &mut Vec<u8>) -> Option<Result<Duration, CaptureError>> {
        frame.clear();
        match &mut self.format {
            Format::Pcap(r, l) => {
                let p = match r.next_packet()? {
                    Ok(p) => p,
                    Err(e) => return Some(Err(e.into())),
                };
                to_ethernet(*l, &p.data, frame);
                Some(Ok(p.timestamp))
            }
            Format::PcapNg(r) => loop {
                let block = match r.next_block()? {
                    Ok(b) => b,
                    Err(e) => return Some(Err(e.into())),
                };
                self.raw.clear();
                let (iface, ts) = match block {
                    Block::EnhancedPacket(p) => {
                        self.raw.extend_from_slice(&p.data);
                        (p.interface_id as usize, p.timestamp)
                    }
                    Block::SimplePacket(p) => {
                        self.raw.extend_from_slice(&p.data);
                        (0, Duration::ZERO)
                    }
                    _ => continue,
                };
                let Some(link) = r.interfaces().get(iface).map(|i| i.linktype) else {
                    continue;
                };
                if !supported(link) {
                    return Some(Err(CaptureError::LinkType(link)));
                }
                to_ethernet(link, &self.raw, frame);
                return Some(Ok(ts));
            },
        }
    }
}

fn ethernet_header(frame: &mut Vec<u8>, src_mac: [u8; 6], ethertype: u16) {
    frame.extend_from_slice(&[0u8; 6]);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

fn ip_ethertype(data: &[u8]) -> u16 {
    match data.first().map(|b| b >> 4) {
        Some(6) => 0x86dd,
        _ => 0x0800,
    }
}

fn mac_from(addr_len: usize, addr: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    if addr_len == 6 && addr.len() >= 6 {
        m.copy_from_slice(&addr[..6]);
    }
    m
}

/// Appends `data`, captured with link type `link`, to `frame` as an Ethernet frame. A
/// cooked header too short to read is passed on as it is, for the parser to count.
fn to_ethernet(link: DataLink, data: &[u8], frame: &mut Vec<u8>) {
    match link {
        DataLink::LINUX_SLL if data.len() >= 16 => {
            let proto = u16::from_be_bytes([data[14], data[15]]);
            let alen = u16::from_be_bytes([data[4], data[5]]) as usize;
            ethernet_header(frame, mac_from(alen, &data[6..14]), proto);
            frame.extend_from_slice(&data[16..]);
        }
        DataLink::LINUX_SLL2 if data.len() >= 20 => {
            let proto = u16::from_be_bytes([data[0], data[1]]);
            ethernet_header(frame, mac_from(data[11] as usize, &data[12..20]), proto);
            frame.extend_from_slice(&data[20..]);
        }
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => {
            ethernet_header(frame, [0; 6], ip_ethertype(data));
            frame.extend_from_slice(data);
        }
        _ => frame.extend_from_slice(data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
    use pcap_file::pcapng::PcapNgWriter;

    const IPV4: [u8; 20] = [
        0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];

    fn pcap(link: DataLink, data: &[u8]) -> Vec<u8> {
        let header = PcapHeader {
            datalink: link,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
        w.write_packet(&PcapPacket::new(
            Duration::from_micros(5),
            data.len() as u32,
            data,
        ))
        .unwrap();
        w.into_writer()
    }

    fn read_one(bytes: Vec<u8>) -> (Duration, Vec<u8>) {
        let mut r = CaptureReader::new(std::io::Cursor::new(bytes)).unwrap();
        let mut f = Vec::new();
        let ts = r.next_frame(&mut f).unwrap().unwrap();
        assert!(r.next_frame(&mut Vec::new()).is_none());
        (ts, f)
    }

    #[test]
    fn raw_ip_gets_an_ethernet_header() {
        let (ts, f) = read_one(pcap(DataLink::RAW, &IPV4));
        assert_eq!(ts, Duration::from_micros(5));
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14..], &IPV4);
    }

    #[test]
    fn linux_cooked_keeps_source_mac_and_protocol() {
        let mut sll = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 7, 0, 0, 0x08, 0x00];
        sll.extend_from_slice(&IPV4);
        let (_, f) = read_one(pcap(DataLink::LINUX_SLL, &sll));
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 7]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14..], &IPV4);
    }

    #[test]
    fn pcapng_is_read() {
        let mut w = PcapNgWriter::new(Vec::new()).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::ETHERNET, 65535))
            .unwrap();
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        frame.extend_from_slice(&IPV4);
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_micros(7),
            original_len: frame.len() as u32,
            data: frame.clone().into(),
            options: vec![],
        })
        .unwrap();
        let (ts, f) = read_one(w.into_inner());
        assert_eq!(ts, Duration::from_micros(7));
        assert_eq!(f, frame);
    }

    #[test]
    fn unsupported_link_type_is_an_error() {
        let e = CaptureReader::new(std::io::Cursor::new(pcap(DataLink::IEEE802_11, &IPV4)));
        assert!(matches!(e, Err(CaptureError::LinkType(_))));
    }
}
