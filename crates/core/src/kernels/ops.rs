//! The fused kernels as a burn backend extension: forward passes for `Flex`, and for
//! `Autodiff<Flex>` the same forward registered with a hand-written backward.

use std::borrow::Cow;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, Flex, TensorMetadata, backend_extension,
};
use burn::prelude::*;
use burn::tensor::{DType, Shape};

use super::{
    adamw, attention, cross_entropy as ce, dropout as drop, gelu as gelu_k, layer_norm as ln_k,
    linear as lin,
};

/// The fused operations. `Flex` runs them; `Autodiff` (over `Flex`) records their backward.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `x·W + b` on rows: `x` `[n, k]`, `W` `[k, m]`, `b` `[m]`.
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Dropout with the mask of keys `key0`, `key1` and drop probability `prob`.
    fn fused_dropout(x: FloatTensor<Self>, key0: u32, key1: u32, prob: f64) -> FloatTensor<Self>;
    /// Exact GELU.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
    /// Causal self-attention from `qkv` `[batch·t, 3c]` to `[batch·t, c]`.
    fn fused_attention(qkv: FloatTensor<Self>, batch: usize, heads: usize) -> FloatTensor<Self>;
    /// Mean cross-entropy `[1]` of logits `[n, vocab]` against targets `[n]`.
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    /// One AdamW step of a flat parameter from its gradient times `clip` (`[1]`) and its two
    /// moments (zeros before the first step). Returns the three updated. Not differentiable.
    #[allow(clippy::too_many_arguments)]
    fn fused_adamw(
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

pub(super) fn linear(x: Tensor<2>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

pub(super) fn dropout<const D: usize>(x: Tensor<D>, keys: [u32; 2], prob: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dropout(
        x.into_dispatch(),
        keys[0],
        keys[1],
        prob,
    ))
}

pub(super) fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

pub(super) fn layer_norm(x: Tensor<2>, gamma: Tensor<1>, beta: Tensor<1>, eps: f32) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

pub(super) fn causal_attention(qkv: Tensor<2>, batch: usize, heads: usize) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        qkv.into_dispatch(),
        batch,
        heads,
    ))
}

pub(super) fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// A flat parameter, its gradient and moments after one AdamW step (see [`adamw`]).
pub(super) fn adamw_step(
    param: Tensor<1>,
    grad: Tensor<1>,
    (m, v): (Tensor<1>, Tensor<1>),
    clip: Tensor<1>,
    s: &adamw::Scalars,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (p, m, v) = <Dispatch as FusedOps>::fused_adamw(
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

/// `t` as a contiguous f32 tensor that owns exactly its values, to update in place (copied
/// only when shared or laid out otherwise).
fn owned(t: FlexTensor) -> FlexTensor {
    let n = t.shape().num_elements();
    let plain = t.dtype() == DType::F32
        && t.layout().contiguous_offsets() == Some((0, n))
        && t.storage::<f32>().len() == n;
    if plain {
        t
    } else {
        tensor(values(&t).into_owned(), t.shape())
    }
}

/// A flex tensor's f32 values in row-major order (borrowed when already laid out so).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "fused kernels run on f32 tensors");
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

/// Targets as indices; a negative target is refused.
fn indices(t: &FlexTensor) -> Vec<usize> {
    let t = t.to_contiguous();
    let to = |v: i64| usize::try_from(v).expect("cross-entropy: a negative target");
    match t.dtype() {
        DType::I64 => t
            .as_slice::<i64>()
            .unwrap()
            .iter()
            .map(|&v| to(v))
            .collect(),
        DType::I32 => t
            .as_slice::<i32>()
            .unwrap()
            .iter()
            .map(|&v| to(v as i64))
            .collect(),
        DType::U32 => t
            .as_slice::<u32>()
            .unwrap()
            .iter()
            .map(|&v| v as usize)
            .collect(),
        other => panic!("cross-entropy: targets of {other:?} are not supported"),
    }
}

fn attention_shape(qkv: &FlexTensor, batch: usize, heads: usize) -> attention::Shape {
    let dims = qkv.shape();
    attention::Shape::of(dims[0], dims[dims.num_dims() - 1], batch, heads)
}

fn linear_dims(x: &FlexTensor, weight: &FlexTensor) -> lin::Dims {
    let (xs, ws) = (x.shape(), weight.shape());
    assert!(
        xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0],
        "linear: rows {xs:?} do not meet a weight {ws:?}"
    );
    lin::Dims {
        n: xs[0],
        k: xs[1],
        m: ws[1],
    }
}

fn linear_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let d = linear_dims(x, weight);
    let y = lin::forward(&values(x), &values(weight), &values(bias), d);
    tensor(y, [d.n, d.m])
}

fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f32,
) -> (FlexTensor, ln_k::Stats) {
    let (y, stats) = ln_k::forward(&values(x), &values(gamma), &values(beta), eps);
    (tensor(y, x.shape()), stats)
}

fn attention_forward(qkv: &FlexTensor, batch: usize, heads: usize) -> (FlexTensor, Vec<f32>) {
    let s = attention_shape(qkv, batch, heads);
    let (y, lse) = attention::forward(&values(qkv), s);
    (tensor(y, [s.batch * s.t, s.c()]), lse)
}

fn cross_entropy_forward(logits: &FlexTensor, targets: &[usize]) -> (FlexTensor, Vec<f32>) {
    let vocab = logits.shape()[logits.shape().num_dims() - 1];
    let (loss, lse) = ce::forward(&values(logits), targets, vocab);
    (tensor(vec![loss], [1]), lse)
}

impl FusedOps for Flex {
    fn fused_dropout(x: FlexTensor, key0: u32, key1: u32, prob: f64) -> FlexTensor {
        let mask = drop::Mask::new([key0, key1], prob);
        tensor(drop::apply(&values(&x), &mask), x.shape())
    }

    fn fused_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        linear_forward(&x, &weight, &bias)
    }

    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        tensor(gelu_k::forward(&values(&x)), x.shape())
    }

    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f32,
    ) -> FlexTensor {
        layer_norm_forward(&x, &gamma, &beta, eps).0
    }

    fn fused_attention(qkv: FlexTensor, batch: usize, heads: usize) -> FlexTensor {
        attention_forward(&qkv, batch, heads).0
    }

    fn fused_cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        cross_entropy_forward(&logits, &indices(&targets)).0
    }

    fn fused_adamw(
        param: FlexTensor,
        grad: FlexTensor,
        exp_avg: FlexTensor,
        exp_avg_sq: FlexTensor,
        clip: FlexTensor,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        bias_correction2: f32,
        eps: f32,
        step_size: f32,
        decay: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let mut p = owned(param);
        let mut m = owned(exp_avg);
        let mut v = owned(exp_avg_sq);
        let s = adamw::Scalars {
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            bias_correction2,
            eps,
            step_size,
            decay,
        };
        adamw::step(
            p.storage_mut(),
            m.storage_mut(),
            v.storage_mut(),
            &values(&grad),
            values(&clip)[0],
            &s,
        );
        (p, m, v)
    }
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    /// Input and weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight) = ops.state;
        let d = linear_dims(&x, &weight);
        let dy = values(&grad);
        let [px, pw, pb] = ops.parents;
        // A frozen weight or bias (a fragment unit's) has no node: its product is skipped.
        if let Some(node) = px {
            let dx = lin::input_grad(&dy, &values(&weight), d);
            grads.register::<Flex>(node.id, tensor(dx, [d.n, d.k]));
        }
        if let Some(node) = pw {
            let dw = lin::weight_grad(&values(&x), &dy, d);
            grads.register::<Flex>(node.id, tensor(dw, [d.k, d.m]));
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, tensor(lin::bias_grad(&dy, d), [d.m]));
        }
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl Backward<Flex, 1> for DropoutBackward {
    type State = drop::Mask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        if let [Some(node)] = ops.parents {
            // The same mask, regenerated from its keys.
            let dx = drop::apply(&values(&grad), &ops.state);
            grads.register::<Flex>(node.id, tensor(dx, grad.shape()));
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        if let [Some(node)] = ops.parents {
            let x = ops.state;
            let dx = gelu_k::backward(&values(&x), &values(&grad));
            grads.register::<Flex>(node.id, tensor(dx, x.shape()));
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = (FlexTensor, FlexTensor, ln_k::Stats);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, gamma, stats) = ops.state;
        let (dx, dg, db) = ln_k::backward(&values(&x), &values(&gamma), &stats, &values(&grad));
        let [px, pg, pb] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, tensor(dx, x.shape()));
        }
        if let Some(node) = pg {
            grads.register::<Flex>(node.id, tensor(dg, gamma.shape()));
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, tensor(db, gamma.shape()));
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 1> for AttentionBackward {
    /// Input, output, log-sum-exp, shape.
    type State = (FlexTensor, FlexTensor, Vec<f32>, attention::Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        if let [Some(node)] = ops.parents {
            let (qkv, y, lse, s) = ops.state;
            let d = attention::backward(&values(&qkv), &values(&y), &lse, &values(&grad), s);
            grads.register::<Flex>(node.id, tensor(d, qkv.shape()));
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// Logits, targets, log-sum-exp.
    type State = (FlexTensor, Vec<usize>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        if let [Some(node)] = ops.parents {
            let (logits, targets, lse) = ops.state;
            let g = values(&grad)[0];
            let d = ce::backward(&values(&logits), &targets, &lse, g);
            grads.register::<Flex>(node.id, tensor(d, logits.shape()));
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_dropout(x: FloatTensor<Self>, key0: u32, key1: u32, prob: f64) -> FloatTensor<Self> {
        match DropoutBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::fused_dropout(x.primitive().clone(), key0, key1, prob);
                prep.finish(drop::Mask::new([key0, key1], prob), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::fused_dropout(x.into_primitive(), key0, key1, prob))
            }
        }
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match LinearBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w, b) = (x.primitive(), weight.primitive(), bias.primitive());
                let y = linear_forward(x, w, b);
                prep.finish((x.clone(), w.clone()), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_linear(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
            )),
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                let y = Flex::fused_gelu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_gelu(x.into_primitive())),
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, g, b) = (x.primitive(), gamma.primitive(), beta.primitive());
                let (y, stats) = layer_norm_forward(x, g, b, eps);
                prep.finish((x.clone(), g.clone(), stats), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }

    fn fused_attention(qkv: FloatTensor<Self>, batch: usize, heads: usize) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = qkv.primitive();
                let (y, lse) = attention_forward(x, batch, heads);
                let s = attention_shape(x, batch, heads);
                prep.finish((x.clone(), y.clone(), lse, s), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::fused_attention(qkv.into_primitive(), batch, heads))
            }
        }
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let targets = indices(&targets);
        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let l = logits.primitive();
                let (loss, lse) = cross_entropy_forward(l, &targets);
                prep.finish((l.clone(), targets, lse), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(cross_entropy_forward(&logits.into_primitive(), &targets).0)
            }
        }
    }

    /// An optimizer step is never recorded: it runs on the inner tensors, untracked.
    fn fused_adamw(
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
        let (p, m, v) = Flex::fused_adamw(
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
}
