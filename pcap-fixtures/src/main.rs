//! `gen-fixtures`: writes every golden scenario of `kxp-fixtures` to a directory.
//!
//! ```sh
//! cargo run -p kxp-fixtures --bin gen-fixtures -- [--out pcap-fixtures/scenarios]
//! ```
//!
//! Each scenario becomes `<out>/<name>/` with `manifests.yaml`, `node.yaml`, `ingress`,
//! `in.pcap`, `expected.pcap`, `expected.jsonl` and `README.md`. Directories of scenarios
//! that no longer exist are reported, not deleted.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => match args.next() {
                Some(p) => out = PathBuf::from(p),
                None => {
                    eprintln!("gen-fixtures: --out needs a directory");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!(
                    "usage: gen-fixtures [--out DIR]   (default: {})",
                    out.display()
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("gen-fixtures: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let names = match kxp_fixtures::write_all(&out) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("gen-fixtures: {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    };
    for n in &names {
        println!("wrote {}", out.join(n).display());
    }
    if let Ok(rd) = std::fs::read_dir(&out) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && !names.iter().any(|n| *n == name) {
                eprintln!(
                    "gen-fixtures: {} is not a scenario any more; remove it",
                    e.path().display()
                );
            }
        }
    }
    println!("{} scenarios", names.len());
    ExitCode::SUCCESS
}
