//! The relay's store: the run, model versions, leases, participants, accepted updates and the
//! ledger, in SQLite (the embedded default: one file) or in PostgreSQL (`--store postgres://…`),
//! through the one SQL surface of [`crate::sql`].
//!
//! On PostgreSQL one relay leads the run at a time ([`Db::connect_postgres`]): it holds a session
//! advisory lock and a **fencing epoch**, bumped by every new leader; every write transaction
//! first checks the epoch is still its own (and beats the leader's heartbeat with it), so a
//! relay that lost the lead (paused, cut off, its lock taken over) cannot commit anything more.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::Connection;
use tessera_coordinator::{Lease, LedgerChange, ParticipantStats, Rollback, Verdict};
use tessera_protocol::ledger::{CREDIT_FORMULA, Checkpoint, Leaf};
use tessera_protocol::messages::WorkUnit;
use tessera_protocol::update::Fragment;

use crate::sql::{Exec, SqlError, blocking, p};

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
    frag_len INTEGER NOT NULL DEFAULT -1,
    -- with an object store: the payload's key there (content-addressed), and payload NULL
    payload_key TEXT
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

/// The schema in PostgreSQL's types (the same tables: 64-bit integers, double floats, bytes).
fn postgres_schema() -> String {
    SCHEMA
        .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace(" REAL", " DOUBLE PRECISION")
        .replace("BLOB", "BYTEA")
        + "
-- The run's leader: its fencing epoch (bumped by every new leader) and heartbeat.
CREATE TABLE IF NOT EXISTS leadership (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    beat TIMESTAMPTZ NOT NULL
);
INSERT INTO leadership (id, epoch, holder, beat) VALUES (1, 0, '', clock_timestamp())
    ON CONFLICT (id) DO NOTHING;
-- Runs kept before update payloads could live in the object store.
ALTER TABLE updates ADD COLUMN IF NOT EXISTS payload_key TEXT;
-- Where edge relays reach the leader (`--advertise`).
ALTER TABLE leadership ADD COLUMN IF NOT EXISTS address TEXT NOT NULL DEFAULT '';
"
}

/// Connects to the PostgreSQL database at `url` and creates the schema (serialised between
/// relays by an advisory lock; every statement is idempotent).
fn connect_with_schema(url: &str) -> Result<postgres::Client> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    tx.batch_execute(&postgres_schema())?;
    tx.commit()?;
    Ok(client)
}

/// The advisory lock the leader of a run holds for as long as its session lives (one run per
/// database).
const LEADER_LOCK: i64 = 0x7465_7373_6572_6101;
/// The advisory lock that serialises creating the schema.
const SCHEMA_LOCK: i64 = 0x7465_7373_6572_6102;

fn insert_checkpoint(tx: &mut dyn Exec, c: &Checkpoint) -> Result<()> {
    tx.exec(
        "INSERT INTO ledger_checkpoints (version, checkpoint) VALUES ($1, $2)
         ON CONFLICT (version) DO UPDATE SET checkpoint = excluded.checkpoint",
        p![c.version, serde_json::to_string(c)?],
    )?;
    Ok(())
}

/// The leaf of a unit being granted, from its accepted update and its participant's key.
fn grant_leaf(
    tx: &mut dyn Exec,
    run: &str,
    version: u64,
    participant: &str,
    unit_id: u64,
    tokens: u64,
) -> Result<Leaf> {
    let blob32 =
        |b: Option<Vec<u8>>| -> [u8; 32] { b.and_then(|b| b.try_into().ok()).unwrap_or([0; 32]) };
    let r = tx
        .row(
            "SELECT u.applied_version, u.base_version, u.base_sha256, u.sha256, u.signature, p.public_key
             FROM updates u JOIN participants p ON p.id = u.participant
             WHERE u.unit_id = $1 AND u.participant = $2",
            p![unit_id, participant],
        )?
        .with_context(|| format!("the accepted update of unit {unit_id} being granted"))?;
    Ok(Leaf {
        run: run.to_string(),
        version: r.opt_i64(0)?.map_or(version, |v| v as u64),
        participant: blob32(r.opt_blob(5)?),
        unit_id,
        base_version: r.u64(1)?,
        base_sha256: blob32(r.opt_blob(2)?),
        update_sha256: blob32(r.opt_blob(3)?),
        tokens,
        credit: tokens,
        formula: CREDIT_FORMULA,
        signature: r.blob(4)?,
    })
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
    /// The pseudo-gradient, f32 little-endian (empty when it is in the object store).
    pub payload: Vec<u8>,
    /// Its key in the object store, if it was put there.
    pub payload_key: Option<String>,
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
    /// The pseudo-gradient, f32 little-endian (not stored when it is in the object store).
    pub payload: &'a [u8],
    /// Its key in the object store, if it was put there first.
    pub payload_key: Option<&'a str>,
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
    /// The pseudo-gradient, f32 little-endian (empty when it is in the object store).
    pub payload: Vec<u8>,
    /// Its key in the object store, if it was put there.
    pub payload_key: Option<String>,
}

enum Conn {
    Sqlite(Connection),
    Postgres {
        client: postgres::Client,
        /// This relay's fencing epoch.
        epoch: i64,
    },
}

/// The store.
pub struct Db {
    conn: Conn,
}

/// A unit as a lease row or an update row stores it.
fn unit_from(template: &WorkUnit, r: &crate::sql::Row, cols: [usize; 8]) -> Result<WorkUnit> {
    let [
        unit_id,
        base_version,
        shard,
        inner_steps,
        warmup_steps,
        lr,
        frag_offset,
        frag_len,
    ] = cols;
    Ok(WorkUnit {
        unit_id: r.u64(unit_id)?,
        base_version: r.u64(base_version)?,
        shard: r.u64(shard)?,
        inner_steps: r.u64(inner_steps)? as u32,
        warmup_steps: r.u64(warmup_steps)? as u32,
        lr: r.f64(lr)?,
        fragment: fragment_from(r.i64(frag_offset)?, r.i64(frag_len)?),
        ..template.clone()
    })
}

impl Db {
    /// Opens (creating) the SQLite database at `path`.
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
            ("updates", "payload_key", "TEXT"),
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
        Ok(Db {
            conn: Conn::Sqlite(conn),
        })
    }

    /// Connects to the PostgreSQL database at `url` (creating the schema) and waits until this
    /// relay leads the run: it takes the leader's advisory lock and bumps the fencing epoch. A
    /// leader whose heartbeat is older than `lead_timeout` (paused, hung, cut off) has its
    /// session ended so its lock is released. `holder` names this relay in the leadership row;
    /// `waiting` is called once if another relay leads when this one arrives.
    pub fn connect_postgres(
        url: &str,
        holder: &str,
        lead_timeout: Duration,
        waiting: impl FnOnce(&str),
    ) -> Result<Self> {
        blocking(|| {
            let mut client = connect_with_schema(url)?;
            let mut waiting = Some(waiting);
            loop {
                let locked: bool = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])?
                    .get(0);
                if locked {
                    break;
                }
                let row = client.query_one(
                    "SELECT holder, EXTRACT(EPOCH FROM clock_timestamp() - beat)::float8 FROM leadership WHERE id = 1",
                    &[],
                )?;
                let (leader, silent_s): (String, f64) = (row.get(0), row.get(1));
                if let Some(w) = waiting.take() {
                    w(&leader);
                }
                if silent_s > lead_timeout.as_secs_f64() {
                    // The leader stopped beating but its session (and so its lock) lives on:
                    // end the session. Its next write fails on the epoch all the same.
                    let ended = client.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks
                         WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid = $2 AND objsubid = 1",
                        &[&((LEADER_LOCK >> 32) as u32), &(LEADER_LOCK as u32)],
                    )?;
                    tracing::warn!(
                        leader,
                        silent_s,
                        ended,
                        "the run's leader stopped beating: ending its session to take the lead"
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            let epoch: i64 = client
                .query_one(
                    "UPDATE leadership SET epoch = epoch + 1, holder = $1, beat = clock_timestamp(), address = ''
                     WHERE id = 1 RETURNING epoch",
                    &[&holder],
                )?
                .get(0);
            tracing::info!(epoch, holder, "leading the run");
            Ok(Db {
                conn: Conn::Postgres { client, epoch },
            })
        })
    }

    /// Connects to the PostgreSQL database at `url` (creating the schema) as an edge relay
    /// does: to read where the leader is and which versions it recorded. It never leads: its
    /// epoch is -1, which no leader holds, so any write it tried would fail as fenced.
    pub fn connect_postgres_reader(url: &str) -> Result<Self> {
        blocking(|| {
            Ok(Db {
                conn: Conn::Postgres {
                    client: connect_with_schema(url)?,
                    epoch: -1,
                },
            })
        })
    }

    /// Records where edge relays reach this leader (PostgreSQL; fenced like every write).
    pub fn advertise(&mut self, address: &str) -> Result<()> {
        if let Conn::Sqlite(_) = self.conn {
            return Ok(());
        }
        self.write(|tx| {
            tx.exec(
                "UPDATE leadership SET address = $1 WHERE id = 1",
                p![address],
            )?;
            Ok(())
        })
    }

    /// The run's leader as the leadership row names it: `(holder, address, epoch)`, when a
    /// leader has advertised an address (PostgreSQL only).
    pub fn leader(&mut self) -> Result<Option<(String, String, i64)>> {
        if let Conn::Sqlite(_) = self.conn {
            return Ok(None);
        }
        let row = self.read().row(
            "SELECT holder, address, epoch FROM leadership WHERE id = 1",
            &[],
        )?;
        Ok(match row {
            Some(r) if !r.text(1)?.is_empty() => Some((r.text(0)?, r.text(1)?, r.i64(2)?)),
            _ => None,
        })
    }

    /// This relay's fencing epoch (`None` on SQLite, where one relay owns the file).
    pub fn epoch(&self) -> Option<i64> {
        match &self.conn {
            Conn::Sqlite(_) => None,
            Conn::Postgres { epoch, .. } => Some(*epoch),
        }
    }

    /// Proves this relay still leads (PostgreSQL: the epoch is still its own) and refreshes its
    /// heartbeat. `Err` with [`SqlError::Fenced`] inside once another relay took the lead.
    pub fn beat(&mut self) -> Result<()> {
        self.write(|_| Ok(()))
    }

    fn read(&mut self) -> &mut dyn Exec {
        match &mut self.conn {
            Conn::Sqlite(c) => c,
            Conn::Postgres { client, .. } => client,
        }
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`. On PostgreSQL the
    /// transaction first checks this relay's epoch (fencing) and beats its heartbeat.
    fn write<R>(&mut self, f: impl FnOnce(&mut dyn Exec) -> Result<R>) -> Result<R> {
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut tx = c.transaction()?;
                let r = f(&mut tx)?;
                tx.commit()?;
                Ok(r)
            }
            Conn::Postgres { client, epoch } => blocking(|| {
                let ours = *epoch;
                let mut tx = client.transaction()?;
                let held = tx.exec(
                    "UPDATE leadership SET beat = clock_timestamp() WHERE id = 1 AND epoch = $1",
                    p![ours],
                )?;
                if held == 0 {
                    let current = tx
                        .row("SELECT epoch FROM leadership WHERE id = 1", &[])?
                        .map_or(Ok(-1), |r| r.i64(0))?;
                    return Err(SqlError::Fenced { ours, current }.into());
                }
                let r = f(&mut tx)?;
                tx.commit()?;
                Ok(r)
            }),
        }
    }

    /// The stored run configuration, if the run exists.
    pub fn run_config(&mut self) -> Result<Option<String>> {
        self.read()
            .row("SELECT config_json FROM run WHERE id = 1", &[])?
            .map(|r| Ok(r.text(0)?))
            .transpose()
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
        self.write(|tx| {
            tx.exec(
                "INSERT INTO run (id, name, config_json, created_ms) VALUES (1, $1, $2, $3)",
                p![name, config_json, now],
            )?;
            tx.exec(
                "INSERT INTO versions (version, checkpoint, updates, created_ms) VALUES (0, $1, 0, $2)",
                p![checkpoint, now],
            )?;
            insert_checkpoint(tx, signed)
        })
    }

    /// The latest recorded version.
    pub fn latest_version(&mut self) -> Result<u64> {
        let r = self.read().row("SELECT MAX(version) FROM versions", &[])?;
        Ok(r.context("no versions")?.u64(0)?)
    }

    /// Where a version's checkpoint was stored (a file name, or the object store's key of its
    /// manifest), if the version was recorded.
    pub fn version_checkpoint(&mut self, version: u64) -> Result<Option<String>> {
        self.read()
            .row(
                "SELECT checkpoint FROM versions WHERE version = $1",
                p![version],
            )?
            .map(|r| Ok(r.text(0)?))
            .transpose()
    }

    /// Validation-loss history: `(version, val_loss)`.
    pub fn val_history(&mut self) -> Result<Vec<(u64, f32)>> {
        self.read()
            .rows(
                "SELECT version, val_loss FROM versions WHERE val_loss IS NOT NULL ORDER BY version",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, r.f64(1)? as f32)))
            .collect()
    }

    /// Records a version's validation loss.
    pub fn set_val_loss(&mut self, version: u64, loss: f32) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "UPDATE versions SET val_loss = $1 WHERE version = $2",
                p![loss, version],
            )?;
            Ok(())
        })
    }

    /// A counter's value (0 if unset).
    pub fn counter(&mut self, key: &str) -> Result<u64> {
        Ok(self
            .read()
            .row("SELECT value FROM counters WHERE key = $1", p![key])?
            .map_or(Ok(0), |r| r.u64(0))?)
    }

    /// Inserts or refreshes a participant.
    pub fn upsert_participant(
        &mut self,
        p: &ParticipantStats,
        public_key: &[u8],
        now: u64,
    ) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO participants (id, public_key, kind, backend, device, first_seen_ms, last_seen_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)
                 ON CONFLICT (id) DO UPDATE SET kind = $3, backend = $4, device = $5, last_seen_ms = $6",
                p![&p.id, public_key, p.kind, &p.backend, &p.device, now],
            )?;
            Ok(())
        })
    }

    /// Every participant's ledger entry.
    pub fn participants(&mut self) -> Result<Vec<ParticipantStats>> {
        self.read()
            .rows("SELECT id, kind, backend, device, accepted, rejected, tokens, last_seen_ms, granted, forfeited, verified, banned, last_rejection, verifications FROM participants", &[])?
            .iter()
            .map(|r| {
                Ok(ParticipantStats {
                    id: r.text(0)?,
                    kind: if r.text(1)? == "browser" {
                        "browser"
                    } else {
                        "native"
                    },
                    backend: r.text(2)?,
                    device: r.text(3)?,
                    accepted_updates: r.u64(4)?,
                    rejected_updates: r.u64(5)?,
                    tokens_trained: r.u64(6)?,
                    connected: false,
                    last_seen_ms: r.u64(7)?,
                    tokens_per_s: 0.0,
                    unit_steps: 0,
                    tokens_pending: (r.i64(6)? - r.i64(8)? - r.i64(9)?).max(0) as u64,
                    tokens_granted: r.u64(8)?,
                    tokens_forfeited: r.u64(9)?,
                    verified_units: r.u64(10)?,
                    banned: r.bool(11)?,
                    last_rejection: r.opt_text(12)?,
                    verifications: r.u64(13)?,
                })
            })
            .collect()
    }

    /// Records a lease and the counters it advanced.
    pub fn put_lease(
        &mut self,
        participant: &str,
        unit: &WorkUnit,
        next_unit: u64,
        next_shard: u64,
    ) -> Result<()> {
        let (frag_offset, frag_len) = fragment_columns(&unit.fragment);
        self.write(|tx| {
            tx.exec(
                "INSERT INTO leases (unit_id, participant, base_version, shard, deadline_ms, inner_steps, warmup_steps, lr, frag_offset, frag_len)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (unit_id) DO UPDATE SET participant = excluded.participant,
                    base_version = excluded.base_version, shard = excluded.shard,
                    deadline_ms = excluded.deadline_ms, inner_steps = excluded.inner_steps,
                    warmup_steps = excluded.warmup_steps, lr = excluded.lr,
                    frag_offset = excluded.frag_offset, frag_len = excluded.frag_len",
                p![unit.unit_id, participant, unit.base_version, unit.shard, unit.deadline_ms, unit.inner_steps as i64, unit.warmup_steps as i64, unit.lr, frag_offset, frag_len],
            )?;
            for (key, value) in [("next_unit", next_unit), ("next_shard", next_shard)] {
                tx.exec(
                    "INSERT INTO counters (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    p![key, value],
                )?;
            }
            Ok(())
        })
    }

    /// Forgets leases.
    pub fn delete_leases(&mut self, unit_ids: &[u64]) -> Result<()> {
        if unit_ids.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for u in unit_ids {
                tx.exec("DELETE FROM leases WHERE unit_id = $1", p![*u])?;
            }
            Ok(())
        })
    }

    /// Every stored lease, as the coordinator holds them. `template` supplies the per-run fields.
    pub fn leases(&mut self, template: &WorkUnit) -> Result<Vec<Lease>> {
        self.read()
            .rows("SELECT unit_id, participant, base_version, shard, deadline_ms, inner_steps, warmup_steps, lr, frag_offset, frag_len FROM leases", &[])?
            .iter()
            .map(|r| {
                Ok(Lease {
                    participant: r.text(1)?,
                    leased_ms: 0,
                    unit: WorkUnit {
                        deadline_ms: r.u64(4)?,
                        ..unit_from(template, r, [0, 2, 3, 5, 6, 7, 8, 9])?
                    },
                })
            })
            .collect()
    }

    /// Durably records an accepted update, its participant's ledger and the end of its lease,
    /// in one transaction.
    pub fn record_accepted(&mut self, u: &UpdateRecord<'_>) -> Result<()> {
        let (frag_offset, frag_len) = fragment_columns(&u.unit.fragment);
        self.write(|tx| {
            tx.exec(
                "INSERT INTO updates (unit_id, participant, base_version, staleness, tokens, weight, loss_before, loss_after, received_ms, payload,
                    shard, inner_steps, warmup_steps, lr, sha256, own_gain, held_gain, held, base_sha256, signature, frag_offset, frag_len, payload_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)",
                p![
                    u.unit_id,
                    u.participant,
                    u.base_version,
                    u.verdict.staleness,
                    u.verdict.tokens,
                    u.verdict.weight,
                    u.loss_before,
                    u.loss_after,
                    u.received_ms,
                    u.payload_key.is_none().then_some(u.payload),
                    u.unit.shard,
                    u.unit.inner_steps as i64,
                    u.unit.warmup_steps as i64,
                    u.unit.lr,
                    u.sha256.as_slice(),
                    u.probe.map(|p| p.0),
                    u.probe.map(|p| p.1),
                    u.held,
                    u.base_sha256.as_slice(),
                    u.signature,
                    frag_offset,
                    frag_len,
                    u.payload_key
                ],
            )?;
            tx.exec(
                "UPDATE participants SET accepted = accepted + 1, tokens = tokens + $2, last_seen_ms = $3 WHERE id = $1",
                p![u.participant, u.verdict.tokens, u.received_ms],
            )?;
            tx.exec("DELETE FROM leases WHERE unit_id = $1", p![u.unit_id])?;
            Ok(())
        })
    }

    /// Counts a rejection against a participant.
    pub fn record_rejected(&mut self, participant: &str, reason: &str) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "UPDATE participants SET rejected = rejected + 1, last_rejection = $2 WHERE id = $1",
                p![participant, reason],
            )?;
            Ok(())
        })
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
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|tx| {
            let mut leaves = Vec::new();
            for c in changes {
                apply_change(tx, c, run, version, &mut leaves)?;
            }
            Ok(leaves)
        })
    }

    /// The contribution log's leaves `start..end` (all from `start` without `end`).
    pub fn ledger_leaves(&mut self, start: u64, end: Option<u64>) -> Result<Vec<Leaf>> {
        let end = end.map_or(i64::MAX, |e| e.min(i64::MAX as u64) as i64);
        self.read()
            .rows(
                "SELECT leaf FROM ledger WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                p![start, end],
            )?
            .iter()
            .map(|r| Ok(serde_json::from_str(&r.text(0)?)?))
            .collect()
    }

    /// The log index of a unit's leaf, if it was granted.
    pub fn ledger_index(&mut self, unit_id: u64) -> Result<Option<u64>> {
        self.read()
            .row("SELECT idx FROM ledger WHERE unit_id = $1", p![unit_id])?
            .map(|r| Ok(r.u64(0)?))
            .transpose()
    }

    /// Stores a new API key (by its SHA-256) with a quota of tokens; returns its id.
    pub fn create_api_key(
        &mut self,
        name: &str,
        sha256: &[u8; 32],
        quota: u64,
        now: u64,
    ) -> Result<u64> {
        // A key is the operator's, not the run's state: it needs no lead (no fence), so
        // `tessera-relay api-key --store` adds one beside a running leader, which reads keys
        // from the store on every request. One statement: atomic on its own.
        let r = blocking(|| {
            self.read().row(
                "INSERT INTO api_keys (name, key_sha256, quota, created_ms) VALUES ($1, $2, $3, $4) RETURNING id",
                p![name, sha256.as_slice(), quota, now],
            )
        })?;
        Ok(r.context("the new key's id")?.u64(0)?)
    }

    /// The key with this SHA-256: `(id, name, quota, used)`.
    pub fn api_key(&mut self, sha256: &[u8; 32]) -> Result<Option<(u64, String, u64, u64)>> {
        self.read()
            .row(
                "SELECT id, name, quota, used FROM api_keys WHERE key_sha256 = $1",
                p![sha256.as_slice()],
            )?
            .map(|r| Ok((r.u64(0)?, r.text(1)?, r.u64(2)?, r.u64(3)?)))
            .transpose()
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
        self.write(|tx| {
            let charged = tx.exec(
                "UPDATE api_keys SET used = used + $2 WHERE id = $1 AND used + $2 <= quota",
                p![key_id, prompt_tokens + completion_tokens],
            )?;
            if charged == 0 {
                return Ok(false);
            }
            tx.exec(
                "INSERT INTO usage (key_id, version, prompt_tokens, completion_tokens, at_ms) VALUES ($1, $2, $3, $4, $5)",
                p![key_id, version, prompt_tokens, completion_tokens, now],
            )?;
            Ok(true)
        })
    }

    /// Tokens served in `[from_ms, to_ms)`, by version.
    pub fn usage_by_version(&mut self, from_ms: u64, to_ms: u64) -> Result<Vec<(u64, u64)>> {
        self.read()
            .rows(
                "SELECT version, CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) FROM usage
                 WHERE at_ms >= $1 AND at_ms < $2 GROUP BY version ORDER BY version",
                p![from_ms, to_ms],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, r.u64(1)?)))
            .collect()
    }

    /// The signed checkpoint of `version`, or the newest one.
    pub fn ledger_checkpoint(&mut self, version: Option<u64>) -> Result<Option<Checkpoint>> {
        let row = match version {
            Some(v) => self.read().row(
                "SELECT checkpoint FROM ledger_checkpoints WHERE version = $1",
                p![v],
            )?,
            None => self.read().row(
                "SELECT checkpoint FROM ledger_checkpoints ORDER BY version DESC LIMIT 1",
                &[],
            )?,
        };
        row.map(|r| Ok(serde_json::from_str(&r.text(0)?)?))
            .transpose()
    }

    /// Every signed checkpoint, by version.
    pub fn ledger_checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
        self.read()
            .rows(
                "SELECT checkpoint FROM ledger_checkpoints ORDER BY version",
                &[],
            )?
            .iter()
            .map(|r| Ok(serde_json::from_str(&r.text(0)?)?))
            .collect()
    }

    /// Updates held for their re-execution (after a restart, they are re-queued).
    pub fn held_updates(&mut self, template: &WorkUnit) -> Result<Vec<HeldUpdate>> {
        self.read()
            .rows(
                "SELECT participant, unit_id, base_version, shard, inner_steps, warmup_steps, lr, tokens, payload, frag_offset, frag_len, payload_key FROM updates WHERE held = 1 ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(HeldUpdate {
                    participant: r.text(0)?,
                    unit: unit_from(template, r, [1, 2, 3, 4, 5, 6, 9, 10])?,
                    tokens: r.u64(7)?,
                    payload: r.blob(8)?,
                    payload_key: r.opt_text(11)?,
                })
            })
            .collect()
    }

    /// Credit still pending: `(participant, unit, tokens, folded into a recorded version)`.
    pub fn pending_credit(&mut self) -> Result<Vec<(String, u64, u64, bool)>> {
        self.read()
            .rows(
                "SELECT participant, unit_id, tokens, applied_version IS NOT NULL FROM updates WHERE credit = 'pending' AND held != 2 ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.u64(1)?, r.u64(2)?, r.bool(3)?)))
            .collect()
    }

    /// SHA-256 of every accepted payload (a replay stays a duplicate after a restart).
    pub fn update_hashes(&mut self) -> Result<Vec<[u8; 32]>> {
        let rows = self.read().rows("SELECT sha256 FROM updates", &[])?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(h) = <[u8; 32]>::try_from(r.blob(0)?.as_slice()) {
                out.push(h);
            }
        }
        Ok(out)
    }

    /// Records a new version (its checkpoint already stored: `checkpoint` says where) and marks
    /// every pending update applied, in one transaction. Applied payloads are dropped: the
    /// version holds them.
    pub fn record_version(
        &mut self,
        version: u64,
        checkpoint: &str,
        signed: &Checkpoint,
        now: u64,
    ) -> Result<usize> {
        self.write(|tx| {
            insert_checkpoint(tx, signed)?;
            let n = tx.exec(
                "UPDATE updates SET applied_version = $1, outcome = 'applied', payload = NULL WHERE applied_version IS NULL AND held = 0",
                p![version],
            )?;
            tx.exec(
                "INSERT INTO versions (version, checkpoint, updates, created_ms) VALUES ($1, $2, $3, $4)",
                p![version, checkpoint, n, now],
            )?;
            Ok(n as usize)
        })
    }

    /// Records a rollback: its version (the restored weights, already stored), the rollback
    /// itself, and the updates of the open round, which are discarded (they stay in the ledger:
    /// their participants keep the credit), in one transaction.
    pub fn record_rollback(
        &mut self,
        rb: &Rollback,
        checkpoint: &str,
        signed: &Checkpoint,
    ) -> Result<usize> {
        self.write(|tx| {
            insert_checkpoint(tx, signed)?;
            let n = tx.exec(
                "UPDATE updates SET applied_version = $1, outcome = 'discarded', payload = NULL WHERE applied_version IS NULL AND held = 0",
                p![rb.new_version],
            )?;
            tx.exec(
                "INSERT INTO versions (version, checkpoint, updates, created_ms, kind) VALUES ($1, $2, 0, $3, 'rollback')",
                p![rb.new_version, checkpoint, rb.at_ms],
            )?;
            tx.exec(
                "INSERT INTO rollbacks (new_version, bad_version, bad_loss, restored_version, restored_loss, threshold, at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                p![
                    rb.new_version,
                    rb.bad_version,
                    rb.bad_loss,
                    rb.restored_version,
                    rb.restored_loss,
                    rb.threshold,
                    rb.at_ms
                ],
            )?;
            Ok(n as usize)
        })
    }

    /// Every rollback, oldest first.
    pub fn rollbacks(&mut self) -> Result<Vec<Rollback>> {
        self.read()
            .rows(
                "SELECT new_version, bad_version, bad_loss, restored_version, restored_loss, threshold, at_ms FROM rollbacks ORDER BY new_version",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(Rollback {
                    new_version: r.u64(0)?,
                    bad_version: r.u64(1)?,
                    bad_loss: r.f64(2)? as f32,
                    restored_version: r.u64(3)?,
                    restored_loss: r.f64(4)? as f32,
                    threshold: r.f64(5)? as f32,
                    at_ms: r.u64(6)?,
                })
            })
            .collect()
    }

    /// Tokens of the updates folded into recorded versions (not those a rollback discarded).
    pub fn tokens_applied(&mut self) -> Result<u64> {
        let r = self.read().row(
            "SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM updates WHERE outcome = 'applied'",
            &[],
        )?;
        Ok(r.map_or(Ok(0), |r| r.u64(0))?)
    }

    /// Accepted updates not yet folded into a recorded version, in arrival order.
    pub fn pending_updates(&mut self) -> Result<Vec<PendingUpdate>> {
        self.read()
            .rows(
                "SELECT staleness, tokens, weight, payload, received_ms, participant, unit_id, frag_offset, frag_len, payload_key FROM updates WHERE applied_version IS NULL AND held = 0 ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(PendingUpdate {
                    unit_id: r.u64(6)?,
                    fragment: fragment_from(r.i64(7)?, r.i64(8)?),
                    participant: r.text(5)?,
                    verdict: Verdict {
                        staleness: r.u64(0)?,
                        tokens: r.u64(1)?,
                        weight: r.f64(2)? as f32,
                    },
                    payload: r.blob(3)?,
                    payload_key: r.opt_text(9)?,
                    received_ms: r.u64(4)?,
                })
            })
            .collect()
    }
}

/// One change of [`Db::apply_ledger`].
fn apply_change(
    tx: &mut dyn Exec,
    c: &LedgerChange,
    run: &str,
    version: u64,
    leaves: &mut Vec<Leaf>,
) -> Result<()> {
    match c {
        LedgerChange::Granted {
            participant,
            unit_id,
            tokens,
        } => {
            tx.exec(
                "UPDATE updates SET credit = 'granted' WHERE unit_id = $1 AND participant = $2 AND credit = 'pending'",
                p![*unit_id, participant],
            )?;
            tx.exec(
                "UPDATE participants SET granted = granted + $2 WHERE id = $1",
                p![participant, *tokens],
            )?;
            let leaf = grant_leaf(tx, run, version, participant, *unit_id, *tokens)?;
            let idx = tx
                .row("SELECT COUNT(*) FROM ledger", &[])?
                .map_or(Ok(0), |r| r.i64(0))?;
            tx.exec(
                "INSERT INTO ledger (idx, unit_id, leaf) VALUES ($1, $2, $3)",
                p![idx, *unit_id, serde_json::to_string(&leaf)?],
            )?;
            leaves.push(leaf);
        }
        LedgerChange::Verified {
            participant,
            unit_id,
        } => {
            tx.exec(
                "UPDATE updates SET held = 0, verified = 1 WHERE unit_id = $1 AND participant = $2 AND held < 2",
                p![*unit_id, participant],
            )?;
            tx.exec(
                "UPDATE participants SET verified = verified + 1 WHERE id = $1",
                p![participant],
            )?;
        }
        LedgerChange::Unverified {
            participant,
            unit_id,
            ..
        } => {
            tx.exec(
                "UPDATE updates SET verified = 0 WHERE unit_id = $1 AND participant = $2",
                p![*unit_id, participant],
            )?;
            tx.exec(
                "UPDATE participants SET verified = CASE WHEN verified > 0 THEN verified - 1 ELSE 0 END WHERE id = $1",
                p![participant],
            )?;
        }
        LedgerChange::Dropped {
            participant,
            unit_id,
            tokens,
        } => {
            tx.exec(
                "UPDATE updates SET credit = 'forfeited', held = 2, payload = NULL WHERE unit_id = $1 AND participant = $2",
                p![*unit_id, participant],
            )?;
            tx.exec(
                "UPDATE participants SET forfeited = forfeited + $2 WHERE id = $1",
                p![participant, *tokens],
            )?;
        }
        LedgerChange::Checked {
            verifier,
            participant,
            unit_id,
            tokens,
        } => {
            tx.exec(
                "INSERT INTO verifications (unit_id, participant, verifier, tokens) VALUES ($1, $2, $3, $4)",
                p![*unit_id, participant, verifier, *tokens],
            )?;
            tx.exec(
                "UPDATE participants SET verifications = verifications + 1 WHERE id = $1",
                p![verifier],
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
            tx.exec(
                "UPDATE updates SET verified = 0 WHERE unit_id = $1 AND participant = $2",
                p![*unit_id, participant],
            )?;
            for u in forfeited {
                tx.exec(
                    "UPDATE updates SET credit = 'forfeited' WHERE unit_id = $1 AND participant = $2 AND credit = 'pending'",
                    p![*u, participant],
                )?;
            }
            // Its held updates never enter the model.
            tx.exec(
                "UPDATE updates SET held = 2, payload = NULL WHERE participant = $1 AND held = 1",
                p![participant],
            )?;
            // Those taken back out of it: out of the open round (never replayed after a
            // restart) or out of a version's weights.
            for u in reverted {
                tx.exec(
                    "UPDATE updates SET held = 2, outcome = 'reverted', payload = NULL WHERE unit_id = $1 AND participant = $2",
                    p![*u, participant],
                )?;
            }
            tx.exec(
                "UPDATE participants SET banned = 1, forfeited = forfeited + $2, last_rejection = $3 WHERE id = $1",
                p![participant, *tokens, format!("FailedReexecution: {detail}")],
            )?;
        }
    }
    Ok(())
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
