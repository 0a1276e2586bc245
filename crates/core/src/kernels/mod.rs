//! Fused kernels for the CPU (burn's `flex` backend, natively with rayon and in WASM with
//! SIMD128): GELU, LayerNorm, causal self-attention and softmax cross-entropy, each a forward
//! and a hand-written backward that replace the dozens of primitive ops (and intermediate
//! buffers) autodiff otherwise records for them.
//!
//! - [`math`]: vectorisable `exp`, `erf` (each also with fused multiply-adds), `sum`, `max`, `dot` and the row-parallel drivers;
//! - [`gelu`], [`layer_norm`], [`attention`], [`cross_entropy`]: the kernels on plain slices,
//!   each tested against a float64 reference and finite differences;
//! - [`linear`]: a linear layer's forward and backward as gemm calls on strided operands;
//! - [`adamw`]: the optimizer's step in one pass over a parameter, its moments and gradient;
//! - `ops` (with the `flex` feature): the burn backend extension that runs them for `Flex` and
//!   registers their backward for `Autodiff<Flex>`;
//! - [`quantize`] (with the `wgpu` feature): absmax int8 / int4 quantization on a wgpu or
//!   WebGPU device by the WGSL kernel in `shaders/`, for updates encoded where they live.
//!
//! The functions below are what the model calls. On a `flex` device with f32 tensors they run
//! the fused kernels; on any other device (wgpu / WebGPU) or when fusion is switched off with
//! [`set_enabled`], they compose burn's own ops, so every backend computes the same function.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
pub mod math;
#[cfg(feature = "flex")]
mod ops;
pub mod quantize;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::module::attention as sdpa;
use burn::tensor::ops::AttentionModuleOptions;

/// LayerNorm's epsilon (burn's and PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

static ENABLED: AtomicBool = AtomicBool::new(true);
static CALLS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SCOPED_OFF: Cell<bool> = const { Cell::new(false) };
}

/// Switches the fused kernels on (the default) or off for the whole process: off, the model
/// composes burn's primitive ops on every backend (for measuring one against the other).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused kernels are switched on for this thread.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) && !SCOPED_OFF.with(Cell::get)
}

/// Runs `f` with the fused kernels off on this thread only (other threads are unaffected).
pub fn without_fusion<T>(f: impl FnOnce() -> T) -> T {
    let before = SCOPED_OFF.with(|c| c.replace(true));
    let out = f();
    SCOPED_OFF.with(|c| c.set(before));
    out
}

/// How many fused operations this process has run (forward calls), to check a path uses them.
pub fn fused_calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Threads the CPU kernels (ours and flex's) run on: rayon's pool (`RAYON_NUM_THREADS`), or 1
/// without the `threads` feature.
pub fn threads() -> usize {
    #[cfg(feature = "threads")]
    return rayon::current_num_threads();
    #[cfg(not(feature = "threads"))]
    1
}

/// Whether `device` is a flex (CPU) device.
#[cfg(feature = "flex")]
fn is_flex(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Runs `f` (a training step) on a thread of rayon's pool when `device` is the threaded CPU
/// backend. Every parallel kernel and matrix product of the step then starts on a worker,
/// instead of a thread outside the pool handing each one over and sleeping until a worker
/// wakes it: that handover cost ~10% of a baby step on one thread and ~7% on two. Elsewhere
/// (one thread in WASM, a GPU device) `f` runs where it is called.
pub fn on_cpu_pool<T: Send>(device: &Device, f: impl FnOnce() -> T + Send) -> T {
    #[cfg(feature = "threads")]
    if is_flex(device) {
        return rayon::scope(|_| f());
    }
    let _ = device;
    f()
}

/// Whether a tensor on `device` of `dtype` takes the fused path.
fn fused(device: &Device, dtype: DType) -> bool {
    #[cfg(feature = "flex")]
    {
        let on = enabled() && dtype == DType::F32 && is_flex(device);
        if on {
            CALLS.fetch_add(1, Ordering::Relaxed);
        }
        on
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (device, dtype);
        false
    }
}

/// `l` applied to rows `x` `[n, d_in]`: `[n, d_out]`.
pub fn linear(x: Tensor<2>, l: &Linear) -> Tensor<2> {
    #[cfg(feature = "flex")]
    if let Some(bias) = &l.bias
        && fused(&x.device(), x.dtype())
    {
        return ops::linear(x, l.weight.val(), bias.val());
    }
    l.forward(x)
}

/// Exact (erf) GELU.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if fused(&x.device(), x.dtype()) {
        return ops::gelu(x);
    }
    burn::tensor::activation::gelu(x)
}

/// `ln` applied over the last dimension of rows `x` `[n, c]`.
pub fn layer_norm(x: Tensor<2>, ln: &LayerNorm) -> Tensor<2> {
    #[cfg(feature = "flex")]
    if fused(&x.device(), x.dtype()) {
        let [c] = ln.gamma.dims();
        let beta = match &ln.beta {
            Some(b) => b.val(),
            None => Tensor::zeros([c], &x.device()),
        };
        return ops::layer_norm(x, ln.gamma.val(), beta, LN_EPS as f32);
    }
    ln.forward(x)
}

/// Causal multi-head self-attention of `batch` sequences whose rows `qkv` `[batch·t, 3c]` hold
/// the queries, keys and values side by side; returns the heads' outputs merged, `[batch·t, c]`.
pub fn causal_attention(qkv: Tensor<2>, batch: usize, heads: usize) -> Tensor<2> {
    #[cfg(feature = "flex")]
    if fused(&qkv.device(), qkv.dtype()) {
        return ops::causal_attention(qkv, batch, heads);
    }
    let [n, c3] = qkv.dims();
    let (t, c) = (n / batch, c3 / 3);
    let dh = c / heads;
    let qkv = qkv.reshape([batch, t, c3]);
    let part = |i: usize| {
        qkv.clone()
            .narrow(2, i * c, c)
            .reshape([batch, t, heads, dh])
            .swap_dims(1, 2)
    };
    let opts = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    sdpa(part(0), part(1), part(2), None, None, opts)
        .swap_dims(1, 2)
        .reshape([n, c])
}

/// One AdamW step of the flat parameter `param` in one pass (see [`adamw`]), when its tensors
/// take the fused path: the parameter and its two moments. `Err` hands the inputs back for
/// burn's composed ops (another backend, or fusion off).
#[allow(clippy::type_complexity)]
pub fn adamw_step(
    param: Tensor<1>,
    grad: Tensor<1>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
    clip: Option<Tensor<1>>,
    scalars: &adamw::Scalars,
) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>), Box<AdamWInputs>> {
    #[cfg(feature = "flex")]
    if fused(&grad.device(), grad.dtype()) {
        let clip = clip.unwrap_or_else(|| Tensor::ones([1], &grad.device()));
        return Ok(ops::adamw_step(param, grad, moments, clip, scalars));
    }
    let _ = scalars;
    Err(Box::new(AdamWInputs {
        param,
        grad,
        moments,
        clip,
    }))
}

/// What [`adamw_step`] hands back when the step is not fused.
pub struct AdamWInputs {
    pub param: Tensor<1>,
    pub grad: Tensor<1>,
    pub moments: Option<(Tensor<1>, Tensor<1>)>,
    pub clip: Option<Tensor<1>>,
}

/// Mean softmax cross-entropy of `logits` `[n, vocab]` against `targets` `[n]`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    #[cfg(feature = "flex")]
    if fused(&logits.device(), logits.dtype()) {
        return ops::cross_entropy(logits, targets);
    }
    burn::nn::loss::CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, targets)
}
