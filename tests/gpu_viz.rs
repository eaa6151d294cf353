//! What a GPU training session records for its run report: the GPU's name and the CUDA version of its driver.

use lkm_engine::device::Device;
use lkm_engine::viz::report::{record_environment, ENVIRONMENT_FILE};

#[test]
#[ignore = "needs a CUDA device"]
fn a_gpu_session_records_the_gpu_and_its_driver() {
    let dir = std::env::temp_dir().join(format!("lkm-gpu-viz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    record_environment(&dir, &Device::cuda(0).unwrap(), 3).unwrap();
    let text = std::fs::read_to_string(dir.join(ENVIRONMENT_FILE)).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(line["device"], "cuda:0");
    assert_eq!(line["first_epoch"], 3);
    assert!(line["gpu"].as_str().is_some_and(|g| !g.is_empty()), "{line}");
    // cuDriverGetVersion: the CUDA major version is 12 or more on any driver that runs sm_90 kernels.
    let driver = line["driver"].as_str().unwrap_or_default();
    let major: u32 = driver.strip_prefix("CUDA ").and_then(|v| v.split('.').next()?.parse().ok()).unwrap_or(0);
    assert!(major >= 12, "driver {driver:?}");
}
