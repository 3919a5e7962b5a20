//! Views (permute, slice, reshape, expand) read as index arithmetic, against the reference
//! interpreter: of inputs laid out in other orders, of values computed inline (which the
//! lowering stores first), reshapes PyTorch's view rule cannot express (stored, then viewed),
//! and attention's head split feeding the GEMM through offsets and permuted strides.

mod common;
use common::{run_f32, Rng};
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::reference::{eval, Tensor};
use kiln_compiler::{compile, lower_graph, CompileOptions, DType, Scalar, Target};

/// Runs `ir` on random inputs (input i laid out with `strides[i]`, row-major logical values)
/// and compares with the interpreter; `tol` relative (0: exact).
fn check(ir: &str, strides: &[Vec<i64>], tol: f64, scale: f32) -> String {
    let g = parse_graph(ir).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    let mut rng = Rng(42);
    let inputs: Vec<Tensor> = g
        .inputs
        .iter()
        .map(|&v| {
            let sizes = g.ty(v).static_shape().unwrap();
            let data = (0..sizes.iter().product::<i64>()).map(|_| Scalar::Float((scale * rng.uniform(-2.0, 2.0)) as f64)).collect();
            Tensor { dtype: DType::F32, sizes, data }
        })
        .collect();
    // Lay each input out in memory with its strides.
    let laid: Vec<Vec<f32>> = inputs
        .iter()
        .zip(strides)
        .map(|(t, st)| {
            let span = t.sizes.iter().zip(st).map(|(n, s)| (n - 1).max(0) * s).sum::<i64>() + 1;
            let mut mem = vec![f32::NAN; span as usize];
            for (i, v) in t.data.iter().enumerate() {
                let (mut rest, mut off) = (i as i64, 0);
                for d in (0..t.sizes.len()).rev() {
                    off += (rest % t.sizes[d]) * st[d];
                    rest /= t.sizes[d];
                }
                mem[off as usize] = v.as_f64() as f32;
            }
            mem
        })
        .collect();
    let p = compile(&g, strides, &Target::host(), &CompileOptions::default()).unwrap();
    let got = run_f32(&p, &laid.iter().map(|v| v.as_slice()).collect::<Vec<_>>());
    let want = eval(&g, &inputs);
    let loops = lower_graph(&g, strides).unwrap().to_string();
    for (o, (got, want)) in got.iter().zip(&want).enumerate() {
        for (i, (x, w)) in got.iter().zip(&want.data).enumerate() {
            let w = w.as_f64();
            assert!((*x as f64 - w).abs() <= tol * w.abs().max(1.0), "output {o} element {i}: {x} vs {w}\n{ir}\n{loops}");
        }
    }
    loops
}

#[test]
fn slices_reshapes_and_expands_read_through_strides() {
    // A slice and a reshape of a transposed input: the slice reads through, the flatten of a
    // transpose cannot, so the input is copied first.
    let ir = "graph(%0: f32[6, 4], %1: f32[4]) {
  %2 = slice(%0) dim=0 start=2 : f32[3, 4]
  %3 = reshape(%0) : f32[24]
  %4 = expand(%1) : f32[3, 4]
  %5 = add(%2, %4) : f32[3, 4]
  %6 = exp(%3) : f32[24]
  return (%5, %6)
}";
    check(ir, &[vec![1, 6], vec![1]], 2e-7, 1.0);
    check(ir, &[vec![4, 1], vec![1]], 2e-7, 1.0);
    // A slice of a value computed inline (stored first), and unit-dim reshapes (remaps).
    let ir = "graph(%0: f32[5, 8]) {
  %1 = tanh(%0) : f32[5, 8]
  %2 = slice(%1) dim=1 start=3 : f32[5, 4]
  %3 = reshape(%2) : f32[5, 1, 4]
  %4 = reshape(%0) : f32[1, 5, 8, 1]
  %5 = neg(%4) : f32[1, 5, 8, 1]
  return (%3, %5)
}";
    check(ir, &[vec![8, 1]], 4e-7, 1.0);
}

#[test]
fn attention_heads_feed_the_gemm_as_views_of_one_buffer() {
    // qkv: [1, s, 3e] from a product; q, k, v are slices split into heads and permuted: the
    // GEMM reads each through an offset and strides, never a copy of its own.
    let (s, e, h) = (17, 32, 2);
    let d = e / h;
    let ir = format!(
        "graph(%0: f32[1, {s}, {e}], %1: f32[{e}, {e3}]) {{
  %2 = matmul(%0, %1) : f32[1, {s}, {e3}]
  %3 = slice(%2) dim=2 start=0 : f32[1, {s}, {e}]
  %4 = slice(%2) dim=2 start={e} : f32[1, {s}, {e}]
  %5 = slice(%2) dim=2 start={e2} : f32[1, {s}, {e}]
  %6 = reshape(%3) : f32[1, {s}, {h}, {d}]
  %7 = reshape(%4) : f32[1, {s}, {h}, {d}]
  %8 = reshape(%5) : f32[1, {s}, {h}, {d}]
  %9 = permute(%6) dims=[0, 2, 1, 3] : f32[1, {h}, {s}, {d}]
  %10 = permute(%7) dims=[0, 2, 3, 1] : f32[1, {h}, {d}, {s}]
  %11 = permute(%8) dims=[0, 2, 1, 3] : f32[1, {h}, {s}, {d}]
  %12 = matmul(%9, %10) : f32[1, {h}, {s}, {s}]
  %13 = softmax(%12) dim=3 : f32[1, {h}, {s}, {s}]
  %14 = matmul(%13, %11) : f32[1, {h}, {s}, {d}]
  %15 = permute(%14) dims=[0, 2, 1, 3] : f32[1, {s}, {h}, {d}]
  %16 = reshape(%15) : f32[1, {s}, {e}]
  return (%16)
}}",
        e3 = 3 * e,
        e2 = 2 * e
    );
    // Small values keep the scores' softmax well conditioned (the bound is float32 rounding).
    let loops = check(&ir, &[vec![s * e, e, 1], vec![3 * e, 1]], 2e-5, 0.25);
    assert_eq!(loops.matches("gemm acc").count(), 3, "{loops}");
    assert!(loops.contains(&format!("b3[{e} + batch")), "k read at its offset in the qkv buffer:\n{loops}");
}

#[test]
fn cat_writes_each_part_into_its_place() {
    let ir = "graph(%0: f32[3, 4], %1: f32[3, 2], %2: f32[1, 6]) {
  %3 = tanh(%1) : f32[3, 2]
  %4 = cat(%0, %3) dim=1 : f32[3, 6]
  %5 = cat(%4, %2) dim=0 : f32[4, 6]
  %6 = mul(%5, %5) : f32[4, 6]
  return (%6, %4)
}";
    check(ir, &[vec![1, 3], vec![2, 1], vec![6, 1]], 4e-7, 1.0);
}
