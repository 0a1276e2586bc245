//! `tessera-relay`: serves a training run to browser and native participants.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tessera_coordinator::Config as CoordConfig;
use tessera_core::config::{CONFIG_NAMES, ModelConfig, TrainConfig};
use tessera_protocol::update::Fragment;
use tessera_relay::run::{Relay, RunSpec, Tuning};
use tessera_relay::server;

#[derive(Parser, Debug)]
#[command(
    name = "tessera-relay",
    version,
    about = "Tessera relay: hands out work and aggregates the shared model"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: String,
    /// Corpus: a UTF-8 text file or a folder of them (default: the embedded corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model configuration: tiny, baby or small.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// SQLite database of the run.
    #[arg(long, default_value = "relay-data/relay.db")]
    db: PathBuf,
    /// Directory for model versions.
    #[arg(long, default_value = "relay-data/checkpoints")]
    checkpoints: PathBuf,
    /// Run name.
    #[arg(long, default_value = "default")]
    name: String,
    /// Inner steps H per work unit.
    #[arg(long, default_value_t = 50)]
    inner_steps: u32,
    /// Sequences per inner batch.
    #[arg(long, default_value_t = 12)]
    batch: u32,
    /// Inner AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    inner_lr: f64,
    /// Decay the inner learning rate (cosine, to a tenth) over this many versions.
    #[arg(long)]
    inner_lr_decay_versions: Option<u64>,
    /// Updates per round (K).
    #[arg(long, default_value_t = 1)]
    updates_per_round: usize,
    /// Maximum staleness S of an accepted update, in versions.
    #[arg(long, default_value_t = 4)]
    max_staleness: u64,
    /// Outer (Nesterov) learning rate.
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    /// Outer momentum.
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Seconds a lease lives without a heartbeat.
    #[arg(long, default_value_t = 15.0)]
    lease_secs: f64,
    /// Seconds after its first update at which a round closes anyway.
    #[arg(long, default_value_t = 60.0)]
    round_timeout_secs: f64,
    /// Stop handing out work at this model version.
    #[arg(long)]
    max_versions: Option<u64>,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 20)]
    eval_iters: usize,
    /// Run seed.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Also start one native participant (tessera-host, found next to this binary).
    #[arg(long)]
    demo: bool,
    /// Folder of the built browser participant (tools/build-web.sh writes it), served at /pkg.
    #[arg(long, default_value = "web/pkg")]
    web_bundle: PathBuf,
}

fn read_corpus(path: Option<&std::path::Path>) -> Result<Vec<u8>> {
    let Some(path) = path else {
        return Ok(tessera_core::corpus::default_corpus().into_bytes());
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            out.extend(std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?);
        }
        Ok(out)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read corpus {}", path.display()))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let Some(model) = ModelConfig::named(&a.config) else {
        bail!(
            "unknown config {:?}: choose one of {}",
            a.config,
            CONFIG_NAMES.join(", ")
        );
    };
    let mut train = TrainConfig::nanogpt(a.inner_steps as usize);
    train.seed = a.seed;
    train.batch_size = a.batch as usize;
    train.lr = a.inner_lr;
    let spec = RunSpec {
        name: a.name.clone(),
        model,
        train,
        corpus_sha256: String::new(),
        inner_steps: a.inner_steps,
        updates_per_round: a.updates_per_round.max(1),
        max_staleness: a.max_staleness,
        outer_lr: a.outer_lr,
        outer_momentum: a.outer_momentum,
    };
    let tuning = Tuning {
        lease_ms: (a.lease_secs * 1000.0) as u64,
        round_timeout_ms: (a.round_timeout_secs * 1000.0) as u64,
        eval_iters: a.eval_iters,
        max_version: a.max_versions,
        max_update_norm: 1e4,
    };
    let coord = CoordConfig {
        inner_steps: a.inner_steps,
        batch_size: a.batch,
        context: model.block_size as u32,
        inner_lr: a.inner_lr,
        inner_lr_decay: a.inner_lr_decay_versions.map(|v| (v, a.inner_lr / 10.0)),
        seed: a.seed,
        updates_per_round: spec.updates_per_round,
        round_timeout_ms: tuning.round_timeout_ms,
        lease_ms: tuning.lease_ms,
        max_staleness: a.max_staleness,
        outer_lr: a.outer_lr,
        outer_momentum: a.outer_momentum,
        max_update_norm: tuning.max_update_norm,
        fragment: Fragment::ALL,
        max_version: tuning.max_version,
    };
    let corpus = read_corpus(a.data.as_deref())?;
    let relay = Relay::open(spec, coord, &tuning, corpus, &a.db, &a.checkpoints)?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    // The line tests and scripts wait for.
    println!("tessera-relay listening on http://{addr}/");
    eprintln!("open http://{addr}/ to join from a browser; /api/status for the run");

    tokio::spawn(relay.clone().evaluate_forever(tuning.eval_iters));
    let ticker = relay.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            every.tick().await;
            if let Err(e) = ticker.tick() {
                tracing::error!("tick: {e:#}");
            }
        }
    });
    if a.web_bundle.join("tessera_web_bg.wasm").is_file() {
        tracing::info!(
            "serving the browser participant from {}",
            a.web_bundle.display()
        );
    } else {
        tracing::warn!(
            "no browser bundle in {}: tabs cannot join until tools/build-web.sh has run",
            a.web_bundle.display()
        );
    }
    let _child = if a.demo {
        Some(spawn_demo_participant(&addr.to_string())?)
    } else {
        None
    };
    if a.demo {
        tokio::spawn(report_progress(relay.clone()));
    }
    server::serve(relay, listener, &a.web_bundle).await
}

fn spawn_demo_participant(addr: &str) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    let host = exe.with_file_name(format!("tessera-host{}", std::env::consts::EXE_SUFFIX));
    if !host.exists() {
        bail!(
            "--demo needs tessera-host next to tessera-relay ({}): cargo build --release -p tessera-host",
            host.display()
        );
    }
    let key = std::path::Path::new("relay-data").join("demo-host.key");
    let child = tokio::process::Command::new(host)
        .args([
            "join",
            &format!("ws://{addr}/ws"),
            "--backend",
            "cpu",
            "--key",
        ])
        .arg(key)
        .kill_on_drop(true)
        .spawn()
        .context("starting the demo participant")?;
    Ok(child)
}

async fn report_progress(relay: Arc<Relay>) {
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = serde_json::to_value(relay.status()).unwrap_or_default();
        let v = s["val_loss_history"]
            .as_array()
            .and_then(|h| h.last())
            .cloned();
        if v != last {
            if let Some(h) = &v {
                eprintln!(
                    "model version {}: validation loss {:.4}",
                    h[0],
                    h[1].as_f64().unwrap_or(f64::NAN)
                );
            }
            last = v;
        }
    }
}
