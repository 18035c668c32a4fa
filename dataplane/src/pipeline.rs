//! The per-frame pipeline a worker runs: parse -> conntrack -> classify -> choose a backend
//! (ClientIP affinity, then Maglev) -> NAT -> next hop -> verdict.
//!
//! Pure: a frame, the published [`Tables`] and `now` in; the frame rewritten in place and a
//! [`Verdict`] out. One [`Worker`] owns its conntrack table, its affinity table, its SNAT
//! port range and its counters; nothing is shared with other workers, so nothing locks. No
//! allocation happens per frame: tables are pre-sized when the worker is built.

use core::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::conntrack::{Conntrack, ConntrackConfig, Direction, NatBinding, SnatBinding};
use crate::flow::{FlowKey, L4Proto};
use crate::parse::{parse, Parsed, Quoted};
use crate::reject;
use crate::tables::{
    Backend, Frontend, FrontendKey, FrontendKind, IfaceId, IfaceKind, NodeTable, ServicePortId,
    ServiceTable,
};
use crate::verdict::{Counters, DropReason, ForwardReason, PassReason, RejectReason, Verdict};
use crate::wire::{eth, proto, tcp_flags, FrameMut, Layout};

mod fast;

/// Frames a worker takes per batch (and the unit housekeeping is interleaved with).
pub const BATCH_SIZE: usize = 64;

/// One published generation: what the workers read.
#[derive(Debug, Clone)]
pub struct Tables {
    pub services: Arc<ServiceTable>,
    pub node: Arc<NodeTable>,
}

/// How a worker is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's index among `worker_count`; it owns the `index`-th share of the SNAT
    /// port range so that replies can be steered back to it by destination port.
    pub index: u16,
    pub worker_count: u16,
    /// Masquerade source ports, inclusive, shared out among the workers.
    pub snat_ports: (u16, u16),
    /// Ports probed for a free masquerade tuple before the flow is dropped (fail fast).
    pub snat_probe_limit: u16,
    /// After a probe run for a (backend, masquerade address) found no free port, new flows
    /// to that backend probe at most this many ports for the next
    /// [`snat_exhausted_backoff_ms`](Self::snat_exhausted_backoff_ms): a full port space
    /// then costs a few lookups per packet, not `snat_probe_limit` of them, while flows
    /// still get the ports that free up.
    pub snat_exhausted_probe_limit: u16,
    pub snat_exhausted_backoff_ms: u32,
    /// kube-proxy's masqueradeAll.
    pub masquerade_all: bool,
    pub conntrack: ConntrackConfig,
    /// ClientIP affinity entries kept per worker.
    pub affinity_capacity: usize,
    /// Conntrack slots examined by each housekeeping pass.
    pub gc_budget: usize,
    /// ICMP errors (time exceeded) this worker may generate per second, in bursts of up
    /// to a twentieth of that; past it the frames are dropped as `icmp_rate_limited`. The
    /// kernel's equivalent is `net.ipv4.icmp_msgs_per_sec` (1000). Port unreachable for
    /// rejected services is not limited (kube-proxy's REJECT rules are not either).
    pub icmp_errors_per_sec: u32,
    /// Take untagged IPv4 TCP/UDP frames through the fast path (`pipeline/fast.rs`). The
    /// result is the same either way; off is for comparing the two.
    pub fast_path: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            index: 0,
            worker_count: 1,
            snat_ports: (32768, 60999),
            snat_probe_limit: 64,
            snat_exhausted_probe_limit: 4,
            snat_exhausted_backoff_ms: 100,
            masquerade_all: false,
            conntrack: ConntrackConfig::default(),
            affinity_capacity: 65536,
            gc_budget: 256,
            icmp_errors_per_sec: 1000,
            fast_path: true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct AffinityEntry {
    backend: IpAddr,
    port: u16,
    expires_s: u64,
}

/// A worker's state: everything one poll loop owns.
#[derive(Debug)]
pub struct Worker {
    cfg: WorkerConfig,
    pub conntrack: Conntrack,
    affinity: HashMap<(IpAddr, ServicePortId), AffinityEntry>,
    pub counters: Counters,
    snat_lo: u16,
    snat_span: u16,
    /// Where the purge after a table change has got to; `None` when there is none.
    revalidate_cursor: Option<usize>,
    /// Masquerade targets whose port space was found full, until when (ns): see
    /// [`WorkerConfig::snat_exhausted_probe_limit`]. Bounded; cleared when full.
    snat_exhausted: HashMap<SnatTarget, u64>,
    /// ICMP error budget: tokens left, and when they were last topped up.
    icmp_tokens: u32,
    icmp_refilled_ns: u64,
}

impl Worker {
    pub fn new(cfg: WorkerConfig) -> Self {
        let (lo, hi) = cfg.snat_ports;
        let count = cfg.worker_count.max(1) as u32;
        let span = ((hi.saturating_sub(lo) as u32 + 1) / count).max(1);
        let snat_lo = (lo as u32 + cfg.index as u32 * span).min(u16::MAX as u32) as u16;
        Self {
            conntrack: Conntrack::new(cfg.conntrack.clone()),
            affinity: HashMap::with_capacity(cfg.affinity_capacity),
            counters: Counters::default(),
            snat_lo,
            snat_span: span.min(u16::MAX as u32) as u16,
            revalidate_cursor: None,
            snat_exhausted: HashMap::with_capacity(SNAT_EXHAUSTED_CAPACITY),
            icmp_tokens: icmp_burst(cfg.icmp_errors_per_sec),
            icmp_refilled_ns: 0,
            cfg,
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// This worker's masquerade ports, inclusive.
    pub fn snat_port_range(&self) -> (u16, u16) {
        (self.snat_lo, self.snat_lo + (self.snat_span - 1))
    }

    /// Runs one frame through the pipeline. `frame` is rewritten in place for forwarded
    /// frames; a reject's answer is written to `scratch` (at least
    /// [`reject::REJECT_SCRATCH_LEN`] bytes).
    #[inline]
    pub fn process(
        &mut self,
        tables: &Tables,
        frame: &mut [u8],
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        self.process_peeked(tables, frame, ingress, now_ns, scratch, None)
    }

    /// [`Worker::process`] with the fast path's tuple and hash already known (from the
    /// prefetch pass of [`Worker::process_batch`]).
    #[inline(always)]
    fn process_peeked(
        &mut self,
        tables: &Tables,
        frame: &mut [u8],
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
        peeked: Option<&fast::Peeked>,
    ) -> Verdict {
        let fast = if self.cfg.fast_path {
            self.classify_v4(tables, frame, ingress, now_ns, scratch, peeked)
        } else {
            None
        };
        let v = match fast {
            Some(v) => v,
            None => self.classify(tables, frame, ingress, now_ns, scratch),
        };
        self.counters.count(&v);
        v
    }

    /// Runs a batch of frames through the pipeline: exactly what calling
    /// [`Worker::process`] on each frame in turn does (rewrites, verdicts, counters,
    /// conntrack), plus prefetching. Before the frames are processed, the flow tuples of
    /// the whole batch (up to [`BATCH_SIZE`] at a time) are read, their conntrack index
    /// buckets prefetched, then the flow entries those buckets point to, so the batch's
    /// cache misses overlap instead of each frame waiting for its own.
    ///
    /// Frame `i` comes in on `ingress[i]` (frames beyond `ingress.len()` are left alone).
    /// `done(i, frame, verdict, scratch)` is called for each frame, in order, right after
    /// it is processed; for [`Verdict::Reject`] the answer is `scratch[..len]`, valid until
    /// the next frame is processed. `scratch` is as for [`Worker::process`].
    pub fn process_batch(
        &mut self,
        tables: &Tables,
        frames: &mut [&mut [u8]],
        ingress: &[IfaceId],
        now_ns: u64,
        scratch: &mut [u8],
        mut done: impl FnMut(usize, &mut [u8], Verdict, &[u8]),
    ) {
        let n = frames.len().min(ingress.len());
        let mut start = 0;
        while start < n {
            let end = n.min(start + BATCH_SIZE);
            let batch = frames.get_mut(start..end).unwrap_or_default();
            let mut peeked = [None; BATCH_SIZE];
            self.prefetch_flows(tables, batch, now_ns, &mut peeked);
            for (k, (frame, &iface)) in batch.iter_mut().zip(&ingress[start..end]).enumerate() {
                let v =
                    self.process_peeked(tables, frame, iface, now_ns, scratch, peeked[k].as_ref());
                done(start + k, frame, v, scratch);
            }
            start = end;
        }
    }

    /// The prefetch passes of [`Worker::process_batch`] (hints only: no state changes).
    /// Every frame's conntrack index bucket, then the flow entries they point to. For
    /// fast-path frames the index shows certainly untracked (new flows), the chain the
    /// new-flow path walks is started too, one link per pass over the batch so that the
    /// batch's cache misses overlap: the frontend slot, the service-port table entry, the
    /// service port, its Maglev tables and endpoints, the Maglev slot, the reply tuple's
    /// conntrack bucket; and when the conntrack table is full, the flows its inserts will
    /// evict: their slab entries, then the index buckets their removal unlinks. What the
    /// passes learn (tuple, hashes, frontend) is kept in `peeked` for the frames'
    /// processing.
    #[inline]
    fn prefetch_flows(
        &self,
        t: &Tables,
        frames: &[&mut [u8]],
        now_ns: u64,
        peeked: &mut [Option<fast::Peeked>; BATCH_SIZE],
    ) {
        let n = frames.len().min(BATCH_SIZE);
        let mut hashes = [None; BATCH_SIZE];
        for ((h, p), frame) in hashes.iter_mut().zip(peeked.iter_mut()).zip(frames) {
            if self.cfg.fast_path {
                if let Some(pk) = fast::Peeked::new(frame, &self.conntrack) {
                    *h = Some(self.conntrack.prefetch_v4(pk.hash));
                    *p = Some(pk);
                    continue;
                }
            }
            *h = crate::parse::peek_key(frame).and_then(|k| self.conntrack.prefetch_bucket(&k));
        }
        let mut new_flows = 0;
        for (h, p) in hashes.iter().zip(peeked.iter_mut()).take(n) {
            if let Some(pk) = p.as_mut() {
                pk.prefetch_flow(&self.conntrack, &t.services);
                new_flows += usize::from(pk.is_new());
            } else if let Some(h) = h {
                self.conntrack.prefetch_flow(*h);
            }
        }
        if new_flows == 0 {
            return;
        }
        self.conntrack.prefetch_victims_v4(new_flows);
        for pk in peeked.iter_mut().take(n).flatten() {
            pk.find_frontend(&t.services);
        }
        for pk in peeked.iter().take(n).flatten() {
            pk.prefetch_service_port(&t.services);
        }
        for pk in peeked.iter().take(n).flatten() {
            pk.prefetch_lb(&t.services);
        }
        self.conntrack.prefetch_victim_buckets_v4(new_flows, now_ns);
        for pk in peeked.iter_mut().take(n).flatten() {
            pk.prefetch_slot(&t.services);
        }
        let masquerade = t
            .node
            .masquerade_address(&IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED));
        for pk in peeked.iter().take(n).flatten() {
            pk.prefetch_reply(
                &t.services,
                &self.conntrack,
                masquerade.map(|(_, a)| a),
                (self.snat_lo, self.snat_span),
            );
        }
    }

    /// Work between batches: bounded conntrack and affinity expiry.
    pub fn housekeeping(&mut self, now_ns: u64) {
        self.conntrack.gc(now_ns, self.cfg.gc_budget);
        if self.affinity.len() * 2 > self.cfg.affinity_capacity {
            let now_s = now_ns / 1_000_000_000;
            self.affinity.retain(|_, e| e.expires_s > now_s);
        }
    }

    /// A new table generation was picked up: flows whose service or endpoint is gone get
    /// purged, a bounded slice per call to [`Worker::revalidate_step`].
    pub fn tables_changed(&mut self) {
        self.revalidate_cursor = Some(0);
    }

    /// Continues purging flows the current tables no longer back (their frontend is gone,
    /// or their backend is no longer an endpoint of it; terminating endpoints are still
    /// endpoints, so their flows keep working until the endpoint leaves). UDP flows
    /// included: no stale entry keeps blackholing a removed endpoint's traffic. Returns
    /// true while there is more to do.
    pub fn revalidate_step(&mut self, tables: &Tables) -> bool {
        let Some(cursor) = self.revalidate_cursor else {
            return false;
        };
        let budget = self.cfg.gc_budget.max(1) * 4;
        let (removed, next) = self
            .conntrack
            .purge_step(cursor, budget, |m| flow_still_backed(tables, m));
        self.counters.purged_flows += removed as u64;
        self.revalidate_cursor = next;
        next.is_some()
    }

    fn classify(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        let parsed = match parse(frame) {
            Ok(p) => p,
            Err(reason) => return Verdict::Drop(reason),
        };
        match parsed {
            Parsed::NotIp => Verdict::Pass(PassReason::NotIp),
            Parsed::StackedVlan => Verdict::Pass(PassReason::StackedVlan),
            Parsed::Fragment { dst, .. } => {
                if t.services.is_vip(&dst) {
                    Verdict::Drop(DropReason::Fragment)
                } else {
                    Verdict::Pass(PassReason::Fragment)
                }
            }
            Parsed::OtherIp { layout, .. } => {
                self.note_layout(&layout);
                if layout.proto == proto::ICMP || layout.proto == proto::ICMPV6 {
                    Verdict::Pass(PassReason::IcmpNotTracked)
                } else {
                    Verdict::Pass(PassReason::OtherProtocol)
                }
            }
            Parsed::Transport {
                layout,
                key,
                tcp_flags,
            } => {
                self.note_layout(&layout);
                self.transport(t, frame, layout, key, tcp_flags, ingress, now_ns, scratch)
            }
            Parsed::IcmpError { layout, inner } => {
                self.note_layout(&layout);
                self.icmp_error(t, frame, layout, inner, now_ns)
            }
        }
    }

    #[inline]
    fn note_layout(&mut self, layout: &Layout) {
        if layout.l3 != eth::HEADER_LEN {
            self.counters.vlan_tagged += 1;
        }
        if layout.is_ipv4() && layout.l4 - layout.l3 > 20 {
            self.counters.ipv4_options += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn transport(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        key: FlowKey,
        flags: u8,
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        if let Some(m) = self.conntrack.lookup(&key, now_ns) {
            let (src, sport, dst, dport, reason) = match m.dir {
                Direction::Original => {
                    let (s, sp) = m
                        .nat
                        .snat
                        .map_or((key.src, key.sport), |s| (s.addr, s.port));
                    (
                        s,
                        sp,
                        m.nat.backend,
                        m.nat.backend_port,
                        ForwardReason::Established,
                    )
                }
                Direction::Reply => (
                    m.orig.dst,
                    m.orig.dport,
                    m.orig.src,
                    m.orig.sport,
                    ForwardReason::Reply,
                ),
            };
            let hop = match prepare_forward(&t.node, frame, &layout, dst) {
                Ok(h) => h,
                Err(DropReason::TtlExceeded) => {
                    return self.time_exceeded(t, frame, layout, ingress, now_ns, scratch)
                }
                Err(r) => return Verdict::Drop(r),
            };
            self.conntrack.on_packet(m.id, m.dir, flags, now_ns);
            return finish_forward(frame, layout, hop, (src, sport), (dst, dport), reason);
        }
        self.untracked(t, frame, layout, key, flags, ingress, now_ns, scratch)
    }

    /// A transport frame conntrack does not know: a new flow to a frontend, a reject, or
    /// not ours.
    #[allow(clippy::too_many_arguments)]
    fn untracked(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        key: FlowKey,
        flags: u8,
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        let fk = FrontendKey {
            addr: key.dst,
            proto: key.proto,
            port: key.dport,
        };
        let fe = t.services.frontend(&fk);
        self.untracked_to(
            t, frame, layout, key, flags, fe, None, ingress, now_ns, scratch,
        )
    }

    /// [`Worker::untracked`] once the frame's frontend (if any) is known; `lb_hash` is
    /// `key.lb_hash()` if the caller has it already.
    #[allow(clippy::too_many_arguments)]
    fn untracked_to(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        key: FlowKey,
        flags: u8,
        fe: Option<Frontend>,
        lb_hash: Option<u64>,
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        match fe {
            Some(fe) => self.new_flow(
                t, frame, layout, key, flags, fe, lb_hash, ingress, now_ns, scratch,
            ),
            None if t.services.is_cluster_ip(&key.dst) => self.reject(
                t,
                frame,
                layout,
                ingress,
                RejectReason::UnknownPort,
                scratch,
            ),
            None if t.node.in_service_cidr(&key.dst) => {
                Verdict::Drop(DropReason::UnallocatedServiceIp)
            }
            None => Verdict::Pass(PassReason::NotService),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_flow(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        key: FlowKey,
        flags: u8,
        fe: Frontend,
        lb_hash: Option<u64>,
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        let sp = t.services.service_port(fe.service_port);
        let node = &*t.node;
        if fe.kind == FrontendKind::LoadBalancer
            && !sp.policy.source_ranges.is_empty()
            && !sp.policy.source_ranges.iter().any(|r| r.contains(&key.src))
        {
            return Verdict::Drop(DropReason::SourceRangeDenied);
        }
        let src_in_cluster = node.in_cluster(&key.src);
        // kube-proxy detects local (pod) traffic per IP family: without a cluster CIDR of the
        // frame's family it does not masquerade off-cluster ClusterIP traffic.
        let detect_local = node
            .cluster_cidrs
            .iter()
            .any(|c| c.addr().is_ipv4() == key.src.is_ipv4());
        let src_is_node =
            node.is_node_address(&key.src) || node.interface(ingress).kind == IfaceKind::Host;
        // Which endpoints, by kube-proxy's rules: external traffic under policy Local goes
        // to local endpoints only, except from pods and the node itself, which take the
        // cluster-wide set; internalTrafficPolicy Local narrows ClusterIP traffic.
        let local_only = if fe.kind.is_external() {
            sp.policy.external_local && !src_in_cluster && !src_is_node
        } else {
            sp.policy.internal_local
        };
        let lb = if local_only {
            &sp.local_lb
        } else {
            &sp.cluster_lb
        };
        if lb.is_empty() {
            return if sp.cluster_lb.is_empty() {
                self.reject(
                    t,
                    frame,
                    layout,
                    ingress,
                    RejectReason::NoEndpoints,
                    scratch,
                )
            } else {
                Verdict::Drop(DropReason::NoLocalEndpoints)
            };
        }
        // The flow's load-balancing hash, computed at most once (Maglev and the SNAT port
        // probe both start from it).
        let mut lb_hash = lb_hash;
        let backend = match self.sticky_backend(
            sp.policy.affinity_timeout_secs,
            &key,
            fe,
            sp,
            local_only,
            now_ns,
        ) {
            Some(b) => b,
            None => {
                let Some(i) = lb.lookup(*lb_hash.get_or_insert_with(|| key.lb_hash())) else {
                    return Verdict::Drop(DropReason::NoLocalEndpoints);
                };
                let Some(b) = sp.endpoints.get(i as usize) else {
                    return Verdict::Drop(DropReason::NoLocalEndpoints);
                };
                (b.addr, b.port)
            }
        };
        // masqueradeAll, like kube-proxy's, covers traffic to ClusterIPs (external traffic
        // under eTP Cluster is masqueraded anyway; under eTP Local it keeps its source).
        let masquerade = backend.0 == key.src
            || match fe.kind {
                FrontendKind::ClusterIp => {
                    self.cfg.masquerade_all || (detect_local && !src_in_cluster)
                }
                _ => !sp.policy.external_local || src_is_node,
            };
        // A hint, nothing more: start loading the conntrack index bucket of the reply
        // tuple (checked and filled by the insert below, and with masquerade first probed
        // for the SNAT port) while the next hop is looked up.
        let reply_dst = if masquerade {
            node.masquerade_address(&key.src).map(|(_, addr)| {
                let h = *lb_hash.get_or_insert_with(|| key.lb_hash());
                (addr, snat_first_port(h, self.snat_lo, self.snat_span))
            })
        } else {
            Some((key.src, key.sport))
        };
        if let Some((dst, dport)) = reply_dst {
            let _ = self.conntrack.prefetch_bucket(&FlowKey {
                src: backend.0,
                dst,
                sport: backend.1,
                dport,
                proto: key.proto,
            });
        }
        let hop = match prepare_forward(node, frame, &layout, backend.0) {
            Ok(h) => h,
            Err(DropReason::TtlExceeded) => {
                return self.time_exceeded(t, frame, layout, ingress, now_ns, scratch)
            }
            Err(r) => return Verdict::Drop(r),
        };
        let is_tcp = key.proto == L4Proto::Tcp;
        let track = !(is_tcp && flags & tcp_flags::RST != 0 && flags & tcp_flags::SYN == 0);
        let snat = if masquerade {
            let Some((_, addr)) = node.masquerade_address(&key.src) else {
                return Verdict::Drop(DropReason::NoMasqueradeAddress);
            };
            let lb_hash = lb_hash.unwrap_or_else(|| key.lb_hash());
            match self.allocate_snat_port(&key, lb_hash, addr, backend, now_ns) {
                Some(port) => Some(SnatBinding { addr, port }),
                None => return Verdict::Drop(DropReason::SnatPortsExhausted),
            }
        } else {
            None
        };
        let reason = if track {
            let nat = NatBinding {
                backend: backend.0,
                backend_port: backend.1,
                snat,
                service_port: fe.service_port,
            };
            match self
                .conntrack
                .insert(&key, nat, if is_tcp { flags } else { 0 }, now_ns)
            {
                Ok(_) => {}
                Err(crate::conntrack::InsertError::Full) => {
                    return Verdict::Drop(DropReason::ConntrackFull)
                }
                Err(crate::conntrack::InsertError::Exists) => {
                    return Verdict::Drop(DropReason::ReplyTupleClash)
                }
                Err(crate::conntrack::InsertError::AddressFamily) => {
                    return Verdict::Drop(DropReason::FamilyMismatch)
                }
            }
            if sp.policy.affinity_timeout_secs > 0 {
                self.remember_affinity(
                    &key,
                    fe.service_port,
                    backend,
                    sp.policy.affinity_timeout_secs,
                    now_ns,
                );
            }
            ForwardReason::NewFlow
        } else {
            ForwardReason::Untracked
        };
        let src = snat.map_or((key.src, key.sport), |s| (s.addr, s.port));
        finish_forward(frame, layout, hop, src, backend, reason)
    }

    /// The backend ClientIP affinity pins this client to, if it is still usable.
    fn sticky_backend(
        &mut self,
        timeout_secs: u32,
        key: &FlowKey,
        fe: Frontend,
        sp: &crate::tables::ServicePort,
        local_only: bool,
        now_ns: u64,
    ) -> Option<(IpAddr, u16)> {
        if timeout_secs == 0 {
            return None;
        }
        let e = self.affinity.get(&(key.src, fe.service_port))?;
        if e.expires_s <= now_ns / 1_000_000_000 {
            return None;
        }
        let b: &Backend = sp
            .endpoints
            .iter()
            .find(|b| b.addr == e.backend && b.port == e.port)?;
        // Only a member of the set this flow draws from (kube-proxy's affinity rules exist
        // only for the endpoints of the chain): the cluster-wide set is the endpoints of
        // weight > 0; the local one, the ready local endpoints, or if there are none the
        // serving and terminating local ones (whatever their cluster-wide weight).
        let usable = if local_only {
            let any_local_ready = sp.endpoints.iter().any(|x| x.local && x.ready);
            b.local
                && if any_local_ready {
                    b.ready
                } else {
                    b.serving && b.terminating
                }
        } else {
            b.weight > 0 && (b.ready || (b.serving && b.terminating))
        };
        usable.then_some((b.addr, b.port))
    }

    fn remember_affinity(
        &mut self,
        key: &FlowKey,
        id: ServicePortId,
        backend: (IpAddr, u16),
        timeout_secs: u32,
        now_ns: u64,
    ) {
        let entry = AffinityEntry {
            backend: backend.0,
            port: backend.1,
            expires_s: now_ns / 1_000_000_000 + timeout_secs as u64,
        };
        let k = (key.src, id);
        if let Some(e) = self.affinity.get_mut(&k) {
            *e = entry;
        } else if self.affinity.len() < self.cfg.affinity_capacity {
            self.affinity.insert(k, entry);
        } else {
            self.counters.affinity_full += 1;
        }
    }

    /// A masquerade port in this worker's share whose reply tuple is free, probing a
    /// bounded number from a start derived from the flow hash; `None` when all probed are
    /// taken (the caller drops and counts: fail fast rather than search).
    /// `lb_hash` is `key.lb_hash()`.
    fn allocate_snat_port(
        &mut self,
        key: &FlowKey,
        lb_hash: u64,
        addr: IpAddr,
        backend: (IpAddr, u16),
        now_ns: u64,
    ) -> Option<u16> {
        let span = self.snat_span as u64;
        let start = (lb_hash >> 20) % span;
        let target = SnatTarget {
            backend: backend.0,
            port: backend.1,
            proto: key.proto,
            snat: addr,
        };
        let limit = match self.snat_exhausted.get(&target) {
            Some(&until) if until > now_ns => self.cfg.snat_exhausted_probe_limit,
            _ => self.cfg.snat_probe_limit,
        };
        let probes = (limit as u64).min(span);
        for i in 0..probes {
            self.counters.snat_probes += 1;
            let port = self.snat_lo + ((start + i) % span) as u16;
            let reply = FlowKey {
                src: backend.0,
                dst: addr,
                sport: backend.1,
                dport: port,
                proto: key.proto,
            };
            if !self.conntrack.reply_tuple_in_use(&reply, now_ns) {
                return Some(port);
            }
        }
        if limit == self.cfg.snat_probe_limit {
            if self.snat_exhausted.len() >= SNAT_EXHAUSTED_CAPACITY {
                // Within the reserved capacity: clearing never allocates.
                self.snat_exhausted.clear();
            }
            let backoff_ns = u64::from(self.cfg.snat_exhausted_backoff_ms) * 1_000_000;
            self.snat_exhausted.insert(target, now_ns + backoff_ns);
        }
        None
    }

    fn reject(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        ingress: IfaceId,
        reason: RejectReason,
        scratch: &mut [u8],
    ) -> Verdict {
        let view = FrameMut::new(frame, layout);
        let mac = t.node.interface(ingress).mac;
        match reject::port_unreachable(&view, mac, scratch) {
            Some(len) => Verdict::Reject {
                iface: ingress,
                len,
                reason,
            },
            None => Verdict::Drop(DropReason::RejectNotPossible),
        }
    }

    /// The TTL or hop limit of a frame kxp would route ran out: ICMP time exceeded from
    /// the node's address of the frame's family back to the sender, within the worker's
    /// ICMP error budget. (An ICMP error about an ICMP error is never sent: those frames
    /// do not come here.)
    fn time_exceeded(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        ingress: IfaceId,
        now_ns: u64,
        scratch: &mut [u8],
    ) -> Verdict {
        let view = FrameMut::new(frame, layout);
        let Some((_, from)) = t.node.masquerade_address(&view.src_addr()) else {
            return Verdict::Drop(DropReason::TtlExceeded);
        };
        if !self.take_icmp_token(now_ns) {
            return Verdict::Drop(DropReason::IcmpRateLimited);
        }
        let mac = t.node.interface(ingress).mac;
        match reject::time_exceeded(&view, mac, from, scratch) {
            Some(len) => Verdict::Reject {
                iface: ingress,
                len,
                reason: RejectReason::TtlExceeded,
            },
            None => Verdict::Drop(DropReason::TtlExceeded),
        }
    }

    /// Token bucket of [`WorkerConfig::icmp_errors_per_sec`].
    fn take_icmp_token(&mut self, now_ns: u64) -> bool {
        let rate = u64::from(self.cfg.icmp_errors_per_sec);
        if rate == 0 {
            return false;
        }
        let elapsed = now_ns.saturating_sub(self.icmp_refilled_ns);
        let earned = elapsed.saturating_mul(rate) / 1_000_000_000;
        if earned > 0 {
            let burst = u64::from(icmp_burst(self.cfg.icmp_errors_per_sec));
            self.icmp_tokens = (u64::from(self.icmp_tokens) + earned).min(burst) as u32;
            // Keep the remainder: refill from when the last whole token was earned.
            self.icmp_refilled_ns += earned * 1_000_000_000 / rate;
            if self.icmp_tokens as u64 == burst {
                self.icmp_refilled_ns = now_ns;
            }
        }
        if self.icmp_tokens == 0 {
            return false;
        }
        self.icmp_tokens -= 1;
        true
    }

    /// An ICMP error quoting a packet of a tracked flow: rewrite the quoted packet and the
    /// outer header as the flow's NAT dictates and send it on towards the flow's other end.
    fn icmp_error(
        &mut self,
        t: &Tables,
        frame: &mut [u8],
        layout: Layout,
        inner: Quoted,
        now_ns: u64,
    ) -> Verdict {
        // The quoted packet travelled the opposite way to this error.
        let Some(m) = self.conntrack.lookup(&inner.key.reversed(), now_ns) else {
            return Verdict::Pass(PassReason::IcmpNotTracked);
        };
        let outer_src = FrameMut::new(frame, layout).src_addr();
        let (q_src, q_dst, outer_dst, new_outer_src) = match m.dir {
            // Quote = a packet we sent to the backend; the error goes back to the client.
            Direction::Reply => {
                let q_src = (m.orig.src, m.orig.sport);
                let q_dst = (m.orig.dst, m.orig.dport);
                let os = if outer_src == m.nat.backend {
                    m.orig.dst
                } else {
                    outer_src
                };
                (q_src, q_dst, m.orig.src, os)
            }
            // Quote = a packet we sent to the client; the error goes to the backend.
            Direction::Original => {
                let q_src = (m.nat.backend, m.nat.backend_port);
                let q_dst = m
                    .nat
                    .snat
                    .map_or((m.orig.src, m.orig.sport), |s| (s.addr, s.port));
                let os = match m.nat.snat {
                    Some(s) if outer_src == m.orig.src => s.addr,
                    _ => outer_src,
                };
                (q_src, q_dst, m.nat.backend, os)
            }
        };
        let hop = match prepare_forward(&t.node, frame, &layout, outer_dst) {
            Ok(h) => h,
            Err(r) => return Verdict::Drop(r),
        };
        {
            let mut q = FrameMut::new(frame, inner.layout);
            q.set_addr(true, q_src.0);
            q.set_addr(false, q_dst.0);
            q.set_port(true, q_src.1);
            q.set_port(false, q_dst.1);
        }
        let mut f = FrameMut::new(frame, layout);
        f.set_addr(true, new_outer_src);
        f.set_addr(false, outer_dst);
        recompute_icmp_checksum(&mut f);
        finish_frame(frame, layout, hop, ForwardReason::IcmpRelated)
    }
}

/// Whether the tables still back a tracked flow: its frontend exists and its backend is
/// still one of that service port's endpoints.
fn flow_still_backed(t: &Tables, m: &crate::conntrack::FlowMatch) -> bool {
    let fk = FrontendKey {
        addr: m.orig.dst,
        proto: m.orig.proto,
        port: m.orig.dport,
    };
    t.services.frontend(&fk).is_some_and(|fe| {
        t.services
            .service_port(fe.service_port)
            .endpoints
            .iter()
            .any(|b| b.addr == m.nat.backend && b.port == m.nat.backend_port)
    })
}

/// Masquerade targets remembered as full, per worker, at most.
const SNAT_EXHAUSTED_CAPACITY: usize = 1024;

/// Where masqueraded flows go: one port space per (backend, protocol, SNAT address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SnatTarget {
    backend: IpAddr,
    port: u16,
    proto: L4Proto,
    snat: IpAddr,
}

/// The first masquerade port [`Worker::allocate_snat_port`] tries for a flow of load
/// balancing hash `lb_hash`, in the port range starting at `snat_lo` of `snat_span` ports.
#[inline]
fn snat_first_port(lb_hash: u64, snat_lo: u16, snat_span: u16) -> u16 {
    let span = u64::from(snat_span.max(1));
    snat_lo.wrapping_add(((lb_hash >> 20) % span) as u16)
}

/// Tokens an ICMP error budget of `per_sec` holds at most.
fn icmp_burst(per_sec: u32) -> u32 {
    (per_sec / 20).max(u32::from(per_sec > 0))
}

/// Next hop and TTL for a frame about to be routed to `dst`; nothing is written yet
/// except the TTL, so a refusal leaves the frame as it came.
#[inline]
fn prepare_forward(
    node: &NodeTable,
    frame: &mut [u8],
    layout: &Layout,
    dst: IpAddr,
) -> Result<crate::tables::NextHop, DropReason> {
    let hop = node.next_hop(&dst).ok_or(DropReason::NoRoute)?;
    if !FrameMut::new(frame, *layout).decrement_ttl() {
        return Err(DropReason::TtlExceeded);
    }
    Ok(hop)
}

#[inline]
fn finish_forward(
    frame: &mut [u8],
    layout: Layout,
    hop: crate::tables::NextHop,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    reason: ForwardReason,
) -> Verdict {
    let mut f = FrameMut::new(frame, layout);
    f.rewrite(src, dst);
    if layout.proto == proto::SCTP {
        f.fix_sctp_checksum();
    }
    finish_frame(frame, layout, hop, reason)
}

/// MACs for the next hop, and the VLAN tag removed unless the frame leaves by an uplink.
#[inline]
fn finish_frame(
    frame: &mut [u8],
    layout: Layout,
    hop: crate::tables::NextHop,
    reason: ForwardReason,
) -> Verdict {
    let mut start = 0;
    if layout.l3 != eth::HEADER_LEN && hop.iface_kind != IfaceKind::Uplink {
        frame.copy_within(0..12, eth::VLAN_TAG_LEN);
        start = eth::VLAN_TAG_LEN;
    }
    frame[start..start + 6].copy_from_slice(&hop.dst_mac);
    frame[start + 6..start + 12].copy_from_slice(&hop.src_mac);
    Verdict::Forward {
        iface: hop.iface,
        start,
        len: layout.end - start,
        reason,
    }
}

fn recompute_icmp_checksum(f: &mut FrameMut<'_>) {
    let l = f.layout;
    f.buf[l.l4 + 2..l.l4 + 4].fill(0);
    let pseudo = if l.is_ipv4() {
        0
    } else {
        let src = crate::wire::addr_bytes(&f.src_addr());
        let dst = crate::wire::addr_bytes(&f.dst_addr());
        crate::checksum::pseudo_header_sum(
            src.as_slice(),
            dst.as_slice(),
            proto::ICMPV6,
            l.l4_len() as u32,
        )
    };
    let c = crate::checksum::checksum(pseudo, &f.buf[l.l4..l.end]);
    f.buf[l.l4 + 2..l.l4 + 4].copy_from_slice(&c.to_be_bytes());
}
