//! Participants that misbehave, for the attack suite and its benchmark: each holds a valid key,
//! leases real units and signs its submissions correctly, but what it submits is not the honest
//! pseudo-gradient of the unit. The honest reference it starts from is trained here with the
//! shared core, exactly as a participant would.

use std::time::{Duration, Instant};

use tessera_core::burn::prelude::Device;
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::data::Corpus;
use tessera_core::optim::AdamW;
use tessera_protocol::messages::{ClientMsg, RunInfo, ServerMsg, WorkUnit};
use tessera_protocol::work;

use crate::client::{self, Ws, joined, recv, send};

/// What an attacker submits for each unit it leases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// Gaussian noise with the norm of the honest update.
    NoiseHonestNorm,
    /// Gaussian noise with 100 times that norm.
    Noise100x,
    /// The honest update, negated.
    SignFlip,
    /// The honest update times a factor (×10, ×0.1).
    Scaled(f32),
    /// Trains this many steps (0, 1, H/4 given as 0.25…) while claiming the unit's H.
    Lazy(LazySteps),
    /// Its own earlier accepted update, again.
    Replay,
    /// The last public step of the model (version v−1 minus version v) plus small noise: a copy
    /// of others' work.
    CopyPublic,
    /// Trains the unit on another shard's batches.
    WrongShard,
    /// Trains the unit on junk text.
    JunkData,
    /// "A Little Is Enough" (Baruch et al. 2019): colluders estimate the per-coordinate mean
    /// and spread of honest updates (here from two units trained honestly) and submit
    /// mean − z·spread.
    Alie(f32),
    /// Inner-product manipulation (Xie et al. 2020): −ε times the honest mean.
    Ipm(f32),
    /// Stays under every threshold, always pushing the same direction: the honest update plus
    /// a fixed direction of a quarter of its norm.
    UnderThreshold,
}

/// Steps a lazy attacker really trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LazySteps {
    /// None: the update is zero.
    Zero,
    /// One.
    One,
    /// A quarter of the unit.
    Quarter,
}

impl Attack {
    /// Every attack of the suite.
    pub const ALL: [Attack; 15] = [
        Attack::NoiseHonestNorm,
        Attack::Noise100x,
        Attack::SignFlip,
        Attack::Scaled(10.0),
        Attack::Scaled(0.1),
        Attack::Lazy(LazySteps::Zero),
        Attack::Lazy(LazySteps::One),
        Attack::Lazy(LazySteps::Quarter),
        Attack::Replay,
        Attack::CopyPublic,
        Attack::WrongShard,
        Attack::JunkData,
        Attack::Alie(1.0),
        Attack::Ipm(0.5),
        Attack::UnderThreshold,
    ];

    /// A short name.
    pub fn name(&self) -> String {
        match self {
            Attack::NoiseHonestNorm => "noise at the honest norm".into(),
            Attack::Noise100x => "noise at 100x the honest norm".into(),
            Attack::SignFlip => "sign-flipped honest update".into(),
            Attack::Scaled(k) => format!("honest update x{k}"),
            Attack::Lazy(LazySteps::Zero) => "lazy: 0 steps".into(),
            Attack::Lazy(LazySteps::One) => "lazy: 1 step".into(),
            Attack::Lazy(LazySteps::Quarter) => "lazy: H/4 steps".into(),
            Attack::Replay => "replay of an earlier accepted update".into(),
            Attack::CopyPublic => "copy of the last public step + noise".into(),
            Attack::WrongShard => "trained on another shard".into(),
            Attack::JunkData => "trained on junk text".into(),
            Attack::Alie(z) => format!("ALIE (z = {z})"),
            Attack::Ipm(e) => format!("inner-product manipulation (eps = {e})"),
            Attack::UnderThreshold => "just under the thresholds, same direction".into(),
        }
    }
}

/// What an attacker saw of its submissions.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Accepted.
    pub accepted: u64,
    /// Accepted among the attacking units (after its patience).
    pub accepted_attacks: u64,
    /// Tokens of the units it trained honestly and had accepted (its patience).
    pub honest_tokens: u64,
    /// Rejected, with the relay's reasons.
    pub rejected: Vec<String>,
    /// It was banned (and disconnected).
    pub banned: bool,
}

fn train(run: &RunInfo, unit: &WorkUnit, base: &[f32], corpus: &Corpus, steps: u32) -> Vec<f32> {
    if steps == 0 {
        return vec![0.0; base.len()];
    }
    let mut u = unit.clone();
    u.inner_steps = steps;
    let train: TrainConfig = run.train.clone();
    work::train(
        &Device::flex(),
        run.model,
        &train,
        &u,
        base,
        corpus,
        AdamW::new(),
        |_| {},
    )
    .expect("training")
    .delta
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// Runs `attack` against the relay on `port` with `secret` until `deadline`, or until the
/// relay has no more work for it, or bans it. `corpus` is the run's corpus. A patient attacker
/// trains its first `patience` units honestly (to earn the relay's trust) and attacks after.
pub async fn run(
    port: u16,
    secret: [u8; 32],
    attack: Attack,
    patience: u32,
    corpus: &Corpus,
    deadline: Instant,
) -> Tally {
    let (mut ws, run) = joined(port, secret).await;
    let model: ModelConfig = run.model;
    let junk = Corpus::from_text(
        &(0..200_000u64)
            .map(|i| (b'!' + (tessera_core::data::mix(i) % 90) as u8) as char)
            .collect::<String>(),
        model.block_size,
    )
    .expect("junk corpus");
    let mut tally = Tally::default();
    let mut previous: Option<Vec<f32>> = None;
    let fixed = client::noise(run.num_params as usize, 1.0, 0xfeed);
    let mut idle_since = None;
    let mut units = 0u32;
    while Instant::now() < deadline {
        send(&mut ws, &ClientMsg::RequestWork).await;
        let unit = match next(&mut ws).await {
            Next::Unit(u) => u,
            Next::Wait(ms) => {
                // A relay that stops handing out work has finished the run.
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(15) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                continue;
            }
            Next::Banned => {
                tally.banned = true;
                break;
            }
            Next::Closed => break,
        };
        idle_since = None;
        let base = client::base(port, &model, unit.base_version);
        let h = unit.inner_steps;
        let honest = || train(&run, &unit, &base.weights, corpus, h);
        units += 1;
        let delta: Vec<f32> = match attack {
            _ if units <= patience => honest(),
            Attack::NoiseHonestNorm => {
                let n = norm(&honest());
                client::noise(base.weights.len(), n, unit.unit_id)
            }
            Attack::Noise100x => {
                let n = norm(&honest());
                client::noise(base.weights.len(), 100.0 * n, unit.unit_id)
            }
            Attack::SignFlip => honest().iter().map(|x| -x).collect(),
            Attack::Scaled(k) => honest().iter().map(|x| k * x).collect(),
            Attack::Lazy(LazySteps::Zero) => vec![0.0; base.weights.len()],
            Attack::Lazy(LazySteps::One) => train(&run, &unit, &base.weights, corpus, 1),
            Attack::Lazy(LazySteps::Quarter) => {
                train(&run, &unit, &base.weights, corpus, (h / 4).max(1))
            }
            Attack::Replay => match &previous {
                Some(p) => p.clone(),
                None => honest(),
            },
            Attack::CopyPublic => {
                let older = unit.base_version.saturating_sub(1);
                let prev = client::base(port, &model, older);
                let mut d: Vec<f32> = prev
                    .weights
                    .iter()
                    .zip(&base.weights)
                    .map(|(a, b)| a - b)
                    .collect();
                let n = norm(&d).max(1e-6);
                let noise = client::noise(d.len(), 0.01 * n, unit.unit_id);
                for (x, e) in d.iter_mut().zip(noise) {
                    *x += e;
                }
                d
            }
            Attack::WrongShard => {
                let mut u = unit.clone();
                u.shard += 1_000_000;
                train(&run, &u, &base.weights, corpus, h)
            }
            Attack::JunkData => train(&run, &unit, &base.weights, &junk, h),
            Attack::Alie(z) | Attack::Ipm(z) => {
                // Two honest estimates (this unit and another shard's) stand for the
                // colluders' view of the honest updates.
                let a = honest();
                let mut u2 = unit.clone();
                u2.shard += 2_000_000;
                let b = train(&run, &u2, &base.weights, corpus, h);
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| {
                        let mean = 0.5 * (x + y);
                        let spread = 0.5 * (x - y).abs();
                        if matches!(attack, Attack::Alie(_)) {
                            mean - z * spread
                        } else {
                            -z * mean
                        }
                    })
                    .collect()
            }
            Attack::UnderThreshold => {
                let d = honest();
                let n = norm(&d) as f32;
                d.iter()
                    .zip(&fixed)
                    .map(|(x, f)| x + 0.25 * n * f)
                    .collect()
            }
        };
        let s = client::signed(&secret, &unit, &model, base.sha256, &delta);
        match client::submit(&mut ws, s).await {
            ServerMsg::Accepted { .. } => {
                tally.accepted += 1;
                tally.accepted_attacks += u64::from(units > patience);
                if units <= patience {
                    tally.honest_tokens +=
                        h as u64 * unit.batch_size as u64 * model.block_size as u64;
                }
                previous = Some(delta);
            }
            ServerMsg::Rejected { reason, detail, .. } => {
                tally.rejected.push(format!("{reason:?}: {detail}"))
            }
            _ => {}
        }
    }
    tally
}

enum Next {
    Unit(WorkUnit),
    Wait(u64),
    Banned,
    Closed,
}

async fn next(ws: &mut Ws) -> Next {
    loop {
        match recv(ws).await {
            Some(ServerMsg::Work(u)) => return Next::Unit(u),
            Some(ServerMsg::NoWork { retry_ms }) => return Next::Wait(retry_ms),
            Some(ServerMsg::Error { message }) if message.starts_with("banned") => {
                return Next::Banned;
            }
            Some(ServerMsg::Error { .. }) | None => return Next::Closed,
            Some(_) => continue,
        }
    }
}
