//! Custom ops with their own backward pass, where candle's composed form is slow.
//!
//! candle's backward of a broadcast (`broadcast_add(bias)`, `broadcast_mul(scale)`) sums the
//! gradient over the broadcast dimensions; for any dimensions but the trailing ones its CPU
//! reduction walks every element with a division per dimension, on one thread. A bias on
//! `[rows, features]` or on the channels of `[batch, c, h, w]` is reduced over leading
//! dimensions, so every linear layer, convolution and normalisation paid for it (DESIGN.md,
//! "candle traps"). These ops compute the same forward values and reduce their gradients over
//! trailing dimensions and with a matrix product instead. Each is tested against the composed
//! candle ops (values and gradients) and against finite differences.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::{Error, Result};

/// How a per-channel vector combines with the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    Add,
    Mul,
}

/// `x` (contiguous, shape `[outer, channels, inner]` once flattened) combined with a vector of
/// `channels` values along the dimension `dim`.
struct Channel {
    combine: Combine,
    dim: usize,
}

impl Channel {
    /// `(outer, channels, inner)` of `shape` around `self.dim`.
    fn split(&self, shape: &Shape) -> (usize, usize, usize) {
        let dims = shape.dims();
        let outer = dims[..self.dim].iter().product();
        let inner = dims[self.dim + 1..].iter().product();
        (outer, dims[self.dim], inner)
    }

    fn apply<T: Copy + std::ops::Add<Output = T> + std::ops::Mul<Output = T>>(
        &self,
        x: &[T],
        v: &[T],
        inner: usize,
    ) -> Vec<T> {
        let channels = v.len();
        let mut out = x.to_vec();
        for (block, chunk) in out.chunks_mut(inner.max(1)).enumerate() {
            let c = v[block % channels];
            match self.combine {
                Combine::Add => chunk.iter_mut().for_each(|e| *e = *e + c),
                Combine::Mul => chunk.iter_mut().for_each(|e| *e = *e * c),
            }
        }
        out
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

impl CustomOp2 for Channel {
    fn name(&self) -> &'static str {
        match self.combine {
            Combine::Add => "channel-add",
            Combine::Mul => "channel-mul",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, channels, inner) = self.split(l1.shape());
        if l2.shape().elem_count() != channels {
            candle_core::bail!(
                "{}: {} values for {channels} channels",
                self.name(),
                l2.shape().elem_count()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(v)) => CpuStorage::F32(self.apply(
                contiguous(x, l1, self.name())?,
                contiguous(v, l2, self.name())?,
                inner,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(v)) => CpuStorage::F64(self.apply(
                contiguous(x, l1, self.name())?,
                contiguous(v, l2, self.name())?,
                inner,
            )),
            _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let channel = |g: &Tensor| channel_sum(g, self.dim).map_err(candle_core::Error::wrap);
        match self.combine {
            Combine::Add => Ok((Some(grad.clone()), Some(channel(&grad)?))),
            Combine::Mul => {
                let gx = grad.apply_op2_no_bwd(
                    v,
                    &Channel {
                        combine: Combine::Mul,
                        dim: self.dim,
                    },
                )?;
                let gv = channel(&(&grad * x.contiguous()?)?)?;
                Ok((Some(gx), Some(gv)))
            }
        }
    }
}

/// The sum of `g` over every dimension but `dim`: trailing dimensions with candle's fast
/// contiguous reduction, leading ones with a matrix product.
pub fn channel_sum(g: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = g.dims();
    if dim >= dims.len() {
        return Err(Error::Invalid(format!(
            "channel_sum: no dimension {dim} in {dims:?}"
        )));
    }
    let outer: usize = dims[..dim].iter().product();
    let inner: usize = dims[dim + 1..].iter().product();
    let channels = dims[dim];
    let mut per_row = g.contiguous()?.reshape((outer, channels, inner))?;
    per_row = if inner > 1 {
        per_row.sum(2)?
    } else {
        per_row.reshape((outer, channels))?
    };
    let ones = Tensor::ones((1, outer), g.dtype(), g.device())?;
    Ok(ones.matmul(&per_row)?.reshape(channels)?)
}

fn channel_op(x: &Tensor, v: &Tensor, dim: usize, combine: Combine) -> Result<Tensor> {
    let rank = x.rank();
    if dim >= rank || v.elem_count() != x.dim(dim)? {
        return Err(Error::Invalid(format!(
            "a per-channel vector of {} values does not fit dimension {dim} of {:?}",
            v.elem_count(),
            x.dims()
        )));
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != v.dtype() {
        return Err(Error::Invalid(format!(
            "per-channel ops need f32 or f64 of one dtype, got {:?} and {:?}",
            x.dtype(),
            v.dtype()
        )));
    }
    let v = v.flatten_all()?.contiguous()?;
    Ok(x.contiguous()?.apply_op2(&v, Channel { combine, dim })?)
}

/// `x + v` with `v` (one value per entry of dimension `dim`) broadcast over the other
/// dimensions: a bias. The same values and gradients as `broadcast_add`, with a fast backward.
pub fn channel_add(x: &Tensor, v: &Tensor, dim: usize) -> Result<Tensor> {
    channel_op(x, v, dim, Combine::Add)
}

/// `x * v` with `v` (one value per entry of dimension `dim`) broadcast over the other
/// dimensions: a per-channel scale. The same values and gradients as `broadcast_mul`, with a
/// fast backward.
pub fn channel_mul(x: &Tensor, v: &Tensor, dim: usize) -> Result<Tensor> {
    channel_op(x, v, dim, Combine::Mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{central_differences, max_abs_difference, max_relative_error};
    use candle_core::{Device, Var};

    fn seq(shape: &[usize], scale: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 101) as f64 / 50.0 - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// Forward values and both gradients equal the composed candle ops to 1e-12 (f64).
    #[test]
    fn channel_ops_equal_the_broadcast_ops() -> Result<()> {
        for (shape, dim) in [
            (vec![4, 3, 5, 2], 1),
            (vec![6, 7], 1),
            (vec![5, 4], 0),
            (vec![2, 3, 4], 2),
        ] {
            let x = Var::from_tensor(&seq(&shape, 1.0)?)?;
            let v = Var::from_tensor(&seq(&[shape[dim]], 0.7)?)?;
            let mut view = vec![1; shape.len()];
            view[dim] = shape[dim];
            let w = seq(&shape, 0.3)?; // weights of the scalar the gradients are of
            for combine in [Combine::Add, Combine::Mul] {
                let ours = channel_op(x.as_tensor(), v.as_tensor(), dim, combine)?;
                let vb = v.as_tensor().reshape(view.as_slice())?;
                let theirs = match combine {
                    Combine::Add => x.as_tensor().broadcast_add(&vb)?,
                    Combine::Mul => x.as_tensor().broadcast_mul(&vb)?,
                };
                assert!(max_abs_difference(&ours, &theirs)? < 1e-12);
                let g1 = (&ours * &w)?.sum_all()?.backward()?;
                let g2 = (&theirs * &w)?.sum_all()?.backward()?;
                for var in [&x, &v] {
                    let (a, b) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
                    match (a, b) {
                        (Some(a), Some(b)) => {
                            assert!(max_abs_difference(a, b)? < 1e-12, "{combine:?} {shape:?}")
                        }
                        _ => panic!("{combine:?} {shape:?}: a gradient is missing"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Gradients against central finite differences.
    #[test]
    fn channel_ops_match_finite_differences() -> Result<()> {
        let x = seq(&[3, 4, 2, 2], 1.0)?;
        let v = seq(&[4], 0.5)?;
        let w = seq(&[3, 4, 2, 2], 0.3)?;
        for combine in [Combine::Add, Combine::Mul] {
            let loss = |x: &Tensor, v: &Tensor| -> Result<Tensor> {
                let y = channel_op(x, v, 1, combine)?;
                Ok((y.sqr()? * &w)?.sum_all()?)
            };
            let (xv, vv) = (Var::from_tensor(&x)?, Var::from_tensor(&v)?);
            let grads = loss(xv.as_tensor(), vv.as_tensor())?.backward()?;
            let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_scalar::<f64>()?) };
            let fx = central_differences(|x| scalar(loss(x, &v)?), &x, 1e-6)?;
            let fv = central_differences(|v| scalar(loss(&x, v)?), &v, 1e-6)?;
            for (var, numeric) in [(&xv, fx), (&vv, fv)] {
                let analytic = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| Error::Invalid("no gradient".into()))?;
                let err = max_relative_error(analytic, &numeric, 1e-6)?;
                assert!(err < 1e-6, "{combine:?}: relative error {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_vector_that_does_not_fit_is_an_error() -> Result<()> {
        let x = seq(&[2, 3], 1.0)?;
        assert!(channel_add(&x, &seq(&[2], 1.0)?, 1).is_err());
        assert!(channel_add(&x, &seq(&[3], 1.0)?, 2).is_err());
        Ok(())
    }
}
