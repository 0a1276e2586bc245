//! Checkpoint files: versioned weights and optimizer safetensors plus a JSON sidecar,
//! each written atomically (temp file, fsync, rename, fsync of the directory). The sidecar is
//! renamed last, so it always names a complete checkpoint.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tessera_core::burn::prelude::Device;
use tessera_core::checkpoint::{self, CheckpointMeta, FORMAT_VERSION};
use tessera_core::model::Gpt;
use tessera_core::params;
use tessera_core::train::Trainer;

/// Name of the sidecar inside a checkpoint directory.
pub const SIDECAR: &str = "checkpoint.json";

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename,
/// fsync of the directory. Readers see the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// Saves `trainer` into `dir`.
pub fn save(dir: &Path, trainer: &Trainer, val_loss: Option<f32>) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let model = trainer.model();
    let specs = params::specs(model);
    let values = params::to_vec(model);
    let step = trainer.step;
    let weights_file = format!("model-{step:08}.safetensors");
    let optimizer_file = format!("optimizer-{step:08}.safetensors");
    let mut meta_map = std::collections::HashMap::new();
    meta_map.insert("format".into(), "pt".into());
    meta_map.insert(
        "tessera_config".into(),
        serde_json::to_string(&trainer.model_config)?,
    );
    write_atomic(
        &dir.join(&weights_file),
        &checkpoint::weights_to_safetensors(&specs, &values, meta_map)?,
    )?;
    write_atomic(
        &dir.join(&optimizer_file),
        &checkpoint::optimizer_to_safetensors(&specs, trainer.optimizer())?,
    )?;
    let meta = CheckpointMeta {
        format_version: FORMAT_VERSION,
        model: trainer.model_config,
        train: trainer.train_config.clone(),
        step,
        tokens_seen: trainer.tokens,
        weights_file: weights_file.clone(),
        optimizer_file: Some(optimizer_file.clone()),
        val_loss,
    };
    write_atomic(
        &dir.join(SIDECAR),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    // Older versions are no longer referenced by the sidecar.
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("model-") || name.starts_with("optimizer-");
        if ours && name.ends_with(".safetensors") && name != weights_file && name != optimizer_file
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Reads a checkpoint's sidecar.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(SIDECAR);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if meta.format_version != FORMAT_VERSION {
        bail!(
            "{} has format version {}, this build reads {FORMAT_VERSION}",
            path.display(),
            meta.format_version
        );
    }
    Ok(meta)
}

/// Loads a checkpoint into a trainer on `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Trainer> {
    let meta = read_meta(dir)?;
    let mut trainer = Trainer::new(meta.model, meta.train.clone(), device)?;
    let specs = params::specs(trainer.model());
    let bytes = fs::read(dir.join(&meta.weights_file))
        .with_context(|| format!("reading {}", meta.weights_file))?;
    let values = checkpoint::weights_from_safetensors(&specs, &bytes)
        .with_context(|| format!("loading {}", meta.weights_file))?;
    let model: Gpt = params::load_vec(trainer.into_model(), &values)?;
    let optim = match &meta.optimizer_file {
        Some(f) => {
            let bytes = fs::read(dir.join(f)).with_context(|| format!("reading {f}"))?;
            checkpoint::optimizer_from_safetensors(&specs, &bytes, &device.clone().inner())?
        }
        None => Default::default(),
    };
    trainer = Trainer::from_parts(
        model,
        optim,
        meta.model,
        meta.train,
        device.clone().autodiff(),
        meta.step,
        meta.tokens_seen,
    );
    Ok(trainer)
}
