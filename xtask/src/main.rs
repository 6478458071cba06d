//! `cargo xtask`: project chores as Rust subcommands (rust-analyzer style). It never links the
//! runtime: it builds the workspace in one cargo invocation and runs the `distill` binary.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// distillery's chores and experiment orchestrator.
#[derive(Parser)]
#[command(name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Builds the workspace, then lists every registered dataset, model and strategy.
    Plugins,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Plugins => {
            build_workspace()?;
            let distill = target_dir()?.join("debug").join("distill");
            run(Command::new(&distill).arg("plugins"))
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds host, workers and plugins in ONE cargo invocation (DESIGN.md, "The plugin boundary").
fn build_workspace() -> Result<()> {
    run(cargo().args(["build", "--workspace", "--quiet"]))
}

/// The cargo target folder (honours `CARGO_TARGET_DIR`).
fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
