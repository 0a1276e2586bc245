//! Quantization on a wgpu / WebGPU device, by the WGSL kernels in `shaders/`: one f32 scale per
//! chunk and the values as packed two's-complement integers of 8 or 4 bits (`quantize.wgsl`,
//! the bytes of `tessera-protocol`'s int8 and int4 codecs), or as three levels
//! (`ternary.wgsl`: a mask word and a sign word per 32 values, which the protocol packs into
//! its ternary codec). A GPU participant encodes its update where it lives and reads back a
//! quarter (int8), an eighth (int4) or a sixteenth (ternary) of the f32 bytes.
//!
//! The kernels run through burn's backend extension for `Cube` (and `Fusion<Cube>` in the tab,
//! where the wgpu backend fuses), as hand-written WGSL source kernels.

use burn::prelude::*;
use burn::tensor::DType;

use crate::Error;

/// A quantizer: `bits` per value, one scale per `chunk` values. 8 and 4 bits are absmax
/// integers; 2 bits is the ternary encoder (a mask bit and a sign bit a value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Bits a value: 8, 4 or 2 (ternary).
    pub bits: u32,
    /// Values sharing one scale (eight 32-bit words of codes or a multiple of them).
    pub chunk: usize,
}

impl Format {
    /// int8, 256 values a scale (the protocol's `INT8_CHUNK`).
    pub const INT8: Format = Format {
        bits: 8,
        chunk: 256,
    };
    /// int4, 64 values a scale (the protocol's `INT4_CHUNK`).
    pub const INT4: Format = Format { bits: 4, chunk: 64 };
    /// Ternary, 1,024 values a scale (the protocol's `TERNARY_CHUNK`, a multiple of 32).
    pub const TERNARY: Format = Format {
        bits: 2,
        chunk: 1024,
    };

    /// Whether this is the ternary encoder.
    pub fn is_ternary(self) -> bool {
        self.bits == 2
    }

    /// The 32-bit words of codes for `len` values: packed integers, or for ternary a mask
    /// word and a sign word per 32 values.
    pub fn words(self, len: usize) -> usize {
        if self.is_ternary() {
            2 * len.div_ceil(32)
        } else {
            (len * self.bits as usize).div_ceil(32)
        }
    }

    /// The bytes of codes read back for `len` values: the packed integers' (`ceil(len · bits /
    /// 8)`), or for ternary every word pair's.
    pub fn code_bytes(self, len: usize) -> usize {
        if self.is_ternary() {
            4 * self.words(len)
        } else {
            (len * self.bits as usize).div_ceil(8)
        }
    }
}

/// The ternary dead zone, as a fraction of the chunk's mean magnitude (the protocol's
/// `TERNARY_DEAD_ZONE`).
pub const TERNARY_DEAD_ZONE: f32 = 1.0;

#[cfg(feature = "wgpu")]
mod gpu {
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::backend::wgpu::{
        CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate,
    };
    use burn::backend::{Backend, TensorMetadata, backend_extension};
    use burn::cubecl::prelude::KernelId;
    use burn::cubecl::server::KernelArguments;
    use burn::cubecl::{CubeCount, CubeDim};
    use burn::tensor::{DType, Shape};

    use super::Format;

    /// The absmax kernel's source, templated by bits, chunk and the largest code.
    const SOURCE: &str = include_str!("../../../../shaders/quantize.wgsl");

    /// The ternary kernel's source, templated by chunk, lanes and dead zone.
    const TERNARY_SOURCE: &str = include_str!("../../../../shaders/ternary.wgsl");

    /// Invocations a workgroup (the kernel's `GROUP`).
    const GROUP: usize = 64;

    /// Workgroups a dispatch dimension may hold (WebGPU's guaranteed limit).
    const MAX_GROUPS: usize = 65_535;

    /// The quantization kernel as burn's backend extension: `Cube` runs it.
    #[backend_extension(
        Cube: cfg(feature = "wgpu"),
        Fusion: cfg(all(feature = "wgpu", feature = "fusion")),
    )]
    pub trait QuantizeOps: Backend {
        /// Scales `[ceil(len / chunk)]` (f32) and codes packed in 32-bit words
        /// `[ceil(len · bits / 32)]` (i32) of the flat f32 `values`.
        #[fusion(meta = specs)]
        fn absmax_quantize(
            values: FloatTensor<Self>,
            bits: u32,
            chunk: usize,
        ) -> (FloatTensor<Self>, IntTensor<Self>);
    }

    #[cfg(feature = "fusion")]
    fn specs(
        values: &burn::backend::fusion::custom::TensorSpec,
        bits: &u32,
        chunk: &usize,
    ) -> (
        burn::backend::fusion::custom::TensorSpec,
        burn::backend::fusion::custom::TensorSpec,
    ) {
        use burn::backend::fusion::custom::TensorSpec;
        let len = values.shape.num_elements();
        let (scales, words) = sizes(len, *bits, *chunk);
        (
            TensorSpec::new(Shape::new([scales]), DType::F32),
            TensorSpec::new(Shape::new([words]), DType::I32),
        )
    }

    /// Scales and 32-bit words for `len` values.
    fn sizes(len: usize, bits: u32, chunk: usize) -> (usize, usize) {
        (len.div_ceil(chunk), Format { bits, chunk }.words(len))
    }

    struct QuantizeKernel(Format);

    impl KernelSource for QuantizeKernel {
        fn source(&self) -> SourceTemplate {
            if self.0.is_ternary() {
                return SourceTemplate::new(TERNARY_SOURCE)
                    .register("chunk", self.0.chunk.to_string())
                    .register("lanes", (self.0.chunk / 32).to_string())
                    .register("dead_zone", format!("{:?}", super::TERNARY_DEAD_ZONE));
            }
            SourceTemplate::new(SOURCE)
                .register("bits", self.0.bits.to_string())
                .register("chunk", self.0.chunk.to_string())
                .register("qmax", format!("{}.0", (1u32 << (self.0.bits - 1)) - 1))
        }

        fn id(&self) -> KernelId {
            KernelId::new::<Self>().info((self.0.bits, self.0.chunk))
        }

        fn lang(&self) -> &'static str {
            "wgsl"
        }
    }

    impl QuantizeOps for CubeBackend {
        fn absmax_quantize(
            values: CubeTensor,
            bits: u32,
            chunk: usize,
        ) -> (CubeTensor, CubeTensor) {
            let values = burn::backend::wgpu::into_contiguous(values);
            let len = values.shape().num_elements();
            let (n_scales, n_words) = sizes(len, bits, chunk);
            let client = values.client.clone();
            let device = values.device.clone();
            let scales = CubeTensor::new_contiguous(
                client.clone(),
                device.clone(),
                Shape::new([n_scales]),
                client.empty(n_scales.max(1) * 4),
                DType::F32,
            );
            let packed = CubeTensor::new_contiguous(
                client.clone(),
                device,
                Shape::new([n_words]),
                client.empty(n_words.max(1) * 4),
                DType::I32,
            );
            if len > 0 {
                let info = client.create_from_slice(&(len as u32).to_le_bytes());
                let format = Format { bits, chunk };
                // Absmax: eight invocations a chunk, 64 a workgroup. Ternary: a workgroup a
                // chunk, an invocation per 32 values.
                let (groups, group) = if format.is_ternary() {
                    (n_scales, chunk / 32)
                } else {
                    ((n_scales * 8).div_ceil(GROUP), GROUP)
                };
                let x = groups.min(MAX_GROUPS);
                let y = groups.div_ceil(MAX_GROUPS);
                client.launch(
                    Box::new(SourceKernel::new(
                        QuantizeKernel(format),
                        CubeDim::new_1d(group as u32),
                    )),
                    CubeCount::Static(x as u32, y as u32, 1),
                    KernelArguments::new().with_buffers(vec![
                        values.handle.binding(),
                        scales.handle.clone().binding(),
                        packed.handle.clone().binding(),
                        info.binding(),
                    ]),
                );
            }
            (scales, packed)
        }
    }
}

/// Values quantized on the device, not yet read.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
pub struct Quantized {
    format: Format,
    len: usize,
    scales: Tensor<1>,
    packed: Tensor<1, Int>,
}

/// Whether `values` lives on a wgpu / WebGPU device, where [`quantize`] runs.
pub fn supported(device: &Device) -> bool {
    #[cfg(feature = "wgpu")]
    return matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Cube(burn::cubecl::Device::Wgpu(_))
    );
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = device;
        false
    }
}

/// Quantizes the flat f32 `values` on their wgpu device (`None` on any other device; an
/// autodiff tensor is quantized as its value).
pub fn quantize(values: Tensor<1>, format: Format) -> Option<Quantized> {
    if !supported(&values.device()) || values.dtype() != DType::F32 {
        return None;
    }
    let values = if values.is_autodiff() {
        values.inner()
    } else {
        values
    };
    let len = values.dims()[0];
    #[cfg(feature = "wgpu")]
    {
        use burn::backend::Dispatch;
        let (scales, packed) = <Dispatch as gpu::QuantizeOps>::absmax_quantize(
            values.into_dispatch(),
            format.bits,
            format.chunk,
        );
        Some(Quantized {
            format,
            len,
            scales: Tensor::from_dispatch(scales),
            packed: Tensor::from_dispatch(packed),
        })
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = (len, format);
        None
    }
}

impl Quantized {
    /// How many values were quantized.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value was.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the scales and the codes' bytes ([`Format::code_bytes`] of them), blocking:
    /// native only.
    pub fn read(self) -> Result<(Vec<f32>, Vec<u8>), Error> {
        let scales = self.scales.into_data();
        let packed = self.packed.into_data();
        parts(self.format, self.len, scales, packed)
    }

    /// As [`Quantized::read`], without blocking (the only read a WebGPU tab has).
    pub async fn read_async(self) -> Result<(Vec<f32>, Vec<u8>), Error> {
        let scales = self.scales.into_data_async().await.map_err(read_error)?;
        let packed = self.packed.into_data_async().await.map_err(read_error)?;
        parts(self.format, self.len, scales, packed)
    }
}

fn read_error(e: impl std::fmt::Debug) -> Error {
    Error::Shape(format!("reading quantized values: {e:?}"))
}

#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
fn parts(
    format: Format,
    len: usize,
    scales: TensorData,
    packed: TensorData,
) -> Result<(Vec<f32>, Vec<u8>), Error> {
    let scales = scales.try_to_vec::<f32>().map_err(read_error)?;
    let words = packed.try_to_vec::<i32>().map_err(read_error)?;
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(format.code_bytes(len));
    Ok((scales, bytes))
}
