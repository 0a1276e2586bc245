//! Verification as work participants do: a `tessera-host join --verifier` whose key the relay
//! trusts re-executes other participants' units in the relay's place, and a trusted verifier
//! that lies about its re-executions is caught by the relay's tie-break and banned, while the
//! honest participant it accused keeps its standing. Real relay and host processes.

use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_e2e::client::{self, recv, send};
use tessera_e2e::*;
use tessera_protocol::identity;
use tessera_protocol::messages::{ClientMsg, RejectReason, ServerMsg};

/// Tokens each run folds (the tiny model).
const TOKENS: &str = "240000";

fn val_history(s: &Value) -> Vec<f64> {
    s["val_loss_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[1].as_f64().unwrap())
        .collect()
}

fn finished(s: &Value) -> bool {
    s["leases"].as_array().unwrap().is_empty()
        && s["round"]["updates"] == 0
        && s["tokens_applied"].as_u64().unwrap() >= 235_000
}

/// A relay with its defaults that trusts `verifier` and folds [`TOKENS`].
fn relay_trusting(dir: &std::path::Path, port: u16, verifier: &str) -> Proc {
    start_relay(
        dir,
        port,
        &[
            "--trusted-verifier",
            verifier,
            "--max-tokens",
            TOKENS,
            "--inner-lr-decay-tokens",
            TOKENS,
        ],
    )
}

/// The id a key file will give a host, writing the key first.
fn key_with_id(dir: &std::path::Path, name: &str, secret: [u8; 32]) -> String {
    std::fs::write(dir.join(format!("{name}.key")), hex::encode(secret)).unwrap();
    identity::short_id(&identity::public_key(&secret))
}

#[test]
fn a_trusted_verifier_host_re_executes_units_in_the_relays_place() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let vid = key_with_id(dir.path(), "v", [21u8; 32]);
    let _relay = relay_trusting(dir.path(), port, &vid);
    let hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    let verifier = start_host(dir.path(), port, "v", &["--verifier"]);
    wait_until(Duration::from_secs(240), "the run folds its tokens", || {
        finished(&status(port))
    });
    let s = status(port);
    let v = &s["verification"];
    let ver = participant(&s, &vid).expect("the verifier in the ledger");
    eprintln!(
        "verifier: {ver}\nverification: {v}\nval {:?}",
        val_history(&s)
    );
    // The verifier did re-executions that the relay found right, and nobody was refused or
    // banned over them.
    let done = ver["verifications"].as_u64().unwrap();
    assert!(done >= 3, "the verifier re-executed {done} units: {ver}");
    assert_eq!(v["verifier_checks"].as_u64().unwrap(), done);
    assert_eq!(v["banned"], 0, "{v}");
    assert_eq!(s["rejected_updates"], 0, "{v}");
    // Every participant's first units passed their check, and the verifier took part of what
    // the relay would otherwise have re-executed itself.
    for h in &hosts {
        let id = host_id(h).expect("host printed its id");
        let p = participant(&s, &id).unwrap();
        assert!(p["verified_units"].as_u64().unwrap() >= 2, "{p}");
    }
    let log = verifier.output();
    assert!(log.contains("verified unit"), "{log}");
    let h = val_history(&s);
    assert!(
        h.last().unwrap() < &(h[0] - 1.0),
        "the model did not improve: {h:?}"
    );
}

/// A trusted verifier that re-executes nothing and sends noise as its result, until the relay
/// stops answering it. Its first result signs a wrong base digest. Returns how many results it
/// sent, whether it was told it is banned, and the relay's answer to the wrong base.
async fn lying_verifier(
    port: u16,
    secret: [u8; 32],
    deadline: Instant,
) -> (u32, bool, Option<ServerMsg>) {
    let (mut ws, run) = client::joined(port, secret).await;
    let mut sent = 0;
    let mut wrong_base = None;
    while Instant::now() < deadline {
        send(&mut ws, &ClientMsg::RequestVerification).await;
        let unit = loop {
            match recv(&mut ws).await {
                Some(ServerMsg::Verify(u)) => break Some(u),
                Some(ServerMsg::NoWork { .. }) => break None,
                Some(ServerMsg::Error { message }) => {
                    return (sent, message.starts_with("banned"), wrong_base);
                }
                None => return (sent, false, wrong_base),
                Some(_) => continue,
            }
        };
        let Some(unit) = unit else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let noise = client::noise(run.num_params as usize, 1.0, unit.unit_id);
        if wrong_base.is_none() {
            let result = tessera_protocol::work::verification(
                &secret, &unit, &run.model, [0; 32], &noise, 1.0, 0.5,
            );
            send(&mut ws, &ClientMsg::SubmitVerification(result)).await;
            wrong_base = loop {
                match recv(&mut ws).await {
                    Some(
                        m @ (ServerMsg::Rejected { .. } | ServerMsg::VerificationReceived { .. }),
                    ) => {
                        break Some(m);
                    }
                    Some(_) => continue,
                    None => return (sent, false, None),
                }
            };
            continue;
        }
        // The lie itself signs the base it was given, so only its values are wrong.
        let base = client::base(port, &run.model, unit.base_version).sha256;
        let result = tessera_protocol::work::verification(
            &secret, &unit, &run.model, base, &noise, 1.0, 0.5,
        );
        send(&mut ws, &ClientMsg::SubmitVerification(result)).await;
        sent += 1;
    }
    (sent, false, wrong_base)
}

#[test]
fn a_verifier_that_lies_is_banned_and_the_participant_it_accused_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let secret = [33u8; 32];
    let liar = identity::short_id(&identity::public_key(&secret));
    let _relay = relay_trusting(dir.path(), port, &liar);
    let hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sent, told, wrong_base) = rt.block_on(lying_verifier(
        port,
        secret,
        Instant::now() + Duration::from_secs(120),
    ));
    let at_ban = status(port)["model_version"].as_u64().unwrap();
    wait_until(Duration::from_secs(240), "the run folds its tokens", || {
        finished(&status(port))
    });
    let s = status(port);
    let l = participant(&s, &liar).expect("the liar in the ledger");
    eprintln!(
        "liar sent {sent}, told banned {told}: {l}\nverification: {}",
        s["verification"]
    );
    // A result from other weights than the unit's base is refused, not judged.
    assert!(
        matches!(
            wrong_base,
            Some(ServerMsg::Rejected {
                reason: RejectReason::BaseMismatch,
                ..
            })
        ),
        "{wrong_base:?}"
    );
    assert!(sent >= 1 && told, "sent {sent}, told it is banned: {told}");
    assert!(l["banned"].as_bool().unwrap(), "{l}");
    assert_eq!(l["verifications"], 0, "{l}");
    let why = l["last_rejection"].as_str().unwrap_or("");
    assert!(why.contains("disagreed with the submission"), "{why}");
    // The honest participants it accused were confirmed by the relay: verified, not banned,
    // nothing of theirs refused; the run went on after the ban.
    for h in &hosts {
        let id = host_id(h).expect("host printed its id");
        let p = participant(&s, &id).unwrap();
        assert!(!p["banned"].as_bool().unwrap(), "{p}");
        assert!(p["verified_units"].as_u64().unwrap() >= 2, "{p}");
    }
    assert_eq!(s["rejected_updates"], 0);
    assert_eq!(s["verification"]["banned"], 1);
    assert!(s["model_version"].as_u64().unwrap() >= at_ban + 2);
}
