//! Mean softmax cross-entropy over rows of logits, fused: one pass for the loss (keeping each
//! row's log-sum-exp), one for the gradient `softmax − onehot`.

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

use super::math::{exp_with, for_each_chunk, map_indices, max, sum};

/// Rows per parallel task (fixed, so the loss sums in the same order on any thread count).
const ROWS: usize = 64;

/// Mean loss and each row's log-sum-exp, for `logits` `[rows, vocab]` and one target a row.
pub fn forward(logits: &[f32], targets: &[usize], vocab: usize) -> (f32, Vec<f32>) {
    let rows = targets.len();
    assert_eq!(
        logits.len(),
        rows * vocab,
        "cross-entropy: logits are not [rows, vocab]"
    );
    assert!(
        targets.iter().all(|&t| t < vocab),
        "cross-entropy: a target is outside the vocabulary"
    );
    let mut lse = vec![0.0; rows];
    for_each_chunk(&mut lse, ROWS, |i, lse| {
        let rows = &logits[i * ROWS * vocab..(i * ROWS + lse.len()) * vocab];
        log_sum_exp_rows(rows, vocab, lse)
    });
    let partial = map_indices(rows.div_ceil(ROWS), |i| {
        (i * ROWS..((i + 1) * ROWS).min(rows))
            .map(|r| (lse[r] - logits[r * vocab + targets[r]]) as f64)
            .sum::<f64>()
    });
    (
        (partial.iter().sum::<f64>() / rows.max(1) as f64) as f32,
        lse,
    )
}

/// Gradient of `grad · mean loss` with respect to the logits.
pub fn backward(logits: &[f32], targets: &[usize], lse: &[f32], grad: f32) -> Vec<f32> {
    let vocab = logits.len() / targets.len().max(1);
    let g = grad / targets.len().max(1) as f32;
    let mut d = vec![0.0; logits.len()];
    for_each_chunk(&mut d, ROWS * vocab, |i, d| {
        let first = i * ROWS;
        let rows = d.len() / vocab;
        let x = &logits[first * vocab..(first + rows) * vocab];
        softmax_rows(x, &lse[first..first + rows], g, d);
        for (r, d) in d.chunks_exact_mut(vocab).enumerate() {
            d[targets[first + r]] -= g;
        }
    });
    d
}

#[multiversion(targets = "simd")]
fn log_sum_exp_rows(rows: &[f32], vocab: usize, lse: &mut [f32]) {
    const FMA: bool = target_cfg_f!(target_feature = "fma");
    let mut e = vec![0.0f32; vocab];
    for (row, l) in rows.chunks_exact(vocab).zip(lse) {
        let m = max(row);
        for (e, &x) in e.iter_mut().zip(row) {
            *e = exp_with::<FMA>(x - m);
        }
        *l = m + sum(&e).ln();
    }
}

/// `d = g · softmax(x)` row by row, from each row's log-sum-exp.
#[multiversion(targets = "simd")]
fn softmax_rows(x: &[f32], lse: &[f32], g: f32, d: &mut [f32]) {
    const FMA: bool = target_cfg_f!(target_feature = "fma");
    let vocab = x.len() / lse.len().max(1);
    for ((d, x), &l) in d
        .chunks_exact_mut(vocab)
        .zip(x.chunks_exact(vocab))
        .zip(lse)
    {
        for (d, &x) in d.iter_mut().zip(x) {
            *d = exp_with::<FMA>(x - l) * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_match_a_reference() {
        let (rows, vocab) = (150, 11);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 41 % 89) as f32 - 44.0) / 9.0)
            .collect();
        let targets: Vec<usize> = (0..rows).map(|r| r * 7 % vocab).collect();
        let loss_of = |l: &[f64]| -> f64 {
            (0..rows)
                .map(|r| {
                    let row = &l[r * vocab..(r + 1) * vocab];
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[targets[r]]
                })
                .sum::<f64>()
                / rows as f64
        };
        let ld: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let (loss, lse) = forward(&logits, &targets, vocab);
        assert!((loss as f64 - loss_of(&ld)).abs() < 1e-5);
        let d = backward(&logits, &targets, &lse, 2.0);
        let h = 1e-6;
        for i in [0, 1, 10, 11, 500, rows * vocab - 1] {
            let (mut p, mut m) = (ld.clone(), ld.clone());
            p[i] += h;
            m[i] -= h;
            let num = 2.0 * (loss_of(&p) - loss_of(&m)) / (2.0 * h);
            assert!((d[i] as f64 - num).abs() < 1e-6, "d[{i}] {} vs {num}", d[i]);
        }
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn a_target_outside_the_vocabulary_is_refused() {
        forward(&[0.0; 4], &[0, 2], 2);
    }
}
