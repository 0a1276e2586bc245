//! LayerNorm over the last dimension: the forward pass keeps each row's mean and reciprocal
//! standard deviation so the backward pass is one sweep over the rows.

use multiversion::multiversion;

use super::math::{dot, for_each_chunk, for_each_chunk2, map_indices, sum};

/// Rows per parallel task (fixed, so the parameter gradients sum in the same order on any
/// number of threads).
const ROWS: usize = 32;

/// What the backward pass needs besides the input.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Mean of each row.
    pub mean: Vec<f32>,
    /// `1 / sqrt(var + eps)` of each row (biased variance, as PyTorch).
    pub rstd: Vec<f32>,
}

/// `y = (x − mean)·rstd·gamma + beta` over rows of `gamma.len()` values.
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Stats) {
    let c = gamma.len();
    assert!(
        c > 0 && x.len().is_multiple_of(c),
        "layer norm: rows of {c} do not tile the input"
    );
    let rows = x.len() / c;
    let mut y = vec![0.0; x.len()];
    let mut stats = vec![0.0; 2 * rows];
    for_each_chunk2(&mut y, ROWS * c, &mut stats, 2 * ROWS, |i, y, st| {
        forward_rows(
            &x[i * ROWS * c..i * ROWS * c + y.len()],
            gamma,
            beta,
            eps,
            y,
            st,
        )
    });
    let (mean, rstd) = stats.chunks_exact(2).map(|s| (s[0], s[1])).unzip();
    (y, Stats { mean, rstd })
}

#[multiversion(targets = "simd")]
fn forward_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], st: &mut [f32]) {
    let c = gamma.len();
    for ((x, y), st) in x
        .chunks_exact(c)
        .zip(y.chunks_exact_mut(c))
        .zip(st.chunks_exact_mut(2))
    {
        let mean = sum(x) / c as f32;
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x - mean;
        }
        let rstd = 1.0 / (dot(y, y) / c as f32 + eps).sqrt();
        for ((y, &g), &b) in y.iter_mut().zip(gamma).zip(beta) {
            *y = *y * rstd * g + b;
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

/// Gradients `(dx, dgamma, dbeta)` for upstream `dy`.
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    stats: &Stats,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    assert_eq!(
        x.len(),
        dy.len(),
        "layer norm backward: gradient and input differ in size"
    );
    let mut dx = vec![0.0; x.len()];
    for_each_chunk(&mut dx, ROWS * c, |i, dx| {
        let base = i * ROWS;
        let off = base * c..base * c + dx.len();
        let rows = dx.len() / c;
        backward_rows(
            &x[off.clone()],
            gamma,
            &stats.mean[base..base + rows],
            &stats.rstd[base..base + rows],
            &dy[off],
            dx,
        )
    });
    // Parameter gradients: per-task partial sums over its rows, added in task order.
    let rows = x.len() / c;
    let tasks = rows.div_ceil(ROWS);
    let partials = map_indices(tasks, |t| {
        let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
        let rows = t * ROWS..((t + 1) * ROWS).min(rows);
        param_grads(
            &x[rows.start * c..rows.end * c],
            &stats.mean[rows.clone()],
            &stats.rstd[rows.clone()],
            &dy[rows.start * c..rows.end * c],
            &mut dg,
            &mut db,
        );
        (dg, db)
    });
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (dg, db) in &partials {
        for (s, v) in dgamma.iter_mut().zip(dg) {
            *s += v;
        }
        for (s, v) in dbeta.iter_mut().zip(db) {
            *s += v;
        }
    }
    (dx, dgamma, dbeta)
}

#[multiversion(targets = "simd")]
fn backward_rows(x: &[f32], gamma: &[f32], mean: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
    let c = gamma.len();
    let (mut dxhat, mut xhat) = (vec![0.0; c], vec![0.0; c]);
    for (r, ((x, dy), dx)) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
        .enumerate()
    {
        let (m, s) = (mean[r], rstd[r]);
        for (((d, h), &x), (&dy, &g)) in dxhat
            .iter_mut()
            .zip(xhat.iter_mut())
            .zip(x)
            .zip(dy.iter().zip(gamma))
        {
            *d = dy * g;
            *h = (x - m) * s;
        }
        let a = sum(&dxhat) / c as f32;
        let b = dot(&dxhat, &xhat) / c as f32;
        for ((dx, &d), &h) in dx.iter_mut().zip(&dxhat).zip(&xhat) {
            *dx = (d - a - h * b) * s;
        }
    }
}

/// Adds the rows' contributions to `dgamma` and `dbeta`.
#[multiversion(targets = "simd")]
fn param_grads(x: &[f32], mean: &[f32], rstd: &[f32], dy: &[f32], dg: &mut [f32], db: &mut [f32]) {
    let c = dg.len();
    for (r, (x, dy)) in x.chunks_exact(c).zip(dy.chunks_exact(c)).enumerate() {
        let (m, s) = (mean[r], rstd[r]);
        for (((dg, db), &x), &dy) in dg.iter_mut().zip(db.iter_mut()).zip(x).zip(dy) {
            *dg += dy * (x - m) * s;
            *db += dy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let c = g.len();
        x.chunks(c)
            .flat_map(|r| {
                let m = r.iter().sum::<f64>() / c as f64;
                let v = r.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / c as f64;
                let s = 1.0 / (v + eps).sqrt();
                r.iter()
                    .zip(g)
                    .zip(b)
                    .map(move |((x, g), b)| (x - m) * s * g + b)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn forward_and_gradients_match_finite_differences() {
        let (rows, c) = (70, 24);
        let x: Vec<f32> = (0..rows * c)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let g: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 / c as f32).collect();
        let b: Vec<f32> = (0..c).map(|i| i as f32 * 0.01 - 0.1).collect();
        let dy: Vec<f32> = (0..rows * c)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .collect();
        let eps = 1e-5;
        let (y, st) = forward(&x, &g, &b, eps);
        let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let (xd, gd, bd, dyd) = (f64s(&x), f64s(&g), f64s(&b), f64s(&dy));
        let want = reference(&xd, &gd, &bd, eps as f64);
        for (a, w) in y.iter().zip(&want) {
            assert!((*a as f64 - w).abs() < 1e-5, "{a} vs {w}");
        }
        let (dx, dg, db) = backward(&x, &g, &st, &dy);
        // L = Σ dy·y: its derivative along each input, numerically in f64.
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            reference(x, g, b, eps as f64)
                .iter()
                .zip(&dyd)
                .map(|(y, d)| y * d)
                .sum()
        };
        let h = 1e-6;
        for i in [0, 5, 23, 24, 500, rows * c - 1] {
            let (mut p, mut m) = (xd.clone(), xd.clone());
            p[i] += h;
            m[i] -= h;
            let num = (loss(&p, &gd, &bd) - loss(&m, &gd, &bd)) / (2.0 * h);
            assert!(
                (dx[i] as f64 - num).abs() < 1e-3 * (1.0 + num.abs()),
                "dx[{i}] {} vs {num}",
                dx[i]
            );
        }
        for j in [0, 7, c - 1] {
            let (mut p, mut m) = (gd.clone(), gd.clone());
            p[j] += h;
            m[j] -= h;
            let num = (loss(&xd, &p, &bd) - loss(&xd, &m, &bd)) / (2.0 * h);
            assert!(
                (dg[j] as f64 - num).abs() < 1e-3 * (1.0 + num.abs()),
                "dgamma[{j}]"
            );
            let want: f64 = (0..rows).map(|r| dyd[r * c + j]).sum();
            assert!((db[j] as f64 - want).abs() < 1e-3, "dbeta[{j}]");
        }
    }
}
