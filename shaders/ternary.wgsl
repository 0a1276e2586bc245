// Encodes f32 values in three levels (-scale, 0, +scale) with one scale per chunk of
// {{ chunk }} values: the ternary codec of tessera-protocol (`encode_ternary`), computed where a
// GPU participant's update lives so that it reads back about 2 bits a value instead of 32.
//
// A workgroup is a chunk; each of its {{ lanes }} invocations encodes a run of 32 values (one
// 32-bit word of mask and one of signs). The lanes find the chunk's sums together in workgroup
// memory. Per chunk c:
//   dead       = {{ dead_zone }} × mean |v|            (a value at most this far from 0 is sent as 0)
//   scales[c]  = Σ v² / Σ_{|v| > dead} |v|             (0 when nothing is kept; a NaN bit pattern
//                                                      if the chunk has a non-finite value: every
//                                                      decoder rejects it)
//   packed[2w]     = mask: bit k set when value 32w + k is sent (|v| > dead)
//   packed[2w + 1] = signs: bit k set when value 32w + k is sent and negative
// The CPU packs the sign bits of the sent values one after another (`Payload::from_quantized`),
// which makes the codec's bytes.
//
// The sums are f32 in the GPU's order (the CPU's are f64): a value within rounding of the dead
// zone's edge may be sent by one and not the other, and the scales differ in their last bits.
// The relay applies the decoded values, whoever encoded them (crates/protocol/tests/wgsl.rs
// measures how far they are apart).
//
// Bindings: values (read), scales (write), packed (write), info = [len].

@group(0) @binding(0) var<storage, read_write> values: array<f32>;
@group(0) @binding(1) var<storage, read_write> scales: array<f32>;
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const CHUNK: u32 = {{ chunk }}u;
const LANES: u32 = {{ lanes }}u;
const DEAD_ZONE: f32 = {{ dead_zone }};
const EXPONENT: u32 = 0x7f800000u;
// The largest finite f32, by its bits: a decimal literal of it (3.40282347e38) lies past it,
// which Chrome's Tint refuses as a shader-creation error (naga rounds it).
const F32_MAX_BITS: u32 = 0x7f7fffffu;

var<workgroup> first_sum: array<f32, LANES>;
var<workgroup> second_sum: array<f32, LANES>;
var<workgroup> bad: array<u32, LANES>;

@compute @workgroup_size({{ lanes }}, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // Workgroups beyond 65,535 spill into the y dimension of the dispatch.
    let chunk = group.x + group.y * groups.x;
    let len = info[0];
    let word = chunk * LANES + lane;
    let first = word * 32u;
    // No early return: every invocation reaches every barrier; only the writes are guarded.
    var v: array<f32, 32>;
    var magnitudes = 0.0;
    var nonfinite = 0u;
    for (var k = 0u; k < 32u; k = k + 1u) {
        var x = 0.0;
        if first + k < len {
            x = values[first + k];
        }
        v[k] = x;
        // Non-finite by the exponent bits: WGSL may assume floats are finite, bit tests it
        // may not.
        nonfinite = nonfinite | select(0u, 1u, (bitcast<u32>(x) & EXPONENT) == EXPONENT);
        magnitudes = magnitudes + abs(x);
    }
    first_sum[lane] = magnitudes;
    bad[lane] = nonfinite;
    workgroupBarrier();
    for (var half = LANES / 2u; half > 0u; half = half / 2u) {
        if lane < half {
            first_sum[lane] = first_sum[lane] + first_sum[lane + half];
            bad[lane] = bad[lane] | bad[lane + half];
        }
        workgroupBarrier();
    }
    let start = chunk * CHUNK;
    let count = select(0u, min(CHUNK, len - start), start < len);
    let dead = first_sum[0] / f32(max(count, 1u)) * DEAD_ZONE;
    let flag = bad[0];
    // Every lane has read the first sums before they are reused.
    workgroupBarrier();
    var mask = 0u;
    var signs = 0u;
    var kept = 0.0;
    var squares = 0.0;
    for (var k = 0u; k < 32u; k = k + 1u) {
        let a = abs(v[k]);
        squares = squares + a * a;
        if a > dead {
            kept = kept + a;
            mask = mask | (1u << k);
            signs = signs | (select(0u, 1u, v[k] < 0.0) << k);
        }
    }
    first_sum[lane] = kept;
    second_sum[lane] = squares;
    workgroupBarrier();
    for (var half = LANES / 2u; half > 0u; half = half / 2u) {
        if lane < half {
            first_sum[lane] = first_sum[lane] + first_sum[lane + half];
            second_sum[lane] = second_sum[lane] + second_sum[lane + half];
        }
        workgroupBarrier();
    }
    var scale = 0.0;
    if first_sum[0] > 0.0 {
        scale = min(second_sum[0] / first_sum[0], bitcast<f32>(F32_MAX_BITS));
    }
    if flag != 0u {
        // A quiet NaN made at run time: a constant NaN is a shader-creation error in WGSL
        // (Chrome's Tint refuses it; naga does not).
        scale = bitcast<f32>(0x7fc00000u | flag);
    }
    if lane == 0u && start < len {
        scales[chunk] = scale;
    }
    if first < len {
        packed[2u * word] = mask;
        packed[2u * word + 1u] = signs;
    }
}
