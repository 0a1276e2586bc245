//! Model versions on disk: `model-v<version>.safetensors` (weights, nanoGPT names, loadable by
//! PyTorch; the ledger checkpoint signed for the version in its `__metadata__`),
//! `model-v<version>.json` (the manifest: weights file, their SHA-256 and that checkpoint) and
//! `momentum-v<version>.safetensors` (the outer optimizer's buffer) and, when the run encodes
//! its version changes, `change-v<version>.bin` (the encoded step that made it), each written
//! atomically. Old versions are pruned, keeping the newest `keep` and the one the guard would
//! roll back to.
//!
//! With an object store ([`crate::blobs`], `--blobs s3://…`) every version is also written there
//! before it is recorded (weights and momentum first, the manifest naming their keys last; the
//! version's row then holds the manifest's key), so a relay on another machine
//! ([`Checkpoints::restore`]) serves the same bytes and resumes from them.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tessera_core::checkpoint::{weights_from_safetensors, weights_to_safetensors};
use tessera_core::params::ParamSpec;
use tessera_protocol::ledger::Checkpoint;
use tessera_protocol::update::Payload;
use tessera_protocol::work;

use crate::blobs::Blobs;

/// The checkpoint directory.
pub struct Checkpoints {
    dir: PathBuf,
    specs: Vec<ParamSpec>,
    keep: u64,
    blobs: Option<Blobs>,
}

/// A manifest in the object store: where a version's weights and momentum are.
#[derive(serde::Serialize, serde::Deserialize)]
struct BlobManifest {
    version: u64,
    weights: String,
    momentum: String,
    ledger: Checkpoint,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    atomicwrites::AtomicFile::new(path, atomicwrites::AllowOverwrite)
        .write(|f| f.write_all(bytes))
        .with_context(|| format!("writing {}", path.display()))
}

impl Checkpoints {
    /// Opens (creating) `dir` for a model with parameters `specs`.
    /// With `blobs`, versions are also written to (and restored from) that object store.
    pub fn open(
        dir: &Path,
        specs: Vec<ParamSpec>,
        keep: u64,
        blobs: Option<Blobs>,
    ) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Checkpoints {
            dir: dir.to_path_buf(),
            specs,
            keep: keep.max(1),
            blobs,
        })
    }

    /// File name of a version's weights.
    pub fn weights_name(version: u64) -> String {
        format!("model-v{version:08}.safetensors")
    }

    /// File name of a version's manifest.
    pub fn manifest_name(version: u64) -> String {
        format!("model-v{version:08}.json")
    }

    fn momentum_name(version: u64) -> String {
        format!("momentum-v{version:08}.safetensors")
    }

    /// Path of a version's weights.
    pub fn weights_path(&self, version: u64) -> PathBuf {
        self.dir.join(Self::weights_name(version))
    }

    /// Encodes weights as safetensors bytes (what `/api/model/{version}` serves), with the
    /// ledger checkpoint signed for the version (`tessera_ledger`, JSON) in the metadata.
    pub fn encode(
        &self,
        version: u64,
        params: &[f32],
        ledger: Option<&Checkpoint>,
    ) -> Result<Vec<u8>> {
        let mut meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("tessera_version".to_string(), version.to_string()),
        ]);
        if let Some(c) = ledger {
            meta.insert("tessera_ledger".into(), serde_json::to_string(c)?);
        }
        Ok(weights_to_safetensors(&self.specs, params, meta)?)
    }

    /// Writes a version (weights, momentum, manifest) durably; returns the weights' bytes and
    /// where the version is stored, for its row: the weights' file name, or with an object
    /// store the key of its manifest there. Older versions are pruned except `pinned`.
    pub fn save(
        &self,
        version: u64,
        params: &[f32],
        momentum: &[f32],
        pinned: Option<u64>,
        ledger: &Checkpoint,
    ) -> Result<(Vec<u8>, String)> {
        let bytes = self.encode(version, params, Some(ledger))?;
        let momentum = self.encode(version, momentum, None)?;
        let stored = match &self.blobs {
            Some(b) => {
                let manifest = BlobManifest {
                    version,
                    weights: b.put(&bytes)?,
                    momentum: b.put(&momentum)?,
                    ledger: ledger.clone(),
                };
                b.put(serde_json::to_string_pretty(&manifest)?.as_bytes())?
            }
            None => Self::weights_name(version),
        };
        self.write_local(version, &bytes, &momentum, ledger)?;
        self.prune(version, pinned);
        Ok((bytes, stored))
    }

    /// Makes sure `version` is on local disk as `stored` names it: with an object store and
    /// `stored` the key of its manifest there, the local files are kept only if their SHA-256
    /// are the manifest's (a relay that lost the lead may have written its own, never recorded,
    /// version of that number); otherwise they are fetched (and checked against their keys).
    pub fn restore(&self, version: u64, stored: &str) -> Result<()> {
        let momentum_path = self.dir.join(Self::momentum_name(version));
        let local = self.weights_path(version).exists() && momentum_path.exists();
        let Some(b) = &self.blobs else {
            return Ok(());
        };
        if !stored.starts_with("sha256/") {
            if local {
                return Ok(());
            }
            anyhow::bail!(
                "version {version} is stored as {stored:?}, a local file this machine lacks"
            );
        }
        let manifest = Self::manifest(b, version, stored)?;
        let holds = |path: &Path, key: &str| {
            fs::read(path).is_ok_and(|bytes| Blobs::key(&work::sha256(&bytes)) == key)
        };
        if holds(&self.weights_path(version), &manifest.weights)
            && holds(&momentum_path, &manifest.momentum)
        {
            return Ok(());
        }
        let (bytes, momentum) = (b.get(&manifest.weights)?, b.get(&manifest.momentum)?);
        self.write_local(version, &bytes, &momentum, &manifest.ledger)
    }

    /// The manifest of `version` stored under `stored`, checked to be that version's.
    fn manifest(b: &Blobs, version: u64, stored: &str) -> Result<BlobManifest> {
        let manifest: BlobManifest = serde_json::from_slice(&b.get(stored)?)
            .with_context(|| format!("the manifest of version {version} ({stored})"))?;
        if manifest.version != version {
            anyhow::bail!(
                "{stored} is the manifest of version {}, not {version}",
                manifest.version
            );
        }
        Ok(manifest)
    }

    fn write_local(
        &self,
        version: u64,
        bytes: &[u8],
        momentum: &[u8],
        ledger: &Checkpoint,
    ) -> Result<()> {
        write_atomic(&self.dir.join(Self::momentum_name(version)), momentum)?;
        write_atomic(&self.weights_path(version), bytes)?;
        let manifest = serde_json::json!({
            "version": version,
            "weights": Self::weights_name(version),
            "weights_sha256": hex::encode(work::sha256(bytes)),
            "ledger": ledger,
        });
        write_atomic(
            &self.dir.join(Self::manifest_name(version)),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )
    }

    /// Reads a version's weights and momentum.
    pub fn load(&self, version: u64) -> Result<(Vec<f32>, Vec<f32>)> {
        let read = |name: String| -> Result<Vec<f32>> {
            let path = self.dir.join(&name);
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            weights_from_safetensors(&self.specs, &bytes)
                .with_context(|| format!("decoding {}", path.display()))
        };
        Ok((
            read(Self::weights_name(version))?,
            read(Self::momentum_name(version))?,
        ))
    }

    fn change_name(version: u64) -> String {
        format!("change-v{version:08}.bin")
    }

    /// Writes the encoded change that made `version` (postcard: the first parameter it covers
    /// and the payload), pruned with the version.
    pub fn save_change(&self, version: u64, offset: u64, payload: &Payload) -> Result<()> {
        let bytes = tessera_protocol::encode(&(offset, payload));
        write_atomic(&self.dir.join(Self::change_name(version)), &bytes)
    }

    /// Forgets the change of `version` (a version made without one).
    pub fn remove_change(&self, version: u64) {
        fs::remove_file(self.dir.join(Self::change_name(version))).ok();
    }

    /// The encoded change that made `version`, if one was written and is still on disk.
    pub fn read_change(&self, version: u64) -> Option<(u64, Payload)> {
        let bytes = fs::read(self.dir.join(Self::change_name(version))).ok()?;
        tessera_protocol::decode(&bytes, usize::MAX).ok()
    }

    /// The weights of `version` as the object store holds them under the manifest `stored`
    /// (an edge relay's copy: weights only), kept in this folder; older copies beyond `keep`
    /// are pruned.
    pub fn fetch_weights(&self, version: u64, stored: &str) -> Result<Vec<u8>> {
        if let Some(bytes) = self.read_weights(version) {
            return Ok(bytes);
        }
        let Some(b) = &self.blobs else {
            anyhow::bail!("version {version} is not on this machine and there is no object store");
        };
        let manifest = Self::manifest(b, version, stored)?;
        // `get` checks the bytes against their content address.
        let bytes = b.get(&manifest.weights)?;
        write_atomic(&self.weights_path(version), &bytes)?;
        self.prune(version, None);
        Ok(bytes)
    }

    /// Puts `bytes` into the object store, content-addressed, and returns their key; `None`
    /// without an object store.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Option<String>> {
        self.blobs.as_ref().map(|b| b.put(bytes)).transpose()
    }

    /// The bytes under `key` in the object store (checked against it).
    fn get_blob(&self, key: &str) -> Result<Vec<u8>> {
        match &self.blobs {
            Some(b) => b.get(key),
            None => anyhow::bail!("{key} is in an object store and this relay has none (--blobs)"),
        }
    }

    /// An update's stored f32 bytes: those under `key` in the object store when its row
    /// names one, else the row's own (`inline`).
    pub fn stored_payload(&self, key: Option<&str>, inline: Vec<u8>) -> Result<Vec<u8>> {
        key.map_or(Ok(inline), |k| self.get_blob(k))
    }

    /// Reads the raw weights file of a version, if it is still on disk.
    pub fn read_weights(&self, version: u64) -> Option<Vec<u8>> {
        fs::read(self.weights_path(version)).ok()
    }

    fn prune(&self, newest: u64, pinned: Option<u64>) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name
                .strip_suffix(".safetensors")
                .or_else(|| name.strip_suffix(".json"))
                .or_else(|| name.strip_suffix(".bin"))
                .and_then(|s| s.rsplit_once("-v"))
                .and_then(|(_, v)| v.parse::<u64>().ok());
            if let Some(v) = version
                && v + self.keep <= newest
                && Some(v) != pinned
            {
                fs::remove_file(e.path()).ok();
            }
        }
    }
}
