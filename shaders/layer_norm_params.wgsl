// LayerNorm backward to γ and β, one workgroup of LANES invocations a column
// (`workgroup_sum.wgsl` is prepended): dγ[j] = Σ_rows dy·x̂, dβ[j] = Σ_rows dy, with
// x̂ = (x − mean)·rstd from the saved statistics.
//
// Bindings: x, stats, dy (read), dgamma, dbeta (write), info = [n, c].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;
@group(0) @binding(2) var<storage, read_write> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let col = group_index(group, groups);
    let c = info[1];
    let live = col < c;
    let rows = select(0u, info[0], live);
    var s = vec2<f32>(0.0, 0.0);
    for (var i = lane; i < rows; i = i + LANES) {
        let g = dy[i * c + col];
        let xhat = (x[i * c + col] - stats[2u * i]) * stats[2u * i + 1u];
        s = s + vec2<f32>(g * xhat, g);
    }
    let total = workgroup_sum2(lane, s);
    if live && lane == 0u {
        dgamma[col] = total.x;
        dbeta[col] = total.y;
    }
}
