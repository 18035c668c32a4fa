//! Operations endpoints: `/healthz`, `/livez` and `/metrics` over HTTP, as kube-proxy
//! serves them (its healthz server on port 10256, its metrics server on 10249), bound to
//! localhost unless told otherwise.
//!
//! # Health
//!
//! The [`Controller`](crate::controller::Controller) tells [`Metrics`] when a change is
//! queued (a source sent something that needs a sync) and when a sync published tables.
//! As in kube-proxy's `ProxyHealthServer`, a proxy is unhealthy once a queued change has
//! waited longer than the *healthz timeout* without a sync; unlike kube-proxy, `/healthz`
//! is also unhealthy until the first sync (kube-proxy is healthy while starting): a kxp
//! that has not yet published tables forwards nothing, and a load balancer's health check
//! should not send it traffic. `/livez` keeps kube-proxy's meaning (only a late queued
//! change makes it fail), for liveness probes during a slow start.
//!
//! * healthy: `200`, `{"lastUpdated": <now>, "currentTime": <now>, "lastSynced": <t>,
//!   "nodeEligible": true}`. `lastUpdated` is the current time when healthy, as kube-proxy
//!   reports it for compatibility with checkers that want it recent; `lastSynced` is the
//!   real time of the last sync.
//! * unhealthy: `503`, same body with `lastUpdated` = the last sync (`0001-01-01T00:00:00Z`
//!   before the first one).
//!
//! Times are RFC 3339, UTC, to the millisecond.
//!
//! # Metrics
//!
//! Prometheus (OpenMetrics text) via `prometheus-client`, the Prometheus project's own
//! Rust client. kube-proxy's sync metrics keep their names so that existing dashboards and
//! alerts keep working:
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram | compile + publish time of each sync |
//! | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge | end of the last sync (Unix time) |
//! | `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds` | gauge | when the oldest change not yet synced was seen (kube-proxy: the latest queued change) |
//! | `kubeproxy_sync_proxy_rules_service_changes_total` | counter | Services added, changed or removed |
//! | `kubeproxy_sync_proxy_rules_endpoint_changes_total` | counter | EndpointSlices added, changed or removed |
//! | `kubeproxy_proxy_healthz_total{code}`, `kubeproxy_proxy_livez_total{code}` | counter | answers of `/healthz`, `/livez` |
//! | `kxp_services`, `kxp_service_ports`, `kxp_endpoints`, `kxp_frontends` | gauge | the published table (endpoints summed over service ports) |
//! | `kxp_config_errors` | gauge | configuration errors in the last sync (objects left out) |
//! | `kxp_syncs_total`, `kxp_source_disconnects_total` | counter | syncs done; source disconnections |
//! | `kxp_table_generation` | gauge | generation of the published table |
//! | `kxp_dataplane_frames_total{worker,verdict,reason}` | counter | frames per verdict reason, per worker |
//! | `kxp_dataplane_events_total{worker,event}` | counter | other worker counters (`vlan_tagged`, `purged_flows`, ...) |
//! | `kxp_afxdp_driver_total{worker,counter}` | counter | AF_XDP driver counters per worker (`tx_ring_full`, `tx_kicks`, `kernel_rx_ring_full`, ...; see `DriverCounters`) |
//!
//! The dataplane counters are read on each scrape from a callback
//! ([`Metrics::set_dataplane_counters`]) that returns copies the workers published: the
//! workers' hot path is not touched by scraping.
//!
//! # HTTP server
//!
//! A server answers every path ([`Routes::All`], kube-proxy's metrics server also serves
//! health) or only the health paths ([`Routes::HealthOnly`], for an address reachable from
//! outside the node, as kube-proxy's healthz server on `0.0.0.0:10256`).
//!
//! A minimal `std::net` server rather than an HTTP crate: three fixed GET endpoints do not
//! need a framework, and a small server is easy to bound. One accept thread; each
//! connection gets a thread, at most [`MAX_CONNECTIONS`] at once (more are answered `503`
//! at once); a request (line and headers) must fit in [`MAX_REQUEST_BYTES`] and arrive
//! within [`IO_TIMEOUT`]; only `GET` and `HEAD`; one request per connection
//! (`Connection: close`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kxp_dataplane::verdict::Counters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::controller::TableCounts;
use crate::http::{ConnectionLimit, HttpServer, Limits, OverCapacity, Request};

/// kube-proxy's metrics port.
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
/// kube-proxy's healthz port.
pub const DEFAULT_HEALTHZ_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);
/// kube-proxy uses twice its sync period (2 x 30 s).
pub const DEFAULT_HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Request line and headers, at most.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Read and write timeout of a connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The OpenMetrics text format `prometheus-client` writes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Returns copies of each worker's counters (index = worker).
pub type CounterSource = Box<dyn Fn() -> Vec<Counters> + Send + Sync>;

/// Returns each worker's AF_XDP driver counters as (name, value) (index = worker).
pub type DriverCounterSource = Box<dyn Fn() -> Vec<Vec<(&'static str, u64)>> + Send + Sync>;

type CodeLabels = [(&'static str, &'static str); 1];

/// Sync metrics and health state, shared by the controller (writer), the ops server and
/// anyone else who wants to read them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    service_changes: Counter,
    endpoint_changes: Counter,
    healthz_total: Family<CodeLabels, Counter>,
    livez_total: Family<CodeLabels, Counter>,
    services: Gauge,
    service_ports: Gauge,
    endpoints: Gauge,
    frontends: Gauge,
    config_errors: Gauge,
    generation: Gauge,
    syncs: Counter,
    source_disconnects: Counter,
    dataplane: Arc<DataplaneCollector>,
    health: Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    timeout: Duration,
    last_updated: Option<(Instant, SystemTime)>,
    oldest_pending: Option<(Instant, SystemTime)>,
    node_eligible: bool,
}

/// The health of the proxy at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// `/healthz`: synced at least once, no queued change older than the timeout, and the
    /// node is eligible.
    pub healthy: bool,
    /// `/livez`: no queued change older than the timeout.
    pub live: bool,
    pub node_eligible: bool,
    /// End of the last sync.
    pub last_synced: Option<SystemTime>,
    /// When the oldest change not yet synced was seen.
    pub oldest_pending: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl Metrics {
    /// `healthz_timeout`: how long a queued change may wait for a sync before the proxy is
    /// unhealthy.
    pub fn new(healthz_timeout: Duration) -> Arc<Self> {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds (kxp: compile and publish)",
            sync_duration.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync.clone(),
        );
        let last_queued = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued (kxp: the oldest change not yet synced)",
            last_queued.clone(),
        );
        let service_changes = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes.clone(),
        );
        let endpoint_changes = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes.clone(),
        );
        let healthz_total = Family::<CodeLabels, Counter>::default();
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            healthz_total.clone(),
        );
        let livez_total = Family::<CodeLabels, Counter>::default();
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            livez_total.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let services = gauge(
            &mut registry,
            "kxp_services",
            "Services in the published table",
        );
        let service_ports = gauge(
            &mut registry,
            "kxp_service_ports",
            "Service ports (per IP family) in the published table",
        );
        let endpoints = gauge(
            &mut registry,
            "kxp_endpoints",
            "Endpoints in the published table, summed over service ports",
        );
        let frontends = gauge(
            &mut registry,
            "kxp_frontends",
            "Frontends (address, protocol, port) in the published table",
        );
        let config_errors = gauge(
            &mut registry,
            "kxp_config_errors",
            "Configuration errors in the last sync (the objects concerned are left out)",
        );
        let generation = gauge(
            &mut registry,
            "kxp_table_generation",
            "Generation of the published service table",
        );
        let syncs = Counter::default();
        registry.register("kxp_syncs", "Syncs done", syncs.clone());
        let source_disconnects = Counter::default();
        registry.register(
            "kxp_source_disconnects",
            "Times a source lost its connection (the last good tables stay)",
            source_disconnects.clone(),
        );
        let dataplane = Arc::new(DataplaneCollector::default());
        registry.register_collector(Box::new(Arc::clone(&dataplane)));

        Arc::new(Self {
            registry,
            sync_duration,
            last_sync,
            last_queued,
            service_changes,
            endpoint_changes,
            healthz_total,
            livez_total,
            services,
            service_ports,
            endpoints,
            frontends,
            config_errors,
            generation,
            syncs,
            source_disconnects,
            dataplane,
            health: Mutex::new(HealthState {
                timeout: healthz_timeout,
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
            }),
        })
    }

    /// A change was seen that a sync has yet to publish. Only the first one since the last
    /// sync counts for health (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self) {
        let mut h = self.lock_health();
        if h.oldest_pending.is_none() {
            let wall = SystemTime::now();
            h.oldest_pending = Some((Instant::now(), wall));
            self.last_queued.set(unix_seconds(wall));
        }
    }

    /// Services and EndpointSlices that changed in a source's new view.
    pub fn changes(&self, services: u64, endpoint_slices: u64) {
        self.service_changes.inc_by(services);
        self.endpoint_changes.inc_by(endpoint_slices);
    }

    /// A sync published tables (kube-proxy's `Updated`).
    pub fn synced(
        &self,
        duration: Duration,
        counts: &TableCounts,
        config_errors: usize,
        generation: u64,
    ) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.services.set(counts.services as i64);
        self.service_ports.set(counts.service_ports as i64);
        self.endpoints.set(counts.endpoints as i64);
        self.frontends.set(counts.frontends as i64);
        self.config_errors.set(config_errors as i64);
        self.generation.set(generation as i64);
        self.syncs.inc();
        let wall = SystemTime::now();
        self.last_sync.set(unix_seconds(wall));
        let mut h = self.lock_health();
        h.oldest_pending = None;
        h.last_updated = Some((Instant::now(), wall));
    }

    /// A source lost its connection.
    pub fn source_disconnected(&self) {
        self.source_disconnects.inc();
    }

    /// Marks the node ineligible (being deleted, or tainted for deletion by the cluster
    /// autoscaler): `/healthz` then fails so that load balancers drain it, as kube-proxy
    /// does.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock_health().node_eligible = eligible;
    }

    /// Where the dataplane counters come from, read on each scrape.
    pub fn set_dataplane_counters(
        &self,
        source: impl Fn() -> Vec<Counters> + Send + Sync + 'static,
    ) {
        *self
            .dataplane
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(source));
    }

    /// Where the AF_XDP driver counters come from, read on each scrape.
    pub fn set_driver_counters(
        &self,
        source: impl Fn() -> Vec<Vec<(&'static str, u64)>> + Send + Sync + 'static,
    ) {
        *self
            .dataplane
            .driver
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(source));
    }

    pub fn health(&self) -> Health {
        self.health_at(Instant::now(), SystemTime::now())
    }

    /// The health at `now` (`wall` is the same moment on the wall clock).
    pub fn health_at(&self, now: Instant, wall: SystemTime) -> Health {
        let h = self.lock_health();
        let late = h
            .oldest_pending
            .is_some_and(|(at, _)| now.saturating_duration_since(at) >= h.timeout);
        Health {
            healthy: h.last_updated.is_some() && !late && h.node_eligible,
            live: !late,
            node_eligible: h.node_eligible,
            last_synced: h.last_updated.map(|(_, w)| w),
            oldest_pending: h.oldest_pending.map(|(_, w)| w),
            current_time: wall,
        }
    }

    /// Every metric, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a collector's error would only truncate.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads the workers' counters at scrape time.
#[derive(Default)]
struct DataplaneCollector {
    source: RwLock<Option<CounterSource>>,
    driver: RwLock<Option<DriverCounterSource>>,
}

impl std::fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataplaneCollector").finish_non_exhaustive()
    }
}

const VERDICTS: [&str; 4] = ["forward", "pass", "drop", "reject"];

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let drivers = match &*self.driver.read().unwrap_or_else(|e| e.into_inner()) {
            Some(source) => source(),
            None => Vec::new(),
        };
        if !drivers.is_empty() {
            let mut family = encoder.encode_descriptor(
                "kxp_afxdp_driver",
                "AF_XDP driver counters (frames, kicks, ring-full drops, the kernel's socket statistics), per worker",
                None,
                MetricType::Counter,
            )?;
            for (worker, counters) in drivers.iter().enumerate() {
                let worker = worker.to_string();
                for (name, value) in counters {
                    let labels = [("worker", worker.as_str()), ("counter", *name)];
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(value, None)?;
                }
            }
        }
        let workers = match &*self.source.read().unwrap_or_else(|e| e.into_inner()) {
            Some(source) => source(),
            None => return Ok(()),
        };
        if workers.is_empty() {
            return Ok(());
        }
        let named: Vec<(String, Vec<(String, u64)>)> = workers
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c.named()))
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "kxp_dataplane_frames",
                "Frames by verdict and reason, per worker",
                None,
                MetricType::Counter,
            )?;
            for (worker, counters) in &named {
                for (name, value) in counters {
                    let Some((verdict, reason)) = name.split_once('_') else {
                        continue;
                    };
                    if !VERDICTS.contains(&verdict) {
                        continue;
                    }
                    let labels = [
                        ("worker", worker.as_str()),
                        ("verdict", verdict),
                        ("reason", reason),
                    ];
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(value, None)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "kxp_dataplane_events",
            "Other worker counters (IPv4 options, VLAN tags, affinity table full, flows purged by a new table generation), per worker",
            None,
            MetricType::Counter,
        )?;
        for (worker, counters) in &named {
            for (name, value) in counters {
                let is_verdict = name
                    .split_once('_')
                    .is_some_and(|(v, _)| VERDICTS.contains(&v));
                // `frames` is the sum of the verdicts.
                if is_verdict || name == "frames" {
                    continue;
                }
                let labels = [("worker", worker.as_str()), ("event", name.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(value, None)?;
            }
        }
        Ok(())
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// RFC 3339 in UTC, to the millisecond (`0001-01-01T00:00:00Z` for `None`, like Go's zero
/// time).
pub fn rfc3339(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01T00:00:00Z".into();
    };
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pub use crate::http::Response;

/// What a server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// `/healthz`, `/livez` and `/metrics` (kube-proxy's metrics server serves health too).
    All,
    /// `/healthz` and `/livez` only, for a server exposed beyond localhost (cloud load
    /// balancers' health checks), as kube-proxy's healthz server.
    HealthOnly,
}

/// Answers one request (method and request target as sent).
pub fn route(metrics: &Metrics, routes: Routes, method: &str, target: &str) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "method not allowed");
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match path {
        "/healthz" | "/livez" => {
            let h = metrics.health();
            let (ok, family) = if path == "/healthz" {
                (h.healthy, &metrics.healthz_total)
            } else {
                (h.live, &metrics.livez_total)
            };
            let code = if ok { "200" } else { "503" };
            family.get_or_create(&[("code", code)]).inc();
            let now = rfc3339(Some(h.current_time));
            let last_updated = if ok {
                now.clone()
            } else {
                rfc3339(h.last_synced)
            };
            Response {
                status: if ok { 200 } else { 503 },
                content_type: "application/json",
                body: format!(
                    "{{\"lastUpdated\": \"{last_updated}\",\"currentTime\": \"{now}\", \
                     \"lastSynced\": \"{}\", \"nodeEligible\": {}}}",
                    rfc3339(h.last_synced),
                    h.node_eligible
                ),
            }
        }
        "/metrics" if routes == Routes::All => Response {
            status: 200,
            content_type: METRICS_CONTENT_TYPE,
            body: metrics.encode(),
        },
        _ => Response::text(404, "not found"),
    }
}

/// A running ops server. Stopping (or dropping) it stops and joins its accept thread;
/// connections being served finish on their own (within [`IO_TIMEOUT`]).
#[derive(Debug)]
pub struct OpsServer {
    server: HttpServer,
}

impl OpsServer {
    /// Binds `addr` (port 0: an ephemeral port, see [`local_addr`](Self::local_addr)) and
    /// serves `/healthz`, `/livez` and `/metrics` from `metrics`.
    pub fn bind(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<Self> {
        Self::bind_routes(addr, metrics, Routes::All)
    }

    /// Like [`bind`](Self::bind), answering only `routes`.
    pub fn bind_routes(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        routes: Routes,
    ) -> io::Result<Self> {
        let limits = Limits {
            max_request_bytes: MAX_REQUEST_BYTES,
            io_timeout: IO_TIMEOUT,
            over_capacity: OverCapacity::Answer503,
        };
        let handler = move |r: &Request<'_>| {
            if !r.target.starts_with('/') {
                return Response::text(400, "bad request");
            }
            route(&metrics, routes, r.method, r.target)
        };
        let server = HttpServer::bind(
            addr,
            "kxp-ops",
            limits,
            ConnectionLimit::new(MAX_CONNECTIONS),
            Arc::new(handler),
        )?;
        Ok(Self { server })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn stop(self) {
        self.server.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(Some(UNIX_EPOCH)), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // leap year, Feb 29
        assert_eq!(rfc3339(Some(t)), "2024-02-29T12:34:56.789Z");
        assert_eq!(rfc3339(None), "0001-01-01T00:00:00Z");
    }

    #[test]
    fn health_follows_queued_and_synced() {
        let m = Metrics::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let h = m.health_at(t0, wall);
        assert!(!h.healthy && h.live, "not synced yet: unhealthy but live");
        m.synced(Duration::from_millis(1), &TableCounts::default(), 0, 1);
        assert!(m.health_at(Instant::now(), wall).healthy);
        m.queued();
        let h = m.health_at(Instant::now(), wall);
        assert!(
            h.healthy && h.oldest_pending.is_some(),
            "a fresh queued change"
        );
        let late = Instant::now() + Duration::from_secs(11);
        let h = m.health_at(late, wall);
        assert!(
            !h.healthy && !h.live,
            "a queued change older than the timeout"
        );
        m.synced(Duration::from_millis(1), &TableCounts::default(), 0, 2);
        assert!(m.health_at(late, wall).healthy);
        m.set_node_eligible(false);
        let h = m.health_at(late, wall);
        assert!(!h.healthy && h.live);
    }

    #[test]
    fn routes() {
        let m = Metrics::new(Duration::from_secs(10));
        let all = Routes::All;
        assert_eq!(route(&m, all, "POST", "/healthz").status, 405);
        assert_eq!(route(&m, all, "GET", "/nope").status, 404);
        assert_eq!(route(&m, all, "GET", "/livez").status, 200);
        assert_eq!(route(&m, Routes::HealthOnly, "GET", "/metrics").status, 404);
        assert_eq!(route(&m, Routes::HealthOnly, "GET", "/livez").status, 200);
        let r = route(&m, all, "GET", "/healthz?verbose");
        assert_eq!(r.status, 503);
        assert!(
            r.body.contains("\"lastUpdated\": \"0001-01-01T00:00:00Z\""),
            "{}",
            r.body
        );
        let metrics = route(&m, all, "GET", "/metrics").body;
        assert!(
            metrics.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 1"),
            "{metrics}"
        );
        assert!(metrics.ends_with("# EOF\n"));
    }

    #[test]
    fn dataplane_counters_are_labelled_families() {
        let m = Metrics::new(Duration::from_secs(10));
        m.set_dataplane_counters(|| {
            let mut forwarded = Counters::default().forwarded;
            forwarded[0] = 2;
            let a = Counters {
                frames: 3,
                forwarded,
                vlan_tagged: 1,
                ..Counters::default()
            };
            vec![a, Counters::default()]
        });
        let text = m.encode();
        assert!(
            text.contains("# TYPE kxp_dataplane_frames counter"),
            "{text}"
        );
        let first = Counters::default().named()[1].0.clone(); // forward_<first reason>
        let reason = first.strip_prefix("forward_").unwrap();
        assert!(
            text.contains(&format!(
                "kxp_dataplane_frames_total{{worker=\"0\",verdict=\"forward\",reason=\"{reason}\"}} 2"
            )),
            "{text}"
        );
        assert!(
            text.contains("kxp_dataplane_events_total{worker=\"0\",event=\"vlan_tagged\"} 1"),
            "{text}"
        );
        assert!(text.contains("worker=\"1\""));
    }

    #[test]
    fn driver_counters_are_a_labelled_family() {
        let m = Metrics::new(Duration::from_secs(10));
        m.set_driver_counters(|| {
            vec![
                vec![("tx_ring_full", 7), ("tx_kicks", 3)],
                vec![("tx_ring_full", 0)],
            ]
        });
        let text = m.encode();
        assert!(text.contains("# TYPE kxp_afxdp_driver counter"), "{text}");
        assert!(
            text.contains("kxp_afxdp_driver_total{worker=\"0\",counter=\"tx_ring_full\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("kxp_afxdp_driver_total{worker=\"1\",counter=\"tx_ring_full\"} 0"),
            "{text}"
        );
    }
}
