//! Causal multi-head self-attention straight from the fused `qkv` projection: one task per
//! sequence, heads in turn, every head's `T×T` scores in cache. The forward pass keeps each
//! row's log-sum-exp so the backward pass recomputes the probabilities instead of storing them.

use multiversion::multiversion;

use super::math::{dot, exp, for_each_chunk, for_each_chunk2, max, sum};

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

/// Width of the register blocks in the inner loops.
const BLOCK: usize = 16;

/// One head's rows, gathered out of a sequence's `[t, stride]` rows at column `col`.
#[inline(always)]
fn gather(rows: &[f32], stride: usize, col: usize, dh: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_exact_mut(dh).enumerate() {
        o.copy_from_slice(&rows[i * stride + col..i * stride + col + dh]);
    }
}

/// The same, transposed to `[dh, t]`.
#[inline(always)]
fn gather_t(rows: &[f32], stride: usize, col: usize, dh: usize, t: usize, out: &mut [f32]) {
    for i in 0..t {
        for d in 0..dh {
            out[d * t + i] = rows[i * stride + col + d];
        }
    }
}

/// `out[j] = Σ_d a[d] · bt[d, j]` for `j < n` (a row of `A·Bᵀ` from `Bᵀ` stored `[dh, t]`),
/// sixteen columns at a time in registers. May also fill columns up to the next block edge.
#[inline(always)]
fn row_times(a: &[f32], bt: &[f32], t: usize, n: usize, out: &mut [f32]) {
    let mut j = 0;
    while j < n {
        if j + BLOCK <= t {
            let mut acc = [0.0f32; BLOCK];
            for (d, &ad) in a.iter().enumerate() {
                let b = &bt[d * t + j..d * t + j + BLOCK];
                for l in 0..BLOCK {
                    acc[l] += ad * b[l];
                }
            }
            out[j..j + BLOCK].copy_from_slice(&acc);
        } else {
            let w = t - j;
            let mut acc = [0.0f32; BLOCK];
            for (d, &ad) in a.iter().enumerate() {
                let b = &bt[d * t + j..d * t + t];
                for l in 0..w {
                    acc[l] += ad * b[l];
                }
            }
            out[j..t].copy_from_slice(&acc[..w]);
        }
        j += BLOCK;
    }
}

/// `out = Σ_{s ∈ range} w[s] · rows[s]` over rows of width `out.len()`, sixteen columns at a
/// time in registers.
#[inline(always)]
fn combine(w: &[f32], rows: &[f32], range: std::ops::Range<usize>, out: &mut [f32]) {
    let dh = out.len();
    let mut d = 0;
    while d < dh {
        let width = BLOCK.min(dh - d);
        let mut acc = [0.0f32; BLOCK];
        if width == BLOCK {
            for s in range.clone() {
                let r = &rows[s * dh + d..s * dh + d + BLOCK];
                for l in 0..BLOCK {
                    acc[l] += w[s] * r[l];
                }
            }
        } else {
            for s in range.clone() {
                let r = &rows[s * dh + d..s * dh + d + width];
                for l in 0..width {
                    acc[l] += w[s] * r[l];
                }
            }
        }
        out[d..d + width].copy_from_slice(&acc[..width]);
        d += BLOCK;
    }
}

/// `dst[j, i] = src[i, j]` for square `[t, t]` matrices.
#[inline(always)]
fn transpose(src: &[f32], t: usize, dst: &mut [f32]) {
    for i in 0..t {
        for j in 0..t {
            dst[j * t + i] = src[i * t + j];
        }
    }
}

/// Output `[batch·t, c]` and log-sum-exp `[batch, heads, t]` for `qkv` `[batch·t, 3c]`.
pub fn forward(qkv: &[f32], s: Shape) -> (Vec<f32>, Vec<f32>) {
    let (t, c) = (s.t, s.c());
    assert_eq!(
        qkv.len(),
        s.batch * t * 3 * c,
        "attention: qkv is not [batch·t, 3c]"
    );
    let mut y = vec![0.0; s.batch * t * c];
    let mut lse = vec![0.0; s.batch * s.heads * t];
    for_each_chunk2(&mut y, t * c, &mut lse, s.heads * t, |b, y, lse| {
        forward_sequence(&qkv[b * t * 3 * c..(b + 1) * t * 3 * c], s, y, lse)
    });
    (y, lse)
}

#[multiversion(targets = "simd")]
fn forward_sequence(rows: &[f32], s: Shape, y: &mut [f32], lse: &mut [f32]) {
    let (t, c, dh) = (s.t, s.c(), s.dh);
    let scale = s.scale();
    let (mut q, mut kt, mut v) = (vec![0.0; t * dh], vec![0.0; t * dh], vec![0.0; t * dh]);
    let mut p = vec![0.0; t];
    for h in 0..s.heads {
        gather(rows, 3 * c, h * dh, dh, &mut q);
        gather_t(rows, 3 * c, c + h * dh, dh, t, &mut kt);
        gather(rows, 3 * c, 2 * c + h * dh, dh, &mut v);
        for i in 0..t {
            row_times(&q[i * dh..(i + 1) * dh], &kt, t, i + 1, &mut p);
            let p = &mut p[..=i];
            let m = max(p) * scale;
            for x in p.iter_mut() {
                *x = exp(*x * scale - m);
            }
            let total = sum(p);
            let inv = 1.0 / total;
            for x in p.iter_mut() {
                *x *= inv;
            }
            combine(
                p,
                &v,
                0..i + 1,
                &mut y[i * c + h * dh..i * c + (h + 1) * dh],
            );
            lse[h * t + i] = m + total.ln();
        }
    }
}

/// `dqkv` `[batch·t, 3c]` for upstream `dy` `[batch·t, c]`, given the forward's output `y`
/// and log-sum-exp.
pub fn backward(qkv: &[f32], y: &[f32], lse: &[f32], dy: &[f32], s: Shape) -> Vec<f32> {
    let (t, c) = (s.t, s.c());
    assert_eq!(
        dy.len(),
        y.len(),
        "attention backward: gradient and output differ in size"
    );
    let mut dqkv = vec![0.0; qkv.len()];
    for_each_chunk(&mut dqkv, t * 3 * c, |b, dqkv| {
        backward_sequence(
            &qkv[b * t * 3 * c..(b + 1) * t * 3 * c],
            &y[b * t * c..(b + 1) * t * c],
            &lse[b * s.heads * t..(b + 1) * s.heads * t],
            &dy[b * t * c..(b + 1) * t * c],
            s,
            dqkv,
        )
    });
    dqkv
}

#[multiversion(targets = "simd")]
fn backward_sequence(rows: &[f32], y: &[f32], lse: &[f32], dy: &[f32], s: Shape, dqkv: &mut [f32]) {
    let (t, c, dh) = (s.t, s.c(), s.dh);
    let scale = s.scale();
    let z = |n: usize| vec![0.0f32; n];
    let (mut q, mut k, mut kt, mut vt, mut o, mut d_o) = (
        z(t * dh),
        z(t * dh),
        z(t * dh),
        z(t * dh),
        z(t * dh),
        z(t * dh),
    );
    let (mut p, mut ds, mut pt, mut dst) = (z(t * t), z(t * t), z(t * t), z(t * t));
    let mut dp = z(t);
    let mut out = z(dh);
    for h in 0..s.heads {
        gather(rows, 3 * c, h * dh, dh, &mut q);
        gather(rows, 3 * c, c + h * dh, dh, &mut k);
        gather_t(rows, 3 * c, c + h * dh, dh, t, &mut kt);
        gather_t(rows, 3 * c, 2 * c + h * dh, dh, t, &mut vt);
        gather(y, c, h * dh, dh, &mut o);
        gather(dy, c, h * dh, dh, &mut d_o);
        // Probabilities P and score gradients dS = P ∘ (dP − rowsum(dO ∘ O)), row by row.
        for i in 0..t {
            let (qi, doi) = (&q[i * dh..(i + 1) * dh], &d_o[i * dh..(i + 1) * dh]);
            let pi = &mut p[i * t..(i + 1) * t];
            row_times(qi, &kt, t, i + 1, pi);
            let l = lse[h * t + i];
            for x in pi[..=i].iter_mut() {
                *x = exp(*x * scale - l);
            }
            pi[i + 1..].fill(0.0);
            row_times(doi, &vt, t, i + 1, &mut dp);
            let di = dot(doi, &o[i * dh..(i + 1) * dh]);
            let dsi = &mut ds[i * t..(i + 1) * t];
            for ((d, &pj), &dpj) in dsi[..=i].iter_mut().zip(&pi[..=i]).zip(&dp[..=i]) {
                *d = pj * (dpj - di) * scale;
            }
            dsi[i + 1..].fill(0.0);
        }
        transpose(&p, t, &mut pt);
        transpose(&ds, t, &mut dst);
        for i in 0..t {
            let row = &mut dqkv[i * 3 * c..(i + 1) * 3 * c];
            // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO.
            combine(&ds[i * t..(i + 1) * t], &k, 0..i + 1, &mut out);
            row[h * dh..(h + 1) * dh].copy_from_slice(&out);
            combine(&dst[i * t..(i + 1) * t], &q, i..t, &mut out);
            row[c + h * dh..c + (h + 1) * dh].copy_from_slice(&out);
            combine(&pt[i * t..(i + 1) * t], &d_o, i..t, &mut out);
            row[2 * c + h * dh..2 * c + (h + 1) * dh].copy_from_slice(&out);
        }
    }
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
