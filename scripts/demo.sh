#!/usr/bin/env bash
# The demo, in two parts.
#
# 1. Offline (no root): golden captures replayed through kxp's packet pipeline, every
#    frame explained (which service, which backend, what NAT, what was dropped and why).
# 2. Live (root): a node built in network namespaces (scripts/netns.sh: a client, the
#    node running `kxp run`, three pods serving HTTP and UDP), real traffic through
#    AF_XDP: LoadBalancer IP and NodePort from the client, ClusterIP from a pod, a pod
#    to itself through its service; which pod answered each request and the spread;
#    endpoints scaled live by editing the manifests; then everything torn down.
#
# KXP_DEMO_SCENARIOS picks the captures of part 1; KXP_DEMO_LIVE=0 skips part 2.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== building kxp (release)"
cargo build --release --locked -p kxp-control --bin kxp
KXP=$PWD/target/release/kxp
OUT=$(mktemp -d)
cleanup_out() { rm -rf "$OUT"; }
trap cleanup_out EXIT

echo
echo "################################################################################"
echo "## Part 1: golden captures through the pipeline (offline)"
echo "################################################################################"
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
echo "part 1 done: every frame above ran through the same pipeline the AF_XDP workers run."

if [ "${KXP_DEMO_LIVE:-1}" = 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo
  echo "part 2 skipped: the live node needs root (network namespaces, XDP, AF_XDP)."
  exit 0
fi
for tool in ip python3 curl; do
  command -v "$tool" >/dev/null || { echo "part 2 skipped: $tool is not installed"; exit 0; }
done

echo
echo "################################################################################"
echo "## Part 2: a live node in network namespaces, kxp run over AF_XDP"
echo "################################################################################"
# shellcheck source=scripts/netns.sh
source scripts/netns.sh
ID=d$(printf %x $$)
LIVE=$OUT/live
KXP_PID=
teardown() {
  if [ -n "$KXP_PID" ] && kill -0 "$KXP_PID" 2>/dev/null; then
    kill -TERM "$KXP_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$KXP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$KXP_PID" 2>/dev/null || true
  fi
  kxp_topo_down "$ID" "$LIVE"
  cleanup_out
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "== building the node: client, node, pods a/b/c (namespaces kxp-*-$ID)"
kxp_topo_up "$ID" "$LIVE" on
kxp_manifests "$LIVE/manifests" a b c
cat <<EOF
   client 192.168.50.1 --- node 192.168.50.2 (kxp) --- pod a 10.244.1.2
                                                   --- pod b 10.244.1.3
                                                   --- pod c 10.244.1.4
   services (manifests in $LIVE/manifests):
     web     ClusterIP 10.96.0.10, NodePort 30080/30053, LoadBalancer 203.0.113.10
             (TCP 80 -> 8080, UDP 53 -> 5353) over pods a, b, c
     self-a  ClusterIP 10.96.0.20 (TCP 80 -> 8080) over pod a only
EOF

echo "== starting kxp run in the node namespace"
ip netns exec "kxp-node-$ID" "$KXP" run --node "$LIVE/node.yaml" --manifests "$LIVE/manifests" \
  --ready-file "$LIVE/ready" --host-veth kxph >"$LIVE/kxp.log" 2>&1 &
KXP_PID=$!
for _ in $(seq 1 300); do
  [ -f "$LIVE/ready" ] && break
  kill -0 "$KXP_PID" 2>/dev/null || { cat "$LIVE/kxp.log"; echo "kxp run failed" >&2; exit 1; }
  sleep 0.1
done
[ -f "$LIVE/ready" ] || { cat "$LIVE/kxp.log"; echo "kxp run not ready" >&2; exit 1; }
for dev in $(ip -n "kxp-node-$ID" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
  prog=$(ip -n "kxp-node-$ID" link show dev "$dev" | grep -o 'prog/xdp id [0-9]* name [a-z_]*') &&
    echo "   $dev: $prog"
done

# ask LABEL N NS CMD...: runs CMD N times in namespace NS, prints each answer, then the spread.
ask() {
  local label=$1 n=$2 ns=$3; shift 3
  echo
  echo "== $label"
  local answers=() i a
  for i in $(seq 1 "$n"); do
    a=$(ip netns exec "$ns" "$@" 2>/dev/null | tr -d '\r' | head -c 80) || a="(no answer)"
    [ -n "$a" ] || a="(no answer)"
    answers+=("$a")
    printf '   request %2d -> %s\n' "$i" "$a"
  done
  printf '   spread:'
  printf '%s\n' "${answers[@]}" | sed 's/:.*//' | sort | uniq -c | awk '{printf "  %s x%d", $2, $1}'
  echo
}
CURL=(curl -s --max-time 3)
UDP=(python3 scripts/netcheck.py udp)

ask "client -> LoadBalancer IP http://203.0.113.10/" 12 "kxp-cli-$ID" "${CURL[@]}" http://203.0.113.10/
ask "client -> NodePort http://192.168.50.2:30080/" 12 "kxp-cli-$ID" "${CURL[@]}" http://192.168.50.2:30080/
ask "pod a -> ClusterIP http://10.96.0.10/" 12 "kxp-pod-$ID-a" "${CURL[@]}" http://10.96.0.10/
ask "pod a -> itself through its service http://10.96.0.20/ (hairpin)" 4 "kxp-pod-$ID-a" "${CURL[@]}" http://10.96.0.20/
ask "the node itself -> ClusterIP http://10.96.0.10/ (through the host veth)" 6 "kxp-node-$ID" "${CURL[@]}" http://10.96.0.10/
ask "client -> LoadBalancer IP udp 203.0.113.10:53" 6 "kxp-cli-$ID" "${UDP[@]}" 203.0.113.10 53 hello

echo
echo "== 8 MiB through the LoadBalancer IP, bytes checked"
want=$(sha256sum <"$LIVE/big.bin" | cut -d' ' -f1)
got=$(ip netns exec "kxp-cli-$ID" curl -s --max-time 30 http://203.0.113.10/big | sha256sum | cut -d' ' -f1)
if [ "$got" = "$want" ]; then echo "   sha256 matches ($want)"; else echo "   sha256 DIFFERS" >&2; exit 1; fi

echo
echo "== scaling web to pod a only (editing $LIVE/manifests/web.yaml)"
kxp_manifests "$LIVE/manifests" a
sleep 1.5
ask "client -> LoadBalancer IP after scaling to {a}" 6 "kxp-cli-$ID" "${CURL[@]}" http://203.0.113.10/
echo
echo "== scaling web to pods b and c"
kxp_manifests "$LIVE/manifests" b c
sleep 1.5
ask "client -> LoadBalancer IP after scaling to {b, c}" 8 "kxp-cli-$ID" "${CURL[@]}" http://203.0.113.10/

echo
echo "== traffic that is not a service's stays with the node's kernel"
printf '   pod a -> pod c directly: %s\n' "$(ip netns exec "kxp-pod-$ID-a" "${CURL[@]}" http://10.244.1.4:8080/)"
printf '   client -> node, ICMP echo: %s\n' "$(ip netns exec "kxp-cli-$ID" python3 scripts/netcheck.py ping 192.168.50.2)"

echo
echo "== stopping kxp (SIGINT)"
kill -INT "$KXP_PID"
for _ in $(seq 1 100); do kill -0 "$KXP_PID" 2>/dev/null || break; sleep 0.1; done
wait "$KXP_PID" 2>/dev/null || true
KXP_PID=
sed -n '/^kxp counters/,$p' "$LIVE/kxp.log" | sed 's/^/   /'
left=$(ip -n "kxp-node-$ID" link show | grep -c prog/xdp || true)
echo "   XDP programs left attached: $left"
echo
echo "demo done: tearing the namespaces down."
