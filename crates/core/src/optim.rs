//! AdamW for the inner loop, with PyTorch's semantics: global gradient-norm clipping,
//! decoupled weight decay on matrices and embeddings only (nanoGPT's parameter groups), bias
//! correction, and `eps` added outside the square root.
//!
//! burn's own `AdamW` clips each tensor's norm separately and decays every parameter; DiLoCo's
//! inner loop and the PyTorch reference need the global clip and the groups, and the state has to
//! be addressable by parameter order so that it can be checkpointed and reset per work unit.
//! The state is kept per parameter, flat, in burn's layout and in the order of
//! [`crate::params::specs`]; every update is a tensor op, so the step never waits on the device.
//! On the CPU (flex) each parameter's step is one fused pass ([`crate::kernels::adamw`]), bit
//! for bit the composed ops' result; other backends compose burn's ops.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Gradients;

use crate::config::TrainConfig;
use crate::kernels;
use crate::params::restore_tracking;

/// First and second moments of one parameter, flat.
#[derive(Clone, Debug)]
pub struct Moments {
    /// Exponential average of the gradient.
    pub exp_avg: Tensor<1>,
    /// Exponential average of the squared gradient.
    pub exp_avg_sq: Tensor<1>,
}

/// AdamW state: the step count and per-parameter moments (empty before the first step).
#[derive(Clone, Debug, Default)]
pub struct AdamW {
    /// Number of steps taken.
    pub step: u64,
    /// Moments, in parameter order; `None` for a parameter that never had a gradient (a frozen
    /// one costs no optimizer memory).
    pub moments: Vec<Option<Moments>>,
}

struct SquaredNorm<'a> {
    grads: &'a Gradients,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Update<'a> {
    grads: &'a Gradients,
    state: &'a mut AdamW,
    clip: Option<Tensor<1>>,
    lr: f64,
    cfg: &'a TrainConfig,
    index: usize,
}

impl ModuleMapper for Update<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let index = self.index;
        self.index += 1;
        let Some(grad) = tensor.grad(self.grads) else {
            // A parameter without a gradient (frozen) keeps its value and its moments, if any;
            // `None` keeps the state aligned with the parameter order at no memory cost.
            if index >= self.state.moments.len() {
                self.state.moments.push(None);
            }
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let dims = grad.dims();
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let t = self.state.step as i32;
        let decays = D >= 2 && self.cfg.weight_decay != 0.0;
        let scalars = kernels::adamw::Scalars::new(
            b1,
            b2,
            self.cfg.eps,
            self.lr,
            if decays { self.cfg.weight_decay } else { 0.0 },
            t,
        );
        // Taken out of the state, so that the fused step updates them in place.
        let previous = self
            .state
            .moments
            .get_mut(index)
            .and_then(Option::take)
            .map(|s| (s.exp_avg, s.exp_avg_sq));
        let param = tensor.clone().inner().reshape([-1]);
        let (p, m, v) = match kernels::adamw_step(
            param,
            grad.reshape([-1]),
            previous,
            self.clip.clone(),
            &scalars,
        ) {
            Ok(stepped) => stepped,
            Err(inputs) => self.composed(inputs, decays),
        };
        let p = p.reshape(dims);
        let moments = Moments {
            exp_avg: m,
            exp_avg_sq: v,
        };
        if index < self.state.moments.len() {
            self.state.moments[index] = Some(moments);
        } else {
            self.state.moments.push(Some(moments));
        }
        Param::from_mapped_value(id, restore_tracking(p, &tensor), mapper)
    }
}

impl Update<'_> {
    /// The step in burn's ops (any backend): the parameter and its two moments, flat.
    fn composed(
        &self,
        inputs: Box<kernels::AdamWInputs>,
        decays: bool,
    ) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        let kernels::AdamWInputs {
            param,
            mut grad,
            moments,
            clip,
        } = *inputs;
        if let Some(c) = clip {
            grad = grad * c;
        }
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (m, v) = match moments {
            Some((m, v)) => (
                m * b1 + grad.clone() * (1.0 - b1),
                v * b2 + grad.square() * (1.0 - b2),
            ),
            None => (grad.clone() * (1.0 - b1), grad.square() * (1.0 - b2)),
        };
        let t = self.state.step as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let denom = (v.clone() / bc2).sqrt() + self.cfg.eps;
        let update = (m.clone() / denom) * (self.lr / bc1);
        let mut p = param;
        if decays {
            p = p * (1.0 - self.lr * self.cfg.weight_decay);
        }
        (p - update, m, v)
    }
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one AdamW step with learning rate `lr` to `model` from the gradients of a
    /// backward pass. Returns the updated model and the global gradient norm (before clipping)
    /// as a lazy scalar tensor.
    pub fn step<M: Module>(
        &mut self,
        model: M,
        grads: &Gradients,
        lr: f64,
        cfg: &TrainConfig,
    ) -> (M, Tensor<1>) {
        let mut norm = SquaredNorm { grads, total: None };
        model.visit(&mut norm);
        let norm = norm
            .total
            .expect("the model has parameters with gradients")
            .sqrt();
        let clip = (cfg.grad_clip > 0.0)
            .then(|| (norm.clone().add_scalar(1e-6).recip() * cfg.grad_clip).clamp_max(1.0));
        self.step += 1;
        let mut update = Update {
            grads,
            state: self,
            clip,
            lr,
            cfg,
            index: 0,
        };
        let model = model.map(&mut update);
        (model, norm)
    }
}
