//! Build script (Cargo.toml `build = "src/build.rs"`): the version string and the
//! size-saving link flags of the static release binary.
//!
//! Version: `MOLECULE_BUILD_COMMIT` (for packagers building from a source tarball)
//! wins; else the short git commit, `-dirty` when tracked files differ from it; else
//! `unknown`, so a build without git or outside a checkout still works.
//!
//! Size (release builds for `*-linux-musl` only, i.e. the shipped static binaries):
//! - `-z pack-relative-relocs` (x86_64 and aarch64): a static-PIE carries one
//!   24-byte relocation per pointer to fix up at start; RELR packs them into a
//!   bitmap (x86_64: 84 KB to 1 KB). musl's static-PIE start code (`rcrt1.o`, from
//!   musl 1.2.4 on; Rust ships 1.2.5 for these targets) applies them. Not for armv7: its
//!   release build links Debian's musl 1.2.3 (scripts/release.sh), whose start code
//!   would leave RELR relocations unapplied.
//! - `.eh_frame` and `.eh_frame_hdr` dropped (x86_64: 270 KB): with `panic = "abort"`
//!   nothing unwinds, and the binary is stripped, so the tables only fed address-only
//!   backtraces. A panic still prints its message and aborts. The crt objects keep
//!   their few bytes, as their init code refers to them. Tests (`panic = "unwind"`)
//!   build debug, where none of this applies.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let target = env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=MOLECULE_BUILD_TARGET={target}");
    println!(
        "cargo:rustc-env=MOLECULE_BUILD_COMMIT={}",
        commit(&manifest_dir)
    );
    println!("cargo:rerun-if-env-changed=MOLECULE_BUILD_COMMIT");
    for path in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    for path in git_watch_paths(&manifest_dir) {
        println!("cargo:rerun-if-changed={path}");
    }

    let musl = env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "musl")
        && env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    if musl && release {
        shrink_release_link();
    }
}

/// `1a2b3c4`, `1a2b3c4-dirty` or `unknown`.
fn commit(manifest_dir: &str) -> String {
    if let Ok(c) = env::var("MOLECULE_BUILD_COMMIT")
        && !c.trim().is_empty()
    {
        return c.trim().to_string();
    }
    // Only our own checkout counts: a source tarball unpacked inside some other
    // repository must not take that repository's commit.
    let Some(top) = git(manifest_dir, &["rev-parse", "--show-toplevel"]) else {
        return "unknown".into();
    };
    let same_dir = match (
        Path::new(&top).canonicalize(),
        Path::new(manifest_dir).canonicalize(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let Some(hash) = git(manifest_dir, &["rev-parse", "--short=7", "HEAD"]).filter(|_| same_dir)
    else {
        return "unknown".into();
    };
    match git(
        manifest_dir,
        &["status", "--porcelain", "--untracked-files=no"],
    ) {
        Some(changes) if !changes.is_empty() => format!("{hash}-dirty"),
        _ => hash,
    }
}

/// The files whose change means a new commit or a new index: HEAD, the branch ref
/// it points to, packed refs and the index. Worktrees keep HEAD and index in their
/// own git dir and refs in the common one.
fn git_watch_paths(manifest_dir: &str) -> Vec<String> {
    let (Some(git_dir), Some(common)) = (
        git(manifest_dir, &["rev-parse", "--absolute-git-dir"]),
        git(
            manifest_dir,
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        ),
    ) else {
        return Vec::new();
    };
    let mut paths = vec![format!("{git_dir}/HEAD"), format!("{git_dir}/index")];
    paths.push(format!("{common}/packed-refs"));
    if let Some(branch) = git(manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        paths.push(format!("{common}/{branch}"));
    }
    paths
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect()
}

fn git(dir: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn shrink_release_link() {
    let Some(out_dir) = env::var_os("OUT_DIR") else {
        return;
    };
    let script = Path::new(&out_dir).join("no-eh-frame.ld");
    // An INSERT script augments the linker's default layout instead of replacing it.
    let text = "SECTIONS { /DISCARD/ : { EXCLUDE_FILE(*crtbegin*.o *crtend*.o) *(.eh_frame) } }\n\
                INSERT AFTER .text;\n";
    if std::fs::write(&script, text).is_err() {
        return;
    }
    let bin = "cargo:rustc-link-arg-bin=molecule";
    if env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64" || a == "aarch64") {
        println!("{bin}=-Wl,-z,pack-relative-relocs");
    }
    println!("{bin}=-Wl,--no-eh-frame-hdr");
    println!("{bin}=-Wl,-T,{}", script.display());
}
