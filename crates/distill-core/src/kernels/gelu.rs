//! GELU with the exact (erf) form, `x * Phi(x)`, as one op: candle's `gelu_erf` computes its
//! forward pass with libm's `erff` per element on one thread and composes its backward pass
//! from eight more element-wise tensors.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{CHUNK, Float, contiguous, same_float};
use crate::Result;

/// `x * Phi(x)`, `Phi` the standard normal distribution function.
struct Gelu;

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn forward<T: Float>(x: &[T]) -> Vec<T> {
    let (half, r) = (T::from_f64(0.5), T::from_f64(FRAC_1_SQRT_2));
    let mut out = x.to_vec();
    out.par_chunks_mut(CHUNK).for_each(|part| {
        wide!({
            part.iter_mut()
                .for_each(|v| *v = half * *v * (T::ONE + (*v * r).erf()))
        })
    });
    out
}

/// `dy * (Phi(x) + x * phi(x))`, `phi` the standard normal density.
fn backward<T: Float>(g: &[T], x: &[T]) -> Vec<T> {
    let (half, r, c) = (
        T::from_f64(0.5),
        T::from_f64(FRAC_1_SQRT_2),
        T::from_f64(FRAC_1_SQRT_2PI),
    );
    let mut out = g.to_vec();
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(part, xs)| {
            wide!({
                part.iter_mut().zip(xs).for_each(|(d, &x)| {
                    let cdf = half * (T::ONE + (x * r).erf());
                    let pdf = c * (-(half * x * x)).exp();
                    *d *= cdf + x * pdf;
                })
            })
        });
    out
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = on_one!(self.name(), (s, l), forward);
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(x, &GeluGrad)?))
    }
}

/// The backward pass of [`Gelu`] on `(dy, x)`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-backward"
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
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), backward);
        Ok((out, l1.shape().clone()))
    }
}

/// GELU, `x * Phi(x)` with the exact normal distribution function (PyTorch's default, BERT's
/// `gelu`), f32 or f64, one parallel pass each way. In f32 `erf` is a polynomial to 1.5e-7.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    same_float("gelu_erf", &[x])?;
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{assert_finite_differences, seq};
    use crate::testing::max_abs_difference;
    use candle_core::{DType, Device};

    #[test]
    fn gelu_equals_candle_gelu_erf_and_finite_differences() -> Result<()> {
        // Values against candle's; gradients against finite differences only: candle's backward
        // rounds 1/sqrt(2 pi) to 0.398942, 1e-6 relative off.
        // -3 to 3; a plain sum keeps every gradient well above finite differences' noise.
        let x = seq(&[7, 13], 3.0)?;
        assert!(max_abs_difference(&gelu_erf(&x)?, &x.gelu_erf()?)? < 1e-12);
        assert_finite_differences(
            &|x: &[Tensor]| Ok(gelu_erf(&x[0])?.sum_all()?),
            &[x],
            "gelu",
        )
    }

    #[test]
    fn gelu_in_f32_is_within_its_erf_bound() -> Result<()> {
        // -9 to 9: both tails and the middle, where erf changes fastest.
        let x = Tensor::arange(-9000f64, 9000.0, &Device::Cpu)?.affine(1e-3, 0.0)?;
        let exact = x.gelu_erf()?;
        let ours = gelu_erf(&x.to_dtype(DType::F32)?)?.to_dtype(DType::F64)?;
        // |x| / 2 * 1.5e-7 from erf, plus f32 rounding of values up to 9.
        assert!(max_abs_difference(&ours, &exact)? < 2e-6);
        let grad = |x: &Tensor| -> Result<Tensor> {
            let v = candle_core::Var::from_tensor(x)?;
            let g = gelu_erf(v.as_tensor())?.sum_all()?.backward()?;
            let g = g
                .get(v.as_tensor())
                .ok_or_else(|| crate::Error::Invalid("no gradient".into()))?;
            Ok(g.to_dtype(DType::F64)?)
        };
        let (g32, g64) = (grad(&x.to_dtype(DType::F32)?)?, grad(&x)?);
        assert!(max_abs_difference(&g32, &g64)? < 2e-6);
        Ok(())
    }
}
