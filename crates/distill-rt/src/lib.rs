//! The one shared runtime of distillery.
//!
//! This crate is a Rust `dylib`: it links distill-core, candle-core, candle-nn, tracing and
//! serde once, and the host binaries and every plugin link *it*. So there is one copy of candle's
//! tensor-id counter (gradients keyed by it stay correct across the boundary), one thread pool
//! and one tracing dispatcher per process (DESIGN.md, "The plugin boundary").
//!
//! Plugins and hosts depend on this crate alone for these libraries:
//! `use distill_rt::candle::Tensor;`, `use distill_rt::tracing;`. Hosts install their log
//! subscriber through [`tracing_subscriber`]; plugins never install one.

pub use distill_core::*;
pub use tracing_subscriber;
