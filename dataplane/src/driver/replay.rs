//! pcap replay: frames from a capture run through one worker, in order, with the clock
//! taken from the capture's timestamps. Forwarded and generated frames go to an output
//! capture; every input frame yields one [`ReplayRecord`].

use core::net::IpAddr;
use std::io::{BufRead, Write};

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

use super::capture::{CaptureError, CaptureReader};

use crate::parse::{parse, Parsed};
use crate::pipeline::{Tables, Worker, BATCH_SIZE};
use crate::reject::REJECT_SCRATCH_LEN;
use crate::tables::{IfaceId, IfaceKind, NodeTable};
use crate::verdict::Verdict;

/// Which interface a replayed frame is taken to have arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressMode {
    /// From its source address: one of the node's own addresses -> the host interface; an
    /// address in a cluster CIDR -> that pod's veth (by neighbour entry, else the first pod
    /// interface); anything else -> the uplink it is a neighbour on, else the first uplink.
    Auto,
    /// Every frame arrives on this interface.
    Fixed(IfaceId),
}

/// Addresses and ports of an emitted frame, as written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports, for TCP/UDP/SCTP.
    pub ports: Option<(u16, u16)>,
    /// IP protocol number (after IPv6 extension headers); 0 for fragments.
    pub proto: u8,
}

/// What happened to one input frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    /// 0-based index in the input capture.
    pub index: usize,
    pub ingress: IfaceId,
    /// Addresses of the frame as it arrived, if it parsed that far.
    pub input: Option<Endpoints>,
    pub verdict: Verdict,
    /// Addresses of the emitted frame (forwarded or generated), if any.
    pub emitted: Option<Endpoints>,
}

#[derive(Debug)]
pub enum ReplayError {
    /// Reading the input capture failed.
    Input(CaptureError),
    /// Writing the output capture failed.
    Output(pcap_file::PcapError),
    /// The node table has no interface to take frames from.
    NoInterface,
}

impl core::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Input(e) => write!(f, "input capture: {e}"),
            Self::Output(e) => write!(f, "output capture: {e}"),
            Self::NoInterface => write!(f, "the node file declares no interfaces"),
        }
    }
}

impl std::error::Error for ReplayError {}

impl From<CaptureError> for ReplayError {
    fn from(e: CaptureError) -> Self {
        Self::Input(e)
    }
}

impl From<pcap_file::PcapError> for ReplayError {
    fn from(e: pcap_file::PcapError) -> Self {
        Self::Output(e)
    }
}

/// Picks the ingress interface for a frame in [`IngressMode::Auto`]: a source that is one
/// of the node's own addresses comes from the host interface; any other source comes from
/// the interface the node would route to it through (a local pod's veth, or the uplink
/// for external clients and pods on other nodes), else the first uplink.
pub fn auto_ingress(node: &NodeTable, frame: &[u8]) -> Option<IfaceId> {
    let first = |kind: IfaceKind| {
        node.interfaces
            .iter()
            .position(|i| i.kind == kind)
            .map(|i| IfaceId(i as u8))
    };
    match frame_endpoints(frame).map(|e| e.src) {
        Some(a) if node.is_node_address(&a) => {
            first(IfaceKind::Host).or_else(|| first(IfaceKind::Uplink))
        }
        Some(a) => node
            .next_hop(&a)
            .map(|h| h.iface)
            .or_else(|| first(IfaceKind::Uplink)),
        None => first(IfaceKind::Uplink),
    }
    .or_else(|| (!node.interfaces.is_empty()).then_some(IfaceId(0)))
}

/// Addresses of a frame as it is on the wire.
pub fn frame_endpoints(frame: &[u8]) -> Option<Endpoints> {
    match parse(frame).ok()? {
        Parsed::Transport { key, .. } => Some(Endpoints {
            src: key.src,
            dst: key.dst,
            ports: Some((key.sport, key.dport)),
            proto: key.proto as u8,
        }),
        Parsed::IcmpError { layout, .. } | Parsed::OtherIp { layout, .. } => {
            let (s, d) = if layout.is_ipv4() {
                (
                    layout.l3 + 12..layout.l3 + 16,
                    layout.l3 + 16..layout.l3 + 20,
                )
            } else {
                (
                    layout.l3 + 8..layout.l3 + 24,
                    layout.l3 + 24..layout.l3 + 40,
                )
            };
            Some(Endpoints {
                src: crate::wire::read_addr(frame, s),
                dst: crate::wire::read_addr(frame, d),
                ports: None,
                proto: layout.proto,
            })
        }
        Parsed::Fragment { src, dst } => Some(Endpoints {
            src,
            dst,
            ports: None,
            proto: 0,
        }),
        _ => None,
    }
}

/// Replays `input` (pcap or pcapng; Ethernet, Linux cooked or raw IP) through `worker`, writing emitted frames to `output` and handing each
/// frame's record to `on_record`. Returns the number of input frames.
pub fn replay<R: BufRead, W: Write>(
    tables: &Tables,
    worker: &mut Worker,
    input: R,
    output: W,
    ingress: IngressMode,
    mut on_record: impl FnMut(ReplayRecord),
) -> Result<usize, ReplayError> {
    if tables.node.interfaces.is_empty() {
        return Err(ReplayError::NoInterface);
    }
    let mut reader = CaptureReader::new(input)?;
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        endianness: pcap_file::Endianness::Little,
        ts_resolution: reader.ts_resolution(),
        ..PcapHeader::default()
    };
    let mut writer = PcapWriter::with_header(output, header)?;
    let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
    let mut buf = Vec::with_capacity(65536);
    let mut index = 0usize;
    while let Some(ts) = reader.next_frame(&mut buf) {
        let ts = ts?;
        let now_ns = ts.as_nanos() as u64;
        let iface = match ingress {
            IngressMode::Fixed(i) => i,
            IngressMode::Auto => auto_ingress(&tables.node, &buf).unwrap_or(IfaceId(0)),
        };
        let input = frame_endpoints(&buf);
        let verdict = worker.process(tables, &mut buf, iface, now_ns, &mut scratch);
        let emitted_bytes: Option<&[u8]> = match verdict {
            Verdict::Forward { start, len, .. } => Some(&buf[start..start + len]),
            Verdict::Reject { len, .. } => Some(&scratch[..len]),
            _ => None,
        };
        let emitted = emitted_bytes.and_then(|b| {
            writer
                .write_packet(&PcapPacket::new(ts, b.len() as u32, b))
                .map(|_| frame_endpoints(b))
                .transpose()
        });
        let emitted = match emitted {
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(e)) => Some(e),
            None => None,
        };
        on_record(ReplayRecord {
            index,
            ingress: iface,
            input,
            verdict,
            emitted,
        });
        index += 1;
        if index.is_multiple_of(BATCH_SIZE) {
            worker.housekeeping(now_ns);
        }
    }
    Ok(index)
}
