//! `feature-mse`: basic feature matching (the brief's formula; FitNets' hint loss, Romero et al.).
//!
//! `loss = ce_weight * CE(s, y) + feature_weight * 0.5 * ||adapter(h_s) - h_t||^2 / batch`
//!
//! - the squared norm is summed over every non-batch dimension and averaged over the batch;
//! - `h_s`, `h_t` are the student's `student_feature` and the teacher's `teacher_feature`
//!   (default `penultimate` for both); the teacher's is treated as a constant;
//! - when the widths differ, a learned adapter maps the student's feature to the teacher's width:
//!   a linear layer for `[batch, d]` features, a 1x1 convolution for `[batch, c, h, w]` ones
//!   (spatial sizes must agree). It is initialised as PyTorch initialises `nn.Linear`/`nn.Conv2d`
//!   (weight and bias uniform in `±1/sqrt(fan_in)`) and trains with the student;
//! - defaults `ce_weight = 1`, `feature_weight = 1`;
//! - terms: `ce`, `feature` (both weighted).
//!
//! `fitnets` is the same matching with RepDistiller's hint loss: `nn.MSELoss()` (the mean over
//! every element, not half the per-sample sum), `feature_weight = 100`, and Romero et al.'s
//! hint stage: for the first `hint_epochs` epochs (default 0, as RepDistiller trains jointly)
//! the loss is the hint term alone. The regressor is the linear / 1x1 adapter above, without
//! RepDistiller's batch norm and ReLU (a batch norm would carry running statistics the strategy
//! contract has no place for). Terms `ce`, `hint`.

use distill_rt::candle::Tensor;
use distill_rt::candle_nn::{Init, VarBuilder};
use distill_rt::model::PENULTIMATE;
use distill_rt::ops::label_loss;
use distill_rt::strategy::{StepInfo, feature, feature_shape, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config,
};

#[derive(distill_rt::serde::Deserialize, Clone, Debug, Default)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct MatchingConfig {
    student_feature: Option<String>,
    teacher_feature: Option<String>,
    ce_weight: Option<f64>,
    feature_weight: Option<f64>,
    hint_epochs: Option<usize>,
}

/// Which feature-matching loss a [`FeatureMseFactory`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matching {
    /// `feature-mse`: half the squared distance summed per sample, averaged over the batch.
    HalfSquared,
    /// `fitnets`: the mean squared error over every element, with an optional hint stage.
    FitNets,
}

impl Matching {
    fn owner(self) -> &'static str {
        match self {
            Matching::HalfSquared => "strategy feature-mse",
            Matching::FitNets => "strategy fitnets",
        }
    }
}

#[derive(distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde")]
struct FeatureMseConfig {
    student_feature: String,
    teacher_feature: String,
    ce_weight: f64,
    feature_weight: f64,
    /// `fitnets` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint_epochs: Option<usize>,
}

impl Matching {
    /// `raw` with this matching's defaults filled in.
    fn resolve(self, raw: MatchingConfig) -> FeatureMseConfig {
        const FITNETS_WEIGHT: f64 = 100.0;
        FeatureMseConfig {
            student_feature: raw.student_feature.unwrap_or_else(|| PENULTIMATE.into()),
            teacher_feature: raw.teacher_feature.unwrap_or_else(|| PENULTIMATE.into()),
            ce_weight: raw.ce_weight.unwrap_or(1.0),
            feature_weight: raw.feature_weight.unwrap_or(match self {
                Matching::HalfSquared => 1.0,
                Matching::FitNets => FITNETS_WEIGHT,
            }),
            hint_epochs: match self {
                Matching::HalfSquared => None,
                Matching::FitNets => Some(raw.hint_epochs.unwrap_or(0)),
            },
        }
    }
}

/// Builds [`FeatureMse`], creating the adapter when the feature widths differ.
pub struct FeatureMseFactory(pub Matching);

impl StrategyFactory for FeatureMseFactory {
    fn summary(&self) -> &str {
        match self.0 {
            Matching::HalfSquared => {
                "feature matching: CE + 0.5*||adapter(h_s) - h_t||^2 averaged over the batch, learned adapter when widths differ"
            }
            Matching::FitNets => {
                "FitNets hint (RepDistiller's form): ce_weight*CE + feature_weight*MSE(adapter(h_s), h_t) over every element; feature_weight 100, hint_epochs 0 (hint-only first epochs)"
            }
        }
    }

    fn defaults(&self) -> Config {
        distill_rt::serde_json::to_value(self.0.resolve(MatchingConfig::default()))
            .unwrap_or(Config::Null)
    }

    fn build(&self, cfg: &Config, ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let owner = self.0.owner();
        let raw: MatchingConfig = config::parse(owner, cfg)?;
        if self.0 == Matching::HalfSquared && raw.hint_epochs.is_some() {
            return Err(Error::config(
                owner,
                "hint_epochs",
                "is a `fitnets` setting (a hint-only first stage)",
            ));
        }
        let c = self.0.resolve(raw);
        config::require_weights(
            owner,
            &[
                ("ce_weight", c.ce_weight),
                ("feature_weight", c.feature_weight),
            ],
        )?;
        let s = feature_shape(owner, "student", ctx.student_features, &c.student_feature)?;
        let t = feature_shape(owner, "teacher", ctx.teacher_features, &c.teacher_feature)?;
        let adapter = if s == t {
            None
        } else {
            Some(Adapter::between(
                owner,
                (&c.student_feature, s),
                (&c.teacher_feature, t),
                ctx.vb.pp("adapter"),
            )?)
        };
        Ok(Box::new(FeatureMse {
            matching: self.0,
            config: c,
            adapter,
        }))
    }
}

/// A learned linear map of a feature's width: a linear layer for `[batch, d]` features, a 1x1
/// convolution for `[batch, c, h, w]` ones; initialised as PyTorch initialises
/// `nn.Linear`/`nn.Conv2d` (weight and bias uniform in `±1/sqrt(fan_in)`).
pub struct Adapter {
    /// `[out, in]`, or `[out, in, 1, 1]` for the convolution.
    weight: Tensor,
    bias: Tensor,
    conv: bool,
}

impl Adapter {
    /// The adapter from the student feature `(name, shape)` to the teacher's, with its variables
    /// `weight` and `bias` in `vb`; an error when more than the width differs.
    pub fn between(
        owner: &str,
        (s_name, s): (&str, &[usize]),
        (t_name, t): (&str, &[usize]),
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let (input, output, conv) = match (s, t) {
            ([ds], [dt]) => (*ds, *dt, false),
            ([cs, hs, ws], [ct, ht, wt]) if (hs, ws) == (ht, wt) => (*cs, *ct, true),
            _ => {
                return Err(Error::Invalid(format!(
                    "{owner}: student feature `{s_name}` {s:?} cannot be mapped to teacher feature `{t_name}` {t:?}: \
                     only the width (last dim of [d], channels of [c, h, w]) may differ"
                )));
            }
        };
        let bound = 1.0 / (input as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = if conv {
            vb.get_with_hints((output, input, 1, 1), "weight", init)?
        } else {
            vb.get_with_hints((output, input), "weight", init)?
        };
        let bias = vb.get_with_hints(output, "bias", init)?;
        Ok(Self { weight, bias, conv })
    }

    /// Maps a batch of student features.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        if !self.conv {
            return Ok(h.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?);
        }
        let (b, c, height, width) = h.dims4()?;
        let out = self.weight.dim(0)?;
        let w = self.weight.reshape((out, c))?;
        let flat = h.permute((0, 2, 3, 1))?.reshape((b * height * width, c))?;
        let y = flat.matmul(&w.t()?)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((b, height, width, out))?.permute((0, 3, 1, 2))?)
    }
}

/// Feature matching with pinned conventions (module docs).
pub struct FeatureMse {
    matching: Matching,
    config: FeatureMseConfig,
    adapter: Option<Adapter>,
}

/// `0.5 * ||h_s - h_t||^2` summed over non-batch dimensions, averaged over the batch.
pub fn half_squared_error(h_s: &Tensor, h_t: &Tensor) -> Result<Tensor> {
    let batch = h_s.dim(0)? as f64;
    let sq = (h_s - h_t.detach())?.sqr()?.sum_all()?;
    Ok((sq * (0.5 / batch))?)
}

impl Strategy for FeatureMse {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::features(vec![self.config.teacher_feature.clone()])
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        let owner = self.matching.owner();
        let t = require_teacher(owner, t)?;
        let h_s = feature(owner, "student", s, &self.config.student_feature)?;
        let h_t = feature(owner, "teacher", t, &self.config.teacher_feature)?;
        let h_s = match &self.adapter {
            Some(a) => a.forward(h_s)?,
            None => h_s.clone(),
        };
        if h_s.dims() != h_t.dims() {
            return Err(Error::Invalid(format!(
                "{owner}: student feature {:?} and teacher feature {:?} differ in shape",
                h_s.dims(),
                h_t.dims()
            )));
        }
        let hint_stage = step.epoch < self.config.hint_epochs.unwrap_or(0);
        let ce_weight = if hint_stage {
            0.0
        } else {
            self.config.ce_weight
        };
        let ce = (label_loss(&s.logits, batch)? * ce_weight)?;
        let (name, distance) = match self.matching {
            Matching::HalfSquared => ("feature", half_squared_error(&h_s, h_t)?),
            Matching::FitNets => ("hint", (&h_s - h_t.detach())?.sqr()?.mean_all()?),
        };
        let feat = (distance * self.config.feature_weight)?;
        LossTerms::sum([("ce", ce), (name, feat)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{check_golden, golden_cases, run_case};

    #[test]
    fn feature_mse_matches_golden_values() -> distill_rt::Result<()> {
        let cases = golden_cases("feature-mse");
        assert!(cases.len() >= 3);
        assert!(
            cases
                .iter()
                .any(|c| c.inputs.contains_key("var.adapter.weight")),
            "an unequal-width case"
        );
        for case in &cases {
            run_case(case)?;
        }
        Ok(())
    }

    #[test]
    fn fitnets_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("fitnets")
    }
}
