//! The participant loop: pick a backend, join the relay, then lease, train, submit, until the
//! visitor leaves. Reconnects with backoff when the relay goes away.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tessera_core::burn::prelude::Device;
use tessera_core::config::ModelConfig;
use tessera_core::data::Corpus;
use tessera_core::params;
use tessera_protocol::feedback::ErrorFeedback;
use tessera_protocol::messages::{Hello, ParticipantKind, RunInfo, WorkUnit};
use tessera_protocol::update::{Fragment, Payload};
use tessera_protocol::{ClientMsg, PROTOCOL_VERSION, ServerMsg, identity, work};
use wasm_bindgen::prelude::*;

use crate::events::Event;
use crate::platform::{describe, fetch_bytes, fetch_found, log, now_ms, precise_ms, sleep};
use crate::socket::Socket;

/// Backend names as the relay's ledger shows them.
const WEBGPU: &str = "webgpu";
const WASM_CPU: &str = "wasm-cpu";

/// What the page passes to `new Participant(options, onEvent)`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Options {
    /// The relay's origin, e.g. `http://127.0.0.1:8700`.
    relay: String,
    /// `auto` (WebGPU unless the adapter is missing or a software fallback), `webgpu`, `cpu`.
    #[serde(default = "auto")]
    backend: String,
    /// The identity's secret key (hex); a new one is made when absent.
    #[serde(default)]
    secret: Option<String>,
    /// What `navigator.gpu.requestAdapter()` returned in this context (null: no adapter).
    #[serde(default)]
    adapter: Option<AdapterInfo>,
}

fn auto() -> String {
    "auto".into()
}

/// `GPUAdapterInfo`, as the page read it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdapterInfo {
    #[serde(default)]
    vendor: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    is_fallback_adapter: bool,
}

impl AdapterInfo {
    fn name(&self) -> String {
        let parts: Vec<&str> = [&self.description, &self.vendor, &self.architecture]
            .into_iter()
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .collect();
        if parts.is_empty() {
            "WebGPU adapter".into()
        } else {
            parts.join(" / ")
        }
    }
}

struct Shared {
    options: Options,
    secret: [u8; 32],
    on_event: js_sys::Function,
    paused: Cell<bool>,
    leaving: Cell<bool>,
    running: Cell<bool>,
    state: RefCell<State>,
}

/// What survives reconnections.
#[derive(Default)]
struct State {
    device: Option<(Device, String, String)>,
    corpus: Option<(String, Rc<Corpus>)>,
    weights: Option<Rc<work::Base>>,
    tokens_per_s: f32,
    /// What this tab's lossy updates left out, added to its next one.
    feedback: ErrorFeedback,
}

impl Shared {
    fn emit(&self, event: Event) {
        let serializer = serde_wasm_bindgen::Serializer::json_compatible();
        match serde::Serialize::serialize(&event, &serializer) {
            Ok(value) => {
                if let Err(e) = self.on_event.call1(&JsValue::NULL, &value) {
                    log(&format!("event handler failed: {}", describe(e)));
                }
            }
            Err(e) => log(&format!("event not serializable: {e}")),
        }
    }

    fn state(&self, state: &str, detail: impl Into<String>) {
        self.emit(Event::State {
            state: state.into(),
            detail: detail.into(),
        });
    }

    fn ws_url(&self) -> String {
        let base = self.options.relay.trim_end_matches('/');
        format!(
            "{}/ws",
            base.replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1)
        )
    }

    fn http(&self, path: &str) -> String {
        format!("{}{path}", self.options.relay.trim_end_matches('/'))
    }
}

/// The browser participant: the one handle JavaScript holds.
#[wasm_bindgen]
pub struct Participant {
    shared: Rc<Shared>,
}

#[wasm_bindgen]
impl Participant {
    /// `options`: `{relay, backend?: "auto"|"webgpu"|"cpu", secret?: hex, adapter?: GPUAdapterInfo
    /// fields or null}`; `on_event` receives every [`Event`] as a plain object.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue, on_event: js_sys::Function) -> Result<Participant, JsError> {
        let options: Options = serde_wasm_bindgen::from_value(options)
            .map_err(|e| JsError::new(&format!("bad options: {e}")))?;
        if !["auto", WEBGPU, "cpu"].contains(&options.backend.as_str()) {
            return Err(JsError::new(&format!(
                "backend must be auto, webgpu or cpu, not {:?}",
                options.backend
            )));
        }
        let secret = match &options.secret {
            Some(hex_key) if !hex_key.is_empty() => hex::decode(hex_key)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| JsError::new("the stored identity is not a 32-byte hex key"))?,
            _ => {
                let mut s = [0u8; 32];
                getrandom::fill(&mut s)
                    .map_err(|e| JsError::new(&format!("no randomness: {e}")))?;
                s
            }
        };
        Ok(Participant {
            shared: Rc::new(Shared {
                options,
                secret,
                on_event,
                paused: Cell::new(false),
                leaving: Cell::new(false),
                running: Cell::new(false),
                state: RefCell::new(State::default()),
            }),
        })
    }

    /// The identity's secret key (hex), for the page to keep in its storage.
    #[wasm_bindgen(getter)]
    pub fn secret(&self) -> String {
        hex::encode(self.shared.secret)
    }

    /// The participant id the relay will show (derived from the public key).
    #[wasm_bindgen(getter, js_name = participantId)]
    pub fn participant_id(&self) -> String {
        identity::short_id(&identity::public_key(&self.shared.secret))
    }

    /// Joins and trains until [`Participant::leave`]; reconnects by itself. The promise
    /// rejects only when no backend can be started.
    pub fn run(&self) -> js_sys::Promise {
        let shared = self.shared.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            if shared.running.replace(true) {
                return Err(JsError::new("already running").into());
            }
            shared.leaving.set(false);
            let result = run(&shared).await;
            shared.running.set(false);
            shared.state("left", "");
            result
                .map(|()| JsValue::UNDEFINED)
                .map_err(|e| JsError::new(&e).into())
        })
    }

    /// Stops training at the next step boundary (the connection stays open).
    pub fn pause(&self) {
        self.shared.paused.set(true);
    }

    /// Continues after [`Participant::pause`].
    pub fn resume(&self) {
        self.shared.paused.set(false);
    }

    /// Leaves: releases the lease, closes the connection; `run()` then resolves.
    pub fn leave(&self) {
        self.shared.leaving.set(true);
        self.shared.paused.set(false);
    }
}

/// The CPU device's name: WASM and how many threads flex's kernels run on.
fn cpu_name() -> String {
    match tessera_core::kernels::threads() {
        1 => "CPU (WASM, 1 thread)".to_string(),
        n => format!("CPU (WASM, {n} threads)"),
    }
}

/// Starts the device for the requested backend, saying why it was chosen.
async fn pick_device(options: &Options) -> Result<(Device, String, String, String), String> {
    let cpu = |reason: String| (Device::flex(), WASM_CPU.to_string(), cpu_name(), reason);
    let adapter = options.adapter.clone();
    match (options.backend.as_str(), &adapter) {
        ("cpu", _) => return Ok(cpu("CPU requested".into())),
        (WEBGPU, _) => {}
        (_, None) => {
            return Ok(cpu(
                "WebGPU is not available in this browser: training on the CPU".into(),
            ));
        }
        (_, Some(a)) if a.is_fallback_adapter => {
            return Ok(cpu(format!(
                "the only WebGPU adapter ({}) is a software fallback, slower than the CPU path: training on the CPU",
                a.name()
            )));
        }
        _ => {} // WebGPU requested, or auto with a hardware adapter
    }
    #[cfg(feature = "webgpu")]
    match Device::wgpu_options().init_async().await {
        Ok(device) => {
            let name = adapter.map(|a| a.name()).unwrap_or_else(|| "WebGPU".into());
            Ok((device, WEBGPU.into(), name, "WebGPU adapter".into()))
        }
        Err(e) if options.backend == "auto" => Ok(cpu(format!(
            "WebGPU failed to start ({e:?}): training on the CPU"
        ))),
        Err(e) => Err(format!("WebGPU failed to start: {e:?}")),
    }
    #[cfg(not(feature = "webgpu"))]
    if options.backend == "auto" {
        Ok(cpu("this bundle has no WebGPU: training on the CPU".into()))
    } else {
        Err("WebGPU requested from the CPU-only bundle".into())
    }
}

async fn run(shared: &Rc<Shared>) -> Result<(), String> {
    if shared.state.borrow().device.is_none() {
        let (device, backend, name, reason) = pick_device(&shared.options).await?;
        shared.emit(Event::Backend {
            backend: backend.clone(),
            device: name.clone(),
            reason,
        });
        shared.state.borrow_mut().device = Some((device, backend, name));
    }
    let mut backoff = 250u32;
    loop {
        if shared.leaving.get() {
            return Ok(());
        }
        shared.state("connecting", shared.ws_url());
        match session(shared).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                shared.emit(Event::Error { message: e.clone() });
                shared.state(
                    "reconnecting",
                    format!("{e}; retrying in {:.1} s", backoff as f64 / 1000.0),
                );
                // Sleep in slices so a leave is honoured promptly.
                let until = now_ms() + backoff as f64;
                while now_ms() < until && !shared.leaving.get() {
                    sleep(100).await;
                }
                backoff = (backoff * 2).min(10_000);
            }
        }
    }
}

/// Handles a message that may arrive at any time; returns it back if it is something else.
fn background(shared: &Shared, msg: ServerMsg) -> Option<ServerMsg> {
    match msg {
        ServerMsg::NewVersion { model_version } => {
            shared.emit(Event::Version { model_version });
            None
        }
        ServerMsg::HeartbeatAck => None,
        other => Some(other),
    }
}

async fn session(shared: &Rc<Shared>) -> Result<(), String> {
    let mut ws = Socket::connect(&shared.ws_url()).await?;
    let ServerMsg::Challenge {
        nonce,
        protocol_version,
    } = ws.recv().await?
    else {
        return Err("the relay did not send a challenge".into());
    };
    if protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "the relay speaks protocol {protocol_version}, this page {PROTOCOL_VERSION}"
        ));
    }
    let (device, backend, device_name) = shared
        .state
        .borrow()
        .device
        .clone()
        .expect("device chosen before joining");
    let tokens_per_s = shared.state.borrow().tokens_per_s;
    ws.send(&ClientMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        public_key: identity::public_key(&shared.secret),
        signature: identity::sign(&shared.secret, &identity::hello_message(&nonce)).to_vec(),
        kind: ParticipantKind::Browser,
        backend: backend.clone(),
        device: device_name,
        tokens_per_s,
    }))?;
    let ServerMsg::Welcome {
        participant_id,
        run,
        model_version,
    } = ws.recv().await?
    else {
        return Err("the relay did not welcome us".into());
    };
    let m = run.model;
    shared.emit(Event::Joined {
        participant_id,
        run: run.name.clone(),
        model: format!(
            "{} layers × {} wide, context {}, {} parameters",
            m.n_layer, m.n_embd, m.block_size, run.num_params
        ),
        model_version,
    });
    let corpus = corpus(shared, &run).await?;
    loop {
        if shared.leaving.get() {
            ws.send(&ClientMsg::Leave).ok();
            return Ok(());
        }
        if shared.paused.get() {
            shared.state("paused", "");
            while shared.paused.get() {
                sleep(200).await;
                while let Some(msg) = ws.try_recv()? {
                    background(shared, msg);
                }
            }
        }
        ws.send(&ClientMsg::RequestWork)?;
        let unit = loop {
            match background(shared, ws.recv().await?) {
                Some(ServerMsg::Work(unit)) => break Some(unit),
                Some(ServerMsg::NoWork { retry_ms }) => {
                    shared.state("waiting", "no work right now");
                    let until = now_ms() + retry_ms as f64;
                    while now_ms() < until && !shared.leaving.get() {
                        sleep(100).await;
                    }
                    break None;
                }
                _ => continue,
            }
        };
        let Some(unit) = unit else { continue };
        shared.emit(Event::Unit {
            unit_id: unit.unit_id,
            shard: unit.shard,
            base_version: unit.base_version,
            inner_steps: unit.inner_steps,
        });
        shared.state("training", format!("unit {}", unit.unit_id));
        let base = weights(shared, unit.base_version, &run.model).await?;
        let Some(trained) = train_unit(
            &device,
            &run,
            &unit,
            &base.weights,
            &corpus,
            Some(&mut ws),
            shared,
        )
        .await?
        else {
            continue;
        };
        let secs = trained.step_ms.iter().sum::<f64>() / 1000.0;
        let tokens = work::tokens(&unit, &run.model);
        shared.state.borrow_mut().tokens_per_s = (tokens as f64 / secs.max(1e-3)) as f32;
        let encoded_on_gpu = trained.encoded.is_some();
        let payload = {
            let feedback = &mut shared.state.borrow_mut().feedback;
            match trained.encoded {
                // Encoded on the GPU, its residual (sparse) kept there.
                Some(payload) => payload,
                None => feedback.encode(&unit, &trained.delta),
            }
        };
        let update_bytes = payload.data.len() as u64;
        let submission = work::submission(
            &shared.secret,
            &unit,
            &run.model,
            base.sha256,
            payload,
            trained.losses[0],
            *trained.losses.last().expect("at least one step"),
        );
        ws.send(&ClientMsg::Submit(submission))?;
        let reply = loop {
            match background(shared, ws.recv().await?) {
                Some(m @ (ServerMsg::Accepted { .. } | ServerMsg::Rejected { .. })) => break m,
                _ => continue,
            }
        };
        let (accepted, model_version, reason, receipt) = match reply {
            ServerMsg::Accepted {
                model_version,
                receipt,
                ..
            } => (
                true,
                Some(model_version),
                None,
                serde_json::to_string(&receipt).ok(),
            ),
            ServerMsg::Rejected { reason, detail, .. } => {
                (false, None, Some(format!("{reason:?}: {detail}")), None)
            }
            _ => unreachable!("matched above"),
        };
        shared.emit(Event::Result {
            unit_id: unit.unit_id,
            accepted,
            model_version,
            reason,
            tokens,
            loss_before: trained.losses[0],
            loss_after: *trained.losses.last().expect("at least one step"),
            receipt,
            update_bytes,
            encoded_on_gpu,
        });
    }
}

async fn corpus(shared: &Shared, run: &RunInfo) -> Result<Rc<Corpus>, String> {
    if let Some((sha, c)) = &shared.state.borrow().corpus
        && *sha == run.corpus_sha256
    {
        return Ok(c.clone());
    }
    let bytes = fetch_bytes(&shared.http("/api/corpus")).await?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != run.corpus_sha256 {
        return Err(format!(
            "corpus checksum {digest} does not match the run's {}",
            run.corpus_sha256
        ));
    }
    let corpus = Rc::new(
        Corpus::from_documents([("relay corpus", bytes.as_slice())], run.model.block_size)
            .map_err(|e| e.to_string())?,
    );
    shared.state.borrow_mut().corpus = Some((digest, corpus.clone()));
    Ok(corpus)
}

async fn weights(
    shared: &Shared,
    version: u64,
    model: &ModelConfig,
) -> Result<Rc<work::Base>, String> {
    if let Some(b) = &shared.state.borrow().weights
        && b.version == version
    {
        return Ok(b.clone());
    }
    let held = shared.state.borrow().weights.clone();
    let (b, bytes, rebuilt_from) = match held.filter(|h| h.version < version) {
        Some(h) => match fetch_change(&shared.options.relay, &h, version, model).await {
            Ok(Some((b, bytes))) => (b, bytes, Some(h.version)),
            // The relay has no change to offer (not encoded, not kept, or larger).
            Ok(None) => whole(&shared.options.relay, version, model).await?,
            Err(e) => {
                log(&format!(
                    "v{version} from v{}: {e}; fetching the weights",
                    h.version
                ));
                whole(&shared.options.relay, version, model).await?
            }
        },
        None => whole(&shared.options.relay, version, model).await?,
    };
    shared.emit(Event::Weights {
        version,
        bytes: bytes as u64,
        rebuilt_from,
    });
    let b = Rc::new(b);
    shared.state.borrow_mut().weights = Some(b.clone());
    Ok(b)
}

/// [`fetch_weights`], as [`weights`] records it: rebuilt from no version.
async fn whole(
    relay: &str,
    version: u64,
    model: &ModelConfig,
) -> Result<(work::Base, usize, Option<u64>), String> {
    let (b, bytes) = fetch_weights(relay, version, model).await?;
    Ok((b, bytes, None))
}

/// Version `version` rebuilt from the held one and the relay's encoded changes, and the bytes
/// that took; `None` when the relay has none to offer (the run does not encode them, a link is
/// not kept, or they are larger than the weights).
async fn fetch_change(
    relay: &str,
    held: &work::Base,
    version: u64,
    model: &ModelConfig,
) -> Result<Option<(work::Base, usize)>, String> {
    let url = format!(
        "{}/api/model/{version}/from/{}",
        relay.trim_end_matches('/'),
        held.version
    );
    let Some(bytes) = fetch_found(&url).await? else {
        return Ok(None);
    };
    let change: tessera_protocol::messages::ModelChange =
        tessera_protocol::decode(&bytes, usize::MAX).map_err(|e| e.to_string())?;
    let base = held
        .apply(model, &change, &Device::flex())
        .map_err(|e| e.to_string())?;
    Ok(Some((base, bytes.len())))
}

/// A version's weights, downloaded whole, and the bytes that took.
async fn fetch_weights(
    relay: &str,
    version: u64,
    model: &ModelConfig,
) -> Result<(work::Base, usize), String> {
    let url = format!("{}/api/model/{version}", relay.trim_end_matches('/'));
    let bytes = fetch_bytes(&url).await?;
    let base = work::Base::decode(version, model, &bytes, &Device::flex())
        .map_err(|e| format!("decoding {url}: {e}"))?;
    Ok((base, bytes.len()))
}

/// What a trained unit produced.
struct Trained {
    /// The pseudo-gradient in f32 (empty when `encoded` holds it).
    delta: Vec<f32>,
    /// The pseudo-gradient encoded on the GPU with the unit's codec (on WebGPU).
    encoded: Option<Payload>,
    losses: Vec<f32>,
    step_ms: Vec<f64>,
}

/// Trains `unit` from `base`: H AdamW steps on the unit's batches, reading each loss without
/// blocking. Between steps it answers the relay (heartbeats, version news) and honours pause
/// and leave. `None` when the unit was given up.
async fn train_unit(
    device: &Device,
    run: &RunInfo,
    unit: &WorkUnit,
    base: &[f32],
    corpus: &Corpus,
    mut ws: Option<&mut Socket>,
    shared: &Shared,
) -> Result<Option<Trained>, String> {
    let mut train = run.train.clone();
    train.batch_size = unit.batch_size as usize;
    let mut trainer =
        work::trainer_for(unit, run.model, train, device, base).map_err(|e| e.to_string())?;
    // The weights as uploaded, kept on the GPU when the update is encoded there.
    let before =
        work::encodes_on_device(unit.codec, device).then(|| params::flat_tensor(trainer.model()));
    // The lease lasts this long after each heartbeat (the relay renews it by that much).
    let lease_ms = (unit.deadline_ms as f64 - now_ms()).max(2_000.0);
    let mut last_beat = now_ms();
    let mut losses = Vec::with_capacity(unit.inner_steps as usize);
    let mut step_ms = Vec::with_capacity(unit.inner_steps as usize);
    let tokens_per_step = (unit.batch_size as usize * run.model.block_size) as f64;
    for step in 0..unit.inner_steps {
        let mut announced = false;
        loop {
            if let Some(ws) = ws.as_deref_mut() {
                while let Some(msg) = ws.try_recv()? {
                    background(shared, msg);
                }
            }
            if shared.leaving.get() {
                shared.emit(Event::Abandoned {
                    unit_id: unit.unit_id,
                    reason: "leaving".into(),
                });
                return Ok(None);
            }
            if !shared.paused.get() {
                break;
            }
            if ws.is_some() && now_ms() > last_beat + lease_ms - 1_000.0 {
                shared.emit(Event::Abandoned {
                    unit_id: unit.unit_id,
                    reason: "paused past the lease; the relay gives the unit to someone else"
                        .into(),
                });
                return Ok(None);
            }
            if !announced {
                shared.state("paused", format!("unit {}, step {step}", unit.unit_id));
                announced = true;
            }
            sleep(200).await;
            if !shared.paused.get() {
                shared.state("training", format!("unit {}", unit.unit_id));
            }
        }
        if let Some(ws) = ws.as_deref_mut()
            && now_ms() - last_beat >= 1_000.0
        {
            ws.send(&ClientMsg::Heartbeat {
                unit_id: Some(unit.unit_id),
                step,
            })?;
            last_beat = now_ms();
        }
        let started = now_ms();
        let batch = work::batch(unit, &run.model, corpus, step);
        let out = trainer.step_with_lr(&batch, work::lr_at(unit, step));
        let loss = out
            .loss
            .into_scalar_async::<f32>()
            .await
            .map_err(|e| format!("reading the loss: {e:?}"))?;
        let ms = now_ms() - started;
        losses.push(loss);
        step_ms.push(ms);
        if ws.is_some() {
            shared.emit(Event::Step {
                unit_id: unit.unit_id,
                step: step + 1,
                of: unit.inner_steps,
                loss,
                ms,
                tokens_per_s: tokens_per_step / (ms / 1000.0).max(1e-6),
            });
        }
        // A CPU step never yields on its own: let the worker hear the page between steps.
        sleep(0).await;
    }
    // Borrowed for the launch only: the page's messages borrow the state while a read waits.
    let encoded = match before {
        Some(before) => {
            let after = params::flat_tensor(trainer.model());
            let feedback = &mut shared.state.borrow_mut().feedback;
            work::quantize_on_device(unit, before, after, feedback).map_err(|e| e.to_string())?
        }
        None => None,
    };
    if let Some(update) = encoded {
        // Only the encoded bytes cross back from the GPU.
        let payload = update.read_async().await.map_err(|e| e.to_string())?;
        shared.state.borrow_mut().feedback.settle(&payload);
        return Ok(Some(Trained {
            delta: Vec::new(),
            encoded: Some(payload),
            losses,
            step_ms,
        }));
    }
    let trained = params::to_vec_async(trainer.model())
        .await
        .map_err(|e| e.to_string())?;
    let delta = work::pseudo_gradient(unit, base, &trained).map_err(|e| e.to_string())?;
    Ok(Some(Trained {
        delta,
        encoded: None,
        losses,
        step_ms,
    }))
}

/// Options of [`bench_unit`].
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BenchOptions {
    relay: String,
    backend: String,
    version: u64,
    shard: u64,
    steps: u32,
    batch: u32,
    lr: f64,
    /// When > 0: after training, every codec's encode and decode throughput on this many
    /// values (the trained pseudo-gradient, repeated), beside a copy of them.
    #[serde(default)]
    codec_values: usize,
}

/// Trains one named unit (base version, shard, steps, batch, lr, on the relay's run) on
/// `webgpu` or `cpu` and resolves to `{backend, device, losses, stepMs, delta: Float32Array}`
/// (and `codecs`, [`tessera_protocol::throughput::Throughput`], when `codecValues` > 0): the
/// browser side of the consistency, speed and codec benchmarks.
#[wasm_bindgen(js_name = benchUnit)]
pub fn bench_unit(options: JsValue) -> js_sys::Promise {
    wasm_bindgen_futures::future_to_promise(async move {
        let o: BenchOptions = serde_wasm_bindgen::from_value(options)
            .map_err(|e| JsError::new(&format!("bad options: {e}")))?;
        let result = bench(o).await.map_err(|e| JsError::new(&e))?;
        Ok(result)
    })
}

async fn bench(o: BenchOptions) -> Result<JsValue, String> {
    let options = Options {
        relay: o.relay.clone(),
        backend: if o.backend == "cpu" { "cpu" } else { WEBGPU }.into(),
        secret: None,
        adapter: None,
    };
    let (device, backend, device_name, _) = pick_device(&options).await?;
    let run: RunInfo = serde_json::from_slice(
        &fetch_bytes(&format!("{}/api/run", o.relay.trim_end_matches('/'))).await?,
    )
    .map_err(|e| format!("/api/run: {e}"))?;
    let shared = Rc::new(Shared {
        options,
        secret: [0; 32],
        on_event: js_sys::Function::new_no_args(""),
        paused: Cell::new(false),
        leaving: Cell::new(false),
        running: Cell::new(true),
        state: RefCell::new(State::default()),
    });
    let corpus = corpus(&shared, &run).await?;
    let (base, _) = fetch_weights(&o.relay, o.version, &run.model).await?;
    let unit = WorkUnit {
        unit_id: 0,
        base_version: o.version,
        shard: o.shard,
        inner_steps: o.steps,
        batch_size: o.batch,
        lr: o.lr,
        warmup_steps: 5.min(o.steps / 4),
        seed: run.train.seed,
        fragment: Fragment::ALL,
        codec: tessera_protocol::update::Codec::F32,
        deadline_ms: u64::MAX,
    };
    let trained = train_unit(&device, &run, &unit, &base.weights, &corpus, None, &shared)
        .await?
        .ok_or("the unit was given up")?;
    let out = js_sys::Object::new();
    let set = |k: &str, v: JsValue| js_sys::Reflect::set(&out, &k.into(), &v).map(|_| ());
    if o.codec_values > 0 && !trained.delta.is_empty() {
        let values: Vec<f32> = trained
            .delta
            .iter()
            .cycle()
            .take(o.codec_values)
            .copied()
            .collect();
        let measured = tessera_protocol::throughput::measure(&values, 5, precise_ms);
        let codecs = serde::Serialize::serialize(
            &measured,
            &serde_wasm_bindgen::Serializer::json_compatible(),
        )
        .map_err(|e| e.to_string())?;
        set("codecs", codecs).map_err(describe)?;
    }
    let losses = serde_wasm_bindgen::to_value(&trained.losses).map_err(|e| e.to_string())?;
    let step_ms = serde_wasm_bindgen::to_value(&trained.step_ms).map_err(|e| e.to_string())?;
    set("backend", backend.into())
        .and_then(|_| set("device", device_name.into()))
        .and_then(|_| set("losses", losses))
        .and_then(|_| set("stepMs", step_ms))
        .and_then(|_| {
            set(
                "delta",
                js_sys::Float32Array::from(trained.delta.as_slice()).into(),
            )
        })
        .map_err(describe)?;
    Ok(out.into())
}
