//! A plugin of the same workspace build whose fingerprint differs in one field: the workspace
//! profile builds it with `debug-assertions = false`. The host must refuse it and name the field.

use distill_rt::{Registrar, Result};

distill_rt::export_plugin!(register);

fn register(_r: &mut Registrar) -> Result<()> {
    Err(distill_rt::Error::Invalid(
        "the stale-fingerprint test plugin must never be registered".into(),
    ))
}
