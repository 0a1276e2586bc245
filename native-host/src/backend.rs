//! Picking the compute device: `cpu` (burn's flex backend) or `wgpu` (Vulkan, Metal, DX12 —
//! including lavapipe's software Vulkan on machines without a GPU).

use anyhow::{Context, Result};
use clap::ValueEnum;
use tessera_core::burn::prelude::Device;

/// A backend the host can train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's flex CPU backend.
    Cpu,
    /// burn's wgpu backend on the best adapter.
    Wgpu,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
        })
    }
}

/// The kind of the best wgpu adapter, if any (`None` when there is no adapter at all).
pub fn best_adapter() -> Option<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    // Vulkan, Metal, DX12 (not GL: burn's wgpu runtime does not train on it, and probing EGL
    // prints loader noise on headless machines).
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters
        .into_iter()
        .map(|a| a.get_info())
        .min_by_key(|info| match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        })
}

/// The fastest backend on this machine: wgpu when a hardware adapter exists, otherwise the CPU
/// backend (a software adapter such as lavapipe is slower than training on the CPU directly).
pub fn fastest() -> Backend {
    match best_adapter() {
        Some(info) if info.device_type != wgpu::DeviceType::Cpu => Backend::Wgpu,
        _ => Backend::Cpu,
    }
}

/// Creates the device for `backend`, with a description of what it runs on.
pub fn device(backend: Backend) -> Result<(Device, String)> {
    match backend {
        Backend::Cpu => Ok((
            Device::flex(),
            format!("cpu (flex, {} threads)", cpu_threads()),
        )),
        Backend::Wgpu => {
            let device = Device::wgpu_options().init().context(
                "no usable wgpu adapter (on Debian without a GPU, install mesa-vulkan-drivers)",
            )?;
            let name = best_adapter()
                .map(|i| format!("wgpu ({} via {:?}, {:?})", i.name, i.backend, i.device_type))
                .unwrap_or_else(|| "wgpu".into());
            Ok((device, name))
        }
    }
}

fn cpu_threads() -> usize {
    tessera_core::kernels::threads()
}
