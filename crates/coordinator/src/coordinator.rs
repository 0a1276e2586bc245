//! Leases, rounds, staleness, pacing, acceptance and the guard's rollbacks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::Serialize;
use tessera_protocol::messages::{ParticipantKind, RejectReason, WorkUnit};
use tessera_protocol::update::{Codec, Fragment};

use crate::aggregate;
use crate::checks::{Check, Checks, RelayCheck, Stage};
use crate::guard::{Guard, GuardConfig, Judgement, Rollback};
use crate::pace::{self, Speed};
use crate::revert::Parts;
use crate::screen::{Finding, Measured, Probe, Screen, ScreenConfig};

/// The run's coordination parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Inner steps H of the fastest participant's unit; slower participants get
    /// proportionally fewer (see [`crate::pace`]).
    pub inner_steps: u32,
    /// The fewest inner steps a unit gets (a one-step unit of a fresh AdamW is a sign step on
    /// every parameter: measured to hurt even at a thirtieth of a round's weight).
    pub min_inner_steps: u32,
    /// Per-unit linear warmup of the inner learning rate, in steps (each unit starts a fresh
    /// AdamW; capped at half the unit).
    pub warmup_steps: u32,
    /// Sequences per inner batch.
    pub batch_size: u32,
    /// Tokens per sequence (the model's context).
    pub context: u32,
    /// Peak inner learning rate.
    pub inner_lr: f64,
    /// Cosine decay of the inner learning rate over the tokens folded into the model:
    /// `(tokens, final lr)`. Units leased after `t` tokens train at the decayed rate
    /// (`None`: constant).
    pub inner_lr_decay: Option<(u64, f64)>,
    /// Linear warmup of the inner learning rate over the first tokens folded: units leased
    /// before `t` tokens train at `lr × (1 + 19 t / W) / 20` (from a twentieth, as the
    /// baselines' step warmup starts small); the cosine decay starts after it (0: none).
    pub inner_lr_warmup_tokens: u64,
    /// The run seed.
    pub seed: u64,
    /// A round closes after this many accepted updates (K); 0: as many as there are active
    /// participants, so each outer step averages one unit of each.
    pub updates_per_round: usize,
    /// Lockstep (synchronous DiLoCo): a participant whose update is in the open round gets no
    /// new unit until the round closes.
    pub lockstep: bool,
    /// Otherwise it waits for the round to close when that is expected within this fraction of
    /// its own unit's duration (and no longer), so that its next unit starts from the new
    /// version instead of landing one version stale.
    pub grace: f64,
    /// A round with updates closes at the latest this long after its first update.
    pub round_timeout_ms: u64,
    /// A lease expires this long after it was given or last renewed by a heartbeat.
    pub lease_ms: u64,
    /// Largest accepted staleness S (current version − base version).
    pub max_staleness: u64,
    /// A stale update counts `1 / (1 + staleness)` of its tokens. Absolute (`true`): the round
    /// average divides by the tokens, so a round of stale updates takes a smaller step (its
    /// direction is partly already applied). Relative (`false`): it divides by the discounted
    /// weights, so staleness only shifts weight between the round's updates.
    pub absolute_staleness_discount: bool,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    pub outer_momentum: f32,
    /// Updates whose L2 norm exceeds this are rejected as out of bounds.
    pub max_update_norm: f64,
    /// The fragments of the model that units train, disjoint (Streaming DiLoCo's groups of
    /// blocks): a unit trains one of them with the rest frozen and uploads its pseudo-gradient
    /// only. Each fragment has its own outer step: a round steps every fragment it holds
    /// updates for, each averaged over its own updates. `[Fragment::ALL]`: whole-model units.
    pub fragments: Vec<Fragment>,
    /// Which fragment a new unit trains.
    pub fragment_schedule: FragmentSchedule,
    /// How participants encode their updates (int8: 3.9x fewer bytes, no measurable loss
    /// penalty; see BENCHMARKS.md).
    pub codec: Codec,
    /// Encode each version's change (the outer step) with this codec and apply the decoded
    /// change, carrying what it leaves out into the next step (error feedback on the relay):
    /// then a participant holding version v rebuilds v + 1 exactly from the encoded change,
    /// a quarter of the weights' bytes with int8. `None`: the exact f32 step.
    pub version_codec: Option<Codec>,
    /// Stop handing out work once this version is reached (`None`: never).
    pub max_version: Option<u64>,
    /// Stop handing out work once this many tokens are folded, pending or leased (`None`:
    /// never).
    pub max_tokens: Option<u64>,
    /// The guard on the model.
    pub guard: GuardConfig,
    /// Verification of submissions.
    pub screen: ScreenConfig,
    /// Participants (ids) trusted to re-execute others' units from their first connection;
    /// others become verifiers once `screen.trusted_after` of their own units were verified.
    pub trusted_verifiers: BTreeSet<String>,
    /// A check waits this long for a verifier before the relay re-executes it itself (when a
    /// verifier is connected; when none is, the relay does it at once).
    pub verifier_wait_ms: u64,
}

impl Config {
    /// Defaults for a model of context `context`: what `tessera-relay` runs with no flags.
    pub fn new(context: u32) -> Self {
        Config {
            inner_steps: 50,
            min_inner_steps: 2,
            warmup_steps: 5,
            batch_size: 12,
            context,
            inner_lr: 1e-3,
            inner_lr_decay: None,
            inner_lr_warmup_tokens: 0,
            seed: 1337,
            updates_per_round: 0,
            lockstep: false,
            grace: 1.0,
            round_timeout_ms: 60_000,
            lease_ms: 15_000,
            max_staleness: 4,
            absolute_staleness_discount: true,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            max_update_norm: 1e4,
            fragments: vec![Fragment::ALL],
            fragment_schedule: FragmentSchedule::Spread,
            codec: Codec::Int8,
            version_codec: None,
            max_version: None,
            max_tokens: None,
            guard: GuardConfig::default(),
            screen: ScreenConfig::default(),
            trusted_verifiers: BTreeSet::new(),
            verifier_wait_ms: 5_000,
        }
    }

    /// Inner learning rate for a unit leased once `tokens` have been folded.
    pub fn inner_lr_at(&self, tokens: u64) -> f64 {
        let w = self.inner_lr_warmup_tokens;
        if tokens < w {
            return self.inner_lr * (1.0 + 19.0 * tokens as f64 / w as f64) / 20.0;
        }
        match self.inner_lr_decay {
            None => self.inner_lr,
            Some((total, min_lr)) => {
                let t = ((tokens - w) as f64 / total.saturating_sub(w).max(1) as f64).min(1.0);
                min_lr + 0.5 * (1.0 + (std::f64::consts::PI * t).cos()) * (self.inner_lr - min_lr)
            }
        }
    }

    /// Tokens of one inner step.
    pub fn step_tokens(&self) -> u64 {
        self.batch_size as u64 * self.context as u64
    }

    /// Tokens of a unit of `steps` inner steps.
    pub fn unit_tokens(&self, steps: u32) -> u64 {
        steps as u64 * self.step_tokens()
    }
}

/// Which fragment a new unit trains, when the model is split into several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentSchedule {
    /// Fragment `version mod F`: every unit based on one version trains the same fragment, so
    /// a version changes one fragment (its download is that fragment's) and each fragment's
    /// step averages all of the round's updates (Streaming DiLoCo's staggered syncs).
    Rotate,
    /// The fragment with the fewest units leased at the current version: participants train
    /// different fragments side by side and each version changes all of them.
    Spread,
}

impl FragmentSchedule {
    /// `rotate` or `spread`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rotate" => Some(Self::Rotate),
            "spread" => Some(Self::Spread),
            _ => None,
        }
    }
}

/// A unit leased to a participant.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The holder.
    pub participant: String,
    /// The unit (its deadline is the lease's).
    pub unit: WorkUnit,
    /// When it was leased (ms).
    pub leased_ms: u64,
}

/// What the relay knows of a participant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParticipantStats {
    /// Participant id.
    pub id: String,
    /// `browser` or `native`.
    pub kind: &'static str,
    /// Backend it trains on.
    pub backend: String,
    /// Device description.
    pub device: String,
    /// Updates accepted from it.
    pub accepted_updates: u64,
    /// Updates rejected from it.
    pub rejected_updates: u64,
    /// Tokens of its accepted updates: its stake.
    pub tokens_trained: u64,
    /// Whether a connection is open.
    pub connected: bool,
    /// Last time it was heard from (ms).
    pub last_seen_ms: u64,
    /// Training speed as the relay measures it, lease to submission (tokens/s; 0: unknown).
    pub tokens_per_s: f64,
    /// Inner steps of its latest unit.
    pub unit_steps: u32,
    /// Tokens of accepted updates whose verification window is still open.
    pub tokens_pending: u64,
    /// Tokens of accepted updates whose window closed: its stake.
    pub tokens_granted: u64,
    /// Tokens forfeited by a failed re-execution.
    pub tokens_forfeited: u64,
    /// Units of it re-executed and found identical.
    pub verified_units: u64,
    /// Re-executions of others' units it did that the relay found right.
    pub verifications: u64,
    /// Banned after a failed re-execution: no more work, no more submissions.
    pub banned: bool,
    /// The reason of its latest rejection.
    pub last_rejection: Option<String>,
}

/// A change to the ledger of credit that the shell persists.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerChange {
    /// A unit's verification window closed: its tokens are granted.
    Granted {
        /// The participant.
        participant: String,
        /// The unit.
        unit_id: u64,
        /// Tokens granted.
        tokens: u64,
    },
    /// A held unit passed its re-execution and was folded into the open round.
    Verified {
        /// The participant.
        participant: String,
        /// The unit.
        unit_id: u64,
    },
    /// A held update could not be verified and was dropped (only that unit's credit is lost).
    Dropped {
        /// The participant.
        participant: String,
        /// The unit.
        unit_id: u64,
        /// Tokens forfeited.
        tokens: u64,
    },
    /// A verifier's re-execution of `participant`'s unit was found right (it agreed with a
    /// submission found honest, or disagreed with one the relay's re-execution refuted).
    Checked {
        /// The verifier.
        verifier: String,
        /// Whose unit.
        participant: String,
        /// The unit.
        unit_id: u64,
        /// Tokens re-trained.
        tokens: u64,
    },
    /// A unit verified on the word of a verifier since banned counts as unverified again
    /// (the relay re-executes it).
    Unverified {
        /// The participant.
        participant: String,
        /// The unit.
        unit_id: u64,
        /// The banned verifier that vouched for it.
        verifier: String,
    },
    /// A re-execution failed: the participant is banned and its pending credit forfeited.
    Banned {
        /// The participant.
        participant: String,
        /// The unit whose re-execution failed.
        unit_id: u64,
        /// Units whose pending credit is forfeited (the failed one among them).
        forfeited: Vec<u64>,
        /// Tokens forfeited.
        tokens: u64,
        /// Its units taken back out of the model (out of the open round, or out of the weights
        /// of closed rounds).
        reverted: Vec<u64>,
        /// Why.
        detail: String,
    },
}

/// A unit's credit on its way to being granted.
#[derive(Debug, Clone, PartialEq)]
struct Credit {
    unit_id: u64,
    tokens: u64,
    /// The version at which it is granted (`None` while held or in the open round).
    grant_at: Option<u64>,
}

/// How closely an accepted update is checked beyond the cheap checks and the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scrutiny {
    /// Folded at once.
    None,
    /// Folded at once and re-executed afterwards: its credit stays pending until then.
    Audit,
    /// Kept out of the model until its re-execution agrees.
    Hold,
}

/// An accepted update held out of the model until its re-execution passes.
#[derive(Debug, Clone)]
pub struct Held {
    /// The participant.
    pub participant: String,
    /// The unit as leased.
    pub unit: WorkUnit,
    /// Its pseudo-gradient.
    pub delta: Vec<f32>,
    /// Tokens credited.
    pub tokens: u64,
}

/// Something the shell should log or persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A lease ran out; its unit will be given to someone else.
    LeaseExpired {
        /// The unit.
        unit_id: u64,
        /// Its former holder.
        participant: String,
    },
    /// A round closed and the model advanced.
    RoundClosed {
        /// The new version.
        version: u64,
        /// Updates folded in.
        updates: usize,
    },
}

/// A rejected submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Reason code sent to the participant.
    pub reason: RejectReason,
    /// Detail for people.
    pub detail: String,
}

fn finding(f: Finding) -> Rejection {
    let reason = match f {
        Finding::ExactDuplicate | Finding::NearDuplicate(_) => RejectReason::Duplicate,
        Finding::NormHigh(_) | Finding::NormLow(_) => RejectReason::Outlier,
        Finding::Probe(..) => RejectReason::FailedProbe,
    };
    reject(reason, f.to_string())
}

fn reject(reason: RejectReason, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

/// A submission that passed every check, with the weight it will enter the average with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Versions behind the current one.
    pub staleness: u64,
    /// Tokens credited (at most the unit's).
    pub tokens: u64,
    /// Weight in the round average: tokens / (1 + staleness) (see
    /// [`Config::absolute_staleness_discount`]).
    pub weight: f32,
}

/// Result of an accepted submission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accepted {
    /// The verdict it was accepted with.
    pub verdict: Verdict,
    /// The new version, if this update closed the round.
    pub closed: Option<u64>,
}

/// The answer to a request for work.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A unit to train.
    Unit(WorkUnit),
    /// Nothing yet: the open round is about to close; ask again after this many ms.
    Wait(u64),
    /// The run has reached its last version or token budget.
    Finished,
    /// The participant is unknown (it never joined).
    Unknown,
    /// The participant is banned.
    Banned,
}

/// A participant as the coordinator tracks it.
#[derive(Debug, Clone)]
struct Member {
    stats: ParticipantStats,
    speed: Speed,
    /// The unit it holds, if any.
    lease: Option<u64>,
    /// Last lease or submission (ms): recently working participants count as active.
    last_work_ms: u64,
    /// Since when it has been waiting for the open round to close.
    waiting_since: Option<u64>,
    /// It said goodbye.
    left: bool,
    /// Credit not yet granted.
    credits: Vec<Credit>,
    /// Its submissions refused since its last accepted one: while any, it does not count
    /// towards a round (a round does not wait for someone whose work is refused).
    refused_streak: u32,
    /// The unit whose update was last refused for its content, and the version it was
    /// refused at: retraining it from the same version would give the same update (units
    /// are deterministic), so it is not handed back to this participant until the model moves.
    refused_unit: Option<(u64, u64)>,
    /// It is re-executing another's unit (a verifier between units: not counted in rounds).
    checking: bool,
    /// When it last asked for a re-execution to do.
    verifier_seen_ms: Option<u64>,
}

/// The open round.
#[derive(Debug, Default)]
struct Round {
    sum: Vec<f32>,
    /// What was folded into each fragment.
    by_fragment: Vec<FragmentSum>,
    started_ms: Option<u64>,
    members: BTreeSet<String>,
    /// The units folded into it, and by whom.
    units: Vec<(String, u64)>,
    /// Units accepted while it was open and held for re-execution: the round counts them and
    /// waits for their verdict.
    held: BTreeSet<u64>,
}

impl Round {
    /// Updates folded into it.
    fn updates(&self) -> usize {
        self.by_fragment.iter().map(|f| f.updates).sum()
    }

    /// Tokens folded into it.
    fn tokens(&self) -> u64 {
        self.by_fragment.iter().map(|f| f.tokens).sum()
    }
}

/// What the open round folded into one fragment.
#[derive(Debug, Default, Clone, Copy)]
struct FragmentSum {
    weight: f64,
    tokens: u64,
    updates: usize,
}

/// The coordinator's state.
pub struct Coordinator {
    cfg: Config,
    version: u64,
    params: Vec<f32>,
    momentum: Vec<f32>,
    next_unit: u64,
    next_shard: u64,
    leases: BTreeMap<u64, Lease>,
    free: VecDeque<(u64, u64)>,
    round: Round,
    members: BTreeMap<String, Member>,
    accepted_total: u64,
    rejected_total: u64,
    tokens_total: u64,
    /// Tokens folded into closed rounds (the inner learning-rate schedule's clock).
    tokens_applied: u64,
    guard: Guard,
    /// Base versions discarded by rollbacks: `(first, last)` inclusive.
    discarded: Vec<(u64, u64)>,
    /// SHA-256 of each recent version's weights as served: what a submission must sign.
    digests: BTreeMap<u64, [u8; 32]>,
    /// The cheap checks' memory.
    screen: Screen,
    /// Updates waiting for their re-execution, by unit.
    held: BTreeMap<u64, Held>,
    /// Re-executions to do (held and audited units), and who does them.
    checks: Checks,
    /// The previous round's average pseudo-gradient: the center of the clipping.
    center: Vec<f32>,
    /// Recent distances of updates from the center, by fragment.
    distances: Vec<VecDeque<f64>>,
    /// Each fragment's `[start, end)` in the parameter vector.
    ranges: Vec<std::ops::Range<usize>>,
    /// Outer steps taken by each fragment.
    fragment_steps: Vec<u64>,
    /// Ledger changes for the shell to persist.
    outbox: Vec<LedgerChange>,
    /// Rejections by reason.
    rejections: BTreeMap<String, u64>,
    /// Updates whose norm the centered clipping reduced.
    clipped_total: u64,
    /// Folded updates whose credit is pending, kept so that a ban can take them out again.
    parts: Parts,
    /// A ban took updates out of the closed rounds' weights: the next settlement makes a new
    /// version even if no round closes.
    revised: bool,
    /// Units verified on a verifier's word alone, with no spot check, whose credit is pending:
    /// by unit, the verifier and the check it settled (to re-check if the verifier is caught).
    vouched: BTreeMap<u64, (String, Check)>,
    /// Vouched units re-checked by the relay because their verifier was banned.
    rechecked: u64,
    /// Vouched units forgotten over the memory budget (`screen.revert_memory`) before their
    /// credit was granted: they could not be re-checked.
    vouched_dropped: u64,
    /// With `version_codec`: what the encoded outer steps left out, carried into the next.
    step_residual: Vec<f32>,
    /// With `version_codec`: the newest version made by an outer step, with its encoded change.
    change: Option<VersionChange>,
}

/// The change from version `version − 1` to `version`, as encoded with the run's
/// `version_codec`: the new weights are the old minus the decoded values, over the parameters
/// from `offset` on (f32 arithmetic, so anyone holding the old weights rebuilds the new ones
/// exactly).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionChange {
    /// The version it makes.
    pub version: u64,
    /// First parameter it covers.
    pub offset: u64,
    /// The encoded step.
    pub payload: tessera_protocol::update::Payload,
}

impl Coordinator {
    /// A coordinator at `version` with the given weights and outer momentum.
    /// `next_unit` and `next_shard` continue the counters of a restarted run.
    pub fn new(
        cfg: Config,
        version: u64,
        params: Vec<f32>,
        momentum: Vec<f32>,
        next_unit: u64,
        next_shard: u64,
    ) -> Self {
        assert_eq!(
            params.len(),
            momentum.len(),
            "weights and momentum differ in length"
        );
        let n = params.len();
        let ranges: Vec<_> = cfg
            .fragments
            .iter()
            .map(|f| f.range(n).expect("every fragment lies in the model"))
            .collect();
        assert!(!ranges.is_empty(), "at least one fragment");
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.start);
        assert!(
            sorted.windows(2).all(|w| w[0].end <= w[1].start)
                && sorted.iter().all(|r| !r.is_empty()),
            "fragments are disjoint and not empty"
        );
        let fragments = ranges.len();
        let guard = Guard::new(cfg.guard);
        Coordinator {
            cfg,
            version,
            params,
            momentum,
            next_unit,
            next_shard,
            leases: BTreeMap::new(),
            free: VecDeque::new(),
            round: Round {
                sum: vec![0.0; n],
                by_fragment: vec![FragmentSum::default(); fragments],
                ..Round::default()
            },
            members: BTreeMap::new(),
            accepted_total: 0,
            rejected_total: 0,
            tokens_total: 0,
            tokens_applied: 0,
            guard,
            discarded: Vec::new(),
            digests: BTreeMap::new(),
            screen: Screen::default(),
            held: BTreeMap::new(),
            checks: Checks::default(),
            center: vec![0.0; n],
            distances: vec![VecDeque::new(); fragments],
            ranges,
            fragment_steps: vec![0; fragments],
            outbox: Vec::new(),
            rejections: BTreeMap::new(),
            clipped_total: 0,
            parts: Parts::default(),
            vouched: BTreeMap::new(),
            rechecked: 0,
            vouched_dropped: 0,
            revised: false,
            step_residual: Vec::new(),
            change: None,
        }
    }

    /// Records the SHA-256 of a version's weights as participants download them (the shell
    /// calls this for every version it writes, and for the kept ones after a restart).
    pub fn set_digest(&mut self, version: u64, sha256: [u8; 32]) {
        self.digests.insert(version, sha256);
        let oldest = self.version.saturating_sub(self.cfg.max_staleness + 1);
        self.digests.retain(|v, _| *v >= oldest);
    }

    /// The SHA-256 of `version`'s weights as served, if it is recent enough to be kept.
    pub fn digest(&self, version: u64) -> Option<[u8; 32]> {
        self.digests.get(&version).copied()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Current model version.
    pub fn version(&self) -> u64 {
        self.version
    }
    /// Current global weights.
    pub fn params(&self) -> &[f32] {
        &self.params
    }
    /// Outer momentum buffer.
    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }

    /// The encoded change that made `version`, if an outer step with `version_codec` made it
    /// (not a rollback or a ban's revision) and it is the newest such step.
    pub fn change(&self, version: u64) -> Option<&VersionChange> {
        self.change.as_ref().filter(|c| c.version == version)
    }
    /// Next unit id and shard to be handed out.
    pub fn counters(&self) -> (u64, u64) {
        (self.next_unit, self.next_shard)
    }
    /// Leases held now.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }
    /// Updates the open round counts: folded into it, or held and waiting for their
    /// re-execution.
    pub fn round_updates(&self) -> usize {
        self.round.updates() + self.round.held.len()
    }
    /// Accepted updates not in the model yet: those in the open round and those held for
    /// their re-execution.
    pub fn pending_updates(&self) -> usize {
        self.round.updates() + self.held.len()
    }
    /// Totals: accepted updates, rejected updates, tokens trained.
    pub fn totals(&self) -> (u64, u64, u64) {
        (self.accepted_total, self.rejected_total, self.tokens_total)
    }
    /// Tokens folded into the model by closed rounds.
    pub fn tokens_applied(&self) -> u64 {
        self.tokens_applied
    }
    /// Every participant seen.
    pub fn participants(&self) -> impl Iterator<Item = &ParticipantStats> {
        self.members.values().map(|m| &m.stats)
    }
    /// The guard (its threshold, last good version and rollbacks).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }
    /// The outer learning rate in force (damped after a rollback).
    pub fn outer_lr(&self) -> f32 {
        self.cfg.outer_lr * self.guard.lr_factor()
    }

    /// Restores a participant's ledger entry (after a restart).
    pub fn restore_participant(&mut self, stats: ParticipantStats) {
        self.accepted_total += stats.accepted_updates;
        self.rejected_total += stats.rejected_updates;
        self.tokens_total += stats.tokens_trained;
        let mut speed = Speed::default();
        speed.report(stats.tokens_per_s as f32);
        self.members.insert(
            stats.id.clone(),
            Member {
                stats: ParticipantStats {
                    connected: false,
                    ..stats
                },
                speed,
                lease: None,
                last_work_ms: 0,
                waiting_since: None,
                left: false,
                credits: Vec::new(),
                refused_streak: 0,
                refused_unit: None,
                checking: false,
                verifier_seen_ms: None,
            },
        );
    }

    /// Restores a unit's pending credit (after a restart): `folded` when its update is in a
    /// recorded version (granted after the window), otherwise it waits in the open round or for
    /// its re-execution.
    pub fn restore_credit(&mut self, id: &str, unit_id: u64, tokens: u64, folded: bool) {
        let grant_at = folded.then_some(self.version + self.cfg.screen.grant_after_rounds);
        if let Some(m) = self.members.get_mut(id) {
            m.credits.push(Credit {
                unit_id,
                tokens,
                grant_at,
            });
        }
    }

    /// Restores an update held for re-execution (after a restart).
    pub fn restore_held(&mut self, unit_id: u64, held: Held, now: u64) {
        self.checks.queue(
            &held.participant,
            held.unit.clone(),
            Arc::new(held.delta.clone()),
            held.tokens,
            true,
            now,
        );
        self.held.insert(unit_id, held);
    }

    /// Restores the hash of an accepted update (after a restart): a replay stays a duplicate.
    pub fn restore_hash(&mut self, sha256: [u8; 32]) {
        self.screen.remember_hash(sha256);
    }

    /// Restores a lease (after a restart).
    pub fn restore_lease(&mut self, lease: Lease) {
        if let Some(m) = self.members.get_mut(&lease.participant) {
            m.lease = Some(lease.unit.unit_id);
            m.last_work_ms = lease.leased_ms;
        }
        self.leases.insert(lease.unit.unit_id, lease);
    }

    /// Restores the tokens already folded into the model (after a restart).
    pub fn restore_tokens_applied(&mut self, tokens: u64) {
        self.tokens_applied = tokens;
    }

    /// Restores the guard's history (after a restart): evaluations in version order and past
    /// rollbacks.
    pub fn restore_guard(&mut self, evaluations: &[(u64, f32)], rollbacks: Vec<Rollback>) {
        self.discarded = rollbacks
            .iter()
            .map(|r| (r.restored_version + 1, r.new_version - 1))
            .collect();
        self.guard.restore(evaluations, rollbacks);
    }

    /// A participant connected and proved its identity; `tokens_per_s` is the speed it
    /// reports (0: unknown).
    pub fn join(
        &mut self,
        id: &str,
        kind: ParticipantKind,
        backend: &str,
        device: &str,
        tokens_per_s: f32,
        now: u64,
    ) {
        let m = self
            .members
            .entry(id.to_string())
            .or_insert_with(|| Member {
                stats: ParticipantStats {
                    id: id.to_string(),
                    kind: kind.as_str(),
                    backend: backend.to_string(),
                    device: device.to_string(),
                    accepted_updates: 0,
                    rejected_updates: 0,
                    tokens_trained: 0,
                    connected: true,
                    last_seen_ms: now,
                    tokens_per_s: 0.0,
                    unit_steps: 0,
                    tokens_pending: 0,
                    tokens_granted: 0,
                    tokens_forfeited: 0,
                    verified_units: 0,
                    verifications: 0,
                    banned: false,
                    last_rejection: None,
                },
                speed: Speed::default(),
                lease: None,
                last_work_ms: now,
                waiting_since: None,
                left: false,
                credits: Vec::new(),
                refused_streak: 0,
                refused_unit: None,
                checking: false,
                verifier_seen_ms: None,
            });
        let changed_device = m.stats.backend != backend || m.stats.device != device;
        m.stats.kind = kind.as_str();
        m.stats.backend = backend.to_string();
        m.stats.device = device.to_string();
        m.stats.connected = true;
        m.stats.last_seen_ms = now;
        m.last_work_ms = now;
        m.left = false;
        if changed_device {
            // Another device under the same key: what was measured no longer holds.
            m.speed = Speed::default();
        }
        m.speed.report(tokens_per_s);
    }

    /// A participant's connection dropped. Its leases stay until they expire: it may come back
    /// and submit.
    pub fn disconnect(&mut self, id: &str, now: u64) {
        if let Some(m) = self.members.get_mut(id) {
            m.stats.connected = false;
            m.stats.last_seen_ms = now;
            m.waiting_since = None;
            m.checking = false;
        }
        self.checks.release(id);
    }

    /// A participant left on purpose: its leases are released at once.
    pub fn leave(&mut self, id: &str, now: u64) -> Vec<u64> {
        self.disconnect(id, now);
        if let Some(m) = self.members.get_mut(id) {
            m.left = true;
        }
        let units: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.participant == id)
            .map(|l| l.unit.unit_id)
            .collect();
        for u in &units {
            self.release(*u);
        }
        units
    }

    fn release(&mut self, unit_id: u64) {
        if let Some(l) = self.leases.remove(&unit_id) {
            if let Some(m) = self.members.get_mut(&l.participant) {
                m.lease = None;
            }
            self.free.push_back((l.unit.unit_id, l.unit.shard));
        }
    }

    fn is_active(&self, m: &Member, now: u64) -> bool {
        !m.stats.banned
            && m.refused_streak == 0
            && !(m.checking && m.lease.is_none())
            && (m.lease.is_some()
                || (m.stats.connected
                    && !m.left
                    && now.saturating_sub(m.last_work_ms) <= self.cfg.lease_ms))
    }

    /// Participants that count towards a round: those not banned and whose last submission
    /// was not refused, holding a lease, or connected and leased or submitted within the last
    /// lease period.
    pub fn active_participants(&self, now: u64) -> usize {
        self.members
            .values()
            .filter(|m| self.is_active(m, now))
            .count()
    }

    /// Updates the open round needs before it closes.
    pub fn round_target(&self, now: u64) -> usize {
        if self.cfg.updates_per_round > 0 {
            self.cfg.updates_per_round
        } else {
            self.active_participants(now).max(1)
        }
    }

    /// Whether the run made its last version: later updates wait in the open round.
    fn at_max_version(&self) -> bool {
        self.cfg.max_version.is_some_and(|m| self.version >= m)
    }

    /// Whether no more work will be handed out.
    fn finished(&self) -> bool {
        let leased: u64 = self
            .leases
            .values()
            .map(|l| self.cfg.unit_tokens(l.unit.inner_steps))
            .sum();
        self.at_max_version()
            || self
                .cfg
                .max_tokens
                .is_some_and(|m| self.tokens_applied + self.round.tokens() + leased >= m)
    }

    /// Inner steps the unit of `id` gets now.
    fn unit_steps(&self, id: &str, now: u64) -> u32 {
        let mine = self.members.get(id).and_then(|m| m.speed.tokens_per_ms());
        let fastest = self
            .members
            .values()
            .filter(|m| m.stats.id == id || self.is_active(m, now))
            .filter_map(|m| m.speed.tokens_per_ms())
            .fold(None, |acc: Option<f64>, s| {
                Some(acc.map_or(s, |a| a.max(s)))
            });
        pace::unit_steps(
            mine,
            fastest,
            self.cfg.inner_steps,
            self.cfg.min_inner_steps,
        )
    }

    /// Whether `id`, whose update is in the open round, should wait for the round to close
    /// rather than start a unit from the version about to be replaced. Lockstep: always.
    /// Otherwise only while the round is expected to close within `grace` of `id`'s own unit
    /// duration (from the outstanding leases' start times and their holders' speeds), and for
    /// no longer than that in all.
    fn should_wait(&mut self, id: &str, now: u64) -> bool {
        let counted = self.round.updates() + self.round.held.len();
        // A round that has all its updates and only waits for their re-execution closes as
        // soon as the verifier is done (or at its deadline): a unit started now would only
        // add a stale update to it.
        if self.cfg.lockstep || (counted >= self.round_target(now) && !self.round.held.is_empty()) {
            return true;
        }
        let steps = self.unit_steps(id, now);
        let Some(speed) = self.members.get(id).and_then(|m| m.speed.tokens_per_ms()) else {
            return false;
        };
        let budget = self.cfg.grace * self.cfg.unit_tokens(steps) as f64 / speed;
        let needed = self.round_target(now).saturating_sub(counted).max(1);
        // When each outstanding unit should come back.
        let mut eta: Vec<f64> = self
            .leases
            .values()
            .filter(|l| l.participant != id)
            .map(|l| {
                let tokens = self.cfg.unit_tokens(l.unit.inner_steps) as f64;
                // A holder of unknown speed (its first unit) is assumed as fast as `id`.
                let s = self
                    .members
                    .get(&l.participant)
                    .and_then(|m| m.speed.tokens_per_ms())
                    .unwrap_or(speed);
                l.leased_ms as f64 + tokens / s
            })
            .collect();
        eta.sort_by(f64::total_cmp);
        let closes_in = eta
            .get(needed - 1)
            .map_or(f64::INFINITY, |t| (t - now as f64).max(0.0));
        let m = self.members.get_mut(id).expect("a member");
        let since = *m.waiting_since.get_or_insert(now);
        closes_in <= budget && ((now - since) as f64) < budget
    }

    /// Hands `id` work: the unit it already holds, else an expired one, else a new one; or a
    /// short wait when its update is in a round about to close.
    pub fn request_work(&mut self, id: &str, now: u64) -> Work {
        if !self.members.contains_key(id) {
            return Work::Unknown;
        }
        if let Some(m) = self.members.get_mut(id) {
            m.stats.last_seen_ms = now;
            m.checking = false;
        }
        // A participant works on one thing at a time: asking for a unit gives up a check.
        self.checks.release(id);
        if self.members[id].stats.banned {
            return Work::Banned;
        }
        if let Some(l) = self.leases.values().find(|l| l.participant == id) {
            return Work::Unit(l.unit.clone());
        }
        if self.finished() {
            return Work::Finished;
        }
        if self.round.members.contains(id) && self.should_wait(id, now) {
            return Work::Wait(100);
        }
        let steps = self.unit_steps(id, now);
        // The first free unit, unless it is one this participant's update was just refused
        // for at this version (it would train the same update again); else a new one.
        let refused = self.members[id]
            .refused_unit
            .filter(|&(_, version)| version == self.version)
            .map(|(unit, _)| unit);
        let free = self.free.iter().position(|&(u, _)| Some(u) != refused);
        let (unit_id, shard) = free.and_then(|i| self.free.remove(i)).unwrap_or_else(|| {
            let ids = (self.next_unit, self.next_shard);
            self.next_unit += 1;
            self.next_shard += 1;
            ids
        });
        let unit = WorkUnit {
            unit_id,
            base_version: self.version,
            shard,
            inner_steps: steps,
            batch_size: self.cfg.batch_size,
            lr: self.cfg.inner_lr_at(self.tokens_applied),
            warmup_steps: self.cfg.warmup_steps.min(steps / 2),
            seed: self.cfg.seed,
            fragment: self.cfg.fragments[self.next_fragment()],
            codec: self.cfg.codec,
            deadline_ms: now + self.cfg.lease_ms,
        };
        let m = self.members.get_mut(id).expect("checked above");
        m.lease = Some(unit_id);
        m.last_work_ms = now;
        m.waiting_since = None;
        m.stats.unit_steps = steps;
        self.leases.insert(
            unit_id,
            Lease {
                participant: id.to_string(),
                unit: unit.clone(),
                leased_ms: now,
            },
        );
        Work::Unit(unit)
    }

    /// A heartbeat: the participant is alive; its leases are renewed.
    pub fn heartbeat(&mut self, id: &str, now: u64) {
        if let Some(m) = self.members.get_mut(id) {
            m.stats.last_seen_ms = now;
        }
        let deadline = now + self.cfg.lease_ms;
        for l in self.leases.values_mut().filter(|l| l.participant == id) {
            l.unit.deadline_ms = l.unit.deadline_ms.max(deadline);
        }
        self.checks.renew(id, deadline);
    }

    /// Checks a submission without changing anything. `delta` is the decoded pseudo-gradient;
    /// `base_sha256` the digest of its base weights that the participant signed.
    pub fn check(
        &self,
        id: &str,
        unit_id: u64,
        base_version: u64,
        base_sha256: &[u8; 32],
        delta: &[f32],
        tokens: u64,
    ) -> Result<Verdict, Rejection> {
        if self.members.get(id).is_some_and(|m| m.stats.banned) {
            return Err(reject(
                RejectReason::Banned,
                "this key is banned: a re-execution of one of its units disagreed with what it submitted",
            ));
        }
        let lease = self.lease_of(id, unit_id)?;
        if base_version != lease.unit.base_version {
            return Err(reject(
                RejectReason::Malformed,
                format!(
                    "unit {unit_id} was leased at version {}, not {base_version}",
                    lease.unit.base_version
                ),
            ));
        }
        if let Some((a, b)) = self
            .discarded
            .iter()
            .find(|(a, b)| (*a..=*b).contains(&base_version))
        {
            return Err(reject(
                RejectReason::RolledBack,
                format!(
                    "version {base_version} was rolled back (versions {a}..={b} were discarded by the guard)"
                ),
            ));
        }
        let staleness = self.version.saturating_sub(base_version);
        if staleness > self.cfg.max_staleness {
            return Err(reject(
                RejectReason::TooStale,
                format!(
                    "based on version {base_version}, {staleness} behind {} (limit {})",
                    self.version, self.cfg.max_staleness
                ),
            ));
        }
        match self.digests.get(&base_version) {
            Some(d) if d == base_sha256 => {}
            Some(_) => {
                return Err(reject(
                    RejectReason::BaseMismatch,
                    format!("the signed base digest is not that of version {base_version}"),
                ));
            }
            None => {
                return Err(reject(
                    RejectReason::BaseMismatch,
                    format!("version {base_version} is not known here any more"),
                ));
            }
        }
        let range = self
            .fragment_index(&lease.unit.fragment)
            .map(|f| self.ranges[f].clone())
            .ok_or_else(|| {
                reject(
                    RejectReason::Malformed,
                    "the unit's fragment is not one of this run's",
                )
            })?;
        if delta.len() != range.len() {
            return Err(reject(
                RejectReason::Malformed,
                format!("{} values, the fragment has {}", delta.len(), range.len()),
            ));
        }
        if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
            return Err(reject(
                RejectReason::Malformed,
                format!("value {i} is not finite"),
            ));
        }
        let norm = aggregate::l2_norm(delta);
        if norm > self.cfg.max_update_norm {
            return Err(reject(
                RejectReason::OutOfBounds,
                format!("norm {norm:.3} exceeds {}", self.cfg.max_update_norm),
            ));
        }
        let tokens = tokens.min(self.cfg.unit_tokens(lease.unit.inner_steps));
        Ok(Verdict {
            staleness,
            tokens,
            weight: tokens as f32 / (1 + staleness) as f32,
        })
    }

    /// Records a rejection against `id` (and drops a lease that can no longer succeed: too
    /// stale, or based on a rolled-back version; its unit goes back to the queue).
    pub fn record_rejection(&mut self, id: &str, unit_id: u64, reason: RejectReason, now: u64) {
        self.record_rejection_detail(id, unit_id, reason, "", now);
    }

    /// [`Coordinator::record_rejection`], keeping `detail` as the participant's latest reason.
    pub fn record_rejection_detail(
        &mut self,
        id: &str,
        unit_id: u64,
        reason: RejectReason,
        detail: &str,
        now: u64,
    ) {
        self.rejected_total += 1;
        *self.rejections.entry(format!("{reason:?}")).or_default() += 1;
        if let Some(m) = self.members.get_mut(id) {
            m.stats.rejected_updates += 1;
            m.refused_streak += 1;
            m.stats.last_rejection = Some(if detail.is_empty() {
                format!("{reason:?}")
            } else {
                format!("{reason:?}: {detail}")
            });
        }
        // A unit trained but refused for being late still says how fast its participant is:
        // without this a participant too slow for its first (probe) unit would get the same
        // unit size, and the same refusal, forever.
        if matches!(reason, RejectReason::TooStale | RejectReason::RolledBack)
            && let Some(l) = self.leases.get(&unit_id).filter(|l| l.participant == id)
            && let Some(m) = self.members.get_mut(id)
        {
            let tokens = self.cfg.unit_tokens(l.unit.inner_steps);
            m.speed.measure(tokens, now.saturating_sub(l.leased_ms));
            m.stats.tokens_per_s = m.speed.tokens_per_ms().unwrap_or(0.0) * 1000.0;
        }
        // Refused for what it holds: the same unit from the same version would be refused
        // again (the relay handed it straight back, and a host retrained it hundreds of times
        // in a stalled run).
        if matches!(
            reason,
            RejectReason::OutOfBounds
                | RejectReason::Duplicate
                | RejectReason::Outlier
                | RejectReason::FailedProbe
        ) && self
            .leases
            .get(&unit_id)
            .is_some_and(|l| l.participant == id)
            && let Some(m) = self.members.get_mut(id)
        {
            m.refused_unit = Some((unit_id, self.version));
        }
        // A lease that can no longer succeed goes back to the queue; so does the unit of an
        // update that failed verification (someone honest will train it).
        let release = !matches!(
            reason,
            RejectReason::UnknownLease | RejectReason::BadSignature | RejectReason::Malformed
        );
        if release
            && self
                .leases
                .get(&unit_id)
                .is_some_and(|l| l.participant == id)
        {
            self.release(unit_id);
        }
    }

    /// Rejections so far, by reason.
    pub fn rejections(&self) -> &BTreeMap<String, u64> {
        &self.rejections
    }

    /// Updates whose distance from the center the clipping reduced.
    pub fn clipped_total(&self) -> u64 {
        self.clipped_total
    }

    /// Updates waiting for their re-execution.
    pub fn held(&self) -> impl Iterator<Item = (&u64, &Held)> {
        self.held.iter()
    }

    /// The cheap checks on a submission that passed [`Coordinator::check`]: an exact duplicate
    /// or a norm far from the recent accepted updates of its size is rejected; a near copy of a
    /// recent update is an anomaly (`Ok(Some(why))`) for which it is held until re-executed.
    pub fn screen(
        &self,
        id: &str,
        unit_id: u64,
        m: &Measured,
    ) -> Result<Option<String>, Rejection> {
        if !self.cfg.screen.enabled {
            return Ok(None);
        }
        let lease = self.lease_of(id, unit_id)?;
        self.screen
            .check(&self.cfg.screen, m, lease.unit.inner_steps, lease.unit.lr)
            .map(|a| a.map(|f| f.to_string()))
            .map_err(finding)
    }

    /// The loss probe's verdict on a submission: rejected when applying it does not lower the
    /// loss of the unit's own batches; an anomaly (held until re-executed) when it lowers the
    /// held-out batches' loss more.
    pub fn judge_probe(&self, probe: &Probe) -> Result<Option<String>, Rejection> {
        if !self.cfg.screen.enabled {
            return Ok(None);
        }
        Screen::judge_probe(&self.cfg.screen, probe)
            .map(|a| a.map(|f| f.to_string()))
            .map_err(finding)
    }

    /// How closely `id`'s accepted update is checked: held out of the model until a
    /// re-execution of its unit agrees for an identity's first units and for anomalies;
    /// folded at once and audited (re-executed afterwards, its credit pending meanwhile) with
    /// probability `reexecute_young_rate` until `trusted_after` of its units were found
    /// honest, `reexecute_rate` after (`sample` is uniform in `[0, 1)`, drawn by the shell).
    pub fn scrutiny(&self, id: &str, sample: f64, anomaly: bool) -> Scrutiny {
        let Some(m) = self.members.get(id).filter(|_| self.cfg.screen.enabled) else {
            return Scrutiny::None;
        };
        if anomaly || m.stats.verified_units < self.cfg.screen.reexecute_first as u64 {
            Scrutiny::Hold
        } else if sample
            < if m.stats.verified_units < self.cfg.screen.trusted_after {
                self.cfg.screen.reexecute_young_rate
            } else {
                self.cfg.screen.reexecute_rate
            }
        {
            Scrutiny::Audit
        } else {
            Scrutiny::None
        }
    }

    /// The re-execution of `participant`'s unit `unit_id` agreed (`ok`) or not. A held update
    /// that agreed is folded into the open round; an audited one only counts as verified.
    /// One that disagreed bans the participant and forfeits its pending credit. Returns the
    /// version this closed, if any.
    pub fn reexecuted(
        &mut self,
        participant: &str,
        unit_id: u64,
        ok: bool,
        detail: &str,
        now: u64,
    ) -> Option<u64> {
        self.settle_check(participant, unit_id, ok, detail, true, now)
    }

    /// [`Coordinator::reexecuted`], by the relay (`by_relay`) or on a verifier's word: a unit
    /// verified on a verifier's word alone stays revertible (the relay's spot check of the
    /// verifier may still refute it and ban its participant).
    fn settle_check(
        &mut self,
        participant: &str,
        unit_id: u64,
        ok: bool,
        detail: &str,
        by_relay: bool,
        now: u64,
    ) -> Option<u64> {
        let held = self.held.remove(&unit_id);
        self.round.held.remove(&unit_id);
        if self
            .checks
            .get(unit_id)
            .is_some_and(|c| c.participant == participant)
        {
            self.checks.remove(unit_id);
        }
        if ok {
            if let Some(m) = self.members.get_mut(participant) {
                m.stats.verified_units += 1;
            }
            if by_relay {
                self.parts.forget(&BTreeSet::from([unit_id]));
                self.vouched.remove(&unit_id);
            }
            if let Some(held) = held {
                let staleness = self.version.saturating_sub(held.unit.base_version);
                let verdict = Verdict {
                    staleness,
                    tokens: held.tokens,
                    weight: held.tokens as f32 / (1 + staleness) as f32,
                };
                let fragment = self.fragment_of(&held.unit.fragment);
                self.fold(
                    participant,
                    unit_id,
                    fragment,
                    &held.delta,
                    verdict,
                    by_relay,
                    now,
                );
            }
            self.outbox.push(LedgerChange::Verified {
                participant: participant.to_string(),
                unit_id,
            });
        } else {
            self.ban(participant, unit_id, detail, now);
        }
        self.advance(now)
    }

    /// After a verdict: closes the open round if it is full, or else makes a new version if a
    /// ban took updates out of the weights. Returns the new version, if any.
    fn advance(&mut self, now: u64) -> Option<u64> {
        if self.round_full(now) {
            Some(self.close_round())
        } else if std::mem::take(&mut self.revised) {
            self.version += 1;
            Some(self.version)
        } else {
            None
        }
    }

    /// Takes `id`'s updates whose credit is pending out of the model: out of the open round,
    /// and out of the weights and momentum of closed rounds (which makes a new version at the
    /// next settlement). Returns their units.
    fn revert(&mut self, id: &str) -> Vec<u64> {
        let (open, closed) = self.parts.take(id);
        self.parts.reverted += (open.len() + closed.len()) as u64;
        let mut units = Vec::new();
        for p in open {
            let r = &mut self.round;
            let range = self.ranges[p.fragment].clone();
            aggregate::fold(&mut r.sum[range], &p.values, -p.weight);
            let f = &mut r.by_fragment[p.fragment];
            f.weight -= p.weight as f64;
            f.tokens -= p.tokens;
            f.updates -= 1;
            r.units.retain(|(_, u)| *u != p.unit_id);
            units.push(p.unit_id);
        }
        let r = &mut self.round;
        if r.updates() == 0 {
            r.sum.iter_mut().for_each(|s| *s = 0.0);
            r.by_fragment.fill(FragmentSum::default());
            if r.held.is_empty() {
                r.started_ms = None;
            }
        }
        if !r.units.iter().any(|(p, _)| p == id) {
            r.members.remove(id);
        }
        for p in closed {
            let range = self.ranges[p.fragment].clone();
            p.undo(&mut self.params[range.clone()], &mut self.momentum[range]);
            self.tokens_applied = self.tokens_applied.saturating_sub(p.tokens);
            self.revised = true;
            units.push(p.unit_id);
        }
        units
    }

    /// Banned participants' updates taken back out of the model.
    pub fn reverted_total(&self) -> u64 {
        self.parts.reverted
    }

    /// Folded updates kept so that a ban can take them out (of closed rounds), their bytes,
    /// and how many the memory budget dropped.
    pub fn revertible(&self) -> (usize, usize, u64) {
        let (n, bytes) = self.parts.kept();
        (n, bytes, self.parts.dropped)
    }

    /// Bans `id` after a failed re-execution of `unit_id`: its pending credit is forfeited,
    /// its held updates never enter the model, its leases go back.
    fn ban(&mut self, id: &str, unit_id: u64, detail: &str, now: u64) {
        let Some(m) = self.members.get_mut(id) else {
            return;
        };
        if m.stats.banned {
            return;
        }
        m.stats.banned = true;
        m.checking = false;
        m.stats.last_rejection = Some(format!("FailedReexecution: {detail}"));
        let forfeited: Vec<u64> = m.credits.iter().map(|c| c.unit_id).collect();
        let tokens: u64 = m.credits.iter().map(|c| c.tokens).sum();
        m.credits.clear();
        m.stats.tokens_pending = 0;
        m.stats.tokens_forfeited += tokens;
        *self
            .rejections
            .entry(format!("{:?}", RejectReason::FailedReexecution))
            .or_default() += 1;
        self.checks.drop_participant(id);
        self.checks.release(id);
        let round = &mut self.round;
        self.held.retain(|u, h| {
            let keep = h.participant != id;
            if !keep {
                round.held.remove(u);
            }
            keep
        });
        let reverted = self.revert(id);
        let units: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.participant == id)
            .map(|l| l.unit.unit_id)
            .collect();
        for u in units {
            self.release(u);
        }
        self.outbox.push(LedgerChange::Banned {
            participant: id.to_string(),
            unit_id,
            forfeited,
            tokens,
            reverted,
            detail: detail.to_string(),
        });
        self.recheck_vouched_by(id, now);
    }

    /// `verifier` was banned: its word verifies nothing. Each unit it alone vouched for whose
    /// credit is pending counts as unverified again and goes to the relay's own re-execution
    /// (which bans its participant and takes the update back out if it is refuted).
    fn recheck_vouched_by(&mut self, verifier: &str, now: u64) {
        let units: Vec<u64> = self
            .vouched
            .iter()
            .filter(|(_, (v, c))| v == verifier || c.participant == verifier)
            .map(|(u, _)| *u)
            .collect();
        for unit_id in units {
            let (v, check) = self.vouched.remove(&unit_id).expect("listed above");
            if v != verifier
                || self.checks.get(unit_id).is_some()
                || self
                    .members
                    .get(&check.participant)
                    .is_none_or(|m| m.stats.banned)
            {
                continue;
            }
            let m = self.members.get_mut(&check.participant).expect("checked");
            m.stats.verified_units = m.stats.verified_units.saturating_sub(1);
            self.outbox.push(LedgerChange::Unverified {
                participant: check.participant.clone(),
                unit_id,
                verifier: v,
            });
            self.rechecked += 1;
            self.queue_for_relay(check, None, now);
        }
    }

    /// Queues an already settled unit's check straight for the relay's own re-execution: a
    /// spot check of the verifier that vouched for it (`vouched_by`), or a re-check.
    fn queue_for_relay(&mut self, check: Check, vouched_by: Option<String>, now: u64) {
        let unit_id = check.unit.unit_id;
        self.checks.queue(
            &check.participant,
            check.unit,
            check.delta,
            check.tokens,
            false,
            now,
        );
        self.checks.get_mut(unit_id).expect("queued").stage = Stage::Relay {
            taken: false,
            disputed_by: None,
            vouched_by,
        };
    }

    /// Vouched units re-checked because their verifier was banned, and vouched units that
    /// could not be (forgotten over the memory budget before their credit was granted).
    pub fn rechecks(&self) -> (u64, u64) {
        (self.rechecked, self.vouched_dropped)
    }

    /// Keeps `check`, settled on `verifier`'s word alone, until its credit is granted.
    fn keep_vouched(&mut self, verifier: &str, check: Check) {
        let budget = self.cfg.screen.revert_memory;
        if !self.cfg.screen.enabled || budget == 0 {
            return;
        }
        self.vouched
            .insert(check.unit.unit_id, (verifier.to_string(), check));
        let bytes = |c: &Check| c.delta.len() * std::mem::size_of::<f32>();
        let mut total: usize = self.vouched.values().map(|(_, c)| bytes(c)).sum();
        while total > budget
            && let Some((_, (_, c))) = self.vouched.pop_first()
        {
            total -= bytes(&c);
            self.vouched_dropped += 1;
        }
    }

    /// Whether the open round can close now: it holds as many updates as it needs, none of
    /// them still waiting for its re-execution, and the run has not made its last version.
    fn round_full(&self, now: u64) -> bool {
        self.round.updates() > 0
            && self.round.held.is_empty()
            && self.round.updates() >= self.round_target(now)
            && !self.at_max_version()
    }

    /// A held update that cannot be verified (its base is gone, or re-training it failed):
    /// dropped, its unit's credit forfeited, nothing else (a soft failure); an audit's check is
    /// dropped with it. Returns the version this closed, if any.
    pub fn drop_held(&mut self, unit_id: u64, now: u64) -> Option<u64> {
        self.checks.remove(unit_id);
        let h = self.held.remove(&unit_id)?;
        self.round.held.remove(&unit_id);
        if let Some(m) = self.members.get_mut(&h.participant)
            && let Some(i) = m.credits.iter().position(|c| c.unit_id == unit_id)
        {
            let c = m.credits.remove(i);
            m.stats.tokens_pending -= c.tokens;
            m.stats.tokens_forfeited += c.tokens;
            self.outbox.push(LedgerChange::Dropped {
                participant: h.participant,
                unit_id,
                tokens: c.tokens,
            });
        }
        self.advance(now)
    }

    /// Queues the re-execution of `id`'s accepted update of `unit` (held or audited, as
    /// [`Coordinator::scrutiny`] said): a verifier or the relay will do it.
    pub fn queue_check(
        &mut self,
        id: &str,
        unit: WorkUnit,
        delta: Arc<Vec<f32>>,
        tokens: u64,
        now: u64,
    ) {
        let held = self.held.contains_key(&unit.unit_id);
        self.checks.queue(id, unit, delta, tokens, held, now);
    }

    /// `verifier` gives back the check it holds without a result (its re-execution started
    /// from other weights than the unit's base): the check is queued again.
    pub fn return_check(&mut self, verifier: &str) {
        if let Some(m) = self.members.get_mut(verifier) {
            m.checking = false;
        }
        self.checks.release(verifier);
    }

    /// Re-executions not yet settled.
    pub fn checks_pending(&self) -> usize {
        self.checks.len()
    }

    /// Whether `id` may re-execute other participants' units: a key the operator named
    /// (`trusted_verifiers`), or an identity with `trusted_after` of its own units found
    /// honest (which only gets audits, never the checks that let a held update in); never a
    /// banned one.
    pub fn may_verify(&self, id: &str) -> bool {
        self.members.get(id).is_some_and(|m| {
            !m.stats.banned
                && (self.cfg.trusted_verifiers.contains(id)
                    || m.stats.verified_units >= self.cfg.screen.trusted_after)
        })
    }

    /// A verifier asks for a re-execution: the one it already holds, else the oldest waiting
    /// check of somebody else's unit; `None` when it may not verify or nothing waits (it then
    /// trains). The unit's deadline is the assignment's (heartbeats renew it).
    pub fn verification_for(&mut self, id: &str, now: u64) -> Option<WorkUnit> {
        if !self.may_verify(id) || self.leases.values().any(|l| l.participant == id) {
            return None;
        }
        let deadline = now + self.cfg.lease_ms;
        let unit = match self.checks.assigned_to(id) {
            Some(u) => self.checks.get(u).map(|c| c.unit.clone()),
            None => {
                let named = self.cfg.trusted_verifiers.contains(id);
                self.checks.assign(id, named, now, deadline)
            }
        };
        let m = self.members.get_mut(id).expect("may_verify: a member");
        m.verifier_seen_ms = Some(now);
        m.stats.last_seen_ms = now;
        m.checking = unit.is_some();
        unit.map(|u| WorkUnit {
            deadline_ms: deadline,
            ..u
        })
    }

    /// The verifiers connected that asked for a re-execution within the last lease period:
    /// `None` when there is none, else the speed of the fastest (tokens/ms; 0 when unknown).
    fn verifiers_present(&self, now: u64) -> Option<f64> {
        self.members
            .values()
            .filter(|m| {
                m.stats.connected
                    && !m.stats.banned
                    && m.verifier_seen_ms
                        .is_some_and(|t| now.saturating_sub(t) <= self.cfg.lease_ms)
            })
            .map(|m| m.speed.tokens_per_ms().unwrap_or(0.0))
            .reduce(f64::max)
    }

    /// What the relay's own re-execution thread should do next (see [`crate::checks`]). With
    /// a verifier present, a check waits for it `verifier_wait_ms`, or twice the time the
    /// fastest verifier takes to train such a unit when that is longer (it may be in the middle
    /// of a unit of its own), at most a lease period.
    pub fn relay_check(&mut self, now: u64) -> Option<RelayCheck> {
        let present = self.verifiers_present(now);
        let (min_wait, max_wait) = (self.cfg.verifier_wait_ms, self.cfg.lease_ms);
        let wait = move |tokens: u64| -> u64 {
            match present {
                Some(speed) if speed > 0.0 => {
                    ((2.0 * tokens as f64 / speed) as u64).clamp(min_wait, max_wait.max(min_wait))
                }
                _ => min_wait,
            }
        };
        let wait: Option<&dyn Fn(u64) -> u64> = present.map(|_| &wait as &dyn Fn(u64) -> u64);
        self.checks.take_for_relay(wait, now)
    }

    /// The unit and the submitted update that `verifier`'s re-execution of `unit_id` is to be
    /// compared with, or why its result is refused.
    pub fn check_of(
        &self,
        verifier: &str,
        unit_id: u64,
    ) -> Result<(WorkUnit, Arc<Vec<f32>>), Rejection> {
        self.checks
            .held_by(verifier, unit_id)
            .map(|c| (c.unit.clone(), c.delta.clone()))
            .ok_or_else(|| {
                reject(
                    RejectReason::UnknownLease,
                    format!("no re-execution of unit {unit_id} is assigned to you"),
                )
            })
    }

    /// A verifier's re-execution of `unit_id` agreed with the submission (`agrees`) or not.
    /// Agreement verifies the submission (two executions agree) and, with probability
    /// `screen.verifier_recheck_rate` (`sample` uniform in `[0, 1)`), leaves a spot check of
    /// the verifier to the relay; disagreement leaves the relay to decide which of the two is
    /// wrong. Returns the version this closed, if any.
    pub fn verifier_result(
        &mut self,
        verifier: &str,
        unit_id: u64,
        agrees: bool,
        detail: &str,
        sample: f64,
        now: u64,
    ) -> Result<Option<u64>, Rejection> {
        let check = self
            .checks
            .held_by(verifier, unit_id)
            .ok_or_else(|| {
                reject(
                    RejectReason::UnknownLease,
                    format!("no re-execution of unit {unit_id} is assigned to you"),
                )
            })?
            .clone();
        if let Some(m) = self.members.get_mut(verifier) {
            m.checking = false;
            m.stats.last_seen_ms = now;
        }
        if !agrees {
            self.checks.get_mut(unit_id).expect("held above").stage = Stage::Relay {
                taken: false,
                disputed_by: Some(verifier.to_string()),
                vouched_by: None,
            };
            return Ok(None);
        }
        self.credit_check(verifier, &check.participant, unit_id, check.tokens);
        let closed = self.settle_check(&check.participant, unit_id, true, detail, false, now);
        if sample < self.cfg.screen.verifier_recheck_rate {
            self.queue_for_relay(check, Some(verifier.to_string()), now);
        } else {
            self.keep_vouched(verifier, check);
        }
        Ok(closed)
    }

    fn credit_check(&mut self, verifier: &str, participant: &str, unit_id: u64, tokens: u64) {
        if let Some(m) = self.members.get_mut(verifier) {
            m.stats.verifications += 1;
        }
        self.outbox.push(LedgerChange::Checked {
            verifier: verifier.to_string(),
            participant: participant.to_string(),
            unit_id,
            tokens,
        });
    }

    /// The relay's own re-execution of `unit_id` agreed with the submission (`agrees`) or
    /// not. Settles the submission as [`Coordinator::reexecuted`] does, and the verifier
    /// involved, if any: one that disagreed with a submission the relay confirms, or vouched
    /// for one the relay refutes, is banned. Returns the version this closed, if any.
    pub fn relay_result(
        &mut self,
        unit_id: u64,
        agrees: bool,
        detail: &str,
        now: u64,
    ) -> Option<u64> {
        let check = self.checks.remove(unit_id)?;
        let (disputed_by, vouched_by) = match check.stage {
            Stage::Relay {
                disputed_by,
                vouched_by,
                ..
            } => (disputed_by, vouched_by),
            _ => (None, None),
        };
        if let Some(v) = vouched_by {
            // A spot check of a verifier: the submission was already settled on its word.
            if !agrees {
                self.ban(&check.participant, unit_id, detail, now);
                self.ban(
                    &v,
                    unit_id,
                    &format!("vouched for unit {unit_id}, which the relay's re-execution refutes ({detail})"),
                    now,
                );
            }
            return self.advance(now);
        }
        let mut closed = self.reexecuted(&check.participant, unit_id, agrees, detail, now);
        if let Some(v) = disputed_by {
            if agrees {
                self.ban(
                    &v,
                    unit_id,
                    &format!("its re-execution of unit {unit_id} disagreed with the submission, which the relay's confirms ({detail})"),
                    now,
                );
                if closed.is_none() {
                    closed = self.advance(now);
                }
            } else {
                self.credit_check(&v, &check.participant, unit_id, check.tokens);
            }
        }
        closed
    }

    /// The lease of `unit_id` held by `id`, or why a submission for it is refused.
    fn lease_of(&self, id: &str, unit_id: u64) -> Result<&Lease, Rejection> {
        self.leases
            .get(&unit_id)
            .filter(|l| l.participant == id)
            .ok_or_else(|| {
                reject(
                    RejectReason::UnknownLease,
                    format!("unit {unit_id} is not leased to you (expired or reassigned)"),
                )
            })
    }

    /// The lease of `unit_id`, if any.
    pub fn lease(&self, unit_id: u64) -> Option<&Lease> {
        self.leases.get(&unit_id)
    }

    /// Ledger changes since the last call, for the shell to persist.
    pub fn take_ledger_changes(&mut self) -> Vec<LedgerChange> {
        std::mem::take(&mut self.outbox)
    }

    /// Accepts a checked submission (call after it is durably stored): its credit is pending;
    /// it is folded into the round, or, when `hold`, kept out of the model until
    /// [`Coordinator::reexecuted`] says its re-execution agreed (the round waits for it). `measured` (its hash, norm and sketch) joins the cheap checks' memory.
    /// Closes the round when it has as many updates as it needs.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        id: &str,
        unit_id: u64,
        delta: &[f32],
        verdict: Verdict,
        measured: Option<&Measured>,
        hold: bool,
        now: u64,
    ) -> Accepted {
        let lease = self.leases.remove(&unit_id);
        if let Some(l) = &lease
            && let Some(m) = self.members.get_mut(id)
        {
            m.lease = None;
            m.speed
                .measure(verdict.tokens, now.saturating_sub(l.leased_ms));
            m.stats.tokens_per_s = m.speed.tokens_per_ms().unwrap_or(0.0) * 1000.0;
        }
        if let Some(m) = self.members.get_mut(id) {
            m.stats.accepted_updates += 1;
            m.refused_streak = 0;
            m.stats.tokens_trained += verdict.tokens;
            m.stats.tokens_pending += verdict.tokens;
            m.stats.last_seen_ms = now;
            m.last_work_ms = now;
            m.credits.push(Credit {
                unit_id,
                tokens: verdict.tokens,
                grant_at: None,
            });
        }
        self.accepted_total += 1;
        self.tokens_total += verdict.tokens;
        if let (Some(m), Some(l)) = (measured, &lease) {
            self.screen
                .remember(&self.cfg.screen, unit_id, m, l.unit.inner_steps, l.unit.lr);
        }
        match lease {
            Some(l) if hold => {
                self.held.insert(
                    unit_id,
                    Held {
                        participant: id.to_string(),
                        unit: l.unit,
                        delta: delta.to_vec(),
                        tokens: verdict.tokens,
                    },
                );
                self.round.members.insert(id.to_string());
                self.round.held.insert(unit_id);
                self.round.started_ms.get_or_insert(now);
            }
            lease => {
                // Without its lease (the caller did not check it first) an update can only be
                // placed by its length.
                let fragment = match &lease {
                    Some(l) => self.fragment_of(&l.unit.fragment),
                    None => self
                        .ranges
                        .iter()
                        .position(|r| r.len() == delta.len())
                        .expect("an accepted update fits one of the run's fragments"),
                };
                self.fold(id, unit_id, fragment, delta, verdict, false, now)
            }
        }
        let closed = self.round_full(now).then(|| self.close_round());
        Accepted { verdict, closed }
    }

    /// Folds an already-accepted update of `fragment` into the open round without any check
    /// or counting (restart: the ledger already counts it).
    pub fn replay(
        &mut self,
        id: &str,
        unit_id: u64,
        fragment: &Fragment,
        delta: &[f32],
        verdict: Verdict,
        now: u64,
    ) {
        let fragment = self.fragment_of(fragment);
        self.fold(id, unit_id, fragment, delta, verdict, false, now);
    }

    /// The index of `fragment` among the run's, if it is one of them.
    fn fragment_index(&self, fragment: &Fragment) -> Option<usize> {
        self.cfg.fragments.iter().position(|f| f == fragment)
    }

    /// The index of an accepted update's fragment (its unit was checked against its lease, or
    /// stored with it).
    fn fragment_of(&self, fragment: &Fragment) -> usize {
        self.fragment_index(fragment)
            .expect("an accepted unit names one of the run's fragments")
    }

    /// The fragment a new unit trains (see [`FragmentSchedule`]).
    fn next_fragment(&self) -> usize {
        let n = self.ranges.len();
        if n == 1 {
            return 0;
        }
        match self.cfg.fragment_schedule {
            FragmentSchedule::Rotate => (self.version % n as u64) as usize,
            FragmentSchedule::Spread => {
                let mut units: Vec<usize> =
                    self.round.by_fragment.iter().map(|f| f.updates).collect();
                for l in self.leases.values() {
                    if l.unit.base_version == self.version
                        && let Some(i) = self.fragment_index(&l.unit.fragment)
                    {
                        units[i] += 1;
                    }
                }
                let v = self.version as usize;
                (0..n)
                    .min_by_key(|&i| (units[i], (i + n - v % n) % n))
                    .expect("at least one fragment")
            }
        }
    }

    /// The run's fragments as `[start, end)` ranges of the parameter vector, and the outer
    /// steps each has taken (its own version count).
    pub fn fragments(&self) -> Vec<(std::ops::Range<usize>, u64)> {
        self.ranges
            .iter()
            .cloned()
            .zip(self.fragment_steps.iter().copied())
            .collect()
    }

    /// Adds an update to the open round: its distance from the previous round's average is
    /// clipped (centered clipping, Karimireddy et al. 2021) to `clip` times the median of
    /// recent distances, so that no single update moves the average far, whatever it holds.
    /// An update not `verified` yet is remembered ([`Parts`]) until its credit is granted, so
    /// that a ban can take it out of the model again.
    #[allow(clippy::too_many_arguments)]
    fn fold(
        &mut self,
        id: &str,
        unit_id: u64,
        fragment: usize,
        delta: &[f32],
        verdict: Verdict,
        verified: bool,
        now: u64,
    ) {
        let range = self.ranges[fragment].clone();
        let center = &self.center[range.clone()];
        let clip = self.cfg.screen.clip;
        let clipped;
        let delta = if self.cfg.screen.enabled && clip > 0.0 {
            let distance = aggregate::distance(delta, center);
            let distances = &mut self.distances[fragment];
            let tau = (distances.len() >= self.cfg.screen.norm_min_history).then(|| {
                let mut d: Vec<f64> = distances.iter().copied().collect();
                d.sort_by(f64::total_cmp);
                clip * d[d.len() / 2]
            });
            distances.push_back(distance);
            while distances.len() > self.cfg.screen.norm_window.max(1) {
                distances.pop_front();
            }
            match tau {
                Some(tau) if distance > tau && distance > 0.0 => {
                    self.clipped_total += 1;
                    clipped = aggregate::clip_towards(delta, center, (tau / distance) as f32);
                    &clipped[..]
                }
                _ => delta,
            }
        } else {
            delta
        };
        aggregate::fold(&mut self.round.sum[range], delta, verdict.weight);
        if self.cfg.screen.enabled && self.cfg.screen.revert_memory > 0 && !verified {
            self.parts.fold(
                id,
                unit_id,
                fragment,
                verdict.tokens,
                verdict.weight,
                delta.to_vec(),
            );
        }
        let f = &mut self.round.by_fragment[fragment];
        f.weight += verdict.weight as f64;
        f.tokens += verdict.tokens;
        f.updates += 1;
        self.round.members.insert(id.to_string());
        self.round.units.push((id.to_string(), unit_id));
        self.round.started_ms.get_or_insert(now);
    }

    /// Closes the open round if it already holds enough updates (restart); returns the new
    /// version.
    pub fn close_round_if_full(&mut self, now: u64) -> Option<u64> {
        self.round_full(now).then(|| self.close_round())
    }

    fn close_round(&mut self) -> u64 {
        // Each fragment with updates takes its own outer step on its own average.
        let norms: Vec<Option<f64>> = self
            .round
            .by_fragment
            .iter()
            .map(|f| {
                let norm = if self.cfg.absolute_staleness_discount {
                    f.tokens as f64
                } else {
                    f.weight
                };
                (f.weight > 0.0 && norm > 0.0).then_some(norm)
            })
            .collect();
        let stepped: Vec<usize> = (0..norms.len()).filter(|&f| norms[f].is_some()).collect();
        if stepped.is_empty() {
            self.parts.discard_open();
        } else {
            let lr = self.outer_lr();
            let mu = self.cfg.outer_momentum;
            let average = |f: usize| -> Vec<f32> {
                let inv = (1.0 / norms[f].expect("a stepped fragment")) as f32;
                self.round.sum[self.ranges[f].clone()]
                    .iter()
                    .map(|s| s * inv)
                    .collect()
            };
            match self.cfg.version_codec {
                None => {
                    for &f in &stepped {
                        let g = average(f);
                        let range = self.ranges[f].clone();
                        self.center[range.clone()].copy_from_slice(&g);
                        aggregate::nesterov_step(
                            &mut self.params[range.clone()],
                            &mut self.momentum[range],
                            &g,
                            lr,
                            mu,
                        );
                    }
                }
                Some(codec) => {
                    // One encoded change over the span of the fragments that moved (what a
                    // participant downloads), with the error feedback of every earlier step.
                    let hull = stepped
                        .iter()
                        .map(|&f| self.ranges[f].clone())
                        .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
                        .expect("a stepped fragment");
                    let mut step = vec![0.0f32; hull.len()];
                    for &f in &stepped {
                        let g = average(f);
                        let range = self.ranges[f].clone();
                        self.center[range.clone()].copy_from_slice(&g);
                        let d = aggregate::nesterov_direction(
                            &mut self.momentum[range.clone()],
                            &g,
                            lr,
                            mu,
                        );
                        step[range.start - hull.start..range.end - hull.start].copy_from_slice(&d);
                    }
                    if self.step_residual.len() != self.params.len() {
                        self.step_residual = vec![0.0; self.params.len()];
                    }
                    for (s, r) in step.iter_mut().zip(&self.step_residual[hull.clone()]) {
                        *s += r;
                    }
                    let payload = tessera_protocol::update::Payload::encode(codec, &step);
                    // The outer step is finite (its updates were checked), so it decodes.
                    let sent = payload.decode().expect("an encoded outer step decodes");
                    for ((p, s), q) in self.params[hull.clone()]
                        .iter_mut()
                        .zip(&mut step)
                        .zip(&sent)
                    {
                        *p -= q;
                        *s -= q;
                    }
                    self.step_residual[hull.clone()].copy_from_slice(&step);
                    self.change = Some(VersionChange {
                        version: self.version + 1,
                        offset: hull.start as u64,
                        payload,
                    });
                }
            }
            for &f in &stepped {
                self.fragment_steps[f] += 1;
            }
            self.parts.close(
                self.version + 1,
                &norms,
                lr,
                mu,
                self.cfg.screen.revert_memory,
            );
        }
        self.revised = false;
        self.tokens_applied += self.round.tokens();
        let folded = std::mem::take(&mut self.round.units);
        self.clear_round();
        self.guard.round_closed();
        self.version += 1;
        self.settle_credit(&folded);
        self.version
    }

    /// Credit after a round closed: the units folded into it start their window; units whose
    /// window has closed are granted.
    fn settle_credit(&mut self, folded: &[(String, u64)]) {
        let grant_at = self.version + self.cfg.screen.grant_after_rounds;
        for (id, unit_id) in folded {
            if let Some(c) = self
                .members
                .get_mut(id)
                .and_then(|m| m.credits.iter_mut().find(|c| c.unit_id == *unit_id))
            {
                c.grant_at = Some(grant_at);
            }
        }
        let version = self.version;
        let mut granted = BTreeSet::new();
        for m in self.members.values_mut() {
            let (due, rest): (Vec<Credit>, Vec<Credit>) = std::mem::take(&mut m.credits)
                .into_iter()
                .partition(|c| c.grant_at.is_some_and(|g| g <= version));
            m.credits = rest;
            for c in due {
                granted.insert(c.unit_id);
                m.stats.tokens_pending -= c.tokens;
                m.stats.tokens_granted += c.tokens;
                self.outbox.push(LedgerChange::Granted {
                    participant: m.stats.id.clone(),
                    unit_id: c.unit_id,
                    tokens: c.tokens,
                });
            }
        }
        self.parts.forget(&granted);
        let members = &self.members;
        self.vouched.retain(|u, (_, c)| {
            members
                .get(&c.participant)
                .is_some_and(|m| m.credits.iter().any(|k| k.unit_id == *u))
        });
    }

    fn clear_round(&mut self) {
        self.round.sum.iter_mut().for_each(|s| *s = 0.0);
        self.round.by_fragment.fill(FragmentSum::default());
        self.round.started_ms = None;
        self.round.members.clear();
        self.round.units.clear();
        self.round.held.clear();
        for m in self.members.values_mut() {
            m.waiting_since = None;
        }
    }

    /// Time passes: expire leases; close a round that ran past its deadline, that has as many
    /// updates as there are still active participants, or that is the last of a finished run.
    pub fn tick(&mut self, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let expired: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.unit.deadline_ms < now)
            .map(|l| l.unit.unit_id)
            .collect();
        for unit_id in expired {
            let participant = self.leases[&unit_id].participant.clone();
            self.release(unit_id);
            events.push(Event::LeaseExpired {
                unit_id,
                participant,
            });
        }
        if let Some(start) = self.round.started_ms
            && self.round.updates() > 0
            && !self.at_max_version()
        {
            let late = now.saturating_sub(start) >= self.cfg.round_timeout_ms;
            let full = self.round_full(now);
            let last = self.finished() && self.leases.is_empty();
            if late || full || last {
                let updates = self.round.updates();
                let version = self.close_round();
                events.push(Event::RoundClosed { version, updates });
            }
        }
        events
    }

    /// The relay evaluated `version`: `Some(v)` when the guard finds it clearly worse than the
    /// recent best and the run must roll back to version `v` (whose weights and momentum the
    /// shell then passes to [`Coordinator::roll_back`]).
    pub fn evaluated(&mut self, version: u64, loss: f32) -> Option<u64> {
        if self
            .discarded
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&version))
        {
            return None;
        }
        match self.guard.judge(version, loss) {
            Judgement::Bad { restore, .. } => Some(restore),
            Judgement::Good | Judgement::Ignored => None,
        }
    }

    /// Rolls back to `restore` (judged good; `params` are its weights): a new version holding
    /// those weights, outer momentum cleared, the open round and every base version since
    /// `restore` discarded, the outer learning rate damped. `bad` is the version that tripped
    /// the guard, with its loss. Returns the rollback as recorded.
    pub fn roll_back(
        &mut self,
        restore: u64,
        params: Vec<f32>,
        bad: (u64, f32),
        now: u64,
    ) -> Rollback {
        assert_eq!(params.len(), self.params.len(), "restored weights' length");
        let (restored_loss, threshold) = (
            self.guard.last_good().map_or(f32::NAN, |g| g.1),
            self.guard.threshold().unwrap_or(f32::NAN),
        );
        self.params = params;
        self.momentum.iter_mut().for_each(|m| *m = 0.0);
        self.step_residual.clear();
        self.clear_round();
        self.parts.roll_back(restore);
        self.revised = false;
        self.version += 1;
        self.discarded.push((restore + 1, self.version - 1));
        let rollback = Rollback {
            bad_version: bad.0,
            bad_loss: bad.1,
            restored_version: restore,
            restored_loss,
            threshold,
            new_version: self.version,
            at_ms: now,
        };
        self.guard.rolled_back(rollback.clone());
        rollback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units of exactly 10 steps (160 tokens) unless a test is about pacing.
    fn cfg() -> Config {
        Config {
            inner_steps: 10,
            min_inner_steps: 10,
            batch_size: 2,
            context: 8,
            updates_per_round: 2,
            lease_ms: 5_000,
            max_staleness: 2,
            outer_lr: 1.0,
            outer_momentum: 0.0,
            max_update_norm: 100.0,
            grace: 0.0,
            screen: ScreenConfig {
                enabled: false,
                ..ScreenConfig::default()
            },
            ..Config::new(8)
        }
    }

    fn coord_with(cfg: Config, n: usize) -> Coordinator {
        Coordinator::new(cfg, 0, vec![1.0; n], vec![0.0; n], 0, 0)
    }

    fn coord(n: usize) -> Coordinator {
        coord_with(cfg(), n)
    }

    fn join(c: &mut Coordinator, id: &str) {
        c.join(id, ParticipantKind::Native, "cpu", "test", 0.0, 0);
    }

    fn unit(c: &mut Coordinator, id: &str, now: u64) -> WorkUnit {
        match c.request_work(id, now) {
            Work::Unit(u) => u,
            other => panic!("{id} got {other:?}"),
        }
    }

    fn digest(version: u64) -> [u8; 32] {
        [version as u8; 32]
    }

    fn submit(
        c: &mut Coordinator,
        id: &str,
        unit: &WorkUnit,
        delta: &[f32],
        now: u64,
    ) -> Result<Accepted, Rejection> {
        let tokens = unit.inner_steps as u64 * 16;
        // The shell records each version's digest; here a version's digest is its number.
        if !c.digests.contains_key(&unit.base_version) {
            c.set_digest(unit.base_version, digest(unit.base_version));
        }
        match c.check(
            id,
            unit.unit_id,
            unit.base_version,
            &digest(unit.base_version),
            delta,
            tokens,
        ) {
            Ok(v) => Ok(c.accept(id, unit.unit_id, delta, v, None, false, now)),
            Err(r) => {
                c.record_rejection(id, unit.unit_id, r.reason, now);
                Err(r)
            }
        }
    }

    #[test]
    fn a_round_of_k_updates_advances_the_version_with_the_weighted_average() {
        let mut c = coord(2);
        join(&mut c, "a");
        join(&mut c, "b");
        let ua = unit(&mut c, "a", 0);
        let ub = unit(&mut c, "b", 0);
        assert_ne!(ua.unit_id, ub.unit_id);
        assert_ne!(ua.shard, ub.shard);
        let first = submit(&mut c, "a", &ua, &[0.2, 0.0], 10).unwrap();
        assert_eq!(first.closed, None);
        let second = submit(&mut c, "b", &ub, &[0.4, 0.2], 20).unwrap();
        assert_eq!(second.closed, Some(1));
        // outer lr 1, no momentum: params -= mean(delta)
        assert!(
            (c.params()[0] - 0.7).abs() < 1e-6 && (c.params()[1] - 0.9).abs() < 1e-6,
            "{:?}",
            c.params()
        );
        assert_eq!(c.totals(), (2, 0, 320));
        assert_eq!(c.tokens_applied(), 320);
    }

    /// With an encoded version change, the new weights are exactly the old minus the decoded
    /// change (what a participant rebuilds), and what the encoding left out is carried: over
    /// rounds the weights follow the exact f32 run to within one quantisation step.
    #[test]
    fn encoded_version_changes_rebuild_exactly_and_lose_nothing_over_rounds() {
        let n = 600;
        let cfg = Config {
            version_codec: Some(Codec::Int8),
            outer_lr: 0.7,
            outer_momentum: 0.9,
            ..cfg()
        };
        let mut q = coord_with(cfg.clone(), n);
        let mut exact = coord_with(
            Config {
                version_codec: None,
                ..cfg
            },
            n,
        );
        let delta = |r: usize, who: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i * 7 + r * 13 + who * 5) % 23) as f32 - 11.0)
                        * 1e-3
                        * (1.0 + (i % 50) as f32)
                })
                .collect()
        };
        for c in [&mut q, &mut exact] {
            join(c, "a");
            join(c, "b");
        }
        for r in 0..6 {
            let old = q.params().to_vec();
            for c in [&mut q, &mut exact] {
                let ua = unit(c, "a", r as u64 * 100);
                let ub = unit(c, "b", r as u64 * 100);
                submit(c, "a", &ua, &delta(r, 0), r as u64 * 100 + 1).unwrap();
                submit(c, "b", &ub, &delta(r, 1), r as u64 * 100 + 2).unwrap();
            }
            let v = q.version();
            assert_eq!(v, r as u64 + 1);
            let change = q.change(v).expect("an outer step's change").clone();
            assert_eq!((change.version, change.offset), (v, 0));
            assert!(q.change(v - 1).is_none());
            assert_eq!(change.payload.data.len(), n.div_ceil(256) * 4 + n);
            let rebuilt: Vec<f32> = old
                .iter()
                .zip(change.payload.decode().unwrap())
                .map(|(p, d)| p - d)
                .collect();
            assert_eq!(rebuilt, q.params(), "round {r}: rebuilt bit for bit");
            // Within one int8 step of the largest change of the round.
            let step = change
                .payload
                .decode()
                .unwrap()
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()))
                / 127.0;
            for (a, b) in q.params().iter().zip(exact.params()) {
                assert!((a - b).abs() <= step * 1.01, "round {r}: {a} vs {b}");
            }
        }
        assert_eq!(
            q.momentum(),
            exact.momentum(),
            "the momentum is never quantised"
        );
    }

    fn two_fragments(schedule: FragmentSchedule) -> Config {
        Config {
            fragments: vec![
                Fragment { offset: 0, len: 2 },
                Fragment { offset: 2, len: 4 },
            ],
            fragment_schedule: schedule,
            ..cfg()
        }
    }

    /// Fragment units from two participants advance different fragments: each fragment takes
    /// its own step on the average of its own updates, a delta of the wrong fragment's length
    /// is refused, and rotation gives every unit of a version the same fragment.
    #[test]
    fn fragment_units_from_two_participants_advance_different_fragments() {
        let mut c = coord_with(two_fragments(FragmentSchedule::Spread), 6);
        join(&mut c, "a");
        join(&mut c, "b");
        let ua = unit(&mut c, "a", 0);
        let ub = unit(&mut c, "b", 0);
        assert_eq!(ua.fragment, Fragment { offset: 0, len: 2 });
        assert_eq!(ub.fragment, Fragment { offset: 2, len: 4 });
        let wrong = submit(&mut c, "a", &ua, &[0.1; 6], 5).unwrap_err();
        assert_eq!(wrong.reason, RejectReason::Malformed);
        let ua = unit(&mut c, "a", 6);
        submit(&mut c, "a", &ua, &[0.5, 0.5], 10).unwrap();
        let closed = submit(&mut c, "b", &ub, &[0.1, 0.2, 0.3, 0.4], 20).unwrap();
        assert_eq!(closed.closed, Some(1));
        // outer lr 1, no momentum: each fragment minus its own average, not half of it.
        let want = [0.5, 0.5, 0.9, 0.8, 0.7, 0.6];
        for (p, w) in c.params().iter().zip(want) {
            assert!((p - w).abs() < 1e-6, "{:?}", c.params());
        }
        assert_eq!(c.fragments(), vec![(0..2, 1), (2..6, 1)]);

        // Rotation: version 1's units all train fragment 1; fragment 0 stays as it was.
        let mut c = coord_with(two_fragments(FragmentSchedule::Rotate), 6);
        join(&mut c, "a");
        join(&mut c, "b");
        for v in 0..3u64 {
            let ua = unit(&mut c, "a", 100 * v);
            let ub = unit(&mut c, "b", 100 * v);
            let f = c.cfg.fragments[v as usize % 2];
            assert_eq!((ua.fragment, ub.fragment), (f, f), "version {v}");
            let before = c.params().to_vec();
            let d = vec![0.25; f.len as usize];
            submit(&mut c, "a", &ua, &d, 100 * v + 10).unwrap();
            submit(&mut c, "b", &ub, &d, 100 * v + 20).unwrap();
            assert_eq!(c.version(), v + 1);
            let range = f.range(6).unwrap();
            for (i, (now, was)) in c.params().iter().zip(&before).enumerate() {
                assert_eq!(now != was, range.contains(&i), "version {v}, parameter {i}");
            }
        }
        assert_eq!(c.fragments(), vec![(0..2, 2), (2..6, 1)]);
    }

    /// Under momentum, a fragment that takes no step keeps its momentum (its own outer state),
    /// and a version's encoded change covers only the fragment that moved.
    #[test]
    fn each_fragment_keeps_its_own_momentum_and_its_change_covers_it_alone() {
        let mut c = coord_with(
            Config {
                outer_lr: 0.7,
                outer_momentum: 0.9,
                version_codec: Some(Codec::Int8),
                ..two_fragments(FragmentSchedule::Rotate)
            },
            6,
        );
        join(&mut c, "a");
        join(&mut c, "b");
        let mut momentum0 = Vec::new();
        for v in 0..2u64 {
            let ua = unit(&mut c, "a", 100 * v);
            let ub = unit(&mut c, "b", 100 * v);
            let d = vec![0.25; ua.fragment.len as usize];
            let old = c.params().to_vec();
            submit(&mut c, "a", &ua, &d, 100 * v + 10).unwrap();
            submit(&mut c, "b", &ub, &d, 100 * v + 20).unwrap();
            let change = c.change(v + 1).unwrap().clone();
            assert_eq!(change.offset, ua.fragment.offset);
            assert_eq!(change.payload.len, ua.fragment.len);
            let decoded = change.payload.decode().unwrap();
            let start = change.offset as usize;
            for (i, d) in decoded.iter().enumerate() {
                assert_eq!(old[start + i] - d, c.params()[start + i], "rebuilt exactly");
            }
            if v == 0 {
                momentum0 = c.momentum()[0..2].to_vec();
                assert!(momentum0.iter().all(|m| *m != 0.0));
            }
        }
        assert_eq!(
            c.momentum()[0..2],
            momentum0[..],
            "fragment 0 took no step at version 2"
        );
        assert!(c.momentum()[2..].iter().all(|m| *m != 0.0));
    }

    /// A ban takes a participant's fragment updates back out of the right fragment, under
    /// momentum: the model ends as if its updates had been zero.
    #[test]
    fn a_ban_takes_fragment_updates_out_of_their_own_fragment() {
        let run = |with_b: bool| {
            let mut c = coord_with(
                Config {
                    screen: ScreenConfig {
                        enabled: true,
                        reexecute_first: 0,
                        clip: 0.0,
                        grant_after_rounds: 100,
                        ..ScreenConfig::default()
                    },
                    outer_lr: 0.7,
                    outer_momentum: 0.9,
                    fragments: vec![
                        Fragment { offset: 0, len: 2 },
                        Fragment { offset: 2, len: 2 },
                    ],
                    fragment_schedule: FragmentSchedule::Spread,
                    ..cfg()
                },
                4,
            );
            join(&mut c, "a");
            join(&mut c, "b");
            let mut last_b = None;
            for r in 0..3u64 {
                let t = 100 * r;
                let ua = unit(&mut c, "a", t);
                let ub = unit(&mut c, "b", t);
                assert_ne!(ua.fragment, ub.fragment);
                submit(&mut c, "a", &ua, &[0.2, -0.1], t + 10).unwrap();
                let d = if with_b { [3.0, 2.0] } else { [0.0, 0.0] };
                submit(&mut c, "b", &ub, &d, t + 20).unwrap();
                last_b = Some(ub.unit_id);
            }
            (c, last_b.unwrap())
        };
        let (mut c, audited) = run(true);
        assert_eq!(c.version(), 3);
        c.reexecuted("b", audited, false, "cosine 0.2", 500);
        let (clean, _) = run(false);
        for i in 0..4 {
            assert!(
                (c.params()[i] - clean.params()[i]).abs() < 1e-5
                    && (c.momentum()[i] - clean.momentum()[i]).abs() < 1e-5,
                "{:?} vs {:?}",
                c.params(),
                clean.params()
            );
        }
    }

    #[test]
    fn expired_leases_go_to_someone_else_and_the_late_update_is_refused() {
        let mut c = coord(2);
        join(&mut c, "slow");
        join(&mut c, "fast");
        let u = unit(&mut c, "slow", 0);
        // heartbeats keep it alive
        c.heartbeat("slow", 4_000);
        assert!(c.tick(8_000).is_empty());
        // then silence
        let ev = c.tick(9_001 + 1);
        assert_eq!(
            ev,
            vec![Event::LeaseExpired {
                unit_id: u.unit_id,
                participant: "slow".into()
            }]
        );
        let again = unit(&mut c, "fast", 10_000);
        assert_eq!((again.unit_id, again.shard), (u.unit_id, u.shard));
        let r = submit(&mut c, "slow", &u, &[0.0, 0.0], 11_000).unwrap_err();
        assert_eq!(r.reason, RejectReason::UnknownLease);
        submit(&mut c, "fast", &again, &[0.0, 0.0], 11_000).unwrap();
    }

    /// A unit refused for its content (here the loss probe) goes back to the queue, but not
    /// to the participant it was refused from while the model has not moved: retraining it
    /// from the same version gives the same update. Before, the relay handed it straight back
    /// (303 refusals of one unit in a stalled run).
    #[test]
    fn a_unit_refused_for_its_content_is_not_handed_back_to_the_same_participant() {
        let mut c = coord(2);
        for id in ["a", "b"] {
            join(&mut c, id);
        }
        let refused = unit(&mut c, "a", 0);
        c.record_rejection("a", refused.unit_id, RejectReason::FailedProbe, 1_000);
        let next = unit(&mut c, "a", 1_000);
        assert_ne!(next.unit_id, refused.unit_id, "the same unit handed back");
        assert_ne!(next.shard, refused.shard);
        // Someone else trains it.
        let other = unit(&mut c, "b", 1_000);
        assert_eq!(
            (other.unit_id, other.shard),
            (refused.unit_id, refused.shard)
        );
        // A unit given up for staleness is not marked: it comes back to its holder.
        let mut c = coord(2);
        join(&mut c, "a");
        let late = unit(&mut c, "a", 0);
        c.record_rejection("a", late.unit_id, RejectReason::TooStale, 1_000);
        assert_eq!(unit(&mut c, "a", 1_000).unit_id, late.unit_id);
    }

    #[test]
    fn staleness_is_discounted_then_refused() {
        let mut c = coord(1);
        for id in ["old", "x", "y"] {
            join(&mut c, id);
        }
        let old = unit(&mut c, "old", 0);
        // advance 3 versions with other participants (K = 2)
        for _ in 0..3 {
            for id in ["x", "y"] {
                let u = unit(&mut c, id, 0);
                submit(&mut c, id, &u, &[0.0], 0).unwrap();
            }
        }
        assert_eq!(c.version(), 3);
        c.heartbeat("old", 0);
        let r = submit(&mut c, "old", &old, &[0.0], 0).unwrap_err();
        assert_eq!(r.reason, RejectReason::TooStale);
        // a staleness of 1 is accepted with half the weight
        let u = unit(&mut c, "x", 0);
        let v = unit(&mut c, "y", 0);
        submit(&mut c, "y", &v, &[0.0], 0).unwrap();
        let z = unit(&mut c, "y", 0);
        submit(&mut c, "y", &z, &[0.0], 0).unwrap();
        let a = submit(&mut c, "x", &u, &[0.0], 0).unwrap();
        assert_eq!(a.verdict.staleness, 1);
        assert_eq!(a.verdict.weight, 80.0);
    }

    /// A round of stale updates takes a smaller step (their direction is partly applied
    /// already); with the relative discount, staleness only shifts weight within a round.
    #[test]
    fn stale_updates_shrink_the_step_when_the_discount_is_absolute() {
        for (absolute, want) in [(true, 0.5), (false, 1.0 / 1.5)] {
            let mut c = coord_with(
                Config {
                    absolute_staleness_discount: absolute,
                    ..cfg()
                },
                1,
            );
            for id in ["a", "b", "c"] {
                join(&mut c, id);
            }
            let (ua, ub) = (unit(&mut c, "a", 0), unit(&mut c, "b", 0));
            // c and a close version 1; b's unit is then one version stale.
            let uc = unit(&mut c, "c", 0);
            submit(&mut c, "c", &uc, &[0.0], 0).unwrap();
            submit(&mut c, "a", &ua, &[0.0], 0).unwrap();
            assert_eq!(c.version(), 1);
            let ua = unit(&mut c, "a", 0);
            submit(&mut c, "b", &ub, &[1.0], 0).unwrap();
            submit(&mut c, "a", &ua, &[0.5], 0).unwrap();
            // (½ · 1.0 + 1 · 0.5) over 2 units' tokens (absolute) or over 1.5 units' weight.
            let moved = 1.0 - c.params()[0];
            assert!(
                (moved - want).abs() < 1e-6,
                "{absolute}: moved {moved}, want {want}"
            );
        }
    }

    #[test]
    fn malformed_and_malicious_updates_are_refused_and_change_nothing() {
        let mut c = coord(3);
        join(&mut c, "a");
        join(&mut c, "b");
        let u = unit(&mut c, "a", 0);
        c.set_digest(0, digest(0));
        let before = c.params().to_vec();
        assert_eq!(
            c.check("a", u.unit_id, 0, &digest(9), &[0.0; 3], 1)
                .unwrap_err()
                .reason,
            RejectReason::BaseMismatch
        );
        for (delta, reason) in [
            (vec![0.0; 2], RejectReason::Malformed),
            (vec![0.0, f32::NAN, 0.0], RejectReason::Malformed),
            (vec![1e6, 0.0, 0.0], RejectReason::OutOfBounds),
        ] {
            assert_eq!(
                c.check("a", u.unit_id, 0, &digest(0), &delta, 1)
                    .unwrap_err()
                    .reason,
                reason
            );
        }
        assert_eq!(
            c.check("b", u.unit_id, 0, &digest(0), &[0.0; 3], 1)
                .unwrap_err()
                .reason,
            RejectReason::UnknownLease
        );
        assert_eq!(
            c.check("a", u.unit_id, 7, &digest(0), &[0.0; 3], 1)
                .unwrap_err()
                .reason,
            RejectReason::Malformed
        );
        // claimed tokens are capped at the unit's
        assert_eq!(
            c.check("a", u.unit_id, 0, &digest(0), &[0.0; 3], 1 << 40)
                .unwrap()
                .tokens,
            160
        );
        assert_eq!(c.params(), before.as_slice());
        assert_eq!(c.pending_updates(), 0);
    }

    #[test]
    fn a_round_closes_at_its_deadline_with_fewer_than_k_updates() {
        let mut c = coord(1);
        join(&mut c, "a");
        let u = unit(&mut c, "a", 0);
        submit(&mut c, "a", &u, &[0.5], 1_000).unwrap();
        assert!(c.tick(30_000).is_empty());
        assert_eq!(
            c.tick(61_000),
            vec![Event::RoundClosed {
                version: 1,
                updates: 1
            }]
        );
        assert!((c.params()[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn leave_releases_at_once_and_rerequest_is_idempotent() {
        let mut c = coord(1);
        join(&mut c, "a");
        join(&mut c, "b");
        let u = unit(&mut c, "a", 0);
        assert_eq!(unit(&mut c, "a", 1), u);
        assert_eq!(c.leave("a", 2), vec![u.unit_id]);
        assert_eq!(unit(&mut c, "b", 3).unit_id, u.unit_id);
    }

    /// The default: a round waits for one update per active participant, so an outer step
    /// averages the work done in parallel instead of adding it up.
    #[test]
    fn rounds_follow_the_number_of_active_participants() {
        let mut c = coord_with(
            Config {
                updates_per_round: 0,
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        let u = unit(&mut c, "a", 0);
        assert_eq!(c.round_target(0), 1);
        assert_eq!(submit(&mut c, "a", &u, &[0.1], 10).unwrap().closed, Some(1));
        join(&mut c, "b");
        join(&mut c, "c");
        assert_eq!(c.round_target(20), 3);
        let (ua, ub, uc) = (
            unit(&mut c, "a", 20),
            unit(&mut c, "b", 20),
            unit(&mut c, "c", 20),
        );
        assert_eq!(submit(&mut c, "a", &ua, &[0.1], 30).unwrap().closed, None);
        assert_eq!(submit(&mut c, "b", &ub, &[0.1], 40).unwrap().closed, None);
        // c vanishes without a word: once its lease expires and it has been silent for a
        // lease period it no longer counts, and the round closes with two updates.
        let _ = uc;
        c.disconnect("c", 50);
        assert!(
            c.tick(5_019)
                .iter()
                .all(|e| !matches!(e, Event::RoundClosed { .. }))
        );
        let ev = c.tick(5_021);
        assert!(
            ev.contains(&Event::RoundClosed {
                version: 2,
                updates: 2
            }),
            "{ev:?}"
        );
        assert_eq!(c.round_target(5_021), 2);
    }

    /// A participant ten times slower gets a unit a tenth as long, so both land in the same
    /// round; a newcomer of unknown speed gets a probe unit.
    #[test]
    fn units_are_sized_to_measured_speed() {
        let mut c = coord_with(
            Config {
                updates_per_round: 0,
                inner_steps: 40,
                min_inner_steps: 1,
                ..cfg()
            },
            1,
        );
        join(&mut c, "fast");
        join(&mut c, "slow");
        // Unknown speeds: probe units of a quarter.
        let (f, s) = (unit(&mut c, "fast", 0), unit(&mut c, "slow", 0));
        assert_eq!((f.inner_steps, s.inner_steps), (10, 10));
        // fast: 10 steps (160 tokens) in 0.25 s; slow: the same in 2.5 s.
        submit(&mut c, "fast", &f, &[0.0], 250).unwrap();
        submit(&mut c, "slow", &s, &[0.0], 2_500).unwrap();
        let (f, s) = (unit(&mut c, "fast", 2_500), unit(&mut c, "slow", 2_500));
        assert_eq!((f.inner_steps, s.inner_steps), (40, 4));
        assert_eq!((f.warmup_steps, s.warmup_steps), (5, 2));
        join(&mut c, "new");
        assert_eq!(unit(&mut c, "new", 2_500).inner_steps, 10);
        // A participant reporting its speed in its hello starts at that size.
        c.join(
            "tab",
            ParticipantKind::Browser,
            "wasm-cpu",
            "t",
            64.0,
            2_500,
        );
        assert_eq!(unit(&mut c, "tab", 2_500).inner_steps, 4);
        let stats = c.participants().find(|p| p.id == "slow").unwrap();
        assert!((stats.tokens_per_s - 64.0).abs() < 1e-9, "{stats:?}");
        assert_eq!(stats.unit_steps, 4);
        // A participant too slow for its probe unit: the unit comes back too stale, and its
        // next unit is sized by how long that one took.
        join(&mut c, "tortoise");
        let t = unit(&mut c, "tortoise", 2_500);
        assert_eq!(t.inner_steps, 10);
        c.record_rejection("tortoise", t.unit_id, RejectReason::TooStale, 102_500);
        assert_eq!(unit(&mut c, "tortoise", 102_500).inner_steps, 1);
    }

    /// Grace: a participant whose update sits in a round about to close waits for it and then
    /// starts from the new version; it does not wait for a straggler; lockstep waits for as
    /// long as it takes.
    #[test]
    fn grace_and_lockstep_start_units_from_fresh_versions() {
        let mut c = coord_with(
            Config {
                updates_per_round: 0,
                grace: 0.5,
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        join(&mut c, "b");
        let (ua, ub) = (unit(&mut c, "a", 0), unit(&mut c, "b", 0));
        // a: 160 tokens in 1 s, so its units last ~1 s and it may wait 0.5 s; b, of unknown
        // speed, is expected back at about the same time.
        submit(&mut c, "a", &ua, &[0.0], 1_000).unwrap();
        assert_eq!(c.request_work("a", 1_000), Work::Wait(100));
        assert_eq!(c.request_work("a", 1_400), Work::Wait(100));
        submit(&mut c, "b", &ub, &[0.0], 1_450).unwrap();
        assert_eq!(c.version(), 1);
        assert_eq!(unit(&mut c, "a", 1_460).base_version, 1);
        // b (now measured faster) finishes next, but a is not due for another 460 ms, more
        // than b's grace: b goes on at once.
        let ub = unit(&mut c, "b", 1_460);
        submit(&mut c, "b", &ub, &[0.0], 2_000).unwrap();
        assert_eq!(unit(&mut c, "b", 2_000).base_version, 1);

        let mut c = coord_with(
            Config {
                updates_per_round: 2,
                lockstep: true,
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        join(&mut c, "b");
        let (ua, ub) = (unit(&mut c, "a", 0), unit(&mut c, "b", 0));
        submit(&mut c, "a", &ua, &[0.0], 1_000).unwrap();
        assert_eq!(c.request_work("a", 50_000), Work::Wait(100));
        submit(&mut c, "b", &ub, &[0.0], 50_000).unwrap();
        assert_eq!(unit(&mut c, "a", 50_001).base_version, 1);
    }

    #[test]
    fn a_token_budget_finishes_the_run_and_closes_the_last_round() {
        let mut c = coord_with(
            Config {
                updates_per_round: 0,
                max_tokens: Some(320),
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        join(&mut c, "b");
        let (ua, ub) = (unit(&mut c, "a", 0), unit(&mut c, "b", 0));
        join(&mut c, "c");
        assert_eq!(c.request_work("c", 0), Work::Finished);
        submit(&mut c, "a", &ua, &[0.0], 10).unwrap();
        submit(&mut c, "b", &ub, &[0.0], 20).unwrap();
        // c never trained: the round does not wait for it once the run is finished.
        let ev = c.tick(30);
        assert!(ev.contains(&Event::RoundClosed {
            version: 1,
            updates: 2
        }));
        assert_eq!(c.tokens_applied(), 320);
    }

    /// Accepts like the shell does: with the scrutiny the coordinator asks for.
    fn submit_scrutinised(
        c: &mut Coordinator,
        id: &str,
        unit: &WorkUnit,
        delta: &[f32],
        sample: f64,
        now: u64,
    ) -> (Scrutiny, Accepted) {
        c.set_digest(unit.base_version, digest(unit.base_version));
        let v = c
            .check(
                id,
                unit.unit_id,
                unit.base_version,
                &digest(unit.base_version),
                delta,
                160,
            )
            .unwrap();
        let s = c.scrutiny(id, sample, false);
        let a = c.accept(id, unit.unit_id, delta, v, None, s == Scrutiny::Hold, now);
        (s, a)
    }

    #[test]
    fn new_identities_are_held_until_re_executed_and_a_failed_audit_bans_and_forfeits() {
        let screened = ScreenConfig {
            enabled: true,
            reexecute_first: 1,
            reexecute_rate: 0.1,
            grant_after_rounds: 100,
            ..ScreenConfig::default()
        };
        let mut c = coord_with(
            Config {
                screen: screened,
                updates_per_round: 0,
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        join(&mut c, "b");
        let (ua, ub) = (unit(&mut c, "a", 0), unit(&mut c, "b", 0));
        // Both are new: held, out of the model, and the round waits for their re-execution.
        let (s, acc) = submit_scrutinised(&mut c, "a", &ua, &[0.5], 0.9, 10);
        assert_eq!((s, acc.closed), (Scrutiny::Hold, None));
        let (s, acc) = submit_scrutinised(&mut c, "b", &ub, &[0.3], 0.9, 20);
        assert_eq!((s, acc.closed), (Scrutiny::Hold, None));
        assert_eq!((c.round_updates(), c.pending_updates()), (2, 2));
        assert!(c.tick(30).is_empty());
        // b's re-execution disagrees: banned, nothing of it enters; a's agrees and closes.
        assert_eq!(c.reexecuted("b", ub.unit_id, false, "cosine 0.1", 40), None);
        assert_eq!(c.request_work("b", 50), Work::Banned);
        // With b banned, a is the only active participant: its update closes the round.
        assert_eq!(c.reexecuted("a", ua.unit_id, true, "cosine 1", 60), Some(1));
        assert!((c.params()[0] - 0.5).abs() < 1e-6, "{:?}", c.params());
        let b = c.participants().find(|p| p.id == "b").unwrap();
        assert!(b.banned && b.tokens_forfeited == 160 && b.tokens_pending == 0);
        // a is verified now: its next updates go straight in, one in ten audited.
        let u = unit(&mut c, "a", 80);
        let (s, acc) = submit_scrutinised(&mut c, "a", &u, &[0.1], 0.9, 90);
        assert_eq!((s, acc.closed), (Scrutiny::None, Some(2)));
        let u = unit(&mut c, "a", 100);
        let (s, acc) = submit_scrutinised(&mut c, "a", &u, &[0.1], 0.05, 110);
        assert_eq!((s, acc.closed), (Scrutiny::Audit, Some(3)));
        let pending = c
            .participants()
            .find(|p| p.id == "a")
            .unwrap()
            .tokens_pending;
        assert_eq!(pending, 3 * 160);
        assert!((c.params()[0] - 0.3).abs() < 1e-6, "{:?}", c.params());
        // The audit disagrees: every pending token of a is forfeited, a is banned, and its two
        // updates folded unverified are taken back out of the model in a new version (the
        // held one, verified, stays).
        assert_eq!(
            c.reexecuted("a", u.unit_id, false, "norm differs", 120),
            Some(4)
        );
        assert!((c.params()[0] - 0.5).abs() < 1e-6, "{:?}", c.params());
        assert_eq!(c.tokens_applied(), 160);
        let a = c.participants().find(|p| p.id == "a").unwrap();
        assert!(a.banned && a.tokens_pending == 0 && a.tokens_granted == 0);
        assert_eq!(a.tokens_forfeited, 3 * 160);
        let changes = c.take_ledger_changes();
        assert!(
            changes.iter().any(|ch| matches!(ch,
                LedgerChange::Banned { participant, tokens: 480, reverted, .. }
                    if participant == "a" && reverted.len() == 2)),
            "{changes:?}"
        );
        assert_eq!((c.reverted_total(), c.revertible().0), (2, 0));
    }

    /// A ban takes the participant's unverified updates out of the open round too, and under
    /// momentum out of both the weights and the momentum: the model ends as if only the honest
    /// participant had been folded.
    #[test]
    fn a_ban_takes_unverified_updates_out_of_the_open_round_and_of_the_momentum() {
        let screened = ScreenConfig {
            enabled: true,
            reexecute_first: 0,
            clip: 0.0,
            grant_after_rounds: 100,
            ..ScreenConfig::default()
        };
        let run = |with_b: bool| {
            let mut c = coord_with(
                Config {
                    screen: screened,
                    updates_per_round: 2,
                    outer_lr: 0.7,
                    outer_momentum: 0.9,
                    ..cfg()
                },
                2,
            );
            join(&mut c, "a");
            join(&mut c, "b");
            let mut last_b = None;
            for r in 0..3u64 {
                let t = 100 * r;
                let ua = unit(&mut c, "a", t);
                let ub = unit(&mut c, "b", t);
                submit(&mut c, "a", &ua, &[0.2, -0.1], t + 10).unwrap();
                let d = if with_b { [3.0, 2.0] } else { [0.0, 0.0] };
                submit(&mut c, "b", &ub, &d, t + 20).unwrap();
                last_b = Some(ub.unit_id);
            }
            // b's fourth update waits in the open round.
            let ub = unit(&mut c, "b", 400);
            let d = if with_b { [5.0, 5.0] } else { [0.0, 0.0] };
            submit(&mut c, "b", &ub, &d, 410).unwrap();
            (c, last_b.unwrap(), ub.unit_id)
        };
        let (mut c, audited, open) = run(true);
        assert_eq!((c.version(), c.round_updates()), (3, 1));
        assert_eq!(
            c.reexecuted("b", audited, false, "cosine 0.2", 500),
            Some(4)
        );
        assert_eq!(c.round_updates(), 0);
        let (clean, _, _) = run(false);
        // Without b, every round's average is half of a's update (b's zero delta weighs the
        // same): the weights after taking b out are those of a alone with b's shares zero.
        for i in 0..2 {
            assert!(
                (c.params()[i] - clean.params()[i]).abs() < 1e-5,
                "{:?} vs {:?}",
                c.params(),
                clean.params()
            );
            assert!((c.momentum()[i] - clean.momentum()[i]).abs() < 1e-5);
        }
        let changes = c.take_ledger_changes();
        assert!(changes.iter().any(|ch| matches!(ch,
            LedgerChange::Banned { reverted, .. } if reverted.len() == 4 && reverted.contains(&open))));
    }

    #[test]
    fn verifiers_re_execute_held_units_and_a_wrong_verifier_is_banned() {
        let mut c = coord_with(
            Config {
                screen: ScreenConfig {
                    enabled: true,
                    reexecute_first: 1,
                    trusted_after: 1,
                    verifier_recheck_rate: 0.5,
                    ..ScreenConfig::default()
                },
                updates_per_round: 1,
                trusted_verifiers: ["v".to_string(), "w".to_string()].into(),
                ..cfg()
            },
            1,
        );
        for id in ["a", "b", "v", "w", "x"] {
            join(&mut c, id);
        }
        // Only trusted keys (or identities with enough verified units) may verify.
        assert!(c.may_verify("v") && !c.may_verify("x") && !c.may_verify("a"));
        assert_eq!(c.verification_for("x", 0), None);
        // Nothing to check yet: the verifier trains.
        assert_eq!(c.verification_for("v", 0), None);
        let ua = unit(&mut c, "a", 0);
        let (s, acc) = submit_scrutinised(&mut c, "a", &ua, &[0.5], 0.9, 10);
        assert_eq!((s, acc.closed), (Scrutiny::Hold, None));
        c.queue_check("a", ua.clone(), Arc::new(vec![0.5]), 160, 10);
        // A verifier is present: the relay leaves the check to it for a while.
        assert!(c.relay_check(20).is_none());
        let got = c.verification_for("v", 20).expect("a's unit to check");
        assert_eq!((got.unit_id, got.deadline_ms), (ua.unit_id, 20 + 5_000));
        // Asking again gives the same assignment; a result for another unit is refused.
        assert_eq!(
            c.verification_for("v", 25).map(|u| u.unit_id),
            Some(ua.unit_id)
        );
        assert!(
            c.verifier_result("w", ua.unit_id, true, "", 0.9, 30)
                .is_err()
        );
        // v agrees: a's update is folded and closes the round; v's work is credited; no spot
        // check at this sample.
        let closed = c.verifier_result("v", ua.unit_id, true, "cosine 1", 0.9, 30);
        assert_eq!(closed, Ok(Some(1)));
        assert!((c.params()[0] - 0.5).abs() < 1e-6);
        let stats =
            |c: &Coordinator, id: &str| c.participants().find(|p| p.id == id).unwrap().clone();
        assert_eq!(
            (stats(&c, "v").verifications, stats(&c, "a").verified_units),
            (1, 1)
        );
        assert_eq!(c.checks_pending(), 0);

        // b's first unit: w disagrees; the relay decides, agrees with b: w is banned.
        let ub = unit(&mut c, "b", 40);
        submit_scrutinised(&mut c, "b", &ub, &[0.25], 0.9, 50);
        c.queue_check("b", ub.clone(), Arc::new(vec![0.25]), 160, 50);
        assert_eq!(
            c.verification_for("w", 60).map(|u| u.unit_id),
            Some(ub.unit_id)
        );
        assert_eq!(
            c.verifier_result("w", ub.unit_id, false, "cosine 0", 0.9, 70),
            Ok(None)
        );
        let job = c.relay_check(80).expect("the dispute goes to the relay");
        assert_eq!(job.unit.unit_id, ub.unit_id);
        assert_eq!(c.relay_result(ub.unit_id, true, "cosine 1", 90), Some(2));
        assert!(stats(&c, "w").banned && !stats(&c, "b").banned);
        assert_eq!(stats(&c, "b").verified_units, 1);
        assert_eq!(c.verification_for("w", 100), None);

        // x's first unit is bad: v vouches for it anyway, the relay's spot check refutes it:
        // both are banned.
        let ux = unit(&mut c, "x", 110);
        submit_scrutinised(&mut c, "x", &ux, &[9.0], 0.9, 120);
        c.queue_check("x", ux.clone(), Arc::new(vec![9.0]), 160, 120);
        assert_eq!(
            c.verification_for("v", 130).map(|u| u.unit_id),
            Some(ux.unit_id)
        );
        let before = c.params()[0];
        assert_eq!(
            c.verifier_result("v", ux.unit_id, true, "cosine 1", 0.1, 140),
            Ok(Some(3))
        );
        assert!((c.params()[0] - (before - 9.0)).abs() < 1e-5);
        let job = c.relay_check(150).expect("a spot check of v");
        assert_eq!(job.participant, "x");
        // Folded on v's word alone, x's update is taken back out when the relay refutes it.
        assert_eq!(
            c.relay_result(ux.unit_id, false, "cosine 0.2", 160),
            Some(4)
        );
        assert!((c.params()[0] - before).abs() < 1e-5, "{:?}", c.params());
        assert!(stats(&c, "x").banned && stats(&c, "v").banned);
        assert!(!c.may_verify("v"));
        let changes = c.take_ledger_changes();
        let checked = changes
            .iter()
            .filter(|ch| matches!(ch, LedgerChange::Checked { .. }))
            .count();
        assert_eq!(checked, 2, "{changes:?}");
        // v's word verifies nothing any more: a's first unit, which it vouched for, goes back
        // to the relay (and a counts as unverified until it is confirmed).
        assert_eq!(c.rechecks(), (1, 0));
        assert_eq!(stats(&c, "a").verified_units, 0);
        let job = c.relay_check(165).expect("a's unit re-checked");
        assert_eq!(job.unit.unit_id, ua.unit_id);
        c.relay_result(ua.unit_id, true, "cosine 1", 166);
        assert_eq!(stats(&c, "a").verified_units, 1);

        // b earned verifier status with its own verified unit: it gets a's audit, never the
        // held first unit of a newcomer.
        join(&mut c, "y");
        let uy = unit(&mut c, "y", 170);
        submit_scrutinised(&mut c, "y", &uy, &[0.1], 0.9, 180);
        c.queue_check("y", uy.clone(), Arc::new(vec![0.1]), 160, 180);
        assert!(c.may_verify("b"));
        assert_eq!(c.verification_for("b", 190), None);
        let ua2 = unit(&mut c, "a", 200);
        submit_scrutinised(&mut c, "a", &ua2, &[0.1], 0.0, 210);
        c.queue_check("a", ua2.clone(), Arc::new(vec![0.1]), 160, 210);
        assert_eq!(
            c.verification_for("b", 220).map(|u| u.unit_id),
            Some(ua2.unit_id)
        );
        // b leaves: with no verifier left, the relay takes checks at once.
        c.leave("b", 230);
        assert_eq!(c.relay_check(231).map(|j| j.unit.unit_id), Some(uy.unit_id));
        assert_eq!(
            c.relay_check(232).map(|j| j.unit.unit_id),
            Some(ua2.unit_id)
        );
    }

    #[test]
    fn a_banned_verifiers_word_verifies_nothing_the_units_it_vouched_for_are_re_checked() {
        let mut c = coord_with(
            Config {
                screen: ScreenConfig {
                    enabled: true,
                    reexecute_first: 1,
                    trusted_after: 5,
                    verifier_recheck_rate: 0.5,
                    ..ScreenConfig::default()
                },
                updates_per_round: 1,
                trusted_verifiers: ["v".to_string()].into(),
                ..cfg()
            },
            1,
        );
        for id in ["a", "b", "v", "x"] {
            join(&mut c, id);
        }
        let stats =
            |c: &Coordinator, id: &str| c.participants().find(|p| p.id == id).unwrap().clone();
        // v vouches for x's bad first unit and for a's good one, neither spot-checked: both
        // are folded on its word alone.
        let mut t = 0;
        let mut vouch = |c: &mut Coordinator, id: &str, d: f32, agrees: bool| {
            t += 100;
            let u = unit(c, id, t);
            submit_scrutinised(c, id, &u, &[d], 0.9, t + 10);
            c.queue_check(id, u.clone(), Arc::new(vec![d]), 160, t + 10);
            assert_eq!(
                c.verification_for("v", t + 20).map(|w| w.unit_id),
                Some(u.unit_id)
            );
            c.verifier_result("v", u.unit_id, agrees, "", 0.9, t + 30)
                .unwrap();
            u.unit_id
        };
        let ux = vouch(&mut c, "x", 9.0, true);
        let ua = vouch(&mut c, "a", 0.5, true);
        assert_eq!(c.version(), 2);
        assert!((c.params()[0] - (1.0 - 9.0 - 0.5)).abs() < 1e-5);
        assert_eq!(
            (stats(&c, "x").verified_units, stats(&c, "a").verified_units),
            (1, 1)
        );
        assert!(c.relay_check(400).is_none(), "nothing left to check");
        // v then disputes b's honest unit; the relay confirms b: v is banned, and what it
        // vouched for is unverified again and goes to the relay.
        let ub = vouch(&mut c, "b", 0.25, false);
        let job = c.relay_check(500).expect("the dispute");
        assert_eq!(job.unit.unit_id, ub);
        c.relay_result(ub, true, "cosine 1", 510);
        assert!(stats(&c, "v").banned);
        assert_eq!(c.rechecks(), (2, 0));
        assert_eq!(
            (stats(&c, "x").verified_units, stats(&c, "a").verified_units),
            (0, 0)
        );
        let changes = c.take_ledger_changes();
        let unverified: Vec<u64> = changes
            .iter()
            .filter_map(|ch| match ch {
                LedgerChange::Unverified {
                    unit_id, verifier, ..
                } if verifier == "v" => Some(*unit_id),
                _ => None,
            })
            .collect();
        assert_eq!(unverified, vec![ux, ua]);
        // The relay refutes x's unit: x is banned and its update taken back out of the model;
        // a's is confirmed and stays.
        let before = c.params()[0];
        let jobs: Vec<u64> = [c.relay_check(520), c.relay_check(521)]
            .into_iter()
            .map(|j| j.expect("a re-check").unit.unit_id)
            .collect();
        assert_eq!(jobs, vec![ux, ua]);
        assert!(c.relay_result(ux, false, "cosine 0.1", 530).is_some());
        assert!(stats(&c, "x").banned);
        assert!(
            (c.params()[0] - (before + 9.0)).abs() < 1e-5,
            "{:?}",
            c.params()
        );
        c.relay_result(ua, true, "cosine 1", 540);
        assert!(!stats(&c, "a").banned);
        assert_eq!(stats(&c, "a").verified_units, 1);
        assert_eq!(c.checks_pending(), 0);
    }

    #[test]
    fn a_check_waits_for_a_verifier_as_long_as_it_takes_to_train_such_a_unit() {
        let mut c = coord_with(
            Config {
                screen: ScreenConfig {
                    enabled: true,
                    ..ScreenConfig::default()
                },
                lease_ms: 60_000,
                trusted_verifiers: ["v".to_string()].into(),
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        // The verifier reports 16 tokens/s: a unit of 160 tokens takes it 10 s.
        c.join("v", ParticipantKind::Native, "cpu", "slow", 16.0, 0);
        assert_eq!(c.verification_for("v", 0), None);
        let u = unit(&mut c, "a", 0);
        submit_scrutinised(&mut c, "a", &u, &[0.5], 0.9, 1_000);
        c.queue_check("a", u.clone(), Arc::new(vec![0.5]), 160, 1_000);
        // Twice that (it may be in the middle of a unit of its own), not the flat 5 s.
        assert!(c.relay_check(1_000 + 19_999).is_none());
        assert_eq!(
            c.relay_check(1_000 + 20_000).map(|j| j.unit.unit_id),
            Some(u.unit_id)
        );
    }

    #[test]
    fn no_round_closes_past_the_last_version() {
        let mut c = coord_with(
            Config {
                max_version: Some(1),
                round_timeout_ms: 100,
                ..cfg()
            },
            1,
        );
        for id in ["a", "b", "c"] {
            join(&mut c, id);
        }
        let (ua, ub, uc) = (
            unit(&mut c, "a", 0),
            unit(&mut c, "b", 0),
            unit(&mut c, "c", 0),
        );
        submit(&mut c, "a", &ua, &[0.0], 10).unwrap();
        assert_eq!(
            submit(&mut c, "b", &ub, &[0.0], 20).unwrap().closed,
            Some(1)
        );
        assert_eq!(c.request_work("a", 30), Work::Finished);
        // The late unit is accepted and waits: neither the finished run, the deadline nor
        // the shrinking set of active participants closes a version 2.
        assert_eq!(submit(&mut c, "c", &uc, &[0.0], 40).unwrap().closed, None);
        assert!(c.tick(10_000).is_empty());
        assert_eq!(c.close_round_if_full(10_000), None);
        assert_eq!(c.version(), 1);
    }

    #[test]
    fn the_inner_learning_rate_decays_over_folded_tokens() {
        let c = Config {
            inner_lr_decay: Some((1000, 1e-4)),
            ..cfg()
        };
        assert_eq!(c.inner_lr_at(0), 1e-3);
        assert!((c.inner_lr_at(500) - 5.5e-4).abs() < 1e-12);
        assert_eq!(c.inner_lr_at(5000), 1e-4);
        // With a warmup over the first 200 tokens: from a twentieth up, then the decay over
        // the remaining 800.
        let c = Config {
            inner_lr_warmup_tokens: 200,
            ..c
        };
        assert!((c.inner_lr_at(0) - 5e-5).abs() < 1e-12);
        assert!((c.inner_lr_at(100) - 5.25e-4).abs() < 1e-12);
        assert_eq!(c.inner_lr_at(200), 1e-3);
        assert!((c.inner_lr_at(600) - 5.5e-4).abs() < 1e-12);
        assert_eq!(c.inner_lr_at(1000), 1e-4);
    }

    #[test]
    fn a_bad_version_is_rolled_back_and_units_based_on_it_are_refused() {
        let mut c = coord_with(
            Config {
                updates_per_round: 1,
                outer_momentum: 0.9,
                ..cfg()
            },
            1,
        );
        join(&mut c, "a");
        join(&mut c, "b");
        assert_eq!(c.evaluated(0, 5.0), None);
        for _ in 0..2 {
            let u = unit(&mut c, "a", 0);
            submit(&mut c, "a", &u, &[0.1], 0).unwrap();
        }
        assert_eq!(c.evaluated(2, 4.0), None);
        let good = c.params().to_vec();
        let u = unit(&mut c, "a", 0);
        submit(&mut c, "a", &u, &[50.0], 0).unwrap();
        let on_bad = unit(&mut c, "b", 0);
        assert_eq!(on_bad.base_version, 3);
        assert_eq!(c.evaluated(3, 40.0), Some(2));
        let rb = c.roll_back(2, good.clone(), (3, 40.0), 100);
        assert_eq!(rb.new_version, 4);
        assert_eq!((rb.restored_version, rb.restored_loss), (2, 4.0));
        assert_eq!(c.version(), 4);
        assert_eq!(c.params(), good.as_slice());
        assert!(c.momentum().iter().all(|m| *m == 0.0));
        assert_eq!(c.outer_lr(), 0.25);
        let r = submit(&mut c, "b", &on_bad, &[0.0], 200).unwrap_err();
        assert_eq!(r.reason, RejectReason::RolledBack);
        assert_eq!(unit(&mut c, "b", 300).base_version, 4);
        assert_eq!(c.guard().rollbacks().len(), 1);
        // An evaluation of the discarded version arriving late changes nothing.
        assert_eq!(c.evaluated(3, 40.0), None);
    }

    #[test]
    fn thousands_of_participants_with_churn() {
        let mut cfg = cfg();
        cfg.updates_per_round = 100;
        cfg.max_staleness = 100;
        let mut c = Coordinator::new(cfg, 0, vec![0.0; 16], vec![0.0; 16], 0, 0);
        let n: usize = 5_000;
        let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let mut now = 0;
        for id in &ids {
            join(&mut c, id);
        }
        let mut units: Vec<Option<WorkUnit>> =
            ids.iter().map(|id| Some(unit(&mut c, id, now))).collect();
        // every third participant vanishes; the others submit
        for (i, id) in ids.iter().enumerate() {
            if i % 3 == 0 {
                continue;
            }
            let u = units[i].take().unwrap();
            submit(&mut c, id, &u, &[0.01; 16], now).unwrap();
        }
        assert_eq!(c.totals().0 as usize, n - n.div_ceil(3));
        assert!(c.version() >= 33);
        now += 10_000;
        let expired = c
            .tick(now)
            .iter()
            .filter(|e| matches!(e, Event::LeaseExpired { .. }))
            .count();
        assert_eq!(expired, n.div_ceil(3));
        // the expired units are handed out again before any new one
        let (next_unit, _) = c.counters();
        let u = unit(&mut c, "p1", now);
        assert!(u.unit_id < next_unit);
    }
}
