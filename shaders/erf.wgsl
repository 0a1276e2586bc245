// erf for f32 as the CPU kernels compute it (crates/core/src/kernels/math.rs, `erf`): a
// rational polynomial on [-4, 4] (erf is ±1 to f32 precision beyond), no branches. Prepended to
// the GELU kernels (after `index.wgsl`).

fn erf(x0: f32) -> f32 {
    let x = clamp(x0, -4.0, 4.0);
    let x2 = x * x;
    var p: f32 = -2.7261423e-10;
    p = p * x2 + 2.7706814e-8;
    p = p * x2 - 2.101024e-6;
    p = p * x2 - 5.6925064e-5;
    p = p * x2 - 7.3499063e-4;
    p = p * x2 - 2.9546e-3;
    p = p * x2 - 1.6096033e-2;
    var q: f32 = -1.4566072e-5;
    q = q * x2 - 2.1337406e-4;
    q = q * x2 - 1.682827e-3;
    q = q * x2 - 7.373329e-3;
    q = q * x2 - 1.426474e-2;
    return p * x / q;
}

const FRAC_1_SQRT_2: f32 = 0.70710678;
const FRAC_1_SQRT_2PI: f32 = 0.39894228;
