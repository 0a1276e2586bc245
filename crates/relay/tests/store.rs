//! The store's every query, run on both engines: the same script of writes on SQLite and on a
//! real PostgreSQL (started for the test) must read back the same; and on PostgreSQL a leader
//! whose epoch is no longer the run's cannot write.

use tessera_coordinator::{LedgerChange, ParticipantStats, Rollback, Verdict};
use tessera_protocol::ledger::Checkpoint;
use tessera_protocol::messages::WorkUnit;
use tessera_protocol::update::{Codec, Fragment};
use tessera_relay::db::{Db, UpdateRecord};

fn participant(id: &str) -> ParticipantStats {
    ParticipantStats {
        id: id.into(),
        kind: "native",
        backend: "cpu".into(),
        device: "test".into(),
        accepted_updates: 0,
        rejected_updates: 0,
        tokens_trained: 0,
        connected: false,
        last_seen_ms: 0,
        tokens_per_s: 0.0,
        unit_steps: 0,
        tokens_pending: 0,
        tokens_granted: 0,
        tokens_forfeited: 0,
        verified_units: 0,
        verifications: 0,
        banned: false,
        last_rejection: None,
    }
}

fn unit(unit_id: u64, fragment: Fragment) -> WorkUnit {
    WorkUnit {
        unit_id,
        base_version: 1,
        shard: unit_id + 100,
        inner_steps: 50,
        batch_size: 8,
        lr: 8e-3,
        warmup_steps: 3,
        seed: 1337,
        fragment,
        codec: Codec::Int8,
        deadline_ms: 9_000 + unit_id,
    }
}

fn checkpoint(version: u64) -> Checkpoint {
    Checkpoint {
        run: "r".into(),
        version,
        log_size: version,
        log_root: [version as u8; 32],
        stake_root: [7; 32],
        total_credit: 10 * version,
        signature: vec![1, 2, 3],
    }
}

/// Every write the relay makes, then every read, as text.
fn script(db: &mut Db) -> String {
    let mut out = Vec::new();
    let mut log = |what: &str, v: String| out.push(format!("{what}: {v}"));
    db.create_run("r", "{\"config\":1}", "model-v0", &checkpoint(0), 1_000)
        .unwrap();
    for (id, key) in [("alice", [1u8; 32]), ("bob", [2u8; 32]), ("eve", [3u8; 32])] {
        db.upsert_participant(&participant(id), &key, 1_100)
            .unwrap();
    }
    db.upsert_participant(&participant("alice"), &[1; 32], 1_200)
        .unwrap();
    let half = Fragment {
        offset: 10,
        len: 20,
    };
    let units: Vec<WorkUnit> = (0..6)
        .map(|i| unit(i, if i % 2 == 0 { Fragment::ALL } else { half }))
        .collect();
    for (i, u) in units.iter().enumerate() {
        db.put_lease(
            ["alice", "bob", "eve"][i % 3],
            u,
            i as u64 + 1,
            2 * i as u64,
        )
        .unwrap();
    }
    db.delete_leases(&[5]).unwrap();
    let template = unit(0, Fragment::ALL);
    let mut leases = db.leases(&template).unwrap();
    leases.sort_by_key(|l| l.unit.unit_id);
    log("leases", format!("{leases:?}"));
    log(
        "counters",
        format!(
            "{} {} {}",
            db.counter("next_unit").unwrap(),
            db.counter("next_shard").unwrap(),
            db.counter("none").unwrap()
        ),
    );
    for (i, u) in units.iter().take(5).enumerate() {
        let who = ["alice", "bob", "eve"][i % 3];
        let payload: Vec<u8> = (0..16).map(|b| (b * (i + 1)) as u8).collect();
        db.record_accepted(&UpdateRecord {
            unit: u,
            unit_id: u.unit_id,
            participant: who,
            base_version: 1,
            verdict: Verdict {
                staleness: i as u64 % 2,
                tokens: 1_000 + i as u64,
                weight: 0.5 + i as f32,
            },
            loss_before: 3.25,
            loss_after: 2.5,
            received_ms: 2_000 + i as u64,
            payload: &payload,
            // Odd ones as the object store keeps them: a key, no bytes in the row.
            payload_key: (i % 2 == 1).then_some("sha256/00ff"),
            sha256: [i as u8 + 10; 32],
            base_sha256: [9; 32],
            signature: &[i as u8; 64],
            probe: (i % 2 == 0).then_some((0.125, -0.25)),
            held: i == 4,
        })
        .unwrap();
    }
    db.record_rejected("eve", "Outlier: far").unwrap();
    log("pending", {
        let p = db.pending_updates().unwrap();
        format!(
            "{:?}",
            p.iter()
                .map(|u| (
                    u.unit_id,
                    u.fragment,
                    &u.participant,
                    u.verdict,
                    &u.payload,
                    &u.payload_key,
                    u.received_ms
                ))
                .collect::<Vec<_>>()
        )
    });
    log("held", {
        let h = db.held_updates(&template).unwrap();
        format!(
            "{:?}",
            h.iter()
                .map(|u| (
                    &u.participant,
                    &u.unit,
                    u.tokens,
                    &u.payload,
                    &u.payload_key
                ))
                .collect::<Vec<_>>()
        )
    });
    db.set_val_loss(0, 5.5).unwrap();
    let n = db
        .record_version(1, "model-v1", &checkpoint(1), 3_000)
        .unwrap();
    log("folded into v1", n.to_string());
    let leaves = db
        .apply_ledger(
            &[
                LedgerChange::Granted {
                    participant: "alice".into(),
                    unit_id: 0,
                    tokens: 1_000,
                },
                LedgerChange::Verified {
                    participant: "bob".into(),
                    unit_id: 1,
                },
                LedgerChange::Checked {
                    verifier: "alice".into(),
                    participant: "bob".into(),
                    unit_id: 1,
                    tokens: 1_001,
                },
                LedgerChange::Unverified {
                    participant: "bob".into(),
                    unit_id: 1,
                    verifier: "alice".into(),
                },
                LedgerChange::Granted {
                    participant: "bob".into(),
                    unit_id: 1,
                    tokens: 1_001,
                },
                LedgerChange::Dropped {
                    participant: "eve".into(),
                    unit_id: 2,
                    tokens: 1_002,
                },
                LedgerChange::Banned {
                    participant: "bob".into(),
                    unit_id: 4,
                    forfeited: vec![4],
                    tokens: 1_004,
                    reverted: vec![1],
                    detail: "cosine 0.1".into(),
                },
            ],
            "r",
            1,
        )
        .unwrap();
    log("leaves appended", format!("{leaves:?}"));
    db.set_val_loss(1, 4.75).unwrap();
    let rb = Rollback {
        new_version: 2,
        bad_version: 1,
        bad_loss: 4.75,
        restored_version: 0,
        restored_loss: 5.5,
        threshold: 5.0,
        at_ms: 4_000,
    };
    let n = db.record_rollback(&rb, "model-v2", &checkpoint(2)).unwrap();
    log("discarded by the rollback", n.to_string());
    let key = [42u8; 32];
    let id = db.create_api_key("customer", &key, 100, 5_000).unwrap();
    log("key", format!("{id} {:?}", db.api_key(&key).unwrap()));
    log(
        "unknown key",
        format!("{:?}", db.api_key(&[0; 32]).unwrap()),
    );
    for (prompt, completion) in [(30, 40), (20, 20), (5, 5)] {
        let ok = db.meter(id, 1, prompt, completion, 5_100).unwrap();
        log("metered", format!("{prompt}+{completion} {ok}"));
    }
    log(
        "usage",
        format!("{:?}", db.usage_by_version(0, u64::MAX).unwrap()),
    );
    let mut participants = db.participants().unwrap();
    participants.sort_by(|a, b| a.id.cmp(&b.id));
    log("participants", format!("{participants:?}"));
    log("latest", db.latest_version().unwrap().to_string());
    log("stored", format!("{:?}", db.version_checkpoint(1).unwrap()));
    log("val", format!("{:?}", db.val_history().unwrap()));
    log("rollbacks", format!("{:?}", db.rollbacks().unwrap()));
    log("tokens applied", db.tokens_applied().unwrap().to_string());
    log("credit", format!("{:?}", db.pending_credit().unwrap()));
    let mut hashes = db.update_hashes().unwrap();
    hashes.sort();
    log("hashes", format!("{hashes:?}"));
    log("log", format!("{:?}", db.ledger_leaves(0, None).unwrap()));
    log(
        "log 1..",
        format!("{:?}", db.ledger_leaves(1, Some(5)).unwrap()),
    );
    log(
        "index",
        format!(
            "{:?} {:?}",
            db.ledger_index(1).unwrap(),
            db.ledger_index(3).unwrap()
        ),
    );
    log(
        "checkpoints",
        format!(
            "{:?} {:?} {:?}",
            db.ledger_checkpoint(None).unwrap(),
            db.ledger_checkpoint(Some(1)).unwrap(),
            db.ledger_checkpoints().unwrap()
        ),
    );
    log("run", format!("{:?}", db.run_config().unwrap()));
    out.join("\n")
}

#[test]
fn the_store_reads_back_the_same_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = Db::open(&dir.path().join("relay.db")).unwrap();
    let on_sqlite = script(&mut sqlite);
    let pg = tessera_e2e::stores::Postgres::start(dir.path());
    let mut postgres =
        Db::connect_postgres(&pg.url(), "test", std::time::Duration::from_secs(5), |_| {
            panic!("nobody else leads")
        })
        .unwrap();
    assert_eq!(postgres.epoch(), Some(1));
    let on_postgres = script(&mut postgres);
    for (a, b) in on_sqlite.lines().zip(on_postgres.lines()) {
        assert_eq!(a, b, "SQLite (left) and PostgreSQL (right) differ");
    }
    assert_eq!(on_sqlite.lines().count(), on_postgres.lines().count());
    assert!(on_sqlite.contains("metered: 20+20 false"), "{on_sqlite}");

    // A newer epoch (another relay took the lead) fences this one: no write commits.
    postgres.beat().unwrap();
    pg.client()
        .execute("UPDATE leadership SET epoch = epoch + 1", &[])
        .unwrap();
    let err = postgres.set_val_loss(1, 1.0).unwrap_err();
    assert!(format!("{err:#}").contains("fenced"), "{err:#}");
    assert!(postgres.beat().is_err());
    let val: Option<f64> = pg
        .client()
        .query_one("SELECT val_loss FROM versions WHERE version = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(val, Some(4.75), "the fenced write changed nothing");
}
