//! Computes the build fingerprint that a plugin and its host must share (DESIGN.md, "The plugin
//! boundary"). Each field is `name=value`; fields are separated by `;`. Fields that only the crate
//! expanding `build_fingerprint!` can know (debug-assertions, panic, target features) are added there.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let lock_path = find_lock(&manifest_dir);
    let lock = lock_path
        .as_ref()
        .and_then(|p| fs::read_to_string(p).ok())
        .unwrap_or_default();
    if let Some(path) = &lock_path {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");

    let (rustc_release, rustc_commit) = rustc_version();
    let mut features: Vec<String> = env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(|f| f.to_lowercase()))
        .collect();
    features.sort();
    let rustflags = env::var("CARGO_ENCODED_RUSTFLAGS")
        .unwrap_or_default()
        .replace('\x1f', " ");

    let fields = [
        ("core", env::var("CARGO_PKG_VERSION").unwrap_or_default()),
        // A plugin compiled against other core sources is refused even when every version
        // number agrees.
        (
            "core-source",
            distill_build::code_version(std::slice::from_ref(&manifest_dir), &[]),
        ),
        ("candle-core", locked_version(&lock, "candle-core")),
        ("candle-nn", locked_version(&lock, "candle-nn")),
        ("tracing", locked_version(&lock, "tracing")),
        ("rustc", rustc_release),
        ("rustc-commit", rustc_commit),
        ("target", env::var("TARGET").unwrap_or_default()),
        ("profile", env::var("PROFILE").unwrap_or_default()),
        ("opt-level", env::var("OPT_LEVEL").unwrap_or_default()),
        ("core-features", features.join(",")),
        ("rustflags", rustflags),
        ("cargo-lock", format!("{:016x}", fnv1a(lock.as_bytes()))),
    ];
    let text: String = fields
        .iter()
        .map(|(k, v)| format!("{k}={};", sanitize(v)))
        .collect();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_default()).join("fingerprint.txt");
    if let Err(e) = fs::write(&out, text) {
        panic!("cannot write {}: {e}", out.display());
    }
}

/// Walks up from the crate to the first `Cargo.lock` (the workspace's).
fn find_lock(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.is_file())
}

/// The version of `name` recorded in the lock file, or `unlocked`.
fn locked_version(lock: &str, name: &str) -> String {
    let needle = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == needle
            && let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
        {
            return v.trim_matches('"').to_string();
        }
    }
    "unlocked".to_string()
}

fn rustc_version() -> (String, String) {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    (field("release:"), field("commit-hash:"))
}

fn sanitize(v: &str) -> String {
    v.replace([';', '=', '\0'], "_")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
