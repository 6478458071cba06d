//! Datasets: what a task plugin's data looks like to the engine.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::metrics::MetricAccumulator;
use crate::{Config, Result};

/// Named tensors: a model's inputs (`image`, `tokens`, `user`, `item`, ...) or its features.
pub type TensorMap = BTreeMap<String, Tensor>;

/// The three splits every dataset provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    /// Data the student and the teacher train on.
    Train,
    /// Data for early stopping and model selection.
    Validation,
    /// Held-out data, reported only.
    Test,
}

impl Split {
    /// All splits in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// The lower-case name used in configs and result tables.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// What kind of prediction a task asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// One label out of `num_classes` per sample; logits are `[batch, num_classes]`.
    Classification,
    /// A relevance score per (query, candidate); logits are `[batch]` or `[batch, candidates]`.
    Ranking,
}

/// A dataset's description of itself.
#[derive(Clone, Debug)]
pub struct DatasetInfo {
    /// The task kind.
    pub task: TaskKind,
    /// Number of classes (classification) or items (ranking).
    pub num_classes: usize,
    /// Shape of each named input, without the batch dimension.
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// Number of distinct ids of each integer input (a vocabulary's size, the item count); ids
    /// run from 0 to this number - 1. Empty for inputs that are not ids.
    pub cardinality: BTreeMap<String, usize>,
    /// Number of samples in the train, validation and test split.
    pub split_sizes: [usize; 3],
    /// Name of the metric that ranks runs (`accuracy`, `ndcg@10`).
    pub primary_metric: String,
}

impl DatasetInfo {
    /// Number of samples in `split`.
    pub fn len(&self, split: Split) -> usize {
        self.split_sizes[split as usize]
    }
}

/// The relevance of a ranking candidate that is neither a positive nor a negative (an item not
/// sampled this epoch, a held-out item during training): losses and metrics leave it out.
pub const UNLABELLED: f32 = -1.0;

/// One mini-batch: inputs, targets and the dataset indices of its samples.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Named model inputs, each with the batch as its first dimension.
    pub inputs: TensorMap,
    /// Targets: class ids (`u32`, `[batch]`) for classification; for ranking, relevance
    /// (`f32`, the logits' shape `[batch, candidates]`): 1 relevant, 0 not relevant, and
    /// [`UNLABELLED`] for candidates that neither losses nor metrics read. In a batch that
    /// mixes samples (mixup, CutMix) each sample's dominant class.
    pub targets: Tensor,
    /// Class probabilities (`f32`, `[batch, classes]`, each row summing to 1) when a training
    /// batch mixes samples; the label loss ([`crate::ops::label_loss`]) then reads these.
    pub soft_targets: Option<Tensor>,
    /// Index of each sample within its split (`u32`), for teacher caches and memory banks.
    pub indices: Tensor,
}

/// A dataset built by a task plugin.
pub trait Dataset: Send + Sync {
    /// The dataset's description.
    fn info(&self) -> &DatasetInfo;
    /// The samples at `indices` of `split` as one batch on `device`.
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch>;
    /// A fresh accumulator for this task's metrics.
    fn metrics(&self) -> Result<Box<dyn MetricAccumulator>>;
    /// Each sample's length in `split` (tokens, say) when batches pad to their longest sample:
    /// the engine then batches samples of similar length together. `None`: all cost the same.
    fn lengths(&self, split: Split) -> Option<Vec<usize>> {
        let _ = split;
        None
    }
    /// The training samples at `indices` as they appear in `epoch` of a run seeded `seed`: with
    /// augmented inputs (random crops, flips, mixup), or with targets drawn anew each epoch
    /// (sampled negatives). The same arguments give the same batch. Default: [`Dataset::batch`]
    /// of the training split.
    fn train_batch(
        &self,
        epoch: usize,
        seed: u64,
        indices: &[usize],
        device: &Device,
    ) -> Result<Batch> {
        let _ = (epoch, seed);
        self.batch(Split::Train, indices, device)
    }
    /// Whether [`Dataset::train_batch`] changes inputs (augmentation): a teacher's outputs
    /// cached on the unaugmented training samples then describe other inputs than the
    /// student's.
    fn augments(&self) -> bool {
        false
    }
}

/// Builds a [`Dataset`] from its configuration table.
pub trait DatasetFactory: Send + Sync {
    /// One line saying what the dataset is.
    fn summary(&self) -> &str;
    /// The configuration keys with their default values (`null`: required, or derived from
    /// other keys), for listings; `Config::Null` when the factory does not describe them.
    fn defaults(&self) -> Config {
        Config::Null
    }
    /// Builds the dataset; unknown configuration keys are an error.
    fn build(&self, config: &Config) -> Result<Box<dyn Dataset>>;
}
