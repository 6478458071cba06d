//! Result tables: collects job records into `runs.parquet` (one row per student run) and
//! `metrics.parquet` (long form: run, epoch, split, metric, value), and summarises runs as mean
//! ± standard deviation over seeds. Column names are stable; see `docs/results.md`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use distill_engine::job::{JobRecord, JobSpec, RECORD_FILE, Status, empty_record};
use polars::prelude::*;

pub mod plots;

/// What can go wrong while collecting or writing results.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record file is not valid.
    #[error("{path}: not a job record: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A plot could not be drawn or written.
    #[error("{path}: {message}")]
    Plot {
        /// The file (or what was missing).
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Polars failed to build or write a table.
    #[error("building the result tables: {0}")]
    Polars(#[from] PolarsError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ReportError>;

/// The file the orchestrator leaves in a job folder when the worker ended without a record.
pub const FAILED_FILE: &str = "failed.json";

/// The file the Slurm executor leaves in a job folder once Slurm ended the job: its Slurm job id
/// and final state.
pub const SLURM_FILE: &str = "slurm.json";

/// Where Slurm ran a job and how Slurm ended it (`slurm.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlurmJob {
    /// `<array job id>_<task>`.
    pub job_id: String,
    /// The final state: `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, `OUT_OF_MEMORY`, ...
    pub state: String,
}

/// The Slurm placement of every job folder under `jobs_dir` that has a `slurm.json`, by run id
/// (the folder's name).
pub fn collect_slurm(jobs_dir: &Path) -> Result<BTreeMap<String, SlurmJob>> {
    let io = |source| ReportError::Io {
        path: jobs_dir.to_path_buf(),
        source,
    };
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(jobs_dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let file = entry.path().join(SLURM_FILE);
        if file.is_file() {
            let id = entry.file_name().to_string_lossy().into_owned();
            found.insert(id, read_json::<SlurmJob>(&file)?);
        }
    }
    Ok(found)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ReportError::Record {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The records of every job folder under `jobs_dir`, sorted by id: `record.json` where the job
/// finished; for a worker that crashed or timed out, a `failed` record built from `job.json`
/// and the reason in `failed.json`. Folders of jobs that never ran are skipped.
pub fn collect(jobs_dir: &Path) -> Result<Vec<JobRecord>> {
    let io = |source| ReportError::Io {
        path: jobs_dir.to_path_buf(),
        source,
    };
    let mut records = Vec::new();
    for entry in std::fs::read_dir(jobs_dir).map_err(io)? {
        let dir = entry.map_err(io)?.path();
        let (record, failed, job) = (
            dir.join(RECORD_FILE),
            dir.join(FAILED_FILE),
            dir.join("job.json"),
        );
        if record.is_file() {
            records.push(read_json::<JobRecord>(&record)?);
        } else if failed.is_file() && job.is_file() {
            let spec: JobSpec = read_json(&job)?;
            let reason: serde_json::Value = read_json(&failed)?;
            let mut r = empty_record(&spec);
            r.error = Some(
                reason
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("failed")
                    .to_string(),
            );
            records.push(r);
        }
    }
    records.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(records)
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Diverged => "diverged",
        Status::Failed => "failed",
    }
}

/// Scalar strategy parameters as extra columns `param.<key>` (numbers and booleans as floats,
/// strings as strings).
fn param_columns(students: &[&JobRecord]) -> Vec<Column> {
    let mut keys: BTreeMap<String, bool> = BTreeMap::new(); // key -> is numeric
    for r in students {
        if let Some(obj) = r.params.get("strategy").and_then(|v| v.as_object()) {
            for (k, v) in obj {
                let numeric = v.is_number() || v.is_boolean();
                if v.is_number() || v.is_boolean() || v.is_string() {
                    let e = keys.entry(k.clone()).or_insert(numeric);
                    *e &= numeric;
                }
            }
        }
    }
    keys.into_iter()
        .map(|(key, numeric)| {
            let get = |r: &&JobRecord| r.params.get("strategy").and_then(|s| s.get(&key)).cloned();
            let name = PlSmallStr::from(format!("param.{key}"));
            if numeric {
                let values: Vec<Option<f64>> = students
                    .iter()
                    .map(|r| {
                        get(r).and_then(|v| {
                            v.as_f64()
                                .or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))))
                        })
                    })
                    .collect();
                Column::new(name, values)
            } else {
                let values: Vec<Option<String>> = students
                    .iter()
                    .map(|r| {
                        get(r).map(|v| {
                            v.as_str()
                                .map(String::from)
                                .unwrap_or_else(|| v.to_string())
                        })
                    })
                    .collect();
                Column::new(name, values)
            }
        })
        .collect()
}

fn datetime(name: &str, seconds: Vec<f64>) -> Column {
    let micros: Vec<i64> = seconds.iter().map(|s| (s * 1e6).round() as i64).collect();
    Int64Chunked::new(name.into(), &micros)
        .into_datetime(TimeUnit::Microseconds, Some(TimeZone::UTC))
        .into_series()
        .into()
}

/// What the tables say besides the records: the revision of the checkout and which runs are
/// stale (computed by other code than the current build's, reused with `--reuse-stale`).
#[derive(Clone, Debug, Default)]
pub struct TableContext {
    /// Git revision recorded in every row.
    pub git_revision: String,
    /// Ids of the stale runs.
    pub stale: std::collections::BTreeSet<String>,
    /// The Slurm job of each run the Slurm executor ran, by run id.
    pub slurm: BTreeMap<String, SlurmJob>,
}

/// One row per student run.
pub fn runs_frame(records: &[JobRecord], context: &TableContext) -> Result<DataFrame> {
    let git_revision = context.git_revision.as_str();
    let s: Vec<&JobRecord> = records.iter().filter(|r| r.kind == "student").collect();
    let str_col = |name: &str, f: &dyn Fn(&JobRecord) -> String| {
        Column::new(name.into(), s.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let opt_str = |name: &str, f: &dyn Fn(&JobRecord) -> Option<String>| {
        Column::new(name.into(), s.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let f64_col = |name: &str, f: &dyn Fn(&JobRecord) -> Option<f64>| {
        Column::new(name.into(), s.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let u64_col = |name: &str, f: &dyn Fn(&JobRecord) -> Option<u64>| {
        Column::new(name.into(), s.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let train = |r: &JobRecord, key: &str| r.params.get("train").and_then(|t| t.get(key)).cloned();
    let mut columns = vec![
        str_col("experiment", &|r| r.experiment.clone()),
        str_col("run_id", &|r| r.id.clone()),
        str_col("dataset", &|r| r.dataset.clone()),
        opt_str("teacher", &|r| r.teacher.clone()),
        str_col("student", &|r| r.model.clone()),
        opt_str("strategy", &|r| r.strategy.clone()),
        str_col("params", &|r| r.params.to_string()),
        u64_col("seed", &|r| Some(r.seed)),
        str_col("status", &|r| status_name(r.status).into()),
        opt_str("error", &|r| r.error.clone()),
        opt_str("stop", &|r| {
            r.stop
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok())
                .map(|v| match v {
                    serde_json::Value::String(s) => s,
                    other => other
                        .as_object()
                        .and_then(|o| o.keys().next().cloned())
                        .unwrap_or_default(),
                })
        }),
        str_col("primary_metric", &|r| r.primary_metric.clone()),
        f64_col("best_metric", &|r| r.best_metric),
        f64_col("final_metric", &|r| r.final_metric),
        f64_col("best_validation", &|r| r.best_validation),
        u64_col("best_epoch", &|r| r.best_epoch.map(|e| e as u64)),
        f64_col("teacher_metric", &|r| r.teacher_metric),
        u64_col("teacher_parameters", &|r| r.teacher_parameters),
        u64_col("student_parameters", &|r| Some(r.parameters)),
        f64_col("compression", &|r| {
            r.teacher_parameters
                .map(|t| t as f64 / r.parameters.max(1) as f64)
        }),
        u64_col("flops_per_sample", &|r| Some(r.flops_per_sample)),
        f64_col("latency_ms_batch1", &|r| r.latency_ms_batch1),
        f64_col("latency_ms_batch64", &|r| r.latency_ms_batch64),
        u64_col("model_bytes", &|r| Some(r.model_bytes)),
        u64_col("epochs_run", &|r| Some(r.epochs_run as u64)),
        f64_col("lr", &|r| {
            train(r, "optimizer").and_then(|o| o.get("lr").and_then(|v| v.as_f64()))
        }),
        u64_col("batch_size", &|r| {
            train(r, "batch_size").and_then(|v| v.as_u64())
        }),
        opt_str("teacher_outputs", &|r| r.teacher_outputs.clone()),
        f64_col("wall_seconds", &|r| Some(r.wall_seconds)),
        opt_str("slurm_job_id", &|r| {
            context.slurm.get(&r.id).map(|j| j.job_id.clone())
        }),
        opt_str("slurm_state", &|r| {
            context.slurm.get(&r.id).map(|j| j.state.clone())
        }),
        str_col("config_hash", &|r| r.id.clone()),
        str_col("git_revision", &|_| git_revision.to_string()),
        Column::new(
            "stale".into(),
            s.iter()
                .map(|r| context.stale.contains(&r.id))
                .collect::<Vec<_>>(),
        ),
        opt_str("code_engine", &|r| {
            r.code.as_ref().map(|c| c.engine.clone())
        }),
        opt_str("code_dataset", &|r| {
            r.code.as_ref().map(|c| c.dataset.clone())
        }),
        opt_str("code_model", &|r| r.code.as_ref().map(|c| c.model.clone())),
        opt_str("code_strategy", &|r| {
            r.code.as_ref().and_then(|c| c.strategy.clone())
        }),
        datetime("started_at", s.iter().map(|r| r.started_at).collect()),
        datetime("finished_at", s.iter().map(|r| r.finished_at).collect()),
    ];
    columns.extend(param_columns(&s));
    Ok(DataFrame::new(s.len(), columns)?)
}

/// Long-form per-epoch values of every student run: loss terms (`split` = `train`), the
/// learning rate (`train`, `lr`) and task metrics (`validation`, `test`).
pub fn metrics_frame(records: &[JobRecord]) -> Result<DataFrame> {
    let (mut run, mut epoch, mut split, mut name, mut value) =
        (vec![], vec![], vec![], vec![], vec![]);
    for r in records.iter().filter(|r| r.kind == "student") {
        for e in &r.epochs {
            let lr = [("lr".to_string(), e.lr)];
            for (sp, values) in [
                ("train", &e.train[..]),
                ("train", &lr[..]),
                ("validation", &e.validation[..]),
                ("test", &e.test[..]),
            ] {
                for (n, v) in values {
                    run.push(r.id.clone());
                    epoch.push(e.epoch as u32);
                    split.push(sp);
                    name.push(n.clone());
                    value.push(*v);
                }
            }
        }
    }
    let height = run.len();
    Ok(DataFrame::new(
        height,
        vec![
            Column::new("run_id".into(), run),
            Column::new("epoch".into(), epoch),
            Column::new("split".into(), split),
            Column::new("metric".into(), name),
            Column::new("value".into(), value),
        ],
    )?)
}

fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(|source| ReportError::Io {
        path: tmp.clone(),
        source,
    })?;
    ParquetWriter::new(file).finish(df)?;
    std::fs::rename(&tmp, path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `runs.parquet` and `metrics.parquet` into `dir`; returns their paths.
pub fn write_tables(
    dir: &Path,
    records: &[JobRecord],
    context: &TableContext,
) -> Result<(PathBuf, PathBuf)> {
    let runs = dir.join("runs.parquet");
    let metrics = dir.join("metrics.parquet");
    write_parquet(&runs, &mut runs_frame(records, context)?)?;
    write_parquet(&metrics, &mut metrics_frame(records)?)?;
    Ok((runs, metrics))
}

/// Reads a parquet file written by [`write_tables`].
pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let file = File::open(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ParquetReader::new(file).finish()?)
}

/// Mean and sample standard deviation over the seeds of one cell.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    /// Dataset name.
    pub dataset: String,
    /// Teacher model (empty without one).
    pub teacher: String,
    /// Student model.
    pub student: String,
    /// Strategy with its parameters, e.g. `kd {"alpha":0.5}`.
    pub strategy: String,
    /// Runs that ended `ok`, and all runs.
    pub ok: usize,
    /// All runs of the cell.
    pub runs: usize,
    /// Mean of `best_metric` over ok runs.
    pub mean: f64,
    /// Sample standard deviation of `best_metric` (0 for one run).
    pub std: f64,
    /// Mean teacher metric.
    pub teacher_metric: Option<f64>,
    /// Mean and sample standard deviation of `final_metric` (the last epoch's) over ok runs.
    pub final_mean: f64,
    /// See [`SummaryRow::final_mean`].
    pub final_std: f64,
    /// The difference to `baseline` on the same dataset, teacher and student, paired by seed.
    pub vs_baseline: Option<Paired>,
    /// Teacher parameters / student parameters.
    pub compression: Option<f64>,
    /// Mean student latency at batch 1, milliseconds per sample.
    pub latency_ms_batch1: Option<f64>,
    /// Mean student latency at batch 64, milliseconds per sample.
    pub latency_ms_batch64: Option<f64>,
}

/// A paired comparison across seeds: `d_s = metric(strategy, s) - metric(baseline, s)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    /// Seeds present in both.
    pub n: usize,
    /// Mean of the differences.
    pub mean: f64,
    /// Their sample standard deviation.
    pub std: f64,
    /// The paired t statistic, `mean / (std / sqrt(n))` (`None` for one pair or no spread).
    pub t: Option<f64>,
}

/// The paired comparison of `metric` by seed (`None` without a common seed).
pub fn paired(metric: &BTreeMap<u64, f64>, baseline: &BTreeMap<u64, f64>) -> Option<Paired> {
    let diffs: Vec<f64> = metric
        .iter()
        .filter_map(|(seed, v)| baseline.get(seed).map(|b| v - b))
        .collect();
    if diffs.is_empty() {
        return None;
    }
    let (mean, std) = mean_std(&diffs);
    let n = diffs.len();
    let t = (n > 1 && std > 0.0).then(|| mean / (std / (n as f64).sqrt()));
    Some(Paired { n, mean, std, t })
}

/// Dataset, teacher (empty without one), student and strategy (with its parameters, e.g.
/// `kd {"alpha":0.5}`, and its born-again generation): the runs of one cell differ only in seed.
pub type CellKey = (String, String, String, String);

/// The student runs of `records` by cell.
pub fn cells(records: &[JobRecord]) -> BTreeMap<CellKey, Vec<&JobRecord>> {
    let mut cells: BTreeMap<CellKey, Vec<&JobRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.kind == "student") {
        let params = r
            .params
            .get("strategy")
            .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()));
        let mut strategy = match params {
            Some(p) => format!("{} {p}", r.strategy.clone().unwrap_or_default()),
            None => r.strategy.clone().unwrap_or_default(),
        };
        // Each generation of a born-again chain is its own cell.
        if let Some(g) = r.params.get("generation").and_then(|g| g.as_u64()) {
            strategy.push_str(&format!(" generation {g}"));
        }
        let key = (
            r.dataset.clone(),
            r.teacher.clone().unwrap_or_default(),
            r.model.clone(),
            strategy,
        );
        cells.entry(key).or_default().push(r);
    }
    cells
}

/// Mean ± std of the best test metric per dataset / teacher / student / strategy cell.
pub fn summarize(records: &[JobRecord]) -> Vec<SummaryRow> {
    let cells = cells(records);
    let by_seed = |runs: &[&JobRecord]| -> BTreeMap<u64, f64> {
        runs.iter()
            .filter(|r| r.status == Status::Ok)
            .filter_map(|r| r.best_metric.map(|m| (r.seed, m)))
            .collect()
    };
    let baselines: BTreeMap<(String, String, String), BTreeMap<u64, f64>> = cells
        .iter()
        .filter(|((_, _, _, strategy), _)| strategy == "baseline")
        .map(|((d, t, s, _), runs)| ((d.clone(), t.clone(), s.clone()), by_seed(runs)))
        .collect();
    cells
        .into_iter()
        .map(|((dataset, teacher, student, strategy), runs)| {
            let ok: Vec<&&JobRecord> = runs.iter().filter(|r| r.status == Status::Ok).collect();
            let values: Vec<f64> = ok.iter().filter_map(|r| r.best_metric).collect();
            let finals: Vec<f64> = ok.iter().filter_map(|r| r.final_metric).collect();
            let (mean, std) = mean_std(&values);
            let (final_mean, final_std) = mean_std(&finals);
            let teachers: Vec<f64> = runs.iter().filter_map(|r| r.teacher_metric).collect();
            // `baseline` learns from no teacher, so a cell without a baseline under its own
            // teacher(s) (several teachers together) compares with one under another teacher.
            let baseline = baselines
                .get(&(dataset.clone(), teacher.clone(), student.clone()))
                .or_else(|| {
                    baselines
                        .iter()
                        .find(|((d, _, s), _)| *d == dataset && *s == student)
                        .map(|(_, b)| b)
                });
            let vs_baseline = (strategy != "baseline")
                .then_some(baseline)
                .flatten()
                .and_then(|b| paired(&by_seed(&runs), b));
            let compression = ok.first().and_then(|r| {
                r.teacher_parameters
                    .filter(|_| r.parameters > 0)
                    .map(|t| t as f64 / r.parameters as f64)
            });
            let latency = |pick: fn(&JobRecord) -> Option<f64>| {
                let values: Vec<f64> = ok.iter().filter_map(|r| pick(r)).collect();
                (!values.is_empty()).then(|| mean_std(&values).0)
            };
            SummaryRow {
                dataset,
                teacher,
                student,
                strategy,
                ok: ok.len(),
                runs: runs.len(),
                mean,
                std,
                teacher_metric: (!teachers.is_empty()).then(|| mean_std(&teachers).0),
                final_mean,
                final_std,
                vs_baseline,
                compression,
                latency_ms_batch1: latency(|r| r.latency_ms_batch1),
                latency_ms_batch64: latency(|r| r.latency_ms_batch64),
            }
        })
        .collect()
}

/// `+0.0123 ± 0.0045 (t 2.71, n 3)`.
fn format_paired(p: &Paired) -> String {
    let t = p.t.map(|t| format!("t {t:.2}, ")).unwrap_or_default();
    format!("{:+.4} ± {:.4} ({t}n {})", p.mean, p.std, p.n)
}

/// The summary as a Markdown document: one table per dataset / teacher / student, strategies
/// as rows, with best and final metric, the paired difference to `baseline`, the teacher's
/// metric, the compression ratio and the student's latency.
pub fn format_summary_markdown(rows: &[SummaryRow], metric: &str) -> String {
    let mut out = format!(
        "# Summary\n\nPrimary metric: `{metric}` (test split, at the best validation epoch for \"best\", at the last epoch for \"final\"); mean ± sample std over seeds; the difference to `baseline` is paired by seed, with its t statistic.\n"
    );
    let mut group = None;
    for r in rows {
        let key = (&r.dataset, &r.teacher, &r.student);
        if group != Some(key) {
            group = Some(key);
            out.push_str(&format!(
                "\n## {} · teacher {} · student {}\n\n| strategy | ok/runs | best | final | vs baseline | teacher | compression | latency b1 / b64 (ms/sample) |\n|---|---|---|---|---|---|---|---|\n",
                r.dataset,
                if r.teacher.is_empty() { "none" } else { &r.teacher },
                r.student
            ));
        }
        out.push_str(&format!(
            "| {} | {}/{} | {:.4} ± {:.4} | {:.4} ± {:.4} | {} | {} | {} | {} |\n",
            r.strategy.replace('|', "\\|"),
            r.ok,
            r.runs,
            r.mean,
            r.std,
            r.final_mean,
            r.final_std,
            r.vs_baseline
                .as_ref()
                .map(format_paired)
                .unwrap_or_default(),
            r.teacher_metric
                .map(|t| format!("{t:.4}"))
                .unwrap_or_default(),
            r.compression
                .map(|c| format!("{c:.1}x"))
                .unwrap_or_default(),
            match (r.latency_ms_batch1, r.latency_ms_batch64) {
                (None, None) => String::new(),
                (b1, b64) => format!(
                    "{} / {}",
                    b1.map_or("-".into(), |l| format!("{l:.2e}")),
                    b64.map_or("-".into(), |l| format!("{l:.2e}"))
                ),
            },
        ));
    }
    out
}

/// Mean and sample standard deviation (`n - 1`; 0 for fewer than two values).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The summary as a plain-text table.
pub fn format_summary(rows: &[SummaryRow], metric: &str) -> String {
    let header = [
        "dataset",
        "teacher",
        "student",
        "strategy",
        "ok/runs",
        &format!("{metric} (mean ± std)"),
        "vs baseline (paired)",
        "teacher",
    ];
    let body: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.dataset.clone(),
                r.teacher.clone(),
                r.student.clone(),
                r.strategy.clone(),
                format!("{}/{}", r.ok, r.runs),
                format!("{:.4} ± {:.4}", r.mean, r.std),
                r.vs_baseline
                    .as_ref()
                    .map(format_paired)
                    .unwrap_or_default(),
                r.teacher_metric
                    .map(|t| format!("{t:.4}"))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..8)
        .map(|i| {
            body.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&header.map(String::from));
    out.push('\n');
    for r in &body {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_engine::job::{Component, Job};
    use distill_engine::train::{EpochRecord, TrainConfig};

    fn student(id: &str, seed: u64, best: f64, alpha: f64) -> JobRecord {
        let spec = JobSpec {
            id: id.into(),
            spec_id: None,
            code: None,
            experiment: "exp".into(),
            out_dir: PathBuf::from("/nonexistent"),
            job: Job::Student {
                dataset: Component {
                    name: "d".into(),
                    config: serde_json::Value::Null,
                },
                model: Component {
                    name: "s".into(),
                    config: serde_json::Value::Null,
                },
                strategy: Component {
                    name: "kd".into(),
                    config: serde_json::json!({"alpha": alpha}),
                },
                teachers: Vec::new(),
                train: TrainConfig::default(),
                seed,
                generation: None,
            },
        };
        let mut r = empty_record(&spec);
        r.status = Status::Ok;
        r.best_metric = Some(best);
        r.parameters = 100;
        r.teacher_parameters = Some(1000);
        r.epochs = vec![EpochRecord {
            epoch: 0,
            lr: 0.1,
            train: vec![("total".into(), 1.5), ("ce".into(), 1.0)],
            validation: vec![("accuracy".into(), 0.5)],
            test: vec![("accuracy".into(), best)],
        }];
        r.epochs_run = 1;
        r
    }

    #[test]
    fn tables_round_trip_through_parquet() -> Result<()> {
        let records = vec![
            student("a", 0, 0.8, 0.1),
            student("b", 1, 0.9, 0.1),
            student("c", 0, 0.7, 0.5),
        ];
        let dir = std::env::temp_dir().join(format!("distill-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| ReportError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut context = TableContext {
            git_revision: "abc123".into(),
            ..TableContext::default()
        };
        context.stale.insert("b".into());
        context.slurm.insert(
            "c".into(),
            SlurmJob {
                job_id: "12_3".into(),
                state: "TIMEOUT".into(),
            },
        );
        let mut records = records;
        records[0].code = Some(distill_engine::job::CodeVersions {
            engine: "engine:1".into(),
            dataset: "vision:2".into(),
            model: "vision:2".into(),
            strategy: Some("strategies:3".into()),
        });
        let (runs, metrics) = write_tables(&dir, &records, &context)?;
        let runs = read_parquet(&runs)?;
        assert_eq!(runs.height(), 3);
        assert_eq!(runs.column("seed")?.dtype(), &DataType::UInt64);
        assert_eq!(runs.column("best_metric")?.dtype(), &DataType::Float64);
        assert_eq!(
            runs.column("started_at")?.dtype(),
            &DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC))
        );
        assert_eq!(runs.column("param.alpha")?.f64()?.get(2), Some(0.5));
        assert_eq!(runs.column("compression")?.f64()?.get(0), Some(10.0));
        assert_eq!(runs.column("git_revision")?.str()?.get(1), Some("abc123"));
        let stale_column = runs.column("stale")?.bool()?;
        let stale: Vec<Option<bool>> = (0..3).map(|i| stale_column.get(i)).collect();
        assert_eq!(stale, [Some(false), Some(true), Some(false)]);
        let strategy_code = runs.column("code_strategy")?.str()?;
        assert_eq!(
            (strategy_code.get(0), strategy_code.get(1)),
            (Some("strategies:3"), None)
        );
        let slurm_state = runs.column("slurm_state")?.str()?;
        assert_eq!(
            (slurm_state.get(0), slurm_state.get(2)),
            (None, Some("TIMEOUT"))
        );
        assert_eq!(runs.column("slurm_job_id")?.str()?.get(2), Some("12_3"));
        let metrics = read_parquet(&metrics)?;
        // Per run: total, ce, lr (train), accuracy (validation), accuracy (test).
        assert_eq!(metrics.height(), 3 * 5);
        assert_eq!(metrics.column("epoch")?.dtype(), &DataType::UInt32);
        let _ = std::fs::remove_dir_all(&dir);

        let summary = summarize(&records);
        assert_eq!(summary.len(), 2);
        assert_eq!(
            (summary[0].strategy.as_str(), summary[0].runs),
            ("kd {\"alpha\":0.1}", 2)
        );
        assert!((summary[0].mean - 0.85).abs() < 1e-12);
        assert!((summary[0].std - (0.005f64).sqrt()).abs() < 1e-12);
        assert!(format_summary(&summary, "accuracy").contains("0.8500 ± 0.0707"));
        Ok(())
    }

    /// A run of `strategy` (no parameters) with best metric `best` and final metric `last`.
    fn run(id: &str, strategy: &str, seed: u64, best: f64, last: f64) -> JobRecord {
        let mut r = student(id, seed, best, 0.0);
        r.strategy = Some(strategy.into());
        r.params["strategy"] = serde_json::json!({});
        r.final_metric = Some(last);
        r.latency_ms_batch1 = Some(0.5);
        r.latency_ms_batch64 = Some(0.25);
        r
    }

    #[test]
    fn paired_differences_to_baseline_by_hand() {
        // Seeds 0, 1, 2: kd - baseline = 0.02, 0.04, 0.03 -> mean 0.03, std 0.01,
        // t = 0.03 / (0.01 / sqrt 3) = 5.196. Seed 3 has no baseline: not paired.
        let records = vec![
            run("b0", "baseline", 0, 0.80, 0.79),
            run("b1", "baseline", 1, 0.82, 0.80),
            run("b2", "baseline", 2, 0.81, 0.81),
            run("k0", "kd", 0, 0.82, 0.80),
            run("k1", "kd", 1, 0.86, 0.85),
            run("k2", "kd", 2, 0.84, 0.84),
            run("k3", "kd", 3, 0.99, 0.99),
        ];
        let summary = summarize(&records);
        let kd = summary
            .iter()
            .find(|r| r.strategy == "kd")
            .cloned()
            .unwrap_or_else(|| panic!("no kd row in {summary:?}"));
        let p = kd
            .vs_baseline
            .clone()
            .unwrap_or_else(|| panic!("no pairing"));
        assert_eq!(p.n, 3);
        assert!((p.mean - 0.03).abs() < 1e-12 && (p.std - 0.01).abs() < 1e-12);
        assert!((p.t.unwrap_or(0.0) - 0.03 / (0.01 / 3f64.sqrt())).abs() < 1e-9);
        // Final metric over all four kd runs: (0.80 + 0.85 + 0.84 + 0.99) / 4.
        assert!((kd.final_mean - 0.87).abs() < 1e-12);
        assert_eq!(kd.compression, Some(10.0));
        assert_eq!(
            (kd.latency_ms_batch1, kd.latency_ms_batch64),
            (Some(0.5), Some(0.25))
        );
        let baseline = summary.iter().find(|r| r.strategy == "baseline");
        assert!(baseline.is_some_and(|b| b.vs_baseline.is_none()));
        let markdown = format_summary_markdown(&summary, "accuracy");
        assert!(
            markdown.contains(
                "| kd | 4/4 | 0.8775 ± 0.0768 | 0.8700 ± 0.0829 | +0.0300 ± 0.0100 (t 5.20, n 3) |"
            ),
            "{markdown}"
        );
        assert!(format_summary(&summary, "accuracy").contains("+0.0300 ± 0.0100 (t 5.20, n 3)"));

        // Several teachers together form their own cell and still pair with the baseline:
        // 0.81 - 0.80, 0.85 - 0.82 -> mean 0.02, std sqrt(0.0002).
        let mut with_two = records;
        for (id, seed, best) in [("m0", 0, 0.81), ("m1", 1, 0.85)] {
            let mut r = run(id, "multi-teacher", seed, best, best);
            r.teacher = Some("t + t".into());
            with_two.push(r);
        }
        let summary = summarize(&with_two);
        let multi = summary.iter().find(|r| r.strategy == "multi-teacher");
        let p = multi.and_then(|r| r.vs_baseline.clone());
        assert!(
            p.as_ref().is_some_and(|p| p.n == 2
                && (p.mean - 0.02).abs() < 1e-12
                && (p.std - 0.0002f64.sqrt()).abs() < 1e-12),
            "{p:?}"
        );
        assert_eq!(multi.map(|r| r.teacher.as_str()), Some("t + t"));
    }

    #[test]
    fn mean_and_sample_std_by_hand() {
        let (m, s) = mean_std(&[0.8, 0.9, 1.0]);
        assert!((m - 0.9).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12); // sqrt((0.01 + 0 + 0.01) / 2)
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
