//! `cargo xtask test`: provisions what the tests need beyond Rust (a Python virtual environment
//! from `tests/python/requirements.txt`, created on first use and reused while that file is
//! unchanged), then runs `cargo test --workspace` with it first on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The file in the environment that records which requirements it was filled from.
const STAMP: &str = "distillery-requirements.sha256";

/// Where the environment lives: `DISTILL_VENV`, else `$XDG_CACHE_HOME/distillery/venv`, else
/// `~/.cache/distillery/venv`.
fn venv_dir() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("DISTILL_VENV") {
        return Ok(PathBuf::from(d));
    }
    let cache = match var("XDG_CACHE_HOME") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(var("HOME").context("neither DISTILL_VENV nor HOME is set")?)
            .join(".cache"),
    };
    Ok(cache.join("distillery/venv"))
}

/// The virtual environment, created and filled from `requirements` unless it already was.
pub fn provision(root: &Path) -> Result<PathBuf> {
    let requirements = root.join("tests/python/requirements.txt");
    let wanted = std::fs::read(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let digest: String = Sha256::digest(&wanted)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let venv = venv_dir()?;
    let python = venv.join("bin/python3");
    let stamp = venv.join(STAMP);
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == digest) {
        eprintln!("test environment: {} (up to date)", venv.display());
        return Ok(venv);
    }
    check_python()?;
    let started = Instant::now();
    eprintln!(
        "test environment: creating {} from {}",
        venv.display(),
        requirements.display()
    );
    let out = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .context("running `python3 -m venv` (the tests need Python 3 with its venv module)")?;
    if !out.status.success() {
        bail!(
            "`python3 -m venv {}` failed: the tests need Python's venv module (on Debian and \
             Ubuntu: `apt-get install python3-venv`)\n{}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--requirement")
        .arg(&requirements)
        .status()
        .with_context(|| format!("running {} -m pip", python.display()))?;
    if !status.success() {
        bail!(
            "installing {} into {} failed ({status}); the output above says why",
            requirements.display(),
            venv.display()
        );
    }
    std::fs::write(&stamp, &digest).with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!(
        "test environment: ready in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        size_of(&venv)
    );
    Ok(venv)
}

/// The oldest Python the pinned requirements have wheels for (numpy 2.4 and pandas 3 need 3.11).
const PYTHON_AT_LEAST: (u32, u32) = (3, 11);

/// Fails with one clear message when `python3` is missing or older than [`PYTHON_AT_LEAST`].
fn check_python() -> Result<()> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(*sys.version_info[:2])"])
        .output()
        .context("running python3 (the tests need Python 3.11 or newer with its venv module)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if !out.status.success() || version < PYTHON_AT_LEAST {
        bail!(
            "python3 is {}.{}; the tests' requirements (tests/python/requirements.txt) need {}.{} \
             or newer: put a newer python3 first on PATH",
            version.0,
            version.1,
            PYTHON_AT_LEAST.0,
            PYTHON_AT_LEAST.1
        );
    }
    Ok(())
}

/// `du -sh`-like size of a folder.
fn size_of(dir: &Path) -> String {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    format!("{:.0} MiB", total as f64 / (1024.0 * 1024.0))
}

/// `PATH` with the environment's `bin/` first.
pub fn path_with(venv: &Path) -> Result<std::ffi::OsString> {
    let bin = venv.join("bin");
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&rest)))
        .context("joining PATH")
}
