//! Time of each fused CPU kernel at the baby config's shapes (batch 12, context 64, width 128,
//! 4 heads, vocabulary 256), forward and backward, in microseconds per call; the linears' with
//! the rate of their matrix products (GFLOP/s), which bounds a step on a CPU.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p tessera-core --example kernel_bench [config]
//!
//! The same in WebAssembly, as a tab runs it (one thread, SIMD128), under Node's WASI or in a
//! headless Chromium tab (`rustup target add wasm32-wasip1` first):
//!
//!     CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-C target-feature=+simd128" cargo build --release \
//!         -p tessera-core --no-default-features --features simd --example kernel_bench \
//!         --target wasm32-wasip1
//!     node --no-warnings tools/bench/wasi.mjs target/wasm32-wasip1/release/examples/kernel_bench.wasm
//!     tools/bench/wasi-chromium.sh target/wasm32-wasip1/release/examples/kernel_bench.wasm

use std::hint::black_box;
use std::time::Instant;

use tessera_core::burn::prelude::Device;
use tessera_core::config::ModelConfig;
use tessera_core::kernels;
use tessera_core::kernels::linear::{self, Dims};
use tessera_core::kernels::{attention, cross_entropy, gelu, layer_norm};

/// Prints and returns the best time of a call, in seconds.
fn time(name: &str, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..20 {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / 20.0);
    }
    println!("{name:28} {:9.1} µs", best * 1e6);
    best
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed) % 1000) as f32 - 500.0) / 700.0)
        .collect()
}

fn main() {
    // Where the trainer runs its kernels: on a worker of the CPU pool (a call from outside it
    // would also time rayon's hand-over from this thread, tens of µs a call on this VM).
    kernels::on_cpu_pool(&Device::flex(), bench);
}

fn bench() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "baby".into());
    let cfg = ModelConfig::named(&name).expect("config");
    let (b, t, c, h, v) = (12, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size);
    let n = b * t;
    let x = values(n * 4 * c, 1);
    let dy = values(n * 4 * c, 2);
    // The block's linears: qkv, the MLP's two, each forward, input and weight gradients.
    for (label, k, m) in [
        ("qkv", c, 3 * c),
        ("mlp up", c, 4 * c),
        ("mlp down", 4 * c, c),
    ] {
        let d = Dims { n, k, m };
        let (xl, w, bias, dyl) = (
            values(n * k, 8),
            values(k * m, 9),
            values(m, 10),
            values(n * m, 11),
        );
        let secs = time(&format!("linear {label} fwd+bwd"), || {
            black_box(linear::forward(&xl, &w, &bias, d));
            black_box(linear::input_grad(&dyl, &w, d));
            black_box(linear::weight_grad(&xl, &dyl, d));
        });
        println!(
            "{:28} {:9.1} GFLOP/s",
            "",
            3.0 * 2.0 * (n * k * m) as f64 / secs / 1e9
        );
    }
    time("copy (gelu's size, floor)", || {
        black_box(x.to_vec());
    });
    time("gelu forward", || {
        black_box(gelu::forward(&x));
    });
    time("gelu backward", || {
        black_box(gelu::backward(&x, &dy));
    });
    let (xs, g, beta) = (values(n * c, 3), values(c, 4), values(c, 5));
    let (_, stats) = layer_norm::forward(&xs, &g, &beta, 1e-5);
    time("layer norm forward", || {
        black_box(layer_norm::forward(&xs, &g, &beta, 1e-5));
    });
    time("layer norm backward", || {
        black_box(layer_norm::backward(&xs, &g, &stats, &dy[..n * c]));
    });
    let s = attention::Shape {
        batch: b,
        t,
        heads: h,
        dh: c / h,
    };
    let qkv = values(n * 3 * c, 6);
    let (y, lse) = attention::forward(&qkv, s);
    time("attention forward", || {
        black_box(attention::forward(&qkv, s));
    });
    time("attention backward", || {
        black_box(attention::backward(&qkv, &y, &lse, &dy[..n * c], s));
    });
    let logits = values(n * v, 7);
    let targets: Vec<usize> = (0..n).map(|i| i * 31 % v).collect();
    let (_, lse) = cross_entropy::forward(&logits, &targets, v);
    time("cross-entropy forward", || {
        black_box(cross_entropy::forward(&logits, &targets, v));
    });
    time("cross-entropy backward", || {
        black_box(cross_entropy::backward(&logits, &targets, &lse, 1.0));
    });
}
