//! Pacing: how many inner steps a participant's unit gets, from its measured speed.
//!
//! Units are sized so that every participant's unit takes about as long as the fastest
//! participant's unit of `inner_steps` steps ("dynamic local updates", Liu et al. 2024): a tab
//! ten times slower than a native host trains a tenth of the steps and lands in the same round,
//! instead of many versions late. Speeds are measured by the relay from lease to submission
//! (so they include the participant's own overheads), smoothed, with the speed a participant
//! reports in its hello as the prior.

/// Weight of a new measurement in the smoothed speed.
const SMOOTHING: f64 = 0.5;

/// Participants within this fraction of the fastest get full units: measurements jitter, and
/// equal machines should not train units of 47, 50 and 44 steps.
const NEAR_FASTEST: f64 = 0.8;

/// A participant's training speed, in tokens per millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Speed {
    measured: Option<f64>,
    reported: Option<f64>,
}

impl Speed {
    /// The speed the participant reported (tokens per second; 0 or less: unknown).
    pub fn report(&mut self, tokens_per_s: f32) {
        self.reported = (tokens_per_s.is_finite() && tokens_per_s > 0.0)
            .then_some(tokens_per_s as f64 / 1000.0);
    }

    /// A unit of `tokens` came back `elapsed_ms` after it was leased.
    pub fn measure(&mut self, tokens: u64, elapsed_ms: u64) {
        let sample = tokens as f64 / elapsed_ms.max(1) as f64;
        self.measured = Some(match self.measured {
            Some(s) => s + SMOOTHING * (sample - s),
            None => sample,
        });
    }

    /// Best estimate in tokens per millisecond, if any.
    pub fn tokens_per_ms(&self) -> Option<f64> {
        self.measured.or(self.reported)
    }
}

/// Inner steps for a participant of speed `mine` when the fastest active participant runs at
/// `fastest` (both tokens per ms): `max_steps` for the fastest and those within 80% of it,
/// proportionally fewer for the others, never fewer than `min_steps`. A participant of unknown speed among known ones gets
/// a probe unit of a quarter of `max_steps`; when no speed is known, everyone gets `max_steps`.
pub fn unit_steps(mine: Option<f64>, fastest: Option<f64>, max_steps: u32, min_steps: u32) -> u32 {
    let min_steps = min_steps.clamp(1, max_steps.max(1));
    let steps = match (mine, fastest) {
        (Some(s), Some(f)) if f > 0.0 && s >= NEAR_FASTEST * f => max_steps,
        (Some(s), Some(f)) if f > 0.0 => (max_steps as f64 * s / f).round() as u32,
        (None, _) => max_steps / 4,
        (Some(_), _) => max_steps,
    };
    steps.clamp(min_steps, max_steps.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_scale_with_speed_within_bounds() {
        assert_eq!(unit_steps(Some(2.0), Some(2.0), 50, 1), 50);
        assert_eq!(unit_steps(Some(0.2), Some(2.0), 50, 1), 5);
        assert_eq!(unit_steps(Some(1.0), Some(2.0), 50, 1), 25);
        assert_eq!(unit_steps(Some(1.7), Some(2.0), 50, 1), 50);
        assert_eq!(unit_steps(Some(0.001), Some(2.0), 50, 1), 1);
        assert_eq!(unit_steps(Some(0.001), Some(2.0), 50, 4), 4);
        assert_eq!(unit_steps(None, Some(2.0), 50, 1), 12);
        assert_eq!(unit_steps(None, None, 50, 1), 12);
        // A speed above the fastest known (a fresh measurement) is capped at the full unit.
        assert_eq!(unit_steps(Some(3.0), Some(2.0), 50, 1), 50);
    }

    #[test]
    fn measurements_override_the_report_and_are_smoothed() {
        let mut s = Speed::default();
        assert_eq!(s.tokens_per_ms(), None);
        s.report(0.0);
        assert_eq!(s.tokens_per_ms(), None);
        s.report(2000.0);
        assert_eq!(s.tokens_per_ms(), Some(2.0));
        s.measure(1000, 1000);
        assert_eq!(s.tokens_per_ms(), Some(1.0));
        s.measure(3000, 1000);
        assert_eq!(s.tokens_per_ms(), Some(2.0));
    }
}
