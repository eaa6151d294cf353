//! A CPU harness around lkm-engine for the PyTorch parity tools (tools/parity.py, tools/test_tools.py):
//!
//! ```text
//! engine_dump names CONFIG                          every parameter `name [shape]` (stdout), count (stderr)
//! engine_dump dump DIR CONFIG BATCH BATCH_DICE [f64]
//!     writes DIR/weights.safetensors (init seed 7, norm scales U(0.5, 1.5) and biases U(-0.1, 0.1) so that no
//!     gradient is structurally zero; metadata lkm_engine = {"config": ...}, batch_dice), DIR/inputs.safetensors
//!     (x ~ N(0, 1), labels uniform over the classes) and DIR/engine.safetensors (out.I, loss, grad.<name>) from one
//!     forward / loss / backward of the engine on the CPU (float32, or float64 with `f64`)
//! engine_dump load FILE                             loads a checkpoint (e.g. from convert_pth.py) into the model
//! ```
//! CONFIG is a built-in name (flare-3d, amos-2d, tiny-3d) or a ModelConfig JSON file.
use std::collections::HashMap;

use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn config(arg: &str) -> Result<ModelConfig> {
    match ModelConfig::by_name(arg) {
        Ok(c) => Ok(c),
        Err(_) => Ok(serde_json::from_str(&std::fs::read_to_string(arg)?)?),
    }
}

fn write(path: &str, items: Vec<(String, Vec<usize>, Vec<f32>)>, meta: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        items.into_iter().map(|(n, s, v)| (n, s, bytemuck::cast_slice(&v).to_vec())).collect();
    let mut views = Vec::new();
    for (n, s, b) in &bytes {
        views.push((n.as_str(), TensorView::new(Dtype::F32, s.clone(), b)?));
    }
    std::fs::write(path, safetensors::serialize(views, Some(meta))?)?;
    Ok(())
}

fn dump(dir: &str, cfg: ModelConfig, batch: usize, batch_dice: bool, dtype: DType) -> Result<()> {
    let (model, p0) = LkmUnet::new(cfg.clone(), 7)?;
    let mut rng = StdRng::seed_from_u64(11);
    let mut tensors = Vec::new();
    for (n, t) in p0.names().iter().zip(p0.tensors()) {
        let v = t.to_vec_f32()?;
        let v: Vec<f32> = if n.ends_with("norm.weight") {
            v.iter().map(|_| 0.5 + rng.random::<f32>()).collect()
        } else if n.ends_with(".bias") && !n.contains("dt_proj") {
            v.iter().map(|_| 0.2 * (rng.random::<f32>() - 0.5)).collect()
        } else {
            v
        };
        tensors.push(Tensor::from_vec(v, t.shape())?);
    }
    let p32 = p0.with_tensors(tensors)?;
    let mut shape = vec![batch, cfg.in_channels];
    shape.extend_from_slice(&cfg.patch);
    let x = Tensor::randn(&shape, DType::F32, &mut rng)?;
    let mut lshape = shape.clone();
    lshape[1] = 1;
    let nvox: usize = lshape.iter().product();
    let labels: Vec<f32> = (0..nvox).map(|_| (rng.random::<f32>() * cfg.num_classes as f32).floor()).collect();
    let y = Tensor::from_vec(labels.clone(), &lshape)?;
    let p = p32.to(dtype, &Device::Cpu)?;
    let (xd, yd) = (x.to_dtype(dtype)?, y.to_dtype(dtype)?);
    let mut tape = Tape::new();
    p.watch(&mut tape);
    let t0 = std::time::Instant::now();
    let outs = model.forward(&mut tape, &p, &xd)?;
    let targets =
        outs.iter().map(|o| downsample_labels(&yd, &o.shape()[2..])).collect::<lkm_engine::Result<Vec<_>>>()?;
    let loss = deep_supervision_loss(&mut tape, &outs, &targets, batch_dice)?;
    let mut grads = tape.backward(&loss)?;
    eprintln!("engine step {:.2}s, loss {}", t0.elapsed().as_secs_f64(), loss.scalar()?);
    let mut meta = HashMap::from([("lkm_engine".to_string(), serde_json::json!({ "config": cfg }).to_string())]);
    meta.insert("batch_dice".into(), batch_dice.to_string());
    let mut items = Vec::new();
    for (n, t) in p32.names().iter().zip(p32.tensors()) {
        items.push((n.clone(), t.shape().to_vec(), t.to_vec_f32()?));
    }
    write(&format!("{dir}/weights.safetensors"), items, meta)?;
    let inputs = vec![("x".into(), shape, x.to_vec_f32()?), ("labels".into(), lshape, labels)];
    write(
        &format!("{dir}/inputs.safetensors"),
        inputs,
        HashMap::from([("batch_dice".into(), batch_dice.to_string())]),
    )?;
    let mut items = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        items.push((format!("out.{i}"), o.shape().to_vec(), o.to_vec_f32()?));
    }
    items.push(("loss".into(), vec![1], vec![loss.scalar()? as f32]));
    for (n, t) in p.names().iter().zip(p.tensors()) {
        let g = match grads.take(t) {
            Some(g) => g,
            None => Tensor::zeros(t.shape(), dtype, &Device::Cpu)?,
        };
        items.push((format!("grad.{n}"), t.shape().to_vec(), g.to_vec_f32()?));
    }
    write(&format!("{dir}/engine.safetensors"), items, HashMap::new())
}

fn run(a: &[String]) -> Result<()> {
    match a.get(1).map(String::as_str) {
        Some("names") if a.len() == 3 => {
            let (_, p) = LkmUnet::new(config(&a[2])?, 0)?;
            for (n, t) in p.names().iter().zip(p.tensors()) {
                println!("{n} {:?}", t.shape());
            }
            eprintln!("{} tensors, {} parameters", p.len(), p.count());
            Ok(())
        }
        Some("dump") if a.len() == 6 || a.len() == 7 => {
            let dtype = if a.get(6).map(String::as_str) == Some("f64") { DType::F64 } else { DType::F32 };
            std::fs::create_dir_all(&a[2])?;
            dump(&a[2], config(&a[3])?, a[4].parse()?, a[5].parse()?, dtype)
        }
        Some("load") if a.len() == 3 => {
            let ck = lkm_engine::train::checkpoint::load(std::path::Path::new(&a[2]))?;
            let cfg: ModelConfig = serde_json::from_value(ck.meta["config"].clone())?;
            let (_, p) = LkmUnet::new(cfg, 0)?;
            let q = ck.params_like(&p)?;
            let mut sum = 0.0;
            for t in q.tensors() {
                sum += t.to_vec_f64()?.iter().sum::<f64>();
            }
            println!("engine loaded {} tensors, {} parameters, sum {sum:.6}", q.len(), q.count());
            Ok(())
        }
        _ => Err("usage: engine_dump names CONFIG | dump DIR CONFIG BATCH BATCH_DICE [f64] | load FILE".into()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = run(&args) {
        eprintln!("engine_dump: {e}");
        std::process::exit(1);
    }
}
