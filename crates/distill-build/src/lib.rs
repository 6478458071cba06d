//! The code version of a crate, computed by its build script: a hash of the sources that decide
//! what it computes (`Cargo.toml`, `build.rs` and everything under `src/`), so that a job's
//! identity changes when, and only when, the code that runs it does (ARCHITECTURE.md, "Job
//! identity"). Tests, benches, examples and documentation are not part of it: a README edit
//! changes no version.
//!
//! A plugin's `build.rs` calls [`emit_plugin_version`]; `distill_rt::export_plugin!` exports the
//! result through the ABI.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The variable `export_plugin!` reads at compile time.
pub const PLUGIN_VERSION_ENV: &str = "DISTILL_PLUGIN_CODE_VERSION";

/// Digits of the SHA-256 kept in a version (64 bits).
const DIGITS: usize = 16;

/// For a plugin's `build.rs`: sets [`PLUGIN_VERSION_ENV`] to the version of the crate being
/// built, and asks cargo to run the script again when any of its inputs changes.
pub fn emit_plugin_version() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let version = code_version(&[dir], &[]);
    println!("cargo:rustc-env={PLUGIN_VERSION_ENV}={version}");
}

/// The version of the crates in `crate_dirs` and the `files` beside them (a lock file), as 16
/// lower-case hex digits; prints `cargo:rerun-if-changed` for each input. A missing input hashes
/// as absent, so that a crate published without one still builds.
pub fn code_version(crate_dirs: &[PathBuf], files: &[PathBuf]) -> String {
    let mut hasher = Sha256::new();
    for dir in crate_dirs {
        let mut inputs = vec![dir.join("Cargo.toml"), dir.join("build.rs")];
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        inputs.extend(files_under(&dir.join("src")));
        for path in inputs {
            hash_input(&mut hasher, dir, &path);
        }
    }
    for path in files {
        hash_input(&mut hasher, path.parent().unwrap_or(Path::new("")), path);
    }
    hasher.finalize()[..DIGITS / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Adds a file's name (relative to `base`) and content; a missing file adds its name only.
fn hash_input(hasher: &mut Sha256, base: &Path, path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
    let name = path.strip_prefix(base).unwrap_or(path);
    hasher.update(name.to_string_lossy().as_bytes());
    hasher.update([0]);
    if let Ok(bytes) = fs::read(path) {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
}

/// Every file under `dir`, sorted (the order does not depend on the file system).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::write(path, text);
    }

    #[test]
    fn sources_change_the_version_and_documentation_does_not() {
        let dir = std::env::temp_dir().join(format!("distill-build-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        write(&dir.join("Cargo.toml"), "[package]\nname = \"p\"\n");
        write(&dir.join("src/lib.rs"), "pub fn f() -> u32 { 1 }\n");
        write(&dir.join("src/deep/mod.rs"), "// a module\n");
        let v = || code_version(std::slice::from_ref(&dir), &[]);
        let first = v();
        assert_eq!(first.len(), 16);
        assert_eq!(v(), first, "the version is a function of the files");

        write(&dir.join("README.md"), "# new documentation\n");
        write(&dir.join("tests/it.rs"), "#[test] fn t() {}\n");
        assert_eq!(
            v(),
            first,
            "documentation and tests are not code that computes"
        );

        write(&dir.join("src/deep/mod.rs"), "// a module, edited\n");
        let second = v();
        assert_ne!(second, first, "a nested source file counts");
        // The same bytes under another name are another crate.
        let _ = fs::rename(dir.join("src/deep/mod.rs"), dir.join("src/deep/other.rs"));
        assert_ne!(v(), second, "file names count");
        let lock = dir.join("Cargo.lock");
        write(&lock, "version = 4\n");
        let with_lock = code_version(std::slice::from_ref(&dir), std::slice::from_ref(&lock));
        write(&lock, "version = 4\n# another resolution\n");
        assert_ne!(
            code_version(std::slice::from_ref(&dir), std::slice::from_ref(&lock)),
            with_lock
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
