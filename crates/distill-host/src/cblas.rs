//! An optional CBLAS library for the kernels' f32 matrix products (`distill_rt::kernels`):
//! `DISTILL_CBLAS` names its file: the OpenBLAS of `pip install scipy-openblas32` (the fastest
//! measured here), MKL's `libmkl_rt`, any library with `cblas_sgemm`. Without one the products run on the gemm crate. The library runs
//! single-threaded: the kernels give each thread its own band of output columns.

use std::path::{Path, PathBuf};

use distill_rt::kernels::{CblasSgemm, use_cblas_sgemm};
use distill_rt::tracing;

/// The environment variable that names the CBLAS library file.
pub const CBLAS_ENV: &str = "DISTILL_CBLAS";

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
/// false when a library was installed before (the first one stays).
pub fn load_cblas(path: &Path) -> Result<bool, CblasError> {
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
    let installed = unsafe { use_cblas_sgemm(sgemm) };
    if installed {
        // OPENBLAS_CORETYPE overrides OpenBLAS's own choice of kernels (an environment that sets
        // `Haswell` runs AVX2 kernels on an AVX-512 CPU at half the speed).
        let forced = std::env::var("OPENBLAS_CORETYPE").ok();
        tracing::info!(
            path = %path.display(),
            openblas_core = core.as_deref(),
            openblas_coretype_env = forced.as_deref(),
            "f32 matrix products on CBLAS"
        );
    }
    Ok(installed)
}

/// [`load_cblas`] on the file `DISTILL_CBLAS` names, when it is set (and not empty); the path
/// loaded, if any.
pub fn load_cblas_from_env() -> Result<Option<PathBuf>, CblasError> {
    match std::env::var_os(CBLAS_ENV) {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            load_cblas(&path)?;
            Ok(Some(path))
        }
        _ => Ok(None),
    }
}
