//! Training together on the relay's defaults, as a new user runs it: several native
//! participants of very different speeds, and the guard that rolls a harmful version back.

use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_coordinator::GuardConfig;
use tessera_e2e::client::{self, joined, signed, submit, work};
use tessera_e2e::*;
use tessera_protocol::messages::ServerMsg;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `(version, validation loss)` pairs of a status.
fn history(s: &Value) -> Vec<(u64, f64)> {
    s["val_loss_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (u(&h[0]), h[1].as_f64().unwrap()))
        .collect()
}

/// The relay with no tuning flag at all and three native participants, one of them eight times
/// slower than the others: the model keeps improving, the slow one's units are sized to its
/// speed (so its updates land, none too stale), and the run ends near its best loss.
#[test]
fn default_settings_and_participants_of_different_speeds_keep_improving() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _relay = start_relay(dir.path(), port, &[]);
    let _fast: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("fast{i}"), &[]))
        .collect();
    let slow = start_host(dir.path(), port, "slow", &["--throttle", "8"]);
    wait_until(Duration::from_secs(30), "the slow host's id", || {
        host_id(&slow).is_some()
    });
    let slow_id = host_id(&slow).unwrap();
    let start = Instant::now();
    // A minute of training, then the last evaluated version.
    std::thread::sleep(Duration::from_secs(60).saturating_sub(start.elapsed()));
    let s = status(port);
    let h = history(&s);
    assert!(h.len() >= 10, "too few evaluated versions: {s}");
    let first = h[0].1;
    let best = h.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    let last = h.last().unwrap().1;
    // Keeps falling: the last quarter of the curve is below its second quarter.
    let q = h.len() / 4;
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    let (second, fourth) = (mean(&h[q..2 * q]), mean(&h[3 * q..]));
    eprintln!(
        "versions {} evals {}: first {first:.3}, best {best:.3}, last {last:.3}; quarters {second:.3} -> {fourth:.3}",
        s["model_version"],
        h.len()
    );
    assert!(
        last < first - 3.0,
        "validation loss did not fall: {first} -> {last}"
    );
    assert!(fourth < second, "stopped improving: {second} -> {fourth}");
    assert!(
        last <= best * 1.1 + 0.02,
        "ended at {last}, well above its best {best}: {h:?}"
    );
    assert!(
        s["guard"]["rollbacks"].as_array().unwrap().is_empty(),
        "honest run rolled back: {}",
        s["guard"]
    );
    // The slow participant trains short units that land: nothing was refused as too stale.
    assert_eq!(u(&s["rejected_updates"]), 0, "{s}");
    let slow_p = participant(&s, &slow_id).unwrap();
    assert!(u(&slow_p["accepted_updates"]) >= 2, "{slow_p}");
    let fast_steps = s["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["id"] != slow_id.as_str())
        .map(|p| u(&p["unit_steps"]))
        .max()
        .unwrap();
    assert!(
        u(&slow_p["unit_steps"]) * 3 <= fast_steps,
        "the slow host's units are not sized to its speed: {} vs {fast_steps}",
        slow_p["unit_steps"]
    );
}

/// With verification off, a participant with a valid key sends noise of norm 100 for its units:
/// the version it breaks
/// is found clearly worse than the recent best, the relay rolls back to the last good version
/// (reported in /api/status and /metrics), and the run continues from there.
#[test]
fn the_guard_rolls_a_harmful_version_back_and_the_run_continues() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The guard is the backstop for what verification lets through: here verification is
    // off, so that the noise reaches the model.
    let _relay = start_relay(dir.path(), port, &["--no-verify"]);
    let _hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    wait_until(
        Duration::from_secs(60),
        "honest training below loss 3, past the guard's opening",
        || {
            let h = history(&status(port));
            h.len() > GuardConfig::default().warmup && h.last().is_some_and(|l| l.1 < 3.0)
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secret = [42u8; 32];
    let attacks = rt.block_on(async {
        let (mut ws, run) = joined(port, secret).await;
        let end = Instant::now() + Duration::from_secs(90);
        let mut attacks = 0;
        while Instant::now() < end {
            let unit = work(&mut ws).await;
            let delta = client::noise(run.num_params as usize, 100.0, unit.unit_id);
            let base = client::base(port, &run.model, unit.base_version).sha256;
            if let ServerMsg::Accepted { .. } =
                submit(&mut ws, signed(&secret, &unit, &run.model, base, &delta)).await
            {
                attacks += 1;
            }
            let s = status(port);
            if !s["guard"]["rollbacks"].as_array().unwrap().is_empty() {
                break;
            }
        }
        attacks
    });
    let s = status(port);
    let rollbacks = s["guard"]["rollbacks"].as_array().unwrap();
    assert!(
        !rollbacks.is_empty(),
        "{attacks} harmful updates accepted and nothing rolled back: {}",
        s["guard"]
    );
    let rb = &rollbacks[0];
    assert!(rb["bad_loss"].as_f64().unwrap() > rb["threshold"].as_f64().unwrap());
    assert!(u(&rb["restored_version"]) < u(&rb["bad_version"]));
    assert!(u(&rb["new_version"]) > u(&rb["bad_version"]));
    assert!(metric(port, "tessera_rollbacks_total").expect("tessera_rollbacks_total") >= 1.0);
    // The run goes on from the restored weights: newer versions are good again.
    let new_version = u(&rb["new_version"]);
    let restored_loss = rb["restored_loss"].as_f64().unwrap();
    let threshold = rb["threshold"].as_f64().unwrap();
    wait_until(
        Duration::from_secs(90),
        "good versions after the rollback",
        || {
            let s = status(port);
            let h = history(&s);
            let after: Vec<&(u64, f64)> = h.iter().filter(|x| x.0 > new_version + 3).collect();
            after.len() >= 3 && after.iter().all(|x| x.1 <= threshold)
        },
    );
    let s = status(port);
    let last = history(&s).last().unwrap().1;
    assert!(
        last <= restored_loss * 1.05 + 0.02,
        "after the rollback the run did not continue from the good version: {last} vs {restored_loss}"
    );
    // The rollback is on disk: a version of kind 'rollback' in the ledger.
    let db = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let kind: String = db
        .query_row(
            "SELECT kind FROM versions WHERE version = ?1",
            [new_version as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kind, "rollback");
}

/// Model shards: with `--fragments 2` (and the default schedule), two native participants hold
/// units on different fragments of the same version at once, each uploads its fragment only,
/// each fragment takes its own outer steps and the model learns; a relay killed mid-run
/// resumes with the same fragments, and a restart that asks for other fragments is refused.
#[test]
fn fragment_units_from_two_participants_advance_different_fragments() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--fragments", "2"];
    let mut relay = start_relay(dir.path(), port, &args);
    let _hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    wait_until(
        Duration::from_secs(120),
        "two participants on different fragments of one version",
        || {
            let s = status(port);
            let leases = s["leases"].as_array().unwrap().clone();
            leases.iter().any(|a| {
                leases.iter().any(|b| {
                    a["participant"] != b["participant"]
                        && a["base_version"] == b["base_version"]
                        && a["fragment_offset"] != b["fragment_offset"]
                })
            })
        },
    );
    wait_until(Duration::from_secs(120), "version 12", || {
        u(&status(port)["model_version"]) >= 12
    });
    let s = status(port);
    let frags = s["fragments"].as_array().unwrap();
    assert_eq!(frags.len(), 2, "{s}");
    let (len0, len1) = (u(&frags[0]["len"]), u(&frags[1]["len"]));
    assert_eq!(u(&frags[0]["offset"]), 0);
    assert_eq!(u(&frags[1]["offset"]), len0);
    let tiny = tessera_core::config::ModelConfig::named("tiny").unwrap();
    assert_eq!((len0 + len1) as usize, tiny.num_params(), "{s}");
    for f in frags {
        assert!(u(&f["outer_steps"]) >= 6, "a fragment fell behind: {s}");
    }
    for p in s["participants"].as_array().unwrap() {
        assert!(u(&p["accepted_updates"]) >= 3, "{p}");
    }
    let h = history(&s);
    let (first, last) = (h[0].1, h.last().unwrap().1);
    assert!(last < first - 1.0, "did not learn: {first} -> {last}");

    relay.kill9();
    // Every accepted update covers one fragment, and both fragments came from both hosts.
    let db = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    // (The relay drops a payload once its version is written: what is left is pending.)
    let rows: Vec<(String, i64, i64, Option<i64>)> = db
        .prepare("SELECT participant, frag_offset, frag_len, length(payload) FROM updates")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (_, offset, len, bytes) in &rows {
        let want = if *offset == 0 { len0 } else { len1 } as i64;
        assert_eq!(*len, want, "{rows:?}");
        assert!(bytes.is_none_or(|b| b == 4 * want), "{rows:?}");
    }
    let hosts: std::collections::BTreeSet<&String> = rows.iter().map(|r| &r.0).collect();
    for host in hosts {
        let offsets: std::collections::BTreeSet<i64> =
            rows.iter().filter(|r| &r.0 == host).map(|r| r.1).collect();
        assert_eq!(
            offsets.len(),
            2,
            "{host} trained one fragment only: {rows:?}"
        );
    }
    let version: i64 = db
        .query_row("SELECT MAX(version) FROM versions", [], |r| r.get(0))
        .unwrap();
    drop(db);

    // Other fragments are another run: refused, with the reason.
    let mut other = Proc::spawn(
        &bin("tessera-relay"),
        &[
            "--listen".to_string(),
            format!("127.0.0.1:{}", free_port()),
            "--db".into(),
            dir.path().join("relay.db").display().to_string(),
            "--checkpoints".into(),
            dir.path().join("checkpoints").display().to_string(),
            "--fragments".into(),
            "1".into(),
        ],
        dir.path().join("refused.log"),
    );
    let exit = other.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|e| !e.success()) && other.output().contains("different run"),
        "{exit:?}: {}",
        other.output()
    );

    let _relay = start_relay(dir.path(), port, &args);
    let s = status(port);
    assert!(u(&s["model_version"]) >= version as u64, "{s}");
    assert_eq!(s["fragments"].as_array().unwrap().len(), 2, "{s}");
    wait_until(Duration::from_secs(120), "the run continues", || {
        u(&status(port)["model_version"]) >= version as u64 + 3
    });
}
