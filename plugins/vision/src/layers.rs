//! Layers of the vision models, each created from a `VarBuilder` with PyTorch's default
//! initialisation (weights and biases uniform in `±1/sqrt(fan_in)`, as `nn.Linear` and
//! `nn.Conv2d` do; group-norm scale 1, shift 0), so initial losses match a PyTorch model of the
//! same shape. Every op used has a backward pass (candle's or one of `distill_rt::kernels`).

use distill_rt::candle::{D, Tensor};
use distill_rt::candle_nn::{Init, VarBuilder};
use distill_rt::kernels::{channel_add, conv2d, depthwise_conv, group_norm, group_norm_relu};
pub use distill_rt::nn::Linear;
use distill_rt::nn::fan_in_init;
use distill_rt::{Error, Result};

/// A 2-D convolution, with a bias or without one.
pub struct Conv {
    weight: Tensor,
    /// A zero constant (not a variable) for a convolution without a bias.
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    kernel: usize,
    input: usize,
    output: usize,
}

impl Conv {
    /// A `kernel x kernel` convolution `input -> output` channels with a bias under `vb`,
    /// PyTorch's default initialisation.
    pub fn new(
        input: usize,
        output: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = fan_in_init(input / groups.max(1) * kernel * kernel);
        Self::with_init(
            (input, output, kernel, stride, padding, groups),
            init,
            Some(init),
            vb,
        )
    }

    /// A convolution of `(input, output, kernel, stride, padding, groups)` whose weight is
    /// drawn from `weight` and whose bias, when `bias` is given, from it.
    pub fn with_init(
        (input, output, kernel, stride, padding, groups): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        weight: Init,
        bias: Option<Init>,
        vb: VarBuilder,
    ) -> Result<Self> {
        if groups == 0 || !input.is_multiple_of(groups) || !output.is_multiple_of(groups) {
            return Err(Error::Invalid(format!(
                "convolution {input}->{output} channels cannot be split into {groups} groups"
            )));
        }
        let bias = match bias {
            Some(init) => vb.get_with_hints(output, "bias", init)?,
            None => Tensor::zeros(output, vb.dtype(), vb.device())?,
        };
        Ok(Self {
            weight: vb.get_with_hints(
                (output, input / groups, kernel, kernel),
                "weight",
                weight,
            )?,
            bias,
            stride,
            padding,
            groups,
            kernel,
            input,
            output,
        })
    }

    /// Applies the convolution to `[batch, input, h, w]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.groups == 1 {
            return conv2d(x, &self.weight, &self.bias, self.padding, self.stride);
        }
        let y = if self.groups == self.input && self.input == self.output {
            depthwise_conv(x, &self.weight, self.padding, self.stride)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?
        };
        channel_add(&y, &self.bias, 1)
    }

    /// Output size for an input of `size` pixels per side.
    pub fn out_size(&self, size: usize) -> usize {
        (size + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    /// Multiply-accumulates per sample for an input of `size` pixels per side.
    pub fn macs(&self, size: usize) -> u64 {
        let out = self.out_size(size) as u64;
        out * out * (self.output * (self.input / self.groups) * self.kernel * self.kernel) as u64
    }
}

/// Group normalisation (Wu & He 2018) over `[batch, channels, h, w]`: statistics per sample and
/// group of channels, so training and evaluation compute the same thing at any batch size.
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

impl GroupNorm {
    /// Group norm of `channels` channels in `min(groups, channels)` groups (dividing `channels`).
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let mut g = groups.min(channels).max(1);
        while !channels.is_multiple_of(g) {
            g -= 1;
        }
        Ok(Self {
            gamma: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            beta: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups: g,
        })
    }

    /// Normalises `x` (one fused kernel, [`distill_rt::kernels::group_norm`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, &self.gamma, &self.beta, self.groups, 1e-5)
    }

    /// `relu(self.forward(x))` in one op that keeps only `x`
    /// ([`distill_rt::kernels::group_norm_relu`]).
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_relu(x, &self.gamma, &self.beta, self.groups, 1e-5)
    }
}

/// Mean over the spatial dimensions: `[batch, c, h, w] -> [batch, c]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::candle::{Device, Var};
    use distill_rt::testing::max_abs_difference;

    /// Checks that `ours` equals `reference` (to `value_tol`) and that the gradients of a random
    /// weighting of each (every output position matters differently) with respect to `inputs`
    /// agree to `grad_tol`.
    fn assert_same(
        ours: Tensor,
        reference: Tensor,
        inputs: [&Var; 2],
        value_tol: f64,
        grad_tol: f64,
        case: &str,
    ) -> Result<()> {
        assert_eq!(ours.dims(), reference.dims(), "{case}");
        assert!(max_abs_difference(&ours, &reference)? < value_tol, "{case}");
        let probe = Tensor::randn(0f64, 1.0, ours.dims(), &Device::Cpu)?;
        let g1 = (ours * &probe)?.sum_all()?.backward()?;
        let g2 = (reference * &probe)?.sum_all()?.backward()?;
        for v in inputs {
            let no_grad = || Error::Invalid(format!("{case}: no gradient"));
            let a = g1.get(v.as_tensor()).ok_or_else(no_grad)?;
            let b = g2.get(v.as_tensor()).ok_or_else(no_grad)?;
            assert!(max_abs_difference(a, b)? < grad_tol, "{case}");
        }
        Ok(())
    }

    fn random_var(shape: (usize, usize, usize, usize)) -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(
            0f64,
            1.0,
            shape,
            &Device::Cpu,
        )?)?)
    }

    #[test]
    fn depthwise_equals_grouped_conv2d_forward_and_backward() -> Result<()> {
        for (size, stride) in [(6, 1), (7, 2), (8, 2), (5, 1)] {
            let (x, w) = (random_var((2, 3, size, size))?, random_var((3, 1, 3, 3))?);
            let ours = depthwise_conv(x.as_tensor(), w.as_tensor(), 1, stride)?;
            let candle = x.as_tensor().conv2d(w.as_tensor(), 1, stride, 1, 3)?;
            assert_same(
                ours,
                candle,
                [&x, &w],
                1e-12,
                1e-10,
                &format!("size {size} stride {stride}"),
            )?;
        }
        Ok(())
    }
}
