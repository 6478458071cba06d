//! Softmax over the last dimension as one op: one pass per row forward, and a backward pass
//! `dx = y * (dy - sum(dy * y))` from the result, where the composed form (max, subtract, exp,
//! sum, log, subtract, exp) makes seven full-size tensors forward and more backward; attention
//! probabilities are the largest tensors of a transformer step.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::dot;
use super::{Float, contiguous, lane_max, lane_sum, rows_per_task};
use crate::{Error, Result};

/// `softmax` along the last dimension.
struct Softmax;

fn forward<T: Float>(x: &[T], n: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(n * rows_per_task(n))
        .for_each(|rows| wide!(rows.chunks_mut(n).for_each(softmax_row)));
    out
}

/// `row := softmax(row)`, each loop a vectorisable one (the maximum and the sum in lanes).
#[inline(always)]
pub(super) fn softmax_row<T: Float>(row: &mut [T]) {
    let max = lane_max(row);
    row.iter_mut().for_each(|v| *v = (*v - max).exp());
    let inv = T::ONE / lane_sum(row, |v| v);
    row.iter_mut().for_each(|v| *v *= inv);
}

fn backward<T: Float>(g: &[T], y: &[T], n: usize) -> Vec<T> {
    let mut out = g.to_vec();
    let per_task = n * rows_per_task(n);
    out.par_chunks_mut(per_task)
        .zip(y.par_chunks(per_task))
        .for_each(|(rows, ys)| {
            wide!({
                for (row, yr) in rows.chunks_mut(n).zip(ys.chunks(n)) {
                    let dot = dot(row, yr);
                    row.iter_mut()
                        .zip(yr)
                        .for_each(|(d, &y)| *d = y * (*d - dot));
                }
            })
        });
    out
}

/// The length of the last dimension of `shape` (1 for a scalar).
fn last(shape: &Shape) -> usize {
    shape.dims().last().copied().unwrap_or(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = last(l.shape());
        let out = on_one!(self.name(), (s, l), |x| forward(x, n));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op2_no_bwd(res, &SoftmaxGrad)?,
        ))
    }
}

/// The backward pass of [`Softmax`] on `(dy, y)`.
pub(super) struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l2.shape());
        }
        let n = last(l1.shape());
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |g, y| backward(g, y, n));
        Ok((out, l1.shape().clone()))
    }
}

/// `softmax(x)` along the last dimension (f32 or f64) in one pass, with a one-pass backward.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::F64) || x.rank() == 0 {
        return Err(Error::Invalid(format!(
            "softmax_last needs f32 or f64 of rank >= 1, got {:?} {:?}",
            x.dtype(),
            x.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}
