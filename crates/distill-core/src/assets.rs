//! Data sets and pretrained models by name (`sst2`, `all-MiniLM-L6-v2`): plugins ask
//! [`resolve`] for a name's local folder; the host installs the resolver that finds, fetches and
//! verifies the files (`distill_host::install_data_resolver`), so plugin code does no network I/O.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Error, Result};

/// Maps a data set or model name to the local folder holding its verified files, or says why not.
pub type Resolver = fn(&str) -> std::result::Result<PathBuf, String>;

static RESOLVER: OnceLock<Resolver> = OnceLock::new();

/// Installs the process's resolver; returns false when one was installed before (it stays).
pub fn install_resolver(resolver: Resolver) -> bool {
    RESOLVER.set(resolver).is_ok()
}

/// The local folder of the data set or model `name`, fetched and verified by the host's resolver.
/// `owner` and `key` name the configuration that asked, for the error.
pub fn resolve(owner: &str, key: &str, name: &str) -> Result<PathBuf> {
    let Some(resolver) = RESOLVER.get() else {
        return Err(Error::config(
            owner,
            key,
            format!(
                "`{name}` names data, but this process has no data resolver (the `distill` \
                 worker installs one); give a `path` instead"
            ),
        ));
    };
    resolver(name).map_err(|message| Error::config(owner, key, message))
}

/// The folder a dataset reads: its `path` when given, else the data named by `data`, resolved
/// (for datasets whose config has both keys).
pub fn folder(owner: &str, path: Option<&Path>, data: Option<&str>) -> Result<PathBuf> {
    match (path, data) {
        (Some(p), _) => Ok(p.to_path_buf()),
        (None, Some(name)) => resolve(owner, "data", name),
        (None, None) => Err(Error::config(
            owner,
            "data",
            "give `data` (a name from `cargo xtask fetch --list`, fetched and verified for you) \
             or `path` (a folder of your own)",
        )),
    }
}
