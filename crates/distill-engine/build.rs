//! Computes the engine's code version (`distill-build`): the sources of the engine, the core and
//! the runtime crate, the lock file (every dependency's version) and the pinned toolchain. A job's
//! identity includes it beside the versions of the plugins it uses.

use std::path::PathBuf;

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let crates = here.join("..");
    let root = crates.join("..");
    let version = distill_build::code_version(
        &[
            here.clone(),
            crates.join("distill-core"),
            crates.join("distill-rt"),
        ],
        &[root.join("Cargo.lock"), root.join("rust-toolchain.toml")],
    );
    println!("cargo:rustc-env=DISTILL_ENGINE_CODE_VERSION={version}");
}
