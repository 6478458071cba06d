//! `dist`: DIST, "Knowledge Distillation from A Stronger Teacher" (Huang et al. 2022), as its
//! official code computes it.
//!
//! With `p = softmax(z / tau)` for student and teacher (`[b, classes]`) and the Pearson
//! correlation computed as the cosine of centred vectors with `1e-8` added to the norm product:
//! - inter-class relation: `1 - mean over samples of pearson(p_s[i, :], p_t[i, :])`;
//! - intra-class relation: `1 - mean over classes of pearson(p_s[:, c], p_t[:, c])`.
//!
//! `loss = ce_weight * CE + tau^2 * (beta * inter + gamma * intra)`; defaults `ce_weight = 1`,
//! `beta = 1`, `gamma = 1`, `tau = 1` (the reference class's defaults; the paper's CIFAR runs
//! use `beta = gamma = 2`, `tau = 4`); terms `ce`, `inter`, `intra`, reported weighted. Reads
//! logits only; the teacher's are constants. No parameters, no extra memory to speak of.

use distill_rt::candle::{D, Tensor};
use distill_rt::ops::{l2_norm, label_loss, softmax};
use distill_rt::strategy::{StepInfo, require_teacher};
use distill_rt::{
    Batch, Config, LossTerms, ModelOutput, Result, Strategy, StrategyContext, StrategyFactory,
    TeacherNeeds, config,
};

const OWNER: &str = "strategy dist";

#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Copy, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct DistConfig {
    ce_weight: f64,
    beta: f64,
    gamma: f64,
    tau: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            beta: 1.0,
            gamma: 1.0,
            tau: 1.0,
        }
    }
}

/// Builds [`Dist`].
pub struct DistFactory;

impl StrategyFactory for DistFactory {
    fn summary(&self) -> &str {
        "DIST (Huang et al. 2022): ce_weight*CE + tau^2*(beta*(1 - inter-class Pearson) + gamma*(1 - intra-class Pearson)) of softmax(z/tau); 1, 1, 1, 1"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<DistConfig>()
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: DistConfig = config::parse(OWNER, cfg)?;
        config::require_weights(
            OWNER,
            &[
                ("ce_weight", c.ce_weight),
                ("beta", c.beta),
                ("gamma", c.gamma),
            ],
        )?;
        config::require_scales(OWNER, &[("tau", c.tau)])?;
        Ok(Box::new(Dist { config: c }))
    }
}

/// The DIST loss (module docs).
pub struct Dist {
    config: DistConfig,
}

/// `1 - mean over rows of the Pearson correlation of the rows of a and b`.
fn one_minus_pearson(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let centre =
        |x: &Tensor| -> Result<Tensor> { Ok(x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?) };
    let (a, b) = (centre(a)?, centre(b)?);
    let norm =
        |x: &Tensor| -> Result<Tensor> { Ok(l2_norm(x, D::Minus1, 1e-12)?.squeeze(D::Minus1)?) };
    let cos = ((&a * &b)?.sum(D::Minus1)? / ((norm(&a)? * norm(&b)?)? + 1e-8)?)?;
    Ok((1.0 - cos.mean_all()?)?)
}

impl Strategy for Dist {
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
        let t = require_teacher(OWNER, t)?;
        let c = self.config;
        let p_s = softmax(&(&s.logits / c.tau)?, D::Minus1)?;
        let p_t = softmax(&(t.logits.detach() / c.tau)?, D::Minus1)?;
        let t2 = c.tau * c.tau;
        let ce = (label_loss(&s.logits, batch)? * c.ce_weight)?;
        let inter = (one_minus_pearson(&p_s, &p_t)? * (t2 * c.beta))?;
        let intra = (one_minus_pearson(&p_s.t()?.contiguous()?, &p_t.t()?.contiguous()?)?
            * (t2 * c.gamma))?;
        LossTerms::sum([("ce", ce), ("inter", inter), ("intra", intra)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn dist_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("dist")
    }
}
