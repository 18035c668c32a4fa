//! Golden scenarios, proven byte for byte.
//!
//! Every directory under `pcap-fixtures/scenarios/` is replayed exactly as `kxp replay`
//! runs it (`kxp_control::replay::run`, default worker: worker 0 of 1); every emitted frame
//! must equal the corresponding frame of `expected.pcap` (same bytes, same timestamp) and
//! every report line the corresponding line of `expected.jsonl` (compared as JSON values).
//! The expected frames were built from scratch by `kxp-fixtures`, never by kxp's pipeline.
//!
//! A second test regenerates the fixtures into a temporary directory and requires the
//! checked-in files to be identical, so the scenarios cannot drift from their generator.
//! Nothing here needs root.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kxp_control::replay::{run, ReplayArgs};
use kxp_dataplane::pipeline::WorkerConfig;
use pcap_file::pcap::PcapReader;

/// Scenarios the suite must hold at least (the golden table's required cases).
const MIN_SCENARIOS: usize = 12;

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pcap-fixtures/scenarios")
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!(
            "kxp-golden-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Scenario directories, sorted by name.
fn scenario_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn read_pcap(path: &Path) -> Vec<(Duration, Vec<u8>)> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = PcapReader::new(f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.push((p.timestamp, p.data.into_owned()));
    }
    out
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Hex dump, 16 bytes a line, of the lines near a difference from `other` (two lines of
/// context; the rest elided), differing lines marked `>`.
fn hexdump(bytes: &[u8], other: &[u8]) -> String {
    let rows = bytes.len().div_ceil(16);
    let differs = |row: usize| {
        let at = row * 16;
        (at..(at + 16).min(bytes.len())).any(|i| other.get(i) != Some(&bytes[i]))
            || (row + 1 == rows && other.len() > bytes.len())
    };
    let marked: Vec<bool> = (0..rows).map(differs).collect();
    let near = |row: usize| (row.saturating_sub(2)..(row + 3).min(rows)).any(|r| marked[r]);
    let mut s = String::new();
    let mut elided = false;
    for (row, chunk) in bytes.chunks(16).enumerate() {
        if !near(row) {
            if !elided {
                s.push_str("    ...\n");
                elided = true;
            }
            continue;
        }
        elided = false;
        let _ = write!(
            s,
            "  {} {:04x}:",
            if marked[row] { '>' } else { ' ' },
            row * 16
        );
        for b in chunk {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

fn frame_mismatch(
    scenario: &str,
    out_index: usize,
    input: Option<usize>,
    got: &[u8],
    want: &[u8],
) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let mut s = format!(
        "{scenario}: emitted frame {out_index} (from input frame {}) differs: first differing offset {first} (0x{first:x}); got {} bytes, expected {} bytes\n",
        input.map_or("?".to_string(), |i| i.to_string()),
        got.len(),
        want.len()
    );
    let _ = write!(s, " got:\n{}", hexdump(got, want));
    let _ = write!(s, " expected:\n{}", hexdump(want, got));
    let _ = write!(s, " got, decoded:\n{}", kxp_fixtures::describe(got));
    let _ = write!(s, " expected, decoded:\n{}", kxp_fixtures::describe(want));
    s
}

/// Replays one scenario directory; returns what is wrong with it (empty when nothing).
fn check_scenario(dir: &Path) -> Vec<String> {
    let name = name_of(dir);
    let tmp = TempDir::new(&name);
    let ingress = std::fs::read_to_string(dir.join("ingress"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "auto".into());
    let args = ReplayArgs {
        manifests: dir.join("manifests.yaml"),
        node: dir.join("node.yaml"),
        input: dir.join("in.pcap"),
        output: tmp.0.join("out.pcap"),
        report: Some(tmp.0.join("report.jsonl")),
        ingress: Some(ingress),
        worker: WorkerConfig::default(),
    };
    let outcome = match run(&args) {
        Ok(o) => o,
        Err(e) => return vec![format!("{name}: kxp replay failed: {e}")],
    };
    let mut problems = Vec::new();
    for e in &outcome.config_errors {
        problems.push(format!("{name}: configuration error: {e}"));
    }

    let got_report = read_jsonl(&tmp.0.join("report.jsonl"));
    let want_report = read_jsonl(&dir.join("expected.jsonl"));
    if got_report.len() != want_report.len() {
        problems.push(format!(
            "{name}: {} report lines, expected {}",
            got_report.len(),
            want_report.len()
        ));
    }
    for (i, (g, w)) in got_report.iter().zip(&want_report).enumerate() {
        if g != w {
            problems.push(format!(
                "{name}: input frame {i}: report line differs\n   got: {g}\n  want: {w}"
            ));
        }
    }
    // Which input frame produced each expected output (for messages).
    let producers: Vec<usize> = want_report
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l["verdict"].as_str(), Some("forward" | "reject")))
        .map(|(i, _)| i)
        .collect();

    let got = read_pcap(&tmp.0.join("out.pcap"));
    let want = read_pcap(&dir.join("expected.pcap"));
    if got.len() != want.len() {
        problems.push(format!(
            "{name}: {} frames emitted, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, ((gt, g), (wt, w))) in got.iter().zip(&want).enumerate() {
        if g != w {
            problems.push(frame_mismatch(&name, i, producers.get(i).copied(), g, w));
        } else if gt != wt {
            problems.push(format!(
                "{name}: emitted frame {i}: timestamp {gt:?}, expected {wt:?}"
            ));
        }
    }
    problems
}

#[test]
fn at_least_twelve_scenarios() {
    let dirs = scenario_dirs(&scenarios_dir());
    assert!(
        dirs.len() >= MIN_SCENARIOS,
        "{} scenarios under {}, want at least {MIN_SCENARIOS}",
        dirs.len(),
        scenarios_dir().display()
    );
    assert!(kxp_fixtures::all().len() >= MIN_SCENARIOS);
}

#[test]
fn every_scenario_replays_byte_for_byte() {
    let dirs = scenario_dirs(&scenarios_dir());
    assert!(
        !dirs.is_empty(),
        "no scenarios under {}",
        scenarios_dir().display()
    );
    let mut problems = Vec::new();
    for dir in &dirs {
        let p = check_scenario(dir);
        if p.is_empty() {
            eprintln!("golden: {} ok", name_of(dir));
        }
        problems.extend(p);
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in {} scenarios:\n\n{}",
        problems.len(),
        dirs.len(),
        problems.join("\n")
    );
}

#[test]
fn checked_in_fixtures_match_the_generator() {
    let tmp = TempDir::new("regen");
    let names = kxp_fixtures::write_all(&tmp.0).expect("generate fixtures");
    let root = scenarios_dir();
    let on_disk: Vec<String> = scenario_dirs(&root).iter().map(|p| name_of(p)).collect();
    let mut generated: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    generated.sort();
    let regen = "regenerate with `cargo run -p kxp-fixtures --bin gen-fixtures`";
    assert_eq!(
        on_disk, generated,
        "scenario directories differ from the generator's; {regen}"
    );
    let mut stale = Vec::new();
    for name in &generated {
        for file in kxp_fixtures::SCENARIO_FILES {
            let a = std::fs::read(root.join(name).join(file));
            let b = std::fs::read(tmp.0.join(name).join(file)).expect("generated file");
            if a.as_ref().ok() != Some(&b) {
                stale.push(format!("{name}/{file}"));
            }
        }
        let extra: Vec<String> = std::fs::read_dir(root.join(name))
            .expect("scenario dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|f| !kxp_fixtures::SCENARIO_FILES.contains(&f.as_str()))
            .collect();
        for f in extra {
            stale.push(format!("{name}/{f} (not generated)"));
        }
    }
    assert!(stale.is_empty(), "stale fixture files: {stale:?}; {regen}");
}

/// The fixtures compute Maglev's choice with a copy of kxp-control's backend-id rule;
/// the copy must be the rule.
#[test]
fn fixture_backend_id_rule_is_kxp_controls() {
    for (addr, port) in [
        ("10.244.1.10", 8080u16),
        ("10.244.1.11", 8080),
        ("10.244.1.12", 8080),
        ("10.244.2.20", 443),
        ("fd00:244::1:a", 8080),
        ("0.0.0.0", 0),
    ] {
        let a = addr.parse().unwrap();
        assert_eq!(
            kxp_fixtures::policy::backend_id(a, port),
            kxp_control::compile::backend_id(a, port),
            "{addr}:{port}"
        );
    }
}
