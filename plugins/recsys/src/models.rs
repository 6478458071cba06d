//! Recommender models (He et al. 2017, "Neural Collaborative Filtering"): `recsys.mf`,
//! `recsys.gmf`, `recsys.mlp` and `recsys.neumf`. Each scores every item for each user of the
//! batch (logits `[batch, items]`).
//!
//! - MF: `s = p_u . q_i + b_i`;
//! - GMF: `s = h^T (p_u * q_i) + b`;
//! - MLP: `s = h^T relu(W_L ... relu(W_1 [p_u; q_i] + b_1) ...)`; the first layer is applied as
//!   `W_1 [p; q] = W_1u p + W_1i q`, once per user and once per item, then broadcast to pairs
//!   (the same numbers as on the concatenation, without building it);
//! - NeuMF: GMF and MLP with their own embeddings, `s = h^T [p_u * q_i; mlp(u, i)]`.
//!
//! Embeddings start from N(0, `init_std`), 0.01 as in NCF (a dot-product student starts faster
//! from 0.1), linear layers from PyTorch's default. Features:
//! `user_embedding` (`[batch, dim]`), `item_embedding` (`[batch, items, dim]`, a broadcast view
//! of the table), and `penultimate`, the layer the score reads (`[batch, items, width]`).

use std::collections::BTreeMap;

use distill_rt::candle::{D, Tensor};
use distill_rt::candle_nn::{Init, VarBuilder};
use distill_rt::kernels::{linear, pairwise_add, pairwise_mul, relu};
use distill_rt::model::PENULTIMATE;
use distill_rt::nn::{Embedding, Linear, fan_in_init};
use distill_rt::serde::Deserialize;
use distill_rt::{
    Config, DatasetInfo, Error, Model, ModelContext, ModelFactory, ModelOutput, Result, TaskKind,
    TensorMap, config,
};

/// User and item tables of one tower.
struct Tables {
    user: Embedding,
    item: Embedding,
}

impl Tables {
    fn new(users: usize, items: usize, dim: usize, init: Init, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            user: Embedding::with_init(users, dim, init, vb.pp("user"))?,
            item: Embedding::with_init(items, dim, init, vb.pp("item"))?,
        })
    }

    /// The batch's user vectors `[b, d]` and every item's vector `[items, d]`.
    fn lookup(&self, users: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.user.forward(users)?, self.item.weight().clone()))
    }
}

/// The MLP tower: first layer split into its user and item halves.
struct Tower {
    tables: Tables,
    first_weight: Tensor,
    first_bias: Tensor,
    rest: Vec<Linear>,
    dim: usize,
    widths: Vec<usize>,
}

impl Tower {
    fn new(
        users: usize,
        items: usize,
        dim: usize,
        widths: &[usize],
        embedding_init: Init,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let tables = Tables::new(users, items, dim, embedding_init, &vb.pp("embedding"))?;
        let init = fan_in_init(2 * dim);
        let layers = vb.pp("layers");
        let first = layers.pp("0");
        let first_weight = first.get_with_hints((widths[0], 2 * dim), "weight", init)?;
        let first_bias = first.get_with_hints(widths[0], "bias", init)?;
        let rest = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(w[0], w[1], layers.pp((i + 1).to_string())))
            .collect::<Result<_>>()?;
        Ok(Self {
            tables,
            first_weight,
            first_bias,
            rest,
            dim,
            widths: widths.to_vec(),
        })
    }

    /// `[b, items, last width]` for the batch's users.
    fn forward(&self, users: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (p, q) = self.tables.lookup(users)?;
        let w_user = self.first_weight.narrow(1, 0, self.dim)?;
        let w_item = self.first_weight.narrow(1, self.dim, self.dim)?;
        let from_user = p.matmul(&w_user.t()?)?;
        let from_item = linear(&q, &w_item, &self.first_bias)?;
        let mut h = relu(&pairwise_add(&from_user, &from_item)?)?;
        for layer in &self.rest {
            h = relu(&layer.forward(&h)?)?;
        }
        Ok((h, p, q))
    }

    fn last(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }

    /// Multiply-accumulates for one user against `items` items.
    fn macs(&self, items: u64) -> u64 {
        let first = (self.widths[0] * self.dim) as u64;
        let rest: u64 = self.rest.iter().map(|l| l.macs()).sum();
        first * (1 + items) + rest * items
    }
}

/// Which parts a model has.
enum Kind {
    /// Dot product plus an item bias.
    Mf {
        tables: Tables,
        item_bias: Embedding,
    },
    /// Weighted element-wise product.
    Gmf { tables: Tables },
    /// MLP tower only.
    Mlp { tower: Tower },
    /// GMF and MLP side by side.
    NeuMf { tables: Tables, tower: Tower },
}

/// A recommender scoring every item (module docs).
pub struct Recommender {
    kind: Kind,
    /// The output layer (absent for MF).
    out: Option<Linear>,
    items: usize,
    dim: usize,
}

impl Recommender {
    fn users(inputs: &TensorMap) -> Result<&Tensor> {
        inputs.get("user").ok_or_else(|| {
            Error::Invalid(format!(
                "recommender models read the input `user`; the batch has {:?}",
                inputs.keys().collect::<Vec<_>>()
            ))
        })
    }
}

impl Model for Recommender {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let users = Self::users(inputs)?;
        let b = users.dim(0)?;
        let (scores, penultimate, p, q) = match &self.kind {
            Kind::Mf { tables, item_bias } => {
                let (p, q) = tables.lookup(users)?;
                let scores = linear(&p, &q, item_bias.weight())?;
                (Some(scores), pairwise_mul(&p, &q)?, p, q)
            }
            Kind::Gmf { tables } => {
                let (p, q) = tables.lookup(users)?;
                (None, pairwise_mul(&p, &q)?, p, q)
            }
            Kind::Mlp { tower } => {
                let (h, p, q) = tower.forward(users)?;
                (None, h, p, q)
            }
            Kind::NeuMf { tables, tower } => {
                let (p, q) = tables.lookup(users)?;
                let (h, _, _) = tower.forward(users)?;
                let joint = Tensor::cat(&[&pairwise_mul(&p, &q)?, &h], D::Minus1)?;
                (None, joint, p, q)
            }
        };
        let logits = match (scores, &self.out) {
            (Some(scores), _) => scores,
            (None, Some(out)) => out.forward(&penultimate)?.squeeze(D::Minus1)?,
            (None, None) => return Err(Error::Invalid("a recommender without a score".into())),
        };
        let item_embedding = q.unsqueeze(0)?.broadcast_as((b, self.items, q.dim(1)?))?;
        let features = BTreeMap::from([
            ("user_embedding".to_string(), p),
            ("item_embedding".to_string(), item_embedding),
            (PENULTIMATE.to_string(), penultimate),
        ]);
        Ok(ModelOutput { logits, features })
    }

    fn flops_per_sample(&self) -> u64 {
        let items = self.items as u64;
        let d = self.dim as u64;
        let out = self.out.as_ref().map_or(0, |l| l.macs() * items);
        out + match &self.kind {
            Kind::Mf { .. } | Kind::Gmf { .. } => d * items,
            Kind::Mlp { tower } => tower.macs(items),
            Kind::NeuMf { tower, .. } => d * items + tower.macs(items),
        }
    }
}

#[derive(Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct RecConfig {
    /// Embedding width (of the GMF part for NeuMF).
    dim: Option<usize>,
    /// Embedding width of the MLP tower (NeuMF; defaults to `dim`).
    mlp_dim: Option<usize>,
    /// Hidden widths of the MLP tower.
    layers: Option<Vec<usize>>,
    /// Standard deviation of the embeddings' normal initialisation.
    init_std: Option<f64>,
}

/// Which model a factory builds.
#[derive(Clone, Copy)]
enum Which {
    Mf,
    Gmf,
    Mlp,
    NeuMf,
}

/// `recsys.mf`, `recsys.gmf`, `recsys.mlp` and `recsys.neumf`.
pub struct RecFactory {
    which: Which,
    summary: &'static str,
    owner: &'static str,
    /// Default `dim`, `layers` and `init_std`.
    defaults: (usize, &'static [usize], f64),
}

/// `recsys.mf`.
pub const MF: RecFactory = RecFactory {
    which: Which::Mf,
    summary: "matrix factorisation, s = p_u . q_i + b_i; `dim` (8), `init_std` (0.01)",
    owner: "model recsys.mf",
    defaults: (8, &[], 0.01),
};
/// `recsys.gmf`.
pub const GMF: RecFactory = RecFactory {
    which: Which::Gmf,
    summary: "generalised MF (NCF), s = h^T (p_u * q_i) + b; `dim` (8), `init_std` (0.01)",
    owner: "model recsys.gmf",
    defaults: (8, &[], 0.01),
};
/// `recsys.mlp`.
pub const MLP: RecFactory = RecFactory {
    which: Which::Mlp,
    summary: "NCF's MLP on [p_u; q_i]; `dim` (32), `layers` ([64, 32, 16]), `init_std` (0.01)",
    owner: "model recsys.mlp",
    defaults: (32, &[64, 32, 16], 0.01),
};
/// `recsys.neumf`.
pub const NEUMF: RecFactory = RecFactory {
    which: Which::NeuMf,
    summary: "NeuMF (NCF): GMF and MLP towers with their own embeddings, joined by one output layer; `dim` (64), `mlp_dim` (= dim), `layers` ([128, 64, 32]), `init_std` (0.01)",
    owner: "model recsys.neumf",
    defaults: (64, &[128, 64, 32], 0.01),
};

fn ranking_sizes(owner: &str, info: &DatasetInfo) -> Result<(usize, usize)> {
    let users = info.cardinality.get("user").copied();
    match (info.task, users) {
        (TaskKind::Ranking, Some(users)) => Ok((users, info.num_classes)),
        _ => Err(Error::Invalid(format!(
            "{owner} needs a ranking dataset with a `user` id input (a recsys.* dataset)"
        ))),
    }
}

impl ModelFactory for RecFactory {
    fn summary(&self) -> &str {
        self.summary
    }
    fn defaults(&self) -> Config {
        let (dim, layers, init_std) = self.defaults;
        let mut table = distill_rt::serde_json::json!({"dim": dim, "init_std": init_std});
        if matches!(self.which, Which::Mlp | Which::NeuMf) {
            table["layers"] = distill_rt::serde_json::json!(layers);
        }
        if matches!(self.which, Which::NeuMf) {
            table["mlp_dim"] = distill_rt::serde_json::json!(dim);
        }
        table
    }

    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        let owner = self.owner;
        let c: RecConfig = config::parse(owner, cfg)?;
        let dim = c.dim.unwrap_or(self.defaults.0);
        let mlp_dim = c.mlp_dim.unwrap_or(dim);
        let layers = c.layers.clone().unwrap_or_else(|| self.defaults.1.to_vec());
        config::require_positive(owner, &[("dim", dim), ("mlp_dim", mlp_dim)])?;
        match self.which {
            Which::Mlp | Which::NeuMf if layers.is_empty() || layers.contains(&0) => {
                return Err(Error::config(
                    owner,
                    "layers",
                    "needs one or more widths > 0",
                ));
            }
            Which::Mf | Which::Gmf if c.layers.is_some() || c.mlp_dim.is_some() => {
                let key = if c.layers.is_some() {
                    "layers"
                } else {
                    "mlp_dim"
                };
                return Err(Error::config(
                    owner,
                    key,
                    "only recsys.mlp and recsys.neumf have an MLP tower",
                ));
            }
            _ => {}
        }
        let init_std = c.init_std.unwrap_or(self.defaults.2);
        config::require_scales(owner, &[("init_std", init_std)])?;
        let init = Init::Randn {
            mean: 0.0,
            stdev: init_std,
        };
        let (users, items) = ranking_sizes(owner, ctx.dataset)?;
        let vb = ctx.vb;
        let (kind, head_in) = match self.which {
            Which::Mf => (
                Kind::Mf {
                    tables: Tables::new(users, items, dim, init, &vb)?,
                    item_bias: Embedding::with_init(
                        items,
                        1,
                        Init::Const(0.0),
                        vb.pp("item_bias"),
                    )?,
                },
                None,
            ),
            Which::Gmf => (
                Kind::Gmf {
                    tables: Tables::new(users, items, dim, init, &vb)?,
                },
                Some(dim),
            ),
            Which::Mlp => {
                let tower = Tower::new(users, items, dim, &layers, init, &vb.pp("mlp"))?;
                let last = tower.last();
                (Kind::Mlp { tower }, Some(last))
            }
            Which::NeuMf => {
                let tables = Tables::new(users, items, dim, init, &vb.pp("gmf"))?;
                let tower = Tower::new(users, items, mlp_dim, &layers, init, &vb.pp("mlp"))?;
                let width = dim + tower.last();
                (Kind::NeuMf { tables, tower }, Some(width))
            }
        };
        let out = head_in
            .map(|w| Linear::new(w, 1, vb.pp("out")))
            .transpose()?;
        Ok(Box::new(Recommender {
            kind,
            out,
            items,
            dim,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SyntheticFactory;
    use distill_rt::candle::{DType, Device};
    use distill_rt::candle_nn::VarMap;
    use distill_rt::init::seeded_var_builder;
    use distill_rt::serde_json::json;
    use distill_rt::testing::{check_gradient_coverage, max_abs_difference, named_vars};
    use distill_rt::{Dataset, DatasetFactory, ops};

    fn dataset() -> Result<Box<dyn Dataset>> {
        SyntheticFactory.build(&json!({
            "users": 20, "items": 30, "per_user": 6, "eval_negatives": 10
        }))
    }

    fn build(factory: &RecFactory, cfg: Config, varmap: &VarMap) -> Result<Box<dyn Model>> {
        let data = dataset()?;
        factory.build(
            &cfg,
            ModelContext {
                dataset: data.info(),
                seed: 0,
                vb: seeded_var_builder(varmap, 0, DType::F32, &Device::Cpu),
            },
        )
    }

    #[test]
    fn every_model_scores_every_item_and_passes_gradient_coverage() -> Result<()> {
        let data = dataset()?;
        let users: Vec<usize> = (0..8).collect();
        let items = data.info().num_classes;
        let batch = data.train_batch(0, 0, &users, &Device::Cpu)?;
        for (factory, cfg, width) in [
            (&MF, json!({ "dim": 4 }), 4),
            (&GMF, json!({ "dim": 4 }), 4),
            (&MLP, json!({ "dim": 4, "layers": [8, 6] }), 6),
            (
                &NEUMF,
                json!({ "dim": 4, "mlp_dim": 3, "layers": [8, 5] }),
                9,
            ),
        ] {
            let varmap = VarMap::new();
            let model = build(factory, cfg, &varmap)?;
            let out = model.forward(&batch.inputs, true)?;
            assert_eq!(out.logits.dims(), &[8, items], "{}", factory.owner);
            assert_eq!(out.features[PENULTIMATE].dims(), &[8, items, width]);
            assert_eq!(out.features["user_embedding"].dim(0)?, 8);
            assert_eq!(out.features["item_embedding"].dims()[..2], [8, items]);
            // Embeddings start near 0, so every score starts near 0: the loss near ln 2.
            let loss = ops::label_loss(&out.logits, &batch)?;
            let l = loss.to_scalar::<f32>()?;
            assert!(
                (l - 2f32.ln()).abs() < 0.05,
                "{}: initial loss {l}",
                factory.owner
            );
            check_gradient_coverage(&named_vars(&varmap), &[], &loss.backward()?)
                .map_err(|e| Error::Invalid(format!("{}: {e}", factory.owner)))?;
            assert!(model.flops_per_sample() > 0);
        }
        Ok(())
    }

    #[test]
    fn split_first_layer_equals_the_layer_on_the_concatenation() -> Result<()> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu);
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let tower = Tower::new(20, 30, 4, &[7], init, &vb)?;
        let users = Tensor::new(&[0u32, 5, 19], &Device::Cpu)?;
        let (h, p, q) = tower.forward(&users)?;
        let pairs = Tensor::cat(
            &[
                &p.unsqueeze(1)?.broadcast_as((3, 30, 4))?,
                &q.unsqueeze(0)?.broadcast_as((3, 30, 4))?,
            ],
            D::Minus1,
        )?;
        let direct = pairs
            .reshape((90, 8))?
            .matmul(&tower.first_weight.t()?)?
            .broadcast_add(&tower.first_bias)?
            .relu()?
            .reshape((3, 30, 7))?;
        assert!(max_abs_difference(&h, &direct)? < 1e-6);
        Ok(())
    }

    #[test]
    fn options_of_another_model_are_named() {
        let varmap = VarMap::new();
        let err = |factory, cfg| match build(factory, cfg, &varmap) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(err(&MF, json!({ "layers": [4] })).contains("layers"));
        assert!(err(&NEUMF, json!({ "layers": [] })).contains("layers"));
        assert!(err(&GMF, json!({ "dims": 4 })).contains("dims"));
    }
}
