//! The SQLite ledger: the run, model versions, leases, participants and accepted updates.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use tessera_coordinator::{Lease, LedgerChange, ParticipantStats, Rollback, Verdict};
use tessera_protocol::ledger::{CREDIT_FORMULA, Checkpoint, Leaf};
use tessera_protocol::messages::WorkUnit;
use tessera_protocol::update::Fragment;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    config_json TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    updates INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    val_loss REAL,
    kind TEXT NOT NULL DEFAULT 'round'
);
CREATE TABLE IF NOT EXISTS rollbacks (
    new_version INTEGER PRIMARY KEY,
    bad_version INTEGER NOT NULL,
    bad_loss REAL NOT NULL,
    restored_version INTEGER NOT NULL,
    restored_loss REAL NOT NULL,
    threshold REAL NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS participants (
    id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    device TEXT NOT NULL,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    granted INTEGER NOT NULL DEFAULT 0,
    forfeited INTEGER NOT NULL DEFAULT 0,
    verified INTEGER NOT NULL DEFAULT 0,
    verifications INTEGER NOT NULL DEFAULT 0,
    banned INTEGER NOT NULL DEFAULT 0,
    last_rejection TEXT,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    unit_id INTEGER PRIMARY KEY,
    participant TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    inner_steps INTEGER NOT NULL,
    warmup_steps INTEGER NOT NULL,
    lr REAL NOT NULL,
    -- the unit's fragment: first parameter and length (-1: to the end)
    frag_offset INTEGER NOT NULL DEFAULT 0,
    frag_len INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unit_id INTEGER NOT NULL,
    participant TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    weight REAL NOT NULL,
    loss_before REAL NOT NULL,
    loss_after REAL NOT NULL,
    received_ms INTEGER NOT NULL,
    applied_version INTEGER,
    outcome TEXT,
    shard INTEGER NOT NULL,
    inner_steps INTEGER NOT NULL,
    warmup_steps INTEGER NOT NULL,
    lr REAL NOT NULL,
    sha256 BLOB NOT NULL,
    own_gain REAL,
    held_gain REAL,
    -- 0: in the model or the open round; 1: held for its re-execution; 2: dropped (failed)
    held INTEGER NOT NULL DEFAULT 0,
    -- re-execution: NULL not done, 1 agreed, 0 disagreed
    verified INTEGER,
    -- pending, granted or forfeited
    credit TEXT NOT NULL DEFAULT 'pending',
    payload BLOB,
    -- what the participant signed: the base's digest, and its signature
    base_sha256 BLOB,
    signature BLOB,
    frag_offset INTEGER NOT NULL DEFAULT 0,
    frag_len INTEGER NOT NULL DEFAULT -1
);
-- The contribution log: one leaf per granted unit, in grant order (see tessera_protocol::ledger).
CREATE TABLE IF NOT EXISTS ledger (
    idx INTEGER PRIMARY KEY,
    unit_id INTEGER NOT NULL UNIQUE,
    leaf TEXT NOT NULL
);
-- Keys of the completions API (only their SHA-256 is kept) and what each request used.
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_sha256 BLOB NOT NULL UNIQUE,
    quota INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
-- The relay's signed checkpoint of the log for each version.
CREATE TABLE IF NOT EXISTS ledger_checkpoints (
    version INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS verifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unit_id INTEGER NOT NULL,
    participant TEXT NOT NULL,
    verifier TEXT NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

fn insert_checkpoint(tx: &rusqlite::Transaction<'_>, c: &Checkpoint) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO ledger_checkpoints (version, checkpoint) VALUES (?1, ?2)",
        params![c.version as i64, serde_json::to_string(c)?],
    )?;
    Ok(())
}

/// The leaf of a unit being granted, from its accepted update and its participant's key.
fn grant_leaf(
    tx: &rusqlite::Transaction<'_>,
    run: &str,
    version: u64,
    participant: &str,
    unit_id: u64,
    tokens: u64,
) -> Result<Leaf> {
    let blob32 =
        |b: Option<Vec<u8>>| -> [u8; 32] { b.and_then(|b| b.try_into().ok()).unwrap_or([0; 32]) };
    tx.query_row(
        "SELECT u.applied_version, u.base_version, u.base_sha256, u.sha256, u.signature, p.public_key
         FROM updates u JOIN participants p ON p.id = u.participant
         WHERE u.unit_id = ?1 AND u.participant = ?2",
        params![unit_id as i64, participant],
        |r| {
            Ok(Leaf {
                run: run.to_string(),
                version: r.get::<_, Option<i64>>(0)?.map_or(version, |v| v as u64),
                participant: blob32(r.get(5)?),
                unit_id,
                base_version: r.get::<_, i64>(1)? as u64,
                base_sha256: blob32(r.get(2)?),
                update_sha256: blob32(r.get(3)?),
                tokens,
                credit: tokens,
                formula: CREDIT_FORMULA,
                signature: r.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default(),
            })
        },
    )
    .with_context(|| format!("the accepted update of unit {unit_id} being granted"))
}

/// A fragment as two SQL integers: its offset and its length (-1: the rest of the vector).
fn fragment_columns(f: &Fragment) -> (i64, i64) {
    let len = if f.len == u64::MAX { -1 } else { f.len as i64 };
    (f.offset as i64, len)
}

/// The fragment stored by [`fragment_columns`].
fn fragment_from(offset: i64, len: i64) -> Fragment {
    Fragment {
        offset: offset as u64,
        len: if len < 0 { u64::MAX } else { len as u64 },
    }
}

/// An accepted update not yet folded into a version.
pub struct PendingUpdate {
    /// The unit.
    pub unit_id: u64,
    /// The fragment it covers.
    pub fragment: Fragment,
    /// Its participant.
    pub participant: String,
    /// Its verdict (weight, tokens, staleness).
    pub verdict: Verdict,
    /// The pseudo-gradient, f32 little-endian.
    pub payload: Vec<u8>,
    /// When it arrived.
    pub received_ms: u64,
}

/// What an accepted update records.
pub struct UpdateRecord<'a> {
    /// The unit as leased.
    pub unit: &'a WorkUnit,
    /// The unit.
    pub unit_id: u64,
    /// Its participant.
    pub participant: &'a str,
    /// The version it started from.
    pub base_version: u64,
    /// Verdict it was accepted with.
    pub verdict: Verdict,
    /// Loss of its first inner step.
    pub loss_before: f32,
    /// Loss of its last inner step.
    pub loss_after: f32,
    /// When it arrived.
    pub received_ms: u64,
    /// The pseudo-gradient, f32 little-endian.
    pub payload: &'a [u8],
    /// SHA-256 of the payload.
    pub sha256: [u8; 32],
    /// SHA-256 of the base weights, as signed.
    pub base_sha256: [u8; 32],
    /// The participant's signature of the update.
    pub signature: &'a [u8],
    /// The probe's relative gains (own batches, held-out batches).
    pub probe: Option<(f64, f64)>,
    /// Held out of the model until its re-execution agrees.
    pub held: bool,
}

/// An update held for its re-execution, as stored.
pub struct HeldUpdate {
    /// Its participant.
    pub participant: String,
    /// The unit as leased.
    pub unit: WorkUnit,
    /// Tokens credited.
    pub tokens: u64,
    /// The pseudo-gradient, f32 little-endian.
    pub payload: Vec<u8>,
}

/// The database.
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        // Databases of earlier relays lack the newer columns.
        for (table, column, ty) in [
            (
                "participants",
                "verifications",
                "INTEGER NOT NULL DEFAULT 0",
            ),
            ("updates", "base_sha256", "BLOB"),
            ("updates", "signature", "BLOB"),
            ("updates", "frag_offset", "INTEGER NOT NULL DEFAULT 0"),
            ("updates", "frag_len", "INTEGER NOT NULL DEFAULT -1"),
            ("leases", "frag_offset", "INTEGER NOT NULL DEFAULT 0"),
            ("leases", "frag_len", "INTEGER NOT NULL DEFAULT -1"),
        ] {
            let has: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
                ))?
                .exists([])?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
            }
        }
        Ok(Db { conn })
    }

    /// The stored run configuration, if the run exists.
    pub fn run_config(&self) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT config_json FROM run WHERE id = 1", [], |r| r.get(0))
            .optional()?)
    }

    /// Creates the run with its version 0.
    pub fn create_run(
        &mut self,
        name: &str,
        config_json: &str,
        checkpoint: &str,
        signed: &Checkpoint,
        now: u64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO run (id, name, config_json, created_ms) VALUES (1, ?1, ?2, ?3)",
            params![name, config_json, now as i64],
        )?;
        tx.execute(
            "INSERT INTO versions (version, checkpoint, updates, created_ms) VALUES (0, ?1, 0, ?2)",
            params![checkpoint, now as i64],
        )?;
        insert_checkpoint(&tx, signed)?;
        tx.commit()?;
        Ok(())
    }

    /// The latest recorded version.
    pub fn latest_version(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT MAX(version) FROM versions", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// Validation-loss history: `(version, val_loss)`.
    pub fn val_history(&self) -> Result<Vec<(u64, f32)>> {
        let mut st = self.conn.prepare(
            "SELECT version, val_loss FROM versions WHERE val_loss IS NOT NULL ORDER BY version",
        )?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, f64>(1)? as f32))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a version's validation loss.
    pub fn set_val_loss(&self, version: u64, loss: f32) -> Result<()> {
        self.conn.execute(
            "UPDATE versions SET val_loss = ?1 WHERE version = ?2",
            params![loss as f64, version as i64],
        )?;
        Ok(())
    }

    /// A counter's value (0 if unset).
    pub fn counter(&self, key: &str) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT value FROM counters WHERE key = ?1", [key], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .unwrap_or(0) as u64)
    }

    /// Inserts or refreshes a participant.
    pub fn upsert_participant(
        &self,
        p: &ParticipantStats,
        public_key: &[u8],
        now: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO participants (id, public_key, kind, backend, device, first_seen_ms, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT(id) DO UPDATE SET kind = ?3, backend = ?4, device = ?5, last_seen_ms = ?6",
            params![p.id, public_key, p.kind, p.backend, p.device, now as i64],
        )?;
        Ok(())
    }

    /// Every participant's ledger entry.
    pub fn participants(&self) -> Result<Vec<ParticipantStats>> {
        let mut st = self.conn.prepare("SELECT id, kind, backend, device, accepted, rejected, tokens, last_seen_ms, granted, forfeited, verified, banned, last_rejection, verifications FROM participants")?;
        let rows = st.query_map([], |r| {
            let kind: String = r.get(1)?;
            Ok(ParticipantStats {
                id: r.get(0)?,
                kind: if kind == "browser" {
                    "browser"
                } else {
                    "native"
                },
                backend: r.get(2)?,
                device: r.get(3)?,
                accepted_updates: r.get::<_, i64>(4)? as u64,
                rejected_updates: r.get::<_, i64>(5)? as u64,
                tokens_trained: r.get::<_, i64>(6)? as u64,
                connected: false,
                last_seen_ms: r.get::<_, i64>(7)? as u64,
                tokens_per_s: 0.0,
                unit_steps: 0,
                tokens_pending: (r.get::<_, i64>(6)? - r.get::<_, i64>(8)? - r.get::<_, i64>(9)?)
                    .max(0) as u64,
                tokens_granted: r.get::<_, i64>(8)? as u64,
                tokens_forfeited: r.get::<_, i64>(9)? as u64,
                verified_units: r.get::<_, i64>(10)? as u64,
                banned: r.get::<_, i64>(11)? != 0,
                last_rejection: r.get(12)?,
                verifications: r.get::<_, i64>(13)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a lease and the counters it advanced.
    pub fn put_lease(
        &mut self,
        participant: &str,
        unit: &WorkUnit,
        next_unit: u64,
        next_shard: u64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO leases (unit_id, participant, base_version, shard, deadline_ms, inner_steps, warmup_steps, lr, frag_offset, frag_len) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![unit.unit_id as i64, participant, unit.base_version as i64, unit.shard as i64, unit.deadline_ms as i64, unit.inner_steps as i64, unit.warmup_steps as i64, unit.lr, fragment_columns(&unit.fragment).0, fragment_columns(&unit.fragment).1],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO counters (key, value) VALUES ('next_unit', ?1)",
            [next_unit as i64],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO counters (key, value) VALUES ('next_shard', ?1)",
            [next_shard as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets leases.
    pub fn delete_leases(&self, unit_ids: &[u64]) -> Result<()> {
        for u in unit_ids {
            self.conn
                .execute("DELETE FROM leases WHERE unit_id = ?1", [*u as i64])?;
        }
        Ok(())
    }

    /// Every stored lease, as the coordinator holds them. `template` supplies the per-run fields.
    pub fn leases(&self, template: &WorkUnit) -> Result<Vec<Lease>> {
        let mut st = self
            .conn
            .prepare("SELECT unit_id, participant, base_version, shard, deadline_ms, inner_steps, warmup_steps, lr, frag_offset, frag_len FROM leases")?;
        let rows = st.query_map([], |r| {
            Ok(Lease {
                participant: r.get(1)?,
                leased_ms: 0,
                unit: WorkUnit {
                    unit_id: r.get::<_, i64>(0)? as u64,
                    base_version: r.get::<_, i64>(2)? as u64,
                    shard: r.get::<_, i64>(3)? as u64,
                    deadline_ms: r.get::<_, i64>(4)? as u64,
                    inner_steps: r.get::<_, i64>(5)? as u32,
                    warmup_steps: r.get::<_, i64>(6)? as u32,
                    lr: r.get(7)?,
                    fragment: fragment_from(r.get(8)?, r.get(9)?),
                    ..template.clone()
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Durably records an accepted update, its participant's ledger and the end of its lease,
    /// in one transaction.
    pub fn record_accepted(&mut self, u: &UpdateRecord<'_>) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO updates (unit_id, participant, base_version, staleness, tokens, weight, loss_before, loss_after, received_ms, payload,
                shard, inner_steps, warmup_steps, lr, sha256, own_gain, held_gain, held, base_sha256, signature, frag_offset, frag_len)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
            params![
                u.unit_id as i64,
                u.participant,
                u.base_version as i64,
                u.verdict.staleness as i64,
                u.verdict.tokens as i64,
                u.verdict.weight as f64,
                u.loss_before as f64,
                u.loss_after as f64,
                u.received_ms as i64,
                u.payload,
                u.unit.shard as i64,
                u.unit.inner_steps as i64,
                u.unit.warmup_steps as i64,
                u.unit.lr,
                u.sha256.as_slice(),
                u.probe.map(|p| p.0),
                u.probe.map(|p| p.1),
                u.held as i64,
                u.base_sha256.as_slice(),
                u.signature,
                fragment_columns(&u.unit.fragment).0,
                fragment_columns(&u.unit.fragment).1
            ],
        )?;
        tx.execute(
            "UPDATE participants SET accepted = accepted + 1, tokens = tokens + ?2, last_seen_ms = ?3 WHERE id = ?1",
            params![u.participant, u.verdict.tokens as i64, u.received_ms as i64],
        )?;
        tx.execute("DELETE FROM leases WHERE unit_id = ?1", [u.unit_id as i64])?;
        tx.commit()?;
        Ok(())
    }

    /// Counts a rejection against a participant.
    pub fn record_rejected(&self, participant: &str, reason: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE participants SET rejected = rejected + 1, last_rejection = ?2 WHERE id = ?1",
            params![participant, reason],
        )?;
        Ok(())
    }

    /// Persists the coordinator's changes to the credit ledger, in one transaction; a grant
    /// appends its leaf to the contribution log (of run `run`; `version` is the current one, for
    /// a unit granted before it was recorded as folded). Returns the leaves appended.
    pub fn apply_ledger(
        &mut self,
        changes: &[LedgerChange],
        run: &str,
        version: u64,
    ) -> Result<Vec<Leaf>> {
        let mut leaves = Vec::new();
        if changes.is_empty() {
            return Ok(leaves);
        }
        let tx = self.conn.transaction()?;
        for c in changes {
            match c {
                LedgerChange::Granted {
                    participant,
                    unit_id,
                    tokens,
                } => {
                    tx.execute(
                        "UPDATE updates SET credit = 'granted' WHERE unit_id = ?1 AND participant = ?2 AND credit = 'pending'",
                        params![*unit_id as i64, participant],
                    )?;
                    tx.execute(
                        "UPDATE participants SET granted = granted + ?2 WHERE id = ?1",
                        params![participant, *tokens as i64],
                    )?;
                    let leaf = grant_leaf(&tx, run, version, participant, *unit_id, *tokens)?;
                    let idx: i64 = tx.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))?;
                    tx.execute(
                        "INSERT INTO ledger (idx, unit_id, leaf) VALUES (?1, ?2, ?3)",
                        params![idx, *unit_id as i64, serde_json::to_string(&leaf)?],
                    )?;
                    leaves.push(leaf);
                }
                LedgerChange::Verified {
                    participant,
                    unit_id,
                } => {
                    tx.execute(
                        "UPDATE updates SET held = 0, verified = 1 WHERE unit_id = ?1 AND participant = ?2 AND held < 2",
                        params![*unit_id as i64, participant],
                    )?;
                    tx.execute(
                        "UPDATE participants SET verified = verified + 1 WHERE id = ?1",
                        [participant],
                    )?;
                }
                LedgerChange::Unverified {
                    participant,
                    unit_id,
                    ..
                } => {
                    tx.execute(
                        "UPDATE updates SET verified = 0 WHERE unit_id = ?1 AND participant = ?2",
                        params![*unit_id as i64, participant],
                    )?;
                    tx.execute(
                        "UPDATE participants SET verified = MAX(verified - 1, 0) WHERE id = ?1",
                        [participant],
                    )?;
                }
                LedgerChange::Dropped {
                    participant,
                    unit_id,
                    tokens,
                } => {
                    tx.execute(
                        "UPDATE updates SET credit = 'forfeited', held = 2, payload = NULL WHERE unit_id = ?1 AND participant = ?2",
                        params![*unit_id as i64, participant],
                    )?;
                    tx.execute(
                        "UPDATE participants SET forfeited = forfeited + ?2 WHERE id = ?1",
                        params![participant, *tokens as i64],
                    )?;
                }
                LedgerChange::Checked {
                    verifier,
                    participant,
                    unit_id,
                    tokens,
                } => {
                    tx.execute(
                        "INSERT INTO verifications (unit_id, participant, verifier, tokens) VALUES (?1, ?2, ?3, ?4)",
                        params![*unit_id as i64, participant, verifier, *tokens as i64],
                    )?;
                    tx.execute(
                        "UPDATE participants SET verifications = verifications + 1 WHERE id = ?1",
                        [verifier],
                    )?;
                }
                LedgerChange::Banned {
                    participant,
                    unit_id,
                    forfeited,
                    tokens,
                    reverted,
                    detail,
                } => {
                    tx.execute(
                        "UPDATE updates SET verified = 0 WHERE unit_id = ?1 AND participant = ?2",
                        params![*unit_id as i64, participant],
                    )?;
                    for u in forfeited {
                        tx.execute(
                            "UPDATE updates SET credit = 'forfeited' WHERE unit_id = ?1 AND participant = ?2 AND credit = 'pending'",
                            params![*u as i64, participant],
                        )?;
                    }
                    // Its held updates never enter the model.
                    tx.execute(
                        "UPDATE updates SET held = 2, payload = NULL WHERE participant = ?1 AND held = 1",
                        [participant],
                    )?;
                    // Those taken back out of it: out of the open round (never replayed after
                    // a restart) or out of a version's weights.
                    for u in reverted {
                        tx.execute(
                            "UPDATE updates SET held = 2, outcome = 'reverted', payload = NULL WHERE unit_id = ?1 AND participant = ?2",
                            params![*u as i64, participant],
                        )?;
                    }
                    tx.execute(
                        "UPDATE participants SET banned = 1, forfeited = forfeited + ?2, last_rejection = ?3 WHERE id = ?1",
                        params![participant, *tokens as i64, format!("FailedReexecution: {detail}")],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(leaves)
    }

    /// The contribution log's leaves `start..end` (all from `start` without `end`).
    pub fn ledger_leaves(&self, start: u64, end: Option<u64>) -> Result<Vec<Leaf>> {
        let mut st = self
            .conn
            .prepare("SELECT leaf FROM ledger WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
        let end = end.map_or(i64::MAX, |e| e as i64);
        let rows = st.query_map(params![start as i64, end], |r| r.get::<_, String>(0))?;
        rows.map(|t| Ok(serde_json::from_str(&t?)?)).collect()
    }

    /// The log index of a unit's leaf, if it was granted.
    pub fn ledger_index(&self, unit_id: u64) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT idx FROM ledger WHERE unit_id = ?1",
                [unit_id as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|i| i as u64))
    }

    /// Stores a new API key (by its SHA-256) with a quota of tokens; returns its id.
    pub fn create_api_key(
        &self,
        name: &str,
        sha256: &[u8; 32],
        quota: u64,
        now: u64,
    ) -> Result<u64> {
        self.conn.execute(
            "INSERT INTO api_keys (name, key_sha256, quota, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, sha256.as_slice(), quota as i64, now as i64],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// The key with this SHA-256: `(id, name, quota, used)`.
    pub fn api_key(&self, sha256: &[u8; 32]) -> Result<Option<(u64, String, u64, u64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, quota, used FROM api_keys WHERE key_sha256 = ?1",
                [sha256.as_slice()],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get(1)?,
                        r.get::<_, i64>(2)? as u64,
                        r.get::<_, i64>(3)? as u64,
                    ))
                },
            )
            .optional()?)
    }

    /// Meters a request against its key, in one transaction: `false` (and nothing recorded)
    /// when it would exceed the key's quota.
    pub fn meter(
        &mut self,
        key_id: u64,
        version: u64,
        prompt_tokens: u64,
        completion_tokens: u64,
        now: u64,
    ) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let charged = tx.execute(
            "UPDATE api_keys SET used = used + ?2 WHERE id = ?1 AND used + ?2 <= quota",
            params![key_id as i64, (prompt_tokens + completion_tokens) as i64],
        )?;
        if charged == 0 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO usage (key_id, version, prompt_tokens, completion_tokens, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                key_id as i64,
                version as i64,
                prompt_tokens as i64,
                completion_tokens as i64,
                now as i64
            ],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Tokens served in `[from_ms, to_ms)`, by version.
    pub fn usage_by_version(&self, from_ms: u64, to_ms: u64) -> Result<Vec<(u64, u64)>> {
        let mut st = self.conn.prepare(
            "SELECT version, SUM(prompt_tokens + completion_tokens) FROM usage
             WHERE at_ms >= ?1 AND at_ms < ?2 GROUP BY version ORDER BY version",
        )?;
        let rows = st.query_map(
            params![from_ms as i64, to_ms.min(i64::MAX as u64) as i64],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The signed checkpoint of `version`, or the newest one.
    pub fn ledger_checkpoint(&self, version: Option<u64>) -> Result<Option<Checkpoint>> {
        let text: Option<String> = match version {
            Some(v) => self
                .conn
                .query_row(
                    "SELECT checkpoint FROM ledger_checkpoints WHERE version = ?1",
                    [v as i64],
                    |r| r.get(0),
                )
                .optional()?,
            None => self
                .conn
                .query_row(
                    "SELECT checkpoint FROM ledger_checkpoints ORDER BY version DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?,
        };
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// Every signed checkpoint, by version.
    pub fn ledger_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let mut st = self
            .conn
            .prepare("SELECT checkpoint FROM ledger_checkpoints ORDER BY version")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|t| Ok(serde_json::from_str(&t?)?)).collect()
    }

    /// Updates held for their re-execution (after a restart, they are re-queued).
    pub fn held_updates(&self, template: &WorkUnit) -> Result<Vec<HeldUpdate>> {
        let mut st = self.conn.prepare(
            "SELECT participant, unit_id, base_version, shard, inner_steps, warmup_steps, lr, tokens, payload, frag_offset, frag_len FROM updates WHERE held = 1 ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(HeldUpdate {
                participant: r.get(0)?,
                unit: WorkUnit {
                    unit_id: r.get::<_, i64>(1)? as u64,
                    base_version: r.get::<_, i64>(2)? as u64,
                    shard: r.get::<_, i64>(3)? as u64,
                    inner_steps: r.get::<_, i64>(4)? as u32,
                    warmup_steps: r.get::<_, i64>(5)? as u32,
                    lr: r.get(6)?,
                    fragment: fragment_from(r.get(9)?, r.get(10)?),
                    ..template.clone()
                },
                tokens: r.get::<_, i64>(7)? as u64,
                payload: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Credit still pending: `(participant, unit, tokens, folded into a recorded version)`.
    pub fn pending_credit(&self) -> Result<Vec<(String, u64, u64, bool)>> {
        let mut st = self.conn.prepare(
            "SELECT participant, unit_id, tokens, applied_version IS NOT NULL FROM updates WHERE credit = 'pending' AND held != 2 ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, bool>(3)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// SHA-256 of every accepted payload (a replay stays a duplicate after a restart).
    pub fn update_hashes(&self) -> Result<Vec<[u8; 32]>> {
        let mut st = self.conn.prepare("SELECT sha256 FROM updates")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(h) = <[u8; 32]>::try_from(r?.as_slice()) {
                out.push(h);
            }
        }
        Ok(out)
    }

    /// Records a new version (its checkpoint already on disk) and marks every pending update
    /// applied, in one transaction. Applied payloads are dropped: the version holds them.
    pub fn record_version(
        &mut self,
        version: u64,
        checkpoint: &str,
        signed: &Checkpoint,
        now: u64,
    ) -> Result<usize> {
        let tx = self.conn.transaction()?;
        insert_checkpoint(&tx, signed)?;
        let n = tx.execute(
            "UPDATE updates SET applied_version = ?1, outcome = 'applied', payload = NULL WHERE applied_version IS NULL AND held = 0",
            [version as i64],
        )?;
        tx.execute(
            "INSERT INTO versions (version, checkpoint, updates, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![version as i64, checkpoint, n as i64, now as i64],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Records a rollback: its version (the restored weights, already on disk), the rollback
    /// itself, and the updates of the open round, which are discarded (they stay in the ledger:
    /// their participants keep the credit), in one transaction.
    pub fn record_rollback(
        &mut self,
        rb: &Rollback,
        checkpoint: &str,
        signed: &Checkpoint,
    ) -> Result<usize> {
        let tx = self.conn.transaction()?;
        insert_checkpoint(&tx, signed)?;
        let n = tx.execute(
            "UPDATE updates SET applied_version = ?1, outcome = 'discarded', payload = NULL WHERE applied_version IS NULL AND held = 0",
            [rb.new_version as i64],
        )?;
        tx.execute(
            "INSERT INTO versions (version, checkpoint, updates, created_ms, kind) VALUES (?1, ?2, 0, ?3, 'rollback')",
            params![rb.new_version as i64, checkpoint, rb.at_ms as i64],
        )?;
        tx.execute(
            "INSERT INTO rollbacks (new_version, bad_version, bad_loss, restored_version, restored_loss, threshold, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                rb.new_version as i64,
                rb.bad_version as i64,
                rb.bad_loss as f64,
                rb.restored_version as i64,
                rb.restored_loss as f64,
                rb.threshold as f64,
                rb.at_ms as i64
            ],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Every rollback, oldest first.
    pub fn rollbacks(&self) -> Result<Vec<Rollback>> {
        let mut st = self.conn.prepare(
            "SELECT new_version, bad_version, bad_loss, restored_version, restored_loss, threshold, at_ms FROM rollbacks ORDER BY new_version",
        )?;
        let rows = st.query_map([], |r| {
            Ok(Rollback {
                new_version: r.get::<_, i64>(0)? as u64,
                bad_version: r.get::<_, i64>(1)? as u64,
                bad_loss: r.get::<_, f64>(2)? as f32,
                restored_version: r.get::<_, i64>(3)? as u64,
                restored_loss: r.get::<_, f64>(4)? as f32,
                threshold: r.get::<_, f64>(5)? as f32,
                at_ms: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Tokens of the updates folded into recorded versions (not those a rollback discarded).
    pub fn tokens_applied(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(tokens), 0) FROM updates WHERE outcome = 'applied'",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Accepted updates not yet folded into a recorded version, in arrival order.
    pub fn pending_updates(&self) -> Result<Vec<PendingUpdate>> {
        let mut st = self.conn.prepare(
            "SELECT staleness, tokens, weight, payload, received_ms, participant, unit_id, frag_offset, frag_len FROM updates WHERE applied_version IS NULL AND held = 0 ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(PendingUpdate {
                unit_id: r.get::<_, i64>(6)? as u64,
                fragment: fragment_from(r.get(7)?, r.get(8)?),
                participant: r.get(5)?,
                verdict: Verdict {
                    staleness: r.get::<_, i64>(0)? as u64,
                    tokens: r.get::<_, i64>(1)? as u64,
                    weight: r.get::<_, f64>(2)? as f32,
                },
                payload: r.get(3)?,
                received_ms: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
