//! The plugin boundary (DESIGN.md): gradients cross it exactly, plugins that would break it are
//! refused at load with named errors, plugin panics are contained, plugin tracing events reach the
//! host's subscriber.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use distill_host::{LoadError, PluginHost};
use distill_rt::candle::{D, DType, Device, Tensor, Var};
use distill_rt::candle_nn::{VarBuilder, VarMap, loss as nn_loss, ops as nn_ops};
use distill_rt::model::PENULTIMATE;
use distill_rt::strategy::StepInfo;
use distill_rt::testing::{
    central_differences, check_gradient_coverage, max_abs_difference, max_relative_error,
    named_vars,
};
use distill_rt::{
    Batch, DatasetInfo, Error, ModelContext, ModelOutput, Registrar, Strategy, StrategyContext,
    TaskKind, tracing, tracing_subscriber,
};
use distill_tests::{fixed_tensor, host_with, plugin_path};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const BATCH: usize = 6;
const CLASSES: usize = 5;

fn batch() -> Result<Batch> {
    Ok(Batch {
        inputs: BTreeMap::new(),
        targets: Tensor::new(&[0u32, 1, 2, 3, 4, 1], &Device::Cpu)?,
        soft_targets: None,
        indices: Tensor::arange(0u32, BATCH as u32, &Device::Cpu)?,
    })
}

fn output(logits: &Tensor, feature: Option<&Tensor>) -> ModelOutput {
    ModelOutput {
        logits: logits.clone(),
        features: feature
            .map(|f| BTreeMap::from([(PENULTIMATE.to_string(), f.clone())]))
            .unwrap_or_default(),
    }
}

fn build(
    registrar: &Registrar,
    name: &str,
    config: distill_rt::serde_json::Value,
    widths: Option<(usize, usize)>,
    varmap: &VarMap,
) -> Result<Box<dyn Strategy>> {
    let shapes = |w: Option<usize>| {
        w.map(|w| BTreeMap::from([(PENULTIMATE.to_string(), vec![w])]))
            .unwrap_or_default()
    };
    let (sf, tf) = (shapes(widths.map(|w| w.0)), shapes(widths.map(|w| w.1)));
    let ctx = StrategyContext {
        num_classes: CLASSES,
        student_features: &sf,
        teacher_features: &tf,
        train_samples: 8,
        seed: 0,
        vb: VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu),
    };
    Ok(registrar.get_strategy(name)?.build(&config, ctx)?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f64>()?)
}

/// KD computed in-process with candle-nn's own ops, independent of distill's `ops`.
fn kd_in_process(s: &Tensor, t: &Tensor, y: &Tensor, alpha: f64, temp: f64) -> Result<Tensor> {
    let ce = nn_loss::cross_entropy(s, y)?;
    let log_ps = nn_ops::log_softmax(&(s / temp)?, D::Minus1)?;
    let log_pt = nn_ops::log_softmax(&(t / temp)?, D::Minus1)?;
    let kl = ((log_pt.exp()? * (log_pt - log_ps)?)?.sum_all()? / BATCH as f64)?;
    Ok(((ce * alpha)? + (kl * ((1.0 - alpha) * temp * temp))?)?)
}

#[test]
fn kd_gradients_cross_the_boundary_exactly() -> Result<()> {
    let host = host_with("distill_plugin_strategies");
    let varmap = VarMap::new();
    let (alpha, temp) = (0.3, 4.0);
    let kd = build(
        host.registrar(),
        "kd",
        distill_rt::serde_json::json!({"alpha": alpha, "temperature": temp}),
        None,
        &varmap,
    )?;
    // The student's logits are a variable created here, in the host.
    let s = Var::from_tensor(&fixed_tensor(BATCH, CLASSES, 1, 3.0, DType::F64))?;
    let t = fixed_tensor(BATCH, CLASSES, 2, 3.0, DType::F64);
    let b = batch()?;
    let plugin_loss = |s: &Tensor| -> Result<Tensor> {
        Ok(kd
            .loss(
                &output(s, None),
                Some(&output(&t, None)),
                &b,
                &StepInfo::default(),
            )?
            .total)
    };

    let via_plugin = plugin_loss(s.as_tensor())?;
    let grads = via_plugin.backward()?;
    let g_plugin = grads
        .get(s.as_tensor())
        .ok_or("no gradient for the student logits through the plugin")?;

    let in_process = kd_in_process(s.as_tensor(), &t, &b.targets, alpha, temp)?;
    let g_ref = in_process
        .backward()?
        .get(s.as_tensor())
        .ok_or("no in-process gradient")?
        .clone();

    assert!((scalar(&via_plugin)? - scalar(&in_process)?).abs() <= 1e-12);
    let diff = max_abs_difference(g_plugin, &g_ref)?;
    assert!(
        diff <= 1e-7,
        "plugin vs in-process gradient: max abs difference {diff}"
    );

    let fd = central_differences(
        |x| {
            Ok(plugin_loss(x)
                .map_err(|e| Error::Invalid(e.to_string()))?
                .to_scalar::<f64>()?)
        },
        s.as_tensor(),
        1e-6,
    )?;
    let rel = max_relative_error(g_plugin, &fd, 1e-8)?;
    assert!(
        rel <= 1e-3,
        "plugin gradient vs central differences: relative error {rel}"
    );
    Ok(())
}

#[test]
fn feature_mse_gradients_cross_the_boundary_exactly_with_adapter() -> Result<()> {
    let host = host_with("distill_plugin_strategies");
    // The plugin creates its adapter (4 -> 7) in the host's variable map.
    let varmap = VarMap::new();
    let config = distill_rt::serde_json::json!({"ce_weight": 0.5, "feature_weight": 2.0});
    let fm = build(
        host.registrar(),
        "feature-mse",
        config,
        Some((4, 7)),
        &varmap,
    )?;
    let vars: BTreeMap<String, Var> = named_vars(&varmap).into_iter().collect();
    assert_eq!(
        vars.keys().collect::<Vec<_>>(),
        ["adapter.bias", "adapter.weight"]
    );
    let (w, bias) = (
        vars["adapter.weight"].as_tensor().clone(),
        vars["adapter.bias"].as_tensor().clone(),
    );

    let s = Var::from_tensor(&fixed_tensor(BATCH, CLASSES, 3, 2.0, DType::F64))?;
    let h = Var::from_tensor(&fixed_tensor(BATCH, 4, 4, 1.0, DType::F64))?;
    let t_logits = fixed_tensor(BATCH, CLASSES, 5, 2.0, DType::F64);
    let t_feat = fixed_tensor(BATCH, 7, 6, 1.0, DType::F64);
    let b = batch()?;
    let teacher = output(&t_logits, Some(&t_feat));
    let plugin_loss = |h: &Tensor| -> Result<Tensor> {
        Ok(fm
            .loss(
                &output(s.as_tensor(), Some(h)),
                Some(&teacher),
                &b,
                &StepInfo::default(),
            )?
            .total)
    };

    let via_plugin = plugin_loss(h.as_tensor())?;
    let grads = via_plugin.backward()?;

    // In-process: 0.5 * CE + 2 * 0.5 * ||h W^T + b - h_t||^2 / batch, with candle-nn's CE.
    let mapped = h.as_tensor().matmul(&w.t()?)?.broadcast_add(&bias)?;
    let half_sq = ((mapped - &t_feat)?.sqr()?.sum_all()? * (0.5 / BATCH as f64))?;
    let in_process =
        ((nn_loss::cross_entropy(s.as_tensor(), &b.targets)? * 0.5)? + (half_sq * 2.0)?)?;
    let ref_grads = in_process.backward()?;

    assert!((scalar(&via_plugin)? - scalar(&in_process)?).abs() <= 1e-12);
    for (name, t) in [
        ("s", s.as_tensor()),
        ("h", h.as_tensor()),
        ("adapter.weight", &w),
        ("adapter.bias", &bias),
    ] {
        let g = grads
            .get(t)
            .ok_or_else(|| format!("no gradient for {name} through the plugin"))?;
        let r = ref_grads
            .get(t)
            .ok_or_else(|| format!("no in-process gradient for {name}"))?;
        let diff = max_abs_difference(g, r)?;
        assert!(
            diff <= 1e-7,
            "{name}: plugin vs in-process gradient max abs difference {diff}"
        );
    }
    let fd = central_differences(
        |x| {
            Ok(plugin_loss(x)
                .map_err(|e| Error::Invalid(e.to_string()))?
                .to_scalar::<f64>()?)
        },
        h.as_tensor(),
        1e-6,
    )?;
    let rel = max_relative_error(
        grads.get(h.as_tensor()).ok_or("no gradient for h")?,
        &fd,
        1e-8,
    )?;
    assert!(
        rel <= 1e-3,
        "feature gradient vs central differences: relative error {rel}"
    );
    // The adapter trains with the student.
    check_gradient_coverage(&named_vars(&varmap), &[], &grads)?;
    Ok(())
}

fn refusal(crate_name: &str) -> LoadError {
    match PluginHost::new().load(&plugin_path(crate_name)) {
        Ok(()) => panic!("{crate_name} was loaded but must be refused"),
        Err(e) => e,
    }
}

#[test]
fn plugin_with_its_own_candle_is_refused_by_the_runtime_check() {
    let err = refusal("distill_test_isolated");
    assert!(matches!(err, LoadError::ForeignRuntime { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("libdistill_test_isolated"), "{message}");
    assert!(
        message.contains("field `runtime`") && message.contains("distill-rt"),
        "{message}"
    );
}

#[test]
fn plugin_with_a_different_fingerprint_field_is_refused_naming_it() {
    let err = refusal("distill_test_stale_fingerprint");
    match &err {
        LoadError::Fingerprint {
            field,
            plugin,
            host,
            ..
        } => {
            assert_eq!(field, "debug-assertions");
            assert_eq!((plugin.as_str(), host.as_str()), ("off", "on"));
        }
        other => panic!("expected a fingerprint refusal, got: {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("debug-assertions") && message.contains("cargo build --workspace"),
        "{message}"
    );
}

#[test]
fn missing_file_and_non_plugins_give_named_errors() -> Result<()> {
    let missing = plugin_path("distill_plugin_does_not_exist");
    let err = PluginHost::new().load(&missing).expect_err("missing file");
    assert!(
        matches!(err, LoadError::Missing { .. })
            && err.to_string().contains("distill_plugin_does_not_exist"),
        "{err}"
    );

    // A real shared library without plugin symbols: the runtime itself.
    let err = PluginHost::new()
        .load(&plugin_path("distill_rt"))
        .expect_err("the runtime is no plugin");
    match &err {
        LoadError::NotAPlugin { symbol, .. } => assert_eq!(symbol, "distill_plugin_abi_version"),
        other => panic!("expected NotAPlugin, got: {other}"),
    }

    // A file that is no library at all.
    let junk = std::env::temp_dir().join(format!("distill-junk-{}.so", std::process::id()));
    std::fs::write(&junk, b"this is not a shared library")?;
    let err = PluginHost::new().load(&junk).expect_err("junk file");
    std::fs::remove_file(&junk)?;
    assert!(
        matches!(err, LoadError::Open { .. }) && err.to_string().contains("distill-junk"),
        "{err}"
    );
    Ok(())
}

#[test]
fn plugin_panics_are_errors_and_the_process_goes_on() -> Result<()> {
    let mut host = PluginHost::new();
    host.load(&plugin_path("distill_test_faulty"))?;
    host.load(&plugin_path("distill_plugin_strategies"))?;
    let varmap = VarMap::new();
    let s = fixed_tensor(BATCH, CLASSES, 7, 1.0, DType::F32);
    let b = batch()?;

    let panicking = build(
        host.registrar(),
        "test.panic",
        distill_rt::serde_json::Value::Null,
        None,
        &varmap,
    )?;
    let err = panicking
        .loss(
            &output(&s, None),
            None,
            &b,
            &StepInfo {
                step: 17,
                ..Default::default()
            },
        )
        .expect_err("the strategy panics");
    match &err {
        Error::Panic { entry, message } => {
            assert_eq!(entry, "strategy `test.panic`: loss");
            assert!(
                message.contains("deliberate panic in loss at step 17"),
                "{message}"
            );
        }
        other => panic!("expected a contained panic, got: {other}"),
    }

    let err = build(
        host.registrar(),
        "test.panic-build",
        distill_rt::serde_json::Value::Null,
        None,
        &varmap,
    )
    .err()
    .ok_or("building test.panic-build must fail")?;
    assert!(
        err.to_string()
            .contains("strategy `test.panic-build`: build"),
        "{err}"
    );

    let info = DatasetInfo {
        task: TaskKind::Classification,
        num_classes: CLASSES,
        inputs: BTreeMap::new(),
        cardinality: BTreeMap::new(),
        split_sizes: [0; 3],
        primary_metric: "accuracy".into(),
    };
    let ctx = ModelContext {
        dataset: &info,
        seed: 0,
        vb: VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    };
    let model = host
        .registrar()
        .get_model("test.panic-model")?
        .build(&distill_rt::serde_json::Value::Null, ctx)?;
    let err = model
        .forward(&BTreeMap::new(), true)
        .expect_err("forward panics");
    assert!(
        matches!(&err, Error::Panic { entry, .. } if entry == "model `test.panic-model`: forward"),
        "{err}"
    );

    // The process goes on: another plugin's strategy still works.
    let baseline = build(
        host.registrar(),
        "baseline",
        distill_rt::serde_json::Value::Null,
        None,
        &varmap,
    )?;
    let loss = baseline.loss(&output(&s, None), None, &b, &StepInfo::default())?;
    assert!(loss.total.to_scalar::<f32>()?.is_finite());
    Ok(())
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn tracing_events_inside_a_plugin_reach_the_host_subscriber() -> Result<()> {
    let host = host_with("distill_test_faulty");
    let varmap = VarMap::new();
    let traced = build(
        host.registrar(),
        "test.traced",
        distill_rt::serde_json::Value::Null,
        None,
        &varmap,
    )?;
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let s = fixed_tensor(BATCH, CLASSES, 8, 1.0, DType::F32);
    let b = batch()?;
    let result = tracing::subscriber::with_default(subscriber, || {
        traced.loss(
            &output(&s, None),
            None,
            &b,
            &StepInfo {
                step: 42,
                ..Default::default()
            },
        )
    });
    result?;
    let text = String::from_utf8(captured.0.lock().map_err(|_| "poisoned")?.clone())?;
    assert!(
        text.contains("loss computed inside the plugin"),
        "captured: {text:?}"
    );
    assert!(
        text.contains("distill_test_faulty") && text.contains("step=42"),
        "captured: {text:?}"
    );
    Ok(())
}

/// A fresh folder for copies of plugin files.
fn plugin_copies(tag: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("distill-plugin-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    set_mode(&dir, 0o755)?;
    Ok(dir)
}

fn set_mode(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[test]
fn only_this_workspaces_plugins_load_from_a_shared_target_folder() -> Result<()> {
    let dir = plugin_copies("stray")?;
    let ours = plugin_path("distill_plugin_strategies");
    let file = |name: &str| dir.join(format!("libdistill_plugin_{name}.so"));
    std::fs::copy(&ours, file("strategies"))?;
    // A plugin scaffolded in another clone that shares the target folder, deleted since.
    std::fs::copy(&ours, file("bars_probe"))?;
    let found = distill_host::workspace_plugins(&dir)?;
    assert_eq!(found, [file("strategies")], "{found:?}");
    assert_eq!(distill_host::discover(&dir)?.len(), 2);
    let mut host = PluginHost::new();
    host.load_workspace(&dir)?;
    assert_eq!(host.loaded(), [file("strategies")]);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn plugins_that_other_users_can_write_are_refused_naming_the_path() -> Result<()> {
    let dir = plugin_copies("loose")?;
    let copy = dir.join("libdistill_plugin_strategies.so");
    std::fs::copy(plugin_path("distill_plugin_strategies"), &copy)?;
    let refused = |expect_loose: &std::path::Path| -> Result<()> {
        match PluginHost::new().load(&copy) {
            Err(e @ LoadError::Insecure { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!(
                        "{} is writable by other users",
                        expect_loose.display()
                    )) && text.contains("chmod go-w"),
                    "{text}"
                );
                Ok(())
            }
            Err(e) => Err(format!("expected a refusal, got {e}").into()),
            Ok(()) => Err(format!("{} was loaded", copy.display()).into()),
        }
    };
    set_mode(&copy, 0o757)?;
    refused(&copy)?;
    set_mode(&copy, 0o755)?;
    set_mode(&dir, 0o777)?;
    refused(&dir)?;
    // A sticky folder (like /tmp) lets nobody replace another user's file: accepted.
    set_mode(&dir, 0o1777)?;
    let mut host = PluginHost::new();
    host.load(&copy)?;
    // Group-writable in a group that is not the owner's own (when this user may pick one).
    set_mode(&dir, 0o755)?;
    set_mode(&copy, 0o775)?;
    let other_group = std::process::Command::new("chgrp")
        .args(["nogroup"])
        .arg(&copy)
        .status()
        .is_ok_and(|s| s.success());
    if other_group {
        refused(&copy)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn every_plugin_reports_its_code_version() -> Result<()> {
    let host = host_with("distill_plugin_strategies");
    let version = host.code_version("strategy", "kd").unwrap_or_default();
    let (name, hex) = version.split_once(':').unwrap_or_default();
    assert_eq!(name, "strategies");
    assert_eq!(hex.len(), 16, "{version}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{version}");
    // A plugin built without `distill-build` is identified by its library file's hash.
    let faulty = host_with("distill_test_faulty");
    let names: Vec<String> = faulty
        .registrar()
        .list()
        .into_iter()
        .map(|e| format!("{}:{}", e.kind, e.name))
        .collect();
    let first = names.first().cloned().unwrap_or_default();
    let (kind, name) = first.split_once(':').unwrap_or_default();
    let version = faulty.code_version(kind, name).unwrap_or_default();
    assert!(version.starts_with("distill_test_faulty:"), "{version}");
    assert_eq!(
        version.len(),
        "distill_test_faulty:".len() + 16,
        "{version}"
    );
    assert_eq!(host.code_version("strategy", "no-such-strategy"), None);
    Ok(())
}
