// Exact GELU forward, y = x·Φ(x) = 0.5·x·(1 + erf(x / √2)), one invocation a value
// (`erf.wgsl` is prepended). The fused op that replaces the five primitive ops (and four
// intermediate buffers) burn composes GELU of.
//
// Bindings: x (read), y (write), info = [len].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let i = flat_index(id, groups, 256u);
    if i < info[0] {
        let v = x[i];
        y[i] = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
    }
}
