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
    // Every factory describes its keys and defaults.
    for row in &rows {
        assert!(
            row["defaults"].is_object(),
            "{} has no defaults",
            row["name"]
        );
    }
    let defaults = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .map(|r| r["defaults"].clone())
            .unwrap_or_default()
    };
    assert_eq!(
        defaults("kd"),
        serde_json::json!({"alpha": 0.1, "temperature": 4.0})
    );
    assert_eq!(defaults("nlp.delimited")["train"], "<required>");
    // Named data: a default name where the dataset reads one data set, a path instead of it.
    assert_eq!(defaults("nlp.sst2")["data"], "sst2");
    assert_eq!(defaults("recsys.movielens")["data"], "ml-latest-small");
    assert!(defaults("vision.idx")["path"].is_null());
    assert_eq!(defaults("vision.resnet")["width"], 16);
    Ok(())
}

#[test]
fn plugins_lists_each_key_with_its_type_and_default() -> Result<(), Box<dyn std::error::Error>> {
    let out = distill().arg("plugins").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "alpha: number = 0.1",
        "train: required",
        "data: string = \"sst2\"",
        "max_train: optional",
        "width: integer = 16",
        "hidden: list = [256,256]",
        "no configuration keys",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
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
