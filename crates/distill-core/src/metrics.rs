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

/// Ranking metrics under the sampled-candidates protocol (He et al. 2017, NCF): each row of the
/// logits scores candidates whose relevance the batch's targets give (1 the held-out positive,
/// 0 a negative, [`UNLABELLED`] a candidate left out, such as an item the user is known to like
/// in a full ranking). `hr@K` and `ndcg@K` use the positive's rank among the row's negatives; a
/// tie counts as a uniformly random order of the tied candidates would on average (each tied
/// place equally likely), so a constant scorer is not rewarded. `auc` is the share of negatives
/// scored below the positive, ties counting half. A row with several positives counts each
/// against the negatives.
///
/// [`UNLABELLED`]: crate::data::UNLABELLED
#[derive(Clone, Debug)]
pub struct RankingMetrics {
    k: usize,
    rows: u64,
    hits: f64,
    ndcg: f64,
    auc: f64,
}

impl RankingMetrics {
    /// An empty accumulator for cut-off `k`.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            rows: 0,
            hits: 0.0,
            ndcg: 0.0,
            auc: 0.0,
        }
    }

    /// Adds one row: the positive's score and its negatives' scores.
    pub fn add_row(&mut self, positive: f64, negatives: &[f64]) -> Result<()> {
        if !positive.is_finite() || negatives.iter().any(|s| !s.is_finite()) {
            return Err(Error::Invalid(
                "a ranking score is not finite (NaN or infinite)".into(),
            ));
        }
        let above = negatives.iter().filter(|&&s| s > positive).count();
        let tied = negatives.iter().filter(|&&s| s == positive).count();
        let below = negatives.len() - above - tied;
        let share = 1.0 / (tied + 1) as f64;
        for rank in (above..=above + tied).filter(|&r| r < self.k) {
            self.hits += share;
            self.ndcg += share / ((rank + 2) as f64).log2();
        }
        if !negatives.is_empty() {
            self.auc += (below as f64 + 0.5 * tied as f64) / negatives.len() as f64;
        }
        self.rows += 1;
        Ok(())
    }
}

impl MetricAccumulator for RankingMetrics {
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()> {
        if batch.targets.dims() != logits.dims() || logits.rank() != 2 {
            return Err(Error::Invalid(format!(
                "ranking metrics need relevance targets of the logits' shape [batch, candidates]; \
                 got logits {:?} and targets {:?}",
                logits.dims(),
                batch.targets.dims()
            )));
        }
        let scores = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let relevance = batch.targets.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, rel) in scores.iter().zip(&relevance) {
            let negatives: Vec<f64> = row
                .iter()
                .zip(rel)
                .filter(|(_, r)| **r == 0.0)
                .map(|(s, _)| *s)
                .collect();
            let mut positives = row.iter().zip(rel).filter(|(_, r)| **r > 0.0).peekable();
            if positives.peek().is_none() {
                return Err(Error::Invalid(
                    "a ranking row without a relevant candidate".into(),
                ));
            }
            for (s, _) in positives {
                self.add_row(*s, &negatives)?;
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<Vec<(String, f64)>> {
        let n = self.rows.max(1) as f64;
        Ok(vec![
            (format!("hr@{}", self.k), self.hits / n),
            (format!("ndcg@{}", self.k), self.ndcg / n),
            ("auc".to_string(), self.auc / n),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranking(k: usize, rows: &[(f64, &[f64])]) -> Result<Vec<(String, f64)>> {
        let mut m = RankingMetrics::new(k);
        for (p, n) in rows {
            m.add_row(*p, n)?;
        }
        m.finish()
    }

    #[test]
    fn ranking_metrics_match_hand_computed_ranks() -> Result<()> {
        // Rank 0: hit, ndcg 1, auc 1. Rank 2 (two above): hit@3, ndcg 1/log2(4) = 0.5,
        // auc 1/3. Rank 3 with k = 3: miss, auc 0.
        let got = ranking(
            3,
            &[
                (0.9, &[0.1, 0.2, 0.3]),
                (0.5, &[0.7, 0.6, 0.1]),
                (0.0, &[0.7, 0.6, 0.1]),
            ],
        )?;
        let want = [
            ("hr@3", 2.0 / 3.0),
            ("ndcg@3", 1.5 / 3.0),
            ("auc", (1.0 + 1.0 / 3.0) / 3.0),
        ];
        for ((name, v), (wn, wv)) in got.iter().zip(want) {
            assert_eq!(name, wn);
            assert!((v - wv).abs() < 1e-12, "{name}: {v} vs {wv}");
        }
        Ok(())
    }

    #[test]
    fn ties_count_as_a_random_order_would_on_average() -> Result<()> {
        // One negative above, two tied: rank 1, 2 or 3, each with probability 1/3.
        let got = ranking(2, &[(0.5, &[0.9, 0.5, 0.5, 0.1])])?;
        let hr = 1.0 / 3.0;
        let ndcg = (1.0 / 3f64.log2()) / 3.0;
        let auc = (1.0 + 0.5 * 2.0) / 4.0;
        assert!((got[0].1 - hr).abs() < 1e-12);
        assert!((got[1].1 - ndcg).abs() < 1e-12);
        assert!((got[2].1 - auc).abs() < 1e-12);
        // A constant scorer over 1 + 99 candidates gets HR@10 = 10 / 100 exactly.
        let constant = ranking(10, &[(1.0, &[1.0; 99])])?;
        assert!((constant[0].1 - 0.1).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn a_random_scorer_hits_the_top_ten_of_a_hundred_about_a_tenth_of_the_time() -> Result<()> {
        let mut rng = crate::rng::Rng::new(5);
        let mut m = RankingMetrics::new(10);
        for _ in 0..20_000 {
            let negatives: Vec<f64> = (0..99).map(|_| rng.uniform()).collect();
            m.add_row(rng.uniform(), &negatives)?;
        }
        let got = m.finish()?;
        assert!((got[0].1 - 0.10).abs() < 0.01, "hr@10 {}", got[0].1);
        assert!((got[2].1 - 0.5).abs() < 0.01, "auc {}", got[2].1);
        Ok(())
    }

    #[test]
    fn rows_read_relevance_from_the_targets_and_skip_unlabelled_candidates() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let logits = Tensor::new(&[[0.5f32, 0.9, 0.1, 0.7], [0.2, 0.8, 0.3, 0.1]], &dev)?;
        // Row 0: positive 0.5; negatives 0.1 and 0.7 (0.9 unlabelled) -> rank 1.
        // Row 1: positive 0.3; negatives 0.2 and 0.1 (0.8 unlabelled) -> rank 0.
        let targets = Tensor::new(&[[1.0f32, -1.0, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0]], &dev)?;
        let batch = Batch {
            inputs: Default::default(),
            targets,
            soft_targets: None,
            indices: Tensor::new(&[0u32, 1], &dev)?,
        };
        let mut m = RankingMetrics::new(1);
        m.update(&logits, &batch)?;
        let got = m.finish()?;
        assert_eq!(got[0], ("hr@1".to_string(), 0.5));
        assert!((got[2].1 - (0.5 + 1.0) / 2.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn non_finite_scores_are_an_error() {
        assert!(RankingMetrics::new(10).add_row(f64::NAN, &[0.1]).is_err());
        assert!(
            RankingMetrics::new(10)
                .add_row(0.1, &[f64::INFINITY])
                .is_err()
        );
    }

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
