//! The vision models. Each takes the input `image` (`[batch, c, h, w]`) and exposes its logits,
//! the feature `penultimate` (what the classifier reads) and named intermediate features.
//!
//! - `vision.resnet`: ResNet-style teacher with basic blocks and group normalisation, three
//!   stages of widths `width, 2 width, 4 width`, `blocks` blocks each (features `stage1..3`);
//! - `vision.lenet5`: LeNet-5-style CNN, conv 5x5 -> pool -> conv 5x5 -> pool -> 2 hidden layers
//!   (features `conv1`, `conv2`);
//! - `vision.mobilenet`: MobileNet-style depthwise-separable CNN, group norm where MobileNet has
//!   batch norm (features `block1..n`);
//! - `vision.mlp`: multi-layer perceptron on the flattened image (features `hidden1..n`).

use std::collections::BTreeMap;

use distill_rt::candle::Tensor;
use distill_rt::kernels::{max_pool2d, relu};
use distill_rt::model::PENULTIMATE;
use distill_rt::serde::Deserialize;
use distill_rt::{
    Config, Error, Model, ModelContext, ModelFactory, ModelOutput, Result, TensorMap, config,
};

use crate::data::IMAGE;
use crate::layers::{Conv, GroupNorm, Linear, global_avg_pool};

/// The `image` input, or an error naming the model.
fn image<'a>(owner: &str, inputs: &'a TensorMap) -> Result<&'a Tensor> {
    inputs
        .get(IMAGE)
        .ok_or_else(|| Error::Invalid(format!("{owner} needs the input `{IMAGE}`")))
}

/// `[channels, height, width]` of the dataset's `image` input (square images).
fn image_shape(owner: &str, ctx: &ModelContext<'_>) -> Result<(usize, usize)> {
    match ctx.dataset.inputs.get(IMAGE).map(Vec::as_slice) {
        Some([c, h, w]) if h == w => Ok((*c, *h)),
        Some(other) => Err(Error::Invalid(format!(
            "{owner} needs square [c, h, w] images, the dataset gives {other:?}"
        ))),
        None => Err(Error::Invalid(format!(
            "{owner} needs a dataset with an `{IMAGE}` input"
        ))),
    }
}

fn output(logits: Tensor, features: Vec<(String, Tensor)>) -> ModelOutput {
    ModelOutput {
        logits,
        features: features.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct MlpConfig {
    hidden: Vec<usize>,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            hidden: vec![256, 256],
        }
    }
}

struct Mlp {
    hidden: Vec<Linear>,
    head: Linear,
}

/// `vision.mlp`.
pub struct MlpFactory;

impl ModelFactory for MlpFactory {
    fn summary(&self) -> &str {
        "MLP on the flattened image: `hidden` ReLU layers (default [256, 256]) and a linear head"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<MlpConfig>()
    }
    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model vision.mlp";
        let c: MlpConfig = config::parse(OWNER, cfg)?;
        if c.hidden.is_empty() || c.hidden.contains(&0) {
            return Err(Error::config(
                OWNER,
                "hidden",
                "needs at least one layer, each of width > 0",
            ));
        }
        let (ch, s) = image_shape(OWNER, &ctx)?;
        let mut width = ch * s * s;
        let mut hidden = Vec::new();
        for (i, &h) in c.hidden.iter().enumerate() {
            hidden.push(Linear::new(
                width,
                h,
                ctx.vb.pp(format!("hidden{}", i + 1)),
            )?);
            width = h;
        }
        let head = Linear::new(width, ctx.dataset.num_classes, ctx.vb.pp("head"))?;
        Ok(Box::new(Mlp { hidden, head }))
    }
}

impl Model for Mlp {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let mut x = image("vision.mlp", inputs)?.flatten_from(1)?;
        let mut features = Vec::new();
        for (i, layer) in self.hidden.iter().enumerate() {
            x = relu(&layer.forward(&x)?)?;
            features.push((format!("hidden{}", i + 1), x.clone()));
        }
        features.push((PENULTIMATE.into(), x.clone()));
        Ok(output(self.head.forward(&x)?, features))
    }
    fn flops_per_sample(&self) -> u64 {
        self.hidden.iter().map(Linear::macs).sum::<u64>() + self.head.macs()
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct LeNetConfig {
    channels: [usize; 2],
    hidden: [usize; 2],
}

impl Default for LeNetConfig {
    fn default() -> Self {
        Self {
            channels: [6, 16],
            hidden: [120, 84],
        }
    }
}

struct LeNet {
    conv1: Conv,
    conv2: Conv,
    fc1: Linear,
    fc2: Linear,
    head: Linear,
    macs: u64,
}

/// `vision.lenet5`.
pub struct LeNetFactory;

impl ModelFactory for LeNetFactory {
    fn summary(&self) -> &str {
        "LeNet-5-style CNN: conv5x5(pad 2)-pool-conv5x5-pool, two ReLU hidden layers; `channels` [6, 16], `hidden` [120, 84]"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<LeNetConfig>()
    }
    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model vision.lenet5";
        let c: LeNetConfig = config::parse(OWNER, cfg)?;
        if c.channels.contains(&0) || c.hidden.contains(&0) {
            return Err(Error::config(OWNER, "channels", "widths must be > 0"));
        }
        let (ch, s) = image_shape(OWNER, &ctx)?;
        let conv1 = Conv::new(ch, c.channels[0], 5, 1, 2, 1, ctx.vb.pp("conv1"))?;
        let s1 = conv1.out_size(s) / 2;
        let conv2 = Conv::new(c.channels[0], c.channels[1], 5, 1, 0, 1, ctx.vb.pp("conv2"))?;
        if s1 < 5 {
            return Err(Error::Invalid(format!(
                "{OWNER}: images of {s}x{s} are too small (need at least 10x10)"
            )));
        }
        let s2 = conv2.out_size(s1) / 2;
        let flat = c.channels[1] * s2 * s2;
        let fc1 = Linear::new(flat, c.hidden[0], ctx.vb.pp("fc1"))?;
        let fc2 = Linear::new(c.hidden[0], c.hidden[1], ctx.vb.pp("fc2"))?;
        let head = Linear::new(c.hidden[1], ctx.dataset.num_classes, ctx.vb.pp("head"))?;
        let macs = conv1.macs(s) + conv2.macs(s1) + fc1.macs() + fc2.macs() + head.macs();
        Ok(Box::new(LeNet {
            conv1,
            conv2,
            fc1,
            fc2,
            head,
            macs,
        }))
    }
}

impl Model for LeNet {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let x = image("vision.lenet5", inputs)?;
        // relu(pool(x)) = pool(relu(x)), values and gradients (a window's maximum stays its
        // maximum; where it is <= 0 both pass no gradient), on a quarter of the elements.
        let c1 = relu(&max_pool2d(&self.conv1.forward(x)?, 2)?)?;
        let c2 = relu(&max_pool2d(&self.conv2.forward(&c1)?, 2)?)?;
        let h = relu(&self.fc1.forward(&c2.flatten_from(1)?)?)?;
        let h = relu(&self.fc2.forward(&h)?)?;
        let logits = self.head.forward(&h)?;
        Ok(output(
            logits,
            vec![
                ("conv1".into(), c1),
                ("conv2".into(), c2),
                (PENULTIMATE.into(), h),
            ],
        ))
    }
    fn flops_per_sample(&self) -> u64 {
        self.macs
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct MobileNetConfig {
    /// Stem width.
    stem: usize,
    /// Output channels of each depthwise-separable block; the first keeps the resolution, every
    /// later one halves it.
    channels: Vec<usize>,
    /// Groups of the group normalisation after every convolution.
    groups: usize,
}

impl Default for MobileNetConfig {
    fn default() -> Self {
        Self {
            stem: 16,
            channels: vec![32, 64, 128],
            groups: 8,
        }
    }
}

struct SeparableBlock {
    depthwise: Conv,
    depthwise_norm: GroupNorm,
    pointwise: Conv,
    pointwise_norm: GroupNorm,
}

struct MobileNet {
    stem: Conv,
    stem_norm: GroupNorm,
    blocks: Vec<SeparableBlock>,
    head: Linear,
    macs: u64,
}

/// `vision.mobilenet`.
pub struct MobileNetFactory;

impl ModelFactory for MobileNetFactory {
    fn summary(&self) -> &str {
        "MobileNet-style CNN: conv3x3 stem, depthwise-separable blocks (dw3x3 + pw1x1, each with group norm and ReLU), global pool; `stem` 16, `channels` [32, 64, 128]"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<MobileNetConfig>()
    }
    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model vision.mobilenet";
        let c: MobileNetConfig = config::parse(OWNER, cfg)?;
        if c.stem == 0 || c.groups == 0 || c.channels.is_empty() || c.channels.contains(&0) {
            return Err(Error::config(
                OWNER,
                "channels",
                "needs at least one block, widths > 0",
            ));
        }
        let (ch, mut s) = image_shape(OWNER, &ctx)?;
        let stem = Conv::new(ch, c.stem, 3, 1, 1, 1, ctx.vb.pp("stem"))?;
        let stem_norm = GroupNorm::new(c.stem, c.groups, ctx.vb.pp("stem_norm"))?;
        let mut macs = stem.macs(s);
        let mut width = c.stem;
        let mut blocks = Vec::new();
        for (i, &out) in c.channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let vb = ctx.vb.pp(format!("block{}", i + 1));
            let depthwise = Conv::new(width, width, 3, stride, 1, width, vb.pp("depthwise"))?;
            macs += depthwise.macs(s);
            s = depthwise.out_size(s);
            let pointwise = Conv::new(width, out, 1, 1, 0, 1, vb.pp("pointwise"))?;
            macs += pointwise.macs(s);
            blocks.push(SeparableBlock {
                depthwise,
                depthwise_norm: GroupNorm::new(width, c.groups, vb.pp("depthwise_norm"))?,
                pointwise,
                pointwise_norm: GroupNorm::new(out, c.groups, vb.pp("pointwise_norm"))?,
            });
            width = out;
        }
        let head = Linear::new(width, ctx.dataset.num_classes, ctx.vb.pp("head"))?;
        macs += head.macs();
        Ok(Box::new(MobileNet {
            stem,
            stem_norm,
            blocks,
            head,
            macs,
        }))
    }
}

impl Model for MobileNet {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let x = self.stem.forward(image("vision.mobilenet", inputs)?)?;
        let mut x = self.stem_norm.forward_relu(&x)?;
        let mut features = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.depthwise_norm.forward_relu(&b.depthwise.forward(&x)?)?;
            x = b.pointwise_norm.forward_relu(&b.pointwise.forward(&h)?)?;
            features.push((format!("block{}", i + 1), x.clone()));
        }
        let pooled = global_avg_pool(&x)?;
        features.push((PENULTIMATE.into(), pooled.clone()));
        Ok(output(self.head.forward(&pooled)?, features))
    }
    fn flops_per_sample(&self) -> u64 {
        self.macs
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct ResNetConfig {
    /// Width of the first stage; the second and third are 2x and 4x.
    width: usize,
    /// Basic blocks per stage.
    blocks: usize,
    /// Groups of the group normalisation.
    groups: usize,
    /// Stride of the stem convolution: 2 halves every stage's feature maps (and the cost).
    stem_stride: usize,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            width: 16,
            blocks: 1,
            groups: 8,
            stem_stride: 1,
        }
    }
}

struct BasicBlock {
    conv1: Conv,
    norm1: GroupNorm,
    conv2: Conv,
    norm2: GroupNorm,
    shortcut: Option<(Conv, GroupNorm)>,
}

impl BasicBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_relu(&self.conv1.forward(x)?)?;
        let h = self.norm2.forward(&self.conv2.forward(&h)?)?;
        let skip = match &self.shortcut {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?)?,
            None => x.clone(),
        };
        relu(&(h + skip)?)
    }
}

struct ResNet {
    stem: Conv,
    stem_norm: GroupNorm,
    stages: Vec<Vec<BasicBlock>>,
    head: Linear,
    macs: u64,
}

/// `vision.resnet`.
pub struct ResNetFactory;

impl ModelFactory for ResNetFactory {
    fn summary(&self) -> &str {
        "ResNet-style CNN: conv3x3 stem, 3 stages (width, 2x, 4x; stride 2 from stage 2) of `blocks` basic blocks with group norm; `width` 16, `blocks` 1, `groups` 8, `stem_stride` 1"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<ResNetConfig>()
    }
    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model vision.resnet";
        let c: ResNetConfig = config::parse(OWNER, cfg)?;
        config::require_positive(
            OWNER,
            &[
                ("width", c.width),
                ("blocks", c.blocks),
                ("groups", c.groups),
                ("stem_stride", c.stem_stride),
            ],
        )?;
        let (ch, mut s) = image_shape(OWNER, &ctx)?;
        let vb = &ctx.vb;
        let stem = Conv::new(ch, c.width, 3, c.stem_stride, 1, 1, vb.pp("stem"))?;
        let stem_norm = GroupNorm::new(c.width, c.groups, vb.pp("stem_norm"))?;
        let mut macs = stem.macs(s);
        s = stem.out_size(s);
        let mut width = c.width;
        let mut stages = Vec::new();
        for stage in 0..3 {
            let out = c.width << stage;
            let mut blocks = Vec::new();
            for b in 0..c.blocks {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let vb = vb.pp(format!("stage{}.{b}", stage + 1));
                let conv1 = Conv::new(width, out, 3, stride, 1, 1, vb.pp("conv1"))?;
                macs += conv1.macs(s);
                let s_out = conv1.out_size(s);
                let conv2 = Conv::new(out, out, 3, 1, 1, 1, vb.pp("conv2"))?;
                macs += conv2.macs(s_out);
                let shortcut = if stride != 1 || width != out {
                    let conv = Conv::new(width, out, 1, stride, 0, 1, vb.pp("shortcut"))?;
                    macs += conv.macs(s);
                    Some((conv, GroupNorm::new(out, c.groups, vb.pp("shortcut_norm"))?))
                } else {
                    None
                };
                blocks.push(BasicBlock {
                    norm1: GroupNorm::new(out, c.groups, vb.pp("norm1"))?,
                    norm2: GroupNorm::new(out, c.groups, vb.pp("norm2"))?,
                    conv1,
                    conv2,
                    shortcut,
                });
                width = out;
                s = s_out;
            }
            stages.push(blocks);
        }
        let head = Linear::new(width, ctx.dataset.num_classes, vb.pp("head"))?;
        macs += head.macs();
        Ok(Box::new(ResNet {
            stem,
            stem_norm,
            stages,
            head,
            macs,
        }))
    }
}

impl Model for ResNet {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let x = image("vision.resnet", inputs)?;
        let mut x = self.stem_norm.forward_relu(&self.stem.forward(x)?)?;
        let mut features = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(&x)?;
            }
            features.push((format!("stage{}", i + 1), x.clone()));
        }
        let pooled = global_avg_pool(&x)?;
        features.push((PENULTIMATE.into(), pooled.clone()));
        Ok(output(self.head.forward(&pooled)?, features))
    }
    fn flops_per_sample(&self) -> u64 {
        self.macs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SyntheticFactory;
    use distill_rt::candle::{DType, Device};
    use distill_rt::candle_nn::VarMap;
    use distill_rt::init::seeded_var_builder;
    use distill_rt::serde_json::json;
    use distill_rt::testing::{check_gradient_coverage, named_vars};
    use distill_rt::{DatasetFactory, Split, ops};

    /// Builds `factory` on a small synthetic set, runs one forward + backward on a real batch and
    /// checks gradient coverage, the logits' shape, the features and the FLOP count.
    fn check_model(
        factory: &dyn ModelFactory,
        cfg: Config,
        features: &[&str],
        size: usize,
        channels: usize,
    ) -> Result<()> {
        let data = SyntheticFactory.build(
            &json!({"train": 16, "validation": 4, "test": 4, "size": size, "channels": channels}),
        )?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let model = factory.build(&cfg, ctx)?;
        let batch = data.batch(Split::Train, &(0..8).collect::<Vec<_>>(), &Device::Cpu)?;
        let out = model.forward(&batch.inputs, true)?;
        assert_eq!(out.logits.dims(), &[8, 10]);
        for f in features.iter().chain(&[PENULTIMATE]) {
            let t = out
                .features
                .get(*f)
                .unwrap_or_else(|| panic!("feature {f} missing: {:?}", out.features.keys()));
            assert_eq!(t.dim(0)?, 8, "{f} is batch first");
        }
        let loss = ops::cross_entropy(&out.logits, &batch.targets)?;
        let l = loss.to_scalar::<f32>()?;
        // PyTorch-style init gives near-uniform predictions: the loss starts near ln(10).
        assert!((l - 10f32.ln()).abs() < 0.7, "initial loss {l}");
        let grads = loss.backward()?;
        check_gradient_coverage(&named_vars(&varmap), &[], &grads)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(model.flops_per_sample() > 0);
        Ok(())
    }

    #[test]
    fn mlp_passes_gradient_coverage() -> Result<()> {
        check_model(
            &MlpFactory,
            json!({"hidden": [32, 16]}),
            &["hidden1", "hidden2"],
            12,
            1,
        )
    }

    #[test]
    fn lenet_passes_gradient_coverage() -> Result<()> {
        check_model(&LeNetFactory, Config::Null, &["conv1", "conv2"], 16, 1)
    }

    #[test]
    fn mobilenet_passes_gradient_coverage() -> Result<()> {
        check_model(
            &MobileNetFactory,
            json!({"stem": 8, "channels": [8, 16]}),
            &["block1", "block2"],
            12,
            3,
        )
    }

    #[test]
    fn resnet_passes_gradient_coverage() -> Result<()> {
        check_model(
            &ResNetFactory,
            json!({"width": 8, "blocks": 2, "groups": 4}),
            &["stage1", "stage2", "stage3"],
            12,
            1,
        )
    }

    #[test]
    fn resnet_with_strided_stem_passes_gradient_coverage() -> Result<()> {
        check_model(
            &ResNetFactory,
            json!({"width": 8, "blocks": 1, "groups": 4, "stem_stride": 2}),
            &["stage1", "stage2", "stage3"],
            12,
            1,
        )
    }

    #[test]
    fn lenet_flops_match_hand_count() -> Result<()> {
        let data =
            SyntheticFactory.build(&json!({"train": 4, "validation": 2, "test": 2, "size": 28}))?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let model = LeNetFactory.build(&Config::Null, ctx)?;
        // conv1 28x28x6 x 25, conv2 10x10x16 x (6 x 25), fc 400x120, 120x84, 84x10.
        let want = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10;
        assert_eq!(model.flops_per_sample(), want as u64);
        Ok(())
    }
}
