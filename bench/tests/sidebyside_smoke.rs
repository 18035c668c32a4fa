//! Smoke test of the side-by-side dataplane benchmark (`sidebyside --quick`): 10
//! services, 1 s per measurement, one repetition, two modes (kxp and nftables), in
//! namespaces the harness creates and removes. Asserts that frames crossed kxp to the
//! sink, that they reached every backend of the services the generator addressed, and
//! that the kernel mode forwarded too. Needs root (skips with a message otherwise).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `kxp` lives in another package: built next to this package's binaries if missing.
fn kxp_binary(bin_dir: &Path) -> Result<PathBuf, String> {
    let kxp = bin_dir.join("kxp");
    let profile_release = bin_dir.ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(["build", "--locked", "-p", "kxp-control", "--bin", "kxp"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    if profile_release {
        c.arg("--release");
    }
    let st = c.status().map_err(|e| format!("cargo: {e}"))?;
    if !st.success() || !kxp.exists() {
        return Err(format!("building kxp failed ({st})"));
    }
    Ok(kxp)
}

#[test]
fn quick_run_forwards_through_kxp_and_nftables() {
    if !is_root() {
        eprintln!("skipped: the side-by-side benchmark needs root (namespaces, XDP, AF_XDP)");
        return;
    }
    for tool in ["ip", "nft", "curl", "setsid"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed (scripts/setup.sh installs it)");
            return;
        }
    }
    let me = PathBuf::from(env!("CARGO_BIN_EXE_sidebyside"));
    let bin_dir = me.parent().expect("bin dir").to_path_buf();
    assert_eq!(
        PathBuf::from(env!("CARGO_BIN_EXE_pktgen")).parent(),
        Some(bin_dir.as_path())
    );
    kxp_binary(&bin_dir).expect("kxp binary");
    let work = std::env::temp_dir().join(format!("kxpb-smoke-{}", std::process::id()));
    let json = work.join("result.json");
    std::fs::create_dir_all(&work).unwrap();
    let t = Instant::now();
    let mut child = Command::new(&me)
        .args(["--quick", "--modes", "kxp,nftables", "--bin-dir"])
        .arg(&bin_dir)
        .arg("--json")
        .arg(&json)
        .spawn()
        .expect("sidebyside runs");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sidebyside --quick did not finish in 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("sidebyside --quick took {:.1} s", t.elapsed().as_secs_f64());
    assert!(status.success(), "sidebyside failed: {status}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let notes = v["notes"].as_array().cloned().unwrap_or_default();
    assert!(notes.is_empty(), "the run reported problems: {notes:?}");

    // Nothing of the run is left behind.
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let pid = child.id();
    assert!(
        !ns.contains(&format!("kxpb-{pid}-")),
        "namespaces left behind: {ns}"
    );

    let samples = v["samples"].as_array().expect("samples");
    for mode in ["kxp", "nftables"] {
        for metric in ["new_udp", "est_udp"] {
            let s = samples
                .iter()
                .find(|s| s["mode"] == mode && s["metric"] == metric)
                .unwrap_or_else(|| panic!("no {mode} {metric} sample"));
            let rx = s["rx_frames"].as_f64().unwrap_or(0.0);
            assert!(
                rx > 1000.0,
                "{mode} {metric}: the sink received {rx} frames"
            );
        }
    }
    // The spread: every backend of the UDP services (odd synthetic services, 3 endpoints
    // each: 10.244.0.{2 + 3i + e}) received frames through kxp, and nothing else did.
    let kxp_new = samples
        .iter()
        .find(|s| s["mode"] == "kxp" && s["metric"] == "new_udp")
        .unwrap();
    let expected: Vec<String> = (0..10usize)
        .filter(|i| i % 2 == 1)
        .flat_map(|i| (0..3).map(move |e| format!("10.244.0.{}", 2 + 3 * i + e)))
        .collect();
    let per_dst = &kxp_new["rx"]["per_dst"];
    assert_eq!(
        per_dst["distinct"].as_u64(),
        Some(expected.len() as u64),
        "destinations at the sink: {per_dst}"
    );
    let top: Vec<(String, f64)> = per_dst["top"]
        .as_array()
        .expect("per_dst.top")
        .iter()
        .map(|d| {
            (
                d["dst"].as_str().unwrap_or("").to_string(),
                d["frames"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    for addr in &expected {
        let hits = top.iter().find(|(d, _)| d == addr).map_or(0.0, |x| x.1);
        assert!(hits > 0.0, "backend {addr} received nothing: {top:?}");
    }
    assert_eq!(
        kxp_new["rx"]["unexpected"]["outside_expected_net"].as_u64(),
        Some(0),
        "frames outside the backends' network reached the sink"
    );
    let _ = std::fs::remove_dir_all(&work);
}
