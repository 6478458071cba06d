//! NLP students' training steps on real SST-2 batches: a `kd` step with the pretrained MiniLM
//! teacher's cached logits for each student (BiLSTM, TextCNN, the small transformer; batch 64).
//! Batches are drawn as training draws them (length-bucketed). The teacher's own steps (its
//! forward pass and fine-tuning) are bench steps of `tests/src/steps.rs`, timed against PyTorch
//! by `cargo xtask bench`.
//!
//! `cargo bench -p distill-tests --profile dev --bench nlp_step`. Reads SST-2 and the
//! MiniLM files through the data cache (`cargo xtask fetch sst2 all-MiniLM-L6-v2`).
//! Measurements only; nothing here is a pass/fail test.

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use distill_engine::batching::training_batches;
use distill_engine::optim::{Optimizer, OptimizerConfig};
use distill_host::PluginHost;
use distill_rt::candle::{DType, Device, Tensor};
use distill_rt::candle_nn::VarMap;
use distill_rt::init::seeded_var_builder;
use distill_rt::rng::Rng;
use distill_rt::serde_json::json;
use distill_rt::strategy::StepInfo;
use distill_rt::testing::named_vars;
use distill_rt::{Model, ModelContext, ModelOutput, Split, StrategyContext};
use distill_tests::plugin_path;

fn bench(c: &mut Criterion) {
    let mut host = PluginHost::new();
    for plugin in ["distill_plugin_nlp", "distill_plugin_strategies"] {
        if let Err(e) = host.load(&plugin_path(plugin)) {
            panic!("{e}");
        }
    }
    let r = host.registrar();
    let dev = Device::Cpu;
    distill_host::install_data_resolver();
    let mut run = || -> distill_rt::Result<()> {
        let data = r.get_dataset("nlp.sst2")?.build(&json!({
            "wordpiece": "all-MiniLM-L6-v2", "max_train": 4096
        }))?;
        let n = data.info().len(Split::Train);
        let lengths = data.lengths(Split::Train);
        let batch_of = |size: usize| {
            let batches = training_batches(n, lengths.as_deref(), size, &mut Rng::new(7));
            data.batch(Split::Train, &batches[0], &dev)
        };
        let build = |name: &str,
                     config: distill_rt::Config|
         -> distill_rt::Result<(Box<dyn Model>, VarMap)> {
            let varmap = VarMap::new();
            let ctx = ModelContext {
                dataset: data.info(),
                seed: 0,
                vb: seeded_var_builder(&varmap, 1, DType::F32, &dev),
            };
            Ok((r.get_model(name)?.build(&config, ctx)?, varmap))
        };
        let adamw = |varmap: &VarMap| {
            let vars = named_vars(varmap).into_iter().map(|(_, v)| v).collect();
            Optimizer::new(
                OptimizerConfig::AdamW {
                    lr: 1e-4,
                    weight_decay: 0.0,
                },
                vars,
            )
        };
        let mut group = c.benchmark_group("nlp_step");
        group.sample_size(10);

        let (teacher, _) = build(
            "nlp.bert",
            json!({"pretrained": "all-MiniLM-L6-v2", "finetune": "all"}),
        )?;
        let batch = batch_of(64)?;
        let cached = ModelOutput {
            logits: teacher.forward(&batch.inputs, false)?.logits.detach(),
            features: BTreeMap::new(),
        };
        for (student, config) in [
            ("nlp.bilstm", json!({})),
            ("nlp.textcnn", json!({})),
            ("nlp.bert", json!({})),
        ] {
            let (model, varmap) = build(student, config)?;
            let empty = BTreeMap::new();
            let ctx = StrategyContext {
                num_classes: 2,
                student_features: &empty,
                teacher_features: &empty,
                train_samples: 64,
                seed: 0,
                vb: seeded_var_builder(&VarMap::new(), 2, DType::F32, &dev),
            };
            let kd = r
                .get_strategy("kd")?
                .build(&json!({"alpha": 0.5, "temperature": 2.0}), ctx)?;
            let mut opt = adamw(&varmap)?;
            let mut step = || -> distill_rt::Result<Tensor> {
                let s = model.forward(&batch.inputs, true)?;
                let loss = kd.loss(&s, Some(&cached), &batch, &StepInfo::default())?;
                opt.step(&loss.total.backward()?, 1e-3)?;
                Ok(loss.total)
            };
            group.bench_function(format!("{student} kd step, batch 64"), |b| {
                b.iter(|| step().unwrap_or_else(|e| panic!("{e}")))
            });
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
