//! A tour of one training step, from `lkm-engine train` to a kernel launch and back.
//!
//! Read this page top to bottom with the source beside it: every stop links to the item that does the work, and the
//! item's own page (or its file's header) has the full derivation. The examples run in `cargo test --doc` on the CPU;
//! the same calls run the CUDA kernels when the tensors live on a GPU.
//!
//! # 0. The command
//!
//! `lkm-engine train` (`src/main.rs`) parses the flags, picks the device ([`Device::parse`]: `auto` takes GPU 0 when
//! one is usable and says why when it falls back to the CPU), prepares the data (stop 1), builds the network
//! ([`ModelConfig::by_name`], [`LkmUnet::new`]: the layer structure and, separately, its named parameters
//! [`Params`]) and hands everything to [`Run::train`], the loop. Each iteration of that loop samples a batch
//! (stops 1 and 2) and runs [`train_step`] (stops 3 to 7), the step this page follows; each epoch sets the learning
//! rate by [`poly_lr`], `lr = lr0 (1 - epoch / epochs)^0.9`, validates and writes a checkpoint (stop 8).
//!
//! # 1. Data
//!
//! [`prepare::dataset`] opens an nnU-Net raw folder ([`Dataset::open`] checks `dataset.json` and the file list before
//! any voxel is read), reads every case's NIfTI files ([`read_volume`]), crops each case to the box of its nonzero
//! voxels ([`crop_to_nonzero`]), resamples it to the training cases' median spacing ([`median_spacing`],
//! [`resample_case`]: trilinear image, nearest label) and normalises it
//! ([`normalize_case`]): for CT, with the 0.5 and 99.5 percentiles lo, hi and the mean and std of the foreground
//! intensities of the training set,
//!
//! ```text
//!   x -> (clamp(x, lo, hi) - mean) / std
//! ```
//!
//! and a per-image z-score for other modalities. With `--plans`, or `--data` and no `--config`, [`prepare::planned`]
//! does the same with the spacing and normalisation of a [`plan`] instead. Without `--data`, [`prepare::synthetic`] makes CT-like
//! phantoms in memory. Either way the result, a [`Prepared`], holds whole volumes ([`Case`]) in host memory.
//!
//! # 2. Patch sampling
//!
//! The network trains on patches. [`PatchSampler::batch`] draws `batch` of them, each with [`PatchSampler::sample`]:
//! a random case, a random position or (with probability 1/3) one centred on a random voxel of a random foreground
//! class present in the case ([`ForegroundIndex`]), then nnU-Net's augmentation ([`Augmenter`]: rotation, scaling and
//! mirroring as one resampling of the patch, then the intensity transforms). The trainer takes its batches from a
//! [`Loader`], whose threads draw them ahead, iteration i of epoch e from a generator seeded by (seed, e, i). The batch
//! is a pair of host tensors, images `(N, C, D, H, W)` and labels `(N, 1, D, H, W)` holding class indices as floats.
//! The labels are reduced to the resolution of every deep-supervision output on the host ([`downsample_labels`]: the
//! centre voxel of each block), and everything is copied to the device once ([`Tensor::to_device`]).
//!
//! # 3. A fresh tape
//!
//! [`train_step`] makes a [`Tape::new`] and registers every parameter on it as a leaf whose gradient is wanted
//! ([`Params::watch`]). From here on every op takes the tape as its first argument and appends a node (its backward
//! function and whatever it saved) whenever one of its inputs is tracked ([`Tape::record`]).
//!
//! # 4. The forward pass
//!
//! [`LkmUnet::forward`] first rounds its input to bf16 when the GPU runs in bf16 (`--precision`, the GPU default:
//! [`Precision`](crate::device::Precision)); from there every activation is stored as bf16, each convolution and
//! linear layer reads its float32 weight's bf16 copy ([`Weight`](crate::ops::cast::Weight): made once per step, in
//! training by the optimiser; the weight gradient returns to the float32 weight in float32), and the logits return
//! to float32 before the loss. In fp32 nothing is
//! cast. Then it runs the encoder: a stem [`ConvNormAct`], then per stage a [`ResidualStage`] of
//! [`ResidualBlock`]s followed by two residual [`BiMambaLayer`]s, PiM ([`Grouping::Pixel`]: windows of adjacent
//! pixels) and PaM ([`Grouping::Patch`]: one sequence over the average-pooled map). The decoder upsamples with
//! [`conv_transpose`] (kernel = stride), concatenates the skip ([`concat_channels`]), runs a residual stage and,
//! at every level, a 1x1 [`conv`] to class logits: one output per level, highest resolution first.
//!
//! ## 4a. A convolution block
//!
//! [`ConvNormAct::forward`] is `LeakyReLU(IN(conv(x)))`:
//!
//! ```text
//!   conv   y[n,co,o] = b[co] + sum_{ci,t} w[co,ci,t] x[n,ci, o s + t - k/2]       (zero outside the map)
//!   IN     y[n,c,i]  = gamma_c (x[n,c,i] - mu_nc) / sqrt(var_nc + eps) + beta_c   (mean, variance over the plane)
//!   LReLU  y = x if x > 0 else 0.01 x
//! ```
//!
//! ([`conv`], then IN and LReLU as one op, [`instance_norm_act`], whose backward recomputes the norm's output
//! instead of storing it). A [`ResidualBlock`] is two of these (the second without the LeakyReLU) plus a shortcut:
//! `LReLU(branch(x) + skip(x))` ([`leaky_relu`], which saves its output: its derivative depends only on the sign).
//!
//! On the GPU each pass of a conv is an implicit matrix product over (position, output channel) with the reduction
//! over (input channel, tap), and most run on `cuda/conv_halo.cu`: a block takes a box of output positions (128, say
//! 4 x 32), copies the box's source *halo* (the box grown by the kernel, 6 x 34 for 3 x 3 taps) into shared memory
//! once per chunk of 16 input channels, and then runs one tensor-core product per tap on the halo rows shifted by that
//! tap, instead of gathering every input element once per tap (9 or 27 times). The input gradient of a strided conv
//! is the same kind of product, one per *stride phase* (the input positions of one residue modulo the stride, reached
//! from whole output positions by the taps `s q + phase`); a strided forward stages its halo split by phase (even
//! source columns first, then odd), so that the rows a tap reads are again consecutive. On Hopper (sm_90) the bf16
//! stride-1 products of 3D maps (and of 2D maps from 80x80) run on `cuda/conv_wgmma.cu` instead: the halo is staged
//! as 16-byte voxels (8 channels each), so 8 consecutive output positions of a row read 128 contiguous bytes at every
//! tap, and the tensor cores read them from shared memory themselves (`wgmma`, a descriptor per operand: the tap only
//! moves its start address). The weight gradient there turns the product around: the output gradient's box is the
//! operand A, loaded into registers once per 16 positions and used by all 27 taps, and the halo, read N-major (the
//! 16 positions along k are consecutive voxels), is B. The 3x3x3 and 1x3x3 kernels are compiled for their own
//! geometry, so every offset is a constant: computed at run time, the descriptor arithmetic between two `wgmma`s
//! held up the tensor cores. Where a map is small and its channels many (the deep stages), or the kernel is 1x1x1,
//! the weight gradient is instead one plain matrix product, `cuda/gemm_wgmma.cu`: the input's *columns* (each input
//! channel shifted by each tap, one row of positions per pair, written out by `conv_im2col_bf16`) against the output
//! gradient, both operands runs of positions, as wgmma reads them; its stages hold each operand row's 64 reduction
//! indices in the 128-byte swizzled layout, so that the 8 rows the tensor cores read at once lie in different banks.
//! Most stride-1 3x3 weight gradients between maps of 64 channels and more go one step further, `cuda/conv_tma.cu`:
//! both maps are copied channels last, so that a position is one row of 64 channels (128 bytes), and Hopper's tensor
//! memory accelerator (TMA) copies a box of 64 positions into shared memory with one instruction, zeros where the
//! box leaves the map. A tap's operand is then simply the box whose corner is shifted by the tap: no halo, no
//! element loads, no gather, and the rows land in the swizzled layout the tensor cores read. Better still, the three
//! taps of a column (az, ax) share one box two rows taller: tap ay's operand starts ay box rows further on, and as a
//! box row is a multiple of 8 positions the shift is whole 1024-byte swizzle atoms, so the same descriptor form reads
//! it (a third of the copies for those taps; the boxes come from L2, and every byte less is a wait less). The copies
//! complete on an `mbarrier` in shared memory that the warpgroups wait on; a producer warp issues them a few k-blocks
//! ahead, and each warp hands a stage back through a second, "empty" mbarrier once its products are done, so no block
//! barrier stands between two k-blocks. The forward and input gradient of the deeper such convs (128 channels and more,
//! or from 128 into 64 channels in blocks of 64 rows over 256 positions) read the same boxes the other way round: the
//! source box (128 positions x 64 channels, two rows taller for the column) is the operand B, K-major by channel, and a
//! box of the weight, packed once per call as rows of output channels with a column's three taps together, is A.
//! An input gradient into 32 channels (the stage-1 entries') puts them back: the source box's positions are A, two
//! tiles of 64 per warpgroup, and the weight's 32 rows are B (`conv_dgrad_tma_bf16_n32`), since a tile of 64 output
//! channels would be half empty.
//! The strided stage entries take the same kernels with one more trick of the TMA unit: a tensor map may step by 2
//! along an axis (its element strides), so the box of a stride-2 conv's source holds exactly the positions its output
//! box reads, in the same layout, and the products do not change. Along y the taps then split by parity (ay = 0 and 2
//! are one box row apart, ay = 1 needs a box of its own), so the host describes a product as a list of tap columns,
//! each a source offset and a run of taps (`Pairing::tma_launches`); the input gradient of a strided conv is one such
//! product per stride phase (the input positions s o + rho), its taps those that reach that phase. These products
//! are persistent: one block per SM walks its share of the output boxes, and since the producer warp's k-block count
//! runs on from one box to the next, it is already copying the next box's first k-blocks while the warpgroups write
//! the last box's sums (a block per box waited on an empty pipeline at its start and on no copies at its end).
//! The deep 2D stages' forward and input gradient (512 channels and more on at most 20x20 positions) take the same
//! product the other way round, over the source map written out as one row per position (`conv_im2row_bf16`). Which
//! kernel takes which pass is decided from measured shapes (`halo_suits`, `wgmma_suits`, `gemm_wgrad_suits`,
//! `explicit_suits` in [`conv`]'s module); the exact float32
//! kernels of `cuda/conv.cu` remain for the parity checks (`--math exact`).
//!
//! ## 4b. A PiM layer
//!
//! [`BiMambaLayer::forward`] computes `x + merge(out_proj(fwd(t) + flip(bwd(flip(t)))))` with `t = LN(partition(x))`:
//!
//! 1. The grouping, [`partition`]: the map `(N, C, D, H, W)` becomes `G` token sequences of `L` tokens with the `C`
//!    channels last, `t[g, l, c] = x[n, c, i p + j]` per axis, where the window `p` splits a coordinate into a block
//!    `i` and an offset `j`; with [`PimLayout::Window`] the block picks the sequence and the offset the token (a
//!    sequence is one window of adjacent pixels), with [`PimLayout::Strided`] the other way round. [`merge`] is the
//!    inverse. Both are pure permutations, so each is the other's backward.
//! 2. [`layer_norm`] over the channels of each token.
//! 3. The bidirectional Mamba: one [`Mamba`] block on the tokens and one on the reversed tokens, the second's output
//!    reversed back and [`add`]ed to the first's; the reversal is no copy ([`flip_seq`] of the tokens would be): the
//!    second block's conv1d and scan walk each sequence from its last token ([`Order::Reversed`]), and its
//!    projections are per token. [`Mamba::forward`] is
//!    `[x, z] = in_proj(u)` (two [`linear`]s, one per half of the weight's rows, cut by [`narrow`]),
//!    `x = SiLU(causal_conv1d(x))` (one op, [`causal_conv1d_silu`], whose backward recomputes the conv's output from
//!    x instead of keeping it), `[dt, B, C] = x_proj(x)` (dt cut out by [`narrow`]; the scan reads B and C where
//!    they lie in the output), `delta = dt_proj.weight dt` (the projection's bias is the scan's `delta_bias`), then
//!    the selective scan.
//! 4. `out_proj` ([`linear`]), [`merge`] back to the map, and the residual [`add`].
//!
//! ## 4c. The selective scan
//!
//! [`selective_scan`] is one fused op. For every sequence and channel, with a state `h` of N numbers per channel and
//! `A = -exp(A_log)`:
//!
//! ```text
//!   dt_t = softplus(delta_t + delta_bias)
//!   h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t                 (h_{-1} = 0; elementwise over the N states)
//!   y_t  = (sum_n C_t[n] h_t[n] + D u_t) SiLU(z_t)
//! ```
//!
//! Its backward runs the adjoint of the state backwards in time, `dh_t = C_t q_t + exp(dt_{t+1} A) dh_{t+1}` with
//! `q_t = dL/dy_t SiLU(z_t)`, recomputing the states rather than storing them (the derivation is in
//! [`ops::selective_scan`](crate::ops::selective_scan)). The example below runs the op on three tokens and checks it
//! against the recurrence written out.
//!
//! ```
//! use lkm_engine::autograd::Tape;
//! use lkm_engine::ops::flip::Order;
//! use lkm_engine::ops::operand::Operand;
//! use lkm_engine::ops::selective_scan::{selective_scan, ScanInputs};
//! use lkm_engine::Tensor;
//!
//! # fn main() -> lkm_engine::Result<()> {
//! // One sequence (G = 1) of L = 3 tokens, one channel (Dch = 1), N = 2 states; float64 on the CPU.
//! let (u, delta, z) = ([1.0, -0.5, 2.0], [0.3, -1.0, 0.8], [0.5, 1.5, -0.2]);
//! let (a_log, b, c) = ([0.0, 0.7], [[0.4, -0.3], [1.0, 0.2], [-0.6, 0.9]], [[0.5, 0.1], [-0.2, 0.8], [0.3, 0.3]]);
//! let (d_skip, delta_bias) = (0.25, 0.1);
//! let t = |v: &[f64], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape);
//! let y = selective_scan(
//!     &mut Tape::no_grad(),
//!     &ScanInputs {
//!         u: &t(&u, &[1, 3, 1])?,
//!         delta: Operand::Tensor(&t(&delta, &[1, 3, 1])?),
//!         a_log: &t(&a_log, &[1, 2])?,
//!         b: (&t(b.as_flattened(), &[1, 3, 2])?).into(),
//!         c: (&t(c.as_flattened(), &[1, 3, 2])?).into(),
//!         d_skip: &t(&[d_skip], &[1])?,
//!         z: Operand::Tensor(&t(&z, &[1, 3, 1])?),
//!         delta_bias: &t(&[delta_bias], &[1])?,
//!         order: Order::Stored,
//!     },
//! )?
//! .to_vec_f64()?;
//!
//! // The recurrence, token by token.
//! let softplus = |x: f64| x.exp().ln_1p();
//! let silu = |x: f64| x / (1.0 + (-x).exp());
//! let mut h = [0.0; 2];
//! for step in 0..3 {
//!     let dt = softplus(delta[step] + delta_bias);
//!     let mut s = d_skip * u[step];
//!     for n in 0..2 {
//!         let a = -f64::exp(a_log[n]);
//!         h[n] = (dt * a).exp() * h[n] + dt * b[step][n] * u[step];
//!         s += c[step][n] * h[n];
//!     }
//!     assert!((y[step] - s * silu(z[step])).abs() < 1e-12, "token {step}: {} vs {}", y[step], s * silu(z[step]));
//! }
//! # Ok(())
//! # }
//! ```
//!
//! On the GPU (`cuda/scan.cu`) the forward keeps only the state at the start of every chunk of 64 tokens. The backward
//! re-runs each chunk forward from that state to keep the state at every 8th token in shared memory, then sweeps the
//! chunk's 8-token pieces from the last, each piece's states recomputed into registers and its adjoint carried
//! backwards; at N = 16 four lanes share a channel, four states each, so sums over the states take two shuffles. What
//! every lane reads (dt, u, B, C, ...) is staged in shared memory one piece ahead: the loads of the next piece are
//! issued before the current one is computed and kept as stored (bf16) until after the barrier, because an instruction
//! that converts a loaded value waits for the load right there (before that change, those waits were 13% of the
//! backward's stall samples in Nsight Compute's source view).
//!
//! ## 4d. Down to a kernel and back
//!
//! Every op is one file of [`ops`](crate::ops) and looks the same inside; take [`leaky_relu`]. It opens a profiling
//! range ([`profile::forward`]: a no-op unless a profiler listens), then checks where its input lives: for a CPU
//! tensor it runs the readable reference (a loop over the elements, in the tensor's dtype); for a GPU tensor
//! ([`Tensor::gpu_buffer`]) it allocates the output from the stream-ordered pool ([`Gpu::alloc`]) and launches
//! `leaky_relu_forward` of `cuda/elementwise.cu` with [`Gpu::launch`], passing the one parameter struct the kernel
//! declares in `cuda/elementwise.cuh` (its Rust twin generated by `build.rs`: [`device::params`](crate::device::params)):
//! [`Gpu::function`] finds the kernel by name among those `build.rs` compiled with nvcc and embedded in the binary,
//! cudarc queues it on the GPU's one stream, and [`check_launch`] turns a failure into an error naming the kernel and
//! the shapes.
//! The kernel itself is a memory-bound loop: each thread takes 16 bytes of the tensor (8 bf16 or 4 float32 elements:
//! one 128-bit load, the function on each element in float32, one 128-bit store; `load_span` / `store_span` of
//! `cuda/common.cuh`), so that per element only the conversion and the arithmetic remain; the tail and unaligned
//! buffers go element by element.
//! Nothing waits for the kernel: the op wraps the buffer in a tensor ([`Tensor::from_gpu`]) and returns, and the
//! next op's kernel queues behind it. Last, the op records its backward on the tape, keeping what `dx = g f'(x)`
//! needs (for LeakyReLU its output, whose sign is the input's and which the next convolution keeps anyway), which on
//! the way back launches `leaky_relu_backward`.
//!
//! # 5. The loss
//!
//! [`deep_supervision_loss`] adds soft Dice and cross-entropy on every output against the labels at its resolution,
//! output `i` weighted by `2^-i`, the lowest resolution by 0, the weights normalised to sum 1
//! ([`deep_supervision_weights`]):
//!
//! ```text
//!   L   = sum_i w_i (CE(out_i, y_i) + Dice(out_i, y_i))
//!   CE  = (1/V) sum_v [ ln sum_k e^(x_kv) - x_(y_v) v ]                   (cross_entropy: mean over voxels)
//!   Dice = -(1/M) sum_(k>=1) (2 sum_v p_kv [y_v = k] + s) / (sum_v p_kv + sum_v [y_v = k] + s)   (p = softmax)
//! ```
//!
//! ([`cross_entropy`], [`soft_dice_loss`]; with batch Dice the sums run over the whole batch, M = K - 1.) On the GPU
//! the loss stays on the device; the step reads it back once ([`Tensor::scalar`]) to stop on a NaN.
//!
//! # 6. The backward pass
//!
//! [`Tape::backward`] seeds `dL/dL = 1` and walks the nodes from the last to the first. Each node's
//! [`Backward::backward`] receives the gradient of its output and returns those of its inputs, which are added to
//! whatever other nodes already sent them:
//!
//! ```text
//!   dL/d(input_i) += backward_i(dL/d(output))        for nodes from last to first
//! ```
//!
//! A node is dropped as soon as it has run, so the activations it saved are freed during the pass. What is left are
//! the gradients of the watched leaves, the parameters ([`Gradients::take`]).
//!
//! # 7. Clipping and SGD
//!
//! [`clip_present_grad_norm`] scales all gradients together when their global norm exceeds 12, and [`Sgd`] applies
//! nnU-Net's update in place ([`Sgd::step_partial`] skips the parameters no gradient reached, as PyTorch does):
//!
//! ```text
//!   norm = sqrt(sum of g^2 over every gradient element)      g <- g min(1, 12 / (norm + 1e-6))
//!   g <- g + wd p      b <- mu b + g      p <- p - lr (g + mu b)          (Nesterov, mu = 0.99, wd = 3e-5)
//! ```
//!
//! On the GPU the norm's partial sums are copied back to the host, where the decision to scale is made (with the
//! loss, the only values a step reads back), and the update is one elementwise kernel per parameter
//! (`cuda/optim.cu`).
//!
//! # 8. And back
//!
//! The loop adds the loss to the epoch's mean, and after the last iteration of an epoch it validates by
//! sliding-window prediction of whole volumes ([`predict_labels`]) scored by [`dice_per_class`], appends a line to
//! `metrics.jsonl` and writes `latest.safetensors` atomically ([`checkpoint::save`]).
//!
//! # The whole step, spelled out
//!
//! One iteration of [`Run::train`] written out with the items above (what [`train_step`] does, less its profiling
//! phases): the tiny 3D model on two synthetic phantoms. The loss on the same batch must be lower after the step,
//! and [`train_step`] from the same parameters must give the same bits, so this page cannot drift from the engine.
//!
//! ```
//! use lkm_engine::autograd::Tape;
//! use lkm_engine::data::normalize::{normalize_case, Normalization};
//! use lkm_engine::data::sampler::{ForegroundIndex, PatchSampler};
//! use lkm_engine::data::synth::{phantom_dataset, SynthConfig};
//! use lkm_engine::nn::{LkmUnet, ModelConfig};
//! use lkm_engine::optim::{clip_present_grad_norm, Sgd, DEFAULT_GRAD_CLIP};
//! use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
//! use lkm_engine::train::step::train_step;
//! use lkm_engine::Tensor;
//! use rand::rngs::StdRng;
//! use rand::SeedableRng;
//!
//! # fn main() -> lkm_engine::Result<()> {
//! // The tiny model on 16^3 patches (its PiM windows and PaM factors divide every stage's map).
//! let mut config = ModelConfig::tiny_3d();
//! config.patch = vec![16, 16, 16];
//! let (model, mut params) = LkmUnet::new(config, 1)?;
//! let initial = params.deep_copy()?;
//!
//! // Stops 1 and 2: two z-scored phantoms, a batch of two patches, labels at every output's resolution.
//! let mut cases = phantom_dataset(&SynthConfig { cases: 2, shape: [20, 20, 20], seed: 1 });
//! for case in &mut cases {
//!     normalize_case(case, &Normalization::ZScore)?;
//! }
//! let fg: Vec<ForegroundIndex> = cases.iter().map(|c| ForegroundIndex::new(c, 4)).collect();
//! let sampler = PatchSampler { patch: vec![16, 16, 16], fg_fraction: 1.0 / 3.0, augment: true, mirror: true };
//! let (x, labels) = sampler.batch(&cases, &fg, 2, &mut StdRng::seed_from_u64(2))?;
//! let targets = model
//!     .config
//!     .output_sizes(&model.config.patch)
//!     .iter()
//!     .map(|size| downsample_labels(&labels, size))
//!     .collect::<lkm_engine::Result<Vec<Tensor>>>()?;
//!
//! // Stops 3 to 6: tape, forward, loss, backward.
//! let mut tape = Tape::new();
//! params.watch(&mut tape);
//! let outputs = model.forward(&mut tape, &params, &x)?;
//! let loss = deep_supervision_loss(&mut tape, &outputs, &targets, true)?;
//! let before = loss.scalar()?;
//! let mut grads = tape.backward(&loss)?;
//!
//! // Stop 7: clip and step. The deepest output's head gets no gradient (loss weight 0), hence Option.
//! let mut g: Vec<Option<Tensor>> = params.tensors().iter().map(|p| grads.take(p)).collect();
//! assert!(g.iter().any(Option::is_none) && g.iter().any(Option::is_some));
//! clip_present_grad_norm(&mut g, DEFAULT_GRAD_CLIP)?;
//! Sgd::default().step_partial(params.tensors_mut(), &g)?;
//!
//! // The same batch, forward only, with the updated parameters.
//! let outputs = model.forward(&mut Tape::no_grad(), &params, &x)?;
//! let after = deep_supervision_loss(&mut Tape::no_grad(), &outputs, &targets, true)?.scalar()?;
//! assert!(after < before, "loss {before} before the step, {after} after");
//!
//! // The engine's own step from the same start agrees to the bit.
//! let mut engine_params = initial;
//! let loss = train_step(&model, &mut engine_params, &mut Sgd::default(), &x, &targets, true, DEFAULT_GRAD_CLIP)?;
//! assert_eq!(loss, before);
//! for (ours, engine) in params.tensors().iter().zip(engine_params.tensors()) {
//!     assert_eq!(ours.to_vec_f32()?, engine.to_vec_f32()?);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Where each op lives
//!
//! Every op has its formula and its cost per element (bytes and FLOPs, the counting rules in [`ops`](crate::ops)) in
//! the header of its file, a CPU reference beside the launch of its kernels, a gradient check against finite
//! differences in float64, a GPU test against the CPU reference, and (the ops that carry the step's time) a row in
//! the kernel benchmark `benches/kernels.rs`, whose table sets each row's bytes and FLOPs per second against the
//! machine's ceilings. A dash is a gap. `tests/tour.rs` checks that every file, function, kernel and benchmark row
//! named here exists and that every op module has a row. A kernel that reads or writes activations is one template
//! instantiated for both storage types, `NAME_f32` and `NAME_bf16` (bf16 in memory, float32 arithmetic inside; see
//! [`device::Precision`](crate::device::Precision)); the table names the float32 instance.
//!
//! | op (formula, cost) | CPU reference | CUDA kernels | gradient check | GPU test | benchmark row |
//! |---|---|---|---|---|---|
//! | [`activation`](crate::ops::activation) | `src/ops/activation.rs` `value` `derivative` | `cuda/elementwise.cu` `leaky_relu_forward_f32` `leaky_relu_backward_f32` `silu_forward_f32` `silu_backward_f32` `softplus_forward_f32` `softplus_backward_f32` | `tests/grad_activation.rs` `grad_leaky_relu` `grad_silu` `grad_softplus` | `tests/gpu_ops.rs` `gpu_activations` | `leaky_relu` |
//! | [`add_f32`](crate::ops::add) | `src/tensor/arith.rs` `add` | `cuda/elementwise.cu` `add_f32` | `tests/grad_activation.rs` `grad_add` | `tests/gpu_ops.rs` `gpu_add` | - |
//! | [`argmax`](crate::ops::argmax) | `src/ops/argmax.rs` `argmax_cpu` | `cuda/loss.cu` `argmax_classes` | - (not differentiable) `tests/grad_loss.rs` `argmax_3d_matches_naive` | `tests/gpu_loss.rs` `gpu_argmax_matches_cpu_exactly` | - |
//! | [`avg_pool`](crate::ops::avg_pool) | `src/ops/avg_pool.rs` `forward_cpu` `backward_cpu` | `cuda/pool.cu` `avg_pool_forward_f32` `avg_pool_backward_f32` | `tests/grad_norm_pool.rs` `grad_avg_pool_3d_ragged` | `tests/gpu_norm_pool.rs` `gpu_avg_pool_3d` | - |
//! | [`cast`](crate::ops::cast) | `src/tensor/cast.rs` `to_bf16` `to_f32` (the host's rounding: half::bf16::from_f32) | `cuda/cast.cu` `cast_f32_to_bf16` `cast_bf16_to_f32` | - (rounding; the gradient passes through) `tests/dtype.rs` `cast_op_gradient_returns_in_the_input_type` | `tests/gpu_cast.rs` `gpu_bf16_rounding_matches_the_host_bit_for_bit` | - |
//! | [`causal_conv1d`](crate::ops::causal_conv1d) | `src/ops/causal_conv1d.rs` `forward_cpu` `backward_cpu` | `cuda/conv1d.cu` `causal_conv1d_forward_f32` `causal_conv1d_backward_f32` `causal_conv1d_forward_scalar_f32` `causal_conv1d_backward_scalar_f32` | `tests/grad_mamba_ops.rs` `grad_causal_conv1d` `grad_causal_conv1d_silu` | `tests/gpu_mamba_ops.rs` `gpu_causal_conv1d` | `causal_conv1d depthwise` |
//! | [`concat`](crate::ops::concat) | `src/ops/concat.rs` `forward_cpu` `split_cpu` | `cuda/layout.cu` `copy_rows_f32` | `tests/grad_layout.rs` `grad_concat_two` | `tests/gpu_layout.rs` `gpu_concat_channels` | - |
//! | [`conv`](crate::ops::conv) | `src/ops/conv.rs` `forward_cpu` `grad_input_cpu` `grad_weight_cpu` | `cuda/conv.cu` `conv_fprop_f32` `conv_dgrad_f32` `conv_wgrad_f32` `sum_slices` `channel_sums_f32`, `cuda/conv_tc.cu` `conv_fprop_tf32` `conv_dgrad_tf32` `conv_wgrad_tf32` `conv_fprop_bf16` `conv_dgrad_bf16` `conv_wgrad_bf16`, `cuda/conv_halo.cu` `conv_fprop_pack_tf32` `conv_fprop_halo_tf32` `conv_dgrad_halo_tf32` `conv_fprop_halo_bf16` `conv_dgrad_halo_bf16` `conv_fprop_halo_bf16_m256` `conv_fprop_halo_bf16_s64` `conv_wgrad_halo_tf32` `conv_wgrad_halo_bf16`, `cuda/conv_wgmma.cu` `conv_fprop_wgmma_bf16` `conv_dgrad_wgmma_bf16` `conv_fprop_wgmma_bf16_k333_z4` `conv_wgrad_wgmma_bf16_k333_z4`, `cuda/gemm_wgmma.cu` `conv_wgrad_gemm_wgmma_bf16` `conv_fprop_gemm_wgmma_bf16` `conv_dgrad_gemm_wgmma_bf16`, `cuda/conv_tma.cu` `conv_wgrad_tma_bf16_k333_m128` `conv_wgrad_tma_sum` `conv_fprop_tma_bf16` `conv_dgrad_tma_bf16` `conv_tma_pack_bf16`, `cuda/conv.cu` `conv_im2col_bf16` `conv_im2row_bf16` `conv_weight_flip_bf16` `conv_rows_store_bf16`, `cuda/gemm.cu` `conv_fprop_pointwise_bf16_n32` `conv_dgrad_pointwise_bf16_n64` | `tests/grad_conv.rs` `grad_conv3d_k3` `grad_conv3d_stride2` | `tests/gpu_conv.rs` `gpu_conv3d_k333` `gpu_conv_halo_tiles` `gpu_conv_wgrad_wgmma` `gpu_conv_tma` `gpu_conv_wgrad_gemm` `gpu_conv_explicit_products` `gpu_conv_pointwise` | `conv3d 3x3x3 fp32` `conv3d 1x3x3 fp32` `conv3d 3x3x3 tf32` `conv3d 1x3x3 tf32` `conv3d 3x3x3 bf16` `conv3d 1x3x3 bf16` |
//! | [`conv_transpose`](crate::ops::conv_transpose) | `src/ops/conv_transpose.rs` `forward_cpu` `grad_input_cpu` `grad_weight_cpu` | `cuda/conv.cu` `conv_transpose_fprop_f32` `conv_transpose_dgrad_f32` `conv_transpose_wgrad_f32` `sum_slices` `channel_sums_bf16`, `cuda/conv_tc.cu` `conv_transpose_fprop_tf32` `conv_transpose_dgrad_tf32` `conv_transpose_wgrad_tf32` `conv_transpose_fprop_bf16`, `cuda/gemm.cu` `conv_transpose_fprop_pointwise_bf16_n128`, `cuda/layout.cu` `depth_to_space_f32` | `tests/grad_conv.rs` `grad_conv_transpose3d` | `tests/gpu_conv.rs` `gpu_conv_transpose3d` `gpu_conv_pointwise` | - |
//! | [`cross_entropy`](crate::ops::cross_entropy) | `src/ops/cross_entropy.rs` `forward_cpu` `backward_cpu` | `cuda/loss.cu` `cross_entropy_partial` `loss_sum_partials` `cross_entropy_backward` | `tests/grad_loss.rs` `grad_cross_entropy_3d_k4` | `tests/gpu_loss.rs` `gpu_losses_3d_k14` | `cross_entropy` |
//! | [`dice`](crate::ops::dice) | `src/ops/dice.rs` `group_sums_cpu` `backward_cpu` | `cuda/loss.cu` `dice_partial_sums` `dice_finish` `dice_backward` | `tests/grad_loss.rs` `grad_soft_dice_batch_3d_k3` | `tests/gpu_loss.rs` `gpu_losses_3d_k14` | `soft_dice` |
//! | [`flip`](crate::ops::flip) | `src/ops/flip.rs` `flip_cpu` | `cuda/layout.cu` `flip_seq_f32` | `tests/grad_layout.rs` `grad_flip_seq` | `tests/gpu_layout.rs` `gpu_flip_seq` | - |
//! | [`instance_norm`](crate::ops::instance_norm) | `src/ops/instance_norm.rs` `moments_cpu` `apply_cpu` `backward_cpu` | `cuda/norm.cu` `instance_norm_chunk_moments_f32` `instance_norm_combine` `instance_norm_apply_f32` `instance_norm_chunk_grad_sums_f32` `instance_norm_backward_dx_f32` `instance_norm_param_grads` `instance_norm_sum_chunks` | `tests/grad_norm_pool.rs` `grad_instance_norm_3d` `grad_instance_norm_leaky_relu` `instance_norm_add_act_equals_the_three_ops` | `tests/gpu_norm_pool.rs` `gpu_instance_norm_3d` `gpu_instance_norm_leaky_relu` `gpu_instance_norm_add_act` | `instance_norm` |
//! | [`layer_norm`](crate::ops::layer_norm) | `src/ops/layer_norm.rs` `forward_cpu` `backward_cpu` | `cuda/norm.cu` `layer_norm_forward_f32` `layer_norm_forward_wide_f32` `layer_norm_backward_f32` `layer_norm_backward_wide_f32` `layer_norm_sum_partials` | `tests/grad_norm_pool.rs` `grad_layer_norm` | `tests/gpu_norm_pool.rs` `gpu_layer_norm_channels` | `layer_norm` |
//! | [`linear`](crate::ops::linear) | `src/ops/linear.rs` `forward_cpu` `backward_cpu` | `cuda/gemm.cu` `linear_fprop_tf32` `linear_dgrad_tf32` `linear_wgrad_tf32` `linear_fprop_bf16` `linear_dgrad_bf16` `linear_wgrad_bf16` `linear_fprop_f32` `linear_dgrad_f32` `linear_wgrad_f32` `linear_fprop_stream_bf16_n128` `linear_dgrad_stream_bf16_n32` `linear_wgrad_stream_bf16_m128_n32` `linear_backward_stream_bf16_k32_m128` `sum_rows_f32`, `cuda/gemm_wgmma.cu` `linear_fprop_wgmma_bf16` `linear_dgrad_wgmma_bf16` `linear_wgrad_wgmma_bf16` | `tests/grad_mamba_ops.rs` `grad_linear_bias` | `tests/gpu_mamba_ops.rs` `gpu_linear_bias` `gpu_linear_bf16` `gpu_linear_stream` `gpu_linear_backward_fused_twice` `gpu_linear_wgmma` | `linear in_proj tf32` `linear in_proj bf16` `linear x_proj bf16` |
//! | [`narrow`](crate::ops::narrow) | `src/ops/narrow.rs` `narrow_cpu` `widen_cpu` `add_slice_cpu` | `cuda/layout.cu` `copy_rows_f32` `narrow_backward_f32` `narrow_add_backward_f32` | `tests/grad_layout.rs` `grad_narrow_each_axis` `grad_narrow_overlapping_slices_add_into_one_gradient` | `tests/gpu_layout.rs` `gpu_narrow` | - |
//! | [`operand`](crate::ops::operand) (not an op: an input rebuilt in the backward pass) | `src/ops/operand.rs` `get` | - (the rebuilt value's own: `cuda/gemm.cu` `linear_fprop_tf32`, `cuda/norm.cu` `instance_norm_apply_f32`, `cuda/layout.cu` `pim_partition_f32`) | `tests/grad_norm_pool.rs` `conv_of_a_normalized_map_rebuilds_it` `layer_norm_of_partitioned_sequences_rebuilds_them`, `tests/grad_mamba_ops.rs` `causal_conv1d_silu_of_a_product_rebuilds_it` | `tests/gpu_norm_pool.rs` `gpu_conv_of_a_normalized_map` `gpu_layer_norm_of_partitioned_sequences` | - |
//! | [`pim`](crate::ops::pim) | `src/ops/pim.rs` `permute_cpu` | `cuda/layout.cu` `pim_partition_f32` `pim_merge_f32` | `tests/grad_layout.rs` `grad_pim_window_3d` `grad_pim_strided_3d` | `tests/gpu_layout.rs` `gpu_pim_3d_odd` | `pim partition strided` |
//! | [`reshape`](crate::ops::reshape) | `src/ops/reshape.rs` `reshape` (no copy) | - (no kernel) | `tests/grad_layout.rs` `grad_reshape` | `tests/gpu_layout.rs` `gpu_reshape` | - |
//! | [`scale_f32`](crate::ops::scale) | `src/tensor/arith.rs` `scale` | `cuda/elementwise.cu` `scale_f32` | `tests/grad_activation.rs` `grad_scale` | - (in `tests/gpu_train_step.rs` `gpu_training_step_matches_cpu`) | - |
//! | [`selective_scan`](crate::ops::selective_scan) | `src/ops/selective_scan.rs` `forward_cpu` `backward_cpu` | `cuda/scan.cu` `scan_forward_n16_f32` `scan_chunk_combine` `scan_backward_carry_f32` `scan_backward_n16_f32` | `tests/grad_mamba_ops.rs` `grad_selective_scan` `grad_selective_scan_long` | `tests/gpu_mamba_ops.rs` `gpu_selective_scan_pim_stage0` `gpu_selective_scan_pam_stage0` | `selective_scan PiM stage 0` `selective_scan PaM stage 0` |
//! | [`upsample`](crate::ops::upsample) | `src/ops/upsample.rs` `forward_cpu` `backward_cpu` | `cuda/pool.cu` `upsample_nearest_forward_f32` `upsample_nearest_backward_f32` | `tests/grad_norm_pool.rs` `grad_upsample_3d` | `tests/gpu_norm_pool.rs` `gpu_upsample_3d` | - |
//! | [`optim`](crate::optim) (SGD, clipping) | `src/optim.rs` `update_cpu` `sum_squares_cpu` | `cuda/optim.cu` `sgd_nesterov_step` `optim_sum_squares_partial` `optim_clip_status` `optim_scale_in_place` | `tests/optim.rs` `sgd_nesterov_three_steps_by_hand` (by hand) `a_non_finite_step_changes_nothing` | `tests/gpu_loss.rs` `gpu_sgd_three_steps_match_cpu` `gpu_clip_grad_norm_matches_cpu` | - |
//!
//! Beyond single ops: `tests/grad_composed.rs` checks the gradient of a conv, norm, PiM and PaM stack as a whole,
//! `tests/gpu_train_step.rs` a whole training step on the GPU against float64 on the CPU, and
//! `tests/gpu_model_probe.rs` the tiny model node by node ([`Tape::trace`]).
//!
//! [`Device::parse`]: crate::device::Device::parse
//! [`ModelConfig::by_name`]: crate::nn::ModelConfig::by_name
//! [`LkmUnet::new`]: crate::nn::LkmUnet::new
//! [`LkmUnet::forward`]: crate::nn::LkmUnet::forward
//! [`Params`]: crate::nn::Params
//! [`Params::watch`]: crate::nn::Params::watch
//! [`Run::train`]: crate::train::trainer::Run::train
//! [`train_step`]: crate::train::step::train_step
//! [`profile::forward`]: crate::profile::forward
//! [`poly_lr`]: crate::optim::poly_lr
//! [`prepare::dataset`]: crate::train::prepare::dataset
//! [`prepare::synthetic`]: crate::train::prepare::synthetic
//! [`prepare::planned`]: crate::train::prepare::planned
//! [`plan`]: crate::plan
//! [`crop_to_nonzero`]: crate::data::crop::crop_to_nonzero
//! [`Prepared`]: crate::train::prepare::Prepared
//! [`Dataset::open`]: crate::data::dataset::Dataset::open
//! [`read_volume`]: crate::data::nifti::read_volume
//! [`median_spacing`]: crate::data::resample::median_spacing
//! [`resample_case`]: crate::data::resample::resample_case
//! [`normalize_case`]: crate::data::normalize::normalize_case
//! [`Case`]: crate::data::Case
//! [`PatchSampler::batch`]: crate::data::sampler::PatchSampler::batch
//! [`PatchSampler::sample`]: crate::data::sampler::PatchSampler::sample
//! [`ForegroundIndex`]: crate::data::sampler::ForegroundIndex
//! [`Augmenter`]: crate::data::augment::Augmenter
//! [`Loader`]: crate::train::loader::Loader
//! [`downsample_labels`]: crate::train::loss::downsample_labels
//! [`Tensor::to_device`]: crate::Tensor::to_device
//! [`Tensor::gpu_buffer`]: crate::Tensor::gpu_buffer
//! [`Tensor::from_gpu`]: crate::Tensor::from_gpu
//! [`Tensor::scalar`]: crate::Tensor::scalar
//! [`Tape::new`]: crate::autograd::Tape::new
//! [`Tape::record`]: crate::autograd::Tape::record
//! [`Tape::backward`]: crate::autograd::Tape::backward
//! [`Tape::trace`]: crate::autograd::Tape::trace
//! [`Backward::backward`]: crate::autograd::Backward::backward
//! [`Gradients::take`]: crate::autograd::Gradients::take
//! [`ConvNormAct`]: crate::nn::blocks::ConvNormAct
//! [`ConvNormAct::forward`]: crate::nn::blocks::ConvNormAct::forward
//! [`ResidualStage`]: crate::nn::blocks::ResidualStage
//! [`ResidualBlock`]: crate::nn::blocks::ResidualBlock
//! [`BiMambaLayer`]: crate::nn::mamba::BiMambaLayer
//! [`BiMambaLayer::forward`]: crate::nn::mamba::BiMambaLayer::forward
//! [`Grouping::Pixel`]: crate::nn::mamba::Grouping::Pixel
//! [`Grouping::Patch`]: crate::nn::mamba::Grouping::Patch
//! [`Mamba`]: crate::nn::mamba::Mamba
//! [`Mamba::forward`]: crate::nn::mamba::Mamba::forward
//! [`conv`]: crate::ops::conv::conv
//! [`conv_transpose`]: crate::ops::conv_transpose::conv_transpose
//! [`concat_channels`]: crate::ops::concat::concat_channels
//! [`instance_norm`]: crate::ops::instance_norm::instance_norm
//! [`instance_norm_act`]: crate::ops::instance_norm::instance_norm_act
//! [`leaky_relu`]: crate::ops::activation::leaky_relu
//! [`partition`]: crate::ops::pim::partition
//! [`merge`]: crate::ops::pim::merge
//! [`PimLayout::Window`]: crate::ops::pim::PimLayout::Window
//! [`PimLayout::Strided`]: crate::ops::pim::PimLayout::Strided
//! [`layer_norm`]: crate::ops::layer_norm::layer_norm
//! [`flip_seq`]: crate::ops::flip::flip_seq
//! [`Order::Reversed`]: crate::ops::flip::Order::Reversed
//! [`add`]: crate::ops::add::add
//! [`linear`]: crate::ops::linear::linear
//! [`narrow`]: crate::ops::narrow::narrow
//! [`causal_conv1d_silu`]: crate::ops::causal_conv1d::causal_conv1d_silu
//! [`selective_scan`]: crate::ops::selective_scan::selective_scan
//! [`Gpu::alloc`]: crate::device::cuda::Gpu::alloc
//! [`Gpu::function`]: crate::device::cuda::Gpu::function
//! [`Gpu::launch`]: crate::device::cuda::Gpu::launch
//! [`check_launch`]: crate::device::cuda::check_launch
//! [`deep_supervision_loss`]: crate::train::loss::deep_supervision_loss
//! [`deep_supervision_weights`]: crate::train::loss::deep_supervision_weights
//! [`cross_entropy`]: crate::ops::cross_entropy::cross_entropy
//! [`soft_dice_loss`]: crate::ops::dice::soft_dice_loss
//! [`clip_present_grad_norm`]: crate::optim::clip_present_grad_norm
//! [`Sgd`]: crate::optim::Sgd
//! [`Sgd::step_partial`]: crate::optim::Sgd::step_partial
//! [`predict_labels`]: crate::infer::predict_labels
//! [`dice_per_class`]: crate::metrics::dice_per_class
//! [`checkpoint::save`]: crate::train::checkpoint::save
