//! The run folder of a training (`metrics.jsonl`, `latest.safetensors`): one training at a time, no fresh run over
//! a finished one unless asked, and no leftovers.
//!
//! - A lock file `train.lock` holds the pid of the training that owns the folder; a second training into it is
//!   refused while that process lives. A lock whose process is gone (killed with -9, a power cut) is stale and is
//!   taken over, with a message. Liveness is read from `/proc/<pid>`, and the process must have our executable's
//!   name, so that a recycled pid of another program does not block forever. Where `/proc` does not exist (not
//!   Linux), a lock is treated as held and the message says to delete it if no training runs.
//! - A `latest.tmp` (or `metrics.tmp`) left by a write that was killed is removed once the lock is held.
//! - A fresh run refuses a folder holding `latest.safetensors` or `metrics.jsonl` unless `--overwrite`, which
//!   removes them; a resumed run keeps the metrics rows of the epochs its checkpoint has done and drops later ones
//!   (they belong to epochs that will be trained again).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::write_atomically;
use crate::viz::progress::PROGRESS_FILE;
use crate::viz::report::ENVIRONMENT_FILE;
use crate::{bail, ensure, Error, Result};

/// The lock file's name.
const LOCK: &str = "train.lock";
/// The checkpoint's name.
pub const CHECKPOINT: &str = "latest.safetensors";
/// The metrics log's name.
pub const METRICS: &str = "metrics.jsonl";

/// A run folder locked by this process; the lock is released on drop (and the folder removed if this process
/// created it and it stayed empty, so that a run refused later leaves nothing behind).
pub struct RunDir {
    dir: PathBuf,
    created: bool,
}

impl RunDir {
    /// Creates `dir` if needed, takes its lock and removes the `.tmp` files of a killed checkpoint or metrics write.
    pub fn lock(dir: &Path) -> Result<RunDir> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("creating {}: {e}", dir.display())))?;
        let lock = dir.join(LOCK);
        if !try_create_lock(&lock)? {
            let owner = std::fs::read_to_string(&lock).unwrap_or_default();
            let pid = owner.trim().parse::<u32>().ok();
            match pid.map(process_alive) {
                Some(Some(false)) => {
                    eprintln!(
                        "{}: removing the stale lock of process {} (no longer running)",
                        lock.display(),
                        owner.trim()
                    );
                    let _ = std::fs::remove_file(&lock);
                    ensure!(
                        try_create_lock(&lock)?,
                        Config,
                        "{}: another training took the folder's lock just now",
                        lock.display()
                    );
                }
                Some(Some(true)) => bail!(
                    Config,
                    "{}: process {} is training into {} (its lock); wait for it, or choose another --out",
                    lock.display(),
                    owner.trim(),
                    dir.display()
                ),
                _ => bail!(
                    Config,
                    "{}: the folder is locked by {:?} and whether that process still runs cannot be told here; \
                     delete the lock file if no training runs",
                    lock.display(),
                    owner.trim()
                ),
            }
        }
        let run_dir = RunDir { dir: dir.to_path_buf(), created };
        for tmp in [CHECKPOINT, METRICS].map(|f| dir.join(f).with_extension("tmp")) {
            if tmp.exists() {
                std::fs::remove_file(&tmp).map_err(|e| Error::Io(format!("removing {}: {e}", tmp.display())))?;
            }
        }
        Ok(run_dir)
    }

    /// Prepares a fresh run: a folder holding a run's checkpoint or metrics is refused unless `overwrite`, which
    /// removes them. The pictures and environment log of an earlier run (`progress.png`, `environment.jsonl`) are
    /// removed too, so that the new run's do not mix with them.
    pub fn start_fresh(&self, overwrite: bool) -> Result<()> {
        let held: Vec<PathBuf> =
            [CHECKPOINT, METRICS].iter().map(|f| self.dir.join(f)).filter(|p| p.exists()).collect();
        ensure!(
            held.is_empty() || overwrite,
            Config,
            "{} holds a run ({}); resume it with --resume {}, choose another --out, or give --overwrite to replace it",
            self.dir.display(),
            held.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            self.dir.join(CHECKPOINT).display()
        );
        let leftovers = [ENVIRONMENT_FILE, PROGRESS_FILE].iter().map(|f| self.dir.join(f)).filter(|p| p.exists());
        for p in held.into_iter().chain(leftovers) {
            std::fs::remove_file(&p).map_err(|e| Error::Io(format!("removing {}: {e}", p.display())))?;
        }
        Ok(())
    }

    /// Prepares a resumed run whose checkpoint has done `epochs_done` epochs: the metrics rows of epochs from
    /// `epochs_done` on are dropped (written atomically).
    pub fn resume_at(&self, epochs_done: usize) -> Result<()> {
        let path = self.dir.join(METRICS);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => bail!(Io, "reading {}: {e}", path.display()),
        };
        let mut kept = String::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let row: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::Data(format!("{}: line {}: not a JSON row ({e})", path.display(), i + 1)))?;
            let epoch = row["epoch"]
                .as_u64()
                .ok_or_else(|| Error::Data(format!("{}: line {}: no \"epoch\" number", path.display(), i + 1)))?;
            if epoch < epochs_done as u64 {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept.len() != text.len() {
            write_atomically(&path, kept.as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(LOCK));
        if self.created {
            let _ = std::fs::remove_dir(&self.dir); // fails, as it should, unless the folder is empty
        }
    }
}

/// Creates the lock file holding our pid; `false` if it exists already.
fn try_create_lock(lock: &Path) -> Result<bool> {
    match std::fs::OpenOptions::new().write(true).create_new(true).open(lock) {
        Ok(mut f) => {
            writeln!(f, "{}", std::process::id()).map_err(|e| Error::Io(format!("writing {}: {e}", lock.display())))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => bail!(Io, "creating {}: {e}", lock.display()),
    }
}

/// Whether process `pid` runs and is one of ours (same executable name); `None` where `/proc` cannot tell.
fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    let comm = |p: &Path| std::fs::read_to_string(p.join("comm")).ok();
    Some(match comm(&proc.join(pid.to_string())) {
        Some(name) => Some(name) == comm(&proc.join("self")),
        None => false,
    })
}
