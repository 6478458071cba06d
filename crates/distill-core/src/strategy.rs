//! Strategies: how a student learns from a teacher (or alone).

use std::collections::BTreeMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::data::Batch;
use crate::model::ModelOutput;
use crate::{Config, Error, Result};

/// Where in training a loss is computed.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepInfo {
    /// Zero-based epoch.
    pub epoch: usize,
    /// Zero-based optimizer step since the start of training.
    pub step: u64,
    /// Number of epochs planned.
    pub epochs: usize,
}

/// What a strategy needs from the teacher.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TeacherNeeds {
    /// Whether a teacher is used at all (`baseline` uses none).
    pub teacher: bool,
    /// Teacher features, besides logits, that must be computed or cached.
    pub features: Vec<String>,
    /// Whether the teacher must run live on every batch (cached outputs would be wrong).
    pub live: bool,
}

impl TeacherNeeds {
    /// The teacher's logits only (cached outputs serve).
    pub fn logits() -> Self {
        Self::features(Vec::new())
    }

    /// The teacher's logits and `features` (cached outputs serve when the cache keeps them).
    pub fn features(features: Vec<String>) -> Self {
        Self {
            teacher: true,
            features,
            live: false,
        }
    }
}

/// Named loss terms of one batch: the total that is minimised and its components, all logged.
#[derive(Clone, Debug)]
pub struct LossTerms {
    /// The scalar that is back-propagated.
    pub total: Tensor,
    /// Its weighted components by name (`ce`, `kd`, ...), scalars, for logging.
    pub terms: Vec<(String, Tensor)>,
}

/// What a strategy factory receives besides its configuration.
pub struct StrategyContext<'a> {
    /// Number of classes of the task.
    pub num_classes: usize,
    /// Shape of each student feature, without the batch dimension.
    pub student_features: &'a BTreeMap<String, Vec<usize>>,
    /// Shape of each teacher feature, without the batch dimension (empty without a teacher).
    pub teacher_features: &'a BTreeMap<String, Vec<usize>>,
    /// Number of training samples (the size of a memory bank keyed by sample index).
    pub train_samples: usize,
    /// The run's seed, for the strategy's own random draws.
    pub seed: u64,
    /// Where the strategy creates its own trainable variables (adapters, embeddings); they train
    /// with the student.
    pub vb: VarBuilder<'a>,
}

/// A distillation strategy.
pub trait Strategy: Send {
    /// What the strategy needs from the teacher.
    fn teacher_needs(&self) -> TeacherNeeds;
    /// The loss of one batch. `teacher` is `None` only when [`TeacherNeeds::teacher`] is false.
    fn loss(
        &self,
        student: &ModelOutput,
        teacher: Option<&ModelOutput>,
        batch: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms>;
    /// Called after each optimizer step with the step's outputs (memory-bank upkeep), so that
    /// [`Strategy::loss`] itself changes nothing and can be evaluated repeatedly.
    fn end_step(
        &mut self,
        _student: &ModelOutput,
        _teacher: Option<&ModelOutput>,
        _batch: &Batch,
    ) -> Result<()> {
        Ok(())
    }
    /// Called after each epoch (schedules).
    fn end_epoch(&mut self, _epoch: usize) -> Result<()> {
        Ok(())
    }
}

/// Builds a [`Strategy`] from its configuration table.
pub trait StrategyFactory: Send + Sync {
    /// One line saying what the strategy does.
    fn summary(&self) -> &str;
    /// The configuration keys with their default values (`null`: required, or derived from
    /// other keys), for listings; `Config::Null` when the factory does not describe them.
    fn defaults(&self) -> Config {
        Config::Null
    }
    /// Builds the strategy; unknown configuration keys are an error.
    fn build(&self, config: &Config, ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>>;
}

/// The feature `name` of a model output, or an error naming the strategy and what exists.
pub fn feature<'a>(
    owner: &str,
    side: &'static str,
    output: &'a ModelOutput,
    name: &str,
) -> Result<&'a Tensor> {
    output
        .features
        .get(name)
        .ok_or_else(|| Error::MissingFeature {
            owner: owner.to_string(),
            side,
            name: name.to_string(),
            available: output
                .features
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The teacher output, or an error saying the strategy needs one.
pub fn require_teacher<'a>(
    owner: &str,
    teacher: Option<&'a ModelOutput>,
) -> Result<&'a ModelOutput> {
    teacher.ok_or_else(|| {
        Error::Invalid(format!(
            "{owner} needs a teacher output, but none was given"
        ))
    })
}
