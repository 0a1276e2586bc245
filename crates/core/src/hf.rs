//! The model as the Hugging Face ecosystem loads it: a `GPT2LMHeadModel` folder's files, as bytes.
//!
//! Tessera's GPT is GPT-2's architecture (pre-LayerNorm blocks, learned positions, exact-erf
//! GELU, LayerNorm ε 1e-5, biases everywhere, LM head tied to the token embedding) and already
//! uses its parameter names; GPT-2 stores its four projections as `Conv1D` (`[in, out]`) where
//! Tessera, like PyTorch's `Linear`, stores `[out, in]`, so those are transposed. The tokenizer is
//! GPT-2's byte-level one with no merges and id = byte value, which is Tessera's tokenizer.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::Error;
use crate::checkpoint::weights_to_safetensors;
use crate::config::ModelConfig;
use crate::params::ParamSpec;

/// Whether `name` is one of GPT-2's `Conv1D` weights (stored transposed).
fn is_conv1d(name: &str) -> bool {
    name.ends_with(".weight")
        && [
            ".attn.c_attn.",
            ".attn.c_proj.",
            ".mlp.c_fc.",
            ".mlp.c_proj.",
        ]
        .iter()
        .any(|p| name.contains(p))
}

/// The weights (flat, in `specs` order) as a `GPT2LMHeadModel` `model.safetensors`.
pub fn gpt2_safetensors(
    specs: &[ParamSpec],
    values: &[f32],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, Error> {
    let mut out_specs = Vec::with_capacity(specs.len());
    let mut out = vec![0f32; values.len()];
    for s in specs {
        let v = &values[s.offset..s.offset + s.numel()];
        let dst = &mut out[s.offset..s.offset + s.numel()];
        let mut spec = s.clone();
        if is_conv1d(&s.name) {
            let [rows, cols] = s.shape[..] else {
                return Err(Error::Checkpoint(format!("{} is not a matrix", s.name)));
            };
            for r in 0..rows {
                for c in 0..cols {
                    dst[c * rows + r] = v[r * cols + c];
                }
            }
            spec.shape = vec![cols, rows];
        } else {
            dst.copy_from_slice(v);
        }
        out_specs.push(spec);
    }
    let mut meta = metadata;
    meta.insert("format".into(), "pt".into());
    weights_to_safetensors(&out_specs, &out, meta)
}

/// `config.json` of the `GPT2LMHeadModel`.
pub fn gpt2_config(m: &ModelConfig) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.block_size,
        "n_ctx": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": 4 * m.n_embd,
        // Exact (erf) GELU, as Tessera's: not GPT-2's tanh approximation "gelu_new".
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": true,
        // Bytes have no special tokens (GPT-2's default, 50256, is outside 256 ids).
        "bos_token_id": null,
        "eos_token_id": null,
        "use_cache": true,
        "torch_dtype": "float32",
    })
}

/// GPT-2's reversible map from bytes to printable characters (printable Latin-1 bytes map to
/// themselves, the others to U+0100 onwards, in byte order).
pub fn byte_to_char(b: u8) -> char {
    let printable = |x: u32| (0x21..=0x7e).contains(&x) || (0xa1..=0xac).contains(&x) || x >= 0xae;
    if printable(b as u32) {
        return char::from(b);
    }
    let n = (0..b as u32).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("a valid char")
}

/// `tokenizer.json` (the `tokenizers` format): byte-level, 256 ids, id = byte, no merges.
pub fn byte_tokenizer() -> Value {
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), json!(b)))
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": [],
        },
    })
}

/// `tokenizer_config.json`.
pub fn tokenizer_config(m: &ModelConfig) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": m.block_size,
        "clean_up_tokenization_spaces": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_map_is_gpt2s_and_reversible() {
        let chars: std::collections::BTreeSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_to_char(b'A'), 'A');
        // GPT-2's map sends the space to 'Ġ' (U+0120) and the newline to 'Ċ' (U+010A).
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(0), 'Ā');
    }

    #[test]
    fn conv1d_weights_are_transposed_and_the_rest_kept() {
        let specs = vec![
            ParamSpec {
                name: "transformer.h.0.attn.c_attn.weight".into(),
                shape: vec![3, 2],
                transposed: true,
                offset: 0,
            },
            ParamSpec {
                name: "transformer.h.0.attn.c_attn.bias".into(),
                shape: vec![3],
                transposed: false,
                offset: 6,
            },
        ];
        let v = [1., 2., 3., 4., 5., 6., 7., 8., 9.];
        let bytes = gpt2_safetensors(&specs, &v, HashMap::new()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("transformer.h.0.attn.c_attn.weight").unwrap();
        assert_eq!(w.shape(), [2, 3]);
        let f: Vec<f32> = w
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(f, [1., 3., 5., 2., 4., 6.]);
        assert_eq!(
            st.tensor("transformer.h.0.attn.c_attn.bias")
                .unwrap()
                .shape(),
            [3]
        );
    }
}
