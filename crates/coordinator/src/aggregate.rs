//! Folding pseudo-gradients into a round's average and applying the outer step.

/// Adds `weight * delta` to `sum` (the round accumulator).
pub fn fold(sum: &mut [f32], delta: &[f32], weight: f32) {
    assert_eq!(sum.len(), delta.len(), "fold: length mismatch");
    for (s, d) in sum.iter_mut().zip(delta) {
        *s += weight * d;
    }
}

/// Adds `weight * delta` to `sum`, reading `delta` straight from little-endian f32 bytes (the
/// wire encoding), so an update is folded without an intermediate copy.
pub fn fold_le_bytes(sum: &mut [f32], bytes: &[u8], weight: f32) {
    assert_eq!(sum.len() * 4, bytes.len(), "fold: length mismatch");
    for (s, c) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
        *s += weight * f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Euclidean distance between `a` and `b`, accumulated in f64.
pub fn distance(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "distance: length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// `center + scale · (delta − center)`: `delta` pulled towards `center`.
pub fn clip_towards(delta: &[f32], center: &[f32], scale: f32) -> Vec<f32> {
    delta
        .iter()
        .zip(center)
        .map(|(&d, &c)| c + scale * (d - c))
        .collect()
}

/// The DiLoCo outer step, Nesterov momentum SGD on the averaged pseudo-gradient `g`:
/// `m = μ m + g; θ = θ − lr (g + μ m)` (PyTorch's SGD with `nesterov=True`).
pub fn nesterov_step(params: &mut [f32], momentum: &mut [f32], g: &[f32], lr: f32, mu: f32) {
    assert!(
        params.len() == momentum.len() && params.len() == g.len(),
        "outer step: length mismatch"
    );
    for ((p, m), &g) in params.iter_mut().zip(momentum.iter_mut()).zip(g) {
        *m = mu * *m + g;
        *p -= lr * (g + mu * *m);
    }
}

/// The Nesterov outer step as a vector: updates `momentum` as [`nesterov_step`] does and
/// returns `lr (g + μ m)`, what the weights lose.
pub fn nesterov_direction(momentum: &mut [f32], g: &[f32], lr: f32, mu: f32) -> Vec<f32> {
    assert_eq!(momentum.len(), g.len(), "outer step: length mismatch");
    momentum
        .iter_mut()
        .zip(g)
        .map(|(m, &g)| {
            *m = mu * *m + g;
            lr * (g + mu * *m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_variants_agree() {
        let d = [1.0f32, -2.0, 0.5];
        let bytes: Vec<u8> = d.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut a = vec![1.0; 3];
        let mut b = vec![1.0; 3];
        fold(&mut a, &d, 2.0);
        fold_le_bytes(&mut b, &bytes, 2.0);
        assert_eq!(a, vec![3.0, -3.0, 2.0]);
        assert_eq!(a, b);
    }

    #[test]
    fn nesterov_matches_hand_computation() {
        let mut p = vec![1.0f32];
        let mut m = vec![0.0f32];
        nesterov_step(&mut p, &mut m, &[0.5], 0.7, 0.9);
        // m = 0.5; p = 1 - 0.7 (0.5 + 0.45) = 0.335
        assert!((m[0] - 0.5).abs() < 1e-7);
        assert!((p[0] - 0.335).abs() < 1e-6);
        nesterov_step(&mut p, &mut m, &[0.5], 0.7, 0.9);
        // m = 0.95; p = 0.335 - 0.7 (0.5 + 0.855) = -0.6135
        assert!((p[0] + 0.6135).abs() < 1e-5);
    }
}
