//! The run: start-up and crash recovery, and the paths that change durable state (leases,
//! accepted updates, new versions), each persisted before it is acknowledged.

use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tessera_coordinator::{Config as CoordConfig, Coordinator, Event, ParticipantStats};
use tessera_core::burn::prelude::Device;
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::data::Corpus;
use tessera_core::model::Gpt;
use tessera_core::params;
use tessera_core::train::{Trainer, eval_loss};
use tessera_protocol::identity;
use tessera_protocol::messages::{
    ParticipantKind, RejectReason, RunInfo, ServerMsg, Submission, WorkUnit,
};
use tokio::sync::{broadcast, watch};

use crate::checkpoints::Checkpoints;
use crate::db::{Db, UpdateRecord};
use crate::now_ms;

/// Everything that defines a run (stored with it: a restart must use the same).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RunSpec {
    /// Run name.
    pub name: String,
    /// Model shape.
    pub model: ModelConfig,
    /// Inner hyperparameters (AdamW settings; lr and batch come from the units).
    pub train: TrainConfig,
    /// SHA-256 of the corpus.
    pub corpus_sha256: String,
    /// Inner steps per unit.
    pub inner_steps: u32,
    /// Updates per round.
    pub updates_per_round: usize,
    /// Maximum staleness.
    pub max_staleness: u64,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer momentum.
    pub outer_momentum: f32,
}

/// Settings that may change between restarts.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Lease duration without a heartbeat.
    pub lease_ms: u64,
    /// Round deadline.
    pub round_timeout_ms: u64,
    /// Validation batches per evaluation.
    pub eval_iters: usize,
    /// Stop handing out work at this version.
    pub max_version: Option<u64>,
    /// Largest accepted update norm.
    pub max_update_norm: f64,
}

/// State that changes together. Lock order: `inner`, then `db`.
struct Inner {
    coord: Coordinator,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// WebSocket connections open.
    pub connections: std::sync::atomic::AtomicU64,
    /// Messages received.
    pub messages: std::sync::atomic::AtomicU64,
    /// Bytes of updates received.
    pub update_bytes: std::sync::atomic::AtomicU64,
}

/// The live relay state shared by every connection.
pub struct Relay {
    inner: Mutex<Inner>,
    /// Version files (immutable settings: no lock needed to read them).
    ckpt: Checkpoints,
    db: Mutex<Db>,
    /// The run as participants see it.
    pub run_info: RunInfo,
    spec: RunSpec,
    corpus: Arc<Corpus>,
    /// Raw corpus bytes (served at `/api/corpus`).
    pub corpus_bytes: Arc<Vec<u8>>,
    latest: RwLock<(u64, Arc<Vec<u8>>)>,
    /// New versions, for connected participants.
    pub versions: broadcast::Sender<u64>,
    eval_trigger: watch::Sender<u64>,
    history: Mutex<Vec<(u64, f32)>>,
    /// Counters.
    pub metrics: Metrics,
}

/// What `/api/status` returns.
#[derive(Serialize)]
pub struct Status {
    run: String,
    model: ModelConfig,
    model_version: u64,
    accepted_updates: u64,
    rejected_updates: u64,
    pending_updates: usize,
    tokens_trained: u64,
    val_loss: Option<f32>,
    val_loss_history: Vec<(u64, f32)>,
    leases: Vec<LeaseInfo>,
    participants: Vec<ParticipantStats>,
}

/// A lease as `/api/status` shows it.
#[derive(Serialize)]
pub struct LeaseInfo {
    unit_id: u64,
    participant: String,
    base_version: u64,
    deadline_ms: u64,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Relay {
    /// Opens the run stored in `db_path`/`ckpt_dir`, or creates it. Recovers from a crash:
    /// restores the last recorded version and replays accepted, unapplied updates.
    pub fn open(
        spec_in: RunSpec,
        coord_cfg: CoordConfig,
        tuning: &Tuning,
        corpus_text: Vec<u8>,
        db_path: &std::path::Path,
        ckpt_dir: &std::path::Path,
    ) -> Result<Arc<Self>> {
        let corpus = Corpus::from_documents(
            [("corpus", corpus_text.as_slice())],
            spec_in.model.block_size,
        )?;
        let mut spec = spec_in;
        spec.corpus_sha256 = sha256_hex(&corpus_text);
        let cpu = Device::flex();
        let specs = params::specs(&Gpt::new(&spec.model, &cpu));
        let num_params = params::total_len(&specs);
        let ckpt = Checkpoints::open(ckpt_dir, specs, spec.max_staleness + 3)?;
        let mut db = Db::open(db_path)?;
        let now = now_ms();
        let spec_json = serde_json::to_string(&spec)?;
        let coord = match db.run_config()? {
            Some(stored) => {
                let stored: RunSpec =
                    serde_json::from_str(&stored).context("reading the stored run")?;
                if stored != spec {
                    bail!(
                        "{} holds a different run ({}, config {:?}); use another --db or the same settings",
                        db_path.display(),
                        stored.name,
                        stored.model
                    );
                }
                let version = db.latest_version()?;
                let (p, m) = ckpt
                    .load(version)
                    .with_context(|| format!("loading version {version}"))?;
                let mut coord = Coordinator::new(
                    coord_cfg.clone(),
                    version,
                    p,
                    m,
                    db.counter("next_unit")?,
                    db.counter("next_shard")?,
                );
                for p in db.participants()? {
                    coord.restore_participant(p);
                }
                let template = WorkUnit {
                    unit_id: 0,
                    base_version: 0,
                    shard: 0,
                    inner_steps: coord_cfg.inner_steps,
                    batch_size: coord_cfg.batch_size,
                    lr: coord_cfg.inner_lr_at(version),
                    seed: coord_cfg.seed,
                    fragment: coord_cfg.fragment,
                    deadline_ms: 0,
                };
                for mut l in db.leases(&template)? {
                    // The relay was down: give holders a full lease from now.
                    l.unit.deadline_ms = now + tuning.lease_ms;
                    coord.restore_lease(l);
                }
                // Updates replayed from the ledger are already in the participants' counts.
                let pending = db.pending_updates()?;
                for u in &pending {
                    let delta = tessera_protocol::update::Payload {
                        codec: tessera_protocol::update::Codec::F32,
                        len: (u.payload.len() / 4) as u64,
                        data: u.payload.clone(),
                    }
                    .decode()?;
                    coord.replay(&delta, u.verdict, u.received_ms);
                }
                tracing::info!(
                    version,
                    pending = pending.len(),
                    "recovered run {}",
                    spec.name
                );
                coord
            }
            None => {
                let trainer = Trainer::new(spec.model, spec.train.clone(), &cpu)?;
                let p = params::to_vec(trainer.model());
                let m = vec![0.0; p.len()];
                ckpt.save(0, &p, &m)?;
                db.create_run(&spec.name, &spec_json, &Checkpoints::weights_name(0), now)?;
                tracing::info!("created run {} ({} parameters)", spec.name, p.len());
                Coordinator::new(coord_cfg, 0, p, m, 0, 0)
            }
        };
        let version = coord.version();
        let latest = ckpt
            .read_weights(version)
            .context("current version's weights")?;
        let history = db.val_history()?;
        let (eval_trigger, _) = watch::channel(version);
        let run_info = RunInfo {
            name: spec.name.clone(),
            model: spec.model,
            train: spec.train.clone(),
            num_params: num_params as u64,
            corpus_sha256: spec.corpus_sha256.clone(),
        };
        let relay = Arc::new(Relay {
            inner: Mutex::new(Inner { coord }),
            ckpt,
            db: Mutex::new(db),
            run_info,
            spec,
            corpus: Arc::new(corpus),
            corpus_bytes: Arc::new(corpus_text),
            latest: RwLock::new((version, Arc::new(latest))),
            versions: broadcast::channel(64).0,
            eval_trigger,
            history: Mutex::new(history),
            metrics: Metrics::default(),
        });
        {
            // A round that filled up before the crash closes now.
            let mut inner = relay.inner.lock().expect("relay lock");
            if let Some(v) = inner.coord.close_round_if_full() {
                relay.persist_version(&mut inner, v)?;
            }
        }
        Ok(relay)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().expect("db lock")
    }

    /// Current version and its safetensors bytes.
    pub fn latest(&self) -> (u64, Arc<Vec<u8>>) {
        let l = self.latest.read().expect("latest lock");
        (l.0, l.1.clone())
    }

    /// The weights of `version` if still kept.
    pub fn weights(&self, version: u64) -> Option<Arc<Vec<u8>>> {
        let (v, bytes) = self.latest();
        if v == version {
            return Some(bytes);
        }
        self.ckpt.read_weights(version).map(Arc::new)
    }

    fn persist_version(&self, inner: &mut Inner, version: u64) -> Result<()> {
        let bytes = self
            .ckpt
            .save(version, inner.coord.params(), inner.coord.momentum())?;
        let n = self
            .db()
            .record_version(version, &Checkpoints::weights_name(version), now_ms())?;
        *self.latest.write().expect("latest lock") = (version, Arc::new(bytes));
        tracing::info!(version, updates = n, "model advanced");
        let _ = self.versions.send(version);
        let _ = self.eval_trigger.send(version);
        Ok(())
    }

    /// A participant proved its key.
    pub fn join(
        &self,
        id: &str,
        public_key: &[u8],
        kind: ParticipantKind,
        backend: &str,
        device: &str,
    ) -> Result<u64> {
        let mut inner = self.inner.lock().expect("relay lock");
        let now = now_ms();
        inner.coord.join(id, kind, backend, device, now);
        let stats = inner
            .coord
            .participants()
            .find(|p| p.id == id)
            .cloned()
            .expect("just joined");
        self.db().upsert_participant(&stats, public_key, now)?;
        Ok(inner.coord.version())
    }

    /// A participant asks for work.
    pub fn request_work(&self, id: &str) -> Result<Option<WorkUnit>> {
        let mut inner = self.inner.lock().expect("relay lock");
        let unit = inner.coord.request_work(id, now_ms());
        if let Some(u) = &unit {
            let (next_unit, next_shard) = inner.coord.counters();
            self.db().put_lease(id, u, next_unit, next_shard)?;
        }
        Ok(unit)
    }

    /// A heartbeat.
    pub fn heartbeat(&self, id: &str) {
        self.inner
            .lock()
            .expect("relay lock")
            .coord
            .heartbeat(id, now_ms());
    }

    /// The connection closed.
    pub fn disconnect(&self, id: &str) {
        self.inner
            .lock()
            .expect("relay lock")
            .coord
            .disconnect(id, now_ms());
    }

    /// The participant left on purpose.
    pub fn leave(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().expect("relay lock");
        let released = inner.coord.leave(id, now_ms());
        self.db().delete_leases(&released)
    }

    /// Handles a submission: verifies, checks, stores durably, folds in; returns the reply.
    pub fn submit(&self, id: &str, public_key: &[u8; 32], s: Submission) -> Result<ServerMsg> {
        let reject = |reason: RejectReason, detail: String| ServerMsg::Rejected {
            unit_id: s.unit_id,
            reason,
            detail,
        };
        let msg = identity::update_message(s.unit_id, s.base_version, &s.payload.data);
        let verdict_input = match identity::verify(public_key, &msg, &s.signature) {
            Err(e) => Err((RejectReason::BadSignature, e.to_string())),
            Ok(()) => s
                .payload
                .decode()
                .map_err(|e| (RejectReason::Malformed, e.to_string())),
        };
        let mut inner = self.inner.lock().expect("relay lock");
        let delta = match verdict_input {
            Ok(d) => d,
            Err((reason, detail)) => {
                inner.coord.record_rejection(id, s.unit_id, reason);
                self.db().record_rejected(id)?;
                return Ok(reject(reason, detail));
            }
        };
        let verdict = match inner
            .coord
            .check(id, s.unit_id, s.base_version, &delta, s.tokens)
        {
            Ok(v) => v,
            Err(r) => {
                inner.coord.record_rejection(id, s.unit_id, r.reason);
                self.db().record_rejected(id)?;
                tracing::info!(participant = id, unit = s.unit_id, reason = ?r.reason, "rejected: {}", r.detail);
                return Ok(reject(r.reason, r.detail));
            }
        };
        let now = now_ms();
        self.db().record_accepted(&UpdateRecord {
            unit_id: s.unit_id,
            participant: id,
            base_version: s.base_version,
            verdict,
            loss_before: s.loss_before,
            loss_after: s.loss_after,
            received_ms: now,
            payload: &s.payload.data,
        })?;
        let accepted = inner.coord.accept(id, s.unit_id, &delta, verdict, now);
        if let Some(v) = accepted.closed {
            self.persist_version(&mut inner, v)?;
        }
        Ok(ServerMsg::Accepted {
            unit_id: s.unit_id,
            model_version: inner.coord.version(),
        })
    }

    /// Time passes: expire leases, close late rounds.
    pub fn tick(&self) -> Result<()> {
        let mut inner = self.inner.lock().expect("relay lock");
        for e in inner.coord.tick(now_ms()) {
            match e {
                Event::LeaseExpired {
                    unit_id,
                    participant,
                } => {
                    tracing::info!(unit_id, participant, "lease expired");
                    self.db().delete_leases(&[unit_id])?;
                }
                Event::RoundClosed { version, .. } => self.persist_version(&mut inner, version)?,
            }
        }
        Ok(())
    }

    /// Status for `/api/status`.
    pub fn status(&self) -> Status {
        let inner = self.inner.lock().expect("relay lock");
        let (accepted, rejected, tokens) = inner.coord.totals();
        let history = self.history.lock().expect("history lock").clone();
        Status {
            run: self.spec.name.clone(),
            model: self.spec.model,
            model_version: inner.coord.version(),
            accepted_updates: accepted,
            rejected_updates: rejected,
            pending_updates: inner.coord.pending_updates(),
            tokens_trained: tokens,
            val_loss: history.last().map(|h| h.1),
            val_loss_history: history,
            leases: inner
                .coord
                .leases()
                .map(|l| LeaseInfo {
                    unit_id: l.unit.unit_id,
                    participant: l.participant.clone(),
                    base_version: l.unit.base_version,
                    deadline_ms: l.unit.deadline_ms,
                })
                .collect(),
            participants: inner.coord.participants().cloned().collect(),
        }
    }

    /// Evaluates each new version's validation loss on the CPU, one at a time (a burst of
    /// versions evaluates only the newest).
    pub async fn evaluate_forever(self: Arc<Self>, eval_iters: usize) {
        let mut rx = self.eval_trigger.subscribe();
        let mut done: Option<u64> = self
            .history
            .lock()
            .expect("history lock")
            .last()
            .map(|h| h.0);
        loop {
            let version = *rx.borrow_and_update();
            if done != Some(version) {
                let params = {
                    let inner = self.inner.lock().expect("relay lock");
                    (inner.coord.version(), inner.coord.params().to_vec())
                };
                let me = self.clone();
                let res = tokio::task::spawn_blocking(move || {
                    me.eval(&params.1, eval_iters).map(|l| (params.0, l))
                })
                .await;
                match res {
                    Ok(Ok((v, loss))) => {
                        tracing::info!(version = v, val_loss = loss, "evaluated");
                        let inner = self.inner.lock().expect("relay lock");
                        if let Err(e) = self.db().set_val_loss(v, loss) {
                            tracing::warn!("storing val loss: {e:#}");
                        }
                        drop(inner);
                        let mut h = self.history.lock().expect("history lock");
                        if h.last().is_none_or(|l| l.0 < v) {
                            h.push((v, loss));
                        }
                        done = Some(v);
                    }
                    Ok(Err(e)) => tracing::warn!("evaluation failed: {e:#}"),
                    Err(e) => tracing::warn!("evaluation panicked: {e}"),
                }
                continue;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn eval(&self, weights: &[f32], eval_iters: usize) -> Result<f32> {
        let device = Device::flex();
        let model = params::load_vec(Gpt::new(&self.spec.model, &device), weights)?;
        let loss = eval_loss(
            &model,
            &self.corpus,
            self.spec.train.seed,
            eval_iters,
            self.spec.train.batch_size,
            &device,
        );
        let v: Vec<f32> = loss
            .into_data()
            .try_into_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(v[0])
    }
}
