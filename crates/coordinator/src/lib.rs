//! # tessera-coordinator
//!
//! The relay's decisions, with no I/O, no clock and no randomness of its own: the shell feeds it
//! events (a participant joins, asks for work, submits, leaves; time passes) together with the
//! current time in milliseconds, and persists what it decides. Churn, lease expiry and
//! thousands of participants are therefore plain unit tests with a synthetic clock.
//!
//! The training it coordinates is asynchronous DiLoCo: each work unit is `H` inner AdamW steps
//! from a model version; the participant returns the pseudo-gradient (base − trained weights).
//! A round folds the token-weighted (and staleness-discounted) average of its updates into the
//! global weights with Nesterov-momentum SGD, and closes after `K` updates or at a deadline.
//!
//! - [`aggregate`]: the arithmetic of folding and the outer step (hot paths);
//! - [`Coordinator`]: leases, rounds, staleness and acceptance.

pub mod aggregate;
mod coordinator;

pub use coordinator::{
    Accepted, Config, Coordinator, Event, Lease, ParticipantStats, Rejection, Verdict,
};
