//! Tensor operations with a real backward pass, for models and strategies.
//!
//! candle-nn's `ops::softmax_last_dim`, `ops::layer_norm` (and so `candle_nn::LayerNorm` on
//! contiguous input) have no backward: gradients silently stop there (DESIGN.md, "candle traps").
//! These composed forms are differentiable everywhere; use them instead.

use candle_core::{D, DType, Tensor};

use crate::Result;

/// `log(softmax(x))` along `dim`, computed stably (the max is subtracted and detached; the result
/// and its gradient do not depend on it).
pub fn log_softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(dim)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// `softmax(x)` along `dim`, differentiable.
pub fn softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    Ok(log_softmax(x, dim)?.exp()?)
}

/// Mean cross-entropy of `logits` (`[batch, classes]`) against class ids `targets` (`[batch]`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_p = log_softmax(logits, D::Minus1)?;
    let idx = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let picked = log_p.gather(&idx, 1)?.squeeze(1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`,
/// with the biased variance, as PyTorch's `LayerNorm`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// The L2 norm along `dim` (kept as a size-1 dimension), never below `floor`: `sqrt(max(sum x^2,
/// floor^2))`. Unlike `x.sqr().sum().sqrt()` it has a finite gradient at `x = 0`: there `sqrt`'s
/// derivative is infinite, and an upstream gradient of 0 times it is NaN, which silently poisons
/// the weights (a ReLU then maps the NaN to 0 and the loss stays finite).
pub fn l2_norm(x: &Tensor, dim: D, floor: f64) -> Result<Tensor> {
    Ok(x.sqr()?
        .sum_keepdim(dim)?
        .clamp(floor * floor, f64::MAX)?
        .sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn l2_norm_has_a_finite_gradient_at_zero() -> Result<()> {
        let x = candle_core::Var::new(&[[0.0f64, 0.0], [3.0, 4.0]], &Device::Cpu)?;
        let n = l2_norm(x.as_tensor(), D::Minus1, 1e-12)?;
        let values = n.flatten_all()?.to_vec1::<f64>()?;
        assert!((values[0] - 1e-12).abs() < 1e-24 && (values[1] - 5.0).abs() < 1e-12);
        let grads = x.as_tensor().broadcast_div(&n)?.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .map(|g| g.flatten_all()?.to_vec1::<f64>());
        let g = g.transpose()?.unwrap_or_default();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        Ok(())
    }

    #[test]
    fn log_softmax_matches_closed_form() -> Result<()> {
        let x = Tensor::new(
            &[[1.0f64, 2.0, 3.0], [1000.0, 1000.0, 1000.0]],
            &Device::Cpu,
        )?;
        let got = log_softmax(&x, D::Minus1)?.to_vec2::<f64>()?;
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (j, v) in [1.0f64, 2.0, 3.0].iter().enumerate() {
            assert!((got[0][j] - (v - z.ln())).abs() < 1e-12);
            assert!((got[1][j] + 3f64.ln()).abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_hand_value() -> Result<()> {
        let x = Tensor::new(&[[0.0f64, 0.0], [2.0, 0.0]], &Device::Cpu)?;
        let y = Tensor::new(&[1u32, 0], &Device::Cpu)?;
        let ce = cross_entropy(&x, &y)?.to_scalar::<f64>()?;
        let expected = (2f64.ln() + (1.0 + (-2f64).exp()).ln()) / 2.0;
        assert!((ce - expected).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn layer_norm_matches_hand_value() -> Result<()> {
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0]], &Device::Cpu)?;
        let g = Tensor::new(&[1.0f64, 1.0, 2.0, 2.0], &Device::Cpu)?;
        let b = Tensor::new(&[0.0f64, 0.0, 0.0, 1.0], &Device::Cpu)?;
        let y = layer_norm(&x, &g, &b, 0.0)?.to_vec2::<f64>()?;
        let s = 1.25f64.sqrt();
        let want = [-1.5 / s, -0.5 / s, 2.0 * 0.5 / s, 2.0 * 1.5 / s + 1.0];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
        Ok(())
    }
}
