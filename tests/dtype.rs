//! Storage types on the host: bf16 is a GPU-only type (refused on the host with what to do instead), an op without a
//! bf16 kernel names itself, and the cast op returns gradients in its input's type. The GPU side (the rounding
//! kernel against the `half` crate, bit for bit) is tests/gpu_cast.rs.

/// bf16 is a GPU storage type: the host refuses to make one, and says what to do instead.
#[test]
fn bf16_is_refused_on_the_host_with_a_way_out() {
    use lkm_engine::tensor::DType;
    let err = lkm_engine::Tensor::from_fn(&[2], DType::BF16, |i| i as f64).unwrap_err().to_string();
    assert!(err.contains("GPU storage type") && err.contains("float32"), "{err}");
    let host = lkm_engine::Tensor::from_fn(&[2], DType::F32, |i| i as f64).unwrap();
    let err = host.to_dtype(DType::BF16).unwrap_err().to_string();
    assert!(err.contains("GPU storage type"), "{err}");
    let err = lkm_engine::tensor::no_bf16_kernel("lkm_engine::ops::instance_norm").to_string();
    assert!(err.contains("instance_norm: no bf16 kernel"), "{err}");
}

/// The cast op on the host (float32 -> float64) carries the gradient back in the input's type.
#[test]
fn cast_op_gradient_returns_in_the_input_type() {
    use lkm_engine::autograd::Tape;
    use lkm_engine::tensor::DType;
    let x = lkm_engine::Tensor::from_fn(&[4], DType::F32, |i| i as f64 + 0.5).unwrap();
    let mut tape = Tape::new();
    tape.watch(&x);
    let y = lkm_engine::ops::cast::cast(&mut tape, &x, DType::F64).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let seed = lkm_engine::Tensor::from_fn(&[4], DType::F64, |i| 2.0 * i as f64).unwrap();
    let dx = tape.backward_from(&y, seed).unwrap().take(&x).unwrap();
    assert_eq!((dx.dtype(), dx.to_vec_f64().unwrap()), (DType::F32, vec![0.0, 2.0, 4.0, 6.0]));
}
