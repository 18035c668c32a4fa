//! Incremental compile: a change to one Service or EndpointSlice recompiles the service
//! ports it concerns and patches the table, instead of compiling every object again.
//!
//! A [`CompileState`] keeps, per Service (by namespace/name), what it compiled to (its
//! service ports, the frontends they claim, its errors), per EndpointSlice what its check
//! gave, and the table they make. [`CompileState::set_service`] and
//! [`CompileState::set_slices`] take the new definitions of one name; a slice names its
//! service by its `kubernetes.io/service-name` label, so a slice change recompiles that
//! service (and the one it named before). [`CompileState::finish`] recompiles what changed
//! and returns the table: service ports whose inputs did not change are the same `Arc`s
//! (with their Maglev tables) as before, and only the changed services' frontends are
//! touched.
//!
//! The result is what [`compile_objects`](super::compile_objects) gives for the same
//! objects (same frontends, endpoints, Maglev tables, errors in the same order, notices
//! and health checks); `control/tests/incremental.rs` checks that over random sequences
//! of changes. Clashes are settled as a full compile settles them: every frontend keeps
//! the list of the service ports that claim it, in compile order (service namespace/name,
//! then the order within the service); the first holds it and the others report a clash
//! naming it. When the holder goes, the next one takes the frontend over, and every
//! claimant's error message is rendered again.
//!
//! Service port ids are dense: a removed service port's id goes to the last one (whose
//! frontends are repointed), so ids are only meaningful within one table generation, as
//! with a full compile.
//!
//! Node changes (name, addresses, zone) and option changes need a new state
//! ([`CompileState::build`]): they change every service.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use core::net::IpAddr;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kxp_dataplane::tables::{
    Frontend, FrontendKey, FrontendKind, NodeTable, ServicePort, ServicePortId, ServiceTable,
};

use super::{
    check_slice, clash_error, compile_service, compile_services_parallel, health_check_clash,
    object_key, parallel_map, push_duplicates, service_groups, CheckedSlice, CompileOptions,
    Compiled, Item, ObjectKey, PreviousPorts, ServiceOutput, SliceInfo,
};
use crate::error::ConfigError;

/// The definitions of one Service name in the input.
#[derive(Debug)]
struct ServiceDefs {
    /// The one compiled (the first in input order).
    first: Arc<Service>,
    /// Further definitions of the same name (each reported as an error).
    duplicates: usize,
}

/// What one Service name compiled to, and where it sits in the table.
#[derive(Debug)]
struct Entry {
    key: Arc<ObjectKey>,
    output: ServiceOutput,
    /// Table ids of `output.ports`, same indexes.
    ids: Vec<ServicePortId>,
    /// The service's errors, clashes included, as a full compile reports them.
    errors: Vec<ConfigError>,
}

/// A claim on a frontend, in compile order: (service, index in its claims).
#[derive(Debug, Clone)]
struct ClaimRef {
    service: Arc<ObjectKey>,
    seq: u32,
    kind: FrontendKind,
    /// Index in the service's ports.
    port: u32,
}

impl ClaimRef {
    fn order(&self) -> (&ObjectKey, u32) {
        (&self.service, self.seq)
    }
}

/// The incremental compiler's state. See the module docs.
#[derive(Debug)]
pub struct CompileState {
    node: NodeTable,
    opts: CompileOptions,
    defs: HashMap<ObjectKey, ServiceDefs>,
    entries: BTreeMap<ObjectKey, Entry>,
    /// Checked EndpointSlices by their namespace/name (several when defined more than
    /// once, in input order).
    slices: BTreeMap<ObjectKey, Vec<CheckedSlice>>,
    /// Service namespace/name -> the slices that name it.
    slices_of: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Every claimed frontend -> its claimants in compile order (the first holds it).
    claims: HashMap<FrontendKey, Vec<ClaimRef>>,
    /// healthCheckNodePort -> the services asking for it (the first gets it).
    hc_claims: BTreeMap<u16, BTreeSet<Arc<ObjectKey>>>,
    /// How many held frontends make an address a ClusterIP, and a service address.
    addr_refs: HashMap<IpAddr, [u32; 2]>,
    /// The service owning each service port id.
    owners: Vec<Arc<ObjectKey>>,
    table: ServiceTable,
    /// Services to recompile at the next [`finish`](Self::finish).
    dirty: BTreeSet<ObjectKey>,
    /// Services whose errors must be rendered again (a clash holder changed).
    stale_errors: HashSet<Arc<ObjectKey>>,
    /// The services and slices with errors or notices: assembling them walks only these
    /// (a walk over every entry costs milliseconds at 30,000 services, in cache misses).
    noisy_services: BTreeSet<ObjectKey>,
    noisy_slices: BTreeSet<ObjectKey>,
    services_with_ports: usize,
    endpoints: usize,
    new_ports: usize,
}

impl CompileState {
    /// An empty state for `node`.
    pub fn new(node: NodeTable, opts: CompileOptions) -> Self {
        Self {
            node,
            opts,
            defs: HashMap::new(),
            entries: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: HashMap::new(),
            claims: HashMap::new(),
            hc_claims: BTreeMap::new(),
            addr_refs: HashMap::new(),
            owners: Vec::new(),
            table: ServiceTable::new(),
            dirty: BTreeSet::new(),
            stale_errors: HashSet::new(),
            noisy_services: BTreeSet::new(),
            noisy_slices: BTreeSet::new(),
            services_with_ports: 0,
            endpoints: 0,
            new_ports: 0,
        }
    }

    /// A state holding `services` and `slices`, compiled (services in parallel, as
    /// [`compile_objects`](super::compile_objects) does). Service ports equal to one of
    /// `previous` (same name, protocol, endpoints and policy) are reused.
    pub fn build(
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: NodeTable,
        opts: CompileOptions,
        previous: Option<&ServiceTable>,
    ) -> Self {
        let mut st = Self::new(node, opts);
        let mut sorted: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
        sorted.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
        let checked = parallel_map(&sorted, |s| check_slice(s, &st.node));
        for (slice, checked) in sorted.into_iter().zip(checked) {
            let key = owned_key(&slice.metadata);
            if let Some(target) = &checked.service {
                st.slices_of
                    .entry(target.clone())
                    .or_default()
                    .insert(key.clone());
            }
            if !checked.errors.is_empty() || !checked.notices.is_empty() {
                st.noisy_slices.insert(key.clone());
            }
            st.slices.entry(key).or_default().push(checked);
        }
        let groups: Vec<(&Arc<Service>, usize)> = service_groups(services.iter());
        let prev = PreviousPorts::index(previous);
        let outputs = {
            let (slices, slices_of, node, opts) = (&st.slices, &st.slices_of, &st.node, &st.opts);
            compile_services_parallel(&groups, |svc: &Arc<Service>| {
                let key = owned_key(&svc.metadata);
                let mine = slices_for(slices, slices_of, &key);
                compile_service(svc, &mine, node, opts, &prev)
            })
        };
        let old: HashSet<*const ServicePort> = previous
            .into_iter()
            .flat_map(|t| t.service_ports().map(|(_, p)| Arc::as_ptr(p)))
            .collect();
        for ((svc, duplicates), output) in groups.into_iter().zip(outputs) {
            let key = owned_key(&svc.metadata);
            st.new_ports += output
                .ports
                .iter()
                .filter(|p| !old.contains(&Arc::as_ptr(p)))
                .count();
            st.defs.insert(
                key.clone(),
                ServiceDefs {
                    first: Arc::clone(svc),
                    duplicates,
                },
            );
            st.insert(key, output, Vec::new());
        }
        st
    }

    /// The node this state compiles for.
    pub fn node(&self) -> &NodeTable {
        &self.node
    }

    pub fn options(&self) -> &CompileOptions {
        &self.opts
    }

    /// Sets the definitions of the Service `key` (namespace/name, as
    /// [`object_key_of`](super::object_key_of) gives it), in input order; none: the
    /// Service is gone. Takes effect at the next [`finish`](Self::finish).
    pub fn set_service(&mut self, key: ObjectKey, defs: &[Arc<Service>]) {
        match defs.first() {
            Some(first) => {
                self.defs.insert(
                    key.clone(),
                    ServiceDefs {
                        first: Arc::clone(first),
                        duplicates: defs.len() - 1,
                    },
                );
            }
            None => {
                self.defs.remove(&key);
            }
        }
        self.dirty.insert(key);
    }

    /// Sets the definitions of the EndpointSlice `key`, in input order; none: it is gone.
    /// The services it named before and names now are recompiled at the next
    /// [`finish`](Self::finish).
    pub fn set_slices<S: std::borrow::Borrow<EndpointSlice>>(
        &mut self,
        key: ObjectKey,
        defs: &[S],
    ) {
        self.noisy_slices.remove(&key);
        if let Some(old) = self.slices.remove(&key) {
            for target in old.into_iter().filter_map(|c| c.service) {
                if let Some(set) = self.slices_of.get_mut(&target) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.slices_of.remove(&target);
                    }
                }
                self.dirty.insert(target);
            }
        }
        if defs.is_empty() {
            return;
        }
        let checked: Vec<CheckedSlice> = defs
            .iter()
            .map(|s| check_slice(s.borrow(), &self.node))
            .collect();
        for target in checked.iter().filter_map(|c| c.service.as_ref()) {
            self.slices_of
                .entry(target.clone())
                .or_default()
                .insert(key.clone());
            self.dirty.insert(target.clone());
        }
        if checked
            .iter()
            .any(|c| !c.errors.is_empty() || !c.notices.is_empty())
        {
            self.noisy_slices.insert(key.clone());
        }
        self.slices.insert(key, checked);
    }

    /// Recompiles what changed and returns the table with its errors, notices and
    /// health checks.
    pub fn finish(&mut self) -> Compiled {
        for key in std::mem::take(&mut self.dirty) {
            self.recompile(key);
        }
        for key in std::mem::take(&mut self.stale_errors) {
            if let Some(entry) = self.entries.get(&*key) {
                let errors = self.render_errors(entry);
                let noisy = !errors.is_empty() || !entry.output.notices.is_empty();
                if let Some(entry) = self.entries.get_mut(&*key) {
                    entry.errors = errors;
                }
                if noisy {
                    self.noisy_services.insert((*key).clone());
                } else {
                    self.noisy_services.remove(&*key);
                }
            }
        }
        let mut out = Compiled {
            table: self.table.clone(),
            ..Compiled::default()
        };
        for checked in self
            .noisy_slices
            .iter()
            .filter_map(|k| self.slices.get(k))
            .flatten()
        {
            out.errors.extend(checked.errors.iter().cloned());
            out.notices.extend(checked.notices.iter().cloned());
        }
        for entry in self
            .noisy_services
            .iter()
            .filter_map(|k| self.entries.get(k))
        {
            out.errors.extend(entry.errors.iter().cloned());
            out.notices.extend(entry.output.notices.iter().cloned());
        }
        let mut health_checks: Vec<_> = self
            .hc_claims
            .values()
            .filter_map(|holders| {
                let first = holders.first()?;
                self.entries.get(&**first)?.output.health_check.clone()
            })
            .collect();
        health_checks.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out.health_checks = health_checks;
        out
    }

    /// Service ports built (not carried over from before) since the last call.
    pub fn take_new_ports(&mut self) -> usize {
        std::mem::take(&mut self.new_ports)
    }

    /// (Services with at least one compiled port, service ports, endpoints summed over
    /// service ports) of the current table.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.services_with_ports,
            self.table.service_port_count(),
            self.endpoints,
        )
    }

    fn recompile(&mut self, key: ObjectKey) {
        let mut free_ids = Vec::new();
        let mut previous_ports = Vec::new();
        if let Some(old) = self.entries.remove(&key) {
            self.unclaim_all(&old);
            if !old.output.ports.is_empty() {
                self.services_with_ports -= 1;
            }
            self.endpoints -= old
                .output
                .ports
                .iter()
                .map(|p| p.endpoints.len())
                .sum::<usize>();
            self.stale_errors.remove(&old.key);
            self.noisy_services.remove(&key);
            free_ids = old.ids;
            previous_ports = old.output.ports;
        }
        let Some(defs) = self.defs.get(&key) else {
            self.release_ids(free_ids);
            return;
        };
        let output = {
            let mine = slices_for(&self.slices, &self.slices_of, &key);
            let prev = PreviousPorts::of(previous_ports.iter());
            compile_service(&defs.first, &mine, &self.node, &self.opts, &prev)
        };
        self.new_ports += output
            .ports
            .iter()
            .filter(|p| !previous_ports.iter().any(|o| Arc::ptr_eq(o, p)))
            .count();
        drop(previous_ports);
        self.insert(key, output, free_ids);
    }

    /// Adds a compiled service: its ports (in the ids of `free_ids` first, the rest
    /// appended; unused ids are released), its claims and its health check.
    fn insert(&mut self, key: ObjectKey, output: ServiceOutput, mut free_ids: Vec<ServicePortId>) {
        let key_arc = Arc::new(key.clone());
        let reused = free_ids.len().min(output.ports.len());
        let leftover = free_ids.split_off(reused);
        let mut ids = free_ids;
        for (i, port) in output.ports.iter().enumerate() {
            if i < reused {
                self.table.set_service_port(ids[i], Arc::clone(port));
                self.owners[ids[i].0 as usize] = Arc::clone(&key_arc);
            } else {
                ids.push(self.table.add_service_port(Arc::clone(port)));
                self.owners.push(Arc::clone(&key_arc));
            }
        }
        if !output.ports.is_empty() {
            self.services_with_ports += 1;
        }
        self.endpoints += output
            .ports
            .iter()
            .map(|p| p.endpoints.len())
            .sum::<usize>();
        let claims: Vec<ClaimRef> = output
            .claims
            .iter()
            .enumerate()
            .map(|(seq, c)| ClaimRef {
                service: Arc::clone(&key_arc),
                seq: seq as u32,
                kind: c.kind,
                port: c.port,
            })
            .collect();
        let frontend_keys: Vec<FrontendKey> = output.claims.iter().map(|c| c.key).collect();
        let hc_port = output.health_check.as_ref().map(|h| h.port);
        self.entries.insert(
            key,
            Entry {
                key: Arc::clone(&key_arc),
                output,
                ids,
                errors: Vec::new(),
            },
        );
        let mut won = Vec::new();
        for (fk, claim) in frontend_keys.into_iter().zip(claims) {
            let list = self.claims.entry(fk).or_default();
            let pos = list.partition_point(|c| c.order() < claim.order());
            list.insert(pos, claim);
            if pos == 0 {
                won.push(fk);
            }
        }
        for fk in won {
            self.holder_changed(fk);
        }
        if let Some(port) = hc_port {
            let holders = self.hc_claims.entry(port).or_default();
            holders.insert(Arc::clone(&key_arc));
            if holders.first() == Some(&key_arc) {
                self.stale_errors.extend(holders.iter().cloned());
            }
        }
        self.stale_errors.insert(key_arc);
        self.release_ids(leftover);
    }

    /// Withdraws every claim of a service that is leaving the table (it is out of
    /// `entries` already); frontends it held go to the next claimant, or away.
    fn unclaim_all(&mut self, old: &Entry) {
        let mut lost = Vec::new();
        for (seq, c) in old.output.claims.iter().enumerate() {
            let Some(list) = self.claims.get_mut(&c.key) else {
                continue;
            };
            let Some(pos) = list
                .iter()
                .position(|r| r.seq == seq as u32 && *r.service == *old.key)
            else {
                continue;
            };
            list.remove(pos);
            if pos == 0 {
                lost.push(c.key);
            }
        }
        for fk in lost {
            self.holder_changed(fk);
        }
        if let Some(hc) = &old.output.health_check {
            if let Some(holders) = self.hc_claims.get_mut(&hc.port) {
                let was_first = holders.first() == Some(&old.key);
                holders.remove(&old.key);
                if holders.is_empty() {
                    self.hc_claims.remove(&hc.port);
                } else if was_first {
                    self.stale_errors.extend(holders.iter().cloned());
                }
            }
        }
    }

    /// The first claimant of `fk` changed: point the frontend at it (or remove it when
    /// nobody claims it any more) and have every claimant's errors rendered again.
    fn holder_changed(&mut self, fk: FrontendKey) {
        let Some(list) = self.claims.get(&fk) else {
            return;
        };
        let Some(first) = list.first() else {
            self.claims.remove(&fk);
            self.put_frontend(fk, None);
            return;
        };
        self.stale_errors
            .extend(list.iter().map(|c| Arc::clone(&c.service)));
        let kind = first.kind;
        let id = self
            .entries
            .get(&*first.service)
            .map(|e| e.ids[first.port as usize]);
        match id {
            Some(service_port) => self.put_frontend(fk, Some(Frontend { kind, service_port })),
            // Unreachable: claimants are in `entries` while their claims are listed.
            None => self.put_frontend(fk, None),
        }
    }

    /// Sets or removes a frontend in the table, keeping the address sets in step.
    fn put_frontend(&mut self, fk: FrontendKey, new: Option<Frontend>) {
        let old = match new {
            Some(f) => self.table.set_frontend(fk, f),
            None => self.table.remove_frontend(&fk),
        };
        if let Some(o) = old {
            self.addr_ref(fk.addr, o.kind, false);
        }
        if let Some(n) = new {
            self.addr_ref(fk.addr, n.kind, true);
        }
    }

    fn addr_ref(&mut self, addr: IpAddr, kind: FrontendKind, add: bool) {
        let refs = self.addr_refs.entry(addr).or_insert([0, 0]);
        let mut changes = [None, None];
        for (i, applies) in [
            kind == FrontendKind::ClusterIp,
            kind != FrontendKind::NodePort,
        ]
        .into_iter()
        .enumerate()
        {
            if !applies {
                continue;
            }
            if add {
                refs[i] += 1;
                if refs[i] == 1 {
                    changes[i] = Some(true);
                }
            } else {
                refs[i] = refs[i].saturating_sub(1);
                if refs[i] == 0 {
                    changes[i] = Some(false);
                }
            }
        }
        if *refs == [0, 0] {
            self.addr_refs.remove(&addr);
        }
        if let Some(present) = changes[0] {
            self.table.set_cluster_ip(addr, present);
        }
        if let Some(present) = changes[1] {
            self.table.set_vip(addr, present);
        }
    }

    /// Frees service port ids, highest first: each goes to the last service port, whose
    /// owner's ids and held frontends follow it.
    fn release_ids(&mut self, mut ids: Vec<ServicePortId>) {
        ids.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids {
            let moved = self.table.swap_remove_service_port(id);
            self.owners.swap_remove(id.0 as usize);
            let Some(from) = moved else { continue };
            let owner = Arc::clone(&self.owners[id.0 as usize]);
            let Some(entry) = self.entries.get_mut(&*owner) else {
                continue;
            };
            let Some(j) = entry.ids.iter().position(|x| *x == from) else {
                continue;
            };
            entry.ids[j] = id;
            let held: Vec<FrontendKey> = entry
                .output
                .claims
                .iter()
                .filter(|c| c.port as usize == j)
                .map(|c| c.key)
                .collect();
            for fk in held {
                if let Some(f) = self.table.frontend(&fk) {
                    if f.service_port == from {
                        self.table.set_frontend(
                            fk,
                            Frontend {
                                kind: f.kind,
                                service_port: id,
                            },
                        );
                    }
                }
            }
        }
    }

    /// A service's errors as a full compile reports them: its own, with a clash where a
    /// frontend or the health check port is held by another, then its duplicates.
    fn render_errors(&self, entry: &Entry) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let object = &entry.output.object;
        for item in &entry.output.items {
            match item {
                Item::Error(e) => errors.push(e.clone()),
                Item::Frontend(i) => {
                    let c = &entry.output.claims[*i as usize];
                    let holder = self.claims.get(&c.key).and_then(|l| l.first());
                    let held_by_me =
                        holder.is_some_and(|h| h.seq == *i && *h.service == *entry.key);
                    if held_by_me {
                        continue;
                    }
                    if let Some(f) = self.table.frontend(&c.key) {
                        let name = &self.table.service_port(f.service_port).name;
                        errors.push(clash_error(object, c, f.kind, name));
                    }
                }
                Item::HealthCheck => {
                    let Some(hc) = &entry.output.health_check else {
                        continue;
                    };
                    let holder = self.hc_claims.get(&hc.port).and_then(|h| h.first());
                    if let Some(holder) = holder.filter(|h| ***h != *entry.key) {
                        errors.push(health_check_clash(object, hc.port, &holder.0, &holder.1));
                    }
                }
            }
        }
        let duplicates = self.defs.get(&*entry.key).map_or(0, |d| d.duplicates);
        push_duplicates(&mut errors, object, duplicates);
        errors
    }
}

fn owned_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    let (ns, name) = object_key(meta);
    (ns.to_string(), name.to_string())
}

/// The checked slices naming the service `key`, in slice namespace/name order (input
/// order among equal names), as a full compile reads them.
fn slices_for<'a>(
    slices: &'a BTreeMap<ObjectKey, Vec<CheckedSlice>>,
    slices_of: &HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    key: &ObjectKey,
) -> Vec<&'a SliceInfo> {
    let Some(names) = slices_of.get(key) else {
        return Vec::new();
    };
    names
        .iter()
        .filter_map(|n| slices.get(n))
        .flatten()
        .filter(|c| c.service.as_ref() == Some(key))
        .filter_map(|c| c.info.as_ref())
        .collect()
}
