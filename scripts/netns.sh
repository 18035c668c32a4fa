#!/usr/bin/env bash
# A node in network namespaces, for kxp's demo and for trying `kxp run` by hand. Every
# piece lives in namespaces this script creates; nothing touches the host's interfaces.
#
#   client ns (192.168.50.1) --uplink veth-- node ns (192.168.50.2, runs kxp)
#                                              |-- veth -- pod ns a (10.244.1.2)
#                                              |-- veth -- pod ns b (10.244.1.3)
#                                              '-- veth -- pod ns c (10.244.1.4)
#
# Pods have /32 addresses and a default route via 10.244.1.1 (the node side of every pod
# veth), so all their traffic crosses the node. Veths have one queue each (kxp runs one
# worker per receive queue). Each pod runs scripts/podserver.py: HTTP :8080 answering its
# name (and /big), UDP :5353 echoing its name.
#
# As a library (source it):  kxp_topo_up ID DIR [offload]; kxp_topo_down ID DIR
# As a command:              scripts/netns.sh up ID DIR [offload] | down ID DIR
# `offload` on (default) leaves TX checksum offload on the pods' and the client's veths,
# as a CNI does (kxp must then complete partial checksums); off turns it off.
# Namespaces: kxp-node-ID, kxp-cli-ID, kxp-pod-ID-{a,b,c}. KXP_VETH_QUEUES (default 1) sets
# the veths' queue count. KXP_IPV6=1 makes the topology dual-stack: the node fd00:50::2,
# the client fd00:50::1, pods fd00:244::2/3/4 (routed via fd00:244::1 on the node side of
# each pod veth), the node file with IPv6 addresses and CIDRs (service CIDR fd00:96::/112),
# and in each pod an IPv6 HTTP (:8080) and UDP (:5353) server like the IPv4 ones;
# kxp_manifests_v6 writes an IPv6 service for them.

KXP_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KXP_PODS=(a b c)

kxp_pod_ip() { case $1 in a) echo 10.244.1.2;; b) echo 10.244.1.3;; c) echo 10.244.1.4;; d) echo 10.244.1.5;; esac; }
kxp_pod_mac() { case $1 in a) echo 0a:58:0a:f4:01:02;; b) echo 0a:58:0a:f4:01:03;; c) echo 0a:58:0a:f4:01:04;; d) echo 0a:58:0a:f4:01:05;; esac; }
kxp_pod_ip6() { case $1 in a) echo fd00:244::2;; b) echo fd00:244::3;; c) echo fd00:244::4;; esac; }
kxp_node_pod_mac() { case $1 in a) echo 02:00:00:00:01:02;; b) echo 02:00:00:00:01:03;; c) echo 02:00:00:00:01:04;; d) echo 02:00:00:00:01:05;; esac; }

# Runs a command in a namespace of topology ID: kxp_in ID node|cli|pod-a ... CMD...
kxp_in() { local id=$1 where=$2; shift 2; ip netns exec "kxp-$where-$id" "$@"; }

kxp_topo_down() {
  local id=$1 dir=${2:-}
  if [ -n "$dir" ] && [ -d "$dir" ]; then
    for f in "$dir"/*.pid; do
      [ -e "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
  fi
  for ns in "kxp-node-$id" "kxp-cli-$id" "kxp-pod-$id-a" "kxp-pod-$id-b" "kxp-pod-$id-c" "kxp-pod-$id-d"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

kxp_topo_up() {
  local id=$1 dir=$2 offload=${3:-on}
  if [ ${#id} -gt 10 ]; then echo "topology id $id is too long (veth names)" >&2; return 1; fi
  mkdir -p "$dir"
  local node="kxp-node-$id" cli="kxp-cli-$id"
  ip netns add "$node" && ip netns add "$cli" || return 1
  ip -n "$node" link set lo up
  ip -n "$cli" link set lo up
  ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$node" sysctl -qw net.ipv4.conf.all.rp_filter=0
  ip netns exec "$node" sysctl -qw net.ipv4.conf.default.rp_filter=0
  local v6=${KXP_IPV6:-0}
  if [ "$v6" = 1 ]; then
    ip netns exec "$node" sysctl -qw net.ipv6.conf.all.forwarding=1
  fi

  # Uplink: node ku$id <-> client eth0.
  ip -n "$node" link add "ku$id" numtxqueues "${KXP_VETH_QUEUES:-1}" numrxqueues "${KXP_VETH_QUEUES:-1}" address 02:00:00:00:00:01 type veth \
    peer name "kc$id" numtxqueues "${KXP_VETH_QUEUES:-1}" numrxqueues "${KXP_VETH_QUEUES:-1}" address 02:00:00:00:00:fe || return 1
  ip -n "$node" link set "kc$id" netns "$cli"
  ip -n "$cli" link set "kc$id" name eth0
  ip -n "$node" addr add 192.168.50.2/24 dev "ku$id"
  ip -n "$cli" addr add 192.168.50.1/24 dev eth0
  ip -n "$node" link set "ku$id" up
  ip -n "$cli" link set eth0 up
  ip -n "$cli" route add default via 192.168.50.2
  if [ "$v6" = 1 ]; then
    ip -n "$node" addr add fd00:50::2/64 dev "ku$id" nodad
    ip -n "$cli" addr add fd00:50::1/64 dev eth0 nodad
    ip -n "$cli" -6 route add default via fd00:50::2
  fi
  [ "$offload" = off ] && ip netns exec "$cli" ethtool -K eth0 tx off >/dev/null

  local x
  for x in "${KXP_PODS[@]}"; do
    local pod="kxp-pod-$id-$x" ip; ip=$(kxp_pod_ip "$x")
    ip netns add "$pod" || return 1
    ip -n "$pod" link set lo up
    ip -n "$node" link add "kp$id$x" numtxqueues "${KXP_VETH_QUEUES:-1}" numrxqueues "${KXP_VETH_QUEUES:-1}" address "$(kxp_node_pod_mac "$x")" type veth \
      peer name "kq$id$x" numtxqueues "${KXP_VETH_QUEUES:-1}" numrxqueues "${KXP_VETH_QUEUES:-1}" address "$(kxp_pod_mac "$x")" || return 1
    ip -n "$node" link set "kq$id$x" netns "$pod"
    ip -n "$pod" link set "kq$id$x" name eth0
    ip -n "$pod" addr add "$ip/32" dev eth0
    ip -n "$pod" link set eth0 up
    ip -n "$pod" route add 10.244.1.1 dev eth0 scope link
    ip -n "$pod" route add default via 10.244.1.1 dev eth0
    ip -n "$node" addr add 10.244.1.1/32 dev "kp$id$x"
    ip -n "$node" link set "kp$id$x" up
    ip -n "$node" route add "$ip/32" dev "kp$id$x"
    if [ "$v6" = 1 ]; then
      local ip6; ip6=$(kxp_pod_ip6 "$x")
      ip -n "$pod" addr add "$ip6/128" dev eth0 nodad
      ip -n "$pod" -6 route add fd00:244::1 dev eth0
      ip -n "$pod" -6 route add default via fd00:244::1 dev eth0
      ip -n "$node" addr add fd00:244::1/128 dev "kp$id$x" nodad
      ip -n "$node" -6 route add "$ip6/128" dev "kp$id$x"
    fi
    [ "$offload" = off ] && ip netns exec "$pod" ethtool -K eth0 tx off >/dev/null
  done

  local addrs="192.168.50.2" ccidrs="10.244.0.0/16" scidrs="10.96.0.0/16"
  if [ "$v6" = 1 ]; then
    addrs="$addrs, \"fd00:50::2\"" ccidrs="$ccidrs, \"fd00:244::/64\"" scidrs="$scidrs, \"fd00:96::/112\""
  fi
  cat >"$dir/node.yaml" <<EOF
# Written by scripts/netns.sh for topology $id. MACs are set on the veths; neighbours
# are learned from the node namespace's kernel by kxp run.
name: node-$id
addresses: [$addrs]
clusterCIDRs: [$ccidrs]
serviceCIDRs: [$scidrs]
interfaces:
  - {name: ku$id, kind: uplink, mac: "02:00:00:00:00:01"}
  - {name: kp${id}a, kind: pod, mac: "$(kxp_node_pod_mac a)"}
  - {name: kp${id}b, kind: pod, mac: "$(kxp_node_pod_mac b)"}
  - {name: kp${id}c, kind: pod, mac: "$(kxp_node_pod_mac c)"}
EOF

  [ -f "$dir/big.bin" ] || head -c $((8 * 1024 * 1024)) /dev/urandom >"$dir/big.bin"
  for x in "${KXP_PODS[@]}"; do
    ip netns exec "kxp-pod-$id-$x" python3 "$KXP_SCRIPTS/podserver.py" --name "pod-$x" \
      --big "$dir/big.bin" >"$dir/pod-$x.log" 2>&1 &
    echo $! >"$dir/pod-$x.pid"
    if [ "$v6" = 1 ]; then
      ip netns exec "kxp-pod-$id-$x" python3 -c "$KXP_SERVER6" "pod-$x" "$dir/big.bin" \
        >"$dir/pod6-$x.log" 2>&1 &
      echo $! >"$dir/pod6-$x.pid"
    fi
  done
  # Wait (bounded) for the servers, and let the kernels learn each other's MACs.
  local tries
  for x in "${KXP_PODS[@]}"; do
    for tries in $(seq 1 100); do
      grep -q ready "$dir/pod-$x.log" 2>/dev/null && break
      sleep 0.05
    done
    ip netns exec "kxp-pod-$id-$x" python3 "$KXP_SCRIPTS/netcheck.py" ping 10.244.1.1 --timeout 1 >/dev/null 2>&1 || true
    if [ "$v6" = 1 ]; then
      for tries in $(seq 1 100); do
        grep -q ready "$dir/pod6-$x.log" 2>/dev/null && break
        sleep 0.05
      done
    fi
  done
  ip netns exec "$cli" python3 "$KXP_SCRIPTS/netcheck.py" ping 192.168.50.2 --timeout 1 >/dev/null 2>&1 || true
}

# The pods' IPv6 servers: HTTP on [::]:8080 answering the pod's name (and /big, X-Pod
# header), UDP on [::]:5353 echoing "NAME:MESSAGE". Arguments: NAME BIG-FILE.
KXP_SERVER6='
import http.server, socket, socketserver, sys, threading
name, big = sys.argv[1], sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/big":
            body = open(big, "rb").read()
        elif self.path == "/":
            body = name.encode() + b"\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pod", name)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):
        # IPv6 only: the IPv4 server holds 0.0.0.0:8080.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()
httpd = S(("::", 8080), H)
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::", 5353))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(name.encode() + b":" + data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
httpd.serve_forever()
'

# Writes web6 into DIR: an IPv6 LoadBalancer service (ClusterIP fd00:96::10, NodePorts
# 30081/TCP and 30054/UDP, LoadBalancer IP 2001:db8::10; TCP 80 -> 8080, UDP 53 -> 5353)
# over the given pods' IPv6 addresses.
kxp_manifests_v6() {
  local dir=$1; shift
  mkdir -p "$dir"
  {
    cat <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: "fd00:96::10"
  clusterIPs: ["fd00:96::10"]
  ipFamilies: [IPv6]
  externalTrafficPolicy: Cluster
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30054}
status:
  loadBalancer:
    ingress: [{ip: "2001:db8::10"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web6-1
  namespace: default
  labels: {kubernetes.io/service-name: web6}
addressType: IPv6
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
EOF
    local x
    for x in "$@"; do
      echo "  - {addresses: [\"$(kxp_pod_ip6 "$x")\"], conditions: {ready: true}, nodeName: node}"
    done
    [ $# -gt 0 ] || echo "  []"
  } >"$dir/.web6.yaml.tmp" && mv "$dir/.web6.yaml.tmp" "$dir/web6.yaml"
}

# A pod that comes after the node: kxp_pod_add ID DIR X IFNAME creates pod X (d: 10.244.1.5)
# in its namespace, its veth (IFNAME on the node side, KXP_VETH_QUEUES queues), routes,
# and its server; kxp_pod_del ID DIR X IFNAME deletes the veth and then the pod.
kxp_pod_add() {
  local id=$1 dir=$2 x=$3 ifname=$4
  local node="kxp-node-$id" pod="kxp-pod-$id-$x" ip; ip=$(kxp_pod_ip "$x")
  ip netns add "$pod" || return 1
  ip -n "$pod" link set lo up
  ip -n "$node" link add "$ifname" numtxqueues "${KXP_VETH_QUEUES:-1}" numrxqueues "${KXP_VETH_QUEUES:-1}" address "$(kxp_node_pod_mac "$x")" type veth \
    peer name "kq$id$x" numtxqueues "${KXP_VETH_QUEUES:-1}" numrxqueues "${KXP_VETH_QUEUES:-1}" address "$(kxp_pod_mac "$x")" || return 1
  ip -n "$node" link set "kq$id$x" netns "$pod"
  ip -n "$pod" link set "kq$id$x" name eth0
  ip -n "$pod" addr add "$ip/32" dev eth0
  ip -n "$pod" link set eth0 up
  ip -n "$pod" route add 10.244.1.1 dev eth0 scope link
  ip -n "$pod" route add default via 10.244.1.1 dev eth0
  ip -n "$node" addr add 10.244.1.1/32 dev "$ifname"
  ip -n "$node" link set "$ifname" up
  ip -n "$node" route add "$ip/32" dev "$ifname"
  ip netns exec "$pod" python3 "$KXP_SCRIPTS/podserver.py" --name "pod-$x" \
    --big "$dir/big.bin" >"$dir/pod-$x.log" 2>&1 &
  echo $! >"$dir/pod-$x.pid"
  local tries
  for tries in $(seq 1 100); do
    grep -q ready "$dir/pod-$x.log" 2>/dev/null && break
    sleep 0.05
  done
  ip netns exec "$pod" python3 "$KXP_SCRIPTS/netcheck.py" ping 10.244.1.1 --timeout 1 >/dev/null 2>&1 || true
}

kxp_pod_del() {
  local id=$1 dir=$2 x=$3 ifname=$4
  [ -f "$dir/pod-$x.pid" ] && { kill "$(cat "$dir/pod-$x.pid")" 2>/dev/null; rm -f "$dir/pod-$x.pid"; }
  ip -n "kxp-node-$id" link del "$ifname" 2>/dev/null || true
  ip netns pids "kxp-pod-$id-$x" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "kxp-pod-$id-$x" 2>/dev/null || true
}

# Writes the demo's services into DIR (one file per service): web (ClusterIP 10.96.0.10,
# NodePort 30080, LoadBalancer 203.0.113.10, TCP 80 and UDP 53) over the given pods, and
# self-a (ClusterIP 10.96.0.20) over pod a alone.
kxp_manifests() {
  local dir=$1; shift
  local pods=("$@")
  mkdir -p "$dir"
  {
    cat <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  externalTrafficPolicy: Cluster
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
EOF
    local x
    for x in "${pods[@]}"; do
      echo "  - {addresses: [\"$(kxp_pod_ip "$x")\"], conditions: {ready: true}, nodeName: node}"
    done
    [ ${#pods[@]} -gt 0 ] || echo "  []"
  } >"$dir/.web.yaml.tmp" && mv "$dir/.web.yaml.tmp" "$dir/web.yaml"
  cat >"$dir/self-a.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: self-a, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ipFamilies: [IPv4]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: self-a-1
  namespace: default
  labels: {kubernetes.io/service-name: self-a}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: ["10.244.1.2"], conditions: {ready: true}, nodeName: node}
EOF
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    up) kxp_topo_up "$2" "$3" "${4:-on}"; kxp_manifests "$3/manifests" a b c
        echo "topology $2 up; node file $3/node.yaml, manifests $3/manifests"
        echo "run: ip netns exec kxp-node-$2 target/release/kxp run --node $3/node.yaml --manifests $3/manifests" ;;
    down) kxp_topo_down "$2" "${3:-}" ;;
    *) echo "usage: $0 up ID DIR [on|off] | down ID [DIR]" >&2; exit 2 ;;
  esac
fi
