//! One knowledge-distillation training step (student forward, `kd` loss, backward, AdamW
//! update) of every vision model as the student (the ResNet too: its step is what a teacher
//! epoch is made of) on a batch of 128 synthetic 28x28 images, with the ResNet teacher run live
//! and with its logits cached.
//!
//! `cargo bench -p distill-tests --profile dev --bench kd_step` (the workspace's one profile:
//! candle at opt-level 3). Measurements only; nothing here is a pass/fail test.

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use distill_engine::optim::{Optimizer, OptimizerConfig};
use distill_host::PluginHost;
use distill_rt::candle::{DType, Device, Tensor};
use distill_rt::candle_nn::VarMap;
use distill_rt::init::seeded_var_builder;
use distill_rt::serde_json::json;
use distill_rt::strategy::StepInfo;
use distill_rt::testing::named_vars;
use distill_rt::{Model, ModelContext, ModelOutput, Split, StrategyContext};
use distill_tests::plugin_path;

fn bench(c: &mut Criterion) {
    let mut host = PluginHost::new();
    for plugin in ["distill_plugin_vision", "distill_plugin_strategies"] {
        if let Err(e) = host.load(&plugin_path(plugin)) {
            panic!("{e}");
        }
    }
    let r = host.registrar();
    let dev = Device::Cpu;
    let mut run = || -> distill_rt::Result<()> {
        let data = r
            .get_dataset("vision.synthetic")?
            .build(&json!({"train": 128, "validation": 8, "test": 8, "size": 28}))?;
        let batch = data.batch(Split::Train, &(0..128).collect::<Vec<_>>(), &dev)?;
        let build = |name: &str,
                     config: distill_rt::Config,
                     seed: u64|
         -> distill_rt::Result<(Box<dyn Model>, VarMap)> {
            let varmap = VarMap::new();
            let ctx = ModelContext {
                dataset: data.info(),
                vb: seeded_var_builder(&varmap, seed, DType::F32, &dev),
            };
            Ok((r.get_model(name)?.build(&config, ctx)?, varmap))
        };
        let (teacher, _) = build("vision.resnet", json!({"width": 16, "blocks": 1}), 0)?;
        let cached = teacher.forward(&batch.inputs, false)?;
        let cached = ModelOutput {
            logits: cached.logits.detach(),
            features: BTreeMap::new(),
        };
        let mut group = c.benchmark_group("kd_step");
        group.sample_size(10);
        for student in [
            "vision.lenet5",
            "vision.mobilenet",
            "vision.mlp",
            "vision.resnet",
        ] {
            let (model, varmap) = build(student, distill_rt::Config::Null, 1)?;
            let empty = BTreeMap::new();
            let ctx = StrategyContext {
                num_classes: 10,
                student_features: &empty,
                teacher_features: &empty,
                train_samples: 64,
                seed: 0,
                vb: seeded_var_builder(&VarMap::new(), 2, DType::F32, &dev),
            };
            let kd = r
                .get_strategy("kd")?
                .build(&json!({"alpha": 0.1, "temperature": 4.0}), ctx)?;
            let vars = named_vars(&varmap).into_iter().map(|(_, v)| v).collect();
            let mut opt = Optimizer::new(
                OptimizerConfig::AdamW {
                    lr: 1e-3,
                    weight_decay: 0.0,
                },
                vars,
            )?;
            let mut step = |live: bool| -> distill_rt::Result<Tensor> {
                let s = model.forward(&batch.inputs, true)?;
                let t = if live {
                    teacher.forward(&batch.inputs, false)?
                } else {
                    cached.clone()
                };
                let loss = kd.loss(&s, Some(&t), &batch, &StepInfo::default())?;
                opt.step(&loss.total.backward()?, 1e-3)?;
                Ok(loss.total)
            };
            for (label, live) in [("live teacher", true), ("cached teacher", false)] {
                group.bench_function(format!("{student}, {label}"), |b| {
                    b.iter(|| step(live).unwrap_or_else(|e| panic!("{e}")))
                });
            }
        }
        group.finish();
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
