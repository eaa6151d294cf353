//! The CUDA device: one context, one stream, stream-ordered allocation from the driver's memory pool, and the
//! kernels of `cuda/*.cu`, compiled by `build.rs` and embedded in the binary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
    PushKernelArg, ValidAsZeroBits,
};

pub use cudarc::driver::LaunchConfig;

use crate::device::params::{ConstPtr, Kernel, MutPtr, TensorMap};
use crate::{bail, Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Bytes of dynamic shared memory a launch gets without asking (CUDA's default per block); more is set per function.
const STATIC_SHARED_LIMIT: u32 = 48 * 1024;

/// One GPU as the engine uses it: a context and the single stream every kernel of a training step runs on.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    poison: AtomicBool,
    exact_f32: AtomicBool,
    /// Whether runs store activations in bf16 ([`Gpu::set_precision`]).
    bf16: AtomicBool,
    /// Streaming multiprocessors, read once ([`Gpu::resident_blocks`]).
    multiprocessors: usize,
    /// Kernel launches so far ([`Gpu::launches`]).
    launches: AtomicU64,
}

/// An element type the GPU stores: float32 (every op) or bf16 (`half::bf16`, the low-precision storage of
/// [`crate::tensor::DType::BF16`] tensors). `Default` lets generic code fill a kernel's parameter struct with
/// `..Default::default()` (the generated structs derive it, which asks it of their storage type).
pub trait GpuElement:
    DeviceRepr + ValidAsZeroBits + Copy + Default + std::fmt::Debug + Unpin + Send + Sync + 'static
{
    /// The tensor element type.
    const DTYPE: crate::tensor::DType;
    /// Of a kernel's two instances (common.cuh's `TYPED_KERNEL`), the name of the one for this type.
    fn pick(f32_name: &'static str, bf16_name: &'static str) -> &'static str {
        if Self::DTYPE == crate::tensor::DType::BF16 {
            bf16_name
        } else {
            f32_name
        }
    }
    /// The tensor storage holding a buffer of this type.
    fn storage(buffer: GpuBuffer<Self>) -> crate::tensor::Storage;
    /// The buffer of a storage of this type, if it is one.
    fn buffer(storage: &crate::tensor::Storage) -> Option<&GpuBuffer<Self>>;
    /// [`GpuElement::buffer`], for writing.
    fn buffer_mut(storage: &mut crate::tensor::Storage) -> Option<&mut GpuBuffer<Self>>;
}

impl GpuElement for f32 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::F32;
    fn storage(buffer: GpuBuffer<f32>) -> crate::tensor::Storage {
        crate::tensor::Storage::Cuda(buffer)
    }
    fn buffer(storage: &crate::tensor::Storage) -> Option<&GpuBuffer<f32>> {
        match storage {
            crate::tensor::Storage::Cuda(b) => Some(b),
            _ => None,
        }
    }
    fn buffer_mut(storage: &mut crate::tensor::Storage) -> Option<&mut GpuBuffer<f32>> {
        match storage {
            crate::tensor::Storage::Cuda(b) => Some(b),
            _ => None,
        }
    }
}

impl GpuElement for half::bf16 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::BF16;
    fn storage(buffer: GpuBuffer<half::bf16>) -> crate::tensor::Storage {
        crate::tensor::Storage::CudaBf16(buffer)
    }
    fn buffer(storage: &crate::tensor::Storage) -> Option<&GpuBuffer<half::bf16>> {
        match storage {
            crate::tensor::Storage::CudaBf16(b) => Some(b),
            _ => None,
        }
    }
    fn buffer_mut(storage: &mut crate::tensor::Storage) -> Option<&mut GpuBuffer<half::bf16>> {
        match storage {
            crate::tensor::Storage::CudaBf16(b) => Some(b),
            _ => None,
        }
    }
}

/// A buffer of `T` (float32 unless said otherwise) on a GPU, tied to the GPU that owns it.
pub struct GpuBuffer<T: GpuElement = f32> {
    /// The device memory.
    pub slice: CudaSlice<T>,
    /// The GPU the memory belongs to.
    pub gpu: Arc<Gpu>,
    /// Its id in the profiler's memory tracking, when a profile was recording as it was allocated.
    tracked: Option<u64>,
}

impl<T: GpuElement> Drop for GpuBuffer<T> {
    fn drop(&mut self) {
        if let Some(id) = self.tracked {
            crate::profile::track_free(id);
        }
    }
}

/// Turns a driver error into an engine error naming what was being done.
pub(crate) fn driver_err(what: impl std::fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens GPU `ordinal` and loads the embedded kernels. Fails with a plain message when no driver, no such GPU,
    /// or no compiled kernels (a build without nvcc) are present.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        if KERNEL_FILES.is_empty() {
            bail!(
                Device,
                "this lkm-engine was built without CUDA kernels (nvcc was not found at build time): run \
                 tools/install-nvcc.sh and rebuild, or use --device cpu"
            );
        }
        // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!(
                Device,
                "no CUDA driver found (libcuda.so is not loadable): use --device cpu, or install the NVIDIA driver"
            );
        }
        let count = CudaContext::device_count().map_err(driver_err("counting GPUs"))?;
        if ordinal as i32 >= count {
            bail!(Device, "GPU {ordinal} requested but the driver sees {count} GPU(s)");
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err(format!("creating a context on GPU {ordinal}")))?;
        // One stream runs everything, so per-buffer event tracking (two events per allocation) buys nothing.
        // SAFETY: called before any buffer exists; all work is ordered on the one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        keep_pool_memory(&ctx).map_err(driver_err(format!("configuring the memory pool of {name}")))?;
        let multiprocessors =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(driver_err(format!("reading the multiprocessor count of {name}")))? as usize;
        let mut modules = Vec::new();
        for &(file, image, arch_specific) in KERNEL_FILES {
            match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec())) {
                Ok(m) => modules.push((file, m)),
                // Machine code for one chip only (build.rs's ARCH_SPECIFIC, e.g. sm_90a's wgmma): on another GPU
                // the driver refuses it, and the ops route to their other kernels (`Gpu::has_kernel`).
                Err(_) if arch_specific => {}
                Err(e) => return Err(driver_err(format!("loading kernels of cuda/{file}.cu on {name}"))(e)),
            }
        }
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            name,
            modules,
            functions: Mutex::new(HashMap::new()),
            poison: AtomicBool::new(false),
            launches: AtomicU64::new(0),
            exact_f32: AtomicBool::new(false),
            bf16: AtomicBool::new(false),
            multiprocessors,
        }))
    }

    /// Its streaming multiprocessors.
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// The device index.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CUDA version the driver supports, as (major, minor), e.g. (13, 0).
    pub fn driver_version(&self) -> Result<(i32, i32)> {
        let mut version = 0;
        // SAFETY: writes one int; the driver library is loaded (this GPU has a context).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver_err("asking the driver for its CUDA version"))?;
        Ok((version / 1000, version % 1000 / 10))
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(driver_err("querying GPU memory"))
    }

    /// The most memory the engine's allocations have held at once since the start or the last
    /// [`Gpu::reset_peak_memory`], in bytes (the pool's high-water mark).
    pub fn peak_memory(&self) -> Result<u64> {
        use cudarc::driver::sys;
        let pool = default_pool(&self.ctx).map_err(driver_err("querying the memory pool"))?;
        let mut value: u64 = 0;
        // SAFETY: a plain driver query with a valid pointer to a u64.
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut value as *mut u64 as *mut std::ffi::c_void,
            )
        }
        .result()
        .map_err(driver_err("reading the pool's peak usage"))?;
        Ok(value)
    }

    /// Restarts [`Gpu::peak_memory`] from the current usage.
    pub fn reset_peak_memory(&self) -> Result<()> {
        use cudarc::driver::sys;
        let pool = default_pool(&self.ctx).map_err(driver_err("querying the memory pool"))?;
        let mut zero: u64 = 0;
        // SAFETY: a plain driver call; 0 is the only value this attribute accepts.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        }
        .result()
        .map_err(driver_err("resetting the pool's peak usage"))
    }

    /// Waits for all queued work; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronising the GPU stream"))
    }

    /// The kernel `name` from whichever embedded file defines it.
    pub fn function(&self, name: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().expect("kernel cache poisoned");
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let file = KERNEL_NAMES
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| Error::Device(format!("kernel {name} is not defined in any cuda/*.cu file")))?;
        let module = &self
            .modules
            .iter()
            .find(|(f, _)| *f == file)
            .ok_or_else(|| {
                Error::Device(format!("kernel {name}: cuda/{file}.cu is built for another GPU than {}", self.name))
            })?
            .1;
        let f = module.load_function(name).map_err(driver_err(format!("loading kernel {name} from cuda/{file}.cu")))?;
        cache.insert(name, f.clone());
        Ok(f)
    }

    /// The kernel launches queued on this GPU so far (`profile` reports them per step beside the host's queueing
    /// time: the host's cost per launch).
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Whether this GPU runs `kernel`: its file was built (build.rs leaves arch-specific files out of builds for
    /// other chips) and loaded (the driver refuses arch-specific machine code of another chip).
    pub fn has_kernel<P>(&self, kernel: Kernel<P>) -> bool {
        KERNEL_NAMES
            .iter()
            .find(|(k, _)| *k == kernel.name())
            .is_some_and(|(_, file)| self.modules.iter().any(|(f, _)| f == file))
    }

    /// Launches `kernel` on the stream with its parameter struct, checking the launch and naming the kernel and
    /// `shapes` in any error. The struct's type is the one the kernel's header declares ([`crate::device::params`]).
    /// The caller fills the struct with pointers to buffers sized for `cfg` and the struct's sizes, as the kernel's
    /// header comment describes; that is the contract every launch of the engine keeps.
    pub fn launch<P: DeviceRepr>(&self, kernel: Kernel<P>, cfg: LaunchConfig, params: &P, shapes: &str) -> Result<()> {
        let function = self.function_for(kernel, cfg.shared_mem_bytes, shapes)?;
        self.launches.fetch_add(1, Ordering::Relaxed);
        let mut builder = self.stream.launch_builder(&function);
        builder.arg(params);
        // SAFETY: the one argument is the struct the kernel declares in its header (the Kernel type says so, and nvcc
        // checked the definition against that declaration); its pointers come from live buffers of this GPU, which the
        // stream-ordered pool frees only after queued work, and the caller sized them for the launch.
        check_launch(unsafe { builder.launch(cfg) }, kernel.name(), shapes).map(|_| ())
    }

    /// `kernel`'s function, allowed `shared_mem_bytes` of dynamic shared memory: beyond the default 48 KB that must
    /// be asked for per function (sm_90: up to 227 KB).
    fn function_for<P>(&self, kernel: Kernel<P>, shared_mem_bytes: u32, shapes: &str) -> Result<CudaFunction> {
        let function = self.function(kernel.name())?;
        if shared_mem_bytes > STATIC_SHARED_LIMIT {
            function
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_mem_bytes as i32,
                )
                .map_err(driver_err(format!(
                    "{}: {shared_mem_bytes} bytes of shared memory ({shapes})",
                    kernel.name()
                )))?;
        }
        Ok(function)
    }

    /// How many blocks of `kernel` with `block_threads` threads and `shared_mem_bytes` of dynamic shared memory the
    /// whole GPU holds at once (blocks per multiprocessor, by the driver's occupancy calculator, times the
    /// multiprocessors): the grid of a kernel whose blocks loop over the work.
    pub fn resident_blocks<P>(
        &self,
        kernel: Kernel<P>,
        block_threads: u32,
        shared_mem_bytes: u32,
        shapes: &str,
    ) -> Result<usize> {
        let function = self.function_for(kernel, shared_mem_bytes, shapes)?;
        let per_sm = function
            .occupancy_max_active_blocks_per_multiprocessor(block_threads, shared_mem_bytes as usize, None)
            .map_err(driver_err(format!("{}: occupancy ({shapes})", kernel.name())))?;
        Ok(per_sm as usize * self.multiprocessors)
    }

    /// The TMA descriptor of a bf16 tensor at `address` of `dims` elements per axis (innermost first; the innermost
    /// contiguous) and `strides` bytes between consecutive indices of the other axes, copied in boxes of `boxes`
    /// elements into shared memory with the 128-byte swizzle (the innermost box row must be 128 bytes: 64 elements),
    /// zeros where a box reaches outside the tensor. Along axis i a box copies every `steps[i]`-th index (the
    /// driver's element strides, 1 to 8; the innermost axis' must be 1): `boxes[i]` indices c, c + `steps[i]`, ... from
    /// the corner c that a copy names. The driver checks the rest (address and strides multiples of 16 bytes, at most
    /// 5 axes, boxes spanning at most 256 indices per axis) and its refusal names `what`.
    pub fn tensor_map_bf16(
        &self,
        address: u64,
        dims: &[u64],
        strides: &[u64],
        (boxes, steps): (&[u32], &[u32]),
        what: &str,
    ) -> Result<TensorMap> {
        use cudarc::driver::sys;
        let rank = dims.len();
        if strides.len() + 1 != rank || boxes.len() != rank || steps.len() != rank || boxes[0] != 64 || steps[0] != 1 {
            bail!(
                Device,
                "{what}: a tensor map of {dims:?} / {strides:?} / boxes {boxes:?} / steps {steps:?} is malformed"
            );
        }
        // The driver's boxDim is the span of a box: to copy n indices at steps of s it takes n s.
        let spans: Vec<u32> = boxes.iter().zip(steps).map(|(&n, &s)| n * s).collect();
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: every array holds `rank` (strides rank - 1) entries, as the call reads; the map is written by the
        // driver and copied out.
        let result = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                rank as u32,
                address as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                spans.as_ptr(),
                steps.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        result.result().map_err(driver_err(format!(
            "{what}: the tensor map of {dims:?} elements, strides {strides:?} bytes, boxes {boxes:?} at steps {steps:?}"
        )))?;
        Ok(TensorMap(map.opaque))
    }

    /// The device address of `memory` (a buffer, a slice or a view of one) for a kernel to read.
    pub fn ptr<T>(&self, memory: &impl DevicePtr<T>) -> ConstPtr<T> {
        // Event tracking is off (Gpu::new) and all work is on one stream, so the read needs no record: the guard
        // returned beside the address does nothing and is dropped.
        let (address, _no_record) = memory.device_ptr(&self.stream);
        ConstPtr::from_raw(address)
    }

    /// The device address of `memory` for a kernel to write.
    pub fn ptr_mut<T>(&self, memory: &mut impl DevicePtrMut<T>) -> MutPtr<T> {
        let (address, _no_record) = memory.device_ptr_mut(&self.stream);
        MutPtr::from_raw(address)
    }

    /// A new uninitialised buffer of `len` floats from the stream-ordered pool. Out of memory is reported with the
    /// request and what is free.
    pub fn alloc(self: &Arc<Self>, len: usize, what: &str) -> Result<GpuBuffer> {
        self.alloc_of::<f32>(len, what)
    }

    /// [`Gpu::alloc`] for elements of type `T`.
    pub fn alloc_of<T: GpuElement>(self: &Arc<Self>, len: usize, what: &str) -> Result<GpuBuffer<T>> {
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: every kernel that receives a fresh buffer writes all of it before anything reads it.
        let mut slice = unsafe { self.stream.alloc::<T>(len) }.map_err(|e| self.oom_error(bytes, what, e))?;
        if self.poison.load(Ordering::Relaxed) {
            let bytes = slice.num_bytes();
            let (ptr, _record) = slice.device_ptr_mut(&self.stream);
            // SAFETY: ptr addresses `bytes` bytes of the buffer just allocated on this stream.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream()) }
                .map_err(driver_err(format!("poisoning {what}")))?;
        }
        Ok(GpuBuffer::new(slice, self, what))
    }

    /// When on, every new buffer is filled with NaN (all bits set), so a kernel that leaves an output element
    /// unwritten is caught by the GPU tests.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Selects the math of the matrix products (convolutions, transposed convolutions, linear layers): tf32 tensor
    /// cores with float32 accumulation (the default, like PyTorch's default for cuDNN convolutions), or, when `exact`
    /// is set, float32 SIMT products whose rounding matches a float32 CPU computation (for the parity checks against
    /// float64 and PyTorch).
    pub fn set_exact_f32(&self, exact: bool) {
        self.exact_f32.store(exact, Ordering::Relaxed);
    }

    /// Whether matrix products run in exact float32 ([`Gpu::set_exact_f32`]).
    pub fn exact_f32(&self) -> bool {
        self.exact_f32.load(Ordering::Relaxed)
    }

    /// Selects the storage type of a run's activations on this GPU (see [`Precision`](super::Precision)); float32
    /// unless set.
    pub fn set_precision(&self, precision: super::Precision) {
        self.bf16.store(precision == super::Precision::Bf16, Ordering::Relaxed);
    }

    /// The precision of runs on this GPU ([`Gpu::set_precision`]).
    pub fn precision(&self) -> super::Precision {
        if self.bf16.load(Ordering::Relaxed) {
            super::Precision::Bf16
        } else {
            super::Precision::Fp32
        }
    }

    /// A zero-filled buffer of `len` floats.
    pub fn zeros(self: &Arc<Self>, len: usize, what: &str) -> Result<GpuBuffer> {
        self.zeros_of::<f32>(len, what)
    }

    /// [`Gpu::zeros`] for elements of type `T`.
    pub fn zeros_of<T: GpuElement>(self: &Arc<Self>, len: usize, what: &str) -> Result<GpuBuffer<T>> {
        let mut b = self.alloc_of::<T>(len, what)?;
        self.stream.memset_zeros(&mut b.slice).map_err(driver_err(format!("zeroing {what}")))?;
        Ok(b)
    }

    fn oom_error(&self, bytes: usize, what: &str, e: DriverError) -> Error {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        match self.memory() {
            Ok((free, total)) => Error::Device(format!(
                "allocating {:.3} GiB for {what} failed ({e}); {:.2} GiB of {:.2} GiB free on {}: lower the batch \
                 size or the patch size",
                gib(bytes),
                gib(free),
                gib(total),
                self.name
            )),
            Err(_) => Error::Device(format!("allocating {bytes} bytes for {what} failed: {e}")),
        }
    }
}

/// Stops the stream-ordered pool from returning freed memory to the driver at every synchronisation: by default its
/// release threshold is 0, so each step after a sync would map its activations afresh, which costs more than
/// the elementwise kernels that use them.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> std::result::Result<(), DriverError> {
    use cudarc::driver::sys;
    let pool = default_pool(ctx)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: a plain driver call on the device's pool with a valid pointer to a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
    }
}

/// The device's default memory pool, which stream-ordered allocation draws from.
fn default_pool(ctx: &Arc<CudaContext>) -> std::result::Result<cudarc::driver::sys::CUmemoryPool, DriverError> {
    let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
    ctx.bind_to_thread()?;
    // SAFETY: a plain driver query with a valid out-pointer.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()? };
    Ok(pool)
}

/// A 1-D launch configuration for a grid-stride kernel over `n` elements: blocks of 256 threads, at most 2^20
/// blocks (the kernels loop over the rest).
pub fn grid_1d(n: usize) -> LaunchConfig {
    let block = 256usize;
    let blocks = n.div_ceil(block).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 }
}

/// [`grid_1d`] over the chunks of one 16-byte vector (common.cuh's `VEC<T>`: 4 float32, 8 bf16) of `n` elements of
/// `T`, for the kernels that take a chunk per thread (elementwise, layout, pooling and cast kernels).
pub fn grid_vec<T>(n: usize) -> LaunchConfig {
    grid_1d(n.div_ceil(16 / std::mem::size_of::<T>()))
}

/// Checks a launch result, naming the kernel and the shapes it ran on.
pub fn check_launch<T>(r: std::result::Result<T, DriverError>, kernel: &str, shapes: &str) -> Result<T> {
    r.map_err(|e| Error::Device(format!("launching {kernel} on {shapes}: {e}")))
}

impl<T: GpuElement> GpuBuffer<T> {
    /// Wraps device memory of `gpu`; `what` names it in the profiler's memory table.
    pub fn new(slice: CudaSlice<T>, gpu: &Arc<Gpu>, what: &str) -> GpuBuffer<T> {
        let tracked = crate::profile::track_alloc(slice.num_bytes(), what);
        GpuBuffer { slice, gpu: gpu.clone(), tracked }
    }

    /// The buffer's device address, for a kernel parameter the kernel reads.
    pub fn ptr(&self) -> ConstPtr<T> {
        self.gpu.ptr(&self.slice)
    }

    /// The buffer's device address, for a kernel parameter the kernel writes.
    pub fn ptr_mut(&mut self) -> MutPtr<T> {
        self.gpu.ptr_mut(&mut self.slice)
    }

    /// Copies host data into a new device buffer.
    pub fn from_host(gpu: &Arc<Gpu>, data: &[T]) -> Result<GpuBuffer<T>> {
        let slice =
            gpu.stream.clone_htod(data).map_err(driver_err(format!("copying {} values to the GPU", data.len())))?;
        Ok(GpuBuffer::new(slice, gpu, "copied from the host"))
    }

    /// Copies the buffer to the host (synchronises the stream).
    pub fn to_host(&self) -> Result<Vec<T>> {
        self.gpu
            .stream
            .clone_dtoh(&self.slice)
            .map_err(driver_err(format!("copying {} values from the GPU", self.slice.len())))
    }
}

impl Gpu {
    /// Runs `f` `warmup` times, then times each of `reps` further runs with CUDA events on the stream and returns the
    /// times in milliseconds (one per run), for benchmarks.
    pub fn time_ms(&self, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
        self.time_ms_after(warmup, reps, || Ok(()), |()| f())
    }

    /// As [`Gpu::time_ms`], with `setup` run before each run of `f` and outside its timing (its result handed to
    /// `f`): a backward pass timed alone after the forward pass that records its tape, rather than as the difference
    /// of two timed runs, which the noise of a large forward can make negative for a small backward.
    pub fn time_ms_after<S>(
        &self,
        warmup: usize,
        reps: usize,
        mut setup: impl FnMut() -> Result<S>,
        mut f: impl FnMut(S) -> Result<()>,
    ) -> Result<Vec<f64>> {
        for _ in 0..warmup {
            f(setup()?)?;
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let state = setup()?;
            let start = self.stream.record_event(flags).map_err(driver_err("recording a timing event"))?;
            f(state)?;
            let end = self.stream.record_event(flags).map_err(driver_err("recording a timing event"))?;
            end.synchronize().map_err(driver_err("waiting for a timed run"))?;
            times.push(start.elapsed_ms(&end).map_err(driver_err("reading a timing event"))? as f64);
        }
        Ok(times)
    }

    /// Copies `src` into `dst` on the device (same length).
    pub fn copy<T: GpuElement>(&self, src: &GpuBuffer<T>, dst: &mut GpuBuffer<T>) -> Result<()> {
        self.stream.memcpy_dtod(&src.slice, &mut dst.slice).map_err(driver_err("device-to-device copy"))
    }
}
