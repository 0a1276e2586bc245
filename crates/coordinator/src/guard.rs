//! The guard on the model: every evaluated version is compared with the best of the recent
//! good ones; a version clearly worse than that is not trained on any further. The run rolls
//! back to the newest good version, outer momentum is cleared and the outer learning rate is
//! damped for a few rounds, so whatever pushed the model off (a harmful update that passed the
//! checks, an outer step too large for the moment) does not repeat at full strength.
//!
//! "Clearly worse" is `loss > best + max(min_margin, tolerance × best)`. The defaults come from
//! honest runs: the largest rise of a version over the best of the previous ones, over every
//! honest run in BENCHMARKS.md, is below a fifth of the default margin — after the opening.
//! In its first `warmup` evaluations a run moves fast and noisily (an honest run of the test
//! suite went 3.71 → 5.26 at version 3, and on from there), so the best is taken to be the
//! first evaluation then: only a version clearly worse than the untrained model is bad. The
//! opening is kept short (5 evaluations): it is also a window in which a harmful update that
//! passed verification is only caught if it makes the model worse than untrained (10 let the
//! test suite's noise attack, started once the loss was below 3, pass as good).

use std::collections::VecDeque;

use serde::Serialize;

/// The guard's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// Off: every version is trusted (for experiments and the attack suite's control runs).
    pub enabled: bool,
    /// Relative margin over the best recent loss.
    pub tolerance: f64,
    /// Absolute margin floor (losses near zero have tiny relative noise).
    pub min_margin: f64,
    /// How many good evaluations the best is taken over.
    pub window: usize,
    /// Evaluations over which the best is the first one (the opening's noise).
    pub warmup: usize,
    /// Outer learning rate multiplier right after a rollback…
    pub damping: f32,
    /// …growing back linearly to 1 over this many rounds.
    pub recovery_rounds: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            tolerance: 0.25,
            min_margin: 0.25,
            window: 20,
            warmup: 5,
            damping: 0.25,
            recovery_rounds: 20,
        }
    }
}

/// A rollback, as `/api/status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollback {
    /// The version found bad.
    pub bad_version: u64,
    /// Its validation loss.
    pub bad_loss: f32,
    /// The good version whose weights were restored.
    pub restored_version: u64,
    /// Its validation loss.
    pub restored_loss: f32,
    /// The loss above which a version counted as bad at that moment.
    pub threshold: f32,
    /// The version created from the restored weights.
    pub new_version: u64,
    /// When (ms).
    pub at_ms: u64,
}

/// What the guard concluded from an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Judgement {
    /// Within the threshold (or the first evaluation, or the guard is off).
    Good,
    /// Clearly worse than the recent best: restore `restore`.
    Bad {
        /// The newest good version.
        restore: u64,
        /// Its loss.
        restore_loss: f32,
        /// The threshold it broke.
        threshold: f32,
    },
    /// Already known, or about a version that a rollback discarded: nothing to do.
    Ignored,
}

/// The guard's state.
#[derive(Debug, Clone)]
pub struct Guard {
    cfg: GuardConfig,
    /// Recent good evaluations, oldest first.
    good: VecDeque<(u64, f32)>,
    /// Versions at or below this were judged (or discarded).
    judged_up_to: Option<u64>,
    rollbacks: Vec<Rollback>,
    /// Rounds closed since the last rollback.
    rounds_since: Option<u32>,
    /// The first evaluation's loss, and how many evaluations were judged good.
    first: Option<f32>,
    judged_good: usize,
}

impl Guard {
    /// A guard with no history.
    pub fn new(cfg: GuardConfig) -> Self {
        Guard {
            cfg,
            good: VecDeque::new(),
            judged_up_to: None,
            rollbacks: Vec::new(),
            rounds_since: None,
            first: None,
            judged_good: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// The loss above which a version is bad now (`None` before the first evaluation).
    pub fn threshold(&self) -> Option<f32> {
        let best = match self.first {
            Some(first) if self.judged_good < self.cfg.warmup => first,
            _ => self.good.iter().map(|g| g.1).fold(f32::INFINITY, f32::min),
        };
        best.is_finite().then(|| {
            let margin = self.cfg.min_margin.max(self.cfg.tolerance * best as f64);
            (best as f64 + margin) as f32
        })
    }

    /// The newest version judged good: what a rollback restores (keep its files).
    pub fn last_good(&self) -> Option<(u64, f32)> {
        self.good.back().copied()
    }

    /// Every rollback so far.
    pub fn rollbacks(&self) -> &[Rollback] {
        &self.rollbacks
    }

    /// Judges the evaluation of `version`.
    pub fn judge(&mut self, version: u64, loss: f32) -> Judgement {
        if self.judged_up_to.is_some_and(|v| version <= v) {
            return Judgement::Ignored;
        }
        self.judged_up_to = Some(version);
        let threshold = self.threshold();
        let bad = !loss.is_finite() || threshold.is_some_and(|t| loss > t);
        if self.cfg.enabled
            && bad
            && let (Some((restore, restore_loss)), Some(threshold)) = (self.last_good(), threshold)
        {
            return Judgement::Bad {
                restore,
                restore_loss,
                threshold,
            };
        }
        if loss.is_finite() {
            self.first.get_or_insert(loss);
            self.judged_good += 1;
            self.good.push_back((version, loss));
            while self.good.len() > self.cfg.window.max(1) {
                self.good.pop_front();
            }
        }
        Judgement::Good
    }

    /// Records a rollback: versions up to `rollback.new_version` are settled, and the outer
    /// learning rate is damped from now on.
    pub fn rolled_back(&mut self, rollback: Rollback) {
        self.judged_up_to = Some(rollback.new_version);
        // The restored weights are the good version's: the new version is as good.
        self.good
            .push_back((rollback.new_version, rollback.restored_loss));
        while self.good.len() > self.cfg.window.max(1) {
            self.good.pop_front();
        }
        self.rollbacks.push(rollback);
        self.rounds_since = Some(0);
    }

    /// Restores the history of a restarted run: good evaluations and past rollbacks.
    pub fn restore(&mut self, evaluations: &[(u64, f32)], rollbacks: Vec<Rollback>) {
        for &(v, loss) in evaluations {
            // Evaluations of versions a rollback discarded are not part of the good history.
            let discarded = rollbacks
                .iter()
                .any(|r| v > r.restored_version && v < r.new_version);
            if !discarded {
                self.judge(v, loss);
            }
        }
        if let Some(last) = rollbacks.last() {
            self.judged_up_to = self.judged_up_to.max(Some(last.new_version));
        }
        self.rollbacks = rollbacks;
    }

    /// A round closed (the damping recovers).
    pub fn round_closed(&mut self) {
        if let Some(n) = &mut self.rounds_since {
            *n += 1;
        }
    }

    /// The factor on the outer learning rate now: `damping` right after a rollback, back to 1
    /// after `recovery_rounds` rounds.
    pub fn lr_factor(&self) -> f32 {
        match self.rounds_since {
            None => 1.0,
            Some(n) if n >= self.cfg.recovery_rounds => 1.0,
            Some(n) => {
                let t = n as f32 / self.cfg.recovery_rounds.max(1) as f32;
                self.cfg.damping + (1.0 - self.cfg.damping) * t
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollback(g: &mut Guard, bad: u64, restore: u64, new_version: u64) {
        g.rolled_back(Rollback {
            bad_version: bad,
            bad_loss: 9.0,
            restored_version: restore,
            restored_loss: 2.0,
            threshold: 3.0,
            new_version,
            at_ms: 0,
        });
    }

    #[test]
    fn a_clearly_worse_version_is_bad_and_noise_is_not() {
        let mut g = Guard::new(GuardConfig {
            warmup: 0,
            ..GuardConfig::default()
        });
        assert_eq!(g.judge(0, 5.5), Judgement::Good);
        assert_eq!(g.judge(1, 4.0), Judgement::Good);
        // Honest noise: a little above the best.
        assert_eq!(g.judge(2, 4.2), Judgement::Good);
        assert_eq!(g.last_good(), Some((2, 4.2)));
        // best 4.0, margin max(0.25, 0.25 * 4) = 1.0
        assert_eq!(g.threshold(), Some(5.0));
        assert_eq!(
            g.judge(3, 12.0),
            Judgement::Bad {
                restore: 2,
                restore_loss: 4.2,
                threshold: 5.0
            }
        );
        assert_eq!(
            g.judge(4, f32::NAN),
            Judgement::Bad {
                restore: 2,
                restore_loss: 4.2,
                threshold: 5.0
            }
        );
        // Old news is ignored.
        assert_eq!(g.judge(1, 99.0), Judgement::Ignored);
    }

    #[test]
    fn the_opening_is_judged_against_the_untrained_model() {
        let mut g = Guard::new(GuardConfig {
            warmup: 5,
            ..GuardConfig::default()
        });
        // The honest opening the test suite met: a fast fall, then a spike.
        assert_eq!(g.judge(0, 5.5), Judgement::Good);
        assert_eq!(g.judge(1, 4.6), Judgement::Good);
        assert_eq!(g.judge(2, 3.71), Judgement::Good);
        // 5.5 + max(0.25, 0.25 * 5.5)
        assert_eq!(g.threshold(), Some(6.875));
        assert_eq!(g.judge(3, 5.26), Judgement::Good);
        // Worse than the untrained model is bad even in the opening.
        assert_eq!(
            g.judge(4, 12.0),
            Judgement::Bad {
                restore: 3,
                restore_loss: 5.26,
                threshold: 6.875
            }
        );
        // After the opening (five good evaluations), the best recent one counts.
        assert_eq!(g.judge(5, 3.6), Judgement::Good);
        assert_eq!(g.threshold(), Some(4.5));
    }

    #[test]
    fn disabled_guard_trusts_everything() {
        let mut g = Guard::new(GuardConfig {
            enabled: false,
            ..GuardConfig::default()
        });
        g.judge(0, 1.0);
        assert_eq!(g.judge(1, 50.0), Judgement::Good);
    }

    #[test]
    fn damping_recovers_over_rounds_and_discarded_versions_are_ignored() {
        let mut g = Guard::new(GuardConfig::default());
        g.judge(0, 3.0);
        g.judge(5, 2.0);
        assert_eq!(g.lr_factor(), 1.0);
        rollback(&mut g, 8, 5, 10);
        assert_eq!(g.lr_factor(), 0.25);
        // An evaluation of a discarded version arriving late changes nothing.
        assert_eq!(g.judge(9, 20.0), Judgement::Ignored);
        for _ in 0..10 {
            g.round_closed();
        }
        assert!((g.lr_factor() - 0.625).abs() < 1e-6);
        for _ in 0..10 {
            g.round_closed();
        }
        assert_eq!(g.lr_factor(), 1.0);
        assert_eq!(g.last_good(), Some((10, 2.0)));
    }

    #[test]
    fn restore_rebuilds_the_good_history_without_discarded_versions() {
        let mut g = Guard::new(GuardConfig::default());
        let rb = Rollback {
            bad_version: 7,
            bad_loss: 30.0,
            restored_version: 5,
            restored_loss: 2.0,
            threshold: 3.0,
            new_version: 8,
            at_ms: 0,
        };
        g.restore(
            &[(0, 5.0), (5, 2.0), (7, 30.0), (8, 2.0), (9, 1.9)],
            vec![rb],
        );
        assert_eq!(g.last_good(), Some((9, 1.9)));
        assert_eq!(g.rollbacks().len(), 1);
        assert_eq!(g.judge(8, 1.0), Judgement::Ignored);
    }
}
