//! Tokenisation: a word vocabulary built from the training split (for students trained from
//! scratch) and WordPiece from a `tokenizer.json` through the `tokenizers` crate (for
//! BERT-family teachers). Both give `u32` ids; id 0 is padding in both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use distill_rt::{Error, Result, assets};

/// Padding id of the word vocabulary.
pub const PAD: u32 = 0;
/// Out-of-vocabulary id of the word vocabulary.
pub const OOV: u32 = 1;

/// Lower-cased words and punctuation marks of `text`: runs of letters, digits and apostrophes
/// are words, any other non-space character is a token of its own.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() || c == '\'' {
            word.extend(c.to_lowercase());
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// A word vocabulary: `<pad>` (0), `<oov>` (1), then words by falling count (ties in
/// alphabetical order).
pub struct Vocabulary {
    ids: HashMap<String, u32>,
}

impl Vocabulary {
    /// The words of `texts` seen at least `min_count` times, at most `max_size` ids in all.
    pub fn build<'a>(
        texts: impl Iterator<Item = &'a str>,
        min_count: usize,
        max_size: usize,
    ) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for t in texts {
            for w in words(t) {
                *counts.entry(w).or_default() += 1;
            }
        }
        let mut ranked: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|(_, c)| *c >= min_count.max(1))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let ids = ranked
            .into_iter()
            .take(max_size.saturating_sub(2))
            .enumerate()
            .map(|(i, (w, _))| (w, i as u32 + 2))
            .collect();
        Self { ids }
    }

    /// Number of ids, padding and out-of-vocabulary included.
    pub fn len(&self) -> usize {
        self.ids.len() + 2
    }

    /// The ids of `text`'s words, unknown words as [`OOV`].
    pub fn encode(&self, text: &str) -> Vec<u32> {
        words(text)
            .iter()
            .map(|w| self.ids.get(w).copied().unwrap_or(OOV))
            .collect()
    }
}

/// A WordPiece tokenizer read from a `tokenizer.json`.
pub struct WordPiece {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl WordPiece {
    /// Reads `tokenizer.json` from `dir` (or `dir` itself when it is the file); the file's own
    /// padding and truncation are switched off (batches pad to their longest sentence).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = if dir.is_dir() {
            dir.join("tokenizer.json")
        } else {
            dir.to_path_buf()
        };
        if !path.is_file() {
            return Err(Error::data(&path, "no tokenizer.json here"));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::data(&path, format!("not a tokenizer.json: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::data(&path, e.to_string()))?;
        Ok(Self { inner, path })
    }

    /// Size of the vocabulary, added tokens included.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of `text` with `[CLS]` and `[SEP]`, cut to `max_len` ids (keeping `[SEP]` last).
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::data(&self.path, format!("cannot tokenise {text:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > max_len && max_len >= 2 {
            let last = ids[ids.len() - 1];
            ids.truncate(max_len - 1);
            ids.push(last);
        }
        Ok(ids)
    }
}

/// Where a pretrained model's files are: `value` is a folder (a path holding `file`) or the name
/// of a model the data cache knows (`all-MiniLM-L6-v2`), fetched and verified there first.
/// `owner` and `key` name the configuration for errors.
pub fn resolve_model_dir(owner: &str, key: &str, value: &str, file: &str) -> Result<PathBuf> {
    let path = Path::new(value);
    let dir = if path.is_dir() || value.contains(['/', '\\']) {
        path.to_path_buf()
    } else {
        assets::resolve(owner, key, value)?
    };
    if !dir.join(file).is_file() {
        return Err(Error::data(
            dir.join(file),
            format!(
                "missing: `{key}` names a folder that should hold {file}; or give a model's name \
                 (`{MINILM}`; `cargo xtask fetch --list` lists them)"
            ),
        ));
    }
    Ok(dir)
}

/// The name that stands for the pretrained all-MiniLM-L6-v2 files.
pub const MINILM: &str = "all-MiniLM-L6-v2";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_punctuation_and_lowercase() {
        assert_eq!(
            words("It's NOT good, really."),
            ["it's", "not", "good", ",", "really", "."]
        );
    }

    #[test]
    fn missing_model_files_say_how_to_get_them() {
        let m = match resolve_model_dir(
            "model nlp.bert",
            "pretrained",
            "/nonexistent/minilm",
            "model.safetensors",
        ) {
            Ok(d) => panic!("found {}", d.display()),
            Err(e) => e.to_string(),
        };
        assert!(m.contains("/nonexistent/minilm/model.safetensors"), "{m}");
        assert!(m.contains("cargo xtask fetch --list"), "{m}");
    }

    #[test]
    fn vocabulary_ranks_by_count_and_maps_unknown_words() {
        let texts = ["b a a", "c b a", "d"];
        let v = Vocabulary::build(texts.iter().copied(), 1, 4);
        assert_eq!(v.len(), 4);
        // a (3) -> 2, b (2) -> 3; c and d do not fit.
        assert_eq!(v.encode("a b c zz"), [2, 3, OOV, OOV]);
        let v = Vocabulary::build(texts.iter().copied(), 2, 100);
        assert_eq!(v.len(), 4);
        assert_eq!(v.encode("d"), [OOV]);
    }
}
