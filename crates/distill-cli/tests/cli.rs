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

/// A job planned for other code (the workspace rebuilt while a grid ran) is refused by the worker,
/// with a failed record that says why; with this build's code it runs and records that code.
#[test]
fn run_job_refuses_a_job_planned_for_other_code() -> Result<(), Box<dyn std::error::Error>> {
    let out = distill().arg("code-versions").output()?;
    assert!(out.status.success());
    let versions: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let code = serde_json::json!({
        "engine": versions["engine"],
        "dataset": versions["dataset"]["vision.synthetic"],
        "model": versions["model"]["vision.mlp"],
        "strategy": versions["strategy"]["baseline"],
    });
    assert!(
        code["engine"]
            .as_str()
            .is_some_and(|e| e.starts_with("engine:"))
    );
    assert!(
        code["strategy"]
            .as_str()
            .is_some_and(|s| s.starts_with("strategies:"))
    );
    let dir = std::env::temp_dir().join(format!("distill-cli-code-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let run = |code: &serde_json::Value,
               name: &str|
     -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let out_dir = dir.join(name);
        let spec = serde_json::json!({
            "id": name, "spec_id": name, "code": code, "experiment": "cli", "out_dir": out_dir,
            "job": {"kind": "student",
                    "dataset": {"name": "vision.synthetic", "config": {"train": 64, "validation": 32, "test": 32, "size": 8}},
                    "model": {"name": "vision.mlp", "config": {"hidden": [8]}},
                    "strategy": {"name": "baseline", "config": {}},
                    "teachers": [], "train": {"epochs": 1, "batch_size": 32}, "seed": 0}
        });
        let job = dir.join(format!("{name}.json"));
        std::fs::write(&job, serde_json::to_vec(&spec)?)?;
        let done = distill().arg("run-job").arg(&job).output()?;
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out_dir.join("record.json"))?)?;
        // The exit code follows the record: 0 for ok, 1 for failed (what a scheduler reads).
        let want = if record["status"] == "ok" { 0 } else { 1 };
        assert_eq!(
            done.status.code(),
            Some(want),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        Ok(record)
    };
    let mut other = code.clone();
    other["strategy"] = "strategies:0000000000000000".into();
    let refused = run(&other, "other-code")?;
    assert_eq!(refused["status"], "failed");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("planned for code") && error.contains("rebuilt"),
        "{error}"
    );
    let ran = run(&code, "this-code")?;
    assert_eq!(ran["status"], "ok");
    assert_eq!(ran["code"], code);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `distill run-job` started by hand, without the environment `cargo xtask run` gives its
/// workers, gives itself the same settings (it runs itself again with them): candle's and
/// OpenBLAS's pools of one thread, glibc's allocator settings before the user's own, and the
/// project's OpenBLAS for the matrix products. Its log says so.
#[test]
fn a_job_run_by_hand_gives_itself_the_worker_settings() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("distill-cli-settings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let out_dir = dir.join("job");
    let spec = serde_json::json!({
        "id": "by-hand", "spec_id": "by-hand", "experiment": "cli", "out_dir": out_dir,
        "job": {"kind": "student",
                "dataset": {"name": "vision.synthetic", "config": {"train": 64, "validation": 32, "test": 32, "size": 8}},
                "model": {"name": "vision.mlp", "config": {"hidden": [8]}},
                "strategy": {"name": "baseline", "config": {}},
                "teachers": [], "train": {"epochs": 1, "batch_size": 32}, "seed": 0}
    });
    let job = dir.join("job.json");
    std::fs::write(&job, serde_json::to_vec(&spec)?)?;
    let own = "glibc.malloc.tcache_count=0";
    let done = distill()
        .arg("run-job")
        .arg(&job)
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("CANDLE_NUM_THREADS")
        .env_remove("OPENBLAS_NUM_THREADS")
        .env_remove("DISTILL_CBLAS")
        .env("GLIBC_TUNABLES", own)
        .output()?;
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let log = std::fs::read_to_string(out_dir.join("log.jsonl"))?;
    let settings: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["fields"]["message"] == "worker settings")
        .collect();
    assert_eq!(settings.len(), 1, "{log}");
    let f = &settings[0]["fields"];
    assert_eq!(f["candle_threads"], "1");
    assert_eq!(f["openblas_threads"], "1");
    let tunables = f["glibc_tunables"].as_str().unwrap_or_default();
    assert!(
        tunables.starts_with("glibc.malloc.mmap_threshold=")
            && tunables.contains("glibc.malloc.arena_max=1")
            && tunables.ends_with(own),
        "{tunables}"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(f["threads"], cores);
    let products = f["products"].as_str().unwrap_or_default();
    assert!(
        products.starts_with("CBLAS ") && products.contains("openblas"),
        "{products}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
