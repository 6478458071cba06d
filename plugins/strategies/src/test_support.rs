//! Golden-value harness shared by the strategy tests: reads `tests/fixtures/strategies_golden.json`
//! and runs each case through the loss probe (`distill_engine::probe`, the path of `cargo xtask
//! loss`): loss values (f32, to 1e-5), gradients against central finite differences (f64,
//! relative error <= 1e-3) and gradients of the strategy's own variables.

use std::collections::{BTreeMap, HashMap};

use distill_engine::probe::{Probe, ProbeOptions, evaluate};
use distill_rt::candle::{DType, Device, Tensor};
use distill_rt::serde::Deserialize;
use distill_rt::strategy::StepInfo;
use distill_rt::testing::{self, max_relative_error};
use distill_rt::{Registrar, Result, TensorMap};

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
    /// Named inputs, as the loss probe names them (`s_logits`, `t_logits`, `targets`, `s_feat`,
    /// `t_feat`, `var.<variable>`).
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
    let path = testing::manifest_dir(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/strategies_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture: Fixture = distill_rt::serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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

/// The case's tensors in `dtype`, named as the loss probe reads them (`var.*` set the
/// strategy's variables).
fn inputs(case: &Case, dtype: DType) -> Result<TensorMap> {
    case.inputs
        .iter()
        .map(|(name, stored)| Ok((name.clone(), tensor(stored, dtype)?)))
        .collect()
}

fn options(case: &Case, dtype: DType, warmup_steps: usize) -> ProbeOptions<'_> {
    ProbeOptions {
        strategy: &case.strategy,
        config: &case.config,
        step: StepInfo::default(),
        train_samples: case.train_samples,
        seed: case.seed,
        dtype,
        warmup_steps,
    }
}

fn registrar() -> Result<Registrar> {
    let mut registrar = Registrar::new();
    crate::register(&mut registrar)?;
    Ok(registrar)
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

/// Checks values, gradients and coverage for one case through the loss probe (the path of
/// `cargo xtask loss`); panics with the case name on failure.
pub fn run_case(case: &Case) -> Result<()> {
    let registrar = registrar()?;
    // Values, in f32 as in training.
    let probe = evaluate(
        &registrar,
        &inputs(case, DType::F32)?,
        &options(case, DType::F32, 0),
    )?;
    let got: BTreeMap<String, f64> = probe.terms.into_iter().collect();
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

    // Gradients w.r.t. the student's logits and feature, in f64, against finite differences. A
    // stateful strategy (a memory bank, normalisers fixed at the first step) is checked after
    // one step, where its loss no longer estimates anything from the batch.
    let base = inputs(case, DType::F64)?;
    let mut fixed = Probe::new(&registrar, &base, &options(case, DType::F64, 0))?;
    if case.step_before_gradients {
        fixed.step(&base)?;
    }
    let probe = fixed.evaluate(&base)?;
    for name in ["s_logits", "s_feat"] {
        let Some(x) = base.get(name) else {
            continue;
        };
        let numeric = testing::central_differences(
            |v| {
                let mut perturbed = base.clone();
                perturbed.insert(name.to_string(), v.clone());
                Ok(fixed.evaluate(&perturbed)?.terms[0].1)
            },
            x,
            1e-6,
        )?;
        let err = max_relative_error(&probe.gradients[name], &numeric, 1e-6)?;
        assert!(
            err <= 1e-3,
            "{}: d loss / d {name} relative error {err}",
            case.name
        );
    }
    // The strategy's own variables (adapters, heads) train: finite, non-zero gradients.
    let distills = case
        .expected
        .iter()
        .any(|(k, v)| k != "total" && k != "ce" && *v != 0.0);
    if distills {
        for (name, g) in &probe.variable_gradients {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no gradient reaches `{name}`", case.name));
            let values = g.flatten_all()?.to_vec1::<f64>()?;
            assert!(
                values.iter().all(|v| v.is_finite()) && values.iter().any(|v| *v != 0.0),
                "{}: `{name}` gets a zero or non-finite gradient",
                case.name
            );
        }
    }
    Ok(())
}
