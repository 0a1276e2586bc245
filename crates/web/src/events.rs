//! What the participant tells the page: one tagged object per event (`{type: "step", …}`),
//! converted with serde-wasm-bindgen.

use serde::Serialize;

/// An event for the page.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The backend was chosen.
    Backend {
        /// `webgpu` or `wasm-cpu`.
        backend: String,
        /// The adapter or CPU description.
        device: String,
        /// Why this backend (e.g. why not WebGPU).
        reason: String,
    },
    /// Connection state changed.
    State {
        /// `connecting`, `training`, `waiting`, `paused`, `reconnecting`, `left`.
        state: String,
        /// Free text.
        detail: String,
    },
    /// The relay welcomed us.
    Joined {
        /// Our participant id.
        participant_id: String,
        /// Run name.
        run: String,
        /// Model config name-like summary.
        model: String,
        /// Current model version.
        model_version: u64,
    },
    /// A new global model version exists.
    Version {
        /// The version.
        model_version: u64,
    },
    /// A unit was leased and training starts.
    Unit {
        /// Unit id.
        unit_id: u64,
        /// Data shard.
        shard: u64,
        /// Base version.
        base_version: u64,
        /// Inner steps.
        inner_steps: u32,
    },
    /// A model version was downloaded: whole, or rebuilt from the held version and the
    /// relay's encoded changes (`rebuilt_from`).
    Weights {
        /// The version.
        version: u64,
        /// Bytes downloaded.
        bytes: u64,
        /// The version it was rebuilt from, if it was.
        rebuilt_from: Option<u64>,
    },
    /// One inner step finished.
    Step {
        /// Unit id.
        unit_id: u64,
        /// Steps done in this unit (1-based).
        step: u32,
        /// Steps in the unit.
        of: u32,
        /// Training loss of the step.
        loss: f32,
        /// Wall time of the step.
        ms: f64,
        /// Training throughput of this step.
        tokens_per_s: f64,
    },
    /// A unit's update was answered.
    Result {
        /// Unit id.
        unit_id: u64,
        /// Accepted into the model.
        accepted: bool,
        /// Model version after acceptance.
        model_version: Option<u64>,
        /// Why rejected.
        reason: Option<String>,
        /// Tokens the unit covered.
        tokens: u64,
        /// First inner loss.
        loss_before: f32,
        /// Last inner loss.
        loss_after: f32,
        /// The relay's signed receipt when accepted: one JSON line, as the native host keeps
        /// them in its `receipts.jsonl` (the page keeps them; `checkReceipts` checks them).
        receipt: Option<String>,
        /// Bytes of the encoded update sent.
        update_bytes: u64,
        /// Whether the update was encoded on the GPU (on WebGPU, any codec but f32 and sign),
        /// so that only its encoded bytes were read back.
        encoded_on_gpu: bool,
    },
    /// A unit was given up (paused past its lease, or leaving).
    Abandoned {
        /// Unit id.
        unit_id: u64,
        /// Why.
        reason: String,
    },
    /// Something went wrong; the participant retries if it can.
    Error {
        /// What.
        message: String,
    },
}
