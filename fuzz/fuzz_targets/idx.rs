//! IDX image and label files (MNIST, Fashion-MNIST), raw or gzip: `vision.idx`'s reader.
#![no_main]

#[allow(dead_code)]
#[path = "../../plugins/vision/src/images.rs"]
mod images;

use distill_fuzz::{put, scratch, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (pixels, labels) = split(data);
    put("f-images-idx3-ubyte", pixels);
    put("f-labels-idx1-ubyte", labels);
    if let Ok(set) = images::load_idx(&scratch(), "f") {
        // What the dataset does with a set it accepted: every image is whole.
        let all: Vec<usize> = (0..set.len()).collect();
        let picked = set.select(&all);
        assert_eq!(picked.pixels.len(), set.len() * set.image_len());
    }
});
