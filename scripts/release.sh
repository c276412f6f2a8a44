#!/usr/bin/env bash
# Release build: static musl binaries for x86_64, aarch64 and armv7, each packed
# as dist/molecule-<version>-<target>.tar.gz (binary, README, license,
# scripts/deploy/, shell completions, man page), plus dist/SHA256SUMS.
#
#   scripts/release.sh                 all three targets
#   scripts/release.sh aarch64-unknown-linux-musl ...   only these
#
# What is built is exactly the committed tree (`git archive HEAD`), never the work
# tree: uncommitted changes are left out (and a warning says so). Two runs on the
# same commit with the same toolchain give byte-identical archives: the source is
# unpacked at a fixed path, paths are remapped, SOURCE_DATE_EPOCH is the commit
# time, the dependency versions come from Cargo.lock (--locked), and tar/gzip get
# fixed order, owners, modes and times.
#
# std is built from the rust-src component for every target (cargo -Zbuild-std,
# enabled on stable with RUSTC_BOOTSTRAP=1 for this build only), with our profile
# (opt-level "z", LTO, abort) and std's `optimize_for_size` feature instead of its
# defaults, which leaves out std's backtrace printer (gimli, addr2line, the
# demangler: a stripped abort binary only ever printed addresses). A panic still
# prints its message. x86_64 at 2a76d73: 2,503,560 bytes with rustup's prebuilt
# std, 2,218,456 with this one.
#
# Toolchains (installed when missing; apt needs root):
# - x86_64, aarch64: the rustup target (Rust's self-contained musl 1.2.5, crt
#   objects and libc), musl-gcc resp. Debian's gcc-aarch64-linux-gnu as C compiler
#   (ring) and linker. Static-PIE.
# - armv7: rustup has no armv7 musl target to download here, so it is linked
#   against Debian's musl (musl-dev:armhf, 1.2.3) with gcc-arm-linux-gnueabihf
#   through a specs file derived from Debian's musl-gcc.specs. libgcc_eh stands in
#   for libunwind (only linked, never run: panic = "abort"). Static, not PIE: the
#   same as Rust's own armv7 musl target.
#
# Environment: DIST_DIR (default dist), DIST_TARGET_DIR (cargo target dir,
# default target/dist: use a fresh one to check reproducibility from scratch).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

SIZE_BUDGET=2500000 # bytes per stripped static binary (issue: <= 2.5 MB)
ALL_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${ALL_TARGETS[@]}")

dist=${DIST_DIR:-$root/dist}
build=$root/target/dist-src # the unpacked source: a fixed path
cargo_target=${DIST_TARGET_DIR:-$root/target/dist}
case $dist in /*) ;; *) dist=$root/$dist ;; esac
case $cargo_target in /*) ;; *) cargo_target=$root/$cargo_target ;; esac

# --- toolchains
ARMHF_MUSL=/usr/lib/arm-linux-musleabihf
need_apt=()
for t in "${targets[@]}"; do
  case $t in
    x86_64-unknown-linux-musl) command -v musl-gcc >/dev/null || need_apt+=(musl-tools) ;;
    aarch64-unknown-linux-musl) command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu) ;;
    armv7-unknown-linux-musleabihf)
      command -v arm-linux-gnueabihf-gcc >/dev/null || need_apt+=(gcc-arm-linux-gnueabihf)
      [ -f "$ARMHF_MUSL/libc.a" ] || need_apt+=(musl-dev:armhf)
      ;;
    *) echo "release.sh: unsupported target $t (supported: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
  esac
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "--- installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  case " ${need_apt[*]} " in *:armhf*) dpkg --add-architecture armhf ;; esac
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
installed=$(rustup target list --installed)
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src
for t in "${targets[@]}"; do
  case $t in
    armv7-*) ;;
    *) grep -qx "$t" <<<"$installed" || rustup target add "$t" ;;
  esac
done

# --- the source of HEAD, at a fixed path
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
commit=$(git rev-parse --short=7 HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "release.sh: WARNING: uncommitted changes are not in the release (building $commit)" >&2
fi
export SOURCE_DATE_EPOCH
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct HEAD)
export MOLECULE_BUILD_COMMIT=$commit # the export has no .git
rm -rf "$build"
mkdir -p "$build"
git archive --format=tar HEAD | tar -x -C "$build"

cargo_home=${CARGO_HOME:-$HOME/.cargo}
remap="--remap-path-prefix=$build=/molecule --remap-path-prefix=$cargo_home=/cargo"
cmap="-ffile-prefix-map=$build=/molecule -ffile-prefix-map=$cargo_home=/cargo"
# std is built here: map its sources where rustup's prebuilt std has them.
rust_src=$(rustc --print sysroot)/lib/rustlib/src/rust
rust_commit=$(rustc -vV | sed -n 's/^commit-hash: //p')
remap_std="--remap-path-prefix=$rust_src=/rustc/$rust_commit"

# armv7: a musl-gcc specs file that starts static-PIE links with rcrt1.o, and
# libgcc_eh as the libunwind that std names.
armv7_shim=$cargo_target/armv7-shim
if printf '%s\n' "${targets[@]}" | grep -q '^armv7-'; then
  mkdir -p "$armv7_shim"
  sed "s#%{!shared: $ARMHF_MUSL/Scrt1.o}#%{static-pie:$ARMHF_MUSL/rcrt1.o;!shared:$ARMHF_MUSL/Scrt1.o}#" \
    "$ARMHF_MUSL/musl-gcc.specs" >"$armv7_shim/musl-gcc.specs"
  cp "$(arm-linux-gnueabihf-gcc -print-file-name=libgcc_eh.a)" "$armv7_shim/libunwind.a"
fi

echo "--- molecule $version ($commit), $(rustc --version)"
rm -rf "$dist"
mkdir -p "$dist"
fail=0
for t in "${targets[@]}"; do
  env_t=${t//-/_}
  upper=${env_t^^}
  cflags=$cmap rustflags="$remap $remap_std"
  case $t in
    x86_64-*) cc=musl-gcc; ar=ar; linker= ;;
    aarch64-*) cc=aarch64-linux-gnu-gcc; ar=aarch64-linux-gnu-ar; linker=$cc ;;
    armv7-*)
      cc=arm-linux-gnueabihf-gcc; ar=arm-linux-gnueabihf-ar; linker=$cc
      specs=-specs=$armv7_shim/musl-gcc.specs
      cflags="$cflags $specs"
      rustflags="$rustflags -C link-self-contained=no -C link-arg=$specs -L $armv7_shim"
      ;;
  esac
  echo "--- build $t"
  (
    cd "$build"
    export "CC_$env_t=$cc" "AR_$env_t=$ar" "CFLAGS_$env_t=$cflags"
    export "CARGO_TARGET_${upper}_RUSTFLAGS=$rustflags"
    [ -z "$linker" ] || export "CARGO_TARGET_${upper}_LINKER=$linker"
    export RUSTC_BOOTSTRAP=1
    cargo build -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size \
      --release --locked --target "$t" --bin molecule \
      --target-dir "$cargo_target"
  )
  bin=$cargo_target/$t/release/molecule
  size=$(stat -c %s "$bin")
  echo "molecule $t: $size bytes ($(file -b "$bin" | cut -d, -f1-2))"
  if [ "$size" -gt "$SIZE_BUDGET" ]; then
    echo "FAIL: $t is $size bytes, over the $SIZE_BUDGET-byte budget" >&2
    fail=1
  fi
done
[ "$fail" = 0 ] || exit 1

# Completions and the man page are the same for every target: generate them with
# a binary this host runs (the x86_64 one if built, else a native build).
host_bin=$cargo_target/x86_64-unknown-linux-musl/release/molecule
if [ ! -x "$host_bin" ]; then
  (cd "$build" && cargo build --release --locked --bin molecule --target-dir "$cargo_target")
  host_bin=$cargo_target/release/molecule
fi

for t in "${targets[@]}"; do
  name=molecule-$version-$t
  stage=$cargo_target/stage/$name
  rm -rf "$stage"
  mkdir -p "$stage/completions"
  cp "$cargo_target/$t/release/molecule" "$stage/molecule"
  cp "$build/README.md" "$stage/README.md"
  cp "$build/scripts/LICENSE" "$stage/LICENSE"
  cp -R "$build/scripts/deploy" "$stage/deploy"
  "$host_bin" completions bash >"$stage/completions/molecule.bash"
  "$host_bin" completions zsh >"$stage/completions/_molecule"
  "$host_bin" completions fish >"$stage/completions/molecule.fish"
  "$host_bin" man >"$stage/molecule.1"
  chmod -R u+rwX,go+rX,go-w "$stage"
  find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner \
    --mtime="@$SOURCE_DATE_EPOCH" -C "$cargo_target/stage" -cf - "$name" |
    gzip -9 -n >"$dist/$name.tar.gz"
done
(cd "$dist" && sha256sum -- *.tar.gz >SHA256SUMS)
echo "--- $dist/SHA256SUMS"
cat "$dist/SHA256SUMS"
