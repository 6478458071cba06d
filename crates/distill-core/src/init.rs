//! Seeded variable initialisation: a `VarBuilder` whose new variables are drawn from [`Rng`]
//! keyed by the seed and the variable's name, so that the same seed gives the same weights
//! whatever order the model creates them in (candle's own initialisation is not seedable).

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::rng::Rng;

/// A `VarMap` backend that initialises missing variables deterministically.
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

fn draw(init: Init, shape: &Shape, rng: &mut Rng) -> Vec<f64> {
    let n = shape.elem_count();
    match init {
        Init::Const(v) => vec![v; n],
        Init::Uniform { lo, up } => (0..n).map(|_| lo + (up - lo) * rng.uniform()).collect(),
        Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * rng.normal()).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| bound * (2.0 * rng.uniform() - 1.0))
                        .collect()
                }
                candle_nn::init::NormalOrUniform::Normal => {
                    (0..n).map(|_| std * rng.normal()).collect()
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(var) = data.get(name) {
            let t = var.as_tensor();
            if t.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` exists with shape {:?}, asked for {s:?}",
                    t.shape()
                );
            }
            return t.to_dtype(dtype);
        }
        let mut rng = Rng::derive(self.seed, &format!("init/{name}"));
        let values = draw(h, &s, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("no variable `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }
}

/// A `VarBuilder` over `varmap` whose new variables are initialised from `seed` and their name.
/// Variables already in `varmap` (loaded weights) are returned as they are.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(SeededVarMap {
        varmap: varmap.clone(),
        seed,
    });
    VarBuilder::from_backend(backend, dtype, device.clone())
}

/// A `VarBuilder` over trained `weights` as constants rather than variables: a model built
/// from it records no backward graph, so its forward pass frees every intermediate tensor as
/// soon as the next op has read it (a frozen teacher; candle has no no-grad mode). A model
/// must not overwrite weights that are not variables (they are the trained ones); a name the
/// model asks for and `weights` lacks is an error.
pub fn frozen_var_builder(
    weights: std::collections::HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let weights = weights
        .into_iter()
        .map(|(name, t)| (name, t.detach()))
        .collect();
    VarBuilder::from_tensors(weights, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(seed: u64, order_swapped: bool) -> crate::Result<Vec<f32>> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        if order_swapped {
            vb.get_with_hints((2, 3), "b", init)?;
        }
        let a = vb.get_with_hints((4, 3), "a", init)?;
        Ok(a.flatten_all()?.to_vec1::<f32>()?)
    }

    #[test]
    fn same_seed_same_weights_whatever_the_order() -> crate::Result<()> {
        assert_eq!(weights(3, false)?, weights(3, true)?);
        assert_ne!(weights(3, false)?, weights(4, false)?);
        Ok(())
    }

    #[test]
    fn kaiming_normal_has_the_right_spread() -> crate::Result<()> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 1, DType::F64, &Device::Cpu);
        let w = vb.get_with_hints((256, 128), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let std = w.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt();
        let want = 2f64.sqrt() / 128f64.sqrt();
        assert!((std / want - 1.0).abs() < 0.02, "std {std}, want {want}");
        // The variable is in the map and trains.
        assert_eq!(crate::testing::named_vars(&varmap).len(), 1);
        Ok(())
    }
}
