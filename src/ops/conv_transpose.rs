//! 2D and 3D transposed convolution whose kernel equals its stride and which has no padding (PyTorch's
//! ConvTranspose2d/3d with `kernel_size = stride`): the U-Net decoder's upsampling. A 2D map is run as a 3D map of
//! depth 1 with kernel depth 1.
//!
//! Shapes: x (N, Cin, D, H, W), w (Cin, Cout, kd, kh, kw) (PyTorch's layout: input channels first), b (Cout),
//! y (N, Cout, D*kd, H*kh, W*kw). Because the stride equals the kernel, every output voxel receives exactly one tap:
//! output index i*k + t (per axis, t in [0, k)) comes from input index i and kernel tap t only.
//!
//! ```text
//!   y[n,co, id*kd+a, ih*kh+b, iw*kw+c] = b[co] + sum_ci x[n,ci,id,ih,iw] * w[ci,co,a,b,c]
//! ```
//!
//! Backward, with g = dL/dy:
//!
//! ```text
//!   dx[n,ci,id,ih,iw] = sum_{co,a,b,c} g[n,co, id*kd+a, ih*kh+b, iw*kw+c] * w[ci,co,a,b,c]
//!   dw[ci,co,a,b,c]   = sum_{n,id,ih,iw} x[n,ci,id,ih,iw] * g[n,co, id*kd+a, ih*kh+b, iw*kw+c]
//!   db[co]            = sum_{n, all output positions} g[n,co,...]
//! ```
//!
//! CPU layout of the work: an output row (n, co, id*kd+a, ih*kh+b) of W*kw values is W blocks of kw values, block iw
//! being `x[n,ci,id,ih,iw]` times the contiguous weight row `w[ci,co,a,b,:]` summed over ci. The backward walks the same
//! rows: dx takes per block the dot product of the gradient block with the weight row, dw accumulates each block
//! scaled by the input value.
//!
//! The CPU passes run on rayon's thread pool, split over what each pass writes: the forward over output channels
//! (n, co), dx over input channels (n, ci), dw over weight slices (ci, co). Each of these is computed whole by one
//! thread in the same order as a single-threaded run, so the results are the same bits for any number of threads.
//!
//! GPU forward: since every output voxel takes exactly one tap, the taps are channels. With K = kd kh kw and
//! t = (a kh + b) kw + c,
//!
//! ```text
//!   z[n, co K + t, id, ih, iw] = b[co] + sum_ci x[n,ci,id,ih,iw] * w[ci, co K + t]      (one 1x1 product, Cout K
//!                                                                                     channels at x's positions)
//!   y[n, co, id*kd+a, ih*kh+b, iw*kw+c] = z[n, co K + t, id, ih, iw]                    (depth_to_space: a move)
//! ```
//!
//! w as it lies in memory is the 1x1 product's (Cin, Cout K, 1) weight, so the product is conv's `Pairing` with x as
//! the narrow map and z as the wide one (stride 1, no padding). In bf16 on sm_90 (input positions and Cout K whole
//! 16-byte pieces) both lines are one kernel, cuda/gemm_wgmma.cu's conv_transpose_fprop_wgmma_bf16: the product on
//! wgmma from x's channel rows and w as they lie, each sum stored straight into its voxel of y with b(co) (no z, no
//! per-tap bias, no depth_to_space pass; `UpGeom::fused_forward`). One product over all the taps measured faster than
//! one per tap phase, whose outputs are a strided subset of y (flare-3d's five upsamplings 2.34 -> 1.95 ms forward,
//! benches/RESULTS.md). GPU backward: the products of the pairing with y as the wide map (stride k, padding 0; the
//! weight (Cin, Cout, k) is exactly the pairing's (narrow, wide, k) weight): dx is narrow-from-wide, dw the pairing's
//! weight gradient with x as the narrow map and g as the wide one, db conv's per-channel sum. In bf16 on sm_90 from 64
//! output channels the backward takes g into z's shape first instead (`Pairing::unfolded`: conv's im2col, which for
//! a kernel equal to its stride only rearranges g) and runs dx as the 1x1 product over it and dw as the explicit
//! product (H100, 2026-12-06: flare-3d's 256 -> 128 input gradient 0.147 -> 0.072 ms, weight gradient 0.203 ->
//! 0.119; from 32 output channels it lost, as this form did on the gathers of 2026-12-02: 0.93 -> 1.35 ms).
//!
//! Cost per element of y, with k = k_d k_h k_w taps (= the stride) (the counting rules are in [`ops`](crate::ops)):
//! forward 2 Cin FLOPs (one tap per output, a multiply and an add per input channel) and at least
//! 4 (1 + Cin / (Cout k)) bytes; backward 4 Cin FLOPs and at least 4 (1 + 2 Cin / (Cout k)) bytes. The 3D
//! reference's finest level (64 to 32 channels, 1x2x2) has 128 FLOPs per 6 bytes, 21 per byte.

use rayon::prelude::*;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_vec, GpuBuffer, GpuElement};
use crate::device::params::{kernel, ConvTransposeWgmmaParams, DepthToSpaceParams, GEMM_WGMMA_BN};
use crate::ops::cast::{params_in, Weight};
use crate::ops::concat::copy_rows_gpu;
use crate::ops::conv::{gemm_wgmma_config, ConvElement, Pairing};
use crate::ops::{channel_sums_cpu, per_axis, MapDims};
use crate::profile;
use crate::tensor::{DType, Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Result};

/// Transposed convolution of `x` (N, Cin, \[D,\] H, W) with `w` (Cin, Cout, \[kd,\] kh, kw) plus an optional `bias`
/// (Cout), with stride equal to the kernel size on every axis and no padding: the output is
/// (N, Cout, \[D*kd,\] H*kh, W*kw).
pub fn conv_transpose(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (weight, bias_weight) = (Weight::like(tape, w, x)?, bias.map(|b| Weight::like(tape, b, x)).transpose()?);
    let (w, bias) = (&weight.value, bias_weight.as_ref().map(|b| &b.value));
    let geom = UpGeom::new(x, w, bias)?;
    let range = profile::forward(geom.kind(), &[x, w], geom.flops());
    fn gpu<T: ConvElement>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, geom: &UpGeom) -> Result<Tensor> {
        let what = geom.describe();
        let b = bias.map(|b| b.gpu_operand::<T>("conv_transpose bias")).transpose()?;
        let (xb, wb) = (x.gpu_operand::<T>("conv_transpose input")?, w.gpu_operand::<T>("conv_transpose weight")?);
        if let Some(y) = geom.fused_forward(xb, wb, b, &what)? {
            return Tensor::from_gpu(y, &geom.out_shape());
        }
        let bias_z = b.map(|b| geom.bias_per_tap(b, &what)).transpose()?;
        let z = geom.taps_as_channels().wide_from_narrow(xb, wb, bias_z.as_ref(), &what)?;
        Tensor::from_gpu(geom.depth_to_space(&z, &what)?, &geom.out_shape())
    }
    let y = match by_gpu_type!(x, gpu(x, w, bias, &geom)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, w, bias, &geom))?,
    };
    let saved = ConvTransposeBackward {
        x: x.clone(),
        w: w.clone(),
        has_bias: bias.is_some(),
        grad_dtype: weight.dtype(),
        geom,
    };
    range.done([&y]);
    match &bias_weight {
        Some(b) => tape.record(&[x, &weight.master, &b.master], &y, saved),
        None => tape.record(&[x, &weight.master], &y, saved),
    }
    Ok(y)
}

/// The sizes of one transposed convolution, spatial axes as [D, H, W].
#[derive(Clone, Copy, Debug)]
struct UpGeom {
    dims: MapDims,
    cout: usize,
    k: [usize; 3],
    out: [usize; 3],
}

impl UpGeom {
    /// `conv_transpose2d` or `conv_transpose3d`: the op's name in profiles.
    fn kind(&self) -> &'static str {
        if self.dims.spatial_rank == 2 {
            "conv_transpose2d"
        } else {
            "conv_transpose3d"
        }
    }

    /// Forward FLOPs, 2 N Cin prod(in) Cout prod(k) (each of the input and weight gradients costs the same).
    fn flops(&self) -> f64 {
        2.0 * (self.dims.n * self.dims.c * self.dims.voxels() * self.cout * self.taps()) as f64
    }

    fn new(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<UpGeom> {
        x.check_same_kind(w, "conv_transpose (input vs weight)")?;
        let dims = MapDims::of(x, "conv_transpose")?;
        ensure!(
            w.rank() == x.rank(),
            Shape,
            "conv_transpose: weight shape {:?} must have the input's rank {} ((Cin, Cout{}) for input shape {:?})",
            w.shape(),
            x.rank(),
            if dims.spatial_rank == 2 { ", kh, kw" } else { ", kd, kh, kw" },
            x.shape()
        );
        ensure!(
            w.shape()[0] == dims.c,
            Shape,
            "conv_transpose: weight shape {:?} expects {} input channels (axis 0), but the input {:?} has {}",
            w.shape(),
            w.shape()[0],
            x.shape(),
            dims.c
        );
        let cout = w.shape()[1];
        let k = per_axis(&w.shape()[2..], dims.spatial_rank, "conv_transpose kernel")?;
        // Non-empty spatial axes keep every row, and every chunk the loops split the maps into, non-empty.
        ensure!(
            dims.s.iter().all(|&s| s > 0),
            Shape,
            "conv_transpose: empty spatial axis in input shape {:?}",
            x.shape()
        );
        if let Some(b) = bias {
            x.check_same_kind(b, "conv_transpose (input vs bias)")?;
            b.check_shape(&[cout], "conv_transpose bias")?;
        }
        let out = [0, 1, 2].map(|i| dims.s[i] * k[i]);
        Ok(UpGeom { dims, cout, k, out })
    }

    fn taps(&self) -> usize {
        self.k.iter().product()
    }

    fn out_voxels(&self) -> usize {
        self.out.iter().product()
    }

    fn out_shape(&self) -> Vec<usize> {
        self.dims.shape_with(self.cout, self.out)
    }

    /// The GPU backward's pairing: x narrow, y wide, stride = kernel, no padding (see the module header).
    fn pairing(&self) -> Pairing {
        Pairing {
            batch: self.dims.n,
            c_wide: self.cout,
            c_narrow: self.dims.c,
            wide: self.out,
            narrow: self.dims.s,
            k: self.k,
            stride: self.k,
            pad: [0; 3],
            transposed: true,
        }
    }

    /// The GPU forward's 1x1 product from x to z, the taps as channels (see the module header).
    fn taps_as_channels(&self) -> Pairing {
        Pairing {
            batch: self.dims.n,
            c_wide: self.cout * self.taps(),
            c_narrow: self.dims.c,
            wide: self.dims.s,
            narrow: self.dims.s,
            k: [1; 3],
            stride: [1; 3],
            pad: [0; 3],
            transposed: true,
        }
    }

    /// The forward as one wgmma product whose epilogue stores each tap into its voxel of y (cuda/gemm_wgmma.cu's
    /// conv_transpose_fprop_wgmma_bf16: no z, no bias per tap, no depth_to_space), where the type and the GPU have it
    /// and the sizes suit it (input positions and Cout K whole 16-byte pieces, y's elements per item below 2^31);
    /// `None` otherwise.
    fn fused_forward<T: ConvElement>(
        &self,
        x: &GpuBuffer<T>,
        w: &GpuBuffer<T>,
        b: Option<&GpuBuffer<T>>,
        what: &str,
    ) -> Result<Option<GpuBuffer<T>>> {
        let gpu = &x.gpu;
        let Some(kernel) = T::TRANSPOSE_FPROP_WGMMA.filter(|&k| gpu.has_kernel(k)) else {
            return Ok(None);
        };
        let (positions, n) = (self.dims.s.iter().product::<usize>(), self.cout * self.taps());
        let piece = 16 / size_of::<T>();
        let aligned = x.ptr().address() % 16 == 0 && w.ptr().address() % 16 == 0;
        if positions % piece != 0 || n % piece != 0 || !aligned || self.cout * self.out_voxels() > i32::MAX as usize {
            return Ok(None);
        }
        let mut y = gpu.alloc_of::<T>(self.dims.n * self.cout * self.out_voxels(), what)?;
        let p = ConvTransposeWgmmaParams {
            x: x.ptr(),
            w: w.ptr(),
            bias: b.map(GpuBuffer::ptr).unwrap_or_default(),
            y: y.ptr_mut(),
            batch: self.dims.n as i32,
            c_in: self.dims.c as i32,
            c_out: self.cout as i32,
            size: self.dims.s.map(|s| s as i32),
            k: self.k.map(|k| k as i32),
        };
        let cfg = gemm_wgmma_config(n, positions, GEMM_WGMMA_BN, self.dims.n);
        gpu.launch(kernel, cfg, &p, what)?;
        Ok(Some(y))
    }

    /// z's bias, `b_z[co K + t] = b[co]`: K strided copies of b.
    fn bias_per_tap<T: GpuElement>(&self, b: &GpuBuffer<T>, what: &str) -> Result<GpuBuffer<T>> {
        let taps = self.taps();
        let mut bias_z = b.gpu.alloc_of::<T>(self.cout * taps, what)?;
        for t in 0..taps {
            copy_rows_gpu(b, &mut bias_z, self.cout, 1, (1, 0), (taps, t), what)?;
        }
        Ok(bias_z)
    }

    /// y from z (the taps as channels), by cuda/layout.cu's depth_to_space.
    fn depth_to_space<T: GpuElement>(&self, z: &GpuBuffer<T>, what: &str) -> Result<GpuBuffer<T>> {
        let len = self.dims.n * self.cout * self.out_voxels();
        let mut y = z.gpu.alloc_of::<T>(len, what)?;
        let p = DepthToSpaceParams {
            src: z.ptr(),
            dst: y.ptr_mut(),
            N: self.dims.n as i64,
            C: self.cout as i64,
            size: self.dims.s.map(|s| s as i64),
            k: self.k.map(|k| k as i64),
        };
        z.gpu.launch(kernel::depth_to_space::<T>(), grid_vec::<T>(len), &p, what)?;
        Ok(y)
    }

    /// The sizes, for error messages.
    fn describe(&self) -> String {
        format!(
            "conv_transpose (N {}, Cin {}, Cout {}, input {:?}, kernel = stride {:?})",
            self.dims.n, self.dims.c, self.cout, self.dims.s, self.k
        )
    }
}

/// The three row kernels below work on a row of blocks of k = `w.len()` values, block i belonging to input column
/// i. The decoder's kernels have k = 1 or 2 on the W axis; for those the block loop is compiled with k known, so it
/// is unrolled.
macro_rules! by_block_len {
    ($k:expr, $f:ident ( $($arg:expr),* )) => {
        match $k {
            1 => $f::<T, 1>($($arg),*),
            2 => $f::<T, 2>($($arg),*),
            _ => $f::<T, 0>($($arg),*),
        }
    };
}

/// Block length `K`, or the runtime `k` when `K` = 0.
fn block_len<const K: usize>(k: usize) -> usize {
    if K == 0 {
        k
    } else {
        K
    }
}

/// `y[i*k + c] += x[i] * w[c]`: the forward of one input row and weight row.
fn spread_add<T: Real>(y: &mut [T], x: &[T], w: &[T]) {
    fn run<T: Real, const K: usize>(y: &mut [T], x: &[T], w: &[T]) {
        let k = block_len::<K>(w.len());
        for (yb, &xv) in y.chunks_exact_mut(k).zip(x) {
            for (yv, &wv) in yb[..k].iter_mut().zip(&w[..k]) {
                *yv += xv * wv;
            }
        }
    }
    by_block_len!(w.len(), run(y, x, w))
}

/// `dx[i] += sum_c g[i*k + c] * w[c]`: the input gradient from one gradient row and weight row.
fn block_dots_add<T: Real>(dx: &mut [T], g: &[T], w: &[T]) {
    fn run<T: Real, const K: usize>(dx: &mut [T], g: &[T], w: &[T]) {
        let k = block_len::<K>(w.len());
        for (dxv, gb) in dx.iter_mut().zip(g.chunks_exact(k)) {
            *dxv += gb[..k].iter().zip(&w[..k]).map(|(&gv, &wv)| gv * wv).sum::<T>();
        }
    }
    by_block_len!(w.len(), run(dx, g, w))
}

/// `dw[c] += sum_i x[i] * g[i*k + c]`: the weight gradient from one input row and gradient row.
fn weighted_blocks_add<T: Real>(dw: &mut [T], x: &[T], g: &[T]) {
    fn run<T: Real, const K: usize>(dw: &mut [T], x: &[T], g: &[T]) {
        let k = block_len::<K>(dw.len());
        for (&xv, gb) in x.iter().zip(g.chunks_exact(k)) {
            for (dwv, &gv) in dw[..k].iter_mut().zip(&gb[..k]) {
                *dwv += xv * gv;
            }
        }
    }
    by_block_len!(dw.len(), run(dw, x, g))
}

fn forward_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: &UpGeom) -> Result<Tensor> {
    let (xs, ws) = (x.cpu::<T>()?, w.cpu::<T>()?);
    let bs = bias.map(|b| b.cpu::<T>()).transpose()?;
    let MapDims { c: cin, s: [di, hi, wi], .. } = g.dims;
    let [kd, kh, kw] = g.k;
    let [_, hout, wout] = g.out;
    let (in_vox, out_vox, taps) = (g.dims.voxels(), g.out_voxels(), g.taps());
    let mut y = vec![T::zero(); g.dims.n * g.cout * out_vox];
    y.par_chunks_mut(out_vox).enumerate().for_each(|(nco, yc)| {
        let (n, co) = (nco / g.cout, nco % g.cout);
        if let Some(b) = bs {
            yc.fill(b[co]);
        }
        for id in 0..di {
            for a in 0..kd {
                for ih in 0..hi {
                    for b in 0..kh {
                        let yrow = &mut yc[((id * kd + a) * hout + ih * kh + b) * wout..][..wout];
                        for ci in 0..cin {
                            let xrow = &xs[(n * cin + ci) * in_vox + (id * hi + ih) * wi..][..wi];
                            let wrow = &ws[(ci * g.cout + co) * taps + (a * kh + b) * kw..][..kw];
                            spread_add(yrow, xrow, wrow);
                        }
                    }
                }
            }
        }
    });
    Tensor::from_vec(y, &g.out_shape())
}

/// dx: each input row (n, ci, id, ih) gathers, over co and the taps (a, b), the dot products of the gradient
/// blocks of output row (id*kd+a, ih*kh+b) with the weight row w[ci,co,a,b,:].
fn grad_input_cpu<T: Real>(gy: &Tensor, w: &Tensor, g: &UpGeom) -> Result<Tensor> {
    let (gs, ws) = (gy.cpu::<T>()?, w.cpu::<T>()?);
    let MapDims { n: batch, c: cin, s: [di, hi, wi], .. } = g.dims;
    let [kd, kh, kw] = g.k;
    let [_, hout, wout] = g.out;
    let (in_vox, out_vox, taps) = (g.dims.voxels(), g.out_voxels(), g.taps());
    let mut dx = vec![T::zero(); batch * cin * in_vox];
    dx.par_chunks_mut(in_vox).enumerate().for_each(|(nci, dxc)| {
        let (n, ci) = (nci / cin, nci % cin);
        for id in 0..di {
            for ih in 0..hi {
                let dxrow = &mut dxc[(id * hi + ih) * wi..][..wi];
                for co in 0..g.cout {
                    for a in 0..kd {
                        for b in 0..kh {
                            let grow = &gs[(n * g.cout + co) * out_vox + ((id * kd + a) * hout + ih * kh + b) * wout..]
                                [..wout];
                            let wrow = &ws[(ci * g.cout + co) * taps + (a * kh + b) * kw..][..kw];
                            block_dots_add(dxrow, grow, wrow);
                        }
                    }
                }
            }
        }
    });
    Tensor::from_vec(dx, &g.dims.shape_with(cin, g.dims.s))
}

/// dw: for each weight slice (ci, co), every gradient block scaled by the input value it came from, accumulated
/// into the weight row of its taps (a, b).
fn grad_weight_cpu<T: Real>(gy: &Tensor, x: &Tensor, w_shape: &[usize], g: &UpGeom) -> Result<Tensor> {
    let (gs, xs) = (gy.cpu::<T>()?, x.cpu::<T>()?);
    let MapDims { n: batch, c: cin, s: [di, hi, wi], .. } = g.dims;
    let [kd, kh, kw] = g.k;
    let [_, hout, wout] = g.out;
    let (in_vox, out_vox, taps) = (g.dims.voxels(), g.out_voxels(), g.taps());
    let mut dw = vec![T::zero(); cin * g.cout * taps];
    dw.par_chunks_mut(taps).enumerate().for_each(|(cico, dwc)| {
        let (ci, co) = (cico / g.cout, cico % g.cout);
        for n in 0..batch {
            let xc = &xs[(n * cin + ci) * in_vox..][..in_vox];
            let gc = &gs[(n * g.cout + co) * out_vox..][..out_vox];
            for id in 0..di {
                for ih in 0..hi {
                    let xrow = &xc[(id * hi + ih) * wi..][..wi];
                    for a in 0..kd {
                        for b in 0..kh {
                            let grow = &gc[((id * kd + a) * hout + ih * kh + b) * wout..][..wout];
                            let dwrow = &mut dwc[(a * kh + b) * kw..][..kw];
                            weighted_blocks_add(dwrow, xrow, grow);
                        }
                    }
                }
            }
        }
    });
    Tensor::from_vec(dw, w_shape)
}

struct ConvTransposeBackward {
    x: Tensor,
    /// The weight as the kernels read it (in the input's dtype).
    w: Tensor,
    has_bias: bool,
    /// The masters' type, which dW and db are returned in.
    grad_dtype: DType,
    geom: UpGeom,
}

impl Backward for ConvTransposeBackward {
    fn name(&self) -> &'static str {
        self.geom.kind()
    }

    fn flops(&self) -> f64 {
        2.0 * self.geom.flops()
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geom;
        grad_out.check_shape(&g.out_shape(), "conv_transpose backward: output gradient")?;
        grad_out.check_same_kind(&self.x, "conv_transpose backward")?;
        fn gpu<T: ConvElement>(
            s: &ConvTransposeBackward,
            grad_out: &Tensor,
            needs: &[bool],
        ) -> Result<Vec<Option<Tensor>>> {
            let (g, what) = (&s.geom, format!("{} backward", s.geom.describe()));
            let gb = grad_out.gpu_operand::<T>("conv_transpose backward")?;
            let x = s.x.gpu_operand::<T>("conv_transpose input")?;
            let w = s.w.gpu_operand::<T>("conv_transpose weight")?;
            params_in(s.grad_dtype, g.pairing().backward(gb, Some(x), w, needs, [s.x.shape(), s.w.shape()], &what)?)
        }
        if let Some(grads) = by_gpu_type!(grad_out, gpu(self, grad_out, needs)) {
            return grads;
        }
        let dtype = self.x.dtype();
        let dx = if needs[0] { Some(by_dtype!(dtype, grad_input_cpu(grad_out, &self.w, g))?) } else { None };
        let dw = if needs[1] {
            Some(by_dtype!(dtype, grad_weight_cpu(grad_out, &self.x, self.w.shape(), g))?)
        } else {
            None
        };
        let mut grads = vec![dx, dw];
        if self.has_bias {
            grads.push(if needs[2] {
                Some(by_dtype!(dtype, channel_sums_cpu(grad_out, g.cout, g.out_voxels()))?)
            } else {
                None
            });
        }
        Ok(grads)
    }
}
