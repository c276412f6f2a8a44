#!/usr/bin/env bash
# Footprint of many workspaces in one process (issue: 1, 10 and 50 workspaces):
# builds the release binaries and runs scripts/bench-workspaces.py.
# Env: COUNTS (default 1,10,50), IDLE_SECS (default 30).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
exec python3 scripts/bench-workspaces.py "$@"
