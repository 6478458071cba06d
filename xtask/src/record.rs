//! What the orchestrator reads of a job's record (`record.json`, written by the worker), and
//! whether it can be trusted: a record that does not parse, or whose files no longer have the
//! size and SHA-256 it lists, is not a finished job.

use std::collections::BTreeMap;
use std::path::Path;

/// What the orchestrator reads of a job's record.
#[derive(Debug, serde::Deserialize)]
pub struct Finished {
    /// `ok`, `diverged` or `failed`.
    pub status: String,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub finished_at: f64,
    /// File name -> its size and SHA-256, as the worker wrote them.
    #[serde(default)]
    files: BTreeMap<String, Digest>,
}

#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
struct Digest {
    size: u64,
    sha256: String,
}

/// The record of the job folder `dir`, unchecked: `None` without one or when it does not parse.
pub fn finished_record(dir: &Path) -> Option<Finished> {
    let text = std::fs::read(dir.join("record.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The record of the job folder `dir` when it can be trusted: `Ok(None)` without one; an error
/// saying why when it does not parse or a file it lists (weights, teacher cache) no longer has
/// the size and SHA-256 it lists: truncated, corrupted, or replaced.
pub fn checked_record(dir: &Path) -> std::result::Result<Option<Finished>, String> {
    let path = dir.join("record.json");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let record: Finished = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a job record: {e}", path.display()))?;
    for (name, want) in &record.files {
        // Only files of its own folder: a name is one plain path component.
        let plain = Path::new(name).components().count() == 1
            && matches!(
                Path::new(name).components().next(),
                Some(std::path::Component::Normal(_))
            );
        if !plain {
            return Err(format!(
                "{}: lists `{name}`, which is not a file of its job folder",
                path.display()
            ));
        }
        let file = dir.join(name);
        let (size, sha256) =
            distill_data::sha256_file(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if (size, &sha256) != (want.size, &want.sha256) {
            return Err(format!(
                "{}: {size} bytes with sha256 {sha256}, but its record lists {} bytes with \
                 sha256 {}: truncated or corrupted",
                file.display(),
                want.size,
                want.sha256
            ));
        }
    }
    Ok(Some(record))
}

/// The status of the trusted record of `dir`, if it has one.
pub fn finished_status(dir: &Path) -> Option<String> {
    checked_record(dir).ok().flatten().map(|r| r.status)
}

/// The status of the job of folder `dir` when its trusted record says it finished (`ok` or
/// `diverged`): then it is not run again. A record that cannot be trusted is reported under
/// `label` and the job runs again, as one that failed or has no record.
pub fn resumable(dir: &Path, label: &str) -> Option<String> {
    let record = checked_record(dir).unwrap_or_else(|reason| {
        eprintln!("{label}: {reason}; running it again");
        None
    });
    record.map(|r| r.status).filter(|s| s != "failed")
}
