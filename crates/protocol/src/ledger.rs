//! The contribution ledger, as anyone can check it: every granted contribution is a [`Leaf`] of
//! an append-only Merkle tree of the RFC 6962 shape; for every model version the relay signs a
//! [`Checkpoint`] (log size, root, stake-table root); a participant gets a signed [`Receipt`]
//! when its update is accepted and an inclusion proof once it is granted.
//!
//! Hashing is RFC 6962's: a leaf hash is `SHA-256(0x00 ‖ leaf bytes)`, a node
//! `SHA-256(0x01 ‖ left ‖ right)`, the empty tree `SHA-256("")`. Proofs are built here from the
//! leaf hashes (for any past tree size) and verified with the `ct-merkle` crate. Every signed or
//! hashed message is a fixed binary layout under its own domain tag (the `to_bytes` / `message`
//! functions say which), so a verifier in any language can recompute it from the JSON export.
//!
//! Credit formula 1: a granted unit earns one credit per verified token it trained on. A
//! participant's stake in a version is its share of the credit in that version's checkpoint.

use std::collections::BTreeMap;

use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::{self, PublicKey};

/// The credit formula this build grants with: credit = verified tokens.
pub const CREDIT_FORMULA: u32 = 1;

/// A 32-byte hash.
pub type Hash = [u8; 32];

/// Why a ledger does not verify.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LedgerError {
    /// A leaf is wrong in itself (signature, formula, run, duplicate unit).
    #[error("leaf {index} (unit {unit_id}): {reason}")]
    BadLeaf {
        /// Its position in the log.
        index: u64,
        /// Its unit.
        unit_id: u64,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint does not match the leaves, its signature or its predecessor.
    #[error("checkpoint of version {version}: {reason}")]
    BadCheckpoint {
        /// The version it was signed for.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// A receipt or a proof does not verify.
    #[error("{0}")]
    BadProof(String),
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

mod hexlist {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
                Ok(out)
            })
            .collect()
    }
}

mod hexvec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Appends a length-prefixed string.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One granted contribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    /// The run.
    pub run: String,
    /// The model version the update was folded into.
    pub version: u64,
    /// The participant's ed25519 public key.
    #[serde(with = "hex32")]
    pub participant: PublicKey,
    /// The unit.
    pub unit_id: u64,
    /// The version it trained from.
    pub base_version: u64,
    /// SHA-256 of the base weights it trained from, as it signed it.
    #[serde(with = "hex32")]
    pub base_sha256: Hash,
    /// SHA-256 of the update's payload bytes.
    #[serde(with = "hex32")]
    pub update_sha256: Hash,
    /// Tokens trained on (verified).
    pub tokens: u64,
    /// Credit granted.
    pub credit: u64,
    /// The credit formula it was granted under ([`CREDIT_FORMULA`]).
    pub formula: u32,
    /// The participant's signature of its update
    /// ([`identity::update_message_for_digest`]).
    #[serde(with = "hexvec")]
    pub signature: Vec<u8>,
}

impl Leaf {
    /// The bytes hashed into the tree: `"tessera-leaf-v1"`, then the run (u32 length + UTF-8),
    /// version, key, unit, base version, base SHA-256, update SHA-256, tokens, credit (u64 LE,
    /// keys and hashes raw), formula (u32 LE), signature (u32 length + bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"tessera-leaf-v1".to_vec();
        put_str(&mut out, &self.run);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.participant);
        out.extend_from_slice(&self.unit_id.to_le_bytes());
        out.extend_from_slice(&self.base_version.to_le_bytes());
        out.extend_from_slice(&self.base_sha256);
        out.extend_from_slice(&self.update_sha256);
        out.extend_from_slice(&self.tokens.to_le_bytes());
        out.extend_from_slice(&self.credit.to_le_bytes());
        out.extend_from_slice(&self.formula.to_le_bytes());
        out.extend_from_slice(&(self.signature.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Its RFC 6962 leaf hash.
    pub fn hash(&self) -> Hash {
        leaf_hash(&self.to_bytes())
    }

    /// The participant's id as the relay shows it.
    pub fn participant_id(&self) -> String {
        identity::short_id(&self.participant)
    }

    /// Checks the leaf in itself: the participant signed this update, the credit follows the
    /// formula.
    pub fn check(&self) -> Result<(), String> {
        if self.formula != CREDIT_FORMULA {
            return Err(format!(
                "credit formula {} is not known (this build knows {CREDIT_FORMULA})",
                self.formula
            ));
        }
        if self.credit != self.tokens {
            return Err(format!(
                "credit {} is not its {} verified tokens (formula 1)",
                self.credit, self.tokens
            ));
        }
        let msg = identity::update_message_for_digest(
            self.unit_id,
            self.base_version,
            &self.base_sha256,
            &self.update_sha256,
        );
        identity::verify(&self.participant, &msg, &self.signature).map_err(|e| {
            format!(
                "participant {}'s signature of this update does not verify ({e})",
                self.participant_id()
            )
        })
    }
}

/// RFC 6962 leaf hash of `bytes`.
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    Sha256::new_with_prefix([0u8])
        .chain_update(bytes)
        .finalize()
        .into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new_with_prefix([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn left_size(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The Merkle tree hash of these leaf hashes (RFC 6962 §2.1).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = left_size(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` in the tree of these leaves (RFC 6962 §2.1.1), leaf side first.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    assert!(index < leaves.len(), "leaf {index} of {}", leaves.len());
    let n = leaves.len();
    if n == 1 {
        return Vec::new();
    }
    let k = left_size(n);
    if index < k {
        let mut p = inclusion_proof(&leaves[..k], index);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(&leaves[k..], index - k);
        p.push(root(&leaves[..k]));
        p
    }
}

/// The proof that the tree of the first `old` leaves is a prefix of the tree of all of them
/// (RFC 6962 §2.1.2). Empty when `old` is 0 or all of them.
pub fn consistency_proof(leaves: &[Hash], old: usize) -> Vec<Hash> {
    assert!(old <= leaves.len(), "{old} > {}", leaves.len());
    if old == 0 || old == leaves.len() {
        return Vec::new();
    }
    fn sub(leaves: &[Hash], m: usize, complete: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![root(leaves)]
            };
        }
        let k = left_size(n);
        if m <= k {
            let mut p = sub(&leaves[..k], m, complete);
            p.push(root(&leaves[k..]));
            p
        } else {
            let mut p = sub(&leaves[k..], m - k, false);
            p.push(root(&leaves[..k]));
            p
        }
    }
    sub(leaves, old, true)
}

fn ct_root(root: &Hash, size: u64) -> RootHash<Sha256> {
    RootHash::new((*root).into(), size)
}

/// Checks that the leaf with these `bytes` is at `index` of the tree of `size` leaves whose root
/// is `root`.
pub fn verify_inclusion(
    bytes: &[u8],
    index: u64,
    size: u64,
    root: &Hash,
    proof: &[Hash],
) -> Result<(), LedgerError> {
    let proof = InclusionProof::<Sha256>::from_digests(proof.iter().map(|h| h.into()));
    ct_root(root, size)
        .verify_inclusion(&bytes, index, &proof)
        .map_err(|e| {
            LedgerError::BadProof(format!(
                "leaf {index} is not in the log of {size} leaves with root {}: {e}",
                hex::encode(root)
            ))
        })
}

/// Checks that the tree (`old_size`, `old_root`) is a prefix of (`new_size`, `new_root`).
pub fn verify_consistency(
    old_size: u64,
    old_root: &Hash,
    new_size: u64,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), LedgerError> {
    let fail = |why: String| {
        LedgerError::BadProof(format!(
            "the log of {old_size} leaves (root {}) is not a prefix of the log of {new_size} \
             leaves (root {}): {why}",
            hex::encode(old_root),
            hex::encode(new_root)
        ))
    };
    if old_size == new_size {
        return if old_root == new_root && proof.is_empty() {
            Ok(())
        } else {
            Err(fail("same size, different root".into()))
        };
    }
    if old_size == 0 {
        return Ok(());
    }
    let proof = ConsistencyProof::<Sha256>::from_digests(proof.iter().map(|h| h.into()));
    ct_root(new_root, new_size)
        .verify_consistency(&ct_root(old_root, old_size), &proof)
        .map_err(|e| fail(e.to_string()))
}

/// A leaf with its audit path in the log of `size` leaves (what `/api/ledger/proof/{unit}`
/// serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inclusion {
    /// Its position in the log.
    pub index: u64,
    /// The size of the log it is proven in.
    pub size: u64,
    /// The leaf.
    pub leaf: Leaf,
    /// The audit path, leaf side first.
    #[serde(with = "hexlist")]
    pub proof: Vec<Hash>,
}

impl Inclusion {
    /// Checks it against a signed checkpoint of the same size.
    pub fn verify(&self, c: &Checkpoint) -> Result<(), LedgerError> {
        if self.size != c.log_size {
            return Err(LedgerError::BadProof(format!(
                "unit {} was proven in a log of {} leaves, the checkpoint of version {} signs {}",
                self.leaf.unit_id, self.size, c.version, c.log_size
            )));
        }
        verify_inclusion(
            &self.leaf.to_bytes(),
            self.index,
            self.size,
            &c.log_root,
            &self.proof,
        )
    }
}

/// Credit by participant key.
pub type StakeTable = BTreeMap<PublicKey, u64>;

/// The stake table of these leaves.
pub fn stake_table(leaves: &[Leaf]) -> StakeTable {
    let mut t = StakeTable::new();
    for l in leaves {
        *t.entry(l.participant).or_default() += l.credit;
    }
    t
}

/// The root of a stake table: the RFC 6962 tree of its entries in key order, each
/// `"tessera-stake-v1" ‖ key ‖ credit (u64 LE)`.
pub fn stake_root(table: &StakeTable) -> Hash {
    let hashes: Vec<Hash> = table
        .iter()
        .map(|(k, c)| leaf_hash(&[b"tessera-stake-v1".as_slice(), k, &c.to_le_bytes()].concat()))
        .collect();
    root(&hashes)
}

/// Splits `total` (an integer amount) by the credit in `table`, with largest-remainder
/// rounding: every share is ⌊total × credit / Σcredit⌋, and the units left over go one each to
/// the largest fractional parts (ties to the smaller key). The shares sum to `total` exactly
/// (an empty table gets nothing: the result is empty).
pub fn split(total: u64, table: &StakeTable) -> BTreeMap<PublicKey, u64> {
    let sum: u128 = table.values().map(|&c| c as u128).sum();
    if sum == 0 {
        return BTreeMap::new();
    }
    let mut out = BTreeMap::new();
    let mut rems: Vec<(u128, PublicKey)> = Vec::with_capacity(table.len());
    let mut given = 0u64;
    for (k, &c) in table {
        let exact = total as u128 * c as u128;
        let share = (exact / sum) as u64;
        given += share;
        out.insert(*k, share);
        rems.push((exact % sum, *k));
    }
    // Largest remainder first; equal remainders in key order.
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, k) in rems.iter().take((total - given) as usize) {
        *out.get_mut(k).expect("every key has a share") += 1;
    }
    out
}

/// One version's part of a revenue statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRevenue {
    /// The model version that served the requests.
    pub version: u64,
    /// Its signed checkpoint's log size and roots (the stake table the revenue is split by).
    pub log_size: u64,
    /// Root of the log.
    #[serde(with = "hex32")]
    pub log_root: Hash,
    /// Root of the stake table.
    #[serde(with = "hex32")]
    pub stake_root: Hash,
    /// Tokens served (prompt + completion).
    pub tokens: u64,
    /// Revenue (micro-units): tokens × price per 1000 tokens / 1000, rounded down.
    pub revenue: u64,
    /// Its split, by participant key (hex): sums to `revenue` (nothing when no stake yet).
    pub shares: BTreeMap<String, u64>,
}

/// What usage earned over a period, split by each version's stake table, signed by the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// The run.
    pub run: String,
    /// The period: `[from_ms, to_ms)`, unix ms.
    pub from_ms: u64,
    /// End of the period.
    pub to_ms: u64,
    /// Price in micro-units per 1000 tokens.
    pub price_per_1k: u64,
    /// By version.
    pub versions: Vec<VersionRevenue>,
    /// Totals by participant key (hex).
    pub totals: BTreeMap<String, u64>,
    /// Revenue of versions with no stake yet (not owed to anyone).
    pub unallocated: u64,
    /// The whole period's revenue.
    pub revenue: u64,
    /// The relay's signature of [`Statement::message`].
    #[serde(with = "hexvec")]
    pub signature: Vec<u8>,
}

impl Statement {
    /// The signed bytes: `"tessera-statement-v1"` and the SHA-256 of the statement's JSON with
    /// an empty signature (serde's field order).
    pub fn message(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        let json = serde_json::to_vec(&unsigned).expect("statements serialize");
        [b"tessera-statement-v1".as_slice(), &Sha256::digest(json)].concat()
    }

    /// Signs it with the relay's `secret`.
    pub fn sign(&mut self, secret: &[u8; 32]) {
        self.signature = identity::sign(secret, &self.message()).to_vec();
    }

    /// Checks the relay's signature and that every split sums exactly.
    pub fn verify(&self, relay: &PublicKey) -> Result<(), LedgerError> {
        identity::verify(relay, &self.message(), &self.signature).map_err(|e| {
            LedgerError::BadProof(format!("the statement is not signed by this relay ({e})"))
        })?;
        let mut totals: BTreeMap<String, u64> = BTreeMap::new();
        let mut unallocated = 0;
        for v in &self.versions {
            let sum: u64 = v.shares.values().sum();
            if v.shares.is_empty() {
                unallocated += v.revenue;
            } else if sum != v.revenue {
                return Err(LedgerError::BadProof(format!(
                    "version {}: shares sum to {sum}, not its revenue {}",
                    v.version, v.revenue
                )));
            }
            for (k, a) in &v.shares {
                *totals.entry(k.clone()).or_default() += a;
            }
        }
        let revenue: u64 = self.versions.iter().map(|v| v.revenue).sum();
        if totals != self.totals || unallocated != self.unallocated || revenue != self.revenue {
            return Err(LedgerError::BadProof(
                "the statement's totals are not the sums of its versions".into(),
            ));
        }
        Ok(())
    }
}

/// What the relay signs for a model version: the log as it stood when the version was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The run.
    pub run: String,
    /// The model version.
    pub version: u64,
    /// Leaves in the log.
    pub log_size: u64,
    /// Root of the log.
    #[serde(with = "hex32")]
    pub log_root: Hash,
    /// Root of the stake table of those leaves ([`stake_root`]).
    #[serde(with = "hex32")]
    pub stake_root: Hash,
    /// Sum of their credit.
    pub total_credit: u64,
    /// The relay's signature of [`Checkpoint::message`].
    #[serde(with = "hexvec")]
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// A checkpoint of the log `leaves` for `version`, signed with the relay's `secret`.
    pub fn sign(run: &str, version: u64, leaves: &[Leaf], secret: &[u8; 32]) -> Checkpoint {
        let hashes: Vec<Hash> = leaves.iter().map(Leaf::hash).collect();
        let table = stake_table(leaves);
        Self::sign_parts(
            run,
            version,
            &hashes,
            &table,
            leaves.iter().map(|l| l.credit).sum(),
            secret,
        )
    }

    /// As [`Checkpoint::sign`], from the leaf hashes and the stake table.
    pub fn sign_parts(
        run: &str,
        version: u64,
        hashes: &[Hash],
        table: &StakeTable,
        total_credit: u64,
        secret: &[u8; 32],
    ) -> Checkpoint {
        let mut c = Checkpoint {
            run: run.to_string(),
            version,
            log_size: hashes.len() as u64,
            log_root: root(hashes),
            stake_root: stake_root(table),
            total_credit,
            signature: Vec::new(),
        };
        c.signature = identity::sign(secret, &c.message()).to_vec();
        c
    }

    /// The signed bytes: `"tessera-checkpoint-v1"`, the run (u32 length + UTF-8), version, log
    /// size (u64 LE), log root, stake root, total credit (u64 LE).
    pub fn message(&self) -> Vec<u8> {
        let mut out = b"tessera-checkpoint-v1".to_vec();
        put_str(&mut out, &self.run);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.log_size.to_le_bytes());
        out.extend_from_slice(&self.log_root);
        out.extend_from_slice(&self.stake_root);
        out.extend_from_slice(&self.total_credit.to_le_bytes());
        out
    }

    /// Checks the relay's signature.
    pub fn verify_signature(&self, relay: &PublicKey) -> Result<(), LedgerError> {
        identity::verify(relay, &self.message(), &self.signature).map_err(|e| {
            LedgerError::BadCheckpoint {
                version: self.version,
                reason: format!("the relay's signature does not verify ({e})"),
            }
        })
    }
}

/// What the relay signs when it accepts an update: it has it, it will count it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The run.
    pub run: String,
    /// The participant.
    #[serde(with = "hex32")]
    pub participant: PublicKey,
    /// The unit.
    pub unit_id: u64,
    /// The version it trained from.
    pub base_version: u64,
    /// SHA-256 of the update's payload bytes.
    #[serde(with = "hex32")]
    pub update_sha256: Hash,
    /// Tokens it claims (granted once verified).
    pub tokens: u64,
    /// When it was accepted (unix ms).
    pub accepted_ms: u64,
    /// The relay's signature of [`Receipt::message`].
    #[serde(with = "hexvec")]
    pub signature: Vec<u8>,
}

impl Receipt {
    /// A receipt signed with the relay's `secret`.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        run: &str,
        participant: PublicKey,
        unit_id: u64,
        base_version: u64,
        update_sha256: Hash,
        tokens: u64,
        accepted_ms: u64,
        secret: &[u8; 32],
    ) -> Receipt {
        let mut r = Receipt {
            run: run.to_string(),
            participant,
            unit_id,
            base_version,
            update_sha256,
            tokens,
            accepted_ms,
            signature: Vec::new(),
        };
        r.signature = identity::sign(secret, &r.message()).to_vec();
        r
    }

    /// The signed bytes: `"tessera-receipt-v1"`, the run (u32 length + UTF-8), key, unit, base
    /// version (u64 LE), update SHA-256, tokens, accepted ms (u64 LE).
    pub fn message(&self) -> Vec<u8> {
        let mut out = b"tessera-receipt-v1".to_vec();
        put_str(&mut out, &self.run);
        out.extend_from_slice(&self.participant);
        out.extend_from_slice(&self.unit_id.to_le_bytes());
        out.extend_from_slice(&self.base_version.to_le_bytes());
        out.extend_from_slice(&self.update_sha256);
        out.extend_from_slice(&self.tokens.to_le_bytes());
        out.extend_from_slice(&self.accepted_ms.to_le_bytes());
        out
    }

    /// Checks the relay's signature.
    pub fn verify_signature(&self, relay: &PublicKey) -> Result<(), LedgerError> {
        identity::verify(relay, &self.message(), &self.signature).map_err(|e| {
            LedgerError::BadProof(format!(
                "the receipt for unit {} is not signed by this relay ({e})",
                self.unit_id
            ))
        })
    }

    /// Checks that `leaf`, at `index` in the log, grants this receipt's update.
    pub fn check_leaf(&self, index: u64, leaf: &Leaf) -> Result<(), LedgerError> {
        if self.matches(leaf) {
            return Ok(());
        }
        Err(LedgerError::BadProof(format!(
            "the log grants unit {} differently from the receipt the relay signed for it \
             (update {}, {} tokens received; leaf {index}: update {}, {} tokens, key {})",
            self.unit_id,
            hex::encode(self.update_sha256),
            self.tokens,
            hex::encode(leaf.update_sha256),
            leaf.tokens,
            leaf.participant_id()
        )))
    }

    /// Whether `leaf` grants this receipt's update.
    pub fn matches(&self, leaf: &Leaf) -> bool {
        leaf.run == self.run
            && leaf.participant == self.participant
            && leaf.unit_id == self.unit_id
            && leaf.base_version == self.base_version
            && leaf.update_sha256 == self.update_sha256
            && leaf.tokens == self.tokens
    }

    /// Where this receipt stands against the relay's signed checkpoint `c`, given what the relay
    /// served as its inclusion proof in a log of `c.log_size` leaves (`None`: it said the unit
    /// is not in that log). Checks the receipt's and the checkpoint's signatures by `relay`, that
    /// the proven leaf is this receipt's update (same key, unit, base, digest, tokens), signed by
    /// the participant, and that the proof leads to the checkpoint's root.
    pub fn standing(
        &self,
        relay: &PublicKey,
        c: &Checkpoint,
        proof: Option<&Inclusion>,
    ) -> Result<Standing, LedgerError> {
        self.verify_signature(relay)?;
        c.verify_signature(relay)?;
        let Some(p) = proof else {
            return Ok(Standing::NotYet);
        };
        self.check_leaf(p.index, &p.leaf)?;
        p.leaf.check().map_err(|reason| LedgerError::BadLeaf {
            index: p.index,
            unit_id: p.leaf.unit_id,
            reason,
        })?;
        p.verify(c)?;
        Ok(Standing::Proven {
            index: p.index,
            credit: p.leaf.credit,
        })
    }
}

/// What a receipt's check against a signed checkpoint found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "standing", rename_all = "snake_case")]
pub enum Standing {
    /// Granted and proven in the signed log: leaf `index`, earning `credit`.
    Proven {
        /// Its position in the log.
        index: u64,
        /// The credit it earns.
        credit: u64,
    },
    /// Not in the signed log (yet): pending verification, granted after the checkpoint, or
    /// forfeited.
    NotYet,
}

/// Who signs a run's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerInfo {
    /// The run.
    pub run: String,
    /// The relay's ed25519 public key.
    #[serde(with = "hex32")]
    pub relay_key: PublicKey,
    /// The credit formula in force.
    pub formula: u32,
}

/// What a full check of a log found.
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    /// Leaves checked.
    pub leaves: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The stake table under the last checkpoint (empty without one).
    pub stake: StakeTable,
    /// Leaves appended after the last checkpoint (granted, not yet under a signed version).
    pub unsigned: u64,
}

/// Checks a whole log: every leaf in itself (signature, formula, run, unit ids unique), every
/// checkpoint's signature, that its root and stake root are those of the first `log_size`
/// leaves, and that versions rise and the log only grows. Recomputes every participant's stake.
///
/// `known` are checkpoints the caller verified before (kept from an earlier audit): a relay that
/// rewrites its history must re-sign every checkpoint after the change, and a known one then
/// differs from the log served now.
pub fn audit(
    info: &LedgerInfo,
    leaves: &[Leaf],
    checkpoints: &[Checkpoint],
    known: &[Checkpoint],
) -> Result<Audit, LedgerError> {
    let mut units = std::collections::BTreeSet::new();
    for (i, l) in leaves.iter().enumerate() {
        let bad = |reason: String| LedgerError::BadLeaf {
            index: i as u64,
            unit_id: l.unit_id,
            reason,
        };
        if l.run != info.run {
            return Err(bad(format!("it is of run {:?}, not {:?}", l.run, info.run)));
        }
        if !units.insert(l.unit_id) {
            return Err(bad(
                "this unit was already granted earlier in the log".into()
            ));
        }
        l.check().map_err(bad)?;
    }
    let hashes: Vec<Hash> = leaves.iter().map(Leaf::hash).collect();
    let mut prev: Option<&Checkpoint> = None;
    // Stake tables grow with the log: carry one forward instead of recounting from the start.
    let mut table = StakeTable::new();
    let mut counted = 0usize;
    let mut credit = 0u64;
    for c in checkpoints {
        let bad = |reason: String| LedgerError::BadCheckpoint {
            version: c.version,
            reason,
        };
        if c.run != info.run {
            return Err(bad(format!("it is of run {:?}, not {:?}", c.run, info.run)));
        }
        c.verify_signature(&info.relay_key)?;
        if let Some(p) = prev {
            if c.version <= p.version {
                return Err(bad(format!("it follows version {}", p.version)));
            }
            if c.log_size < p.log_size {
                return Err(bad(format!(
                    "the log shrank from {} leaves (version {}) to {}",
                    p.log_size, p.version, c.log_size
                )));
            }
        }
        let size = c.log_size as usize;
        if size > leaves.len() {
            return Err(bad(format!(
                "it signs {size} leaves, the log has {} (leaves were dropped)",
                leaves.len()
            )));
        }
        if root(&hashes[..size]) != c.log_root {
            return Err(bad(format!(
                "its log root is not that of the first {size} leaves: a leaf was dropped, \
                 reordered, altered or inserted, or the history rewritten"
            )));
        }
        if let Some(p) = prev {
            let proof = consistency_proof(&hashes[..size], p.log_size as usize);
            verify_consistency(p.log_size, &p.log_root, c.log_size, &c.log_root, &proof)?;
        }
        for l in &leaves[counted..size] {
            *table.entry(l.participant).or_default() += l.credit;
            credit += l.credit;
        }
        counted = size;
        if stake_root(&table) != c.stake_root || credit != c.total_credit {
            return Err(bad(format!(
                "its stake table is not the one its {size} leaves give (total credit {credit}, \
                 signed {})",
                c.total_credit
            )));
        }
        prev = Some(c);
    }
    for k in known {
        let bad = |reason: String| LedgerError::BadCheckpoint {
            version: k.version,
            reason,
        };
        k.verify_signature(&info.relay_key)?;
        let now = checkpoints.iter().find(|c| c.version == k.version);
        if now.is_some_and(|c| c != k) {
            return Err(bad(
                "the relay now serves a different checkpoint for this version than the one \
                 verified before: its history was rewritten"
                    .into(),
            ));
        }
        let size = k.log_size as usize;
        if size > leaves.len() || root(&hashes[..size]) != k.log_root {
            return Err(bad(format!(
                "the log served now is not an extension of the one verified before ({size} \
                 leaves, root {}): its history was rewritten",
                hex::encode(k.log_root)
            )));
        }
    }
    Ok(Audit {
        leaves: leaves.len() as u64,
        checkpoints: checkpoints.len() as u64,
        stake: table,
        unsigned: (leaves.len() - counted) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_merkle::mem_backed_tree::MemoryBackedTree;

    fn hashes(n: usize) -> Vec<Hash> {
        (0..n as u32).map(|i| leaf_hash(&i.to_le_bytes())).collect()
    }

    #[test]
    fn roots_and_proofs_agree_with_ct_merkle_for_every_size() {
        let mut tree = MemoryBackedTree::<Sha256, [u8; 4]>::new();
        let all = hashes(70);
        for n in 1..=all.len() {
            tree.push((n as u32 - 1).to_le_bytes());
            let r = root(&all[..n]);
            assert_eq!(tree.root().as_bytes().as_slice(), r.as_slice(), "size {n}");
            for i in 0..n {
                let p = inclusion_proof(&all[..n], i);
                let theirs = tree.prove_inclusion(i);
                let ours: Vec<u8> = p.concat();
                assert_eq!(theirs.as_bytes(), ours.as_slice(), "size {n} leaf {i}");
                verify_inclusion(&(i as u32).to_le_bytes(), i as u64, n as u64, &r, &p).unwrap();
            }
            for m in 1..=n {
                let p = consistency_proof(&all[..n], m);
                let theirs = tree.prove_consistency(n - m);
                assert_eq!(theirs.as_bytes(), p.concat().as_slice(), "{m} -> {n}");
                verify_consistency(m as u64, &root(&all[..m]), n as u64, &r, &p).unwrap();
            }
        }
    }

    #[test]
    fn wrong_proofs_fail() {
        let all = hashes(13);
        let r = root(&all);
        let p = inclusion_proof(&all, 5);
        // Another leaf, another index, another root, a truncated or altered path.
        assert!(verify_inclusion(&6u32.to_le_bytes(), 5, 13, &r, &p).is_err());
        assert!(verify_inclusion(&5u32.to_le_bytes(), 6, 13, &r, &p).is_err());
        assert!(verify_inclusion(&5u32.to_le_bytes(), 5, 13, &all[0], &p).is_err());
        assert!(verify_inclusion(&5u32.to_le_bytes(), 5, 13, &r, &p[1..]).is_err());
        let mut q = p.clone();
        q[1][0] ^= 1;
        assert!(verify_inclusion(&5u32.to_le_bytes(), 5, 13, &r, &q).is_err());
        // A prefix that is not one: the old tree with a leaf changed.
        let mut other = all.clone();
        other[2] = leaf_hash(b"x");
        let c = consistency_proof(&all, 7);
        verify_consistency(7, &root(&all[..7]), 13, &r, &c).unwrap();
        assert!(verify_consistency(7, &root(&other[..7]), 13, &r, &c).is_err());
        assert!(verify_consistency(7, &root(&all[..7]), 13, &root(&other), &c).is_err());
        assert!(verify_consistency(8, &root(&all[..8]), 13, &r, &c).is_err());
        assert!(verify_consistency(5, &root(&all[..5]), 5, &root(&other[..5]), &[]).is_err());
    }

    /// A pseudo-random walk over sizes and indices (a property test without the dependency:
    /// every size up to 70 is covered exhaustively above; this reaches larger, uneven trees).
    #[test]
    fn proofs_hold_on_large_uneven_trees() {
        let all = hashes(1500);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..200 {
            let n = 1 + next(all.len());
            let i = next(n);
            let m = 1 + next(n);
            let r = root(&all[..n]);
            let p = inclusion_proof(&all[..n], i);
            verify_inclusion(&(i as u32).to_le_bytes(), i as u64, n as u64, &r, &p).unwrap();
            let c = consistency_proof(&all[..n], m);
            verify_consistency(m as u64, &root(&all[..m]), n as u64, &r, &c).unwrap();
        }
    }

    pub(crate) fn signed_leaf(run: &str, secret: &[u8; 32], unit_id: u64, tokens: u64) -> Leaf {
        let update = [unit_id as u8; 32];
        let base = [3u8; 32];
        let msg = identity::update_message_for_digest(unit_id, 1, &base, &update);
        Leaf {
            run: run.into(),
            version: 2,
            participant: identity::public_key(secret),
            unit_id,
            base_version: 1,
            base_sha256: base,
            update_sha256: update,
            tokens,
            credit: tokens,
            formula: CREDIT_FORMULA,
            signature: identity::sign(secret, &msg).to_vec(),
        }
    }

    fn log() -> (LedgerInfo, Vec<Leaf>, Vec<Checkpoint>, [u8; 32]) {
        let relay = [9u8; 32];
        let info = LedgerInfo {
            run: "r".into(),
            relay_key: identity::public_key(&relay),
            formula: CREDIT_FORMULA,
        };
        let leaves: Vec<Leaf> = (0..9)
            .map(|u| signed_leaf("r", &[1 + (u % 3) as u8; 32], u, 100 + u))
            .collect();
        let checkpoints = [0usize, 2, 2, 5, 9]
            .iter()
            .enumerate()
            .map(|(v, &n)| Checkpoint::sign("r", v as u64 + 1, &leaves[..n], &relay))
            .collect();
        (info, leaves, checkpoints, relay)
    }

    #[test]
    fn a_receipt_stands_proven_pending_or_refuted() {
        let (info, leaves, checkpoints, relay) = log();
        let c = checkpoints.last().unwrap();
        let hashes: Vec<Hash> = leaves.iter().map(Leaf::hash).collect();
        let receipt_for = |l: &Leaf| {
            Receipt::sign(
                &l.run,
                l.participant,
                l.unit_id,
                l.base_version,
                l.update_sha256,
                l.tokens,
                7,
                &relay,
            )
        };
        let proof = |i: usize| Inclusion {
            index: i as u64,
            size: c.log_size,
            leaf: leaves[i].clone(),
            proof: inclusion_proof(&hashes, i),
        };
        let key = &info.relay_key;
        assert_eq!(
            receipt_for(&leaves[4]).standing(key, c, Some(&proof(4))),
            Ok(Standing::Proven {
                index: 4,
                credit: 104
            })
        );
        assert_eq!(
            receipt_for(&leaves[4]).standing(key, c, None),
            Ok(Standing::NotYet)
        );
        // Another unit's proof, a leaf granted with fewer tokens, a forged receipt, a proof
        // for a smaller log than the checkpoint signs, another relay's checkpoint: refuted.
        assert!(
            receipt_for(&leaves[4])
                .standing(key, c, Some(&proof(5)))
                .is_err()
        );
        let mut fewer = proof(4);
        fewer.leaf.tokens -= 1;
        assert!(
            receipt_for(&leaves[4])
                .standing(key, c, Some(&fewer))
                .is_err()
        );
        let mut forged = receipt_for(&leaves[4]);
        forged.tokens += 1;
        assert!(forged.standing(key, c, Some(&proof(4))).is_err());
        let mut short = proof(4);
        short.size -= 1;
        assert!(
            receipt_for(&leaves[4])
                .standing(key, c, Some(&short))
                .is_err()
        );
        let other = Checkpoint::sign("r", 9, &leaves, &[8u8; 32]);
        assert!(receipt_for(&leaves[4]).standing(key, &other, None).is_err());
    }

    #[test]
    fn splits_sum_exactly_and_follow_the_stake() {
        let mut x = 12345u64;
        for round in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 1 + (x >> 60) as usize;
            let table: StakeTable = (0..n)
                .map(|i| ([i as u8; 32], 1 + (x.rotate_left(i as u32 * 7) % 1_000_000)))
                .collect();
            let total = x % 10_000_019 + round;
            let s = split(total, &table);
            assert_eq!(s.values().sum::<u64>(), total);
            let credit: u64 = table.values().sum();
            for (k, c) in &table {
                let exact = total as f64 * *c as f64 / credit as f64;
                assert!((s[k] as f64 - exact).abs() < 1.0, "{} vs {exact}", s[k]);
            }
        }
        // Equal stakes, one unit left over: the smaller key gets it.
        let t: StakeTable = [([2; 32], 5), ([1; 32], 5)].into_iter().collect();
        assert_eq!(split(3, &t)[&[1; 32]], 2);
        assert!(split(10, &StakeTable::new()).is_empty());
    }

    #[test]
    fn a_statement_verifies_only_as_signed_and_summed() {
        let relay = [9u8; 32];
        let table: StakeTable = [([1; 32], 3), ([2; 32], 7)].into_iter().collect();
        let shares: BTreeMap<String, u64> = split(1001, &table)
            .into_iter()
            .map(|(k, a)| (hex::encode(k), a))
            .collect();
        let mut st = Statement {
            run: "r".into(),
            from_ms: 0,
            to_ms: 10,
            price_per_1k: 1000,
            versions: vec![VersionRevenue {
                version: 4,
                log_size: 2,
                log_root: [5; 32],
                stake_root: stake_root(&table),
                tokens: 1001,
                revenue: 1001,
                shares: shares.clone(),
            }],
            totals: shares,
            unallocated: 0,
            revenue: 1001,
            signature: Vec::new(),
        };
        st.sign(&relay);
        let key = identity::public_key(&relay);
        st.verify(&key).unwrap();
        assert_eq!(st.totals[&hex::encode([2u8; 32])], 701);
        assert!(st.verify(&identity::public_key(&[8; 32])).is_err());
        // Re-signed but not summing: caught by the sums, not only the signature.
        let mut bad = st.clone();
        *bad.versions[0].shares.values_mut().next().unwrap() += 1;
        bad.sign(&relay);
        assert!(bad.verify(&key).unwrap_err().to_string().contains("sum"));
        let mut bad = st.clone();
        bad.revenue += 1;
        assert!(bad.verify(&key).is_err());
    }

    #[test]
    fn an_honest_log_audits_and_its_stake_is_recomputed() {
        let (info, leaves, cps, _) = log();
        let a = audit(&info, &leaves, &cps, &[]).unwrap();
        assert_eq!((a.leaves, a.checkpoints, a.unsigned), (9, 5, 0));
        assert_eq!(a.stake.len(), 3);
        assert_eq!(a.stake.values().sum::<u64>(), (100..109).sum::<u64>());
        // Granted after the last version: counted as unsigned, not an error.
        let a = audit(&info, &leaves, &cps[..4], &[]).unwrap();
        assert_eq!(a.unsigned, 4);
    }

    #[test]
    fn a_tampered_log_fails_with_a_clear_message() {
        let (info, leaves, cps, relay) = log();
        let fails = |l: &[Leaf], c: &[Checkpoint]| audit(&info, l, c, &[]).unwrap_err().to_string();
        // A dropped leaf.
        let mut l = leaves.clone();
        l.remove(3);
        let e = fails(&l, &cps);
        assert!(e.contains("version 4") && e.contains("root"), "{e}");
        // Two leaves swapped.
        let mut l = leaves.clone();
        l.swap(6, 7);
        let e = fails(&l, &cps);
        assert!(e.contains("version 5") && e.contains("reordered"), "{e}");
        // A forged leaf: more tokens and credit for someone (its signature still verifies:
        // the participant signs its update, the relay the tree).
        let mut l = leaves.clone();
        l[4].tokens += 1000;
        l[4].credit += 1000;
        let e = fails(&l, &cps);
        assert!(e.contains("version 4") && e.contains("altered"), "{e}");
        // A leaf for a key that never signed it.
        let mut l = leaves.clone();
        l[1].participant = identity::public_key(&[77; 32]);
        let e = fails(&l, &cps);
        assert!(e.contains("leaf 1") && e.contains("signature"), "{e}");
        // Credit that is not the formula's.
        let mut l = leaves.clone();
        l[0].credit += 1;
        assert!(fails(&l, &cps).contains("formula"));
        // A unit granted twice.
        let mut l = leaves.clone();
        l.push(l[0].clone());
        assert!(fails(&l, &cps).contains("already granted"));
        // A checkpoint not signed by the relay, and one whose history was rewritten and
        // re-signed (its root differs from the leaves everyone holds).
        let mut c = cps.clone();
        c[2].signature[0] ^= 1;
        assert!(fails(&leaves, &c).contains("signature"));
        let mut rewritten = leaves.clone();
        rewritten[0].tokens = 1;
        rewritten[0].credit = 1;
        let mut c = cps.clone();
        c[4] = Checkpoint::sign("r", 5, &rewritten, &relay);
        assert!(fails(&leaves, &c).contains("version 5"));
        // The same, served consistently (leaves and every checkpoint rewritten and re-signed),
        // against a checkpoint verified before the rewrite.
        let c: Vec<Checkpoint> = [0usize, 2, 2, 5, 9]
            .iter()
            .enumerate()
            .map(|(v, &n)| Checkpoint::sign("r", v as u64 + 1, &rewritten[..n], &relay))
            .collect();
        let e = audit(&info, &rewritten, &c, &cps[3..4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 4") && e.contains("rewritten"), "{e}");
        // Versions out of order; a log that shrinks.
        let mut c = cps.clone();
        c.swap(3, 4);
        assert!(fails(&leaves, &c).contains("shrank") || fails(&leaves, &c).contains("follows"));
    }
}
