//! The sparse codec: in every chunk of [`SPARSE_CHUNK`] values, only the `k` largest in
//! magnitude, each sent as its index and two bits (sign, and which of the chunk's two
//! magnitudes), as SparseLoCo does. What it leaves out is not lost when the participant keeps
//! it as error feedback ([`crate::feedback::ErrorFeedback`]) and adds it to its next update.
//!
//! Layout, chunk after chunk (a chunk of `n ≤ SPARSE_CHUNK` values keeps `m = min(k, n)`):
//! the two magnitudes `lo ≤ hi` (f32 LE), the `m` indices in the chunk (u16 LE, strictly
//! increasing), then the `m` two-bit codes packed four to a byte from the low bits (bit 0:
//! negative, bit 1: `hi`), unused bits zero. One encoding per input, so the decoder can refuse
//! everything else.

use crate::Error;

/// Values per chunk: each chunk keeps its own `k` values and two magnitudes.
pub const SPARSE_CHUNK: usize = 4096;

/// The `k` a plain `sparse` codec keeps per chunk (1.6%).
pub const SPARSE_DEFAULT_K: u16 = 64;

fn kept(n: usize, k: u16) -> usize {
    n.min(usize::from(k))
}

fn chunk_bytes(m: usize) -> usize {
    8 + 2 * m + m.div_ceil(4)
}

/// Bytes of a payload of `len` values, or `None` if that does not fit in memory.
pub fn sparse_bytes(len: usize, k: u16) -> Option<usize> {
    let full = len / SPARSE_CHUNK;
    let rest = len % SPARSE_CHUNK;
    let tail = if rest > 0 {
        chunk_bytes(kept(rest, k))
    } else {
        0
    };
    full.checked_mul(chunk_bytes(kept(SPARSE_CHUNK, k)))?
        .checked_add(tail)
}

/// Encodes `values` keeping the `k` largest magnitudes of each chunk (ties to the lower index).
/// The two magnitudes of a chunk are the means of its kept magnitudes below and at or above
/// their mean. A chunk with a non-finite value gets NaN magnitudes, which decoders refuse.
pub fn encode_sparse(values: &[f32], k: u16) -> Vec<u8> {
    let k = k.max(1);
    let mut out = Vec::with_capacity(sparse_bytes(values.len(), k).unwrap_or(0));
    let mut order: Vec<u16> = Vec::with_capacity(SPARSE_CHUNK);
    for vals in values.chunks(SPARSE_CHUNK) {
        let m = kept(vals.len(), k);
        order.clear();
        order.extend(0..vals.len() as u16);
        let larger = |a: &u16, b: &u16| {
            let (x, y) = (vals[*a as usize].abs(), vals[*b as usize].abs());
            y.total_cmp(&x).then(a.cmp(b))
        };
        if m < vals.len() {
            order.select_nth_unstable_by(m - 1, larger);
        }
        let picked = &mut order[..m];
        picked.sort_unstable();
        let finite = vals.iter().all(|v| v.is_finite());
        let mags = picked.iter().map(|&i| vals[i as usize].abs());
        let mean = mags.clone().sum::<f32>() / m as f32;
        let (mut lo, mut nlo, mut hi, mut nhi) = (0f32, 0u32, 0f32, 0u32);
        for a in mags {
            if a >= mean {
                hi += a;
                nhi += 1;
            } else {
                lo += a;
                nlo += 1;
            }
        }
        // Kept values of one magnitude can all fall under their f32 mean (rounding): then all
        // are sent low and `hi` is theirs too. `lo ≤ hi` holds whatever the rounding.
        let lo = (nlo > 0).then(|| lo / nlo as f32);
        let hi = if nhi > 0 {
            hi / nhi as f32
        } else {
            lo.unwrap_or(0.0)
        };
        let lo = lo.map_or(hi, |lo| lo.min(hi));
        let (lo, hi) = if finite {
            (lo, hi)
        } else {
            (f32::NAN, f32::NAN)
        };
        out.extend_from_slice(&lo.to_le_bytes());
        out.extend_from_slice(&hi.to_le_bytes());
        for &i in picked.iter() {
            out.extend_from_slice(&i.to_le_bytes());
        }
        for four in picked.chunks(4) {
            let mut byte = 0u8;
            for (j, &i) in four.iter().enumerate() {
                let v = vals[i as usize];
                let code = u8::from(v < 0.0) | (u8::from(v.abs() >= mean) << 1);
                byte |= code << (2 * j);
            }
            out.push(byte);
        }
    }
    out
}

/// The codec's bytes from the words the GPU's sparse kernel writes (`tessera-core`'s
/// `kernels::quantize::sparse`, little-endian): a fixed stride a chunk of the two magnitudes,
/// the indices two a word and the codes sixteen a word, of which a chunk keeping `m` values
/// uses the first `2m` and `ceil(m / 4)` bytes. Only the size is checked here.
pub(crate) fn from_kernel_words(words: &[u8], len: usize, k: u16) -> Result<Vec<u8>, Error> {
    let stride = 4 * tessera_core::kernels::quantize::sparse_stride(k);
    let index_words = usize::from(k).div_ceil(2);
    let chunks = len.div_ceil(SPARSE_CHUNK);
    if k == 0 || words.len() != chunks * stride {
        return Err(Error::BadUpdate(format!(
            "the sparse kernel's {} bytes do not hold {chunks} chunks keeping {k}",
            words.len()
        )));
    }
    let mut out = Vec::with_capacity(sparse_bytes(len, k).unwrap_or(0));
    for (c, w) in words.chunks_exact(stride).enumerate() {
        let n = (len - c * SPARSE_CHUNK).min(SPARSE_CHUNK);
        let m = kept(n, k);
        let (levels, rest) = w.split_at(8);
        let (indices, codes) = rest.split_at(4 * index_words);
        out.extend_from_slice(levels);
        out.extend_from_slice(&indices[..2 * m]);
        out.extend_from_slice(&codes[..m.div_ceil(4)]);
    }
    Ok(out)
}

/// Whether every chunk's two magnitudes are finite in sparse `data` of `len` values kept `k`
/// a chunk (what an encoder marks with NaN had a non-finite value). `false` for data of the
/// wrong size.
pub(crate) fn finite_magnitudes(data: &[u8], len: usize, k: u16) -> bool {
    if k == 0 || sparse_bytes(len, k) != Some(data.len()) {
        return false;
    }
    let mut at = 0;
    for c in 0..len.div_ceil(SPARSE_CHUNK) {
        let m = kept((len - c * SPARSE_CHUNK).min(SPARSE_CHUNK), k);
        let f = |i: usize| f32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        if !(f(at).is_finite() && f(at + 4).is_finite()) {
            return false;
        }
        at += chunk_bytes(m);
    }
    true
}

/// Decodes sparse data of `len` values kept `k` per chunk into `out`. Refuses a wrong size, magnitudes
/// that are not finite or not `0 ≤ lo ≤ hi`, indices out of the chunk or not increasing, and
/// stray bits; every decoded value is finite.
pub(crate) fn decode_sparse(
    data: &[u8],
    len: usize,
    k: u16,
    out: &mut Vec<f32>,
) -> Result<(), Error> {
    if k == 0 {
        return Err(Error::BadUpdate(
            "a sparse codec keeps at least 1 value per chunk".into(),
        ));
    }
    let expected = sparse_bytes(len, k);
    if expected != Some(data.len()) {
        return Err(Error::BadUpdate(format!(
            "sparse payload has {} bytes for {len} values kept {k} per {SPARSE_CHUNK} ({})",
            data.len(),
            expected.map_or("too many".into(), |e| format!("{e} expected")),
        )));
    }
    out.clear();
    out.resize(len, 0.0);
    let result = scatter(data, k, out);
    if result.is_err() {
        out.clear();
    }
    result
}

fn scatter(data: &[u8], k: u16, out: &mut [f32]) -> Result<(), Error> {
    let mut at = 0;
    for (c, o) in out.chunks_mut(SPARSE_CHUNK).enumerate() {
        let m = kept(o.len(), k);
        let bytes = &data[at..at + chunk_bytes(m)];
        at += bytes.len();
        let f = |i: usize| f32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (lo, hi) = (f(0), f(4));
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi) {
            return Err(Error::BadUpdate(format!(
                "sparse chunk {c} has magnitudes {lo}, {hi} (must be finite, 0 ≤ lo ≤ hi)"
            )));
        }
        let (idx, codes) = bytes[8..].split_at(2 * m);
        let mut prev: Option<u16> = None;
        for (j, ix) in idx.chunks_exact(2).enumerate() {
            let i = u16::from_le_bytes([ix[0], ix[1]]);
            if usize::from(i) >= o.len() || prev.is_some_and(|p| i <= p) {
                return Err(Error::BadUpdate(format!(
                    "sparse chunk {c}: index {i} out of the chunk's {} or not increasing",
                    o.len()
                )));
            }
            prev = Some(i);
            let code = (codes[j / 4] >> (2 * (j % 4))) & 3;
            let mag = if code & 2 != 0 { hi } else { lo };
            o[usize::from(i)] = if code & 1 != 0 { -mag } else { mag };
        }
        if !m.is_multiple_of(4) && codes[m / 4] >> (2 * (m % 4)) != 0 {
            return Err(Error::BadUpdate(format!(
                "sparse chunk {c} has stray bits after its codes"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(data: &[u8], len: usize, k: u16) -> Result<Vec<f32>, Error> {
        let mut out = Vec::new();
        decode_sparse(data, len, k, &mut out).map(|()| out)
    }

    #[test]
    fn keeps_the_largest_with_their_signs() {
        let mut v = vec![0.01f32; 5000];
        v[3] = -2.0;
        v[10] = 1.0;
        v[4095] = 0.5;
        v[4100] = -0.3;
        let data = encode_sparse(&v, 3);
        assert_eq!(data.len(), sparse_bytes(5000, 3).unwrap());
        assert_eq!(data.len(), 2 * (8 + 6 + 1));
        let d = decode(&data, 5000, 3).unwrap();
        // Chunk 0 keeps -2, 1, 0.5 (mean 7/6: hi = 2, lo = 0.75); chunk 1 keeps -0.3 and the
        // first two of the ties at 0.01.
        assert_eq!(d[3], -2.0);
        assert_eq!(d[10], 0.75);
        assert_eq!(d[4095], 0.75);
        assert!(d[4100] < -0.2);
        assert!(d[4096] > 0.0 && d[4097] > 0.0 && d[4098] == 0.0);
        assert_eq!(d.iter().filter(|x| **x != 0.0).count(), 6);
        assert_eq!(encode_sparse(&v, 3), data, "deterministic");
    }

    /// Kept values of one magnitude (parameters that start equal and move alike) sum, in
    /// f32, to a mean that can exceed each of them: none counted high. The encoder
    /// wrote `hi = 0` below `lo` then, a payload its own decoder refuses.
    #[test]
    fn ties_at_the_top_encode_to_what_decodes() {
        let periodic: Vec<f32> = (0..10_000)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
            .collect();
        let mut inputs = vec![periodic];
        for m in [0.0048f32, 1e-3, 0.1, 3.3, 1e-7, 7.0e-5] {
            inputs.push((0..4096).map(|i| if i % 3 == 0 { -m } else { m }).collect());
        }
        for (n, v) in inputs.iter().enumerate() {
            for k in [1, 3, 64, 500] {
                let d = decode(&encode_sparse(v, k), v.len(), k)
                    .unwrap_or_else(|e| panic!("k {k}, {:?}…: {e}", &v[..3]));
                for (x, y) in d.iter().zip(v) {
                    // Sent values keep their sign; of one magnitude, they keep it too.
                    assert!(*x == 0.0 || x.signum() == y.signum(), "k {k}: {x} for {y}");
                    assert!(
                        n == 0 || *x == 0.0 || (x - y).abs() <= y.abs() * 1e-5,
                        "k {k}: {x} for {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_would_never_write() {
        let v: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.1).collect();
        let data = encode_sparse(&v, 5);
        assert!(decode(&data, 100, 5).is_ok());
        let with = |at: usize, b: u8| {
            let mut d = data.clone();
            d[at] = b;
            decode(&d, 100, 5)
        };
        assert!(with(3, 0xff).is_err(), "NaN lo");
        assert!(
            with(10, data[8]).is_err(),
            "indices not increasing: {:?}",
            &data[8..18]
        );
        assert!(with(9, 0x40).is_err(), "index out of the chunk");
        assert!(with(data.len() - 1, 0xff).is_err(), "stray bits");
        assert!(decode(&data[1..], 100, 5).is_err());
        assert!(decode(&data, 5000, 5).is_err());
        assert!(decode(&data, 100, 0).is_err());
        assert!(decode(&encode_sparse(&[1.0, f32::NAN], 1), 2, 1).is_err());
    }

    /// The words the GPU kernel writes for the codec's bytes `data` (its fixed stride a chunk,
    /// unused words and bytes zero): the inverse of [`from_kernel_words`].
    fn kernel_words(data: &[u8], len: usize, k: u16) -> Vec<u8> {
        let index_words = usize::from(k).div_ceil(2);
        let stride = 4 * tessera_core::kernels::quantize::sparse_stride(k);
        let mut words = vec![0u8; len.div_ceil(SPARSE_CHUNK) * stride];
        let mut at = 0;
        for (c, w) in words.chunks_exact_mut(stride).enumerate() {
            let m = kept((len - c * SPARSE_CHUNK).min(SPARSE_CHUNK), k);
            let chunk = &data[at..at + chunk_bytes(m)];
            at += chunk.len();
            w[..8 + 2 * m].copy_from_slice(&chunk[..8 + 2 * m]);
            let codes = 8 + 4 * index_words;
            w[codes..codes + m.div_ceil(4)].copy_from_slice(&chunk[8 + 2 * m..]);
        }
        words
    }

    #[test]
    fn kernel_words_make_the_codecs_bytes() {
        let v: Vec<f32> = (0..2 * SPARSE_CHUNK + 10)
            .map(|i| ((i * 7919) % 1013) as f32 - 506.0)
            .collect();
        for k in [1u16, 3, 64, 255] {
            let data = encode_sparse(&v, k);
            let words = kernel_words(&data, v.len(), k);
            assert_eq!(
                from_kernel_words(&words, v.len(), k).unwrap(),
                data,
                "k {k}"
            );
            assert!(finite_magnitudes(&data, v.len(), k));
            // A word short, or k = 0: refused, not a panic.
            assert!(from_kernel_words(&words[..words.len() - 4], v.len(), k).is_err());
            assert!(from_kernel_words(&words, v.len(), 0).is_err());
        }
        // A NaN magnitude in the last chunk (what an encoder writes for a non-finite value),
        // and data of the wrong size, are not finite.
        let mut data = encode_sparse(&v, 3);
        let last = data.len() - chunk_bytes(3);
        data[last + 4..last + 8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(!finite_magnitudes(&data, v.len(), 3));
        assert!(!finite_magnitudes(&data[1..], v.len(), 3));
        assert!(!finite_magnitudes(&data, v.len(), 0));
    }
}
