#!/usr/bin/env bash
# Exactly what CI checks (.ci/run calls this after installing the toolchain pieces):
# format, lints, the test suite, the static musl release build and its size budget,
# and the README demo.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_BUDGET=2500000   # bytes, stripped static binary (issue: ≤ 2.5 MB)

echo "--- cargo fmt --check"
cargo fmt --check
echo "--- cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "--- cargo test"
cargo test
echo "--- static release build (x86_64-unknown-linux-musl)"
cargo build --release --target x86_64-unknown-linux-musl --bin molecule
bin="$(scripts/target-dir.sh)/x86_64-unknown-linux-musl/release/molecule"
size=$(stat -c %s "$bin")
echo "molecule static binary: $size bytes ($(file -b "$bin" 2>/dev/null | cut -d, -f1-2 || true))"
if [ "$size" -gt "$SIZE_BUDGET" ]; then
  echo "FAIL: $size bytes is over the $SIZE_BUDGET-byte budget" >&2
  exit 1
fi
echo "--- demo"
scripts/demo.sh
