//! Named parameters. A layer owns no tensors: it records [`ParamId`]s into one [`Params`] store at build time and
//! reads them in `forward`. One flat store makes checkpoints (names = the public PyTorch `state_dict` keys), the
//! optimiser (one list) and gradient checks (swap in perturbed values) simple.

use crate::autograd::Tape;
use crate::device::Device;
use crate::tensor::{DType, Tensor};
use crate::{ensure, Result};

/// The index of a parameter in its [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId(usize);

/// An ordered list of named parameter tensors, and the bf16 copies of those that a bf16 step's convolutions and linear
/// layers read.
///
/// The copies: a training step gives them to its tape ([`Params::watch`]), so that the ops read them instead of
/// casting their weights ([`crate::ops::cast::Weight`]); the tape makes those it lacks, which [`Params::keep_copies`]
/// keeps; the optimiser rewrites them from the updated values in its own pass ([`Params::for_optimiser`]). Whoever
/// changes the values otherwise ([`Params::tensors_mut`]) drops them, so a copy is never stale.
#[derive(Clone, Default)]
pub struct Params {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    /// Empty, or one entry per tensor: its bf16 copy, if one is kept.
    copies: Vec<Option<Tensor>>,
}

impl Params {
    /// An empty store.
    pub fn new() -> Params {
        Params::default()
    }

    /// Adds a parameter under `name` (must be new) and returns its id.
    pub fn add(&mut self, name: impl Into<String>, t: Tensor) -> ParamId {
        let name = name.into();
        debug_assert!(!self.names.contains(&name), "parameter {name} registered twice");
        self.names.push(name);
        self.tensors.push(t);
        ParamId(self.tensors.len() - 1)
    }

    /// The tensor of `id`.
    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.0]
    }

    /// The number of parameters.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The names, in registration order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The tensors, in registration order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The tensors for in-place updates; drops the bf16 copies, which the changes would leave stale.
    pub fn tensors_mut(&mut self) -> &mut [Tensor] {
        self.copies.clear();
        &mut self.tensors
    }

    /// The tensors and their bf16 copies (one entry per tensor), for the optimiser, which updates both in one pass
    /// ([`crate::optim::Sgd::step_clipped`]).
    pub fn for_optimiser(&mut self) -> (&mut [Tensor], &mut [Option<Tensor>]) {
        self.copies.resize(self.tensors.len(), None);
        (&mut self.tensors, &mut self.copies)
    }

    /// Keeps the bf16 copies that `tape` made of these tensors during a forward pass (call it before the backward
    /// pass, which forgets them), for the optimiser to keep in step and the next step's tape to read.
    pub fn keep_copies(&mut self, tape: &Tape) {
        let made = tape.copies();
        if made.is_empty() {
            return;
        }
        self.copies.resize(self.tensors.len(), None);
        for (t, copy) in self.tensors.iter().zip(&mut self.copies) {
            if let Some(c) = made.get(&t.id()) {
                *copy = Some(c.clone());
            }
        }
    }

    /// The number of bf16 copies kept.
    pub fn copy_count(&self) -> usize {
        self.copies.iter().flatten().count()
    }

    /// The total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }

    /// The same names with new values of the same shapes (loading a checkpoint, gradient checks).
    pub fn with_tensors(&self, tensors: Vec<Tensor>) -> Result<Params> {
        ensure!(tensors.len() == self.len(), Shape, "{} tensors given for {} parameters", tensors.len(), self.len());
        for ((name, old), new) in self.names.iter().zip(&self.tensors).zip(&tensors) {
            new.check_shape(old.shape(), name)?;
        }
        Ok(Params { names: self.names.clone(), tensors, copies: Vec::new() })
    }

    /// Every parameter converted to `dtype` and moved to `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Params> {
        let tensors = self.tensors.iter().map(|t| t.to_dtype(dtype)?.to_device(device)).collect::<Result<_>>()?;
        Ok(Params { names: self.names.clone(), tensors, copies: Vec::new() })
    }

    /// A copy whose tensors own their storage, so the optimiser may update them in place whatever else holds the
    /// originals (a checkpoint, the caller's initial parameters).
    pub fn deep_copy(&self) -> Result<Params> {
        let tensors = self.tensors.iter().map(Tensor::deep_copy).collect::<Result<_>>()?;
        Ok(Params { names: self.names.clone(), tensors, copies: Vec::new() })
    }

    /// Registers every parameter on the tape as a leaf that wants a gradient, and gives it the bf16 copies kept.
    pub fn watch(&self, tape: &mut Tape) {
        for t in &self.tensors {
            tape.watch(t);
        }
        for (t, copy) in self.tensors.iter().zip(&self.copies) {
            if let Some(c) = copy {
                tape.provide_copy(t, c.clone());
            }
        }
    }
}
