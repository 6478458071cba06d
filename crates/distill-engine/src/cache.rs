//! The teacher-output cache: the teacher's logits and the features strategies ask for, computed
//! once on the training split and stored as safetensors, so that a student job reads them
//! instead of running the teacher on every batch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use distill_rt::candle::{Device, Tensor};
use distill_rt::{Dataset, Error, Model, ModelOutput, Result, Split};

use crate::batching::evaluation_order;

const LOGITS: &str = "logits";
const FEATURE_PREFIX: &str = "feature.";

/// Teacher outputs for every training sample, indexed by sample index.
pub struct TeacherCache {
    logits: Tensor,
    features: BTreeMap<String, Tensor>,
}

impl TeacherCache {
    /// Runs `teacher` (evaluation mode) over the training split, keeping `features`.
    pub fn compute(
        teacher: &dyn Model,
        dataset: &dyn Dataset,
        features: &[String],
        batch_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let n = dataset.info().len(Split::Train);
        let order = evaluation_order(n, dataset.lengths(Split::Train).as_deref());
        let mut logits = Vec::new();
        let mut feats: BTreeMap<String, Vec<Tensor>> =
            features.iter().map(|f| (f.clone(), Vec::new())).collect();
        for chunk in order.chunks(batch_size.max(1)) {
            let batch = dataset.batch(Split::Train, chunk, device)?;
            let out = teacher.forward(&batch.inputs, false)?;
            logits.push(out.logits.detach());
            for (name, list) in feats.iter_mut() {
                let t = out
                    .features
                    .get(name)
                    .ok_or_else(|| Error::MissingFeature {
                        owner: "the teacher cache".into(),
                        side: "teacher",
                        name: name.clone(),
                        available: out.features.keys().cloned().collect::<Vec<_>>().join(", "),
                    })?;
                list.push(t.detach());
            }
        }
        // Rows come in `order`; put row `i` at sample `i`.
        let mut position = vec![0u32; n];
        for (row, &sample) in order.iter().enumerate() {
            position[sample] = row as u32;
        }
        let position = Tensor::from_vec(position, n, device)?;
        let in_sample_order = |parts: Vec<Tensor>| -> Result<Tensor> {
            Ok(Tensor::cat(&parts, 0)?.index_select(&position, 0)?)
        };
        let features = feats
            .into_iter()
            .map(|(k, v)| Ok((k, in_sample_order(v)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            logits: in_sample_order(logits)?,
            features,
        })
    }

    /// Writes the cache to `path` (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> =
            HashMap::from([(LOGITS.to_string(), self.logits.clone())]);
        for (k, v) in &self.features {
            map.insert(format!("{FEATURE_PREFIX}{k}"), v.clone());
        }
        distill_rt::candle::safetensors::save(&map, path)
            .map_err(|e| Error::data(path, e.to_string()))
    }

    /// Reads a cache written by [`TeacherCache::save`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut map = distill_rt::weights::load(path, device)?;
        let logits = map
            .remove(LOGITS)
            .ok_or_else(|| Error::data(path, "no `logits` tensor: not a teacher cache"))?;
        let features = map
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(FEATURE_PREFIX).map(|f| (f.to_string(), v)))
            .collect();
        Ok(Self { logits, features })
    }

    /// Number of cached samples.
    pub fn samples(&self) -> Result<usize> {
        Ok(self.logits.dim(0)?)
    }

    /// The cached outputs of the samples `indices` (a `u32` tensor), as a model output.
    pub fn outputs_for(&self, indices: &Tensor) -> Result<ModelOutput> {
        Ok(ModelOutput {
            logits: self.logits.index_select(indices, 0)?,
            features: self
                .features
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.index_select(indices, 0)?)))
                .collect::<Result<_>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::{BlobsFactory, MlpFactory};
    use distill_rt::candle::DType;
    use distill_rt::candle_nn::VarMap;
    use distill_rt::init::seeded_var_builder;
    use distill_rt::metrics::MetricAccumulator;
    use distill_rt::model::PENULTIMATE;
    use distill_rt::testing::max_abs_difference;
    use distill_rt::{Batch, Config, DatasetFactory, DatasetInfo, ModelContext, ModelFactory};

    /// A dataset that reports lengths, so the cache visits its samples out of index order.
    struct Lengthy(Box<dyn Dataset>);

    impl Dataset for Lengthy {
        fn info(&self) -> &DatasetInfo {
            self.0.info()
        }
        fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
            self.0.batch(split, indices, device)
        }
        fn metrics(&self) -> Result<Box<dyn MetricAccumulator>> {
            self.0.metrics()
        }
        fn lengths(&self, split: Split) -> Option<Vec<usize>> {
            let n = self.info().len(split);
            Some((0..n).map(|i| (i * 37) % 11).collect())
        }
    }

    #[test]
    fn cached_rows_belong_to_their_samples_whatever_the_visit_order() -> Result<()> {
        let data = BlobsFactory.build(&Config::Null)?;
        let varmap = VarMap::new();
        let ctx = ModelContext {
            dataset: data.info(),
            seed: 0,
            vb: seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        };
        let model = MlpFactory(8).build(&Config::Null, ctx)?;
        let features = [PENULTIMATE.to_string()];
        let plain =
            TeacherCache::compute(model.as_ref(), data.as_ref(), &features, 7, &Device::Cpu)?;
        let lengthy = Lengthy(data);
        let sorted = TeacherCache::compute(model.as_ref(), &lengthy, &features, 7, &Device::Cpu)?;
        let pick = [5usize, 0, 399, 123];
        let batch = lengthy.batch(Split::Train, &pick, &Device::Cpu)?;
        let live = model.forward(&batch.inputs, false)?;
        for cache in [&plain, &sorted] {
            let got = cache.outputs_for(&batch.indices)?;
            assert!(max_abs_difference(&got.logits, &live.logits)? < 1e-6);
            assert!(
                max_abs_difference(&got.features[PENULTIMATE], &live.features[PENULTIMATE])? < 1e-6
            );
        }
        Ok(())
    }
}
