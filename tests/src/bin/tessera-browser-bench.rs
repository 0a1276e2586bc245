//! Browser-versus-native benchmark: one work unit (same base weights, seed, shard, batch and
//! learning rate) trained in a headless Chromium tab (WebGPU, then the WASM CPU backend) and
//! natively (wgpu, then flex) on this machine, all in one run. Prints the cosine similarity of
//! the pseudo-gradients, the step times and their ratios, the time from page load to the first
//! training step, the size of the bundle, and every codec's encode and decode throughput in the
//! tab (WASM) and natively, on the same values (the `small` model's count, the unit's
//! pseudo-gradient repeated), each beside a copy of them.
//!
//! usage: tessera-browser-bench [CONFIG=tiny] [STEPS=10] [BATCH=8]
//! (build first: cargo build --release --workspace --bins && tools/build-web.sh)

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tessera_core::burn::prelude::Device;
use tessera_core::checkpoint::weights_from_safetensors;
use tessera_core::data::Corpus;
use tessera_core::model::Gpt;
use tessera_core::params;
use tessera_core::train::Trainer;
use tessera_e2e::browser::{Browser, Gpu, web_bundle};
use tessera_e2e::*;
use tessera_protocol::messages::{RunInfo, WorkUnit};
use tessera_protocol::update::Fragment;
use tessera_protocol::work;

const SHARD: u64 = 7;
const LR: f64 = 1e-3;

fn get(port: u16, path: &str) -> Vec<u8> {
    ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap()
}

/// Trains the unit natively, reading each step's loss (as the tab does).
fn native(
    device: &Device,
    run: &RunInfo,
    unit: &WorkUnit,
    base: &[f32],
    corpus: &Corpus,
) -> (Vec<f32>, Vec<f64>, Vec<f32>) {
    let mut train = run.train.clone();
    train.batch_size = unit.batch_size as usize;
    let mut trainer = Trainer::with_weights(run.model, train, device, base).unwrap();
    let (mut ms, mut losses) = (Vec::new(), Vec::new());
    for step in 0..unit.inner_steps {
        let t = Instant::now();
        let batch = work::batch(unit, &run.model, corpus, step);
        let out = trainer.step_with_lr(&batch, work::lr_at(unit, step));
        let l: Vec<f32> = out.loss.into_data().try_into_vec().unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        losses.push(l[0]);
    }
    let trained = params::to_vec(trainer.model());
    (
        work::pseudo_gradient(unit, base, &trained).unwrap(),
        ms,
        losses,
    )
}

/// Cosine and relative norm difference of `a` against the reference `r`.
fn spread(a: &[f32], r: &[f32]) -> Value {
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    json!({"cosine": work::cosine(a, r), "norm_rel_diff": (n(a) - n(r)).abs() / n(r)})
}

/// Mean step time after the first two steps (shader compilation, allocation warm-up).
fn warm_mean(ms: &[f64]) -> f64 {
    let w = &ms[2.min(ms.len() - 1)..];
    w.iter().sum::<f64>() / w.len() as f64
}

/// One unit in a tab; `threads` > 0 trains on the threaded CPU bundle with that many workers,
/// 0 on the single-threaded bundle; `codec_values` > 0 measures the codecs there too.
fn in_tab(
    port: u16,
    backend: &str,
    threads: usize,
    steps: u32,
    batch: u32,
    codec_values: usize,
) -> (Vec<f32>, Vec<f64>, Value) {
    let dir = tempfile::tempdir().unwrap();
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{port}/?bench=1"),
        Gpu::WebGpu,
        dir.path().join("chromium.log"),
    );
    tab.set_timeout(Duration::from_secs(1800));
    wait_until(Duration::from_secs(30), "the bench hook", || {
        tab.eval("typeof window.tesseraBench") == "function"
    });
    let opts = json!({"backend": backend, "version": 0, "shard": SHARD, "steps": steps,
        "batch": batch, "lr": LR, "threads": threads, "threaded": threads > 0, "codecValues": codec_values});
    let r = tab.eval(&format!("window.tesseraBench({opts})"));
    let r: Value = serde_json::from_str(r.as_str().expect("bench result")).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(r["delta"].as_str().unwrap())
        .unwrap();
    let delta = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let ms = r["stepMs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (delta, ms, r)
}

/// Milliseconds from navigation start to the first finished training step of an autojoined tab.
fn first_step(port: u16, query: &str, gpu: Gpu) -> (f64, Value) {
    let dir = tempfile::tempdir().unwrap();
    let mut tab = Browser::open(
        &format!("http://127.0.0.1:{port}/?autojoin=1{query}"),
        gpu,
        dir.path().join("chromium.log"),
    );
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let t = tab.tab();
        if let Some(ms) = t["firstStepAtMs"].as_f64() {
            tab.eval("document.getElementById('leave').click()");
            return (ms, t);
        }
        assert!(Instant::now() < end, "no first step: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = args.first().map_or("tiny", |s| s.as_str()).to_string();
    let steps: u32 = args.get(1).map_or(10, |s| s.parse().expect("STEPS"));
    let batch: u32 = args.get(2).map_or(8, |s| s.parse().expect("BATCH"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bundle = web_bundle();
    let _relay = start_relay(
        dir.path(),
        port,
        &[
            "--config",
            &config,
            "--web-bundle",
            &bundle.display().to_string(),
            "--batch",
            &batch.to_string(),
            "--inner-steps",
            &steps.to_string(),
            "--lease-secs",
            "300",
        ],
    );
    let run: RunInfo = serde_json::from_slice(&get(port, "/api/run")).unwrap();
    let corpus = Corpus::from_documents(
        [("relay corpus", get(port, "/api/corpus").as_slice())],
        run.model.block_size,
    )
    .unwrap();
    let specs = params::specs(&Gpt::new(&run.model, &Device::flex()));
    let base = weights_from_safetensors(&specs, &get(port, "/api/model/0")).unwrap();
    let unit = WorkUnit {
        unit_id: 0,
        base_version: 0,
        shard: SHARD,
        inner_steps: steps,
        batch_size: batch,
        lr: LR,
        // As the relay's units: a short warmup of a fresh AdamW.
        warmup_steps: 5.min(steps / 4),
        seed: run.train.seed,
        fragment: Fragment::ALL,
        codec: tessera_protocol::update::Codec::F32,
        deadline_ms: u64::MAX,
    };
    eprintln!(
        "{config}: {} parameters, {steps} steps of batch {batch} x {}",
        base.len(),
        run.model.block_size
    );
    let wgpu = Device::wgpu_options()
        .init()
        .expect("a native wgpu adapter");
    let (d_wgpu, ms_wgpu, l_wgpu) = native(&wgpu, &run, &unit, &base, &corpus);
    let (d_cpu, ms_cpu, l_cpu) = native(&Device::flex(), &run, &unit, &base, &corpus);
    eprintln!("native done; tab on WebGPU…");
    let (d_tab_gpu, ms_tab_gpu, r_gpu) = in_tab(port, "webgpu", 0, steps, batch, 0);
    eprintln!("tab on the WASM CPU backend…");
    let codec_values = tessera_core::config::ModelConfig::named("small")
        .unwrap()
        .num_params();
    let (d_tab_cpu, ms_tab_cpu, r_cpu) = in_tab(port, "cpu", 0, steps, batch, codec_values);
    // As many workers as the native host's rayon threads (every core).
    let threads = tessera_core::kernels::threads();
    let threaded = bundle.join("threads/tessera_web_bg.wasm").exists();
    let (d_tab_mt, ms_tab_mt, r_mt) = if threaded {
        eprintln!("tab on the threaded WASM CPU bundle ({threads} workers)…");
        in_tab(port, "cpu", threads, steps, batch, 0)
    } else {
        eprintln!("no threaded bundle (web/pkg/threads): skipping that row");
        (
            d_tab_cpu.clone(),
            vec![f64::NAN; ms_tab_cpu.len()],
            Value::Null,
        )
    };
    // The same bundle with one worker: what shared memory and atomics cost on their own.
    let ms_tab_mt1 = if threaded {
        eprintln!("tab on the threaded WASM CPU bundle (1 worker)…");
        in_tab(port, "cpu", 1, steps, batch, 0).1
    } else {
        vec![f64::NAN; ms_tab_cpu.len()]
    };
    eprintln!("codecs natively…");
    let values: Vec<f32> = d_cpu.iter().cycle().take(codec_values).copied().collect();
    let start = Instant::now();
    let native_codecs =
        tessera_protocol::throughput::measure(&values, 5, || start.elapsed().as_secs_f64() * 1e3);
    eprintln!("page load to first step…");
    let (first_auto, t_auto) = first_step(port, "", Gpu::WebGpu);
    let (first_gpu, t_gpu) = first_step(port, "&backend=webgpu", Gpu::WebGpu);
    let wasm = std::fs::metadata(bundle.join("tessera_web_bg.wasm")).map_or(0, |m| m.len());
    let wasm_gz = std::fs::metadata(bundle.join("tessera_web_bg.wasm.gz")).map_or(0, |m| m.len());

    let out = json!({
        "config": config, "steps": steps, "batch": batch, "params": base.len(),
        "tab_webgpu_adapter": r_gpu["device"],
        "cosine_tab_webgpu_vs_native_wgpu": work::cosine(&d_tab_gpu, &d_wgpu),
        "cosine_tab_cpu_vs_native_cpu": work::cosine(&d_tab_cpu, &d_cpu),
        "cosine_tab_cpu_threads_vs_native_cpu": work::cosine(&d_tab_mt, &d_cpu),
        "cosine_native_wgpu_vs_native_cpu": work::cosine(&d_wgpu, &d_cpu),
        // What the relay's re-execution (flex on its CPU) sees of each backend's result of the
        // same unit: the spread its tolerance must allow.
        "vs_native_cpu": {
            "native_wgpu": spread(&d_wgpu, &d_cpu),
            "tab_webgpu": spread(&d_tab_gpu, &d_cpu),
            "tab_wasm_cpu": spread(&d_tab_cpu, &d_cpu),
        },
        "ms_per_step_warm": {
            "tab_webgpu": warm_mean(&ms_tab_gpu), "native_wgpu": warm_mean(&ms_wgpu),
            "tab_wasm_cpu": warm_mean(&ms_tab_cpu), "native_cpu": warm_mean(&ms_cpu),
            "tab_wasm_cpu_threads": warm_mean(&ms_tab_mt),
            "tab_wasm_cpu_threaded_bundle_1_worker": warm_mean(&ms_tab_mt1),
        },
        "threads": threads,
        "first_step_ms": {"tab_webgpu": ms_tab_gpu[0], "native_wgpu": ms_wgpu[0]},
        "speed_ratio_tab_webgpu_over_native_wgpu": warm_mean(&ms_wgpu) / warm_mean(&ms_tab_gpu),
        "speed_ratio_tab_cpu_over_native_cpu": warm_mean(&ms_cpu) / warm_mean(&ms_tab_cpu),
        "speed_ratio_tab_cpu_threads_over_native_cpu": warm_mean(&ms_cpu) / warm_mean(&ms_tab_mt),
        "losses": {"tab_webgpu": r_gpu["losses"], "native_wgpu": l_wgpu,
                   "tab_cpu": r_cpu["losses"], "tab_cpu_threads": r_mt["losses"],
                   "native_cpu": l_cpu},
        "page_load_to_first_step_ms": {
            "auto": {"ms": first_auto, "backend": t_auto["backend"], "wasm_load_ms": t_auto["loadedMs"]},
            "webgpu": {"ms": first_gpu, "backend": t_gpu["backend"], "wasm_load_ms": t_gpu["loadedMs"]},
        },
        "wasm_bytes": wasm, "wasm_gzip_bytes": wasm_gz,
        "codecs": {"native_cpu": native_codecs, "tab_wasm_cpu": r_cpu["codecs"]},
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
