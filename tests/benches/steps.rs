//! One training step of every model family we ship (`distill_tests::steps`: vision MLP, CNN and
//! MobileNet students with a live or a cached teacher, the ResNet teachers' own steps, the
//! transformer, BiLSTM and TextCNN students, NeuMF -> MF) on synthetic inputs of fixed shapes,
//! and the MiniLM teacher's on a real SST-2 batch (through the data cache). The matrix products
//! run where workers run them (`install_matrix_products`).
//!
//! `cargo bench -p distill-tests --profile dev --bench steps` (the workspace's one profile:
//! candle at opt-level 3). `cargo xtask bench --compare` times the same steps against the
//! PyTorch reference. Measurements only; `cargo test --benches` (CI) runs each step once.

use criterion::{Criterion, criterion_group, criterion_main};
use distill_host::PluginHost;
use distill_tests::plugin_path;
use distill_tests::steps::{PLUGINS, STEPS, build};

fn bench(c: &mut Criterion) {
    if let Err(e) = distill_host::install_matrix_products() {
        panic!("{e}");
    }
    distill_host::install_data_resolver();
    let mut host = PluginHost::new();
    for plugin in PLUGINS {
        if let Err(e) = host.load(&plugin_path(plugin)) {
            panic!("{e}");
        }
    }
    let mut group = c.benchmark_group("steps");
    group.sample_size(10);
    for (name, _) in STEPS {
        let mut step = build(host.registrar(), name).unwrap_or_else(|e| panic!("{name}: {e}"));
        group.bench_function(name, |b| {
            b.iter(|| step.run().unwrap_or_else(|e| panic!("{name}: {e}")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
