//! Where the time of one training step goes (baby config, batch 12, CPU flex backend):
//! forward, backward and the AdamW update timed separately, each ending in a device sync;
//! once with the fused kernels and once with burn's composed ops, alternating rounds.
//!
//!     cargo run --release -p tessera-core --example step_profile [config] [steps] [rounds] [fused|composed|both]

use std::time::Instant;

use tessera_core::burn::prelude::*;
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::corpus::default_corpus;
use tessera_core::data::{Corpus, Split};
use tessera_core::kernels;
use tessera_core::optim::AdamW;
use tessera_core::train::Trainer;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "baby".into());
    let steps: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(50);
    let rounds: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(1);
    let modes: &[bool] = match args.next().as_deref() {
        Some("fused") => &[true],
        Some("composed") => &[false],
        _ => &[true, false],
    };
    let mut best = [f64::MAX; 2];
    for _ in 0..rounds {
        for (i, &fused) in modes.iter().enumerate() {
            kernels::set_enabled(fused);
            // Where the trainer runs a step: on a worker of the CPU pool.
            let t = kernels::on_cpu_pool(&Device::flex(), || profile(&name, steps, fused));
            best[i] = best[i].min(t);
        }
    }
    println!(
        "{{\"config\": \"{name}\", \"best_fused_ms\": {:.2}, \"best_composed_ms\": {:.2}, \"speedup\": {:.2}}}",
        best[0],
        best[1],
        best[1] / best[0]
    );
}

/// Times `steps` steps after 5 of warm-up; prints the parts, returns the total ms per step.
fn profile(name: &str, steps: usize, fused: bool) -> f64 {
    let cfg = ModelConfig::named(name).expect("config");
    let train = TrainConfig::nanogpt(steps);
    let device = Device::flex();
    let corpus = Corpus::from_text(&default_corpus(), cfg.block_size).unwrap();
    let tr = Trainer::new(cfg, train.clone(), &device).unwrap();
    let ad = tr.device().clone();
    let mut model = tr.into_model();
    let mut opt = AdamW::new();
    let (mut f, mut b, mut o) = (0.0, 0.0, 0.0);
    for step in 0..steps + 5 {
        let key = tessera_core::data::BatchKey {
            seed: 1,
            shard: 0,
            step: step as u64,
        };
        let batch = corpus.batch(Split::Train, key, train.batch_size, cfg.block_size);
        let t0 = Instant::now();
        let loss = model.batch_loss(&batch, &ad);
        ad.sync().unwrap();
        let t1 = Instant::now();
        let grads = loss.backward();
        ad.sync().unwrap();
        let t2 = Instant::now();
        let (m, _) = opt.step(model, &grads, 1e-3, &train);
        model = m;
        ad.sync().unwrap();
        let t3 = Instant::now();
        if step >= 5 {
            f += (t1 - t0).as_secs_f64();
            b += (t2 - t1).as_secs_f64();
            o += (t3 - t2).as_secs_f64();
        }
    }
    let ms = |x: f64| 1000.0 * x / steps as f64;
    println!(
        "{{\"config\": \"{name}\", \"fused\": {fused}, \"forward_ms\": {:.2}, \"backward_ms\": {:.2}, \"adamw_ms\": {:.2}, \"total_ms\": {:.2}}}",
        ms(f),
        ms(b),
        ms(o),
        ms(f + b + o)
    );
    ms(f + b + o)
}
