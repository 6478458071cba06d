//! `cargo xtask new-plugin strategy|task <name>`: a new plugin crate under `plugins/<name>`,
//! added to the workspace, that builds with it, registers, loads and passes its own test as
//! generated. The templates below are the smallest complete examples of each kind.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// What kind of plugin to scaffold.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    /// A distillation strategy (a loss).
    Strategy,
    /// A task: a dataset and a model.
    Task,
}

/// Creates `plugins/<name>` in the workspace at `root` and lists it in the workspace members.
/// Returns the new crate's folder.
pub fn new_plugin(root: &Path, kind: Kind, name: &str) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "plugin name `{name}`: use lower-case letters, digits and `-`, starting with a letter"
        );
    }
    let dir = root.join("plugins").join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let manifest_path = root.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let members = add_member(&manifest, &format!("plugins/{name}"))
        .with_context(|| format!("{}: listing the new crate", manifest_path.display()))?;
    let ident = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{name}", name)
            .replace("{ident}", &ident)
            .replace("{title}", &title(name))
    };
    let (description, lib) = match kind {
        Kind::Strategy => ("A distillation strategy", STRATEGY_LIB),
        Kind::Task => ("A task: a dataset and a model", TASK_LIB),
    };
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let cargo_toml = CARGO_TOML.replace("{description}", description);
    for (path, text) in [
        (dir.join("Cargo.toml"), fill(&cargo_toml)),
        (dir.join("build.rs"), BUILD_RS.to_string()),
        (dir.join("src/lib.rs"), fill(lib)),
    ] {
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(&manifest_path, members)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    Ok(dir)
}

/// `cosine-hint` -> `CosineHint`.
fn title(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `manifest` with `member` appended to `[workspace] members`.
fn add_member(manifest: &str, member: &str) -> Result<String> {
    let start = manifest
        .find("members = [")
        .context("no `members = [` in the workspace manifest")?;
    let end = start
        + manifest[start..]
            .find(']')
            .context("`members = [` is not closed")?;
    let list = &manifest[start..end];
    if list.contains(&format!("\"{member}\"")) {
        bail!("`{member}` is already a member");
    }
    let body = list.trim_end();
    let separator = if body.ends_with(',') || body.ends_with('[') {
        ""
    } else {
        ","
    };
    Ok(format!(
        "{}{separator}\n    \"{member}\",\n{}",
        &manifest[..start + body.len()],
        &manifest[end..]
    ))
}

const CARGO_TOML: &str = r#"[package]
name = "distill-plugin-{name}"
description = "{description} (scaffolded by cargo xtask new-plugin)"
version.workspace = true
edition.workspace = true
rust-version.workspace = true
license.workspace = true
publish.workspace = true

[lib]
crate-type = ["cdylib"]

[dependencies]
distill-rt.workspace = true

[build-dependencies]
# The code version every job that uses this plugin includes in its identity.
distill-build.workspace = true

[lints]
workspace = true
"#;

/// The build script of every plugin: its code version (`distill-build`).
const BUILD_RS: &str = r#"//! Computes this plugin's code version (`distill-build`), which `export_plugin!` exports.

fn main() {
    distill_build::emit_plugin_version();
}
"#;

const STRATEGY_LIB: &str = r#"//! The `{name}` strategy: `loss = ce_weight * CE(s, y) + weight * mean((s - t)^2)` on the
//! logits (logit matching). Replace the formula in [`{title}::loss`]; keep the test's shape:
//! a value computed by hand and the gradient against central finite differences.

use distill_rt::ops::label_loss;
use distill_rt::strategy::{StepInfo, require_teacher};
use distill_rt::{
    Batch, Config, LossTerms, ModelOutput, Registrar, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config,
};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.strategy("{name}", {title}Factory)
}

const OWNER: &str = "strategy {name}";

/// The configuration keys and their defaults; unknown keys are errors.
#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Copy, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct {title}Config {
    ce_weight: f64,
    weight: f64,
}

impl Default for {title}Config {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            weight: 1.0,
        }
    }
}

/// Builds [`{title}`].
pub struct {title}Factory;

impl StrategyFactory for {title}Factory {
    fn summary(&self) -> &str {
        "ce_weight*CE + weight*mean((s - t)^2) on the logits; ce_weight 1, weight 1"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<{title}Config>()
    }
    fn build(&self, cfg: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: {title}Config = config::parse(OWNER, cfg)?;
        config::require_weights(OWNER, &[("ce_weight", c.ce_weight), ("weight", c.weight)])?;
        Ok(Box::new({title} { config: c }))
    }
}

/// The `{name}` loss (module docs).
pub struct {title} {
    config: {title}Config,
}

impl Strategy for {title} {
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
        let ce = (label_loss(&s.logits, batch)? * self.config.ce_weight)?;
        let diff = (&s.logits - t.logits.detach())?;
        let matching = (diff.sqr()?.mean_all()? * self.config.weight)?;
        LossTerms::sum([("ce", ce), ("{ident}", matching)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::candle::{DType, Device, Tensor, Var};
    use distill_rt::candle_nn::{VarBuilder, VarMap};
    use distill_rt::testing::{central_differences, max_relative_error};
    use std::collections::BTreeMap;

    fn output(logits: &Tensor) -> ModelOutput {
        ModelOutput {
            logits: logits.clone(),
            features: BTreeMap::new(),
        }
    }

    #[test]
    fn loss_matches_a_hand_computed_value_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mut registrar = Registrar::new();
        register(&mut registrar)?;
        let empty = BTreeMap::new();
        let strategy = registrar.get_strategy("{name}")?.build(
            &distill_rt::serde_json::json!({"weight": 2.0}),
            StrategyContext {
                num_classes: 2,
                student_features: &empty,
                teacher_features: &empty,
                train_samples: 2,
                seed: 0,
                vb: VarBuilder::from_varmap(&VarMap::new(), DType::F64, &dev),
            },
        )?;
        let s = Tensor::new(&[[0.0f64, 0.0], [2.0, 0.0]], &dev)?;
        let t = Tensor::new(&[[1.0f64, 0.0], [2.0, 1.0]], &dev)?;
        let batch = Batch {
            inputs: BTreeMap::new(),
            targets: Tensor::new(&[1u32, 0], &dev)?,
            soft_targets: None,
            indices: Tensor::new(&[0u32, 1], &dev)?,
        };
        let total = |s: &Tensor| -> Result<Tensor> {
            Ok(strategy
                .loss(&output(s), Some(&output(&t)), &batch, &StepInfo::default())?
                .total)
        };
        // CE: (ln 2 + ln(1 + e^-2)) / 2; matching: 2 * (1 + 0 + 0 + 1) / 4.
        let want = (2f64.ln() + (1.0 + (-2f64).exp()).ln()) / 2.0 + 1.0;
        let got = total(&s)?.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let var = Var::from_tensor(&s)?;
        let grads = total(var.as_tensor())?.backward()?;
        let analytic = grads
            .get(var.as_tensor())
            .ok_or_else(|| distill_rt::Error::Invalid("no gradient".into()))?;
        let numeric = central_differences(|x| Ok(total(x)?.to_scalar::<f64>()?), &s, 1e-6)?;
        assert!(max_relative_error(analytic, &numeric, 1e-6)? < 1e-6);
        Ok(())
    }
}
"#;

const TASK_LIB: &str = r#"//! The `{name}` task: a dataset `{name}.synthetic` (two Gaussian blobs in 4 dimensions, one
//! input named `x`) and a model `{name}.linear` (one linear layer). Replace both with your data
//! and network; keep every model passing the gradient-coverage check.

use std::collections::BTreeMap;

use distill_rt::candle::{Device, Tensor};
use distill_rt::metrics::{ClassificationMetrics, MetricAccumulator};
use distill_rt::model::PENULTIMATE;
use distill_rt::nn::Linear;
use distill_rt::rng::Rng;
use distill_rt::{
    Batch, Config, Dataset, DatasetFactory, DatasetInfo, Error, Model, ModelContext,
    ModelFactory, ModelOutput, Registrar, Result, Split, TaskKind, TensorMap, config,
};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.dataset("{name}.synthetic", SyntheticFactory)?;
    r.model("{name}.linear", LinearFactory)
}

const WIDTH: usize = 4;

/// Dataset keys and defaults.
#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct SyntheticConfig {
    samples: usize,
    seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            samples: 200,
            seed: 0,
        }
    }
}

/// Builds [`Synthetic`].
pub struct SyntheticFactory;

impl DatasetFactory for SyntheticFactory {
    fn summary(&self) -> &str {
        "two Gaussian blobs in 4 dimensions; `samples` (200) per split, `seed` (0)"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<SyntheticConfig>()
    }
    fn build(&self, cfg: &Config) -> Result<Box<dyn Dataset>> {
        let c: SyntheticConfig = config::parse("dataset {name}.synthetic", cfg)?;
        config::require_positive("dataset {name}.synthetic", &[("samples", c.samples)])?;
        let split = |purpose: &str| {
            let mut rng = Rng::derive(c.seed, purpose);
            (0..c.samples)
                .map(|_| {
                    let label = rng.below(2) as u32;
                    let centre = if label == 1 { 1.0 } else { -1.0 };
                    let x: Vec<f32> = (0..WIDTH).map(|_| (centre + rng.normal()) as f32).collect();
                    (x, label)
                })
                .collect::<Vec<_>>()
        };
        Ok(Box::new(Synthetic {
            info: DatasetInfo {
                task: TaskKind::Classification,
                num_classes: 2,
                inputs: BTreeMap::from([("x".to_string(), vec![WIDTH])]),
                cardinality: BTreeMap::new(),
                split_sizes: [c.samples; 3],
                primary_metric: "accuracy".into(),
            },
            splits: [split("train"), split("validation"), split("test")],
        }))
    }
}

/// The blobs of each split.
pub struct Synthetic {
    info: DatasetInfo,
    splits: [Vec<(Vec<f32>, u32)>; 3],
}

impl Dataset for Synthetic {
    fn info(&self) -> &DatasetInfo {
        &self.info
    }
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        let samples = &self.splits[split as usize];
        let mut x: Vec<f32> = Vec::with_capacity(indices.len() * WIDTH);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            let (features, label) = samples.get(i).ok_or_else(|| {
                Error::Invalid(format!("{} sample {i} out of range", split.name()))
            })?;
            x.extend(features);
            y.push(*label);
        }
        let ids: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        Ok(Batch {
            inputs: BTreeMap::from([(
                "x".to_string(),
                Tensor::from_vec(x, (indices.len(), WIDTH), device)?,
            )]),
            targets: Tensor::new(y.as_slice(), device)?,
            soft_targets: None,
            indices: Tensor::new(ids.as_slice(), device)?,
        })
    }
    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
        Ok(Box::new(ClassificationMetrics::new(2)))
    }
}

/// Builds [`LinearModel`]; takes no keys.
pub struct LinearFactory;

#[derive(distill_rt::serde::Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
struct LinearConfig {}

impl ModelFactory for LinearFactory {
    fn summary(&self) -> &str {
        "one linear layer from the input `x` to the classes"
    }
    fn defaults(&self) -> Config {
        Config::Object(Default::default())
    }
    fn build(&self, cfg: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        let LinearConfig {} = config::parse("model {name}.linear", cfg)?;
        let width = ctx.dataset.inputs.get("x").map_or(0, |s| s.iter().product());
        Ok(Box::new(LinearModel {
            layer: Linear::new(width, ctx.dataset.num_classes, ctx.vb.pp("fc"))?,
        }))
    }
}

/// `logits = x W^T + b`; the input is the penultimate feature.
pub struct LinearModel {
    layer: Linear,
}

impl Model for LinearModel {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let x = inputs
            .get("x")
            .ok_or_else(|| Error::Invalid("model {name}.linear reads the input `x`".into()))?;
        Ok(ModelOutput {
            logits: self.layer.forward(x)?,
            features: BTreeMap::from([(PENULTIMATE.to_string(), x.clone())]),
        })
    }
    fn flops_per_sample(&self) -> u64 {
        self.layer.macs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_rt::candle::DType;
    use distill_rt::candle_nn::VarMap;
    use distill_rt::init::seeded_var_builder;
    use distill_rt::ops;
    use distill_rt::testing::{check_gradient_coverage, named_vars};

    #[test]
    fn the_model_reads_a_batch_and_every_weight_gets_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let data = SyntheticFactory.build(&Config::Null)?;
        let varmap = VarMap::new();
        let model = LinearFactory.build(
            &Config::Null,
            ModelContext {
                dataset: data.info(),
                seed: 0,
                vb: seeded_var_builder(&varmap, 0, DType::F32, &dev),
            },
        )?;
        let batch = data.batch(Split::Train, &[0, 1, 2, 3], &dev)?;
        let out = model.forward(&batch.inputs, true)?;
        assert_eq!(out.logits.dims(), &[4, 2]);
        let loss = ops::label_loss(&out.logits, &batch)?;
        check_gradient_coverage(&named_vars(&varmap), &[], &loss.backward()?)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(())
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_gain_one_line_and_bad_names_are_refused() -> Result<()> {
        let manifest = "[workspace]\nmembers = [\n    \"a\",\n    \"b\",\n]\n\n[x]\ny = 1\n";
        let got = add_member(manifest, "plugins/c")?;
        assert_eq!(
            got,
            "[workspace]\nmembers = [\n    \"a\",\n    \"b\",\n    \"plugins/c\",\n]\n\n[x]\ny = 1\n"
        );
        assert!(add_member(&got, "plugins/c").is_err());
        let root = std::env::temp_dir();
        for bad in ["", "Cos", "9x", "a_b", "a-"] {
            assert!(new_plugin(&root, Kind::Strategy, bad).is_err(), "{bad}");
        }
        assert_eq!(title("cosine-hint"), "CosineHint");
        Ok(())
    }
}
