//! Expands an experiment into content-addressed jobs: one teacher job per dataset and teacher,
//! one student job per dataset x teacher x student x strategy x grid point x seed. A job's id is
//! a hash of everything that determines its result: its configuration, its teachers' ids and the
//! versions of the code that computes it (the engine and the plugins of its dataset, model and
//! strategy; ARCHITECTURE.md, "Job identity"). A finished job is found again on a re-run, growing
//! the grid reuses what exists, and a job computed by other code runs again, unless the user asks
//! to reuse it (`--reuse-stale`): then it is marked stale.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::experiment::Experiment;

/// The code versions of the build that will run the jobs (`distill code-versions`): the
/// engine's, and the plugin version behind each registered name.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CodeIndex {
    /// `engine:<hex>`.
    pub engine: String,
    /// Dataset name -> `<plugin>:<hex>`.
    pub dataset: BTreeMap<String, String>,
    /// Model name -> `<plugin>:<hex>`.
    pub model: BTreeMap<String, String>,
    /// Strategy name -> `<plugin>:<hex>`.
    pub strategy: BTreeMap<String, String>,
}

impl CodeIndex {
    /// The `code` of a job (the engine's `CodeVersions`); an unknown name gets an empty version
    /// (`distill check` reports the name).
    fn of(&self, job: &Value) -> Value {
        let version = |map: &BTreeMap<String, String>, part: &str| {
            job[part]["name"]
                .as_str()
                .and_then(|n| map.get(n))
                .cloned()
                .unwrap_or_default()
        };
        let mut code = json!({
            "engine": self.engine,
            "dataset": version(&self.dataset, "dataset"),
            "model": version(&self.model, "model"),
        });
        if job.get("strategy").is_some() {
            code["strategy"] = version(&self.strategy, "strategy").into();
        }
        code
    }
}

/// The jobs already finished in an experiment's `jobs/` folder, by id and by code-free
/// identity (`spec_id`).
#[derive(Debug, Default)]
pub struct Finished {
    ids: std::collections::BTreeSet<String>,
    /// spec_id -> (id, folder) of the newest finished job with that spec_id.
    by_spec: BTreeMap<String, (String, PathBuf)>,
}

impl Finished {
    /// Scans `jobs_dir`: every folder whose record says `ok` or `diverged`. A folder planned
    /// before code versions has no `spec_id` in its `job.json`; its id is one (it hashed the
    /// same content without code).
    pub fn scan(jobs_dir: &Path) -> Self {
        let mut found = Self::default();
        let mut newest: BTreeMap<String, f64> = BTreeMap::new();
        for entry in std::fs::read_dir(jobs_dir).into_iter().flatten().flatten() {
            let dir = entry.path();
            let id = entry.file_name().to_string_lossy().into_owned();
            let Some(record) = crate::record::finished_record(&dir) else {
                continue;
            };
            if record.status == "failed" {
                continue;
            }
            let spec_id = std::fs::read(dir.join("job.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                .and_then(|v| v["spec_id"].as_str().map(String::from))
                .unwrap_or_else(|| id.clone());
            if newest.get(&spec_id).is_none_or(|t| *t < record.finished_at) {
                newest.insert(spec_id.clone(), record.finished_at);
                found.by_spec.insert(spec_id, (id.clone(), dir));
            }
            found.ids.insert(id);
        }
        found
    }
}

impl Finished {
    /// A job with this id has finished.
    pub fn has(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// A job with this code-free identity has finished (with whichever code).
    pub fn has_older(&self, spec_id: &str) -> bool {
        self.by_spec.contains_key(spec_id)
    }
}

/// One job of the plan.
#[derive(Clone, Debug)]
pub struct PlannedJob {
    /// Content address (configuration, teachers and code).
    pub id: String,
    /// Content address without the code versions.
    pub spec_id: String,
    /// Its result comes from other code, reused on request (`--reuse-stale`), or one of its
    /// teachers' does.
    pub stale: bool,
    /// The job file's content (the engine's `JobSpec`).
    pub spec: Value,
    /// The teacher jobs it waits for.
    pub depends_on: Vec<String>,
    /// Where in the experiment file each part comes from (`dataset` -> `datasets[0]`), so that
    /// `distill check` can name the key of a bad value.
    pub origin: BTreeMap<String, String>,
    /// A short description for progress and logs.
    pub label: String,
    /// The job's folder.
    pub dir: PathBuf,
}

/// Overlays `over` onto `base` (tables merge key by key; other values replace).
pub fn merge(base: &Value, over: &Value) -> Value {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            let mut out = b.clone();
            for (k, v) in o {
                let merged = match out.get(k) {
                    Some(existing) => merge(existing, v),
                    None => v.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (b, Value::Null) => b.clone(),
        (_, o) => o.clone(),
    }
}

fn table(v: &Value) -> Value {
    if v.is_null() { json!({}) } else { v.clone() }
}

/// The first 16 hex digits of the SHA-256 of `v`'s canonical JSON (keys sorted).
pub fn content_id(v: &Value) -> String {
    let digest = Sha256::digest(v.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Every combination of the grid's values: `{a: [1, 2], b: [x]}` -> `[{a:1,b:x}, {a:2,b:x}]`.
fn grid_points(grid: &BTreeMap<String, Vec<Value>>) -> Vec<Value> {
    let mut points = vec![serde_json::Map::new()];
    for (k, values) in grid {
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.insert(k.clone(), v.clone());
                    q
                })
            })
            .collect();
    }
    points.into_iter().map(Value::Object).collect()
}

/// Where a job's train settings come from: the shared `train` table, unless the entry has its own.
fn train_origin(own: &Value, key: &str) -> String {
    if own.as_object().is_some_and(|o| !o.is_empty()) {
        key.to_string()
    } else {
        "train".to_string()
    }
}

/// What the plan needs besides the experiment: the code of this build, what has finished
/// before, and whether results of other code are reused.
pub struct PlanInputs<'a> {
    /// The build's code versions.
    pub code: &'a CodeIndex,
    /// The finished jobs of the results folder.
    pub finished: &'a Finished,
    /// Reuse a finished job computed by other code (marked stale) instead of running it again.
    pub reuse_stale: bool,
}

/// Where the jobs of one experiment go, and what every job spec names.
struct Jobs<'a> {
    experiment: &'a str,
    dir: PathBuf,
    inputs: &'a PlanInputs<'a>,
    list: Vec<PlannedJob>,
}

impl Jobs<'_> {
    /// Adds a job computing `job` whose teachers are `teachers`; `content` is what identifies it
    /// besides code and teachers. Returns it as its students refer to it.
    fn push(
        &mut self,
        content: &Value,
        job: Value,
        teachers: &[&TeacherJob],
        origin: BTreeMap<String, String>,
        label: String,
    ) -> TeacherJob {
        let with_teachers = |id: fn(&TeacherJob) -> &String| {
            let mut content = content.clone();
            if job["kind"] == "student" {
                let hashed: Vec<Value> = teachers
                    .iter()
                    .map(|t| json!({"model": t.model, "id": id(t)}))
                    .collect();
                content["teacher"] = match hashed.as_slice() {
                    [] => Value::Null,
                    [one] => one.clone(),
                    _ => Value::Array(hashed),
                };
            }
            content
        };
        let spec_id = content_id(&with_teachers(|t| &t.spec_id));
        let code = self.inputs.code.of(&job);
        let mut full = with_teachers(|t| &t.id);
        full["code"] = code.clone();
        let mut id = content_id(&full);
        let mut dir = self.dir.join(&id);
        let mut stale = teachers.iter().any(|t| t.stale);
        if self.inputs.reuse_stale
            && !self.inputs.finished.ids.contains(&id)
            && let Some((old, old_dir)) = self.inputs.finished.by_spec.get(&spec_id)
        {
            (id, dir, stale) = (old.clone(), old_dir.clone(), true);
        }
        if !self.list.iter().any(|j| j.id == id) {
            self.list.push(PlannedJob {
                id: id.clone(),
                spec_id: spec_id.clone(),
                stale,
                spec: json!({"id": id, "spec_id": spec_id, "code": code,
                             "experiment": self.experiment, "out_dir": dir, "job": job}),
                depends_on: teachers.iter().map(|t| t.id.clone()).collect(),
                origin,
                label,
                dir: dir.clone(),
            });
        }
        TeacherJob {
            id,
            spec_id,
            stale,
            model: job["model"].clone(),
            dir,
        }
    }

    /// Adds a teacher job.
    fn teacher(
        &mut self,
        job: Value,
        origin: BTreeMap<String, String>,
        label: String,
    ) -> TeacherJob {
        self.push(&job, job.clone(), &[], origin, label)
    }

    /// Adds a student job taught by `teachers`: their ids are hashed into its identity
    /// (`teacher`: null, one, or a list for several), their folders written into the spec, and
    /// the job waits for them.
    fn student(
        &mut self,
        content: Value,
        teachers: &[&TeacherJob],
        origin: BTreeMap<String, String>,
        label: String,
    ) -> TeacherJob {
        let mut job = content.clone();
        job["teachers"] = teachers
            .iter()
            .map(|t| json!({"model": t.model, "dir": t.dir}))
            .collect();
        self.push(&content, job, teachers, origin, label)
    }
}

/// A planned job, as the students it teaches refer to it.
struct TeacherJob {
    id: String,
    spec_id: String,
    stale: bool,
    /// Its model component.
    model: Value,
    dir: PathBuf,
}

/// Which key of the experiment file each part of a job comes from.
fn origins(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// All jobs of experiment `x` named `name`, teachers first; folders under `out/jobs/`.
pub fn plan(x: &Experiment, name: &str, out: &Path, inputs: &PlanInputs<'_>) -> Vec<PlannedJob> {
    let mut jobs = Jobs {
        experiment: name,
        dir: out.join("jobs"),
        inputs,
        list: Vec::new(),
    };
    let shared_train = table(&x.train);
    // (dataset index, teacher index) -> the teacher job
    let mut teachers: BTreeMap<(usize, usize), TeacherJob> = BTreeMap::new();
    for (di, d) in x.datasets.iter().enumerate() {
        for (ti, t) in x.teachers.iter().enumerate() {
            let dataset = json!({"name": d.name, "config": merge(&table(&d.config), &t.dataset)});
            let model = json!({"name": t.model, "config": table(&t.config)});
            let job = json!({
                "kind": "teacher",
                "dataset": dataset,
                "model": model,
                "train": merge(&shared_train, &t.train),
                "seed": x.teacher_seed,
                "cache_features": t.cache_features.clone().unwrap_or_else(|| vec!["penultimate".into()]),
                "weights": t.weights,
            });
            let mut origin = origins(&[
                ("dataset", format!("datasets[{di}]")),
                ("model", format!("teachers[{ti}]")),
                (
                    "train",
                    train_origin(&t.train, &format!("teachers[{ti}].train")),
                ),
            ]);
            if t.dataset.as_object().is_some_and(|o| !o.is_empty()) {
                origin.insert("dataset_override".into(), format!("teachers[{ti}].dataset"));
            }
            let label = format!("teacher {} on {}", t.model, d.name);
            teachers.insert((di, ti), jobs.teacher(job, origin, label));
        }
    }
    // Each teacher of the grid in turn, or none when the grid has none.
    let in_grid: Vec<Vec<usize>> = match x
        .teachers
        .iter()
        .enumerate()
        .filter(|(_, t)| t.in_grid)
        .map(|(ti, _)| vec![ti])
        .collect::<Vec<_>>()
    {
        none if none.is_empty() => vec![Vec::new()],
        each => each,
    };
    for (di, d) in x.datasets.iter().enumerate() {
        let dataset = json!({"name": d.name, "config": table(&d.config)});
        for (si, s) in x.students.iter().enumerate() {
            for (ki, k) in x.strategies.iter().enumerate() {
                if k.generations.is_some() {
                    continue; // a born-again chain, planned below
                }
                let teacher_sets = match &k.teachers {
                    Some(together) => vec![together.clone()],
                    None => in_grid.clone(),
                };
                for set in teacher_sets {
                    let taught_by: Vec<&TeacherJob> =
                        set.iter().map(|ti| &teachers[&(di, *ti)]).collect();
                    for point in grid_points(&k.grid) {
                        let strategy =
                            json!({"name": k.name, "config": merge(&table(&k.config), &point)});
                        for &seed in &x.seeds {
                            let content = json!({
                                "kind": "student",
                                "dataset": dataset,
                                "model": {"name": s.model, "config": table(&s.config)},
                                "strategy": strategy,
                                "train": merge(&shared_train, &s.train),
                                "seed": seed,
                            });
                            let mut origin = origins(&[
                                ("dataset", format!("datasets[{di}]")),
                                ("model", format!("students[{si}]")),
                                ("strategy", format!("strategies[{ki}]")),
                                (
                                    "train",
                                    train_origin(&s.train, &format!("students[{si}].train")),
                                ),
                            ]);
                            match set.as_slice() {
                                [] => {}
                                [ti] => {
                                    origin.insert("teacher".into(), format!("teachers[{ti}]"));
                                }
                                _ => {
                                    origin.insert(
                                        "teacher".into(),
                                        format!("strategies[{ki}].teachers"),
                                    );
                                }
                            }
                            let point_text = if point.as_object().is_some_and(|o| o.is_empty()) {
                                String::new()
                            } else {
                                format!(" {point}")
                            };
                            let label = format!(
                                "{} <- {}{point_text} seed {seed} on {}",
                                s.model, k.name, d.name
                            );
                            jobs.student(content, &taught_by, origin, label);
                        }
                    }
                }
            }
        }
    }
    plan_chains(x, &shared_train, &mut jobs);
    jobs.list
}

/// Born-again chains: for each strategy entry with `generations = N`, dataset, student, grid
/// point and seed, a teacher job of the student's own architecture (trained alone, with the
/// student's settings and that seed), then N student jobs, each taught by the one before.
fn plan_chains(x: &Experiment, shared_train: &Value, jobs: &mut Jobs<'_>) {
    for (di, d) in x.datasets.iter().enumerate() {
        let dataset = json!({"name": d.name, "config": table(&d.config)});
        for (si, s) in x.students.iter().enumerate() {
            let model = json!({"name": s.model, "config": table(&s.config)});
            let train = merge(shared_train, &s.train);
            let train_key = train_origin(&s.train, &format!("students[{si}].train"));
            for (ki, k) in x.strategies.iter().enumerate() {
                let Some(generations) = k.generations else {
                    continue;
                };
                for point in grid_points(&k.grid) {
                    let strategy =
                        json!({"name": k.name, "config": merge(&table(&k.config), &point)});
                    for &seed in &x.seeds {
                        let first = json!({
                            "kind": "teacher",
                            "dataset": dataset,
                            "model": model,
                            "train": train,
                            "seed": seed,
                            "cache_features": ["penultimate"],
                            "weights": null,
                        });
                        let origin = origins(&[
                            ("dataset", format!("datasets[{di}]")),
                            ("model", format!("students[{si}]")),
                            ("train", train_key.clone()),
                        ]);
                        let label =
                            format!("born-again teacher {} seed {seed} on {}", s.model, d.name);
                        let mut previous = jobs.teacher(first, origin, label);
                        for generation in 1..=generations {
                            let content = json!({
                                "kind": "student",
                                "dataset": dataset,
                                "model": model,
                                "strategy": strategy,
                                "train": train,
                                "seed": seed,
                                "generation": generation,
                            });
                            let origin = origins(&[
                                ("dataset", format!("datasets[{di}]")),
                                ("model", format!("students[{si}]")),
                                ("strategy", format!("strategies[{ki}]")),
                                ("teacher", format!("students[{si}]")),
                                ("train", train_key.clone()),
                            ]);
                            let label = format!(
                                "{} <- {} generation {generation} seed {seed} on {}",
                                s.model, k.name, d.name
                            );
                            previous = jobs.student(content, &[&previous], origin, label);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overlays_tables() {
        let base = json!({"epochs": 3, "optimizer": {"name": "adamw", "lr": 0.001}});
        let over = json!({"optimizer": {"lr": 0.01}});
        assert_eq!(
            merge(&base, &over),
            json!({"epochs": 3, "optimizer": {"name": "adamw", "lr": 0.01}})
        );
        assert_eq!(merge(&base, &Value::Null), base);
    }

    #[test]
    fn grid_is_the_product() {
        let grid = BTreeMap::from([
            ("a".to_string(), vec![json!(1), json!(2)]),
            ("b".to_string(), vec![json!("x"), json!("y")]),
        ]);
        let points = grid_points(&grid);
        assert_eq!(points.len(), 4);
        assert!(points.contains(&json!({"a": 2, "b": "y"})));
        assert_eq!(grid_points(&BTreeMap::new()), vec![json!({})]);
    }

    /// The plan of experiment file `text` (written as `<name>.toml` in the temporary folder)
    /// with no finished jobs and default code versions.
    fn plan_text(name: &str, text: &str) -> anyhow::Result<Vec<PlannedJob>> {
        let path =
            std::env::temp_dir().join(format!("xtask-plan-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text)?;
        let loaded = crate::experiment::load(&path, &[]);
        let _ = std::fs::remove_file(&path);
        let (x, name) = loaded?;
        let code = CodeIndex::default();
        let finished = Finished::default();
        let inputs = PlanInputs {
            code: &code,
            finished: &finished,
            reuse_stale: false,
        };
        Ok(plan(&x, &name, Path::new("/out"), &inputs))
    }

    #[test]
    fn teachers_named_on_an_entry_teach_together() -> anyhow::Result<()> {
        let jobs = plan_text(
            "together",
            r#"
seeds = [0, 1]
[[datasets]]
name = "vision.synthetic"
[[teachers]]
model = "vision.resnet"
[[teachers]]
model = "vision.mlp"
in_grid = false
[[students]]
model = "vision.mlp"
[[strategies]]
name = "kd"
[[strategies]]
name = "multi-teacher"
teachers = [0, 1]
"#,
        )?;
        let (t0, t1) = (&jobs[0].id, &jobs[1].id);
        // The second teacher only teaches the entry that names it.
        let kd: Vec<&PlannedJob> = jobs
            .iter()
            .filter(|j| j.spec["job"]["strategy"]["name"] == "kd")
            .collect();
        assert_eq!(kd.len(), 2);
        assert!(kd.iter().all(|j| j.depends_on == [t0.clone()]));
        let multi: Vec<&PlannedJob> = jobs
            .iter()
            .filter(|j| j.spec["job"]["strategy"]["name"] == "multi-teacher")
            .collect();
        assert_eq!((jobs.len(), multi.len()), (6, 2));
        for j in multi {
            assert_eq!(j.depends_on, [t0.clone(), t1.clone()]);
            let teachers = j.spec["job"]["teachers"].as_array().map_or(0, Vec::len);
            assert_eq!(teachers, 2);
            assert_eq!(j.origin["teacher"], "strategies[1].teachers");
        }
        Ok(())
    }

    #[test]
    fn a_teacher_trains_on_its_own_dataset_overrides_and_its_students_do_not() -> anyhow::Result<()>
    {
        let experiment = |overrides: &str| -> anyhow::Result<Vec<PlannedJob>> {
            plan_text(
                "teacher-data",
                &format!(
                    r#"
seeds = [0]
[[datasets]]
name = "vision.idx"
config = {{ data = "fashion-mnist", max_train = 1000, augment = {{ crop_padding = 2, flip = true }} }}
[[teachers]]
model = "vision.resnet"
{overrides}
[[students]]
model = "vision.resnet"
[[strategies]]
name = "kd"
"#
                ),
            )
        };
        let plain = experiment("")?;
        let more = experiment("dataset = { max_train = 54000, augment = { crop_padding = 4 } }")?;
        let config = |j: &PlannedJob| j.spec["job"]["dataset"]["config"].clone();
        assert_eq!(
            config(&more[0]),
            json!({"data": "fashion-mnist", "max_train": 54000,
                   "augment": {"crop_padding": 4, "flip": true}})
        );
        assert_eq!(more[0].origin["dataset_override"], "teachers[0].dataset");
        assert!(!plain[0].origin.contains_key("dataset_override"));
        // The student's data is the dataset entry's; only its teacher (and so its id) moved.
        assert_eq!(config(&more[1]), config(&plain[1]));
        assert_eq!(config(&plain[0]), config(&plain[1]));
        assert_ne!(more[0].id, plain[0].id);
        assert_ne!(more[1].id, plain[1].id);
        assert_eq!(more[1].depends_on, [more[0].id.clone()]);
        Ok(())
    }

    /// An experiment on a vision and an NLP dataset, with a teacher and two strategies.
    fn two_tasks() -> anyhow::Result<(Experiment, String)> {
        let path = std::env::temp_dir().join(format!("xtask-code-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            r#"
seeds = [0]
[[datasets]]
name = "vision.synthetic"
[[datasets]]
name = "nlp.synthetic"
[[teachers]]
model = "big"
[[students]]
model = "small"
[[strategies]]
name = "baseline"
[[strategies]]
name = "kd"
"#,
        )?;
        let loaded = crate::experiment::load(&path, &[]);
        let _ = std::fs::remove_file(&path);
        loaded
    }

    fn code(engine: &str, vision: &str, nlp: &str, strategies: &str) -> CodeIndex {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        CodeIndex {
            engine: engine.into(),
            dataset: map(&[("vision.synthetic", vision), ("nlp.synthetic", nlp)]),
            model: map(&[("big", "models:1"), ("small", "models:1")]),
            strategy: map(&[("baseline", strategies), ("kd", strategies)]),
        }
    }

    /// (label, id, spec_id, stale) of every job.
    fn ids(
        x: &Experiment,
        code: &CodeIndex,
        finished: &Finished,
        reuse_stale: bool,
    ) -> Vec<(String, String, String, bool)> {
        let inputs = PlanInputs {
            code,
            finished,
            reuse_stale,
        };
        plan(x, "x", Path::new("/out"), &inputs)
            .into_iter()
            .map(|j| (j.label, j.id, j.spec_id, j.stale))
            .collect()
    }

    #[test]
    fn a_plugin_change_renames_exactly_the_jobs_that_use_it() -> anyhow::Result<()> {
        let (x, _) = two_tasks()?;
        let none = Finished::default();
        let before = ids(
            &x,
            &code("e1", "vision:1", "nlp:1", "strategies:1"),
            &none,
            false,
        );
        assert_eq!(before.len(), 6, "{before:?}");
        let changed = |after: &[(String, String, String, bool)]| -> Vec<String> {
            before
                .iter()
                .zip(after)
                .filter(|(b, a)| b.1 != a.1)
                .map(|(b, _)| b.0.clone())
                .collect()
        };
        // The vision plugin: the vision teacher and its students, not the NLP jobs.
        let vision = ids(
            &x,
            &code("e1", "vision:2", "nlp:1", "strategies:1"),
            &none,
            false,
        );
        let moved = changed(&vision);
        assert_eq!(moved.len(), 3, "{moved:?}");
        assert!(
            moved.iter().all(|l| l.contains("vision.synthetic")),
            "{moved:?}"
        );
        // The strategies plugin: every student, no teacher.
        let strategies = ids(
            &x,
            &code("e1", "vision:1", "nlp:1", "strategies:2"),
            &none,
            false,
        );
        let moved = changed(&strategies);
        assert_eq!(moved.len(), 4, "{moved:?}");
        assert!(!moved.iter().any(|l| l.starts_with("teacher")), "{moved:?}");
        // The engine: everything. The code-free identity never moves.
        let engine = ids(
            &x,
            &code("e2", "vision:1", "nlp:1", "strategies:1"),
            &none,
            false,
        );
        assert_eq!(changed(&engine).len(), 6);
        for after in [&vision, &strategies, &engine] {
            for (b, a) in before.iter().zip(after.iter()) {
                assert_eq!(b.2, a.2, "spec_id of {}", b.0);
            }
        }
        // Unchanged code: the same ids (a README edit changes no version).
        assert_eq!(
            ids(
                &x,
                &code("e1", "vision:1", "nlp:1", "strategies:1"),
                &none,
                false
            ),
            before
        );
        Ok(())
    }

    #[test]
    fn reuse_stale_takes_old_results_and_marks_what_depends_on_them() -> anyhow::Result<()> {
        let (x, _) = two_tasks()?;
        let old = ids(
            &x,
            &code("e1", "vision:1", "nlp:1", "strategies:1"),
            &Finished::default(),
            false,
        );
        // Everything finished with the old code.
        let mut finished = Finished::default();
        for (_, id, spec_id, _) in &old {
            finished.ids.insert(id.clone());
            finished.by_spec.insert(
                spec_id.clone(),
                (id.clone(), PathBuf::from("/out/jobs").join(id)),
            );
        }
        let new_code = code("e1", "vision:2", "nlp:1", "strategies:1");
        let rerun = ids(&x, &new_code, &finished, false);
        assert!(
            rerun.iter().all(|j| !j.3),
            "without the flag nothing is stale"
        );
        let reused = ids(&x, &new_code, &finished, true);
        assert_eq!(reused.len(), old.len());
        for ((label, id, _, stale), (_, old_id, _, _)) in reused.iter().zip(&old) {
            let vision = label.contains("vision.synthetic");
            assert_eq!(*stale, vision, "{label}");
            assert_eq!(
                id, old_id,
                "{label}: the finished job is reused under its own id"
            );
        }
        // A student that never ran, taught by a reused teacher, runs now and is stale too.
        let mut partial = Finished::default();
        for (label, id, spec_id, _) in &old {
            if label.starts_with("teacher") {
                partial.ids.insert(id.clone());
                partial
                    .by_spec
                    .insert(spec_id.clone(), (id.clone(), PathBuf::from(id)));
            }
        }
        let taught = ids(&x, &new_code, &partial, true);
        for (label, _, _, stale) in &taught {
            assert_eq!(*stale, label.contains("vision.synthetic"), "{label}");
        }
        Ok(())
    }

    #[test]
    fn ids_depend_on_content_only() {
        assert_eq!(
            content_id(&json!({"a": 1, "b": 2})),
            content_id(&json!({"b": 2, "a": 1}))
        );
        assert_ne!(content_id(&json!({"a": 1})), content_id(&json!({"a": 2})));
        assert_eq!(content_id(&json!({})).len(), 16);
    }
}
