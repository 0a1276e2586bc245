//! The WGSL GELU, LayerNorm, causal attention and cross-entropy (`shaders/`) against the CPU's
//! fused kernels (each tested against a float64 reference and finite differences), forward and
//! gradients, at shapes the PyTorch fixture (32 columns) does not reach: rows wider than a
//! workgroup, widths that are not a multiple of it, more rows than columns, sequences longer
//! than a workgroup, a vocabulary wider than a workgroup. Not against burn's composed ops on the
//! same device: their GELU backward is the derivative of the tanh approximation (burn-backend's
//! default `gelu_backward`), off the exact one by up to 7e-4 of the largest gradient here.

mod common;

use common::{max_rel_err, read};
use tessera_core::burn::module::Param;
use tessera_core::burn::nn::LayerNormConfig;
use tessera_core::burn::prelude::*;
use tessera_core::kernels;

/// `[n]` values of a fixed seed, roughly normal with standard deviation `scale` (a sum of
/// uniforms from a local generator: the backend's shared generator would interleave with
/// tests running beside this one), on `device`.
fn values(n: usize, seed: u64, scale: f64, device: &Device) -> Tensor<1> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            // Irwin-Hall: the sum of 12 uniforms less 6 has mean 0 and variance 1.
            let z: f64 = (0..12).map(|_| uniform()).sum::<f64>() - 6.0;
            (z * scale) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn flat(t: Tensor<2>) -> Vec<f32> {
    read(t.reshape([-1]))
}

/// GELU of `[n, c]` and its input gradient under a fixed upstream gradient.
fn gelu(device: &Device, n: usize, c: usize) -> [Vec<f32>; 2] {
    let ad = device.clone().autodiff();
    let x = values(n * c, 1, 3.0, &ad).reshape([n, c]).require_grad();
    let up = values(n * c, 2, 1.0, &ad).reshape([n, c]);
    let y = kernels::gelu(x.clone());
    let grads = (y.clone() * up).sum().backward();
    [flat(y.inner()), flat(x.grad(&grads).unwrap())]
}

/// LayerNorm of `[n, c]` (shifted, scaled rows; γ and β drawn) and its gradients to the
/// input, γ and β under a fixed upstream gradient.
fn layer_norm(device: &Device, n: usize, c: usize) -> [Vec<f32>; 4] {
    let ad = device.clone().autodiff();
    let x = (values(n * c, 3, 2.0, &ad) + 0.7)
        .reshape([n, c])
        .require_grad();
    let up = values(n * c, 4, 1.0, &ad).reshape([n, c]);
    let mut ln = LayerNormConfig::new(c).init(&ad);
    ln.gamma = Param::from_tensor(values(c, 5, 0.5, &ad) + 1.0);
    ln.beta = Some(Param::from_tensor(values(c, 6, 0.5, &ad)));
    let y = kernels::layer_norm(x.clone(), &ln);
    let grads = (y.clone() * up).sum().backward();
    let beta = ln.beta.as_ref().unwrap();
    [
        flat(y.inner()),
        flat(x.grad(&grads).unwrap()),
        read(ln.gamma.val().grad(&grads).unwrap()),
        read(beta.val().grad(&grads).unwrap()),
    ]
}

#[test]
fn wgsl_gelu_and_layer_norm_match_the_cpu_kernels() {
    let gpu = common::wgpu_device();
    let cpu = Device::flex();
    for (n, c) in [(768, 128), (96, 384), (300, 100), (5, 1000)] {
        let before = kernels::fused_calls();
        let got = (gelu(&gpu, n, c), layer_norm(&gpu, n, c));
        let want = (gelu(&cpu, n, c), layer_norm(&cpu, n, c));
        assert!(
            kernels::fused_calls() >= before + 4,
            "the fused kernels did not run"
        );
        let names = ["gelu", "gelu dx", "ln", "ln dx", "ln dgamma", "ln dbeta"];
        let got = got.0.iter().chain(&got.1);
        let want = want.0.iter().chain(&want.1);
        for ((name, got), want) in names.iter().zip(got).zip(want) {
            let e = max_rel_err(got, want);
            eprintln!("[{n}, {c}] {name}: max rel err {e:e}");
            assert!(e < 1e-5, "[{n}, {c}] {name} differs by {e:e}");
        }
    }
}

/// Causal attention of `batch` sequences of `t` rows, `heads` heads of `dh`, and its gradient
/// to `qkv` under a fixed upstream gradient.
fn attention(device: &Device, batch: usize, t: usize, heads: usize, dh: usize) -> [Vec<f32>; 2] {
    let ad = device.clone().autodiff();
    let (n, c) = (batch * t, heads * dh);
    let qkv = values(n * 3 * c, 7, 1.0, &ad)
        .reshape([n, 3 * c])
        .require_grad();
    let up = values(n * c, 8, 1.0, &ad).reshape([n, c]);
    let y = kernels::causal_attention(qkv.clone(), batch, heads);
    let grads = (y.clone() * up).sum().backward();
    [flat(y.inner()), flat(qkv.grad(&grads).unwrap())]
}

#[test]
fn wgsl_attention_matches_the_cpu_kernel() {
    let gpu = common::wgpu_device();
    let cpu = Device::flex();
    // baby's shape; sequences longer than a workgroup and not a multiple of it; the longest
    // sequences and widest heads it takes.
    for (batch, t, heads, dh) in [(12, 64, 4, 32), (2, 100, 3, 16), (1, 256, 6, 32)] {
        let before = kernels::fused_calls();
        let got = attention(&gpu, batch, t, heads, dh);
        let want = attention(&cpu, batch, t, heads, dh);
        assert!(
            kernels::fused_calls() >= before + 2,
            "the fused kernels did not run"
        );
        for (name, got, want) in [("y", &got[0], &want[0]), ("dqkv", &got[1], &want[1])] {
            let e = max_rel_err(got, want);
            eprintln!("[{batch}, {t}, {heads}, {dh}] attention {name}: max rel err {e:e}");
            assert!(
                e < 1e-5,
                "[{batch}, {t}, {heads}, {dh}] attention {name} differs by {e:e}"
            );
        }
    }
}

/// Mean cross-entropy of `[n, vocab]` logits against fixed targets, and its gradient.
fn cross_entropy(device: &Device, n: usize, vocab: usize) -> [Vec<f32>; 2] {
    let ad = device.clone().autodiff();
    let logits = values(n * vocab, 9, 3.0, &ad)
        .reshape([n, vocab])
        .require_grad();
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919) % vocab) as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &ad);
    let loss = kernels::cross_entropy(logits.clone(), targets);
    let grads = loss.clone().backward();
    [read(loss.inner()), flat(logits.grad(&grads).unwrap())]
}

#[test]
fn wgsl_cross_entropy_matches_the_cpu_kernel() {
    let gpu = common::wgpu_device();
    let cpu = Device::flex();
    // baby's vocabulary (one workgroup's lanes cover it); a row wider than a workgroup.
    for (n, vocab) in [(768, 65), (300, 1000)] {
        let before = kernels::fused_calls();
        let got = cross_entropy(&gpu, n, vocab);
        let want = cross_entropy(&cpu, n, vocab);
        assert!(
            kernels::fused_calls() >= before + 2,
            "the fused kernels did not run"
        );
        for (name, got, want) in [("loss", &got[0], &want[0]), ("dlogits", &got[1], &want[1])] {
            let e = max_rel_err(got, want);
            eprintln!("[{n}, {vocab}] cross-entropy {name}: max rel err {e:e}");
            assert!(
                e < 1e-5,
                "[{n}, {vocab}] cross-entropy {name} differs by {e:e}"
            );
        }
    }
}
