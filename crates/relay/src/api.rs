//! The model's usage and what it earns: an OpenAI-compatible completions API (`GET /v1/models`,
//! `POST /v1/completions`; byte tokens, so prompt and completion tokens are bytes) behind API
//! keys kept only as SHA-256 (`tessera-relay api-key` creates them), with a token quota per key
//! (401 for a key the relay does not know, 429 when its quota would be exceeded) and every
//! request metered in the `usage` table and the response's `usage` object; and the revenue
//! statement of a period (`GET /api/revenue`): each version's revenue (tokens served × price)
//! split by that version's signed stake table with largest-remainder rounding, signed by the
//! relay.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tessera_core::burn::prelude::Device;
use tessera_core::checkpoint::weights_from_safetensors;
use tessera_core::model::Gpt;
use tessera_core::{params, tokenizer, train};
use tessera_protocol::ledger::{self, Statement, VersionRevenue};
use tessera_protocol::work;

use crate::now_ms;
use crate::run::Relay;

/// Most tokens one completion may generate.
pub const MAX_COMPLETION_TOKENS: u32 = 2048;

/// The SHA-256 an API key is stored as.
pub fn key_sha256(key: &str) -> [u8; 32] {
    work::sha256(key.as_bytes())
}

/// An OpenAI-style error.
fn error(status: StatusCode, kind: &str, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": code, "param": null}})),
    )
        .into_response()
}

/// An error to answer with (small, unlike a `Response`).
struct ApiError(StatusCode, &'static str, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1, self.2, self.3)
    }
}

/// The model's id in the API.
pub fn model_id(r: &Relay) -> String {
    format!("tessera-{}", r.run_info.name)
}

/// The key a request carries, checked: `(id, quota, used)`.
fn authorize(r: &Relay, headers: &HeaderMap) -> Result<(u64, u64, u64), ApiError> {
    let unauthorized = |m: &str| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            m.to_string(),
        )
    };
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("no API key: send `Authorization: Bearer KEY`"))?;
    match r.db().api_key(&key_sha256(key.trim())) {
        Ok(Some((id, _, quota, used))) => Ok((id, quota, used)),
        Ok(None) => Err(unauthorized("this API key is not known to the relay")),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            format!("{e:#}"),
        )),
    }
}

/// `GET /v1/models`.
pub async fn models(State(r): State<Arc<Relay>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&r, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": model_id(&r), "object": "model", "created": 0, "owned_by": "tessera"}],
    }))
    .into_response()
}

/// A completion request (the fields Tessera honours; others are ignored).
#[derive(serde::Deserialize)]
pub struct CompletionRequest {
    model: String,
    #[serde(default)]
    prompt: Value,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    seed: Option<u64>,
    n: Option<u32>,
    stream: Option<bool>,
}

/// `POST /v1/completions`.
pub async fn completions(
    State(r): State<Arc<Relay>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (key_id, quota, used) = match authorize(&r, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let bad = |m: String| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid",
            m,
        )
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad(format!("the request is not a completion request: {e}")),
    };
    if req.model != model_id(&r) {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model {:?} does not exist here; it is {:?}",
                req.model,
                model_id(&r)
            ),
        );
    }
    if req.stream == Some(true) || req.n.is_some_and(|n| n != 1) {
        return bad("streaming and n > 1 are not supported".into());
    }
    let prompt = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or("").into(),
        Value::Null => String::new(),
        _ => return bad("prompt must be one string".into()),
    };
    let max_tokens = req.max_tokens.unwrap_or(16);
    if max_tokens > MAX_COMPLETION_TOKENS {
        return bad(format!("max_tokens is at most {MAX_COMPLETION_TOKENS}"));
    }
    let prompt_tokens = tokenizer::encode(&prompt);
    let p = prompt_tokens.len() as u64;
    let cost = p + max_tokens as u64;
    let quota_exceeded = |used: u64| {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            format!(
                "this request needs {cost} tokens; the key has {} of its {quota} left",
                quota.saturating_sub(used)
            ),
        )
    };
    if used + cost > quota {
        return quota_exceeded(used);
    }
    let temperature = req.temperature.unwrap_or(1.0);
    let seed = req.seed.unwrap_or_else(now_ms);
    let (version, bytes) = r.latest();
    let model_cfg = r.run_info.model;
    let generated = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u32>> {
        let device = Device::flex();
        let specs = params::specs(&Gpt::new(&model_cfg, &device));
        let values = weights_from_safetensors(&specs, &bytes)?;
        let model = params::load_vec(Gpt::new(&model_cfg, &device), &values)?;
        let out = train::generate(
            &model,
            &prompt_tokens,
            max_tokens as usize,
            temperature,
            seed,
            &device,
        );
        Ok(out[out.len() - max_tokens as usize..].to_vec())
    })
    .await;
    let completion = match generated {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                format!("{e:#}"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                e.to_string(),
            );
        }
    };
    let c = completion.len() as u64;
    // Metered atomically against the quota (a concurrent request may have used it meanwhile).
    match r.db().meter(key_id, version, p, c, now_ms()) {
        Ok(true) => {}
        Ok(false) => return quota_exceeded(quota),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                format!("{e:#}"),
            );
        }
    }
    let created = now_ms() / 1000;
    Json(json!({
        "id": format!("cmpl-{}-{key_id}-{created}", version),
        "object": "text_completion",
        "created": created,
        "model": model_id(&r),
        "system_fingerprint": format!("tessera-v{version}"),
        "choices": [{
            "text": tokenizer::decode(&completion),
            "index": 0,
            "logprobs": null,
            "finish_reason": "length",
        }],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }))
    .into_response()
}

/// The period of a statement: `[from_ms, to_ms)` (the whole run by default).
#[derive(serde::Deserialize)]
pub struct Period {
    from_ms: Option<u64>,
    to_ms: Option<u64>,
}

/// The signed revenue statement of `[from_ms, to_ms)`.
pub fn statement(r: &Relay, from_ms: u64, to_ms: u64) -> anyhow::Result<Statement> {
    let (usage, checkpoints) = {
        let mut db = r.db();
        (
            db.usage_by_version(from_ms, to_ms)?,
            db.ledger_checkpoints()?,
        )
    };
    let by_version: BTreeMap<u64, _> = checkpoints.into_iter().map(|c| (c.version, c)).collect();
    let largest = usage
        .iter()
        .filter_map(|(v, _)| by_version.get(v).map(|c| c.log_size))
        .max()
        .unwrap_or(0);
    let leaves = r.db().ledger_leaves(0, Some(largest))?;
    let mut versions = Vec::new();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut unallocated = 0;
    for (version, tokens) in usage {
        let revenue = ((tokens as u128 * r.price_per_1k as u128) / 1000) as u64;
        // A version served before the relay kept a ledger has no checkpoint: an empty stake.
        let (size, log_root, stake_root) = by_version.get(&version).map_or_else(
            || {
                let empty = ledger::StakeTable::new();
                (0, ledger::root(&[]), ledger::stake_root(&empty))
            },
            |c| (c.log_size, c.log_root, c.stake_root),
        );
        let table = ledger::stake_table(&leaves[..size as usize]);
        anyhow::ensure!(
            ledger::stake_root(&table) == stake_root,
            "version {version}'s stake table does not match its signed checkpoint"
        );
        let shares: BTreeMap<String, u64> = ledger::split(revenue, &table)
            .into_iter()
            .map(|(k, a)| (hex::encode(k), a))
            .collect();
        if shares.is_empty() {
            unallocated += revenue;
        }
        for (k, a) in &shares {
            *totals.entry(k.clone()).or_default() += a;
        }
        versions.push(VersionRevenue {
            version,
            log_size: size,
            log_root,
            stake_root,
            tokens,
            revenue,
            shares,
        });
    }
    let mut st = Statement {
        run: r.run_info.name.clone(),
        from_ms,
        to_ms,
        price_per_1k: r.price_per_1k,
        revenue: versions.iter().map(|v| v.revenue).sum(),
        versions,
        totals,
        unallocated,
        signature: Vec::new(),
    };
    r.sign_statement(&mut st);
    Ok(st)
}

/// `GET /api/revenue?from_ms=&to_ms=`.
pub async fn revenue(State(r): State<Arc<Relay>>, Query(p): Query<Period>) -> Response {
    let to = p.to_ms.unwrap_or_else(now_ms);
    match statement(&r, p.from_ms.unwrap_or(0), to) {
        Ok(st) => Json(st).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}
