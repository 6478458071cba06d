//! The training engine shared by every task plugin: optimizers and schedules, the training loop
//! with evaluation and early stopping, the teacher-output cache, jobs with their records, and
//! the loss probe (one strategy on given tensors).

pub mod batching;
pub mod cache;
pub mod job;
pub mod optim;
pub mod probe;
pub mod train;

#[cfg(test)]
mod toy;
