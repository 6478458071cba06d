//! `cargo xtask bench`: times the training steps of `distill_tests::steps` (the `bench-step`
//! binary, one process per measurement, so that each has its own peak memory) and, with
//! `--compare`, the PyTorch reference `benches/reference/steps.py` on the same steps, shapes and
//! threads, alternating ours and the reference (A B A B ...) round by round; prints the medians,
//! their ratio and peak resident memory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// What one measurement reported.
#[derive(Clone, Copy, Debug)]
struct Sample {
    steps_per_s: f64,
    peak_rss_mib: f64,
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

fn parse(out: &std::process::Output, what: &str) -> Result<Sample> {
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
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}, not JSON"))?;
    Ok(Sample {
        steps_per_s: v["steps_per_s"].as_f64().context("no steps_per_s")?,
        peak_rss_mib: v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
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

/// Runs the bench; prints one row per step.
pub fn run(root: &Path, opts: &BenchOptions<'_>, tunables: &str) -> Result<()> {
    let listed = Command::new(opts.ours)
        .arg("--list")
        .output()
        .with_context(|| format!("running {}", opts.ours.display()))?;
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
    println!(
        "{} rounds x {} s per step and side, {} threads; medians",
        opts.rounds, opts.seconds, opts.threads
    );
    println!(
        "{:<24} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7}",
        "step", "ours /s", "torch /s", "ratio", "ours MiB", "torch MiB", "RSS x"
    );
    for step in &steps {
        let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        for round in 0..opts.rounds {
            let ours = Command::new(opts.ours)
                .args([step.as_str(), "--seconds", &seconds])
                .env("RAYON_NUM_THREADS", &threads)
                .env("CANDLE_NUM_THREADS", &threads)
                .env("GLIBC_TUNABLES", tunables)
                .output()
                .with_context(|| format!("running {}", opts.ours.display()))?;
            samples
                .entry("ours")
                .or_default()
                .push(parse(&ours, &format!("bench-step {step} (round {round})"))?);
            if compare {
                let theirs = Command::new("python3")
                    .arg(&reference)
                    .args([step.as_str(), "--seconds", &seconds, "--threads", &threads])
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
        let show =
            |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let ratio = ours.zip(torch).map(|(a, b)| a / b);
        let rss_ratio = ours_rss.zip(torch_rss).map(|(a, b)| a / b);
        println!(
            "{step:<24} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7}",
            show(ours, 2),
            show(torch, 2),
            show(ratio, 2),
            show(ours_rss, 0),
            show(torch_rss, 0),
            show(rss_ratio, 2)
        );
    }
    Ok(())
}
