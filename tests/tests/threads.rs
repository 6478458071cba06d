//! Loading a plugin and running its operations adds no threads: plugins share the host's
//! thread pools (DESIGN.md, "The plugin boundary"). One test in its own binary, so that no other
//! test's thread disturbs the count.

use std::collections::BTreeMap;

use distill_host::PluginHost;
use distill_rt::candle::{DType, Device, Tensor, Var};
use distill_rt::candle_nn::{VarBuilder, VarMap};
use distill_rt::strategy::StepInfo;
use distill_rt::{Batch, ModelOutput, StrategyContext, ops};
use distill_tests::{fixed_tensor, plugin_path};

fn thread_count() -> usize {
    match std::fs::read_dir("/proc/self/task") {
        Ok(entries) => entries.count(),
        Err(e) => panic!("/proc/self/task: {e}"),
    }
}

#[test]
fn loading_and_running_a_plugin_adds_no_threads() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    // Start the host's pools first: a matmul large enough to run in parallel, and the same
    // element-wise and reduction ops the loss uses.
    let a = fixed_tensor(256, 256, 1, 1.0, DType::F32);
    let warm = Var::from_tensor(&a.matmul(&a)?)?;
    let y = Tensor::zeros(256, DType::U32, &dev)?;
    ops::cross_entropy(warm.as_tensor(), &y)?.backward()?;
    let before = thread_count();
    assert!(
        before > 2,
        "the warm-up should have started candle's pools ({before} threads)"
    );

    let mut host = PluginHost::new();
    host.load(&plugin_path("distill_plugin_strategies"))?;
    let varmap = VarMap::new();
    let empty = BTreeMap::new();
    let ctx = StrategyContext {
        num_classes: 256,
        student_features: &empty,
        teacher_features: &empty,
        train_samples: 1,
        seed: 0,
        vb: VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    };
    let kd = host
        .registrar()
        .get_strategy("kd")?
        .build(&distill_rt::serde_json::Value::Null, ctx)?;
    let out = |t: &Tensor| ModelOutput {
        logits: t.clone(),
        features: BTreeMap::new(),
    };
    let batch = Batch {
        inputs: BTreeMap::new(),
        targets: y,
        soft_targets: None,
        indices: Tensor::arange(0u32, 256, &dev)?,
    };
    let student = Var::from_tensor(&a.matmul(&a.t()?)?)?;
    let loss = kd.loss(
        &out(student.as_tensor()),
        Some(&out(&a)),
        &batch,
        &StepInfo::default(),
    )?;
    loss.total.backward()?;

    assert_eq!(
        thread_count(),
        before,
        "threads before loading the plugin vs after running it"
    );
    Ok(())
}
