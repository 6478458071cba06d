//! `ranking-kd`: Ranking Distillation (Tang & Wang, KDD 2018), for tasks whose logits score
//! candidates and whose targets are relevance (a recommender scoring every item).
//!
//! For each row (a user), the teacher's top-`k` candidates that are not positives (relevance
//! not 1: unlabelled or sampled negatives) are extra positives for the student:
//!
//! `loss = (sum_labelled bce + alpha * sum_rows sum_{r=1..k} w_r * -log sigmoid(s_{pi_r})) / n`
//!
//! with `n` the number of labelled candidates in the batch: the extra positives are averaged
//! on the same scale as the label loss (`distill_rt::ops::label_loss`, NCF's binary
//! cross-entropy over each positive and its sampled negatives), so with `alpha = 1` each row
//! gains `k` positives of mean weight 1 besides its own.
//! - position weights `w_r = exp(-r / lambda)`, normalised to mean 1 over the `k` places;
//! - with `weighting = "hybrid"` (the paper's hybrid weighting), each is multiplied by the
//!   ranking-discrepancy factor `tanh(max(mu * (rank_s - r), 0))`, `rank_s` the student's rank
//!   (1-based) of that candidate among the same candidates: items the student already ranks at
//!   least as high as the teacher stop pulling. The factors are not renormalised, so the term
//!   fades as the student catches up. `weighting = "position"` uses the position weights alone;
//! - weights and the teacher's ranking are constants (no gradient flows through them);
//! - defaults `k = 10`, `alpha = 1`, `lambda = 5`, `mu = 0.1`, `weighting = "hybrid"`. The
//!   paper's own values depend on the data set; these are this project's, chosen so the
//!   weights fall by about 6x from the first place to the tenth.
//!
//! Terms `ce` and `rd` (weighted). Reads the teacher's logits only, so a cached teacher works
//! when the candidate set is fixed (every item).

use distill_rt::candle::{DType, Tensor};
use distill_rt::ops::{is_relevance, label_loss, labelled, log_sigmoid};
use distill_rt::serde::Deserialize;
use distill_rt::strategy::{StepInfo, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config,
};

const OWNER: &str = "strategy ranking-kd";

/// How the teacher's top places are weighted.
#[derive(Deserialize, distill_rt::serde::Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(crate = "distill_rt::serde", rename_all = "lowercase")]
enum Weighting {
    /// Position importance only.
    Position,
    /// Position importance times ranking discrepancy.
    Hybrid,
}

#[derive(Deserialize, distill_rt::serde::Serialize, Clone, Copy, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct RankingKdConfig {
    k: usize,
    alpha: f64,
    lambda: f64,
    mu: f64,
    weighting: Weighting,
}

impl Default for RankingKdConfig {
    fn default() -> Self {
        Self {
            k: 10,
            alpha: 1.0,
            lambda: 5.0,
            mu: 0.1,
            weighting: Weighting::Hybrid,
        }
    }
}

/// Builds [`RankingKd`].
pub struct RankingKdFactory;

impl StrategyFactory for RankingKdFactory {
    fn summary(&self) -> &str {
        "ranking distillation (Tang & Wang 2018): BCE + alpha * weighted -log sigmoid on the teacher's top-k unobserved candidates; k 10, alpha 1, lambda 5, mu 0.1, hybrid weighting"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<RankingKdConfig>()
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: RankingKdConfig = config::parse(OWNER, cfg)?;
        config::require_positive(OWNER, &[("k", c.k)])?;
        config::require_weights(OWNER, &[("alpha", c.alpha), ("mu", c.mu)])?;
        config::require_scales(OWNER, &[("lambda", c.lambda)])?;
        let raw: Vec<f64> = (1..=c.k).map(|r| (-(r as f64) / c.lambda).exp()).collect();
        let mean = raw.iter().sum::<f64>() / c.k as f64;
        Ok(Box::new(RankingKd {
            config: c,
            position: raw.iter().map(|w| w / mean).collect(),
        }))
    }
}

/// The ranking-distillation loss (module docs).
pub struct RankingKd {
    config: RankingKdConfig,
    /// Position weights of places 1..=k, mean 1.
    position: Vec<f64>,
}

impl RankingKd {
    /// For each row, the teacher's top-k non-positive candidates and their weights (`[b, k]`
    /// each; rows with fewer candidates are padded with weight 0).
    fn targets(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        relevance: &Tensor,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let k = self.config.k;
        let s = student.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let t = teacher.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let rel = relevance.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let (mut index, mut weight) = (Vec::with_capacity(s.len() * k), Vec::new());
        for ((s_row, t_row), rel_row) in s.iter().zip(&t).zip(&rel) {
            let mut candidates: Vec<usize> =
                (0..rel_row.len()).filter(|&j| rel_row[j] < 1.0).collect();
            candidates.sort_by(|&a, &b| t_row[b].total_cmp(&t_row[a]).then(a.cmp(&b)));
            for place in 0..k {
                let Some(&item) = candidates.get(place) else {
                    index.push(0);
                    weight.push(0.0);
                    continue;
                };
                let mut w = self.position[place];
                if self.config.weighting == Weighting::Hybrid {
                    let score = s_row[item];
                    let above = candidates.iter().filter(|&&j| s_row[j] > score).count();
                    let gap = (above + 1) as f64 - (place + 1) as f64;
                    w *= (self.config.mu * gap).max(0.0).tanh();
                }
                index.push(item as u32);
                weight.push(w as f32);
            }
        }
        Ok((index, weight))
    }
}

impl Strategy for RankingKd {
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
        if !is_relevance(&s.logits, &batch.targets) || s.logits.rank() != 2 {
            return Err(Error::Invalid(format!(
                "{OWNER} needs scores over candidates ([batch, candidates]) with relevance \
                 targets of the same shape (a ranking task); got logits {:?}, targets {:?}",
                s.logits.dims(),
                batch.targets.dims()
            )));
        }
        let ce = label_loss(&s.logits, batch)?;
        let (rows, k) = (s.logits.dim(0)?, self.config.k);
        let (index, weight) = self.targets(&s.logits, &t.logits, &batch.targets)?;
        let device = s.logits.device();
        let index = Tensor::from_vec(index, (rows, k), device)?;
        let weight = Tensor::from_vec(weight, (rows, k), device)?.to_dtype(s.logits.dtype())?;
        let picked = s.logits.gather(&index, 1)?;
        let rd = (log_sigmoid(&picked)? * weight)?.sum_all()?.neg()?;
        let labelled = labelled(&batch.targets, DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let rd = (rd * (self.config.alpha / labelled.max(1.0)))?;
        LossTerms::sum([("ce", ce), ("rd", rd)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn ranking_kd_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("ranking-kd")
    }
}
