//! One strategy evaluated on given tensors: every loss term and the gradient of the total with
//! respect to each student tensor. Behind `distill loss` / `cargo xtask loss` (an author checks
//! a loss against a paper's reference code with it) and the strategies' golden tests.
//!
//! Tensor names:
//! - `s_logits`, `t_logits`: logits (`[batch, classes]` or `[batch, candidates]`);
//! - `targets`: class ids (any integer type) or, in a float type, ranking relevance;
//! - `s_feat`, `t_feat`: the student's and teacher's `penultimate` feature (the default feature
//!   of every standard strategy); `s_emb`, `t_emb`: their `embedding` feature;
//!   `s.<name>`, `t.<name>`: any other named feature;
//! - several teachers: `t0_logits`, `t0_feat`, `t0.<name>`, `t1_logits`, ... (instead of the
//!   `t_` names), combined as the engine combines them (`teacher0.logits`, `teacher0.penultimate`,
//!   ...; [`distill_rt::strategy::combine_teachers`]);
//! - `indices`: the samples' indices in the training set (default `0..batch`);
//! - `var.<name>`: a value for the strategy's own variable `<name>` (an adapter's weight).
//!
//! Gradients are named like the student tensors they belong to (`s_logits`, `s_feat`, ...).

use std::collections::BTreeMap;

use distill_rt::candle::{DType, Device, Tensor, Var};
use distill_rt::candle_nn::{VarBuilder, VarMap};
use distill_rt::model::PENULTIMATE;
use distill_rt::strategy::{StepInfo, combine_teachers};
use distill_rt::{
    Batch, Config, Error, ModelOutput, Registrar, Result, Strategy, StrategyContext, TensorMap,
};

/// The feature each short tensor name stands for.
const FEATURE_NAMES: [(&str, &str); 2] = [("feat", PENULTIMATE), ("emb", "embedding")];

/// What [`evaluate`] found.
#[derive(Debug)]
pub struct LossProbe {
    /// `total` first, then each term the strategy reports, by name.
    pub terms: Vec<(String, f64)>,
    /// d total / d each student tensor, by the tensor's name.
    pub gradients: TensorMap,
    /// d total / d each of the strategy's own variables (`None`: no gradient reaches it).
    pub variable_gradients: BTreeMap<String, Option<Tensor>>,
}

/// How to build and call the strategy.
pub struct ProbeOptions<'a> {
    /// Registered strategy name.
    pub strategy: &'a str,
    /// Its configuration table.
    pub config: &'a Config,
    /// Where in training the loss is computed (epoch-dependent schedules).
    pub step: StepInfo,
    /// The training-set size the strategy is told (default: the batch size).
    pub train_samples: Option<usize>,
    /// The run's seed the strategy is told.
    pub seed: u64,
    /// The dtype the computation runs in (`F64` for finite-difference comparisons).
    pub dtype: DType,
    /// Training steps (`loss`, then `end_step`) on the same tensors before the one measured, for
    /// strategies with state (a memory bank, normalisers fixed at the first step).
    pub warmup_steps: usize,
}

/// Splits `inputs` into one side's model output (`side` is `s` or `t`); student tensors become
/// variables, so that the total's gradient reaches them.
fn side(
    inputs: &TensorMap,
    side: &str,
    dtype: DType,
    vars: &mut BTreeMap<String, Var>,
) -> Result<Option<ModelOutput>> {
    let mut take = |name: &str| -> Result<Option<Tensor>> {
        let Some(t) = inputs.get(name) else {
            return Ok(None);
        };
        let t = t.to_dtype(dtype)?;
        if side == "s" {
            let v = Var::from_tensor(&t)?;
            let out = v.as_tensor().clone();
            vars.insert(name.to_string(), v);
            Ok(Some(out))
        } else {
            Ok(Some(t))
        }
    };
    let Some(logits) = take(&format!("{side}_logits"))? else {
        return Ok(None);
    };
    let mut features = TensorMap::new();
    for (short, feature) in FEATURE_NAMES {
        if let Some(t) = take(&format!("{side}_{short}"))? {
            features.insert(feature.to_string(), t);
        }
    }
    let prefix = format!("{side}.");
    let named: Vec<String> = inputs
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    for name in named {
        if let Some(t) = take(&name)? {
            features.insert(name[prefix.len()..].to_string(), t);
        }
    }
    Ok(Some(ModelOutput { logits, features }))
}

/// The tensors of one call: both sides' outputs, the batch, and the student's variables.
struct Call {
    student: ModelOutput,
    teacher: Option<ModelOutput>,
    batch: Batch,
    vars: BTreeMap<String, Var>,
}

fn call(inputs: &TensorMap, dtype: DType) -> Result<Call> {
    let mut vars = BTreeMap::new();
    let student = side(inputs, "s", dtype, &mut vars)?
        .ok_or_else(|| Error::Invalid("the inputs have no `s_logits`".into()))?;
    let teacher = match side(inputs, "t", dtype, &mut BTreeMap::new())? {
        Some(t) => Some(t),
        None => {
            let mut several = Vec::new();
            while let Some(t) = side(
                inputs,
                &format!("t{}", several.len()),
                dtype,
                &mut BTreeMap::new(),
            )? {
                several.push(t);
            }
            if several.is_empty() {
                None
            } else {
                Some(combine_teachers(several)?)
            }
        }
    };
    let targets = inputs
        .get("targets")
        .ok_or_else(|| Error::Invalid("the inputs have no `targets`".into()))?;
    let targets = if targets.dtype().is_float() {
        targets.to_dtype(DType::F32)?
    } else {
        targets.to_dtype(DType::U32)?
    };
    let batch_size = student.logits.dim(0)?;
    let indices = match inputs.get("indices") {
        Some(i) => i.to_dtype(DType::U32)?,
        None => Tensor::arange(0u32, batch_size as u32, &Device::Cpu)?,
    };
    Ok(Call {
        student,
        teacher,
        batch: Batch {
            inputs: TensorMap::new(),
            targets,
            soft_targets: None,
            indices,
        },
        vars,
    })
}

/// One strategy built for the shapes of some tensors, evaluated on any tensors of those shapes.
pub struct Probe {
    strategy: Box<dyn Strategy>,
    varmap: VarMap,
    step: StepInfo,
    dtype: DType,
}

impl Probe {
    /// Builds the strategy of `options` for the shapes of `inputs` (module docs for the names)
    /// and sets its variables from the `var.*` tensors.
    pub fn new(
        registrar: &Registrar,
        inputs: &TensorMap,
        options: &ProbeOptions<'_>,
    ) -> Result<Self> {
        let c = call(inputs, options.dtype)?;
        let student_features = c.student.feature_shapes();
        let teacher_features = c
            .teacher
            .as_ref()
            .map(ModelOutput::feature_shapes)
            .unwrap_or_default();
        let mut varmap = VarMap::new();
        let ctx = StrategyContext {
            num_classes: c.student.logits.dims().last().copied().unwrap_or(0),
            student_features: &student_features,
            teacher_features: &teacher_features,
            train_samples: options.train_samples.unwrap_or(c.student.logits.dim(0)?),
            seed: options.seed,
            vb: VarBuilder::from_varmap(&varmap, options.dtype, &Device::Cpu),
        };
        let strategy = registrar
            .get_strategy(options.strategy)?
            .build(options.config, ctx)?;
        for (name, value) in inputs {
            if let Some(var) = name.strip_prefix("var.") {
                varmap.set_one(var, value.to_dtype(options.dtype)?)?;
            }
        }
        Ok(Self {
            strategy,
            varmap,
            step: options.step,
            dtype: options.dtype,
        })
    }

    /// One training step's worth of state change on `inputs`: `loss`, then `end_step`.
    pub fn step(&mut self, inputs: &TensorMap) -> Result<()> {
        let c = call(inputs, self.dtype)?;
        self.strategy
            .loss(&c.student, c.teacher.as_ref(), &c.batch, &self.step)?;
        self.strategy
            .end_step(&c.student, c.teacher.as_ref(), &c.batch)
    }

    /// The terms and gradients on `inputs`; changes nothing.
    pub fn evaluate(&self, inputs: &TensorMap) -> Result<LossProbe> {
        let c = call(inputs, self.dtype)?;
        let out = self
            .strategy
            .loss(&c.student, c.teacher.as_ref(), &c.batch, &self.step)?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let mut terms = vec![("total".to_string(), scalar(&out.total)?)];
        for (name, t) in &out.terms {
            terms.push((name.clone(), scalar(t)?));
        }
        let grads = out.total.backward()?;
        let mut gradients = TensorMap::new();
        for (name, var) in &c.vars {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                // No path from the total (a term weighted 0): the gradient is zero.
                None => var.as_tensor().zeros_like()?,
            };
            gradients.insert(name.clone(), g);
        }
        let variable_gradients = distill_rt::testing::named_vars(&self.varmap)
            .into_iter()
            .map(|(name, v)| (name, grads.get(v.as_tensor()).cloned()))
            .collect();
        Ok(LossProbe {
            terms,
            gradients,
            variable_gradients,
        })
    }
}

/// Builds the strategy of `options` for `inputs`, takes its `warmup_steps`, and evaluates it.
pub fn evaluate(
    registrar: &Registrar,
    inputs: &TensorMap,
    options: &ProbeOptions<'_>,
) -> Result<LossProbe> {
    let mut probe = Probe::new(registrar, inputs, options)?;
    for _ in 0..options.warmup_steps {
        probe.step(inputs)?;
    }
    probe.evaluate(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy;

    #[test]
    fn terms_and_gradients_of_a_known_loss() -> Result<()> {
        // toy.match: 0.5 * ||s - t||^2 / batch + CE.
        let registrar = toy::registrar()?;
        let dev = Device::Cpu;
        let inputs = TensorMap::from([
            ("s_logits".to_string(), Tensor::new(&[[1.0f64, 2.0]], &dev)?),
            ("t_logits".to_string(), Tensor::new(&[[0.0f64, 0.0]], &dev)?),
            ("targets".to_string(), Tensor::new(&[0i64], &dev)?),
        ]);
        let probe = evaluate(
            &registrar,
            &inputs,
            &ProbeOptions {
                strategy: "toy.match",
                config: &Config::Null,
                step: StepInfo::default(),
                train_samples: None,
                seed: 0,
                dtype: DType::F64,
                warmup_steps: 0,
            },
        )?;
        let e = std::f64::consts::E;
        let want = [
            ("total", 2.5 + (1.0 + e).ln()),
            ("match", 2.5),
            ("ce", (1.0 + e).ln()),
        ];
        for ((name, v), (wn, wv)) in probe.terms.iter().zip(want) {
            assert_eq!(name, wn);
            assert!((v - wv).abs() < 1e-12, "{name} = {v}, want {wv}");
        }
        // (s - t) + softmax(s) - onehot(0).
        let p0 = 1.0 / (1.0 + e);
        let g = probe.gradients["s_logits"].to_vec2::<f64>()?;
        assert!(
            (g[0][0] - (1.0 + p0 - 1.0)).abs() < 1e-12
                && (g[0][1] - (2.0 + 1.0 - p0)).abs() < 1e-12
        );
        Ok(())
    }
}
