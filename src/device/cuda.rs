//! The CUDA device: one context, one stream, stream-ordered allocation from the driver's pool.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::{bail, Result};

/// One GPU as the engine uses it: a context and the single stream every kernel of a training step runs on.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
}

/// A float32 buffer on a GPU, tied to the GPU that owns it.
pub struct GpuBuffer {
    /// The device memory.
    pub slice: CudaSlice<f32>,
    /// The GPU the memory belongs to.
    pub gpu: Arc<Gpu>,
}

impl Gpu {
    /// Opens GPU `ordinal`. Fails with a plain message when no driver or no such GPU is present.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!(
                Device,
                "no CUDA driver found (libcuda.so is not loadable): use --device cpu, or install the NVIDIA driver"
            );
        }
        let count =
            CudaContext::device_count().map_err(|e| crate::Error::Device(format!("cuDeviceGetCount failed: {e}")))?;
        if ordinal as i32 >= count {
            bail!(Device, "GPU {ordinal} requested but the driver sees {count} GPU(s)");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| crate::Error::Device(format!("creating a context on GPU {ordinal}: {e}")))?;
        // One stream runs everything, so per-buffer event tracking (two events per allocation) buys nothing.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Arc::new(Gpu { ctx, stream, name }))
    }

    /// The device index.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The GPU's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// Turns a driver error into an engine error naming what was being done.
pub(crate) fn driver_err(what: impl std::fmt::Display) -> impl FnOnce(cudarc::driver::DriverError) -> crate::Error {
    move |e| crate::Error::Device(format!("{what}: {e}"))
}

impl GpuBuffer {
    /// Copies host data into a new device buffer.
    pub fn from_host(gpu: &Arc<Gpu>, data: &[f32]) -> Result<GpuBuffer> {
        let slice =
            gpu.stream.clone_htod(data).map_err(driver_err(format!("copying {} floats to the GPU", data.len())))?;
        Ok(GpuBuffer { slice, gpu: gpu.clone() })
    }

    /// Copies the buffer to the host (synchronises the stream).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        self.gpu
            .stream
            .clone_dtoh(&self.slice)
            .map_err(driver_err(format!("copying {} floats from the GPU", self.slice.len())))
    }
}
