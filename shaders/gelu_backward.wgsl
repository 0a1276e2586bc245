// Exact GELU backward, dx = dy·(Φ(x) + x·φ(x)), one invocation a value (`erf.wgsl` is
// prepended): recomputed from the saved input, nothing else kept from the forward.
//
// Bindings: x (read), dy (read), dx (write), info = [len].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let i = flat_index(id, groups, 256u);
    if i < info[0] {
        let v = x[i];
        let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}
