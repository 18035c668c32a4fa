//! `kxp replay`: manifests and a node file compiled exactly as the live control plane
//! compiles them, a capture run through one worker of the real pipeline, and what happened
//! to every frame written out as JSON lines and, on request, as readable text.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kxp_dataplane::driver::replay::{replay, IngressMode, ReplayRecord};
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig};
use kxp_dataplane::tables::{IfaceId, IfaceKind, Interface, NodeTable};
use kxp_dataplane::verdict::{Counters, Verdict};

use crate::compile::{compile, CompileOptions};
use crate::manifest::load_manifests;
use crate::node::load_node_file;

/// Everything `kxp replay` takes.
#[derive(Debug, Clone)]
pub struct ReplayArgs {
    pub manifests: PathBuf,
    pub node: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub report: Option<PathBuf>,
    /// `None` = auto; else an interface name from the node file.
    pub ingress: Option<String>,
    pub worker: WorkerConfig,
}

/// What a replay did, for the caller to print.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    pub frames: usize,
    pub records: Vec<ReplayRecord>,
    pub counters: Counters,
    /// Interface names by id, for rendering records.
    pub interfaces: Vec<String>,
    /// For each record, the service frontend its input frame was addressed to, if any
    /// (`namespace/name:port (Kind)`).
    pub services: Vec<Option<String>>,
    /// Configuration problems (bad objects are skipped; the rest still replays).
    pub config_errors: Vec<String>,
    pub notices: Vec<String>,
}

/// Failure that stops a replay before any frame runs.
#[derive(Debug, thiserror::Error)]
pub enum ReplayFailure {
    #[error("{0}")]
    Config(String),
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0}")]
    Replay(#[from] kxp_dataplane::driver::replay::ReplayError),
}

/// Adds a `host` interface when the node file has none, so that frames from the node's own
/// addresses have somewhere to arrive.
pub fn with_host_interface(mut node: NodeTable) -> NodeTable {
    if !node.interfaces.iter().any(|i| i.kind == IfaceKind::Host) {
        node.add_interface(Interface {
            name: "host".into(),
            kind: IfaceKind::Host,
            mac: [0; 6],
        });
    }
    node
}

/// Runs a replay as `kxp replay` does.
pub fn run(args: &ReplayArgs) -> Result<ReplayOutcome, ReplayFailure> {
    let node = load_node_file(&args.node).map_err(|e| ReplayFailure::Config(e.to_string()))?;
    let node = with_host_interface(node);
    let set = load_manifests(&args.manifests);
    let compiled = compile(&set, &node, &CompileOptions::default(), None);
    let mut config_errors: Vec<String> = set.errors.iter().map(|e| e.to_string()).collect();
    config_errors.extend(compiled.errors.iter().map(|e| e.to_string()));
    let ingress = match &args.ingress {
        None => IngressMode::Auto,
        Some(name) if name == "auto" => IngressMode::Auto,
        Some(name) => IngressMode::Fixed(node.interface_by_name(name).ok_or_else(|| {
            ReplayFailure::Config(format!(
                "--ingress {name}: no such interface in {}",
                args.node.display()
            ))
        })?),
    };
    let interfaces = node.interfaces.iter().map(|i| i.name.clone()).collect();
    let tables = Tables {
        services: Arc::new(compiled.table),
        node: Arc::new(node),
    };
    let mut worker = Worker::new(args.worker.clone());
    let input = File::open(&args.input).map_err(|err| ReplayFailure::Io {
        path: args.input.display().to_string(),
        err,
    })?;
    let output = File::create(&args.output).map_err(|err| ReplayFailure::Io {
        path: args.output.display().to_string(),
        err,
    })?;
    let mut records = Vec::new();
    let frames = replay(
        &tables,
        &mut worker,
        BufReader::new(input),
        BufWriter::new(output),
        ingress,
        |r| records.push(r),
    )?;
    let services = records
        .iter()
        .map(|r| service_of(&tables, r.input.as_ref()))
        .collect();
    let outcome = ReplayOutcome {
        frames,
        services,
        records,
        counters: worker.counters.clone(),
        interfaces,
        config_errors,
        notices: set
            .notices
            .iter()
            .chain(compiled.notices.iter())
            .cloned()
            .collect(),
    };
    if let Some(path) = &args.report {
        write_report(&outcome, path).map_err(|err| ReplayFailure::Io {
            path: path.display().to_string(),
            err,
        })?;
    }
    Ok(outcome)
}

/// The service frontend `input` is addressed to, for the readable explanation.
fn service_of(
    tables: &Tables,
    input: Option<&kxp_dataplane::driver::replay::Endpoints>,
) -> Option<String> {
    let e = input?;
    let (_, dport) = e.ports?;
    let proto = kxp_dataplane::flow::L4Proto::from_ip_number(e.proto)?;
    let fe = tables
        .services
        .frontend(&kxp_dataplane::tables::FrontendKey {
            addr: e.dst,
            proto,
            port: dport,
        })?;
    Some(format!(
        "{} ({})",
        tables.services.service_port(fe.service_port).name,
        fe.kind.as_str()
    ))
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        0 => "frag".into(),
        n => format!("ip/{n}"),
    }
}

fn iface_name(names: &[String], id: IfaceId) -> &str {
    names.get(id.0 as usize).map_or("?", String::as_str)
}

fn socket(addr: std::net::IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

/// One JSON object per record: index, ingress, verdict, reason, out interface, and the
/// emitted frame's source and destination.
pub fn record_json(names: &[String], r: &ReplayRecord) -> serde_json::Value {
    let out_iface = match r.verdict {
        Verdict::Forward { iface, .. } | Verdict::Reject { iface, .. } => {
            serde_json::Value::from(iface_name(names, iface))
        }
        _ => serde_json::Value::Null,
    };
    let (src, dst) = match &r.emitted {
        Some(e) => (
            serde_json::Value::from(socket(e.src, e.ports.map(|p| p.0))),
            serde_json::Value::from(socket(e.dst, e.ports.map(|p| p.1))),
        ),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    serde_json::json!({
        "index": r.index,
        "ingress": iface_name(names, r.ingress),
        "verdict": r.verdict.kind_str(),
        "reason": r.verdict.reason_str(),
        "out_interface": out_iface,
        "src": src,
        "dst": dst,
    })
}

/// Writes the JSON-lines report.
pub fn write_report(o: &ReplayOutcome, path: &Path) -> std::io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    for r in &o.records {
        serde_json::to_writer(&mut w, &record_json(&o.interfaces, r))?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// Readable lines per frame, for people: what arrived, which service it was for, what
/// kxp did and what it sent.
pub fn explain(o: &ReplayOutcome) -> String {
    let mut s = String::new();
    for (i, r) in o.records.iter().enumerate() {
        let j = record_json(&o.interfaces, r);
        let arrived = match &r.input {
            Some(e) => format!(
                "{} {} > {}",
                proto_name(e.proto),
                socket(e.src, e.ports.map(|p| p.0)),
                socket(e.dst, e.ports.map(|p| p.1))
            ),
            None => "(not IP, or too broken to read)".into(),
        };
        let _ = writeln!(
            s,
            "#{:<3} on {:<10} {}",
            r.index,
            iface_name(&o.interfaces, r.ingress),
            arrived
        );
        if let Some(Some(svc)) = o.services.get(i) {
            let _ = writeln!(s, "     service {svc}");
        }
        let _ = write!(
            s,
            "     {} ({})",
            r.verdict.kind_str(),
            r.verdict.reason_str()
        );
        if let (Some(src), Some(dst), Some(out)) = (
            j["src"].as_str(),
            j["dst"].as_str(),
            j["out_interface"].as_str(),
        ) {
            let _ = write!(s, " -> out {out}: {src} > {dst}");
        }
        s.push('\n');
    }
    s
}

/// Non-zero counters, one per line.
pub fn counter_summary(c: &Counters) -> String {
    let mut s = String::new();
    for (name, v) in c.named() {
        if v > 0 {
            let _ = writeln!(s, "  {name:<32} {v}");
        }
    }
    s
}
