//! The shared test helpers in tests/common can fail: [`common::assert_close`] panics past its bound |got - want| <=
//! atol + rtol |want|, on NaN and on a length mismatch, and names the worst element; [`common::max_abs_diff`] and
//! [`common::rel_err`] do not hide a NaN.

mod common;
use common::{assert_close, assert_rel_err, max_abs_diff, rel_err};

#[test]
fn assert_close_accepts_differences_within_the_bound() {
    // |1.5 - 1.0| = 0.5 <= 0.1 + 0.4 * 1.0; the bound is inclusive.
    assert_close("inclusive bound", &[1.5f64, -2.0], &[1.0f64, -2.0], 0.4, 0.1);
    assert_close("float32", &[1.0f32, 2.0], &[1.0f32, 2.0], 0.0, 0.0);
    assert_close("float32 against float64", &[0.5f32], &[0.5f64], 0.0, 0.0);
}

#[test]
#[should_panic(
    expected = "what-name: 1 of 3 elements differ by more than 1e-6 + 0e0 |want|; worst at 1: got 2.1, want 2"
)]
fn assert_close_panics_past_the_bound_and_names_the_worst_element() {
    assert_close("what-name", &[1.0, 2.1, 3.0], &[1.0, 2.0, 3.0], 0.0, 1e-6);
}

#[test]
#[should_panic(expected = "worst at 2")]
fn assert_close_reports_the_largest_excess() {
    assert_close("excess", &[1.1, 2.0, 3.5], &[1.0, 2.0, 3.0], 0.0, 1e-3);
}

#[test]
#[should_panic(expected = "got NaN")]
fn assert_close_fails_on_nan() {
    assert_close("nan", &[f64::NAN], &[0.0], 1.0, 1.0);
}

#[test]
#[should_panic(expected = "lengths differ")]
fn assert_close_fails_on_a_length_mismatch() {
    assert_close("length", &[1.0f32], &[1.0f32, 2.0], 1.0, 1.0);
}

#[test]
fn max_abs_diff_is_the_largest_difference_and_nan_when_any_is() {
    assert_eq!(max_abs_diff(&[1.0f32, 5.0, -1.0], &[1.5f32, 5.0, 1.0]), 2.0);
    assert!(max_abs_diff(&[1.0, f64::NAN], &[1.0, 0.0]).is_nan());
}

#[test]
fn rel_err_is_the_relative_norm_and_infinite_on_nan() {
    // ||(3, 0) - (3, 4)|| / ||(3, 4)|| = 4 / 5.
    assert!((rel_err(&[3.0, 0.0], &[3.0, 4.0]) - 0.8).abs() < 1e-15);
    assert_eq!(rel_err(&[f64::NAN, 0.0], &[3.0, 4.0]), f64::INFINITY);
    assert_eq!(assert_rel_err("equal", &[3.0, 4.0], &[3.0, 4.0], 1e-300), 0.0);
}

#[test]
#[should_panic(expected = "rel-name: relative error 8e-1 >= 5e-1")]
fn assert_rel_err_panics_at_the_tolerance() {
    assert_rel_err("rel-name", &[3.0, 0.0], &[3.0, 4.0], 0.5);
}
