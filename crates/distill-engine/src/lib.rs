//! The training engine shared by every task plugin: optimizers and schedules, the training loop
//! with evaluation and early stopping, the teacher-output cache, and jobs with their records.

pub mod batching;
pub mod cache;
pub mod job;
pub mod optim;
pub mod train;

#[cfg(test)]
mod toy;
