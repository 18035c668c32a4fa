//! The IPv4 fast path: the frames that make up nearly all of a node's traffic (untagged
//! Ethernet, IPv4 without options, not fragmented, TCP or UDP) read at fixed offsets into
//! `u32` addresses instead of going through the general parser, looked up in conntrack
//! without building a [`FlowMatch`](crate::conntrack::FlowMatch), routed with
//! [`NodeTable::next_hop_v4`](crate::tables::NodeTable::next_hop_v4) and rewritten with
//! [`FrameMut::rewrite_v4`].
//!
//! It is an implementation of the same pipeline, not a second one: every frame it takes
//! gets the verdict, bytes, counters and conntrack effects the general path would give it
//! (checked by `dataplane/tests/fast_path.rs`, which runs both over the same frames). Any
//! frame it does not take whole, because of its shape or because it fails a check the
//! general parser makes (lengths, header checksum, transport header), is left untouched for
//! the general path, which then decides and counts exactly as before.

use core::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::conntrack::{prefetch, Conntrack, Direction, Tuple};
use crate::flow::{lb_hash_v4, FlowKey, L4Proto};
use crate::tables::{frontend_hash_v4, Frontend, IfaceId, ServicePort, ServiceTable};
use crate::verdict::{DropReason, ForwardReason, Verdict};
use crate::wire::{eth, ipv4, proto, FrameMut, Layout};

use super::{finish_frame, Tables, Worker};

/// Where the IP header starts in an untagged frame.
const L3: usize = eth::HEADER_LEN;
/// Where the transport header starts behind an option-less IPv4 header.
const L4: usize = L3 + ipv4::MIN_HEADER_LEN;
/// Bytes the tuple is read from: Ethernet, IPv4 header and both ports.
const PEEK_LEN: usize = L4 + 4;

/// The tuple of a frame the fast path may take, read without validating anything but its
/// shape (for the prefetch pass of `process_batch`, and the first step of
/// [`classify_v4`]): untagged Ethernet, IPv4 with IHL 5, not a fragment, TCP or UDP.
#[inline]
pub(super) fn peek_v4(frame: &[u8]) -> Option<Tuple<u32>> {
    let h: &[u8; PEEK_LEN] = frame.get(..PEEK_LEN)?.try_into().ok()?;
    let ethertype = u16::from_be_bytes([h[12], h[13]]);
    if ethertype != eth::TYPE_IPV4 || h[L3] != 0x45 {
        return None;
    }
    if u16::from_be_bytes([h[L3 + 6], h[L3 + 7]]) & 0x3fff != 0 {
        return None;
    }
    let p = h[L3 + ipv4::PROTO];
    if p != proto::TCP && p != proto::UDP {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    Some(Tuple {
        src: word(L3 + ipv4::SRC.start),
        dst: word(L3 + ipv4::DST.start),
        sport: u16::from_be_bytes([h[L4], h[L4 + 1]]),
        dport: u16::from_be_bytes([h[L4 + 2], h[L4 + 3]]),
        proto: p,
    })
}

/// What the prefetch passes of `process_batch` learned of a fast-path frame.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peeked {
    tuple: Tuple<u32>,
    /// Conntrack hash of `tuple`.
    pub(super) hash: u64,
    /// For a flow the conntrack index certainly does not hold: the hash of its frontend
    /// key in the IPv4 frontend index.
    frontend_hash: Option<u64>,
    /// The frame's frontend, once looked up (`Some(None)`: the destination is no
    /// frontend); `None`: not looked up.
    frontend: Option<Option<Frontend>>,
    /// The flow's load-balancing hash, once computed.
    lb_hash: Option<u64>,
    /// The conntrack index value the second pass prefetched the flow entry of.
    candidate: Option<u32>,
}

impl Peeked {
    /// First pass: the tuple and its conntrack hash (the caller prefetches the bucket).
    #[inline]
    pub(super) fn new(frame: &[u8], ct: &Conntrack) -> Option<Self> {
        let tuple = peek_v4(frame)?;
        Some(Self {
            tuple,
            hash: ct.hash_v4(&tuple),
            frontend_hash: None,
            frontend: None,
            lb_hash: None,
            candidate: None,
        })
    }

    /// Second pass: the flow's entry prefetched (the caller prefetched its bucket); for a
    /// flow the conntrack index certainly does not hold, its frontend slot too.
    #[inline]
    pub(super) fn prefetch_flow(&mut self, ct: &Conntrack, services: &ServiceTable) {
        let (maybe_tracked, candidate) = ct.prefetch_flow_v4(self.hash);
        self.candidate = candidate;
        if !maybe_tracked {
            self.mark_new(services);
        }
    }

    /// Whether [`Peeked::prefetch_flow`] found the flow certainly new.
    #[inline]
    pub(super) fn is_new(&self) -> bool {
        self.frontend_hash.is_some()
    }

    #[inline]
    fn mark_new(&mut self, services: &ServiceTable) {
        let t = &self.tuple;
        let h = frontend_hash_v4(t.dst, t.proto, t.dport);
        if let Some(p) = services.frontend_v4_ptr(h) {
            prefetch(p);
        }
        self.frontend_hash = Some(h);
    }

    /// Third pass: the frontend of a flow marked new, and the table entry pointing to the
    /// service port it names prefetched (with thousands of services that array is itself
    /// out of cache, so reading the pointer here would stall).
    #[inline]
    pub(super) fn find_frontend(&mut self, services: &ServiceTable) {
        let Some(h) = self.frontend_hash else {
            return;
        };
        let t = &self.tuple;
        let fe = services.frontend_v4(h, t.dst, t.proto, t.dport);
        self.frontend = Some(fe);
        if let Some(fe) = fe {
            let entry: *const Arc<ServicePort> = services.service_port_arc(fe.service_port);
            prefetch(entry.cast::<u8>());
        }
    }

    /// Fourth pass: the service port a found frontend names.
    #[inline]
    pub(super) fn prefetch_service_port(&self, services: &ServiceTable) {
        let Some(Some(fe)) = self.frontend else {
            return;
        };
        let sp = Arc::as_ptr(services.service_port_arc(fe.service_port)).cast::<u8>();
        // Every line the value touches: it need not start on a line boundary.
        let skew = sp as usize % 64;
        let first_line = sp.wrapping_sub(skew);
        for line in 0..(skew + core::mem::size_of::<ServicePort>()).div_ceil(64) {
            prefetch(first_line.wrapping_add(line * 64));
        }
    }

    /// The service port of a frame [`Peeked::find_frontend`] found a frontend for.
    #[inline]
    fn service_port<'t>(&self, services: &'t ServiceTable) -> Option<&'t ServicePort> {
        let fe = self.frontend??;
        Some(services.service_port(fe.service_port))
    }

    /// Fifth pass: the Maglev tables' headers and the first endpoints.
    #[inline]
    pub(super) fn prefetch_lb(&self, services: &ServiceTable) {
        let Some(sp) = self.service_port(services) else {
            return;
        };
        prefetch(Arc::as_ptr(&sp.cluster_lb));
        prefetch(Arc::as_ptr(&sp.local_lb));
        let eps = sp.endpoints.as_ptr().cast::<u8>();
        prefetch(eps);
        prefetch(eps.wrapping_add(64));
    }

    /// Sixth pass: the Maglev slots the flow's hash picks.
    #[inline]
    pub(super) fn prefetch_slot(&mut self, services: &ServiceTable) {
        let Some(sp) = self.service_port(services) else {
            return;
        };
        let t = &self.tuple;
        let h = lb_hash_v4(t.proto, t.src, t.dst, t.sport, t.dport);
        self.lb_hash = Some(h);
        for lb in [&sp.cluster_lb, &sp.local_lb] {
            if let Some(p) = lb.slot_ptr(h) {
                prefetch(p);
            }
        }
    }

    /// Seventh pass: the conntrack bucket of the reply tuple the insert will check, for the
    /// cluster-wide backend Maglev picks, both unmasqueraded and (when the node has an
    /// IPv4 address) with the first SNAT port the allocation tries. A guess for flows
    /// ClientIP affinity or a Local policy send elsewhere; a hint either way.
    #[inline]
    pub(super) fn prefetch_reply(
        &self,
        services: &ServiceTable,
        ct: &Conntrack,
        masquerade: Option<IpAddr>,
        (snat_lo, snat_span): (u16, u16),
    ) {
        let (Some(sp), Some(h)) = (self.service_port(services), self.lb_hash) else {
            return;
        };
        let Some(b) = sp
            .cluster_lb
            .lookup(h)
            .and_then(|i| sp.endpoints.get(usize::from(i)))
        else {
            return;
        };
        let IpAddr::V4(backend) = b.addr else {
            return;
        };
        let t = &self.tuple;
        let mut reply = Tuple {
            src: u32::from(backend),
            dst: t.src,
            sport: b.port,
            dport: t.sport,
            proto: t.proto,
        };
        ct.prefetch_v4(ct.hash_v4(&reply));
        if let Some(IpAddr::V4(node)) = masquerade {
            reply.dst = u32::from(node);
            reply.dport = super::snat_first_port(h, snat_lo, snat_span);
            ct.prefetch_v4(ct.hash_v4(&reply));
        }
    }
}

/// The checks the general parser makes of such a frame, all of which must pass for the
/// fast path to take it: the IPv4 total length fits the frame, the header checksum is
/// right, the transport header is whole (TCP data offset, UDP length). Returns the layout
/// and the TCP flags (0 for UDP).
#[inline]
fn validate(frame: &[u8], p: u8) -> Option<(Layout, u8)> {
    let total = usize::from(u16::from_be_bytes([
        *frame.get(L3 + 2)?,
        *frame.get(L3 + 3)?,
    ]));
    let end = L3 + total;
    if total < ipv4::MIN_HEADER_LEN || end > frame.len() {
        return None;
    }
    if !crate::checksum::header_checksum_ok(frame.get(L3..L4)?) {
        return None;
    }
    let l4 = frame.get(L4..end)?;
    let flags = if p == proto::TCP {
        let data_offset = usize::from(*l4.get(12)? >> 4) * 4;
        if l4.len() < 20 || data_offset < 20 || data_offset > l4.len() {
            return None;
        }
        l4[13]
    } else {
        let len = usize::from(u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]));
        if l4.len() < 8 || len < 8 || len > l4.len() {
            return None;
        }
        0
    };
    let layout = Layout {
        l3: L3,
        l4: L4,
        end,
        ip_version: 4,
        proto: p,
    };
    Some((layout, flags))
}

fn ip(a: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

impl Worker {
    /// Runs a frame through the fast path if it takes it (see the module doc); `None`
    /// leaves the frame untouched for the general path. `hash` is the conntrack hash of
    /// the frame's [`peek_v4`] tuple when the caller has it already.
    #[inline]
    pub(super) fn classify_v4(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
        peeked: Option<&Peeked>,
    ) -> Option<Verdict> {
        // The new-flow hints (frontend, load-balancing hash) are read from `peeked` only
        // on a miss: established frames do not pay for copying them.
        let (tuple, hash, candidate) = match peeked {
            Some(p) => (p.tuple, p.hash, p.candidate),
            None => {
                let tuple = peek_v4(frame)?;
                (tuple, self.conntrack.hash_v4(&tuple), None)
            }
        };
        let (layout, flags) = validate(frame, tuple.proto)?;
        let Some(hit) = self.conntrack.lookup_v4(&tuple, hash, candidate, now_ns) else {
            let key = FlowKey {
                src: ip(tuple.src),
                dst: ip(tuple.dst),
                sport: tuple.sport,
                dport: tuple.dport,
                proto: if tuple.proto == proto::TCP {
                    L4Proto::Tcp
                } else {
                    L4Proto::Udp
                },
            };
            let (frontend, lb_hash) = peeked.map_or((None, None), |p| (p.frontend, p.lb_hash));
            let fe = frontend.unwrap_or_else(|| {
                let h = frontend_hash_v4(tuple.dst, tuple.proto, tuple.dport);
                t.services
                    .frontend_v4(h, tuple.dst, tuple.proto, tuple.dport)
            });
            return Some(self.untracked_to(
                t, frame, layout, key, flags, fe, lb_hash, ingress, now_ns, scratch,
            ));
        };
        let out = hit.out;
        // As `prepare_forward`: the route, then the TTL, before anything is written.
        let Some(hop) = t.node.next_hop_v4(out.dst) else {
            return Some(Verdict::Drop(DropReason::NoRoute));
        };
        if frame.get(L3 + ipv4::TTL).is_none_or(|&ttl| ttl <= 1) {
            return Some(self.time_exceeded(t, frame, layout, ingress, now_ns, scratch));
        }
        self.conntrack.on_packet_v4(&hit, flags);
        FrameMut::new(frame, layout).forward_v4((out.src, out.sport), (out.dst, out.dport));
        let reason = match hit.dir {
            Direction::Original => ForwardReason::Established,
            Direction::Reply => ForwardReason::Reply,
        };
        Some(finish_frame(frame, layout, hop, reason))
    }
}
