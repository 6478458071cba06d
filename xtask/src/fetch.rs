//! `cargo xtask fetch`: data sets and models by name into the data cache ahead of time, and
//! `--list`: what the manifests know and what the cache holds.

use std::time::Instant;

use anyhow::{Context, Result};
use distill_data::{CacheStatus, Store};

/// Fetches (or, with `verify`, re-hashes) each named data set or model; `list` prints the table.
pub fn fetch(names: &[String], list: bool, verify: bool) -> Result<()> {
    let store = Store::from_env()?;
    if list || names.is_empty() {
        return print_list(&store);
    }
    for name in names {
        let m = distill_data::find(name)?;
        if verify {
            let removed = store.verify(m)?;
            if removed.is_empty() {
                eprintln!("{}: every cached file verifies", m.name);
            } else {
                eprintln!(
                    "{}: removed {} (did not verify; the next use fetches them again)",
                    m.name,
                    removed.join(", ")
                );
            }
            continue;
        }
        let started = Instant::now();
        let dir = store
            .resolve(m)
            .with_context(|| format!("fetching {}", m.name))?;
        let size = match store.status(m) {
            CacheStatus::Cached(bytes) => mib(bytes),
            _ => "?".into(),
        };
        eprintln!(
            "{}: {} ({size}, {:.1} s; licence: {})",
            m.name,
            dir.display(),
            started.elapsed().as_secs_f64(),
            m.licence
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_list(store: &Store) -> Result<()> {
    println!("cache: {}", store.root().display());
    let mirrors = std::env::var("DISTILL_DATA_MIRROR").unwrap_or_default();
    println!(
        "mirrors (DISTILL_DATA_MIRROR): {}",
        if mirrors.trim().is_empty() {
            "none"
        } else {
            mirrors.trim()
        }
    );
    println!();
    println!(
        "{:<18} {:<8} {:<10} {:>10}  {:<18} licence",
        "name", "kind", "cache", "size", "read by"
    );
    for m in distill_data::manifests()? {
        let (state, size) = match store.status(m) {
            CacheStatus::Cached(bytes) => ("cached", mib(bytes)),
            CacheStatus::Partial => ("partial", String::new()),
            CacheStatus::Absent => ("-", String::new()),
        };
        println!(
            "{:<18} {:<8} {:<10} {:>10}  {:<18} {}",
            m.name,
            m.kind.to_string(),
            state,
            size,
            if m.read_by.is_empty() {
                "-"
            } else {
                &m.read_by
            },
            m.licence
        );
    }
    Ok(())
}
