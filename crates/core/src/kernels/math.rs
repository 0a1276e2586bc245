//! Scalar building blocks written so the compiler vectorises the loops that call them (no
//! libm calls, no branches): `exp` and `erf` for f32, and the row-parallel drivers.

/// `e^x` for f32 (Cephes' `expf`: a degree-6 polynomial on `[-ln2/2, ln2/2]` scaled by `2^n`),
/// within 2 ulp on the range that matters here; inputs below −87.3 give ≈ 1e-38, not 0.
/// Branch-free and without a float-to-int conversion, so loops calling it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// `a·b + c`, as one fused multiply-add when `FMA` (pass it only from code compiled with the
/// `fma` target feature: elsewhere `mul_add` is a library call), else as a multiply and an add.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// [`exp`] with its polynomial in fused multiply-adds when `FMA` (see [`madd`]).
#[inline(always)]
pub fn exp_with<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer n and leaves n in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let shifted = madd::<FMA>(x, LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p * r, r, r + 1.0);
    // 2^n from the integer bits: n is in [-126, 128] after the clamp.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// Width of the independent partial sums below (one AVX-512 register, two AVX2 ones).
pub const LANES: usize = 16;

/// `Σ x` with [`LANES`] partial sums (so it vectorises), combined in a fixed order.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    fold(acc) + it.remainder().iter().sum::<f32>()
}

/// `max x` (−∞ for an empty slice) with [`LANES`] partial maxima.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = it
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Pairwise sum of the lanes, always in the same order.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// The error function for f32 (the rational approximation Eigen and XLA use: odd degree-13
/// numerator over even degree-8 denominator on `[-4, 4]`, ±1 beyond), within a few ulp.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with::<false>(x)
}

/// [`erf`] with its polynomials in fused multiply-adds when `FMA` (see [`madd`]).
#[inline(always)]
pub fn erf_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = madd::<FMA>(p, x2, 2.770_681_4e-8);
    p = madd::<FMA>(p, x2, -2.101_024e-6);
    p = madd::<FMA>(p, x2, -5.692_506_4e-5);
    p = madd::<FMA>(p, x2, -7.349_906_3e-4);
    p = madd::<FMA>(p, x2, -2.954_6e-3);
    p = madd::<FMA>(p, x2, -1.609_603_3e-2);
    let p = p * x;
    let mut q = -1.456_607_2e-5_f32;
    q = madd::<FMA>(q, x2, -2.133_740_6e-4);
    q = madd::<FMA>(q, x2, -1.682_827e-3);
    q = madd::<FMA>(q, x2, -7.373_329e-3);
    q = madd::<FMA>(q, x2, -1.426_474e-2);
    p / q
}

/// `Σ a[i]·b[i]` with [`LANES`] partial sums, combined in a fixed order.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    fold(acc) + tail
}

/// Runs `f(index, chunk)` over `data.chunks_mut(chunk)`, on rayon's pool when the `threads`
/// feature is on. Chunks are fixed by `chunk`, never by the thread count, so results that
/// combine per-chunk partials are the same on one thread or many.
pub fn for_each_chunk<F>(data: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    let chunk = chunk.max(1);
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
    #[cfg(not(feature = "threads"))]
    data.chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i, c));
}

/// Like [`for_each_chunk`] over two buffers cut into the same number of chunks.
pub fn for_each_chunk2<F>(a: &mut [f32], chunk_a: usize, b: &mut [f32], chunk_b: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Send + Sync,
{
    let (chunk_a, chunk_b) = (chunk_a.max(1), chunk_b.max(1));
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        a.par_chunks_mut(chunk_a)
            .zip(b.par_chunks_mut(chunk_b))
            .enumerate()
            .for_each(|(i, (x, y))| f(i, x, y));
    }
    #[cfg(not(feature = "threads"))]
    a.chunks_mut(chunk_a)
        .zip(b.chunks_mut(chunk_b))
        .enumerate()
        .for_each(|(i, (x, y))| f(i, x, y));
}

/// `f(index)` for `0..n` collected in order, in parallel with the `threads` feature.
pub fn map_indices<T, F>(n: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Send + Sync,
{
    #[cfg(feature = "threads")]
    {
        use rayon::prelude::*;
        (0..n).into_par_iter().map(f).collect()
    }
    #[cfg(not(feature = "threads"))]
    (0..n).map(f).collect()
}

/// erf in f64 (reference for tests): the Abramowitz–Stegun 7.1.5 series for |x| ≤ 3, the
/// continued fraction of erfc beyond.
#[cfg(test)]
pub(crate) fn erf_f64(x: f64) -> f64 {
    if x.abs() <= 3.0 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        let t = x.abs();
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (t + f);
        }
        let erfc = (-t * t).exp() / std::f64::consts::PI.sqrt() / (t + f);
        x.signum() * (1.0 - erfc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_within_two_ulp_relative() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
    }

    #[test]
    fn fused_multiply_add_variants_are_as_accurate() {
        for i in 0..=20_000 {
            let x = -80.0 + i as f32 * 0.008;
            let want = (x as f64).exp();
            let rel = ((exp_with::<true>(x) as f64 - want) / want).abs();
            assert!(rel < 3e-7, "exp({x}) off by {rel:e}");
            let y = x / 16.0;
            let err = (erf_with::<true>(y) as f64 - erf_f64(y as f64)).abs();
            assert!(err < 5e-7, "erf({y}) off by {err:e}");
        }
    }

    #[test]
    fn erf_matches_the_library() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -6.0 + 12.0 * i as f32 / 200_000.0;
            let want = erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
        }
        assert!(worst < 5e-7, "worst absolute error {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 2e-7 && erf(-10.0) == -erf(10.0));
    }

    #[test]
    fn sums_and_maxima() {
        let x: Vec<f32> = (0..53).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(max(&x), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[-3.0; 40]), -3.0);
    }

    #[test]
    fn dot_sums_products() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.1).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-3);
    }

    #[test]
    fn chunk_drivers_visit_every_chunk_once() {
        let mut v = vec![0.0f32; 103];
        for_each_chunk(&mut v, 10, |i, c| c.iter_mut().for_each(|x| *x += i as f32));
        assert_eq!(v[0], 0.0);
        assert_eq!(v[102], 10.0);
        let mut a = vec![0.0f32; 20];
        let mut b = vec![0.0f32; 10];
        for_each_chunk2(&mut a, 4, &mut b, 2, |i, x, y| {
            x.fill(i as f32);
            y.fill(-(i as f32));
        });
        assert_eq!((a[19], b[9]), (4.0, -4.0));
        assert_eq!(map_indices(5, |i| i * i), vec![0, 1, 4, 9, 16]);
    }
}
