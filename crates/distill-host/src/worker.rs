//! The process settings every worker and bench process runs with: candle's and OpenBLAS's
//! thread pools and glibc's allocator. `distill` and `bench-step` give them to themselves
//! ([`apply_worker_settings`]), so that a job run by hand (`distill run-job`, a scheduler's
//! script) runs as it does under `cargo xtask run`; a variable the user set is kept.

use std::ffi::OsString;

/// Threads of candle's own element-wise pool: none beside the calling thread. Its workers spin
/// 25,000 rounds between ops, and on the cores where rayon runs the matrix products and our
/// kernels that spinning took 35% of the cycles of an MLP step; the heavy element-wise work runs
/// in `distill_core::kernels` on rayon instead. With 2 threads against 1 (steps/s, `bench-step`,
/// 2 cores): mlp-kd-cached 330 -> 460, cnn-kd 18.8 -> 23.0, bilstm-kd-cached 5.9 -> 6.6,
/// neumf-mf-kd 35.9 -> 42.4, textcnn-kd-cached 9.0 -> 8.5, transformer, MobileNet and ResNet
/// within 2%.
const CANDLE_THREADS: &str = "1";

/// OpenBLAS's own pool: none. The kernels call it from their own threads, each on its band of
/// the product, and a pool it starts when it loads would spin beside them.
const OPENBLAS_THREADS: &str = "1";

/// glibc's allocator: candle allocates and frees tensors of megabytes each step; with glibc's
/// defaults every one is a fresh `mmap` whose pages the kernel zeroes, which cost a ResNet step
/// on 2 cores 30% of its time (1.17 s -> 0.82 s, measured with the criterion bench of the time).
/// Keeping freed memory in the heap instead costs only a higher resident high-water mark. One
/// arena for all threads: a job runs on a rayon thread (`kernels::on_pool`) and its tensors are
/// freed on others, and with an arena per thread freed blocks waited in the wrong one (BiLSTM
/// step 187 -> 146 MiB and 7.7 -> 9.8 steps/s, NeuMF 180 -> 118 MiB and 37 -> 51).
const MALLOC: &str = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1";

/// The settings this process lacks: each variable with the value it should have. A user's own
/// `CANDLE_NUM_THREADS` or `OPENBLAS_NUM_THREADS` is kept, and their `GLIBC_TUNABLES` follow ours
/// (glibc applies the last setting of a name).
fn missing_settings() -> Vec<(&'static str, OsString)> {
    let mut missing = Vec::new();
    for (name, value) in [
        ("CANDLE_NUM_THREADS", CANDLE_THREADS),
        ("OPENBLAS_NUM_THREADS", OPENBLAS_THREADS),
    ] {
        if std::env::var_os(name).is_none_or(|v| v.is_empty()) {
            missing.push((name, OsString::from(value)));
        }
    }
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        let own = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if !own.contains(MALLOC) {
            let value = if own.is_empty() {
                MALLOC.to_string()
            } else {
                format!("{MALLOC}:{own}")
            };
            missing.push(("GLIBC_TUNABLES", OsString::from(value)));
        }
    }
    missing
}

/// Gives this process the worker settings: when any is missing, runs this binary again in its
/// place (same process id, arguments and environment, plus the settings), since glibc reads its
/// tunables only when a process starts. Returns only when nothing was missing, or with the
/// error of a failed `exec`; call it first in `main`, before any thread starts.
pub fn apply_worker_settings() -> std::io::Result<()> {
    let missing = missing_settings();
    if missing.is_empty() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(std::env::current_exe()?);
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        // `exec` returns only when it failed.
        Err(command.args(args).envs(missing).exec())
    }
    #[cfg(not(unix))]
    {
        Ok(())
    }
}
