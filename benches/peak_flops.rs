//! `peak-flops [--threads N] [--seconds S]`: this machine's f32 peak, measured: every thread runs
//! independent chains of fused multiply-adds in the widest vector registers the CPU has
//! (AVX-512, else AVX2 with FMA, else scalar), enough chains to hide the FMA latency on two
//! pipes, for `S` seconds; prints one JSON line with the GFLOP/s of all threads together (an
//! FMA of `L` lanes counts `2 L`). `cargo xtask bench` divides the steps' GFLOP/s by it.

use std::time::Instant;

/// Independent accumulators per thread: FMA latency (4 cycles) x pipes (2), doubled.
const CHAINS: usize = 16;
/// FMA rounds between clock reads.
const ROUNDS: u64 = 1 << 20;

/// `ROUNDS` rounds of `CHAINS` AVX-512 FMAs; returns a value that depends on every one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn avx512(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    for _ in 0..ROUNDS {
        for x in &mut acc {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
}

/// The same with 256-bit AVX2 FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(seed); CHAINS];
    for _ in 0..ROUNDS {
        for x in &mut acc {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    acc.iter()
        .map(|&x| {
            // SAFETY: `lanes` holds 8 f32, the width of a 256-bit register.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
            lanes.iter().sum::<f32>()
        })
        .sum()
}

/// Scalar `mul_add` chains (no vector FMA on this CPU or architecture).
fn scalar(seed: f32) -> f32 {
    let mut acc = [seed; CHAINS];
    for _ in 0..ROUNDS {
        for x in &mut acc {
            *x = x.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

/// The widest kernel this CPU runs: its name, lanes, and the kernel.
fn widest() -> (&'static str, u64, fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return ("avx512", 16, |s| unsafe { avx512(s) });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return ("avx2", 8, |s| unsafe { avx2(s) });
        }
    }
    ("scalar", 1, scalar)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| -> Result<Option<f64>, Box<dyn std::error::Error>> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .ok_or_else(|| format!("{flag} needs a value"))?
                    .parse()?,
            )),
            None => Ok(None),
        }
    };
    let threads = value("--threads")?.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let seconds = value("--seconds")?.unwrap_or(2.0);
    let (isa, lanes, kernel) = widest();
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut calls, mut sink) = (0u64, 0f32);
                while calls == 0 || started.elapsed().as_secs_f64() < seconds {
                    sink += kernel(t as f32 + calls as f32);
                    calls += 1;
                }
                (calls, sink)
            })
        })
        .collect();
    let mut calls = 0;
    let mut sink = 0f32;
    for w in workers {
        let (c, s) = w.join().map_err(|_| "a thread panicked")?;
        calls += c;
        sink += s;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let flops = calls as f64 * (ROUNDS * CHAINS as u64 * 2 * lanes) as f64;
    println!(
        "{}",
        serde_json::json!({
            "gflops": flops / elapsed / 1e9,
            "isa": isa,
            "threads": threads,
            "seconds": elapsed,
            "checksum": sink,
        })
    );
    Ok(())
}
