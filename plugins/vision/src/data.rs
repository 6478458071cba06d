//! The vision datasets: `vision.synthetic` (the default; no files), `vision.idx` (MNIST,
//! Fashion-MNIST), `vision.cifar10`, `vision.cifar100` and `vision.folder` (a user's images). Validation (and, when a source has no test files, test)
//! splits are carved from the training source by a seeded shuffle. Inputs are one tensor named
//! `image`, `[batch, channels, height, width]`, pixels scaled to `[0, 1]` and, by default,
//! normalised per channel with the training split's mean and standard deviation. Every dataset
//! takes an `augment` table ([`Augment`]) for its training batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distill_rt::candle::{Device, Tensor};
use distill_rt::metrics::ClassificationMetrics;
use distill_rt::rng::Rng;
use distill_rt::serde::Deserialize;
use distill_rt::{
    Batch, Config, Dataset, DatasetFactory, DatasetInfo, Error, MetricAccumulator, Result, Split,
    TaskKind, assets, config,
};

use crate::augment::{Augment, Geometry, crop_flip_normalise};
use crate::images::{Cifar100Labels, Images, load_cifar10, load_cifar100, load_idx};

/// Name of the model input every vision dataset provides.
pub const IMAGE: &str = "image";

/// A vision dataset in memory.
pub(crate) struct VisionData {
    info: DatasetInfo,
    splits: [Images; 3],
    mean: Vec<f32>,
    std: Vec<f32>,
    augment: Augment,
}

impl VisionData {
    /// Builds the dataset from its splits; `normalize` uses the training split's statistics.
    /// `num_classes` defaults to the largest label seen plus one.
    pub(crate) fn new(
        splits: [Images; 3],
        num_classes: Option<usize>,
        normalize: bool,
        augment: Augment,
    ) -> Result<Self> {
        let train = &splits[0];
        if train.len() == 0 {
            return Err(Error::Invalid("the training split is empty".into()));
        }
        let seen = splits
            .iter()
            .flat_map(|s| s.labels.iter())
            .max()
            .map_or(0, |m| *m as usize + 1);
        let num_classes = num_classes.unwrap_or(seen).max(seen);
        let (mean, std) = if normalize {
            channel_stats(train)
        } else {
            (vec![0.0; train.channels], vec![1.0; train.channels])
        };
        let info = DatasetInfo {
            task: TaskKind::Classification,
            num_classes,
            inputs: BTreeMap::from([(
                IMAGE.to_string(),
                vec![train.channels, train.height, train.width],
            )]),
            cardinality: BTreeMap::new(),
            split_sizes: [splits[0].len(), splits[1].len(), splits[2].len()],
            primary_metric: "accuracy".into(),
        };
        Ok(Self {
            info,
            splits,
            mean,
            std,
            augment,
        })
    }

    /// `split`'s images, with every index in range.
    fn checked(&self, split: Split, indices: &[usize]) -> Result<&Images> {
        let images = &self.splits[split as usize];
        match indices.iter().find(|&&i| i >= images.len()) {
            Some(i) => Err(Error::Invalid(format!(
                "index {i} out of range for the {} split of {}",
                split.name(),
                images.len()
            ))),
            None => Ok(images),
        }
    }
}

/// Per-channel mean and standard deviation of pixels scaled to `[0, 1]`.
fn channel_stats(images: &Images) -> (Vec<f32>, Vec<f32>) {
    let plane = images.height * images.width;
    let mut sum = vec![0f64; images.channels];
    let mut sq = vec![0f64; images.channels];
    for i in 0..images.len() {
        for (c, chunk) in images.image(i).chunks_exact(plane).enumerate() {
            for &p in chunk {
                let v = f64::from(p) / 255.0;
                sum[c] += v;
                sq[c] += v * v;
            }
        }
    }
    let n = (images.len() * plane) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| ((q / n - m * m).max(1e-12)).sqrt() as f32)
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

impl Dataset for VisionData {
    fn info(&self) -> &DatasetInfo {
        &self.info
    }

    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        let images = self.checked(split, indices)?;
        let shape = images.shape();
        let mut pixels = Vec::with_capacity(indices.len() * images.image_len());
        for &i in indices {
            crop_flip_normalise(
                images.image(i),
                shape,
                0,
                Geometry::IDENTITY,
                (&self.mean, &self.std),
                &mut pixels,
            );
        }
        let labels = indices.iter().map(|&i| images.labels[i]).collect();
        self.assemble(images, indices, pixels, labels, None, device)
    }

    /// Crops, flips and mixes as `augment` says, each sample's draws keyed by the run's seed,
    /// the epoch and its index.
    fn train_batch(
        &self,
        epoch: usize,
        seed: u64,
        indices: &[usize],
        device: &Device,
    ) -> Result<Batch> {
        if !self.augment.any() {
            return self.batch(Split::Train, indices, device);
        }
        let images = self.checked(Split::Train, indices)?;
        let shape = images.shape();
        let mut rngs: Vec<Rng> = indices
            .iter()
            .map(|i| Rng::derive(seed, &format!("augment/{epoch}/{i}")))
            .collect();
        let mut pixels = Vec::with_capacity(indices.len() * images.image_len());
        for (&i, rng) in indices.iter().zip(&mut rngs) {
            let g = self.augment.geometry(rng);
            crop_flip_normalise(
                images.image(i),
                shape,
                self.augment.crop_padding,
                g,
                (&self.mean, &self.std),
                &mut pixels,
            );
        }
        let labels: Vec<u32> = indices.iter().map(|&i| images.labels[i]).collect();
        if !self.augment.mixes() {
            return self.assemble(images, indices, pixels, labels, None, device);
        }
        let classes = self.info.num_classes;
        let (pixels, probs) = self
            .augment
            .mix(&pixels, &labels, shape, classes, &mut rngs);
        // Each sample's dominant class (its own on a tie) stands in for metrics.
        let dominant = probs
            .chunks_exact(classes)
            .zip(&labels)
            .map(|(row, &own)| {
                let mut best = own;
                for (c, p) in (0u32..).zip(row) {
                    if *p > row[best as usize] {
                        best = c;
                    }
                }
                best
            })
            .collect();
        let soft = Tensor::from_vec(probs, (indices.len(), classes), device)?;
        self.assemble(images, indices, pixels, dominant, Some(soft), device)
    }

    fn augments(&self) -> bool {
        self.augment.any()
    }

    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
        Ok(Box::new(ClassificationMetrics::new(self.info.num_classes)))
    }
}

impl VisionData {
    /// A batch of `images`' shape from normalised `pixels` and targets.
    fn assemble(
        &self,
        images: &Images,
        indices: &[usize],
        pixels: Vec<f32>,
        labels: Vec<u32>,
        soft_targets: Option<Tensor>,
        device: &Device,
    ) -> Result<Batch> {
        let shape = (indices.len(), images.channels, images.height, images.width);
        let index_values: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        Ok(Batch {
            inputs: BTreeMap::from([(IMAGE.to_string(), Tensor::from_vec(pixels, shape, device)?)]),
            targets: Tensor::from_vec(labels, indices.len(), device)?,
            soft_targets,
            indices: Tensor::from_vec(index_values, indices.len(), device)?,
        })
    }
}

/// How splits are carved from a training source.
pub(crate) struct Carve {
    pub(crate) validation_fraction: f64,
    pub(crate) test_fraction: f64,
    pub(crate) max_train: Option<usize>,
    pub(crate) split_seed: u64,
}

/// Splits `source` into train, validation and (when `test` is `None`) test, by a seeded shuffle.
pub(crate) fn carve(
    owner: &str,
    source: Images,
    test: Option<Images>,
    c: &Carve,
) -> Result<[Images; 3]> {
    for (key, v) in [
        ("validation_fraction", c.validation_fraction),
        ("test_fraction", c.test_fraction),
    ] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::config(
                owner,
                key,
                format!("must be in [0, 1), got {v}"),
            ));
        }
    }
    let mut order: Vec<usize> = (0..source.len()).collect();
    Rng::derive(c.split_seed, "split").shuffle(&mut order);
    let n = order.len();
    let n_test = if test.is_none() {
        (n as f64 * c.test_fraction).round() as usize
    } else {
        0
    };
    let n_val = (n as f64 * c.validation_fraction).round() as usize;
    if n_test + n_val >= n {
        return Err(Error::config(
            owner,
            "validation_fraction",
            "leaves no training samples",
        ));
    }
    let (test_idx, rest) = order.split_at(n_test);
    let (val_idx, train_idx) = rest.split_at(n_val);
    let train_idx = match c.max_train {
        Some(m) if m < train_idx.len() => &train_idx[..m],
        _ => train_idx,
    };
    let test = match test {
        Some(t) => t,
        None if n_test == 0 => {
            return Err(Error::config(
                owner,
                "test_fraction",
                "the source has no test files: set test_fraction > 0",
            ));
        }
        None => source.select(test_idx),
    };
    Ok([source.select(train_idx), source.select(val_idx), test])
}

fn default_validation() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct IdxConfig {
    /// Folder holding the IDX files (instead of `data`).
    #[serde(default)]
    path: Option<PathBuf>,
    /// The data set's name (`mnist`, `fashion-mnist`, `mnist-t10k`), fetched and verified into
    /// the data cache.
    #[serde(default)]
    data: Option<String>,
    /// File prefix of the training source (`train` -> `train-images-idx3-ubyte[.gz]`).
    #[serde(default = "default_train_prefix")]
    train: String,
    /// File prefix of the test set; empty to carve the test split from the training source.
    #[serde(default = "default_test_prefix")]
    test: String,
    #[serde(default = "default_validation")]
    validation_fraction: f64,
    #[serde(default)]
    test_fraction: f64,
    #[serde(default)]
    max_train: Option<usize>,
    #[serde(default)]
    split_seed: u64,
    #[serde(default = "default_true")]
    normalize: bool,
    /// Training-time augmentation.
    #[serde(default)]
    augment: Augment,
}

fn default_train_prefix() -> String {
    "train".into()
}
fn default_test_prefix() -> String {
    "t10k".into()
}

fn require_dir(owner: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(Error::config(
            owner,
            "path",
            format!("{} is not a folder", path.display()),
        ))
    }
}

/// `vision.idx`: MNIST-format files (MNIST, Fashion-MNIST).
pub struct IdxFactory;

impl DatasetFactory for IdxFactory {
    fn summary(&self) -> &str {
        "IDX image files (raw or gzip): `data` (`mnist`, `fashion-mnist`, `mnist-t10k`; fetched into the data cache) or a `path` folder; validation carved from train"
    }
    fn defaults(&self) -> Config {
        config::defaults_with_required::<IdxConfig>(&[])
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset vision.idx";
        let c: IdxConfig = config::parse(OWNER, cfg)?;
        c.augment.validate(OWNER)?;
        let dir = assets::folder(OWNER, c.path.as_deref(), c.data.as_deref())?;
        require_dir(OWNER, &dir)?;
        let source = load_idx(&dir, &c.train)?;
        let test = if c.test.is_empty() {
            None
        } else {
            Some(load_idx(&dir, &c.test)?)
        };
        let carve_cfg = Carve {
            validation_fraction: c.validation_fraction,
            test_fraction: c.test_fraction,
            max_train: c.max_train,
            split_seed: c.split_seed,
        };
        Ok(Box::new(VisionData::new(
            carve(OWNER, source, test, &carve_cfg)?,
            None,
            c.normalize,
            c.augment,
        )?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct CifarConfig {
    /// Folder of the binary batches (instead of `data`).
    #[serde(default)]
    path: Option<PathBuf>,
    /// The data set's name, fetched and verified into the data cache.
    #[serde(default = "cifar10_data")]
    data: Option<String>,
    #[serde(default = "default_validation")]
    validation_fraction: f64,
    #[serde(default)]
    max_train: Option<usize>,
    #[serde(default)]
    split_seed: u64,
    #[serde(default = "default_true")]
    normalize: bool,
    /// Training-time augmentation.
    #[serde(default)]
    augment: Augment,
}

fn cifar10_data() -> Option<String> {
    Some("cifar-10".into())
}

/// `vision.cifar10`: the CIFAR-10 binary version.
pub struct Cifar10Factory;

impl DatasetFactory for Cifar10Factory {
    fn summary(&self) -> &str {
        "CIFAR-10 binary batches (data_batch_1..5.bin, test_batch.bin): `data` (`cifar-10`, fetched into the data cache) or a `path` folder"
    }
    fn defaults(&self) -> Config {
        config::defaults_with_required::<CifarConfig>(&[])
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset vision.cifar10";
        let c: CifarConfig = config::parse(OWNER, cfg)?;
        c.augment.validate(OWNER)?;
        let dir = assets::folder(OWNER, c.path.as_deref(), c.data.as_deref())?;
        require_dir(OWNER, &dir)?;
        let train_files = [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ];
        let source = load_cifar10(&dir, &train_files)?;
        let test = load_cifar10(&dir, &["test_batch.bin"])?;
        let carve_cfg = Carve {
            validation_fraction: c.validation_fraction,
            test_fraction: 0.0,
            max_train: c.max_train,
            split_seed: c.split_seed,
        };
        Ok(Box::new(VisionData::new(
            carve(OWNER, source, Some(test), &carve_cfg)?,
            Some(10),
            c.normalize,
            c.augment,
        )?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct Cifar100Config {
    /// Folder of `train.bin` and `test.bin` (instead of `data`).
    #[serde(default)]
    path: Option<PathBuf>,
    /// The data set's name, fetched and verified into the data cache.
    #[serde(default = "cifar100_data")]
    data: Option<String>,
    /// `fine` (100 classes) or `coarse` (20 superclasses).
    #[serde(default = "fine")]
    labels: String,
    #[serde(default = "default_validation")]
    validation_fraction: f64,
    #[serde(default)]
    max_train: Option<usize>,
    #[serde(default)]
    split_seed: u64,
    #[serde(default = "default_true")]
    normalize: bool,
    /// Training-time augmentation.
    #[serde(default)]
    augment: Augment,
}

fn cifar100_data() -> Option<String> {
    Some("cifar-100".into())
}
fn fine() -> String {
    "fine".into()
}

/// `vision.cifar100`: the CIFAR-100 binary version, fine or coarse labels.
pub struct Cifar100Factory;

impl DatasetFactory for Cifar100Factory {
    fn summary(&self) -> &str {
        "CIFAR-100 binary files (train.bin, test.bin): `data` (`cifar-100`, fetched into the data cache) or a `path` folder; `labels` fine (100) or coarse (20)"
    }
    fn defaults(&self) -> Config {
        config::defaults_with_required::<Cifar100Config>(&[])
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset vision.cifar100";
        let c: Cifar100Config = config::parse(OWNER, cfg)?;
        c.augment.validate(OWNER)?;
        let (labels, classes) = match c.labels.as_str() {
            "fine" => (Cifar100Labels::Fine, 100),
            "coarse" => (Cifar100Labels::Coarse, 20),
            other => {
                return Err(Error::config(
                    OWNER,
                    "labels",
                    format!("must be `fine` or `coarse`, got `{other}`"),
                ));
            }
        };
        let dir = assets::folder(OWNER, c.path.as_deref(), c.data.as_deref())?;
        require_dir(OWNER, &dir)?;
        let source = load_cifar100(&dir, &["train.bin"], labels)?;
        let test = load_cifar100(&dir, &["test.bin"], labels)?;
        let carve_cfg = Carve {
            validation_fraction: c.validation_fraction,
            test_fraction: 0.0,
            max_train: c.max_train,
            split_seed: c.split_seed,
        };
        Ok(Box::new(VisionData::new(
            carve(OWNER, source, Some(test), &carve_cfg)?,
            Some(classes),
            c.normalize,
            c.augment,
        )?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct SyntheticConfig {
    classes: usize,
    channels: usize,
    size: usize,
    train: usize,
    validation: usize,
    test: usize,
    /// Standard deviation of the pixel noise, in grey levels (0-255).
    noise: f64,
    seed: u64,
    /// Training-time augmentation.
    augment: Augment,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            classes: 10,
            channels: 1,
            size: 16,
            train: 2000,
            validation: 500,
            test: 500,
            noise: 60.0,
            seed: 0,
            augment: Augment::default(),
        }
    }
}

/// `vision.synthetic`: class prototypes made of a few Gaussian blobs, shifted by up to one pixel
/// and blurred by noise. Deterministic for a seed; learnable, but not by a linear model at once.
pub struct SyntheticFactory;

/// Generates `n` images of the synthetic task from `rng`.
fn synthetic_split(
    c: &SyntheticConfig,
    prototypes: &[Vec<f64>],
    n: usize,
    rng: &mut Rng,
) -> Images {
    let (s, ch) = (c.size, c.channels);
    let mut out = Images {
        channels: ch,
        height: s,
        width: s,
        ..Default::default()
    };
    for _ in 0..n {
        let label = rng.below(c.classes);
        let (dx, dy) = (rng.below(3) as isize - 1, rng.below(3) as isize - 1);
        let proto = &prototypes[label];
        for k in 0..ch {
            for y in 0..s {
                for x in 0..s {
                    let (sy, sx) = (y as isize - dy, x as isize - dx);
                    let base = if (0..s as isize).contains(&sy) && (0..s as isize).contains(&sx) {
                        proto[k * s * s + sy as usize * s + sx as usize]
                    } else {
                        0.0
                    };
                    out.pixels
                        .push((base + c.noise * rng.normal()).clamp(0.0, 255.0) as u8);
                }
            }
        }
        out.labels.push(label as u32);
    }
    out
}

impl DatasetFactory for SyntheticFactory {
    fn summary(&self) -> &str {
        "deterministic synthetic images (class prototypes of Gaussian blobs + shift + noise); no files"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<SyntheticConfig>()
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset vision.synthetic";
        let c: SyntheticConfig = config::parse(OWNER, cfg)?;
        c.augment.validate(OWNER)?;
        config::require_positive(
            OWNER,
            &[
                ("classes", c.classes),
                ("channels", c.channels),
                ("size", c.size),
                ("train", c.train),
                ("validation", c.validation),
                ("test", c.test),
            ],
        )?;
        if c.classes < 2 {
            return Err(Error::config(OWNER, "classes", "must be at least 2"));
        }
        let s = c.size as f64;
        let prototypes: Vec<Vec<f64>> = (0..c.classes)
            .map(|k| {
                let mut rng = Rng::derive(c.seed, &format!("prototype/{k}"));
                let mut img = vec![0.0; c.channels * c.size * c.size];
                for ch in 0..c.channels {
                    for _ in 0..3 {
                        let (cy, cx) = (rng.uniform() * s, rng.uniform() * s);
                        let sigma = s * (0.08 + 0.1 * rng.uniform());
                        for y in 0..c.size {
                            for x in 0..c.size {
                                let d2 = (y as f64 - cy).powi(2) + (x as f64 - cx).powi(2);
                                img[ch * c.size * c.size + y * c.size + x] +=
                                    180.0 * (-d2 / (2.0 * sigma * sigma)).exp();
                            }
                        }
                    }
                }
                img
            })
            .collect();
        let split = |name: &str, n: usize| {
            synthetic_split(&c, &prototypes, n, &mut Rng::derive(c.seed, name))
        };
        let splits = [
            split("train", c.train),
            split("validation", c.validation),
            split("test", c.test),
        ];
        Ok(Box::new(VisionData::new(
            splits,
            Some(c.classes),
            true,
            c.augment,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::serde_json::json;

    /// The MNIST test set's name, with the data resolver installed (the data cache, filled
    /// from `DISTILL_DATA_MIRROR` or the official addresses).
    fn mnist() -> &'static str {
        distill_host::install_data_resolver();
        "mnist-t10k"
    }

    #[test]
    fn synthetic_is_deterministic_and_normalised() -> Result<()> {
        let a = SyntheticFactory.build(&json!({"train": 200, "validation": 50, "test": 50}))?;
        let b = SyntheticFactory.build(&json!({"train": 200, "validation": 50, "test": 50}))?;
        let c = SyntheticFactory
            .build(&json!({"train": 200, "validation": 50, "test": 50, "seed": 1}))?;
        let idx: Vec<usize> = (0..200).collect();
        let x = |d: &dyn Dataset| -> Result<Vec<f32>> {
            Ok(d.batch(Split::Train, &idx, &Device::Cpu)?.inputs[IMAGE]
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let (xa, xb, xc) = (x(&*a)?, x(&*b)?, x(&*c)?);
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        let mean = xa.iter().sum::<f32>() / xa.len() as f32;
        let var = xa.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / xa.len() as f32;
        assert!(
            mean.abs() < 1e-3 && (var - 1.0).abs() < 1e-2,
            "mean {mean} var {var}"
        );
        assert_eq!(a.info().split_sizes, [200, 50, 50]);
        assert_eq!(a.info().num_classes, 10);
        Ok(())
    }

    fn pixels(batch: &Batch) -> Result<Vec<f32>> {
        Ok(batch.inputs[IMAGE].flatten_all()?.to_vec1::<f32>()?)
    }

    #[test]
    fn augmented_batches_repeat_for_a_seed_and_change_with_the_epoch() -> Result<()> {
        let base = json!({"train": 64, "validation": 8, "test": 8, "size": 8});
        let plain = SyntheticFactory.build(&base)?;
        let mut cfg = base.clone();
        cfg["augment"] = json!({"crop_padding": 2, "flip": true});
        let data = SyntheticFactory.build(&cfg)?;
        assert!(data.augments() && !plain.augments());
        let idx: Vec<usize> = (0..64).collect();
        let dev = Device::Cpu;
        let a = pixels(&data.train_batch(3, 7, &idx, &dev)?)?;
        assert_eq!(a, pixels(&data.train_batch(3, 7, &idx, &dev)?)?);
        assert_ne!(a, pixels(&data.train_batch(4, 7, &idx, &dev)?)?);
        assert_ne!(a, pixels(&data.train_batch(3, 8, &idx, &dev)?)?);
        // A sample's view depends on its index, not on its batch-mates.
        let alone = pixels(&data.train_batch(3, 7, &[5], &dev)?)?;
        assert_eq!(alone, a[5 * 64..6 * 64]);
        // Unaugmented, training batches are `batch`'s; evaluation never augments.
        assert_eq!(
            pixels(&plain.train_batch(3, 7, &idx, &dev)?)?,
            pixels(&plain.batch(Split::Train, &idx, &dev)?)?
        );
        assert_eq!(
            pixels(&data.batch(Split::Validation, &[0, 1], &dev)?)?,
            pixels(&plain.batch(Split::Validation, &[0, 1], &dev)?)?
        );
        Ok(())
    }

    #[test]
    fn mixed_batches_carry_soft_targets_that_the_label_loss_reads() -> Result<()> {
        let cfg = json!({"train": 32, "validation": 8, "test": 8, "size": 8, "classes": 4,
                         "augment": {"mixup": 0.4, "cutmix": 1.0}});
        let data = SyntheticFactory.build(&cfg)?;
        let idx: Vec<usize> = (0..32).collect();
        let batch = data.train_batch(0, 1, &idx, &Device::Cpu)?;
        let soft = batch
            .soft_targets
            .clone()
            .ok_or_else(|| Error::Invalid("no soft targets".into()))?;
        let rows = soft.to_vec2::<f32>()?;
        let hard = batch.targets.to_vec1::<u32>()?;
        let labels = data
            .batch(Split::Train, &idx, &Device::Cpu)?
            .targets
            .to_vec1::<u32>()?;
        let mut mixed = 0;
        for ((row, h), own) in rows.iter().zip(&hard).zip(&labels) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
            // The dominant class stands in as the hard target; the sample's own class is in.
            assert!(
                row[*h as usize] >= 0.5 - 1e-6 && row[*own as usize] > 0.0,
                "{row:?}"
            );
            mixed += usize::from(row.iter().filter(|p| **p > 0.0).count() > 1);
        }
        assert!(mixed > 10, "only {mixed} of 32 samples were mixed");
        // The label loss is the cross-entropy against these probabilities, by hand.
        let logits: Vec<Vec<f32>> = (0..32)
            .map(|i| (0..4).map(|c| ((i * 7 + c * 3) % 5) as f32 - 2.0).collect())
            .collect();
        let tensor = Tensor::new(logits.clone(), &Device::Cpu)?;
        let got = distill_rt::ops::label_loss(&tensor, &batch)?.to_scalar::<f32>()?;
        let want = rows
            .iter()
            .zip(&logits)
            .map(|(p, z)| {
                let lse = z.iter().map(|v| f64::from(*v).exp()).sum::<f64>().ln();
                -p.iter()
                    .zip(z)
                    .map(|(p, z)| f64::from(*p) * (f64::from(*z) - lse))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / 32.0;
        assert!((f64::from(got) - want).abs() < 1e-5, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn mnist_test_set_carved_into_three_splits() -> Result<()> {
        let cfg = json!({"data": mnist(), "train": "t10k", "test": "", "test_fraction": 0.2, "validation_fraction": 0.1});
        let d = IdxFactory.build(&cfg)?;
        assert_eq!(d.info().split_sizes, [7000, 1000, 2000]);
        assert_eq!(d.info().inputs[IMAGE], vec![1, 28, 28]);
        let b = d.batch(Split::Validation, &[0, 1, 2], &Device::Cpu)?;
        assert_eq!(b.inputs[IMAGE].dims(), &[3, 1, 28, 28]);
        assert_eq!(b.indices.to_vec1::<u32>()?, vec![0, 1, 2]);
        // Another split seed gives another split.
        let other = IdxFactory.build(&json!({"data": mnist(), "train": "t10k", "test": "", "test_fraction": 0.2, "split_seed": 1}))?;
        let la = d
            .batch(Split::Test, &[0, 1, 2, 3, 4, 5, 6, 7], &Device::Cpu)?
            .targets
            .to_vec1::<u32>()?;
        let lb = other
            .batch(Split::Test, &[0, 1, 2, 3, 4, 5, 6, 7], &Device::Cpu)?
            .targets
            .to_vec1::<u32>()?;
        assert_ne!(la, lb);
        Ok(())
    }

    #[test]
    fn bad_configs_are_named() {
        let msg = |r: Result<Box<dyn Dataset>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(IdxFactory.build(&json!({"path": "/nonexistent/fashion"}))).contains("`path`"));
        assert!(
            msg(IdxFactory.build(&json!({"data": mnist(), "train": "t10k", "test": ""})))
                .contains("test_fraction")
        );
        assert!(
            msg(IdxFactory
                .build(&json!({"data": mnist(), "train": "t10k", "validation_fraction": 1.5})))
            .contains("validation_fraction")
        );
        assert!(msg(SyntheticFactory.build(&json!({"clases": 3}))).contains("clases"));
        assert!(msg(SyntheticFactory.build(&json!({"classes": 1}))).contains("classes"));
    }
}
