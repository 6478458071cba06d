//! Lists the plugins of this workspace (its members named `distill-plugin-*`), so that `distill`
//! loads only those from a target folder other clones may share (ARCHITECTURE.md, "Plugins").

use std::path::{Path, PathBuf};

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = here.join("../..");
    let manifest = root.join("Cargo.toml");
    println!("cargo:rerun-if-changed={}", manifest.display());
    let members: Vec<String> = read(&manifest)
        .and_then(|m| {
            m.get("workspace")?.get("members")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default();
    let mut plugins = Vec::new();
    for member in members {
        let path = root.join(&member).join("Cargo.toml");
        println!("cargo:rerun-if-changed={}", path.display());
        let name =
            read(&path).and_then(|m| m.get("package")?.get("name")?.as_str().map(String::from));
        if let Some(name) = name.filter(|n| n.starts_with("distill-plugin-")) {
            plugins.push(name.replace('-', "_"));
        }
    }
    println!(
        "cargo:rustc-env=DISTILL_WORKSPACE_PLUGINS={}",
        plugins.join(",")
    );
}

fn read(path: &Path) -> Option<toml::Table> {
    std::fs::read_to_string(path).ok()?.parse().ok()
}
