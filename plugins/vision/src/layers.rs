//! Layers of the vision models, each created from a `VarBuilder` with PyTorch's default
//! initialisation (weights and biases uniform in `±1/sqrt(fan_in)`, as `nn.Linear` and
//! `nn.Conv2d` do; group-norm scale 1, shift 0), so initial losses match a PyTorch model of the
//! same shape. Every op used has a backward pass in candle.

use distill_rt::candle::{D, Tensor};
use distill_rt::candle_nn::{Init, VarBuilder};
use distill_rt::{Error, Result};

fn fan_in_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A fully connected layer, `y = x W^T + b`.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// Input width.
    pub input: usize,
    /// Output width.
    pub output: usize,
}

impl Linear {
    /// A `input -> output` layer under `vb` (`weight`, `bias`).
    pub fn new(input: usize, output: usize, vb: VarBuilder) -> Result<Self> {
        let init = fan_in_init(input);
        Ok(Self {
            weight: vb.get_with_hints((output, input), "weight", init)?,
            bias: vb.get_with_hints(output, "bias", init)?,
            input,
            output,
        })
    }

    /// Applies the layer to `[batch, input]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// Multiply-accumulates per sample.
    pub fn macs(&self) -> u64 {
        (self.input * self.output) as u64
    }
}

/// A 2-D convolution with bias.
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    kernel: usize,
    input: usize,
    output: usize,
}

impl Conv {
    /// A `kernel x kernel` convolution `input -> output` channels under `vb`.
    pub fn new(
        input: usize,
        output: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if !input.is_multiple_of(groups) || !output.is_multiple_of(groups) {
            return Err(Error::Invalid(format!(
                "convolution {input}->{output} channels cannot be split into {groups} groups"
            )));
        }
        let init = fan_in_init(input / groups * kernel * kernel);
        Ok(Self {
            weight: vb.get_with_hints((output, input / groups, kernel, kernel), "weight", init)?,
            bias: vb.get_with_hints(output, "bias", init)?,
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
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.output, 1, 1))?)?)
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
    channels: usize,
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
            channels,
        })
    }

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let grouped = x.reshape((b, self.groups, c / self.groups * h * w))?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let centred = grouped.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .reshape((b, c, h, w))?;
        let shape = (1, self.channels, 1, 1);
        Ok(normed
            .broadcast_mul(&self.gamma.reshape(shape)?)?
            .broadcast_add(&self.beta.reshape(shape)?)?)
    }
}

/// Mean over the spatial dimensions: `[batch, c, h, w] -> [batch, c]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
}
