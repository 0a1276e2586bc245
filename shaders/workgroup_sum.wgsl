// Sums across a workgroup of LANES invocations (a tree in workgroup memory), prepended to the
// row kernels. Every invocation of the workgroup must call them, from uniform control flow
// (they hold barriers), and each gets the total.

const LANES: u32 = 64u;

var<workgroup> partial: array<vec2<f32>, LANES>;

fn workgroup_sum2(lane: u32, v: vec2<f32>) -> vec2<f32> {
    partial[lane] = v;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
        if lane < s {
            partial[lane] = partial[lane] + partial[lane + s];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

fn workgroup_sum(lane: u32, v: f32) -> f32 {
    return workgroup_sum2(lane, vec2<f32>(v, 0.0)).x;
}
