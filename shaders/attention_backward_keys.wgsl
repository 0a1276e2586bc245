// Causal self-attention backward, second pass: an invocation a key row j
// (`attention_common.wgsl` is prepended), after the first pass has written D
// (`attention_backward_queries.wgsl`). With P_ij = exp(q_i·k_j/√DH − lse_i) recomputed,
//   dv_j = Σ_{i ≥ j} P_ij dy_i,
//   dk_j = Σ_{i ≥ j} P_ij (dy_i·v_j − D_i) q_i / √DH,
// written into the key and value columns of dqkv.
//
// Bindings: qkv, lse, dy, dd (read), dqkv (write), info.

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> lse: array<f32>;
@group(0) @binding(2) var<storage, read_write> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dd: array<f32>;
@group(0) @binding(4) var<storage, read_write> dqkv: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

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
    let j = r.i;
    var k: array<f32, DH>;
    var v: array<f32, DH>;
    var dk: array<f32, DH>;
    var dv: array<f32, DH>;
    let kj = qkv_at(r, j, 1u);
    let vj = qkv_at(r, j, 2u);
    for (var d = 0u; d < DH; d = d + 1u) {
        k[d] = qkv[kj + d] * sc;
        v[d] = qkv[vj + d];
        dk[d] = 0.0;
        dv[d] = 0.0;
    }
    for (var i = j; i < r.t; i = i + 1u) {
        let qi = qkv_at(r, i, 0u);
        let yi = out_at(r, i);
        var s = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < DH; d = d + 1u) {
            s = s + k[d] * qkv[qi + d];
            dp = dp + dy[yi + d] * v[d];
        }
        let at = stat_at(r, i);
        let p = exp(s - lse[at]);
        let ds = p * (dp - dd[at]) * sc;
        for (var d = 0u; d < DH; d = d + 1u) {
            dv[d] = dv[d] + p * dy[yi + d];
            dk[d] = dk[d] + ds * qkv[qi + d];
        }
    }
    for (var d = 0u; d < DH; d = d + 1u) {
        dqkv[kj + d] = dk[d];
        dqkv[vj + d] = dv[d];
    }
}
