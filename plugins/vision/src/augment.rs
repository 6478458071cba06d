//! Training-time augmentation of images, configured on a dataset entry (`augment = { .. }`):
//! random crop with zero padding and horizontal flip (torchvision's `RandomCrop(size, padding)`
//! and `RandomHorizontalFlip`), then mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) with a
//! partner from the same batch, which make soft targets. Every draw comes from the run's seed,
//! the epoch and the sample's index, so a rerun sees the same pixels.

use distill_rt::rng::Rng;
use distill_rt::serde::{Deserialize, Serialize};
use distill_rt::{Error, Result};

/// What augments a training batch; the default augments nothing.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
pub struct Augment {
    /// Pixels of zero padding on each side before a random crop of the original size (4 in
    /// the CIFAR recipes); 0: no crop.
    pub crop_padding: usize,
    /// Mirror left to right with probability 1/2.
    pub flip: bool,
    /// mixup's `alpha`: the mixing weight is drawn from Beta(alpha, alpha); 0: no mixup.
    pub mixup: f64,
    /// CutMix's `alpha` (the pasted box's area is `1 - Beta(alpha, alpha)`); 0: no CutMix. With
    /// both, each sample takes one of the two with equal probability.
    pub cutmix: f64,
}

/// One image's pixels with its shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl Shape {
    fn plane(&self) -> usize {
        self.height * self.width
    }
    fn len(&self) -> usize {
        self.channels * self.plane()
    }
}

/// How one sample's geometry changes: the crop's offset into the padded image and the flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Column of the crop's left edge in the padded image (`0..=2 * padding`).
    pub dx: usize,
    /// Row of the crop's top edge in the padded image.
    pub dy: usize,
    /// Mirrored left to right (after the crop).
    pub flip: bool,
}

impl Geometry {
    /// The image as it is: no offset, no flip (with no padding).
    pub const IDENTITY: Geometry = Geometry {
        dx: 0,
        dy: 0,
        flip: false,
    };
}

impl Augment {
    /// Checks the values; errors name the key under `owner`.
    pub fn validate(&self, owner: &str) -> Result<()> {
        for (key, v) in [
            ("augment.mixup", self.mixup),
            ("augment.cutmix", self.cutmix),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    owner,
                    key,
                    format!("must be >= 0 (0 turns it off), got {v}"),
                ));
            }
        }
        Ok(())
    }

    /// Whether anything is augmented.
    pub fn any(&self) -> bool {
        self.crop_padding > 0 || self.flip || self.mixes()
    }

    /// Whether samples are mixed (mixup or CutMix): the batch then carries soft targets.
    pub fn mixes(&self) -> bool {
        self.mixup > 0.0 || self.cutmix > 0.0
    }

    /// The geometry of a sample, drawn from `rng`.
    pub fn geometry(&self, rng: &mut Rng) -> Geometry {
        let span = 2 * self.crop_padding + 1;
        let (dx, dy) = if self.crop_padding > 0 {
            (rng.below(span), rng.below(span))
        } else {
            (self.crop_padding, self.crop_padding)
        };
        let flip = self.flip && rng.uniform() < 0.5;
        Geometry { dx, dy, flip }
    }

    /// The batch's images (`images`, one after another, already cropped and flipped) mixed
    /// sample by sample, each with a partner of the batch and a weight drawn from its own
    /// `rngs` entry; returns the mixed images and each sample's class probabilities over
    /// `classes` (every row sums to 1).
    pub fn mix(
        &self,
        images: &[f32],
        labels: &[u32],
        shape: Shape,
        classes: usize,
        rngs: &mut [Rng],
    ) -> (Vec<f32>, Vec<f32>) {
        let n = labels.len();
        let len = shape.len();
        let mut out = images.to_vec();
        let mut probs = vec![0f32; n * classes];
        for (i, rng) in rngs.iter_mut().enumerate().take(n) {
            let partner = rng.below(n);
            let use_mixup = match (self.mixup > 0.0, self.cutmix > 0.0) {
                (true, true) => rng.uniform() < 0.5,
                (mixup, _) => mixup,
            };
            let own = &images[i * len..(i + 1) * len];
            let other = &images[partner * len..(partner + 1) * len];
            let target = &mut out[i * len..(i + 1) * len];
            let lambda = if use_mixup {
                let lambda = rng.beta(self.mixup, self.mixup);
                for ((t, a), b) in target.iter_mut().zip(own).zip(other) {
                    *t = (lambda * f64::from(*a) + (1.0 - lambda) * f64::from(*b)) as f32;
                }
                lambda
            } else {
                let lambda = rng.beta(self.cutmix, self.cutmix);
                let (rows, cols) = cut_box(shape, lambda, rng);
                for c in 0..shape.channels {
                    for y in rows.clone() {
                        let at = c * shape.plane() + y * shape.width;
                        target[at + cols.start..at + cols.end]
                            .copy_from_slice(&other[at + cols.start..at + cols.end]);
                    }
                }
                // The weight of the sample's own label is the area it keeps.
                1.0 - (rows.len() * cols.len()) as f64 / shape.plane() as f64
            };
            let row = &mut probs[i * classes..(i + 1) * classes];
            row[labels[i] as usize] += lambda as f32;
            row[labels[partner] as usize] += (1.0 - lambda) as f32;
        }
        (out, probs)
    }
}

/// CutMix's box for mixing weight `lambda`: sides `sqrt(1 - lambda)` of the image's, centred
/// uniformly at random, clipped to the image (so the area taken can be smaller).
fn cut_box(
    shape: Shape,
    lambda: f64,
    rng: &mut Rng,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let ratio = (1.0 - lambda).sqrt();
    let (h, w) = (shape.height as f64, shape.width as f64);
    let (cut_h, cut_w) = (h * ratio, w * ratio);
    let (cy, cx) = (rng.uniform() * h, rng.uniform() * w);
    let clip = |v: f64, hi: f64| v.clamp(0.0, hi).round() as usize;
    (
        clip(cy - cut_h / 2.0, h)..clip(cy + cut_h / 2.0, h),
        clip(cx - cut_w / 2.0, w)..clip(cx + cut_w / 2.0, w),
    )
}

/// Writes `image` (`shape`, raw pixels) cropped from its zero-padded version at `g` and
/// flipped as `g` says, normalised per channel with `mean` and `std` (of pixels in `[0, 1]`),
/// to `out`. Padding is black, as torchvision pads a PIL image.
pub fn crop_flip_normalise(
    image: &[u8],
    shape: Shape,
    padding: usize,
    g: Geometry,
    (mean, std): (&[f32], &[f32]),
    out: &mut Vec<f32>,
) {
    let (h, w) = (shape.height as isize, shape.width as isize);
    for c in 0..shape.channels {
        let plane = &image[c * shape.plane()..(c + 1) * shape.plane()];
        let (m, s) = (mean[c], std[c]);
        for y in 0..h {
            let sy = y + g.dy as isize - padding as isize;
            for x in 0..w {
                let cx = if g.flip { w - 1 - x } else { x };
                let sx = cx + g.dx as isize - padding as isize;
                let raw = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                    plane[(sy * w + sx) as usize]
                } else {
                    0
                };
                out.push((f32::from(raw) / 255.0 - m) / s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        channels: 1,
        height: 3,
        width: 4,
    };
    /// Pixels 1..=12, row by row.
    const IMAGE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn apply(padding: usize, g: Geometry) -> Vec<f32> {
        let mut out = Vec::new();
        // mean 0, std 1/255: the output is the raw pixel value.
        crop_flip_normalise(
            &IMAGE,
            SHAPE,
            padding,
            g,
            (&[0.0], &[1.0 / 255.0]),
            &mut out,
        );
        out.iter().map(|v| v.round()).collect()
    }

    #[test]
    fn crop_and_flip_move_pixels_as_torchvision_does() {
        let g = |dx, dy, flip| Geometry { dx, dy, flip };
        // The centre crop of the padded image is the image.
        assert_eq!(apply(1, g(1, 1, false)), IMAGE.map(f32::from).to_vec());
        // Offset (0, 0): one row and one column of padding enter at the top left.
        assert_eq!(
            apply(1, g(0, 0, false)),
            vec![0., 0., 0., 0., 0., 1., 2., 3., 0., 5., 6., 7.]
        );
        // Offset (2, 1): shifted one column left, zeros enter on the right.
        assert_eq!(
            apply(1, g(2, 1, false)),
            vec![2., 3., 4., 0., 6., 7., 8., 0., 10., 11., 12., 0.]
        );
        // A flip mirrors each row.
        assert_eq!(
            apply(0, g(0, 0, true)),
            vec![4., 3., 2., 1., 8., 7., 6., 5., 12., 11., 10., 9.]
        );
        // Crop then flip.
        assert_eq!(
            apply(1, g(2, 1, true)),
            vec![0., 4., 3., 2., 0., 8., 7., 6., 0., 12., 11., 10.]
        );
    }

    #[test]
    fn geometry_covers_every_offset_and_both_flips() {
        let a = Augment {
            crop_padding: 2,
            flip: true,
            ..Default::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut rng = Rng::new(3);
        for _ in 0..2000 {
            let g = a.geometry(&mut rng);
            seen.insert((g.dx, g.dy, g.flip));
        }
        assert_eq!(seen.len(), 5 * 5 * 2);
        let none = Augment::default();
        assert_eq!(
            none.geometry(&mut rng),
            Geometry {
                dx: 0,
                dy: 0,
                flip: false
            }
        );
    }

    #[test]
    fn mixed_targets_sum_to_one_and_weigh_what_each_image_contributes() {
        let shape = Shape {
            channels: 1,
            height: 8,
            width: 8,
        };
        // Image i is constant i + 1, so a mixed pixel tells the weights.
        let images: Vec<f32> = (0..4).flat_map(|i| vec![(i + 1) as f32; 64]).collect();
        let labels = [0u32, 1, 2, 3];
        for a in [
            Augment {
                mixup: 0.4,
                ..Default::default()
            },
            Augment {
                cutmix: 1.0,
                ..Default::default()
            },
            Augment {
                mixup: 0.2,
                cutmix: 1.0,
                ..Default::default()
            },
        ] {
            let mut rngs: Vec<Rng> = (0..4).map(|i| Rng::derive(9, &format!("s{i}"))).collect();
            let (mixed, probs) = a.mix(&images, &labels, shape, 5, &mut rngs);
            for i in 0..4 {
                let row = &probs[i * 5..(i + 1) * 5];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
                assert_eq!(row[4], 0.0);
                // The mean pixel of the mix is sum_c p_c (c + 1): each image's weight is the
                // share of the pixels (CutMix) or of the intensity (mixup) it gave.
                let mean = mixed[i * 64..(i + 1) * 64].iter().sum::<f32>() / 64.0;
                let want: f32 = row
                    .iter()
                    .enumerate()
                    .map(|(c, p)| p * (c + 1) as f32)
                    .sum();
                assert!(
                    (mean - want).abs() < 1e-4,
                    "{a:?} sample {i}: {mean} vs {want}"
                );
            }
        }
    }

    #[test]
    fn negative_alphas_are_refused_by_name() {
        let a = Augment {
            cutmix: -1.0,
            ..Default::default()
        };
        assert!(
            a.validate("dataset vision.idx")
                .is_err_and(|e| e.to_string().contains("augment.cutmix"))
        );
    }
}
