//! The standard distillation strategies: `baseline`, `kd`, `feature-mse`, and the relation-based
//! `sp` and `pkt`.
//!
//! Every loss documents its formula, reduction and defaults next to its code; golden values from
//! an independent NumPy computation (`tests/fixtures/strategies_golden.py`) pin them in tests.
//! Loss terms are reported weighted, so that they add up to the total.

mod baseline;
mod feature_mse;
mod kd;
mod relations;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.strategy("baseline", baseline::BaselineFactory)?;
    r.strategy("kd", kd::KdFactory)?;
    r.strategy("feature-mse", feature_mse::FeatureMseFactory)?;
    r.strategy(
        "sp",
        relations::RelationFactory(relations::Relation::SimilarityPreserving),
    )?;
    r.strategy(
        "pkt",
        relations::RelationFactory(relations::Relation::ProbabilisticTransfer),
    )?;
    Ok(())
}

#[cfg(test)]
mod test_support;
