//! Embeds a run path so that `distill` (and `bench-step`, whose package uses this file too) finds the shared runtime (`libdistill_rt.so`, next to it or
//! in `deps/`) and the toolchain's `libstd` without `LD_LIBRARY_PATH` (DESIGN.md, "The plugin
//! boundary").

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" {
        return;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(rustc)
        .args(["--print", "target-libdir"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN:$ORIGIN/deps:{libdir}");
}
