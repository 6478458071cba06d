//! A plugin that links its own copy of distill-core and candle instead of the shared runtime.
//! Its losses would carry no gradients back to the host; the host must refuse it at load, by the
//! runtime check, before any tensor crosses (DESIGN.md, "The plugin boundary").

use distill_core::{Registrar, Result};

distill_core::export_plugin!(register);

fn register(_r: &mut Registrar) -> Result<()> {
    Err(distill_core::Error::Invalid(
        "the isolated test plugin must never be registered".into(),
    ))
}
