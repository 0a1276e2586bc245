//! Checkpoint encoding: weights as safetensors (nanoGPT names, PyTorch layout), optimizer state as
//! a second safetensors file, and a small JSON sidecar. Bytes only: writing them to disk
//! (atomically) is the caller's job.

use std::collections::HashMap;

use burn::prelude::*;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::config::{ModelConfig, TrainConfig};
use crate::optim::{AdamW, Moments};
use crate::params::ParamSpec;

/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// The JSON sidecar next to a checkpoint's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Model shape.
    pub model: ModelConfig,
    /// Hyperparameters.
    pub train: TrainConfig,
    /// Steps taken.
    pub step: u64,
    /// Tokens trained on.
    pub tokens_seen: u64,
    /// File name of the weights (safetensors), relative to the sidecar.
    pub weights_file: String,
    /// File name of the optimizer state (safetensors), relative to the sidecar.
    pub optimizer_file: Option<String>,
    /// Latest validation loss, if measured.
    pub val_loss: Option<f32>,
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn serialize(
    entries: Vec<(String, Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, Error> {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Checkpoint(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Checkpoint(e.to_string()))
}

/// The header of safetensors `bytes`: the length prefix and the JSON (tensor names, shapes,
/// offsets, metadata), everything but the tensors' data.
pub fn safetensors_header(bytes: &[u8]) -> Result<&[u8], Error> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| Error::Checkpoint("safetensors header length out of the file".into()))?;
    Ok(&bytes[..n])
}

/// The safetensors bytes of `values` laid out as `header` (from [`safetensors_header`] of
/// another file of the same model) says: with the same header and the same values, the same
/// bytes as that file, whatever order its writer chose. A participant rebuilds a version's
/// file this way from weights it computed itself, and checks the digest.
pub fn weights_in_layout(
    specs: &[ParamSpec],
    values: &[f32],
    header: &[u8],
) -> Result<Vec<u8>, Error> {
    let bad = |what: String| Error::Checkpoint(format!("safetensors header: {what}"));
    if safetensors_header(header).ok().map(<[u8]>::len) != Some(header.len()) {
        return Err(bad("its length prefix does not match its length".into()));
    }
    let json: HashMap<String, serde_json::Value> = serde_json::from_slice(
        header
            .get(8..)
            .ok_or_else(|| bad("shorter than its length prefix".into()))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    if json.keys().filter(|k| *k != "__metadata__").count() != specs.len() {
        return Err(bad(format!(
            "{} tensors, the model has {}",
            json.len(),
            specs.len()
        )));
    }
    let mut places = Vec::with_capacity(specs.len());
    let mut data_len = 0usize;
    for s in specs {
        let t = json
            .get(&s.name)
            .ok_or_else(|| bad(format!("no tensor {}", s.name)))?;
        let offsets = t["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()? as usize, o.get(1)?.as_u64()? as usize)))
            .ok_or_else(|| bad(format!("{} has no data offsets", s.name)))?;
        if t["dtype"] != "F32" || offsets.1.checked_sub(offsets.0) != Some(4 * s.numel()) {
            return Err(bad(format!("{} is not {} f32 values", s.name, s.numel())));
        }
        if values.len() < s.offset + s.numel() {
            return Err(bad(format!(
                "{} lies beyond the {} values",
                s.name,
                values.len()
            )));
        }
        data_len = data_len.max(offsets.1);
        places.push((s, offsets.0));
    }
    let mut out = Vec::with_capacity(header.len() + data_len);
    out.extend_from_slice(header);
    out.resize(header.len() + data_len, 0);
    for (s, at) in places {
        let dst = &mut out[header.len() + at..header.len() + at + 4 * s.numel()];
        for (d, v) in dst
            .chunks_exact_mut(4)
            .zip(&values[s.offset..s.offset + s.numel()])
        {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Encodes model weights (a flat vector in [`crate::params::specs`] order) as safetensors.
pub fn weights_to_safetensors(
    specs: &[ParamSpec],
    values: &[f32],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, Error> {
    let entries = specs
        .iter()
        .map(|s| {
            let v = &values[s.offset..s.offset + s.numel()];
            (s.name.clone(), s.shape.clone(), f32_bytes(v))
        })
        .collect();
    serialize(entries, metadata)
}

/// Decodes safetensors weights into a flat vector in `specs` order, checking that every
/// parameter is present, f32, of the right shape and finite. Extra tensors (such as a
/// PyTorch export's `lm_head.weight`, tied to `wte`) are ignored.
pub fn weights_from_safetensors(specs: &[ParamSpec], bytes: &[u8]) -> Result<Vec<f32>, Error> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint(e.to_string()))?;
    let mut out = Vec::with_capacity(crate::params::total_len(specs));
    for s in specs {
        let t = st
            .tensor(&s.name)
            .map_err(|_| Error::Checkpoint(format!("missing tensor {}", s.name)))?;
        if t.dtype() != Dtype::F32 {
            return Err(Error::Checkpoint(format!(
                "{} is {:?}, expected F32",
                s.name,
                t.dtype()
            )));
        }
        if t.shape() != s.shape.as_slice() {
            return Err(Error::Checkpoint(format!(
                "{} has shape {:?}, expected {:?}",
                s.name,
                t.shape(),
                s.shape
            )));
        }
        let v = bytes_f32(t.data());
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::Checkpoint(format!(
                "{} holds non-finite values",
                s.name
            )));
        }
        out.extend(v);
    }
    Ok(out)
}

/// Reads the metadata map of a safetensors file.
pub fn safetensors_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, Error> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::Checkpoint(e.to_string()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Encodes AdamW state (synchronous reads: native only). Moments are stored flat, in burn's
/// layout, under `<param>.exp_avg` / `<param>.exp_avg_sq`; the step count is in the metadata.
pub fn optimizer_to_safetensors(specs: &[ParamSpec], optim: &AdamW) -> Result<Vec<u8>, Error> {
    let mut entries = Vec::new();
    for (s, m) in specs.iter().zip(&optim.moments) {
        for suffix in ["exp_avg", "exp_avg_sq"] {
            let v: Vec<f32> = match m {
                // A parameter that never had a gradient has zero moments.
                None => vec![0.0; s.numel()],
                Some(m) => {
                    let t = if suffix == "exp_avg" {
                        &m.exp_avg
                    } else {
                        &m.exp_avg_sq
                    };
                    t.clone()
                        .into_data()
                        .try_into_vec()
                        .map_err(|e| Error::Checkpoint(format!("{e:?}")))?
                }
            };
            entries.push((format!("{}.{suffix}", s.name), vec![v.len()], f32_bytes(&v)));
        }
    }
    let meta = HashMap::from([("step".to_string(), optim.step.to_string())]);
    serialize(entries, meta)
}

/// Decodes AdamW state onto `device` (the plain, non-autodiff device).
pub fn optimizer_from_safetensors(
    specs: &[ParamSpec],
    bytes: &[u8],
    device: &Device,
) -> Result<AdamW, Error> {
    let step: u64 = safetensors_metadata(bytes)?
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Checkpoint("optimizer state has no step".into()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint(e.to_string()))?;
    let mut moments = Vec::new();
    if step > 0 {
        for s in specs {
            let load = |suffix: &str| -> Result<Tensor<1>, Error> {
                let name = format!("{}.{suffix}", s.name);
                let t = st
                    .tensor(&name)
                    .map_err(|_| Error::Checkpoint(format!("missing {name}")))?;
                if t.shape() != [s.numel()] || t.dtype() != Dtype::F32 {
                    return Err(Error::Checkpoint(format!(
                        "{name} has the wrong shape or type"
                    )));
                }
                Ok(Tensor::from_data(
                    TensorData::new(bytes_f32(t.data()), [s.numel()]),
                    device,
                ))
            };
            moments.push(Some(Moments {
                exp_avg: load("exp_avg")?,
                exp_avg_sq: load("exp_avg_sq")?,
            }));
        }
    }
    Ok(AdamW { step, moments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_rebuilt_from_its_header_and_its_values() {
        let device = Device::flex();
        let model = crate::model::Gpt::new(&ModelConfig::named("tiny").unwrap(), &device);
        let specs = crate::params::specs(&model);
        let values: Vec<f32> = (0..crate::params::total_len(&specs))
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("tessera_version".to_string(), "7".to_string()),
            ("tessera_ledger".to_string(), "{\"size\": 3}".to_string()),
        ]);
        let file = weights_to_safetensors(&specs, &values, meta).unwrap();
        let header = safetensors_header(&file).unwrap();
        assert_eq!(weights_in_layout(&specs, &values, header).unwrap(), file);
        let mut other = values.clone();
        other[5] += 1.0;
        assert_ne!(weights_in_layout(&specs, &other, header).unwrap(), file);
        assert!(weights_in_layout(&specs, &values[..10], header).is_err());
        assert!(weights_in_layout(&specs, &values, &header[..header.len() - 1]).is_err());
        assert!(safetensors_header(&file[..4]).is_err());
    }
}
