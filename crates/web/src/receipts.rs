//! The tab's receipts, checked in the tab: `checkReceipts(relay, receipts)` fetches the relay's
//! latest signed checkpoint and, for each receipt, its inclusion proof in the log of that size,
//! and checks them with the same code as `tessera-host ledger verify`
//! ([`Receipt::standing`]): the relay's signatures, that the granted leaf is the update the
//! receipt acknowledges, and the proof to the signed root. The page keeps the receipts (in
//! `localStorage`); nothing here trusts the page or the relay.

use serde::{Deserialize, Serialize};
use tessera_protocol::ledger::{Checkpoint, Inclusion, LedgerInfo, Receipt, Standing};
use wasm_bindgen::prelude::*;

use crate::platform::{fetch_bytes, fetch_found};

/// What `/api/ledger` serves (the fields read here).
#[derive(Deserialize)]
struct Head {
    info: LedgerInfo,
    checkpoint: Option<Checkpoint>,
}

/// What the check found, for the page.
#[derive(Debug, Default, Serialize)]
struct Report {
    /// The relay's ledger key (hex), so the page can notice it changing.
    relay_key: String,
    /// The run the relay serves now.
    run: String,
    /// The signed checkpoint checked against (version, log size); 0 without one.
    version: u64,
    log_size: u64,
    /// Receipts of this run checked.
    checked: usize,
    /// Of which granted and proven in the signed log.
    proven: usize,
    /// Of which not in the signed log yet (pending, granted since, or forfeited).
    not_yet: usize,
    /// The credit the proven ones earn.
    credit: u64,
    /// Receipts of other runs (a relay restarted on a new database), not checked.
    other_runs: usize,
    /// What failed, one line each: a receipt or proof that does not verify.
    failures: Vec<String>,
}

/// Checks `receipts` (JSON lines as the relay sent them) against the relay at `relay` (its
/// origin). Resolves to the report; rejects only when the relay cannot be read.
#[wasm_bindgen(js_name = checkReceipts)]
pub fn check_receipts(relay: String, receipts: Vec<String>) -> js_sys::Promise {
    wasm_bindgen_futures::future_to_promise(async move {
        let report = check(&relay, &receipts)
            .await
            .map_err(|e| JsValue::from_str(&e))?;
        report
            .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
            .map_err(|e| JsValue::from_str(&e.to_string()))
    })
}

async fn check(relay: &str, receipts: &[String]) -> Result<Report, String> {
    let body = fetch_bytes(&format!("{relay}/api/ledger")).await?;
    let head: Head =
        serde_json::from_slice(&body).map_err(|e| format!("/api/ledger is not a ledger: {e}"))?;
    let mut report = Report {
        relay_key: hex::encode(head.info.relay_key),
        run: head.info.run.clone(),
        ..Report::default()
    };
    if let Some(c) = &head.checkpoint {
        report.version = c.version;
        report.log_size = c.log_size;
    }
    for line in receipts {
        let r: Receipt = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                report.failures.push(format!("not a receipt ({e}): {line}"));
                continue;
            }
        };
        if r.run != head.info.run {
            report.other_runs += 1;
            continue;
        }
        report.checked += 1;
        let standing = match &head.checkpoint {
            None => r
                .verify_signature(&head.info.relay_key)
                .map(|()| Standing::NotYet),
            Some(c) => {
                let url = format!("{relay}/api/ledger/proof/{}?size={}", r.unit_id, c.log_size);
                let proof: Option<Inclusion> = match fetch_found(&url).await? {
                    Some(b) => Some(
                        serde_json::from_slice(&b)
                            .map_err(|e| format!("{url} is not a proof: {e}"))?,
                    ),
                    None => None,
                };
                r.standing(&head.info.relay_key, c, proof.as_ref())
            }
        };
        match standing {
            Ok(Standing::Proven { credit, .. }) => {
                report.proven += 1;
                report.credit += credit;
            }
            Ok(Standing::NotYet) => report.not_yet += 1,
            Err(e) => report.failures.push(format!("unit {}: {e}", r.unit_id)),
        }
    }
    Ok(report)
}
