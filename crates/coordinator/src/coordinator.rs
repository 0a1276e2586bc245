//! Leases, rounds, staleness and acceptance.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use tessera_protocol::messages::{ParticipantKind, RejectReason, WorkUnit};
use tessera_protocol::update::Fragment;

use crate::aggregate;

/// The run's coordination parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Inner steps H per work unit.
    pub inner_steps: u32,
    /// Sequences per inner batch.
    pub batch_size: u32,
    /// Tokens per sequence (the model's context).
    pub context: u32,
    /// Peak inner learning rate.
    pub inner_lr: f64,
    /// Cosine decay of the inner learning rate over model versions: `(versions, final lr)`.
    /// Units started at version `v` train at the decayed rate (`None`: constant).
    pub inner_lr_decay: Option<(u64, f64)>,
    /// The run seed.
    pub seed: u64,
    /// A round closes after this many accepted updates (K)…
    pub updates_per_round: usize,
    /// …or this long after its first update, whichever comes first.
    pub round_timeout_ms: u64,
    /// A lease expires this long after it was given or last renewed by a heartbeat.
    pub lease_ms: u64,
    /// Largest accepted staleness S (current version − base version).
    pub max_staleness: u64,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    pub outer_momentum: f32,
    /// Updates whose L2 norm exceeds this are rejected as out of bounds.
    pub max_update_norm: f64,
    /// The parameters each unit covers.
    pub fragment: Fragment,
    /// Stop handing out work once this version is reached (`None`: never).
    pub max_version: Option<u64>,
}

impl Config {
    /// Inner learning rate for a unit based on `version`.
    pub fn inner_lr_at(&self, version: u64) -> f64 {
        match self.inner_lr_decay {
            None => self.inner_lr,
            Some((total, min_lr)) => {
                let t = (version as f64 / total.max(1) as f64).min(1.0);
                min_lr + 0.5 * (1.0 + (std::f64::consts::PI * t).cos()) * (self.inner_lr - min_lr)
            }
        }
    }

    /// Tokens one unit trains on.
    pub fn unit_tokens(&self) -> u64 {
        self.inner_steps as u64 * self.batch_size as u64 * self.context as u64
    }
}

/// A unit leased to a participant.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The holder.
    pub participant: String,
    /// The unit (its deadline is the lease's).
    pub unit: WorkUnit,
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
    /// Weight in the round average: tokens / (1 + staleness).
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
    round_sum: Vec<f32>,
    round_weight: f64,
    round_updates: usize,
    round_started_ms: Option<u64>,
    participants: BTreeMap<String, ParticipantStats>,
    accepted_total: u64,
    rejected_total: u64,
    tokens_total: u64,
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
        Coordinator {
            cfg,
            version,
            params,
            momentum,
            next_unit,
            next_shard,
            leases: BTreeMap::new(),
            free: VecDeque::new(),
            round_sum: vec![0.0; n],
            round_weight: 0.0,
            round_updates: 0,
            round_started_ms: None,
            participants: BTreeMap::new(),
            accepted_total: 0,
            rejected_total: 0,
            tokens_total: 0,
        }
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
    /// Next unit id and shard to be handed out.
    pub fn counters(&self) -> (u64, u64) {
        (self.next_unit, self.next_shard)
    }
    /// Leases held now.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }
    /// Updates waiting in the open round.
    pub fn pending_updates(&self) -> usize {
        self.round_updates
    }
    /// Totals: accepted updates, rejected updates, tokens trained.
    pub fn totals(&self) -> (u64, u64, u64) {
        (self.accepted_total, self.rejected_total, self.tokens_total)
    }
    /// Every participant seen.
    pub fn participants(&self) -> impl Iterator<Item = &ParticipantStats> {
        self.participants.values()
    }

    /// Restores a participant's ledger entry (after a restart).
    pub fn restore_participant(&mut self, stats: ParticipantStats) {
        self.accepted_total += stats.accepted_updates;
        self.rejected_total += stats.rejected_updates;
        self.tokens_total += stats.tokens_trained;
        self.participants.insert(
            stats.id.clone(),
            ParticipantStats {
                connected: false,
                ..stats
            },
        );
    }

    /// Restores a lease (after a restart).
    pub fn restore_lease(&mut self, lease: Lease) {
        self.leases.insert(lease.unit.unit_id, lease);
    }

    /// A participant connected and proved its identity.
    pub fn join(&mut self, id: &str, kind: ParticipantKind, backend: &str, device: &str, now: u64) {
        let p = self
            .participants
            .entry(id.to_string())
            .or_insert_with(|| ParticipantStats {
                id: id.to_string(),
                kind: kind.as_str(),
                backend: backend.to_string(),
                device: device.to_string(),
                accepted_updates: 0,
                rejected_updates: 0,
                tokens_trained: 0,
                connected: true,
                last_seen_ms: now,
            });
        p.kind = kind.as_str();
        p.backend = backend.to_string();
        p.device = device.to_string();
        p.connected = true;
        p.last_seen_ms = now;
    }

    /// A participant's connection dropped. Its leases stay until they expire: it may come back
    /// and submit.
    pub fn disconnect(&mut self, id: &str, now: u64) {
        if let Some(p) = self.participants.get_mut(id) {
            p.connected = false;
            p.last_seen_ms = now;
        }
    }

    /// A participant left on purpose: its leases are released at once.
    pub fn leave(&mut self, id: &str, now: u64) -> Vec<u64> {
        self.disconnect(id, now);
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
            self.free.push_back((l.unit.unit_id, l.unit.shard));
        }
    }

    /// Hands `id` a unit: the one it already holds, else an expired one, else a new one.
    /// `None` when the run has reached its last version or `id` is unknown.
    pub fn request_work(&mut self, id: &str, now: u64) -> Option<WorkUnit> {
        if self.cfg.max_version.is_some_and(|m| self.version >= m)
            || !self.participants.contains_key(id)
        {
            return None;
        }
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen_ms = now;
        }
        if let Some(l) = self.leases.values().find(|l| l.participant == id) {
            return Some(l.unit.clone());
        }
        let (unit_id, shard) = self.free.pop_front().unwrap_or_else(|| {
            let ids = (self.next_unit, self.next_shard);
            self.next_unit += 1;
            self.next_shard += 1;
            ids
        });
        let unit = WorkUnit {
            unit_id,
            base_version: self.version,
            shard,
            inner_steps: self.cfg.inner_steps,
            batch_size: self.cfg.batch_size,
            lr: self.cfg.inner_lr_at(self.version),
            seed: self.cfg.seed,
            fragment: self.cfg.fragment,
            deadline_ms: now + self.cfg.lease_ms,
        };
        self.leases.insert(
            unit_id,
            Lease {
                participant: id.to_string(),
                unit: unit.clone(),
            },
        );
        Some(unit)
    }

    /// A heartbeat: the participant is alive; its leases are renewed.
    pub fn heartbeat(&mut self, id: &str, now: u64) {
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen_ms = now;
        }
        let deadline = now + self.cfg.lease_ms;
        for l in self.leases.values_mut().filter(|l| l.participant == id) {
            l.unit.deadline_ms = l.unit.deadline_ms.max(deadline);
        }
    }

    /// Checks a submission without changing anything. `delta` is the decoded pseudo-gradient.
    pub fn check(
        &self,
        id: &str,
        unit_id: u64,
        base_version: u64,
        delta: &[f32],
        tokens: u64,
    ) -> Result<Verdict, Rejection> {
        let lease = self
            .leases
            .get(&unit_id)
            .filter(|l| l.participant == id)
            .ok_or_else(|| {
                reject(
                    RejectReason::UnknownLease,
                    format!("unit {unit_id} is not leased to you (expired or reassigned)"),
                )
            })?;
        if base_version != lease.unit.base_version {
            return Err(reject(
                RejectReason::Malformed,
                format!(
                    "unit {unit_id} was leased at version {}, not {base_version}",
                    lease.unit.base_version
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
        let range = self
            .cfg
            .fragment
            .range(self.params.len())
            .map_err(|e| reject(RejectReason::Malformed, e.to_string()))?;
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
        let tokens = tokens.min(self.cfg.unit_tokens());
        Ok(Verdict {
            staleness,
            tokens,
            weight: tokens as f32 / (1 + staleness) as f32,
        })
    }

    /// Records a rejection against `id` (and drops a too-stale lease, whose unit goes back to the
    /// queue).
    pub fn record_rejection(&mut self, id: &str, unit_id: u64, reason: RejectReason) {
        self.rejected_total += 1;
        if let Some(p) = self.participants.get_mut(id) {
            p.rejected_updates += 1;
        }
        if reason == RejectReason::TooStale
            && self
                .leases
                .get(&unit_id)
                .is_some_and(|l| l.participant == id)
        {
            self.release(unit_id);
        }
    }

    /// Folds a checked submission into the round (call after it is durably stored). Closes the
    /// round when it has K updates.
    pub fn accept(
        &mut self,
        id: &str,
        unit_id: u64,
        delta: &[f32],
        verdict: Verdict,
        now: u64,
    ) -> Accepted {
        self.leases.remove(&unit_id);
        if let Some(p) = self.participants.get_mut(id) {
            p.accepted_updates += 1;
            p.tokens_trained += verdict.tokens;
            p.last_seen_ms = now;
        }
        self.accepted_total += 1;
        self.tokens_total += verdict.tokens;
        self.replay(delta, verdict, now);
        let closed = (self.round_updates >= self.cfg.updates_per_round).then(|| self.close_round());
        Accepted { verdict, closed }
    }

    /// Folds an already-accepted update into the open round without any check or counting
    /// (restart: the ledger already counts it).
    pub fn replay(&mut self, delta: &[f32], verdict: Verdict, now: u64) {
        let range = self
            .cfg
            .fragment
            .range(self.params.len())
            .expect("checked fragment");
        aggregate::fold(&mut self.round_sum[range], delta, verdict.weight);
        self.round_weight += verdict.weight as f64;
        self.round_updates += 1;
        self.round_started_ms.get_or_insert(now);
    }

    /// Closes the open round if it already holds K updates (restart); returns the new version.
    pub fn close_round_if_full(&mut self) -> Option<u64> {
        (self.round_updates >= self.cfg.updates_per_round).then(|| self.close_round())
    }

    fn close_round(&mut self) -> u64 {
        let range = self
            .cfg
            .fragment
            .range(self.params.len())
            .expect("checked fragment");
        if self.round_weight > 0.0 {
            let inv = (1.0 / self.round_weight) as f32;
            let g: Vec<f32> = self.round_sum[range.clone()]
                .iter()
                .map(|s| s * inv)
                .collect();
            aggregate::nesterov_step(
                &mut self.params[range.clone()],
                &mut self.momentum[range.clone()],
                &g,
                self.cfg.outer_lr,
                self.cfg.outer_momentum,
            );
        }
        self.round_sum[range].iter_mut().for_each(|s| *s = 0.0);
        self.round_weight = 0.0;
        self.round_updates = 0;
        self.round_started_ms = None;
        self.version += 1;
        self.version
    }

    /// Time passes: expire leases, close a round that ran past its deadline.
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
        if let Some(start) = self.round_started_ms
            && self.round_updates > 0
            && now.saturating_sub(start) >= self.cfg.round_timeout_ms
        {
            let updates = self.round_updates;
            let version = self.close_round();
            events.push(Event::RoundClosed { version, updates });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            inner_steps: 10,
            batch_size: 2,
            context: 8,
            inner_lr: 1e-3,
            inner_lr_decay: None,
            seed: 1,
            updates_per_round: 2,
            round_timeout_ms: 60_000,
            lease_ms: 5_000,
            max_staleness: 2,
            outer_lr: 1.0,
            outer_momentum: 0.0,
            max_update_norm: 100.0,
            fragment: Fragment::ALL,
            max_version: None,
        }
    }

    fn coord(n: usize) -> Coordinator {
        Coordinator::new(cfg(), 0, vec![1.0; n], vec![0.0; n], 0, 0)
    }

    fn join(c: &mut Coordinator, id: &str) {
        c.join(id, ParticipantKind::Native, "cpu", "test", 0);
    }

    fn submit(
        c: &mut Coordinator,
        id: &str,
        unit: &WorkUnit,
        delta: &[f32],
        now: u64,
    ) -> Result<Accepted, Rejection> {
        match c.check(id, unit.unit_id, unit.base_version, delta, 160) {
            Ok(v) => Ok(c.accept(id, unit.unit_id, delta, v, now)),
            Err(r) => {
                c.record_rejection(id, unit.unit_id, r.reason);
                Err(r)
            }
        }
    }

    #[test]
    fn a_round_of_k_updates_advances_the_version_with_the_weighted_average() {
        let mut c = coord(2);
        join(&mut c, "a");
        join(&mut c, "b");
        let ua = c.request_work("a", 0).unwrap();
        let ub = c.request_work("b", 0).unwrap();
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
    }

    #[test]
    fn expired_leases_go_to_someone_else_and_the_late_update_is_refused() {
        let mut c = coord(2);
        join(&mut c, "slow");
        join(&mut c, "fast");
        let u = c.request_work("slow", 0).unwrap();
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
        let again = c.request_work("fast", 10_000).unwrap();
        assert_eq!((again.unit_id, again.shard), (u.unit_id, u.shard));
        let r = submit(&mut c, "slow", &u, &[0.0, 0.0], 11_000).unwrap_err();
        assert_eq!(r.reason, RejectReason::UnknownLease);
        submit(&mut c, "fast", &again, &[0.0, 0.0], 11_000).unwrap();
    }

    #[test]
    fn staleness_is_discounted_then_refused() {
        let mut c = coord(1);
        for id in ["old", "x", "y"] {
            join(&mut c, id);
        }
        let old = c.request_work("old", 0).unwrap();
        // advance 3 versions with other participants (K = 2)
        for _ in 0..3 {
            for id in ["x", "y"] {
                let u = c.request_work(id, 0).unwrap();
                submit(&mut c, id, &u, &[0.0], 0).unwrap();
            }
        }
        assert_eq!(c.version(), 3);
        c.heartbeat("old", 0);
        let r = submit(&mut c, "old", &old, &[0.0], 0).unwrap_err();
        assert_eq!(r.reason, RejectReason::TooStale);
        // a staleness of 1 is accepted with half the weight
        let u = c.request_work("x", 0).unwrap();
        let v = c.request_work("y", 0).unwrap();
        submit(&mut c, "y", &v, &[0.0], 0).unwrap();
        let z = c.request_work("y", 0).unwrap();
        submit(&mut c, "y", &z, &[0.0], 0).unwrap();
        let a = submit(&mut c, "x", &u, &[0.0], 0).unwrap();
        assert_eq!(a.verdict.staleness, 1);
        assert_eq!(a.verdict.weight, 80.0);
    }

    #[test]
    fn malformed_and_malicious_updates_are_refused_and_change_nothing() {
        let mut c = coord(3);
        join(&mut c, "a");
        join(&mut c, "b");
        let u = c.request_work("a", 0).unwrap();
        let before = c.params().to_vec();
        for (delta, reason) in [
            (vec![0.0; 2], RejectReason::Malformed),
            (vec![0.0, f32::NAN, 0.0], RejectReason::Malformed),
            (vec![1e6, 0.0, 0.0], RejectReason::OutOfBounds),
        ] {
            assert_eq!(
                c.check("a", u.unit_id, 0, &delta, 1).unwrap_err().reason,
                reason
            );
        }
        assert_eq!(
            c.check("b", u.unit_id, 0, &[0.0; 3], 1).unwrap_err().reason,
            RejectReason::UnknownLease
        );
        assert_eq!(
            c.check("a", u.unit_id, 7, &[0.0; 3], 1).unwrap_err().reason,
            RejectReason::Malformed
        );
        // claimed tokens are capped at the unit's
        assert_eq!(
            c.check("a", u.unit_id, 0, &[0.0; 3], 1 << 40)
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
        let u = c.request_work("a", 0).unwrap();
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
        let u = c.request_work("a", 0).unwrap();
        assert_eq!(c.request_work("a", 1).unwrap(), u);
        assert_eq!(c.leave("a", 2), vec![u.unit_id]);
        assert_eq!(c.request_work("b", 3).unwrap().unit_id, u.unit_id);
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
            ids.iter().map(|id| c.request_work(id, now)).collect();
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
        let u = c.request_work("p1", now).unwrap();
        assert!(u.unit_id < next_unit);
    }
}
