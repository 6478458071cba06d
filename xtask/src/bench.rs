//! `cargo xtask bench`: times the training steps of `distill_tests::steps` (the `bench-step`
//! binary, one process per measurement, so that each has its own peak memory) and, with
//! `--compare`, the PyTorch reference `benches/reference/steps.py` on the same steps, shapes and
//! threads, alternating ours and the reference (A B A B ...) round by round; prints the medians,
//! their ratio, peak resident memory, and the GFLOP/s of the matrix products (counted by our
//! kernels; the same arithmetic on both sides) against this machine's measured FP32 peak
//! (`benches/peak_flops.rs`). `--check` trains the steps whose models mirror each other weight
//! for weight from the reference's exported weights and batch, and compares the losses of 10
//! optimizer steps. The MiniLM steps run on a real SST-2 batch that `bench-step` writes for the
//! reference. The timed commands run without `OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE` (they
//! override OpenBLAS's own choice of kernels for the CPU); the table's header says when they were
//! set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// What one measurement reported.
#[derive(Clone, Debug)]
struct Sample {
    steps_per_s: f64,
    peak_rss_mib: f64,
    /// Floating-point operations of the matrix products per step (ours only).
    flops: f64,
    /// Where our matrix products ran (ours only).
    products: Option<String>,
}

/// Variables that override OpenBLAS's choice of kernels; the timed commands run without them.
const OPENBLAS_OVERRIDES: [&str; 2] = ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"];

/// `bench-step` or the reference, as the bench runs it: `threads` threads, without
/// [`OPENBLAS_OVERRIDES`].
fn timed_command(program: &Path, threads: &str) -> Command {
    let mut command = Command::new(program);
    crate::runner::worker_env(&mut command, threads);
    for name in OPENBLAS_OVERRIDES {
        command.env_remove(name);
    }
    command
}

/// The extra arguments the reference needs for `step`: for the MiniLM steps, the real batch
/// `bench-step` writes into `dir` and the pretrained weights' file.
fn reference_inputs(ours: &Path, step: &str, dir: &Path) -> Result<Vec<String>> {
    if !step.starts_with("minilm-") {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let batch = dir.join(format!("{step}-batch.safetensors"));
    let out = Command::new(ours)
        .arg(step)
        .arg("--write-batch")
        .arg(&batch)
        .output()
        .with_context(|| format!("running {}", ours.display()))?;
    let v = last_json(&out, &format!("bench-step {step} --write-batch"))?;
    let weights = v["weights"].as_str().context("no weights file")?;
    Ok(vec![
        "--batch".into(),
        batch.display().to_string(),
        "--weights".into(),
        weights.into(),
    ])
}

/// A scratch folder for the reference's inputs, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        Self(std::env::temp_dir().join(format!("distill-bench-{what}-{}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This machine's FP32 peak in GFLOP/s on `threads` threads (`peak-flops`), and how it was
/// reached (`avx512` FMAs).
fn peak(ours: &Path, threads: &str) -> Result<(f64, String)> {
    let program = ours.with_file_name("peak-flops");
    let out = Command::new(&program)
        .args(["--threads", threads, "--seconds", "2"])
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    let v = last_json(&out, "peak-flops")?;
    Ok((
        v["gflops"].as_f64().context("no gflops")?,
        v["isa"].as_str().unwrap_or("?").to_string(),
    ))
}

/// How to bench.
pub struct BenchOptions<'a> {
    /// The `bench-step` binary.
    pub ours: &'a Path,
    /// The steps (all when empty).
    pub steps: Vec<String>,
    /// Rounds per step (each runs ours, then the reference).
    pub rounds: usize,
    /// Seconds each measurement trains for (after three untimed steps).
    pub seconds: f64,
    /// Threads of every pool, ours and the reference's alike.
    pub threads: usize,
    /// Also run the PyTorch reference.
    pub compare: bool,
}

/// The JSON object a successful `bench-step` or `steps.py` run printed last.
fn last_json(out: &std::process::Output, what: &str) -> Result<Value> {
    if !out.status.success() {
        bail!(
            "{what} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}, not JSON"))
}

fn parse(out: &std::process::Output, what: &str) -> Result<Sample> {
    let v = last_json(out, what)?;
    Ok(Sample {
        steps_per_s: v["steps_per_s"].as_f64().context("no steps_per_s")?,
        peak_rss_mib: v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        flops: v["matmul_flops_per_step"].as_f64().unwrap_or(f64::NAN),
        products: v["products"].as_str().map(str::to_string),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Whether `python3` can import torch; the reason when not.
fn torch_available() -> std::result::Result<String, String> {
    match Command::new("python3")
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .unwrap_or("import failed")
            .to_string()),
        Err(e) => Err(format!("python3: {e}")),
    }
}

/// The steps `--check` compares: their reference models export weights under our names.
pub const CHECKED: [&str; 7] = [
    "mlp-kd",
    "mlp-kd-cached",
    "cnn-kd",
    "transformer-kd-cached",
    "resnet20-alone",
    "minilm-forward",
    "minilm-finetune",
];

/// The largest relative difference of the losses `ours` and `theirs` allow.
pub const CHECK_TOLERANCE: f64 = 1e-4;

fn losses(out: &std::process::Output, what: &str) -> Result<Vec<f64>> {
    last_json(out, what)?["losses"]
        .as_array()
        .context("no losses")?
        .iter()
        .map(|l| l.as_f64().context("a loss is not a number"))
        .collect()
}

/// Trains each of [`CHECKED`] for 10 steps from the reference's exported weights and batch on
/// both sides and compares the losses; an error when one differs by more than
/// [`CHECK_TOLERANCE`] relative.
pub fn check(root: &Path, ours: &Path, threads: usize) -> Result<()> {
    if let Err(why) = torch_available() {
        bail!("--check needs PyTorch for python3 ({why})");
    }
    let dir = Scratch::new("check");
    let mut worst = 0.0f64;
    for step in CHECKED {
        let folder = dir.0.join(step);
        let theirs = Command::new("python3")
            .arg(root.join("benches/reference/steps.py"))
            .args([step, "--threads", &threads.to_string(), "--export"])
            .arg(&folder)
            .args(reference_inputs(ours, step, &dir.0)?)
            .output()
            .context("running the PyTorch reference")?;
        let theirs = losses(&theirs, &format!("steps.py {step} --export"))?;
        let mine = timed_command(ours, &threads.to_string())
            .args([step, "--check"])
            .arg(&folder)
            .output()
            .with_context(|| format!("running {}", ours.display()))?;
        let mine = losses(&mine, &format!("bench-step {step} --check"))?;
        let diff = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
            .fold(0.0, f64::max);
        println!(
            "{step:<24} 10 steps from the same weights: largest relative loss difference {diff:.2e} (first {:.6} vs {:.6}, last {:.6} vs {:.6})",
            mine[0],
            theirs[0],
            mine[mine.len() - 1],
            theirs[theirs.len() - 1]
        );
        worst = worst.max(diff);
        if mine.len() != theirs.len() {
            bail!("{step}: {} losses against {}", mine.len(), theirs.len());
        }
    }
    if worst > CHECK_TOLERANCE {
        bail!(
            "losses differ from PyTorch's by up to {worst:.2e} relative (allowed {CHECK_TOLERANCE:.0e})"
        );
    }
    Ok(())
}

/// Runs the bench; prints one row per step.
pub fn run(root: &Path, opts: &BenchOptions<'_>) -> Result<()> {
    let listed = Command::new(opts.ours)
        .arg("--list")
        .output()
        .with_context(|| format!("running {}", opts.ours.display()))?;
    if !listed.status.success() {
        bail!(
            "`{} --list` failed ({}): {}",
            opts.ours.display(),
            listed.status,
            String::from_utf8_lossy(&listed.stderr).trim()
        );
    }
    let all: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect();
    let steps = if opts.steps.is_empty() {
        all.clone()
    } else {
        for s in &opts.steps {
            if !all.contains(s) {
                bail!("no step `{s}`; the steps: {}", all.join(", "));
            }
        }
        opts.steps.clone()
    };
    let reference = root.join("benches/reference/steps.py");
    let compare = opts.compare
        && match torch_available() {
            Ok(version) => {
                eprintln!("reference: PyTorch {version} ({})", reference.display());
                true
            }
            Err(why) => {
                eprintln!(
                    "--compare: PyTorch is not installed for python3 ({why}); timing ours alone"
                );
                false
            }
        };
    let threads = opts.threads.to_string();
    let seconds = opts.seconds.to_string();
    let (peak, isa) = peak(opts.ours, &threads)?;
    let scratch = Scratch::new("inputs");
    let overrides: Vec<String> = OPENBLAS_OVERRIDES
        .iter()
        .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
        .collect();
    println!(
        "{} rounds x {} s per step and side, {} threads; medians; FP32 peak {peak:.0} GFLOP/s \
         ({isa} FMAs, benches/peak_flops.rs){}",
        opts.rounds,
        opts.seconds,
        opts.threads,
        if overrides.is_empty() {
            String::new()
        } else {
            format!("; {} unset for the timed commands", overrides.join(" "))
        }
    );
    println!(
        "{:<24} {:>9} {:>9} {:>6} {:>8} {:>9} {:>6} {:>8} {:>13} {:>13}",
        "step",
        "ours /s",
        "torch /s",
        "ratio",
        "ours MiB",
        "torch MiB",
        "RSS x",
        "GFLOP",
        "ours GFLOP/s",
        "torch GFLOP/s"
    );
    let mut products = BTreeMap::new();
    for step in &steps {
        let reference_args = if compare {
            reference_inputs(opts.ours, step, &scratch.0)?
        } else {
            Vec::new()
        };
        let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        for round in 0..opts.rounds {
            let ours = timed_command(opts.ours, &threads)
                .args([step.as_str(), "--seconds", &seconds])
                .output()
                .with_context(|| format!("running {}", opts.ours.display()))?;
            let sample = parse(&ours, &format!("bench-step {step} (round {round})"))?;
            if let Some(p) = &sample.products {
                products
                    .entry(p.clone())
                    .or_insert_with(std::collections::BTreeSet::new)
                    .insert(step.clone());
            }
            samples.entry("ours").or_default().push(sample);
            if compare {
                let theirs = timed_command(Path::new("python3"), &threads)
                    .arg(&reference)
                    .args([step.as_str(), "--seconds", &seconds, "--threads", &threads])
                    .args(&reference_args)
                    .env("OMP_NUM_THREADS", &threads)
                    .env("MKL_NUM_THREADS", &threads)
                    .output()
                    .context("running the PyTorch reference")?;
                samples
                    .entry("torch")
                    .or_default()
                    .push(parse(&theirs, &format!("steps.py {step} (round {round})"))?);
            }
        }
        let stat = |side: &str, pick: fn(&Sample) -> f64| {
            samples.get(side).map(|s| {
                let mut v: Vec<f64> = s.iter().map(pick).collect();
                median(&mut v)
            })
        };
        let (ours, torch) = (
            stat("ours", |s| s.steps_per_s),
            stat("torch", |s| s.steps_per_s),
        );
        let (ours_rss, torch_rss) = (
            stat("ours", |s| s.peak_rss_mib),
            stat("torch", |s| s.peak_rss_mib),
        );
        let flops = stat("ours", |s| s.flops).filter(|f| *f > 0.0);
        let show =
            |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        // GFLOP/s of the products and their share of the peak.
        let rate = |steps: Option<f64>| {
            flops.zip(steps).map_or("-".to_string(), |(f, s)| {
                let g = f * s / 1e9;
                format!("{g:.0} ({:.0}%)", 100.0 * g / peak)
            })
        };
        let ratio = ours.zip(torch).map(|(a, b)| a / b);
        let rss_ratio = ours_rss.zip(torch_rss).map(|(a, b)| a / b);
        println!(
            "{step:<24} {:>9} {:>9} {:>6} {:>8} {:>9} {:>6} {:>8} {:>13} {:>13}",
            show(ours, 2),
            show(torch, 2),
            show(ratio, 2),
            show(ours_rss, 0),
            show(torch_rss, 0),
            show(rss_ratio, 2),
            show(flops.map(|f| f / 1e9), 2),
            rate(ours),
            rate(torch)
        );
    }
    for (p, steps) in &products {
        println!("our matrix products: {p} ({} steps)", steps.len());
    }
    Ok(())
}
