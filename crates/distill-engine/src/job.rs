//! One planned job — train (or load) a teacher and cache its outputs, or train a student with a
//! strategy — and the record it leaves. Jobs are plain data (JSON), so that the orchestrator can
//! plan and content-address them and a fresh worker process can run each one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use distill_rt::candle::{DType, Device, Tensor, Var};
use distill_rt::candle_nn::VarMap;
use distill_rt::init::{frozen_var_builder, seeded_var_builder};
use distill_rt::serde::{Deserialize, Serialize};
use distill_rt::strategy::combine_teachers;
use distill_rt::testing::{named_vars, split_frozen};
use distill_rt::{
    Config, Dataset, Error, Model, ModelContext, Registrar, Result, Split, StrategyContext,
    serde_json, tracing,
};

use crate::cache::TeacherCache;
use crate::train::{
    EpochRecord, FitInputs, StopReason, Supervised, TeacherOutputs, TeacherSource, TrainConfig,
    evaluate, fit, metric,
};

/// A registered name with its configuration table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
pub struct Component {
    /// The registered name (`vision.resnet`, `kd`).
    pub name: String,
    /// Its configuration table.
    #[serde(default)]
    pub config: Config,
}

/// The teacher a student job learns from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
pub struct TeacherInput {
    /// The teacher's model.
    pub model: Component,
    /// The folder of the teacher job (weights, cache, record).
    pub dir: PathBuf,
}

/// What a job does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    crate = "distill_rt::serde",
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Job {
    /// Train (or load) a teacher, save its weights and cache its outputs on the training split.
    Teacher {
        /// The data.
        dataset: Component,
        /// The teacher model.
        model: Component,
        /// How to train it.
        train: TrainConfig,
        /// Seed of initialisation and shuffling.
        seed: u64,
        /// Teacher features to cache besides logits.
        cache_features: Vec<String>,
        /// Pretrained weights (safetensors) to load instead of training.
        #[serde(default)]
        weights: Option<PathBuf>,
    },
    /// Train a student with a strategy.
    Student {
        /// The data.
        dataset: Component,
        /// The student model.
        model: Component,
        /// The strategy.
        strategy: Component,
        /// The teachers: none, one, or several that teach together (the strategy receives
        /// their outputs combined, [`distill_rt::strategy::combine_teachers`]).
        #[serde(default)]
        teachers: Vec<TeacherInput>,
        /// How to train.
        train: TrainConfig,
        /// Seed of initialisation and shuffling.
        seed: u64,
        /// Its place in a born-again chain (1 learns from a trained model of its own
        /// architecture, 2 from generation 1, ...); `None` outside a chain.
        #[serde(default)]
        generation: Option<usize>,
    },
}

/// The engine's code version: the sources of the engine, the core and the runtime crate, the
/// lock file and the toolchain (`build.rs`, ARCHITECTURE.md, "Job identity").
pub const ENGINE_VERSION: &str = concat!("engine:", env!("DISTILL_ENGINE_CODE_VERSION"));

/// The code that computes a job: the engine's version and, for each component, the version of
/// the plugin that registered it (`<plugin>:<hex>`). Part of the job's identity, and of its
/// record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
pub struct CodeVersions {
    /// [`ENGINE_VERSION`] of the build that runs the job.
    pub engine: String,
    /// The dataset's plugin.
    pub dataset: String,
    /// The model's plugin.
    pub model: String,
    /// The strategy's plugin (student jobs).
    #[serde(default)]
    pub strategy: Option<String>,
}

/// A job with its identity and output folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
pub struct JobSpec {
    /// Content address of the job: a hash of its resolved configuration, its teachers' ids and
    /// the versions of the code that computes it.
    pub id: String,
    /// The same hash without the code versions (teachers by their `spec_id`): equal for the same
    /// job computed by other code, so that `--reuse-stale` can find it.
    #[serde(default)]
    pub spec_id: Option<String>,
    /// The code the job was planned for; the worker refuses to run it with other code.
    #[serde(default)]
    pub code: Option<CodeVersions>,
    /// The experiment it belongs to.
    pub experiment: String,
    /// Where it writes weights, cache and record.
    pub out_dir: PathBuf,
    /// What it does.
    pub job: Job,
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", rename_all = "snake_case")]
pub enum Status {
    /// Trained and evaluated.
    Ok,
    /// The loss became NaN or infinite.
    Diverged,
    /// An error, a contained panic, a crash or a time-out.
    Failed,
}

/// What a job leaves behind: one record (`record.json` in its folder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde")]
pub struct JobRecord {
    /// The job's content address.
    pub id: String,
    /// The experiment.
    pub experiment: String,
    /// `teacher` or `student`.
    pub kind: String,
    /// Dataset name.
    pub dataset: String,
    /// Model name (the teacher's for a teacher job, the student's otherwise).
    pub model: String,
    /// Strategy name (student jobs).
    pub strategy: Option<String>,
    /// Teacher model name (student jobs with a teacher; several joined by ` + `).
    pub teacher: Option<String>,
    /// The resolved configuration: dataset, model, strategy and train tables.
    pub params: serde_json::Value,
    /// The code that computed it (absent in records older than code versions).
    #[serde(default)]
    pub code: Option<CodeVersions>,
    /// Seed.
    pub seed: u64,
    /// How it ended.
    pub status: Status,
    /// The error, for failed jobs.
    pub error: Option<String>,
    /// Why training stopped.
    pub stop: Option<StopReason>,
    /// Name of the primary metric.
    pub primary_metric: String,
    /// Test primary metric at the epoch with the best validation metric.
    pub best_metric: Option<f64>,
    /// Test primary metric after the last epoch.
    pub final_metric: Option<f64>,
    /// Best validation primary metric.
    pub best_validation: Option<f64>,
    /// The epoch of `best_validation`.
    pub best_epoch: Option<usize>,
    /// The teacher's test primary metric (`best_metric` of its job; the best of several).
    pub teacher_metric: Option<f64>,
    /// Where the student's teacher outputs came from: `cache`, `live` or `none` (per teacher,
    /// joined by ` + `, for several).
    pub teacher_outputs: Option<String>,
    /// Trainable and frozen parameters of the model.
    pub parameters: u64,
    /// Parameters of the teacher (of all teachers together, for several).
    pub teacher_parameters: Option<u64>,
    /// Multiply-accumulates of one forward pass per sample.
    pub flops_per_sample: u64,
    /// Inference milliseconds per sample at batch 1 (median of 21 timed forward passes).
    pub latency_ms_batch1: Option<f64>,
    /// Inference milliseconds per sample at batch 64 (median of 7; records before the batch-1
    /// figure call it `latency_ms_per_sample`).
    #[serde(alias = "latency_ms_per_sample")]
    pub latency_ms_batch64: Option<f64>,
    /// Size of the model's safetensors file.
    pub model_bytes: u64,
    /// Epochs that ran.
    pub epochs_run: usize,
    /// Wall time of the job.
    pub wall_seconds: f64,
    /// Start, seconds since the Unix epoch (UTC).
    pub started_at: f64,
    /// End, seconds since the Unix epoch (UTC).
    pub finished_at: f64,
    /// Per-epoch loss terms and metrics.
    pub epochs: Vec<EpochRecord>,
    /// The files the job wrote (weights, teacher cache) with their size and SHA-256: a file that
    /// no longer matches is never read as this job's output.
    #[serde(default)]
    pub files: BTreeMap<String, FileDigest>,
}

/// Size and SHA-256 of a file a record vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields)]
pub struct FileDigest {
    /// Bytes.
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl FileDigest {
    /// The digest of the file at `path`.
    pub fn of(path: &Path) -> Result<Self> {
        let (size, sha256) =
            distill_data::sha256_file(path).map_err(|e| Error::data(path, e.to_string()))?;
        Ok(Self { size, sha256 })
    }
}

/// Checks that the file `name` in the job folder `dir` is the one `record` lists; a record
/// older than digests lists none and vouches for nothing.
pub fn verify_file(record: &JobRecord, dir: &Path, name: &str) -> Result<()> {
    let Some(want) = record.files.get(name) else {
        return Ok(());
    };
    let path = dir.join(name);
    let got = FileDigest::of(&path)?;
    if &got != want {
        return Err(Error::data(
            &path,
            format!(
                "does not match the record of job {} ({} bytes, sha256 {}; the file has {} \
                 bytes, sha256 {}): it is truncated or corrupted; `cargo xtask run` computes it \
                 again",
                record.id, want.size, want.sha256, got.size, got.sha256
            ),
        ));
    }
    Ok(())
}

/// File names inside a job folder.
pub const RECORD_FILE: &str = "record.json";
/// The model's weights.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// The teacher-output cache (teacher jobs).
pub const CACHE_FILE: &str = "cache.safetensors";

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Writes `value` as JSON to `path` atomically (temporary file, then rename).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let text = serde_json::to_vec_pretty(value).map_err(|e| Error::data(path, e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| Error::data(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::data(path, e.to_string()))
}

/// Reads the record of a finished job.
pub fn read_record(dir: &Path) -> Result<JobRecord> {
    let path = dir.join(RECORD_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::data(&path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| Error::data(&path, e.to_string()))
}

/// A record for `spec` with nothing measured yet.
pub fn empty_record(spec: &JobSpec) -> JobRecord {
    let (kind, dataset, model, strategy, teacher, seed, params) = match &spec.job {
        Job::Teacher {
            dataset,
            model,
            train,
            seed,
            ..
        } => (
            "teacher",
            dataset,
            model,
            None,
            None,
            *seed,
            serde_json::json!({"dataset": dataset.config, "model": model.config, "train": train}),
        ),
        Job::Student {
            dataset,
            model,
            strategy,
            teachers,
            train,
            seed,
            generation,
        } => (
            "student",
            dataset,
            model,
            Some(strategy.name.clone()),
            (!teachers.is_empty()).then(|| {
                teachers
                    .iter()
                    .map(|t| t.model.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" + ")
            }),
            *seed,
            serde_json::json!({"dataset": dataset.config, "model": model.config, "strategy": strategy.config,
                               "teacher": match teachers.as_slice() {
                                   [] => serde_json::Value::Null,
                                   [t] => t.model.config.clone(),
                                   several => several.iter().map(|t| t.model.config.clone()).collect(),
                               },
                               "train": train, "generation": generation}),
        ),
    };
    JobRecord {
        id: spec.id.clone(),
        experiment: spec.experiment.clone(),
        kind: kind.into(),
        dataset: dataset.name.clone(),
        model: model.name.clone(),
        strategy,
        teacher,
        params,
        code: spec.code.clone(),
        seed,
        status: Status::Failed,
        error: None,
        stop: None,
        primary_metric: String::new(),
        best_metric: None,
        final_metric: None,
        best_validation: None,
        best_epoch: None,
        teacher_metric: None,
        teacher_outputs: None,
        parameters: 0,
        teacher_parameters: None,
        flops_per_sample: 0,
        latency_ms_batch1: None,
        latency_ms_batch64: None,
        model_bytes: 0,
        epochs_run: 0,
        wall_seconds: 0.0,
        started_at: now(),
        finished_at: now(),
        epochs: Vec::new(),
        files: BTreeMap::new(),
    }
}

/// A model built from its component, with its variables.
struct Built {
    model: Box<dyn Model>,
    varmap: VarMap,
}

fn build_model(
    registrar: &Registrar,
    c: &Component,
    dataset: &dyn Dataset,
    seed: u64,
    device: &Device,
) -> Result<Built> {
    let varmap = VarMap::new();
    let ctx = ModelContext {
        dataset: dataset.info(),
        seed,
        vb: seeded_var_builder(&varmap, seed, DType::F32, device),
    };
    let model = registrar.get_model(&c.name)?.build(&c.config, ctx)?;
    Ok(Built { model, varmap })
}

/// Builds the job's dataset and model, and records what is known before training.
fn prepare(
    registrar: &Registrar,
    dataset: &Component,
    model: &Component,
    seed: u64,
    device: &Device,
    record: &mut JobRecord,
) -> Result<(Box<dyn Dataset>, Built)> {
    let data = registrar
        .get_dataset(&dataset.name)?
        .build(&dataset.config)?;
    record.primary_metric = data.info().primary_metric.clone();
    let built = build_model(registrar, model, &*data, seed, device)?;
    record.parameters = parameter_count(&built.varmap);
    record.flops_per_sample = built.model.flops_per_sample();
    Ok((data, built))
}

/// Parameters, not buffers (running statistics), as PyTorch's `parameters()` counts them.
fn parameter_count(varmap: &VarMap) -> u64 {
    named_vars(varmap)
        .iter()
        .filter(|(name, _)| !distill_rt::nn::is_buffer(name))
        .map(|(_, v)| v.as_tensor().elem_count() as u64)
        .sum()
}

/// Median milliseconds per sample of `repeats` timed forward passes of the first `batch` test
/// samples (one untimed pass first).
fn latency_ms(
    model: &dyn Model,
    dataset: &dyn Dataset,
    device: &Device,
    batch: usize,
    repeats: usize,
) -> Result<Option<f64>> {
    let n = dataset.info().len(Split::Test).min(batch);
    if n == 0 || repeats == 0 {
        return Ok(None);
    }
    let batch = dataset.batch(Split::Test, &(0..n).collect::<Vec<_>>(), device)?;
    model.forward(&batch.inputs, false)?;
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            model
                .forward(&batch.inputs, false)
                .map(|_| t.elapsed().as_secs_f64() * 1000.0 / n as f64)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(Some(times[repeats / 2]))
}

/// Fills both latency figures of `record`.
fn record_latency(
    record: &mut JobRecord,
    model: &dyn Model,
    dataset: &dyn Dataset,
    device: &Device,
) -> Result<()> {
    record.latency_ms_batch1 = latency_ms(model, dataset, device, 1, 21)?;
    record.latency_ms_batch64 = latency_ms(model, dataset, device, 64, 7)?;
    Ok(())
}

/// The largest of the known values (several teachers: the strongest one's metric).
fn best(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.flatten().reduce(f64::max)
}

/// A finished teacher job's model, built on its trained weights as constants (it records no
/// backward graph), and its record.
fn load_teacher(
    registrar: &Registrar,
    t: &TeacherInput,
    data: &dyn Dataset,
    device: &Device,
) -> Result<(Box<dyn Model>, JobRecord)> {
    let teacher_record = read_record(&t.dir)?;
    if teacher_record.status != Status::Ok {
        return Err(Error::Invalid(format!(
            "teacher job {} ended as {:?}",
            teacher_record.id, teacher_record.status
        )));
    }
    verify_file(&teacher_record, &t.dir, WEIGHTS_FILE)?;
    let path = t.dir.join(WEIGHTS_FILE);
    let weights = distill_rt::weights::load(&path, device)?;
    let ctx = ModelContext {
        dataset: data.info(),
        seed: 0,
        vb: frozen_var_builder(weights, DType::F32, device),
    };
    let model = registrar
        .get_model(&t.model.name)?
        .build(&t.model.config, ctx)
        .map_err(|e| Error::data(&path, format!("building the teacher on these weights: {e}")))?;
    Ok((model, teacher_record))
}

/// The teacher job's cache in `dir` when it holds `features` for all `n_train` training samples
/// of `dataset` (a student that teaches the next born-again generation leaves weights and no
/// cache; a teacher trained on another configuration of the dataset, more labelled samples for
/// example, cached the outputs of its own training samples).
fn usable_cache(
    record: &JobRecord,
    dir: &Path,
    dataset: &Component,
    features: &[String],
    n_train: usize,
    device: &Device,
) -> Result<Option<TeacherCache>> {
    let path = dir.join(CACHE_FILE);
    let same_samples =
        record.dataset == dataset.name && record.params.get("dataset") == Some(&dataset.config);
    if !same_samples || !path.is_file() {
        return Ok(None);
    }
    verify_file(record, dir, CACHE_FILE)?;
    let cache = TeacherCache::load(&path, device)?;
    let probe = cache.outputs_for(&Tensor::new(&[0u32], device)?)?;
    let has_all = features.iter().all(|f| probe.features.contains_key(f));
    Ok((has_all && cache.samples()? == n_train).then_some(cache))
}

/// Saves the weights and lists them, with their digest, in the record.
fn save_weights(varmap: &VarMap, path: &Path, record: &mut JobRecord) -> Result<()> {
    varmap
        .save(path)
        .map_err(|e| Error::data(path, e.to_string()))?;
    record
        .files
        .insert(WEIGHTS_FILE.into(), FileDigest::of(path)?);
    Ok(())
}

/// Fills the training results of `record` from `outcome`.
fn record_outcome(record: &mut JobRecord, outcome: crate::train::Outcome) {
    let primary = record.primary_metric.clone();
    record.status = match outcome.stop {
        StopReason::Diverged { step } => {
            record.error = Some(format!(
                "diverged: the loss or a gradient was NaN or infinite at optimizer step {step} \
                 (zero-based)"
            ));
            Status::Diverged
        }
        _ => Status::Ok,
    };
    record.best_epoch = outcome.best_epoch;
    if let Some(b) = outcome.best_epoch.and_then(|b| outcome.epochs.get(b)) {
        record.best_metric = metric(&b.test, &primary);
        record.best_validation = metric(&b.validation, &primary);
    }
    record.final_metric = outcome
        .epochs
        .iter()
        .rev()
        .find_map(|e| metric(&e.test, &primary));
    record.epochs_run = outcome.epochs.len();
    record.epochs = outcome.epochs;
    record.stop = Some(outcome.stop);
}

/// Runs `spec` and returns its record (also for a failed job: the error is in the record).
/// Files go to `spec.out_dir`; the record is written by the caller.
pub fn run_job(registrar: &Registrar, spec: &JobSpec, device: &Device) -> JobRecord {
    distill_rt::kernels::on_pool(|| run_job_here(registrar, spec, device))
}

/// [`run_job`] on the calling thread.
fn run_job_here(registrar: &Registrar, spec: &JobSpec, device: &Device) -> JobRecord {
    let started = Instant::now();
    let mut record = empty_record(spec);
    if let Err(e) = run_job_inner(registrar, spec, device, &mut record) {
        tracing::error!(job = %spec.id, error = %e, "job failed");
        record.status = Status::Failed;
        record.error = Some(e.to_string());
    }
    record.wall_seconds = started.elapsed().as_secs_f64();
    record.finished_at = now();
    record
}

fn run_job_inner(
    registrar: &Registrar,
    spec: &JobSpec,
    device: &Device,
    record: &mut JobRecord,
) -> Result<()> {
    std::fs::create_dir_all(&spec.out_dir)
        .map_err(|e| Error::data(&spec.out_dir, e.to_string()))?;
    let weights_path = spec.out_dir.join(WEIGHTS_FILE);
    match &spec.job {
        Job::Teacher {
            dataset,
            model,
            train,
            seed,
            cache_features,
            weights,
        } => {
            let (data, mut built) = prepare(registrar, dataset, model, *seed, device, record)?;
            match weights {
                Some(path) => {
                    built
                        .varmap
                        .load(path)
                        .map_err(|e| Error::data(path, e.to_string()))?;
                    let test = evaluate(
                        &*data,
                        &*built.model,
                        Split::Test,
                        train.eval_batch_size,
                        device,
                    )?;
                    let val = evaluate(
                        &*data,
                        &*built.model,
                        Split::Validation,
                        train.eval_batch_size,
                        device,
                    )?;
                    record.status = Status::Ok;
                    record.best_metric = metric(&test, &record.primary_metric);
                    record.final_metric = record.best_metric;
                    record.best_validation = metric(&val, &record.primary_metric);
                }
                None => {
                    let (trainable, _) =
                        split_frozen(named_vars(&built.varmap), &built.model.frozen_prefixes());
                    let inputs = FitInputs {
                        dataset: &*data,
                        model: &*built.model,
                        strategy: &mut Supervised,
                        teachers: Vec::new(),
                        vars: trainable.into_iter().map(|(_, v)| v).collect(),
                        teacher_metric: None,
                        seed: *seed,
                        device,
                    };
                    let outcome = fit(inputs, train)?;
                    record_outcome(record, outcome);
                }
            }
            save_weights(&built.varmap, &weights_path, record)?;
            if record.status == Status::Ok {
                let cache = TeacherCache::compute(
                    &*built.model,
                    &*data,
                    cache_features,
                    train.eval_batch_size,
                    device,
                )?;
                let path = spec.out_dir.join(CACHE_FILE);
                cache.save(&path)?;
                record
                    .files
                    .insert(CACHE_FILE.into(), FileDigest::of(&path)?);
            }
            record_latency(record, &*built.model, &*data, device)?;
        }
        Job::Student {
            dataset,
            model,
            strategy,
            teachers,
            train,
            seed,
            ..
        } => {
            let (data, built) = prepare(registrar, dataset, model, *seed, device, record)?;
            // Feature shapes, from one forward pass on two training samples.
            let probe_batch = data.batch(
                Split::Train,
                &[0, 1.min(data.info().len(Split::Train).saturating_sub(1))],
                device,
            )?;
            let student_features = built
                .model
                .forward(&probe_batch.inputs, false)?
                .feature_shapes();
            let teacher_models = teachers
                .iter()
                .map(|t| load_teacher(registrar, t, &*data, device))
                .collect::<Result<Vec<_>>>()?;
            if !teacher_models.is_empty() {
                record.teacher_metric = best(teacher_models.iter().map(|(_, r)| r.best_metric));
                record.teacher_parameters =
                    Some(teacher_models.iter().map(|(_, r)| r.parameters).sum());
            }
            let teacher_features = if teacher_models.is_empty() {
                BTreeMap::new()
            } else {
                let outputs = teacher_models
                    .iter()
                    .map(|(teacher, _)| teacher.forward(&probe_batch.inputs, false))
                    .collect::<Result<Vec<_>>>()?;
                combine_teachers(outputs)?.feature_shapes()
            };
            let strategy_vars = VarMap::new();
            let ctx = StrategyContext {
                num_classes: data.info().num_classes,
                student_features: &student_features,
                teacher_features: &teacher_features,
                train_samples: data.info().len(Split::Train),
                seed: *seed,
                vb: seeded_var_builder(&strategy_vars, seed.wrapping_add(1), DType::F32, device),
            };
            let mut strat = registrar
                .get_strategy(&strategy.name)?
                .build(&strategy.config, ctx)?;
            let needs = strat.teacher_needs();
            if needs.teacher && teacher_models.is_empty() {
                return Err(Error::Invalid(format!(
                    "strategy `{}` needs a teacher, and the job has none",
                    strategy.name
                )));
            }
            let n_train = data.info().len(Split::Train);
            let augments = data.augments();
            let try_cache = needs.teacher
                && match train.teacher_outputs {
                    TeacherOutputs::Auto => !needs.live && !augments,
                    TeacherOutputs::Live => false,
                    TeacherOutputs::Cache if needs.live => {
                        return Err(Error::config(
                            "train",
                            "teacher_outputs",
                            format!(
                                "is `cache`, and strategy `{}` needs a live teacher",
                                strategy.name
                            ),
                        ));
                    }
                    TeacherOutputs::Cache => true,
                };
            let caches = teachers
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if !try_cache {
                        return Ok(None);
                    }
                    let cache = usable_cache(
                        &teacher_models[i].1,
                        &t.dir,
                        dataset,
                        &needs.of_teacher(i, teachers.len()),
                        n_train,
                        device,
                    )?;
                    if cache.is_none() && train.teacher_outputs == TeacherOutputs::Cache {
                        return Err(Error::config(
                            "train",
                            "teacher_outputs",
                            format!(
                                "is `cache`, and teacher job {} has no cache of this job's \
                                 training samples with the outputs strategy `{}` reads (a \
                                 teacher trained on other dataset settings runs live)",
                                teacher_models[i].1.id, strategy.name
                            ),
                        ));
                    }
                    Ok(cache)
                })
                .collect::<Result<Vec<_>>>()?;
            let sources: Vec<TeacherSource<'_>> = if needs.teacher {
                teacher_models
                    .iter()
                    .zip(&caches)
                    .map(|((teacher, _), cache)| match cache {
                        Some(c) => TeacherSource::Cached(c),
                        None => TeacherSource::Live(&**teacher),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            record.teacher_outputs = Some(if sources.is_empty() {
                "none".into()
            } else {
                sources
                    .iter()
                    .map(|source| source.name(augments))
                    .collect::<Vec<_>>()
                    .join(" + ")
            });
            let (trainable, _) =
                split_frozen(named_vars(&built.varmap), &built.model.frozen_prefixes());
            let mut vars: Vec<Var> = trainable.into_iter().map(|(_, v)| v).collect();
            vars.extend(named_vars(&strategy_vars).into_iter().map(|(_, v)| v));
            let inputs = FitInputs {
                dataset: &*data,
                model: &*built.model,
                strategy: &mut *strat,
                teachers: sources,
                vars,
                teacher_metric: best(teacher_models.iter().map(|(_, r)| r.best_validation)),
                seed: *seed,
                device,
            };
            let outcome = fit(inputs, train)?;
            record_outcome(record, outcome);
            save_weights(&built.varmap, &weights_path, record)?;
            record_latency(record, &*built.model, &*data, device)?;
        }
    }
    record.model_bytes = std::fs::metadata(&weights_path)
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimizerConfig;
    use crate::toy;

    fn component(name: &str) -> Component {
        Component {
            name: name.into(),
            config: Config::Null,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("distill-engine-{tag}-{}", std::process::id()))
    }

    fn train() -> TrainConfig {
        TrainConfig {
            epochs: 3,
            batch_size: 32,
            optimizer: OptimizerConfig::AdamW {
                lr: 0.05,
                weight_decay: 0.0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn teacher_then_student_from_the_cache() -> Result<()> {
        let r = toy::registrar()?;
        let root = temp_dir("jobs");
        let teacher_spec = JobSpec {
            id: "t1".into(),
            spec_id: None,
            code: None,
            experiment: "toy".into(),
            out_dir: root.join("t1"),
            job: Job::Teacher {
                dataset: component("toy.blobs"),
                model: component("toy.mlp"),
                train: train(),
                seed: 0,
                cache_features: vec!["penultimate".into()],
                weights: None,
            },
        };
        let t = run_job(&r, &teacher_spec, &Device::Cpu);
        assert_eq!((t.status, t.error.as_deref()), (Status::Ok, None));
        assert_eq!(
            (t.kind.as_str(), t.epochs_run, t.parameters),
            ("teacher", 3, 2 * 16 + 16 + 16 * 2 + 2)
        );
        assert!(
            t.best_metric.unwrap_or(0.0) > 0.85 && t.model_bytes > 0 && t.flops_per_sample == 64
        );
        write_json_atomic(&root.join("t1").join(RECORD_FILE), &t)?;
        let cache = TeacherCache::load(&root.join("t1").join(CACHE_FILE), &Device::Cpu)?;
        assert_eq!(cache.samples()?, 400);
        assert_eq!(
            cache
                .outputs_for(&Tensor::new(&[3u32], &Device::Cpu)?)?
                .features["penultimate"]
                .dims(),
            &[1, 16]
        );

        let student_spec = JobSpec {
            id: "s1".into(),
            spec_id: None,
            code: None,
            experiment: "toy".into(),
            out_dir: root.join("s1"),
            job: Job::Student {
                dataset: component("toy.blobs"),
                model: component("toy.linear"),
                strategy: component("toy.match"),
                teachers: vec![TeacherInput {
                    model: component("toy.mlp"),
                    dir: root.join("t1"),
                }],
                train: train(),
                seed: 0,
                generation: None,
            },
        };
        let s = run_job(&r, &student_spec, &Device::Cpu);
        assert_eq!((s.status, s.error.as_deref()), (Status::Ok, None));
        assert_eq!(s.teacher_metric, t.best_metric);
        assert_eq!(s.teacher_parameters, Some(t.parameters));
        assert_eq!(s.strategy.as_deref(), Some("toy.match"));
        assert_eq!(s.teacher_outputs.as_deref(), Some("cache"));
        let terms: Vec<&str> = s.epochs[0].train.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(terms, ["total", "match", "ce"]);
        assert!(s.best_metric.unwrap_or(0.0) > 0.8);
        // Same spec, same record values (determinism through the whole job).
        let again = run_job(&r, &student_spec, &Device::Cpu);
        assert_eq!(again.epochs, s.epochs);

        // Two teachers together: a second, linear teacher; the strategy sees their mean logits.
        let mut second = teacher_spec.clone();
        second.id = "t2".into();
        second.out_dir = root.join("t2");
        if let Job::Teacher { model, seed, .. } = &mut second.job {
            *model = component("toy.linear");
            *seed = 1;
        }
        let t2 = run_job(&r, &second, &Device::Cpu);
        assert_eq!((t2.status, t2.error.as_deref()), (Status::Ok, None));
        write_json_atomic(&root.join("t2").join(RECORD_FILE), &t2)?;
        let mut both = student_spec.clone();
        both.out_dir = root.join("s2");
        if let Job::Student { teachers, .. } = &mut both.job {
            teachers.push(TeacherInput {
                model: component("toy.linear"),
                dir: root.join("t2"),
            });
        }
        let s2 = run_job(&r, &both, &Device::Cpu);
        assert_eq!((s2.status, s2.error.as_deref()), (Status::Ok, None));
        assert_eq!(s2.teacher.as_deref(), Some("toy.mlp + toy.linear"));
        assert_eq!(s2.teacher_outputs.as_deref(), Some("cache + cache"));
        assert_eq!(s2.teacher_parameters, Some(t.parameters + t2.parameters));
        assert_eq!(
            s2.teacher_metric,
            t.best_metric.zip(t2.best_metric).map(|(a, b)| a.max(b))
        );
        assert_ne!(
            s2.epochs, s.epochs,
            "the second teacher changes the matched logits"
        );

        // A teacher trained on other settings of the dataset (as many samples: the toy ignores
        // the key) cached its own training samples' outputs: its students run it live, and
        // asking for the cache is an error that says why.
        let mut other = teacher_spec.clone();
        other.id = "t3".into();
        other.out_dir = root.join("t3");
        if let Job::Teacher { dataset, .. } = &mut other.job {
            dataset.config = serde_json::json!({"max_train": 400});
        }
        let t3 = run_job(&r, &other, &Device::Cpu);
        assert_eq!((t3.status, t3.error.as_deref()), (Status::Ok, None));
        write_json_atomic(&root.join("t3").join(RECORD_FILE), &t3)?;
        let mut taught = student_spec.clone();
        taught.out_dir = root.join("s3");
        if let Job::Student { teachers, .. } = &mut taught.job {
            teachers[0].dir = root.join("t3");
        }
        let s3 = run_job(&r, &taught, &Device::Cpu);
        assert_eq!((s3.status, s3.error.as_deref()), (Status::Ok, None));
        assert_eq!(s3.teacher_outputs.as_deref(), Some("live"));
        if let Job::Student { train, .. } = &mut taught.job {
            train.teacher_outputs = TeacherOutputs::Cache;
        }
        let refused = run_job(&r, &taught, &Device::Cpu);
        assert_eq!(refused.status, Status::Failed);
        assert!(
            refused
                .error
                .as_deref()
                .unwrap_or("")
                .contains("a teacher trained on other dataset settings runs live"),
            "{:?}",
            refused.error
        );
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn a_failing_job_records_its_error() -> Result<()> {
        let r = toy::registrar()?;
        let spec = JobSpec {
            id: "bad".into(),
            spec_id: None,
            code: None,
            experiment: "toy".into(),
            out_dir: temp_dir("bad"),
            job: Job::Student {
                dataset: component("toy.blobs"),
                model: component("toy.linear"),
                strategy: component("toy.match"),
                teachers: Vec::new(),
                train: train(),
                seed: 0,
                generation: None,
            },
        };
        let rec = run_job(&r, &spec, &Device::Cpu);
        assert_eq!(rec.status, Status::Failed);
        assert!(
            rec.error
                .as_deref()
                .unwrap_or("")
                .contains("needs a teacher"),
            "{:?}",
            rec.error
        );
        let unknown = JobSpec {
            job: Job::Teacher {
                dataset: component("toy.blob"),
                model: component("toy.mlp"),
                train: train(),
                seed: 0,
                cache_features: vec![],
                weights: None,
            },
            ..spec.clone()
        };
        let rec = run_job(&r, &unknown, &Device::Cpu);
        assert!(
            rec.error
                .as_deref()
                .unwrap_or("")
                .contains("did you mean `toy.blobs`"),
            "{:?}",
            rec.error
        );
        let _ = std::fs::remove_dir_all(&spec.out_dir);
        Ok(())
    }
}
