//! The compute of verification, on the relay's CPU: the loss probe of every update and the
//! re-execution of held units. What follows from the numbers is the coordinator's decision.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use tessera_coordinator::Probe;
use tessera_core::burn::prelude::{Device, Tensor};
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::data::{BatchKey, Corpus, Split};
use tessera_core::model::Gpt;
use tessera_core::optim::AdamW;
use tessera_core::params;
use tessera_protocol::messages::WorkUnit;
use tessera_protocol::work;

use crate::checkpoints::Checkpoints;

/// The shard the probe's held-out batches come from (units never train on it).
pub const PROBE_SHARD: u64 = u64::MAX - 1;

/// Held-out batches per probe (and own batches per probe).
const PROBE_BATCHES: usize = 2;

/// Base weights decoded recently, by version.
const KEEP_BASES: usize = 8;

/// Time spent verifying, for `/metrics` and the benchmark.
#[derive(Default)]
pub struct Cost {
    /// Probes run.
    pub probes: std::sync::atomic::AtomicU64,
    /// Microseconds spent probing.
    pub probe_us: std::sync::atomic::AtomicU64,
    /// Units re-executed.
    pub reexecutions: std::sync::atomic::AtomicU64,
    /// Microseconds spent re-executing.
    pub reexecute_us: std::sync::atomic::AtomicU64,
    /// Tokens re-executed.
    pub reexecuted_tokens: std::sync::atomic::AtomicU64,
}

/// The probe and re-execution machinery of one run.
pub struct Verifier {
    model: ModelConfig,
    train: TrainConfig,
    corpus: Arc<Corpus>,
    device: Device,
    bases: Mutex<BTreeMap<u64, Arc<Vec<f32>>>>,
    /// Held-out loss of each recent base.
    held_losses: Mutex<BTreeMap<u64, f32>>,
    /// Time spent.
    pub cost: Cost,
}

fn scalar(t: Tensor<1>) -> Result<f32> {
    let v: Vec<f32> = t
        .into_data()
        .try_into_vec()
        .map_err(|e| anyhow!("reading a loss: {e:?}"))?;
    Ok(v[0])
}

impl Verifier {
    /// A verifier for a run of `model` trained with `train` on `corpus`.
    pub fn new(model: ModelConfig, train: TrainConfig, corpus: Arc<Corpus>) -> Self {
        Verifier {
            model,
            train,
            corpus,
            device: Device::flex(),
            bases: Mutex::new(BTreeMap::new()),
            held_losses: Mutex::new(BTreeMap::new()),
            cost: Cost::default(),
        }
    }

    /// The weights of `version` (from the checkpoints, decoded once).
    pub fn base(&self, ckpt: &Checkpoints, version: u64) -> Result<Arc<Vec<f32>>> {
        if let Some(b) = self.bases.lock().expect("bases lock").get(&version) {
            return Ok(b.clone());
        }
        let (w, _) = ckpt
            .load(version)
            .with_context(|| format!("base version {version}"))?;
        let w = Arc::new(w);
        let mut bases = self.bases.lock().expect("bases lock");
        bases.insert(version, w.clone());
        while bases.len() > KEEP_BASES {
            let oldest = *bases.keys().next().expect("not empty");
            bases.remove(&oldest);
        }
        Ok(w)
    }

    fn model_of(&self, weights: &[f32]) -> Result<Gpt> {
        Ok(params::load_vec(
            Gpt::new(&self.model, &self.device),
            weights,
        )?)
    }

    fn loss(&self, model: &Gpt, batches: &[tessera_core::data::Batch]) -> Result<f32> {
        let mut total = 0.0;
        for b in batches {
            total += scalar(model.batch_loss(b, &self.device))?;
        }
        Ok(total / batches.len().max(1) as f32)
    }

    /// The probe of an update `delta` of `unit` from `base`: the loss of two of the unit's own
    /// batches (steps `own_steps`, chosen by the relay after the fact) and of held-out batches,
    /// at the base weights and at `base − delta` (what the participant says it trained).
    pub fn probe(
        &self,
        unit: &WorkUnit,
        base: &[f32],
        delta: &[f32],
        own_steps: [u32; 2],
    ) -> Result<Probe> {
        let started = Instant::now();
        let range = unit.fragment.range(base.len())?;
        let mut after = base.to_vec();
        for (a, d) in after[range].iter_mut().zip(delta) {
            *a -= d;
        }
        let own: Vec<_> = own_steps
            .iter()
            .map(|&s| work::batch(unit, &self.model, &self.corpus, s.min(unit.inner_steps - 1)))
            .collect();
        let held: Vec<_> = (0..PROBE_BATCHES as u64)
            .map(|i| {
                self.corpus.batch(
                    Split::Train,
                    BatchKey {
                        seed: unit.seed,
                        shard: PROBE_SHARD,
                        step: unit.base_version * PROBE_BATCHES as u64 + i,
                    },
                    unit.batch_size as usize,
                    self.model.block_size,
                )
            })
            .collect();
        let base_model = self.model_of(base)?;
        let after_model = self.model_of(&after)?;
        let cached = self
            .held_losses
            .lock()
            .expect("held losses lock")
            .get(&unit.base_version)
            .copied();
        let held_before = match cached {
            Some(l) => l,
            None => {
                let l = self.loss(&base_model, &held)?;
                let mut m = self.held_losses.lock().expect("held losses lock");
                m.insert(unit.base_version, l);
                while m.len() > KEEP_BASES {
                    let oldest = *m.keys().next().expect("not empty");
                    m.remove(&oldest);
                }
                l
            }
        };
        let probe = Probe {
            own_before: self.loss(&base_model, &own)?,
            own_after: self.loss(&after_model, &own)?,
            held_before,
            held_after: self.loss(&after_model, &held)?,
        };
        self.cost
            .probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.cost.probe_us.fetch_add(
            started.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(probe)
    }

    /// Trains `unit` from `base` exactly as a participant must: its pseudo-gradient.
    pub fn reexecute(&self, unit: &WorkUnit, base: &[f32]) -> Result<Vec<f32>> {
        let started = Instant::now();
        let t = work::train(
            &self.device,
            self.model,
            &self.train,
            unit,
            base,
            &self.corpus,
            AdamW::new(),
            |_| {},
        )?;
        let c = &self.cost;
        c.reexecutions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.reexecute_us.fetch_add(
            started.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        c.reexecuted_tokens.fetch_add(
            work::tokens(unit, &self.model),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(t.delta)
    }
}
