//! Relay and native participants as real processes on loopback.

use std::time::Duration;

use tessera_e2e::*;

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn three_participants_complete_rounds_and_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _relay = start_relay(
        dir.path(),
        port,
        &[
            "--inner-steps",
            "20",
            // Every unit exactly 20 steps, whatever the hosts' measured speeds, so that the
            // ledger's tokens can be checked unit by unit.
            "--min-inner-steps",
            "20",
            "--updates-per-round",
            "3",
            "--max-versions",
            "4",
        ],
    );
    let mut hosts: Vec<Proc> = (0..3)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    wait_until(
        Duration::from_secs(180),
        "model version 4 with its validation loss",
        || {
            let s = status(port);
            u(&s["model_version"]) >= 4
                && s["val_loss_history"]
                    .as_array()
                    .is_some_and(|h| h.last().is_some_and(|l| l[0] == 4))
        },
    );
    // Units leased before the last version still come back; wait until every host is idle and
    // has printed its last reply.
    let accepted_seen = |hosts: &Vec<Proc>| -> u64 {
        hosts
            .iter()
            .map(|h| h.lines_with("accepted, model now").len() as u64)
            .sum()
    };
    wait_until(
        Duration::from_secs(60),
        "all leases returned and acknowledged",
        || {
            let s = status(port);
            s["leases"].as_array().unwrap().is_empty()
                && s["verification"]["held"] == 0
                && accepted_seen(&hosts) == u(&s["accepted_updates"])
        },
    );
    let s = status(port);
    let history = s["val_loss_history"].as_array().unwrap();
    let first = history.first().unwrap()[1].as_f64().unwrap();
    let last = history.last().unwrap()[1].as_f64().unwrap();
    assert!(
        last < first - 0.5,
        "validation loss did not fall: {first} -> {last}"
    );
    // K = 3: four versions folded at least twelve updates (a round that waits for the
    // re-execution of a new participant's unit may take in more); later ones wait in the
    // open round.
    let accepted = u(&s["accepted_updates"]);
    let unit_tokens = 20 * 12 * 32;
    let folded = u(&s["tokens_applied"]) / unit_tokens;
    assert!(folded >= 3 * u(&s["model_version"]), "{s}");
    assert_eq!(accepted, folded + u(&s["pending_updates"]), "{s}");
    assert_eq!(u(&s["rejected_updates"]), 0, "{s}");
    assert_eq!(u(&s["tokens_trained"]), accepted * unit_tokens);
    // What the relay credits each participant is what that participant saw accepted.
    let mut total = 0;
    for h in &mut hosts {
        let id = host_id(h).expect("host printed its id");
        let p = participant(&s, &id).unwrap_or_else(|| panic!("{id} missing from {s}"));
        assert_eq!(p["kind"], "native");
        assert_eq!(p["backend"], "cpu");
        let seen = h.lines_with("accepted, model now").len() as u64;
        assert_eq!(
            u(&p["accepted_updates"]),
            seen,
            "{id}: relay and participant disagree"
        );
        assert!(seen >= 1, "{id} contributed nothing");
        total += seen;
    }
    assert_eq!(total, accepted);
    // Prometheus text agrees.
    let metrics = try_metrics(port).expect("the relay serves /metrics");
    assert!(
        metrics.contains(&format!("tessera_accepted_updates_total {accepted}")),
        "{metrics}"
    );
    assert!(metrics.contains("tessera_model_version 4"), "{metrics}");
}

#[test]
fn a_killed_participants_unit_is_trained_by_someone_else() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Long units (several seconds) and short leases.
    let _relay = start_relay(
        dir.path(),
        port,
        &["--inner-steps", "1500", "--lease-secs", "3"],
    );
    let mut a = start_host(dir.path(), port, "a", &[]);
    let mut leased = None;
    wait_until(
        Duration::from_secs(60),
        "participant a holds a lease",
        || {
            let s = status(port);
            leased = s["leases"].as_array().and_then(|l| l.first()).map(|l| {
                (
                    u(&l["unit_id"]),
                    l["participant"].as_str().unwrap().to_string(),
                )
            });
            leased.is_some()
        },
    );
    let (unit, holder) = leased.unwrap();
    assert_eq!(Some(holder.clone()), host_id(&a));
    a.kill9();
    let b = start_host(dir.path(), port, "b", &[]);
    wait_until(Duration::from_secs(30), "b id", || host_id(&b).is_some());
    let b_id = host_id(&b).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the unit passes to b after the lease expires",
        || {
            let s = status(port);
            s["leases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| u(&l["unit_id"]) == unit && l["participant"] == b_id.as_str())
        },
    );
    // b may have started a fresh unit first; the expired one is the next it is given.
    let done = format!("unit {unit} (");
    wait_until(
        Duration::from_secs(120),
        "b's update for the unit is accepted",
        || {
            b.output()
                .lines()
                .any(|l| l.starts_with(&done) && l.contains("accepted"))
        },
    );
    let s = status(port);
    assert_eq!(u(&participant(&s, &holder).unwrap()["accepted_updates"]), 0);
    assert!(u(&participant(&s, &b_id).unwrap()["accepted_updates"]) >= 1);
}

#[test]
fn a_relay_killed_mid_run_resumes_from_what_it_committed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--inner-steps", "30", "--updates-per-round", "2"];
    let mut relay = start_relay(dir.path(), port, &args);
    let _hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(dir.path(), port, &format!("h{i}"), &[]))
        .collect();
    wait_until(Duration::from_secs(120), "version 3", || {
        u(&status(port)["model_version"]) >= 3
    });
    relay.kill9();

    // What was committed at the moment of the kill.
    let db = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let version: i64 = db
        .query_row("SELECT MAX(version) FROM versions", [], |r| r.get(0))
        .unwrap();
    let accepted: i64 = db
        .query_row("SELECT COUNT(*) FROM updates", [], |r| r.get(0))
        .unwrap();
    let pending: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM updates WHERE applied_version IS NULL AND held = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(db);
    assert!(version >= 3);

    let _relay = start_relay(dir.path(), port, &args);
    let s = status(port);
    let expect_version = version as u64 + u64::from(pending >= 2);
    assert_eq!(u(&s["model_version"]), expect_version, "{s}");
    assert_eq!(u(&s["accepted_updates"]), accepted as u64, "{s}");
    // The participants reconnect by themselves and the run goes on.
    wait_until(
        Duration::from_secs(120),
        "the run continues after the restart",
        || u(&status(port)["model_version"]) >= expect_version + 2,
    );
    // No update was applied twice, none was lost: every version folded at least K = 2
    // updates (more when its round waited for a re-execution), and the versions folded as
    // many tokens as the relay says it applied.
    let db = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let mut st = db.prepare("SELECT applied_version, COUNT(*) FROM updates WHERE applied_version IS NOT NULL GROUP BY applied_version").unwrap();
    let rows: Vec<(i64, i64)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(!rows.is_empty());
    for &(v, n) in &rows {
        assert!(n >= 2, "version {v} folded {n} updates: {rows:?}");
    }
    let folded_tokens: i64 = db
        .query_row(
            "SELECT SUM(tokens) FROM updates WHERE applied_version IS NOT NULL AND outcome = 'applied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let s = status(port);
    assert!(
        u(&s["tokens_applied"]) >= folded_tokens as u64,
        "{s} vs {folded_tokens} folded in the ledger"
    );
}

/// The processes whose parent is `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                // pid (comm) state ppid …: comm may hold spaces, so split after its ')'.
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

#[test]
fn a_demo_relay_killed_with_sigkill_takes_its_participant_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut relay = start_relay(dir.path(), port, &["--demo"]);
    wait_until(
        Duration::from_secs(60),
        "the demo's participant joins",
        || !status(port)["participants"].as_array().unwrap().is_empty(),
    );
    let hosts = children(relay.child.id());
    assert_eq!(hosts.len(), 1, "the demo's participant: {hosts:?}");
    relay.kill9();
    wait_until(
        Duration::from_secs(10),
        "the demo's participant exits",
        || {
            std::fs::read_to_string(format!("/proc/{}/stat", hosts[0])).map_or(true, |s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        },
    );
}

/// A GPU participant (wgpu; lavapipe here) encodes its int8 updates (the relay's default
/// codec), then its ternary ones, then sparse ones with its error feedback kept on the
/// device, with the WGSL kernels and reads back only the encoded bytes; the relay (int8 and
/// ternary updates checked against its own CPU re-execution, encoded by the CPU encoder;
/// sparse ones under `--no-verify`) accepts them beside a CPU host's.
#[test]
fn a_gpu_host_encodes_its_updates_on_the_device_and_they_are_accepted() {
    for codec in ["int8", "ternary", "sparse64"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // No early end of the run: under CI's load the CPU host could take the model to a
        // low version cap before lavapipe had compiled the GPU host's shaders, leaving it no
        // unit (a 300 s time-out, seen once); the test ends when both have theirs.
        let mut args = vec!["--inner-steps", "5", "--max-versions", "100000"];
        if codec != "int8" {
            args.extend(["--codec", codec]);
        }
        // A participant's error feedback cannot be re-executed (see the sparse test below).
        if codec == "sparse64" {
            args.push("--no-verify");
        }
        let _relay = start_relay(dir.path(), port, &args);
        assert_eq!(status(port)["codec"], codec);
        let gpu = start_host_on(dir.path(), port, "gpu", "wgpu", &[]);
        let cpu = start_host(dir.path(), port, "cpu", &[]);
        wait_until_or(
            Duration::from_secs(300),
            &format!("{codec}: 2 GPU units and 1 CPU unit accepted"),
            || {
                gpu.lines_with("accepted, model now").len() >= 2
                    && !cpu.lines_with("accepted, model now").is_empty()
            },
            || {
                format!(
                    "GPU host:\n{}\nCPU host:\n{}\nstatus: {}",
                    last_lines(&gpu.output(), 15),
                    last_lines(&cpu.output(), 5),
                    try_status(port).unwrap_or_default()
                )
            },
        );
        let s = status(port);
        // Nothing refused for its content: a GPU host's first unit (shader compilation on
        // lavapipe) may come back too stale beside a fast CPU host, which is the staleness rule.
        let rejections = s["verification"]["rejections"].as_object().unwrap();
        assert!(rejections.keys().all(|k| k == "TooStale"), "{codec}: {s}");
        assert_eq!(u(&s["verification"]["banned"]), 0, "{codec}: {s}");
        // Sparse units carry their residual, on the GPU where they were encoded there.
        let on_gpu = if codec == "sparse64" {
            format!("bytes {codec} (error feedback carried on the GPU: norm ")
        } else {
            format!("bytes {codec} (encoded on the GPU)")
        };
        for l in gpu.lines_with("accepted, model now") {
            assert!(l.contains(&on_gpu), "{l}");
        }
        for l in cpu.lines_with("accepted, model now") {
            assert!(!l.contains("on the GPU"), "{l}");
        }
    }
}

/// The relay refuses `--codec codec` with verification on, naming `--no-verify`.
fn refused_without_no_verify(dir: &std::path::Path, port: u16, codec: &str) {
    let (ok, out) = run_cmd(
        std::process::Command::new(bin("tessera-relay"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--codec", codec])
            .arg("--db")
            .arg(dir.join("refused.db"))
            .arg("--checkpoints")
            .arg(dir.join("refused")),
    );
    assert!(!ok && out.contains("--no-verify"), "{codec}: {out}");
}

/// The run's parameter count, from `/api/run`.
fn num_params(port: u16) -> usize {
    let run: serde_json::Value = ureq::get(&format!("http://127.0.0.1:{port}/api/run"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    u(&run["num_params"]) as usize
}

/// Units of exactly 10 steps, a round closed by each update: one host advances the model.
const ONE_HOST_TEN_STEP_UNITS: [&str; 6] = [
    "--inner-steps",
    "10",
    "--min-inner-steps",
    "10",
    "--updates-per-round",
    "1",
];

/// A relay on `codec` and one native host (10-step units, one update a round): with
/// `verify`, at the relay's verification defaults until two of the host's units were
/// re-executed and found honest, nobody banned; without, `--no-verify` until 4 units are
/// accepted. Nothing refused either way. The host's "accepted" lines and the run's parameter
/// count.
fn units_with_codec(
    dir: &std::path::Path,
    port: u16,
    codec: &str,
    verify: bool,
) -> (Vec<String>, usize) {
    let mut args = vec!["--codec", codec];
    args.extend(ONE_HOST_TEN_STEP_UNITS);
    if !verify {
        args.extend(["--no-verify", "--max-versions", "4"]);
    }
    let _relay = start_relay(dir, port, &args);
    assert_eq!(status(port)["codec"], codec);
    let host = start_host(dir, port, "h", &[]);
    if verify {
        wait_until(Duration::from_secs(180), "2 units verified", || {
            let s = status(port);
            assert_eq!(u(&s["verification"]["banned"]), 0, "{codec}: {s}");
            s["participants"]
                .as_array()
                .and_then(|ps| ps.first().map(|p| u(&p["verified_units"]) >= 2))
                .unwrap_or(false)
        });
    } else {
        wait_until(Duration::from_secs(180), "4 units accepted", || {
            host.lines_with("accepted, model now").len() >= 4
        });
    }
    let s = status(port);
    assert_eq!(u(&s["rejected_updates"]), 0, "{codec}: {s}");
    (host.lines_with("accepted, model now"), num_params(port))
}

/// The sparse codec: refused with verification on (a re-execution cannot reproduce a
/// participant's error feedback, so honest participants would fail their audits); with
/// `--no-verify`, a native host's sparse updates are accepted and folded, and its residual is
/// carried from one unit to the next.
#[test]
fn a_sparse_codec_needs_no_verify_and_carries_error_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    refused_without_no_verify(dir.path(), port, "sparse64");
    let (units, n) = units_with_codec(dir.path(), port, "sparse64", false);
    let bytes = tessera_protocol::sparse::sparse_bytes(n, 64).unwrap();
    for l in &units {
        assert!(l.contains(&format!("{bytes} bytes sparse64")), "{l}");
        // Something is always left out, and carried.
        let norm: f64 = l
            .split("norm ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no residual in {l}"));
        assert!(norm > 0.0, "{l}");
    }
    // 32× fewer bytes than f32 at least.
    assert!(bytes * 32 < 4 * n, "{bytes} bytes for {n} values");
}

/// `--codec sign` (one bit a value) and `--codec ternary` (three levels: a mask bit a value
/// and a sign bit a value sent) are verified like int8: the relay compares its re-execution,
/// encoded as the participant had to send it, with the submission. A native host's units at
/// the relay's defaults are re-executed, found honest and folded, each 21× (sign) or 18×
/// (ternary) smaller than f32. Before the relay encoded its re-execution it compared the
/// submission with the raw pseudo-gradient, which a coarse codec's own rounding is far from:
/// the honest host's sign updates disagreed at cosine 0.93 and it was banned.
#[test]
fn sign_and_ternary_updates_are_verified_by_re_execution() {
    // Each codec's bytes for n values: the fewest and the most (ternary's depend on how many
    // values its dead zone keeps), and how many times fewer than f32 a unit must be.
    type Bytes = fn(usize) -> (usize, usize);
    let sign: Bytes = |n| {
        (
            n.div_ceil(64) * 4 + n.div_ceil(8),
            n.div_ceil(64) * 4 + n.div_ceil(8),
        )
    };
    let ternary: Bytes = |n| {
        let least = n.div_ceil(1024) * 4 + n.div_ceil(8);
        (least, least + n.div_ceil(8))
    };
    for (codec, bytes, fewer) in [("sign", sign, 21), ("ternary", ternary, 18)] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (units, n) = units_with_codec(dir.path(), port, codec, true);
        assert!(!units.is_empty(), "{codec}");
        let (least, most) = bytes(n);
        for l in &units {
            let sent: usize = l
                .split(&format!(" bytes {codec}"))
                .next()
                .and_then(|head| head.rsplit(' ').next())
                .and_then(|b| b.parse().ok())
                .unwrap_or_else(|| panic!("no byte count in {l}"));
            assert!(
                (least..=most).contains(&sent),
                "{codec}: {sent} bytes for {n} values: {l}"
            );
            assert!(sent * fewer < 4 * n, "{codec}: {sent} bytes for {n} values");
        }
    }
}

/// `--version-codec int8`: each version's change is encoded and applied as decoded; a host
/// holding the previous version rebuilds the next from the encoded change, a quarter of the
/// weights' bytes, bit for bit (its rebuilt file's digest is checked against the relay's, and
/// every submission signs it: none is refused).
#[test]
fn a_host_rebuilds_versions_from_encoded_changes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _relay = start_relay(
        dir.path(),
        port,
        &[
            &["--version-codec", "int8", "--max-versions", "5"][..],
            &ONE_HOST_TEN_STEP_UNITS,
        ]
        .concat(),
    );
    assert_eq!(status(port)["version_codec"], "int8");
    let host = start_host(dir.path(), port, "h", &[]);
    wait_until(Duration::from_secs(180), "5 units accepted", || {
        host.lines_with("accepted, model now").len() >= 5
    });
    let s = status(port);
    assert_eq!(u(&s["rejected_updates"]), 0, "{s}");
    let number = |l: &str, before: &str| -> u64 {
        l.split(before)
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let full = host.lines_with("fetched: ");
    assert_eq!(full.len(), 1, "only v0 is fetched whole: {}", host.output());
    let full_bytes = number(&full[0], " bytes");
    let rebuilt = host.lines_with("rebuilt from v");
    assert!(rebuilt.len() >= 4, "{}", host.output());
    for l in &rebuilt {
        let bytes = number(l, " bytes fetched");
        assert!(
            bytes * 3 < full_bytes,
            "{l} (the weights: {full_bytes} bytes)"
        );
    }
    let missing = ureq::get(&format!("http://127.0.0.1:{port}/api/model/2/from/2")).call();
    assert!(missing.is_err(), "no change from a version to itself");
}
