//! The contribution ledger, checked as a participant and an outsider would: a real relay and
//! hosts, a relay killed with kill -9 between accepting updates and granting them, `tessera-host
//! ledger verify` against the relay and against an export, the independent Python verifier, and
//! tampered copies of the export.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tessera_e2e::*;
use tessera_protocol::ledger::{Checkpoint, Leaf};

fn get(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    match ureq::get(&url).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
        Err(ureq::Error::StatusCode(c)) => (c, String::new()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

fn ledger_head(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/api/ledger").1).unwrap()
}

/// Units of the receipts a host has kept.
fn receipt_units(key: &Path) -> Vec<u64> {
    std::fs::read_to_string(key.with_extension("receipts.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["unit_id"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn python(dir: &Path) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/ledger_verify.py");
    run_cmd(Command::new("python3").arg(script).arg(dir))
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) {
    let text: String = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

/// A copy of the export `from` with its leaves changed by `f` (checkpoints as they were).
fn tampered(from: &Path, to: &Path, f: impl FnOnce(&mut Vec<Leaf>)) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["ledger.json", "checkpoints.jsonl"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    let mut leaves: Vec<Leaf> = read_jsonl(&from.join("leaves.jsonl"));
    f(&mut leaves);
    write_jsonl(&to.join("leaves.jsonl"), &leaves);
}

/// A change made to an export's leaves.
type Tamper = dyn FnOnce(&mut Vec<Leaf>);

#[test]
fn the_ledger_survives_a_killed_relay_verifies_everywhere_and_tampering_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let args = ["--grant-after-rounds", "2", "--inner-steps", "10"];
    let mut relay = start_relay(d, port, &args);
    let _hosts: Vec<Proc> = (0..2)
        .map(|i| start_host(d, port, &format!("h{i}"), &[]))
        .collect();
    let key0 = d.join("h0.key");

    // Accepted, receipts in hand, not granted yet: kill -9.
    wait_until(Duration::from_secs(120), "h0 holds a receipt", || {
        !receipt_units(&key0).is_empty()
    });
    let pending: Vec<u64> = receipt_units(&key0)
        .into_iter()
        .filter(|u| get(port, &format!("/api/ledger/proof/{u}")).0 == 404)
        .collect();
    relay.kill9();
    eprintln!("kill -9 with h0's units {pending:?} accepted, not granted");
    assert!(
        !pending.is_empty(),
        "every receipt was already granted: the kill did not fall between acceptance and grant"
    );
    let _relay = start_relay(d, port, &args);

    // After the restart, every receipt given before the kill is granted and proven.
    wait_until(
        Duration::from_secs(240),
        "the receipts of before the kill granted under a signed checkpoint, two of them for h0",
        || {
            let head = ledger_head(port);
            head["checkpoint"]["log_size"].as_u64().unwrap_or(0) >= 6
                && receipt_units(&key0).len() >= 2
                && pending
                    .iter()
                    .all(|u| get(port, &format!("/api/ledger/proof/{u}")).0 == 200)
        },
    );

    // The version's weights carry the checkpoint signed for it, and so does its manifest.
    let head = ledger_head(port);
    let signed: Checkpoint = serde_json::from_value(head["checkpoint"].clone()).unwrap();
    let weights = std::fs::read(
        d.join("checkpoints")
            .join(format!("model-v{:08}.safetensors", signed.version)),
    )
    .unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&weights).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    let in_weights: Checkpoint = serde_json::from_str(&meta["tessera_ledger"]).unwrap();
    assert_eq!(in_weights, signed);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            d.join("checkpoints")
                .join(format!("model-v{:08}.json", signed.version)),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        serde_json::from_value::<Checkpoint>(manifest["ledger"].clone()).unwrap(),
        signed
    );

    let (code, body) = get(port, &format!("/api/ledger/checkpoint/{}", signed.version));
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Checkpoint>(&body).unwrap(), signed);
    assert_eq!(get(port, "/api/ledger/checkpoint/999999").0, 404);

    // /api/status and /metrics say where the log stands.
    let st = status(port);
    assert!(
        st["ledger"]["leaves"].as_u64().unwrap() >= signed.log_size,
        "{st}"
    );
    assert!(st["ledger"]["checkpoint_version"].as_u64().unwrap() >= signed.version);
    assert_eq!(
        st["ledger"]["relay_key"].as_str().unwrap(),
        head["info"]["relay_key"].as_str().unwrap()
    );
    let metrics = get(port, "/metrics").1;
    assert!(metrics.contains("tessera_ledger_leaves "), "{metrics}");

    // A participant checks the relay: the log, its receipts with their inclusion proofs, stakes.
    let url = format!("http://127.0.0.1:{port}/");
    let k0 = key0.display().to_string();
    let (ok, out) = host_cmd(&["ledger", "verify", "--relay", &url, "--key", &k0]);
    eprintln!("{out}");
    assert!(ok, "{out}");
    assert!(out.contains("ledger verified"), "{out}");
    let proven: u64 = out
        .split(" inclusion proofs checked")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(proven >= 1, "{out}");
    assert!(out.contains("(you)"), "{out}");

    // The model as a Hugging Face folder, with the checkpoint signed for its version and the
    // stake table under it (`tools/check_hf_export.py` loads it with transformers: BENCHMARKS.md).
    let hf = d.join("hf");
    let (ok, out) = host_cmd(&[
        "export",
        "--hf",
        &hf.display().to_string(),
        "--relay",
        &url,
        "--version",
        &signed.version.to_string(),
    ]);
    assert!(ok, "{out}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["activation_function"], "gelu");
    let weights = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let w = st.tensor("transformer.h.0.mlp.c_fc.weight").unwrap();
    let d_model = config["n_embd"].as_u64().unwrap() as usize;
    assert_eq!(w.shape(), [d_model, 4 * d_model], "Conv1D layout [in, out]");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&weights).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    assert_eq!(
        serde_json::from_str::<Checkpoint>(&meta["tessera_ledger"]).unwrap(),
        signed
    );
    let card = std::fs::read_to_string(hf.join("README.md")).unwrap();
    assert!(card.contains(&host_id_of_key(&key0)), "{card}");
    assert!(card.contains(&hex::encode(signed.log_root)), "{card}");

    // An export, checked by the host and by the independent Python verifier.
    let export = d.join("export");
    let e = export.display().to_string();
    let (ok, out) = host_cmd(&["ledger", "export", "--relay", &url, "--out", &e]);
    assert!(ok, "{out}");
    let (ok, out) = host_cmd(&["ledger", "verify", "--dir", &e, "--key", &k0]);
    assert!(ok && out.contains("ledger verified"), "{out}");
    let (ok, py) = python(&export);
    eprintln!("{py}");
    assert!(ok && py.contains("ledger verified"), "{py}");
    // Both recompute the same stake table.
    let leaves: Vec<Leaf> = read_jsonl(&export.join("leaves.jsonl"));
    let checkpoints: Vec<Checkpoint> = read_jsonl(&export.join("checkpoints.jsonl"));
    let signed_size = checkpoints.last().unwrap().log_size as usize;
    let mut credit0 = 0;
    for l in &leaves[..signed_size] {
        if l.participant_id() == host_id_of_key(&key0) {
            credit0 += l.credit;
        }
    }
    assert!(credit0 > 0);
    let row = format!("{}  {credit0:>12}", host_id_of_key(&key0));
    assert!(out.contains(&row), "{row:?} not in {out}");
    assert!(py.contains(&row), "{row:?} not in {py}");

    // Tampered copies fail, in both verifiers, with a reason.
    let cases: Vec<(&str, Box<Tamper>)> = vec![
        (
            "dropped",
            Box::new(|l: &mut Vec<Leaf>| {
                l.remove(1);
            }),
        ),
        ("reordered", Box::new(|l: &mut Vec<Leaf>| l.swap(0, 1))),
        (
            "forged",
            Box::new(|l: &mut Vec<Leaf>| {
                l[0].tokens += 1000;
                l[0].credit += 1000;
            }),
        ),
    ];
    for (name, f) in cases {
        let t = d.join(name);
        tampered(&export, &t, f);
        let (ok, out) = host_cmd(&["ledger", "verify", "--dir", &t.display().to_string()]);
        assert!(
            !ok && out.contains("checkpoint of version"),
            "{name}: {out}"
        );
        let (ok, py) = python(&t);
        eprintln!(
            "{name}: tessera-host: {}python: {py}",
            out.lines().last().unwrap_or("")
        );
        assert!(!ok && py.contains("does NOT verify"), "{name}: {py}");
    }

    // A history rewritten and re-signed with the relay's own key is self-consistent (the
    // Python check, which remembers nothing, passes it), but the participant that verified the
    // log before holds a checkpoint it contradicts.
    let relay_key: [u8; 32] =
        hex::decode(std::fs::read_to_string(d.join("relay.key")).unwrap().trim())
            .unwrap()
            .try_into()
            .unwrap();
    let rewritten = d.join("rewritten");
    tampered(&export, &rewritten, |l| {
        l[0].tokens += 1000;
        l[0].credit += 1000;
    });
    let leaves: Vec<Leaf> = read_jsonl(&rewritten.join("leaves.jsonl"));
    let resigned: Vec<Checkpoint> = checkpoints
        .iter()
        .map(|c| {
            Checkpoint::sign(
                &c.run,
                c.version,
                &leaves[..c.log_size as usize],
                &relay_key,
            )
        })
        .collect();
    write_jsonl(&rewritten.join("checkpoints.jsonl"), &resigned);
    let (ok, py) = python(&rewritten);
    assert!(ok, "{py}");
    let (ok, out) = host_cmd(&[
        "ledger",
        "verify",
        "--dir",
        &rewritten.display().to_string(),
        "--key",
        &k0,
    ]);
    eprintln!("rewritten and re-signed: python passes it, tessera-host: {out}");
    assert!(!ok && out.contains("rewritten"), "{out}");
}

/// The participant id of a host's key file.
fn host_id_of_key(key: &Path) -> String {
    let (ok, out) = host_cmd(&["id", "--key", &key.display().to_string()]);
    assert!(ok, "{out}");
    out.trim().to_string()
}
