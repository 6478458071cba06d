//! Golden-value harness shared by the strategy tests: reads `tests/fixtures/strategies_golden.json`,
//! builds the strategy through the registrar, checks loss values (f32, to 1e-5), gradients
//! against central finite differences (f64, relative error <= 1e-3) and gradient coverage of the
//! strategy's own variables.

use std::collections::{BTreeMap, HashMap};

use distill_rt::candle::{DType, Device, Tensor, Var};
use distill_rt::candle_nn::{VarBuilder, VarMap};
use distill_rt::serde::Deserialize;
use distill_rt::strategy::StepInfo;
use distill_rt::testing::{self, check_gradient_coverage, max_relative_error};
use distill_rt::{
    Batch, ModelOutput, Registrar, Result, Strategy, StrategyContext, model::PENULTIMATE,
};

/// One stored tensor.
#[derive(Deserialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde")]
pub struct Stored {
    shape: Vec<usize>,
    data: Vec<f64>,
    #[serde(default)]
    dtype: Option<String>,
}

/// One golden case.
#[derive(Deserialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde")]
pub struct Case {
    strategy: String,
    name: String,
    config: distill_rt::Config,
    /// Named inputs (`s_logits`, `t_logits`, `targets`, `s_feat`, `t_feat`, adapter weights).
    pub inputs: HashMap<String, Stored>,
    expected: BTreeMap<String, f64>,
    /// The training-set size the strategy is told (default: the batch size).
    #[serde(default)]
    train_samples: Option<usize>,
    /// The run's seed the strategy is told.
    #[serde(default)]
    seed: u64,
    /// Take one training step (loss, then `end_step`) before checking gradients.
    #[serde(default)]
    step_before_gradients: bool,
}

#[derive(Deserialize)]
#[serde(crate = "distill_rt::serde")]
struct Fixture {
    cases: Vec<Case>,
}

/// The golden cases of `strategy`.
pub fn golden_cases(strategy: &str) -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/strategies_golden.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fixture: Fixture =
        distill_rt::serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    fixture
        .cases
        .into_iter()
        .filter(|c| c.strategy == strategy)
        .collect()
}

fn tensor(s: &Stored, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(s.data.clone(), s.shape.as_slice(), &Device::Cpu)?;
    Ok(match s.dtype.as_deref() {
        Some("u32") => t.to_dtype(DType::U32)?,
        _ => t.to_dtype(dtype)?,
    })
}

struct Built {
    strategy: Box<dyn Strategy>,
    varmap: VarMap,
}

fn build(case: &Case, dtype: DType) -> Result<Built> {
    let mut registrar = Registrar::new();
    crate::register(&mut registrar)?;
    let shapes = |key: &str| -> BTreeMap<String, Vec<usize>> {
        case.inputs
            .get(key)
            .map(|s| BTreeMap::from([(PENULTIMATE.to_string(), s.shape[1..].to_vec())]))
            .unwrap_or_default()
    };
    let (student_features, teacher_features) = (shapes("s_feat"), shapes("t_feat"));
    let mut varmap = VarMap::new();
    let ctx = StrategyContext {
        num_classes: case.inputs["s_logits"].shape[1],
        student_features: &student_features,
        teacher_features: &teacher_features,
        train_samples: case
            .train_samples
            .unwrap_or(case.inputs["s_logits"].shape[0]),
        seed: case.seed,
        vb: VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
    };
    let strategy = registrar
        .get_strategy(&case.strategy)?
        .build(&case.config, ctx)?;
    for (name, stored) in &case.inputs {
        if name.starts_with("adapter.") {
            varmap.set_one(name, tensor(stored, dtype)?)?;
        } else if let Some(var) = name.strip_prefix("var.") {
            varmap.set_one(var, tensor(stored, dtype)?)?;
        }
    }
    Ok(Built { strategy, varmap })
}

fn output(case: &Case, logits: &Tensor, feat: Option<&Tensor>) -> ModelOutput {
    let _ = case;
    ModelOutput {
        logits: logits.clone(),
        features: feat
            .map(|f| BTreeMap::from([(PENULTIMATE.to_string(), f.clone())]))
            .unwrap_or_default(),
    }
}

fn batch(case: &Case) -> Result<Batch> {
    // Class ids are stored with dtype `u32`; ranking relevance as floats.
    let targets = tensor(&case.inputs["targets"], DType::F32)?;
    let n = targets.dim(0)?;
    Ok(Batch {
        inputs: BTreeMap::new(),
        targets,
        indices: Tensor::arange(0u32, n as u32, &Device::Cpu)?,
    })
}

/// The total loss of `case` for student logits `s` and feature `h` (teacher from the case).
fn total(
    built: &Built,
    case: &Case,
    s: &Tensor,
    h: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    let t_logits = tensor(&case.inputs["t_logits"], dtype)?;
    let t_feat = case
        .inputs
        .get("t_feat")
        .map(|x| tensor(x, dtype))
        .transpose()?;
    let terms = built.strategy.loss(
        &output(case, s, h),
        Some(&output(case, &t_logits, t_feat.as_ref())),
        &batch(case)?,
        &StepInfo::default(),
    )?;
    Ok(terms.total)
}

/// Runs every golden case of `strategy` (at least 3) through [`run_case`].
pub fn check_golden(strategy: &str) -> Result<()> {
    let cases = golden_cases(strategy);
    assert!(cases.len() >= 3, "{strategy}: {} golden cases", cases.len());
    for case in &cases {
        run_case(case)?;
    }
    Ok(())
}

/// Checks values, gradients and coverage for one case; panics with the case name on failure.
pub fn run_case(case: &Case) -> Result<()> {
    // Values, in f32 as in training.
    let built = build(case, DType::F32)?;
    let s = tensor(&case.inputs["s_logits"], DType::F32)?;
    let h = case
        .inputs
        .get("s_feat")
        .map(|x| tensor(x, DType::F32))
        .transpose()?;
    let t_logits = tensor(&case.inputs["t_logits"], DType::F32)?;
    let t_feat = case
        .inputs
        .get("t_feat")
        .map(|x| tensor(x, DType::F32))
        .transpose()?;
    let terms = built.strategy.loss(
        &output(case, &s, h.as_ref()),
        Some(&output(case, &t_logits, t_feat.as_ref())),
        &batch(case)?,
        &StepInfo::default(),
    )?;
    let mut got = BTreeMap::from([("total".to_string(), terms.total.to_scalar::<f32>()? as f64)]);
    for (name, t) in &terms.terms {
        got.insert(name.clone(), t.to_scalar::<f32>()? as f64);
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        case.expected.keys().collect::<Vec<_>>(),
        "{}: term names",
        case.name
    );
    for (name, want) in &case.expected {
        let g = got[name];
        assert!(
            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{}: {name} = {g}, reference {want}",
            case.name
        );
    }

    // Gradients w.r.t. the student's logits and feature, in f64, against finite differences.
    let mut built = build(case, DType::F64)?;
    // A stateful strategy (a memory bank, normalisers fixed at the first step) is checked after
    // its first step, where its loss no longer estimates anything from the batch.
    if case.step_before_gradients {
        let s = tensor(&case.inputs["s_logits"], DType::F64)?;
        let h = case
            .inputs
            .get("s_feat")
            .map(|x| tensor(x, DType::F64))
            .transpose()?;
        let t_logits = tensor(&case.inputs["t_logits"], DType::F64)?;
        let t_feat = case
            .inputs
            .get("t_feat")
            .map(|x| tensor(x, DType::F64))
            .transpose()?;
        let (student, teacher) = (
            output(case, &s, h.as_ref()),
            output(case, &t_logits, t_feat.as_ref()),
        );
        let batch = batch(case)?;
        built
            .strategy
            .loss(&student, Some(&teacher), &batch, &StepInfo::default())?;
        built.strategy.end_step(&student, Some(&teacher), &batch)?;
    }
    let s = Var::from_tensor(&tensor(&case.inputs["s_logits"], DType::F64)?)?;
    let h = case
        .inputs
        .get("s_feat")
        .map(|x| tensor(x, DType::F64).and_then(|t| Ok(Var::from_tensor(&t)?)))
        .transpose()?;
    let grads = total(
        &built,
        case,
        s.as_tensor(),
        h.as_ref().map(|v| v.as_tensor()),
        DType::F64,
    )?
    .backward()?;
    let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_scalar::<f64>()?) };
    let fd_s = testing::central_differences(
        |x| {
            scalar(total(
                &built,
                case,
                x,
                h.as_ref().map(|v| v.as_tensor()),
                DType::F64,
            )?)
        },
        s.as_tensor(),
        1e-6,
    )?;
    match grads.get(s.as_tensor()) {
        Some(analytic) => {
            let err = max_relative_error(analytic, &fd_s, 1e-6)?;
            assert!(
                err <= 1e-3,
                "{}: d loss / d s_logits relative error {err}",
                case.name
            );
        }
        // A zero weight cuts the graph in candle (affine by 0): fine when the logits do not matter.
        None => assert!(
            fd_s.abs()?.max_all()?.to_scalar::<f64>()? < 1e-9,
            "{}: s_logits matter but have no gradient",
            case.name
        ),
    }
    if let Some(h) = &h {
        let fd_h = testing::central_differences(
            |x| scalar(total(&built, case, s.as_tensor(), Some(x), DType::F64)?),
            h.as_tensor(),
            1e-6,
        )?;
        match grads.get(h.as_tensor()) {
            Some(g) => {
                let err = max_relative_error(g, &fd_h, 1e-6)?;
                assert!(
                    err <= 1e-3,
                    "{}: d loss / d s_feat relative error {err}",
                    case.name
                );
            }
            None => assert!(
                fd_h.abs()?.max_all()?.to_scalar::<f64>()? < 1e-9,
                "{}: s_feat matters but has no gradient",
                case.name
            ),
        }
    }
    // The strategy's own variables (adapters) train: finite, non-zero gradients.
    let vars = testing::named_vars(&built.varmap);
    let distills = case
        .expected
        .iter()
        .any(|(k, v)| k != "total" && k != "ce" && *v != 0.0);
    if !vars.is_empty() && distills {
        check_gradient_coverage(&vars, &[], &grads)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
    Ok(())
}
