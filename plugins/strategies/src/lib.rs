//! The standard distillation strategies: `baseline`, `kd`, `feature-mse`, `fitnets` and `at`, the relation-based
//! `sp`, `pkt`, `rkd` and the contrastive `crd`, the logit-based `dist` and `dkd`, `multi-teacher`, and `ranking-kd` for ranking tasks
//! (`kd` works on those too, pointwise).
//!
//! Every loss documents its formula, reduction and defaults next to its code; golden values from
//! an independent NumPy computation (`tests/fixtures/strategies_golden.py`) pin them in tests.
//! Loss terms are reported weighted, so that they add up to the total.

mod at;
mod baseline;
mod crd;
mod dist;
mod dkd;
mod feature_mse;
mod kd;
mod multi_teacher;
mod ranking_kd;
mod relations;
mod rkd;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.strategy("baseline", baseline::BaselineFactory)?;
    r.strategy("kd", kd::KD)?;
    r.strategy("born-again", kd::BORN_AGAIN)?;
    r.strategy(
        "feature-mse",
        feature_mse::FeatureMseFactory(feature_mse::Matching::HalfSquared),
    )?;
    r.strategy(
        "fitnets",
        feature_mse::FeatureMseFactory(feature_mse::Matching::FitNets),
    )?;
    r.strategy(
        "sp",
        relations::RelationFactory(relations::Relation::SimilarityPreserving),
    )?;
    r.strategy(
        "pkt",
        relations::RelationFactory(relations::Relation::ProbabilisticTransfer),
    )?;
    r.strategy("rkd", rkd::RkdFactory)?;
    r.strategy("dist", dist::DistFactory)?;
    r.strategy("dkd", dkd::DkdFactory)?;
    r.strategy("ranking-kd", ranking_kd::RankingKdFactory)?;
    r.strategy("at", at::AtFactory)?;
    r.strategy("crd", crd::CrdFactory)?;
    r.strategy("multi-teacher", multi_teacher::MultiTeacherFactory)?;
    Ok(())
}

#[cfg(test)]
mod test_support;
