//! What a GPU participant pays to turn its update into bytes: the pseudo-gradient read back in
//! f32 and encoded on the CPU, against the WGSL quantizers on the device (int8, int4, ternary;
//! sparse with the participant's error feedback, on the host against on the device) and only
//! the encoded bytes read back; memcpy of the f32 vector for scale. Side by side in one run.
//!
//!     cargo run --release -p tessera-protocol --example device_encode_bench [values] [repeats]
//!
//! Defaults: 10,823,424 values (the small config's parameters), best of 10.

use std::time::Instant;

use tessera_core::burn::prelude::*;
use tessera_core::kernels::quantize::{self, Format};
use tessera_protocol::feedback::ErrorFeedback;
use tessera_protocol::messages::WorkUnit;
use tessera_protocol::update::{Codec, Fragment, Payload};

fn best(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map_or(10_823_424, |a| a.parse().expect("values"));
    let repeats: usize = args.get(2).map_or(10, |a| a.parse().expect("repeats"));
    let device = Device::wgpu_options().init().expect("a wgpu adapter");
    let host: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 2001) as f32 * 1e-4 - 0.1)
        .collect();
    let on_device = Tensor::<1>::from_floats(host.as_slice(), &device);
    let mb = (n * 4) as f64 / 1e6;
    let rate = |s: f64| format!("{:>8.1} ms {:>8.0} MB/s", s * 1e3, mb / s);

    let mut copy = vec![0f32; n];
    let memcpy = best(repeats, || copy.copy_from_slice(&host));
    println!("{n} values ({mb:.1} MB of f32), best of {repeats}");
    println!(
        "memcpy (host)                                {}",
        rate(memcpy)
    );
    let readback = best(repeats, || {
        let v: Vec<f32> = (on_device.clone() + 0.0).into_data().try_to_vec().unwrap();
        std::hint::black_box(v);
    });
    println!(
        "f32 read back (device to host)               {}",
        rate(readback)
    );
    for (codec, format) in [
        (Codec::Int8, Format::INT8),
        (Codec::Int4, Format::INT4),
        (Codec::Ternary, Format::TERNARY),
    ] {
        let cpu = best(repeats, || {
            let v: Vec<f32> = (on_device.clone() + 0.0).into_data().try_to_vec().unwrap();
            std::hint::black_box(Payload::encode(codec, &v));
        });
        let mut bytes = 0;
        let gpu = best(repeats, || {
            let q = quantize::quantize(on_device.clone() + 0.0, format).unwrap();
            let (scales, codes) = q.read().unwrap();
            let p = Payload::from_quantized(codec, n, &scales, codes).unwrap();
            bytes = p.data.len();
            std::hint::black_box(p);
        });
        println!(
            "{codec}: read f32 + CPU encode                {}",
            rate(cpu)
        );
        println!(
            "{codec}: WGSL encode + read {:>6.2} MB          {}  ({:.2}x)",
            bytes as f64 / 1e6,
            rate(gpu),
            cpu / gpu
        );
    }
    // Sparse (SparseLoCo's top-k) with error feedback: the residual carried on the host
    // (read f32 back, add it, encode, decode, subtract) against carried on the device.
    let codec = Codec::Sparse { k: 64 };
    let unit = WorkUnit {
        unit_id: 1,
        base_version: 0,
        shard: 0,
        inner_steps: 1,
        batch_size: 1,
        lr: 1e-3,
        warmup_steps: 0,
        seed: 1,
        fragment: Fragment::ALL,
        codec,
        deadline_ms: 0,
    };
    let mut on_host = ErrorFeedback::default();
    let cpu = best(repeats, || {
        let v: Vec<f32> = (on_device.clone() + 0.0).into_data().try_to_vec().unwrap();
        std::hint::black_box(on_host.encode(&unit, &v));
    });
    let mut on_gpu = ErrorFeedback::default();
    let mut bytes = 0;
    let gpu = best(repeats, || {
        let q = on_gpu
            .sparse_on_device(&unit, on_device.clone() + 0.0)
            .unwrap();
        let p = Payload::from_sparse_words(64, n, &q.read().unwrap()).unwrap();
        on_gpu.settle(&p);
        bytes = p.data.len();
        std::hint::black_box(p);
    });
    println!(
        "{codec}: read f32 + CPU encode, residual on the host {}",
        rate(cpu)
    );
    println!(
        "{codec}: WGSL encode + read {:>6.2} MB, residual on the GPU {}  ({:.2}x)",
        bytes as f64 / 1e6,
        rate(gpu),
        cpu / gpu
    );
}
