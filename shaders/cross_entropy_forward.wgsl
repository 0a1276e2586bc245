// Softmax cross-entropy forward, one workgroup of LANES invocations a row of logits
// [n, vocab] (`index.wgsl` and `workgroup_sum.wgsl` are prepended): the row's maximum, its
// log-sum-exp, and the loss lse − logit[target]; each row's log-sum-exp is kept for the
// backward. The mean over rows is burn's (one op).
//
// Bindings: logits, targets (i32) (read), losses, lse (write, [n]), info = [n, vocab].

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> losses: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

var<workgroup> peak: array<f32, LANES>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = group_index(group, groups);
    let vocab = info[1];
    // No early return (the sums hold barriers): a workgroup past the last row reads and
    // writes nothing.
    let live = row < info[0];
    let cols = select(0u, vocab, live);
    let base = row * vocab;
    var m = -3.0e38;
    for (var j = lane; j < cols; j = j + LANES) {
        m = max(m, logits[base + j]);
    }
    peak[lane] = m;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
        if lane < s {
            peak[lane] = max(peak[lane], peak[lane + s]);
        }
        workgroupBarrier();
    }
    let top = peak[0];
    var e = 0.0;
    for (var j = lane; j < cols; j = j + LANES) {
        e = e + exp(logits[base + j] - top);
    }
    let l = top + log(workgroup_sum(lane, e));
    if live && lane == 0u {
        lse[row] = l;
        losses[row] = l - logits[base + u32(targets[row])];
    }
}
