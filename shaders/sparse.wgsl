// Keeps the {{ k }} largest magnitudes of every chunk of 4096 values, each as its index and two
// bits, with the participant's error feedback: the sparse codec of tessera-protocol
// (`encode_sparse`, with `ErrorFeedback`), computed where a GPU participant's update lives, so
// that it reads back ~0.04 bytes a value and its residual never leaves the device.
//
// A workgroup is a chunk; each of its 256 invocations holds a run of 16 values. Per chunk:
//   u          = decay × residual + delta                 (the update meant, residual included)
//   threshold  = the k-th largest |u| (by the f32 bits of |u|, which order as the magnitudes do),
//                found by a radix select, a byte at a time from the top, in workgroup memory
//   kept       = every |u| above the threshold, and the first of those equal to it (ties to the
//                lower index), as the CPU's `select_nth` with index order does
//   mean       = Σ kept |u| / m, summed by one invocation in index order (the CPU's f32 order)
//   lo, hi     = the means of the kept magnitudes below and at or above `mean`, the CPU's rule
//                (a NaN bit pattern for both if the chunk has a non-finite value: every decoder
//                rejects it)
//   words      = [lo, hi, the kept indices two a word (the first in the low half), their 2-bit
//                codes sixteen a word (bit 0: negative, bit 1: hi)], a fixed stride a chunk;
//                the CPU cuts a short last chunk's and lays out the codec's bytes
//                (`Payload::from_sparse_words`)
//   carried    = u − the decoded value (u where nothing was sent): the next unit's residual.
//
// With a zero residual the kept values, the sums and the codes are the CPU's, bit for bit; the
// division that makes lo and hi is WGSL's, which need not be correctly rounded, and a GPU may
// fuse decay × residual + delta. The relay applies the decoded values, whoever encoded them
// (crates/protocol/tests/wgsl.rs measures it).
//
// Bindings: delta (read), residual (read), words (write), carried (write),
// info = [len, decay's f32 bits].

@group(0) @binding(0) var<storage, read_write> delta: array<f32>;
@group(0) @binding(1) var<storage, read_write> residual: array<f32>;
@group(0) @binding(2) var<storage, read_write> words: array<u32>;
@group(0) @binding(3) var<storage, read_write> carried: array<f32>;
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

const CHUNK: u32 = 4096u;
const LANES: u32 = 256u;
const RUN: u32 = 16u;
const K: u32 = {{ k }}u;
const INDEX_WORDS: u32 = (K + 1u) / 2u;
const CODE_WORDS: u32 = (K + 15u) / 16u;
const STRIDE: u32 = 2u + INDEX_WORDS + CODE_WORDS;
const EXPONENT: u32 = 0x7f800000u;

var<workgroup> histogram: array<atomic<u32>, 256>;
var<workgroup> scan: array<u32, LANES>;
// LANES = BLOCKS × BLOCKS.
const BLOCKS: u32 = 16u;
var<workgroup> block_start: array<u32, BLOCKS>;
var<workgroup> picked_index: array<u32, K>;
var<workgroup> picked_value: array<f32, K>;
var<workgroup> chosen_bucket: u32;
var<workgroup> chosen_need: u32;
// Not zeroed for us: burn's wgpu runtime creates shader modules without WGSL's zero
// initialisation of workgroup memory, so a workgroup sees what the last one left there.
var<workgroup> bad: atomic<u32>;
var<workgroup> levels: vec3<f32>;

// The sum of `x` over the lanes before this one (every lane calls it, in uniform control flow):
// sixteen lanes each sum a block of sixteen in order, one lane the blocks' totals. Three
// barriers where a tree takes eighteen (barriers are what a CPU implementation of WebGPU —
// lavapipe, SwiftShader — pays for most).
fn exclusive_sum(lane: u32, x: u32) -> u32 {
    scan[lane] = x;
    workgroupBarrier();
    if lane < BLOCKS {
        var running = 0u;
        for (var j = 0u; j < BLOCKS; j = j + 1u) {
            running = running + scan[lane * BLOCKS + j];
            scan[lane * BLOCKS + j] = running;
        }
    }
    workgroupBarrier();
    if lane == 0u {
        var running = 0u;
        for (var b = 0u; b < BLOCKS; b = b + 1u) {
            block_start[b] = running;
            running = running + scan[b * BLOCKS + BLOCKS - 1u];
        }
    }
    workgroupBarrier();
    let inclusive = scan[lane] + block_start[lane / BLOCKS];
    workgroupBarrier();
    return inclusive - x;
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // Workgroups beyond 65,535 spill into the y dimension of the dispatch.
    let chunk = group.x + group.y * groups.x;
    let len = info[0];
    let decay = bitcast<f32>(info[1]);
    let start = chunk * CHUNK;
    let n = select(0u, min(CHUNK, len - start), start < len);
    let m = min(K, n);
    let first = lane * RUN;
    if lane == 0u {
        atomicStore(&bad, 0u);
    }
    workgroupBarrier();
    // No early return: every invocation reaches every barrier; only the writes are guarded.
    var v: array<f32, RUN>;
    var mag: array<u32, RUN>;
    var nonfinite = 0u;
    for (var j = 0u; j < RUN; j = j + 1u) {
        var x = 0.0;
        if first + j < n {
            let i = start + first + j;
            x = decay * residual[i] + delta[i];
        }
        v[j] = x;
        mag[j] = bitcast<u32>(x) & 0x7fffffffu;
        // Non-finite by the exponent bits: WGSL may assume floats are finite, bit tests it
        // may not.
        nonfinite = nonfinite | select(0u, 1u, (mag[j] & EXPONENT) == EXPONENT);
    }
    atomicOr(&bad, nonfinite);

    // The m-th largest magnitude's bits, a byte a pass; `need` counts how many values equal
    // to the prefix found so far are still to be kept.
    var prefix = 0u;
    var mask = 0u;
    var need = m;
    for (var round = 0u; round < 4u; round = round + 1u) {
        let shift = 24u - 8u * round;
        atomicStore(&histogram[lane], 0u);
        workgroupBarrier();
        for (var j = 0u; j < RUN; j = j + 1u) {
            if first + j < n && (mag[j] & mask) == prefix {
                atomicAdd(&histogram[(mag[j] >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if lane == 0u {
            var above = 0u;
            var bucket = 0u;
            for (var b = 255i; b >= 0i; b = b - 1i) {
                let h = atomicLoad(&histogram[b]);
                if above + h >= need {
                    bucket = u32(b);
                    break;
                }
                above = above + h;
            }
            chosen_bucket = bucket;
            chosen_need = need - above;
        }
        workgroupBarrier();
        prefix = prefix | (chosen_bucket << shift);
        mask = mask | (255u << shift);
        need = chosen_need;
    }

    // Everything above the threshold, and the first `need` equal to it by index.
    var above = 0u;
    var equal = 0u;
    for (var j = 0u; j < RUN; j = j + 1u) {
        if first + j < n {
            above = above + select(0u, 1u, mag[j] > prefix);
            equal = equal + select(0u, 1u, mag[j] == prefix);
        }
    }
    // One scan of both counts (each at most 4096: 16 bits apiece). The equal values are
    // taken in index order, so the lanes before this one took min(equal before, need).
    let before = exclusive_sum(lane, (above << 16u) | equal);
    let equal_before = before & 0xffffu;
    let take_equal = min(equal, need - min(need, equal_before));
    var at = (before >> 16u) + min(equal_before, need);
    var taken = 0u;
    var picked = 0u;
    for (var j = 0u; j < RUN; j = j + 1u) {
        if first + j < n {
            var keep = mag[j] > prefix;
            if mag[j] == prefix && taken < take_equal {
                keep = true;
                taken = taken + 1u;
            }
            if keep && at < K {
                picked_index[at] = first + j;
                picked_value[at] = v[j];
                picked = picked | (1u << j);
                at = at + 1u;
            }
        }
    }
    workgroupBarrier();

    // The two magnitudes, summed in index order as the CPU sums them.
    if lane == 0u {
        var sum = 0.0;
        for (var j = 0u; j < m; j = j + 1u) {
            sum = sum + abs(picked_value[j]);
        }
        let mean = sum / f32(max(m, 1u));
        var low = 0.0;
        var lows = 0u;
        var high = 0.0;
        var highs = 0u;
        for (var j = 0u; j < m; j = j + 1u) {
            let a = abs(picked_value[j]);
            if a >= mean {
                high = high + a;
                highs = highs + 1u;
            } else {
                low = low + a;
                lows = lows + 1u;
            }
        }
        // Kept values of one magnitude can all fall under their f32 mean (rounding): then all
        // are sent low and hi is theirs too; lo ≤ hi whatever the rounding.
        var hi = 0.0;
        if highs > 0u {
            hi = high / f32(highs);
        } else if lows > 0u {
            hi = low / f32(lows);
        }
        var lo = hi;
        if lows > 0u {
            lo = min(low / f32(lows), hi);
        }
        let flag = atomicLoad(&bad);
        if flag != 0u {
            // A quiet NaN made at run time: a constant NaN is a shader-creation error in WGSL.
            lo = bitcast<f32>(0x7fc00000u | flag);
            hi = lo;
        }
        levels = vec3<f32>(mean, lo, hi);
        if n > 0u {
            words[chunk * STRIDE] = bitcast<u32>(lo);
            words[chunk * STRIDE + 1u] = bitcast<u32>(hi);
        }
    }
    workgroupBarrier();
    let mean = levels.x;
    let lo = levels.y;
    let hi = levels.z;

    let base = chunk * STRIDE + 2u;
    if n > 0u && lane < INDEX_WORDS {
        let j = 2u * lane;
        var w = 0u;
        if j < m {
            w = picked_index[j];
        }
        if j + 1u < m {
            w = w | (picked_index[j + 1u] << 16u);
        }
        words[base + lane] = w;
    }
    if n > 0u && lane < CODE_WORDS {
        var w = 0u;
        for (var t = 0u; t < 16u; t = t + 1u) {
            let j = 16u * lane + t;
            if j < m {
                let x = picked_value[j];
                let code = select(0u, 1u, x < 0.0) | (select(0u, 1u, abs(x) >= mean) << 1u);
                w = w | (code << (2u * t));
            }
        }
        words[base + INDEX_WORDS + lane] = w;
    }

    // What this update leaves out, for the next one.
    for (var j = 0u; j < RUN; j = j + 1u) {
        if first + j < n {
            var e = v[j];
            if ((picked >> j) & 1u) != 0u {
                let level = select(lo, hi, abs(e) >= mean);
                e = e - select(level, -level, e < 0.0);
            }
            carried[start + first + j] = e;
        }
    }
}
