//! `kd`: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".
//!
//! `loss = alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))`
//!
//! - KL is summed over classes and averaged over the batch ("batchmean");
//! - `T^2` is applied whatever `alpha` is (it keeps the soft-target gradients' scale independent
//!   of `T`);
//! - defaults `alpha = 0.1`, `temperature = 4` (the CE weight 0.1 / KD weight 0.9 / T = 4 of
//!   RepDistiller and mdistiller);
//! - terms: `ce` = `alpha * CE`, `kd` = `(1 - alpha) * T^2 * KL`; the teacher's logits are
//!   treated as constants.
//!
//! On a ranking task (relevance targets, [`distill_rt::ops::is_relevance`]) the same formula is
//! applied pointwise to scores: CE is the binary cross-entropy on the labelled candidates and KL
//! is the binary one, `KL(sigmoid(t / T) || sigmoid(s / T))`, averaged over the same labelled
//! candidates (a positive and its sampled negatives), so the teacher's probabilities are soft
//! targets for each candidate.

use distill_rt::candle::Tensor;
use distill_rt::kernels::kl_batchmean;
use distill_rt::ops::{is_relevance, label_loss, labelled_positions, log_sigmoid, mean_or_zero};
use distill_rt::strategy::{StepInfo, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config,
};

#[derive(distill_rt::serde::Deserialize, Clone, Copy, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct KdConfig {
    /// Weight of the cross-entropy on labels; the KD term gets `1 - alpha`.
    alpha: Option<f64>,
    /// Softmax temperature `T`.
    temperature: Option<f64>,
}

/// Builds [`Kd`] under a name with its defaults: `kd` (alpha 0.1, T 4) and `born-again`.
pub struct KdFactory {
    owner: &'static str,
    summary: &'static str,
    /// Default `alpha` and `temperature`.
    defaults: (f64, f64),
}

/// `kd`: RepDistiller's and mdistiller's CE 0.1 / KD 0.9 at T = 4.
pub const KD: KdFactory = KdFactory {
    owner: "strategy kd",
    summary: "Hinton KD: alpha*CE + (1-alpha)*T^2*KL(batchmean) on temperature-softened logits; alpha 0.1, T 4",
    defaults: (0.1, 4.0),
};

/// `born-again` (Furlanello et al. 2018): the KD loss against a teacher of the student's own
/// architecture, at the paper's setting: the teacher's distribution alone (alpha 0), T = 1. The
/// experiment file's `generations = N` on the strategy entry makes the chain of teachers.
pub const BORN_AGAIN: KdFactory = KdFactory {
    owner: "strategy born-again",
    summary: "born-again networks (Furlanello et al.): KD from a trained model of the student's own architecture, generation after generation (`generations = N` in the experiment); alpha 0, T 1",
    defaults: (0.0, 1.0),
};

impl StrategyFactory for KdFactory {
    fn summary(&self) -> &str {
        self.summary
    }
    fn defaults(&self) -> Config {
        distill_rt::serde_json::json!({"alpha": self.defaults.0, "temperature": self.defaults.1})
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: KdConfig = config::parse(self.owner, cfg)?;
        let alpha = c.alpha.unwrap_or(self.defaults.0);
        let temperature = c.temperature.unwrap_or(self.defaults.1);
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::config(
                self.owner,
                "alpha",
                format!("must be in [0, 1], got {alpha}"),
            ));
        }
        config::require_scales(self.owner, &[("temperature", temperature)])?;
        Ok(Box::new(Kd { alpha, temperature }))
    }
}

/// The Hinton KD loss with pinned conventions (module docs).
pub struct Kd {
    alpha: f64,
    temperature: f64,
}

/// `KL(sigmoid(t / T) || sigmoid(s / T))` per candidate, averaged over the candidates that
/// `relevance` labels.
pub fn binary_kl(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    relevance: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let at = labelled_positions(relevance)?;
    let pick = |x: &Tensor| x.flatten_all()?.index_select(&at, 0);
    let s = (pick(student_logits)? / temperature)?;
    let t = (pick(&teacher_logits.detach())? / temperature)?;
    let (log_pt, log_qt) = (log_sigmoid(&t)?, log_sigmoid(&t.neg()?)?);
    let (log_ps, log_qs) = (log_sigmoid(&s)?, log_sigmoid(&s.neg()?)?);
    let kl = ((log_pt.exp()? * (&log_pt - log_ps)?)? + (log_qt.exp()? * (&log_qt - log_qs)?)?)?;
    mean_or_zero(&kl)
}

impl Strategy for Kd {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::logits()
    }
    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher("strategy kd", t)?;
        let t2 = self.temperature * self.temperature;
        let ce = (label_loss(&s.logits, batch)? * self.alpha)?;
        let kl = if is_relevance(&s.logits, &batch.targets) {
            binary_kl(&s.logits, &t.logits, &batch.targets, self.temperature)?
        } else {
            kl_batchmean(&s.logits, &t.logits, self.temperature)?
        };
        let kd = (kl * ((1.0 - self.alpha) * t2))?;
        LossTerms::sum([("ce", ce), ("kd", kd)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn kd_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("kd")
    }

    #[test]
    fn born_again_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("born-again")
    }
}
