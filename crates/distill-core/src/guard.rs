//! Panic containment: every call into plugin code goes through [`contain`], so a panicking plugin
//! fails its operation with [`Error::Panic`] instead of aborting the process.
//!
//! The registrar wraps each factory it receives, and the guarded factories wrap every object they
//! build, so the host never holds an unguarded plugin object. Cheap accessors (summaries, dataset
//! info, FLOPs, frozen variables, teacher needs) are read once, under the guard, and cached.

use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::{Device, Tensor};

use crate::data::{Batch, Dataset, DatasetFactory, DatasetInfo, Split};
use crate::metrics::MetricAccumulator;
use crate::model::{Model, ModelContext, ModelFactory, ModelOutput};
use crate::strategy::{
    LossTerms, StepInfo, Strategy, StrategyContext, StrategyFactory, TeacherNeeds,
};
use crate::{Config, Error, Result, TensorMap};

/// Runs `f`, turning a panic into [`Error::Panic`] tagged with `entry`.
pub fn contain<R>(entry: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            Err(Error::Panic {
                entry: entry.to_string(),
                message,
            })
        }
    }
}

/// A plugin object together with the name it was registered under.
pub(crate) struct Guarded<T: ?Sized> {
    name: String,
    summary: String,
    inner: Box<T>,
}

impl<T: ?Sized> Guarded<T> {
    fn entry(&self, kind: &str, method: &str) -> String {
        format!("{kind} `{}`: {method}", self.name)
    }
}

/// Wraps a dataset factory at registration.
pub(crate) fn dataset_factory(
    name: &str,
    f: Box<dyn DatasetFactory>,
) -> Result<Box<dyn DatasetFactory>> {
    let summary = contain(&format!("dataset `{name}`: summary"), || {
        Ok(f.summary().to_string())
    })?;
    Ok(Box::new(Guarded {
        name: name.to_string(),
        summary,
        inner: f,
    }))
}

/// Wraps a model factory at registration.
pub(crate) fn model_factory(name: &str, f: Box<dyn ModelFactory>) -> Result<Box<dyn ModelFactory>> {
    let summary = contain(&format!("model `{name}`: summary"), || {
        Ok(f.summary().to_string())
    })?;
    Ok(Box::new(Guarded {
        name: name.to_string(),
        summary,
        inner: f,
    }))
}

/// Wraps a strategy factory at registration.
pub(crate) fn strategy_factory(
    name: &str,
    f: Box<dyn StrategyFactory>,
) -> Result<Box<dyn StrategyFactory>> {
    let summary = contain(&format!("strategy `{name}`: summary"), || {
        Ok(f.summary().to_string())
    })?;
    Ok(Box::new(Guarded {
        name: name.to_string(),
        summary,
        inner: f,
    }))
}

impl DatasetFactory for Guarded<dyn DatasetFactory> {
    fn summary(&self) -> &str {
        &self.summary
    }
    /// Asked when listed, not at registration: every worker registers every plugin.
    fn defaults(&self) -> Config {
        contain(&self.entry("dataset", "defaults"), || {
            Ok(self.inner.defaults())
        })
        .unwrap_or(Config::Null)
    }
    fn build(&self, config: &Config) -> Result<Box<dyn Dataset>> {
        contain(&self.entry("dataset", "build"), || {
            let inner = self.inner.build(config)?;
            let info = inner.info().clone();
            let lengths = Split::ALL.map(|split| inner.lengths(split));
            for (split, l) in Split::ALL.iter().zip(&lengths) {
                if let Some(l) = l
                    && l.len() != info.len(*split)
                {
                    return Err(Error::Invalid(format!(
                        "dataset `{}` reports {} lengths for the {} samples of its {} split",
                        self.name,
                        l.len(),
                        info.len(*split),
                        split.name()
                    )));
                }
            }
            let augments = inner.augments();
            Ok(Box::new(GuardedDataset {
                name: self.name.clone(),
                info,
                lengths,
                augments,
                inner,
            }) as Box<dyn Dataset>)
        })
    }
}

struct GuardedDataset {
    name: String,
    info: DatasetInfo,
    /// Asked once, when the dataset is built.
    lengths: [Option<Vec<usize>>; 3],
    /// Asked once, when the dataset is built.
    augments: bool,
    inner: Box<dyn Dataset>,
}

impl Dataset for GuardedDataset {
    fn info(&self) -> &DatasetInfo {
        &self.info
    }
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        contain(&format!("dataset `{}`: batch", self.name), || {
            self.inner.batch(split, indices, device)
        })
    }
    fn lengths(&self, split: Split) -> Option<Vec<usize>> {
        self.lengths[split as usize].clone()
    }
    fn train_batch(
        &self,
        epoch: usize,
        seed: u64,
        indices: &[usize],
        device: &Device,
    ) -> Result<Batch> {
        contain(&format!("dataset `{}`: train_batch", self.name), || {
            self.inner.train_batch(epoch, seed, indices, device)
        })
    }
    fn augments(&self) -> bool {
        self.augments
    }
    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
        contain(&format!("dataset `{}`: metrics", self.name), || {
            let inner = self.inner.metrics()?;
            Ok(Box::new(GuardedMetrics {
                name: self.name.clone(),
                inner,
            }) as Box<dyn MetricAccumulator>)
        })
    }
}

struct GuardedMetrics {
    name: String,
    inner: Box<dyn MetricAccumulator>,
}

impl MetricAccumulator for GuardedMetrics {
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()> {
        let entry = format!("dataset `{}`: metrics update", self.name);
        contain(&entry, || self.inner.update(logits, batch))
    }
    fn finish(&self) -> Result<Vec<(String, f64)>> {
        contain(&format!("dataset `{}`: metrics finish", self.name), || {
            self.inner.finish()
        })
    }
}

impl ModelFactory for Guarded<dyn ModelFactory> {
    fn summary(&self) -> &str {
        &self.summary
    }
    /// Asked when listed, not at registration: every worker registers every plugin.
    fn defaults(&self) -> Config {
        contain(&self.entry("model", "defaults"), || {
            Ok(self.inner.defaults())
        })
        .unwrap_or(Config::Null)
    }
    fn build(&self, config: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        contain(&self.entry("model", "build"), || {
            let inner = self.inner.build(config, ctx)?;
            let flops = inner.flops_per_sample();
            let frozen = inner.frozen_prefixes();
            Ok(Box::new(GuardedModel {
                name: self.name.clone(),
                flops,
                frozen,
                inner,
            }) as Box<dyn Model>)
        })
    }
}

struct GuardedModel {
    name: String,
    flops: u64,
    frozen: Vec<String>,
    inner: Box<dyn Model>,
}

impl Model for GuardedModel {
    fn forward(&self, inputs: &TensorMap, train: bool) -> Result<ModelOutput> {
        contain(&format!("model `{}`: forward", self.name), || {
            self.inner.forward(inputs, train)
        })
    }
    fn flops_per_sample(&self) -> u64 {
        self.flops
    }
    fn frozen_prefixes(&self) -> Vec<String> {
        self.frozen.clone()
    }
}

impl StrategyFactory for Guarded<dyn StrategyFactory> {
    fn summary(&self) -> &str {
        &self.summary
    }
    /// Asked when listed, not at registration: every worker registers every plugin.
    fn defaults(&self) -> Config {
        contain(&self.entry("strategy", "defaults"), || {
            Ok(self.inner.defaults())
        })
        .unwrap_or(Config::Null)
    }
    fn build(&self, config: &Config, ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        contain(&self.entry("strategy", "build"), || {
            let inner = self.inner.build(config, ctx)?;
            let needs = inner.teacher_needs();
            Ok(Box::new(GuardedStrategy {
                name: self.name.clone(),
                needs,
                inner,
            }) as Box<dyn Strategy>)
        })
    }
}

struct GuardedStrategy {
    name: String,
    needs: TeacherNeeds,
    inner: Box<dyn Strategy>,
}

impl Strategy for GuardedStrategy {
    fn teacher_needs(&self) -> TeacherNeeds {
        self.needs.clone()
    }
    fn loss(
        &self,
        student: &ModelOutput,
        teacher: Option<&ModelOutput>,
        batch: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        contain(&format!("strategy `{}`: loss", self.name), || {
            self.inner.loss(student, teacher, batch, step)
        })
    }
    fn end_step(
        &mut self,
        student: &ModelOutput,
        teacher: Option<&ModelOutput>,
        batch: &Batch,
    ) -> Result<()> {
        let entry = format!("strategy `{}`: end_step", self.name);
        contain(&entry, || self.inner.end_step(student, teacher, batch))
    }
    fn end_epoch(&mut self, epoch: usize) -> Result<()> {
        let entry = format!("strategy `{}`: end_epoch", self.name);
        contain(&entry, || self.inner.end_epoch(epoch))
    }
}
