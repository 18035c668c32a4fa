//! Reads criterion's results for `benches/pipeline.rs` and prints the Markdown table of
//! docs/bench/pipeline.md: median Mpps per core (64 frames per iteration), ns per frame,
//! and the 10,000-service / 10-service ratio.
//!
//! ```text
//! cargo run --profile bench -p kxp-bench --bin bench_table [target/criterion]
//! ```

use std::path::{Path, PathBuf};

const FRAMES_PER_ITER: f64 = 64.0;
const GROUPS: [&str; 8] = [
    "established",
    "established_batch",
    "new_flow",
    "new_flow_batch",
    "established_cache_resident",
    "established_batch_cache_resident",
    "new_flow_cache_resident",
    "new_flow_batch_cache_resident",
];
const SERVICES: [usize; 3] = [10, 1_000, 10_000];

/// Median ns per iteration of `<group>/<id>` and its 95% confidence interval.
fn median(dir: &Path, group: &str, id: &str) -> Option<(f64, f64, f64)> {
    let path = dir.join(group).join(id).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let m = &v["median"];
    Some((
        m["point_estimate"].as_f64()?,
        m["confidence_interval"]["lower_bound"].as_f64()?,
        m["confidence_interval"]["upper_bound"].as_f64()?,
    ))
}

fn mpps(ns_per_iter: f64) -> f64 {
    FRAMES_PER_ITER * 1e3 / ns_per_iter
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/criterion"), PathBuf::from);
    println!("| benchmark | 10 services | 1,000 services | 10,000 services | 10,000 / 10 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for group in GROUPS {
        let cells: Vec<Option<(f64, f64, f64)>> = SERVICES
            .iter()
            .map(|n| median(&dir, group, &n.to_string()))
            .collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let mut row = format!("| {group} |");
        for cell in &cells {
            match cell {
                Some((ns, lo, hi)) => row.push_str(&format!(
                    " **{:.2}** Mpps ({:.0} ns/frame; CI {:.2}-{:.2}) |",
                    mpps(*ns),
                    ns / FRAMES_PER_ITER,
                    mpps(*hi),
                    mpps(*lo),
                )),
                None => row.push_str(" - |"),
            }
        }
        match (cells[0], cells[2]) {
            (Some((a, ..)), Some((b, ..))) => {
                row.push_str(&format!(" {:.0}% |", 100.0 * mpps(b) / mpps(a)))
            }
            _ => row.push_str(" - |"),
        }
        println!("{row}");
    }
    if let Some((ns, ..)) = median(&dir, "receive_copy", "64B") {
        println!(
            "\nreceive_copy (64 frames of 64 B copied into the ring): {:.1} ns/frame",
            ns / FRAMES_PER_ITER
        );
    }
}
