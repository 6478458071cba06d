//! Relation-based strategies: the student matches how the teacher relates the samples of a batch
//! to each other, not the teacher's features themselves, so the widths may differ and no adapter
//! is needed. Both follow RepDistiller's code and default weights (CIFAR-100 settings).
//!
//! - `sp`, similarity-preserving KD (Tung & Mori 2019): `G = F F^T` over the batch (`F` the
//!   feature flattened per sample, `[b, d]`), each row L2-normalised;
//!   `loss_sp = ||G_t - G_s||_F^2 / b^2`. Defaults `feature_weight = 3000`, `ce_weight = 1`.
//! - `pkt`, probabilistic knowledge transfer (Passalis & Tefas 2018): rows of `F` L2-normalised
//!   (`+ 1e-7` in the norm), cosine similarities mapped to `[0, 1]` by `(c + 1) / 2`, each row
//!   normalised to sum 1 (`P`); `loss_pkt = mean over the b^2 entries of
//!   P_t * log((P_t + 1e-7) / (P_s + 1e-7))`. Defaults `feature_weight = 30000`, `ce_weight = 1`.
//!
//! `loss = ce_weight * CE(s, y) + feature_weight * loss_relation`; terms `ce` and `sp` / `pkt`,
//! reported weighted. Features default to `penultimate` on both sides (`student_feature`,
//! `teacher_feature`); the teacher's are constants. Neither adds trainable parameters; memory is
//! one `b x b` matrix per side.

use distill_rt::candle::{D, Tensor};
use distill_rt::ops::{l2_norm, label_loss};
use distill_rt::strategy::{StepInfo, feature, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config, model::PENULTIMATE,
};

#[derive(distill_rt::serde::Deserialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct RelationConfig {
    student_feature: Option<String>,
    teacher_feature: Option<String>,
    ce_weight: Option<f64>,
    feature_weight: Option<f64>,
}

/// Which relation a strategy matches.
#[derive(Clone, Copy, Debug)]
pub enum Relation {
    /// `sp`: row-normalised Gram matrices, squared Frobenius distance.
    SimilarityPreserving,
    /// `pkt`: conditional probabilities from cosine similarities, KL divergence.
    ProbabilisticTransfer,
}

impl Relation {
    fn name(self) -> &'static str {
        match self {
            Relation::SimilarityPreserving => "sp",
            Relation::ProbabilisticTransfer => "pkt",
        }
    }

    fn default_weight(self) -> f64 {
        match self {
            Relation::SimilarityPreserving => 3000.0,
            Relation::ProbabilisticTransfer => 30000.0,
        }
    }

    /// The relation loss between student features `f_s` and teacher features `f_t`.
    pub fn loss(self, f_s: &Tensor, f_t: &Tensor) -> Result<Tensor> {
        let b = f_s.dim(0)?;
        if f_t.dim(0)? != b {
            return Err(Error::Invalid(format!(
                "strategy {}: student and teacher batches differ ({b} vs {})",
                self.name(),
                f_t.dim(0)?
            )));
        }
        let f_s = f_s.reshape((b, ()))?;
        let f_t = f_t.detach().reshape((b, ()))?;
        match self {
            Relation::SimilarityPreserving => {
                let diff = (gram(&f_t)? - gram(&f_s)?)?;
                Ok((diff.sqr()?.sum_all()? / (b * b) as f64)?)
            }
            Relation::ProbabilisticTransfer => {
                const EPS: f64 = 1e-7;
                let (p_s, p_t) = (cosine_probabilities(&f_s)?, cosine_probabilities(&f_t)?);
                let ratio = ((&p_t + EPS)?.log()? - (&p_s + EPS)?.log()?)?;
                Ok((p_t * ratio)?.mean_all()?)
            }
        }
    }
}

/// `F F^T` with each row scaled to unit L2 norm.
fn gram(f: &Tensor) -> Result<Tensor> {
    let g = f.matmul(&f.t()?)?;
    Ok(g.broadcast_div(&l2_norm(&g, D::Minus1, 1e-12)?)?)
}

/// PKT's conditional probabilities: cosine similarities mapped to `[0, 1]`, rows summing to 1.
fn cosine_probabilities(f: &Tensor) -> Result<Tensor> {
    let norm = (l2_norm(f, D::Minus1, 1e-30)? + 1e-7)?;
    let unit = f.broadcast_div(&norm)?;
    let c = ((unit.matmul(&unit.t()?)? + 1.0)? / 2.0)?;
    Ok(c.broadcast_div(&c.sum_keepdim(D::Minus1)?)?)
}

/// Builds a [`RelationStrategy`].
pub struct RelationFactory(pub Relation);

impl StrategyFactory for RelationFactory {
    fn summary(&self) -> &str {
        match self.0 {
            Relation::SimilarityPreserving => {
                "similarity-preserving KD (Tung & Mori): ce_weight*CE + feature_weight*||G_t - G_s||_F^2/b^2 on row-normalised batch Gram matrices; feature_weight 3000"
            }
            Relation::ProbabilisticTransfer => {
                "probabilistic knowledge transfer (Passalis & Tefas): ce_weight*CE + feature_weight*KL between cosine-similarity distributions over the batch; feature_weight 30000"
            }
        }
    }

    fn defaults(&self) -> Config {
        distill_rt::serde_json::json!({
            "student_feature": PENULTIMATE,
            "teacher_feature": PENULTIMATE,
            "ce_weight": 1.0,
            "feature_weight": self.0.default_weight(),
        })
    }

    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let owner = format!("strategy {}", self.0.name());
        let c: RelationConfig = config::parse(&owner, cfg)?;
        let ce_weight = c.ce_weight.unwrap_or(1.0);
        let feature_weight = c.feature_weight.unwrap_or(self.0.default_weight());
        config::require_weights(
            &owner,
            &[("ce_weight", ce_weight), ("feature_weight", feature_weight)],
        )?;
        Ok(Box::new(RelationStrategy {
            relation: self.0,
            owner,
            student_feature: c.student_feature.unwrap_or_else(|| PENULTIMATE.into()),
            teacher_feature: c.teacher_feature.unwrap_or_else(|| PENULTIMATE.into()),
            ce_weight,
            feature_weight,
        }))
    }
}

/// `sp` or `pkt` with its weights and features (module docs).
pub struct RelationStrategy {
    relation: Relation,
    owner: String,
    student_feature: String,
    teacher_feature: String,
    ce_weight: f64,
    feature_weight: f64,
}

impl Strategy for RelationStrategy {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::features(vec![self.teacher_feature.clone()])
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher(&self.owner, t)?;
        let f_s = feature(&self.owner, "student", s, &self.student_feature)?;
        let f_t = feature(&self.owner, "teacher", t, &self.teacher_feature)?;
        let ce = (label_loss(&s.logits, batch)? * self.ce_weight)?;
        let relation = (self.relation.loss(f_s, f_t)? * self.feature_weight)?;
        LossTerms::sum([("ce", ce), (self.relation.name(), relation)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn sp_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("sp")
    }

    #[test]
    fn pkt_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("pkt")
    }
}
