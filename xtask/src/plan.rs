//! Expands an experiment into content-addressed jobs: one teacher job per dataset and teacher,
//! one student job per dataset x teacher x student x strategy x grid point x seed. A job's id is
//! a hash of everything that determines its result (a student's includes its teacher's id), so a
//! finished job is found again on a re-run, and growing the grid reuses what exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::experiment::Experiment;

/// One job of the plan.
#[derive(Clone, Debug)]
pub struct PlannedJob {
    /// Content address.
    pub id: String,
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

/// Where the jobs of one experiment go, and what every job spec names.
struct Jobs<'a> {
    experiment: &'a str,
    dir: PathBuf,
    list: Vec<PlannedJob>,
}

impl Jobs<'_> {
    /// Adds a job whose id is the hash of `content` and whose spec runs `job`.
    fn push(
        &mut self,
        content: &Value,
        job: Value,
        depends_on: Vec<String>,
        origin: BTreeMap<String, String>,
        label: String,
    ) -> (String, PathBuf) {
        let id = content_id(content);
        let dir = self.dir.join(&id);
        if !self.list.iter().any(|j| j.id == id) {
            self.list.push(PlannedJob {
                id: id.clone(),
                spec: json!({"id": id, "experiment": self.experiment, "out_dir": dir, "job": job}),
                depends_on,
                origin,
                label,
                dir: dir.clone(),
            });
        }
        (id, dir)
    }

    /// Adds a teacher job; returns its id and folder.
    fn teacher(
        &mut self,
        job: Value,
        origin: BTreeMap<String, String>,
        label: String,
    ) -> (String, PathBuf) {
        self.push(&job, job.clone(), Vec::new(), origin, label)
    }

    /// Adds a student job taught by `teachers` (each one's id, model component and folder): the
    /// ids are hashed into the content (`teacher`: null, one, or a list for several), the
    /// folders written into the spec, and the job waits for them.
    fn student(
        &mut self,
        mut content: Value,
        teachers: &[&TeacherJob],
        origin: BTreeMap<String, String>,
        label: String,
    ) -> (String, PathBuf) {
        let hashed: Vec<Value> = teachers
            .iter()
            .map(|t| json!({"model": t.model, "id": t.id}))
            .collect();
        content["teacher"] = match hashed.as_slice() {
            [] => Value::Null,
            [one] => one.clone(),
            _ => Value::Array(hashed),
        };
        let mut job = content.clone();
        if let Some(o) = job.as_object_mut() {
            o.remove("teacher");
        }
        job["teachers"] = teachers
            .iter()
            .map(|t| json!({"model": t.model, "dir": t.dir}))
            .collect();
        let depends_on = teachers.iter().map(|t| t.id.clone()).collect();
        self.push(&content, job, depends_on, origin, label)
    }
}

/// A planned teacher job, as its students refer to it.
struct TeacherJob {
    id: String,
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
pub fn plan(x: &Experiment, name: &str, out: &Path) -> Vec<PlannedJob> {
    let mut jobs = Jobs {
        experiment: name,
        dir: out.join("jobs"),
        list: Vec::new(),
    };
    let shared_train = table(&x.train);
    // (dataset index, teacher index) -> the teacher job
    let mut teachers: BTreeMap<(usize, usize), TeacherJob> = BTreeMap::new();
    for (di, d) in x.datasets.iter().enumerate() {
        let dataset = json!({"name": d.name, "config": table(&d.config)});
        for (ti, t) in x.teachers.iter().enumerate() {
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
            let origin = origins(&[
                ("dataset", format!("datasets[{di}]")),
                ("model", format!("teachers[{ti}]")),
                (
                    "train",
                    train_origin(&t.train, &format!("teachers[{ti}].train")),
                ),
            ]);
            let label = format!("teacher {} on {}", t.model, d.name);
            let (id, dir) = jobs.teacher(job, origin, label);
            teachers.insert((di, ti), TeacherJob { id, model, dir });
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
                        let (id, dir) = jobs.teacher(first, origin, label);
                        let mut previous = TeacherJob {
                            id,
                            model: model.clone(),
                            dir,
                        };
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
                            let (id, dir) = jobs.student(content, &[&previous], origin, label);
                            previous = TeacherJob {
                                id,
                                model: model.clone(),
                                dir,
                            };
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

    #[test]
    fn teachers_named_on_an_entry_teach_together() -> anyhow::Result<()> {
        let path = std::env::temp_dir().join(format!("xtask-plan-{}.toml", std::process::id()));
        std::fs::write(
            &path,
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
        let (x, name) = crate::experiment::load(&path, &[])?;
        let jobs = plan(&x, &name, Path::new("/out"));
        let _ = std::fs::remove_file(&path);
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
    fn ids_depend_on_content_only() {
        assert_eq!(
            content_id(&json!({"a": 1, "b": 2})),
            content_id(&json!({"b": 2, "a": 1}))
        );
        assert_ne!(content_id(&json!({"a": 1})), content_id(&json!({"a": 2})));
        assert_eq!(content_id(&json!({})).len(), 16);
    }
}
