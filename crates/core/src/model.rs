//! The GPT decoder: token + learned position embeddings, pre-LayerNorm blocks with causal
//! multi-head self-attention and a GELU MLP, a final LayerNorm, and an LM head tied to the
//! token embedding. Written once: the `Device` it is built on picks the backend.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::prelude::*;
use std::sync::{Mutex, MutexGuard};

use crate::config::ModelConfig;
use crate::data::Batch;
use crate::kernels;

/// Standard deviation of the normal initialiser (GPT-2's).
const INIT_STD: f64 = 0.02;

fn linear(d_in: usize, d_out: usize, std: f64, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device);
    // Biases start at zero, as in GPT-2.
    l.bias = l.bias.map(|b| Param::from_tensor(b.val().zeros_like()));
    l
}

/// The backends keep one random generator per process (flex's is a global), so seeding it and
/// drawing a model's weights must not interleave with another thread's draws.
static INIT: Mutex<()> = Mutex::new(());

fn init_lock() -> MutexGuard<'static, ()> {
    // The guarded data is (): a panic while building leaves nothing inconsistent behind.
    INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Causal multi-head self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused query/key/value projection `[d, 3d]`.
    pub qkv: Linear,
    /// Output projection `[d, d]`.
    pub proj: Linear,
    dropout: Dropout,
    n_head: usize,
}

impl Attention {
    /// `x` holds the rows of `batch` sequences, `[batch·t, d]`.
    fn forward(&self, x: Tensor<2>, batch: usize) -> Tensor<2> {
        let y = kernels::causal_attention(kernels::linear(x, &self.qkv), batch, self.n_head);
        kernels::dropout(kernels::linear(y, &self.proj), &self.dropout)
    }
}

/// Two-layer GELU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[d, 4d]`.
    pub fc: Linear,
    /// `[4d, d]`.
    pub proj: Linear,
    dropout: Dropout,
}

/// A pre-LayerNorm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// LayerNorm before attention.
    pub ln_1: LayerNorm,
    /// Self-attention.
    pub attn: Attention,
    /// LayerNorm before the MLP.
    pub ln_2: LayerNorm,
    /// The MLP.
    pub mlp: Mlp,
}

impl Block {
    /// `x`: the rows of `batch` sequences, `[batch·t, d]` (every linear sees one matrix).
    fn forward(&self, x: Tensor<2>, batch: usize) -> Tensor<2> {
        let x = x.clone() + self.attn.forward(kernels::layer_norm(x, &self.ln_1), batch);
        let h = kernels::linear(kernels::layer_norm(x.clone(), &self.ln_2), &self.mlp.fc);
        let out = kernels::linear(kernels::gelu(h), &self.mlp.proj);
        x + kernels::dropout(out, &self.mlp.dropout)
    }
}

/// The GPT model.
#[derive(Module, Debug)]
pub struct Gpt {
    /// Token embedding `[vocab, d]`, also the (transposed) LM head.
    pub wte: Embedding,
    /// Learned position embedding `[block_size, d]`.
    pub wpe: Embedding,
    drop: Dropout,
    /// The transformer blocks.
    pub h: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
}

impl Gpt {
    /// Builds a freshly initialised model on `device` (GPT-2 initialisation: N(0, 0.02), with
    /// residual projections scaled by 1/sqrt(2 n_layer), zero biases, unit LayerNorms), drawing
    /// from the backend's random generator wherever it stands.
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        let _only_builder = init_lock();
        Self::build(config, device).materialized()
    }

    /// The model `seed` names: the same seed and backend give the same weights, whatever other
    /// threads of the process draw at the same time.
    pub fn seeded(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        let _only_builder = init_lock();
        device.seed(seed);
        Self::build(config, device).materialized()
    }

    /// burn initialises parameters lazily, at their first use: draw them all now, in module
    /// order (the order of the forward pass), while the caller holds the generator.
    fn materialized(self) -> Self {
        struct Touch;
        impl ModuleVisitor for Touch {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                param.val();
            }
        }
        self.visit(&mut Touch);
        self
    }

    fn build(config: &ModelConfig, device: &Device) -> Self {
        let d = config.n_embd;
        let resid_std = INIT_STD / (2.0 * config.n_layer as f64).sqrt();
        let emb = |n| {
            EmbeddingConfig::new(n, d)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: INIT_STD,
                })
                .init(device)
        };
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(kernels::LN_EPS)
                .init(device)
        };
        let drop = || DropoutConfig::new(config.dropout).init();
        Gpt {
            wte: emb(config.vocab_size),
            wpe: emb(config.block_size),
            drop: drop(),
            h: (0..config.n_layer)
                .map(|_| Block {
                    ln_1: ln(),
                    attn: Attention {
                        qkv: linear(d, 3 * d, INIT_STD, device),
                        proj: linear(d, d, resid_std, device),
                        dropout: drop(),
                        n_head: config.n_head,
                    },
                    ln_2: ln(),
                    mlp: Mlp {
                        fc: linear(d, 4 * d, INIT_STD, device),
                        proj: linear(4 * d, d, resid_std, device),
                        dropout: drop(),
                    },
                })
                .collect(),
            ln_f: ln(),
        }
    }

    /// Logits `[b, t, vocab]` for input tokens `[b, t]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let logits = self.logits(tokens);
        let vocab = logits.dims()[1];
        logits.reshape([b, t, vocab])
    }

    /// Logits as rows, `[b·t, vocab]`.
    fn logits(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let pos = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]);
        let x = self.wte.forward(tokens) + self.wpe.forward(pos);
        let d = x.dims()[2];
        let mut x = kernels::dropout(x, &self.drop).reshape([b * t, d]);
        for block in &self.h {
            x = block.forward(x, b);
        }
        let x = kernels::layer_norm(x, &self.ln_f);
        x.matmul(self.wte.weight.val().transpose())
    }

    /// Mean cross-entropy of predicting `targets` from `inputs`.
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        let [b, t] = inputs.dims();
        kernels::cross_entropy(self.logits(inputs), targets.reshape([b * t]))
    }

    /// Mean cross-entropy on a [`Batch`].
    pub fn batch_loss(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        let (x, y) = batch_tensors(batch, device);
        self.loss(x, y)
    }
}

/// Moves a batch onto `device` as `[batch, context]` integer tensors.
pub fn batch_tensors(batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.context];
    let t = |v: &Vec<i32>| Tensor::<2, Int>::from_data(TensorData::new(v.clone(), shape), device);
    (t(&batch.inputs), t(&batch.targets))
}
