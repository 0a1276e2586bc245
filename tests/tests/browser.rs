//! The browser participant in a real headless Chromium, against a real relay process: a tab on
//! WebGPU (SwiftShader's adapter on a machine without a GPU), a tab without WebGPU on the WASM
//! CPU backend, and a tab beside a native host. Screenshots land in target/test-artifacts.

use std::time::Duration;

use serde_json::Value;
use tessera_e2e::browser::{Browser, Gpu, artifacts_dir, web_bundle};
use tessera_e2e::*;

/// The browser tests' run options: the bundle served, leases long enough for a slow tab,
/// small batches and a short evaluation.
fn run_args(bundle: &str) -> Vec<&str> {
    vec![
        "--web-bundle",
        bundle,
        "--lease-secs",
        "120",
        "--batch",
        "4",
        "--eval-iters",
        "4",
    ]
}

/// A relay whose units are small enough for SwiftShader (seconds per step) to finish quickly.
fn relay(dir: &std::path::Path, port: u16, extra: &[&str]) -> Proc {
    let bundle = web_bundle().display().to_string();
    let mut args = run_args(&bundle);
    args.extend_from_slice(extra);
    start_relay(dir, port, &args)
}

fn browsers(s: &Value) -> Vec<Value> {
    s["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "browser")
        .cloned()
        .collect()
}

fn accepted(p: &Value) -> u64 {
    p["accepted_updates"].as_u64().unwrap()
}

/// Waits for `cond` on the relay's status, failing with the tab's own account of itself.
fn wait_for(
    port: u16,
    tab: &mut Browser,
    secs: u64,
    what: &str,
    mut cond: impl FnMut(&Value) -> bool,
) {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(port);
        if cond(&s) {
            return;
        }
        if std::time::Instant::now() > end {
            panic!(
                "timed out waiting for {what}\nstatus: {s}\ntab: {}\nchromium log tail: {}",
                tab.tab(),
                tail(&tab.output())
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The tab's own account once it counts an accepted update (or after 60 s, for the caller's
/// assertion to show). The relay counts an update before its reply reaches the worker (through
/// an edge relay, one hop later) and the worker's event the page, so its status runs ahead.
fn tab_counts_accepted(tab: &mut Browser) -> Value {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let t = tab.tab();
        if t["accepted"].as_u64().unwrap_or(0) >= 1 || std::time::Instant::now() > end {
            return t;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the page itself shows a model version after the first, then saves a screenshot.
fn screenshot(tab: &mut Browser, name: &str) {
    wait_until(
        Duration::from_secs(10),
        "the page shows the new version",
        || tab.eval("Number(document.getElementById('version').textContent) >= 1") == true,
    );
    tab.screenshot(&artifacts_dir().join(name));
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A WebGPU tab trains, encodes its update on the GPU (WGSL) and reads back only the encoded
/// bytes, which the relay accepts: in int8 (the relay's default codec), then in ternary, then
/// sparse with its error feedback kept on the GPU (`--no-verify`: a participant's residual
/// cannot be re-executed).
#[test]
fn tab_trains_on_webgpu_and_its_update_is_accepted() {
    for codec in ["int8", "ternary", "sparse64"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args = vec!["--inner-steps", "3"];
        if codec != "int8" {
            args.extend(["--codec", codec]);
        }
        if codec == "sparse64" {
            args.push("--no-verify");
        }
        let _relay = relay(dir.path(), port, &args);
        assert_eq!(status(port)["codec"], codec);
        let mut tab = Browser::open(
            &format!("http://127.0.0.1:{port}/?autojoin=1&backend=webgpu"),
            Gpu::WebGpu,
            dir.path().join("chromium.log"),
        );
        wait_for(
            port,
            &mut tab,
            400,
            "an accepted update from a WebGPU tab",
            |s| {
                browsers(s)
                    .iter()
                    .any(|p| p["backend"] == "webgpu" && accepted(p) >= 1)
            },
        );
        let t = tab_counts_accepted(&mut tab);
        assert_eq!(t["backend"], "webgpu", "{t}");
        assert!(
            t["device"].as_str().unwrap().len() > 3,
            "adapter named: {t}"
        );
        assert!(t["accepted"].as_u64().unwrap() >= 1, "{codec}: {t}");
        assert!(t["loss"].as_f64().unwrap().is_finite(), "{t}");
        // The tab encoded its update on the GPU and read back only the encoded bytes, which
        // the relay (refusing any codec but the unit's) accepted.
        assert!(t["gpuEncoded"].as_u64().unwrap() >= 1, "{codec}: {t}");
        let s = status(port);
        let me = browsers(&s)
            .into_iter()
            .find(|p| p["id"] == t["participantId"])
            .expect("the tab's participant id is in the ledger");
        assert!(me["tokens_trained"].as_u64().unwrap() > 0, "{me}");
        if codec == "int8" {
            screenshot(&mut tab, "browser-webgpu.png");
        }
    }
}

#[test]
fn tab_without_webgpu_trains_on_the_cpu_and_pause_and_leave_work() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Version changes encoded as int8: the tab rebuilds each new version from the one it
    // holds (the relay checks every submission's base digest, so a wrong rebuild is refused).
    let _relay = relay(
        dir.path(),
        port,
        &["--inner-steps", "40", "--version-codec", "int8"],
    );
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{port}/?autojoin=1"),
        Gpu::None,
        dir.path().join("chromium.log"),
    );
    wait_for(
        port,
        &mut tab,
        300,
        "an accepted update from a CPU tab",
        |s| {
            browsers(s)
                .iter()
                .any(|p| p["backend"] == "wasm-cpu" && accepted(p) >= 1)
        },
    );
    let t = tab.tab();
    assert_eq!(t["backend"], "wasm-cpu", "{t}");
    // No GPU: its int8 updates were encoded on the CPU.
    assert_eq!(t["gpuEncoded"], 0, "{t}");
    // Every core: the threaded bundle with one Web Worker a core (the relay's headers make the
    // page cross-origin isolated); without that bundle (no nightly toolchain where it was
    // built), one thread, saying so.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if web_bundle().join("threads/tessera_web_bg.wasm").exists() && cores > 1 {
        // navigator.hardwareConcurrency: every core Chromium sees.
        let threads = t["threads"].as_u64().unwrap_or(0);
        assert!(threads >= 2, "{t}");
        assert_eq!(t["device"], format!("CPU (WASM, {threads} threads)"), "{t}");
    } else {
        eprintln!("NOTE: no threaded bundle in web/pkg/threads: checking the one-thread fallback");
        assert_eq!(t["threads"], 1, "{t}");
        assert_eq!(t["device"], "CPU (WASM, 1 thread)", "{t}");
    }
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("WebGPU is not available"),
        "the page says why: {t}"
    );
    wait_until(
        Duration::from_secs(120),
        "the tab rebuilds a version from an encoded change, and its unit from it is accepted",
        || {
            let t = tab.tab();
            t["rebuilt"].as_u64().unwrap_or(0) >= 1 && t["accepted"].as_u64().unwrap_or(0) >= 2
        },
    );
    let t = tab.tab();
    assert_eq!(t["rejected"], 0, "{t}");
    // A version rebuilt from a change costs under a third of one downloaded whole.
    let n = |k: &str| t[k].as_u64().unwrap();
    let whole = (n("downloadedBytes") - n("rebuiltBytes")) / (n("downloads") - n("rebuilt"));
    assert!(n("rebuiltBytes") / n("rebuilt") * 3 < whole, "{t}");
    let shown = tab.eval("document.getElementById('downloads').textContent");
    assert!(
        shown
            .as_str()
            .unwrap()
            .contains("rebuilt from encoded changes"),
        "{shown}"
    );
    // The page shows the reason to the visitor.
    let shown = tab.eval("document.getElementById('why').textContent");
    assert!(shown.as_str().unwrap().contains("WebGPU"), "{shown}");
    screenshot(&mut tab, "browser-cpu.png");

    // Pause: training stops at a step boundary and stays stopped.
    tab.eval("document.getElementById('pause').click()");
    wait_until(Duration::from_secs(20), "the tab pauses", || {
        tab.tab()["state"] == "paused"
    });
    let steps = tab.tab()["losses"].as_array().unwrap().len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tab.tab()["losses"].as_array().unwrap().len(), steps);
    // Resume: steps advance again.
    tab.eval("document.getElementById('pause').click()");
    wait_until(Duration::from_secs(30), "training resumes", || {
        tab.tab()["losses"].as_array().unwrap().len() > steps
    });
    // Leave: the relay sees the participant go and its lease released.
    let id = tab.tab()["participantId"].as_str().unwrap().to_string();
    tab.eval("document.getElementById('leave').click()");
    wait_until(Duration::from_secs(30), "the tab leaves", || {
        tab.tab()["state"] == "left"
    });
    wait_until(Duration::from_secs(10), "the relay sees it leave", || {
        let s = status(port);
        let gone = participant(&s, &id).is_some_and(|p| p["connected"] == false);
        let no_lease = s["leases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["participant"] != id.as_str());
        gone && no_lease
    });
    // The identity lives in the browser: after a reload the same participant comes back.
    tab.call(
        "Page.navigate",
        serde_json::json!({"url": format!("http://127.0.0.1:{port}/?autojoin=1")}),
    );
    wait_until(Duration::from_secs(30), "the reloaded tab rejoins", || {
        tab.tab()["joined"] == true
    });
    assert_eq!(tab.tab()["participantId"], id.as_str());
    wait_until(Duration::from_secs(10), "the relay sees it back", || {
        participant(&status(port), &id).is_some_and(|p| p["connected"] == true)
    });
}

#[test]
fn mixed_run_of_a_tab_and_a_native_host_lowers_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The native host finishes units far faster than the tab: allow the tab's updates to be
    // many versions behind (staleness rejection is the coordinator's own tests' business).
    let args = ["--inner-steps", "10", "--max-staleness", "100"];
    let mut relay_proc = relay(dir.path(), port, &args);
    let _host = start_host(dir.path(), port, "native", &[]);
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{port}/?autojoin=1"),
        Gpu::WebGpu,
        dir.path().join("chromium.log"),
    );
    wait_for(
        port,
        &mut tab,
        300,
        "accepted updates from both kinds, 4+ versions, a lower validation loss",
        |s| {
            let kinds_ok = ["browser", "native"].iter().all(|k| {
                s["participants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["kind"] == *k && accepted(p) >= 1)
            });
            let h = s["val_loss_history"].as_array().unwrap();
            let lower = h.len() >= 2
                && h.last().unwrap()[1].as_f64().unwrap() < h[0][1].as_f64().unwrap() - 0.1;
            kinds_ok && s["model_version"].as_u64().unwrap() >= 4 && lower
        },
    );
    // Both kinds sent int8 updates (the relay's default codec), which it accepted and folded.
    assert_eq!(status(port)["codec"], "int8");
    // The page shows the global curve and a sample of the current model.
    wait_until(Duration::from_secs(10), "the page shows a sample", || {
        tab.eval("document.getElementById('sample-version').textContent")
            .as_str()
            .is_some_and(|t| t.contains("version"))
    });
    // …the tab's stake as the relay's ledger has it (granted / pending), and verification.
    wait_until(
        Duration::from_secs(10),
        "the page shows the tab's stake",
        || {
            let stake = tab.eval("document.getElementById('stake').textContent");
            let verification = tab.eval("document.getElementById('verification').textContent");
            stake.as_str().is_some_and(|t| t.contains(" / "))
                && verification.as_str().is_some_and(|t| t.contains(" / "))
        },
    );
    screenshot(&mut tab, "browser-mixed.png");

    // The relay dies (SIGKILL) and comes back on the same database: the tab reconnects by
    // itself and its updates are accepted again.
    let before = tab.tab()["accepted"].as_u64().unwrap();
    relay_proc.kill9();
    wait_until(Duration::from_secs(30), "the tab notices", || {
        tab.tab()["state"] == "reconnecting"
    });
    let _relay = relay(dir.path(), port, &args);
    wait_until(
        Duration::from_secs(120),
        "an accepted update after the restart",
        || tab.tab()["accepted"].as_u64().unwrap() > before,
    );
}

/// The demo as a visitor meets it: `tessera-relay --demo` with default settings trains with its
/// own native participant; then a tab (the WASM CPU backend, several times slower) presses
/// Join. The tab's units are sized to its speed and land in the same rounds; the validation
/// loss goes on falling from where it was when the tab joined and never rises above it by more
/// than the guard's margin.
#[test]
fn demo_flow_a_tab_joining_the_demo_keeps_the_model_improving() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bundle = web_bundle().display().to_string();
    let _relay = start_relay(dir.path(), port, &["--web-bundle", &bundle, "--demo"]);
    let history = |s: &Value| -> Vec<(u64, f64)> {
        s["val_loss_history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h[0].as_u64().unwrap(), h[1].as_f64().unwrap()))
            .collect()
    };
    wait_until(
        Duration::from_secs(60),
        "the demo's participant trains 20 versions",
        || history(&status(port)).last().is_some_and(|l| l.0 >= 20),
    );
    let (join_version, join_loss) = *history(&status(port)).last().unwrap();
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{port}/"),
        Gpu::None,
        dir.path().join("chromium.log"),
    );
    // The button works once the page's module has bound it.
    wait_until(
        Duration::from_secs(60),
        "the page's Join button is live",
        || tab.eval("typeof document.getElementById('join')?.onclick === 'function'") == true,
    );
    tab.eval("document.getElementById('join').click()");
    wait_until(Duration::from_secs(60), "the tab joins", || {
        tab.tab()["joined"] == true
    });
    let id = tab.tab()["participantId"].as_str().unwrap().to_string();
    let joined_at = std::time::Instant::now();
    wait_for(
        port,
        &mut tab,
        240,
        "30 s of training together and five accepted updates from the tab",
        |s| {
            joined_at.elapsed() > Duration::from_secs(30)
                && participant(s, &id).is_some_and(|p| accepted(p) >= 5)
        },
    );
    let s = status(port);
    let after: Vec<(u64, f64)> = history(&s)
        .into_iter()
        .filter(|h| h.0 > join_version)
        .collect();
    let last = after.last().expect("versions after the tab joined").1;
    let worst = after.iter().map(|h| h.1).fold(f64::MIN, f64::max);
    let margin = (0.25 * join_loss).max(0.25);
    eprintln!(
        "tab joined at version {join_version} (loss {join_loss:.3}); {} versions since, worst {worst:.3}, last {last:.3}",
        after.len()
    );
    assert!(
        worst <= join_loss + margin,
        "the loss rose to {worst} after the tab joined at {join_loss}"
    );
    assert!(
        last < 0.8 * join_loss,
        "the loss did not go on falling: {join_loss} -> {last}"
    );
    assert!(
        s["guard"]["rollbacks"].as_array().unwrap().is_empty(),
        "{}",
        s["guard"]
    );
    let t = tab.tab();
    assert_eq!(t["backend"], "wasm-cpu", "{t}");
    let me = browsers(&s)
        .into_iter()
        .find(|p| p["id"] == t["participantId"])
        .expect("the tab is in the ledger");
    assert_eq!(me["rejected_updates"], 0, "{me}");
    assert!(
        me["unit_steps"].as_u64().unwrap() < 50,
        "the tab's units are not sized: {me}"
    );

    // The page shows the contribution ledger and what the model's usage earned, and keeps the
    // relay's signed receipt of every update of the tab's that was accepted.
    wait_until(
        Duration::from_secs(15),
        "the page shows the ledger and usage",
        || {
            let l = tab.eval("document.getElementById('ledger').textContent");
            let u = tab.eval("document.getElementById('usage').textContent");
            l.as_str().is_some_and(|t| t.contains("granted units"))
                && u.as_str().is_some_and(|t| t.contains("tokens served"))
        },
    );
    let kept = tab.tab()["receipts"].as_u64().unwrap();
    assert!(kept >= 5, "{}", tab.tab());
    // The tab proves its receipts in the relay's signed log itself, once some of its units are
    // granted under a signed checkpoint.
    let end = std::time::Instant::now() + Duration::from_secs(180);
    let report = loop {
        tab.eval("window.tessera.receiptsCheck = null; document.getElementById('check-receipts').click()");
        wait_until(
            Duration::from_secs(60),
            "the tab checks its receipts",
            || !tab.tab()["receiptsCheck"].is_null(),
        );
        let r = tab.tab()["receiptsCheck"].clone();
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["failures"], serde_json::json!([]), "{r}");
        assert!(r["checked"].as_u64().unwrap() >= kept, "{r}");
        assert_eq!(
            r["checked"].as_u64(),
            Some(r["proven"].as_u64().unwrap() + r["not_yet"].as_u64().unwrap()),
            "{r}"
        );
        if r["proven"].as_u64().unwrap() >= 1 {
            break r;
        }
        assert!(
            std::time::Instant::now() < end,
            "no receipt of the tab's proven in 180 s: {r}\nstatus: {}",
            status(port)
        );
        std::thread::sleep(Duration::from_secs(5));
    };
    eprintln!("the tab's receipts: {report}");
    let text =
        tab.eval("fetch(document.getElementById('download-receipts').href).then(r => r.text())");
    let text = text.as_str().unwrap();
    assert!(text.lines().count() as u64 >= kept, "{text}");
    let file = dir.path().join("tab-receipts.jsonl");
    std::fs::write(&file, text).unwrap();
    // …and the same receipts, downloaded, check natively.
    let (ok, out_text) = host_cmd(&[
        "ledger",
        "verify",
        "--relay",
        &format!("http://127.0.0.1:{port}/"),
        "--receipts",
        &file.display().to_string(),
        "--key",
        &dir.path().join("verifier.key").display().to_string(),
    ]);
    eprintln!("{out_text}");
    assert!(ok, "{out_text}");
    let granted: u64 = out_text
        .split(" granted (each matches its leaf")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out_text}"));
    assert!(granted >= report["proven"].as_u64().unwrap(), "{out_text}");
    screenshot(&mut tab, "browser-demo.png");
}

/// Model shards in the tab: on `--fragments 2` a tab on the WASM CPU
/// backend and a native host train fragments of the model (the rest frozen) and upload only
/// those, and the tab's fragment updates are accepted.
/// A WASM CPU tab and a native host train fragments of the model, both sending their
/// updates in the ternary codec (a unit names its codec and the relay refuses any other):
/// the tab's are accepted, each covering one fragment.
#[test]
fn a_tab_and_a_native_host_train_fragments_of_the_model_in_ternary() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = [
        "--inner-steps",
        "10",
        "--max-staleness",
        "100",
        "--fragments",
        "2",
        "--codec",
        "ternary",
    ];
    let _relay = relay(dir.path(), port, &args);
    let _host = start_host(dir.path(), port, "native", &[]);
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{port}/?autojoin=1&backend=cpu"),
        Gpu::None,
        dir.path().join("chromium.log"),
    );
    wait_for(
        port,
        &mut tab,
        300,
        "two accepted updates from the tab",
        |s| browsers(s).iter().any(|p| accepted(p) >= 2),
    );
    let s = status(port);
    assert_eq!(s["fragments"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["codec"], "ternary", "{s}");
    assert!(
        s["participants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "native" && accepted(p) >= 1),
        "no accepted native update: {s}"
    );
    let tab_id = browsers(&s)[0]["id"].as_str().unwrap().to_string();
    let db = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let lens: Vec<i64> = db
        .prepare("SELECT frag_len FROM updates WHERE participant = ?1")
        .unwrap()
        .query_map([&tab_id], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let model = tessera_core::config::ModelConfig::named("tiny").unwrap();
    assert!(
        lens.len() >= 2
            && lens
                .iter()
                .all(|l| *l > 0 && (*l as usize) < model.num_params()),
        "the tab's updates do not cover one fragment each: {lens:?}"
    );
}

/// A tab that opens the page of an edge relay (`--edge`) trains through it: the page, the
/// bundle and the model's weights come from the edge, its calls go to the leader, and its
/// updates are accepted, as on the leader's own page.
#[test]
fn a_tab_joins_through_an_edge_relay_and_its_update_is_accepted() {
    use tessera_e2e::stores::{Postgres, S3, relay_with};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = Postgres::start(d);
    let s3 = S3::start(d, "tessera");
    let bundle = web_bundle().display().to_string();
    let (leader_port, edge_port) = (free_port(), free_port());
    let run = run_args(&bundle);
    let start = |name: &str, port: u16, edge: bool| {
        let args: Vec<&str> = edge
            .then_some("--edge")
            .into_iter()
            .chain(run.iter().copied())
            .collect();
        relay_with(d, name, port, &pg, &s3, &args)
    };
    let _leader = start("leader", leader_port, false);
    wait_until(Duration::from_secs(60), "the leader serves", || {
        try_status(leader_port).is_some()
    });
    let _edge = start("edge", edge_port, true);
    wait_until(Duration::from_secs(60), "the edge serves", || {
        try_status(edge_port).is_some()
    });
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{edge_port}/?autojoin=1"),
        Gpu::None,
        d.join("chromium.log"),
    );
    // The leader's status: the tab is its participant, reached through the edge.
    wait_for(
        leader_port,
        &mut tab,
        300,
        "an accepted update from a tab on the edge's page",
        |s| browsers(s).iter().any(|p| accepted(p) >= 1),
    );
    let t = tab_counts_accepted(&mut tab);
    assert!(
        t["accepted"].as_u64().unwrap_or(0) >= 1,
        "the tab counts its update accepted: {t}"
    );
    assert_eq!(
        metric(edge_port, "tessera_connections"),
        Some(1.0),
        "the edge holds the tab's connection"
    );
    assert_eq!(
        metric(leader_port, "tessera_connections"),
        Some(0.0),
        "no connection on the leader"
    );
    screenshot(&mut tab, "edge-tab.png");
}
