//! The WGSL GELU and LayerNorm (`shaders/`) against the CPU's fused kernels (each tested against
//! a float64 reference and finite differences), forward and gradients, at shapes the PyTorch
//! fixture (32 columns) does not reach: rows wider than a workgroup, widths that are not a
//! multiple of it, more rows than columns. Not against burn's composed ops on the same device:
//! their GELU backward is the derivative of the tanh approximation (burn-backend's default
//! `gelu_backward`), off the exact one by up to 7e-4 of the largest gradient at these inputs.

mod common;

use common::{max_rel_err, read};
use tessera_core::burn::module::Param;
use tessera_core::burn::nn::LayerNormConfig;
use tessera_core::burn::prelude::*;
use tessera_core::burn::tensor::Distribution;
use tessera_core::kernels;

/// `[n]` normal values of a fixed seed, drawn on the CPU and moved to `device`, so that the
/// fused and the composed run see the same.
fn values(n: usize, seed: u64, scale: f64, device: &Device) -> Tensor<1> {
    let cpu = Device::flex();
    cpu.seed(seed);
    let t = Tensor::<1>::random([n], Distribution::Normal(0.0, scale), &cpu);
    Tensor::from_data(t.into_data(), device)
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
