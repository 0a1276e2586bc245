//! Participant identities: ed25519 keys. A participant proves it holds its key by signing the
//! relay's hello challenge, and signs every update it submits, so the ledger of contributions
//! is attributable.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::Error;

/// A participant's public key (32 bytes).
pub type PublicKey = [u8; 32];

/// The message signed in a hello: a domain tag and the relay's nonce.
pub fn hello_message(nonce: &[u8; 32]) -> Vec<u8> {
    [b"tessera-hello-v1".as_slice(), nonce].concat()
}

/// The message signed with an update: a domain tag, the unit, the base version, the SHA-256 of
/// the base weights the participant trained from (the bytes `/api/model/{version}` served), and
/// the SHA-256 of the encoded payload.
pub fn update_message(
    unit_id: u64,
    base_version: u64,
    base_sha256: &[u8; 32],
    payload_bytes: &[u8],
) -> Vec<u8> {
    update_message_for_digest(
        unit_id,
        base_version,
        base_sha256,
        &Sha256::digest(payload_bytes).into(),
    )
}

/// [`update_message`] from the payload's SHA-256 (what the ledger keeps of an update).
pub fn update_message_for_digest(
    unit_id: u64,
    base_version: u64,
    base_sha256: &[u8; 32],
    payload_sha256: &[u8; 32],
) -> Vec<u8> {
    tagged(
        b"tessera-update-v2",
        unit_id,
        base_version,
        base_sha256,
        payload_sha256,
    )
}

/// The message a verifier signs with its re-execution of another participant's unit: as
/// [`update_message`] under another domain tag, so that neither signature passes for the other.
pub fn verification_message(
    unit_id: u64,
    base_version: u64,
    base_sha256: &[u8; 32],
    payload_bytes: &[u8],
) -> Vec<u8> {
    tagged(
        b"tessera-verification-v1",
        unit_id,
        base_version,
        base_sha256,
        &Sha256::digest(payload_bytes).into(),
    )
}

fn tagged(
    tag: &[u8],
    unit_id: u64,
    base_version: u64,
    base_sha256: &[u8; 32],
    payload_sha256: &[u8; 32],
) -> Vec<u8> {
    [
        tag,
        &unit_id.to_le_bytes(),
        &base_version.to_le_bytes(),
        base_sha256.as_slice(),
        payload_sha256.as_slice(),
    ]
    .concat()
}

/// Signs `message` with a 32-byte ed25519 secret key.
pub fn sign(secret: &[u8; 32], message: &[u8]) -> [u8; 64] {
    SigningKey::from_bytes(secret).sign(message).to_bytes()
}

/// The public key of a secret key.
pub fn public_key(secret: &[u8; 32]) -> PublicKey {
    SigningKey::from_bytes(secret).verifying_key().to_bytes()
}

/// Checks `signature` over `message` by `key`.
pub fn verify(key: &PublicKey, message: &[u8], signature: &[u8]) -> Result<(), Error> {
    let key = VerifyingKey::from_bytes(key).map_err(|e| Error::BadSignature(e.to_string()))?;
    let sig = Signature::from_slice(signature).map_err(|e| Error::BadSignature(e.to_string()))?;
    key.verify(message, &sig)
        .map_err(|e| Error::BadSignature(e.to_string()))
}

/// A short, stable, printable id for a public key (first 8 bytes as hex).
pub fn short_id(key: &PublicKey) -> String {
    key[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let secret = [7u8; 32];
        let key = public_key(&secret);
        let msg = update_message(3, 9, &[1; 32], b"payload");
        let sig = sign(&secret, &msg);
        verify(&key, &msg, &sig).unwrap();
        assert!(verify(&key, &update_message(3, 9, &[1; 32], b"payloaD"), &sig).is_err());
        assert!(verify(&key, &update_message(3, 9, &[2; 32], b"payload"), &sig).is_err());
        assert!(verify(&public_key(&[8u8; 32]), &msg, &sig).is_err());
        assert!(verify(&key, &msg, &sig[..10]).is_err());
        // A verification is not an update, nor the other way round.
        assert!(
            verify(
                &key,
                &verification_message(3, 9, &[1; 32], b"payload"),
                &sig
            )
            .is_err()
        );
        assert_eq!(short_id(&key).len(), 16);
    }
}
