//! An input that an op rebuilds in its backward pass instead of keeping it.
//!
//! An op's backward pass needs some of its inputs, so its node keeps them alive until it has run (the saved-tensor
//! policy in [`crate::autograd`]). Some inputs are cheap to make again from tensors that another node keeps anyway:
//!
//! - a linear product `x w^T` ([`Product`]) from its operands, which the product's own node keeps for its backward
//!   pass (Mamba's in_proj halves and dt_proj's delta: each wider than its input);
//! - the output of an instance norm and its activation ([`Normalized`]) from the norm's input and its per-plane
//!   statistics, which the norm's node keeps (the first norm of a residual block, whose output only the block's
//!   second convolution reads);
//! - a map cut into token sequences ([`Partitioned`]) from the map, which the stage's last LeakyReLU keeps (PiM's
//!   sequences, which its LayerNorm reads).
//!
//! An op that takes such an input as an [`Operand`] keeps what makes it (`Kept`) and rebuilds it in its backward
//! pass by the same kernel on the same values, so the gradients are the same bits as with the value kept. The value
//! itself lives only as long as the forward pass uses it: drop the `Product`, `Normalized` or `Partitioned` after the
//! op. The price is one more product, normalisation or partition pass in the backward pass; the saving one full
//! tensor per operand held from the forward pass to the backward pass, which is where the peak is.

use crate::autograd::Tape;
use crate::ops::instance_norm::{Normalization, Normalized};
use crate::ops::linear::{linear, Product};
use crate::ops::pim::{partition, Partitioned, PimLayout};
use crate::tensor::Tensor;
use crate::Result;

/// An input of an op: a tensor the op keeps for its backward pass, or a value it rebuilds there.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    /// The tensor itself, kept.
    Tensor(&'a Tensor),
    /// A linear product, rebuilt from its operands.
    Product(&'a Product),
    /// A normalised (and activated) map, rebuilt from the norm's input and statistics.
    Normalized(&'a Normalized),
    /// Token sequences, cut again from their map.
    Partitioned(&'a Partitioned),
}

impl<'a> Operand<'a> {
    /// The operand's value.
    pub fn value(self) -> &'a Tensor {
        match self {
            Operand::Tensor(t) => t,
            Operand::Product(p) => &p.value,
            Operand::Normalized(n) => n.value(),
            Operand::Partitioned(p) => &p.value,
        }
    }

    /// What an op keeps of it.
    pub(crate) fn keep(self) -> Kept {
        match self {
            Operand::Tensor(t) => Kept::Tensor(t.clone()),
            Operand::Product(p) => Kept::Product { x: p.x.clone(), w: p.w.clone() },
            Operand::Normalized(n) => Kept::Normalized(n.normalization().clone()),
            Operand::Partitioned(p) => Kept::Partitioned { x: p.x.clone(), window: p.window.clone(), layout: p.layout },
        }
    }
}

impl<'a> From<&'a Tensor> for Operand<'a> {
    fn from(t: &'a Tensor) -> Operand<'a> {
        Operand::Tensor(t)
    }
}

impl<'a> From<&'a Product> for Operand<'a> {
    fn from(p: &'a Product) -> Operand<'a> {
        Operand::Product(p)
    }
}

impl<'a> From<&'a Normalized> for Operand<'a> {
    fn from(n: &'a Normalized) -> Operand<'a> {
        Operand::Normalized(n)
    }
}

impl<'a> From<&'a Partitioned> for Operand<'a> {
    fn from(p: &'a Partitioned) -> Operand<'a> {
        Operand::Partitioned(p)
    }
}

/// What an op keeps of an [`Operand`] for its backward pass.
pub(crate) enum Kept {
    /// The tensor.
    Tensor(Tensor),
    /// The operands of `x w^T`.
    Product { x: Tensor, w: Tensor },
    /// The norm's input, parameters and statistics.
    Normalized(Normalization),
    /// The map and how it is cut.
    Partitioned { x: Tensor, window: Vec<usize>, layout: PimLayout },
}

impl Kept {
    /// The operand's value: the tensor, or the value made again (recording nothing on any tape).
    pub(crate) fn get(&self) -> Result<Tensor> {
        match self {
            Kept::Tensor(t) => Ok(t.clone()),
            Kept::Product { x, w } => linear(&mut Tape::no_grad(), x, w, None),
            Kept::Normalized(n) => n.apply(),
            Kept::Partitioned { x, window, layout } => partition(&mut Tape::no_grad(), x, window, *layout),
        }
    }
}
