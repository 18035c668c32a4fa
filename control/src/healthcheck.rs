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
//! Small `std::net` servers, like [`ops`](crate::ops): one accept thread per address, a
//! thread per connection, at most [`MAX_CONNECTIONS`] connections at once over all
//! servers (more are closed unanswered), a request head of at most
//! [`MAX_REQUEST_BYTES`] read within [`IO_TIMEOUT`], one request per connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::compile::HealthCheckNodePort;
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
    connections: Arc<AtomicUsize>,
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
            connections: Arc::new(AtomicUsize::new(0)),
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
            let listener = Listener::spawn(
                addr,
                Arc::clone(state),
                Arc::clone(&self.proxy_healthy),
                Arc::clone(&self.connections),
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
                    i.listeners.iter().map(|l| l.addr).collect(),
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

/// One accept thread on one address. Dropping it stops and joins the thread, which closes
/// the socket.
#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn spawn(
        addr: SocketAddr,
        state: Arc<ServiceState>,
        healthy: ProxyHealth,
        connections: Arc<AtomicUsize>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("kxp-healthcheck".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || accept_loop(&listener, &state, &healthy, &connections, &stop)
            })?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                let _ = thread.join();
            }
            // Cannot wake it: it exits (and closes the port) at its next connection.
            Err(e) => {
                tracing::warn!(addr = %self.addr, error = %e, "health check server not joined");
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    state: &Arc<ServiceState>,
    healthy: &ProxyHealth,
    connections: &Arc<AtomicUsize>,
    stop: &AtomicBool,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::debug!(error = %e, "health check accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            continue; // closed unanswered
        }
        let state = Arc::clone(state);
        let healthy = Arc::clone(healthy);
        let done = Arc::clone(connections);
        let spawned = std::thread::Builder::new()
            .name("kxp-healthcheck-conn".into())
            .spawn(move || {
                serve(stream, &state, healthy());
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
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

/// Reads one request head and answers it.
fn serve(mut stream: TcpStream, state: &ServiceState, healthy: bool) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    let head_end = loop {
        if let Some(end) = find_head_end(&buf[..len]) {
            break end;
        }
        if len == buf.len() {
            let _ = write_response(&stream, 431, "request too large\n", "text/plain", false);
            return;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(_target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        let _ = write_response(&stream, 400, "bad request\n", "text/plain", false);
        return;
    };
    if !version.starts_with("HTTP/1.") {
        let _ = write_response(&stream, 400, "bad request\n", "text/plain", false);
        return;
    }
    let count = state.local_endpoints.load(Ordering::SeqCst);
    let status = if count != 0 && healthy { 200 } else { 503 };
    let body = response_body(&state.namespace, &state.name, count, healthy);
    let _ = write_response(&stream, status, &body, "application/json", method == "HEAD");
}

/// The end of the request head (`\r\n\r\n`, or `\n\n` from lenient clients).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn write_response(
    mut stream: &TcpStream,
    status: u16,
    body: &str,
    content_type: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
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
