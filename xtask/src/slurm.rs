//! The Slurm executor: hands the plan's jobs to `sbatch` as job arrays whose `afterok`
//! dependencies follow the plan's graph, each task running the local executor's worker command
//! ([`crate::runner::worker_command`]) on the shared filesystem where the job folders live; then
//! watches them through `squeue` (and `sacct` where accounting runs) until every job has ended.
//! Which plan job each Slurm task runs is kept in `<out>/slurm/submitted.json`, written after
//! every `sbatch`, so that a rerun asks Slurm what is still queued or running and submits only
//! the rest. A job Slurm ends without a record gets a `failed.json` naming the Slurm state and
//! the tail of its logs; every ended job gets `slurm.json` (its Slurm id and state) for the
//! tables.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::plan::PlannedJob;
use crate::record::{checked_record, finished_status, resumable};
use crate::runner::{RunCounts, WORKER_LOG, log_tail, worker_command, write_atomic, write_failed};

/// The `[slurm]` table of an experiment file: what every `sbatch` asks for.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// `--time`, the time limit of each job: minutes (`90`) or Slurm's forms (`"HH:MM:SS"`,
    /// `"D-HH"`); by default the file's `timeout_minutes`, else the partition's limit.
    pub time: Option<TimeLimit>,
    /// `--cpus-per-task`: the threads of each job's worker.
    #[serde(default = "one")]
    pub cpus_per_task: usize,
    /// `--mem`, the memory of each job (`8G`).
    pub mem: Option<String>,
    /// `--gres`, for example `gpu:1`.
    pub gres: Option<String>,
    /// The most tasks of one array running at once (`--array=...%N`).
    pub max_array_tasks: Option<usize>,
    /// More `sbatch` options, passed as they are (`["--constraint=a100", "--requeue"]`).
    #[serde(default)]
    pub options: Vec<String>,
    /// Seconds between two looks at the queue while waiting.
    #[serde(default = "ten")]
    pub poll_seconds: f64,
}

/// A Slurm time limit as the file writes it.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TimeLimit {
    /// Minutes.
    Minutes(u64),
    /// Any of `sbatch --time`'s forms.
    Text(String),
}

impl std::fmt::Display for TimeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Minutes(m) => write!(f, "{m}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            partition: None,
            account: None,
            qos: None,
            time: None,
            cpus_per_task: 1,
            mem: None,
            gres: None,
            max_array_tasks: None,
            options: Vec::new(),
            poll_seconds: 10.0,
        }
    }
}

fn one() -> usize {
    1
}

fn ten() -> f64 {
    10.0
}

impl SlurmConfig {
    /// The problems of the table, each naming its key.
    pub fn problems(&self, file: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.cpus_per_task == 0 {
            problems.push(format!(
                "{file}: key `slurm.cpus_per_task`: must be at least 1"
            ));
        }
        if self.max_array_tasks == Some(0) {
            problems.push(format!(
                "{file}: key `slurm.max_array_tasks`: must be at least 1"
            ));
        }
        if !(self.poll_seconds.is_finite() && self.poll_seconds > 0.0) {
            problems.push(format!(
                "{file}: key `slurm.poll_seconds`: must be > 0, got {}",
                self.poll_seconds
            ));
        }
        for (i, o) in self.options.iter().enumerate() {
            if !o.starts_with('-') {
                problems.push(format!(
                    "{file}: key `slurm.options[{i}]`: `{o}` is not an sbatch option (they start \
                     with `-`, as in `--constraint=a100`)"
                ));
            }
        }
        problems
    }
}

/// What the Slurm executor needs besides the plan.
pub struct SlurmOptions<'a> {
    /// The `[slurm]` table.
    pub config: &'a SlurmConfig,
    /// The experiment's name (the Slurm job name is `distill-<name>`).
    pub experiment: &'a str,
    /// The results folder (`reports/<name>`), on a filesystem the nodes share.
    pub out: &'a Path,
    /// The `distill` binary (used in place: on the shared filesystem too).
    pub distill: &'a Path,
    /// The workers' `--log-format`.
    pub log_format: &'a str,
    /// The file's `timeout_minutes`: the time limit when `slurm.time` is not set.
    pub timeout_minutes: Option<f64>,
    /// Submit, then return without waiting.
    pub detach: bool,
}

/// States in which a Slurm job has not ended (it may still run, or run again).
const IN_FLIGHT: [&str; 13] = [
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "SPECIAL_EXIT",
    "RESV_DEL_HOLD",
];

/// The Slurm reason of a pending job whose dependency can never be satisfied.
const DEPENDENCY_NEVER: &str = "DependencyNeverSatisfied";

/// A Slurm task's state and, while it waits, the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, ...; `UNKNOWN` when Slurm no longer knows
    /// the job (it ended, and neither `squeue` nor `sacct` remembers it).
    pub state: String,
    /// Why it waits (`Dependency`, `Resources`, `DependencyNeverSatisfied`); may be empty.
    pub reason: String,
}

impl TaskState {
    fn in_flight(&self) -> bool {
        IN_FLIGHT.contains(&self.state.as_str())
    }
}

/// The ledger of an experiment folder: which Slurm task runs each plan job, by job id.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    /// Plan job id -> `<array job id>_<task>`.
    jobs: BTreeMap<String, String>,
}

impl Ledger {
    fn path(out: &Path) -> PathBuf {
        out.join("slurm").join("submitted.json")
    }

    fn load(out: &Path) -> Result<Self> {
        let path = Self::path(out);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a ledger of Slurm jobs", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, out: &Path) -> Result<()> {
        write_atomic(&Self::path(out), &serde_json::to_vec_pretty(self)?)
    }
}

/// Runs `program args`, failing with its stderr.
fn output(program: &str, args: &[String]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!(
            "running {program}: the Slurm executor needs Slurm's commands (sbatch, squeue, \
             scancel) on PATH, on a machine that can submit jobs"
        )
    })?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The state of every Slurm task in `tasks` (`<array>_<task>` ids): from `squeue` for the jobs
/// it still shows (queued, running, and recently ended ones), then from `sacct` where
/// accounting runs; `UNKNOWN` for the rest.
pub fn query(tasks: &BTreeSet<String>) -> Result<BTreeMap<String, TaskState>> {
    let mut states = BTreeMap::new();
    if tasks.is_empty() {
        return Ok(states);
    }
    // Without Slurm's commands nothing can be said of any job: an error, never `UNKNOWN`.
    output("squeue", &["--version".into()])?;
    let arrays: BTreeSet<&str> = tasks
        .iter()
        .map(|t| t.split('_').next().unwrap_or(t))
        .collect();
    let list = arrays.iter().copied().collect::<Vec<_>>().join(",");
    // Jobs Slurm has forgotten make squeue fail when it is given only those: ask per array then.
    let squeue = |ids: &str| {
        output(
            "squeue",
            &[
                "--noheader".into(),
                "--array".into(),
                "--states=all".into(),
                "--format=%i|%T|%r".into(),
                format!("--jobs={ids}"),
            ],
        )
    };
    let mut text = String::new();
    match squeue(&list) {
        Ok(t) => text = t,
        Err(_) => {
            for a in &arrays {
                if let Ok(t) = squeue(a) {
                    text.push_str(&t);
                }
            }
        }
    }
    for line in text.lines() {
        let mut parts = line.split('|');
        if let (Some(id), Some(state), reason) = (parts.next(), parts.next(), parts.next()) {
            states.insert(
                id.trim().to_string(),
                TaskState {
                    state: state.trim().to_string(),
                    reason: reason.unwrap_or("").trim().to_string(),
                },
            );
        }
    }
    let missing: Vec<&String> = tasks.iter().filter(|t| !states.contains_key(*t)).collect();
    if !missing.is_empty() {
        let args = [
            "--noheader".into(),
            "--parsable2".into(),
            "--allocations".into(),
            "--format=JobID,State".into(),
            format!(
                "--jobs={}",
                missing
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        // Without accounting sacct fails; the jobs are then unknown.
        if let Ok(text) = output("sacct", &args) {
            for line in text.lines() {
                if let Some((id, state)) = line.split_once('|') {
                    // `CANCELLED by 0` -> `CANCELLED`.
                    let state = state.split_whitespace().next().unwrap_or("UNKNOWN");
                    states.insert(
                        id.to_string(),
                        TaskState {
                            state: state.to_string(),
                            reason: String::new(),
                        },
                    );
                }
            }
        }
    }
    Ok(tasks
        .iter()
        .map(|t| {
            let s = states.get(t).cloned().unwrap_or(TaskState {
                state: "UNKNOWN".into(),
                reason: String::new(),
            });
            (t.clone(), s)
        })
        .collect())
}

/// Quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script of one array: task `i` runs the `i`-th job with the worker command.
fn batch_script(jobs: &[&PlannedJob], opts: &SlurmOptions, threads: &str) -> String {
    let placeholder = Path::new("__JOB__");
    let command = worker_command(opts.distill, opts.log_format, placeholder, threads);
    let mut line = String::from("exec env");
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            line.push_str(&format!(
                " {}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    line.push(' ');
    line.push_str(&quote(&command.get_program().to_string_lossy()));
    for arg in command.get_args() {
        if arg == placeholder.as_os_str() {
            line.push_str(" \"$job\"");
        } else {
            line.push(' ');
            line.push_str(&quote(&arg.to_string_lossy()));
        }
    }
    let list: String = jobs
        .iter()
        .map(|j| {
            format!(
                "    {}  # {}\n",
                quote(&j.dir.join("job.json").to_string_lossy()),
                j.label.replace('\n', " ")
            )
        })
        .collect();
    format!(
        "#!/bin/bash\n\
         # Written by `cargo xtask run --executor slurm` for experiment `{experiment}`: task i of\n\
         # the array runs job i below with the local executor's worker command.\n\
         set -eu\n\
         jobs=(\n{list})\n\
         job=${{jobs[$SLURM_ARRAY_TASK_ID]}}\n\
         {line} >\"$(dirname \"$job\")/{WORKER_LOG}\" 2>&1\n",
        experiment = opts.experiment,
    )
}

/// How a job stands when the run starts.
enum Standing {
    /// A trusted record: `ok` or `diverged`.
    Done(String),
    /// Queued or running in Slurm as this task.
    InFlight(String),
    /// To submit.
    Todo,
}

/// What the executor knows of each unfinished job while it waits.
struct Tracked<'a> {
    job: &'a PlannedJob,
    task: String,
}

/// Submits every unfinished job of `plan` that is not already queued or running, then (unless
/// `detach`) waits for all of them; returns the counts.
pub fn run(plan: &[PlannedJob], opts: &SlurmOptions) -> Result<RunCounts> {
    std::fs::create_dir_all(logs_dir(opts.out))
        .with_context(|| format!("creating {}", logs_dir(opts.out).display()))?;
    let mut ledger = Ledger::load(opts.out)?;
    let known: BTreeSet<String> = plan
        .iter()
        .filter_map(|j| ledger.jobs.get(&j.id).cloned())
        .collect();
    let states = query(&known)?;
    let mut counts = RunCounts::default();
    let mut standing: BTreeMap<&str, Standing> = BTreeMap::new();
    for job in plan {
        let task = ledger.jobs.get(&job.id);
        let state = task.and_then(|t| states.get(t));
        if let (Some(task), Some(state)) = (task, state) {
            if state.in_flight() {
                standing.insert(&job.id, Standing::InFlight(task.clone()));
                continue;
            }
            // It ended while nobody watched: say how, before deciding what to do with it.
            settle(&job.dir, task, state)?;
        }
        match resumable(&job.dir, &job.label) {
            Some(status) => {
                counts.skipped += 1;
                standing.insert(&job.id, Standing::Done(status));
            }
            None => {
                standing.insert(&job.id, Standing::Todo);
            }
        }
    }
    let queued = standing
        .values()
        .filter(|s| matches!(s, Standing::InFlight(_)))
        .count();
    if counts.skipped > 0 {
        eprintln!("skipping {} finished jobs", counts.skipped);
    }
    if queued > 0 {
        eprintln!("{queued} jobs are already queued or running in Slurm: not submitted again");
    }
    let submitted = submit(plan, opts, &mut standing, &mut ledger, &mut counts)?;
    counts.ran = submitted;
    let tracked: Vec<Tracked> = plan
        .iter()
        .filter_map(|job| match standing.get(job.id.as_str()) {
            Some(Standing::InFlight(task)) => Some(Tracked {
                job,
                task: task.clone(),
            }),
            _ => None,
        })
        .collect();
    if opts.detach {
        eprintln!(
            "submitted {submitted} jobs; {} are queued or running in Slurm (job name `distill-{}`). \
             `cargo xtask status FILE` shows them; `cargo xtask report {}` writes the tables",
            tracked.len(),
            opts.experiment,
            opts.out.display()
        );
        return Ok(counts);
    }
    wait(&tracked, opts, &mut counts)?;
    Ok(counts)
}

/// Submits the jobs marked `Todo`, as arrays of jobs with the same dependencies, in the order of
/// the plan's graph; returns how many.
fn submit<'a>(
    plan: &'a [PlannedJob],
    opts: &SlurmOptions,
    standing: &mut BTreeMap<&'a str, Standing>,
    ledger: &mut Ledger,
    counts: &mut RunCounts,
) -> Result<usize> {
    let mut submitted = 0;
    // Scripts are numbered on from those of earlier runs.
    let mut arrays = std::fs::read_dir(opts.out.join("slurm"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("array-"))
                .count()
        })
        .unwrap_or(0);
    loop {
        // Jobs whose dependencies are all finished or have a Slurm task, grouped by those tasks.
        let mut groups: BTreeMap<Vec<String>, Vec<&PlannedJob>> = BTreeMap::new();
        for job in plan {
            if !matches!(standing.get(job.id.as_str()), Some(Standing::Todo)) {
                continue;
            }
            let mut after = Vec::new();
            let mut blocked = false;
            let mut failed_dep = None;
            for d in &job.depends_on {
                match standing.get(d.as_str()) {
                    Some(Standing::Done(s)) if s == "ok" => {}
                    Some(Standing::Done(s)) => failed_dep = Some((d, s.clone())),
                    Some(Standing::InFlight(task)) => after.push(task.clone()),
                    _ => blocked = true,
                }
            }
            if let Some((dep, s)) = failed_dep {
                write_failed(&job.dir, &format!("its teacher job {dep} ended as {s}"))?;
                standing.insert(&job.id, Standing::Done("failed".into()));
                counts.failed += 1;
                continue;
            }
            if !blocked {
                after.sort();
                groups.entry(after).or_default().push(job);
            }
        }
        if groups.is_empty() {
            break;
        }
        for (after, jobs) in groups {
            // Slurm's default MaxArraySize is 1001.
            for chunk in jobs.chunks(1000) {
                arrays += 1;
                let array = submit_array(chunk, &after, arrays, opts)?;
                for (i, job) in chunk.iter().enumerate() {
                    let task = format!("{array}_{i}");
                    ledger.jobs.insert(job.id.clone(), task.clone());
                    standing.insert(&job.id, Standing::InFlight(task));
                }
                ledger.save(opts.out)?;
                submitted += chunk.len();
            }
        }
    }
    if let Some(job) = plan
        .iter()
        .find(|j| matches!(standing.get(j.id.as_str()), Some(Standing::Todo)))
    {
        bail!(
            "{}: its teachers neither finished nor could be submitted (a cycle in the plan?)",
            job.label
        );
    }
    Ok(submitted)
}

/// Writes the jobs' files and the array's script, runs `sbatch`; returns the array's job id.
fn submit_array(
    jobs: &[&PlannedJob],
    after: &[String],
    number: usize,
    opts: &SlurmOptions,
) -> Result<String> {
    let c = opts.config;
    for job in jobs {
        crate::results::job_folder(&job.dir)?;
        for stale in ["failed.json", "record.json", SLURM_FILE] {
            let _ = std::fs::remove_file(job.dir.join(stale));
        }
        write_atomic(
            &job.dir.join("job.json"),
            &serde_json::to_vec_pretty(&job.spec)?,
        )?;
    }
    let slurm = opts.out.join("slurm");
    let script = slurm.join(format!("array-{number:04}.sh"));
    let threads = c.cpus_per_task.to_string();
    write_atomic(&script, batch_script(jobs, opts, &threads).as_bytes())?;
    let mut array = format!("--array=0-{}", jobs.len() - 1);
    if let Some(n) = c.max_array_tasks {
        array.push_str(&format!("%{n}"));
    }
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=distill-{}", opts.experiment),
        array,
        format!("--cpus-per-task={}", c.cpus_per_task),
        format!(
            "--output={}",
            logs_dir(opts.out).join("%A_%a.out").display()
        ),
        "--kill-on-invalid-dep=yes".into(),
    ];
    let time = c.time.as_ref().map(TimeLimit::to_string).or_else(|| {
        opts.timeout_minutes
            .map(|m| format!("{}", m.ceil().max(1.0) as u64))
    });
    for (flag, value) in [
        ("--partition", &c.partition),
        ("--account", &c.account),
        ("--qos", &c.qos),
        ("--time", &time),
        ("--mem", &c.mem),
        ("--gres", &c.gres),
    ] {
        if let Some(v) = value {
            args.push(format!("{flag}={v}"));
        }
    }
    if !after.is_empty() {
        args.push(format!("--dependency=afterok:{}", after.join(":")));
    }
    args.extend(c.options.iter().cloned());
    args.push(script.display().to_string());
    let out = output("sbatch", &args)?;
    // `--parsable` prints `<id>` or `<id>;<cluster>`.
    let id = out.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed `{}`, not a job id", out.trim());
    }
    Ok(id)
}

/// The file of a job folder that says where Slurm ran it and how it ended; `distill report` reads
/// it into `runs.parquet`'s `slurm_job_id` and `slurm_state`.
const SLURM_FILE: &str = "slurm.json";

/// The folders of the teachers of the job in `dir` (from its `job.json`).
fn teacher_dirs(dir: &Path) -> Vec<PathBuf> {
    let spec: serde_json::Value = std::fs::read(dir.join("job.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    spec["job"]["teachers"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t["dir"].as_str().map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Records how Slurm ended the job of folder `dir` (Slurm task `task`): `slurm.json`, and, when
/// the worker left no trusted record, `failed.json`: skipped because a teacher did not succeed,
/// or ended by Slurm in `state`, with the tail of the worker's and Slurm's logs. Returns the
/// job's status.
pub fn settle(dir: &Path, task: &str, state: &TaskState) -> Result<String> {
    if !dir.is_dir() {
        return Ok("failed".into());
    }
    let slurm_file = dir.join(SLURM_FILE);
    // A job Slurm has forgotten keeps the state it was seen ending in.
    if state.state != "UNKNOWN" || !slurm_file.is_file() {
        write_atomic(
            &slurm_file,
            &serde_json::to_vec_pretty(&serde_json::json!({"job_id": task, "state": state.state}))?,
        )?;
    }
    if let Some(status) = finished_status(dir) {
        return Ok(status);
    }
    if dir.join("failed.json").is_file() {
        return Ok("failed".into());
    }
    let unsuccessful = teacher_dirs(dir)
        .into_iter()
        .find_map(|t| match finished_status(&t) {
            Some(s) if s == "ok" => None,
            Some(s) => Some((t, s)),
            None => Some((t, "failed".to_string())),
        });
    let reason = match unsuccessful {
        Some((teacher, s)) if !dir.join(WORKER_LOG).is_file() => format!(
            "skipped: its teacher job {} ended as {s}, so Slurm never started it (Slurm job \
             {task} ended as {}, {})",
            teacher
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            state.state,
            if state.reason.is_empty() || state.reason == "None" {
                DEPENDENCY_NEVER
            } else {
                &state.reason
            },
        ),
        _ => {
            let (array, index) = task.split_once('_').unwrap_or((task, "0"));
            let slurm_log = dir
                .parent()
                .and_then(Path::parent)
                .map(|out| log_tail(&logs_dir(out).join(format!("{array}_{index}.out"))))
                .unwrap_or_default();
            format!(
                "Slurm ended job {task} as {} without a record\n{}\n{slurm_log}",
                state.state,
                log_tail(&dir.join(WORKER_LOG))
            )
            .trim_end()
            .to_string()
        }
    };
    write_failed(dir, &reason)?;
    Ok("failed".into())
}

/// Settles every job of the ledger of `out` that Slurm has ended (for `cargo xtask report` after
/// `--detach`); does nothing without a ledger.
pub fn settle_all(out: &Path) -> Result<()> {
    if !Ledger::path(out).is_file() {
        return Ok(());
    }
    let ledger = Ledger::load(out)?;
    let tasks: BTreeSet<String> = ledger.jobs.values().cloned().collect();
    let states = query(&tasks)?;
    for (id, task) in &ledger.jobs {
        let state = &states[task];
        if !state.in_flight() {
            settle(&out.join("jobs").join(id), task, state)?;
        }
    }
    Ok(())
}

/// Where Slurm writes each task's own output (its messages about time limits and cancels).
fn logs_dir(out: &Path) -> PathBuf {
    out.join("slurm").join("logs")
}

/// Waits until every tracked job has ended, settling each as it ends. Ctrl-C asks whether to
/// cancel the jobs or leave them running.
fn wait(tracked: &[Tracked], opts: &SlurmOptions, counts: &mut RunCounts) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handlers")?;
    }
    let bar = ProgressBar::new(tracked.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} jobs  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut open: Vec<&Tracked> = tracked.iter().collect();
    let poll = Duration::from_secs_f64(opts.config.poll_seconds);
    while !open.is_empty() {
        let tasks: BTreeSet<String> = open.iter().map(|t| t.task.clone()).collect();
        // A controller that does not answer for a moment (restarting, busy) is asked again.
        let states = match query(&tasks) {
            Ok(states) => states,
            Err(e) => {
                bar.suspend(|| eprintln!("warning: asking Slurm failed, asking again: {e:#}"));
                BTreeMap::new()
            }
        };
        let mut still = Vec::new();
        for t in open {
            let Some(state) = states.get(&t.task) else {
                still.push(t);
                continue;
            };
            if state.in_flight() && state.reason == DEPENDENCY_NEVER {
                // Slurm keeps such a job pending unless told otherwise: end it.
                let _ = output("scancel", std::slice::from_ref(&t.task));
            }
            if state.in_flight() {
                still.push(t);
                continue;
            }
            let status = settle(&t.job.dir, &t.task, state)?;
            if status == "failed" {
                counts.failed += 1;
                bar.suspend(|| {
                    eprintln!(
                        "failed: {} (Slurm {} {}; {})",
                        t.job.label,
                        t.task,
                        state.state,
                        t.job.dir.display()
                    )
                });
            }
            bar.inc(1);
        }
        open = still;
        let running = open
            .iter()
            .filter(|t| states.get(&t.task).is_some_and(|s| s.state == "RUNNING"))
            .count();
        bar.set_message(format!(
            "{running} running, {} queued",
            open.len() - running
        ));
        if open.is_empty() {
            break;
        }
        let slept = std::time::Instant::now();
        while slept.elapsed() < poll && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::Relaxed) {
            bar.finish_and_clear();
            let tasks: Vec<String> = open.iter().map(|t| t.task.clone()).collect();
            return interrupted(&tasks, opts);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// Ctrl-C (or SIGTERM) while waiting: asks, on a terminal, whether to cancel the unfinished jobs
/// or leave them running; elsewhere leaves them running. Says which it did.
fn interrupted(tasks: &[String], opts: &SlurmOptions) -> Result<()> {
    let cancel = std::io::stdin().is_terminal() && {
        eprint!(
            "\ninterrupted: {} jobs are still queued or running in Slurm. Cancel them (scancel)? \
             [y/N] ",
            tasks.len()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).is_ok()
            && matches!(answer.trim(), "y" | "Y" | "yes")
    };
    if cancel {
        output("scancel", tasks)?;
        bail!(
            "interrupted: cancelled {} Slurm jobs; finished jobs keep their records (run the same \
             command again to submit the rest)",
            tasks.len()
        );
    }
    bail!(
        "interrupted: left {} jobs queued or running in Slurm (job name `distill-{}`); `cargo \
         xtask status FILE` shows them, `cargo xtask report {}` writes the tables, and `scancel \
         --name=distill-{}` cancels them",
        tasks.len(),
        opts.experiment,
        opts.out.display(),
        opts.experiment
    )
}

/// One line per job of `plan`: finished, queued or running (with the Slurm task and state),
/// failed (with the reason), or not submitted. Writes nothing.
pub fn status(plan: &[PlannedJob], out: &Path) -> Result<String> {
    let ledger = Ledger::load(out)?;
    let tasks: BTreeSet<String> = plan
        .iter()
        .filter_map(|j| ledger.jobs.get(&j.id).cloned())
        .collect();
    let states = query(&tasks)?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = Vec::new();
    for job in plan {
        let task = ledger.jobs.get(&job.id);
        let state = task.and_then(|t| states.get(t));
        let record = checked_record(&job.dir).ok().flatten();
        let (kind, detail) = match (record, state) {
            (_, Some(s)) if s.in_flight() => {
                let kind = if s.state == "RUNNING" {
                    "running"
                } else {
                    "pending"
                };
                let why = if s.reason.is_empty() || s.reason == "None" {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                };
                (
                    kind,
                    format!("Slurm {} {}{why}", task.map_or("", |t| t), s.state),
                )
            }
            (Some(r), s) if r.status != "failed" => (
                "finished",
                format!(
                    "{}{}",
                    r.status,
                    s.map(|s| format!(", Slurm {} {}", task.map_or("", |t| t), s.state))
                        .unwrap_or_default()
                ),
            ),
            (Some(_), s) | (None, s @ Some(_)) => (
                "failed",
                s.map(|s| format!("Slurm {} {}", task.map_or("", |t| t), s.state))
                    .unwrap_or_else(|| "failed record".into()),
            ),
            (None, None) if job.dir.join("failed.json").is_file() => {
                ("failed", "failed.json".into())
            }
            (None, None) => ("not submitted", String::new()),
        };
        *counts.entry(kind).or_default() += 1;
        if kind != "finished" {
            lines.push(format!("  {kind:<13} {}  {}  {detail}", job.id, job.label));
        }
    }
    let summary = ["finished", "running", "pending", "failed", "not submitted"]
        .iter()
        .map(|k| format!("{} {k}", counts.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "{} jobs: {summary}\n{}",
        plan.len(),
        lines.join("\n")
    ))
}
