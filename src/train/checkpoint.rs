//! Checkpoints: one safetensors file holding every parameter under its public PyTorch `state_dict` name (float32),
//! the optimiser's momentum buffers under `optimizer.momentum.<name>`, and a JSON metadata string (`lkm_engine`) with
//! the model configuration, the epoch reached, the seed and the data normalisation, so that `--resume` continues the
//! same run and `predict` rebuilds the same network.
//!
//! Files are written atomically: to `<path>.tmp` in the same folder, flushed to disk, then renamed over `<path>`, so
//! a crash or a full disk never leaves a truncated checkpoint where a good one was (a failed write removes its
//! `.tmp`; one left by a killed process is removed when the run folder is next opened, `run_dir`). Reading refuses
//! non-float32 and non-finite tensors.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::nn::Params;
use crate::tensor::Tensor;
use crate::{bail, Error, Result};

/// The metadata key under which the engine stores its JSON.
const META_KEY: &str = "lkm_engine";
/// The name prefix of momentum buffers.
const MOMENTUM_PREFIX: &str = "optimizer.momentum.";

/// What a checkpoint holds, in memory.
pub struct Checkpoint {
    /// Parameter tensors by name, float32 on the CPU.
    pub tensors: HashMap<String, Tensor>,
    /// Momentum buffers by parameter name (absent before the first step).
    pub momentum: HashMap<String, Tensor>,
    /// The engine's metadata (model config, epoch, seed, normalisation...).
    pub meta: serde_json::Value,
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let msg = format!("{what} {}", path.display());
    move |e| Error::Io(format!("{msg}: {e}"))
}

/// Writes `params` (and momentum buffers, aligned with them) with `meta` to `path`, atomically.
pub fn save(path: &Path, params: &Params, momentum: &[Option<Tensor>], meta: &serde_json::Value) -> Result<()> {
    let mut host: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in params.names().iter().zip(params.tensors()) {
        host.push((name.clone(), t.shape().to_vec(), bytemuck::cast_slice(&t.to_vec_f32()?).to_vec()));
    }
    for (name, m) in params.names().iter().zip(momentum) {
        if let Some(m) = m {
            host.push((
                format!("{MOMENTUM_PREFIX}{name}"),
                m.shape().to_vec(),
                bytemuck::cast_slice(&m.to_vec_f32()?).to_vec(),
            ));
        }
    }
    let views = host
        .iter()
        .map(|(n, s, b)| {
            Ok((n.as_str(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Data(format!("{n}: {e}")))?))
        })
        .collect::<Result<Vec<_>>>()?;
    let info = HashMap::from([(META_KEY.to_string(), meta.to_string())]);
    let bytes =
        safetensors::serialize(views, Some(info)).map_err(|e| Error::Data(format!("serialising a checkpoint: {e}")))?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file (`<path>.tmp`) and a rename; on failure the temporary file is
/// removed, so only the old file or the new one is ever there.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "creating"))?;
    }
    let tmp = path.with_extension("tmp");
    let written = write_synced(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path, "renaming the new file onto")));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Creates `path` with `bytes`, flushed to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err(path, "creating"))?;
    f.write_all(bytes).map_err(io_err(path, "writing"))?;
    f.sync_all().map_err(io_err(path, "flushing"))
}

/// Reads a checkpoint written by [`save`] (or converted from PyTorch by `tools/`).
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(io_err(path, "reading"))?;
    parse(&bytes, path)
}

/// Parses the bytes of a checkpoint file; `path` names it in messages. Tensors must be float32 and finite (a NaN
/// weight would silently turn every prediction into class 0).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Data(format!("{}: not a safetensors file ({e})", path.display())))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| Error::Data(format!("{}: bad {META_KEY} metadata: {e}", path.display())))?,
        None => serde_json::Value::Null,
    };
    let (mut tensors, mut momentum) = (HashMap::new(), HashMap::new());
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!(
                Data,
                "{}: tensor {name} is {:?}; only float32 checkpoints are supported",
                path.display(),
                view.dtype()
            );
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            bail!(
                NonFinite,
                "{}: tensor {name} has {bad} NaN or infinite value(s) of {}; the checkpoint is unusable (resume from \
                 an earlier one or retrain)",
                path.display(),
                values.len()
            );
        }
        let t = Tensor::from_vec(values, view.shape())?;
        match name.strip_prefix(MOMENTUM_PREFIX) {
            Some(p) => momentum.insert(p.to_string(), t),
            None => tensors.insert(name, t),
        };
    }
    Ok(Checkpoint { tensors, momentum, meta })
}

/// The engine's metadata of a checkpoint, read from the file's header alone (not its tensors); `Null` when the file
/// has none.
pub fn read_meta(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_err(path, "opening"))?;
    // A safetensors file opens with the header's length (u64, little-endian), then the header: JSON.
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io_err(path, "reading the header of"))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!(Data, "{}: not a safetensors file (header length {len})", path.display());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io_err(path, "reading the header of"))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::Data(format!("{}: not a safetensors file ({e})", path.display())))?;
    match header["__metadata__"][META_KEY].as_str() {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| Error::Data(format!("{}: bad {META_KEY} metadata: {e}", path.display()))),
        None => Ok(serde_json::Value::Null),
    }
}

impl Checkpoint {
    /// The parameters of `like` (same names, same shapes) taken from this checkpoint. Missing or extra names and shape
    /// differences are errors that list them.
    pub fn params_like(&self, like: &Params) -> Result<Params> {
        let missing: Vec<&String> = like.names().iter().filter(|n| !self.tensors.contains_key(*n)).collect();
        let extra: Vec<&String> = self.tensors.keys().filter(|n| !like.names().contains(n)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            bail!(
                Data,
                "checkpoint does not match the model: {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                extra.len(),
                extra.iter().take(3).collect::<Vec<_>>()
            );
        }
        like.with_tensors(like.names().iter().map(|n| self.tensors[n].clone()).collect())
    }

    /// Momentum buffers aligned with `like`'s parameters.
    pub fn momentum_like(&self, like: &Params) -> Vec<Option<Tensor>> {
        like.names().iter().map(|n| self.momentum.get(n).cloned()).collect()
    }
}
