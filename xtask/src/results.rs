//! The results folder of an experiment: where it is (a name is one folder inside `reports/`,
//! never a path out of it), and who uses it (one `cargo xtask run` at a time, by a lock file
//! that names its holder's pid).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The lock file inside a results folder.
const LOCK_FILE: &str = ".lock";

/// `root/<name>`, created, as an absolute path; refused when it is (or leads through) a symbolic
/// link that leaves `root`.
pub fn named(root: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let out = folder(&root.join(name))?;
    if !out.starts_with(&root) {
        bail!(
            "{}: the results folder of experiment `{name}` leads out of {} (to {}): remove the link \
             or pass --out",
            root.join(name).display(),
            root.display(),
            out.display()
        );
    }
    Ok(out)
}

/// `dir` created and resolved to an absolute path without links.
pub fn folder(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let resolved = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    if !resolved.is_dir() {
        bail!("{}: not a folder", dir.display());
    }
    Ok(resolved)
}

/// A job's folder inside `jobs`, created if missing; refused when it is a symbolic link or not a
/// folder (a job folder is only ever created by the orchestrator, exclusively).
pub fn job_folder(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir(parent)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => Ok(()),
                        _ => Err(e),
                    })
                    .with_context(|| format!("creating {}", parent.display()))?;
                refuse_links(parent)?;
            }
            return std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()));
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    refuse_links(dir)
}

fn refuse_links(dir: &Path) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        bail!(
            "{}: a job folder must be a folder the orchestrator created, not a link or a file; \
             remove it",
            dir.display()
        );
    }
    Ok(())
}

/// The lock of a results folder: held while the returned file is open. A second holder is
/// refused with the first one's pid.
pub fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "{}: another `cargo xtask run` (pid {}) is using this results folder; wait for it \
                 to end, or stop it, then run again",
                dir.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()))
        .and_then(|()| file.flush())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-results-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() -> Result<()> {
        let dir = folder(&temp("lock"))?;
        let first = lock(&dir)?;
        let e = lock(&dir)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("another"),
            "{e}"
        );
        drop(first);
        let again = lock(&dir);
        assert!(again.is_ok(), "the lock is free once its holder ends");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn links_out_of_the_results_folder_are_refused() -> Result<()> {
        let base = temp("links");
        let (reports, outside) = (base.join("reports"), base.join("outside"));
        std::fs::create_dir_all(&reports)?;
        std::fs::create_dir_all(&outside)?;
        std::os::unix::fs::symlink(&outside, reports.join("escape"))?;
        let e = named(&reports, "escape")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("leads out of"), "{e}");
        let inside = named(&reports, "fine")?;
        assert!(inside.starts_with(reports.canonicalize()?));

        // A job folder that is a link (to anywhere) is refused; a real one is accepted twice.
        let jobs = inside.join("jobs");
        job_folder(&jobs.join("abc"))?;
        job_folder(&jobs.join("abc"))?;
        std::os::unix::fs::symlink(&outside, jobs.join("def"))?;
        let e = job_folder(&jobs.join("def"))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("not a link"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
        Ok(())
    }
}
