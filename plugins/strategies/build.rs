//! Computes this plugin's code version (`distill-build`), which `export_plugin!` exports.

fn main() {
    distill_build::emit_plugin_version();
}
