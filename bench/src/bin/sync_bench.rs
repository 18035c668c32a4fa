//! Control-plane sync benchmark: how long kxp takes from "objects seen" to "tables live",
//! for a full sync and for one endpoint change, next to kube-proxy's nftables and
//! iptables modes applying the equivalent rules to the kernel.
//!
//! ```text
//! sync_bench [options] [SERVICES...]        (default 1000 10000 30000; --help lists options)
//! sync_bench --profile full|change|controller SERVICES ITERATIONS   (one loop, for perf)
//! sync_bench --dump SERVICES DIR                         (the kernel inputs, as files)
//! ```
//!
//! Each size runs in a child process of its own (so that its peak RSS is its own); the
//! parent prints one table. Per size:
//!
//! * The services are `kernel_rules::synthetic_services(n, 10)` (ClusterIP, NodePort for
//!   the first 2,768, 10 endpoints each, TCP and UDP alternating), written as k8s-openapi
//!   `Service` and `EndpointSlice` objects, so kxp and the kernel modes get the same
//!   services.
//! * **kxp full**: `compile_objects(.., previous: None)`, `Tables` built, `publish`ed
//!   through a `TablePublisher`. The generation replaced stays referenced until the clock
//!   has stopped (as the controller's `published` does; workers free it later).
//! * **kxp one change, full recompile**: one endpoint removed from one service's slice
//!   (then added back: both are timed), every object compiled again with the published
//!   table as `previous` (reusing unchanged service ports) and published. Checked: the
//!   changed service port is a new `Arc` with the new endpoint count, and every other
//!   service port is the previous `Arc`.
//! * **kxp one change, incremental**: the same changes through a `CompileState` (the
//!   changed slice handed over, `finish`, `Tables` built, published), checked the same way.
//! * Both also through `Controller::sync_once(SourceEvent::View(..))`, "from change seen to
//!   tables live": the controller finds the changed objects in the view (pointer
//!   comparison: sources hand unchanged objects on as the same `Arc`s), patches its
//!   `CompileState`, publishes, and reports (counts, reuse, metrics, logs). The view is
//!   built before the clock starts (the source's job: a copy of `Arc`s); how long that
//!   takes is printed for reference.
//! * Memory: the heap bytes of the objects and of one compiled table (a counting
//!   allocator, switched on only for that untimed pass), and the process's VmHWM.
//! * Kernel (root only; skipped with a message otherwise): in a throwaway network
//!   namespace per run (`unshare(CLONE_NEWNET)` on a thread of its own; everything goes
//!   with it), `nft -f -` of `nftables_full`, then `nftables_endpoint_change` for single
//!   changes (one endpoint removed, then added back) on top of the loaded ruleset, then
//!   `nft flush ruleset`; then `iptables-restore --noflush --counters` of
//!   `iptables_restore` (as kube-proxy calls it) with the legacy (x_tables) backend and,
//!   up to `--ipt-nft-max` services (it is quadratic), the nf_tables backend. Wall time of
//!   the command, spawn and stdin included, as kube-proxy pays them. After three runs, no
//!   run starts that would end past `--kernel-budget`; above `--kernel-max` services the
//!   kernel runs are skipped (nft takes minutes per run at 10,000 services).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kxp_bench::kernel_rules::{
    iptables_restore, nftables_endpoint_change, nftables_full, synthetic_services,
    KernelRulesConfig, KernelService,
};
use kxp_bench::{thread_cpu_time, Cluster, ClusterSpec, NODE_ADDR};
use kxp_control::compile::{
    compile_objects, object_key_of, set_compile_threads, CompileOptions, CompileState,
    LABEL_SERVICE_NAME,
};
use kxp_control::controller::{Controller, ControllerConfig};
use kxp_control::ops::Metrics;
use kxp_control::source::{SourceEvent, SourceView};
use kxp_dataplane::flow::L4Proto;
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::tables::{FrontendKey, NodeTable, ServicePort, ServiceTable};
use serde_json::{json, Value};

const ENDPOINTS_PER_SERVICE: usize = 10;
const NODES: usize = 100;

// ---------------------------------------------------------------------------------------
// A counting allocator, off unless a measurement switches it on.

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        let now = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` with the counting allocator on; returns its result, the bytes it left
/// allocated and its peak (both relative to the start).
fn counted<T>(f: impl FnOnce() -> T) -> (T, isize, isize) {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (
        out,
        LIVE.load(Ordering::Relaxed),
        PEAK.load(Ordering::Relaxed),
    )
}

// ---------------------------------------------------------------------------------------
// Inputs.

fn meta(namespace: &str, name: &str, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        labels,
        ..ObjectMeta::default()
    }
}

fn upper_proto(s: &KernelService) -> &'static str {
    match s.proto {
        "udp" => "UDP",
        _ => "TCP",
    }
}

/// The k8s-openapi objects of the kernel modes' services: a Service (NodePort when the
/// kernel service has one) and one EndpointSlice with its endpoints, ready, spread over
/// `NODES` nodes (node-0 is this one).
fn objects(ks: &[KernelService]) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(ks.len());
    let mut slices = Vec::with_capacity(ks.len());
    for (i, s) in ks.iter().enumerate() {
        let proto = upper_proto(s);
        let target = s.endpoints.first().map_or(8080, |e| e.1);
        services.push(Service {
            metadata: meta(&s.namespace, &s.name, None),
            spec: Some(ServiceSpec {
                type_: Some(
                    if s.node_port.is_some() {
                        "NodePort"
                    } else {
                        "ClusterIP"
                    }
                    .into(),
                ),
                cluster_ip: Some(s.cluster_ip.to_string()),
                cluster_ips: Some(vec![s.cluster_ip.to_string()]),
                ports: Some(vec![K8sServicePort {
                    name: Some(s.port_name.clone()),
                    port: i32::from(s.port),
                    protocol: Some(proto.into()),
                    target_port: Some(IntOrString::Int(i32::from(target))),
                    node_port: s.node_port.map(i32::from),
                    ..K8sServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        });
        let labels = BTreeMap::from([(LABEL_SERVICE_NAME.to_string(), s.name.clone())]);
        slices.push(EndpointSlice {
            metadata: meta(&s.namespace, &format!("{}-abcde", s.name), Some(labels)),
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(s.port_name.clone()),
                port: Some(i32::from(target)),
                protocol: Some(proto.into()),
                ..EndpointPort::default()
            }]),
            endpoints: s
                .endpoints
                .iter()
                .enumerate()
                .map(|(e, (addr, _))| Endpoint {
                    addresses: vec![addr.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(format!("node-{}", (i * ENDPOINTS_PER_SERVICE + e) % NODES)),
                    ..Endpoint::default()
                })
                .collect(),
        });
    }
    (services, slices)
}

fn frontend_key(s: &KernelService) -> FrontendKey {
    FrontendKey {
        addr: IpAddr::V4(s.cluster_ip),
        proto: if s.proto == "udp" {
            L4Proto::Udp
        } else {
            L4Proto::Tcp
        },
        port: s.port,
    }
}

/// The service changed in repetition `k`.
fn changed_service(k: usize, n: usize) -> usize {
    (k * 7919 + n / 3 + 1) % n
}

fn kernel_config() -> KernelRulesConfig {
    KernelRulesConfig {
        cluster_cidr: "10.244.0.0/16".into(),
        node_ips: vec![NODE_ADDR],
    }
}

// ---------------------------------------------------------------------------------------
// Measurements.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (`/proc/self/clear_refs`, Linux 4.0+).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset VmHWM: {e}");
    }
}

/// Wall and thread-CPU milliseconds of `f`.
/// CPU time of the whole process (every thread).
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel
    // knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (t, c) = (Instant::now(), thread_cpu_time());
    let out = f();
    let cpu = ms(thread_cpu_time() - c);
    (out, ms(t.elapsed()), cpu)
}

/// What the controller does between "view handed over" and "tables live", minus its
/// bookkeeping: compile against `previous`, build `Tables`, publish.
fn compile_publish(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    node: &Arc<NodeTable>,
    opts: &CompileOptions,
    publisher: &TablePublisher,
    previous: Option<&ServiceTable>,
    generation: u64,
) -> Arc<ServiceTable> {
    let mut compiled = compile_objects(services, slices, node, opts, previous);
    assert!(
        compiled.errors.is_empty(),
        "compile errors: {:?}",
        &compiled.errors[..compiled.errors.len().min(3)]
    );
    compiled.table.generation = generation;
    let table = Arc::new(compiled.table);
    publisher.publish(Tables {
        services: Arc::clone(&table),
        node: Arc::clone(node),
    });
    table
}

fn port_of(t: &ServiceTable, key: &FrontendKey) -> Arc<ServicePort> {
    let fe = t.frontend(key).expect("frontend of the changed service");
    Arc::clone(t.service_port_arc(fe.service_port))
}

/// Checks a one-endpoint change: the changed port is new, with `want` endpoints and a new
/// Maglev table; every other port is the previous `Arc`.
fn check_change(prev: &ServiceTable, next: &ServiceTable, key: &FrontendKey, want: usize) {
    let (a, b) = (port_of(prev, key), port_of(next, key));
    assert!(!Arc::ptr_eq(&a, &b), "changed service port was reused");
    assert_eq!(b.endpoints.len(), want, "endpoints after the change");
    assert!(!Arc::ptr_eq(&a.cluster_lb, &b.cluster_lb));
    let old: HashSet<*const ServicePort> =
        prev.service_ports().map(|(_, p)| Arc::as_ptr(p)).collect();
    let total = next.service_ports().count();
    let reused = next
        .service_ports()
        .filter(|(_, p)| old.contains(&Arc::as_ptr(p)))
        .count();
    assert_eq!(reused, total - 1, "every unchanged service port is reused");
}

struct Setup {
    ks: Vec<KernelService>,
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    node: Arc<NodeTable>,
    opts: CompileOptions,
}

fn setup(n: usize) -> (Setup, isize) {
    let ks = synthetic_services(n, ENDPOINTS_PER_SERVICE);
    let ((services, slices), objects_bytes, _) = counted(|| {
        let (services, slices) = objects(&ks);
        (
            services.into_iter().map(Arc::new).collect(),
            slices.into_iter().map(Arc::new).collect(),
        )
    });
    let node = Arc::new(Cluster::node_table(&ClusterSpec::with_services(n)));
    (
        Setup {
            ks,
            services,
            slices,
            node,
            opts: CompileOptions::default(),
        },
        objects_bytes,
    )
}

fn empty_publisher(node: &Arc<NodeTable>) -> Arc<TablePublisher> {
    TablePublisher::new(Tables {
        services: Arc::new(ServiceTable::new()),
        node: Arc::clone(node),
    })
}

fn new_controller(s: &Setup) -> Controller {
    Controller::new(
        (*s.node).clone(),
        empty_publisher(&s.node),
        Metrics::new(Duration::from_secs(60)),
        ControllerConfig {
            min_sync_interval: Duration::ZERO,
            compile: s.opts.clone(),
        },
    )
}

fn view(s: &Setup) -> SourceView {
    SourceView {
        services: s.services.clone(),
        slices: s.slices.clone(),
        errors: Vec::new(),
        notices: Vec::new(),
    }
}

fn child(n: usize, reps: usize, kernel: Result<KernelOpts, String>) -> Value {
    let (mut s, objects_bytes) = setup(n);
    let rss_objects_kb = proc_status_kb("VmRSS:");
    eprintln!("[{n}] objects built: {} MB heap", objects_bytes >> 20);

    // Table size, untimed, with the counting allocator.
    let (table, table_bytes, compile_peak_bytes) =
        counted(|| compile_objects(&s.services, &s.slices, &s.node, &s.opts, None).table);
    let ports = table.service_ports().count();
    let endpoints: usize = table.service_ports().map(|(_, p)| p.endpoints.len()).sum();
    let maglev_slots: usize = table
        .service_ports()
        .map(|(_, p)| p.cluster_lb.size() + p.local_lb.size())
        .sum();
    let local_tables = table
        .service_ports()
        .filter(|(_, p)| !p.local_lb.is_empty())
        .count();
    let frontends = table.frontend_count();
    drop(table);

    // (a) Full compile + publish.
    reset_peak_rss();
    let publisher = empty_publisher(&s.node);
    let mut generation = 0;
    let (mut full, mut full_cpu, mut full_proc_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let (mut full_1t, mut full_1t_cpu) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        // Alternately on every CPU (the default) and on this thread only.
        for threads in [0, 1] {
            set_compile_threads(threads);
            let old = publisher.current();
            generation += 1;
            let proc_start = process_cpu_time();
            let (_, wall, cpu) = timed(|| {
                compile_publish(
                    &s.services,
                    &s.slices,
                    &s.node,
                    &s.opts,
                    &publisher,
                    None,
                    generation,
                )
            });
            let proc_cpu = ms(process_cpu_time() - proc_start);
            drop(old);
            if threads == 0 {
                full.push(wall);
                full_cpu.push(cpu);
                full_proc_cpu.push(proc_cpu);
            } else {
                full_1t.push(wall);
                full_1t_cpu.push(cpu);
            }
        }
    }
    set_compile_threads(0);
    eprintln!(
        "[{n}] kxp full: median {:.1} ms ({:.1} ms on one thread)",
        stats(&full).0,
        stats(&full_1t).0
    );

    // (b) One endpoint change, removed then added back, with reuse.
    let (mut remove, mut add, mut change_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..reps {
        let i = changed_service(k, n);
        let key = frontend_key(&s.ks[i]);
        for removing in [true, false] {
            let ep = if removing {
                let ep = Arc::make_mut(&mut s.slices[i])
                    .endpoints
                    .pop()
                    .expect("an endpoint to remove");
                Some(ep)
            } else {
                None
            };
            let prev = publisher.current();
            generation += 1;
            let (table, wall, cpu) = timed(|| {
                compile_publish(
                    &s.services,
                    &s.slices,
                    &s.node,
                    &s.opts,
                    &publisher,
                    Some(&prev.services),
                    generation,
                )
            });
            assert!(Arc::ptr_eq(&publisher.current().services, &table));
            let want = ENDPOINTS_PER_SERVICE - usize::from(removing);
            check_change(&prev.services, &table, &key, want);
            if let Some(ep) = ep {
                remove.push(wall);
                Arc::make_mut(&mut s.slices[i]).endpoints.push(ep);
            } else {
                add.push(wall);
            }
            change_cpu.push(cpu);
        }
    }
    let change: Vec<f64> = remove.iter().chain(&add).copied().collect();
    eprintln!(
        "[{n}] kxp one change, full recompile: median {:.2} ms",
        stats(&change).0
    );

    // (c) The same changes through a CompileState: only the changed slice's service is
    // compiled again, and the table patched.
    let mut state = CompileState::build(
        &s.services,
        &s.slices,
        (*s.node).clone(),
        s.opts.clone(),
        None,
    );
    let first = state.finish();
    assert!(first.errors.is_empty());
    assert_eq!(state.take_new_ports(), ports);
    assert_eq!(first.table.service_ports().count(), ports);
    generation += 1;
    publisher.publish(Tables {
        services: Arc::new(first.table),
        node: Arc::clone(&s.node),
    });
    let (mut inc, mut inc_cpu) = (Vec::new(), Vec::new());
    for k in 0..reps {
        let i = changed_service(k, n);
        let key = frontend_key(&s.ks[i]);
        for removing in [true, false] {
            let mut slice = (*s.slices[i]).clone();
            let held = if removing {
                slice.endpoints.pop()
            } else {
                None
            };
            if !removing {
                slice = (*s.slices[i]).clone();
            }
            let changed = [Arc::new(slice)];
            let prev = publisher.current();
            generation += 1;
            let (table, wall, cpu) = timed(|| {
                state.set_slices(object_key_of(&changed[0].metadata), &changed);
                let mut compiled = state.finish();
                compiled.table.generation = generation;
                let table = Arc::new(compiled.table);
                publisher.publish(Tables {
                    services: Arc::clone(&table),
                    node: Arc::clone(&s.node),
                });
                table
            });
            assert!(Arc::ptr_eq(&publisher.current().services, &table));
            let want = ENDPOINTS_PER_SERVICE - usize::from(held.is_some());
            check_change(&prev.services, &table, &key, want);
            assert_eq!(state.take_new_ports(), 1);
            inc.push(wall);
            inc_cpu.push(cpu);
        }
    }
    drop(state);
    eprintln!(
        "[{n}] kxp one change, incremental: median {:.3} ms",
        stats(&inc).0
    );
    let hwm_core_kb = proc_status_kb("VmHWM:");

    // Floors for an incremental compile: one service compiled alone (Maglev table
    // included), and a copy of the whole published table.
    let (mut one_service, mut table_clone) = (Vec::new(), Vec::new());
    let current = publisher.current();
    for k in 0..reps {
        let i = changed_service(k, n);
        let (c, wall, _) =
            timed(|| compile_objects(&s.services[i..=i], &s.slices[i..=i], &s.node, &s.opts, None));
        assert_eq!(c.table.service_ports().count(), 1);
        one_service.push(wall);
        let (copy, wall, _) = timed(|| (*current.services).clone());
        table_clone.push(wall);
        drop(copy);
    }
    drop(current);
    drop(publisher);

    // Through the Controller.
    reset_peak_rss();
    let (mut ctl_full, mut ctl_change, mut clone_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut controller = None;
    for _ in 0..reps {
        let mut c = new_controller(&s);
        let (v, clone_wall, _) = timed(|| view(&s));
        clone_ms.push(clone_wall);
        let (report, wall, _) = timed(|| c.sync_once(SourceEvent::View(v)));
        let report = report.expect("a sync");
        assert_eq!(report.counts.service_ports, ports);
        ctl_full.push(wall);
        // Drop the previous controller (and its tables) outside the clock.
        controller = Some(c);
    }
    let mut c = controller.expect("a controller");
    let (mut ctl_change_cpu, mut ctl_change_total) = (Vec::new(), Vec::new());
    for k in 0..reps {
        let i = changed_service(k, n);
        for removing in [true, false] {
            // The source's next view: the same `Arc`s but for the changed slice.
            let mut v = view(&s);
            let mut slice = (*v.slices[i]).clone();
            if removing {
                slice.endpoints.pop();
            }
            v.slices[i] = Arc::new(slice);
            // "Change seen" is the view handed over; "tables live" is the publish
            // (`SyncReport::duration` ends there). The rest of `sync` (freeing the
            // replaced view and table, metrics, logs) is timed too, as the total.
            let (queued, apply_wall, apply_cpu) = timed(|| c.apply(SourceEvent::View(v)));
            assert!(queued);
            let (report, wall, cpu) = timed(|| c.sync());
            let report = report.expect("a sync");
            assert_eq!(report.reused_ports, ports - 1);
            assert_eq!(report.counts.endpoints, endpoints - usize::from(removing));
            ctl_change.push(apply_wall + ms(report.duration));
            ctl_change_total.push(apply_wall + wall);
            ctl_change_cpu.push(apply_cpu + cpu);
        }
    }
    drop(c);
    eprintln!(
        "[{n}] controller: full {:.1} ms, one change {:.2} ms",
        stats(&ctl_full).0,
        stats(&ctl_change).0
    );
    let hwm_controller_kb = proc_status_kb("VmHWM:");

    let kernel_result = match kernel.and_then(|o| kernel_runs(&s.ks, o)) {
        Ok(v) => v,
        Err(e) => json!({ "skipped": e }),
    };

    json!({
        "services": n,
        "service_ports": ports,
        "endpoints": endpoints,
        "frontends": frontends,
        "maglev_slots": maglev_slots,
        "local_maglev_tables": local_tables,
        "objects_bytes": objects_bytes,
        "table_bytes": table_bytes,
        "compile_peak_bytes": compile_peak_bytes,
        "rss_objects_kb": rss_objects_kb,
        "hwm_core_kb": hwm_core_kb,
        "hwm_controller_kb": hwm_controller_kb,
        "one_service_compile": one_service,
        "table_clone": table_clone,
        "kxp_full": full,
        "kxp_full_cpu": full_cpu,
        "kxp_full_process_cpu": full_proc_cpu,
        "kxp_full_1thread": full_1t,
        "kxp_full_1thread_cpu": full_1t_cpu,
        "kxp_change_remove": remove,
        "kxp_change_add": add,
        "kxp_change": change,
        "kxp_change_cpu": change_cpu,
        "controller_full": ctl_full,
        "controller_change": ctl_change,
        "controller_change_cpu": ctl_change_cpu,
        "controller_change_total": ctl_change_total,
        "kxp_incremental": inc,
        "kxp_incremental_cpu": inc_cpu,
        "view_clone": clone_ms,
        "kernel": kernel_result,
    })
}

// ---------------------------------------------------------------------------------------
// Kernel baselines.

/// Runs `cmd args` with `input` on stdin; returns its wall time in ms.
fn run_timed(cmd: &str, args: &[&str], input: &str) -> Result<f64, String> {
    let t = Instant::now();
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .map_err(|e| format!("{cmd} stdin: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    let wall = ms(t.elapsed());
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{cmd} {args:?} failed ({}): {}",
            out.status,
            err.lines().take(5).collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(wall)
}

fn kernel_possible() -> Result<(), String> {
    if !kxp_bench::kernel_rules_tests_possible() {
        return Err("needs root, nft and iptables-restore".into());
    }
    Ok(())
}

/// How the kernel baselines run.
#[derive(Debug, Clone, Copy)]
struct KernelOpts {
    /// Runs (fresh namespace each), at least 3 unless `budget` allows more.
    reps: usize,
    /// Stop starting runs (after 3) once another one would end past this.
    budget: Duration,
    /// Remove/add pairs per run.
    change_pairs: usize,
    /// Largest size at which `iptables-nft-restore --noflush` is timed (it is quadratic).
    ipt_nft_max: usize,
}

fn kernel_runs(ks: &[KernelService], o: KernelOpts) -> Result<Value, String> {
    kernel_possible()?;
    let n = ks.len();
    let cfg = kernel_config();
    let (full_text, gen_nft, _) = timed(|| nftables_full(ks, &cfg));
    let (ipt_text, gen_ipt, _) = timed(|| iptables_restore(ks, &cfg));
    let change = |k: usize| {
        let i = changed_service(k, n);
        let mut after = ks[i].clone();
        after.endpoints.pop();
        (
            nftables_endpoint_change(&ks[i], &after, &cfg),
            nftables_endpoint_change(&after, &ks[i], &cfg),
        )
    };
    let change_bytes = change(0).0.len();
    let with_ipt_nft = n <= o.ipt_nft_max;
    let (mut nft_full, mut nft_change, mut ipt_legacy, mut ipt_nft) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    let mut last = Duration::ZERO;
    for rep in 0..o.reps {
        if rep >= 3 && start.elapsed() + last > o.budget {
            eprintln!(
                "[{n}] kernel: stopping after {rep} runs (budget {:?})",
                o.budget
            );
            break;
        }
        let run_start = Instant::now();
        let changes: Vec<(String, String)> = (0..o.change_pairs)
            .map(|j| change(rep * o.change_pairs + j))
            .collect();
        let (full_text, ipt_text, changes) = (&full_text, &ipt_text, &changes);
        type Run = (f64, Vec<f64>, f64, Option<f64>);
        let r: Result<Run, String> = std::thread::scope(|sc| {
            sc.spawn(move || {
                // SAFETY: unshare(2) with a constant flag; it only moves this thread (and
                // the children it spawns) into a new, empty network namespace, which the
                // kernel frees when the thread and its children are gone.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "unshare(CLONE_NEWNET): {}",
                        std::io::Error::last_os_error()
                    ));
                }
                let nft = |text: &str| run_timed("nft", &["-f", "-"], text);
                let full = nft(full_text)?;
                let mut ch = Vec::new();
                for (remove, add) in changes {
                    ch.push(nft(remove)?);
                    ch.push(nft(add)?);
                }
                run_timed("nft", &["flush", "ruleset"], "")?;
                let legacy = run_timed(
                    "iptables-legacy-restore",
                    &["--noflush", "--counters"],
                    ipt_text,
                )?;
                run_timed("iptables-legacy", &["-t", "nat", "-F"], "")?;
                run_timed("iptables-legacy", &["-t", "nat", "-X"], "")?;
                let on_nft = if with_ipt_nft {
                    let t = run_timed(
                        "iptables-nft-restore",
                        &["--noflush", "--counters"],
                        ipt_text,
                    )?;
                    run_timed("nft", &["flush", "ruleset"], "")?;
                    Some(t)
                } else {
                    None
                };
                Ok((full, ch, legacy, on_nft))
            })
            .join()
            .map_err(|_| "kernel thread panicked".to_string())?
        });
        let (full, ch, legacy, on_nft) = r?;
        eprintln!(
            "[{n}] nft full {full:.0} ms, one change {} ms, iptables-legacy-restore {legacy:.0} ms{}",
            ch.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>().join("/"),
            on_nft.map_or(String::new(), |t| format!(", iptables-nft-restore {t:.0} ms"))
        );
        nft_full.push(full);
        nft_change.extend(ch);
        ipt_legacy.push(legacy);
        ipt_nft.extend(on_nft);
        // Let the kernel finish freeing the namespace before the next run.
        std::thread::sleep(Duration::from_millis(500));
        last = run_start.elapsed();
    }
    Ok(json!({
        "nft_full": nft_full,
        "nft_change": nft_change,
        "ipt_legacy_full": ipt_legacy,
        "ipt_nft_full": ipt_nft,
        "ipt_nft_skipped": !with_ipt_nft,
        "nft_bytes": full_text.len(),
        "nft_lines": full_text.lines().count(),
        "ipt_bytes": ipt_text.len(),
        "ipt_lines": ipt_text.lines().count(),
        "change_bytes": change_bytes,
        "gen_nft_ms": gen_nft,
        "gen_ipt_ms": gen_ipt,
    }))
}

/// Writes the kernel inputs for `n` services to `dir`, to apply them by hand.
fn dump(n: usize, dir: &std::path::Path) {
    let ks = synthetic_services(n, ENDPOINTS_PER_SERVICE);
    let cfg = kernel_config();
    let i = changed_service(0, n);
    let mut after = ks[i].clone();
    after.endpoints.pop();
    std::fs::create_dir_all(dir).expect("dump dir");
    for (name, text) in [
        ("full.nft", nftables_full(&ks, &cfg)),
        ("remove.nft", nftables_endpoint_change(&ks[i], &after, &cfg)),
        ("add.nft", nftables_endpoint_change(&after, &ks[i], &cfg)),
        ("full.ipt", iptables_restore(&ks, &cfg)),
    ] {
        std::fs::write(dir.join(name), text).expect("write");
    }
}

// ---------------------------------------------------------------------------------------
// Profiling loop.

fn profile(mode: &str, n: usize, iterations: usize) {
    let (mut s, _) = setup(n);
    if mode == "controller" {
        // Views are cloned outside the timed call, but inside the profile: look at
        // `Controller::sync_once` and below.
        let mut c = new_controller(&s);
        c.sync_once(SourceEvent::View(view(&s))).expect("a sync");
        let mut times = Vec::new();
        for k in 0..iterations {
            let i = changed_service(k / 2, n);
            let mut v = view(&s);
            let mut slice = (*v.slices[i]).clone();
            if k % 2 == 0 {
                slice.endpoints.pop();
            }
            v.slices[i] = Arc::new(slice);
            let t = Instant::now();
            c.sync_once(SourceEvent::View(v)).expect("a sync");
            times.push(ms(t.elapsed()));
        }
        let (med, min, max) = stats(&times);
        println!("controller change {n}: {iterations} iterations, median {med:.2} ms (min {min:.2}, max {max:.2})");
        return;
    }
    let publisher = empty_publisher(&s.node);
    let mut generation = 0;
    let table = compile_publish(
        &s.services,
        &s.slices,
        &s.node,
        &s.opts,
        &publisher,
        None,
        generation,
    );
    drop(table);
    let mut times = Vec::new();
    let mut held: Option<Endpoint> = None;
    for k in 0..iterations {
        generation += 1;
        let prev = publisher.current();
        let previous = match mode {
            "full" => None,
            "change" => {
                let i = changed_service(k / 2, n);
                let slice = Arc::make_mut(&mut s.slices[i]);
                match held.take() {
                    None => held = slice.endpoints.pop(),
                    Some(ep) => slice.endpoints.push(ep),
                }
                Some(&prev.services)
            }
            _ => panic!("mode: full, change or controller"),
        };
        let t = Instant::now();
        compile_publish(
            &s.services,
            &s.slices,
            &s.node,
            &s.opts,
            &publisher,
            previous.map(|p| &**p),
            generation,
        );
        times.push(ms(t.elapsed()));
    }
    let (med, min, max) = stats(&times);
    println!(
        "{mode} {n}: {iterations} iterations, median {med:.2} ms (min {min:.2}, max {max:.2})"
    );
}

// ---------------------------------------------------------------------------------------
// Parent: one child per size, then the table.

fn arr(v: &Value, k: &str) -> Vec<f64> {
    v[k].as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (med, min, max) = stats(v);
    let p = |x: f64| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else if x >= 10.0 {
            format!("{x:.1}")
        } else if x < 1.0 {
            format!("{x:.3}")
        } else {
            format!("{x:.2}")
        }
    };
    format!("{} [{}-{}]", p(med), p(min), p(max))
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / (1 << 20) as f64)
}

fn print_table(results: &[Value]) {
    let sizes: Vec<String> = results
        .iter()
        .map(|r| format!("{} svc", r["services"]))
        .collect();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Value) -> String| {
        rows.push((name.to_string(), results.iter().map(f).collect()));
    };
    let med = |v: &Value, k: &str| {
        let a = arr(v, k);
        (!a.is_empty()).then(|| stats(&a).0)
    };
    let kmed = |v: &Value, k: &str| {
        let a = arr(&v["kernel"], k);
        (!a.is_empty()).then(|| stats(&a).0)
    };
    row("service ports / endpoints", &|r| {
        format!("{} / {}", r["service_ports"], r["endpoints"])
    });
    row("kxp full: compile+publish (ms)", &|r| {
        cell(&arr(r, "kxp_full"))
    });
    row("  same, CPU of the calling thread (ms)", &|r| {
        cell(&arr(r, "kxp_full_cpu"))
    });
    row("  same, CPU of the process, all threads (ms)", &|r| {
        cell(&arr(r, "kxp_full_process_cpu"))
    });
    row("kxp full, compile on one thread (ms)", &|r| {
        cell(&arr(r, "kxp_full_1thread"))
    });
    row("  same, thread CPU (ms)", &|r| {
        cell(&arr(r, "kxp_full_1thread_cpu"))
    });
    row("kxp full via Controller (ms)", &|r| {
        cell(&arr(r, "controller_full"))
    });
    row("kxp one change, incremental: compile+publish (ms)", &|r| {
        cell(&arr(r, "kxp_incremental"))
    });
    row("  same, thread CPU (ms)", &|r| {
        cell(&arr(r, "kxp_incremental_cpu"))
    });
    row("kxp one change via Controller, seen -> live (ms)", &|r| {
        cell(&arr(r, "controller_change"))
    });
    row("  whole apply + sync, freeing included (ms)", &|r| {
        cell(&arr(r, "controller_change_total"))
    });
    row("  apply + sync, thread CPU (ms)", &|r| {
        cell(&arr(r, "controller_change_cpu"))
    });
    row("kxp one change, full recompile (ms)", &|r| {
        cell(&arr(r, "kxp_change"))
    });
    row("  remove / add medians (ms)", &|r| {
        format!(
            "{:.2} / {:.2}",
            med(r, "kxp_change_remove").unwrap_or(f64::NAN),
            med(r, "kxp_change_add").unwrap_or(f64::NAN)
        )
    });
    row("  same, thread CPU (ms)", &|r| {
        cell(&arr(r, "kxp_change_cpu"))
    });
    row("  (view clone, before handover) (ms)", &|r| {
        cell(&arr(r, "view_clone"))
    });
    row("  floor: one service compiled alone (ms)", &|r| {
        cell(&arr(r, "one_service_compile"))
    });
    row("  floor: clone of the published table (ms)", &|r| {
        cell(&arr(r, "table_clone"))
    });
    row("nft -f full (ms)", &|r| {
        cell(&arr(&r["kernel"], "nft_full"))
    });
    row("nft -f one change (ms)", &|r| {
        cell(&arr(&r["kernel"], "nft_change"))
    });
    row("iptables-legacy-restore full (ms)", &|r| {
        cell(&arr(&r["kernel"], "ipt_legacy_full"))
    });
    row("iptables-nft-restore full (ms)", &|r| {
        cell(&arr(&r["kernel"], "ipt_nft_full"))
    });
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.0}x", a / b),
        _ => "-".into(),
    };
    row("nft full / kxp full", &|r| {
        ratio(kmed(r, "nft_full"), med(r, "kxp_full"))
    });
    row("nft change / kxp change via Controller", &|r| {
        ratio(kmed(r, "nft_change"), med(r, "controller_change"))
    });
    row("nft change / kxp change, full recompile", &|r| {
        ratio(kmed(r, "nft_change"), med(r, "kxp_change"))
    });
    row("iptables-legacy full / kxp full", &|r| {
        ratio(kmed(r, "ipt_legacy_full"), med(r, "kxp_full"))
    });
    row("iptables-nft full / kxp full", &|r| {
        ratio(kmed(r, "ipt_nft_full"), med(r, "kxp_full"))
    });
    row("peak RSS (VmHWM), compile+publish runs", &|r| {
        mb(r["hwm_core_kb"].as_f64().unwrap_or(0.0) * 1024.0)
    });
    row("peak RSS (VmHWM), Controller runs", &|r| {
        mb(r["hwm_controller_kb"].as_f64().unwrap_or(0.0) * 1024.0)
    });
    row("  RSS with the objects only", &|r| {
        mb(r["rss_objects_kb"].as_f64().unwrap_or(0.0) * 1024.0)
    });
    row("objects heap (Services+Slices)", &|r| {
        mb(r["objects_bytes"].as_f64().unwrap_or(0.0))
    });
    row("published table heap", &|r| {
        mb(r["table_bytes"].as_f64().unwrap_or(0.0))
    });
    row("  Maglev slots (2 B each)", &|r| {
        format!(
            "{} ({})",
            r["maglev_slots"],
            mb(r["maglev_slots"].as_f64().unwrap_or(0.0) * 2.0)
        )
    });
    row("compile heap peak", &|r| {
        mb(r["compile_peak_bytes"].as_f64().unwrap_or(0.0))
    });
    row("nft ruleset (lines / bytes)", &|r| {
        let k = &r["kernel"];
        if k["nft_lines"].is_null() {
            "-".into()
        } else {
            format!(
                "{} / {}",
                k["nft_lines"],
                mb(k["nft_bytes"].as_f64().unwrap_or(0.0))
            )
        }
    });

    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..sizes.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.1[i].len())
                .chain([sizes[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |name: &str, cells: &[String]| {
        let mut s = format!("| {name:<w0$} |");
        for (c, w) in cells.iter().zip(&widths) {
            s.push_str(&format!(" {c:>w$} |"));
        }
        s
    };
    println!("{}", line("median [min-max]", &sizes));
    let mut sep = format!("| {} |", "-".repeat(w0));
    for w in &widths {
        sep.push_str(&format!(" {}: |", "-".repeat(w - 1)));
    }
    println!("{sep}");
    for (name, cells) in &rows {
        println!("{}", line(name, cells));
    }
    for r in results {
        if let Some(why) = r["kernel"]["skipped"].as_str() {
            println!(
                "\nkernel baselines skipped for {} services: {why}",
                r["services"]
            );
        }
    }
}

const USAGE: &str = "\
usage: sync_bench [options] [SERVICES...]        (default sizes: 1000 10000 30000)
  --reps R              kxp measurements per size (default 7)
  --kernel-reps K       kernel runs per size, each in a fresh namespace (default 5)
  --kernel-budget S     after 3 runs, start no run that would end past S seconds (default 600)
  --change-pairs C      nft remove/add pairs per kernel run (default 2)
  --kernel-max N        no kernel runs above N services (default 10000)
  --ipt-nft-max N       time iptables-nft-restore --noflush up to N services (default 1000)
  --no-kernel           kxp only
sync_bench --profile full|change|controller SERVICES ITERATIONS   (one loop, for perf)
sync_bench --dump SERVICES DIR                         (write the kernel inputs)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut reps, mut kernel, mut kernel_max) = (7usize, true, 10_000usize);
    let mut ko = KernelOpts {
        reps: 5,
        budget: Duration::from_secs(600),
        change_pairs: 2,
        ipt_nft_max: 1_000,
    };
    let mut sizes = Vec::new();
    let mut child_size = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{USAGE}"))
        };
        match a.as_str() {
            "--reps" => reps = num(),
            "--kernel-reps" => ko.reps = num(),
            "--kernel-budget" => ko.budget = Duration::from_secs(num() as u64),
            "--change-pairs" => ko.change_pairs = num(),
            "--kernel-max" => kernel_max = num(),
            "--ipt-nft-max" => ko.ipt_nft_max = num(),
            "--no-kernel" => kernel = false,
            "--child" => child_size = Some(num()),
            "--dump" => {
                let n = num();
                let dir = it.next().expect(USAGE).clone();
                dump(n, std::path::Path::new(&dir));
                return;
            }
            "--profile" => {
                let mode = it.next().expect(USAGE).clone();
                let n = it.next().and_then(|v| v.parse().ok()).expect(USAGE);
                let iters = it.next().and_then(|v| v.parse().ok()).expect(USAGE);
                profile(&mode, n, iters);
                return;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            s => sizes.push(s.parse::<usize>().unwrap_or_else(|_| panic!("{USAGE}"))),
        }
    }
    assert!(reps >= 1 && ko.reps >= 1 && ko.change_pairs >= 1, "{USAGE}");
    if let Some(n) = child_size {
        let k = if !kernel {
            Err("--no-kernel".to_string())
        } else if n > kernel_max {
            Err(format!(
                "above --kernel-max {kernel_max} (nft -f of the full ruleset grows \
                 superlinearly: minutes at 10,000 services)"
            ))
        } else {
            Ok(ko)
        };
        let v = child(n, reps, k);
        println!("RESULT {v}");
        return;
    }
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000, 30_000];
    }
    let mut skipped_why = None;
    if kernel {
        if let Err(why) = kernel_possible() {
            eprintln!("kernel baselines (nft, iptables-restore) skipped: {why}");
            kernel = false;
            skipped_why = Some(why);
        }
    }
    let exe = std::env::current_exe().expect("own path");
    let mut results = Vec::new();
    for &n in &sizes {
        let mut cmd = Command::new(&exe);
        for (flag, v) in [
            ("--child", n),
            ("--reps", reps),
            ("--kernel-reps", ko.reps),
            ("--kernel-budget", ko.budget.as_secs() as usize),
            ("--change-pairs", ko.change_pairs),
            ("--kernel-max", kernel_max),
            ("--ipt-nft-max", ko.ipt_nft_max),
        ] {
            cmd.args([flag.to_string(), v.to_string()]);
        }
        if !kernel {
            cmd.arg("--no-kernel");
        }
        let mut c = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let out = BufReader::new(c.stdout.take().expect("stdout"));
        let mut result = None;
        for l in out.lines() {
            let l = l.expect("child output");
            if let Some(j) = l.strip_prefix("RESULT ") {
                result = Some(serde_json::from_str::<Value>(j).expect("child result"));
            } else {
                println!("{l}");
            }
        }
        let status = c.wait().expect("child");
        assert!(status.success(), "child for {n} services: {status}");
        let mut result = result.expect("child printed a result");
        if let Some(why) = &skipped_why {
            result["kernel"] = json!({ "skipped": why });
        }
        results.push(result);
    }
    println!();
    println!(
        "kxp sync vs kube-proxy rule apply, {ENDPOINTS_PER_SERVICE} endpoints per service. \
         kxp: {reps} runs per size; one change = one endpoint removed, then added back \
         (both timed, so 2 x {reps} samples). Kernel: up to {} runs per size, each in a \
         fresh network namespace, {} remove/add pairs per run; wall time of the command, \
         spawn included.",
        ko.reps, ko.change_pairs
    );
    println!();
    print_table(&results);
    if std::env::var_os("SYNC_BENCH_JSON").is_some() {
        for r in &results {
            println!("{r}");
        }
    }
}
