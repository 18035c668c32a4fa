//! Incremental compile against a full compile: random sequences of Service and
//! EndpointSlice adds, updates and deletes (small pools of names, addresses and ports, so
//! that clashes, duplicates, bad values and slices without their service happen often).
//! After every step, [`CompileState`] patched with the changed names, and a [`Controller`]
//! fed the whole view, must both give what [`compile_objects`] gives from scratch: the same
//! frontends leading to the same service ports (endpoints, policy, Maglev slots), the
//! same address sets, the same errors in the same order, notices and health checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kxp_control::compile::{
    compile_objects, object_key_of, CompileOptions, CompileState, Compiled,
};
use kxp_control::controller::{Controller, ControllerConfig};
use kxp_control::manifest::parse_manifests;
use kxp_control::node::parse_node;
use kxp_control::ops::Metrics;
use kxp_control::source::{SourceEvent, SourceView};
use kxp_dataplane::maglev::MaglevConfig;
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::tables::{NodeTable, ServiceTable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NODE: &str = "name: node-a\naddresses: [192.168.50.2, \"fd00:50::2\"]\n\
    clusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\n";

fn node() -> NodeTable {
    parse_node(NODE, "node.yaml").unwrap()
}

fn opts() -> CompileOptions {
    // Small tables: the test is about which tables, not their balance.
    CompileOptions {
        maglev: MaglevConfig {
            slots_per_backend: 7,
            min_size: 13,
            ..MaglevConfig::default()
        },
        proxy_name: None,
    }
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

const NAMESPACES: &[&str] = &["a", "b"];
const SERVICES: &[&str] = &["s0", "s1", "s2", "s3", "s4"];

fn random_service(rng: &mut ChaCha8Rng) -> Service {
    let ns = pick(rng, NAMESPACES);
    let name = pick(rng, SERVICES);
    let ty = *pick(
        rng,
        &[
            "ClusterIP",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
        ],
    );
    let v4 = *pick(rng, &["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.999"]);
    let cluster_ips = match rng.random_range(0..10) {
        0 => "clusterIPs: [\"fd00:96::1\", 10.96.0.1]".to_string(),
        1 => format!("clusterIPs: [{v4}, \"fd00:96::2\"]"),
        2 => "clusterIP: None".to_string(),
        3 => String::new(),
        _ => format!("clusterIP: {v4}"),
    };
    let mut ports = Vec::new();
    for _ in 0..rng.random_range(1..=2) {
        let pname = *pick(rng, &["http", "dns", ""]);
        let port = *pick(rng, &[80, 80, 81, 70000]);
        let proto = *pick(rng, &["TCP", "TCP", "UDP", "ICMP"]);
        let node_port = if ty == "ClusterIP" && rng.random_range(0..6) != 0 {
            String::new()
        } else {
            format!(", nodePort: {}", pick(rng, &[30001, 30002, 30001]))
        };
        let name = if pname.is_empty() {
            String::new()
        } else {
            format!("name: {pname}, ")
        };
        ports.push(format!(
            "{{{name}port: {port}, protocol: {proto}{node_port}}}"
        ));
    }
    let mut extra = String::new();
    if rng.random_range(0..4) == 0 {
        extra.push_str(&format!(
            "  externalIPs: [{}]\n",
            pick(rng, &["198.51.100.1", "10.96.0.1", "bad"])
        ));
    }
    if rng.random_range(0..3) == 0 {
        extra.push_str("  externalTrafficPolicy: Local\n");
        if rng.random_range(0..4) != 0 {
            extra.push_str(&format!(
                "  healthCheckNodePort: {}\n",
                pick(rng, &[32000, 32001, 70000])
            ));
        }
    }
    if rng.random_range(0..4) == 0 {
        extra.push_str("  sessionAffinity: ClientIP\n");
    }
    if rng.random_range(0..5) == 0 {
        extra.push_str("  internalTrafficPolicy: Local\n");
    }
    let status = if ty == "LoadBalancer" && rng.random_range(0..2) == 0 {
        format!(
            "status: {{loadBalancer: {{ingress: [{{ip: {}}}]}}}}\n",
            pick(rng, &["203.0.113.1", "198.51.100.1"])
        )
    } else {
        String::new()
    };
    let labels = if rng.random_range(0..12) == 0 {
        "  labels: {service.kubernetes.io/service-proxy-name: other}\n"
    } else {
        ""
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n{labels}\
         spec:\n  type: {ty}\n  {cluster_ips}\n  ports: [{}]\n{extra}{status}",
        ports.join(", ")
    );
    let mut set = parse_manifests(&yaml, "gen");
    assert!(set.errors.is_empty(), "{yaml}\n{:?}", set.errors);
    set.services.pop().expect("one service")
}

fn random_slice(rng: &mut ChaCha8Rng) -> EndpointSlice {
    let ns = pick(rng, NAMESPACES);
    let service = pick(rng, SERVICES);
    let name = format!("{service}-{}", rng.random_range(0..3));
    let label = match rng.random_range(0..12) {
        0 => String::new(),
        1 => format!("kubernetes.io/service-name: {}", pick(rng, SERVICES)),
        _ => format!("kubernetes.io/service-name: {service}"),
    };
    let family = *pick(rng, &["IPv4", "IPv4", "IPv4", "IPv6", "FQDN", "Bogus"]);
    let mut ports = Vec::new();
    for _ in 0..rng.random_range(1..=2) {
        let pname = *pick(rng, &["http", "dns", ""]);
        let proto = *pick(rng, &["TCP", "UDP"]);
        ports.push(format!(
            "{{name: \"{pname}\", port: {}, protocol: {proto}}}",
            pick(rng, &[8080, 8081, 0])
        ));
    }
    let mut endpoints = Vec::new();
    for _ in 0..rng.random_range(0..5) {
        let addr = if family == "IPv6" {
            *pick(rng, &["\"fd00:244::1\"", "\"fd00:244::2\"", "10.244.0.9"])
        } else {
            *pick(
                rng,
                &[
                    "10.244.0.1",
                    "10.244.0.2",
                    "10.244.0.3",
                    "10.244.0.4",
                    "not-ip",
                ],
            )
        };
        let node_name = pick(rng, &["node-a", "node-b", "node-c"]);
        let cond = match rng.random_range(0..6) {
            0 => ", conditions: {ready: false, serving: true, terminating: true}",
            1 => ", conditions: {ready: false}",
            _ => "",
        };
        let hints = match rng.random_range(0..8) {
            0 => ", hints: {forZones: [{name: zone-a}]}",
            1 => ", hints: {forNodes: [{name: node-a}]}",
            _ => "",
        };
        endpoints.push(format!(
            "  - {{addresses: [{addr}], nodeName: {node_name}{cond}{hints}}}\n"
        ));
    }
    let yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\n  labels: {{{label}}}\naddressType: {family}\nports: [{}]\nendpoints:\n{}",
        ports.join(", "),
        if endpoints.is_empty() {
            "  []\n".to_string()
        } else {
            endpoints.concat()
        }
    );
    let mut set = parse_manifests(&yaml, "gen");
    assert!(set.errors.is_empty(), "{yaml}\n{:?}", set.errors);
    set.slices.pop().expect("one slice")
}

/// A comparable rendering of everything a compile produces.
fn render(c: &Compiled) -> (Vec<String>, Vec<String>, Vec<String>) {
    let t = &c.table;
    if let Err(e) = t.check_frontend_index() {
        panic!("fast-path frontend index out of step: {e}");
    }
    let port = |sp: &kxp_dataplane::tables::ServicePort| {
        format!(
            "{} {:?} {:?} {:?} cluster={:?} local={:?}",
            sp.name, sp.proto, sp.endpoints, sp.policy, sp.cluster_lb, sp.local_lb
        )
    };
    let frontends: BTreeMap<String, String> = t
        .frontends()
        .map(|(k, f)| {
            assert!(
                (f.service_port.0 as usize) < t.service_port_count(),
                "frontend {k:?} points past the service ports"
            );
            (
                format!("{:?}", k),
                format!(
                    "{} -> {}",
                    f.kind.as_str(),
                    port(t.service_port(f.service_port))
                ),
            )
        })
        .collect();
    let mut ports: Vec<String> = t.service_ports().map(|(_, sp)| port(sp)).collect();
    ports.sort();
    let (cluster_ips, vips) = t.addresses();
    let mut addrs: Vec<String> = cluster_ips
        .iter()
        .map(|a| format!("cluster {a}"))
        .chain(vips.iter().map(|a| format!("vip {a}")))
        .collect();
    addrs.sort();
    let mut fe: Vec<String> = frontends
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    fe.extend(ports.into_iter().map(|p| format!("port {p}")));
    fe.extend(addrs);
    fe.extend(c.health_checks.iter().map(|h| format!("hc {h:?}")));
    (
        fe,
        c.errors.iter().map(ToString::to_string).collect(),
        c.notices.clone(),
    )
}

fn key(meta: &ObjectMeta) -> (String, String) {
    object_key_of(meta)
}

/// The names whose definitions differ between two lists.
fn changed_names<T: PartialEq>(
    old: &[Arc<T>],
    new: &[Arc<T>],
    meta: impl Fn(&T) -> &ObjectMeta,
) -> BTreeSet<(String, String)> {
    let group = |list: &[Arc<T>]| {
        let mut m: BTreeMap<(String, String), Vec<Arc<T>>> = BTreeMap::new();
        for o in list {
            m.entry(key(meta(o))).or_default().push(Arc::clone(o));
        }
        m
    };
    let (a, b) = (group(old), group(new));
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

fn defs<T>(list: &[Arc<T>], k: &(String, String), meta: impl Fn(&T) -> &ObjectMeta) -> Vec<Arc<T>> {
    list.iter()
        .filter(|o| key(meta(o)) == *k)
        .map(Arc::clone)
        .collect()
}

/// One random change to a list: add, replace (same name or not) or delete.
fn mutate<T>(rng: &mut ChaCha8Rng, list: &mut Vec<Arc<T>>, make: impl Fn(&mut ChaCha8Rng) -> T) {
    match rng.random_range(0..10) {
        0..=3 => {
            let at = rng.random_range(0..=list.len());
            list.insert(at, Arc::new(make(rng)));
        }
        4..=7 if !list.is_empty() => {
            let at = rng.random_range(0..list.len());
            list[at] = Arc::new(make(rng));
        }
        _ if !list.is_empty() => {
            let at = rng.random_range(0..list.len());
            list.remove(at);
        }
        _ => list.push(Arc::new(make(rng))),
    }
}

fn controller() -> Controller {
    let publisher = TablePublisher::new(Tables {
        services: Arc::new(ServiceTable::new()),
        node: Arc::new(node()),
    });
    Controller::new(
        node(),
        publisher,
        Metrics::new(Duration::from_secs(60)),
        ControllerConfig {
            min_sync_interval: Duration::ZERO,
            compile: opts(),
        },
    )
}

fn run_seed(seed: u64, steps: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut services: Vec<Arc<Service>> = Vec::new();
    let mut slices: Vec<Arc<EndpointSlice>> = Vec::new();
    let mut state = CompileState::new(node(), opts());
    let mut ctl = controller();
    let mut clashes = 0;
    for step in 0..steps {
        let (old_services, old_slices) = (services.clone(), slices.clone());
        for _ in 0..rng.random_range(1..=3) {
            if rng.random_range(0..2) == 0 {
                mutate(&mut rng, &mut services, random_service);
            } else {
                mutate(&mut rng, &mut slices, random_slice);
            }
        }
        for k in changed_names(&old_services, &services, |s| &s.metadata) {
            let d = defs(&services, &k, |s| &s.metadata);
            state.set_service(k, &d);
        }
        for k in changed_names(&old_slices, &slices, |s| &s.metadata) {
            let d = defs(&slices, &k, |s| &s.metadata);
            state.set_slices(k, &d);
        }
        let incremental = state.finish();
        let full = compile_objects(&services, &slices, &node(), &opts(), None);
        let want = render(&full);
        assert_eq!(
            render(&incremental),
            want,
            "seed {seed} step {step}: incremental != full\nservices: {:#?}\nslices: {:#?}",
            services
                .iter()
                .map(|s| key(&s.metadata))
                .collect::<Vec<_>>(),
            slices.iter().map(|s| key(&s.metadata)).collect::<Vec<_>>()
        );
        clashes += full
            .errors
            .iter()
            .filter(|e| e.to_string().contains("already taken"))
            .count();

        // The controller, from whole views.
        let report = ctl.sync_once(SourceEvent::View(SourceView {
            services: services.clone(),
            slices: slices.clone(),
            errors: Vec::new(),
            notices: Vec::new(),
        }));
        let published = ctl.publisher().current();
        let via_controller = Compiled {
            table: (*published.services).clone(),
            errors: report.as_ref().map_or_else(Vec::new, |r| r.errors.clone()),
            notices: report.as_ref().map_or_else(Vec::new, |r| r.notices.clone()),
            health_checks: full.health_checks.clone(),
        };
        let mut got = render(&via_controller);
        if report.is_none() {
            // Nothing changed for the controller: the table must still be right.
            got.1.clone_from(&want.1);
            got.2.clone_from(&want.2);
        }
        assert_eq!(got, want, "seed {seed} step {step}: controller != full");
        if let Some(r) = &report {
            let (_, ports, endpoints) = state.counts();
            assert_eq!(r.counts.service_ports, ports);
            assert_eq!(r.counts.endpoints, endpoints);
            assert_eq!(r.counts.frontends, full.table.frontend_count());
        }
    }
    assert!(clashes > 0, "seed {seed}: the generator made no clash");
}

#[test]
fn incremental_equals_full_over_random_changes() {
    for seed in 0..6 {
        run_seed(seed, 400);
    }
}

/// Unchanged service ports are the previous generation's `Arc`s; a change to one slice
/// rebuilds only its service's ports.
#[test]
fn one_slice_change_rebuilds_one_service() {
    let mut yaml = String::new();
    for i in 0..50 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\n\
             spec: {{clusterIP: 10.96.1.{i}, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [10.244.1.{i}]}}, {{addresses: [10.244.2.{i}]}}]\n---\n"
        ));
    }
    let set = parse_manifests(&yaml, "t");
    let services: Vec<Arc<Service>> = set.services.into_iter().map(Arc::new).collect();
    let mut slices: Vec<Arc<EndpointSlice>> = set.slices.into_iter().map(Arc::new).collect();
    let mut state = CompileState::build(&services, &slices, node(), opts(), None);
    let before = state.finish();
    assert_eq!(state.take_new_ports(), 50);

    let mut changed = (*slices[7]).clone();
    changed.endpoints.pop();
    slices[7] = Arc::new(changed);
    state.set_slices(key(&slices[7].metadata), &slices[7..8]);
    let after = state.finish();
    assert_eq!(state.take_new_ports(), 1);
    let port_of = |c: &Compiled, name: &str| {
        c.table
            .service_ports()
            .find(|(_, p)| p.name.name == name)
            .map(|(_, p)| Arc::clone(p))
            .unwrap()
    };
    for i in 0..50 {
        let name = format!("s{i}");
        let (a, b) = (port_of(&before, &name), port_of(&after, &name));
        assert_eq!(Arc::ptr_eq(&a, &b), i != 7, "{name}");
    }
    assert_eq!(port_of(&after, "s7").endpoints.len(), 1);
    assert_eq!(
        render(&after),
        render(&compile_objects(&services, &slices, &node(), &opts(), None))
    );
}
