//! One AdamW step over a parameter in a single pass: the parameter, its two moments and its
//! gradient are each read once and the three results written in place, where burn's composed
//! ops take a dozen passes and as many fresh buffers.
//!
//! Every element sees the f32 operations of [`crate::optim`]'s composed step in the same order
//! (a scalar is rounded to f32 first, as burn's scalar ops do), so the two agree bit for bit.

use multiversion::multiversion;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The step's scalars, each already rounded to f32 the way burn's scalar ops round them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalars {
    /// β₁ and `1 − β₁`.
    pub beta1: f32,
    pub one_minus_beta1: f32,
    /// β₂ and `1 − β₂`.
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 − β₂ᵗ` (the second moment's bias correction).
    pub bias_correction2: f32,
    /// ε, added outside the square root.
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `1 − lr·wd` for a decayed parameter, 1 for one without weight decay (`p·1` is `p`).
    pub decay: f32,
}

impl Scalars {
    /// The scalars of step `t` (from 1) at learning rate `lr`.
    pub fn new(beta1: f64, beta2: f64, eps: f64, lr: f64, weight_decay: f64, t: i32) -> Self {
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2: (1.0 - beta2.powi(t)) as f32,
            eps: eps as f32,
            step_size: (lr / (1.0 - beta1.powi(t))) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
        }
    }
}

/// One step: `grad` (times `clip`) updates the moments `m`, `v` and the parameter `p` in place.
/// On the first step pass zeroed moments: `0·β + x` is `x` exactly.
pub fn step(p: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], clip: f32, s: &Scalars) {
    let n = p.len();
    assert!(
        m.len() == n && v.len() == n && grad.len() == n,
        "adamw: parameter, moments and gradient differ in size"
    );
    let run = |i: usize, p: &mut [f32], m: &mut [f32], v: &mut [f32]| {
        let g = &grad[i * CHUNK..i * CHUNK + p.len()];
        step_chunk(p, m, v, g, clip, s)
    };
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, ((p, m), v))| run(i, p, m, v));
    }
    #[cfg(not(feature = "threads"))]
    p.chunks_mut(CHUNK)
        .zip(m.chunks_mut(CHUNK))
        .zip(v.chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, ((p, m), v))| run(i, p, m, v));
}

#[multiversion(targets = "simd")]
fn step_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], clip: f32, s: &Scalars) {
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let g = g * clip;
        *m = *m * s.beta1 + g * s.one_minus_beta1;
        *v = *v * s.beta2 + (g * g) * s.one_minus_beta2;
        let denom = (*v / s.bias_correction2).sqrt() + s.eps;
        let update = (*m / denom) * s.step_size;
        *p = *p * s.decay - update;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's AdamW (decoupled decay, `eps` outside the root) in f64, one element.
    fn reference(p: f64, m: f64, v: f64, g: f64, t: i32, lr: f64, wd: f64) -> [f64; 3] {
        let (b1, b2, eps) = (0.9, 0.99, 1e-8);
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let mh = m / (1.0 - b1.powi(t));
        let vh = v / (1.0 - b2.powi(t));
        [p * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps), m, v]
    }

    #[test]
    fn three_steps_follow_pytorchs_adamw() {
        let n = 3 * CHUNK + 17;
        let mut p: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut r: Vec<[f64; 3]> = p.iter().map(|&p| [p as f64, 0.0, 0.0]).collect();
        for t in 1..=3 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 13 + t as usize * 7) % 29) as f32 / 29.0 - 0.4)
                .collect();
            let s = Scalars::new(0.9, 0.99, 1e-8, 1e-2, 0.1, t);
            step(&mut p, &mut m, &mut v, &g, 1.0, &s);
            for (i, r) in r.iter_mut().enumerate() {
                *r = reference(r[0], r[1], r[2], g[i] as f64, t, 1e-2, 0.1);
            }
        }
        for i in 0..n {
            assert!((p[i] as f64 - r[i][0]).abs() < 1e-6, "p[{i}]");
            assert!((m[i] as f64 - r[i][1]).abs() < 1e-6, "m[{i}]");
            assert!((v[i] as f64 - r[i][2]).abs() < 1e-7, "v[{i}]");
        }
    }

    #[test]
    fn no_decay_and_a_clip_scale_the_gradient_only() {
        let s = Scalars::new(0.9, 0.99, 1e-8, 1e-3, 0.0, 1);
        assert_eq!(s.decay, 1.0);
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0], vec![0.0]);
        step(&mut p, &mut m, &mut v, &[4.0], 0.5, &s);
        // The first step moves by lr·sign(g) (up to ε): 1 − 1e-3.
        assert!((p[0] - 0.999).abs() < 1e-6, "{}", p[0]);
        assert!((m[0] - 0.2).abs() < 1e-7 && (v[0] - 0.04).abs() < 1e-7);
    }
}
