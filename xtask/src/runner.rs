//! Runs planned jobs as `distill run-job` worker processes, `jobs` at a time, teachers before
//! the students that need them. A job whose folder already holds a finished record is skipped
//! (resume after a crash, Ctrl-C or `kill -9`; a grown grid reuses what exists). A worker that
//! exits without a record (a crash, an abort, a segfault) or outlives the time-out marks only its
//! own job failed, in `failed.json`, with the reason.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::plan::PlannedJob;
use crate::record::{finished_status, resumable};

/// How to run the plan.
pub struct RunOptions {
    /// Workers at the same time.
    pub jobs: usize,
    /// Per-job time limit.
    pub timeout: Option<Duration>,
    /// The `distill` binary.
    pub distill: PathBuf,
    /// Cores to divide between the running workers (each gets rayon and candle's element-wise
    /// pool sized to its share).
    pub cores: usize,
    /// `distill --log-format` of the workers: `pretty` or `json`.
    pub log_format: String,
}

/// What the run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Jobs run now.
    pub ran: usize,
    /// Jobs skipped because they had finished before.
    pub skipped: usize,
    /// Jobs that ended failed (run now, or not run because their teacher failed).
    pub failed: usize,
}

/// Sets the environment every worker and bench process gets from the xtask: its share of the
/// cores for rayon. The rest of their settings (candle's and OpenBLAS's pools, the allocator)
/// the processes give themselves (`distill_host::apply_worker_settings`), run by hand as here.
pub fn worker_env(command: &mut Command, threads: &str) {
    command.env("RAYON_NUM_THREADS", threads);
}

/// The worker's log (its stdout and stderr) in its job folder.
pub const WORKER_LOG: &str = "worker.log";

/// The command that runs one job, whichever executor starts it: `distill --log-format FORMAT
/// run-job JOB` with [`worker_env`] for `threads` threads, and `DISTILL_LOG` at `info` unless the
/// user set it.
pub fn worker_command(distill: &Path, log_format: &str, job_file: &Path, threads: &str) -> Command {
    let mut command = Command::new(distill);
    worker_env(&mut command, threads);
    command
        .args(["--log-format", log_format, "run-job"])
        .arg(job_file)
        .env(
            "DISTILL_LOG",
            std::env::var("DISTILL_LOG").unwrap_or_else(|_| "info".into()),
        );
    command
}

/// Writes `bytes` to `path` through a temporary file and a rename: a reader sees the old file
/// or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Marks the job of folder `dir` failed without a record, with `reason` (`failed.json`).
pub fn write_failed(dir: &Path, reason: &str) -> Result<()> {
    crate::results::job_folder(dir)?;
    write_atomic(
        &dir.join("failed.json"),
        &serde_json::to_vec_pretty(&json!({"error": reason}))?,
    )
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                6 => "SIGABRT (abort)",
                9 => "SIGKILL",
                11 => "SIGSEGV (segmentation fault)",
                15 => "SIGTERM",
                _ => "a signal",
            };
            format!("signal {sig}, {name}")
        }
        _ => "an unknown status".into(),
    }
}

/// The last lines of a log file (empty when it cannot be read).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(6).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

struct Running {
    child: Child,
    started: Instant,
}

/// How long stopped workers get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Stops every running worker: SIGTERM, then SIGKILL after [`STOP_GRACE`]. A worker writes its
/// record last and atomically, so a stopped job has no record, or a whole one.
fn stop_workers(running: &mut BTreeMap<&str, Running>) {
    for r in running.values() {
        let _ = Command::new("kill")
            .args(["-TERM", &r.child.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline
        && running
            .values_mut()
            .any(|r| matches!(r.child.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in running.values_mut() {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

/// Runs `plan`; returns the counts. SIGINT or SIGTERM stops the running workers within
/// seconds and ends the run with an error; finished jobs keep their records.
pub fn run(plan: &[PlannedJob], opts: &RunOptions) -> Result<RunCounts> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))
            .context("installing the signal handlers")?;
    }
    let mut counts = RunCounts::default();
    let mut state: BTreeMap<&str, Option<String>> = BTreeMap::new(); // id -> final status
    for job in plan {
        match resumable(&job.dir, &job.label) {
            Some(status) => {
                counts.skipped += 1;
                state.insert(&job.id, Some(status));
            }
            None => {
                let _ = std::fs::remove_file(job.dir.join("failed.json"));
                let _ = std::fs::remove_file(job.dir.join("record.json"));
                state.insert(&job.id, None);
            }
        }
    }
    let todo = plan.len() - counts.skipped;
    let bar = ProgressBar::new(todo as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} jobs  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    if counts.skipped > 0 {
        eprintln!("skipping {} finished jobs", counts.skipped);
    }
    let mut running: BTreeMap<&str, Running> = BTreeMap::new();
    loop {
        // Jobs that could start now: the cores are divided among them and the running ones.
        let ready = plan
            .iter()
            .filter(|j| state[j.id.as_str()].is_none() && !running.contains_key(j.id.as_str()))
            .filter(|j| {
                j.depends_on
                    .iter()
                    .all(|d| state.get(d.as_str()).is_some_and(Option::is_some))
            })
            .count();
        let sharing = opts.jobs.min(running.len() + ready).max(1);
        let threads = (opts.cores / sharing).max(1).to_string();
        // Start what can start.
        for job in plan {
            if running.len() >= opts.jobs {
                break;
            }
            if state[job.id.as_str()].is_some() || running.contains_key(job.id.as_str()) {
                continue;
            }
            let deps: Vec<(&String, Option<String>)> = job
                .depends_on
                .iter()
                .map(|d| (d, state.get(d.as_str()).cloned().flatten()))
                .collect();
            if deps.iter().any(|(_, s)| s.is_none()) {
                continue;
            }
            if let Some((dep, Some(s))) = deps.iter().find(|(_, s)| s.as_deref() != Some("ok")) {
                write_failed(&job.dir, &format!("its teacher job {dep} ended as {s}"))?;
                state.insert(&job.id, Some("failed".into()));
                counts.failed += 1;
                bar.inc(1);
                continue;
            }
            crate::results::job_folder(&job.dir)?;
            let job_file = job.dir.join("job.json");
            write_atomic(&job_file, &serde_json::to_vec_pretty(&job.spec)?)?;
            let log = File::create(job.dir.join(WORKER_LOG)).context("creating the worker log")?;
            let child = worker_command(&opts.distill, &opts.log_format, &job_file, &threads)
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("worker log")?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", opts.distill.display()))?;
            running.insert(
                &job.id,
                Running {
                    child,
                    started: Instant::now(),
                },
            );
            counts.ran += 1;
            bar.set_message(job.label.clone());
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            let stopped = running.len();
            stop_workers(&mut running);
            bar.finish_and_clear();
            bail!(
                "interrupted: stopped {stopped} running jobs; {} finished jobs keep their records \
                 (run the same command again to resume)",
                state
                    .values()
                    .filter(|s| s.as_deref().is_some_and(|s| s != "failed"))
                    .count()
            );
        }
        let ids: Vec<&str> = running.keys().copied().collect();
        for id in ids {
            let Some(job) = plan.iter().find(|j| j.id == id) else {
                continue;
            };
            let Some(r) = running.get_mut(id) else {
                continue;
            };
            let exited = r.child.try_wait().context("waiting for a worker")?;
            let timed_out = opts.timeout.is_some_and(|t| r.started.elapsed() > t);
            if exited.is_none() && !timed_out {
                continue;
            }
            let reason = match exited {
                Some(status) => describe_exit(status),
                None => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    format!(
                        "timed out after {:.1} minutes",
                        r.started.elapsed().as_secs_f64() / 60.0
                    )
                }
            };
            running.remove(id);
            let status = match finished_status(&job.dir) {
                Some(s) if exited.is_some() => s,
                _ => {
                    let tail = log_tail(&job.dir.join(WORKER_LOG));
                    write_failed(
                        &job.dir,
                        &format!("worker ended without a record: {reason}\n{tail}"),
                    )?;
                    "failed".into()
                }
            };
            if status == "failed" {
                counts.failed += 1;
                bar.suspend(|| eprintln!("failed: {} ({})", job.label, job.dir.display()));
            }
            state.insert(&job.id, Some(status));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(counts)
}
