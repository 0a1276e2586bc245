//! A linear layer on rows, `y = x·W + b` (`x` `[n, k]`, `W` `[k, m]` as burn keeps it, `b`
//! `[m]`), and its backward, each product one gemm call that reads the transposed operands in
//! place by their strides.
//!
//! burn's composed linear allocates every product zero-filled and copies it once more into an
//! aligned buffer, then adds the bias into a third; here each output is written once, by gemm
//! (into memory gemm alone initialises) or by the bias pass. The forward's order of operations
//! is the composed one's (the product, then `+ b`), so its result is the same bit for bit.
//!
//! [`matmul_into`] is the same product for other kernels (attention's), into a strided
//! destination on the calling thread.
//!
//! The one module of the workspace that allows `unsafe`: gemm's entry point is an `unsafe fn`
//! over raw pointers and strides (as burn's flex calls it). It is called in one place,
//! `gemm_to`, which checks that both operands stay inside their slices; its two callers
//! ([`matmul_into`] and the private `product`) each say why their destination fits.
#![allow(unsafe_code)]

/// The dimensions: `n` rows of `k` inputs to `m` outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub k: usize,
    pub m: usize,
}

/// Products smaller than this (multiply-adds) run on one thread (burn flex's threshold).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// A matrix inside a slice: element `(r, c)` at `r·rs + c·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// `[rows, cols]` row-major from the start of `data`, rows `rs` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The same values read as the transposed matrix.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn check(&self, what: &str) {
        let last = (self.rows.max(1) - 1) * self.rs + (self.cols.max(1) - 1) * self.cs;
        assert!(
            self.rows == 0 || self.cols == 0 || last < self.data.len(),
            "matmul: {what} [{}, {}] with strides ({}, {}) overruns its {} values",
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len()
        );
    }
}

/// `dst = a·b` into the `rows(a) × cols(b)` values at `dst`, rows `dst_rs` apart and columns
/// contiguous, without reading them. Checks that `a` and `b` stay inside their slices.
///
/// # Safety
/// `dst` must be valid for writes of `(rows(a) − 1)·dst_rs + cols(b)` values and overlap
/// neither operand.
unsafe fn gemm_to(
    dst: *mut f32,
    dst_rs: usize,
    a: Strided<'_>,
    b: Strided<'_>,
    parallelism: gemm::Parallelism,
) {
    assert_eq!(
        a.cols, b.rows,
        "matmul: [{}, {}]·[{}, {}]",
        a.rows, a.cols, b.rows, b.cols
    );
    a.check("lhs");
    b.check("rhs");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // SAFETY: gemm reads only elements of `a.data` and `b.data` (checked above) and writes
    // only the destination the caller vouches for.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst,
            1,
            dst_rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `a·b` into a fresh row-major buffer that only gemm writes (no zero-fill first), on
/// rayon's threads when large.
fn product(a: Strided<'_>, b: Strided<'_>) -> Vec<f32> {
    let len = a.rows * b.cols;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let parallelism = parallelism(a.rows * a.cols * b.cols);
    // SAFETY: `out` has room for `rows(a) × cols(b)` values, rows `cols(b)` apart, which
    // gemm writes before the length is set; a fresh buffer overlaps nothing.
    unsafe {
        gemm_to(out.as_mut_ptr(), b.cols, a, b, parallelism);
        out.set_len(len);
    }
    out
}

fn parallelism(multiply_adds: usize) -> gemm::Parallelism {
    #[cfg(feature = "threads")]
    if multiply_adds >= PARALLEL_THRESHOLD {
        return gemm::Parallelism::Rayon(0);
    }
    let _ = (multiply_adds, PARALLEL_THRESHOLD);
    gemm::Parallelism::None
}

fn check(d: Dims, x: usize, w: usize, dy: Option<usize>) {
    assert!(
        x == d.n * d.k && w == d.k * d.m && dy.is_none_or(|dy| dy == d.n * d.m),
        "linear: x has {x} values, W {w} and dy {dy:?} for [{}, {}]·[{}, {}]",
        d.n,
        d.k,
        d.k,
        d.m
    );
}

/// `y = x·W + b`, `[n, m]`.
pub fn forward(x: &[f32], w: &[f32], b: &[f32], d: Dims) -> Vec<f32> {
    check(d, x.len(), w.len(), None);
    assert_eq!(b.len(), d.m, "linear: the bias has {} values", b.len());
    let mut y = product(
        Strided::rows(x, d.n, d.k, d.k),
        Strided::rows(w, d.k, d.m, d.m),
    );
    super::math::for_each_chunk(&mut y, ROWS_PER_TASK * d.m, |_, rows| {
        for row in rows.chunks_exact_mut(d.m) {
            for (y, b) in row.iter_mut().zip(b) {
                *y += b;
            }
        }
    });
    y
}

/// `dst = a·b` on the calling thread, `dst` row-major with row stride `dst_rs` (its columns
/// contiguous): for kernels that already run one task per core, such as attention's per
/// sequence.
pub fn matmul_into(dst: &mut [f32], dst_rs: usize, a: Strided<'_>, b: Strided<'_>) {
    let (m, n) = (a.rows, b.cols);
    assert!(
        m == 0 || n == 0 || ((m - 1) * dst_rs + n <= dst.len() && n <= dst_rs),
        "matmul: [{m}, {n}] does not fit its destination"
    );
    // SAFETY: the destination fits in `dst` (checked above), which is borrowed mutably and so
    // overlaps neither operand.
    unsafe { gemm_to(dst.as_mut_ptr(), dst_rs, a, b, gemm::Parallelism::None) }
}

/// Rows per parallel task of the bias passes.
const ROWS_PER_TASK: usize = 64;

/// `dx = dy·Wᵀ`, `[n, k]`.
pub fn input_grad(dy: &[f32], w: &[f32], d: Dims) -> Vec<f32> {
    check(d, d.n * d.k, w.len(), Some(dy.len()));
    product(
        Strided::rows(dy, d.n, d.m, d.m),
        Strided::rows(w, d.k, d.m, d.m).t(),
    )
}

/// `dW = xᵀ·dy`, `[k, m]`.
pub fn weight_grad(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    check(d, x.len(), d.k * d.m, Some(dy.len()));
    product(
        Strided::rows(x, d.n, d.k, d.k).t(),
        Strided::rows(dy, d.n, d.m, d.m),
    )
}

/// `db = Σ_rows dy`, `[m]`: per-task sums of fixed row blocks, added in task order, so the
/// result does not depend on the thread count.
pub fn bias_grad(dy: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(dy.len(), d.n * d.m, "linear: dy has {} values", dy.len());
    let tasks = d.n.div_ceil(ROWS_PER_TASK);
    let partial = super::math::map_indices(tasks, |t| {
        let rows = &dy[t * ROWS_PER_TASK * d.m..((t + 1) * ROWS_PER_TASK).min(d.n) * d.m];
        let mut sum = vec![0.0f32; d.m];
        for row in rows.chunks_exact(d.m) {
            for (s, g) in sum.iter_mut().zip(row) {
                *s += g;
            }
        }
        sum
    });
    let mut db = vec![0.0f32; d.m];
    for p in partial {
        for (s, g) in db.iter_mut().zip(p) {
            *s += g;
        }
    }
    db
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0)
            .collect()
    }

    #[test]
    fn forward_and_backward_are_the_products_they_name() {
        // Large enough for gemm's threads; odd sizes for its edge tiles.
        let d = Dims {
            n: 197,
            k: 131,
            m: 389,
        };
        let (x, w, b, dy) = (
            values(d.n * d.k, 1),
            values(d.k * d.m, 2),
            values(d.m, 3),
            values(d.n * d.m, 4),
        );
        let y = forward(&x, &w, &b, d);
        let dx = input_grad(&dy, &w, d);
        let dw = weight_grad(&x, &dy, d);
        let db = bias_grad(&dy, d);
        let close = |got: f32, want: f64, what: &str| {
            assert!(
                (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{what}: {got} vs {want}"
            )
        };
        for r in (0..d.n).step_by(13) {
            for c in (0..d.m).step_by(17) {
                let want: f64 = (0..d.k)
                    .map(|i| x[r * d.k + i] as f64 * w[i * d.m + c] as f64)
                    .sum::<f64>()
                    + b[c] as f64;
                close(y[r * d.m + c], want, "y");
            }
            for c in (0..d.k).step_by(11) {
                let want: f64 = (0..d.m)
                    .map(|j| dy[r * d.m + j] as f64 * w[c * d.m + j] as f64)
                    .sum();
                close(dx[r * d.k + c], want, "dx");
            }
        }
        for i in (0..d.k).step_by(7) {
            for j in (0..d.m).step_by(19) {
                let want: f64 = (0..d.n)
                    .map(|r| x[r * d.k + i] as f64 * dy[r * d.m + j] as f64)
                    .sum();
                close(dw[i * d.m + j], want, "dW");
            }
        }
        for j in 0..d.m {
            let want: f64 = (0..d.n).map(|r| dy[r * d.m + j] as f64).sum();
            close(db[j], want, "db");
        }
    }
}
