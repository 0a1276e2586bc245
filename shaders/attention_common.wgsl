// What the causal self-attention kernels share (prepended to each): the layout of the fused
// projection's rows, qkv [batch·T, 3C] (a row's queries, keys and values side by side, head h
// at columns h·DH within each), the output [batch·T, C] (heads merged), and the indexing of a
// launch of one workgroup of LANES invocations per (sequence, head, block of LANES rows).
//
// info = [batch, T, heads]; DH (a head's width) is a template constant, the size of the
// per-invocation arrays.

const DH: u32 = {{ dh }}u;
const LANES: u32 = 64u;

struct Row {
    // Whether this invocation has a row (the last block of a sequence may be partial).
    live: bool,
    // Sequence, head, row within the sequence.
    b: u32,
    h: u32,
    i: u32,
    t: u32,
    heads: u32,
    // Model width C = heads·DH.
    c: u32,
}

fn attention_row(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> Row {
    let batch = info[0];
    let t = info[1];
    let heads = info[2];
    let blocks = (t + LANES - 1u) / LANES;
    let g = group_index(group, groups);
    var r: Row;
    r.t = t;
    r.heads = heads;
    r.c = heads * DH;
    r.b = g / (heads * blocks);
    r.h = (g / blocks) % heads;
    r.i = (g % blocks) * LANES + lane;
    r.live = r.b < batch && r.i < t;
    return r;
}

// Where row j's queries (part 0), keys (1) or values (2) of head h start in qkv.
fn qkv_at(r: Row, j: u32, part: u32) -> u32 {
    return (r.b * r.t + j) * 3u * r.c + part * r.c + r.h * DH;
}

// Where row j of head h starts in the output (and its gradient).
fn out_at(r: Row, j: u32) -> u32 {
    return (r.b * r.t + j) * r.c + r.h * DH;
}

// Index of row j of (sequence, head) in the per-row statistics (log-sum-exp, D).
fn stat_at(r: Row, j: u32) -> u32 {
    return (r.b * r.heads + r.h) * r.t + j;
}

fn scale() -> f32 {
    return 1.0 / sqrt(f32(DH));
}
