//! Data sets and pretrained models by name: the manifests of `datasets/` ([`manifest`]), the
//! verified local cache and the sources it is filled from ([`Store`]: mirrors, system packages,
//! a package registry, the official addresses). Binaries call [`resolve`]; plugins reach it only
//! through the host (`distill_core::assets`).

pub mod manifest;
mod store;

use std::fmt;
use std::path::PathBuf;

pub use manifest::{Kind, Manifest, find, manifests};
pub use store::{CacheStatus, Store, sha256_file};

/// Everything that can go wrong finding, fetching or verifying named data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No manifest has this name.
    #[error("no data set or model named `{name}` (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// Every known name, comma separated.
        known: String,
    },
    /// A manifest does not parse or is inconsistent.
    #[error("manifest {file}: {message}")]
    Manifest {
        /// The manifest file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing a local file failed (a full disk, permissions).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// No source had the files.
    #[error("{0}")]
    Unavailable(Box<Unavailable>),
    /// Neither `DISTILL_DATA` nor a home folder says where the cache is.
    #[error("no folder for the data cache: set DISTILL_DATA (or HOME or XDG_CACHE_HOME)")]
    NoCache,
}

/// The files of a data set that no source could supply, with every attempt.
#[derive(Debug)]
pub struct Unavailable {
    /// The data set or model.
    pub name: String,
    /// Its cache folder.
    pub folder: PathBuf,
    /// The files still missing.
    pub missing: Vec<String>,
    /// Every source tried and what went wrong there.
    pub tried: Vec<Attempt>,
    /// Whether any mirror was configured.
    pub mirrors: bool,
}

/// One failed attempt at one source.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The address or path tried.
    pub source: String,
    /// What went wrong (unreachable, not there, checksum mismatch with both hashes).
    pub problem: String,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cannot get `{}` ({}) from any source; tried:",
            self.name,
            self.missing.join(", ")
        )?;
        for a in &self.tried {
            writeln!(f, "  - {}: {}", a.source, a.problem)?;
        }
        if !self.mirrors {
            writeln!(f, "  (no mirror: DISTILL_DATA_MIRROR is not set)")?;
        }
        write!(
            f,
            "To place the files by hand, copy them (sizes and sha256 in datasets/{name}.toml) into \
             {folder}, or into <mirror>/{name}/ and set DISTILL_DATA_MIRROR=<mirror>; then run \
             `cargo xtask fetch {name}`",
            name = self.name,
            folder = self.folder.display()
        )
    }
}

/// The local folder of the data set or model `name`: the cache's copy when present and verified,
/// else fetched into the cache first (`DISTILL_DATA`, `DISTILL_DATA_MIRROR`).
pub fn resolve(name: &str) -> Result<PathBuf, DataError> {
    Store::from_env()?.resolve(find(name)?)
}
