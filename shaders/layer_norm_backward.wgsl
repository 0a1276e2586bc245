// LayerNorm backward to the input, one workgroup of LANES invocations a row
// (`workgroup_sum.wgsl` is prepended), from the saved mean and rstd:
//   x̂ = (x − mean)·rstd,  g = dy·γ,  dx = rstd·(g − mean(g) − x̂·mean(g·x̂)).
// γ's and β's gradients (sums over rows) are `layer_norm_params.wgsl`'s.
//
// Bindings: x, gamma, stats, dy (read), dx (write), info = [n, c].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = group_index(group, groups);
    let c = info[1];
    let live = row < info[0];
    let cols = select(0u, c, live);
    let base = row * c;
    var mean = 0.0;
    var rstd = 0.0;
    if live {
        mean = stats[2u * row];
        rstd = stats[2u * row + 1u];
    }
    var s = vec2<f32>(0.0, 0.0);
    for (var j = lane; j < cols; j = j + LANES) {
        let g = dy[base + j] * gamma[j];
        s = s + vec2<f32>(g, g * (x[base + j] - mean) * rstd);
    }
    let m = workgroup_sum2(lane, s) / f32(c);
    for (var j = lane; j < cols; j = j + LANES) {
        let g = dy[base + j] * gamma[j];
        let xhat = (x[base + j] - mean) * rstd;
        dx[base + j] = rstd * (g - m.x - xhat * m.y);
    }
}
