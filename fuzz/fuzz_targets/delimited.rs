//! Delimited text (`nlp.delimited`): the first byte picks the delimiter, the header, the
//! encoding and the columns; the rest is the file.
#![no_main]

#[allow(dead_code)]
#[path = "../../plugins/nlp/src/text.rs"]
mod text;

use distill_fuzz::put;
use libfuzzer_sys::fuzz_target;
use text::{Column, Encoding, Layout};

fuzz_target!(|data: &[u8]| {
    let Some((&options, file)) = data.split_first() else {
        return;
    };
    let delimiter = [',', '\t', ';', '|'][usize::from(options & 3)];
    let header = options & 4 != 0;
    let encoding = if options & 8 != 0 {
        Encoding::Latin1
    } else {
        Encoding::Utf8
    };
    let (text_column, label_column) = if options & 16 != 0 && header {
        (Column::Name("text".into()), Column::Name("label".into()))
    } else {
        (
            Column::Index(usize::from(options >> 5 & 1)),
            Column::Index(usize::from(options >> 6 & 3)),
        )
    };
    let layout = Layout {
        delimiter,
        header,
        text: &text_column,
        label: &label_column,
        encoding,
    };
    let path = put("data.csv", file);
    if let Ok(rows) = text::read_delimited(&path, &layout) {
        // Line numbers are positive and never go back.
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0 && w[0].0 >= 1));
    }
});
