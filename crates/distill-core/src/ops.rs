//! Tensor operations with a real backward pass, for models and strategies.
//!
//! candle-nn's `ops::softmax_last_dim`, `ops::layer_norm` (and so `candle_nn::LayerNorm` on
//! contiguous input) have no backward: gradients silently stop there (DESIGN.md, "candle traps").
//! These composed forms are differentiable everywhere; use them instead.

use candle_core::shape::Dim;
use candle_core::{D, DType, Tensor};

use crate::{Batch, Result};

/// `log(softmax(x))` along `dim`, computed stably (the max is subtracted and detached; the result
/// and its gradient do not depend on it).
pub fn log_softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(dim)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// `softmax(x)` along `dim`, differentiable: over the last dimension one fused op
/// ([`crate::kernels::softmax_last`]), elsewhere the composed stable form.
pub fn softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    if x.rank() > 0
        && dim.to_index(x.shape(), "softmax")? == x.rank() - 1
        && matches!(x.dtype(), DType::F32 | DType::F64)
    {
        return crate::kernels::softmax_last(x);
    }
    Ok(log_softmax(x, dim)?.exp()?)
}

/// Mean cross-entropy of `logits` (`[batch, classes]`) against class ids `targets` (`[batch]`):
/// one fused op ([`crate::kernels::cross_entropy`]).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    crate::kernels::cross_entropy(logits, targets)
}

/// `log(sigmoid(x))`, computed stably as `min(x, 0) - log(1 + exp(-|x|))`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? - x)?.neg()?.sub(&soft)?)
}

/// The labelled entries of ranking relevance `targets` as 1.0, the [`UNLABELLED`] ones as 0.0,
/// in `dtype`.
///
/// [`UNLABELLED`]: crate::data::UNLABELLED
pub fn labelled(targets: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(targets.ge(0.0)?.to_dtype(dtype)?)
}

/// The flattened positions (u32) of the entries of relevance `targets` that are labelled (not
/// [`UNLABELLED`]): a ranking loss reads a positive and its sampled negatives among every item's
/// score, so it computes on these few (`flatten_all` + `index_select`) instead of masking a loss
/// over all of them.
///
/// [`UNLABELLED`]: crate::data::UNLABELLED
pub fn labelled_positions(targets: &Tensor) -> Result<Tensor> {
    let flags = targets.ge(0.0)?.flatten_all()?.to_vec1::<u8>()?;
    let picked: Vec<u32> = (0u32..)
        .zip(&flags)
        .filter(|(_, f)| **f != 0)
        .map(|(i, _)| i)
        .collect();
    Ok(Tensor::new(picked, targets.device())?)
}

/// Mean of the vector `values` (0 when it is empty).
pub fn mean_or_zero(values: &Tensor) -> Result<Tensor> {
    let n = values.elem_count().max(1) as f64;
    Ok((values.sum_all()? / n)?)
}

/// Binary cross-entropy of `logits` against relevance `targets` of the same shape (1 relevant, 0
/// not; soft values between work too), averaged over the labelled entries: what NCF minimises
/// over each positive and its sampled negatives.
pub fn binary_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let at = labelled_positions(targets)?;
    let logits = logits.flatten_all()?.index_select(&at, 0)?;
    let y = targets.flatten_all()?.index_select(&at, 0)?;
    let y = y.to_dtype(logits.dtype())?.clamp(0.0, 1.0)?;
    let pos = log_sigmoid(&logits)?;
    let neg = log_sigmoid(&logits.neg()?)?;
    let ll = ((&y * pos)? + ((1.0 - &y)? * neg)?)?;
    mean_or_zero(&ll.neg()?)
}

/// The loss on a batch's labels: [`soft_cross_entropy`] when the batch carries class
/// probabilities (mixup, CutMix), [`cross_entropy`] for class ids (`targets` one rank below
/// `logits`, classification), [`binary_cross_entropy`] for relevance (`targets` the logits'
/// shape, ranking).
pub fn label_loss(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    if let Some(probs) = &batch.soft_targets {
        soft_cross_entropy(logits, probs)
    } else if is_relevance(logits, &batch.targets) {
        binary_cross_entropy(logits, &batch.targets)
    } else {
        cross_entropy(logits, &batch.targets)
    }
}

/// Mean cross-entropy of `logits` (`[batch, classes]`) against class probabilities `probs` of
/// the same shape: `mean_b(-sum_c p_bc log softmax(z_b)_c)`, PyTorch's `F.cross_entropy` with
/// probability targets. Equal to [`cross_entropy`] for one-hot `probs`.
pub fn soft_cross_entropy(logits: &Tensor, probs: &Tensor) -> Result<Tensor> {
    if probs.dims() != logits.dims() {
        return Err(crate::Error::Invalid(format!(
            "class probabilities {:?} do not match logits {:?}",
            probs.dims(),
            logits.dims()
        )));
    }
    let log_p = log_softmax(logits, D::Minus1)?;
    let picked = (log_p * probs.to_dtype(logits.dtype())?)?.sum(D::Minus1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Whether `targets` are ranking relevance (the logits' shape) rather than class ids.
pub fn is_relevance(logits: &Tensor, targets: &Tensor) -> bool {
    targets.dims() == logits.dims()
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`,
/// with the biased variance, as PyTorch's `LayerNorm`.
/// One fused kernel ([`crate::kernels::layer_norm`]).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    crate::kernels::layer_norm(x, gamma, beta, eps)
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
    fn log_sigmoid_matches_closed_form_and_finite_differences() -> Result<()> {
        let values = [-800.0f64, -3.0, -0.5, 0.0, 0.5, 3.0, 800.0];
        let x = Tensor::new(&values, &Device::Cpu)?;
        let got = log_sigmoid(&x)?.to_vec1::<f64>()?;
        for (v, g) in values.iter().zip(&got) {
            // log(sigmoid(v)) = -log(1 + exp(-v)); for v = -800 that is v itself to f64 precision.
            let want = if *v < -700.0 {
                *v
            } else {
                -(1.0 + (-v).exp()).ln()
            };
            assert!(
                (g - want).abs() < 1e-12,
                "log_sigmoid({v}) = {g}, want {want}"
            );
        }
        let probe = Tensor::new(&[-3.0f64, -0.5, 0.3, 2.0], &Device::Cpu)?;
        let var = candle_core::Var::from_tensor(&probe)?;
        let grads = log_sigmoid(var.as_tensor())?.sum_all()?.backward()?;
        let analytic = grads
            .get(var.as_tensor())
            .ok_or_else(|| crate::Error::Invalid("no gradient".into()))?
            .clone();
        let numeric = crate::testing::central_differences(
            |t| Ok(log_sigmoid(t)?.sum_all()?.to_scalar::<f64>()?),
            &probe,
            1e-6,
        )?;
        assert!(crate::testing::max_abs_difference(&analytic, &numeric)? < 1e-8);
        Ok(())
    }

    #[test]
    fn binary_cross_entropy_averages_over_labelled_entries_only() -> Result<()> {
        let x = Tensor::new(&[[2.0f64, -1.0, 5.0], [0.0, 0.5, 1.0]], &Device::Cpu)?;
        let y = Tensor::new(&[[1.0f32, 0.0, -1.0], [-1.0, 1.0, 0.0]], &Device::Cpu)?;
        let batch = Batch {
            inputs: Default::default(),
            targets: y,
            soft_targets: None,
            indices: Tensor::new(&[0u32, 1], &Device::Cpu)?,
        };
        let got = label_loss(&x, &batch)?.to_scalar::<f64>()?;
        // -log(sigmoid(2)), -log(1 - sigmoid(-1)), -log(sigmoid(0.5)), -log(1 - sigmoid(1)).
        let sp = |v: f64| (1.0 + v.exp()).ln();
        let want = (sp(-2.0) + sp(-1.0) + sp(-0.5) + sp(1.0)) / 4.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn soft_targets_take_the_label_loss_and_one_hot_ones_equal_class_ids() -> Result<()> {
        let x = Tensor::new(&[[2.0f64, -1.0, 0.5], [0.0, 0.5, 1.0]], &Device::Cpu)?;
        let ids = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        let mut batch = Batch {
            inputs: Default::default(),
            targets: ids.clone(),
            soft_targets: Some(Tensor::new(
                &[[0.7f32, 0.3, 0.0], [0.0, 0.0, 1.0]],
                &Device::Cpu,
            )?),
            indices: Tensor::new(&[0u32, 1], &Device::Cpu)?,
        };
        let got = label_loss(&x, &batch)?.to_scalar::<f64>()?;
        // Row 1: -(0.7 log p0 + 0.3 log p1); row 2: -log p2; log p_c = z_c - log sum exp z.
        let lse = |z: [f64; 3]| z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let (l1, l2) = (lse([2.0, -1.0, 0.5]), lse([0.0, 0.5, 1.0]));
        let want = (-(0.7 * (2.0 - l1) + 0.3 * (-1.0 - l1)) - (1.0 - l2)) / 2.0;
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        batch.soft_targets = Some(Tensor::new(
            &[[1.0f32, 0.0, 0.0], [0.0, 0.0, 1.0]],
            &Device::Cpu,
        )?);
        let one_hot = label_loss(&x, &batch)?.to_scalar::<f64>()?;
        let hard = cross_entropy(&x, &ids)?.to_scalar::<f64>()?;
        assert!((one_hot - hard).abs() < 1e-12);
        batch.soft_targets = Some(Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu)?);
        assert!(label_loss(&x, &batch).is_err());
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
