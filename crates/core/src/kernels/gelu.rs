//! GELU (the exact, erf form: `x·Φ(x)`) forward and backward in one pass each.

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

use super::math::{erf_with, exp_with, for_each_chunk};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `y = x·Φ(x)`.
pub fn forward(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for_each_chunk(&mut y, CHUNK, |i, y| {
        forward_chunk(&x[i * CHUNK..i * CHUNK + y.len()], y)
    });
    y
}

#[multiversion(targets = "simd")]
fn forward_chunk(x: &[f32], y: &mut [f32]) {
    const FMA: bool = target_cfg_f!(target_feature = "fma");
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + erf_with::<FMA>(x * FRAC_1_SQRT_2));
    }
}

/// `dx = dy·(Φ(x) + x·φ(x))`.
pub fn backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(
        x.len(),
        dy.len(),
        "gelu backward: gradient and input differ in size"
    );
    let mut dx = vec![0.0; x.len()];
    for_each_chunk(&mut dx, CHUNK, |i, dx| {
        let r = i * CHUNK..i * CHUNK + dx.len();
        backward_chunk(&x[r.clone()], &dy[r], dx)
    });
    dx
}

#[multiversion(targets = "simd")]
fn backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    const FMA: bool = target_cfg_f!(target_feature = "fma");
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
        let cdf = 0.5 * (1.0 + erf_with::<FMA>(x * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * exp_with::<FMA>(-0.5 * x * x);
        *dx = g * (cdf + x * pdf);
    }
}

#[cfg(test)]
mod tests {
    use super::super::math::erf_f64;
    use super::*;

    #[test]
    fn the_gradient_is_the_derivative() {
        let x: Vec<f32> = (0..2001).map(|i| -8.0 + i as f32 * 0.008).collect();
        let y = forward(&x);
        let dx = backward(&x, &vec![1.0; x.len()]);
        for (i, &xi) in x.iter().enumerate() {
            let xd = xi as f64;
            let phi = 0.5 * (1.0 + erf_f64(xd / 2f64.sqrt()));
            assert!(
                (y[i] as f64 - xd * phi).abs() < 1e-6 * (1.0 + xd.abs()),
                "gelu({xi})"
            );
            let h = 1e-3;
            let g = |x: f64| x * 0.5 * (1.0 + erf_f64(x / 2f64.sqrt()));
            let num = (g(xd + h) - g(xd - h)) / (2.0 * h);
            assert!(
                (dx[i] as f64 - num).abs() < 1e-5,
                "gelu'({xi}) = {} vs {num}",
                dx[i]
            );
        }
    }
}
