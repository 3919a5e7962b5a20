//! Error bounds of the inline f32 approximations, measured against f64 libm.
//! The bounds asserted here are the ones ARCHITECTURE.md documents.

mod common;
use common::*;

extern "C" {
    fn erf(x: f64) -> f64;
}

fn sweep() -> Vec<f32> {
    let mut xs: Vec<f32> = (-20000..=20000).map(|i| i as f32 * 0.005).collect(); // [-100, 100]
    let mut r = Rng(0x9E3779B97F4A7C15);
    for _ in 0..20000 {
        let m = r.uniform(-1.0, 1.0);
        let e = r.uniform(-40.0, 40.0);
        xs.push(m * 2f32.powf(e));
    }
    xs.extend([0.0, -0.0, 1e-45, -1e-45, 1e-38, f32::MIN_POSITIVE, 88.0, 88.7, 89.0, -87.0, -103.0, -104.0, -110.0, 0.4, -0.4, 0.5, -0.5, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    xs
}

/// Max error in units of max(|ref| * 2^-23, abs_floor) over the sweep.
fn check(op: &str, reference: impl Fn(f64) -> f64, bound_ulps: f64, abs_floor: f64) {
    let xs = sweep();
    let n = xs.len();
    let p = build(&format!("graph(%0: f32[{n}]) {{\n %1 = {op}(%0) : f32[{n}]\n return (%1)\n}}"), &[vec![1]]);
    let out = &run_f32(&p, &[&xs])[0];
    let mut worst = (0.0f64, 0.0f32);
    for (&x, &y) in xs.iter().zip(out) {
        let r = reference(x as f64);
        let rf = r as f32; // the correctly rounded answer (within f32 range)
        if rf.is_nan() || y.is_nan() {
            assert!(rf.is_nan() && y.is_nan(), "{op}({x:e}) = {y:e}, want {rf:e}");
            continue;
        }
        if rf.is_infinite() || y.is_infinite() {
            assert_eq!(rf, y, "{op}({x:e})");
            continue;
        }
        let unit = (r.abs() * f32::EPSILON as f64).max(abs_floor);
        let err = (y as f64 - r).abs() / unit;
        if err > worst.0 {
            worst = (err, x);
        }
    }
    println!("{op}: max error {:.2} units at x = {:e}", worst.0, worst.1);
    assert!(worst.0 <= bound_ulps, "{op}: error {:.2} > {bound_ulps} at x = {:e}", worst.0, worst.1);
}

#[test]
fn exp_f32() {
    check("exp", f64::exp, 1.5, 1e-45);
}
#[test]
fn log_f32() {
    check("log", f64::ln, 1.0, 1e-45);
}
#[test]
fn log1p_f32() {
    check("log1p", f64::ln_1p, 2.0, 1e-45);
}
#[test]
fn tanh_f32() {
    check("tanh", f64::tanh, 2.0, 1e-45);
}
#[test]
fn sigmoid_f32() {
    // Below f32's smallest normal the answer is measured in absolute terms: exp(-x) overflows
    // f32 there (as it does in PyTorch's kernel), giving 0 instead of a subnormal.
    check("sigmoid", |x| 1.0 / (1.0 + (-x).exp()), 2.0, f32::MIN_POSITIVE as f64);
}
#[test]
fn silu_f32() {
    // x / (1 + exp(-x)) as PyTorch evaluates it in f32: exp(-x) overflows to inf below
    // x = -88.72 and the result is -0 there (the true value is ~1e-37).
    // silu(-inf) = -inf / inf = NaN, in PyTorch too.
    check("silu", |x| if x == f64::NEG_INFINITY { f64::NAN } else if -x > (f32::MAX as f64).ln() { -0.0 } else { x / (1.0 + (-x).exp()) }, 2.0, f32::MIN_POSITIVE as f64);
}
#[test]
fn erf_f32() {
    check("erf", |x| unsafe { erf(x) }, 2.0, 1e-45);
}
#[test]
fn gelu_f32() {
    // PyTorch's form, whose 1 + erf(x) cancels for x << 0 (Kiln computes it the same way so
    // that it is -0 where eager's is): an absolute floor of one float32 ulp of 1 there.
    // gelu(+inf) is NaN in PyTorch's float32 AVX-512 kernel, and so in Kiln's there.
    let nan_at_inf = kiln_compiler::Target::host().eager_avx512();
    check("gelu", |x| if x == f64::INFINITY && nan_at_inf { f64::NAN } else { 0.5 * x * (1.0 + unsafe { erf(x / 2f64.sqrt()) }) }, 1.5, f32::EPSILON as f64);
}
#[test]
fn gelu_tanh_f32() {
    // Absolute floor: PyTorch's own tanh form cancels for x << 0 (1 + tanh ~ 0).
    check("gelu_tanh", |x| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()), 1.5, 1e-7);
}
