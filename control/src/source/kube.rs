//! The live Kubernetes API source: watches Services and EndpointSlices in all namespaces,
//! and this node's Node object, through the `kube` crate's watchers and reflectors.
//!
//! The watchers (`kube::runtime::watcher`) do the list/watch protocol: list (in pages of
//! 500), then watch from the list's resourceVersion with bookmarks on, resume a watch that
//! ended from the last resourceVersion seen, relist on `410 Gone`, and back off on errors
//! (kube's default: exponential from 0.8 s to 30 s, with jitter, reset after 2 minutes of
//! health). Each watcher feeds a reflector store, which swaps a relist in atomically when the
//! list is complete.
//!
//! What goes to the controller:
//!
//! * [`SourceEvent::View`] with every Service and EndpointSlice of the stores, sorted by
//!   namespace/name, whenever a store changed — never before both stores finished their
//!   first list (a view with Services and no EndpointSlices would reject traffic), and at
//!   most once per [`KubeSourceConfig::debounce`] interval: a burst of changes, or a relist
//!   of 10,000 objects (one store swap), becomes one view.
//! * [`SourceEvent::Node`] when the Node's InternalIP/ExternalIP addresses or its
//!   `topology.kubernetes.io/zone` label change (not debounced).
//! * [`SourceEvent::Disconnected`] once when a watch fails (connection refused or dropped,
//!   an error status from the API server); `410 Gone` is not a disconnection, just a relist.
//!   The watchers keep retrying; the first successful API response after that counts as
//!   reconnected, and the source sends a fresh view (the contract in [`super`]). A watch
//!   connection closed cleanly, even mid-stream (kube reads that EOF as the watch's end), is
//!   resumed from its resourceVersion at once and not reported unless resuming fails.
//!
//! Everything runs on a current-thread tokio runtime on a dedicated thread;
//! [`KubeSource::stop`] (or dropping the handle) shuts it down and joins it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::client::{ClientBuilder, DynBody};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::{NodeInfo, SourceEvent, SourceView};

/// The channel the source sends its events on.
pub type EventSender = mpsc::Sender<SourceEvent>;

/// The label carrying a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Default [`KubeSourceConfig::debounce`].
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub enum ClusterAccess {
    /// `$KUBECONFIG` or `~/.kube/config` if there is one, else the in-cluster service
    /// account (`kube::Config::infer`).
    #[default]
    Infer,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The in-cluster service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// A ready-made client configuration.
    Config(Box<kube::Config>),
}

/// How long to wait before retrying a failed list or watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Retry {
    /// kube's default backoff (`WatchStreamExt::default_backoff`): exponential from 0.8 s
    /// to 30 s with jitter, reset after 2 minutes without errors.
    #[default]
    KubeDefault,
    /// Exponential (doubling) from `min` to `max`, no jitter, reset by any successful
    /// event. For tests and impatient setups.
    Exponential { min: Duration, max: Duration },
}

/// Settings of a [`KubeSource`].
#[derive(Debug, Clone)]
pub struct KubeSourceConfig {
    pub access: ClusterAccess,
    /// Minimum interval between two views; changes within it are coalesced into one.
    pub debounce: Duration,
    pub retry: Retry,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        Self {
            access: ClusterAccess::Infer,
            debounce: DEFAULT_DEBOUNCE,
            retry: Retry::KubeDefault,
        }
    }
}

impl KubeSourceConfig {
    /// The defaults, reaching the cluster through `access`.
    pub fn new(access: ClusterAccess) -> Self {
        Self {
            access,
            ..Self::default()
        }
    }
}

/// Why a [`KubeSource`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The client configuration could not be loaded (bad kubeconfig, not in a cluster).
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The thread or its runtime could not be created.
    #[error("cannot start the kubernetes source: {0}")]
    Start(#[from] std::io::Error),
}

/// A running Kubernetes API source. Dropping it stops it too.
#[derive(Debug)]
pub struct KubeSource {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeSource {
    /// Loads the client configuration, then starts watching on a dedicated thread. Events
    /// for the node named `node_name` and the cluster's Services and EndpointSlices go to
    /// `sender`; the source ends by itself if the receiver goes away.
    pub fn start(
        config: KubeSourceConfig,
        node_name: impl Into<String>,
        sender: EventSender,
    ) -> Result<Self, KubeSourceError> {
        let node_name = node_name.into();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), KubeSourceError>>(1);
        let thread = std::thread::Builder::new()
            .name("kxp-kube-source".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let probe = Arc::new(Probe::default());
                    let client = match connect(config.access, probe.clone()).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let settings = Settings {
                        debounce: config.debounce,
                        retry: config.retry,
                    };
                    run(client, &node_name, settings, sender, stop_rx, probe).await;
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(KubeSourceError::Start(std::io::Error::other(
                    "the kubernetes source thread ended while starting",
                )))
            }
        }
    }

    /// Stops watching, closes the connections and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Whether the source's thread has ended (stopped, or its receiver went away).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the kubernetes source thread panicked");
            }
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counts successful API responses, so the source can tell when it is connected again.
#[derive(Debug, Default)]
struct Probe {
    ok: AtomicU64,
    notify: Notify,
}

impl Probe {
    fn count(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }
}

/// Loads the configuration and builds a client whose middleware reports every 2xx
/// response to `probe`.
async fn connect(access: ClusterAccess, probe: Arc<Probe>) -> Result<Client, KubeSourceError> {
    let err = |e: &dyn std::fmt::Display| KubeSourceError::Config(e.to_string());
    let config = match access {
        ClusterAccess::Infer => kube::Config::infer().await.map_err(|e| err(&e))?,
        ClusterAccess::InCluster => kube::Config::incluster().map_err(|e| err(&e))?,
        ClusterAccess::Kubeconfig(path) => {
            let kubeconfig = Kubeconfig::read_from(&path)
                .map_err(|e| KubeSourceError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeSourceError::Config(format!("{}: {e}", path.display())))?
        }
        ClusterAccess::Config(config) => *config,
    };
    let layer = tower::util::MapResponseLayer::new(move |resp: http::Response<Box<DynBody>>| {
        if resp.status().is_success() {
            probe.ok.fetch_add(1, Ordering::Release);
            probe.notify.notify_one();
        }
        resp
    });
    Ok(ClientBuilder::try_from(config)
        .map_err(|e| err(&e))?
        .with_layer(&layer)
        .build())
}

struct Settings {
    debounce: Duration,
    retry: Retry,
}

/// Doubling backoff without jitter ([`Retry::Exponential`]).
struct Exponential {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Iterator for Exponential {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (now * 2).clamp(self.min, self.max);
        Some(now)
    }
}

impl Backoff for Exponential {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Retry {
    fn backoff(self) -> Box<dyn Backoff> {
        match self {
            Retry::KubeDefault => Box::new(DefaultBackoff::default()),
            Retry::Exponential { min, max } => Box::new(Exponential {
                min,
                max: max.max(min),
                next: min,
            }),
        }
    }
}

/// Which watch an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    Services = 0,
    Slices = 1,
    Node = 2,
}

impl Watched {
    fn describe(self) -> &'static str {
        match self {
            Watched::Services => "services watch",
            Watched::Slices => "endpointslices watch",
            Watched::Node => "node watch",
        }
    }
}

/// What a watcher item means for the source.
enum Step {
    /// The store changed (an object applied or deleted, a list swapped in).
    Changed {
        synced: bool,
    },
    /// The store did not change (the start of a list, a listed object being buffered).
    /// `heard`: the item comes from an API response (the start of a list does not).
    Quiet {
        heard: bool,
    },
    /// A relist because the resourceVersion expired (410 Gone); not a disconnection.
    Expired(String),
    Failed(String),
}

fn step<K: Resource>(item: Result<watcher::Event<K>, watcher::Error>) -> Step {
    match item {
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Step::Changed { synced: false },
        Ok(watcher::Event::InitDone) => Step::Changed { synced: true },
        Ok(watcher::Event::Init) => Step::Quiet { heard: false },
        Ok(watcher::Event::InitApply(_)) => Step::Quiet { heard: true },
        // An expired resourceVersion in a watch, or an expired continue token in a paged
        // list: the watcher starts over with a fresh list.
        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
            Step::Expired(status.message.clone())
        }
        Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 410 => {
            Step::Expired(status.message.clone())
        }
        Err(e) => Step::Failed(e.to_string()),
    }
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    retry: Retry,
) -> (Store<K>, impl Stream<Item = Step>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watcher::watcher(api, config)
        .backoff(retry.backoff())
        .reflect(writer)
        .map(step);
    (store, stream)
}

/// The event loop's state.
struct State {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    node_name: String,
    sender: EventSender,
    debounce: Duration,
    probe: Arc<Probe>,
    /// Both Services and EndpointSlices have finished their first list.
    services_synced: bool,
    slices_synced: bool,
    /// A change not sent yet, and when it goes out.
    dirty: bool,
    flush_at: Option<Instant>,
    /// `None` while connected; else the probe count when the connection was lost.
    lost_at: Option<u64>,
    /// Per watch ([`Watched`] as index): its last item was an error.
    failing: [bool; 3],
    last_node: Option<NodeInfo>,
    /// The receiver went away.
    closed: bool,
}

impl State {
    fn on_step(&mut self, which: Watched, step: Option<Step>) {
        let Some(step) = step else {
            // The watchers never end and our backoffs never give up; make it loud if that
            // changes.
            self.disconnected(which, "the watch stream ended".into());
            self.closed = true;
            return;
        };
        let failed = &mut self.failing[which as usize];
        match step {
            Step::Failed(_) => *failed = true,
            // Evidence the watch works again (e.g. an event after an error it kept its
            // stream through, such as an undecodable object). The start of a list is not:
            // the watcher emits it before asking.
            Step::Quiet { heard: false } => {}
            _ => {
                if std::mem::take(failed) {
                    self.reconnected();
                }
            }
        }
        match step {
            Step::Changed { synced } => {
                match which {
                    Watched::Services => self.services_synced |= synced,
                    Watched::Slices => self.slices_synced |= synced,
                    Watched::Node => return self.node_changed(synced),
                }
                self.mark_dirty();
            }
            Step::Quiet { .. } => {}
            Step::Expired(message) => {
                tracing::debug!(watch = which.describe(), %message, "resource version expired, relisting");
            }
            Step::Failed(reason) => self.disconnected(which, reason),
        }
    }

    fn disconnected(&mut self, which: Watched, reason: String) {
        if self.lost_at.is_some() {
            tracing::debug!(watch = which.describe(), %reason, "still disconnected");
            return;
        }
        tracing::warn!(watch = which.describe(), %reason, "lost the API server; retrying");
        self.lost_at = Some(self.probe.count());
        self.send(SourceEvent::Disconnected(format!(
            "{}: {reason}",
            which.describe()
        )));
    }

    /// The first successful response after a disconnection sends a fresh view. (Not any
    /// event: one of the other watches may still deliver events it had read before the
    /// connection went. An event from the watch that failed counts.)
    fn reconnected(&mut self) {
        if self.lost_at.take().is_some() {
            tracing::info!("reached the API server again");
            self.mark_dirty();
        }
    }

    fn on_response(&mut self) {
        if self.lost_at.is_some_and(|mark| self.probe.count() > mark) {
            self.reconnected();
        }
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
        if self.flush_at.is_none() && self.services_synced && self.slices_synced {
            self.flush_at = Some(Instant::now() + self.debounce);
        }
    }

    fn flush(&mut self) {
        self.flush_at = None;
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let services = sorted(&self.services);
        let slices = sorted(&self.slices);
        tracing::debug!(
            services = services.len(),
            slices = slices.len(),
            "sending the view"
        );
        self.send(SourceEvent::View(SourceView {
            services,
            slices,
            errors: Vec::new(),
            notices: Vec::new(),
        }));
    }

    fn node_changed(&mut self, synced: bool) {
        let node = self
            .node
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.node_name));
        let Some(node) = node else {
            if synced {
                tracing::warn!(node = %self.node_name, "this node's Node object does not exist");
            }
            return;
        };
        let info = node_info(&node);
        if self.last_node.as_ref() != Some(&info) {
            self.last_node = Some(info.clone());
            self.send(SourceEvent::Node(info));
        }
    }

    fn send(&mut self, event: SourceEvent) {
        if self.sender.send(event).is_err() {
            tracing::debug!("the controller is gone; stopping the kubernetes source");
            self.closed = true;
        }
    }
}

/// A store's objects (shared with the store), in namespace/name order.
fn sorted<K: Resource + Clone>(store: &Store<K>) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut objects: Vec<Arc<K>> = store.state();
    objects.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    objects
}

/// A Node's InternalIP/ExternalIP addresses (in its order, unparsable ones left out) and
/// zone label.
pub fn node_info(node: &Node) -> NodeInfo {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
        .collect();
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    NodeInfo { addresses, zone }
}

async fn run(
    client: Client,
    node_name: &str,
    settings: Settings,
    sender: EventSender,
    mut stop: oneshot::Receiver<()>,
    probe: Arc<Probe>,
) {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    let node_config = config.clone().fields(&format!("metadata.name={node_name}"));
    let (services, svc_steps) = watch(
        Api::<Service>::all(client.clone()),
        config.clone(),
        settings.retry,
    );
    let (slices, eps_steps) = watch(
        Api::<EndpointSlice>::all(client.clone()),
        config,
        settings.retry,
    );
    let (node, node_steps) = watch(Api::<Node>::all(client), node_config, settings.retry);
    let mut svc_steps = std::pin::pin!(svc_steps);
    let mut eps_steps = std::pin::pin!(eps_steps);
    let mut node_steps = std::pin::pin!(node_steps);

    let mut state = State {
        services,
        slices,
        node,
        node_name: node_name.to_owned(),
        sender,
        debounce: settings.debounce,
        probe: probe.clone(),
        services_synced: false,
        slices_synced: false,
        dirty: false,
        flush_at: None,
        lost_at: None,
        failing: [false; 3],
        last_node: None,
        closed: false,
    };
    while !state.closed {
        let flush_at = state.flush_at;
        // Not biased: a watch with a long backlog (a relist) must not starve the others,
        // nor the flush timer.
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)),
                if flush_at.is_some() => state.flush(),
            () = probe.notify.notified() => state.on_response(),
            step = svc_steps.next() => state.on_step(Watched::Services, step),
            step = eps_steps.next() => state.on_step(Watched::Slices, step),
            step = node_steps.next() => state.on_step(Watched::Node, step),
        }
    }
}
