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
/// What the relay answers a verifier's request for a re-execution.
enum ToVerify {
    Unit(tessera_protocol::messages::WorkUnit),
    Nothing,
    /// The connection ended, with the relay's error if it sent one.
    Closed(Option<String>),
}

async fn to_verify(ws: &mut client::Ws) -> ToVerify {
    send(ws, &ClientMsg::RequestVerification).await;
    loop {
        match recv(ws).await {
            Some(ServerMsg::Verify(u)) => return ToVerify::Unit(u),
            Some(ServerMsg::NoWork { .. }) => return ToVerify::Nothing,
            Some(ServerMsg::Error { message }) => return ToVerify::Closed(Some(message)),
            None => return ToVerify::Closed(None),
            Some(_) => continue,
        }
    }
}

async fn lying_verifier(
    port: u16,
    secret: [u8; 32],
    deadline: Instant,
) -> (u32, bool, Option<ServerMsg>) {
    let (mut ws, run) = client::joined(port, secret).await;
    let mut sent = 0;
    let mut wrong_base = None;
    while Instant::now() < deadline {
        let unit = match to_verify(&mut ws).await {
            ToVerify::Unit(u) => u,
            ToVerify::Nothing => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            ToVerify::Closed(error) => {
                let banned = error.is_some_and(|m| m.starts_with("banned"));
                return (sent, banned, wrong_base);
            }
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

/// Units a colluding participant submitted, by unit: what its partner verifier echoes back.
type Submitted = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, Vec<f32>>>>;

/// A trusted verifier colluding with an attacker: it echoes the attacker's own update back as
/// its "re-execution" (agreement) and answers every other unit with noise (disagreement),
/// until it has vouched for `vouch` of the attacker's units and been banned.
async fn colluding_verifier(
    port: u16,
    secret: [u8; 32],
    partner: Submitted,
    vouch: usize,
    deadline: Instant,
) -> usize {
    let (mut ws, run) = client::joined(port, secret).await;
    let mut vouched = 0;
    while Instant::now() < deadline {
        let unit = match to_verify(&mut ws).await {
            ToVerify::Unit(u) => u,
            ToVerify::Nothing => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            ToVerify::Closed(_) => return vouched,
        };
        let echo = partner.lock().unwrap().get(&unit.unit_id).cloned();
        let values = match echo {
            Some(v) => {
                vouched += 1;
                v
            }
            // Until its partner's units are in, it does not take honest ones.
            None if vouched < vouch => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            None => client::noise(run.num_params as usize, 1.0, unit.unit_id),
        };
        let base = client::base(port, &run.model, unit.base_version).sha256;
        let result = tessera_protocol::work::verification(
            &secret, &unit, &run.model, base, &values, 1.0, 0.5,
        );
        send(&mut ws, &ClientMsg::SubmitVerification(result)).await;
    }
    vouched
}

/// The attacker: `units` units answered with small noise, recorded for its partner; then it
/// disconnects.
async fn colluding_attacker(port: u16, secret: [u8; 32], partner: Submitted, units: usize) {
    let (mut ws, run) = client::joined(port, secret).await;
    for _ in 0..units {
        let unit = client::work(&mut ws).await;
        let values = client::noise(run.num_params as usize, 0.05, 1000 + unit.unit_id);
        partner.lock().unwrap().insert(unit.unit_id, values.clone());
        let base = client::base(port, &run.model, unit.base_version).sha256;
        let verdict = client::submit(
            &mut ws,
            client::signed(&secret, &unit, &run.model, base, &values),
        )
        .await;
        assert!(
            matches!(verdict, ServerMsg::Accepted { .. }),
            "the attacker's unit {} was not accepted: {verdict:?}",
            unit.unit_id
        );
    }
}

#[test]
fn what_a_verifier_caught_lying_vouched_for_is_re_checked_and_taken_back_out() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (vs, xs) = ([44u8; 32], [45u8; 32]);
    let liar = identity::short_id(&identity::public_key(&vs));
    let attacker = identity::short_id(&identity::public_key(&xs));
    // No spot checks of the verifier: only what it vouched for can give it away.
    let _relay = start_relay(
        dir.path(),
        port,
        &[
            "--trusted-verifier",
            liar.as_str(),
            "--verifier-recheck-rate",
            "0",
            "--max-tokens",
            TOKENS,
            "--inner-lr-decay-tokens",
            TOKENS,
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let partner = Submitted::default();
    let deadline = Instant::now() + Duration::from_secs(150);
    let liar_task = rt.spawn(colluding_verifier(port, vs, partner.clone(), 2, deadline));
    // The attacker's first two units, held as a new identity's, are let in on the liar's
    // word alone.
    rt.block_on(colluding_attacker(port, xs, partner.clone(), 2));
    wait_until(Duration::from_secs(60), "the liar vouches for both", || {
        participant(&status(port), &attacker)
            .is_some_and(|p| p["verified_units"].as_u64().unwrap_or(0) >= 2)
    });
    // Honest hosts join; the liar disputes their first units; the relay confirms them and
    // bans it.
    let hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    let vouched = rt.block_on(liar_task).unwrap();
    wait_until(Duration::from_secs(240), "the run folds its tokens", || {
        finished(&status(port))
    });
    let s = status(port);
    let v = &s["verification"];
    let x = participant(&s, &attacker).expect("the attacker in the ledger");
    let l = participant(&s, &liar).expect("the liar in the ledger");
    eprintln!("liar vouched {vouched}: {l}\nattacker: {x}\nverification: {v}");
    assert_eq!(vouched, 2, "{l}");
    assert!(l["banned"].as_bool().unwrap(), "{l}");
    // Without its verifier's word the attacker's units were re-executed by the relay,
    // refuted: it is banned, nothing of it granted, both updates taken back out.
    assert!(x["banned"].as_bool().unwrap(), "{x}");
    assert!(v["rechecked"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(x["tokens_granted"], 0, "{x}");
    assert_eq!(x["verified_units"], 0, "{x}");
    assert!(v["reverted"].as_u64().unwrap() >= 2, "{v}");
    for h in &hosts {
        let id = host_id(h).expect("host printed its id");
        let p = participant(&s, &id).unwrap();
        assert!(!p["banned"].as_bool().unwrap(), "{p}");
    }
    let h = val_history(&s);
    assert!(
        h.last().unwrap() < &(h[0] - 1.0),
        "the model did not improve: {h:?}"
    );
}
