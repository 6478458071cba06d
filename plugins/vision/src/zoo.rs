//! The CIFAR model zoo of RepDistiller and mdistiller, layer for layer, with batch norm and the
//! reference initialisation (convolutions Kaiming-normal over fan-out, batch norm 1 and 0):
//!
//! - `vision.resnet8`, `vision.resnet14`, `vision.resnet20`, `vision.resnet32`,
//!   `vision.resnet44`, `vision.resnet56`, `vision.resnet110`, `vision.resnet8x4`,
//!   `vision.resnet32x4`: the CIFAR ResNets (He et al. 2016; a 3x3 stem, three stages of
//!   `(depth - 2) / 6` basic blocks, 1x1 projection shortcuts with batch norm);
//! - `vision.wrn-16-2`, `vision.wrn-40-2`: wide ResNets (Zagoruyko & Komodakis 2016,
//!   pre-activation blocks, dropout inside the blocks);
//! - `vision.vgg8`, `vision.vgg13`: VGG with batch norm, five blocks, global average pooling;
//! - `vision.mobilenetv2`: RepDistiller's `mobile_half` (MobileNetV2, expansion 6, width 0.5);
//! - `vision.shufflenetv1`: ShuffleNet V1 (3 groups, stages of 240, 480 and 960 channels;
//!   PyTorch's default initialisation, as the reference).
//!
//! Features are those the reference strategies read (RepDistiller's `is_feat=True`): `stem`,
//! `stage1`..`stage3` (`stage4` for VGG and MobileNetV2) and `penultimate`, the pooled vector. Parameter counts
//! equal the reference models' (the tests pin them for 100 classes). The one configuration key
//! is `dropout`: inside each block for the wide ResNets (their `dropRate`), before the classifier
//! for the others (0, the reference, by default).

use distill_rt::candle::Tensor;
use distill_rt::candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use distill_rt::candle_nn::{Init, VarBuilder};
use distill_rt::kernels::{depthwise_conv, max_pool2d, relu};
use distill_rt::model::PENULTIMATE;
use distill_rt::nn::{BatchNorm, Dropout};
use distill_rt::serde::Deserialize;
use distill_rt::{
    Config, Error, Model, ModelContext, ModelFactory, ModelOutput, Result, TensorMap, config,
};

use crate::layers::{Conv, Linear, global_avg_pool};

/// The reference convolutions' initialisation: normal with standard deviation
/// `sqrt(2 / (k * k * out_channels))` (`kaiming_normal_(mode='fan_out')`).
const KAIMING_FAN_OUT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// A bias-free `kernel x kernel` convolution with the reference initialisation.
fn conv(input: usize, output: usize, kernel: usize, stride: usize, vb: VarBuilder) -> Result<Conv> {
    Conv::with_init(
        (input, output, kernel, stride, kernel / 2, 1),
        KAIMING_FAN_OUT,
        None,
        vb,
    )
}

/// Which network a zoo name builds.
#[derive(Clone, Copy, Debug)]
enum Arch {
    /// CIFAR ResNet of `depth` (6n + 2) with the stem's and the three stages' widths.
    ResNet { depth: usize, widths: [usize; 4] },
    /// Wide ResNet of `depth` (6n + 4) and widening factor `widen`.
    Wrn { depth: usize, widen: usize },
    /// VGG with batch norm: the widths of the convolutions of each of the five blocks.
    Vgg { blocks: [&'static [usize]; 5] },
    /// MobileNetV2 with expansion 6 and width multiplier 1/2.
    MobileNetV2,
    /// ShuffleNet V1 with 3 groups.
    ShuffleNetV1,
}

/// The CIFAR ResNets' widths (stem, then the three stages).
const RESNET: [usize; 4] = [16, 16, 32, 64];
/// The widths of RepDistiller's four-times-wider `resnet8x4` and `resnet32x4`.
const RESNET_X4: [usize; 4] = [32, 64, 128, 256];

/// The zoo's CIFAR ResNet of `depth` with `widths`.
const fn resnet(depth: usize, widths: [usize; 4]) -> ZooFactory {
    ZooFactory(Arch::ResNet { depth, widths })
}

/// The zoo: registered name, architecture and the reference's parameter count for 100
/// classes (PyTorch's `sum(p.numel() for p in model.parameters())`).
pub const ZOO: [(&str, ZooFactory, u64); 15] = [
    ("vision.resnet8x4", resnet(8, RESNET_X4), 1_233_540),
    ("vision.resnet32x4", resnet(32, RESNET_X4), 7_433_860),
    ("vision.resnet8", resnet(8, RESNET), 83_892),
    ("vision.resnet14", resnet(14, RESNET), 181_108),
    ("vision.resnet20", resnet(20, RESNET), 278_324),
    ("vision.resnet32", resnet(32, RESNET), 472_756),
    ("vision.resnet44", resnet(44, RESNET), 667_188),
    ("vision.resnet56", resnet(56, RESNET), 861_620),
    ("vision.resnet110", resnet(110, RESNET), 1_736_564),
    (
        "vision.wrn-16-2",
        ZooFactory(Arch::Wrn {
            depth: 16,
            widen: 2,
        }),
        703_284,
    ),
    (
        "vision.wrn-40-2",
        ZooFactory(Arch::Wrn {
            depth: 40,
            widen: 2,
        }),
        2_255_156,
    ),
    (
        "vision.vgg8",
        ZooFactory(Arch::Vgg {
            blocks: [&[64], &[128], &[256], &[512], &[512]],
        }),
        3_965_028,
    ),
    (
        "vision.vgg13",
        ZooFactory(Arch::Vgg {
            blocks: [
                &[64, 64],
                &[128, 128],
                &[256, 256],
                &[512, 512],
                &[512, 512],
            ],
        }),
        9_462_180,
    ),
    ("vision.mobilenetv2", ZooFactory(Arch::MobileNetV2), 812_836),
    (
        "vision.shufflenetv1",
        ZooFactory(Arch::ShuffleNetV1),
        949_258,
    ),
];

#[derive(Deserialize, distill_rt::serde::Serialize, Default)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct ZooConfig {
    /// Dropout probability (wide ResNets: inside each block; others: before the classifier).
    dropout: f64,
}

/// Builds one architecture of the zoo.
#[derive(Clone, Copy, Debug)]
pub struct ZooFactory(Arch);

impl ModelFactory for ZooFactory {
    fn summary(&self) -> &str {
        match self.0 {
            Arch::ResNet { .. } => {
                "CIFAR ResNet of RepDistiller (basic blocks, batch norm; features stem, stage1..3); `dropout` before the classifier"
            }
            Arch::Wrn { .. } => {
                "wide ResNet of RepDistiller (pre-activation blocks, batch norm; features stem, stage1..3); `dropout` in the blocks"
            }
            Arch::Vgg { .. } => {
                "VGG with batch norm of RepDistiller (five blocks, global average pooling; features stem, stage1..4); `dropout` before the classifier"
            }
            Arch::MobileNetV2 => {
                "MobileNetV2 of RepDistiller (mobile_half: expansion 6, width 0.5; features stem, stage1..4); `dropout` before the classifier"
            }
            Arch::ShuffleNetV1 => {
                "ShuffleNet V1 of RepDistiller (3 groups; features stem, stage1..3); `dropout` before the classifier"
            }
        }
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<ZooConfig>()
    }
    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model (CIFAR zoo)";
        let c: ZooConfig = config::parse(OWNER, cfg)?;
        let dropout = Dropout::new(c.dropout, ctx.seed, "zoo")
            .map_err(|e| Error::config(OWNER, "dropout", e.to_string()))?;
        let (channels, size) = match ctx
            .dataset
            .inputs
            .get(crate::data::IMAGE)
            .map(Vec::as_slice)
        {
            Some([c, h, w]) if h == w => (*c, *h),
            other => {
                return Err(Error::Invalid(format!(
                    "the CIFAR zoo needs square [c, h, w] images, the dataset gives {other:?}"
                )));
            }
        };
        let classes = ctx.dataset.num_classes;
        let vb = &ctx.vb;
        let net = match self.0 {
            Arch::ResNet { depth, widths } => {
                Net::ResNet(ResNet::new(depth, widths, channels, size, classes, vb)?)
            }
            Arch::Wrn { depth, widen } => Net::Wrn(Wrn::new(
                depth,
                widen,
                channels,
                size,
                classes,
                (c.dropout, ctx.seed),
                vb,
            )?),
            Arch::Vgg { blocks } => Net::Vgg(Vgg::new(blocks, channels, size, classes, vb)?),
            Arch::MobileNetV2 => Net::Mobile(MobileNetV2::new(channels, size, classes, vb)?),
            Arch::ShuffleNetV1 => Net::Shuffle(ShuffleNetV1::new(channels, size, classes, vb)?),
        };
        Ok(Box::new(ZooModel { net, dropout }))
    }
}

enum Net {
    ResNet(ResNet),
    Wrn(Wrn),
    Vgg(Vgg),
    Mobile(MobileNetV2),
    Shuffle(ShuffleNetV1),
}

struct ZooModel {
    net: Net,
    /// Before the classifier (ResNet, VGG).
    dropout: Dropout,
}

impl Model for ZooModel {
    fn forward(&self, inputs: &TensorMap, train: bool) -> Result<ModelOutput> {
        let x = inputs
            .get(crate::data::IMAGE)
            .ok_or_else(|| Error::Invalid("the CIFAR zoo needs the input `image`".into()))?;
        let (mut features, pooled, head) = match &self.net {
            Net::ResNet(n) => {
                let (f, p) = n.features(x, train)?;
                (f, self.dropout.forward(&p, train)?, &n.fc)
            }
            Net::Wrn(n) => {
                let (f, p) = n.features(x, train)?;
                (f, p, &n.fc)
            }
            Net::Vgg(n) => {
                let (f, p) = n.features(x, train)?;
                (f, self.dropout.forward(&p, train)?, &n.classifier)
            }
            Net::Mobile(n) => {
                let (f, p) = n.features(x, train)?;
                (f, self.dropout.forward(&p, train)?, &n.classifier)
            }
            Net::Shuffle(n) => {
                let (f, p) = n.features(x, train)?;
                (f, self.dropout.forward(&p, train)?, &n.linear)
            }
        };
        let logits = head.forward(&pooled)?;
        features.insert(PENULTIMATE.into(), pooled);
        Ok(ModelOutput { logits, features })
    }
    fn flops_per_sample(&self) -> u64 {
        match &self.net {
            Net::ResNet(n) => n.macs,
            Net::Wrn(n) => n.macs,
            Net::Vgg(n) => n.macs,
            Net::Mobile(n) => n.macs,
            Net::Shuffle(n) => n.macs,
        }
    }
}

/// A bias-free convolution of `(input, output, kernel, stride, groups)`, initialised with
/// `init`, followed by batch norm; adds its multiply-accumulates to `macs` and moves `size` to
/// its output's.
fn conv_bn(
    (input, output, kernel, stride, groups): (usize, usize, usize, usize, usize),
    init: Init,
    vb: (VarBuilder, VarBuilder),
    size: &mut usize,
    macs: &mut u64,
) -> Result<ConvBn> {
    let conv = Conv::with_init(
        (input, output, kernel, stride, kernel / 2, groups),
        init,
        None,
        vb.0,
    )?;
    *macs += conv.macs(*size);
    *size = conv.out_size(*size);
    Ok(ConvBn {
        conv,
        bn: BatchNorm::new(output, vb.1)?,
    })
}

/// A convolution followed by batch norm, counting its multiply-accumulates.
struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(
        (input, output, kernel, stride): (usize, usize, usize, usize),
        names: (&str, &str),
        vb: &VarBuilder,
        size: &mut usize,
        macs: &mut u64,
    ) -> Result<Self> {
        let conv = conv(input, output, kernel, stride, vb.pp(names.0))?;
        *macs += conv.macs(*size);
        *size = conv.out_size(*size);
        Ok(Self {
            conv,
            bn: BatchNorm::new(output, vb.pp(names.1))?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, train)
    }
    fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_relu(&self.conv.forward(x)?, train)
    }
}

// ---------------------------------------------------------------------------------------------

/// RepDistiller's `BasicBlock`: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.
struct ResBlock {
    first: ConvBn,
    second: ConvBn,
    shortcut: Option<ConvBn>,
}

struct ResNet {
    stem: ConvBn,
    stages: Vec<Vec<ResBlock>>,
    fc: Linear,
    macs: u64,
}

impl ResNet {
    fn new(
        depth: usize,
        widths: [usize; 4],
        channels: usize,
        mut size: usize,
        classes: usize,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let n = (depth - 2) / 6;
        let mut macs = 0;
        let stem = ConvBn::new(
            (channels, widths[0], 3, 1),
            ("conv1", "bn1"),
            vb,
            &mut size,
            &mut macs,
        )?;
        let mut input = widths[0];
        let mut stages = Vec::new();
        for (stage, &width) in widths[1..].iter().enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let vb = vb.pp(format!("layer{}.{b}", stage + 1));
                let mut shortcut_size = size;
                let shortcut = if stride != 1 || input != width {
                    Some(ConvBn::new(
                        (input, width, 1, stride),
                        ("downsample.0", "downsample.1"),
                        &vb,
                        &mut shortcut_size,
                        &mut macs,
                    )?)
                } else {
                    None
                };
                let first = ConvBn::new(
                    (input, width, 3, stride),
                    ("conv1", "bn1"),
                    &vb,
                    &mut size,
                    &mut macs,
                )?;
                let second = ConvBn::new(
                    (width, width, 3, 1),
                    ("conv2", "bn2"),
                    &vb,
                    &mut size,
                    &mut macs,
                )?;
                blocks.push(ResBlock {
                    first,
                    second,
                    shortcut,
                });
                input = width;
            }
            stages.push(blocks);
        }
        let fc = Linear::new(input, classes, vb.pp("fc"))?;
        macs += fc.macs();
        Ok(Self {
            stem,
            stages,
            fc,
            macs,
        })
    }

    fn features(&self, x: &Tensor, train: bool) -> Result<(TensorMap, Tensor)> {
        let mut features = TensorMap::new();
        let mut x = self.stem.forward_relu(x, train)?;
        features.insert("stem".into(), x.clone());
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                let h = block.first.forward_relu(&x, train)?;
                let h = block.second.forward(&h, train)?;
                let skip = match &block.shortcut {
                    Some(s) => s.forward(&x, train)?,
                    None => x.clone(),
                };
                x = relu(&(h + skip)?)?;
            }
            features.insert(format!("stage{}", i + 1), x.clone());
        }
        Ok((features, global_avg_pool(&x)?))
    }
}

// ---------------------------------------------------------------------------------------------

/// A pre-activation wide-ResNet block (RepDistiller's `wrn.BasicBlock`).
struct WideBlock {
    bn1: BatchNorm,
    conv1: Conv,
    bn2: BatchNorm,
    conv2: Conv,
    /// A 1x1 projection (no batch norm) when the width changes.
    shortcut: Option<Conv>,
    dropout: Dropout,
}

impl WideBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let act = self.bn1.forward_relu(x, train)?;
        let h = self.bn2.forward_relu(&self.conv1.forward(&act)?, train)?;
        let h = self.conv2.forward(&self.dropout.forward(&h, train)?)?;
        // The projection reads the activated input; an identity shortcut the raw one.
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(&act)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

struct Wrn {
    conv1: Conv,
    stages: Vec<Vec<WideBlock>>,
    bn: BatchNorm,
    fc: Linear,
    macs: u64,
}

impl Wrn {
    fn new(
        depth: usize,
        widen: usize,
        channels: usize,
        mut size: usize,
        classes: usize,
        (dropout, seed): (f64, u64),
        vb: &VarBuilder,
    ) -> Result<Self> {
        let n = (depth - 4) / 6;
        let widths = [16, 16 * widen, 32 * widen, 64 * widen];
        let conv1 = conv(channels, widths[0], 3, 1, vb.pp("conv1"))?;
        let mut macs = conv1.macs(size);
        let mut input = widths[0];
        let mut stages = Vec::new();
        for (stage, &width) in widths[1..].iter().enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let path = format!("block{}.layer.{b}", stage + 1);
                let vb = vb.pp(&path);
                let conv1 = conv(input, width, 3, stride, vb.pp("conv1"))?;
                let conv2 = conv(width, width, 3, 1, vb.pp("conv2"))?;
                let shortcut = if input != width {
                    let s = conv(input, width, 1, stride, vb.pp("convShortcut"))?;
                    macs += s.macs(size);
                    Some(s)
                } else {
                    None
                };
                macs += conv1.macs(size);
                size = conv1.out_size(size);
                macs += conv2.macs(size);
                blocks.push(WideBlock {
                    bn1: BatchNorm::new(input, vb.pp("bn1"))?,
                    conv1,
                    bn2: BatchNorm::new(width, vb.pp("bn2"))?,
                    conv2,
                    shortcut,
                    dropout: Dropout::new(dropout, seed, &path)?,
                });
                input = width;
            }
            stages.push(blocks);
        }
        let fc = Linear::with_init(
            input,
            classes,
            distill_rt::nn::fan_in_init(input),
            Init::Const(0.0),
            vb.pp("fc"),
        )?;
        macs += fc.macs();
        Ok(Self {
            conv1,
            stages,
            bn: BatchNorm::new(input, vb.pp("bn1"))?,
            fc,
            macs,
        })
    }

    fn features(&self, x: &Tensor, train: bool) -> Result<(TensorMap, Tensor)> {
        let mut features = TensorMap::new();
        let mut x = self.conv1.forward(x)?;
        features.insert("stem".into(), x.clone());
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(&x, train)?;
            }
            features.insert(format!("stage{}", i + 1), x.clone());
        }
        let x = self.bn.forward_relu(&x, train)?;
        Ok((features, global_avg_pool(&x)?))
    }
}

// ---------------------------------------------------------------------------------------------

struct Vgg {
    /// Each block's convolutions with batch norm; ReLU between them and after the block.
    blocks: Vec<Vec<ConvBn>>,
    /// Whether the input is large enough (64 pixels and more, as RepDistiller's `h == 64`) for
    /// a fourth max pooling before the last block.
    pool3: bool,
    classifier: Linear,
    macs: u64,
}

impl Vgg {
    fn new(
        widths: [&'static [usize]; 5],
        channels: usize,
        mut size: usize,
        classes: usize,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let pool3 = size >= 64;
        let mut macs = 0;
        let mut input = channels;
        let mut blocks = Vec::new();
        for (b, block_widths) in widths.iter().enumerate() {
            if b > 0 && (b < 4 || pool3) {
                size /= 2;
            }
            let mut block = Vec::new();
            for (i, &width) in block_widths.iter().enumerate() {
                // PyTorch's Sequential numbering: conv, bn, relu per convolution.
                let (c, n) = (format!("{}", 3 * i), format!("{}", 3 * i + 1));
                let vb = vb.pp(format!("block{b}"));
                let conv = Conv::with_init(
                    (input, width, 3, 1, 1, 1),
                    KAIMING_FAN_OUT,
                    Some(Init::Const(0.0)),
                    vb.pp(&c),
                )?;
                macs += conv.macs(size);
                block.push(ConvBn {
                    conv,
                    bn: BatchNorm::new(width, vb.pp(&n))?,
                });
                input = width;
            }
            blocks.push(block);
        }
        if size == 0 {
            return Err(Error::Invalid(
                "VGG pools four times: images need at least 8 pixels a side".into(),
            ));
        }
        let classifier = Linear::with_init(
            input,
            classes,
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            Init::Const(0.0),
            vb.pp("classifier"),
        )?;
        macs += classifier.macs();
        Ok(Self {
            blocks,
            pool3,
            classifier,
            macs,
        })
    }

    fn features(&self, x: &Tensor, train: bool) -> Result<(TensorMap, Tensor)> {
        let mut features = TensorMap::new();
        let mut x = x.clone();
        for (b, block) in self.blocks.iter().enumerate() {
            if b > 0 && (b < 4 || self.pool3) {
                x = max_pool2d(&x, 2)?;
            }
            for layer in block {
                x = layer.forward_relu(&x, train)?;
            }
            let name = if b == 0 {
                "stem".to_string()
            } else {
                format!("stage{b}")
            };
            features.insert(name, x.clone());
        }
        Ok((features, global_avg_pool(&x)?))
    }
}

// ---------------------------------------------------------------------------------------------

/// RepDistiller's `InvertedResidual`: 1x1 expansion, 3x3 depthwise, 1x1 projection, each with
/// batch norm (ReLU after the first two), and the input added when the shape allows.
struct Inverted {
    expand: ConvBn,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

struct MobileNetV2 {
    stem: ConvBn,
    /// The seven stages of inverted residual blocks.
    stages: Vec<Vec<Inverted>>,
    last: ConvBn,
    classifier: Linear,
    macs: u64,
}

impl MobileNetV2 {
    /// `mobile_half`: expansion 6 and width multiplier 1/2 of `(t, c, n, s)` =
    /// (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    /// (6, 320, 1, 1), a 1x1 convolution to 1280 channels, global average pooling.
    fn new(channels: usize, mut size: usize, classes: usize, vb: &VarBuilder) -> Result<Self> {
        const SETTING: [(usize, usize, usize, usize); 7] = [
            (1, 16, 1, 1),
            (6, 24, 2, 1),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ];
        let mut macs = 0;
        let pair = |p: &str| (vb.pp(format!("{p}.0")), vb.pp(format!("{p}.1")));
        let stem = conv_bn(
            (channels, 16, 3, 2, 1),
            KAIMING_FAN_OUT,
            pair("conv1"),
            &mut size,
            &mut macs,
        )?;
        let mut input = 16;
        let mut stages = Vec::new();
        for (i, &(t, c, n, s)) in SETTING.iter().enumerate() {
            let output = c / 2;
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if b == 0 { s } else { 1 };
                let wide = input * t;
                let at = |k: usize| {
                    let p = format!("blocks.{i}.{b}.conv");
                    (vb.pp(format!("{p}.{k}")), vb.pp(format!("{p}.{}", k + 1)))
                };
                blocks.push(Inverted {
                    expand: conv_bn(
                        (input, wide, 1, 1, 1),
                        KAIMING_FAN_OUT,
                        at(0),
                        &mut size,
                        &mut macs,
                    )?,
                    depthwise: conv_bn(
                        (wide, wide, 3, stride, wide),
                        KAIMING_FAN_OUT,
                        at(3),
                        &mut size,
                        &mut macs,
                    )?,
                    project: conv_bn(
                        (wide, output, 1, 1, 1),
                        KAIMING_FAN_OUT,
                        at(6),
                        &mut size,
                        &mut macs,
                    )?,
                    residual: stride == 1 && input == output,
                });
                input = output;
            }
            stages.push(blocks);
        }
        let last = conv_bn(
            (input, 1280, 1, 1, 1),
            KAIMING_FAN_OUT,
            pair("conv2"),
            &mut size,
            &mut macs,
        )?;
        let classifier = Linear::with_init(
            1280,
            classes,
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            Init::Const(0.0),
            vb.pp("classifier.0"),
        )?;
        macs += classifier.macs();
        Ok(Self {
            stem,
            stages,
            last,
            classifier,
            macs,
        })
    }

    fn features(&self, x: &Tensor, train: bool) -> Result<(TensorMap, Tensor)> {
        let mut features = TensorMap::new();
        let mut x = self.stem.forward_relu(x, train)?;
        features.insert("stem".into(), x.clone());
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                let h = block.expand.forward_relu(&x, train)?;
                let h = block.depthwise.forward_relu(&h, train)?;
                let h = block.project.forward(&h, train)?;
                x = if block.residual { (x + h)? } else { h };
            }
            // RepDistiller's f1..f4: after the second, third, fifth and seventh stage.
            let feature = match i {
                1 => Some("stage1"),
                2 => Some("stage2"),
                4 => Some("stage3"),
                6 => Some("stage4"),
                _ => None,
            };
            if let Some(name) = feature {
                features.insert(name.into(), x.clone());
            }
        }
        let x = self.last.forward_relu(&x, train)?;
        Ok((features, global_avg_pool(&x)?))
    }
}

// ---------------------------------------------------------------------------------------------

/// A ShuffleNet V1 unit: grouped 1x1 convolution, channel shuffle, 3x3 depthwise convolution,
/// grouped 1x1 convolution; a stride-2 unit concatenates a 3x3 average pooling of its input,
/// the others add the input.
struct ShuffleUnit {
    reduce: ConvBn,
    /// Groups of the first convolution, which the shuffle interleaves.
    shuffle: usize,
    depthwise: ConvBn,
    expand: ConvBn,
    /// A 3x3 average pooling with stride 2 and zero padding counted (PyTorch's
    /// `AvgPool2d(3, stride=2, padding=1)`), as a depthwise convolution with weights 1/9.
    pool: Option<Tensor>,
}

struct ShuffleNetV1 {
    stem: ConvBn,
    stages: Vec<Vec<ShuffleUnit>>,
    linear: Linear,
    macs: u64,
}

impl ShuffleNetV1 {
    /// Three groups; stages of 4, 8 and 4 units with 240, 480 and 960 output channels.
    fn new(channels: usize, mut size: usize, classes: usize, vb: &VarBuilder) -> Result<Self> {
        const GROUPS: usize = 3;
        let init = |fan_in: usize| distill_rt::nn::fan_in_init(fan_in);
        let mut macs = 0;
        let stem = conv_bn(
            (channels, 24, 1, 1, 1),
            init(channels),
            (vb.pp("conv1"), vb.pp("bn1")),
            &mut size,
            &mut macs,
        )?;
        let mut input = 24;
        let mut stages = Vec::new();
        for (l, (&planes, &units)) in [240usize, 480, 960].iter().zip(&[4usize, 8, 4]).enumerate() {
            let mut blocks = Vec::new();
            for u in 0..units {
                let stride = if u == 0 { 2 } else { 1 };
                let output = if u == 0 { planes - input } else { planes };
                let mid = output / 4;
                let g = if input == 24 { 1 } else { GROUPS };
                let vb = vb.pp(format!("layer{}.{u}", l + 1));
                let names = |c: &str, b: &str| (vb.pp(c), vb.pp(b));
                let mut inner = size;
                let reduce = conv_bn(
                    (input, mid, 1, 1, g),
                    init(input / g),
                    names("conv1", "bn1"),
                    &mut inner,
                    &mut macs,
                )?;
                let depthwise = conv_bn(
                    (mid, mid, 3, stride, mid),
                    init(9),
                    names("conv2", "bn2"),
                    &mut inner,
                    &mut macs,
                )?;
                let expand = conv_bn(
                    (mid, output, 1, 1, GROUPS),
                    init(mid / GROUPS),
                    names("conv3", "bn3"),
                    &mut inner,
                    &mut macs,
                )?;
                let pool = if stride == 2 {
                    Some(
                        Tensor::full(1.0f32 / 9.0, (input, 1, 3, 3), vb.device())?
                            .to_dtype(vb.dtype())?,
                    )
                } else {
                    None
                };
                blocks.push(ShuffleUnit {
                    reduce,
                    shuffle: g,
                    depthwise,
                    expand,
                    pool,
                });
                size = inner;
                input = planes;
            }
            stages.push(blocks);
        }
        let linear = Linear::new(input, classes, vb.pp("linear"))?;
        macs += linear.macs();
        Ok(Self {
            stem,
            stages,
            linear,
            macs,
        })
    }

    fn features(&self, x: &Tensor, train: bool) -> Result<(TensorMap, Tensor)> {
        let mut features = TensorMap::new();
        let mut x = self.stem.forward_relu(x, train)?;
        features.insert("stem".into(), x.clone());
        for (i, stage) in self.stages.iter().enumerate() {
            for unit in stage {
                let h = unit.reduce.forward_relu(&x, train)?;
                let h = channel_shuffle(&h, unit.shuffle)?;
                let h = unit.depthwise.forward_relu(&h, train)?;
                let h = unit.expand.forward(&h, train)?;
                x = match &unit.pool {
                    Some(w) => relu(&Tensor::cat(&[h, depthwise_conv(&x, w, 1, 2)?], 1)?)?,
                    None => relu(&(h + x)?)?,
                };
            }
            features.insert(format!("stage{}", i + 1), x.clone());
        }
        Ok((features, global_avg_pool(&x)?))
    }
}

/// ShuffleNet's channel shuffle: `[n, g * c, h, w] -> [n, g, c, h, w] -> [n, c, g, h, w]`, flat.
fn channel_shuffle(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, groups, c / groups, h, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::candle::{DType, Device};
    use distill_rt::candle_nn::VarMap;
    use distill_rt::data::{DatasetInfo, TaskKind};
    use distill_rt::init::seeded_var_builder;
    use distill_rt::testing::{check_gradient_coverage, named_vars, split_frozen};
    use std::collections::BTreeMap;

    fn info(channels: usize, size: usize, classes: usize) -> DatasetInfo {
        DatasetInfo {
            task: TaskKind::Classification,
            num_classes: classes,
            inputs: BTreeMap::from([(crate::data::IMAGE.to_string(), vec![channels, size, size])]),
            cardinality: BTreeMap::new(),
            split_sizes: [8, 2, 2],
            primary_metric: "accuracy".into(),
        }
    }

    fn build(
        factory: &ZooFactory,
        info: &DatasetInfo,
        cfg: Config,
    ) -> Result<(Box<dyn Model>, VarMap)> {
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: info,
            seed: 3,
            vb: seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu),
        };
        Ok((factory.build(&cfg, ctx)?, varmap))
    }

    /// The zoo's factory of `name`.
    fn zoo(name: &str) -> ZooFactory {
        ZOO.iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, f, _)| *f)
            .unwrap_or_else(|| panic!("{name} is not in the zoo"))
    }

    #[test]
    fn parameter_counts_equal_the_reference_models() -> Result<()> {
        let cifar100 = info(3, 32, 100);
        for (name, factory, want) in ZOO {
            let (_, varmap) = build(&factory, &cifar100, Config::Null)?;
            let got: u64 = named_vars(&varmap)
                .iter()
                .filter(|(n, _)| !distill_rt::nn::is_buffer(n))
                .map(|(_, v)| v.as_tensor().elem_count() as u64)
                .sum();
            assert_eq!(got, want, "{name}");
        }
        Ok(())
    }

    /// Every trainable variable gets a finite, non-zero gradient in training mode; buffers get
    /// none and change; features have the reference's shapes.
    #[test]
    fn every_model_passes_gradient_coverage_with_the_reference_feature_shapes() -> Result<()> {
        let data = info(3, 32, 10);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)?;
        let inputs = TensorMap::from([(crate::data::IMAGE.to_string(), x)]);
        let shapes = |name: &str| -> Vec<(&'static str, Vec<usize>)> {
            let res = |w: [usize; 4]| {
                vec![
                    ("stem", vec![w[0], 32, 32]),
                    ("stage1", vec![w[1], 32, 32]),
                    ("stage2", vec![w[2], 16, 16]),
                    ("stage3", vec![w[3], 8, 8]),
                    (PENULTIMATE, vec![w[3]]),
                ]
            };
            match name {
                "vision.resnet8x4" | "vision.resnet32x4" => res([32, 64, 128, 256]),
                "vision.wrn-16-2" | "vision.wrn-40-2" => res([16, 32, 64, 128]),
                "vision.mobilenetv2" => vec![
                    ("stem", vec![16, 16, 16]),
                    ("stage1", vec![12, 16, 16]),
                    ("stage2", vec![16, 8, 8]),
                    ("stage3", vec![48, 4, 4]),
                    ("stage4", vec![160, 2, 2]),
                    (PENULTIMATE, vec![1280]),
                ],
                "vision.shufflenetv1" => vec![
                    ("stem", vec![24, 32, 32]),
                    ("stage1", vec![240, 16, 16]),
                    ("stage2", vec![480, 8, 8]),
                    ("stage3", vec![960, 4, 4]),
                    (PENULTIMATE, vec![960]),
                ],
                "vision.vgg8" | "vision.vgg13" => vec![
                    ("stem", vec![64, 32, 32]),
                    ("stage1", vec![128, 16, 16]),
                    ("stage2", vec![256, 8, 8]),
                    ("stage3", vec![512, 4, 4]),
                    ("stage4", vec![512, 4, 4]),
                    (PENULTIMATE, vec![512]),
                ],
                _ => res([16, 16, 32, 64]),
            }
        };
        // The deeper ResNets repeat resnet20's blocks: resnet8 and resnet20 stand for them here.
        let deep = [
            "vision.resnet14",
            "vision.resnet32",
            "vision.resnet44",
            "vision.resnet56",
            "vision.resnet110",
        ];
        for (name, factory, _) in ZOO.iter().filter(|(n, _, _)| !deep.contains(n)) {
            let (model, varmap) = build(factory, &data, Config::Null)?;
            let before = named_vars(&varmap)
                .into_iter()
                .filter(|(n, _)| distill_rt::nn::is_buffer(n))
                .map(|(n, v)| Ok((n, v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
                .collect::<Result<Vec<_>>>()?;
            assert!(!before.is_empty(), "{name} has no batch norm");
            let out = model.forward(&inputs, true)?;
            assert_eq!(out.logits.dims(), &[2, 10], "{name}");
            let got: Vec<(String, Vec<usize>)> = out.feature_shapes().into_iter().collect();
            let mut want: Vec<(String, Vec<usize>)> = shapes(name)
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect();
            want.sort();
            assert_eq!(got, want, "{name}");
            let weights = Tensor::randn(0f32, 1.0, (2, 10), &Device::Cpu)?;
            let grads = (out.logits * weights)?.sum_all()?.backward()?;
            let (trainable, frozen) = split_frozen(named_vars(&varmap), &[]);
            let frozen: Vec<(String, Tensor)> = frozen
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            check_gradient_coverage(&trainable, &frozen, &grads)
                .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
            for (n, old) in before {
                let now = named_vars(&varmap)
                    .into_iter()
                    .find(|(m, _)| *m == n)
                    .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
                    .transpose()?;
                assert_ne!(now, Some(old), "{name}: {n} did not move in training mode");
            }
        }
        Ok(())
    }

    #[test]
    fn evaluation_mode_is_deterministic_and_leaves_the_statistics_alone() -> Result<()> {
        let data = info(1, 28, 10);
        let (model, varmap) = build(&zoo("vision.resnet20"), &data, Config::Null)?;
        let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &Device::Cpu)?;
        let inputs = TensorMap::from([(crate::data::IMAGE.to_string(), x)]);
        let stats = || -> Result<Vec<f32>> {
            let mut all = Vec::new();
            for (n, v) in named_vars(&varmap) {
                if distill_rt::nn::is_buffer(&n) {
                    all.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
                }
            }
            Ok(all)
        };
        let before = stats()?;
        let a = model.forward(&inputs, false)?.logits.to_vec2::<f32>()?;
        let b = model.forward(&inputs, false)?.logits.to_vec2::<f32>()?;
        assert_eq!(a, b);
        assert_eq!(stats()?, before);
        // One sample alone gives the same logits as in a batch: evaluation uses no batch
        // statistics.
        let one = TensorMap::from([(
            crate::data::IMAGE.to_string(),
            inputs[crate::data::IMAGE].narrow(0, 1, 1)?,
        )]);
        let alone = model.forward(&one, false)?.logits.to_vec2::<f32>()?;
        for (x, y) in alone[0].iter().zip(&a[1]) {
            assert!((x - y).abs() < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn a_bad_dropout_names_the_key() {
        let data = info(3, 32, 10);
        let err = build(
            &zoo("vision.wrn-16-2"),
            &data,
            distill_rt::serde_json::json!({"dropout": 1.5}),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("dropout"), "{err}");
    }
}
