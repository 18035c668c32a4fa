//! The benchmark's loop without criterion, for profilers (`perf record`, `valgrind
//! --tool=callgrind`):
//!
//! ```text
//! pipeline_profile <services> <established|new_flow|new_flow_evict> <batches> [tracked flows] [capacity] [process|batch]
//! ```
//!
//! `new_flow_evict`: every frame a new flow into a *full* table, as under a new-flow flood
//! on a live node: no flows are established first (`tracked` is ignored), the first
//! `capacity` new flows fill the table (untimed), and from then on every insert evicts
//! the oldest unestablished flow. The frame set holds `2 capacity` flows, so a flow seen
//! again was evicted long before.
//!
//! Sets up like `benches/pipeline.rs` (tracked flows default 1,000,000, conntrack capacity
//! default 2 Mi; a small capacity and few flows give a cache-resident run), runs `batches` batches of 64 frames and prints the rate (new flows are purged,
//! untimed, whenever their pool is used up). The last argument picks the entry point:
//! `process` (default: `Worker::process` per frame) or `batch` (`Worker::process_batch`).

use std::time::{Duration, Instant};

use kxp_bench::{
    establish, first_packets, thread_cpu_time, worker_config, Cluster, ClusterSpec, Runner, T0_NS,
};
use kxp_dataplane::pipeline::{Worker, BATCH_SIZE};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: pipeline_profile <services> <established|new_flow|new_flow_evict> <batches> [tracked] [capacity] \
         [process|batch]";
    let services: usize = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let mode = args.get(2).expect(usage).clone();
    let batches: u64 = args.get(3).and_then(|s| s.parse().ok()).expect(usage);
    let tracked: u64 = args.get(4).map_or(1_000_000, |s| s.parse().expect(usage));
    let capacity: usize = args.get(5).map_or(1 << 21, |s| s.parse().expect(usage));
    let batch_api = match args.get(6).map(String::as_str) {
        None | Some("process") => false,
        Some("batch") => true,
        _ => panic!("{usage}"),
    };
    let evict = mode == "new_flow_evict";
    let tracked = if evict { 0 } else { tracked };
    let pool: u64 = if evict {
        2 * capacity as u64
    } else {
        (1 << 19).min(capacity as u64 - tracked)
    };

    let cluster = Cluster::build(ClusterSpec::with_services(services));
    let mut worker = Worker::new(worker_config(capacity));
    let t = Instant::now();
    let established = (!evict).then(|| establish(&mut worker, &cluster, 0..tracked, T0_NS));
    eprintln!(
        "{tracked} flows opened in {:.2?} (conntrack index on huge pages: {})",
        t.elapsed(),
        worker.conntrack.index_on_huge_pages()
    );
    let set = match mode.as_str() {
        "established" => established.expect("established flows were opened"),
        "new_flow" | "new_flow_evict" => first_packets(&cluster, tracked..tracked + pool),
        _ => panic!("{usage}"),
    };
    let mut runner = Runner::new(T0_NS);
    if evict {
        // Fill the table (untimed); bounded by the set's own size.
        let mut fill = 0;
        while worker.conntrack.len() < capacity && fill < set.len() / BATCH_SIZE {
            runner.batch_prefetch(&mut worker, &cluster.tables, &set);
            fill += 1;
        }
        eprintln!(
            "table filled: {} of {capacity} flows after {fill} batches",
            worker.conntrack.len()
        );
    }
    let mut timed = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    let mut done = 0;
    while done < batches {
        let room = ((set.len() - runner.cursor) / BATCH_SIZE) as u64;
        let n = (batches - done).min(room);
        let (t, c) = (Instant::now(), thread_cpu_time());
        for _ in 0..n {
            if batch_api {
                runner.batch_prefetch(&mut worker, &cluster.tables, &set);
            } else {
                runner.batch(&mut worker, &cluster.tables, &set);
            }
        }
        timed += t.elapsed();
        cpu += thread_cpu_time() - c;
        done += n;
        if mode == "new_flow" && runner.cursor == 0 {
            worker
                .conntrack
                .purge(|m| cluster.flow_index(m.orig.src, m.orig.sport).unwrap() < tracked);
        }
    }
    let frames = done * BATCH_SIZE as u64;
    eprintln!(
        "{mode}/{services} ({}): {frames} frames in {timed:.2?} wall, {cpu:.2?} CPU: \
         {:.1} ns per frame wall ({:.3} Mpps), {:.1} ns per frame CPU ({:.3} Mpps); dropped {}",
        if batch_api {
            "process_batch"
        } else {
            "process"
        },
        timed.as_nanos() as f64 / frames as f64,
        frames as f64 / timed.as_secs_f64() / 1e6,
        cpu.as_nanos() as f64 / frames as f64,
        frames as f64 / cpu.as_secs_f64() / 1e6,
        worker.counters.dropped.iter().sum::<u64>(),
    );
    let st = worker.conntrack.stats();
    eprintln!(
        "conntrack: {} flows, evicted {}, expired {}, full {}",
        worker.conntrack.len(),
        st.evicted_early,
        st.expired,
        st.full
    );
}
