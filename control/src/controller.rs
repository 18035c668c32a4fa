//! The controller: source events in, compiled tables published.
//!
//! A [`Controller`] keeps the latest [`SourceView`] and the node's state, and *syncs*:
//! compiles what changed against the node and publishes a new [`Tables`] generation
//! through the [`TablePublisher`] (one atomic pointer swap; workers pick it up at their
//! next batch).
//!
//! * **Incremental**: a new view is compared with the previous one by pointer (sources
//!   hand unchanged objects on as the same `Arc`s), and only the changed
//!   Services and EndpointSlices (by namespace/name) go to the [`CompileState`], which
//!   recompiles the services they concern and patches its table: unchanged service ports
//!   keep their `Arc` and their Maglev tables. The first view and node changes compile
//!   everything ([`CompileState::build`], reusing the last published table's ports).
//!
//! * **Level-triggered**: a view replaces the previous one; a burst of views is coalesced
//!   and only the latest is compiled.
//! * **Rate-limited** like kube-proxy's `minSyncPeriod` (here in milliseconds, default
//!   [`DEFAULT_MIN_SYNC_INTERVAL`]): the first change after a quiet period syncs at once,
//!   later ones wait until `min_sync_interval` after the previous sync started, so a burst
//!   costs at most one sync per interval.
//! * **Never publishes emptiness because a source hiccuped**: nothing is published before
//!   the first view, and [`SourceEvent::Disconnected`] keeps the last good tables.
//! * **Node events** replace the node's addresses (when the source has any) in a copy of
//!   the node file's table (interfaces, neighbours, routes, CIDRs stay from the node file;
//!   an empty `nodePortAddresses` follows the new addresses) and record the zone.
//! * **Reports**: every configuration error (the source's and the compiler's) is logged
//!   once with `tracing::warn!`, naming the object and the field, while it persists it is
//!   counted in `kxp_config_errors`; each sync is logged at info level and recorded in
//!   [`Metrics`] (duration, time, table sizes), which `/healthz` and `/metrics` serve.
//!
//! [`Controller::sync_once`] and friends run a sync synchronously (tests, `kxp sync
//! --once`); [`Controller::spawn`] runs the loop on its own thread.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::tables::{NodeTable, ServiceTable};

use crate::compile::{object_key_of, CompileOptions, CompileState, ObjectKey};
use crate::error::ConfigError;
use crate::ops::Metrics;
use crate::source::{NodeInfo, SourceEvent, SourceView};

/// Default minimum interval between two syncs.
pub const DEFAULT_MIN_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// How often the run loop checks for a stop request while idle.
const STOP_POLL: Duration = Duration::from_millis(50);

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Minimum interval between the starts of two syncs.
    pub min_sync_interval: Duration,
    pub compile: CompileOptions,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            min_sync_interval: DEFAULT_MIN_SYNC_INTERVAL,
            compile: CompileOptions::default(),
        }
    }
}

/// The size of a service table, as the metrics report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Distinct Services (namespace/name) with at least one compiled port.
    pub services: usize,
    /// Service ports, one per port per IP family.
    pub service_ports: usize,
    /// Endpoints summed over service ports.
    pub endpoints: usize,
    /// (address, protocol, port) frontends.
    pub frontends: usize,
}

impl TableCounts {
    pub fn of(table: &ServiceTable) -> Self {
        let mut services = HashSet::new();
        let mut counts = Self {
            frontends: table.frontend_count(),
            ..Self::default()
        };
        for (_, sp) in table.service_ports() {
            services.insert((&sp.name.namespace, &sp.name.name));
            counts.service_ports += 1;
            counts.endpoints += sp.endpoints.len();
        }
        counts.services = services.len();
        counts
    }
}

/// What one sync did.
#[derive(Debug, Clone)]
pub struct SyncReport {
    /// The published table's generation.
    pub generation: u64,
    /// Compile and publish time.
    pub duration: Duration,
    pub counts: TableCounts,
    /// Service ports whose `Arc` was carried over from the previous generation.
    pub reused_ports: usize,
    /// The source's errors, then the compiler's.
    pub errors: Vec<ConfigError>,
    pub notices: Vec<String>,
}

impl SyncReport {
    /// One line for logs and `kxp sync --once`.
    pub fn summary(&self) -> String {
        format!(
            "generation {}: {} services, {} service ports, {} endpoints, {} frontends, \
             {} config errors, {} ports reused, in {:.3} ms",
            self.generation,
            self.counts.services,
            self.counts.service_ports,
            self.counts.endpoints,
            self.counts.frontends,
            self.errors.len(),
            self.reused_ports,
            self.duration.as_secs_f64() * 1e3
        )
    }
}

/// Consumes [`SourceEvent`]s, compiles and publishes. See the module docs.
#[derive(Debug)]
pub struct Controller {
    config: ControllerConfig,
    publisher: Arc<TablePublisher>,
    metrics: Arc<Metrics>,
    /// The node file's table.
    base_node: NodeTable,
    node_info: Option<NodeInfo>,
    /// `base_node` with the source's addresses, as published.
    node: Arc<NodeTable>,
    view: Option<SourceView>,
    /// Where each namespace/name sits in `view`.
    index: ViewIndex,
    /// The incremental compiler, once a first sync built it.
    state: Option<CompileState>,
    /// The Services and EndpointSlices (namespace/name) changed since the last sync.
    changed_services: BTreeSet<ObjectKey>,
    changed_slices: BTreeSet<ObjectKey>,
    /// The next sync compiles everything (first view, node change).
    full: bool,
    /// Views replaced since the last sync, freed after the next publish: freeing one
    /// touches every object's reference count (about 1.5 ms at 30,000 services).
    retired: Vec<SourceView>,
    /// The last table this controller published.
    published: Option<Arc<ServiceTable>>,
    generation: u64,
    /// A change is waiting for a sync.
    pending: bool,
    last_sync_start: Option<Instant>,
    /// Errors of the last sync, rendered, to log only the new ones.
    reported: HashSet<String>,
    notices_reported: HashSet<String>,
    disconnected: Option<String>,
    syncs: u64,
    /// healthCheckNodePort servers kept in step with each sync, if serving them.
    health_checks: Option<Arc<crate::healthcheck::HealthCheckServers>>,
}

impl Controller {
    /// `node` is the node file's table; `publisher` is where workers read tables (its
    /// current generation number is continued).
    pub fn new(
        node: NodeTable,
        publisher: Arc<TablePublisher>,
        metrics: Arc<Metrics>,
        config: ControllerConfig,
    ) -> Self {
        let generation = publisher.current().services.generation;
        Self {
            config,
            publisher,
            metrics,
            node: Arc::new(node.clone()),
            base_node: node,
            node_info: None,
            view: None,
            index: ViewIndex::default(),
            state: None,
            changed_services: BTreeSet::new(),
            changed_slices: BTreeSet::new(),
            full: true,
            retired: Vec::new(),
            published: None,
            generation,
            pending: false,
            last_sync_start: None,
            reported: HashSet::new(),
            notices_reported: HashSet::new(),
            disconnected: None,
            syncs: 0,
            health_checks: None,
        }
    }

    /// Serves kube-proxy's healthCheckNodePort answers for the services that ask for
    /// them, opened and closed on every sync.
    pub fn set_health_checks(&mut self, servers: Arc<crate::healthcheck::HealthCheckServers>) {
        self.health_checks = Some(servers);
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn publisher(&self) -> &Arc<TablePublisher> {
        &self.publisher
    }

    /// The last table this controller published.
    pub fn published(&self) -> Option<&Arc<ServiceTable>> {
        self.published.as_ref()
    }

    /// The node table as published (the node file's, with the source's addresses).
    pub fn node(&self) -> &Arc<NodeTable> {
        &self.node
    }

    /// The node's zone (`topology.kubernetes.io/zone`), when a source told it.
    pub fn zone(&self) -> Option<&str> {
        self.node_info.as_ref()?.zone.as_deref()
    }

    /// Whether a change is waiting for a sync.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Syncs done so far.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// The reason given by the last [`SourceEvent::Disconnected`], until the next view.
    pub fn disconnected(&self) -> Option<&str> {
        self.disconnected.as_deref()
    }

    /// Takes an event in; returns whether it queued a sync.
    pub fn apply(&mut self, event: SourceEvent) -> bool {
        let queued = match event {
            SourceEvent::View(view) => self.apply_view(view),
            SourceEvent::Node(info) => self.apply_node(info),
            SourceEvent::Disconnected(reason) => {
                tracing::warn!(%reason, "source disconnected; keeping the last good tables");
                self.metrics.source_disconnected();
                self.disconnected = Some(reason);
                false
            }
        };
        if queued {
            self.pending = true;
            self.metrics.queued();
        }
        queued
    }

    fn apply_view(&mut self, view: SourceView) -> bool {
        self.disconnected = None;
        let Some(old) = &self.view else {
            let services = view.services.len() as u64;
            let slices = view.slices.len() as u64;
            self.metrics.changes(services, slices);
            self.index = ViewIndex::of(&view);
            self.view = Some(view);
            self.full = true;
            return true;
        };
        let services = diff(
            &old.services,
            &view.services,
            &mut self.index.services,
            |s| &s.metadata,
            &mut self.changed_services,
        );
        let slices = diff(
            &old.slices,
            &view.slices,
            &mut self.index.slices,
            |s| &s.metadata,
            &mut self.changed_slices,
        );
        self.metrics.changes(services, slices);
        let queued =
            services > 0 || slices > 0 || old.errors != view.errors || old.notices != view.notices;
        if let Some(old) = self.view.replace(view) {
            if queued || self.pending {
                self.retired.push(old);
            }
        }
        queued
    }

    fn apply_node(&mut self, info: NodeInfo) -> bool {
        if self.node_info.as_ref() == Some(&info) {
            return false;
        }
        if let Some(zone) = &info.zone {
            tracing::info!(zone, "node zone");
        }
        let mut node = self.base_node.clone();
        if !info.addresses.is_empty() {
            node.addresses = info.addresses.clone();
        }
        if info.zone.is_some() {
            node.zone = info.zone.clone();
        }
        // Addresses and the zone (topology hints) both reach the tables.
        let addresses_changed =
            node.addresses != self.node.addresses || node.zone != self.node.zone;
        if addresses_changed {
            tracing::info!(addresses = ?node.addresses, "node addresses");
            self.node = Arc::new(node);
            // Every NodePort frontend, and every endpoint's locality and hints, may change.
            self.full = true;
        }
        self.node_info = Some(info);
        // Only the addresses reach the tables; no view yet means nothing to publish.
        addresses_changed && self.view.is_some()
    }

    /// The earliest time the next sync may start (`None`: at once).
    pub fn next_sync_at(&self) -> Option<Instant> {
        self.last_sync_start
            .map(|t| t + self.config.min_sync_interval)
    }

    /// Whether a change is pending and the minimum interval allows a sync at `now`.
    pub fn sync_due(&self, now: Instant) -> bool {
        self.pending && self.view.is_some() && self.next_sync_at().is_none_or(|t| now >= t)
    }

    /// Syncs if a change is pending (ignoring the rate limit). Returns what the sync did.
    pub fn sync(&mut self) -> Option<SyncReport> {
        if !self.pending {
            return None;
        }
        let view = self.view.as_ref()?;
        let start = Instant::now();
        self.last_sync_start = Some(start);
        let state = match self.state.as_mut() {
            Some(state) if !self.full => {
                for key in std::mem::take(&mut self.changed_services) {
                    let defs = self
                        .index
                        .objects(&view.services, &self.index.services, &key);
                    state.set_service(key, &defs);
                }
                for key in std::mem::take(&mut self.changed_slices) {
                    let defs = self.index.objects(&view.slices, &self.index.slices, &key);
                    state.set_slices(key, &defs);
                }
                state
            }
            _ => {
                self.changed_services.clear();
                self.changed_slices.clear();
                self.full = false;
                self.state.insert(CompileState::build(
                    &view.services,
                    &view.slices,
                    (*self.node).clone(),
                    self.config.compile.clone(),
                    self.published.as_deref(),
                ))
            }
        };
        let mut compiled = state.finish();
        if let Some(hc) = &self.health_checks {
            hc.sync(&compiled.health_checks);
        }
        self.generation += 1;
        compiled.table.generation = self.generation;
        let (services, service_ports, endpoints) = state.counts();
        let reused_ports = service_ports - state.take_new_ports().min(service_ports);
        let counts = TableCounts {
            services,
            service_ports,
            endpoints,
            frontends: compiled.table.frontend_count(),
        };
        let table = Arc::new(compiled.table);
        self.publisher.publish(Tables {
            services: Arc::clone(&table),
            node: Arc::clone(&self.node),
        });
        let duration = start.elapsed();
        self.published = Some(Arc::clone(&table));
        self.retired.clear();
        self.pending = false;
        self.syncs += 1;

        let mut errors = view.errors.clone();
        errors.extend(compiled.errors);
        let mut notices = view.notices.clone();
        notices.extend(compiled.notices);
        self.metrics
            .synced(duration, &counts, errors.len(), self.generation);
        let report = SyncReport {
            generation: self.generation,
            duration,
            counts,
            reused_ports,
            errors,
            notices,
        };
        self.log(&report);
        Some(report)
    }

    /// Takes an event in and syncs at once if it queued a change.
    pub fn sync_once(&mut self, event: SourceEvent) -> Option<SyncReport> {
        self.apply(event);
        self.sync()
    }

    fn log(&mut self, report: &SyncReport) {
        let mut now = HashSet::with_capacity(report.errors.len());
        for e in &report.errors {
            let text = e.to_string();
            if !self.reported.contains(&text) {
                tracing::warn!(
                    object = e.object(),
                    field = e.field(),
                    "configuration error: {text}"
                );
            }
            now.insert(text);
        }
        self.reported = now;
        let mut now = HashSet::with_capacity(report.notices.len());
        for n in &report.notices {
            if !self.notices_reported.contains(n) {
                tracing::info!("{n}");
            }
            now.insert(n.clone());
        }
        self.notices_reported = now;
        tracing::info!(
            generation = report.generation,
            services = report.counts.services,
            service_ports = report.counts.service_ports,
            endpoints = report.counts.endpoints,
            frontends = report.counts.frontends,
            errors = report.errors.len(),
            reused_ports = report.reused_ports,
            duration_us = report.duration.as_micros() as u64,
            "synced"
        );
    }

    /// Runs until `stop` is set or every sender of `events` is gone (then syncs what is
    /// pending and returns). Events are coalesced; syncs respect the minimum interval.
    pub fn run(&mut self, events: &Receiver<SourceEvent>, stop: &AtomicBool) {
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let wait = match self.next_sync_at() {
                Some(at) if self.pending && self.view.is_some() => {
                    at.saturating_duration_since(Instant::now()).min(STOP_POLL)
                }
                None if self.pending && self.view.is_some() => Duration::ZERO,
                _ => STOP_POLL,
            };
            let mut closed = false;
            match events.recv_timeout(wait) {
                Ok(ev) => {
                    self.apply(ev);
                    // Coalesce whatever else is already queued.
                    loop {
                        match events.try_recv() {
                            Ok(ev) => {
                                self.apply(ev);
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
            if closed {
                self.sync();
                return;
            }
            if self.sync_due(Instant::now()) {
                self.sync();
            }
        }
    }

    /// Runs [`run`](Self::run) on a thread of its own.
    pub fn spawn(mut self, events: Receiver<SourceEvent>) -> std::io::Result<ControllerHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("kxp-controller".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    self.run(&events, &stop);
                    self
                }
            })?;
        Ok(ControllerHandle {
            stop,
            thread: Some(thread),
        })
    }
}

/// A controller running on its thread.
#[derive(Debug)]
pub struct ControllerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Controller>>,
}

impl ControllerHandle {
    /// Stops the loop (within about 50 ms) and returns the controller, or `None` if its
    /// thread panicked.
    pub fn stop(mut self) -> Option<Controller> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take()?.join().ok()
    }

    /// Waits for the loop to end on its own (every source gone).
    pub fn join(mut self) -> Option<Controller> {
        self.thread.take()?.join().ok()
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where each namespace/name sits in a view's lists (several places when an object is
/// defined more than once), so that a changed name's definitions are found without a
/// scan.
#[derive(Debug, Default)]
struct ViewIndex {
    services: HashMap<ObjectKey, Vec<u32>>,
    slices: HashMap<ObjectKey, Vec<u32>>,
}

impl ViewIndex {
    fn of(view: &SourceView) -> Self {
        Self {
            services: positions(&view.services, |s| &s.metadata),
            slices: positions(&view.slices, |s| &s.metadata),
        }
    }

    /// The objects named `key` in `list`, in list order.
    fn objects<T>(
        &self,
        list: &[Arc<T>],
        index: &HashMap<ObjectKey, Vec<u32>>,
        key: &ObjectKey,
    ) -> Vec<Arc<T>> {
        index
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|&i| list.get(i as usize).map(Arc::clone))
            .collect()
    }
}

fn positions<T>(list: &[Arc<T>], meta: impl Fn(&T) -> &ObjectMeta) -> HashMap<ObjectKey, Vec<u32>> {
    let mut index: HashMap<ObjectKey, Vec<u32>> = HashMap::with_capacity(list.len());
    for (i, o) in list.iter().enumerate() {
        index
            .entry(object_key_of(meta(o)))
            .or_default()
            .push(i as u32);
    }
    index
}

/// Finds the namespace/names whose objects differ between two versions of a list, adds
/// them to `changed` and brings `index` (positions in `old`) up to `new`. Returns how
/// many objects were added, changed or removed.
///
/// Sources hand on unchanged objects as the same `Arc`s, in the same order. So when the
/// lists are as long and every object that is not the same `Arc` has the same name as the
/// one it replaces (objects updated in place: the common case), the positions stand and
/// only those objects are compared: a pointer comparison per object. Otherwise (objects
/// added or removed) the lists are compared by name.
fn diff<T: PartialEq>(
    old: &[Arc<T>],
    new: &[Arc<T>],
    index: &mut HashMap<ObjectKey, Vec<u32>>,
    meta: impl Fn(&T) -> &ObjectMeta,
    changed: &mut BTreeSet<ObjectKey>,
) -> u64 {
    if old.len() == new.len() {
        let mut moved: Vec<usize> = Vec::new();
        let same_places = old.iter().zip(new).enumerate().all(|(i, (a, b))| {
            if Arc::ptr_eq(a, b) {
                return true;
            }
            moved.push(i);
            object_key_of(meta(a)) == object_key_of(meta(b))
        });
        if same_places {
            let mut n = 0;
            for i in moved {
                if old[i] != new[i] {
                    n += 1;
                    changed.insert(object_key_of(meta(&new[i])));
                }
            }
            return n;
        }
    }
    let new_index = positions(new, &meta);
    let mut n = 0;
    for (key, at) in &new_index {
        let same = index.get(key).is_some_and(|was| {
            was.len() == at.len()
                && was.iter().zip(at).all(|(&w, &a)| {
                    let (w, a) = (&old[w as usize], &new[a as usize]);
                    Arc::ptr_eq(w, a) || w == a
                })
        });
        if !same {
            n += at.len().max(index.get(key).map_or(0, Vec::len)) as u64;
            changed.insert(key.clone());
        }
    }
    for (key, was) in index.iter() {
        if !new_index.contains_key(key) {
            n += was.len() as u64;
            changed.insert(key.clone());
        }
    }
    *index = new_index;
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifests;
    use crate::node::parse_node;
    use core::net::IpAddr;
    use kxp_dataplane::flow::L4Proto;
    use kxp_dataplane::tables::FrontendKey;
    use std::sync::mpsc;

    const NODE: &str = "name: node-a\naddresses: [192.168.50.2]\n";

    fn service(name: &str, ip: &str, endpoints: &[&str]) -> String {
        let node_port = 30000 + u16::from(name.as_bytes()[0]);
        let eps: Vec<String> = endpoints
            .iter()
            .map(|e| format!("  - addresses: [{e}]\n"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{type: NodePort, clusterIP: {ip}, ports: [{{name: http, port: 80, nodePort: {node_port}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}---\n",
            eps.concat()
        )
    }

    fn view(yaml: &str) -> SourceEvent {
        let set = parse_manifests(yaml, "test.yaml");
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        SourceEvent::View(SourceView {
            services: set.services.into_iter().map(Arc::new).collect(),
            slices: set.slices.into_iter().map(Arc::new).collect(),
            errors: Vec::new(),
            notices: set.notices,
        })
    }

    fn setup(min_sync_interval: Duration) -> Controller {
        let node = parse_node(NODE, "node.yaml").unwrap();
        let publisher = TablePublisher::new(Tables {
            services: Arc::new(ServiceTable::new()),
            node: Arc::new(node.clone()),
        });
        Controller::new(
            node,
            publisher,
            Metrics::new(Duration::from_secs(60)),
            ControllerConfig {
                min_sync_interval,
                ..ControllerConfig::default()
            },
        )
    }

    fn key(ip: &str, port: u16) -> FrontendKey {
        FrontendKey {
            addr: ip.parse().unwrap(),
            proto: L4Proto::Tcp,
            port,
        }
    }

    fn endpoints_of(tables: &Tables, ip: &str) -> Vec<IpAddr> {
        let fe = tables.services.frontend(&key(ip, 80)).expect("frontend");
        let sp = tables.services.service_port(fe.service_port);
        sp.endpoints.iter().map(|b| b.addr).collect()
    }

    #[test]
    fn publishes_and_reuses_unchanged_service_ports() {
        let mut c = setup(DEFAULT_MIN_SYNC_INTERVAL);
        assert!(c.sync().is_none(), "nothing before the first view");
        let first = [
            service("a", "10.96.0.10", &["10.244.1.2"]),
            service("b", "10.96.0.11", &["10.244.1.3"]),
        ]
        .concat();
        let r1 = c.sync_once(view(&first)).expect("first sync");
        assert_eq!(r1.counts.services, 2);
        assert_eq!(r1.counts.service_ports, 2);
        assert_eq!(r1.counts.endpoints, 2);
        assert!(r1.errors.is_empty(), "{:?}", r1.errors);
        let t1 = c.publisher().current();
        assert_eq!(t1.services.generation, r1.generation);
        assert_eq!(
            endpoints_of(&t1, "10.96.0.10"),
            ["10.244.1.2".parse::<IpAddr>().unwrap()]
        );
        assert!(t1.services.frontend(&key("192.168.50.2", 30097)).is_some());

        // The same view again: nothing to do.
        assert!(c.sync_once(view(&first)).is_none());

        let second = [
            service("a", "10.96.0.10", &["10.244.1.2"]),
            service("b", "10.96.0.11", &["10.244.1.3", "10.244.1.4"]),
        ]
        .concat();
        let r2 = c.sync_once(view(&second)).expect("second sync");
        assert_eq!(r2.generation, r1.generation + 1);
        assert_eq!(r2.reused_ports, 1);
        let t2 = c.publisher().current();
        let port = |t: &Tables, ip: &str| {
            let fe = t.services.frontend(&key(ip, 80)).unwrap();
            Arc::clone(t.services.service_port_arc(fe.service_port))
        };
        assert!(Arc::ptr_eq(
            &port(&t1, "10.96.0.10"),
            &port(&t2, "10.96.0.10")
        ));
        assert!(!Arc::ptr_eq(
            &port(&t1, "10.96.0.11"),
            &port(&t2, "10.96.0.11")
        ));
        assert_eq!(endpoints_of(&t2, "10.96.0.11").len(), 2);
    }

    #[test]
    fn disconnected_keeps_the_tables() {
        let mut c = setup(DEFAULT_MIN_SYNC_INTERVAL);
        c.sync_once(view(&service("a", "10.96.0.10", &["10.244.1.2"])))
            .unwrap();
        let before = c.publisher().current();
        assert!(c
            .sync_once(SourceEvent::Disconnected("watch closed".into()))
            .is_none());
        assert_eq!(c.disconnected(), Some("watch closed"));
        let after = c.publisher().current();
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(endpoints_of(&after, "10.96.0.10").len(), 1);
        // A disconnect before any view publishes nothing either.
        let mut fresh = setup(DEFAULT_MIN_SYNC_INTERVAL);
        assert!(fresh
            .sync_once(SourceEvent::Disconnected("no api".into()))
            .is_none());
        assert_eq!(fresh.publisher().current().services.frontend_count(), 0);
    }

    #[test]
    fn node_event_replaces_addresses_and_keeps_the_rest() {
        let mut c = setup(DEFAULT_MIN_SYNC_INTERVAL);
        // Before any view: recorded, nothing published.
        let info = NodeInfo {
            addresses: vec!["192.168.50.9".parse().unwrap()],
            zone: Some("zone-a".into()),
        };
        assert!(c.sync_once(SourceEvent::Node(info.clone())).is_none());
        assert_eq!(c.zone(), Some("zone-a"));
        c.sync_once(view(&service("a", "10.96.0.10", &["10.244.1.2"])))
            .unwrap();
        let t = c.publisher().current();
        assert!(t.services.frontend(&key("192.168.50.9", 30097)).is_some());
        assert!(t.services.frontend(&key("192.168.50.2", 30097)).is_none());
        assert_eq!(t.node.name, "node-a");
        // The same again: nothing; new addresses: a sync.
        assert!(c.sync_once(SourceEvent::Node(info)).is_none());
        let info = NodeInfo {
            addresses: vec!["192.168.50.7".parse().unwrap()],
            zone: Some("zone-a".into()),
        };
        assert!(c.sync_once(SourceEvent::Node(info)).is_some());
        let t = c.publisher().current();
        assert!(t.services.frontend(&key("192.168.50.7", 30097)).is_some());
    }

    #[test]
    fn debounce_coalesces_a_burst() {
        let c = setup(Duration::from_millis(300));
        let publisher = Arc::clone(c.publisher());
        let (tx, rx) = mpsc::channel();
        let handle = c.spawn(rx).unwrap();
        let last = 40;
        let burst_start = Instant::now();
        for i in 0..=last {
            let ep = format!("10.244.2.{}", i + 1);
            tx.send(view(&service("a", "10.96.0.10", &[&ep]))).unwrap();
            // A burst spread over ~80 ms: rate-limited, not merely drained at once.
            std::thread::sleep(Duration::from_millis(2));
        }
        let burst = burst_start.elapsed();
        let want: IpAddr = format!("10.244.2.{}", last + 1).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = publisher.current();
            if t.services.frontend_count() > 0 && endpoints_of(&t, "10.96.0.10") == [want] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "last view never published: generation {}, {} frontends",
                t.services.generation,
                t.services.frontend_count()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let c = handle.stop().expect("controller thread");
        // One sync at the first view, then at most one per interval while the burst lasts
        // (about 80 ms, more on a loaded machine), then the last one.
        let bound = 2 + (burst.as_millis() / 300) as u64;
        assert!(
            (1..=bound).contains(&c.syncs()),
            "{} syncs for a burst of {} views over {burst:?}",
            c.syncs(),
            last + 1
        );
        assert!(!c.pending());
    }

    #[test]
    fn run_ends_when_the_sources_are_gone() {
        let c = setup(Duration::from_millis(1));
        let (tx, rx) = mpsc::channel();
        let handle = c.spawn(rx).unwrap();
        tx.send(view(&service("a", "10.96.0.10", &["10.244.1.2"])))
            .unwrap();
        drop(tx);
        let c = handle.join().unwrap();
        assert_eq!(c.syncs(), 1);
        assert!(c.published().is_some());
    }

    #[test]
    fn changes_are_counted_by_object() {
        let parse = |name: &str, ip: &str| -> Vec<Arc<k8s_openapi::api::core::v1::Service>> {
            let yaml = service(name, ip, &["10.244.1.2"]);
            parse_manifests(&yaml, "x")
                .services
                .into_iter()
                .map(Arc::new)
                .collect()
        };
        let (a, b, b2) = (
            parse("a", "10.96.0.10"),
            parse("b", "10.96.0.11"),
            parse("b", "10.96.0.12"),
        );
        let run = |old: &[Arc<_>], new: &[Arc<_>]| {
            let mut index = positions(old, |s: &k8s_openapi::api::core::v1::Service| &s.metadata);
            let mut changed = BTreeSet::new();
            let n = diff(old, new, &mut index, |s| &s.metadata, &mut changed);
            assert_eq!(index, positions(new, |s| &s.metadata));
            let names: Vec<String> = changed.into_iter().map(|(_, n)| n).collect();
            (n, names)
        };
        let old = [a.clone(), b.clone()].concat();
        assert_eq!(run(&old, &old), (0, vec![]));
        // Removed, added: by name.
        assert_eq!(run(&old, &a), (1, vec!["b".to_string()]));
        assert_eq!(run(&a, &old), (1, vec!["b".to_string()]));
        // Replaced in place: by position, and by content (an equal copy is no change).
        assert_eq!(
            run(&old, &[a.clone(), b2.clone()].concat()),
            (1, vec!["b".to_string()])
        );
        let copy: Vec<Arc<_>> = old.iter().map(|s| Arc::new((**s).clone())).collect();
        assert_eq!(run(&old, &copy), (0, vec![]));
        // Reordered: by name, nothing changed.
        assert_eq!(run(&old, &[b, a].concat()), (0, vec![]));
        assert_eq!(run(&[], &old), (2, vec!["a".to_string(), "b".to_string()]));
    }
}
