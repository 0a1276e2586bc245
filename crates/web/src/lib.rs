//! # tessera-web
//!
//! The browser participant. The same [`tessera_core`] model and inner loop as the native host,
//! compiled to WASM, training on the tab's WebGPU adapter through burn's wgpu backend, or on
//! burn's flex CPU backend compiled to WASM when there is no usable adapter.
//!
//! It owns:
//! - [`Participant`], the one handle JavaScript sees: `new Participant(options, onEvent)`,
//!   then `run()` (a promise that settles when the visitor leaves), `pause()`, `resume()`,
//!   `leave()`. It is meant to live in a Web Worker (`web/worker.js`) so the page stays
//!   responsive; every change of state reaches JavaScript as one event object (see [`events`]);
//! - [`bench_unit`]: trains one explicitly named unit and returns its pseudo-gradient and step
//!   times, for the browser-versus-native consistency and speed benchmarks;
//! - [`receipts::check_receipts`]: checks the relay's receipts the page kept for this tab
//!   against the relay's signed ledger, in the tab;
//! - the browser's I/O: a WebSocket speaking the wire protocol ([`socket`]), `fetch` for the
//!   model and corpus, timers ([`platform`]).
//! - with feature `threads` (the bundle in `web/pkg/threads`), `initThreadPool`: flex's
//!   kernels on a rayon pool of Web Workers, used when the page is cross-origin isolated.
//!
//! Reads of tensor values are always asynchronous (`into_data_async`): WebGPU in a browser
//! cannot block. On a native target the crate is empty.

#![cfg(target_arch = "wasm32")]

pub mod events;
mod participant;
pub mod platform;
pub mod receipts;
pub mod socket;

pub use participant::{Participant, bench_unit};
/// The threaded bundle's `initThreadPool(n)`: starts n Web Workers sharing this module's memory
/// as rayon's global pool, which flex's CPU kernels then use (see `web/worker.js`).
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

use wasm_bindgen::prelude::*;

/// Installs the panic hook, so a Rust panic shows up in the console with its message.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}
