//! # tessera-relay
//!
//! The I/O shell around [`tessera_coordinator::Coordinator`]: it accepts participants over
//! WebSockets (axum), feeds the coordinator their messages and the time, and makes what it
//! decides durable:
//!
//! - [`db`]: the store (run, versions, leases, participants, accepted updates, the ledger) in
//!   SQLite, the embedded default, or PostgreSQL (`--store`), where one relay of several leads
//!   the run (advisory lock, fencing epoch checked by every write, heartbeat) and the others
//!   wait to take over; [`sql`] is the one SQL surface both engines run;
//! - [`checkpoints`]: model versions as safetensors files, written atomically, and with
//!   [`blobs`] (`--blobs s3://…`) also to an S3-compatible object store, content-addressed, from
//!   which a relay on another machine restores them (accepted updates' payloads go there too,
//!   their rows keeping the key);
//! - [`ledger`]: the relay's signing key and the contribution log in memory, checkpointed and
//!   signed with every version (leaves and checkpoints are rows of [`db`]);
//! - [`run`]: start-up and crash recovery, the accept and round-close paths (with the
//!   verification pipeline: structural and cheap checks, the loss probe, held units and their
//!   re-execution, credit), evaluation (the validation loss and a text sample of each new
//!   version) and the guard's rollbacks;
//! - [`edge`]: edge relays (`--edge`): several relays serving one run's participants at once,
//!   forwarding their calls to the leader and serving versions from the object store;
//! - [`api`]: the model's usage: an OpenAI-compatible completions API with hashed keys, quotas
//!   and metering, and revenue statements split by each version's stake;
//! - [`verify`]: the compute of verification: the loss probe and re-executing a unit;
//! - [`server`]: HTTP routes (`/ws`, `/edge/call` (edge relays' forwarded calls), `/api/status`, `/api/run`, `/metrics`,
//!   `/api/model/{version}`, `/api/model/{to}/from/{from}` (encoded changes), `/api/corpus`, the ledger under `/api/ledger` (head, export files,
//!   checkpoints, inclusion and consistency proofs), the page and its scripts under `/web/`, the browser
//!   participant's bundle under `/pkg/`) and the per-connection protocol.
//!
//! Durability rule: an update is acknowledged only after it is committed to the database; a
//! model version is recorded only after its checkpoint is stored (on disk, and in the object
//! store when there is one: blobs first, manifest last), in the same transaction that marks its
//! updates applied. A relay killed at any point restarts (or a standby takes over) from the last
//! recorded version and replays the accepted, not yet applied updates: none lost, none applied
//! twice. On PostgreSQL a relay that lost the lead cannot commit: its write fails on the epoch.

pub mod api;
pub mod blobs;
pub mod checkpoints;
pub mod db;
pub mod edge;
pub mod ledger;
pub mod run;
pub mod server;
pub mod sql;
pub mod verify;

/// Milliseconds since the Unix epoch (the only clock the relay reads).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
