//! `crd`: contrastive representation distillation (Tian et al. 2020), as RepDistiller computes
//! it, with memory banks keyed by training-sample index.
//!
//! - Embeddings: `v_s = normalize(W_s h_s + b_s)`, `v_t = normalize(W_t h_t + b_t)`, two linear
//!   heads to `feat_dim` (PyTorch initialisation, trained with the student).
//! - Memory banks `M_s`, `M_t` (`[train_samples, feat_dim]`), initialised uniform in
//!   `±1/sqrt(feat_dim / 3)` from the run's seed. For each sample of the batch, its own index
//!   and `nce_k` indices drawn uniformly (with replacement, from the run's seed and the step)
//!   are the contrast set.
//! - Scores `o_s = exp(M_t[idx] . v_s / nce_t) / Z_s` and `o_t = exp(M_s[idx] . v_t / nce_t) /
//!   Z_t`; each `Z` is fixed at the first step as the batch's mean of `exp(...)` times
//!   `train_samples`.
//! - NCE loss per side, with `P_n = 1 / train_samples`, `m = nce_k`:
//!   `-(sum log(o_pos / (o_pos + m P_n + 1e-7)) + sum log(m P_n / (o_neg + m P_n + 1e-7))) / b`.
//! - After each optimizer step the batch's rows are updated:
//!   `M[i] = normalize(nce_m * M[i] + (1 - nce_m) * v)` with the step's embeddings.
//!
//! `loss = ce_weight * CE + feature_weight * (nce_s + nce_t)`. Defaults (RepDistiller):
//! `feat_dim = 128`, `nce_k = 16384`, `nce_t = 0.07`, `nce_m = 0.5`, `feature_weight = 0.8`,
//! `ce_weight = 1`; features `penultimate` on both sides. Negatives are drawn uniformly over the
//! training set (RepDistiller's CIFAR loader draws them from other classes; the strategy does
//! not see the dataset's labels). Terms `ce`, `crd`, weighted. Adds `(d_s + d_t + 2) *
//! feat_dim` parameters and `2 * train_samples * feat_dim` floats of memory, plus a
//! `[b, nce_k + 1, feat_dim]` gather per side and step.

use std::sync::Mutex;

use distill_rt::candle::{D, DType, Device, Tensor};
use distill_rt::nn::Linear;
use distill_rt::ops::{l2_norm, label_loss};
use distill_rt::rng::Rng;
use distill_rt::strategy::{StepInfo, feature, require_teacher};
use distill_rt::{
    Batch, Config, Error, LossTerms, ModelOutput, Result, Strategy, StrategyContext,
    StrategyFactory, TeacherNeeds, config, model::PENULTIMATE,
};

const OWNER: &str = "strategy crd";

#[derive(distill_rt::serde::Deserialize, distill_rt::serde::Serialize, Clone, Debug)]
#[serde(crate = "distill_rt::serde", deny_unknown_fields, default)]
struct CrdConfig {
    student_feature: String,
    teacher_feature: String,
    feat_dim: usize,
    nce_k: usize,
    nce_t: f64,
    nce_m: f64,
    ce_weight: f64,
    feature_weight: f64,
}

impl Default for CrdConfig {
    fn default() -> Self {
        Self {
            student_feature: PENULTIMATE.into(),
            teacher_feature: PENULTIMATE.into(),
            feat_dim: 128,
            nce_k: 16384,
            nce_t: 0.07,
            nce_m: 0.5,
            ce_weight: 1.0,
            feature_weight: 0.8,
        }
    }
}

/// Builds [`Crd`].
pub struct CrdFactory;

/// The flat width of `name` on one side, or an error naming the key.
fn width(
    key: &str,
    name: &str,
    shapes: &std::collections::BTreeMap<String, Vec<usize>>,
) -> Result<usize> {
    shapes.get(name).map(|s| s.iter().product()).ok_or_else(|| {
        Error::config(
            OWNER,
            key,
            format!(
                "no feature `{name}`; the model has {}",
                shapes.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

impl StrategyFactory for CrdFactory {
    fn summary(&self) -> &str {
        "contrastive representation distillation (Tian et al.): ce_weight*CE + feature_weight*(NCE_s + NCE_t) against memory banks keyed by sample index; feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, feature_weight 0.8"
    }
    fn defaults(&self) -> Config {
        config::defaults_of::<CrdConfig>()
    }

    fn build(&self, cfg: &Config, ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        let c: CrdConfig = config::parse(OWNER, cfg)?;
        config::require_positive(OWNER, &[("feat_dim", c.feat_dim), ("nce_k", c.nce_k)])?;
        config::require_weights(
            OWNER,
            &[
                ("ce_weight", c.ce_weight),
                ("feature_weight", c.feature_weight),
            ],
        )?;
        config::require_scales(OWNER, &[("nce_t", c.nce_t)])?;
        if !(0.0..=1.0).contains(&c.nce_m) {
            return Err(Error::config(
                OWNER,
                "nce_m",
                format!("must be in [0, 1], got {}", c.nce_m),
            ));
        }
        if ctx.train_samples == 0 {
            return Err(Error::Invalid(format!(
                "{OWNER} needs a training set with samples"
            )));
        }
        let d_s = width("student_feature", &c.student_feature, ctx.student_features)?;
        let d_t = width("teacher_feature", &c.teacher_feature, ctx.teacher_features)?;
        let embed_s = Linear::new(d_s, c.feat_dim, ctx.vb.pp("embed_s"))?;
        let embed_t = Linear::new(d_t, c.feat_dim, ctx.vb.pp("embed_t"))?;
        let n = ctx.train_samples;
        let stdv = 1.0 / (c.feat_dim as f64 / 3.0).sqrt();
        let mut rng = Rng::derive(ctx.seed, "crd/memory");
        let mut bank = || -> Vec<f32> {
            (0..n * c.feat_dim)
                .map(|_| (rng.uniform() * 2.0 * stdv - stdv) as f32)
                .collect()
        };
        let memory = [bank(), bank()];
        Ok(Box::new(Crd {
            config: c,
            embed_s,
            embed_t,
            samples: n,
            seed: ctx.seed,
            memory,
            z: None,
            pending: Mutex::new(None),
        }))
    }
}

/// What one step leaves for the memory update: the batch's indices, its detached embeddings
/// and the normalisers it used.
struct Pending {
    indices: Vec<usize>,
    v_s: Vec<Vec<f32>>,
    v_t: Vec<Vec<f32>>,
    z: (f64, f64),
}

/// The CRD loss and its memory (module docs).
pub struct Crd {
    config: CrdConfig,
    embed_s: Linear,
    embed_t: Linear,
    samples: usize,
    seed: u64,
    /// `[M_s, M_t]`, row-major `[samples, feat_dim]`.
    memory: [Vec<f32>; 2],
    /// `(Z_s, Z_t)`, fixed at the first step.
    z: Option<(f64, f64)>,
    pending: Mutex<Option<Pending>>,
}

/// `normalize(x W^T + b)` of a feature flattened per sample.
fn embed(head: &Linear, f: &Tensor) -> Result<Tensor> {
    let b = f.dim(0)?;
    let e = head.forward(&f.reshape((b, ()))?)?;
    Ok(e.broadcast_div(&l2_norm(&e, D::Minus1, 1e-12)?)?)
}

impl Crd {
    /// The memory rows at `index` (`[b, k + 1]`) as `[b, k + 1, feat_dim]`.
    fn gather(&self, bank: usize, index: &Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
        let d = self.config.feat_dim;
        let table =
            Tensor::from_slice(&self.memory[bank], (self.samples, d), device)?.to_dtype(dtype)?;
        let (b, k1) = index.dims2()?;
        Ok(table
            .index_select(&index.flatten_all()?, 0)?
            .reshape((b, k1, d))?)
    }

    /// NCE loss of scores `o` (`[b, k + 1]`, positive first).
    fn nce(&self, o: &Tensor) -> Result<Tensor> {
        let (b, k1) = o.dims2()?;
        let noise = (k1 - 1) as f64 / self.samples as f64;
        let pos = o.narrow(1, 0, 1)?;
        let neg = o.narrow(1, 1, k1 - 1)?;
        let log_d1 = (pos.log()? - (&pos + (noise + 1e-7))?.log()?)?;
        let log_d0 = ((neg + (noise + 1e-7))?.log()?.neg()? + noise.ln())?;
        Ok(((log_d1.sum_all()? + log_d0.sum_all()?)? / -(b as f64))?)
    }
}

impl Strategy for Crd {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::features(vec![self.config.teacher_feature.clone()])
    }

    fn loss(
        &self,
        s: &ModelOutput,
        t: Option<&ModelOutput>,
        batch: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        let t = require_teacher(OWNER, t)?;
        let c = &self.config;
        let f_s = feature(OWNER, "student", s, &c.student_feature)?;
        let f_t = feature(OWNER, "teacher", t, &c.teacher_feature)?.detach();
        let v_s = embed(&self.embed_s, f_s)?;
        let v_t = embed(&self.embed_t, &f_t)?;
        let indices: Vec<usize> = batch
            .indices
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        if let Some(i) = indices.iter().find(|&&i| i >= self.samples) {
            return Err(Error::Invalid(format!(
                "{OWNER}: sample index {i} beyond the {} training samples of the memory",
                self.samples
            )));
        }
        let mut rng = Rng::derive(self.seed, &format!("crd/negatives/{}", step.step));
        let mut contrast = Vec::with_capacity(indices.len() * (c.nce_k + 1));
        for &i in &indices {
            contrast.push(i as u32);
            contrast.extend((0..c.nce_k).map(|_| rng.below(self.samples) as u32));
        }
        let device = v_s.device();
        let index = Tensor::from_vec(contrast, (indices.len(), c.nce_k + 1), device)?;
        let dtype = v_s.dtype();
        // o_s: the student's embedding against the teacher's memory, and the other way round.
        let raw_s = (self
            .gather(1, &index, device, dtype)?
            .matmul(&v_s.unsqueeze(2)?)?
            .squeeze(2)?
            / c.nce_t)?
            .exp()?;
        let raw_t = (self
            .gather(0, &index, device, dtype)?
            .matmul(&v_t.unsqueeze(2)?)?
            .squeeze(2)?
            / c.nce_t)?
            .exp()?;
        let scalar = |x: &Tensor| -> Result<f64> {
            Ok(x.detach()
                .mean_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?)
        };
        let z = match self.z {
            Some(z) => z,
            None => (
                scalar(&raw_s)? * self.samples as f64,
                scalar(&raw_t)? * self.samples as f64,
            ),
        };
        let nce = (self.nce(&(raw_s / z.0)?)? + self.nce(&(raw_t / z.1)?)?)?;
        let rows = |v: &Tensor| -> Result<Vec<Vec<f32>>> {
            Ok(v.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?)
        };
        let pending = Pending {
            indices,
            v_s: rows(&v_s)?,
            v_t: rows(&v_t)?,
            z,
        };
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(pending);
        let ce = (label_loss(&s.logits, batch)? * c.ce_weight)?;
        let crd = (nce * c.feature_weight)?;
        LossTerms::sum([("ce", ce), ("crd", crd)])
    }

    fn end_step(
        &mut self,
        _student: &ModelOutput,
        _teacher: Option<&ModelOutput>,
        _batch: &Batch,
    ) -> Result<()> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(p) = pending else {
            return Ok(());
        };
        self.z.get_or_insert(p.z);
        let (m, d) = (self.config.nce_m as f32, self.config.feat_dim);
        for (bank, vectors) in [(0, &p.v_s), (1, &p.v_t)] {
            for (&i, v) in p.indices.iter().zip(vectors) {
                let row = &mut self.memory[bank][i * d..(i + 1) * d];
                for (r, x) in row.iter_mut().zip(v) {
                    *r = *r * m + x * (1.0 - m);
                }
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::check_golden;
    use distill_rt::candle_nn::{VarBuilder, VarMap};
    use std::collections::BTreeMap;

    #[test]
    fn loss_changes_nothing_and_end_step_moves_the_memory() -> Result<()> {
        let dev = Device::Cpu;
        let shapes = BTreeMap::from([(PENULTIMATE.to_string(), vec![6])]);
        let varmap = VarMap::new();
        let mut crd = CrdFactory.build(
            &distill_rt::serde_json::json!({"feat_dim": 8, "nce_k": 5}),
            StrategyContext {
                num_classes: 3,
                student_features: &shapes,
                teacher_features: &shapes,
                train_samples: 10,
                seed: 1,
                vb: VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            },
        )?;
        let output = |seed: u64| -> Result<ModelOutput> {
            let mut rng = Rng::new(seed);
            let f: Vec<f32> = (0..24).map(|_| rng.normal() as f32).collect();
            Ok(ModelOutput {
                logits: Tensor::zeros((4, 3), DType::F32, &dev)?,
                features: BTreeMap::from([(
                    PENULTIMATE.to_string(),
                    Tensor::from_vec(f, (4, 6), &dev)?,
                )]),
            })
        };
        let (s, t) = (output(1)?, output(2)?);
        let batch = Batch {
            inputs: BTreeMap::new(),
            targets: Tensor::new(&[0u32, 1, 2, 0], &dev)?,
            soft_targets: None,
            indices: Tensor::new(&[7u32, 2, 9, 0], &dev)?,
        };
        let value = |crd: &dyn Strategy| -> Result<f32> {
            Ok(crd
                .loss(&s, Some(&t), &batch, &StepInfo::default())?
                .total
                .to_scalar::<f32>()?)
        };
        let first = value(&*crd)?;
        assert_eq!(first, value(&*crd)?, "loss alone changes no state");
        crd.end_step(&s, Some(&t), &batch)?;
        let after = value(&*crd)?;
        assert_ne!(
            first, after,
            "the batch's memory rows moved towards its embeddings"
        );
        Ok(())
    }

    #[test]
    fn crd_matches_golden_values() -> distill_rt::Result<()> {
        check_golden("crd")
    }
}
