//! The recommender task plugin: MovieLens and synthetic implicit feedback under the NCF protocol
//! (`recsys.movielens`, `recsys.synthetic`) and the NCF models (`recsys.mf`, `recsys.gmf`,
//! `recsys.mlp`, `recsys.neumf`).

mod data;
mod interactions;
mod models;
mod ratings;
mod synthetic;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.dataset("recsys.movielens", data::MovieLensFactory)?;
    r.dataset("recsys.synthetic", data::SyntheticFactory)?;
    r.model("recsys.mf", models::MF)?;
    r.model("recsys.gmf", models::GMF)?;
    r.model("recsys.mlp", models::MLP)?;
    r.model("recsys.neumf", models::NEUMF)?;
    Ok(())
}
