#!/usr/bin/env bash
# Installs what kxp needs to build, test and run on a fresh Debian machine: the C side
# of AF_XDP (clang, libelf, zlib, libpcap headers, m4, pkg-config for libxdp/libbpf),
# iproute2 and ethtool for network-namespace topologies, nftables and iptables for the
# kernel baselines kxp is measured against, curl for the demo, and the Rust components the
# checks use. Idempotent: installs only what is missing.
set -euo pipefail

APT_PACKAGES=(clang libelf-dev zlib1g-dev libpcap-dev pkg-config m4 iproute2 ethtool nftables iptables curl python3)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
for c in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    rustup component add "$c" || echo "setup: could not add $c (offline?)" >&2
  fi
done
