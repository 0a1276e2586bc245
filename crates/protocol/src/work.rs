//! What a work unit means, for every participant: which batches it trains on, how its
//! pseudo-gradient is formed over its fragment, and how the result is signed. The native host
//! and the browser both build their submissions here, so they cannot drift apart.

use tessera_core::config::ModelConfig;
use tessera_core::data::{Batch, BatchKey, Corpus, Split};

use crate::Error;
use crate::identity;
use crate::messages::{Submission, WorkUnit};
use crate::update::Payload;

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

/// The signed submission of a finished unit.
pub fn submission(
    secret: &[u8; 32],
    unit: &WorkUnit,
    model: &ModelConfig,
    delta: &[f32],
    loss_before: f32,
    loss_after: f32,
) -> Submission {
    let payload = Payload::f32(delta);
    let signature = identity::sign(
        secret,
        &identity::update_message(unit.unit_id, unit.base_version, &payload.data),
    )
    .to_vec();
    Submission {
        unit_id: unit.unit_id,
        base_version: unit.base_version,
        payload,
        tokens: tokens(unit, model),
        loss_before,
        loss_after,
        signature,
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
    use crate::update::Fragment;

    fn unit(fragment: Fragment) -> WorkUnit {
        WorkUnit {
            unit_id: 3,
            base_version: 1,
            shard: 2,
            inner_steps: 4,
            batch_size: 2,
            lr: 1e-3,
            seed: 9,
            fragment,
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
        let s = submission(&secret, &part, &model, &[-0.5, 0.0], 3.0, 2.0);
        assert_eq!(s.tokens, 4 * 2 * model.block_size as u64);
        identity::verify(
            &identity::public_key(&secret),
            &identity::update_message(3, 1, &s.payload.data),
            &s.signature,
        )
        .unwrap();
    }

    #[test]
    fn cosine_of_a_vector_and_its_scaled_copy_is_one() {
        let a = [1.0, -2.0, 3.0];
        assert!((cosine(&a, &[2.0, -4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&a, &[-1.0, 2.0, -3.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&a, &[0.0; 3]), 0.0);
    }
}
