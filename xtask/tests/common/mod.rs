//! Helpers shared by the end-to-end tests of `cargo xtask`: the built binaries, scratch folders,
//! and reading the parquet tables back.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use polars::prelude::*;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub fn root() -> PathBuf {
    // `cargo test` sets the variable when it runs the test, for the checkout it runs in; the
    // compiled-in path can name another clone that shared the target folder.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.join("..")
}

pub fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distill-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root()).env_remove("DISTILL_EXTRA_PLUGINS");
    c
}

pub fn run_experiment(file: &Path, out: &Path, extra: &[&str]) -> Result<Output> {
    let out = xtask()
        .args(["run", "--no-build", "--out"])
        .arg(out)
        .arg(file)
        .args(extra)
        .output()?;
    Ok(out)
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn strings(df: &DataFrame, col: &str) -> Result<Vec<Option<String>>> {
    let ca = df.column(col)?.str()?;
    Ok((0..df.height())
        .map(|i| ca.get(i).map(String::from))
        .collect())
}

pub fn floats(df: &DataFrame, col: &str) -> Result<Vec<Option<f64>>> {
    let ca = df.column(col)?.f64()?;
    Ok((0..df.height()).map(|i| ca.get(i)).collect())
}

pub fn read(path: &Path) -> Result<DataFrame> {
    Ok(ParquetReader::new(File::open(path)?).finish()?)
}

/// One metrics row: epoch, split, metric and the value's bits (compared exactly).
pub type MetricRow = (u32, String, String, u64);

/// run_id -> sorted metric rows.
pub fn metrics_by_run(df: &DataFrame) -> Result<BTreeMap<String, Vec<MetricRow>>> {
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    let (run, epoch, split, metric, value) = (
        df.column("run_id")?.str()?,
        df.column("epoch")?.u32()?,
        df.column("split")?.str()?,
        df.column("metric")?.str()?,
        df.column("value")?.f64()?,
    );
    for i in 0..df.height() {
        let key = run.get(i).unwrap_or_default().to_string();
        let row = (
            epoch.get(i).unwrap_or(u32::MAX),
            split.get(i).unwrap_or_default().to_string(),
            metric.get(i).unwrap_or_default().to_string(),
            value.get(i).unwrap_or(f64::NAN).to_bits(),
        );
        out.entry(key).or_default().push(row);
    }
    for rows in out.values_mut() {
        rows.sort();
    }
    Ok(out)
}
