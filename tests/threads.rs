//! The CPU ops that run on rayon's thread pool give the same bits with 1 thread and with 3: outputs and every input
//! gradient of conv, conv_transpose, linear and the selective scan, in float32 and float64.

use lkm_engine::autograd::gradcheck::randn64;
use lkm_engine::autograd::Tape;
use lkm_engine::ops::conv::conv;
use lkm_engine::ops::conv_transpose::conv_transpose;
use lkm_engine::ops::flip::Order;
use lkm_engine::ops::linear::linear;
use lkm_engine::ops::operand::Operand;
use lkm_engine::ops::selective_scan::{selective_scan, ScanInputs};
use lkm_engine::{DType, Result, Tensor};

/// The bits of the output of `f` and of the gradients of all `inputs` (converted to `dtype`), for a random seed
/// gradient, computed in a rayon pool of `threads` threads.
fn run_in_pool(
    threads: usize,
    inputs: &[Tensor],
    dtype: DType,
    f: &(dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor> + Sync),
) -> Vec<Vec<u64>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        assert_eq!(rayon::current_num_threads(), threads);
        let inputs: Vec<Tensor> = inputs.iter().map(|x| x.to_dtype(dtype).unwrap()).collect();
        let mut tape = Tape::new();
        for x in &inputs {
            tape.watch(x);
        }
        let y = f(&mut tape, &inputs).unwrap();
        let seed = randn64(y.shape(), 99).to_dtype(dtype).unwrap();
        let grads = tape.backward_from(&y, seed).unwrap();
        let bits = |t: &Tensor| t.to_vec_f64().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u64>>();
        let mut out = vec![bits(&y)];
        out.extend(inputs.iter().map(|x| bits(grads.get(x).expect("every input gets a gradient"))));
        out
    })
}

/// Asserts that 1 and 3 threads give the same bits, in both dtypes.
fn assert_thread_count_invariant(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor> + Sync,
) {
    for dtype in [DType::F32, DType::F64] {
        let one = run_in_pool(1, inputs, dtype, &f);
        let three = run_in_pool(3, inputs, dtype, &f);
        for (i, (a, b)) in one.iter().zip(&three).enumerate() {
            let what = if i == 0 { "output".to_string() } else { format!("gradient of input {}", i - 1) };
            assert!(a == b, "{name} ({dtype:?}): the {what} differs between 1 and 3 threads");
        }
    }
}

fn randn_inputs(shapes: &[&[usize]], seed: u64) -> Vec<Tensor> {
    shapes.iter().enumerate().map(|(i, s)| randn64(s, seed + i as u64)).collect()
}

#[test]
fn threads_conv3d_stride212_bias() {
    let inputs = randn_inputs(&[&[2, 5, 9, 10, 11], &[6, 5, 3, 3, 3], &[6]], 1);
    assert_thread_count_invariant("conv3d", &inputs, |t, v| conv(t, &v[0], &v[1], Some(&v[2]), &[2, 1, 2]));
}

#[test]
fn threads_conv2d_k5() {
    let inputs = randn_inputs(&[&[3, 4, 13, 17], &[7, 4, 5, 5]], 2);
    assert_thread_count_invariant("conv2d", &inputs, |t, v| conv(t, &v[0], &v[1], None, &[1, 1]));
}

#[test]
fn threads_conv_transpose3d() {
    let inputs = randn_inputs(&[&[2, 4, 5, 6, 7], &[4, 3, 2, 2, 2], &[3]], 3);
    assert_thread_count_invariant("conv_transpose3d", &inputs, |t, v| conv_transpose(t, &v[0], &v[1], Some(&v[2])));
}

#[test]
fn threads_linear() {
    // M = 5 * 27 = 135 rows (not a multiple of the forward's blocks of 4), 19 output rows for the dW blocks.
    let inputs = randn_inputs(&[&[5, 27, 33], &[19, 33], &[19]], 4);
    assert_thread_count_invariant("linear", &inputs, |t, v| linear(t, &v[0], &v[1], Some(&v[2])));
}

#[test]
fn threads_selective_scan() {
    let (g, l, dch, n) = (7, 37, 6, 5);
    let mut inputs = randn_inputs(&[&[g, l, dch], &[g, l, dch], &[dch, n], &[g, l, n], &[g, l, n], &[dch]], 5);
    inputs.extend(randn_inputs(&[&[g, l, dch], &[dch]], 20));
    assert_thread_count_invariant("selective_scan", &inputs, |t, v| {
        let inp = ScanInputs {
            u: &v[0],
            delta: Operand::Tensor(&v[1]),
            a_log: &v[2],
            b: (&v[3]).into(),
            c: (&v[4]).into(),
            d_skip: &v[5],
            z: Operand::Tensor(&v[6]),
            delta_bias: &v[7],
            order: Order::Stored,
        };
        selective_scan(t, &inp)
    });
}
