//! What a work unit means, for every participant: which batches it trains on, how its
//! pseudo-gradient is formed over its fragment, and how the result is signed. The native host
//! and the browser both build their submissions here, so they cannot drift apart.

use tessera_core::burn::prelude::{Device, Tensor};
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::data::{Batch, BatchKey, Corpus, Split};
use tessera_core::kernels::{
    self,
    quantize::{self, Format, Quantized, SparseQuantized},
};
use tessera_core::optim::AdamW;
use tessera_core::params;
use tessera_core::train::Trainer;

use crate::Error;
use crate::feedback::ErrorFeedback;
use crate::identity;
use crate::messages::{ModelChange, Submission, WorkUnit};
use crate::update::{Codec, Fragment, Payload};

/// A model version as a participant trains from it: the flat weights, and the SHA-256 of the
/// bytes they were decoded from (what the submission signs as its base).
#[derive(Debug, Clone)]
pub struct Base {
    /// The version.
    pub version: u64,
    /// Its weights, in [`tessera_core::params::specs`] order.
    pub weights: Vec<f32>,
    /// SHA-256 of the safetensors bytes.
    pub sha256: [u8; 32],
}

impl Base {
    /// Decodes the safetensors `bytes` of `version` of a `model` (`device` builds the parameter
    /// list; nothing is trained on it).
    pub fn decode(
        version: u64,
        model: &ModelConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Base, Error> {
        let specs = params::specs(&tessera_core::model::Gpt::new(model, device));
        let weights = tessera_core::checkpoint::weights_from_safetensors(&specs, bytes)
            .map_err(|e| Error::Malformed(format!("version {version}: {e}")))?;
        Ok(Base {
            version,
            weights,
            sha256: sha256(bytes),
        })
    }
}

impl Base {
    /// The version `change.to`, rebuilt from this one (`change.from`) and the encoded changes
    /// between them, its file's digest checked against the relay's.
    pub fn apply(
        &self,
        model: &ModelConfig,
        change: &ModelChange,
        device: &Device,
    ) -> Result<Base, Error> {
        if change.from != self.version
            || change.to <= change.from
            || change.links.len() as u64 != change.to - change.from
        {
            return Err(Error::Malformed(format!(
                "a change from v{} to v{} with {} links does not apply to v{}",
                change.from,
                change.to,
                change.links.len(),
                self.version
            )));
        }
        let mut weights = self.weights.clone();
        let mut decoded = Vec::new();
        for (offset, payload) in &change.links {
            payload.decode_into(&mut decoded)?;
            let start = usize::try_from(*offset)
                .ok()
                .filter(|&o| {
                    o.checked_add(decoded.len())
                        .is_some_and(|e| e <= weights.len())
                })
                .ok_or_else(|| {
                    Error::Malformed(format!(
                        "a change at {offset} of {} values overflows the model",
                        decoded.len()
                    ))
                })?;
            for (w, d) in weights[start..].iter_mut().zip(&decoded) {
                *w -= d;
            }
        }
        let specs = params::specs(&tessera_core::model::Gpt::new(model, device));
        let bytes = tessera_core::checkpoint::weights_in_layout(&specs, &weights, &change.header)
            .map_err(|e| Error::Malformed(format!("version {}: {e}", change.to)))?;
        if sha256(&bytes) != change.sha256 {
            return Err(Error::Malformed(format!(
                "version {} rebuilt from v{} does not match the relay's digest",
                change.to, change.from
            )));
        }
        Ok(Base {
            version: change.to,
            weights,
            sha256: change.sha256,
        })
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The training batch of inner step `step` of `unit`: a pure function of (run seed, shard, step).
pub fn batch(unit: &WorkUnit, model: &ModelConfig, corpus: &Corpus, step: u32) -> Batch {
    let key = BatchKey {
        seed: unit.seed,
        shard: unit.shard,
        step: step as u64,
    };
    corpus.batch(
        Split::Train,
        key,
        unit.batch_size as usize,
        model.block_size,
    )
}

/// Learning rate of inner step `step` (0-based) of `unit`: a linear ramp over the unit's
/// `warmup_steps`, then the unit's `lr`.
pub fn lr_at(unit: &WorkUnit, step: u32) -> f64 {
    if step < unit.warmup_steps {
        unit.lr * (step + 1) as f64 / (unit.warmup_steps + 1) as f64
    } else {
        unit.lr
    }
}

/// What training a unit produced.
pub struct Trained {
    /// The pseudo-gradient over the unit's fragment (empty when [`Trained::encoded`] holds it).
    pub delta: Vec<f32>,
    /// The pseudo-gradient already encoded with the unit's codec on the device it was trained
    /// on (by [`train_and_encode`] on a wgpu / WebGPU device, [`encodes_on_device`]).
    pub encoded: Option<Payload>,
    /// Training loss of the first inner step.
    pub loss_first: f32,
    /// Training loss of the last inner step.
    pub loss_last: f32,
    /// The inner optimizer after the unit.
    pub optimizer: AdamW,
}

/// Trains `unit` from the weights `base`: `inner_steps` AdamW steps (the run's AdamW settings
/// in `train`, the unit's batch size and learning-rate ramp) on the batches
/// `(seed, shard, 0..inner_steps)`, starting from `optimizer` (a fresh one for a unit as the
/// relay hands it out). `progress` hears each finished step. Blocks until done; the browser,
/// which must not block, runs the same steps with asynchronous reads. The result holds the
/// pseudo-gradient in f32.
#[allow(clippy::too_many_arguments)]
pub fn train(
    device: &Device,
    model: ModelConfig,
    train: &TrainConfig,
    unit: &WorkUnit,
    base: &[f32],
    corpus: &Corpus,
    optimizer: AdamW,
    progress: impl FnMut(u32),
) -> Result<Trained, Error> {
    train_unit(
        device, model, train, unit, base, corpus, optimizer, progress, None,
    )
}

/// As [`train`], for a participant's own submission: where the device can encode the unit's
/// codec ([`encodes_on_device`]), the pseudo-gradient is encoded there and only the encoded
/// bytes are read back ([`Trained::encoded`]), with the participant's error `feedback` carried
/// on the device for a sparse codec; elsewhere it is read in f32 as by [`train`] (encode it
/// with [`ErrorFeedback::encode`] then).
#[allow(clippy::too_many_arguments)]
pub fn train_and_encode(
    device: &Device,
    model: ModelConfig,
    train: &TrainConfig,
    unit: &WorkUnit,
    base: &[f32],
    corpus: &Corpus,
    optimizer: AdamW,
    feedback: &mut ErrorFeedback,
    progress: impl FnMut(u32),
) -> Result<Trained, Error> {
    train_unit(
        device,
        model,
        train,
        unit,
        base,
        corpus,
        optimizer,
        progress,
        Some(feedback),
    )
}

/// The quantizer a codec encodes with on a device, if it has one there (int8, int4 and
/// ternary; f32 needs none, sparse has its own kernel, and sign has no GPU encoder).
fn device_format(codec: Codec) -> Option<Format> {
    match codec {
        Codec::Int8 => Some(Format::INT8),
        Codec::Int4 => Some(Format::INT4),
        Codec::Ternary => Some(Format::TERNARY),
        Codec::F32 | Codec::Sign | Codec::Sparse { .. } => None,
    }
}

/// Whether a unit with `codec` trained on `device` is encoded where it was trained: int8,
/// int4, ternary or sparse (keeping at most [`quantize::SPARSE_MAX_K`] a chunk) on a wgpu /
/// WebGPU device, unless Tessera's kernels are switched off
/// ([`tessera_core::kernels::set_enabled`], `--no-fused-kernels`).
pub fn encodes_on_device(codec: Codec, device: &Device) -> bool {
    let has_kernel = match codec {
        Codec::Sparse { k } => (1..=quantize::SPARSE_MAX_K).contains(&k),
        _ => device_format(codec).is_some(),
    };
    has_kernel && kernels::enabled() && quantize::supported(device)
}

/// An update encoded on the device it was trained on, not yet read.
pub enum DeviceUpdate {
    /// int8, int4 or ternary: scales and codes.
    Quantized(Codec, Box<Quantized>),
    /// Sparse: the kernel's words (the participant's residual stays on the device).
    Sparse(Box<SparseQuantized>),
}

impl DeviceUpdate {
    /// Reads it back and lays out the codec's bytes, blocking: native only. A sparse update
    /// goes to [`ErrorFeedback::settle`] next.
    pub fn read(self) -> Result<Payload, Error> {
        let read_error = |e: tessera_core::Error| Error::Training(e.to_string());
        match self {
            DeviceUpdate::Quantized(codec, q) => {
                let len = q.len();
                let (scales, codes) = q.read().map_err(read_error)?;
                Payload::from_quantized(codec, len, &scales, codes)
            }
            DeviceUpdate::Sparse(q) => {
                let (k, len) = (q.k(), q.len());
                Payload::from_sparse_words(k, len, &q.read().map_err(read_error)?)
            }
        }
    }

    /// As [`DeviceUpdate::read`], without blocking (the only read a WebGPU tab has).
    pub async fn read_async(self) -> Result<Payload, Error> {
        let read_error = |e: tessera_core::Error| Error::Training(e.to_string());
        match self {
            DeviceUpdate::Quantized(codec, q) => {
                let len = q.len();
                let (scales, codes) = q.read_async().await.map_err(read_error)?;
                Payload::from_quantized(codec, len, &scales, codes)
            }
            DeviceUpdate::Sparse(q) => {
                let (k, len) = (q.k(), q.len());
                Payload::from_sparse_words(k, len, &q.read_async().await.map_err(read_error)?)
            }
        }
    }
}

/// The pseudo-gradient `before − after` over `unit`'s fragment of two flat weight tensors on
/// a device, encoded there with the unit's codec (`None` when [`encodes_on_device`] says
/// no): a sparse codec with the error `feedback` kept on the device; any other leaves nothing
/// to carry and clears it. Read it with [`DeviceUpdate::read`] / [`DeviceUpdate::read_async`].
pub fn quantize_on_device(
    unit: &WorkUnit,
    before: Tensor<1>,
    after: Tensor<1>,
    feedback: &mut ErrorFeedback,
) -> Result<Option<DeviceUpdate>, Error> {
    if !encodes_on_device(unit.codec, &before.device()) {
        return Ok(None);
    }
    let n = before.dims()[0];
    if after.dims()[0] != n {
        return Err(Error::BadUpdate(format!(
            "trained model has {} parameters, base {n}",
            after.dims()[0]
        )));
    }
    let range = unit.fragment.range(n)?;
    let delta = before.slice(range.clone()) - after.slice(range);
    if matches!(unit.codec, Codec::Sparse { .. }) {
        return Ok(feedback
            .sparse_on_device(unit, delta)
            .map(|q| DeviceUpdate::Sparse(Box::new(q))));
    }
    feedback.clear();
    Ok(device_format(unit.codec)
        .and_then(|format| quantize::quantize(delta, format))
        .map(|q| DeviceUpdate::Quantized(unit.codec, Box::new(q))))
}

#[allow(clippy::too_many_arguments)]
fn train_unit(
    device: &Device,
    model: ModelConfig,
    train: &TrainConfig,
    unit: &WorkUnit,
    base: &[f32],
    corpus: &Corpus,
    optimizer: AdamW,
    mut progress: impl FnMut(u32),
    mut feedback: Option<&mut ErrorFeedback>,
) -> Result<Trained, Error> {
    let mut train = train.clone();
    train.batch_size = unit.batch_size as usize;
    let mut trainer = trainer_for(unit, model, train, device, base)?;
    trainer.set_optimizer(optimizer);
    // The weights as uploaded, kept on the device for the pseudo-gradient there.
    let before = (feedback.is_some() && encodes_on_device(unit.codec, device))
        .then(|| params::flat_tensor(trainer.model()));
    let read = |t: tessera_core::burn::prelude::Tensor<1>| -> Result<f32, Error> {
        let v: Vec<f32> = t
            .into_data()
            .try_into_vec()
            .map_err(|e| Error::Training(format!("reading the loss: {e:?}")))?;
        Ok(v[0])
    };
    let (mut loss_first, mut loss_last) = (f32::NAN, f32::NAN);
    for step in 0..unit.inner_steps {
        let batch = batch(unit, &model, corpus, step);
        let out = trainer.step_with_lr(&batch, lr_at(unit, step));
        // Reading a value waits for the device: only the first and the last.
        if step == 0 {
            loss_first = read(out.loss)?;
            loss_last = loss_first;
        } else if step + 1 == unit.inner_steps {
            loss_last = read(out.loss)?;
        }
        progress(step + 1);
    }
    let quantized = match (before, feedback.as_deref_mut()) {
        (Some(before), Some(feedback)) => {
            quantize_on_device(unit, before, params::flat_tensor(trainer.model()), feedback)?
        }
        _ => None,
    };
    let (delta, encoded) = match quantized {
        Some(update) => {
            let payload = update.read()?;
            if let Some(feedback) = feedback {
                feedback.settle(&payload);
            }
            (Vec::new(), Some(payload))
        }
        None => (
            pseudo_gradient(unit, base, &params::to_vec(trainer.model()))?,
            None,
        ),
    };
    Ok(Trained {
        delta,
        encoded,
        loss_first,
        loss_last,
        optimizer: trainer.take_optimizer(),
    })
}

/// A trainer holding the unit's base weights with a fresh AdamW, ready for the unit's steps:
/// a unit on one fragment of the model trains that fragment alone, the rest frozen (no
/// gradient, no optimizer state), so what it uploads is all it changed. Every participant and
/// every re-execution starts a unit here.
pub fn trainer_for(
    unit: &WorkUnit,
    model: ModelConfig,
    train: TrainConfig,
    device: &Device,
    base: &[f32],
) -> Result<Trainer, Error> {
    let mut trainer = Trainer::with_weights(model, train, device, base)
        .map_err(|e| Error::Training(e.to_string()))?;
    if unit.fragment != Fragment::ALL {
        let range = unit.fragment.range(base.len())?;
        if range.len() < base.len() {
            trainer
                .train_only(range)
                .map_err(|e| Error::BadUpdate(format!("the unit's fragment: {e}")))?;
        }
    }
    Ok(trainer)
}

/// Tokens a unit trains on.
pub fn tokens(unit: &WorkUnit, model: &ModelConfig) -> u64 {
    unit.inner_steps as u64 * unit.batch_size as u64 * model.block_size as u64
}

/// The pseudo-gradient over the unit's fragment: `base − trained`.
pub fn pseudo_gradient(unit: &WorkUnit, base: &[f32], trained: &[f32]) -> Result<Vec<f32>, Error> {
    if base.len() != trained.len() {
        return Err(Error::BadUpdate(format!(
            "trained model has {} parameters, base {}",
            trained.len(),
            base.len()
        )));
    }
    let range = unit.fragment.range(base.len())?;
    Ok(base[range.clone()]
        .iter()
        .zip(&trained[range])
        .map(|(b, t)| b - t)
        .collect())
}

/// The signed submission of a finished unit whose pseudo-gradient `payload` is encoded with the
/// unit's codec (by [`crate::feedback::ErrorFeedback::encode`], which adds what earlier lossy
/// updates left out); `base_sha256` is the SHA-256 of the base weights' bytes as the relay
/// served them.
pub fn submission(
    secret: &[u8; 32],
    unit: &WorkUnit,
    model: &ModelConfig,
    base_sha256: [u8; 32],
    payload: Payload,
    loss_before: f32,
    loss_after: f32,
) -> Submission {
    signed(
        secret,
        identity::update_message,
        unit,
        model,
        base_sha256,
        payload,
        (loss_before, loss_after),
    )
}

/// A verifier's signed re-execution of another participant's `unit`: as [`submission`], its
/// pseudo-gradient encoded with the unit's codec and nothing carried (a verifier's residual is
/// its own units'), signed as a verification ([`identity::verification_message`]).
pub fn verification(
    secret: &[u8; 32],
    unit: &WorkUnit,
    model: &ModelConfig,
    base_sha256: [u8; 32],
    delta: &[f32],
    loss_before: f32,
    loss_after: f32,
) -> Submission {
    signed(
        secret,
        identity::verification_message,
        unit,
        model,
        base_sha256,
        Payload::encode(unit.codec, delta),
        (loss_before, loss_after),
    )
}

fn signed(
    secret: &[u8; 32],
    message: fn(u64, u64, &[u8; 32], &[u8]) -> Vec<u8>,
    unit: &WorkUnit,
    model: &ModelConfig,
    base_sha256: [u8; 32],
    payload: Payload,
    (loss_before, loss_after): (f32, f32),
) -> Submission {
    let signature = identity::sign(
        secret,
        &message(unit.unit_id, unit.base_version, &base_sha256, &payload.data),
    )
    .to_vec();
    Submission {
        unit_id: unit.unit_id,
        base_version: unit.base_version,
        base_sha256,
        payload,
        tokens: tokens(unit, model),
        loss_before,
        loss_after,
        signature,
    }
}

/// What an honest participant sends for a unit whose pseudo-gradient is `delta`: `delta` as
/// the unit's codec decodes it (itself for f32). A re-execution is compared with a submission
/// in this form: against the raw pseudo-gradient, a coarse codec's own rounding (one bit or
/// three levels a value) would read as a disagreement. The participant's error feedback is not
/// included (a re-execution cannot know it: why the sparse codec is not verifiable).
pub fn as_sent(codec: Codec, delta: Vec<f32>) -> Result<Vec<f32>, Error> {
    if codec.is_lossy() {
        Payload::encode(codec, &delta).decode()
    } else {
        Ok(delta)
    }
}

/// Cosine similarity of two vectors (1 for identical directions): how the browser and native
/// results of the same unit are compared.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{Codec, Fragment};

    /// A held version and the relay's file of the next: the change rebuilds it exactly, and
    /// any other change (wrong versions, a link that overflows the model, another header, a
    /// flipped byte) is refused without a panic.
    #[test]
    fn a_change_rebuilds_the_next_version_or_is_refused() {
        let device = Device::flex();
        let model = ModelConfig::named("tiny").unwrap();
        let specs = params::specs(&tessera_core::model::Gpt::new(&model, &device));
        let n = params::total_len(&specs);
        let old: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
        let step: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos() * 1e-3).collect();
        let payload = Payload::encode(Codec::Int8, &step);
        let sent = payload.decode().unwrap();
        let new: Vec<f32> = old.iter().zip(&sent).map(|(o, d)| o - d).collect();
        let meta = |v: &str| {
            std::collections::HashMap::from([("tessera_version".to_string(), v.to_string())])
        };
        let file =
            tessera_core::checkpoint::weights_to_safetensors(&specs, &new, meta("8")).unwrap();
        let header = tessera_core::checkpoint::safetensors_header(&file)
            .unwrap()
            .to_vec();
        let held = Base {
            version: 7,
            weights: old,
            sha256: [0; 32],
        };
        let change = ModelChange {
            from: 7,
            to: 8,
            links: vec![(0, payload.clone())],
            header: header.clone(),
            sha256: sha256(&file),
        };
        let rebuilt = held.apply(&model, &change, &device).unwrap();
        assert_eq!(
            (rebuilt.version, rebuilt.weights, rebuilt.sha256),
            (8, new, sha256(&file))
        );
        let other_file =
            tessera_core::checkpoint::weights_to_safetensors(&specs, &held.weights, meta("9"))
                .unwrap();
        let mut flipped = payload.clone();
        flipped.data[2000] ^= 0x40;
        for bad in [
            ModelChange {
                from: 6,
                ..change.clone()
            },
            ModelChange {
                to: 9,
                ..change.clone()
            },
            ModelChange {
                links: vec![(1, payload.clone())],
                ..change.clone()
            },
            ModelChange {
                links: vec![(u64::MAX, payload.clone())],
                ..change.clone()
            },
            ModelChange {
                links: vec![(0, flipped)],
                ..change.clone()
            },
            ModelChange {
                header: tessera_core::checkpoint::safetensors_header(&other_file)
                    .unwrap()
                    .to_vec(),
                ..change.clone()
            },
            ModelChange {
                header: header[..10].to_vec(),
                ..change.clone()
            },
        ]
        .iter()
        .enumerate()
        {
            assert!(
                held.apply(&model, bad.1, &device).is_err(),
                "case {}",
                bad.0
            );
        }
    }

    fn unit(fragment: Fragment) -> WorkUnit {
        WorkUnit {
            unit_id: 3,
            base_version: 1,
            shard: 2,
            inner_steps: 4,
            batch_size: 2,
            lr: 1e-3,
            warmup_steps: 0,
            seed: 9,
            fragment,
            codec: crate::update::Codec::F32,
            deadline_ms: 0,
        }
    }

    #[test]
    fn pseudo_gradient_covers_the_fragment_and_the_submission_verifies() {
        let base = [1.0, 2.0, 3.0, 4.0];
        let trained = [0.5, 2.5, 3.0, 3.0];
        let all = pseudo_gradient(&unit(Fragment::ALL), &base, &trained).unwrap();
        assert_eq!(all, vec![0.5, -0.5, 0.0, 1.0]);
        let part = unit(Fragment { offset: 1, len: 2 });
        assert_eq!(
            pseudo_gradient(&part, &base, &trained).unwrap(),
            vec![-0.5, 0.0]
        );
        assert!(pseudo_gradient(&part, &base, &trained[..3]).is_err());
        let secret = [7u8; 32];
        let model = ModelConfig::named("tiny").unwrap();
        let payload = Payload::encode(part.codec, &[-0.5, 0.0]);
        let s = submission(&secret, &part, &model, [5; 32], payload, 3.0, 2.0);
        assert_eq!(s.tokens, 4 * 2 * model.block_size as u64);
        identity::verify(
            &identity::public_key(&secret),
            &identity::update_message(3, 1, &[5; 32], &s.payload.data),
            &s.signature,
        )
        .unwrap();
    }

    #[test]
    fn the_learning_rate_ramps_over_the_warmup() {
        let mut u = unit(Fragment::ALL);
        u.warmup_steps = 3;
        let lrs: Vec<f64> = (0..5).map(|s| lr_at(&u, s)).collect();
        assert_eq!(lrs, vec![2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]);
        u.warmup_steps = 0;
        assert_eq!(lr_at(&u, 0), 1e-3);
    }

    #[test]
    fn training_a_unit_is_a_pure_function_of_the_unit() {
        let model = ModelConfig::named("tiny").unwrap();
        let corpus =
            Corpus::from_text(&tessera_core::corpus::default_corpus(), model.block_size).unwrap();
        let device = Device::flex();
        let train = TrainConfig::nanogpt(10);
        let base = params::to_vec(Trainer::new(model, train.clone(), &device).unwrap().model());
        let mut u = unit(Fragment::ALL);
        u.warmup_steps = 1;
        let mut steps = Vec::new();
        let a = super::train(
            &device,
            model,
            &train,
            &u,
            &base,
            &corpus,
            AdamW::new(),
            |s| steps.push(s),
        )
        .unwrap();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        let b = super::train(
            &device,
            model,
            &train,
            &u,
            &base,
            &corpus,
            AdamW::new(),
            |_| {},
        )
        .unwrap();
        assert_eq!(a.delta, b.delta, "the same unit trained twice differs");
        assert!(
            a.loss_last < a.loss_first,
            "{} -> {}",
            a.loss_first,
            a.loss_last
        );
        assert_eq!(a.optimizer.step, 4);
    }

    #[test]
    fn cosine_of_a_vector_and_its_scaled_copy_is_one() {
        let a = [1.0, -2.0, 3.0];
        assert!((cosine(&a, &[2.0, -4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&a, &[-1.0, 2.0, -3.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&a, &[0.0; 3]), 0.0);
    }
}
