//! Helpers the fuzz targets share: the parsers read files, so each input is written to a
//! scratch folder of its own process first.

use std::path::{Path, PathBuf};

/// A scratch folder for this process (created once; in `/dev/shm` where it exists, so the
/// writes cost no disk).
pub fn scratch() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("distill-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Writes `bytes` to `name` in the scratch folder; returns the path.
pub fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    if let Err(e) = std::fs::write(&path, bytes) {
        panic!("cannot write the fuzz input {}: {e}", path.display());
    }
    path
}

/// Splits `data` in two at a position its first two bytes choose.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let at = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    rest.split_at(at.min(rest.len()))
}
