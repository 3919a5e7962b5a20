//! GEMM and GEMV kernels against a float64 reference, over random shapes (odd sizes, 1, and
//! remainders of every tile), transposed and strided operands, broadcast batches and fused
//! epilogues, in the manner of tract's kernel proptests.
//!
//! Bound: each element is a float32 sum of k products; |computed - exact| ≤ γ(k+2) · Σ|aᵢ bᵢ|
//! with γ(n) = n·u/(1 - n·u), u = 2⁻²⁴ (Higham's bound for recursive summation, plus the
//! product's rounding and the final store). A kernel that drops or repeats a term exceeds it.

mod common;
use common::{lay, Rng};
use kiln_compiler::graph::ir::parse_graph;
use kiln_compiler::graph::layout::dense_strides;
use kiln_compiler::{compile, lower_graph, CompileOptions, Target};

struct Case {
    batch_a: Vec<i64>,
    batch_b: Vec<i64>,
    m: i64,
    n: i64,
    k: i64,
    /// A read transposed (memory k-major) / B read transposed (memory n-major, a Linear weight).
    a_t: bool,
    b_t: bool,
    /// The epilogue text, with %p the product; empty for none.
    epilogue: &'static str,
}

fn ir_of(c: &Case) -> (String, Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let shape = |b: &[i64], r: i64, col: i64| {
        let mut s = b.to_vec();
        s.extend([r, col]);
        s
    };
    let fmt = |s: &[i64]| s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let (sa, sb) = (shape(&c.batch_a, c.m, c.k), shape(&c.batch_b, c.k, c.n));
    let rank = c.batch_a.len().max(c.batch_b.len());
    let mut batch = vec![1i64; rank];
    for (dst, src) in [(&c.batch_a, 0), (&c.batch_b, 1)] {
        let _ = src;
        for (i, &d) in dst.iter().enumerate() {
            let j = rank - dst.len() + i;
            batch[j] = batch[j].max(d);
        }
    }
    let so = shape(&batch, c.m, c.n);
    // Dims outermost first in memory: a transposed operand swaps its two matrix dims.
    let layout = |rank: usize, t: bool| {
        let mut l: Vec<usize> = (0..rank).collect();
        if t {
            l.swap(rank - 2, rank - 1);
        }
        l
    };
    let mut ir = format!("graph(%0: f32[{}], %1: f32[{}], %2: f32[{}], %3: f32[{}]) {{\n", fmt(&sa), fmt(&sb), c.n, fmt(&so));
    ir += &format!("  %4 = matmul(%0, %1) : f32[{}]\n", fmt(&so));
    let mut last = 4;
    for line in c.epilogue.lines().filter(|l| !l.trim().is_empty()) {
        last += 1;
        let line = line.replace("%prev", &format!("%{}", last - 1)).replace("%p", "%4").replace("SHAPE", &fmt(&so));
        ir += &format!("  %{last} = {line}\n");
    }
    ir += &format!("  return (%{last})\n}}\n");
    let strides = vec![dense_strides(&sa, &layout(sa.len(), c.a_t)), dense_strides(&sb, &layout(sb.len(), c.b_t)), vec![1], dense_strides(&so, &layout(so.len(), false))];
    (ir, vec![sa, sb, vec![c.n], so], strides)
}

fn check(c: &Case, rng: &mut Rng) {
    let (ir, sizes, strides) = ir_of(c);
    let g = parse_graph(&ir).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    let values: Vec<Vec<f32>> = sizes.iter().map(|s| (0..s.iter().product::<i64>()).map(|_| rng.uniform(-1.0, 1.0)).collect()).collect();
    let laid: Vec<Vec<f32>> = values.iter().zip(&sizes).zip(&strides).map(|((v, s), st)| lay(v, s, st)).collect();
    let program = compile(&g, &strides, &Target::host(), &CompileOptions::default()).unwrap_or_else(|e| panic!("{e}\n{ir}"));
    let loops = lower_graph(&g, &strides).unwrap().to_string();
    let out_len: i64 = program.outputs().next().unwrap().sizes.iter().product();
    let mut out = vec![0f32; out_len as usize];
    let ins: Vec<*const u8> = laid.iter().map(|v| v.as_ptr() as *const u8).collect();
    unsafe { program.run(&ins, &[out.as_mut_ptr() as *mut u8]) }.unwrap();
    // Reference: the product in f64, then the epilogue through the interpreter on f64 inputs.
    let inputs: Vec<kiln_compiler::graph::reference::Tensor> = values
        .iter()
        .zip(&sizes)
        .map(|(v, s)| kiln_compiler::graph::reference::Tensor { dtype: kiln_compiler::DType::F32, sizes: s.clone(), data: v.iter().map(|&x| kiln_compiler::Scalar::Float(x as f64)).collect() })
        .collect();
    let want = &kiln_compiler::graph::reference::eval(&g, &inputs)[0];
    // |a|·|b| products for the bound, through the same graph with absolute operands and no
    // epilogue.
    let abs_ir = format!("graph(%0: f32[{}], %1: f32[{}]) {{\n  %2 = abs(%0) : {}\n  %3 = abs(%1) : {}\n  %4 = matmul(%2, %3) : {}\n  return (%4)\n}}\n",
        sizes[0].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        sizes[1].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        g.ty(g.inputs[0]), g.ty(g.inputs[1]), g.ty(g.nodes.iter().position(|n| matches!(n.op, kiln_compiler::graph::ir::Op::MatMul { .. })).map(|i| kiln_compiler::ValueId(i as u32)).unwrap()));
    let mags = &kiln_compiler::graph::reference::eval(&parse_graph(&abs_ir).unwrap(), &inputs[..2])[0];
    let u = 2f64.powi(-24);
    let n = (c.k + 2) as f64 * u;
    let gamma = n / (1.0 - n);
    for i in 0..out.len() {
        let (got, exact) = (out[i] as f64, want.data[i].as_f64());
        // The epilogues tested are 1-Lipschitz-ish (relu, add, gelu ≤ 1.13): scale by 2.
        let bound = 2.0 * gamma * mags.data[i % mags.data.len()].as_f64() + 4.0 * u * exact.abs() + 1e-30;
        assert!((got - exact).abs() <= bound, "element {i}: {got} vs {exact} (bound {bound})\n{ir}\n{loops}");
    }
}

const EPILOGUES: &[&str] = &[
    "",
    "add(%p, %2) : f32[SHAPE]",
    "add(%p, %2) : f32[SHAPE]\nrelu(%prev) : f32[SHAPE]",
    "add(%p, %3) : f32[SHAPE]\ngelu(%prev) : f32[SHAPE]",
    "gelu_tanh(%p) : f32[SHAPE]",
];

#[test]
fn gemm_matches_float64_on_random_shapes() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let sizes = [1, 3, 7, 8, 9, 16, 17, 47, 48, 49, 64, 97, 255];
    let mut checked = 0;
    for case in 0..120 {
        let pick = |rng: &mut Rng| sizes[(rng.next_u64() % sizes.len() as u64) as usize];
        let batch_a: Vec<i64> = match case % 4 {
            0 | 1 => vec![],
            2 => vec![(rng.next_u64() % 3 + 1) as i64],
            _ => vec![2, 1],
        };
        let batch_b: Vec<i64> = match case % 4 {
            0 => vec![],
            1 => vec![],
            2 => if rng.next_u64() % 2 == 0 { vec![] } else { batch_a.clone() },
            _ => vec![3],
        };
        let c = Case {
            batch_a,
            batch_b,
            m: pick(&mut rng),
            n: pick(&mut rng),
            k: pick(&mut rng),
            a_t: rng.next_u64() % 3 == 0,
            b_t: rng.next_u64() % 2 == 0,
            epilogue: EPILOGUES[case % EPILOGUES.len()],
        };
        check(&c, &mut rng);
        checked += 1;
    }
    // Large sizes the fuzz does not reach: k beyond the unrolled loop, many panels.
    for (m, n, k) in [(255, 1023, 129), (64, 1024, 1023), (1023, 17, 255), (1, 1023, 1023)] {
        check(&Case { batch_a: vec![], batch_b: vec![], m, n, k, a_t: false, b_t: true, epilogue: EPILOGUES[2] }, &mut rng);
        checked += 1;
    }
    // Thin products of a row-major B (the one- to three-row tiles), broadcast batches.
    for (batch_a, batch_b, m, n, k) in [(vec![], vec![], 1, 1024, 1023), (vec![2, 1], vec![3], 3, 48, 7), (vec![], vec![], 2, 16, 1), (vec![2], vec![2], 1, 256, 33)] {
        check(&Case { batch_a, batch_b, m, n, k, a_t: false, b_t: false, epilogue: EPILOGUES[3] }, &mut rng);
        checked += 1;
    }
    assert_eq!(checked, 128);
}

#[test]
fn large_matmuls_use_the_gemm_kernel_and_thin_ones_the_loop_nest() {
    let g = |m: i64, n: i64| {
        parse_graph(&format!("graph(%0: f32[{m}, 32], %1: f32[32, {n}]) {{\n  %2 = matmul(%0, %1) : f32[{m}, {n}]\n  return (%2)\n}}\n")).unwrap()
    };
    let text = |m, n| lower_graph(&g(m, n), &[vec![32, 1], vec![n, 1]]).unwrap().to_string();
    assert!(text(64, 64).contains("gemm acc0"), "{}", text(64, 64));
    // A row-major B at M = 1: the GEMM on a one-row tile (dot products would step through
    // B's columns).
    let one_row = format!("tile 1x{}", kiln_compiler::kernels::gemm::GemmTile::for_rows(1).nr);
    assert!(text(1, 64).contains(&one_row), "{}", text(1, 64));
    let thin = lower_graph(&g(1, 64), &[vec![32, 1], vec![1, 32]]).unwrap().to_string();
    assert!(!thin.contains("gemm"), "x times a transposed weight at M = 1 is the loop nest: {thin}");
}

#[test]
fn a_pointwise_tail_becomes_the_gemm_epilogue() {
    let ir = "graph(%0: f32[64, 32], %1: f32[48, 32], %2: f32[48], %3: f32[64, 48]) {\n  %4 = permute(%1) dims=[1, 0] : f32[32, 48]\n  %5 = matmul(%0, %4) : f32[64, 48]\n  %6 = add(%5, %2) : f32[64, 48]\n  %7 = gelu(%6) : f32[64, 48]\n  %8 = add(%7, %3) : f32[64, 48]\n  return (%8)\n}\n";
    let text = lower_graph(&parse_graph(ir).unwrap(), &[vec![32, 1], vec![32, 1], vec![1], vec![48, 1]]).unwrap().to_string();
    assert_eq!(text.matches("kernel ").count(), 1, "{text}");
    assert!(text.contains("gemm acc") && text.contains("gelu(add(acc"), "{text}");
    // A product read twice (here also returned) stays stored: nothing to fuse into.
    let ir2 = ir.replace("return (%8)", "return (%8, %5)");
    let text = lower_graph(&parse_graph(&ir2).unwrap(), &[vec![32, 1], vec![32, 1], vec![1], vec![48, 1]]).unwrap().to_string();
    assert_eq!(text.matches("kernel ").count(), 2, "{text}");
    // A product another GEMM takes as an operand (read by the runtime's packing, not by a
    // load) stays stored too, though a pointwise consumer reads it at its own coordinates.
    let ir3 = "graph(%0: f32[64, 32], %1: f32[32, 48]) {\n  %2 = matmul(%0, %1) : f32[64, 48]\n  %3 = tanh(%2) : f32[64, 48]\n  %4 = permute(%2) dims=[1, 0] : f32[48, 64]\n  %5 = matmul(%4, %3) : f32[48, 48]\n  return (%5)\n}\n";
    let text = lower_graph(&parse_graph(ir3).unwrap(), &[vec![32, 1], vec![48, 1]]).unwrap().to_string();
    assert!(!text.contains("tanh(acc"), "the product's store was fused away:\n{text}");
}

/// The program's one output run on `ins` packing `weight` (data `w`) per call, and with a
/// copy packed once beforehand.
fn per_call_and_prepacked(p: &kiln_compiler::CompiledProgram, weight: &kiln_compiler::runtime::program::PackableWeight, w: &[f32], ins: &[*const u8], out_len: usize) -> (Vec<f32>, Vec<f32>) {
    #[derive(Clone, Copy)]
    #[repr(align(64))]
    #[allow(dead_code)] // storage only
    struct Line([f32; 16]);
    let mut packed = vec![Line([f32::NAN; 16]); weight.elems.div_ceil(16)];
    unsafe { p.pack_weight(weight, w.as_ptr() as _, packed.as_mut_ptr() as *mut f32) };
    let run = |prepacked: bool| {
        let mut out = vec![0f32; out_len];
        let mut slot = Some(out.as_mut_ptr() as *mut u8);
        let ptr = packed.as_ptr() as *const f32;
        unsafe { p.run_packed(|i| ins[i], |_| slot.take(), &|_| prepacked.then_some(ptr)) }.unwrap();
        out
    };
    (run(false), run(true))
}

#[test]
fn a_weight_packed_once_gives_the_same_result_as_packing_per_call() {
    // x · Wᵀ + b with W an input: the program offers W for packing.
    let (m, n, k) = (37, 100, 65);
    let ir = format!("graph(%0: f32[{m}, {k}], %1: f32[{n}, {k}], %2: f32[{n}]) {{\n  %3 = permute(%1) dims=[1, 0] : f32[{k}, {n}]\n  %4 = matmul(%0, %3) : f32[{m}, {n}]\n  %5 = add(%4, %2) : f32[{m}, {n}]\n  return (%5)\n}}\n");
    let strides = [vec![k, 1], vec![k, 1], vec![1]];
    let p = compile(&parse_graph(&ir).unwrap(), &strides, &Target::host(), &CompileOptions::default()).unwrap();
    let weights = p.packable_weights().to_vec();
    assert_eq!(weights.len(), 1);
    assert_eq!(weights[0].input, 1);
    let mut rng = Rng(7);
    let mut vals = |len: i64| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let (x, w, b) = (vals(m * k), vals(n * k), vals(n));
    let ins = [x.as_ptr() as *const u8, w.as_ptr() as *const u8, b.as_ptr() as *const u8];
    let (per_call, once) = per_call_and_prepacked(&p, &weights[0], &w, &ins, (m * n) as usize);
    assert!(per_call.iter().zip(&once).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(per_call.iter().all(|v| v.is_finite()));
}

#[test]
fn two_products_by_one_weight_share_its_packed_copy() {
    // An RNN's steps: h1 = tanh(x · Wᵀ), h2 = h1 · Wᵀ. One packed copy serves both GEMMs.
    let (m, k) = (5, 40);
    let ir = format!("graph(%0: f32[{m}, {k}], %1: f32[{k}, {k}]) {{\n  %2 = permute(%1) dims=[1, 0] : f32[{k}, {k}]\n  %3 = matmul(%0, %2) : f32[{m}, {k}]\n  %4 = tanh(%3) : f32[{m}, {k}]\n  %5 = matmul(%4, %2) : f32[{m}, {k}]\n  return (%5)\n}}\n");
    let strides = [vec![k, 1], vec![k, 1]];
    let p = compile(&parse_graph(&ir).unwrap(), &strides, &Target::host(), &CompileOptions::default()).unwrap();
    let weights = p.packable_weights().to_vec();
    assert_eq!(weights.len(), 1, "{weights:?}");
    assert_eq!(weights[0].shared_by.len(), 2, "{weights:?}");
    let mut rng = Rng(8);
    let mut vals = |len: i64| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let (x, w) = (vals(m * k), vals(k * k));
    let ins = [x.as_ptr() as *const u8, w.as_ptr() as *const u8];
    let (per_call, once) = per_call_and_prepacked(&p, &weights[0], &w, &ins, (m * k) as usize);
    assert!(per_call.iter().zip(&once).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(per_call.iter().all(|v| v.is_finite() && *v != 0.0));
}
