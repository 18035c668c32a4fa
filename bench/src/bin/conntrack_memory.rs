//! Conntrack memory per tracked flow with 1,000,000 IPv4 flows opened through the pipeline,
//! for three sizings: the default `WorkerConfig` (1 Mi IPv4 + 256 Ki IPv6 slots), the same
//! without the IPv6 table, and the benchmark's (2 Mi IPv4 + 256 Ki IPv6).
//!
//! ```text
//! cargo run --profile bench -p kxp-bench --bin conntrack_memory
//! ```

use kxp_bench::{establish, worker_config, Cluster, ClusterSpec, T0_NS};
use kxp_dataplane::conntrack::ConntrackConfig;
use kxp_dataplane::pipeline::{Worker, WorkerConfig};

const FLOWS: u64 = 1_000_000;

fn main() {
    let cluster = Cluster::build(ClusterSpec::with_services(1_000));
    let configs = [
        ("default (1 Mi v4 + 256 Ki v6)", WorkerConfig::default()),
        (
            "default, IPv6 table off (1 Mi v4)",
            WorkerConfig {
                conntrack: ConntrackConfig {
                    capacity_v6: 0,
                    ..ConntrackConfig::default()
                },
                ..WorkerConfig::default()
            },
        ),
        ("bench (2 Mi v4 + 256 Ki v6)", worker_config(1 << 21)),
    ];
    println!("| sizing | capacity (v4 + v6) | flows | conntrack bytes | bytes per flow |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, cfg) in configs {
        let mut w = Worker::new(cfg);
        establish(&mut w, &cluster, 0..FLOWS, T0_NS);
        let ct = &w.conntrack;
        assert_eq!(ct.len() as u64, FLOWS);
        println!(
            "| {name} | {} | {} | {} | {:.1} |",
            ct.capacity(),
            ct.len(),
            ct.memory_bytes(),
            ct.memory_bytes() as f64 / ct.len() as f64
        );
    }
}
