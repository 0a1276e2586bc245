//! `tessera-host export --hf DIR`: the model as a Hugging Face `GPT2LMHeadModel` folder, from a
//! relay's version (with the ledger checkpoint signed for it and the stake table under it) or
//! from a local checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_core::burn::prelude::Device;
use tessera_core::checkpoint::{safetensors_metadata, weights_from_safetensors};
use tessera_core::config::ModelConfig;
use tessera_core::model::Gpt;
use tessera_core::{hf, params, tokenizer, train};
use tessera_protocol::identity;
use tessera_protocol::ledger::{self, Checkpoint, Leaf, LedgerInfo};
use tessera_protocol::messages::RunInfo;

use crate::join::relay_urls;
use crate::store::{self, write_atomic};

/// `tessera-host export`.
#[derive(Args)]
pub struct ExportArgs {
    /// Write a Hugging Face `GPT2LMHeadModel` folder here.
    #[arg(long)]
    hf: PathBuf,
    /// Export a relay's model (its page's address).
    #[arg(
        long,
        conflicts_with = "checkpoint",
        required_unless_present = "checkpoint"
    )]
    relay: Option<String>,
    /// The relay's version to export (the latest by default).
    #[arg(long, requires = "relay")]
    version: Option<u64>,
    /// Export a local checkpoint directory (`tessera-host train --out`).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
}

/// The text whose logits the folder carries (`tessera_logits.json`), so that anyone can check
/// that the exported model computes what Tessera's does.
const CHECK_TEXT: &str = "ROMEO:\nBut soft, what light through yonder window breaks?";

/// What the model card says about where the weights come from.
struct Provenance {
    source: String,
    version: Option<u64>,
    val_loss: Option<f32>,
    ledger: Option<(Checkpoint, LedgerInfo, Vec<Leaf>)>,
}

/// Runs `tessera-host export`.
pub fn run(a: ExportArgs) -> Result<()> {
    let device = Device::flex();
    let (model, values, prov) = match (&a.relay, &a.checkpoint) {
        (Some(r), _) => from_relay(r, a.version)?,
        (None, Some(dir)) => {
            let trainer = store::load(dir, &device)?;
            let meta = store::read_meta(dir)?;
            (
                meta.model,
                params::to_vec(trainer.model()),
                Provenance {
                    source: format!("local checkpoint {} (step {})", dir.display(), meta.step),
                    version: None,
                    val_loss: meta.val_loss,
                    ledger: None,
                },
            )
        }
        (None, None) => bail!("say --relay URL or --checkpoint DIR"),
    };
    write_folder(&a.hf, &model, &values, &prov, &device)?;
    println!("{} written ({})", a.hf.display(), prov.source);
    Ok(())
}

fn from_relay(relay: &str, version: Option<u64>) -> Result<(ModelConfig, Vec<f32>, Provenance)> {
    let (_, http) = relay_urls(relay)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetch = |path: String| -> Result<Vec<u8>> {
        rt.block_on(async {
            let url = format!("{http}{path}");
            let r = reqwest::get(&url)
                .await
                .with_context(|| format!("GET {url}"))?;
            let status = r.status();
            let body = r.bytes().await?.to_vec();
            if !status.is_success() {
                bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok(body)
        })
    };
    let run: RunInfo = serde_json::from_slice(&fetch("/api/run".into())?).context("/api/run")?;
    let status: serde_json::Value = serde_json::from_slice(&fetch("/api/status".into())?)?;
    let version = match version {
        Some(v) => v,
        None => status["model_version"]
            .as_u64()
            .context("/api/status has no model_version")?,
    };
    let bytes = fetch(format!("/api/model/{version}"))?;
    let specs = params::specs(&Gpt::new(&run.model, &Device::flex()));
    let values = weights_from_safetensors(&specs, &bytes)?;
    let val_loss = status["val_loss_history"].as_array().and_then(|h| {
        h.iter()
            .find(|e| e[0].as_u64() == Some(version))
            .and_then(|e| e[1].as_f64())
            .map(|l| l as f32)
    });
    // The checkpoint signed for this version, checked against the relay's key and the log.
    let ledger = match safetensors_metadata(&bytes)?.get("tessera_ledger") {
        Some(text) => {
            let c: Checkpoint = serde_json::from_str(text).context("the weights' ledger")?;
            let info: LedgerInfo =
                serde_json::from_slice(&fetch("/api/ledger/ledger.json".into())?)?;
            c.verify_signature(&info.relay_key)?;
            let leaves: Vec<Leaf> = String::from_utf8(fetch(format!(
                "/api/ledger/leaves.jsonl?end={}",
                c.log_size
            ))?)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
            ledger::audit(&info, &leaves, std::slice::from_ref(&c), &[])?;
            Some((c, info, leaves))
        }
        None => None,
    };
    Ok((
        run.model,
        values,
        Provenance {
            source: format!("run {:?} at {http}, version {version}", run.name),
            version: Some(version),
            val_loss,
            ledger,
        },
    ))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

fn write_folder(
    dir: &Path,
    model: &ModelConfig,
    values: &[f32],
    prov: &Provenance,
    device: &Device,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let gpt = params::load_vec(Gpt::new(model, device), values)?;
    let specs = params::specs(&gpt);
    let mut meta = HashMap::new();
    if let Some(v) = prov.version {
        meta.insert("tessera_version".into(), v.to_string());
    }
    if let Some((c, _, _)) = &prov.ledger {
        meta.insert("tessera_ledger".into(), serde_json::to_string(c)?);
    }
    write_atomic(
        &dir.join("model.safetensors"),
        &hf::gpt2_safetensors(&specs, values, meta)?,
    )?;
    write_json(&dir.join("config.json"), &hf::gpt2_config(model))?;
    write_json(&dir.join("tokenizer.json"), &hf::byte_tokenizer())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &hf::tokenizer_config(model),
    )?;
    let mut tokens = tokenizer::encode(CHECK_TEXT);
    tokens.truncate(model.block_size);
    let logits = train::logits(&gpt, &tokens, device);
    write_json(
        &dir.join("tessera_logits.json"),
        &serde_json::json!({
            "text": CHECK_TEXT,
            "tokens": tokens,
            "vocab_size": model.vocab_size,
            "logits": logits,
        }),
    )?;
    write_atomic(&dir.join("README.md"), card(model, prov).as_bytes())?;
    // A folder to publish: readable by all (the atomic writes create files 0600).
    #[cfg(unix)]
    for f in std::fs::read_dir(dir)?.flatten() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// The model card.
fn card(m: &ModelConfig, p: &Provenance) -> String {
    let mut s = format!(
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- tessera\n- gpt2\n---\n\n\
         # Tessera model\n\nTrained with Tessera; exported from {}.\n\n\
         - architecture: GPT-2 (`GPT2LMHeadModel`), {} layers, {} heads, width {}, context {}, \
         exact-erf GELU\n- tokenizer: bytes (256 ids, id = byte value)\n- validation loss: {}\n",
        p.source,
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.block_size,
        p.val_loss
            .map_or("not measured".to_string(), |l| format!("{l:.4}")),
    );
    s.push_str(
        "\n```python\nfrom transformers import AutoTokenizer, GPT2LMHeadModel\n\
         model = GPT2LMHeadModel.from_pretrained(\"DIR\")\ntok = AutoTokenizer.from_pretrained(\"DIR\")\n```\n\n\
         `tessera_logits.json` holds Tessera's own logits for a fixed text, to check a load against.\n",
    );
    if let Some((c, info, leaves)) = &p.ledger {
        let table = ledger::stake_table(&leaves[..c.log_size as usize]);
        let total: u64 = table.values().sum();
        s.push_str(&format!(
            "\n## Ownership\n\nThe relay (key `{}`) signed this ledger checkpoint for version {}: \
             {} granted units, log root `{}`, stake root `{}`, {} credit (credit formula {}: one \
             credit per verified token). The same checkpoint is in `model.safetensors`' metadata \
             (`tessera_ledger`). Check it and every stake with `tessera-host ledger verify`.\n\n\
             | participant | credit | stake |\n|---|---|---|\n",
            hex::encode(info.relay_key),
            c.version,
            c.log_size,
            hex::encode(c.log_root),
            hex::encode(c.stake_root),
            c.total_credit,
            info.formula,
        ));
        let mut rows: Vec<_> = table.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1));
        for (k, credit) in rows {
            s.push_str(&format!(
                "| `{}` | {credit} | {:.2}% |\n",
                identity::short_id(k),
                100.0 * *credit as f64 / total.max(1) as f64
            ));
        }
    }
    s
}
