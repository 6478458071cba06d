//! Layer normalisation over the last dimension as one op, in the data's precision with
//! vectorisable row loops. Group normalisation's kernel covers it as one group per row, but
//! walks a row as that many one-element channels in f64: a tenth of a transformer step.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::dot;
use super::{Float, add_vectors, contiguous, mean_rstd, rows_per_task, same_float};
use crate::{Error, Result};

/// `(x - mean) / sqrt(var + eps) * gamma + beta` per row of `x` (`[rows, features]`).
#[derive(Clone, Copy)]
struct LayerNormOp {
    eps: f64,
}

/// `sum(a_i * b_i * c_i)` in eight lanes (one running sum does not vectorise).
#[inline(always)]
fn dot3<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    let mut lanes = [T::default(); 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .fold(T::default(), |s, ((&x, &y), &z)| s + x * y * z);
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l] * z[l];
        }
    }
    lanes.iter().fold(tail, |s, &l| s + l)
}

fn forward<T: Float>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    let n = gamma.len();
    let eps = T::from_f64(eps);
    let mut out = vec![T::default(); x.len()];
    let per_task = n * rows_per_task(n);
    out.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task))
        .for_each(|(ys, xs)| {
            wide!({
                for (y, row) in ys.chunks_mut(n).zip(xs.chunks(n)) {
                    let (mean, rstd) = mean_rstd(row, eps);
                    for (((y, &v), &g), &b) in y.iter_mut().zip(row).zip(gamma).zip(beta) {
                        *y = (v - mean) * rstd * g + b;
                    }
                }
            })
        });
    out
}

/// `[dx, dgamma, dbeta]` packed: `dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat *
/// xhat))` with `dxhat = dy * gamma`; each task sums `dgamma`, `dbeta` over its rows.
fn backward<T: Float>(x: &[T], gamma: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let n = gamma.len();
    let (eps, count) = (T::from_f64(eps), T::from_f64(n as f64));
    let mut out = vec![T::default(); x.len() + 2 * n];
    let (dx, params) = out.split_at_mut(x.len());
    let per_task = n * rows_per_task(n);
    let start = || vec![T::default(); 2 * n];
    // Fixed tasks whose partial sums are added in task order: the same result however the
    // pool schedules them.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task).zip(dy.par_chunks(per_task)))
        .map(|(dxs, (xs, dys))| {
            let mut acc = start();
            let (dgamma, dbeta) = acc.split_at_mut(n);
            wide!({
                for ((dx, row), d) in dxs.chunks_mut(n).zip(xs.chunks(n)).zip(dys.chunks(n)) {
                    let (mean, rstd) = mean_rstd(row, eps);
                    // dx holds xhat, then the result. Loops without a running sum, and the
                    // sums in lanes: they vectorise.
                    let params = dgamma.iter_mut().zip(dbeta.iter_mut());
                    for (((xh, &v), &d), (dg, db)) in dx.iter_mut().zip(row).zip(d).zip(params) {
                        *xh = (v - mean) * rstd;
                        *dg += d * *xh;
                        *db += d;
                    }
                    let m1 = dot(d, gamma) / count;
                    let m2 = dot3(d, gamma, dx) / count;
                    for ((xh, &d), &g) in dx.iter_mut().zip(d).zip(gamma) {
                        *xh = rstd * (d * g - m1 - *xh * m2);
                    }
                }
            });
            acc
        })
        .collect();
    let sums = partials.into_iter().fold(start(), add_vectors);
    params.copy_from_slice(&sums);
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let out = on_slices!(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, g, b| forward(x, g, b, self.eps)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &LayerNormGrad(*self))?;
        let (len, n) = (x.elem_count(), gamma.elem_count());
        Ok((
            Some(packed.narrow(0, 0, len)?.reshape(x.shape())?),
            Some(packed.narrow(0, len, n)?.reshape(gamma.shape())?),
            Some(packed.narrow(0, len + n, n)?.reshape(gamma.shape())?),
        ))
    }
}

/// The backward pass of [`LayerNormOp`] on `(x, gamma, dy)`: `dx`, `dgamma`, `dbeta` packed.
struct LayerNormGrad(LayerNormOp);

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
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
        if l1.shape() != l3.shape() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l3.shape());
        }
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, g, d| {
            backward(x, g, d, self.0.eps)
        });
        let len = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// Layer normalisation (Ba et al. 2016) of `x` over its last dimension, then `* gamma + beta`
/// (each as long as that dimension), with biased variance as PyTorch's `LayerNorm`; one pass
/// each way in the data's precision (f32 or f64).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let features = x.dims().last().copied().unwrap_or(0);
    if features == 0 || gamma.dims() != [features] || beta.dims() != [features] {
        return Err(Error::Invalid(format!(
            "layer_norm: gamma {:?} and beta {:?} do not fit {:?} (normalised over the last dimension)",
            gamma.dims(),
            beta.dims(),
            x.dims()
        )));
    }
    same_float("layer_norm", &[x, gamma, beta])?;
    Ok(x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::group_norm;
    use crate::kernels::tests::{assert_finite_differences, assert_same, seq};
    use crate::testing::max_abs_difference;
    use candle_core::{D, DType};

    /// The composed form: mean, biased variance, normalise, scale, shift.
    fn composed(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let xhat = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok(xhat.broadcast_mul(gamma)?.broadcast_add(beta)?)
    }

    #[test]
    fn layer_norm_equals_the_composed_form_and_finite_differences() -> Result<()> {
        // 20 features: two vector lanes and a tail; rank 3 as a transformer's.
        let inputs = [seq(&[3, 5, 20], 2.0)?, seq(&[20], 1.5)?, seq(&[20], 0.5)?];
        assert_same(
            &|x: &[Tensor]| layer_norm(&x[0], &x[1], &x[2], 1e-5),
            &|x: &[Tensor]| composed(&x[0], &x[1], &x[2], 1e-5),
            &inputs,
            "layer norm",
        )?;
        let w = seq(&[3, 5, 20], 0.9)?;
        assert_finite_differences(
            &|x: &[Tensor]| Ok((layer_norm(&x[0], &x[1], &x[2], 1e-5)? * &w)?.sum_all()?),
            &inputs,
            "layer norm",
        )
    }

    #[test]
    fn layer_norm_in_f32_matches_one_group_norm_in_f64() -> Result<()> {
        let (x, g, b) = (seq(&[64, 128], 3.0)?, seq(&[128], 1.0)?, seq(&[128], 0.3)?);
        let exact = group_norm(&x, &g, &b, 1, 1e-12)?;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let ours = layer_norm(&f32s(&x)?, &f32s(&g)?, &f32s(&b)?, 1e-12)?;
        assert!(max_abs_difference(&ours.to_dtype(DType::F64)?, &exact)? < 1e-5);
        Ok(())
    }

    #[test]
    fn layer_norm_refuses_parameters_of_another_width() -> Result<()> {
        let x = seq(&[2, 4], 1.0)?;
        assert!(layer_norm(&x, &seq(&[3], 1.0)?, &seq(&[4], 1.0)?, 1e-5).is_err());
        Ok(())
    }
}
