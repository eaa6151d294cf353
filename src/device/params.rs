//! The typed boundary between Rust and the CUDA kernels, declared once, in C, in the headers `cuda/X.cuh`.
//!
//! Each kernel file `cuda/X.cu` has a header `cuda/X.cuh` that declares, in a small subset of C++ (described atop
//! src/device/header.rs, the reader that build.rs and the tests share):
//!
//! - the constants both sides need (threads per block, tile sizes, chunk lengths: `constexpr int SCAN_CHUNK = 64;`),
//! - one parameter struct per family of kernels (`struct NormSumRowsParams { const float* a; float* out; ... };`),
//!   holding the device pointers and the sizes, so that a launch passes one argument,
//! - the kernels that take it by value
//!   (`extern "C" __global__ void layer_norm_sum_partials(const NormSumRowsParams p);`), or take a struct of a header
//!   it includes and that is read before it (conv_tc.cuh's kernels take conv.cuh's `ConvGemmParams`: one product
//!   description for both maths).
//!
//! `build.rs` reads the headers and generates this module's contents: a `pub const` per constant (a `usize`), a
//! `#[repr(C)]` struct per parameter struct with the header's comments as docs, its `DeviceRepr`, and in [`kernel`]
//! a handle per kernel, typed by its struct, so that [`Gpu::launch`] only accepts the struct the kernel declares.
//! Layout cannot drift: both sides come from the same text; nvcc compiles `static_assert`s of every struct's size,
//! alignment and field offsets as build.rs computed them (`params_check.cu` in OUT_DIR); the test below holds Rust's
//! `#[repr(C)]` layout to the same numbers; and the header's declarations make nvcc reject a kernel defined with a
//! different parameter type. A header outside the subset fails the build with its file and line, with or without
//! nvcc (the Rust side never needs nvcc).
//!
//! Device pointers travel inside the struct as [`ConstPtr`] (`const float*`: the kernel only reads) or [`MutPtr`]
//! (`float*`), taken from the buffers ([`GpuBuffer::ptr`], [`GpuBuffer::ptr_mut`]); a pointer a kernel does not use
//! in a given launch is [`ConstPtr::NULL`] / [`MutPtr::NULL`]. A family's kernels share one struct, so an op builds
//! the fields they all read once and each launch adds its own with struct update syntax
//! (`ScanParams { y: y.ptr_mut(), ..base }`); `Default` gives null pointers and zeros. A buffer that one kernel of a
//! family writes and a later launch reads only through a shared reference (a saved tensor) has two fields, e.g.
//! `float* mean_out` for the forward and `const float* mean` for the backward. A struct may be generic over its storage type
//! (`template <typename T> struct P { const T* x; };`, Rust `P<T>`, kernels declared as `(const P<float> p)`), the
//! form kernels templated over float32 and bf16 storage take.
//!
//! Adding a kernel:
//! 1. declare its parameter struct (or reuse its family's), the constants the host needs, and the kernel, in
//!    `cuda/X.cuh`;
//! 2. define it in `cuda/X.cu` taking the struct by value, `extern "C" __global__ void my_kernel(const MyParams p)`
//!    (build.rs fails if a kernel of X.cu is not declared in X.cuh, or the other way round);
//! 3. launch it: `gpu.launch(kernel::my_kernel, cfg, &MyParams { x: xb.ptr(), y: yb.ptr_mut(), n }, &shapes)`.
//!
//! ```
//! use lkm_engine::device::params::{kernel, ConstPtr, EltwiseParams, MutPtr, SCAN_CHUNK};
//! // The handle knows its kernel's name and, in its type, its parameter struct.
//! assert_eq!(kernel::add_f32.name(), "add_f32");
//! // A kernel templated over the storage type: its instance for a type (f32 or half::bf16).
//! assert_eq!(kernel::add::<half::bf16>().name(), "add_bf16");
//! let p = EltwiseParams::<f32> { a: ConstPtr::NULL, b: ConstPtr::NULL, y: MutPtr::NULL, s: 1.0, n: 0 };
//! assert_eq!(format!("{:?}", p.a), "0x0");
//! // Constants come from the headers too: the selective scan's chunk length.
//! assert_eq!(SCAN_CHUNK, 64);
//! ```

use std::fmt;
use std::marker::PhantomData;

#[cfg(doc)]
use crate::device::cuda::{Gpu, GpuBuffer};

/// A device pointer a kernel reads through (`const T*` in the header): a `CUdeviceptr`, 8 bytes.
#[repr(transparent)]
pub struct ConstPtr<T>(u64, PhantomData<fn() -> T>);

/// A device pointer a kernel may write through (`T*` in the header): a `CUdeviceptr`, 8 bytes.
#[repr(transparent)]
pub struct MutPtr<T>(u64, PhantomData<fn() -> T>);

macro_rules! device_pointer {
    ($name:ident) => {
        impl<T> $name<T> {
            /// The null pointer, for a pointer field the launched kernel does not use.
            pub const NULL: Self = $name(0, PhantomData);

            /// Wraps a raw device address of an element of type `T`.
            pub fn from_raw(address: u64) -> Self {
                $name(address, PhantomData)
            }

            /// The raw device address.
            pub fn address(self) -> u64 {
                self.0
            }

            /// The address `elements` elements of `T` further on: a part of a buffer that holds several arrays.
            pub fn offset(self, elements: usize) -> Self {
                $name(self.0 + (elements * std::mem::size_of::<T>()) as u64, PhantomData)
            }
        }

        impl<T> Clone for $name<T> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<T> Copy for $name<T> {}

        /// Null: a generated struct's `Default` leaves the pointers a kernel does not use null.
        impl<T> Default for $name<T> {
            fn default() -> Self {
                Self::NULL
            }
        }

        impl<T> fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
device_pointer!(ConstPtr);
device_pointer!(MutPtr);

/// cuda.h's `CUtensorMap` (`CUtensorMap m` in a header): the opaque descriptor of a tensor in device memory that a
/// kernel's TMA copies read boxes of, made by the driver ([`Gpu::tensor_map_bf16`]); zero (no tensor) by default.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorMap(pub [u64; 16]);

/// A kernel of `cuda/*.cu` by name, typed by the parameter struct it takes (see [`kernel`]).
pub struct Kernel<P> {
    name: &'static str,
    params: PhantomData<fn(P)>,
}

impl<P> Kernel<P> {
    /// The handle of kernel `name`; build.rs makes one per kernel declared in a header.
    pub const fn new(name: &'static str) -> Self {
        Kernel { name, params: PhantomData }
    }

    /// The kernel's name in the compiled module.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<P> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Kernel<P> {}

include!(concat!(env!("OUT_DIR"), "/params.rs"));

#[cfg(test)]
mod tests {
    use super::RUST_LAYOUTS;
    use crate::device::header;

    /// Every generated struct has, in Rust, the size, alignment and field offsets that the C rules give for the field
    /// list parsed from its header (the same numbers nvcc asserts in params_check.cu). Also a test of the parse
    /// itself: every header under cuda/ with a kernel file beside it is read here again.
    #[test]
    fn rust_layout_matches_the_headers() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        // In build.rs's order (sorted), each header seeing the structs of those before it.
        let mut paths: Vec<_> = std::fs::read_dir(root.join("cuda")).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        let mut earlier: Vec<header::Struct> = Vec::new();
        for path in paths {
            if path.extension().is_none_or(|e| e != "cuh") || !path.with_extension("cu").is_file() {
                continue;
            }
            let shown = format!("cuda/{}", path.file_name().unwrap().to_string_lossy());
            let parsed = header::parse_with(&shown, &std::fs::read_to_string(&path).unwrap(), &earlier).unwrap();
            earlier.extend(parsed.structs.iter().cloned());
            for s in &parsed.structs {
                let (_, _, size, align, fields) = RUST_LAYOUTS
                    .iter()
                    .find(|(h, name, ..)| *h == shown && *name == s.name)
                    .unwrap_or_else(|| panic!("{shown}: {} was not generated", s.name));
                let c = header::layout(s);
                assert_eq!((*size, *align), (c.size, c.align), "{shown}: {} size and alignment", s.name);
                let names: Vec<&str> = s.fields.iter().map(|f| f.name.as_str()).collect();
                let rust_names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
                assert_eq!(names, rust_names, "{shown}: {} fields", s.name);
                let offsets: Vec<usize> = fields.iter().map(|(_, o)| *o).collect();
                assert_eq!(offsets, c.offsets, "{shown}: {} field offsets", s.name);
                seen += 1;
            }
        }
        assert_eq!(seen, RUST_LAYOUTS.len(), "every generated struct comes from a header read here");
        assert!(seen >= 10, "the kernel families' structs: found {seen}");
    }
}
