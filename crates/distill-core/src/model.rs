//! Models: one contract for teachers and students alike.

use candle_nn::VarBuilder;

use crate::data::{DatasetInfo, TensorMap};
use crate::{Config, Result};

/// Name of the feature every model exposes: the representation the classifier head reads.
pub const PENULTIMATE: &str = "penultimate";

/// What a forward pass returns.
#[derive(Clone, Debug)]
pub struct ModelOutput {
    /// Logits (`[batch, classes]`) or scores.
    pub logits: candle_core::Tensor,
    /// Named intermediate tensors, batch first. Every model provides [`PENULTIMATE`]; attention
    /// maps are features named `attention.<layer>`.
    pub features: TensorMap,
}

impl ModelOutput {
    /// The shape of each feature without the batch dimension: what strategy factories are told
    /// (`StrategyContext::student_features`, `teacher_features`).
    pub fn feature_shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.features
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().get(1..).unwrap_or_default().to_vec()))
            .collect()
    }
}

/// A teacher or student network.
pub trait Model: Send {
    /// Runs the model on named inputs. `train`: training mode (dropout active, batch norm on
    /// the batch's statistics, updating its running ones); otherwise evaluation mode, as for
    /// evaluation, a teacher's cache and a live teacher.
    fn forward(&self, inputs: &TensorMap, train: bool) -> Result<ModelOutput>;
    /// Multiply-accumulate count of one forward pass for one sample.
    fn flops_per_sample(&self) -> u64;
    /// Prefixes of variable names that must not train (a frozen pretrained encoder, say).
    fn frozen_prefixes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a model factory receives besides its configuration.
pub struct ModelContext<'a> {
    /// The dataset the model is for (input shapes, number of classes).
    pub dataset: &'a DatasetInfo,
    /// The run's seed, for randomness inside the forward pass (dropout masks); the weights'
    /// initialisation comes from `vb`.
    pub seed: u64,
    /// Where the model creates (or loads) its variables; names follow the module tree.
    pub vb: VarBuilder<'a>,
}

/// Builds a [`Model`] from its configuration table.
pub trait ModelFactory: Send + Sync {
    /// One line saying what the model is.
    fn summary(&self) -> &str;
    /// The configuration keys with their default values (`null`: required, or derived from
    /// other keys), for listings; `Config::Null` when the factory does not describe them.
    fn defaults(&self) -> Config {
        Config::Null
    }
    /// Builds the model; unknown configuration keys are an error.
    fn build(&self, config: &Config, ctx: ModelContext<'_>) -> Result<Box<dyn Model>>;
}
