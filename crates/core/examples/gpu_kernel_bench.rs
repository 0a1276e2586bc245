//! Time of each fused WGSL kernel on a wgpu device (lavapipe where there is no GPU) against
//! burn's composed ops on the same device, at a config's shapes (batch 12), forward and
//! backward under autodiff together, in milliseconds per call: what `kernels::{gelu,
//! layer_norm, causal_attention, cross_entropy}` cost a GPU participant's step. Each call ends
//! by reading one value of the gradient, so the device has finished it. Fused and composed
//! alternate, best of 5.
//!
//!     cargo run --release -p tessera-core --example gpu_kernel_bench [config]
//!
//! Attention heads wider than `ATTENTION_MAX_HEAD` (32) are composed either way.

use std::time::Instant;

use tessera_core::burn::module::Param;
use tessera_core::burn::nn::LayerNormConfig;
use tessera_core::burn::prelude::*;
use tessera_core::config::ModelConfig;
use tessera_core::kernels;

fn values(n: usize, seed: usize, device: &Device) -> Tensor<1> {
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed) % 1000) as f32 - 500.0) / 700.0)
        .collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Best time of `f` in ms with Tessera's kernels on and off, alternating.
fn time(name: &str, mut f: impl FnMut() -> f32) {
    let mut best = [f64::MAX; 2];
    for round in 0..7 {
        for (i, on) in [true, false].into_iter().enumerate() {
            kernels::set_enabled(on);
            let t = Instant::now();
            std::hint::black_box(f());
            // The first two rounds compile the kernels.
            if round >= 2 {
                best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    kernels::set_enabled(true);
    println!(
        "{name:34} fused {:8.2} ms   composed {:8.2} ms   ({:.2}x)",
        best[0],
        best[1],
        best[1] / best[0]
    );
}

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "baby".into());
    let cfg = ModelConfig::named(&name).expect("config");
    let (b, t, c, h, v) = (12, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size);
    let n = b * t;
    let device = Device::wgpu_options().init().expect("a wgpu adapter");
    let ad = device.autodiff();
    println!(
        "{name}: batch {b}, context {t}, width {c}, {h} heads of {}, vocabulary {v}",
        c / h
    );

    time(&format!("gelu [{n}, {}]", 4 * c), || {
        let x = values(n * 4 * c, 1, &ad).reshape([n, 4 * c]).require_grad();
        let up = values(n * 4 * c, 2, &ad).reshape([n, 4 * c]);
        let grads = (kernels::gelu(x.clone()) * up).sum().backward();
        x.grad(&grads).unwrap().slice([0..1, 0..1]).into_scalar()
    });
    time(&format!("layer norm [{n}, {c}]"), || {
        let x = values(n * c, 3, &ad).reshape([n, c]).require_grad();
        let up = values(n * c, 4, &ad).reshape([n, c]);
        let mut ln = LayerNormConfig::new(c).init(&ad);
        ln.gamma = Param::from_tensor(values(c, 5, &ad) + 1.0);
        let grads = (kernels::layer_norm(x.clone(), &ln) * up).sum().backward();
        x.grad(&grads).unwrap().slice([0..1, 0..1]).into_scalar()
    });
    time(&format!("causal attention [{n}, {}]", 3 * c), || {
        let qkv = values(n * 3 * c, 6, &ad).reshape([n, 3 * c]).require_grad();
        let up = values(n * c, 7, &ad).reshape([n, c]);
        let y = kernels::causal_attention(qkv.clone(), b, h);
        let grads = (y * up).sum().backward();
        qkv.grad(&grads).unwrap().slice([0..1, 0..1]).into_scalar()
    });
    time(&format!("cross-entropy [{n}, {v}]"), || {
        let logits = values(n * v, 8, &ad).reshape([n, v]).require_grad();
        let targets: Vec<i64> = (0..n).map(|i| (i * 31 % v) as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &ad);
        let grads = kernels::cross_entropy(logits.clone(), targets)
            .mean()
            .backward();
        logits
            .grad(&grads)
            .unwrap()
            .slice([0..1, 0..1])
            .into_scalar()
    });
}
