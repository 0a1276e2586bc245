//! The re-executions still to be done, and who does each: a verifier participant the relay
//! trusts, or the relay itself — when no verifier is there, when the verifiers leave a check
//! waiting too long, and as the tie-break when a verifier's result disagrees with the
//! submission (two executions that disagree say that one of them is wrong; the relay's third
//! says which). A sampled fraction of verifiers' agreeing results is re-executed by the relay
//! too, so that a verifier that vouches without working is caught.
//!
//! This is only the queue and its assignments; what a result means for the submitter and the
//! verifier is [`crate::Coordinator`]'s.

use std::collections::BTreeMap;
use std::sync::Arc;

use tessera_protocol::messages::WorkUnit;

/// Where a check stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Waiting for a verifier (or for the relay, after a while).
    Queued,
    /// A verifier re-executes it; the assignment lapses at `deadline_ms` (heartbeats renew it).
    Assigned {
        /// The verifier.
        verifier: String,
        /// When the assignment lapses.
        deadline_ms: u64,
    },
    /// The relay's to do.
    Relay {
        /// The relay's thread started on it.
        taken: bool,
        /// A verifier's result disagreed with the submission: the relay decides between them.
        disputed_by: Option<String>,
        /// A verifier's result agreed and the submission is verified: the relay checks the
        /// verifier (a spot check).
        vouched_by: Option<String>,
    },
}

/// A re-execution to be done.
#[derive(Debug, Clone)]
pub struct Check {
    /// Whose unit.
    pub participant: String,
    /// The unit as leased.
    pub unit: WorkUnit,
    /// What the participant submitted.
    pub delta: Arc<Vec<f32>>,
    /// Tokens of the unit (a verifier re-trains as many).
    pub tokens: u64,
    /// The update is held out of the model until the check agrees: only the relay and
    /// verifiers the operator named may pass it in (an identity that earned verifier status
    /// by its own units could vouch for a partner's first units).
    pub held: bool,
    /// When it was queued.
    pub queued_ms: u64,
    /// Where it stands.
    pub stage: Stage,
}

/// A check the relay's own thread should re-execute now.
#[derive(Debug, Clone)]
pub struct RelayCheck {
    /// Whose unit.
    pub participant: String,
    /// The unit as leased.
    pub unit: WorkUnit,
    /// What the participant submitted.
    pub delta: Arc<Vec<f32>>,
}

/// The checks, by unit.
#[derive(Debug, Default)]
pub struct Checks {
    by_unit: BTreeMap<u64, Check>,
}

impl Checks {
    /// Queues a check of `participant`'s `unit`.
    pub fn queue(
        &mut self,
        participant: &str,
        unit: WorkUnit,
        delta: Arc<Vec<f32>>,
        tokens: u64,
        held: bool,
        now: u64,
    ) {
        self.by_unit.insert(
            unit.unit_id,
            Check {
                participant: participant.to_string(),
                unit,
                delta,
                tokens,
                held,
                queued_ms: now,
                stage: Stage::Queued,
            },
        );
    }

    /// Checks not yet settled.
    pub fn len(&self) -> usize {
        self.by_unit.len()
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.by_unit.is_empty()
    }

    /// The check of `unit_id`.
    pub fn get(&self, unit_id: u64) -> Option<&Check> {
        self.by_unit.get(&unit_id)
    }

    /// The check of `unit_id`, to change its stage.
    pub fn get_mut(&mut self, unit_id: u64) -> Option<&mut Check> {
        self.by_unit.get_mut(&unit_id)
    }

    /// Settles the check of `unit_id`.
    pub fn remove(&mut self, unit_id: u64) -> Option<Check> {
        self.by_unit.remove(&unit_id)
    }

    /// Gives `verifier` the oldest waiting check of somebody else's unit (or one whose
    /// assignment lapsed), until `deadline_ms`; checks of held updates only to a verifier
    /// the operator named (`named`).
    pub fn assign(
        &mut self,
        verifier: &str,
        named: bool,
        now: u64,
        deadline_ms: u64,
    ) -> Option<WorkUnit> {
        let (_, check) = self.by_unit.iter_mut().find(|(_, c)| {
            c.participant != verifier
                && (named || !c.held)
                && match &c.stage {
                    Stage::Queued => true,
                    Stage::Assigned { deadline_ms, .. } => *deadline_ms <= now,
                    Stage::Relay { .. } => false,
                }
        })?;
        check.stage = Stage::Assigned {
            verifier: verifier.to_string(),
            deadline_ms,
        };
        Some(check.unit.clone())
    }

    /// The unit `verifier` holds an assignment for, if any.
    pub fn assigned_to(&self, verifier: &str) -> Option<u64> {
        self.by_unit.iter().find_map(|(u, c)| match &c.stage {
            Stage::Assigned { verifier: v, .. } if v == verifier => Some(*u),
            _ => None,
        })
    }

    /// The check `verifier` was given for `unit_id`, if it still holds it.
    pub fn held_by(&self, verifier: &str, unit_id: u64) -> Option<&Check> {
        self.by_unit
            .get(&unit_id)
            .filter(|c| matches!(&c.stage, Stage::Assigned { verifier: v, .. } if v == verifier))
    }

    /// A heartbeat of `verifier` renews its assignment.
    pub fn renew(&mut self, verifier: &str, deadline_ms: u64) {
        for c in self.by_unit.values_mut() {
            if let Stage::Assigned {
                verifier: v,
                deadline_ms: d,
            } = &mut c.stage
                && v == verifier
            {
                *d = (*d).max(deadline_ms);
            }
        }
    }

    /// `verifier` left or was banned: its assignments go back to the queue.
    pub fn release(&mut self, verifier: &str) {
        for c in self.by_unit.values_mut() {
            if matches!(&c.stage, Stage::Assigned { verifier: v, .. } if v == verifier) {
                c.stage = Stage::Queued;
            }
        }
    }

    /// Drops the checks of `participant`'s units (it was banned: its held updates never enter
    /// the model). Spot checks of verifiers that vouched for it stay.
    pub fn drop_participant(&mut self, participant: &str) {
        self.by_unit.retain(|_, c| {
            c.participant != participant
                || matches!(
                    c.stage,
                    Stage::Relay {
                        vouched_by: Some(_),
                        ..
                    }
                )
        });
    }

    /// What the relay's thread should re-execute next: a dispute or a spot check first, then
    /// the oldest waiting check when no verifier is there (`wait_ms` is `None`) or it has
    /// waited `wait_ms(its tokens)`.
    pub fn take_for_relay(
        &mut self,
        wait_ms: Option<&dyn Fn(u64) -> u64>,
        now: u64,
    ) -> Option<RelayCheck> {
        let pick = self
            .by_unit
            .iter()
            .find(|(_, c)| matches!(c.stage, Stage::Relay { taken: false, .. }))
            .or_else(|| {
                self.by_unit.iter().find(|(_, c)| {
                    c.stage == Stage::Queued
                        && wait_ms.is_none_or(|w| now.saturating_sub(c.queued_ms) >= w(c.tokens))
                })
            })
            .map(|(u, _)| *u)?;
        let c = self.by_unit.get_mut(&pick).expect("found above");
        c.stage = match std::mem::replace(&mut c.stage, Stage::Queued) {
            Stage::Relay {
                disputed_by,
                vouched_by,
                ..
            } => Stage::Relay {
                taken: true,
                disputed_by,
                vouched_by,
            },
            _ => Stage::Relay {
                taken: true,
                disputed_by: None,
                vouched_by: None,
            },
        };
        Some(RelayCheck {
            participant: c.participant.clone(),
            unit: c.unit.clone(),
            delta: c.delta.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::update::Fragment;

    fn unit(id: u64) -> WorkUnit {
        WorkUnit {
            unit_id: id,
            base_version: 0,
            shard: id,
            inner_steps: 4,
            batch_size: 2,
            lr: 1e-3,
            warmup_steps: 1,
            seed: 1,
            fragment: Fragment::ALL,
            codec: tessera_protocol::update::Codec::F32,
            deadline_ms: 0,
        }
    }

    #[test]
    fn verifiers_get_others_units_and_the_relay_takes_what_waits_too_long() {
        let mut c = Checks::default();
        let d = Arc::new(vec![0.0; 4]);
        c.queue("a", unit(1), d.clone(), 10, false, 0);
        c.queue("b", unit(2), d.clone(), 10, true, 100);
        // A verifier never checks its own unit, and only a named one checks a held update.
        assert_eq!(c.assign("a", false, 200, 1_000).map(|u| u.unit_id), None);
        assert_eq!(c.assign("a", true, 200, 1_000).map(|u| u.unit_id), Some(2));
        assert_eq!(c.assigned_to("a"), Some(2));
        assert!(c.held_by("a", 2).is_some() && c.held_by("b", 2).is_none());
        // With a verifier present the relay leaves young checks to it…
        let wait: &dyn Fn(u64) -> u64 = &|_| 5_000;
        assert!(c.take_for_relay(Some(wait), 300).is_none());
        // …and takes one that waited too long.
        let r = c.take_for_relay(Some(wait), 5_000).expect("unit 1 waited");
        assert_eq!((r.participant.as_str(), r.unit.unit_id), ("a", 1));
        // A lapsed assignment goes to another verifier.
        assert!(c.assign("c", true, 500, 2_000).is_none());
        assert_eq!(
            c.assign("c", true, 1_000, 2_000).map(|u| u.unit_id),
            Some(2)
        );
        c.release("c");
        assert_eq!(c.get(2).map(|c| &c.stage), Some(&Stage::Queued));
        // A dispute goes before anything else.
        c.get_mut(2).unwrap().stage = Stage::Relay {
            taken: false,
            disputed_by: Some("c".into()),
            vouched_by: None,
        };
        assert_eq!(c.take_for_relay(None, 0).map(|r| r.unit.unit_id), Some(2));
        assert!(c.take_for_relay(None, 0).is_none());
        c.drop_participant("b");
        c.drop_participant("a");
        assert!(c.is_empty());
    }
}
