//! The manifests source, live: files added, edited, broken and removed in a temp
//! directory change the view; and the whole chain watch -> controller -> publisher.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kxp_control::controller::{Controller, ControllerConfig};
use kxp_control::node::parse_node;
use kxp_control::ops::Metrics;
use kxp_control::source::manifest_watch::{
    ManifestFiles, ManifestWatch, ManifestWatchConfig, KEEPING_LAST_GOOD,
};
use kxp_control::source::{SourceEvent, SourceView};
use kxp_dataplane::flow::L4Proto;
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::tables::{FrontendKey, ServiceTable};

const DEADLINE: Duration = Duration::from_secs(10);

/// A fresh directory of its own for each test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kxp-manifest-watch-{}-{name}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes through a hidden temporary file and a rename, as tools that update files
/// atomically do (the watcher skips hidden files).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn web(endpoint: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
         spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n  - addresses: [{endpoint}]\n"
    )
}

fn endpoints(view: &SourceView) -> Vec<String> {
    view.slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
        .collect()
}

/// Receives views until one satisfies `want`; panics with the last one at the deadline.
fn wait_for(
    rx: &Receiver<SourceEvent>,
    what: &str,
    want: impl Fn(&SourceView) -> bool,
) -> SourceView {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(SourceEvent::View(v)) => {
                if want(&v) {
                    return v;
                }
                last = Some(v);
            }
            Ok(other) => panic!("unexpected event {other:?}"),
            Err(_) => panic!("{what}: not seen in time; last view: {last:?}"),
        }
    }
}

fn watch(path: &Path, rescan: Duration) -> (ManifestWatch, Receiver<SourceEvent>) {
    let (tx, rx) = mpsc::channel();
    let mut config = ManifestWatchConfig::new(path);
    config.rescan_interval = rescan;
    (ManifestWatch::spawn(config, tx).unwrap(), rx)
}

fn add_edit_break_remove(rescan: Duration, name: &str) {
    let dir = temp_dir(name);
    let (w, rx) = watch(&dir, rescan);

    let first = wait_for(&rx, "initial view", |_| true);
    assert!(first.services.is_empty() && first.errors.is_empty());

    let file = dir.join("web.yaml");
    write_atomic(&file, &web("10.244.1.2"));
    let v = wait_for(&rx, "service added", |v| !v.services.is_empty());
    assert_eq!(v.services[0].metadata.name.as_deref(), Some("web"));
    assert_eq!(endpoints(&v), ["10.244.1.2"]);
    assert!(v.errors.is_empty(), "{:?}", v.errors);

    write_atomic(&file, &web("10.244.1.3"));
    let v = wait_for(&rx, "endpoint edited", |v| endpoints(v) == ["10.244.1.3"]);
    assert_eq!(v.services.len(), 1);

    write_atomic(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\nspec: [\n",
    );
    let v = wait_for(&rx, "broken file reported", |v| !v.errors.is_empty());
    assert_eq!(v.services.len(), 1, "last good content stays");
    assert_eq!(endpoints(&v), ["10.244.1.3"]);
    let shown = file.display().to_string();
    assert!(
        v.errors
            .iter()
            .any(|e| e.object() == shown && e.to_string().contains(KEEPING_LAST_GOOD)),
        "{:?}",
        v.errors
    );

    // Another file alongside, then the broken one fixed.
    write_atomic(
        &dir.join("dns.json"),
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns"}, "spec": {"clusterIP": "10.96.0.53", "ports": [{"port": 53, "protocol": "UDP"}]}}"#,
    );
    write_atomic(&file, &web("10.244.1.4"));
    let v = wait_for(&rx, "fixed and added", |v| {
        v.services.len() == 2 && v.errors.is_empty() && endpoints(v) == ["10.244.1.4"]
    });
    let names: Vec<_> = v
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["dns", "web"], "name order");

    std::fs::remove_file(&file).unwrap();
    let v = wait_for(&rx, "service removed", |v| v.services.len() == 1);
    assert_eq!(v.services[0].metadata.name.as_deref(), Some("dns"));
    assert!(v.slices.is_empty() && v.errors.is_empty());

    w.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn add_edit_break_remove_with_periodic_rescan() {
    add_edit_break_remove(Duration::from_millis(100), "rescan");
}

#[test]
fn add_edit_break_remove_with_fs_events() {
    // Rescans too rare to matter within the deadline: the events must do it.
    let dir = temp_dir("probe");
    let (w, _rx) = watch(&dir, Duration::from_secs(3600));
    let has_events = w.has_fs_watch();
    w.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    if !has_events {
        eprintln!("no filesystem events here (inotify unavailable); skipped");
        return;
    }
    add_edit_break_remove(Duration::from_secs(3600), "events");
}

#[test]
fn watching_a_single_file() {
    let dir = temp_dir("single");
    let file = dir.join("all.yaml");
    std::fs::write(&file, web("10.244.1.2")).unwrap();
    let (w, rx) = watch(&file, Duration::from_millis(100));
    let v = wait_for(&rx, "file read", |v| !v.services.is_empty());
    assert_eq!(endpoints(&v), ["10.244.1.2"]);
    write_atomic(&file, &web("10.244.1.9"));
    wait_for(&rx, "file edited", |v| endpoints(v) == ["10.244.1.9"]);
    drop(w); // dropping stops it too
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn files_keep_content_when_the_path_vanishes_and_skip_young_files() {
    let dir = temp_dir("vanish");
    std::fs::write(dir.join("web.yaml"), web("10.244.1.2")).unwrap();
    std::fs::write(dir.join(".hidden.yaml"), web("10.244.9.9")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();

    // A file modified less than min_age ago is left for later.
    let mut young = ManifestFiles::with_min_age(&dir, Duration::from_secs(3600));
    assert!(!young.rescan());
    assert!(young.unsettled() && young.view().services.is_empty());

    let mut files = ManifestFiles::new(&dir);
    assert!(files.rescan());
    assert!(!files.rescan(), "nothing changed");
    assert_eq!(
        files.files().count(),
        1,
        "hidden and non-manifest files are skipped"
    );
    assert_eq!(endpoints(&files.view()), ["10.244.1.2"]);

    std::fs::remove_dir_all(&dir).unwrap();
    assert!(files.rescan());
    let v = files.view();
    assert_eq!(
        v.services.len(),
        1,
        "a vanished directory keeps every file's content"
    );
    assert!(
        v.errors[0].to_string().contains(KEEPING_LAST_GOOD),
        "{:?}",
        v.errors
    );
}

#[test]
fn a_file_broken_from_the_start_contributes_what_loads() {
    let dir = temp_dir("partial");
    let text = format!("{}---\nkind: [unclosed\n", web("10.244.1.2"));
    std::fs::write(dir.join("web.yaml"), text).unwrap();
    let mut files = ManifestFiles::new(&dir);
    files.rescan();
    let v = files.view();
    assert_eq!(v.services.len(), 1);
    assert_eq!(v.errors.len(), 1, "{:?}", v.errors);
    assert!(!v.errors[0].to_string().contains(KEEPING_LAST_GOOD));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn watch_to_controller_to_publisher() {
    let dir = temp_dir("chain");
    let node = parse_node("name: node-a\naddresses: [192.168.50.2]\n", "node.yaml").unwrap();
    let publisher = TablePublisher::new(Tables {
        services: Arc::new(ServiceTable::new()),
        node: Arc::new(node.clone()),
    });
    let metrics = Metrics::new(Duration::from_secs(60));
    let controller = Controller::new(
        node,
        Arc::clone(&publisher),
        Arc::clone(&metrics),
        ControllerConfig::default(),
    );
    let (tx, rx) = mpsc::channel();
    let mut config = ManifestWatchConfig::new(&dir);
    config.rescan_interval = Duration::from_millis(100);
    let w = ManifestWatch::spawn(config, tx).unwrap();
    let handle = controller.spawn(rx).unwrap();

    let key = FrontendKey {
        addr: "10.96.0.10".parse().unwrap(),
        proto: L4Proto::Tcp,
        port: 80,
    };
    let endpoint_of = |t: &Tables| {
        t.services.frontend(&key).map(|fe| {
            let sp = t.services.service_port(fe.service_port);
            sp.endpoints.iter().map(|b| b.addr).collect::<Vec<IpAddr>>()
        })
    };
    let wait = |what: &str, want: &dyn Fn(&Tables) -> bool| {
        let deadline = Instant::now() + DEADLINE;
        while !want(&publisher.current()) {
            assert!(Instant::now() < deadline, "{what}: not published in time");
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    write_atomic(&dir.join("web.yaml"), &web("10.244.1.2"));
    wait("service", &|t| {
        endpoint_of(t) == Some(vec!["10.244.1.2".parse().unwrap()])
    });
    assert!(metrics.health().healthy);
    write_atomic(&dir.join("web.yaml"), &web("10.244.1.3"));
    wait("endpoint change", &|t| {
        endpoint_of(t) == Some(vec!["10.244.1.3".parse().unwrap()])
    });
    std::fs::remove_file(dir.join("web.yaml")).unwrap();
    wait("removal", &|t| t.services.frontend_count() == 0);

    w.stop();
    let c = handle
        .join()
        .expect("the controller ends when its source is gone");
    assert!(c.syncs() >= 3);
    std::fs::remove_dir_all(&dir).unwrap();
}
