//! The model's parameters as one flat, named list in a fixed order.
//!
//! Names and layouts follow nanoGPT's PyTorch `state_dict` (`transformer.h.0.attn.c_attn.weight`,
//! Linear weights stored `[out, in]`), so a Tessera checkpoint loads into the PyTorch model with
//! no conversion. The same order defines the flat `f32` vector that pseudo-gradients, codecs and
//! aggregation work on; a work unit may name a fragment of it.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Gradients;

use crate::Error;
use crate::model::Gpt;

/// One parameter tensor as the outside world sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// nanoGPT/PyTorch name.
    pub name: String,
    /// Shape in PyTorch layout.
    pub shape: Vec<usize>,
    /// True when burn stores it transposed (Linear weights: burn `[in, out]`, PyTorch `[out, in]`).
    pub transposed: bool,
    /// Offset of its first element in the flat vector.
    pub offset: usize,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Maps a burn module path (`h.0.attn.qkv.weight`) to its nanoGPT name.
fn torch_name(path: &str) -> String {
    let mut name = format!("transformer.{path}");
    for (from, to) in [
        (".attn.qkv.", ".attn.c_attn."),
        (".attn.proj.", ".attn.c_proj."),
        (".mlp.fc.", ".mlp.c_fc."),
        (".mlp.proj.", ".mlp.c_proj."),
    ] {
        name = name.replace(from, to);
    }
    if let Some(stem) = name.strip_suffix(".gamma") {
        name = format!("{stem}.weight");
    } else if let Some(stem) = name.strip_suffix(".beta") {
        name = format!("{stem}.bias");
    }
    name
}

fn is_linear_weight(path: &str, rank: usize) -> bool {
    rank == 2 && path.ends_with(".weight") && !path.starts_with("wte") && !path.starts_with("wpe")
}

#[derive(Default)]
struct Collect<'g> {
    /// When set, collect each parameter's gradient instead of its value.
    grads: Option<&'g Gradients>,
    path: Vec<String>,
    specs: Vec<ParamSpec>,
    tensors: Vec<Tensor<1>>,
    offset: usize,
}

impl ModuleVisitor for Collect<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        let t = match self.grads {
            Some(g) => param
                .val()
                .grad(g)
                .unwrap_or_else(|| param.val().inner().zeros_like()),
            None => param.val().inner(),
        };
        let mut shape = t.dims().to_vec();
        let transposed = is_linear_weight(&path, D);
        let flat = if transposed {
            shape.reverse();
            t.transpose().reshape([-1])
        } else {
            t.reshape([-1])
        };
        let spec = ParamSpec {
            name: torch_name(&path),
            shape,
            transposed,
            offset: self.offset,
        };
        self.offset += spec.numel();
        self.specs.push(spec);
        self.tensors.push(flat);
    }
}

/// The parameter list of `model`, in flat order.
pub fn specs(model: &Gpt) -> Vec<ParamSpec> {
    let mut c = Collect::default();
    model.visit(&mut c);
    c.specs
}

/// All parameters concatenated into one flat tensor (PyTorch layout, no autodiff). Read it with
/// `into_data` natively or `into_data_async` in a browser.
pub fn flat_tensor(model: &Gpt) -> Tensor<1> {
    let mut c = Collect::default();
    model.visit(&mut c);
    Tensor::cat(c.tensors, 0)
}

/// The gradients of all parameters from a backward pass, concatenated like [`flat_tensor`]
/// (zeros for parameters that received none).
pub fn flat_grads(model: &Gpt, grads: &Gradients) -> Tensor<1> {
    let mut c = Collect {
        grads: Some(grads),
        ..Default::default()
    };
    model.visit(&mut c);
    Tensor::cat(c.tensors, 0)
}

/// Reads all parameters into one `f32` vector (synchronous read: native only).
pub fn to_vec(model: &Gpt) -> Vec<f32> {
    flat_tensor(model)
        .into_data()
        .try_into_vec::<f32>()
        .expect("model parameters are f32")
}

/// Reads all parameters into one `f32` vector without blocking: the only way to read a WebGPU
/// tensor in a browser, and equivalent to [`to_vec`] elsewhere.
pub async fn to_vec_async(model: &Gpt) -> Result<Vec<f32>, Error> {
    flat_tensor(model)
        .into_data_async()
        .await
        .map_err(|e| Error::Shape(format!("reading parameters: {e:?}")))?
        .try_into_vec::<f32>()
        .map_err(|e| Error::Shape(format!("parameters are not f32: {e:?}")))
}

struct Assign<'a> {
    path: Vec<String>,
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Assign<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let device = tensor.device();
        let plain = device.clone().inner();
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let slice = self.values[self.offset..self.offset + n].to_vec();
        self.offset += n;
        let value = if is_linear_weight(&path, D) {
            let mut t = dims;
            t.reverse();
            Tensor::<D>::from_data(TensorData::new(slice, t), &plain).transpose()
        } else {
            Tensor::<D>::from_data(TensorData::new(slice, dims), &plain)
        };
        let value = restore_tracking(value, &tensor);
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Gives `value` (a plain tensor) the autodiff tracking that `like` had.
pub(crate) fn restore_tracking<const D: usize>(value: Tensor<D>, like: &Tensor<D>) -> Tensor<D> {
    if !like.is_autodiff() {
        return value;
    }
    let value = value.autodiff();
    if like.is_require_grad() {
        value.require_grad()
    } else {
        value
    }
}

/// Replaces every parameter of `model` with the values of a flat vector in the order of
/// [`specs`] (PyTorch layout). Fails, leaving nothing half-applied, if the length is wrong or a
/// value is not finite.
pub fn load_vec(model: Gpt, values: &[f32]) -> Result<Gpt, Error> {
    let expected: usize = specs(&model).iter().map(ParamSpec::numel).sum();
    if values.len() != expected {
        return Err(Error::Shape(format!(
            "parameter vector has {} values, the model has {expected}",
            values.len()
        )));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Shape(format!("parameter value {i} is not finite")));
    }
    Ok(model.map(&mut Assign {
        path: vec![],
        values,
        offset: 0,
    }))
}

struct Trainable<'a> {
    trainable: &'a [bool],
    index: usize,
}

impl ModuleMapper for Trainable<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let keep = self.trainable.get(self.index).copied().unwrap_or(true);
        self.index += 1;
        param.set_require_grad(keep)
    }
}

/// Sets which parameters take gradients, by index in [`specs`] order (missing entries stay
/// trainable).
pub(crate) fn set_trainable(model: Gpt, trainable: &[bool]) -> Gpt {
    model.map(&mut Trainable {
        trainable,
        index: 0,
    })
}

/// Splits the flat parameter vector into `n` contiguous fragments of whole transformer blocks,
/// as Streaming DiLoCo does: fragment `g` holds blocks `g·L/n … (g+1)·L/n − 1`, the first also
/// the embeddings (and with them the tied LM head), the last the final LayerNorm. `n` must lie
/// in `1..=n_layer`; the ranges cover the vector in order.
pub fn fragments(
    specs: &[ParamSpec],
    n_layer: usize,
    n: usize,
) -> Result<Vec<std::ops::Range<usize>>, Error> {
    if n == 0 || n > n_layer {
        return Err(Error::Shape(format!(
            "{n} fragments: the model has {n_layer} blocks, so 1 to {n_layer}"
        )));
    }
    let group = |name: &str| -> usize {
        match name
            .strip_prefix("transformer.h.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(block) => block * n / n_layer,
            None if name.starts_with("transformer.ln_f") => n - 1,
            None => 0,
        }
    };
    let mut ends = vec![0usize; n];
    let mut last = 0;
    for s in specs {
        let g = group(&s.name);
        if g < last {
            return Err(Error::Shape(format!(
                "{} comes after a later fragment's parameters",
                s.name
            )));
        }
        last = g;
        ends[g] = s.offset + s.numel();
    }
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for end in ends {
        if end <= start {
            return Err(Error::Shape("a fragment holds no parameter".into()));
        }
        out.push(start..end);
        start = end;
    }
    Ok(out)
}

/// Total number of parameters in a spec list.
pub fn total_len(specs: &[ParamSpec]) -> usize {
    specs.iter().map(ParamSpec::numel).sum()
}
