//! # tessera-protocol
//!
//! What crosses the wire between the relay and its participants, and nothing else:
//!
//! - [`messages`]: the versioned messages (`ClientMsg` from participants, `ServerMsg` from the
//!   relay), sent as WebSocket binary frames encoded with postcard, each size-checked before it
//!   is decoded;
//! - [`update`]: the pseudo-gradient payload of a work unit, its codecs (f32, int8 with
//!   per-256 absmax scales, [`sparse`] top-k with two bits a value; decoders that refuse any
//!   malformed bytes, never panic) and the fragment of the parameter vector it covers;
//! - [`feedback`]: a participant's error feedback, what its lossy updates left out, added to
//!   its next update of the same run (kept on the GPU where the update is encoded there);
//! - [`identity`]: ed25519 identities, the hello challenge and update signatures;
//! - [`ledger`]: the contribution ledger anyone can check: granted contributions as leaves of an
//!   RFC 6962 Merkle tree, the relay's signed checkpoints and receipts, proofs and the audit;
//! - [`work`]: what a work unit means (its batches, its learning-rate ramp, how it is trained,
//!   its pseudo-gradient, its signed submission), shared by every participant and verifier;
//! - [`throughput`]: what each codec costs where it runs (encode, decode, beside a copy), timed
//!   by the caller's clock: the same measurement natively and in the tab.
//!
//! Model weights travel separately, over plain HTTP, as safetensors files named by version.

pub mod feedback;
pub mod identity;
pub mod ledger;
pub mod messages;
pub mod sparse;
pub mod throughput;
pub mod update;
pub mod work;

pub use messages::{ClientMsg, ServerMsg, decode, encode};

/// Version of this protocol. A relay refuses participants that speak another one.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest control message accepted (anything but an update submission).
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Errors of the protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frame is larger than the bound for its kind.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size received.
        size: usize,
        /// Limit in force.
        limit: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A signature or key does not verify.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// An update payload is inconsistent.
    #[error("bad update: {0}")]
    BadUpdate(String),
    /// Training a unit failed.
    #[error("training failed: {0}")]
    Training(String),
}
