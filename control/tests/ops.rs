//! The ops HTTP server on an ephemeral loopback port: /healthz before and after the first
//! sync, /metrics with kube-proxy's names and the dataplane counters, and the server's
//! limits.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use kxp_control::controller::{Controller, ControllerConfig};
use kxp_control::manifest::parse_manifests;
use kxp_control::node::parse_node;
use kxp_control::ops::{Metrics, OpsServer, MAX_REQUEST_BYTES};
use kxp_control::source::{SourceEvent, SourceView};
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::tables::ServiceTable;
use kxp_dataplane::verdict::Counters;

/// Sends raw bytes, returns (status, headers, body).
fn request(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer (and close) before it has read everything we send.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
}

const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
    spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n\
    addressType: IPv4\nports: [{name: http, port: 8080}]\n\
    endpoints:\n  - addresses: [10.244.1.2]\n  - addresses: [10.244.1.3]\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: bad}\n\
    spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n";

#[test]
fn healthz_and_metrics() {
    let node = parse_node("name: node-a\naddresses: [192.168.50.2]\n", "node.yaml").unwrap();
    let publisher = TablePublisher::new(Tables {
        services: Arc::new(ServiceTable::new()),
        node: Arc::new(node.clone()),
    });
    let metrics = Metrics::new(Duration::from_secs(60));
    metrics.set_dataplane_counters(|| {
        let mut dropped = Counters::default().dropped;
        dropped[0] = 7;
        vec![Counters {
            frames: 7,
            dropped,
            purged_flows: 2,
            ..Counters::default()
        }]
    });
    let server = OpsServer::bind("127.0.0.1:0".parse().unwrap(), Arc::clone(&metrics)).unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let (status, head, body) = get(addr, "/healthz");
    assert_eq!(status, 503, "not synced yet: {body}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(
        body.contains("\"lastUpdated\": \"0001-01-01T00:00:00Z\""),
        "{body}"
    );
    let (status, _, _) = get(addr, "/livez");
    assert_eq!(status, 200, "live while starting, as kube-proxy");

    let mut controller = Controller::new(
        node,
        publisher,
        Arc::clone(&metrics),
        ControllerConfig::default(),
    );
    let set = parse_manifests(MANIFEST, "web.yaml");
    let report = controller
        .sync_once(SourceEvent::View(SourceView {
            services: set.services.into_iter().map(Arc::new).collect(),
            slices: set.slices.into_iter().map(Arc::new).collect(),
            errors: set.errors,
            notices: set.notices,
        }))
        .expect("a sync");
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);

    let (status, _, body) = get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("{\"lastUpdated\": \""), "{body}");
    assert!(body.contains("\"currentTime\": \""), "{body}");
    assert!(!body.contains("0001-01-01"), "{body}");

    let (status, head, text) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    for name in [
        "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds ",
        "kubeproxy_sync_proxy_rules_service_changes_total 2",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "kxp_services 1",
        "kxp_service_ports 1",
        "kxp_endpoints 2",
        "kxp_frontends 1",
        "kxp_config_errors 1",
        "kxp_syncs_total 1",
        "kxp_dataplane_events_total{worker=\"0\",event=\"purged_flows\"} 2",
    ] {
        assert!(text.contains(name), "{name:?} missing from:\n{text}");
    }
    let first_drop = Counters::default()
        .named()
        .into_iter()
        .find(|(n, _)| n.starts_with("drop_"))
        .unwrap()
        .0;
    let reason = first_drop.strip_prefix("drop_").unwrap();
    let sample = format!(
        "kxp_dataplane_frames_total{{worker=\"0\",verdict=\"drop\",reason=\"{reason}\"}} 7"
    );
    assert!(text.contains(&sample), "{sample} missing from:\n{text}");

    server.stop();
}

#[test]
fn server_limits() {
    let metrics = Metrics::new(Duration::from_secs(60));
    let server = OpsServer::bind("127.0.0.1:0".parse().unwrap(), metrics).unwrap();
    let addr = server.local_addr();

    assert_eq!(get(addr, "/nothing").0, 404);
    let (status, head, _) = request(addr, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    assert_eq!(request(addr, b"garbage\r\n\r\n").0, 400);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_BYTES)
    );
    assert_eq!(request(addr, big.as_bytes()).0, 431);
    let (status, head, body) = request(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(
        body.is_empty() && head.contains("Content-Length: "),
        "{head}"
    );
    // Still serving after all that.
    assert_eq!(get(addr, "/livez").0, 200);

    server.stop();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
}

/// deploy/ stays consistent with what kxp reads: the rendered node file parses, the
/// DaemonSet decodes and takes its settings from keys the ConfigMap has, and the
/// ClusterRole grants what the Kubernetes source watches.
#[test]
fn deploy_manifests_are_consistent() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use serde::Deserialize;

    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |f: &str| std::fs::read_to_string(deploy.join(f)).unwrap();

    let cm: ConfigMap = serde_yaml::from_str(&read("configmap.yaml")).unwrap();
    let data = cm.data.unwrap();
    let node = data["node.yaml.template"]
        .replace("@NODE_NAME@", "node-a")
        .replace("@NODE_IP@", "192.168.50.2");
    let node = parse_node(&node, "node.yaml").unwrap();
    assert_eq!(node.name, "node-a");
    for key in ["metrics-addr", "healthz-addr"] {
        data[key].parse::<SocketAddr>().unwrap();
    }

    let ds: DaemonSet = serde_yaml::from_str(&read("daemonset.yaml")).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let kxp = &pod.containers[0];
    let args = kxp.args.clone().unwrap();
    assert_eq!(args[0], "sync");
    for e in kxp.env.iter().flatten() {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        {
            assert!(
                data.contains_key(&r.key),
                "ConfigMap has no key {:?}",
                r.key
            );
        }
    }
    assert!(args.contains(&"--kube".to_string()));

    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&read("rbac.yaml"))
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .cloned()
        .unwrap();
    let role: ClusterRole = serde_yaml::from_value(role).unwrap();
    let granted = |group: &str, resource: &str| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && ["get", "list", "watch"]
                    .iter()
                    .all(|v| r.verbs.iter().any(|x| x == v))
        })
    };
    assert!(granted("", "services") && granted("", "nodes"));
    assert!(granted("discovery.k8s.io", "endpointslices"));
}
