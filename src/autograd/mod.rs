//! Reverse-mode automatic differentiation with an explicit tape.
//!
//! A training step owns one [`Tape`]. Parameters are registered with [`Tape::watch`]; every op whose inputs include
//! a watched tensor (or the output of a recorded op) appends a node holding its backward function and whatever it
//! saved from the forward pass. [`Tape::backward`] walks the nodes in reverse, hands each node the gradient of its
//! output, and accumulates the gradients of its inputs:
//!
//! ```text
//!   dL/d(input_i) += backward_i(dL/d(output))      for nodes from last to first
//! ```
//!
//! Nodes are dropped as soon as they have run, so saved activations are released during the backward pass, and the
//! tape is empty afterwards. A tape made with [`Tape::no_grad`] records nothing (inference). A tape with
//! [`Tape::trace`] on keeps every node's output and incoming gradient ([`Gradients::trace`]), so that two runs of one
//! graph (the GPU and the CPU, float32 and float64) can be compared op by op.
//!
//! What the backward pass keeps (the saved-tensor policy; each op's file gives its reasons). A tensor stays alive while
//! some node holds it, so an op's output costs nothing extra when the next op saves it as its input anyway; what is
//! cheap to rebuild from a kept tensor is rebuilt instead. `lkm-engine profile` prints what is alive at the memory
//! peak, grouped by the op that made it.
//!
//! | op | keeps | rebuilds in the backward pass |
//! |---|---|---|
//! | conv, conv_transpose, linear | input, weight | a residual block's second conv: its input (below) |
//! | instance_norm_act | input, gamma, beta, per-plane mean and 1/std | the norm's output, for LeakyReLU' |
//! | instance_norm_add_act | input, gamma, beta, per-plane statistics, its output (LeakyReLU') | - |
//! | layer_norm | input, gamma, per-row mean and 1/std | PiM's: its input, the map's sequences (below) |
//! | leaky_relu | its output (the sign is the input's; the next conv keeps it anyway) | - |
//! | silu, softplus | input | - |
//! | causal_conv1d, causal_conv1d_silu | input, weight (and bias with SiLU) | the conv's output; Mamba's input |
//! | selective_scan | its inputs; on the GPU the state at each chunk start | Mamba's delta and z; every other state |
//! | cross_entropy, soft_dice_loss | logits, target (Dice: per-group sums) | the softmax |
//! | add, cast, flip, reshape, narrow, concat, partition, merge, pooling, upsampling | shapes only | - |
//! | checkpoint (`--recompute mamba`) | the piece's inputs | the whole piece, then its backward |
//!
//! "Below": an op may take an input as an [`Operand`](crate::ops::operand::Operand) and keep, instead of it, what
//! makes it, which other nodes keep anyway; its backward pass rebuilds the input, the same bits. Mamba's in_proj
//! halves and delta are linear products (the scan and causal_conv1d_silu keep their operands), a residual block's
//! first normalised map is rebuilt by its second conv from the map's conv output and norm statistics, and a PiM
//! layer's sequences by its LayerNorm from the stage's output.
//!
//! An op forward and backward, by hand: `y = LeakyReLU(x W^T)` for one row x, seeded with `dL/dy = 1`, so that
//! `dL/dW[j, k] = LeakyReLU'(h_j) x_k` with `h = x W^T`.
//!
//! ```
//! use lkm_engine::autograd::Tape;
//! use lkm_engine::device::Device;
//! use lkm_engine::ops::activation::leaky_relu;
//! use lkm_engine::ops::linear::linear;
//! use lkm_engine::{DType, Tensor};
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let x = Tensor::from_vec(vec![1.0f64, -2.0], &[1, 2])?;
//! let w = Tensor::from_vec(vec![1.0f64, 0.25, -1.0, 1.0], &[2, 2])?; // (out, in)
//! let mut tape = Tape::new();
//! tape.watch(&w); // a parameter; x is data and gets no gradient
//! let h = linear(&mut tape, &x, &w, None)?; // [1 - 0.5, -1 - 2] = [0.5, -3]
//! let y = leaky_relu(&mut tape, &h)?; // [0.5, -0.03]
//! assert_eq!(tape.len(), 2);
//!
//! let seed = Tensor::full(y.shape(), 1.0, DType::F64, &Device::Cpu)?;
//! let grads = tape.backward_from(&y, seed)?;
//! assert!(tape.is_empty() && grads.get(&x).is_none());
//! let dw = grads.get(&w).expect("w is watched").to_vec_f64()?;
//! let by_hand = [1.0, -2.0, 0.01, -0.02]; // rows: LeakyReLU'(0.5) = 1, LeakyReLU'(-3) = 0.01, times x
//! assert!(dw.iter().zip(by_hand).all(|(a, b)| (a - b).abs() < 1e-15), "{dw:?}");
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::tensor::{Tensor, TensorId};
use crate::{ensure, Result};

/// The backward half of an op: given dL/d(output), the gradients of the op's inputs.
pub trait Backward {
    /// The op's name, for error messages.
    fn name(&self) -> &'static str;

    /// Returns one entry per input, in the order the inputs were given to [`Tape::record`]. `needs[i]` says whether
    /// input i wants a gradient; entries it does not want may be `None` (skipping the work).
    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>>;

    /// The floating-point operations of the backward pass, for profiles (0: not counted, a memory-bound op).
    fn flops(&self) -> f64 {
        0.0
    }

    /// For an op of one input whose gradient is zero outside a part of it (a slice): adds dL/d(input) into `grad`,
    /// that input's gradient so far (from its other uses), in place, and returns true; the tape then makes no
    /// full-size gradient for it and adds nothing. Returns false, touching nothing, where it cannot (the default).
    fn add_into(&self, _grad_out: &Tensor, _grad: &mut Tensor) -> Result<bool> {
        Ok(false)
    }
}

struct Node {
    inputs: Vec<TensorId>,
    output: TensorId,
    op: Box<dyn Backward>,
    /// The layer the op ran in, so its backward range carries the same name (None unless profiling).
    layer: Option<Arc<str>>,
    /// The forward output, kept only while tracing.
    traced_output: Option<Tensor>,
}

/// One recorded node as a tracing tape saw it (see [`Tape::trace`]): for comparing two runs of the same graph (the
/// GPU against the CPU) op by op, forward and backward.
pub struct TracedNode {
    /// The node's position on the tape (the order of the forward pass).
    pub index: usize,
    /// The op's name.
    pub op: &'static str,
    /// Its forward output.
    pub output: Tensor,
    /// dL/d(output) as the backward pass handed it to the node.
    pub grad: Tensor,
}

/// The record of one forward pass.
pub struct Tape {
    enabled: bool,
    nodes: Vec<Node>,
    /// Tensors whose gradient is wanted or flows: watched leaves and outputs of recorded nodes.
    tracked: HashSet<TensorId>,
    leaves: HashSet<TensorId>,
    tracing: bool,
    /// bf16 copies of float32 weights, by the master's id ([`Tape::bf16_copy`]).
    copies: HashMap<TensorId, Tensor>,
}

/// Gradients of the watched tensors after [`Tape::backward`].
#[derive(Default)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
    trace: Vec<TracedNode>,
}

impl Gradients {
    /// The gradient of `t`, if any flowed to it.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    /// Removes and returns the gradient of `t`.
    pub fn take(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }

    /// The number of gradients held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no gradient is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The nodes a tracing tape ran, in backward order (last node first); empty unless [`Tape::trace`] was on.
    pub fn trace(&self) -> &[TracedNode] {
        &self.trace
    }
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    /// A tape that records ops.
    pub fn new() -> Tape {
        Tape {
            enabled: true,
            nodes: Vec::new(),
            tracked: HashSet::new(),
            leaves: HashSet::new(),
            tracing: false,
            copies: HashMap::new(),
        }
    }

    /// A tape that records nothing: ops run forward only and save nothing.
    pub fn no_grad() -> Tape {
        Tape { enabled: false, ..Tape::new() }
    }

    /// Keeps every node's forward output and output gradient for [`Gradients::trace`] (debugging: it holds all
    /// activations and their gradients until the gradients are dropped).
    pub fn trace(&mut self, on: bool) {
        self.tracing = on;
    }

    /// The number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Marks `t` as a leaf whose gradient [`Tape::backward`] must return (a parameter, or an input under test).
    pub fn watch(&mut self, t: &Tensor) {
        if self.enabled {
            self.tracked.insert(t.id());
            self.leaves.insert(t.id());
        }
    }

    /// Gives the tape `copy`, the bf16 copy of the float32 tensor `master`, for [`Tape::bf16_copy`] to hand out
    /// instead of casting: the copies the optimiser keeps in step with the parameters ([`crate::nn::Params`]), which
    /// this tape or an earlier one made from the same tensor.
    pub(crate) fn provide_copy(&mut self, master: &Tensor, copy: Tensor) {
        debug_assert!(copy.dtype() == crate::DType::BF16 && copy.shape() == master.shape());
        self.copies.insert(master.id(), copy);
    }

    /// `t` (float32) rounded to bf16, made once per tape: the copy the parameters gave ([`crate::nn::Params::watch`])
    /// or the one made by the first call, so that every use of a weight in a step (its products rebuilt in the
    /// backward pass too) reads one copy. Weights do not change while a tape records; [`Tape::backward`] forgets the
    /// copies.
    pub fn bf16_copy(&mut self, t: &Tensor) -> Result<Tensor> {
        if let Some(copy) = self.copies.get(&t.id()) {
            return Ok(copy.clone());
        }
        let range = crate::profile::forward("cast", &[t], 0.0);
        let copy = t.to_dtype(crate::DType::BF16)?;
        range.done([&copy]);
        self.copies.insert(t.id(), copy.clone());
        Ok(copy)
    }

    /// The bf16 copies this tape holds, by the master's id (for keeping them across steps).
    pub fn copies(&self) -> &HashMap<TensorId, Tensor> {
        &self.copies
    }

    /// Whether a gradient will flow to `t`.
    pub fn tracks(&self, t: &Tensor) -> bool {
        self.tracked.contains(&t.id())
    }

    /// Whether an op with these inputs must be recorded. Ops call this before saving anything for the backward.
    pub fn needs_grad(&self, inputs: &[&Tensor]) -> bool {
        self.enabled && inputs.iter().any(|t| self.tracks(t))
    }

    /// Records that `output = op(inputs)`, if any input is tracked; otherwise drops `op`.
    pub fn record(&mut self, inputs: &[&Tensor], output: &Tensor, op: impl Backward + 'static) {
        if !self.needs_grad(inputs) {
            return;
        }
        self.tracked.insert(output.id());
        self.nodes.push(Node {
            inputs: inputs.iter().map(|t| t.id()).collect(),
            output: output.id(),
            op: Box::new(op),
            layer: crate::profile::current_layer(),
            traced_output: self.tracing.then(|| output.clone()),
        });
    }

    /// Back-propagates from a scalar `loss` (seed gradient 1).
    pub fn backward(&mut self, loss: &Tensor) -> Result<Gradients> {
        ensure!(loss.numel() == 1, Shape, "backward() needs a one-element loss, got shape {:?}", loss.shape());
        let seed = Tensor::full(loss.shape(), 1.0, loss.dtype(), &loss.device())?;
        self.backward_from(loss, seed)
    }

    /// Back-propagates from `output` with the given seed gradient dL/d(output), consuming the tape. Returns the
    /// gradients of the watched leaves.
    pub fn backward_from(&mut self, output: &Tensor, seed: Tensor) -> Result<Gradients> {
        self.backward_inner(output, seed, None)
    }

    /// The watched leaves that recorded nodes take as inputs, in the order their gradients become final during
    /// [`Tape::backward`]: a leaf's gradient is complete once the backward pass has run the first node (in forward
    /// order) that uses it, and the pass runs nodes last to first. Leaves first used by the same node come in that
    /// node's input order, so the order is a fixed function of the recorded graph (the same on every replica of a
    /// data-parallel run, which must launch its gradient reductions in one order).
    pub fn leaves_in_final_order(&self) -> Vec<TensorId> {
        self.leaves_with_final_node().into_iter().map(|(id, _)| id).collect()
    }

    /// As [`Tape::backward`], handing each watched leaf's gradient to `on_final` as soon as it is complete (see
    /// [`Tape::leaves_in_final_order`]), in that order, instead of returning it: `None` when no gradient reached the
    /// leaf. Data-parallel training starts reducing a gradient across GPUs there, while the rest of the backward
    /// pass runs. The returned [`Gradients`] hold only the leaves no recorded node uses (none, for a model's
    /// parameters) and the trace.
    pub fn backward_notify(
        &mut self,
        loss: &Tensor,
        on_final: &mut dyn FnMut(TensorId, Option<Tensor>) -> Result<()>,
    ) -> Result<Gradients> {
        ensure!(loss.numel() == 1, Shape, "backward() needs a one-element loss, got shape {:?}", loss.shape());
        let seed = Tensor::full(loss.shape(), 1.0, loss.dtype(), &loss.device())?;
        self.backward_inner(loss, seed, Some(on_final))
    }

    /// [`Tape::leaves_in_final_order`], each leaf with the index of the node after which its gradient is final (the
    /// first node that takes it as an input).
    fn leaves_with_final_node(&self) -> Vec<(TensorId, usize)> {
        let mut first_use = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for id in node.inputs.iter().filter(|id| self.leaves.contains(id)) {
                first_use.entry(*id).or_insert(i);
            }
        }
        let mut order = Vec::with_capacity(first_use.len());
        for (i, node) in self.nodes.iter().enumerate().rev() {
            for id in &node.inputs {
                // `remove` emits a leaf once even when its first node takes it twice.
                if first_use.get(id) == Some(&i) {
                    first_use.remove(id);
                    order.push((*id, i));
                }
            }
        }
        order
    }

    fn backward_inner(
        &mut self,
        output: &Tensor,
        seed: Tensor,
        mut on_final: Option<&mut dyn FnMut(TensorId, Option<Tensor>) -> Result<()>>,
    ) -> Result<Gradients> {
        // Node index -> the leaves whose gradient is complete once that node has run (only when someone listens).
        let mut final_after: HashMap<usize, Vec<TensorId>> = HashMap::new();
        if on_final.is_some() {
            for (id, node) in self.leaves_with_final_node() {
                final_after.entry(node).or_default().push(id);
            }
        }
        output.check_same_kind(&seed, "backward seed")?;
        seed.check_shape(output.shape(), "backward seed")?;
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let mut trace = Vec::new();
        grads.insert(output.id(), seed);
        while let Some(node) = self.nodes.pop() {
            let index = self.nodes.len();
            // An output's gradient is complete once every later node has run; nodes no gradient reached are skipped.
            if let Some(grad_out) = grads.remove(&node.output) {
                self.run_node(node, grad_out, &mut grads, &mut trace)?;
            }
            if let (Some(on_final), Some(leaves)) = (on_final.as_mut(), final_after.remove(&index)) {
                for id in leaves {
                    on_final(id, grads.remove(&id))?;
                }
            }
        }
        grads.retain(|id, _| self.leaves.contains(id));
        self.clear();
        Ok(Gradients { map: grads, trace })
    }

    /// Runs one node's backward with its complete output gradient and accumulates its inputs' gradients.
    fn run_node(
        &self,
        node: Node,
        grad_out: Tensor,
        grads: &mut HashMap<TensorId, Tensor>,
        trace: &mut Vec<TracedNode>,
    ) -> Result<()> {
        if let Some(out) = node.traced_output {
            let (index, op) = (self.nodes.len(), node.op.name());
            trace.push(TracedNode { index, op, output: out, grad: grad_out.clone() });
        }
        let needs: Vec<bool> = node.inputs.iter().map(|id| self.tracked.contains(id)).collect();
        let range = crate::profile::backward(node.op.name(), node.layer, &grad_out, node.op.flops());
        // A slice of an input that already has a gradient: added into it in place (Backward::add_into).
        if let ([id], [true]) = (&node.inputs[..], &needs[..]) {
            if let Some(grad) = grads.get_mut(id) {
                if node.op.add_into(&grad_out, grad)? {
                    range.done([&grad_out]);
                    return Ok(());
                }
            }
        }
        let input_grads = node.op.backward(&grad_out, &needs)?;
        range.done(input_grads.iter().flatten());
        ensure!(
            input_grads.len() == node.inputs.len(),
            Shape,
            "backward of {} returned {} gradients for {} inputs",
            node.op.name(),
            input_grads.len(),
            node.inputs.len()
        );
        for ((id, g), need) in node.inputs.iter().zip(input_grads).zip(needs) {
            if let (Some(g), true) = (g, need) {
                accumulate(grads, *id, g)?;
            }
        }
        Ok(())
    }

    /// Drops every recorded node and what it saved, and forgets the watched tensors and the bf16 copies.
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.tracked.clear();
        self.leaves.clear();
        self.copies.clear();
    }
}

/// Adds `g` to the gradient of `id`: in place into the gradient so far when nothing else holds its storage (see
/// [`crate::tensor::add_assign`]), so accumulating allocates nothing.
fn accumulate(grads: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<()> {
    match grads.get_mut(&id) {
        Some(prev) => crate::tensor::add_assign(prev, &g),
        None => {
            grads.insert(id, g);
            Ok(())
        }
    }
}

pub mod checkpoint;
pub mod gradcheck;
