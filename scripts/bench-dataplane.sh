#!/usr/bin/env bash
# The side-by-side dataplane benchmark (issue 5; docs/bench/README.md): one command.
#
#   ./scripts/bench-dataplane.sh            # the whole comparison (root; ~25 min on 2 cores)
#   ./scripts/bench-dataplane.sh --quick    # a smoke run: 10 services, 1 s, 1 repetition
#   ./scripts/bench-dataplane.sh --services 10,1000 --reps 5 ...   (sidebyside --help)
#
# Installs what it needs (Debian: the build's packages via scripts/setup.sh, plus
# python3-matplotlib for the plots), builds the release binaries (kxp, pktgen, xdp_fwd,
# sidebyside, conntrack_memory), runs bench/src/bin/sidebyside.rs, which builds every
# topology in network namespaces of its own (kxpb-<pid>-*) and tears them down, prints the
# table, writes docs/bench/results/<UTC date>.json (or --json FILE) and the PNG plots into
# docs/bench/. BENCH_OUT overrides the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-dataplane: needs root (network namespaces, XDP, AF_XDP, netfilter)" >&2
  exit 1
fi

./scripts/setup.sh
BENCH_APT=(python3-matplotlib nftables iptables ethtool iproute2 curl util-linux)
missing=()
for p in "${BENCH_APT[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench-dataplane: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "== building (release): kxp, pktgen, xdp_fwd, sidebyside, conntrack_memory"
t0=$(date +%s)
cargo build --release --locked -p kxp-control --bin kxp
cargo build --release --locked -p kxp-bench --bin pktgen --bin xdp_fwd --bin sidebyside --bin conntrack_memory
echo "== build took $(( $(date +%s) - t0 )) s"

OUT=${BENCH_OUT:-docs/bench}
mkdir -p "$OUT/results"
JSON="$OUT/results/$(date -u +%Y-%m-%dT%H%M%SZ).json"
quick=0
for a in "$@"; do [ "$a" = --quick ] && quick=1; done
[ $quick = 1 ] && JSON="$OUT/results/quick-$(date -u +%Y-%m-%dT%H%M%SZ).json"
args=("$@")
has_json=0
for a in "$@"; do [ "$a" = --json ] && has_json=1; done
[ $has_json = 1 ] || args+=(--json "$JSON")

echo "== $(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p'); kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"

# The harness tears its namespaces down itself (and a reaper does if it is killed); this
# trap stops it on Ctrl-C / TERM and removes anything of it left behind.
BENCH_PID=
cleanup() {
  if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$BENCH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BENCH_PID" 2>/dev/null || true
  fi
  if [ -n "$BENCH_PID" ]; then
    for ns in $(ip netns list | awk '{print $1}' | grep "^kxpb-$BENCH_PID-" || true); do
      ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    done
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

target/release/sidebyside --bin-dir target/release "${args[@]}" &
BENCH_PID=$!
wait "$BENCH_PID"
BENCH_PID=

if [ $quick = 0 ]; then
  echo "== conntrack table bytes per entry (cargo run --release -p kxp-bench --bin conntrack_memory)"
  target/release/conntrack_memory | tee "${JSON%.json}-conntrack-memory.txt"
fi

if [ -f "$JSON" ]; then
  /usr/bin/python3 bench/plot.py "$JSON" "$OUT"
fi
echo "== done: $JSON"
