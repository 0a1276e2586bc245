//! What each codec costs on the machine that runs it: encode and decode (into a reused buffer,
//! as the relay decodes) throughput, beside a copy of the same values, timed by the caller's
//! clock. One function for the native benchmarks and the tab (WASM), so their figures are of
//! the same work.

use std::hint::black_box;

use serde::Serialize;

use crate::update::{Codec, Payload};

/// The codecs measured: every lossy one the relay can name for a unit.
pub const MEASURED: [Codec; 5] = [
    Codec::Int8,
    Codec::Int4,
    Codec::Sign,
    Codec::Ternary,
    Codec::Sparse { k: 64 },
];

/// One codec's figures, in MB/s of the f32 values it stands for (4 bytes a value).
#[derive(Debug, Clone, Serialize)]
pub struct CodecThroughput {
    /// The codec's name (`int8`, `sparse64`).
    pub codec: String,
    /// Encoded bytes for the values.
    pub bytes: usize,
    /// Encoding, best of the repetitions.
    pub encode_mb_s: f64,
    /// Decoding into a reused buffer, best of the repetitions.
    pub decode_mb_s: f64,
}

/// Every codec's figures and a copy's, of the same values.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Values measured.
    pub values: usize,
    /// Copying them (`copy_from_slice` into another buffer), best of the repetitions.
    pub memcpy_mb_s: f64,
    /// One entry per codec of [`MEASURED`].
    pub codecs: Vec<CodecThroughput>,
}

/// Measures [`MEASURED`] on `values` (best of `reps` ≥ 1 each); `now_ms` is the caller's clock
/// in milliseconds.
pub fn measure(values: &[f32], reps: usize, now_ms: impl Fn() -> f64) -> Throughput {
    let mb = values.len() as f64 * 4.0 / 1e6;
    let best = |f: &mut dyn FnMut()| {
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let t = now_ms();
            f();
            best = best.min(now_ms() - t);
        }
        // A clock coarser than the work (a browser's may be 0.1 ms or worse) gives 0: keep the
        // rate finite.
        mb / (best.max(1e-3) / 1e3)
    };
    let mut copy = vec![0f32; values.len()];
    let memcpy_mb_s = best(&mut || {
        copy.copy_from_slice(black_box(values));
        black_box(&copy);
    });
    drop(copy);
    let mut buf = Vec::with_capacity(values.len());
    let codecs = MEASURED
        .iter()
        .map(|&codec| {
            let encoded = Payload::encode(codec, values);
            let encode_mb_s = best(&mut || {
                black_box(Payload::encode(codec, black_box(values)));
            });
            let decode_mb_s = best(&mut || {
                black_box(&encoded)
                    .decode_into(&mut buf)
                    .expect("a codec decodes what it encoded");
                black_box(&buf);
            });
            CodecThroughput {
                codec: codec.name(),
                bytes: encoded.data.len(),
                encode_mb_s,
                decode_mb_s,
            }
        })
        .collect();
    Throughput {
        values: values.len(),
        memcpy_mb_s,
        codecs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_is_measured_and_its_bytes_are_its_encoding() {
        let values: Vec<f32> = (0..10_000)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
            .collect();
        let start = std::time::Instant::now();
        let t = measure(&values, 2, || start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(t.values, values.len());
        assert_eq!(t.codecs.len(), MEASURED.len());
        for (c, codec) in t.codecs.iter().zip(MEASURED) {
            assert_eq!(c.codec, codec.name());
            assert_eq!(c.bytes, Payload::encode(codec, &values).data.len());
            assert!(c.encode_mb_s > 0.0 && c.decode_mb_s.is_finite(), "{c:?}");
        }
        assert!(t.memcpy_mb_s > 0.0);
    }
}
