//! The relay's side of the contribution ledger ([`tessera_protocol::ledger`]): its signing key,
//! and the log in memory (leaf hashes and the stake table) that it signs a checkpoint of with
//! every model version. The leaves and checkpoints themselves live in SQLite ([`crate::db`]),
//! appended in the transaction that grants the credit or records the version.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use tessera_protocol::identity::{self, PublicKey};
use tessera_protocol::ledger::{
    CREDIT_FORMULA, Checkpoint, Hash, Leaf, LedgerInfo, Receipt, StakeTable, Statement,
    consistency_proof, inclusion_proof,
};

/// Loads the relay's ed25519 key from `path`, creating it (mode 0600, written atomically) on
/// first use. Losing it does not lose the log, but checkpoints after it are signed by another key.
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
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    atomicwrites::AtomicFile::new(path, atomicwrites::DisallowOverwrite)
        .write(|f| {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(hex::encode(secret).as_bytes())
        })
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

/// The log as the relay holds it in memory.
pub struct Log {
    secret: [u8; 32],
    /// Who signs, for what run.
    pub info: LedgerInfo,
    hashes: Vec<Hash>,
    table: StakeTable,
    credit: u64,
    /// The newest checkpoint signed: version and log size.
    signed: Option<(u64, u64)>,
}

impl Log {
    /// The log of run `run` holding `leaves`, signed with `secret`.
    pub fn new(run: &str, secret: [u8; 32], leaves: &[Leaf]) -> Log {
        let mut log = Log {
            secret,
            info: LedgerInfo {
                run: run.to_string(),
                relay_key: identity::public_key(&secret),
                formula: CREDIT_FORMULA,
            },
            hashes: Vec::new(),
            table: StakeTable::new(),
            credit: 0,
            signed: None,
        };
        log.append(leaves);
        log
    }

    /// Leaves just granted (already committed).
    pub fn append(&mut self, leaves: &[Leaf]) {
        for l in leaves {
            self.hashes.push(l.hash());
            *self.table.entry(l.participant).or_default() += l.credit;
            self.credit += l.credit;
        }
    }

    /// Leaves in the log.
    pub fn size(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Total credit granted.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// Credit by participant key.
    pub fn stake(&self) -> &StakeTable {
        &self.table
    }

    /// The newest checkpoint signed: version and log size.
    pub fn signed(&self) -> Option<(u64, u64)> {
        self.signed
    }

    /// Records the newest checkpoint signed (on start-up, from the database).
    pub fn set_signed(&mut self, version: u64, size: u64) {
        self.signed = Some((version, size));
    }

    /// The signed checkpoint of the log as it stands, for `version`.
    pub fn checkpoint(&mut self, version: u64) -> Checkpoint {
        self.signed = Some((version, self.size()));
        Checkpoint::sign_parts(
            &self.info.run,
            version,
            &self.hashes,
            &self.table,
            self.credit,
            &self.secret,
        )
    }

    /// Signs a revenue statement.
    pub fn sign_statement(&self, st: &mut Statement) {
        st.sign(&self.secret);
    }

    /// A receipt for an accepted update.
    pub fn receipt(
        &self,
        participant: PublicKey,
        unit_id: u64,
        base_version: u64,
        update_sha256: Hash,
        tokens: u64,
        accepted_ms: u64,
    ) -> Receipt {
        Receipt::sign(
            &self.info.run,
            participant,
            unit_id,
            base_version,
            update_sha256,
            tokens,
            accepted_ms,
            &self.secret,
        )
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        (index < size && size <= self.size())
            .then(|| inclusion_proof(&self.hashes[..size as usize], index as usize))
    }

    /// The proof that the first `old` leaves are a prefix of the first `new`.
    pub fn consistency(&self, old: u64, new: u64) -> Option<Vec<Hash>> {
        (old <= new && new <= self.size())
            .then(|| consistency_proof(&self.hashes[..new as usize], old as usize))
    }
}
