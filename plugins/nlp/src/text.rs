//! Labelled sentences: the readers for SST-2, rt-polarity and delimited files, and the synthetic
//! sentiment generator. Everything here is text and class ids; tokenisation happens later.
//! A reader reports a bad line with its file and 1-based line number, invalid UTF-8 included.

use std::path::Path;

use distill_rt::rng::Rng;
use distill_rt::{Error, Result};

/// One sentence and its class id.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The sentence as written.
    pub text: String,
    /// Class id, `0..num_classes`.
    pub label: u32,
}

/// The non-empty lines of `path` with their 1-based numbers; invalid UTF-8 is an error naming
/// the line, an empty file an error too.
pub fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))?;
    let mut lines = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            Error::data(
                path,
                format!(
                    "line {}: not valid UTF-8 (byte {} of the line)",
                    i + 1,
                    e.valid_up_to() + 1
                ),
            )
        })?;
        if !line.trim().is_empty() {
            lines.push((i + 1, line.to_string()));
        }
    }
    if lines.is_empty() {
        return Err(Error::data(path, "the file holds no sentences"));
    }
    Ok(lines)
}

/// One SST-2 file in SentEval's form, `sentence<TAB>label` a line with label 0 or 1.
pub fn read_sst2(path: &Path) -> Result<Vec<Example>> {
    read_lines(path)?
        .into_iter()
        .map(|(n, line)| {
            let (text, label) = line.rsplit_once('\t').ok_or_else(|| {
                Error::data(
                    path,
                    format!("line {n}: expected `sentence<TAB>label`, found no tab"),
                )
            })?;
            let label = match label.trim() {
                "0" => 0,
                "1" => 1,
                other => {
                    return Err(Error::data(
                        path,
                        format!("line {n}: label `{other}` is not 0 or 1"),
                    ));
                }
            };
            Ok(Example {
                text: text.trim().to_string(),
                label,
            })
        })
        .collect()
}

/// Pang & Lee's sentence polarity data: `rt-polarity.neg` (label 0) and `rt-polarity.pos`
/// (label 1) in `dir`, one sentence a line.
pub fn read_rt_polarity(dir: &Path) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (file, label) in [("rt-polarity.neg", 0), ("rt-polarity.pos", 1)] {
        for (_, line) in read_lines(&dir.join(file))? {
            out.push(Example {
                text: line.trim().to_string(),
                label,
            });
        }
    }
    Ok(out)
}

/// A column of a delimited file: its 0-based position, or its name in the header.
#[derive(Clone, Debug, distill_rt::serde::Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", untagged)]
pub enum Column {
    /// 0-based position.
    Index(usize),
    /// Name in the header line.
    Name(String),
}

/// How a delimited file is laid out.
pub struct Layout<'a> {
    /// Field separator.
    pub delimiter: char,
    /// Whether the first line names the columns.
    pub header: bool,
    /// The text column.
    pub text: &'a Column,
    /// The label column.
    pub label: &'a Column,
    /// The file's text encoding.
    pub encoding: Encoding,
}

/// Text encodings a delimited file may be in.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    distill_rt::serde::Deserialize,
    distill_rt::serde::Serialize,
)]
#[serde(crate = "distill_rt::serde")]
pub enum Encoding {
    /// UTF-8 (a byte-order mark is skipped); anything else is an error naming the byte.
    #[default]
    #[serde(rename = "utf-8")]
    Utf8,
    /// ISO-8859-1, as older NLP sets ship.
    #[serde(rename = "latin-1")]
    Latin1,
}

/// The file's text in `encoding`, a UTF-8 byte-order mark removed.
fn decode(path: &Path, bytes: Vec<u8>, encoding: Encoding) -> Result<String> {
    match encoding {
        Encoding::Latin1 => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
        Encoding::Utf8 => {
            let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
            match std::str::from_utf8(body) {
                Ok(text) => Ok(text.to_string()),
                Err(e) => {
                    let at = e.valid_up_to();
                    let line = 1 + body[..at].iter().filter(|&&b| b == b'\n').count();
                    Err(Error::data(
                        path,
                        format!(
                            "line {line}, byte offset {at}: not valid UTF-8; if the file is \
                             Latin-1, set `encoding = \"latin-1\"`"
                        ),
                    ))
                }
            }
        }
    }
}

/// Rows of a delimited file as `(line, text, label as written)`, parsed as CSV by the `csv`
/// crate: quoted fields (delimiters, line breaks and doubled quotes inside), CRLF line ends, a
/// byte-order mark, an optional header line.
pub fn read_delimited(path: &Path, layout: &Layout) -> Result<Vec<(usize, String, String)>> {
    let delimiter = u8::try_from(layout.delimiter)
        .ok()
        .filter(u8::is_ascii)
        .ok_or_else(|| {
            Error::data(
                path,
                format!(
                    "delimiter {:?} is not a single ASCII character",
                    layout.delimiter
                ),
            )
        })?;
    let bytes = std::fs::read(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))?;
    let text = decode(path, bytes, layout.encoding)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    // Line numbers from the byte where each record starts, counted forward once. With CRLF the
    // csv crate places a record's start on the line break before it (and its own line count
    // one lower), so line breaks at that byte are stepped over. A line ends as the csv crate
    // ends one: `\r\n`, `\n`, or a lone `\r` (old Mac files).
    let bytes = text.as_bytes();
    let (mut counted_to, mut line) = (0usize, 1usize);
    let mut line_at = |byte: u64| {
        let mut byte = usize::try_from(byte).unwrap_or(usize::MAX).min(bytes.len());
        while matches!(bytes.get(byte), Some(b'\r' | b'\n')) {
            byte += 1;
        }
        if byte > counted_to {
            line += (counted_to..byte)
                .filter(|&i| {
                    bytes[i] == b'\n' || (bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n'))
                })
                .count();
            counted_to = byte;
        }
        line
    };
    let mut records = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let at = e
                .position()
                .map_or(String::new(), |p| format!("line {}: ", line_at(p.byte())));
            Error::data(path, format!("{at}{e}"))
        })?;
        let line = record.position().map_or(0, |p| line_at(p.byte()));
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        records.push((line, record));
    }
    let mut records = records.into_iter();
    let names: Vec<String> = if layout.header {
        let (_, first) = records
            .next()
            .ok_or_else(|| Error::data(path, "no header line"))?;
        first.iter().map(|s| s.trim().to_string()).collect()
    } else {
        Vec::new()
    };
    let position = |c: &Column, what: &str| -> Result<usize> {
        match c {
            Column::Index(i) => Ok(*i),
            Column::Name(n) if layout.header => {
                names.iter().position(|h| h == n).ok_or_else(|| {
                    Error::data(
                        path,
                        format!("line 1: no {what} column named `{n}` in the header {names:?}"),
                    )
                })
            }
            Column::Name(n) => Err(Error::data(
                path,
                format!("the {what} column is named `{n}` but `header` is false"),
            )),
        }
    };
    let (ti, li) = (
        position(layout.text, "text")?,
        position(layout.label, "label")?,
    );
    let rows: Vec<_> = records
        .map(|(n, fields)| {
            let field = |i: usize| {
                fields.get(i).map(|s| s.trim().to_string()).ok_or_else(|| {
                    Error::data(
                        path,
                        format!(
                            "line {n}: {} fields, column {i} asked for (delimiter {:?})",
                            fields.len(),
                            layout.delimiter
                        ),
                    )
                })
            };
            Ok((n, field(ti)?, field(li)?))
        })
        .collect::<Result<_>>()?;
    if rows.is_empty() {
        return Err(Error::data(path, "the file holds a header but no rows"));
    }
    Ok(rows)
}

/// Turns written labels into class ids: integers as they are when every label is one, names in
/// sorted order otherwise, or the order of `classes` when given. Returns the class names too.
pub fn label_ids(
    rows: &[(&Path, usize, String)],
    classes: Option<&[String]>,
) -> Result<(Vec<u32>, Vec<String>)> {
    let names: Vec<String> = match classes {
        Some(c) => c.to_vec(),
        None if rows.iter().all(|(_, _, l)| l.parse::<u32>().is_ok()) => {
            let max = rows
                .iter()
                .filter_map(|(_, _, l)| l.parse::<u32>().ok())
                .max()
                .unwrap_or(0);
            (0..=max).map(|i| i.to_string()).collect()
        }
        None => {
            let mut set: Vec<String> = rows.iter().map(|(_, _, l)| l.clone()).collect();
            set.sort();
            set.dedup();
            set
        }
    };
    let ids = rows
        .iter()
        .map(|(path, n, l)| {
            names
                .iter()
                .position(|c| c == l)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    Error::data(
                        path,
                        format!("line {n}: label `{l}` is not one of the classes {names:?}"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    Ok((ids, names))
}

const SUBJECTS: [&str; 8] = [
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the soundtrack",
    "the ending",
    "the cast",
    "the script",
];
const POSITIVE: [&str; 8] = [
    "good",
    "great",
    "wonderful",
    "moving",
    "funny",
    "clever",
    "charming",
    "brilliant",
];
const NEGATIVE: [&str; 8] = [
    "bad",
    "dull",
    "boring",
    "awful",
    "clumsy",
    "tedious",
    "weak",
    "predictable",
];
const INTENSIFIERS: [&str; 5] = ["very", "really", "truly", "quite", "extremely"];

/// `n` synthetic sentiment sentences from `seed` (label 1 positive). Three forms: `S is [very]
/// ADJ`; `S is not [very] ADJ` (negation flips the label); `S is ADJ but S is ADJ` (the clause
/// after "but" decides, so swapping the clauses flips the label and word order matters).
pub fn synthetic(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::derive(seed, "nlp.synthetic");
    let adjective = |rng: &mut Rng| -> (String, bool) {
        let positive = rng.below(2) == 1;
        let words = if positive { &POSITIVE } else { &NEGATIVE };
        let mut a = words[rng.below(words.len())].to_string();
        if rng.below(2) == 1 {
            a = format!("{} {a}", INTENSIFIERS[rng.below(INTENSIFIERS.len())]);
        }
        (a, positive)
    };
    (0..n)
        .map(|_| {
            let subject = SUBJECTS[rng.below(SUBJECTS.len())];
            let (text, positive) = match rng.below(3) {
                0 => {
                    let (a, p) = adjective(&mut rng);
                    (format!("{subject} is {a}"), p)
                }
                1 => {
                    let (a, p) = adjective(&mut rng);
                    (format!("{subject} is not {a}"), !p)
                }
                _ => {
                    let (a, _) = adjective(&mut rng);
                    let (b, p) = adjective(&mut rng);
                    let other = SUBJECTS[rng.below(SUBJECTS.len())];
                    (format!("{subject} is {a} but {other} is {b}"), p)
                }
            };
            Example {
                text,
                label: u32::from(positive),
            }
        })
        .collect()
}

/// Splits `examples` into `[train, validation, test]` by a shuffle seeded with `seed`: the
/// first `test_fraction` go to test, the next `validation_fraction` to validation.
pub fn carve(
    mut examples: Vec<Example>,
    validation_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> [Vec<Example>; 3] {
    Rng::derive(seed, "split").shuffle(&mut examples);
    let n = examples.len();
    let n_test = (n as f64 * test_fraction).round() as usize;
    let n_val = (n as f64 * validation_fraction).round() as usize;
    let mut validation = examples.split_off(n_test.min(n));
    let train = validation.split_off(n_val.min(validation.len()));
    [train, validation, examples]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("distill-nlp-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join(name);
        std::fs::write(&p, bytes).ok();
        p
    }

    fn message(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Every input kept in `fuzz/regressions/delimited/` (a crash of the `delimited` fuzz
    /// target, fixed): read with the options its first byte picks, as the target does; none may
    /// panic, and the line numbers of accepted rows increase.
    #[test]
    fn fuzz_regressions_read_or_fail_cleanly() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/delimited");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::data(&dir, e.to_string()))?;
        let mut replayed = 0;
        for entry in entries.flatten() {
            let input = std::fs::read(entry.path()).unwrap_or_default();
            let Some((&options, file)) = input.split_first() else {
                continue;
            };
            let header = options & 4 != 0;
            let (text, label) = if options & 16 != 0 && header {
                (Column::Name("text".into()), Column::Name("label".into()))
            } else {
                (
                    Column::Index(usize::from(options >> 5 & 1)),
                    Column::Index(usize::from(options >> 6 & 3)),
                )
            };
            let layout = Layout {
                delimiter: [',', '\t', ';', '|'][usize::from(options & 3)],
                header,
                text: &text,
                label: &label,
                encoding: if options & 8 != 0 {
                    Encoding::Latin1
                } else {
                    Encoding::Utf8
                },
            };
            let path = temp_file("regression.csv", file);
            if let Ok(rows) = read_delimited(&path, &layout) {
                let lines: Vec<usize> = rows.iter().map(|r| r.0).collect();
                assert!(
                    lines.windows(2).all(|w| w[0] < w[1]) && lines.first() >= Some(&1),
                    "{}: lines {lines:?}",
                    entry.path().display()
                );
            }
            replayed += 1;
        }
        assert!(replayed >= 1, "no inputs in {}", dir.display());
        Ok(())
    }

    #[test]
    fn lone_carriage_returns_end_lines_as_the_csv_reader_does() -> Result<()> {
        let p = temp_file("mac.csv", b"a,x\rb,y\r\nc,z\rd,w\n");
        let (text, label) = (Column::Index(1), Column::Index(0));
        let layout = Layout {
            delimiter: ',',
            header: false,
            text: &text,
            label: &label,
            encoding: Encoding::Utf8,
        };
        let rows = read_delimited(&p, &layout)?;
        let got: Vec<(usize, &str)> = rows.iter().map(|r| (r.0, r.2.as_str())).collect();
        assert_eq!(got, [(1, "a"), (2, "b"), (3, "c"), (4, "d")]);
        Ok(())
    }

    #[test]
    fn sst2_reads_sentences_and_labels() -> Result<()> {
        let p = temp_file("ok.tsv", b"a fine film \t1\nnot good\t0\n\n");
        let got = read_sst2(&p)?;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].text, "a fine film");
        assert_eq!((got[0].label, got[1].label), (1, 0));
        Ok(())
    }

    #[test]
    fn malformed_files_name_the_file_and_line() {
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "notab.tsv",
                b"good\t1\nno tab here\n",
                "line 2: expected `sentence<TAB>label`",
            ),
            (
                "label.tsv",
                b"good\t1\nbad\tnegative\n",
                "line 2: label `negative` is not 0 or 1",
            ),
            ("empty.tsv", b"\n\n", "holds no sentences"),
            (
                "utf8.tsv",
                b"good\t1\nbad \xff\xfe\t0\n",
                "line 2: not valid UTF-8",
            ),
        ];
        for (name, bytes, want) in cases {
            let p = temp_file(name, bytes);
            let m = message(read_sst2(&p));
            assert!(m.contains(want), "{name}: {m}");
            assert!(m.contains(name), "{name}: {m}");
        }
    }

    #[test]
    fn delimited_reads_named_columns_and_maps_label_names() -> Result<()> {
        let p = temp_file(
            "d.csv",
            b"id,label,text\n1,pos,fine\n2,neg,dull\n3,pos,warm\n",
        );
        let layout = Layout {
            delimiter: ',',
            header: true,
            text: &Column::Name("text".into()),
            label: &Column::Name("label".into()),
            encoding: Encoding::Utf8,
        };
        let rows = read_delimited(&p, &layout)?;
        let tagged: Vec<_> = rows
            .iter()
            .map(|(n, _, l)| (p.as_path(), *n, l.clone()))
            .collect();
        let (ids, names) = label_ids(&tagged, None)?;
        assert_eq!(names, ["neg", "pos"]);
        assert_eq!(ids, [1, 0, 1]);
        assert_eq!(rows[1].1, "dull");
        let short = temp_file("short.csv", b"id,label,text\n1,pos\n");
        assert!(message(read_delimited(&short, &layout)).contains("line 2: 2 fields"));
        Ok(())
    }

    /// The misread that made a 1,156-class "spam" set: messages quoted because they hold the
    /// delimiter, doubled quotes, CRLF line ends, a byte-order mark, a message over two lines.
    #[test]
    fn delimited_follows_csv_quoting() -> Result<()> {
        let p = temp_file(
            "spam.csv",
            b"\xef\xbb\xbflabel,message\r\nham,\"Sure, see you at 5, ok?\"\r\nspam,\"WIN a \"\"free\"\" prize, call now\"\r\nham,\"two\r\nlines\"\r\nham,plain\r\n",
        );
        let layout = Layout {
            delimiter: ',',
            header: true,
            text: &Column::Name("message".into()),
            label: &Column::Name("label".into()),
            encoding: Encoding::Utf8,
        };
        let rows = read_delimited(&p, &layout)?;
        let texts: Vec<&str> = rows.iter().map(|(_, t, _)| t.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Sure, see you at 5, ok?",
                "WIN a \"free\" prize, call now",
                "two\r\nlines",
                "plain"
            ]
        );
        let labels: Vec<&str> = rows.iter().map(|(_, _, l)| l.as_str()).collect();
        assert_eq!(labels, ["ham", "spam", "ham", "ham"]);
        // Lines where each record starts (the quoted line break moves the last one).
        let lines: Vec<usize> = rows.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(lines, [2, 3, 4, 6]);
        Ok(())
    }

    #[test]
    fn delimited_reads_latin1_when_told_and_names_the_byte_otherwise() -> Result<()> {
        let p = temp_file("latin.tsv", b"good\t1\ncaf\xe9 cr\xe8me\t0\n");
        let mut layout = Layout {
            delimiter: '\t',
            header: false,
            text: &Column::Index(0),
            label: &Column::Index(1),
            encoding: Encoding::Utf8,
        };
        let m = message(read_delimited(&p, &layout));
        assert!(m.contains("line 2, byte offset 10"), "{m}");
        assert!(m.contains("latin-1") && m.contains("latin.tsv"), "{m}");
        layout.encoding = Encoding::Latin1;
        let rows = read_delimited(&p, &layout)?;
        assert_eq!(rows[1].1, "café crème");
        let wide = Layout {
            delimiter: '→',
            ..layout
        };
        assert!(message(read_delimited(&p, &wide)).contains("not a single ASCII character"));
        Ok(())
    }

    #[test]
    fn synthetic_is_deterministic_and_negation_flips() {
        let a = synthetic(200, 7);
        assert_eq!(a, synthetic(200, 7));
        assert_ne!(a, synthetic(200, 8));
        let negated: Vec<_> = a.iter().filter(|e| e.text.contains(" not ")).collect();
        assert!(!negated.is_empty());
        for e in negated {
            let positive_word = POSITIVE.iter().any(|w| e.text.ends_with(w));
            assert_eq!(e.label, u32::from(!positive_word), "{}", e.text);
        }
        let ones = a.iter().filter(|e| e.label == 1).count();
        assert!((60..140).contains(&ones), "{ones} positive of 200");
    }

    #[test]
    fn carve_keeps_every_example_once() {
        let ex = synthetic(100, 1);
        let [train, val, test] = carve(ex.clone(), 0.1, 0.2, 3);
        assert_eq!((train.len(), val.len(), test.len()), (70, 10, 20));
        let mut all: Vec<String> = [train, val, test]
            .concat()
            .into_iter()
            .map(|e| e.text)
            .collect();
        let mut want: Vec<String> = ex.into_iter().map(|e| e.text).collect();
        all.sort();
        want.sort();
        assert_eq!(all, want);
    }
}
