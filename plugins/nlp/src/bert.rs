//! A BERT encoder of ours, with the variable names of Hugging Face's `BertModel`
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...) so
//! that it reads a pretrained `model.safetensors` as it is, and with a layer norm and a softmax
//! that have a backward pass (candle-transformers' BERT has neither, so fine-tuning it trains
//! only the head: DESIGN.md, "candle traps"). One module serves the pretrained
//! all-MiniLM-L6-v2 teacher, a BERT trained here and the small-transformer student.

use std::path::Path;

use distill_rt::candle::{Device, Tensor};
use distill_rt::candle_nn::{Init, VarBuilder};
use distill_rt::nn::{Embedding, LayerNorm, Linear};
use distill_rt::serde::Deserialize;
use distill_rt::{Error, Result, kernels};

/// The shape of a BERT encoder, as Hugging Face's `config.json` spells it.
#[derive(Clone, Debug, Deserialize)]
#[serde(crate = "distill_rt::serde")]
pub struct BertDims {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest input.
    pub max_position_embeddings: usize,
    /// Number of segment ids.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// Epsilon of every layer norm.
    #[serde(default = "bert_eps")]
    pub layer_norm_eps: f64,
}

fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}

impl BertDims {
    /// Reads `config.json` from `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::data(&path, format!("cannot read: {e}")))?;
        distill_rt::serde_json::from_str(&text)
            .map_err(|e| Error::data(&path, format!("not a BERT config: {e}")))
    }
}

/// BERT's initialisation: weights from N(0, 0.02), biases 0 (layer norms 1 and 0).
const BERT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

fn bert_linear(input: usize, output: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::with_init(input, output, BERT_INIT, Init::Const(0.0), vb)
}

fn bert_embedding(count: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    Embedding::with_init(count, dim, BERT_INIT, vb)
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// What the encoder computes for a batch.
pub struct Encoded {
    /// The embeddings' output, then each layer's, `[batch, length, hidden]`.
    pub hidden: Vec<Tensor>,
    /// Each layer's attention probabilities, `[batch, heads, length, length]`.
    pub attention: Vec<Tensor>,
}

/// The encoder: embeddings (word, position, segment 0) and a stack of post-norm layers.
pub struct Encoder {
    words: Embedding,
    positions: Embedding,
    segments: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    dims: BertDims,
}

impl Encoder {
    /// An encoder of shape `dims` under `vb` (BERT's initialisation for new variables).
    pub fn new(dims: &BertDims, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (dims.hidden_size, dims.layer_norm_eps);
        if dims.num_attention_heads == 0 || !h.is_multiple_of(dims.num_attention_heads) {
            return Err(Error::Invalid(format!(
                "hidden size {h} is not a multiple of {} attention heads",
                dims.num_attention_heads
            )));
        }
        let e = vb.pp("embeddings");
        let words = bert_embedding(dims.vocab_size, h, e.pp("word_embeddings"))?;
        let positions =
            bert_embedding(dims.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let segments = bert_embedding(dims.type_vocab_size, h, e.pp("token_type_embeddings"))?;
        let norm = LayerNorm::new(h, eps, e.pp("LayerNorm"))?;
        let layers = (0..dims.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                Ok(Layer {
                    query: bert_linear(h, h, a.pp("self.query"))?,
                    key: bert_linear(h, h, a.pp("self.key"))?,
                    value: bert_linear(h, h, a.pp("self.value"))?,
                    attention_out: bert_linear(h, h, a.pp("output.dense"))?,
                    attention_norm: LayerNorm::new(h, eps, a.pp("output.LayerNorm"))?,
                    intermediate: bert_linear(
                        h,
                        dims.intermediate_size,
                        l.pp("intermediate.dense"),
                    )?,
                    output: bert_linear(dims.intermediate_size, h, l.pp("output.dense"))?,
                    output_norm: LayerNorm::new(h, eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            words,
            positions,
            segments,
            norm,
            layers,
            dims: dims.clone(),
        })
    }

    /// Encodes `ids` (`u32 [batch, length]`) under `mask` (`f32`, 1 on tokens). The first
    /// `frozen` blocks (block 0 the embeddings, block `i` layer `i - 1`) run detached: no
    /// gradient reaches them and their backward pass is not computed.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, frozen: usize) -> Result<Encoded> {
        let (_, len) = ids.dims2()?;
        if len > self.dims.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "a sentence of {len} tokens is longer than the encoder's {} positions",
                self.dims.max_position_embeddings
            )));
        }
        let device = ids.device();
        let positions = self
            .positions
            .forward(&Tensor::arange(0u32, len as u32, device)?)?;
        let segment =
            self.segments
                .forward(&Tensor::zeros(1, distill_rt::candle::DType::U32, device)?)?;
        // Position and segment vectors added with `channel_add`, whose backward sums over the
        // batch with a product (candle's broadcast backward walks every element on one thread).
        let (b, h) = (ids.dim(0)?, self.dims.hidden_size);
        let words = self.words.forward(ids)?.reshape((b, len * h))?;
        let x = kernels::channel_add(&words, &positions.flatten_all()?, 1)?;
        let x = kernels::channel_add(&x.reshape((b * len, h))?, &segment.flatten_all()?, 1)?
            .reshape((b, len, h))?;
        let mut x = self.norm.forward(&x)?;
        if frozen > 0 {
            x = x.detach();
        }
        // 0 on tokens, a large negative number on padding: [batch, length].
        let bias = ((mask.to_dtype(x.dtype())? - 1.0)? * 1e4)?;
        let mut hidden = vec![x.clone()];
        let mut attention = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, probs) = self.layer(layer, &x, &bias)?;
            x = if i + 2 <= frozen { y.detach() } else { y };
            hidden.push(x.clone());
            attention.push(probs);
        }
        Ok(Encoded { hidden, attention })
    }

    fn layer(&self, l: &Layer, x: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
        // The heads stay side by side in `[batch, length, hidden]` (`kernels::attention`).
        let (context, probs) = kernels::attention(
            &l.query.forward(x)?,
            &l.key.forward(x)?,
            &l.value.forward(x)?,
            bias,
            self.dims.num_attention_heads,
        )?;
        let a = l
            .attention_norm
            .forward(&(l.attention_out.forward(&context)? + x)?)?;
        let f = l
            .output
            .forward(&kernels::gelu_erf(&l.intermediate.forward(&a)?)?)?;
        Ok((l.output_norm.forward(&(f + &a)?)?, probs))
    }

    /// Multiply-accumulates per sentence of `len` tokens.
    pub fn macs(&self, len: usize) -> u64 {
        let (h, f) = (
            self.dims.hidden_size as u64,
            self.dims.intermediate_size as u64,
        );
        let len = len as u64;
        let per_layer = len * (4 * h * h + 2 * h * f) + 2 * len * len * h;
        self.layers.len() as u64 * per_layer
    }

    /// Variable-name prefixes of the first `frozen` blocks (see [`Encoder::forward`]).
    pub fn prefixes(&self, frozen: usize) -> Vec<String> {
        (0..frozen)
            .map(|b| match b {
                0 => "embeddings.".to_string(),
                i => format!("encoder.layer.{}.", i - 1),
            })
            .collect()
    }
}

/// Mean of `hidden` (`[batch, length, width]`) over the tokens of `mask`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// Copies every tensor of `model.safetensors` in `dir` that the encoder under `vb` uses into
/// its variable, in place. Returns how many were copied; every encoder variable must be. A
/// model built from trained weights (`init::frozen_var_builder`: constants, not variables)
/// keeps them: nothing is copied over a constant.
pub fn load_pretrained(dir: &Path, vb: &VarBuilder, expected: usize) -> Result<usize> {
    let path = dir.join("model.safetensors");
    // One tensor at a time: the model's variables and one file tensor are all that is held.
    let mut copied = 0;
    distill_rt::weights::each_tensor(&path, &Device::Cpu, |name, w| {
        if !vb.contains_tensor(&name) {
            return Ok(());
        }
        let var = vb
            .get(w.shape(), &name)
            .map_err(|e| Error::data(&path, format!("`{name}` does not fit the encoder: {e}")))?;
        if var.is_variable() {
            var.slice_set(&w.to_dtype(var.dtype())?.to_device(var.device())?, 0, 0)?;
        }
        copied += 1;
        Ok(())
    })?;
    if copied != expected {
        return Err(Error::data(
            &path,
            format!("{copied} of the encoder's {expected} variables found in the file"),
        ));
    }
    Ok(copied)
}

/// Number of variables of an encoder with `layers` layers.
pub fn variable_count(layers: usize) -> usize {
    5 + 16 * layers
}
