//! Matrix products on slices through the `gemm` crate, with the threads divided our way: for
//! the products of small models (128 rows, a few hundred columns) gemm's own rayon split
//! reaches 60-100 GFLOP/s on two Zen 5 cores, one single-threaded product per thread on its
//! own band of output columns 105-113 (`cargo xtask bench` step figures in the closing note).
//! Products with one output column or an inner dimension of 1 (a score layer, its gradient)
//! run as plain row loops: gemm takes 15 ms for `[256000, 32] x [32, 1]`, the loop 1.4.

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

/// Output columns per thread below which a product is left to gemm's own split.
const MIN_BAND: usize = 128;

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
    if n == 1 || k == 1 {
        return rows_loop((m, n, k), &mut dst[..m * n], alpha, lhs, rhs, threads);
    }
    let pool = rayon::current_num_threads();
    let bands = if threads == Threads::Pool && pool > 1 && n >= MIN_BAND * pool {
        pool
    } else {
        1
    };
    let parallelism = match threads {
        Threads::Pool if bands == 1 && pool > 1 => Parallelism::Rayon(pool),
        _ => Parallelism::None,
    };
    let width = n.div_ceil(bands);
    let dst_addr = dst.as_mut_ptr() as usize;
    let band = |b: usize| {
        let (first, cols) = (b * width, width.min(n - b * width));
        // SAFETY: the assert above keeps every index gemm reads inside the operands and every
        // index it writes inside `dst` (exclusively borrowed, so it aliases neither operand);
        // bands write disjoint columns of `dst`.
        unsafe {
            gemm(
                m,
                cols,
                k,
                (dst_addr as *mut T).add(first),
                1,
                n as isize,
                alpha.is_some(),
                lhs.0.as_ptr(),
                lhs.2 as isize,
                lhs.1 as isize,
                rhs.0.as_ptr().add(first * rhs.2),
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
    };
    if bands == 1 {
        band(0);
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
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
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
