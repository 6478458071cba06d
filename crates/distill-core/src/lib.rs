//! The stable plugin API of distillery.
//!
//! Everything that crosses between the host and a plugin is defined here: datasets ([`Dataset`]),
//! models shared by teachers and students ([`Model`]), distillation strategies ([`Strategy`]), the
//! [`Registrar`] plugins fill, task metrics, and the ABI checks with the [`export_plugin!`] macro.
//!
//! Plugins never depend on this crate directly: they depend on `distill-rt`, the one shared runtime
//! library that re-exports it together with candle and tracing (DESIGN.md, "The plugin boundary").

pub mod abi;
pub mod assets;
pub mod config;
pub mod data;
mod error;
mod guard;
pub mod init;
pub mod kernels;
pub use guard::contain;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod ops;
pub mod registry;
pub mod rng;
pub mod strategy;
pub mod testing;
pub mod weights;

pub use candle_core as candle;
pub use candle_nn;
pub use serde;
pub use serde_json;
pub use tracing;

pub use config::Config;
pub use data::{Batch, Dataset, DatasetFactory, DatasetInfo, Split, TaskKind, TensorMap};
pub use error::{Error, Result};
pub use metrics::MetricAccumulator;
pub use model::{Model, ModelContext, ModelFactory, ModelOutput};
pub use registry::Registrar;
pub use strategy::{LossTerms, StepInfo, Strategy, StrategyContext, StrategyFactory, TeacherNeeds};
