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
    /// The teacher job it waits for.
    pub depends_on: Option<String>,
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
        depends_on: Option<String>,
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
        self.push(&job, job.clone(), None, origin, label)
    }

    /// Adds a student job taught by `teacher` (its id, model component and folder): the id is
    /// hashed into the content, the folder written into the spec, and the job waits for it.
    fn student(
        &mut self,
        mut content: Value,
        teacher: Option<(&str, &Value, &Path)>,
        origin: BTreeMap<String, String>,
        label: String,
    ) -> (String, PathBuf) {
        content["teacher"] = teacher.map_or(
            Value::Null,
            |(id, model, _)| json!({"model": model, "id": id}),
        );
        let mut job = content.clone();
        job["teacher"] = teacher.map_or(
            Value::Null,
            |(_, model, dir)| json!({"model": model, "dir": dir}),
        );
        let depends_on = teacher.map(|(id, _, _)| id.to_string());
        self.push(&content, job, depends_on, origin, label)
    }
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
    // (dataset index, teacher index) -> (teacher id, model component, folder)
    let mut teachers: BTreeMap<(usize, usize), (String, Value, PathBuf)> = BTreeMap::new();
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
            teachers.insert((di, ti), (id, model, dir));
        }
    }
    for (di, d) in x.datasets.iter().enumerate() {
        let dataset = json!({"name": d.name, "config": table(&d.config)});
        let teacher_choices: Vec<Option<usize>> = if x.teachers.is_empty() {
            vec![None]
        } else {
            (0..x.teachers.len()).map(Some).collect()
        };
        for ti in teacher_choices {
            for (si, s) in x.students.iter().enumerate() {
                for (ki, k) in x.strategies.iter().enumerate() {
                    if k.generations.is_some() {
                        continue; // a born-again chain, planned below
                    }
                    for point in grid_points(&k.grid) {
                        let strategy =
                            json!({"name": k.name, "config": merge(&table(&k.config), &point)});
                        for &seed in &x.seeds {
                            let teacher = ti
                                .map(|ti| &teachers[&(di, ti)])
                                .map(|(id, model, dir)| (id.as_str(), model, dir.as_path()));
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
                            if let Some(ti) = ti {
                                origin.insert("teacher".into(), format!("teachers[{ti}]"));
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
                            jobs.student(content, teacher, origin, label);
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
                            let teacher = (previous.0.as_str(), &model, previous.1.as_path());
                            previous = jobs.student(content, Some(teacher), origin, label);
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
    fn ids_depend_on_content_only() {
        assert_eq!(
            content_id(&json!({"a": 1, "b": 2})),
            content_id(&json!({"b": 2, "a": 1}))
        );
        assert_ne!(content_id(&json!({"a": 1})), content_id(&json!({"a": 2})));
        assert_eq!(content_id(&json!({})).len(), 16);
    }
}
