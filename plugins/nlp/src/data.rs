//! The NLP datasets: `nlp.synthetic` (the default; no files), `nlp.sst2`, `nlp.rt-polarity` and
//! `nlp.delimited`. Every batch serves models that tokenise differently: `words` (ids from a
//! vocabulary built on the training split) with `words_mask`, and, when the dataset names a
//! `wordpiece` tokenizer, `pieces` (WordPiece ids with `[CLS]`/`[SEP]`) with `pieces_mask`.
//! Ids are `u32` `[batch, length]`, padded with 0 to the batch's longest sentence; masks are
//! `f32`, 1 on real tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distill_rt::candle::{Device, Tensor};
use distill_rt::metrics::ClassificationMetrics;
use distill_rt::rng::Rng;
use distill_rt::serde::Deserialize;
use distill_rt::serde::de::DeserializeOwned;
use distill_rt::{
    Batch, Config, Dataset, DatasetFactory, DatasetInfo, Error, MetricAccumulator, Result, Split,
    TaskKind, assets, config,
};

use crate::text::{self, Column, Encoding, Example, Layout};
use crate::vocab::{OOV, PAD, Vocabulary, WordPiece, resolve_model_dir};

/// Word ids input.
pub const WORDS: &str = "words";
/// Mask of [`WORDS`].
pub const WORDS_MASK: &str = "words_mask";
/// WordPiece ids input.
pub const PIECES: &str = "pieces";
/// Mask of [`PIECES`].
pub const PIECES_MASK: &str = "pieces_mask";

/// Options every NLP dataset takes besides those of its source.
#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct TextOptions {
    /// Longest sentence kept, in tokens of either tokenizer.
    max_len: usize,
    /// Fewest occurrences in the training split for a word to get its own id.
    min_count: usize,
    /// Most word ids, padding and out-of-vocabulary included.
    max_vocab: usize,
    /// Folder of a `tokenizer.json` (or `all-MiniLM-L6-v2`) whose ids a BERT model reads.
    wordpiece: Option<String>,
    /// Keep only this many training sentences (a seeded sample).
    max_train: Option<usize>,
}

const TEXT_KEYS: [&str; 5] = [
    "max_len",
    "min_count",
    "max_vocab",
    "wordpiece",
    "max_train",
];

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            max_len: 64,
            min_count: 1,
            max_vocab: 20_000,
            wordpiece: None,
            max_train: None,
        }
    }
}

/// A source's defaults with those of the [`TextOptions`] every NLP dataset shares.
fn with_text_options(mut own: Config) -> Config {
    if let (Some(map), Config::Object(shared)) =
        (own.as_object_mut(), config::defaults_of::<TextOptions>())
    {
        map.extend(shared);
    }
    own
}

/// Parses the source's own keys into `T` and the shared ones into [`TextOptions`]; each
/// rejects keys it does not know.
fn parse_config<T: DeserializeOwned>(owner: &str, cfg: &Config) -> Result<(T, TextOptions)> {
    let (own, opts): (T, TextOptions) = config::parse_split(owner, cfg, &TEXT_KEYS)?;
    if opts.max_len < 2 {
        return Err(Error::config(owner, "max_len", "must be at least 2"));
    }
    if opts.max_vocab < 3 {
        return Err(Error::config(owner, "max_vocab", "must be at least 3"));
    }
    Ok((own, opts))
}

struct Encoded {
    words: Vec<u32>,
    pieces: Vec<u32>,
    label: u32,
}

/// A text classification dataset in memory, tokenised.
pub struct TextData {
    info: DatasetInfo,
    splits: [Vec<Encoded>; 3],
    pieces: bool,
}

impl TextData {
    /// Tokenises `splits` (train, validation, test) with a vocabulary built on train.
    fn new(
        owner: &str,
        mut splits: [Vec<Example>; 3],
        num_classes: usize,
        opts: &TextOptions,
    ) -> Result<Self> {
        if let Some(m) = opts.max_train {
            Rng::derive(0, "max_train").shuffle(&mut splits[0]);
            splits[0].truncate(m);
        }
        for (split, examples) in Split::ALL.iter().zip(&splits) {
            if examples.is_empty() {
                return Err(Error::config(
                    owner,
                    "*",
                    format!("the {} split is empty", split.name()),
                ));
            }
        }
        let vocab = Vocabulary::build(
            splits[0].iter().map(|e| e.text.as_str()),
            opts.min_count,
            opts.max_vocab,
        );
        let wordpiece = match &opts.wordpiece {
            Some(dir) => Some(WordPiece::load(&resolve_model_dir(
                owner,
                "wordpiece",
                dir,
                "tokenizer.json",
            )?)?),
            None => None,
        };
        let encode = |e: &Example| -> Result<Encoded> {
            let mut words = vocab.encode(&e.text);
            words.truncate(opts.max_len);
            if words.is_empty() {
                words.push(OOV);
            }
            let pieces = match &wordpiece {
                Some(wp) => wp.encode(&e.text, opts.max_len)?,
                None => Vec::new(),
            };
            Ok(Encoded {
                words,
                pieces,
                label: e.label,
            })
        };
        let [a, b, c] = splits;
        let splits = [a, b, c].map(|s| s.iter().map(encode).collect::<Result<Vec<_>>>());
        let [a, b, c] = splits;
        let splits = [a?, b?, c?];
        let mut inputs = BTreeMap::from([
            (WORDS.to_string(), vec![opts.max_len]),
            (WORDS_MASK.to_string(), vec![opts.max_len]),
        ]);
        let mut cardinality = BTreeMap::from([(WORDS.to_string(), vocab.len())]);
        if let Some(wp) = &wordpiece {
            inputs.insert(PIECES.to_string(), vec![opts.max_len]);
            inputs.insert(PIECES_MASK.to_string(), vec![opts.max_len]);
            cardinality.insert(PIECES.to_string(), wp.len());
        }
        let info = DatasetInfo {
            task: TaskKind::Classification,
            num_classes,
            inputs,
            cardinality,
            split_sizes: [splits[0].len(), splits[1].len(), splits[2].len()],
            primary_metric: "accuracy".into(),
        };
        Ok(Self {
            info,
            splits,
            pieces: wordpiece.is_some(),
        })
    }
}

/// `[batch, longest]` ids padded with [`PAD`] (0 in the WordPiece vocabulary too) and the mask.
fn padded(rows: &[&[u32]], device: &Device) -> Result<(Tensor, Tensor)> {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(PAD, len - r.len()));
        mask.extend(std::iter::repeat_n(1f32, r.len()));
        mask.extend(std::iter::repeat_n(0f32, len - r.len()));
    }
    let shape = (rows.len(), len);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

impl Dataset for TextData {
    fn info(&self) -> &DatasetInfo {
        &self.info
    }

    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        let data = &self.splits[split as usize];
        let rows: Vec<&Encoded> = indices
            .iter()
            .map(|&i| {
                data.get(i).ok_or_else(|| {
                    Error::Invalid(format!(
                        "index {i} out of range for the {} split of {}",
                        split.name(),
                        data.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let mut inputs = BTreeMap::new();
        let (ids, mask) = padded(
            &rows.iter().map(|r| r.words.as_slice()).collect::<Vec<_>>(),
            device,
        )?;
        inputs.insert(WORDS.to_string(), ids);
        inputs.insert(WORDS_MASK.to_string(), mask);
        if self.pieces {
            let (ids, mask) = padded(
                &rows.iter().map(|r| r.pieces.as_slice()).collect::<Vec<_>>(),
                device,
            )?;
            inputs.insert(PIECES.to_string(), ids);
            inputs.insert(PIECES_MASK.to_string(), mask);
        }
        let labels: Vec<u32> = rows.iter().map(|r| r.label).collect();
        let index_values: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        Ok(Batch {
            inputs,
            targets: Tensor::from_vec(labels, indices.len(), device)?,
            soft_targets: None,
            indices: Tensor::from_vec(index_values, indices.len(), device)?,
        })
    }

    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
        Ok(Box::new(ClassificationMetrics::new(self.info.num_classes)))
    }

    fn lengths(&self, split: Split) -> Option<Vec<usize>> {
        let rows = &self.splits[split as usize];
        Some(
            rows.iter()
                .map(|r| r.words.len().max(r.pieces.len()))
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct SyntheticConfig {
    train: usize,
    validation: usize,
    test: usize,
    seed: u64,
    /// Probability that a sentence's label is flipped (annotator noise), in every split.
    label_noise: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            train: 2000,
            validation: 400,
            test: 400,
            seed: 0,
            label_noise: 0.1,
        }
    }
}

/// `nlp.synthetic`.
pub struct SyntheticFactory;

impl DatasetFactory for SyntheticFactory {
    fn summary(&self) -> &str {
        "synthetic sentiment sentences with negation, intensifiers and `but` clauses (word order matters); `train` 2000, `validation` 400, `test` 400, `seed` 0, `label_noise` 0.1"
    }
    fn defaults(&self) -> Config {
        with_text_options(config::defaults_of::<SyntheticConfig>())
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset nlp.synthetic";
        let (c, opts): (SyntheticConfig, _) = parse_config(OWNER, cfg)?;
        if !(0.0..0.5).contains(&c.label_noise) {
            return Err(Error::config(OWNER, "label_noise", "must be in [0, 0.5)"));
        }
        let mut all = text::synthetic(c.train + c.validation + c.test, c.seed);
        let mut rng = Rng::derive(c.seed, "label-noise");
        for e in &mut all {
            if rng.uniform() < c.label_noise {
                e.label = 1 - e.label;
            }
        }
        let mut all = all.into_iter();
        let splits = [c.train, c.validation, c.test].map(|n| all.by_ref().take(n).collect());
        Ok(Box::new(TextData::new(OWNER, splits, 2, &opts)?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct Sst2Config {
    /// Folder with `sentiment-train`, `sentiment-dev`, `sentiment-test` (instead of `data`).
    #[serde(default)]
    path: Option<PathBuf>,
    /// The data set's name, fetched and verified into the data cache.
    #[serde(default = "sst2_data")]
    data: Option<String>,
}

fn sst2_data() -> Option<String> {
    Some("sst2".into())
}

/// `nlp.sst2`.
pub struct Sst2Factory;

impl DatasetFactory for Sst2Factory {
    fn summary(&self) -> &str {
        "SST-2 (SentEval form, `sentence<TAB>label`): `data` (`sst2`, fetched into the data cache) or a `path` holding sentiment-train, -dev (validation) and -test"
    }
    fn defaults(&self) -> Config {
        with_text_options(config::defaults_with_required::<Sst2Config>(&[]))
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset nlp.sst2";
        let (c, opts): (Sst2Config, _) = parse_config(OWNER, cfg)?;
        let dir = assets::folder(OWNER, c.path.as_deref(), c.data.as_deref())?;
        let read = |name: &str| text::read_sst2(&dir.join(name));
        let splits = [
            read("sentiment-train")?,
            read("sentiment-dev")?,
            read("sentiment-test")?,
        ];
        Ok(Box::new(TextData::new(OWNER, splits, 2, &opts)?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct RtPolarityConfig {
    /// Folder with `rt-polarity.pos` and `rt-polarity.neg` (instead of `data`).
    #[serde(default)]
    path: Option<PathBuf>,
    /// The data set's name, fetched and verified into the data cache.
    #[serde(default = "rt_polarity_data")]
    data: Option<String>,
    #[serde(default = "tenth")]
    validation_fraction: f64,
    #[serde(default = "tenth")]
    test_fraction: f64,
    #[serde(default)]
    split_seed: u64,
}

fn rt_polarity_data() -> Option<String> {
    Some("rt-polarity".into())
}

fn tenth() -> f64 {
    0.1
}

/// Checks the fractions carved from a training file (`None`: that split has its own file).
fn check_fractions(owner: &str, validation: Option<f64>, test: Option<f64>) -> Result<()> {
    for (key, f) in [("validation_fraction", validation), ("test_fraction", test)] {
        if let Some(f) = f
            && !(f > 0.0 && f < 1.0)
        {
            return Err(Error::config(owner, key, "must be in (0, 1)"));
        }
    }
    if validation.unwrap_or(0.0) + test.unwrap_or(0.0) >= 1.0 {
        return Err(Error::config(
            owner,
            "test_fraction",
            "validation_fraction + test_fraction must be below 1",
        ));
    }
    Ok(())
}

/// `nlp.rt-polarity`.
pub struct RtPolarityFactory;

impl DatasetFactory for RtPolarityFactory {
    fn summary(&self) -> &str {
        "Pang & Lee sentence polarity: `data` (`rt-polarity`, fetched into the data cache) or a `path` holding rt-polarity.pos and .neg; validation and test carved by a seeded split (`validation_fraction`, `test_fraction` 0.1, `split_seed` 0)"
    }
    fn defaults(&self) -> Config {
        with_text_options(config::defaults_with_required::<RtPolarityConfig>(&[]))
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset nlp.rt-polarity";
        let (c, opts): (RtPolarityConfig, _) = parse_config(OWNER, cfg)?;
        check_fractions(OWNER, Some(c.validation_fraction), Some(c.test_fraction))?;
        let dir = assets::folder(OWNER, c.path.as_deref(), c.data.as_deref())?;
        let all = text::read_rt_polarity(&dir)?;
        let splits = text::carve(all, c.validation_fraction, c.test_fraction, c.split_seed);
        Ok(Box::new(TextData::new(OWNER, splits, 2, &opts)?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct DelimitedConfig {
    train: PathBuf,
    validation: Option<PathBuf>,
    test: Option<PathBuf>,
    #[serde(default = "tenth")]
    validation_fraction: f64,
    #[serde(default = "tenth")]
    test_fraction: f64,
    #[serde(default)]
    split_seed: u64,
    #[serde(default = "tab")]
    delimiter: char,
    #[serde(default)]
    header: bool,
    #[serde(default = "first")]
    text_column: Column,
    #[serde(default = "second")]
    label_column: Column,
    classes: Option<Vec<String>>,
    #[serde(default)]
    encoding: Encoding,
}

fn tab() -> char {
    '\t'
}
fn first() -> Column {
    Column::Index(0)
}
fn second() -> Column {
    Column::Index(1)
}

/// Warns when a file's labels look like a misread (a text column split into labels): more
/// classes than a tenth of the rows, or classes seen only once.
fn warn_on_odd_classes(file: &Path, ids: &[u32], classes: usize) {
    let mut counts = vec![0usize; classes];
    for &id in ids {
        if let Some(c) = counts.get_mut(id as usize) {
            *c += 1;
        }
    }
    let once = counts.iter().filter(|&&c| c == 1).count();
    if classes > 2 && (classes * 10 > ids.len() || once > 0) {
        distill_rt::tracing::warn!(
            "dataset nlp.delimited: {}: {classes} classes in {} rows, {once} of them seen once; \
             check `delimiter`, `label_column` and `header` (a misread text column makes labels)",
            file.display(),
            ids.len()
        );
    }
}

/// `nlp.delimited`.
pub struct DelimitedFactory;

impl DatasetFactory for DelimitedFactory {
    fn summary(&self) -> &str {
        "delimited text classification, CSV rules (quoted fields, CRLF, a header, a byte-order mark; `encoding` utf-8 or latin-1): `train` file, optional `validation`/`test` files (else carved by `validation_fraction`, `test_fraction`), `delimiter` tab, `header` false, `text_column` 0, `label_column` 1 (index or header name), labels as integers or names (`classes` fixes their order)"
    }
    fn defaults(&self) -> Config {
        with_text_options(config::defaults_with_required::<DelimitedConfig>(&[(
            "train",
            Config::String(String::new()),
        )]))
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset nlp.delimited";
        let (c, opts): (DelimitedConfig, _) = parse_config(OWNER, cfg)?;
        let layout = Layout {
            delimiter: c.delimiter,
            header: c.header,
            text: &c.text_column,
            label: &c.label_column,
            encoding: c.encoding,
        };
        let files: [Option<&Path>; 3] = [
            Some(c.train.as_path()),
            c.validation.as_deref(),
            c.test.as_deref(),
        ];
        // Read every file first so that class names are numbered over all of them.
        let mut rows: Vec<(usize, &Path, usize, String, String)> = Vec::new();
        for (split, file) in files.iter().enumerate() {
            if let Some(path) = file {
                for (n, t, l) in text::read_delimited(path, &layout)? {
                    rows.push((split, path, n, t, l));
                }
            }
        }
        let tagged: Vec<(&Path, usize, String)> = rows
            .iter()
            .map(|(_, p, n, _, l)| (*p, *n, l.clone()))
            .collect();
        let (ids, names) = text::label_ids(&tagged, c.classes.as_deref())?;
        warn_on_odd_classes(&c.train, &ids, names.len());
        let mut read: [Vec<Example>; 3] = Default::default();
        for ((split, _, _, text, _), label) in rows.into_iter().zip(ids) {
            read[split].push(Example { text, label });
        }
        let [train, validation, test] = read;
        let vf = c.validation.is_none().then_some(c.validation_fraction);
        let tf = c.test.is_none().then_some(c.test_fraction);
        check_fractions(OWNER, vf, tf)?;
        let [train, carved_val, carved_test] =
            text::carve(train, vf.unwrap_or(0.0), tf.unwrap_or(0.0), c.split_seed);
        let splits = [
            train,
            if c.validation.is_some() {
                validation
            } else {
                carved_val
            },
            if c.test.is_some() { test } else { carved_test },
        ];
        Ok(Box::new(TextData::new(OWNER, splits, names.len(), &opts)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::serde_json::json;

    #[test]
    fn sst2_has_the_published_split_sizes() -> Result<()> {
        distill_host::install_data_resolver();
        let d = Sst2Factory.build(&json!({}))?;
        assert_eq!(d.info().split_sizes, [67_349, 872, 1_821]);
        assert_eq!(d.info().num_classes, 2);
        Ok(())
    }

    #[test]
    fn rt_polarity_reads_both_files() -> Result<()> {
        let d =
            RtPolarityFactory.build(&json!({"path": distill_host::data_folder("rt-polarity")?}))?;
        let [a, b, c] = d.info().split_sizes;
        assert_eq!(a + b + c, 5_331 + 5_331);
        assert_eq!((b, c), (1_066, 1_066));
        Ok(())
    }

    /// A two-class CSV whose messages hold commas (quoted) is two classes, not one per comma.
    #[test]
    fn a_quoted_csv_keeps_its_two_classes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("distill-nlp-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::data(&dir, e.to_string()))?;
        let file = dir.join("spam.csv");
        let mut text = String::from("label,message\n");
        for i in 0..40 {
            let (label, message) = if i % 3 == 0 {
                ("spam", format!("\"Claim your prize {i}, call now, free!\""))
            } else {
                (
                    "ham",
                    format!("\"See you at {i}, ok, bring \"\"the\"\" book\""),
                )
            };
            text.push_str(&format!("{label},{message}\n"));
        }
        std::fs::write(&file, text).map_err(|e| Error::data(&file, e.to_string()))?;
        let d = DelimitedFactory.build(&json!({
            "train": file, "delimiter": ",", "header": true,
            "text_column": "message", "label_column": "label"
        }))?;
        assert_eq!(d.info().num_classes, 2);
        assert_eq!(d.info().split_sizes.iter().sum::<usize>(), 40);
        Ok(())
    }

    #[test]
    fn batches_pad_to_the_longest_sentence() -> Result<()> {
        let d = SyntheticFactory.build(&json!({"train": 50, "validation": 10, "test": 10}))?;
        let b = d.batch(Split::Train, &[0, 1, 2, 3], &Device::Cpu)?;
        let ids = b.inputs[WORDS].to_vec2::<u32>()?;
        let mask = b.inputs[WORDS_MASK].to_vec2::<f32>()?;
        assert_eq!(ids.len(), 4);
        let longest = mask
            .iter()
            .map(|m| m.iter().sum::<f32>() as usize)
            .max()
            .unwrap_or(0);
        assert_eq!(ids[0].len(), longest);
        for (row, m) in ids.iter().zip(&mask) {
            for (id, on) in row.iter().zip(m) {
                assert_eq!(*id == 0, *on == 0.0);
            }
        }
        assert!(!b.inputs.contains_key(PIECES));
        Ok(())
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let err = |cfg| match SyntheticFactory.build(&cfg) {
            Ok(_) => panic!("expected an error for {cfg}"),
            Err(e) => e.to_string(),
        };
        assert!(err(json!({"max_lenn": 3})).contains("max_lenn"));
        assert!(err(json!({"max_len": 1})).contains("max_len"));
        assert!(err(json!({"train": -1})).contains("train"));
        let m = match Sst2Factory.build(&json!({"path": "/nonexistent"})) {
            Ok(_) => panic!("a missing folder must fail"),
            Err(e) => e.to_string(),
        };
        assert!(m.contains("/nonexistent/sentiment-train"), "{m}");
    }
}
