//! Named model configurations and training hyperparameters.

use serde::{Deserialize, Serialize};

use crate::tokenizer::VOCAB_SIZE;

/// Shape of the GPT decoder. Every participant of a run uses the same one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (256: byte-level).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads per block.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Context length (maximum sequence length).
    pub block_size: usize,
    /// Dropout probability applied to embeddings, attention output and MLP output.
    pub dropout: f64,
}

/// The named configurations.
pub const CONFIG_NAMES: [&str; 3] = ["tiny", "baby", "small"];

impl ModelConfig {
    /// Looks up a named configuration: `tiny`, `baby` or `small`.
    pub fn named(name: &str) -> Option<Self> {
        let c = |n_layer, n_head, n_embd, block_size, dropout| ModelConfig {
            vocab_size: VOCAB_SIZE,
            n_layer,
            n_head,
            n_embd,
            block_size,
            dropout,
        };
        match name {
            // For tests: ~70k parameters.
            "tiny" => Some(c(2, 2, 32, 32, 0.0)),
            // nanoGPT's CPU shakespeare config.
            "baby" => Some(c(4, 4, 128, 64, 0.0)),
            // nanoGPT's shakespeare_char config.
            "small" => Some(c(6, 6, 384, 256, 0.2)),
            _ => None,
        }
    }

    /// Number of trainable parameters (the LM head is tied to the token embedding).
    pub fn num_params(&self) -> usize {
        let d = self.n_embd;
        let block = 2 * (2 * d) // two layer norms
            + (d * 3 * d + 3 * d) // qkv
            + (d * d + d) // attention projection
            + (d * 4 * d + 4 * d) // mlp in
            + (4 * d * d + d); // mlp out
        self.vocab_size * d + self.block_size * d + self.n_layer * block + 2 * d
    }

    /// Checks that the configuration is usable.
    pub fn validate(&self) -> Result<(), crate::Error> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(crate::Error::Config(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            )));
        }
        if self.n_layer == 0 || self.block_size == 0 || self.vocab_size == 0 {
            return Err(crate::Error::Config("empty dimension".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(crate::Error::Config(format!(
                "dropout {} outside [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// Inner-loop hyperparameters: AdamW with linear warmup, cosine decay and global-norm clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Sequences per batch.
    pub batch_size: usize,
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Step at which the cosine decay reaches `min_lr` (and stays there).
    pub decay_steps: usize,
    /// AdamW decoupled weight decay, applied to matrices and embeddings only.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW denominator epsilon.
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Seed for initialisation, dropout and batch sampling.
    pub seed: u64,
}

impl TrainConfig {
    /// nanoGPT's baby/shakespeare_char hyperparameters for `steps` iterations.
    pub fn nanogpt(steps: usize) -> Self {
        TrainConfig {
            batch_size: 12,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100.min(steps / 10),
            decay_steps: steps,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
        }
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine decay to `min_lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let ratio = (step - self.warmup_steps) as f64 / span;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_have_the_documented_sizes() {
        let tiny = ModelConfig::named("tiny").unwrap();
        assert!(tiny.num_params() < 100_000, "{}", tiny.num_params());
        let baby = ModelConfig::named("baby").unwrap();
        assert_eq!(
            (baby.n_layer, baby.n_head, baby.n_embd, baby.block_size),
            (4, 4, 128, 64)
        );
        let small = ModelConfig::named("small").unwrap();
        let p = small.num_params() as f64 / 1e6;
        assert!((10.5..11.0).contains(&p), "small has {p}M params");
        for n in CONFIG_NAMES {
            ModelConfig::named(n).unwrap().validate().unwrap();
        }
        assert!(ModelConfig::named("huge").is_none());
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = TrainConfig::nanogpt(2000);
        assert_eq!(c.warmup_steps, 100);
        assert!(c.lr_at(0) < c.lr_at(50));
        assert!(c.lr_at(50) < c.lr_at(99));
        assert!((c.lr_at(100) - 1e-3).abs() < 1e-12);
        assert!(c.lr_at(1000) < c.lr_at(500));
        assert!((c.lr_at(1999) - 1e-4).abs() < 1e-6);
        assert_eq!(c.lr_at(5000), 1e-4);
        // monotone after warmup
        let lrs: Vec<f64> = (100..2000).map(|s| c.lr_at(s)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }
}
