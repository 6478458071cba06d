//! Recommender datasets (`recsys.movielens`, `recsys.synthetic`): one sample per user, every item
//! a candidate.
//!
//! A sample's only input is `user` (`u32`); a model scores all items, so logits are
//! `[batch, items]` and the targets are relevance of the same shape (`distill_rt::data`):
//! - train: the user's training positives are 1; each epoch, `negatives` items per positive that
//!   are not training positives are drawn from the run's seed and the epoch
//!   ([`Dataset::train_batch`]) and are 0; every other item is unlabelled. The loss on these
//!   labels is NCF's pointwise log loss over each positive and its sampled negatives.
//! - validation / test: the held-out item is 1, `eval_negatives` items that are none of the
//!   user's positives (drawn once from the dataset's `seed`) are 0; with `full_ranking`, every
//!   item that is not a known positive is 0 instead.
//!
//! Inputs do not change between epochs, so a teacher's cached scores (all items, per user) stay
//! valid while the negatives are re-drawn.

use std::path::{Path, PathBuf};

use distill_rt::candle::{Device, Tensor};
use distill_rt::data::UNLABELLED;
use distill_rt::metrics::{MetricAccumulator, RankingMetrics};
use distill_rt::rng::Rng;
use distill_rt::serde::Deserialize;
use distill_rt::{
    Batch, Config, Dataset, DatasetFactory, DatasetInfo, Error, Result, Split, TaskKind, assets,
    config,
};

use crate::interactions::{Implicit, Interactions, leave_one_out, sample_excluding};
use crate::ratings::{Format, Rating, read_ratings};
use crate::synthetic;

/// Options every recommender dataset shares.
#[derive(Deserialize, distill_rt::serde::Serialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
pub struct Protocol {
    /// Training negatives drawn per positive, each epoch (NCF: 4).
    pub negatives: usize,
    /// Negatives each held-out positive is ranked against (NCF: 99).
    pub eval_negatives: usize,
    /// Rank the held-out item against every item that is not a known positive instead.
    pub full_ranking: bool,
    /// Cut-off of `hr@K` and `ndcg@K`.
    pub k: usize,
    /// The metric that ranks runs: `ndcg@K`, `hr@K` or `auc`.
    pub primary_metric: Option<String>,
    /// Seed of the evaluation negatives.
    pub seed: u64,
}

impl Default for Protocol {
    fn default() -> Self {
        Self {
            negatives: 4,
            eval_negatives: 99,
            full_ranking: false,
            k: 10,
            primary_metric: None,
            seed: 0,
        }
    }
}

/// Users' positives split by leave-one-out, with the evaluation protocol.
pub struct RecData {
    info: DatasetInfo,
    data: Interactions,
    /// Each user's training positives, sorted (for exclusion).
    train_sorted: Vec<Vec<u32>>,
    /// Each user's positives of every split, sorted.
    known_sorted: Vec<Vec<u32>>,
    /// Evaluation negatives of validation and test, per user (empty with `full_ranking`).
    eval_negatives: [Vec<Vec<u32>>; 2],
    protocol: Protocol,
}

impl RecData {
    /// The dataset over `data` under `protocol`; `owner` names it in errors.
    pub fn new(owner: &str, data: Interactions, protocol: Protocol) -> Result<Self> {
        config::require_positive(owner, &[("k", protocol.k)])?;
        if !protocol.full_ranking {
            config::require_positive(owner, &[("eval_negatives", protocol.eval_negatives)])?;
        }
        let primary = protocol
            .primary_metric
            .clone()
            .unwrap_or_else(|| format!("ndcg@{}", protocol.k));
        let known = [
            format!("ndcg@{}", protocol.k),
            format!("hr@{}", protocol.k),
            "auc".to_string(),
        ];
        if !known.contains(&primary) {
            return Err(Error::config(
                owner,
                "primary_metric",
                format!("`{primary}` is not one of {}", known.join(", ")),
            ));
        }
        let train_sorted: Vec<Vec<u32>> = data
            .train
            .iter()
            .map(|t| {
                let mut t = t.clone();
                t.sort_unstable();
                t
            })
            .collect();
        let known_sorted: Vec<Vec<u32>> = (0..data.users).map(|u| data.positives(u)).collect();
        let eval_negatives = if protocol.full_ranking {
            [Vec::new(), Vec::new()]
        } else {
            let draw = |purpose| {
                data.evaluation_negatives(protocol.eval_negatives, protocol.seed, purpose)
                    .map_err(|e| Error::config(owner, "eval_negatives", e.to_string()))
            };
            [draw("validation-negatives")?, draw("test-negatives")?]
        };
        let info = DatasetInfo {
            task: TaskKind::Ranking,
            num_classes: data.items,
            inputs: [("user".to_string(), Vec::new())].into(),
            cardinality: [("user".to_string(), data.users)].into(),
            split_sizes: [data.users; 3],
            primary_metric: primary,
        };
        Ok(Self {
            info,
            data,
            train_sorted,
            known_sorted,
            eval_negatives,
            protocol,
        })
    }

    fn check(&self, split: Split, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&u| u >= self.data.users) {
            Some(u) => Err(Error::Invalid(format!(
                "{} sample {u} out of range ({} users)",
                split.name(),
                self.data.users
            ))),
            None => Ok(()),
        }
    }

    /// Relevance rows for `indices`, built by `fill(user, row)` on rows that start unlabelled.
    fn rows(
        &self,
        indices: &[usize],
        device: &Device,
        fill: impl Fn(usize, &mut [f32]),
    ) -> Result<Tensor> {
        let items = self.data.items;
        let mut out = vec![UNLABELLED; indices.len() * items];
        for (row, &u) in out.chunks_mut(items).zip(indices) {
            fill(u, row);
        }
        Ok(Tensor::from_vec(out, (indices.len(), items), device)?)
    }
}

impl Dataset for RecData {
    fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Training targets here mark the positives only; [`Dataset::train_batch`] adds the
    /// epoch's negatives.
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        self.check(split, indices)?;
        let targets = match split {
            Split::Train => self.rows(indices, device, |u, row| {
                for &i in &self.data.train[u] {
                    row[i as usize] = 1.0;
                }
            })?,
            Split::Validation | Split::Test => {
                let (held_out, negatives) = match split {
                    Split::Validation => (&self.data.validation, &self.eval_negatives[0]),
                    _ => (&self.data.test, &self.eval_negatives[1]),
                };
                self.rows(indices, device, |u, row| {
                    if self.protocol.full_ranking {
                        row.fill(0.0);
                        for &i in &self.known_sorted[u] {
                            row[i as usize] = UNLABELLED;
                        }
                    } else {
                        for &i in &negatives[u] {
                            row[i as usize] = 0.0;
                        }
                    }
                    row[held_out[u] as usize] = 1.0;
                })?
            }
        };
        let users: Vec<u32> = indices.iter().map(|&u| u as u32).collect();
        Ok(Batch {
            inputs: [("user".to_string(), Tensor::new(users.as_slice(), device)?)].into(),
            targets,
            soft_targets: None,
            indices: Tensor::new(users.as_slice(), device)?,
        })
    }

    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
        Ok(Box::new(RankingMetrics::new(self.protocol.k)))
    }

    /// The positives and the negatives sampled for `epoch` of a run seeded `seed`; inputs are
    /// [`Dataset::batch`]'s (a teacher's cached scores stay valid).
    fn train_batch(
        &self,
        epoch: usize,
        seed: u64,
        indices: &[usize],
        device: &Device,
    ) -> Result<Batch> {
        let mut batch = self.batch(Split::Train, indices, device)?;
        batch.targets = self.rows(indices, device, |u, row| {
            let positives = &self.train_sorted[u];
            let mut rng = Rng::derive(seed, &format!("train-negatives/{epoch}/{u}"));
            let count = positives.len() * self.protocol.negatives;
            for i in sample_excluding(self.data.items, positives, count, &mut rng) {
                row[i as usize] = 0.0;
            }
            for &i in positives {
                row[i as usize] = 1.0;
            }
        })?;
        Ok(batch)
    }
}

// ---------------------------------------------------------------------------------------------

/// Keys of [`Protocol`], shared by every recommender dataset.
const PROTOCOL_KEYS: [&str; 6] = [
    "negatives",
    "eval_negatives",
    "full_ranking",
    "k",
    "primary_metric",
    "seed",
];

/// A dataset's defaults with those of the [`Protocol`] every recommender dataset shares.
fn with_protocol(mut own: Config) -> Config {
    if let (Some(map), Config::Object(shared)) =
        (own.as_object_mut(), config::defaults_of::<Protocol>())
    {
        map.extend(shared);
    }
    own
}

#[derive(Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct MovieLensOwn {
    /// A rating file of your own (instead of `data`).
    #[serde(default)]
    path: Option<PathBuf>,
    /// The data set's name, fetched and verified into the data cache.
    #[serde(default)]
    data: Option<String>,
    /// The file layout; by default from the file's name.
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    threshold: Option<f32>,
    #[serde(default)]
    min_item_positives: Option<usize>,
    #[serde(default)]
    min_user_positives: Option<usize>,
}

/// The MovieLens data `recsys.movielens` reads when given neither `path` nor `data`.
const DEFAULT_DATA: &str = "ml-latest-small";

/// The rating file of a MovieLens folder: `ratings.csv`, `ratings.dat` or `u.data`.
fn rating_file(owner: &str, dir: &Path) -> Result<PathBuf> {
    ["ratings.csv", "ratings.dat", "u.data"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::config(
                owner,
                "data",
                format!(
                    "{} holds no ratings.csv, ratings.dat or u.data",
                    dir.display()
                ),
            )
        })
}

/// `recsys.movielens`.
pub struct MovieLensFactory;

impl DatasetFactory for MovieLensFactory {
    fn summary(&self) -> &str {
        "MovieLens implicit feedback, NCF protocol: `data` (`ml-latest-small`, `ml-1m`; fetched into the data cache) or a `path` to ratings.csv / u.data / ratings.dat (`format` csv, tab, dat; by default from the file name); rating >= `threshold` (4) is a positive; items then users with fewer than `min_item_positives` (5) / `min_user_positives` (5) dropped; leave-one-out by time; `negatives` (4) per positive per epoch; `eval_negatives` (99) or `full_ranking`; `k` (10), `seed` (0)"
    }
    fn defaults(&self) -> Config {
        let rule = Implicit::default();
        with_protocol(distill_rt::serde_json::json!({
            "path": null,
            "data": DEFAULT_DATA,
            "format": null,
            "threshold": rule.threshold,
            "min_item_positives": rule.min_item_positives,
            "min_user_positives": rule.min_user_positives,
        }))
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset recsys.movielens";
        let (own, protocol): (MovieLensOwn, Protocol) =
            config::parse_split(OWNER, cfg, &PROTOCOL_KEYS)?;
        let d = Implicit::default();
        let rule = Implicit {
            threshold: own.threshold.unwrap_or(d.threshold),
            min_item_positives: own.min_item_positives.unwrap_or(d.min_item_positives),
            min_user_positives: own.min_user_positives.unwrap_or(d.min_user_positives),
        };
        let path = match own.path {
            Some(p) => p,
            None => {
                let name = own.data.as_deref().unwrap_or(DEFAULT_DATA);
                rating_file(OWNER, &assets::resolve(OWNER, "data", name)?)?
            }
        };
        let format = own.format.unwrap_or_else(|| Format::from_file_name(&path));
        let ratings = read_ratings(&path, format)?;
        let data = leave_one_out(&ratings, rule).map_err(|e| Error::data(&path, e.to_string()))?;
        Ok(Box::new(RecData::new(OWNER, data, protocol)?))
    }
}

#[derive(Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct SyntheticOwn {
    users: usize,
    items: usize,
    per_user: usize,
    factors: usize,
    popularity: f64,
    noise: f64,
    data_seed: u64,
}

impl Default for SyntheticOwn {
    fn default() -> Self {
        let d = synthetic::Spec::default();
        Self {
            users: d.users,
            items: d.items,
            per_user: d.per_user,
            factors: d.factors,
            popularity: d.popularity,
            noise: d.noise,
            data_seed: d.seed,
        }
    }
}

/// `recsys.synthetic`.
pub struct SyntheticFactory;

impl DatasetFactory for SyntheticFactory {
    fn summary(&self) -> &str {
        "synthetic implicit feedback: `users` (300) each pick `per_user` (30) of `items` (400) by latent `factors` (8) plus a Zipf `popularity` skew (1.0) and Gumbel `noise` (1.0), from `data_seed` (0); the NCF protocol keys of recsys.movielens"
    }
    fn defaults(&self) -> Config {
        with_protocol(config::defaults_of::<SyntheticOwn>())
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        const OWNER: &str = "dataset recsys.synthetic";
        let (own, protocol): (SyntheticOwn, Protocol) =
            config::parse_split(OWNER, cfg, &PROTOCOL_KEYS)?;
        config::require_positive(
            OWNER,
            &[
                ("users", own.users),
                ("items", own.items),
                ("factors", own.factors),
            ],
        )?;
        if own.per_user < 3 || own.per_user >= own.items {
            return Err(Error::config(
                OWNER,
                "per_user",
                format!("must be in [3, items), got {}", own.per_user),
            ));
        }
        let spec = synthetic::Spec {
            users: own.users,
            items: own.items,
            per_user: own.per_user,
            factors: own.factors,
            popularity: own.popularity,
            noise: own.noise,
            seed: own.data_seed,
        };
        let ratings: Vec<Rating> = synthetic::generate(&spec);
        let rule = Implicit {
            threshold: 1.0,
            min_item_positives: 1,
            min_user_positives: 3,
        };
        Ok(Box::new(RecData::new(
            OWNER,
            leave_one_out(&ratings, rule)?,
            protocol,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_engine::train::{FitInputs, Supervised, TrainConfig, evaluate, fit};
    use distill_rt::candle::DType;
    use distill_rt::candle_nn::VarMap;
    use distill_rt::init::seeded_var_builder;
    use distill_rt::metrics::RankingMetrics;
    use distill_rt::serde_json::json;
    use distill_rt::testing::named_vars;
    use distill_rt::{ModelContext, ModelFactory};

    const DEV: Device = Device::Cpu;

    fn movielens(extra: distill_rt::serde_json::Value) -> Result<Box<dyn Dataset>> {
        distill_host::install_data_resolver();
        let mut cfg = json!({});
        if let (Some(t), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            t.extend(e.clone());
        }
        MovieLensFactory.build(&cfg)
    }

    fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(t.to_vec2::<f32>()?)
    }

    fn marked(row: &[f32], value: f32) -> Vec<usize> {
        (0..row.len()).filter(|&i| row[i] == value).collect()
    }

    #[test]
    fn held_out_items_never_train_and_evaluation_rows_follow_the_ncf_protocol() -> Result<()> {
        let data = movielens(json!({}))?;
        let info = data.info().clone();
        assert_eq!((info.num_classes, info.len(Split::Train)), (1956, 601));
        let users: Vec<usize> = (0..info.len(Split::Train)).collect();
        let train = rows(&data.batch(Split::Train, &users, &DEV)?.targets)?;
        let epoch = rows(&data.train_batch(0, 7, &users, &DEV)?.targets)?;
        let validation = rows(&data.batch(Split::Validation, &users, &DEV)?.targets)?;
        let test = rows(&data.batch(Split::Test, &users, &DEV)?.targets)?;
        for u in users {
            let (v, t) = (marked(&validation[u], 1.0), marked(&test[u], 1.0));
            assert_eq!(
                (v.len(), t.len()),
                (1, 1),
                "user {u}: one held-out item each"
            );
            let positives = marked(&train[u], 1.0);
            assert_eq!(positives, marked(&epoch[u], 1.0));
            assert!(!positives.contains(&v[0]) && !positives.contains(&t[0]));
            // 4 negatives per positive (all other items when fewer remain), none a positive.
            let negatives = marked(&epoch[u], 0.0);
            let available = info.num_classes - positives.len();
            assert_eq!(negatives.len(), (4 * positives.len()).min(available));
            assert!(negatives.iter().all(|i| !positives.contains(i)));
            // 99 evaluation negatives, none a positive of any split.
            for (row, held) in [(&validation[u], v[0]), (&test[u], t[0])] {
                let n = marked(row, 0.0);
                assert_eq!(n.len(), 99);
                assert!(
                    n.iter()
                        .all(|i| !positives.contains(i) && *i != v[0] && *i != t[0])
                );
                assert_eq!(row[held], 1.0);
            }
        }
        Ok(())
    }

    #[test]
    fn negatives_are_fixed_by_their_seeds_and_differ_for_others() -> Result<()> {
        let users: Vec<usize> = (0..50).collect();
        let eval = |seed: u64| -> Result<Vec<Vec<f32>>> {
            let data = movielens(json!({ "seed": seed }))?;
            rows(&data.batch(Split::Test, &users, &DEV)?.targets)
        };
        assert_eq!(eval(3)?, eval(3)?);
        assert_ne!(eval(3)?, eval(4)?);
        let data = movielens(json!({}))?;
        let train = |epoch, seed| -> Result<Vec<Vec<f32>>> {
            rows(&data.train_batch(epoch, seed, &users, &DEV)?.targets)
        };
        assert_eq!(train(2, 1)?, train(2, 1)?);
        assert_ne!(train(2, 1)?, train(3, 1)?);
        assert_ne!(train(2, 1)?, train(2, 5)?);
        Ok(())
    }

    #[test]
    fn full_ranking_ranks_against_every_item_that_is_not_a_known_positive() -> Result<()> {
        let data = movielens(json!({ "full_ranking": true }))?;
        let train = rows(&data.batch(Split::Train, &[0], &DEV)?.targets)?;
        let test = rows(&data.batch(Split::Test, &[0], &DEV)?.targets)?;
        let validation = rows(&data.batch(Split::Validation, &[0], &DEV)?.targets)?;
        let known = marked(&train[0], 1.0).len() + 2;
        assert_eq!(marked(&test[0], 0.0).len(), 1956 - known);
        assert_eq!(marked(&test[0], UNLABELLED).len(), known - 1);
        assert_eq!(validation[0][marked(&test[0], 1.0)[0]], UNLABELLED);
        Ok(())
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let message = |cfg| match movielens(cfg) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(message(json!({ "negative": 4 })).contains("negative"));
        assert!(message(json!({ "k": 0 })).contains("`k`"));
        assert!(message(json!({ "primary_metric": "mrr" })).contains("primary_metric"));
        assert!(message(json!({ "format": "xml" })).contains("format"));
        assert!(message(json!({ "threshold": 6.0 })).contains("ratings.csv"));
    }

    /// Test-split metrics of a scorer that gives every user the same item scores.
    fn popularity_metrics(data: &dyn Dataset, scores: &[f32]) -> Result<Vec<(String, f64)>> {
        let n = data.info().len(Split::Test);
        let users: Vec<usize> = (0..n).collect();
        let batch = data.batch(Split::Test, &users, &DEV)?;
        let logits = Tensor::new(scores, &DEV)?
            .unsqueeze(0)?
            .broadcast_as((n, scores.len()))?
            .contiguous()?;
        let mut m = RankingMetrics::new(10);
        m.update(&logits, &batch)?;
        m.finish()
    }

    #[test]
    fn synthetic_set_is_learnable_beyond_popularity() -> Result<()> {
        let data = SyntheticFactory.build(&json!({}))?;
        let info = data.info().clone();
        // Popularity: each item's count of training positives.
        let users: Vec<usize> = (0..info.len(Split::Train)).collect();
        let train = data.batch(Split::Train, &users, &DEV)?.targets;
        let counts: Vec<f32> = train.clamp(0.0, 1.0)?.sum(0)?.to_vec1()?;
        let popularity = popularity_metrics(&*data, &counts)?;
        let varmap = VarMap::new();
        let model = crate::models::MF.build(
            &json!({ "dim": 16 }),
            ModelContext {
                dataset: &info,
                seed: 0,
                vb: seeded_var_builder(&varmap, 0, DType::F32, &DEV),
            },
        )?;
        let config: TrainConfig = distill_rt::serde_json::from_value(json!({
            "epochs": 20, "batch_size": 16,
            "optimizer": { "name": "adamw", "lr": 0.01 }
        }))
        .map_err(|e| Error::Invalid(e.to_string()))?;
        fit(
            FitInputs {
                dataset: &*data,
                model: &*model,
                strategy: &mut Supervised,
                teachers: Vec::new(),
                vars: named_vars(&varmap).into_iter().map(|(_, v)| v).collect(),
                teacher_metric: None,
                seed: 0,
                device: &DEV,
            },
            &config,
        )?;
        let trained = evaluate(&*data, &*model, Split::Test, 256, &DEV)?;
        let hr = |m: &[(String, f64)]| m[0].1;
        assert!(hr(&popularity) > 0.2, "popularity hr@10 {popularity:?}");
        assert!(
            hr(&trained) > hr(&popularity) + 0.15,
            "MF {trained:?} vs popularity {popularity:?}"
        );
        Ok(())
    }
}
