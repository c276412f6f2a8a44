#!/usr/bin/env bash
# Benchmark of `molecule connect` against the local platform emulator (issue 6, DESIGN.md §7).
#
# Builds the release binaries (host: molecule, molecule-emulator; and the static musl
# molecule), starts molecule-emulator on 127.0.0.1 and runs scripts/bench.py, which
# measures, each phase repeated (--repeat K, default 3) and reported as median/min/max:
#   - backlog throughput: --messages N (default 2000) queued from 4 peers + the canvas
#     before the connector starts (behind a pre-written cursor), time from start until
#     every reply reached the platform; backends mock and exec cat, sequential and
#     --concurrency 4;
#   - single-message latency at the default 1000 ms interval (--latency-samples, default
#     50, randomly spaced): enqueue -> reply at the emulator, p50/p95, split into
#     poll-phase wait and handling with the emulator's request log;
#   - idle footprint over --idle-secs (default 60): VmRSS, VmHWM, threads, CPU seconds,
#     requests per minute;
#   - start-up (spawn -> register -> first poll) and SIGTERM -> exit when idle;
#   - static musl binary size (stripped);
#   - the emulator's own raw request rate (keep-alive Python client), and molecule's
#     throughput as a fraction of it;
#   - spawn (issue 14): exec cat sequential against the raw spawn rate of `cat` (C
#     posix_spawn with a pipe each way, measured right before and after; Python's
#     os.posix_spawn without a C compiler), goal >= 50 %;
#   - worker (issue 14): the same Python agent (a few standard-library imports, echo the
#     text) as an exec command and as a worker (goal: worker >= 20x), `cat` as a worker
#     against mock (handling overhead per message, goal <= 0.3 ms) and against the
#     emulator's ceiling (with the raw phase; goal >= 60 % sequentially).
# Every phase counts lost, duplicated and wrong-text replies; any of them fails the phase.
# `--vs 'CMD {url} {workspace} {token} {token_file} {state_dir}'` (optional {backend_args},
# {concurrency}, {interval_ms}) runs a second connector through the same phases in the
# same run; `--vs-name NAME` labels it.
#
# Output: one JSON document in --out FILE (default bench-results.json) and on stdout, a
# short table and PASS/FAIL per target of issue 6 on stderr. Exit 0 when every target
# passes, 1 otherwise, 2 on a set-up error.
#
#   - issue 12 (scripts/bench-wake.py, run alone with --phases): wake-latency (enqueue ->
#     reply, exec cat, --wake auto vs poll), wake-idle (requests/min with a healthy event
#     stream), org-bucket (20 workspaces sharing a 600/min org bucket for 2 min: 429s,
#     heartbeat gaps, lost), burst700 (700 queued under 600/min: time vs the limit, 429s).
# Run:   scripts/bench.sh                 # full run, several minutes
#        scripts/bench.sh --phases raw,spawn,worker   # issue 14's phases only
#        scripts/bench.sh --quick         # smoke test (~1 minute)
#        scripts/bench.sh --help          # all options
# Set BENCH_NO_BUILD=1 to skip the cargo builds. Needs cargo, python3 (stdlib only), Linux /proc.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)   # no cd: a relative --out stays relative to the caller
command -v python3 >/dev/null 2>&1 || { echo "bench: needs python3" >&2; exit 2; }

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  echo "bench: building release binaries" >&2
  cargo build --manifest-path "$ROOT/Cargo.toml" --release --quiet --bins
  if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    # Built as scripts/release.sh builds it (std from source, optimised for size),
    # so the size phase measures what ships.
    rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src
    CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc} RUSTC_BOOTSTRAP=1 \
      cargo build --manifest-path "$ROOT/Cargo.toml" --release --quiet \
      -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size \
      --target x86_64-unknown-linux-musl --bin molecule
  else
    echo "bench: the x86_64-unknown-linux-musl target is not installed; using an existing static binary if any" >&2
  fi
fi

# Issue 12's phases (event wake-ups and the rate budget) live in bench-wake.py; they run
# alone: scripts/bench.sh --phases wake-latency,wake-idle,org-bucket,burst700
case " $* " in
  *wake-latency*|*wake-idle*|*org-bucket*|*burst700*)
    exec python3 "$ROOT/scripts/bench-wake.py" --molecule "$ROOT/target/release/molecule" \
      --emulator "$ROOT/target/release/molecule-emulator" "$@" ;;
esac
exec python3 "$ROOT/scripts/bench.py" "$@"
