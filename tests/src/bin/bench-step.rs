//! `bench-step <step> [--seconds S]`: times one training step of `distill_tests::steps` in this
//! process and prints one JSON line: steps per second, the steps and seconds timed, peak resident
//! memory (VmHWM) and the last loss. `bench-step --list` lists the steps. `bench-step <step>
//! --check DIR` trains 10 steps from the weights and batch the PyTorch reference exported to
//! `DIR/inputs.safetensors` and prints their losses; `--losses N` prints the losses of `N` steps
//! from the step's own weights and batch. `bench-step <step> --write-batch FILE`
//! writes a MiniLM step's real SST-2 batch for the reference and prints, as JSON, where the
//! pretrained weights are. Threads come from
//! `RAYON_NUM_THREADS` (`cargo xtask bench` sets it); the other settings of a worker, and its
//! matrix products (the project's OpenBLAS unless `DISTILL_CBLAS` says otherwise), it gives
//! itself as `distill` does (`distill_host::apply_worker_settings`, `install_matrix_products`).

use std::time::Instant;

use distill_host::PluginHost;
use distill_tests::plugin_path;
use distill_tests::steps::{PLUGINS, STEPS, build_with};

/// Peak resident set size of this process in MiB (Linux; `None` elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    distill_host::apply_worker_settings()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for (name, what) in STEPS {
            println!("{name}\t{what}");
        }
        return Ok(());
    }
    let usage = "usage: bench-step <step> [--seconds S | --check DIR | --losses N | --write-batch FILE] | --list";
    let name = args.first().ok_or(usage)?;
    let products = distill_host::install_matrix_products()?;
    distill_host::install_data_resolver();
    let mut host = PluginHost::new();
    for plugin in PLUGINS {
        host.load(&plugin_path(plugin))?;
    }
    let seconds: f64 = match args.get(1).map(String::as_str) {
        Some("--seconds") => args.get(2).ok_or(usage)?.parse()?,
        Some("--check") => {
            let path = std::path::Path::new(args.get(2).ok_or(usage)?).join("inputs.safetensors");
            let tensors =
                distill_rt::candle::safetensors::load(&path, &distill_rt::candle::Device::Cpu)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            let tensors = tensors.into_iter().collect();
            let step = build_with(host.registrar(), name, Some(&tensors))?;
            return print_losses(name, step, 10);
        }
        Some("--losses") => {
            let n: usize = args.get(2).ok_or(usage)?.parse()?;
            let step = build_with(host.registrar(), name, None)?;
            return print_losses(name, step, n);
        }
        Some("--write-batch") => {
            let file = std::path::Path::new(args.get(2).ok_or(usage)?);
            distill_tests::steps::write_batch(host.registrar(), name, file)?;
            let weights =
                distill_host::data_folder(distill_tests::steps::MINILM)?.join("model.safetensors");
            println!("{}", serde_json::json!({"step": name, "weights": weights}));
            return Ok(());
        }
        Some(other) => return Err(format!("unknown argument {other}; {usage}").into()),
        None => 5.0,
    };
    let mut step = build_with(host.registrar(), name, None)?;
    // On a thread of rayon's pool, as workers run their jobs (`kernels::on_pool`).
    let timed = distill_rt::kernels::on_pool(|| -> distill_rt::Result<(u64, f32, f64, f64)> {
        for _ in 0..3 {
            step.run()?;
        }
        let flops = distill_rt::kernels::matmul_flops();
        let started = Instant::now();
        let mut steps = 0u64;
        let mut loss = f32::NAN;
        while steps < 5 || started.elapsed().as_secs_f64() < seconds {
            loss = step.run()?;
            steps += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let flops = (distill_rt::kernels::matmul_flops() - flops) as f64 / steps as f64;
        Ok((steps, loss, elapsed, flops))
    });
    let (steps, loss, elapsed, flops) = timed?;
    println!(
        "{}",
        serde_json::json!({
            "step": name,
            "steps_per_s": steps as f64 / elapsed,
            "steps": steps,
            "seconds": elapsed,
            "peak_rss_mib": peak_rss_mib(),
            "loss": loss,
            "matmul_flops_per_step": flops,
            "products": products.to_string(),
        })
    );
    Ok(())
}

/// Trains `step` `n` times on the pool and prints the losses as one JSON line.
fn print_losses(
    name: &str,
    mut step: distill_tests::steps::Step,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let losses = distill_rt::kernels::on_pool(|| {
        (0..n)
            .map(|_| step.run())
            .collect::<distill_rt::Result<Vec<f32>>>()
    })?;
    println!("{}", serde_json::json!({"step": name, "losses": losses}));
    Ok(())
}
