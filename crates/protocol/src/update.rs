//! Update payloads: a pseudo-gradient over a fragment of the flat parameter vector.

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::sparse::{SPARSE_CHUNK, SPARSE_DEFAULT_K, decode_sparse, encode_sparse};

/// A contiguous range of the flat parameter vector (in `tessera_core::params::specs` order).
/// Work units name the fragment they cover, so participants can train model shards; the
/// default covers every parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    /// First element.
    pub offset: u64,
    /// Number of elements; `u64::MAX` means "to the end".
    pub len: u64,
}

impl Fragment {
    /// The whole parameter vector.
    pub const ALL: Fragment = Fragment {
        offset: 0,
        len: u64::MAX,
    };

    /// The concrete `[start, end)` range for a vector of `total` elements, or an error if the
    /// fragment does not fit.
    pub fn range(&self, total: usize) -> Result<std::ops::Range<usize>, Error> {
        let start =
            usize::try_from(self.offset).map_err(|_| Error::BadUpdate("fragment offset".into()))?;
        let end = if self.len == u64::MAX {
            total
        } else {
            start
                .checked_add(self.len as usize)
                .ok_or_else(|| Error::BadUpdate("fragment overflows".into()))?
        };
        if start > end || end > total {
            return Err(Error::BadUpdate(format!(
                "fragment {start}..{end} outside the {total} parameters"
            )));
        }
        Ok(start..end)
    }
}

/// How a payload's values are encoded. The relay names it in every work unit; the decoded
/// values are the update (what the relay folds, what re-execution is compared with, what a
/// participant's error feedback subtracts), so encoders only need to be deterministic, not to
/// agree with each other bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Little-endian f32, one per element (4 bytes a value).
    F32,
    /// int8 with one absmax scale per 256 values ([`encode_int8`]): 1.016 bytes a value.
    Int8,
    /// 4-bit integers (`-7..=7`) with one absmax scale per 64 values ([`encode_int4`]):
    /// 0.5625 bytes a value.
    Int4,
    /// One sign bit a value with one scale per 64 values, the chunk's mean magnitude
    /// ([`encode_sign`]): 0.1875 bytes a value, 21× fewer than f32.
    Sign,
    /// Three levels a value (`-scale`, `0`, `+scale`) with one scale per 1,024 values: values
    /// at most the chunk's mean magnitude are sent as 0 ([`encode_ternary`]). A mask bit a
    /// value and a sign bit a value sent: ~0.18 bytes a value, ~22× fewer than f32.
    Ternary,
    /// The `k` largest of every 4096 values, 2 bits and an index each
    /// ([`crate::sparse::encode_sparse`]): 0.037 bytes a value at the default `k` = 64. Meant
    /// with the participant's error feedback ([`crate::feedback::ErrorFeedback`]).
    Sparse {
        /// Values kept per chunk of [`crate::sparse::SPARSE_CHUNK`].
        k: u16,
    },
}

impl Codec {
    /// The codec's name on the command line and in status (`f32`, `int8`, `sparse64`).
    pub fn name(self) -> String {
        match self {
            Codec::F32 => "f32".into(),
            Codec::Int8 => "int8".into(),
            Codec::Int4 => "int4".into(),
            Codec::Sign => "sign".into(),
            Codec::Ternary => "ternary".into(),
            Codec::Sparse { k } => format!("sparse{k}"),
        }
    }

    /// The codec named `name` (`sparse` alone keeps [`SPARSE_DEFAULT_K`]).
    pub fn parse(name: &str) -> Result<Codec, Error> {
        let bad = || {
            Error::BadUpdate(format!(
                "unknown codec {name:?} (f32, int8, int4, sign, ternary, sparse or sparseK with K in 1..={SPARSE_CHUNK})"
            ))
        };
        match name {
            "f32" => Ok(Codec::F32),
            "int8" => Ok(Codec::Int8),
            "int4" => Ok(Codec::Int4),
            "sign" => Ok(Codec::Sign),
            "ternary" => Ok(Codec::Ternary),
            "sparse" => Ok(Codec::Sparse {
                k: SPARSE_DEFAULT_K,
            }),
            other => {
                let k: u16 = other
                    .strip_prefix("sparse")
                    .and_then(|k| k.parse().ok())
                    .ok_or_else(bad)?;
                if k == 0 || usize::from(k) > SPARSE_CHUNK {
                    return Err(bad());
                }
                Ok(Codec::Sparse { k })
            }
        }
    }

    /// Whether decoding loses information (a participant keeps what it loses as error feedback).
    pub fn is_lossy(self) -> bool {
        !matches!(self, Codec::F32)
    }

    /// Why a re-execution of an honest unit cannot reproduce an update in this codec (so it
    /// cannot be verified), or `None` when it can.
    pub fn unverifiable(self) -> Option<&'static str> {
        match self {
            Codec::Sparse { .. } => Some(
                "a sparse update carries the participant's error feedback (what its earlier \
                 updates left out), which a re-execution cannot reproduce (measured: cosine \
                 0.03–0.39 with the re-execution, against the 0.99 required; BENCHMARKS.md)",
            ),
            Codec::F32 | Codec::Int8 | Codec::Int4 | Codec::Sign | Codec::Ternary => None,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Values per int8 chunk: each chunk of this many values shares one f32 scale.
pub const INT8_CHUNK: usize = 256;

/// The largest int8 scale a decoder accepts: every decoded value (`|q| ≤ 128`) stays finite.
pub const INT8_MAX_SCALE: f32 = f32::MAX / 128.0;

/// Adding then subtracting 1.5 × 2^23 rounds an f32 of magnitude below 2^22 to the nearest
/// integer, ties to even, in plain IEEE arithmetic: the same on every CPU and in WASM, and it
/// vectorises where `f32::round` is a libm call.
const ROUND: f32 = 12_582_912.0;

/// `x` (|x| < 2^22) rounded to the nearest integer, ties to even, as the low byte of its two's
/// complement: `x + ROUND` is `1.5 × 2^23 + round(x)` exactly, whose bits are those of
/// `0x4B40_0000 + round(x)` as integers. No float-to-integer conversion (Rust's saturating `as`
/// costs compares and blends on x86's SSE2, where this is an add and a pack).
fn rounded_low_byte(x: f32) -> u8 {
    (x + ROUND).to_bits() as u8
}

/// Largest magnitude in `vals` and whether every value is finite, in 8 lanes the compiler
/// vectorises (the finiteness test on the exponent bits).
fn absmax_finite(vals: &[f32]) -> (f32, bool) {
    let (mut m, mut bad) = ([0f32; 8], [0u32; 8]);
    let mut chunks = vals.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            let a = c[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
            bad[i] |= u32::from(c[i].to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
    }
    let mut max = m.iter().fold(0f32, |x, &y| if y > x { y } else { x });
    let mut finite = bad.iter().all(|&b| b == 0);
    for v in chunks.remainder() {
        finite &= v.is_finite();
        max = if v.abs() > max { v.abs() } else { max };
    }
    (max, finite)
}

/// Encodes `values` as int8 with one absmax scale per [`INT8_CHUNK`] values: the data is every
/// chunk's scale (`absmax / 127`, f32 LE), then every value as `v / scale` rounded to the
/// nearest integer (ties to even) in i8 (`-127..=127`). A chunk with a non-finite value gets a
/// NaN scale, which every decoder rejects.
pub fn encode_int8(values: &[f32]) -> Vec<u8> {
    let chunks = values.len().div_ceil(INT8_CHUNK);
    let mut data = vec![0u8; chunks * 4 + values.len()];
    let (scales, q) = data.split_at_mut(chunks * 4);
    for ((vals, out), scale_out) in values
        .chunks(INT8_CHUNK)
        .zip(q.chunks_mut(INT8_CHUNK))
        .zip(scales.chunks_exact_mut(4))
    {
        let (absmax, finite) = absmax_finite(vals);
        let scale = if finite { absmax / 127.0 } else { f32::NAN };
        scale_out.copy_from_slice(&scale.to_le_bytes());
        if scale > 0.0 && scale.is_finite() {
            let inv = 1.0 / scale;
            for (o, v) in out.iter_mut().zip(vals) {
                let x = (v * inv).clamp(-127.0, 127.0);
                *o = rounded_low_byte(x);
            }
        }
    }
    data
}

/// Splits the payload of a codec with one f32 scale per `chunk` values into its scales and its
/// `value_bytes` bytes of values, refusing any other size.
fn scales_and_values<'a>(
    codec: &str,
    data: &'a [u8],
    len: usize,
    chunk: usize,
    value_bytes: usize,
) -> Result<(&'a [u8], &'a [u8]), Error> {
    let chunks = len.div_ceil(chunk);
    let expected = chunks * 4 + value_bytes;
    if data.len() != expected {
        return Err(Error::BadUpdate(format!(
            "{codec} payload has {} bytes for {len} values ({chunks} scales of 4 bytes + \
             {value_bytes} bytes of values = {expected})",
            data.len()
        )));
    }
    Ok(data.split_at(chunks * 4))
}

/// Decodes int8 data of `len` values into `out` (replacing what it held, reusing its memory):
/// `q * scale`, in f32, which is the update's value (the relay folds exactly this; a
/// participant keeps `v - decoded` as its error). Every value is finite when every scale is in
/// `0..=INT8_MAX_SCALE`, which is checked.
fn decode_int8(data: &[u8], len: usize, out: &mut Vec<f32>) -> Result<(), Error> {
    let (scales, q) = scales_and_values("int8", data, len, INT8_CHUNK, len)?;
    out.clear();
    out.reserve(len);
    for (c, (vals, s)) in q.chunks(INT8_CHUNK).zip(scales.chunks_exact(4)).enumerate() {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !(0.0..=INT8_MAX_SCALE).contains(&scale) {
            out.clear();
            return Err(Error::BadUpdate(format!(
                "int8 chunk {c} has scale {scale} (must be finite, in 0..={INT8_MAX_SCALE})"
            )));
        }
        out.extend(vals.iter().map(|&b| f32::from(b as i8) * scale));
    }
    Ok(())
}

/// Values per int4 chunk: each chunk of this many values shares one f32 scale.
pub const INT4_CHUNK: usize = 64;

/// The largest int4 scale a decoder accepts: every decoded value (`|q| ≤ 7`) stays finite.
pub const INT4_MAX_SCALE: f32 = f32::MAX / 8.0;

/// Encodes `values` as 4-bit integers with one absmax scale per [`INT4_CHUNK`] values: every
/// chunk's scale (`absmax / 7`, f32 LE), then the values as `v / scale` rounded to the nearest
/// integer (ties to even) in `-7..=7`, two's complement nibbles, two a byte, the first in the
/// low nibble (an odd count leaves the last high nibble zero). A chunk with a non-finite value
/// gets a NaN scale, which every decoder rejects.
pub fn encode_int4(values: &[f32]) -> Vec<u8> {
    let chunks = values.len().div_ceil(INT4_CHUNK);
    let mut data = vec![0u8; chunks * 4 + values.len().div_ceil(2)];
    let (scales, q) = data.split_at_mut(chunks * 4);
    for ((vals, out), scale_out) in values
        .chunks(INT4_CHUNK)
        .zip(q.chunks_mut(INT4_CHUNK / 2))
        .zip(scales.chunks_exact_mut(4))
    {
        let (absmax, finite) = absmax_finite(vals);
        let scale = if finite { absmax / 7.0 } else { f32::NAN };
        scale_out.copy_from_slice(&scale.to_le_bytes());
        if scale > 0.0 && scale.is_finite() {
            let inv = 1.0 / scale;
            let nibble = |v: f32| {
                let x = (v * inv).clamp(-7.0, 7.0);
                rounded_low_byte(x) & 0x0f
            };
            for (o, pair) in out.iter_mut().zip(vals.chunks(2)) {
                *o = nibble(pair[0]) | pair.get(1).map_or(0, |&v| nibble(v) << 4);
            }
        }
    }
    data
}

/// Decodes int4 data of `len` values into `out`: `q * scale`. Refuses a wrong size, a scale
/// outside `0..=INT4_MAX_SCALE`, the nibble `-8` (never written) and a non-zero padding nibble.
fn decode_int4(data: &[u8], len: usize, out: &mut Vec<f32>) -> Result<(), Error> {
    let (scales, q) = scales_and_values("int4", data, len, INT4_CHUNK, len.div_ceil(2))?;
    if len % 2 == 1 && q[q.len() - 1] >> 4 != 0 {
        return Err(Error::BadUpdate("int4 padding nibble is not zero".into()));
    }
    out.clear();
    out.reserve(len);
    let value = |n: u8, scale: f32| f32::from(((n << 4) as i8) >> 4) * scale;
    for (c, (bytes, s)) in q
        .chunks(INT4_CHUNK / 2)
        .zip(scales.chunks_exact(4))
        .enumerate()
    {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !(0.0..=INT4_MAX_SCALE).contains(&scale) {
            out.clear();
            return Err(Error::BadUpdate(format!(
                "int4 chunk {c} has scale {scale} (must be finite, in 0..={INT4_MAX_SCALE})"
            )));
        }
        if bytes.iter().any(|&b| b & 0x0f == 8 || b >> 4 == 8) {
            out.clear();
            return Err(Error::BadUpdate(format!(
                "int4 chunk {c} holds -8, outside -7..=7"
            )));
        }
        let start = out.len();
        out.resize(start + 2 * bytes.len(), 0.0);
        let table: [f32; 16] = std::array::from_fn(|n| value(n as u8, scale));
        for (o, &b) in out[start..].chunks_exact_mut(2).zip(bytes) {
            o[0] = table[usize::from(b & 0x0f)];
            o[1] = table[usize::from(b >> 4)];
        }
    }
    out.truncate(len);
    Ok(())
}

/// Values per sign chunk: each chunk of this many values shares one f32 scale.
pub const SIGN_CHUNK: usize = 64;

/// Encodes `values` as one sign bit each with one scale per [`SIGN_CHUNK`] values: every
/// chunk's scale (the mean magnitude of its values, f32 LE, so a chunk keeps its L1 norm), then
/// the bits, eight a byte, the first value in the lowest bit, 1 for a negative value (an
/// incomplete last byte is padded with zero bits). A chunk with a non-finite value gets a NaN
/// scale, which every decoder rejects.
pub fn encode_sign(values: &[f32]) -> Vec<u8> {
    let chunks = values.len().div_ceil(SIGN_CHUNK);
    let mut data = vec![0u8; chunks * 4 + values.len().div_ceil(8)];
    let (scales, bits) = data.split_at_mut(chunks * 4);
    for (vals, (out, scale_out)) in values.chunks(SIGN_CHUNK).zip(
        bits.chunks_mut(SIGN_CHUNK / 8)
            .zip(scales.chunks_exact_mut(4)),
    ) {
        // The f64 sum of finite magnitudes is finite: a non-finite mean means a non-finite value.
        let mean = vals.iter().map(|v| f64::from(v.abs())).sum::<f64>() / vals.len() as f64;
        let scale = if mean.is_finite() {
            mean as f32
        } else {
            f32::NAN
        };
        scale_out.copy_from_slice(&scale.to_le_bytes());
        for (o, byte) in out.iter_mut().zip(vals.chunks(8)) {
            *o = byte
                .iter()
                .enumerate()
                .fold(0u8, |b, (i, v)| b | (u8::from(v.is_sign_negative()) << i));
        }
    }
    data
}

/// The largest sign scale a decoder accepts (a mean magnitude of finite f32 values).
pub const SIGN_MAX_SCALE: f32 = f32::MAX;

/// Decodes sign data of `len` values into `out`: `±scale`. Refuses a wrong size, a scale that
/// is negative or not finite, and non-zero padding bits.
fn decode_sign(data: &[u8], len: usize, out: &mut Vec<f32>) -> Result<(), Error> {
    let (scales, bits) = scales_and_values("sign", data, len, SIGN_CHUNK, len.div_ceil(8))?;
    if !len.is_multiple_of(8) && bits[bits.len() - 1] >> (len % 8) != 0 {
        return Err(Error::BadUpdate("sign padding bits are not zero".into()));
    }
    out.clear();
    out.reserve(len);
    for (c, (bytes, s)) in bits
        .chunks(SIGN_CHUNK / 8)
        .zip(scales.chunks_exact(4))
        .enumerate()
    {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !(0.0..=SIGN_MAX_SCALE).contains(&scale) {
            out.clear();
            return Err(Error::BadUpdate(format!(
                "sign chunk {c} has scale {scale} (must be finite and not negative)"
            )));
        }
        for &b in bytes {
            out.extend((0..8).map(|i| if b >> i & 1 == 1 { -scale } else { scale }));
        }
    }
    out.truncate(len);
    Ok(())
}

/// Values per ternary chunk: each chunk of this many values shares one f32 scale (a multiple
/// of 8, so a chunk's mask bits are whole bytes).
pub const TERNARY_CHUNK: usize = 1024;

/// The ternary dead zone, as a fraction of the chunk's mean magnitude: a value at most this far
/// from zero is sent as 0. Measured at H = 50 (BENCHMARKS.md): Ternary Weight Networks' 0.7
/// and 1.0 lose the same, 1.0 sends ~60% of the values as 0 where 0.7 sends ~45%, and 1.3
/// costs +1.3% of loss.
pub const TERNARY_DEAD_ZONE: f64 = 1.0;

/// Encodes `values` in three levels, `-scale`, `0`, `+scale`, with one scale per
/// [`TERNARY_CHUNK`] values. The data is every chunk's scale (f32 LE); then one bit a value,
/// set when it is not 0 (the mask); then one bit per value not 0, in order, set when it is
/// negative (the signs). Bits fill each byte from the lowest; bits after the last are 0. So a
/// value costs 1 bit, and 2 when it is sent: ~1.4 bits at the measured share of zeros.
///
/// A value is sent as 0 when its magnitude is at most [`TERNARY_DEAD_ZONE`] × the chunk's mean
/// magnitude. The scale is `Σ v² / Σ |v|`, the whole chunk's squares over the kept values'
/// magnitudes, so that the decoded chunk's projection on the true one has the true one's
/// length (`⟨q, v⟩ = ‖v‖²`): the coarse levels do not shrink the step the relay takes along
/// the participant's direction (the least-squares scale, `Σ |v| / kept`, shrinks it to ~0.8
/// and cost +4.8% of loss at H = 50; BENCHMARKS.md). A chunk with a non-finite value gets a
/// NaN scale, which every decoder rejects. Sums are in f64, in order: the same bytes on every
/// platform.
pub fn encode_ternary(values: &[f32]) -> Vec<u8> {
    let n = values.len();
    let chunks = n.div_ceil(TERNARY_CHUNK);
    let mut data = vec![0u8; chunks * 4 + n.div_ceil(8)];
    let (scales, mask) = data.split_at_mut(chunks * 4);
    let mut signs = Vec::with_capacity(n / 16);
    let (mut sign_byte, mut sign_bits) = (0u8, 0u32);
    for (c, (vals, scale_out)) in values
        .chunks(TERNARY_CHUNK)
        .zip(scales.chunks_exact_mut(4))
        .enumerate()
    {
        // The f64 sum of finite magnitudes is finite: a non-finite mean means a non-finite value.
        let mean = vals.iter().map(|v| f64::from(v.abs())).sum::<f64>() / vals.len() as f64;
        if !mean.is_finite() {
            scale_out.copy_from_slice(&f32::NAN.to_le_bytes());
            continue;
        }
        let dead = mean * TERNARY_DEAD_ZONE;
        let (mut kept, mut squares) = (0f64, 0f64);
        for (i, &v) in vals.iter().enumerate() {
            let a = f64::from(v.abs());
            squares += a * a;
            if a > dead {
                kept += a;
                let at = c * TERNARY_CHUNK + i;
                mask[at / 8] |= 1 << (at % 8);
                sign_byte |= u8::from(v < 0.0) << sign_bits;
                sign_bits += 1;
                if sign_bits == 8 {
                    signs.push(sign_byte);
                    (sign_byte, sign_bits) = (0, 0);
                }
            }
        }
        let scale = if kept > 0.0 {
            // At most ~2 × the chunk's largest magnitude: clamped for inputs near f32::MAX.
            (squares / kept).min(f64::from(f32::MAX)) as f32
        } else {
            0.0
        };
        scale_out.copy_from_slice(&scale.to_le_bytes());
    }
    if sign_bits > 0 {
        signs.push(sign_byte);
    }
    data.extend_from_slice(&signs);
    data
}

/// `DEPOSIT[m][w]`: the low bits of `w` moved, in order, to the places of `m`'s set bits
/// (x86's `pdep` on a byte): a mask byte's sign bits at their values' places.
static DEPOSIT: [[u8; 256]; 256] = {
    let mut table = [[0u8; 256]; 256];
    let mut m = 0;
    while m < 256 {
        let mut w = 0;
        while w < 256 {
            let (mut out, mut next, mut i) = (0u8, 0, 0);
            while i < 8 {
                if m >> i & 1 == 1 {
                    out |= ((w >> next & 1) as u8) << i;
                    next += 1;
                }
                i += 1;
            }
            table[m][w] = out;
            w += 1;
        }
        m += 1;
    }
    table
};

/// `BIT_BLOCKS[b][i]`: all ones when bit `i` of the byte `b` is set, else 0 (eight lanes that
/// select a value's bits without a branch).
static BIT_BLOCKS: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            table[b][i] = if b >> i & 1 == 1 { u32::MAX } else { 0 };
            i += 1;
        }
        b += 1;
    }
    table
};

/// Decodes ternary data of `len` values into `out`: `level × scale`. Refuses a payload shorter
/// than its scales and mask, sign bytes that do not match the mask's count of values sent,
/// mask or sign bits after the last that are not 0, and a scale that is negative or not
/// finite.
fn decode_ternary(data: &[u8], len: usize, out: &mut Vec<f32>) -> Result<(), Error> {
    let (chunks, mask_bytes) = (len.div_ceil(TERNARY_CHUNK), len.div_ceil(8));
    if data.len() < chunks * 4 + mask_bytes {
        return Err(Error::BadUpdate(format!(
            "ternary payload has {} bytes for {len} values (at least {chunks} scales of 4 bytes \
             + {mask_bytes} mask bytes)",
            data.len()
        )));
    }
    let (scales, rest) = data.split_at(chunks * 4);
    let (mask, signs) = rest.split_at(mask_bytes);
    if !len.is_multiple_of(8) && mask[mask_bytes - 1] >> (len % 8) != 0 {
        return Err(Error::BadUpdate(
            "ternary mask bits after the last value are not 0".into(),
        ));
    }
    let sent: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
    if signs.len() != sent.div_ceil(8) {
        return Err(Error::BadUpdate(format!(
            "ternary payload sends {sent} values and has {} sign bytes (needs {})",
            signs.len(),
            sent.div_ceil(8)
        )));
    }
    if !sent.is_multiple_of(8) && signs[signs.len() - 1] >> (sent % 8) != 0 {
        return Err(Error::BadUpdate(
            "ternary sign bits after the last value sent are not 0".into(),
        ));
    }
    // Written over in place: only a buffer's new tail is zeroed first.
    out.resize(mask_bytes * 8, 0.0);
    // Sign bits not yet used, lowest first: `have` of them in `bits`, refilled a byte at a
    // time from `signs[next..]` (the sizes were checked: every sent value has its bit).
    let (mut bits, mut have, mut next) = (0u64, 0u32, 0usize);
    for (c, ((mask, vals), sc)) in mask
        .chunks(TERNARY_CHUNK / 8)
        .zip(out.chunks_mut(TERNARY_CHUNK))
        .zip(scales.chunks_exact(4))
        .enumerate()
    {
        let scale = f32::from_le_bytes([sc[0], sc[1], sc[2], sc[3]]);
        if !(0.0..=f32::MAX).contains(&scale) {
            return Err(Error::BadUpdate(format!(
                "ternary chunk {c} has scale {scale} (must be finite and not negative)"
            )));
        }
        for (&m, eight) in mask.iter().zip(vals.chunks_exact_mut(8)) {
            if have < 8 {
                while have <= 56 && next < signs.len() {
                    bits |= u64::from(signs[next]) << have;
                    next += 1;
                    have += 8;
                }
            }
            // The byte's (up to 8) sign bits, each moved to its value's place.
            let neg = DEPOSIT[usize::from(m)][usize::from(bits as u8)];
            let used = m.count_ones();
            bits >>= used;
            have = have.saturating_sub(used);
            // 1.0 or 0.0 by the mask bit, its sign bit by the sign: no branch, vectorised.
            let (ones, negs) = (&BIT_BLOCKS[usize::from(m)], &BIT_BLOCKS[usize::from(neg)]);
            let values: [f32; 8] = std::array::from_fn(|i| {
                f32::from_bits(ones[i] & 0x3f80_0000 | negs[i] & 1 << 31) * scale
            });
            eight.copy_from_slice(&values);
        }
    }
    out.truncate(len);
    Ok(())
}

/// Appends the ternary mask and signs of `len` values given as (mask, signs) pairs of 32-bit
/// little-endian words, 32 values a pair (a GPU's layout): the mask bytes (bits after the last
/// value cleared), then the sign bits of the sent values only, one after another.
fn pack_ternary(len: usize, pairs: &[u8], data: &mut Vec<u8>) {
    let words = |half: std::ops::Range<usize>| {
        pairs
            .chunks_exact(8)
            .flat_map(move |pair| pair[half.clone()].iter().copied())
    };
    let mask_start = data.len();
    data.extend(words(0..4).take(len.div_ceil(8)));
    if !len.is_multiple_of(8)
        && let Some(last) = data.last_mut()
    {
        *last &= (1u8 << (len % 8)) - 1;
    }
    let mut signs = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for (&m, s) in data[mask_start..].iter().zip(words(4..8)) {
        // The sign bits of the byte's sent values, in order (the inverse of `DEPOSIT`).
        let mut rest = m;
        while rest != 0 {
            acc |= u64::from(s & rest & rest.wrapping_neg() != 0) << bits;
            bits += 1;
            rest &= rest - 1;
        }
        if bits >= 8 {
            signs.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        signs.push(acc as u8);
    }
    data.extend_from_slice(&signs);
}

/// An encoded pseudo-gradient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Encoding of `data`.
    pub codec: Codec,
    /// Number of elements it decodes to.
    pub len: u64,
    /// The encoded values.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Payload {
    /// Encodes `values` as f32.
    pub fn f32(values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Payload {
            codec: Codec::F32,
            len: values.len() as u64,
            data,
        }
    }

    /// Encodes `values` with `codec`.
    pub fn encode(codec: Codec, values: &[f32]) -> Self {
        match codec {
            Codec::F32 => Payload::f32(values),
            Codec::Int8 => Payload {
                codec,
                len: values.len() as u64,
                data: encode_int8(values),
            },
            Codec::Int4 => Payload {
                codec,
                len: values.len() as u64,
                data: encode_int4(values),
            },
            Codec::Sign => Payload {
                codec,
                len: values.len() as u64,
                data: encode_sign(values),
            },
            Codec::Ternary => Payload {
                codec,
                len: values.len() as u64,
                data: encode_ternary(values),
            },
            Codec::Sparse { k } => Payload {
                codec,
                len: values.len() as u64,
                data: encode_sparse(values, k),
            },
        }
    }

    /// The payload of `len` values quantized elsewhere (a GPU, by `tessera-core`'s
    /// `kernels::quantize`; sparse payloads come from [`Payload::from_sparse_words`]): the
    /// chunks' `scales`, then the `codes` bytes as the int8 or int4 codec lays them out, or for
    /// ternary a mask word and a sign word (little-endian) per 32 values, whose sent values'
    /// sign bits are packed here one after another. Only the sizes are checked here; the relay
    /// decodes it like any other.
    pub fn from_quantized(
        codec: Codec,
        len: usize,
        scales: &[f32],
        codes: Vec<u8>,
    ) -> Result<Self, Error> {
        let (chunk, code_bytes) = match codec {
            Codec::Int8 => (INT8_CHUNK, len),
            Codec::Int4 => (INT4_CHUNK, len.div_ceil(2)),
            Codec::Ternary => (TERNARY_CHUNK, 8 * len.div_ceil(32)),
            Codec::F32 | Codec::Sign | Codec::Sparse { .. } => {
                return Err(Error::BadUpdate(format!("{codec} has no device encoder")));
            }
        };
        if scales.len() != len.div_ceil(chunk) || codes.len() != code_bytes {
            return Err(Error::BadUpdate(format!(
                "{codec} of {len} values needs {} scales and {code_bytes} code bytes, got {} and {}",
                len.div_ceil(chunk),
                scales.len(),
                codes.len()
            )));
        }
        let mut data = Vec::with_capacity(scales.len() * 4 + codes.len());
        for s in scales {
            data.extend_from_slice(&s.to_le_bytes());
        }
        if codec == Codec::Ternary {
            pack_ternary(len, &codes, &mut data);
        } else {
            data.extend_from_slice(&codes);
        }
        Ok(Payload {
            codec,
            len: len as u64,
            data,
        })
    }

    /// The sparse payload of `len` values keeping `k` a chunk, from the words of
    /// `tessera-core`'s GPU sparse kernel (`kernels::quantize::SparseQuantized::read`). Only
    /// the size is checked here; the relay decodes it like any other.
    pub fn from_sparse_words(k: u16, len: usize, words: &[u8]) -> Result<Self, Error> {
        Ok(Payload {
            codec: Codec::Sparse { k },
            len: len as u64,
            data: crate::sparse::from_kernel_words(words, len, k)?,
        })
    }

    /// Decodes the values, checking the length and that every value is finite. Never panics,
    /// whatever the bytes and the claimed length.
    pub fn decode(&self) -> Result<Vec<f32>, Error> {
        let mut out = Vec::new();
        self.decode_into(&mut out)?;
        Ok(out)
    }

    /// [`Payload::decode`] into `out`, reusing its memory (a relay decodes every update into
    /// the same few buffers: writing into pages already touched costs a fraction of a fresh
    /// vector's first touch). On an error `out` is left empty.
    pub fn decode_into(&self, out: &mut Vec<f32>) -> Result<(), Error> {
        let decoded = self.decode_values(out);
        if decoded.is_err() {
            out.clear();
        }
        decoded
    }

    /// [`Payload::decode_into`], which empties `out` on an error. Each codec replaces what
    /// `out` held (ternary writes over it in place: a reused buffer of the right length is not
    /// written twice).
    fn decode_values(&self, out: &mut Vec<f32>) -> Result<(), Error> {
        // No codec spends less than 11 bytes on 4096 values: a claimed length beyond that is
        // refused before anything is allocated.
        let len = usize::try_from(self.len)
            .ok()
            .filter(|&n| n <= (self.data.len() / 11 + 1).saturating_mul(SPARSE_CHUNK))
            .ok_or_else(|| {
                Error::BadUpdate(format!(
                    "payload claims {} values in {} bytes",
                    self.len,
                    self.data.len()
                ))
            })?;
        match self.codec {
            // Finite by construction (the scales are checked).
            Codec::Int8 => decode_int8(&self.data, len, out),
            Codec::Int4 => decode_int4(&self.data, len, out),
            Codec::Sign => decode_sign(&self.data, len, out),
            Codec::Ternary => decode_ternary(&self.data, len, out),
            Codec::Sparse { k } => decode_sparse(&self.data, len, k, out),
            Codec::F32 => {
                if self.data.len() != len * 4 {
                    return Err(Error::BadUpdate(format!(
                        "payload has {} bytes for {} f32 values",
                        self.data.len(),
                        self.len
                    )));
                }
                out.clear();
                out.reserve(len);
                out.extend(
                    self.data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                if let Some(i) = out.iter().position(|x| !x.is_finite()) {
                    out.clear();
                    return Err(Error::BadUpdate(format!("value {i} is not finite")));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rounded_low_byte_is_the_integer_rounded_ties_to_even() {
        let mut x = -127.75f32;
        while x <= 127.75 {
            for x in [x, -x, x + 0.5, x - 0.5, f32::from_bits(x.to_bits() + 1)] {
                let want = x.round_ties_even() as i32 as i8 as u8;
                assert_eq!(rounded_low_byte(x), want, "{x}");
            }
            x += 0.125;
        }
        for x in [
            0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 127.0, -127.0,
        ] {
            assert_eq!(
                rounded_low_byte(x),
                x.round_ties_even() as i32 as i8 as u8,
                "{x}"
            );
        }
    }

    #[test]
    fn fragments_resolve_or_fail_clearly() {
        assert_eq!(Fragment::ALL.range(10).unwrap(), 0..10);
        assert_eq!(Fragment { offset: 2, len: 3 }.range(10).unwrap(), 2..5);
        assert!(Fragment { offset: 8, len: 3 }.range(10).is_err());
        assert!(
            Fragment {
                offset: 11,
                len: u64::MAX
            }
            .range(10)
            .is_err()
        );
    }

    #[test]
    fn int8_round_trips_within_half_a_step_of_each_chunk_scale() {
        let mut x = 7u64;
        let values: Vec<f32> = (0..1000)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Chunks of very different magnitudes, and one all-zero chunk.
                if (256..512).contains(&i) {
                    0.0
                } else {
                    u * 10f32.powi(i / 256 - 3)
                }
            })
            .collect();
        let p = Payload::encode(Codec::Int8, &values);
        assert_eq!(p.data.len(), 4 * 4 + 1000);
        let d = p.decode().unwrap();
        for (c, (v, d)) in values
            .chunks(INT8_CHUNK)
            .zip(d.chunks(INT8_CHUNK))
            .enumerate()
        {
            let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in v.iter().zip(d) {
                assert!(
                    (a - b).abs() <= absmax / 254.0 * 1.0001,
                    "chunk {c}: {a} vs {b}"
                );
            }
            if absmax > 0.0 {
                assert!(
                    d.iter().any(|b| b.abs() == absmax),
                    "chunk {c} keeps its absmax"
                );
            }
        }
        // Deterministic: the same values encode to the same bytes.
        assert_eq!(Payload::encode(Codec::Int8, &values), p);
        assert_eq!(
            Payload::encode(Codec::Int8, &[]).decode().unwrap(),
            Vec::<f32>::new()
        );
    }

    #[test]
    fn int8_rejects_bad_scales_lengths_and_non_finite_input() {
        let p = Payload::encode(Codec::Int8, &[1.0, -2.0, 3.0]);
        for bad in [
            Payload {
                len: 4,
                ..p.clone()
            },
            Payload {
                len: 2,
                ..p.clone()
            },
            Payload {
                len: u64::MAX,
                ..p.clone()
            },
            Payload {
                data: p.data[..6].to_vec(),
                ..p.clone()
            },
            Payload::encode(Codec::Int8, &[1.0, f32::NAN]),
            Payload::encode(Codec::Int8, &[f32::INFINITY]),
        ] {
            assert!(bad.decode().is_err(), "{bad:?}");
        }
        let mut negative = p.clone();
        negative.data[..4].copy_from_slice(&(-1f32).to_le_bytes());
        assert!(negative.decode().unwrap_err().to_string().contains("scale"));
        let huge = Payload {
            codec: Codec::F32,
            len: u64::MAX / 2,
            data: vec![0; 8],
        };
        assert!(huge.decode().is_err());
    }

    /// Why the decoder refuses `p` with `change` made to its bytes (panics if it accepts).
    fn refusal(p: &Payload, change: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut bad = p.clone();
        change(&mut bad.data);
        bad.decode().unwrap_err().to_string()
    }

    /// A codec with f32 scales first: its first scale made negative, or a byte short, refused.
    fn refuses_a_negative_scale_and_a_short_payload(p: &Payload) {
        assert!(refusal(p, |d| d[..4].copy_from_slice(&(-1f32).to_le_bytes())).contains("scale"));
        refusal(p, |d| {
            d.pop();
        });
    }

    #[test]
    fn sign_keeps_every_sign_and_each_chunk_s_mean_magnitude() {
        // 150 values: two full chunks and a partial one of 22 (padding bits in the last byte).
        let values: Vec<f32> = (0..150)
            .map(|i| {
                let m = [0.5f32, 3.0, 0.0][i / 64];
                if i % 3 == 0 {
                    -m * (1.0 + (i % 7) as f32)
                } else {
                    m * (i % 5) as f32
                }
            })
            .collect();
        let p = Payload::encode(Codec::Sign, &values);
        assert_eq!(p.data.len(), 3 * 4 + 150usize.div_ceil(8));
        let d = p.decode().unwrap();
        assert_eq!(d.len(), 150);
        for (v, d) in values.chunks(SIGN_CHUNK).zip(d.chunks(SIGN_CHUNK)) {
            let l1 = |x: &[f32]| x.iter().map(|a| a.abs()).sum::<f32>();
            assert!((l1(v) - l1(d)).abs() <= 1e-4 * l1(v).max(1.0));
            for (a, b) in v.iter().zip(d) {
                assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} -> {b}");
            }
        }
        // The all-zero chunk decodes to zeros.
        assert!(d[128..].iter().all(|&x| x == 0.0));
        // A non-finite value poisons its chunk's scale: refused.
        assert!(
            Payload::encode(Codec::Sign, &[1.0, f32::INFINITY])
                .decode()
                .is_err()
        );
        // Padding bits, a negative scale, a wrong size: refused.
        refusal(&p, |d| *d.last_mut().unwrap() |= 0x80);
        refuses_a_negative_scale_and_a_short_payload(&p);
        assert_eq!(Codec::parse("sign").unwrap(), Codec::Sign);
    }

    #[test]
    fn ternary_keeps_the_large_values_signs_and_drops_the_dead_zone() {
        // 2,500 values: two full chunks and a partial one of 452 (mask padding bits).
        let values: Vec<f32> = (0..2500)
            .map(|i| {
                let m = [0.5f32, 3.0, 0.0][i / TERNARY_CHUNK];
                let v = m * ((i * 7919) % 97) as f32 / 97.0;
                if i % 3 == 0 { -v } else { v }
            })
            .collect();
        let p = Payload::encode(Codec::Ternary, &values);
        let mut sent = 0;
        let d = p.decode().unwrap();
        assert_eq!(d.len(), 2500);
        for (v, d) in values.chunks(TERNARY_CHUNK).zip(d.chunks(TERNARY_CHUNK)) {
            let mean = v.iter().map(|a| f64::from(a.abs())).sum::<f64>() / v.len() as f64;
            let kept: Vec<f32> = v
                .iter()
                .filter(|a| f64::from(a.abs()) > TERNARY_DEAD_ZONE * mean)
                .map(|a| a.abs())
                .collect();
            sent += kept.len();
            let squares: f32 = v.iter().map(|a| a * a).sum();
            let scale = squares / kept.iter().sum::<f32>().max(f32::MIN_POSITIVE);
            // The decoded chunk's projection on the true one has the true one's length.
            let dot: f32 = v.iter().zip(d).map(|(a, b)| a * b).sum();
            assert!(
                (dot - squares).abs() <= 1e-4 * squares.max(1e-30),
                "{dot} vs {squares}"
            );
            for (a, b) in v.iter().zip(d) {
                if f64::from(a.abs()) > TERNARY_DEAD_ZONE * mean {
                    assert!((b.abs() - scale).abs() <= 1e-5 * scale, "{a} -> {b}");
                    assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} -> {b}");
                } else {
                    assert_eq!(*b, 0.0, "{a} is in the dead zone");
                }
            }
        }
        // Scales, one mask bit a value, one sign bit a value sent (here not a multiple of 8).
        assert_ne!(sent % 8, 0, "the test covers sign padding bits");
        assert_eq!(
            p.data.len(),
            3 * 4 + 2500usize.div_ceil(8) + sent.div_ceil(8)
        );
        // Decoded over a reused buffer (ternary writes in place) of another length and stale
        // values: the same values; after an error the buffer is empty.
        for stale in [vec![7.5f32; 2500], vec![-1.0; 4000], vec![3.0; 10]] {
            let mut reused = stale;
            p.decode_into(&mut reused).unwrap();
            assert_eq!(reused, d);
            let mut bad = p.clone();
            bad.data[0..4].copy_from_slice(&(-1f32).to_le_bytes());
            assert!(bad.decode_into(&mut reused).is_err());
            assert!(reused.is_empty());
        }
        let mut reused = vec![1.0f32; 5];
        let claims_too_many = Payload {
            len: u64::MAX,
            ..p.clone()
        };
        assert!(claims_too_many.decode_into(&mut reused).is_err());
        assert!(
            reused.is_empty(),
            "emptied on any error, the claimed length's too"
        );
        // The all-zero chunk decodes to zeros; the same values encode to the same bytes.
        assert!(d[2 * TERNARY_CHUNK..].iter().all(|&x| x == 0.0));
        assert_eq!(Payload::encode(Codec::Ternary, &values), p);
        // A non-finite value poisons its chunk's scale: refused.
        assert!(
            Payload::encode(Codec::Ternary, &[1.0, f32::NAN])
                .decode()
                .is_err()
        );
        // Padding bits set in the mask or the signs, a mask bit more or less than the sign
        // bytes hold, a negative scale, a wrong size: refused.
        let mask_end = 12 + 2500usize.div_ceil(8);
        assert!(refusal(&p, |d| d[mask_end - 1] |= 0x80).contains("mask bits after"));
        assert!(refusal(&p, |d| *d.last_mut().unwrap() |= 0x80).contains("sign bits after"));
        let mut fewer = p.clone();
        let i = (12..mask_end).find(|&i| fewer.data[i] != 0).unwrap();
        fewer.data[i] &= fewer.data[i] - 1;
        fewer.data.truncate(fewer.data.len() - 1);
        assert!(
            fewer
                .decode()
                .unwrap_err()
                .to_string()
                .contains("sign bytes")
        );
        assert!(refusal(&p, |d| d[12..16].fill(!0)).contains("sign"));
        assert!(refusal(&p, |d| d.truncate(mask_end - 1)).contains("at least"));
        refuses_a_negative_scale_and_a_short_payload(&p);
        assert_eq!(Codec::parse("ternary").unwrap(), Codec::Ternary);
    }

    proptest::proptest! {
        /// Whatever the bytes and the claimed length, decoding answers: values or an error,
        /// never a panic, and never a non-finite value.
        #[test]
        fn decoders_never_panic(
            which in 0u8..6,
            k in proptest::prop_oneof![1u16..8, proptest::num::u16::ANY],
            len in proptest::prop_oneof![0u64..2000, 4000u64..9000, proptest::num::u64::ANY],
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..2100),
        ) {
            let codec = [Codec::F32, Codec::Int8, Codec::Int4, Codec::Sparse { k }, Codec::Sign, Codec::Ternary][usize::from(which)];
            if let Ok(v) = (Payload { codec, len, data }).decode() {
                proptest::prop_assert_eq!(v.len() as u64, len);
                proptest::prop_assert!(v.iter().all(|x| x.is_finite()));
            }
        }

        /// A sparse payload decodes to at most `k` values a chunk, each with the sign of the
        /// value it stands for and no larger than the chunk's largest; the ones it keeps are
        /// at least as large as the ones it drops. Any single flipped byte decodes to values
        /// that are finite, or is refused.
        #[test]
        fn sparse_keeps_the_largest(
            values in proptest::collection::vec(-1e3f32..1e3, 0..9000),
            k in 1u16..300,
            flip in proptest::num::usize::ANY,
        ) {
            let p = Payload::encode(Codec::Sparse { k }, &values);
            let d = p.decode().unwrap();
            proptest::prop_assert_eq!(d.len(), values.len());
            for (v, d) in values.chunks(SPARSE_CHUNK).zip(d.chunks(SPARSE_CHUNK)) {
                let kept: Vec<usize> = (0..d.len()).filter(|&i| d[i] != 0.0).collect();
                proptest::prop_assert!(kept.len() <= usize::from(k));
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let smallest_kept = kept.iter().map(|&i| v[i].abs()).fold(f32::INFINITY, f32::min);
                for (i, (a, b)) in v.iter().zip(d).enumerate() {
                    if *b != 0.0 {
                        proptest::prop_assert!(a.signum() == b.signum() && b.abs() <= max);
                    } else if kept.len() == usize::from(k) {
                        proptest::prop_assert!(v[i].abs() <= smallest_kept);
                    }
                }
            }
            if !p.data.is_empty() {
                let mut bad = p.clone();
                bad.data[flip % p.data.len()] ^= 0x5a;
                if let Ok(v) = bad.decode() {
                    proptest::prop_assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }

        /// Every lossy codec decodes what it encodes, also when values tie: `m`, `-m` and 0
        /// only (a chunk whose largest values share one magnitude).
        #[test]
        fn every_codec_decodes_what_it_encodes_ties_included(
            m in proptest::sample::select(vec![0.0048f32, 1e-3, 0.1, 3.3, 7e-5, 1e-7, 1e3]),
            levels in proptest::collection::vec(0u8..3, 0..9000),
            k in 1u16..300,
        ) {
            let values: Vec<f32> = levels.iter().map(|l| [0.0, m, -m][usize::from(*l)]).collect();
            for codec in [Codec::Int8, Codec::Int4, Codec::Sign, Codec::Ternary, Codec::Sparse { k }] {
                let d = Payload::encode(codec, &values).decode();
                proptest::prop_assert!(d.is_ok(), "{}: {:?}", codec.name(), d);
                proptest::prop_assert_eq!(d.unwrap().len(), values.len());
            }
        }

        /// ternary: every value outside its chunk's dead zone comes back as its sign times
        /// the chunk's scale, every other as 0 (the decoder's bit tricks against the rule).
        #[test]
        fn ternary_sends_the_signs_outside_the_dead_zone(
            values in proptest::collection::vec(-1e3f32..1e3, 0..2300),
        ) {
            let p = Payload::encode(Codec::Ternary, &values);
            let d = p.decode().unwrap();
            proptest::prop_assert_eq!(d.len(), values.len());
            for (c, (v, d)) in values.chunks(TERNARY_CHUNK).zip(d.chunks(TERNARY_CHUNK)).enumerate() {
                let mean = v.iter().map(|a| f64::from(a.abs())).sum::<f64>() / v.len() as f64;
                let scale = f32::from_le_bytes(p.data[c * 4..c * 4 + 4].try_into().unwrap());
                for (a, b) in v.iter().zip(d) {
                    let want = if f64::from(a.abs()) > TERNARY_DEAD_ZONE * mean {
                        if *a < 0.0 { -scale } else { scale }
                    } else {
                        0.0
                    };
                    proptest::prop_assert_eq!(*b, want);
                }
            }
        }

        /// int4: within half a step of each chunk's scale, the absmax kept exactly.
        #[test]
        fn int4_error_is_bounded(values in proptest::collection::vec(-1e6f32..1e6, 0..300)) {
            let p = Payload::encode(Codec::Int4, &values);
            proptest::prop_assert_eq!(p.data.len(), values.len().div_ceil(64) * 4 + values.len().div_ceil(2));
            let d = p.decode().unwrap();
            proptest::prop_assert_eq!(d.len(), values.len());
            for (v, d) in values.chunks(INT4_CHUNK).zip(d.chunks(INT4_CHUNK)) {
                let step = v.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0;
                for (a, b) in v.iter().zip(d) {
                    proptest::prop_assert!((a - b).abs() <= step * 0.5001 + f32::MIN_POSITIVE);
                }
            }
        }

        /// Encoded values decode to within half a quantisation step.
        #[test]
        fn int8_error_is_bounded(values in proptest::collection::vec(-1e6f32..1e6, 0..700)) {
            let d = Payload::encode(Codec::Int8, &values).decode().unwrap();
            proptest::prop_assert_eq!(d.len(), values.len());
            for (v, d) in values.chunks(INT8_CHUNK).zip(d.chunks(INT8_CHUNK)) {
                let step = v.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (a, b) in v.iter().zip(d) {
                    proptest::prop_assert!((a - b).abs() <= step * 0.5001 + f32::MIN_POSITIVE);
                }
            }
        }
    }

    #[test]
    fn int4_refuses_what_it_never_writes() {
        let p = Payload::encode(Codec::Int4, &[1.0, -7.0, 3.5]);
        // Scale 1, then nibbles 1 | -7 << 4, then 4 (3.5 rounds to even) and a zero pad.
        assert_eq!(p.data, [0, 0, 0x80, 0x3f, 0x91, 0x04]);
        assert_eq!(p.decode().unwrap(), vec![1.0, -7.0, 4.0]);
        for (at, byte) in [(5, 0x14), (4, 0x98), (3, 0xff)] {
            let mut bad = p.clone();
            bad.data[at] = byte;
            assert!(bad.decode().is_err(), "{:?}", bad.data);
        }
        assert!(
            Payload {
                len: 5,
                ..p.clone()
            }
            .decode()
            .is_err()
        );
        assert!(Payload::encode(Codec::Int4, &[f32::NAN]).decode().is_err());
        assert_eq!(Codec::parse("int4").unwrap(), Codec::Int4);
    }

    #[test]
    fn payload_round_trips_and_rejects_bad_data() {
        let p = Payload::f32(&[1.0, -2.5, 0.0]);
        assert_eq!(p.decode().unwrap(), vec![1.0, -2.5, 0.0]);
        let mut short = p.clone();
        short.data.pop();
        assert!(short.decode().is_err());
        assert!(
            Payload::f32(&[f32::NAN])
                .decode()
                .unwrap_err()
                .to_string()
                .contains("finite")
        );
    }
}
