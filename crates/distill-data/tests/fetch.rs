//! Fetching against HTTP servers started inside the test on the loopback interface: a mirror and
//! an "official" source, with a dropped connection, a corrupted file, a dead server.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use distill_data::{CacheStatus, DataError, Manifest, Store};
use sha2::{Digest, Sha256};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What a test server does.
#[derive(Clone, Default)]
struct Behaviour {
    /// Path -> body.
    files: HashMap<String, Vec<u8>>,
    /// Paths whose first response stops after this many bytes and closes the connection.
    drop_first: HashMap<String, usize>,
}

/// Every request a test server saw: (path, Range header).
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A one-thread HTTP/1.1 server on 127.0.0.1 serving `Behaviour`, with `Range: bytes=N-`.
struct Server {
    addr: SocketAddr,
    requests: RequestLog,
}

impl Server {
    fn start(behaviour: Behaviour) -> Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        std::thread::spawn(move || {
            let mut dropped: Vec<String> = Vec::new();
            for stream in listener.incoming().flatten() {
                let _ = respond(stream, &behaviour, &log, &mut dropped);
            }
        });
        Ok(Server { addr, requests })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn respond(
    stream: TcpStream,
    b: &Behaviour,
    log: &Mutex<Vec<(String, Option<String>)>>,
    dropped: &mut Vec<String>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    if let Ok(mut l) = log.lock() {
        l.push((path.clone(), range.clone()));
    }
    let mut out = stream;
    let Some(body) = b.files.get(&path) else {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let rest = &body[start.min(body.len())..];
    let head = if start > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
            rest.len(),
            body.len() - 1,
            body.len()
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            rest.len()
        )
    };
    out.write_all(head.as_bytes())?;
    if let Some(&cut) = b.drop_first.get(&path)
        && !dropped.contains(&path)
    {
        dropped.push(path);
        out.write_all(&rest[..cut.min(rest.len())])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    out.write_all(rest)
}

/// An address where nothing listens.
fn dead_url() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    drop(l);
    Ok(format!("http://{addr}"))
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn manifest(text: &str) -> Result<Manifest> {
    Ok(Manifest::parse(text, "test manifest")?)
}

fn file_entry(name: &str, body: &[u8], urls: &[String]) -> String {
    format!(
        "[[files]]\nname = {name:?}\nsize = {}\nsha256 = {:?}\nurls = {urls:?}\n",
        body.len(),
        sha256(body)
    )
}

/// A server with one file at `path`.
fn serving(path: &str, body: &[u8]) -> Result<Server> {
    Server::start(Behaviour {
        files: HashMap::from([(path.to_string(), body.to_vec())]),
        ..Behaviour::default()
    })
}

/// A manifest `name` with one file, `file`, of the bytes `body`.
fn one_file(name: &str, file: &str, body: &[u8], urls: &[String]) -> Result<Manifest> {
    manifest(&format!(
        "name = {name:?}\n{HEAD}{}",
        file_entry(file, body, urls)
    ))
}

const HEAD: &str =
    "kind = \"dataset\"\ntitle = \"t\"\nlicence = \"l\"\ncitation = \"c\"\nhomepage = \"h\"\n";

/// Files in `dir`, recursively, as relative paths.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fetches_verifies_and_unpacks_then_uses_the_cache() -> Result {
    let plain = bytes(50_000, 1);
    // A tar.gz holding a folder with two files.
    let mut tgz = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::fast());
        let mut t = tar::Builder::new(enc);
        for (name, body) in [
            ("batches/a.bin", bytes(3000, 2)),
            ("batches/b.bin", bytes(10, 3)),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, name, body.as_slice())?;
        }
        t.into_inner()?.finish()?;
    }
    let server = Server::start(Behaviour {
        files: HashMap::from([
            ("/d/plain.bin".to_string(), plain.clone()),
            ("/d/data.tar.gz".to_string(), tgz.clone()),
        ]),
        ..Behaviour::default()
    })?;
    let m = manifest(&format!(
        "name = \"demo\"\nroot = \"batches\"\n{HEAD}{}{}unpack = \"tar.gz\"\n",
        file_entry(
            "plain.bin",
            &plain,
            &[format!("{}/d/plain.bin", server.url())]
        ),
        file_entry(
            "data.tar.gz",
            &tgz,
            &[format!("{}/d/data.tar.gz", server.url())]
        ),
    ))?;
    let cache = tempfile::tempdir()?;
    let store = Store::new(cache.path().to_path_buf(), vec![]);
    assert_eq!(store.status(&m), CacheStatus::Absent);
    let dir = store.resolve(&m)?;
    assert_eq!(dir, cache.path().join("demo/batches"));
    assert_eq!(std::fs::read(dir.join("a.bin"))?, bytes(3000, 2));
    assert_eq!(std::fs::read(cache.path().join("demo/plain.bin"))?, plain);
    assert_eq!(
        store.status(&m),
        CacheStatus::Cached((plain.len() + tgz.len()) as u64)
    );
    assert!(!cache.path().join(".partial/demo").exists());
    // Present and verified: used without a request.
    let before = server.requests().len();
    assert_eq!(store.resolve(&m)?, dir);
    assert_eq!(server.requests().len(), before);
    // A cached file altered behind the cache's back is caught and fetched again.
    std::fs::write(cache.path().join("demo/plain.bin"), b"tampered")?;
    assert_eq!(store.resolve(&m)?, dir);
    assert_eq!(std::fs::read(cache.path().join("demo/plain.bin"))?, plain);
    assert_eq!(server.requests().len(), before + 1);
    Ok(())
}

#[test]
fn a_dropped_connection_resumes_where_it_stopped() -> Result {
    let body = bytes(200_000, 4);
    let server = Server::start(Behaviour {
        files: HashMap::from([("/big.bin".to_string(), body.clone())]),
        drop_first: HashMap::from([("/big.bin".to_string(), 70_000)]),
    })?;
    let m = one_file(
        "resume",
        "big.bin",
        &body,
        &[format!("{}/big.bin", server.url())],
    )?;
    let cache = tempfile::tempdir()?;
    let dir = Store::new(cache.path().to_path_buf(), vec![]).resolve(&m)?;
    assert_eq!(std::fs::read(dir.join("big.bin"))?, body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].1, None);
    assert_eq!(requests[1].1.as_deref(), Some("bytes=70000-"));
    Ok(())
}

#[test]
fn a_part_left_by_an_earlier_fetch_is_resumed() -> Result {
    let body = bytes(30_000, 5);
    let server = serving("/f.bin", &body)?;
    let m = one_file(
        "later",
        "f.bin",
        &body,
        &[format!("{}/f.bin", server.url())],
    )?;
    let cache = tempfile::tempdir()?;
    let partial = cache.path().join(".partial/later");
    std::fs::create_dir_all(&partial)?;
    std::fs::write(partial.join("f.bin.part"), &body[..12_345])?;
    let store = Store::new(cache.path().to_path_buf(), vec![]);
    assert_eq!(store.status(&m), CacheStatus::Partial);
    let dir = store.resolve(&m)?;
    assert_eq!(std::fs::read(dir.join("f.bin"))?, body);
    assert_eq!(
        server.requests()[0].1.as_deref(),
        Some("bytes=12345-"),
        "the part was not resumed"
    );
    Ok(())
}

#[test]
fn a_corrupted_file_is_named_and_leaves_the_cache_untouched() -> Result {
    let good = bytes(5_000, 6);
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    let server = serving("/x.bin", &bad)?;
    let m = one_file(
        "corrupt",
        "x.bin",
        &good,
        &[format!("{}/x.bin", server.url())],
    )?;
    let cache = tempfile::tempdir()?;
    let err = match Store::new(cache.path().to_path_buf(), vec![]).resolve(&m) {
        Ok(d) => return Err(format!("a corrupted file was accepted into {}", d.display()).into()),
        Err(e) => e,
    };
    assert!(matches!(err, DataError::Unavailable(_)), "{err:?}");
    let text = err.to_string();
    for needle in ["x.bin", "checksum mismatch", &sha256(&good), &sha256(&bad)] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    let left: Vec<String> = listing(cache.path())
        .into_iter()
        .filter(|p| !p.starts_with(".locks"))
        .collect();
    assert!(left.is_empty(), "the cache kept {left:?}");
    Ok(())
}

#[test]
fn a_dead_mirror_falls_through_to_the_next_source() -> Result {
    let body = bytes(8_000, 7);
    let official = serving("/o/y.bin", &body)?;
    let dead = dead_url()?;
    let m = one_file(
        "fallback",
        "y.bin",
        &body,
        &[format!("{}/o/y.bin", official.url())],
    )?;
    let cache = tempfile::tempdir()?;
    let dir = Store::new(cache.path().to_path_buf(), vec![dead]).resolve(&m)?;
    assert_eq!(std::fs::read(dir.join("y.bin"))?, body);
    assert_eq!(official.requests().len(), 1);
    Ok(())
}

#[test]
fn mirrors_laid_out_like_the_cache_come_first() -> Result {
    let body = bytes(4_000, 8);
    let mirror_server = serving("/m/layout/z.bin", &body)?;
    let official = Server::start(Behaviour::default())?;
    let folder_mirror = tempfile::tempdir()?;
    std::fs::create_dir_all(folder_mirror.path().join("layout"))?;
    let other = bytes(300, 9);
    std::fs::write(folder_mirror.path().join("layout/w.bin"), &other)?;
    let m = manifest(&format!(
        "name = \"layout\"\n{HEAD}{}{}",
        file_entry("z.bin", &body, &[format!("{}/z.bin", official.url())]),
        file_entry("w.bin", &other, &[format!("{}/w.bin", official.url())]),
    ))?;
    let cache = tempfile::tempdir()?;
    let mirrors = vec![
        folder_mirror.path().display().to_string(),
        format!("{}/m/", mirror_server.url()),
    ];
    let dir = Store::new(cache.path().to_path_buf(), mirrors).resolve(&m)?;
    assert_eq!(std::fs::read(dir.join("z.bin"))?, body);
    assert_eq!(std::fs::read(dir.join("w.bin"))?, other);
    assert!(official.requests().is_empty(), "{:?}", official.requests());
    Ok(())
}

#[test]
fn archive_members_are_verified_one_by_one() -> Result {
    // A zip holding a Latin-1 text file; the cache keeps it as UTF-8.
    let latin1: Vec<u8> = b"caf\xe9 cr\xe8me\n".to_vec();
    let utf8 = "café crème\n".as_bytes().to_vec();
    let mut zipped = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut zipped);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("pack/text.txt", opts)?;
        z.write_all(&latin1)?;
        z.finish()?;
    }
    let zipped = zipped.into_inner();
    let server = serving("/pack.zip", &zipped)?;
    let m = manifest(&format!(
        "name = \"members\"\n{HEAD}{}\n[[archives]]\nurl = \"{}/pack.zip\"\nformat = \"zip\"\nprefix = \"pack/\"\nsha256 = {:?}\nlatin1 = true\n",
        file_entry("text.txt", &utf8, &[]),
        server.url(),
        sha256(&zipped)
    ))?;
    let cache = tempfile::tempdir()?;
    let dir = Store::new(cache.path().to_path_buf(), vec![]).resolve(&m)?;
    assert_eq!(std::fs::read(dir.join("text.txt"))?, utf8);
    Ok(())
}

#[test]
fn no_reachable_source_names_every_address_and_the_way_by_hand() -> Result {
    let body = bytes(100, 10);
    let (dead_mirror, dead_official) = (dead_url()?, dead_url()?);
    let folder_mirror = tempfile::tempdir()?;
    let m = one_file(
        "nowhere",
        "n.bin",
        &body,
        &[format!("{dead_official}/n.bin")],
    )?;
    let cache = tempfile::tempdir()?;
    let mirrors = vec![
        dead_mirror.clone(),
        folder_mirror.path().display().to_string(),
    ];
    let err = match Store::new(cache.path().to_path_buf(), mirrors).resolve(&m) {
        Ok(d) => return Err(format!("resolved to {}", d.display()).into()),
        Err(e) => e.to_string(),
    };
    for needle in [
        format!("{dead_mirror}/nowhere/n.bin"),
        folder_mirror
            .path()
            .join("nowhere/n.bin")
            .display()
            .to_string(),
        format!("{dead_official}/n.bin"),
        cache.path().join("nowhere").display().to_string(),
        "DISTILL_DATA_MIRROR".to_string(),
        "by hand".to_string(),
    ] {
        assert!(err.contains(&needle), "{needle:?} missing from: {err}");
    }
    Ok(())
}

#[test]
fn every_shipped_manifest_parses_and_names_are_unique() -> Result {
    let all = distill_data::manifests()?;
    let mut names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "duplicate names");
    for expected in [
        "mnist",
        "fashion-mnist",
        "cifar-10",
        "cifar-100",
        "sst2",
        "rt-polarity",
        "ml-latest-small",
        "ml-1m",
        "all-MiniLM-L6-v2",
    ] {
        let m = distill_data::find(expected)?;
        assert!(!m.files.is_empty() && !m.licence.is_empty() && !m.citation.is_empty());
        // Every file can come from somewhere beyond a mirror.
        let elsewhere = !m.system.is_empty() || m.pypi.is_some() || !m.archives.is_empty();
        for f in &m.files {
            assert!(
                elsewhere || !f.urls.is_empty(),
                "{expected}: {} has no source",
                f.name
            );
        }
    }
    assert!(distill_data::find("SST2").is_ok(), "names ignore case");
    let err = distill_data::find("sst-3")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("sst2"), "{err}");
    Ok(())
}

/// A full disk (every write of the download fails with ENOSPC: its part file is a link to
/// `/dev/full`) fails the fetch with the part's path; nothing enters the cache, and the same
/// fetch succeeds once there is room.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_fails_the_fetch_naming_the_path_and_the_cache_stays_consistent() -> Result {
    let body = bytes(10_000, 11);
    let mirror = tempfile::tempdir()?;
    std::fs::create_dir_all(mirror.path().join("full"))?;
    std::fs::write(mirror.path().join("full/f.bin"), &body)?;
    let m = one_file("full", "f.bin", &body, &[])?;
    let cache = tempfile::tempdir()?;
    let partial = cache.path().join(".partial/full");
    std::fs::create_dir_all(&partial)?;
    let part = partial.join("f.bin.part");
    std::os::unix::fs::symlink("/dev/full", &part)?;
    let store = Store::new(
        cache.path().to_path_buf(),
        vec![mirror.path().display().to_string()],
    );
    let err = match store.resolve(&m) {
        Ok(d) => return Err(format!("fetched into {} on a full disk", d.display()).into()),
        Err(e) => e,
    };
    assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&part.display().to_string()), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    assert!(!cache.path().join("full/f.bin").exists());
    assert!(!cache.path().join("full/.verified").exists());
    assert_ne!(store.status(&m), CacheStatus::Cached(body.len() as u64));
    let dir = store.resolve(&m)?;
    assert_eq!(std::fs::read(dir.join("f.bin"))?, body);
    Ok(())
}
