//! What the pipeline decides for a frame, why, and the per-worker counters of both.
//!
//! Every drop and pass path has a named reason; a worker counts each frame under exactly
//! one [`Outcome`] and, for drops and passes, one reason. Counters are plain `u64`s owned
//! by the worker (no atomics on the hot path); exporters sum the workers' copies.

use crate::tables::IfaceId;

macro_rules! reasons {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)* }
        impl $name {
            /// Every reason, in counter order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// The snake_case name used in reports and metrics.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }
    };
}

reasons! {
    /// Why a frame was dropped.
    DropReason {
        /// Shorter than the headers it claims (Ethernet, IP or transport).
        Truncated => "truncated",
        /// IP version field does not match the EtherType.
        BadIpVersion => "bad_ip_version",
        /// IPv4 IHL below 5 or beyond the frame.
        BadIhl => "bad_ihl",
        /// IP total length / payload length disagrees with the frame.
        BadIpLength => "bad_ip_length",
        /// IPv4 header checksum does not verify.
        BadIpChecksum => "bad_ip_checksum",
        /// IPv6 extension header chain that does not parse.
        BadIpv6Extension => "bad_ipv6_extension",
        /// TCP data offset or UDP length that does not fit.
        BadL4Header => "bad_l4_header",
        /// A fragment addressed to a service frontend (kxp does not reassemble).
        Fragment => "fragment_to_service",
        /// TTL or hop limit would expire here, and no ICMP time exceeded could be sent
        /// (the frame is an ICMP error itself, or its sender is not a single host).
        TtlExceeded => "ttl_exceeded",
        /// Address inside a service CIDR that no service owns.
        UnallocatedServiceIp => "unallocated_service_ip",
        /// Source not in the service's loadBalancerSourceRanges.
        SourceRangeDenied => "source_range_denied",
        /// Traffic policy Local and no local endpoint.
        NoLocalEndpoints => "no_local_endpoints",
        /// No neighbour or route for the next hop.
        NoRoute => "no_route",
        /// Conntrack full of flows it may not evict.
        ConntrackFull => "conntrack_full",
        /// Every masquerade port probed for this backend was taken.
        SnatPortsExhausted => "snat_ports_exhausted",
        /// The reply tuple of a new flow already belongs to another flow.
        ReplyTupleClash => "reply_tuple_clash",
        /// No node address of the frame's family to masquerade to.
        NoMasqueradeAddress => "no_masquerade_address",
        /// A reject was due but the frame cannot be quoted or answered.
        RejectNotPossible => "reject_not_possible",
        /// A backend of the other IP family than the client (a table bug; counted, not NATed).
        FamilyMismatch => "family_mismatch",
        /// An ICMP error was due (time exceeded) but the worker's ICMP error budget
        /// ([`crate::pipeline::WorkerConfig::icmp_errors_per_sec`]) was spent.
        IcmpRateLimited => "icmp_rate_limited",
    }
}

reasons! {
    /// Why a frame went to the kernel untouched.
    PassReason {
        /// Not IP (ARP, LLDP, ...).
        NotIp => "not_ip",
        /// IP traffic that is not addressed to a service and matches no tracked flow.
        NotService => "not_service",
        /// ICMP that is not an error about a tracked flow (echo, errors for the node).
        IcmpNotTracked => "icmp_not_tracked",
        /// A transport kxp does not balance (e.g. GRE), not to a service.
        OtherProtocol => "other_protocol",
        /// A fragment not addressed to a service.
        Fragment => "fragment",
        /// Stacked VLAN tags, not parsed further.
        StackedVlan => "stacked_vlan",
    }
}

/// Why a frame was answered with an ICMP error instead of being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The service has no usable endpoint (port unreachable, as kube-proxy's REJECT).
    NoEndpoints,
    /// A ClusterIP on a port the service does not expose (port unreachable).
    UnknownPort,
    /// The TTL or hop limit would expire on the way through this node: ICMP time
    /// exceeded from the node's address, as the kernel's forwarding path sends it.
    TtlExceeded,
}

impl RejectReason {
    pub const ALL: &'static [RejectReason] =
        &[Self::NoEndpoints, Self::UnknownPort, Self::TtlExceeded];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoEndpoints => "no_endpoints",
            Self::UnknownPort => "unknown_port",
            Self::TtlExceeded => "ttl_exceeded",
        }
    }
}

/// Why a frame was forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardReason {
    /// First packet of a flow to a service: a backend was chosen.
    NewFlow,
    /// Original direction of a tracked flow.
    Established,
    /// Reply direction of a tracked flow (reverse NAT).
    Reply,
    /// An ICMP error about a tracked flow, translated.
    IcmpRelated,
    /// A TCP packet to a service with no flow and no SYN, forwarded without tracking
    /// (RST to a forgotten flow).
    Untracked,
}

impl ForwardReason {
    pub const ALL: &'static [ForwardReason] = &[
        Self::NewFlow,
        Self::Established,
        Self::Reply,
        Self::IcmpRelated,
        Self::Untracked,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewFlow => "new_flow",
            Self::Established => "established",
            Self::Reply => "reply",
            Self::IcmpRelated => "icmp_related",
            Self::Untracked => "untracked",
        }
    }
}

/// The pipeline's decision for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the frame, rewritten in place, out of `iface`. `start` is where the frame now
    /// begins in the buffer (4 when an 802.1Q tag was removed), `len` its length.
    Forward {
        iface: IfaceId,
        start: usize,
        len: usize,
        reason: ForwardReason,
    },
    /// Hand the frame to the kernel untouched.
    Pass(PassReason),
    /// Drop the frame.
    Drop(DropReason),
    /// Drop the frame and send the `len`-byte answer written to the scratch buffer out of
    /// `iface` (ICMP port unreachable, as kube-proxy's REJECT rules answer).
    Reject {
        iface: IfaceId,
        len: usize,
        reason: RejectReason,
    },
}

impl Verdict {
    pub fn kind_str(&self) -> &'static str {
        match self {
            Self::Forward { .. } => "forward",
            Self::Pass(_) => "pass",
            Self::Drop(_) => "drop",
            Self::Reject { .. } => "reject",
        }
    }

    pub fn reason_str(&self) -> &'static str {
        match self {
            Self::Forward { reason, .. } => reason.as_str(),
            Self::Pass(r) => r.as_str(),
            Self::Drop(r) => r.as_str(),
            Self::Reject { reason, .. } => reason.as_str(),
        }
    }
}

/// Per-worker counters, one per verdict reason. Plain integers: only the owning worker
/// writes them; exporters read copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub frames: u64,
    pub forwarded: [u64; 5],
    pub passed: [u64; 6],
    pub dropped: [u64; 20],
    pub rejected: [u64; 3],
    /// IPv4 frames with options (handled, counted for visibility).
    pub ipv4_options: u64,
    /// Frames that carried one 802.1Q tag.
    pub vlan_tagged: u64,
    /// ClientIP affinity entries that could not be recorded (table full).
    pub affinity_full: u64,
    /// Flows purged because a new table generation no longer backs them.
    pub purged_flows: u64,
    /// Masquerade ports probed (looked up in conntrack) for new flows: the work a full
    /// SNAT port space costs (see [`crate::pipeline::WorkerConfig::snat_exhausted_probe_limit`]).
    pub snat_probes: u64,
}

impl Counters {
    #[inline]
    pub fn count(&mut self, v: &Verdict) {
        self.frames += 1;
        match v {
            Verdict::Forward { reason, .. } => self.forwarded[*reason as usize] += 1,
            Verdict::Pass(r) => self.passed[*r as usize] += 1,
            Verdict::Drop(r) => self.dropped[*r as usize] += 1,
            Verdict::Reject { reason, .. } => self.rejected[*reason as usize] += 1,
        }
    }

    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped[r as usize]
    }
    pub fn passed(&self, r: PassReason) -> u64 {
        self.passed[r as usize]
    }
    pub fn forwarded(&self, r: ForwardReason) -> u64 {
        self.forwarded[r as usize]
    }
    pub fn rejected(&self, r: RejectReason) -> u64 {
        self.rejected[r as usize]
    }

    /// Adds another worker's counters into these.
    pub fn merge(&mut self, o: &Counters) {
        self.frames += o.frames;
        for (a, b) in self.forwarded.iter_mut().zip(o.forwarded) {
            *a += b;
        }
        for (a, b) in self.passed.iter_mut().zip(o.passed) {
            *a += b;
        }
        for (a, b) in self.dropped.iter_mut().zip(o.dropped) {
            *a += b;
        }
        for (a, b) in self.rejected.iter_mut().zip(o.rejected) {
            *a += b;
        }
        self.ipv4_options += o.ipv4_options;
        self.vlan_tagged += o.vlan_tagged;
        self.affinity_full += o.affinity_full;
        self.purged_flows += o.purged_flows;
        self.snat_probes += o.snat_probes;
    }

    /// (name, value) for every counter, for metrics and reports.
    pub fn named(&self) -> Vec<(String, u64)> {
        let mut v = vec![("frames".to_string(), self.frames)];
        v.extend(
            ForwardReason::ALL
                .iter()
                .map(|r| (format!("forward_{}", r.as_str()), self.forwarded(*r))),
        );
        v.extend(
            PassReason::ALL
                .iter()
                .map(|r| (format!("pass_{}", r.as_str()), self.passed(*r))),
        );
        v.extend(
            DropReason::ALL
                .iter()
                .map(|r| (format!("drop_{}", r.as_str()), self.dropped(*r))),
        );
        v.extend(
            RejectReason::ALL
                .iter()
                .map(|r| (format!("reject_{}", r.as_str()), self.rejected(*r))),
        );
        v.push(("ipv4_options".into(), self.ipv4_options));
        v.push(("vlan_tagged".into(), self.vlan_tagged));
        v.push(("affinity_full".into(), self.affinity_full));
        v.push(("purged_flows".into(), self.purged_flows));
        v.push(("snat_probes".into(), self.snat_probes));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_arrays_fit_every_reason() {
        let c = Counters::default();
        assert_eq!(c.forwarded.len(), ForwardReason::ALL.len());
        assert_eq!(c.passed.len(), PassReason::ALL.len());
        assert_eq!(c.dropped.len(), DropReason::ALL.len());
        assert_eq!(c.rejected.len(), RejectReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in PassReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
