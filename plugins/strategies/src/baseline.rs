//! `baseline`: the student trained alone on the labels (cross-entropy; binary cross-entropy on a
//! ranking task's candidates); the reference every strategy is compared against.

use distill_rt::ops::label_loss;
use distill_rt::strategy::StepInfo;
use distill_rt::{
    Batch, Config, LossTerms, ModelOutput, Result, Strategy, StrategyContext, StrategyFactory,
    TeacherNeeds, config,
};

/// `baseline` takes no configuration keys.
#[derive(distill_rt::serde::Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct BaselineConfig {}

/// Builds [`Baseline`].
pub struct BaselineFactory;

impl StrategyFactory for BaselineFactory {
    fn summary(&self) -> &str {
        "student alone: the task's label loss (cross-entropy, or binary cross-entropy for ranking), no teacher"
    }
    fn defaults(&self) -> Config {
        Config::Object(Default::default())
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let BaselineConfig {} = config::parse("strategy baseline", cfg)?;
        Ok(Box::new(Baseline))
    }
}

/// `loss = CE(student_logits, y)` ([`label_loss`]), averaged over the batch.
pub struct Baseline;

impl Strategy for Baseline {
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
        let ce = label_loss(&s.logits, batch)?;
        LossTerms::sum([("ce", ce)])
    }
}
