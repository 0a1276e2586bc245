//! Aggregation throughput: MB/s of f32 pseudo-gradient of the `small` config folded into a
//! round's average, against memcpy bandwidth measured in the same run.
//!
//!     cargo run --release -p tessera-coordinator --example aggregate_bench

use std::hint::black_box;
use std::time::Instant;

use tessera_coordinator::aggregate::{fold, fold_le_bytes, nesterov_step};
use tessera_core::config::ModelConfig;

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let n = ModelConfig::named("small")
        .expect("small config")
        .num_params();
    let bytes = (n * 4) as f64;
    let delta: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-6).collect();
    let wire: Vec<u8> = delta.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut sum = vec![0f32; n];
    let mut dst = vec![0f32; n];
    let reps = 20;

    let memcpy = best_of(reps, || {
        dst.copy_from_slice(black_box(&delta));
        black_box(&dst);
    });
    let fold_f32 = best_of(reps, || {
        fold(&mut sum, black_box(&delta), 0.25);
        black_box(&sum);
    });
    let fold_wire = best_of(reps, || {
        fold_le_bytes(&mut sum, black_box(&wire), 0.25);
        black_box(&sum);
    });
    let mut params = vec![0f32; n];
    let mut mom = vec![0f32; n];
    let outer = best_of(reps, || {
        nesterov_step(&mut params, &mut mom, black_box(&sum), 0.7, 0.9);
        black_box(&params);
    });
    let mbs = |t: f64| bytes / t / 1e6;
    println!(
        "{{\"params\": {n}, \"memcpy_mb_s\": {:.0}, \"fold_f32_mb_s\": {:.0}, \"fold_wire_mb_s\": {:.0}, \"ratio_fold_wire_vs_memcpy\": {:.2}, \"ratio_fold_f32_vs_memcpy\": {:.2}, \"outer_step_ms\": {:.2}}}",
        mbs(memcpy),
        mbs(fold_f32),
        mbs(fold_wire),
        memcpy / fold_wire,
        memcpy / fold_f32,
        outer * 1e3
    );
}
