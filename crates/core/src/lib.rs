//! # tessera-core
//!
//! The math every Tessera participant shares, written once with burn so the browser and the
//! native host run the same code:
//!
//! - [`config`]: named model shapes (`tiny`, `baby`, `small`) and inner-loop hyperparameters;
//! - [`tokenizer`]: the byte-level tokenizer (vocabulary 256);
//! - [`data`]: corpora, the train/validation split and batches that are a pure function of
//!   `(run seed, shard, step)`; [`corpus`]: the generated default corpus;
//! - [`model`]: the GPT decoder; [`kernels`]: its fused CPU kernels (linear, GELU, LayerNorm,
//!   causal attention, dropout, cross-entropy) with their backward passes, and AdamW's step;
//!   [`params`]: its parameters as one named flat vector;
//! - [`optim`]: AdamW with PyTorch semantics; [`train`]: the inner loop and evaluation;
//! - [`checkpoint`]: safetensors encoding of weights and optimizer state; [`hf`]: the model as
//!   a Hugging Face `GPT2LMHeadModel` folder's files.
//!
//! It owns no I/O, no async runtime, no clock and no platform code: callers pass bytes in and
//! take bytes out, and pick the backend by the [`burn::prelude::Device`] they hand over.

pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod hf;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod params;
pub mod tokenizer;
pub mod train;

pub use burn;

/// Errors of the core library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model or training configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A corpus cannot be used.
    #[error("bad corpus: {0}")]
    Data(String),
    /// A parameter vector does not fit the model.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A checkpoint cannot be encoded or decoded.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}
