//! Model shapes, parameter naming, training progress, checkpoints and resume.

mod common;

use std::collections::HashMap;

use tessera_core::burn::prelude::*;
use tessera_core::checkpoint;
use tessera_core::config::{ModelConfig, TrainConfig};
use tessera_core::corpus::default_corpus;
use tessera_core::data::{Corpus, Split};
use tessera_core::model::Gpt;
use tessera_core::params;
use tessera_core::train::Trainer;

fn tiny() -> ModelConfig {
    ModelConfig::named("tiny").unwrap()
}

#[test]
fn logits_have_the_expected_shape_and_parameters_match_the_config() {
    let device = Device::flex();
    for name in ["tiny", "baby"] {
        let cfg = ModelConfig::named(name).unwrap();
        let model = Gpt::new(&cfg, &device);
        let x = Tensor::<2, Int>::zeros([3, cfg.block_size], &device);
        assert_eq!(model.forward(x).dims(), [3, cfg.block_size, 256]);
        // shorter sequences work too
        let x = Tensor::<2, Int>::zeros([2, 5], &device);
        assert_eq!(model.forward(x).dims(), [2, 5, 256]);
        let specs = params::specs(&model);
        assert_eq!(params::total_len(&specs), cfg.num_params(), "{name}");
    }
}

#[test]
fn parameters_use_nanogpt_names_and_pytorch_layout() {
    let model = Gpt::new(&tiny(), &Device::flex());
    let specs = params::specs(&model);
    let by_name: HashMap<_, _> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    assert_eq!(by_name["transformer.wte.weight"].shape, vec![256, 32]);
    assert_eq!(by_name["transformer.wpe.weight"].shape, vec![32, 32]);
    assert_eq!(
        by_name["transformer.h.1.attn.c_attn.weight"].shape,
        vec![96, 32]
    );
    assert!(by_name["transformer.h.1.attn.c_attn.weight"].transposed);
    assert_eq!(
        by_name["transformer.h.0.mlp.c_proj.weight"].shape,
        vec![32, 128]
    );
    assert_eq!(by_name["transformer.h.0.ln_2.bias"].shape, vec![32]);
    assert_eq!(by_name["transformer.ln_f.weight"].shape, vec![32]);
    assert_eq!(specs.len(), 2 + 2 * 12 + 2);
    // offsets tile the flat vector
    let mut off = 0;
    for s in &specs {
        assert_eq!(s.offset, off);
        off += s.numel();
    }
}

#[test]
fn flat_vector_round_trips_and_bad_vectors_are_rejected() {
    let device = Device::flex();
    let model = Gpt::new(&tiny(), &device);
    let v = params::to_vec(&model);
    let other = Gpt::new(&tiny(), &device);
    assert_ne!(params::to_vec(&other), v);
    let other = params::load_vec(other, &v).unwrap();
    assert_eq!(params::to_vec(&other), v);
    let short = params::load_vec(Gpt::new(&tiny(), &device), &v[1..]).unwrap_err();
    assert!(short.to_string().contains("values"), "{short}");
    let mut nan = v.clone();
    nan[5] = f32::NAN;
    assert!(params::load_vec(Gpt::new(&tiny(), &device), &nan).is_err());
}

fn quick_config(steps: usize) -> TrainConfig {
    let mut t = TrainConfig::nanogpt(steps);
    t.batch_size = 8;
    t.lr = 3e-3;
    t.min_lr = 3e-4;
    t
}

#[test]
fn training_lowers_validation_loss_on_the_default_corpus() {
    let device = Device::flex();
    let corpus = Corpus::from_text(&default_corpus(), tiny().block_size).unwrap();
    let mut tr = Trainer::new(tiny(), quick_config(150), &device).unwrap();
    let before = common::read(tr.validation_loss(&corpus, 8, 8))[0];
    assert!(
        (before - (256f32).ln()).abs() < 0.3,
        "initial loss {before} is not ~ln(256)"
    );
    for _ in 0..150 {
        let b = corpus.batch(Split::Train, tr.batch_key(0), 8, tiny().block_size);
        tr.step(&b);
    }
    let after = common::read(tr.validation_loss(&corpus, 8, 8))[0];
    assert!(
        after < 2.6,
        "validation loss only went from {before} to {after}"
    );
    assert_eq!(tr.step, 150);
    assert_eq!(tr.tokens, 150 * 8 * 32);
}

#[test]
fn checkpoint_round_trip_and_resume_continue_exactly() {
    let device = Device::flex();
    let corpus = Corpus::from_text(&default_corpus(), tiny().block_size).unwrap();
    let run = |tr: &mut Trainer, n: usize| {
        for _ in 0..n {
            let b = corpus.batch(Split::Train, tr.batch_key(0), 8, tiny().block_size);
            tr.step(&b);
        }
    };
    // Straight run of 20 steps. (Initial weights are shared explicitly: burn's device RNG is
    // global, so tests running in parallel could otherwise interleave their draws.)
    let mut straight = Trainer::new(tiny(), quick_config(20), &device).unwrap();
    let init = params::to_vec(straight.model());
    run(&mut straight, 20);

    // 10 steps, checkpoint to bytes, fresh trainer from the bytes, 10 more.
    let mut first = Trainer::with_weights(tiny(), quick_config(20), &device, &init).unwrap();
    run(&mut first, 10);
    let specs = params::specs(first.model());
    let weights =
        checkpoint::weights_to_safetensors(&specs, &params::to_vec(first.model()), HashMap::new())
            .unwrap();
    let optim = checkpoint::optimizer_to_safetensors(&specs, first.optimizer()).unwrap();
    let (step, tokens) = (first.step, first.tokens);
    drop(first);

    let fresh = Trainer::new(tiny(), quick_config(20), &device).unwrap();
    let values = checkpoint::weights_from_safetensors(&specs, &weights).unwrap();
    let model = params::load_vec(fresh.into_model(), &values).unwrap();
    let optim = checkpoint::optimizer_from_safetensors(&specs, &optim, &device).unwrap();
    assert_eq!(optim.step, 10);
    let mut resumed = Trainer::from_parts(
        model,
        optim,
        tiny(),
        quick_config(20),
        device.clone().autodiff(),
        step,
        tokens,
    );
    run(&mut resumed, 10);

    assert_eq!(resumed.step, straight.step);
    assert_eq!(resumed.tokens, straight.tokens);
    assert_eq!(
        params::to_vec(resumed.model()),
        params::to_vec(straight.model()),
        "resume diverged"
    );
}

#[test]
fn corrupt_checkpoints_are_rejected_with_a_reason() {
    let device = Device::flex();
    let model = Gpt::new(&tiny(), &device);
    let specs = params::specs(&model);
    let bytes = checkpoint::weights_to_safetensors(&specs, &params::to_vec(&model), HashMap::new())
        .unwrap();
    let e = checkpoint::weights_from_safetensors(&specs, &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(e.to_string().starts_with("checkpoint:"), "{e}");
    let baby = Gpt::new(&ModelConfig::named("baby").unwrap(), &device);
    let e = checkpoint::weights_from_safetensors(&params::specs(&baby), &bytes).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
}

#[test]
fn a_fragment_trains_alone_and_the_rest_stays_frozen() {
    let device = Device::flex();
    let model = Gpt::new(&tiny(), &device);
    let specs = params::specs(&model);
    let n = params::total_len(&specs);
    // Two blocks: one fragment each, the embeddings with the first, ln_f with the last.
    let frags = params::fragments(&specs, tiny().n_layer, 2).unwrap();
    assert_eq!(frags.len(), 2);
    assert_eq!((frags[0].start, frags[1].end), (0, n));
    assert_eq!(frags[0].end, frags[1].start);
    let first_of = |prefix: &str| specs.iter().find(|s| s.name.starts_with(prefix)).unwrap();
    assert!(frags[0].contains(&first_of("transformer.wte").offset));
    assert!(frags[0].contains(&first_of("transformer.h.0.").offset));
    assert!(frags[1].contains(&first_of("transformer.h.1.").offset));
    assert!(frags[1].contains(&first_of("transformer.ln_f").offset));
    assert_eq!(params::fragments(&specs, 2, 1).unwrap(), vec![0..n]);
    assert!(params::fragments(&specs, 2, 3).is_err());
    assert!(params::fragments(&specs, 2, 0).is_err());

    let init = params::to_vec(&model);
    let corpus = Corpus::from_text(&default_corpus(), tiny().block_size).unwrap();
    for (i, frag) in frags.iter().enumerate() {
        let mut tr = Trainer::with_weights(tiny(), quick_config(5), &device, &init).unwrap();
        tr.train_only(frag.clone()).unwrap();
        for _ in 0..5 {
            let b = corpus.batch(Split::Train, tr.batch_key(0), 8, tiny().block_size);
            tr.step(&b);
        }
        let after = params::to_vec(tr.model());
        let moved =
            |r: std::ops::Range<usize>| r.into_iter().filter(|&j| after[j] != init[j]).count();
        assert_eq!(
            moved(0..frag.start) + moved(frag.end..n),
            0,
            "fragment {i}: frozen weights moved"
        );
        assert!(
            moved(frag.clone()) > frag.len() / 2,
            "fragment {i}: its weights did not train"
        );
        // Frozen parameters cost no optimizer memory.
        for (s, m) in specs.iter().zip(&tr.optimizer().moments) {
            let inside = frag.contains(&s.offset);
            assert_eq!(m.is_some(), inside, "fragment {i}: moments of {}", s.name);
        }
    }
    let mut tr = Trainer::with_weights(tiny(), quick_config(5), &device, &init).unwrap();
    assert!(tr.train_only(n..n + 1).is_err());
}

/// The backends' random generators are process-wide; a seeded model built while other threads
/// build models (a test binary, the relay's verifier beside its trainer) must still be the one
/// its seed names.
#[test]
fn the_same_seed_gives_the_same_model_while_other_threads_build_models() {
    let device = Device::flex();
    let seeded = || {
        let mut t = TrainConfig::nanogpt(1);
        t.seed = 7;
        params::to_vec(Trainer::new(tiny(), t, &device).unwrap().model())
    };
    let expected = seeded();
    let done = std::sync::atomic::AtomicBool::new(false);
    let changed = std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    Gpt::new(&tiny(), &device);
                }
            });
        }
        let changed = (0..20).filter(|_| seeded() != expected).count();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        changed
    });
    assert_eq!(
        changed, 0,
        "of 20 seeded models built beside others, {changed} changed"
    );
}
