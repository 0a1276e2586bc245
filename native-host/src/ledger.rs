//! `tessera-host ledger`: check a relay's contribution ledger without trusting the relay.
//!
//! `verify` reads the ledger (from a relay, or from a folder `export` wrote), audits all of it
//! ([`tessera_protocol::ledger::audit`]: every leaf's signature, every checkpoint's signature and
//! root, the log only growing, every stake recomputed), checks this key's receipts against the
//! leaves (and, from a relay, their inclusion proofs against the latest checkpoint), and checks
//! that the checkpoint it verified last time is still part of the history served now. It then
//! remembers the newest checkpoint for the next run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tessera_protocol::identity;
use tessera_protocol::ledger::{self, Checkpoint, Inclusion, Leaf, LedgerInfo, Receipt};

use crate::join::{default_key_path, receipts_path, relay_urls};

/// `tessera-host ledger …`
#[derive(Args)]
pub struct LedgerArgs {
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check the ledger, this key's receipts and every participant's stake.
    Verify(VerifyArgs),
    /// Print a revenue statement of the relay's completions API, checked against its ledger.
    Statement(StatementArgs),
    /// Save a relay's ledger into a folder (ledger.json, checkpoints.jsonl, leaves.jsonl).
    Export(ExportArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// The relay (its page's address, or its WebSocket URL).
    #[arg(long, conflicts_with = "dir", required_unless_present = "dir")]
    relay: Option<String>,
    /// A folder written by `tessera-host ledger export`.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// This participant's key file (its receipts and remembered checkpoint are kept beside it).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Receipts to check instead of this key's (JSON lines, e.g. a browser tab's, saved with
    /// the page's "download"): every one of this run, whichever key it names.
    #[arg(long)]
    receipts: Option<PathBuf>,
}

#[derive(Args)]
struct StatementArgs {
    /// The relay.
    #[arg(long)]
    relay: String,
    /// Start of the period (unix ms; the run's start by default).
    #[arg(long)]
    from_ms: Option<u64>,
    /// End of the period (unix ms, excluded; now by default).
    #[arg(long)]
    to_ms: Option<u64>,
}

#[derive(Args)]
struct ExportArgs {
    /// The relay.
    #[arg(long)]
    relay: String,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
}

/// The three files of an export, in the order they are fetched: checkpoints before leaves, so
/// that a log growing meanwhile still holds every leaf a fetched checkpoint signs.
const FILES: [&str; 3] = ["ledger.json", "checkpoints.jsonl", "leaves.jsonl"];

/// Runs `tessera-host ledger`.
pub fn run(args: LedgerArgs) -> Result<()> {
    match args.command {
        LedgerCommand::Verify(a) => verify(a),
        LedgerCommand::Statement(a) => statement(a),
        LedgerCommand::Export(a) => {
            let (_, http) = relay_urls(&a.relay)?;
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            for f in FILES {
                std::fs::write(a.out.join(f), get(&format!("{http}/api/ledger/{f}"))?)
                    .with_context(|| format!("writing {}", a.out.join(f).display()))?;
            }
            println!("ledger of {http} written to {}", a.out.display());
            Ok(())
        }
    }
}

fn get(url: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let resp = reqwest::get(url)
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {text}");
        }
        Ok(text)
    })
}

fn lines<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{what}, line {}", i + 1)))
        .collect()
}

/// A ledger as served or exported.
struct Export {
    info: LedgerInfo,
    leaves: Vec<Leaf>,
    checkpoints: Vec<Checkpoint>,
}

fn load(source: &Source) -> Result<Export> {
    let read = |f: &str| -> Result<String> {
        match source {
            Source::Relay(http) => get(&format!("{http}/api/ledger/{f}")),
            Source::Dir(d) => std::fs::read_to_string(d.join(f))
                .with_context(|| format!("reading {}", d.join(f).display())),
        }
    };
    let info = serde_json::from_str(&read(FILES[0])?).context("ledger.json")?;
    let checkpoints = lines(&read(FILES[1])?, "checkpoints.jsonl")?;
    let leaves = lines(&read(FILES[2])?, "leaves.jsonl")?;
    Ok(Export {
        info,
        leaves,
        checkpoints,
    })
}

enum Source {
    Relay(String),
    Dir(PathBuf),
}

/// What this key remembers of a run's ledger between checks.
#[derive(serde::Serialize, serde::Deserialize)]
struct Remembered {
    info: LedgerInfo,
    checkpoint: Checkpoint,
}

fn remembered_path(key: &Path) -> PathBuf {
    key.with_extension("ledger.jsonl")
}

fn verify(a: VerifyArgs) -> Result<()> {
    let source = match (&a.relay, &a.dir) {
        (Some(r), _) => Source::Relay(relay_urls(r)?.1),
        (None, Some(d)) => Source::Dir(d.clone()),
        (None, None) => bail!("say --relay URL or --dir FOLDER"),
    };
    let key_path = a.key.unwrap_or_else(default_key_path);
    let me = std::fs::read_to_string(&key_path)
        .ok()
        .and_then(|t| hex::decode(t.trim()).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(|s| identity::public_key(&s));
    let e = load(&source)?;
    let run = e.info.run.clone();

    // What this key verified before, for this run.
    let remembered: Vec<Remembered> = match std::fs::read_to_string(remembered_path(&key_path)) {
        Ok(t) => lines(&t, "remembered checkpoints")?,
        Err(_) => Vec::new(),
    };
    let mut known = Vec::new();
    for r in remembered.iter().filter(|r| r.info.run == run) {
        if r.info.relay_key != e.info.relay_key {
            bail!(
                "run {run:?} is now signed by relay key {}, not by {} as when it was verified \
                 before",
                hex::encode(e.info.relay_key),
                hex::encode(r.info.relay_key)
            );
        }
        known.push(r.checkpoint.clone());
    }
    let audit = ledger::audit(&e.info, &e.leaves, &e.checkpoints, &known)?;
    let latest = e.checkpoints.last();
    println!(
        "ledger of run {run:?}, relay key {}: {} leaves, {} signed checkpoints (latest: version \
         {}, {} leaves, {} credit), {} leaves granted since; every signature, root and stake \
         checked{}",
        hex::encode(e.info.relay_key),
        audit.leaves,
        audit.checkpoints,
        latest.map_or(0, |c| c.version),
        latest.map_or(0, |c| c.log_size),
        latest.map_or(0, |c| c.total_credit),
        audit.unsigned,
        if known.is_empty() {
            String::new()
        } else {
            format!(
                "; consistent with the checkpoint of version {} verified before",
                known.last().map_or(0, |c| c.version)
            )
        }
    );

    // This key's receipts.
    let whose = match (&a.receipts, me) {
        (Some(file), _) => Some((file.clone(), None)),
        (None, Some(me)) => Some((receipts_path(&key_path), Some(me))),
        (None, None) => None,
    };
    if let Some((file, only)) = whose {
        let receipts: Vec<Receipt> = match std::fs::read_to_string(&file) {
            Ok(t) => lines(&t, "receipts")?,
            Err(_) if only.is_some() => Vec::new(),
            Err(e) => bail!("reading {}: {e}", file.display()),
        };
        let mine: Vec<&Receipt> = receipts
            .iter()
            .filter(|r| r.run == run && only.is_none_or(|me| r.participant == me))
            .collect();
        let (mut granted, mut proven, mut pending) = (0u64, 0u64, 0u64);
        for r in &mine {
            r.verify_signature(&e.info.relay_key)?;
            let Some((index, leaf)) = e
                .leaves
                .iter()
                .enumerate()
                .find(|(_, l)| l.unit_id == r.unit_id)
            else {
                pending += 1;
                continue;
            };
            r.check_leaf(index as u64, leaf)?;
            granted += 1;
            if let (Source::Relay(http), Some(c)) = (&source, latest)
                && (index as u64) < c.log_size
            {
                inclusion(http, r.unit_id, leaf, c)?;
                proven += 1;
            }
        }
        println!(
            "{}: {} receipts for this run, {granted} granted (each matches its leaf{}), \
             {pending} not granted yet (pending, or forfeited)",
            match only {
                Some(me) => format!("participant {}", identity::short_id(&me)),
                None => file.display().to_string(),
            },
            mine.len(),
            if matches!(source, Source::Relay(_)) {
                format!("; {proven} inclusion proofs checked against the latest checkpoint")
            } else {
                String::new()
            }
        );
    }

    // Every participant's stake, recomputed.
    let total: u64 = audit.stake.values().sum();
    println!("stake under the latest checkpoint ({total} credit):");
    let mut rows: Vec<_> = audit.stake.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    for (k, c) in rows {
        println!(
            "  {}  {c:>12}  {:6.2}%{}",
            identity::short_id(k),
            100.0 * *c as f64 / total.max(1) as f64,
            if Some(*k) == me { "  (you)" } else { "" }
        );
    }

    // Remember the newest checkpoint, so that a rewrite of this history is caught next time.
    if let Some(c) = latest {
        let mut keep: Vec<Remembered> = remembered
            .into_iter()
            .filter(|r| r.info.run != run)
            .collect();
        keep.push(Remembered {
            info: e.info.clone(),
            checkpoint: c.clone(),
        });
        let text: String = keep
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::store::write_atomic(&remembered_path(&key_path), text.as_bytes())?;
    }
    println!("ledger verified");
    Ok(())
}

/// Fetches unit `unit_id`'s inclusion proof in the log of checkpoint `c` and checks it, for
/// the leaf this verifier holds.
fn inclusion(http: &str, unit_id: u64, leaf: &Leaf, c: &Checkpoint) -> Result<()> {
    let p: Inclusion = serde_json::from_str(&get(&format!(
        "{http}/api/ledger/proof/{unit_id}?size={}",
        c.log_size
    ))?)?;
    if &p.leaf != leaf {
        bail!("the relay proved another leaf for unit {unit_id} than the one in its log");
    }
    p.verify(c)?;
    Ok(())
}

/// Fetches a revenue statement and checks it: the relay's signature, every split summing
/// exactly, and each version's split against the stake table its signed checkpoint commits to
/// (recomputed from the audited log).
fn statement(a: StatementArgs) -> Result<()> {
    let (_, http) = relay_urls(&a.relay)?;
    let mut query = Vec::new();
    if let Some(f) = a.from_ms {
        query.push(format!("from_ms={f}"));
    }
    if let Some(t) = a.to_ms {
        query.push(format!("to_ms={t}"));
    }
    let st: ledger::Statement =
        serde_json::from_str(&get(&format!("{http}/api/revenue?{}", query.join("&")))?)
            .context("the statement")?;
    let e = load(&Source::Relay(http.clone()))?;
    if st.run != e.info.run {
        bail!(
            "the statement is of run {:?}, the ledger of {:?}",
            st.run,
            e.info.run
        );
    }
    st.verify(&e.info.relay_key)?;
    ledger::audit(&e.info, &e.leaves, &e.checkpoints, &[])?;
    for v in &st.versions {
        if v.log_size == 0 && v.shares.is_empty() {
            continue;
        }
        let c = e
            .checkpoints
            .iter()
            .find(|c| c.version == v.version)
            .with_context(|| format!("no signed checkpoint for version {}", v.version))?;
        if (c.log_size, c.log_root, c.stake_root) != (v.log_size, v.log_root, v.stake_root) {
            bail!(
                "version {}: the statement's stake is not the one its signed checkpoint commits to",
                v.version
            );
        }
        let expected: std::collections::BTreeMap<String, u64> = ledger::split(
            v.revenue,
            &ledger::stake_table(&e.leaves[..c.log_size as usize]),
        )
        .into_iter()
        .map(|(k, a)| (hex::encode(k), a))
        .collect();
        if expected != v.shares {
            bail!(
                "version {}: the revenue is not split by its stake table (largest remainder)",
                v.version
            );
        }
    }
    println!(
        "revenue statement of run {:?}, {} to {} ms, {} micro-units per 1000 tokens: {} \
         versions served, revenue {} ({} unallocated: versions with no stake yet); signature, \
         sums and every split checked against the ledger",
        st.run,
        st.from_ms,
        st.to_ms,
        st.price_per_1k,
        st.versions.len(),
        st.revenue,
        st.unallocated
    );
    let mut rows: Vec<_> = st.totals.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    for (k, amount) in rows {
        println!("  {}  {amount:>12}", &k[..16]);
    }
    Ok(())
}
