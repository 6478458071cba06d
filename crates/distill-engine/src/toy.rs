//! A tiny task for the engine's own tests: two Gaussian classes in 2-D, a linear model and an
//! MLP, and a strategy that matches the teacher's logits.

use std::collections::BTreeMap;

use distill_rt::candle::{Device, Tensor};
use distill_rt::candle_nn::Init;
use distill_rt::metrics::ClassificationMetrics;
use distill_rt::model::PENULTIMATE;
use distill_rt::rng::Rng;
use distill_rt::strategy::{StepInfo, require_teacher};
use distill_rt::{
    Batch, Config, Dataset, DatasetFactory, DatasetInfo, LossTerms, MetricAccumulator, Model,
    ModelContext, ModelFactory, ModelOutput, Registrar, Result, Split, Strategy, StrategyContext,
    StrategyFactory, TaskKind, TeacherNeeds, TensorMap, ops,
};

pub struct Blobs {
    info: DatasetInfo,
    splits: [(Vec<[f32; 2]>, Vec<u32>); 3],
}

fn blobs(n: usize, rng: &mut Rng) -> (Vec<[f32; 2]>, Vec<u32>) {
    (0..n)
        .map(|_| {
            let y = rng.below(2) as u32;
            let c = if y == 0 { -1.0 } else { 1.0 };
            (
                [
                    (c + 0.7 * rng.normal()) as f32,
                    (c + 0.7 * rng.normal()) as f32,
                ],
                y,
            )
        })
        .unzip()
}

impl Dataset for Blobs {
    fn info(&self) -> &DatasetInfo {
        &self.info
    }
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        let (x, y) = &self.splits[split as usize];
        let xs: Vec<f32> = indices.iter().flat_map(|&i| x[i]).collect();
        let ys: Vec<u32> = indices.iter().map(|&i| y[i]).collect();
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        Ok(Batch {
            inputs: BTreeMap::from([(
                "x".to_string(),
                Tensor::from_vec(xs, (indices.len(), 2), device)?,
            )]),
            targets: Tensor::from_vec(ys, indices.len(), device)?,
            soft_targets: None,
            indices: Tensor::from_vec(idx, indices.len(), device)?,
        })
    }
    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
        Ok(Box::new(ClassificationMetrics::new(2)))
    }
}

pub struct BlobsFactory;

impl DatasetFactory for BlobsFactory {
    fn summary(&self) -> &str {
        "two Gaussian blobs"
    }
    fn build(&self, _c: &Config) -> Result<Box<dyn Dataset>> {
        let mut rng = Rng::new(99);
        let splits = [
            blobs(400, &mut rng),
            blobs(100, &mut rng),
            blobs(100, &mut rng),
        ];
        let info = DatasetInfo {
            task: TaskKind::Classification,
            num_classes: 2,
            inputs: BTreeMap::from([("x".to_string(), vec![2])]),
            cardinality: BTreeMap::new(),
            split_sizes: [400, 100, 100],
            primary_metric: "accuracy".into(),
        };
        Ok(Box::new(Blobs { info, splits }))
    }
}

/// A one-hidden-layer MLP (`hidden` 0 means linear).
pub struct Mlp {
    layers: Vec<(Tensor, Tensor)>,
}

pub struct MlpFactory(pub usize);

impl ModelFactory for MlpFactory {
    fn summary(&self) -> &str {
        "toy mlp"
    }
    fn build(&self, _c: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        let widths = if self.0 == 0 {
            vec![2, 2]
        } else {
            vec![2, self.0, 2]
        };
        let mut layers = Vec::new();
        for (i, w) in widths.windows(2).enumerate() {
            let init = Init::Uniform { lo: -0.5, up: 0.5 };
            let vb = ctx.vb.pp(format!("l{i}"));
            layers.push((
                vb.get_with_hints((w[1], w[0]), "weight", init)?,
                vb.get_with_hints(w[1], "bias", init)?,
            ));
        }
        Ok(Box::new(Mlp { layers }))
    }
}

impl Model for Mlp {
    fn forward(&self, inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        let mut x = inputs["x"].clone();
        let mut pen = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            if i > 0 {
                x = x.relu()?;
                pen = x.clone();
            }
            x = x.matmul(&w.t()?)?.broadcast_add(b)?;
        }
        Ok(ModelOutput {
            logits: x,
            features: BTreeMap::from([(PENULTIMATE.to_string(), pen)]),
        })
    }
    fn flops_per_sample(&self) -> u64 {
        self.layers.iter().map(|(w, _)| w.elem_count() as u64).sum()
    }
}

/// `0.5 * ||s - t||^2 / batch` on logits: needs the teacher's logits (cacheable).
pub struct MatchLogits;

impl Strategy for MatchLogits {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::logits()
    }
    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        b: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher("match", t)?;
        let n = s.logits.dim(0)? as f64;
        let m = ((&s.logits - &t.logits)?.sqr()?.sum_all()? * (0.5 / n))?;
        let ce = ops::cross_entropy(&s.logits, &b.targets)?;
        LossTerms::sum([("match", m), ("ce", ce)])
    }
}

pub struct MatchLogitsFactory;

impl StrategyFactory for MatchLogitsFactory {
    fn summary(&self) -> &str {
        "match teacher logits"
    }
    fn build(&self, _c: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        Ok(Box::new(MatchLogits))
    }
}

/// A registrar with the toy task.
pub fn registrar() -> Result<Registrar> {
    let mut r = Registrar::new();
    r.dataset("toy.blobs", BlobsFactory)?;
    r.model("toy.linear", MlpFactory(0))?;
    r.model("toy.mlp", MlpFactory(16))?;
    r.strategy("toy.match", MatchLogitsFactory)?;
    Ok(r)
}
