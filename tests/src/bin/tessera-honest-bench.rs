//! False positives of verification: honest participants on every backend — native cpu (flex),
//! native wgpu, a tab on WebGPU and a tab on the WASM CPU backend — train against a relay that
//! re-executes every unit it can (`--reexecute-rate 1`), until each has TARGET units verified
//! or TIMEOUT seconds pass. Prints, per participant, its verified units, refused updates,
//! forfeited tokens and whether it was banned (all should be 0 but the first), as JSON.
//!
//! usage: tessera-honest-bench [TARGET=200] [TIMEOUT=1800] [CONFIG=tiny] [ONLY=cpu,wgpu,webgpu,wasm] [H]
//! (ONLY: which participants to start; e.g. `webgpu` alone, so that the slowest backend
//! reaches TARGET verified units without sharing two cores with three other trainers;
//! H: the relay's `--inner-steps`, its default when absent)
//! (build first: cargo build --release --workspace --bins && tools/build-web.sh)

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_e2e::browser::{Browser, Gpu, web_bundle};
use tessera_e2e::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target: u64 = args.get(1).map_or(200, |s| s.parse().expect("TARGET"));
    let timeout: u64 = args.get(2).map_or(1800, |s| s.parse().expect("TIMEOUT"));
    let config = args.get(3).cloned().unwrap_or_else(|| "tiny".into());
    let only: Vec<String> = args
        .get(4)
        .map_or("cpu,wgpu,webgpu,wasm", String::as_str)
        .split(',')
        .map(str::to_string)
        .collect();
    for o in &only {
        assert!(
            ["cpu", "wgpu", "webgpu", "wasm"].contains(&o.as_str()),
            "ONLY takes cpu, wgpu, webgpu, wasm; not {o}"
        );
    }
    let wants = |k: &str| only.iter().any(|o| o == k);
    let inner_steps = args.get(5).cloned();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bundle = web_bundle().display().to_string();
    let mut relay_args = vec![
        "--config",
        config.as_str(),
        "--web-bundle",
        bundle.as_str(),
        "--reexecute-rate",
        "1",
        "--lease-secs",
        "120",
    ];
    if let Some(h) = &inner_steps {
        relay_args.extend(["--inner-steps", h.as_str()]);
    }
    let _relay = start_relay(dir.path(), port, &relay_args);
    let _cpu = wants("cpu").then(|| start_host(dir.path(), port, "native-cpu", &[]));
    let wgpu_args = [
        "join".to_string(),
        format!("ws://127.0.0.1:{port}/ws"),
        "--backend".into(),
        "wgpu".into(),
        "--key".into(),
        dir.path().join("native-wgpu.key").display().to_string(),
    ];
    let _wgpu = wants("wgpu").then(|| {
        Proc::spawn(
            &bin("tessera-host"),
            &wgpu_args,
            dir.path().join("native-wgpu.log"),
        )
    });
    let _tab_gpu = wants("webgpu").then(|| {
        Browser::open(
            &format!("http://127.0.0.1:{port}/?autojoin=1&backend=webgpu"),
            Gpu::WebGpu,
            dir.path().join("chromium-webgpu.log"),
        )
    });
    let _tab_cpu = wants("wasm").then(|| {
        Browser::open(
            &format!("http://127.0.0.1:{port}/?autojoin=1&backend=cpu"),
            Gpu::None,
            dir.path().join("chromium-cpu.log"),
        )
    });
    let start = Instant::now();
    let summary = |s: &Value| -> Vec<Value> {
        s["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                json!({
                    "kind": p["kind"], "backend": p["backend"], "device": p["device"],
                    "accepted": p["accepted_updates"], "verified": p["verified_units"],
                    "refused": p["rejected_updates"], "last_rejection": p["last_rejection"],
                    "forfeited": p["tokens_forfeited"], "banned": p["banned"],
                    "granted": p["tokens_granted"], "pending": p["tokens_pending"],
                })
            })
            .collect()
    };
    loop {
        std::thread::sleep(Duration::from_secs(10));
        let s = status(port);
        let ps = summary(&s);
        let least = ps
            .iter()
            .map(|p| p["verified"].as_u64().unwrap_or(0))
            .min()
            .unwrap_or(0);
        eprintln!(
            "{:>5.0} s: version {}, verified per participant {:?}",
            start.elapsed().as_secs_f64(),
            s["model_version"],
            ps.iter()
                .map(|p| format!("{}/{}: {}", p["kind"], p["backend"], p["verified"]))
                .collect::<Vec<_>>()
        );
        if (ps.len() >= only.len() && least >= target) || start.elapsed().as_secs() > timeout {
            println!(
                "{}",
                json!({
                    "config": config, "target": target, "only": only, "inner_steps": inner_steps,
                    "seconds": start.elapsed().as_secs(),
                    "model_version": s["model_version"], "val_loss": s["val_loss"],
                    "verification": s["verification"],
                    "participants": ps,
                })
            );
            return;
        }
    }
}
