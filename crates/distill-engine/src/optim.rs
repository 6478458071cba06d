//! Optimizers (AdamW, SGD with momentum) and learning-rate schedules (constant, cosine, step,
//! multi-step; a linear warm-up in front of any).
//!
//! Conventions follow PyTorch: AdamW decouples weight decay (`p -= lr * wd * p`), betas
//! (0.9, 0.999), eps 1e-8; SGD adds weight decay to the gradient (`g + wd * p`), then momentum
//! `buf = m * buf + g`, `p -= lr * buf`. Variables without a gradient in a step are left alone.

use distill_rt::candle::backprop::GradStore;
use distill_rt::candle::{DType, Tensor, Var};
use distill_rt::serde::{Deserialize, Serialize};
use distill_rt::{Error, Result, kernels};

/// Which optimizer, with its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "distill_rt::serde",
    tag = "name",
    rename_all = "lowercase",
    deny_unknown_fields
)]
pub enum OptimizerConfig {
    /// AdamW (Loshchilov & Hutter).
    AdamW {
        /// Peak learning rate.
        lr: f64,
        /// Decoupled weight decay.
        #[serde(default)]
        weight_decay: f64,
    },
    /// SGD with (heavy-ball) momentum and L2 weight decay.
    Sgd {
        /// Peak learning rate.
        lr: f64,
        /// Momentum factor.
        #[serde(default = "default_momentum")]
        momentum: f64,
        /// L2 weight decay.
        #[serde(default)]
        weight_decay: f64,
    },
}

fn default_momentum() -> f64 {
    0.9
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::AdamW {
            lr: 1e-3,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// The peak learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::AdamW { lr, .. } | OptimizerConfig::Sgd { lr, .. } => *lr,
        }
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let (lr, wd, momentum) = match self {
            OptimizerConfig::AdamW { lr, weight_decay } => (*lr, *weight_decay, 0.0),
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            } => (*lr, *weight_decay, *momentum),
        };
        distill_rt::config::require_scales("optimizer", &[("lr", lr)])?;
        if !(wd >= 0.0 && wd.is_finite()) {
            return Err(Error::config(
                "optimizer",
                "weight_decay",
                format!("must be >= 0, got {wd}"),
            ));
        }
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::config(
                "optimizer",
                "momentum",
                format!("must be in [0, 1), got {momentum}"),
            ));
        }
        Ok(())
    }
}

/// Learning-rate schedule over the optimizer steps of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "distill_rt::serde",
    tag = "name",
    rename_all = "lowercase",
    deny_unknown_fields
)]
pub enum Schedule {
    /// The peak rate throughout.
    #[default]
    Constant,
    /// Cosine decay from the peak to zero over all steps (Loshchilov & Hutter, no restarts).
    Cosine,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: usize,
        /// Decay factor.
        gamma: f64,
    },
    /// Multiply by `gamma` at each of the given epochs (PyTorch's `MultiStepLR`; RepDistiller:
    /// x0.1 at 150, 180 and 210).
    #[serde(rename = "multistep")]
    MultiStep {
        /// Epochs (zero-based) from which the next factor applies, increasing.
        milestones: Vec<usize>,
        /// Decay factor.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

fn default_gamma() -> f64 {
    0.1
}

impl Schedule {
    /// The rate at `step` of `total` steps (`steps_per_epoch` steps per epoch).
    pub fn rate(&self, peak: f64, step: usize, total: usize, steps_per_epoch: usize) -> f64 {
        match self {
            Schedule::Constant => peak,
            Schedule::Cosine => {
                let t = step as f64 / total.max(1) as f64;
                0.5 * peak * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Schedule::Step { every, gamma } => {
                let epoch = step / steps_per_epoch.max(1);
                peak * gamma.powi((epoch / (*every).max(1)) as i32)
            }
            Schedule::MultiStep { milestones, gamma } => {
                let epoch = step / steps_per_epoch.max(1);
                let passed = milestones.iter().filter(|m| **m <= epoch).count();
                peak * gamma.powi(passed as i32)
            }
        }
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        match self {
            Schedule::Step { every: 0, .. } => {
                Err(Error::config("train", "schedule.every", "must be > 0"))
            }
            Schedule::Step { gamma, .. } | Schedule::MultiStep { gamma, .. }
                if !(gamma.is_finite() && *gamma > 0.0) =>
            {
                Err(Error::config(
                    "train",
                    "schedule.gamma",
                    format!("must be > 0, got {gamma}"),
                ))
            }
            Schedule::MultiStep { milestones, .. }
                if milestones.windows(2).any(|w| w[0] >= w[1]) =>
            {
                Err(Error::config(
                    "train",
                    "schedule.milestones",
                    format!("must increase, got {milestones:?}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// An optimizer over a fixed list of variables.
pub struct Optimizer {
    config: OptimizerConfig,
    vars: Vec<Var>,
    /// AdamW: the packed moments `[m; v]` (updated in place, `kernels::adamw_step`); SGD:
    /// momentum buffers.
    state: Vec<Option<Tensor>>,
    steps: Vec<i32>,
}

impl Optimizer {
    /// An optimizer for `vars`.
    pub fn new(config: OptimizerConfig, vars: Vec<Var>) -> Result<Self> {
        config.validate()?;
        let n = vars.len();
        Ok(Self {
            config,
            vars,
            state: vec![None; n],
            steps: vec![0; n],
        })
    }

    /// Whether every gradient of the optimizer's variables is finite. A NaN gradient with a
    /// finite loss (`sqrt` at 0, say) would otherwise poison the weights silently.
    pub fn gradients_finite(&self, grads: &GradStore) -> Result<bool> {
        for var in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let sum = g.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !sum.is_finite() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// One update with learning rate `lr`. The moment buffers are kept detached: gradients
    /// carry their backprop graph, and a buffer built from them would chain every step's graph
    /// to the next (unbounded memory).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor();
            match self.config {
                OptimizerConfig::AdamW { weight_decay, .. } => {
                    self.steps[i] += 1;
                    let moments = match &self.state[i] {
                        Some(m) => m.clone(),
                        None => {
                            let m = kernels::adamw_moments(p)?;
                            self.state[i] = Some(m.clone());
                            m
                        }
                    };
                    let hyper = kernels::AdamW {
                        lr,
                        weight_decay,
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                        step: self.steps[i],
                    };
                    kernels::adamw_step(p, &moments, g, &hyper)?;
                }
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                    ..
                } => {
                    let g = if weight_decay > 0.0 {
                        (g + (p * weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let buf = match &self.state[i] {
                        Some(b) if momentum > 0.0 => ((b * momentum)? + &g)?,
                        _ => g,
                    };
                    var.set(&(p - (&buf * lr)?)?)?;
                    self.state[i] = Some(buf.detach());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::candle::Device;

    /// One variable, loss = 0.5 * sum(p^2): the gradient is p.
    fn run(config: OptimizerConfig, steps: usize) -> Result<Vec<f64>> {
        let var = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
        let mut opt = Optimizer::new(config, vec![var.clone()])?;
        for _ in 0..steps {
            let grads = (var.as_tensor().sqr()?.sum_all()? * 0.5)?.backward()?;
            opt.step(&grads, 0.1)?;
        }
        Ok(var.as_tensor().to_vec1::<f64>()?)
    }

    #[test]
    fn sgd_momentum_matches_hand_computation() -> Result<()> {
        // p1 = p0 - 0.1 * p0 = 0.9 p0; buf1 = p0.
        // buf2 = 0.9 * p0 + 0.9 p0 = 1.8 p0; p2 = 0.9 p0 - 0.18 p0 = 0.72 p0.
        let p = run(
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
            },
            2,
        )?;
        assert!(
            (p[0] - 0.72).abs() < 1e-12 && (p[1] + 1.44).abs() < 1e-12,
            "{p:?}"
        );
        Ok(())
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_decays() -> Result<()> {
        // Step 1: m_hat = g, v_hat = g^2, update = sign(g) (up to eps); decay 0.1 * 0.5 = 5%.
        let p = run(
            OptimizerConfig::AdamW {
                lr: 0.1,
                weight_decay: 0.5,
            },
            1,
        )?;
        assert!((p[0] - (1.0 * 0.95 - 0.1)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.0 * 0.95 + 0.1)).abs() < 1e-6, "{p:?}");
        Ok(())
    }

    /// The fused in-place step equals PyTorch's AdamW written out with tensor ops, over several
    /// steps with changing gradients.
    #[test]
    fn fused_adamw_equals_the_composed_update() -> Result<()> {
        let (lr, wd, b1, b2, eps) = (0.01, 0.1, 0.9, 0.999, 1e-8);
        let var = Var::new(&[0.5f64, -1.5, 2.0, 0.0], &Device::Cpu)?;
        let mut opt = Optimizer::new(
            OptimizerConfig::AdamW {
                lr,
                weight_decay: wd,
            },
            vec![var.clone()],
        )?;
        let mut p = var.as_tensor().copy()?;
        let (mut m, mut v) = (p.zeros_like()?, p.zeros_like()?);
        for t in 1..=5 {
            // loss = sum(sin(p) * t): the gradient changes from step to step.
            let grads = (var.as_tensor().sin()? * t as f64)?.sum_all()?.backward()?;
            let g = (p.cos()? * t as f64)?;
            opt.step(&grads, lr)?;
            m = ((m * b1)? + (&g * (1.0 - b1))?)?;
            v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m / (1.0 - b1.powi(t)))?;
            let v_hat = (&v / (1.0 - b2.powi(t)))?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            p = ((&p * (1.0 - lr * wd))? - (update * lr)?)?;
            let diff = (var.as_tensor() - &p)?.abs()?.max(0)?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "step {t}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn moment_buffers_hold_no_graph() -> Result<()> {
        for config in [
            OptimizerConfig::AdamW {
                lr: 0.1,
                weight_decay: 0.0,
            },
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
            },
        ] {
            let var = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
            let mut opt = Optimizer::new(config, vec![var.clone()])?;
            for _ in 0..3 {
                let grads = var.as_tensor().sqr()?.sum_all()?.backward()?;
                opt.step(&grads, 0.1)?;
            }
            for buf in opt.state.iter().flatten() {
                assert!(!buf.track_op(), "an optimizer buffer keeps its graph");
            }
        }
        Ok(())
    }

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Constant.rate(0.1, 5, 10, 2), 0.1);
        assert!((Schedule::Cosine.rate(0.1, 5, 10, 2) - 0.05).abs() < 1e-12);
        assert!(Schedule::Cosine.rate(0.1, 10, 10, 2).abs() < 1e-12);
        let step = Schedule::Step {
            every: 2,
            gamma: 0.1,
        };
        assert!((step.rate(1.0, 3, 100, 2) - 1.0).abs() < 1e-12); // epoch 1
        assert!((step.rate(1.0, 4, 100, 2) - 0.1).abs() < 1e-12); // epoch 2
    }

    #[test]
    fn multistep_follows_repdistillers_protocol() -> Result<()> {
        // RepDistiller: lr 0.05, x0.1 at epochs 150, 180 and 210 of 240; 782 steps per epoch.
        let s: Schedule = distill_rt::serde_json::from_value(distill_rt::serde_json::json!({
            "name": "multistep", "milestones": [150, 180, 210]
        }))
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let spe = 782;
        for (epoch, want) in [
            (0, 0.05),
            (149, 0.05),
            (150, 0.005),
            (179, 0.005),
            (180, 5e-4),
            (239, 5e-5),
        ] {
            for step in [epoch * spe, epoch * spe + spe - 1] {
                let got = s.rate(0.05, step, 240 * spe, spe);
                assert!(
                    (got / want - 1.0).abs() < 1e-12,
                    "epoch {epoch}: {got} vs {want}"
                );
            }
        }
        let unsorted = Schedule::MultiStep {
            milestones: vec![5, 3],
            gamma: 0.1,
        };
        assert!(
            unsorted
                .validate()
                .is_err_and(|e| e.to_string().contains("milestones"))
        );
        let negative = Schedule::MultiStep {
            milestones: vec![3],
            gamma: -1.0,
        };
        assert!(
            negative
                .validate()
                .is_err_and(|e| e.to_string().contains("gamma"))
        );
        Ok(())
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Optimizer::new(
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 1.5,
                weight_decay: 0.0,
            },
            vec![],
        );
        assert!(
            e.err()
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("momentum")
        );
    }
}
