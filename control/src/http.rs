//! The small HTTP/1.1 server behind the ops endpoints ([`ops`](crate::ops): `/healthz`,
//! `/livez`, `/metrics`) and the service health check node ports
//! ([`healthcheck`](crate::healthcheck)). Both answer one short GET or HEAD per
//! connection, so this is `std::net` and threads, nothing more:
//!
//! * one accept thread per listening address; a thread per connection, at most
//!   [`ConnectionLimit::max`] at once (shared by as many servers as hold the same limit);
//!   past it a connection is answered `503` or closed unanswered
//!   ([`OverCapacity`]);
//! * a request head of at most [`Limits::max_request_bytes`] (`431` beyond), read and
//!   answered within [`Limits::io_timeout`]; a malformed request line gets `400`;
//! * the handler sees the method and the request target and returns a [`Response`];
//!   `HEAD` gets its headers only; every answer carries `Connection: close` and
//!   `X-Content-Type-Options: nosniff`, as kube-proxy's servers do;
//! * stopping (or dropping) a server stops and joins its accept thread (woken with a
//!   connection of its own); connections being served finish within the I/O timeout.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    /// A plain-text answer (`body` and a newline).
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

/// One request as the handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target as sent (path and query).
    pub target: &'a str,
}

/// What answers requests.
pub type Handler = Arc<dyn Fn(&Request<'_>) -> Response + Send + Sync>;

/// What happens to a connection beyond [`ConnectionLimit::max`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverCapacity {
    /// `503 too many connections` (written with a short timeout), then closed.
    Answer503,
    /// Closed unanswered (kube-proxy's health check servers' behaviour).
    Close,
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line and headers, at most.
    pub max_request_bytes: usize,
    /// Read and write timeout of a connection.
    pub io_timeout: Duration,
    pub over_capacity: OverCapacity,
}

/// Connections served at once, counted over every server that holds a clone.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    active: Arc<AtomicUsize>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            active: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    fn try_acquire(&self) -> bool {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn release(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running server on one address. Stopping or dropping it joins its accept thread.
pub struct HttpServer {
    addr: SocketAddr,
    /// Names the server in logs.
    name: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `addr` (port 0: an ephemeral port, see [`local_addr`](Self::local_addr)) and
    /// serves it with `handler` on threads named after `name`.
    pub fn bind(
        addr: SocketAddr,
        name: &'static str,
        limits: Limits,
        connections: ConnectionLimit,
        handler: Handler,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name(name.into()).spawn({
            let stop = Arc::clone(&stop);
            move || accept_loop(&listener, name, limits, &connections, &handler, &stop)
        })?;
        Ok(Self {
            addr,
            name,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
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
                tracing::warn!(server = self.name, addr = %self.addr, error = %e, "server not joined")
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: &TcpListener,
    name: &'static str,
    limits: Limits,
    connections: &ConnectionLimit,
    handler: &Handler,
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
                tracing::debug!(server = name, error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if !connections.try_acquire() {
            if limits.over_capacity == OverCapacity::Answer503 {
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                let _ =
                    write_response(&stream, &Response::text(503, "too many connections"), false);
            }
            continue;
        }
        let handler = Arc::clone(handler);
        let done = connections.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || {
                serve(stream, limits, &handler);
                done.release();
            });
        if spawned.is_err() {
            connections.release();
        }
    }
}

/// Reads one request head and answers it.
fn serve(mut stream: TcpStream, limits: Limits, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(limits.io_timeout));
    let _ = stream.set_write_timeout(Some(limits.io_timeout));
    let mut buf = vec![0u8; limits.max_request_bytes];
    let mut len = 0;
    let head_end = loop {
        if let Some(end) = find_head_end(&buf[..len]) {
            break end;
        }
        if len == buf.len() {
            let _ = write_response(&stream, &Response::text(431, "request too large"), false);
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
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        let _ = write_response(&stream, &Response::text(400, "bad request"), false);
        return;
    };
    if !version.starts_with("HTTP/1.") {
        let _ = write_response(&stream, &Response::text(400, "bad request"), false);
        return;
    }
    let response = handler(&Request { method, target });
    let _ = write_response(&stream, &response, method == "HEAD");
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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(mut stream: &TcpStream, r: &Response, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    if r.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&r.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).expect("connects");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn server(max: usize, over: OverCapacity) -> HttpServer {
        let limits = Limits {
            max_request_bytes: 256,
            io_timeout: Duration::from_secs(2),
            over_capacity: over,
        };
        HttpServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            "kxp-http-test",
            limits,
            ConnectionLimit::new(max),
            Arc::new(|r: &Request<'_>| Response::text(200, &format!("{} {}", r.method, r.target))),
        )
        .expect("binds")
    }

    #[test]
    fn answers_get_and_head_and_refuses_garbage() {
        let s = server(4, OverCapacity::Answer503);
        let a = s.local_addr();
        let get = request(a, b"GET /x?y HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("Connection: close\r\n") && get.contains("nosniff"));
        assert!(get.ends_with("\r\n\r\nGET /x?y\n"), "{get}");
        let head = request(a, b"HEAD / HTTP/1.0\n\n");
        assert!(
            head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(head.contains("Content-Length: 7\r\n"), "{head}");
        assert!(request(a, b"nonsense\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(request(a, b"GET / SPDY/3\r\n\r\n").starts_with("HTTP/1.1 400 "));
        let big = [b'a'; 300];
        assert!(request(a, &big).starts_with("HTTP/1.1 431 "));
        s.stop();
        assert!(TcpStream::connect(a).is_err(), "port still open after stop");
    }

    #[test]
    fn over_capacity_is_answered_or_closed() {
        for (over, want) in [
            (OverCapacity::Answer503, "HTTP/1.1 503 "),
            (OverCapacity::Close, ""),
        ] {
            let s = server(1, over);
            let a = s.local_addr();
            // Holds the only slot: connected, request not finished.
            let mut hold = TcpStream::connect(a).unwrap();
            hold.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let answer = request(a, b"GET / HTTP/1.1\r\n\r\n");
            assert!(answer.starts_with(want), "{over:?}: {answer:?}");
            if want.is_empty() {
                assert!(answer.is_empty(), "{answer:?}");
            }
            hold.write_all(b"\r\n").unwrap();
            let mut rest = String::new();
            let _ = hold.read_to_string(&mut rest);
            assert!(rest.starts_with("HTTP/1.1 200 "), "{rest}");
        }
    }
}
