//! Task metrics: accumulated over the batches of a split, then finished into named values.

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::{Error, Result};

/// Accumulates a task's metrics over batches.
pub trait MetricAccumulator: Send {
    /// Adds one batch of model logits and the batch they came from.
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()>;
    /// The metric values so far, by name (`accuracy`, `macro_f1`).
    fn finish(&self) -> Result<Vec<(String, f64)>>;
}

/// Accuracy and macro-F1 for single-label classification (logits `[batch, classes]`, targets
/// class ids). Macro-F1 averages the per-class F1 over classes that occur in the targets or the
/// predictions, as scikit-learn does with `zero_division=0` on the classes present.
#[derive(Clone, Debug)]
pub struct ClassificationMetrics {
    /// `confusion[target][predicted]`.
    confusion: Vec<Vec<u64>>,
}

impl ClassificationMetrics {
    /// An empty accumulator for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self {
            confusion: vec![vec![0; num_classes]; num_classes],
        }
    }

    /// Adds predicted and target class ids.
    pub fn add(&mut self, predicted: &[u32], targets: &[u32]) -> Result<()> {
        let n = self.confusion.len();
        for (&p, &t) in predicted.iter().zip(targets) {
            let (p, t) = (p as usize, t as usize);
            if p >= n || t >= n {
                return Err(Error::Invalid(format!(
                    "class id {} out of range for {n} classes",
                    p.max(t)
                )));
            }
            self.confusion[t][p] += 1;
        }
        Ok(())
    }
}

impl MetricAccumulator for ClassificationMetrics {
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()> {
        let predicted = logits
            .argmax(candle_core::D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let targets = batch.targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        self.add(&predicted, &targets)
    }

    fn finish(&self) -> Result<Vec<(String, f64)>> {
        let n = self.confusion.len();
        let total: u64 = self.confusion.iter().flatten().sum();
        let correct: u64 = (0..n).map(|c| self.confusion[c][c]).sum();
        let mut f1_sum = 0.0;
        let mut present = 0usize;
        for c in 0..n {
            let tp = self.confusion[c][c] as f64;
            let actual: u64 = self.confusion[c].iter().sum();
            let predicted: u64 = self.confusion.iter().map(|row| row[c]).sum();
            if actual + predicted == 0 {
                continue;
            }
            present += 1;
            f1_sum += 2.0 * tp / (actual + predicted) as f64;
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        Ok(vec![
            ("accuracy".to_string(), ratio(correct as f64, total as f64)),
            ("macro_f1".to_string(), ratio(f1_sum, present as f64)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1_match_hand_computation() -> Result<()> {
        // targets   0 0 1 1 2 2
        // predicted 0 1 1 1 0 2
        // class 0: tp 1, actual 2, predicted 2 -> f1 = 2/4 = 0.5
        // class 1: tp 2, actual 2, predicted 3 -> f1 = 4/5 = 0.8
        // class 2: tp 1, actual 2, predicted 1 -> f1 = 2/3
        let mut m = ClassificationMetrics::new(3);
        m.add(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 2])?;
        let out = m.finish()?;
        assert_eq!(out[0].0, "accuracy");
        assert!((out[0].1 - 4.0 / 6.0).abs() < 1e-12);
        assert!((out[1].1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn out_of_range_class_is_an_error() {
        let mut m = ClassificationMetrics::new(2);
        assert!(m.add(&[2], &[0]).is_err());
    }
}
