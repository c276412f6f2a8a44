#!/usr/bin/env bash
# Tests the release binaries scripts/release.sh built, each on its own target:
# x86_64 natively, aarch64 and armv7 under qemu-user. Per target: --version names
# the target, --help answers, and one full round trip (the integration test
# connect::exec_backend_answers_a_peer_and_a_canvas_user: `connect` with the exec
# backend answers a peer and a canvas user, then stops on SIGTERM) against the
# emulator running natively. Prints each round trip's time.
#
#   scripts/qemu-test.sh [TARGET...]     default: the three release targets
#
# Environment: DIST_TARGET_DIR as for release.sh (default target/dist).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cargo_target=${DIST_TARGET_DIR:-$root/target/dist}
case $cargo_target in /*) ;; *) cargo_target=$root/$cargo_target ;; esac
targets=("$@")
[ "${#targets[@]}" -gt 0 ] ||
  targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
ROUND_TRIP=connect::exec_backend_answers_a_peer_and_a_canvas_user

if ! command -v qemu-aarch64 >/dev/null || ! command -v qemu-arm >/dev/null; then
  echo "--- installing qemu-user"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq qemu-user >/dev/null
fi

# Build the integration tests (and the native emulator) once, before timing.
cargo test --test it --no-run --quiet

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  case $t in
    x86_64-*) runner= ;;
    aarch64-*) runner=qemu-aarch64 ;;
    armv7-*) runner=qemu-arm ;;
    *) echo "qemu-test.sh: unsupported target $t" >&2; exit 2 ;;
  esac
  bin=$cargo_target/$t/release/molecule
  [ -x "$bin" ] || { echo "qemu-test.sh: $bin missing: run scripts/release.sh first" >&2; exit 1; }
  # exec: signals sent to the wrapper's pid reach qemu, which passes them on.
  wrapper=$work/molecule-$t
  printf '#!/bin/sh\nexec %s "%s" "$@"\n' "$runner" "$bin" >"$wrapper"
  chmod +x "$wrapper"

  echo "--- $t${runner:+ (under $runner)}"
  version=$("$wrapper" --version)
  echo "$version"
  case $version in
    "molecule "*", $t)") ;;
    *) echo "FAIL: $t --version does not name the target: $version" >&2; exit 1 ;;
  esac
  "$wrapper" --help | grep -q '^Usage: molecule' || { echo "FAIL: $t --help" >&2; exit 1; }
  start=$(date +%s%N)
  if ! out=$(MOLECULE_TEST_BIN=$wrapper cargo test --quiet --test it -- --exact "$ROUND_TRIP" 2>&1) ||
    ! grep -q 'test result: ok. 1 passed' <<<"$out"; then
    echo "$out" >&2
    echo "FAIL: round trip $t" >&2
    exit 1
  fi
  end=$(date +%s%N)
  ms=$(((end - start) / 1000000))
  echo "round trip $t: ${ms} ms"
done
