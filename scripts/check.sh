#!/usr/bin/env bash
# Exactly what CI checks (.ci/run calls this after installing the toolchain pieces):
# format, lints, the test suite, the static musl release builds for x86_64, aarch64
# and armv7 with their size budget (scripts/release.sh), each tested on its target
# (scripts/qemu-test.sh: natively or under qemu-user), and the README demo.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "--- cargo fmt --check"
cargo fmt --check
echo "--- cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "--- cargo test"
cargo test
echo "--- static release builds, archives and size budget (scripts/release.sh)"
scripts/release.sh
echo "--- each release binary on its target (scripts/qemu-test.sh)"
scripts/qemu-test.sh
echo "--- demo"
scripts/demo.sh
