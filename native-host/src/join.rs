//! `tessera-host join`: a participant of a relay's run. Connects, proves its identity, then
//! loops: lease a unit, fetch its base weights, train H inner steps with the shared core,
//! send the signed pseudo-gradient. Reconnects with backoff when the relay goes away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tessera_core::burn::prelude::Device;
use tessera_core::config::ModelConfig;
use tessera_core::data::Corpus;
use tessera_core::optim::AdamW;
use tessera_protocol::feedback::ErrorFeedback;
use tessera_protocol::ledger::Receipt;
use tessera_protocol::messages::{
    ClientMsg, Hello, ModelChange, ParticipantKind, RunInfo, ServerMsg, Submission, WorkUnit,
};
use tessera_protocol::update::Codec;
use tessera_protocol::{MAX_CONTROL_BYTES, PROTOCOL_VERSION, decode, encode, identity, work};
use tokio_tungstenite::tungstenite::Message;

use crate::backend::{self, Backend};

/// Options of `tessera-host join`.
#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The relay: its page's address as it prints it (http://127.0.0.1:8700/) or its
    /// WebSocket URL (ws://127.0.0.1:8700/ws). Several relays of one run, separated by commas:
    /// when the connection is lost the next one is tried.
    url: String,
    /// cpu or wgpu (default: the fastest available here).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Identity key file (created on first run).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Carry the inner AdamW state from one unit to the next (off: a fresh AdamW per unit,
    /// which reached the lower loss in the parity benchmark, see BENCHMARKS.md).
    #[arg(long)]
    keep_optimizer: bool,
    /// Leave after this many accepted or rejected units.
    #[arg(long)]
    max_units: Option<u64>,
    /// Run this many times slower than this machine can (sleeping after each step): a slow
    /// participant for experiments and tests.
    #[arg(long, default_value_t = 1.0, value_parser = parse_throttle)]
    throttle: f64,
    /// Exit when the process that started this one ends (the relay's `--demo` participant;
    /// unix only).
    #[arg(long)]
    exit_with_parent: bool,
    /// Verify too: before each unit, ask the relay for another participant's unit to
    /// re-execute, and train only when there is none. The relay hands them to keys it was told
    /// to trust (`tessera-relay --trusted-verifier ID`, ID as `tessera-host id` prints it) and
    /// to identities with enough of their own units verified.
    #[arg(long)]
    verifier: bool,
}

/// Options of `tessera-host id`.
#[derive(Args, Debug)]
pub struct IdArgs {
    /// Identity key file (created on first run).
    #[arg(long)]
    key: Option<PathBuf>,
}

/// Prints the participant id of a key (what the relay's status and
/// `tessera-relay --trusted-verifier` name it by).
pub fn print_id(args: IdArgs) -> Result<()> {
    let path = args.key.unwrap_or_else(default_key_path);
    let secret = load_or_create_key(&path)?;
    println!("{}", identity::short_id(&identity::public_key(&secret)));
    Ok(())
}

/// Exits this process as soon as its parent is gone (it is re-parented), checking twice a
/// second on a thread of its own.
fn exit_with_parent() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                if std::os::unix::process::parent_id() != parent {
                    eprintln!("the process that started this participant is gone: leaving");
                    std::process::exit(0);
                }
            }
        });
    }
}

fn parse_throttle(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a factor of at least 1")),
    }
}

/// The WebSocket URL and the HTTP base of a relay, from the address a user types: the page's
/// address (`http://host:port/`, what the relay prints), its WebSocket URL (`ws://host:port/ws`)
/// or a bare `host:port`.
pub fn relay_urls(address: &str) -> Result<(String, String)> {
    let address = address.trim();
    let (scheme, rest) = match address.split_once("://") {
        Some((s, rest)) => (s.to_ascii_lowercase(), rest),
        None => ("http".to_string(), address),
    };
    let secure = match scheme.as_str() {
        "http" | "ws" => false,
        "https" | "wss" => true,
        other => bail!(
            "{address:?}: the relay's address starts with http://, https://, ws:// or wss://, not {other}://"
        ),
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() {
        bail!("{address:?} names no host: try http://127.0.0.1:8700/");
    }
    let (ws, http) = if secure {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    Ok((format!("{ws}://{host}/ws"), format!("{http}://{host}")))
}

/// Heartbeat period while training (leases outlive several of them).
const HEARTBEAT: Duration = Duration::from_secs(1);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Loads the ed25519 secret key at `path`, creating it (mode 0600) on first use.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let bytes = hex::decode(text.trim())
            .with_context(|| format!("{} is not a hex key", path.display()))?;
        return bytes
            .try_into()
            .map_err(|_| anyhow!("{} does not hold a 32-byte key", path.display()));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, hex::encode(secret))
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}

/// Where the receipts of the key at `key` are kept: beside it (`host.receipts.jsonl`).
pub fn receipts_path(key: &Path) -> PathBuf {
    key.with_extension("receipts.jsonl")
}

/// Appends a receipt to the receipts file (one JSON line, flushed to disk before the next unit).
fn keep_receipt(path: &Path, receipt: &Receipt) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(receipt)?)?;
    f.sync_data()?;
    Ok(())
}

pub fn default_key_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tessera").join("host.key")
}

struct Participant {
    secret: [u8; 32],
    backend: Backend,
    device: Device,
    device_name: String,
    http: String,
    client: reqwest::Client,
    corpus: Option<Arc<Corpus>>,
    weights: Option<Arc<work::Base>>,
    units_done: u64,
    max_units: Option<u64>,
    /// Inner AdamW state carried from one unit to the next (with --keep-optimizer).
    optim: Option<AdamW>,
    /// What this host's lossy updates left out, added to its next one.
    feedback: ErrorFeedback,
    /// Whether the last own update was encoded on the device (a GPU, any codec but f32 and
    /// sign).
    encoded_on_device: bool,
    keep_optimizer: bool,
    /// Training speed of the last unit (0 before the first): the capability sent in a hello.
    tokens_per_s: f32,
    throttle: f64,
    verifier: bool,
    /// Where the relay's receipts for this key's accepted updates are kept (JSON lines).
    receipts: PathBuf,
}

/// Runs `tessera-host join`.
pub fn run(args: JoinArgs) -> Result<()> {
    if args.exit_with_parent {
        exit_with_parent();
    }
    let key_path = args.key.clone().unwrap_or_else(default_key_path);
    let secret = load_or_create_key(&key_path)?;
    let backend = args.backend.unwrap_or_else(backend::fastest);
    let relays = args
        .url
        .split(',')
        .filter(|u| !u.trim().is_empty())
        .map(relay_urls)
        .collect::<Result<Vec<_>>>()?;
    let Some((_, http)) = relays.first().cloned() else {
        bail!("no relay address given");
    };
    let (device, device_name) = backend::device(backend)?;
    eprintln!(
        "participant {} on {device_name}",
        identity::short_id(&identity::public_key(&secret))
    );
    let mut p = Participant {
        secret,
        backend,
        device,
        device_name,
        http,
        client: reqwest::Client::new(),
        corpus: None,
        weights: None,
        units_done: 0,
        max_units: args.max_units,
        tokens_per_s: 0.0,
        optim: None,
        feedback: ErrorFeedback::default(),
        encoded_on_device: false,
        keep_optimizer: args.keep_optimizer,
        throttle: args.throttle,
        verifier: args.verifier,
        receipts: receipts_path(&key_path),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut backoff = Duration::from_millis(250);
        let mut at = 0;
        loop {
            let (ws_url, http) = &relays[at % relays.len()];
            p.http.clone_from(http);
            match p.session(ws_url).await {
                Ok(()) => return Ok(()),
                // Coming back changes nothing for a banned key.
                Err(e) if format!("{e:#}").contains("relay error: banned") => return Err(e),
                Err(e) => {
                    eprintln!(
                        "relay connection lost: {e:#}; retrying in {:.1} s",
                        backoff.as_secs_f64()
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    at += 1;
                }
            }
        }
    })
}

async fn send(ws: &mut Ws, msg: &ClientMsg) -> Result<()> {
    ws.send(Message::Binary(encode(msg).into())).await?;
    Ok(())
}

async fn recv(ws: &mut Ws) -> Result<ServerMsg> {
    loop {
        match ws.next().await {
            None => bail!("the relay closed the connection"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Binary(b))) => {
                let msg: ServerMsg = decode(&b, MAX_CONTROL_BYTES)?;
                if let ServerMsg::Error { message } = &msg {
                    bail!("relay error: {message}");
                }
                return Ok(msg);
            }
            Some(Ok(Message::Close(_))) => bail!("the relay closed the connection"),
            Some(Ok(_)) => continue,
        }
    }
}

impl Participant {
    async fn session(&mut self, url: &str) -> Result<()> {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let ServerMsg::Challenge {
            nonce,
            protocol_version,
        } = recv(&mut ws).await?
        else {
            bail!("the relay did not send a challenge");
        };
        if protocol_version != PROTOCOL_VERSION {
            bail!("relay speaks protocol {protocol_version}, this host {PROTOCOL_VERSION}");
        }
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            public_key: identity::public_key(&self.secret),
            signature: identity::sign(&self.secret, &identity::hello_message(&nonce)).to_vec(),
            kind: ParticipantKind::Native,
            backend: self.backend.to_string(),
            device: self.device_name.clone(),
            tokens_per_s: self.tokens_per_s,
        };
        send(&mut ws, &ClientMsg::Hello(hello)).await?;
        let ServerMsg::Welcome {
            participant_id,
            run,
            model_version,
        } = recv(&mut ws).await?
        else {
            bail!("the relay did not welcome us");
        };
        eprintln!(
            "joined run {:?} as {participant_id}; model version {model_version}",
            run.name
        );
        let corpus = self.corpus(&run).await?;
        loop {
            if self.max_units.is_some_and(|m| self.units_done >= m) {
                send(&mut ws, &ClientMsg::Leave).await.ok();
                ws.close(None).await.ok();
                return Ok(());
            }
            if self.verifier && self.verify_one(&mut ws, &run, corpus.clone()).await? {
                continue;
            }
            send(&mut ws, &ClientMsg::RequestWork).await?;
            let unit = loop {
                match recv(&mut ws).await? {
                    ServerMsg::Work(u) => break Some(u),
                    ServerMsg::NoWork { retry_ms } => {
                        tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                        break None;
                    }
                    _ => continue,
                }
            };
            let Some(unit) = unit else { continue };
            let started = Instant::now();
            let base = self.fetch_weights(unit.base_version, &run.model).await?;
            let training = Instant::now();
            let (submission, first, last) = self
                .train(&mut ws, &run, &unit, base, corpus.clone(), false)
                .await?;
            self.tokens_per_s =
                (submission.tokens as f64 / training.elapsed().as_secs_f64().max(1e-3)) as f32;
            let bytes = submission.payload.data.len();
            send(&mut ws, &ClientMsg::Submit(submission)).await?;
            let reply = loop {
                match recv(&mut ws).await? {
                    m @ (ServerMsg::Accepted { .. } | ServerMsg::Rejected { .. }) => break m,
                    _ => continue,
                }
            };
            self.units_done += 1;
            let secs = started.elapsed().as_secs_f64();
            match reply {
                ServerMsg::Accepted {
                    model_version,
                    receipt,
                    ..
                } => {
                    keep_receipt(&self.receipts, &receipt)?;
                    eprintln!(
                        "unit {} (shard {}, base v{}, {} steps): loss {first:.4} -> {last:.4} in {secs:.1} s, {bytes} bytes {}{}; accepted, model now v{model_version}",
                        unit.unit_id,
                        unit.shard,
                        unit.base_version,
                        unit.inner_steps,
                        unit.codec,
                        if matches!(unit.codec, Codec::Sparse { .. }) {
                            format!(
                                " (error feedback carried{}: norm {:.5})",
                                if self.feedback.on_device() {
                                    " on the GPU"
                                } else {
                                    ""
                                },
                                self.feedback.norm()
                            )
                        } else if self.encoded_on_device {
                            " (encoded on the GPU)".to_string()
                        } else {
                            String::new()
                        }
                    )
                }
                ServerMsg::Rejected { reason, detail, .. } => {
                    eprintln!("unit {} rejected: {reason:?}: {detail}", unit.unit_id)
                }
                _ => unreachable!(),
            }
        }
    }

    /// Asks for a unit of another participant to re-execute and, if one is given, trains it
    /// exactly as leased and sends the signed result; `false` when there was none to do (or
    /// its base is gone: the relay then gives the check to someone else).
    async fn verify_one(
        &mut self,
        ws: &mut Ws,
        run: &RunInfo,
        corpus: Arc<Corpus>,
    ) -> Result<bool> {
        send(ws, &ClientMsg::RequestVerification).await?;
        let unit = loop {
            match recv(ws).await? {
                ServerMsg::Verify(u) => break u,
                ServerMsg::NoWork { .. } => return Ok(false),
                _ => continue,
            }
        };
        let started = Instant::now();
        let base = match self.fetch_weights(unit.base_version, &run.model).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cannot verify unit {}: {e:#}", unit.unit_id);
                return Ok(false);
            }
        };
        let (result, ..) = self.train(ws, run, &unit, base, corpus, true).await?;
        send(ws, &ClientMsg::SubmitVerification(result)).await?;
        loop {
            match recv(ws).await? {
                ServerMsg::VerificationReceived { .. } => {
                    eprintln!(
                        "verified unit {} (base v{}, {} steps) in {:.1} s",
                        unit.unit_id,
                        unit.base_version,
                        unit.inner_steps,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(true);
                }
                ServerMsg::Rejected { reason, detail, .. } => {
                    eprintln!(
                        "verification of unit {} refused: {reason:?}: {detail}",
                        unit.unit_id
                    );
                    return Ok(true);
                }
                _ => continue,
            }
        }
    }

    async fn corpus(&mut self, run: &RunInfo) -> Result<Arc<Corpus>> {
        if let Some(c) = &self.corpus {
            return Ok(c.clone());
        }
        let url = format!("{}/api/corpus", self.http);
        let bytes = self
            .get(&url)
            .await?
            .with_context(|| format!("GET {url}: not found"))?;
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != run.corpus_sha256 {
            bail!(
                "corpus checksum {digest} does not match the run's {}",
                run.corpus_sha256
            );
        }
        let corpus = Arc::new(Corpus::from_documents(
            [("relay corpus", bytes.as_ref())],
            run.model.block_size,
        )?);
        self.corpus = Some(corpus.clone());
        Ok(corpus)
    }

    async fn fetch_weights(
        &mut self,
        version: u64,
        model: &ModelConfig,
    ) -> Result<Arc<work::Base>> {
        if let Some(b) = &self.weights
            && b.version == version
        {
            return Ok(b.clone());
        }
        if let Some(held) = self.weights.clone()
            && held.version < version
        {
            match self.fetch_change(&held, version, model).await {
                Ok(Some(base)) => {
                    let base = Arc::new(base);
                    self.weights = Some(base.clone());
                    return Ok(base);
                }
                // The relay has no change to offer (not encoded, not kept, or larger).
                Ok(None) => {}
                Err(e) => eprintln!(
                    "v{version} from v{}: {e:#}; fetching the weights",
                    held.version
                ),
            }
        }
        let url = format!("{}/api/model/{version}", self.http);
        let bytes = self
            .get(&url)
            .await?
            .with_context(|| format!("GET {url}: not found"))?;
        let base = Arc::new(
            work::Base::decode(version, model, &bytes, &Device::flex())
                .with_context(|| format!("decoding {url}"))?,
        );
        eprintln!("v{version} fetched: {} bytes", bytes.len());
        self.weights = Some(base.clone());
        Ok(base)
    }

    /// GETs `url` from the relay: the body, or `None` on 404.
    async fn get(&self, url: &str) -> Result<Option<bytes::Bytes>> {
        let resp = self.client.get(url).send().await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = resp
            .error_for_status()
            .with_context(|| format!("GET {url}"))?;
        Ok(Some(resp.bytes().await?))
    }

    /// Version `version` rebuilt from the held one and the relay's encoded changes, when it
    /// has them (and they are smaller than the weights); `None` when it has not.
    async fn fetch_change(
        &self,
        held: &work::Base,
        version: u64,
        model: &ModelConfig,
    ) -> Result<Option<work::Base>> {
        let url = format!("{}/api/model/{version}/from/{}", self.http, held.version);
        let Some(bytes) = self.get(&url).await? else {
            return Ok(None);
        };
        let change: ModelChange = decode(&bytes, usize::MAX)?;
        let base = held.apply(model, &change, &Device::flex())?;
        eprintln!(
            "v{version} rebuilt from v{} and {} encoded changes: {} bytes fetched",
            held.version,
            change.links.len(),
            bytes.len()
        );
        Ok(Some(base))
    }

    async fn train(
        &mut self,
        ws: &mut Ws,
        run: &RunInfo,
        unit: &WorkUnit,
        base: Arc<work::Base>,
        corpus: Arc<Corpus>,
        verification: bool,
    ) -> Result<(Submission, f32, f32)> {
        let progress = Arc::new(AtomicU32::new(0));
        let job = {
            let (device, model_cfg, unit, progress, base, throttle) = (
                self.device.clone(),
                run.model,
                unit.clone(),
                progress.clone(),
                base.clone(),
                self.throttle,
            );
            let train = run.train.clone();
            // A re-execution starts from a fresh AdamW, as every unit is defined, and leaves
            // this participant's own carried state alone.
            let optim = if verification {
                AdamW::new()
            } else {
                self.optim
                    .take()
                    .filter(|_| self.keep_optimizer)
                    .unwrap_or_default()
            };
            // Its own units encoded where they train (on a GPU, with the error feedback kept
            // there); a re-execution reads the f32 pseudo-gradient, as the relay's does. The
            // residual travels with the job and comes back with it, its unit failed or not
            // (only a panic in the job loses it).
            let mut feedback = (!verification).then(|| std::mem::take(&mut self.feedback));
            tokio::task::spawn_blocking(move || {
                let mut last = Instant::now();
                let report = move |step| {
                    if throttle > 1.0 {
                        std::thread::sleep(last.elapsed().mul_f64(throttle - 1.0));
                    }
                    last = Instant::now();
                    progress.store(step, Ordering::Relaxed);
                };
                let (b, c) = (&base.weights, &corpus);
                let trained = match feedback.as_mut() {
                    Some(f) => work::train_and_encode(
                        &device, model_cfg, &train, &unit, b, c, optim, f, report,
                    ),
                    None => work::train(&device, model_cfg, &train, &unit, b, c, optim, report),
                };
                (trained, feedback)
            })
        };
        tokio::pin!(job);
        let bar = indicatif::ProgressBar::new(unit.inner_steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "unit {msg} {bar:30} {pos}/{len} inner steps [{elapsed}<{eta}]",
            )
            .expect("valid template"),
        );
        bar.set_message(unit.unit_id.to_string());
        let mut beat = tokio::time::interval(HEARTBEAT);
        let (delta, encoded, first, last) = loop {
            tokio::select! {
                r = &mut job => {
                    let (trained, feedback) = r?;
                    if let Some(feedback) = feedback {
                        self.feedback = feedback;
                    }
                    let t = trained?;
                    if !verification {
                        self.optim = Some(t.optimizer);
                    }
                    break (t.delta, t.encoded, t.loss_first, t.loss_last);
                }
                _ = beat.tick() => {
                    let step = progress.load(Ordering::Relaxed);
                    bar.set_position(step as u64);
                    send(ws, &ClientMsg::Heartbeat { unit_id: Some(unit.unit_id), step }).await?;
                }
                m = recv(ws) => { m?; } // acks and version news
            }
        };
        bar.finish_and_clear();
        let submission = if verification {
            work::verification(
                &self.secret,
                unit,
                &run.model,
                base.sha256,
                &delta,
                first,
                last,
            )
        } else {
            self.encoded_on_device = encoded.is_some();
            let payload = match encoded {
                // Encoded on the device, its residual (sparse) kept there.
                Some(payload) => payload,
                None => self.feedback.encode(unit, &delta),
            };
            work::submission(
                &self.secret,
                unit,
                &run.model,
                base.sha256,
                payload,
                first,
                last,
            )
        };
        Ok((submission, first, last))
    }
}
