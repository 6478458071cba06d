//! Layers shared by task plugins: fully connected, embedding and layer norm, initialised as
//! PyTorch initialises them and built only from ops with a backward pass.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::{Result, ops};

/// PyTorch's default for `nn.Linear` and `nn.Conv*` weights and biases: uniform in
/// `±1/sqrt(fan_in)`.
pub fn fan_in_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A fully connected layer, `y = x W^T + b`, over the last dimension of any-rank input.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// Input width.
    pub input: usize,
    /// Output width.
    pub output: usize,
}

impl Linear {
    /// A `input -> output` layer under `vb` (`weight` `[output, input]`, `bias`).
    pub fn new(input: usize, output: usize, vb: VarBuilder) -> Result<Self> {
        let init = fan_in_init(input);
        Self::with_init(input, output, init, init, vb)
    }

    /// A `input -> output` layer whose new weight and bias are drawn from the given inits.
    pub fn with_init(
        input: usize,
        output: usize,
        weight: Init,
        bias: Init,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((output, input), "weight", weight)?,
            bias: vb.get_with_hints(output, "bias", bias)?,
            input,
            output,
        })
    }

    /// Applies the layer to `[..., input]`: one [`crate::kernels::linear`] over all rows (a
    /// broadcast batched product would multiply row block by row block).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.dims().to_vec();
        let rows = x.elem_count() / self.input.max(1);
        let y = crate::kernels::linear(&x.reshape((rows, self.input))?, &self.weight, &self.bias)?;
        if let Some(last) = shape.last_mut() {
            *last = self.output;
        }
        Ok(y.reshape(shape)?)
    }

    /// The weight, `[output, input]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[output]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Multiply-accumulates per input row.
    pub fn macs(&self) -> u64 {
        (self.input * self.output) as u64
    }
}

/// A lookup table of `count` vectors of width `dim` (PyTorch's `nn.Embedding`, initialised
/// from N(0, 1)).
pub struct Embedding {
    table: Tensor,
    /// Vector width.
    pub dim: usize,
}

impl Embedding {
    /// A `count x dim` table under `vb` (`weight`).
    pub fn new(count: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        Self::with_init(count, dim, init, vb)
    }

    /// A `count x dim` table whose new rows are drawn from `init`.
    pub fn with_init(count: usize, dim: usize, init: Init, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            table: vb.get_with_hints((count, dim), "weight", init)?,
            dim,
        })
    }

    /// The whole table, `[count, dim]` (every id's vector, for scoring all of them at once).
    pub fn weight(&self) -> &Tensor {
        &self.table
    }

    /// The vectors of `ids` (`u32`, any shape): shape `[..ids, dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.dim);
        let flat = ids.flatten_all()?;
        Ok(self.table.index_select(&flat, 0)?.reshape(shape)?)
    }
}

/// Layer normalisation over the last dimension (`weight`, `bias`) with a real backward pass,
/// unlike `candle_nn::LayerNorm` (DESIGN.md, "candle traps").
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm of width `dim` under `vb`, scale 1 and shift 0.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gamma: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            beta: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.gamma, &self.beta, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::seeded_var_builder;
    use crate::testing::max_abs_difference;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn linear_on_rank_three_equals_row_by_row() -> Result<()> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 3, DType::F64, &Device::Cpu);
        let layer = Linear::new(4, 3, vb.pp("fc"))?;
        let x = Tensor::randn(0f64, 1.0, (2, 5, 4), &Device::Cpu)?;
        let whole = layer.forward(&x)?;
        let rows = layer.forward(&x.reshape((10, 4))?)?.reshape((2, 5, 3))?;
        assert!(max_abs_difference(&whole, &rows)? < 1e-12);
        Ok(())
    }

    #[test]
    fn embedding_looks_up_rows() -> Result<()> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 3, DType::F64, &Device::Cpu);
        let emb = Embedding::new(6, 2, vb.pp("emb"))?;
        let ids = Tensor::new(&[[5u32, 0], [2, 5]], &Device::Cpu)?;
        let out = emb.forward(&ids)?;
        assert_eq!(out.dims(), &[2, 2, 2]);
        let table = varmap
            .data()
            .lock()
            .map_err(|_| crate::Error::Invalid("lock".into()))?["emb.weight"]
            .as_tensor()
            .clone();
        let row5 = table.get(5)?;
        assert!(max_abs_difference(&out.get(0)?.get(0)?, &row5)? < 1e-15);
        assert!(max_abs_difference(&out.get(1)?.get(1)?, &row5)? < 1e-15);
        Ok(())
    }
}
