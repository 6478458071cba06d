//! The NLP task plugin: datasets (`nlp.synthetic`, `nlp.sst2`, `nlp.rt-polarity`,
//! `nlp.delimited`) and models (`nlp.bert`, `nlp.bilstm`, `nlp.textcnn`).

mod bert;
mod data;
mod models;
mod text;
mod vocab;

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.dataset("nlp.synthetic", data::SyntheticFactory)?;
    r.dataset("nlp.sst2", data::Sst2Factory)?;
    r.dataset("nlp.rt-polarity", data::RtPolarityFactory)?;
    r.dataset("nlp.delimited", data::DelimitedFactory)?;
    r.model("nlp.bert", models::BertFactory)?;
    r.model("nlp.bilstm", models::BiLstmFactory)?;
    r.model("nlp.textcnn", models::TextCnnFactory)?;
    Ok(())
}
