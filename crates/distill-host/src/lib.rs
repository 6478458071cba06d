//! Finds, checks and loads plugin libraries.
//!
//! Loading follows DESIGN.md, "The plugin boundary": the library must open (an undefined symbol
//! means it was built against another runtime build), then its ABI version, build fingerprint,
//! hash of crossing `TypeId`s and runtime anchor must equal the host's, and only then is its
//! Rust-ABI `register` called. Each refusal names the file, the differing field and the command
//! that fixes it. Libraries are never unloaded, refused ones included: objects and autograd
//! closures may point into them.

mod cblas;
mod worker;

pub use cblas::{CBLAS_ENV, CblasError, OPENBLAS, Products, install_matrix_products, load_cblas};
pub use worker::apply_worker_settings;

use std::ffi::{CStr, c_char};
use std::path::{Path, PathBuf};

use distill_rt::abi::{self, RegisterFn};
use distill_rt::{Registrar, tracing};

/// The command that rebuilds host and plugins consistently.
pub const REBUILD: &str = "cargo build --workspace";

/// Why a plugin library was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file does not exist.
    #[error("plugin {path}: no such file; build the plugins with `{REBUILD}`")]
    Missing {
        /// The plugin path.
        path: PathBuf,
    },
    /// The dynamic loader refused the file.
    #[error(
        "plugin {path}: cannot be opened: {message}\n  an undefined symbol means it was built against another build of the runtime; rebuild host and plugins together with `{REBUILD}`"
    )]
    Open {
        /// The plugin path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The file has no plugin entry point.
    #[error(
        "plugin {path}: not a distillery plugin (no symbol `{symbol}`); plugins export it with `distill_rt::export_plugin!`"
    )]
    NotAPlugin {
        /// The plugin path.
        path: PathBuf,
        /// The missing symbol.
        symbol: String,
    },
    /// The plugin API version differs.
    #[error(
        "plugin {path}: field `abi-version` differs: plugin {plugin}, host {host}; rebuild with `{REBUILD}`"
    )]
    AbiVersion {
        /// The plugin path.
        path: PathBuf,
        /// The plugin's version.
        plugin: u32,
        /// The host's version.
        host: u32,
    },
    /// A field of the build fingerprint differs.
    #[error(
        "plugin {path}: build fingerprint field `{field}` differs: plugin `{plugin}`, host `{host}`; rebuild host and plugins in one invocation with `{REBUILD}` (and no per-package profile overrides for plugins)"
    )]
    Fingerprint {
        /// The plugin path.
        path: PathBuf,
        /// The first differing field.
        field: String,
        /// The plugin's value.
        plugin: String,
        /// The host's value.
        host: String,
    },
    /// The `TypeId`s of crossing types differ.
    #[error(
        "plugin {path}: field `type-hash` differs: plugin {plugin:016x}, host {host:016x} (the crossing types come from other crate builds); rebuild with `{REBUILD}`"
    )]
    TypeHash {
        /// The plugin path.
        path: PathBuf,
        /// The plugin's hash.
        plugin: u64,
        /// The host's hash.
        host: u64,
    },
    /// The plugin uses its own copy of the runtime.
    #[error(
        "plugin {path}: field `runtime` differs: the plugin links its own copy of distill-core and candle (runtime anchor at {plugin:#x}, host's at {host:#x}); its tensors would get no gradients. Make it depend on `distill-rt` only, not on distill-core or candle directly, and rebuild with `{REBUILD}`"
    )]
    ForeignRuntime {
        /// The plugin's anchor address.
        plugin: usize,
        /// The host's anchor address.
        host: usize,
        /// The plugin path.
        path: PathBuf,
    },
    /// The plugin's `register` failed (or panicked).
    #[error("plugin {path}: register failed: {source}")]
    Register {
        /// The plugin path.
        path: PathBuf,
        /// What went wrong.
        source: distill_rt::Error,
    },
    /// The plugin file or its folder can be changed by other users.
    #[error(
        "plugin {path}: {loose} is writable by other users (mode {mode:o}); a plugin runs with your rights, so it is not loaded: `chmod go-w {loose}`"
    )]
    Insecure {
        /// The plugin path.
        path: PathBuf,
        /// The file or folder that others can write.
        loose: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A plugin directory could not be read.
    #[error("plugin directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The host's values of the checked fields.
fn host_fingerprint() -> &'static str {
    distill_rt::build_fingerprint!()
}

fn host_type_hash() -> u64 {
    abi::hash_type_ids(&distill_rt::crossing_type_ids!())
}

/// A registrar filled by the plugins loaded into it.
#[derive(Default)]
pub struct PluginHost {
    registrar: Registrar,
    loaded: Vec<PathBuf>,
    /// Plugin path -> its code version, `<name>:<hex>`.
    versions: std::collections::BTreeMap<PathBuf, String>,
}

impl PluginHost {
    /// A host with no plugins loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything the loaded plugins registered.
    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// Paths of the plugins loaded so far, in load order.
    pub fn loaded(&self) -> &[PathBuf] {
        &self.loaded
    }

    /// The code version (`<plugin>:<hex>`, ARCHITECTURE.md, "Job identity") of the plugin
    /// loaded from `origin` (the origin of a registered name).
    pub fn plugin_version(&self, origin: &str) -> Option<&str> {
        self.versions.get(Path::new(origin)).map(String::as_str)
    }

    /// The code version of the plugin that registered the dataset, model or strategy (`kind`)
    /// named `name`; `None` for an unknown name.
    pub fn code_version(&self, kind: &str, name: &str) -> Option<String> {
        let entry = self
            .registrar
            .list()
            .into_iter()
            .find(|e| e.kind == kind && e.name == name)?;
        self.plugin_version(&entry.origin).map(String::from)
    }

    /// Checks and loads one plugin library, then calls its `register`.
    pub fn load(&mut self, path: &Path) -> Result<(), LoadError> {
        let path_buf = path.to_path_buf();
        if !path.is_file() {
            return Err(LoadError::Missing { path: path_buf });
        }
        refuse_loose(path)?;
        // SAFETY: loading runs the library's initialisers. Plugins are Rust cdylibs of this
        // workspace; every symbol is checked below before any Rust type crosses.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| LoadError::Open {
            path: path_buf.clone(),
            message: e.to_string(),
        })?;
        // Never unloaded, refused or not (see the module docs).
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        check(lib, path)?;
        // SAFETY: the checks proved the plugin was built by the same compiler and build as the
        // host and shares its runtime, so the Rust-ABI signature is the one it was compiled with.
        let register = unsafe { symbol::<RegisterFn>(lib, path, abi::SYM_REGISTER)? };
        let version = code_version(lib, path)?;
        self.registrar.set_origin(path.display().to_string());
        register(&mut self.registrar).map_err(|source| LoadError::Register {
            path: path_buf.clone(),
            source,
        })?;
        tracing::info!(plugin = %path.display(), version, "loaded plugin");
        self.versions.insert(path_buf.clone(), version);
        self.loaded.push(path_buf);
        Ok(())
    }

    /// Loads every plugin library in `dir` (files named `libdistill_plugin_*.so` or the
    /// platform's equivalent), in name order.
    pub fn load_dir(&mut self, dir: &Path) -> Result<(), LoadError> {
        for path in discover(dir)? {
            self.load(&path)?;
        }
        Ok(())
    }

    /// Loads the plugins of this workspace ([`WORKSPACE_PLUGINS`]) found in `dir`, a target
    /// folder's `deps/`: a library another clone sharing the folder built is not loaded.
    pub fn load_workspace(&mut self, dir: &Path) -> Result<(), LoadError> {
        for path in workspace_plugins(dir)? {
            self.load(&path)?;
        }
        Ok(())
    }
}

/// The library names (`distill_plugin_*`) of this workspace's plugins, its members named
/// `distill-plugin-*` when it was built (`build.rs`), comma separated.
pub const WORKSPACE_PLUGINS: &str = env!("DISTILL_WORKSPACE_PLUGINS");

/// The libraries of this workspace's plugins in `dir`, sorted by name.
pub fn workspace_plugins(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let ours: Vec<&str> = WORKSPACE_PLUGINS.split(',').collect();
    Ok(discover(dir)?
        .into_iter()
        .filter(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let name = stem
                .strip_prefix(std::env::consts::DLL_PREFIX)
                .unwrap_or(stem);
            let ours = ours.contains(&name);
            if !ours {
                tracing::debug!(plugin = %p.display(), "not a plugin of this workspace; not loaded");
            }
            ours
        })
        .collect())
}

/// Refuses a plugin that users other than its owner could have changed: the file, or the
/// folder it is in, writable by others (a folder with the sticky bit, like `/tmp`, lets nobody
/// replace another's file), or by a group other than the owner's private group (as ssh treats
/// a key).
fn refuse_loose(path: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    let folder = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("/"),
    };
    for loose in [path, folder] {
        let Ok(meta) = std::fs::metadata(loose) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
        let others = mode & 0o002 != 0 && !sticky_dir;
        let group = mode & 0o020 != 0 && !sticky_dir && !private_group(meta.uid(), meta.gid());
        if others || group {
            return Err(LoadError::Insecure {
                path: path.to_path_buf(),
                loose: loose.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Whether group `gid` is user `uid`'s own: named like the user, with no other members
/// (`/etc/passwd`, `/etc/group`). Unknown users or groups are not.
fn private_group(uid: u32, gid: u32) -> bool {
    let entries = |file: &str| -> Vec<Vec<String>> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(':').map(String::from).collect())
            .collect()
    };
    let id = |e: &[String]| e.get(2).and_then(|v| v.parse::<u32>().ok());
    let Some(user) = entries("/etc/passwd")
        .into_iter()
        .find(|e| id(e) == Some(uid))
        .and_then(|e| e.first().cloned())
    else {
        return false;
    };
    entries("/etc/group")
        .into_iter()
        .find(|e| id(e) == Some(gid))
        .is_some_and(|e| {
            e.first() == Some(&user)
                && e.get(3)
                    .is_none_or(|m| m.split(',').all(|m| m.is_empty() || m == user))
        })
}

/// Plugin libraries in `dir`, sorted by name.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Dir {
        path: dir.into(),
        source,
    })?;
    let prefix = format!("{}distill_plugin_", std::env::consts::DLL_PREFIX);
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && n.ends_with(std::env::consts::DLL_SUFFIX)
            })
        })
        .collect();
    out.sort();
    Ok(out)
}

/// # Safety
/// `T` must be the type the symbol was defined with.
unsafe fn symbol<T: Copy>(
    lib: &'static libloading::Library,
    path: &Path,
    name: &[u8],
) -> Result<T, LoadError> {
    // SAFETY: forwarded to the caller.
    unsafe { lib.get::<T>(name) }
        .map(|s| *s)
        .map_err(|_| LoadError::NotAPlugin {
            path: path.to_path_buf(),
            symbol: String::from_utf8_lossy(name).into_owned(),
        })
}

/// `<name>:<hex>`: the plugin's name (its file name without `libdistill_plugin_` and the
/// suffix) and the code version its build script computed; for a plugin built without one, the
/// first 16 hex digits of the library file's SHA-256 (any rebuild that changes it counts).
fn code_version(lib: &'static libloading::Library, path: &Path) -> Result<String, LoadError> {
    // SAFETY: the C-ABI signature `export_plugin!` defines for this symbol.
    let version =
        unsafe { symbol::<extern "C" fn() -> *const c_char>(lib, path, abi::SYM_CODE_VERSION)? };
    // SAFETY: a pointer to a NUL-terminated static in the never-unloaded image.
    let built = unsafe { CStr::from_ptr(version()) }
        .to_string_lossy()
        .into_owned();
    let hex = if built.is_empty() {
        let (_, sha) = distill_data::sha256_file(path).map_err(|e| LoadError::Open {
            path: path.to_path_buf(),
            message: format!("hashing the library for its code version: {e}"),
        })?;
        sha[..16].to_string()
    } else {
        built
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem
        .strip_prefix(std::env::consts::DLL_PREFIX)
        .unwrap_or(&stem);
    let name = stem.strip_prefix("distill_plugin_").unwrap_or(stem);
    Ok(format!("{name}:{hex}"))
}

/// Runs the C-ABI checks, in the order of the module docs.
fn check(lib: &'static libloading::Library, path: &Path) -> Result<(), LoadError> {
    let path_buf = path.to_path_buf();
    // SAFETY: the symbol types are the C-ABI signatures `export_plugin!` defines; the names are
    // specific enough that a foreign library exporting them with other types is not a concern.
    let (version, fingerprint, type_hash, anchor) = unsafe {
        (
            symbol::<extern "C" fn() -> u32>(lib, path, abi::SYM_ABI_VERSION)?,
            symbol::<extern "C" fn() -> *const c_char>(lib, path, abi::SYM_FINGERPRINT)?,
            symbol::<extern "C" fn() -> u64>(lib, path, abi::SYM_TYPE_HASH)?,
            symbol::<extern "C" fn() -> *const u8>(lib, path, abi::SYM_RUNTIME_ANCHOR)?,
        )
    };
    let plugin_version = version();
    if plugin_version != abi::ABI_VERSION {
        return Err(LoadError::AbiVersion {
            path: path_buf,
            plugin: plugin_version,
            host: abi::ABI_VERSION,
        });
    }
    // SAFETY: the plugin returns a pointer to a NUL-terminated static in its never-unloaded image.
    let plugin_fp = unsafe { CStr::from_ptr(fingerprint()) }
        .to_string_lossy()
        .into_owned();
    if let Some((field, plugin, host)) = abi::first_difference(&plugin_fp, host_fingerprint()) {
        return Err(LoadError::Fingerprint {
            path: path_buf,
            field,
            plugin,
            host,
        });
    }
    let (plugin_hash, host_hash) = (type_hash(), host_type_hash());
    if plugin_hash != host_hash {
        return Err(LoadError::TypeHash {
            path: path_buf,
            plugin: plugin_hash,
            host: host_hash,
        });
    }
    let (plugin_anchor, host_anchor) = (anchor() as usize, abi::runtime_anchor() as usize);
    if plugin_anchor != host_anchor {
        return Err(LoadError::ForeignRuntime {
            path: path_buf,
            plugin: plugin_anchor,
            host: host_anchor,
        });
    }
    Ok(())
}

/// Lets plugins resolve data sets and models by name (`distill_rt::assets`) through the data
/// cache and its mirrors (`distill_data`); a second call changes nothing.
pub fn install_data_resolver() {
    distill_rt::assets::install_resolver(|name| {
        distill_data::resolve(name).map_err(|e| e.to_string())
    });
}

/// The verified local folder of the data set or model `name` (installs the resolver first), for
/// tests and benches that read real data.
pub fn data_folder(name: &str) -> distill_rt::Result<std::path::PathBuf> {
    install_data_resolver();
    distill_rt::assets::resolve("data", "name", name)
}
