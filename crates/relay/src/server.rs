//! HTTP and WebSocket: the routes, and the protocol on one participant connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tessera_protocol::messages::{ClientMsg, Hello, RunInfo, ServerMsg};
use tessera_protocol::{MAX_CONTROL_BYTES, PROTOCOL_VERSION, decode, encode, identity};
use tokio::sync::broadcast;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::api;
use crate::edge::{Caller, EDGE_TOKEN_HEADER, EdgeCall, Op};
use crate::run::{Metrics, Relay};

/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The page and its scripts, compiled into the binary.
const INDEX_HTML: &str = include_str!("../../../index.html");
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../web/app.js"),
    ),
    (
        "worker.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../web/worker.js"),
    ),
    (
        "chart.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../web/chart.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../../web/style.css"),
    ),
];

/// The page, its scripts, and the browser participant's bundle (the folder
/// `tools/build-web.sh` writes, `web/pkg`, served under `/pkg`): the same on every relay.
pub fn static_routes<S: Clone + Send + Sync + 'static>(bundle: &std::path::Path) -> Router<S> {
    // The bundle changes with every build: revalidate instead of caching.
    let pkg = tower::ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        ))
        .service(ServeDir::new(bundle).precompressed_gzip());
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/web/{file}", get(asset))
        .nest_service("/pkg", pkg)
}

/// Cross-origin isolation, so the tab may share memory between Web Workers (the threaded CPU
/// bundle's SharedArrayBuffer); the page loads nothing from elsewhere.
pub fn isolated(router: Router) -> Router {
    router
        .layer(SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static("cross-origin-opener-policy"),
            header::HeaderValue::from_static("same-origin"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static("cross-origin-embedder-policy"),
            header::HeaderValue::from_static("require-corp"),
        ))
}

/// Builds the router.
pub fn router(relay: Arc<Relay>, bundle: &std::path::Path) -> Router {
    let edge_limit = frame_limit(&relay.run_info) + 2 * MAX_CONTROL_BYTES;
    isolated(
        static_routes(bundle)
            .route("/ws", get(ws::<Relay>))
            .route(
                "/edge/call",
                axum::routing::post(edge_call)
                    .layer(axum::extract::DefaultBodyLimit::max(edge_limit)),
            )
            .route("/api/status", get(status))
            .route("/api/run", get(run_info))
            .route("/api/model/latest", get(latest_model))
            .route("/api/model/{version}", get(model))
            .route("/api/model/{to}/from/{from}", get(model_change))
            .route("/api/corpus", get(corpus))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(api::models))
            .route("/v1/completions", axum::routing::post(api::completions))
            .route("/api/revenue", get(api::revenue))
            .route("/api/ledger", get(ledger_head))
            .route("/api/ledger/ledger.json", get(ledger_info))
            .route("/api/ledger/leaves.jsonl", get(ledger_leaves))
            .route("/api/ledger/checkpoints.jsonl", get(ledger_checkpoints))
            .route("/api/ledger/checkpoint/{version}", get(ledger_checkpoint))
            .route("/api/ledger/proof/{unit}", get(ledger_proof))
            .route("/api/ledger/consistency", get(ledger_consistency))
            .with_state(relay),
    )
}

/// Serves `app` until the process ends.
pub async fn serve(app: Router, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

async fn status(State(r): State<Arc<Relay>>) -> impl IntoResponse {
    axum::Json(r.status())
}

async fn run_info(State(r): State<Arc<Relay>>) -> impl IntoResponse {
    axum::Json(r.run_info.clone())
}

/// A version's weights as a response (immutable: cached for a year).
pub fn safetensors(version: u64, bytes: Arc<Vec<u8>>) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header("x-tessera-version", version.to_string())
        .body(Body::from((*bytes).clone()))
        .expect("valid response")
}

async fn model(State(r): State<Arc<Relay>>, Path(version): Path<String>) -> Response {
    let Ok(v) = version.trim_end_matches(".safetensors").parse::<u64>() else {
        return (StatusCode::BAD_REQUEST, "version must be a number").into_response();
    };
    match r.weights(v) {
        Some(bytes) => {
            r.metrics.weights_served(bytes.len());
            safetensors(v, bytes)
        }
        None => (StatusCode::NOT_FOUND, format!("version {v} is not kept")).into_response(),
    }
}

/// The encoded changes that take a participant from the version it holds to `to`, when the
/// run encodes its version changes and they are smaller than the weights; 404 otherwise (the
/// participant then fetches the weights).
async fn model_change(State(r): State<Arc<Relay>>, Path((to, from)): Path<(u64, u64)>) -> Response {
    match r.model_change(from, to) {
        Some(bytes) => Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::from(bytes))
            .expect("valid response"),
        None => (
            StatusCode::NOT_FOUND,
            format!("no encoded change from v{from} to v{to} smaller than the weights: fetch /api/model/{to}"),
        )
            .into_response(),
    }
}

async fn latest_model(State(r): State<Arc<Relay>>) -> Response {
    let (v, bytes) = r.latest();
    r.metrics.weights_served(bytes.len());
    let mut resp = safetensors(v, bytes);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, "no-cache".parse().expect("header"));
    resp
}

async fn corpus(State(r): State<Arc<Relay>>) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-tessera-sha256", r.run_info.corpus_sha256.clone())
        .body(Body::from((*r.corpus_bytes).clone()))
        .expect("valid response")
}

/// Appends one metric in Prometheus' text format (its help, its type, its value): the leader's
/// and the edges' `/metrics` alike.
pub fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    ));
}

async fn metrics(State(r): State<Arc<Relay>>) -> impl IntoResponse {
    let s = serde_json::to_value(r.status()).unwrap_or_default();
    let g = |k: &str| s.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        write_metric(&mut out, name, kind, help, value)
    };
    metric(
        "tessera_model_version",
        "gauge",
        "Current model version.",
        g("model_version"),
    );
    metric(
        "tessera_accepted_updates_total",
        "counter",
        "Updates accepted.",
        g("accepted_updates"),
    );
    metric(
        "tessera_rejected_updates_total",
        "counter",
        "Updates rejected.",
        g("rejected_updates"),
    );
    metric(
        "tessera_tokens_trained_total",
        "counter",
        "Tokens in accepted updates.",
        g("tokens_trained"),
    );
    metric(
        "tessera_pending_updates",
        "gauge",
        "Updates in the open round.",
        g("pending_updates"),
    );
    let leases = s
        .get("leases")
        .and_then(|l| l.as_array())
        .map_or(0, |l| l.len());
    metric(
        "tessera_leases",
        "gauge",
        "Work units leased.",
        leases as f64,
    );
    metric(
        "tessera_val_loss",
        "gauge",
        "Latest validation loss.",
        g("val_loss"),
    );
    let round = |k: &str| s["round"][k].as_f64().unwrap_or(f64::NAN);
    metric(
        "tessera_round_target",
        "gauge",
        "Updates the open round needs before it closes.",
        round("target"),
    );
    metric(
        "tessera_active_participants",
        "gauge",
        "Participants counted active (holding a lease or recently working).",
        round("active_participants"),
    );
    metric(
        "tessera_outer_lr",
        "gauge",
        "Outer learning rate in force (damped after a rollback).",
        g("outer_lr"),
    );
    metric(
        "tessera_tokens_applied_total",
        "counter",
        "Tokens folded into the model by closed rounds.",
        g("tokens_applied"),
    );
    let guard = &s["guard"];
    metric(
        "tessera_rollbacks_total",
        "counter",
        "Versions rolled back by the guard.",
        guard["rollbacks"].as_array().map_or(0, |r| r.len()) as f64,
    );
    metric(
        "tessera_guard_threshold",
        "gauge",
        "Validation loss above which a version is rolled back.",
        guard["threshold"].as_f64().unwrap_or(f64::NAN),
    );
    metric(
        "tessera_connections",
        "gauge",
        "Open participant connections.",
        r.metrics.connections.load(Ordering::Relaxed) as f64,
    );
    metric(
        "tessera_messages_total",
        "counter",
        "Messages received.",
        r.metrics.messages.load(Ordering::Relaxed) as f64,
    );
    metric(
        "tessera_update_bytes_total",
        "counter",
        "Bytes of update payloads received.",
        r.metrics.update_bytes.load(Ordering::Relaxed) as f64,
    );
    for (name, help, value) in [
        (
            "tessera_weights_served_total",
            "Versions served whole.",
            &r.metrics.weights_served,
        ),
        (
            "tessera_weights_bytes_total",
            "Bytes of versions served whole.",
            &r.metrics.weights_bytes,
        ),
        (
            "tessera_changes_served_total",
            "Versions served as encoded changes from an older one.",
            &r.metrics.changes_served,
        ),
        (
            "tessera_change_bytes_total",
            "Bytes of versions served as encoded changes.",
            &r.metrics.change_bytes,
        ),
        (
            "tessera_update_commits_total",
            "Accepted updates committed to the store.",
            &r.metrics.update_commits,
        ),
        (
            "tessera_update_commit_microseconds_total",
            "Time those commits took.",
            &r.metrics.update_commit_us,
        ),
        (
            "tessera_version_writes_total",
            "Versions written (checkpoint, object store, version row).",
            &r.metrics.version_writes,
        ),
        (
            "tessera_version_write_microseconds_total",
            "Time those writes took.",
            &r.metrics.version_write_us,
        ),
    ] {
        metric(name, "counter", help, value.load(Ordering::Relaxed) as f64);
    }
    let v = &s["verification"];
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    metric(
        "tessera_held_updates",
        "gauge",
        "Updates held out of the model until their re-execution.",
        f("held"),
    );
    metric(
        "tessera_clipped_updates_total",
        "counter",
        "Updates whose distance from the previous round's average was clipped.",
        f("clipped"),
    );
    metric(
        "tessera_probes_total",
        "counter",
        "Loss probes run.",
        f("probes"),
    );
    metric(
        "tessera_probe_seconds_total",
        "counter",
        "Seconds spent on loss probes.",
        f("probe_seconds"),
    );
    metric(
        "tessera_reexecutions_total",
        "counter",
        "Units re-executed by the relay.",
        f("reexecutions"),
    );
    metric(
        "tessera_verifier_checks_total",
        "counter",
        "Units re-executed by verifier participants and found right.",
        f("verifier_checks"),
    );
    metric(
        "tessera_checks_pending",
        "gauge",
        "Re-executions not yet settled.",
        f("checks_pending"),
    );
    metric(
        "tessera_reexecute_seconds_total",
        "counter",
        "Seconds spent re-executing units.",
        f("reexecute_seconds"),
    );
    metric(
        "tessera_banned_participants",
        "gauge",
        "Participants banned after a failed re-execution.",
        f("banned"),
    );
    metric(
        "tessera_reverted_updates_total",
        "counter",
        "Banned participants' updates taken back out of the model.",
        f("reverted"),
    );
    metric(
        "tessera_rechecked_units_total",
        "counter",
        "Units verified on the word of a verifier since banned, re-executed by the relay.",
        f("rechecked"),
    );
    let l = &s["ledger"];
    metric(
        "tessera_ledger_leaves",
        "gauge",
        "Granted units in the contribution log.",
        l["leaves"].as_f64().unwrap_or(f64::NAN),
    );
    metric(
        "tessera_ledger_credit",
        "gauge",
        "Credit granted in the contribution log.",
        l["credit"].as_f64().unwrap_or(f64::NAN),
    );
    metric(
        "tessera_revertible_updates",
        "gauge",
        "Folded updates pending credit that a ban could still take out of the model.",
        f("revertible"),
    );
    out.push_str(
        "# HELP tessera_rejections_total Rejected submissions, by reason.\n# TYPE tessera_rejections_total counter\n",
    );
    if let Some(reasons) = v["rejections"].as_object() {
        for (reason, n) in reasons {
            out.push_str(&format!(
                "tessera_rejections_total{{reason=\"{reason}\"}} {}\n",
                n.as_f64().unwrap_or(0.0)
            ));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// What a participant's connection talks to: this relay's run ([`Relay`]), or, on an edge
/// relay, the leader it forwards every call to ([`crate::edge::Edge`]).
pub trait Hub: Send + Sync + 'static {
    /// The run as participants see it.
    fn run_info(&self) -> &RunInfo;
    /// Counters for `/metrics`.
    fn metrics(&self) -> &Metrics;
    /// New model versions, as they become available here.
    fn subscribe(&self) -> broadcast::Receiver<u64>;
    /// One call of a participant whose hello was checked.
    fn handle(
        self: Arc<Self>,
        caller: Caller,
        op: Op,
    ) -> impl std::future::Future<Output = anyhow::Result<ServerMsg>> + Send;
}

impl Hub for Relay {
    fn run_info(&self) -> &RunInfo {
        &self.run_info
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.versions.subscribe()
    }

    async fn handle(self: Arc<Self>, caller: Caller, op: Op) -> anyhow::Result<ServerMsg> {
        match op {
            // Signature, decoding, checks, probe, database: on a blocking thread, off the
            // async runtime.
            Op::Submit(_) | Op::SubmitVerification(_) => {
                tokio::task::spawn_blocking(move || self.call(&caller, op)).await?
            }
            op => self.call(&caller, op),
        }
    }
}

/// The largest frame a participant of `run` may send: a submission carries the whole
/// pseudo-gradient, plus headroom.
pub fn frame_limit(run: &RunInfo) -> usize {
    run.num_params as usize * 4 + MAX_CONTROL_BYTES
}

/// `/ws`: a participant's connection.
pub async fn ws<H: Hub>(State(h): State<Arc<H>>, upgrade: WebSocketUpgrade) -> Response {
    let limit = frame_limit(h.run_info());
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        // Small per-connection buffers: thousands of mostly idle connections.
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| async move {
            h.metrics().connections.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = connection(h.clone(), socket, limit).await {
                tracing::debug!("connection ended: {e:#}");
            }
            h.metrics().connections.fetch_sub(1, Ordering::Relaxed);
        })
}

async fn send(socket: &mut WebSocket, msg: &ServerMsg) -> anyhow::Result<()> {
    socket.send(Message::Binary(encode(msg).into())).await?;
    Ok(())
}

async fn recv(socket: &mut WebSocket) -> anyhow::Result<Option<Vec<u8>>> {
    loop {
        match socket.recv().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Binary(b))) => return Ok(Some(b.to_vec())),
            Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(Message::Text(_))) => anyhow::bail!("text frames are not part of the protocol"),
            Some(Ok(_)) => continue, // ping/pong
        }
    }
}

async fn fail(socket: &mut WebSocket, message: String) -> anyhow::Result<()> {
    send(
        socket,
        &ServerMsg::Error {
            message: message.clone(),
        },
    )
    .await
    .ok();
    socket.send(Message::Close(None)).await.ok();
    anyhow::bail!(message)
}

async fn connection<H: Hub>(h: Arc<H>, mut socket: WebSocket, limit: usize) -> anyhow::Result<()> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    send(
        &mut socket,
        &ServerMsg::Challenge {
            nonce,
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await?;
    let first = match tokio::time::timeout(HELLO_TIMEOUT, recv(&mut socket)).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return fail(&mut socket, "no hello within 10 s".into()).await,
    };
    let hello: Hello = match decode::<ClientMsg>(&first, MAX_CONTROL_BYTES) {
        Ok(ClientMsg::Hello(h)) => h,
        Ok(_) => return fail(&mut socket, "the first message must be a hello".into()).await,
        Err(e) => return fail(&mut socket, format!("bad hello: {e}")).await,
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return fail(
            &mut socket,
            format!(
                "protocol {} is not supported (relay speaks {PROTOCOL_VERSION})",
                hello.protocol_version
            ),
        )
        .await;
    }
    if let Err(e) = identity::verify(
        &hello.public_key,
        &identity::hello_message(&nonce),
        &hello.signature,
    ) {
        return fail(&mut socket, format!("hello signature: {e}")).await;
    }
    let id = identity::short_id(&hello.public_key);
    let caller = Caller {
        public_key: hello.public_key,
        kind: hello.kind,
        backend: hello.backend.clone(),
        device: hello.device.clone(),
        tokens_per_s: hello.tokens_per_s,
    };
    // Subscribed before the welcome, so no version announced after it is missed.
    let mut versions = h.subscribe();
    let welcome = h.clone().handle(caller.clone(), Op::Join).await?;
    if let ServerMsg::Error { message } = welcome {
        return fail(&mut socket, message).await;
    }
    tracing::info!(
        participant = id,
        kind = hello.kind.as_str(),
        backend = hello.backend,
        "joined"
    );
    send(&mut socket, &welcome).await?;

    let result = async {
        loop {
            tokio::select! {
                v = versions.recv() => {
                    if let Ok(v) = v {
                        send(&mut socket, &ServerMsg::NewVersion { model_version: v }).await?;
                    }
                }
                frame = recv(&mut socket) => {
                    let Some(bytes) = frame? else { return Ok(false) };
                    h.metrics().messages.fetch_add(1, Ordering::Relaxed);
                    let msg = match decode::<ClientMsg>(&bytes, limit) {
                        Ok(m) => m,
                        Err(e) => return fail(&mut socket, format!("bad message: {e}")).await.map(|()| false),
                    };
                    let op = match msg {
                        ClientMsg::Hello(_) => return fail(&mut socket, "hello sent twice".into()).await.map(|()| false),
                        ClientMsg::RequestWork => Op::RequestWork,
                        ClientMsg::Heartbeat { .. } => Op::Heartbeat,
                        ClientMsg::Submit(s) => Op::Submit(s),
                        ClientMsg::RequestVerification => Op::RequestVerification,
                        ClientMsg::SubmitVerification(s) => Op::SubmitVerification(s),
                        ClientMsg::Leave => {
                            h.clone().handle(caller.clone(), Op::Leave).await?;
                            return Ok(true);
                        }
                    };
                    match h.clone().handle(caller.clone(), op).await? {
                        ServerMsg::Error { message } => return fail(&mut socket, message).await.map(|()| false),
                        reply => send(&mut socket, &reply).await?,
                    }
                }
            }
        }
    }
    .await;
    // A participant that left was released already; one whose connection closed is marked
    // disconnected (its leases live on until they expire).
    if !matches!(result, Ok(true))
        && let Err(e) = h.clone().handle(caller, Op::Disconnect).await
    {
        tracing::debug!(participant = id, "marking it disconnected: {e:#}");
    }
    tracing::info!(participant = id, "disconnected");
    result.map(|_| ())
}

/// `/edge/call`: a participant's call forwarded by an edge relay of this run (which shows the
/// run's edge token); answered as on a connection of this relay's own.
async fn edge_call(
    State(r): State<Arc<Relay>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let shown = headers
        .get(EDGE_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // Compared in constant time: the token is the run's key's to give.
    let same = shown.len() == r.edge_token.len()
        && shown
            .bytes()
            .zip(r.edge_token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return (StatusCode::FORBIDDEN, "not an edge relay of this run").into_response();
    }
    let call: EdgeCall = match decode(&body, frame_limit(&r.run_info) + MAX_CONTROL_BYTES) {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad call: {e}")).into_response(),
    };
    match Hub::handle(r, call.caller, call.op).await {
        Ok(reply) => Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::from(encode(&reply)))
            .expect("valid response"),
        Err(e) => internal(e),
    }
}

fn internal(e: anyhow::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response()
}

fn jsonl<T: serde::Serialize>(rows: &[T]) -> Response {
    let mut body = String::new();
    for r in rows {
        body.push_str(&serde_json::to_string(r).expect("ledger rows serialize"));
        body.push('\n');
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn hashes_hex(h: &[[u8; 32]]) -> Vec<String> {
    h.iter().map(hex::encode).collect()
}

async fn ledger_head(State(r): State<Arc<Relay>>) -> Response {
    match r.ledger_head() {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => internal(e),
    }
}

async fn ledger_info(State(r): State<Arc<Relay>>) -> Response {
    axum::Json(r.ledger_info()).into_response()
}

#[derive(serde::Deserialize)]
struct Range {
    start: Option<u64>,
    end: Option<u64>,
}

async fn ledger_leaves(State(r): State<Arc<Relay>>, Query(q): Query<Range>) -> Response {
    match r.ledger_leaves(q.start.unwrap_or(0), q.end) {
        Ok(l) => jsonl(&l),
        Err(e) => internal(e),
    }
}

async fn ledger_checkpoints(State(r): State<Arc<Relay>>) -> Response {
    match r.ledger_checkpoints() {
        Ok(c) => jsonl(&c),
        Err(e) => internal(e),
    }
}

async fn ledger_checkpoint(State(r): State<Arc<Relay>>, Path(version): Path<u64>) -> Response {
    match r.ledger_checkpoint(version) {
        Ok(Some(c)) => axum::Json(c).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("no checkpoint for version {version}"),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

#[derive(serde::Deserialize)]
struct Size {
    size: Option<u64>,
}

async fn ledger_proof(
    State(r): State<Arc<Relay>>,
    Path(unit): Path<u64>,
    Query(q): Query<Size>,
) -> Response {
    match r.ledger_proof(unit, q.size) {
        Ok(Some(inclusion)) => axum::Json(inclusion).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!(
                "unit {unit} is not in the log of that size: not granted yet (its credit is \
                 pending or was forfeited), or granted after the latest signed checkpoint"
            ),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

#[derive(serde::Deserialize)]
struct Sizes {
    from: u64,
    to: u64,
}

async fn ledger_consistency(State(r): State<Arc<Relay>>, Query(q): Query<Sizes>) -> Response {
    match r.ledger_consistency(q.from, q.to) {
        Some(p) => axum::Json(serde_json::json!({
            "from": q.from,
            "to": q.to,
            "proof": hashes_hex(&p),
        }))
        .into_response(),
        None => (
            StatusCode::BAD_REQUEST,
            format!("no log of {} leaves extends one of {}", q.to, q.from),
        )
            .into_response(),
    }
}
