//! One training step of every model family we ship, on synthetic inputs of fixed shapes: the
//! student's forward pass, the strategy's loss (with the teacher run live, read from a cache, or
//! absent), backward, and an AdamW update; and the pretrained MiniLM teacher's side on a real
//! SST-2 batch (its forward pass as the teacher cache runs it, and a fine-tuning step). The
//! criterion bench `steps` and the `bench-step` binary (behind `cargo xtask bench --compare`)
//! time these; `benches/reference/steps.py` runs the same steps in PyTorch on the same shapes
//! (and, for the MiniLM steps, the same weights and batch: [`write_batch`]).

use std::collections::BTreeMap;

use distill_engine::batching::training_batches;
use distill_engine::optim::{Optimizer, OptimizerConfig};
use distill_rt::candle::{DType, Device, Tensor};
use distill_rt::candle_nn::VarMap;
use distill_rt::init::{frozen_var_builder, seeded_var_builder};
use distill_rt::rng::Rng;
use distill_rt::serde_json::json;
use distill_rt::strategy::StepInfo;
use distill_rt::testing::named_vars;
use distill_rt::{
    Batch, Config, DatasetInfo, Error, Model, ModelContext, ModelOutput, Registrar, Result, Split,
    StrategyContext, TaskKind, TensorMap, ops,
};

/// Every step: its name and what it runs.
pub const STEPS: [(&str, &str); 13] = [
    (
        "mlp-kd",
        "MLP KD: teacher 784-1200-1200-10 live, student 784-256-256-10, batch 128",
    ),
    (
        "mlp-kd-cached",
        "the same student, teacher logits cached, batch 128",
    ),
    (
        "mlp-alone",
        "the same student on labels alone (CE), batch 128",
    ),
    (
        "cnn-kd",
        "LeNet-5 KD on 1x28x28: teacher LeNet (32, 64 channels; 256, 128 hidden) live, student LeNet-5 (6, 16; 120, 84), batch 128",
    ),
    (
        "mobilenet-kd-cached",
        "MobileNet-style student (16; 32, 64, 128; group norm), teacher logits cached, 1x28x28, batch 128",
    ),
    (
        "transformer-kd-cached",
        "2-layer transformer (d 128, 4 heads, FFN 256), seq 64, batch 32, vocabulary 5000, teacher logits cached",
    ),
    (
        "bilstm-kd-cached",
        "BiLSTM (embedding 128, hidden 150, MLP 200), seq 64, batch 64, teacher logits cached",
    ),
    (
        "textcnn-kd-cached",
        "TextCNN (embedding 128, widths 3, 4, 5, 100 filters), seq 64, batch 64, teacher logits cached",
    ),
    (
        "neumf-mf-kd",
        "NeuMF teacher (dim 16, MLP 32-16) live -> MF student (dim 8), 1024 users x 2000 items, batch 128 users scoring every item, 1 positive + 4 negatives each",
    ),
    (
        "resnet-alone",
        "ResNet teacher (width 16, one block per stage, group norm) on labels alone, 1x28x28, batch 128: a teacher epoch's step",
    ),
    (
        "resnet20-alone",
        "the model zoo's resnet20 (batch norm) on labels alone, 3x32x32, batch 64: a CIFAR teacher's step",
    ),
    (
        "minilm-forward",
        "all-MiniLM-L6-v2 forward pass (frozen, as the teacher cache runs it), a real SST-2 batch of 32 (WordPiece, length-bucketed)",
    ),
    (
        "minilm-finetune",
        "all-MiniLM-L6-v2 fine-tuning step (all layers, CE, AdamW lr 5e-5), the same SST-2 batch of 32: nlp.toml's teacher",
    ),
];

/// The pretrained teacher of the MiniLM steps, and its settings there.
pub const MINILM: &str = "all-MiniLM-L6-v2";
/// The MiniLM steps' batch size: nlp.toml's teacher batch.
const MINILM_BATCH: usize = 32;

/// Where a step's teacher outputs come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Teacher {
    /// No teacher: the `baseline` strategy.
    None,
    /// The teacher runs on every step.
    Live,
    /// Its logits, computed once.
    Cached,
}

/// A runnable step: each call trains once and returns the loss.
pub struct Step {
    run: Box<dyn FnMut() -> Result<f32> + Send>,
}

impl Step {
    /// One training step; returns the total loss.
    pub fn run(&mut self) -> Result<f32> {
        (self.run)()
    }
}

/// Synthetic inputs of one task with the dataset description models are built for, and the
/// precision the step computes in: f32, or f64 where the reference exported f64 weights.
struct Inputs {
    info: DatasetInfo,
    batch: Batch,
    dtype: DType,
}

fn classification(
    inputs: BTreeMap<String, Vec<usize>>,
    cardinality: BTreeMap<String, usize>,
    classes: usize,
    batch: usize,
) -> DatasetInfo {
    DatasetInfo {
        task: TaskKind::Classification,
        num_classes: classes,
        inputs,
        cardinality,
        split_sizes: [batch, 0, 0],
        primary_metric: "accuracy".into(),
    }
}

fn labels(rng: &mut Rng, batch: usize, classes: usize, dev: &Device) -> Result<Tensor> {
    let y: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
    Ok(Tensor::new(y, dev)?)
}

fn indices(batch: usize, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::arange(0u32, batch as u32, dev)?)
}

/// `batch` images of `channels x size x size`, pixels uniform in [0, 1], and 10 classes.
fn images(batch: usize, (channels, size): (usize, usize), dev: &Device) -> Result<Inputs> {
    let mut rng = Rng::derive(1, "bench/images");
    let pixels: Vec<f32> = (0..batch * channels * size * size)
        .map(|_| rng.uniform() as f32)
        .collect();
    let image = Tensor::from_vec(pixels, (batch, channels, size, size), dev)?;
    Ok(Inputs {
        info: classification(
            [("image".to_string(), vec![channels, size, size])].into(),
            BTreeMap::new(),
            10,
            batch,
        ),
        batch: Batch {
            inputs: [("image".to_string(), image)].into(),
            targets: labels(&mut rng, batch, 10, dev)?,
            soft_targets: None,
            indices: indices(batch, dev)?,
        },
        dtype: DType::F32,
    })
}

/// `batch` sentences of `len` word ids from a vocabulary of 5000 (no padding), 2 classes.
fn sentences(batch: usize, len: usize, dev: &Device) -> Result<Inputs> {
    const VOCABULARY: usize = 5000;
    let mut rng = Rng::derive(1, "bench/sentences");
    let ids: Vec<u32> = (0..batch * len)
        .map(|_| 1 + rng.below(VOCABULARY - 1) as u32)
        .collect();
    let inputs: TensorMap = [
        (
            "words".to_string(),
            Tensor::from_vec(ids, (batch, len), dev)?,
        ),
        (
            "words_mask".to_string(),
            Tensor::ones((batch, len), DType::F32, dev)?,
        ),
    ]
    .into();
    Ok(Inputs {
        info: classification(
            [
                ("words".to_string(), vec![len]),
                ("words_mask".to_string(), vec![len]),
            ]
            .into(),
            [("words".to_string(), VOCABULARY)].into(),
            2,
            batch,
        ),
        batch: Batch {
            inputs,
            targets: labels(&mut rng, batch, 2, dev)?,
            soft_targets: None,
            indices: indices(batch, dev)?,
        },
        dtype: DType::F32,
    })
}

/// `batch` of `users` users scoring `items` items: per row one positive and four negatives
/// (relevance 1 and 0), every other item unlabelled.
fn interactions(users: usize, items: usize, batch: usize, dev: &Device) -> Result<Inputs> {
    let mut rng = Rng::derive(1, "bench/interactions");
    let ids: Vec<u32> = (0..batch).map(|_| rng.below(users) as u32).collect();
    let mut relevance = vec![distill_rt::data::UNLABELLED; batch * items];
    for row in relevance.chunks_mut(items) {
        for k in 0..5 {
            row[rng.below(items)] = if k == 0 { 1.0 } else { 0.0 };
        }
    }
    Ok(Inputs {
        info: DatasetInfo {
            task: TaskKind::Ranking,
            num_classes: items,
            inputs: [("user".to_string(), Vec::new())].into(),
            cardinality: [("user".to_string(), users)].into(),
            split_sizes: [users, 0, 0],
            primary_metric: "ndcg@10".into(),
        },
        batch: Batch {
            inputs: [("user".to_string(), Tensor::new(ids, dev)?)].into(),
            targets: Tensor::from_vec(relevance, (batch, items), dev)?,
            soft_targets: None,
            indices: indices(batch, dev)?,
        },
        dtype: DType::F32,
    })
}

/// The first training batch of `batch` SST-2 sentences as a seeded run draws it (length-bucketed
/// WordPiece ids of MiniLM's tokenizer, at most 64 long, and the words), from the first 4,096
/// training sentences; data and tokenizer through the data cache.
fn sst2(r: &Registrar, batch: usize, dev: &Device) -> Result<Inputs> {
    let data = r.get_dataset("nlp.sst2")?.build(&json!({
        "wordpiece": MINILM, "max_len": 64, "max_train": 4096
    }))?;
    let n = data.info().len(Split::Train);
    let lengths = data.lengths(Split::Train);
    let batches = training_batches(n, lengths.as_deref(), batch, &mut Rng::new(7));
    Ok(Inputs {
        info: data.info().clone(),
        batch: data.batch(Split::Train, &batches[0], dev)?,
        dtype: DType::F32,
    })
}

/// Writes the batch of the MiniLM step `name` to `file` (safetensors: `input.<name>`,
/// `targets`), for the PyTorch reference to run the same batch; an error for other steps.
pub fn write_batch(r: &Registrar, name: &str, file: &std::path::Path) -> Result<()> {
    if !name.starts_with("minilm-") {
        return Err(Error::Invalid(format!(
            "the step `{name}` draws its own synthetic batch"
        )));
    }
    let batch = sst2(r, MINILM_BATCH, &Device::Cpu)?.batch;
    let mut tensors: std::collections::HashMap<String, Tensor> = batch
        .inputs
        .into_iter()
        .map(|(k, v)| (format!("input.{k}"), v))
        .collect();
    tensors.insert("targets".into(), batch.targets);
    Ok(distill_rt::candle::safetensors::save(&tensors, file)?)
}

/// The frozen teacher's forward pass (its trained weights as constants, evaluation mode, as the
/// teacher cache runs it); each call returns the cross-entropy of its logits, which changes
/// nothing.
fn forward_step(
    r: &Registrar,
    inputs: Inputs,
    (name, config): (&str, Config),
    import: Option<&TensorMap>,
) -> Result<Step> {
    let inputs = match import {
        Some(tensors) => import_batch(inputs, tensors)?,
        None => inputs,
    };
    let (_, vars) = build_model(r, &inputs, name, config.clone(), 1)?;
    if let Some(tensors) = import {
        import_vars(&vars, tensors, "student.")?;
    }
    let model = frozen_model(r, &inputs, (name, &config), &vars)?;
    let batch = inputs.batch;
    Ok(Step {
        run: Box::new(move || {
            let logits = model.forward(&batch.inputs, false)?.logits;
            let loss = ops::cross_entropy(&logits, &batch.targets)?;
            Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
        }),
    })
}

/// The model `name` rebuilt on the weights of `vars` as constants, as the engine loads a live
/// teacher and the teacher cache runs one: its forward pass records no backward graph.
fn frozen_model(
    r: &Registrar,
    inputs: &Inputs,
    (name, config): (&str, &Config),
    vars: &VarMap,
) -> Result<Box<dyn Model>> {
    let weights = named_vars(vars)
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    let frozen = ModelContext {
        dataset: &inputs.info,
        seed: 0,
        vb: frozen_var_builder(weights, inputs.dtype, &Device::Cpu),
    };
    r.get_model(name)?.build(config, frozen)
}

fn build_model(
    r: &Registrar,
    inputs: &Inputs,
    name: &str,
    config: Config,
    seed: u64,
) -> Result<(Box<dyn Model>, VarMap)> {
    let varmap = VarMap::new();
    let ctx = ModelContext {
        dataset: &inputs.info,
        seed: 0,
        vb: seeded_var_builder(&varmap, seed, inputs.dtype, &Device::Cpu),
    };
    Ok((r.get_model(name)?.build(&config, ctx)?, varmap))
}

/// Sets every variable of `varmap` from `tensors[<prefix><name>]`; an error names the missing.
fn import_vars(varmap: &VarMap, tensors: &TensorMap, prefix: &str) -> Result<()> {
    for (name, var) in named_vars(varmap) {
        let key = format!("{prefix}{name}");
        let value = tensors
            .get(&key)
            .ok_or_else(|| Error::Invalid(format!("the imported tensors lack `{key}`")))?;
        if value.dims() != var.dims() {
            return Err(Error::Invalid(format!(
                "`{key}` is {:?}, the variable {:?}",
                value.dims(),
                var.dims()
            )));
        }
        var.set(&value.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// `inputs` with the batch replaced by imported tensors (`input.<name>`, `targets`), in the
/// precision of the imported weights (f64 where the reference exported f64: a step whose f32
/// rounding alone moves its losses by more than the check allows).
fn import_batch(mut inputs: Inputs, tensors: &TensorMap) -> Result<Inputs> {
    if let Some(w) = tensors.iter().find(|(k, _)| k.starts_with("student.")) {
        inputs.dtype = w.1.dtype();
    }
    for (name, value) in inputs.batch.inputs.iter_mut() {
        let key = format!("input.{name}");
        let imported = tensors
            .get(&key)
            .ok_or_else(|| Error::Invalid(format!("the imported tensors lack `{key}`")))?;
        let dtype = if value.dtype().is_float() {
            inputs.dtype
        } else {
            value.dtype()
        };
        *value = imported.to_dtype(dtype)?;
    }
    let targets = tensors
        .get("targets")
        .ok_or_else(|| Error::Invalid("the imported tensors lack `targets`".into()))?;
    inputs.batch.targets = targets.to_dtype(inputs.batch.targets.dtype())?;
    Ok(inputs)
}

/// A step of `student` with `strategy` (`kd` when there is a teacher, `baseline` without);
/// `import` replaces weights, batch and cached logits (`benches/reference/steps.py --export`).
fn step(
    r: &Registrar,
    inputs: Inputs,
    student: (&str, Config),
    teacher: Option<(&str, Config)>,
    mode: Teacher,
    lr: f64,
    import: Option<&TensorMap>,
) -> Result<Step> {
    let inputs = match import {
        Some(tensors) => import_batch(inputs, tensors)?,
        None => inputs,
    };
    let (model, varmap) = build_model(r, &inputs, student.0, student.1, 1)?;
    let teacher = match teacher {
        Some((name, config)) => {
            let (t, vars) = build_model(r, &inputs, name, config.clone(), 0)?;
            if let (Some(tensors), Teacher::Live) = (import, mode) {
                import_vars(&vars, tensors, "teacher.")?;
            }
            match mode {
                Teacher::Live => Some(frozen_model(r, &inputs, (name, &config), &vars)?),
                _ => Some(t),
            }
        }
        None => None,
    };
    if let Some(tensors) = import {
        import_vars(&varmap, tensors, "student.")?;
    }
    let cached = match (&teacher, mode, import.and_then(|t| t.get("teacher_logits"))) {
        (Some(_), Teacher::Cached, Some(logits)) => Some(ModelOutput {
            logits: logits.to_dtype(inputs.dtype)?,
            features: BTreeMap::new(),
        }),
        (Some(t), Teacher::Cached, None) => Some(ModelOutput {
            logits: t.forward(&inputs.batch.inputs, false)?.logits.detach(),
            features: BTreeMap::new(),
        }),
        _ => None,
    };
    let empty = BTreeMap::new();
    let ctx = StrategyContext {
        num_classes: inputs.info.num_classes,
        student_features: &empty,
        teacher_features: &empty,
        train_samples: inputs.info.split_sizes[0],
        seed: 0,
        vb: seeded_var_builder(&VarMap::new(), 2, inputs.dtype, &Device::Cpu),
    };
    let (strategy, config) = match mode {
        Teacher::None => ("baseline", json!({})),
        _ => ("kd", json!({"alpha": 0.1, "temperature": 4.0})),
    };
    let strategy = r.get_strategy(strategy)?.build(&config, ctx)?;
    let vars = named_vars(&varmap).into_iter().map(|(_, v)| v).collect();
    let mut optimizer = Optimizer::new(
        OptimizerConfig::AdamW {
            lr,
            weight_decay: 0.0,
        },
        vars,
    )?;
    let batch = inputs.batch;
    Ok(Step {
        run: Box::new(move || {
            let s = model.forward(&batch.inputs, true)?;
            let live;
            let t = match (&teacher, mode, &cached) {
                (Some(t), Teacher::Live, _) => {
                    live = t.forward(&batch.inputs, false)?;
                    Some(&live)
                }
                (_, Teacher::Cached, Some(c)) => Some(c),
                _ => None,
            };
            let loss = strategy.loss(&s, t, &batch, &StepInfo::default())?;
            optimizer.step(&loss.total.backward()?, lr)?;
            Ok(loss.total.to_dtype(DType::F32)?.to_scalar::<f32>()?)
        }),
    })
}

/// The step `name` of [`STEPS`], built with the models `r` registers.
pub fn build(r: &Registrar, name: &str) -> Result<Step> {
    build_with(r, name, None)
}

/// The step `name` with weights, batch and cached teacher logits from `import` when given (the
/// PyTorch reference's export), so that both sides train the same numbers.
pub fn build_with(r: &Registrar, name: &str, import: Option<&TensorMap>) -> Result<Step> {
    let dev = Device::Cpu;
    let mlp = |hidden: &[usize]| json!({ "hidden": hidden });
    match name {
        "mlp-kd" | "mlp-kd-cached" | "mlp-alone" => {
            let mode = match name {
                "mlp-kd" => Teacher::Live,
                "mlp-kd-cached" => Teacher::Cached,
                _ => Teacher::None,
            };
            let teacher = (mode != Teacher::None).then(|| ("vision.mlp", mlp(&[1200, 1200])));
            step(
                r,
                images(128, (1, 28), &dev)?,
                ("vision.mlp", mlp(&[256, 256])),
                teacher,
                mode,
                1e-3,
                import,
            )
        }
        "cnn-kd" => step(
            r,
            images(128, (1, 28), &dev)?,
            ("vision.lenet5", json!({})),
            Some((
                "vision.lenet5",
                json!({"channels": [32, 64], "hidden": [256, 128]}),
            )),
            Teacher::Live,
            1e-3,
            import,
        ),
        "mobilenet-kd-cached" => step(
            r,
            images(128, (1, 28), &dev)?,
            ("vision.mobilenet", json!({})),
            Some(("vision.mlp", mlp(&[64]))),
            Teacher::Cached,
            1e-3,
            import,
        ),
        "resnet-alone" => step(
            r,
            images(128, (1, 28), &dev)?,
            ("vision.resnet", json!({"width": 16, "blocks": 1})),
            None,
            Teacher::None,
            1e-3,
            import,
        ),
        "resnet20-alone" => step(
            r,
            images(64, (3, 32), &dev)?,
            ("vision.resnet20", json!({})),
            None,
            Teacher::None,
            1e-3,
            import,
        ),
        "minilm-forward" => forward_step(
            r,
            sst2(r, MINILM_BATCH, &dev)?,
            ("nlp.bert", json!({"pretrained": MINILM})),
            import,
        ),
        "minilm-finetune" => step(
            r,
            sst2(r, MINILM_BATCH, &dev)?,
            ("nlp.bert", json!({"pretrained": MINILM, "finetune": "all"})),
            None,
            Teacher::None,
            5e-5,
            import,
        ),
        "transformer-kd-cached" | "bilstm-kd-cached" | "textcnn-kd-cached" => {
            let (model, batch) = match name {
                "transformer-kd-cached" => ("nlp.bert", 32),
                "bilstm-kd-cached" => ("nlp.bilstm", 64),
                _ => ("nlp.textcnn", 64),
            };
            step(
                r,
                sentences(batch, 64, &dev)?,
                (model, json!({})),
                Some(("nlp.textcnn", json!({"filters": 16}))),
                Teacher::Cached,
                1e-3,
                import,
            )
        }
        "neumf-mf-kd" => step(
            r,
            interactions(1024, 2000, 128, &dev)?,
            ("recsys.mf", json!({"dim": 8, "init_std": 0.1})),
            Some(("recsys.neumf", json!({"dim": 16, "layers": [32, 16]}))),
            Teacher::Live,
            1e-2,
            import,
        ),
        other => Err(Error::Invalid(format!(
            "no bench step `{other}`; the steps: {}",
            STEPS.map(|(n, _)| n).join(", ")
        ))),
    }
}

/// The plugin crates the steps need.
pub const PLUGINS: [&str; 4] = [
    "distill_plugin_vision",
    "distill_plugin_nlp",
    "distill_plugin_recsys",
    "distill_plugin_strategies",
];
