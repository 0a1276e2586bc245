//! Fused GELU, LayerNorm, causal self-attention, softmax cross-entropy and AdamW for wgpu /
//! WebGPU: our WGSL kernels (`shaders/`) run through burn's backend extension for `Cube` (and
//! `Fusion<Cube>` in the tab), with a hand-written backward registered under `Autodiff` over
//! either. Under autodiff burn composes GELU of 5 primitive ops and LayerNorm of 9, each its own
//! dispatch and buffer, forward and (twice as many) backward; here each is one dispatch forward,
//! one (GELU) or two (LayerNorm) backward. Attention goes from the fused `qkv` projection to
//! merged heads in one dispatch (an online softmax a query row, the log-sum-exp kept) and back
//! in two (queries, then keys and values), with no `T×T` buffer. Cross-entropy is one dispatch a
//! way (the log-sum-exp kept), plus burn's mean over rows. AdamW steps a parameter in one
//! dispatch where burn's composed step takes a dozen.
//!
//! The same functions as the CPU kernels, by the same formulas (erf by the same rational
//! polynomial, LayerNorm's variance about the mean in a second pass, AdamW's f32 operations in
//! the same order), summed in another order: a GPU and a CPU agree to rounding, not bit for bit.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate};
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, TensorMetadata, backend_extension,
};
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::KernelArguments;
use burn::cubecl::{CubeCount, CubeDim};
use burn::prelude::*;
use burn::tensor::{DType, Shape};

const INDEX: &str = include_str!("../../../../shaders/index.wgsl");
const ERF: &str = include_str!("../../../../shaders/erf.wgsl");
const GELU_FORWARD: &str = include_str!("../../../../shaders/gelu_forward.wgsl");
const GELU_BACKWARD: &str = include_str!("../../../../shaders/gelu_backward.wgsl");
const WORKGROUP_SUM: &str = include_str!("../../../../shaders/workgroup_sum.wgsl");
const LN_FORWARD: &str = include_str!("../../../../shaders/layer_norm_forward.wgsl");
const LN_BACKWARD: &str = include_str!("../../../../shaders/layer_norm_backward.wgsl");
const LN_PARAMS: &str = include_str!("../../../../shaders/layer_norm_params.wgsl");
const ATTENTION: &str = include_str!("../../../../shaders/attention_common.wgsl");
const ATTENTION_FORWARD: &str = include_str!("../../../../shaders/attention_forward.wgsl");
const ATTENTION_QUERIES: &str = include_str!("../../../../shaders/attention_backward_queries.wgsl");
const ATTENTION_KEYS: &str = include_str!("../../../../shaders/attention_backward_keys.wgsl");
const ADAMW: &str = include_str!("../../../../shaders/adamw.wgsl");
const CE_FORWARD: &str = include_str!("../../../../shaders/cross_entropy_forward.wgsl");
const CE_BACKWARD: &str = include_str!("../../../../shaders/cross_entropy_backward.wgsl");

/// The widest head the fused attention takes; wider heads go to burn's composed ops. An
/// invocation keeps four head-wide arrays: on lavapipe, forward + backward at heads of 32 ran
/// 1.9–4.5× faster than the composed ops (T = 64, 128, 256), at heads of 64 1.1–1.3× slower
/// (T = 128, 256) and even at T = 64 (BENCHMARKS.md, #17).
pub(super) const ATTENTION_MAX_HEAD: usize = 32;

/// Workgroups a dispatch dimension may hold (WebGPU's guaranteed limit).
const MAX_GROUPS: usize = 65_535;

/// The fused operations on a GPU. `Cube` (and `Fusion<Cube>`) run them; `Autodiff` over either
/// records the backward of GELU, LayerNorm, attention and cross-entropy (the `_backward`
/// operations and AdamW are not differentiable).
#[backend_extension(
    Cube,
    Fusion: cfg(feature = "fusion"),
    Autodiff,
)]
pub trait GpuFusedOps: Backend {
    /// Exact GELU of an f32 tensor.
    #[fusion(dtype = x, shape = x)]
    fn gpu_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// GELU's input gradient from its input and output gradient.
    #[fusion(dtype = x, shape = x)]
    fn gpu_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension of rows `x` `[n, c]`: the output and each row's mean
    /// and 1/std, `[n, 2]`.
    #[fusion(meta = layer_norm_specs)]
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// LayerNorm's gradients to `x`, `gamma` and `beta` from the forward's statistics.
    #[fusion(meta = layer_norm_backward_specs)]
    fn gpu_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Causal self-attention from `qkv` `[batch·t, 3c]` to `[batch·t, c]`, and each row's
    /// log-sum-exp `[batch·heads·t]`.
    #[fusion(meta = attention_specs)]
    fn gpu_attention(
        qkv: FloatTensor<Self>,
        batch: usize,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Attention's gradient to `qkv` from the forward's input, output and log-sum-exp.
    #[fusion(dtype = qkv, shape = qkv)]
    fn gpu_attention_backward(
        qkv: FloatTensor<Self>,
        y: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        batch: usize,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// Softmax cross-entropy of each row of `logits` `[n, vocab]` against `targets` `[n]`
    /// (i32): the losses `[n]` and each row's log-sum-exp `[n]`.
    #[fusion(meta = cross_entropy_specs)]
    fn gpu_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Cross-entropy's gradient to the logits from the forward's log-sum-exp and the losses'
    /// gradient `[n]`.
    #[fusion(dtype = logits, shape = logits)]
    fn gpu_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// One AdamW step of a flat parameter from its gradient times `clip` (`[1]`) and its two
    /// moments: the three updated (see `kernels::adamw`). Not differentiable.
    #[fusion(meta = adamw_specs)]
    #[allow(clippy::too_many_arguments)]
    fn gpu_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        clip: FloatTensor<Self>,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        bias_correction2: f32,
        eps: f32,
        step_size: f32,
        decay: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

#[cfg(feature = "fusion")]
use burn::backend::fusion::custom::TensorSpec;

#[cfg(feature = "fusion")]
fn layer_norm_specs(
    x: &TensorSpec,
    _gamma: &TensorSpec,
    _beta: &TensorSpec,
    _eps: &f32,
) -> (TensorSpec, TensorSpec) {
    let n = x.shape[0];
    (
        TensorSpec::new(x.shape.clone(), DType::F32),
        TensorSpec::new(Shape::new([n, 2]), DType::F32),
    )
}

#[cfg(feature = "fusion")]
fn layer_norm_backward_specs(
    x: &TensorSpec,
    gamma: &TensorSpec,
    _stats: &TensorSpec,
    _dy: &TensorSpec,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (
        TensorSpec::new(x.shape.clone(), DType::F32),
        TensorSpec::new(gamma.shape.clone(), DType::F32),
        TensorSpec::new(gamma.shape.clone(), DType::F32),
    )
}

#[cfg(feature = "fusion")]
fn attention_specs(qkv: &TensorSpec, batch: &usize, heads: &usize) -> (TensorSpec, TensorSpec) {
    let s = super::attention::Shape::of(qkv.shape[0], qkv.shape[1], *batch, *heads);
    (
        TensorSpec::new(Shape::new([s.batch * s.t, s.c()]), DType::F32),
        TensorSpec::new(Shape::new([s.batch * s.heads * s.t]), DType::F32),
    )
}

#[cfg(feature = "fusion")]
#[allow(clippy::too_many_arguments)]
fn adamw_specs(
    param: &TensorSpec,
    _grad: &TensorSpec,
    _exp_avg: &TensorSpec,
    _exp_avg_sq: &TensorSpec,
    _clip: &TensorSpec,
    _beta1: &f32,
    _one_minus_beta1: &f32,
    _beta2: &f32,
    _one_minus_beta2: &f32,
    _bias_correction2: &f32,
    _eps: &f32,
    _step_size: &f32,
    _decay: &f32,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let spec = || TensorSpec::new(param.shape.clone(), DType::F32);
    (spec(), spec(), spec())
}

#[cfg(feature = "fusion")]
fn cross_entropy_specs(logits: &TensorSpec, _targets: &TensorSpec) -> (TensorSpec, TensorSpec) {
    let spec = || TensorSpec::new(Shape::new([logits.shape[0]]), DType::F32);
    (spec(), spec())
}

/// One of our WGSL kernels, with the preludes it needs (the attention kernels: for heads of
/// `dh` values).
#[derive(Clone, Copy, Debug)]
enum Kernel {
    GeluForward,
    GeluBackward,
    LayerNormForward,
    LayerNormBackward,
    LayerNormParams,
    AttentionForward { dh: usize },
    AttentionQueries { dh: usize },
    AttentionKeys { dh: usize },
    AdamW,
    CrossEntropyForward,
    CrossEntropyBackward,
}

impl KernelSource for Kernel {
    fn source(&self) -> SourceTemplate {
        let (prelude, body) = match self {
            Kernel::GeluForward => (ERF, GELU_FORWARD),
            Kernel::GeluBackward => (ERF, GELU_BACKWARD),
            Kernel::LayerNormForward => (WORKGROUP_SUM, LN_FORWARD),
            Kernel::LayerNormBackward => (WORKGROUP_SUM, LN_BACKWARD),
            Kernel::LayerNormParams => (WORKGROUP_SUM, LN_PARAMS),
            Kernel::AttentionForward { .. } => (ATTENTION, ATTENTION_FORWARD),
            Kernel::AttentionQueries { .. } => (ATTENTION, ATTENTION_QUERIES),
            Kernel::AttentionKeys { .. } => (ATTENTION, ATTENTION_KEYS),
            Kernel::AdamW => ("", ADAMW),
            Kernel::CrossEntropyForward => (WORKGROUP_SUM, CE_FORWARD),
            Kernel::CrossEntropyBackward => ("", CE_BACKWARD),
        };
        let template = SourceTemplate::new(INDEX)
            .add_template(prelude)
            .add_template(body);
        match self {
            Kernel::AttentionForward { dh }
            | Kernel::AttentionQueries { dh }
            | Kernel::AttentionKeys { dh } => template.register("dh", dh.to_string()),
            _ => template,
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(format!("{self:?}"))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// An f32 tensor like `like` (same device) of `shape`, its values not yet written.
fn empty(like: &CubeTensor, shape: impl Into<Shape>) -> CubeTensor {
    let shape = shape.into();
    let bytes = shape.num_elements().max(1) * 4;
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        like.client.empty(bytes),
        DType::F32,
    )
}

/// `t` laid out contiguously, checked to be f32.
fn contiguous(t: CubeTensor) -> CubeTensor {
    assert_eq!(t.dtype, DType::F32, "the GPU's fused kernels run on f32");
    burn::backend::wgpu::into_contiguous(t)
}

/// Launches `kernel` as `groups` workgroups of `group` invocations (spilling into y past
/// WebGPU's 65,535 a dimension) on `like`'s device over `tensors` and then `info`.
fn launch(kernel: Kernel, group: u32, groups: usize, tensors: &[&CubeTensor], info: &[u32]) {
    let Some(first) = tensors.first() else {
        return;
    };
    if groups == 0 {
        return;
    }
    let client = &first.client;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut buffers: Vec<_> = tensors.iter().map(|t| t.handle.clone().binding()).collect();
    buffers.push(client.create_from_slice(&bytes).binding());
    let x = groups.min(MAX_GROUPS);
    let y = groups.div_ceil(MAX_GROUPS);
    client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(group))),
        CubeCount::Static(x as u32, y as u32, 1),
        KernelArguments::new().with_buffers(buffers),
    );
}

/// Targets as contiguous 32-bit integers (what WGSL reads).
fn int32(t: CubeTensor) -> CubeTensor {
    assert!(
        matches!(t.dtype, DType::I32 | DType::U32),
        "cross-entropy on a GPU: targets of {:?}, not 32-bit integers",
        t.dtype
    );
    burn::backend::wgpu::into_contiguous(t)
}

/// Rows and columns of a LayerNorm input.
fn rows(x: &CubeTensor) -> (usize, usize) {
    let shape = x.shape();
    let c = shape[shape.num_dims() - 1];
    (shape.num_elements() / c.max(1), c)
}

/// Invocations a workgroup of the elementwise kernels, and of the row kernels (`LANES`).
const ELEMENTWISE: usize = 256;
const LANES: u32 = 64;

impl GpuFusedOps for CubeBackend {
    fn gpu_gelu(x: CubeTensor) -> CubeTensor {
        let x = contiguous(x);
        let len = x.shape().num_elements();
        let y = empty(&x, x.shape());
        let groups = len.div_ceil(ELEMENTWISE);
        launch(
            Kernel::GeluForward,
            ELEMENTWISE as u32,
            groups,
            &[&x, &y],
            &[len as u32],
        );
        y
    }

    fn gpu_gelu_backward(x: CubeTensor, dy: CubeTensor) -> CubeTensor {
        let (x, dy) = (contiguous(x), contiguous(dy));
        let len = x.shape().num_elements();
        assert_eq!(
            len,
            dy.shape().num_elements(),
            "gelu backward: sizes differ"
        );
        let dx = empty(&x, x.shape());
        let groups = len.div_ceil(ELEMENTWISE);
        launch(
            Kernel::GeluBackward,
            ELEMENTWISE as u32,
            groups,
            &[&x, &dy, &dx],
            &[len as u32],
        );
        dx
    }

    fn gpu_layer_norm(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        eps: f32,
    ) -> (CubeTensor, CubeTensor) {
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let (n, c) = rows(&x);
        let y = empty(&x, x.shape());
        let stats = empty(&x, [n, 2]);
        launch(
            Kernel::LayerNormForward,
            LANES,
            n,
            &[&x, &gamma, &beta, &y, &stats],
            &[n as u32, c as u32, eps.to_bits()],
        );
        (y, stats)
    }

    fn gpu_layer_norm_backward(
        x: CubeTensor,
        gamma: CubeTensor,
        stats: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (x, gamma) = (contiguous(x), contiguous(gamma));
        let (stats, dy) = (contiguous(stats), contiguous(dy));
        let (n, c) = rows(&x);
        let info = [n as u32, c as u32];
        let dx = empty(&x, x.shape());
        let dgamma = empty(&x, [c]);
        let dbeta = empty(&x, [c]);
        launch(
            Kernel::LayerNormBackward,
            LANES,
            n,
            &[&x, &gamma, &stats, &dy, &dx],
            &info,
        );
        launch(
            Kernel::LayerNormParams,
            LANES,
            c,
            &[&x, &stats, &dy, &dgamma, &dbeta],
            &info,
        );
        (dx, dgamma, dbeta)
    }

    fn gpu_attention(qkv: CubeTensor, batch: usize, heads: usize) -> (CubeTensor, CubeTensor) {
        let qkv = contiguous(qkv);
        let s = attention_shape(&qkv, batch, heads);
        let y = empty(&qkv, [batch * s.t, s.c()]);
        let lse = empty(&qkv, [batch * heads * s.t]);
        launch(
            Kernel::AttentionForward { dh: s.dh },
            LANES,
            attention_groups(s),
            &[&qkv, &y, &lse],
            &attention_info(s),
        );
        (y, lse)
    }

    fn gpu_attention_backward(
        qkv: CubeTensor,
        y: CubeTensor,
        lse: CubeTensor,
        dy: CubeTensor,
        batch: usize,
        heads: usize,
    ) -> CubeTensor {
        let (qkv, y, lse, dy) = (
            contiguous(qkv),
            contiguous(y),
            contiguous(lse),
            contiguous(dy),
        );
        let s = attention_shape(&qkv, batch, heads);
        let dqkv = empty(&qkv, qkv.shape());
        let dd = empty(&qkv, [batch * heads * s.t]);
        let (groups, info) = (attention_groups(s), attention_info(s));
        launch(
            Kernel::AttentionQueries { dh: s.dh },
            LANES,
            groups,
            &[&qkv, &y, &lse, &dy, &dqkv, &dd],
            &info,
        );
        launch(
            Kernel::AttentionKeys { dh: s.dh },
            LANES,
            groups,
            &[&qkv, &lse, &dy, &dd, &dqkv],
            &info,
        );
        dqkv
    }

    fn gpu_cross_entropy(logits: CubeTensor, targets: CubeTensor) -> (CubeTensor, CubeTensor) {
        let (logits, targets) = (contiguous(logits), int32(targets));
        let (n, vocab) = rows(&logits);
        let losses = empty(&logits, [n]);
        let lse = empty(&logits, [n]);
        launch(
            Kernel::CrossEntropyForward,
            LANES,
            n,
            &[&logits, &targets, &losses, &lse],
            &[n as u32, vocab as u32],
        );
        (losses, lse)
    }

    fn gpu_cross_entropy_backward(
        logits: CubeTensor,
        targets: CubeTensor,
        lse: CubeTensor,
        dloss: CubeTensor,
    ) -> CubeTensor {
        let (logits, targets) = (contiguous(logits), int32(targets));
        let (lse, dloss) = (contiguous(lse), contiguous(dloss));
        let (n, vocab) = rows(&logits);
        let dlogits = empty(&logits, logits.shape());
        launch(
            Kernel::CrossEntropyBackward,
            ELEMENTWISE as u32,
            (n * vocab).div_ceil(ELEMENTWISE),
            &[&logits, &targets, &lse, &dloss, &dlogits],
            &[n as u32, vocab as u32],
        );
        dlogits
    }

    fn gpu_adamw(
        param: CubeTensor,
        grad: CubeTensor,
        exp_avg: CubeTensor,
        exp_avg_sq: CubeTensor,
        clip: CubeTensor,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        bias_correction2: f32,
        eps: f32,
        step_size: f32,
        decay: f32,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let [param, grad, m, v, clip] = [param, grad, exp_avg, exp_avg_sq, clip].map(contiguous);
        let len = param.shape().num_elements();
        for t in [&grad, &m, &v] {
            assert_eq!(
                t.shape().num_elements(),
                len,
                "adamw: parameter, moments and gradient differ in size"
            );
        }
        let out = [(); 3].map(|_| empty(&param, param.shape()));
        let scalars = [
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            bias_correction2,
            eps,
            step_size,
            decay,
        ];
        let mut info = vec![len as u32];
        info.extend(scalars.map(f32::to_bits));
        launch(
            Kernel::AdamW,
            ELEMENTWISE as u32,
            len.div_ceil(ELEMENTWISE),
            &[&param, &grad, &m, &v, &clip, &out[0], &out[1], &out[2]],
            &info,
        );
        let [p, m, v] = out;
        (p, m, v)
    }
}

/// The attention shape of `qkv` `[batch·t, 3c]`.
fn attention_shape(qkv: &CubeTensor, batch: usize, heads: usize) -> super::attention::Shape {
    let dims = qkv.shape();
    super::attention::Shape::of(dims[0], dims[dims.num_dims() - 1], batch, heads)
}

/// A workgroup per (sequence, head, block of `LANES` rows).
fn attention_groups(s: super::attention::Shape) -> usize {
    s.batch * s.heads * s.t.div_ceil(LANES as usize)
}

fn attention_info(s: super::attention::Shape) -> [u32; 3] {
    [s.batch as u32, s.t as u32, s.heads as u32]
}

#[derive(Debug)]
struct GeluBackward;

impl<B: Backend + GpuFusedOps> Backward<B, 1> for GeluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::gpu_gelu_backward(ops.state, grad));
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: Backend + GpuFusedOps> Backward<B, 3> for LayerNormBackward {
    /// Input, gamma, statistics.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, stats) = ops.state;
        let (dx, dgamma, dbeta) = B::gpu_layer_norm_backward(x, gamma, stats, grad);
        // A frozen gamma or beta (a fragment unit's) has no node: its gradient is dropped.
        let [px, pg, pb] = ops.parents;
        for (parent, g) in [(px, dx), (pg, dgamma), (pb, dbeta)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend + GpuFusedOps> Backward<B, 1> for AttentionBackward {
    /// Input, output, log-sum-exp, sequences, heads.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            let (qkv, y, lse, batch, heads) = ops.state;
            let d = B::gpu_attention_backward(qkv, y, lse, grad, batch, heads);
            grads.register::<B>(node.id, d);
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: Backend + GpuFusedOps> Backward<B, 1> for CrossEntropyBackward {
    /// Logits, targets, log-sum-exp.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            let (logits, targets, lse) = ops.state;
            let d = B::gpu_cross_entropy_backward(logits, targets, lse, grad);
            grads.register::<B>(node.id, d);
        }
    }
}

impl<B: Backend + GpuFusedOps, C: CheckpointStrategy> GpuFusedOps for Autodiff<B, C> {
    /// The losses are tracked; the log-sum-exp is not.
    fn gpu_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let l = logits.primitive().clone();
                let (losses, lse) = B::gpu_cross_entropy(l.clone(), targets.clone());
                let out = prep.finish((l, targets, lse.clone()), losses);
                (out, Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (losses, lse) = B::gpu_cross_entropy(logits.into_primitive(), targets);
                (prep.finish(losses), Self::from_inner(lse))
            }
        }
    }

    /// Not differentiable: runs on the inner tensors, untracked.
    fn gpu_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::gpu_cross_entropy_backward(
            Self::inner(logits),
            targets,
            Self::inner(lse),
            Self::inner(dloss),
        ))
    }

    /// The output is tracked; the log-sum-exp is not.
    fn gpu_attention(
        qkv: FloatTensor<Self>,
        batch: usize,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match AttentionBackward
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = qkv.primitive().clone();
                let (y, lse) = B::gpu_attention(x.clone(), batch, heads);
                let out = prep.finish((x, y.clone(), lse.clone(), batch, heads), y);
                (out, Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (y, lse) = B::gpu_attention(qkv.into_primitive(), batch, heads);
                (prep.finish(y), Self::from_inner(lse))
            }
        }
    }

    /// An optimizer step is never recorded: it runs on the inner tensors, untracked.
    fn gpu_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        clip: FloatTensor<Self>,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        bias_correction2: f32,
        eps: f32,
        step_size: f32,
        decay: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (p, m, v) = B::gpu_adamw(
            Self::inner(param),
            Self::inner(grad),
            Self::inner(exp_avg),
            Self::inner(exp_avg_sq),
            Self::inner(clip),
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            bias_correction2,
            eps,
            step_size,
            decay,
        );
        (
            Self::from_inner(p),
            Self::from_inner(m),
            Self::from_inner(v),
        )
    }

    /// Not differentiable: runs on the inner tensors, untracked.
    fn gpu_attention_backward(
        qkv: FloatTensor<Self>,
        y: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        batch: usize,
        heads: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::gpu_attention_backward(
            Self::inner(qkv),
            Self::inner(y),
            Self::inner(lse),
            Self::inner(dy),
            batch,
            heads,
        ))
    }

    fn gpu_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                let y = B::gpu_gelu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gpu_gelu(x.into_primitive())),
        }
    }

    /// Not differentiable: runs on the inner tensors, untracked.
    fn gpu_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::gpu_gelu_backward(Self::inner(x), Self::inner(dy)))
    }

    /// The output is tracked; the statistics are not.
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, g) = (x.primitive().clone(), gamma.primitive().clone());
                let (y, stats) =
                    B::gpu_layer_norm(x.clone(), g.clone(), beta.into_primitive(), eps);
                let y = prep.finish((x, g, stats.clone()), y);
                (y, Self::from_inner(stats))
            }
            OpsKind::UnTracked(prep) => {
                let (y, stats) = B::gpu_layer_norm(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    eps,
                );
                (prep.finish(y), Self::from_inner(stats))
            }
        }
    }

    /// Not differentiable: runs on the inner tensors, untracked.
    fn gpu_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dg, db) = B::gpu_layer_norm_backward(
            Self::inner(x),
            Self::inner(gamma),
            Self::inner(stats),
            Self::inner(dy),
        );
        (
            Self::from_inner(dx),
            Self::from_inner(dg),
            Self::from_inner(db),
        )
    }
}

/// Exact GELU on a wgpu / WebGPU device.
pub(super) fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GpuFusedOps>::gpu_gelu(x.into_dispatch()))
}

/// LayerNorm over the last dimension of rows on a wgpu / WebGPU device.
pub(super) fn layer_norm(x: Tensor<2>, gamma: Tensor<1>, beta: Tensor<1>, eps: f32) -> Tensor<2> {
    let (y, _stats) = <Dispatch as GpuFusedOps>::gpu_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    );
    Tensor::from_dispatch(y)
}

/// Causal self-attention of `batch` sequences from `qkv` `[batch·t, 3c]` on a wgpu / WebGPU
/// device: `[batch·t, c]`.
pub(super) fn causal_attention(qkv: Tensor<2>, batch: usize, heads: usize) -> Tensor<2> {
    let (y, _lse) = <Dispatch as GpuFusedOps>::gpu_attention(qkv.into_dispatch(), batch, heads);
    Tensor::from_dispatch(y)
}

/// A flat parameter, its gradient and moments after one AdamW step on a wgpu / WebGPU device
/// (see `kernels::adamw`).
pub(super) fn adamw_step(
    param: Tensor<1>,
    grad: Tensor<1>,
    (m, v): (Tensor<1>, Tensor<1>),
    clip: Tensor<1>,
    s: &super::adamw::Scalars,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (p, m, v) = <Dispatch as GpuFusedOps>::gpu_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        clip.into_dispatch(),
        s.beta1,
        s.one_minus_beta1,
        s.beta2,
        s.one_minus_beta2,
        s.bias_correction2,
        s.eps,
        s.step_size,
        s.decay,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// Mean softmax cross-entropy `[1]` of `logits` `[n, vocab]` against `targets` `[n]` on a
/// wgpu / WebGPU device: the rows' losses fused, their mean burn's.
pub(super) fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let targets = targets.cast(burn::tensor::IntDType::I32);
    let (losses, _lse) = <Dispatch as GpuFusedOps>::gpu_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    );
    Tensor::<1>::from_dispatch(losses).mean()
}
