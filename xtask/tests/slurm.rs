//! The Slurm executor against a real Slurm: a single-node cluster on this machine, started by
//! `tests/slurm/local-cluster.sh` (as root; `.ci/run` starts it). They are ignored unless asked
//! for, with the reason in the test listing, and fail with that reason when asked for where no
//! cluster answers:
//!
//! ```text
//! sudo bash tests/slurm/local-cluster.sh
//! cargo xtask test --test slurm -- --ignored --test-threads 1
//! ```

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Fails, saying why, unless a Slurm cluster answers `sinfo`.
fn cluster() -> Result<()> {
    let answer = Command::new("sinfo")
        .args(["--noheader", "--format=%t"])
        .output();
    match answer {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => Ok(()),
        Ok(o) => Err(format!(
            "no Slurm cluster answers (sinfo: {}): start one with `sudo bash \
             tests/slurm/local-cluster.sh`",
            String::from_utf8_lossy(&o.stderr).trim()
        )
        .into()),
        Err(e) => Err(format!(
            "Slurm is not installed here (sinfo: {e}): `sudo bash tests/slurm/local-cluster.sh` \
             installs and starts a single-node cluster"
        )
        .into()),
    }
}

/// The Slurm tasks of experiment `name` that are queued or running.
fn queued(name: &str) -> Result<Vec<String>> {
    let out = Command::new("squeue")
        .args(["--noheader", "--array", "--format=%i %T"])
        .arg(format!("--name=distill-{name}"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The ledger of a results folder: plan job id -> Slurm task.
fn ledger(out: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read(out.join("slurm/submitted.json"))?;
    let v: serde_json::Value = serde_json::from_slice(&text)?;
    Ok(v["jobs"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default())
}

/// `xtask run --executor slurm` on `file` into `out`, looking at the queue every second.
fn slurm_run(file: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = xtask();
    c.args(["run", "--no-build", "--executor", "slurm", "--out"])
        .arg(out)
        .arg(file)
        .args(["--set", "slurm.poll_seconds=0.5"])
        .args(extra);
    c
}

fn write(dir: &Path, name: &str, content: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, content)?;
    Ok(file)
}

/// The same file through Slurm and through the local executor: the same jobs with the same
/// numbers, bit for bit (the kernels' sums do not depend on the thread count).
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn quick_under_slurm_equals_the_local_run() -> Result<()> {
    cluster()?;
    let quick = root().join("experiments/quick.toml");
    let (local, slurm) = (temp("slurm-quick-local"), temp("slurm-quick-slurm"));
    let a = run_experiment(&quick, &local, &[])?;
    assert!(a.status.success(), "{}", text(&a));
    let b = slurm_run(&quick, &slurm, &[]).output()?;
    assert!(b.status.success(), "{}", text(&b));
    let (ra, rb) = (
        read(&local.join("runs.parquet"))?,
        read(&slurm.join("runs.parquet"))?,
    );
    let by_id =
        |df: &polars::prelude::DataFrame, col: &str| -> Result<BTreeMap<String, Option<u64>>> {
            let ids = strings(df, "run_id")?;
            let values = floats(df, col)?;
            Ok(ids
                .into_iter()
                .zip(values)
                .map(|(id, v)| (id.unwrap_or_default(), v.map(f64::to_bits)))
                .collect())
        };
    for col in [
        "best_metric",
        "final_metric",
        "best_validation",
        "teacher_metric",
    ] {
        let (x, y) = (by_id(&ra, col)?, by_id(&rb, col)?);
        assert_eq!(x.len(), 6, "{col}: {x:?}");
        assert_eq!(x, y, "{col} differs between the executors");
    }
    assert_eq!(
        metrics_by_run(&read(&local.join("metrics.parquet"))?)?,
        metrics_by_run(&read(&slurm.join("metrics.parquet"))?)?,
        "per-epoch metrics differ between the executors"
    );
    let states = strings(&rb, "slurm_state")?;
    assert!(
        states.iter().all(|s| s.as_deref() == Some("COMPLETED")),
        "{states:?}"
    );
    assert!(strings(&ra, "slurm_state")?.iter().all(Option::is_none));
    let ids = strings(&rb, "slurm_job_id")?;
    assert!(
        ids.iter()
            .all(|i| i.as_deref().is_some_and(|i| i.contains('_'))),
        "{ids:?}"
    );
    for dir in [local, slurm] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// A panicking strategy, a job cancelled with scancel while it runs and one killed by its time
/// limit: each a failed row naming the Slurm state. A rerun submits exactly those three and
/// completes the tables.
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn failed_cancelled_and_timed_out_jobs_are_failed_rows_and_a_rerun_submits_only_them() -> Result<()>
{
    cluster()?;
    let dir = temp("slurm-faults");
    let file = write(
        &dir,
        "slurm-faults",
        r#"seeds = [0, 1]
[train]
epochs = 1
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = { train = 64, validation = 32, test = 32, size = 8 }
[[students]]
model = "vision.mlp"
config = { hidden = [8] }
[[strategies]]
name = "baseline"
[[strategies]]
name = "test.panic"
[[strategies]]
name = "test.wait"
"#,
    )?;
    let hold = dir.join("hold");
    std::fs::write(&hold, "")?;
    let faulty = PathBuf::from(env!("CARGO_BIN_EXE_xtask"))
        .with_file_name("deps")
        .join("libdistill_test_faulty.so");
    let out = dir.join("out");
    let run = |time: &str| -> Command {
        let mut c = slurm_run(&file, &out, &["--set", &format!("slurm.time={time}")]);
        c.env("DISTILL_EXTRA_PLUGINS", &faulty)
            .env("TEST_WAIT_WHILE_EXISTS", &hold);
        c
    };
    // Both `test.wait` jobs hold; cancel the first one seen running, the other meets its
    // one-minute limit.
    let wait_running = |task: &str| -> Result<bool> {
        let jobs = ledger(&out)?;
        let id = jobs
            .iter()
            .find(|(_, t)| t.as_str() == task)
            .map(|(id, _)| id);
        let spec = id
            .map(|id| std::fs::read_to_string(out.join("jobs").join(id).join("job.json")))
            .transpose()?
            .unwrap_or_default();
        Ok(spec.contains("test.wait")
            && queued("slurm-faults")?.contains(&format!("{task} RUNNING")))
    };
    let (child, task) = spawn_until(run("1"), &out, 6, &wait_running)?;
    let done = Command::new("scancel").arg(&task).status()?;
    assert!(done.success());
    let cancelled = ledger(&out)?
        .into_iter()
        .find(|(_, t)| t == &task)
        .map(|(id, _)| id)
        .unwrap_or_default();
    let first = child.wait_with_output()?;
    assert!(first.status.success(), "{}", text(&first));
    let runs = read(&out.join("runs.parquet"))?;
    let (ids, strategy, status, error, state) = (
        strings(&runs, "run_id")?,
        strings(&runs, "strategy")?,
        strings(&runs, "status")?,
        strings(&runs, "error")?,
        strings(&runs, "slurm_state")?,
    );
    let mut seen = BTreeMap::new();
    for i in 0..runs.height() {
        let (id, s, st, e, sl) = (
            ids[i].clone().unwrap_or_default(),
            strategy[i].clone().unwrap_or_default(),
            status[i].clone().unwrap_or_default(),
            error[i].clone().unwrap_or_default(),
            state[i].clone().unwrap_or_default(),
        );
        let kind = match s.as_str() {
            "baseline" => {
                assert_eq!((st.as_str(), sl.as_str()), ("ok", "COMPLETED"));
                "ok"
            }
            "test.panic" => {
                assert!(
                    st == "failed" && sl == "FAILED" && e.contains("deliberate panic"),
                    "{st} {sl}: {e}"
                );
                "panic"
            }
            "test.wait" if id == cancelled => {
                assert!(
                    st == "failed" && sl == "CANCELLED" && e.contains("CANCELLED"),
                    "{st} {sl}: {e}"
                );
                "cancelled"
            }
            "test.wait" => {
                assert!(
                    st == "failed" && sl == "TIMEOUT" && e.contains("TIMEOUT"),
                    "{st} {sl}: {e}"
                );
                "timeout"
            }
            other => panic!("unexpected strategy {other}"),
        };
        *seen.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([("cancelled", 1), ("ok", 2), ("panic", 2), ("timeout", 1)])
    );
    // Released: the rerun submits the four failed jobs, and nothing else.
    std::fs::remove_file(&hold)?;
    let before = ledger(&out)?;
    let second = run("10").output()?;
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("ran 4 jobs, skipped 2 finished"),
        "{}",
        text(&second)
    );
    let after = ledger(&out)?;
    let resubmitted: Vec<&String> = after
        .iter()
        .filter(|(id, task)| before.get(*id) != Some(task))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(resubmitted.len(), 4, "{resubmitted:?}");
    let runs = read(&out.join("runs.parquet"))?;
    let pairs: Vec<(String, String)> = strings(&runs, "strategy")?
        .into_iter()
        .zip(strings(&runs, "status")?)
        .map(|(s, t)| (s.unwrap_or_default(), t.unwrap_or_default()))
        .collect();
    for (s, st) in &pairs {
        let want = if s == "test.panic" { "failed" } else { "ok" };
        assert_eq!(st, want, "{s}: {pairs:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Running the same file again while its jobs wait in the queue submits nothing twice; `status`
/// shows them pending with their Slurm ids.
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn a_rerun_while_jobs_are_queued_submits_nothing_twice() -> Result<()> {
    cluster()?;
    let dir = temp("slurm-queued");
    let file = write(
        &dir,
        "slurm-queued",
        r#"seeds = [0, 1, 2]
[train]
epochs = 1
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = { train = 64, validation = 32, test = 32, size = 8 }
[[teachers]]
model = "vision.mlp"
config = { hidden = [8] }
[[students]]
model = "vision.mlp"
config = { hidden = [4] }
[[strategies]]
name = "kd"
# Held: they wait in the queue until released.
[slurm]
options = ["--hold"]
"#,
    )?;
    let out = dir.join("out");
    for round in 0..2 {
        let run = slurm_run(&file, &out, &["--detach"]).output()?;
        assert!(run.status.success(), "{}", text(&run));
        if round == 1 {
            assert!(text(&run).contains("submitted 0 jobs"), "{}", text(&run));
            assert!(
                text(&run).contains("4 jobs are already queued"),
                "{}",
                text(&run)
            );
        }
        assert_eq!(queued("slurm-queued")?.len(), 4, "round {round}");
    }
    let status = xtask()
        .args(["status", "--no-build", "--out"])
        .arg(&out)
        .arg(&file)
        .output()?;
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("4 pending"), "{}", text(&status));
    assert!(text(&status).contains("JobHeldUser"), "{}", text(&status));
    let cancel = Command::new("scancel")
        .arg("--name=distill-slurm-queued")
        .status()?;
    assert!(cancel.success());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Born-again chains and multi-teacher entries run under Slurm, every job after the jobs it
/// depends on.
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn chains_and_several_teachers_run_after_their_teachers() -> Result<()> {
    cluster()?;
    let dir = temp("slurm-chains");
    let file = write(
        &dir,
        "slurm-chains",
        r#"seeds = [0]
[train]
epochs = 2
batch_size = 64
optimizer = { name = "adamw", lr = 0.003 }
[[datasets]]
name = "vision.synthetic"
config = { train = 256, validation = 64, test = 64, size = 8 }
[[teachers]]
model = "vision.mlp"
config = { hidden = [32] }
[[teachers]]
model = "vision.mlp"
config = { hidden = [24] }
in_grid = false
[[students]]
model = "vision.mlp"
config = { hidden = [16] }
[[strategies]]
name = "kd"
[[strategies]]
name = "born-again"
generations = 2
[[strategies]]
name = "multi-teacher"
teachers = [0, 1]
"#,
    )?;
    let out = dir.join("out");
    let run = slurm_run(&file, &out, &[]).output()?;
    assert!(run.status.success(), "{}", text(&run));
    // Every record ok, and every job started after each of its teachers finished.
    let mut records = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("jobs"))? {
        let dir = entry?.path();
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("record.json"))?)?;
        let job: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("job.json"))?)?;
        assert_eq!(record["status"], "ok", "{}", dir.display());
        records.insert(dir, (record, job));
    }
    // 2 teachers, kd, the chain's own teacher (the student alone) and its 2 generations,
    // multi-teacher.
    assert_eq!(records.len(), 7);
    let mut dependent = 0;
    for (record, job) in records.values() {
        for teacher in job["job"]["teachers"].as_array().into_iter().flatten() {
            let tdir = PathBuf::from(teacher["dir"].as_str().unwrap_or_default());
            let (trecord, _) = &records[&tdir];
            assert!(
                record["started_at"].as_f64() >= trecord["finished_at"].as_f64(),
                "{} started before its teacher {} finished",
                record["id"],
                trecord["id"]
            );
            dependent += 1;
        }
    }
    // kd 1, born-again generations 1 + 1, multi-teacher 2.
    assert_eq!(dependent, 5);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Students whose teacher did not succeed never start: Slurm cancels them
/// (`DependencyNeverSatisfied`), and their rows say they were skipped because of that teacher,
/// instead of waiting forever.
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn students_of_a_failed_teacher_are_skipped_rows() -> Result<()> {
    cluster()?;
    let dir = temp("slurm-skipped");
    let file = write(
        &dir,
        "slurm-skipped",
        r#"seeds = [0, 1]
[train]
epochs = 1
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = { train = 64, validation = 32, test = 32, size = 8 }
# A learning rate of 1e30 makes the teacher's loss infinite: it ends `diverged` (exit code 2).
[[teachers]]
model = "vision.mlp"
config = { hidden = [8] }
train = { optimizer = { name = "sgd", lr = 1e30 } }
[[students]]
model = "vision.mlp"
config = { hidden = [8] }
[[strategies]]
name = "kd"
"#,
    )?;
    let out = dir.join("out");
    let run = slurm_run(&file, &out, &[]).output()?;
    assert!(run.status.success(), "{}", text(&run));
    let runs = read(&out.join("runs.parquet"))?;
    assert_eq!(runs.height(), 2);
    for (error, state) in strings(&runs, "error")?
        .into_iter()
        .zip(strings(&runs, "slurm_state")?)
    {
        let (error, state) = (error.unwrap_or_default(), state.unwrap_or_default());
        assert!(
            error.starts_with("skipped: its teacher job") && error.contains("ended as diverged"),
            "{error}"
        );
        assert_eq!(state, "CANCELLED", "{error}");
    }
    assert!(queued("slurm-skipped")?.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Spawns `command` with its output captured, then waits until the ledger of `out` lists
/// `jobs` Slurm tasks and `ready` holds for one of them; returns the process and that task.
fn spawn_until(
    mut command: Command,
    out: &Path,
    jobs: usize,
    ready: &dyn Fn(&str) -> Result<bool>,
) -> Result<(Child, String)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            panic!("the Slurm tasks never became ready: {}", text(&out));
        }
        if let Ok(ledger) = ledger(out)
            && ledger.len() == jobs
        {
            for task in ledger.values() {
                if ready(task)? {
                    return Ok((child, task.clone()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A job requeued while it runs (as after a preemption) runs again from its start and
/// finishes; the waiting xtask waits for it, and its record is whole.
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn a_job_requeued_while_running_runs_again_and_finishes() -> Result<()> {
    cluster()?;
    let dir = temp("slurm-requeue");
    let file = write(
        &dir,
        "slurm-requeue",
        r#"seeds = [0]
[train]
epochs = 1
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = { train = 64, validation = 32, test = 32, size = 8 }
[[students]]
model = "vision.mlp"
config = { hidden = [8] }
[[strategies]]
name = "test.wait"
"#,
    )?;
    let hold = dir.join("hold");
    std::fs::write(&hold, "")?;
    let faulty = PathBuf::from(env!("CARGO_BIN_EXE_xtask"))
        .with_file_name("deps")
        .join("libdistill_test_faulty.so");
    let out = dir.join("out");
    let mut command = slurm_run(&file, &out, &[]);
    command
        .env("DISTILL_EXTRA_PLUGINS", &faulty)
        .env("TEST_WAIT_WHILE_EXISTS", &hold);
    let running = |task: &str| -> Result<bool> {
        Ok(queued("slurm-requeue")?.contains(&format!("{task} RUNNING")))
    };
    let (child, task) = spawn_until(command, &out, 1, &running)?;
    // Let the worker start its job, then requeue it: Slurm kills it and queues it again.
    std::thread::sleep(Duration::from_secs(2));
    let requeue = Command::new("scontrol").args(["requeue", &task]).status()?;
    assert!(requeue.success());
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_file(&hold)?;
    let done = child.wait_with_output()?;
    assert!(done.status.success(), "{}", text(&done));
    let runs = read(&out.join("runs.parquet"))?;
    assert_eq!(strings(&runs, "status")?, [Some("ok".to_string())]);
    assert_eq!(
        strings(&runs, "slurm_state")?,
        [Some("COMPLETED".to_string())]
    );
    let shown = Command::new("scontrol")
        .args(["--oneliner", "show", "job", &task])
        .output()?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("Restarts=1"), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Ctrl-C (SIGINT) while waiting, with no terminal to ask on: the jobs are left queued, never
/// cancelled silently, and the message says so and how to cancel them.
#[test]
#[ignore = "needs a Slurm cluster: sudo bash tests/slurm/local-cluster.sh, then cargo xtask test --test slurm -- --ignored"]
fn an_interrupt_without_a_terminal_leaves_the_jobs_queued_and_says_so() -> Result<()> {
    cluster()?;
    let dir = temp("slurm-interrupt");
    let file = write(
        &dir,
        "slurm-interrupt",
        r#"seeds = [0, 1]
[train]
epochs = 1
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = { train = 64, validation = 32, test = 32, size = 8 }
[[students]]
model = "vision.mlp"
config = { hidden = [8] }
[[strategies]]
name = "baseline"
[slurm]
options = ["--hold"]
"#,
    )?;
    let out = dir.join("out");
    let (child, _) = spawn_until(slurm_run(&file, &out, &[]), &out, 2, &|_| Ok(true))?;
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status()?;
    assert!(sent.success());
    let done = child.wait_with_output()?;
    assert!(!done.status.success());
    assert!(
        text(&done).contains("left 2 jobs queued or running"),
        "{}",
        text(&done)
    );
    assert!(
        text(&done).contains("scancel --name=distill-slurm-interrupt"),
        "{}",
        text(&done)
    );
    assert_eq!(queued("slurm-interrupt")?.len(), 2);
    let cancel = Command::new("scancel")
        .arg("--name=distill-slurm-interrupt")
        .status()?;
    assert!(cancel.success());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
