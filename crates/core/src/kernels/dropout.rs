//! Dropout in one pass, its mask a hash of `(seed, index)`: the backward regenerates the same
//! mask instead of keeping it, and nothing draws a random number per element (burn's composed
//! dropout draws a Bernoulli value per element from a ChaCha generator, then multiplies twice:
//! ~7% of a `small` step).

use multiversion::multiversion;

use super::math::for_each_chunk;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The mask of one dropout call: element `i` is kept when its hash falls below `threshold`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mask {
    /// The call's two 32-bit keys.
    pub keys: [u32; 2],
    /// `P(keep) · 2³²`, saturated.
    pub threshold: u32,
    /// `1 / P(keep)`, as f32.
    pub scale: f32,
}

impl Mask {
    /// A mask dropping each element with probability `prob` (`0 ≤ prob < 1`).
    pub fn new(keys: [u32; 2], prob: f64) -> Self {
        assert!(
            (0.0..1.0).contains(&prob),
            "dropout: probability {prob} not in [0, 1)"
        );
        let keep = 1.0 - prob;
        Self {
            keys,
            threshold: (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// Whether element `i` is kept: murmur3's finaliser over the index mixed with the keys.
    #[inline(always)]
    pub fn keeps(&self, i: usize) -> bool {
        let mut h = (i as u32) ^ self.keys[0];
        h ^= ((i as u64) >> 32) as u32;
        h = h.wrapping_mul(0x85eb_ca6b) ^ self.keys[1];
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h = h.wrapping_mul(0x27d4_eb2d);
        h ^= h >> 15;
        h < self.threshold
    }
}

/// `x` with the mask's dropped elements zeroed and the kept ones scaled by `1 / P(keep)`; the
/// backward is the same function of the output's gradient.
pub fn apply(x: &[f32], mask: &Mask) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for_each_chunk(&mut y, CHUNK, |c, y| {
        let start = c * CHUNK;
        apply_chunk(&x[start..start + y.len()], y, start, mask)
    });
    y
}

#[multiversion(targets = "simd")]
fn apply_chunk(x: &[f32], y: &mut [f32], start: usize, mask: &Mask) {
    for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        let kept = if mask.keeps(start + j) {
            mask.scale
        } else {
            0.0
        };
        *y = x * kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_share_it_is_asked_to_and_scales_the_rest() {
        let n = 200_003;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
        for prob in [0.0, 0.1, 0.2, 0.5, 0.9] {
            let mask = Mask::new([17, 4242], prob);
            let y = apply(&x, &mask);
            let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            assert!(
                (dropped - prob).abs() < 0.005,
                "p {prob}: dropped {dropped}"
            );
            for (i, (&y, &x)) in y.iter().zip(&x).enumerate() {
                assert!(y == 0.0 || y == x * mask.scale, "element {i}");
                assert_eq!(y != 0.0, mask.keeps(i));
            }
            // The mean is kept (the scale undoes the drop), within sampling noise.
            let (sx, sy) = (x.iter().sum::<f32>(), y.iter().sum::<f32>());
            assert!(((sy - sx) / sx).abs() < 0.01, "p {prob}: sum {sy} vs {sx}");
        }
    }

    #[test]
    fn other_keys_draw_other_masks_and_the_same_keys_the_same() {
        let x = vec![1.0f32; 10_000];
        let a = apply(&x, &Mask::new([1, 2], 0.5));
        let b = apply(&x, &Mask::new([1, 3], 0.5));
        assert_eq!(a, apply(&x, &Mask::new([1, 2], 0.5)));
        let same = a.iter().zip(&b).filter(|(a, b)| a == b).count() as f64 / 1e4;
        assert!(
            (same - 0.5).abs() < 0.03,
            "masks of two keys agree on {same}"
        );
    }
}
