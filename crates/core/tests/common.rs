//! Helpers shared by the integration tests.
#![allow(dead_code)]

use tessera_core::burn::prelude::*;

/// Reads a lazy tensor into a vector (native, synchronous).
pub fn read(t: Tensor<1>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// Largest relative error between `got` and `want`, relative to `want`'s largest magnitude
/// (elementwise relative error is meaningless for values near zero).
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-12);
    got.iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs() / scale)
        .fold(0.0, f64::max)
}

/// The wgpu device, or a clear failure: the test command installs lavapipe so that an adapter
/// exists on CPU-only machines. Initialised once a process (a second `init` is refused).
pub fn wgpu_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            Device::wgpu_options().init().unwrap_or_else(|e| {
                panic!("no wgpu adapter ({e:?}); on Debian install mesa-vulkan-drivers (lavapipe)")
            })
        })
        .clone()
}
