//! Helpers for the workspace-level integration tests: where the built plugins are, and small
//! deterministic inputs.

pub mod steps;

use std::path::PathBuf;

use distill_host::PluginHost;
use distill_rt::candle::{DType, Device, Tensor};

/// The plugin library of `crate_name` (underscores) built next to the running test binary.
///
/// `cargo test` builds the plugins in the same invocation as the tests because this crate lists
/// them as dev-dependencies; their libraries land in the test binary's folder.
pub fn plugin_path(crate_name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    dir.join(format!(
        "{}{crate_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// A host with the plugin `crate_name` loaded.
pub fn host_with(crate_name: &str) -> PluginHost {
    let mut host = PluginHost::new();
    if let Err(e) = host.load(&plugin_path(crate_name)) {
        panic!("{e}");
    }
    host
}

/// A deterministic pseudo-random `[rows, cols]` tensor in `[-scale, scale]` (no RNG state shared
/// with candle, so tests do not depend on the order they run in).
pub fn fixed_tensor(rows: usize, cols: usize, seed: u64, scale: f64, dtype: DType) -> Tensor {
    let mut state = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let data: Vec<f64> = (0..rows * cols)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    match Tensor::from_vec(data, (rows, cols), &Device::Cpu).and_then(|t| t.to_dtype(dtype)) {
        Ok(t) => t,
        Err(e) => panic!("fixed_tensor: {e}"),
    }
}
