//! The Kubernetes API source against a fake API server speaking HTTP (see
//! `fake_apiserver`): the real `kube` client and watchers run end to end, only the server
//! side is fake.

mod fake_apiserver;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, Kind};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kxp_control::source::kube::{
    ClusterAccess, KubeSource, KubeSourceConfig, KubeSourceError, Retry, DEFAULT_DEBOUNCE,
};
use kxp_control::source::{NodeInfo, SourceEvent, SourceView};

/// Every wait is bounded by this.
const DEADLINE: Duration = Duration::from_secs(15);

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: namespace.map(str::to_owned),
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

fn service(namespace: &str, name: &str, cluster_ip: &str, port: i32) -> Service {
    Service {
        metadata: meta(Some(namespace), name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            type_: Some("ClusterIP".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    let mut metadata = meta(Some(namespace), name);
    metadata.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_owned(),
        service.to_owned(),
    )]));
    EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints: addresses
            .iter()
            .map(|a| Endpoint {
                addresses: vec![(*a).to_owned()],
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

fn node(name: &str, addresses: &[(&str, &str)], zone: Option<&str>) -> Node {
    let mut metadata = meta(None, name);
    metadata.labels = Some(
        zone.map(|z| ("topology.kubernetes.io/zone".to_owned(), z.to_owned()))
            .into_iter()
            .chain([("kubernetes.io/hostname".to_owned(), name.to_owned())])
            .collect(),
    );
    Node {
        metadata,
        status: Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: (*t).to_owned(),
                        address: (*a).to_owned(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

fn service_names(view: &SourceView) -> Vec<String> {
    view.services.iter().map(|s| key(&s.metadata)).collect()
}

fn slice_names(view: &SourceView) -> Vec<String> {
    view.slices.iter().map(|s| key(&s.metadata)).collect()
}

fn slice_addresses(view: &SourceView, namespaced_name: &str) -> Vec<String> {
    view.slices
        .iter()
        .find(|s| key(&s.metadata) == namespaced_name)
        .map(|s| {
            s.endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn describe(event: &SourceEvent) -> String {
    match event {
        SourceEvent::View(v) => format!(
            "View({} services, {} slices)",
            v.services.len(),
            v.slices.len()
        ),
        SourceEvent::Node(n) => format!("Node({n:?})"),
        SourceEvent::Disconnected(r) => format!("Disconnected({r})"),
    }
}

/// A source started against a fake server, and everything it sent.
struct Run {
    source: Option<KubeSource>,
    rx: mpsc::Receiver<SourceEvent>,
    log: Vec<SourceEvent>,
}

impl Run {
    fn start(server: &FakeApiServer, node_name: &str) -> Self {
        let (tx, rx) = mpsc::channel();
        let config = KubeSourceConfig {
            access: ClusterAccess::Kubeconfig(server.kubeconfig().to_owned()),
            debounce: DEFAULT_DEBOUNCE,
            retry: Retry::Exponential {
                min: Duration::from_millis(20),
                max: Duration::from_millis(200),
            },
        };
        let source = KubeSource::start(config, node_name, tx).expect("the source starts");
        Self {
            source: Some(source),
            rx,
            log: Vec::new(),
        }
    }

    /// Waits for the next event `pick` accepts (skipping and logging others).
    fn wait<T>(&mut self, what: &str, mut pick: impl FnMut(&SourceEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(event) => {
                    let picked = pick(&event);
                    self.log.push(event);
                    if let Some(t) = picked {
                        return t;
                    }
                }
                Err(e) => panic!(
                    "waiting for {what}: {e:?}; received so far: {:?}",
                    self.log.iter().map(describe).collect::<Vec<_>>()
                ),
            }
        }
    }

    fn view(&mut self, what: &str, accept: impl Fn(&SourceView) -> bool) -> SourceView {
        self.wait(what, |e| match e {
            SourceEvent::View(v) if accept(v) => Some(v.clone()),
            _ => None,
        })
    }

    fn node(&mut self, what: &str, accept: impl Fn(&NodeInfo) -> bool) -> NodeInfo {
        self.wait(what, |e| match e {
            SourceEvent::Node(n) if accept(n) => Some(n.clone()),
            _ => None,
        })
    }

    fn disconnected(&mut self, what: &str) -> String {
        self.wait(what, |e| match e {
            SourceEvent::Disconnected(r) => Some(r.clone()),
            _ => None,
        })
    }

    /// Everything that arrives within `period`.
    fn quiet(&mut self, period: Duration) -> Vec<SourceEvent> {
        let until = Instant::now() + period;
        let mut got = Vec::new();
        while let Ok(event) = self
            .rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            got.push(event.clone());
            self.log.push(event);
        }
        got
    }

    fn views(&self) -> usize {
        self.log
            .iter()
            .filter(|e| matches!(e, SourceEvent::View(_)))
            .count()
    }

    fn disconnections(&self) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|e| match e {
                SourceEvent::Disconnected(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Stops the source; it must be prompt.
    fn stop(&mut self) {
        let started = Instant::now();
        self.source.take().expect("running").stop();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "stop took {took:?}");
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(source) = self.source.take() {
            source.stop();
        }
    }
}

/// Polls `check` until it holds or the deadline passes.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn seed_basic(server: &FakeApiServer) {
    server.edit(|e| {
        e.apply(&service("default", "web", "10.96.0.10", 80));
        e.apply(&service("kube-system", "dns", "10.96.0.53", 53));
        e.apply(&slice("default", "web-abc", "web", &["10.244.1.2"]));
        e.apply(&slice("kube-system", "dns-xyz", "dns", &["10.244.2.2"]));
        e.apply(&node(
            "node-a",
            &[
                ("InternalIP", "192.168.50.2"),
                ("Hostname", "node-a"),
                ("ExternalIP", "203.0.113.7"),
                ("InternalIP", "fd00:50::2"),
            ],
            Some("zone-a"),
        ));
        e.apply(&node(
            "node-b",
            &[("InternalIP", "192.168.50.3")],
            Some("zone-b"),
        ));
    });
}

#[test]
fn lists_then_follows_added_modified_deleted() {
    let server = FakeApiServer::start();
    seed_basic(&server);
    let mut run = Run::start(&server, "node-a");

    let info = run.node("node-a's info", |_| true);
    assert_eq!(
        info,
        NodeInfo {
            addresses: ips(&["192.168.50.2", "203.0.113.7", "fd00:50::2"]),
            zone: Some("zone-a".into()),
        }
    );
    let view = run.view("the initial view", |_| true);
    assert_eq!(service_names(&view), ["default/web", "kube-system/dns"]);
    assert_eq!(
        slice_names(&view),
        ["default/web-abc", "kube-system/dns-xyz"]
    );
    let web = &view.services[0];
    assert_eq!(
        web.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.0.10")
    );
    assert!(view.errors.is_empty());

    // The protocol as sent: lists paged, node by field selector, watches from the list's
    // resourceVersion with bookmarks.
    let lists = server.list_requests(Kind::Nodes);
    assert_eq!(lists.len(), 1);
    assert_eq!(
        lists[0].param("fieldSelector"),
        Some("metadata.name=node-a")
    );
    assert_eq!(lists[0].param("limit"), Some("500"));
    for kind in Kind::ALL {
        eventually("a watch per kind", || {
            !server.watch_requests(kind).is_empty()
        });
        let watch = &server.watch_requests(kind)[0];
        assert_eq!(watch.param("allowWatchBookmarks"), Some("true"), "{kind:?}");
        assert_eq!(watch.param("resourceVersion"), Some("6"), "{kind:?}");
    }

    // ADDED
    server.apply(&service("default", "api", "10.96.0.11", 443));
    let view = run.view("the added service", |v| v.services.len() == 3);
    assert_eq!(
        service_names(&view),
        ["default/api", "default/web", "kube-system/dns"]
    );
    // MODIFIED
    server.apply(&slice(
        "default",
        "web-abc",
        "web",
        &["10.244.1.2", "10.244.3.4"],
    ));
    let view = run.view("the modified slice", |v| {
        slice_addresses(v, "default/web-abc").len() == 2
    });
    assert_eq!(
        slice_addresses(&view, "default/web-abc"),
        ["10.244.1.2", "10.244.3.4"]
    );
    assert_eq!(view.services.len(), 3);
    // DELETED
    server.delete(Kind::Services, "kube-system", "dns");
    let view = run.view("the deleted service gone", |v| v.services.len() == 2);
    assert_eq!(service_names(&view), ["default/api", "default/web"]);
    assert_eq!(view.slices.len(), 2);

    // The node: another node's change is not ours; ours is.
    server.apply(&node("node-b", &[("InternalIP", "192.168.50.30")], None));
    server.apply(&node(
        "node-a",
        &[("InternalIP", "192.168.50.20"), ("ExternalIP", "not-an-ip")],
        Some("zone-c"),
    ));
    let info = run.node("node-a's new info", |_| true);
    assert_eq!(
        info,
        NodeInfo {
            addresses: ips(&["192.168.50.20"]),
            zone: Some("zone-c".into()),
        }
    );
    // A change that does not touch addresses or zone sends nothing.
    server.apply(&node(
        "node-a",
        &[("InternalIP", "192.168.50.20"), ("Hostname", "a")],
        Some("zone-c"),
    ));

    let rest = run.quiet(Duration::from_millis(300));
    assert!(
        rest.iter().all(|e| !matches!(e, SourceEvent::Node(_))),
        "{:?}",
        rest.iter().map(describe).collect::<Vec<_>>()
    );
    assert_eq!(run.disconnections(), Vec::<String>::new());
    assert_eq!(server.list_requests(Kind::Services).len(), 1, "no relist");
    run.stop();
}

#[test]
fn bookmarks_move_the_resume_point() {
    let server = FakeApiServer::start();
    seed_basic(&server);
    let mut run = Run::start(&server, "node-a");
    run.view("the initial view", |_| true);
    eventually("three watches", || {
        Kind::ALL
            .iter()
            .all(|&k| server.watch_requests(k).len() == 1)
    });

    // Other nodes change: the resourceVersion moves on, our three watches see nothing.
    for i in 0..3 {
        server.apply(&node(
            "node-b",
            &[("InternalIP", "192.168.50.3")],
            Some(&format!("z{i}")),
        ));
    }
    let bookmark = server.send_bookmarks();
    eventually("three bookmarks sent", || server.bookmarks_sent() == 3);
    // The watches end (as at timeoutSeconds): each resumes from its bookmark.
    server.end_watches();
    eventually("three resumed watches", || {
        Kind::ALL
            .iter()
            .all(|&k| server.watch_requests(k).len() == 2)
    });
    for kind in [Kind::Services, Kind::EndpointSlices] {
        let resumed = &server.watch_requests(kind)[1];
        assert_eq!(
            resumed.param("resourceVersion"),
            Some(bookmark.to_string().as_str()),
            "{kind:?}"
        );
    }

    server.apply(&service("default", "late", "10.96.0.99", 8080));
    let view = run.view("an event after the resumed watch", |v| {
        v.services.len() == 3
    });
    assert!(service_names(&view).contains(&"default/late".to_owned()));
    for kind in Kind::ALL {
        assert_eq!(server.list_requests(kind).len(), 1, "{kind:?}: no relist");
    }
    assert_eq!(run.disconnections(), Vec::<String>::new());
    run.stop();
}

#[test]
fn expired_resource_version_relists() {
    let server = FakeApiServer::start();
    seed_basic(&server);
    let mut run = Run::start(&server, "node-a");
    run.view("the initial view", |_| true);
    eventually("three watches", || {
        Kind::ALL
            .iter()
            .all(|&k| server.watch_requests(k).len() == 1)
    });

    // Changes the watches never see: the history is compacted past them, so they get
    // ERROR 410 Expired and must relist.
    server.edit(|e| {
        e.delete(Kind::Services, "kube-system", "dns");
        e.apply(&service("default", "fresh", "10.96.0.20", 80));
        e.apply(&slice("default", "web-abc", "web", &["10.244.9.9"]));
        e.compact(Kind::Services);
        e.compact(Kind::EndpointSlices);
    });
    let view = run.view("the relisted view", |v| {
        service_names(v) == ["default/fresh", "default/web"]
            && slice_addresses(v, "default/web-abc") == ["10.244.9.9"]
    });
    assert_eq!(
        slice_names(&view),
        ["default/web-abc", "kube-system/dns-xyz"]
    );
    assert!(server.expired_sent() >= 2);
    assert_eq!(server.list_requests(Kind::Services).len(), 2);
    assert_eq!(server.list_requests(Kind::EndpointSlices).len(), 2);
    assert_eq!(server.list_requests(Kind::Nodes).len(), 1);

    // The new watch (from the relist's resourceVersion) works.
    server.apply(&service("default", "after", "10.96.0.21", 80));
    run.view("a watch event after the relist", |v| v.services.len() == 3);
    assert_eq!(
        run.disconnections(),
        Vec::<String>::new(),
        "410 is not a disconnection"
    );
    run.stop();
}

#[test]
fn thousands_of_objects_make_one_view() {
    const N: usize = 3000;
    let server = FakeApiServer::start();
    server.edit(|e| {
        for i in 0..N {
            let ns = format!("ns{}", i % 10);
            let name = format!("svc-{i:05}");
            let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            e.apply(&service(&ns, &name, &ip, 80));
            let addr = format!("10.244.{}.{}", i / 250, i % 250 + 1);
            e.apply(&slice(&ns, &format!("{name}-x"), &name, &[&addr]));
        }
    });
    let mut run = Run::start(&server, "node-a");
    let view = run.view("the initial view", |_| true);
    assert_eq!(view.services.len(), N);
    assert_eq!(view.slices.len(), N);
    let names = service_names(&view);
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "sorted by namespace/name"
    );
    // Paged: 500 per page.
    assert_eq!(server.list_requests(Kind::Services).len(), N.div_ceil(500));
    assert!(server.list_requests(Kind::Services)[1]
        .param("continue")
        .is_some());
    run.quiet(Duration::from_millis(300));
    assert_eq!(run.views(), 1, "one view for the initial lists");

    // A burst of 500 watch events is coalesced into a few views (50 ms apart at most).
    server.edit(|e| {
        for i in 0..500 {
            e.apply(&service("burst", &format!("b-{i:03}"), "10.96.250.1", 80));
        }
    });
    run.view("the burst's view", |v| v.services.len() == N + 500);
    run.quiet(Duration::from_millis(300));
    let burst_views = run.views() - 1;
    assert!(burst_views <= 3, "{burst_views} views for one burst");
    server.edit(|e| {
        for i in 0..500 {
            e.delete(Kind::Services, "burst", &format!("b-{i:03}"));
        }
    });
    run.view("the burst gone", |v| v.services.len() == N);
    run.quiet(Duration::from_millis(300));
    let views = run.views();

    // A relist of the services (410) is one more view, not thousands.
    server.edit(|e| {
        e.apply(&service("ns0", "svc-00000", "10.96.200.1", 81));
        e.compact(Kind::Services);
    });
    let view = run.view("the relisted view", |v| {
        v.services.iter().any(|s| {
            s.metadata.name.as_deref() == Some("svc-00000")
                && s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("10.96.200.1")
        })
    });
    assert_eq!(view.services.len(), N);
    run.quiet(Duration::from_millis(300));
    assert_eq!(run.views(), views + 1, "one view for the relist");
    run.stop();
}

#[test]
fn connection_reset_reports_disconnected_then_catches_up() {
    let server = FakeApiServer::start();
    seed_basic(&server);
    let mut run = Run::start(&server, "node-a");
    run.view("the initial view", |_| true);
    eventually("three watches", || {
        Kind::ALL
            .iter()
            .all(|&k| server.watch_requests(k).len() == 1)
    });
    let before = server.resource_version();

    // The server goes away (connections reset, new ones refused) and changes happen
    // meanwhile.
    server.set_down(true);
    let reason = run.disconnected("the disconnection");
    assert!(reason.contains("watch"), "{reason}");
    server.apply(&service("default", "while-down", "10.96.0.30", 80));
    server.delete(Kind::EndpointSlices, "kube-system", "dns-xyz");
    std::thread::sleep(Duration::from_millis(400)); // a few failed retries
    server.set_down(false);

    let view = run.view("the caught-up view", |v| {
        v.services.len() == 3 && v.slices.len() == 1
    });
    assert!(service_names(&view).contains(&"default/while-down".to_owned()));
    assert_eq!(run.disconnections().len(), 1, "once per outage");
    // Caught up by resuming the watches from their resourceVersion, not by relisting.
    assert_eq!(server.list_requests(Kind::Services).len(), 1);
    let resumed = server.watch_requests(Kind::Services);
    let last = resumed.last().unwrap();
    assert_eq!(
        last.param("resourceVersion"),
        Some(before.to_string().as_str())
    );

    // A second outage without changes: reported again, and the reconnection sends a
    // fresh (identical) view.
    run.quiet(Duration::from_millis(200));
    let views = run.views();
    server.set_down(true);
    run.disconnected("the second disconnection");
    std::thread::sleep(Duration::from_millis(200));
    server.set_down(false);
    let again = run.view("the view after reconnecting", |_| true);
    assert_eq!(service_names(&again), service_names(&view));
    assert_eq!(run.views(), views + 1);
    assert_eq!(run.disconnections().len(), 2);
    run.stop();
}

#[test]
fn closed_watch_connection_resumes() {
    let server = FakeApiServer::start();
    seed_basic(&server);
    let mut run = Run::start(&server, "node-a");
    run.view("the initial view", |_| true);
    eventually("three watches", || {
        Kind::ALL
            .iter()
            .all(|&k| server.watch_requests(k).len() == 1)
    });
    // Connections closed (FIN) mid-watch, without the terminating chunk.
    server.edit(|e| {
        e.apply(&service("default", "meanwhile", "10.96.0.40", 80));
    });
    server.close_connections();
    server.apply(&slice("default", "web-abc", "web", &["10.244.7.7"]));
    let view = run.view("the caught-up view", |v| {
        v.services.len() == 3 && slice_addresses(v, "default/web-abc") == ["10.244.7.7"]
    });
    assert!(service_names(&view).contains(&"default/meanwhile".to_owned()));
    eventually("resumed watches", || {
        server.watch_requests(Kind::EndpointSlices).len() >= 2
    });
    assert_eq!(
        server.list_requests(Kind::EndpointSlices).len(),
        1,
        "no relist"
    );
    // kube reads an EOF in the middle of a chunked watch as the end of the watch, and the
    // server took the new watch at once: nothing failed.
    assert_eq!(run.disconnections(), Vec::<String>::new());
    run.stop();
}

#[test]
fn unreachable_at_start_then_up() {
    let server = FakeApiServer::start();
    seed_basic(&server);
    server.set_down(true);
    let mut run = Run::start(&server, "node-a");
    let reason = run.disconnected("the disconnection");
    assert!(!reason.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    server.set_down(false);
    let view = run.view("the view once up", |_| true);
    assert_eq!(view.services.len(), 2);
    // The Node event may come before or after the view.
    let logged = run.log.iter().any(|e| matches!(e, SourceEvent::Node(_)));
    if !logged {
        run.node("node-a's info", |_| true);
    }
    let infos: Vec<_> = run
        .log
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Node(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].zone.as_deref(), Some("zone-a"));
    assert_eq!(run.disconnections().len(), 1);
    run.stop();
}

#[test]
fn bad_kubeconfig_is_an_error() {
    let (tx, _rx) = mpsc::channel();
    let config = KubeSourceConfig::new(ClusterAccess::Kubeconfig(
        "/nonexistent/kxp/kubeconfig".into(),
    ));
    match KubeSource::start(config, "node-a", tx) {
        Err(KubeSourceError::Config(message)) => {
            assert!(message.contains("/nonexistent/kxp/kubeconfig"), "{message}")
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}
