//! Every pair of a row of `p` (`[b, d]`, users) and a row of `q` (`[n, d]`, items) combined
//! element-wise into `[b, n, d]`: the GMF product and the first layer of an MLP tower over all
//! items. candle's broadcast ops walk such a result with a strided index on its element-wise
//! pool and reduce the gradients element by element; here one loop per row, on rayon.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Combine, Real, contiguous, same_float};
use crate::{Error, Result};

/// `(p [b, d], q [n, d])` -> `[b, n, d]`, `p[i] + q[j]` or `p[i] * q[j]`.
#[derive(Clone, Copy)]
struct Pairwise(Combine);

/// Rows of `p` or `q` per parallel task.
const ROWS: usize = 4;

impl Pairwise {
    fn forward<T: Real>(&self, p: &[T], q: &[T], d: usize) -> Vec<T> {
        let n = q.len() / d;
        let mut out = vec![T::default(); p.len() * n];
        out.par_chunks_mut(n * d)
            .zip(p.par_chunks(d))
            .with_min_len(ROWS)
            .for_each(|(rows, pi)| {
                for (row, qj) in rows.chunks_mut(d).zip(q.chunks(d)) {
                    for ((o, &a), &b) in row.iter_mut().zip(pi).zip(qj) {
                        *o = match self.0 {
                            Combine::Add => a + b,
                            Combine::Mul => a * b,
                        };
                    }
                }
            });
        out
    }

    /// `dp` then `dq`, in one vector.
    fn backward<T: Real>(&self, p: &[T], q: &[T], g: &[T], d: usize) -> Vec<T> {
        let n = q.len() / d;
        let mut out = vec![T::default(); p.len() + q.len()];
        let (dp, dq) = out.split_at_mut(p.len());
        // The factor the other side contributes: 1 for a sum.
        let weight = |other: &[T], k: usize| match self.0 {
            Combine::Add => T::ONE,
            Combine::Mul => other[k],
        };
        dp.par_chunks_mut(d)
            .zip(g.par_chunks(n * d))
            .with_min_len(ROWS)
            .for_each(|(dpi, gi)| {
                for (gij, qj) in gi.chunks(d).zip(q.chunks(d)) {
                    for k in 0..d {
                        dpi[k] += gij[k] * weight(qj, k);
                    }
                }
            });
        dq.par_chunks_mut(d)
            .enumerate()
            .with_min_len(ROWS)
            .for_each(|(j, dqj)| {
                for (i, pi) in p.chunks(d).enumerate() {
                    let gij = &g[(i * n + j) * d..(i * n + j + 1) * d];
                    for k in 0..d {
                        dqj[k] += gij[k] * weight(pi, k);
                    }
                }
            });
        out
    }
}

/// The row width `d` shared by `p` and `q`, checked.
fn width(p: &Shape, q: &Shape) -> candle_core::Result<usize> {
    let ((_, d), (_, dq)) = (p.dims2()?, q.dims2()?);
    if d != dq {
        candle_core::bail!("pairwise: rows of {p:?} and {q:?} differ in width");
    }
    Ok(d)
}

impl CustomOp2 for Pairwise {
    fn name(&self) -> &'static str {
        match self.0 {
            Combine::Add => "pairwise-add",
            Combine::Mul => "pairwise-mul",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = width(l1.shape(), l2.shape())?;
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |p, q| self
            .forward(p, q, d,));
        let (b, n) = (l1.shape().dims()[0], l2.shape().dims()[0]);
        Ok((out, Shape::from((b, n, d))))
    }

    fn bwd(
        &self,
        p: &Tensor,
        q: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = p.apply_op3_no_bwd(q, &grad.contiguous()?, &PairwiseGrad(*self))?;
        Ok((
            Some(packed.narrow(0, 0, p.elem_count())?.reshape(p.shape())?),
            Some(
                packed
                    .narrow(0, p.elem_count(), q.elem_count())?
                    .reshape(q.shape())?,
            ),
        ))
    }
}

/// The backward pass of [`Pairwise`] on `(p, q, dy)`: `dp` and `dq` packed into one vector.
struct PairwiseGrad(Pairwise);

impl CustomOp3 for PairwiseGrad {
    fn name(&self) -> &'static str {
        "pairwise-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = width(l1.shape(), l2.shape())?;
        let (b, n) = (l1.shape().dims()[0], l2.shape().dims()[0]);
        if l3.shape().dims() != [b, n, d] {
            candle_core::bail!("{}: gradient {:?} does not fit", self.name(), l3.shape());
        }
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |p, q, g| self
            .0
            .backward(p, q, g, d));
        Ok((out, Shape::from((b + n) * d)))
    }
}

fn pairwise(p: &Tensor, q: &Tensor, combine: Combine) -> Result<Tensor> {
    let (_, d) = p.dims2()?;
    let (_, dq) = q.dims2()?;
    if d != dq {
        return Err(Error::Invalid(format!(
            "pairwise ops need [b, d] and [n, d], got {:?} and {:?}",
            p.dims(),
            q.dims()
        )));
    }
    same_float("pairwise ops", &[p, q])?;
    Ok(p.contiguous()?
        .apply_op2(&q.contiguous()?, Pairwise(combine))?)
}

/// `p[i] + q[j]` for every row `i` of `p` (`[b, d]`) and `j` of `q` (`[n, d]`): `[b, n, d]`,
/// as `p.unsqueeze(1).broadcast_add(q.unsqueeze(0))`, with a one-pass backward.
pub fn pairwise_add(p: &Tensor, q: &Tensor) -> Result<Tensor> {
    pairwise(p, q, Combine::Add)
}

/// `p[i] * q[j]` (element-wise) for every row `i` of `p` (`[b, d]`) and `j` of `q` (`[n, d]`):
/// `[b, n, d]`, as `p.unsqueeze(1).broadcast_mul(q.unsqueeze(0))`, with a one-pass backward.
pub fn pairwise_mul(p: &Tensor, q: &Tensor) -> Result<Tensor> {
    pairwise(p, q, Combine::Mul)
}
