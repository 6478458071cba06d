//! Experiment files (TOML through figment, then the structural checks): `cargo xtask run`'s
//! reader.
#![no_main]

#[allow(dead_code)]
#[path = "../../xtask/src/experiment.rs"]
mod experiment;

use distill_fuzz::put;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = put("experiment.toml", data);
    let _ = experiment::load(&path, &[]);
});
