//! The shared runtime must be the same library whichever packages one cargo invocation selects.
//!
//! `libdistill_rt.so` carries no hash in its file name, so two builds of it that differ in the
//! features of a dependency (cargo unifies features over the selected packages) overwrite each
//! other: `cargo test -p x` after `cargo build --workspace` relinks everything, and a unit cargo
//! believes fresh can end up linked against the other variant (seen here as "cannot satisfy
//! dependencies so `std` only shows up once"). This test checks that every crate of the runtime's
//! dependency tree has the same features when only the runtime is selected as when the whole
//! workspace is. When it fails, pin the listed features in `crates/distill-rt/Cargo.toml`.

use std::collections::BTreeSet;
use std::process::Command;

/// `package [features]` lines of `cargo tree` for `selection`.
fn tree(selection: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest =
        distill_rt::testing::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--manifest-path"])
        .arg(&manifest)
        .args(["-e", "normal", "--prefix", "none"])
        .args(["-f", "{p} [{f}]"])
        .args(selection)
        .output()
        .unwrap_or_else(|e| panic!("running cargo tree: {e}"));
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches(" (*)").to_string())
        .filter(|l| l.contains(" ["))
        .collect()
}

#[test]
fn runtime_features_do_not_depend_on_the_packages_built() {
    let alone = tree(&["-p", "distill-rt"]);
    let workspace = tree(&["--workspace"]);
    assert!(
        alone.len() > 10,
        "suspiciously small runtime tree: {alone:?}"
    );
    let differing: Vec<&String> = alone
        .iter()
        .filter(|l| !workspace.contains(*l) && !l.starts_with("distill-"))
        .collect();
    assert!(
        differing.is_empty(),
        "these runtime dependencies get other features in a whole-workspace build; pin the \
         workspace's features in crates/distill-rt/Cargo.toml:\n{differing:#?}"
    );
}
