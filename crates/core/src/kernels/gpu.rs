//! Fused GELU and LayerNorm for wgpu / WebGPU: our WGSL kernels (`shaders/`) run through burn's
//! backend extension for `Cube` (and `Fusion<Cube>` in the tab), with a hand-written backward
//! registered under `Autodiff` over either. Under autodiff burn composes GELU of 5 primitive ops
//! and LayerNorm of 9, each its own dispatch and buffer, forward and (twice as many) backward;
//! here each is one dispatch forward, one (GELU) or two (LayerNorm) backward.
//!
//! The same functions as the CPU kernels (`gelu`, `layer_norm`), the same formulas (erf by the
//! same rational polynomial, LayerNorm's variance about the mean in a second pass), summed in
//! another order: a GPU and a CPU agree to rounding, not bit for bit.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate};
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, TensorMetadata, backend_extension,
};
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::KernelArguments;
use burn::cubecl::{CubeCount, CubeDim};
use burn::prelude::*;
use burn::tensor::{DType, Shape};

const ERF: &str = include_str!("../../../../shaders/erf.wgsl");
const GELU_FORWARD: &str = include_str!("../../../../shaders/gelu_forward.wgsl");
const GELU_BACKWARD: &str = include_str!("../../../../shaders/gelu_backward.wgsl");
const WORKGROUP_SUM: &str = include_str!("../../../../shaders/workgroup_sum.wgsl");
const LN_FORWARD: &str = include_str!("../../../../shaders/layer_norm_forward.wgsl");
const LN_BACKWARD: &str = include_str!("../../../../shaders/layer_norm_backward.wgsl");
const LN_PARAMS: &str = include_str!("../../../../shaders/layer_norm_params.wgsl");

/// Workgroups a dispatch dimension may hold (WebGPU's guaranteed limit).
const MAX_GROUPS: usize = 65_535;

/// GELU and LayerNorm on a GPU. `Cube` (and `Fusion<Cube>`) run them; `Autodiff` over either
/// records GELU's and LayerNorm's backward (the `_backward` operations are not differentiable).
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

/// One of our WGSL kernels, with the preludes it needs.
#[derive(Clone, Copy)]
enum Kernel {
    GeluForward,
    GeluBackward,
    LayerNormForward,
    LayerNormBackward,
    LayerNormParams,
}

impl KernelSource for Kernel {
    fn source(&self) -> SourceTemplate {
        let (prelude, body) = match self {
            Kernel::GeluForward => (ERF, GELU_FORWARD),
            Kernel::GeluBackward => (ERF, GELU_BACKWARD),
            Kernel::LayerNormForward => (WORKGROUP_SUM, LN_FORWARD),
            Kernel::LayerNormBackward => (WORKGROUP_SUM, LN_BACKWARD),
            Kernel::LayerNormParams => (WORKGROUP_SUM, LN_PARAMS),
        };
        SourceTemplate::new(prelude).add_template(body)
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(*self as u32)
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

impl<B: Backend + GpuFusedOps, C: CheckpointStrategy> GpuFusedOps for Autodiff<B, C> {
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
