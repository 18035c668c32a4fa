//! Service health check node ports, as kube-proxy's service health server answers them
//! (`pkg/proxy/healthcheck/service_health.go`).
//!
//! Every LoadBalancer service with `externalTrafficPolicy: Local` has a
//! `healthCheckNodePort`; cloud load balancers probe it on every node to learn which nodes
//! have endpoints for the service (external traffic arriving on a node without one is
//! dropped). kxp serves one HTTP server per such service, fed by
//! [`Compiled::health_checks`](crate::compile::Compiled::health_checks):
//!
//! * any request (kube-proxy's handler ignores the method and the path) is answered
//!   `200 OK` when the node has at least one ready endpoint of the service and the proxy is
//!   healthy, else `503 Service Unavailable`, with `Content-Type: application/json`,
//!   `X-Content-Type-Options: nosniff` and kube-proxy's body, byte for byte (indented
//!   with tabs, shown here as spaces; see [`response_body`]):
//!
//!   ```text
//!   {
//!       "service": {
//!           "namespace": "ns",
//!           "name": "name"
//!       },
//!       "localEndpoints": 1,
//!       "serviceProxyHealthy": true
//!   }
//!   ```
//!
//!   `localEndpoints` counts distinct addresses of ready endpoints on this node
//!   (terminating ones do not count, so that load balancers stop sending new traffic to a
//!   node whose endpoints are draining). `HEAD` gets the headers only.
//! * [`HealthCheckServers::sync`] takes the full list after each sync: servers of services
//!   that are gone (or whose port changed) are closed, new ones opened, counts updated in
//!   place (a server that stays is not reopened). A port that cannot be bound is reported
//!   and tried again at the next sync, as kube-proxy does.
//! * Each server listens on every address of [`HealthCheckConfig::addresses`]: `0.0.0.0`
//!   by default (kube-proxy listens on every address, or on the `nodePortAddresses` when
//!   they are set; on an IPv6 node use `::`, which on Linux also takes IPv4).
//! * The proxy's own health comes from a callback ([`HealthCheckServers::with_metrics`]
//!   uses the ops [`Metrics`]' `/healthz` verdict), as kube-proxy consults its healthz
//!   server.
//!
//! The servers are [`crate::http`]'s, like [`ops`](crate::ops)': one accept thread per
//! address, a thread per connection, at most [`MAX_CONNECTIONS`] connections at once over
//! all servers (more are closed unanswered), a request head of at most
//! [`MAX_REQUEST_BYTES`] read within [`IO_TIMEOUT`], one request per connection.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::compile::HealthCheckNodePort;
use crate::http::{ConnectionLimit, HttpServer, Limits, OverCapacity, Request, Response};
use crate::ops::Metrics;

/// Connections served at once, over every health check server.
pub const MAX_CONNECTIONS: usize = 64;
/// Request line and headers, at most.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// Read and write timeout of a connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Where health check servers listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Every server listens on each of these addresses (on the service's port).
    pub addresses: Vec<IpAddr>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            addresses: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
        }
    }
}

/// Whether the proxy itself is healthy (`serviceProxyHealthy`).
pub type ProxyHealth = Arc<dyn Fn() -> bool + Send + Sync>;

/// A port that could not be opened.
#[derive(Debug)]
pub struct HealthCheckError {
    /// `namespace/name`.
    pub service: String,
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl std::fmt::Display for HealthCheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: health check node port {}: {}",
            self.service, self.addr, self.error
        )
    }
}

/// What one [`HealthCheckServers::sync`] changed.
#[derive(Debug, Default)]
pub struct HealthCheckSync {
    /// `namespace/name:port` of the servers opened.
    pub opened: Vec<String>,
    /// `namespace/name:port` of the servers closed.
    pub closed: Vec<String>,
    /// Ports that could not be opened (tried again at the next sync).
    pub errors: Vec<HealthCheckError>,
}

/// What a server answers for: read by its connection threads, written by `sync`.
#[derive(Debug)]
struct ServiceState {
    namespace: String,
    name: String,
    local_endpoints: AtomicUsize,
}

/// The servers of every service that needs one.
pub struct HealthCheckServers {
    config: HealthCheckConfig,
    proxy_healthy: ProxyHealth,
    services: Mutex<BTreeMap<(String, String), Instance>>,
    connections: ConnectionLimit,
}

impl std::fmt::Debug for HealthCheckServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCheckServers")
            .field("config", &self.config)
            .field("services", &self.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Instance {
    port: u16,
    state: Arc<ServiceState>,
    listeners: Vec<Listener>,
}

impl HealthCheckServers {
    /// No servers yet; the proxy counts as healthy until told otherwise.
    pub fn new(config: HealthCheckConfig) -> Self {
        Self {
            config,
            proxy_healthy: Arc::new(|| true),
            services: Mutex::new(BTreeMap::new()),
            connections: ConnectionLimit::new(MAX_CONNECTIONS),
        }
    }

    /// Takes the proxy's health from `healthy` (answers are `503` while it is false).
    pub fn with_proxy_health(mut self, healthy: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.proxy_healthy = Arc::new(healthy);
        self
    }

    /// Takes the proxy's health from the ops metrics (`/healthz`).
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        self.with_proxy_health(move || metrics.health().healthy)
    }

    pub fn config(&self) -> &HealthCheckConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), Instance>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the served set `checks` (one entry per service; a later duplicate of a
    /// service is ignored): closes the servers of services no longer listed or listed on
    /// another port, opens the new ones, updates the endpoint counts of all.
    pub fn sync(&self, checks: &[HealthCheckNodePort]) -> HealthCheckSync {
        let mut wanted: BTreeMap<(String, String), &HealthCheckNodePort> = BTreeMap::new();
        for c in checks {
            wanted
                .entry((c.namespace.clone(), c.name.clone()))
                .or_insert(c);
        }
        let mut out = HealthCheckSync::default();
        let mut services = self.lock();

        let stale: Vec<(String, String)> = services
            .iter()
            .filter(|(k, i)| wanted.get(*k).is_none_or(|c| c.port != i.port))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(instance) = services.remove(&key) {
                tracing::info!(service = %format!("{}/{}", key.0, key.1), port = instance.port, "closing health check");
                out.closed
                    .push(format!("{}/{}:{}", key.0, key.1, instance.port));
                drop(instance);
            }
        }

        for (key, check) in wanted {
            if let Some(instance) = services.get(&key) {
                instance
                    .state
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::SeqCst);
                continue;
            }
            let state = Arc::new(ServiceState {
                namespace: check.namespace.clone(),
                name: check.name.clone(),
                local_endpoints: AtomicUsize::new(check.local_endpoints),
            });
            match self.open(check.port, &state) {
                Ok(listeners) => {
                    tracing::info!(service = %format!("{}/{}", key.0, key.1), port = check.port, "opened health check");
                    out.opened
                        .push(format!("{}/{}:{}", key.0, key.1, check.port));
                    services.insert(
                        key,
                        Instance {
                            port: check.port,
                            state,
                            listeners,
                        },
                    );
                }
                Err((addr, error)) => {
                    let e = HealthCheckError {
                        service: format!("{}/{}", key.0, key.1),
                        addr,
                        error,
                    };
                    tracing::warn!("failed to start health check: {e}");
                    out.errors.push(e);
                }
            }
        }
        out
    }

    /// Binds the port on every configured address; on a failure, closes what it opened.
    fn open(
        &self,
        port: u16,
        state: &Arc<ServiceState>,
    ) -> Result<Vec<Listener>, (SocketAddr, io::Error)> {
        let mut listeners = Vec::with_capacity(self.config.addresses.len());
        for ip in &self.config.addresses {
            let addr = SocketAddr::new(*ip, port);
            let listener = spawn_listener(
                addr,
                Arc::clone(state),
                Arc::clone(&self.proxy_healthy),
                self.connections.clone(),
            )
            .map_err(|e| (addr, e))?;
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// The served services: `(namespace, name, port, local endpoints, bound addresses)`.
    pub fn served(&self) -> Vec<(String, String, u16, usize, Vec<SocketAddr>)> {
        self.lock()
            .iter()
            .map(|((ns, name), i)| {
                (
                    ns.clone(),
                    name.clone(),
                    i.port,
                    i.state.local_endpoints.load(Ordering::SeqCst),
                    i.listeners.iter().map(|l| l.local_addr()).collect(),
                )
            })
            .collect()
    }

    /// Closes every server.
    pub fn close_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// One server on one address (dropping it stops it and closes the port).
type Listener = HttpServer;

/// Serves `state` on `addr`: any method, any path (kube-proxy's handler looks at neither).
fn spawn_listener(
    addr: SocketAddr,
    state: Arc<ServiceState>,
    healthy: ProxyHealth,
    connections: ConnectionLimit,
) -> io::Result<Listener> {
    let limits = Limits {
        max_request_bytes: MAX_REQUEST_BYTES,
        io_timeout: IO_TIMEOUT,
        over_capacity: OverCapacity::Close,
    };
    let handler = move |_: &Request<'_>| {
        let healthy = healthy();
        let count = state.local_endpoints.load(Ordering::SeqCst);
        Response {
            status: if count != 0 && healthy { 200 } else { 503 },
            content_type: "application/json",
            body: response_body(&state.namespace, &state.name, count, healthy),
        }
    };
    HttpServer::bind(
        addr,
        "kxp-healthcheck",
        limits,
        connections,
        Arc::new(handler),
    )
}

/// kube-proxy's answer body for a service (namespace, name, count, proxy health).
pub fn response_body(namespace: &str, name: &str, local_endpoints: usize, healthy: bool) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quote(namespace),
        quote(name)
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn loopback() -> HealthCheckConfig {
        HealthCheckConfig {
            addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }
    }

    /// A port free right now (bound to port 0, then released).
    fn free_port() -> u16 {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn check(ns: &str, name: &str, port: u16, n: usize) -> HealthCheckNodePort {
        HealthCheckNodePort {
            namespace: ns.into(),
            name: name.into(),
            port,
            local_endpoints: n,
        }
    }

    /// (status, headers, body) of `method /path` on 127.0.0.1:`port`.
    fn request(port: u16, method: &str) -> io::Result<(u16, String, String)> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "{method} /anything HTTP/1.1\r\nHost: lb\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, head.to_string(), body.to_string()))
    }

    #[test]
    fn body_is_kube_proxys() {
        assert_eq!(
            response_body("ns", "name", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"name\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&response_body("a\"b", "c", 0, false)).unwrap();
        assert_eq!(v["service"]["namespace"], "a\"b");
    }

    #[test]
    fn answers_200_with_endpoints_503_without_and_closes_when_gone() {
        let servers = HealthCheckServers::new(loopback());
        let (p1, p2) = (free_port(), free_port());
        let s = servers.sync(&[check("web", "a", p1, 2), check("web", "b", p2, 0)]);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.opened, [format!("web/a:{p1}"), format!("web/b:{p2}")]);

        let (status, head, body) = request(p1, "GET").unwrap();
        assert_eq!(status, 200);
        assert!(head.contains("Content-Type: application/json"), "{head}");
        assert!(head.contains("X-Content-Type-Options: nosniff"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "web", "name": "a"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let (status, _, body) = request(p2, "GET").unwrap();
        assert_eq!(status, 503);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["localEndpoints"],
            0
        );
        // HEAD: headers only.
        let (status, _, body) = request(p1, "HEAD").unwrap();
        assert_eq!((status, body.as_str()), (200, ""));

        // Counts change in place; b goes away and its port closes.
        let s = servers.sync(&[check("web", "a", p1, 0)]);
        assert!(s.opened.is_empty());
        assert_eq!(s.closed, [format!("web/b:{p2}")]);
        assert_eq!(request(p1, "GET").unwrap().0, 503);
        let gone = request(p2, "GET");
        assert!(
            gone.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "{gone:?}"
        );
        assert_eq!(servers.served().len(), 1);

        // A new port for a: the old one closes, the new one answers.
        let p3 = free_port();
        let s = servers.sync(&[check("web", "a", p3, 1)]);
        assert_eq!(s.closed, [format!("web/a:{p1}")]);
        assert_eq!(request(p3, "GET").unwrap().0, 200);
        assert!(request(p1, "GET").is_err());

        servers.sync(&[]);
        assert!(request(p3, "GET").is_err());
        assert!(servers.served().is_empty());
    }

    #[test]
    fn an_unhealthy_proxy_answers_503() {
        let ok = Arc::new(AtomicBool::new(false));
        let servers = HealthCheckServers::new(loopback()).with_proxy_health({
            let ok = Arc::clone(&ok);
            move || ok.load(Ordering::SeqCst)
        });
        let p = free_port();
        servers.sync(&[check("ns", "svc", p, 3)]);
        let (status, _, body) = request(p, "GET").unwrap();
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["serviceProxyHealthy"], false);
        assert_eq!(v["localEndpoints"], 3);
        ok.store(true, Ordering::SeqCst);
        assert_eq!(request(p, "GET").unwrap().0, 200);
    }

    #[test]
    fn a_taken_port_is_reported_and_retried() {
        let blocker = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p = blocker.local_addr().unwrap().port();
        let servers = HealthCheckServers::new(loopback());
        let s = servers.sync(&[check("ns", "svc", p, 1)]);
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].service, "ns/svc");
        assert!(servers.served().is_empty());
        drop(blocker);
        let s = servers.sync(&[check("ns", "svc", p, 1)]);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(request(p, "GET").unwrap().0, 200);
    }
}
