//! `distill loss`: one strategy on the tensors of a safetensors file (named as
//! `distill_engine::probe` reads them), every loss term printed as JSON and, on request, the
//! gradient of the total with respect to each student tensor written as safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use distill_engine::probe::{ProbeOptions, evaluate};
use distill_rt::candle::{DType, Device};
use distill_rt::strategy::StepInfo;
use distill_rt::{Registrar, TensorMap};
use serde_json::{Map, Value, json};

/// What `distill loss` was asked.
#[derive(clap::Args)]
pub struct LossArgs {
    /// Registered strategy name.
    pub strategy: String,
    /// The safetensors file.
    #[arg(long)]
    pub inputs: PathBuf,
    /// A configuration key (repeatable): `--set alpha=0.5`; the value is read as JSON when it
    /// parses, else as a string; dotted keys nest.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Writes d total / d each student tensor here (safetensors, named like the inputs).
    #[arg(long)]
    pub grad: Option<PathBuf>,
    /// Computes in f64 (default f32, as training does).
    #[arg(long)]
    pub f64: bool,
    /// The zero-based epoch the strategy sees (warm-ups, schedules).
    #[arg(long, default_value_t = 0)]
    pub epoch: usize,
    /// The training-set size the strategy is told (default: the batch size).
    #[arg(long)]
    pub train_samples: Option<usize>,
    /// Steps (loss, then end_step) on the same tensors before the one reported.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
}

/// The configuration table of `sets`.
fn config(sets: &[String]) -> Result<Value> {
    let mut table = Map::new();
    for set in sets {
        let (key, raw) = set
            .split_once('=')
            .with_context(|| format!("--set `{set}`: expected key=value"))?;
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().filter(|k| !k.is_empty());
        let Some(last) = last else {
            bail!("--set `{set}`: empty key");
        };
        let mut node = &mut table;
        for part in parts {
            node = node
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .with_context(|| format!("--set `{set}`: `{part}` is not a table"))?;
        }
        node.insert(last.to_string(), value);
    }
    Ok(Value::Object(table))
}

/// Runs `distill loss`; prints `{"strategy": ..., "terms": {...}}`.
pub fn run(registrar: &Registrar, args: &LossArgs) -> Result<()> {
    let inputs: TensorMap = distill_rt::candle::safetensors::load(&args.inputs, &Device::Cpu)
        .with_context(|| format!("reading {}", args.inputs.display()))?
        .into_iter()
        .collect();
    let config = config(&args.sets)?;
    let options = ProbeOptions {
        strategy: &args.strategy,
        config: &config,
        step: StepInfo {
            epoch: args.epoch,
            step: 0,
            epochs: args.epoch + 1,
        },
        train_samples: args.train_samples,
        seed: 0,
        dtype: if args.f64 { DType::F64 } else { DType::F32 },
        warmup_steps: args.warmup_steps,
    };
    let probe = evaluate(registrar, &inputs, &options)
        .with_context(|| format!("strategy `{}` on {}", args.strategy, args.inputs.display()))?;
    let terms: Map<String, Value> = probe
        .terms
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"strategy": args.strategy, "terms": terms}))?
    );
    if let Some(path) = &args.grad {
        write(path, probe.gradients.into_iter().collect())?;
    }
    Ok(())
}

fn write(path: &Path, tensors: HashMap<String, distill_rt::candle::Tensor>) -> Result<()> {
    distill_rt::candle::safetensors::save(&tensors, path)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_become_a_nested_table() -> Result<()> {
        let got = config(&[
            "alpha=0.5".into(),
            "features=[\"a\", \"b\"]".into(),
            "student_feature=stage2".into(),
            "adapter.kind=linear".into(),
        ])?;
        assert_eq!(
            got,
            json!({"alpha": 0.5, "features": ["a", "b"], "student_feature": "stage2",
                   "adapter": {"kind": "linear"}})
        );
        assert!(config(&["novalue".into()]).is_err());
        Ok(())
    }
}
