// Where an invocation or a workgroup is in a one-dimensional launch whose workgroup count
// spills into the dispatch's y dimension past 65,535 (WebGPU's limit a dimension). Prepended
// to every kernel launched by `crates/core/src/kernels/gpu.rs`.

// The index of an invocation of GROUP-wide workgroups.
fn flat_index(id: vec3<u32>, groups: vec3<u32>, group: u32) -> u32 {
    return id.x + id.y * groups.x * group;
}

// The index of a workgroup.
fn group_index(group: vec3<u32>, groups: vec3<u32>) -> u32 {
    return group.x + group.y * groups.x;
}
