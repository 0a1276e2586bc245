//! The WGSL quantizers (`shaders/quantize.wgsl` and `shaders/ternary.wgsl`, run on a wgpu
//! device: lavapipe on a machine without a GPU) against the CPU encoders of the int8, int4 and
//! ternary codecs.
//!
//! The contract: the relay applies the *decoded* values, whoever encoded them. WGSL does not
//! promise a correctly rounded division, so a GPU may put a scale one ulp off the CPU's and move
//! a code that sits on a rounding tie by one; every decoded value must still lie within half a
//! step (plus that ulp) of the value encoded, non-finite chunks must be refused, and the bytes
//! must have the codec's exact layout. How many bytes match the CPU's is printed.

use tessera_core::burn::prelude::*;
use tessera_core::kernels::quantize::{self, Format};
use tessera_protocol::update::{
    Codec, INT4_CHUNK, INT8_CHUNK, Payload, TERNARY_CHUNK, TERNARY_DEAD_ZONE,
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
