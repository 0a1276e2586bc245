//! Edge relays: several relays of one run serving participants at once.
//!
//! With `--store postgres://… --blobs s3://… --edge`, a relay terminates participants'
//! connections and serves the bytes they download, but decides nothing: it checks each hello's
//! signature, then forwards every call ([`EdgeCall`]: who the participant is and what it asks)
//! to the run's leader (`POST /edge/call`, shown the run's [`token`]), which answers it as it
//! answers a connection of its own. So identity, leases, pending credit and receipts are the
//! leader's, in the store, whichever relay a participant reaches. The edge finds the leader
//! and the newest version by polling the store (the leadership row's advertised address, the
//! versions table) and serves each version's weights from the object store by its recorded
//! manifest, checked against its content address: every relay serves the same bytes. When the
//! leader changes, calls wait (up to [`FAILOVER_WAIT`]) for the new one to advertise itself;
//! participants keep their connections. Whatever else a participant or a user asks for
//! (status, corpus, ledger, completions) is passed through to the leader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_core::burn::prelude::Device;
use tessera_core::model::Gpt;
use tessera_core::params;
use tessera_protocol::identity::PublicKey;
use tessera_protocol::messages::{ParticipantKind, RunInfo, ServerMsg, Submission};
use tessera_protocol::{MAX_CONTROL_BYTES, decode, encode};
use tokio::sync::{broadcast, watch};

use crate::blobs::Blobs;
use crate::checkpoints::Checkpoints;
use crate::db::Db;
use crate::run::Metrics;
use crate::server::{self, Hub, write_metric};

/// The header an edge relay shows the leader its token in.
pub const EDGE_TOKEN_HEADER: &str = "x-tessera-edge-token";

/// How long a participant's call waits for a leader (one taking over, or advertising itself)
/// before its connection is closed.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(30);

/// How often an edge reads the store for the leader and the newest version.
const POLL: Duration = Duration::from_millis(250);

/// The token every relay of a run derives from the run's signing key: the leader takes
/// forwarded calls only from relays that hold the key.
pub fn token(secret: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"tessera edge token v1\0");
    h.update(secret);
    hex::encode(h.finalize())
}

/// Who a participant is, as its hello (checked by the relay it reached) said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Caller {
    /// Its ed25519 public key.
    pub public_key: PublicKey,
    /// Browser or native.
    pub kind: ParticipantKind,
    /// Backend it trains on.
    pub backend: String,
    /// Its device.
    pub device: String,
    /// Its announced speed.
    pub tokens_per_s: f32,
}

/// What a participant asks: one message of the protocol, plus the connection's start and end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// It connected (answered with the welcome, or an error if it is banned).
    Join,
    /// A unit, or when to ask again.
    RequestWork,
    /// Its leases are alive.
    Heartbeat,
    /// A finished unit.
    Submit(Submission),
    /// A unit to re-execute (verifiers).
    RequestVerification,
    /// A re-execution.
    SubmitVerification(Submission),
    /// It left on purpose: its leases are released.
    Leave,
    /// Its connection closed: its leases live until they expire.
    Disconnect,
}

/// A call forwarded by an edge relay to the leader (postcard, `POST /edge/call`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeCall {
    /// The participant.
    pub caller: Caller,
    /// Its call.
    pub op: Op,
}

/// An edge relay's state.
pub struct Edge {
    run_info: RunInfo,
    metrics: Metrics,
    versions: broadcast::Sender<u64>,
    latest: RwLock<(u64, Arc<Vec<u8>>)>,
    ckpt: Checkpoints,
    db: Mutex<Db>,
    url: String,
    http: reqwest::Client,
    token: String,
    /// The leader's base URL, as last read from the store (a change aborts calls in flight
    /// to the one before: a paused leader never answers them).
    leader: watch::Sender<Option<String>>,
    /// Calls forwarded to the leader, and the microseconds they took.
    forwarded: AtomicU64,
    forwarded_us: AtomicU64,
}

/// Runs `f` on a blocking thread (the store's and the object store's clients block).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

impl Edge {
    /// Connects to the run's store, waits for a leader to advertise itself, learns the run
    /// from it and fetches the newest version. `secret` is the run's signing key (for the
    /// token); `cache` a folder for versions' weights (emptied first: only versions read from
    /// this run's store are served).
    pub async fn open(
        url: &str,
        blobs: Blobs,
        secret: [u8; 32],
        cache: &std::path::Path,
    ) -> Result<Arc<Self>> {
        let url = url.to_string();
        let db = blocking({
            let url = url.clone();
            move || Db::connect_postgres_reader(&url)
        })
        .await?;
        let mut db = Some(db);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        let mut announced = false;
        let (leader, run_info) = loop {
            // The connection goes to the blocking thread and comes back with the answer.
            let mut d = db.take().expect("the store is back after each poll");
            let (d, found) = blocking(move || {
                let found = d.leader();
                Ok((d, found))
            })
            .await?;
            db = Some(d);
            let found = found?;
            if let Some((_, address, _)) = found {
                match fetch_run(&http, &address).await {
                    Ok(run) => break (address, run),
                    Err(e) => tracing::debug!("the leader at {address}: {e:#}"),
                }
            }
            if !announced {
                println!("tessera-relay edge: waiting for the run's leader");
                announced = true;
            }
            tokio::time::sleep(POLL).await;
        };
        if cache.is_dir() {
            std::fs::remove_dir_all(cache)
                .with_context(|| format!("emptying the cache {}", cache.display()))?;
        }
        let specs = params::specs(&Gpt::new(&run_info.model, &Device::flex()));
        let ckpt = Checkpoints::open(cache, specs, 8, Some(blobs))?;
        let db = db.expect("the store is back after each poll");
        let (versions, _) = broadcast::channel(16);
        let edge = Arc::new(Edge {
            run_info,
            metrics: Metrics::default(),
            versions,
            latest: RwLock::new((0, Arc::new(Vec::new()))),
            ckpt,
            db: Mutex::new(db),
            url,
            http,
            token: token(&secret),
            leader: watch::Sender::new(Some(leader)),
            forwarded: AtomicU64::new(0),
            forwarded_us: AtomicU64::new(0),
        });
        edge.clone().poll_once().await?;
        Ok(edge)
    }

    /// The run this edge serves.
    pub fn run_info(&self) -> &RunInfo {
        &self.run_info
    }

    /// Reads the leader and the newest version from the store; fetches a newer version's
    /// weights and announces it.
    async fn poll_once(self: Arc<Self>) -> Result<()> {
        let e = self.clone();
        let (leader, newest) = blocking(move || {
            let mut db = e.db.lock().expect("db lock");
            let leader = db.leader()?;
            let newest = db.latest_version()?;
            Ok((leader, newest))
        })
        .await?;
        let leader = leader.map(|(_, address, _)| address);
        self.leader.send_if_modified(|l| {
            let changed = *l != leader;
            *l = leader;
            changed
        });
        let current = self.latest.read().expect("latest lock").0;
        if newest > current || self.latest.read().expect("latest lock").1.is_empty() {
            let bytes = self.clone().weights_from_store(newest).await?;
            *self.latest.write().expect("latest lock") = (newest, bytes);
            let _ = self.versions.send(newest);
        }
        Ok(())
    }

    /// Polls the store until the process ends; reconnects when the store connection fails.
    pub async fn poll_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(POLL).await;
            if let Err(e) = self.clone().poll_once().await {
                tracing::warn!("reading the run's store: {e:#}");
                let url = self.url.clone();
                match blocking(move || Db::connect_postgres_reader(&url)).await {
                    Ok(db) => *self.db.lock().expect("db lock") = db,
                    Err(e) => tracing::warn!("reconnecting to the store: {e:#}"),
                }
            }
        }
    }

    /// `version`'s weights: from this edge's cache, else from the object store by the
    /// manifest its row names.
    async fn weights_from_store(self: Arc<Self>, version: u64) -> Result<Arc<Vec<u8>>> {
        blocking(move || {
            if let Some(bytes) = self.ckpt.read_weights(version) {
                return Ok(Arc::new(bytes));
            }
            let stored = self
                .db
                .lock()
                .expect("db lock")
                .version_checkpoint(version)?
                .with_context(|| format!("version {version} is not recorded"))?;
            Ok(Arc::new(self.ckpt.fetch_weights(version, &stored)?))
        })
        .await
    }

    /// The leader's base URL, waiting for one to advertise itself until `deadline`.
    async fn leader_until(&self, deadline: Instant) -> Result<String> {
        let mut rx = self.leader.subscribe();
        let found = tokio::time::timeout_at(deadline.into(), rx.wait_for(|l| l.is_some())).await;
        match found {
            Ok(Ok(l)) => Ok(l.clone().expect("waited for some")),
            _ => bail!(
                "no leader of the run reachable for {} s",
                FAILOVER_WAIT.as_secs()
            ),
        }
    }

    /// Forwards one call to the leader. A leader that cannot be reached (gone, or being
    /// replaced), or that the store stops naming while the call is in flight (paused: it would
    /// never answer), is given up and the call goes to the next one to advertise itself, for
    /// up to [`FAILOVER_WAIT`] from the first failure. A call the old leader had committed
    /// before it went comes back refused by the new one (the unit is taken): nothing twice.
    async fn forward(&self, call: &EdgeCall) -> Result<ServerMsg> {
        let started = Instant::now();
        let body = bytes::Bytes::from(encode(call));
        let mut deadline = None;
        loop {
            let leader = self
                .leader_until(deadline.unwrap_or_else(|| Instant::now() + FAILOVER_WAIT))
                .await?;
            let mut named = self.leader.subscribe();
            let replaced = async {
                let _ = named
                    .wait_for(|l| l.as_deref() != Some(leader.as_str()))
                    .await;
            };
            let send = self
                .http
                .post(format!("{leader}/edge/call"))
                .header(EDGE_TOKEN_HEADER, &self.token)
                .body(body.clone())
                .send();
            let sent = tokio::select! {
                sent = send => sent,
                () = replaced => {
                    tracing::warn!("the leader at {leader} was replaced during a call; retrying with the next");
                    deadline.get_or_insert(Instant::now() + FAILOVER_WAIT);
                    continue;
                }
            };
            match sent {
                Ok(resp) if resp.status().is_success() => {
                    let bytes = resp.bytes().await?;
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                    self.forwarded_us
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    return Ok(decode(&bytes, MAX_CONTROL_BYTES)?);
                }
                Ok(resp) if resp.status() == StatusCode::FORBIDDEN => {
                    bail!(
                        "the leader at {leader} refused this edge: is --key the run's key? ({})",
                        resp.text().await.unwrap_or_default()
                    )
                }
                Ok(resp) => {
                    let status = resp.status();
                    bail!(
                        "the leader at {leader} answered {status}: {}",
                        resp.text().await.unwrap_or_default()
                    )
                }
                Err(e) => {
                    tracing::warn!("the leader at {leader} is unreachable ({e}); waiting for one");
                    let until = *deadline.get_or_insert(Instant::now() + FAILOVER_WAIT);
                    if Instant::now() > until {
                        bail!(
                            "no leader of the run reachable for {} s",
                            FAILOVER_WAIT.as_secs()
                        );
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }
}

async fn fetch_run(http: &reqwest::Client, leader: &str) -> Result<RunInfo> {
    let resp = http
        .get(format!("{leader}/api/run"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?;
    Ok(serde_json::from_slice(&resp.bytes().await?)?)
}

impl Hub for Edge {
    fn run_info(&self) -> &RunInfo {
        &self.run_info
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.versions.subscribe()
    }

    async fn handle(self: Arc<Self>, caller: Caller, op: Op) -> Result<ServerMsg> {
        if let Op::Submit(s) | Op::SubmitVerification(s) = &op {
            self.metrics
                .update_bytes
                .fetch_add(s.payload.data.len() as u64, Ordering::Relaxed);
        }
        self.forward(&EdgeCall { caller, op }).await
    }
}

/// The edge relay's routes: the page, `/ws`, versions' weights and `/metrics` here; the rest
/// passed through to the leader.
pub fn router(edge: Arc<Edge>, bundle: &std::path::Path) -> Router {
    server::isolated(
        server::static_routes(bundle)
            .route("/ws", get(server::ws::<Edge>))
            .route("/api/model/latest", get(latest_model))
            .route("/api/model/{version}", get(model))
            .route("/metrics", get(metrics))
            .fallback(pass_through)
            .with_state(edge),
    )
}

async fn latest_model(State(e): State<Arc<Edge>>) -> Response {
    let (v, bytes) = e.latest.read().expect("latest lock").clone();
    e.metrics.weights_served(bytes.len());
    let mut resp = server::safetensors(v, bytes);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, "no-cache".parse().expect("header"));
    resp
}

async fn model(State(e): State<Arc<Edge>>, Path(version): Path<String>) -> Response {
    let Ok(v) = version.trim_end_matches(".safetensors").parse::<u64>() else {
        return (StatusCode::BAD_REQUEST, "version must be a number").into_response();
    };
    {
        let latest = e.latest.read().expect("latest lock");
        if latest.0 == v {
            e.metrics.weights_served(latest.1.len());
            return server::safetensors(v, latest.1.clone());
        }
    }
    match e.clone().weights_from_store(v).await {
        Ok(bytes) => {
            e.metrics.weights_served(bytes.len());
            server::safetensors(v, bytes)
        }
        Err(err) => (
            StatusCode::NOT_FOUND,
            format!("version {v} is not kept: {err:#}"),
        )
            .into_response(),
    }
}

async fn metrics(State(e): State<Arc<Edge>>) -> Response {
    let mut out = String::new();
    let latest = e.latest.read().expect("latest lock").0;
    let m = &e.metrics;
    for (name, kind, help, value) in [
        (
            "tessera_model_version",
            "gauge",
            "Newest version this edge serves.",
            latest,
        ),
        (
            "tessera_connections",
            "gauge",
            "Open participant connections.",
            m.connections.load(Ordering::Relaxed),
        ),
        (
            "tessera_messages_total",
            "counter",
            "Messages received.",
            m.messages.load(Ordering::Relaxed),
        ),
        (
            "tessera_update_bytes_total",
            "counter",
            "Bytes of update payloads received (forwarded to the leader).",
            m.update_bytes.load(Ordering::Relaxed),
        ),
        (
            "tessera_weights_served_total",
            "counter",
            "Versions served whole.",
            m.weights_served.load(Ordering::Relaxed),
        ),
        (
            "tessera_weights_bytes_total",
            "counter",
            "Bytes of versions served whole.",
            m.weights_bytes.load(Ordering::Relaxed),
        ),
        (
            "tessera_forwarded_calls_total",
            "counter",
            "Participants' calls answered by the leader.",
            e.forwarded.load(Ordering::Relaxed),
        ),
        (
            "tessera_forwarded_call_microseconds_total",
            "counter",
            "Time those calls took, failover waits included.",
            e.forwarded_us.load(Ordering::Relaxed),
        ),
    ] {
        write_metric(&mut out, name, kind, help, value);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Requests bodies passed through are bounded (completions prompts, not updates).
const PASS_THROUGH_LIMIT: usize = 1 << 20;

/// Anything else goes to the leader, as asked (method, path, query, body, the headers that
/// matter), and its answer comes back.
async fn pass_through(State(e): State<Arc<Edge>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, PASS_THROUGH_LIMIT).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request too large").into_response();
    };
    let Some(leader) = e.leader.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the run's leader is being replaced: try again in a few seconds",
        )
            .into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = e
        .http
        .request(parts.method, format!("{leader}{path}"))
        .body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(err) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("the run's leader did not answer: {err}"),
            )
                .into_response();
        }
    };
    let mut back = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if name == header::CONTENT_TYPE
            || name == header::CACHE_CONTROL
            || name.as_str().starts_with("x-tessera-")
        {
            back = back.header(name, value);
        }
    }
    match resp.bytes().await {
        Ok(bytes) => back.body(Body::from(bytes)).expect("valid response"),
        Err(err) => (
            StatusCode::BAD_GATEWAY,
            format!("the run's leader's answer broke off: {err}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_depends_on_the_key() {
        assert_eq!(token(&[1; 32]), token(&[1; 32]));
        assert_ne!(token(&[1; 32]), token(&[2; 32]));
        assert_eq!(token(&[0; 32]).len(), 64);
    }

    #[test]
    fn a_call_round_trips() {
        let call = EdgeCall {
            caller: Caller {
                public_key: [7; 32],
                kind: ParticipantKind::Native,
                backend: "cpu".into(),
                device: "test".into(),
                tokens_per_s: 123.0,
            },
            op: Op::Heartbeat,
        };
        let back: EdgeCall = decode(&encode(&call), MAX_CONTROL_BYTES).unwrap();
        assert_eq!(back, call);
    }
}
