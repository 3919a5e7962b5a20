mod common;
use common::*;

#[test]
fn small_exp() {
    let p = build("graph(%0: f32[8]) {\n %1 = exp(%0) : f32[8]\n return (%1)\n}", &[vec![1]]);
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
    let out = run_f32(&p, &[&x]);
    for (a, b) in x.iter().zip(&out[0]) {
        assert!((a.exp() - b).abs() <= 1e-6 * a.exp(), "{a} {b}");
    }
}

#[test]
fn big_add_parallel() {
    let n = 100_000;
    let p = build(&format!("graph(%0: f32[{n}], %1: f32[{n}]) {{\n %2 = add(%0, %1) : f32[{n}]\n return (%2)\n}}"), &[vec![1], vec![1]]);
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let out = run_f32(&p, &[&x, &x]);
    assert_eq!(out[0][n - 1], 2.0 * (n - 1) as f32);
}
