//! Cached teacher outputs (safetensors): what a student job reads.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/distill-engine/src/batching.rs"]
mod batching;
#[allow(dead_code)]
#[path = "../../crates/distill-engine/src/cache.rs"]
mod cache;

use distill_fuzz::put;
use distill_rt::candle::{Device, Tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = put("cache.safetensors", data);
    let Ok(cache) = cache::TeacherCache::load(&path, &Device::Cpu) else {
        return;
    };
    if let Ok(n) = cache.samples()
        && n > 0
        && let Ok(first) = Tensor::new(&[0u32], &Device::Cpu)
    {
        let _ = cache.outputs_for(&first);
    }
});
