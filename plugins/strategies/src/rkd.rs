//! `rkd`: relational knowledge distillation (Park et al. 2019), distance and angle terms, as
//! RepDistiller computes them.
//!
//! With `F` the features flattened per sample (`[b, d]`):
//! - distance: pairwise Euclidean distances (`sqrt` of the squared distances clamped at
//!   `1e-12`, diagonal 0), each side divided by the mean of its off-diagonal entries;
//!   smooth-L1 (beta 1) between student and teacher, averaged over the `b^2` entries;
//! - angle: for every triple `(i, j, k)` the cosine between `F_j - F_i` and `F_k - F_i` (the
//!   differences L2-normalised with `1e-12` as the smallest norm); smooth-L1 averaged over `b^3`.
//!
//! `loss = ce_weight * CE + distance_weight * distance + angle_weight * angle`; defaults 1, 25, 50
//! (RepDistiller's `w_d`, `w_a`); terms `ce`, `distance`, `angle`, reported weighted. Features
//! `penultimate` on both sides by default; the teacher's are constants. No trainable
//! parameters; memory: a `b x b x d` difference tensor per side for the angle term.

use distill_rt::candle::{D, DType, Tensor};
use distill_rt::ops::{l2_norm, label_loss};
use distill_rt::strategy::{StepInfo, feature, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config, model::PENULTIMATE,
};

const OWNER: &str = "strategy rkd";

#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct RkdConfig {
    student_feature: String,
    teacher_feature: String,
    ce_weight: f64,
    distance_weight: f64,
    angle_weight: f64,
}

impl Default for RkdConfig {
    fn default() -> Self {
        Self {
            student_feature: PENULTIMATE.into(),
            teacher_feature: PENULTIMATE.into(),
            ce_weight: 1.0,
            distance_weight: 25.0,
            angle_weight: 50.0,
        }
    }
}

/// Builds [`Rkd`].
pub struct RkdFactory;

impl StrategyFactory for RkdFactory {
    fn summary(&self) -> &str {
        "relational KD (Park et al.): ce_weight*CE + distance_weight*smoothL1(normalised pairwise distances) + angle_weight*smoothL1(triplet angles); 1, 25, 50"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<RkdConfig>()
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: RkdConfig = config::parse(OWNER, cfg)?;
        config::require_weights(
            OWNER,
            &[
                ("ce_weight", c.ce_weight),
                ("distance_weight", c.distance_weight),
                ("angle_weight", c.angle_weight),
            ],
        )?;
        Ok(Box::new(Rkd { config: c }))
    }
}

/// The RKD loss (module docs).
pub struct Rkd {
    config: RkdConfig,
}

/// Mean of `0.5 x^2` where `|x| < 1` and `|x| - 0.5` elsewhere (PyTorch's `smooth_l1_loss`).
fn smooth_l1(x: &Tensor) -> Result<Tensor> {
    let a = x.abs()?;
    let small = a.lt(1.0)?.to_dtype(x.dtype())?;
    let quadratic = (x.sqr()? * 0.5)?;
    let linear = (a - 0.5)?;
    let blended = ((&small * quadratic)? + ((1.0 - &small)? * linear)?)?;
    Ok(blended.mean_all()?)
}

/// Pairwise distances of the rows of `f` (`[b, d]`), diagonal 0, divided by the mean of the
/// off-diagonal entries.
fn normalised_distances(f: &Tensor) -> Result<Tensor> {
    let b = f.dim(0)?;
    let sq = f.sqr()?.sum(D::Minus1)?;
    let d2 = (sq.unsqueeze(1)?.broadcast_add(&sq.unsqueeze(0)?)? - (f.matmul(&f.t()?)? * 2.0)?)?;
    let off_diagonal = (1.0 - Tensor::eye(b, f.dtype(), f.device())?)?;
    let d = (d2.clamp(1e-12, f64::MAX)?.sqrt()? * off_diagonal)?;
    let mean = (d.sum_all()? / (b * (b - 1)).max(1) as f64)?;
    Ok(d.broadcast_div(&mean)?)
}

/// Cosines of the angle at `F_i` between `F_j` and `F_k`: `[b, b, b]`.
fn angles(f: &Tensor) -> Result<Tensor> {
    let diff = f.unsqueeze(0)?.broadcast_sub(&f.unsqueeze(1)?)?;
    let norm = l2_norm(&diff, D::Minus1, 1e-12)?;
    let unit = diff.broadcast_div(&norm)?;
    Ok(unit.matmul(&unit.transpose(1, 2)?.contiguous()?)?)
}

impl Strategy for Rkd {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::features(vec![self.config.teacher_feature.clone()])
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher(OWNER, t)?;
        let f_s = feature(OWNER, "student", s, &self.config.student_feature)?;
        let f_t = feature(OWNER, "teacher", t, &self.config.teacher_feature)?;
        let b = f_s.dim(0)?;
        if f_t.dim(0)? != b {
            return Err(Error::Invalid(format!(
                "{OWNER}: student and teacher batches differ ({b} vs {})",
                f_t.dim(0)?
            )));
        }
        let f_s = f_s.reshape((b, ()))?;
        let f_t = f_t.detach().reshape((b, ()))?.to_dtype(f_s.dtype())?;
        let ce = (label_loss(&s.logits, batch)? * self.config.ce_weight)?;
        let distance = (smooth_l1(&(normalised_distances(&f_s)? - normalised_distances(&f_t)?)?)?
            * self.config.distance_weight)?;
        let angle = if self.config.angle_weight == 0.0 {
            Tensor::zeros((), DType::F32, f_s.device())?.to_dtype(f_s.dtype())?
        } else {
            (smooth_l1(&(angles(&f_s)? - angles(&f_t)?)?)? * self.config.angle_weight)?
        };
        LossTerms::sum([("ce", ce), ("distance", distance), ("angle", angle)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn rkd_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("rkd")
    }
}
