//! Quantization on a wgpu / WebGPU device, by the WGSL kernels in `shaders/`: one f32 scale per
//! chunk and the values as packed two's-complement integers of 8 or 4 bits (`quantize.wgsl`,
//! the bytes of `tessera-protocol`'s int8 and int4 codecs), or as three levels
//! (`ternary.wgsl`: a mask word and a sign word per 32 values, which the protocol packs into
//! its ternary codec), or as the largest `k` of every 4,096 values with the participant's error
//! feedback kept on the device ([`sparse`], `sparse.wgsl`). A GPU participant encodes its update
//! where it lives and reads back a quarter (int8), an eighth (int4), a sixteenth (ternary) or
//! about a hundredth (sparse, `k` = 64) of the f32 bytes.
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

/// Values a chunk of the sparse encoder (the protocol's `SPARSE_CHUNK`).
pub const SPARSE_CHUNK: usize = 4096;

/// The most values a chunk the sparse kernel keeps (its workgroup memory holds them).
pub const SPARSE_MAX_K: u16 = 256;

/// The 32-bit words the sparse kernel writes a chunk when it keeps `k`: the two magnitudes,
/// the indices two a word, the 2-bit codes sixteen a word.
pub fn sparse_stride(k: u16) -> usize {
    let k = usize::from(k);
    2 + k.div_ceil(2) + k.div_ceil(16)
}

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

        /// The sparse encoding of `decay · residual + delta` (flat f32, same length), keeping
        /// `k` values a chunk: its words (`[ceil(len / 4096) · sparse_stride(k)]`, i32) and
        /// what it leaves out (f32, like `delta`), the next residual.
        #[fusion(meta = sparse_specs)]
        fn sparse_quantize(
            delta: FloatTensor<Self>,
            residual: FloatTensor<Self>,
            k: u16,
            decay: f32,
        ) -> (IntTensor<Self>, FloatTensor<Self>);
    }

    #[cfg(feature = "fusion")]
    fn sparse_specs(
        delta: &burn::backend::fusion::custom::TensorSpec,
        _residual: &burn::backend::fusion::custom::TensorSpec,
        k: &u16,
        _decay: &f32,
    ) -> (
        burn::backend::fusion::custom::TensorSpec,
        burn::backend::fusion::custom::TensorSpec,
    ) {
        use burn::backend::fusion::custom::TensorSpec;
        let len = delta.shape.num_elements();
        (
            TensorSpec::new(Shape::new([sparse_words(len, *k)]), DType::I32),
            TensorSpec::new(delta.shape.clone(), DType::F32),
        )
    }

    /// The sparse kernel's words for `len` values.
    fn sparse_words(len: usize, k: u16) -> usize {
        len.div_ceil(super::SPARSE_CHUNK) * super::sparse_stride(k)
    }

    /// The sparse kernel's source, templated by `k`.
    const SPARSE_SOURCE: &str = include_str!("../../../../shaders/sparse.wgsl");

    /// Invocations a workgroup of the sparse kernel (16 values each).
    const SPARSE_GROUP: u32 = 256;

    struct SparseKernel(u16);

    impl KernelSource for SparseKernel {
        fn source(&self) -> SourceTemplate {
            SourceTemplate::new(SPARSE_SOURCE).register("k", self.0.to_string())
        }

        fn id(&self) -> KernelId {
            KernelId::new::<Self>().info(self.0)
        }

        fn lang(&self) -> &'static str {
            "wgsl"
        }
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

        fn sparse_quantize(
            delta: CubeTensor,
            residual: CubeTensor,
            k: u16,
            decay: f32,
        ) -> (CubeTensor, CubeTensor) {
            let delta = burn::backend::wgpu::into_contiguous(delta);
            let residual = burn::backend::wgpu::into_contiguous(residual);
            let len = delta.shape().num_elements();
            assert_eq!(
                residual.shape().num_elements(),
                len,
                "the residual and the update differ in length"
            );
            assert!(
                (1..=super::SPARSE_MAX_K).contains(&k),
                "the sparse kernel keeps 1 to {} values a chunk, not {k}",
                super::SPARSE_MAX_K
            );
            let n_words = sparse_words(len, k);
            let client = delta.client.clone();
            let device = delta.device.clone();
            let words = CubeTensor::new_contiguous(
                client.clone(),
                device.clone(),
                Shape::new([n_words]),
                client.empty(n_words.max(1) * 4),
                DType::I32,
            );
            let carried = CubeTensor::new_contiguous(
                client.clone(),
                device,
                delta.shape(),
                client.empty(len.max(1) * 4),
                DType::F32,
            );
            if len > 0 {
                let mut info = (len as u32).to_le_bytes().to_vec();
                info.extend_from_slice(&decay.to_bits().to_le_bytes());
                let info = client.create_from_slice(&info);
                let groups = len.div_ceil(super::SPARSE_CHUNK);
                let x = groups.min(MAX_GROUPS);
                let y = groups.div_ceil(MAX_GROUPS);
                client.launch(
                    Box::new(SourceKernel::new(
                        SparseKernel(k),
                        CubeDim::new_1d(SPARSE_GROUP),
                    )),
                    CubeCount::Static(x as u32, y as u32, 1),
                    KernelArguments::new().with_buffers(vec![
                        delta.handle.binding(),
                        residual.handle.binding(),
                        words.handle.clone().binding(),
                        carried.handle.clone().binding(),
                        info.binding(),
                    ]),
                );
            }
            (words, carried)
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

/// Values encoded on the device by the sparse kernel, not yet read.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
pub struct SparseQuantized {
    k: u16,
    len: usize,
    words: Tensor<1, Int>,
}

/// The sparse encoding of `decay · residual + delta` on their wgpu device, keeping the `k`
/// largest magnitudes of every [`SPARSE_CHUNK`] values (no residual: zero), and the residual
/// it leaves for the next update (`decay · residual + delta` minus what the encoding decodes
/// to, on the device). `None` on any other device, for `k` outside `1..=`[`SPARSE_MAX_K`], or
/// a residual of another length.
pub fn sparse(
    delta: Tensor<1>,
    residual: Option<Tensor<1>>,
    k: u16,
    decay: f32,
) -> Option<(SparseQuantized, Tensor<1>)> {
    let plain = |t: Tensor<1>| if t.is_autodiff() { t.inner() } else { t };
    if !supported(&delta.device())
        || delta.dtype() != DType::F32
        || !(1..=SPARSE_MAX_K).contains(&k)
    {
        return None;
    }
    let delta = plain(delta);
    let len = delta.dims()[0];
    let residual = match residual {
        Some(r) if r.dims()[0] == len && r.dtype() == DType::F32 => plain(r),
        Some(_) => return None,
        None => Tensor::zeros([len], &delta.device()),
    };
    #[cfg(feature = "wgpu")]
    {
        use burn::backend::Dispatch;
        let (words, carried) = <Dispatch as gpu::QuantizeOps>::sparse_quantize(
            delta.into_dispatch(),
            residual.into_dispatch(),
            k,
            decay,
        );
        Some((
            SparseQuantized {
                k,
                len,
                words: Tensor::from_dispatch(words),
            },
            Tensor::from_dispatch(carried),
        ))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = (len, residual, decay);
        None
    }
}

impl SparseQuantized {
    /// How many values were encoded.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none were.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values kept a chunk.
    pub fn k(&self) -> u16 {
        self.k
    }

    /// Reads the kernel's words as little-endian bytes ([`sparse_stride`] words a chunk: the
    /// two magnitudes, the indices, the codes), blocking: native only.
    pub fn read(self) -> Result<Vec<u8>, Error> {
        word_bytes(self.words.into_data())
    }

    /// As [`SparseQuantized::read`], without blocking (the only read a WebGPU tab has).
    pub async fn read_async(self) -> Result<Vec<u8>, Error> {
        word_bytes(self.words.into_data_async().await.map_err(read_error)?)
    }
}

#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
fn word_bytes(words: TensorData) -> Result<Vec<u8>, Error> {
    let words = words.try_to_vec::<i32>().map_err(read_error)?;
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
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
