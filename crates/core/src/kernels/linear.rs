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
//! over raw pointers and strides (as burn's flex calls it). Its uses are the private
//! [`product`] and its three callers, each stating why its pointers cover its shapes, and
//! [`matmul_into`], which checks its slices' bounds first.
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

/// `out[rows, cols] = lhs[rows, inner] · rhs[inner, cols]`, each operand given by its pointer
/// and its (row, column) strides in elements, into a fresh row-major buffer.
///
/// # Safety
/// `lhs` and `rhs` must address every element their shape and strides name.
unsafe fn product(
    (rows, inner, cols): (usize, usize, usize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) -> Vec<f32> {
    let len = rows * cols;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let parallelism = parallelism(rows * inner * cols);
    // SAFETY: `out` has room for `rows × cols` values, which gemm writes (row stride `cols`,
    // column stride 1) without reading them (`read_dst` false), before the length is set.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            out.as_mut_ptr(),
            1,
            cols as isize,
            false,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
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

fn check(d: Dims, x: usize, w: usize) {
    assert!(
        x == d.n * d.k && w == d.k * d.m,
        "linear: x has {x} values and W {w} for [{}, {}]·[{}, {}]",
        d.n,
        d.k,
        d.k,
        d.m
    );
}

/// `y = x·W + b`, `[n, m]`.
pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, d: Dims) -> Vec<f32> {
    check(d, x.len(), w.len());
    let (k, m) = (d.k as isize, d.m as isize);
    // SAFETY: `x` is `[n, k]` and `w` `[k, m]`, both row-major (checked above).
    let mut y = unsafe { product((d.n, d.k, d.m), (x.as_ptr(), k, 1), (w.as_ptr(), m, 1)) };
    if let Some(b) = b {
        assert_eq!(b.len(), d.m, "linear: the bias has {} values", b.len());
        super::math::for_each_chunk(&mut y, ROWS_PER_TASK * d.m, |_, rows| {
            for row in rows.chunks_exact_mut(d.m) {
                for (y, b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            }
        });
    }
    y
}

/// A matrix inside a slice: element `(r, c)` at `r·rs + c·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
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

/// `dst = a·b` on the calling thread, `dst` row-major with row stride `dst_rs` (its columns
/// contiguous): for kernels that already run one task per core, such as attention's per
/// sequence.
pub fn matmul_into(dst: &mut [f32], dst_rs: usize, a: Strided<'_>, b: Strided<'_>) {
    assert_eq!(
        a.cols, b.rows,
        "matmul: [{}, {}]·[{}, {}]",
        a.rows, a.cols, b.rows, b.cols
    );
    a.check("lhs");
    b.check("rhs");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len() && n <= dst_rs,
        "matmul: [{m}, {n}] does not fit its destination"
    );
    // SAFETY: every element gemm reads lies inside `a.data` or `b.data` and every element it
    // writes inside `dst` (checked above); `dst` is borrowed mutably, so it overlaps neither.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
            gemm::Parallelism::None,
        );
    }
}

/// Rows per parallel task of the bias passes.
const ROWS_PER_TASK: usize = 64;

/// `dx = dy·Wᵀ`, `[n, k]`.
pub fn input_grad(dy: &[f32], w: &[f32], d: Dims) -> Vec<f32> {
    check(d, d.n * d.k, w.len());
    assert_eq!(dy.len(), d.n * d.m, "linear: dy has {} values", dy.len());
    let m = d.m as isize;
    // SAFETY: `dy` is `[n, m]` row-major; `Wᵀ` `[m, k]` is `w` read with strides (1, m).
    unsafe { product((d.n, d.m, d.k), (dy.as_ptr(), m, 1), (w.as_ptr(), 1, m)) }
}

/// `dW = xᵀ·dy`, `[k, m]`.
pub fn weight_grad(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    check(d, x.len(), d.k * d.m);
    assert_eq!(dy.len(), d.n * d.m, "linear: dy has {} values", dy.len());
    let (k, m) = (d.k as isize, d.m as isize);
    // SAFETY: `xᵀ` `[k, n]` is `x` read with strides (1, k); `dy` is `[n, m]` row-major.
    unsafe { product((d.k, d.n, d.m), (x.as_ptr(), 1, k), (dy.as_ptr(), m, 1)) }
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
        let y = forward(&x, &w, Some(&b), d);
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
        assert_eq!(forward(&x, &w, None, d).len(), d.n * d.m);
    }
}
