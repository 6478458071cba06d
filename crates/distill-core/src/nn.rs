//! Layers shared by task plugins: fully connected, embedding, layer norm, batch norm and
//! dropout, initialised as PyTorch initialises them and built only from ops with a backward
//! pass; and which variables are buffers (state saved with the weights that never trains).

use candle_core::{Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::kernels::{batch_norm, channel_add, channel_mul, relu};
use crate::rng::Rng;
use crate::{Error, Result, ops};

/// The last name segments of buffers: a batch norm's running statistics. Buffers are saved
/// with the weights and updated by the forward pass in training mode; no optimizer updates
/// them, and parameter counts leave them out (PyTorch's `parameters()` against `buffers()`).
pub const BUFFER_NAMES: [&str; 2] = ["running_mean", "running_var"];

/// Whether the variable `name` is a buffer ([`BUFFER_NAMES`]).
pub fn is_buffer(name: &str) -> bool {
    BUFFER_NAMES.contains(&name.rsplit('.').next().unwrap_or(name))
}

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

/// Batch normalisation over `[batch, channels, spatial...]` (Ioffe & Szegedy 2015) as
/// PyTorch's `BatchNorm2d`: in training mode each channel is normalised with the batch's mean and
/// biased variance and the running statistics move by `momentum` towards them (the running
/// variance towards the unbiased one); in evaluation mode the running statistics normalise.
/// Variables `weight` (1), `bias` (0) and the buffers `running_mean` (0), `running_var` (1).
pub struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// A batch norm of `channels` channels under `vb` with PyTorch's defaults (eps 1e-5,
    /// momentum 0.1).
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gamma: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            beta: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            // A variable of the model's map shares its storage with the `Var` made from it, so
            // the updates below are what the weights file saves; over trained weights loaded as
            // constants (a frozen teacher) this is a private copy, and evaluation never writes.
            running_mean: Var::from_tensor(&vb.get_with_hints(
                channels,
                "running_mean",
                Init::Const(0.0),
            )?)?,
            running_var: Var::from_tensor(&vb.get_with_hints(
                channels,
                "running_var",
                Init::Const(1.0),
            )?)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Normalises `x`; `train` selects batch statistics (and updates the running ones).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.apply(x, train, false)
    }

    /// `relu(self.forward(x, train))`, fused in training mode.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.apply(x, train, true)
    }

    fn apply(&self, x: &Tensor, train: bool, with_relu: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let channels = self.gamma.elem_count();
        if dims.len() < 2 || dims[1] != channels {
            return Err(Error::Invalid(format!(
                "batch norm of {channels} channels got input {dims:?} (channels second)"
            )));
        }
        if !train {
            let rv = self.running_var.as_tensor().to_dtype(x.dtype())?;
            let rm = self.running_mean.as_tensor().to_dtype(x.dtype())?;
            let scale = self.gamma.div(&(rv + self.eps)?.sqrt()?)?;
            let shift = (&self.beta - rm.mul(&scale)?)?;
            let y = channel_add(&channel_mul(x, &scale, 1)?, &shift, 1)?;
            return if with_relu { relu(&y) } else { Ok(y) };
        }
        let (y, batch) = batch_norm(x, &self.gamma, &self.beta, self.eps, with_relu)?;
        // The running statistics: the variance unbiased, as PyTorch's.
        let n = batch.count as f64;
        let m = self.momentum;
        let blend = |running: &Var, batch: Vec<f64>| -> Result<()> {
            let old = running.as_tensor();
            let batch = Tensor::from_vec(batch, channels, old.device())?.to_dtype(old.dtype())?;
            Ok(running.set(&((old * (1.0 - m))? + (batch * m)?)?)?)
        };
        blend(&self.running_mean, batch.mean)?;
        let unbiased = batch.var.iter().map(|v| v * n / (n - 1.0)).collect();
        blend(&self.running_var, unbiased)?;
        Ok(y)
    }
}

/// Inverted dropout (PyTorch's `nn.Dropout`): in training mode each element is zeroed with
/// probability `p` and the rest scaled by `1 / (1 - p)`; evaluation passes `x` through. The
/// mask comes from a seeded stream (candle's random tensors are not seedable), advanced on
/// every call, so a run is reproducible.
pub struct Dropout {
    p: f64,
    rng: std::sync::Mutex<Rng>,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)`, its masks drawn from `seed` and `purpose`.
    pub fn new(p: f64, seed: u64, purpose: &str) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Invalid(format!(
                "dropout probability must be in [0, 1), got {p}"
            )));
        }
        Ok(Self {
            p,
            rng: std::sync::Mutex::new(Rng::derive(seed, &format!("dropout/{purpose}"))),
        })
    }

    /// Applies dropout in training mode.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            (0..x.elem_count())
                .map(|_| {
                    if rng.uniform() < self.p {
                        0.0
                    } else {
                        keep as f32
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::seeded_var_builder;
    use crate::testing::max_abs_difference;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use serde_json;

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

    /// PyTorch's `BatchNorm2d` on the same numbers (`tests/fixtures/batchnorm_reference.py`).
    #[test]
    fn batch_norm_matches_pytorch_in_training_and_evaluation_mode() -> Result<()> {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/batchnorm_reference.json"
        ))
        .map_err(|e| crate::Error::Invalid(e.to_string()))?;
        let list = |key: &str| -> Vec<f64> {
            fixture[key]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
                .unwrap_or_default()
        };
        let shape: Vec<usize> = list("shape").iter().map(|v| *v as usize).collect();
        let dev = Device::Cpu;
        let tensor = |key: &str| Tensor::from_vec(list(key), shape.as_slice(), &dev);
        let vector = |key: &str| Tensor::from_vec(list(key), 3, &dev);
        let close = |got: &Tensor, key: &str| -> Result<()> {
            let want = Tensor::from_vec(list(key), got.shape(), &dev)?;
            let d = max_abs_difference(got, &want)?;
            assert!(d < 1e-10, "{key}: off by {d}");
            Ok(())
        };
        let varmap = VarMap::new();
        let bn = BatchNorm::new(3, seeded_var_builder(&varmap, 0, DType::F64, &dev).pp("bn"))?;
        {
            let vars = varmap
                .data()
                .lock()
                .map_err(|_| crate::Error::Invalid("lock".into()))?;
            for (name, key) in [("bn.weight", "weight"), ("bn.bias", "bias")] {
                vars[name].set(&vector(key)?)?;
            }
        }
        let buffer = |name: &str| -> Result<Tensor> {
            let vars = varmap
                .data()
                .lock()
                .map_err(|_| crate::Error::Invalid("lock".into()))?;
            Ok(vars[name].as_tensor().clone())
        };
        close(&bn.forward(&tensor("x1")?, true)?, "train_y1")?;
        // The model's map holds the running statistics the layer updated (what is saved).
        close(&buffer("bn.running_mean")?, "running_mean_1")?;
        close(&buffer("bn.running_var")?, "running_var_1")?;
        let x2 = Var::from_tensor(&tensor("x2")?)?;
        let y2 = bn.forward(x2.as_tensor(), true)?;
        close(&y2, "train_y2")?;
        let probe = tensor("probe")?;
        let grads = (y2 * &probe)?.sum_all()?.backward()?;
        let grad = |t: &Tensor| {
            grads
                .get(t)
                .cloned()
                .ok_or_else(|| crate::Error::Invalid("no gradient".into()))
        };
        close(&grad(x2.as_tensor())?, "train_grad_x")?;
        close(&grad(&bn.gamma)?, "train_grad_weight")?;
        close(&grad(&bn.beta)?, "train_grad_bias")?;
        close(&buffer("bn.running_mean")?, "running_mean_2")?;
        close(&buffer("bn.running_var")?, "running_var_2")?;
        let x3 = Var::from_tensor(&tensor("x3")?)?;
        let y3 = bn.forward(x3.as_tensor(), false)?;
        close(&y3, "eval_y3")?;
        let grads = (y3 * &probe)?.sum_all()?.backward()?;
        let grad = |t: &Tensor| {
            grads
                .get(t)
                .cloned()
                .ok_or_else(|| crate::Error::Invalid("no gradient".into()))
        };
        close(&grad(x3.as_tensor())?, "eval_grad_x")?;
        close(&grad(&bn.gamma)?, "eval_grad_weight")?;
        close(&grad(&bn.beta)?, "eval_grad_bias")?;
        // Evaluation leaves the running statistics alone; the fused ReLU is the ReLU.
        close(&buffer("bn.running_mean")?, "running_mean_2")?;
        for train in [false, true] {
            let fused = bn.forward_relu(&tensor("x3")?, train)?;
            let plain = bn.forward(&tensor("x3")?, train)?.relu()?;
            assert!(max_abs_difference(&fused, &plain)? < 1e-12);
        }
        assert!(is_buffer("layer1.0.bn1.running_var") && !is_buffer("bn.weight"));
        Ok(())
    }

    #[test]
    fn dropout_zeroes_at_its_rate_scales_the_rest_and_is_off_in_evaluation() -> Result<()> {
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu)?;
        let d = Dropout::new(0.25, 1, "test")?;
        let y = d.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        let zeros = y.iter().filter(|v| **v == 0.0).count() as f64 / 1e4;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        assert!(y.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        // The next call draws another mask; a new layer with the same seed repeats the first.
        let again = d.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(y, again);
        let fresh = Dropout::new(0.25, 1, "test")?.forward(&x, true)?;
        assert_eq!(fresh.flatten_all()?.to_vec1::<f32>()?, y);
        assert_eq!(
            d.forward(&x, false)?.flatten_all()?.to_vec1::<f32>()?,
            vec![1.0; 10_000]
        );
        assert!(Dropout::new(1.0, 1, "test").is_err());
        Ok(())
    }
}
