// Quantizes f32 values to signed integers of {{ bits }} bits with one absmax scale per chunk of
// {{ chunk }} values: the int8 (chunk 256) and int4 (chunk 64) codecs of tessera-protocol
// (`encode_int8`, `encode_int4`), computed where a GPU participant's update lives so that only
// the encoded bytes are read back.
//
// Eight invocations share a chunk: each quantizes a run of CHUNK / 8 values (32 int8, 8 int4:
// whole 32-bit words of output), the eight find the chunk's absmax together in workgroup memory
// (three steps), and a workgroup of 64 invocations covers 8 chunks. Per value:
//   scales[c]  = absmax(chunk c) / QMAX           (a NaN bit pattern if the chunk has a
//                                                   non-finite value: every decoder rejects it)
//   code       = round_ties_even(clamp(v * (1 / scale), -QMAX, QMAX))   (0 where scale is 0)
//   packed[w]  = the codes of values w·PER_WORD .. (w+1)·PER_WORD, the first in the lowest bits
//                (two's complement), so the words' little-endian bytes are the codec's bytes.
//
// The relay applies the decoded values, whoever encoded them; WGSL's division is not required
// to be correctly rounded, so a GPU's scale may differ from the CPU's in its last bit and a code
// that lies on a rounding tie may differ by one (crates/protocol/tests/wgsl.rs measures it).
//
// Bindings: values (read), scales (write), packed (write), info = [len].

@group(0) @binding(0) var<storage, read_write> values: array<f32>;
@group(0) @binding(1) var<storage, read_write> scales: array<f32>;
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const CHUNK: u32 = {{ chunk }}u;
const BITS: u32 = {{ bits }}u;
const QMAX: f32 = {{ qmax }};
const PER_WORD: u32 = 32u / BITS;
// Invocations a chunk, values and words an invocation.
const LANES: u32 = 8u;
const RUN: u32 = CHUNK / LANES;
const WORDS: u32 = RUN / PER_WORD;
const GROUP: u32 = 64u;
const MASK: u32 = (1u << BITS) - 1u;
const EXPONENT: u32 = 0x7f800000u;

var<workgroup> peak: array<f32, GROUP>;
var<workgroup> bad: array<u32, GROUP>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // Workgroups beyond 65,535 spill into the y dimension of the dispatch.
    let t = (group.x + group.y * groups.x) * GROUP + lane;
    let len = info[0];
    let first = t * RUN;
    let chunk = t / LANES;
    let leader = lane - lane % LANES;
    // No early return: every invocation reaches every barrier; only the writes are guarded.
    var v: array<f32, RUN>;
    var m = 0.0;
    var nonfinite = 0u;
    for (var k = 0u; k < RUN; k = k + 1u) {
        var x = 0.0;
        if first + k < len {
            x = values[first + k];
        }
        v[k] = x;
        // Non-finite by the exponent bits: WGSL may assume floats are finite, bit tests it
        // may not.
        nonfinite = nonfinite | select(0u, 1u, (bitcast<u32>(x) & EXPONENT) == EXPONENT);
        m = max(m, abs(x));
    }
    peak[lane] = m;
    bad[lane] = nonfinite;
    workgroupBarrier();
    for (var half = LANES / 2u; half > 0u; half = half / 2u) {
        if lane % LANES < half {
            peak[lane] = max(peak[lane], peak[lane + half]);
            bad[lane] = bad[lane] | bad[lane + half];
        }
        workgroupBarrier();
    }
    let flag = bad[leader];
    let finite = flag == 0u;
    var scale = peak[leader] / QMAX;
    if !finite {
        // A quiet NaN made at run time: a constant NaN is a shader-creation error in WGSL
        // (Chrome's Tint refuses it; naga does not).
        scale = bitcast<f32>(0x7fc00000u | flag);
    }
    if lane == leader && chunk * CHUNK < len {
        scales[chunk] = scale;
    }
    var inv = 0.0;
    if finite && scale > 0.0 {
        inv = 1.0 / scale;
    }
    for (var j = 0u; j < WORDS; j = j + 1u) {
        if first + j * PER_WORD < len {
            var word = 0u;
            for (var k = 0u; k < PER_WORD; k = k + 1u) {
                let x = clamp(v[j * PER_WORD + k] * inv, -QMAX, QMAX);
                word = word | ((bitcast<u32>(i32(round(x))) & MASK) << (k * BITS));
            }
            packed[t * WORDS + j] = word;
        }
    }
}
