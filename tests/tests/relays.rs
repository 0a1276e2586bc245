//! Several relays, one run, on a real PostgreSQL and a real S3-compatible server: one relay
//! leads, the others wait as standbys; the leader killed (SIGKILL), paused (SIGSTOP, then
//! SIGCONT) or fenced out loses nothing, and a participant given every relay's address carries
//! on through whichever leads. Edge relays (`--edge`) serve participants at the same time,
//! forwarding to whichever relay leads; one killed loses nothing either.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tessera_e2e::stores::{Postgres, S3, relay_with};
use tessera_e2e::*;

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn version(port: u16) -> u64 {
    try_status(port).map_or(0, |s| u(&s["model_version"]))
}

/// A relay of the run kept in `pg` and `s3` (its own checkpoint cache in `dir/NAME-ck`).
fn relay(dir: &Path, name: &str, port: u16, pg: &Postgres, s3: &S3) -> Proc {
    relay_with(dir, name, port, pg, s3, &[])
}

fn model_bytes(port: u16, version: u64) -> Vec<u8> {
    let mut resp = ureq::get(&format!("http://127.0.0.1:{port}/api/model/{version}"))
        .call()
        .unwrap_or_else(|e| panic!("GET version {version} from :{port}: {e}"));
    resp.body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap()
}

fn signal(p: &Proc, sig: &str) {
    let (ok, out) = run_cmd(Command::new("kill").args([sig, &p.child.id().to_string()]));
    assert!(ok, "kill {sig}: {out}");
}

#[test]
fn relays_on_postgres_and_s3_hand_over_the_lead_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = Postgres::start(d);
    let s3 = S3::start(d, "tessera");
    let (pa, pb, pc) = (free_port(), free_port(), free_port());

    let mut a = relay(d, "a", pa, &pg, &s3);
    wait_until(Duration::from_secs(60), "relay a leads and serves", || {
        try_status(pa).is_some()
    });
    let mut b = relay(d, "b", pb, &pg, &s3);
    wait_until(
        Duration::from_secs(30),
        "relay b waits as a standby",
        || !b.lines_with("standby").is_empty(),
    );
    assert!(try_status(pb).is_none(), "a standby serves nothing");
    let relays = [pa, pb, pc]
        .map(|p| format!("ws://127.0.0.1:{p}/ws"))
        .join(",");
    let host = Proc::spawn(
        &bin("tessera-host"),
        &[
            "join".into(),
            relays,
            "--backend".into(),
            "cpu".into(),
            "--key".into(),
            d.join("h.key").display().to_string(),
        ],
        d.join("host.log"),
    );
    wait_until(Duration::from_secs(120), "relay a makes 5 versions", || {
        version(pa) >= 5
    });

    // 1. The leader dies (SIGKILL): its session ends, the standby takes the lead at once,
    // restores the run from PostgreSQL and the version from S3, and serves the same bytes.
    let before = version(pa);
    let served_by_a = model_bytes(pa, before);
    a.kill9();
    wait_until(Duration::from_secs(30), "relay b takes over", || {
        try_status(pb).is_some()
    });
    assert!(
        version(pb) >= before,
        "b resumed at {} < {before}",
        version(pb)
    );
    assert!(
        model_bytes(pb, before) == served_by_a,
        "b serves other bytes for version {before} than a did"
    );
    wait_until(
        Duration::from_secs(120),
        "the participant carries on through relay b",
        || version(pb) >= before + 5,
    );

    // 2. The leader pauses (SIGSTOP): it stops beating; after the lead timeout the standby
    // ends its session and takes over. Resumed (SIGCONT), the old leader's next write fails and
    // it stops rather than serve a run it no longer leads.
    let mut c = relay(d, "c", pc, &pg, &s3);
    wait_until(
        Duration::from_secs(30),
        "relay c waits as a standby",
        || !c.lines_with("standby").is_empty(),
    );
    signal(&b, "-STOP");
    wait_until(Duration::from_secs(30), "relay c takes over", || {
        try_status(pc).is_some()
    });
    let taken = version(pc);
    signal(&b, "-CONT");
    let exit = b.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|s| !s.success()),
        "the paused leader, resumed, must stop: {exit:?}\n{}",
        b.output()
    );
    assert!(
        !b.lines_with("no longer the run's leader").is_empty(),
        "{}",
        b.output()
    );
    wait_until(
        Duration::from_secs(120),
        "the participant carries on through relay c",
        || version(pc) >= taken + 5,
    );

    // The participant leaves: c's latest version is the run's last.
    drop(host);
    std::thread::sleep(Duration::from_secs(1));
    let latest = version(pc);
    let served_by_c = model_bytes(pc, latest);

    // 3. The fence itself: a newer epoch (what a new leader writes) refuses the leader's
    // next write, even on a session that lives.
    let mut client = pg.client();
    client
        .execute("UPDATE leadership SET epoch = epoch + 1", &[])
        .unwrap();
    let exit = c.wait_exit(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| !s.success()), "{}", c.output());
    assert!(!c.lines_with("fenced").is_empty(), "{}", c.output());

    // 4. A relay whose cache holds its own, never recorded, files of the run's latest version
    // number (a leader fenced between writing them and its version's row) takes the lead and
    // serves the recorded version, fetched from S3, not its own.
    let recorded: i64 = pg
        .client()
        .query_one("SELECT MAX(version) FROM versions", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        recorded as u64, latest,
        "c recorded nothing after its last served version"
    );
    let planted = d.join("d-ck");
    std::fs::create_dir_all(&planted).unwrap();
    // Another version's files, as this relay's own of that number.
    let other = std::fs::read_dir(d.join("b-ck"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("momentum-v")?
                .strip_suffix(".safetensors")?
                .parse::<u64>()
                .ok()
        })
        .find(|v| *v != latest)
        .expect("b cached versions");
    for kind in ["model", "momentum"] {
        std::fs::copy(
            d.join("b-ck")
                .join(format!("{kind}-v{other:08}.safetensors")),
            planted.join(format!("{kind}-v{latest:08}.safetensors")),
        )
        .unwrap();
    }
    let pd = free_port();
    let _d = relay(d, "d", pd, &pg, &s3);
    wait_until(Duration::from_secs(60), "relay d takes the lead", || {
        try_status(pd).is_some()
    });
    assert!(
        model_bytes(pd, latest) == served_by_c,
        "relay d serves version {latest} as c recorded it, not its cached files"
    );

    // Nothing lost, nothing twice: versions 0..=max each recorded once; every update folded
    // into a version counted by exactly one; no unit accepted twice; every unit the participant
    // was told was accepted is in the store.
    let one = |sql: &str| -> i64 { pg.client().query_one(sql, &[]).unwrap().get(0) };
    let versions = one("SELECT COUNT(*) FROM versions");
    let max = one("SELECT MAX(version) FROM versions");
    assert_eq!(versions, max + 1, "versions are contiguous");
    assert!(max as u64 >= taken + 5);
    assert_eq!(
        one("SELECT CAST(COALESCE(SUM(updates), 0) AS BIGINT) FROM versions"),
        one("SELECT COUNT(*) FROM updates WHERE outcome = 'applied'"),
        "each applied update is in exactly one version"
    );
    assert_eq!(
        one(
            "SELECT COUNT(*) FROM (SELECT unit_id FROM updates GROUP BY unit_id HAVING COUNT(*) > 1) t"
        ),
        0,
        "no unit accepted twice"
    );
    assert_eq!(
        one("SELECT epoch FROM leadership"),
        5,
        "a, b, c, the fence, d"
    );
    let host_log = std::fs::read_to_string(d.join("host.log")).unwrap();
    let acked: Vec<i64> = host_log
        .lines()
        .filter(|l| l.contains("; accepted"))
        .filter_map(|l| l.strip_prefix("unit ")?.split(' ').next()?.parse().ok())
        .collect();
    assert!(acked.len() as i64 >= max / 2, "{host_log}");
    for unit in &acked {
        let n: i64 = client
            .query_one("SELECT COUNT(*) FROM updates WHERE unit_id = $1", &[unit])
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "unit {unit}, acknowledged, is stored once");
    }
}

/// The units a participant's log says were accepted.
fn accepted_units(log: &Path) -> Vec<i64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("; accepted"))
        .filter_map(|l| l.strip_prefix("unit ")?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn edge_relays_serve_one_run_together_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = Postgres::start(d);
    let s3 = S3::start(d, "tessera");
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let edges_ports = [free_port(), free_port(), free_port()];

    // Three candidates for the lead, three edges.
    let mut a = relay(d, "a", pa, &pg, &s3);
    wait_until(Duration::from_secs(60), "relay a leads and serves", || {
        try_status(pa).is_some()
    });
    let b = relay(d, "b", pb, &pg, &s3);
    let c = relay(d, "c", pc, &pg, &s3);
    for s in [&b, &c] {
        wait_until(
            Duration::from_secs(30),
            "relays b and c wait as standbys",
            || !s.lines_with("standby").is_empty(),
        );
    }
    let mut edges: Vec<Proc> = edges_ports
        .iter()
        .enumerate()
        .map(|(i, p)| relay_with(d, &format!("e{i}"), *p, &pg, &s3, &["--edge"]))
        .collect();
    for p in edges_ports {
        wait_until(Duration::from_secs(60), "an edge relay serves", || {
            try_status(p).is_some()
        });
    }
    // Participants spread over the edges: host i reaches edge i first, then the others.
    let hosts: Vec<Proc> = (0..3)
        .map(|i| {
            let urls = (0..3)
                .map(|k| format!("ws://127.0.0.1:{}/ws", edges_ports[(i + k) % 3]))
                .collect::<Vec<_>>()
                .join(",");
            Proc::spawn(
                &bin("tessera-host"),
                &[
                    "join".into(),
                    urls,
                    "--backend".into(),
                    "cpu".into(),
                    "--key".into(),
                    d.join(format!("h{i}.key")).display().to_string(),
                ],
                d.join(format!("host{i}.log")),
            )
        })
        .collect();
    let log = |i: usize| d.join(format!("host{i}.log"));
    wait_until(
        Duration::from_secs(180),
        "every participant has units accepted through its edge, 5 versions made",
        || (0..3).all(|i| !accepted_units(&log(i)).is_empty()) && version(pa) >= 5,
    );
    for (i, p) in edges_ports.iter().enumerate() {
        assert_eq!(
            metric(*p, "tessera_connections"),
            Some(1.0),
            "edge {i} holds its participant's connection"
        );
        assert!(metric(*p, "tessera_forwarded_calls_total").unwrap_or(0.0) > 0.0);
    }
    assert_eq!(
        metric(pa, "tessera_connections"),
        Some(0.0),
        "no participant reaches the leader itself"
    );
    assert!(
        try_status(edges_ports[0]).unwrap()["run"] == try_status(pa).unwrap()["run"],
        "an edge passes /api/status through to the leader"
    );
    // The leader takes forwarded calls only from relays holding the run's key.
    let refused = ureq::post(&format!("http://127.0.0.1:{pa}/edge/call"))
        .header("x-tessera-edge-token", "0".repeat(64))
        .send(&b"anything"[..]);
    assert!(
        matches!(refused, Err(ureq::Error::StatusCode(403))),
        "{refused:?}"
    );
    // A key for the completions API made on the store beside the running leader, used
    // through an edge (passed through, with its Authorization header).
    let out = Command::new(bin("tessera-relay"))
        .args([
            "--store",
            &pg.url(),
            "api-key",
            "--name",
            "edge",
            "--quota",
            "100000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let models: serde_json::Value =
        ureq::get(&format!("http://127.0.0.1:{}/v1/models", edges_ports[1]))
            .header("Authorization", &format!("Bearer {key}"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let completion: serde_json::Value = ureq::post(&format!(
        "http://127.0.0.1:{}/v1/completions",
        edges_ports[1]
    ))
    .header("Authorization", &format!("Bearer {key}"))
    .send_json(serde_json::json!({"model": model, "prompt": "ROMEO:", "max_tokens": 8}))
    .unwrap()
    .body_mut()
    .read_json()
    .unwrap();
    assert!(completion["choices"][0]["text"].is_string(), "{completion}");
    // Every relay serves the same bytes for a version (the edges' from the object store).
    let v = version(pa);
    let leader_bytes = model_bytes(pa, v);
    for p in edges_ports {
        wait_until(Duration::from_secs(10), "the edge has the version", || {
            metric(p, "tessera_model_version").unwrap_or(0.0) >= v as f64
        });
        assert!(
            model_bytes(p, v) == leader_bytes,
            "edge :{p} serves other bytes for version {v} than the leader"
        );
    }

    // 1. An edge dies (SIGKILL): its participant reconnects through the next edge and its
    // units go on being accepted; nothing it was told was accepted is lost.
    let before0 = accepted_units(&log(0)).len();
    edges[0].kill9();
    wait_until(
        Duration::from_secs(120),
        "host 0 carries on through another edge",
        || accepted_units(&log(0)).len() >= before0 + 2,
    );
    assert!(
        std::fs::read_to_string(log(0))
            .unwrap()
            .contains("relay connection lost"),
        "host 0 reconnected"
    );

    // 2. The leader dies (SIGKILL): a standby takes the lead and advertises itself; the edges
    // forward to it and their participants keep their connections.
    let lost = |i: usize| {
        std::fs::read_to_string(log(i))
            .unwrap()
            .matches("relay connection lost")
            .count()
    };
    let lost_before = [lost(1), lost(2)];
    let before = version(pa);
    let accepted_before: Vec<usize> = (0..3).map(|i| accepted_units(&log(i)).len()).collect();
    a.kill9();
    wait_until(Duration::from_secs(30), "b or c takes over", || {
        try_status(pb).is_some() || try_status(pc).is_some()
    });
    let (mut paused, pl, standby, ps) = if try_status(pb).is_some() {
        (b, pb, c, pc)
    } else {
        (c, pc, b, pb)
    };
    wait_until(
        Duration::from_secs(180),
        "every participant has units accepted by the new leader",
        || {
            (0..3).all(|i| accepted_units(&log(i)).len() >= accepted_before[i] + 2)
                && version(pl) >= before + 3
        },
    );

    // 3. The new leader pauses (SIGSTOP) with calls in flight: the last standby takes over
    // after the lead timeout, the edges give up the calls the paused one holds and send them
    // to the new one. Resumed (SIGCONT), the old leader stops.
    let before = version(pl);
    let accepted_before: Vec<usize> = (0..3).map(|i| accepted_units(&log(i)).len()).collect();
    signal(&paused, "-STOP");
    wait_until(
        Duration::from_secs(30),
        "the last standby takes over",
        || try_status(ps).is_some(),
    );
    // Still paused: calls sent to it must not wait for it.
    wait_until(
        Duration::from_secs(60),
        "every participant has units accepted by the last leader",
        || {
            (0..3).all(|i| accepted_units(&log(i)).len() >= accepted_before[i] + 2)
                && version(ps) >= before + 3
        },
    );
    signal(&paused, "-CONT");
    let exit = paused.wait_exit(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| !s.success()), "{}", paused.output());
    assert_eq!(
        [lost(1), lost(2)],
        lost_before,
        "the participants of the surviving edges kept their connections"
    );

    drop(hosts);
    std::thread::sleep(Duration::from_secs(1));
    let latest = version(ps);
    let leader_bytes = model_bytes(ps, latest);
    for p in &edges_ports[1..] {
        wait_until(Duration::from_secs(10), "the edge has the version", || {
            metric(*p, "tessera_model_version").unwrap_or(0.0) >= latest as f64
        });
        assert!(
            model_bytes(*p, latest) == leader_bytes,
            "edge :{p} serves other bytes for version {latest} than the leader"
        );
    }

    // Nothing lost, nothing twice.
    let one = |sql: &str| -> i64 { pg.client().query_one(sql, &[]).unwrap().get(0) };
    let max = one("SELECT MAX(version) FROM versions");
    assert_eq!(
        one("SELECT COUNT(*) FROM versions"),
        max + 1,
        "versions are contiguous"
    );
    assert_eq!(
        one("SELECT CAST(COALESCE(SUM(updates), 0) AS BIGINT) FROM versions"),
        one("SELECT COUNT(*) FROM updates WHERE outcome = 'applied'"),
        "each applied update is in exactly one version"
    );
    assert_eq!(
        one(
            "SELECT COUNT(*) FROM (SELECT unit_id FROM updates GROUP BY unit_id HAVING COUNT(*) > 1) t"
        ),
        0,
        "no unit accepted twice"
    );
    let mut client = pg.client();
    for i in 0..3 {
        for unit in accepted_units(&log(i)) {
            let n: i64 = client
                .query_one("SELECT COUNT(*) FROM updates WHERE unit_id = $1", &[&unit])
                .unwrap()
                .get(0);
            assert_eq!(
                n, 1,
                "unit {unit}, acknowledged to host {i}, is stored once"
            );
        }
    }
    eprintln!(
        "edges: versions 0..={max}, accepted per host {:?}, host 0's log:\n{}",
        (0..3)
            .map(|i| accepted_units(&log(i)).len())
            .collect::<Vec<_>>(),
        std::fs::read_to_string(log(0)).unwrap()
    );
    edges.clear();
    drop(standby);
}

/// With an object store, accepted updates' payloads go there (content-addressed) and their rows
/// keep only the key; a relay taking over replays the open round from it.
#[test]
fn update_payloads_live_in_the_object_store_and_a_new_leader_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = Postgres::start(d);
    let s3 = S3::start(d, "tessera");
    let (pa, pb) = (free_port(), free_port());
    // Rounds that do not close: every accepted update stays pending.
    let round = ["--updates-per-round", "1000", "--round-timeout-secs", "600"];
    let mut a = relay_with(d, "a", pa, &pg, &s3, &round);
    wait_until(Duration::from_secs(60), "relay a leads and serves", || {
        try_status(pa).is_some()
    });
    let b = relay_with(d, "b", pb, &pg, &s3, &round);
    wait_until(
        Duration::from_secs(30),
        "relay b waits as a standby",
        || !b.lines_with("standby").is_empty(),
    );
    let _host = Proc::spawn(
        &bin("tessera-host"),
        &[
            "join".into(),
            format!("ws://127.0.0.1:{pa}/ws,ws://127.0.0.1:{pb}/ws"),
            "--backend".into(),
            "cpu".into(),
            "--key".into(),
            d.join("h.key").display().to_string(),
        ],
        d.join("host.log"),
    );
    let pending = |port: u16| try_status(port).map_or(0, |s| u(&s["pending_updates"]));
    wait_until(Duration::from_secs(120), "3 updates pending", || {
        pending(pa) >= 3
    });
    let one = |sql: &str| -> i64 { pg.client().query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(
        one("SELECT COUNT(*) FROM updates WHERE payload IS NOT NULL OR payload_key IS NULL"),
        0,
        "no payload bytes in PostgreSQL: keys only"
    );
    let key: String = pg
        .client()
        .query_one("SELECT payload_key FROM updates ORDER BY id LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert!(key.starts_with("sha256/"), "{key}");
    a.kill9();
    let stored = one("SELECT COUNT(*) FROM updates WHERE applied_version IS NULL AND held = 0");
    wait_until(Duration::from_secs(30), "relay b takes over", || {
        try_status(pb).is_some()
    });
    assert!(
        pending(pb) as i64 >= stored,
        "b replays the {stored} pending updates from the object store: {}",
        status(pb)
    );
    assert!(!b.lines_with("recovered run").is_empty(), "{}", b.output());
}
