#!/usr/bin/env bash
# The demo: replays golden captures through kxp's real packet pipeline and explains what
# happened to every frame (which service, which backend, what NAT, what was dropped and
# why). Needs no root. Until the AF_XDP runtime lands this is kxp's main job, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== building kxp (release)"
cargo build --release --locked -p kxp-control --bin kxp
KXP=target/release/kxp
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

SCENARIOS=(${KXP_DEMO_SCENARIOS:-clusterip-tcp nodeport-udp hairpin no-endpoints icmp-frag-needed malformed})
for s in "${SCENARIOS[@]}"; do
  dir=pcap-fixtures/scenarios/$s
  [ -d "$dir" ] || { echo "missing scenario $dir" >&2; exit 1; }
  echo
  echo "================================================================================"
  echo "== $s: $(sed -n 's/^# //p' "$dir/README.md" | head -1)"
  echo "================================================================================"
  "$KXP" replay --manifests "$dir/manifests.yaml" --node "$dir/node.yaml" \
    --in "$dir/in.pcap" --out "$OUT/$s.pcap" --report "$OUT/$s.jsonl" --explain
  if cmp -s <(tail -c +25 "$OUT/$s.pcap") <(tail -c +25 "$dir/expected.pcap"); then
    echo "   output capture matches the golden capture byte for byte"
  else
    echo "   output capture DIFFERS from $dir/expected.pcap" >&2
    exit 1
  fi
done
echo
echo "demo done: every frame above ran through the same pipeline the AF_XDP workers run."
