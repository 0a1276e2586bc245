//! The attack suite: one participant in four misbehaves (three honest native hosts, one
//! attacker holding a valid key, valid leases and correct signatures). Each attack runs against
//! a clean run with the same settings (four honest hosts), both folding the same number of
//! tokens: the model ends within 2% of the clean run, every attacker update is rejected or held
//! and then refused, each with a reason, and the attacker's granted stake is 0. Controls with
//! the defences off show the harm, so each assertion can fail.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_core::data::Corpus;
use tessera_e2e::attack::{self, Attack, LazySteps, Tally};
use tessera_e2e::*;
use tessera_protocol::identity;

/// Tokens every run folds (the tiny model, a few thousand inner steps in all).
const TOKENS: u64 = 400_000;

struct Outcome {
    val: f64,
    status: Value,
    tally: Option<Tally>,
    attacker: Option<String>,
}

impl Outcome {
    fn attacker(&self) -> &Value {
        let id = self.attacker.as_ref().expect("an attacker");
        participant(&self.status, id).unwrap_or_else(|| panic!("{id} not in the ledger"))
    }
}

fn done(s: &Value) -> bool {
    let h = s["val_loss_history"].as_array().unwrap();
    s["leases"].as_array().unwrap().is_empty()
        && s["round"]["updates"] == 0
        && s["tokens_applied"].as_u64().unwrap() as f64 >= TOKENS as f64 * 0.98
        && h.last().is_some_and(|l| l[0] == s["model_version"])
}

/// One run: three honest hosts and `attack` (or a fourth honest host), defences on or off.
/// Runs take the machine one at a time, so that timing does not differ between the clean run
/// and the attacked ones more than it must.
fn run(attack: Option<(Attack, u32)>, defended: bool, extra: &[&str]) -> Outcome {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tokens = TOKENS.to_string();
    let mut args = vec![
        "--max-tokens",
        tokens.as_str(),
        "--inner-lr-decay-tokens",
        tokens.as_str(),
    ];
    if !defended {
        args.extend(["--no-verify", "--no-guard"]);
    }
    args.extend(extra);
    let _relay = start_relay(dir.path(), port, &args);
    let _hosts: Vec<Proc> = (0..3)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    let secret = [77u8; 32];
    let (tally, attacker, _extra) = match attack {
        Some((a, patience)) => {
            let corpus = Corpus::from_text(
                &tessera_core::corpus::default_corpus(),
                tessera_core::config::ModelConfig::named("tiny")
                    .unwrap()
                    .block_size,
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(240);
            let rt = tokio::runtime::Runtime::new().unwrap();
            let t = rt.block_on(attack::run(port, secret, a, patience, &corpus, deadline));
            let id = identity::short_id(&identity::public_key(&secret));
            (Some(t), Some(id), None)
        }
        None => (None, None, Some(start_host(dir.path(), port, "h3", &[]))),
    };
    wait_until(Duration::from_secs(300), "the run folds its tokens", || {
        done(&status(port))
    });
    let s = status(port);
    let val = s["val_loss_history"].as_array().unwrap().last().unwrap()[1]
        .as_f64()
        .unwrap();
    Outcome {
        val,
        status: s,
        tally,
        attacker,
    }
}

fn clean() -> f64 {
    static CLEAN: OnceLock<f64> = OnceLock::new();
    *CLEAN.get_or_init(|| {
        let o = run(None, true, &[]);
        let v = &o.status["verification"];
        // No honest update is refused.
        assert_eq!(o.status["rejected_updates"], 0, "clean run: {v}");
        assert_eq!(v["banned"], 0, "clean run: {v}");
        eprintln!("clean run: val {:.4}", o.val);
        o.val
    })
}

/// The attack with the defences on: no harm, no stake, reasons given.
fn defended(attack: Attack) {
    let clean = clean();
    let o = run(Some((attack, 0)), true, &[]);
    let t = o.tally.clone().unwrap();
    let a = o.attacker().clone();
    eprintln!(
        "{}: val {:.4} (clean {clean:.4}); attacker accepted {} rejected {:?} banned {}; ledger {a}",
        attack.name(),
        o.val,
        t.accepted,
        t.rejected,
        t.banned
    );
    assert!(
        o.val <= clean * 1.02,
        "{}: validation loss {} against {clean} clean",
        attack.name(),
        o.val
    );
    // Replay's first update is honest work (its later copies are what is refused).
    let honest_first = if attack == Attack::Replay {
        a["tokens_trained"].as_u64().unwrap() / a["accepted_updates"].as_u64().unwrap().max(1)
    } else {
        0
    };
    assert!(
        a["tokens_granted"].as_u64().unwrap() <= honest_first,
        "{}: the attacker holds granted stake: {a}",
        attack.name()
    );
    // Nothing it submitted entered the model: what it was credited with is forfeited.
    let trained = a["tokens_trained"].as_u64().unwrap();
    assert_eq!(
        a["tokens_forfeited"].as_u64().unwrap(),
        trained - honest_first,
        "{}: some of its updates entered the model: {a}",
        attack.name()
    );
    assert!(
        t.banned || !t.rejected.is_empty(),
        "{}: nothing refused",
        attack.name()
    );
    assert!(
        a["last_rejection"].as_str().is_some_and(|r| !r.is_empty()),
        "{}: no reason recorded: {a}",
        attack.name()
    );
}

/// Units a patient attacker trains honestly before it attacks: as many as the relay
/// re-executes of every new identity.
const PATIENCE: u32 = 2;

/// A patient attacker: honest for its first units, then the attack, every unit after. Its
/// attacking updates meet the probe, the norm checks, audits and clipping rather than the
/// probation's re-execution: the model stays within 2% of the clean run, the attacker is
/// caught (refused or banned), what it had folded before is taken back out of the model, and
/// no stake is granted for its attacks (what it may keep is the credit of its honest units,
/// re-executed and found honest, whose window closed before it was caught).
fn patient(attack: Attack) {
    let clean = clean();
    // An update just under every threshold is caught by an audit alone, and a young identity's
    // unit is audited with probability 1/2 by default: over the few attacking units this short
    // run leaves it (k ≈ 6), the attacker escapes with probability 2^-k; one CI run met that.
    // The escape rate is the design (`ScreenConfig::grant_after_rounds`); this test checks what
    // follows a catch (the ban, its folded updates taken back out, no stake), so here every
    // young identity's unit is audited.
    let extra: &[&str] = if attack == Attack::UnderThreshold {
        &["--reexecute-young-rate", "1"]
    } else {
        &[]
    };
    let o = run(Some((attack, PATIENCE)), true, extra);
    let t = o.tally.clone().unwrap();
    let a = o.attacker().clone();
    let reverted = o.status["verification"]["reverted"].as_u64().unwrap();
    eprintln!(
        "patient {}: val {:.4} (clean {clean:.4}); attacker accepted {} (attacks {}) rejected {:?} banned {}, {reverted} updates taken back out; ledger {a}",
        attack.name(),
        o.val,
        t.accepted,
        t.accepted_attacks,
        t.rejected,
        t.banned
    );
    assert!(
        o.val <= clean * 1.02,
        "patient {}: validation loss {} against {clean} clean",
        attack.name(),
        o.val
    );
    assert!(
        t.banned || t.accepted_attacks == 0,
        "patient {}: {} attacking updates accepted and never caught: {a}",
        attack.name(),
        t.accepted_attacks
    );
    assert!(
        a["tokens_granted"].as_u64().unwrap() <= t.honest_tokens,
        "patient {}: the attacker holds granted stake for its attacks ({} honest tokens): {a}",
        attack.name(),
        t.honest_tokens
    );
}

/// The attack with the defences off: the harm shows (the model is worse, or the attacker
/// earns stake for work it did not do).
fn undefended(attack: Attack) {
    let clean = clean();
    let o = run(Some((attack, 0)), false, &[]);
    let a = o.attacker().clone();
    eprintln!(
        "{} undefended: val {:.4} (clean {clean:.4}); ledger {a}",
        attack.name(),
        o.val
    );
    let harm = o.val > clean * 1.02 || a["tokens_granted"].as_u64().unwrap() > 0;
    assert!(harm, "{}: no harm without the defences", attack.name());
}

#[test]
fn noise_at_the_honest_norm() {
    defended(Attack::NoiseHonestNorm);
}

#[test]
fn noise_at_100x_the_honest_norm() {
    defended(Attack::Noise100x);
}

#[test]
fn sign_flipped_updates() {
    defended(Attack::SignFlip);
}

#[test]
fn updates_scaled_by_10() {
    defended(Attack::Scaled(10.0));
}

#[test]
fn updates_scaled_by_a_tenth() {
    defended(Attack::Scaled(0.1));
}

#[test]
fn lazy_zero_steps() {
    defended(Attack::Lazy(LazySteps::Zero));
}

#[test]
fn lazy_one_step() {
    defended(Attack::Lazy(LazySteps::One));
}

#[test]
fn lazy_a_quarter_of_the_steps() {
    defended(Attack::Lazy(LazySteps::Quarter));
}

#[test]
fn replay_of_an_accepted_update() {
    defended(Attack::Replay);
}

#[test]
fn copy_of_the_public_step_with_noise() {
    defended(Attack::CopyPublic);
}

#[test]
fn training_on_another_shard() {
    defended(Attack::WrongShard);
}

#[test]
fn training_on_junk_text() {
    defended(Attack::JunkData);
}

#[test]
fn alie_colluders() {
    defended(Attack::Alie(1.0));
}

#[test]
fn inner_product_manipulation() {
    defended(Attack::Ipm(0.5));
}

#[test]
fn just_under_the_thresholds_in_one_direction() {
    defended(Attack::UnderThreshold);
}

#[test]
fn control_noise_harms_the_model_without_the_defences() {
    undefended(Attack::Noise100x);
}

#[test]
fn control_lazy_participants_earn_stake_without_the_defences() {
    undefended(Attack::Lazy(LazySteps::Zero));
}

#[test]
fn patient_noise_at_the_honest_norm() {
    patient(Attack::NoiseHonestNorm);
}

#[test]
fn patient_sign_flip() {
    patient(Attack::SignFlip);
}

#[test]
fn patient_lazy_a_quarter_of_the_steps() {
    patient(Attack::Lazy(LazySteps::Quarter));
}

#[test]
fn patient_alie_colluders() {
    patient(Attack::Alie(1.0));
}

#[test]
fn patient_inner_product_manipulation() {
    patient(Attack::Ipm(0.5));
}

#[test]
fn patient_just_under_the_thresholds() {
    patient(Attack::UnderThreshold);
}
