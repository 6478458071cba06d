//! The teacher-output cache: the teacher's logits and the features strategies ask for, computed
//! once on the training split and stored as safetensors, so that a student job reads them
//! instead of running the teacher on every batch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use distill_rt::candle::{Device, Tensor};
use distill_rt::{Dataset, Error, Model, ModelOutput, Result, Split};

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
        let indices: Vec<usize> = (0..n).collect();
        let mut logits = Vec::new();
        let mut feats: BTreeMap<String, Vec<Tensor>> =
            features.iter().map(|f| (f.clone(), Vec::new())).collect();
        for chunk in indices.chunks(batch_size.max(1)) {
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
        let features = feats
            .into_iter()
            .map(|(k, v)| Ok((k, Tensor::cat(&v, 0)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            logits: Tensor::cat(&logits, 0)?,
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
        let mut map = distill_rt::candle::safetensors::load(path, device)
            .map_err(|e| Error::data(path, e.to_string()))?;
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
