//! Job records (`record.json`) and the files they vouch for: whether the orchestrator trusts a
//! finished job. The input is split into the record and a weights file.
#![no_main]

#[allow(dead_code)]
#[path = "../../xtask/src/record.rs"]
mod record;

use distill_fuzz::{put, scratch, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (text, weights) = split(data);
    put("record.json", text);
    put("weights.safetensors", weights);
    let _ = record::checked_record(&scratch());
});
