//! A training step gives the same bits on 1, 2 and 3 threads, with the matrix products on the
//! library workers use by default (OpenBLAS): the kernels split their products and their sums by
//! shape, never by the pool's size, so a job's numbers do not depend on how many cores the
//! executor gave it (ARCHITECTURE.md, "Determinism"). Each run is its own `bench-step` process
//! (the pool's size is fixed when a process starts).

use std::process::Command;

/// The losses of `steps` training steps of `step` on `threads` threads, as bits.
fn losses(
    step: &str,
    steps: usize,
    threads: usize,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let out = Command::new(env!("CARGO_BIN_EXE_bench-step"))
        .args([step, "--losses", &steps.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env_remove("DISTILL_CBLAS")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())?;
    Ok(v["losses"]
        .as_array()
        .ok_or("no losses")?
        .iter()
        .filter_map(|l| l.as_f64().map(|l| (l as f32).to_bits()))
        .collect())
}

#[test]
fn training_steps_give_the_same_bits_on_any_thread_count() -> Result<(), Box<dyn std::error::Error>>
{
    for step in [
        "mlp-kd",
        "cnn-kd",
        "transformer-kd-cached",
        "bilstm-kd-cached",
        "resnet20-alone",
    ] {
        let one = losses(step, 4, 1)?;
        assert_eq!(one.len(), 4);
        for threads in [2, 3] {
            assert_eq!(
                losses(step, 4, threads)?,
                one,
                "{step}: other losses on {threads} threads than on 1"
            );
        }
    }
    Ok(())
}
