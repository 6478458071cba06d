//! The NLP models:
//! - `nlp.bert`: a BERT encoder (see [`crate::bert`]) with mean pooling and a linear head, either
//!   the pretrained all-MiniLM-L6-v2 on WordPiece ids (`pretrained`) with a configurable
//!   fine-tuning depth, or trained here from scratch (by default a 2-layer transformer on word
//!   ids, the small-transformer student). Features: `pooled` = `penultimate` (the pooled state),
//!   `hidden.<i>` (`[batch, length, hidden]`, 0 the embeddings) and `attention.<i>`
//!   (`[batch, heads, length, length]`) for layers 1..L.
//! - `nlp.bilstm`: Tang et al. (2019)'s student: embedding, one bidirectional LSTM whose two
//!   final states are concatenated (`pooled`), a ReLU layer (`penultimate`), the head.
//! - `nlp.textcnn`: Kim (2014): embedding, convolutions of several widths with ReLU and
//!   max-over-time pooling, concatenated (`pooled` = `penultimate`), the head. No dropout (runs are
//!   deterministic).
//!
//! Students read `words`; all variables use PyTorch's default initialisation except the BERT
//! encoder's (BERT's own: N(0, 0.02)).

use std::collections::BTreeMap;

use distill_rt::candle::Tensor;
use distill_rt::candle_nn::VarBuilder;
use distill_rt::kernels::{bilstm_final_states, conv2d, linear, relu};
use distill_rt::model::PENULTIMATE;
use distill_rt::nn::{Embedding, Linear, fan_in_init};
use distill_rt::serde::Deserialize;
use distill_rt::serde_json::Value;
use distill_rt::{
    Config, Error, Model, ModelContext, ModelFactory, ModelOutput, Result, TensorMap, config,
};

use crate::bert::{BertDims, Encoder, load_pretrained, mean_pool, variable_count};
use crate::data::{PIECES, WORDS};
use crate::vocab::resolve_model_dir;

/// The error for a model that reads WordPiece ids from a dataset without them.
fn needs_wordpiece(owner: &str) -> String {
    format!("{owner} reads WordPiece ids: set the dataset's `wordpiece` to the model's folder")
}

/// The ids and mask named `ids`, or an error saying which dataset setting provides them.
fn tokens<'a>(owner: &str, ids: &str, inputs: &'a TensorMap) -> Result<(&'a Tensor, &'a Tensor)> {
    let mask = format!("{ids}_mask");
    match (inputs.get(ids), inputs.get(&mask)) {
        (Some(i), Some(m)) => Ok((i, m)),
        _ if ids == PIECES => Err(Error::Invalid(needs_wordpiece(owner))),
        _ => Err(Error::Invalid(format!(
            "{owner} needs the inputs `{ids}` and `{mask}`"
        ))),
    }
}

/// The vocabulary size of input `ids`, or an error naming the model.
fn vocabulary(owner: &str, ids: &str, ctx: &ModelContext<'_>) -> Result<usize> {
    ctx.dataset.cardinality.get(ids).copied().ok_or_else(|| {
        Error::Invalid(if ids == PIECES {
            needs_wordpiece(owner)
        } else {
            format!("{owner} needs a text dataset with an `{ids}` input")
        })
    })
}

/// Typical sentence length for the FLOP count: the dataset's longest, capped at 32.
fn typical_len(ctx: &ModelContext<'_>, ids: &str) -> usize {
    ctx.dataset
        .inputs
        .get(ids)
        .and_then(|s| s.first().copied())
        .unwrap_or(32)
        .min(32)
}

fn output(logits: Tensor, features: Vec<(String, Tensor)>) -> ModelOutput {
    ModelOutput {
        logits,
        features: features.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct BertConfig {
    /// Folder of `config.json` + `model.safetensors`, or `all-MiniLM-L6-v2`.
    pretrained: Option<String>,
    /// Which ids to read: `pieces` (the default with `pretrained`) or `words`.
    input: Option<String>,
    /// `all`, `head`, or the number of top layers to train (pretrained encoders only).
    finetune: Option<Value>,
    #[serde(default = "d128")]
    hidden: usize,
    #[serde(default = "d2")]
    layers: usize,
    #[serde(default = "d4")]
    heads: usize,
    #[serde(default = "d256")]
    intermediate: usize,
}

fn d128() -> usize {
    128
}
fn d2() -> usize {
    2
}
fn d4() -> usize {
    4
}
fn d256() -> usize {
    256
}

struct Bert {
    encoder: Encoder,
    head: Linear,
    input: String,
    frozen: usize,
    macs: u64,
}

/// `nlp.bert`.
pub struct BertFactory;

impl ModelFactory for BertFactory {
    fn summary(&self) -> &str {
        "BERT encoder, mean pooling, linear head: `pretrained = \"all-MiniLM-L6-v2\"` (or a folder) with `finetune` all | head | top k layers, else trained here on `input` words (`hidden` 128, `layers` 2, `heads` 4, `intermediate` 256)"
    }
    fn defaults(&self) -> Config {
        config::defaults_with_required::<BertConfig>(&[])
    }

    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model nlp.bert";
        let c: BertConfig = config::parse(OWNER, cfg)?;
        let input = c.input.clone().unwrap_or_else(|| {
            if c.pretrained.is_some() {
                PIECES
            } else {
                WORDS
            }
            .into()
        });
        if input != PIECES && input != WORDS {
            return Err(Error::config(
                OWNER,
                "input",
                format!("`{input}` is not `pieces` or `words`"),
            ));
        }
        let vocab = vocabulary(OWNER, &input, &ctx)?;
        let (dims, dir) = match &c.pretrained {
            Some(p) => {
                let dir = resolve_model_dir(OWNER, "pretrained", p, "model.safetensors")?;
                (BertDims::read(&dir)?, Some(dir))
            }
            None => {
                config::require_positive(
                    OWNER,
                    &[
                        ("hidden", c.hidden),
                        ("layers", c.layers),
                        ("heads", c.heads),
                        ("intermediate", c.intermediate),
                    ],
                )?;
                let dims = BertDims {
                    vocab_size: vocab,
                    hidden_size: c.hidden,
                    num_hidden_layers: c.layers,
                    num_attention_heads: c.heads,
                    intermediate_size: c.intermediate,
                    max_position_embeddings: 512,
                    type_vocab_size: 2,
                    layer_norm_eps: 1e-12,
                };
                (dims, None)
            }
        };
        if dims.vocab_size != vocab {
            return Err(Error::config(
                OWNER,
                "pretrained",
                format!(
                    "the encoder has {} token ids but the dataset's `{input}` has {vocab}: the dataset's `wordpiece` must be this model's tokenizer",
                    dims.vocab_size
                ),
            ));
        }
        let layers = dims.num_hidden_layers;
        let frozen = match (&c.finetune, &dir) {
            (None, _) => 0,
            (Some(_), None) => {
                return Err(Error::config(
                    OWNER,
                    "finetune",
                    "applies to a `pretrained` encoder only",
                ));
            }
            (Some(Value::String(s)), _) if s == "all" => 0,
            (Some(Value::String(s)), _) if s == "head" => layers + 1,
            (Some(Value::Number(n)), _) => match n.as_u64() {
                Some(k) if (k as usize) <= layers => layers + 1 - k as usize,
                _ => {
                    return Err(Error::config(
                        OWNER,
                        "finetune",
                        format!("top layers must be 0..={layers}"),
                    ));
                }
            },
            (Some(other), _) => {
                return Err(Error::config(
                    OWNER,
                    "finetune",
                    format!("`{other}` is not `all`, `head` or a number of top layers"),
                ));
            }
        };
        let encoder = Encoder::new(&dims, ctx.vb.clone())?;
        if let Some(dir) = &dir {
            load_pretrained(dir, &ctx.vb, variable_count(layers))?;
        }
        let head = Linear::new(
            dims.hidden_size,
            ctx.dataset.num_classes,
            ctx.vb.pp("classifier"),
        )?;
        let macs = encoder.macs(typical_len(&ctx, &input)) + head.macs();
        Ok(Box::new(Bert {
            encoder,
            head,
            input,
            frozen,
            macs,
        }))
    }
}

impl Model for Bert {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let (ids, mask) = tokens("nlp.bert", &self.input, inputs)?;
        let enc = self.encoder.forward(ids, mask, self.frozen)?;
        let last = enc
            .hidden
            .last()
            .ok_or_else(|| Error::Invalid("an encoder without output".into()))?;
        let pooled = mean_pool(last, mask)?;
        let mut features: Vec<(String, Tensor)> = Vec::new();
        for (i, h) in enc.hidden.into_iter().enumerate() {
            features.push((format!("hidden.{i}"), h));
        }
        for (i, a) in enc.attention.into_iter().enumerate() {
            features.push((format!("attention.{}", i + 1), a));
        }
        features.push(("pooled".into(), pooled.clone()));
        features.push((PENULTIMATE.into(), pooled.clone()));
        Ok(output(self.head.forward(&pooled)?, features))
    }
    fn flops_per_sample(&self) -> u64 {
        self.macs
    }
    fn frozen_prefixes(&self) -> Vec<String> {
        self.encoder.prefixes(self.frozen)
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct BiLstmConfig {
    embedding: usize,
    hidden: usize,
    mlp: usize,
}

impl Default for BiLstmConfig {
    fn default() -> Self {
        Self {
            embedding: 128,
            hidden: 150,
            mlp: 200,
        }
    }
}

/// One direction of an LSTM (PyTorch's gate order i, f, g, o and initialisation).
struct Lstm {
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor,
    hidden: usize,
}

impl Lstm {
    fn new(input: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let init = fan_in_init(hidden);
        Ok(Self {
            w_ih: vb.get_with_hints((4 * hidden, input), "weight_ih", init)?,
            w_hh: vb.get_with_hints((4 * hidden, hidden), "weight_hh", init)?,
            // PyTorch's b_ih + b_hh as one vector (their sum has twice the spread).
            bias: vb.get_with_hints(4 * hidden, "bias", init)?,
            hidden,
        })
    }

    /// The input contributions (with the bias) of every step of `x` (time-major: `[length *
    /// batch, input]`) at once: `[length, batch, 4 * hidden]`.
    fn gates(&self, x: &Tensor, (t, b): (usize, usize)) -> Result<Tensor> {
        Ok(linear(x, &self.w_ih, &self.bias)?.reshape((t, b, 4 * self.hidden))?)
    }
}

struct BiLstm {
    embedding: Embedding,
    forward: Lstm,
    backward: Lstm,
    mlp: Linear,
    head: Linear,
    macs: u64,
}

/// `nlp.bilstm`.
pub struct BiLstmFactory;

impl ModelFactory for BiLstmFactory {
    fn summary(&self) -> &str {
        "BiLSTM student (Tang et al. 2019): embedding, bidirectional LSTM, final states concatenated, ReLU layer, head; `embedding` 128, `hidden` 150, `mlp` 200"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<BiLstmConfig>()
    }

    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model nlp.bilstm";
        let c: BiLstmConfig = config::parse(OWNER, cfg)?;
        config::require_positive(
            OWNER,
            &[
                ("embedding", c.embedding),
                ("hidden", c.hidden),
                ("mlp", c.mlp),
            ],
        )?;
        let vocab = vocabulary(OWNER, WORDS, &ctx)?;
        let vb = &ctx.vb;
        let embedding = Embedding::new(vocab, c.embedding, vb.pp("embedding"))?;
        let forward = Lstm::new(c.embedding, c.hidden, vb.pp("lstm.forward"))?;
        let backward = Lstm::new(c.embedding, c.hidden, vb.pp("lstm.backward"))?;
        let mlp = Linear::new(2 * c.hidden, c.mlp, vb.pp("mlp"))?;
        let head = Linear::new(c.mlp, ctx.dataset.num_classes, vb.pp("classifier"))?;
        let len = typical_len(&ctx, WORDS) as u64;
        let per_token = 2 * 4 * c.hidden as u64 * (c.embedding + c.hidden) as u64;
        let macs = len * per_token + mlp.macs() + head.macs();
        Ok(Box::new(BiLstm {
            embedding,
            forward,
            backward,
            mlp,
            head,
            macs,
        }))
    }
}

impl Model for BiLstm {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let (ids, mask) = tokens("nlp.bilstm", WORDS, inputs)?;
        let x = self.embedding.forward(ids)?;
        // Time-major, so that each step's rows are contiguous; once for both directions.
        let (b, t, e) = x.dims3()?;
        let x = x.transpose(0, 1)?.contiguous()?.reshape((t * b, e))?;
        // Both recurrences as one op, side by side (`kernels::bilstm_final_states`).
        let (f, r) = (&self.forward, &self.backward);
        let pooled = bilstm_final_states(
            [&f.gates(&x, (t, b))?, &r.gates(&x, (t, b))?],
            [&f.w_hh, &r.w_hh],
            mask,
        )?;
        let penultimate = relu(&self.mlp.forward(&pooled)?)?;
        let logits = self.head.forward(&penultimate)?;
        Ok(output(
            logits,
            vec![("pooled".into(), pooled), (PENULTIMATE.into(), penultimate)],
        ))
    }
    fn flops_per_sample(&self) -> u64 {
        self.macs
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct TextCnnConfig {
    embedding: usize,
    widths: Vec<usize>,
    filters: usize,
}

impl Default for TextCnnConfig {
    fn default() -> Self {
        Self {
            embedding: 128,
            widths: vec![3, 4, 5],
            filters: 100,
        }
    }
}

struct TextCnn {
    embedding: Embedding,
    convs: Vec<(usize, Linear)>,
    head: Linear,
    macs: u64,
}

/// `nlp.textcnn`.
pub struct TextCnnFactory;

impl ModelFactory for TextCnnFactory {
    fn summary(&self) -> &str {
        "TextCNN (Kim 2014): embedding, convolutions of `widths` [3, 4, 5] with `filters` 100 each, ReLU, max over time, head; `embedding` 128"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<TextCnnConfig>()
    }

    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        const OWNER: &str = "model nlp.textcnn";
        let c: TextCnnConfig = config::parse(OWNER, cfg)?;
        if c.widths.is_empty() || c.widths.contains(&0) {
            return Err(Error::config(
                OWNER,
                "widths",
                "needs at least one width, each > 0",
            ));
        }
        config::require_positive(OWNER, &[("embedding", c.embedding), ("filters", c.filters)])?;
        let vocab = vocabulary(OWNER, WORDS, &ctx)?;
        let vb = &ctx.vb;
        let embedding = Embedding::new(vocab, c.embedding, vb.pp("embedding"))?;
        let convs = c
            .widths
            .iter()
            .map(|&k| {
                let conv = Linear::new(k * c.embedding, c.filters, vb.pp(format!("conv{k}")))?;
                Ok((k, conv))
            })
            .collect::<Result<Vec<_>>>()?;
        let head = Linear::new(
            c.widths.len() * c.filters,
            ctx.dataset.num_classes,
            vb.pp("classifier"),
        )?;
        let len = typical_len(&ctx, WORDS) as u64;
        let macs = convs.iter().map(|(_, l)| len * l.macs()).sum::<u64>() + head.macs();
        Ok(Box::new(TextCnn {
            embedding,
            convs,
            head,
            macs,
        }))
    }
}

impl Model for TextCnn {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let (ids, mask) = tokens("nlp.textcnn", WORDS, inputs)?;
        let (b, t) = ids.dims2()?;
        let widest = self.convs.iter().map(|(k, _)| *k).max().unwrap_or(1);
        // Padding embeds as zeros (as Kim's zero padding); short batches are padded to the
        // widest filter so that every sentence has at least one window.
        let e = self.embedding.forward(ids)?;
        let mut x = e.broadcast_mul(&mask.to_dtype(e.dtype())?.unsqueeze(2)?)?;
        let mut mask = mask.to_dtype(x.dtype())?;
        if t < widest {
            x = x.pad_with_zeros(1, 0, widest - t)?;
            mask = mask.pad_with_zeros(1, 0, widest - t)?;
        }
        let t = t.max(widest);
        let e = x.dim(2)?;
        // The sentence as a one-row image with the embedding as channels, `[b, e, 1, t]`: each
        // filter width is a `1 x k` convolution (`kernels::conv2d`, no window copies).
        let image = x.transpose(1, 2)?.contiguous()?.reshape((b, e, 1, t))?;
        let mut pooled = Vec::with_capacity(self.convs.len());
        for (k, conv) in &self.convs {
            let n = t + 1 - k;
            // The weight `[filters, k * e]` (window position major) as `[filters, e, 1, k]`.
            let filters = conv.weight().dim(0)?;
            let weight = conv
                .weight()
                .reshape((filters, *k, e))?
                .transpose(1, 2)?
                .reshape((filters, e, 1, *k))?;
            let y = relu(&conv2d(&image, &weight, conv.bias(), 0, 1)?)?.reshape((b, filters, n))?;
            // Windows that start on padding never win the max.
            let starts = ((mask.narrow(1, 0, n)? - 1.0)? * 1e4)?.unsqueeze(1)?;
            pooled.push(y.broadcast_add(&starts)?.max(2)?);
        }
        let penultimate = Tensor::cat(&pooled, 1)?;
        let logits = self.head.forward(&penultimate)?;
        debug_assert_eq!(logits.dim(0)?, b);
        Ok(output(
            logits,
            vec![
                ("pooled".into(), penultimate.clone()),
                (PENULTIMATE.into(), penultimate),
            ],
        ))
    }
    fn flops_per_sample(&self) -> u64 {
        self.macs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SyntheticFactory, WORDS_MASK};
    use crate::vocab::MINILM;
    use distill_rt::candle::{DType, Device, Var};
    use distill_rt::candle_nn::{Optimizer, SGD, VarMap};
    use distill_rt::init::seeded_var_builder;
    use distill_rt::serde_json::json;
    use distill_rt::testing::{
        check_gradient_coverage, max_abs_difference, named_vars, split_frozen,
    };
    use distill_rt::{Batch, Dataset, DatasetFactory, Split, ops};

    fn synthetic(cfg: Value) -> Result<Box<dyn Dataset>> {
        SyntheticFactory.build(&cfg)
    }

    fn batch(data: &dyn Dataset) -> Result<Batch> {
        data.batch(Split::Train, &(0..8).collect::<Vec<_>>(), &Device::Cpu)
    }

    /// One forward + backward on a real batch: trainable variables all get a gradient, frozen
    /// ones none; the initial loss is near ln 2; the listed features are batch first.
    fn check_model(
        factory: &dyn ModelFactory,
        cfg: Value,
        data: &dyn Dataset,
        features: &[&str],
    ) -> Result<(VarMap, Box<dyn Model>)> {
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let model = factory.build(&cfg, ctx)?;
        let b = batch(data)?;
        let out = model.forward(&b.inputs, true)?;
        assert_eq!(out.logits.dims(), &[8, 2]);
        for f in features.iter().chain(&[PENULTIMATE]) {
            let t = out
                .features
                .get(*f)
                .unwrap_or_else(|| panic!("feature {f} missing: {:?}", out.features.keys()));
            assert_eq!(t.dim(0)?, 8, "{f} is batch first");
        }
        let loss = ops::cross_entropy(&out.logits, &b.targets)?;
        let l = loss.to_scalar::<f32>()?;
        assert!((l - 2f32.ln()).abs() < 0.5, "initial loss {l}");
        let grads = loss.backward()?;
        let (trainable, frozen) = split_frozen(named_vars(&varmap), &model.frozen_prefixes());
        let frozen: Vec<(String, Tensor)> = frozen
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        check_gradient_coverage(&trainable, &frozen, &grads)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(model.flops_per_sample() > 0);
        Ok((varmap, model))
    }

    #[test]
    fn small_transformer_passes_gradient_coverage() -> Result<()> {
        let data = synthetic(json!({"train": 40, "validation": 8, "test": 8}))?;
        check_model(
            &BertFactory,
            json!({"hidden": 16, "heads": 2, "intermediate": 32}),
            data.as_ref(),
            &["hidden.0", "hidden.2", "attention.1", "attention.2"],
        )?;
        Ok(())
    }

    #[test]
    fn bilstm_passes_gradient_coverage() -> Result<()> {
        let data = synthetic(json!({"train": 40, "validation": 8, "test": 8}))?;
        check_model(
            &BiLstmFactory,
            json!({"embedding": 8, "hidden": 6, "mlp": 10}),
            data.as_ref(),
            &["pooled"],
        )?;
        Ok(())
    }

    #[test]
    fn textcnn_passes_gradient_coverage() -> Result<()> {
        let data = synthetic(json!({"train": 40, "validation": 8, "test": 8}))?;
        check_model(
            &TextCnnFactory,
            json!({"embedding": 8, "filters": 4, "widths": [2, 7]}),
            data.as_ref(),
            &[],
        )?;
        Ok(())
    }

    /// Each filter width's convolution equals the fully connected layer applied to every window
    /// of `k` embeddings laid end to end (Kim's formulation), at every position.
    #[test]
    fn textcnn_convolutions_equal_the_windowed_layer() -> Result<()> {
        let (b, t, e, k, filters) = (3, 9, 5, 4, 6);
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 0, DType::F64, &Device::Cpu);
        let conv = Linear::new(k * e, filters, vb.pp("conv"))?;
        let x = Tensor::randn(0f64, 1.0, (b, t, e), &Device::Cpu)?;
        let n = t + 1 - k;
        let windows: Vec<Tensor> = (0..k)
            .map(|j| x.narrow(1, j, n))
            .collect::<std::result::Result<_, _>>()?;
        let want = conv.forward(&Tensor::cat(&windows, 2)?)?.transpose(1, 2)?;
        let image = x.transpose(1, 2)?.contiguous()?.reshape((b, e, 1, t))?;
        let weight = conv
            .weight()
            .reshape((filters, k, e))?
            .transpose(1, 2)?
            .reshape((filters, e, 1, k))?;
        let got = conv2d(&image, &weight, conv.bias(), 0, 1)?.reshape((b, filters, n))?;
        assert!(max_abs_difference(&got, &want)? < 1e-12);
        Ok(())
    }

    #[test]
    fn lstm_ignores_padding() -> Result<()> {
        // A sentence alone and the same sentence padded in a batch give the same final states.
        let data = synthetic(json!({"train": 40, "validation": 8, "test": 8}))?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let model = BiLstmFactory.build(&json!({"embedding": 8, "hidden": 6, "mlp": 10}), ctx)?;
        let all = data.batch(Split::Train, &(0..8).collect::<Vec<_>>(), &Device::Cpu)?;
        let lengths = all.inputs[WORDS_MASK].sum(1)?.to_vec1::<f32>()?;
        let shortest = (0..8)
            .min_by(|&a, &b| lengths[a].total_cmp(&lengths[b]))
            .unwrap_or(0);
        let alone = data.batch(Split::Train, &[shortest], &Device::Cpu)?;
        let a = model.forward(&all.inputs, false)?.features["pooled"].get(shortest)?;
        let b = model.forward(&alone.inputs, false)?.features["pooled"].get(0)?;
        assert!(max_abs_difference(&a, &b)? < 1e-5);
        Ok(())
    }

    /// The reference file of `tests/fixtures/minilm_reference.py`.
    fn reference() -> Result<Value> {
        let path = distill_rt::testing::manifest_dir(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/minilm_reference.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::data(&path, e.to_string()))?;
        distill_rt::serde_json::from_str(&text).map_err(|e| Error::data(&path, e.to_string()))
    }

    fn minilm_data() -> Result<Box<dyn Dataset>> {
        distill_host::install_data_resolver();
        synthetic(json!({"train": 16, "validation": 8, "test": 8, "wordpiece": MINILM}))
    }

    #[test]
    fn wordpiece_ids_equal_the_reference_tokenizer() -> Result<()> {
        distill_host::install_data_resolver();
        let dir = resolve_model_dir("test", "wordpiece", MINILM, "tokenizer.json")?;
        let wp = crate::vocab::WordPiece::load(&dir)?;
        let r = reference()?;
        let cases = r["wordpiece"].as_array().cloned().unwrap_or_default();
        assert_eq!(cases.len(), 5);
        for case in cases {
            let text = case["text"].as_str().unwrap_or_default();
            let want: Vec<u32> = distill_rt::serde_json::from_value(case["ids"].clone())
                .map_err(|e| Error::Invalid(e.to_string()))?;
            assert_eq!(wp.encode(text, 512)?, want, "{text}");
        }
        Ok(())
    }

    /// A pretrained encoder that was fine-tuned, rebuilt as a frozen teacher on its trained
    /// weights (as the engine loads one), computes what the trained model computes: building it
    /// copies no pretrained weight over the trained ones, and its forward records no graph.
    #[test]
    fn a_frozen_pretrained_teacher_keeps_its_trained_weights() -> Result<()> {
        let data = minilm_data()?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let config = json!({"pretrained": MINILM});
        let trained = BertFactory.build(&config, ctx)?;
        // "Fine-tuning": every weight moves away from the pretrained value.
        let mut weights = std::collections::HashMap::new();
        for (name, var) in named_vars(&varmap) {
            var.set(&(var.as_tensor() * 0.9)?)?;
            weights.insert(name, var.as_tensor().copy()?);
        }
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: distill_rt::init::frozen_var_builder(weights, DType::F32, &Device::Cpu),
        };
        let frozen = BertFactory.build(&config, ctx)?;
        let batch = data.batch(Split::Train, &[0, 1, 2], &Device::Cpu)?;
        let (a, b) = (
            trained.forward(&batch.inputs, false)?.logits,
            frozen.forward(&batch.inputs, false)?.logits,
        );
        assert!(a.track_op() && !b.track_op());
        assert!(max_abs_difference(&a, &b)? < 1e-6);
        Ok(())
    }

    #[test]
    fn minilm_embeddings_equal_the_reference() -> Result<()> {
        let data = minilm_data()?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let model = BertFactory.build(&json!({"pretrained": MINILM}), ctx)?;
        let r = reference()?;
        let cases = r["embeddings"].as_array().cloned().unwrap_or_default();
        assert_eq!(cases.len(), 3);
        for case in cases {
            let ids: Vec<u32> = distill_rt::serde_json::from_value(case["ids"].clone())
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let want: Vec<f32> = distill_rt::serde_json::from_value(case["embedding"].clone())
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let n = ids.len();
            let inputs = TensorMap::from([
                (
                    PIECES.to_string(),
                    Tensor::from_vec(ids, (1, n), &Device::Cpu)?,
                ),
                (
                    format!("{PIECES}_mask"),
                    Tensor::ones((1, n), DType::F32, &Device::Cpu)?,
                ),
            ]);
            let got = model.forward(&inputs, false)?.features[PENULTIMATE].get(0)?;
            let want = Tensor::new(want, &Device::Cpu)?;
            let diff = max_abs_difference(&got, &want)?;
            assert!(diff < 1e-4, "{}: max difference {diff}", case["text"]);
        }
        Ok(())
    }

    /// Fine-tunes MiniLM one SGD step with `finetune` and returns which encoder layers (and
    /// whether the embeddings) changed.
    fn finetune_step(finetune: Value) -> Result<(Vec<bool>, bool)> {
        let data = minilm_data()?;
        let (varmap, model) = check_model(
            &BertFactory,
            json!({"pretrained": MINILM, "finetune": finetune}),
            data.as_ref(),
            &["hidden.6", "attention.6"],
        )?;
        let (trainable, _) = split_frozen(named_vars(&varmap), &model.frozen_prefixes());
        let snapshot = |name: &str| -> Result<Tensor> {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Invalid("lock".into()))?;
            Ok(data[name].as_tensor().copy()?)
        };
        let watched: Vec<String> = (0..6)
            .map(|i| format!("encoder.layer.{i}.attention.self.query.weight"))
            .chain(["embeddings.word_embeddings.weight".to_string()])
            .collect();
        let before: Vec<Tensor> = watched.iter().map(|n| snapshot(n)).collect::<Result<_>>()?;
        let vars: Vec<Var> = trainable.into_iter().map(|(_, v)| v).collect();
        let mut sgd = SGD::new(vars, 0.1)?;
        let b = batch(data.as_ref())?;
        let loss = ops::cross_entropy(&model.forward(&b.inputs, true)?.logits, &b.targets)?;
        sgd.backward_step(&loss)?;
        let changed: Vec<bool> = watched
            .iter()
            .zip(&before)
            .map(|(n, old)| Ok(max_abs_difference(&snapshot(n)?, old)? > 0.0))
            .collect::<Result<_>>()?;
        Ok((changed[..6].to_vec(), changed[6]))
    }

    #[test]
    fn finetuning_all_layers_changes_every_layer() -> Result<()> {
        assert_eq!(finetune_step(json!("all"))?, (vec![true; 6], true));
        Ok(())
    }

    #[test]
    fn finetuning_the_head_only_changes_no_layer() -> Result<()> {
        assert_eq!(finetune_step(json!("head"))?, (vec![false; 6], false));
        Ok(())
    }

    #[test]
    fn finetuning_the_top_two_layers_changes_those_only() -> Result<()> {
        let want = vec![false, false, false, false, true, true];
        assert_eq!(finetune_step(json!(2))?, (want, false));
        Ok(())
    }
}
