//! Aggregation throughput: MB/s of f32 pseudo-gradient of the `small` config folded into a
//! round's average, against memcpy bandwidth measured in the same run; and the int8 codec's
//! encode (a participant's CPU), decode, and decode + fold (the relay: into a fresh vector, and
//! into a reused buffer as the relay does now), and the sparse, int4 and ternary codecs', in
//! MB/s of the f32 values they stand for; then every codec's encode and decode on noise
//! (one line each).
//!
//!     cargo run --release -p tessera-coordinator --example aggregate_bench

use std::hint::black_box;
use std::time::Instant;

use tessera_coordinator::aggregate::{fold, fold_le_bytes, nesterov_step};
use tessera_core::config::ModelConfig;
use tessera_protocol::throughput;
use tessera_protocol::update::{Codec, Payload};

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let n = ModelConfig::named("small")
        .expect("small config")
        .num_params();
    let bytes = (n * 4) as f64;
    let delta: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-6).collect();
    let wire: Vec<u8> = delta.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut sum = vec![0f32; n];
    let mut dst = vec![0f32; n];
    let reps = 20;

    let memcpy = best_of(reps, || {
        dst.copy_from_slice(black_box(&delta));
        black_box(&dst);
    });
    let fold_f32 = best_of(reps, || {
        fold(&mut sum, black_box(&delta), 0.25);
        black_box(&sum);
    });
    let fold_wire = best_of(reps, || {
        fold_le_bytes(&mut sum, black_box(&wire), 0.25);
        black_box(&sum);
    });
    let mut params = vec![0f32; n];
    let mut mom = vec![0f32; n];
    let outer = best_of(reps, || {
        nesterov_step(&mut params, &mut mom, black_box(&sum), 0.7, 0.9);
        black_box(&params);
    });
    // What a fresh vector of that size costs before any arithmetic: its first touch.
    let first_touch = best_of(reps, || {
        let mut v = vec![0f32; n];
        v.fill(1.0);
        black_box(&v);
    });
    // The relay's own path: decode the submission's payload, then fold it.
    let f32_payload = Payload::f32(&delta);
    let f32_decode_fold = best_of(reps, || {
        let d = black_box(&f32_payload).decode().expect("f32 decodes");
        fold(&mut sum, &d, 0.25);
        black_box(&sum);
    });
    let int8 = Payload::encode(Codec::Int8, &delta);
    let encode = best_of(reps, || {
        black_box(Payload::encode(Codec::Int8, black_box(&delta)));
    });
    let decode = best_of(reps, || {
        black_box(black_box(&int8).decode().expect("int8 decodes"));
    });
    let decode_fold = best_of(reps, || {
        let d = black_box(&int8).decode().expect("int8 decodes");
        fold(&mut sum, &d, 0.25);
        black_box(&sum);
    });
    // The relay's path since it keeps a few decode buffers: decode into one already touched.
    let mut buf = Vec::new();
    let int8_reused = best_of(reps, || {
        black_box(&int8)
            .decode_into(&mut buf)
            .expect("int8 decodes");
        fold(&mut sum, &buf, 0.25);
        black_box(&sum);
    });
    let f32_reused = best_of(reps, || {
        black_box(&f32_payload)
            .decode_into(&mut buf)
            .expect("f32 decodes");
        fold(&mut sum, &buf, 0.25);
        black_box(&sum);
    });
    let int4 = Payload::encode(Codec::Int4, &delta);
    let int4_encode = best_of(reps, || {
        black_box(Payload::encode(Codec::Int4, black_box(&delta)));
    });
    let int4_reused = best_of(reps, || {
        black_box(&int4)
            .decode_into(&mut buf)
            .expect("int4 decodes");
        fold(&mut sum, &buf, 0.25);
        black_box(&sum);
    });
    let sparse = Payload::encode(Codec::Sparse { k: 64 }, &delta);
    let sparse_encode = best_of(5, || {
        black_box(Payload::encode(Codec::Sparse { k: 64 }, black_box(&delta)));
    });
    let sparse_reused = best_of(reps, || {
        black_box(&sparse)
            .decode_into(&mut buf)
            .expect("sparse decodes");
        fold(&mut sum, &buf, 0.25);
        black_box(&sum);
    });
    let ternary = Payload::encode(Codec::Ternary, &delta);
    let ternary_encode = best_of(reps, || {
        black_box(Payload::encode(Codec::Ternary, black_box(&delta)));
    });
    let ternary_reused = best_of(reps, || {
        black_box(&ternary)
            .decode_into(&mut buf)
            .expect("ternary decodes");
        fold(&mut sum, &buf, 0.25);
        black_box(&sum);
    });
    let mbs = |t: f64| bytes / t / 1e6;
    println!(
        "{{\"params\": {n}, \"memcpy_mb_s\": {:.0}, \"fold_f32_mb_s\": {:.0}, \"fold_wire_mb_s\": {:.0}, \"ratio_fold_wire_vs_memcpy\": {:.2}, \"ratio_fold_f32_vs_memcpy\": {:.2}, \"outer_step_ms\": {:.2}, \"fresh_vector_first_touch_mb_s\": {:.0}, \"f32_decode_fold_mb_s\": {:.0}, \"int8_bytes\": {}, \"int8_encode_mb_s\": {:.0}, \"int8_decode_mb_s\": {:.0}, \"int8_decode_fold_mb_s\": {:.0}, \"ratio_int8_decode_fold_vs_memcpy\": {:.2}, \"int8_decode_into_reused_fold_mb_s\": {:.0}, \"ratio_int8_reused_vs_memcpy\": {:.2}, \"f32_decode_into_reused_fold_mb_s\": {:.0}, \"ratio_f32_reused_vs_memcpy\": {:.2}, \"sparse64_bytes\": {}, \"sparse64_encode_mb_s\": {:.0}, \"sparse64_decode_into_reused_fold_mb_s\": {:.0}, \"ratio_sparse64_reused_vs_memcpy\": {:.2}, \"int4_bytes\": {}, \"int4_encode_mb_s\": {:.0}, \"int4_decode_into_reused_fold_mb_s\": {:.0}, \"ratio_int4_reused_vs_memcpy\": {:.2}, \"ternary_bytes\": {}, \"ternary_encode_mb_s\": {:.0}, \"ternary_decode_into_reused_fold_mb_s\": {:.0}, \"ratio_ternary_reused_vs_memcpy\": {:.2}}}",
        mbs(memcpy),
        mbs(fold_f32),
        mbs(fold_wire),
        memcpy / fold_wire,
        memcpy / fold_f32,
        outer * 1e3,
        mbs(first_touch),
        mbs(f32_decode_fold),
        int8.data.len(),
        mbs(encode),
        mbs(decode),
        mbs(decode_fold),
        memcpy / decode_fold,
        mbs(int8_reused),
        memcpy / int8_reused,
        mbs(f32_reused),
        memcpy / f32_reused,
        sparse.data.len(),
        mbs(sparse_encode),
        mbs(sparse_reused),
        memcpy / sparse_reused,
        int4.data.len(),
        mbs(int4_encode),
        mbs(int4_reused),
        memcpy / int4_reused,
        ternary.data.len(),
        mbs(ternary_encode),
        mbs(ternary_reused),
        memcpy / ternary_reused,
    );
    // Every codec again on values without a pattern (uniform noise: which values a ternary
    // or sparse chunk sends is a branch predictor's worst case, as in a real pseudo-gradient,
    // where the ramp above repeats every 1,000 values), measured as the browser bench does.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noisy: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-3
        })
        .collect();
    let start = Instant::now();
    let t = throughput::measure(&noisy, reps, || start.elapsed().as_secs_f64() * 1e3);
    for c in t.codecs {
        println!(
            "{{\"noisy\": \"{}\", \"bytes\": {}, \"encode_mb_s\": {:.0}, \"decode_mb_s\": {:.0}, \"memcpy_mb_s\": {:.0}}}",
            c.codec, c.bytes, c.encode_mb_s, c.decode_mb_s, t.memcpy_mb_s
        );
    }
}
