//! The recommender task plugin (work in progress on this branch): MovieLens ratings, the
//! implicit-feedback leave-one-out protocol. Datasets, models and registration come next.

pub mod interactions;
pub mod ratings;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(_r: &mut Registrar) -> Result<()> {
    Ok(())
}
