#!/bin/sh
# Prints cargo's target directory for the scripts that run the built binaries: it is
# not always ./target (CARGO_TARGET_DIR, build.target-dir in a cargo config).
set -eu
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
