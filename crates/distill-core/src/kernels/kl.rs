//! The distillation loss `KL(softmax(t / T) || softmax(s / T))` summed over classes and averaged
//! over the batch, as one op: one pass per row forward, and the student's gradient
//! `(softmax(s / T) - softmax(t / T)) / (T * batch)` in one pass backward. Composed from
//! candle ops it is about 25 small ops forward and 50 backward, a tenth of an MLP student's
//! whole step. The teacher's logits get no gradient (they are a target).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Float, contiguous, rows_per_task, same_float};
use crate::{Error, Result};

/// `(student [b, classes], teacher [b, classes])` -> the batch-mean KL, a scalar.
#[derive(Clone, Copy)]
struct KlBatchMean {
    temperature: f64,
}

/// `log(softmax(x / T))` of one row into `out`.
fn log_softmax_row<T: Float>(x: &[T], inv_t: T, out: &mut [T]) {
    let max = x
        .iter()
        .copied()
        .fold(x[0], |m, v| if v > m { v } else { m });
    let mut sum = T::default();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max) * inv_t;
        sum += o.exp();
    }
    let log_sum = T::from_f64(sum.to_f64().ln());
    out.iter_mut().for_each(|o| *o -= log_sum);
}

impl KlBatchMean {
    fn forward<T: Float>(&self, s: &[T], t: &[T], classes: usize) -> T {
        let inv_t = T::from_f64(1.0 / self.temperature);
        let rows = rows_per_task(classes);
        let total: f64 = s
            .par_chunks(classes * rows)
            .zip(t.par_chunks(classes * rows))
            .map(|(s, t)| {
                let (mut ls, mut lt) = (vec![T::default(); classes], vec![T::default(); classes]);
                let mut acc = 0.0;
                for (sr, tr) in s.chunks(classes).zip(t.chunks(classes)) {
                    log_softmax_row(sr, inv_t, &mut ls);
                    log_softmax_row(tr, inv_t, &mut lt);
                    for (&a, &b) in lt.iter().zip(&ls) {
                        acc += (a.exp() * (a - b)).to_f64();
                    }
                }
                acc
            })
            .collect::<Vec<f64>>()
            // Added in chunk order: the same sum whatever the pool's size.
            .into_iter()
            .sum();
        T::from_f64(total / (s.len() / classes.max(1)).max(1) as f64)
    }

    /// `d student` for the upstream gradient `g` (a scalar).
    fn backward<T: Float>(&self, s: &[T], t: &[T], g: f64, classes: usize) -> Vec<T> {
        let inv_t = T::from_f64(1.0 / self.temperature);
        let batch = (s.len() / classes.max(1)).max(1);
        let scale = T::from_f64(g / (self.temperature * batch as f64));
        let mut ds = vec![T::default(); s.len()];
        let rows = rows_per_task(classes);
        ds.par_chunks_mut(classes * rows)
            .zip(
                s.par_chunks(classes * rows)
                    .zip(t.par_chunks(classes * rows)),
            )
            .for_each(|(d, (s, t))| {
                let mut lt = vec![T::default(); classes];
                for (dr, (sr, tr)) in d
                    .chunks_mut(classes)
                    .zip(s.chunks(classes).zip(t.chunks(classes)))
                {
                    log_softmax_row(sr, inv_t, dr);
                    log_softmax_row(tr, inv_t, &mut lt);
                    for (d, &l) in dr.iter_mut().zip(&lt) {
                        *d = scale * (d.exp() - l.exp());
                    }
                }
            });
        ds
    }
}

/// `(rows, classes)` of a `[rows, classes]` layout, checked against the other operand.
fn dims(s: &Shape, t: &Shape) -> candle_core::Result<usize> {
    let (_, classes) = s.dims2()?;
    if s != t || classes == 0 {
        candle_core::bail!("kl-batchmean: student {s:?} and teacher {t:?} differ or are empty");
    }
    Ok(classes)
}

impl CustomOp2 for KlBatchMean {
    fn name(&self) -> &'static str {
        "kl-batchmean"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let classes = dims(l1.shape(), l2.shape())?;
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |s, t| vec![
            self.forward(s, t, classes,)
        ]);
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let ds = s.apply_op2_no_bwd(t, &KlGrad { op: *self, g })?;
        Ok((Some(ds), None))
    }
}

/// The backward pass of [`KlBatchMean`] on `(student, teacher)` for the upstream gradient `g`.
struct KlGrad {
    op: KlBatchMean,
    g: f64,
}

impl CustomOp2 for KlGrad {
    fn name(&self) -> &'static str {
        "kl-batchmean-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let classes = dims(l1.shape(), l2.shape())?;
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |s, t| self
            .op
            .backward(s, t, self.g, classes));
        Ok((out, l1.shape().clone()))
    }
}

/// `KL(softmax(teacher / T) || softmax(student / T))` summed over classes (the last dimension
/// of `[batch, classes]` logits) and averaged over the batch, in one op; the gradient reaches
/// the student only (the teacher is detached).
pub fn kl_batchmean(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    same_float("kl_batchmean", &[student, teacher])?;
    if student.dims() != teacher.dims() || student.rank() != 2 || temperature <= 0.0 {
        return Err(Error::Invalid(format!(
            "kl_batchmean: student {:?} and teacher {:?} must be the same [batch, classes], T {temperature} > 0",
            student.dims(),
            teacher.dims()
        )));
    }
    Ok(student
        .contiguous()?
        .apply_op2(&teacher.detach().contiguous()?, KlBatchMean { temperature })?)
}

/// `(logits [b, classes], class ids [b] as u32)` -> the mean cross-entropy, a scalar.
#[derive(Clone, Copy)]
struct CrossEntropy;

/// The class ids of `targets` as indices, each checked against `classes`.
fn class_ids(targets: &[u32], classes: usize) -> candle_core::Result<Vec<usize>> {
    targets
        .iter()
        .map(|&y| {
            let y = y as usize;
            if y < classes {
                Ok(y)
            } else {
                candle_core::bail!("cross-entropy: class id {y} for {classes} classes")
            }
        })
        .collect()
}

fn ce_forward<T: Float>(logits: &[T], ids: &[usize], classes: usize) -> T {
    let mut row = vec![T::default(); classes];
    let total: f64 = logits
        .chunks(classes)
        .zip(ids)
        .map(|(x, &y)| {
            log_softmax_row(x, T::ONE, &mut row);
            -row[y].to_f64()
        })
        .sum();
    T::from_f64(total / ids.len().max(1) as f64)
}

fn ce_backward<T: Float>(logits: &[T], ids: &[usize], classes: usize, g: f64) -> Vec<T> {
    let scale = T::from_f64(g / ids.len().max(1) as f64);
    let mut d = vec![T::default(); logits.len()];
    for ((dr, x), &y) in d.chunks_mut(classes).zip(logits.chunks(classes)).zip(ids) {
        log_softmax_row(x, T::ONE, dr);
        dr.iter_mut().for_each(|v| *v = scale * v.exp());
        dr[y] -= scale;
    }
    d
}

/// `(logits, ids)` storages as slices, with the ids checked.
macro_rules! on_logits {
    ($name:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), $f:expr) => {{
        let (_, classes) = $l1.shape().dims2()?;
        let ids = match $s2 {
            CpuStorage::U32(y) => class_ids(contiguous(y, $l2, $name)?, classes)?,
            _ => candle_core::bail!("{}: class ids must be u32", $name),
        };
        if ids.len() * classes != $l1.shape().elem_count() || classes == 0 {
            candle_core::bail!("{}: {} ids for logits {:?}", $name, ids.len(), $l1.shape());
        }
        on_one!($name, ($s1, $l1), |x| $f(x, &ids, classes))
    }};
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = on_logits!(self.name(), (s1, l1), (s2, l2), |x, ids: &[usize], c| vec![
            ce_forward(x, ids, c)
        ]);
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok((
            Some(logits.apply_op2_no_bwd(ids, &CrossEntropyGrad(g))?),
            None,
        ))
    }
}

/// The backward pass of [`CrossEntropy`] for the upstream gradient.
struct CrossEntropyGrad(f64);

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = on_logits!(self.name(), (s1, l1), (s2, l2), |x, ids: &[usize], c| {
            ce_backward(x, ids, c, self.0)
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Mean cross-entropy of `logits` (`[batch, classes]`, f32 or f64) against class ids `targets`
/// (`[batch]`), in one op with a one-pass backward (`(softmax - onehot) / batch`); a class id out
/// of range is an error.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    same_float("cross_entropy", &[logits])?;
    if logits.rank() != 2 || targets.dims() != [logits.dim(0)?] {
        return Err(Error::Invalid(format!(
            "cross_entropy: logits {:?} and class ids {:?} do not fit",
            logits.dims(),
            targets.dims()
        )));
    }
    let ids = targets.to_dtype(candle_core::DType::U32)?.contiguous()?;
    Ok(logits.contiguous()?.apply_op2(&ids, CrossEntropy)?)
}
