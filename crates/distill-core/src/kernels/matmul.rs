//! Matrix products on slices through the `gemm` crate, with the threads divided our way: for
//! the products of small models (128 rows, a few hundred columns) gemm's own rayon split
//! reaches 60-100 GFLOP/s on two Zen 5 cores, one single-threaded product per thread on its
//! own band of output columns 105-113 (`cargo xtask bench` step figures in the closing note).
//! Products with one output column or an inner dimension of 1 (a score layer, its gradient)
//! run as plain row loops: gemm takes 15 ms for `[256000, 32] x [32, 1]`, the loop 1.4.
//!
//! A host may install a `cblas_sgemm` ([`use_cblas_sgemm`]; `distill_host::load_cblas` loads
//! one): f32 bands then call it. On one Zen 5 core, single-threaded on the MLP's and the LSTM's
//! products: OpenBLAS 114-128 GFLOP/s, MKL (its AVX2 path on AMD) 88-108, gemm 62-66.

use std::any::TypeId;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::Real;

/// Which threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Threads {
    /// The calling thread only (the caller already runs products in parallel).
    One,
    /// The whole rayon pool.
    Pool,
}

/// An `m x n` operand: its slice and its (row, column) strides.
pub(super) type Operand<'a, T> = (&'a [T], usize, usize);

/// Output columns per band, at least, when a product is split into column bands.
const MIN_BAND: usize = 128;

/// Rows per band, at least, when a narrow product is split into bands of rows (CBLAS only).
const MIN_ROWS: usize = 64;

/// Bands of one product, at most: enough for 16 threads.
const MAX_BANDS: usize = 16;

/// A row-major CBLAS `sgemm` (`cblas_sgemm` of MKL, OpenBLAS, BLIS).
pub type CblasSgemm = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

/// The installed `cblas_sgemm`, if any.
static SGEMM: OnceLock<CblasSgemm> = OnceLock::new();

/// Makes every f32 product of the kernels call `sgemm` (one call per thread's band) instead of
/// the gemm crate. Returns false, changing nothing, if one is installed already.
///
/// # Safety
/// `sgemm` must implement `cblas_sgemm`, be callable from several threads at once, run on the
/// calling thread only (the kernels divide the threads themselves), and stay loaded for the
/// rest of the process.
pub unsafe fn use_cblas_sgemm(sgemm: CblasSgemm) -> bool {
    SGEMM.set(sgemm).is_ok()
}

/// Whether f32 products run on an installed `cblas_sgemm`.
pub fn cblas_sgemm_installed() -> bool {
    SGEMM.get().is_some()
}

/// Floating-point operations of the products so far.
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// The floating-point operations of every product the kernels ran in this process so far
/// (`2 m n k` each, and the same arithmetic of the direct convolutions; candle's own `matmul`
/// is not counted), for the benches' GFLOP/s.
pub fn matmul_flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// Adds `flops` to [`matmul_flops`] for a kernel that does a product's arithmetic without
/// [`matmul_into`] (the direct convolutions).
pub(super) fn count_flops(flops: u64) {
    FLOPS.fetch_add(flops, Ordering::Relaxed);
}

/// CBLAS's row-major layout and transpose flags.
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// An operand of `rows x cols` as CBLAS takes it: `(transpose flag, leading dimension)`, when
/// one of its strides is 1.
fn cblas_operand(rs: usize, cs: usize, rows: usize, cols: usize) -> Option<(i32, i32)> {
    let (flag, ld) = if cs == 1 && rs >= cols.max(1) {
        (NO_TRANS, rs)
    } else if rs == 1 && cs >= rows.max(1) {
        (TRANS, cs)
    } else {
        return None;
    };
    Some((flag, i32::try_from(ld).ok()?))
}

/// `dst := alpha * dst + lhs * rhs` for row-major `dst` (`m x n`); without `alpha`, `dst :=
/// lhs * rhs` (its old values are not read). `lhs` is `m x k`, `rhs` `k x n`.
pub(super) fn matmul_into<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    alpha: Option<T>,
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    threads: Threads,
) {
    let reach = |(s, rs, cs): Operand<'_, T>, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < s.len()
    };
    assert!(dst.len() >= m * n && reach(lhs, m, k) && reach(rhs, k, n));
    FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
    if n == 1 || k == 1 {
        return rows_loop((m, n, k), &mut dst[..m * n], alpha, lhs, rhs, threads);
    }
    let cblas = SGEMM
        .get()
        .filter(|_| TypeId::of::<T>() == TypeId::of::<f32>())
        .zip(cblas_operand(lhs.1, lhs.2, m, k))
        .zip(cblas_operand(rhs.1, rhs.2, k, n))
        .filter(|_| [m, n, k].iter().all(|&d| i32::try_from(d).is_ok()));
    // Bands of output columns; a product too narrow for that is split into bands of rows for
    // CBLAS (which runs on the calling thread only) and left to gemm's own rayon split
    // otherwise. How many depends on the product's shape alone, never on the pool's size: a CBLAS
    // library picks its kernels by the shape of each call (OpenBLAS's small-matrix kernels sum
    // in another order than its blocked ones), so a split by thread count gave a job other bits
    // on 1 thread than on 2.
    let pool = if threads == Threads::Pool {
        rayon::current_num_threads()
    } else {
        1
    };
    let column_bands = (n / MIN_BAND).clamp(1, MAX_BANDS);
    let by_columns = column_bands > 1;
    let bands = match (by_columns, cblas.is_some()) {
        (true, _) => column_bands,
        (false, true) => (m / MIN_ROWS).clamp(1, MAX_BANDS),
        (false, false) => 1,
    };
    let parallelism = if pool > 1 && bands == 1 {
        Parallelism::Rayon(pool)
    } else {
        Parallelism::None
    };
    let (band_rows, band_cols) = if by_columns {
        (m, n.div_ceil(bands))
    } else {
        (m.div_ceil(bands), n)
    };
    let dst_addr = dst.as_mut_ptr() as usize;
    let band = |b: usize| {
        // The band's first row and column and its extent.
        let (row, col) = if by_columns {
            (0, b * band_cols)
        } else {
            (b * band_rows, 0)
        };
        let (rows, cols) = (band_rows.min(m - row), band_cols.min(n - col));
        // SAFETY (both branches): the assert above keeps every index read inside the operands
        // and every index written inside `dst` (exclusively borrowed, so it aliases neither
        // operand); bands write disjoint parts of `dst`.
        let (a, b, c) = unsafe {
            (
                lhs.0.as_ptr().add(row * lhs.1),
                rhs.0.as_ptr().add(col * rhs.2),
                (dst_addr as *mut T).add(row * n + col),
            )
        };
        if let Some(((sgemm, (ta, lda)), (tb, ldb))) = cblas {
            // T is f32 (checked above), so the casts are identities; the leading dimensions
            // were checked by `cblas_operand`, and `use_cblas_sgemm`'s contract makes `sgemm` a
            // cblas_sgemm safe to call from any thread.
            unsafe {
                let beta = alpha.map_or(0.0, |a| *(&a as *const T as *const f32));
                let (a, b, c) = (a as *const f32, b as *const f32, c as *mut f32);
                let (rows, cols) = (rows as i32, cols as i32);
                sgemm(
                    ROW_MAJOR, ta, tb, rows, cols, k as i32, 1.0, a, lda, b, ldb, beta, c, n as i32,
                )
            };
        } else {
            unsafe {
                gemm(
                    rows,
                    cols,
                    k,
                    c,
                    1,
                    n as isize,
                    alpha.is_some(),
                    a,
                    lhs.2 as isize,
                    lhs.1 as isize,
                    b,
                    rhs.2 as isize,
                    rhs.1 as isize,
                    alpha.unwrap_or(T::ONE),
                    T::ONE,
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        }
    };
    if bands == 1 {
        band(0);
    } else if pool == 1 {
        // The same bands in order on this thread: the same calls, so the same bits.
        (0..bands).for_each(band);
    } else {
        rayon::scope(|s| {
            for b in 1..bands {
                s.spawn(move |_| band(b));
            }
            band(0);
        });
    }
}

/// Rows of `dst` per parallel task of [`rows_loop`].
const ROWS: usize = 1024;

/// [`matmul_into`] for `n == 1` (a dot product per row) or `k == 1` (an outer product), one
/// loop over the rows of `dst`.
fn rows_loop<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    alpha: Option<T>,
    (a, a_rs, a_cs): Operand<'_, T>,
    (b, b_rs, b_cs): Operand<'_, T>,
    threads: Threads,
) {
    let row = |i: usize, out: &mut [T]| {
        for (j, o) in out.iter_mut().enumerate() {
            let acc = if a_cs == 1 && b_rs == 1 {
                dot(&a[i * a_rs..i * a_rs + k], &b[j * b_cs..j * b_cs + k])
            } else {
                (0..k).fold(T::default(), |acc, p| {
                    acc + a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs]
                })
            };
            *o = match alpha {
                Some(alpha) => alpha * *o + acc,
                None => acc,
            };
        }
    };
    if threads == Threads::Pool && m > ROWS {
        dst.par_chunks_mut(n * ROWS)
            .enumerate()
            .for_each(|(c, part)| {
                for (r, out) in part.chunks_mut(n).enumerate() {
                    row(c * ROWS + r, out);
                }
            });
    } else {
        for (i, out) in dst.chunks_mut(n).enumerate() {
            row(i, out);
        }
    }
}

/// `sum(a[i] * b[i])` in eight interleaved partial sums, so that it vectorises (one running
/// sum cannot: float addition is not reassociated).
#[inline(always)]
pub(super) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::default(); 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .fold(T::default(), |acc, (&x, &y)| acc + x * y);
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().fold(tail, |acc, &l| acc + l)
}
