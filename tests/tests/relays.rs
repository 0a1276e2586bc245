//! Several relays, one run, on a real PostgreSQL and a real S3-compatible server: one relay
//! leads, the others wait as standbys; the leader killed (SIGKILL), paused (SIGSTOP, then
//! SIGCONT) or fenced out loses nothing, and a participant given every relay's address carries
//! on through whichever leads.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tessera_e2e::stores::{Postgres, S3};
use tessera_e2e::*;

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn version(port: u16) -> u64 {
    try_status(port).map_or(0, |s| u(&s["model_version"]))
}

/// A relay of the run kept in `pg` and `s3` (its own checkpoint cache in `dir/NAME-ck`).
fn relay(dir: &Path, name: &str, port: u16, pg: &Postgres, s3: &S3) -> Proc {
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--store",
        &pg.url(),
        "--blobs",
        "s3://tessera/run",
        "--key",
        &dir.join("relay.key").display().to_string(),
        "--checkpoints",
        &dir.join(format!("{name}-ck")).display().to_string(),
        "--db",
        &dir.join(format!("{name}.db")).display().to_string(),
        "--lead-timeout-ms",
        "2000",
    ]
    .map(String::from)
    .to_vec();
    Proc::spawn_env(
        &bin("tessera-relay"),
        &args,
        &s3.env(),
        dir.join(format!("relay-{name}.log")),
    )
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
