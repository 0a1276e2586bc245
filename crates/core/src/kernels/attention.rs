//! Causal multi-head self-attention straight from the fused `qkv` projection: one task per
//! sequence, heads in turn, every head's `T×T` scores in cache. The forward pass keeps each
//! row's log-sum-exp so the backward pass recomputes the probabilities instead of storing them.

use super::math::{axpy, dot, exp, for_each_chunk, for_each_chunk2};

/// The shape of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Heads.
    pub heads: usize,
    /// Width of a head.
    pub dh: usize,
}

impl Shape {
    /// Model width `heads · dh`.
    pub fn c(&self) -> usize {
        self.heads * self.dh
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dh as f32).sqrt()
    }
}

/// One head's rows, gathered out of a sequence's `[t, stride]` rows at column `col`.
fn gather(rows: &[f32], stride: usize, col: usize, s: Shape, out: &mut [f32]) {
    for (i, o) in out.chunks_exact_mut(s.dh).enumerate() {
        o.copy_from_slice(&rows[i * stride + col..i * stride + col + s.dh]);
    }
}

/// The same, transposed to `[dh, t]`.
fn gather_t(rows: &[f32], stride: usize, col: usize, s: Shape, out: &mut [f32]) {
    for i in 0..s.t {
        for d in 0..s.dh {
            out[d * s.t + i] = rows[i * stride + col + d];
        }
    }
}

/// `out[j] = Σ_d a[d] · bt[d, j]` for `j ≤ last` (a row of `A·Bᵀ` from `Bᵀ` stored `[dh, t]`).
fn row_times(a: &[f32], bt: &[f32], t: usize, last: usize, out: &mut [f32]) {
    let out = &mut out[..=last];
    out.fill(0.0);
    for (d, &ad) in a.iter().enumerate() {
        axpy(ad, &bt[d * t..d * t + last + 1], out);
    }
}

/// Output `[batch·t, c]` and log-sum-exp `[batch, heads, t]` for `qkv` `[batch·t, 3c]`.
pub fn forward(qkv: &[f32], s: Shape) -> (Vec<f32>, Vec<f32>) {
    let (t, c, dh) = (s.t, s.c(), s.dh);
    assert_eq!(
        qkv.len(),
        s.batch * t * 3 * c,
        "attention: qkv is not [batch·t, 3c]"
    );
    let scale = s.scale();
    let mut y = vec![0.0; s.batch * t * c];
    let mut lse = vec![0.0; s.batch * s.heads * t];
    for_each_chunk2(&mut y, t * c, &mut lse, s.heads * t, |b, y, lse| {
        let rows = &qkv[b * t * 3 * c..(b + 1) * t * 3 * c];
        let (mut q, mut kt, mut v) = (vec![0.0; t * dh], vec![0.0; t * dh], vec![0.0; t * dh]);
        let mut p = vec![0.0; t];
        let mut yi = vec![0.0; dh];
        for h in 0..s.heads {
            gather(rows, 3 * c, h * dh, s, &mut q);
            gather_t(rows, 3 * c, c + h * dh, s, &mut kt);
            gather(rows, 3 * c, 2 * c + h * dh, s, &mut v);
            for i in 0..t {
                row_times(&q[i * dh..(i + 1) * dh], &kt, t, i, &mut p);
                let p = &mut p[..=i];
                let mut m = f32::NEG_INFINITY;
                for x in p.iter_mut() {
                    *x *= scale;
                    m = m.max(*x);
                }
                let mut sum = 0.0;
                for x in p.iter_mut() {
                    *x = exp(*x - m);
                    sum += *x;
                }
                yi.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    axpy(pj, &v[j * dh..(j + 1) * dh], &mut yi);
                }
                let inv = 1.0 / sum;
                for (o, &x) in y[i * c + h * dh..i * c + (h + 1) * dh].iter_mut().zip(&yi) {
                    *o = x * inv;
                }
                lse[h * t + i] = m + sum.ln();
            }
        }
    });
    (y, lse)
}

/// `dqkv` `[batch·t, 3c]` for upstream `dy` `[batch·t, c]`, given the forward's output `y`
/// and log-sum-exp.
pub fn backward(qkv: &[f32], y: &[f32], lse: &[f32], dy: &[f32], s: Shape) -> Vec<f32> {
    let (t, c, dh) = (s.t, s.c(), s.dh);
    assert_eq!(
        dy.len(),
        y.len(),
        "attention backward: gradient and output differ in size"
    );
    let scale = s.scale();
    let mut dqkv = vec![0.0; qkv.len()];
    for_each_chunk(&mut dqkv, t * 3 * c, |b, dqkv| {
        let rows = &qkv[b * t * 3 * c..(b + 1) * t * 3 * c];
        let (yb, dyb) = (
            &y[b * t * c..(b + 1) * t * c],
            &dy[b * t * c..(b + 1) * t * c],
        );
        let lse = &lse[b * s.heads * t..(b + 1) * s.heads * t];
        let z = || vec![0.0f32; t * dh];
        let (mut q, mut k, mut kt, mut vt, mut o, mut d_o) = (z(), z(), z(), z(), z(), z());
        let (mut dq, mut dk, mut dv) = (z(), z(), z());
        let (mut p, mut dp) = (vec![0.0; t], vec![0.0; t]);
        for h in 0..s.heads {
            gather(rows, 3 * c, h * dh, s, &mut q);
            gather(rows, 3 * c, c + h * dh, s, &mut k);
            gather_t(rows, 3 * c, c + h * dh, s, &mut kt);
            gather_t(rows, 3 * c, 2 * c + h * dh, s, &mut vt);
            gather(yb, c, h * dh, s, &mut o);
            gather(dyb, c, h * dh, s, &mut d_o);
            dq.fill(0.0);
            dk.fill(0.0);
            dv.fill(0.0);
            for i in 0..t {
                let (qi, doi) = (&q[i * dh..(i + 1) * dh], &d_o[i * dh..(i + 1) * dh]);
                row_times(qi, &kt, t, i, &mut p);
                row_times(doi, &vt, t, i, &mut dp);
                let l = lse[h * t + i];
                let di = dot(doi, &o[i * dh..(i + 1) * dh]);
                let dqi = &mut dq[i * dh..(i + 1) * dh];
                for j in 0..=i {
                    let pj = exp(p[j] * scale - l);
                    let ds = pj * (dp[j] - di) * scale;
                    axpy(pj, doi, &mut dv[j * dh..(j + 1) * dh]);
                    axpy(ds, &k[j * dh..(j + 1) * dh], dqi);
                    axpy(ds, qi, &mut dk[j * dh..(j + 1) * dh]);
                }
            }
            for i in 0..t {
                let row = &mut dqkv[i * 3 * c..(i + 1) * 3 * c];
                row[h * dh..(h + 1) * dh].copy_from_slice(&dq[i * dh..(i + 1) * dh]);
                row[c + h * dh..c + (h + 1) * dh].copy_from_slice(&dk[i * dh..(i + 1) * dh]);
                row[2 * c + h * dh..2 * c + (h + 1) * dh]
                    .copy_from_slice(&dv[i * dh..(i + 1) * dh]);
            }
        }
    });
    dqkv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention in f64, the textbook way: `softmax(mask(QKᵀ/√dh))·V` per sequence and head.
    fn reference(qkv: &[f64], s: Shape) -> Vec<f64> {
        let (t, c, dh) = (s.t, s.c(), s.dh);
        let mut y = vec![0.0; s.batch * t * c];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let at = |i: usize, part: usize, d: usize| {
                    qkv[(b * t + i) * 3 * c + part * c + h * dh + d]
                };
                for i in 0..t {
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..dh).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..dh {
                        y[(b * t + i) * c + h * dh + d] =
                            (0..=i).map(|j| e[j] / z * at(j, 2, d)).sum();
                    }
                }
            }
        }
        y
    }

    #[test]
    fn forward_and_gradients_match_a_reference() {
        let s = Shape {
            batch: 2,
            t: 7,
            heads: 3,
            dh: 4,
        };
        let n = s.batch * s.t * 3 * s.c();
        let qkv: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        let dy: Vec<f32> = (0..s.batch * s.t * s.c())
            .map(|i| ((i * 17 % 31) as f32 - 15.0) / 10.0)
            .collect();
        let (y, lse) = forward(&qkv, s);
        let qd: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
        let want = reference(&qd, s);
        for (a, w) in y.iter().zip(&want) {
            assert!((*a as f64 - w).abs() < 1e-5, "{a} vs {w}");
        }
        let dqkv = backward(&qkv, &y, &lse, &dy, s);
        let loss = |q: &[f64]| -> f64 {
            reference(q, s)
                .iter()
                .zip(&dy)
                .map(|(y, &d)| y * d as f64)
                .sum()
        };
        let h = 1e-6;
        for i in 0..n {
            let (mut p, mut m) = (qd.clone(), qd.clone());
            p[i] += h;
            m[i] -= h;
            let num = (loss(&p) - loss(&m)) / (2.0 * h);
            assert!(
                (dqkv[i] as f64 - num).abs() < 1e-4 * (1.0 + num.abs()),
                "dqkv[{i}] {} vs {num}",
                dqkv[i]
            );
        }
    }
}
