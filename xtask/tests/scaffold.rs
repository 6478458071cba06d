//! `cargo xtask new-plugin` and `docs/writing-a-strategy.md`, for real: in a copy of the
//! workspace, a scaffolded task plugin passes its generated test and trains in an experiment,
//! and every command and file of the guide is run and written in order, ending with the new
//! strategy's row in `runs.parquet`.
//!
//! The copy builds in its own target folder next to the shared one
//! (`<target>/scaffold-workspace`): the plugins and the runtime library have file names
//! without a hash, so a second workspace in the same folder would overwrite the first one's.
//! The folder persists, so after the first run only the workspace's crates rebuild; the first
//! run seeds it with a copy of the shared folder's intermediate artifacts (`deps`, `build`,
//! `.fingerprint`, times kept), so that cargo finds every dependency built (the same package ids,
//! features and profile) and compiles only the workspace's crates: 1.5 minutes instead of 17 on
//! 2 cores. A real copy, never hard links: a rebuilt file must not change the shared folder.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use polars::prelude::*;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn root() -> PathBuf {
    // `cargo test` sets the variable when it runs the test, for the checkout it runs in; the
    // compiled-in path can name another clone that shared the target folder.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.join("..")
}

/// The shared target folder: `<target>/debug/xtask` is this test's xtask binary.
fn target_dir() -> Result<PathBuf> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    Ok(exe
        .ancestors()
        .nth(2)
        .ok_or("the xtask binary is not in <target>/debug")?
        .to_path_buf())
}

/// Seeds an empty `target` with the intermediate artifacts of the shared folder (`cp -a`: the
/// modification times cargo's freshness checks compare are kept).
fn seed_target(shared: &Path, target: &Path) -> Result<()> {
    let debug = target.join("debug");
    if debug.join(".fingerprint").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&debug)?;
    for part in ["deps", "build", ".fingerprint"] {
        let from = shared.join("debug").join(part);
        if !from.is_dir() {
            continue;
        }
        let status = Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(&debug)
            .status()?;
        if !status.success() {
            // A partial seed is only slower: cargo rebuilds what is missing.
            eprintln!(
                "copying {} failed ({status}); building from scratch",
                from.display()
            );
            let _ = std::fs::remove_dir_all(debug.join(part));
        }
    }
    Ok(())
}

/// Copies the files git knows (tracked, or new and not ignored) from `from` to `to`.
fn copy_workspace(from: &Path, to: &Path) -> Result<()> {
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(from)
        .output()?;
    if !listed.status.success() {
        return Err("git ls-files failed".into());
    }
    for name in listed.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name)?;
        let (src, dst) = (from.join(name), to.join(name));
        if !src.is_file() {
            continue; // deleted in the working tree
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&src, &dst)?;
    }
    Ok(())
}

/// Runs `line` with `sh` in `dir`, building in `target`; fails with its output.
fn shell(dir: &Path, target: &Path, line: &str) -> Result<()> {
    shell_output(dir, target, line).map(|_| ())
}

/// [`shell`], returning stdout and stderr together.
fn shell_output(dir: &Path, target: &Path, line: &str) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", line])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("DISTILL_EXTRA_PLUGINS")
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "`{line}` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// One step of the guide: a shell command, or a file to write.
enum Step {
    Command(String),
    File { path: String, text: String },
}

/// The `sh` blocks (one command a line) and `file=` blocks of a Markdown guide, in order.
fn steps(markdown: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        if info.trim() == "sh" {
            steps.extend(
                body.iter()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| Step::Command(l.to_string())),
            );
        } else if let Some(path) = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("file="))
        {
            steps.push(Step::File {
                path: path.to_string(),
                text: body.join("\n") + "\n",
            });
        }
    }
    steps
}

fn strings(df: &DataFrame, col: &str) -> Result<Vec<Option<String>>> {
    let ca = df.column(col)?.str()?;
    Ok((0..df.height())
        .map(|i| ca.get(i).map(String::from))
        .collect())
}

fn read(path: &Path) -> Result<DataFrame> {
    Ok(ParquetReader::new(File::open(path)?).finish()?)
}

/// The guide's experiment (a teacher, a `baseline` and a `cosine-hint` student) after edits: a
/// change to the strategy's plugin reruns its student only, a README edit reruns nothing, and
/// `--reuse-stale` keeps the old result and marks it.
fn code_changes_rerun_exactly_the_jobs_they_touch(copy: &Path, target: &Path) -> Result<()> {
    let run = "cargo xtask run experiments/cosine-hint.toml";
    let plugin = copy.join("plugins/cosine-hint/src/lib.rs");
    let edit = |path: &Path, line: &str| -> Result<()> {
        let text = std::fs::read_to_string(path)?;
        std::fs::write(path, format!("{text}{line}\n"))?;
        Ok(())
    };
    edit(&plugin, "// a fix in the loss")?;
    let out = shell_output(copy, target, run)?;
    assert!(
        out.contains("skipping 2 finished jobs")
            && out.contains("1 jobs finished before with other code"),
        "{out}"
    );
    edit(&copy.join("README.md"), "An edit of the documentation.")?;
    let out = shell_output(copy, target, run)?;
    assert!(out.contains("skipping 3 finished jobs"), "{out}");

    edit(&plugin, "// another fix")?;
    let out = shell_output(copy, target, &format!("{run} --reuse-stale"))?;
    assert!(
        out.contains("skipping 3 finished jobs") && out.contains("1 of 2 runs are stale"),
        "{out}"
    );
    let runs = read(&copy.join("reports/cosine-hint/runs.parquet"))?;
    let stale = runs.column("stale")?.bool()?;
    let rows: Vec<(Option<String>, Option<bool>)> = strings(&runs, "strategy")?
        .into_iter()
        .zip((0..runs.height()).map(|i| stale.get(i)))
        .collect();
    assert!(
        rows.contains(&(Some("cosine-hint".into()), Some(true)))
            && rows.contains(&(Some("baseline".into()), Some(false))),
        "{rows:?}"
    );
    let versions = strings(&runs, "code_strategy")?;
    assert!(
        versions
            .iter()
            .all(|v| v.as_deref().is_some_and(|v| v.contains(':'))),
        "{versions:?}"
    );
    Ok(())
}

#[test]
fn scaffolded_plugins_and_the_strategy_guide_work_in_a_copy_of_the_workspace() -> Result<()> {
    let target = target_dir()?.join("scaffold-workspace");
    seed_target(&target_dir()?, &target)?;
    let copy = std::env::temp_dir().join(format!("distill-scaffold-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    copy_workspace(&root(), &copy)?;

    // A task plugin first, so that the guide's builds include it: each new member changes
    // Cargo.lock, which every crate's build fingerprint includes, so each new lock rebuilds the
    // workspace's crates.
    shell(&copy, &target, "cargo xtask new-plugin task toy-task")?;

    let guide = std::fs::read_to_string(root().join("docs/writing-a-strategy.md"))?;
    let steps = steps(&guide);
    assert!(
        steps.len() >= 5,
        "the guide has {} steps: commands and files",
        steps.len()
    );
    for step in steps {
        match step {
            Step::Command(line) => shell(&copy, &target, &line)?,
            Step::File { path, text } => std::fs::write(copy.join(path), text)?,
        }
    }
    let runs = read(&copy.join("reports/cosine-hint/runs.parquet"))?;
    let rows: Vec<_> = strings(&runs, "strategy")?
        .into_iter()
        .zip(strings(&runs, "status")?)
        .collect();
    assert!(
        rows.contains(&(Some("cosine-hint".into()), Some("ok".into()))),
        "{runs}"
    );
    let metrics = read(&copy.join("reports/cosine-hint/metrics.parquet"))?;
    assert!(strings(&metrics, "metric")?.contains(&Some("cosine".into())));
    code_changes_rerun_exactly_the_jobs_they_touch(&copy, &target)?;

    // The scaffolded task passes its generated test and trains in an experiment too.
    shell(&copy, &target, "cargo test -q -p distill-plugin-toy-task")?;
    std::fs::write(
        copy.join("experiments/toy-task.toml"),
        r#"name = "toy-task"
seeds = [0]
[train]
epochs = 2
[[datasets]]
name = "toy-task.synthetic"
[[teachers]]
model = "toy-task.linear"
[[students]]
model = "toy-task.linear"
[[strategies]]
name = "kd"
"#,
    )?;
    // Not `--no-build`: `cargo test -p` just linked the runtime library of its own build, whose
    // file name (without a hash) is the one the workspace build's `distill` loads.
    shell(&copy, &target, "cargo xtask run experiments/toy-task.toml")?;
    let runs = read(&copy.join("reports/toy-task/runs.parquet"))?;
    assert_eq!(
        strings(&runs, "status")?,
        [Some("ok".to_string())],
        "{runs}"
    );
    let _ = std::fs::remove_dir_all(&copy);
    Ok(())
}
