//! `multi-teacher`: several teachers teach one student together: KD from their weighted logits
//! and, per teacher, a hint through the student's own adapter to that teacher.
//!
//! `loss = alpha * CE(s, y)
//!       + (1 - alpha) * T^2 * KL(softmax(sum_i w_i t_i / T) || softmax(s / T))
//!       + feature_weight * sum_i w_i * MSE(adapter_i(h_s), h_{t_i})`
//!
//! - the teachers come from the experiment file (`teachers = [0, 1]` on the strategy entry); the
//!   strategy reads each one's logits and features under `teacher<i>.` (the engine's combined
//!   output, [`distill_rt::strategy::combine_teachers`]);
//! - `weights` `w_i` (default equal) are normalised to sum to 1; they weigh the teachers' logits
//!   (the soft target is the softmax of their weighted mean, as ensemble distillation averages
//!   logits) and their hint terms alike;
//! - KL is summed over classes and averaged over the batch, with `T^2`, exactly as `kd`
//!   (defaults `alpha = 0.1`, `temperature = 4`: with equal weights and `feature_weight = 0` the
//!   loss is `kd`'s on the teachers' mean logits);
//! - the hint: `h_s` is the student's `student_feature`, `h_{t_i}` teacher `i`'s
//!   `teacher_feature` (default `penultimate` for both), treated as constants; MSE is the mean over
//!   every element (`nn.MSELoss()`, FitNets' form). Each teacher has its own adapter (a linear
//!   layer, or a 1x1 convolution for `[c, h, w]` maps; PyTorch's default initialisation), also
//!   when the widths agree: one student feature cannot equal two different teachers' features,
//!   but it can hold a linear image of each. `feature_weight` default 1 (no reference
//!   implementation fixes it; 1 puts the hint on the scale of the KD term at the start of
//!   training on the vision pairs we ship); 0 leaves the adapters out;
//! - terms: `ce`, `kd`, `feature` (weighted, summed over teachers).
//!
//! Extra parameters: one adapter per teacher (`d_s * d_t + d_t` each). Memory: every teacher's
//! features in the cache (or every teacher running live).

use distill_rt::model::PENULTIMATE;
use distill_rt::ops::{is_relevance, label_loss};
use distill_rt::strategy::{
    StepInfo, TEACHER_LOGITS, feature, feature_shape, require_teacher, teacher_count,
    teacher_prefix,
};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config,
};

use crate::feature_mse::Adapter;
use distill_rt::kernels::kl_batchmean;

const OWNER: &str = "strategy multi-teacher";

#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct MultiTeacherConfig {
    /// Weight of each teacher (default equal); normalised to sum to 1.
    weights: Option<Vec<f64>>,
    /// Weight of the cross-entropy on labels; the KD term gets `1 - alpha`.
    alpha: f64,
    /// Softmax temperature `T`.
    temperature: f64,
    /// Weight of the hint terms (0: logits only, no adapters).
    feature_weight: f64,
    /// The student feature every adapter reads.
    student_feature: String,
    /// The feature of each teacher the adapters map to.
    teacher_feature: String,
}

impl Default for MultiTeacherConfig {
    fn default() -> Self {
        Self {
            weights: None,
            alpha: 0.1,
            temperature: 4.0,
            feature_weight: 1.0,
            student_feature: PENULTIMATE.into(),
            teacher_feature: PENULTIMATE.into(),
        }
    }
}

/// Builds [`MultiTeacher`] with one adapter per teacher.
pub struct MultiTeacherFactory;

impl StrategyFactory for MultiTeacherFactory {
    fn summary(&self) -> &str {
        "several teachers together (`teachers = [0, 1]` in the experiment): alpha*CE + (1-alpha)*T^2*KL to the softmax of their weighted mean logits + feature_weight*sum_i w_i*MSE(adapter_i(h_s), h_t_i); alpha 0.1, T 4, feature_weight 1, equal weights"
    }

    fn defaults(&self) -> Config {
        distill_rt::serde_json::to_value(MultiTeacherConfig::default()).unwrap_or(Config::Null)
    }

    fn build(&self, cfg: &Config, ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: MultiTeacherConfig = config::parse(OWNER, cfg)?;
        if !(0.0..=1.0).contains(&c.alpha) {
            return Err(Error::config(
                OWNER,
                "alpha",
                format!("must be in [0, 1], got {}", c.alpha),
            ));
        }
        config::require_scales(OWNER, &[("temperature", c.temperature)])?;
        config::require_weights(OWNER, &[("feature_weight", c.feature_weight)])?;
        let teachers = teacher_count(ctx.teacher_features.keys());
        if teachers < 2 {
            return Err(Error::Invalid(format!(
                "{OWNER} needs several teachers together: name them on its strategy entry \
                 (`teachers = [0, 1]`, indices into [[teachers]])"
            )));
        }
        let weights = match &c.weights {
            None => vec![1.0 / teachers as f64; teachers],
            Some(w) if w.len() != teachers => {
                return Err(Error::config(
                    OWNER,
                    "weights",
                    format!("has {} values for {teachers} teachers", w.len()),
                ));
            }
            Some(w) => {
                let named: Vec<(String, f64)> = w
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("weights[{i}]"), *v))
                    .collect();
                let pairs: Vec<(&str, f64)> = named.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                config::require_weights(OWNER, &pairs)?;
                let sum: f64 = w.iter().sum();
                if sum <= 0.0 {
                    return Err(Error::config(OWNER, "weights", "must not all be 0"));
                }
                w.iter().map(|v| v / sum).collect()
            }
        };
        let mut adapters = Vec::new();
        if c.feature_weight > 0.0 {
            let s = feature_shape(OWNER, "student", ctx.student_features, &c.student_feature)?;
            for i in 0..teachers {
                let name = format!("{}{}", teacher_prefix(i), c.teacher_feature);
                let t = feature_shape(OWNER, "teacher", ctx.teacher_features, &name)?;
                adapters.push(Adapter::between(
                    OWNER,
                    (&c.student_feature, s),
                    (&name, t),
                    ctx.vb.pp(format!("adapter{i}")),
                )?);
            }
        }
        Ok(Box::new(MultiTeacher {
            config: c,
            weights,
            adapters,
        }))
    }
}

/// KD from several teachers with per-teacher hints (module docs).
pub struct MultiTeacher {
    config: MultiTeacherConfig,
    /// Normalised teacher weights.
    weights: Vec<f64>,
    /// One per teacher; empty when `feature_weight` is 0.
    adapters: Vec<Adapter>,
}

impl MultiTeacher {
    fn teacher_feature(&self, i: usize) -> String {
        format!("{}{}", teacher_prefix(i), self.config.teacher_feature)
    }
}

impl Strategy for MultiTeacher {
    fn teacher_needs(&self) -> TeacherNeeds {
        let mut features: Vec<String> = (0..self.weights.len())
            .map(|i| format!("{}{TEACHER_LOGITS}", teacher_prefix(i)))
            .collect();
        if !self.adapters.is_empty() {
            features.extend((0..self.weights.len()).map(|i| self.teacher_feature(i)));
        }
        TeacherNeeds::features(features)
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher(OWNER, t)?;
        if is_relevance(&s.logits, &batch.targets) {
            return Err(Error::Invalid(format!(
                "{OWNER} distils class distributions; this task ranks (use `kd` on the teachers' mean scores)"
            )));
        }
        let mut target = s.logits.zeros_like()?;
        for (i, w) in self.weights.iter().enumerate() {
            let logits = feature(
                OWNER,
                "teacher",
                t,
                &format!("{}{TEACHER_LOGITS}", teacher_prefix(i)),
            )?;
            target = (target + (logits.detach() * *w)?)?;
        }
        let c = &self.config;
        let ce = (label_loss(&s.logits, batch)? * c.alpha)?;
        let kd = (kl_batchmean(&s.logits, &target, c.temperature)?
            * ((1.0 - c.alpha) * c.temperature * c.temperature))?;
        let mut hint = ce.zeros_like()?;
        if !self.adapters.is_empty() {
            let h_s = feature(OWNER, "student", s, &c.student_feature)?;
            for (i, (adapter, w)) in self.adapters.iter().zip(&self.weights).enumerate() {
                let h_t = feature(OWNER, "teacher", t, &self.teacher_feature(i))?;
                let mse = (adapter.forward(h_s)? - h_t.detach())?.sqr()?.mean_all()?;
                hint = (hint + (mse * *w)?)?;
            }
        }
        let hint = (hint * c.feature_weight)?;
        LossTerms::sum([("ce", ce), ("kd", kd), ("feature", hint)])
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{check_golden, golden_cases};

    #[test]
    fn multi_teacher_matches_golden_values() -> distill_rt::Result<()> {
        let cases = golden_cases("multi-teacher");
        assert!(
            cases
                .iter()
                .any(|c| c.inputs.contains_key("var.adapter1.weight")),
            "a case with both teachers' adapters"
        );
        check_golden("multi-teacher")
    }
}
