//! The model's usage, as a customer and an owner see it: a real relay trained by two hosts,
//! keys made with `tessera-relay api-key`, the official `openai` Python client against
//! `/v1/completions` (good key, unknown key, exhausted quota), and the signed revenue statement
//! split by stake, checked by `tessera-host ledger statement`.

use std::process::Command;
use std::time::Duration;

use tessera_e2e::*;
use tessera_protocol::ledger::Statement;

fn api_key(dir: &std::path::Path, name: &str, quota: u64) -> String {
    let out = Command::new(bin("tessera-relay"))
        .args([
            "--db",
            &dir.join("relay.db").display().to_string(),
            "api-key",
        ])
        .args(["--name", name, "--quota", &quota.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn customers_use_the_model_with_the_openai_client_and_revenue_is_split_by_stake() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _relay = start_relay(
        d,
        port,
        &["--grant-after-rounds", "2", "--price-per-1k", "1000000"],
    );
    let _hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(d, port, &format!("h{i}"), &[]))
        .collect();
    let granted = |s: &serde_json::Value| {
        s["participants"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["tokens_granted"].as_u64().unwrap_or(0) > 0)
            .count()
    };
    let mut leaves = 0;
    wait_until(
        Duration::from_secs(180),
        "both hosts granted credit",
        || {
            let s = status(port);
            leaves = s["ledger"]["leaves"].as_u64().unwrap_or(0);
            granted(&s) == 2
        },
    );
    wait_until(
        Duration::from_secs(60),
        "a version signed with both hosts' stake",
        || {
            status(port)["ledger"]["checkpoint_leaves"]
                .as_u64()
                .is_some_and(|n| n >= leaves)
        },
    );
    let key = api_key(d, "customer", 1000);
    let small = api_key(d, "small", 30);
    assert!(key.starts_with("tsk-") && key != small);
    // Only the keys' hashes are stored.
    let db = rusqlite::Connection::open(d.join("relay.db")).unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM api_keys WHERE key_sha256 = ?1 OR name = ?2",
            rusqlite::params![key.as_bytes(), key],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 0);

    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/openai_check.py");
    let start_ms = unix_ms();
    let (ok, text) = run_cmd(
        Command::new(&python)
            .arg(script)
            .arg(format!("http://127.0.0.1:{port}/v1"))
            .args([&key, &small]),
    );
    eprintln!("{text}");
    assert!(ok, "the openai client run failed: {text}");

    // The statement: 48 tokens served at 1,000,000 micro-units per 1000 tokens.
    let url = format!("http://127.0.0.1:{port}/api/revenue?from_ms={start_ms}");
    let st: Statement = ureq::get(&url)
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let tokens: u64 = st.versions.iter().map(|v| v.tokens).sum();
    assert_eq!(tokens, 48, "{st:?}");
    assert_eq!(st.revenue, 48_000, "{st:?}");
    assert_eq!(st.totals.values().sum::<u64>() + st.unallocated, st.revenue);
    assert_eq!(st.unallocated, 0, "{st:?}");
    assert_eq!(st.totals.len(), 2, "both hosts are paid: {st:?}");
    let (ok, printed) = host_cmd(&[
        "ledger",
        "statement",
        "--relay",
        &format!("http://127.0.0.1:{port}/"),
        "--from-ms",
        &start_ms.to_string(),
    ]);
    assert!(ok && printed.contains("revenue 48000"), "{printed}");
    eprintln!("{printed}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
