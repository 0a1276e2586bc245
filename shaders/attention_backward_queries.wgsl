// Causal self-attention backward, first pass: an invocation a query row i
// (`attention_common.wgsl` is prepended). With P_ij = exp(q_i·k_j/√DH − lse_i) recomputed,
//   D_i  = dy_i·y_i,
//   dq_i = Σ_{j ≤ i} P_ij (dy_i·v_j − D_i) k_j / √DH,
// written into the query columns of dqkv; D_i is kept for the second pass
// (`attention_backward_keys.wgsl`), which writes the key and value columns.
//
// Bindings: qkv, y, lse, dy (read), dqkv, dd (write, [batch, heads, T]), info.

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dqkv: array<f32>;
@group(0) @binding(5) var<storage, read_write> dd: array<f32>;
@group(0) @binding(6) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let r = attention_row(group, groups, lane);
    if !r.live {
        return;
    }
    let sc = scale();
    var q: array<f32, DH>;
    var g: array<f32, DH>;
    var dq: array<f32, DH>;
    let qi = qkv_at(r, r.i, 0u);
    let yi = out_at(r, r.i);
    var di = 0.0;
    for (var d = 0u; d < DH; d = d + 1u) {
        q[d] = qkv[qi + d] * sc;
        g[d] = dy[yi + d];
        di = di + g[d] * y[yi + d];
        dq[d] = 0.0;
    }
    let li = lse[stat_at(r, r.i)];
    for (var j = 0u; j <= r.i; j = j + 1u) {
        let kj = qkv_at(r, j, 1u);
        let vj = qkv_at(r, j, 2u);
        var s = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < DH; d = d + 1u) {
            s = s + q[d] * qkv[kj + d];
            dp = dp + g[d] * qkv[vj + d];
        }
        let ds = exp(s - li) * (dp - di) * sc;
        for (var d = 0u; d < DH; d = d + 1u) {
            dq[d] = dq[d] + ds * qkv[kj + d];
        }
    }
    for (var d = 0u; d < DH; d = d + 1u) {
        dqkv[qi + d] = dq[d];
    }
    dd[stat_at(r, r.i)] = di;
}
