//! # tessera-coordinator
//!
//! The relay's decisions, with no I/O, no clock and no randomness of its own: the shell feeds it
//! events (a participant joins, asks for work, submits, leaves; time passes; a version was
//! evaluated) together with the current time in milliseconds, and persists what it decides.
//! Churn, lease expiry and thousands of participants are therefore plain unit tests with a
//! synthetic clock.
//!
//! The training it coordinates is asynchronous DiLoCo. Each work unit is `H` inner AdamW steps
//! from a model version; the participant returns the pseudo-gradient (base − trained weights).
//! A round averages its updates (token-weighted, staleness-discounted, normalised) and folds
//! the average into the global weights with a Nesterov-momentum outer step. What keeps it stable
//! for any number of participants and any mix of speeds:
//!
//! - a round closes after one update per *active* participant (not after a fixed K), so an outer
//!   step averages the work done in parallel instead of adding it up;
//! - units are sized to each participant's measured speed ([`pace`]), so a slow participant's
//!   update lands in the same round as the fast ones' instead of versions late;
//! - a participant whose update sits in a round about to close waits briefly for the new version
//!   (the grace), so units start fresh; `lockstep` makes that wait unbounded (synchronous DiLoCo);
//! - each unit starts a fresh AdamW with a short learning-rate warmup, so a unit is a pure
//!   function of what the lease names and can be re-executed by anyone;
//! - the model may be split into fragments (groups of blocks, Streaming DiLoCo's shards): a
//!   unit then trains one fragment with the rest frozen and uploads that fragment only, and
//!   each fragment takes its own outer step with its own momentum ([`FragmentSchedule`]);
//! - the [`guard`] rolls back to the last good version when an evaluated version is clearly
//!   worse than the recent best, and damps the next outer steps.
//!
//! Nothing unverified enters the model or earns credit ([`screen`]): every update passes cheap
//! checks (exact and near duplicates, its norm against recent ones of its size) and a loss probe
//! the shell computes; an identity's first units and anomalies are held out of the model until a
//! re-execution agrees, and a random fraction of the rest (higher for young identities) is
//! re-executed after folding; what is folded is clipped around the previous round's average
//! (centered clipping); credit stays pending until a unit's window closes, and a failed
//! re-execution bans the key, forfeits its pending credit and takes its updates that are
//! still pending credit back out of the model (`revert`).
//!
//! Re-executions are work like training: a participant the relay trusts (a `--verifier` host
//! named by the operator, or one with enough of its own units verified) re-trains others'
//! units; the relay does it itself when no verifier is there or one is slow, breaks ties when a
//! verifier disagrees with a submission, and spot-checks a fraction of verifiers' agreements
//! ([`checks`]). A verifier found wrong is banned like any cheat.
//!
//! Modules: [`aggregate`] (the arithmetic of folding and the outer step), [`pace`] (unit
//! sizing), [`guard`] (rollbacks), [`screen`] (verification decisions), [`checks`] (who
//! re-executes what), `revert` (a banned identity's updates out of the model), and
//! [`Coordinator`] (leases, rounds, staleness, acceptance, credit).

pub mod aggregate;
pub mod checks;
mod coordinator;
pub mod guard;
pub mod pace;
mod revert;
pub mod screen;

pub use checks::RelayCheck;
pub use coordinator::{
    Accepted, Config, Coordinator, Event, FragmentSchedule, Held, Lease, LedgerChange,
    ParticipantStats, Rejection, Scrutiny, Verdict, VersionChange, Work,
};
pub use guard::{GuardConfig, Rollback};
pub use screen::{Measured, Probe, ScreenConfig};
