//! Verification of submissions, the decisions: cheap checks on every update (its norm against
//! the recent accepted ones, exact and near duplicates), the loss probe's verdict, the choice of
//! units to re-execute and the comparison of a re-execution. The arithmetic over a whole update
//! (norms, sketches) is here too; the compute that needs the model (probe losses, re-training a
//! unit) is the shell's.

use std::collections::{BTreeSet, VecDeque};

use tessera_protocol::work::cosine;

use crate::aggregate::l2_norm;

/// Dimensions of an update's count-sketch.
pub const SKETCH_DIM: usize = 1024;

/// The verification settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScreenConfig {
    /// Off: only the structural checks (signature, lease, shape, finiteness, absolute norm)
    /// run; every update is folded as it comes (the attack suite's control).
    pub enabled: bool,
    /// Accepted updates whose norms form the reference.
    pub norm_window: usize,
    /// The reference needs this many before outliers are judged.
    pub norm_min_history: usize,
    /// Rejected as an outlier above this multiple of the median normalised norm…
    pub norm_high: f64,
    /// …or below this fraction of it (no work done).
    pub norm_low: f64,
    /// Cosine (of sketches) at or above which an update looks like a near copy of a recent one
    /// and is held for re-execution (honest updates of one round measured up to 0.97 early in
    /// a run: too close to reject on).
    pub near_duplicate: f64,
    /// Recent updates kept for near-duplicate detection.
    pub recent: usize,
    /// The probe: an update that raises the loss of the unit's own batches by more than this
    /// fraction of the base loss is rejected (it does the opposite of training on them)…
    pub probe_reject_gain: f64,
    /// …one that does not lower it by at least this fraction is held for re-execution (late
    /// in a run an honest update can raise the loss of two batches a little)…
    pub probe_min_gain: f64,
    /// …and when it lowers the held-out batches' loss by more than the own batches' (plus this
    /// margin), it is held for re-execution (early in a run honest updates generalise almost
    /// fully, so this is a signal, not a verdict).
    pub probe_margin: f64,
    /// Fraction of a trusted identity's units re-executed at random (audited)…
    pub reexecute_rate: f64,
    /// …and of a young one's: fewer than `trusted_after` of its units re-executed and found
    /// honest.
    pub reexecute_young_rate: f64,
    /// Re-executed units, found honest, after which an identity is trusted.
    pub trusted_after: u64,
    /// Every identity's first units are re-executed.
    pub reexecute_first: u32,
    /// A re-executed update must have at least this cosine with the submitted one…
    pub reexecute_cosine: f64,
    /// …and a norm within this relative distance.
    pub reexecute_norm: f64,
    /// Centered clipping: each update's distance from the previous round's average is clipped
    /// to this multiple of the median distance (0: off).
    pub clip: f64,
    /// Credit is granted this many rounds after the update's round closed (a failed
    /// re-execution before then forfeits it). With audits at rate r, a cheating unit escapes
    /// its window with probability about (1 − r)^window: 4% at 10% and 30 rounds.
    pub grant_after_rounds: u64,
    /// Fraction of verifiers' agreeing re-executions that the relay re-executes too (a
    /// verifier that vouches without working is caught and banned).
    pub verifier_recheck_rate: f64,
    /// Bytes kept of folded updates whose credit is pending, so that a ban can take them out
    /// of the model again; beyond it the oldest can no longer be (0: none are kept).
    pub revert_memory: usize,
}

impl Default for ScreenConfig {
    fn default() -> Self {
        ScreenConfig {
            enabled: true,
            norm_window: 64,
            norm_min_history: 8,
            norm_high: 4.0,
            norm_low: 0.1,
            near_duplicate: 0.995,
            recent: 64,
            probe_reject_gain: -0.10,
            probe_min_gain: -0.01,
            probe_margin: 0.0,
            reexecute_rate: 0.1,
            reexecute_young_rate: 0.5,
            trusted_after: 10,
            reexecute_first: 2,
            reexecute_cosine: 0.99,
            reexecute_norm: 0.05,
            clip: 2.0,
            grant_after_rounds: 30,
            verifier_recheck_rate: 0.1,
            revert_memory: 512 << 20,
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A count-sketch of `values` over [`SKETCH_DIM`] buckets: every coordinate is added with a
/// pseudo-random sign to a pseudo-random bucket, so `⟨sketch(a), sketch(b)⟩` estimates
/// `⟨a, b⟩` in one pass and cosines of sketches estimate cosines of updates.
pub fn sketch(values: &[f32]) -> Vec<f32> {
    let mut s = vec![0f32; SKETCH_DIM];
    for (i, &v) in values.iter().enumerate() {
        let h = mix(i as u64);
        let bucket = (h as usize) & (SKETCH_DIM - 1);
        s[bucket] += if h >> 63 == 1 { -v } else { v };
    }
    s
}

/// An update's norm made comparable across unit sizes and learning rates: Adam moves each
/// weight by about the learning rate per step, and a unit's steps partly add up.
pub fn normalized_norm(norm: f64, steps: u32, lr: f64) -> f64 {
    norm / (lr.max(1e-12) * (steps.max(1) as f64).powf(0.75))
}

/// What the shell measured of an update before it can be judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// SHA-256 of the payload.
    pub sha256: [u8; 32],
    /// L2 norm.
    pub norm: f64,
    /// Count-sketch.
    pub sketch: Vec<f32>,
}

impl Measured {
    /// Measures `delta` whose payload bytes hash to `sha256`.
    pub fn of(delta: &[f32], sha256: [u8; 32]) -> Self {
        Measured {
            sha256,
            norm: l2_norm(delta),
            sketch: sketch(delta),
        }
    }
}

/// The probe's losses: the unit's own batches and held-out batches, at the base weights and
/// with the update applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Own batches, base weights.
    pub own_before: f32,
    /// Own batches, base − update.
    pub own_after: f32,
    /// Held-out batches, base weights.
    pub held_before: f32,
    /// Held-out batches, base − update.
    pub held_after: f32,
}

impl Probe {
    /// Relative gain on the unit's own batches.
    pub fn own_gain(&self) -> f64 {
        (self.own_before - self.own_after) as f64 / (self.own_before as f64).max(1e-6)
    }
    /// Relative gain on the held-out batches.
    pub fn held_gain(&self) -> f64 {
        (self.held_before - self.held_after) as f64 / (self.held_before as f64).max(1e-6)
    }
}

/// What a screen found (mapped to a protocol reason by the coordinator, or to a re-execution).
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// Same payload as an accepted update.
    ExactDuplicate,
    /// Sketch cosine with a recent update at or above the threshold.
    NearDuplicate(f64),
    /// Normalised norm this many times the median.
    NormHigh(f64),
    /// Normalised norm this fraction of the median.
    NormLow(f64),
    /// The probe: own-batch gain, held-out gain.
    Probe(f64, f64),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::ExactDuplicate => write!(f, "the same update was already accepted"),
            Finding::NearDuplicate(c) => {
                write!(f, "a near copy of a recent update (cosine {c:.4})")
            }
            Finding::NormHigh(r) => {
                write!(f, "norm {r:.2}x the median of recent updates of its size")
            }
            Finding::NormLow(r) => write!(
                f,
                "norm {r:.3}x the median of recent updates of its size: no work done"
            ),
            Finding::Probe(own, held) => write!(
                f,
                "applying it changes the loss of the unit's own batches by {:.2}% and of held-out batches by {:.2}%",
                -100.0 * own,
                -100.0 * held
            ),
        }
    }
}

/// The state the cheap checks keep: recent normalised norms, hashes of accepted payloads and
/// sketches of recent updates.
#[derive(Debug, Default)]
pub struct Screen {
    norms: VecDeque<f64>,
    hashes: BTreeSet<[u8; 32]>,
    sketches: VecDeque<(u64, Vec<f32>)>,
}

impl Screen {
    /// Median of the recent normalised norms (`None` before `min` of them).
    pub fn median_norm(&self, min: usize) -> Option<f64> {
        if self.norms.len() < min.max(1) {
            return None;
        }
        let mut v: Vec<f64> = self.norms.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    /// The cheap checks on an update of `steps` steps at `lr`: `Err` rejects it; `Ok(Some)`
    /// is an anomaly that holds it for re-execution.
    pub fn check(
        &self,
        cfg: &ScreenConfig,
        m: &Measured,
        steps: u32,
        lr: f64,
    ) -> Result<Option<Finding>, Finding> {
        if self.hashes.contains(&m.sha256) {
            return Err(Finding::ExactDuplicate);
        }
        let near = self
            .sketches
            .iter()
            .map(|(_, s)| cosine(s, &m.sketch))
            .fold(None, |a: Option<f64>, c| Some(a.map_or(c, |a| a.max(c))))
            .filter(|c| *c >= cfg.near_duplicate)
            .map(Finding::NearDuplicate);
        if let Some(median) = self.median_norm(cfg.norm_min_history)
            && median > 0.0
        {
            let r = normalized_norm(m.norm, steps, lr) / median;
            if r > cfg.norm_high {
                return Err(Finding::NormHigh(r));
            }
            if r < cfg.norm_low {
                return Err(Finding::NormLow(r));
            }
        }
        Ok(near)
    }

    /// The probe's verdict: `Err` rejects; `Ok(Some)` holds for re-execution.
    pub fn judge_probe(cfg: &ScreenConfig, p: &Probe) -> Result<Option<Finding>, Finding> {
        let (own, held) = (p.own_gain(), p.held_gain());
        if !own.is_finite() || !held.is_finite() || own < cfg.probe_reject_gain {
            return Err(Finding::Probe(own, held));
        }
        Ok((own < cfg.probe_min_gain || held > own + cfg.probe_margin)
            .then_some(Finding::Probe(own, held)))
    }

    /// Remembers an update that passed (its hash, norm and sketch).
    pub fn remember(
        &mut self,
        cfg: &ScreenConfig,
        unit_id: u64,
        m: &Measured,
        steps: u32,
        lr: f64,
    ) {
        self.hashes.insert(m.sha256);
        self.norms.push_back(normalized_norm(m.norm, steps, lr));
        while self.norms.len() > cfg.norm_window.max(1) {
            self.norms.pop_front();
        }
        self.sketches.push_back((unit_id, m.sketch.clone()));
        while self.sketches.len() > cfg.recent {
            self.sketches.pop_front();
        }
    }

    /// Remembers the hash of an accepted update (after a restart).
    pub fn remember_hash(&mut self, sha256: [u8; 32]) {
        self.hashes.insert(sha256);
    }
}

/// Whether a re-executed update `reference` matches the submitted `submitted`: the cosine and
/// the relative norm difference, and the verdict under `cfg`.
pub fn compare(cfg: &ScreenConfig, submitted: &[f32], reference: &[f32]) -> (f64, f64, bool) {
    let c = cosine(submitted, reference);
    let (a, b) = (l2_norm(submitted), l2_norm(reference));
    let rel = (a - b).abs() / b.max(1e-12);
    (
        c,
        rel,
        c >= cfg.reexecute_cosine && rel <= cfg.reexecute_norm,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, phase: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37 + phase).sin()).collect()
    }

    #[test]
    fn sketches_preserve_cosines() {
        let a = wave(50_000, 0.0);
        let b = wave(50_000, 0.3);
        let c = wave(50_000, 2.0);
        for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
            let exact = cosine(x, y);
            let est = cosine(&sketch(x), &sketch(y));
            assert!((exact - est).abs() < 0.05, "{exact} vs {est}");
        }
        let neg: Vec<f32> = a.iter().map(|v| -v).collect();
        assert!((cosine(&sketch(&a), &sketch(&neg)) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn duplicates_and_norm_outliers_are_found() {
        let cfg = ScreenConfig {
            norm_min_history: 3,
            ..ScreenConfig::default()
        };
        let mut s = Screen::default();
        for i in 0..5u64 {
            let d = wave(4096, i as f32);
            let m = Measured::of(&d, [i as u8; 32]);
            assert_eq!(s.check(&cfg, &m, 10, 1e-3), Ok(None));
            s.remember(&cfg, i, &m, 10, 1e-3);
        }
        let d = wave(4096, 0.0);
        assert_eq!(
            s.check(&cfg, &Measured::of(&d, [0; 32]), 10, 1e-3),
            Err(Finding::ExactDuplicate)
        );
        let near: Vec<f32> = d
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.001 * ((i % 7) as f32 - 3.0))
            .collect();
        assert!(matches!(
            s.check(&cfg, &Measured::of(&near, [9; 32]), 10, 1e-3),
            Ok(Some(Finding::NearDuplicate(_)))
        ));
        // Another frequency: orthogonal to the waves above.
        let fresh: Vec<f32> = (0..4096).map(|i| (i as f32 * 1.13).sin()).collect();
        let big: Vec<f32> = fresh.iter().map(|v| v * 10.0).collect();
        assert!(matches!(
            s.check(&cfg, &Measured::of(&big, [10; 32]), 10, 1e-3),
            Err(Finding::NormHigh(r)) if r > 9.0
        ));
        let zero = vec![0.0; 4096];
        assert!(matches!(
            s.check(&cfg, &Measured::of(&zero, [11; 32]), 10, 1e-3),
            Err(Finding::NormLow(_))
        ));
        // The same norm is expected of a unit four times as long only up to 4^0.75.
        let long: Vec<f32> = fresh.iter().map(|v| v * 2.8).collect();
        assert_eq!(
            s.check(&cfg, &Measured::of(&long, [12; 32]), 40, 1e-3),
            Ok(None)
        );
    }

    #[test]
    fn the_probe_rejects_harm_and_holds_what_helps_others_more_than_its_own() {
        let cfg = ScreenConfig::default();
        let honest = Probe {
            own_before: 3.0,
            own_after: 2.5,
            held_before: 3.0,
            held_after: 2.8,
        };
        assert_eq!(Screen::judge_probe(&cfg, &honest), Ok(None));
        let harmful = Probe {
            own_after: 3.4,
            held_after: 3.5,
            ..honest
        };
        assert!(Screen::judge_probe(&cfg, &harmful).is_err());
        // A little worse on its own batches: re-executed, not refused.
        let flat = Probe {
            own_after: 3.05,
            held_after: 3.0,
            ..honest
        };
        assert!(matches!(
            Screen::judge_probe(&cfg, &flat),
            Ok(Some(Finding::Probe(..)))
        ));
        // Better on held-out batches than on its own: suspicious, re-executed.
        let copied = Probe {
            own_after: 2.9,
            held_after: 2.8,
            ..honest
        };
        assert!(matches!(
            Screen::judge_probe(&cfg, &copied),
            Ok(Some(Finding::Probe(..)))
        ));
    }

    #[test]
    fn re_execution_compares_direction_and_size() {
        let cfg = ScreenConfig::default();
        let a = wave(1000, 0.0);
        assert!(compare(&cfg, &a, &a).2);
        let scaled: Vec<f32> = a.iter().map(|v| v * 1.2).collect();
        assert!(!compare(&cfg, &scaled, &a).2);
        let other = wave(1000, 1.0);
        assert!(!compare(&cfg, &other, &a).2);
    }
}
