//! `distill`: the worker binary. Thin glue over distill-host and distill-engine: it loads the
//! plugins built next to it and runs one command — list the plugins, check a plan, run exactly
//! one planned job and write its record atomically, write the report, or evaluate one loss.

mod check;
mod loss;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use distill_engine::job::{
    CodeVersions, ENGINE_VERSION, Job, JobSpec, RECORD_FILE, Status, empty_record, run_job,
    write_json_atomic,
};
use distill_host::{PluginHost, workspace_plugins};
use distill_rt::candle::Device;
use distill_rt::tracing_subscriber;

/// The distillery worker.
#[derive(Parser)]
#[command(name = "distill", version, about)]
struct Cli {
    /// Folder of plugin libraries, every one loaded (default: the plugins of the workspace this
    /// binary was built in, from the `deps/` folder next to it when it holds them, as in a cargo
    /// target folder, else from the binary's own folder). Extra plugin files can be listed,
    /// colon-separated, in `DISTILL_EXTRA_PLUGINS`.
    #[arg(long, global = true)]
    plugins: Option<PathBuf>,
    /// How log events reach stderr (the filter is `DISTILL_LOG`, default `warn`). `run-job`
    /// also writes every event at `info` and above as JSON lines to `log.jsonl` in the job's
    /// folder, whatever this says.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The format of the log on stderr.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per event (timestamp, level, target, fields, spans).
    Json,
}

/// The job log file in a job's folder: JSON lines, one per event.
const JOB_LOG_FILE: &str = "log.jsonl";

/// Installs the subscriber: stderr in `format`, filtered by `DISTILL_LOG` (default `warn`), and
/// with `job_log`, JSON lines at `DISTILL_LOG` (default `info`) into that file.
fn init_logging(format: LogFormat, job_log: Option<&Path>) -> Result<()> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = |default: &str| {
        EnvFilter::try_from_env("DISTILL_LOG").unwrap_or_else(|_| EnvFilter::new(default))
    };
    let stderr = match format {
        LogFormat::Pretty => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    }
    .with_filter(filter("warn"));
    let file = match job_log {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating the job log {}", path.display()))?;
            Some(
                fmt::layer()
                    .json()
                    .with_writer(std::sync::Mutex::new(file))
                    .with_filter(filter("info")),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init()
        .context("installing the log subscriber")
}

#[derive(Subcommand)]
enum Command {
    /// Lists every registered dataset, model and strategy.
    Plugins {
        /// Print JSON (kind, name, summary, origin) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints, as JSON, the code version of the engine and of the plugin behind every
    /// registered dataset, model and strategy (what job identities include).
    CodeVersions,
    /// Runs one planned job (a JSON job file) and writes `record.json` in its output folder;
    /// exits 0 when the record says `ok`, 1 when `failed`, 2 when `diverged` (so that a scheduler
    /// such as Slurm sees the job fail, and does not start the jobs it taught).
    RunJob {
        /// The job file.
        job: PathBuf,
    },
    /// Validates every job of a plan (written by `cargo xtask run`) before anything trains.
    Check {
        /// The plan file.
        plan: PathBuf,
    },
    /// Evaluates one strategy on the tensors of a safetensors file (`s_logits`, `t_logits`,
    /// `targets`, `s_feat`, `t_feat`, `s_emb`, `t_emb`, `s.<feature>`, `t.<feature>`,
    /// `indices`, `var.<variable>`) and prints every loss term as JSON.
    Loss(loss::LossArgs),
    /// Collects the job records of an experiment folder into runs.parquet and metrics.parquet
    /// and prints the summary.
    Report {
        /// The experiment's report folder (`reports/<experiment>`).
        dir: PathBuf,
        /// Git revision recorded in every row.
        #[arg(long, default_value = "unknown")]
        git_revision: String,
    },
}

fn main() -> Result<ExitCode> {
    // Before anything else: this may run the binary again with the worker settings.
    let settings_error = distill_host::apply_worker_settings().err();
    let cli = Cli::parse();
    // A job's spec is read before anything else, so that its log goes into its folder.
    let job = match &cli.command {
        Command::RunJob { job } => Some(read_job(job)?),
        _ => None,
    };
    init_logging(
        cli.log_format,
        job.as_ref()
            .map(|spec| spec.out_dir.join(JOB_LOG_FILE))
            .as_deref(),
    )?;
    if let Some(e) = settings_error {
        distill_rt::tracing::warn!(
            "running without the worker settings (could not run again with them: {e})"
        );
    }
    distill_host::install_data_resolver();
    if matches!(
        cli.command,
        Command::RunJob { .. } | Command::Check { .. } | Command::Loss(_)
    ) {
        // `check` fetches the library for the workers that follow, as it fetches their data.
        let products = distill_host::install_matrix_products()?;
        if job.is_some() {
            log_worker_settings(&products);
        }
    }
    let mut host = PluginHost::new();
    let dir = match cli.plugins {
        Some(dir) => {
            host.load_dir(&dir)
                .with_context(|| format!("loading plugins from {}", dir.display()))?;
            dir
        }
        None => {
            let dir = default_plugin_dir()?;
            host.load_workspace(&dir)
                .with_context(|| format!("loading plugins from {}", dir.display()))?;
            dir
        }
    };
    let extra = std::env::var("DISTILL_EXTRA_PLUGINS").unwrap_or_default();
    for path in extra.split(':').filter(|p| !p.is_empty()) {
        host.load(Path::new(path))
            .with_context(|| format!("loading {path} (listed in DISTILL_EXTRA_PLUGINS)"))?;
    }
    if host.loaded().is_empty() {
        bail!(
            "no plugin libraries (libdistill_plugin_*.so) in {}; build them with `cargo build --workspace`",
            dir.display()
        );
    }
    match cli.command {
        Command::Plugins { json } => list(&host, json),
        Command::CodeVersions => code_versions(&host),
        Command::RunJob { .. } => match job {
            Some(spec) => {
                return Ok(match run(&host, &spec)? {
                    Status::Ok => ExitCode::SUCCESS,
                    Status::Failed => ExitCode::from(1),
                    Status::Diverged => ExitCode::from(2),
                });
            }
            None => bail!("run-job without its job spec"),
        },
        Command::Check { plan } => check_plan(&host, &plan),
        Command::Report { dir, git_revision } => report(&dir, &git_revision),
        Command::Loss(args) => loss::run(host.registrar(), &args),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// One log line with what a job's speed depends on: its threads, the allocator's settings and
/// where the matrix products run.
fn log_worker_settings(products: &distill_host::Products) {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    distill_rt::tracing::info!(
        threads,
        candle_threads = var("CANDLE_NUM_THREADS"),
        openblas_threads = var("OPENBLAS_NUM_THREADS"),
        glibc_tunables = var("GLIBC_TUNABLES"),
        products = %products,
        "worker settings"
    );
}

fn check_plan(host: &PluginHost, plan: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(plan).with_context(|| format!("reading {}", plan.display()))?;
    let plan: check::Plan =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", plan.display()))?;
    let problems = check::check(host.registrar(), &plan);
    if problems.is_empty() {
        return Ok(());
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    bail!(
        "{} problem(s) in {}; nothing was trained",
        problems.len(),
        plan.experiment_file
    )
}

/// The jobs of the plan `xtask run` left in `dir`, if it left one: every id, and the ids of the
/// stale ones.
struct Planned {
    ids: std::collections::BTreeSet<String>,
    stale: std::collections::BTreeSet<String>,
}

fn planned(dir: &Path) -> Result<Option<Planned>> {
    let path = dir.join("plan.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let plan: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let jobs = plan["jobs"]
        .as_array()
        .with_context(|| format!("{}: no `jobs` list", path.display()))?;
    let id = |j: &serde_json::Value| j["spec"]["id"].as_str().map(str::to_string);
    Ok(Some(Planned {
        ids: jobs.iter().filter_map(id).collect(),
        stale: jobs
            .iter()
            .filter(|j| j["stale"] == true)
            .filter_map(id)
            .collect(),
    }))
}

fn report(dir: &Path, git_revision: &str) -> Result<()> {
    let mut records = distill_report::collect(&dir.join("jobs"))
        .with_context(|| format!("collecting {}", dir.display()))?;
    let mut context = distill_report::TableContext {
        git_revision: git_revision.into(),
        slurm: distill_report::collect_slurm(&dir.join("jobs"))
            .with_context(|| format!("collecting {}", dir.display()))?,
        ..Default::default()
    };
    // Jobs left from an earlier version of the experiment, or computed by other code, stay on
    // disk (a later edit may bring them back) but are not part of this one's tables.
    if let Some(plan) = planned(dir)? {
        records.retain(|r| plan.ids.contains(&r.id));
        context.stale = plan.stale;
    }
    let (runs, metrics) = distill_report::write_tables(dir, &records, &context)?;
    let students: Vec<_> = records
        .iter()
        .filter(|r| r.kind == "student")
        .cloned()
        .collect();
    let metric = students
        .first()
        .map(|r| r.primary_metric.clone())
        .unwrap_or_else(|| "metric".into());
    let summary = distill_report::summarize(&records);
    print!("{}", distill_report::format_summary(&summary, &metric));
    let mut tables = distill_report::format_summary_markdown(&summary, &metric);
    let stale = students
        .iter()
        .filter(|r| context.stale.contains(&r.id))
        .count();
    if stale > 0 {
        let note = format!(
            "{stale} of {} runs are stale: computed by other code than this build's and reused \
             with --reuse-stale (column `stale` of runs.parquet); run without it to compute them \
             again",
            students.len()
        );
        println!("{note}");
        tables.push_str(&format!("\n**{note}.**\n"));
    }
    let markdown = dir.join("summary.md");
    std::fs::write(&markdown, &tables)
        .with_context(|| format!("writing {}", markdown.display()))?;
    // The tables are written first: a plot that cannot be drawn loses nothing else.
    let plots = match distill_report::plots::write_plots(&dir.join("plots"), &records, &metric) {
        Ok(plots) => distill_report::plots::plots_markdown(&plots, dir),
        Err(e) => {
            distill_rt::tracing::warn!(error = %e, "no plots");
            format!("\n## Plots\n\nNot drawn: {e}\n")
        }
    };
    let report_md = dir.join("report.md");
    std::fs::write(&report_md, format!("{tables}{plots}"))
        .with_context(|| format!("writing {}", report_md.display()))?;
    for r in records
        .iter()
        .filter(|r| r.status != distill_engine::job::Status::Ok)
    {
        let what = r
            .strategy
            .as_deref()
            .map_or(format!("teacher {}", r.model), |s| {
                format!("{} <- {s} seed {}", r.model, r.seed)
            });
        let reason = r.error.clone().unwrap_or_else(|| format!("{:?}", r.stop));
        println!(
            "{:?}: {what}: {}",
            r.status,
            reason.lines().next().unwrap_or("")
        );
    }
    println!(
        "wrote {}, {}, {} and {} (tables and plots)",
        runs.display(),
        metrics.display(),
        markdown.display(),
        report_md.display()
    );
    Ok(())
}

/// The `deps/` folder next to the executable if it holds this workspace's plugins, else the
/// executable's folder.
/// In a cargo target folder every build writes plugins to `deps/` first (`cargo test` writes
/// them nowhere else), so `deps/` is never older than the copies cargo places next to binaries.
fn default_plugin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the distill executable")?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .context("the executable has no parent folder")?;
    let deps = dir.join("deps");
    let has_plugins = |d: &Path| workspace_plugins(d).is_ok_and(|p| !p.is_empty());
    Ok(if has_plugins(&deps) { deps } else { dir })
}

fn list(host: &PluginHost, json: bool) -> Result<()> {
    let entries = host.registrar().list();
    if json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({"kind": e.kind, "name": e.name, "summary": e.summary,
                                        "defaults": e.defaults, "origin": e.origin})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let width = entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
    let mut kind = "";
    for e in &entries {
        if e.kind != kind {
            kind = e.kind;
            let heading = match kind {
                "dataset" => "datasets",
                "model" => "models",
                _ => "strategies",
            };
            println!("{heading}:");
        }
        let origin = Path::new(&e.origin)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!("  {:width$}  {}  [{origin}]", e.name, e.summary);
        if let Some(keys) = e.defaults.as_object() {
            let keys: Vec<String> = keys.iter().map(|(k, v)| describe_key(k, v)).collect();
            let text = if keys.is_empty() {
                "no configuration keys".to_string()
            } else {
                keys.join(", ")
            };
            println!("  {:width$}    {text}", "");
        }
    }
    Ok(())
}

/// `name: type = default` for one configuration key.
fn describe_key(name: &str, default: &serde_json::Value) -> String {
    use serde_json::Value;
    let kind = match default {
        Value::String(s) if s == distill_rt::config::REQUIRED => {
            return format!("{name}: required");
        }
        Value::Null => return format!("{name}: optional"),
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "table",
    };
    format!("{name}: {kind} = {default}")
}

/// Reads a job file.
fn read_job(job: &Path) -> Result<JobSpec> {
    let text = std::fs::read_to_string(job)
        .with_context(|| format!("reading job file {}", job.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing job file {}", job.display()))
}

/// `{"engine": ..., "dataset": {name: version}, "model": {...}, "strategy": {...}}`.
fn code_versions(host: &PluginHost) -> Result<()> {
    let mut out =
        serde_json::json!({"engine": ENGINE_VERSION, "dataset": {}, "model": {}, "strategy": {}});
    for e in host.registrar().list() {
        if let Some(v) = host.plugin_version(&e.origin) {
            out[e.kind][&e.name] = v.into();
        }
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The code of this build for the job's components; `None` when a name is not registered (the
/// job then fails naming it).
fn current_code(host: &PluginHost, job: &Job) -> Option<CodeVersions> {
    let (dataset, model, strategy) = match job {
        Job::Teacher { dataset, model, .. } => (dataset, model, None),
        Job::Student {
            dataset,
            model,
            strategy,
            ..
        } => (dataset, model, Some(strategy)),
    };
    Some(CodeVersions {
        engine: ENGINE_VERSION.into(),
        dataset: host.code_version("dataset", &dataset.name)?,
        model: host.code_version("model", &model.name)?,
        strategy: match strategy {
            Some(s) => Some(host.code_version("strategy", &s.name)?),
            None => None,
        },
    })
}

/// Runs the job and writes its record; returns how it ended.
fn run(host: &PluginHost, spec: &JobSpec) -> Result<Status> {
    let code = current_code(host, &spec.job);
    let record = match (&spec.code, &code) {
        (Some(planned), Some(built)) if planned != built => {
            let mut record = empty_record(spec);
            record.error = Some(format!(
                "the job was planned for code {planned:?}, but this build has {built:?}: the \
                 workspace was rebuilt after planning; run `cargo xtask run` again to plan with \
                 this build"
            ));
            record
        }
        _ => {
            let mut record = run_job(host.registrar(), spec, &Device::Cpu);
            record.code = code;
            record
        }
    };
    let path = spec.out_dir.join(RECORD_FILE);
    write_json_atomic(&path, &record).with_context(|| format!("writing {}", path.display()))?;
    Ok(record.status)
}
