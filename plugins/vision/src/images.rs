//! Image sets in memory (8-bit pixels, `[n, c, h, w]`) and the files they come from: IDX
//! (MNIST, Fashion-MNIST; raw or gzip) and the CIFAR-10 and CIFAR-100 binary formats.

use std::io::Read;
use std::path::{Path, PathBuf};

use distill_rt::{Error, Result};

use crate::augment::Shape;

/// Images with one label each, pixels row-major `[n, channels, height, width]`.
#[derive(Clone, Debug, Default)]
pub struct Images {
    /// Channels per image.
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// All pixels, image after image.
    pub pixels: Vec<u8>,
    /// One class id per image.
    pub labels: Vec<u32>,
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Channels, height and width of every image.
    pub fn shape(&self) -> Shape {
        Shape {
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }

    /// Pixels per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Images {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Images {
            channels: self.channels,
            height: self.height,
            width: self.width,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Reads a whole file, decompressing it when it is gzip (by its magic bytes).
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::data(path, e.to_string()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| {
                Error::data(path, format!("gzip: {e} (truncated or corrupt download?)"))
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX file of unsigned bytes: its dimensions and data.
fn read_idx(path: &Path, expected_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gzip(path)?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::data(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(Error::data(
            path,
            format!(
                "IDX element type 0x{:02x} is not unsigned byte (0x08)",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims != expected_dims {
        return Err(Error::data(
            path,
            format!("IDX file has {ndims} dimensions, expected {expected_dims}"),
        ));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(Error::data(
            path,
            format!(
                "truncated: {} bytes, the header alone needs {header}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(Error::data(
            path,
            format!(
                "truncated: header says {dims:?} = {expected} bytes of data, the file has {}",
                data.len()
            ),
        ));
    }
    Ok((dims, data.to_vec()))
}

/// `{prefix}-{kind}-idx{n}-ubyte` in `dir`, with or without `.gz`.
fn idx_path(dir: &Path, prefix: &str, kind: &str, ndims: usize) -> Result<PathBuf> {
    let stem = dir.join(format!("{prefix}-{kind}-idx{ndims}-ubyte"));
    for p in [
        PathBuf::from(format!("{}.gz", stem.display())),
        stem.clone(),
    ] {
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::data(
        &stem,
        format!("missing (looked for {0}.gz and {0})", stem.display()),
    ))
}

/// Loads `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` from `dir`.
pub fn load_idx(dir: &Path, prefix: &str) -> Result<Images> {
    let images_path = idx_path(dir, prefix, "images", 3)?;
    let labels_path = idx_path(dir, prefix, "labels", 1)?;
    let (dims, pixels) = read_idx(&images_path, 3)?;
    let (ldims, labels) = read_idx(&labels_path, 1)?;
    if dims[0] != ldims[0] {
        return Err(Error::data(
            &labels_path,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                images_path.display()
            ),
        ));
    }
    Ok(Images {
        channels: 1,
        height: dims[1],
        width: dims[2],
        pixels,
        labels: labels.into_iter().map(u32::from).collect(),
    })
}

/// Loads CIFAR-10 binary batches (`data_batch_1.bin` ..., `test_batch.bin`: a label byte and
/// 3x32x32 pixels per record) from `dir`.
pub fn load_cifar10(dir: &Path, files: &[&str]) -> Result<Images> {
    load_cifar(dir, files, &CifarFormat::TEN)
}

/// Which CIFAR-100 label a sample carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar100Labels {
    /// The 100 classes.
    Fine,
    /// The 20 superclasses.
    Coarse,
}

/// Loads CIFAR-100 binary files (`train.bin`, `test.bin`: a coarse label byte, a fine label byte
/// and 3x32x32 pixels per record) from `dir`, with the `labels` asked for.
pub fn load_cifar100(dir: &Path, files: &[&str], labels: Cifar100Labels) -> Result<Images> {
    let format = match labels {
        Cifar100Labels::Fine => CifarFormat {
            name: "CIFAR-100",
            labels: 2,
            label_at: 1,
            classes: 100,
        },
        Cifar100Labels::Coarse => CifarFormat {
            name: "CIFAR-100",
            labels: 2,
            label_at: 0,
            classes: 20,
        },
    };
    load_cifar(dir, files, &format)
}

/// The layout of a CIFAR binary record: `labels` label bytes (the one at `label_at` is read,
/// below `classes`), then 3x32x32 pixels.
struct CifarFormat {
    name: &'static str,
    labels: usize,
    label_at: usize,
    classes: u8,
}

impl CifarFormat {
    const TEN: Self = Self {
        name: "CIFAR-10",
        labels: 1,
        label_at: 0,
        classes: 10,
    };
}

fn load_cifar(dir: &Path, files: &[&str], format: &CifarFormat) -> Result<Images> {
    let record_len = format.labels + 3 * 32 * 32;
    let mut out = Images {
        channels: 3,
        height: 32,
        width: 32,
        ..Default::default()
    };
    for name in files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::data(&path, e.to_string()))?;
        if bytes.is_empty() || bytes.len() % record_len != 0 {
            return Err(Error::data(
                &path,
                format!(
                    "{} bytes is not a whole number of {record_len}-byte {} records (truncated?)",
                    bytes.len(),
                    format.name
                ),
            ));
        }
        for (i, record) in bytes.chunks_exact(record_len).enumerate() {
            let label = record[format.label_at];
            if label >= format.classes {
                return Err(Error::data(
                    &path,
                    format!(
                        "record {i}: label {label} out of range 0..={}",
                        format.classes - 1
                    ),
                ));
            }
            out.labels.push(u32::from(label));
            out.pixels.extend_from_slice(&record[format.labels..]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MNIST test set's folder in the data cache.
    fn mnist() -> Result<std::path::PathBuf> {
        distill_host::data_folder("mnist-t10k")
    }

    #[test]
    fn reads_the_real_mnist_test_set() -> Result<()> {
        let images = load_idx(&mnist()?, "t10k")?;
        assert_eq!(
            (images.len(), images.channels, images.height, images.width),
            (10_000, 1, 28, 28)
        );
        // The first test image is a 7; labels cover all ten digits about evenly.
        assert_eq!(images.labels[0], 7);
        let mut counts = [0usize; 10];
        for &l in &images.labels {
            counts[l as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..=1150).contains(&c)),
            "{counts:?}"
        );
        Ok(())
    }

    fn write_gz(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes)?;
        std::fs::write(path, enc.finish()?)
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("distill-vision-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    #[test]
    fn truncated_idx_file_is_a_named_error() -> std::io::Result<()> {
        let dir = temp_dir("truncated");
        // Header for 2 images of 2x2, but only 5 of 8 data bytes.
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        images.extend_from_slice(&[1, 2, 3, 4, 5]);
        write_gz(&dir.join("x-images-idx3-ubyte.gz"), &images)?;
        write_gz(
            &dir.join("x-labels-idx1-ubyte.gz"),
            &[0, 0, 8, 1, 0, 0, 0, 2, 1, 0],
        )?;
        let err = load_idx(&dir, "x").expect_err("truncated");
        let msg = err.to_string();
        assert!(
            msg.contains("x-images-idx3-ubyte.gz") && msg.contains("truncated"),
            "{msg}"
        );

        // A gzip stream cut in the middle.
        let full = std::fs::read(dir.join("x-labels-idx1-ubyte.gz"))?;
        std::fs::write(dir.join("y-labels-idx1-ubyte.gz"), &full[..full.len() / 2])?;
        std::fs::write(
            dir.join("y-images-idx3-ubyte"),
            [0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 9],
        )?;
        let msg = load_idx(&dir, "y").expect_err("cut gzip").to_string();
        assert!(msg.contains("y-labels-idx1-ubyte.gz"), "{msg}");

        let msg = load_idx(&dir, "absent").expect_err("missing").to_string();
        assert!(
            msg.contains("absent-images-idx3-ubyte") && msg.contains("missing"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn cifar_records_and_truncation() -> std::io::Result<()> {
        let dir = temp_dir("cifar");
        let mut bytes = Vec::new();
        for label in [3u8, 7] {
            bytes.push(label);
            bytes.extend(std::iter::repeat_n(label * 10, 3072));
        }
        std::fs::write(dir.join("b.bin"), &bytes)?;
        let images = load_cifar10(&dir, &["b.bin"]).map_err(std::io::Error::other)?;
        assert_eq!(images.labels, vec![3, 7]);
        assert_eq!(images.image(1)[0], 70);
        std::fs::write(dir.join("t.bin"), &bytes[..4000])?;
        let msg = load_cifar10(&dir, &["t.bin"])
            .expect_err("truncated")
            .to_string();
        assert!(msg.contains("t.bin") && msg.contains("truncated"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn cifar100_reads_fine_or_coarse_labels_and_names_bad_records() -> std::io::Result<()> {
        let dir = temp_dir("cifar100");
        let mut bytes = Vec::new();
        for (coarse, fine) in [(4u8, 42u8), (19, 99)] {
            bytes.extend([coarse, fine]);
            bytes.extend(std::iter::repeat_n(fine, 3072));
        }
        std::fs::write(dir.join("train.bin"), &bytes)?;
        let read = |labels| load_cifar100(&dir, &["train.bin"], labels);
        let fine = read(Cifar100Labels::Fine).map_err(std::io::Error::other)?;
        assert_eq!(fine.labels, vec![42, 99]);
        assert_eq!((fine.image(1)[0], fine.image(1).len()), (99, 3072));
        let coarse = read(Cifar100Labels::Coarse).map_err(std::io::Error::other)?;
        assert_eq!(coarse.labels, vec![4, 19]);
        // A CIFAR-10 file is not whole CIFAR-100 records; a fine label of 100 is out of range.
        std::fs::write(dir.join("ten.bin"), &bytes[..3073 * 2])?;
        let msg = load_cifar100(&dir, &["ten.bin"], Cifar100Labels::Fine)
            .expect_err("3073-byte records")
            .to_string();
        assert!(msg.contains("3074-byte CIFAR-100"), "{msg}");
        bytes[3074 + 1] = 100;
        std::fs::write(dir.join("bad.bin"), &bytes)?;
        let msg = load_cifar100(&dir, &["bad.bin"], Cifar100Labels::Fine)
            .expect_err("label 100")
            .to_string();
        assert!(
            msg.contains("bad.bin") && msg.contains("record 1: label 100"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
