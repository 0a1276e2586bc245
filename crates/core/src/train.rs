//! The inner training loop: a model, its AdamW state, and the step and evaluation functions that
//! both the native host and the browser call.

use burn::module::Module;
use burn::prelude::*;

use crate::Error;
use crate::config::{ModelConfig, TrainConfig};
use crate::data::{Batch, BatchKey, Corpus, Split};
use crate::kernels;
use crate::model::Gpt;
use crate::optim::AdamW;

/// The shard id reserved for validation batches.
pub const VALIDATION_SHARD: u64 = u64::MAX;

/// What one step produced; the tensors are lazy scalars (read them when you need them).
pub struct StepOutput {
    /// Training loss of the batch, before the update.
    pub loss: Tensor<1>,
    /// Global gradient norm before clipping.
    pub grad_norm: Tensor<1>,
    /// Learning rate used.
    pub lr: f64,
}

/// A model being trained, with its optimizer state and counters.
pub struct Trainer {
    model: Option<Gpt>,
    optim: AdamW,
    device: Device,
    /// Model shape.
    pub model_config: ModelConfig,
    /// Hyperparameters.
    pub train_config: TrainConfig,
    /// Steps taken.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
}

impl Trainer {
    /// A freshly initialised model on `device` (autodiff is enabled here), seeded from the run
    /// seed so the same seed and backend give the same initial weights.
    pub fn new(
        model_config: ModelConfig,
        train_config: TrainConfig,
        device: &Device,
    ) -> Result<Self, Error> {
        model_config.validate()?;
        let device = device.clone().autodiff();
        let model = Gpt::seeded(&model_config, train_config.seed, &device);
        Ok(Self::from_parts(
            model,
            AdamW::new(),
            model_config,
            train_config,
            device,
            0,
            0,
        ))
    }

    /// A model holding `values` (a flat vector in [`crate::params::specs`] order) with a fresh
    /// optimizer: how a participant starts a work unit from the global weights.
    pub fn with_weights(
        model_config: ModelConfig,
        train_config: TrainConfig,
        device: &Device,
        values: &[f32],
    ) -> Result<Self, Error> {
        model_config.validate()?;
        let device = device.clone().autodiff();
        let model = crate::params::load_vec(Gpt::new(&model_config, &device), values)?;
        Ok(Self::from_parts(
            model,
            AdamW::new(),
            model_config,
            train_config,
            device,
            0,
            0,
        ))
    }

    /// Resumes from a model, optimizer state and counters.
    pub fn from_parts(
        model: Gpt,
        optim: AdamW,
        model_config: ModelConfig,
        train_config: TrainConfig,
        device: Device,
        step: u64,
        tokens: u64,
    ) -> Self {
        Trainer {
            model: Some(model),
            optim,
            device,
            model_config,
            train_config,
            step,
            tokens,
        }
    }

    /// Trains only the parameters whose flat span (in [`crate::params::specs`] order) meets
    /// `range`; the others are frozen: they take no gradient (their weight gradients are not
    /// even computed), keep their values and weigh nothing in the gradient-norm clip. How a
    /// work unit on one fragment of the model trains. Fails when no parameter meets `range`.
    pub fn train_only(&mut self, range: std::ops::Range<usize>) -> Result<(), Error> {
        let model = self.model.take().expect("model present between steps");
        let specs = crate::params::specs(&model);
        let trainable: Vec<bool> = specs
            .iter()
            .map(|s| s.offset < range.end && range.start < s.offset + s.numel())
            .collect();
        let any = trainable.iter().any(|t| *t);
        self.model = Some(crate::params::set_trainable(model, &trainable));
        if any {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "no parameter lies in {}..{}",
                range.start, range.end
            )))
        }
    }

    /// The model.
    pub fn model(&self) -> &Gpt {
        self.model.as_ref().expect("model present between steps")
    }

    /// Takes the model out.
    pub fn into_model(mut self) -> Gpt {
        self.model.take().expect("model present between steps")
    }

    /// The optimizer state.
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// Replaces the optimizer state (a participant carrying its inner AdamW across units).
    pub fn set_optimizer(&mut self, optim: AdamW) {
        self.optim = optim;
    }

    /// Takes the optimizer state out, leaving a fresh one.
    pub fn take_optimizer(&mut self) -> AdamW {
        std::mem::take(&mut self.optim)
    }

    /// The (autodiff) device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The key of the training batch for the current step on `shard`.
    pub fn batch_key(&self, shard: u64) -> BatchKey {
        BatchKey {
            seed: self.train_config.seed,
            shard,
            step: self.step,
        }
    }

    /// One step: forward, backward, clip, AdamW at the scheduled learning rate.
    pub fn step(&mut self, batch: &Batch) -> StepOutput {
        let lr = self.train_config.lr_at(self.step as usize);
        self.step_with_lr(batch, lr)
    }

    /// One step at an explicit learning rate.
    pub fn step_with_lr(&mut self, batch: &Batch, lr: f64) -> StepOutput {
        let model = self.model.take().expect("model present between steps");
        let (device, optim, cfg) = (&self.device, &mut self.optim, &self.train_config);
        let (model, loss, grad_norm) = kernels::on_cpu_pool(device, || {
            let loss = model.batch_loss(batch, device);
            let grads = loss.backward();
            let (model, grad_norm) = optim.step(model, &grads, lr, cfg);
            (model, loss, grad_norm)
        });
        self.model = Some(model);
        self.step += 1;
        self.tokens += (batch.batch_size * batch.context) as u64;
        StepOutput {
            loss: loss.detach().inner(),
            grad_norm,
            lr,
        }
    }

    /// Mean loss over `n_batches` fixed validation batches (no autodiff, no dropout). The
    /// batches depend only on the run seed, so every participant measures the same thing.
    pub fn validation_loss(
        &self,
        corpus: &Corpus,
        n_batches: usize,
        batch_size: usize,
    ) -> Tensor<1> {
        eval_loss(
            &self.model().valid(),
            corpus,
            self.train_config.seed,
            n_batches,
            batch_size,
            &self.device.clone().inner(),
        )
    }
}

/// Mean validation loss of `model` over `n_batches` fixed batches (lazy scalar).
pub fn eval_loss(
    model: &Gpt,
    corpus: &Corpus,
    seed: u64,
    n_batches: usize,
    batch_size: usize,
    device: &Device,
) -> Tensor<1> {
    let context = model.wpe.weight.dims()[0];
    let mut total: Option<Tensor<1>> = None;
    for i in 0..n_batches.max(1) {
        let key = BatchKey {
            seed,
            shard: VALIDATION_SHARD,
            step: i as u64,
        };
        let batch = corpus.batch(Split::Validation, key, batch_size, context);
        let l = model.batch_loss(&batch, device);
        total = Some(match total {
            Some(t) => t + l,
            None => l,
        });
    }
    total.expect("at least one batch") / n_batches.max(1) as f64
}

/// The model's logits for `tokens` (at most a block), every position: `[tokens.len() × vocab]`,
/// row-major.
pub fn logits(model: &Gpt, tokens: &[u32], device: &Device) -> Vec<f32> {
    let model = model.valid();
    let device = &device.clone().inner();
    let window: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let x = Tensor::<2, Int>::from_data(TensorData::new(window, [1, tokens.len()]), device);
    model
        .forward(x)
        .into_data()
        .try_into_vec()
        .expect("f32 logits")
}

/// Generates `n` tokens after `prompt` by sampling with temperature (deterministic given `seed`).
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    n: usize,
    temperature: f64,
    seed: u64,
    device: &Device,
) -> Vec<u32> {
    let context = model.wpe.weight.dims()[0];
    let model = model.valid();
    let device = &device.clone().inner();
    let mut tokens: Vec<u32> = if prompt.is_empty() {
        vec![b'\n' as u32]
    } else {
        prompt.to_vec()
    };
    let mut state = seed;
    for _ in 0..n {
        let start = tokens.len().saturating_sub(context);
        let window: Vec<i32> = tokens[start..].iter().map(|&t| t as i32).collect();
        let t = window.len();
        let x = Tensor::<2, Int>::from_data(TensorData::new(window, [1, t]), device);
        let logits = model.forward(x).narrow(1, t - 1, 1).reshape([-1]);
        let probs = burn::tensor::activation::softmax(logits / temperature.max(1e-3), 0);
        let probs: Vec<f32> = probs.into_data().try_into_vec().expect("f32 probabilities");
        state = crate::data::mix(state);
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0.0;
        let mut next = probs.len() - 1;
        for (i, p) in probs.iter().enumerate() {
            acc += *p as f64;
            if u < acc {
                next = i;
                break;
            }
        }
        tokens.push(next as u32);
    }
    tokens
}
