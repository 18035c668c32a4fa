//! Frames per second per core through `Worker::process`, with 1M flows tracked.
//!
//! For each service count (10, 1,000, 10,000), one worker (conntrack capacity 2 Mi IPv4
//! flows) gets 1,000,000 flows opened through the pipeline itself (see
//! `kxp_bench::establish`), then:
//!
//! * `established/<n>`: mid-flow frames of those flows (half original direction, half
//!   replies, shuffled), 1,000,000 distinct frames cycled through;
//! * `new_flow/<n>`: first packets (TCP SYN / first UDP datagram) of 524,288 flows not
//!   tracked yet; when the pool is used up the new flows are purged from conntrack
//!   outside the timed region and the pool starts over, so every measured frame is a real
//!   new flow (lookup miss, frontend, Maglev, SNAT for external clients, conntrack insert,
//!   NAT) into a table holding 1.0M to 1.52M flows.
//!
//! `established_cache_resident/<n>` and `new_flow_cache_resident/<n>` (10 and 10,000
//! services) repeat both with 2,048 tracked flows in a 4 Ki table (no IPv6 table), so
//! that what the pipeline touches stays in cache: the gap to the main runs is memory
//! latency.
//!
//! Every group is run twice: through `Worker::process`, one call per frame (the names
//! above), and through `Worker::process_batch`, one call per batch, which prefetches the
//! batch's conntrack state before processing the frames (the same names with `_batch`
//! after the kind: `established_batch/<n>`, `new_flow_batch_cache_resident/<n>`, ...).
//!
//! One iteration is one batch of 64 frames: copied into a receive ring from the frame set
//! (the pipeline rewrites in place), processed, then `housekeeping`. `receive_copy` times
//! the copy alone. Each run also prints wall and thread CPU time over all its timed
//! batches (a check on how much a shared machine took from it). Verdicts are checked
//! from the worker's counters after each run: every frame must be forwarded with the
//! expected reason, none dropped.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kxp_bench::{
    establish, first_packets, thread_cpu_time, worker_config, Cluster, ClusterSpec, FrameSet,
    Runner, T0_NS,
};
use kxp_dataplane::conntrack::ConntrackConfig;
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::pipeline::{Worker, BATCH_SIZE};
use kxp_dataplane::verdict::{Counters, ForwardReason};

const SERVICE_COUNTS: [usize; 3] = [10, 1_000, 10_000];

/// One set-up: a cluster, a worker with `tracked` flows open, and the frames to measure.
#[derive(Debug, Clone, Copy)]
struct Case {
    /// Suffix of the criterion group names ("" for the main runs).
    suffix: &'static str,
    services: usize,
    /// Flows in conntrack before anything is measured.
    tracked: u64,
    /// IPv4 conntrack capacity: room for `tracked` plus a whole new-flow pool.
    capacity: usize,
    /// IPv6 conntrack capacity (unused by the traffic, but `housekeeping` walks it).
    capacity_v6: usize,
    /// Distinct new flows measured before they are purged and reused.
    pool: u64,
}

impl Case {
    /// 1,000,000 tracked flows in a 2 Mi table, 512 Ki new flows per round.
    fn million(services: usize) -> Self {
        Self {
            suffix: "",
            services,
            tracked: 1_000_000,
            capacity: 1 << 21,
            capacity_v6: ConntrackConfig::default().capacity_v6,
            pool: 1 << 19,
        }
    }

    /// 2,048 tracked flows in a 4 Ki table and no IPv6 table: (nearly) everything the
    /// pipeline touches stays in cache, which separates instruction cost from memory
    /// latency.
    fn cache_resident(services: usize) -> Self {
        Self {
            suffix: "_cache_resident",
            services,
            tracked: 2_048,
            capacity: 4_096,
            capacity_v6: 0,
            pool: 2_048,
        }
    }
}

struct Setup {
    cluster: Cluster,
    worker: Worker,
    established: FrameSet,
    new_flows: FrameSet,
}

fn setup(case: Case) -> Setup {
    let t = Instant::now();
    let cluster = Cluster::build(ClusterSpec::with_services(case.services));
    let built = t.elapsed();
    let mut cfg = worker_config(case.capacity);
    cfg.conntrack.capacity_v6 = case.capacity_v6;
    let mut worker = Worker::new(cfg);
    let established = establish(&mut worker, &cluster, 0..case.tracked, T0_NS);
    let new_flows = first_packets(&cluster, case.tracked..case.tracked + case.pool);
    assert!(case.capacity - worker.conntrack.len() >= new_flows.len());
    let ct = &worker.conntrack;
    eprintln!(
        "setup {} services ({} endpoints): tables {built:.2?}, {} flows opened in {:.2?}; \
         conntrack {} flows, capacity {} (v4 + v6), {} bytes ({:.1} B per tracked flow at \
         this capacity), index on huge pages: {}",
        case.services,
        cluster.endpoint_count,
        ct.len(),
        t.elapsed() - built,
        ct.len(),
        ct.capacity(),
        ct.memory_bytes(),
        ct.memory_bytes() as f64 / ct.len() as f64,
        ct.index_on_huge_pages(),
    );
    Setup {
        cluster,
        worker,
        established,
        new_flows,
    }
}

/// Wall and thread CPU time over every timed batch of a benchmark (warm-up included): on
/// a shared machine, CPU time shows what the pipeline costs when the thread had to wait
/// for a core.
#[derive(Default)]
struct CpuTally {
    batches: u64,
    wall: Duration,
    cpu: Duration,
}

impl CpuTally {
    fn add(&mut self, batches: u64, wall: Duration, cpu: Duration) {
        self.batches += batches;
        self.wall += wall;
        self.cpu += cpu;
    }

    fn report(&self) -> String {
        let frames = (self.batches * BATCH_SIZE as u64) as f64;
        format!(
            "over all timed batches: {:.1} ns/frame wall ({:.3} Mpps), {:.1} ns/frame thread \
             CPU ({:.3} Mpps), CPU/wall {:.0}%",
            self.wall.as_nanos() as f64 / frames,
            frames / self.wall.as_secs_f64() / 1e6,
            self.cpu.as_nanos() as f64 / frames,
            frames / self.cpu.as_secs_f64() / 1e6,
            100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64(),
        )
    }
}

fn forwarded(c: &Counters, reason: ForwardReason) -> u64 {
    c.forwarded(reason)
}

fn not_forwarded(c: &Counters) -> u64 {
    c.dropped.iter().sum::<u64>() + c.rejected.iter().sum::<u64>() + c.passed.iter().sum::<u64>()
}

/// The entry point a benchmark drives the worker through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `Worker::process`, one call per frame.
    Process,
    /// `Worker::process_batch`, one call per batch.
    Batch,
}

impl Api {
    /// Infix of the criterion group names.
    fn infix(self) -> &'static str {
        match self {
            Self::Process => "",
            Self::Batch => "_batch",
        }
    }

    #[inline]
    fn run(self, runner: &mut Runner, worker: &mut Worker, tables: &Tables, set: &FrameSet) {
        match self {
            Self::Process => runner.batch(worker, tables, set),
            Self::Batch => runner.batch_prefetch(worker, tables, set),
        }
    }
}

/// Runs the established and new-flow benchmarks of one case, through both entry points;
/// returns the established frame set.
fn run_case(c: &mut Criterion, case: Case) -> FrameSet {
    let Setup {
        cluster,
        mut worker,
        established,
        new_flows,
    } = setup(case);
    let mut now_ns = T0_NS;
    for api in [Api::Process, Api::Batch] {
        now_ns = run_api(
            c,
            case,
            api,
            now_ns,
            &cluster,
            &mut worker,
            &established,
            &new_flows,
        );
    }
    established
}

/// The established and new-flow benchmarks of one case through one entry point, on the
/// simulated clock from `now_ns`; returns the clock.
#[allow(clippy::too_many_arguments)]
fn run_api(
    c: &mut Criterion,
    case: Case,
    api: Api,
    now_ns: u64,
    cluster: &Cluster,
    worker: &mut Worker,
    established: &FrameSet,
    new_flows: &FrameSet,
) -> u64 {
    let services = case.services;
    let tracked = case.tracked;
    let tables = &cluster.tables;
    let mut runner = Runner::new(now_ns);
    // Only the established flows (a previous run may have left new ones).
    worker
        .conntrack
        .purge(|m| cluster.flow_index(m.orig.src, m.orig.sport).unwrap() < tracked);

    // Established flows.
    let name = format!("established{}{}", api.infix(), case.suffix);
    let before = worker.counters.clone();
    let mut cpu = CpuTally::default();
    let mut g = c.benchmark_group(&name);
    g.throughput(Throughput::Elements(BATCH_SIZE as u64));
    g.bench_function(BenchmarkId::from_parameter(services), |b| {
        b.iter_custom(|iters| {
            let (t, c) = (Instant::now(), thread_cpu_time());
            for _ in 0..iters {
                api.run(&mut runner, worker, tables, established);
            }
            let wall = t.elapsed();
            cpu.add(iters, wall, thread_cpu_time() - c);
            wall
        })
    });
    g.finish();
    let frames = worker.counters.frames - before.frames;
    let ok = forwarded(&worker.counters, ForwardReason::Established)
        + forwarded(&worker.counters, ForwardReason::Reply)
        - forwarded(&before, ForwardReason::Established)
        - forwarded(&before, ForwardReason::Reply);
    assert_eq!(ok, frames, "{name}: not every frame forwarded");
    assert_eq!(not_forwarded(&worker.counters), not_forwarded(&before));
    assert_eq!(worker.conntrack.len() as u64, tracked);
    eprintln!(
        "{name}/{services}: {frames} frames, all forwarded as established/reply; {}",
        cpu.report()
    );

    // New flows, from a fresh pool (no flow of a previous run left).
    let name = format!("new_flow{}{}", api.infix(), case.suffix);
    let mut runner = Runner::new(runner.now_ns);
    worker
        .conntrack
        .purge(|m| cluster.flow_index(m.orig.src, m.orig.sport).unwrap() < tracked);
    assert_eq!(worker.conntrack.len() as u64, tracked);
    let before = worker.counters.clone();
    let stats_before = worker.conntrack.stats();
    let mut purge_time = Duration::ZERO;
    let mut purged = 0usize;
    let mut cpu = CpuTally::default();
    let pool_batches = (new_flows.len() / BATCH_SIZE) as u64;
    let mut g = c.benchmark_group(&name);
    g.throughput(Throughput::Elements(BATCH_SIZE as u64));
    g.bench_function(BenchmarkId::from_parameter(services), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let room = pool_batches - (runner.cursor / BATCH_SIZE) as u64;
                let n = left.min(room);
                let (t, c) = (Instant::now(), thread_cpu_time());
                for _ in 0..n {
                    api.run(&mut runner, worker, tables, new_flows);
                }
                let wall = t.elapsed();
                cpu.add(n, wall, thread_cpu_time() - c);
                timed += wall;
                left -= n;
                if runner.cursor == 0 {
                    // The pool is used up: forget its flows (untimed) and start over.
                    let t = Instant::now();
                    purged += worker
                        .conntrack
                        .purge(|m| cluster.flow_index(m.orig.src, m.orig.sport).unwrap() < tracked);
                    purge_time += t.elapsed();
                    assert_eq!(worker.conntrack.len() as u64, tracked);
                }
            }
            timed
        })
    });
    g.finish();
    let frames = worker.counters.frames - before.frames;
    let new = forwarded(&worker.counters, ForwardReason::NewFlow)
        - forwarded(&before, ForwardReason::NewFlow);
    assert_eq!(
        new, frames,
        "{name}: not every frame forwarded as a new flow"
    );
    assert_eq!(not_forwarded(&worker.counters), not_forwarded(&before));
    let stats = worker.conntrack.stats();
    eprintln!(
        "{name}/{services}: {frames} frames, all forwarded as new flows; {} inserted, {} \
         refused (full {}, exists {}), {} index rebuilds; {purged} purged in \
         {purge_time:.2?} ({:.0} ns per purged flow, untimed); {}",
        stats.inserted - stats_before.inserted,
        (stats.full - stats_before.full) + (stats.exists - stats_before.exists),
        stats.full - stats_before.full,
        stats.exists - stats_before.exists,
        stats.index_rebuilds - stats_before.index_rebuilds,
        purge_time.as_nanos() as f64 / purged.max(1) as f64,
        cpu.report(),
    );
    runner.now_ns
}

fn pipeline(c: &mut Criterion) {
    for services in SERVICE_COUNTS {
        let established = run_case(c, Case::million(services));
        if services == SERVICE_COUNTS[0] {
            // The receive copy alone, over the same 1M-frame set.
            let mut g = c.benchmark_group("receive_copy");
            g.throughput(Throughput::Elements(BATCH_SIZE as u64));
            let mut runner = Runner::new(T0_NS);
            g.bench_function("64B", |b| b.iter(|| runner.receive_only(&established)));
            g.finish();
        }
    }
    for services in [SERVICE_COUNTS[0], SERVICE_COUNTS[2]] {
        run_case(c, Case::cache_resident(services));
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = pipeline
}
criterion_main!(benches);
