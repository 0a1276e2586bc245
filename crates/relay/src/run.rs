//! The run: start-up and crash recovery, and the paths that change durable state (leases,
//! accepted updates, new versions), each persisted before it is acknowledged.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tessera_coordinator::screen;
use tessera_coordinator::{
    Config as CoordConfig, Coordinator, Event, Held, LedgerChange, Measured, ParticipantStats,
    Rejection, RelayCheck, Rollback, Scrutiny, Verdict, Work,
};
use tessera_core::burn::prelude::Device;
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::data::Corpus;
use tessera_core::model::Gpt;
use tessera_core::params;
use tessera_core::tokenizer;
use tessera_core::train::{Trainer, eval_loss, generate};
use tessera_protocol::ledger::{Checkpoint, Hash, Inclusion, Leaf, LedgerInfo, Statement};
use tessera_protocol::messages::{
    ModelChange, ParticipantKind, RejectReason, RunInfo, ServerMsg, Submission, WorkUnit,
};
use tessera_protocol::update::{Codec, Fragment, Payload};
use tessera_protocol::{identity, work};
use tokio::sync::{broadcast, watch};

use crate::blobs::Blobs;
use crate::checkpoints::Checkpoints;
use crate::db::{Db, UpdateRecord};
use crate::edge::{Caller, Op};
use crate::ledger::{Log, load_or_create_key};
use crate::now_ms;
use crate::verify::Verifier;

/// What a banned participant is told (and then disconnected).
pub const BANNED: &str = "banned: a re-execution contradicted this key's work (a unit it trained, or one it verified); its pending credit is forfeited";

/// A uniform sample in `[0, 1)` from the operating system's randomness.
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("randomness");
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform integer in `0..n` (n ≥ 1).
fn random_below(n: u32) -> u32 {
    ((random_unit() * n.max(1) as f64) as u32).min(n.max(1) - 1)
}

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
    /// Inner steps per unit (of the fastest participant).
    pub inner_steps: u32,
    /// Fewest inner steps per unit.
    pub min_inner_steps: u32,
    /// Per-unit learning-rate warmup steps.
    pub unit_warmup: u32,
    /// Updates per round (0: one per active participant).
    pub updates_per_round: usize,
    /// Synchronous rounds.
    pub lockstep: bool,
    /// Maximum staleness.
    pub max_staleness: u64,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer momentum.
    pub outer_momentum: f32,
    /// Fragments the model is split into (1: whole-model units).
    #[serde(default = "one")]
    pub fragments: usize,
}

fn one() -> usize {
    1
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
    /// Price of the completions API, micro-units per 1000 tokens (for revenue statements).
    pub price_per_1k: u64,
}

/// State that changes together. Lock order: `inner`, then `db`.
struct Inner {
    coord: Coordinator,
    /// The contribution log (what is granted is appended here after it is committed).
    log: Log,
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
    /// Versions served whole (`/api/model/{v}`), and their bytes.
    pub weights_served: std::sync::atomic::AtomicU64,
    /// Bytes of versions served whole.
    pub weights_bytes: std::sync::atomic::AtomicU64,
    /// Versions served as encoded changes (`/api/model/{to}/from/{from}`)…
    pub changes_served: std::sync::atomic::AtomicU64,
    /// …and their bytes.
    pub change_bytes: std::sync::atomic::AtomicU64,
    /// Accepted updates committed to the store…
    pub update_commits: std::sync::atomic::AtomicU64,
    /// …and the microseconds those commits took.
    pub update_commit_us: std::sync::atomic::AtomicU64,
    /// Versions written (checkpoint, object store, version row)…
    pub version_writes: std::sync::atomic::AtomicU64,
    /// …and the microseconds those writes took.
    pub version_write_us: std::sync::atomic::AtomicU64,
}

impl Metrics {
    /// A version's weights, `bytes` long, served whole.
    pub fn weights_served(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.weights_served.fetch_add(1, Relaxed);
        self.weights_bytes.fetch_add(bytes as u64, Relaxed);
    }

    fn timed(
        count: &std::sync::atomic::AtomicU64,
        us: &std::sync::atomic::AtomicU64,
        since: std::time::Instant,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        count.fetch_add(1, Relaxed);
        us.fetch_add(since.elapsed().as_micros() as u64, Relaxed);
    }
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
    /// Text generated by the newest evaluated version: (version, text).
    sample: Mutex<Option<(u64, String)>>,
    /// Counters.
    pub metrics: Metrics,
    /// Probe and re-execution compute.
    pub verifier: Verifier,
    /// Rung when a check may be waiting for the relay's re-execution thread.
    doorbell: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Price of the completions API, micro-units per 1000 tokens.
    pub price_per_1k: u64,
    /// Buffers submissions are decoded into.
    buffers: Buffers,
    /// What edge relays show to forward participants' calls (derived from the run's key).
    pub edge_token: String,
}

/// A few decode buffers, reused from one submission to the next: decoding into pages already
/// touched costs a fraction of a fresh vector's first touch (`aggregate_bench` measures both).
#[derive(Default)]
struct Buffers(Mutex<Vec<Vec<f32>>>);

impl Buffers {
    /// Buffers kept: about as many as submissions decoded at once.
    const KEEP: usize = 4;

    fn take(&self) -> Buffer<'_> {
        let vec = self
            .0
            .lock()
            .expect("buffers lock")
            .pop()
            .unwrap_or_default();
        Buffer {
            vec: Some(vec),
            home: self,
        }
    }
}

/// A decode buffer that goes back to its [`Buffers`] when dropped (unless taken for good).
struct Buffer<'a> {
    vec: Option<Vec<f32>>,
    home: &'a Buffers,
}

impl Buffer<'_> {
    fn get(&mut self) -> &mut Vec<f32> {
        self.vec.as_mut().expect("buffer present until taken")
    }

    /// The values, kept (a check holds on to them).
    fn keep(mut self) -> Vec<f32> {
        self.vec.take().expect("buffer present until taken")
    }
}

impl std::ops::Deref for Buffer<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.vec.as_deref().expect("buffer present until taken")
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.vec.take() {
            let mut kept = self.home.0.lock().expect("buffers lock");
            if kept.len() < Buffers::KEEP {
                kept.push(v);
            }
        }
    }
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
    /// A sample of text from the newest evaluated version.
    sample: Option<Sample>,
    leases: Vec<LeaseInfo>,
    participants: Vec<ParticipantStats>,
    /// The open round: updates in it, updates it needs, participants counted active.
    round: RoundInfo,
    /// Tokens folded into the model.
    tokens_applied: u64,
    /// The outer learning rate in force (damped for a while after a rollback).
    outer_lr: f32,
    /// How units ask participants to encode their updates (`int8`, `int4`, `f32`, `sparse64`…).
    codec: String,
    /// How version changes are encoded for participants that hold an older version (`null`:
    /// they fetch whole weights).
    version_codec: Option<String>,
    /// The fragments units train (one covering the whole model unless `--fragments`).
    fragments: Vec<FragmentInfo>,
    /// The guard on the model.
    guard: GuardInfo,
    /// Verification of submissions.
    verification: VerificationInfo,
    /// The contribution log.
    ledger: LedgerStatus,
}

/// The contribution log, as `/api/status` shows it (`/api/ledger` has the signed checkpoint).
#[derive(Serialize)]
pub struct LedgerStatus {
    /// The relay's ed25519 key (hex), which signs checkpoints and receipts.
    relay_key: String,
    /// Leaves (granted units) and their credit.
    leaves: u64,
    credit: u64,
    /// The newest signed checkpoint: its version and the leaves it covers.
    checkpoint_version: Option<u64>,
    checkpoint_leaves: u64,
}

/// Verification, as `/api/status` shows it.
#[derive(Serialize)]
pub struct VerificationInfo {
    enabled: bool,
    /// Rejections by reason.
    rejections: std::collections::BTreeMap<String, u64>,
    /// Updates held out of the model until their re-execution.
    held: usize,
    /// Updates whose distance from the previous round's average was clipped.
    clipped: u64,
    /// Probes run, and seconds they took.
    probes: u64,
    probe_seconds: f64,
    /// Units re-executed, seconds it took and tokens it trained.
    reexecutions: u64,
    reexecute_seconds: f64,
    reexecuted_tokens: u64,
    /// Banned participants.
    banned: usize,
    /// Re-executions not yet settled (held and audited units).
    checks_pending: usize,
    /// Re-executions done by verifier participants and found right.
    verifier_checks: u64,
    /// Banned participants' updates taken back out of the model.
    reverted: u64,
    /// Folded updates of closed rounds kept so that a ban can take them out, their MiB, and
    /// how many the memory budget (`--revert-memory-mb`) dropped.
    revertible: usize,
    revertible_mib: f64,
    revertible_dropped: u64,
    /// Units verified on the word of a verifier since banned, re-executed by the relay; and
    /// those that could not be (forgotten over `--revert-memory-mb` first).
    rechecked: u64,
    recheck_dropped: u64,
}

/// A fragment of the model, as `/api/status` shows it.
#[derive(Serialize)]
pub struct FragmentInfo {
    /// Its first parameter and its length.
    offset: usize,
    len: usize,
    /// Outer steps it has taken (the versions that changed it).
    outer_steps: u64,
}

/// The open round, as `/api/status` shows it.
#[derive(Serialize)]
pub struct RoundInfo {
    updates: usize,
    target: usize,
    active_participants: usize,
}

/// The guard, as `/api/status` shows it.
#[derive(Serialize)]
pub struct GuardInfo {
    enabled: bool,
    /// A version whose validation loss exceeds this is rolled back.
    threshold: Option<f32>,
    /// The version a rollback would restore.
    last_good_version: Option<u64>,
    /// Every rollback, oldest first.
    rollbacks: Vec<Rollback>,
}

/// Text generated by one model version.
#[derive(Serialize, Clone)]
pub struct Sample {
    model_version: u64,
    text: String,
}

/// A lease as `/api/status` shows it.
#[derive(Serialize)]
pub struct LeaseInfo {
    unit_id: u64,
    participant: String,
    base_version: u64,
    deadline_ms: u64,
    /// The first parameter of the fragment it trains (0 for whole-model units).
    fragment_offset: u64,
}

/// Length of the text sample generated for each evaluated version.
const SAMPLE_TOKENS: usize = 200;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where a run is kept.
pub struct Storage {
    /// The store, opened (on PostgreSQL: this relay leads the run).
    pub db: Db,
    /// The store as the user named it, for messages.
    pub db_name: String,
    /// The relay's ledger signing key (created on first use); every relay of a run shares it.
    pub key: PathBuf,
    /// The local folder of model versions (with an object store: a cache of it).
    pub checkpoints: PathBuf,
    /// The object store versions are also written to, if any.
    pub blobs: Option<Blobs>,
}

impl Relay {
    /// Opens the run kept in `storage`, or creates it. Recovers from a crash (or takes over
    /// from a relay that led the run before): restores the last recorded version and replays
    /// accepted, unapplied updates.
    pub fn open(
        spec_in: RunSpec,
        coord_cfg: CoordConfig,
        tuning: &Tuning,
        corpus_text: Vec<u8>,
        storage: Storage,
    ) -> Result<Arc<Self>> {
        let Storage {
            mut db,
            db_name,
            key: key_path,
            checkpoints: ckpt_dir,
            blobs,
        } = storage;
        let corpus = Corpus::from_documents(
            [("corpus", corpus_text.as_slice())],
            spec_in.model.block_size,
        )?;
        let mut spec = spec_in;
        spec.corpus_sha256 = sha256_hex(&corpus_text);
        let cpu = Device::flex();
        let specs = params::specs(&Gpt::new(&spec.model, &cpu));
        let num_params = params::total_len(&specs);
        let mut coord_cfg = coord_cfg;
        if spec.fragments > 1 {
            coord_cfg.fragments = params::fragments(&specs, spec.model.n_layer, spec.fragments)
                .context("--fragments")?
                .into_iter()
                .map(|r| Fragment {
                    offset: r.start as u64,
                    len: r.len() as u64,
                })
                .collect();
        }
        let keep = spec.max_staleness + 3;
        let ckpt = Checkpoints::open(&ckpt_dir, specs, keep, blobs)?;
        let secret = load_or_create_key(&key_path)?;
        let mut log = Log::new(&spec.name, secret, &db.ledger_leaves(0, None)?);
        if let Some(c) = db.ledger_checkpoint(None)? {
            log.set_signed(c.version, c.log_size);
        }
        let now = now_ms();
        let spec_json = serde_json::to_string(&spec)?;
        let coord = match db.run_config()? {
            Some(stored) => {
                let stored: RunSpec =
                    serde_json::from_str(&stored).context("reading the stored run")?;
                if stored != spec {
                    bail!(
                        "{} holds a different run ({}, config {:?}) than these settings ask for: \
                         start it with the same settings, or use another --db and --checkpoints \
                         (or delete them) to start a new run",
                        db_name,
                        stored.name,
                        stored.model
                    );
                }
                let version = db.latest_version()?;
                // Versions another machine wrote come from the object store; the current one
                // must, the older ones (still accepted as bases) when they can.
                for v in version.saturating_sub(keep)..=version {
                    if let Some(stored) = db.version_checkpoint(v)? {
                        match ckpt.restore(v, &stored) {
                            Ok(()) => {}
                            Err(e) if v == version => return Err(e),
                            Err(e) => tracing::warn!(v, "older version not restored: {e:#}"),
                        }
                    }
                }
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
                    lr: coord_cfg.inner_lr,
                    warmup_steps: 0,
                    seed: coord_cfg.seed,
                    fragment: Fragment::ALL,
                    codec: coord_cfg.codec,
                    deadline_ms: 0,
                };
                coord.restore_tokens_applied(db.tokens_applied()?);
                coord.restore_guard(&db.val_history()?, db.rollbacks()?);
                for mut l in db.leases(&template)? {
                    // The relay was down: give holders a full lease from now.
                    l.unit.deadline_ms = now + tuning.lease_ms;
                    l.leased_ms = now;
                    coord.restore_lease(l);
                }
                // Updates replayed from the ledger are already in the participants' counts.
                let pending = db.pending_updates()?;
                for u in &pending {
                    let data = ckpt.stored_payload(u.payload_key.as_deref(), u.payload.clone())?;
                    let delta = tessera_protocol::update::Payload {
                        codec: tessera_protocol::update::Codec::F32,
                        len: (data.len() / 4) as u64,
                        data,
                    }
                    .decode()?;
                    coord.replay(
                        &u.participant,
                        u.unit_id,
                        &u.fragment,
                        &delta,
                        u.verdict,
                        u.received_ms,
                    );
                }
                for (participant, unit_id, tokens, folded) in db.pending_credit()? {
                    coord.restore_credit(&participant, unit_id, tokens, folded);
                }
                for h in db.update_hashes()? {
                    coord.restore_hash(h);
                }
                for h in db.held_updates(&template)? {
                    let data = ckpt.stored_payload(h.payload_key.as_deref(), h.payload)?;
                    let delta = tessera_protocol::update::Payload {
                        codec: tessera_protocol::update::Codec::F32,
                        len: (data.len() / 4) as u64,
                        data,
                    }
                    .decode()?;
                    coord.restore_held(
                        h.unit.unit_id,
                        Held {
                            participant: h.participant,
                            unit: h.unit,
                            delta,
                            tokens: h.tokens,
                        },
                        now_ms(),
                    );
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
                let signed = log.checkpoint(0);
                let (_, stored) = ckpt.save(0, &p, &m, None, &signed)?;
                db.create_run(&spec.name, &spec_json, &stored, &signed, now)?;
                tracing::info!("created run {} ({} parameters)", spec.name, p.len());
                Coordinator::new(coord_cfg, 0, p, m, 0, 0)
            }
        };
        let mut coord = coord;
        let version = coord.version();
        let latest = ckpt
            .read_weights(version)
            .context("current version's weights")?;
        // Submissions sign the digest of their base: know it for every version still accepted.
        for v in version.saturating_sub(coord.config().max_staleness)..version {
            if let Some(bytes) = ckpt.read_weights(v) {
                coord.set_digest(v, work::sha256(&bytes));
            }
        }
        coord.set_digest(version, work::sha256(&latest));
        let history = db.val_history()?;
        let (eval_trigger, _) = watch::channel(version);
        let run_info = RunInfo {
            name: spec.name.clone(),
            model: spec.model,
            train: spec.train.clone(),
            num_params: num_params as u64,
            corpus_sha256: spec.corpus_sha256.clone(),
        };
        let corpus = Arc::new(corpus);
        let verifier = Verifier::new(spec.model, spec.train.clone(), corpus.clone());
        let relay = Arc::new(Relay {
            inner: Mutex::new(Inner { coord, log }),
            ckpt,
            db: Mutex::new(db),
            run_info,
            spec,
            corpus,
            corpus_bytes: Arc::new(corpus_text),
            latest: RwLock::new((version, Arc::new(latest))),
            versions: broadcast::channel(64).0,
            eval_trigger,
            history: Mutex::new(history),
            sample: Mutex::new(None),
            metrics: Metrics::default(),
            verifier,
            doorbell: Mutex::new(None),
            price_per_1k: tuning.price_per_1k,
            buffers: Buffers::default(),
            edge_token: crate::edge::token(&secret),
        });
        {
            // A round that filled up before the crash closes now.
            let mut inner = relay.inner.lock().expect("relay lock");
            if let Some(v) = inner.coord.close_round_if_full(now_ms()) {
                relay.persist_version(&mut inner, v)?;
            }
        }
        Ok(relay)
    }

    /// Proves this relay still leads its run (a no-op write; see [`Db::beat`]).
    pub fn beat(&self) -> Result<()> {
        self.db().beat()
    }

    /// Records where edge relays reach this relay while it leads (PostgreSQL).
    pub fn advertise(&self, address: &str) -> Result<()> {
        self.db().advertise(address)
    }

    /// The database (lock order: `inner` before it).
    pub(crate) fn db(&self) -> std::sync::MutexGuard<'_, Db> {
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

    /// The encoded changes from `from` to `to` as a participant fetches them (postcard
    /// [`ModelChange`]), when every link is kept and they are smaller than `to`'s weights.
    pub fn model_change(&self, from: u64, to: u64) -> Option<Vec<u8>> {
        if to <= from || to - from > 64 {
            return None;
        }
        let file = self.weights(to)?;
        let links: Vec<(u64, Payload)> = (from + 1..=to)
            .map(|v| self.ckpt.read_change(v))
            .collect::<Option<_>>()?;
        let header = tessera_core::checkpoint::safetensors_header(&file)
            .ok()?
            .to_vec();
        let change = ModelChange {
            from,
            to,
            links,
            header,
            // The digest the coordinator keeps for recent versions, else hashed here.
            sha256: self
                .lock()
                .coord
                .digest(to)
                .unwrap_or_else(|| work::sha256(&file)),
        };
        let bytes = tessera_protocol::encode(&change);
        (bytes.len() < file.len()).then(|| {
            use std::sync::atomic::Ordering::Relaxed;
            self.metrics.changes_served.fetch_add(1, Relaxed);
            self.metrics
                .change_bytes
                .fetch_add(bytes.len() as u64, Relaxed);
            bytes
        })
    }

    fn persist_version(&self, inner: &mut Inner, version: u64) -> Result<()> {
        let started = std::time::Instant::now();
        let signed = inner.log.checkpoint(version);
        let (bytes, stored) = self.ckpt.save(
            version,
            inner.coord.params(),
            inner.coord.momentum(),
            inner.coord.guard().last_good().map(|g| g.0),
            &signed,
        )?;
        let n = self
            .db()
            .record_version(version, &stored, &signed, now_ms())?;
        Metrics::timed(
            &self.metrics.version_writes,
            &self.metrics.version_write_us,
            started,
        );
        match inner.coord.change(version) {
            Some(c) => self.ckpt.save_change(version, c.offset, &c.payload)?,
            // A version made otherwise (a ban's revision), or one remade after a restart:
            // no change leads to it.
            None => self.ckpt.remove_change(version),
        }
        inner.coord.set_digest(version, work::sha256(&bytes));
        *self.latest.write().expect("latest lock") = (version, Arc::new(bytes));
        tracing::info!(version, updates = n, "model advanced");
        let _ = self.versions.send(version);
        let _ = self.eval_trigger.send(version);
        Ok(())
    }

    /// Writes the version a rollback created and records the rollback.
    fn persist_rollback(&self, inner: &mut Inner, rb: &Rollback) -> Result<()> {
        let version = rb.new_version;
        let signed = inner.log.checkpoint(version);
        let (bytes, stored) = self.ckpt.save(
            version,
            inner.coord.params(),
            inner.coord.momentum(),
            Some(rb.restored_version),
            &signed,
        )?;
        self.ckpt.remove_change(version);
        let discarded = self.db().record_rollback(rb, &stored, &signed)?;
        inner.coord.set_digest(version, work::sha256(&bytes));
        *self.latest.write().expect("latest lock") = (version, Arc::new(bytes));
        tracing::warn!(
            bad_version = rb.bad_version,
            bad_loss = rb.bad_loss,
            threshold = rb.threshold,
            restored = rb.restored_version,
            version,
            discarded,
            "guard: version {} is clearly worse than the recent best; rolled back to version {}",
            rb.bad_version,
            rb.restored_version
        );
        let _ = self.versions.send(version);
        let _ = self.eval_trigger.send(version);
        Ok(())
    }

    /// Who signs the ledger, its latest signed checkpoint, and the leaves granted since.
    pub fn ledger_head(&self) -> Result<serde_json::Value> {
        let (info, size) = {
            let inner = self.lock();
            (inner.log.info.clone(), inner.log.size())
        };
        let latest = self.db().ledger_checkpoint(None)?;
        let signed = latest.as_ref().map_or(0, |c| c.log_size);
        Ok(serde_json::json!({
            "info": info,
            "checkpoint": latest,
            "log_size": size,
            "unsigned": size - signed,
        }))
    }

    /// Signs a revenue statement with the relay's key.
    pub fn sign_statement(&self, st: &mut Statement) {
        self.lock().log.sign_statement(st);
    }

    /// Who signs the ledger.
    pub fn ledger_info(&self) -> LedgerInfo {
        self.lock().log.info.clone()
    }

    /// Leaves `start..end` of the log.
    pub fn ledger_leaves(&self, start: u64, end: Option<u64>) -> Result<Vec<Leaf>> {
        self.db().ledger_leaves(start, end)
    }

    /// The signed checkpoint of `version`.
    pub fn ledger_checkpoint(&self, version: u64) -> Result<Option<Checkpoint>> {
        self.db().ledger_checkpoint(Some(version))
    }

    /// Every signed checkpoint.
    pub fn ledger_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.db().ledger_checkpoints()
    }

    /// The inclusion proof of unit `unit_id`'s leaf in the log of `size` leaves (the latest
    /// signed checkpoint's by default). `Ok(None)` when it is not (yet) in that log.
    pub fn ledger_proof(&self, unit_id: u64, size: Option<u64>) -> Result<Option<Inclusion>> {
        let (index, size) = {
            let mut db = self.db();
            let Some(index) = db.ledger_index(unit_id)? else {
                return Ok(None);
            };
            let size = match size {
                Some(s) => s,
                None => db.ledger_checkpoint(None)?.map_or(0, |c| c.log_size),
            };
            (index, size)
        };
        let Some(proof) = self.lock().log.inclusion(index, size) else {
            return Ok(None);
        };
        let leaf = self
            .db()
            .ledger_leaves(index, Some(index + 1))?
            .pop()
            .context("the leaf of an indexed unit")?;
        Ok(Some(Inclusion {
            index,
            size,
            leaf,
            proof,
        }))
    }

    /// The proof that the log of `old` leaves is a prefix of the log of `new`.
    pub fn ledger_consistency(&self, old: u64, new: u64) -> Option<Vec<Hash>> {
        self.lock().log.consistency(old, new)
    }

    /// Whether `id` is banned.
    pub fn is_banned(&self, id: &str) -> bool {
        self.lock()
            .coord
            .participants()
            .any(|p| p.id == id && p.banned)
    }

    /// One message of a participant, on a connection to this relay or forwarded by an edge
    /// relay, which passes along who the participant is (its hello, checked at the edge) with
    /// every call. A participant this relay does not count as connected (it reached the run
    /// through another edge, or joined before this relay took the lead) is joined first.
    /// Blocking: a submission is decoded, checked and committed here.
    pub fn call(&self, caller: &Caller, op: Op) -> Result<ServerMsg> {
        let id = identity::short_id(&caller.public_key);
        let join = |r: &Self| {
            r.join(
                &id,
                &caller.public_key,
                caller.kind,
                &caller.backend,
                &caller.device,
                caller.tokens_per_s,
            )
        };
        let banned = || ServerMsg::Error {
            message: BANNED.into(),
        };
        match op {
            Op::Join => {
                let version = join(self)?;
                if self.is_banned(&id) {
                    return Ok(banned());
                }
                return Ok(ServerMsg::Welcome {
                    participant_id: id,
                    run: self.run_info.clone(),
                    model_version: version,
                });
            }
            Op::Disconnect => {
                self.disconnect(&id);
                return Ok(ServerMsg::HeartbeatAck);
            }
            Op::Leave => {
                self.leave(&id)?;
                return Ok(ServerMsg::HeartbeatAck);
            }
            _ => {}
        }
        if !self.is_connected(&id) {
            join(self)?;
        }
        Ok(match op {
            Op::RequestWork => self.request_work(&id)?,
            Op::Heartbeat => {
                self.heartbeat(&id);
                ServerMsg::HeartbeatAck
            }
            Op::Submit(s) => {
                self.metrics.update_bytes.fetch_add(
                    s.payload.data.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.submit(&id, &caller.public_key, s)?
            }
            Op::RequestVerification => self.request_verification(&id),
            Op::SubmitVerification(s) => {
                self.metrics.update_bytes.fetch_add(
                    s.payload.data.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.submit_verification(&id, &caller.public_key, s)?
            }
            Op::Join | Op::Disconnect | Op::Leave => unreachable!("answered above"),
        })
    }

    /// Whether the coordinator counts `id` as connected.
    pub fn is_connected(&self, id: &str) -> bool {
        self.lock()
            .coord
            .participants()
            .any(|p| p.id == id && p.connected)
    }

    /// A participant proved its key.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &self,
        id: &str,
        public_key: &[u8],
        kind: ParticipantKind,
        backend: &str,
        device: &str,
        tokens_per_s: f32,
    ) -> Result<u64> {
        let mut inner = self.inner.lock().expect("relay lock");
        let now = now_ms();
        inner
            .coord
            .join(id, kind, backend, device, tokens_per_s, now);
        let stats = inner
            .coord
            .participants()
            .find(|p| p.id == id)
            .cloned()
            .expect("just joined");
        self.db().upsert_participant(&stats, public_key, now)?;
        Ok(inner.coord.version())
    }

    /// A participant asks for work: a unit, or when to ask again.
    pub fn request_work(&self, id: &str) -> Result<ServerMsg> {
        let mut inner = self.inner.lock().expect("relay lock");
        Ok(match inner.coord.request_work(id, now_ms()) {
            Work::Unit(u) => {
                let (next_unit, next_shard) = inner.coord.counters();
                self.db().put_lease(id, &u, next_unit, next_shard)?;
                ServerMsg::Work(u)
            }
            Work::Wait(retry_ms) => ServerMsg::NoWork { retry_ms },
            Work::Finished | Work::Unknown => ServerMsg::NoWork { retry_ms: 2_000 },
            Work::Banned => ServerMsg::Error {
                message: BANNED.into(),
            },
        })
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
        let msg =
            identity::update_message(s.unit_id, s.base_version, &s.base_sha256, &s.payload.data);
        let mut delta = self.buffers.take();
        let decoded = match identity::verify(public_key, &msg, &s.signature) {
            Err(e) => Err(Rejection {
                reason: RejectReason::BadSignature,
                detail: e.to_string(),
            }),
            Ok(()) => s.payload.decode_into(delta.get()).map_err(|e| Rejection {
                reason: RejectReason::Malformed,
                detail: e.to_string(),
            }),
        };
        if let Err(r) = decoded {
            return self.rejected(&mut self.lock(), id, s.unit_id, r);
        }
        let measured = Measured::of(&delta, work::sha256(&s.payload.data));
        // The structural and cheap checks, under the lock.
        let unit = {
            let mut inner = self.lock();
            match self.checked(&inner, id, &s, &delta, &measured) {
                Ok((_, unit, _)) => unit,
                Err(r) => return self.rejected(&mut inner, id, s.unit_id, r),
            }
        };
        // The loss probe, outside it (forward passes on the relay's CPU).
        let probe = if self.screening() {
            let base = self.verifier.base(&self.ckpt, unit.base_version)?;
            let steps = [
                random_below(unit.inner_steps),
                random_below(unit.inner_steps),
            ];
            Some(self.verifier.probe(&unit, &base, &delta, steps)?)
        } else {
            None
        };
        // The relay keeps what it folds, the decoded values, as f32 LE (a replay needs no
        // codec): on a little-endian machine, the decoded values' own bytes. With an object
        // store they go there first (content-addressed, outside the lock; an update refused
        // below leaves an unreferenced object) and its row holds their key.
        let stored: std::borrow::Cow<[u8]> = match s.payload.codec {
            Codec::F32 => std::borrow::Cow::Borrowed(&s.payload.data),
            _ if cfg!(target_endian = "little") => {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice(&delta))
            }
            _ => std::borrow::Cow::Owned(delta.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        let payload_key = self.ckpt.put_blob(&stored)?;
        let mut inner = self.lock();
        let mut anomaly = match probe.as_ref().map(|p| inner.coord.judge_probe(p)) {
            Some(Err(r)) => return self.rejected(&mut inner, id, s.unit_id, r),
            Some(Ok(a)) => a,
            None => None,
        };
        // Again: the lease may have expired, or a copy arrived, while the probe ran.
        let verdict = match self.checked(&inner, id, &s, &delta, &measured) {
            Ok((v, _, a)) => {
                anomaly = anomaly.or(a);
                v
            }
            Err(r) => return self.rejected(&mut inner, id, s.unit_id, r),
        };
        if let Some(a) = &anomaly {
            tracing::info!(
                participant = id,
                unit = s.unit_id,
                "held for re-execution: {a}"
            );
        }
        let scrutiny = inner.coord.scrutiny(id, random_unit(), anomaly.is_some());
        let hold = scrutiny == Scrutiny::Hold;
        let now = now_ms();
        let commit = std::time::Instant::now();
        self.db().record_accepted(&UpdateRecord {
            unit: &unit,
            unit_id: s.unit_id,
            participant: id,
            base_version: s.base_version,
            verdict,
            loss_before: s.loss_before,
            loss_after: s.loss_after,
            received_ms: now,
            payload: &stored,
            payload_key: payload_key.as_deref(),
            sha256: measured.sha256,
            base_sha256: s.base_sha256,
            signature: &s.signature,
            probe: probe.map(|p| (p.own_gain(), p.held_gain())),
            held: hold,
        })?;
        Metrics::timed(
            &self.metrics.update_commits,
            &self.metrics.update_commit_us,
            commit,
        );
        let accepted =
            inner
                .coord
                .accept(id, s.unit_id, &delta, verdict, Some(&measured), hold, now);
        if scrutiny != Scrutiny::None {
            inner
                .coord
                .queue_check(id, unit, Arc::new(delta.keep()), verdict.tokens, now);
            self.ring();
        }
        if let Some(v) = accepted.closed {
            self.persist_version(&mut inner, v)?;
        }
        self.persist_ledger(&mut inner)?;
        let receipt = inner.log.receipt(
            *public_key,
            s.unit_id,
            s.base_version,
            measured.sha256,
            verdict.tokens,
            now,
        );
        Ok(ServerMsg::Accepted {
            unit_id: s.unit_id,
            model_version: inner.coord.version(),
            receipt,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("relay lock")
    }

    fn screening(&self) -> bool {
        self.lock().coord.config().screen.enabled
    }

    /// The coordinator's structural checks and cheap checks: the verdict, the leased unit and
    /// an anomaly, if any.
    fn checked(
        &self,
        inner: &Inner,
        id: &str,
        s: &Submission,
        delta: &[f32],
        measured: &Measured,
    ) -> std::result::Result<(Verdict, WorkUnit, Option<String>), Rejection> {
        let v = inner.coord.check(
            id,
            s.unit_id,
            s.base_version,
            &s.base_sha256,
            delta,
            s.tokens,
        )?;
        let unit = inner
            .coord
            .lease(s.unit_id)
            .map(|l| l.unit.clone())
            .ok_or_else(|| Rejection {
                reason: RejectReason::UnknownLease,
                detail: format!("unit {} is not leased", s.unit_id),
            })?;
        if s.payload.codec != unit.codec {
            return Err(Rejection {
                reason: RejectReason::Malformed,
                detail: format!(
                    "unit {} asks for updates encoded as {}, this one is {}",
                    s.unit_id,
                    unit.codec.name(),
                    s.payload.codec.name()
                ),
            });
        }
        let anomaly = inner.coord.screen(id, s.unit_id, measured)?;
        Ok((v, unit, anomaly))
    }

    /// Records a rejection and answers it.
    fn rejected(
        &self,
        inner: &mut Inner,
        id: &str,
        unit_id: u64,
        r: Rejection,
    ) -> Result<ServerMsg> {
        inner
            .coord
            .record_rejection_detail(id, unit_id, r.reason, &r.detail, now_ms());
        self.db()
            .record_rejected(id, &format!("{:?}: {}", r.reason, r.detail))?;
        tracing::info!(participant = id, unit = unit_id, reason = ?r.reason, "rejected: {}", r.detail);
        Ok(ServerMsg::Rejected {
            unit_id,
            reason: r.reason,
            detail: r.detail,
        })
    }

    /// Persists the coordinator's credit changes.
    fn persist_ledger(&self, inner: &mut Inner) -> Result<()> {
        let changes = inner.coord.take_ledger_changes();
        for c in &changes {
            if let LedgerChange::Banned {
                participant,
                tokens,
                reverted,
                detail,
                ..
            } = c
            {
                tracing::warn!(
                    participant,
                    forfeited = tokens,
                    reverted = reverted.len(),
                    "banned: a re-execution disagreed ({detail}); its updates still pending credit are taken out of the model"
                );
            }
        }
        let version = inner.coord.version();
        let leaves = self.db().apply_ledger(&changes, &self.spec.name, version)?;
        inner.log.append(&leaves);
        Ok(())
    }

    fn ring(&self) {
        if let Some(tx) = self.doorbell.lock().expect("doorbell lock").as_ref() {
            tx.send(()).ok();
        }
    }

    /// Starts the thread that re-executes the checks the coordinator leaves to the relay (all
    /// of them when no verifier is connected; disputes and spot checks of verifiers; checks a
    /// verifier left waiting), one at a time.
    pub fn start_verifier(self: &Arc<Self>) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        *self.doorbell.lock().expect("doorbell lock") = Some(tx);
        let me = self.clone();
        std::thread::Builder::new()
            .name("reexecute".into())
            .spawn(move || {
                loop {
                    let job = me.lock().coord.relay_check(now_ms());
                    match job {
                        Some(job) => {
                            if let Err(e) = me.reexecute(&job) {
                                // A soft failure: that unit is dropped (its credit only), the
                                // round does not wait for it forever.
                                tracing::error!(
                                    unit = job.unit.unit_id,
                                    "re-execution failed, dropping the unit: {e:#}"
                                );
                                let mut inner = me.lock();
                                let closed = inner.coord.drop_held(job.unit.unit_id, now_ms());
                                if let Err(e) = me.settled(&mut inner, closed) {
                                    tracing::error!("persisting a dropped unit: {e:#}");
                                }
                            }
                        }
                        None => match rx.recv_timeout(std::time::Duration::from_millis(250)) {
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                            _ => continue,
                        },
                    }
                }
            })?;
        Ok(())
    }

    /// Re-trains a unit the relay checks itself and lets the coordinator judge.
    fn reexecute(&self, job: &RelayCheck) -> Result<()> {
        let unit_id = job.unit.unit_id;
        let outcome = match self.verifier.base(&self.ckpt, job.unit.base_version) {
            Ok(base) => {
                let reference =
                    work::as_sent(job.unit.codec, self.verifier.reexecute(&job.unit, &base)?)?;
                let cfg = self.lock().coord.config().screen;
                let (cos, rel, ok) = screen::compare(&cfg, &job.delta, &reference);
                Some((
                    ok,
                    format!(
                        "unit {unit_id} re-executed by the relay: cosine {cos:.6}, norm differs by {:.3}%",
                        100.0 * rel
                    ),
                ))
            }
            Err(e) => {
                tracing::warn!(unit_id, "cannot re-execute, dropping the update: {e:#}");
                None
            }
        };
        let mut inner = self.lock();
        let closed = match &outcome {
            Some((ok, detail)) => {
                tracing::info!(participant = job.participant, ok, "{detail}");
                inner.coord.relay_result(unit_id, *ok, detail, now_ms())
            }
            None => inner.coord.drop_held(unit_id, now_ms()),
        };
        self.settled(&mut inner, closed)
    }

    /// Persists what a verdict changed: the ledger first (a verified update is out of hold
    /// before the version it closed records what it folded), then the version, then what
    /// closing it granted.
    fn settled(&self, inner: &mut Inner, closed: Option<u64>) -> Result<()> {
        self.persist_ledger(inner)?;
        if let Some(v) = closed {
            self.persist_version(inner, v)?;
        }
        self.persist_ledger(inner)
    }

    /// A verifier asks for a unit to re-execute.
    pub fn request_verification(&self, id: &str) -> ServerMsg {
        if self.is_banned(id) {
            return ServerMsg::Error {
                message: BANNED.into(),
            };
        }
        match self.lock().coord.verification_for(id, now_ms()) {
            Some(unit) => ServerMsg::Verify(unit),
            None => ServerMsg::NoWork { retry_ms: 0 },
        }
    }

    /// A verifier's re-execution: checked like a submission (signature, payload, the base
    /// digest against the version as this relay serves it), compared with what the unit's
    /// participant submitted, and judged by the coordinator.
    pub fn submit_verification(
        &self,
        id: &str,
        public_key: &[u8; 32],
        s: Submission,
    ) -> Result<ServerMsg> {
        let refused = |r: Rejection| ServerMsg::Rejected {
            unit_id: s.unit_id,
            reason: r.reason,
            detail: r.detail,
        };
        let msg = identity::verification_message(
            s.unit_id,
            s.base_version,
            &s.base_sha256,
            &s.payload.data,
        );
        if let Err(e) = identity::verify(public_key, &msg, &s.signature) {
            return Ok(refused(Rejection {
                reason: RejectReason::BadSignature,
                detail: e.to_string(),
            }));
        }
        let (unit, submitted, cfg, kept_digest) = {
            let inner = self.lock();
            match inner.coord.check_of(id, s.unit_id) {
                Ok((u, d)) => {
                    let digest = inner.coord.digest(u.base_version);
                    (u, d, inner.coord.config().screen, digest)
                }
                Err(r) => return Ok(refused(r)),
            }
        };
        let reference = s.payload.decode().ok().filter(|d| {
            d.len() == submitted.len()
                && d.iter().all(|x| x.is_finite())
                && s.base_version == unit.base_version
        });
        let Some(reference) = reference else {
            return Ok(refused(Rejection {
                reason: RejectReason::Malformed,
                detail: format!(
                    "the re-execution of unit {} does not decode to {} finite values from version {}",
                    s.unit_id,
                    submitted.len(),
                    unit.base_version
                ),
            }));
        };
        // A result trained from other weights than the unit's base says nothing about the
        // submission: refused (not a disagreement, which could get an honest verifier with a
        // corrupted download banned), and the check goes back to the queue.
        let served = kept_digest.or_else(|| {
            self.weights(unit.base_version)
                .map(|bytes| work::sha256(&bytes))
        });
        if served != Some(s.base_sha256) {
            self.lock().coord.return_check(id);
            return Ok(refused(Rejection {
                reason: RejectReason::BaseMismatch,
                detail: match served {
                    Some(_) => format!(
                        "the re-execution of unit {} signs a base digest that is not version {}'s",
                        s.unit_id, unit.base_version
                    ),
                    None => format!("version {} is not kept any more", unit.base_version),
                },
            }));
        }
        let (cos, rel, agrees) = screen::compare(&cfg, &submitted, &reference);
        let detail = format!(
            "unit {} re-executed by verifier {id}: cosine {cos:.6}, norm differs by {:.3}%",
            s.unit_id,
            100.0 * rel
        );
        tracing::info!(verifier = id, agrees, "{detail}");
        let mut inner = self.lock();
        let closed = match inner.coord.verifier_result(
            id,
            s.unit_id,
            agrees,
            &detail,
            random_unit(),
            now_ms(),
        ) {
            Ok(c) => c,
            Err(r) => return Ok(refused(r)),
        };
        self.settled(&mut inner, closed)?;
        drop(inner);
        self.ring();
        Ok(ServerMsg::VerificationReceived { unit_id: s.unit_id })
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
        let now = now_ms();
        let (accepted, rejected, tokens) = inner.coord.totals();
        let history = self.history.lock().expect("history lock").clone();
        let guard = inner.coord.guard();
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
            sample: self
                .sample
                .lock()
                .expect("sample lock")
                .as_ref()
                .map(|(v, text)| Sample {
                    model_version: *v,
                    text: text.clone(),
                }),
            leases: inner
                .coord
                .leases()
                .map(|l| LeaseInfo {
                    unit_id: l.unit.unit_id,
                    participant: l.participant.clone(),
                    base_version: l.unit.base_version,
                    deadline_ms: l.unit.deadline_ms,
                    fragment_offset: l.unit.fragment.offset,
                })
                .collect(),
            participants: inner.coord.participants().cloned().collect(),
            round: RoundInfo {
                updates: inner.coord.round_updates(),
                target: inner.coord.round_target(now),
                active_participants: inner.coord.active_participants(now),
            },
            tokens_applied: inner.coord.tokens_applied(),
            outer_lr: inner.coord.outer_lr(),
            codec: inner.coord.config().codec.name(),
            version_codec: inner.coord.config().version_codec.map(Codec::name),
            fragments: inner
                .coord
                .fragments()
                .into_iter()
                .map(|(r, outer_steps)| FragmentInfo {
                    offset: r.start,
                    len: r.len(),
                    outer_steps,
                })
                .collect(),
            guard: GuardInfo {
                enabled: guard.config().enabled,
                threshold: guard.threshold(),
                last_good_version: guard.last_good().map(|g| g.0),
                rollbacks: guard.rollbacks().to_vec(),
            },
            verification: {
                use std::sync::atomic::Ordering::Relaxed;
                let c = &self.verifier.cost;
                let revertible = inner.coord.revertible();
                VerificationInfo {
                    enabled: inner.coord.config().screen.enabled,
                    rejections: inner.coord.rejections().clone(),
                    held: inner.coord.held().count(),
                    clipped: inner.coord.clipped_total(),
                    probes: c.probes.load(Relaxed),
                    probe_seconds: c.probe_us.load(Relaxed) as f64 / 1e6,
                    reexecutions: c.reexecutions.load(Relaxed),
                    reexecute_seconds: c.reexecute_us.load(Relaxed) as f64 / 1e6,
                    reexecuted_tokens: c.reexecuted_tokens.load(Relaxed),
                    banned: inner.coord.participants().filter(|p| p.banned).count(),
                    checks_pending: inner.coord.checks_pending(),
                    verifier_checks: inner.coord.participants().map(|p| p.verifications).sum(),
                    reverted: inner.coord.reverted_total(),
                    revertible: revertible.0,
                    revertible_mib: revertible.1 as f64 / (1 << 20) as f64,
                    revertible_dropped: revertible.2,
                    rechecked: inner.coord.rechecks().0,
                    recheck_dropped: inner.coord.rechecks().1,
                }
            },
            ledger: LedgerStatus {
                relay_key: hex::encode(inner.log.info.relay_key),
                leaves: inner.log.size(),
                credit: inner.log.credit(),
                checkpoint_version: inner.log.signed().map(|s| s.0),
                checkpoint_leaves: inner.log.signed().map_or(0, |s| s.1),
            },
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
                    me.eval(&params.1, eval_iters, params.0)
                        .map(|(l, text)| (params.0, l, text))
                })
                .await;
                match res {
                    Ok(Ok((v, loss, text))) => {
                        tracing::info!(version = v, val_loss = loss, "evaluated");
                        let mut inner = self.inner.lock().expect("relay lock");
                        if let Err(e) = self.db().set_val_loss(v, loss) {
                            tracing::warn!("storing val loss: {e:#}");
                        }
                        if let Some(restore) = inner.coord.evaluated(v, loss)
                            && let Err(e) = self.roll_back(&mut inner, restore, (v, loss))
                        {
                            tracing::error!("rolling back to version {restore}: {e:#}");
                        }
                        drop(inner);
                        let mut h = self.history.lock().expect("history lock");
                        if h.last().is_none_or(|l| l.0 < v) {
                            h.push((v, loss));
                        }
                        *self.sample.lock().expect("sample lock") = Some((v, text));
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

    /// Restores version `restore` as a new version (the guard found `bad` clearly worse).
    fn roll_back(&self, inner: &mut Inner, restore: u64, bad: (u64, f32)) -> Result<()> {
        // A relay that took over the run may have only recent versions on its disk.
        if let Some(stored) = self.db().version_checkpoint(restore)? {
            self.ckpt.restore(restore, &stored)?;
        }
        let (params, _) = self
            .ckpt
            .load(restore)
            .with_context(|| format!("loading version {restore} to roll back to"))?;
        let rb = inner.coord.roll_back(restore, params, bad, now_ms());
        self.persist_rollback(inner, &rb)
    }

    /// Validation loss of `weights`, and a sample of text they generate (seeded by the version).
    fn eval(&self, weights: &[f32], eval_iters: usize, version: u64) -> Result<(f32, String)> {
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
        let tokens = generate(&model, &[], SAMPLE_TOKENS, 0.8, version, &device);
        Ok((v[0], tokenizer::decode(&tokens[1..])))
    }
}
