#!/usr/bin/env bash
# Control-plane sync benchmark (docs/bench/control-plane.md): builds `sync_bench` in
# release mode and runs it. kxp full sync and one endpoint change at 1,000, 10,000 and
# 30,000 services x 10 endpoints, next to kube-proxy's nftables and iptables rules applied
# with nft / iptables-restore in a throwaway network namespace (root only; skipped with a
# message otherwise). One change is timed three ways: the incremental compile alone, through
# the Controller from "change seen" to "tables live" (the real path), and as a full
# recompile (the previous path). `sync_bench --profile controller N ITER` loops the
# Controller path alone, for perf. Arguments go to sync_bench (`--help` lists them), e.g.
#   scripts/bench-control.sh --no-kernel 10000
#   scripts/bench-control.sh --kernel-reps 3 1000 10000
# Takes about 15 minutes with the kernel baselines (nft at 10,000 services takes minutes
# per run), under a minute without.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p kxp-bench --bin sync_bench
echo "== $(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p'); kernel $(uname -r)"
echo "== nft: $(nft --version 2>/dev/null || echo missing); iptables: $(iptables --version 2>/dev/null || echo missing)"
exec target/release/sync_bench "$@"
