//! PiM's grouping of a feature map into token sequences, and its inverse.
//!
//! A map x of shape (N, C, D, H, W) (2D maps: D = 1 and no depth window) is cut along every spatial axis a of size
//! S_a by a window p_a that divides it. Each index along the axis is written as
//!
//! ```text
//!   s = i * p + j,      i < S / p  (which block),   j < p  (where inside the block)
//! ```
//!
//! and the two layouts differ only in which of these digits pick the sequence and which pick the token:
//!
//! ```text
//!   Window   group g = (n, i_d, i_h, i_w)   G = N * prod(S_a / p_a)   adjacent voxels: the paper's window
//!            token l = (j_d, j_h, j_w)      L = prod(p_a)
//!   Strided  group g = (n, j_d, j_h, j_w)   G = N * prod(p_a)         voxels p apart: the public code's grouping
//!            token l = (i_d, i_h, i_w)      L = prod(S_a / p_a)
//!
//!   partition:  t[g, l, c] = x[n, c, i_d p_d + j_d, i_h p_h + j_h, i_w p_w + j_w]        t: (G, L, C)
//!   merge:      the inverse, x[n, c, ...] = t[g, l, c]
//! ```
//!
//! with every tuple in raster order (last entry fastest). Strided is exactly PyTorch's
//! `x.reshape(B, C, D/p, p, H/p, p, W/p, p).permute(0, 3, 5, 7, 1, 2, 4, 6).reshape(B p^3, C, -1).transpose(1, 2)`.
//! A Window layout whose window is the whole map gives one sequence per sample over all voxels in raster order,
//! which is PaM's sequence.
//!
//! Both directions move every element to a distinct place, so each is the other's transpose and its backward:
//!
//! ```text
//!   dL/dx = merge(dL/dt),   dL/dt = partition(dL/dx)
//! ```
//!
//! The token row r = g L + l of voxel (n, d, h, w) is a sum of per-axis terms,
//! `r = n V + R_d[d] + R_h[h] + R_w[w]` (V = D H W voxels per sample, since G/N * L = V), so one walk over the map in
//! memory order, with three small tables, serves both layouts and both directions. The walk takes one line of W
//! voxels at a time and goes through it channel by channel, so the map is touched in contiguous runs (not at the
//! channel stride V, which for common sizes is a multiple of 4 KiB and makes the C channels of one voxel collide
//! in the same cache set), while the line's W token rows stay in cache.
//!
//! On the GPU (`cuda/layout.cu`) each term is computed from two multipliers per axis,
//! `R_a[s] = (s / p_a) mi_a + (s % p_a) mj_a`, and both directions are a tiled transpose through shared memory:
//! a block moves 32 channels x 128 consecutive voxels, touching the map along voxels and the tokens along channels.
//!
//! Both run on float32 and bf16 GPU tensors alike (the output and the gradient in the input's storage type); a move
//! does no arithmetic, so it is bit-exact in either type.
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)), with E the storage size (4 bytes float32, 2
//! bf16): 2E bytes (one read, one write) and no FLOPs, in both directions.

use std::sync::Arc;

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{GpuBuffer, GpuElement};
use crate::device::params::{kernel, ConstPtr, PimParams, PIM_ROWS, PIM_SPAN, PIM_TILE};
use crate::device::Gpu;
use crate::ops::{per_axis, MapDims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{bail, by_dtype, by_gpu_type, ensure, Result};

/// How PiM groups the voxels of a map into sequences (see the module docs for the index formulas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PimLayout {
    /// Each block of p_d x p_h x p_w adjacent voxels is one sequence, scanned in raster order: the paper's "kernel".
    Window,
    /// Each sequence takes every p-th voxel along each axis, spanning the whole map: the public code's grouping.
    Strided,
}

/// The spatial axis names of the [D, H, W] positions, for messages.
const AXIS_NAMES: [&str; 3] = ["D", "H", "W"];

/// Checks that `window` (one size per spatial axis of the map of shape `map_shape`) divides every axis; `layer`
/// names the layer in errors (e.g. "PiM stage 2").
pub fn check_window(map_shape: &[usize], window: &[usize], layer: &str) -> Result<()> {
    checked_window(map_shape, window, layer).map(|_| ())
}

/// The number of sequences G and their length L that [`partition`] makes of a map of shape `map_shape`.
pub fn grouping(map_shape: &[usize], window: &[usize], layout: PimLayout) -> Result<(usize, usize)> {
    let g = Grouping::new(map_shape, window, layout, "PiM")?;
    Ok((g.groups, g.len))
}

/// Cuts the map `x` (N, C, \[D,\] H, W) into token sequences (G, L, C), channels last, with one window size per
/// spatial axis.
pub fn partition(tape: &mut Tape, x: &Tensor, window: &[usize], layout: PimLayout) -> Result<Tensor> {
    let grouping = Grouping::new(x.shape(), window, layout, "PiM")?;
    let range = profile::forward("pim_partition", &[x], 0.0);
    let t = grouping.apply(x, Direction::ToTokens)?;
    range.done([&t]);
    tape.record(&[x], &t, PimBackward { grouping, forward: Direction::ToTokens });
    Ok(t)
}

/// The sequences [`partition`] makes of a map, together with the map, for an op that takes them as an [`Operand`] (a
/// PiM layer's LayerNorm): that op keeps the map, which another node keeps anyway (the stage's output, kept by its
/// LeakyReLU), instead of the sequences, and cuts them again in its backward pass (a permutation: the same values).
/// Drop the `Partitioned` after the op: its value is then freed.
///
/// [`Operand`]: crate::ops::operand::Operand
#[derive(Debug)]
pub struct Partitioned {
    pub(crate) value: Tensor,
    pub(crate) x: Tensor,
    pub(crate) window: Vec<usize>,
    pub(crate) layout: PimLayout,
}

impl Partitioned {
    /// [`partition`], recorded on `tape` as usual.
    pub fn new(tape: &mut Tape, x: &Tensor, window: &[usize], layout: PimLayout) -> Result<Partitioned> {
        let value = partition(tape, x, window, layout)?;
        Ok(Partitioned { value, x: x.clone(), window: window.to_vec(), layout })
    }

    /// The sequences.
    pub fn value(&self) -> &Tensor {
        &self.value
    }
}

/// Puts token sequences (G, L, C) made by [`partition`] with the same window and layout back into a map of shape
/// `map_shape`.
pub fn merge(
    tape: &mut Tape,
    tokens: &Tensor,
    map_shape: &[usize],
    window: &[usize],
    layout: PimLayout,
) -> Result<Tensor> {
    let grouping = Grouping::new(map_shape, window, layout, "PiM")?;
    let range = profile::forward("pim_merge", &[tokens], 0.0);
    let x = grouping.apply(tokens, Direction::ToMap)?;
    range.done([&x]);
    tape.record(&[tokens], &x, PimBackward { grouping, forward: Direction::ToMap });
    Ok(x)
}

/// Reads the map dims from a shape and expands the window to [p_d, p_h, p_w] (p_d = 1 for 2D), checking that it
/// divides every axis.
fn checked_window(map_shape: &[usize], window: &[usize], layer: &str) -> Result<(MapDims, [usize; 3])> {
    let dims = match *map_shape {
        [n, c, h, w] => MapDims { n, c, s: [1, h, w], spatial_rank: 2 },
        [n, c, d, h, w] => MapDims { n, c, s: [d, h, w], spatial_rank: 3 },
        _ => bail!(Shape, "{layer}: expected a feature map (N, C, H, W) or (N, C, D, H, W), got shape {map_shape:?}"),
    };
    let p = per_axis(window, dims.spatial_rank, &format!("{layer}: window (map {map_shape:?})"))?;
    for a in 3 - dims.spatial_rank..3 {
        ensure!(
            dims.s[a] % p[a] == 0,
            Shape,
            "{layer}: window {} does not divide axis {} of size {} (map {map_shape:?})",
            p[a],
            AXIS_NAMES[a],
            dims.s[a]
        );
    }
    Ok((dims, p))
}

/// Which way elements move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Map (N, C, D, H, W) to tokens (G, L, C): partition.
    ToTokens,
    /// Tokens to map: merge.
    ToMap,
}

impl Direction {
    fn reversed(self) -> Direction {
        match self {
            Direction::ToTokens => Direction::ToMap,
            Direction::ToMap => Direction::ToTokens,
        }
    }
}

/// The bijection between map voxels and token rows for one map shape, window and layout.
struct Grouping {
    map_shape: Vec<usize>,
    dims: MapDims,
    /// G: sequences over the whole batch.
    groups: usize,
    /// L: tokens per sequence.
    len: usize,
    /// The window [p_d, p_h, p_w].
    window: [usize; 3],
    /// `axis_mults[a] = [mi, mj]`: index s = i p + j of spatial axis a adds `i mi + j mj` to the token row.
    axis_mults: [[usize; 2]; 3],
    /// `axis_rows[a][s]`: the term R_a[s] that index s of spatial axis a adds to the token row of a voxel.
    axis_rows: [Vec<usize>; 3],
}

impl Grouping {
    fn new(map_shape: &[usize], window: &[usize], layout: PimLayout, layer: &str) -> Result<Grouping> {
        let (dims, p) = checked_window(map_shape, window, layer)?;
        let blocks: [usize; 3] = std::array::from_fn(|a| dims.s[a] / p[a]);
        // Extents of the digits that pick the group (beyond n) and the token, per axis.
        let (group_ext, token_ext) = match layout {
            PimLayout::Window => (blocks, p),
            PimLayout::Strided => (p, blocks),
        };
        let len: usize = token_ext.iter().product();
        let raster = |e: [usize; 3]| [e[1] * e[2], e[2], 1];
        let (group_stride, token_stride) = (raster(group_ext), raster(token_ext));
        // A group digit moves the row by whole sequences (L rows each), a token digit by tokens.
        let axis_mults: [[usize; 2]; 3] = std::array::from_fn(|a| {
            let (group_mult, token_mult) = (group_stride[a] * len, token_stride[a]);
            match layout {
                PimLayout::Window => [group_mult, token_mult],
                PimLayout::Strided => [token_mult, group_mult],
            }
        });
        let axis_rows = std::array::from_fn(|a| {
            let [mi, mj] = axis_mults[a];
            (0..dims.s[a]).map(|s| s / p[a] * mi + s % p[a] * mj).collect()
        });
        Ok(Grouping {
            map_shape: map_shape.to_vec(),
            dims,
            groups: dims.n * group_ext.iter().product::<usize>(),
            len,
            window: p,
            axis_mults,
            axis_rows,
        })
    }

    fn token_shape(&self) -> [usize; 3] {
        [self.groups, self.len, self.dims.c]
    }

    /// Calls `f(map_line, row_line)` for every line of W voxels (fixed n, d, h) in map memory order: `map_line` is
    /// the flat map index of the line's first voxel in channel 0, and voxel w of the line goes to token row
    /// `row_line + R_w[w]` (row = g L + l).
    fn for_each_line(&self, mut f: impl FnMut(usize, usize)) {
        let [_, sh, sw] = self.dims.s;
        let voxels = self.dims.voxels();
        let [rd, rh, _] = &self.axis_rows;
        for n in 0..self.dims.n {
            let map_base = n * self.dims.c * voxels;
            let row_base = n * voxels;
            for (d, &row_d) in rd.iter().enumerate() {
                for (h, &row_h) in rh.iter().enumerate() {
                    f(map_base + (d * sh + h) * sw, row_base + row_d + row_h);
                }
            }
        }
    }

    /// Moves `input` (the map for `ToTokens`, the tokens for `ToMap`) to the other layout.
    fn apply(&self, input: &Tensor, dir: Direction) -> Result<Tensor> {
        match dir {
            Direction::ToTokens => input.check_shape(&self.map_shape, "PiM partition input")?,
            Direction::ToMap => {
                input.check_shape(&self.token_shape(), &format!("PiM merge tokens (for map {:?})", self.map_shape))?
            }
        }
        match by_gpu_type!(input, permute_gpu(self, input, dir)) {
            Some(out) => out,
            None => by_dtype!(input.dtype(), permute_cpu(self, input, dir)),
        }
    }
}

/// The GPU version of [`permute_cpu`], for storage type `T`: `pim_partition` or `pim_merge` of `cuda/layout.cu`.
fn permute_gpu<T: GpuElement>(grouping: &Grouping, input: &Tensor, dir: Direction) -> Result<Tensor> {
    let input = input.gpu_operand::<T>("PiM")?;
    let gpu = &input.gpu;
    let (n, c, [d, h, w]) = (grouping.dims.n, grouping.dims.c, grouping.dims.s);
    let shapes = format!("map {:?} window {:?}", grouping.map_shape, grouping.window);
    let mut out = gpu.alloc_of::<T>(input.slice.len(), "PiM output")?;
    let p = PimParams {
        src: input.ptr(),
        dst: out.ptr_mut(),
        C: c as i64,
        row: c as i64,
        size: [d, h, w].map(|v| v as i64),
        window: grouping.window.map(|v| v as i64),
        outer: grouping.axis_mults.map(|[i, _]| i as i64),
        inner: grouping.axis_mults.map(|[_, j]| j as i64),
    };
    launch(gpu, &p, n, dir, &shapes)?;
    match dir {
        Direction::ToTokens => Tensor::from_gpu(out, &grouping.token_shape()),
        Direction::ToMap => Tensor::from_gpu(out, &grouping.map_shape),
    }
}

/// Launches `pim_partition` or `pim_merge` over `batch` maps of `p`'s geometry (one block per PIM_TILE channels of
/// a token row, partition, or of the map, merge, and PIM_TILE * PIM_SPAN voxels; `what` names the maps in errors).
fn launch<T: GpuElement>(gpu: &Arc<Gpu>, p: &PimParams<T>, batch: usize, dir: Direction, what: &str) -> Result<()> {
    let voxels = p.size.iter().product::<i64>() as usize;
    let channels = match dir {
        Direction::ToTokens => p.row,
        Direction::ToMap => p.C,
    } as usize;
    let (blocks_x, blocks_y) = (batch * voxels.div_ceil(PIM_TILE * PIM_SPAN), channels.div_ceil(PIM_TILE));
    ensure!(
        blocks_x <= i32::MAX as usize && blocks_y <= u16::MAX as usize,
        Shape,
        "PiM: {what} is too large for one launch ({blocks_x} x {blocks_y} blocks)"
    );
    let cfg = LaunchConfig {
        grid_dim: (blocks_x as u32, blocks_y as u32, 1),
        block_dim: (PIM_TILE as u32, PIM_ROWS as u32, 1),
        shared_mem_bytes: 0,
    };
    match dir {
        // An empty map has nothing to move (and no voxel tiles to index blocks by).
        _ if blocks_x == 0 || blocks_y == 0 => Ok(()),
        Direction::ToTokens => gpu.launch(kernel::pim_partition::<T>(), cfg, p, what),
        Direction::ToMap => gpu.launch(kernel::pim_merge::<T>(), cfg, p, what),
    }
}

/// The channels-last copy of `batch` channels-first maps of `channels` x `voxels` at `src`: one row of `row`
/// elements per voxel, its channels and then zeros (`row >= channels`), `dst[(n voxels + v) row + c] = src[(n
/// channels + c) voxels + v]`. This is the partition with one window over the whole map (a single sequence per map,
/// the voxels in raster order); the wgmma convolutions read their sources this way (src/ops/conv.rs).
pub(crate) fn channels_last<T: GpuElement>(
    gpu: &Arc<Gpu>,
    src: ConstPtr<T>,
    batch: usize,
    channels: usize,
    row: usize,
    voxels: usize,
    what: &str,
) -> Result<GpuBuffer<T>> {
    assert!(row >= channels, "a token row holds its channels");
    let mut dst = gpu.alloc_of::<T>(batch * row * voxels, what)?;
    let v = voxels as i64;
    let p = PimParams {
        src,
        dst: dst.ptr_mut(),
        C: channels as i64,
        row: row as i64,
        size: [1, 1, v],
        window: [1, 1, v],
        outer: [0; 3],
        inner: [0, 0, 1],
    };
    launch(gpu, &p, batch, Direction::ToTokens, what)?;
    Ok(dst)
}

/// One line of W voxels at a time, channel by channel: the map side is read or written in contiguous runs of W,
/// and the line's token rows (W * C values) stay in cache while their C columns are filled.
fn permute_cpu<T: Real>(grouping: &Grouping, input: &Tensor, dir: Direction) -> Result<Tensor> {
    let src = input.cpu::<T>()?;
    let mut out = vec![T::zero(); src.len()];
    let c = grouping.dims.c;
    let voxels = grouping.dims.voxels();
    let rw = &grouping.axis_rows[2];
    grouping.for_each_line(|map_line, row_line| {
        for ch in 0..c {
            let run = map_line + ch * voxels..map_line + ch * voxels + rw.len();
            let token_col = |r: usize| (row_line + r) * c + ch;
            match dir {
                Direction::ToTokens => {
                    for (&v, &r) in src[run].iter().zip(rw) {
                        out[token_col(r)] = v;
                    }
                }
                Direction::ToMap => {
                    for (o, &r) in out[run].iter_mut().zip(rw) {
                        *o = src[token_col(r)];
                    }
                }
            }
        }
    });
    match dir {
        Direction::ToTokens => Tensor::from_vec(out, &grouping.token_shape()),
        Direction::ToMap => Tensor::from_vec(out, &grouping.map_shape),
    }
}

/// The backward of partition (`forward` = ToTokens) and of merge (`forward` = ToMap): the other direction.
struct PimBackward {
    grouping: Grouping,
    forward: Direction,
}

impl Backward for PimBackward {
    fn name(&self) -> &'static str {
        match self.forward {
            Direction::ToTokens => "pim_partition",
            Direction::ToMap => "pim_merge",
        }
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(self.grouping.apply(grad_out, self.forward.reversed())?)])
    }
}
