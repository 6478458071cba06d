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

impl TeacherNeeds {
    /// The features teacher `i` of `teachers` must provide: all of them for a single teacher;
    /// with several, those named under its prefix ([`teacher_prefix`]), without the prefix and
    /// without `logits` (always there).
    pub fn of_teacher(&self, i: usize, teachers: usize) -> Vec<String> {
        if teachers <= 1 {
            return self.features.clone();
        }
        let prefix = teacher_prefix(i);
        self.features
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix))
            .filter(|f| *f != TEACHER_LOGITS)
            .map(str::to_string)
            .collect()
    }
}

/// The feature name of a teacher's logits in a combined output (`teacher0.logits`).
pub const TEACHER_LOGITS: &str = "logits";

/// Prefix of teacher `i`'s outputs when several teachers teach one student: `teacher<i>.`.
pub fn teacher_prefix(i: usize) -> String {
    format!("teacher{i}.")
}

/// Several teachers' outputs as the one output a strategy receives. One teacher's output passes
/// unchanged. With several, the logits are the teachers' mean (so a single-teacher logit
/// strategy such as `kd` learns from the plain ensemble), and each teacher's logits and features
/// appear as features under its prefix: `teacher0.logits`, `teacher1.penultimate`, ...
pub fn combine_teachers(mut outputs: Vec<ModelOutput>) -> Result<ModelOutput> {
    if outputs.len() <= 1 {
        return outputs
            .pop()
            .ok_or_else(|| Error::Invalid("no teacher output to combine".into()));
    }
    let n = outputs.len() as f64;
    let mut sum = outputs[0].logits.zeros_like()?;
    let mut features = crate::TensorMap::new();
    for (i, out) in outputs.into_iter().enumerate() {
        if out.logits.dims() != sum.dims() {
            return Err(Error::Invalid(format!(
                "teacher {i}'s logits are {:?}, teacher 0's {:?}: teachers that teach together must score the same classes",
                out.logits.dims(),
                sum.dims()
            )));
        }
        sum = (sum + &out.logits)?;
        let prefix = teacher_prefix(i);
        features.insert(format!("{prefix}{TEACHER_LOGITS}"), out.logits);
        for (name, t) in out.features {
            features.insert(format!("{prefix}{name}"), t);
        }
    }
    Ok(ModelOutput {
        logits: (sum / n)?,
        features,
    })
}

/// How many teachers a combined output's features (or their shapes) come from: the number of
/// `teacher<i>.logits` entries, 0 for a single teacher's own output.
pub fn teacher_count<'a>(names: impl IntoIterator<Item = &'a String>) -> usize {
    names
        .into_iter()
        .filter(|k| {
            k.strip_prefix("teacher")
                .and_then(|r| r.strip_suffix(&format!(".{TEACHER_LOGITS}")))
                .is_some_and(|i| i.parse::<usize>().is_ok())
        })
        .count()
}

/// Named loss terms of one batch: the total that is minimised and its components, all logged.
#[derive(Clone, Debug)]
pub struct LossTerms {
    /// The scalar that is back-propagated.
    pub total: Tensor,
    /// Its weighted components by name (`ce`, `kd`, ...), scalars, for logging.
    pub terms: Vec<(String, Tensor)>,
}

impl LossTerms {
    /// The terms with their sum as the total (terms are reported weighted, so they add up to
    /// what is minimised); an error without any term.
    pub fn sum<'a>(terms: impl IntoIterator<Item = (&'a str, Tensor)>) -> Result<Self> {
        let terms: Vec<(String, Tensor)> = terms
            .into_iter()
            .map(|(name, t)| (name.to_string(), t))
            .collect();
        let mut parts = terms.iter().map(|(_, t)| t);
        let first = parts
            .next()
            .ok_or_else(|| Error::Invalid("a loss without any term".into()))?;
        let mut total = first.clone();
        for t in parts {
            total = (total + t)?;
        }
        Ok(Self { total, terms })
    }
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

/// The shape of feature `name` in a factory's `shapes` ([`StrategyContext`]), or an error
/// naming the strategy and what exists.
pub fn feature_shape<'a>(
    owner: &str,
    side: &'static str,
    shapes: &'a BTreeMap<String, Vec<usize>>,
    name: &str,
) -> Result<&'a [usize]> {
    shapes
        .get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| Error::MissingFeature {
            owner: owner.to_string(),
            side,
            name: name.to_string(),
            available: shapes.keys().cloned().collect::<Vec<_>>().join(", "),
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn output(logits: &[f32], feature: f32) -> Result<ModelOutput> {
        let dev = Device::Cpu;
        Ok(ModelOutput {
            logits: Tensor::new(logits, &dev)?.reshape((1, logits.len()))?,
            features: crate::TensorMap::from([(
                "penultimate".to_string(),
                Tensor::new(&[[feature]], &dev)?,
            )]),
        })
    }

    #[test]
    fn several_teachers_combine_under_prefixes_with_mean_logits() -> Result<()> {
        let combined =
            combine_teachers(vec![output(&[1.0, 3.0], 5.0)?, output(&[3.0, -1.0], 7.0)?])?;
        assert_eq!(combined.logits.to_vec2::<f32>()?, [[2.0, 1.0]]);
        let names: Vec<&str> = combined.features.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "teacher0.logits",
                "teacher0.penultimate",
                "teacher1.logits",
                "teacher1.penultimate"
            ]
        );
        assert_eq!(
            combined.features["teacher1.logits"].to_vec2::<f32>()?,
            [[3.0, -1.0]]
        );
        assert_eq!(
            combined.features["teacher1.penultimate"].to_vec2::<f32>()?,
            [[7.0]]
        );
        assert_eq!(teacher_count(combined.features.keys()), 2);

        let single = combine_teachers(vec![output(&[1.0, 3.0], 5.0)?])?;
        assert_eq!(single.logits.to_vec2::<f32>()?, [[1.0, 3.0]]);
        assert_eq!(teacher_count(single.features.keys()), 0);

        let err = combine_teachers(vec![output(&[1.0, 3.0], 5.0)?, output(&[1.0], 5.0)?]);
        assert!(err.is_err_and(|e| e.to_string().contains("same classes")));
        Ok(())
    }

    #[test]
    fn each_teacher_is_asked_for_its_own_features() {
        let needs = TeacherNeeds::features(vec![
            "teacher0.penultimate".into(),
            "teacher1.logits".into(),
            "teacher1.stage3".into(),
        ]);
        assert_eq!(needs.of_teacher(0, 2), ["penultimate"]);
        assert_eq!(needs.of_teacher(1, 2), ["stage3"]);
        assert_eq!(needs.of_teacher(0, 1), needs.features);
    }
}
