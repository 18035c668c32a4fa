#!/usr/bin/env bash
# The one test command: installs what is missing, then formatting, lints, every test.
# Tests that need root say so and skip when not root; CI runs this as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
