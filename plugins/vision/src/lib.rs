//! The vision task plugin: datasets (`vision.synthetic`, `vision.idx`, `vision.cifar10`,
//! `vision.cifar100`, `vision.folder`; each with training-time augmentation) and models (`vision.resnet`, `vision.lenet5`,
//! `vision.mobilenet`, `vision.mlp`, and the CIFAR zoo of RepDistiller: `vision.resnet8x4`,
//! `vision.resnet32x4`, `vision.resnet20/56/110`, `vision.wrn-16-2/40-2`, `vision.vgg8/13`).

mod augment;
mod data;
mod folder;
mod images;
mod layers;
mod models;
mod zoo;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.dataset("vision.synthetic", data::SyntheticFactory)?;
    r.dataset("vision.idx", data::IdxFactory)?;
    r.dataset("vision.cifar10", data::Cifar10Factory)?;
    r.dataset("vision.cifar100", data::Cifar100Factory)?;
    r.dataset("vision.folder", folder::FolderFactory)?;
    r.model("vision.resnet", models::ResNetFactory)?;
    r.model("vision.lenet5", models::LeNetFactory)?;
    r.model("vision.mobilenet", models::MobileNetFactory)?;
    r.model("vision.mlp", models::MlpFactory)?;
    for (name, factory, _) in zoo::ZOO {
        r.model(name, factory)?;
    }
    Ok(())
}
