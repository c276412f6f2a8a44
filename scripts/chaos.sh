#!/usr/bin/env bash
# Soak version of the fault test (tests/it/fault.rs): peers and a canvas user send
# messages at RATE per second for DURATION seconds while the emulator injects random
# 5xx, 429 + Retry-After, dropped connections (before and after handling) and slow
# responses, the inbox cursor is pruned once (410), the token is rotated once, and the
# connector is SIGKILLed and restarted every ~30 s. Prints the same figures as the CI
# run: sent, answered, lost, duplicate replies. Loopback only; stops by itself.
#
# Usage: scripts/chaos.sh [--duration SECS] [--rate PER_SEC] [--kills N] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."

duration=300 rate=20 kills="" seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "chaos: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$duration$rate${kills:-0}${seed:-0}" in *[!0-9]*) echo "chaos: numbers only" >&2; exit 2 ;; esac

export CHAOS_MESSAGES=$((duration * rate))
export CHAOS_RATE=$rate
export CHAOS_KILLS=${kills:-$(( duration / 30 > 5 ? duration / 30 : 5 ))}
[ -n "$seed" ] && export CHAOS_SEED=$seed
echo "chaos: $CHAOS_MESSAGES messages at $rate/s (~${duration}s), $CHAOS_KILLS kills" >&2
cargo test --release --test it faults_and_crashes -- --nocapture --test-threads 1 2>&1 \
  | grep -E '^(fault test|test result)' 
exit "${PIPESTATUS[0]}"
