//! The vision task plugin: datasets (`vision.synthetic`, `vision.idx`, `vision.cifar10`) and
//! models (`vision.resnet`, `vision.lenet5`, `vision.mobilenet`, `vision.mlp`).

mod data;
mod images;
mod layers;
mod models;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.dataset("vision.synthetic", data::SyntheticFactory)?;
    r.dataset("vision.idx", data::IdxFactory)?;
    r.dataset("vision.cifar10", data::Cifar10Factory)?;
    r.model("vision.resnet", models::ResNetFactory)?;
    r.model("vision.lenet5", models::LeNetFactory)?;
    r.model("vision.mobilenet", models::MobileNetFactory)?;
    r.model("vision.mlp", models::MlpFactory)?;
    Ok(())
}
