// One AdamW step of a flat parameter, an invocation a value (`index.wgsl` is prepended): the
// parameter, its two moments and its gradient read once, the three results written, where
// burn's composed ops take a dozen dispatches and buffers a parameter. The same f32 operations
// in the same order as the CPU kernel (crates/core/src/kernels/adamw.rs) and the composed step:
//   g = grad·clip,  m = m·β₁ + g·(1 − β₁),  v = v·β₂ + g²·(1 − β₂),
//   p = p·decay − (m / (√(v / bc₂) + ε))·step_size.
//
// Bindings: param, grad, exp_avg, exp_avg_sq, clip ([1]) (read), param_out, exp_avg_out,
// exp_avg_sq_out (write), info = [len, then the bits of β₁, 1 − β₁, β₂, 1 − β₂, bc₂, ε,
// step_size, decay].

@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(4) var<storage, read_write> clip: array<f32>;
@group(0) @binding(5) var<storage, read_write> param_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> exp_avg_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> exp_avg_sq_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> info: array<u32>;

fn scalar(k: u32) -> f32 {
    return bitcast<f32>(info[k]);
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let i = flat_index(id, groups, 256u);
    if i < info[0] {
        let g = grad[i] * clip[0];
        let m = exp_avg[i] * scalar(1u) + g * scalar(2u);
        let v = exp_avg_sq[i] * scalar(3u) + (g * g) * scalar(4u);
        let denom = sqrt(v / scalar(5u)) + scalar(6u);
        let update = (m / denom) * scalar(7u);
        param_out[i] = param[i] * scalar(8u) - update;
        exp_avg_out[i] = m;
        exp_avg_sq_out[i] = v;
    }
}
