// LayerNorm forward over the last dimension of rows x [n, c], one workgroup of LANES
// invocations a row (`workgroup_sum.wgsl` is prepended): the mean, then the variance about it
// (two passes, as the CPU kernel), then y = (x − mean)·rstd·γ + β; each row's mean and
// rstd = 1/√(var + eps) are kept for the backward.
//
// Bindings: x, gamma, beta (read), y, stats = [mean, rstd] a row (write), info = [n, c,
// bits of eps].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = group_index(group, groups);
    let c = info[1];
    let eps = bitcast<f32>(info[2]);
    // No early return (the sums hold barriers): a workgroup past the last row reads and
    // writes nothing.
    let live = row < info[0];
    let cols = select(0u, c, live);
    let base = row * c;
    var s = 0.0;
    for (var j = lane; j < cols; j = j + LANES) {
        s = s + x[base + j];
    }
    let mean = workgroup_sum(lane, s) / f32(c);
    var q = 0.0;
    for (var j = lane; j < cols; j = j + LANES) {
        let d = x[base + j] - mean;
        q = q + d * d;
    }
    let rstd = 1.0 / sqrt(workgroup_sum(lane, q) / f32(c) + eps);
    for (var j = lane; j < cols; j = j + LANES) {
        y[base + j] = (x[base + j] - mean) * rstd * gamma[j] + beta[j];
    }
    if live && lane == 0u {
        stats[2u * row] = mean;
        stats[2u * row + 1u] = rstd;
    }
}
