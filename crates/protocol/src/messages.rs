//! The messages. Every frame is one postcard-encoded enum; its size is checked against the
//! bound for its direction before any decoding happens.

use serde::{Deserialize, Serialize};
use tessera_core::config::{ModelConfig, TrainConfig};

use crate::Error;
use crate::identity::PublicKey;
use crate::ledger::Receipt;
use crate::update::{Codec, Fragment, Payload};

/// What kind of participant is talking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParticipantKind {
    /// A browser tab (WebGPU or WASM CPU).
    Browser,
    /// A native host.
    Native,
}

impl ParticipantKind {
    /// Lower-case name, as in `/api/status`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ParticipantKind::Browser => "browser",
            ParticipantKind::Native => "native",
        }
    }
}

/// The first message of a participant, answering the relay's challenge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the participant.
    pub protocol_version: u32,
    /// Its ed25519 public key.
    pub public_key: PublicKey,
    /// Signature of [`crate::identity::hello_message`] over the challenge nonce.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// Browser or native.
    pub kind: ParticipantKind,
    /// Backend it trains on (`cpu`, `wgpu`, `webgpu`, `wasm-cpu`…).
    pub backend: String,
    /// Free-form description of the device (adapter name).
    pub device: String,
    /// Rough capability: measured or estimated training tokens per second.
    pub tokens_per_s: f32,
}

/// A leased piece of work: train `inner_steps` AdamW steps from model `base_version` on the
/// batches of `shard`, and return the pseudo-gradient over `fragment`. Everything the result
/// depends on is named here ([`crate::work`] says how), so any participant can re-execute a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkUnit {
    /// Unit id (unique in the run).
    pub unit_id: u64,
    /// Model version to start from.
    pub base_version: u64,
    /// Data shard: batches are `(seed, shard, step)` for `step` in `0..inner_steps`.
    pub shard: u64,
    /// Inner steps H.
    pub inner_steps: u32,
    /// Sequences per batch.
    pub batch_size: u32,
    /// Peak inner learning rate.
    pub lr: f64,
    /// The learning rate ramps linearly to `lr` over this many first steps of the unit (every
    /// unit starts a fresh AdamW, whose first steps are sign-like and noisy).
    pub warmup_steps: u32,
    /// The run seed.
    pub seed: u64,
    /// The parameters this unit covers.
    pub fragment: Fragment,
    /// How the update must be encoded.
    pub codec: Codec,
    /// Unix milliseconds after which the lease may be given to someone else.
    pub deadline_ms: u64,
}

/// The changes from version `from` to version `to` (`/api/model/{to}/from/{from}`), for a
/// participant that holds `from`: each version's weights are the previous version's minus
/// the link's decoded values over the parameters from `offset` on, in f32, which rebuilds the
/// relay's weights bit for bit; `header` lays them out as the relay's file of `to`, whose
/// SHA-256 is `sha256` (the digest a submission signs, checked after rebuilding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelChange {
    /// The version held.
    pub from: u64,
    /// The version rebuilt.
    pub to: u64,
    /// One encoded change per version, `from + 1 ..= to`, each with the first parameter it
    /// covers.
    pub links: Vec<(u64, Payload)>,
    /// The safetensors header of `to`'s file (length prefix and JSON).
    #[serde(with = "serde_bytes")]
    pub header: Vec<u8>,
    /// SHA-256 of `to`'s file as the relay serves it.
    pub sha256: [u8; 32],
}

/// A finished work unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// The unit.
    pub unit_id: u64,
    /// The version it started from.
    pub base_version: u64,
    /// SHA-256 of the base weights' safetensors bytes, as served by the relay.
    pub base_sha256: [u8; 32],
    /// Pseudo-gradient: base weights minus weights after training.
    pub payload: Payload,
    /// Tokens trained on.
    pub tokens: u64,
    /// Mean training loss of the first inner step.
    pub loss_before: f32,
    /// Mean training loss of the last inner step.
    pub loss_after: f32,
    /// Signature of [`crate::identity::update_message`] over the unit, the base and the
    /// encoded payload.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why an update was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The base version is more than the allowed staleness behind.
    TooStale,
    /// No lease for this unit is held by this participant (expired or never given).
    UnknownLease,
    /// The payload does not decode, has the wrong length, or holds non-finite values.
    Malformed,
    /// The signature does not verify.
    BadSignature,
    /// The update's norm is implausibly large.
    OutOfBounds,
    /// The unit's base version was discarded by the relay's guard (not the participant's
    /// fault: its next unit starts from the restored model).
    RolledBack,
    /// The signed base digest is not that of the version the unit was leased at.
    BaseMismatch,
    /// The same update (or a near copy of another) was already submitted.
    Duplicate,
    /// The update's norm is far outside what honest updates of its size measure.
    Outlier,
    /// Applying the update does not do what training on the unit's batches does (the loss
    /// probe).
    FailedProbe,
    /// Re-training the unit gave a different update (the participant is banned).
    FailedReexecution,
    /// The participant is banned.
    Banned,
}

/// The run as a participant needs to know it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Run name.
    pub name: String,
    /// Model shape.
    pub model: ModelConfig,
    /// Inner-loop hyperparameters (learning rate and batch size are per unit).
    pub train: TrainConfig,
    /// Number of parameters (the flat vector's length).
    pub num_params: u64,
    /// SHA-256 (hex) of the corpus bytes, so participants can check they train on the same data.
    pub corpus_sha256: String,
}

/// Messages from a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Answer to the challenge.
    Hello(Hello),
    /// Ask for a work unit.
    RequestWork,
    /// Return a finished unit.
    Submit(Submission),
    /// Still alive, working on `unit_id` (if any), at `step` of it.
    Heartbeat {
        /// Unit in progress.
        unit_id: Option<u64>,
        /// Inner step reached.
        step: u32,
    },
    /// Leaving politely: release any lease now.
    Leave,
    /// A verifier asks for another participant's unit to re-execute (answered by
    /// [`ServerMsg::Verify`], or [`ServerMsg::NoWork`] when it is not trusted to verify or
    /// nothing waits: it then trains).
    RequestVerification,
    /// A verifier's re-execution of the unit it was given, signed with
    /// [`crate::identity::verification_message`].
    SubmitVerification(Submission),
}

/// Messages from the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// First message on a connection: sign this nonce in your hello.
    Challenge {
        /// Random nonce.
        nonce: [u8; 32],
        /// The relay's protocol version.
        protocol_version: u32,
    },
    /// Hello accepted.
    Welcome {
        /// Participant id (derived from the public key).
        participant_id: String,
        /// The run.
        run: RunInfo,
        /// Current model version.
        model_version: u64,
    },
    /// A leased work unit.
    Work(WorkUnit),
    /// No work right now; ask again after this many milliseconds.
    NoWork {
        /// Suggested wait.
        retry_ms: u64,
    },
    /// An update was accepted.
    Accepted {
        /// The unit.
        unit_id: u64,
        /// The model version now current.
        model_version: u64,
        /// The relay's signed receipt: it holds this update and will grant it once verified.
        receipt: Receipt,
    },
    /// An update was rejected.
    Rejected {
        /// The unit.
        unit_id: u64,
        /// Why.
        reason: RejectReason,
        /// Human-readable detail.
        detail: String,
    },
    /// A new model version exists.
    NewVersion {
        /// The version.
        model_version: u64,
    },
    /// Heartbeat acknowledged.
    HeartbeatAck,
    /// A protocol error; the relay closes the connection after sending it.
    Error {
        /// Human-readable reason.
        message: String,
    },
    // New variants go last: the wire keeps its numbering for older participants.
    /// Re-execute this unit of another participant exactly as leased (same base, batches and
    /// hyperparameters) and send the result with [`ClientMsg::SubmitVerification`].
    Verify(WorkUnit),
    /// A verification was received (what it showed is not said: a verifier cannot learn to
    /// agree without working).
    VerificationReceived {
        /// The unit.
        unit_id: u64,
    },
}

/// Encodes a message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("messages always serialize")
}

/// Decodes a message of at most `limit` bytes.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T, Error> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    postcard::from_bytes(bytes).map_err(|e| Error::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bounds_are_enforced() {
        let msg = ClientMsg::Submit(Submission {
            unit_id: 4,
            base_version: 2,
            base_sha256: [7; 32],
            payload: Payload::f32(&[0.5; 100]),
            tokens: 1234,
            loss_before: 3.0,
            loss_after: 2.5,
            signature: vec![1; 64],
        });
        let bytes = encode(&msg);
        assert!(bytes.len() < 600, "{}", bytes.len());
        assert_eq!(decode::<ClientMsg>(&bytes, 1 << 20).unwrap(), msg);
        let e = decode::<ClientMsg>(&bytes, 100).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(decode::<ClientMsg>(&[0xff, 0xff, 0xff], 100).is_err());
        assert!(decode::<ClientMsg>(&bytes[..bytes.len() - 10], 1 << 20).is_err());
    }
}
