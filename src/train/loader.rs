//! Training batches prepared by worker threads while the device trains.
//!
//! Determinism: the batch of (epoch, iteration) is drawn from its own generator, seeded by (seed, epoch, iteration)
//! ([`iteration_rng`]), so it is a fixed function of those three numbers: the same for any number of workers, any
//! timing, and in a run resumed at any epoch.
//!
//! Scheduling: with `w` workers, worker k prepares the iterations k, k + w, k + 2w, ... of the run (counted across
//! epochs, so the next epoch's first batches are ready while the last epoch validates) and sends them, in order, into
//! its own queue of `depth` batches; the trainer takes iteration i from queue i mod w. Each queue is bounded, so at
//! most `w (depth + 1)` batches exist ahead of the trainer, and the trainer's order needs no reordering. A worker that
//! fails sends its error in place of the batch; dropping the [`Loader`] closes the queues, which stops the workers.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::Scope;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::data::sampler::{ForegroundIndex, PatchSampler};
use crate::data::Case;
use crate::tensor::Tensor;
use crate::train::loss::downsample_labels;
use crate::{Error, Result};

/// One training batch, host float32: the images and the labels at the resolution of every deep-supervision output.
pub struct Batch {
    /// Images (n, channels, patch...).
    pub image: Tensor,
    /// Labels (n, 1, size...) for each of [`BatchSource::target_sizes`], in order (the first: the patch itself).
    /// Reduced here, on the worker, so that the trainer only uploads them: on the training thread the reduction of
    /// a 2 x 40 x 224 x 192 batch kept the GPU waiting between steps (`train` 7% slower per iteration than
    /// `dump-step` on the H200).
    pub targets: Vec<Tensor>,
}

/// The generator of one iteration: a fixed function of (seed, epoch, iteration).
pub fn iteration_rng(seed: u64, epoch: usize, iteration: usize) -> StdRng {
    // splitmix64 finalisers of the three numbers, chained, so that nearby (epoch, iteration) pairs give unrelated
    // streams.
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    StdRng::seed_from_u64(mix(mix(mix(seed) ^ epoch as u64) ^ iteration as u64))
}

/// What the batches of a run are drawn from.
pub struct BatchSource<'a> {
    /// Patch sampling and augmentation.
    pub sampler: PatchSampler,
    /// Training cases.
    pub cases: &'a [Case],
    /// Their foreground indices, aligned with `cases`.
    pub foreground: &'a [ForegroundIndex],
    /// Patches per batch.
    pub batch: usize,
    /// Run seed.
    pub seed: u64,
    /// Iterations per epoch.
    pub iters_per_epoch: usize,
    /// The spatial sizes the labels are reduced to (the model's deep-supervision outputs, `output_sizes`).
    pub target_sizes: Vec<Vec<usize>>,
}

impl BatchSource<'_> {
    /// The batch of iteration `iteration` of epoch `epoch`.
    pub fn batch(&self, epoch: usize, iteration: usize) -> Result<Batch> {
        let mut rng = iteration_rng(self.seed, epoch, iteration);
        let (image, labels) = self.sampler.batch(self.cases, self.foreground, self.batch, &mut rng)?;
        let targets = self.target_sizes.iter().map(|s| downsample_labels(&labels, s)).collect::<Result<_>>()?;
        Ok(Batch { image, targets })
    }

    /// (epoch, iteration) of the run's `n`-th iteration.
    fn position(&self, n: usize) -> (usize, usize) {
        (n / self.iters_per_epoch, n % self.iters_per_epoch)
    }
}

/// Batches of consecutive iterations, in order, prepared ahead by worker threads (see the module header).
pub struct Loader<'a> {
    source: &'a BatchSource<'a>,
    /// One queue per worker; empty: batches are drawn on the calling thread.
    queues: Vec<Receiver<Result<Batch>>>,
    /// The run's index of the next iteration handed out.
    next: usize,
    /// The run's index of the first iteration.
    first: usize,
}

impl<'a> Loader<'a> {
    /// Starts `workers` threads in `scope` preparing the iterations of epochs `first_epoch..end_epoch`, each up to
    /// `depth` batches ahead. `workers` 0 draws every batch on the calling thread when it is asked for.
    pub fn start<'scope>(
        scope: &'scope Scope<'scope, 'a>,
        source: &'a BatchSource<'a>,
        first_epoch: usize,
        end_epoch: usize,
        workers: usize,
        depth: usize,
    ) -> Loader<'a> {
        let first = first_epoch * source.iters_per_epoch;
        let end = end_epoch * source.iters_per_epoch;
        let queues = (0..workers)
            .map(|k| {
                let (send, receive) = sync_channel(depth);
                scope.spawn(move || {
                    for n in (first + k..end).step_by(workers) {
                        let (epoch, iteration) = source.position(n);
                        let batch = source.batch(epoch, iteration);
                        let failed = batch.is_err();
                        // The trainer dropped the loader (finished or stopped): nothing more to do.
                        if send.send(batch).is_err() || failed {
                            return;
                        }
                    }
                });
                receive
            })
            .collect();
        Loader { source, queues, next: first, first }
    }

    /// The next iteration's batch.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let n = self.next;
        self.next += 1;
        if self.queues.is_empty() {
            let (epoch, iteration) = self.source.position(n);
            return self.source.batch(epoch, iteration);
        }
        let queue = &self.queues[(n - self.first) % self.queues.len()];
        queue.recv().map_err(|_| {
            let (epoch, iteration) = self.source.position(n);
            Error::Data(format!("the batch loader stopped before epoch {epoch}, iteration {iteration}"))
        })?
    }
}
