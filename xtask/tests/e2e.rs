//! End-to-end runs of `cargo xtask run`: the quick experiment from file to parquet and back,
//! resume after `kill -9`, crashing plugins, and malformed experiment files.
//!
//! They drive the built `xtask` and `distill` binaries with `--no-build`: run them with
//! `cargo test --workspace`, which builds `distill` (it has integration tests) and every plugin
//! (dev-dependencies of the tests crate) in the same invocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use polars::prelude::*;

mod common;

use common::*;

#[test]
fn quick_experiment_writes_tables_that_read_back_and_repeat() -> Result<()> {
    let quick = root().join("experiments/quick.toml");
    let (a, b) = (temp("quick-a"), temp("quick-b"));
    let first = run_experiment(&quick, &a, &[])?;
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("baseline") && text(&first).contains("kd"),
        "{}",
        text(&first)
    );

    // summary.md: a table per pair, kd paired with baseline over the three seeds.
    let summary = std::fs::read_to_string(a.join("summary.md"))?;
    assert!(
        summary.contains("| baseline | 3/3 |") && summary.contains("n 3)"),
        "{summary}"
    );

    // report.md: the tables and the plots, each plot as SVG and PNG.
    let report = std::fs::read_to_string(a.join("report.md"))?;
    assert!(report.starts_with(&summary), "{report}");
    let images: Vec<&str> = report
        .lines()
        .filter_map(|l| l.strip_prefix("![").and_then(|l| l.split("](").nth(1)))
        .filter_map(|l| l.split(')').next())
        .collect();
    assert_eq!(images.len(), 3, "curves, loss terms, Pareto: {report}");
    for svg in images {
        let png = a.join(svg).with_extension("png");
        assert!(a.join(svg).is_file() && png.is_file(), "{svg}");
    }

    // The tables as polars, pandas and DuckDB read them, and docs/results.md's analysis.
    let python = Command::new("python3")
        .arg(root().join("tests/python/check_results.py"))
        .arg(&a)
        .output()?;
    assert!(
        python.status.success(),
        "{}\n(needs `python3 -m pip install polars pandas pyarrow duckdb`, as .ci/run does)",
        text(&python)
    );

    let runs = read(&a.join("runs.parquet"))?;
    assert_eq!(runs.height(), 6, "2 strategies x 3 seeds");
    for (col, dtype) in [
        ("run_id", DataType::String),
        ("seed", DataType::UInt64),
        ("best_metric", DataType::Float64),
        ("student_parameters", DataType::UInt64),
        ("teacher_parameters", DataType::UInt64),
        ("flops_per_sample", DataType::UInt64),
        (
            "started_at",
            DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC)),
        ),
        ("latency_ms_batch1", DataType::Float64),
        ("latency_ms_batch64", DataType::Float64),
    ] {
        assert_eq!(runs.column(col)?.dtype(), &dtype, "{col}");
    }
    assert!(
        strings(&runs, "status")?
            .iter()
            .all(|s| s.as_deref() == Some("ok")),
        "{runs}"
    );
    let strategies = strings(&runs, "strategy")?;
    assert_eq!(
        strategies
            .iter()
            .filter(|s| s.as_deref() == Some("kd"))
            .count(),
        3
    );
    for col in ["best_metric", "final_metric", "teacher_metric"] {
        for v in floats(&runs, col)? {
            let v = v.ok_or(format!("{col} is null"))?;
            assert!((0.0..=1.0).contains(&v), "{col} = {v}");
        }
    }
    let teacher = floats(&runs, "teacher_metric")?[0].unwrap_or(0.0);
    assert!(
        teacher > 0.8,
        "the teacher learns the synthetic task: {teacher}"
    );
    // The dataset augments: kd's teacher runs live on the student's augmented batches.
    let kd_live = strings(&runs, "teacher_outputs")?
        .iter()
        .filter(|s| s.as_deref() == Some("live"))
        .count();
    assert_eq!(kd_live, 3, "kd students learn from a live teacher");
    // The README's first command shows distillation helping: kd above baseline for every seed.
    let by_seed = |strategy: &str| -> Result<BTreeMap<u64, f64>> {
        let seeds = runs.column("seed")?.u64()?.clone();
        let names = strings(&runs, "strategy")?;
        let best = floats(&runs, "best_metric")?;
        Ok((0..runs.height())
            .filter(|&i| names[i].as_deref() == Some(strategy))
            .filter_map(|i| Some((seeds.get(i)?, best[i]?)))
            .collect())
    };
    let (kd, baseline) = (by_seed("kd")?, by_seed("baseline")?);
    assert_eq!(kd.len(), 3);
    for (seed, b) in &baseline {
        assert!(
            kd[seed] > *b,
            "seed {seed}: kd {} <= baseline {b}",
            kd[seed]
        );
    }

    let metrics = read(&a.join("metrics.parquet"))?;
    assert!(metrics.height() > 4 * 4 * 3, "per-epoch rows for every run");
    assert!(
        floats(&metrics, "value")?
            .iter()
            .all(|v| v.is_some_and(f64::is_finite))
    );

    // The same experiment again: the same jobs, identical metrics.
    let second = run_experiment(&quick, &b, &[])?;
    assert!(second.status.success(), "{}", text(&second));
    let (ma, mb) = (
        metrics_by_run(&metrics)?,
        metrics_by_run(&read(&b.join("metrics.parquet"))?)?,
    );
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb, "same seeds, same metrics");
    let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
    Ok(())
}

#[test]
fn tables_hold_only_the_jobs_of_the_experiment_as_it_is_now() -> Result<()> {
    let quick = root().join("experiments/quick.toml");
    let out = temp("shrunk");
    let short = ["--set", "train.epochs=10"];
    let first = run_experiment(&quick, &out, &short)?;
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(read(&out.join("runs.parquet"))?.height(), 6);
    // Two seeds fewer: their finished jobs stay on disk, but not in the tables.
    let second = run_experiment(&quick, &out, &[short[0], short[1], "--set", "seeds=[0]"])?;
    assert!(second.status.success(), "{}", text(&second));
    let runs = read(&out.join("runs.parquet"))?;
    assert_eq!(runs.height(), 2, "{runs}");
    let seeds = runs
        .column("seed")?
        .u64()?
        .into_no_null_iter()
        .collect::<Vec<_>>();
    assert_eq!(seeds, [0, 0]);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_cached_teacher_under_augmentation_is_an_explicit_mode_named_in_the_tables() -> Result<()> {
    let quick = root().join("experiments/quick.toml");
    let out = temp("cached-augmented");
    let args = [
        "--set",
        "seeds=[0]",
        "--set",
        "train.epochs=3",
        "--set",
        "train.teacher_outputs=cache",
    ];
    let run = run_experiment(&quick, &out, &args)?;
    assert!(run.status.success(), "{}", text(&run));
    let runs = read(&out.join("runs.parquet"))?;
    let modes: Vec<Option<String>> = strings(&runs, "teacher_outputs")?;
    let strategies = strings(&runs, "strategy")?;
    for (mode, strategy) in modes.iter().zip(&strategies) {
        let want = match strategy.as_deref() {
            Some("kd") => "cache (unaugmented)",
            _ => "none",
        };
        assert_eq!(mode.as_deref(), Some(want), "{runs}");
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// `experiments/cifar100.toml` (RepDistiller's protocol) for one epoch on CIFAR-shaped
/// synthetic data: every strategy at its reference weight trains on the zoo's pair.
#[test]
fn cifar100_protocol_runs_every_strategy_on_cifar_shaped_data() -> Result<()> {
    let file = root().join("experiments/cifar100.toml");
    let out = temp("cifar100");
    let dataset = r#"datasets=[{ name = "vision.synthetic", config = { channels = 3, size = 32, classes = 100, train = 32, validation = 8, test = 8, augment = { crop_padding = 4, flip = true } } }]"#;
    let args = [
        "--set",
        dataset,
        "--set",
        "seeds=[0]",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.eval_batch_size=16",
        "--jobs",
        "2",
    ];
    let run = run_experiment(&file, &out, &args)?;
    assert!(run.status.success(), "{}", text(&run));
    let runs = read(&out.join("runs.parquet"))?;
    let mut strategies: Vec<String> = strings(&runs, "strategy")?.into_iter().flatten().collect();
    strategies.sort();
    assert_eq!(
        strategies,
        [
            "at", "baseline", "crd", "dist", "dkd", "fitnets", "kd", "pkt", "rkd", "sp"
        ]
    );
    for (status, mode) in strings(&runs, "status")?
        .iter()
        .zip(strings(&runs, "teacher_outputs")?)
    {
        assert_eq!(status.as_deref(), Some("ok"), "{runs}");
        assert!(matches!(mode.as_deref(), Some("live" | "none")), "{runs}");
    }
    let params = runs.column("student_parameters")?.u64()?;
    // resnet8x4 with a 100-class head, as RepDistiller counts it.
    assert!(params.iter().all(|p| p == Some(1_233_540)), "{runs}");
    // The teacher's weights file holds every batch norm's running statistics, moved by
    // training from their start (mean 0, variance 1).
    let weights = read_safetensors(&teacher_folder(&out)?.join("weights.safetensors"))?;
    let norms = weights
        .keys()
        .filter(|k| {
            k.ends_with(".weight") && weights.contains_key(&k.replace(".weight", ".running_var"))
        })
        .count();
    let means: Vec<&Vec<f64>> = weights
        .iter()
        .filter(|(k, _)| k.ends_with("running_mean"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(means.len(), norms, "a running mean per batch norm");
    assert!(means.len() > 30 && means.iter().all(|m| m.iter().any(|v| *v != 0.0)));
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn nlp_quick_experiment_runs_a_teacher_and_two_students() -> Result<()> {
    let file = root().join("experiments/nlp-quick.toml");
    let out = temp("nlp-quick");
    let run = run_experiment(&file, &out, &[])?;
    assert!(run.status.success(), "{}", text(&run));
    let runs = read(&out.join("runs.parquet"))?;
    assert_eq!(runs.height(), 4, "2 students x 2 strategies x 1 seed");
    assert!(
        strings(&runs, "status")?
            .iter()
            .all(|s| s.as_deref() == Some("ok")),
        "{runs}"
    );
    let mut students = strings(&runs, "student")?;
    students.sort();
    students.dedup();
    assert_eq!(
        students,
        [
            Some("nlp.bilstm".to_string()),
            Some("nlp.textcnn".to_string())
        ]
    );
    for col in ["best_metric", "final_metric", "teacher_metric"] {
        for v in floats(&runs, col)? {
            let v = v.ok_or(format!("{col} is null"))?;
            assert!((0.5..=1.0).contains(&v), "{col} = {v}: better than chance");
        }
    }
    let teacher = floats(&runs, "teacher_metric")?[0].unwrap_or(0.0);
    assert!(
        teacher > 0.8,
        "the BERT teacher learns the synthetic task: {teacher}"
    );
    let metrics = read(&out.join("metrics.parquet"))?;
    assert!(
        floats(&metrics, "value")?
            .iter()
            .all(|v| v.is_some_and(f64::is_finite))
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn recsys_quick_experiment_ranks_with_a_cached_teacher() -> Result<()> {
    let file = root().join("experiments/recsys-quick.toml");
    let out = temp("recsys-quick");
    let run = run_experiment(&file, &out, &["--log-format", "json"])?;
    assert!(run.status.success(), "{}", text(&run));
    // Every job logs JSON lines to log.jsonl, and with `--log-format json` its stderr
    // (worker.log) is JSON lines too; both carry the engine's per-epoch events.
    for entry in std::fs::read_dir(out.join("jobs"))? {
        let dir = entry?.path();
        for file in ["log.jsonl", "worker.log"] {
            let log = std::fs::read_to_string(dir.join(file))?;
            let events = log
                .lines()
                .map(serde_json::from_str::<serde_json::Value>)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: not JSON lines: {e}\n{log}", dir.join(file).display()))?;
            assert!(
                events.iter().any(|e| e["level"] == "INFO"
                    && e["fields"]["message"] == "epoch done"
                    && e["fields"]["validation"].is_number()),
                "{file}: {log}"
            );
        }
    }
    let runs = read(&out.join("runs.parquet"))?;
    assert_eq!(runs.height(), 3, "1 student x 3 strategies x 1 seed");
    let mut strategies = strings(&runs, "strategy")?;
    strategies.sort();
    assert_eq!(
        strategies,
        ["baseline", "kd", "ranking-kd"].map(|s| Some(s.to_string()))
    );
    assert!(
        strings(&runs, "primary_metric")?
            .iter()
            .all(|m| m.as_deref() == Some("ndcg@10"))
    );
    // The teacher scores every item per user once; kd and ranking-kd read that cache.
    let outputs = strings(&runs, "teacher_outputs")?;
    for (strategy, used) in strings(&runs, "strategy")?.iter().zip(&outputs) {
        let want = if strategy.as_deref() == Some("baseline") {
            "none"
        } else {
            "cache"
        };
        assert_eq!(used.as_deref(), Some(want), "{strategy:?}");
    }
    // NDCG@10 of a random scorer over 1 + 99 candidates is about 0.045; popularity alone gets
    // about 0.24 on this set (the dataset's own test).
    let teacher = floats(&runs, "teacher_metric")?[0].unwrap_or(0.0);
    assert!(
        teacher > 0.25,
        "the NeuMF teacher learns the set: {teacher}"
    );
    for v in floats(&runs, "best_metric")? {
        let v = v.ok_or("best_metric is null")?;
        assert!((0.1..=1.0).contains(&v), "student ndcg@10 {v}");
    }
    let metrics = read(&out.join("metrics.parquet"))?;
    let mut names = strings(&metrics, "metric")?;
    names.sort();
    names.dedup();
    for want in ["auc", "hr@10", "ndcg@10", "rd"] {
        assert!(
            names.contains(&Some(want.to_string())),
            "{want} missing from {names:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn born_again_generations_chain_through_the_plan() -> Result<()> {
    let out = temp("born-again");
    std::fs::create_dir_all(&out)?;
    let file = out.join("born-again.toml");
    std::fs::write(
        &file,
        r#"name = "born-again"
seeds = [0]
[train]
epochs = 2
batch_size = 64
optimizer = { name = "adamw", lr = 0.003 }
[[datasets]]
name = "vision.synthetic"
config = { train = 256, validation = 64, test = 64, size = 8 }
[[students]]
model = "vision.mlp"
config = { hidden = [16] }
[[strategies]]
name = "baseline"
[[strategies]]
name = "born-again"
generations = 2
"#,
    )?;
    let run = run_experiment(&file, &out.join("report"), &[])?;
    assert!(run.status.success(), "{}", text(&run));
    let summary = text(&run);
    for generation in ["born-again generation 1", "born-again generation 2"] {
        assert!(summary.contains(generation), "{summary}");
    }
    let runs = read(&out.join("report/runs.parquet"))?;
    assert_eq!(runs.height(), 3, "baseline + 2 generations: {runs}");
    assert!(
        strings(&runs, "status")?
            .iter()
            .all(|s| s.as_deref() == Some("ok")),
        "{runs}"
    );
    let mut chain: Vec<(String, String, String)> = strings(&runs, "strategy")?
        .into_iter()
        .zip(strings(&runs, "teacher_outputs")?)
        .zip(strings(&runs, "teacher")?)
        .filter(|((s, _), _)| s.as_deref() == Some("born-again"))
        .map(|((s, o), t)| {
            (
                s.unwrap_or_default(),
                o.unwrap_or_default(),
                t.unwrap_or_default(),
            )
        })
        .collect();
    chain.sort();
    // Generation 1 reads the cache of the first teacher (the student's architecture trained
    // alone); generation 2 runs generation 1 live (a student leaves weights, not a cache).
    assert_eq!(
        chain,
        [
            ("born-again".into(), "cache".into(), "vision.mlp".into()),
            ("born-again".into(), "live".into(), "vision.mlp".into())
        ]
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// A safetensors file of f64 (and, for `targets`, i64) tensors.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f64>)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        let dtype = if *name == "targets" { "I64" } else { "F64" };
        for v in values {
            if *name == "targets" {
                data.extend((*v as i64).to_le_bytes());
            } else {
                data.extend(v.to_le_bytes());
            }
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::to_vec(&header)?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend(head);
    bytes.extend(data);
    std::fs::write(path, bytes)?;
    Ok(())
}

/// The f64 tensors of a safetensors file, flattened, by name.
fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Vec<f64>>> {
    let bytes = std::fs::read(path)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (name, info) in header.as_object().ok_or("header is not a table")? {
        if name == "__metadata__" {
            continue;
        }
        let (a, b) = (
            info["data_offsets"][0].as_u64().unwrap_or(0) as usize,
            info["data_offsets"][1].as_u64().unwrap_or(0) as usize,
        );
        let values = match info["dtype"].as_str() {
            Some("F64") => data[a..b]
                .chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Some("F32") => data[a..b]
                .chunks(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
                .collect(),
            other => return Err(format!("{name}: dtype {other:?}").into()),
        };
        out.insert(name.clone(), values);
    }
    Ok(out)
}

#[test]
fn loss_command_prints_terms_and_writes_gradients() -> Result<()> {
    let dir = temp("loss");
    std::fs::create_dir_all(&dir)?;
    let (s, t) = (
        [1.0, 2.0, 0.5, 0.0, 0.0, 0.0],
        [2.0, 1.0, 0.0, 1.0, 1.0, 1.0],
    );
    let y = [1usize, 2];
    let inputs = dir.join("inputs.safetensors");
    write_safetensors(
        &inputs,
        &[
            ("s_logits", vec![2, 3], s.to_vec()),
            ("t_logits", vec![2, 3], t.to_vec()),
            ("targets", vec![2], y.iter().map(|&v| v as f64).collect()),
        ],
    )?;
    let grad = dir.join("grad.safetensors");
    let out = xtask()
        .args(["loss", "--no-build", "kd", "--inputs"])
        .arg(&inputs)
        .args([
            "--set",
            "alpha=0.5",
            "--set",
            "temperature=2",
            "--f64",
            "--grad",
        ])
        .arg(&grad)
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout)?;

    // Hinton KD by hand: 0.5 * CE + 0.5 * 4 * KL(softmax(t/2) || softmax(s/2)), batch means.
    let softmax = |row: &[f64], temp: f64| -> Vec<f64> {
        let z: f64 = row.iter().map(|v| (v / temp).exp()).sum();
        row.iter().map(|v| (v / temp).exp() / z).collect()
    };
    let (mut ce, mut kl) = (0.0, 0.0);
    let mut want_grad = Vec::new();
    for i in 0..2 {
        let (si, ti) = (&s[3 * i..3 * i + 3], &t[3 * i..3 * i + 3]);
        let p = softmax(si, 1.0);
        let (ps, pt) = (softmax(si, 2.0), softmax(ti, 2.0));
        ce -= p[y[i]].ln() / 2.0;
        kl += (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>() / 2.0;
        for c in 0..3 {
            let onehot = if c == y[i] { 1.0 } else { 0.0 };
            // d/ds: 0.5 * (p - onehot) / b + 0.5 * T * (ps - pt) / b.
            want_grad.push(0.5 * (p[c] - onehot) / 2.0 + 0.5 * 2.0 * (ps[c] - pt[c]) / 2.0);
        }
    }
    let want = [
        ("ce", 0.5 * ce),
        ("kd", 0.5 * 4.0 * kl),
        ("total", 0.5 * ce + 2.0 * kl),
    ];
    for (name, value) in want {
        let got = printed["terms"][name]
            .as_f64()
            .ok_or(format!("no term {name}"))?;
        assert!((got - value).abs() < 1e-12, "{name}: {got} vs {value}");
    }
    let grads = read_safetensors(&grad)?;
    assert_eq!(grads.keys().collect::<Vec<_>>(), ["s_logits"]);
    for (g, w) in grads["s_logits"].iter().zip(&want_grad) {
        assert!((g - w).abs() < 1e-12, "gradient {g} vs {w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn records(out: &Path) -> BTreeMap<String, SystemTime> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("jobs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let record = entry.path().join("record.json");
        if let Ok(meta) = std::fs::metadata(&record) {
            found.insert(
                entry.file_name().to_string_lossy().into_owned(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            );
        }
    }
    found
}

/// Pids of `distill run-job` workers writing under `out`.
fn workers(out: &Path) -> Vec<String> {
    let needle = out.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("run-job") && cmd.contains(&needle))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

#[test]
fn a_killed_run_resumes_without_rerunning_finished_jobs() -> Result<()> {
    let quick = root().join("experiments/quick.toml");
    let (whole, resumed) = (temp("resume-whole"), temp("resume-killed"));
    let args = ["--jobs", "1", "--set", "train.epochs=12"];
    let uninterrupted = run_experiment(&quick, &whole, &args)?;
    assert!(uninterrupted.status.success(), "{}", text(&uninterrupted));

    let mut orchestrator = xtask()
        .args(["run", "--no-build", "--out"])
        .arg(&resumed)
        .arg(&quick)
        .args(args)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(240);
    while records(&resumed).len() < 3 {
        assert!(Instant::now() < deadline, "no progress");
        assert!(
            orchestrator.try_wait()?.is_none(),
            "the run finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    orchestrator.kill()?; // SIGKILL
    orchestrator.wait()?;
    // Kill its workers, also one forked just before the kill that execs only now: watch for a
    // second after the last one found.
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) {
        for pid in workers(&resumed) {
            Command::new("kill").args(["-9", &pid]).status()?;
            quiet_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = records(&resumed);
    assert!(
        before.len() < 7,
        "killed mid-grid ({} of 7 jobs done)",
        before.len()
    );

    let again = run_experiment(&quick, &resumed, &args)?;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains(&format!("skipping {} finished jobs", before.len())),
        "{}",
        text(&again)
    );
    let after = records(&resumed);
    assert_eq!(after.len(), 7);
    for (id, modified) in &before {
        assert_eq!(
            after.get(id),
            Some(modified),
            "finished job {id} was run again"
        );
    }
    let (a, b) = (
        read(&whole.join("metrics.parquet"))?,
        read(&resumed.join("metrics.parquet"))?,
    );
    assert_eq!(
        metrics_by_run(&a)?,
        metrics_by_run(&b)?,
        "the resumed grid gives the same tables"
    );
    let _ = (
        std::fs::remove_dir_all(&whole),
        std::fs::remove_dir_all(&resumed),
    );
    Ok(())
}

const SMALL: &str = r#"
seeds = [0]
[train]
epochs = 1
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = { train = 64, validation = 32, test = 32, size = 8 }
[[students]]
model = "vision.mlp"
config = { hidden = [8] }
"#;

/// The `DISTILL_*` variables the README has users set for the workers and the plugins are not
/// experiment keys (`DISTILL_TRAIN__EPOCHS` is): an experiment runs with them set.
#[test]
fn runtime_variables_are_not_read_as_experiment_keys() -> Result<()> {
    let dir = temp("runtime-env");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("small.toml");
    std::fs::write(
        &file,
        format!("{SMALL}[[strategies]]\nname = \"baseline\"\n"),
    )?;
    let out = xtask()
        .args(["run", "--no-build", "--out"])
        .arg(dir.join("out"))
        .arg(&file)
        // Empty: no CBLAS library for the workers, as when unset.
        .env("DISTILL_CBLAS", "")
        .env("DISTILL_DATA", dir.join("data-cache"))
        .env("DISTILL_DATA_MIRROR", dir.join("no-mirror"))
        .env("DISTILL_LOG", "warn")
        .env("DISTILL_VENV", dir.join("venv"))
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.join("out/runs.parquet").is_file());
    Ok(())
}

#[test]
fn crashing_and_panicking_strategies_fail_only_their_jobs() -> Result<()> {
    let dir = temp("faults");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("faults.toml");
    let strategies = "[[strategies]]\nname = \"baseline\"\n[[strategies]]\nname = \"test.panic\"\n[[strategies]]\nname = \"test.abort\"\n[[strategies]]\nname = \"test.nan\"\n";
    std::fs::write(&file, format!("{SMALL}{strategies}"))?;
    let faulty = PathBuf::from(env!("CARGO_BIN_EXE_xtask"))
        .with_file_name("deps")
        .join("libdistill_test_faulty.so");
    let out = xtask()
        .env("DISTILL_EXTRA_PLUGINS", &faulty)
        .args(["run", "--no-build", "--jobs", "2", "--out"])
        .arg(dir.join("out"))
        .arg(&file)
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let runs = read(&dir.join("out/runs.parquet"))?;
    assert_eq!(runs.height(), 4);
    let (strategy, status, error) = (
        strings(&runs, "strategy")?,
        strings(&runs, "status")?,
        strings(&runs, "error")?,
    );
    for i in 0..4 {
        let (s, st, e) = (
            strategy[i].as_deref().unwrap_or(""),
            status[i].as_deref().unwrap_or(""),
            error[i].as_deref().unwrap_or(""),
        );
        match s {
            "baseline" => assert_eq!((st, e), ("ok", "")),
            "test.panic" => assert!(
                st == "failed" && e.contains("deliberate panic in loss"),
                "{st}: {e}"
            ),
            "test.abort" => assert!(st == "failed" && e.contains("SIGABRT"), "{st}: {e}"),
            "test.nan" => assert!(
                st == "diverged" && e.contains("optimizer step 1"),
                "{st}: {e}"
            ),
            other => panic!("unexpected strategy {other}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn malformed_experiments_fail_before_training_naming_file_and_key() -> Result<()> {
    let dir = temp("malformed");
    std::fs::create_dir_all(&dir)?;
    let baseline = "[[strategies]]\nname = \"baseline\"\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown-key", format!("{SMALL}{baseline}colour = \"red\"\n"), "colour"),
        ("wrong-type", format!("{}{baseline}", SMALL.replace("seeds = [0]", "seeds = \"zero\"")), "seeds"),
        ("unknown-strategy", format!("{SMALL}[[strategies]]\nname = \"kdd\"\n"), "did you mean `kd`"),
        ("unknown-model", format!("{}{baseline}", SMALL.replace("vision.mlp", "vision.mpl")), "students[0]"),
        ("unknown-dataset", format!("{}{baseline}", SMALL.replace("vision.synthetic", "vision.synthetik")), "datasets[0]"),
        (
            "missing-dataset-path",
            format!("{}{baseline}", SMALL.replace("name = \"vision.synthetic\"\nconfig = { train = 64, validation = 32, test = 32, size = 8 }", "name = \"vision.idx\"\nconfig = { path = \"/nonexistent/fashion-mnist\" }")),
            "datasets[0].config.path",
        ),
        ("empty-grid", format!("{SMALL}strategies = []\n"), "strategies"),
        ("negative-epochs", format!("{}{baseline}", SMALL.replace("epochs = 1", "epochs = -1")), "train.epochs"),
        ("zero-batch", format!("{}{baseline}", SMALL.replace("batch_size = 32", "batch_size = 0")), "batch_size"),
        ("unknown-train-key", format!("{}{baseline}", SMALL.replace("epochs = 1", "epochs = 1\nepoch = 2")), "epoch"),
        ("strategy-config-typo", format!("{SMALL}[[strategies]]\nname = \"kd\"\nconfig = {{ temprature = 2.0 }}\n[[teachers]]\nmodel = \"vision.mlp\"\n"), "strategies[0].config.temprature"),
        ("bad-optimizer", format!("{}{baseline}", SMALL.replace("epochs = 1", "epochs = 1\noptimizer = { name = \"adam\", lr = 0.1 }")), "optimizer"),
        ("empty-sweep", format!("{SMALL}[[strategies]]\nname = \"kd\"\ngrid = {{ alpha = [] }}\n"), "grid.alpha"),
        ("kd-without-teacher", format!("{SMALL}[[strategies]]\nname = \"kd\"\n"), "needs a teacher"),
        (
            "teacher-dataset-override",
            format!("{SMALL}[[strategies]]\nname = \"kd\"\n[[teachers]]\nmodel = \"vision.mlp\"\ndataset = {{ augment = {{ crop_padding = -1 }} }}\n"),
            "teachers[0].dataset.augment",
        ),
        (
            "teacher-dataset-split",
            format!("{SMALL}[[strategies]]\nname = \"kd\"\n[[teachers]]\nmodel = \"vision.mlp\"\ndataset = {{ test = 64 }}\n"),
            "teachers[0].dataset",
        ),
        ("not-toml", "seeds = [0\n".to_string(), "seeds"),
    ];
    for (name, content, key) in &cases {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, content)?;
        let out_dir = dir.join(format!("{name}-out"));
        let out = run_experiment(&file, &out_dir, &[])?;
        let said = text(&out);
        assert!(!out.status.success(), "{name}: accepted\n{said}");
        assert!(
            said.contains(&format!("{name}.toml")),
            "{name}: the message does not name the file\n{said}"
        );
        assert!(
            said.contains(key),
            "{name}: the message does not name `{key}`\n{said}"
        );
        assert!(
            records(&out_dir).is_empty(),
            "{name}: something was trained"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// An experiment that names its data (`data = "mnist-t10k"`) gets it through the data cache:
/// `--dry-run` fetches and verifies it during `distill check` and trains nothing; the run then
/// trains on it; a misspelt name fails the check naming the key and the known names. The cache
/// is empty at first; the files come from `DISTILL_DATA_MIRROR` (CI) or the official addresses.
#[test]
fn named_data_is_fetched_by_the_check_and_a_dry_run_trains_nothing() -> Result<()> {
    let dir = temp("named-data");
    std::fs::create_dir_all(&dir)?;
    let cache = dir.join("data-cache");
    let experiment = |data: &str| {
        SMALL.replace(
            "name = \"vision.synthetic\"\nconfig = { train = 64, validation = 32, test = 32, size = 8 }",
            &format!(
                "name = \"vision.idx\"\nconfig = {{ data = \"{data}\", train = \"t10k\", test = \"\", test_fraction = 0.2, max_train = 256 }}"
            ),
        ) + "[[strategies]]\nname = \"baseline\"\n"
    };
    let file = dir.join("named.toml");
    std::fs::write(&file, experiment("mnist-t10k"))?;
    let run = |extra: &[&str]| {
        xtask()
            .args(["run", "--no-build", "--out"])
            .arg(dir.join("out"))
            .arg(&file)
            .args(extra)
            .env("DISTILL_DATA", &cache)
            .output()
    };
    let out = run(&["--dry-run"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing was trained"), "{}", text(&out));
    assert!(records(&dir.join("out")).is_empty(), "a dry run trained");
    for f in [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        ".verified",
    ] {
        assert!(
            cache.join("mnist-t10k").join(f).is_file(),
            "{f} is not in the cache"
        );
    }
    let out = run(&[])?;
    assert!(out.status.success(), "{}", text(&out));
    let runs = read(&dir.join("out/runs.parquet"))?;
    assert_eq!(strings(&runs, "status")?, [Some("ok".to_string())]);

    std::fs::write(&file, experiment("mnist-t1ok"))?;
    let out = run(&["--dry-run"])?;
    let said = text(&out);
    assert!(
        !out.status.success(),
        "a misspelt data name was accepted\n{said}"
    );
    for needle in [
        "named.toml",
        "datasets[0].config.data",
        "mnist-t1ok",
        "mnist-t10k",
    ] {
        assert!(said.contains(needle), "`{needle}` missing from:\n{said}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A tiny grid: one teacher, `baseline` and `kd` students over `seeds` seeds; `epochs` epochs.
fn fault_grid(dir: &Path, seeds: usize, epochs: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("grid.toml");
    let seeds: Vec<String> = (0..seeds).map(|s| s.to_string()).collect();
    std::fs::write(
        &file,
        format!(
            r#"name = "faults"
seeds = [{}]
[train]
epochs = {epochs}
batch_size = 32
[[datasets]]
name = "vision.synthetic"
config = {{ train = 512, validation = 32, test = 64, size = 8 }}
[[teachers]]
model = "vision.mlp"
config = {{ hidden = [16] }}
[[students]]
model = "vision.mlp"
config = {{ hidden = [8] }}
[[strategies]]
name = "baseline"
[[strategies]]
name = "kd"
"#,
            seeds.join(", ")
        ),
    )?;
    Ok(file)
}

/// A small deterministic generator for the moments of the faults (seeded: a failure repeats).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Every job folder's record that says `ok`, with its bytes.
fn ok_records(out: &Path) -> BTreeMap<String, Vec<u8>> {
    records(out)
        .into_keys()
        .filter_map(|id| {
            let bytes = std::fs::read(out.join("jobs").join(&id).join("record.json")).ok()?;
            let ok = String::from_utf8_lossy(&bytes).contains("\"status\": \"ok\"");
            ok.then_some((id, bytes))
        })
        .collect()
}

#[test]
fn workers_killed_at_20_random_moments_lose_nothing() -> Result<()> {
    let dir = temp("kill-matrix");
    let file = fault_grid(&dir, 4, 1)?;
    let whole = run_experiment(&file, &dir.join("whole"), &["--jobs", "2"])?;
    assert!(whole.status.success(), "{}", text(&whole));
    let reference = metrics_by_run(&read(&dir.join("whole/metrics.parquet"))?)?;

    let mut moments = Lcg(17);
    let (mut kills, mut round) = (0, 0);
    while kills < 20 {
        round += 1;
        let out = dir.join(format!("round-{round}"));
        // Run, killing a worker at random moments, until a run ends with nothing killed.
        loop {
            let mut seen = ok_records(&out);
            let mut orchestrator = xtask()
                .args(["run", "--no-build", "--jobs", "2", "--out"])
                .arg(&out)
                .arg(&file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let mut killed_now = 0;
            while orchestrator.try_wait()?.is_none() {
                std::thread::sleep(Duration::from_millis(30 + moments.below(900)));
                let running = workers(&out);
                if kills < 20 && !running.is_empty() {
                    let pid = &running[moments.below(running.len() as u64) as usize];
                    if Command::new("kill").args(["-9", pid]).status()?.success() {
                        kills += 1;
                        killed_now += 1;
                    }
                }
                // A finished record is never rewritten or lost.
                let now = ok_records(&out);
                for (id, bytes) in &seen {
                    assert_eq!(now.get(id), Some(bytes), "record of {id} changed");
                }
                seen = now;
            }
            if killed_now == 0 {
                break;
            }
        }
        let again = run_experiment(&file, &out, &["--jobs", "2"])?;
        assert!(again.status.success(), "{}", text(&again));
        assert!(
            !text(&again).contains("corrupted") && text(&again).contains("skipping 9 finished"),
            "{}",
            text(&again)
        );
        assert_eq!(
            metrics_by_run(&read(&out.join("metrics.parquet"))?)?,
            reference,
            "round {round}: the tables equal an uninterrupted run's"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Sends `signal` to the orchestrator once a worker runs; it must stop every worker within
/// seconds and leave only whole records.
fn interrupt(file: &Path, out: &Path, signal: &str) -> Result<()> {
    let orchestrator = xtask()
        .args(["run", "--no-build", "--jobs", "2", "--out"])
        .arg(out)
        .arg(file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while workers(out).is_empty() {
        assert!(Instant::now() < deadline, "no worker started");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args([signal, &orchestrator.id().to_string()])
        .status()?;
    let sent = Instant::now();
    let ended = orchestrator.wait_with_output()?;
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{signal}: took {:?}",
        sent.elapsed()
    );
    assert!(!ended.status.success(), "{signal}: {}", text(&ended));
    assert!(text(&ended).contains("interrupted"), "{}", text(&ended));
    assert!(
        workers(out).is_empty(),
        "{signal}: workers outlived the run"
    );
    Ok(())
}

#[test]
fn sigint_and_sigterm_stop_the_workers_and_mark_nothing_half_done() -> Result<()> {
    let dir = temp("signals");
    let file = fault_grid(&dir, 3, 60)?;
    for signal in ["-TERM", "-INT"] {
        let out = dir.join(signal);
        interrupt(&file, &out, signal)?;
        let kept = ok_records(&out);
        let again = run_experiment(&file, &out, &["--jobs", "2"])?;
        assert!(again.status.success(), "{}", text(&again));
        assert!(
            !text(&again).contains("corrupted")
                && text(&again).contains(&format!("ran {} jobs", 7 - kept.len())),
            "{}",
            text(&again)
        );
        for (id, bytes) in &kept {
            assert_eq!(
                ok_records(&out).get(id),
                Some(bytes),
                "record of {id} changed"
            );
        }
        let runs = read(&out.join("runs.parquet"))?;
        assert_eq!(runs.height(), 6);
        assert!(
            strings(&runs, "status")?
                .iter()
                .all(|s| s.as_deref() == Some("ok")),
            "{runs}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The folder of the (single) teacher job of a finished grid.
fn teacher_folder(out: &Path) -> Result<PathBuf> {
    for entry in std::fs::read_dir(out.join("jobs"))? {
        let dir = entry?.path();
        let job = std::fs::read_to_string(dir.join("job.json")).unwrap_or_default();
        if job.contains("\"kind\": \"teacher\"") {
            return Ok(dir);
        }
    }
    Err("no teacher job".into())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn corrupted_caches_and_records_are_detected_and_computed_again() -> Result<()> {
    let dir = temp("corrupt");
    let file = fault_grid(&dir, 1, 1)?;
    let out = dir.join("out");
    let first = run_experiment(&file, &out, &[])?;
    assert!(first.status.success(), "{}", text(&first));
    let reference = metrics_by_run(&read(&out.join("metrics.parquet"))?)?;
    let teacher = teacher_folder(&out)?;

    // A truncated cache: the teacher runs again, its students do not.
    let cache = teacher.join("cache.safetensors");
    let bytes = std::fs::read(&cache)?;
    std::fs::write(&cache, &bytes[..bytes.len() / 2])?;
    let again = run_experiment(&file, &out, &[])?;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("truncated or corrupted; running it again")
            && text(&again).contains("skipping 2 finished jobs"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::read(&cache)?,
        bytes,
        "the cache is computed again, identically"
    );

    // A flipped byte in the weights, and a record that does not parse.
    let weights = teacher.join("weights.safetensors");
    let mut w = std::fs::read(&weights)?;
    let last = w.len() - 1;
    w[last] ^= 0x40;
    std::fs::write(&weights, &w)?;
    let again = run_experiment(&file, &out, &[])?;
    assert!(
        text(&again).contains("weights.safetensors") && text(&again).contains("corrupted"),
        "{}",
        text(&again)
    );
    std::fs::write(teacher.join("record.json"), "{\"status\": \"ok\", trunc")?;
    let again = run_experiment(&file, &out, &[])?;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("not a job record"),
        "{}",
        text(&again)
    );
    assert_eq!(
        metrics_by_run(&read(&out.join("metrics.parquet"))?)?,
        reference
    );

    // Teacher outputs that are NaN (a teacher whose record vouches for them): the student that
    // reads them diverges, and its row names the step.
    let mut c = std::fs::read(&cache)?;
    let header_len = u64::from_le_bytes(c[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&c[8..8 + header_len])?;
    let span = &header["logits"]["data_offsets"];
    let (start, end) = (
        8 + header_len + span[0].as_u64().unwrap_or(0) as usize,
        8 + header_len + span[1].as_u64().unwrap_or(0) as usize,
    );
    assert_eq!(header["logits"]["dtype"], "F32");
    for chunk in c[start..end].chunks_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&cache, &c)?;
    let record_path = teacher.join("record.json");
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&record_path)?)?;
    record["files"]["cache.safetensors"]["sha256"] = sha256_hex(&c).into();
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record)?)?;
    let nan = run_experiment(&file, &out, &["--set", "seeds=[5]"])?;
    assert!(nan.status.success(), "{}", text(&nan));
    let runs = read(&out.join("runs.parquet"))?;
    let rows: Vec<(Option<String>, Option<String>, Option<String>)> = strings(&runs, "strategy")?
        .into_iter()
        .zip(strings(&runs, "status")?)
        .zip(strings(&runs, "error")?)
        .map(|((a, b), c)| (a, b, c))
        .collect();
    assert!(
        rows.iter().any(|(s, st, e)| s.as_deref() == Some("kd")
            && st.as_deref() == Some("diverged")
            && e.as_deref().is_some_and(|e| e.contains("optimizer step 0"))),
        "{rows:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_full_disk_fails_the_job_with_a_message_and_keeps_earlier_results() -> Result<()> {
    let dir = temp("full-disk");
    let file = fault_grid(&dir, 1, 1)?;
    let out = dir.join("out");
    let first = run_experiment(&file, &out, &[])?;
    assert!(first.status.success(), "{}", text(&first));
    let teacher = teacher_folder(&out)?;
    let kept = ok_records(&out);
    let distill = PathBuf::from(env!("CARGO_BIN_EXE_xtask")).with_file_name("distill");
    // The teacher job again, into a fresh folder, with files limited to `kib` KiB each (writes
    // past the limit fail with EFBIG, as on a full disk).
    let limited = |kib: u32, name: &str| -> Result<(Output, PathBuf)> {
        let job_dir = dir.join(name);
        std::fs::create_dir_all(&job_dir)?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(teacher.join("job.json"))?)?;
        spec["out_dir"] = job_dir.display().to_string().into();
        let job = job_dir.join("job.json");
        std::fs::write(&job, serde_json::to_vec_pretty(&spec)?)?;
        let line = format!(
            "trap '' XFSZ; ulimit -f {kib}; exec '{}' run-job '{}'",
            distill.display(),
            job.display()
        );
        Ok((Command::new("bash").args(["-c", &line]).output()?, job_dir))
    };
    // Room for the weights and the record, not for the teacher cache.
    let (done, job_dir) = limited(24, "cache-full")?;
    // The worker wrote its failed record: exit code 1.
    assert_eq!(done.status.code(), Some(1), "{}", text(&done));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("record.json"))?)?;
    let error = record["error"].as_str().unwrap_or_default();
    assert_eq!(record["status"], "failed");
    assert!(
        error.contains("cache.safetensors") && error.contains("too large"),
        "{error}"
    );
    // No room for anything: the record cannot be written; the worker says so and fails.
    let (done, job_dir) = limited(1, "all-full")?;
    assert!(!done.status.success());
    assert!(
        text(&done).contains("record.json") && text(&done).contains("too large"),
        "{}",
        text(&done)
    );
    assert!(!job_dir.join("record.json").exists());
    assert_eq!(ok_records(&out), kept, "earlier results are untouched");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
