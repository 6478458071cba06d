//! The CBLAS library behind the kernels' f32 matrix products (`distill_rt::kernels`): by default
//! the project's OpenBLAS (`datasets/openblas.toml`, the `scipy-openblas32` wheel's library,
//! fetched into the data cache on first use); `DISTILL_CBLAS` names another file (MKL's
//! `libmkl_rt`, any library with `cblas_sgemm`), or, set empty, chooses the gemm crate. The
//! library runs single-threaded: the kernels give each thread its own band of output columns.

use std::path::{Path, PathBuf};

use distill_rt::kernels::{CblasSgemm, use_cblas_sgemm};
use distill_rt::tracing;

/// The environment variable that names the CBLAS library file.
pub const CBLAS_ENV: &str = "DISTILL_CBLAS";

/// The manifest of the OpenBLAS the project provisions (`datasets/openblas.toml`).
pub const OPENBLAS: &str = "openblas";

/// Its library file in the manifest's folder.
const OPENBLAS_FILE: &str = "libscipy_openblas.so";

/// Where the f32 matrix products run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Products {
    /// A CBLAS library's `cblas_sgemm`.
    Cblas {
        /// The library file.
        path: PathBuf,
        /// The kernels OpenBLAS chose for this CPU (`Zen`, `SkylakeX`), where it says.
        core: Option<String>,
    },
    /// The gemm crate.
    Gemm,
}

impl std::fmt::Display for Products {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Products::Cblas {
                path,
                core: Some(core),
            } => write!(f, "CBLAS {} (kernels {core})", path.display()),
            Products::Cblas { path, core: None } => write!(f, "CBLAS {}", path.display()),
            Products::Gemm => f.write_str("the gemm crate"),
        }
    }
}

/// Why a CBLAS library was not installed.
#[derive(Debug, thiserror::Error)]
pub enum CblasError {
    /// The dynamic loader refused the file.
    #[error("{CBLAS_ENV}={path}: cannot be opened: {message}")]
    Open {
        /// The library path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The library has no `cblas_sgemm`.
    #[error(
        "{CBLAS_ENV}={path}: no symbol `cblas_sgemm` (nor `scipy_cblas_sgemm`), not a CBLAS library"
    )]
    NoSgemm {
        /// The library path.
        path: PathBuf,
    },
}

/// The names `cblas_sgemm` goes by: plain, and with the prefix of the `scipy-openblas32` wheel's
/// OpenBLAS (`pip install scipy-openblas32`).
const SGEMM: [&[u8]; 2] = [b"cblas_sgemm", b"scipy_cblas_sgemm"];

/// OpenBLAS's thread-count setter, likewise.
const OPENBLAS_THREADS: [&[u8]; 2] = [
    b"openblas_set_num_threads",
    b"scipy_openblas_set_num_threads",
];

/// OpenBLAS's name for the kernels it runs, likewise.
const CORENAME: [&[u8]; 2] = [b"openblas_get_corename", b"scipy_openblas_get_corename"];

/// Loads the CBLAS library at `path` and makes the kernels' f32 products call its
/// `cblas_sgemm`. MKL is switched to its sequential layer (`MKL_Set_Threading_Layer`),
/// OpenBLAS to one thread (`openblas_set_num_threads`). The library is never unloaded. Returns
/// `None` when a library was installed before (the first one stays).
pub fn load_cblas(path: &Path) -> Result<Option<Products>, CblasError> {
    // SAFETY: loading runs the library's initialisers; a CBLAS library's are self-contained.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| CblasError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    // SAFETY: the symbols, where present, have these C signatures in MKL and OpenBLAS; both are
    // called before any product runs.
    unsafe {
        if let Ok(set_layer) =
            lib.get::<unsafe extern "C" fn(i32) -> i32>(b"MKL_Set_Threading_Layer")
        {
            const MKL_THREADING_SEQUENTIAL: i32 = 1;
            set_layer(MKL_THREADING_SEQUENTIAL);
        }
        for name in OPENBLAS_THREADS {
            if let Ok(set_threads) = lib.get::<unsafe extern "C" fn(i32)>(name) {
                set_threads(1);
            }
        }
    }
    // SAFETY: `cblas_sgemm` has the CBLAS signature `CblasSgemm` spells out.
    let sgemm: CblasSgemm = SGEMM
        .iter()
        .find_map(|&name| unsafe { lib.get::<CblasSgemm>(name) }.ok().map(|s| *s))
        .ok_or_else(|| CblasError::NoSgemm {
            path: path.to_path_buf(),
        })?;
    // OpenBLAS names the kernels it picked for the CPU (`OPENBLAS_CORETYPE` overrides it).
    // SAFETY: `openblas_get_corename` takes nothing and returns a static C string.
    let core = CORENAME.iter().find_map(|&name| unsafe {
        let get = lib
            .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(name)
            .ok()?;
        let p = get();
        (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
    });
    // The function pointer must stay valid for the rest of the process.
    std::mem::forget(lib);
    // SAFETY: a CBLAS sgemm on its sequential layer is thread-safe and single-threaded, and the
    // library stays loaded (forgotten above).
    if !unsafe { use_cblas_sgemm(sgemm) } {
        return Ok(None);
    }
    // OPENBLAS_CORETYPE overrides OpenBLAS's own choice of kernels (an environment that sets
    // `Haswell` runs AVX2 kernels on an AVX-512 CPU at half the speed).
    let forced = std::env::var("OPENBLAS_CORETYPE").ok();
    tracing::info!(
        path = %path.display(),
        openblas_core = core.as_deref(),
        openblas_coretype_env = forced.as_deref(),
        "f32 matrix products on CBLAS"
    );
    Ok(Some(Products::Cblas {
        path: path.to_path_buf(),
        core,
    }))
}

/// Installs the fastest matrix products this machine can have: the library `DISTILL_CBLAS`
/// names when it is set (an error when it cannot be loaded; set empty, the gemm crate), else the
/// project's OpenBLAS from the data cache, fetched there first when missing (`cargo xtask fetch
/// openblas`). Where that cannot be had, the gemm crate, with one warning that says why and how
/// to get the fast path. Call it once, before any product runs.
pub fn install_matrix_products() -> Result<Products, CblasError> {
    match std::env::var_os(CBLAS_ENV) {
        Some(path) if path.is_empty() => {
            tracing::info!("f32 matrix products on the gemm crate ({CBLAS_ENV} is set empty)");
            Ok(Products::Gemm)
        }
        Some(path) => Ok(load_cblas(Path::new(&path))?.unwrap_or(Products::Gemm)),
        None => match provisioned_openblas() {
            Ok(path) => match load_cblas(&path) {
                Ok(products) => Ok(products.unwrap_or(Products::Gemm)),
                Err(e) => Ok(slow_products(&e.to_string())),
            },
            Err(why) => Ok(slow_products(&why)),
        },
    }
}

/// How long a failed fetch of OpenBLAS keeps later processes from trying again (each try costs
/// pip's retries, about 9 s offline, and a grid starts a worker per job).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// The project's OpenBLAS library file, fetched into the data cache when missing. A failed fetch
/// leaves a note in the cache (`.partial/openblas.failed`, with the reason) that spares the
/// processes of the next hour the attempt; `cargo xtask fetch openblas` always tries.
fn provisioned_openblas() -> Result<PathBuf, String> {
    let manifest = distill_data::find(OPENBLAS).map_err(|e| e.to_string())?;
    if manifest.files.is_empty() {
        return Err(format!(
            "datasets/{OPENBLAS}.toml has no build for this machine ({})",
            distill_data::manifest::platform()
        ));
    }
    let store = distill_data::Store::from_env().map_err(|e| e.to_string())?;
    let note = store
        .root()
        .join(".partial")
        .join(format!("{OPENBLAS}.failed"));
    let cached = matches!(store.status(manifest), distill_data::CacheStatus::Cached(_));
    if !cached {
        let recent = std::fs::metadata(&note)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < RETRY_AFTER);
        if recent {
            let why = std::fs::read_to_string(&note).unwrap_or_default();
            return Err(format!(
                "a fetch failed less than an hour ago ({}): {}",
                note.display(),
                why.trim()
            ));
        }
    }
    match store.resolve(manifest) {
        Ok(folder) => {
            let _ = std::fs::remove_file(&note);
            Ok(folder.join(OPENBLAS_FILE))
        }
        Err(e) => {
            let why = e.to_string();
            if let Some(dir) = note.parent()
                && std::fs::create_dir_all(dir).is_ok()
            {
                let _ = std::fs::write(&note, &why);
            }
            Err(why)
        }
    }
}

/// The gemm crate, after saying why it is not OpenBLAS and how to get it.
fn slow_products(why: &str) -> Products {
    tracing::warn!(
        "f32 matrix products on the gemm crate, slower than OpenBLAS on most models: no OpenBLAS ({why}). \
         `cargo xtask fetch {OPENBLAS}` fetches it, or set {CBLAS_ENV} to a CBLAS library file"
    );
    Products::Gemm
}
