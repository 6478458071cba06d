//! The training loop shared by every task and strategy: seeded shuffling, one optimizer step per
//! batch, NaN/inf detection, evaluation after every epoch (or every `eval_every`), early stopping
//! by patience and by the student-teacher gap.

use std::time::Instant;

use distill_rt::candle::{DType, Device, Tensor, Var};
use distill_rt::rng::Rng;
use distill_rt::serde::{Deserialize, Serialize};
use distill_rt::strategy::{StepInfo, combine_teachers};
use distill_rt::{
    Batch, Dataset, Error, LossTerms, Model, ModelOutput, Result, Split, Strategy, TeacherNeeds,
    ops, tracing,
};

use crate::batching::{evaluation_order, training_batches};
use crate::cache::TeacherCache;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};

/// How to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Maximum number of epochs.
    pub epochs: usize,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Samples per evaluation batch.
    pub eval_batch_size: usize,
    /// Evaluate on the validation and test splits every this many epochs and after the last
    /// (1: every epoch); the other epochs record their training losses only.
    pub eval_every: usize,
    /// Optimizer and its hyper-parameters.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Stop after this many epochs without a better validation metric.
    pub patience: Option<usize>,
    /// Stop once the validation metric is within this distance of the teacher's.
    pub gap_tolerance: Option<f64>,
    /// Epochs of linear learning-rate warm-up before the schedule: the rate rises from
    /// `lr / steps` to `lr` over these epochs' steps.
    pub warmup_epochs: usize,
    /// Where a student's teacher outputs come from ([`TeacherOutputs`]); teachers ignore it.
    pub teacher_outputs: TeacherOutputs,
}

/// Where a student's teacher outputs come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", rename_all = "snake_case")]
pub enum TeacherOutputs {
    /// From the teacher's cache, unless the dataset augments its training batches or the
    /// strategy needs a live teacher: then the teacher runs on the student's batch, in
    /// evaluation mode (consistent teaching, Beyer et al. 2022).
    #[default]
    Auto,
    /// The teacher runs on every training batch.
    Live,
    /// The cache, even when the dataset augments: the teacher's outputs are then those of the
    /// unaugmented samples (job records say `cache (unaugmented)`).
    Cache,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 64,
            eval_batch_size: 256,
            eval_every: 1,
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
            patience: None,
            gap_tolerance: None,
            warmup_epochs: 0,
            teacher_outputs: TeacherOutputs::Auto,
        }
    }
}

impl TrainConfig {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
            ("eval_every", self.eval_every),
        ] {
            if v == 0 {
                return Err(Error::config("train", key, "must be > 0"));
            }
        }
        self.schedule.validate()?;
        if let Some(t) = self.gap_tolerance
            && (t.is_nan() || t < 0.0)
        {
            return Err(Error::config(
                "train",
                "gap_tolerance",
                format!("must be >= 0, got {t}"),
            ));
        }
        self.optimizer.validate()
    }
}

/// Metric values by name.
pub type Metrics = Vec<(String, f64)>;

/// What happened in one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde")]
pub struct EpochRecord {
    /// Zero-based epoch.
    pub epoch: usize,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Mean of each loss term (and `total`) over the epoch's batches.
    pub train: Metrics,
    /// Task metrics on the validation split.
    pub validation: Metrics,
    /// Task metrics on the test split.
    pub test: Metrics,
}

/// How a training run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", rename_all = "snake_case")]
pub enum StopReason {
    /// All epochs ran.
    Completed,
    /// No better validation metric for `patience` epochs.
    Patience,
    /// The student came within `gap_tolerance` of the teacher.
    GapReached,
    /// The loss became NaN or infinite at this optimizer step.
    Diverged {
        /// The optimizer step (zero-based) whose loss was not finite.
        step: u64,
    },
}

/// The result of [`fit`].
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Why training stopped.
    pub stop: StopReason,
    /// One record per finished epoch.
    pub epochs: Vec<EpochRecord>,
    /// The epoch with the best validation primary metric, if any epoch finished.
    pub best_epoch: Option<usize>,
}

/// Where one teacher's outputs come from.
pub enum TeacherSource<'a> {
    /// Outputs computed once on the training split.
    Cached(&'a TeacherCache),
    /// The teacher runs on every batch.
    Live(&'a dyn Model),
}

impl TeacherSource<'_> {
    /// What job records call it: `live`, `cache`, or `cache (unaugmented)` for a cache read
    /// while the training batches are augmented (its outputs describe other inputs).
    pub fn name(&self, augments: bool) -> &'static str {
        match self {
            TeacherSource::Cached(_) if augments => "cache (unaugmented)",
            TeacherSource::Cached(_) => "cache",
            TeacherSource::Live(_) => "live",
        }
    }

    /// The teacher's outputs for `batch`.
    pub fn outputs(&self, batch: &Batch) -> Result<ModelOutput> {
        match self {
            TeacherSource::Cached(cache) => cache.outputs_for(&batch.indices),
            TeacherSource::Live(t) => t.forward(&batch.inputs, false),
        }
    }
}

/// The task's label loss ([`ops::label_loss`]): how a teacher (or any model without a strategy)
/// trains.
pub struct Supervised;

impl Strategy for Supervised {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::default()
    }
    fn loss(
        &self,
        s: &ModelOutput,
        _t: Option<&ModelOutput>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let ce = ops::label_loss(&s.logits, batch)?;
        LossTerms::sum([("ce", ce)])
    }
}

/// Everything [`fit`] trains and reads.
pub struct FitInputs<'a> {
    /// The data.
    pub dataset: &'a dyn Dataset,
    /// The model being trained.
    pub model: &'a dyn Model,
    /// The loss.
    pub strategy: &'a mut dyn Strategy,
    /// The teachers whose outputs the strategy receives, combined when there are several
    /// ([`combine_teachers`]); empty when the strategy needs none.
    pub teachers: Vec<TeacherSource<'a>>,
    /// The variables the optimizer updates (the model's trainable ones and the strategy's).
    pub vars: Vec<Var>,
    /// The teacher's validation primary metric, for the gap rule.
    pub teacher_metric: Option<f64>,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Device to train on.
    pub device: &'a Device,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The task metrics of `model` on `split`.
pub fn evaluate(
    dataset: &dyn Dataset,
    model: &dyn Model,
    split: Split,
    batch_size: usize,
    device: &Device,
) -> Result<Metrics> {
    let mut acc = dataset.metrics()?;
    let n = dataset.info().len(split);
    let order = evaluation_order(n, dataset.lengths(split).as_deref());
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = dataset.batch(split, chunk, device)?;
        let out = model.forward(&batch.inputs, false)?;
        acc.update(&out.logits.detach(), &batch)?;
    }
    acc.finish()
}

/// The value of the metric (or loss term) `name` in `metrics`.
pub fn metric(metrics: &[(String, f64)], name: &str) -> Option<f64> {
    metrics.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// The warm-up factor of optimizer step `step` (zero-based) of `steps` warm-up steps:
/// `(step + 1) / steps` during them, 1 after.
fn warmup(step: usize, steps: usize) -> f64 {
    if step < steps {
        (step + 1) as f64 / steps as f64
    } else {
        1.0
    }
}

/// How often a long epoch logs its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Trains `inputs.model` with `inputs.strategy` for at most `config.epochs` epochs.
pub fn fit(inputs: FitInputs<'_>, config: &TrainConfig) -> Result<Outcome> {
    config.validate()?;
    let FitInputs {
        dataset,
        model,
        strategy,
        teachers,
        vars,
        teacher_metric,
        seed,
        device,
    } = inputs;
    let info = dataset.info().clone();
    let primary = info.primary_metric.clone();
    let n_train = info.len(Split::Train);
    let train_lengths = dataset.lengths(Split::Train);
    let steps_per_epoch = n_train.div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let mut optimizer = Optimizer::new(config.optimizer.clone(), vars)?;
    let mut step: u64 = 0;
    let mut epochs = Vec::new();
    let (mut best_epoch, mut best_value) = (None, f64::NEG_INFINITY);
    for epoch in 0..config.epochs {
        let started = Instant::now();
        let batches = training_batches(
            n_train,
            train_lengths.as_deref(),
            config.batch_size,
            &mut Rng::derive(seed, &format!("shuffle/{epoch}")),
        );
        let mut sums: Vec<(String, f64)> = Vec::new();
        let mut lr = config.optimizer.lr();
        let mut last_report = Instant::now();
        for (b, chunk) in batches.iter().enumerate() {
            let batch = dataset.train_batch(epoch, seed, chunk, device)?;
            let student = model.forward(&batch.inputs, true)?;
            let teacher_out = if teachers.is_empty() {
                None
            } else {
                let outputs = teachers
                    .iter()
                    .map(|t| t.outputs(&batch))
                    .collect::<Result<Vec<_>>>()?;
                Some(combine_teachers(outputs)?)
            };
            let info = StepInfo {
                epoch,
                step,
                epochs: config.epochs,
            };
            let terms = strategy.loss(&student, teacher_out.as_ref(), &batch, &info)?;
            let total = scalar(&terms.total)?;
            if !total.is_finite() {
                tracing::warn!(
                    epoch,
                    step,
                    loss = total,
                    "loss is not finite: the run diverged"
                );
                return Ok(Outcome {
                    stop: StopReason::Diverged { step },
                    epochs,
                    best_epoch,
                });
            }
            let weight = chunk.len() as f64;
            let mut add = |name: &str, v: f64| match sums.iter_mut().find(|(k, _)| k == name) {
                Some((_, s)) => *s += v * weight,
                None => sums.push((name.to_string(), v * weight)),
            };
            add("total", total);
            for (name, t) in &terms.terms {
                add(name, scalar(t)?);
            }
            lr = config.schedule.rate(
                config.optimizer.lr(),
                step as usize,
                total_steps,
                steps_per_epoch,
            ) * warmup(step as usize, config.warmup_epochs * steps_per_epoch);
            let grads = terms.total.backward()?;
            if !optimizer.gradients_finite(&grads)? {
                tracing::warn!(
                    epoch,
                    step,
                    "a gradient is not finite though the loss is: the run diverged"
                );
                return Ok(Outcome {
                    stop: StopReason::Diverged { step },
                    epochs,
                    best_epoch,
                });
            }
            optimizer.step(&grads, lr)?;
            strategy.end_step(&student, teacher_out.as_ref(), &batch)?;
            step += 1;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let done = b + 1;
                let per_step = started.elapsed().as_secs_f64() / done as f64;
                tracing::info!(
                    epoch,
                    step = done,
                    of = batches.len(),
                    loss = total,
                    seconds_left_in_epoch = (per_step * (batches.len() - done) as f64).round(),
                    "training"
                );
            }
        }
        strategy.end_epoch(epoch)?;
        let train = sums
            .into_iter()
            .map(|(k, s)| (k, s / n_train as f64))
            .collect();
        let evaluated = (epoch + 1) % config.eval_every == 0 || epoch + 1 == config.epochs;
        let (validation, test) = if evaluated {
            (
                evaluate(
                    dataset,
                    model,
                    Split::Validation,
                    config.eval_batch_size,
                    device,
                )?,
                evaluate(dataset, model, Split::Test, config.eval_batch_size, device)?,
            )
        } else {
            (Metrics::new(), Metrics::new())
        };
        let val = if evaluated {
            Some(metric(&validation, &primary).ok_or_else(|| {
                Error::Invalid(format!(
                    "the dataset's metrics lack its primary metric `{primary}`"
                ))
            })?)
        } else {
            None
        };
        tracing::info!(
            epoch,
            lr,
            validation = val,
            seconds = started.elapsed().as_secs_f64(),
            "epoch done"
        );
        epochs.push(EpochRecord {
            epoch,
            lr,
            train,
            validation,
            test,
        });
        let Some(val) = val else {
            continue; // not evaluated: nothing to compare or stop on
        };
        if val > best_value {
            (best_epoch, best_value) = (Some(epoch), val);
        }
        if let (Some(tol), Some(t)) = (config.gap_tolerance, teacher_metric)
            && t - val <= tol
        {
            return Ok(Outcome {
                stop: StopReason::GapReached,
                epochs,
                best_epoch,
            });
        }
        if let (Some(p), Some(b)) = (config.patience, best_epoch)
            && epoch >= b + p
        {
            return Ok(Outcome {
                stop: StopReason::Patience,
                epochs,
                best_epoch,
            });
        }
    }
    Ok(Outcome {
        stop: StopReason::Completed,
        epochs,
        best_epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy;
    use distill_rt::candle_nn::VarMap;
    use distill_rt::init::seeded_var_builder;
    use distill_rt::testing::named_vars;
    use distill_rt::{Config, ModelContext};

    struct Setup {
        data: Box<dyn Dataset>,
        model: Box<dyn Model>,
        varmap: VarMap,
    }

    fn setup(seed: u64) -> Result<Setup> {
        let r = toy::registrar()?;
        let data = r.get_dataset("toy.blobs")?.build(&Config::Null)?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu),
        };
        let model = r.get_model("toy.mlp")?.build(&Config::Null, ctx)?;
        Ok(Setup {
            data,
            model,
            varmap,
        })
    }

    fn run(
        seed: u64,
        strategy: &mut dyn Strategy,
        config: &TrainConfig,
        teacher_metric: Option<f64>,
    ) -> Result<Outcome> {
        let s = setup(seed)?;
        let vars = named_vars(&s.varmap).into_iter().map(|(_, v)| v).collect();
        let inputs = FitInputs {
            dataset: &*s.data,
            model: &*s.model,
            strategy,
            teachers: Vec::new(),
            vars,
            teacher_metric,
            seed,
            device: &Device::Cpu,
        };
        fit(inputs, config)
    }

    fn config(epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: 32,
            optimizer: OptimizerConfig::AdamW {
                lr: 0.05,
                weight_decay: 0.0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn learns_the_toy_task_and_records_every_epoch() -> Result<()> {
        let out = run(1, &mut Supervised, &config(5), None)?;
        assert_eq!(out.stop, StopReason::Completed);
        assert_eq!(out.epochs.len(), 5);
        let first = metric(&out.epochs[0].train, "total").unwrap_or(f64::NAN);
        let last = metric(&out.epochs[4].train, "total").unwrap_or(f64::NAN);
        assert!(last < first, "training loss {first} -> {last}");
        let acc = metric(&out.epochs[4].test, "accuracy").unwrap_or(0.0);
        assert!(acc > 0.85, "test accuracy {acc}");
        Ok(())
    }

    #[test]
    fn same_seed_same_metrics_other_seed_other_metrics() -> Result<()> {
        let a = run(3, &mut Supervised, &config(2), None)?;
        let b = run(3, &mut Supervised, &config(2), None)?;
        let c = run(4, &mut Supervised, &config(2), None)?;
        assert_eq!(a.epochs, b.epochs);
        assert_ne!(a.epochs, c.epochs);
        Ok(())
    }

    /// Returns NaN from step 5 on.
    struct NanAfter;
    impl Strategy for NanAfter {
        fn teacher_needs(&self) -> TeacherNeeds {
            TeacherNeeds::default()
        }
        fn loss(
            &self,
            s: &ModelOutput,
            t: Option<&ModelOutput>,
            b: &Batch,
            step: &StepInfo,
        ) -> Result<LossTerms> {
            let mut terms = Supervised.loss(s, t, b, step)?;
            if step.step >= 5 {
                terms.total = (terms.total * f64::NAN)?;
            }
            Ok(terms)
        }
    }

    #[test]
    fn nan_loss_ends_the_run_as_diverged_with_its_step() -> Result<()> {
        let out = run(1, &mut NanAfter, &config(3), None)?;
        assert_eq!(out.stop, StopReason::Diverged { step: 5 });
        Ok(())
    }

    /// A finite loss whose gradient is NaN from step 3 on: `0 * sqrt(0)` has the value 0 and,
    /// through `sqrt`'s infinite slope at 0, the gradient NaN.
    struct NanGradientAfter;
    impl Strategy for NanGradientAfter {
        fn teacher_needs(&self) -> TeacherNeeds {
            TeacherNeeds::default()
        }
        fn loss(
            &self,
            s: &ModelOutput,
            t: Option<&ModelOutput>,
            b: &Batch,
            step: &StepInfo,
        ) -> Result<LossTerms> {
            let mut terms = Supervised.loss(s, t, b, step)?;
            if step.step >= 3 {
                let zero = (&s.logits - s.logits.detach())?.sqr()?.sum_all()?.sqrt()?;
                let scale = Tensor::zeros((), zero.dtype(), zero.device())?;
                terms.total = (terms.total + (zero * scale)?)?;
            }
            Ok(terms)
        }
    }

    #[test]
    fn a_nan_gradient_under_a_finite_loss_ends_the_run_as_diverged() -> Result<()> {
        let out = run(1, &mut NanGradientAfter, &config(3), None)?;
        assert_eq!(out.stop, StopReason::Diverged { step: 3 });
        Ok(())
    }

    #[test]
    fn patience_and_gap_stop_early() -> Result<()> {
        // A learning rate so small that nothing improves after the first epoch.
        let mut frozen = config(10);
        frozen.optimizer = OptimizerConfig::Sgd {
            lr: 1e-12,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        frozen.patience = Some(2);
        let out = run(1, &mut Supervised, &frozen, None)?;
        assert_eq!(
            (out.stop, out.epochs.len(), out.best_epoch),
            (StopReason::Patience, 3, Some(0))
        );

        let mut gap = config(10);
        gap.gap_tolerance = Some(0.05);
        let out = run(1, &mut Supervised, &gap, Some(0.5))?;
        assert_eq!((out.stop, out.epochs.len()), (StopReason::GapReached, 1));
        Ok(())
    }

    #[test]
    fn eval_every_evaluates_those_epochs_and_the_last_and_changes_no_training() -> Result<()> {
        let every = run(1, &mut Supervised, &config(5), None)?;
        let mut sparse = config(5);
        sparse.eval_every = 2;
        let out = run(1, &mut Supervised, &sparse, None)?;
        let evaluated: Vec<usize> = out
            .epochs
            .iter()
            .filter(|e| !e.validation.is_empty() && !e.test.is_empty())
            .map(|e| e.epoch)
            .collect();
        assert_eq!(evaluated, [1, 3, 4]);
        for (a, b) in every.epochs.iter().zip(&out.epochs) {
            assert_eq!((a.epoch, a.lr, &a.train), (b.epoch, b.lr, &b.train));
            if evaluated.contains(&b.epoch) {
                assert_eq!((&a.validation, &a.test), (&b.validation, &b.test));
            }
        }
        // The best epoch is the best of the evaluated ones.
        let best = |o: &Outcome, among: &[usize]| {
            among.iter().copied().max_by(|x, y| {
                let v = |e: usize| metric(&o.epochs[e].validation, "accuracy").unwrap_or(0.0);
                v(*x).total_cmp(&v(*y)).then(y.cmp(x))
            })
        };
        assert_eq!(out.best_epoch, best(&every, &evaluated));
        assert!(
            TrainConfig {
                eval_every: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn warmup_rises_linearly_then_leaves_the_schedule_alone() {
        assert_eq!(warmup(0, 4), 0.25);
        assert_eq!(warmup(3, 4), 1.0);
        assert_eq!(warmup(9, 4), 1.0);
        assert_eq!(warmup(0, 0), 1.0);
    }

    #[test]
    fn bad_train_config_names_the_key() {
        let c = TrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("batch_size")
        );
    }
}
