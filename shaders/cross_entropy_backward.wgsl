// Softmax cross-entropy backward, an invocation a logit (`index.wgsl` is prepended), from the
// saved log-sum-exp: dlogits[i, j] = (exp(logit − lse_i) − [j = target_i])·dloss_i.
//
// Bindings: logits, targets (i32), lse, dloss ([n]) (read), dlogits (write), info = [n, vocab].

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> dloss: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let k = flat_index(id, groups, 256u);
    let vocab = info[1];
    if k < info[0] * vocab {
        let i = k / vocab;
        let j = k % vocab;
        var p = exp(logits[k] - lse[i]);
        if j == u32(targets[i]) {
            p = p - 1.0;
        }
        dlogits[k] = p * dloss[i];
    }
}
