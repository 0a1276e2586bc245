//! Taking a banned identity's unverified updates back out of the model.
//!
//! Most updates are folded before anyone re-executes them (a sampled fraction is audited
//! afterwards), so a participant caught by an audit may already have updates in the model. The
//! outer step is linear in the round's average: an update that was a share `c` of the averaged
//! pseudo-gradient of one round is, any number of Nesterov steps later, exactly `−b·c` in the
//! weights and `a·c` in the momentum, for two scalars that every later step updates
//! (`a ← μa`, `b ← b + lr·μ·a`). So each folded update whose credit is still pending keeps
//! its share `c` and its two scalars ([`Part`]); a ban adds `b·c` back to the weights and takes
//! `a·c` out of the momentum, which leaves the model as if the update had never been folded
//! (apart from what honest units trained on the weights it touched). A part is forgotten when
//! its unit is verified or its credit granted, and the oldest go first beyond a memory budget.

use std::collections::{BTreeSet, VecDeque};

/// One folded update's share of the model.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub participant: String,
    pub unit_id: u64,
    /// The fragment it was folded into (its values cover that fragment's range).
    pub fragment: usize,
    pub tokens: u64,
    /// Its weight in its round.
    pub weight: f32,
    /// In the open round: the delta as folded (after clipping). Once its round closed: its
    /// share of that round's averaged pseudo-gradient (`weight / norm ×` the delta).
    pub values: Vec<f32>,
    /// The weights hold `−in_params · values` of it…
    pub in_params: f32,
    /// …(and held `−past[i] · values` at version `version + i`, for rollbacks)…
    past: Vec<f32>,
    /// …and the outer momentum `in_momentum · values`.
    pub in_momentum: f32,
    /// The version its round made (0 while the round is open).
    pub version: u64,
}

impl Part {
    /// Undoes this part's effect on `params` and `momentum` (the fragment it was folded into).
    pub fn undo(&self, params: &mut [f32], momentum: &mut [f32]) {
        for ((p, m), &v) in params.iter_mut().zip(momentum.iter_mut()).zip(&self.values) {
            *p += self.in_params * v;
            *m -= self.in_momentum * v;
        }
    }

    fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<f32>()
    }
}

/// The parts of the open round and of closed rounds whose credit is still pending.
#[derive(Debug, Default)]
pub(crate) struct Parts {
    open: Vec<Part>,
    closed: VecDeque<Part>,
    /// Parts dropped over the memory budget: those updates can no longer be taken out.
    pub dropped: u64,
    /// Parts taken out of the model.
    pub reverted: u64,
}

impl Parts {
    /// An update folded into the open round.
    pub fn fold(
        &mut self,
        participant: &str,
        unit_id: u64,
        fragment: usize,
        tokens: u64,
        weight: f32,
        values: Vec<f32>,
    ) {
        self.open.push(Part {
            participant: participant.to_string(),
            unit_id,
            fragment,
            tokens,
            weight,
            values,
            in_params: 0.0,
            past: Vec::new(),
            in_momentum: 0.0,
            version: 0,
        });
    }

    /// The open round closed into `version` with the outer step `lr`, momentum `mu`, the
    /// accumulator of each fragment divided by its `norms` entry (`None`: that fragment took
    /// no step, so its parts and momentum stay as they were); `budget` bounds the bytes kept.
    pub fn close(&mut self, version: u64, norms: &[Option<f64>], lr: f32, mu: f32, budget: usize) {
        for p in &mut self.closed {
            if norms.get(p.fragment).copied().flatten().is_some() {
                p.in_momentum *= mu;
                p.in_params += lr * mu * p.in_momentum;
            }
            p.past.push(p.in_params);
        }
        for mut p in std::mem::take(&mut self.open) {
            let Some(norm) = norms.get(p.fragment).copied().flatten() else {
                // Its fragment's weights summed to nothing: it is not in the step.
                continue;
            };
            let share = (p.weight as f64 / norm) as f32;
            p.values.iter_mut().for_each(|v| *v *= share);
            p.in_momentum = 1.0;
            p.in_params = lr * (1.0 + mu);
            p.past = vec![p.in_params];
            p.version = version;
            self.closed.push_back(p);
        }
        let mut bytes = self.kept().1;
        while bytes > budget
            && let Some(p) = self.closed.pop_front()
        {
            bytes -= p.bytes();
            self.dropped += 1;
        }
    }

    /// The open round was cleared without a step (a rollback).
    pub fn discard_open(&mut self) {
        self.open.clear();
    }

    /// A rollback restored the weights of `restore` and cleared the momentum: parts of later
    /// rounds are gone from the model, earlier ones are in the weights only, as they were at
    /// `restore`.
    pub fn roll_back(&mut self, restore: u64) {
        self.discard_open();
        self.closed.retain_mut(|p| {
            let Some(i) = restore.checked_sub(p.version) else {
                return false;
            };
            p.past.truncate(i as usize + 1);
            p.in_params = *p.past.last().expect("a closed part's first step");
            p.in_momentum = 0.0;
            true
        });
    }

    /// Units verified or granted: they stay in the model for good.
    pub fn forget(&mut self, units: &BTreeSet<u64>) {
        if units.is_empty() {
            return;
        }
        self.open.retain(|p| !units.contains(&p.unit_id));
        self.closed.retain(|p| !units.contains(&p.unit_id));
    }

    /// Takes `participant`'s parts out: those of the open round, then those of closed rounds.
    pub fn take(&mut self, participant: &str) -> (Vec<Part>, Vec<Part>) {
        let (open, rest): (Vec<Part>, Vec<Part>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|p| p.participant == participant);
        self.open = rest;
        let (closed, rest): (VecDeque<Part>, VecDeque<Part>) = std::mem::take(&mut self.closed)
            .into_iter()
            .partition(|p| p.participant == participant);
        self.closed = rest;
        (open, closed.into())
    }

    /// Parts of closed rounds kept, and their bytes.
    pub fn kept(&self) -> (usize, usize) {
        (self.closed.len(), self.closed.iter().map(Part::bytes).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::nesterov_step;

    /// Three rounds of two updates each ("a" honest, "b" to be banned) under Nesterov
    /// momentum with a changing lr; taking "b" out afterwards leaves exactly the weights and
    /// momentum of the same steps without "b" (the honest updates given).
    #[test]
    fn taking_a_participant_out_equals_never_folding_it() {
        let mu = 0.9;
        let a = [
            vec![0.3f32, -0.2, 0.1],
            vec![0.1, 0.1, -0.4],
            vec![-0.2, 0.5, 0.0],
        ];
        let b = [
            vec![5.0f32, 1.0, -3.0],
            vec![-2.0, 4.0, 0.5],
            vec![1.0, 1.0, 1.0],
        ];
        let lrs = [0.7f32, 0.5, 0.35];
        let (mut p, mut m) = (vec![1.0f32; 3], vec![0.0f32; 3]);
        let (mut p0, mut m0) = (p.clone(), m.clone());
        let mut parts = Parts::default();
        for r in 0..3 {
            let (wa, wb) = (2.0f32, 1.0f32);
            parts.fold("a", 2 * r as u64, 0, 10, wa, a[r].clone());
            parts.fold("b", 2 * r as u64 + 1, 0, 10, wb, b[r].clone());
            let norm = (wa + wb) as f64;
            let g: Vec<f32> = (0..3)
                .map(|i| (wa * a[r][i] + wb * b[r][i]) / norm as f32)
                .collect();
            nesterov_step(&mut p, &mut m, &g, lrs[r], mu);
            let g0: Vec<f32> = (0..3).map(|i| wa * a[r][i] / norm as f32).collect();
            nesterov_step(&mut p0, &mut m0, &g0, lrs[r], mu);
            parts.close(r as u64 + 1, &[Some(norm)], lrs[r], mu, usize::MAX);
        }
        // "a" is verified in round 2: it stays.
        parts.forget(&BTreeSet::from([2]));
        let (open, closed) = parts.take("b");
        assert!(open.is_empty());
        assert_eq!(closed.len(), 3);
        for part in &closed {
            part.undo(&mut p, &mut m);
        }
        for i in 0..3 {
            assert!((p[i] - p0[i]).abs() < 1e-5, "weights {p:?} vs {p0:?}");
            assert!((m[i] - m0[i]).abs() < 1e-5, "momentum {m:?} vs {m0:?}");
        }
        assert_eq!(parts.kept(), (2, 2 * 3 * 4));
    }

    #[test]
    fn the_budget_drops_the_oldest_and_rollbacks_drop_later_rounds() {
        let mut parts = Parts::default();
        for r in 1..=3u64 {
            parts.fold("x", r, 0, 1, 1.0, vec![1.0; 4]);
            parts.close(r, &[Some(1.0)], 0.5, 0.9, 2 * 16);
        }
        assert_eq!(parts.kept(), (2, 32));
        assert_eq!(parts.dropped, 1);
        parts.roll_back(2);
        assert_eq!(parts.kept(), (1, 16));
        let (_, closed) = parts.take("x");
        assert_eq!((closed[0].unit_id, closed[0].in_momentum), (2, 0.0));
    }

    /// A rollback to version 2 of a run of 3 rounds (weights of version 2, momentum cleared),
    /// then one more round: taking "b" out leaves exactly the same run without "b".
    #[test]
    fn taking_a_participant_out_after_a_rollback() {
        let (mu, lr) = (0.9, 0.7);
        let a = [0.3f32, -0.2];
        let b = [4.0f32, 1.0];
        let run = |with_b: bool, parts: &mut Parts| {
            let (mut p, mut m) = (vec![1.0f32; 2], vec![0.0f32; 2]);
            let mut saved = None;
            for v in 1..=4u64 {
                if v == 4 {
                    // The guard restores version 2.
                    p = saved.clone().unwrap();
                    m = vec![0.0; 2];
                    parts.roll_back(2);
                }
                parts.fold("a", 2 * v, 0, 1, 1.0, a.to_vec());
                parts.fold("b", 2 * v + 1, 0, 1, 1.0, b.to_vec());
                let g: Vec<f32> = (0..2)
                    .map(|i| (a[i] + if with_b { b[i] } else { 0.0 }) / 2.0)
                    .collect();
                nesterov_step(&mut p, &mut m, &g, lr, mu);
                parts.close(v, &[Some(2.0)], lr, mu, usize::MAX);
                if v == 2 {
                    saved = Some(p.clone());
                }
            }
            (p, m)
        };
        let mut parts = Parts::default();
        let (mut p, mut m) = run(true, &mut parts);
        let (p0, m0) = run(false, &mut Parts::default());
        let (_, closed) = parts.take("b");
        assert_eq!(
            closed.len(),
            3,
            "versions 1, 2 and the one after the rollback"
        );
        for part in &closed {
            part.undo(&mut p, &mut m);
        }
        for i in 0..2 {
            assert!((p[i] - p0[i]).abs() < 1e-5, "weights {p:?} vs {p0:?}");
            assert!((m[i] - m0[i]).abs() < 1e-5, "momentum {m:?} vs {m0:?}");
        }
    }
}
