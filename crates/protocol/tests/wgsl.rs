//! The WGSL quantizers (`shaders/quantize.wgsl`, `shaders/ternary.wgsl` and
//! `shaders/sparse.wgsl`, run on a wgpu device: lavapipe on a machine without a GPU) against
//! the CPU encoders of the int8, int4, ternary and sparse codecs, and the sparse codec's error
//! feedback kept on the device against the host's.
//!
//! The contract: the relay applies the *decoded* values, whoever encoded them. WGSL does not
//! promise a correctly rounded division, so a GPU may put a scale one ulp off the CPU's and move
//! a code that sits on a rounding tie by one; every decoded value must still lie within half a
//! step (plus that ulp) of the value encoded, non-finite chunks must be refused, and the bytes
//! must have the codec's exact layout. How many bytes match the CPU's is printed.

use tessera_core::burn::prelude::*;
use tessera_core::kernels::quantize::{self, Format};
use tessera_protocol::feedback::ErrorFeedback;
use tessera_protocol::messages::WorkUnit;
use tessera_protocol::sparse::SPARSE_CHUNK;
use tessera_protocol::update::{
    Codec, Fragment, INT4_CHUNK, INT8_CHUNK, Payload, TERNARY_CHUNK, TERNARY_DEAD_ZONE,
};

/// The wgpu device, initialised once for the process (a second `init` is refused).
fn wgpu_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            Device::wgpu_options().init().unwrap_or_else(|e| {
                panic!("no wgpu adapter ({e:?}); on Debian install mesa-vulkan-drivers (lavapipe)")
            })
        })
        .clone()
}

/// Deterministic values whose magnitude changes from chunk to chunk (1e-6 .. 1e2), with exact
/// rounding ties, a zero chunk and repeated extremes planted.
fn values(n: usize, chunk: usize, qmax: f32) -> Vec<f32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v: Vec<f32> = (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let magnitude = 10f32.powi((i / chunk % 9) as i32 - 6);
            u * magnitude
        })
        .collect();
    // A chunk of zeros.
    if n > 3 * chunk {
        v[2 * chunk..3 * chunk].fill(0.0);
    }
    // Values exactly on a tie of a chunk whose absmax is qmax (scale 1): k + 0.5.
    if n > 5 * chunk {
        let c = &mut v[4 * chunk..5 * chunk];
        for (j, e) in c.iter_mut().enumerate() {
            *e = (j % (2 * qmax as usize)) as f32 - qmax + 0.5;
        }
        c[0] = qmax;
        c[1] = -qmax;
    }
    v
}

fn gpu_payload(device: &Device, codec: Codec, format: Format, values: &[f32]) -> Payload {
    let t = Tensor::<1>::from_floats(values, device);
    let q = quantize::quantize(t, format).expect("a wgpu device quantizes");
    assert_eq!(q.len(), values.len());
    let (scales, codes) = q.read().expect("read back");
    Payload::from_quantized(codec, values.len(), &scales, codes).expect("the codec's layout")
}

/// How many bytes of the GPU's payload equal the CPU's at the same place.
fn identical_bytes(gpu: &Payload, cpu: &Payload) -> usize {
    gpu.data
        .iter()
        .zip(&cpu.data)
        .filter(|(a, b)| a == b)
        .count()
}

fn check(device: &Device, codec: Codec, format: Format, qmax: f32, n: usize) {
    let v = values(n, format.chunk, qmax);
    let gpu = gpu_payload(device, codec, format, &v);
    let cpu = Payload::encode(codec, &v);
    assert_eq!(gpu.data.len(), cpu.data.len(), "{codec}, {n} values: sizes");
    let chunks = n.div_ceil(format.chunk);
    let same = identical_bytes(&gpu, &cpu);
    let decoded = gpu.decode().expect("the relay decodes the GPU's bytes");
    let mut worst = 0f64;
    for (c, (vals, dec)) in v
        .chunks(format.chunk)
        .zip(decoded.chunks(format.chunk))
        .enumerate()
    {
        let s = &gpu.data[4 * c..4 * c + 4];
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let cpu_scale = f32::from_le_bytes(cpu.data[4 * c..4 * c + 4].try_into().unwrap());
        assert!(
            (scale - cpu_scale).abs() <= cpu_scale * 2.5e-7,
            "{codec} chunk {c}: GPU scale {scale} vs CPU {cpu_scale}"
        );
        for (x, d) in vals.iter().zip(dec) {
            let err = (x - d).abs() as f64;
            let bound = scale as f64 * (0.5 + 1e-6) + 1e-30;
            assert!(
                err <= bound,
                "{codec} chunk {c}: {x} decodes to {d} (scale {scale})"
            );
            worst = worst.max(err / scale.max(f32::MIN_POSITIVE) as f64);
        }
    }
    println!(
        "{codec}: {n} values in {chunks} chunks, {same} of {} bytes as the CPU encodes them \
         ({:.4}%), worst error {worst:.4} steps",
        cpu.data.len(),
        100.0 * same as f64 / cpu.data.len() as f64
    );
}

#[test]
fn wgsl_int8_and_int4_decode_within_half_a_step_like_the_cpu_encoders() {
    let device = wgpu_device();
    // Sizes off the chunk grid; int4 with an odd count (a padding nibble).
    check(
        &device,
        Codec::Int8,
        Format::INT8,
        127.0,
        37 * INT8_CHUNK + 13,
    );
    check(&device, Codec::Int4, Format::INT4, 7.0, 41 * INT4_CHUNK + 7);
    // More chunks than one dispatch dimension holds (65,535): the y dimension is used.
    check(
        &device,
        Codec::Int4,
        Format::INT4,
        7.0,
        70_000 * INT4_CHUNK + 3,
    );
    // Tiny inputs.
    check(&device, Codec::Int8, Format::INT8, 127.0, 1);
    check(&device, Codec::Int4, Format::INT4, 7.0, 3);
}

/// The GPU's ternary bytes against the CPU's for `n` values: the same layout; each chunk's
/// scale within f32 summation error of the CPU's (f64); every value at the same level, except
/// ones within that error of the dead zone's edge.
fn check_ternary(device: &Device, n: usize) {
    let v = values(n, TERNARY_CHUNK, 7.0);
    let gpu = gpu_payload(device, Codec::Ternary, Format::TERNARY, &v);
    let cpu = Payload::encode(Codec::Ternary, &v);
    let (dg, dc) = (
        gpu.decode().expect("the relay decodes the GPU's bytes"),
        cpu.decode().unwrap(),
    );
    let mut edge = 0;
    for (c, ((vals, g), k)) in v
        .chunks(TERNARY_CHUNK)
        .zip(dg.chunks(TERNARY_CHUNK))
        .zip(dc.chunks(TERNARY_CHUNK))
        .enumerate()
    {
        let scale = |p: &Payload| f32::from_le_bytes(p.data[4 * c..4 * c + 4].try_into().unwrap());
        let (gs, cs) = (scale(&gpu), scale(&cpu));
        assert!(
            (gs - cs).abs() <= cs * 1e-5,
            "chunk {c}: GPU scale {gs} vs CPU {cs}"
        );
        let mean = vals.iter().map(|x| f64::from(x.abs())).sum::<f64>() / vals.len() as f64;
        let dead = mean * TERNARY_DEAD_ZONE;
        for ((x, a), b) in vals.iter().zip(g).zip(k) {
            let (ga, cb) = (
                (a / gs.max(f32::MIN_POSITIVE)).round(),
                (b / cs.max(f32::MIN_POSITIVE)).round(),
            );
            if ga != cb {
                assert!(
                    (f64::from(x.abs()) - dead).abs() <= dead * 1e-5,
                    "chunk {c}: {x} is {ga} on the GPU and {cb} on the CPU (dead zone {dead})"
                );
                edge += 1;
            }
        }
    }
    let same = identical_bytes(&gpu, &cpu);
    println!(
        "ternary: {n} values, GPU {} bytes / CPU {} bytes, {same} identical, {edge} values at \
         the dead zone's edge sent differently",
        gpu.data.len(),
        cpu.data.len()
    );
}

#[test]
fn wgsl_ternary_sends_the_values_the_cpu_encoder_sends() {
    let device = wgpu_device();
    assert_eq!(Format::TERNARY.chunk, TERNARY_CHUNK);
    assert_eq!(
        f64::from(tessera_core::kernels::quantize::TERNARY_DEAD_ZONE),
        TERNARY_DEAD_ZONE
    );
    // Off the chunk and word grid (a partial word and chunk), and tiny inputs.
    for n in [37 * TERNARY_CHUNK + 45, 3 * TERNARY_CHUNK, 1000, 33, 1] {
        check_ternary(&device, n);
    }
}

#[test]
fn wgsl_marks_a_non_finite_chunk_and_the_decoder_refuses_it() {
    let device = wgpu_device();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for (codec, format) in [
            (Codec::Int8, Format::INT8),
            (Codec::Int4, Format::INT4),
            (Codec::Ternary, Format::TERNARY),
        ] {
            let mut v = vec![0.25f32; 3 * format.chunk];
            v[format.chunk + 5] = bad;
            let p = gpu_payload(&device, codec, format, &v);
            let err = p.decode().expect_err("a non-finite update is refused");
            assert!(err.to_string().contains("chunk 1"), "{codec} {bad}: {err}");
        }
    }
}

#[test]
fn quantize_declines_a_cpu_device() {
    let t = Tensor::<1>::from_floats([1.0, 2.0].as_slice(), &Device::flex());
    assert!(quantize::quantize(t, Format::INT8).is_none());
    assert!(!tessera_protocol::work::encodes_on_device(
        Codec::Int8,
        &Device::flex()
    ));
}

/// A unit of run `seed` with `codec`, as far as error feedback looks at it.
fn unit(seed: u64, codec: Codec) -> WorkUnit {
    WorkUnit {
        unit_id: 1,
        base_version: 0,
        shard: 0,
        inner_steps: 1,
        batch_size: 1,
        lr: 1e-3,
        warmup_steps: 0,
        seed,
        fragment: Fragment::ALL,
        codec,
        deadline_ms: 0,
    }
}

/// `feedback`'s sparse payload of `delta` encoded on the device, read back and settled.
fn sparse_on_device(feedback: &mut ErrorFeedback, unit: &WorkUnit, delta: &[f32]) -> Payload {
    let t = Tensor::<1>::from_floats(delta, &wgpu_device());
    let q = feedback
        .sparse_on_device(unit, t)
        .expect("a wgpu device encodes sparse updates");
    let Codec::Sparse { k } = unit.codec else {
        unreachable!()
    };
    let p = Payload::from_sparse_words(k, delta.len(), &q.read().expect("read back"))
        .expect("the codec's layout");
    feedback.settle(&p);
    p
}

/// The sparse test values: `values`' chunk-wise magnitudes, plus chunks of ties (a run of
/// equal magnitudes of both signs, and a chunk all equal) that only the index order separates.
fn sparse_values(n: usize) -> Vec<f32> {
    let mut v = values(n, SPARSE_CHUNK, 7.0);
    if n > 7 * SPARSE_CHUNK {
        let c = &mut v[6 * SPARSE_CHUNK..7 * SPARSE_CHUNK];
        for (j, e) in c.iter_mut().enumerate() {
            *e = if j % 3 == 0 { 0.5 } else { -0.5 } * if j % 64 < 40 { 1.0 } else { 0.25 };
        }
        v[7 * SPARSE_CHUNK..(8 * SPARSE_CHUNK).min(n)].fill(-0.125);
    }
    v
}

#[test]
fn wgsl_sparse_keeps_the_values_the_cpu_encoder_keeps() {
    assert_eq!(quantize::SPARSE_CHUNK, SPARSE_CHUNK);
    // Off the chunk grid, a short last chunk keeping fewer than k, tiny inputs; k from 1 to
    // the kernel's largest, odd and even (indices two a word, codes sixteen).
    for (n, k) in [
        (9 * SPARSE_CHUNK + 1234, 64),
        (9 * SPARSE_CHUNK, 1),
        (8 * SPARSE_CHUNK + 17, 255),
        (3 * SPARSE_CHUNK + 100, quantize::SPARSE_MAX_K),
        (100, 64),
        (1, 3),
    ] {
        let v = sparse_values(n);
        let codec = Codec::Sparse { k };
        let gpu = sparse_on_device(&mut ErrorFeedback::new(0.0), &unit(1, codec), &v);
        let cpu = Payload::encode(codec, &v);
        assert_eq!(gpu.data.len(), cpu.data.len(), "{codec}, {n} values: sizes");
        let same = identical_bytes(&gpu, &cpu);
        let (g, c) = (gpu.decode().expect("decodes"), cpu.decode().unwrap());
        // The same values kept, the same signs and levels; a level may differ by WGSL's
        // division (not required to be correctly rounded): a few ulps.
        let mut worst = 0f32;
        for (i, (a, b)) in g.iter().zip(&c).enumerate() {
            assert_eq!(
                *a == 0.0,
                *b == 0.0,
                "{codec}, {n} values: value {i} kept by one"
            );
            assert_eq!(
                a.is_sign_negative(),
                b.is_sign_negative(),
                "value {i}'s sign"
            );
            worst = worst.max((a - b).abs() / b.abs().max(f32::MIN_POSITIVE));
        }
        assert!(
            worst <= 4.0 * f32::EPSILON,
            "{codec}: levels {worst:e} apart"
        );
        println!(
            "{codec}: {n} values, {same} of {} bytes as the CPU encodes them, levels at most \
             {worst:e} apart (relative)",
            cpu.data.len()
        );
    }
}

#[test]
fn error_feedback_kept_on_the_device_carries_what_the_host_carries() {
    let n = 5 * SPARSE_CHUNK + 321;
    let codec = Codec::Sparse { k: 16 };
    let (mut on_gpu, mut on_host) = (ErrorFeedback::default(), ErrorFeedback::default());
    // Three units of one run, then a unit of a new run: the residual is carried, then dropped.
    let deltas: Vec<Vec<f32>> = (0..4)
        .map(|u| {
            sparse_values(n + u)[u..]
                .iter()
                .map(|x| x * (1.0 + u as f32))
                .collect()
        })
        .collect();
    for (u, delta) in deltas.iter().enumerate() {
        let unit = unit(if u < 3 { 7 } else { 8 }, codec);
        let gpu = sparse_on_device(&mut on_gpu, &unit, delta)
            .decode()
            .unwrap();
        let cpu = on_host.encode(&unit, delta).decode().unwrap();
        assert!(on_gpu.on_device());
        let (mut kept_by_one, mut worst) = (0, 0f64);
        for (a, b) in gpu.iter().zip(&cpu) {
            kept_by_one += usize::from((*a == 0.0) != (*b == 0.0));
            worst = worst.max(f64::from((a - b).abs()));
        }
        let (g, h) = (on_gpu.norm(), on_host.norm());
        println!(
            "unit {u}: {kept_by_one} values kept by one side only, largest difference {worst:e}; \
             residual norm {g:.6} on the GPU, {h:.6} on the host"
        );
        // The device may fuse decay · residual + delta: what is carried matches to rounding,
        // and so do the values sent (a value on the edge of the k largest may swap).
        assert!(
            (g - h).abs() <= 1e-5 * h,
            "unit {u}: residual norms {g} vs {h}"
        );
        assert!(
            kept_by_one <= 2,
            "unit {u}: {kept_by_one} values kept by one side only"
        );
        if u == 0 || u == 3 {
            // Nothing carried into a run's first unit: exactly the plain encoding's values.
            assert_eq!(kept_by_one, 0, "unit {u}");
            assert!(worst <= 1e-6, "unit {u}: {worst:e}");
        }
        if u > 0 && u < 3 {
            assert!(h > 0.0);
        }
    }
    // A non-finite update is refused by the relay and leaves nothing to carry.
    let mut bad = deltas[3].clone();
    bad[SPARSE_CHUNK + 9] = f32::NAN;
    let p = sparse_on_device(&mut on_gpu, &unit(8, codec), &bad);
    let err = p.decode().expect_err("a non-finite update is refused");
    assert!(err.to_string().contains("chunk 1"), "{err}");
    assert!(!on_gpu.on_device());
    assert_eq!(on_gpu.norm(), 0.0);
}
