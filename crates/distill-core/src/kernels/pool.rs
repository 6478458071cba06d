//! Max pooling over `k x k` windows with stride `k` as one op. candle's `max_pool2d` backward
//! upsamples the result, compares it with the input and divides by the count of maxima: several
//! full-size tensors per pool; here the backward pass finds each window's maximum again and
//! routes the gradient to it (the first one on ties, as PyTorch does).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Real, contiguous};
use crate::{Error, Result};

/// `k x k` max pooling with stride `k` of `[b, c, h, w]` (a partial last window is dropped).
#[derive(Clone, Copy)]
struct MaxPool {
    k: usize,
}

impl MaxPool {
    /// `(h, w, oh, ow)` of an input shape.
    fn dims(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (_, _, h, w) = shape.dims4()?;
        if self.k == 0 || h < self.k || w < self.k {
            candle_core::bail!("max_pool: a {0}x{0} window does not fit {shape:?}", self.k);
        }
        Ok((h, w, h / self.k, w / self.k))
    }

    /// Calls `f(output index, input index of the window's first maximum)` for every window of
    /// one plane `x` (`h x w`).
    fn each_max<T: Real + PartialOrd>(
        &self,
        x: &[T],
        (w, oh, ow): (usize, usize, usize),
        mut f: impl FnMut(usize, usize),
    ) {
        let k = self.k;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = (oy * k) * w + ox * k;
                for i in 0..k {
                    for j in 0..k {
                        let at = (oy * k + i) * w + ox * k + j;
                        if x[at] > x[best] {
                            best = at;
                        }
                    }
                }
                f(oy * ow + ox, best);
            }
        }
    }

    fn forward<T: Real + PartialOrd>(
        &self,
        x: &[T],
        (h, w, oh, ow): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let mut out = vec![T::default(); x.len() / (h * w) * oh * ow];
        let k = self.k;
        // Row by row, each window offset a pass over the output row: loops that vectorise
        // (`each_max` finds the index too, which only the backward pass needs).
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .with_min_len(8)
            .for_each(|(o, plane)| {
                wide!({
                    for (oy, o_row) in o.chunks_mut(ow).enumerate() {
                        for i in 0..k {
                            let row = &plane[(oy * k + i) * w..][..ow * k];
                            for j in 0..k {
                                let values = o_row
                                    .iter_mut()
                                    .enumerate()
                                    .map(|(ox, m)| (m, row[ox * k + j]));
                                if i == 0 && j == 0 {
                                    values.for_each(|(m, v)| *m = v);
                                } else {
                                    values.for_each(|(m, v)| *m = if v > *m { v } else { *m });
                                }
                            }
                        }
                    }
                })
            });
        out
    }

    fn backward<T: Real + PartialOrd>(
        &self,
        x: &[T],
        g: &[T],
        (h, w, oh, ow): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let mut dx = vec![T::default(); x.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(g.par_chunks(oh * ow)))
            .with_min_len(8)
            .for_each(|(d, (plane, gp))| {
                self.each_max(plane, (w, oh, ow), |oi, xi| d[xi] += gp[oi])
            });
        dx
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l.shape())?;
        let out = on_one!(self.name(), (s, l), |x| self.forward(x, d));
        let (b, c, _, _) = l.shape().dims4()?;
        Ok((out, Shape::from((b, c, d.2, d.3))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &MaxPoolGrad(*self),
        )?))
    }
}

/// The backward pass of [`MaxPool`] on `(x, dy)`.
struct MaxPoolGrad(MaxPool);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.0.dims(l1.shape())?;
        let (b, c, _, _) = l1.shape().dims4()?;
        if l2.shape().dims() != [b, c, d.2, d.3] {
            candle_core::bail!("{}: gradient {:?} does not fit", self.name(), l2.shape());
        }
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |x, g| self
            .0
            .backward(x, g, d,));
        Ok((out, l1.shape().clone()))
    }
}

/// Max pooling of `x` (`[b, c, h, w]`, f32 or f64) over `k x k` windows with stride `k`, as
/// candle's `max_pool2d(k)`, with a one-pass backward.
pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    if x.rank() != 4 || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Err(Error::Invalid(format!(
            "max_pool2d needs [b, c, h, w] f32 or f64, got {:?} {:?}",
            x.dims(),
            x.dtype()
        )));
    }
    Ok(x.contiguous()?.apply_op1(MaxPool { k })?)
}
