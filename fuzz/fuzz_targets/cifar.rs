//! CIFAR-10 binary batches: `vision.cifar10`'s reader.
#![no_main]

#[allow(dead_code)]
#[path = "../../plugins/vision/src/images.rs"]
mod images;

use distill_fuzz::{put, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    put("batch.bin", data);
    if let Ok(set) = images::load_cifar10(&scratch(), &["batch.bin"]) {
        let all: Vec<usize> = (0..set.len()).collect();
        let picked = set.select(&all);
        assert_eq!(picked.pixels.len(), set.len() * 3 * 32 * 32);
        assert!(set.labels.iter().all(|&l| l < 10));
    }
});
