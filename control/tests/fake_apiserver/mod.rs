//! A fake Kubernetes API server for tests: plain HTTP/1.1 on 127.0.0.1, written by hand on
//! tokio sockets, speaking the list/watch protocol the way kube-apiserver does, so that a
//! real client (the `kube` crate) can run against it end to end.
//!
//! Supported:
//!
//! * Collections `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices` and
//!   `/api/v1/nodes` (all namespaces), `GET` only, bearer-token authentication (401
//!   without the kubeconfig's token), 404 `Status` for anything else, keep-alive.
//! * Lists: `{kind}List` JSON with `metadata.resourceVersion`; items without
//!   `apiVersion`/`kind`, as the API server sends them; `limit` + `continue` paging over a
//!   consistent snapshot, with `remainingItemCount`; `fieldSelector` on `metadata.name` /
//!   `metadata.namespace` (`=`, `==`, `!=`, comma-separated).
//! * Watches (`watch=true`): `200` with `Transfer-Encoding: chunked`, one newline-terminated
//!   JSON event per chunk (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` when
//!   `allowWatchBookmarks=true`, `ERROR`), starting after `resourceVersion` (unset or `0`:
//!   synthetic `ADDED` for everything first), ending cleanly after `timeoutSeconds`.
//! * One global resourceVersion counter across kinds (like etcd's revision); each change
//!   recorded in a per-kind history that watches replay from their resourceVersion.
//! * Faults: compaction (a watch behind it gets an `ERROR` event with a 410 `Expired`
//!   `Status`, a new watch from before it too), bookmarks on demand, watches ended cleanly,
//!   connections closed (FIN) or reset (RST) mid-watch, and the server going down (new
//!   connections reset at once) and coming back.
//!
//! Every request is recorded for assertions.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// The bearer token the kubeconfig carries and the server requires.
pub const TOKEN: &str = "kxp-test-token";

/// The resources the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Services,
    EndpointSlices,
    Nodes,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Services, Kind::EndpointSlices, Kind::Nodes];

    pub fn path(self) -> &'static str {
        match self {
            Kind::Services => "/api/v1/services",
            Kind::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Nodes => "/api/v1/nodes",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Services | Kind::Nodes => "v1",
            Kind::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
            Kind::Nodes => "Node",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Nodes
    }

    fn of_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    fn of_path(path: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.path() == path)
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

impl Request {
    pub fn kind(&self) -> Option<Kind> {
        Kind::of_path(&self.path)
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Collection {
    /// By (namespace, name); cluster-scoped objects have an empty namespace.
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this one are told 410 Gone.
    compacted: u64,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: HashMap<Kind, Collection>,
    requests: Vec<Request>,
    /// Paged lists: snapshot id -> (resourceVersion, items).
    snapshots: HashMap<u64, (u64, Vec<Value>)>,
    next_snapshot: u64,
    bookmarks_sent: usize,
    expired_sent: usize,
    /// Bumped to close connections with a FIN, with a RST, to end watches cleanly, to send
    /// bookmarks.
    fin_epoch: u64,
    rst_epoch: u64,
    end_epoch: u64,
    bookmark_epoch: u64,
    /// New connections are reset at once.
    down: bool,
}

impl State {
    fn collection(&mut self, kind: Kind) -> &mut Collection {
        self.collections.entry(kind).or_default()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change of `state` that connections must look at.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Changes made atomically (watches see all of them or none).
pub struct Edit<'a> {
    state: &'a mut State,
}

impl Edit<'_> {
    /// Creates or replaces an object (`ADDED` or `MODIFIED`); returns its new
    /// resourceVersion. The object is serialized with serde_json (k8s-openapi writes
    /// `apiVersion` and `kind`); the server sets `metadata.resourceVersion`, `uid` and
    /// `creationTimestamp` as the API server would.
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&mut self, object: &K) -> u64 {
        let kind = Kind::of_kind(K::KIND).expect("a kind the fake API server serves");
        let mut value = serde_json::to_value(object).expect("serializable object");
        value["apiVersion"] = json!(kind.api_version());
        value["kind"] = json!(kind.kind());
        let name = value["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let namespace = if kind.namespaced() {
            let ns = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            value["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        self.state.rv += 1;
        let rv = self.state.rv;
        let collection = self.state.collection(kind);
        let key = (namespace, name);
        let previous = collection.objects.get(&key);
        let (uid, created) = match previous {
            Some(p) => (
                p["metadata"]["uid"].clone(),
                p["metadata"]["creationTimestamp"].clone(),
            ),
            None => (
                json!(format!("00000000-0000-0000-0000-{rv:012}")),
                json!("2026-01-01T00:00:00Z"),
            ),
        };
        let change = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let meta = &mut value["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = uid;
        meta["creationTimestamp"] = created;
        collection.objects.insert(key, value.clone());
        collection.history.push(Change {
            rv,
            kind: change,
            object: value,
        });
        rv
    }

    /// Deletes an object (`DELETED`, carrying its last state at a new resourceVersion);
    /// returns that resourceVersion, or `None` if there was no such object.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let key = (
            if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        );
        let mut value = self.state.collection(kind).objects.remove(&key)?;
        self.state.rv += 1;
        let rv = self.state.rv;
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.state.collection(kind).history.push(Change {
            rv,
            kind: "DELETED",
            object: value,
        });
        Some(rv)
    }

    /// Compacts `kind`'s history up to the current resourceVersion: a watch that has not
    /// delivered everything up to here gets `ERROR` 410 (Expired) and ends, as does a new
    /// watch from an older resourceVersion.
    pub fn compact(&mut self, kind: Kind) {
        let rv = self.state.rv;
        let collection = self.state.collection(kind);
        collection.compacted = rv;
        collection.history.retain(|c| c.rv > rv);
    }
}

/// The running fake server. Dropping it stops it and removes its kubeconfig.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    kubeconfig: PathBuf,
}

impl FakeApiServer {
    /// Starts the server on 127.0.0.1 (a free port) on its own runtime thread and writes a
    /// kubeconfig pointing at it.
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: tokio::sync::watch::channel(0).0,
        });
        runtime.spawn(accept(listener, shared.clone()));
        let kubeconfig = write_kubeconfig(addr);
        Self {
            addr,
            shared,
            runtime: Some(runtime),
            kubeconfig,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file whose current context reaches this server with [`TOKEN`].
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Applies changes atomically, then wakes the watches.
    pub fn edit<R>(&self, f: impl FnOnce(&mut Edit<'_>) -> R) -> R {
        let result = {
            let mut state = self.shared.lock();
            f(&mut Edit { state: &mut state })
        };
        self.shared.notify();
        result
    }

    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> u64 {
        self.edit(|e| e.apply(object))
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        self.edit(|e| e.delete(kind, namespace, name))
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Active watches that allowed bookmarks each get a `BOOKMARK` at the current
    /// resourceVersion (after any events they still had to send).
    pub fn send_bookmarks(&self) -> u64 {
        let rv = {
            let mut state = self.shared.lock();
            state.bookmark_epoch += 1;
            state.rv
        };
        self.shared.notify();
        rv
    }

    /// Active watches end cleanly (terminating chunk), as when `timeoutSeconds` runs out.
    pub fn end_watches(&self) {
        self.shared.lock().end_epoch += 1;
        self.shared.notify();
    }

    /// Every open connection is closed (FIN) without finishing its response.
    pub fn close_connections(&self) {
        self.shared.lock().fin_epoch += 1;
        self.shared.notify();
    }

    /// Every open connection is reset (RST).
    pub fn reset_connections(&self) {
        self.shared.lock().rst_epoch += 1;
        self.shared.notify();
    }

    /// Down: every open connection is reset and new ones are reset at once. Up: serving
    /// again.
    pub fn set_down(&self, down: bool) {
        {
            let mut state = self.shared.lock();
            state.down = down;
            if down {
                state.rst_epoch += 1;
            }
        }
        self.shared.notify();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// How many list requests (pages included) `kind` got.
    pub fn list_requests(&self, kind: Kind) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind() == Some(kind) && !r.is_watch())
            .collect()
    }

    pub fn watch_requests(&self, kind: Kind) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind() == Some(kind) && r.is_watch())
            .collect()
    }

    pub fn bookmarks_sent(&self) -> usize {
        self.shared.lock().bookmarks_sent
    }

    pub fn expired_sent(&self) -> usize {
        self.shared.lock().expired_sent
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn write_kubeconfig(addr: SocketAddr) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "kxp-fake-apiserver-{}-{}.kubeconfig",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
users:
- name: tester
  user:
    token: {TOKEN}
contexts:
- name: fake
  context:
    cluster: fake
    user: tester
    namespace: default
current-context: fake
"
    );
    std::fs::write(&path, text).expect("write the kubeconfig");
    path
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(connection(socket, shared.clone()));
    }
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Keep serving requests on it.
    KeepAlive,
    /// Close it (FIN).
    Fin,
    /// Reset it (RST).
    Reset,
}

fn reset(read: BufReader<OwnedReadHalf>, write: OwnedWriteHalf) {
    if let Ok(socket) = read.into_inner().reunite(write) {
        let _ = socket.set_zero_linger();
        drop(socket);
    }
}

async fn connection(socket: TcpStream, shared: Arc<Shared>) {
    let (fin0, rst0, down) = {
        let state = shared.lock();
        (state.fin_epoch, state.rst_epoch, state.down)
    };
    if down {
        let _ = socket.set_zero_linger();
        return;
    }
    let _ = socket.set_nodelay(true);
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let mut changes = shared.changed.subscribe();
    loop {
        let request = tokio::select! {
            r = read_request(&mut read) => r,
            how = killed(&shared, &mut changes, fin0, rst0) => {
                if how == Close::Reset {
                    reset(read, write);
                }
                return;
            }
        };
        let Ok(Some(request)) = request else {
            return;
        };
        match serve(&shared, request, &mut write, &mut changes, fin0, rst0).await {
            Close::KeepAlive => {}
            Close::Fin => return,
            Close::Reset => return reset(read, write),
        }
    }
}

/// Resolves when the connection is to be closed or reset.
async fn killed(
    shared: &Shared,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    fin0: u64,
    rst0: u64,
) -> Close {
    loop {
        changes.borrow_and_update();
        {
            let state = shared.lock();
            if state.rst_epoch != rst0 {
                return Close::Reset;
            }
            if state.fin_epoch != fin0 {
                return Close::Fin;
            }
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Reads one request (request line and headers; a body, if any, is skipped). `None` at
/// end of stream.
async fn read_request(read: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if read.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut authorization = None;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if read.read_line(&mut header).await? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(value.to_owned()),
                "content-length" => length = value.parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    if length > 0 {
        let mut body = vec![0; length];
        read.read_exact(&mut body).await?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: decode(path),
        query,
        authorization,
    }))
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    }
}

async fn respond(write: &mut OwnedWriteHalf, code: u16, body: &Value) -> Close {
    let body = serde_json::to_vec(body).expect("json");
    let head = format!(
        "HTTP/1.1 {code} {}\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    match write.write_all(&out).await {
        Ok(()) => Close::KeepAlive,
        Err(_) => Close::Fin,
    }
}

/// A parsed `fieldSelector`: (field, wanted value, equal?) terms, all of which must hold.
struct Selector(Vec<(String, String, bool)>);

impl Selector {
    fn parse(text: Option<&str>) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid selector: '{term}'"));
            };
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), value.to_owned(), equal));
        }
        Ok(Self(terms))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, value, equal)| {
            let actual = match field.as_str() {
                "metadata.name" => object["metadata"]["name"].as_str(),
                _ => object["metadata"]["namespace"].as_str(),
            }
            .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

async fn serve(
    shared: &Shared,
    request: Request,
    write: &mut OwnedWriteHalf,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    fin0: u64,
    rst0: u64,
) -> Close {
    shared.lock().requests.push(request.clone());
    if request.authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return respond(write, 401, &status(401, "Unauthorized", "Unauthorized")).await;
    }
    let Some(kind) = request.kind() else {
        let message = "the server could not find the requested resource";
        return respond(write, 404, &status(404, "NotFound", message)).await;
    };
    if request.method != "GET" {
        let message = format!("{} is not supported here", request.method);
        return respond(write, 405, &status(405, "MethodNotAllowed", &message)).await;
    }
    let selector = match Selector::parse(request.param("fieldSelector")) {
        Ok(s) => s,
        Err(message) => {
            return respond(write, 400, &status(400, "BadRequest", &message)).await;
        }
    };
    if request.is_watch() {
        watch(
            shared, kind, &request, &selector, write, changes, fin0, rst0,
        )
        .await
    } else {
        let (code, body) = list(&mut shared.lock(), kind, &request, &selector);
        respond(write, code, &body).await
    }
}

fn list(state: &mut State, kind: Kind, request: &Request, selector: &Selector) -> (u16, Value) {
    let limit = request
        .param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    // A continued list reads the snapshot its first page was taken from, at that page's
    // resourceVersion (the API server reads etcd at the list's revision).
    let (id, offset, rv, items) = match request.param("continue") {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)));
            let Some((id, offset)) = parsed else {
                return (400, status(400, "BadRequest", "invalid continue token"));
            };
            let Some((rv, items)) = state.snapshots.get(&id) else {
                let message = "the provided continue parameter is too old";
                return (410, status(410, "Expired", message));
            };
            (id, offset, *rv, items.clone())
        }
        None => {
            let rv = state.rv;
            let items: Vec<Value> = state
                .collection(kind)
                .objects
                .values()
                .filter(|o| selector.matches(o))
                .map(|o| {
                    // List items carry no apiVersion/kind.
                    let mut o = o.clone();
                    if let Some(map) = o.as_object_mut() {
                        map.remove("apiVersion");
                        map.remove("kind");
                    }
                    o
                })
                .collect();
            state.next_snapshot += 1;
            (state.next_snapshot, 0, rv, items)
        }
    };
    let end = limit.map_or(items.len(), |l| offset.saturating_add(l).min(items.len()));
    let page: Vec<Value> = items.get(offset..end).unwrap_or_default().to_vec();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if end < items.len() {
        metadata["continue"] = json!(format!("{id}:{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
        state.snapshots.entry(id).or_insert((rv, items));
    }
    let body = json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": page,
    });
    (200, body)
}

fn chunk(event: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(event).expect("json");
    line.push(b'\n');
    let mut out = format!("{:x}\r\n", line.len()).into_bytes();
    out.extend_from_slice(&line);
    out.extend_from_slice(b"\r\n");
    out
}

const END_CHUNK: &[u8] = b"0\r\n\r\n";

/// What a watch does after writing its pending chunks.
enum Next {
    Wait,
    End,
    Close(Close),
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    shared: &Shared,
    kind: Kind,
    request: &Request,
    selector: &Selector,
    write: &mut OwnedWriteHalf,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    fin0: u64,
    rst0: u64,
) -> Close {
    let bookmarks = request.param("allowWatchBookmarks") == Some("true");
    let timeout = request
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let from = request
        .param("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| v.parse::<u64>());
    let from = match from {
        Some(Err(_)) => {
            let message = "invalid resourceVersion";
            return respond(write, 400, &status(400, "BadRequest", message)).await;
        }
        Some(Ok(rv)) => Some(rv),
        None => None,
    };
    let head = "HTTP/1.1 200 OK\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if write.write_all(head.as_bytes()).await.is_err() {
        return Close::Fin;
    }
    let (mut position, end0, mut bookmark0, mut out) = {
        let mut state = shared.lock();
        let (end0, bookmark0, rv) = (state.end_epoch, state.bookmark_epoch, state.rv);
        let mut out = Vec::new();
        let position = match from {
            Some(rv) => rv,
            None => {
                // No resourceVersion: the current state as ADDED events first.
                for object in state.collection(kind).objects.values() {
                    if selector.matches(object) {
                        out.extend(chunk(&json!({"type": "ADDED", "object": object})));
                    }
                }
                rv
            }
        };
        (position, end0, bookmark0, out)
    };
    loop {
        changes.borrow_and_update();
        let next = {
            let mut state = shared.lock();
            let global_rv = state.rv;
            let bookmark_epoch = state.bookmark_epoch;
            let ended = state.end_epoch != end0;
            if state.rst_epoch != rst0 {
                Next::Close(Close::Reset)
            } else if state.fin_epoch != fin0 {
                Next::Close(Close::Fin)
            } else if position < state.collection(kind).compacted {
                let compacted = state.collection(kind).compacted;
                let message = format!("too old resource version: {position} ({compacted})");
                out.extend(chunk(&json!({
                    "type": "ERROR",
                    "object": status(410, "Expired", &message),
                })));
                state.expired_sent += 1;
                Next::End
            } else {
                for change in &state.collection(kind).history {
                    if change.rv > position {
                        if selector.matches(&change.object) {
                            out.extend(chunk(&json!({
                                "type": change.kind,
                                "object": change.object,
                            })));
                        }
                        position = change.rv;
                    }
                }
                if bookmark_epoch != bookmark0 {
                    bookmark0 = bookmark_epoch;
                    if bookmarks {
                        position = position.max(global_rv);
                        out.extend(chunk(&json!({
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind.kind(),
                                "apiVersion": kind.api_version(),
                                "metadata": {
                                    "resourceVersion": position.to_string(),
                                    "creationTimestamp": null,
                                },
                            },
                        })));
                        state.bookmarks_sent += 1;
                    }
                }
                if ended {
                    Next::End
                } else {
                    Next::Wait
                }
            }
        };
        match next {
            Next::Close(how) => return how,
            Next::End => {
                out.extend_from_slice(END_CHUNK);
                return match write.write_all(&out).await {
                    Ok(()) => Close::KeepAlive,
                    Err(_) => Close::Fin,
                };
            }
            Next::Wait => {}
        }
        if !out.is_empty() {
            if write.write_all(&out).await.is_err() {
                return Close::Fin;
            }
            out.clear();
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return Close::Fin;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return match write.write_all(END_CHUNK).await {
                    Ok(()) => Close::KeepAlive,
                    Err(_) => Close::Fin,
                };
            }
        }
    }
}
