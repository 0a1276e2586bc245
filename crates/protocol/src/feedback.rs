//! Error feedback: a participant keeps what its lossy updates left out (the update it meant
//! minus the update as decoded) and adds it to its next update of the same run, so that over
//! a few units nothing of its work is lost, only delayed (SparseLoCo, DeMo). It is the
//! participant's own state, never sent; a new run, another fragment or a lossless codec
//! starts it afresh.

use crate::messages::WorkUnit;
use crate::update::{Codec, Payload};

/// What the residual is kept for: updates of one run, over one range of parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scope {
    seed: u64,
    offset: u64,
    len: usize,
}

/// A participant's residual, carried from one unit to the next.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    decay: f32,
    scope: Option<Scope>,
    residual: Vec<f32>,
}

impl Default for ErrorFeedback {
    fn default() -> Self {
        ErrorFeedback::new(ErrorFeedback::DECAY)
    }
}

impl ErrorFeedback {
    /// How much of the residual is carried into the next update (SparseLoCo's β).
    pub const DECAY: f32 = 0.95;

    /// An empty residual, carried with `decay`.
    pub fn new(decay: f32) -> Self {
        ErrorFeedback {
            decay,
            scope: None,
            residual: Vec::new(),
        }
    }

    /// Encodes the pseudo-gradient `delta` of `unit` with the unit's codec, after adding the
    /// residual carried from this run's earlier units (a lossless codec clears it), and keeps
    /// what this encoding leaves out for the next one.
    pub fn encode(&mut self, unit: &WorkUnit, delta: &[f32]) -> Payload {
        let scope = Scope {
            seed: unit.seed,
            offset: unit.fragment.offset,
            len: delta.len(),
        };
        if !matches!(unit.codec, Codec::Sparse { .. }) {
            self.clear();
            return Payload::encode(unit.codec, delta);
        }
        if self.scope != Some(scope) {
            self.scope = Some(scope);
            self.residual = vec![0.0; delta.len()];
        }
        for (e, d) in self.residual.iter_mut().zip(delta) {
            *e = self.decay * *e + d;
        }
        let payload = Payload::encode(unit.codec, &self.residual);
        match payload.decode() {
            Ok(sent) => {
                for (e, s) in self.residual.iter_mut().zip(&sent) {
                    *e -= s;
                }
            }
            // A non-finite update: the relay refuses it, and nothing of it is kept.
            Err(_) => self.clear(),
        }
        payload
    }

    /// Forgets the residual (a new run, or a reset of the participant).
    pub fn clear(&mut self) {
        self.scope = None;
        self.residual = Vec::new();
    }

    /// The residual's Euclidean norm (0 when there is none).
    pub fn norm(&self) -> f64 {
        self.residual
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::Fragment;

    fn unit(seed: u64, codec: Codec) -> WorkUnit {
        WorkUnit {
            unit_id: 1,
            base_version: 0,
            shard: 0,
            inner_steps: 1,
            batch_size: 1,
            lr: 1e-3,
            warmup_steps: 0,
            seed,
            fragment: Fragment::ALL,
            codec,
            deadline_ms: 0,
        }
    }

    #[test]
    fn what_is_left_out_is_sent_later_and_a_new_run_starts_afresh() {
        let sparse = Codec::Sparse { k: 1 };
        let mut ef = ErrorFeedback::new(1.0);
        // Unit 1 sends the largest value only; the other two wait.
        let p = ef.encode(&unit(7, sparse), &[3.0, 1.0, 0.0, 2.0]);
        assert_eq!(p.decode().unwrap(), vec![3.0, 0.0, 0.0, 0.0]);
        assert_eq!(ef.norm(), 5f64.sqrt());
        // Unit 2 brings nothing new: the residual's largest goes out.
        let p = ef.encode(&unit(7, sparse), &[0.0; 4]);
        assert_eq!(p.decode().unwrap(), vec![0.0, 0.0, 0.0, 2.0]);
        let p = ef.encode(&unit(7, sparse), &[0.0; 4]);
        assert_eq!(p.decode().unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
        assert_eq!(ef.norm(), 0.0);
        // A new run (another seed) does not inherit the old run's residual.
        ef.encode(&unit(7, sparse), &[0.0, 0.0, 5.0, 4.0]);
        assert!(ef.norm() > 0.0);
        let p = ef.encode(&unit(8, sparse), &[1.0, 0.0, 0.0, 0.0]);
        assert_eq!(p.decode().unwrap(), vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(ef.norm(), 0.0);
        // A lossless codec clears it.
        ef.encode(&unit(8, sparse), &[0.0, 2.0, 0.0, 1.0]);
        assert!(ef.norm() > 0.0);
        let p = ef.encode(&unit(8, Codec::F32), &[0.5; 4]);
        assert_eq!(p.decode().unwrap(), vec![0.5; 4]);
        assert_eq!(ef.norm(), 0.0);
    }

    #[test]
    fn decay_shrinks_what_is_carried() {
        let mut ef = ErrorFeedback::new(0.5);
        let u = unit(1, Codec::Sparse { k: 1 });
        ef.encode(&u, &[4.0, 2.0]);
        // Residual [0, 2] carried at half: [0, 1] + [0, 0].
        let p = ef.encode(&u, &[0.0, 0.0]);
        assert_eq!(p.decode().unwrap(), vec![0.0, 1.0]);
    }
}
