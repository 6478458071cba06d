//! `dkd`: Decoupled Knowledge Distillation (Zhao et al. 2022), as mdistiller computes it.
//!
//! With `p = softmax(z / T)` and `y` the target class:
//! - TCKD: KL between the teacher's and the student's binary distributions `(p_y, 1 - p_y)`;
//! - NCKD: KL between the distributions over the non-target classes
//!   (`softmax(z / T - 1000 * onehot(y))`);
//!
//! both summed over classes and divided by the batch size, times `T^2`.
//! `loss = ce_weight * CE + w * (alpha * TCKD + beta * NCKD)` with the warm-up factor
//! `w = min(epoch / warmup, 1)`, `epoch` counted from 1 as mdistiller counts it. Defaults
//! `ce_weight = 1`, `alpha = 1`, `beta = 8`, `temperature = 4`, `warmup = 20` (mdistiller's
//! CIFAR-100 settings; `warmup = 1` turns it off). Terms `ce`, `tckd`, `nckd`, reported weighted.
//! Log-probabilities are computed in log space (`1 - p_y` as a log-sum-exp over the other
//! classes), so a confident teacher does not give `log 0`. Reads logits only; no parameters.

use distill_rt::candle::{D, Tensor};
use distill_rt::ops::{is_relevance, label_loss, log_softmax};
use distill_rt::strategy::{StepInfo, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config,
};

const OWNER: &str = "strategy dkd";

#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Copy, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct DkdConfig {
    ce_weight: f64,
    alpha: f64,
    beta: f64,
    temperature: f64,
    warmup: usize,
}

impl Default for DkdConfig {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            alpha: 1.0,
            beta: 8.0,
            temperature: 4.0,
            warmup: 20,
        }
    }
}

/// Builds [`Dkd`].
pub struct DkdFactory;

impl StrategyFactory for DkdFactory {
    fn summary(&self) -> &str {
        "decoupled KD (Zhao et al. 2022): ce_weight*CE + min(epoch/warmup, 1)*(alpha*TCKD + beta*NCKD), T^2-scaled; 1, 1, 8, T 4, warmup 20"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<DkdConfig>()
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: DkdConfig = config::parse(OWNER, cfg)?;
        config::require_weights(
            OWNER,
            &[
                ("ce_weight", c.ce_weight),
                ("alpha", c.alpha),
                ("beta", c.beta),
            ],
        )?;
        config::require_positive(OWNER, &[("warmup", c.warmup)])?;
        config::require_scales(OWNER, &[("temperature", c.temperature)])?;
        Ok(Box::new(Dkd { config: c }))
    }
}

/// The DKD loss (module docs).
pub struct Dkd {
    config: DkdConfig,
}

/// `log(sum(exp(x)))` along the last dimension, kept, with the max subtracted (detached).
fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    Ok((x
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?)
}

/// `[log p_y, log(1 - p_y)]` (`[b, 2]`) and the non-target log-distribution (`[b, classes]`)
/// of `logits / temperature`, for target mask `gt`.
fn decoupled(logits: &Tensor, gt: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let log_p = log_softmax(&(logits / temperature)?, D::Minus1)?;
    let log_target = (&log_p * gt)?.sum_keepdim(D::Minus1)?;
    let log_rest = log_sum_exp(&(&log_p - (gt * 1000.0)?)?)?;
    let binary = Tensor::cat(&[log_target, log_rest], 1)?;
    let others = log_softmax(&((logits / temperature)? - (gt * 1000.0)?)?, D::Minus1)?;
    Ok((binary, others))
}

/// `sum(exp(log_t) * (log_t - log_s)) / batch`.
fn kl_sum_over_batch(log_s: &Tensor, log_t: &Tensor) -> Result<Tensor> {
    let batch = log_s.dim(0)? as f64;
    Ok(((log_t.exp()? * (log_t - log_s)?)?.sum_all()? / batch)?)
}

impl Strategy for Dkd {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::logits()
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher(OWNER, t)?;
        if is_relevance(&s.logits, &batch.targets) {
            return Err(Error::Invalid(format!(
                "{OWNER} decouples the target class from the others and needs class-id targets; \
                 this task's targets are ranking relevance"
            )));
        }
        let c = self.config;
        let classes = s.logits.dim(1)?;
        let gt = batch
            .targets
            .to_dtype(distill_rt::candle::DType::U32)?
            .unsqueeze(1)?
            .broadcast_as((batch.targets.dim(0)?, classes))?
            .eq(&Tensor::arange(0u32, classes as u32, s.logits.device())?
                .unsqueeze(0)?
                .broadcast_as((batch.targets.dim(0)?, classes))?)?
            .to_dtype(s.logits.dtype())?;
        let (bin_s, others_s) = decoupled(&s.logits, &gt, c.temperature)?;
        let (bin_t, others_t) = decoupled(&t.logits.detach(), &gt, c.temperature)?;
        let warm = ((step.epoch + 1) as f64 / c.warmup as f64).min(1.0);
        let t2 = c.temperature * c.temperature;
        let ce = (label_loss(&s.logits, batch)? * c.ce_weight)?;
        let tckd = (kl_sum_over_batch(&bin_s, &bin_t)? * (warm * c.alpha * t2))?;
        let nckd = (kl_sum_over_batch(&others_s, &others_t)? * (warm * c.beta * t2))?;
        LossTerms::sum([("ce", ce), ("tckd", tckd), ("nckd", nckd)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn dkd_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("dkd")
    }
}
