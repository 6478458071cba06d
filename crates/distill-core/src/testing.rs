//! Test utilities every model and strategy test uses: the gradient-coverage check (DESIGN.md,
//! "candle traps") and central finite differences.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::Result;

/// Variables with their names.
pub type NamedVars = Vec<(String, Var)>;

/// The variables of `varmap`, sorted by name.
pub fn named_vars(varmap: &VarMap) -> NamedVars {
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Splits `vars` into (trainable, frozen): frozen are those under the model's frozen name
/// prefixes and the buffers ([`crate::nn::is_buffer`]: running statistics never train).
pub fn split_frozen(vars: NamedVars, frozen_prefixes: &[String]) -> (NamedVars, NamedVars) {
    vars.into_iter().partition(|(name, _)| {
        !crate::nn::is_buffer(name) && !frozen_prefixes.iter().any(|p| name.starts_with(p.as_str()))
    })
}

/// What the gradient-coverage check found wrong, by variable name.
#[derive(Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error(
    "gradient coverage: no gradient for [{}]; all-zero gradient for [{}]; non-finite gradient for [{}]; frozen but with gradient [{}]",
    .missing.join(", "), .zero.join(", "), .non_finite.join(", "), .frozen_with_gradient.join(", ")
)]
pub struct CoverageError {
    /// Trainable variables backprop did not reach.
    pub missing: Vec<String>,
    /// Trainable variables whose gradient is all zeros.
    pub zero: Vec<String>,
    /// Trainable variables whose gradient has a NaN or infinity.
    pub non_finite: Vec<String>,
    /// Frozen tensors that got a gradient anyway.
    pub frozen_with_gradient: Vec<String>,
}

/// Checks that after one backward pass every trainable variable has a finite, not-all-zero
/// gradient and that no frozen tensor has one. Buffers ([`crate::nn::is_buffer`]) among
/// `trainable` count as frozen: they must not get a gradient.
pub fn check_gradient_coverage(
    trainable: &[(String, Var)],
    frozen: &[(String, Tensor)],
    grads: &GradStore,
) -> std::result::Result<(), CoverageError> {
    let mut report = CoverageError::default();
    for (name, var) in trainable {
        if crate::nn::is_buffer(name) {
            if grads.get(var.as_tensor()).is_some() {
                report.frozen_with_gradient.push(name.clone());
            }
            continue;
        }
        let Some(g) = grads.get(var.as_tensor()) else {
            report.missing.push(name.clone());
            continue;
        };
        match g
            .to_dtype(DType::F64)
            .and_then(|g| g.flatten_all())
            .and_then(|g| g.to_vec1::<f64>())
        {
            Ok(values) if values.iter().any(|v| !v.is_finite()) => {
                report.non_finite.push(name.clone())
            }
            Ok(values) if values.iter().all(|v| *v == 0.0) => report.zero.push(name.clone()),
            Ok(_) => {}
            Err(_) => report.non_finite.push(name.clone()),
        }
    }
    for (name, t) in frozen {
        if grads.get(t).is_some() {
            report.frozen_with_gradient.push(name.clone());
        }
    }
    if report == CoverageError::default() {
        Ok(())
    } else {
        Err(report)
    }
}

/// Central finite differences of the scalar function `f` at `x`: `(f(x+eps) - f(x-eps)) / 2eps`
/// for each element, returned in `x`'s shape as f64. Use f64 inputs for meaningful results.
pub fn central_differences(
    f: impl Fn(&Tensor) -> Result<f64>,
    x: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let base = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut probe = base.clone();
        probe[i] = base[i] + eps;
        let plus =
            f(&Tensor::from_vec(probe.clone(), x.shape(), x.device())?.to_dtype(x.dtype())?)?;
        probe[i] = base[i] - eps;
        let minus = f(&Tensor::from_vec(probe, x.shape(), x.device())?.to_dtype(x.dtype())?)?;
        out.push((plus - minus) / (2.0 * eps));
    }
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// Largest element-wise relative error `|a - b| / max(|a|, |b|, floor)`.
pub fn max_relative_error(a: &Tensor, b: &Tensor, floor: f64) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(floor))
        .fold(0.0, f64::max))
}

/// Largest element-wise absolute difference.
pub fn max_abs_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// The package folder of a running test: `CARGO_MANIFEST_DIR` as `cargo test` sets it when it
/// runs the test, else `compiled` (pass `env!("CARGO_MANIFEST_DIR")`). The compiled-in path
/// alone can name another clone that built into the same shared target folder.
pub fn manifest_dir(compiled: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(compiled),
        std::path::PathBuf::from,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use candle_core::{Device, Module};
    use candle_nn::{LayerNormConfig, VarBuilder};

    /// A two-layer MLP with a layer norm between the layers, normalised either with
    /// `candle_nn::LayerNorm` or with [`ops::layer_norm`].
    fn mlp_loss(varmap: &VarMap, candle_norm: bool) -> Result<Tensor> {
        let dev = Device::Cpu;
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &dev);
        let fc1 = candle_nn::linear(4, 8, vb.pp("fc1"))?;
        let fc2 = candle_nn::linear(8, 3, vb.pp("fc2"))?;
        let x = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let h = fc1.forward(&x)?;
        let h = if candle_norm {
            candle_nn::layer_norm(8, LayerNormConfig::default(), vb.pp("norm"))?.forward(&h)?
        } else {
            let g = vb
                .pp("norm")
                .get_with_hints(8, "weight", candle_nn::Init::Const(1.0))?;
            let b = vb
                .pp("norm")
                .get_with_hints(8, "bias", candle_nn::Init::Const(0.0))?;
            ops::layer_norm(&h, &g, &b, 1e-5)?
        };
        let y = Tensor::new(&[0u32, 1, 2, 0, 1], &dev)?;
        ops::cross_entropy(&fc2.forward(&h.relu()?)?, &y)
    }

    #[test]
    fn coverage_check_catches_candle_layer_norm() -> Result<()> {
        let varmap = VarMap::new();
        let grads = mlp_loss(&varmap, true)?.backward()?;
        let err = check_gradient_coverage(&named_vars(&varmap), &[], &grads)
            .expect_err("candle_nn::LayerNorm has no backward: fc1 and norm get no gradient");
        for name in ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias"] {
            assert!(
                err.missing.contains(&name.to_string()),
                "{name} not reported: {err}"
            );
        }
        assert!(!err.missing.iter().any(|n| n.starts_with("fc2")), "{err}");
        Ok(())
    }

    #[test]
    fn coverage_check_passes_with_differentiable_layer_norm() -> Result<()> {
        let varmap = VarMap::new();
        let grads = mlp_loss(&varmap, false)?.backward()?;
        check_gradient_coverage(&named_vars(&varmap), &[], &grads)
            .map_err(|e| crate::Error::Invalid(e.to_string()))?;
        Ok(())
    }

    #[test]
    fn coverage_check_reports_zero_and_frozen() -> Result<()> {
        let dev = Device::Cpu;
        let used = Var::new(&[1.0f64, 2.0], &dev)?;
        let unused_in_loss = Var::new(&[3.0f64], &dev)?;
        let frozen = Tensor::new(&[5.0f64, 6.0], &dev)?;
        // `unused_in_loss` enters multiplied by a zero tensor: reached, but with an all-zero
        // gradient. (A scalar `* 0.0` would be pruned by candle: no gradient at all.)
        let zeros = Tensor::zeros(1, DType::F64, &dev)?;
        let loss =
            (used.as_tensor().sum_all()? + (unused_in_loss.as_tensor() * zeros)?.sum_all()?)?;
        let loss = (loss + frozen.sum_all()?)?;
        let grads = loss.backward()?;
        let trainable = vec![
            ("used".to_string(), used),
            ("zeroed".to_string(), unused_in_loss),
        ];
        let err = check_gradient_coverage(&trainable, &[("frozen".into(), frozen.clone())], &grads)
            .expect_err("zeroed must be reported");
        assert_eq!(err.zero, vec!["zeroed".to_string()]);
        assert!(err.missing.is_empty() && err.frozen_with_gradient.is_empty());
        // A frozen *variable* that does get a gradient is reported.
        let wrongly_trained = Var::new(&[1.0f64], &dev)?;
        let grads = wrongly_trained.as_tensor().sum_all()?.backward()?;
        let err = check_gradient_coverage(
            &[],
            &[("w".into(), wrongly_trained.as_tensor().clone())],
            &grads,
        )
        .expect_err("frozen with gradient");
        assert_eq!(err.frozen_with_gradient, vec!["w".to_string()]);
        Ok(())
    }

    #[test]
    fn frozen_prefixes_split_and_check() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
        let encoder = vb.get_with_hints(3, "encoder.w", candle_nn::Init::Const(1.0))?;
        let head = vb.get_with_hints(3, "head.w", candle_nn::Init::Const(2.0))?;
        // A frozen encoder enters the graph detached, as a pretrained model with `head only`.
        let loss = (encoder.detach() * &head)?.sum_all()?;
        let grads = loss.backward()?;
        let (trainable, frozen) = split_frozen(named_vars(&varmap), &["encoder.".to_string()]);
        assert_eq!(
            trainable.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
            ["head.w"]
        );
        let frozen: Vec<(String, Tensor)> = frozen
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        check_gradient_coverage(&trainable, &frozen, &grads)
            .map_err(|e| crate::Error::Invalid(e.to_string()))?;
        // Forgetting to detach it trains the encoder: reported.
        let grads = (&encoder * &head)?.sum_all()?.backward()?;
        let err =
            check_gradient_coverage(&trainable, &frozen, &grads).expect_err("encoder trained");
        assert_eq!(err.frozen_with_gradient, vec!["encoder.w".to_string()]);
        Ok(())
    }

    #[test]
    fn central_differences_of_a_known_function() -> Result<()> {
        let x = Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu)?;
        // f(x) = sum(x^3) -> f'(x) = 3x^2
        let fd = central_differences(
            |t| Ok(t.powf(3.0)?.sum_all()?.to_scalar::<f64>()?),
            &x,
            1e-5,
        )?;
        let want = (x.sqr()? * 3.0)?;
        assert!(max_relative_error(&fd, &want, 1e-8)? < 1e-8);
        Ok(())
    }
}
