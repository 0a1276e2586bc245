//! Simulated participants against the real coordinator, in one process, on a virtual clock:
//! every unit is trained for real (the shared core, on the CPU) and every decision is the
//! relay's own ([`tessera_coordinator::Coordinator`]), but time is a counter, so runs are
//! deterministic and a 50× speed spread or 50 participants cost only their training compute.
//! A research and benchmarking tool: the end-to-end tests run the real relay and hosts.
//!
//!     tessera-sim --config baby --data ../shared/data/tinyshakespeare.txt \
//!         --participants 4 --speeds 1,1,1,0.125 --inner-steps 25 --tokens 1536000 --json
//!
//! Each participant's inner step takes `--step-ms / speed` virtual milliseconds and each unit
//! `--overhead-ms` more (fetching weights). Prints the validation curve by version and a JSON
//! summary.
//!
//! `--replicas` (with `--fragments`) trains fragments Streaming DiLoCo's way, from a replica
//! each participant keeps, which the relay does not do (its units must be re-executable from
//! the unit alone): here only to measure what the relay's frozen-rest fragment units give up
//! (BENCHMARKS.md, "Persistent replicas").

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tessera_coordinator::aggregate::l2_norm;
use tessera_coordinator::{Config, Coordinator, FragmentSchedule, GuardConfig, Measured, Work};
use tessera_core::burn::prelude::Device;
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::data::Corpus;
use tessera_core::optim::AdamW;
use tessera_core::params;
use tessera_core::train::{Trainer, eval_loss};
use tessera_protocol::feedback::ErrorFeedback;
use tessera_protocol::messages::{ParticipantKind, WorkUnit};
use tessera_protocol::update::{Codec, Fragment, Payload};
use tessera_protocol::work;

struct Args {
    config: String,
    data: Option<PathBuf>,
    participants: usize,
    speeds: Vec<f64>,
    step_ms: f64,
    overhead_ms: f64,
    tokens: u64,
    eval_iters: usize,
    eval_every: u64,
    keep_optimizer: bool,
    keep_second_moment: bool,
    trace: bool,
    json: bool,
    cfg: Config,
    seed: u64,
    ef_decay: f32,
    fragments: usize,
    replicas: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        config: "tiny".into(),
        data: None,
        participants: 4,
        speeds: vec![],
        step_ms: 100.0,
        overhead_ms: 0.0,
        tokens: 0,
        eval_iters: 50,
        eval_every: 0,
        keep_optimizer: false,
        keep_second_moment: false,
        trace: false,
        json: false,
        cfg: Config::new(0),
        seed: 1337,
        ef_decay: ErrorFeedback::DECAY,
        fragments: 1,
        replicas: false,
    };
    a.cfg.guard = GuardConfig {
        enabled: false,
        ..GuardConfig::default()
    };
    // The cheap checks and the centered clipping are the relay's; here only with --screen (no
    // probe, no re-execution: every participant is honest).
    a.cfg.screen.enabled = false;
    let mut decay = true;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--help" | "-h" => {
                println!(
                    "tessera-sim --tokens N [--participants N --speeds S1,S2,… --config C --data FILE \\\n    \
                     --inner-steps H --min-inner-steps M --warmup W --batch B --inner-lr LR --no-decay --lr-warmup-tokens T \\\n    \
                     --updates-per-round K --lockstep --grace G --max-staleness S --relative-staleness \\\n    \
                     --outer-lr LR --outer-momentum MU --fragments F --fragment-schedule rotate|spread --replicas --codec f32|int8|int4|sparseK --ef-decay B --version-codec C|off --keep-optimizer --keep-second-moment --guard --screen \\\n    \
                     --step-ms MS --overhead-ms MS --eval-every V --eval-iters N --seed S --trace --json]\n\
                     Unset settings are the relay's defaults; see the top of tests/src/bin/tessera-sim.rs."
                );
                std::process::exit(0);
            }
            "--config" => a.config = val()?,
            "--data" => a.data = Some(val()?.into()),
            "--participants" => a.participants = val()?.parse()?,
            "--speeds" => {
                a.speeds = val()?
                    .split(',')
                    .map(|s| s.parse::<f64>())
                    .collect::<Result<_, _>>()?
            }
            "--step-ms" => a.step_ms = val()?.parse()?,
            "--overhead-ms" => a.overhead_ms = val()?.parse()?,
            "--tokens" => a.tokens = val()?.parse()?,
            "--eval-iters" => a.eval_iters = val()?.parse()?,
            "--eval-every" => a.eval_every = val()?.parse()?,
            "--keep-optimizer" => a.keep_optimizer = true,
            "--keep-second-moment" => a.keep_second_moment = true,
            "--trace" => a.trace = true,
            "--json" => a.json = true,
            "--seed" => a.seed = val()?.parse()?,
            "--inner-steps" => a.cfg.inner_steps = val()?.parse()?,
            "--min-inner-steps" => a.cfg.min_inner_steps = val()?.parse()?,
            "--warmup" => a.cfg.warmup_steps = val()?.parse()?,
            "--batch" => a.cfg.batch_size = val()?.parse()?,
            "--inner-lr" => a.cfg.inner_lr = val()?.parse()?,
            "--no-decay" => decay = false,
            "--lr-warmup-tokens" => a.cfg.inner_lr_warmup_tokens = val()?.parse()?,
            "--updates-per-round" => a.cfg.updates_per_round = val()?.parse()?,
            "--lockstep" => a.cfg.lockstep = true,
            "--grace" => a.cfg.grace = val()?.parse()?,
            "--max-staleness" => a.cfg.max_staleness = val()?.parse()?,
            "--relative-staleness" => a.cfg.absolute_staleness_discount = false,
            "--outer-lr" => a.cfg.outer_lr = val()?.parse()?,
            "--codec" => a.cfg.codec = Codec::parse(&val()?)?,
            "--ef-decay" => a.ef_decay = val()?.parse()?,
            "--version-codec" => {
                a.cfg.version_codec = match val()?.as_str() {
                    "off" => None,
                    c => Some(Codec::parse(c)?),
                }
            }
            "--outer-momentum" => a.cfg.outer_momentum = val()?.parse()?,
            "--guard" => a.cfg.guard.enabled = true,
            "--fragments" => a.fragments = val()?.parse()?,
            "--fragment-schedule" => {
                let v = val()?;
                a.cfg.fragment_schedule =
                    FragmentSchedule::parse(&v).with_context(|| format!("{v}: rotate or spread"))?
            }
            "--screen" => a.cfg.screen.enabled = true,
            "--replicas" => a.replicas = true,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.speeds.is_empty() {
        a.speeds = vec![1.0; a.participants];
    }
    if a.speeds.len() != a.participants {
        bail!("--speeds needs {} values", a.participants);
    }
    if a.replicas && a.fragments < 2 {
        bail!("--replicas needs --fragments 2 or more");
    }
    if a.tokens == 0 {
        bail!("--tokens is required (total tokens to fold)");
    }
    a.cfg.max_tokens = Some(a.tokens);
    if decay {
        a.cfg.inner_lr_decay = Some((a.tokens, a.cfg.inner_lr / 10.0));
    }
    a.cfg.seed = a.seed;
    a.cfg.lease_ms = u64::MAX / 4;
    a.cfg.round_timeout_ms = u64::MAX / 4;
    Ok(a)
}

/// A participant's persistent replica (`--replicas`, Streaming DiLoCo's way to train fragments;
/// measured here only: a unit that starts from a private replica cannot be re-executed from the
/// unit alone, so the relay does not hand such units out). The participant trains its whole
/// replica in every unit and uploads one fragment's change since that fragment last took the
/// global values; before its next unit it takes the fresh global values of that fragment.
struct Replica {
    /// The replica's weights.
    weights: Vec<f32>,
    /// Each parameter's global value when the replica last took it.
    synced: Vec<f32>,
    /// The fragment uploaded last, to take from the next unit's base.
    merge: Option<std::ops::Range<usize>>,
}

/// Pending actions in (time, sequence) order: the sequence makes the run deterministic.
#[derive(Default)]
struct Schedule {
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    actions: BTreeMap<u64, Action>,
    seq: u64,
}

impl Schedule {
    fn push(&mut self, t: u64, p: usize, act: Action) {
        self.seq += 1;
        self.actions.insert(self.seq, act);
        self.queue.push(Reverse((t, self.seq, p)));
    }

    fn pop(&mut self) -> Option<(u64, usize, Action)> {
        let Reverse((t, s, p)) = self.queue.pop()?;
        Some((t, p, self.actions.remove(&s).expect("queued action")))
    }
}

/// What stands for a version's digest here (the relay hashes the safetensors bytes).
fn digest(params: &[f32]) -> [u8; 32] {
    let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
    work::sha256(&bytes)
}

enum Action {
    Request,
    Submit {
        unit: WorkUnit,
        delta: Vec<f32>,
        tokens: u64,
    },
}

fn main() -> Result<()> {
    let a = parse()?;
    let model = ModelConfig::named(&a.config).context("unknown config")?;
    let text = match &a.data {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => tessera_core::corpus::default_corpus().into_bytes(),
    };
    let corpus = Corpus::from_documents([("corpus", text.as_slice())], model.block_size)?;
    let device = Device::flex();
    let mut cfg = a.cfg.clone();
    cfg.context = model.block_size as u32;
    let mut train = TrainConfig::nanogpt(cfg.inner_steps as usize);
    train.seed = a.seed;
    train.batch_size = cfg.batch_size as usize;
    let first = Trainer::new(model, train.clone(), &device)?;
    if a.fragments > 1 {
        let specs = params::specs(first.model());
        cfg.fragments = params::fragments(&specs, model.n_layer, a.fragments)?
            .into_iter()
            .map(|r| Fragment {
                offset: r.start as u64,
                len: r.len() as u64,
            })
            .collect();
    }
    let init = params::to_vec(first.model());
    let n = init.len();
    let mut coord = Coordinator::new(cfg.clone(), 0, init.clone(), vec![0.0; n], 0, 0);
    coord.set_digest(0, digest(&init));
    let mut versions: BTreeMap<u64, Vec<f32>> = BTreeMap::from([(0, init)]);
    let ids: Vec<String> = (0..a.participants).map(|i| format!("p{i}")).collect();
    let mut optims: Vec<AdamW> = vec![AdamW::new(); a.participants];
    let mut replicas: Vec<Option<Replica>> = (0..a.participants).map(|_| None).collect();
    let mut feedback: Vec<ErrorFeedback> = vec![ErrorFeedback::new(a.ef_decay); a.participants];
    // How a sent update compares with what a verifier's re-execution would send (the same
    // codec, no residual) and with the unit's own pseudo-gradient: what a re-execution check
    // of a codec with error feedback can expect of an honest participant.
    let (mut cos_reexec, mut cos_delta): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut norm_ratio: Vec<f64> = Vec::new();
    let mut sched = Schedule::default();
    for (i, id) in ids.iter().enumerate() {
        coord.join(id, ParticipantKind::Native, "cpu", "sim", 0.0, 0);
        sched.push(i as u64, i, Action::Request);
    }
    let mut curve: Vec<(u64, f32)> = Vec::new();
    let mut evaluate = |v: u64, w: &[f32]| -> Result<f32> {
        let m = params::load_vec(tessera_core::model::Gpt::new(&model, &device), w)?;
        let l = eval_loss(&m, &corpus, a.seed, a.eval_iters, 12, &device);
        let v_loss = l
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?[0];
        curve.push((v, v_loss));
        Ok(v_loss)
    };
    let (mut accepted, mut rejected, mut stale_sum, mut waits) = (0u64, 0u64, 0u64, 0u64);
    let (mut upload_bytes, mut peak_upload) = (0u64, 0u64);
    // What participants download: a version's weights (4 bytes a parameter), or the chain of
    // encoded changes from the version they hold when every link exists and it is smaller.
    let mut download_bytes = 0u64;
    let mut held: Vec<Option<u64>> = vec![None; a.participants];
    let mut change_bytes: BTreeMap<u64, u64> = BTreeMap::new();
    // Inner steps of each participant's latest unit.
    let mut last_steps = vec![0u32; a.participants];
    let mut now = 0u64;
    while let Some((t, p, act)) = sched.pop() {
        now = t;
        coord.tick(now);
        match act {
            Action::Request => match coord.request_work(&ids[p], now) {
                Work::Unit(unit) => {
                    last_steps[p] = unit.inner_steps;
                    let full = 4 * n as u64;
                    let v = unit.base_version;
                    download_bytes += match held[p] {
                        Some(h) if h == v => 0,
                        Some(h) if h < v => (h + 1..=v)
                            .map(|x| change_bytes.get(&x).copied())
                            .sum::<Option<u64>>()
                            .map_or(full, |c| c.min(full)),
                        _ => full,
                    };
                    held[p] = Some(v);
                    let base = versions
                        .get(&unit.base_version)
                        .context("base version kept")?
                        .clone();
                    let optim = if a.keep_optimizer {
                        std::mem::take(&mut optims[p])
                    } else if a.keep_second_moment {
                        let mut o = std::mem::take(&mut optims[p]);
                        for m in o.moments.iter_mut().flatten() {
                            m.exp_avg = m.exp_avg.zeros_like();
                        }
                        o
                    } else {
                        AdamW::new()
                    };
                    let t = if a.replicas {
                        let rep = replicas[p].get_or_insert_with(|| Replica {
                            weights: base.clone(),
                            synced: base.clone(),
                            merge: None,
                        });
                        if let Some(m) = rep.merge.take() {
                            rep.weights[m.clone()].copy_from_slice(&base[m.clone()]);
                            rep.synced[m.clone()].copy_from_slice(&base[m]);
                        }
                        let whole = WorkUnit {
                            fragment: Fragment::ALL,
                            ..unit.clone()
                        };
                        let mut t = work::train(
                            &device,
                            model,
                            &train,
                            &whole,
                            &rep.weights,
                            &corpus,
                            optim,
                            |_| {},
                        )?;
                        for (w, d) in rep.weights.iter_mut().zip(&t.delta) {
                            *w -= d;
                        }
                        let r = unit.fragment.range(n)?;
                        t.delta = rep.synced[r.clone()]
                            .iter()
                            .zip(&rep.weights[r.clone()])
                            .map(|(s, w)| s - w)
                            .collect();
                        rep.merge = Some(r);
                        t
                    } else {
                        work::train(&device, model, &train, &unit, &base, &corpus, optim, |_| {})?
                    };
                    optims[p] = t.optimizer;
                    let tokens = work::tokens(&unit, &model);
                    let dur = a.overhead_ms + unit.inner_steps as f64 * a.step_ms / a.speeds[p];
                    sched.push(
                        now + dur.round() as u64,
                        p,
                        Action::Submit {
                            unit,
                            delta: t.delta,
                            tokens,
                        },
                    );
                }
                Work::Wait(ms) => {
                    waits += 1;
                    sched.push(now + ms, p, Action::Request);
                }
                Work::Finished | Work::Unknown | Work::Banned => {}
            },
            Action::Submit {
                unit,
                delta,
                tokens,
            } => {
                let base = digest(&versions[&unit.base_version]);
                // What the relay would fold: the update as the unit's codec decodes it (with
                // the participant's error feedback).
                let payload = feedback[p].encode(&unit, &delta);
                upload_bytes += payload.data.len() as u64;
                peak_upload = peak_upload.max(payload.data.len() as u64);
                let sent = payload.decode()?;
                if unit.codec.is_lossy() {
                    let reexec = Payload::encode(unit.codec, &delta).decode()?;
                    cos_reexec.push(work::cosine(&sent, &reexec));
                    cos_delta.push(work::cosine(&sent, &delta));
                    norm_ratio.push(l2_norm(&sent) / l2_norm(&reexec).max(1e-30));
                }
                let delta = sent;
                let bytes = payload.data;
                let measured = Measured::of(&delta, work::sha256(&bytes));
                match coord
                    .check(
                        &ids[p],
                        unit.unit_id,
                        unit.base_version,
                        &base,
                        &delta,
                        tokens,
                    )
                    .and_then(|v| coord.screen(&ids[p], unit.unit_id, &measured).map(|_| v))
                {
                    Ok(v) => {
                        accepted += 1;
                        stale_sum += v.staleness;
                        let r = coord.accept(
                            &ids[p],
                            unit.unit_id,
                            &delta,
                            v,
                            Some(&measured),
                            false,
                            now,
                        );
                        if a.trace {
                            eprintln!(
                                "{now} ms: p{p} unit {} ({} steps, base v{}, staleness {}) accepted{}",
                                unit.unit_id,
                                unit.inner_steps,
                                unit.base_version,
                                v.staleness,
                                r.closed
                                    .map(|v| format!(", closed v{v}"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                    Err(r) => {
                        rejected += 1;
                        coord.record_rejection(&ids[p], unit.unit_id, r.reason, now);
                    }
                }
                sched.push(now, p, Action::Request);
            }
        }
        coord.tick(now);
        let v = coord.version();
        if let std::collections::btree_map::Entry::Vacant(e) = versions.entry(v) {
            e.insert(coord.params().to_vec());
            if let Some(c) = coord.change(v) {
                change_bytes.insert(v, c.payload.data.len() as u64);
            }
            coord.set_digest(v, digest(coord.params()));
            let keep = v.saturating_sub(cfg.max_staleness + 2);
            versions.retain(|k, _| *k >= keep);
            if a.eval_every > 0 && v.is_multiple_of(a.eval_every) {
                let loss = evaluate(v, coord.params())?;
                if !a.json {
                    eprintln!("version {v} at {:.1} s: val {loss:.4}", now as f64 / 1e3);
                }
            }
        }
    }
    // The last round closes once every lease has come back.
    coord.tick(now + 1);
    let final_loss = evaluate(coord.version(), coord.params())?;
    let stats = |v: &mut Vec<f64>| -> serde_json::Value {
        if v.is_empty() {
            return serde_json::Value::Null;
        }
        v.sort_by(f64::total_cmp);
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        json!({"min": q(0.0), "p10": q(0.1), "median": q(0.5), "max": q(1.0)})
    };
    let summary = json!({
        "config": a.config, "participants": a.participants, "speeds": a.speeds,
        "inner_steps": cfg.inner_steps, "warmup": cfg.warmup_steps,
        "updates_per_round": cfg.updates_per_round, "lockstep": cfg.lockstep,
        "outer_lr": cfg.outer_lr, "outer_momentum": cfg.outer_momentum,
        "absolute_staleness_discount": cfg.absolute_staleness_discount, "grace": cfg.grace,
        "screen": cfg.screen.enabled, "clipped": coord.clipped_total(),
        "keep_optimizer": a.keep_optimizer, "seed": a.seed,
        "versions": coord.version(), "accepted": accepted, "rejected": rejected,
        "mean_staleness": stale_sum as f64 / accepted.max(1) as f64, "waits": waits,
        "codec": cfg.codec.name(), "upload_bytes": upload_bytes, "peak_upload_bytes": peak_upload,
        "fragment_schedule": format!("{:?}", cfg.fragment_schedule), "replicas": a.replicas,
        "fragments": coord.fragments().iter().map(|(r, steps)| json!([r.start, r.end, steps])).collect::<Vec<_>>(),
        "ef_decay": a.ef_decay,
        "version_codec": cfg.version_codec.map(|c| c.name()), "download_bytes": download_bytes,
        "cosine_sent_vs_reexecution": stats(&mut cos_reexec),
        "cosine_sent_vs_delta": stats(&mut cos_delta),
        "norm_sent_over_reexecution": stats(&mut norm_ratio),
        "tokens_applied": coord.tokens_applied(), "virtual_s": now as f64 / 1e3,
        "val_loss": final_loss, "curve": curve,
        "slowest_unit_steps": a.speeds.iter().zip(&last_steps)
            .min_by(|x, y| x.0.total_cmp(y.0)).map(|x| *x.1),
    });
    if a.json {
        println!("{summary}");
    } else {
        eprintln!("{summary:#}");
    }
    Ok(())
}
