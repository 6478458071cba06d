//! The `distill` binary as a user (or the orchestrator) runs it. Also makes `cargo test` build
//! the binary, which the end-to-end tests of the xtask drive.

use std::process::Command;

fn distill() -> Command {
    Command::new(env!("CARGO_BIN_EXE_distill"))
}

#[test]
fn plugins_json_lists_datasets_models_and_strategies() -> Result<(), Box<dyn std::error::Error>> {
    let out = distill().args(["plugins", "--json"]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let has = |kind: &str, name: &str| rows.iter().any(|r| r["kind"] == kind && r["name"] == name);
    assert!(
        has("dataset", "vision.synthetic")
            && has("dataset", "vision.idx")
            && has("dataset", "vision.cifar10")
    );
    assert!(
        has("model", "vision.resnet")
            && has("model", "vision.lenet5")
            && has("model", "vision.mobilenet")
            && has("model", "vision.mlp")
    );
    assert!(has("strategy", "baseline") && has("strategy", "kd") && has("strategy", "feature-mse"));
    Ok(())
}

#[test]
fn a_missing_job_file_is_a_named_error() -> Result<(), Box<dyn std::error::Error>> {
    let out = distill()
        .args(["run-job", "/nonexistent/job.json"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/job.json"));
    Ok(())
}
