//! `tessera-host train` and `tessera-host sample`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tessera_core::config::{CONFIG_NAMES, ModelConfig, TrainConfig};
use tessera_core::data::Split;
use tessera_core::tokenizer;
use tessera_core::train::{Trainer, generate};

use crate::backend::{self, Backend};
use crate::{corpus, store};

/// Options of `tessera-host train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model configuration: tiny, baby or small.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// Corpus: a UTF-8 text file or a folder of them (default: the embedded corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Number of optimizer steps to reach (counting steps of a resumed checkpoint).
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// cpu or wgpu (default: the fastest available here).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 12)]
    batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Warmup steps (default: min(100, steps / 10)).
    #[arg(long)]
    warmup: Option<usize>,
    /// Run seed: initialisation and batches.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Checkpoint directory (weights, optimizer state, sidecar).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the checkpoint in --out.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Measure validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 250)]
    eval_interval: usize,
    /// Validation batches per measurement.
    #[arg(long, default_value_t = 50)]
    eval_iters: usize,
    /// Sequences per validation batch (default: --batch). The relay evaluates with batches of
    /// its run's batch size: set this to compare with it when training with another batch.
    #[arg(long)]
    eval_batch: Option<usize>,
    /// Stop after this step (the schedule still spans --steps): with --resume, training in parts.
    #[arg(long)]
    stop_at: Option<usize>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_interval: usize,
    /// Print one JSON summary object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// On the CPU, compose burn's primitive ops instead of the fused kernels (slower; for
    /// measuring one against the other).
    #[arg(long)]
    no_fused_kernels: bool,
}

/// The `--json` summary.
#[derive(Serialize)]
struct Summary {
    config: String,
    backend: Backend,
    device: String,
    steps: u64,
    tokens: u64,
    train_loss: f32,
    val_loss: f32,
    tokens_per_s: f64,
    ms_per_step: f64,
    wall_s: f64,
    params: usize,
}

fn read_scalar(t: tessera_core::burn::prelude::Tensor<1>) -> f32 {
    t.into_data()
        .try_into_vec::<f32>()
        .map(|v| v[0])
        .unwrap_or(f32::NAN)
}

/// Runs `tessera-host train`.
pub fn run(args: TrainArgs) -> Result<()> {
    tessera_core::kernels::set_enabled(!args.no_fused_kernels);
    let backend = args.backend.unwrap_or_else(backend::fastest);
    let (device, device_name) = backend::device(backend)?;
    let mut trainer = if args.resume
        && args
            .out
            .as_ref()
            .is_some_and(|d| d.join(store::SIDECAR).exists())
    {
        let dir = args.out.as_ref().expect("--resume requires --out");
        let t = store::load(dir, &device)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        eprintln!("resumed {} at step {}", dir.display(), t.step);
        t
    } else {
        let Some(model) = ModelConfig::named(&args.config) else {
            bail!(
                "unknown config {:?}: choose one of {}",
                args.config,
                CONFIG_NAMES.join(", ")
            );
        };
        let mut train = TrainConfig::nanogpt(args.steps);
        train.batch_size = args.batch;
        train.lr = args.lr;
        train.min_lr = args.min_lr.unwrap_or(args.lr / 10.0);
        if let Some(w) = args.warmup {
            train.warmup_steps = w;
        }
        train.seed = args.seed;
        Trainer::new(model, train, &device)?
    };
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let cfg = trainer.model_config;
    let (corpus, corpus_name) = corpus::load(args.data.as_deref(), cfg.block_size)?;
    let n_params = cfg.num_params();
    eprintln!(
        "training {} ({:.2}M parameters) on {device_name}, corpus: {corpus_name}",
        args.config,
        n_params as f64 / 1e6
    );

    let total = args.stop_at.unwrap_or(args.steps).min(args.steps) as u64;
    let bar = ProgressBar::new(total).with_position(trainer.step.min(total));
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta}]",
        )
        .expect("valid template"),
    );
    let batch_size = trainer.train_config.batch_size;
    let eval_batch = args.eval_batch.unwrap_or(batch_size).max(1);
    let start_tokens = trainer.tokens;
    let start = Instant::now();
    let mut train_loss = f32::NAN;
    let mut val_loss = None;
    let mut steps_done = 0u64;
    while trainer.step < total {
        let batch = corpus.batch(
            Split::Train,
            trainer.batch_key(0),
            batch_size,
            cfg.block_size,
        );
        let out = trainer.step(&batch);
        steps_done += 1;
        let step = trainer.step;
        // Reading a value waits for the device: do it only when there is something to show.
        if step % 10 == 0 || step == total {
            train_loss = read_scalar(out.loss);
            let tps = (trainer.tokens - start_tokens) as f64 / start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {train_loss:.4}  {tps:.0} tok/s  lr {:.2e}",
                out.lr
            ));
        }
        if args.eval_interval > 0 && step % args.eval_interval as u64 == 0 && step < total {
            let v = read_scalar(trainer.validation_loss(&corpus, args.eval_iters, eval_batch));
            let line = format!("step {step}: train loss {train_loss:.4}, val loss {v:.4}");
            // Without a terminal the bar draws nothing and drops println: print plainly.
            if std::io::stderr().is_terminal() {
                bar.println(line);
            } else {
                eprintln!("{line}");
            }
            val_loss = Some(v);
        }
        if let Some(dir) = &args.out
            && args.save_interval > 0
            && step % args.save_interval as u64 == 0
        {
            store::save(dir, &trainer, val_loss)?;
        }
        bar.set_position(step);
    }
    let train_time = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let v = read_scalar(trainer.validation_loss(&corpus, args.eval_iters, eval_batch));
    if !v.is_finite() {
        bail!("validation loss is {v}: training diverged");
    }
    if let Some(dir) = &args.out {
        store::save(dir, &trainer, Some(v))?;
    }
    let tokens = trainer.tokens - start_tokens;
    let summary = Summary {
        config: args.config,
        backend,
        device: device_name,
        steps: trainer.step,
        tokens: trainer.tokens,
        train_loss,
        val_loss: v,
        tokens_per_s: tokens as f64 / train_time.max(1e-9),
        ms_per_step: 1000.0 * train_time / steps_done.max(1) as f64,
        wall_s: train_time,
        params: n_params,
    };
    eprintln!(
        "step {}: train loss {:.4}, val loss {:.4}, {:.0} tokens/s, {:.1} ms/step",
        summary.steps,
        summary.train_loss,
        summary.val_loss,
        summary.tokens_per_s,
        summary.ms_per_step
    );
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// Options of `tessera-host sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint directory written by `train --out`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Number of bytes to generate.
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `tessera-host sample`.
pub fn sample(args: SampleArgs) -> Result<()> {
    let (device, _) = backend::device(Backend::Cpu)?;
    let trainer = store::load(&args.checkpoint, &device)?;
    let prompt = tokenizer::encode(&args.prompt);
    let out = generate(
        trainer.model(),
        &prompt,
        args.tokens,
        args.temperature,
        args.seed,
        &device,
    );
    println!("{}", tokenizer::decode(&out));
    Ok(())
}
