//! `vision.folder`: a user's own images, one subfolder per class (`root/<class>/*.png|jpg`, as
//! torchvision's `ImageFolder`; classes numbered in the sorted order of their folder names),
//! decoded with the `image` crate and brought to `size x size` pixels: `crop` scales the shorter
//! side to `size` and takes the centre (torchvision's `Resize(size)` + `CenterCrop(size)`),
//! `stretch` scales both sides. A root holding `train/` and `test/` class folders gives the test
//! split; otherwise it is carved from the images.

use std::path::{Path, PathBuf};

use distill_rt::serde::Deserialize;
use distill_rt::{Config, Dataset, DatasetFactory, Error, Result, config, tracing};
use image::imageops::FilterType;

use crate::augment::Augment;
use crate::data::{Carve, VisionData, carve};
use crate::images::Images;

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct FolderConfig {
    /// The root folder: class folders, or `train/` and `test/` holding class folders.
    path: PathBuf,
    /// Side of the square images the models see, in pixels.
    #[serde(default = "default_size")]
    size: usize,
    /// `crop` (keep the aspect ratio, take the centre) or `stretch`.
    #[serde(default = "default_fit")]
    fit: String,
    /// 1 (grey) or 3 (RGB).
    #[serde(default = "default_channels")]
    channels: usize,
    #[serde(default = "default_validation")]
    validation_fraction: f64,
    /// Share of the images held out for testing when the root has no `test/` folder.
    #[serde(default = "default_test")]
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

fn default_size() -> usize {
    32
}
fn default_fit() -> String {
    "crop".into()
}
fn default_channels() -> usize {
    3
}
fn default_validation() -> f64 {
    0.1
}
fn default_test() -> f64 {
    0.2
}
fn default_true() -> bool {
    true
}

const OWNER: &str = "dataset vision.folder";

/// How a decoded image is brought to the configured size.
#[derive(Clone, Copy)]
enum Fit {
    Crop,
    Stretch,
}

/// `vision.folder`.
pub struct FolderFactory;

impl DatasetFactory for FolderFactory {
    fn summary(&self) -> &str {
        "your images, one folder per class (root/<class>/*.png|jpg, or root/train and root/test of them), brought to `size` (32) by `fit` crop or stretch, `channels` 3 or 1"
    }
    fn defaults(&self) -> Config {
        config::defaults_with_required::<FolderConfig>(&[("path", Config::String("images".into()))])
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        let c: FolderConfig = config::parse(OWNER, cfg)?;
        c.augment.validate(OWNER)?;
        config::require_positive(OWNER, &[("size", c.size)])?;
        if c.channels != 1 && c.channels != 3 {
            return Err(Error::config(
                OWNER,
                "channels",
                format!("must be 1 or 3, got {}", c.channels),
            ));
        }
        let fit = match c.fit.as_str() {
            "crop" => Fit::Crop,
            "stretch" => Fit::Stretch,
            other => {
                return Err(Error::config(
                    OWNER,
                    "fit",
                    format!("must be `crop` or `stretch`, got `{other}`"),
                ));
            }
        };
        if !c.path.is_dir() {
            return Err(Error::config(
                OWNER,
                "path",
                format!("{} is not a folder", c.path.display()),
            ));
        }
        let shape = (c.size, c.channels, fit);
        let (train_root, test_root) = (c.path.join("train"), c.path.join("test"));
        let (source, test, classes) = if train_root.is_dir() && test_root.is_dir() {
            let classes = class_names(&train_root)?;
            let source = load(&train_root, &classes, shape)?;
            let test = load(&test_root, &classes, shape)?;
            (source, Some(test), classes)
        } else {
            let classes = class_names(&c.path)?;
            (load(&c.path, &classes, shape)?, None, classes)
        };
        tracing::info!(
            root = %c.path.display(),
            classes = classes.len(),
            images = source.len() + test.as_ref().map_or(0, Images::len),
            "read an image folder"
        );
        let carve_cfg = Carve {
            validation_fraction: c.validation_fraction,
            test_fraction: if test.is_some() { 0.0 } else { c.test_fraction },
            max_train: c.max_train,
            split_seed: c.split_seed,
        };
        Ok(Box::new(VisionData::new(
            carve(OWNER, source, test, &carve_cfg)?,
            Some(classes.len()),
            c.normalize,
            c.augment,
        )?))
    }
}

/// The class folders of `root`, sorted (hidden ones left out).
fn class_names(root: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(root).map_err(|e| Error::data(root, e.to_string()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::data(root, e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    if names.len() < 2 {
        return Err(Error::data(
            root,
            format!(
                "needs a folder per class, at least two; found {}",
                names.len()
            ),
        ));
    }
    Ok(names)
}

/// Whether `path` names a PNG or JPEG file.
fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
}

/// Every image of `classes` under `root`, in class order and then file-name order.
fn load(
    root: &Path,
    classes: &[String],
    (size, channels, fit): (usize, usize, Fit),
) -> Result<Images> {
    let mut out = Images {
        channels,
        height: size,
        width: size,
        ..Default::default()
    };
    let side = u32::try_from(size).map_err(|_| Error::config(OWNER, "size", "is too large"))?;
    for (label, class) in (0u32..).zip(classes) {
        let dir = root.join(class);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::data(&dir, e.to_string()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let (images, skipped): (Vec<PathBuf>, Vec<PathBuf>) =
            files.into_iter().partition(|p| is_image(p));
        if !skipped.is_empty() {
            tracing::warn!(
                folder = %dir.display(),
                files = skipped.len(),
                "skipped files that are not .png, .jpg or .jpeg"
            );
        }
        if images.is_empty() {
            return Err(Error::data(&dir, "holds no .png, .jpg or .jpeg file"));
        }
        for path in images {
            let decoded = image::open(&path).map_err(|e| Error::data(&path, e.to_string()))?;
            let fitted = match fit {
                Fit::Stretch => decoded.resize_exact(side, side, FilterType::Triangle),
                Fit::Crop => {
                    let (w, h) = (decoded.width().max(1), decoded.height().max(1));
                    // The shorter side becomes `size`, the other keeps the aspect ratio.
                    let (nw, nh) = if w <= h {
                        (
                            side,
                            ((u64::from(h) * u64::from(side)).div_ceil(u64::from(w))) as u32,
                        )
                    } else {
                        (
                            ((u64::from(w) * u64::from(side)).div_ceil(u64::from(h))) as u32,
                            side,
                        )
                    };
                    let scaled = decoded.resize_exact(nw, nh, FilterType::Triangle);
                    scaled.crop_imm((nw - side) / 2, (nh - side) / 2, side, side)
                }
            };
            // Channels first, as every vision input.
            let plane = size * size;
            let start = out.pixels.len();
            out.pixels.resize(start + channels * plane, 0);
            let target = &mut out.pixels[start..];
            if channels == 1 {
                target.copy_from_slice(fitted.to_luma8().as_raw());
            } else {
                for (i, px) in fitted.to_rgb8().pixels().enumerate() {
                    for c in 0..3 {
                        target[c * plane + i] = px.0[c];
                    }
                }
            }
            out.labels.push(label);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::Split;
    use distill_rt::candle::Device;
    use distill_rt::serde_json::json;
    use image::{Rgb, RgbImage};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("distill-folder-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `n` solid images of `colour` and size `w x h` in `root/class`, as PNG or JPEG.
    fn write(
        root: &Path,
        class: &str,
        n: usize,
        (w, h): (u32, u32),
        colour: [u8; 3],
        ext: &str,
    ) -> Result<()> {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).map_err(|e| Error::data(&dir, e.to_string()))?;
        for i in 0..n {
            let path = dir.join(format!("{i:03}.{ext}"));
            RgbImage::from_pixel(w, h, Rgb(colour))
                .save(&path)
                .map_err(|e| Error::data(&path, e.to_string()))?;
        }
        Ok(())
    }

    #[test]
    fn class_folders_become_labelled_square_images() -> Result<()> {
        let root = temp_dir("classes");
        write(&root, "cat", 6, (40, 20), [200, 10, 10], "png")?;
        write(&root, "ant", 4, (16, 16), [10, 10, 250], "png")?;
        write(&root, "bee", 5, (9, 30), [0, 0, 0], "jpg")?;
        std::fs::write(root.join("cat/notes.txt"), "not an image")
            .map_err(|e| Error::data(&root, e.to_string()))?;
        let cfg = json!({"path": root, "size": 8, "validation_fraction": 0.0,
                         "test_fraction": 0.2, "normalize": false});
        let data = FolderFactory.build(&cfg)?;
        let info = data.info();
        assert_eq!(info.num_classes, 3);
        assert_eq!(info.inputs[crate::data::IMAGE], vec![3, 8, 8]);
        assert_eq!(info.split_sizes, [12, 0, 3]);
        // Every split sample is one of the three solid colours, with its class: ant 0, bee 1,
        // cat 2 (sorted names); a solid image stays solid when scaled and cropped.
        let all: Vec<usize> = (0..12).collect();
        let batch = data.batch(Split::Train, &all, &Device::Cpu)?;
        let pixels = batch.inputs[crate::data::IMAGE].to_dtype(distill_rt::candle::DType::F32)?;
        let pixels = pixels.flatten_from(1)?.to_vec2::<f32>()?;
        for (row, label) in pixels.iter().zip(batch.targets.to_vec1::<u32>()?) {
            let red = row[0] * 255.0;
            let want = [10.0, 0.0, 200.0][label as usize];
            assert!((red - want).abs() < 4.0, "class {label}: red {red}");
            assert!(row[..64].iter().all(|v| (v - row[0]).abs() < 2.0 / 255.0));
        }
        let grey = FolderFactory
            .build(&json!({"path": root, "size": 5, "channels": 1, "fit": "stretch"}))?;
        assert_eq!(grey.info().inputs[crate::data::IMAGE], vec![1, 5, 5]);
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn train_and_test_folders_give_the_test_split() -> Result<()> {
        let root = temp_dir("split");
        for (part, n) in [("train", 5), ("test", 2)] {
            write(&root.join(part), "a", n, (8, 8), [1, 2, 3], "png")?;
            write(&root.join(part), "b", n, (8, 8), [4, 5, 6], "png")?;
        }
        let data =
            FolderFactory.build(&json!({"path": root, "size": 4, "validation_fraction": 0.2}))?;
        assert_eq!(data.info().split_sizes, [8, 2, 4]);
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn bad_folders_and_files_are_named() -> Result<()> {
        let msg = |cfg| {
            FolderFactory
                .build(&cfg)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let root = temp_dir("bad");
        write(&root, "a", 2, (8, 8), [1, 2, 3], "png")?;
        assert!(
            msg(json!({"path": root})).contains("at least two"),
            "{}",
            msg(json!({"path": root}))
        );
        std::fs::create_dir_all(root.join("b")).map_err(|e| Error::data(&root, e.to_string()))?;
        assert!(msg(json!({"path": root})).contains("holds no .png"));
        std::fs::write(root.join("b/broken.png"), b"\x89PNG not really")
            .map_err(|e| Error::data(&root, e.to_string()))?;
        assert!(msg(json!({"path": root})).contains("broken.png"));
        assert!(msg(json!({"path": root, "fit": "squash"})).contains("`fit`"));
        assert!(msg(json!({"path": root, "channels": 2})).contains("`channels`"));
        assert!(msg(json!({"path": root.join("nowhere")})).contains("`path`"));
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }
}
