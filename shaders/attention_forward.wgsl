// Causal self-attention forward, an invocation a query row (`attention_common.wgsl` is
// prepended): for row i of a (sequence, head), one pass over keys j ≤ i with an online softmax
//   s_j = q_i·k_j / √DH,  y_i = Σ_j softmax(s)_j · v_j,
// keeping the row's log-sum-exp so the backward recomputes the probabilities instead of
// storing the T×T matrix. No scores, mask or softmax buffers: one dispatch where burn composes
// a dozen ops.
//
// Bindings: qkv (read), y (write), lse (write, [batch, heads, T]), info.

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

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
    var acc: array<f32, DH>;
    let qi = qkv_at(r, r.i, 0u);
    for (var d = 0u; d < DH; d = d + 1u) {
        q[d] = qkv[qi + d] * sc;
        acc[d] = 0.0;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j <= r.i; j = j + 1u) {
        let kj = qkv_at(r, j, 1u);
        var s = 0.0;
        for (var d = 0u; d < DH; d = d + 1u) {
            s = s + q[d] * qkv[kj + d];
        }
        let m2 = max(m, s);
        let shrink = exp(m - m2);
        let p = exp(s - m2);
        l = l * shrink + p;
        let vj = qkv_at(r, j, 2u);
        for (var d = 0u; d < DH; d = d + 1u) {
            acc[d] = acc[d] * shrink + p * qkv[vj + d];
        }
        m = m2;
    }
    let yi = out_at(r, r.i);
    for (var d = 0u; d < DH; d = d + 1u) {
        y[yi + d] = acc[d] / l;
    }
    lse[stat_at(r, r.i)] = m + log(l);
}
