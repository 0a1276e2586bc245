//! `tessera-relay`: serves a training run to browser and native participants.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tessera_coordinator::{Config as CoordConfig, FragmentSchedule, GuardConfig, ScreenConfig};
use tessera_core::config::{CONFIG_NAMES, ModelConfig, TrainConfig};
use tessera_protocol::update::Codec;
use tessera_relay::blobs::Blobs;
use tessera_relay::db::Db;
use tessera_relay::run::{Relay, RunSpec, Storage, Tuning};
use tessera_relay::server;

#[derive(Parser, Debug)]
#[command(
    name = "tessera-relay",
    version,
    about = "Tessera relay: hands out work and aggregates the shared model"
)]
struct Args {
    /// Something else than serving the run.
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: String,
    /// Corpus: a UTF-8 text file or a folder of them (default: the embedded corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model configuration: tiny, baby or small.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// SQLite database of the run (the embedded store; see --store).
    #[arg(long, default_value = "relay-data/relay.db")]
    db: PathBuf,
    /// Directory for model versions (with --blobs: this machine's cache of them).
    #[arg(long, default_value = "relay-data/checkpoints")]
    checkpoints: PathBuf,
    /// Keep the run in PostgreSQL instead of --db (`postgres://user:password@host:port/db`).
    /// Several relays may point at one database: one leads the run (an advisory lock and a
    /// fencing epoch), the others wait as standbys and take over when it stops beating
    /// (--lead-timeout-ms). Needs --key.
    #[arg(long)]
    store: Option<String>,
    /// Also write model versions to an S3-compatible object store (`s3://bucket/prefix`;
    /// credentials and `AWS_ENDPOINT_URL` from the environment), content-addressed, so a relay
    /// on another machine restores them.
    #[arg(long)]
    blobs: Option<String>,
    /// The relay's ledger signing key (created on first use; default: beside --db). Every
    /// relay of one run needs the same key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// With --store and --blobs: serve participants of the run without ever leading it (an
    /// edge relay). It checks their hellos, forwards their calls to the leader the store
    /// names, serves versions' weights from the object store, and passes other requests to the
    /// leader; participants may use any relay of the run. Needs the run's --key.
    #[arg(long)]
    edge: bool,
    /// With --store: the URL edge relays reach this relay at when it leads (default: http://
    /// and the address it listens on).
    #[arg(long)]
    advertise: Option<String>,
    /// With --store: a leader silent this long (milliseconds) is replaced by a standby.
    #[arg(long, default_value_t = 5000)]
    lead_timeout_ms: u64,
    /// Run name.
    #[arg(long, default_value = "default")]
    name: String,
    /// Price of the completions API (`/v1/completions`) in micro-units per 1000 tokens (prompt
    /// and completion bytes), which revenue statements split by stake.
    #[arg(long, default_value_t = 1000)]
    price_per_1k: u64,
    /// Inner steps H of the fastest participant's unit (slower participants get proportionally
    /// fewer, so that every unit takes about as long).
    #[arg(long, default_value_t = CoordConfig::new(0).inner_steps)]
    inner_steps: u32,
    /// The fewest inner steps a unit gets.
    #[arg(long, default_value_t = CoordConfig::new(0).min_inner_steps)]
    min_inner_steps: u32,
    /// Per-unit linear warmup of the inner learning rate, in steps (at most half a unit).
    #[arg(long, default_value_t = CoordConfig::new(0).warmup_steps)]
    unit_warmup: u32,
    /// Sequences per inner batch.
    #[arg(long, default_value_t = 12)]
    batch: u32,
    /// Inner AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    inner_lr: f64,
    /// Decay the inner learning rate (cosine, to a tenth) over this many tokens folded into
    /// the model.
    #[arg(long)]
    inner_lr_decay_tokens: Option<u64>,
    /// Warm the inner learning rate up linearly (from a twentieth) over this many tokens
    /// folded into the model, as the single-node baselines warm up over their first steps; the
    /// decay starts after it (0: none).
    #[arg(long, default_value_t = 0)]
    inner_lr_warmup_tokens: u64,
    /// Updates per round (K); 0: one per active participant.
    #[arg(long, default_value_t = 0)]
    updates_per_round: usize,
    /// Synchronous DiLoCo: a participant whose update is in the open round waits for it to
    /// close before its next unit.
    #[arg(long)]
    lockstep: bool,
    /// Otherwise it waits at most this fraction of its unit's duration for the round to close.
    #[arg(long, default_value_t = CoordConfig::new(0).grace)]
    grace: f64,
    /// Maximum staleness S of an accepted update, in versions.
    #[arg(long, default_value_t = 4)]
    max_staleness: u64,
    /// Outer (Nesterov) learning rate.
    #[arg(long, default_value_t = CoordConfig::new(0).outer_lr)]
    outer_lr: f32,
    /// Outer momentum.
    #[arg(long, default_value_t = CoordConfig::new(0).outer_momentum)]
    outer_momentum: f32,
    /// How participants encode their updates: `int8` (per-256 absmax scales, 3.9x fewer bytes
    /// than f32), `int4` (per-64 scales, 7.1x), `ternary` (-s, 0, +s: a mask bit a value,
    /// a sign bit a value sent, a per-1024 scale; ~22x, 1,042x fewer than DDP; +0.7% loss at
    /// H = 50), `sign` (one bit a value and a per-64 mean
    /// magnitude, 21x; +8% loss at H = 50), `f32`, or `sparse` / `sparseK` (the K largest
    /// of every 4096 values, 2 bits each, with the participant's error feedback; K = 64 by
    /// default, 108x fewer bytes than f32; needs --no-verify, see BENCHMARKS.md).
    #[arg(long, default_value_t = CoordConfig::new(0).codec, value_parser = parse_codec)]
    codec: Codec,
    /// Encode each version's change (the outer step) with this codec (`int8`, `int4`), apply
    /// the decoded change and carry what it leaves out into the next step; a participant
    /// holding an older version then fetches the encoded changes
    /// (`/api/model/{to}/from/{from}`) instead of the weights when they are smaller (int8: 27%
    /// of the weights' bytes, +0.7–1.0% validation loss in the simulator, BENCHMARKS.md).
    /// `off` (the default): exact f32 steps, whole weights.
    #[arg(long, default_value = "off", value_parser = parse_version_codec)]
    version_codec: VersionCodec,
    /// Split the model into this many fragments (groups of whole blocks, the first with the
    /// embeddings, the last with the final LayerNorm; 1 to the number of blocks): each unit
    /// then trains one fragment with the rest frozen and uploads that fragment only, and each
    /// fragment takes its own outer step (Streaming DiLoCo's shards; BENCHMARKS.md measures
    /// the loss and bytes). 1 (the default): every unit trains the whole model.
    #[arg(long, default_value_t = 1)]
    fragments: usize,
    /// Which fragment a unit trains: `spread` (the one with the fewest units at the current
    /// version, so every version steps every fragment) or `rotate` (fragment `version mod F`:
    /// a version changes one fragment, half the loss at equal tokens is lost; BENCHMARKS.md).
    #[arg(long, default_value = "spread", value_parser = parse_schedule)]
    fragment_schedule: FragmentSchedule,
    /// Seconds a lease lives without a heartbeat.
    #[arg(long, default_value_t = 15.0)]
    lease_secs: f64,
    /// Seconds after its first update at which a round closes anyway.
    #[arg(long, default_value_t = 60.0)]
    round_timeout_secs: f64,
    /// Stop handing out work at this model version.
    #[arg(long)]
    max_versions: Option<u64>,
    /// Stop handing out work once this many tokens are folded (or in flight).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Turn the guard off: versions are never rolled back (for experiments).
    #[arg(long)]
    no_guard: bool,
    /// The guard's relative margin over the best recent validation loss.
    #[arg(long, default_value_t = GuardConfig::default().tolerance)]
    guard_tolerance: f64,
    /// Turn verification off: no cheap checks, no loss probe, no re-execution, no clipping;
    /// credit is granted as updates are folded (the control of the attack suite).
    #[arg(long)]
    no_verify: bool,
    /// Fraction of units re-executed at random (besides every identity's first units).
    #[arg(long, default_value_t = ScreenConfig::default().reexecute_rate)]
    reexecute_rate: f64,
    /// Every identity's first units are re-executed: how many.
    #[arg(long, default_value_t = ScreenConfig::default().reexecute_first)]
    reexecute_first: u32,
    /// Fraction of a young identity's units re-executed at random (until `--trusted-after`).
    #[arg(long, default_value_t = ScreenConfig::default().reexecute_young_rate)]
    reexecute_young_rate: f64,
    /// Rounds after its fold at which a unit's credit is granted (its leaf appended to the
    /// contribution log); until then a ban can take it back out of the model.
    #[arg(long, default_value_t = ScreenConfig::default().grant_after_rounds)]
    grant_after_rounds: u64,
    /// Units of an identity found honest after which it is trusted: audited at
    /// `--reexecute-rate`, and allowed to verify others' units (`tessera-host join --verifier`).
    #[arg(long, default_value_t = ScreenConfig::default().trusted_after)]
    trusted_after: u64,
    /// MiB kept of folded updates whose credit is pending, so that a banned participant's can
    /// be taken back out of the model (beyond it, the oldest can no longer be).
    #[arg(long, default_value_t = ScreenConfig::default().revert_memory >> 20)]
    revert_memory_mb: usize,
    /// A participant id (as `tessera-host id` prints it) trusted to verify others' units from
    /// its first connection; repeat for several.
    #[arg(long = "trusted-verifier", value_name = "ID")]
    trusted_verifiers: Vec<String>,
    /// With a verifier connected, a unit to re-execute waits this long for it before the relay
    /// re-executes it itself.
    #[arg(long, default_value_t = CoordConfig::new(1).verifier_wait_ms)]
    verifier_wait_ms: u64,
    /// Fraction of verifiers' agreeing re-executions that the relay re-executes too.
    #[arg(long, default_value_t = ScreenConfig::default().verifier_recheck_rate)]
    verifier_recheck_rate: f64,
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

/// `--version-codec`: a codec, or `off`.
#[derive(Debug, Clone, Copy)]
struct VersionCodec(Option<Codec>);

fn parse_schedule(name: &str) -> Result<FragmentSchedule, String> {
    FragmentSchedule::parse(name).ok_or_else(|| format!("{name}: expected rotate or spread"))
}

fn parse_version_codec(name: &str) -> Result<VersionCodec, String> {
    match name {
        "off" => Ok(VersionCodec(None)),
        "f32" => Err("--version-codec f32 would be the weights' own size: use off".into()),
        other => parse_codec(other).map(|c| VersionCodec(Some(c))),
    }
}

fn parse_codec(name: &str) -> Result<Codec, String> {
    Codec::parse(name).map_err(|e| e.to_string())
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

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Create a key for the completions API (`Authorization: Bearer KEY`); prints it once (the
    /// relay keeps only its SHA-256), in the run of `--db` (or `--store`).
    ApiKey {
        /// A name for it (who holds it).
        #[arg(long)]
        name: String,
        /// Tokens (prompt + completion bytes) it may use.
        #[arg(long)]
        quota: u64,
    },
}

/// The store, the signing key, the checkpoints and the object store the arguments name. With
/// --store this waits until this relay leads the run.
fn open_storage(a: &Args) -> Result<Storage> {
    let blobs = a.blobs.as_deref().map(Blobs::open).transpose()?;
    let Some(url) = &a.store else {
        return Ok(Storage {
            db: Db::open(&a.db)?,
            db_name: a.db.display().to_string(),
            key: a.key.clone().unwrap_or_else(|| a.db.with_extension("key")),
            checkpoints: a.checkpoints.clone(),
            blobs,
        });
    };
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        bail!("--store {url:?}: expected postgres://user:password@host:port/database");
    }
    let Some(key) = a.key.clone() else {
        bail!("--store needs --key: every relay of a run signs its ledger with the same key");
    };
    if blobs.is_none() {
        tracing::warn!(
            "--store without --blobs: model versions stay on this machine ({}); a standby \
             elsewhere cannot take over",
            a.checkpoints.display()
        );
    }
    let holder = format!("{} (pid {})", a.listen, std::process::id());
    let db = Db::connect_postgres(
        url,
        &holder,
        Duration::from_millis(a.lead_timeout_ms),
        |leader| {
            // The line tests wait for.
            println!("tessera-relay standby: {leader} leads the run; waiting to take over");
        },
    )?;
    Ok(Storage {
        db,
        db_name: tessera_relay::db::redact(url),
        key,
        checkpoints: a.checkpoints.clone(),
        blobs,
    })
}

/// `tessera-relay api-key`.
fn create_api_key(mut db: Db, name: &str, quota: u64) -> Result<()> {
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = format!("tsk-{}", hex::encode(secret));
    let id = db.create_api_key(
        name,
        &tessera_relay::api::key_sha256(&key),
        quota,
        tessera_relay::now_ms(),
    )?;
    eprintln!("API key {id} ({name}, {quota} tokens); it is shown once:");
    println!("{key}");
    Ok(())
}

/// mimalloc keeps freed pages for the next allocation. With glibc's defaults every large tensor
/// of a training step was a fresh mapping whose pages faulted in one by one (a baby step at 2
/// threads: ~42-52 ms with glibc, ~35 ms with mimalloc; BENCHMARKS.md, "Speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if let Some(Command::ApiKey { name, quota }) = a.command.clone() {
        // PostgreSQL's synchronous client (its use and its drop) stays off the async runtime.
        let (store, path) = (a.store.clone(), a.db.clone());
        return tokio::task::spawn_blocking(move || {
            let db = match &store {
                Some(url) => Db::connect_postgres_reader(url)?,
                None => Db::open(&path)?,
            };
            create_api_key(db, &name, quota)
        })
        .await?;
    }
    if a.edge {
        return run_edge(&a).await;
    }
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
        inner_steps: a.inner_steps.max(1),
        min_inner_steps: a.min_inner_steps.max(1),
        unit_warmup: a.unit_warmup,
        updates_per_round: a.updates_per_round,
        lockstep: a.lockstep,
        max_staleness: a.max_staleness,
        outer_lr: a.outer_lr,
        outer_momentum: a.outer_momentum,
        fragments: a.fragments,
    };
    let tuning = Tuning {
        price_per_1k: a.price_per_1k,
        lease_ms: (a.lease_secs * 1000.0) as u64,
        round_timeout_ms: (a.round_timeout_secs * 1000.0) as u64,
        eval_iters: a.eval_iters,
        max_version: a.max_versions,
        max_update_norm: 1e4,
    };
    if let Some(why) = a.codec.unverifiable()
        && !a.no_verify
    {
        anyhow::bail!(
            "--codec {} needs --no-verify: {why}, so honest participants would fail their \
             audits. Use it with participants you trust, or --codec int8.",
            a.codec
        );
    }
    let coord = CoordConfig {
        inner_steps: spec.inner_steps,
        min_inner_steps: spec.min_inner_steps,
        warmup_steps: a.unit_warmup,
        batch_size: a.batch,
        inner_lr: a.inner_lr,
        inner_lr_decay: a.inner_lr_decay_tokens.map(|t| (t, a.inner_lr / 10.0)),
        inner_lr_warmup_tokens: a.inner_lr_warmup_tokens,
        seed: a.seed,
        updates_per_round: a.updates_per_round,
        lockstep: a.lockstep,
        grace: a.grace,
        round_timeout_ms: tuning.round_timeout_ms,
        lease_ms: tuning.lease_ms,
        max_staleness: a.max_staleness,
        outer_lr: a.outer_lr,
        outer_momentum: a.outer_momentum,
        max_update_norm: tuning.max_update_norm,
        codec: a.codec,
        version_codec: a.version_codec.0,
        fragment_schedule: a.fragment_schedule,
        max_version: tuning.max_version,
        max_tokens: a.max_tokens,
        guard: GuardConfig {
            enabled: !a.no_guard,
            tolerance: a.guard_tolerance,
            ..GuardConfig::default()
        },
        screen: ScreenConfig {
            enabled: !a.no_verify,
            reexecute_rate: a.reexecute_rate.clamp(0.0, 1.0),
            reexecute_first: a.reexecute_first,
            reexecute_young_rate: a.reexecute_young_rate.clamp(0.0, 1.0),
            trusted_after: a.trusted_after,
            verifier_recheck_rate: a.verifier_recheck_rate.clamp(0.0, 1.0),
            revert_memory: a.revert_memory_mb << 20,
            grant_after_rounds: a.grant_after_rounds.max(1),
            ..ScreenConfig::default()
        },
        trusted_verifiers: a.trusted_verifiers.iter().cloned().collect(),
        verifier_wait_ms: a.verifier_wait_ms,
        ..CoordConfig::new(model.block_size as u32)
    };
    let corpus = read_corpus(a.data.as_deref())?;
    let storage = open_storage(&a)?;
    let leading = storage.db.epoch().is_some();
    let relay = Relay::open(spec, coord, &tuning, corpus, storage)?;
    if leading {
        // The lead is proven by every write; when the relay is idle, by a beat each second.
        // A relay that cannot prove it (another relay took over, the store is gone) stops
        // before it serves anything stale.
        let beater = relay.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                if let Err(e) = beater.beat() {
                    tracing::error!("no longer the run's leader: {e:#}; stopping");
                    std::process::exit(3);
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    if leading {
        let address = a
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        relay.advertise(&address)?;
    }
    // The line tests and scripts wait for.
    println!("tessera-relay listening on http://{addr}/");
    eprintln!("open http://{addr}/ to join from a browser; /api/status for the run");

    tokio::spawn(relay.clone().evaluate_forever(tuning.eval_iters));
    relay.start_verifier()?;
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
    let mut child = if a.demo {
        let dir = a.db.parent().unwrap_or(std::path::Path::new("."));
        Some(spawn_demo_participant(&addr.to_string(), dir)?)
    } else {
        None
    };
    if a.demo {
        tokio::spawn(report_progress(relay.clone()));
    }
    // Ctrl-C or SIGTERM stop the relay and the participant it started (SIGTERM reaches only
    // this process: without this the demo's participant would outlive it).
    let result = tokio::select! {
        r = server::serve(server::router(relay, &a.web_bundle), listener) => r,
        s = shutdown_signal() => {
            eprintln!("{s}: stopping");
            Ok(())
        }
    };
    if let Some(c) = &mut child {
        c.kill().await.ok();
    }
    result
}

/// `tessera-relay --edge`: serves participants of a run that another relay leads.
async fn run_edge(a: &Args) -> Result<()> {
    let Some(url) = &a.store else {
        bail!("--edge needs --store postgres://…: an edge serves a run that another relay leads");
    };
    let Some(blobs) = &a.blobs else {
        bail!("--edge needs --blobs s3://…: it serves model versions from the object store");
    };
    let Some(key) = &a.key else {
        bail!("--edge needs --key: the run's signing key, which the leader checks edges by");
    };
    if !key.is_file() {
        bail!(
            "--key {}: no such file (an edge uses the run's key; it never creates one)",
            key.display()
        );
    }
    let secret = tessera_relay::ledger::load_or_create_key(key)?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let edge =
        tessera_relay::edge::Edge::open(url, Blobs::open(blobs)?, secret, &a.checkpoints).await?;
    tokio::spawn(edge.clone().poll_forever());
    // The line tests and scripts wait for.
    println!(
        "tessera-relay listening on http://{addr}/ (edge of run {:?})",
        edge.run_info().name
    );
    tokio::select! {
        r = server::serve(tessera_relay::edge::router(edge, &a.web_bundle), listener) => r,
        s = shutdown_signal() => {
            eprintln!("{s}: stopping");
            Ok(())
        }
    }
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM; names the one that came.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => "terminated",
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.ok();
        "interrupted"
    }
}

/// Starts a native participant of the demo; its key lives in `dir` (beside the database).
fn spawn_demo_participant(addr: &str, dir: &std::path::Path) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    let host = exe.with_file_name(format!("tessera-host{}", std::env::consts::EXE_SUFFIX));
    if !host.exists() {
        bail!(
            "--demo needs tessera-host next to tessera-relay ({}): cargo build --release -p tessera-host",
            host.display()
        );
    }
    let key = dir.join("demo-host.key");
    let mut cmd = tokio::process::Command::new(host);
    cmd.args([
        "join",
        &format!("ws://{addr}/ws"),
        "--backend",
        "cpu",
        // However the relay ends (SIGKILL included), its demo participant ends with it.
        "--exit-with-parent",
        "--key",
    ])
    .arg(key)
    .kill_on_drop(true);
    let child = cmd.spawn().context("starting the demo participant")?;
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
