//! The settings a training run is started with: checked in one place ([`Launch::validate`]), stored in every
//! checkpoint (under `run.launch`), and restored by `--resume` ([`Launch::resumed`]), so that a resumed run trains
//! the same model on the same data with the same options, and a flag that would change the run is an error naming
//! both values instead of being ignored or obeyed silently.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use super::trainer::TrainOptions;
use crate::nn::ModelConfig;
use crate::ops::pim::PimLayout;
use crate::plan::{override_stages, Plan};
use crate::{bail, ensure, Error, Result};

/// What `lkm-engine train` was asked to do; each field is one command-line flag.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    /// `--data`: the dataset folder (absolute), or `None` for the built-in phantoms.
    pub data: Option<PathBuf>,
    /// `--config`: the model configuration's name (none: the plan's network, or tiny-3d without a plan).
    pub config: Option<String>,
    /// The plan of `--plans`, or the one made for `--data` without `--config` (none for a named configuration).
    #[serde(default)]
    pub plan: Option<Plan>,
    /// `--pim-window`: PiM windows set per stage.
    #[serde(default)]
    pub pim_window: Vec<(usize, Vec<usize>)>,
    /// `--pam-factor`: PaM factors set per stage.
    #[serde(default)]
    pub pam_factor: Vec<(usize, Vec<usize>)>,
    /// `--patch`: the patch size, when it overrides the configuration's.
    pub patch: Option<Vec<usize>>,
    /// `--pim-layout`: window or strided.
    pub pim_layout: String,
    /// `--epochs`.
    pub epochs: usize,
    /// `--iters`: iterations per epoch.
    pub iters: usize,
    /// `--batch`: patches per batch.
    pub batch: usize,
    /// `--lr`: the initial learning rate.
    pub lr: f64,
    /// `--seed`.
    pub seed: u64,
    /// `--val-fraction`.
    pub val_fraction: f64,
    /// `--synth-cases`: phantoms generated when there is no `--data`.
    pub synth_cases: usize,
    /// Not `--no-mirror`.
    pub mirror: bool,
    /// Not `--no-aug`.
    #[serde(default = "augment_by_default")]
    pub augment: bool,
}

/// Runs recorded before `--no-aug` existed augmented.
fn augment_by_default() -> bool {
    true
}

impl Launch {
    /// Checks every setting against its allowed range, naming the flag. The dataset folder is made absolute, so
    /// that a resumed run finds it from any working directory.
    pub fn validate(mut self) -> Result<Launch> {
        for (flag, value) in [("--epochs", self.epochs), ("--iters", self.iters), ("--batch", self.batch)] {
            ensure!(value >= 1, Config, "{flag} must be at least 1, got {value}");
        }
        ensure!(
            self.val_fraction.is_finite() && (0.0..1.0).contains(&self.val_fraction),
            Config,
            "--val-fraction must be in [0, 1) (the fraction of cases held out for validation), got {}",
            self.val_fraction
        );
        ensure!(self.lr.is_finite() && self.lr > 0.0, Config, "--lr must be a positive number, got {}", self.lr);
        let _ = self.layout()?;
        // Without the network (a plan still to be made), the patch is checked against it once it is planned.
        let config = if self.plan_pending() { None } else { Some(self.base_config()?) };
        if let (Some(patch), Some(config)) = (&self.patch, config) {
            let rank = config.spatial_rank();
            ensure!(
                patch.len() == rank && patch.iter().all(|&p| p >= 1),
                Config,
                "--patch {patch:?}: the model needs {rank} sizes of at least 1 (one per spatial axis, comma-separated)"
            );
        }
        match &self.data {
            Some(dir) => {
                ensure!(dir.is_dir(), Config, "--data {}: no such folder", dir.display());
                self.data = Some(dir.canonicalize().map_err(|e| Error::Io(format!("--data {}: {e}", dir.display())))?);
            }
            None => {
                ensure!(self.synth_cases >= 1, Config, "--synth-cases must be at least 1, got {}", self.synth_cases)
            }
        }
        Ok(self)
    }

    /// The PiM layout named by `--pim-layout`.
    pub fn layout(&self) -> Result<PimLayout> {
        parse_pim_layout(&self.pim_layout)
    }

    /// Whether the network comes from a plan not made yet: `--data` without `--config` or a plan.
    pub fn plan_pending(&self) -> bool {
        self.data.is_some() && self.config.is_none() && self.plan.is_none()
    }

    /// The network before the flags that change it: the plan's, or the named configuration (tiny-3d by default).
    fn base_config(&self) -> Result<ModelConfig> {
        match (&self.plan, &self.config) {
            (Some(p), _) => Ok(p.model.clone()),
            (None, name) => {
                let name = name.as_deref().unwrap_or(DEFAULT_CONFIG);
                ModelConfig::by_name(name).map_err(|e| Error::Config(format!("--config {name:?}: {e}")))
            }
        }
    }

    /// The model of a fresh run for data of `num_classes` classes and `channels` image channels.
    pub fn model_config(&self, num_classes: usize, channels: usize) -> Result<ModelConfig> {
        let mut config = self.base_config()?;
        config.num_classes = num_classes;
        config.in_channels = channels;
        config.pim_layout = self.layout()?;
        if let Some(p) = &self.patch {
            config.patch = p.clone();
        }
        override_stages(&mut config, &self.pim_window, &self.pam_factor)?;
        Ok(config)
    }

    /// The training options of a fresh run.
    pub fn train_options(&self, progress: bool) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            iters_per_epoch: self.iters,
            batch: self.batch,
            lr: self.lr,
            seed: self.seed,
            progress,
            mirror: self.mirror,
            augment: self.augment,
            ..TrainOptions::default()
        }
    }

    /// The settings of a resumed run: those `recorded` in the checkpoint `ck` (which has completed `ck_epoch`
    /// epochs), with `--epochs` and `--lr` taken from `given` when they were given. `explicit(id)` tells whether the
    /// user gave the flag of field `id` (clap's argument id); an explicit flag whose value differs from the recorded
    /// one is an error naming both. `--epochs` must lie above `ck_epoch`, and a finished run needs it.
    pub fn resumed(
        recorded: &Launch,
        given: &Launch,
        explicit: &dyn Fn(&str) -> bool,
        ck: &Path,
        ck_epoch: usize,
    ) -> Result<Launch> {
        let same = |id: &str, r: &dyn Debug, g: &dyn Debug| -> Result<()> {
            let (r, g) =
                (format!("{r:?}").trim_matches('"').to_string(), format!("{g:?}").trim_matches('"').to_string());
            ensure!(
                !explicit(id) || r == g,
                Config,
                "--{} {g} conflicts with the run being resumed ({}), which has {r}; leave the flag out to continue \
                 that run, or start a new run without --resume",
                id.replace('_', "-"),
                ck.display()
            );
            Ok(())
        };
        same("data", &shown(&recorded.data), &shown(&given.data))?;
        let name = |c: &Option<String>| c.clone().unwrap_or_else(|| "none".into());
        same("config", &name(&recorded.config), &name(&given.config))?;
        ensure!(
            !explicit("plans") || recorded.plan == given.plan,
            Config,
            "--plans gives another plan than the one the run being resumed ({}) was trained with; leave the flag out \
             to continue that run, or start a new run without --resume",
            ck.display()
        );
        same("pim_window", &recorded.pim_window, &given.pim_window)?;
        same("pam_factor", &recorded.pam_factor, &given.pam_factor)?;
        same("patch", &shown(&recorded.patch), &shown(&given.patch))?;
        same("pim_layout", &recorded.pim_layout, &given.pim_layout)?;
        same("iters", &recorded.iters, &given.iters)?;
        same("batch", &recorded.batch, &given.batch)?;
        same("seed", &recorded.seed, &given.seed)?;
        same("val_fraction", &recorded.val_fraction, &given.val_fraction)?;
        same("synth_cases", &recorded.synth_cases, &given.synth_cases)?;
        same("no_mirror", &!recorded.mirror, &!given.mirror)?;
        same("no_aug", &!recorded.augment, &!given.augment)?;
        let epochs = if explicit("epochs") {
            ensure!(
                given.epochs > ck_epoch,
                Config,
                "--epochs {} is not above the {ck_epoch} epochs already done by {}: nothing would be trained; give \
                 more epochs to extend the run",
                given.epochs,
                ck.display()
            );
            given.epochs
        } else {
            ensure!(
                recorded.epochs > ck_epoch,
                Config,
                "the run of {} is complete ({ck_epoch} of {} epochs); give --epochs above {ck_epoch} to extend it",
                ck.display(),
                recorded.epochs
            );
            recorded.epochs
        };
        // A lower learning rate is the remedy for a diverged run, so --lr may change from here on.
        let lr = if explicit("lr") { given.lr } else { recorded.lr };
        Ok(Launch { epochs, lr, ..recorded.clone() })
    }
}

/// The configuration of a run without `--config` and without a plan (the phantoms).
const DEFAULT_CONFIG: &str = "tiny-3d";

/// The PiM layout named by a `--pim-layout` flag: window or strided.
pub fn parse_pim_layout(s: &str) -> Result<PimLayout> {
    match s {
        "window" => Ok(PimLayout::Window),
        "strided" => Ok(PimLayout::Strided),
        s => bail!(Config, "--pim-layout must be window or strided, not {s:?}"),
    }
}

/// An optional setting as a user would write it: its value, or "none" (the built-in phantoms, the configuration's
/// patch).
fn shown<T: Debug>(v: &Option<T>) -> String {
    v.as_ref().map_or("none".to_string(), |v| format!("{v:?}"))
}
