//! `at`: attention transfer (Zagoruyko & Komodakis 2017), activation-based, as RepDistiller and
//! the authors' code compute it.
//!
//! For a feature map `F` (`[b, c, h, w]`) the attention map is `a(F) = normalize(mean_c |F|^p)`,
//! flattened to `[b, h*w]` and L2-normalised per sample (`F.normalize`: divided by
//! `max(||x||, 1e-12)`). For each (student, teacher) feature pair the loss is
//! `mean over b and h*w of (a(F_s) - a(F_t))^2`; when the spatial sizes differ, the larger map is
//! average-pooled to the smaller (an integer factor; RepDistiller's `adaptive_avg_pool2d`).
//!
//! `loss = ce_weight * CE + feature_weight * sum_pairs loss_pair`. Defaults `p = 2`,
//! `feature_weight = 1000`, `ce_weight = 1` (RepDistiller's `-b 1000`; the authors' code writes
//! `beta / 2` with `beta = 1000`, i.e. 500, on the same per-pair means). `|F|^p` equals `F^p` of
//! the reference code for the default even `p`. Features: `student_features` and
//! `teacher_features`, lists of equal length naming feature maps (`[c, h, w]` without the
//! batch; the widths may differ, no adapter). Terms `ce` and `at`, weighted. No trainable
//! parameters; memory: one `[b, h*w]` map per feature and side.

use std::collections::BTreeMap;

use distill_rt::candle::{D, Tensor};
use distill_rt::ops::{l2_norm, label_loss};
use distill_rt::strategy::{StepInfo, feature, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config, model::PENULTIMATE,
};

const OWNER: &str = "strategy at";

#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct AtConfig {
    student_features: Vec<String>,
    teacher_features: Vec<String>,
    p: f64,
    ce_weight: f64,
    feature_weight: f64,
}

impl Default for AtConfig {
    fn default() -> Self {
        Self {
            student_features: vec![PENULTIMATE.into()],
            teacher_features: vec![PENULTIMATE.into()],
            p: 2.0,
            ce_weight: 1.0,
            feature_weight: 1000.0,
        }
    }
}

/// Builds [`At`].
pub struct AtFactory;

/// Checks that every named feature exists on its side and is a map `[c, h, w]`.
fn check_maps(key: &str, names: &[String], shapes: &BTreeMap<String, Vec<usize>>) -> Result<()> {
    for name in names {
        match shapes.get(name) {
            Some(shape) if shape.len() == 3 => {}
            Some(shape) => {
                return Err(Error::config(
                    OWNER,
                    key,
                    format!(
                        "feature `{name}` has shape {shape:?}; attention needs a map [c, h, w]"
                    ),
                ));
            }
            None if shapes.is_empty() => {}
            None => {
                return Err(Error::config(
                    OWNER,
                    key,
                    format!(
                        "no feature `{name}`; the model has {}",
                        shapes.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl StrategyFactory for AtFactory {
    fn summary(&self) -> &str {
        "attention transfer (Zagoruyko & Komodakis): ce_weight*CE + feature_weight*sum over feature pairs of mean((a_s - a_t)^2), a = normalize(mean_c |F|^p); p 2, feature_weight 1000"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<AtConfig>()
    }

    fn build(&self, cfg: &Config, ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: AtConfig = config::parse(OWNER, cfg)?;
        config::require_weights(
            OWNER,
            &[
                ("ce_weight", c.ce_weight),
                ("feature_weight", c.feature_weight),
            ],
        )?;
        config::require_scales(OWNER, &[("p", c.p)])?;
        if c.student_features.is_empty() || c.student_features.len() != c.teacher_features.len() {
            return Err(Error::config(
                OWNER,
                "teacher_features",
                format!(
                    "needs one teacher feature per student feature ({} student, {} teacher)",
                    c.student_features.len(),
                    c.teacher_features.len()
                ),
            ));
        }
        check_maps(
            "student_features",
            &c.student_features,
            ctx.student_features,
        )?;
        check_maps(
            "teacher_features",
            &c.teacher_features,
            ctx.teacher_features,
        )?;
        Ok(Box::new(At { config: c }))
    }
}

/// The attention-transfer loss (module docs).
pub struct At {
    config: AtConfig,
}

/// `normalize(mean_c |f|^p)` flattened per sample: `[b, h*w]`.
fn attention(f: &Tensor, p: f64) -> Result<Tensor> {
    let b = f.dim(0)?;
    let powered = if p == 2.0 {
        f.sqr()?
    } else {
        f.abs()?.powf(p)?
    };
    let map = powered.mean(1)?.reshape((b, ()))?;
    Ok(map.broadcast_div(&l2_norm(&map, D::Minus1, 1e-12)?)?)
}

/// Average-pools `f` (`[b, c, h, w]`) down to `size` (`[h', w']`) by an integer factor.
fn pool_to(f: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    let (h, w) = (f.dim(2)?, f.dim(3)?);
    if (h, w) == size {
        return Ok(f.clone());
    }
    if h % size.0 != 0 || w % size.1 != 0 || h / size.0 != w / size.1 {
        return Err(Error::Invalid(format!(
            "{OWNER}: cannot pool a {h}x{w} map to {}x{} by one integer factor",
            size.0, size.1
        )));
    }
    let k = h / size.0;
    Ok(f.avg_pool2d((k, k))?)
}

impl Strategy for At {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::features(self.config.teacher_features.clone())
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher(OWNER, t)?;
        let c = &self.config;
        let mut at = Tensor::zeros((), s.logits.dtype(), s.logits.device())?;
        for (sn, tn) in c.student_features.iter().zip(&c.teacher_features) {
            let f_s = feature(OWNER, "student", s, sn)?;
            let f_t = feature(OWNER, "teacher", t, tn)?.detach();
            if f_s.rank() != 4 || f_t.rank() != 4 {
                return Err(Error::Invalid(format!(
                    "{OWNER}: `{sn}` {:?} and `{tn}` {:?} must be maps [b, c, h, w]",
                    f_s.dims(),
                    f_t.dims()
                )));
            }
            let size = (f_s.dim(2)?.min(f_t.dim(2)?), f_s.dim(3)?.min(f_t.dim(3)?));
            let a_s = attention(&pool_to(f_s, size)?, c.p)?;
            let a_t = attention(&pool_to(&f_t, size)?, c.p)?;
            at = (at + (a_s - a_t)?.sqr()?.mean_all()?)?;
        }
        let ce = (label_loss(&s.logits, batch)? * c.ce_weight)?;
        let at = (at * c.feature_weight)?;
        LossTerms::sum([("ce", ce), ("at", at)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::check_golden;

    #[test]
    fn at_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("at")
    }
}
