//! MovieLens ratings (`recsys.movielens`): the first byte picks the format (CSV with a header,
//! `u.data` tabs, `ratings.dat` `::`); the rest is the file.
#![no_main]

#[allow(dead_code)]
#[path = "../../plugins/recsys/src/ratings.rs"]
mod ratings;

use distill_fuzz::put;
use libfuzzer_sys::fuzz_target;
use ratings::Format;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, file)) = data.split_first() else {
        return;
    };
    let format = [Format::Csv, Format::Tab, Format::Dat][usize::from(pick % 3)];
    let path = put("ratings", file);
    if let Ok(rows) = ratings::read_ratings(&path, format) {
        assert!(rows.iter().all(|r| r.rating.is_finite()));
    }
});
