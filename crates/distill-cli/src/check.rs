//! `distill check`: validates every job of a plan against the loaded plugins before anything
//! trains — names exist (with suggestions), configuration tables have only known keys and sane
//! values, models fit their dataset, strategies fit their student and teacher — and reports each
//! problem with the experiment file and the key it comes from.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use distill_engine::job::{Job, JobSpec};
use distill_engine::train::TrainConfig;
use distill_rt::candle::{DType, Device};
use distill_rt::candle_nn::VarMap;
use distill_rt::init::seeded_var_builder;
use distill_rt::strategy::combine_teachers;
use distill_rt::{Config, Dataset, Error, ModelContext, Registrar, Split, StrategyContext, config};
use serde::Deserialize;

/// The plan the orchestrator writes: every job with where its parts come from.
#[derive(Deserialize)]
pub struct Plan {
    /// The experiment file, for messages.
    pub experiment_file: String,
    /// The jobs.
    pub jobs: Vec<PlanEntry>,
}

/// One job of the plan.
#[derive(Deserialize)]
pub struct PlanEntry {
    /// The job file's content.
    pub spec: serde_json::Value,
    /// Part (`dataset`, `model`, `strategy`, `teacher`, `train`) -> key in the experiment file;
    /// `dataset_override` names a teacher's overrides of its dataset's configuration.
    pub origin: BTreeMap<String, String>,
}

/// `file: key `k`: message` for an error of the part `part` of a job.
fn locate(file: &str, origin: &BTreeMap<String, String>, part: &str, e: &Error) -> String {
    let base = origin
        .get(part)
        .cloned()
        .unwrap_or_else(|| part.to_string());
    match e {
        Error::Config { key, .. } if part == "train" => format!("{file}: key `{base}.{key}`: {e}"),
        Error::Config { key, .. }
            if part == "dataset" && origin.contains_key("dataset_override") =>
        {
            format!(
                "{file}: key `{base}.config.{key}` (or `{}.{key}`, which overrides it for this \
                 teacher): {e}",
                origin["dataset_override"]
            )
        }
        Error::Config { key, .. } => format!("{file}: key `{base}.config.{key}`: {e}"),
        Error::Unknown { .. } => format!("{file}: key `{base}`: {e}"),
        _ => format!("{file}: `{base}`: {e}"),
    }
}

/// Checks the plan; returns one message per problem found (empty when all is well).
pub fn check(registrar: &Registrar, plan: &Plan) -> Vec<String> {
    let file = plan.experiment_file.as_str();
    let mut problems = BTreeSet::new();
    let mut datasets: HashMap<String, Option<Box<dyn Dataset>>> = HashMap::new();
    let device = Device::Cpu;
    for entry in &plan.jobs {
        let origin = &entry.origin;
        let train_value = entry
            .spec
            .pointer("/job/train")
            .cloned()
            .unwrap_or(Config::Null);
        match config::parse::<TrainConfig>("train", &train_value)
            .and_then(|t| t.validate().map(|_| t))
        {
            Ok(_) => {}
            Err(e) => {
                problems.insert(locate(file, origin, "train", &e));
                continue;
            }
        }
        let spec: JobSpec = match serde_json::from_value(entry.spec.clone()) {
            Ok(s) => s,
            Err(e) => {
                problems.insert(format!("{file}: a planned job is malformed: {e}"));
                continue;
            }
        };
        let (dataset, model, strategy, teachers) = match &spec.job {
            Job::Teacher { dataset, model, .. } => (dataset, model, None, Vec::new()),
            Job::Student {
                dataset,
                model,
                strategy,
                teachers,
                ..
            } => (
                dataset,
                model,
                Some(strategy),
                teachers.iter().map(|t| &t.model).collect(),
            ),
        };
        let key = format!("{}{}", dataset.name, dataset.config);
        let data = datasets.entry(key).or_insert_with(|| {
            match registrar
                .get_dataset(&dataset.name)
                .and_then(|f| f.build(&dataset.config))
            {
                Ok(d) => Some(d),
                Err(e) => {
                    problems.insert(locate(file, origin, "dataset", &e));
                    None
                }
            }
        });
        let Some(data) = data else { continue };
        let build = |c: &distill_engine::job::Component| -> distill_rt::Result<(Box<dyn distill_rt::Model>, VarMap)> {
            let varmap = VarMap::new();
            let ctx = ModelContext { dataset: data.info(), seed: 0, vb: seeded_var_builder(&varmap, 0, DType::F32, &device) };
            Ok((registrar.get_model(&c.name)?.build(&c.config, ctx)?, varmap))
        };
        let student = match build(model) {
            Ok(m) => m,
            Err(e) => {
                problems.insert(locate(file, origin, "model", &e));
                continue;
            }
        };
        let Some(strategy) = strategy else { continue };
        let teacher_models = match teachers
            .into_iter()
            .map(&build)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(t) => t,
            Err(e) => {
                problems.insert(locate(file, origin, "teacher", &e));
                continue;
            }
        };
        let probe = (|| -> distill_rt::Result<_> {
            let n = data.info().len(Split::Train);
            let batch = data.batch(Split::Train, &[0, 1.min(n.saturating_sub(1))], &device)?;
            let s = student.0.forward(&batch.inputs, false)?.feature_shapes();
            let t = if teacher_models.is_empty() {
                BTreeMap::new()
            } else {
                let outputs = teacher_models
                    .iter()
                    .map(|(m, _)| m.forward(&batch.inputs, false))
                    .collect::<distill_rt::Result<Vec<_>>>()?;
                combine_teachers(outputs)?.feature_shapes()
            };
            Ok((s, t))
        })();
        let (sf, tf) = match probe {
            Ok(p) => p,
            Err(e) => {
                problems.insert(locate(file, origin, "model", &e));
                continue;
            }
        };
        let varmap = VarMap::new();
        let ctx = StrategyContext {
            num_classes: data.info().num_classes,
            student_features: &sf,
            teacher_features: &tf,
            train_samples: data.info().len(Split::Train),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &device),
        };
        match registrar
            .get_strategy(&strategy.name)
            .and_then(|f| f.build(&strategy.config, ctx))
        {
            Ok(s) if s.teacher_needs().teacher && teacher_models.is_empty() => {
                problems.insert(format!(
                    "{file}: key `{}`: strategy `{}` needs a teacher; add a [[teachers]] entry",
                    origin.get("strategy").map_or("strategies", String::as_str),
                    strategy.name
                ));
            }
            Ok(_) => {}
            Err(e) => {
                problems.insert(locate(file, origin, "strategy", &e));
            }
        }
    }
    problems.into_iter().collect()
}
