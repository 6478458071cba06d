//! The standard distillation strategies: `baseline`, `kd` and `feature-mse`.
//!
//! Every loss documents its formula, reduction and defaults next to its code; golden values from
//! an independent NumPy computation (`tests/fixtures/strategies_golden.py`) pin them in tests.
//! Loss terms are reported weighted, so that they add up to the total.

mod baseline;
mod feature_mse;
mod kd;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.strategy("baseline", baseline::BaselineFactory)?;
    r.strategy("kd", kd::KdFactory)?;
    r.strategy("feature-mse", feature_mse::FeatureMseFactory)?;
    Ok(())
}

#[cfg(test)]
mod test_support;
