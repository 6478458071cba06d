//! Experiment files: the schema, reading with figment (the file, then `DISTILL_*` environment
//! variables, then `--set key=value`), and structural validation. Names of datasets, models and
//! strategies and their own configuration keys are checked later by `distill check`, which knows
//! the plugins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use serde_json::Value;

/// One experiment file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name of the experiment (default: the file's stem); results go to `reports/<name>/`.
    pub name: Option<String>,
    /// Seeds of the student runs; each cell runs once per seed.
    pub seeds: Vec<u64>,
    /// Seed of the teachers (trained once per dataset and teacher, shared by all students).
    #[serde(default)]
    pub teacher_seed: u64,
    /// Workers run at the same time (`--jobs` overrides).
    #[serde(default)]
    pub jobs: Option<usize>,
    /// A worker running longer than this is stopped and its job marked failed (under Slurm:
    /// the jobs' time limit, unless `slurm.time` sets one).
    #[serde(default)]
    pub timeout_minutes: Option<f64>,
    /// Where the jobs run: `local` (the default) or `slurm` (`--executor` overrides).
    #[serde(default)]
    pub executor: Option<Executor>,
    /// What every `sbatch` asks for when the jobs run on Slurm.
    #[serde(default)]
    pub slurm: crate::slurm::SlurmConfig,
    /// Training settings shared by teachers and students (a `train` table in an entry overrides
    /// keys of it).
    #[serde(default)]
    pub train: Value,
    /// The datasets of the grid.
    pub datasets: Vec<DatasetEntry>,
    /// The teachers of the grid (may be empty when every strategy works without one).
    #[serde(default)]
    pub teachers: Vec<TeacherEntry>,
    /// The students of the grid.
    pub students: Vec<StudentEntry>,
    /// The strategies of the grid.
    pub strategies: Vec<StrategyEntry>,
}

/// Where the jobs of a run execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// Worker processes on this machine, `jobs` at a time.
    Local,
    /// Job arrays submitted to Slurm with `sbatch` (`[slurm]` table; docs/cluster.md).
    Slurm,
}

/// `[[datasets]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// Registered dataset name.
    pub name: String,
    /// Its configuration table.
    #[serde(default)]
    pub config: Value,
}

/// `[[teachers]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherEntry {
    /// Registered model name.
    pub model: String,
    /// Its configuration table.
    #[serde(default)]
    pub config: Value,
    /// Overrides of the shared `train` table.
    #[serde(default)]
    pub train: Value,
    /// Overrides of the dataset's configuration for this teacher's training, limited to
    /// [`TEACHER_DATASET_KEYS`]: a teacher trained on more labelled samples, or with other
    /// augmentation, than its students.
    #[serde(default)]
    pub dataset: Value,
    /// Pretrained weights (safetensors) to load instead of training.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// Teacher features to cache besides logits (default: `penultimate`).
    #[serde(default)]
    pub cache_features: Option<Vec<String>>,
    /// Whether it teaches every strategy entry in turn (default); `false` for a teacher that only
    /// the strategy entries naming it in their `teachers` use.
    #[serde(default = "yes")]
    pub in_grid: bool,
}

/// The dataset keys a teacher may override: those that change which training samples it sees
/// and how they are augmented, never the validation and test splits (a teacher trained on its
/// students' validation or test samples would leak them into their results).
pub const TEACHER_DATASET_KEYS: [&str; 2] = ["max_train", "augment"];

fn yes() -> bool {
    true
}

/// `[[students]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentEntry {
    /// Registered model name.
    pub model: String,
    /// Its configuration table.
    #[serde(default)]
    pub config: Value,
    /// Overrides of the shared `train` table.
    #[serde(default)]
    pub train: Value,
}

/// `[[strategies]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyEntry {
    /// Registered strategy name.
    pub name: String,
    /// Its configuration table.
    #[serde(default)]
    pub config: Value,
    /// Parameters to sweep: each key gets each listed value (the product over keys).
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<Value>>,
    /// A born-again chain of this many generations instead of the experiment's teachers: the
    /// student's own architecture trained alone teaches generation 1, which teaches 2, ...
    #[serde(default)]
    pub generations: Option<usize>,
    /// The teachers (indices into `[[teachers]]`) that teach this entry's jobs together, instead of
    /// each teacher of the grid in turn; the strategy receives their outputs combined.
    #[serde(default)]
    pub teachers: Option<Vec<usize>>,
}

/// The `DISTILL_*` variables that configure the workers and plugins rather than the
/// experiment (without the prefix): the log filter, extra plugin files, the CBLAS library, the
/// plots' font, the data cache and its mirrors, and the tests' Python environment.
const RUNTIME_VARIABLES: [&str; 7] = [
    "LOG",
    "EXTRA_PLUGINS",
    "CBLAS",
    "FONT",
    "DATA",
    "DATA_MIRROR",
    "VENV",
];

/// Reads `path`, then `DISTILL_*` variables (`DISTILL_TRAIN__EPOCHS=2`; not those of
/// [`RUNTIME_VARIABLES`]), then `--set` pairs (`train.epochs=2`), and checks the structure.
/// Errors name the file and the key.
pub fn load(path: &Path, sets: &[String]) -> Result<(Experiment, String)> {
    if !path.is_file() {
        bail!("{}: no such experiment file", path.display());
    }
    let mut figment = Figment::new().merge(Toml::file_exact(path)).merge(
        Env::prefixed("DISTILL_")
            .split("__")
            .ignore(&RUNTIME_VARIABLES),
    );
    for set in sets {
        let (key, value) = set
            .split_once('=')
            .with_context(|| format!("--set {set}: expected key=value"))?;
        let key = key.trim();
        let as_toml = format!("{key} = {value}");
        let snippet = if toml_value_ok(&as_toml) {
            as_toml
        } else {
            format!("{key} = {}", Value::String(value.to_string()))
        };
        figment = figment.merge(Toml::string(&snippet));
    }
    let experiment: Experiment = figment.extract().map_err(|e| {
        let messages: Vec<String> = e.into_iter().map(|e| describe(path, &e)).collect();
        anyhow::anyhow!(messages.join("\n"))
    })?;
    let name = match &experiment.name {
        Some(n) => n.clone(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "experiment".into()),
    };
    if !is_identifier(&name) {
        let whence = if experiment.name.is_some() {
            "key `name`"
        } else {
            "the file's name (set key `name`)"
        };
        bail!(
            "{}: {whence}: experiment name `{name}` is not an identifier: it names the results \
             folder `reports/<name>`, so use ASCII letters, digits, `-`, `_` and `.` (at most 100, \
             starting with a letter or digit, no `..`)",
            path.display()
        );
    }
    validate(path, &experiment)?;
    Ok((experiment, name))
}

/// A name that can only be one folder inside the results folder: no separator, no `..`, not
/// absolute, not hidden.
fn is_identifier(name: &str) -> bool {
    name.len() <= 100
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.contains("..")
}

fn toml_value_ok(snippet: &str) -> bool {
    Figment::new()
        .merge(Toml::string(snippet))
        .extract::<BTreeMap<String, Value>>()
        .is_ok()
}

/// `file: key `a.b`: message` for one figment error.
fn describe(path: &Path, e: &figment::Error) -> String {
    let key = if e.path.is_empty() {
        "(top level)".to_string()
    } else {
        e.path.join(".")
    };
    let source = match &e.metadata {
        Some(m) if m.name.contains("environment") => "environment variable".to_string(),
        Some(m) if m.source.is_none() => "--set".to_string(),
        _ => path.display().to_string(),
    };
    format!("{source}: key `{key}`: {}", e.kind)
}

fn validate(path: &Path, x: &Experiment) -> Result<()> {
    let file = path.display();
    let mut problems = Vec::new();
    for (key, empty) in [
        ("seeds", x.seeds.is_empty()),
        ("datasets", x.datasets.is_empty()),
        ("students", x.students.is_empty()),
        ("strategies", x.strategies.is_empty()),
    ] {
        if empty {
            problems.push(format!(
                "{file}: key `{key}`: empty, so the grid has no runs"
            ));
        }
    }
    problems.extend(x.slurm.problems(&file.to_string()));
    if x.jobs == Some(0) {
        problems.push(format!("{file}: key `jobs`: must be at least 1"));
    }
    if let Some(t) = x.timeout_minutes
        && (t.is_nan() || t <= 0.0)
    {
        problems.push(format!(
            "{file}: key `timeout_minutes`: must be > 0, got {t}"
        ));
    }
    for (i, s) in x.strategies.iter().enumerate() {
        if s.generations == Some(0) {
            problems.push(format!(
                "{file}: key `strategies[{i}].generations`: must be at least 1"
            ));
        }
        if let Some(list) = &s.teachers {
            let key = format!("{file}: key `strategies[{i}].teachers`");
            if list.is_empty() {
                problems.push(format!(
                    "{key}: empty; leave it out for each teacher in turn"
                ));
            }
            if s.generations.is_some() {
                problems.push(format!(
                    "{key}: a born-again chain (`generations`) makes its own teachers"
                ));
            }
            for &t in list {
                if t >= x.teachers.len() {
                    problems.push(format!(
                        "{key}: no teacher {t}: the file has {} [[teachers]] (indices from 0)",
                        x.teachers.len()
                    ));
                }
            }
            let mut unique = list.clone();
            unique.sort_unstable();
            unique.dedup();
            if unique.len() != list.len() {
                problems.push(format!("{key}: names a teacher twice"));
            }
        }
        for (k, values) in &s.grid {
            if values.is_empty() {
                problems.push(format!(
                    "{file}: key `strategies[{i}].grid.{k}`: empty list, so the grid has no runs"
                ));
            }
        }
    }
    let tables = [("train", &x.train)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            x.teachers
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("teachers[{i}].train"), &t.train)),
        )
        .chain(
            x.students
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("students[{i}].train"), &s.train)),
        );
    for (key, v) in tables {
        if !(v.is_null() || v.is_object()) {
            problems.push(format!("{file}: key `{key}`: must be a table"));
        }
    }
    for (i, t) in x.teachers.iter().enumerate() {
        let key = format!("{file}: key `teachers[{i}].dataset`");
        match &t.dataset {
            Value::Null => {}
            Value::Object(overrides) => {
                for k in overrides.keys() {
                    if !TEACHER_DATASET_KEYS.contains(&k.as_str()) {
                        problems.push(format!(
                            "{key}: `{k}` cannot differ between a teacher and its students: a \
                             teacher may override only {} (keys that keep the validation and \
                             test splits)",
                            TEACHER_DATASET_KEYS.map(|k| format!("`{k}`")).join(" and ")
                        ));
                    }
                }
            }
            _ => problems.push(format!("{key}: must be a table")),
        }
        if let Some(w) = &t.weights
            && !w.is_file()
        {
            problems.push(format!(
                "{file}: key `teachers[{i}].weights`: {} does not exist",
                w.display()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("xtask-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path
    }

    const GOOD: &str = r#"
seeds = [0, 1]
[train]
epochs = 2
[[datasets]]
name = "vision.synthetic"
[[students]]
model = "vision.mlp"
[[strategies]]
name = "baseline"
"#;

    #[test]
    fn set_overrides_and_name_defaults_to_the_stem() -> Result<()> {
        let path = write("good", GOOD);
        let (x, name) = load(&path, &["train.epochs=5".into(), "seeds=[3]".into()])?;
        assert_eq!(x.train["epochs"], 5);
        assert_eq!(x.seeds, vec![3]);
        assert!(name.ends_with("-good"));
        Ok(())
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let err = |text: &str| {
            load(&write("bad", text), &[])
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        let e = err(&GOOD.replace("seeds = [0, 1]", "seeds = [0, 1]\nseedz = 3"));
        assert!(e.contains("xtask-") && e.contains("seedz"), "{e}");
        let e = err(&GOOD.replace("seeds = [0, 1]", "seeds = \"zero\""));
        assert!(e.contains("key `seeds`"), "{e}");
        let e = err(&GOOD.replace("seeds = [0, 1]", "seeds = []"));
        assert!(e.contains("key `seeds`") && e.contains("no runs"), "{e}");
        let e = err(&GOOD.replace("name = \"baseline\"", "name = \"kd\"\nteachers = [0, 2]"));
        assert!(
            e.contains("key `strategies[0].teachers`") && e.contains("no teacher 0"),
            "{e}"
        );
        // A teacher may see more training samples than its students, never other splits.
        let teacher = |overrides: &str| {
            GOOD.replace(
                "[[students]]",
                &format!(
                    "[[teachers]]\nmodel = \"vision.mlp\"\ndataset = {overrides}\n[[students]]"
                ),
            )
        };
        let e = err(&teacher("{ max_train = 10, validation_fraction = 0.5 }"));
        assert!(
            e.contains("key `teachers[0].dataset`")
                && e.contains("`validation_fraction` cannot differ")
                && !e.contains("`max_train` cannot"),
            "{e}"
        );
        let e = err(&teacher("3"));
        assert!(
            e.contains("key `teachers[0].dataset`: must be a table"),
            "{e}"
        );
        assert!(load(&write("teacher-data", &teacher("{ max_train = 10 }")), &[]).is_ok());
    }

    #[test]
    fn names_that_could_leave_the_results_folder_are_refused() {
        for bad in [
            "../../../outside",
            "/tmp/abs",
            "a/b",
            "..",
            "x..y",
            ".hidden",
            "",
            "a b",
            "a\\b",
        ] {
            let text = format!("name = {}\n{GOOD}", serde_json::Value::String(bad.into()));
            let e = load(&write("name", &text), &[])
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(
                e.contains("key `name`") && e.contains("not an identifier"),
                "{bad:?}: {e}"
            );
        }
        for good in ["quick", "cifar-100_kd.v2", "2026"] {
            assert!(is_identifier(good), "{good}");
        }
    }
}
