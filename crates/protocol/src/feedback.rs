//! Error feedback: a participant keeps what its lossy updates left out (the update it meant
//! minus the update as decoded) and adds it to its next update of the same run, so that over
//! a few units nothing of its work is lost, only delayed (SparseLoCo, DeMo). It is the
//! participant's own state, never sent; a new run, another fragment or a lossless codec
//! starts it afresh. A GPU participant keeps it on its device, where its sparse updates are
//! encoded ([`ErrorFeedback::sparse_on_device`]).

use tessera_core::burn::prelude::Tensor;
use tessera_core::kernels::quantize::{self, SparseQuantized};

use crate::messages::WorkUnit;
use crate::sparse;
use crate::update::{Codec, Payload};

/// What the residual is kept for: updates of one run, over one range of parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scope {
    seed: u64,
    offset: u64,
    len: usize,
}

impl Scope {
    fn of(unit: &WorkUnit, len: usize) -> Self {
        Scope {
            seed: unit.seed,
            offset: unit.fragment.offset,
            len,
        }
    }
}

/// A participant's residual, carried from one unit to the next: in host memory, or on the
/// GPU its updates are encoded on.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    decay: f32,
    scope: Option<Scope>,
    residual: Vec<f32>,
    on_device: Option<Tensor<1>>,
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
            on_device: None,
        }
    }

    /// Encodes the pseudo-gradient `delta` of `unit` with the unit's codec, after adding the
    /// residual carried from this run's earlier units (a lossless codec clears it), and keeps
    /// what this encoding leaves out for the next one. A residual kept on a device is not
    /// read back: encoding on the host after the device starts afresh.
    pub fn encode(&mut self, unit: &WorkUnit, delta: &[f32]) -> Payload {
        let scope = Scope::of(unit, delta.len());
        let sparse = matches!(unit.codec, Codec::Sparse { .. });
        if !sparse || self.on_device.is_some() {
            self.clear();
        }
        if !sparse {
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

    /// Encodes `delta`, the pseudo-gradient of a sparse `unit` on a wgpu / WebGPU device, on
    /// that device (`tessera-core`'s `sparse.wgsl`), after adding the residual this run's
    /// earlier units left there, and keeps there what this encoding leaves out. Read the
    /// result, make it a payload ([`Payload::from_sparse_words`]) and hand that to
    /// [`ErrorFeedback::settle`]. `None`, nothing changed, for another codec or where the
    /// kernel does not run (another device, `k` above its limit): encode on the host then.
    pub fn sparse_on_device(
        &mut self,
        unit: &WorkUnit,
        delta: Tensor<1>,
    ) -> Option<SparseQuantized> {
        let Codec::Sparse { k } = unit.codec else {
            return None;
        };
        let scope = Scope::of(unit, delta.dims()[0]);
        let device = delta.device();
        let residual = match (self.scope == Some(scope), &self.on_device) {
            (false, _) => None,
            (true, Some(r)) => Some(r.clone()),
            // This run's residual, kept on the host until now: it moves to the device.
            (true, None) => Some(Tensor::from_floats(self.residual.as_slice(), &device)),
        };
        let (encoded, carried) = quantize::sparse(delta, residual, k, self.decay)?;
        self.scope = Some(scope);
        self.residual = Vec::new();
        self.on_device = Some(carried);
        Some(encoded)
    }

    /// Takes note of a payload encoded on the device ([`ErrorFeedback::sparse_on_device`]) once
    /// read: an update with a non-finite value (NaN magnitudes, which the relay refuses)
    /// leaves nothing to carry, as in [`ErrorFeedback::encode`].
    pub fn settle(&mut self, payload: &Payload) {
        let finite = match (payload.codec, usize::try_from(payload.len)) {
            (Codec::Sparse { k }, Ok(len)) => sparse::finite_magnitudes(&payload.data, len, k),
            _ => false,
        };
        if !finite {
            self.clear();
        }
    }

    /// Forgets the residual (a new run, or a reset of the participant).
    pub fn clear(&mut self) {
        self.scope = None;
        self.residual = Vec::new();
        self.on_device = None;
    }

    /// Whether the residual is kept on a device.
    pub fn on_device(&self) -> bool {
        self.on_device.is_some()
    }

    /// The residual's Euclidean norm (0 when there is none). One kept on a device is read
    /// back for it, blocking: native only.
    pub fn norm(&self) -> f64 {
        if let Some(r) = &self.on_device {
            let squares: f32 = r.clone().powi_scalar(2).sum().into_scalar();
            return f64::from(squares).sqrt();
        }
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
